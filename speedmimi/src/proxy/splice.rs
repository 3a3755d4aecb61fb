//! Kernel splicing of an upgraded flow: both plain TCP sockets go into the SOCKHASH and the
//! sk_skb verdict moves bytes between them; this task only keeps the flow within its byte
//! budget, copies what the kernel passed back to userspace, and ends the flow properly.
//!
//! Per direction src -> dst (KERNEL-NOTES):
//! - bytes the kernel *passed* (budget spent) wait in src's receive queue; we read them and
//!   write them to dst, but only once everything the kernel *redirected* earlier has entered
//!   dst's send queue, so order holds; then we raise src's limit to what dst's receiver has
//!   acknowledged plus the budget, which bounds kernel memory per direction by the budget;
//! - FIN on src: once the verdict has marked it (TCP reports read-closed before the verdict has
//!   run on the last segments) and every byte from src has entered dst's send queue, shut down
//!   dst's write side;
//! - RST on src: reset dst (zero linger) and end the flow;
//! - when both directions are done, or on disconnect, the sockets leave the maps and close.
//!
//! A receiver that stays behind (its socket's send queue full for a second while bytes over budget
//! wait to be copied to it, or 16 MiB passed for it) takes the flow off the kernel path (`detach`):
//! passed bytes wait outside TCP's receive accounting, so only a socket whose verdict stopped lets
//! TCP's window throttle the sender. A half-closed flow cannot leave (sockmaps hold established
//! sockets only): it is reset at the same cap instead.
//!
//! A flow within its budget causes no socket event, so most spliced flows are quiet most of the
//! time. After `PARK_AFTER` without one, a flow leaves tokio for the parking lot (`park`): its
//! task ends, and all it keeps (`Spliced`) sits inline in the lot's slab. A socket event sends
//! it back to tokio in a new task; its closer and idle limit are checked by the lot.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{Arc, OnceLock, atomic::Ordering::Relaxed},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use speedmimi_common::splice::{Control, Peer};
use tokio::{
    io::{AsyncWriteExt, Interest, Ready},
    net::TcpStream,
    sync::watch,
};

use super::body::InFlight;
use super::{
    detach::Held,
    idle::check_period,
    park::{Lot, Tenant, Wake},
};
use crate::{
    backend::Gauge,
    datapath::{Datapath, Limits, SplicedPair},
    state::Settings,
    stats::{ParkedGuard, UpgradedGuard},
};

/// How long a FIN or a copy may wait for the peer to take the bytes before the flow is reset.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Largest read of bytes the kernel passed to userspace (a buffer allocated only while copying,
/// sized to what waits). Measured with `bench splice`, 64 streams: 256 KiB cost 0.67 CPU-s/GB
/// and 64 KiB 0.74 (machine-wide, direct 0.34).
const COPY_BUF: usize = 256 * 1024;

/// How long a receiver may leave bytes over budget unwritten (its send queue full) before the flow
/// leaves the kernel path, and how many passed bytes the kernel may hold for it meanwhile (they
/// escape TCP's accounting). Loss on a leg stalls a receiver for an RTO (200 ms and more) without
/// it being behind; a client that never reads reaches the cap in milliseconds.
const BEHIND_GRACE: Duration = Duration::from_secs(1);
const BEHIND_CAP: u64 = 16 << 20;
/// How often a full send queue is tried again during the grace.
const BEHIND_POLL: Duration = Duration::from_millis(5);

/// A spliced flow without a socket event for this long leaves tokio for the parking lot (`park`).
const PARK_AFTER: Duration = Duration::from_millis(200);

/// How a flow is spliced.
#[derive(Clone, Copy)]
pub struct Policy {
    /// Bytes each direction may have in kernel queues.
    pub budget: u64,
    /// A response stream (SSE): only upstream bytes are spliced; the client is expected to send
    /// nothing more, and the flow ends if it does.
    pub one_way: bool,
    /// The flow is closed after this long without a byte in either direction.
    pub idle: Duration,
}

impl Policy {
    /// The policy of the running config for a flow (`one_way`: a response stream).
    pub fn of(settings: &Settings, one_way: bool) -> Policy {
        Policy { budget: settings.splice_budget, one_way, idle: settings.tunnel_timeout }
    }
}

