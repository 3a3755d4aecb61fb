//! Allocation counting for benchmark builds (`--features count-allocs`): the binary installs
//! [`Counting`] as its global allocator and `/metrics` reports [`total`]. Each thread counts in a
//! cache line of its own with a plain load and store, so counting adds no shared or locked write
//! to the path it measures.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
};

/// Counter slots. The first `SLOTS - 1` threads own one each; later threads share the last one
/// through an atomic add (a tokio blocking thread now and then, not an event loop).
const SLOTS: usize = 64;

#[repr(align(64))]
struct Slot(AtomicU64);

static COUNTS: [Slot; SLOTS] = [const { Slot(AtomicU64::new(0)) }; SLOTS];
static THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot index plus one; 0 before its first allocation. Const-initialised and
    /// without a destructor, so reading it never allocates, even while the thread exits.
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting calls to `alloc`, `alloc_zeroed` and `realloc`.
pub struct Counting;

fn count() {
    let mut slot = SLOT.get();
    if slot == 0 {
        slot = THREADS.fetch_add(1, Relaxed) + 1;
        SLOT.set(slot);
    }
    if slot < SLOTS {
        // Only this thread writes this slot; readers may see a count one behind.
        let c = &COUNTS[slot - 1].0;
        c.store(c.load(Relaxed) + 1, Relaxed);
    } else {
        COUNTS[SLOTS - 1].0.fetch_add(1, Relaxed);
    }
}

/// Allocations so far, summed over every thread.
pub fn total() -> u64 {
    COUNTS.iter().map(|c| c.0.load(Relaxed)).sum()
}

// SAFETY: every call goes unchanged to `System`, which meets GlobalAlloc's contract; counting
// neither allocates nor touches the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: our caller meets `alloc`'s contract, which is the one System needs.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from this allocator, that is from System, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from System with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_summed_over_threads() {
        let before = total();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| (0..10).for_each(|_| count()));
            }
        });
        assert!(total() >= before + 30);
    }
}
