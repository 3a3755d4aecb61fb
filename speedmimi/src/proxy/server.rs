//! The listeners: accept client connections (at most `server.max_conn` at once; the rest
//! wait in the backlog) and serve each with hyper: HTTP/1.1 and prior-knowledge h2c on the
//! HTTP listener, HTTP/1.1 or h2 after a TLS handshake on the HTTPS listener, h2c only on the
//! gRPC listener. On shutdown, connections finish gracefully.

use std::{net::SocketAddr, os::fd::AsRawFd, sync::Arc, time::Duration};

use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::TlsAcceptor;

pub use super::service::Listener;
use super::{
    framing::Scanner,
    io::{ClientIo, Hijack},
    service::Handler,
};
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

    let max_conn = server.max_conn;
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new()).header_read_timeout(read_timeout).max_buf_size(max_head).half_close(false);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new()).max_concurrent_streams(1024);
    let builder = Arc::new(Builders { h1, h2 });
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
        let conn = Conn {
            state: state.clone(),
            builder: builder.clone(),
            peer,
            kind,
            write_timeout,
            permit,
            shutdown: shutdown.clone(),
        };
        let Some(tls) = &tls else {
            tokio::spawn(async move {
                let http1 = match kind {
                    Listener::Grpc => false,
                    _ => match sniff_http1(&stream, read_timeout).await {
                        Some(h1) => h1,
                        None => return,
                    },
                };
                let hijack = (kind == Listener::Http && http1).then(|| Hijack::new(stream.as_raw_fd()));
                conn.serve(stream, http1, hijack).await;
            });
            continue;
        };
        let handshake = tls.accept(stream);
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(read_timeout, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, timeout = ?read_timeout, "TLS handshake timed out"),
            };
            let http1 = stream.get_ref().1.alpn_protocol() != Some(b"h2");
            conn.serve(stream, http1, None).await;
        });
    }
    drop(listener);
    // Every open connection holds a permit: having them all back means all have finished.
    if tokio::time::timeout(DRAIN, limit.acquire_many(max_conn)).await.is_err() {
        tracing::warn!(listener = ?kind, "connections still open after {DRAIN:?}; closing them");
    }
}

/// HTTP/1.1 and HTTP/2 server settings, shared by a listener's connections.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// Prior-knowledge h2c starts with `PRI * HTTP/2.0`; anything else is HTTP/1. Peeking leaves the
/// bytes in the socket, so hyper reads the connection from its first byte and an upgraded
/// connection is still a plain `TcpStream` underneath (which splicing needs). None: the client
/// left or sent nothing within `read_timeout`.
async fn sniff_http1(stream: &TcpStream, read_timeout: Duration) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let mut buf = [0u8; 14];
    let deadline = tokio::time::Instant::now() + read_timeout;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != PREFACE[..n] {
            return Some(true);
        }
        if n == PREFACE.len() {
            return Some(false);
        }
        // A prefix of the preface so far: wait for more bytes.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// An accepted client connection, ready to be served once its transport (plain or TLS) is up.
struct Conn {
    state: Arc<State>,
    builder: Arc<Builders>,
    peer: SocketAddr,
    kind: Listener,
    write_timeout: Duration,
    /// One of `server.max_conn`, held until the connection ends.
    permit: OwnedSemaphorePermit,
    shutdown: Shutdown,
}

impl Conn {
    /// Serves HTTP on `io` until the client leaves or a graceful stop ends it; `http1` feeds
    /// the bytes read through the framing scanner.
    async fn serve<I>(self, io: I, http1: bool, hijack: Option<Hijack>)
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
        let handler = Handler::new(self.state, self.peer, self.kind, ambiguous, hijack.clone());
        let service = service_fn(move |req| handler.clone().handle(req));
        let io = TokioIo::new(ClientIo::new(io, self.write_timeout, scanner, hijack));
        let result = if http1 {
            drive(self.builder.h1.serve_connection(io, service).with_upgrades(), &self.shutdown).await
        } else {
            drive(self.builder.h2.serve_connection(io, service), &self.shutdown).await
        };
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, error = %e, "client connection ended with error");
        }
        drop(self.permit);
    }
}

/// A hyper server connection that can be asked to finish its requests and close.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    http1::UpgradeableConnection<I, S>: Future<Output = hyper::Result<()>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, TokioExecutor>
where
    http2::Connection<I, S, TokioExecutor>: Future<Output = hyper::Result<()>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves a connection to its end; on shutdown, lets it finish the requests in progress.
async fn drive<C: Graceful>(conn: C, shutdown: &Shutdown) -> hyper::Result<()> {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.wait() => {
            conn.as_mut().graceful();
            conn.await
        }
    }
}
