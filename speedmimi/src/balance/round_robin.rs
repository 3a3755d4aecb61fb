//! `round_robin`: plain rotation over the eligible backends.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::{Backends, Balancer};
use crate::backend::Backend;

pub struct RoundRobin {
    backends: Backends,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(backends: Backends) -> Self {
        RoundRobin { backends, next: AtomicUsize::new(0) }
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, _client_hash: u64, accept: &mut dyn FnMut(&Backend) -> bool) -> Option<usize> {
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Relaxed);
        (0..n).map(|i| (start + i) % n).find(|&i| accept(&self.backends[i]))
    }
}
