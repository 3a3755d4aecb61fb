//! Taking a spliced flow off the kernel path when a receiver falls behind, losing nothing, and
//! copying it on in userspace, where TCP's window throttles each sender.
//!
//! Why (measured, KERNEL-NOTES item 6 and issue 12): bytes the verdict passes while a flow is over
//! its budget go to the socket's psock queue, outside TCP's receive accounting, so the window stays
//! open: a client that wrote and never read had 300 MiB acknowledged in 0.14 s. Only a socket whose
//! verdict no longer runs keeps its bytes in TCP's own receive queue, where the window closes.
//!
//! A socket that merely leaves the SOCKHASH loses what its psock queued: bytes passed to it and not
//! yet read, bytes redirected to it and not yet in its send queue. Found here, and used: a socket
//! also in a second SOCKHASH without programs (`SPLICE_HOLD`) keeps its psock when it leaves the
//! first, and leaving a map with a verdict stops that verdict for it; redirects still reach it and
//! its send worker carries on. Passed bytes must be read while the verdict is attached (read
//! after, TCP's read sequence is not advanced). So, per direction, in order:
//! 1. catch up: every passed byte is read and written on (with room made in the destination's
//!    send queue), and the verdict may redirect an allowance more, so it passes nothing new;
//! 2. the source socket moves to the hold map (a half-closed one cannot: it leaves the splice map
//!    directly once everything redirected to it was sent and everything passed by it was read);
//! 3. after a verdict still running on another CPU has finished, the counts are checked: a byte
//!    passed after the catch-up resets the flow rather than going missing;
//! 4. every redirected byte enters its destination's send queue, the sockets leave the hold map
//!    with their queues empty, are registered with tokio anew, and the flow is copied.