/// What the flow's task knows of a spliced flow, kept while it is parked.
pub(super) struct Spliced {
    pub(super) sockets: Sockets,
    pub(super) dp: Arc<dyn Datapath>,
    /// Disconnect and drain.
    pub(super) closer: watch::Receiver<u64>,
    /// client -> upstream, and upstream -> client.
    pub(super) up: Direction,
    pub(super) down: Direction,
    pub(super) policy: Policy,
    activity: Activity,
    tally: Tally,
    /// Counts the flow among its backend's spliced ones while it is spliced (let go when the
    /// flow leaves the kernel path to be copied).
    pub(super) spliced: Option<Gauge>,
    /// False once parking this flow failed (no parking lot in this process, or its epoll refused
    /// the sockets): the flow stays with tokio for the rest of its life.
    parkable: bool,
}

/// One direction's bookkeeping.
pub(super) struct Direction {
    /// Cookie of the socket bytes arrive on.
    pub(super) src: u64,
    /// Bytes the kernel passed that userspace read from src and wrote to dst.
    pub(super) consumed: u64,
    /// Bytes that had entered dst's send queue when splicing began (acknowledged, which counts
    /// the SYN, plus still queued, such as a 101 the client has not acknowledged yet).
    dst_acked_base: u64,
    /// Bytes written into dst before splicing began (read-ahead handed over by hyper).
    dst_prefix: u64,
    /// The kernel's redirected count when all of it was last seen in dst's send queue
    /// (`u64::MAX`: not yet checked).
    pub(super) flushed_redirected: u64,
    pub(super) done: bool,
}

impl Direction {
    fn new(src: u64, dst_acked_base: u64, dst_prefix: u64) -> Direction {
        Direction { src, consumed: 0, dst_acked_base, dst_prefix, flushed_redirected: u64::MAX, done: false }
    }
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed normally.
    Closed,
    /// One side reset; the other was reset too.
    Reset,
    /// Admin disconnect or drain deadline.
    Disconnected,
    /// The peer did not take the bytes within the drain limit.
    Stalled,
    /// No byte moved in either direction for the idle limit; both sides were closed.
    Idle,
}

/// Splicing was not possible: copy from here on. Nothing entered the kernel path; the prefixes
/// were written.
pub struct Unspliced {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub reason: io::Error,
    pub tally: Tally,
}

/// What an upgraded flow holds for its life and counts: its place among the backend's and the
/// server's open flows, and the counters of spliced and copied flows.
pub struct Tally {
    pub guard: InFlight,
    pub open: UpgradedGuard,
}

impl Tally {
    /// Counts a flow copied in userspace (when the copy begins).
    pub fn copied(&self) {
        self.guard.server().copied_flows.fetch_add(1, Relaxed);
        self.guard.backend().copied_flows.fetch_add(1, Relaxed);
    }

    /// Counts a spliced flow that ended.
    fn spliced(self, end: End) {
        self.guard.server().spliced_flows.fetch_add(1, Relaxed);
        self.guard.backend().spliced_flows.fetch_add(1, Relaxed);
        tracing::debug!(backend = %self.guard.backend().id, ?end, "spliced flow ended");
    }
}

/// A flow the kernel splices now; `run` watches it to its end.
pub struct Started(Box<Spliced>);

/// The two sockets of an upgraded flow, with what hyper had already read from each.
pub struct Flow {
    pub client: TcpStream,
    /// Bytes the client sent that hyper already read: they go to the upstream first.
    pub client_ahead: Bytes,
    pub upstream: TcpStream,
    /// Bytes the upstream sent after its 101 that hyper already read: they go to the client first.
    pub upstream_ahead: Bytes,
}

