//! `cargo xtask bench l4`: L4 load balancing in the netns lab ([`crate::lab`]). New connections per second and
//! keep-alive requests per second through SpeedMimi's XDP steering (NAT and DSR), nftables DNAT with conntrack
//! (standing in for IPVS, which this kernel lacks), HAProxy in TCP mode and SpeedMimi's L7 proxy, beside plain
//! kernel forwarding; then the XDP program's own time per packet through BPF_PROG_TEST_RUN.
//!
//! XDP and forwarding run in softirq on whichever core sends the packet, so, as in `bench splice`, the cost measure
//! is whole-machine CPU from /proc/stat (softirq included) minus what the direct row costs in the same round. The
//! XDP program's own share comes from the kernel's BPF run-time statistics.

use std::{
    fmt::Write as _,
    fs, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap},
    programs::{TestRun, TestRunOptions, Xdp, XdpMode, loaded_programs},
    sys::{Stats, enable_stats},
};
use speedmimi_common::{
    l4::{self, Backend, MODE_DSR, MODE_NAT, PROTO_TCP, Service, ServiceKey},
    maglev::{self, Cursor, EMPTY, Member, TABLE_SIZE},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream as AsyncStream},
    task::JoinSet,
    time::{sleep, timeout},
};

use crate::{
    bench::{self, Guard},
    build_ebpf, lab, workspace,
};

/// Options of one benchmark run.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    /// Client source addresses per variant.
    pub clients: usize,
}

/// The daemon and HAProxy run here; the LB's softirq work does not follow them (see the module docs).
const LB_CORE: &str = "0";
/// The load generator and the backends.
const LOAD_CORE: usize = 1;
const BACKENDS: usize = 3;
/// Requests in flight (closed loop): one new connection each, or one keep-alive connection each.
const IN_FLIGHT: usize = 64;
const VIP_NAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const VIP_DSR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const VIP_NFT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const VIP_PORT: u16 = 80;
const HAPROXY_PORT: u16 = 81;
const L7_PORT: u16 = 8000;
/// A request (connect, or write and read the response) slower than this counts as an I/O error.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between measurements, for the previous one's closing handshakes.
const SETTLE: Duration = Duration::from_millis(500);
/// How long daemons get to listen and attach.
const STARTUP: Duration = Duration::from_secs(15);
/// Namespaces of this bench are `l4b{pid}-…`, so a killed run's leftovers can be told apart and removed.
const NS_TAG: &str = "l4b";
/// Kernel-looped repetitions of one test-run packet.
const LOOP_REPEAT: u32 = 1_000_000;
/// Single-repetition test runs averaged per packet.
const SINGLE_CALLS: u32 = 200_000;
/// Client addresses come in blocks of whole /24s per variant (250 each, see [`lab::client_addr`]).
const MAX_CLIENTS: usize = 10_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    XdpNat,
    XdpDsr,
    Nft,
    Haproxy,
    L7,
}

struct Variant {
    name: &'static str,
    route: Route,
}

const VARIANTS: [Variant; 6] = [
    Variant { name: "direct", route: Route::Direct },
    Variant { name: "xdp-nat", route: Route::XdpNat },
    Variant { name: "xdp-dsr", route: Route::XdpDsr },
    Variant { name: "nftables-dnat", route: Route::Nft },
    Variant { name: "haproxy-tcp", route: Route::Haproxy },
    Variant { name: "speedmimi-l7", route: Route::L7 },
];
const DIRECT: usize = 0;
const NFT: usize = 3;

impl Route {
    /// Where client request `i` goes (the direct row spreads over the backends itself).
    fn target(self, i: usize) -> SocketAddrV4 {
        let (ip, port) = match self {
            Route::Direct => (lab::backend_addr(i % BACKENDS), lab::DEMO_PORT),
            Route::XdpNat => (VIP_NAT, VIP_PORT),
            // DSR needs backend port == VIP port.
            Route::XdpDsr => (VIP_DSR, lab::DEMO_PORT),
            Route::Nft => (VIP_NFT, VIP_PORT),
            Route::Haproxy => (lab::LB_FRONT_IP, HAPROXY_PORT),
            Route::L7 => (lab::LB_FRONT_IP, L7_PORT),
        };
        SocketAddrV4::new(ip, port)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    /// A new connection per request (`Connection: close`, read to EOF).
    Connections,
    /// Requests on open connections.
    KeepAlive,
}

/// Each variant's own block of client addresses: it keeps TIME_WAIT and flow-table state of one variant from
/// touching another's, and lets conntrack in the LB namespace follow only the nftables row's flows.
struct Pools {
    clients: usize,
    /// Addresses per block: whole third octets of 10.200.X.Y.
    stride: usize,
}

impl Pools {
    fn new(clients: usize) -> Pools {
        Pools { clients, stride: clients.div_ceil(250) * 250 }
    }

    fn total(&self) -> usize {
        VARIANTS.len() * self.stride
    }

    fn sources(&self, variant: usize) -> Vec<Ipv4Addr> {
        (0..self.clients).map(|j| lab::client_addr(variant * self.stride + j)).collect()
    }

