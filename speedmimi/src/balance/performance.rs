//! `performance` (`performance_least_connections_weight`): two random choices, compared by
//! expected wait. Two backends are drawn at random in proportion to weight, and the one with the
//! lower cost gets the request:
//!
//!   cost = peak-EWMA latency × (in flight + 1) / (weight × reported-load factor)
//!
//! Random pairs keep equal backends sharing load at any concurrency (no herd on the single best
//! score); the latency is a peak-EWMA (`backend::latency`), which turns against a slow or
//! stalling backend at once and forgives it with time; the factor falls with the CPU, memory and
//! load the backend reports. A backend with no latency sample yet takes its rival's estimate, so
//! a new backend is tried on equal terms. Costs within `TIE` of each other are noise, not
//! health (two equal backends never measure exactly equal): the first choice, drawn in
//! proportion to weight, then wins, so equal backends share load by weight even one request at
//! a time.
//!
//! One exception to the cost: a backend whose latency is over `SLOWER` times its rival's loses
//! outright, however many requests the rival holds. For this the latency is the lower of the
//! peak-EWMA and the typical one (`PeakEwma::typical`), so that one slow moment of a fast
//! backend (a scheduling blip on a busy host) does not make a slow backend its equal for the
//! seconds its peak takes to decay. In-flight counts arbitrate between backends of comparable
//! speed; they say nothing of a backend that is slow with no queue at all (a slow disk, a slow
//! dependency), and counting them let such a backend take requests whenever its rivals held a
//! few times more than it, each of which then waited its full slow latency (issue 15's shape
//! (b): 7.9% of requests to a 4× slower origin, p99 = its 40 ms). A rival that really is
//! overloaded shows it in its own latency first (a queue lengthens every answer), and once
//! within `SLOWER` the cost decides again, so load still spills over. A lapsed estimate
//! (`backend::latency`) still brings the slow backend a probe now and then: one request, since
//! the rule applies again as soon as that request waits.

use std::{sync::atomic::Ordering::Relaxed, time::Instant};

use super::{Backends, Balancer, below};
use crate::backend::Backend;

/// Random draws for each of the two choices before falling back to a scan.
const DRAWS: usize = 4;
/// Costs closer than this ratio count as equal.
const TIE: f64 = 1.5;
/// Latencies below this (µs) count as equal: differences of a few milliseconds (a connect, a
/// scheduling blip on a busy host) are noise, not health; slower backends are told apart.
const LATENCY_FLOOR_US: f64 = 2000.0;
/// A backend slower than its rival by more than this ratio loses whatever the in-flight counts.
const SLOWER: f64 = 2.0;

pub struct Performance {
    backends: Backends,
    /// Running sums of the weights at build time (weights change only through a rebuild).
    cumulative: Vec<u64>,
}

impl Performance {
    pub fn new(backends: Backends) -> Self {
        let mut sum = 0;
        let cumulative = backends
            .iter()
            .map(|b| {
                sum += b.weight.load(Relaxed).max(1) as u64;
                sum
            })
            .collect();
        Performance { backends, cumulative }
    }

    /// A backend drawn in proportion to weight that `accept` takes, other than `not`.
    fn draw(&self, not: Option<usize>, accept: &mut dyn FnMut(&Backend) -> bool) -> Option<usize> {
        let total = *self.cumulative.last()?;
        for _ in 0..DRAWS {
            let r = below(total);
            let i = self.cumulative.partition_point(|&c| c <= r);
            if Some(i) != not && accept(&self.backends[i]) {
                return Some(i);
            }
        }
        // Few backends eligible: the first eligible one from a random place.
        let n = self.backends.len();
        let start = below(n as u64) as usize;
        (0..n).map(|k| (start + k) % n).find(|&i| Some(i) != not && accept(&self.backends[i]))
    }
}

/// The estimated wait at `b`, given the latency estimate to use for it.
fn cost(b: &Backend, latency_us: f64) -> f64 {
    let load = b.inflight.load(Relaxed) as f64 + 1.0;
    let capacity = b.weight.load(Relaxed).max(1) as f64 * b.report_factor();
    latency_us * load / capacity
}

