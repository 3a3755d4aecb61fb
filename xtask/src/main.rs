//! Command-line entry point of `cargo xtask`: parses the subcommand and dispatches to its module.

mod bench;
mod bench_balance;
mod bench_cluster;
mod bench_h2c;
mod bench_l4;
mod bench_peer;
mod bench_probe;
mod bench_scale;
mod bench_splice;
mod build_ebpf;
mod cluster_lab;
mod fuzz;
mod lab;
mod open_loop;
mod run;
mod test;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// SpeedMimi developer tasks (`cargo xtask <command>`).
#[derive(Debug, Parser)]
#[command(name = "xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the eBPF toolchain if missing (rust-src, LLVM 22, bpf-linker) and build the kernel object.
    BuildEbpf {
        /// Build the eBPF object with the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build everything and start the daemon (with three demo backends unless a config is given).
    Run {
        /// Build with the release profile (the default).
        #[arg(long, conflicts_with = "debug")]
        release: bool,
        /// Build with the dev profile.
        #[arg(long)]
        debug: bool,
        /// Arguments passed to the daemon (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks, side by side with the peers (needs root: installs nginx, haproxy, wrk, h2load).
    Bench {
        #[command(subcommand)]
        which: BenchKind,
    },
    /// The load generators and backend of `bench splice` and `bench http`, run as pinned child processes.
    #[command(hide = true)]
    BenchPeer {
        #[command(subcommand)]
        role: bench_peer::Role,
    },
    /// Build the eBPF object, then run the workspace test suite.
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the fuzz targets under fuzz/ (installing cargo-fuzz if missing) and run each for a
    /// bounded time from its seed corpus; fails on a crash or a hang. The xdp target needs root.
    Fuzz {
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 30)]
        time: u64,
        /// Targets to run (default: all of config, request_head, h1_response, admin, xdp).
        targets: Vec<String>,
    },
    /// A network-namespace lab (client, load balancer, switch, backends) for L4 work by hand (needs root).
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Debug, Subcommand)]
enum LabAction {
    /// Build the `smlab*` namespaces, start a demo backend in each backend namespace, and leave it all running.
    Up {
        /// Extra client source addresses (10.200.X.Y/32) on the client namespace's `lo`.
        #[arg(long, default_value_t = 0)]
        clients: usize,
        /// Backend namespaces, each running `speedmimi demo-backend` on port 8080.
        #[arg(long, default_value_t = 3)]
        backends: usize,
    },
    /// Build a cluster lab (`smlabk*`): a client, a router running BIRD, SpeedMimi nodes each announcing a DSR VIP
    /// through its own BIRD session, and demo backends; leave it all running.
    Cluster {
        /// SpeedMimi nodes behind the router's ECMP route.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Backend namespaces, each running `speedmimi demo-backend` on port 8080.
        #[arg(long, default_value_t = 3)]
        backends: usize,
        /// Extra client source addresses (10.200.X.Y/32) on the client namespace's `lo`.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
    },
    /// Stop the lab's processes and delete every `smlab*` namespace (the cluster lab's too).
    Down,
}

/// Namespace prefix of the lab `cargo xtask lab` manages.
const LAB_PREFIX: &str = "smlab";

