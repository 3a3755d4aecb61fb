//! Parking for quiet spliced flows. A spliced flow within its budget causes no socket event at
//! all, yet watching it with tokio costs a task and a registration per socket. A parked flow
//! leaves tokio altogether: the lot owns it. Its state sits inline in the lot's slab, one dense
//! array, so long-lived flows do not pin heap pages between the short-lived allocations of busy
//! ones; its sockets sit in one process-wide epoll, watched by one thread. When a socket has
//! something for userspace (bytes passed over budget, FIN, RST), or the flow's own check says it
//! must leave (its closer fired, its idle limit passed), the thread takes it out and spawns a
//! task for it on the runtime it came from.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    future::Future,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::runtime::Handle;

/// How often parked flows' checks are run (the thread exists only once a lot is used).
const TICK: Duration = Duration::from_millis(100);
/// Events taken per `epoll_wait`.
const BATCH: usize = 256;

/// Why a parked flow left the lot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A socket is readable, closed or in error: the flow goes back to tokio to handle it.
    Event,
    /// The flow's closer changed (disconnect, drain) or its sender is gone.
    Closer,
    /// No byte moved for the flow's idle limit.
    Idle,
}

/// What the lot keeps.
pub trait Tenant: Send + Sized + 'static {
    /// The sockets to watch for events (those whose direction is still open).
    fn sockets(&self) -> impl Iterator<Item = BorrowedFd<'_>>;
    /// Run by the lot's thread on every tick, with the lot locked (keep it short): why the flow
    /// must leave now, if it must.
    fn check(&mut self) -> Option<Wake>;
    /// The flow's life after it left the lot, spawned on the runtime it was parked from.
    fn resume(self, why: Wake) -> impl Future<Output = ()> + Send + 'static;
}

/// A parked flow and what the lot needs to give it back.
struct Slot<T> {
    tenant: T,
    runtime: Handle,
    /// The sockets in the epoll (by number: their owner is the tenant).
    fds: [RawFd; 2],
    watched: u8,
}

/// The slots of parked flows, dense; a flow's epoll token is its index and a generation, so an
/// event read just before a flow left is not taken for the next flow in its place.
struct Slots<T> {
    entries: Vec<Entry<T>>,
    /// Indices of the empty entries, lowest first: flows fill the front, so the tail empties as
    /// flows end and can be given back (`shrink`).
    free: BinaryHeap<Reverse<u32>>,
    /// The last generation handed out.
    generation: u32,
}

struct Entry<T> {
    generation: u32,
    slot: Option<Slot<T>>,
}

/// Entries the slab keeps however few flows are parked.
const MIN_ENTRIES: usize = 1024;

impl<T> Slots<T> {
    fn new() -> Slots<T> {
        Slots { entries: Vec::new(), free: BinaryHeap::new(), generation: 0 }
    }

    /// An empty entry's token, taken for a flow about to park (`put` fills it, `give_back`
    /// returns it unused).
    fn reserve(&mut self) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        let index = match self.free.pop() {
            Some(Reverse(i)) => i as usize,
            None => {
                self.entries.push(Entry { generation: 0, slot: None });
                self.entries.len() - 1
            }
        };
        self.entries[index].generation = self.generation;
        (u64::from(self.generation) << 32) | index as u64
    }

    fn put(&mut self, token: u64, slot: Slot<T>) {
        self.entries[index(token)].slot = Some(slot);
    }

    fn give_back(&mut self, token: u64) {
        self.free.push(Reverse(index(token) as u32));
    }

    /// Takes the flow of `token` out, when it is still the one parked there.
    fn take(&mut self, token: u64) -> Option<Slot<T>> {
        let e = self.entries.get_mut(index(token))?;
        if u64::from(e.generation) != token >> 32 {
            return None;
        }
        let slot = e.slot.take()?;
        self.give_back(token);
        Some(slot)
    }

    /// Once most of the slab is empty, gives back its empty tail (after a burst of flows, memory
    /// goes back to the allocator as the flows end).
    fn shrink(&mut self) {
        let len = self.entries.len();
        if len <= MIN_ENTRIES || (len - self.free.len()) * 2 > len {
            return;
        }
        while self.entries.len() > MIN_ENTRIES && self.entries.last().is_some_and(|e| e.slot.is_none()) {
            self.entries.pop();
        }
        if self.entries.len() < len {
            let len = self.entries.len();
            self.free.retain(|Reverse(i)| (*i as usize) < len);
            self.entries.shrink_to_fit();
        }
    }
}

fn index(token: u64) -> usize {
    (token & u64::from(u32::MAX)) as usize
}

/// A parking lot: one epoll, the slab of flows parked in it, and the thread that watches both.
pub struct Lot<T> {
    epoll: OwnedFd,
    slots: Mutex<Slots<T>>,
}