impl Balancer for Performance {
    fn pick(&self, _client_hash: u64, accept: &mut dyn FnMut(&Backend) -> bool) -> Option<usize> {
        let first = self.draw(None, accept)?;
        let Some(second) = self.draw(Some(first), accept) else { return Some(first) };
        let (a, b) = (&self.backends[first], &self.backends[second]);
        let now = Instant::now();
        let (ea, eb) = (a.latency.estimate(now), b.latency.estimate(now));
        if let (Some(x), Some(y), Some(tx), Some(ty)) = (ea, eb, a.latency.typical(now), b.latency.typical(now)) {
            let (x, y) = (x.min(tx).max(LATENCY_FLOOR_US), y.min(ty).max(LATENCY_FLOOR_US));
            if x > y * SLOWER {
                return Some(second);
            }
            if y > x * SLOWER {
                return Some(first);
            }
        }
        let (la, lb) = match (ea, eb) {
            (Some(x), Some(y)) => (x, y),
            (Some(x), None) => (x, x),
            (None, Some(y)) => (y, y),
            (None, None) => (0.0, 0.0),
        };
        let (ca, cb) = (cost(a, la.max(LATENCY_FLOOR_US)), cost(b, lb.max(LATENCY_FLOOR_US)));
        // Even: the first choice, which was drawn in proportion to weight.
        Some(if ca.max(cb) < ca.min(cb) * TIE || ca < cb { first } else { second })
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc, time::Duration};

    use super::*;
    use crate::config::BackendSection;

    fn backends(latencies_ms: &[u64]) -> Backends {
        let now = Instant::now();
        let list: Vec<Arc<Backend>> = latencies_ms
            .iter()
            .enumerate()
            .map(|(i, &ms)| {
                let yaml = format!("id: b{i}\nhost: 127.0.0.1\nport: {}\n", i + 1);
                let conf: BackendSection = serde_yaml::from_str(&yaml).unwrap();
                let b = Backend::new("up", &conf, SocketAddr::from(([127, 0, 0, 1], i as u16 + 1)));
                b.latency.observe(Duration::from_millis(ms), now);
                Arc::new(b)
            })
            .collect();
        list.into()
    }

    /// Picks per backend out of `n`.
    fn shares(p: &Performance, n: usize) -> Vec<usize> {
        let mut count = vec![0; p.backends.len()];
        for _ in 0..n {
            count[p.pick(0, &mut |_| true).unwrap()] += 1;
        }
        count
    }

    /// Picks of b2 (40 ms) out of 3,000 while b0 and b1 (10 ms) hold 20 requests each; `b0_blip`:
    /// b0 answered once in that many ms just now.
    fn slow_picks_with_busy_rivals(b0_blip: Option<u64>) -> usize {
        let list = backends(&[10, 10, 40]);
        if let Some(ms) = b0_blip {
            list[0].latency.observe(Duration::from_millis(ms), Instant::now());
        }
        list[0].inflight.store(20, Relaxed);
        list[1].inflight.store(20, Relaxed);
        shares(&Performance::new(list), 3000)[2]
    }

    #[test]
    fn a_backend_over_twice_as_slow_loses_however_busy_its_rivals_are() {
        assert_eq!(slow_picks_with_busy_rivals(None), 0, "the 4× slower backend got requests");
    }

    #[test]
    fn one_slow_moment_of_a_fast_backend_does_not_make_a_slow_one_its_equal() {
        // A 25 ms blip: b0's peak-EWMA is 25 ms for seconds, within 2× of b2's 40 ms.
        assert_eq!(slow_picks_with_busy_rivals(Some(25)), 0, "the 4× slower backend got requests");
    }

    #[test]
    fn in_flight_counts_decide_between_backends_of_comparable_speed() {
        // 15 ms is within 2× of 10 ms: the idle slower one beats the busy faster ones.
        let list = backends(&[10, 10, 15]);
        list[0].inflight.store(20, Relaxed);
        list[1].inflight.store(20, Relaxed);
        let p = Performance::new(list);
        let s = shares(&p, 3000);
        // Every pair that includes b2 (two in three) goes to it.
        assert!(s[2] > 1800, "{s:?}");
        // Equal and idle: shared.
        let p = Performance::new(backends(&[10, 10, 10]));
        let s = shares(&p, 3000);
        assert!(s.iter().all(|&c| (800..1200).contains(&c)), "{s:?}");
    }
}
