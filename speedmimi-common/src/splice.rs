//! Maps of the sk_skb splicing program: the SOCKHASH of spliced sockets, the kernel's per-socket
//! state (where bytes go, how many went, whether the flow is paused), and userspace's per-socket
//! flow-control limits. Kernel-written and userspace-written fields live in different maps, so
//! neither side's whole-value update can overwrite the other's counters.

/// SOCKHASH of spliced sockets, keyed by socket cookie (`u64`).
pub const SOCKS: &str = "SPLICE_SOCKS";
/// SOCKHASH without programs that holds a socket's psock while the socket leaves [`SOCKS`]
/// (keyed by socket cookie): its queued bytes stay readable and sendable, and the verdict stops.
pub const HOLD: &str = "SPLICE_HOLD";
/// HashMap socket cookie -> [`Peer`] (written by the kernel after userspace creates it).
pub const PEERS: &str = "SPLICE_PEERS";
/// HashMap socket cookie -> [`Control`] (written by userspace only).
pub const CONTROL: &str = "SPLICE_CONTROL";
/// Per-CPU HashMap backend slot (`u32`) -> [`Counters`] (written by the kernel).
pub const COUNTERS: &str = "SPLICE_COUNTERS";
/// Backends counted at once.
pub const BACKENDS: u32 = 16_384;
/// Capacity of the maps: sockets, i.e. two per spliced flow.
pub const CAPACITY: u32 = 131_072;

/// A spliced socket's kernel-side state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Peer {
    /// Cookie of the socket whose egress receives this socket's bytes (its SOCKHASH key).
    pub peer_cookie: u64,
    /// Bytes redirected to the peer's egress in the kernel.
    pub redirected_bytes: u64,
    /// Bytes passed to this socket's own receive queue (for userspace to copy) while paused.
    pub passed_bytes: u64,
    /// 1 while the kernel passes instead of redirecting: set by the kernel when the budget is
    /// spent (or a redirect fails); cleared by the kernel once userspace has consumed every
    /// passed byte and the budget allows again, so bytes never overtake each other.
    pub paused: u32,
    /// Redirects that failed (peer gone from the SOCKHASH) and fell back to passing.
    pub fallback_skbs: u32,
    /// Which backend the flow belongs to (the key of [`COUNTERS`]).
    pub backend_slot: u32,
    /// 1 when this is the client's socket (its bytes go to the backend), 0 for the backend's.
    pub to_backend: u32,
    /// TCP sequence number just past the last byte the verdict took (valid once `seq_known`).
    pub next_seq: u32,
    /// 1 once the verdict has seen a first segment and `next_seq` holds.
    pub seq_known: u32,
    /// Already-taken bytes cut from the head of overlapping segments (see the verdict program).
    pub trimmed_bytes: u64,
    /// 1 when an overlap could not be cut: the flow can no longer be kept exact and must be
    /// reset by userspace (its skb was passed whole so that userspace wakes up).
    pub broken: u32,
    /// Segments that overlapped bytes already taken.
    pub overlaps: u32,
    /// 1 once the verdict has seen the socket's FIN (a segment whose sequence space is one more
    /// than its bytes), written after the bytes before it were counted: from then on the counts
    /// above are final, even though TCP marks the socket read-closed before the verdict runs.
    pub fin_seen: u32,
    /// Keeps the size a multiple of 8 without implicit padding.
    pub _pad: u32,
}

/// Bytes the kernel moved for one backend's spliced flows (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Counters {
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    /// Bytes cut from the head of segments that overlapped bytes already moved (the kernel would
    /// otherwise have forwarded them twice).
    pub overlap_bytes_cut: u64,
}

/// Userspace's flow control for one spliced socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Control {
    /// Redirect only while `redirected_bytes` stays at or below this: userspace sets it to
    /// (bytes the peer's receiver acknowledged) − (bytes userspace copied) + budget, so what sits
    /// in kernel queues towards the peer is bounded by the budget. 0 = never redirect (copy mode).
    pub limit: u64,
    /// Passed bytes userspace has read and written to the peer.
    pub consumed: u64,
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, no padding holes, valid for every bit pattern.
unsafe impl aya::Pod for Peer {}

#[cfg(feature = "user")]
// SAFETY: as for `Peer`.
unsafe impl aya::Pod for Control {}

#[cfg(feature = "user")]
// SAFETY: as for `Peer`.
unsafe impl aya::Pod for Counters {}
