//! The listeners: accept client connections (at most `server.max_conn` at once; the rest
//! wait in the backlog) and serve each with hyper: HTTP/1.1 and prior-knowledge h2c on the
//! HTTP listener, h2c only on the gRPC listener. On shutdown, connections finish gracefully.

use std::{sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{net::TcpListener, sync::Semaphore};

pub use super::service::Listener;
use super::{framing::Scanner, io::ClientIo, service::Handler};
use crate::{shutdown::Shutdown, state::State};

/// Longest a graceful stop waits for open connections to finish their requests.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves one listener (or one worker's clone of it) until shutdown. `limit` is shared by all
/// workers of a listener: it holds one permit per `server.max_conn`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    kind: Listener,
    limit: Arc<Semaphore>,
    shutdown: Shutdown,
) {
    let config = state.config();
    let server = &config.file.server;
    let read_timeout = server.read_timeout.get();
    let write_timeout = server.write_timeout.get();
    let max_head = (server.max_header_bytes as usize).max(8192);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(read_timeout).max_buf_size(max_head).half_close(false);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(1024);
    if kind == Listener::Grpc {
        builder = builder.http2_only();
    }
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();

    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let (scanner, ambiguous) = match kind {
            Listener::Http => {
                let (s, flag) = Scanner::new();
                (Some(s), Some(flag))
            }
            Listener::Grpc => (None, None),
        };
        let handler = Handler::new(state.clone(), peer, kind, ambiguous);
        let service = service_fn(move |req| handler.clone().handle(req));
        let io = TokioIo::new(ClientIo::new(stream, write_timeout, scanner));
        let conn = builder.serve_connection_with_upgrades(io, service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "client connection ended with error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!(listener = ?kind, "connections still open after {DRAIN:?}; closing them");
    }
}
