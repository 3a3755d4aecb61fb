//! Maps of the XDP L4 steering program: which VIP:ports are services, each service's Maglev ring
//! (filled by userspace from [`crate::maglev`]), where each backend is, the per-flow tables that
//! keep an established flow on its backend, and per-backend counters.
//!
//! Addresses and ports are stored exactly as they sit in packets (network byte order), so the
//! program compares and copies them without swapping: build them with `u32::from_ne_bytes(octets)`
//! and `u16::to_be()`.

use crate::maglev::TABLE_SIZE;

/// HashMap [`ServiceKey`] -> [`Service`] (userspace-written).
pub const SERVICES: &str = "L4_SERVICES";
/// Array of `u32` backend slots: service `index` owns entries `index * TABLE_SIZE ..` (userspace-written).
pub const RING: &str = "L4_RING";
/// Array backend slot -> [`Backend`] (userspace-written).
pub const BACKENDS: &str = "L4_BACKENDS";
/// LRU HashMap [`FlowKey`] (client -> VIP) -> [`Flow`] (kernel-written).
pub const FLOWS: &str = "L4_FLOWS";
/// LRU HashMap [`FlowKey`] (backend -> client, NAT replies) -> [`Reverse`] (kernel-written).
pub const REVERSE: &str = "L4_REVERSE";
/// Per-CPU Array backend slot -> [`Counters`] (kernel-written).
pub const COUNTERS: &str = "L4_COUNTERS";

/// Services steered at once (the ring map holds `MAX_SERVICES * TABLE_SIZE` slots).
pub const MAX_SERVICES: u32 = 16;
/// Backend slots (the same slot numbers as the splice counters).
pub const MAX_BACKENDS: u32 = crate::splice::BACKENDS;
/// Flow-table entries the object declares; the daemon sizes the tables at load time.
pub const DEFAULT_FLOWS: u32 = 1 << 20;
/// Slots of the ring map.
pub const RING_SLOTS: u32 = MAX_SERVICES * TABLE_SIZE as u32;

/// `Service::mode`: rewrite the destination to the backend, and replies back to the VIP.
pub const MODE_NAT: u32 = 0;
/// `Service::mode`: IPIP-encapsulate to the backend, which answers the client directly.
pub const MODE_DSR: u32 = 1;

/// IP protocol number of TCP, the only one steered.
pub const PROTO_TCP: u8 = 6;

/// A steered address: VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceKey {
    /// IPv4 address in network byte order.
    pub addr: u32,
    /// Port in network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// How a service is steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Service {
    /// Which ring the service uses (`0..MAX_SERVICES`).
    pub index: u32,
    /// [`MODE_NAT`] or [`MODE_DSR`].
    pub mode: u32,
    /// DSR: source address of the outer IPIP header (network byte order).
    pub encap_src: u32,
}

/// Where a backend slot points.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Backend {
    /// IPv4 address in network byte order; 0 = slot unused.
    pub addr: u32,
    /// Port in network byte order (NAT rewrites to it; DSR requires it to equal the VIP's).
    pub port: u16,
    pub _pad: u16,
}

/// A TCP 4-tuple as it appears in a packet: source then destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
}

/// The backend an established flow stays on, copied so that it survives ring and backend changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Flow {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub slot: u32,
}

/// What a NAT reply's source is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Reverse {
    pub vip: u32,
    pub vport: u16,
    pub _pad: u16,
    pub slot: u32,
}

/// What the kernel steered for one backend (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Counters {
    /// Client packets and bytes (IP length) sent to the backend.
    pub packets: u64,
    pub bytes: u64,
    /// NAT replies rewritten back to the VIP.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows that got their backend from the ring (new flows and flows the LRU had evicted).
    pub new_flows: u64,
}

/// The ring slot of service `index` that a client hash selects.
#[inline(always)]
pub const fn ring_index(service: u32, client_hash: u64) -> u32 {
    service * TABLE_SIZE as u32 + crate::maglev::slot(client_hash) as u32
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `repr(C)`, explicit padding fields, valid for every bit pattern.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::Reverse {}
    unsafe impl aya::Pod for super::Counters {}
}
