//! XDP L4 steering, kernel half: attaches `l4_steer` to the `l4:` services' interfaces, keeps
//! the services map, and writes the plans `crate::steering` makes (backend addresses by slot, each
//! service's Maglev ring), only the entries that changed. What is usable and which backend owns
//! which ring slot is decided there, not here.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
};

use ipnet::Ipv4Net;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::Xdp,
};
use speedmimi_common::{
    l4::{self, Backend as BackendEntry, Counters, MODE_DSR, MODE_NAT, PROTO_TCP, Service, ServiceKey},
    maglev::{EMPTY, TABLE_SIZE},
};

use super::{
    DatapathError, L4Plan, err,
    neigh::{Neighbours, Via},
};
use crate::config::{L4Mode, L4Section};

pub struct L4Maps {
    /// Per service index: the backend slot in each ring slot as written (`EMPTY` = none).
    written: Mutex<Vec<Vec<u32>>>,
    ring_map: Mutex<Array<MapData, u32>>,
    backends: Mutex<Array<MapData, BackendEntry>>,
    counters: PerCpuArray<MapData, Counters>,
    /// Managed neighbour entries for the backends (None where rtnetlink is unavailable).
    neighbours: Option<Neighbours>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T, DatapathError> {
    ebpf.take_map(name).ok_or_else(|| err("object", format!("no {name} map")))?.try_into().map_err(|e| err(name, e))
}

impl L4Maps {
    /// Loads `l4_steer`, fills the services map (service `i` is `services[i]`) and attaches to
    /// every service interface (native XDP, else generic with a log line).
    pub fn start(ebpf: &mut Ebpf, services: &[L4Section]) -> Result<L4Maps, DatapathError> {
        let mut service_map: HashMap<MapData, ServiceKey, Service> = take(ebpf, l4::SERVICES)?;
        let ring_map: Array<MapData, u32> = take(ebpf, l4::RING)?;
        let backends: Array<MapData, BackendEntry> = take(ebpf, l4::BACKENDS)?;
        let counters: PerCpuArray<MapData, Counters> = take(ebpf, l4::COUNTERS)?;
        // The interface each service reaches its backends on, with its networks: read once, for DSR's outer
        // source and for the backends' neighbour entries.
        let vias: Vec<Via> = services
            .iter()
            .map(|s| {
                let name = s.backend_interface.as_deref().unwrap_or(&s.interface);
                Via { name: name.to_owned(), nets: interface_nets(name) }
            })
            .collect();
        for (i, (s, via)) in services.iter().zip(&vias).enumerate() {
            let IpAddr::V4(vip) = s.vip else { return Err(err(&s.name, "IPv6 VIPs are not steered")) };
            let (mode, encap_src) = match s.mode {
                L4Mode::Nat => (MODE_NAT, 0),
                L4Mode::Dsr => {
                    let src = via.nets.first().map(|n| n.addr()).ok_or_else(|| {
                        err(&s.name, format!("dsr needs an IPv4 address on {} for the outer IPIP header", via.name))
                    })?;
                    (MODE_DSR, u32::from_ne_bytes(src.octets()))
                }
            };
            let key =
                ServiceKey { addr: u32::from_ne_bytes(vip.octets()), port: s.port.to_be(), proto: PROTO_TCP, _pad: 0 };
            service_map
                .insert(key, Service { index: i as u32, mode, encap_src }, 0)
                .map_err(|e| err(l4::SERVICES, e))?;
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
        let neighbours = Neighbours::new(vias)
            .map_err(|e| tracing::warn!(error = %e, "XDP: no rtnetlink for backend neighbour entries"))
            .ok();
        Ok(L4Maps {
            written: Mutex::new(vec![vec![EMPTY; TABLE_SIZE]; services.len()]),
            ring_map: Mutex::new(ring_map),
            backends: Mutex::new(backends),
            counters,
            neighbours,
        })
    }

    /// Writes a plan's backend addresses (those that differ) and then its ring slots (those
    /// that differ); returns how many ring slots changed.
    pub fn write(&self, plan: &L4Plan<'_>) -> Result<usize, DatapathError> {
        if plan.ring.len() != TABLE_SIZE {
            return Err(err(l4::RING, format!("a ring of {} slots, not {TABLE_SIZE}", plan.ring.len())));
        }
        {
            let mut map = self.backends.lock().expect("backends lock");
            for (slot, addr) in plan.backends {
                let entry =
                    BackendEntry { addr: u32::from_ne_bytes(addr.ip().octets()), port: addr.port().to_be(), _pad: 0 };
                if map.get(slot, 0).ok() != Some(entry) {
                    map.set(*slot, entry, 0).map_err(|e| err(l4::BACKENDS, e))?;
                }
            }
        }
        if let Some(n) = &self.neighbours {
            n.keep(plan.service, plan.backends.iter().map(|(_, a)| *a.ip()));
        }
        let mut written = self.written.lock().expect("rings lock");
        let have = written
            .get_mut(plan.service as usize)
            .ok_or_else(|| err(l4::RING, format!("no l4 service {}", plan.service)))?;
        let mut map = self.ring_map.lock().expect("ring lock");
        let base = plan.service * TABLE_SIZE as u32;
        let mut changed = 0;
        for (i, (&want, have)) in plan.ring.iter().zip(have.iter_mut()).enumerate() {
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

/// An interface's IPv4 addresses, each with its prefix length, in the kernel's order.
fn interface_nets(name: &str) -> Vec<Ipv4Net> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifname.to_bytes() == name.as_bytes() && !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says how to read it.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in, and so is its netmask when present.
                let (sin, mask) = unsafe {
                    let mask = (!ifa.ifa_netmask.is_null())
                        .then(|| (*ifa.ifa_netmask.cast::<libc::sockaddr_in>()).sin_addr.s_addr);
                    (&*ifa.ifa_addr.cast::<libc::sockaddr_in>(), mask)
                };
                let len = mask.map_or(32, |m| u32::from_be(m).count_ones()) as u8;
                if let Ok(net) = Ipv4Net::new(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), len) {
                    found.push(net);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}
