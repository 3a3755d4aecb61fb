//! The listeners: accept client connections (at most `server.max_conn` at once; the rest
//! wait in the backlog) and serve each with hyper: HTTP/1.1 and prior-knowledge h2c on the
//! HTTP listener, HTTP/1.1 or h2 after a TLS handshake on the HTTPS listener, h2c only on the
//! gRPC listener. On shutdown, connections finish gracefully. A connection that has not
//! produced a request head within `read_timeout` of being accepted, or of its last request, is
//! closed whatever state it is in (sniffing, TLS handshake, h2 preface, half a head).

use std::{net::SocketAddr, os::fd::AsRawFd, sync::Arc, time::Duration};

use bytes::Bytes;

use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::TcpListener,
    sync::OwnedSemaphorePermit,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;

pub use super::service::Listener;
use super::{
    activity::{self, Activity},
    admission::{Admission, ClientSlot},
    body::Tracked,
    framing::Scanner,
    h1,
    io::{ClientIo, Hijack, Http1Watch},
    service::Handler,
};
use crate::{shutdown::Shutdown, state::State};

/// What a stop waits past `server.drain_timeout` for connections that were just closed to
/// hand back their slots.
const DRAIN_SLACK: Duration = Duration::from_secs(1);

/// How long an idle h2 connection told to go away (GOAWAY) may take to close before it is
/// dropped: a client that does not read, or never finished its preface, gets no more.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// hyper's own head timer, past ours (`io::ClientIo` closes at `read_timeout`, with a 408
/// when owed): it only ends what ours does not watch, a head pipelined behind a response.
const HYPER_HEAD_SLACK: Duration = Duration::from_secs(1);

/// Serves one listener (or one worker's clone of it) until shutdown. `admission` is shared by
/// all workers of a listener: it holds one permit per `server.max_conn`.
pub async fn serve(listener: TcpListener, state: Arc<State>, kind: Listener, admission: Admission, shutdown: Shutdown) {
    let limit = admission.slots;
    let config = state.config();
    let server = &config.file.server;
    let read_timeout = server.read_timeout.get();
    let write_timeout = server.write_timeout.get();
    let drain = server.drain_timeout.get();
    let max_head = (server.max_header_bytes as usize).max(8192);

    // Accepted connections inherit TCP_NODELAY from their listener (Linux copies the listening
    // socket): one setsockopt per listener instead of one per connection.
    let nodelay_each = match socket2::SockRef::from(&listener).set_nodelay(true) {
        Ok(()) => false,
        Err(e) => {
            tracing::warn!(error = %e, "TCP_NODELAY not set on the listener: set on every connection instead");
            true
        }
    };
    let max_conn = server.max_conn;
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(read_timeout + HYPER_HEAD_SLACK)
        .max_buf_size(max_head)
        .half_close(false);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    // PINGs find peers that vanished while streams are open; idle ones are closed by `serve`.
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .keep_alive_interval(read_timeout)
        .keep_alive_timeout(read_timeout);
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
        let (mut stream, peer) = tokio::select! {
            r = accept(&listener) => match r {
                Some(x) => x,
                None => continue,
            },
            _ = shutdown.wait() => break,
        };
        let client = match &admission.per_client {
            None => None,
            Some(table) => match table.admit(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    state.stats.refused_per_client.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(%peer, "over server.max_conn_per_client: connection closed");
                    continue;
                }
            },
        };
        let accepted = Instant::now();
        if nodelay_each {
            let _ = stream.set_nodelay(true);
        }
        let conn = Conn {
            state: state.clone(),
            builder: builder.clone(),
            peer,
            kind,
            read_timeout,
            write_timeout,
            activity: Activity::new(accepted),
            permit,
            _client: client,
            shutdown: shutdown.clone(),
            drain,
            max_head,
        };
        let Some(tls) = &tls else {
            // A connection's future: about 3 KiB (measured with size_of_val), moved once when spawned.
            let fut = async move {
                let (http1, sniffed) = match kind {
                    Listener::Grpc => (false, Bytes::new()),
                    _ => match sniff_http1(&mut stream, accepted + read_timeout).await {
                        Some(x) => x,
                        None => return,
                    },
                };
                let hijack = (kind == Listener::Http && http1).then(|| Hijack::new(stream.as_raw_fd()));
                conn.serve(stream, sniffed, http1, hijack).await;
            };
            tokio::spawn(fut);
            continue;
        };
        let handshake = tls.accept(stream);
        tokio::spawn(async move {
            let stream = match tokio::time::timeout_at(accepted + read_timeout, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, timeout = ?read_timeout, "TLS handshake timed out"),
            };
            let http1 = stream.get_ref().1.alpn_protocol() != Some(b"h2");
            conn.serve(stream, Bytes::new(), http1, None).await;
        });
    }
    drop(listener);
    // Every open connection holds a permit: having them all back means all have finished.
    if tokio::time::timeout(drain + DRAIN_SLACK, limit.acquire_many(max_conn)).await.is_err() {
        tracing::warn!(listener = ?kind, "connections still open {:?} after the drain time", DRAIN_SLACK);
    }
}

