//! `weight`: nginx's smooth weighted round robin. The sequence of one whole cycle is computed
//! once from the weights, so picking is an atomic increment and an index, and the shares
//! follow the weights exactly over each cycle.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::{Backends, Balancer};
use crate::backend::Backend;

/// Longest cycle kept; larger weight sums are scaled down (shares stay within 1e-4).
const MAX_CYCLE: u64 = 10_000;

pub struct SmoothWeighted {
    backends: Backends,
    cycle: Vec<u32>,
    next: AtomicUsize,
}

impl SmoothWeighted {
    pub fn new(backends: Backends) -> Self {
        let weights: Vec<u64> = backends.iter().map(|b| b.weight.load(Relaxed) as u64).collect();
        let cycle = smooth_cycle(&weights);
        SmoothWeighted { backends, cycle, next: AtomicUsize::new(0) }
    }
}

/// nginx's algorithm run for one cycle: each step every backend gains its weight, the richest
/// is chosen and pays the total.
fn smooth_cycle(weights: &[u64]) -> Vec<u32> {
    let g = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
    if g == 0 {
        return Vec::new();
    }
    let mut w: Vec<u64> = weights.iter().map(|&x| x / g).collect();
    let sum: u64 = w.iter().sum();
    if sum > MAX_CYCLE {
        w = w.iter().map(|&x| if x == 0 { 0 } else { (x * MAX_CYCLE / sum).max(1) }).collect();
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Balancer for SmoothWeighted {
    fn pick(&self, _client_hash: u64, accept: &mut dyn FnMut(&Backend) -> bool) -> Option<usize> {
        let len = self.cycle.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed);
        // An ineligible backend's turn passes to the next in the cycle, which keeps the
        // others' relative shares.
        (0..len).map(|k| self.cycle[(start + k) % len] as usize).find(|&i| accept(&self.backends[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_is_smooth_and_exact() {
        // nginx's documented example: weights 5,1,1 give a a b a c a a.
        assert_eq!(smooth_cycle(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        let c = smooth_cycle(&[100, 200, 300]);
        assert_eq!(c.len(), 6);
        assert_eq!(c.iter().filter(|&&i| i == 2).count(), 3);
        assert!(smooth_cycle(&[0, 0]).is_empty());
        assert_eq!(smooth_cycle(&[7, 0]), vec![0]);
    }
}
