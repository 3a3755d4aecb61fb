//! Gives free heap back to the kernel after a burst. Opening many connections at once (a
//! reconnect storm, or `bench scale`'s 128 concurrent handshakes) takes buffers that are freed
//! once the flows are upgraded, but glibc keeps the pages between the flows' long-lived
//! allocations: measured with `mallinfo2`, 8,000 idle spliced flows held 7 MB of live heap
//! (0.84 KiB per flow) and 11 MB free, all of it in the RSS. Every `PERIOD`, when more than
//! `TRIM_ABOVE` of the heap is free, `malloc_trim` returns its whole free pages (as HAProxy does
//! after its pools shrink). Only where the C library is glibc.

use std::time::Duration;

use crate::shutdown::Shutdown;

/// How often the free heap is looked at.
const PERIOD: Duration = Duration::from_secs(10);

/// Free heap kept without trimming: what ordinary churn reuses at once.
const TRIM_ABOVE: usize = 4 << 20;

/// Bytes of heap allocated and free now (all arenas), or None without glibc.
pub fn usage() -> Option<(usize, usize)> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 has no preconditions; it only reads the allocator's state.
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks, info.fordblks))
    }
    #[cfg(not(target_env = "gnu"))]
    None
}

/// Returns the free heap's whole pages to the kernel; whether any were.
pub fn trim() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim has no preconditions; 0 keeps no extra pad at the heap's top.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    false
}

/// Every `PERIOD`, trims the heap when more than `TRIM_ABOVE` of it is free.
pub fn spawn_trimmer(shutdown: Shutdown) {
    if usage().is_none() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PERIOD) => {}
                _ = shutdown.wait() => return,
            }
            if let Some((used, free)) = usage()
                && free > TRIM_ABOVE
            {
                let released = trim();
                tracing::debug!(used, free, released, "free heap trimmed");
            }
        }
    });
}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    use super::*;

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
        line.trim().trim_end_matches("kB").trim().parse().unwrap()
    }

    /// Freed buffers held between live allocations stay in the RSS until a trim gives their pages
    /// back; the live ones are untouched.
    #[test]
    fn a_trim_returns_freed_pages_between_live_allocations() {
        const BUFFERS: usize = 512;
        let mut kept = Vec::with_capacity(BUFFERS);
        let mut freed = Vec::with_capacity(BUFFERS);
        for i in 0..BUFFERS {
            // 64 KiB, below glibc's mmap threshold: from the heap, as connection buffers are. The
            // kept ones are as large, so that they are carved from the heap's top in turn with the
            // freed ones: small ones would come from chunks freed earlier elsewhere, and the freed
            // buffers would then join the top and go back to the kernel by themselves.
            freed.push(vec![i as u8; 64 << 10]);
            kept.push(vec![i as u8; 64 << 10]);
        }
        drop(freed);
        let before = rss_kib();
        assert!(trim(), "nothing was trimmed");
        let after = rss_kib();
        // 32 MiB was freed in 64 KiB holes; most of each hole is whole pages.
        assert!(before - after > 16 << 10, "RSS {before} KiB -> {after} KiB after the trim");
        assert!(kept.iter().enumerate().all(|(i, k)| k.iter().all(|b| *b == i as u8)));
    }
}