use std::{io, os::fd::AsFd, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use speedmimi_common::splice::Control;
use tokio::{io::AsyncReadExt, net::TcpStream, sync::watch};

use super::{
    copy::half,
    idle::{Clock, Stamped},
    splice::{Direction, End, Sockets, Spliced, grow_sndbuf, reset, set_sndbuf, settle, wait_flushed, write_now},
};
use crate::datapath::{Datapath, SplicedPair};

/// What the verdict may redirect between a direction's catch-up and its stop: enough for the
/// largest burst TCP hands it at once (a filled hole releases its out-of-order queue, up to the
/// receive buffer: `tcp_rmem`'s maximum is 32 MiB here), so that it passes nothing meanwhile.
fn allowance(budget: u64) -> u64 {
    budget.max(32 << 20)
}

/// Rounds of reading passed bytes before the verdict is seen caught up (each read takes all
/// that waits; a second round is rare).
const CATCH_UP_TRIES: u32 = 100;

/// Long enough for a verdict that was running on another CPU when the sockets left the map to
/// finish (it runs in softirq, over the skbs queued at that moment).
const SETTLE: Duration = Duration::from_millis(2);

/// Receive buffer of a flow's sockets once it is copied (the kernel doubles it): what a sender
/// can have accepted and not yet read on each socket.
const COPY_RCVBUF: usize = 2 << 20;

/// Bytes read from one side of a flow and not yet written to the other (what `pump` could not
/// write when a receiver fell behind); leaving the kernel path writes them first.
pub struct Held {
    /// For the upstream (read from the client).
    pub up: Bytes,
    /// For the client (read from the upstream).
    pub down: Bytes,
}

impl Spliced {
    /// Takes the flow off the kernel path and copies it to its end; returns how it ended.
    pub(super) async fn detach_and_copy(&mut self, held: Held) -> End {
        let (client, upstream) = match self.detach(held).await {
            Ok(x) => x,
            Err(end) => return end,
        };
        tracing::debug!("splice: a receiver fell behind; the flow is copied from here on");
        self.spliced = None;
        let open = (!self.up.done, !self.down.done);
        copy_on(client, upstream, open, self.policy.one_way, self.closer.clone(), self.policy.idle).await
    }

    /// Takes the flow off the kernel path; every byte read so far has been written on.
    async fn detach(&mut self, mut held: Held) -> Result<(TcpStream, TcpStream), End> {
        let Sockets::Tokio(client, upstream) = &self.sockets else { return Err(End::Reset) };
        let dp = &*self.dp;
        let pair = SplicedPair { a: self.up.src, b: self.down.src };
        let budget = self.policy.budget;
        let drained = async {
            stop_verdict(dp, client, upstream, &mut self.up, &mut self.down, &mut held, budget).await?;
            wait_flushed(dp, upstream, &self.up).await?;
            wait_flushed(dp, client, &self.down).await
        }
        .await;
        let _ = dp.unsplice(pair);
        if let Err(end) = drained {
            tracing::warn!(?end, "splice: a flow could not leave the kernel path whole; it ends");
            return Err(end);
        }
        let Sockets::Tokio(client, upstream) = std::mem::replace(&mut self.sockets, Sockets::Lost) else {
            unreachable!("matched above")
        };
        // The room made for the catch-up is not kept, nor the receive buffers TCP grew while the
        // kernel read at full speed (up to `tcp_rmem`'s maximum): copying fills queues to their
        // limits, and the sender is throttled by these.
        for s in [&client, &upstream] {
            set_sndbuf(s, budget);
            let _ = socket2::SockRef::from(s).set_recv_buffer_size(COPY_RCVBUF);
        }
        // Registered anew: tokio's readiness of these sockets went stale while the kernel owned
        // them (measured: a wake-up lost, the copy waited forever on a socket with room and
        // 1.6 MB to read); a fresh registration reports what is ready now.
        match (reregister(client), reregister(upstream)) {
            (Ok(c), Ok(u)) => Ok((c, u)),
            (c, u) => {
                tracing::warn!("splice: a socket could not return to tokio after leaving the kernel path");
                c.iter().chain(u.iter()).for_each(reset);
                Err(End::Reset)
            }
        }
    }
}

/// Stops the verdict for the flow's sockets with nothing left in their psock queues that TCP has
/// not accounted for. Passed bytes must be read while the verdict is attached: read after, they
/// would not advance TCP's read sequence (measured: the kernel's "TCP recvmsg seq # bug" warning
/// and an early EOF). So each direction is first caught up (every passed byte, and the `held` ones
/// before them, written on, with room made in the destination's send queue) and allowed an
/// `allowance` of redirects, which leave no bytes behind: the verdict, seeing nothing passed
/// unconsumed, redirects what arrives until it is stopped. A socket the kernel cannot hold (half-closed) keeps its verdict
/// until the end; bytes it passes meanwhile are read here too.
async fn stop_verdict(
    dp: &dyn Datapath,
    client: &TcpStream,
    upstream: &TcpStream,
    up: &mut Direction,
    down: &mut Direction,
    held: &mut Held,
    budget: u64,
) -> Result<(), End> {
    let mut kept = [false; 2];
    for (i, (src, dst, dir, h)) in
        [(client, upstream, &mut *up, &mut held.up), (upstream, client, &mut *down, &mut held.down)]
            .into_iter()
            .enumerate()
    {
        catch_up(dp, src, dst, dir, h, budget).await?;
        kept[i] = dp.hold(src.as_fd(), dir.src).map_err(|e| {
            tracing::error!(error = %e, "splice: cannot stop the verdict of a flow");
            End::Reset
        })?;
    }
    // A socket the kernel would not hold (half-closed) leaves the map once everything was read
    // from it and everything redirected to it was sent on (leaving discards both queues).
    if !kept[0] {
        wait_flushed(dp, client, down).await?;
        catch_up(dp, client, upstream, up, &mut held.up, budget).await?;
        dp.release(up.src);
    }
    if !kept[1] {
        wait_flushed(dp, upstream, up).await?;
        catch_up(dp, upstream, client, down, &mut held.down, budget).await?;
        dp.release(down.src);
    }
    tokio::time::sleep(SETTLE).await;
    for dir in [&*up, &*down] {
        let Some(peer) = dp.peer(dir.src) else { return Err(End::Reset) };
        if peer.passed_bytes != dir.consumed {
            // Passed after the verdict was caught up: more than the allowance arrived between the
            // catch-up and the stop, or a redirect found no target. They cannot be read exactly.
            tracing::error!(
                late = peer.passed_bytes - dir.consumed,
                "splice: the verdict passed bytes while the flow left the kernel path; resetting it"
            );
            return Err(End::Reset);
        }
    }
    Ok(())
}

/// Writes `held` and every byte the kernel passed to src on to dst, making room in dst's send queue
/// for them and for an `allowance` of redirects; then lets the verdict redirect that allowance.
/// `held` is empty afterwards.
async fn catch_up(
    dp: &dyn Datapath,
    src: &TcpStream,
    dst: &TcpStream,
    dir: &mut Direction,
    held: &mut Bytes,
    budget: u64,
) -> Result<(), End> {
    for _ in 0..CATCH_UP_TRIES {
        let rest = take_passed(dp, src, dir, std::mem::take(held)).await?;
        let Some(peer) = dp.peer(dir.src) else { return Err(End::Reset) };
        if !rest.is_empty() {
            // Redirected bytes first, as when copying.
            if peer.redirected_bytes != dir.flushed_redirected {
                wait_flushed(dp, dst, dir).await?;
                dir.flushed_redirected = peer.redirected_bytes;
            }
            grow_sndbuf(dst, rest.len() as u64 + allowance(budget));
            let written = write_now(dst, &rest).map_err(|_| End::Reset)?;
            dir.consumed += written as u64;
            if written < rest.len() {
                tracing::warn!(written, rest = rest.len(), "splice: no room for bytes over budget in a send queue");
                return Err(End::Stalled);
            }
        }
        let limit = peer.redirected_bytes + allowance(budget);
        let _ = dp.set_control(dir.src, Control { limit, consumed: dir.consumed });
        // Bytes passed after the counters were read and before the control took effect.
        match dp.peer(dir.src) {
            Some(p) if p.passed_bytes == dir.consumed => return Ok(()),
            Some(_) => {}
            None => return Err(End::Reset),
        }
    }
    Err(End::Reset)
}

fn reregister(s: TcpStream) -> io::Result<TcpStream> {
    TcpStream::from_std(s.into_std()?)
}

/// Reads every byte the kernel passed to src that userspace has not read yet, after `held`.
async fn take_passed(dp: &dyn Datapath, src: &TcpStream, dir: &Direction, held: Bytes) -> Result<Bytes, End> {
    let mut buf = BytesMut::from(&held[..]);
    let mut waits = 0;
    loop {
        let Some(peer) = dp.peer(dir.src) else { return Err(End::Reset) };
        let want = peer.passed_bytes.saturating_sub(dir.consumed + buf.len() as u64) as usize;
        if want == 0 {
            return Ok(buf.freeze());
        }
        buf.reserve(want);
        match src.try_read_buf(&mut (&mut buf).limit(want)) {
            Ok(n) if n > 0 => {}
            // Counted but still on their way to the socket (the kernel may queue them from a worker).
            Ok(_) => settle(&mut waits).await?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => settle(&mut waits).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(End::Reset),
        }
    }
}

/// Copies a flow that left the kernel path: each open direction until its end (FIN passed on as a shutdown); a reset, disconnect or the idle limit ends both. A
/// response stream (`one_way`) ends when the client sends anything or leaves.
async fn copy_on(
    mut client: TcpStream,
    mut upstream: TcpStream,
    (up_open, down_open): (bool, bool),
    one_way: bool,
    mut closer: watch::Receiver<u64>,
    idle: Duration,
) -> End {
    let clock = Clock::new();
    let end = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let down = half(Stamped::new(ur, &clock), cw, down_open);
        let both = async {
            if one_way {
                let mut cr = cr;
                let mut probe = [0u8; 1];
                tokio::select! {
                    r = down => r.map_or(End::Reset, |_| End::Closed),
                    r = cr.read(&mut probe) => if matches!(r, Ok(0)) { End::Closed } else { End::Reset },
                }
            } else {
                let up = half(Stamped::new(cr, &clock), uw, up_open);
                tokio::try_join!(up, down).map_or(End::Reset, |_| End::Closed)
            }
        };
        tokio::select! {
            end = both => end,
            _ = closer.changed() => End::Disconnected,
            _ = clock.expired(idle) => End::Idle,
        }
    };
    if matches!(end, End::Reset | End::Disconnected) {
        reset(&client);
        reset(&upstream);
    }
    end
}
