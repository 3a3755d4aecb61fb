//! A network-namespace lab for L4 work: a client, the load balancer, a switch and N backends, each in its own
//! namespace, built with `ip` and `ethtool` and torn down on drop. Shared by xtask and the speedmimi integration
//! tests (included by `#[path]`), so it uses std only.
//!
//! ```text
//! {p}c  eth0 10.100.0.2/24, 10.200.X.Y/32 on lo ─── eth0 10.100.0.1/24  {p}l  eth1 10.101.0.1/24 ─┐
//!                                                                                               lb
//! {p}b0 eth0 10.101.0.10/24 ── b0 ┐                                                              │
//! {p}b1 eth0 10.101.0.11/24 ── b1 ├──────────────────── br0  {p}s ───────────────────────────────┘
//! {p}b2 eth0 10.101.0.12/24 ── b2 ┘
//! ```

// Crates that include this file by path use only part of it.
#![allow(dead_code)]

#[path = "lab_cluster.rs"]
pub mod cluster;

use std::{
    env,
    fs::{self, File},
    io::{self, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// The client's address on the client–LB link.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
/// The load balancer's address facing the client (the client's default gateway).
pub const LB_FRONT_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// The load balancer's address facing the backends (their default gateway).
pub const LB_BACK_IP: Ipv4Addr = Ipv4Addr::new(10, 101, 0, 1);
/// The network of the extra client source addresses ([`client_addr`]), routed by the LB to the client.
pub const CLIENT_SOURCE_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 200, 0, 0), 16);
/// The client's interface towards the LB.
pub const CLIENT_IF: &str = "eth0";
/// The LB's interface towards the client.
pub const LB_FRONT_IF: &str = "eth0";
/// The LB's interface towards the backends (one L2 segment through the switch).
pub const LB_BACK_IF: &str = "eth1";
/// Each backend's interface towards the switch.
pub const BACKEND_IF: &str = "eth0";
/// MTU of the backend-side links: room for DSR's 20-byte IPIP header around a full 1500-byte client packet
/// (what an operator sets up for Katran-style DSR as well).
pub const BACKEND_MTU: u32 = 1600;
/// The port the demo backends listen on.
pub const DEMO_PORT: u16 = 8080;
/// How many client source addresses the 10.200.0.0/16 scheme of [`client_addr`] holds.
pub const MAX_CLIENTS: usize = 250 * 256;
/// How many backends the 10.101.0.10.. scheme of [`backend_addr`] holds.
pub const MAX_BACKENDS: usize = 240;

