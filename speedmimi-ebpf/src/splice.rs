//! The sk_skb stream verdict: moves each spliced socket's incoming bytes to its peer's egress,
//! within a byte budget userspace sets, and otherwise passes them to the socket's own receive
//! queue, where TCP's window throttles the sender and userspace copies them on.
//!
//! Ordering across the switch: once paused, every skb is passed until userspace has consumed
//! all passed bytes (`Control::consumed == Peer::passed_bytes`), so a redirected skb never
//! overtakes a passed one. Kernel traps (KERNEL-NOTES): a bare FIN arrives as a zero-length skb
//! and must not be redirected; a redirect whose target is gone returns SK_DROP, so we pass instead.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::stream_verdict,
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;

use crate::maps::{SPLICE_CONTROL, SPLICE_COUNTERS, SPLICE_PEERS, SPLICE_SOCKS};
use speedmimi_common::splice::Counters;

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    try_splice_verdict(&ctx)
}

#[inline(always)]
fn try_splice_verdict(ctx: &SkBuffContext) -> u32 {
    let len = ctx.len() as u64;
    if len == 0 {
        // A bare FIN: TCP has recorded it already; redirecting it would break the peer.
        return SK_DROP;
    }
    // SAFETY: the context pointer is the skb the kernel handed to this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(peer) = SPLICE_PEERS.get_ptr_mut(&cookie) else {
        return SK_PASS;
    };
    // SAFETY: map values stay valid for the program's run; this socket's verdicts are
    // serialised by its lock, so no other kernel writer races on this entry.
    let peer = unsafe { &mut *peer };
    // SAFETY: as above; userspace replaces the value whole, never partially.
    let (limit, consumed) = match unsafe { SPLICE_CONTROL.get(&cookie) } {
        Some(c) => (c.limit, c.consumed),
        None => (u64::MAX, peer.passed_bytes),
    };
    let within = peer.redirected_bytes + len <= limit;
    if peer.paused != 0 {
        if !(within && consumed == peer.passed_bytes) {
            peer.passed_bytes += len;
            return SK_PASS;
        }
        // Everything passed has been copied on and the budget allows: redirect again.
        peer.paused = 0;
    } else if !within {
        peer.paused = 1;
        peer.passed_bytes += len;
        return SK_PASS;
    }
    let mut target = peer.peer_cookie;
    if SPLICE_SOCKS.redirect_skb(ctx, &mut target, 0) as u32 == SK_PASS {
        peer.redirected_bytes += len;
        count(peer.backend_slot, peer.to_backend != 0, len);
        SK_PASS
    } else {
        peer.fallback_skbs += 1;
        peer.paused = 1;
        peer.passed_bytes += len;
        warn!(ctx, "splice: peer {} of socket {} missing, {} bytes passed", target, cookie, len);
        SK_PASS
    }
}

/// Adds redirected bytes to the backend's per-CPU counters (created on first use).
#[inline(always)]
fn count(slot: u32, to_backend: bool, len: u64) {
    let c = match SPLICE_COUNTERS.get_ptr_mut(&slot) {
        Some(c) => c,
        None => {
            let _ = SPLICE_COUNTERS.insert(&slot, &Counters::default(), 0);
            match SPLICE_COUNTERS.get_ptr_mut(&slot) {
                Some(c) => c,
                None => return,
            }
        }
    };
    // SAFETY: a per-CPU value: only this CPU writes it, and we run with preemption disabled.
    let c = unsafe { &mut *c };
    if to_backend {
        c.bytes_to_backend += len;
    } else {
        c.bytes_to_client += len;
    }
}
