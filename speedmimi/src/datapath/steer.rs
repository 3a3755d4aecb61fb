//! XDP L4 steering, userspace half: attaches `l4_steer` to the `l4:` services' interfaces, keeps
//! the services map, and keeps each service's Maglev ring equal to the `ip_hash` table of its
//! upstream (with down backends overlaid), writing only the slots that changed.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::Xdp,
};
use speedmimi_common::{
    l4::{self, Backend as BackendEntry, Counters, MODE_DSR, MODE_NAT, PROTO_TCP, Service, ServiceKey},
    maglev::{EMPTY, TABLE_SIZE},
};

use super::{DatapathError, err};
use crate::{
    backend::Backend,
    balance::IpHash,
    config::{L4Mode, L4Section},
    state::{Snapshot, Upstream},
};

/// One steered service and what its ring holds now.
struct Ring {
    conf: L4Section,
    index: u32,
    /// Backend slot in each ring slot as written to the kernel (`EMPTY` = none).
    written: Vec<u32>,
    /// The upstream the ring was computed from, its table, and which backends were usable.
    source: Option<(Arc<Upstream>, Arc<IpHash>, Vec<bool>)>,
}

pub struct Steering {
    rings: Mutex<Vec<Ring>>,
    ring_map: Mutex<Array<MapData, u32>>,
    backends: Mutex<Array<MapData, BackendEntry>>,
    counters: PerCpuArray<MapData, Counters>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T, DatapathError> {
    ebpf.take_map(name).ok_or_else(|| err("object", format!("no {name} map")))?.try_into().map_err(|e| err(name, e))
}

/// A backend as the XDP program addresses it, if it can (an IPv4 literal host).
fn entry(b: &Backend) -> Option<BackendEntry> {
    let conf = b.conf.load();
    let ip: Ipv4Addr = conf.host.parse().ok()?;
    Some(BackendEntry { addr: u32::from_ne_bytes(ip.octets()), port: conf.port.to_be(), _pad: 0 })
}

impl Steering {
    /// Loads `l4_steer`, fills the services map and attaches to every service interface
    /// (native XDP, else generic with a log line).
    pub fn start(ebpf: &mut Ebpf, services: &[L4Section]) -> Result<Steering, DatapathError> {
        let mut service_map: HashMap<MapData, ServiceKey, Service> = take(ebpf, l4::SERVICES)?;
        let ring_map: Array<MapData, u32> = take(ebpf, l4::RING)?;
        let backends: Array<MapData, BackendEntry> = take(ebpf, l4::BACKENDS)?;
        let counters: PerCpuArray<MapData, Counters> = take(ebpf, l4::COUNTERS)?;
        let mut rings = Vec::new();
        for (i, s) in services.iter().enumerate() {
            let IpAddr::V4(vip) = s.vip else { return Err(err(&s.name, "IPv6 VIPs are not steered")) };
            let (mode, encap_src) = match s.mode {
                L4Mode::Nat => (MODE_NAT, 0),
                L4Mode::Dsr => {
                    let via = s.backend_interface.as_deref().unwrap_or(&s.interface);
                    let src = interface_v4(via).ok_or_else(|| {
                        err(&s.name, format!("dsr needs an IPv4 address on {via} for the outer IPIP header"))
                    })?;
                    (MODE_DSR, u32::from_ne_bytes(src.octets()))
                }
            };
            let key =
                ServiceKey { addr: u32::from_ne_bytes(vip.octets()), port: s.port.to_be(), proto: PROTO_TCP, _pad: 0 };
            service_map
                .insert(key, Service { index: i as u32, mode, encap_src }, 0)
                .map_err(|e| err(l4::SERVICES, e))?;
            rings.push(Ring { conf: s.clone(), index: i as u32, written: vec![EMPTY; TABLE_SIZE], source: None });
        }
        let prog: &mut Xdp = ebpf
            .program_mut("l4_steer")
            .ok_or_else(|| err("object", "no l4_steer program"))?
            .try_into()
            .map_err(|e| err("l4_steer", e))?;
        prog.load().map_err(|e| err("loading l4_steer (verifier)", e))?;
        let interfaces: BTreeSet<&str> = services
            .iter()
            .flat_map(|s| [Some(s.interface.as_str()), s.backend_interface.as_deref()])
            .flatten()
            .collect();
        for name in interfaces {
            let how = super::kernel::attach_xdp(prog, name)?;
            tracing::info!(interface = name, mode = how, "XDP l4_steer attached");
        }
        Ok(Steering {
            rings: Mutex::new(rings),
            ring_map: Mutex::new(ring_map),
            backends: Mutex::new(backends),
            counters,
        })
    }

