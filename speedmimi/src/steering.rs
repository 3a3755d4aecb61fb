//! XDP L4 steering, policy half: for each `l4:` service, which of its upstream's backends are
//! usable (up, with an IPv4 address the XDP program can forward to) and which backend owns each
//! Maglev ring slot: the `ip_hash` table of the upstream with the unusable backends' slots handed
//! on ([`IpHash::ramped`], which also gives a backend in its slow start a growing part of its slots), so the kernel and userspace pick the same backend for a client.
//! The result goes to the datapath as an [`L4Plan`] of slots and addresses; the datapath writes it
//! and knows nothing of upstreams or balancers.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
};

use speedmimi_common::maglev::EMPTY;

use crate::{
    backend::Backend,
    balance::{IpHash, ramp_step},
    config::L4Section,
    datapath::{Datapath, L4Plan},
    state::{Snapshot, SnapshotFollower, Upstream},
};

/// The rings of every `l4:` service, kept equal to their upstreams.
pub struct Steering {
    datapath: Arc<dyn Datapath>,
    rings: Mutex<Vec<Ring>>,
}

/// One service and what its ring was last made from.
struct Ring {
    name: String,
    vip: IpAddr,
    upstream: String,
    index: u32,
    source: Option<Source>,
    /// Ring slots each backend (by id) owns in the ring last written.
    owners: Vec<(String, usize)>,
}

/// What one service's ring gives each backend, as last written to the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct RingShare {
    pub service: String,
    pub upstream: String,
    /// Backend id and the fraction of the ring's slots it owns (0 for one out of the ring).
    pub owners: Vec<(String, f64)>,
}

/// The upstream a ring was computed from, its table, which backends were usable, and the
/// slow-start step each was at.
struct Source {
    upstream: Arc<Upstream>,
    table: Arc<IpHash>,
    usable: Vec<bool>,
    steps: Vec<f64>,
}

impl Steering {
    /// None when the datapath does not steer (no XDP program, or no `l4:` services).
    pub fn new(datapath: Arc<dyn Datapath>, services: &[L4Section]) -> Option<Arc<Steering>> {
        if !datapath.steers() || services.is_empty() {
            return None;
        }
        let rings = services
            .iter()
            .enumerate()
            .map(|(i, s)| Ring {
                name: s.name.clone(),
                vip: s.vip,
                upstream: s.upstream.clone(),
                index: i as u32,
                source: None,
                owners: Vec::new(),
            })
            .collect();
        Some(Arc::new(Steering { datapath, rings: Mutex::new(rings) }))
    }

    /// Brings every ring in line with a snapshot's upstreams.
    pub fn refresh(&self, snapshot: &Snapshot) {
        let mut rings = self.rings.lock().expect("rings lock");
        for ring in rings.iter_mut() {
            if let Some(upstream) = snapshot.upstreams.get(&ring.upstream) {
                self.update(ring, upstream);
            }
        }
    }

    /// Follows health changes (which make no snapshot) of the upstreams the rings were made
    /// from. Cheap when nothing changed, so it runs on a short timer.
    pub fn recheck(&self) {
        let mut rings = self.rings.lock().expect("rings lock");
        for ring in rings.iter_mut() {
            if let Some(source) = &ring.source {
                let upstream = source.upstream.clone();
                self.update(ring, &upstream);
            }
        }
    }

