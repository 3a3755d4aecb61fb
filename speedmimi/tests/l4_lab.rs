//! XDP L4 steering end to end, as root, in a network-namespace lab: the daemon in the LB namespace steers the
//! `l4:` VIPs to demo backends in their own namespaces, and real connections from hundreds of client addresses
//! show that each client stays on one backend, the one the L7 `ip_hash` route picks, in proportion to the
//! weights, and that removing a backend or failing its health check moves only that backend's clients.
//! Without root these tests skip with a reason, except under CI=true, where they fail.

mod support;

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    ops::Range,
    path::PathBuf,
    process::Stdio,
    sync::atomic::{AtomicU16, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::Value;
use socket2::{Domain, Socket, Type};
use support::{
    lab::{self, Lab, LabSpec, ask, read_response},
    root_or_skip,
};

/// The NAT service (`web-l4`).
const NAT_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10), 80);
/// The DSR service (`web-dsr`): DSR keeps the backends' port.
const DSR_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 11), lab::DEMO_PORT);
/// The L7 listener, whose route balances the same upstream with `ip_hash`.
const L7: SocketAddrV4 = SocketAddrV4::new(lab::LB_FRONT_IP, 8000);
/// The admin API, inside the LB namespace.
const ADMIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9091);
/// Bound on every connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on waiting for the daemon, a decapsulator, a health verdict or a ring change.
const WAIT: Duration = Duration::from_secs(10);
/// Client source ports start here, below the ephemeral range, and each connection takes the next one.
const FIRST_PORT: u16 = 10_000;

/// What a test's lab and daemon look like.
struct Setup {
    /// Client source addresses (`lab::client_addr`).
    clients: usize,
    /// One backend per weight, `b0`, `b1`, ...
    weights: &'static [u32],
    /// Fast HTTP health checks on every backend.
    health_checks: bool,
    /// Sets the backends up for DSR: the VIP on `lo` and `speedmimi xdp-decap` on `eth0`.
    dsr: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup { clients: 500, weights: &[100, 100, 100], health_checks: false, dsr: false }
    }
}

/// A lab with the daemon running in its LB namespace. Dropping it stops everything and deletes the namespaces.
struct Rig {
    lab: Lab,
    config: PathBuf,
    log: PathBuf,
    daemon_pid: u32,
    /// Every connection gets a source port no earlier connection of the test used, so no 4-tuple repeats and
    /// the kernel's flow table cannot steer a new connection by what it remembers of an old one.
    next_port: AtomicU16,
}

/// `kernel.xdp` of a backend in `GET /api/v1/backends`.
#[derive(Debug, Clone, Copy, Deserialize)]
struct Xdp {
    packets: u64,
    reply_packets: u64,
    new_flows: u64,
}

