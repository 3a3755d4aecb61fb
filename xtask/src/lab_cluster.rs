//! The cluster lab (`cargo xtask lab cluster`): a client, a router, N SpeedMimi nodes and M backends, each in its
//! own namespace, with BIRD 2 in the router and in every node. A node's SpeedMimi announces its servable VIPs
//! (`announce`), its BIRD exports them over BGP, and the router installs one ECMP route per VIP over the nodes
//! that announce it, hashing flows on their 5-tuple. Part of the lab module, whose helpers it uses; std only.
//!
//! ```text
//!                                             ┌─ n0 ── eth0 10.110.0.2 {p}n0 eth1 10.101.0.1 ─┐
//! {p}c eth0 10.100.0.2 ── eth0 10.100.0.1 {p}r ├─ n1 ── eth0 10.110.1.2 {p}n1 eth1 10.101.0.2 ─┼─ br0 {p}s ── {p}b0.. 10.101.0.10..
//!      10.200.X.Y/32 on lo                    └─ n2 ── eth0 10.110.2.2 {p}n2 eth1 10.101.0.3 ─┤
//!                                             {p}r eth1 10.101.0.254 (the backends' gateway) ──┘
//! ```
//!
//! The backends answer through the router: in DSR mode straight to the client, as in production. In NAT mode
//! the answer to a flow would have to come back through the node that rewrote it, which this topology (and ECMP
//! in general, without SNAT) does not give.

use std::{
    env, fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{
    BACKEND_IF, BACKEND_MTU, CLIENT_IF, CLIENT_IP, CLIENT_SOURCE_NET, LB_FRONT_IP, MAX_BACKENDS, MAX_CLIENTS,
    client_addr, command_in, euid, ip, ip_batch, program, run_in, set_offloads, start_demo_backends, teardown, veth,
    write_sysctls, zero_rp_filters,
};

/// The router's address towards the backends: their default gateway.
pub const ROUTER_BACK_IP: Ipv4Addr = Ipv4Addr::new(10, 101, 0, 254);
/// The router's address towards the client (the client's default gateway).
pub const ROUTER_CLIENT_IP: Ipv4Addr = LB_FRONT_IP;
/// AS numbers: the router's, and the one all nodes share (so their paths are equal and the router merges them).
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;
/// SpeedMimi's `announce.interface` on every node, which the node's BIRD exports.
pub const VIP_INTERFACE: &str = "speedmimi-vip";
/// The node's interfaces: towards the router, and towards the backends.
pub const NODE_FRONT_IF: &str = "eth0";
pub const NODE_BACK_IF: &str = "eth1";
/// Nodes the 10.110.i.0/24 and 10.101.0.(1+i) schemes hold (backends start at 10.101.0.10).
pub const MAX_NODES: usize = 8;

/// Node `i`'s address on its link to the router: 10.110.i.2.
pub fn node_ip(i: usize) -> Ipv4Addr {
    assert!(i < MAX_NODES, "node {i} is beyond the 10.110.i.0/24 scheme");
    Ipv4Addr::new(10, 110, i as u8, 2)
}

/// The router's address on its link to node `i`: 10.110.i.1.
fn router_ip_to(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 110, i as u8, 1)
}

/// Node `i`'s address towards the backends: 10.101.0.(1+i).
pub fn node_back_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 101, 0, 1 + i as u8)
}

/// What to build.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Namespace names are this plus a suffix (c, r, s, n0.., b0..).
    pub prefix: String,
    pub nodes: usize,
    pub backends: usize,
    /// Extra client source addresses ([`client_addr`]) on the client's `lo`.
    pub clients: usize,
    /// The `speedmimi` binary whose `demo-backend` runs in every backend namespace; None starts none.
    pub speedmimi: Option<PathBuf>,
    /// BIRD 2's `bird`.
    pub bird: PathBuf,
}

/// A running cluster lab; dropping it stops its processes and deletes its namespaces and files.
#[derive(Debug)]
pub struct Cluster {
    pub prefix: String,
    pub nodes: usize,
    pub backends: usize,
    pub clients: usize,
    created: Vec<String>,
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    /// BIRD's configs, sockets and logs.
    dir: PathBuf,
}

