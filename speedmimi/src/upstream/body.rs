//! The client's request body as the upstream connections carry it: the frames read ahead for
//! framing validation, then the rest of the stream, which must arrive before the request's read
//! deadline and stay within `server.max_body_bytes`; its bytes are counted for the server and
//! the backend.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, atomic::Ordering::Relaxed},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::{
    sync::oneshot,
    time::{Instant, Sleep},
};

use crate::stats::{ServerStats, Traffic};

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
    pub backend: Arc<Traffic>,
}

impl Meter {
    fn received(&self, n: u64) {
        self.server.traffic.bytes_in.fetch_add(n, Relaxed);
        self.backend.bytes_in.fetch_add(n, Relaxed);
    }
}