#[derive(Debug, Subcommand)]
enum BenchKind {
    /// HTTP/1.1 through SpeedMimi, HAProxy, nginx and direct: small, 10 KiB and 1 MiB responses, a 4 KiB
    /// POST, a connection per request, and a small response over prior-knowledge h2c from the client
    /// (h2load); throughput per proxy core, latency (also at a fixed rate), syscalls and SpeedMimi's
    /// allocations per request.
    Http {
        /// Interleaved rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent client connections (requests in flight in the h2c case, five streams per
        /// h2load connection).
        #[arg(long, default_value_t = 50)]
        connections: u32,
        /// Two workers per proxy, not pinned (SpeedMimi server.workers, HAProxy nbthread, nginx
        /// worker_processes), instead of one pinned to core 0.
        #[arg(long)]
        two_workers: bool,
        /// Run only these cases (comma-separated keys: small, 10k, 1m, post, close, h2c).
        #[arg(long, value_delimiter = ',')]
        cases: Vec<String>,
    },
    /// Upgraded (WebSocket) flows: SpeedMimi spliced and copied, nginx, HAProxy with and without
    /// splice, and direct: ping-pong latency, CPU per GB, bulk throughput, memory per idle flow.
    Splice {
        /// Interleaved rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// 1 KiB round trips per latency measurement.
        #[arg(long, default_value_t = 20_000)]
        pings: usize,
        /// Concurrent flows of the many-streams measurement.
        #[arg(long, default_value_t = 64)]
        streams: usize,
        /// Idle upgraded flows held open for the memory measurement (a few hundred undercount:
        /// the proxy first reuses heap it freed at startup).
        #[arg(long, default_value_t = 2_000)]
        idle_flows: usize,
        /// SpeedMimi's `ebpf.splice_budget` (per flow and direction).
        #[arg(long, default_value = "4MiB")]
        splice_budget: String,
    },
    /// Balancing under faults: three demo origins per shape (equal; one 4× slower; one stalling
    /// 300 ms every 3 s; one answering 10% 503 and one resetting 2%), an open-loop load at a fixed
    /// rate through SpeedMimi with each balancer, HAProxy leastconn and nginx least_conn (each with
    /// its retry options) and direct: p50, p99, p99.9, share per origin, client-visible errors.
    Balance {
        /// Interleaved rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds of load per row (a multiple of the 3 s stall period gives every row the same stall time).
        #[arg(long, default_value_t = 12)]
        seconds: u64,
        /// Requests per second.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Every origin's base latency in ms (the slow origin's is 4× this).
        #[arg(long, default_value_t = 10)]
        delay_ms: u64,
        /// Keep-alive client connections (enough for the requests a stall holds).
        #[arg(long, default_value_t = 512)]
        connections: u64,
    },
    /// Idle WebSocket flows ramped in steps through SpeedMimi (spliced and copied), HAProxy and
    /// nginx until the first failed handshake: proxy RSS and kernel TCP memory per flow, time to
    /// open, flows still open, a fresh flow's echo (`make test-million`).
    Scale {
        /// Cumulative flow counts (comma-separated, ascending). One proxy process holds at most
        /// ~9,900 flows here (20,000 open files, two per flow): the last default step shows that ceiling.
        #[arg(long, value_delimiter = ',', default_value = "1000,2500,5000,7500,9500,10500")]
        steps: Vec<usize>,
    },
    /// The cluster lab under load: new connections per second through a DSR VIP announced by one node and by
    /// several behind the router's ECMP route (root; installs BIRD).
    Cluster {
        /// Interleaved rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Nodes of the many-node case.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// The XDP flow table at scale: l4_steer's LRU tables filled with each count of flows through
    /// BPF_PROG_TEST_RUN, ns per packet on hits and misses, and the tables' memory.
    Flows {
        /// Flow counts (comma-separated), each its own table size.
        #[arg(long, value_delimiter = ',', default_value = "1000,1000000,10000000")]
        sizes: Vec<u32>,
        /// Hits and misses timed per size.
        #[arg(long, default_value_t = 200_000)]
        samples: u32,
    },
    /// L4 in the netns lab: connections/s and keep-alive requests/s through XDP (NAT and DSR), nftables DNAT
    /// (IPVS's stand-in), HAProxy in TCP mode, SpeedMimi's L7 proxy and direct forwarding, with the CPU each
    /// costs; and l4_steer's ns per packet through BPF_PROG_TEST_RUN.
    L4 {
        /// Interleaved rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per measurement (each row is measured twice per round: connections, keep-alive).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Client source addresses per row (each row has its own block on the client's `lo`).
        #[arg(long, default_value_t = 500)]
        clients: usize,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::BuildEbpf { debug } => {
            build_ebpf::build_ebpf(!debug)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { release: _, debug, args } => run::run(!debug, &args),
        Command::Test { args } => test::test(&args),
        Command::Fuzz { time, targets } => fuzz::fuzz(&fuzz::Options { time, targets }),
        Command::Bench { which: BenchKind::Http { rounds, seconds, connections, two_workers, cases } } => {
            bench::http(&bench::Options { rounds, seconds, connections, two_workers, cases })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { which: BenchKind::Splice { rounds, seconds, pings, streams, idle_flows, splice_budget } } => {
            bench_splice::splice(&bench_splice::Options {
                rounds,
                seconds,
                pings,
                streams,
                idle_flows,
                splice_budget,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { which: BenchKind::Balance { rounds, seconds, rate, delay_ms, connections } } => {
            bench_balance::balance(&bench_balance::Options { rounds, seconds, rate, delay_ms, connections })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { which: BenchKind::Cluster { rounds, seconds, connections, nodes } } => {
            bench_cluster::cluster(&bench_cluster::Options { rounds, seconds, connections, nodes })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { which: BenchKind::Scale { steps } } => {
            bench_scale::scale(&bench_scale::Options { steps })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { which: BenchKind::Flows { sizes, samples } } => {
            bench_l4::flows::flows(&bench_l4::flows::Options { sizes, samples })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { which: BenchKind::L4 { rounds, seconds, clients } } => {
            bench_l4::l4(&bench_l4::Options { rounds, seconds, clients })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab { action: LabAction::Up { clients, backends } } => {
            lab_up(clients, backends)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab { action: LabAction::Cluster { nodes, backends, clients } } => {
            cluster_lab::up(nodes, backends, clients)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab { action: LabAction::Down } => {
            let deleted = lab::cleanup_stale(LAB_PREFIX).map_err(anyhow::Error::msg)?;
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{}-cluster", cluster_lab::PREFIX)));
            if deleted.is_empty() {
                println!("xtask: no {LAB_PREFIX}* namespaces");
            } else {
                println!("xtask: deleted {}", deleted.join(" "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchPeer { role } => {
            bench_peer::run(role)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `cargo xtask lab up`: builds the daemon (for its demo backends), brings the lab up and leaves it running.
fn lab_up(clients: usize, backends: usize) -> anyhow::Result<()> {
    let existing = lab::list_namespaces(LAB_PREFIX).map_err(anyhow::Error::msg)?;
    if !existing.is_empty() {
        anyhow::bail!("a lab is already up ({}): run `cargo xtask lab down` first", existing.join(" "));
    }
    workspace::run_checked(workspace::cargo().args(["build", "-p", "speedmimi", "--bin", "speedmimi"]))?;
    let bin = workspace::target_dir().join("debug").join("speedmimi");
    let spec = lab::LabSpec { prefix: LAB_PREFIX.into(), clients, backends, speedmimi: Some(bin) };
    let lab = lab::Lab::up(spec).map_err(anyhow::Error::msg)?;
    println!("xtask: lab up");
    println!(
        "  client   {:<8} {} dev {}, {clients} source address(es) 10.200.X.Y/32 on lo",
        lab.ns_client(),
        lab::CLIENT_IP,
        lab::CLIENT_IF
    );
    println!(
        "  lb       {:<8} {} dev {}, {} dev {}",
        lab.ns_lb(),
        lab::LB_FRONT_IP,
        lab::LB_FRONT_IF,
        lab::LB_BACK_IP,
        lab::LB_BACK_IF
    );
    println!("  switch   {:<8} br0", lab.ns_switch());
    for i in 0..backends {
        println!("  backend  {:<8} {}:{} (demo backend b{i})", lab.ns_backend(i), lab::backend_addr(i), lab::DEMO_PORT);
    }
    println!(
        "\ntry:  ip netns exec {} curl -s http://{}:{}/\nstop: cargo xtask lab down",
        lab.ns_client(),
        lab::backend_addr(0),
        lab::DEMO_PORT
    );
    lab.detach();
    Ok(())
}
