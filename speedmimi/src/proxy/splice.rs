//! Kernel splicing of an upgraded flow: both plain TCP sockets go into the SOCKHASH and the
//! sk_skb verdict moves bytes between them; this task only keeps the flow within its byte
//! budget, copies what the kernel passed back to userspace, and ends the flow properly.
//!
//! Per direction src -> dst (KERNEL-NOTES):
//! - bytes the kernel *passed* (budget spent) wait in src's receive queue; we read them and
//!   write them to dst, but only once everything the kernel *redirected* earlier has entered
//!   dst's send queue, so order holds; then we raise src's limit to what dst's receiver has
//!   acknowledged plus the budget, which bounds kernel memory per direction by the budget;
//! - FIN on src: once every byte from src has entered dst's send queue, shut down dst's write side;
//! - RST on src: reset dst (zero linger) and end the flow;
//! - when both directions are done, or on disconnect, the sockets leave the maps and close.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use speedmimi_common::splice::Control;
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};

use crate::datapath::{Datapath, Limits};

/// How long a FIN or a copy may wait for the peer to take the bytes before the flow is reset.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Read buffer for bytes the kernel passed to userspace (allocated only while copying).
const COPY_BUF: usize = 64 * 1024;
/// Read buffer of a bulk stream (KERNEL-NOTES: 256 KiB copies at 2.4-2.7 GB/s where 8 KiB
/// manages 0.9).
const BULK_BUF: usize = 256 * 1024;

/// A flow is judged bulk or not (`Policy::bulk_rate`) once it has run this long.
const BULK_AFTER: Duration = Duration::from_millis(500);
/// Bulk flows copied at once: one core's worth each; beyond that, splicing's lower CPU per
/// byte wins over copying's higher single-stream speed (KERNEL-NOTES' measurements).
const BULK_COPIES_MAX: usize = 2;

/// Flows moved from splicing to copying because they were bulk streams (since start).
pub static BULK_SWITCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bulk flows currently moved to userspace copy.
static BULK_COPIES: AtomicUsize = AtomicUsize::new(0);

/// A slot among `BULK_COPIES_MAX`, released on drop.
struct BulkSlot(());

impl BulkSlot {
    fn take() -> Option<BulkSlot> {
        BULK_COPIES.fetch_update(SeqCst, SeqCst, |n| (n < BULK_COPIES_MAX).then_some(n + 1)).ok().map(|_| BulkSlot(()))
    }
}

impl Drop for BulkSlot {
    fn drop(&mut self) {
        BULK_COPIES.fetch_sub(1, SeqCst);
    }
}

/// How a flow is spliced.
#[derive(Clone, Copy)]
pub struct Policy {
    /// Bytes each direction may have in kernel queues.
    pub budget: u64,
    /// A response stream (SSE): only upstream bytes are spliced; the client is expected to send
    /// nothing more, and the flow ends if it does.
    pub one_way: bool,
    /// Bytes per second above which a flow is copied instead; 0 = never.
    pub bulk_rate: u64,
}

/// One direction's bookkeeping.
struct Direction {
    /// Cookie of the socket bytes arrive on.
    src: u64,
    /// Bytes userspace read from src and wrote to dst (kernel-passed bytes, or the prefix).
    consumed: u64,
    /// Bytes that had entered dst's send queue when splicing began (acknowledged, which counts
    /// the SYN, plus still queued, such as a 101 the client has not acknowledged yet).
    dst_acked_base: u64,
    /// Bytes written into dst before splicing began (read-ahead handed over by hyper).
    dst_prefix: u64,
    done: bool,
    started: Instant,
    /// Set once this direction was found to be bulk (the switch is tried once).
    bulk_seen: bool,
    /// The kernel passes everything (a bulk flow): we copy with a large buffer, and once all
    /// redirected bytes had left there is nothing to wait for before each write.
    copy_only: bool,
    flushed: bool,
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
    /// A bulk stream, better copied (an internal step: the flow goes on, copied).
    Bulk,
}

/// How a splice attempt turned out.
pub enum Outcome {
    /// The flow ended while spliced.
    Ended(End),
    /// Splicing was not possible: copy from here on. Nothing entered the kernel path; the
    /// prefixes were written.
    Copy { client: TcpStream, upstream: TcpStream, reason: io::Error },
}

