//! `cargo xtask bench cluster`: the cluster lab (`lab::cluster`) under load, with one node announcing the DSR VIP
//! and with every node announcing it, in interleaved rounds: new connections per second through the VIP (each a
//! connect, one request and its answer, and the close, from the client's many addresses), errors, and how the
//! router's ECMP spread them over the nodes (XDP's new-flow counters). Everything shares this host's cores, so
//! the figures say what ECMP and the nodes' XDP do, not what separate machines would add.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
    time::timeout,
};

use crate::{
    bench, bench_probe,
    lab::{
        self,
        cluster::{self, Cluster, ClusterSpec},
    },
    workspace,
};

/// Options of one run.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    /// Connections in flight at once.
    pub connections: usize,
    /// Nodes of the many-node case.
    pub nodes: usize,
}

/// The VIP (DSR: the backends' port), every node's admin port, and the client addresses used in turn.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 20), lab::DEMO_PORT);
const ADMIN_PORT: u16 = 9095;
const CLIENTS: usize = 1_000;
/// A connection slower than this (connect, or the whole answer) counts as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// One measurement.
struct Sample {
    nodes: usize,
    /// Connections answered in the window, and per second.
    answered: u64,
    per_second: f64,
    errors: u64,
    /// Flows each node's XDP gave a backend.
    per_node: Vec<u64>,
    /// CPU time of each node's `l4_steer` over the window (BPF run-time statistics), ms.
    xdp_ms: Vec<f64>,
}

pub fn cluster(opts: &Options) -> anyhow::Result<()> {
    if !workspace::is_root() {
        bail!("the benchmark builds network namespaces and loads XDP: run it as root");
    }
    if opts.nodes < 2 || opts.nodes > cluster::MAX_NODES || opts.rounds == 0 || opts.connections == 0 {
        bail!("--nodes must be 2-{}, --rounds and --connections at least 1", cluster::MAX_NODES);
    }
    crate::build_ebpf::build_ebpf(true).context("the nodes load XDP")?;
    let bin = bench::build_release()?;
    let bird = lab::program("bird", "bird2").map_err(anyhow::Error::msg)?;
    let spec = ClusterSpec {
        prefix: format!("smbc{}", std::process::id() % 100_000),
        nodes: opts.nodes,
        backends: 3,
        clients: CLIENTS,
        speedmimi: Some(bin.clone()),
        bird,
    };
    let mut c = Cluster::up(spec).map_err(anyhow::Error::msg)?;
    // Run-time statistics for as long as this is held: each node's XDP CPU time.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enable BPF run-time statistics")?;
    c.prepare_dsr(&bin, *VIP.ip()).map_err(anyhow::Error::msg)?;
    let dir = workspace::target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let config = dir.join("cluster-node.yaml");
    fs::write(&config, cluster::node_config(&c, *VIP.ip(), VIP.port(), "dsr", ADMIN_PORT))?;
    let mut samples = Vec::new();
    for round in 0..opts.rounds {
        for nodes in [1, opts.nodes] {
            let s = measure(&c, &bin, &config, nodes, opts).with_context(|| format!("{nodes} node(s)"))?;
            println!(
                "bench: round {} {nodes} node(s): {:.0} connections/s, {} errors, new flows per node {:?}, XDP ms per \
                 node {:?}",
                round + 1,
                s.per_second,
                s.errors,
                s.per_node,
                s.xdp_ms.iter().map(|m| m.round()).collect::<Vec<_>>()
            );
            samples.push(s);
        }
    }
    drop(stats);
    let table = report(&samples, opts);
    println!("\n{table}");
    let path = dir.join("cluster.md");
    fs::write(&path, &table)?;
    println!("bench: written to {}", path.display());
    Ok(())
}

/// Starts SpeedMimi on the first `nodes` nodes, waits until the router routes the VIP over them, loads it, and
/// stops them (SIGTERM) until the router has no route left.
fn measure(c: &Cluster, bin: &Path, config: &Path, nodes: usize, opts: &Options) -> anyhow::Result<Sample> {
    let mut children: Vec<Child> = Vec::new();
    let result = (|| {
        for i in 0..nodes {
            let child = lab::command_in(&c.ns_node(i), &[&bin.to_string_lossy(), "-c", &config.to_string_lossy()])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("start SpeedMimi on node {i}"))?;
            children.push(child);
        }
        wait_hops(c, nodes)?;
        // A second of warm-up (neighbours, the nodes' flow tables), then the measured window.
        load(c, opts.connections, Duration::from_secs(1))?;
        let (before, xdp_before) = (new_flows(c, nodes), xdp_run_ns());
        let (ok, errors, took) = load(c, opts.connections, Duration::from_secs(opts.seconds))?;
        let per_node = new_flows(c, nodes).iter().zip(&before).map(|(a, b)| a.saturating_sub(*b)).collect();
        let xdp_ms = xdp_run_ns()
            .iter()
            .map(|(id, ns)| {
                let was = xdp_before.iter().find(|(i, _)| i == id).map_or(0, |(_, n)| *n);
                ns.saturating_sub(was) as f64 / 1e6
            })
            .collect();
        Ok(Sample { nodes, answered: ok, per_second: ok as f64 / took.as_secs_f64(), errors, per_node, xdp_ms })
    })();
    for child in &mut children {
        bench::stop(child);
    }
    wait_hops(c, 0)?;
    result
}

