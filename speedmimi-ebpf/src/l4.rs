//! XDP L4 steering: packets to a service's VIP:port go to the backend the service's Maglev ring
//! names for the client's address, without userspace. An established flow keeps its backend
//! through a per-flow LRU table, whatever happens to the ring.
//!
//! Two modes per service: `nat` rewrites the destination to the backend and, on the way back, the
//! backend's replies to the VIP (both by this program); `dsr` wraps the packet in IPIP to the
//! backend, which answers the client itself. Anything the program does not understand (not
//! Ethernet/IPv4/TCP, IP options, fragments, short frames) is passed to the kernel unchanged.
//!
//! All header fields are read and written as raw memory (network byte order) and the Internet
//! checksum is updated on those raw values: one's-complement sums do not depend on byte order,
//! so no swapping is needed except for the TTL/protocol word, which is also handled raw.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action::XDP_PASS},
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    macros::xdp,
    programs::XdpContext,
};
use speedmimi_common::{
    hash,
    l4::{self, Counters, Flow, FlowKey, MAX_SERVICES, MODE_DSR, PROTO_TCP, Reverse, Service, ServiceKey},
    maglev::EMPTY,
};

use crate::maps::{L4_BACKENDS, L4_COUNTERS, L4_FLOWS, L4_REVERSE, L4_RING, L4_SERVICES};

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_IPIP: u8 = 4;
const AF_INET: u8 = 2;
const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

// Offsets from the start of the frame (Ethernet, then IPv4 without options, then TCP).
const ETH_TYPE: usize = 12;
const IP_VER_IHL: usize = ETH_LEN;
const IP_TOS: usize = ETH_LEN + 1;
const IP_TOT_LEN: usize = ETH_LEN + 2;
const IP_FRAG: usize = ETH_LEN + 6;
const IP_TTL: usize = ETH_LEN + 8;
const IP_PROTO: usize = ETH_LEN + 9;
const IP_CHECK: usize = ETH_LEN + 10;
const IP_SRC: usize = ETH_LEN + 12;
const IP_DST: usize = ETH_LEN + 16;
const TCP_SPORT: usize = ETH_LEN + IP_LEN;
const TCP_DPORT: usize = TCP_SPORT + 2;
const TCP_FLAGS: usize = TCP_SPORT + 13;
const TCP_CHECK: usize = TCP_SPORT + 16;
const HEADERS: usize = ETH_LEN + IP_LEN + TCP_LEN;

/// A frame whose Ethernet, IPv4 and TCP headers are all within bounds (checked once, so every
/// fixed offset below `HEADERS` is readable and writable).
struct Frame {
    start: usize,
}

impl Frame {
    #[inline(always)]
    fn new(ctx: &XdpContext, len: usize) -> Option<Frame> {
        let start = ctx.data();
        if start + len > ctx.data_end() {
            return None;
        }
        Some(Frame { start })
    }

    #[inline(always)]
    fn get<T: Copy>(&self, off: usize) -> T {
        // SAFETY: `new` checked that the headers lie within the packet; callers use offsets
        // of fields inside those headers.
        unsafe { core::ptr::read_unaligned((self.start + off) as *const T) }
    }

    #[inline(always)]
    fn set<T: Copy>(&self, off: usize, v: T) {
        // SAFETY: as for `get`; the packet is writable in XDP.
        unsafe { core::ptr::write_unaligned((self.start + off) as *mut T, v) }
    }
}

#[xdp]
pub fn l4_steer(ctx: XdpContext) -> u32 {
    steer(&ctx)
}

#[inline(always)]
fn steer(ctx: &XdpContext) -> u32 {
    let Some(f) = Frame::new(ctx, HEADERS) else { return XDP_PASS };
    if f.get::<u16>(ETH_TYPE) != ETH_P_IP.to_be()
        || f.get::<u8>(IP_VER_IHL) != 0x45
        || f.get::<u8>(IP_PROTO) != PROTO_TCP
        // More-fragments set or a fragment offset: only whole datagrams are steered.
        || f.get::<u16>(IP_FRAG) & 0x3fffu16.to_be() != 0
        || f.get::<u8>(IP_TTL) <= 1
    {
        return XDP_PASS;
    }
    let key = FlowKey { src: f.get(IP_SRC), dst: f.get(IP_DST), sport: f.get(TCP_SPORT), dport: f.get(TCP_DPORT) };
    let service_key = ServiceKey { addr: key.dst, port: key.dport, proto: PROTO_TCP, _pad: 0 };
    // SAFETY: map values are plain data, copied out at once.
    if let Some(service) = unsafe { L4_SERVICES.get(&service_key) }.copied() {
        return to_backend(ctx, &f, &key, &service);
    }
    // SAFETY: as above.
    if let Some(rev) = unsafe { L4_REVERSE.get(&key) }.copied() {
        return to_client(ctx, &f, &key, &rev);
    }
    XDP_PASS
}