/// The two sockets of an upgraded flow, with what hyper had already read from each.
pub struct Flow {
    pub client: TcpStream,
    /// Bytes the client sent that hyper already read: they go to the upstream first.
    pub client_ahead: Bytes,
    pub upstream: TcpStream,
    /// Bytes the upstream sent after its 101 that hyper already read: they go to the client first.
    pub upstream_ahead: Bytes,
}

/// Splices the flow until it ends, counting its kernel bytes for `backend_slot`. When it
/// cannot be spliced (or turns out to be a bulk stream) the sockets come back for copying.
pub async fn run(
    dp: Arc<dyn Datapath>,
    flow: Flow,
    policy: Policy,
    backend_slot: u32,
    mut closer: watch::Receiver<u64>,
) -> Outcome {
    let Policy { budget, one_way, .. } = policy;
    let Flow { mut client, client_ahead, mut upstream, upstream_ahead } = flow;
    // Measured here: an skb that userspace had read only part of is handed to the verdict
    // whole on insertion, so its first bytes arrive twice. Reading each socket dry first
    // leaves only whole skbs (or none) for the kernel.
    let (client_ahead, upstream_ahead) = match (drain(&client, client_ahead), drain(&upstream, upstream_ahead)) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            return Outcome::Copy { client, upstream, reason: e };
        }
    };
    let copy = |reason, client, upstream| Outcome::Copy { client, upstream, reason };
    // Baselines before anything more is written: the prefixes count as bytes sent to each side.
    let (ca, ua) = match (entered(client.as_fd()), entered(upstream.as_fd())) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return copy(e, client, upstream),
    };
    // Bytes already read into userspace go first, before the kernel joins the sockets.
    if let Err(e) = write_prefix(&mut upstream, &client_ahead).await {
        return copy(e, client, upstream);
    }
    if let Err(e) = write_prefix(&mut client, &upstream_ahead).await {
        return copy(e, client, upstream);
    }
    let limits = Limits { to_backend: if one_way { 0 } else { budget }, to_client: budget };
    let pair = match dp.splice(client.as_fd(), upstream.as_fd(), limits, backend_slot) {
        Ok(p) => p,
        Err(e) => return copy(io::Error::other(e.to_string()), client, upstream),
    };
    // client -> upstream, and upstream -> client.
    let started = Instant::now();
    let (up_prefix, down_prefix) = (client_ahead.len() as u64, upstream_ahead.len() as u64);
    // Not kept for the flow's life: an idle flow should hold no buffers.
    drop((client_ahead, upstream_ahead));
    let mut up = Direction {
        src: pair.a,
        consumed: 0,
        dst_acked_base: ua,
        dst_prefix: up_prefix,
        done: false,
        started,
        bulk_seen: false,
        copy_only: false,
        flushed: false,
    };
    let mut down = Direction {
        src: pair.b,
        consumed: 0,
        dst_acked_base: ca,
        dst_prefix: down_prefix,
        done: false,
        started,
        bulk_seen: false,
        copy_only: false,
        flushed: false,
    };
    let mut bulk: Option<BulkSlot> = None;
    let end = loop {
        match watch(&*dp, &mut client, &mut upstream, &mut up, &mut down, policy, &mut closer).await {
            End::Bulk => {
                // The kernel stops redirecting and passes everything; we copy with large
                // buffers. The sockets stay in the maps: leaving them would drop what the
                // kernel passed but we have not read yet.
                if bulk.is_none() {
                    bulk = BulkSlot::take();
                }
                if bulk.is_some() && !up.copy_only {
                    let _ = dp.set_control(pair.a, Control { limit: 0, consumed: up.consumed });
                    let _ = dp.set_control(pair.b, Control { limit: 0, consumed: down.consumed });
                    up.copy_only = true;
                    down.copy_only = true;
                    BULK_SWITCHES.fetch_add(1, SeqCst);
                    tracing::debug!("bulk flow: copying in userspace from here");
                }
            }
            end => break end,
        }
    };
    drop(bulk);
    let _ = dp.unsplice(pair);
    if end != End::Closed {
        reset(&client);
        reset(&upstream);
    }
    Outcome::Ended(end)
}

