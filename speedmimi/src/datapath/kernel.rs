//! The aya datapath: loads the embedded kernel object, attaches the sk_skb verdict program to
//! the splice SOCKHASH, bridges aya-log records into tracing, and edits the splice maps.

use std::{
    os::fd::{AsRawFd, BorrowedFd},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap, SockHash},
    programs::SkSkb,
};
use speedmimi_common::splice;
use tokio::io::unix::AsyncFd;

use super::{Datapath, DatapathError, Limits, SplicedPair};

/// The object `cargo xtask build-ebpf` built, or empty when it had not been built.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/speedmimi-ebpf.o"));

pub struct Kernel {
    socks: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, splice::Peer>>,
    control: Mutex<HashMap<MapData, u64, splice::Control>>,
    counters: PerCpuHashMap<MapData, u32, splice::Counters>,
    /// Keeps the programs loaded and attached; dropping it detaches them.
    _ebpf: Ebpf,
}

fn err(context: &str, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Ebpf(format!("{context}: {e}"))
}

impl Kernel {
    /// Loads and attaches everything, or says why not.
    pub fn load() -> Result<Kernel, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(DatapathError::NotRoot(uid));
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| err("loading the object", e))?;
        start_log_bridge(&mut ebpf);

        let socks: SockHash<MapData, u64> = ebpf
            .take_map(splice::SOCKS)
            .ok_or_else(|| err("object", "no SPLICE_SOCKS map"))?
            .try_into()
            .map_err(|e| err(splice::SOCKS, e))?;
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
        Ok(Kernel {
            socks: Mutex::new(socks),
            peers: Mutex::new(peers),
            control: Mutex::new(control),
            counters,
            _ebpf: ebpf,
        })
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
        "kernel (sk_skb splice loaded)"
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

    fn unsplice(&self, pair: SplicedPair) -> Result<(), DatapathError> {
        {
            let mut socks = self.socks.lock().expect("socks lock");
            let _ = socks.remove(&pair.a);
            let _ = socks.remove(&pair.b);
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
        }))
    }

    fn peer(&self, cookie: u64) -> Option<splice::Peer> {
        self.peers.lock().expect("peers lock").get(&cookie, 0).ok()
    }

    fn spliced_sockets(&self) -> usize {
        self.socks.lock().expect("socks lock").keys().filter(Result::is_ok).count()
    }
}
