//! Parking for quiet spliced flows. A spliced flow within its budget causes no socket event at
//! all, yet watching it with tokio costs a registration per socket (256 B each) and a task big
//! enough for the copy path. A parked flow leaves tokio: its sockets sit in one process-wide
//! epoll, watched by one thread, and the flow's task waits on a small future until a socket has
//! something for userspace (bytes passed over budget, FIN, RST), its closer fires (disconnect,
//! drain) or its idle check is due.

use std::{
    future::Future,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::{Mutex, MutexGuard, OnceLock, PoisonError},
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use tokio::sync::watch;

/// How often parked flows' closers and idle checks are looked at (the thread exists only once a
/// flow has parked).
const TICK: Duration = Duration::from_millis(100);
/// Events taken per `epoll_wait`.
const BATCH: usize = 256;

/// What woke a parked flow, by priority (lowest first): `Event` wins because EPOLLONESHOT does not
/// report a socket again, while time and closer are looked at again on every tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Wake {
    /// The time given to `wait` has come.
    Due,
    /// The flow's closer changed (disconnect, drain) or its sender is gone.
    Closer,
    /// A socket is readable, closed or in error: the flow goes back to tokio to handle it.
    Event,
}

/// A parked flow as the watcher thread sees it.
struct Slot {
    waker: Option<Waker>,
    closer: watch::Receiver<u64>,
    /// When the flow wants a `Due` wake-up: milliseconds since the lot started.
    due_ms: u64,
    woke: Option<Wake>,
}

impl Slot {
    /// Records why the flow should wake (the most urgent reason so far) and hands back its waker.
    fn wake(&mut self, why: Wake) -> Option<Waker> {
        self.woke = self.woke.max(Some(why));
        self.waker.take()
    }
}

/// The slots of parked flows, dense (a hash map took 133 B per flow at 2,000 flows, measured
/// with heaptrack); a flow's epoll token is its index and the index's generation, so an event
/// read just before a flow left is not taken for the next flow in its place.
#[derive(Default)]
struct Slots {
    entries: Vec<Entry>,
    free: Vec<u32>,
}

struct Entry {
    generation: u32,
    slot: Option<Slot>,
}

impl Slots {
    fn insert(&mut self, slot: Slot) -> u64 {
        let index = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.entries.push(Entry { generation: 0, slot: None });
                self.entries.len() - 1
            }
        };
        let e = &mut self.entries[index];
        e.generation = e.generation.wrapping_add(1);
        e.slot = Some(slot);
        (u64::from(e.generation) << 32) | index as u64
    }

    fn get_mut(&mut self, token: u64) -> Option<&mut Slot> {
        let e = self.entries.get_mut((token & u64::from(u32::MAX)) as usize)?;
        if u64::from(e.generation) != token >> 32 {
            return None;
        }
        e.slot.as_mut()
    }

    fn remove(&mut self, token: u64) {
        let index = token & u64::from(u32::MAX);
        if self.get_mut(token).is_some() {
            self.entries[index as usize].slot = None;
            self.free.push(index as u32);
        }
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Slot> {
        self.entries.iter_mut().filter_map(|e| e.slot.as_mut())
    }
}

/// The process's parking lot: one epoll and the slots of the flows parked in it.
struct Lot {
    epoll: OwnedFd,
    slots: Mutex<Slots>,
    /// The origin of `Slot::due_ms`.
    epoch: Instant,
}

/// The lot, started on first use; None when the epoll or its thread could not be created (flows
/// then stay with tokio).
fn lot() -> Option<&'static Lot> {
    static LOT: OnceLock<Option<&'static Lot>> = OnceLock::new();
    *LOT.get_or_init(|| match Lot::start() {
        Ok(lot) => Some(lot),
        Err(e) => {
            tracing::warn!(error = %e, "cannot park quiet spliced flows; they stay watched by tokio");
            None
        }
    })
}

