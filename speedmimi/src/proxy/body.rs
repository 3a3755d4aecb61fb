//! Body types of the proxy. `RequestBody` streams the client's body upstream after the bytes
//! read ahead for framing validation; `ResponseBody` streams a backend's response and gives
//! the connection back to the pool, and the in-flight slot back to the backend, when it ends.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1};
use tokio::{
    sync::oneshot,
    time::{Instant, Sleep},
};

use std::sync::atomic::Ordering::Relaxed;

use super::activity::Open;
use crate::{backend::Backend, stats::ServerStats};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body: frames already read ahead, then the rest of the stream, which
/// must arrive before the request's read deadline.
pub struct RequestBody {
    /// Where received bytes are counted (set once the backend is known).
    pub meter: Option<Meter>,
    ahead: VecDeque<Frame<Bytes>>,
    ahead_len: u64,
    rest: Option<Incoming>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// `server.max_body_bytes`, and the bytes taken from the client so far.
    limit: Option<u64>,
    taken: u64,
    /// Told when the body has been sent whole (or given up): the backend's time starts then.
    uploaded: Option<oneshot::Sender<()>>,
}

#[derive(Debug, thiserror::Error)]
#[error("client body not received within read_timeout")]
pub struct BodyTimeout;

/// The client's body went past `server.max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than max_body_bytes ({0})")]
pub struct BodyTooLarge(pub u64);

impl BodyTooLarge {
    /// Whether `e` or one of its causes is this error: a body cut by the limit while a
    /// backend was being sent it surfaces as the send's error.
    pub fn caused(e: &(dyn std::error::Error + 'static)) -> bool {
        std::iter::successors(Some(e), |e| e.source()).any(|e| e.is::<BodyTooLarge>())
    }
}

impl RequestBody {
    pub fn empty() -> Self {
        RequestBody::new(VecDeque::new(), 0, None, None, None)
    }

    fn new(
        ahead: VecDeque<Frame<Bytes>>,
        ahead_len: u64,
        rest: Option<Incoming>,
        deadline: Option<Pin<Box<Sleep>>>,
        limit: Option<u64>,
    ) -> Self {
        RequestBody { meter: None, ahead, ahead_len, rest, deadline, limit, taken: ahead_len, uploaded: None }
    }

    /// Resolves (with a value or an error, both meaning "done") once the body has been sent
    /// whole, or at once if there is none.
    pub fn uploaded(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if !self.is_end_stream() {
            self.uploaded = Some(tx);
        }
        rx
    }

    fn check_end(&mut self, frame: &Option<Result<Frame<Bytes>, BoxError>>) {
        let ended = match frame {
            None | Some(Err(_)) => true,
            Some(Ok(_)) => self.is_end_stream(),
        };
        if ended && let Some(tx) = self.uploaded.take() {
            let _ = tx.send(());
        }
    }

    /// The client's body, with its first `limit` bytes (or all of it, if shorter) read before
    /// anything goes upstream, so malformed chunked framing there is caught while the request
    /// can still get a 400 and no backend has seen it. The wait is bounded by `read_timeout`.
    /// Past `max_body`, `BodyTooLarge`.
    pub async fn read_ahead(
        mut body: Incoming,
        read_timeout: Duration,
        limit: usize,
        max_body: Option<u64>,
    ) -> Result<Self, BoxError> {
        use http_body_util::BodyExt;
        let deadline = Instant::now() + read_timeout;
        let mut ahead = VecDeque::new();
        let mut ahead_len = 0u64;
        while !body.is_end_stream() && (ahead_len as usize) < limit {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(BodyTimeout.into()),
                Ok(Some(Ok(frame))) => {
                    ahead_len += frame.data_ref().map_or(0, |d| d.len() as u64);
                    ahead.push_back(frame);
                    if let Some(max) = max_body
                        && ahead_len > max
                    {
                        return Err(BodyTooLarge(max).into());
                    }
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => break,
            }
        }
        let deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
        Ok(RequestBody::new(ahead, ahead_len, Some(body), deadline, max_body))
    }

