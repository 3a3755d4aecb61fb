//! The weighted Maglev table shared by the XDP program (a BPF array of this size) and the
//! userspace `ip_hash` balancer. Built once in userspace; the kernel only reads it.
//!
//! The fill follows the Maglev paper with Katran's weighting: backends take turns claiming
//! their next preferred free slot, and a backend's turns come in proportion to its weight.
//! The build is deterministic in the backends' identity hashes and weights, never in their
//! order of arrival or their ids, so every node with the same backends builds the same table.

use crate::hash;

/// Slots in a table: a prime, as Maglev requires, large enough that a backend's share
/// deviates from its weight by well under 1% with hundreds of backends.
pub const TABLE_SIZE: usize = 65_537;

/// Marks a slot no backend owns (only when no backend has a positive weight).
pub const EMPTY: u32 = u32::MAX;

/// Seeds of the two Maglev permutation hashes (offset and skip).
const OFFSET_SEED: u64 = 0x6d61_676c_6576_0001;
const SKIP_SEED: u64 = 0x6d61_676c_6576_0002;

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Identity hash of the backend's address (`hash::bytes(b"host:port", 0)`).
    pub id_hash: u64,
    /// Relative share of slots; 0 takes none.
    pub weight: u32,
}

impl Member {
    /// A member identified by its address text, e.g. `"10.0.0.5:8080"`.
    pub fn from_addr(addr: &[u8], weight: u32) -> Self {
        Member { id_hash: hash::bytes(addr, 0), weight }
    }
}

/// Per-member scratch state of one build (the caller owns it, so this stays allocation-free).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    member: u32,
    id_hash: u64,
    offset: u64,
    skip: u64,
    next: u64,
    credit: u64,
}

/// Fills `table` (length [`TABLE_SIZE`]) with indexes into `members`.
///
/// `cursors` must be at least as long as `members`. Members of weight 0 own no slot; if all
/// weights are 0 every slot is [`EMPTY`].
pub fn build(members: &[Member], cursors: &mut [Cursor], table: &mut [u32]) {
    assert!(table.len() == TABLE_SIZE, "maglev table must have TABLE_SIZE slots");
    assert!(cursors.len() >= members.len(), "one cursor per member");
    table.fill(EMPTY);
    let m = TABLE_SIZE as u64;
    let mut max_weight = 0u64;
    for (i, (c, b)) in cursors.iter_mut().zip(members).enumerate() {
        let s = b.id_hash;
        *c = Cursor {
            member: i as u32,
            id_hash: s,
            offset: hash::mix64(s ^ OFFSET_SEED) % m,
            skip: hash::mix64(s ^ SKIP_SEED) % (m - 1) + 1,
            next: 0,
            credit: 0,
        };
        max_weight = max_weight.max(b.weight as u64);
    }
    if max_weight == 0 {
        return;
    }
    // Turns go in identity-hash order, so the caller's order of members does not matter.
    let cursors = &mut cursors[..members.len()];
    cursors.sort_unstable_by_key(|c| (c.id_hash, c.member));
    let mut filled = 0usize;
    loop {
        for c in cursors.iter_mut() {
            c.credit += members[c.member as usize].weight as u64;
            while c.credit >= max_weight {
                c.credit -= max_weight;
                // Next preferred slot of this member that nobody owns yet.
                let mut slot = (c.offset + c.next * c.skip) % m;
                while table[slot as usize] != EMPTY {
                    c.next += 1;
                    slot = (c.offset + c.next * c.skip) % m;
                }
                table[slot as usize] = c.member;
                c.next += 1;
                filled += 1;
                if filled == TABLE_SIZE {
                    return;
                }
            }
        }
    }
}

/// Moves the slots of members that are not `eligible` to the owners they have in `fallback`
/// (a table built over the eligible members only, with indexes into the same `members`),
/// leaving every other slot where it is: a down backend's clients move, nobody else's do.
pub fn overlay(table: &mut [u32], fallback: &[u32], eligible: impl Fn(u32) -> bool) {
    for (slot, alt) in table.iter_mut().zip(fallback) {
        if *slot != EMPTY && !eligible(*slot) {
            *slot = *alt;
        }
    }
}

/// The slot a client hash selects.
#[inline(always)]
pub const fn slot(client_hash: u64) -> usize {
    (client_hash % TABLE_SIZE as u64) as usize
}