impl<T: Tenant> Lot<T> {
    /// A lot for the process's life, with its thread.
    pub fn start(name: &str) -> io::Result<&'static Lot<T>> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let slots = Mutex::new(Slots::new());
        let lot: &'static Lot<T> = Box::leak(Box::new(Lot { epoll, slots }));
        std::thread::Builder::new().name(name.into()).spawn(move || lot.watch())?;
        Ok(lot)
    }

    fn slots(&self) -> MutexGuard<'_, Slots<T>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parks a flow: from now on the lot owns it, until it leaves through `Tenant::resume`. Must
    /// be called from a task (the flow resumes on that task's runtime). When its sockets cannot
    /// be watched, the flow comes back with the reason.
    pub fn park(&self, tenant: T) -> Result<(), (T, io::Error)> {
        let runtime = match Handle::try_current() {
            Ok(h) => h,
            Err(e) => return Err((tenant, io::Error::other(e))),
        };
        let mut fds = [-1; 2];
        let mut watched = 0;
        // Locked throughout: an event on a socket added here is handled once the flow is in.
        let mut slots = self.slots();
        let token = slots.reserve();
        for s in tenant.sockets().take(2) {
            fds[watched] = s.as_raw_fd();
            watched += 1;
        }
        for (i, fd) in fds[..watched].iter().enumerate() {
            if let Err(e) = self.ctl(libc::EPOLL_CTL_ADD, *fd, token) {
                fds[..i].iter().for_each(|fd| self.forget(*fd));
                slots.give_back(token);
                return Err((tenant, e));
            }
        }
        slots.put(token, Slot { tenant, runtime, fds, watched: watched as u8 });
        Ok(())
    }

    /// The watcher thread: sends flows whose sockets have events back to tokio, and on every
    /// tick those whose check says so.
    fn watch(&self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
        let mut leaving = Vec::new();
        let mut next_scan = std::time::Instant::now();
        loop {
            // Rounded up: a wait rounded down to 0 ms would spin until the scan is due.
            let wait_ms = next_scan.saturating_duration_since(std::time::Instant::now()).as_micros().div_ceil(1000);
            // SAFETY: events is valid for BATCH entries.
            let n =
                unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, wait_ms as i32) };
            let now = std::time::Instant::now();
            let mut slots = self.slots();
            for e in &events[..n.max(0) as usize] {
                leaving.extend(slots.take(e.u64).map(|s| (s, Wake::Event)));
            }
            if now >= next_scan {
                for i in 0..slots.entries.len() {
                    let e = &mut slots.entries[i];
                    let Some(why) = e.slot.as_mut().and_then(|s| s.tenant.check()) else { continue };
                    let token = (u64::from(e.generation) << 32) | i as u64;
                    leaving.extend(slots.take(token).map(|s| (s, why)));
                }
                slots.shrink();
                next_scan = now + TICK;
            }
            drop(slots);
            for (slot, why) in leaving.drain(..) {
                // Out of the epoll before anything else may watch (or close) the sockets.
                slot.fds[..usize::from(slot.watched)].iter().for_each(|fd| self.forget(*fd));
                // On a runtime that has shut down the task is dropped at once, and the flow
                // with it (its sockets close).
                drop(slot.runtime.spawn(slot.tenant.resume(why)));
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

    /// Takes a socket out of the epoll.
    fn forget(&self, fd: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(rt: &tokio::runtime::Runtime, tenant: u32) -> Slot<u32> {
        Slot { tenant, runtime: rt.handle().clone(), fds: [-1; 2], watched: 0 }
    }

    fn park(slots: &mut Slots<u32>, rt: &tokio::runtime::Runtime, tenant: u32) -> u64 {
        let token = slots.reserve();
        slots.put(token, slot(rt, tenant));
        token
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().expect("a runtime")
    }

    #[test]
    fn a_token_takes_its_own_flow_once_and_never_the_next_in_its_place() {
        let rt = runtime();
        let mut slots = Slots::new();
        let first = park(&mut slots, &rt, 1);
        assert_eq!(slots.take(first).map(|s| s.tenant), Some(1));
        assert!(slots.take(first).is_none(), "taken twice");
        let second = park(&mut slots, &rt, 2);
        assert_eq!(index(second), index(first), "the empty entry is reused");
        assert!(slots.take(first).is_none(), "an old token took the next flow in its place");
        assert_eq!(slots.take(second).map(|s| s.tenant), Some(2));
    }

    #[test]
    fn flows_fill_the_front_and_an_emptied_tail_is_given_back() {
        let rt = runtime();
        let mut slots = Slots::new();
        let tokens: Vec<u64> = (0..4 * MIN_ENTRIES as u32).map(|i| park(&mut slots, &rt, i)).collect();
        // Half of them end: the slab keeps its size while half is in use.
        for t in &tokens[..2 * MIN_ENTRIES] {
            assert!(slots.take(*t).is_some());
        }
        slots.shrink();
        assert_eq!(slots.entries.len(), 4 * MIN_ENTRIES);
        // New flows take the lowest empty entries.
        let again = park(&mut slots, &rt, 99);
        assert_eq!(index(again), 0);
        assert!(slots.take(again).is_some());
        // The tail ends too, all but one flow near the front: the tail goes back.
        for t in &tokens[2 * MIN_ENTRIES..] {
            assert!(slots.take(*t).is_some());
        }
        let kept = park(&mut slots, &rt, 7);
        slots.shrink();
        assert_eq!(slots.entries.len(), MIN_ENTRIES);
        assert!(slots.entries.capacity() < 2 * MIN_ENTRIES, "capacity {}", slots.entries.capacity());
        // Entries left work as before: the kept flow is still there, and the slab grows again.
        let more: Vec<u64> = (0..2 * MIN_ENTRIES as u32).map(|i| park(&mut slots, &rt, i)).collect();
        assert!(more.iter().all(|t| index(*t) < 2 * MIN_ENTRIES + 1));
        assert_eq!(slots.take(kept).map(|s| s.tenant), Some(7));
        assert!(more.iter().all(|t| slots.take(*t).is_some()));
    }
}
