//! `cargo xtask bench l4`: L4 load balancing in the netns lab ([`crate::lab`]). New connections per second and
//! keep-alive requests per second through SpeedMimi's XDP steering (NAT and DSR), nftables DNAT with conntrack
//! (standing in for IPVS, which this kernel lacks), HAProxy in TCP mode and SpeedMimi's L7 proxy, beside plain
//! kernel forwarding; then the XDP program's own time per packet through BPF_PROG_TEST_RUN.
//!
//! XDP and forwarding run in softirq on whichever core sends the packet, so, as in `bench splice`, the cost measure
//! is whole-machine CPU from /proc/stat (softirq included) minus what the direct row costs in the same round. The
//! XDP program's own share comes from the kernel's BPF run-time statistics.

pub mod flows;
mod load;
mod report;
mod setup;
mod testrun;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::Duration,
};

use anyhow::{Context, bail};
use aya::sys::{Stats, enable_stats};

use crate::{bench, build_ebpf, lab, workspace};
use load::{Pids, Probe, Sample, drive, errors_suffix, on_load_core, preflight};
use setup::{
    ipvs_note, nft_rules, pin_namespace, remove_stale, start_daemon, start_decap, start_haproxy, sysctls,
    wait_listening, wait_xdp,
};
use testrun::{LOOP_REPEAT, SINGLE_CALLS, test_runs};

/// Options of one benchmark run.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    /// Client source addresses per variant.
    pub clients: usize,
}

/// The daemon and HAProxy run here; the LB's softirq work does not follow them (see the module docs).
const LB_CORE: &str = crate::bench::PROXY_CORE;
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
/// Pause between measurements, for the previous one's closing handshakes.
const SETTLE: Duration = Duration::from_millis(500);
/// Namespaces of this bench are `l4b{pid}-…`, so a killed run's leftovers can be told apart and removed.
const NS_TAG: &str = "l4b";
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

/// Runs the benchmark and writes its table to `target/bench/l4.md`.
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
    let nft = lab::program("nft", "nftables").map_err(anyhow::Error::msg)?;
    let haproxy = lab::program("haproxy", "haproxy").map_err(anyhow::Error::msg)?;
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
            let run = |load| on_load_core(&client, drive(variant.route, load, &sources, opts.seconds, &probe));
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

    let setup = report::Setup { ipvs, xdp_mode, pools: &pools };
    let table = report::report(&samples, &tests, &setup, opts);
    println!("\n{table}");
    let path = dir.join("l4.md");
    fs::write(&path, &table)?;
    println!("bench: table written to {}", path.display());
    Ok(())
}