impl Cluster {
    /// Builds the namespaces and links, starts BIRD in the router and every node (each node with a BGP session
    /// to the router) and, with `spec.speedmimi`, a demo backend in every backend namespace. On failure, removes
    /// what it made before returning the error.
    pub fn up(spec: ClusterSpec) -> Result<Cluster, String> {
        let p = &spec.prefix;
        if p.is_empty() || p.len() > 12 || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("cluster prefix {p:?} must be 1-12 letters, digits, '-' or '_'"));
        }
        if spec.nodes == 0 || spec.nodes > MAX_NODES || spec.backends == 0 || spec.backends > MAX_BACKENDS {
            return Err(format!("a cluster has 1-{MAX_NODES} nodes and 1-{MAX_BACKENDS} backends"));
        }
        if spec.clients > MAX_CLIENTS {
            return Err(format!("a cluster has at most {MAX_CLIENTS} client addresses"));
        }
        if euid() != 0 {
            return Err("the cluster lab needs root (it creates network namespaces)".into());
        }
        let ethtool = program("ethtool", "ethtool")?;
        let dir = env::temp_dir().join(format!("{p}-cluster"));
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut cluster = Cluster {
            prefix: spec.prefix.clone(),
            nodes: spec.nodes,
            backends: spec.backends,
            clients: spec.clients,
            created: Vec::new(),
            children: Vec::new(),
            logs: Vec::new(),
            dir,
        };
        // On error `cluster` drops here, which tears down whatever was made.
        cluster.build(&ethtool)?;
        cluster.start_bird(&spec.bird)?;
        if let Some(bin) = &spec.speedmimi {
            let backends: Vec<String> = (0..cluster.backends).map(|i| cluster.ns_backend(i)).collect();
            start_demo_backends(bin, &backends, &cluster.ns_node(0), &mut cluster.children, &mut cluster.logs)?;
        }
        Ok(cluster)
    }

    pub fn ns_client(&self) -> String {
        format!("{}c", self.prefix)
    }

    pub fn ns_router(&self) -> String {
        format!("{}r", self.prefix)
    }

    pub fn ns_switch(&self) -> String {
        format!("{}s", self.prefix)
    }

    pub fn ns_node(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    pub fn ns_backend(&self, i: usize) -> String {
        format!("{}b{i}", self.prefix)
    }

    /// Every namespace of the cluster, whether or not it exists yet.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.ns_client(), self.ns_router(), self.ns_switch()];
        all.extend((0..self.nodes).map(|i| self.ns_node(i)));
        all.extend((0..self.backends).map(|i| self.ns_backend(i)));
        all
    }

    /// Has `child` stopped with the cluster's own processes at teardown.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }

    /// The next hops of the router's BGP route to `vip`/32 (empty when it has none).
    pub fn next_hops(&self, vip: Ipv4Addr) -> Result<Vec<Ipv4Addr>, String> {
        let out = run_in(&self.ns_router(), &["ip", "-4", "route", "show", &format!("{vip}/32"), "proto", "bird"])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        Ok(words.windows(2).filter(|w| w[0] == "via").filter_map(|w| w[1].parse().ok()).collect())
    }

    /// Readies every backend for DSR to `vip`: the VIP on `lo`, and `speedmimi xdp-decap` on its interface (this
    /// kernel has no IPIP module); returns once each has its XDP program attached (at most 10 s each).
    pub fn prepare_dsr(&mut self, bin: &Path, vip: Ipv4Addr) -> Result<(), String> {
        for i in 0..self.backends {
            let ns = self.ns_backend(i);
            run_in(&ns, &["ip", "addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            let child = command_in(&ns, &[&bin.to_string_lossy(), "xdp-decap", "--interface", BACKEND_IF])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start xdp-decap in {ns}: {e}"))?;
            self.children.push(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !run_in(&ns, &["ip", "link", "show", "dev", BACKEND_IF]).is_ok_and(|out| out.contains("prog/xdp")) {
                if Instant::now() >= deadline {
                    return Err(format!("no XDP program on {BACKEND_IF} in {ns} after 10 s"));
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Polls the router's next hops for `vip` (every 20 ms, at most `bound`) until `done` holds for them, and
    /// returns them; the error says what was awaited (`what`) and what the router had last.
    pub fn wait_next_hops(
        &self,
        vip: Ipv4Addr,
        bound: Duration,
        what: &str,
        done: impl Fn(&[Ipv4Addr]) -> bool,
    ) -> Result<Vec<Ipv4Addr>, String> {
        let deadline = Instant::now() + bound;
        loop {
            let hops = self.next_hops(vip)?;
            if done(&hops) {
                return Ok(hops);
            }
            if Instant::now() >= deadline {
                return Err(format!("the router has not {what} for {vip} after {bound:?}; its next hops: {hops:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The BIRD logs, router first.
    pub fn bird_logs(&self) -> String {
        let mut names = vec!["router".to_string()];
        names.extend((0..self.nodes).map(|i| format!("node{i}")));
        names
            .iter()
            .map(|n| {
                format!(
                    "--- BIRD {n} ---\n{}\n",
                    fs::read_to_string(self.dir.join(format!("{n}.log"))).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Leaves the cluster running once this value is gone (`cargo xtask lab cluster`); `cargo xtask lab down`
    /// removes it.
    pub fn detach(mut self) {
        self.children.clear();
        self.created.clear();
        self.logs.clear();
        self.dir = PathBuf::new();
    }

    fn build(&mut self, ethtool: &Path) -> Result<(), String> {
        let (c, r, s) = (self.ns_client(), self.ns_router(), self.ns_switch());
        for ns in self.namespaces() {
            ip(&["netns", "add", &ns]).map_err(|e| format!("cannot create namespace {ns}: {e}"))?;
            self.created.push(ns.clone());
            write_sysctls(&ns, &[("net/ipv4/conf/all/rp_filter", "0"), ("net/ipv4/conf/default/rp_filter", "0")])?;
        }
        // The router hashes flows over the ECMP next hops by their 5-tuple (policy 1), as routers in front of
        // load balancers are set up.
        write_sysctls(&r, &[("net/ipv4/ip_forward", "1"), ("net/ipv4/fib_multipath_hash_policy", "1")])?;
        let mut veth_ends = vec![(c.clone(), CLIENT_IF.to_string()), (r.clone(), "eth0".into())];
        veth((CLIENT_IF, &c), ("eth0", &r))?;
        veth(("eth1", &r), ("r", &s))?;
        veth_ends.extend([(r.clone(), "eth1".into()), (s.clone(), "r".into())]);
        ip(&["-n", &s, "link", "add", "br0", "type", "bridge"]).map_err(|e| format!("bridge in {s}: {e}"))?;
        let mut ports = vec!["r".to_string()];

        let mut client = vec![
            "link set lo up".to_string(),
            format!("link set {CLIENT_IF} up"),
            format!("addr add {CLIENT_IP}/24 dev {CLIENT_IF}"),
            format!("route add default via {ROUTER_CLIENT_IP}"),
        ];
        client.extend((0..self.clients).map(|i| format!("addr add {}/32 dev lo", client_addr(i))));
        ip_batch(&c, &client)?;
        let (net, len) = CLIENT_SOURCE_NET;
        let mut router = vec![
            "link set lo up".to_string(),
            "link set eth0 up".into(),
            format!("link set eth1 mtu {BACKEND_MTU} up"),
            format!("addr add {ROUTER_CLIENT_IP}/24 dev eth0"),
            format!("addr add {ROUTER_BACK_IP}/24 dev eth1"),
            format!("route add {net}/{len} via {CLIENT_IP}"),
        ];
        for i in 0..self.nodes {
            let n = self.ns_node(i);
            let (to_router, to_switch) = (format!("n{i}"), format!("n{i}"));
            veth((NODE_FRONT_IF, &n), (&to_router, &r))?;
            veth((NODE_BACK_IF, &n), (&to_switch, &s))?;
            veth_ends.extend([
                (n.clone(), NODE_FRONT_IF.into()),
                (n.clone(), NODE_BACK_IF.into()),
                (r.clone(), to_router.clone()),
                (s.clone(), to_switch.clone()),
            ]);
            ports.push(to_switch);
            router.push(format!("link set {to_router} up"));
            router.push(format!("addr add {}/24 dev {to_router}", router_ip_to(i)));
            write_sysctls(&n, &[("net/ipv4/ip_forward", "1")])?;
            ip_batch(
                &n,
                &[
                    "link set lo up".into(),
                    format!("link set {NODE_FRONT_IF} up"),
                    format!("link set {NODE_BACK_IF} mtu {BACKEND_MTU} up"),
                    format!("addr add {}/24 dev {NODE_FRONT_IF}", node_ip(i)),
                    format!("addr add {}/24 dev {NODE_BACK_IF}", node_back_ip(i)),
                    format!("route add default via {}", router_ip_to(i)),
                ],
            )?;
        }
        ip_batch(&r, &router)?;
        for i in 0..self.backends {
            let b = self.ns_backend(i);
            let port = format!("b{i}");
            veth((BACKEND_IF, &b), (&port, &s))?;
            veth_ends.extend([(b.clone(), BACKEND_IF.into()), (s.clone(), port.clone())]);
            ports.push(port);
            ip_batch(
                &b,
                &[
                    "link set lo up".into(),
                    format!("link set {BACKEND_IF} mtu {BACKEND_MTU} up"),
                    format!("addr add {}/24 dev {BACKEND_IF}", super::backend_addr(i)),
                    format!("route add default via {ROUTER_BACK_IP}"),
                ],
            )?;
        }
        let mut switch = vec!["link set lo up".to_string(), "link set br0 up".to_string()];
        for port in &ports {
            switch.push(format!("link set {port} master br0"));
            switch.push(format!("link set {port} mtu {BACKEND_MTU} up"));
        }
        ip_batch(&s, &switch)?;
        for ns in self.namespaces() {
            zero_rp_filters(&ns)?;
        }
        for (ns, dev) in &veth_ends {
            set_offloads(ethtool, ns, dev)?;
        }
        Ok(())
    }

    /// BIRD in the router (a BGP session per node, routes into the kernel with ECMP) and in every node (its
    /// session to the router, exporting the addresses of [`VIP_INTERFACE`] and nothing else).
    fn start_bird(&mut self, bird: &Path) -> Result<(), String> {
        let mut router = format!(
            "router id {ROUTER_CLIENT_IP};\nlog stderr all;\nprotocol device {{ scan time 1; }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n"
        );
        for i in 0..self.nodes {
            router.push_str(&format!(
                "protocol bgp node{i} {{ local {} as {ROUTER_AS}; neighbor {} as {NODE_AS}; connect delay time 1; \
                 connect retry time 1; ipv4 {{ import all; export none; }}; }}\n",
                router_ip_to(i),
                node_ip(i)
            ));
        }
        self.spawn_bird(bird, &self.ns_router(), "router", &router)?;
        for i in 0..self.nodes {
            let node = format!(
                "router id {me};\nlog stderr all;\nprotocol device {{ scan time 1; }}\n\
                 protocol direct vips {{ ipv4; interface \"{VIP_INTERFACE}\"; }}\n\
                 protocol bgp upstream {{ local {me} as {NODE_AS}; neighbor {rtr} as {ROUTER_AS}; \
                 connect delay time 1; connect retry time 1; \
                 ipv4 {{ import none; export where proto = \"vips\"; }}; }}\n",
                me = node_ip(i),
                rtr = router_ip_to(i)
            );
            self.spawn_bird(bird, &self.ns_node(i), &format!("node{i}"), &node)?;
        }
        Ok(())
    }

    fn spawn_bird(&mut self, bird: &Path, ns: &str, name: &str, conf: &str) -> Result<(), String> {
        let (conf_path, sock, log) = (
            self.dir.join(format!("{name}.conf")),
            self.dir.join(format!("{name}.ctl")),
            self.dir.join(format!("{name}.log")),
        );
        fs::write(&conf_path, conf).map_err(|e| format!("cannot write {}: {e}", conf_path.display()))?;
        let out = fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let argv = [&*bird.to_string_lossy(), "-f", "-c", &conf_path.to_string_lossy(), "-s", &sock.to_string_lossy()];
        let child = command_in(ns, &argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start BIRD in {ns}: {e}"))?;
        self.children.push(child);
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        teardown(&mut self.created, &mut self.children, &mut self.logs);
        if !self.dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// SpeedMimi's config for every node: one `l4:` service on `vip:port` (DSR keeps the backends' port) over the
/// cluster's demo backends, balanced by the same Maglev ring on every node, and announced.
pub fn node_config(cluster: &Cluster, vip: Ipv4Addr, port: u16, mode: &str, admin_port: u16) -> String {
    let mut y = format!(
        "server: {{host: 127.0.0.1, port: 8000, drain_timeout: 2s}}\nadmin: {{host: 127.0.0.1, port: {admin_port}}}\n\
         backends:\n  web:\n"
    );
    for i in 0..cluster.backends {
        y.push_str(&format!("    - {{id: b{i}, host: {}, port: {}}}\n", super::backend_addr(i), super::DEMO_PORT));
    }
    y.push_str(&format!(
        "routing:\n  main: {{upstream: web}}\nl4:\n  - {{name: web, interface: {NODE_FRONT_IF}, backend_interface: \
         {NODE_BACK_IF}, vip: {vip}, port: {port}, upstream: web, mode: {mode}}}\n\
         ebpf: {{enabled: true, l4_flows: 65536}}\nannounce: {{enabled: true, interface: {VIP_INTERFACE}}}\n"
    ));
    y
}