/// How long demo backends get to accept connections after they are started.
const BACKEND_READY: Duration = Duration::from_secs(10);
/// How long a process gets between SIGTERM and SIGKILL at teardown.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Where `ip netns add` mounts named namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// The extra client source address `i` (0-based): 10.200.(i/250).(i%250+1).
pub fn client_addr(i: usize) -> Ipv4Addr {
    assert!(i < MAX_CLIENTS, "client address {i} is beyond the 10.200.0.0/16 scheme");
    Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Backend `i`'s address: 10.101.0.(10+i).
pub fn backend_addr(i: usize) -> Ipv4Addr {
    assert!(i < MAX_BACKENDS, "backend {i} is beyond the 10.101.0.10.. scheme");
    Ipv4Addr::new(10, 101, 0, 10 + i as u8)
}

/// A namespace-name prefix unique to this process and call ("sm{pid}x{n}"), so labs of parallel tests and of
/// concurrent test binaries do not collide.
pub fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("sm{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Namespace names are this plus a suffix (c, l, s, b0..); letters, digits, '-' and '_' only.
    pub prefix: String,
    /// Extra client source addresses ([`client_addr`]) put on the client's `lo`.
    pub clients: usize,
    /// Backend namespaces (at least one).
    pub backends: usize,
    /// The `speedmimi` binary whose `demo-backend` runs in every backend namespace; None starts none.
    pub speedmimi: Option<PathBuf>,
}

impl LabSpec {
    /// Three backends, no extra client addresses, no demo backends.
    pub fn new(prefix: impl Into<String>) -> LabSpec {
        LabSpec { prefix: prefix.into(), clients: 0, backends: 3, speedmimi: None }
    }
}

/// A running lab. Dropping it (or [`Lab::down`]) stops its processes and deletes its namespaces.
#[derive(Debug)]
pub struct Lab {
    /// The namespace-name prefix of [`LabSpec::prefix`].
    pub prefix: String,
    /// How many client source addresses ([`client_addr`]) the client namespace holds.
    pub clients: usize,
    /// How many backend namespaces there are.
    pub backends: usize,
    /// Namespaces this lab created, in creation order; only these are deleted.
    created: Vec<String>,
    /// Demo backends and adopted processes, stopped at teardown.
    children: Vec<Child>,
    /// Demo backends' stderr, removed at teardown.
    logs: Vec<PathBuf>,
}

impl Lab {
    /// Builds the lab and, with `spec.speedmimi`, starts a demo backend in every backend namespace and waits until
    /// each accepts connections from the LB namespace. On failure, removes what it made before returning the error.
    pub fn up(spec: LabSpec) -> Result<Lab, String> {
        validate(&spec)?;
        if euid() != 0 {
            return Err("the lab needs root (it creates network namespaces)".into());
        }
        let ethtool = program("ethtool", "ethtool")?;
        let mut lab = Lab {
            prefix: spec.prefix.clone(),
            clients: spec.clients,
            backends: spec.backends,
            created: Vec::new(),
            children: Vec::new(),
            logs: Vec::new(),
        };
        // On error `lab` drops here, which tears down whatever was made.
        lab.build(&ethtool)?;
        if let Some(bin) = &spec.speedmimi {
            lab.start_demo_backends(bin)?;
        }
        Ok(lab)
    }

    /// The client namespace.
    pub fn ns_client(&self) -> String {
        format!("{}c", self.prefix)
    }

    /// The load balancer's namespace.
    pub fn ns_lb(&self) -> String {
        format!("{}l", self.prefix)
    }

    /// The namespace holding the bridge between the LB and the backends.
    pub fn ns_switch(&self) -> String {
        format!("{}s", self.prefix)
    }

    /// Backend `i`'s namespace.
    pub fn ns_backend(&self, i: usize) -> String {
        format!("{}b{i}", self.prefix)
    }

    /// Every namespace of the lab, whether or not it exists yet.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.ns_client(), self.ns_lb(), self.ns_switch()];
        all.extend((0..self.backends).map(|i| self.ns_backend(i)));
        all
    }

    /// Has `child` (for example from [`spawn_in`]) stopped with the lab's own processes at teardown.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }

    /// Stops the lab's processes and deletes its namespaces (what dropping it does).
    pub fn down(self) {
        drop(self);
    }

    /// Leaves the lab running once this value is gone (for `cargo xtask lab up`); `cleanup_stale` removes it.
    pub fn detach(mut self) {
        // Dropping a Child neither kills nor waits for it.
        self.children.clear();
        self.created.clear();
        self.logs.clear();
    }

    /// Creates the namespaces, links, addresses, routes, sysctls and offload settings.
    fn build(&mut self, ethtool: &Path) -> Result<(), String> {
        let (c, l, s) = (self.ns_client(), self.ns_lb(), self.ns_switch());
        let backends: Vec<String> = (0..self.backends).map(|i| self.ns_backend(i)).collect();
        for ns in self.namespaces() {
            ip(&["netns", "add", &ns]).map_err(|e| format!("cannot create namespace {ns}: {e}"))?;
            self.created.push(ns.clone());
            // Before any link exists, so new interfaces inherit rp_filter=0 from `default`.
            write_sysctls(&ns, &[("net/ipv4/conf/all/rp_filter", "0"), ("net/ipv4/conf/default/rp_filter", "0")])?;
        }
        write_sysctls(&l, &[("net/ipv4/ip_forward", "1")])?;

        // Created directly inside their namespaces: no name can clash with the host's links.
        veth((CLIENT_IF, &c), (LB_FRONT_IF, &l))?;
        veth((LB_BACK_IF, &l), ("lb", &s))?;
        ip(&["-n", &s, "link", "add", "br0", "type", "bridge"]).map_err(|e| format!("bridge in {s}: {e}"))?;
        let mut ports = vec!["lb".to_string()];
        for (i, ns) in backends.iter().enumerate() {
            let port = format!("b{i}");
            veth((BACKEND_IF, ns), (&port, &s))?;
            ports.push(port);
        }

        let mut client = vec![
            "link set lo up".to_string(),
            format!("link set {CLIENT_IF} up"),
            format!("addr add {CLIENT_IP}/24 dev {CLIENT_IF}"),
            format!("route add default via {LB_FRONT_IP}"),
        ];
        client.extend((0..self.clients).map(|i| format!("addr add {}/32 dev lo", client_addr(i))));
        ip_batch(&c, &client)?;
        let (net, len) = CLIENT_SOURCE_NET;
        ip_batch(
            &l,
            &[
                "link set lo up".into(),
                format!("link set {LB_FRONT_IF} up"),
                format!("link set {LB_BACK_IF} mtu {BACKEND_MTU} up"),
                format!("addr add {LB_FRONT_IP}/24 dev {LB_FRONT_IF}"),
                format!("addr add {LB_BACK_IP}/24 dev {LB_BACK_IF}"),
                format!("route add {net}/{len} via {CLIENT_IP}"),
            ],
        )?;
        let mut switch = vec!["link set lo up".to_string(), "link set br0 up".to_string()];
        for port in &ports {
            switch.push(format!("link set {port} master br0"));
            switch.push(format!("link set {port} mtu {BACKEND_MTU} up"));
        }
        ip_batch(&s, &switch)?;
        for (i, ns) in backends.iter().enumerate() {
            ip_batch(
                ns,
                &[
                    "link set lo up".into(),
                    format!("link set {BACKEND_IF} mtu {BACKEND_MTU} up"),
                    format!("addr add {}/24 dev {BACKEND_IF}", backend_addr(i)),
                    format!("route add default via {LB_BACK_IP}"),
                ],
            )?;
        }

        for ns in self.namespaces() {
            zero_rp_filters(&ns)?;
        }
        let mut veth_ends = vec![(c.clone(), CLIENT_IF), (l.clone(), LB_FRONT_IF), (l.clone(), LB_BACK_IF)];
        veth_ends.extend(ports.iter().map(|port| (s.clone(), port.as_str())));
        veth_ends.extend(backends.iter().map(|ns| (ns.clone(), BACKEND_IF)));
        for (ns, dev) in &veth_ends {
            set_offloads(ethtool, ns, dev)?;
        }
        Ok(())
    }

    /// Starts `bin demo-backend` in every backend namespace, then waits until each accepts connections from the LB.
    fn start_demo_backends(&mut self, bin: &Path) -> Result<(), String> {
        let backends: Vec<String> = (0..self.backends).map(|i| self.ns_backend(i)).collect();
        start_demo_backends(bin, &backends, &self.ns_lb(), &mut self.children, &mut self.logs)
    }

    fn teardown(&mut self) {
        teardown(&mut self.created, &mut self.children, &mut self.logs);
    }
}

