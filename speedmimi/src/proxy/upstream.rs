//! Connections to one backend: a pool of idle HTTP/1.1 keep-alive connections, one shared
//! HTTP/2 connection (gRPC multiplexes on it), and raw connections for upgrades.

use std::{cell::Cell, io, net::SocketAddr, sync::Mutex, time::Duration};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::body::RequestBody;

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
}

pub struct Pool {
    addr: SocketAddr,
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
    pub fn new(addr: SocketAddr) -> Pool {
        Pool { addr, idle: std::array::from_fn(|_| Mutex::new(Vec::new())), h2: Mutex::new(None) }
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
        let stream = self.connect_tcp(connect_timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream http/1 connection ended");
            }
        });
        Ok(sender)
    }

    /// The backend's HTTP/2 connection (prior-knowledge h2c), made on first use and remade
    /// when it closed.
    pub async fn h2(&self, connect_timeout: Duration) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        if let Some(s) = self.h2.lock().expect("pool lock").as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let stream = self.connect_tcp(connect_timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream http/2 connection ended");
            }
        });
        *self.h2.lock().expect("pool lock") = Some(sender.clone());
        Ok(sender)
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
