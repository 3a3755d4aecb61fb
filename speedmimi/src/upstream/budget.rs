//! The retry budget of an upstream (Linkerd's and Envoy's idea): retries may be at most
//! `budget_percent` of the requests of the last 10 seconds plus `min_per_second` per second, so
//! that when a backend fails, retries add a bounded share of load instead of multiplying it.
//! Counted in ten one-second buckets of atomics; a bucket is reset by the first count of a new
//! second (a race there loses a few counts, which only shifts the budget slightly).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::{backend::now_ms, config::RetrySection};

const BUCKETS: usize = 10;

#[derive(Default)]
struct Bucket {
    /// The second (`now_ms / 1000`) the counts belong to.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

#[derive(Default)]
pub struct RetryBudget {
    buckets: [Bucket; BUCKETS],
    percent: AtomicU32,
    floor: AtomicU32,
    /// Retries made and retries the budget refused, since start.
    pub retried: AtomicU64,
    pub refused: AtomicU64,
}

impl RetryBudget {
    pub fn configure(&self, r: &RetrySection) {
        self.percent.store(r.budget_percent, Relaxed);
        self.floor.store(r.min_per_second, Relaxed);
    }

    fn bucket(&self, second: u64) -> &Bucket {
        let b = &self.buckets[second as usize % BUCKETS];
        if b.second.load(Relaxed) != second {
            b.second.store(second, Relaxed);
            b.requests.store(0, Relaxed);
            b.retries.store(0, Relaxed);
        }
        b
    }

    /// One request came (retries of it are not requests).
    pub fn deposit(&self) {
        self.bucket(now_ms() / 1000).requests.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget: false (and counted as refused) when it is spent.
    pub fn withdraw(&self) -> bool {
        let second = now_ms() / 1000;
        let (mut requests, mut retries) = (0, 0);
        for b in &self.buckets {
            if second.saturating_sub(b.second.load(Relaxed)) < BUCKETS as u64 {
                requests += b.requests.load(Relaxed);
                retries += b.retries.load(Relaxed);
            }
        }
        let allowed =
            requests * self.percent.load(Relaxed) as u64 / 100 + BUCKETS as u64 * self.floor.load(Relaxed) as u64;
        if retries >= allowed {
            self.refused.fetch_add(1, Relaxed);
            return false;
        }
        self.bucket(second).retries.fetch_add(1, Relaxed);
        self.retried.fetch_add(1, Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests_plus_a_floor() {
        let b = RetryBudget::default();
        b.configure(&RetrySection { budget_percent: 20, min_per_second: 1, ..RetrySection::default() });
        // Floor alone: 1 per second over 10 s.
        assert_eq!((0..50).filter(|_| b.withdraw()).count(), 10);
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!((0..50).filter(|_| b.withdraw()).count(), 20, "20% of 100 more");
        assert_eq!(b.retried.load(Relaxed), 30);
        assert_eq!(b.refused.load(Relaxed), 70);
        let off = RetryBudget::default();
        off.configure(&RetrySection { budget_percent: 0, min_per_second: 0, ..RetrySection::default() });
        off.deposit();
        assert!(!off.withdraw());
    }
}
