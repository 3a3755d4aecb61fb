//! `least_connections` (fewest in flight) and `least_connections_weight` (fewest in flight per
//! unit of weight). Ties are common (at low concurrency every backend has none in flight) and
//! are broken at random in proportion to weight (equally without weights), so sequential
//! traffic follows the weights instead of going to one backend, as a strict minimum would do.

use std::sync::atomic::Ordering::Relaxed;

use super::{Backends, Balancer, below};
use crate::backend::Backend;

pub struct LeastConnections {
    backends: Backends,
    weighted: bool,
}

impl LeastConnections {
    pub fn new(backends: Backends, weighted: bool) -> Self {
        LeastConnections { backends, weighted }
    }
}

impl Balancer for LeastConnections {
    fn pick(&self, _client_hash: u64, accept: &mut dyn FnMut(&Backend) -> bool) -> Option<usize> {
        // The best so far: its index, in flight, weight; and the weight of all tied with it.
        let mut best: Option<(usize, u64, u64)> = None;
        let mut tied_weight = 0u64;
        for (i, b) in self.backends.iter().enumerate() {
            if !accept(b) {
                continue;
            }
            let load = b.inflight.load(Relaxed) as u64;
            let weight = if self.weighted { b.weight.load(Relaxed).max(1) as u64 } else { 1 };
            let order = match best {
                None => std::cmp::Ordering::Less,
                // load / weight compared without division.
                Some((_, l, w)) => (load * w).cmp(&(l * weight)),
            };
            match order {
                std::cmp::Ordering::Less => {
                    best = Some((i, load, weight));
                    tied_weight = weight;
                }
                std::cmp::Ordering::Equal => {
                    // Weighted reservoir sampling: each tied backend ends up chosen with
                    // probability weight / tied weight.
                    tied_weight += weight;
                    if below(tied_weight) < weight {
                        best = Some((i, load, weight));
                    }
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        best.map(|(i, _, _)| i)
    }
}
