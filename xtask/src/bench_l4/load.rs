//! The load generator: closed-loop HTTP/1.1 requests from the client namespace, on new connections or keep-alive
//! ones, counted by outcome and backend, with whole-machine, LB-process and XDP CPU read around the measured window.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use aya::programs::loaded_programs;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream as AsyncStream},
    task::JoinSet,
    time::{sleep, timeout},
};

use super::{BACKENDS, IN_FLIGHT, LOAD_CORE, Load, Pools, Route, VARIANTS};
use crate::{lab, workspace};

/// A request (connect, or write and read the response) slower than this counts as an I/O error.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// One request per variant before measuring, so a broken path shows at once (it is still measured and reported).
pub(super) fn preflight(client: &str, pools: &Pools) -> anyhow::Result<()> {
    let results = lab::in_netns(client, || -> anyhow::Result<Vec<Outcome>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(rt.block_on(async {
            let mut out = Vec::new();
            for (v, variant) in VARIANTS.iter().enumerate() {
                out.push(connection(pools.sources(v)[0], variant.route.target(0)).await);
            }
            out
        }))
    })
    .map_err(anyhow::Error::msg)??;
    let line: Vec<String> = VARIANTS
        .iter()
        .zip(&results)
        .map(|(v, o)| match o {
            Outcome::Ok(b) => format!("{} → b{b}", v.name),
            Outcome::Connect => format!("{} → CONNECT ERROR", v.name),
            Outcome::Io => format!("{} → I/O ERROR", v.name),
            Outcome::Bad => format!("{} → BAD RESPONSE", v.name),
        })
        .collect();
    println!("bench: preflight {}", line.join(", "));
    Ok(())
}

/// What one request came to.
#[derive(Clone, Copy)]
enum Outcome {
    /// A 200 whose body names backend `bN`.
    Ok(usize),
    Connect,
    /// Reset, timeout or early EOF.
    Io,
    /// Not a 200, or a body that names no backend.
    Bad,
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    backend: [AtomicU64; BACKENDS],
    connect: AtomicU64,
    io: AtomicU64,
    bad: AtomicU64,
}

impl Counts {
    /// Counts `o`; true if it failed.
    fn record(&self, o: Outcome) -> bool {
        match o {
            Outcome::Ok(b) => {
                self.ok.fetch_add(1, Relaxed);
                self.backend[b].fetch_add(1, Relaxed);
                return false;
            }
            Outcome::Connect => self.connect.fetch_add(1, Relaxed),
            Outcome::Io => self.io.fetch_add(1, Relaxed),
            Outcome::Bad => self.bad.fetch_add(1, Relaxed),
        };
        true
    }
}

/// Failed requests of one measurement (warm-up and drain included).
#[derive(Clone, Copy, Default)]
pub(super) struct Errors {
    connect: u64,
    io: u64,
    bad: u64,
}

impl Errors {
    pub(super) fn total(&self) -> u64 {
        self.connect + self.io + self.bad
    }

    pub(super) fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.io += o.io;
        self.bad += o.bad;
    }

    pub(super) fn text(&self) -> String {
        format!("connect {}, I/O {}, bad response {}", self.connect, self.io, self.bad)
    }
}

pub(super) fn errors_suffix(e: &Errors) -> String {
    if e.total() == 0 { String::new() } else { format!(" ERRORS {}", e.text()) }
}

/// What is read on both sides of the measured window.
pub(super) struct Probe {
    /// The LB process (tree) whose CPU the row reports; empty when the row has none.
    pub(super) lb: Vec<u32>,
    /// The daemon's l4_steer program.
    pub(super) prog: u32,
}

struct Snapshot {
    at: Instant,
    ok: u64,
    machine: f64,
    lb: f64,
    /// (run_time_ns, run_cnt) of the XDP program.
    xdp: Option<(u64, u64)>,
}

impl Probe {
    fn snapshot(&self, ok: u64) -> anyhow::Result<Snapshot> {
        let xdp = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == self.prog)
            .map(|p| (p.run_time().as_nanos() as u64, p.run_count()));
        Ok(Snapshot {
            at: Instant::now(),
            ok,
            machine: workspace::machine_busy_seconds()?,
            lb: workspace::cpu_seconds(&self.lb),
            xdp,
        })
    }
}