/// `ahead` plus everything `s` has received so far (without waiting for more).
fn drain(s: &TcpStream, ahead: Bytes) -> io::Result<Bytes> {
    let mut buf = BytesMut::from(&ahead[..]);
    loop {
        buf.reserve(16 * 1024);
        let spare = buf.spare_capacity_mut();
        // SAFETY: try_read only writes initialised bytes into the slice and reports how many.
        let slice = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), spare.len()) };
        match s.try_read(slice) {
            // A FIN before splicing: leave it for the kernel path to see.
            Ok(0) => return Ok(buf.freeze()),
            Ok(n) => {
                // SAFETY: try_read wrote n bytes into the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
            }
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

async fn watch(
    dp: &dyn Datapath,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    up: &mut Direction,
    down: &mut Direction,
    policy: Policy,
    closer: &mut watch::Receiver<u64>,
) -> End {
    let Policy { budget, one_way, bulk_rate } = policy;
    loop {
        // A response stream is over when the backend's side is: the client was told
        // `Connection: close`.
        if (up.done || one_way) && down.done {
            return End::Closed;
        }
        tokio::select! {
            r = client.readable(), if !up.done => {
                if r.is_err() { return End::Reset; }
                if one_way {
                    // Anything from the client after its request ends a response stream.
                    match client.try_read(&mut [0u8; 1]) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Ok(0) => return End::Closed,
                        _ => return End::Reset,
                    }
                }
                // Boxed: the (large) copy state exists only while copying, not in idle flows.
                match Box::pin(pump(dp, client, upstream, up, budget, bulk_rate)).await {
                    Ok(()) => {}
                    Err(end) => return end,
                }
            }
            r = upstream.readable(), if !down.done => {
                if r.is_err() { return End::Reset; }
                match Box::pin(pump(dp, upstream, client, down, budget, bulk_rate)).await {
                    Ok(()) => {}
                    Err(end) => return end,
                }
            }
            _ = closer.changed() => return End::Disconnected,
        }
    }
}

/// Handles readiness of `src`: copies what the kernel passed, or finishes the direction on
/// FIN, or reports a reset.
async fn pump(
    dp: &dyn Datapath,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    dir: &mut Direction,
    budget: u64,
    bulk_rate: u64,
) -> Result<(), End> {
    let mut buf: Option<Vec<u8>> = None;
    let size = if dir.copy_only { BULK_BUF } else { COPY_BUF };
    loop {
        let b = buf.get_or_insert_with(|| vec![0; size]);
        match src.try_read(b) {
            Ok(0) => {
                // FIN: everything from src must have entered dst's send queue first.
                wait_flushed(dp, dst, dir).await?;
                let _ = dst.shutdown().await;
                dir.done = true;
                return Ok(());
            }
            Ok(n) => {
                if !dir.flushed {
                    wait_flushed(dp, dst, dir).await?;
                    // Redirecting stopped for good: no more kernel bytes to wait for.
                    dir.flushed = dir.copy_only;
                }
                if tokio::time::timeout(DRAIN_LIMIT, dst.write_all(&b[..n])).await.map_or(true, |r| r.is_err()) {
                    return Err(End::Stalled);
                }
                dir.consumed += n as u64;
                if dir.copy_only {
                    continue;
                }
                let elapsed = dir.started.elapsed();
                if bulk_rate > 0
                    && elapsed >= BULK_AFTER
                    && !dir.bulk_seen
                    && BULK_COPIES.load(SeqCst) < BULK_COPIES_MAX
                    && let Some(peer) = dp.peer(dir.src)
                    && (peer.redirected_bytes + dir.consumed) as f64 / elapsed.as_secs_f64() > bulk_rate as f64
                {
                    dir.bulk_seen = true;
                    return Err(End::Bulk);
                }
                let acked = bytes_acked(dst.as_fd()).unwrap_or(dir.dst_acked_base);
                let delivered = acked.saturating_sub(dir.dst_acked_base).saturating_sub(dir.dst_prefix);
                let limit = (delivered + budget).saturating_sub(dir.consumed);
                let _ = dp.set_control(dir.src, Control { limit, consumed: dir.consumed });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(End::Reset),
        }
    }
}

/// Waits until every byte src sent (redirected by the kernel or copied by us) has entered
/// dst's send queue: dst's acknowledged bytes plus its queue cover them.
async fn wait_flushed(dp: &dyn Datapath, dst: &TcpStream, dir: &Direction) -> Result<(), End> {
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    let mut pause = Duration::from_micros(50);
    loop {
        let Some(peer) = dp.peer(dir.src) else { return Ok(()) };
        let want = peer.redirected_bytes + dir.consumed + dir.dst_prefix;
        let have = match entered(dst.as_fd()) {
            Ok(n) => n.saturating_sub(dir.dst_acked_base),
            Err(_) => return Err(End::Reset),
        };
        if have >= want {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(End::Stalled);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
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
fn entered(fd: BorrowedFd<'_>) -> io::Result<u64> {
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
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}