/// Hands the flow to the kernel, counting its bytes for its backend. When it cannot be spliced
/// the sockets come back for copying.
pub async fn start(
    dp: Arc<dyn Datapath>,
    flow: Flow,
    policy: Policy,
    closer: watch::Receiver<u64>,
    tally: Tally,
) -> Result<Started, Box<Unspliced>> {
    let Policy { budget, one_way, .. } = policy;
    let Flow { mut client, client_ahead, mut upstream, upstream_ahead } = flow;
    forget_wakers(&client);
    forget_wakers(&upstream);
    // Measured here: an skb that userspace had read only part of is handed to the verdict
    // whole on insertion, so its first bytes arrive twice. Reading each socket dry first
    // leaves only whole skbs (or none) for the kernel.
    let (client_ahead, upstream_ahead) = match (drain(&client, client_ahead), drain(&upstream, upstream_ahead)) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            return Err(Box::new(Unspliced { client, upstream, reason: e, tally }));
        }
    };
    let copy = |reason, client, upstream, tally| Err(Box::new(Unspliced { client, upstream, reason, tally }));
    // Baselines before anything more is written: the prefixes count as bytes sent to each side.
    let (ca, ua) = match (entered(client.as_fd()), entered(upstream.as_fd())) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return copy(e, client, upstream, tally),
    };
    // Bytes already read into userspace go first, before the kernel joins the sockets.
    if let Err(e) = write_prefix(&mut upstream, &client_ahead).await {
        return copy(e, client, upstream, tally);
    }
    if let Err(e) = write_prefix(&mut client, &upstream_ahead).await {
        return copy(e, client, upstream, tally);
    }
    // Leaving the kernel path needs every redirected byte in its destination's send queue (a
    // socket's redirect backlog is discarded with it): room for the whole budget and more.
    set_sndbuf(&client, budget);
    set_sndbuf(&upstream, budget);
    let limits = Limits { to_backend: if one_way { 0 } else { budget }, to_client: budget };
    let pair = match dp.splice(client.as_fd(), upstream.as_fd(), limits, tally.guard.backend().slot) {
        Ok(p) => p,
        Err(e) => return copy(io::Error::other(e.to_string()), client, upstream, tally),
    };
    let (up_prefix, down_prefix) = (client_ahead.len() as u64, upstream_ahead.len() as u64);
    // Not kept for the flow's life: an idle flow should hold no buffers.
    drop((client_ahead, upstream_ahead));
    Ok(Started(Box::new(Spliced {
        sockets: Sockets::Tokio(client, upstream),
        dp,
        closer,
        up: Direction::new(pair.a, ua, up_prefix),
        down: Direction::new(pair.b, ca, down_prefix),
        policy,
        activity: Activity::new(policy.idle),
        spliced: Some(Gauge::hold(tally.guard.backend(), |b| &b.spliced_open)),
        tally,
        parkable: true,
    })))
}

impl Started {
    /// Watches the flow until it ends: with tokio while it has socket events, in the parking lot
    /// while quiet (this task ends then; the lot spawns another when the flow leaves it).
    pub async fn run(self) {
        self.0.drive().await;
    }
}

/// How parking a quiet flow went.
enum Parking {
    /// The lot has it.
    Parked,
    /// It stays with tokio.
    Stays(Box<Spliced>),
    Ended(Box<Spliced>, End),
}

impl Spliced {
    /// Watches the flow with tokio until it ends or parks.
    async fn drive(mut self: Box<Self>) {
        let end = loop {
            // Boxed: the watcher's state (large) exists only while the flow is with tokio.
            match Box::pin(watch(&mut self)).await {
                Watched::Ended(end) => break end,
                Watched::Detach(held) => break Box::pin(self.detach_and_copy(held)).await,
                Watched::Quiet => {}
            }
            self = match self.park() {
                Parking::Parked => return,
                Parking::Stays(flow) => flow,
                Parking::Ended(flow, end) => {
                    flow.end(end);
                    return;
                }
            };
        };
        self.end(end);
    }

