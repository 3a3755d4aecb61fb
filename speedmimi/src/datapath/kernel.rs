//! The aya datapath: loads the embedded kernel object, attaches the sk_skb verdict program to
//! the splice SOCKHASH, bridges aya-log records into tracing, and edits the splice maps.

use std::{
    os::fd::{AsRawFd, BorrowedFd},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuHashMap, SockHash},
    programs::{SkSkb, Xdp, XdpMode},
};
use speedmimi_common::{l4, splice};
use tokio::io::unix::AsyncFd;

use super::{Datapath, DatapathError, L4Plan, Limits, SplicedPair, err, steer::L4Maps};
use crate::config::{EbpfSection, L4Section};

/// The object `cargo xtask build-ebpf` built, or empty when it had not been built.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/speedmimi-ebpf.o"));

pub struct Kernel {
    socks: Mutex<SockHash<MapData, u64>>,
    /// Sockets leaving the kernel path (no programs attached).
    hold: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, splice::Peer>>,
    control: Mutex<HashMap<MapData, u64, splice::Control>>,
    counters: PerCpuHashMap<MapData, u32, splice::Counters>,
    /// XDP steering of the `l4:` services, when there are any.
    steering: Option<L4Maps>,
    /// Keeps the programs loaded and attached; dropping it detaches them.
    _ebpf: Ebpf,
}

/// The embedded kernel object (empty when it was not built).
pub fn object() -> &'static [u8] {
    OBJECT
}

impl Kernel {
    /// Loads and attaches everything, or says why not: the splice verdict always, the XDP
    /// steering program when `l4` has services (its flow tables are sized by `conf.l4_flows`).
    pub fn load(conf: &EbpfSection, services: &[L4Section]) -> Result<Kernel, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let missing = missing_capabilities();
        if !missing.is_empty() {
            // SAFETY: geteuid has no preconditions.
            return Err(DatapathError::NotRoot { uid: unsafe { libc::geteuid() }, missing: missing.join(", ") });
        }
        let mut ebpf = load_object((!services.is_empty()).then_some(conf.l4_flows))?;
        start_log_bridge(&mut ebpf);

        let socks: SockHash<MapData, u64> = ebpf
            .take_map(splice::SOCKS)
            .ok_or_else(|| err("object", "no SPLICE_SOCKS map"))?
            .try_into()
            .map_err(|e| err(splice::SOCKS, e))?;
        let hold: SockHash<MapData, u64> = ebpf
            .take_map(splice::HOLD)
            .ok_or_else(|| err("object", "no SPLICE_HOLD map"))?
            .try_into()
            .map_err(|e| err(splice::HOLD, e))?;
        let peers: HashMap<MapData, u64, splice::Peer> = ebpf
            .take_map(splice::PEERS)
            .ok_or_else(|| err("object", "no SPLICE_PEERS map"))?
            .try_into()
            .map_err(|e| err(splice::PEERS, e))?;
        let control: HashMap<MapData, u64, splice::Control> = ebpf
            .take_map(splice::CONTROL)
            .ok_or_else(|| err("object", "no SPLICE_CONTROL map"))?
            .try_into()
            .map_err(|e| err(splice::CONTROL, e))?;
        let counters: PerCpuHashMap<MapData, u32, splice::Counters> = ebpf
            .take_map(splice::COUNTERS)
            .ok_or_else(|| err("object", "no SPLICE_COUNTERS map"))?
            .try_into()
            .map_err(|e| err(splice::COUNTERS, e))?;
        let verdict: &mut SkSkb = ebpf
            .program_mut("splice_verdict")
            .ok_or_else(|| err("object", "no splice_verdict program"))?
            .try_into()
            .map_err(|e| err("splice_verdict", e))?;
        verdict.load().map_err(|e| err("loading splice_verdict (verifier)", e))?;
        // Attach before any socket is inserted (KERNEL-NOTES).
        verdict.attach(socks.fd()).map_err(|e| err("attaching splice_verdict", e))?;
        tracing::info!("sk_skb splice verdict loaded and attached to {}", splice::SOCKS);
        let steering = if services.is_empty() { None } else { Some(L4Maps::start(&mut ebpf, services)?) };
        Ok(Kernel {
            socks: Mutex::new(socks),
            hold: Mutex::new(hold),
            peers: Mutex::new(peers),
            control: Mutex::new(control),
            counters,
            steering,
            _ebpf: ebpf,
        })
    }
}