impl Lot {
    fn start() -> io::Result<&'static Lot> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        // One per process, for its life.
        let lot: &'static Lot =
            Box::leak(Box::new(Lot { epoll, slots: Mutex::new(Slots::default()), epoch: Instant::now() }));
        std::thread::Builder::new().name("splice-park".into()).spawn(move || lot.watch())?;
        Ok(lot)
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The watcher thread: wakes flows whose sockets have events, and every tick those whose
    /// closer changed or whose time is due.
    fn watch(&self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
        let mut wakers = Vec::new();
        let mut next_scan = Instant::now();
        loop {
            // Rounded up: a wait rounded down to 0 ms would spin until the scan is due.
            let wait_ms = next_scan.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000) as i32;
            // SAFETY: events is valid for BATCH entries.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, wait_ms) };
            let now = Instant::now();
            let mut slots = self.slots();
            for e in &events[..n.max(0) as usize] {
                let token = e.u64;
                if let Some(w) = slots.get_mut(token).and_then(|s| s.wake(Wake::Event)) {
                    wakers.push(w);
                }
            }
            if now >= next_scan {
                let now_ms = self.ms(now);
                for slot in slots.iter_mut() {
                    let why = if slot.closer.has_changed().unwrap_or(true) {
                        Wake::Closer
                    } else if slot.due_ms <= now_ms {
                        Wake::Due
                    } else {
                        continue;
                    };
                    // Only a flow that is waiting is woken for time or closer; one that is awake
                    // is looked at again on the next tick after it waits again.
                    if slot.waker.is_some()
                        && let Some(w) = slot.wake(why)
                    {
                        wakers.push(w);
                    }
                }
                next_scan = now + TICK;
            }
            drop(slots);
            for w in wakers.drain(..) {
                w.wake();
            }
        }
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        // Oneshot: after its first event a socket stays quiet until the flow leaves the lot.
        let flags = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT;
        let mut ev = libc::epoll_event { events: flags as u32, u64: token };
        // SAFETY: ev is a valid epoll_event; the kernel checks both fds.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A flow's place in the lot. The sockets it watches must stay open until it is dropped (it
/// takes them out of the epoll by number).
pub struct Parked {
    lot: &'static Lot,
    token: u64,
    fds: [RawFd; 2],
    watched: usize,
}

impl Parked {
    /// Parks a flow: `sockets` (those whose direction is still open) are watched for events, and
    /// `closer` for a change.
    pub fn new<'a>(sockets: impl Iterator<Item = BorrowedFd<'a>>, closer: &watch::Receiver<u64>) -> io::Result<Parked> {
        let lot = lot().ok_or_else(|| io::Error::other("parking is unavailable"))?;
        let token = lot.slots().insert(Slot { waker: None, closer: closer.clone(), due_ms: 0, woke: None });
        // From here Drop undoes whatever was done.
        let mut parked = Parked { lot, token, fds: [-1; 2], watched: 0 };
        for s in sockets.take(2) {
            lot.ctl(libc::EPOLL_CTL_ADD, s.as_raw_fd(), token)?;
            parked.fds[parked.watched] = s.as_raw_fd();
            parked.watched += 1;
        }
        Ok(parked)
    }

    /// Waits until a socket has an event, the closer changes, or `due` comes.
    pub fn wait(&self, due: Instant) -> impl Future<Output = Wake> + '_ {
        std::future::poll_fn(move |cx| {
            let mut slots = self.lot.slots();
            let Some(slot) = slots.get_mut(self.token) else { return Poll::Ready(Wake::Event) };
            if let Some(why) = slot.woke.take() {
                return Poll::Ready(why);
            }
            slot.due_ms = self.lot.ms(due);
            match &mut slot.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        for fd in &self.fds[..self.watched] {
            let _ = self.lot.ctl(libc::EPOLL_CTL_DEL, *fd, self.token);
        }
        self.lot.slots().remove(self.token);
    }
}
