//! The only code that touches BPF. `Datapath` is what the rest of the daemon sees of the
//! kernel; `kernel::Kernel` implements it with aya, `Userspace` when eBPF is off or unavailable.

pub mod kernel;
mod neigh;
pub mod netlink;
mod steer;

use std::{os::fd::BorrowedFd, sync::Arc};

pub use speedmimi_common::splice::{Control, Counters, Peer};

use crate::config::{Config, EbpfMode};

/// A failed kernel operation: what was being done, and the error (aya's, kept as the source).
fn err(context: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> DatapathError {
    DatapathError::Ebpf { context: context.to_owned(), source: e.into() }
}

/// An error and its sources in one line, each source once (aya's errors name only the failed
/// call, e.g. "failed to create map `X`", and keep "Operation not permitted" in a source).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let s = source.to_string();
        if !text.contains(&s) {
            text = format!("{text}: {s}");
        }
        next = source.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this build has no eBPF object (build it with `cargo xtask build-ebpf`)")]
    NoObject,
    #[error(
        "loading eBPF needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; running as uid {uid} without {missing}"
    )]
    NotRoot { uid: u32, missing: String },
    #[error("eBPF: {context}: {}", chain(&**source))]
    Ebpf { context: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("XDP steering is not loaded in this datapath")]
    NoSteering,
    #[error("splicing is not available in this datapath")]
    NoSplice,
    #[error("l4 services need the eBPF datapath: {0}")]
    L4NeedsKernel(String),
}

/// Initial flow-control limits of a spliced pair, per direction (0 = never redirect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub to_backend: u64,
    pub to_client: u64,
}

/// The cookies of a spliced socket pair, which name its map entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplicedPair {
    pub a: u64,
    pub b: u64,
}

/// What the XDP program of one `l4:` service reads, in its own terms: made by `crate::steering`
/// from the routing policy, written by the datapath as is.
pub struct L4Plan<'a> {
    /// The service: its position in `l4:`.
    pub service: u32,
    /// Addresses of the backend slots the ring names.
    pub backends: &'a [(u32, std::net::SocketAddrV4)],
    /// The Maglev ring: for each of `maglev::TABLE_SIZE` slots, a backend slot (`maglev::EMPTY`:
    /// no backend usable).
    pub ring: &'a [u32],
}

/// What the kernel does for the proxy. Every method but `describe` defaults to what a datapath
/// without kernel programs answers (nothing spliced, nothing steered).
pub trait Datapath: Send + Sync {
    /// One line for the startup log.
    fn describe(&self) -> &'static str;

    /// Whether `splice` can work.
    fn can_splice(&self) -> bool {
        false
    }

    /// Makes the kernel move bytes arriving on `client` out of `upstream` and vice versa, each
    /// direction at first within its limit (see `splice::Control`), counting them for the
    /// backend in `backend_slot`.
    fn splice(
        &self,
        _client: BorrowedFd<'_>,
        _upstream: BorrowedFd<'_>,
        _limits: Limits,
        _backend_slot: u32,
    ) -> Result<SplicedPair, DatapathError> {
        Err(DatapathError::NoSplice)
    }

    /// Bytes the kernel moved for a backend's spliced flows (summed over CPUs).
    fn counters(&self, _backend_slot: u32) -> Option<Counters> {
        None
    }

    /// Sets a spliced socket's flow control.
    fn set_control(&self, _cookie: u64, _control: Control) -> Result<(), DatapathError> {
        Err(DatapathError::NoSplice)
    }

    /// A spliced socket's kernel-side state.
    fn peer(&self, _cookie: u64) -> Option<Peer> {
        None
    }

    /// Stops the verdict for one spliced socket without discarding what the kernel queued for it
    /// (bytes passed to it, bytes redirected to it and not yet sent): the socket moves from the
    /// splice map to a map without programs, where redirects still reach it. Its counters stay
    /// readable with `peer`; `unsplice` ends the rest once those queues are empty. The kernel
    /// holds only established sockets: a half-closed one stays in the splice map, its verdict
    /// running, until `unsplice`; false then.
    fn hold(&self, _socket: BorrowedFd<'_>, _cookie: u64) -> Result<bool, DatapathError> {
        Err(DatapathError::NoSplice)
    }

    /// Takes one socket out of the splice map without holding it: its verdict stops and its
    /// psock queues go with it (for a half-closed socket, once they are empty).
    fn release(&self, _cookie: u64) {}

    /// Stops splicing a pair and forgets its counters (idempotent).
    fn unsplice(&self, _pair: SplicedPair) -> Result<(), DatapathError> {
        Ok(())
    }

    /// Sockets currently in the splice map.
    fn spliced_sockets(&self) -> usize {
        0
    }

    /// Writes one `l4:` service's plan (see [`L4Plan`]): the entries that differ from what the
    /// kernel has; returns how many ring slots changed.
    fn write_l4(&self, _plan: &L4Plan<'_>) -> Result<usize, DatapathError> {
        Err(DatapathError::NoSteering)
    }

    /// Whether XDP steers `l4:` services.
    fn steers(&self) -> bool {
        false
    }

    /// What XDP steered to a backend (summed over CPUs); None when nothing is steered.
    fn l4_counters(&self, _backend_slot: u32) -> Option<speedmimi_common::l4::Counters> {
        None
    }
}

/// No kernel programs: everything runs in userspace.
pub struct Userspace;

impl Datapath for Userspace {
    fn describe(&self) -> &'static str {
        "userspace only (no eBPF)"
    }
}

/// The datapath `ebpf.enabled` asks for: `auto` falls back to userspace (logged once),
/// `true` makes a failure to load a startup error, and so do `l4:` services, which only the
/// kernel can steer.
pub fn start(config: &Config) -> Result<Arc<dyn Datapath>, DatapathError> {
    let conf = &config.file.ebpf;
    let services = &config.file.l4;
    let dp: Arc<dyn Datapath> = match conf.enabled {
        EbpfMode::False if !services.is_empty() => {
            return Err(DatapathError::L4NeedsKernel("ebpf.enabled is false".into()));
        }
        EbpfMode::False => Arc::new(Userspace),
        EbpfMode::True => Arc::new(kernel::Kernel::load(conf, services)?),
        EbpfMode::Auto => match kernel::Kernel::load(conf, services) {
            Ok(k) => Arc::new(k),
            Err(e) if !services.is_empty() => return Err(DatapathError::L4NeedsKernel(e.to_string())),
            Err(e) => {
                tracing::warn!(reason = %e, "eBPF unavailable; running the L7 path only");
                Arc::new(Userspace)
            }
        },
    };
    tracing::info!(datapath = dp.describe(), "datapath ready");
    Ok(dp)
}
