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
        let (la, lb) = match (a.latency.estimate(now), b.latency.estimate(now)) {
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
