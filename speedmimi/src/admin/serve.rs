//! The admin listener, held to the same limits as the proxy's: at most `MAX_CONN` connections
//! (one more is told 503 and closed), a request head within `server.read_timeout` (also the
//! idle limit between requests), a request body within it too, a write that makes no progress
//! for `server.write_timeout` fails (a dashboard stream whose reader stopped reading ends, with
//! at most `SEND_BUFFER` of kernel memory held meanwhile), and a stop waits at most
//! `server.drain_timeout` for calls in progress. Served with HTTP/1.1 only.

use std::{sync::Arc, time::Duration};

use axum::Router;
use bytes::Bytes;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tower::ServiceExt;

use crate::{
    proxy::{
        io::ClientIo,
        server::{accept, drive},
    },
    shutdown::Shutdown,
    state::State,
    upstream::RequestBody,
};

/// Admin connections open at once. The dashboard's streams (at most 32) fit with room for calls.
pub const MAX_CONN: usize = 64;

/// Longest admin request head (a bearer token and a browser's headers fit many times over).
const MAX_HEAD: usize = 64 * 1024;

/// What a connection past `MAX_CONN` is told before the close.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 51\r\nconnection: close\r\n\r\n{\"error\":\"too many admin connections, retry later\"}";

/// Each connection's kernel send buffer (Linux doubles it): a reader that stops reading pins at
/// most this much kernel memory per connection, not the 4 MiB autotuning would grow to.
const SEND_BUFFER: usize = 128 * 1024;

/// What a stop waits past the drain time for connections just closed to give their slots back.
const DRAIN_SLACK: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `shutdown`, with the server section's timeouts as they
/// are at the start.
pub async fn serve(listener: TcpListener, router: Router, state: Arc<State>, shutdown: Shutdown) {
    let (read_timeout, write_timeout, drain) = {
        let config = state.config();
        let s = &config.file.server;
        (s.read_timeout.get(), s.write_timeout.get(), s.drain_timeout.get())
    };
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new()).header_read_timeout(read_timeout).max_buf_size(MAX_HEAD);
    let h1 = Arc::new(h1);
    let slots = Arc::new(Semaphore::new(MAX_CONN));
    loop {
        let (stream, peer) = tokio::select! {
            r = accept(&listener) => match r {
                Some(x) => x,
                None => continue,
            },
            _ = shutdown.wait() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = MAX_CONN, "admin connections at their limit: refused with 503");
            let _ = stream.try_write(BUSY);
            continue;
        };
        if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER) {
            tracing::debug!(%peer, error = %e, "admin connection keeps the kernel's send buffer");
        }
        let (h1, router, shutdown) = (h1.clone(), router.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let req = req.map(|b| axum::body::Body::new(RequestBody::streamed(b, Some(read_timeout), None)));
                router.clone().oneshot(req)
            });
            let io = TokioIo::new(ClientIo::new(stream, write_timeout, Bytes::new(), None, None));
            let conn = h1.serve_connection(io, service).with_upgrades();
            if let Err(e) = drive(conn, &shutdown, drain, std::future::pending()).await {
                tracing::debug!(%peer, error = %e, "admin connection ended with error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain + DRAIN_SLACK, slots.acquire_many(MAX_CONN as u32)).await.is_err() {
        tracing::warn!("admin connections still open {DRAIN_SLACK:?} after the drain time");
    }
}