/// Stops the processes in the namespaces `created` and `children`, deletes the namespaces (last made first) and
/// removes `logs`.
fn teardown(created: &mut Vec<String>, children: &mut Vec<Child>, logs: &mut Vec<PathBuf>) {
    let mut pids: Vec<i32> = Vec::new();
    for ns in created.iter() {
        pids.extend(netns_pids(ns));
    }
    stop(children, pids);
    for ns in created.drain(..).rev() {
        let _ = ip(&["netns", "del", &ns]);
    }
    for log in logs.drain(..) {
        let _ = fs::remove_file(log);
    }
}

/// Starts `bin demo-backend` (id `b{i}`, on [`DEMO_PORT`]) in backend namespace `backends[i]`, at
/// [`backend_addr`]`(i)`, then waits until each accepts connections from namespace `probe_from`. The processes and
/// their logs go into `children` and `logs` as they start, so the caller's teardown stops them on error too.
fn start_demo_backends(
    bin: &Path,
    backends: &[String],
    probe_from: &str,
    children: &mut Vec<Child>,
    logs: &mut Vec<PathBuf>,
) -> Result<(), String> {
    if !bin.is_file() {
        return Err(format!("speedmimi binary {} not found (cargo build -p speedmimi)", bin.display()));
    }
    let bin = bin.to_string_lossy();
    let first = children.len();
    for (i, ns) in backends.iter().enumerate() {
        let log = env::temp_dir().join(format!("{ns}.log"));
        let stderr = File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        logs.push(log);
        let id = format!("b{i}");
        let port = DEMO_PORT.to_string();
        let argv = [&*bin, "demo-backend", "--host", "0.0.0.0", "--port", &port, "--id", &id];
        let child = command_in(ns, &argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start the demo backend in {ns}: {e}"))?;
        children.push(child);
    }
    let started = &mut children[first..];
    let logs = &logs[logs.len() - backends.len()..];
    in_netns(probe_from, move || {
        let deadline = Instant::now() + BACKEND_READY;
        for (i, (child, log)) in started.iter_mut().zip(logs).enumerate() {
            let addr = SocketAddr::from((backend_addr(i), DEMO_PORT));
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("demo backend b{i} exited ({status}): {}", tail(log)));
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "demo backend b{i} does not accept connections on {addr} from namespace {probe_from} after \
                         {} s: {}",
                        BACKEND_READY.as_secs(),
                        tail(log)
                    ));
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    })?
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Named namespaces whose name starts with `prefix_start`.
pub fn list_namespaces(prefix_start: &str) -> Result<Vec<String>, String> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    // Lines look like "smlabc (id: 3)" or "smlabc".
    Ok(out
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(prefix_start))
        .map(str::to_string)
        .collect())
}

