//! A backend's standing with its upstream beyond health checks: outlier ejection (failures in a
//! row take it out for a while, longer each time) and slow start (a backend that comes in takes
//! a share that ramps from 10% to full). Both are clocked in `now_ms`; the settings are the
//! upstream's (`upstreams.<name>`), copied in on every rebuild.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use super::now_ms;
use crate::config::UpstreamSection;

/// Longest ejection, in base times.
const MAX_MULTIPLIER: u32 = 10;
/// The share a ramping backend starts with.
const RAMP_FLOOR: f64 = 0.1;

#[derive(Default)]
pub struct Standing {
    /// `upstreams.<name>` as numbers: slow start and ejection base (ms), failures that eject
    /// (0 = never), and the most of the upstream ejected at once (%).
    slow_start_ms: AtomicU64,
    base_ms: AtomicU64,
    consecutive: AtomicU32,
    max_percent: AtomicU32,
    /// Failures in a row (5xx answers, connect failures, resets).
    failures: AtomicU32,
    /// Ejected until then (`now_ms`); 0 = never ejected.
    ejected_until: AtomicU64,
    /// Ejections in a row: the next lasts one base time more.
    ejections: AtomicU32,
    ejections_total: AtomicU64,
    /// The ramp starts then (`now_ms`, may lie ahead while the backend is out); 0 = no ramp.
    ramp_from: AtomicU64,
}

/// What a failure did.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Kept,
    /// Ejected for this long (ms), the n-th time in a row.
    Ejected {
        ms: u64,
        nth: u32,
    },
    /// Would be ejected, but the upstream has its most ejected already.
    Spared,
}

impl Standing {
    pub fn configure(&self, u: &UpstreamSection) {
        self.slow_start_ms.store(u.slow_start.get().as_millis() as u64, Relaxed);
        let o = &u.outlier_ejection;
        self.base_ms.store(o.base_time.get().as_millis() as u64, Relaxed);
        self.consecutive.store(o.consecutive_failures, Relaxed);
        self.max_percent.store(o.max_ejected_percent, Relaxed);
    }

