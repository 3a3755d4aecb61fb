//! Every map of the kernel programs, named by the constants of `speedmimi-common`.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuHashMap, SockHash},
};
use speedmimi_common::splice;

/// Spliced sockets by socket cookie; the verdict program redirects into it.
#[map(name = "SPLICE_SOCKS")]
pub static SPLICE_SOCKS: SockHash<u64> = SockHash::with_max_entries(splice::CAPACITY, 0);

/// Socket cookie -> where its bytes go, how many went, whether paused (kernel-written).
#[map(name = "SPLICE_PEERS")]
pub static SPLICE_PEERS: HashMap<u64, splice::Peer> = HashMap::with_max_entries(splice::CAPACITY, 0);

/// Socket cookie -> flow-control limit and consumed count (userspace-written).
#[map(name = "SPLICE_CONTROL")]
pub static SPLICE_CONTROL: HashMap<u64, splice::Control> = HashMap::with_max_entries(splice::CAPACITY, 0);

/// Backend slot -> bytes moved in the kernel, per CPU (no atomics on the hot path).
#[map(name = "SPLICE_COUNTERS")]
pub static SPLICE_COUNTERS: PerCpuHashMap<u32, splice::Counters> = PerCpuHashMap::with_max_entries(splice::BACKENDS, 0);