/// Stops every process in, then deletes, each namespace whose name starts with `prefix_start` (a lab left by
/// [`Lab::detach`] or by a killed test), and removes their demo-backend logs. Returns the deleted names.
pub fn cleanup_stale(prefix_start: &str) -> Result<Vec<String>, String> {
    let stale = list_namespaces(prefix_start)?;
    let pids = stale.iter().flat_map(|ns| netns_pids(ns)).collect();
    stop(&mut Vec::new(), pids);
    let mut failed = Vec::new();
    for ns in &stale {
        if let Err(e) = ip(&["netns", "del", ns]) {
            failed.push(format!("{ns}: {e}"));
        }
        let _ = fs::remove_file(env::temp_dir().join(format!("{ns}.log")));
    }
    if failed.is_empty() { Ok(stale) } else { Err(format!("cannot delete namespaces: {}", failed.join("; "))) }
}

/// Runs `f` on a new thread that has entered namespace `ns` (setns(2)); the caller's thread stays where it is.
/// Sockets made in `f` live in `ns` for good, and processes spawned from `f` start there.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    const CLONE_NEWNET: i32 = 0x4000_0000;
    unsafe extern "C" {
        // From the C library std already links.
        fn setns(fd: i32, nstype: i32) -> i32;
    }
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path).map_err(|e| format!("cannot open namespace {}: {e}", path.display()))?;
    thread::scope(|scope| {
        let handle = thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(scope, move || {
                // SAFETY: `file` is an open namespace file; setns only changes this thread's network namespace.
                if unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) } != 0 {
                    return Err(format!("setns into {ns}: {}", io::Error::last_os_error()));
                }
                drop(file);
                Ok(f())
            })
            .map_err(|e| format!("cannot start a thread for namespace {ns}: {e}"))?;
        handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `ip netns exec ns argv...`, for the caller to set up stdio and spawn.