/// Capabilities loading and attaching the programs needs (bit numbers of linux/capability.h):
/// BPF to load programs and make maps, NET_ADMIN for sockmap programs and XDP, PERFMON for the
/// verifier (measured here: without it `splice_verdict` is refused, "pointer arithmetic with it
/// prohibited for !root"). Root has them all; the systemd unit grants exactly these
/// (`deploy/speedmimi.service`; `tests/deploy.rs` runs the daemon with only them).
const NEEDED: [(u32, &str); 3] = [(39, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"), (38, "CAP_PERFMON")];
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// The needed capabilities this process lacks in its effective set. CAP_SYS_ADMIN stands in for
/// CAP_BPF and CAP_PERFMON (kernels before 5.8 know only it).
fn missing_capabilities() -> Vec<&'static str> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |bit: u32| effective & (1 << bit) != 0;
    NEEDED
        .iter()
        .filter(|&&(bit, _)| !(has(bit) || (bit != CAP_NET_ADMIN && has(CAP_SYS_ADMIN))))
        .map(|&(_, name)| name)
        .collect()
}

/// The `l4_decap` program attached to an interface (a DSR backend's half); detached on drop.
pub struct Decap {
    mode: &'static str,
    _ebpf: Ebpf,
}

impl Decap {
    pub fn attach(interface: &str) -> Result<Decap, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut ebpf = load_object(None)?;
        let prog: &mut Xdp = ebpf
            .program_mut("l4_decap")
            .ok_or_else(|| err("object", "no l4_decap program"))?
            .try_into()
            .map_err(|e| err("l4_decap", e))?;
        prog.load().map_err(|e| err("loading l4_decap (verifier)", e))?;
        let mode = attach_xdp(prog, interface)?;
        Ok(Decap { mode, _ebpf: ebpf })
    }

    /// "native" or "generic".
    pub fn mode(&self) -> &'static str {
        self.mode
    }
}

/// Loads the object with XDP flow tables of `l4_flows` entries, or, when nothing is steered, with
/// the XDP tables at their smallest.
fn load_object(l4_flows: Option<u32>) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    match l4_flows {
        Some(n) => loader.map_max_entries(l4::FLOWS, n).map_max_entries(l4::REVERSE, n),
        None => loader.map_max_entries(l4::RING, 1).map_max_entries(l4::FLOWS, 1024).map_max_entries(l4::REVERSE, 1024),
    };
    loader.load(OBJECT).map_err(|e| err("loading the object", e))
}

/// Attaches in native mode, falling back to generic with a log line; returns which.
pub(super) fn attach_xdp(prog: &mut Xdp, interface: &str) -> Result<&'static str, DatapathError> {
    match prog.attach(interface, XdpMode::Driver) {
        Ok(_) => Ok("native"),
        Err(native) => {
            prog.attach(interface, XdpMode::Skb).map_err(|e| err(&format!("attaching XDP to {interface}"), e))?;
            tracing::warn!(interface, reason = %native, "native XDP unavailable; using generic XDP");
            Ok("generic")
        }
    }
}

/// Forwards aya-log records of the kernel programs to the `log` facade (and so to tracing).
fn start_log_bridge(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "no aya-log records from the kernel programs");
            return;
        }
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd, which stays open and the same for as
        // long as the logger, which the AsyncFd owns.
        let Ok(mut fd) = (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }) else {
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// The kernel's socket cookie: the key of a socket in the splice maps.
fn cookie(fd: BorrowedFd<'_>) -> Result<u64, DatapathError> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: fd is a live socket; value and len are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut value).cast(), &mut len)
    };
    if rc != 0 {
        return Err(err("SO_COOKIE", std::io::Error::last_os_error()));
    }
    Ok(value)
}