    /// The client's body streamed as it comes (its framing is a length or HTTP/2's own),
    /// bounded by `read_timeout` when given (gRPC streams may rightly last for hours), cut
    /// with `BodyTooLarge` past `max_body`.
    pub fn streamed(body: Incoming, read_timeout: Option<Duration>, max_body: Option<u64>) -> Self {
        let deadline = read_timeout.map(|t| Box::pin(tokio::time::sleep(t)));
        RequestBody::new(VecDeque::new(), 0, Some(body), deadline, max_body)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(f) = this.ahead.pop_front() {
            let n = f.data_ref().map_or(0, |d| d.len() as u64);
            this.ahead_len -= n;
            if let Some(m) = &this.meter {
                m.received(n);
            }
            let r = Some(Ok(f));
            this.check_end(&r);
            return Poll::Ready(r);
        }
        let Some(rest) = this.rest.as_mut() else {
            this.check_end(&None);
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Ready(r) => {
                let n = r.as_ref().and_then(|r| r.as_ref().ok()).map_or(0, |f| f.data_ref().map_or(0, |d| d.len()));
                if let Some(m) = &this.meter {
                    m.received(n as u64);
                }
                this.taken += n as u64;
                let r = match this.limit {
                    Some(max) if this.taken > max => Some(Err(BodyTooLarge(max).into())),
                    _ => r.map(|r| r.map_err(Into::into)),
                };
                this.check_end(&r);
                Poll::Ready(r)
            }
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    ready!(d.as_mut().poll(cx));
                    return Poll::Ready(Some(Err(BodyTimeout.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.as_ref().map_or_else(|| SizeHint::with_exact(0), |r| r.size_hint());
        let mut h = SizeHint::new();
        h.set_lower(rest.lower() + self.ahead_len);
        if let Some(u) = rest.upper() {
            h.set_upper(u + self.ahead_len);
        }
        h
    }
}

/// Counts request body bytes for the server and one backend.
#[derive(Clone)]
pub struct Meter {
    pub server: Arc<ServerStats>,
    pub backend: Arc<Backend>,
}

impl Meter {
    fn received(&self, n: u64) {
        self.server.traffic.bytes_in.fetch_add(n, Relaxed);
        self.backend.traffic.bytes_in.fetch_add(n, Relaxed);
    }
}

/// Held while a request uses a backend: releases the in-flight slot on drop and, when the
/// response ended cleanly, returns the HTTP/1 connection to the pool.
pub struct InFlight {
    backend: Arc<Backend>,
    server: Arc<ServerStats>,
    conn: Option<http1::SendRequest<RequestBody>>,
    clean: bool,
}

impl InFlight {
    pub fn new(backend: Arc<Backend>, server: Arc<ServerStats>) -> Self {
        backend.inflight.fetch_add(1, Relaxed);
        InFlight { backend, server, conn: None, clean: false }
    }

    pub fn meter(&self) -> Meter {
        Meter { server: self.server.clone(), backend: self.backend.clone() }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    pub fn server(&self) -> &Arc<ServerStats> {
        &self.server
    }

    pub fn set_conn(&mut self, conn: http1::SendRequest<RequestBody>) {
        self.conn = Some(conn);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.inflight.fetch_sub(1, Relaxed);
        if self.clean
            && let Some(conn) = self.conn.take()
        {
            self.backend.pool.put_h1(conn);
        }
    }
}

/// What the proxy answers with: a backend's streamed body or a short local one.
pub enum ResponseBody {
    Upstream { inner: Incoming, guard: Option<InFlight> },
    Local(Option<Bytes>),
}

impl ResponseBody {
    /// A backend's body; an empty one releases its guard (cleanly) at once, since hyper may
    /// never poll a body that is already at its end.
    pub fn upstream(inner: Incoming, guard: InFlight) -> Self {
        let mut guard = Some(guard);
        if inner.is_end_stream() {
            finish(&mut guard, true);
        }
        ResponseBody::Upstream { inner, guard }
    }

    pub fn local(text: impl Into<Bytes>) -> Self {
        ResponseBody::Local(Some(text.into()))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Upstream { inner, guard } => {
                let r = ready!(Pin::new(&mut *inner).poll_frame(cx));
                if let (Some(Ok(f)), Some(g)) = (&r, guard.as_ref()) {
                    let n = f.data_ref().map_or(0, |d| d.len() as u64);
                    g.server.traffic.bytes_out.fetch_add(n, Relaxed);
                    g.backend.traffic.bytes_out.fetch_add(n, Relaxed);
                }
                match &r {
                    None => finish(guard, true),
                    Some(Ok(_)) if inner.is_end_stream() => finish(guard, true),
                    Some(Err(_)) => finish(guard, false),
                    Some(Ok(_)) => {}
                }
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(b) => b.is_none(),
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

fn finish(guard: &mut Option<InFlight>, clean: bool) {
    if let Some(mut g) = guard.take() {
        g.clean = clean;
    }
}

/// A response body that keeps its request counted open on the client connection until the
/// body is done with (see `activity`): the head and idle deadlines run only between requests.
pub struct Tracked<B> {
    inner: B,
    _open: Open,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, open: Open) -> Self {
        Tracked { inner, _open: open }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
