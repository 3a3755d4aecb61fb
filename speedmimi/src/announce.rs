//! Announcing `l4:` VIPs to the network through the host's BGP daemon (BIRD or FRR), without
//! speaking BGP ourselves. SpeedMimi creates a TUN interface of its own (`announce.interface`)
//! and puts on it, as a /32 address, the VIP of every `l4:` service it can serve now: its XDP
//! program is loaded and one of the services on that VIP has a usable backend. The daemon
//! exports that interface's addresses (BIRD: `protocol direct` on the interface; FRR:
//! `redistribute connected` with a route map matching it), so what the router learns follows
//! the interface.
//!
//! A VIP leaves the interface when its services lose their last usable backend, and every VIP
//! leaves at shutdown, before connections drain. The interface is not persistent: the kernel
//! deletes it with every address on it when the process ends in any way, `kill -9` included, and
//! the daemon withdraws the routes as soon as it hears of the link's removal (netlink), with no
//! timer of ours in between.
//!
//! The interface is made with ioctl and edited with rtnetlink (`datapath::netlink`; CAP_NET_ADMIN).

use std::{
    collections::BTreeSet,
    ffi::CString,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use crate::datapath::netlink::{Rtnetlink, attr};

/// The interface and the VIPs on it now.
pub struct Announcer {
    interface: String,
    index: u32,
    /// Holds the interface: the kernel deletes it when this closes.
    _tun: OwnedFd,
    netlink: Rtnetlink,
    /// The VIPs on the interface now, and those whose last edit failed (logged once until it
    /// works); edits are serialised by this lock.
    state: Mutex<(BTreeSet<Ipv4Addr>, BTreeSet<Ipv4Addr>)>,
    /// Drained by the operator (`POST /api/v1/announce/drain`): nothing is announced, whatever
    /// could be served, until undrained.
    drained: AtomicBool,
}

/// What the admin API shows.
pub struct Status {
    pub interface: String,
    pub drained: bool,
    pub announced: Vec<Ipv4Addr>,
}

impl Announcer {
    /// Creates the interface and brings it up, with no VIP. A TUN device of that name held by
    /// another process (another instance), or a device of another kind, is an error.
    pub fn open(interface: &str) -> io::Result<Announcer> {
        let context = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {interface:?}: {e}"));
        let tun = create_tun(interface).map_err(|e| context("cannot create the TUN interface", e))?;
        let name = CString::new(interface).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: name is a valid C string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(context("cannot find the interface just created", io::Error::last_os_error()));
        }
        let netlink = Rtnetlink::open()?;
        netlink.request(libc::RTM_NEWLINK, 0, &link_up(index)).map_err(|e| context("cannot bring up", e))?;
        let state = Mutex::default();
        Ok(Announcer {
            interface: interface.to_owned(),
            index,
            _tun: tun,
            netlink,
            state,
            drained: AtomicBool::new(false),
        })
    }

    /// Drains (withdraws every VIP now, and keeps them withdrawn) or undrains (the next `sync`
    /// announces what can be served).
    pub fn drain(&self, drained: bool) {
        if self.drained.swap(drained, Relaxed) != drained {
            tracing::info!(interface = %self.interface, drained, "announce: node drained by the operator");
        }
        if drained {
            self.sync(&BTreeSet::new());
        }
    }

    pub fn status(&self) -> Status {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Status {
            interface: self.interface.clone(),
            drained: self.drained.load(Relaxed),
            announced: state.0.iter().copied().collect(),
        }
    }

    /// Makes the interface hold exactly `want` (nothing while drained); a VIP that cannot be
    /// added or removed is tried again on the next call (and logged once, until an edit of it
    /// works).
    pub fn sync(&self, want: &BTreeSet<Ipv4Addr>) {
        let none = BTreeSet::new();
        let want = if self.drained.load(Relaxed) { &none } else { want };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (announced, failing) = &mut *state;
        let have = announced.clone();
        for vip in want.difference(&have) {
            let create = (libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
            match self.netlink.request(libc::RTM_NEWADDR, create, &address(self.index, *vip)) {
                Ok(()) => {
                    tracing::info!(%vip, interface = %self.interface, "announce: VIP announced");
                    announced.insert(*vip);
                    failing.remove(vip);
                }
                Err(e) if failing.insert(*vip) => {
                    tracing::error!(%vip, interface = %self.interface, error = %e, "announce: cannot add the VIP")
                }
                Err(_) => {}
            }
        }
        for vip in have.difference(want) {
            let gone = match self.netlink.request(libc::RTM_DELADDR, 0, &address(self.index, *vip)) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => true,
                Err(e) => {
                    if failing.insert(*vip) {
                        tracing::error!(%vip, interface = %self.interface, error = %e, "announce: cannot remove the VIP");
                    }
                    false
                }
            };
            if gone {
                tracing::info!(%vip, interface = %self.interface, "announce: VIP withdrawn");
                announced.remove(vip);
                failing.remove(vip);
            }
        }
    }
}

/// A TUN device named `name`, up to its owner to configure; it exists while the descriptor is open.
fn create_tun(name: &str) -> io::Result<OwnedFd> {
    // SAFETY: the path is a valid C string; a non-negative result is a new fd we own.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let tun = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF takes a pointer to an ifreq, valid here.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

/// `ifinfomsg` setting IFF_UP on interface `index`.
fn link_up(index: u32) -> Vec<u8> {
    let up = libc::IFF_UP as u32;
    let mut b = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    b.extend_from_slice(&(index as i32).to_ne_bytes());
    b.extend_from_slice(&up.to_ne_bytes()); // flags
    b.extend_from_slice(&up.to_ne_bytes()); // change: only IFF_UP
    b
}

/// `ifaddrmsg` plus IFA_LOCAL and IFA_ADDRESS: `vip`/32 on interface `index`.
fn address(index: u32, vip: Ipv4Addr) -> Vec<u8> {
    let mut b = vec![libc::AF_INET as u8, 32, 0, libc::RT_SCOPE_UNIVERSE];
    b.extend_from_slice(&index.to_ne_bytes());
    for kind in [libc::IFA_LOCAL, libc::IFA_ADDRESS] {
        attr(&mut b, kind, &vip.octets());
    }
    b
}
