//! Every map of the kernel programs, named by the constants of `speedmimi-common`.

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use speedmimi_common::{
    l4::{
        Backend, Counters, DEFAULT_FLOWS, Flow, FlowKey, MAX_BACKENDS, MAX_SERVICES, RING_SLOTS, Reverse, Service,
        ServiceKey,
    },
    splice,
};

/// Spliced sockets by socket cookie; the verdict program redirects into it.
#[map(name = "SPLICE_SOCKS")]
pub static SPLICE_SOCKS: SockHash<u64> = SockHash::with_max_entries(splice::CAPACITY, 0);

/// Spliced sockets leaving the kernel path, by socket cookie. No program is attached to it: a
/// socket in it keeps its psock (and the bytes queued there) after it leaves `SPLICE_SOCKS`, whose
/// verdict then no longer runs for it.
#[map(name = "SPLICE_HOLD")]
pub static SPLICE_HOLD: SockHash<u64> = SockHash::with_max_entries(splice::CAPACITY, 0);

/// Socket cookie -> where its bytes go, how many went, whether paused (kernel-written).
#[map(name = "SPLICE_PEERS")]
pub static SPLICE_PEERS: HashMap<u64, splice::Peer> = HashMap::with_max_entries(splice::CAPACITY, 0);

/// Socket cookie -> flow-control limit and consumed count (userspace-written).
#[map(name = "SPLICE_CONTROL")]
pub static SPLICE_CONTROL: HashMap<u64, splice::Control> = HashMap::with_max_entries(splice::CAPACITY, 0);

/// Backend slot -> bytes moved in the kernel, per CPU (no atomics on the hot path).
#[map(name = "SPLICE_COUNTERS")]
pub static SPLICE_COUNTERS: PerCpuHashMap<u32, splice::Counters> = PerCpuHashMap::with_max_entries(splice::BACKENDS, 0);

/// (VIP, port, protocol) -> how the service is steered (userspace-written).
#[map(name = "L4_SERVICES")]
pub static L4_SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// The services' Maglev rings of backend slots, `TABLE_SIZE` entries each (userspace-written).
#[map(name = "L4_RING")]
pub static L4_RING: Array<u32> = Array::with_max_entries(RING_SLOTS, 0);

/// Backend slot -> address and port (userspace-written).
#[map(name = "L4_BACKENDS")]
pub static L4_BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Client flow -> its backend; per-CPU LRU lists (kernel-written; sized by the daemon at load).
#[map(name = "L4_FLOWS")]
pub static L4_FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_FLOWS, BPF_F_NO_COMMON_LRU);

/// NAT reply flow (backend -> client) -> the VIP:port it came in on (kernel-written).
#[map(name = "L4_REVERSE")]
pub static L4_REVERSE: LruHashMap<FlowKey, Reverse> = LruHashMap::with_max_entries(DEFAULT_FLOWS, BPF_F_NO_COMMON_LRU);

/// Backend slot -> what was steered to it, per CPU.
#[map(name = "L4_COUNTERS")]
pub static L4_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
