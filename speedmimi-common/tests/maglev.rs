//! Maglev properties the balancer and the XDP program rely on: weights shape the table,
//! and a backend leaving moves only its own clients.

use speedmimi_common::{
    hash,
    maglev::{self, Cursor, EMPTY, Member, TABLE_SIZE},
};

fn members(n: usize, weight: impl Fn(usize) -> u32) -> Vec<Member> {
    (0..n).map(|i| Member::from_addr(format!("10.1.0.{}:8080", i + 1).as_bytes(), weight(i))).collect()
}

fn table(members: &[Member]) -> Vec<u32> {
    let mut cursors = vec![Cursor::default(); members.len()];
    let mut t = vec![0u32; TABLE_SIZE];
    maglev::build(members, &mut cursors, &mut t);
    t
}

fn owner_of(t: &[u32], client: u32) -> u32 {
    t[maglev::slot(hash::client_v4(client))]
}

fn clients() -> impl Iterator<Item = u32> {
    // 100k distinct addresses spread over 10.0.0.0/8 as real clients would be.
    (0..100_000u32).map(|i| 0x0a00_0000 | i.wrapping_mul(2_654_435_761) >> 8)
}

#[test]
fn every_slot_owned_and_shares_follow_weights() {
    let ms = members(3, |i| [100, 200, 700][i]);
    let t = table(&ms);
    assert!(t.iter().all(|&s| s != EMPTY));
    let mut counts = [0usize; 3];
    for &s in &t {
        counts[s as usize] += 1;
    }
    for (i, w) in [0.1, 0.2, 0.7].iter().enumerate() {
        let share = counts[i] as f64 / TABLE_SIZE as f64;
        assert!((share - w).abs() < 0.005, "backend {i}: share {share}, weight share {w}");
    }
}

#[test]
fn zero_weights_leave_table_empty() {
    let t = table(&members(2, |_| 0));
    assert!(t.iter().all(|&s| s == EMPTY));
}

#[test]
fn build_is_independent_of_member_order() {
    let ms = members(5, |i| 10 + i as u32);
    let mut rev = ms.clone();
    rev.reverse();
    let (a, b) = (table(&ms), table(&rev));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(ms[*x as usize], rev[*y as usize]);
    }
}

#[test]
fn down_backend_moves_only_its_clients() {
    let ms = members(10, |_| 100);
    let base = table(&ms);
    let down = 3u32;
    let mut only_up = ms.clone();
    only_up[down as usize].weight = 0;
    let fallback = table(&only_up);
    let mut t = base.clone();
    maglev::overlay(&mut t, &fallback, |i| i != down);

    let mut moved = 0;
    for c in clients() {
        let (before, after) = (owner_of(&base, c), owner_of(&t, c));
        assert_ne!(after, down);
        if before != after {
            assert_eq!(before, down, "client {c:#x} of an up backend moved");
            moved += 1;
        }
    }
    let share = moved as f64 / 100_000.0;
    assert!(share <= 0.12, "moved {share}");
    assert!(share > 0.05, "the down backend had clients: {share}");
}

#[test]
fn rebuild_without_a_backend_moves_little() {
    // A plain rebuild over 9 of 10 backends (what a node that never knew the 10th builds)
    // moves the removed backend's clients and only a sliver of the others'.
    let ms = members(10, |_| 100);
    let base = table(&ms);
    let fewer: Vec<Member> = ms.iter().copied().filter(|m| *m != ms[3]).collect();
    let t = table(&fewer);
    let mut moved = 0;
    for c in clients() {
        if ms[owner_of(&base, c) as usize] != fewer[owner_of(&t, c) as usize] {
            moved += 1;
        }
    }
    let share = moved as f64 / 100_000.0;
    assert!(share <= 0.12, "moved {share}");
}