pub fn command_in(ns: &str, argv: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv);
    cmd
}

/// Runs `argv` in namespace `ns` and returns its stdout; the error names the command and carries its stderr.
pub fn run_in(ns: &str, argv: &[&str]) -> Result<String, String> {
    run(&mut command_in(ns, argv))
}

/// Starts `argv` in namespace `ns` with inherited stdio; the caller owns the child (or hands it to [`Lab::adopt`]).
pub fn spawn_in(ns: &str, argv: &[&str]) -> Result<Child, String> {
    let mut cmd = command_in(ns, argv);
    cmd.spawn().map_err(|e| format!("cannot start {}: {e}", describe(&cmd)))
}

fn validate(spec: &LabSpec) -> Result<(), String> {
    let p = &spec.prefix;
    if p.is_empty() || p.len() > 32 || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("lab prefix {p:?} must be 1-32 letters, digits, '-' or '_'"));
    }
    if spec.backends == 0 || spec.backends > MAX_BACKENDS {
        return Err(format!("a lab has 1 to {MAX_BACKENDS} backends, not {}", spec.backends));
    }
    if spec.clients > MAX_CLIENTS {
        return Err(format!("a lab has at most {MAX_CLIENTS} client addresses, not {}", spec.clients));
    }
    Ok(())
}

fn euid() -> u32 {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() }
}

/// Runs `cmd`, returning stdout on success and an error with the command line and its stderr otherwise.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    run_fed(cmd, None)
}