/// Bytes that arrived before insertion are held until more arrive unless the low-water mark
/// is 1 (KERNEL-NOTES, measured 2.5 s stuck without).
fn set_rcvlowat(fd: BorrowedFd<'_>) {
    let one: libc::c_int = 1;
    // SAFETY: fd is a live socket; the option value is a c_int.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Datapath for Kernel {
    fn describe(&self) -> &'static str {
        if self.steering.is_some() {
            "kernel (sk_skb splice and XDP l4 steering loaded)"
        } else {
            "kernel (sk_skb splice loaded)"
        }
    }

    fn steers(&self) -> bool {
        self.steering.is_some()
    }

    fn write_l4(&self, plan: &L4Plan<'_>) -> Result<usize, DatapathError> {
        self.steering.as_ref().ok_or(DatapathError::NoSteering)?.write(plan)
    }

    fn l4_counters(&self, backend_slot: u32) -> Option<l4::Counters> {
        self.steering.as_ref()?.counters(backend_slot)
    }

    fn can_splice(&self) -> bool {
        true
    }

    fn splice(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        limits: Limits,
        backend_slot: u32,
    ) -> Result<SplicedPair, DatapathError> {
        let pair = SplicedPair { a: cookie(a)?, b: cookie(b)? };
        {
            // Flow control first: a socket without it would be redirected without limit.
            let mut control = self.control.lock().expect("control lock");
            for (c, limit) in [(pair.a, limits.to_backend), (pair.b, limits.to_client)] {
                if let Err(e) = control.insert(c, splice::Control { limit, consumed: 0 }, 0) {
                    let _ = control.remove(&pair.a);
                    return Err(err("SPLICE_CONTROL insert", e));
                }
            }
        }
        {
            let mut peers = self.peers.lock().expect("peers lock");
            peers
                .insert(
                    pair.a,
                    splice::Peer { peer_cookie: pair.b, backend_slot, to_backend: 1, ..Default::default() },
                    0,
                )
                .map_err(|e| err("SPLICE_PEERS insert", e))?;
            let upstream_side = splice::Peer { peer_cookie: pair.a, backend_slot, ..Default::default() };
            if let Err(e) = peers.insert(pair.b, upstream_side, 0) {
                let _ = peers.remove(&pair.a);
                drop(peers);
                let _ = self.unsplice(pair);
                return Err(err("SPLICE_PEERS insert", e));
            }
        }
        let mut socks = self.socks.lock().expect("socks lock");
        let inserted = socks.insert(pair.a, a.as_raw_fd(), 0).and_then(|()| socks.insert(pair.b, b.as_raw_fd(), 0));
        if let Err(e) = inserted {
            let _ = socks.remove(&pair.a);
            drop(socks);
            let _ = self.unsplice(pair);
            return Err(err("SPLICE_SOCKS insert", e));
        }
        set_rcvlowat(a);
        set_rcvlowat(b);
        Ok(pair)
    }

    fn hold(&self, socket: BorrowedFd<'_>, cookie: u64) -> Result<bool, DatapathError> {
        let mut hold = self.hold.lock().expect("hold lock");
        match hold.insert(cookie, socket.as_raw_fd(), 0) {
            Ok(()) => {}
            // Sockmaps take established TCP sockets only: a half-closed one is not held.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(false),
            Err(e) => return Err(err("SPLICE_HOLD insert", e)),
        }
        // Leaving the map with the verdict stops it for the socket; the hold keeps its psock.
        let _ = self.socks.lock().expect("socks lock").remove(&cookie);
        Ok(true)
    }

    fn release(&self, cookie: u64) {
        let _ = self.socks.lock().expect("socks lock").remove(&cookie);
    }

    fn unsplice(&self, pair: SplicedPair) -> Result<(), DatapathError> {
        {
            let mut socks = self.socks.lock().expect("socks lock");
            let _ = socks.remove(&pair.a);
            let _ = socks.remove(&pair.b);
        }
        {
            let mut hold = self.hold.lock().expect("hold lock");
            let _ = hold.remove(&pair.a);
            let _ = hold.remove(&pair.b);
        }
        {
            let mut peers = self.peers.lock().expect("peers lock");
            let _ = peers.remove(&pair.a);
            let _ = peers.remove(&pair.b);
        }
        let mut control = self.control.lock().expect("control lock");
        let _ = control.remove(&pair.a);
        let _ = control.remove(&pair.b);
        Ok(())
    }

    fn set_control(&self, cookie: u64, c: splice::Control) -> Result<(), DatapathError> {
        // BPF_EXIST: only a socket still spliced gets a limit.
        self.control.lock().expect("control lock").insert(cookie, c, 2).map_err(|e| err("SPLICE_CONTROL update", e))
    }

    fn counters(&self, backend_slot: u32) -> Option<splice::Counters> {
        let per_cpu = self.counters.get(&backend_slot, 0).ok()?;
        Some(per_cpu.iter().fold(splice::Counters::default(), |acc, c| splice::Counters {
            bytes_to_backend: acc.bytes_to_backend + c.bytes_to_backend,
            bytes_to_client: acc.bytes_to_client + c.bytes_to_client,
            overlap_bytes_cut: acc.overlap_bytes_cut + c.overlap_bytes_cut,
        }))
    }

    fn peer(&self, cookie: u64) -> Option<splice::Peer> {
        self.peers.lock().expect("peers lock").get(&cookie, 0).ok()
    }

    fn spliced_sockets(&self) -> usize {
        self.socks.lock().expect("socks lock").keys().filter(Result::is_ok).count()
    }
}
