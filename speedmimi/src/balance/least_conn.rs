//! The least-connections family: `least_connections` (fewest in flight),
//! `least_connections_weight` ((in flight + 1) / weight) and `performance`
//! ((in flight + 1) / (weight × health score)). Ties rotate so equal backends share load.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::{Backends, Balancer};
use crate::backend::Backend;

/// What a backend's load is divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Score {
    Connections,
    PerWeight,
    /// Weight scaled by the backend's performance report and by its latency relative to the
    /// fastest backend of the upstream.
    Performance,
}

pub struct LeastConnections {
    backends: Backends,
    score: Score,
    next: AtomicUsize,
}

impl LeastConnections {
    pub fn new(backends: Backends, score: Score) -> Self {
        LeastConnections { backends, score, next: AtomicUsize::new(0) }
    }

    /// The denominator of a backend's load.
    fn capacity(&self, b: &Backend, fastest_us: u64) -> f64 {
        match self.score {
            Score::Connections => 1.0,
            Score::PerWeight => b.weight.load(Relaxed) as f64,
            Score::Performance => {
                let latency = match (fastest_us, b.latency_ewma_us()) {
                    (0, _) | (_, 0) => 1.0,
                    // +1 ms smoothing: sub-millisecond differences are noise, not health.
                    (f, own) => (f + 1000) as f64 / (own + 1000) as f64,
                };
                b.weight.load(Relaxed) as f64 * b.report_factor() * latency
            }
        }
    }
}

impl Balancer for LeastConnections {
    fn pick(&self, _client_hash: u64, accept: &mut dyn FnMut(&Backend) -> bool) -> Option<usize> {
        let n = self.backends.len();
        let fastest_us = if self.score == Score::Performance {
            self.backends.iter().map(|b| b.latency_ewma_us()).filter(|&l| l > 0).min().unwrap_or(0)
        } else {
            0
        };
        let start = self.next.fetch_add(1, Relaxed);
        let mut best: Option<(usize, f64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let b = &self.backends[i];
            if !accept(b) {
                continue;
            }
            let load = (b.inflight.load(Relaxed) as f64 + 1.0) / self.capacity(b, fastest_us);
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }
}
