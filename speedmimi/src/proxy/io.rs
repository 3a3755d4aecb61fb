//! A client connection as the proxy reads and writes it: a write that makes no progress for
//! `write_timeout` fails (a client that stops reading cannot hold a connection forever), and
//! HTTP/1 bytes read pass through the framing scanner before hyper parses them.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

use super::framing::Scanner;

pub struct ClientIo<T> {
    inner: T,
    /// Set when the proxy took the connection over through a duplicate of its socket (a
    /// spliced SSE response): hyper's further writes go nowhere and its reads wait forever.
    hijacked: Option<Hijack>,
    timeout: Duration,
    /// Armed while a write is stalled.
    stall: Option<Pin<Box<Sleep>>>,
    scanner: Option<Box<Scanner>>,
}

impl<T> ClientIo<T> {
    pub fn new(inner: T, timeout: Duration, scanner: Option<Scanner>, hijacked: Option<Hijack>) -> Self {
        ClientIo { inner, hijacked, timeout, stall: None, scanner: scanner.map(Box::new) }
    }

    fn is_hijacked(&self) -> bool {
        self.hijacked.as_ref().is_some_and(Hijack::is_set)
    }

    /// The connection itself, when the proxy takes it over (a spliced upgrade).
    pub fn into_inner(self) -> T {
        self.inner
    }

    fn check<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => {
                let timeout = self.timeout;
                let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stall.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "client write timed out")));
                }
                Poll::Pending
            }
            ready => {
                self.stall = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.is_hijacked() {
            // The socket's bytes belong to the splice now; hyper's idle timer ends this side.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(scanner)) = (&r, self.scanner.as_mut()) {
            scanner.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.is_hijacked() {
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.is_hijacked() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_hijacked() {
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_hijacked() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A plain client connection the request handler may take over: its raw socket (to duplicate)
/// and the flag that silences hyper on it.
#[derive(Clone)]
pub struct Hijack {
    fd: std::os::fd::RawFd,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Hijack {
    pub fn new(fd: std::os::fd::RawFd) -> Hijack {
        Hijack { fd, flag: Default::default() }
    }

    fn is_set(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A second handle on the client's socket, for the proxy to write and splice.
    pub fn duplicate(&self) -> io::Result<tokio::net::TcpStream> {
        // SAFETY: the fd is the live client socket (hyper's connection owns it and outlives
        // the request that calls this); dup gives us our own descriptor of it.
        let fd = unsafe { libc::dup(self.fd) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let std = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        std.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(std)
    }

    /// From now on hyper neither reads nor writes this connection.
    pub fn take_over(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::Release);
    }
}
