//! The idle limit of copied tunnels (upgraded flows and SSE streams copied in userspace): the
//! sockets' reads stamp a shared clock, and a watcher ends the flow once the clock is older than
//! `server.tunnel_timeout`. Spliced flows watch the kernel's counters instead (`splice`).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::backend::now_ms;

/// How often an idle limit is checked: a quarter of it, between 50 ms and 5 s, so an idle flow
/// wakes rarely and is closed at most a quarter late.
pub fn check_period(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// When a flow last received a byte on any of its sockets (`backend::now_ms`).
#[derive(Clone)]
pub struct Clock(Arc<AtomicU64>);

impl Clock {
    pub fn new() -> Clock {
        Clock(Arc::new(AtomicU64::new(now_ms())))
    }

    /// Resolves once nothing was read for `idle`; checks a few times per limit.
    pub async fn expired(&self, idle: Duration) {
        let period = check_period(idle);
        loop {
            tokio::time::sleep(period).await;
            let quiet = now_ms().saturating_sub(self.0.load(Relaxed));
            if Duration::from_millis(quiet) >= idle {
                return;
            }
        }
    }
}

/// An IO whose successful reads stamp the clock.
pub struct Stamped<T> {
    inner: T,
    clock: Clock,
}

impl<T> Stamped<T> {
    pub fn new(inner: T, clock: &Clock) -> Stamped<T> {
        Stamped { inner, clock: clock.clone() }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.0.store(now_ms(), Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
