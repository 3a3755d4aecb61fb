//! Connections to one backend: a pool of idle HTTP/1.1 keep-alive connections (at most the
//! backend's `max_conn` open, idle ones closed after `server.upstream_idle_timeout`): hyper's,
//! and plain TCP ones the proxy's own HTTP/1 engine speaks on; one shared HTTP/2 connection
//! (gRPC multiplexes on it), and raw connections for upgrades; over TLS for `https` backends.

use std::{
    cell::Cell,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering::Relaxed},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use super::RequestBody;
use crate::{
    backend::now_ms,
    tls::{Alpn, UpstreamTls},
};

/// Idle HTTP/1.1 connections kept per backend and worker.
const MAX_IDLE: usize = 256;

/// Idle connections are kept per worker thread, so a request reuses a connection whose task
/// runs on its own event loop (no cross-thread wakeups) and pools are not contended.
const SHARDS: usize = 16;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as worker `i` (the proxy's event-loop threads call this once).
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i % SHARDS));
}

fn shard() -> usize {
    WORKER.with(Cell::get)
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connect to {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("handshake with {addr}: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
    #[error("TLS handshake with {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    /// The backend already has `limit` (its `max_conn`) HTTP/1.1 connections open, none idle.
    /// Not a sign of ill health: the backend is not penalised for it.
    #[error("{addr} already has {limit} connections open (max_conn), none idle")]
    Saturated { addr: SocketAddr, limit: u32 },
}

/// An idle HTTP/1.1 connection and when it was put back (`now_ms`).
struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since_ms: u64,
}

/// A plain HTTP/1.1 connection the proxy's own engine reads and writes itself (no task of its
/// own, no channel): it holds its share of `Pool::open` while it is open.
pub struct RawConn {
    pub stream: TcpStream,
    /// It came from the pool: the backend may have closed it while it was idle.
    pub reused: bool,
    _slot: OpenSlot,
}

/// An idle raw connection and when it was put back (`now_ms`).
struct RawIdle {
    conn: RawConn,
    since_ms: u64,
}

impl RawConn {
    /// Whether the idle connection can carry a request: nothing arrived on it since its last
    /// response (neither bytes nor the backend's FIN). Costs a system call when the socket
    /// was reported readable, as it is after most responses.
    fn is_clean(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

pub struct Pool {
    addr: SocketAddr,
    /// Set for `https` backends: every connection runs TLS first.
    tls: Option<UpstreamTls>,
    idle: [Mutex<Vec<Idle>>; SHARDS],
    /// Idle connections of the proxy's own HTTP/1 engine, per worker like `idle`.
    raw_idle: [Mutex<Vec<RawIdle>>; SHARDS],
    /// HTTP/1.1 connections open to the backend, in use or idle, across all workers; a new one
    /// is made only below the backend's `max_conn`. Without this bound, idle connections of one
    /// worker were invisible to the others, so connections grew past `max_conn`.
    open: Arc<AtomicU32>,
    /// The shared HTTP/2 connection and when it was last handed out (`now_ms`).
    h2: Mutex<Option<(http2::SendRequest<RequestBody>, u64)>>,
    /// Held while the HTTP/2 connection is being made, so concurrent first requests wait for
    /// that one connection instead of each making their own (hundreds, from one burst of
    /// gRPC streams).
    h2_connecting: tokio::sync::Mutex<()>,
}

/// One open HTTP/1.1 connection's share of `Pool::open`, given back when the connection ends.
struct OpenSlot(Arc<AtomicU32>);

impl OpenSlot {
    /// A slot if fewer than `limit` connections are open.
    fn reserve(open: &Arc<AtomicU32>, limit: u32) -> Option<OpenSlot> {
        open.fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1)).ok()?;
        Some(OpenSlot(open.clone()))
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// An HTTP/1.1 connection and whether it came from the pool (a pooled one may turn out to
/// have been closed by the backend; the request is then resent on a fresh one).
pub struct H1Conn {
    pub sender: http1::SendRequest<RequestBody>,
    pub reused: bool,
}

impl Pool {
    pub fn new(addr: SocketAddr, tls: Option<UpstreamTls>) -> Pool {
        Pool {
            addr,
            tls,
            idle: std::array::from_fn(|_| Mutex::new(Vec::new())),
            raw_idle: std::array::from_fn(|_| Mutex::new(Vec::new())),
            open: Arc::new(AtomicU32::new(0)),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// HTTP/1.1 connections open to the backend (in use or idle).
    pub fn open_connections(&self) -> u32 {
        self.open.load(Relaxed)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An idle pooled connection of this worker, or a new one while fewer than `limit` are open,
    /// or else an idle connection of another worker.
    pub async fn h1(&self, connect_timeout: Duration, limit: u32) -> Result<H1Conn, ConnectError> {
        if let Some(sender) = self.take_idle(shard()).await {
            return Ok(H1Conn { sender, reused: true });
        }
        if let Some(slot) = OpenSlot::reserve(&self.open, limit) {
            // Boxed: the connect and handshake futures are large, and inline they would make every
            // request's future (moved when spawned) bigger, pooled connection or not.
            let sender = Box::pin(self.connect_h1_in(connect_timeout, slot)).await?;
            return Ok(H1Conn { sender, reused: false });
        }
        for i in (0..SHARDS).filter(|&i| i != shard()) {
            if let Some(sender) = self.take_idle(i).await {
                return Ok(H1Conn { sender, reused: true });
            }
        }
        Err(ConnectError::Saturated { addr: self.addr, limit })
    }

    /// For the proxy's own engine: an idle plain connection of this worker, or a new one while
    /// fewer than `limit` are open, or else an idle one of another worker. Only for backends
    /// without TLS (`is_plain`). An idle connection is checked first (`RawConn::is_clean`): a
    /// backend that closed it, or sent bytes after its last response, must not have them taken
    /// for the next answer.
    pub async fn raw(&self, connect_timeout: Duration, limit: u32) -> Result<RawConn, ConnectError> {
        if let Some(conn) = self.take_raw(shard()) {
            return Ok(conn);
        }
        if let Some(slot) = OpenSlot::reserve(&self.open, limit) {
            let stream = self.connect_tcp(connect_timeout).await?;
            return Ok(RawConn { stream, reused: false, _slot: slot });
        }
        for i in (0..SHARDS).filter(|&i| i != shard()) {
            if let Some(conn) = self.take_raw(i) {
                return Ok(conn);
            }
        }
        Err(ConnectError::Saturated { addr: self.addr, limit })
    }

    /// Whether connections to the backend are plain TCP (the proxy's own engine speaks on them).
    pub fn is_plain(&self) -> bool {
        self.tls.is_none()
    }

    /// A clean idle raw connection of worker `i`; others found on the way are dropped.
    fn take_raw(&self, i: usize) -> Option<RawConn> {
        let mut idle = self.raw_idle[i].lock().expect("pool lock");
        while let Some(RawIdle { mut conn, .. }) = idle.pop() {
            if conn.is_clean() {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Returns a raw connection whose last response ended exactly where the next may begin.
    pub fn put_raw(&self, conn: RawConn) {
        let mut idle = self.raw_idle[shard()].lock().expect("pool lock");
        if idle.len() < MAX_IDLE {
            idle.push(RawIdle { conn, since_ms: now_ms() });
        }
    }

    /// A live idle connection of worker `i`; dead ones found on the way are dropped.
    async fn take_idle(&self, i: usize) -> Option<http1::SendRequest<RequestBody>> {
        loop {
            let Idle { mut sender, .. } = self.idle[i].lock().expect("pool lock").pop()?;
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Drops every idle connection (their tasks then close the sockets).
    pub fn clear(&self) {
        for shard in &self.idle {
            shard.lock().expect("pool lock").clear();
        }
        for shard in &self.raw_idle {
            shard.lock().expect("pool lock").clear();
        }
        *self.h2.lock().expect("pool lock") = None;
    }

    /// Drops connections idle for `timeout` or longer, and the HTTP/2 connection when nothing
    /// was sent on it for that long (requests still on it keep it open until they end); the
    /// connections' tasks then close the sockets. Returns how many HTTP/1.1 connections went.
    pub fn expire(&self, timeout: Duration) -> usize {
        let cutoff = now_ms().saturating_sub(timeout.as_millis() as u64);
        let mut dropped = 0;
        for shard in &self.idle {
            let mut idle = shard.lock().expect("pool lock");
            let before = idle.len();
            idle.retain(|c| c.since_ms > cutoff && !c.sender.is_closed());
            dropped += before - idle.len();
        }
        for shard in &self.raw_idle {
            let mut idle = shard.lock().expect("pool lock");
            let before = idle.len();
            idle.retain(|c| c.since_ms > cutoff && c.conn.is_clean());
            dropped += before - idle.len();
        }
        let mut h2 = self.h2.lock().expect("pool lock");
        if h2.as_ref().is_some_and(|(s, used)| *used <= cutoff || s.is_closed()) {
            *h2 = None;
        }
        dropped
    }

    /// Returns a connection whose last response ended cleanly.
    pub fn put_h1(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle[shard()].lock().expect("pool lock");
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since_ms: now_ms() });
        }
    }

    /// A new HTTP/1.1 connection holding `slot` for as long as it is open.
    async fn connect_h1_in(
        &self,
        connect_timeout: Duration,
        slot: OpenSlot,
    ) -> Result<http1::SendRequest<RequestBody>, ConnectError> {
        // Plain sockets stay their own type: the common case pays for no stream dispatch.
        match self.connect_io(connect_timeout, Alpn::Http1).await? {
            UpstreamIo::Tcp(s) => self.handshake_h1(s, slot).await,
            UpstreamIo::Tls(s) => self.handshake_h1(s, slot).await,
        }
    }

    async fn handshake_h1<I>(&self, io: I, slot: OpenSlot) -> Result<http1::SendRequest<RequestBody>, ConnectError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream http/1 connection ended");
            }
        });
        Ok(sender)
    }

    /// The backend's HTTP/2 connection (prior-knowledge h2c, or h2 by ALPN over TLS), made on
    /// first use and remade when it closed.
    pub async fn h2(&self, connect_timeout: Duration) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        match self.live_h2() {
            Some(s) => Ok(s),
            // Boxed, as the HTTP/1 connect is.
            None => Box::pin(self.connect_h2(connect_timeout)).await,
        }
    }

    /// Makes the HTTP/2 connection unless another request made it meanwhile.
    async fn connect_h2(&self, connect_timeout: Duration) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        let _connecting = self.h2_connecting.lock().await;
        // Whoever held the lock before may have made it.
        if let Some(s) = self.live_h2() {
            return Ok(s);
        }
        let sender = match self.connect_io(connect_timeout, Alpn::H2).await? {
            UpstreamIo::Tcp(s) => self.handshake_h2(s).await?,
            UpstreamIo::Tls(s) => self.handshake_h2(s).await?,
        };
        *self.h2.lock().expect("pool lock") = Some((sender.clone(), now_ms()));
        Ok(sender)
    }

    /// The HTTP/2 connection if it is open, stamped as used now.
    fn live_h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        let mut h2 = self.h2.lock().expect("pool lock");
        let (s, used) = h2.as_mut().filter(|(s, _)| !s.is_closed())?;
        *used = now_ms();
        Some(s.clone())
    }

    async fn handshake_h2<I>(&self, io: I) -> Result<http2::SendRequest<RequestBody>, ConnectError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream http/2 connection ended");
            }
        });
        Ok(sender)
    }

    /// A new connection as HTTP is spoken on it: plain TCP, or TLS offering `alpn` for an
    /// `https` backend (the handshake gets its own `timeout`).
    pub async fn connect_io(&self, timeout: Duration, alpn: Alpn) -> Result<UpstreamIo, ConnectError> {
        let tcp = self.connect_tcp(timeout).await?;
        let Some(tls) = &self.tls else { return Ok(UpstreamIo::Tcp(tcp)) };
        let addr = self.addr;
        let stream = tokio::time::timeout(timeout, tls.connect(tcp, alpn))
            .await
            .map_err(|_| ConnectError::Timeout { addr, timeout })?
            .map_err(|source| ConnectError::Tls { addr, source })?;
        Ok(UpstreamIo::Tls(Box::new(stream)))
    }

    pub async fn connect_tcp(&self, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let addr = self.addr;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout { addr, timeout })?
            .map_err(|source| ConnectError::Io { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// A backend connection: plain, or TLS for an `https` backend.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
