//! Connections to one backend: a pool of idle HTTP/1.1 keep-alive connections, one shared
//! HTTP/2 connection (gRPC multiplexes on it), and raw connections for upgrades; over TLS for
//! `https` backends.

use std::{
    cell::Cell,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll},
    time::Duration,
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use super::body::RequestBody;
use crate::tls::{Alpn, UpstreamTls};

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
}

pub struct Pool {
    addr: SocketAddr,
    /// Set for `https` backends: every connection runs TLS first.
    tls: Option<UpstreamTls>,
    idle: [Mutex<Vec<http1::SendRequest<RequestBody>>>; SHARDS],
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
}

/// An HTTP/1.1 connection and whether it came from the pool (a pooled one may turn out to
/// have been closed by the backend; the request is then resent on a fresh one).
pub struct H1Conn {
    pub sender: http1::SendRequest<RequestBody>,
    pub reused: bool,
}

impl Pool {
    pub fn new(addr: SocketAddr, tls: Option<UpstreamTls>) -> Pool {
        Pool { addr, tls, idle: std::array::from_fn(|_| Mutex::new(Vec::new())), h2: Mutex::new(None) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An idle pooled connection, or a new one.
    pub async fn h1(&self, connect_timeout: Duration) -> Result<H1Conn, ConnectError> {
        loop {
            let Some(mut sender) = self.idle[shard()].lock().expect("pool lock").pop() else { break };
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Ok(H1Conn { sender, reused: true });
            }
        }
        Ok(H1Conn { sender: self.connect_h1(connect_timeout).await?, reused: false })
    }

    /// Drops every idle connection (their tasks then close the sockets).
    pub fn clear(&self) {
        for shard in &self.idle {
            shard.lock().expect("pool lock").clear();
        }
        *self.h2.lock().expect("pool lock") = None;
    }

    /// Returns a connection whose last response ended cleanly.
    pub fn put_h1(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle[shard()].lock().expect("pool lock");
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    pub async fn connect_h1(&self, connect_timeout: Duration) -> Result<http1::SendRequest<RequestBody>, ConnectError> {
        // Plain sockets stay their own type: the common case pays for no stream dispatch.
        match self.connect_io(connect_timeout, Alpn::Http1).await? {
            UpstreamIo::Tcp(s) => self.handshake_h1(s).await,
            UpstreamIo::Tls(s) => self.handshake_h1(s).await,
        }
    }

    async fn handshake_h1<I>(&self, io: I) -> Result<http1::SendRequest<RequestBody>, ConnectError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream http/1 connection ended");
            }
        });
        Ok(sender)
    }

    /// The backend's HTTP/2 connection (prior-knowledge h2c, or h2 by ALPN over TLS), made on
    /// first use and remade when it closed.
    pub async fn h2(&self, connect_timeout: Duration) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        if let Some(s) = self.h2.lock().expect("pool lock").as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let sender = match self.connect_io(connect_timeout, Alpn::H2).await? {
            UpstreamIo::Tcp(s) => self.handshake_h2(s).await?,
            UpstreamIo::Tls(s) => self.handshake_h2(s).await?,
        };
        *self.h2.lock().expect("pool lock") = Some(sender.clone());
        Ok(sender)
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