/// One variant under one load in one round.
pub(super) struct Measured {
    /// Successful requests (or connections) per second in the window.
    pub(super) rate: f64,
    /// Whole-machine CPU seconds per successful request.
    pub(super) cpu_per_op: f64,
    /// The LB process's CPU seconds per request, when the row has one.
    pub(super) lb_per_op: Option<f64>,
    /// The XDP program: (ns per run, runs per request, its CPU seconds per request).
    pub(super) xdp: Option<(f64, f64, f64)>,
    /// Successful requests per backend over the whole run.
    pub(super) backends: [u64; BACKENDS],
    pub(super) errors: Errors,
}

/// One variant in one round: both loads.
pub(super) struct Sample {
    pub(super) conns: Measured,
    pub(super) reqs: Measured,
}

impl Sample {
    pub(super) fn of(&self, load: Load) -> &Measured {
        match load {
            Load::Connections => &self.conns,
            Load::KeepAlive => &self.reqs,
        }
    }
}

/// Which LB processes' CPU each row reports.
pub(super) struct Pids {
    pub(super) daemon: Vec<u32>,
    pub(super) haproxy: Vec<u32>,
}

impl Pids {
    pub(super) fn of(&self, route: Route) -> &[u32] {
        match route {
            Route::Direct | Route::Nft => &[],
            Route::XdpNat | Route::XdpDsr | Route::L7 => &self.daemon,
            Route::Haproxy => &self.haproxy,
        }
    }
}

/// Runs `task` (a [`drive`]) to completion on a thread in namespace `ns` (the client's) pinned to the load core.
pub(super) fn on_load_core<T: Send>(
    ns: &str,
    task: impl Future<Output = anyhow::Result<T>> + Send,
) -> anyhow::Result<T> {
    lab::in_netns(ns, || -> anyhow::Result<T> {
        pin_thread(LOAD_CORE)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(task)
    })
    .map_err(anyhow::Error::msg)?
}

