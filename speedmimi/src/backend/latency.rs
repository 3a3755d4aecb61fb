//! Peak-EWMA of a backend's response-head latency, as Finagle and Linkerd keep it: a sample
//! above the average replaces it at once, one below pulls it down with time constant τ, and
//! with no samples the estimate decays towards zero, so a backend that was slow once is tried
//! again. An estimate that has stood unsampled for a while (τ/100 at first) with nothing
//! waiting lapses: the balancer then tries the backend on equal terms, and its answer starts a
//! new average. A backend is so never shut out for long by one slow answer; one whose answer
//! after a lapse is as slow as before waits twice as long for the next (up to τ/10), so a
//! backend that is really slow is tried rarely.
//! While requests wait on the backend and none has answered for longer than the estimate, that
//! wait is the estimate: a backend that stalls looks slow before any of its stalled requests
//! comes back. Lossy under races, by design (a lost sample is noise).
//!
//! Beside the peak-EWMA a plain EWMA (time constant τ/10) keeps the typical latency, which one
//! peak barely moves: the balancer tells a backend that is slow from one that had a slow
//! moment by it (`typical`).

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use super::epoch;

#[derive(Default)]
pub struct PeakEwma {
    /// The average in µs, as f64 bits; 0.0 = no sample yet.
    avg: AtomicU64,
    /// The plain EWMA in µs, as f64 bits; 0.0 = no sample yet.
    typical: AtomicU64,
    /// When `avg` was last set (µs since `epoch`).
    stamp: AtomicU64,
    /// Requests waiting for their answer head.
    waiting: AtomicU32,
    /// When a waiting request last got its answer, or the first began waiting (µs).
    progress: AtomicU64,
    /// τ in µs.
    tau: AtomicU64,
    /// How long (µs) the estimate stands unsampled before it lapses; 0 = the shortest.
    stands: AtomicU64,
}

/// µs since the process's start (`backend::epoch`).
fn micros(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_micros() as u64
}

impl PeakEwma {
    pub fn set_decay(&self, tau: Duration) {
        self.tau.store(tau.as_micros().max(1) as u64, Relaxed);
    }

    fn tau(&self) -> f64 {
        match self.tau.load(Relaxed) {
            0 => 10e6,
            t => t as f64,
        }
    }

    /// How long the estimate stands unsampled now, in µs.
    fn stands(&self) -> f64 {
        match self.stands.load(Relaxed) {
            0 => self.tau() / 100.0,
            s => s as f64,
        }
    }

    /// A request starts waiting for its answer at `at`.
    pub fn begin(&self, at: Instant) {
        if self.waiting.fetch_add(1, Relaxed) == 0 {
            self.progress.store(micros(at), Relaxed);
        }
    }

    /// A request that `begin` counted stops waiting at `at` (answered or failed).
    pub fn end(&self, at: Instant) {
        self.waiting.fetch_sub(1, Relaxed);
        self.progress.store(micros(at), Relaxed);
    }

    /// One answer took `took`, seen at `at`.
    pub fn observe(&self, took: Duration, at: Instant) {
        let now = micros(at);
        let sample = (took.as_micros() as f64).max(1.0);
        let old = f64::from_bits(self.avg.load(Relaxed));
        let dt = now.saturating_sub(self.stamp.load(Relaxed)) as f64;
        let lapsed = old != 0.0 && dt >= self.stands();
        if lapsed {
            // As slow as before the lapse: the next lapse comes later.
            let next = if sample * 1.5 >= old { (self.stands() * 2.0).min(self.tau() / 10.0) } else { 0.0 };
            self.stands.store(next as u64, Relaxed);
        }
        let new = if old == 0.0 || sample > old || lapsed {
            sample
        } else {
            let w = (-dt / self.tau()).exp();
            old * w + sample * (1.0 - w)
        };
        self.avg.store(new.to_bits(), Relaxed);
        let typical = f64::from_bits(self.typical.load(Relaxed));
        let typical = if typical == 0.0 {
            sample
        } else {
            let w = (-dt * 10.0 / self.tau()).exp();
            typical * w + sample * (1.0 - w)
        };
        self.typical.store(typical.to_bits(), Relaxed);
        self.stamp.store(now, Relaxed);
    }

