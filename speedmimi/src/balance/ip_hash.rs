//! `ip_hash`: the Maglev table of speedmimi-common over the upstream's backends, looked up with
//! the client-IP hash the XDP program uses too. A backend that is down or inactive hands its
//! slots to the owners they have in a table built without it; every other client stays put.
//!
//! Backends removed at runtime stay in the table as "ghosts" that are always down (see
//! `state::Upstream::ghosts`), so removing one moves only its own clients, as going down does.
//! The XDP program's rings are [`IpHash::ramped`] tables, so both paths agree on every client.
//!
//! A backend in its slow start owns only some of its slots: those whose `slot_draw` is below its
//! share in tenths (`ramp_step`); the others go to their owners in the table without the ramping
//! backends. As the share grows, slots move to the backend one step at a time, each once.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use speedmimi_common::maglev::{self, Cursor, EMPTY, Member, TABLE_SIZE};

use super::{Backends, Balancer};
use crate::backend::Backend;

pub struct IpHash {
    backends: Backends,
    /// Removed backends still holding their places; indexes `backends.len()..` in the tables.
    ghosts: Arc<[Member]>,
    table: Vec<u32>,
    /// Table over the up backends, keyed by which backends were down when it was built.
    fallback: ArcSwapOption<Fallback>,
    /// The same without the ramping backends too, during slow starts.
    calm: ArcSwapOption<Fallback>,
}

struct Fallback {
    down: Vec<bool>,
    table: Vec<u32>,
}

impl IpHash {
    pub fn new(backends: Backends, ghosts: Arc<[Member]>) -> Self {
        let members: Vec<Member> = backends
            .iter()
            .map(|b| Member { weight: b.weight.load(std::sync::atomic::Ordering::Relaxed), ..b.maglev })
            .chain(ghosts.iter().copied())
            .collect();
        IpHash {
            table: build_table(&members),
            backends,
            ghosts,
            fallback: ArcSwapOption::empty(),
            calm: ArcSwapOption::empty(),
        }
    }

    /// The table with every slot of a backend not `usable` (one flag per backend, in the
    /// upstream's order), and of every ghost, moved to its owner in the table without those:
    /// indexes into the upstream's backends, or `EMPTY`.
    pub fn effective(&self, usable: &[bool]) -> Vec<u32> {
        self.effective_in(usable, &self.fallback)
    }

    fn effective_in(&self, usable: &[bool], cache: &ArcSwapOption<Fallback>) -> Vec<u32> {
        let down: Vec<bool> = usable.iter().map(|u| !u).collect();
        let fallback = self.fallback_for(down, cache);
        let mut table = self.table.clone();
        let n = self.backends.len() as u32;
        maglev::overlay(&mut table, &fallback.table, |m| m < n && !fallback.down[m as usize]);
        table
    }

    /// [`IpHash::effective`] during slow starts (`steps`: each backend's `ramp_step`, 1 when
    /// not ramping): a ramping backend's slot whose draw is not below its step goes to the
    /// slot's owner among the usable backends that are not ramping.
    pub fn ramped(&self, usable: &[bool], steps: &[f64]) -> Vec<u32> {
        let mut table = self.effective(usable);
        if steps.iter().all(|&s| s >= 1.0) {
            return table;
        }
        let steady: Vec<bool> = usable.iter().zip(steps).map(|(&u, &s)| u && s >= 1.0).collect();
        let without = self.effective_in(&steady, &self.calm);
        for (slot, owner) in table.iter_mut().enumerate() {
            if let Some(&step) = steps.get(*owner as usize)
                && slot_draw(slot) >= step
            {
                *owner = without[slot];
            }
        }
        table
    }

    /// The owner of one slot in the `ramped` table of the backends' present state.
    fn owner(&self, slot: usize) -> u32 {
        let first = self.table[slot];
        let ramp_of = |i: u32| self.backends.get(i as usize).map_or(1.0, |b| ramp_step(b.standing.share()));
        let usable = |i: u32| self.backends.get(i as usize).is_some_and(|b| b.is_up());
        let with = if first != EMPTY && usable(first) {
            first
        } else {
            let down: Vec<bool> = self.backends.iter().map(|b| !b.is_up()).collect();
            self.fallback_for(down, &self.fallback).table[slot]
        };
        if with == EMPTY || slot_draw(slot) < ramp_of(with) {
            return with;
        }
        if first != EMPTY && usable(first) && ramp_of(first) >= 1.0 {
            return first;
        }
        let down: Vec<bool> = self.backends.iter().map(|b| !b.is_up() || ramp_step(b.standing.share()) < 1.0).collect();
        self.fallback_for(down, &self.calm).table[slot]
    }

    fn fallback_for(&self, down: Vec<bool>, cache: &ArcSwapOption<Fallback>) -> Arc<Fallback> {
        if let Some(f) = cache.load_full()
            && f.down == down
        {
            return f;
        }
        let members: Vec<Member> = self
            .backends
            .iter()
            .zip(&down)
            .map(|(b, &d)| {
                let w = if d { 0 } else { b.weight.load(std::sync::atomic::Ordering::Relaxed) };
                Member { weight: w, ..b.maglev }
            })
            .chain(self.ghosts.iter().map(|g| Member { weight: 0, ..*g }))
            .collect();
        let f = Arc::new(Fallback { table: build_table(&members), down });
        cache.store(Some(f.clone()));
        f
    }
}

/// Where a slot falls in [0, 1) for slow start: a ramping backend owns those of its slots whose
/// draw is below its step (a fixed mix of the slot's index, the same in userspace and XDP rings).
pub fn slot_draw(slot: usize) -> f64 {
    let mut z = (slot as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    super::unit(z)
}

/// A slow start's share in whole tenths (at least one): rings change in ten steps.
pub fn ramp_step(share: f64) -> f64 {
    ((share * 10.0 + 1e-9).floor() / 10.0).clamp(0.1, 1.0)
}

fn build_table(members: &[Member]) -> Vec<u32> {
    let mut cursors = vec![Cursor::default(); members.len()];
    let mut table = vec![EMPTY; TABLE_SIZE];
    maglev::build(members, &mut cursors, &mut table);
    table
}

impl Balancer for IpHash {
    fn sticky(&self) -> bool {
        true
    }

    fn pick(&self, client_hash: u64, accept: &mut dyn FnMut(&Backend) -> bool) -> Option<usize> {
        let slot = maglev::slot(client_hash);
        let owner = self.owner(slot);
        if owner != EMPTY
            && let Some(b) = self.backends.get(owner as usize)
            && accept(b)
        {
            return Some(owner as usize);
        }
        // The owner is down, inactive, full or excluded (retry): use the table without the
        // down backends, then walk on from this slot so the choice stays a function of the client.
        let down: Vec<bool> = self.backends.iter().map(|b| !b.is_up()).collect();
        let fallback = self.fallback_for(down, &self.fallback);
        let mut tried = 0;
        for k in 0..TABLE_SIZE {
            let cand = fallback.table[(slot + k) % TABLE_SIZE];
            if cand == EMPTY {
                break;
            }
            if self.backends.get(cand as usize).is_some_and(|b| accept(b)) {
                return Some(cand as usize);
            }
            tried += 1;
            if tried > 4 * self.backends.len() + 16 {
                break;
            }
        }
        let n = self.backends.len();
        (0..n).map(|i| (slot + i) % n).find(|&i| accept(&self.backends[i]))
    }
}