    /// Brings every ring in line with a new snapshot's upstreams.
    pub fn refresh(&self, snapshot: &Snapshot) {
        let mut rings = self.rings.lock().expect("rings lock");
        for ring in rings.iter_mut() {
            if let Some(upstream) = snapshot.upstreams.get(&ring.conf.upstream) {
                self.update(ring, upstream);
            }
        }
    }

    /// Follows health changes (which make no snapshot) of the upstreams the rings were built
    /// from. Cheap when nothing changed, so it runs on a short timer.
    pub fn recheck(&self) {
        let mut rings = self.rings.lock().expect("rings lock");
        for ring in rings.iter_mut() {
            if let Some((upstream, _, _)) = &ring.source {
                let upstream = upstream.clone();
                self.update(ring, &upstream);
            }
        }
    }

    fn update(&self, ring: &mut Ring, upstream: &Arc<Upstream>) {
        let entries: Vec<Option<BackendEntry>> = upstream.backends.iter().map(|b| entry(b)).collect();
        let usable: Vec<bool> = upstream.backends.iter().zip(&entries).map(|(b, e)| e.is_some() && b.is_up()).collect();
        let table = match &ring.source {
            Some((u, t, was)) if Arc::ptr_eq(u, upstream) => {
                if *was == usable {
                    return;
                }
                t.clone()
            }
            _ => Arc::new(IpHash::new(upstream.backends.clone(), upstream.ghosts.clone())),
        };
        if let Err(e) = self.write_backends(upstream, &entries) {
            tracing::error!(service = %ring.conf.name, error = %e, "cannot update XDP backends");
            return;
        }
        let effective = table.effective(&usable);
        let wanted: Vec<u32> =
            effective.iter().map(|&i| if i == EMPTY { EMPTY } else { upstream.backends[i as usize].slot }).collect();
        match self.write_ring(ring, &wanted) {
            Ok(0) => ring.source = Some((upstream.clone(), table, usable)),
            Ok(changed) => {
                tracing::info!(service = %ring.conf.name, changed, "XDP ring updated");
                ring.source = Some((upstream.clone(), table, usable));
            }
            Err(e) => tracing::error!(service = %ring.conf.name, error = %e, "cannot update XDP ring"),
        }
    }

    fn write_backends(&self, upstream: &Upstream, entries: &[Option<BackendEntry>]) -> Result<(), DatapathError> {
        let mut map = self.backends.lock().expect("backends lock");
        for (b, e) in upstream.backends.iter().zip(entries) {
            let Some(e) = e else {
                tracing::warn!(backend = %b.id, host = %b.conf.load().host, "not an IPv4 address; left out of XDP rings");
                continue;
            };
            if map.get(&b.slot, 0).ok() != Some(*e) {
                map.set(b.slot, e, 0).map_err(|e| err(l4::BACKENDS, e))?;
            }
        }
        Ok(())
    }

    /// Writes the slots that differ; returns how many.
    fn write_ring(&self, ring: &mut Ring, wanted: &[u32]) -> Result<usize, DatapathError> {
        let mut map = self.ring_map.lock().expect("ring lock");
        let base = ring.index * TABLE_SIZE as u32;
        let mut changed = 0;
        for (i, (&want, have)) in wanted.iter().zip(ring.written.iter_mut()).enumerate() {
            if want != *have {
                map.set(base + i as u32, want, 0).map_err(|e| err(l4::RING, e))?;
                *have = want;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// What the kernel steered to a backend slot, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Option<Counters> {
        let per_cpu = self.counters.get(&slot, 0).ok()?;
        let sum = per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            reply_packets: a.reply_packets + c.reply_packets,
            reply_bytes: a.reply_bytes + c.reply_bytes,
            new_flows: a.new_flows + c.new_flows,
        });
        Some(sum)
    }
}

/// The first IPv4 address of an interface.
fn interface_v4(name: &str) -> Option<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if found.is_none() && ifname.to_bytes() == name.as_bytes() && !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says how to read it.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}