/// Closed-loop load from the client namespace for `window`: `connections` at once, each a new connection from
/// the next client address with one request (`Connection: close`); answers counted and errors, and how long it
/// took.
fn load(c: &Cluster, connections: usize, window: Duration) -> anyhow::Result<(u64, u64, Duration)> {
    lab::in_netns(&c.ns_client(), || -> anyhow::Result<(u64, u64, Duration)> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let (ok, errors, next) =
                (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicUsize::new(0)));
            let started = Instant::now();
            let deadline = started + window;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..connections {
                let (ok, errors, next) = (ok.clone(), errors.clone(), next.clone());
                tasks.spawn(async move {
                    while Instant::now() < deadline {
                        let from = lab::client_addr(next.fetch_add(1, Relaxed) % CLIENTS);
                        match timeout(IO_TIMEOUT, one(from)).await {
                            Ok(Ok(true)) => ok.fetch_add(1, Relaxed),
                            _ => errors.fetch_add(1, Relaxed),
                        };
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
            Ok((ok.load(Relaxed), errors.load(Relaxed), started.elapsed()))
        })
    })
    .map_err(anyhow::Error::msg)?
}

/// One connection from `from` to the VIP with one request; true when the answer is a 200.
async fn one(from: Ipv4Addr) -> std::io::Result<bool> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    let mut s = socket.connect(SocketAddr::V4(VIP)).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n").await?;
    let mut answer = Vec::with_capacity(256);
    s.read_to_end(&mut answer).await?;
    Ok(answer.starts_with(b"HTTP/1.1 200"))
}

/// Every loaded `l4_steer` (one per running node): its id and run time so far, ns.
fn xdp_run_ns() -> Vec<(u32, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some("l4_steer"))
        .map(|p| (p.id(), p.run_time().as_nanos() as u64))
        .collect()
}

/// Each running node's `speedmimi_xdp_new_flows_total`.
fn new_flows(c: &Cluster, nodes: usize) -> Vec<u64> {
    (0..nodes)
        .map(|i| {
            lab::in_netns(&c.ns_node(i), || bench_probe::admin_metric(ADMIN_PORT, "speedmimi_xdp_new_flows_total"))
                .ok()
                .and_then(|r| r.ok().flatten())
                .unwrap_or(0)
        })
        .collect()
}

/// Until the router's route to the VIP has `n` next hops (none: no route), at most 30 s.
fn wait_hops(c: &Cluster, n: usize) -> anyhow::Result<()> {
    c.wait_next_hops(*VIP.ip(), Duration::from_secs(30), &format!("{n} next hops"), |h| h.len() == n)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.bird_logs()))
}

fn report(samples: &[Sample], opts: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "`cargo xtask bench cluster --rounds {} --seconds {} --connections {}`: new connections per second through a \
         DSR VIP announced by one node and by {} nodes behind the router's ECMP route (cluster lab, 3 demo backends, \
         {CLIENTS} client addresses, nothing pinned: every namespace shares this host's cores). {}, {}.\n",
        opts.rounds,
        opts.seconds,
        opts.connections,
        opts.nodes,
        bench::utc_date(),
        bench::machine_line()
    );
    let _ = writeln!(
        s,
        "| nodes | connections/s (median) | rounds | errors | new flows per node, last round | XDP CPU per node, \
         last round (ms over {} s) | XDP CPU per connection, all nodes (µs) |",
        opts.seconds
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for nodes in [1, opts.nodes] {
        let of: Vec<&Sample> = samples.iter().filter(|x| x.nodes == nodes).collect();
        let median = bench::median(of.iter().map(|x| x.per_second).collect());
        medians.push(median);
        let per_conn =
            bench::median(of.iter().map(|x| x.xdp_ms.iter().sum::<f64>() * 1e3 / x.answered.max(1) as f64).collect());
        let last = of.last();
        let _ = writeln!(
            s,
            "| {nodes} | {median:.0} | {} | {} | {:?} | {} | {per_conn:.2} |",
            of.iter().map(|x| format!("{:.0}", x.per_second)).collect::<Vec<_>>().join(", "),
            of.iter().map(|x| x.errors).sum::<u64>(),
            last.map(|x| x.per_node.clone()).unwrap_or_default(),
            last.map(|x| x.xdp_ms.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" / "))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(s, "\n{} nodes against 1: {:.2}×.", opts.nodes, medians[1] / medians[0].max(1.0));
    s
}