/// Runs one load against `route` from `sources` and measures `seconds` of it after a warm-up.
pub(super) async fn drive(
    route: Route,
    load: Load,
    sources: &[Ipv4Addr],
    seconds: u64,
    probe: &Probe,
) -> anyhow::Result<Measured> {
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let sources: Arc<[Ipv4Addr]> = sources.into();
    let mut tasks = JoinSet::new();
    for w in 0..IN_FLIGHT {
        let (counts, stop, next, sources) = (counts.clone(), stop.clone(), next.clone(), sources.clone());
        tasks.spawn(async move {
            match load {
                Load::Connections => {
                    while !stop.load(Relaxed) {
                        let i = next.fetch_add(1, Relaxed);
                        if counts.record(connection(sources[i % sources.len()], route.target(i)).await) {
                            sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                Load::KeepAlive => keep_alive(sources[w % sources.len()], route.target(w), &counts, &stop).await,
            }
        });
    }
    sleep(Duration::from_millis((seconds * 250).clamp(250, 1000))).await;
    let s0 = probe.snapshot(counts.ok.load(Relaxed))?;
    sleep(Duration::from_secs(seconds)).await;
    let s1 = probe.snapshot(counts.ok.load(Relaxed))?;
    stop.store(true, Relaxed);
    // Every request in flight ends within IO_TIMEOUT.
    if timeout(IO_TIMEOUT * 2, async { while tasks.join_next().await.is_some() {} }).await.is_err() {
        tasks.abort_all();
    }
    let ops = (s1.ok - s0.ok) as f64;
    let per_op = |d: f64| if ops > 0.0 { d / ops } else { f64::NAN };
    let xdp = s0.xdp.zip(s1.xdp).map(|((t0, n0), (t1, n1))| {
        let (ns, runs) = (t1.saturating_sub(t0) as f64, n1.saturating_sub(n0) as f64);
        (if runs > 0.0 { ns / runs } else { f64::NAN }, per_op(runs), per_op(ns / 1e9))
    });
    Ok(Measured {
        rate: ops / (s1.at - s0.at).as_secs_f64(),
        cpu_per_op: per_op(s1.machine - s0.machine),
        lb_per_op: (!probe.lb.is_empty()).then(|| per_op(s1.lb - s0.lb)),
        xdp,
        backends: std::array::from_fn(|b| counts.backend[b].load(Relaxed)),
        errors: Errors {
            connect: counts.connect.load(Relaxed),
            io: counts.io.load(Relaxed),
            bad: counts.bad.load(Relaxed),
        },
    })
}

/// A connection from `src` (any port: the kernel picks it at connect, unique per 4-tuple) to `dst`.
async fn connect(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<AsyncStream> {
    let sock = TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: a live socket; the option value is a c_int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sock.bind(SocketAddr::from((src, 0)))?;
    sock.connect(dst.into()).await
}

/// One request on a new connection, read to EOF.
async fn connection(src: Ipv4Addr, dst: SocketAddrV4) -> Outcome {
    let Ok(Ok(mut stream)) = timeout(IO_TIMEOUT, connect(src, dst)).await else { return Outcome::Connect };
    let mut buf = Vec::with_capacity(256);
    let exchange = async {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: l4\r\nConnection: close\r\n\r\n").await?;
        (&mut stream).take(64 * 1024).read_to_end(&mut buf).await
    };
    match timeout(IO_TIMEOUT, exchange).await {
        Ok(Ok(_)) => match find(&buf, b"\r\n\r\n") {
            Some(end) if buf.starts_with(b"HTTP/1.1 200 ") => backend_of(&buf[end + 4..]),
            _ => Outcome::Bad,
        },
        _ => Outcome::Io,
    }
}

/// Requests on one connection until `stop`, reconnecting after an error or a server's close.
async fn keep_alive(src: Ipv4Addr, dst: SocketAddrV4, counts: &Counts, stop: &AtomicBool) {
    let mut buf = Vec::with_capacity(1024);
    while !stop.load(Relaxed) {
        let Ok(Ok(mut stream)) = timeout(IO_TIMEOUT, connect(src, dst)).await else {
            counts.record(Outcome::Connect);
            sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        while !stop.load(Relaxed) {
            let (outcome, open) = timeout(IO_TIMEOUT, exchange(&mut stream, &mut buf))
                .await
                .unwrap_or(Ok((Outcome::Io, false)))
                .unwrap_or((Outcome::Io, false));
            if counts.record(outcome) {
                sleep(Duration::from_millis(10)).await;
                break;
            }
            if !open {
                break;
            }
        }
    }
}

/// One keep-alive request and its response: (outcome, whether the connection stays open).
async fn exchange(stream: &mut AsyncStream, buf: &mut Vec<u8>) -> io::Result<(Outcome, bool)> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: l4\r\n\r\n").await?;
    buf.clear();
    let head = loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > 16 * 1024 || stream.read_buf(buf).await? == 0 {
            return Ok((Outcome::Bad, false));
        }
    };
    let headers = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
    let header = |name: &str| headers.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let Some(len) = header("content-length:").and_then(|v| v.parse::<usize>().ok()) else {
        return Ok((Outcome::Bad, false));
    };
    while buf.len() < head + len {
        if stream.read_buf(buf).await? == 0 {
            return Ok((Outcome::Io, false));
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200 ") {
        return Ok((Outcome::Bad, false));
    }
    Ok((backend_of(&buf[head..head + len]), header("connection:") != Some("close")))
}

/// The demo backends answer `GET /` with their id, `b0`..`b2`, and a newline.
fn backend_of(body: &[u8]) -> Outcome {
    let id = body.trim_ascii().strip_prefix(b"b").and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok());
    match id {
        Some(b) if b < BACKENDS => Outcome::Ok(b),
        _ => Outcome::Bad,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Pins the calling thread to `core`.
fn pin_thread(core: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity(0 = this thread) only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("cannot pin the load generator to core {core}: {}", io::Error::last_os_error());
        }
    }
    Ok(())
}