    /// The block of `variant` as an nftables range.
    fn range(&self, variant: usize) -> String {
        let first = variant * self.stride / 250;
        let last = first + self.stride / 250 - 1;
        format!("10.200.{first}.0-10.200.{last}.255")
    }
}

pub fn l4(opts: &Options) -> anyhow::Result<()> {
    if !workspace::is_root() {
        bail!("the benchmark builds network namespaces, loads eBPF and pins processes: run it as root");
    }
    if opts.rounds == 0 || opts.seconds == 0 || opts.clients == 0 || opts.clients > MAX_CLIENTS {
        bail!("--rounds and --seconds must be at least 1, --clients 1 to {MAX_CLIENTS}");
    }
    if thread::available_parallelism().map(|n| n.get()).unwrap_or(1) < 2 {
        bail!("the benchmark pins the LB to core {LB_CORE} and the load to core {LOAD_CORE}: it needs two cores");
    }
    let ipvs = ipvs_note();
    println!("bench: {ipvs}");
    let nft = ensure_program("nft", "nftables")?;
    let haproxy = ensure_program("haproxy", "haproxy")?;
    let object = build_ebpf::build_ebpf(true).context("the XDP rows need the eBPF object")?;
    let bin = bench::build_release()?;
    let dir = workspace::target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    remove_stale()?;
    let prefix = format!("{NS_TAG}{}-", std::process::id());

    println!("bench: BPF_PROG_TEST_RUN of l4_steer ({LOOP_REPEAT} kernel-looped runs, {SINGLE_CALLS} single runs)");
    let tests = test_runs(&prefix, &object)?;

    let pools = Pools::new(opts.clients);
    let spec = lab::LabSpec { prefix, clients: pools.total(), backends: BACKENDS, speedmimi: Some(bin.clone()) };
    println!("bench: lab up ({} client addresses, {BACKENDS} backends)", pools.total());
    let mut lab = lab::Lab::up(spec).map_err(anyhow::Error::msg)?;
    let lb = lab.ns_lb();
    let wide_ports = [("net/ipv4/tcp_tw_reuse", "1"), ("net/ipv4/ip_local_port_range", "1024 65535")];
    sysctls(&lab.ns_client(), &wide_ports)?;
    sysctls(&lb, &wide_ports)?;
    start_decap(&mut lab, &bin, &dir)?;
    for i in 0..BACKENDS {
        pin_namespace(&lab.ns_backend(i))?;
    }
    let rules = dir.join("l4-nftables.nft");
    fs::write(&rules, nft_rules(&pools.range(NFT)))?;
    lab::run_in(&lb, &[&nft.to_string_lossy(), "-f", &rules.to_string_lossy()]).map_err(anyhow::Error::msg)?;
    // Dropped before `lab` (declared later): stopped first.
    let mut daemon = start_daemon(&lb, &bin, &dir)?;
    let (prog, xdp_mode) = wait_xdp(&lb, &mut daemon.0)?;
    let mut haproxy = start_haproxy(&lb, &haproxy, &dir)?;
    wait_listening(&lb, Route::Haproxy.target(0), &mut haproxy.0)?;
    println!("bench: SpeedMimi (pid {}) steers with l4_steer id {prog} ({xdp_mode} XDP)", daemon.0.id());

    let pids = Pids { daemon: bench::process_tree(daemon.0.id()), haproxy: bench::process_tree(haproxy.0.id()) };
    preflight(&lab.ns_client(), &pools)?;
    // Run-time stats for as long as the fd is open (every row: the program also sees the other rows' packets).
    let stats = enable_stats(Stats::RunTime).context("enable BPF run-time statistics")?;
    let mut samples: Vec<Vec<Sample>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    for round in 0..opts.rounds {
        for (v, (variant, out)) in VARIANTS.iter().zip(samples.iter_mut()).enumerate() {
            let probe = Probe { lb: pids.of(variant.route).to_vec(), prog };
            let sources = pools.sources(v);
            let client = lab.ns_client();
            let run = |load| drive(&client, variant.route, load, &sources, opts.seconds, &probe);
            let conns = run(Load::Connections).with_context(|| format!("{} connections", variant.name))?;
            thread::sleep(SETTLE);
            let reqs = run(Load::KeepAlive).with_context(|| format!("{} keep-alive", variant.name))?;
            thread::sleep(SETTLE);
            println!(
                "bench: round {} {:<14} {:>8.0} conn/s {:>7.3} CPU-s/1000 conns{} | {:>8.0} req/s {:>6.1} CPU-µs/req{}",
                round + 1,
                variant.name,
                conns.rate,
                conns.cpu_per_op * 1e3,
                errors_suffix(&conns.errors),
                reqs.rate,
                reqs.cpu_per_op * 1e6,
                errors_suffix(&reqs.errors),
            );
            out.push(Sample { conns, reqs });
        }
    }
    drop(stats);

    let setup = Setup { ipvs, xdp_mode, pools: &pools };
    let table = report(&samples, &tests, &setup, opts);
    println!("\n{table}");
    let path = dir.join("l4.md");
    fs::write(&path, &table)?;
    println!("bench: table written to {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Setup

/// Whether IPVS exists here, in one line for the output.
fn ipvs_note() -> String {
    let proc = Path::new("/proc/net/ip_vs").exists() || Path::new("/sys/module/ip_vs").exists();
    let tool = workspace::find_on_path("ipvsadm").is_some() || Path::new("/usr/sbin/ipvsadm").exists();
    if proc {
        "IPVS: this kernel has IPVS, but this benchmark measures nftables DNAT with conntrack in its place".into()
    } else {
        format!(
            "IPVS: unavailable in this kernel (no /proc/net/ip_vs, no ip_vs module{}): nftables DNAT with \
             conntrack stands in for it",
            if tool { "; ipvsadm is installed but has nothing to drive" } else { ", no ipvsadm" }
        )
    }
}

/// `program` on PATH or in /usr/sbin, installed from Debian package `package` when missing (no services are
/// started or stopped here).
fn ensure_program(program: &str, package: &str) -> anyhow::Result<PathBuf> {
    let find = || {
        workspace::find_on_path(program).or_else(|| Some(Path::new("/usr/sbin").join(program)).filter(|p| p.is_file()))
    };
    if let Some(path) = find() {
        return Ok(path);
    }
    println!("xtask: installing {package} (apt-get)");
    let apt = |args: &[&str]| {
        workspace::run_checked(
            Command::new("apt-get")
                .args(["-q", "-y", "-o", "DPkg::Lock::Timeout=120"])
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if apt(&["install", "--no-install-recommends", package]).is_err() {
        apt(&["update"])?;
        apt(&["install", "--no-install-recommends", package])?;
    }
    find().with_context(|| format!("apt-get installed {package} but there is no {program}"))
}

/// Removes the namespaces of earlier runs whose process is gone (a run killed before its cleanup).
fn remove_stale() -> anyhow::Result<()> {
    for ns in lab::list_namespaces(NS_TAG).map_err(anyhow::Error::msg)? {
        let Some(pid) = ns[NS_TAG.len()..].split_once('-').and_then(|(p, _)| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let gone = lab::cleanup_stale(&format!("{NS_TAG}{pid}-")).map_err(anyhow::Error::msg)?;
            if !gone.is_empty() {
                println!("bench: removed namespaces a killed run left: {}", gone.join(" "));
            }
        }
    }
    Ok(())
}

/// Writes `/proc/sys/<key>` values inside `ns`.
fn sysctls(ns: &str, values: &[(&str, &str)]) -> anyhow::Result<()> {
    lab::in_netns(ns, || -> anyhow::Result<()> {
        for (key, value) in values {
            fs::write(Path::new("/proc/sys").join(key), value).with_context(|| format!("sysctl {key} in {ns}"))?;
        }
        Ok(())
    })
    .map_err(anyhow::Error::msg)?
}

/// DSR's backend half: the VIP on `lo` and `speedmimi xdp-decap` on eth0 (this kernel has no ipip module).
fn start_decap(lab: &mut lab::Lab, bin: &Path, dir: &Path) -> anyhow::Result<()> {
    for i in 0..BACKENDS {
        let ns = lab.ns_backend(i);
        lab::run_in(&ns, &["ip", "addr", "add", &format!("{VIP_DSR}/32"), "dev", "lo"]).map_err(anyhow::Error::msg)?;
        let log = dir.join(format!("l4-decap-b{i}.log"));
        let child = lab::command_in(&ns, &[&bin.to_string_lossy(), "xdp-decap", "--interface", lab::BACKEND_IF])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("start xdp-decap")?;
        lab.adopt(child);
        let deadline = Instant::now() + STARTUP;
        while xdp_attached(&ns, lab::BACKEND_IF)?.is_none() {
            if Instant::now() > deadline {
                bail!("xdp-decap did not attach to {} in {ns}: {}", lab::BACKEND_IF, tail(&log));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Pins every process of `ns` (the demo backend and the decapsulator) to the load core.
fn pin_namespace(ns: &str) -> anyhow::Result<()> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output().context("ip netns pids")?;
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", &LOAD_CORE.to_string(), pid])
            .stdout(Stdio::null())
            .status()
            .context("run taskset")?;
        if !status.success() {
            bail!("cannot pin pid {pid} of {ns} to core {LOAD_CORE}");
        }
    }
    Ok(())
}

/// DNAT of the nftables VIP, hashed on the client address like the other L4 rows, with conntrack following only
/// the nftables row's client block: the other rows pay no conntrack, as they would on a box without these rules.
fn nft_rules(pool: &str) -> String {
    let map: Vec<String> = (0..BACKENDS).map(|i| format!("{i} : {}", lab::backend_addr(i))).collect();
    format!(
        "table ip speedmimi_bench {{\n  chain raw_pre {{\n    type filter hook prerouting priority raw; policy accept;\n    ip saddr != {pool} ip daddr != {pool} notrack\n  }}\n  chain raw_out {{\n    type filter hook output priority raw; policy accept;\n    notrack\n  }}\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {VIP_NFT} tcp dport {VIP_PORT} dnat to jhash ip saddr mod {BACKENDS} map {{ {} }} : {}\n  }}\n}}\n",
        map.join(", "),
        lab::DEMO_PORT
    )
}

fn start_daemon(ns: &str, bin: &Path, dir: &Path) -> anyhow::Result<Guard> {
    let backends: String = (0..BACKENDS)
        .map(|i| {
            format!("    - {{id: b{i}, host: {}, port: {}, max_conn: 100000}}\n", lab::backend_addr(i), lab::DEMO_PORT)
        })
        .collect();
    let (front, back) = (lab::LB_FRONT_IF, lab::LB_BACK_IF);
    let config = dir.join("l4-speedmimi.yaml");
    fs::write(
        &config,
        format!(
            "server: {{host: {}, port: {L7_PORT}}}\nadmin: {{host: 127.0.0.1, port: 9091}}\nbackends:\n  web:\n{backends}routing:\n  main: {{upstream: web, load_balancer: ip_hash}}\nl4:\n  - {{name: web-l4, interface: {front}, backend_interface: {back}, vip: {VIP_NAT}, port: {VIP_PORT}, upstream: web}}\n  - {{name: web-dsr, interface: {front}, backend_interface: {back}, vip: {VIP_DSR}, port: {}, upstream: web, mode: dsr}}\nebpf: {{enabled: true, l4_flows: 262144}}\n",
            lab::LB_FRONT_IP,
            lab::DEMO_PORT
        ),
    )?;
    let log = dir.join("l4-speedmimi.log");
    let child =
        lab::command_in(ns, &["taskset", "-c", LB_CORE, &bin.to_string_lossy(), "-c", &config.to_string_lossy()])
            .env("RUST_LOG", "warn")
            .env_remove("SPEEDMIMI_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("start speedmimi")?;
    let mut daemon = Guard(child);
    wait_listening(ns, Route::L7.target(0), &mut daemon.0).with_context(|| tail(&log))?;
    Ok(daemon)
}

fn start_haproxy(ns: &str, haproxy: &Path, dir: &Path) -> anyhow::Result<Guard> {
    let servers: String =
        (0..BACKENDS).map(|i| format!("  server b{i} {}:{}\n", lab::backend_addr(i), lab::DEMO_PORT)).collect();
    let config = dir.join("l4-haproxy.cfg");
    fs::write(
        &config,
        format!(
            "global\n  nbthread 1\n  maxconn 5000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend f\n  bind {}:{HAPROXY_PORT}\n  default_backend b\nbackend b\n  balance source\n{servers}",
            lab::LB_FRONT_IP
        ),
    )?;
    let child = lab::command_in(ns, &["taskset", "-c", LB_CORE, &haproxy.to_string_lossy(), "-db", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("start haproxy")?;
    Ok(Guard(child))
}

/// Waits until `addr` accepts connections from inside `ns`, failing early if `child` exits.
fn wait_listening(ns: &str, addr: SocketAddrV4, child: &mut Child) -> anyhow::Result<()> {
    lab::in_netns(ns, || -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("exited ({status}) before listening on {addr}");
            }
            if TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {addr} after {} s", STARTUP.as_secs());
            }
            thread::sleep(Duration::from_millis(50));
        }
    })
    .map_err(anyhow::Error::msg)?
}

/// Waits until one XDP program is attached to both LB interfaces: (program id, "native" or "generic").
fn wait_xdp(ns: &str, daemon: &mut Child) -> anyhow::Result<(u32, &'static str)> {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Some(status) = daemon.try_wait()? {
            bail!("speedmimi exited ({status}) before attaching XDP");
        }
        if let (Some(a), Some(b)) = (xdp_attached(ns, lab::LB_FRONT_IF)?, xdp_attached(ns, lab::LB_BACK_IF)?)
            && a.0 == b.0
        {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!("speedmimi did not attach XDP to {} and {} in {ns}", lab::LB_FRONT_IF, lab::LB_BACK_IF);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The XDP program attached to `dev` in `ns`, from `ip link`'s "prog/xdp id N" (or "prog/xdpgeneric").
fn xdp_attached(ns: &str, dev: &str) -> anyhow::Result<Option<(u32, &'static str)>> {
    let out = lab::run_in(ns, &["ip", "link", "show", "dev", dev]).map_err(anyhow::Error::msg)?;
    let words: Vec<&str> = out.split_whitespace().collect();
    Ok(words.windows(3).find_map(|w| {
        let mode = match w[0] {
            "prog/xdp" | "prog/xdpdrv" => "native",
            "prog/xdpgeneric" => "generic",
            _ => return None,
        };
        (w[1] == "id").then(|| w[2].parse().ok().map(|id| (id, mode))).flatten()
    }))
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("{} says: {}", log.display(), lines[lines.len().saturating_sub(5)..].join("\n"))
}

/// One request per variant before measuring, so a broken path shows at once (it is still measured and reported).
fn preflight(client: &str, pools: &Pools) -> anyhow::Result<()> {
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

// ---------------------------------------------------------------------------------------------
// Load

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
struct Errors {
    connect: u64,
    io: u64,
    bad: u64,
}

impl Errors {
    fn total(&self) -> u64 {
        self.connect + self.io + self.bad
    }

    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.io += o.io;
        self.bad += o.bad;
    }

    fn text(&self) -> String {
        format!("connect {}, I/O {}, bad response {}", self.connect, self.io, self.bad)
    }
}

fn errors_suffix(e: &Errors) -> String {
    if e.total() == 0 { String::new() } else { format!(" ERRORS {}", e.text()) }
}

/// What is read on both sides of the measured window.
struct Probe {
    /// The LB process (tree) whose CPU the row reports; empty when the row has none.
    lb: Vec<u32>,
    /// The daemon's l4_steer program.
    prog: u32,
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
        Ok(Snapshot { at: Instant::now(), ok, machine: machine_busy_seconds()?, lb: cpu_seconds(&self.lb), xdp })
    }
}

/// One variant under one load in one round.
struct Measured {
    /// Successful requests (or connections) per second in the window.
    rate: f64,
    /// Whole-machine CPU seconds per successful request.
    cpu_per_op: f64,
    /// The LB process's CPU seconds per request, when the row has one.
    lb_per_op: Option<f64>,
    /// The XDP program: (ns per run, runs per request, its CPU seconds per request).
    xdp: Option<(f64, f64, f64)>,
    /// Successful requests per backend over the whole run.
    backends: [u64; BACKENDS],
    errors: Errors,
}

struct Sample {
    conns: Measured,
    reqs: Measured,
}

/// Which LB processes' CPU each row reports.
struct Pids {
    daemon: Vec<u32>,
    haproxy: Vec<u32>,
}

impl Pids {
    fn of(&self, route: Route) -> &[u32] {
        match route {
            Route::Direct | Route::Nft => &[],
            Route::XdpNat | Route::XdpDsr | Route::L7 => &self.daemon,
            Route::Haproxy => &self.haproxy,
        }
    }
}

/// Runs one load against `route` from `sources`, on a thread in the client namespace pinned to the load core.
fn drive(
    ns: &str,
    route: Route,
    load: Load,
    sources: &[Ipv4Addr],
    seconds: u64,
    probe: &Probe,
) -> anyhow::Result<Measured> {
    lab::in_netns(ns, || -> anyhow::Result<Measured> {
        pin_thread(LOAD_CORE)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(drive_async(route, load, sources, seconds, probe))
    })
    .map_err(anyhow::Error::msg)?
}

async fn drive_async(
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

/// user + nice + system + irq + softirq + steal of the whole machine, in seconds.
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let f: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 8 {
        bail!("short cpu line in /proc/stat");
    }
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { bench::sysconf_clk_tck() } as f64;
    Ok((f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) as f64 / ticks)
}

/// utime + stime of the processes, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { bench::sysconf_clk_tck() } as f64;
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // After the command, the state is index 0, so utime (field 14) is index 11.
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TEST_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const TEST_GW: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);

/// One crafted packet timed two ways.
struct TestRunRow {
    case: &'static str,
    /// Verdict of a single run (the real one).
    verdict: u32,
    /// Mean kernel-measured ns of SINGLE_CALLS runs of repeat 1 (includes the kernel's timer, about one
    /// `ktime_get_ns` pair, per run).
    single_ns: f64,
    /// Kernel-measured ns per run with repeat LOOP_REPEAT.
    loop_ns: f64,
    /// Verdict of the looped run's last repetition: differs when the program rewrote the packet, since the kernel
    /// does not restore it between repetitions.
    loop_verdict: u32,
}

/// A namespace of its own (eth0/eth1 veth pair, routes, permanent neighbours, as speedmimi/tests/xdp.rs makes),
/// deleted on drop.
struct ScratchNs(String);

impl Drop for ScratchNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).stderr(Stdio::null()).status();
    }
}

fn test_runs(prefix: &str, object: &Path) -> anyhow::Result<Vec<TestRunRow>> {
    let ns = ScratchNs(format!("{prefix}t"));
    let ip = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("run ip")?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    ip(&["netns", "add", &ns.0])?;
    let mut lines = vec![
        "link set lo up".to_string(),
        "link add eth0 type veth peer name eth1".into(),
        "link set eth0 up".into(),
        "link set eth1 up".into(),
        format!("addr add {}/24 dev eth0", lab::LB_FRONT_IP),
        format!("addr add {}/24 dev eth1", lab::LB_BACK_IP),
        format!("route add 10.200.0.0/16 via {TEST_GW}"),
        format!("neigh replace {TEST_GW} lladdr 02:00:00:00:00:c2 dev eth0 nud permanent"),
    ];
    lines.extend((0..BACKENDS).map(|i| {
        format!("neigh replace {} lladdr 02:00:00:00:01:{:02x} dev eth1 nud permanent", lab::backend_addr(i), 10 + i)
    }));
    for line in &lines {
        let mut args = vec!["-n", &ns.0];
        args.extend(line.split(' '));
        ip(&args)?;
    }
    sysctls(&ns.0, &[("net/ipv4/ip_forward", "1")])?;
    lab::in_netns(&ns.0, || test_runs_here(object)).map_err(anyhow::Error::msg)?
}

/// Loads the object, sets up one NAT and one DSR service over the three backends and times the cases.
fn test_runs_here(object: &Path) -> anyhow::Result<Vec<TestRunRow>> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(l4::FLOWS, 4096)
        .map_max_entries(l4::REVERSE, 4096)
        .load_file(object)
        .with_context(|| format!("load {}", object.display()))?;
    let prog: &mut Xdp = ebpf.program_mut("l4_steer").context("no l4_steer program")?.try_into()?;
    prog.load().context("verifier rejects l4_steer")?;
    // Test runs with an ingress ifindex need the device's XDP receive queue, which exists while XDP is attached.
    for dev in ["eth0", "eth1"] {
        prog.attach(dev, XdpMode::Driver).or_else(|_| prog.attach(dev, XdpMode::Skb)).context("attach l4_steer")?;
    }
    let mut services: HashMap<_, ServiceKey, Service> =
        HashMap::try_from(ebpf.map_mut(l4::SERVICES).context("no services map")?)?;
    let key = |vip: Ipv4Addr, port: u16| ServiceKey {
        addr: u32::from_ne_bytes(vip.octets()),
        port: port.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    };
    services.insert(key(VIP_NAT, VIP_PORT), Service { index: 0, mode: MODE_NAT, encap_src: 0 }, 0)?;
    let encap_src = u32::from_ne_bytes(lab::LB_BACK_IP.octets());
    services.insert(key(VIP_DSR, lab::DEMO_PORT), Service { index: 1, mode: MODE_DSR, encap_src }, 0)?;
    let mut backends: Array<_, Backend> = Array::try_from(ebpf.map_mut(l4::BACKENDS).context("no backends map")?)?;
    for i in 0..BACKENDS {
        let addr = u32::from_ne_bytes(lab::backend_addr(i).octets());
        backends.set(i as u32, Backend { addr, port: lab::DEMO_PORT.to_be(), _pad: 0 }, 0)?;
    }
    let members: Vec<Member> = (0..BACKENDS)
        .map(|i| Member::from_addr(format!("{}:{}", lab::backend_addr(i), lab::DEMO_PORT).as_bytes(), 1))
        .collect();
    let mut table = vec![EMPTY; TABLE_SIZE];
    maglev::build(&members, &mut [Cursor::default(); BACKENDS], &mut table);
    let mut ring: Array<_, u32> = Array::try_from(ebpf.map_mut(l4::RING).context("no ring map")?)?;
    for service in 0..2u32 {
        for (slot, &b) in table.iter().enumerate() {
            ring.set(service * TABLE_SIZE as u32 + slot as u32, b, 0)?;
        }
    }

    let prog: &Xdp = ebpf.program("l4_steer").context("no l4_steer program")?.try_into()?;
    let (eth0, eth1) = (ifindex("eth0")?, ifindex("eth1")?);
    let payload = [b'x'; 100];
    // Handshakes first, so the timed packets belong to established flows.
    let syn = tcp_frame(TEST_CLIENT, 40000, VIP_NAT, VIP_PORT, SYN, &[]);
    let (verdict, out) = run_once(prog, &syn, eth0)?;
    if verdict != XDP_REDIRECT || out.len() < 34 {
        bail!("test run: the NAT SYN was not redirected (verdict {verdict})");
    }
    let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    run_once(prog, &tcp_frame(TEST_CLIENT, 40001, VIP_DSR, lab::DEMO_PORT, SYN, &[]), eth0)?;
    let cases = [
        (
            "NAT, established flow: client → VIP rewritten to the backend",
            tcp_frame(TEST_CLIENT, 40000, VIP_NAT, VIP_PORT, ACK, &payload),
            eth0,
        ),
        (
            "NAT, reply: backend → client rewritten to the VIP",
            tcp_frame(backend, lab::DEMO_PORT, TEST_CLIENT, 40000, ACK, &payload),
            eth1,
        ),
        (
            "DSR, established flow: IPIP-encapsulated to the backend",
            tcp_frame(TEST_CLIENT, 40001, VIP_DSR, lab::DEMO_PORT, ACK, &payload),
            eth0,
        ),
        (
            "foreign TCP packet (not a VIP): passed",
            tcp_frame(TEST_CLIENT, 40002, Ipv4Addr::new(10, 0, 0, 99), VIP_PORT, ACK, &payload),
            eth0,
        ),
    ];
    let mut rows = Vec::new();
    for (case, frame, ingress) in cases {
        let ctx = xdp_md(frame.len(), ingress);
        let mut total = 0u128;
        let mut verdict = None;
        for _ in 0..SINGLE_CALLS {
            let r = test_run(prog, &frame, &ctx, 1)?;
            total += r.duration.as_nanos();
            if *verdict.get_or_insert(r.return_value) != r.return_value {
                bail!("test run of {case:?}: the verdict changed between runs of the same packet");
            }
        }
        let looped = test_run(prog, &frame, &ctx, LOOP_REPEAT)?;
        rows.push(TestRunRow {
            case,
            verdict: verdict.unwrap_or(0),
            single_ns: total as f64 / f64::from(SINGLE_CALLS),
            loop_ns: looped.duration.as_nanos() as f64,
            loop_verdict: looped.return_value,
        });
    }
    Ok(rows)
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn test_run(prog: &Xdp, frame: &[u8], ctx: &[u8], repeat: u32) -> anyhow::Result<aya::programs::TestRunResult> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(ctx);
    opts.repeat = repeat;
    prog.test_run(opts).context("BPF_PROG_TEST_RUN")
}

/// One run that also returns the packet as the program left it.
fn run_once(prog: &Xdp, frame: &[u8], ingress: u32) -> anyhow::Result<(u32, Vec<u8>)> {
    let ctx = xdp_md(frame.len(), ingress);
    let mut out = vec![0u8; frame.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// `struct xdp_md` for a test run: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
fn xdp_md(len: usize, ingress: u32) -> Vec<u8> {
    [0, len as u32, 0, ingress, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect()
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}");
    }
    Ok(i)
}

/// An Ethernet/IPv4/TCP frame with correct checksums.
fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend(sport.to_be_bytes());
    tcp.extend(dport.to_be_bytes());
    tcp.extend(1u32.to_be_bytes());
    tcp.extend(1u32.to_be_bytes());
    tcp.extend([5 << 4, flags]);
    tcp.extend(65535u16.to_be_bytes());
    tcp.extend([0, 0, 0, 0]);
    tcp.extend(payload);
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, PROTO_TCP]);
    pseudo.extend((tcp.len() as u16).to_be_bytes());
    pseudo.extend(&tcp);
    let c = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend([0x12, 0x34, 0x40, 0, 64, PROTO_TCP, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    frame.extend(ip);
    frame.extend(tcp);
    frame
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|p| u32::from(u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

// ---------------------------------------------------------------------------------------------
// Report

struct Setup<'a> {
    ipvs: String,
    xdp_mode: &'static str,
    pools: &'a Pools,
}

/// A variant's medians over rounds under one load.
struct Row {
    rate: f64,
    cpu: f64,
    /// Paired with the direct row of the same round, then the median; None for direct.
    marginal: Option<f64>,
    lb: Option<f64>,
    xdp: Option<(f64, f64, f64)>,
    /// Share of successful requests per backend, over all rounds.
    shares: Vec<f64>,
    errors: Errors,
}

fn rows(samples: &[Vec<Sample>], pick: fn(&Sample) -> &Measured) -> Vec<Row> {
    let med = |v: &[Sample], f: &dyn Fn(&Measured) -> f64| bench::median(v.iter().map(|s| f(pick(s))).collect());
    let direct = &samples[DIRECT];
    samples
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let counts: Vec<u64> = (0..BACKENDS).map(|b| v.iter().map(|s| pick(s).backends[b]).sum()).collect();
            let all = counts.iter().sum::<u64>().max(1) as f64;
            let mut errors = Errors::default();
            v.iter().for_each(|s| errors.add(&pick(s).errors));
            Row {
                rate: med(v, &|m| m.rate),
                cpu: med(v, &|m| m.cpu_per_op),
                marginal: (i != DIRECT).then(|| {
                    bench::median(v.iter().zip(direct).map(|(s, d)| pick(s).cpu_per_op - pick(d).cpu_per_op).collect())
                }),
                lb: v.iter().map(|s| pick(s).lb_per_op).collect::<Option<Vec<f64>>>().map(bench::median),
                xdp: v.iter().map(|s| pick(s).xdp).collect::<Option<Vec<_>>>().map(|x| {
                    (
                        bench::median(x.iter().map(|t| t.0).collect()),
                        bench::median(x.iter().map(|t| t.1).collect()),
                        bench::median(x.iter().map(|t| t.2).collect()),
                    )
                }),
                shares: counts.iter().map(|&c| c as f64 / all).collect(),
                errors,
            }
        })
        .collect()
}