    pub fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Relaxed);
        until != 0 && now_ms() < until
    }

    /// Ejections so far, and how long the current one still lasts (ms; 0 = not ejected).
    pub fn ejections(&self) -> (u64, u64) {
        let left = self.ejected_until.load(Relaxed).saturating_sub(now_ms());
        (self.ejections_total.load(Relaxed), left)
    }

    /// A success ends a run of failures; a backend back for a whole base time since its last
    /// ejection starts again from one base time.
    pub fn success(&self) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        if self.ejections.load(Relaxed) != 0 {
            let until = self.ejected_until.load(Relaxed);
            if now_ms() > until + self.base_ms.load(Relaxed) {
                self.ejections.store(0, Relaxed);
            }
        }
    }

    /// One more failure; ejects when the run is long enough and `ejected_peers` (of `peers`,
    /// this backend included) leave room.
    pub fn failure(&self, peers: usize, ejected_peers: impl FnOnce() -> usize) -> Verdict {
        let need = self.consecutive.load(Relaxed);
        let n = self.failures.fetch_add(1, Relaxed) + 1;
        if need == 0 || n < need || self.ejected() {
            return Verdict::Kept;
        }
        let allowed = peers * self.max_percent.load(Relaxed) as usize / 100;
        if ejected_peers() >= allowed {
            return Verdict::Spared;
        }
        let nth = (self.ejections.load(Relaxed) + 1).min(MAX_MULTIPLIER);
        let ms = self.base_ms.load(Relaxed) * nth as u64;
        let until = now_ms() + ms;
        self.ejections.store(nth, Relaxed);
        self.ejections_total.fetch_add(1, Relaxed);
        self.ejected_until.store(until, Relaxed);
        self.failures.store(0, Relaxed);
        self.ramp_after(until);
        Verdict::Ejected { ms, nth }
    }

    /// The backend comes in (again) at `at_ms`: its share ramps from then, if slow start is on.
    pub fn ramp_after(&self, at_ms: u64) {
        if self.slow_start_ms.load(Relaxed) != 0 {
            self.ramp_from.store(at_ms.max(1), Relaxed);
        }
    }

    /// The share of its traffic the backend takes now, in (0, 1]: below 1 only while ramping.
    pub fn share(&self) -> f64 {
        match self.ramp_from.load(Relaxed) {
            0 => 1.0,
            _ => self.share_at(now_ms()),
        }
    }

    fn share_at(&self, now: u64) -> f64 {
        let from = self.ramp_from.load(Relaxed);
        if from == 0 {
            return 1.0;
        }
        let span = self.slow_start_ms.load(Relaxed);
        let elapsed = now.saturating_sub(from);
        if span == 0 || elapsed >= span {
            return 1.0;
        }
        (elapsed as f64 / span as f64).max(RAMP_FLOOR)
    }

    /// Whether a pick whose draw is `draw` (uniform in [0, 1)) may go to this backend: always
    /// unless ramping.
    /// `draw` is called only while ramping (picks of backends that are not pay nothing for it).
    pub fn admits(&self, draw: impl FnOnce() -> f64) -> bool {
        self.ramp_from.load(Relaxed) == 0 || draw() < self.share()
    }

    #[cfg(test)]
    fn admits_at(&self, draw: f64, now: u64) -> bool {
        draw < self.share_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, UpstreamSection};

    fn standing(consecutive: u32, slow_start_s: u64) -> Standing {
        let mut u = UpstreamSection::default();
        u.outlier_ejection.consecutive_failures = consecutive;
        u.outlier_ejection.base_time = Dur::secs(30);
        u.slow_start = Dur::secs(slow_start_s);
        let s = Standing::default();
        s.configure(&u);
        s
    }

    #[test]
    fn failures_in_a_row_eject_for_longer_each_time_within_the_share() {
        let s = standing(3, 0);
        assert_eq!(s.failure(4, || 0), Verdict::Kept);
        s.success();
        assert_eq!(s.failure(4, || 0), Verdict::Kept);
        assert_eq!(s.failure(4, || 0), Verdict::Kept);
        assert_eq!(s.failure(4, || 0), Verdict::Ejected { ms: 30_000, nth: 1 });
        assert!(s.ejected());
        // Back (as if the ejection had ended) and failing again: twice as long.
        std::thread::sleep(std::time::Duration::from_millis(2));
        s.ejected_until.store(1, Relaxed);
        assert!(!s.ejected());
        for _ in 0..2 {
            assert_eq!(s.failure(4, || 0), Verdict::Kept);
        }
        assert_eq!(s.failure(4, || 0), Verdict::Ejected { ms: 60_000, nth: 2 });
        let full = standing(1, 0);
        assert_eq!(full.failure(4, || 2), Verdict::Spared, "50% of 4 are out already");
        assert_eq!(standing(1, 0).failure(1, || 0), Verdict::Spared, "the only backend stays");
        assert_eq!(standing(0, 0).failure(4, || 0), Verdict::Kept, "0 = off");
    }

    #[test]
    fn a_ramp_admits_a_growing_share_and_keeps_whom_it_admitted() {
        let s = standing(0, 10);
        assert!(s.admits(|| 0.99), "no ramp: everything");
        s.ramp_after(now_ms());
        assert!((s.share() - RAMP_FLOOR).abs() < 0.01);
        assert!(s.admits(|| 0.05) && !s.admits(|| 0.5));
        let later = s.ramp_from.load(Relaxed) + 6_000;
        assert!((s.share_at(later) - 0.6).abs() < 0.01, "{}", s.share_at(later));
        assert!(s.admits_at(0.05, later) && s.admits_at(0.5, later) && !s.admits_at(0.7, later));
        assert_eq!(s.share_at(later + 4_000), 1.0);
        let off = standing(0, 0);
        off.ramp_after(now_ms());
        assert_eq!(off.share(), 1.0, "slow start off: no ramp");
    }
}
