//! The sk_skb stream verdict: moves each spliced socket's incoming bytes to its peer's egress.
//!
//! Kernel traps it handles (see KERNEL-NOTES): a bare FIN arrives as a zero-length skb and must
//! not be redirected; a redirect whose target is gone returns SK_DROP, so we pass instead and
//! the bytes wait in the socket's own queue for userspace.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::stream_verdict,
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;

use crate::maps::{SPLICE_PEERS, SPLICE_SOCKS};

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    try_splice_verdict(&ctx)
}

#[inline(always)]
fn try_splice_verdict(ctx: &SkBuffContext) -> u32 {
    let len = ctx.len();
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
    // serialised by its lock, so no other writer races on this entry.
    let peer = unsafe { &mut *peer };
    let mut target = peer.peer_cookie;
    if SPLICE_SOCKS.redirect_skb(ctx, &mut target, 0) as u32 == SK_PASS {
        peer.redirected_bytes += len as u64;
        SK_PASS
    } else {
        peer.fallback_skbs += 1;
        warn!(ctx, "splice: peer {} of socket {} missing, {} bytes kept", target, cookie, len);
        SK_PASS
    }
}