/// A client packet for a service: find its backend, then rewrite or encapsulate it.
#[inline(always)]
fn to_backend(ctx: &XdpContext, f: &Frame, key: &FlowKey, service: &Service) -> u32 {
    let flags = f.get::<u8>(TCP_FLAGS);
    let rst = flags & TCP_RST != 0;
    // A connection's first packet takes its backend from the ring even when the table still
    // remembers its 4-tuple: closed flows stay until the LRU evicts them, and a reused tuple
    // must not follow a backend that has since left (Katran does the same).
    let known = if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        None
    } else {
        // SAFETY: plain data, copied out.
        unsafe { L4_FLOWS.get(key) }.copied()
    };
    let flow = match known {
        Some(flow) => flow,
        None => {
            let Some(flow) = pick(service, key.src) else { return XDP_PASS };
            if !rst {
                let _ = L4_FLOWS.insert(key, &flow, 0);
                if service.mode != MODE_DSR {
                    let back = FlowKey { src: flow.addr, dst: key.src, sport: flow.port, dport: key.sport };
                    let rev = Reverse { vip: key.dst, vport: key.dport, _pad: 0, slot: flow.slot };
                    let _ = L4_REVERSE.insert(&back, &rev, 0);
                }
            }
            count(flow.slot, |c| c.new_flows += 1);
            flow
        }
    };
    if rst {
        forget(key, &FlowKey { src: flow.addr, dst: key.src, sport: flow.port, dport: key.sport });
    }
    let ip_len = u16::from_be(f.get(IP_TOT_LEN)) as u64;
    count(flow.slot, |c| {
        c.packets += 1;
        c.bytes += ip_len;
    });
    if service.mode == MODE_DSR {
        return encapsulate(ctx, f.get(IP_TOS), ip_len as u16, service.encap_src, flow.addr);
    }
    rewrite_addr(f, IP_DST, flow.addr);
    rewrite_port(f, TCP_DPORT, flow.port);
    forward(ctx, f, flow.addr)
}

/// A NAT reply from a backend: make it come from the VIP again.
#[inline(always)]
fn to_client(ctx: &XdpContext, f: &Frame, key: &FlowKey, rev: &Reverse) -> u32 {
    if f.get::<u8>(TCP_FLAGS) & TCP_RST != 0 {
        forget(&FlowKey { src: key.dst, dst: rev.vip, sport: key.dport, dport: rev.vport }, key);
    }
    let ip_len = u16::from_be(f.get(IP_TOT_LEN)) as u64;
    count(rev.slot, |c| {
        c.reply_packets += 1;
        c.reply_bytes += ip_len;
    });
    rewrite_addr(f, IP_SRC, rev.vip);
    rewrite_port(f, TCP_SPORT, rev.vport);
    forward(ctx, f, key.dst)
}

/// A reset ends the flow: both directions are forgotten (the RST itself still goes through).
#[inline(always)]
fn forget(client_side: &FlowKey, backend_side: &FlowKey) {
    let _ = L4_FLOWS.remove(client_side);
    let _ = L4_REVERSE.remove(backend_side);
}

/// The backend the service's ring names for a client address, or None when the ring is empty.
#[inline(always)]
fn pick(service: &Service, client: u32) -> Option<Flow> {
    if service.index >= MAX_SERVICES {
        return None;
    }
    let h = hash::client_v4(u32::from_be(client));
    let slot = *L4_RING.get(l4::ring_index(service.index, h))?;
    if slot == EMPTY {
        return None;
    }
    let b = *L4_BACKENDS.get(slot)?;
    if b.addr == 0 {
        return None;
    }
    Some(Flow { addr: b.addr, port: b.port, _pad: 0, slot })
}

#[inline(always)]
fn count(slot: u32, add: impl FnOnce(&mut Counters)) {
    if let Some(c) = L4_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU value: only this CPU writes it, and XDP runs without preemption.
        add(unsafe { &mut *c });
    }
}

/// Replaces a 4-byte address, updating the IP and TCP (pseudo-header) checksums.
#[inline(always)]
fn rewrite_addr(f: &Frame, off: usize, to: u32) {
    let from: u32 = f.get(off);
    f.set(off, to);
    f.set(IP_CHECK, csum_replace4(f.get(IP_CHECK), from, to));
    f.set(TCP_CHECK, csum_replace4(f.get(TCP_CHECK), from, to));
}

/// Replaces a TCP port, updating the TCP checksum.
#[inline(always)]
fn rewrite_port(f: &Frame, off: usize, to: u16) {
    let from: u16 = f.get(off);
    f.set(off, to);
    f.set(TCP_CHECK, csum_replace2(f.get(TCP_CHECK), from, to));
}

