//! A client connection as the proxy reads and writes it: a write that makes no progress for
//! `write_timeout` fails (a client that stops reading cannot hold a connection forever); the
//! bytes read while sniffing the protocol are replayed first; and on HTTP/1 the bytes read pass
//! through the framing scanner, and a connection that has not produced a request head within
//! `read_timeout` is closed, with a 408 when it sent part of one.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

use super::{activity::Activity, framing::Scanner};

/// What a client that sent part of a head and then stalled is told before the close (as
/// HAProxy does; hyper's own header timeout closes without a word).
const TIMEOUT_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

pub struct ClientIo<T> {
    inner: T,
    /// Set when the proxy took the connection over through a duplicate of its socket (a
    /// spliced SSE response): hyper's further writes go nowhere and its reads wait forever.
    hijacked: Option<Hijack>,
    timeout: Duration,
    /// Armed while a write is stalled.
    stall: Option<Pin<Box<Sleep>>>,
    /// Read from the socket while sniffing the protocol, not yet handed to hyper.
    prefix: Bytes,
    /// `prefix` went through the framing scanner already (bytes the proxy's own HTTP/1
    /// engine read and handed back), so replaying it must not feed the scanner again.
    prefix_scanned: bool,
    http1: Option<Box<Http1Watch>>,
    /// Bytes were written and not yet flushed: a response may be half out.
    unflushed: bool,
}

/// What watches an HTTP/1 connection's reads.
pub struct Http1Watch {
    pub scanner: Scanner,
    pub activity: Arc<Activity>,
    pub read_timeout: Duration,
    /// Fires when the next request head is due.
    timer: Option<Pin<Box<Sleep>>>,
    /// The head deadline passed: bytes of the 408 written so far, then end of stream.
    expired: Option<usize>,
}

impl Http1Watch {
    pub fn new(scanner: Scanner, activity: Arc<Activity>, read_timeout: Duration) -> Self {
        Http1Watch { scanner, activity, read_timeout, timer: None, expired: None }
    }

    /// Whether the next request head is overdue (registers for a wake-up when it is not).
    fn overdue(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(due) = self.activity.deadline(self.read_timeout) else {
            self.timer = None;
            return false;
        };
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        // The deadline moves on with every request: a timer set for an earlier one is left to
        // fire and then set again, rather than moved in the timer wheel at every request.
        if timer.deadline() > due {
            timer.as_mut().reset(due);
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if timer.deadline() >= due {
                return true;
            }
            timer.as_mut().reset(due);
        }
    }
}

impl<T> ClientIo<T> {
    pub fn new(
        inner: T,
        timeout: Duration,
        prefix: Bytes,
        http1: Option<Http1Watch>,
        hijacked: Option<Hijack>,
    ) -> Self {
        ClientIo {
            inner,
            hijacked,
            timeout,
            stall: None,
            prefix,
            prefix_scanned: false,
            http1: http1.map(Box::new),
            unflushed: false,
        }
    }

    /// Puts back bytes read through this connection (and scanned) but not consumed, to be
    /// read again first. Only when nothing else is waiting to be replayed.
    pub fn unread(&mut self, bytes: Bytes) {
        debug_assert!(self.prefix.is_empty(), "unread over unreplayed bytes");
        self.prefix = bytes;
        self.prefix_scanned = true;
    }

    fn is_hijacked(&self) -> bool {
        self.hijacked.as_ref().is_some_and(Hijack::is_taken)
    }

    /// The connection itself and any sniffed bytes hyper has not read, when the proxy takes
    /// it over (a spliced upgrade).
    pub fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.prefix)
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

impl<T: AsyncWrite + Unpin> ClientIo<T> {
    /// The request head is overdue: writes the 408 (when one is owed) and then reads as the end
    /// of the stream, which makes hyper close the connection.
    fn poll_expired(&mut self, cx: &mut Context<'_>, mut sent: usize) -> Poll<io::Result<()>> {
        while sent < TIMEOUT_408.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &TIMEOUT_408[sent..]) {
                Poll::Ready(Ok(n)) if n > 0 => sent += n,
                Poll::Ready(_) => break,
                Poll::Pending => {
                    if let Some(w) = self.http1.as_mut() {
                        w.expired = Some(sent);
                    }
                    return self.check(cx, Poll::Pending);
                }
            }
        }
        if let Some(w) = self.http1.as_mut() {
            w.expired = Some(TIMEOUT_408.len());
        }
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.is_hijacked() {
            // The socket's bytes belong to the splice now; hyper's idle timer ends this side.
            return Poll::Pending;
        }
        if let Some(sent) = this.http1.as_ref().and_then(|w| w.expired) {
            return this.poll_expired(cx, sent);
        }
        let before = buf.filled().len();
        let r = if this.prefix.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix_scanned {
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(()))
        };
        let Some(watch) = this.http1.as_mut() else { return r };
        match &r {
            // After a switch (101) the bytes are the new protocol's, not HTTP heads.
            Poll::Ready(Ok(())) if !watch.activity.switched() => watch.scanner.feed(&buf.filled()[before..]),
            Poll::Pending if watch.overdue(cx) => {
                // A 408 only where it cannot land inside a response: nothing open, all flushed.
                if watch.scanner.mid_head() && !this.unflushed {
                    tracing::debug!("request head not received within read_timeout: 408");
                    return this.poll_expired(cx, 0);
                }
                watch.expired = Some(TIMEOUT_408.len());
                return Poll::Ready(Ok(()));
            }
            _ => {}
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
        if let Poll::Ready(Ok(n)) = r {
            self.unflushed |= n > 0;
        }
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
        if let Poll::Ready(Ok(n)) = r {
            self.unflushed |= n > 0;
        }
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
        if let Poll::Ready(Ok(())) = r {
            self.unflushed = false;
        }
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

    /// Whether the handler took the connection over.
    pub fn is_taken(&self) -> bool {
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