    /// Moves a quiet flow's sockets from tokio to the parking lot, and the flow with them.
    fn park(mut self: Box<Self>) -> Parking {
        let Some(lot) = lot() else {
            self.parkable = false;
            return Parking::Stays(self);
        };
        let Sockets::Tokio(client, upstream) = std::mem::replace(&mut self.sockets, Sockets::Lost) else {
            return Parking::Ended(self, End::Reset);
        };
        match (client.into_std(), upstream.into_std()) {
            (Ok(c), Ok(u)) => {
                let counted =
                    (self.tally.guard.server().parked(), Gauge::hold(self.tally.guard.backend(), |b| &b.parked_open));
                self.sockets = Sockets::Parked(counted, c, u);
            }
            // A socket that could not leave tokio's epoll was closed with it (a FIN, not a
            // reset: unavoidable here); the other is reset.
            (c, u) => {
                tracing::warn!("splice: a quiet flow's socket could not leave tokio; resetting the flow");
                c.iter().chain(u.iter()).for_each(reset);
                return Parking::Ended(self, End::Reset);
            }
        }
        // Inline in the lot's slab: the box goes.
        match lot.park(*self) {
            Ok(()) => Parking::Parked,
            Err((flow, e)) => {
                tracing::debug!(error = %e, "splice: cannot park a quiet flow; it stays with tokio");
                let mut flow = Box::new(flow);
                flow.parkable = false;
                match flow.unpark() {
                    Ok(()) => Parking::Stays(flow),
                    Err(end) => Parking::Ended(flow, end),
                }
            }
        }
    }

    /// Brings a parked flow's sockets back to tokio.
    fn unpark(&mut self) -> Result<(), End> {
        let Sockets::Parked(counted, client, upstream) = std::mem::replace(&mut self.sockets, Sockets::Lost) else {
            return Err(End::Reset);
        };
        drop(counted);
        match (TcpStream::from_std(client), TcpStream::from_std(upstream)) {
            (Ok(c), Ok(u)) => {
                self.sockets = Sockets::Tokio(c, u);
                Ok(())
            }
            (c, u) => {
                tracing::warn!("splice: a parked flow's socket could not return to tokio; resetting the flow");
                c.iter().chain(u.iter()).for_each(reset);
                Err(End::Reset)
            }
        }
    }

    /// Ends the flow: its sockets leave the maps, and unless it ended normally both sides are
    /// reset; then the sockets close and the flow is counted.
    fn end(self: Box<Self>, end: End) {
        let _ = self.dp.unsplice(SplicedPair { a: self.up.src, b: self.down.src });
        if !matches!(end, End::Closed | End::Idle) {
            match &self.sockets {
                Sockets::Tokio(c, u) => [c.as_fd(), u.as_fd()].iter().for_each(reset),
                Sockets::Parked(_, c, u) => [c.as_fd(), u.as_fd()].iter().for_each(reset),
                Sockets::Lost => {}
            }
        }
        let Spliced { sockets, tally, .. } = *self;
        drop(sockets);
        tally.spliced(end);
    }

    /// Looks at the flow's byte total for the idle clock: true when it is idle now.
    fn idle_now(&mut self) -> bool {
        self.activity.idle_after(moved(&*self.dp, &self.up, &self.down), self.policy.idle)
    }
}

/// A spliced flow's sockets: registered with tokio while the flow has socket events, in the
/// parking lot while it is quiet.
pub(super) enum Sockets {
    Tokio(TcpStream, TcpStream),
    /// The guards count the flow among the server's and its backend's parked flows.
    Parked((ParkedGuard, Gauge), std::net::TcpStream, std::net::TcpStream),
    /// A socket could not move between tokio and the lot; the flow ends.
    Lost,
}

/// The process's parking lot for spliced flows, started on first use; None when its epoll or
/// thread could not be created (flows then stay with tokio).
fn lot() -> Option<&'static Lot<Spliced>> {
    static LOT: OnceLock<Option<&'static Lot<Spliced>>> = OnceLock::new();
    *LOT.get_or_init(|| match Lot::start("splice-park") {
        Ok(lot) => Some(lot),
        Err(e) => {
            tracing::warn!(error = %e, "cannot park quiet spliced flows; they stay watched by tokio");
            None
        }
    })
}

impl Tenant for Spliced {
    fn sockets(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        // The sockets whose direction is still open (a response stream's client stays open: the
        // flow ends if it sends anything).
        let open = match &self.sockets {
            Sockets::Parked(_, c, u) => [(!self.up.done).then(|| c.as_fd()), (!self.down.done).then(|| u.as_fd())],
            _ => [None, None],
        };
        open.into_iter().flatten()
    }

