//! Neighbour entries for the backends `l4_steer` sends to. The program forwards through
//! bpf_fib_lookup, which answers "no neighbour" for a next hop the kernel has not resolved. NAT
//! then lets the kernel forward the packet, which resolves it; but a DSR packet is wrapped in IPIP
//! with the node's own address as its source, which the kernel drops as martian. A node with no
//! traffic of its own to a backend (no health checks, a fresh node in a cluster) would then never
//! resolve it, and every DSR flow to that backend would fail (measured in the cluster lab: all of a
//! node's flows, until something else resolved the backends). So each backend on a service's
//! interface's networks gets a *managed* neighbour entry (NTF_EXT_MANAGED, Linux 5.16): the kernel
//! resolves it at once and keeps it resolved. Backends behind a gateway use the gateway's entry,
//! which the node's own traffic keeps.

use std::{
    collections::BTreeSet,
    ffi::CString,
    net::Ipv4Addr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use ipnet::Ipv4Net;

use super::netlink::{Rtnetlink, attr};

/// `NDA_FLAGS_EXT` and its `NTF_EXT_MANAGED` bit (linux/neighbour.h).
const NDA_FLAGS_EXT: u16 = 15;
const NTF_EXT_MANAGED: u32 = 1;

/// The interface a service's backends are reached on.
pub struct Via {
    pub name: String,
    /// Its IPv4 networks (address and prefix length).
    pub nets: Vec<Ipv4Net>,
}

pub struct Neighbours {
    netlink: Rtnetlink,
    /// Per service: its interface's index and networks.
    vias: Vec<Option<(u32, Via)>>,
    /// Per service: the backend addresses it was last given.
    wanted: Mutex<Vec<BTreeSet<Ipv4Addr>>>,
    /// Entries this process made: interface index and address.
    kept: Mutex<BTreeSet<(u32, Ipv4Addr)>>,
    warned: AtomicBool,
}

impl Neighbours {
    /// For services reaching their backends on `vias` (by service index).
    pub fn new(vias: Vec<Via>) -> std::io::Result<Neighbours> {
        let vias: Vec<Option<(u32, Via)>> = vias.into_iter().map(|v| Some((index_of(&v.name)?, v))).collect();
        Ok(Neighbours {
            netlink: Rtnetlink::open()?,
            wanted: Mutex::new(vec![BTreeSet::new(); vias.len()]),
            vias,
            kept: Mutex::default(),
            warned: AtomicBool::new(false),
        })
    }

    /// Service `service`'s backends are `addrs` now: on-link ones get a managed entry, and entries
    /// no service wants any more are deleted.
    pub fn keep(&self, service: u32, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = wanted.get_mut(service as usize) else { return };
        *slot = addrs.into_iter().collect();
        let want: BTreeSet<(u32, Ipv4Addr)> = self
            .vias
            .iter()
            .zip(wanted.iter())
            .filter_map(|(via, addrs)| via.as_ref().map(|(index, via)| (*index, via, addrs)))
            .flat_map(|(index, via, addrs)| addrs.iter().filter(|a| on_link(via, **a)).map(move |a| (index, *a)))
            .collect();
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let add: Vec<(u32, Ipv4Addr)> = want.difference(&kept).copied().collect();
        let gone: Vec<(u32, Ipv4Addr)> = kept.difference(&want).copied().collect();
        for (index, addr) in &add {
            let flags = (libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
            match self.netlink.request(libc::RTM_NEWNEIGH, flags, &neighbour(*index, *addr, true)) {
                Ok(()) => {
                    tracing::debug!(backend = %addr, "XDP: managed neighbour entry for a backend");
                    kept.insert((*index, *addr));
                }
                Err(e) if !self.warned.swap(true, Relaxed) => tracing::warn!(backend = %addr, error = %e,
                    "XDP: cannot keep a managed neighbour entry for a backend (Linux 5.16+); DSR reaches it only once \
                     something else resolves it (health checks, the node's own traffic)"),
                Err(_) => {}
            }
        }
        for (index, addr) in gone {
            let _ = self.netlink.request(libc::RTM_DELNEIGH, 0, &neighbour(index, addr, false));
            kept.remove(&(index, addr));
        }
    }
}

impl Drop for Neighbours {
    /// Best effort at a clean stop: the entries this process made go (a killed process leaves them; the kernel
    /// keeps probing those backends until they are deleted or the interface goes).
    fn drop(&mut self) {
        let kept = std::mem::take(&mut *self.kept.lock().unwrap_or_else(|p| p.into_inner()));
        for (index, addr) in kept {
            let _ = self.netlink.request(libc::RTM_DELNEIGH, 0, &neighbour(index, addr, false));
        }
    }
}

/// The interface's index; None (with a log line) when it has none.
fn index_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => {
            tracing::warn!(interface = name, "XDP: no such interface for backend neighbour entries");
            None
        }
        i => Some(i),
    }
}

fn on_link(via: &Via, addr: Ipv4Addr) -> bool {
    via.nets.iter().any(|n| n.contains(&addr))
}

/// `ndmsg` for `addr` on interface `index`, with NDA_DST and, when `managed`, the managed flag.
fn neighbour(index: u32, addr: Ipv4Addr, managed: bool) -> Vec<u8> {
    let mut b = vec![libc::AF_INET as u8, 0, 0, 0];
    b.extend_from_slice(&(index as i32).to_ne_bytes());
    b.extend_from_slice(&0u16.to_ne_bytes()); // state: NUD_NONE, the kernel resolves it
    b.extend_from_slice(&[0, 0]); // flags, type
    attr(&mut b, libc::NDA_DST, &addr.octets());
    if managed {
        attr(&mut b, NDA_FLAGS_EXT, &NTF_EXT_MANAGED.to_ne_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(addr: [u8; 4], len: u8) -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap()
    }

    #[test]
    fn on_link_follows_the_interface_networks() {
        let via = Via { name: "eth1".into(), nets: vec![net([10, 101, 0, 2], 24)] };
        assert!(on_link(&via, Ipv4Addr::new(10, 101, 0, 10)));
        assert!(!on_link(&via, Ipv4Addr::new(10, 102, 0, 10)));
        let all = Via { name: "eth1".into(), nets: vec![net([10, 0, 0, 1], 0)] };
        assert!(on_link(&all, Ipv4Addr::new(192, 0, 2, 1)));
        assert!(!on_link(&Via { name: "eth1".into(), nets: vec![] }, Ipv4Addr::new(10, 0, 0, 1)));
    }
}