/// [`run`], with `input` (when given) written to the command's standard input.
pub fn run_fed(cmd: &mut Command, input: Option<&str>) -> Result<String, String> {
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", describe(cmd)))?;
    let written = match (input, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => pipe.write_all(text.as_bytes()),
        _ => Ok(()),
    };
    let out = child.wait_with_output().map_err(|e| format!("{}: {e}", describe(cmd)))?;
    if out.status.success() && written.is_ok() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`{}` failed ({}): {}", describe(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

/// Runs `ip -n ns -batch -` over `lines`; `ip` stops at the first failing line and names it.
fn ip_batch(ns: &str, lines: &[String]) -> Result<(), String> {
    run_fed(Command::new("ip").args(["-n", ns, "-batch", "-"]), Some(&(lines.join("\n") + "\n"))).map(drop)
}

/// A veth pair whose ends are created directly as `a.0` in namespace `a.1` and `b.0` in `b.1`.
fn veth(a: (&str, &str), b: (&str, &str)) -> Result<(), String> {
    ip(&["link", "add", a.0, "netns", a.1, "type", "veth", "peer", "name", b.0, "netns", b.1])
        .map(drop)
        .map_err(|e| format!("veth {}@{} <-> {}@{}: {e}", a.0, a.1, b.0, b.1))
}

/// Writes `/proc/sys/<key>` values from inside `ns` (sysctls under net/ are per namespace).
fn write_sysctls(ns: &str, values: &[(&str, &str)]) -> Result<(), String> {
    in_netns(ns, || {
        for (key, value) in values {
            fs::write(Path::new("/proc/sys").join(key), value)
                .map_err(|e| format!("sysctl {key}={value} in {ns}: {e}"))?;
        }
        Ok(())
    })?
}

/// rp_filter=0 on `all`, `default` and every interface of `ns`: the client sources (10.200/16) arrive on links
/// whose own routes do not cover them, and the effective value is the maximum of `all` and the interface's.
fn zero_rp_filters(ns: &str) -> Result<(), String> {
    in_netns(ns, || {
        let dir = Path::new("/proc/sys/net/ipv4/conf");
        let entries = fs::read_dir(dir).map_err(|e| format!("{} in {ns}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| format!("{} in {ns}: {e}", dir.display()))?.path().join("rp_filter");
            fs::write(&path, "0").map_err(|e| format!("{} in {ns}: {e}", path.display()))?;
        }
        Ok(())
    })?
}

/// Full checksums and no segmentation offload on a veth end (the XDP program rewrites checksums incrementally, which
/// is only right over full checksums), and GRO on (a native-XDP redirect into a veth needs the receiving end's NAPI,
/// which GRO enables). Checks the result, since ethtool may leave a feature unchanged without failing.
fn set_offloads(ethtool: &Path, ns: &str, dev: &str) -> Result<(), String> {
    let ethtool = ethtool.to_string_lossy();
    run_in(ns, &[&ethtool, "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "on"])
        .map_err(|e| format!("offloads of {dev} in {ns}: {e}"))?;
    let features = run_in(ns, &[&ethtool, "-k", dev]).map_err(|e| format!("offloads of {dev} in {ns}: {e}"))?;
    for (feature, want) in [
        ("tx-checksumming", "off"),
        ("tcp-segmentation-offload", "off"),
        ("generic-segmentation-offload", "off"),
        ("generic-receive-offload", "on"),
    ] {
        let line = features.lines().find_map(|l| l.strip_prefix(feature).and_then(|rest| rest.strip_prefix(':')));
        // Values read "off", "on" or "off [fixed]".
        if line.and_then(|v| v.split_whitespace().next()) != Some(want) {
            return Err(format!("{feature} of {dev} in {ns} is {line:?} after ethtool -K, wanted {want}"));
        }
    }
    Ok(())
}

/// `program` from PATH or the sbin directories, installed from Debian package `package` with apt-get when
/// missing (once per process; concurrent callers wait for the one installing).
pub fn program(program: &str, package: &str) -> Result<PathBuf, String> {
    static INSTALL: Mutex<()> = Mutex::new(());
    if let Some(path) = find_program(program) {
        return Ok(path);
    }
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = find_program(program) {
        return Ok(path);
    }
    if find_program("apt-get").is_none() {
        return Err(format!("{program} is missing and there is no apt-get to install it: install {package}"));
    }
    eprintln!("lab: installing {package} (apt-get)");
    let apt = |args: &[&str]| {
        run(Command::new("apt-get")
            .args(["-q", "-y", "-o", "DPkg::Lock::Timeout=120"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .map_err(|e| format!("installing {package}: {e}"))
    };
    if apt(&["install", "--no-install-recommends", package]).is_err() {
        apt(&["update"])?;
        apt(&["install", "--no-install-recommends", package])?;
    }
    find_program(program)
        .ok_or_else(|| format!("apt-get installed {package} but there is no {program} on PATH or in /usr/sbin"))
}

/// `name` on PATH or in the sbin directories (which a non-login PATH may lack).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Pids of the processes in namespace `ns` (none if it is gone), never our own.
fn netns_pids(ns: &str) -> Vec<i32> {
    let own = std::process::id() as i32;
    ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&pid| pid != own)
        .collect()
}

/// SIGTERM to `children` and `pids`, SIGKILL to whatever is still running after [`STOP_GRACE`]; reaps `children`.
fn stop(children: &mut Vec<Child>, mut pids: Vec<i32>) {
    const SIGTERM: i32 = 15;
    const SIGKILL: i32 = 9;
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    let signal = |pid: i32, sig: i32| {
        // SAFETY: kill has no memory preconditions; `pid` is positive (a child of ours or listed by `ip netns pids`).
        unsafe { kill(pid, sig) };
    };
    let child_pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
    pids.retain(|pid| !child_pids.contains(pid) && *pid > 0);
    pids.sort_unstable();
    pids.dedup();
    for &pid in child_pids.iter().chain(&pids) {
        signal(pid, SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
        pids.retain(|&pid| alive(pid));
        if (children.is_empty() && pids.is_empty()) || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    for &pid in &pids {
        signal(pid, SIGKILL);
    }
    for mut child in children.drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name: "1234 (name) S ...".
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// The last lines of a log, for error messages.
fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let last = lines[lines.len().saturating_sub(5)..].join("\n");
    if last.is_empty() { format!("(nothing in {})", log.display()) } else { format!("{} says:\n{last}", log.display()) }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