    fn check(&mut self) -> Option<Wake> {
        if self.closer.has_changed().unwrap_or(true) {
            Some(Wake::Closer)
        } else if tokio::time::Instant::now() >= self.activity.next_check && self.idle_now() {
            Some(Wake::Idle)
        } else {
            None
        }
    }

    async fn resume(self, why: Wake) {
        let mut flow = Box::new(self);
        match why {
            Wake::Event => match flow.unpark() {
                Ok(()) => flow.drive().await,
                Err(end) => flow.end(end),
            },
            Wake::Closer => flow.end(End::Disconnected),
            Wake::Idle => flow.end(End::Idle),
        }
    }
}

/// Drops the wakers the sockets' previous users (hyper's connection tasks, now finished) left in
/// tokio's registration: a `poll_read_ready`/`poll_write_ready` that found the socket not ready
/// keeps its waker there until the next event, and a waker keeps its whole task allocated. This
/// task watches with `ready()`, which does not replace them, so an idle spliced flow held both
/// finished connection tasks: 6.5 KiB (measured with heaptrack). A no-op waker takes their place.
fn forget_wakers(s: &TcpStream) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = s.poll_read_ready(&mut cx);
    let _ = s.poll_write_ready(&mut cx);
}

/// `ahead` plus everything `s` has received so far (without waiting for more).
fn drain(s: &TcpStream, ahead: Bytes) -> io::Result<Bytes> {
    let mut buf = BytesMut::from(&ahead[..]);
    loop {
        buf.reserve(16 * 1024);
        match s.try_read_buf(&mut buf) {
            // A FIN before splicing: leave it for the kernel path to see.
            Ok(0) => return Ok(buf.freeze()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(buf.freeze()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

async fn write_prefix(s: &mut TcpStream, prefix: &[u8]) -> io::Result<()> {
    if !prefix.is_empty() {
        s.write_all(prefix).await?;
    }
    Ok(())
}

/// How a spell of watching a flow with tokio ended.
enum Watched {
    Ended(End),
    /// No socket event for `PARK_AFTER`: the flow can be parked.
    Quiet,
    /// A receiver fell behind: the flow leaves the kernel path, with the bytes already read
    /// from each side and not yet written to the other.
    Detach(Held),
}

/// Why `pump` stopped short.
enum Stop {
    End(End),
    /// dst's send queue is full: these bytes, read from src, are still to be written to it.
    Behind(Bytes),
}

impl From<End> for Stop {
    fn from(end: End) -> Stop {
        Stop::End(end)
    }
}

impl Stop {
    /// What the watcher does about it; `up` says which direction stopped.
    fn watched(self, up: bool) -> Watched {
        match self {
            Stop::End(end) => Watched::Ended(end),
            Stop::Behind(rest) if up => Watched::Detach(Held { up: rest, down: Bytes::new() }),
            Stop::Behind(rest) => Watched::Detach(Held { up: Bytes::new(), down: rest }),
        }
    }
}

/// Watches a spliced flow's sockets until it ends or, when it can be parked, has been quiet for
/// `PARK_AFTER`.
async fn watch(flow: &mut Spliced) -> Watched {
    let Policy { budget, one_way, idle } = flow.policy;
    let Spliced { sockets, dp, closer, up, down, activity, parkable, .. } = flow;
    let parkable = *parkable;
    let Sockets::Tokio(client, upstream) = sockets else { return Watched::Ended(End::Reset) };
    let dp = &**dp;
    let mut quiet_at = tokio::time::Instant::now() + PARK_AFTER;
    loop {
        // A response stream is over when the backend's side is: the client was told
        // `Connection: close`.
        if (up.done || one_way) && down.done {
            return Watched::Ended(End::Closed);
        }
        let end = tokio::select! {
            r = client.ready(Interest::READABLE), if !up.done => {
                quiet_at = tokio::time::Instant::now() + PARK_AFTER;
                let Ok(ready) = r else { return Watched::Ended(End::Reset) };
                if one_way {
                    // Anything from the client after its request ends a response stream.
                    if dp.peer(up.src).is_some_and(|p| p.passed_bytes > 0) {
                        Err(Watched::Ended(End::Reset))
                    } else if ready.is_read_closed() {
                        Err(Watched::Ended(End::Closed))
                    } else {
                        clear_read_readiness(client);
                        Ok(())
                    }
                } else {
                    let detachable = !down.done;
                    pump(dp, client, upstream, up, ready, budget, detachable).await.map_err(|s| s.watched(true))
                }
            }
            r = upstream.ready(Interest::READABLE), if !down.done => {
                quiet_at = tokio::time::Instant::now() + PARK_AFTER;
                let Ok(ready) = r else { return Watched::Ended(End::Reset) };
                let detachable = !up.done;
                pump(dp, upstream, client, down, ready, budget, detachable).await.map_err(|s| s.watched(false))
            }
            _ = closer.changed() => Err(Watched::Ended(End::Disconnected)),
            _ = tokio::time::sleep_until(if parkable { activity.next_check.min(quiet_at) } else { activity.next_check }) => {
                let now = tokio::time::Instant::now();
                if now >= activity.next_check && activity.idle_after(moved(dp, up, down), idle) {
                    Err(Watched::Ended(End::Idle))
                } else if parkable && now >= quiet_at {
                    Err(Watched::Quiet)
                } else {
                    Ok(())
                }
            }
        };
        if let Err(watched) = end {
            return watched;
        }
    }
}

/// Every byte of the flow so far: the kernel's counters of both sockets plus what we copied.
fn moved(dp: &dyn Datapath, up: &Direction, down: &Direction) -> u64 {
    [up.src, down.src].iter().filter_map(|c| dp.peer(*c)).map(|p| p.redirected_bytes + p.passed_bytes).sum::<u64>()
        + up.consumed
        + down.consumed
}

/// The idle clock of a spliced flow: looks at the byte counters a few times per idle limit.
struct Activity {
    last_total: u64,
    last_change: tokio::time::Instant,
    next_check: tokio::time::Instant,
}

impl Activity {
    fn new(idle: Duration) -> Activity {
        let now = tokio::time::Instant::now();
        Activity { last_total: 0, last_change: now, next_check: now + check_period(idle) }
    }

    /// Records the flow's byte total now; true when it has not changed for `idle`.
    fn idle_after(&mut self, total: u64, idle: Duration) -> bool {
        let now = tokio::time::Instant::now();
        if total != self.last_total {
            self.last_total = total;
            self.last_change = now;
        }
        self.next_check = now + check_period(idle);
        now.duration_since(self.last_change) >= idle
    }
}

/// Handles readiness of `src`: copies what the kernel passed, or finishes the direction on
/// FIN, or reports a reset. Waits for dst's receiver at most `BEHIND_GRACE`, and while the kernel
/// holds at most `BEHIND_CAP` passed bytes for it: then it stops with the bytes it could not write
/// (`Stop::Behind`), and the flow leaves the kernel path.
///
/// Only bytes the verdict passed are read (`passed_bytes - consumed`), never more: a read
/// beyond them would fall through to the socket's own queue and take part of an skb the
/// verdict has not seen yet, which the kernel then hands to the verdict whole, so those bytes
/// would go out twice (seen as surplus bytes at the receiver in the splice benchmark).
async fn pump(
    dp: &dyn Datapath,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    dir: &mut Direction,
    ready: Ready,
    budget: u64,
    detachable: bool,
) -> Result<(), Stop> {
    // Allocated only when there is something to copy, and not zeroed: reads fill it.
    let mut buf: Option<BytesMut> = None;
    let mut waits = 0u32;
    let copied_before = dir.consumed;
    // Passed bytes known to wait in src's queue: the kernel's counters are read again only once
    // these are copied, so copying costs a read and a write per buffer, as in copy mode.
    let mut avail = 0u64;
    let mut peer = Peer::default();
    loop {
        if avail == 0 {
            peer = match dp.peer(dir.src) {
                // An overlapping segment the kernel could not cut: bytes can no longer be kept exact.
                Some(p) if p.broken != 0 => {
                    tracing::warn!(
                        socket = dir.src,
                        "splice: overlapping segment could not be cut; resetting the flow"
                    );
                    return Err(End::Reset.into());
                }
                Some(p) => p,
                None => return Err(End::Reset.into()),
            };
            avail = peer.passed_bytes.saturating_sub(dir.consumed);
        }
        if avail == 0 {
            if dir.consumed != copied_before {
                // Caught up: the kernel redirects again (within the new limit) once it sees this.
                // Published only now: while any passed byte is not copied it would pass anyway.
                let acked = bytes_acked(dst.as_fd()).unwrap_or(dir.dst_acked_base);
                let delivered = acked.saturating_sub(dir.dst_acked_base).saturating_sub(dir.dst_prefix);
                let limit = (delivered + budget).saturating_sub(dir.consumed);
                let _ = dp.set_control(dir.src, Control { limit, consumed: dir.consumed });
            }
            if ready.is_read_closed() || ready.is_error() {
                if let Ok(Some(_)) = src.take_error() {
                    return Err(End::Reset.into());
                }
                if peer.fin_seen == 0 {
                    // TCP marks the socket read-closed before the verdict has run on the last
                    // segments: their bytes are not counted yet. Wait for the verdict, boundedly.
                    settle(&mut waits).await?;
                    continue;
                }
                // FIN: everything from src must have entered dst's send queue first.
                wait_flushed(dp, dst, dir).await?;
                let _ = dst.shutdown().await;
                dir.done = true;
                return Ok(());
            }
            clear_read_readiness(src);
            // Bytes passed after the counters were read and before the clear raised no event of
            // their own: look once more.
            match dp.peer(dir.src) {
                Some(p) if p.passed_bytes > dir.consumed => continue,
                _ => return Ok(()),
            }
        }
        // Sized to what is waiting (a flow blocked on a slow receiver holds it meanwhile).
        let want = (avail as usize).min(COPY_BUF);
        let b = buf.get_or_insert_with(BytesMut::new);
        b.clear();
        b.reserve(want);
        match src.try_read_buf(&mut (&mut *b).limit(want)) {
            // Passed bytes still on their way to the socket (the kernel may queue them from a
            // worker) while the FIN is already seen: wait for them, boundedly.
            Ok(0) => settle(&mut waits).await?,
            Ok(n) => {
                // Redirected bytes go first; once seen in dst's send queue they stay counted, so
                // the check is needed again only after the kernel redirected more.
                if peer.redirected_bytes != dir.flushed_redirected {
                    wait_flushed(dp, dst, dir).await?;
                    dir.flushed_redirected = peer.redirected_bytes;
                }
                let written = write_now(dst, &b[..n]).map_err(|_| End::Reset)?;
                dir.consumed += written as u64;
                // A half-closed flow cannot leave the kernel path (sockmaps hold established sockets
                // only): its receiver gets the drain limit, and the same cap on passed bytes.
                let grace = if detachable { BEHIND_GRACE } else { DRAIN_LIMIT };
                if written < n
                    && let Some(rest) = wait_for_room(dp, dst, dir, &b[written..n], grace).await?
                {
                    if !detachable {
                        return Err(End::Stalled.into());
                    }
                    return Err(Stop::Behind(Bytes::copy_from_slice(rest)));
                }
                avail -= n as u64;
            }
            // Passed bytes still on their way to the socket: their arrival raises an event (the
            // read cleared readiness as of its own attempt).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(End::Reset.into()),
        }
    }
}

/// One millisecond's wait for the kernel to finish with a socket's last bytes; a flow whose
/// kernel side has not settled after 5 s is reset.
pub(super) async fn settle(waits: &mut u32) -> Result<(), End> {
    *waits += 1;
    if *waits > 5_000 {
        return Err(End::Reset);
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(())
}

/// Writes `rest` to dst as its send queue makes room, for at most `grace` and while the
/// kernel holds at most `BEHIND_CAP` passed bytes for this direction; returns what is still
/// unwritten when either limit is reached (the receiver is behind: the flow leaves the kernel
/// path), None once everything was written. A receiver that is merely slow for a moment keeps
/// its flow spliced.
async fn wait_for_room<'a>(
    dp: &dyn Datapath,
    dst: &TcpStream,
    dir: &mut Direction,
    mut rest: &'a [u8],
    grace: Duration,
) -> Result<Option<&'a [u8]>, End> {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let unread = dp.peer(dir.src).map_or(0, |p| p.passed_bytes.saturating_sub(dir.consumed));
        if tokio::time::Instant::now() >= deadline || unread > BEHIND_CAP {
            return Ok(Some(rest));
        }
        tokio::time::sleep(BEHIND_POLL).await;
        let written = write_now(dst, rest).map_err(|_| End::Reset)?;
        dir.consumed += written as u64;
        rest = &rest[written..];
        if rest.is_empty() {
            return Ok(None);
        }
    }
}

/// Writes what dst's send queue takes now, without waiting; returns how much that was. A plain
/// send, not tokio's `try_write`: that one answers WouldBlock without trying while tokio still
/// remembers an earlier full queue, and a queue given more room raises no event.
pub(super) fn write_now(dst: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    let sock = socket2::SockRef::from(dst);
    let mut done = 0;
    while done < buf.len() {
        match sock.send(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Room in the socket's send queue for every byte the budget lets the kernel redirect to it,
/// plus what userspace copies and TCP's own working room (SO_SNDBUFFORCE, as root; the kernel
/// doubles the value for its bookkeeping). A fixed size also ends send-buffer autotuning, which
/// stops at `tcp_wmem`'s maximum (4 MiB here): this is never less.
pub(super) fn set_sndbuf(s: &TcpStream, budget: u64) {
    const ROOM: u64 = 2 << 20;
    force_sndbuf(s, budget + ROOM);
}

fn force_sndbuf(s: &TcpStream, bytes: u64) {
    let bytes = bytes.min(i32::MAX as u64 / 2) as libc::c_int;
    // SAFETY: s is a live socket; the option value is a c_int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&raw const bytes).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "splice: SO_SNDBUFFORCE refused");
    }
}

/// Adds `bytes` of room to the socket's send queue (SO_SNDBUFFORCE, as root; the kernel reports
/// and keeps twice the value it is given).
pub(super) fn grow_sndbuf(s: &TcpStream, bytes: u64) {
    let now = socket2::SockRef::from(s).send_buffer_size().unwrap_or(0) as u64 / 2;
    force_sndbuf(s, now + bytes);
}

/// Tells tokio the socket's read readiness was consumed, so the watcher sleeps until the next
/// wake-up (a spliced socket wakes for bytes the kernel passed, FIN and errors).
fn clear_read_readiness(s: &TcpStream) {
    let _ = s.try_io(Interest::READABLE, || Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock)));
}

/// Waits until every byte src sent (redirected by the kernel or copied by us) has entered
/// dst's send queue: dst's acknowledged bytes plus its queue cover them.
pub(super) async fn wait_flushed(dp: &dyn Datapath, dst: &TcpStream, dir: &Direction) -> Result<(), End> {
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    let mut pause = Duration::from_micros(50);
    loop {
        let Some(peer) = dp.peer(dir.src) else { return Ok(()) };
        match dir.unflushed(peer.redirected_bytes, dst) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(_) => return Err(End::Reset),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(End::Stalled);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

impl Direction {
    /// Bytes from src (`redirected` by the kernel, or copied by us) that have not entered dst's
    /// send queue yet: dst's acknowledged bytes plus its queue cover the rest.
    pub(super) fn unflushed(&self, redirected: u64, dst: &TcpStream) -> io::Result<u64> {
        let want = redirected + self.consumed + self.dst_prefix;
        let have = entered(dst.as_fd())?.saturating_sub(self.dst_acked_base);
        Ok(want.saturating_sub(have))
    }
}

/// `tcpi_bytes_acked`: bytes of ours the peer acknowledged (plus one for the SYN).
fn bytes_acked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: tcp_info is plain data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: fd is a live TCP socket; info/len are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked)
}

/// Bytes that ever entered the socket's send queue: acknowledged plus still queued.
pub(super) fn entered(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(bytes_acked(fd)? + outq(fd)?)
}

/// Bytes in the send queue not yet acknowledged (SIOCOUTQ).
fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: fd is a live socket; TIOCOUTQ (= SIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// Zero linger: closing sends RST instead of FIN (the peer reset, or we give up on the flow).
/// With a zero timeout, close does not block.
pub(super) fn reset(s: &impl AsFd) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}