    /// The VIPs (IPv4) of the services whose ring, as last written to the kernel, has a backend:
    /// those this node can serve now (`announce`).
    pub fn servable(&self) -> BTreeSet<Ipv4Addr> {
        let rings = self.rings.lock().expect("rings lock");
        rings
            .iter()
            .filter(|r| r.owners.iter().any(|(_, n)| *n > 0))
            .filter_map(|r| match r.vip {
                IpAddr::V4(v) => Some(v),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// Each service's ring as last written: which backend owns what fraction of it.
    pub fn shares(&self) -> Vec<RingShare> {
        let rings = self.rings.lock().expect("rings lock");
        rings
            .iter()
            .map(|r| {
                let total = r.owners.iter().map(|(_, n)| n).sum::<usize>().max(1) as f64;
                RingShare {
                    service: r.name.clone(),
                    upstream: r.upstream.clone(),
                    owners: r.owners.iter().map(|(id, n)| (id.clone(), *n as f64 / total)).collect(),
                }
            })
            .collect()
    }

    fn update(&self, ring: &mut Ring, upstream: &Arc<Upstream>) {
        let addrs: Vec<Option<SocketAddrV4>> = upstream.backends.iter().map(|b| address(b)).collect();
        let usable: Vec<bool> = upstream.backends.iter().zip(&addrs).map(|(b, a)| a.is_some() && b.is_up()).collect();
        let steps: Vec<f64> = upstream.backends.iter().map(|b| ramp_step(b.standing.share())).collect();
        let table = match &ring.source {
            Some(s) if Arc::ptr_eq(&s.upstream, upstream) => {
                if s.usable == usable && s.steps == steps {
                    return;
                }
                s.table.clone()
            }
            _ => Arc::new(IpHash::new(upstream.backends.clone(), upstream.ghosts.clone())),
        };
        let mut backends = Vec::with_capacity(addrs.len());
        for (b, a) in upstream.backends.iter().zip(&addrs) {
            match a {
                Some(a) => backends.push((b.slot, *a)),
                None => tracing::warn!(backend = %b.id, host = %b.conf.load().host,
                    "not an IPv4 address; left out of XDP rings"),
            }
        }
        let ring_slots = ring_of(upstream, &table, &usable, &steps);
        let plan = L4Plan { service: ring.index, backends: &backends, ring: &ring_slots };
        match self.datapath.write_l4(&plan) {
            Ok(changed) => {
                if changed > 0 {
                    tracing::info!(service = %ring.name, changed, "XDP ring updated");
                }
                ring.owners = upstream
                    .backends
                    .iter()
                    .map(|b| (b.id.clone(), ring_slots.iter().filter(|&&o| o == b.slot).count()))
                    .collect();
                ring.source = Some(Source { upstream: upstream.clone(), table, usable, steps });
            }
            Err(e) => tracing::error!(service = %ring.name, error = %e, "cannot update the XDP ring"),
        }
    }
}

impl SnapshotFollower for Steering {
    fn follow(&self, snapshot: &Snapshot) {
        self.refresh(snapshot);
    }
}

/// A backend as the XDP program addresses it, if it can (an IPv4 literal host).
fn address(b: &Backend) -> Option<SocketAddrV4> {
    let conf = b.conf.load();
    let ip: Ipv4Addr = conf.host.parse().ok()?;
    Some(SocketAddrV4::new(ip, conf.port))
}

/// The ring: for each Maglev slot, the backend slot of its owner among the `usable` backends
/// (ramping ones owning the share of their slots their step gives them).
fn ring_of(upstream: &Upstream, table: &IpHash, usable: &[bool], steps: &[f64]) -> Vec<u32> {
    table
        .ramped(usable, steps)
        .iter()
        .map(|&i| if i == EMPTY { EMPTY } else { upstream.backends[i as usize].slot })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use speedmimi_common::maglev::{self, TABLE_SIZE};

    use super::*;
    use crate::{
        config::Config,
        datapath::{DatapathError, Userspace},
        state::{Protocol, State},
    };

    /// A plan as written: backend addresses and the ring.
    type Written = (Vec<(u32, SocketAddrV4)>, Vec<u32>);

    /// A datapath that steers by remembering the last plan of each service.
    #[derive(Default)]
    struct Recording {
        plans: Mutex<HashMap<u32, Written>>,
    }

    impl Datapath for Recording {
        fn describe(&self) -> &'static str {
            "test: records l4 plans"
        }
        fn steers(&self) -> bool {
            true
        }
        fn write_l4(&self, plan: &L4Plan<'_>) -> Result<usize, DatapathError> {
            self.plans.lock().unwrap().insert(plan.service, (plan.backends.to_vec(), plan.ring.to_vec()));
            Ok(plan.ring.len())
        }
    }

    const CONFIG: &str = "
upstreams:
  web: {slow_start: 1h}
backends:
  web:
    - {id: a, host: 10.1.0.1, port: 8080, max_fails: 1, fail_timeout: 60s}
    - {id: b, host: 10.1.0.2, port: 8080, max_fails: 1, fail_timeout: 60s, weight: 200}
    - {id: c, host: 10.1.0.3, port: 8081, max_fails: 1, fail_timeout: 60s}
routing:
  web: {path: /, upstream: web, load_balancer: ip_hash}
l4:
  - {name: other, interface: lo, vip: 10.0.0.9, port: 81, upstream: web}
  - {name: ws, interface: lo, vip: 10.0.0.10, port: 80, upstream: web}
";

    /// Slot by slot, the ring the kernel is given names the backend `ip_hash` picks in
    /// userspace for a client hashing to that slot: with all backends up, and with one down.
    #[test]
    fn rings_agree_with_ip_hash_slot_by_slot() {
        let config = Config::parse(CONFIG).expect("config");
        let state = State::new(config.clone(), Arc::new(Userspace)).expect("state");
        let recording = Arc::new(Recording::default());
        let steering = Steering::new(recording.clone(), &config.file.l4).expect("steers");
        let snapshot = state.snapshot();
        steering.refresh(&snapshot);
        let route = snapshot.route(None, "/").expect("route");
        let backends = &route.upstream.backends;
        let check = |what: &str| {
            let plans = recording.plans.lock().unwrap();
            let (addrs, ring) = plans.get(&1).unwrap_or_else(|| panic!("{what}: no plan for service 1 (ws)"));
            assert_eq!(ring.len(), TABLE_SIZE, "{what}");
            let want_addrs: Vec<(u32, SocketAddrV4)> = backends.iter().map(|b| (b.slot, address(b).unwrap())).collect();
            assert_eq!(*addrs, want_addrs, "{what}: backend addresses");
            for (slot, &owner) in ring.iter().enumerate() {
                // A client hash selecting `slot` (maglev::slot is the hash modulo the table).
                let hash = slot as u64;
                assert_eq!(maglev::slot(hash), slot);
                let picked = route.balancer(Protocol::Http).pick(hash, &mut |b| b.is_up());
                let picked = picked.map(|i| backends[i].slot).unwrap_or(EMPTY);
                assert_eq!(owner, picked, "{what}: ring slot {slot}");
            }
        };
        check("all up");
        assert_eq!(recording.plans.lock().unwrap().len(), 2, "both services got a plan");

        backends[1].connect_failed();
        assert!(!backends[1].is_up());
        recording.plans.lock().unwrap().clear();
        steering.recheck();
        check("b down");
        let plans = recording.plans.lock().unwrap();
        assert!(!plans[&1].1.contains(&backends[1].slot), "a down backend still owns ring slots");
        let full = plans[&1].1.clone();
        drop(plans);
        // What the dashboard shows: b owns nothing; a and c share the ring by weight (100 each).
        let ws = steering.shares().into_iter().find(|s| s.service == "ws").expect("ws ring");
        let share = |id: &str| ws.owners.iter().find(|(o, _)| o == id).map(|(_, f)| *f);
        assert_eq!(share("b"), Some(0.0));
        let (a, c) = (share("a").unwrap(), share("c").unwrap());
        assert!((a + c - 1.0).abs() < 1e-9 && (0.4..0.6).contains(&a), "a {a}, c {c}");

        // Nothing changed: no write at all.
        recording.plans.lock().unwrap().clear();
        steering.recheck();
        assert!(recording.plans.lock().unwrap().is_empty(), "an unchanged upstream was written again");

        // c comes back (as if it had been added) and is 55% into a one-hour slow start: it owns
        // half of its slots (step 0.5), and the kernel and userspace still agree slot by slot.
        let (b_slot, c_slot) = (backends[1].slot, backends[2].slot);
        let ramp_to = |share: f64| {
            backends[2].standing.ramp_after(crate::backend::now_ms() - (share * 3_600_000.0) as u64);
            steering.recheck();
            recording.plans.lock().unwrap()[&1].1.clone()
        };
        let half = ramp_to(0.55);
        check("c at step 0.5");
        let owned = |ring: &[u32]| ring.iter().filter(|&&o| o == c_slot).count() as f64;
        let share = owned(&half) / owned(&full);
        assert!((0.45..0.55).contains(&share), "c owns {share:.3} of its slots at step 0.5");
        // Up to step 0.7: slots only move to c, never between others or away from c.
        let more = ramp_to(0.75);
        check("c at step 0.7");
        for ((&h, &m), &f) in half.iter().zip(&more).zip(&full) {
            assert!(h == m || (m == c_slot && f == c_slot), "a slot moved from {h} to {m}");
        }
        assert!(owned(&more) > owned(&half) && !more.contains(&b_slot), "b is still down");
    }

    #[test]
    fn no_steering_without_an_xdp_datapath() {
        let config = Config::parse(CONFIG).expect("config");
        assert!(Steering::new(Arc::new(Userspace), &config.file.l4).is_none());
    }
}
