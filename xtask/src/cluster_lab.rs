//! `cargo xtask lab cluster`: the cluster lab (`lab::cluster`) with SpeedMimi running on every node, announcing a
//! DSR VIP, left running for work by hand; `cargo xtask lab down` removes it.

use std::{fs, path::Path, process::Stdio, time::Duration};

use anyhow::{Context, bail};

use crate::{
    lab::{
        self,
        cluster::{self, Cluster, ClusterSpec},
    },
    workspace,
};

/// The cluster lab's namespace prefix: under `lab`'s, so `lab down` removes it.
pub const PREFIX: &str = "smlabk";
/// The VIP the nodes announce (DSR: the backends' port).
const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 0, 20);
/// Every node's admin API, inside its namespace.
const ADMIN_PORT: u16 = 9090;

pub fn up(nodes: usize, backends: usize, clients: usize) -> anyhow::Result<()> {
    let existing = lab::list_namespaces("smlab").map_err(anyhow::Error::msg)?;
    if !existing.is_empty() {
        bail!("a lab is already up ({}): run `cargo xtask lab down` first", existing.join(" "));
    }
    workspace::run_checked(workspace::cargo().args(["build", "-p", "speedmimi", "--bin", "speedmimi"]))?;
    let bin = workspace::target_dir().join("debug").join("speedmimi");
    let bird = lab::program("bird", "bird2").map_err(anyhow::Error::msg)?;
    let spec = ClusterSpec { prefix: PREFIX.into(), nodes, backends, clients, speedmimi: Some(bin.clone()), bird };
    let mut c = Cluster::up(spec).map_err(anyhow::Error::msg)?;
    c.prepare_dsr(&bin, VIP).map_err(anyhow::Error::msg)?;
    let config = std::env::temp_dir().join(format!("{PREFIX}-cluster")).join("node.yaml");
    fs::write(&config, cluster::node_config(&c, VIP, lab::DEMO_PORT, "dsr", ADMIN_PORT))
        .with_context(|| format!("write {}", config.display()))?;
    for i in 0..nodes {
        let child = start_node(&c, i, &bin, &config)?;
        c.adopt(child);
    }
    c.wait_next_hops(VIP, Duration::from_secs(30), &format!("{nodes} next hops"), |h| h.len() == nodes)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.bird_logs()))?;
    println!("xtask: cluster up: {nodes} nodes announce {VIP}:{} (DSR) to the router", lab::DEMO_PORT);
    println!(
        "  client   {:<9} {} dev eth0, {clients} source address(es) 10.200.X.Y/32 on lo",
        c.ns_client(),
        lab::CLIENT_IP
    );
    println!(
        "  router   {:<9} BIRD, ECMP over the nodes: ip netns exec {} ip route show {VIP}",
        c.ns_router(),
        c.ns_router()
    );
    for i in 0..nodes {
        println!(
            "  node     {:<9} {} (to the router), {} (to the backends), SpeedMimi + BIRD, admin 127.0.0.1:{ADMIN_PORT}",
            c.ns_node(i),
            cluster::node_ip(i),
            cluster::node_back_ip(i)
        );
    }
    for i in 0..backends {
        println!(
            "  backend  {:<9} {}:{} (demo backend b{i}, {VIP} on lo)",
            c.ns_backend(i),
            lab::backend_addr(i),
            lab::DEMO_PORT
        );
    }
    println!(
        "\ntry:  ip netns exec {} curl -s http://{VIP}:{}/\nstop: cargo xtask lab down",
        c.ns_client(),
        lab::DEMO_PORT
    );
    c.detach();
    Ok(())
}

fn start_node(c: &Cluster, i: usize, bin: &Path, config: &Path) -> anyhow::Result<std::process::Child> {
    let log_path = std::env::temp_dir().join(format!("{}.log", c.ns_node(i)));
    let log = fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    lab::command_in(&c.ns_node(i), &[&bin.to_string_lossy(), "-c", &config.to_string_lossy()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start SpeedMimi in {}", c.ns_node(i)))
}