/// Requests per marginal CPU-second of `row` over nftables DNAT's: Some(inf) when `row` costs no more than direct.
fn vs_nft(row: &Row, nft: &Row) -> Option<f64> {
    let (m, n) = (row.marginal?, nft.marginal?);
    if !(m.is_finite() && n.is_finite() && n > 0.0) {
        return None;
    }
    Some(if m <= 0.0 { f64::INFINITY } else { n / m })
}

fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_infinite() => "∞ (≤ direct)".into(),
        Some(r) => format!("{r:.2}×"),
        None => "–".into(),
    }
}

fn num(x: f64, scale: f64, prec: usize) -> String {
    if x.is_finite() { format!("{:.prec$}", x * scale) } else { "–".into() }
}

fn per_marginal_second(m: Option<f64>) -> String {
    match m {
        Some(m) if m.is_finite() && m > 0.0 => format!("{:.0}", 1.0 / m),
        Some(m) if m.is_finite() => "∞ (≤ direct)".into(),
        _ => "–".into(),
    }
}

fn errors_cell(e: &Errors) -> String {
    if e.total() == 0 { "0".into() } else { format!("**{} ({})**", e.total(), e.text()) }
}

fn report(samples: &[Vec<Sample>], tests: &[TestRunRow], setup: &Setup, opts: &Options) -> String {
    let conns = rows(samples, |s| &s.conns);
    let reqs = rows(samples, |s| &s.reqs);
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "L4 in the netns lab (client → LB namespace → {BACKENDS} demo backends), {rounds} interleaved round(s), medians, {secs} s per measurement after a warm-up; {IN_FLIGHT} requests in flight (closed loop) from {clients} client addresses per row. SpeedMimi and HAProxy pinned to core {LB_CORE}, load generator and backends to core {LOAD_CORE}; XDP, forwarding and NAT run in softirq on whichever core sends, so CPU is whole-machine (/proc/stat user+nice+system+irq+softirq+steal) per request, and marginal = minus direct's in the same round. {date}, {machine}",
        rounds = opts.rounds,
        secs = opts.seconds,
        clients = setup.pools.clients,
        machine = bench::machine_line(),
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "- {}.", setup.ipvs);
    let _ = writeln!(
        s,
        "- nftables: `dnat to jhash ip saddr mod {BACKENDS} map {{…}}` in the LB namespace's prerouting; conntrack follows only that row's client block ({}), the other rows are `notrack`.",
        setup.pools.range(NFT)
    );
    let _ = writeln!(
        s,
        "- l4_steer is attached ({} XDP) to both LB interfaces throughout, so every row pays its pass path; BPF run-time stats are on for all rows (the XDP columns).",
        setup.xdp_mode
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "New connection per request (`Connection: close`, read to EOF):");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| path | conn/s | machine CPU-s per 1000 conns | marginal CPU-s per 1000 | conns per marginal CPU-s | ÷ nftables DNAT | LB process CPU-s per 1000 | XDP ns/packet | XDP runs per conn | XDP CPU-s per 1000 | backends b0/b1/b2 | errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (v, r) in VARIANTS.iter().zip(&conns) {
        let (xn, xr, xc) = r.xdp.unwrap_or((f64::NAN, f64::NAN, f64::NAN));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            num(r.rate, 1.0, 0),
            num(r.cpu, 1e3, 3),
            r.marginal.map_or("–".into(), |m| if m.is_finite() { format!("{:+.3}", m * 1e3) } else { "–".into() }),
            per_marginal_second(r.marginal),
            fmt_ratio(vs_nft(r, &conns[NFT])),
            r.lb.map_or("–".into(), |l| num(l, 1e3, 3)),
            num(xn, 1.0, 0),
            num(xr, 1.0, 1),
            num(xc, 1e3, 4),
            shares(&r.shares),
            errors_cell(&r.errors),
        );
    }
    noise(&mut s, samples, |x| &x.conns, 1e3, "CPU-s per 1000 conns");
    let _ = writeln!(s);
    let _ = writeln!(s, "Keep-alive requests (`GET /` on {IN_FLIGHT} open connections, one per client address):");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| path | req/s | machine CPU-µs per req | marginal CPU-µs per req | ÷ nftables DNAT | LB process CPU-µs per req | XDP ns/packet | XDP runs per req | backends b0/b1/b2 | errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for (v, r) in VARIANTS.iter().zip(&reqs) {
        let (xn, xr, _) = r.xdp.unwrap_or((f64::NAN, f64::NAN, f64::NAN));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            num(r.rate, 1.0, 0),
            num(r.cpu, 1e6, 2),
            r.marginal.map_or("–".into(), |m| if m.is_finite() { format!("{:+.2}", m * 1e6) } else { "–".into() }),
            fmt_ratio(vs_nft(r, &reqs[NFT])),
            r.lb.map_or("–".into(), |l| num(l, 1e6, 2)),
            num(xn, 1.0, 0),
            num(xr, 1.0, 1),
            shares(&r.shares),
            errors_cell(&r.errors),
        );
    }
    noise(&mut s, samples, |x| &x.reqs, 1e6, "CPU-µs per req");
    let _ = writeln!(s);
    // The passed packet is unchanged, so its looped figure is the program alone; single runs add the timer.
    let timer =
        tests.iter().find(|t| t.verdict == XDP_PASS && t.loop_verdict == XDP_PASS).map(|t| t.single_ns - t.loop_ns);
    let _ = writeln!(
        s,
        "l4_steer through BPF_PROG_TEST_RUN (one NAT and one DSR service over {BACKENDS} backends, 154-byte frames, established flows), kernel-measured ns per run: the mean of {SINGLE_CALLS} runs of repeat 1, that minus the kernel's timer around a single run ({}), and one run of repeat {LOOP_REPEAT}.",
        timer.map_or("unknown".into(), |t| format!("{t:.0} ns: single − looped of the passed packet"))
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "| packet | verdict | ns per single run | minus timer | ns per looped run | looped verdict |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for t in tests {
        let rewritten = t.loop_verdict != t.verdict;
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {} | {:.1}{} | {} |",
            t.case,
            verdict_name(t.verdict),
            t.single_ns,
            timer.map_or("–".into(), |o| format!("{:.0}", t.single_ns - o)),
            t.loop_ns,
            if rewritten { " †" } else { "" },
            verdict_name(t.loop_verdict)
        );
    }
    if tests.iter().any(|t| t.loop_verdict != t.verdict) {
        let _ = writeln!(
            s,
            "\n† Not this packet's cost: the kernel does not restore the packet between repetitions, so after the first the program sees the packet it rewrote (another path, another verdict). The single-run columns are the ones to read for rewritten packets."
        );
    }
    let _ = writeln!(s);
    let check = |r: Option<f64>| match r {
        Some(r) if r >= 3.0 => "met",
        Some(_) => "MISSED",
        None => "n/a",
    };
    let _ = writeln!(s, "Target: the XDP path at ≥ 3× IPVS (here nftables DNAT) connections per marginal CPU-second:");
    for (i, v) in VARIANTS.iter().enumerate().filter(|(_, v)| matches!(v.route, Route::XdpNat | Route::XdpDsr)) {
        let r = vs_nft(&conns[i], &conns[NFT]);
        let _ = writeln!(s, "- {}: {} ({})", v.name, fmt_ratio(r), check(r));
    }
    let nft = conns[NFT].marginal.unwrap_or(f64::NAN);
    match spread(samples, |x| &x.conns) {
        Some((lo, hi)) if nft.abs() < hi - lo => {
            let _ = writeln!(
                s,
                "- caution: nftables' marginal ({:+.3} CPU-s per 1000) is within the direct row's spread ({:.3}): the ratio is not resolved; measure longer, with more rounds, on a quiet machine.",
                nft * 1e3,
                (hi - lo) * 1e3
            );
        }
        Some(_) => {}
        None => {
            let _ = writeln!(s, "- caution: one round, so the noise in these marginals is unknown.");
        }
    }
    let failing: Vec<String> = VARIANTS
        .iter()
        .zip(conns.iter().zip(&reqs))
        .filter(|(_, (c, r))| c.errors.total() + r.errors.total() > 0)
        .map(|(v, (c, r))| format!("{}: connections {}; keep-alive {}", v.name, c.errors.text(), r.errors.text()))
        .collect();
    if !failing.is_empty() {
        let _ = writeln!(s, "\nFailed requests (all rounds, warm-up included): {}", failing.join("; "));
    }
    s
}

