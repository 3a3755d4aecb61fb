//! Body types of the proxy: `ResponseBody` streams a backend's response and gives the
//! connection back to the pool, and the in-flight slot back to the backend, when it ends. (The
//! request body, which the upstream connections carry, is `crate::upstream::RequestBody`.)

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1};

use std::sync::atomic::Ordering::Relaxed;

use super::{activity::Open, h1::bridge::RawBody};
use crate::{
    backend::Backend,
    stats::ServerStats,
    upstream::{BoxError, Meter, RequestBody},
};

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
        Meter { server: self.server.clone(), backend: self.backend.traffic.clone() }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    pub fn server(&self) -> &Arc<ServerStats> {
        &self.server
    }

    /// Counts request body bytes the backend was sent.
    pub fn count_received(&self, n: u64) {
        self.server.traffic.bytes_in.fetch_add(n, Relaxed);
        self.backend.traffic.bytes_in.fetch_add(n, Relaxed);
    }

    /// Counts response body bytes relayed to the client.
    pub fn count_sent(&self, n: u64) {
        self.server.traffic.bytes_out.fetch_add(n, Relaxed);
        self.backend.traffic.bytes_out.fetch_add(n, Relaxed);
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

/// What the proxy answers with: a backend's streamed body (from hyper's client, or read off a
/// raw connection by the HTTP/2 bridge) or a short local one.
pub enum ResponseBody {
    Upstream { inner: Incoming, guard: Option<InFlight> },
    Raw(Box<RawBody>),
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
            ResponseBody::Raw(raw) => raw.poll_frame(cx),
            ResponseBody::Upstream { inner, guard } => {
                let r = ready!(Pin::new(&mut *inner).poll_frame(cx));
                if let (Some(Ok(f)), Some(g)) = (&r, guard.as_ref()) {
                    g.count_sent(f.data_ref().map_or(0, |d| d.len() as u64));
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
            ResponseBody::Raw(raw) => raw.is_end_stream(),
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Raw(raw) => raw.size_hint(),
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
