//! The sk_skb stream verdict: moves each spliced socket's incoming bytes to its peer's egress,
//! within a byte budget userspace sets, and otherwise passes them to the socket's own receive
//! queue, where TCP's window throttles the sender and userspace copies them on.
//!
//! Ordering across the switch: once paused, every skb is passed until userspace has consumed
//! all passed bytes (`Control::consumed == Peer::passed_bytes`), so a redirected skb never
//! overtakes a passed one. Kernel traps (KERNEL-NOTES): a bare FIN arrives as a zero-length skb
//! and must not be redirected; a redirect whose target is gone returns SK_DROP, so we pass instead.
//! Found here: a segment overlapping bytes already received reaches the verdict whole, so its
//! head is cut (see [`new_bytes_only`]); and TCP reports read-closed before the verdict has run on
//! the segments before a FIN, so the verdict marks the FIN for userspace after counting them.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::stream_verdict,
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;

use crate::maps::{SPLICE_CONTROL, SPLICE_COUNTERS, SPLICE_HOLD, SPLICE_PEERS, SPLICE_SOCKS};
use speedmimi_common::splice::{self, Counters};

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    try_splice_verdict(&ctx)
}

#[inline(always)]
fn try_splice_verdict(ctx: &SkBuffContext) -> u32 {
    // SAFETY: the context pointer is the skb the kernel handed to this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(peer) = SPLICE_PEERS.get_ptr_mut(&cookie) else {
        return if ctx.len() == 0 { SK_DROP } else { SK_PASS };
    };
    // SAFETY: map values stay valid for the program's run; this socket's verdicts are
    // serialised by its lock, so no other kernel writer races on this entry.
    let peer = unsafe { &mut *peer };
    // cb[0] and cb[1] of an sk_skb context are the TCP control block's `seq` and `end_seq`; a
    // FIN takes one sequence number more than the segment's bytes.
    let fin = ctx.cb()[1].wrapping_sub(ctx.cb()[0]) != ctx.len();
    let verdict = if ctx.len() == 0 {
        // A bare FIN: TCP has recorded it already; redirecting it would break the peer.
        SK_DROP
    } else {
        move_bytes(ctx, cookie, peer)
    };
    if fin {
        // Last, so that userspace seeing it also sees the counts of every byte before the FIN.
        peer.fin_seen = 1;
    }
    verdict
}

/// Redirects the skb's new bytes to the peer within the budget, or passes them to userspace.
#[inline(always)]
fn move_bytes(ctx: &SkBuffContext, cookie: u64, peer: &mut splice::Peer) -> u32 {
    match new_bytes_only(ctx, peer) {
        Segment::New => {}
        Segment::Old => return SK_DROP,
        Segment::Uncut => {
            // Passed whole so that userspace wakes up, sees `broken` and resets the flow.
            peer.broken = 1;
            peer.paused = 1;
            peer.passed_bytes += ctx.len() as u64;
            return SK_PASS;
        }
    }
    let len = ctx.len() as u64;
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
    // A peer leaving the kernel path waits in the hold map, and its egress still takes bytes.
    let found = SPLICE_SOCKS.redirect_skb(ctx, &mut target, 0) as u32 == SK_PASS
        || SPLICE_HOLD.redirect_skb(ctx, &mut target, 0) as u32 == SK_PASS;
    if found {
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

/// The most a segment's head is cut by, in pieces the helper accepts (0xfff bytes each):
/// 64 pieces, 256 KiB, more than any segment this kernel receives (64 KiB without BIG TCP).
const TRIM_PIECES: u32 = 64;
const TRIM_PIECE: u32 = 0xfff;

/// Cuts from the skb's head the bytes this socket's verdict has already taken, so each byte
/// leaves once. The kernel hands whole receive-queue skbs to the verdict (`tcp_read_skb`), and
/// TCP can queue a segment that partly overlaps bytes already received without trimming it
/// (`tcp_recvmsg` skips such heads by sequence number; the verdict path does not): measured here
/// as duplicated 64 KiB segments under sustained load, more often under loss. `cb[0]` of an
/// sk_skb context is the TCP control block's `seq`; the skb's own bytes are counted from `len`
/// (`end_seq` would count a FIN).
#[inline(always)]
fn new_bytes_only(ctx: &SkBuffContext, peer: &mut splice::Peer) -> Segment {
    let seq = ctx.cb()[0];
    let end = seq.wrapping_add(ctx.len());
    if peer.seq_known == 0 {
        // The first segment after insertion: userspace read everything before it.
        peer.seq_known = 1;
        peer.next_seq = end;
        return Segment::New;
    }
    let overlap = peer.next_seq.wrapping_sub(seq) as i32;
    if overlap <= 0 {
        peer.next_seq = end;
        return Segment::New;
    }
    peer.overlaps += 1;
    if overlap as u32 >= ctx.len() {
        // Nothing new in it (TCP does not queue such segments): never forward it.
        peer.trimmed_bytes += ctx.len() as u64;
        count_cut(peer.backend_slot, ctx.len() as u64);
        return Segment::Old;
    }
    // Whole pieces first, then the rest: one path per iteration keeps verification linear.
    let mut left = overlap as u32;
    let mut i = 0;
    while left >= TRIM_PIECE {
        if i == TRIM_PIECES || ctx.adjust_room(-(TRIM_PIECE as i32), 0, 0).is_err() {
            return Segment::Uncut;
        }
        left -= TRIM_PIECE;
        i += 1;
    }
    if left > 0 && ctx.adjust_room(-(left as i32), 0, 0).is_err() {
        return Segment::Uncut;
    }
    peer.trimmed_bytes += overlap as u64;
    count_cut(peer.backend_slot, overlap as u64);
    peer.next_seq = end;
    Segment::New
}

/// What a segment holds once bytes already taken are cut from its head.
enum Segment {
    /// Only bytes not taken before (possibly after cutting).
    New,
    /// Only bytes taken before.
    Old,
    /// An overlap that could not be cut.
    Uncut,
}

/// Adds redirected bytes to the backend's per-CPU counters.
#[inline(always)]
fn count(slot: u32, to_backend: bool, len: u64) {
    if let Some(c) = counters(slot) {
        if to_backend {
            c.bytes_to_backend += len;
        } else {
            c.bytes_to_client += len;
        }
    }
}

/// Adds bytes cut from overlapping segments to the backend's per-CPU counters.
#[inline(always)]
fn count_cut(slot: u32, len: u64) {
    if let Some(c) = counters(slot) {
        c.overlap_bytes_cut += len;
    }
}

/// The backend's per-CPU counters, created on first use.
#[inline(always)]
fn counters(slot: u32) -> Option<&'static mut Counters> {
    let c = match SPLICE_COUNTERS.get_ptr_mut(&slot) {
        Some(c) => c,
        None => {
            let _ = SPLICE_COUNTERS.insert(&slot, &Counters::default(), 0);
            SPLICE_COUNTERS.get_ptr_mut(&slot)?
        }
    };
    // SAFETY: a per-CPU value: only this CPU writes it, and we run with preemption disabled.
    Some(unsafe { &mut *c })
}
