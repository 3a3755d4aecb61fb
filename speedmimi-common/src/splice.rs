//! Maps of the sk_skb splicing program: the SOCKHASH holding spliced sockets and the peer
//! table telling the verdict program where each socket's bytes go.

/// SOCKHASH of spliced sockets, keyed by socket cookie (`u64`).
pub const SOCKS: &str = "SPLICE_SOCKS";
/// HashMap socket cookie -> [`Peer`].
pub const PEERS: &str = "SPLICE_PEERS";
/// Capacity of both maps: sockets, i.e. two per spliced flow.
pub const CAPACITY: u32 = 131_072;

/// Where a spliced socket's incoming bytes go, and how many have gone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Peer {
    /// Cookie of the socket whose egress receives this socket's bytes (its SOCKHASH key).
    pub peer_cookie: u64,
    /// Bytes the verdict program redirected from this socket (written only by the kernel,
    /// under the socket's lock). Userspace compares it with what the peer has sent before
    /// tearing a flow down, so nothing in flight is lost.
    pub redirected_bytes: u64,
    /// Redirects that failed and fell back to the socket's own receive queue.
    pub fallback_skbs: u32,
    /// Explicit padding: the layout is an ABI between kernel and userspace.
    pub _pad: u32,
}

#[cfg(feature = "user")]
// SAFETY: `Peer` is `repr(C)`, has no padding holes (explicit `_pad`) and is valid for every bit pattern.
unsafe impl aya::Pod for Peer {}