/// The direct row's lowest and highest CPU per request over the rounds (None with fewer than two).
fn spread(samples: &[Vec<Sample>], pick: fn(&Sample) -> &Measured) -> Option<(f64, f64)> {
    let v: Vec<f64> = samples[DIRECT].iter().map(|x| pick(x).cpu_per_op).filter(|x| x.is_finite()).collect();
    (v.len() >= 2).then(|| (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max)))
}

/// The direct row's spread over rounds, in the table's unit: marginals smaller than it are noise.
fn noise(s: &mut String, samples: &[Vec<Sample>], pick: fn(&Sample) -> &Measured, scale: f64, unit: &str) {
    let _ = match spread(samples, pick) {
        Some((lo, hi)) => writeln!(
            s,
            "\nDirect row over {} rounds: {:.3}–{:.3} {unit}; marginals smaller than that spread are noise.",
            samples[DIRECT].len(),
            lo * scale,
            hi * scale
        ),
        None => writeln!(s, "\nOne round: no spread of the direct row to judge the marginals by."),
    };
}

fn shares(v: &[f64]) -> String {
    v.iter().map(|x| format!("{:.0}%", x * 100.0)).collect::<Vec<_>>().join("/")
}

fn verdict_name(v: u32) -> String {
    match v {
        0 => "XDP_ABORTED".into(),
        1 => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        3 => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        n => format!("{n}"),
    }
}