    /// The estimate at `at` in µs; None before the first sample (and no stall seen).
    pub fn estimate(&self, at: Instant) -> Option<f64> {
        let now = micros(at);
        let avg = f64::from_bits(self.avg.load(Relaxed));
        let dt = now.saturating_sub(self.stamp.load(Relaxed)) as f64;
        let decayed = (avg != 0.0).then(|| avg * (-dt / self.tau()).exp());
        if self.waiting.load(Relaxed) == 0 {
            return decayed.filter(|_| dt < self.stands());
        }
        // Waiting longer than the estimate: the wait is the better guess.
        let stalled = now.saturating_sub(self.progress.load(Relaxed)) as f64;
        match decayed {
            Some(d) => Some(d.max(stalled)),
            None => (stalled > 0.0).then_some(stalled),
        }
    }

    /// The typical latency at `at` in µs (the plain EWMA, not decayed), or the wait of requests
    /// waiting longer than it; None before the first sample.
    pub fn typical(&self, at: Instant) -> Option<f64> {
        let typical = f64::from_bits(self.typical.load(Relaxed));
        if typical == 0.0 {
            return None;
        }
        if self.waiting.load(Relaxed) == 0 {
            return Some(typical);
        }
        let stalled = micros(at).saturating_sub(self.progress.load(Relaxed)) as f64;
        Some(typical.max(stalled))
    }

    /// The plain average (µs, 0 = no sample), for the admin API.
    pub fn average_us(&self) -> u64 {
        f64::from_bits(self.avg.load(Relaxed)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_replace_at_once_and_lows_decay_with_tau() {
        let e = PeakEwma::default();
        e.set_decay(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(e.estimate(t0), None);
        e.observe(Duration::from_millis(2), t0);
        e.observe(Duration::from_millis(50), t0 + Duration::from_millis(1));
        let at = t0 + Duration::from_millis(1);
        assert!((e.estimate(at).unwrap() - 50_000.0).abs() < 1.0, "a peak replaces the average");
        // τ/200 later a 2 ms sample pulls it down a little.
        let later = at + Duration::from_millis(5);
        e.observe(Duration::from_millis(2), later);
        let v = e.estimate(later).unwrap();
        let w = (-0.005f64).exp();
        assert!((v - (50_000.0 * w + 2_000.0 * (1.0 - w))).abs() < 1.0, "{v}");
        // Without samples the estimate fades, and after τ/100 it lapses.
        let faded = e.estimate(later + Duration::from_millis(9)).unwrap();
        assert!(faded < v, "{faded}");
        let lapse = later + Duration::from_millis(10);
        assert_eq!(e.estimate(lapse), None);
        // A sample after that starts a new average; as slow as before, it stands twice as long.
        e.observe(Duration::from_millis(45), lapse);
        assert!((e.estimate(lapse).unwrap() - 45_000.0).abs() < 1.0);
        assert!(e.estimate(lapse + Duration::from_millis(15)).is_some());
        assert_eq!(e.estimate(lapse + Duration::from_millis(20)), None);
        // Fast after a lapse: back to the shortest.
        e.observe(Duration::from_millis(1), lapse + Duration::from_millis(20));
        assert_eq!(e.estimate(lapse + Duration::from_millis(30)), None);
    }

    #[test]
    fn the_typical_latency_shrugs_off_a_peak_and_follows_a_lasting_change() {
        let e = PeakEwma::default();
        e.set_decay(Duration::from_secs(10));
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        assert_eq!(e.typical(t0), None);
        for i in 0..1000 {
            e.observe(ms(10), t0 + ms(i));
        }
        let at = t0 + ms(1000);
        e.observe(ms(100), at);
        assert!((e.estimate(at).unwrap() - 100_000.0).abs() < 1.0, "the peak-EWMA takes the peak");
        assert!(e.typical(at).unwrap() < 10_200.0, "one peak: {:?}", e.typical(at));
        // Two seconds (2 × τ/10) of 30 ms answers: the typical latency has mostly followed.
        for i in 1..=2000 {
            e.observe(ms(30), at + ms(i));
        }
        assert!(e.typical(at + ms(2000)).unwrap() > 25_000.0, "{:?}", e.typical(at + ms(2000)));
    }

    #[test]
    fn a_wait_longer_than_the_estimate_is_the_estimate() {
        let e = PeakEwma::default();
        e.set_decay(Duration::from_secs(100));
        let t0 = Instant::now();
        e.observe(Duration::from_millis(1), t0);
        e.begin(t0);
        let v = e.estimate(t0 + Duration::from_millis(300)).unwrap();
        assert!(v >= 299_000.0, "stalled 300 ms: {v}");
        e.end(t0 + Duration::from_millis(300));
        assert!(e.estimate(t0 + Duration::from_millis(300)).unwrap() < 2_000.0, "not waiting: the average");
    }
}