/// Routes a rewritten packet: with a known next hop, decrement the TTL, set the MACs and
/// redirect; otherwise let the kernel forward it (it resolves neighbours and sends ICMP).
#[inline(always)]
fn forward(ctx: &XdpContext, f: &Frame, dst: u32) -> u32 {
    let Some(fib) = next_hop(ctx, f.get(IP_TOS), f.get(IP_SRC), dst, u16::from_be(f.get(IP_TOT_LEN))) else {
        return XDP_PASS;
    };
    let ttl_word: u16 = f.get(IP_TTL);
    // The TTL is the first byte of the word in memory, whatever the host order.
    let mut bytes = ttl_word.to_ne_bytes();
    bytes[0] -= 1;
    let new_word = u16::from_ne_bytes(bytes);
    f.set(IP_TTL, new_word);
    f.set(IP_CHECK, csum_replace2(f.get(IP_CHECK), ttl_word, new_word));
    send(f, &fib)
}

/// The route to `dst` with the next hop's MAC, or None when the kernel should forward the
/// packet itself (no neighbour entry yet, not forwardable, or no route).
#[inline(always)]
fn next_hop(ctx: &XdpContext, tos: u8, src: u32, dst: u32, tot_len: u16) -> Option<FibParams> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid value.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = PROTO_TCP;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_2.tos = tos;
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: fib is a valid, initialised bpf_fib_lookup of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut fib, size_of::<FibParams>() as i32, 0) };
    (rc == BPF_FIB_LKUP_RET_SUCCESS as i64).then_some(fib)
}

/// Sets the frame's MACs for the next hop and redirects it out of the hop's interface.
#[inline(always)]
fn send(f: &Frame, fib: &FibParams) -> u32 {
    f.set(0, fib.dmac);
    f.set(6, fib.smac);
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(fib.ifindex, 0) as u32 }
}

/// DSR: prepends an outer IPv4 header (protocol 4, IPIP) addressed to the backend and sends it
/// there; the inner packet (`tos`, `inner_len` from its header) is untouched.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, tos: u8, inner_len: u16, src: u32, backend: u32) -> u32 {
    // SAFETY: ctx is the program's context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IP_LEN as i32)) } != 0 {
        return XDP_PASS;
    }
    let Some(f) = Frame::new(ctx, ETH_LEN + IP_LEN + IP_LEN) else { return XDP_PASS };
    f.set(ETH_TYPE, ETH_P_IP.to_be());
    let outer_len = inner_len + IP_LEN as u16;
    let hdr: [u16; 10] = [
        u16::from_ne_bytes([0x45, tos]),
        outer_len.to_be(),
        0,
        0,
        u16::from_ne_bytes([64, IPPROTO_IPIP]),
        0,
        src as u16,
        (src >> 16) as u16,
        backend as u16,
        (backend >> 16) as u16,
    ];
    // `src`/`backend` are raw network-order values; splitting their native representation into
    // halves keeps each half's bytes in memory order on a little-endian host.
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += hdr[i] as u32;
        f.set(ETH_LEN + 2 * i, hdr[i]);
        i += 1;
    }
    f.set(ETH_LEN + 10, !fold(sum));
    match next_hop(ctx, tos, src, backend, outer_len) {
        Some(fib) => send(&f, &fib),
        // The kernel routes the encapsulated packet (and resolves the neighbour) itself.
        None => XDP_PASS,
    }
}

/// The backend side of DSR where the kernel has no IPIP module: strips an outer IPv4 header of
/// protocol 4 so the stack sees the client's packet to the VIP. Everything else passes as is.
#[xdp]
pub fn l4_decap(ctx: XdpContext) -> u32 {
    let Some(f) = Frame::new(&ctx, ETH_LEN + IP_LEN + IP_LEN) else { return XDP_PASS };
    if f.get::<u16>(ETH_TYPE) != ETH_P_IP.to_be()
        || f.get::<u8>(IP_VER_IHL) != 0x45
        || f.get::<u8>(IP_PROTO) != IPPROTO_IPIP
        || f.get::<u16>(IP_FRAG) & 0x3fffu16.to_be() != 0
        || f.get::<u8>(ETH_LEN + IP_LEN) >> 4 != 4
    {
        return XDP_PASS;
    }
    // Move the Ethernet header onto the outer IP header, then drop what is in front of it.
    let macs: [u8; 12] = f.get(0);
    f.set(IP_LEN, macs);
    f.set(IP_LEN + ETH_TYPE, ETH_P_IP.to_be());
    // SAFETY: ctx is the program's context; the frame is longer than the bytes dropped.
    unsafe { bpf_xdp_adjust_head(ctx.ctx, IP_LEN as i32) };
    XDP_PASS
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624 incremental update: HC' = ~(~HC + ~m + m').
#[inline(always)]
fn csum_replace2(check: u16, from: u16, to: u16) -> u16 {
    !fold((!check) as u32 + (!from) as u32 + to as u32)
}

#[inline(always)]
fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let s = (!check) as u32 + ((!from) & 0xffff) + ((!from) >> 16) + (to & 0xffff) + (to >> 16);
    !fold(s)
}
