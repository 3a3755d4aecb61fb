//! One direction of a flow copied in userspace, holding a buffer only while bytes are in
//! transit: an idle flow waits on a small probe inside its future, and the copy buffer is taken
//! when bytes arrive and given back once they are written and the reader has nothing more.
//! tokio's `copy` keeps its buffers for the flow's life: two 64 KiB buffers made every idle
//! copied WebSocket cost ~100 KiB of RSS (`cargo xtask bench scale`).

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Copy buffer while bytes flow.
pub const COPY_BUF: usize = 64 * 1024;

/// Bytes read while no buffer is held: the wake-up of an idle flow.
const PROBE: usize = 64;

/// Copies `rd` to `wr` until EOF, then shuts `wr` down (nothing when `open` is false: that
/// direction had already ended).
pub async fn half<R, W>(mut rd: R, mut wr: W, open: bool) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !open {
        return Ok(0);
    }
    let n = Lazy { rd: &mut rd, wr: &mut wr, buf: Vec::new(), pos: 0, eof: false, total: 0, probe: [0; PROBE] }.await?;
    wr.shutdown().await?;
    Ok(n)
}

struct Lazy<'a, R, W> {
    rd: &'a mut R,
    wr: &'a mut W,
    /// Bytes read and not yet written from `pos` on; no capacity while idle.
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    total: u64,
    probe: [u8; PROBE],
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Lazy<'_, R, W> {
    /// Reads into the spare room of the buffer (taking it first when absent); Pending gives an
    /// empty buffer back.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.capacity() == 0 {
            let mut probe = ReadBuf::new(&mut self.probe);
            ready!(Pin::new(&mut *self.rd).poll_read(cx, &mut probe))?;
            let n = probe.filled().len();
            if n == 0 {
                self.eof = true;
                return Poll::Ready(Ok(()));
            }
            self.buf.reserve_exact(COPY_BUF);
            self.buf.extend_from_slice(&self.probe[..n]);
            if n < PROBE {
                // The probe was not filled: that was all there was.
                return Poll::Ready(Ok(()));
            }
        }
        let len = self.buf.len();
        let mut room = ReadBuf::uninit(self.buf.spare_capacity_mut());
        match Pin::new(&mut *self.rd).poll_read(cx, &mut room) {
            Poll::Ready(Ok(())) => {
                let n = room.filled().len();
                // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity.
                unsafe { self.buf.set_len(len + n) };
                self.eof = n == 0;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if len > 0 => Poll::Ready(Ok(())),
            Poll::Pending => {
                self.buf = Vec::new();
                Poll::Pending
            }
        }
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Future for Lazy<'_, R, W> {
    type Output = io::Result<u64>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let me = self.get_mut();
        loop {
            while me.pos < me.buf.len() {
                let n = ready!(Pin::new(&mut *me.wr).poll_write(cx, &me.buf[me.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                me.pos += n;
                me.total += n as u64;
            }
            me.buf.clear();
            me.pos = 0;
            if me.eof {
                ready!(Pin::new(&mut *me.wr).poll_flush(cx))?;
                return Poll::Ready(Ok(me.total));
            }
            if me.poll_fill(cx)?.is_pending() {
                // Nothing to read: what was written must not wait in a writer's buffer meanwhile.
                ready!(Pin::new(&mut *me.wr).poll_flush(cx))?;
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Bytes of every size and pause pattern arrive whole and in order, and the writer is shut
    /// down at the end.
    #[tokio::test]
    async fn copies_everything_in_order_with_pauses() {
        for sizes in [vec![1usize], vec![PROBE], vec![PROBE + 1, 3], vec![COPY_BUF * 3 + 7, 1, PROBE - 1]] {
            let (mut src, rd) = tokio::io::duplex(4096);
            let (wr, mut dst) = tokio::io::duplex(4096);
            let copier = tokio::spawn(half(rd, wr, true));
            let mut want = Vec::new();
            let writer = {
                let sizes = sizes.clone();
                tokio::spawn(async move {
                    let mut sent = Vec::new();
                    for (i, n) in sizes.iter().enumerate() {
                        let chunk: Vec<u8> = (0..*n).map(|k| (k * 31 + i) as u8).collect();
                        src.write_all(&chunk).await.unwrap();
                        sent.extend_from_slice(&chunk);
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                    sent
                })
            };
            let mut got = Vec::new();
            dst.read_to_end(&mut got).await.unwrap();
            want.extend(writer.await.unwrap());
            assert_eq!(got.len(), want.len(), "{sizes:?}");
            assert!(got == want, "{sizes:?}: bytes differ");
            assert_eq!(copier.await.unwrap().unwrap(), want.len() as u64);
        }
    }

    /// A reader with nothing to say holds no copy buffer.
    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (mut src, mut rd) = tokio::io::duplex(4096);
        let (mut wr, mut dst) = tokio::io::duplex(4096);
        let mut lazy =
            Lazy { rd: &mut rd, wr: &mut wr, buf: Vec::new(), pos: 0, eof: false, total: 0, probe: [0; PROBE] };
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut lazy).poll(&mut cx).is_pending());
        assert_eq!(lazy.buf.capacity(), 0);
        src.write_all(&[7u8; 1000]).await.unwrap();
        assert!(Pin::new(&mut lazy).poll(&mut cx).is_pending());
        assert_eq!(lazy.buf.capacity(), 0, "the buffer was kept after its bytes were written");
        assert_eq!(lazy.total, 1000);
        let mut out = vec![0u8; 1000];
        dst.read_exact(&mut out).await.unwrap();
        assert!(out.iter().all(|b| *b == 7));
    }
}
