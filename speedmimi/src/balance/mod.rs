//! Balancers: each orders an upstream's backends its own way and returns the first one the
//! caller's `accept` takes (policy here, eligibility in the proxy). Selectors are built from an
//! immutable list of backends and published in a snapshot, so picking takes no lock.

mod ip_hash;
mod least_conn;
mod performance;
mod round_robin;
mod weighted;

use std::sync::Arc;

pub use ip_hash::{IpHash, ramp_step};
pub use least_conn::LeastConnections;
pub use performance::Performance;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

use speedmimi_common::maglev::Member;

use crate::{backend::Backend, config::Algorithm};

/// The backends of one upstream, shared by all its selectors.
pub type Backends = Arc<[Arc<Backend>]>;

pub trait Balancer: Send + Sync {
    /// Index (into the upstream's backends) of the backend to use, or None when `accept`
    /// refuses every backend. `client_hash` is the client-IP hash (used by `ip_hash` only).
    fn pick(&self, client_hash: u64, accept: &mut dyn FnMut(&Backend) -> bool) -> Option<usize>;

    /// Picks follow the client (`ip_hash`): the balancer ramps a backend in its slow start itself
    /// (by ring slot), and `Route::pick` leaves slow start to it.
    fn sticky(&self) -> bool {
        false
    }
}

/// A fast thread-local random number (xorshift64*), for the balancers' random choices.
pub fn random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let here = &t as *const _ as u64;
            (t.as_nanos() as u64 ^ here.rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// `x`'s top 53 bits as a number in [0, 1).
pub fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniform random index below `n` (n > 0).
pub fn below(n: u64) -> u64 {
    ((random() as u128 * n as u128) >> 64) as u64
}

/// The selector for `algorithm` over an upstream's backends (and, for `ip_hash`, the Maglev
/// places of its removed backends, see `state::Upstream::ghosts`).
pub fn build(algorithm: Algorithm, backends: &Backends, ghosts: &Arc<[Member]>) -> Arc<dyn Balancer> {
    let backends = backends.clone();
    match algorithm {
        Algorithm::RoundRobin => Arc::new(RoundRobin::new(backends)),
        Algorithm::Weight => Arc::new(SmoothWeighted::new(backends)),
        Algorithm::LeastConnections => Arc::new(LeastConnections::new(backends, false)),
        Algorithm::LeastConnectionsWeight => Arc::new(LeastConnections::new(backends, true)),
        Algorithm::PerformanceLeastConnectionsWeight => Arc::new(Performance::new(backends)),
        Algorithm::IpHash => Arc::new(IpHash::new(backends, ghosts.clone())),
    }
}
