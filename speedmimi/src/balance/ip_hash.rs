//! `ip_hash`: the Maglev table of speedmimi-common over the upstream's backends, looked up with
//! the client-IP hash the XDP program uses too. A backend that is down or inactive hands its
//! slots to the owners they have in a table built without it; every other client stays put.
//!
//! Backends removed at runtime stay in the table as "ghosts" that are always down (see
//! `state::Upstream::ghosts`), so removing one moves only its own clients, as going down does.
//! The XDP program's rings are [`IpHash::effective`] tables, so both paths agree on every client.

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
        IpHash { table: build_table(&members), backends, ghosts, fallback: ArcSwapOption::empty() }
    }

    /// The table with every slot of a backend not `usable` (one flag per backend, in the
    /// upstream's order), and of every ghost, moved to its owner in the table without those:
    /// indexes into the upstream's backends, or `EMPTY`.
    pub fn effective(&self, usable: &[bool]) -> Vec<u32> {
        let down: Vec<bool> = usable.iter().map(|u| !u).collect();
        let fallback = self.fallback_for(down);
        let mut table = self.table.clone();
        let n = self.backends.len() as u32;
        maglev::overlay(&mut table, &fallback.table, |m| m < n && !fallback.down[m as usize]);
        table
    }

    fn fallback_for(&self, down: Vec<bool>) -> Arc<Fallback> {
        if let Some(f) = self.fallback.load_full()
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
        self.fallback.store(Some(f.clone()));
        f
    }
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
        let owner = self.table[slot];
        if owner != EMPTY
            && let Some(b) = self.backends.get(owner as usize)
            && accept(b)
        {
            return Some(owner as usize);
        }
        // The owner is down, inactive, full or excluded (retry): use the table without the
        // down backends, then walk on from this slot so the choice stays a function of the client.
        let down: Vec<bool> = self.backends.iter().map(|b| !b.is_up()).collect();
        let fallback = self.fallback_for(down);
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
