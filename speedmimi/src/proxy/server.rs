//! The listeners: accept client connections (at most `server.max_conn` at once; the rest
//! wait in the backlog) and serve each with hyper: HTTP/1.1 and prior-knowledge h2c on the
//! HTTP listener, HTTP/1.1 or h2 after a TLS handshake on the HTTPS listener, h2c only on the
//! gRPC listener. On shutdown, connections finish gracefully.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::TlsAcceptor;

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
    let tls: Option<TlsAcceptor> = match (kind, &state.tls) {
        (Listener::Https, Some(tls)) => Some(tls.acceptor()),
        (Listener::Https, None) => {
            tracing::error!("HTTPS listener without TLS certificates: not serving it");
            return;
        }
        _ => None,
    };

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
        let conn = Conn { state: state.clone(), builder: builder.clone(), peer, kind, write_timeout, permit };
        let watcher = graceful.watcher();
        let Some(tls) = &tls else {
            tokio::spawn(conn.serve(stream, kind == Listener::Http, watcher));
            continue;
        };
        let handshake = tls.accept(stream);
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(read_timeout, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, timeout = ?read_timeout, "TLS handshake timed out"),
            };
            // The framing scanner reads HTTP/1 only; h2 frames carry their own lengths.
            let http1 = stream.get_ref().1.alpn_protocol() != Some(b"h2");
            conn.serve(stream, http1, watcher).await;
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!(listener = ?kind, "connections still open after {DRAIN:?}; closing them");
    }
}

/// An accepted client connection, ready to be served once its transport (plain or TLS) is up.
struct Conn {
    state: Arc<State>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    peer: SocketAddr,
    kind: Listener,
    write_timeout: Duration,
    /// One of `server.max_conn`, held until the connection ends.
    permit: OwnedSemaphorePermit,
}

impl Conn {
    /// Serves HTTP on `io` until the client leaves or a graceful stop ends it; `http1` feeds
    /// the bytes read through the framing scanner.
    async fn serve<I>(self, io: I, http1: bool, watcher: Watcher)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _open = self.state.stats.connection();
        let (scanner, ambiguous) = match http1 {
            true => {
                let (s, flag) = Scanner::new();
                (Some(s), Some(flag))
            }
            false => (None, None),
        };
        let handler = Handler::new(self.state, self.peer, self.kind, ambiguous);
        let service = service_fn(move |req| handler.clone().handle(req));
        let io = TokioIo::new(ClientIo::new(io, self.write_timeout, scanner));
        let conn = self.builder.serve_connection_with_upgrades(io, service);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(peer = %self.peer, error = %e, "client connection ended with error");
        }
        drop(self.permit);
    }
}