impl Rig {
    /// Builds the lab, starts the daemon on it and waits until it steers with every backend up.
    fn start(setup: Setup) -> Rig {
        let bin = env!("CARGO_BIN_EXE_speedmimi");
        let spec = LabSpec {
            prefix: lab::unique_prefix(),
            clients: setup.clients,
            backends: setup.weights.len(),
            speedmimi: Some(bin.into()),
        };
        let mut lab = Lab::up(spec).unwrap_or_else(|e| panic!("lab: {e}"));
        if setup.dsr {
            let vip = format!("{}/32", DSR_VIP.ip());
            for i in 0..lab.backends {
                let ns = lab.ns_backend(i);
                lab::run_in(&ns, &["ip", "addr", "add", &vip, "dev", "lo"]).unwrap_or_else(|e| panic!("{e}"));
                let decap = lab::command_in(&ns, &[bin, "xdp-decap", "--interface", lab::BACKEND_IF])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("xdp-decap in {ns}: {e}"));
                lab.adopt(decap);
                wait_for_xdp(&ns, lab::BACKEND_IF);
            }
        }
        let config = std::env::temp_dir().join(format!("{}.yaml", lab.prefix));
        let log = std::env::temp_dir().join(format!("{}-speedmimi.log", lab.prefix));
        fs::write(&config, config_yaml(&setup)).expect("write the config");
        let daemon_pid = spawn_daemon(&mut lab, &config, &log);
        let rig = Rig { lab, config, log, daemon_pid, next_port: AtomicU16::new(FIRST_PORT) };
        rig.wait_ready(setup.weights.len());
        rig
    }

    /// Until every backend is listed up and with XDP counters: the daemon writes the rings before it publishes
    /// the state the admin API shows, so then the VIPs are steered.
    fn wait_ready(&self, backends: usize) {
        let deadline = Instant::now() + WAIT;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.admin("GET", "/api/v1/backends?upstream=web") {
                Ok((200, v)) => {
                    let list = v["upstreams"]["web"].as_array().cloned().unwrap_or_default();
                    if list.len() == backends && list.iter().all(|b| b["up"] == true && b["kernel"]["xdp"].is_object())
                    {
                        return;
                    }
                    last = format!("backends: {list:?}");
                }
                Ok((status, v)) => last = format!("{status}: {v}"),
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("the daemon is not steering after {WAIT:?}; last answer: {last}\n{}", self.log_tail());
    }

    /// `method path` on the admin API; the status and the JSON answer.
    fn admin(&self, method: &str, path: &str) -> Result<(u16, Value), String> {
        let (status, body) = self.admin_text(method, path)?;
        let json =
            serde_json::from_str(&body).map_err(|e| format!("{status} with a body that is not JSON ({e}): {body}"))?;
        Ok((status, json))
    }

    /// `method path` on the admin API; the status and the body as text.
    fn admin_text(&self, method: &str, path: &str) -> Result<(u16, String), String> {
        lab::in_netns(&self.lab.ns_lb(), || {
            let mut s = TcpStream::connect_timeout(&ADMIN.into(), IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
            let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).map_err(|e| format!("write: {e}"))?;
            read_response(&mut s).map_err(|e| format!("read: {e}"))
        })?
    }

    /// `kernel.xdp` of every backend of `web`, by id.
    fn xdp(&self) -> BTreeMap<String, Xdp> {
        let (status, v) = self.admin("GET", "/api/v1/backends?upstream=web").unwrap_or_else(|e| panic!("admin: {e}"));
        assert_eq!(status, 200, "GET /api/v1/backends: {v}");
        let list = v["upstreams"]["web"].as_array().cloned().unwrap_or_default();
        list.iter()
            .map(|b| {
                let xdp = serde_json::from_value(b["kernel"]["xdp"].clone())
                    .unwrap_or_else(|e| panic!("kernel.xdp of {}: {e}", b["id"]));
                (b["id"].as_str().expect("id").to_owned(), xdp)
            })
            .collect()
    }

    /// A connection from client address `client` to `to`, on a fresh source port. Call it on a thread in the
    /// client namespace.
    fn connect(&self, client: usize, to: SocketAddrV4) -> io::Result<TcpStream> {
        let port = self.next_port.fetch_add(1, Ordering::Relaxed);
        assert!(port >= FIRST_PORT, "the test ran out of client source ports");
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.bind(&SocketAddr::from((lab::client_addr(client), port)).into())?;
        s.connect_timeout(&SocketAddr::V4(to).into(), IO_TIMEOUT)?;
        let s = TcpStream::from(s);
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(s)
    }

    /// The backend a client reaches on a new connection to `to` (on a thread in the client namespace).
    fn who(&self, client: usize, to: SocketAddrV4) -> Result<String, String> {
        let mut s = self.connect(client, to).map_err(|e| format!("connect: {e}"))?;
        ask(&mut s, false)
    }

    /// The backend each of `clients` reaches through `to`, asked on `tries` new connections each. Panics naming
    /// every client that was not served or reached more than one backend.
    fn backends_of(&self, clients: Range<usize>, to: SocketAddrV4, tries: usize) -> Vec<String> {
        let answers = lab::in_netns(&self.lab.ns_client(), || {
            clients.clone().map(|c| (0..tries).map(|_| self.who(c, to)).collect::<Vec<_>>()).collect::<Vec<_>>()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let mut problems = Vec::new();
        let mut ids = Vec::new();
        for (c, answers) in clients.clone().zip(answers) {
            match &answers[..] {
                [Ok(first), rest @ ..] if rest.iter().all(|a| a.as_ref() == Ok(first)) => ids.push(first.clone()),
                _ => problems.push(format!("client {} got {answers:?}", lab::client_addr(c))),
            }
        }
        assert!(
            problems.is_empty(),
            "through {to}, {} of {} clients were not served by one backend on all {tries} connections:\n{}",
            problems.len(),
            clients.len(),
            first_lines(&problems)
        );
        ids
    }

    /// Opens a keep-alive connection from `client` to `to` and checks its first answer comes from `backend`.
    fn open_keep_alive(&self, client: usize, to: SocketAddrV4, backend: &str) -> TcpStream {
        lab::in_netns(&self.lab.ns_client(), || {
            let mut s = self.connect(client, to).unwrap_or_else(|e| panic!("client {client}: connect to {to}: {e}"));
            let id = ask(&mut s, true).unwrap_or_else(|e| panic!("client {client}: keep-alive GET via {to}: {e}"));
            assert_eq!(id, backend, "client {} on a keep-alive connection", lab::client_addr(client));
            s
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls until every client that `before` (a backend per client) had on `gone` is served through `to`
    /// by another backend (after a change that the daemon applies asynchronously, such as a health
    /// verdict). Every one, not the first: a ring is written slot by slot, so one client having moved
    /// does not mean the others' slots have been written yet.
    fn wait_moved_off(&self, before: &[String], to: SocketAddrV4, gone: &str) {
        let deadline = Instant::now() + WAIT;
        for client in (0..before.len()).filter(|&c| before[c] == gone) {
            let mut last = Err(String::new());
            while Instant::now() < deadline {
                last = lab::in_netns(&self.lab.ns_client(), || self.who(client, to)).unwrap_or_else(|e| panic!("{e}"));
                if last.as_ref().is_ok_and(|id| id != gone) {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            assert!(
                last.as_ref().is_ok_and(|id| id != gone),
                "client {} still not served by another backend than {gone} after {WAIT:?}: {last:?}",
                lab::client_addr(client)
            );
        }
    }

    /// Polls the admin API until backend `id` is listed with `up` equal to `up`.
    fn wait_up(&self, id: &str, up: bool) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Ok((200, v)) = self.admin("GET", "/api/v1/backends?upstream=web") {
                let list = v["upstreams"]["web"].as_array().cloned().unwrap_or_default();
                last = list.into_iter().find(|b| b["id"] == id).unwrap_or_default();
                if last["up"] == up {
                    return last;
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("backend {id} is not listed with up={up} after {WAIT:?}; last: {last}");
    }

    /// SIGKILLs the demo backend of backend namespace `i` (a crash, not a graceful stop).
    fn kill_demo_backend(&self, i: usize) {
        let ns = self.lab.ns_backend(i);
        let out = std::process::Command::new("ip").args(["netns", "pids", &ns]).output().expect("ip netns pids");
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(12).any(|w| w == b"demo-backend"))
            })
            .collect();
        assert_eq!(pids.len(), 1, "one demo backend process in {ns}, found pids {pids:?}");
        // SAFETY: kill has no memory preconditions; the pid is the demo backend the lab started in `ns`.
        assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0, "kill {}", pids[0]);
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "daemon log ({}), last lines:\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        let _ = fs::remove_file(&self.config);
        let _ = fs::remove_file(&self.log);
    }
}

/// Starts the daemon in the load balancer's namespace on `config`, its output going to `log`
/// (appended: a restart keeps the first run's lines); the lab stops it at the end.
fn spawn_daemon(lab: &mut Lab, config: &std::path::Path, log: &std::path::Path) -> u32 {
    let bin = env!("CARGO_BIN_EXE_speedmimi");
    // Logs and a failed start both go to stderr; stdout goes into the log too, in case.
    let stdout = fs::OpenOptions::new().create(true).append(true).open(log).expect("open the daemon log");
    let stderr = stdout.try_clone().expect("clone the log's handle");
    let daemon = lab::command_in(&lab.ns_lb(), &[bin, "-c", &config.to_string_lossy()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("SPEEDMIMI_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start the daemon");
    let pid = daemon.id();
    lab.adopt(daemon);
    pid
}

/// The XDP program ids attached in `ns` (`prog/xdp id N` in `ip -d link show`).
fn xdp_ids(ns: &str) -> Vec<u32> {
    let out = lab::run_in(ns, &["ip", "-d", "link", "show"]).unwrap_or_else(|e| panic!("{e}"));
    let words: Vec<&str> = out.split_whitespace().collect();
    words.windows(3).filter(|w| w[0] == "prog/xdp" && w[1] == "id").filter_map(|w| w[2].parse().ok()).collect()
}

/// The tested config: both services over upstream `web`, whose backends are the lab's demo backends.
fn config_yaml(setup: &Setup) -> String {
    let health = match setup.health_checks {
        true => ", health_check: {path: /health, interval: 200ms, timeout: 200ms, failures: 2, successes: 1}",
        false => "",
    };
    let mut y = format!(
        "server: {{host: {}, port: {}}}\nadmin: {{host: {}, port: {}}}\n",
        L7.ip(),
        L7.port(),
        ADMIN.ip(),
        ADMIN.port()
    );
    y.push_str("backends:\n  web:\n");
    for (i, w) in setup.weights.iter().enumerate() {
        let addr = lab::backend_addr(i);
        y.push_str(&format!("    - {{id: b{i}, host: {addr}, port: {}, weight: {w}{health}}}\n", lab::DEMO_PORT));
    }
    y.push_str("routing:\n  main: {upstream: web, load_balancer: ip_hash}\nl4:\n");
    for (name, vip, mode) in [("web-l4", NAT_VIP, "nat"), ("web-dsr", DSR_VIP, "dsr")] {
        let (ip, port) = (vip.ip(), vip.port());
        let (front, back) = (lab::LB_FRONT_IF, lab::LB_BACK_IF);
        y.push_str(&format!(
            "  - {{name: {name}, interface: {front}, backend_interface: {back}, vip: {ip}, port: {port}, "
        ));
        y.push_str(&format!("upstream: web, mode: {mode}}}\n"));
    }
    y.push_str("ebpf: {enabled: true, l4_flows: 65536}\n");
    y
}

/// Until `ip link` shows an XDP program on `dev` in `ns`.
fn wait_for_xdp(ns: &str, dev: &str) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if lab::run_in(ns, &["ip", "link", "show", "dev", dev]).is_ok_and(|out| out.contains("prog/xdp")) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("no XDP program on {dev} in {ns} after {WAIT:?}");
}

/// How many clients each backend has.
fn tally(ids: &[String]) -> BTreeMap<&str, usize> {
    let mut out = BTreeMap::new();
    for id in ids {
        *out.entry(id.as_str()).or_default() += 1;
    }
    out
}

/// The first lines of a problem list, for a failure message.
fn first_lines(lines: &[String]) -> String {
    let mut out = lines.iter().take(10).cloned().collect::<Vec<_>>().join("\n");
    if lines.len() > 10 {
        out.push_str(&format!("\n... and {} more", lines.len() - 10));
    }
    out
}

/// Every client reached the same backend both ways.
fn assert_same_backends(a: &[String], b: &[String], via_a: &str, via_b: &str) {
    let problems: Vec<String> = (a.iter().zip(b).enumerate())
        .filter(|(_, (x, y))| x != y)
        .map(|(c, (x, y))| format!("client {} reached {x} via {via_a} but {y} via {via_b}", lab::client_addr(c)))
        .collect();
    assert!(problems.is_empty(), "{} of {} clients differ:\n{}", problems.len(), a.len(), first_lines(&problems));
}

/// The clients of `gone` all moved to other backends and every other client kept its backend.
fn assert_only_moved(before: &[String], after: &[String], gone: &str) {
    let problems: Vec<String> = (before.iter().zip(after).enumerate())
        .filter(|(_, (was, now))| if *was == gone { *now == gone } else { was != now })
        .map(|(c, (was, now))| match was == now {
            true => format!("client {} is still on {now}", lab::client_addr(c)),
            false => format!("client {} moved from {was} to {now}", lab::client_addr(c)),
        })
        .collect();
    assert!(
        problems.is_empty(),
        "{} of {} clients broke the rule that only {gone}'s clients move:\n{}",
        problems.len(),
        before.len(),
        first_lines(&problems)
    );
}

/// Asks each keep-alive connection again and checks it still reaches its backend.
fn assert_keep_alive(conns: &mut [(usize, String, TcpStream)], what: &str) {
    for (client, backend, s) in conns.iter_mut() {
        let got = ask(s, true);
        assert_eq!(
            got.as_deref(),
            Ok(backend.as_str()),
            "{what}: keep-alive connection of client {}",
            lab::client_addr(*client)
        );
    }
}

#[test]
fn nat_vip_serves_500_clients_each_on_its_l7_ip_hash_backend_counts_them_and_detaches_on_stop() {
    if !root_or_skip("nat_vip_serves_500_clients_each_on_its_l7_ip_hash_backend_counts_them_and_detaches_on_stop") {
        return;
    }
    let rig = Rig::start(Setup::default());
    let via_vip = rig.backends_of(0..500, NAT_VIP, 3);
    let via_l7 = rig.backends_of(0..500, L7, 1);
    assert_same_backends(&via_vip, &via_l7, "the NAT VIP", "the L7 ip_hash route");
    let clients = tally(&via_vip);
    let xdp = rig.xdp();
    eprintln!("nat: clients per backend {clients:?}; kernel counters {xdp:?}");
    assert_eq!(clients.len(), 3, "every backend gets clients: {clients:?}");
    for (id, n) in clients {
        let x = xdp[id];
        // Each connection was one new flow (no 4-tuple repeats), counted on the backend that served it.
        assert_eq!(x.new_flows, 3 * n as u64, "new_flows of {id}, which served {n} clients 3 times: {x:?}");
        assert!(x.packets > 0 && x.reply_packets > 0, "{id}: NAT rewrites both directions: {x:?}");
    }

    // /metrics shows the same kernel counters.
    let (status, metrics) = rig.admin_text("GET", "/metrics").unwrap_or_else(|e| panic!("metrics: {e}"));
    assert_eq!(status, 200);
    for (id, x) in &xdp {
        let line = format!("speedmimi_xdp_new_flows_total{{upstream=\"web\",backend=\"{id}\"}} {}", x.new_flows);
        assert!(metrics.lines().any(|l| l == line), "/metrics lacks {line:?}");
    }

    // A stop detaches the XDP program from both interfaces.
    let kill = std::process::Command::new("kill").args(["-TERM", &rig.daemon_pid.to_string()]).status();
    assert!(kill.is_ok_and(|s| s.success()), "SIGTERM to the daemon");
    let deadline = Instant::now() + WAIT;
    loop {
        let links = lab::run_in(&rig.lab.ns_lb(), &["ip", "link", "show"]).unwrap_or_else(|e| panic!("{e}"));
        if !links.contains("xdp") {
            break;
        }
        assert!(Instant::now() < deadline, "XDP still attached {WAIT:?} after SIGTERM:\n{links}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dsr_vip_serves_100_clients_each_on_its_l7_ip_hash_backend() {
    if !root_or_skip("dsr_vip_serves_100_clients_each_on_its_l7_ip_hash_backend") {
        return;
    }
    let rig = Rig::start(Setup { clients: 100, dsr: true, ..Setup::default() });
    let via_vip = rig.backends_of(0..100, DSR_VIP, 3);
    let via_l7 = rig.backends_of(0..100, L7, 1);
    assert_same_backends(&via_vip, &via_l7, "the DSR VIP", "the L7 ip_hash route");
    let clients = tally(&via_vip);
    let xdp = rig.xdp();
    eprintln!("dsr: clients per backend {clients:?}; kernel counters {xdp:?}");
    assert_eq!(clients.len(), 3, "every backend gets clients: {clients:?}");
    for (id, n) in clients {
        let x = xdp[id];
        assert_eq!(x.new_flows, 3 * n as u64, "new_flows of {id}, which served {n} clients 3 times: {x:?}");
        // Replies go from the backend straight to the client's route, not back through the rewrite.
        assert!(x.packets > 0 && x.reply_packets == 0, "{id}: DSR steers one direction only: {x:?}");
    }
}

#[test]
fn clients_spread_over_backends_by_weight() {
    if !root_or_skip("clients_spread_over_backends_by_weight") {
        return;
    }
    // A client's backend is a fixed function of its address, so the shares of N clients are a sample of the
    // table's split (the Maglev table itself follows the weights within about 1%). With 500 clients a share
    // near 50% scatters by 2.2 points (one standard deviation), so ±5 points is only 2.2 deviations and a
    // right table could fail for an unlucky set of addresses. With 2000 clients it is 1.1 points: ±5 is 4.5
    // deviations, so a pass says the weights hold and a failure says they do not. Addresses, hash seed and
    // table are all fixed, so the outcome is the same on every run.
    const CLIENTS: usize = 2000;
    let weights = &[50, 30, 20];
    let rig = Rig::start(Setup { clients: CLIENTS, weights, ..Setup::default() });
    let ids = rig.backends_of(0..CLIENTS, NAT_VIP, 1);
    let clients = tally(&ids);
    let shares: Vec<(String, f64, f64)> = (weights.iter().enumerate())
        .map(|(i, &w)| {
            let id = format!("b{i}");
            let share = 100.0 * clients.get(id.as_str()).copied().unwrap_or(0) as f64 / CLIENTS as f64;
            (id, share, f64::from(w))
        })
        .collect();
    eprintln!("weights 50/30/20 over {CLIENTS} clients: (backend, % of clients, % of weight) {shares:?}");
    for (id, share, want) in &shares {
        assert!((share - want).abs() <= 5.0, "{id} has {share:.1}% of the clients, its weight says {want}% (±5)");
    }

    // The dashboard's XDP view: each service's ring shares follow the weights (the Maglev table
    // does within about 1%), and the packets just steered show as a rate per backend.
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let (status, v) = rig.admin("GET", "/api/v1/dashboard").expect("admin");
    assert_eq!(status, 200, "{v}");
    let l4 = v["latest"]["live"]["l4"].as_array().expect("l4 services in the dashboard");
    let names: Vec<&str> = l4.iter().filter_map(|s| s["service"].as_str()).collect();
    assert_eq!(names, ["web-l4", "web-dsr"], "{v}");
    for service in l4 {
        for (b, (id, _, want)) in service["backends"].as_array().unwrap().iter().zip(&shares) {
            assert_eq!(b["backend"], id.as_str(), "{service}");
            let ring = 100.0 * b["ring_share"].as_f64().unwrap();
            assert!((ring - want).abs() <= 2.0, "{id} owns {ring:.1}% of the ring, its weight says {want}%");
        }
    }
    for b in l4[0]["backends"].as_array().unwrap() {
        assert!(b["packets_per_second"].as_f64().unwrap() > 0.0, "no XDP packet rate for {b}");
    }
}

#[test]
fn removing_a_backend_moves_only_its_clients_and_keeps_long_connections() {
    if !root_or_skip("removing_a_backend_moves_only_its_clients_and_keeps_long_connections") {
        return;
    }
    let rig = Rig::start(Setup::default());
    let before = rig.backends_of(0..500, NAT_VIP, 1);
    // Three long-lived (keep-alive) connections per backend, opened before the removal.
    let mut conns: Vec<(usize, String, TcpStream)> = Vec::new();
    for id in ["b0", "b1", "b2"] {
        for c in (0..before.len()).filter(|&c| before[c] == id).take(3) {
            conns.push((c, id.to_owned(), rig.open_keep_alive(c, NAT_VIP, id)));
        }
    }
    let flows_before = rig.xdp();

    let (status, v) = rig.admin("DELETE", "/api/v1/backends/remove?upstream=web&backend_id=b1").expect("admin");
    assert_eq!(status, 200, "remove b1: {v}");
    // The ring is rewritten before the admin API answers, so no wait here.
    let after = rig.backends_of(0..500, NAT_VIP, 1);
    assert_only_moved(&before, &after, "b1");
    let via_l7 = rig.backends_of(0..500, L7, 1);
    assert_same_backends(&after, &via_l7, "the NAT VIP", "the L7 ip_hash route (after removing b1)");

    let (mut others, mut drained): (Vec<_>, Vec<_>) = conns.into_iter().partition(|(_, id, _)| id != "b1");
    assert_keep_alive(&mut others, "after removing b1");
    // b1's own connections are drained, not cut: their flows stay in the flow table.
    assert_keep_alive(&mut drained, "b1 removed (draining)");

    let flows_after = rig.xdp();
    assert!(!flows_after.contains_key("b1"), "b1 is still listed after its removal: {flows_after:?}");
    let moved: Vec<String> =
        (before.iter().zip(&after)).filter(|(was, _)| *was == "b1").map(|(_, now)| now.clone()).collect();
    let moved = tally(&moved);
    eprintln!("removal: before {:?}, after {:?}, b1's moved to {moved:?}", tally(&before), tally(&after));
    eprintln!("removal: counters before {flows_before:?}, after {flows_after:?}");
    for (id, n) in tally(&after) {
        let new = flows_after[id].new_flows.saturating_sub(flows_before[id].new_flows);
        assert_eq!(
            new, n as u64,
            "{id} served {n} clients on new connections after the removal; new_flows grew by {new}"
        );
    }
}

#[test]
fn failed_health_check_takes_backend_out_of_the_ring() {
    if !root_or_skip("failed_health_check_takes_backend_out_of_the_ring") {
        return;
    }
    let rig = Rig::start(Setup { health_checks: true, ..Setup::default() });
    let before = rig.backends_of(0..500, NAT_VIP, 1);
    assert!(before.iter().any(|id| id == "b1"), "b1 has clients");

    rig.kill_demo_backend(1);
    let b1 = rig.wait_up("b1", false);
    eprintln!("health: b1 is down: {}", b1["health"]);
    // The rings follow health verdicts on a short timer.
    rig.wait_moved_off(&before, NAT_VIP, "b1");
    let after = rig.backends_of(0..500, NAT_VIP, 1);
    assert_only_moved(&before, &after, "b1");
    let via_l7 = rig.backends_of(0..500, L7, 1);
    assert_same_backends(&after, &via_l7, "the NAT VIP", "the L7 ip_hash route (b1 down)");
    eprintln!("health: before {:?}, after {:?}", tally(&before), tally(&after));
}

/// Issue 12, eBPF faults: a second instance on the same ports is refused with a clear message and
/// touches nothing; a daemon killed with -9 leaves no XDP program attached and none loaded (the
/// kernel frees them with the process's links); the next start steers again.
#[test]
fn second_instance_is_refused_and_a_killed_daemon_leaves_nothing_behind() {
    if !root_or_skip("second_instance_is_refused_and_a_killed_daemon_leaves_nothing_behind") {
        return;
    }
    let mut rig = Rig::start(Setup::default());
    let ids = xdp_ids(&rig.lab.ns_lb());
    assert_eq!(ids.len(), 2, "l4_steer on both LB interfaces, found program ids {ids:?}");

    let second =
        lab::command_in(&rig.lab.ns_lb(), &[env!("CARGO_BIN_EXE_speedmimi"), "-c", &rig.config.to_string_lossy()])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run a second instance");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second instance on the same ports must fail; stderr:\n{stderr}");
    assert!(stderr.contains("cannot listen on"), "the refusal names the address it could not take:\n{stderr}");
    assert_eq!(xdp_ids(&rig.lab.ns_lb()), ids, "the refused instance left the running one's XDP programs alone");
    rig.backends_of(0..20, NAT_VIP, 1);

    // SAFETY: kill has no memory preconditions; the pid is the daemon this test started.
    assert_eq!(unsafe { libc::kill(rig.daemon_pid as i32, libc::SIGKILL) }, 0, "kill -9 the daemon");
    let deadline = Instant::now() + WAIT;
    loop {
        let attached = xdp_ids(&rig.lab.ns_lb());
        let loaded: Vec<u32> = aya::programs::loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect();
        let left: Vec<u32> = ids.iter().copied().filter(|id| loaded.contains(id)).collect();
        if attached.is_empty() && left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{WAIT:?} after kill -9: XDP still attached {attached:?}, programs still loaded {left:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }

    let (config, log) = (rig.config.clone(), rig.log.clone());
    rig.daemon_pid = spawn_daemon(&mut rig.lab, &config, &log);
    rig.wait_ready(Setup::default().weights.len());
    let via_vip = rig.backends_of(0..50, NAT_VIP, 2);
    let via_l7 = rig.backends_of(0..50, L7, 1);
    assert_same_backends(&via_vip, &via_l7, "the NAT VIP after a restart", "the L7 ip_hash route");
}