/// The next connection, or None after a failed accept (EMFILE and friends) and a short back-off
/// instead of a spin.
pub(crate) async fn accept(listener: &TcpListener) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!(listener = ?listener.local_addr().ok(), error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// HTTP/1.1 and HTTP/2 server settings, shared by a listener's connections.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// Prior-knowledge h2c starts with `PRI * HTTP/2.0`; anything else is HTTP/1. Returns which,
/// and the bytes read to tell, which `ClientIo` replays to hyper or the own HTTP/1 engine. A
/// read takes what has arrived, up to 2 KiB: a request head that came whole needs no second
/// read. They are read, not peeked: a peek of bytes already there is always ready and never
/// sees the FIN, so a peer that sent `PRI` and left would be polled forever. None: the client
/// left, or had not told us by `deadline`.
pub(crate) async fn sniff_http1<S: AsyncRead + Unpin>(stream: &mut S, deadline: Instant) -> Option<(bool, Bytes)> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let mut buf = bytes::BytesMut::with_capacity(2048);
    loop {
        let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        let k = buf.len().min(PREFACE.len());
        if buf[..k] != PREFACE[..k] {
            return Some((true, buf.freeze()));
        }
        if buf.len() >= PREFACE.len() {
            return Some((false, buf.freeze()));
        }
    }
}

/// An accepted client connection, ready to be served once its transport (plain or TLS) is up.
struct Conn {
    state: Arc<State>,
    builder: Arc<Builders>,
    peer: SocketAddr,
    kind: Listener,
    read_timeout: Duration,
    write_timeout: Duration,
    /// Open requests and since when there were none: the head and idle deadlines.
    activity: Arc<Activity>,
    /// One of `server.max_conn`, held until the connection ends.
    permit: OwnedSemaphorePermit,
    /// One of the client's `server.max_conn_per_client`, when that is set.
    _client: Option<ClientSlot>,
    shutdown: Shutdown,
    /// After a stop, how long the connection may finish its requests.
    drain: Duration,
    /// `server.max_header_bytes` (at least 8 KiB).
    max_head: usize,
}

impl Conn {
    /// Serves HTTP on `io` (after the `sniffed` bytes) until the client leaves, goes idle, or a
    /// graceful stop ends it; `http1` feeds the bytes read through the framing scanner.
    async fn serve<I>(self, io: I, sniffed: Bytes, http1: bool, hijack: Option<Hijack>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _open = self.state.stats.connection();
        let (watch, ambiguous) = match http1 {
            true => {
                let (s, flag) = Scanner::new();
                (Some(Http1Watch::new(s, self.activity.clone(), self.read_timeout)), Some(flag))
            }
            false => (None, None),
        };
        let activity = self.activity.clone();
        let fast = http1 && self.state.config().file.server.http1_fast_path;
        let handler =
            Handler::new(self.state.clone(), self.peer, self.kind, ambiguous, hijack.clone(), activity.clone());
        let mut io = ClientIo::new(io, self.write_timeout, sniffed, watch, hijack);
        if fast {
            // The proxy's own engine serves plain exchanges; hyper takes the connection over
            // at the first request that is not one.
            match h1::serve(io, &handler, self.max_head, &self.shutdown, self.drain).await {
                h1::Served::Closed => return,
                h1::Served::Hyper(rest) => io = rest,
            }
        }
        // Boxed: most connections never get here, and their futures stay small: a connection's
        // future is moved when it is spawned, and with hyper's state inline it was 5.6 KiB
        // instead of 3 KiB (size_of_val).
        Box::pin(self.serve_hyper(io, handler, http1, activity)).await;
    }

    /// hyper serves the connection from here on.
    async fn serve_hyper<I>(self, io: ClientIo<I>, handler: Handler, http1: bool, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = service_fn(move |req| {
            // Open from the head to the end of the response body.
            let open = activity.open();
            // Boxed: hyper's h2 server spawns a task per stream and moves the stream's future
            // several times on the way; inline, each move copied its 6 KiB (memmove was 15% of
            // the proxy's CPU with h2c clients, measured with perf).
            let handled = Box::pin(handler.clone().handle(req));
            async move { handled.await.map(|resp| resp.map(|body| Tracked::new(body, open))) }
        });
        let io = TokioIo::new(io);
        let result = if http1 {
            // HTTP/1 heads are watched in `ClientIo`, which can still answer 408.
            let conn = self.builder.h1.serve_connection(io, service).with_upgrades();
            drive(conn, &self.shutdown, self.drain, std::future::pending()).await
        } else {
            let idle = activity::idle(&self.activity, self.read_timeout);
            drive(self.builder.h2.serve_connection(io, service), &self.shutdown, self.drain, idle).await
        };
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, error = %e, "client connection ended with error");
        }
        drop(self.permit);
    }
}

/// A hyper server connection that can be asked to finish its requests and close.
pub(crate) trait Graceful: Future<Output = hyper::Result<()>> {
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

/// Serves a connection to its end; on shutdown, lets it finish the requests in progress for at
/// most `drain`; when
/// `idle` resolves (no stream open for the idle time), tells it to go away and gives it
/// `GOAWAY_GRACE` to do so.
pub(crate) async fn drive<C: Graceful>(
    conn: C,
    shutdown: &Shutdown,
    drain: Duration,
    idle: impl Future<Output = ()>,
) -> hyper::Result<()> {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        // Past the drain time the connection is dropped, which closes it.
        _ = shutdown.wait() => {
            conn.as_mut().graceful();
            tokio::time::timeout(drain, conn).await.unwrap_or(Ok(()))
        }
        _ = idle => {
            conn.as_mut().graceful();
            tokio::time::timeout(GOAWAY_GRACE, conn).await.unwrap_or(Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    /// `serve` sets TCP_NODELAY on its listener only, and counts on accepted connections
    /// inheriting it (Linux copies the listening socket): a kernel that did not would bring
    /// back Nagle's delays on every response written in two parts.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let listener = tokio::net::TcpListener::bind(host).await.unwrap();
            socket2::SockRef::from(&listener).set_nodelay(true).unwrap();
            let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            assert!(accepted.nodelay().unwrap(), "{host}: accepted without TCP_NODELAY");
        }
    }
}
