//! Balancers: each orders an upstream's backends its own way and returns the first one the
//! caller's `accept` takes (policy here, eligibility in the proxy). Selectors are built from an
//! immutable list of backends and published in a snapshot, so picking takes no lock.

mod ip_hash;
mod least_conn;
mod round_robin;
mod weighted;

use std::sync::Arc;

pub use ip_hash::IpHash;
pub use least_conn::{LeastConnections, Score};
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
}

/// The selector for `algorithm` over an upstream's backends (and, for `ip_hash`, the Maglev
/// places of its removed backends, see `state::Upstream::ghosts`).
pub fn build(algorithm: Algorithm, backends: &Backends, ghosts: &Arc<[Member]>) -> Arc<dyn Balancer> {
    let backends = backends.clone();
    match algorithm {
        Algorithm::RoundRobin => Arc::new(RoundRobin::new(backends)),
        Algorithm::Weight => Arc::new(SmoothWeighted::new(backends)),
        Algorithm::LeastConnections => Arc::new(LeastConnections::new(backends, Score::Connections)),
        Algorithm::LeastConnectionsWeight => Arc::new(LeastConnections::new(backends, Score::PerWeight)),
        Algorithm::PerformanceLeastConnectionsWeight => Arc::new(LeastConnections::new(backends, Score::Performance)),
        Algorithm::IpHash => Arc::new(IpHash::new(backends, ghosts.clone())),
    }
}
