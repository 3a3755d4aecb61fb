//! `announce`: an `l4:` VIP reaches the router through a real BGP daemon while this node can serve
//! it, and leaves it when the node cannot: its upstream lost every backend, the daemon stops, or
//! the daemon is killed with -9. In the network-namespace lab, BIRD 2 runs in the LB namespace
//! (exporting SpeedMimi's interface with `protocol direct`) and in the client namespace, which
//! plays the router: the route to the VIP in the client's kernel table is what is checked.
//! As root (BIRD installed with apt when missing); without root it skips, except under CI=true.

mod support;

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use support::{
    lab::{self, Lab, LabSpec},
    packages::find_or_install,
    root_or_skip,
};

/// The announced service.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 80);
/// SpeedMimi's announce interface in the LB namespace.
const INTERFACE: &str = "sm-vip";
/// The admin API, inside the LB namespace.
const ADMIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9093);
/// Bound on the first announcement (BGP session set-up included).
const FIRST: Duration = Duration::from_secs(30);
/// Bound on every later change to reach the router; the test prints what it measured.
const CHANGE: Duration = Duration::from_secs(10);

#[test]
fn vips_follow_servability_through_bird_and_leave_when_the_process_stops_or_is_killed() {
    const TEST: &str = "vips_follow_servability_through_bird_and_leave_when_the_process_stops_or_is_killed";
    if !root_or_skip(TEST) {
        return;
    }
    // The package may start its own daemon (on the host's config): stopped, ours run on their own.
    let bird = match find_or_install("bird", "bird2", || {
        let _ = std::process::Command::new("pkill").args(["-x", "bird"]).status();
    }) {
        Ok(path) => path,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{TEST}: no BIRD, and CI must run it: {e}"),
        Err(e) => return eprintln!("skipping {TEST}: {e}"),
    };
    let bin = env!("CARGO_BIN_EXE_speedmimi");
    let spec = LabSpec { prefix: lab::unique_prefix(), clients: 0, backends: 2, speedmimi: Some(bin.into()) };
    let mut lab = Lab::up(spec).unwrap_or_else(|e| panic!("lab: {e}"));
    let dir = std::env::temp_dir().join(format!("{}-announce", lab.prefix));
    fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    for (ns, name, conf) in [(lab.ns_client(), "router", router_conf()), (lab.ns_lb(), "node", node_conf())] {
        let child = start_bird(&bird, &ns, &dir, name, &conf);
        lab.adopt(child);
    }
    let config = dir.join("speedmimi.yaml");
    fs::write(&config, config_yaml()).unwrap();
    let log = dir.join("speedmimi.log");
    let router = lab.ns_client();
    let show_log = || fs::read_to_string(&log).unwrap_or_default() + &bird_logs(&dir);

    // Announced once servable; traffic to the VIP reaches a backend.
    let started = Instant::now();
    let mut daemon = spawn_daemon(&lab, &config, &log);
    let first = wait_route(&router, true, FIRST).unwrap_or_else(|e| panic!("{e}\n{}", show_log()));
    eprintln!("announced {:?} after the daemon started", started.elapsed());
    assert_eq!(first, vec![lab::LB_FRONT_IP], "the router's next hops for the VIP");
    let answer = lab::in_netns(&router, || get(VIP)).unwrap().unwrap_or_else(|e| panic!("GET the VIP: {e}"));
    assert!(answer.starts_with("HTTP/1.1 200"), "the VIP's answer: {answer}");

    // The upstream loses its last usable backend: withdrawn; one back: announced again.
    set_active(&lab, "b0", false);
    let t = Instant::now();
    set_active(&lab, "b1", false);
    wait_route(&router, false, CHANGE).unwrap_or_else(|e| panic!("no backend left: {e}\n{}", show_log()));
    eprintln!("withdrawn {:?} after the last backend was disabled", t.elapsed());
    let t = Instant::now();
    set_active(&lab, "b1", true);
    wait_route(&router, true, CHANGE).unwrap_or_else(|e| panic!("a backend back: {e}\n{}", show_log()));
    eprintln!("announced again {:?} after a backend was enabled", t.elapsed());

    // SIGTERM: withdrawn at the start of the stop.
    let t = Instant::now();
    // SAFETY: kill has no memory preconditions; the pid is the daemon this test started.
    assert_eq!(unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) }, 0);
    wait_route(&router, false, CHANGE).unwrap_or_else(|e| panic!("after SIGTERM: {e}\n{}", show_log()));
    eprintln!("withdrawn {:?} after SIGTERM", t.elapsed());
    let status = wait_exit(&mut daemon.0, CHANGE);
    assert!(status.success(), "the daemon's exit after SIGTERM: {status}\n{}", show_log());

    // Started again, then killed with -9: the kernel deletes the interface, BIRD withdraws.
    let mut daemon = spawn_daemon(&lab, &config, &log);
    wait_route(&router, true, FIRST).unwrap_or_else(|e| panic!("after a restart: {e}\n{}", show_log()));
    let t = Instant::now();
    daemon.0.kill().unwrap();
    wait_route(&router, false, CHANGE).unwrap_or_else(|e| panic!("after kill -9: {e}\n{}", show_log()));
    eprintln!("withdrawn {:?} after kill -9", t.elapsed());
    let _ = daemon.0.wait();
    let links = lab::run_in(&lab.ns_lb(), &["ip", "link", "show"]).unwrap();
    assert!(!links.contains(INTERFACE), "the interface outlived the killed process:\n{links}");
}

/// The router (client namespace): learns the VIPs from the node and installs them.
fn router_conf() -> String {
    format!(
        "router id {client};\nlog stderr all;\nprotocol device {{ scan time 1; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
         protocol bgp lb {{ local {client} as 65000; neighbor {lb} as 65001; connect retry time 1;\n  \
         ipv4 {{ import all; export none; }};\n}}\n",
        client = lab::CLIENT_IP,
        lb = lab::LB_FRONT_IP
    )
}

/// The node (LB namespace): exports the addresses of SpeedMimi's interface, and nothing else.
fn node_conf() -> String {
    format!(
        "router id {lb};\nlog stderr all;\nprotocol device {{ scan time 1; }}\n\
         protocol direct vips {{ ipv4; interface \"{INTERFACE}\"; }}\n\
         protocol bgp rtr {{ local {lb} as 65001; neighbor {client} as 65000; connect retry time 1;\n  \
         ipv4 {{ import none; export where proto = \"vips\"; }};\n}}\n",
        client = lab::CLIENT_IP,
        lb = lab::LB_FRONT_IP
    )
}

fn config_yaml() -> String {
    let mut y = format!(
        "server: {{host: {}, port: 8000, drain_timeout: 2s}}\nadmin: {{host: {}, port: {}}}\nbackends:\n  web:\n",
        lab::LB_FRONT_IP,
        ADMIN.ip(),
        ADMIN.port()
    );
    for i in 0..2 {
        y.push_str(&format!("    - {{id: b{i}, host: {}, port: {}}}\n", lab::backend_addr(i), lab::DEMO_PORT));
    }
    y.push_str("routing:\n  main: {upstream: web}\n");
    y.push_str(&format!(
        "l4:\n  - {{name: web, interface: {}, backend_interface: {}, vip: {}, port: {}, upstream: web, mode: nat}}\n",
        lab::LB_FRONT_IF,
        lab::LB_BACK_IF,
        VIP.ip(),
        VIP.port()
    ));
    y.push_str(&format!(
        "ebpf: {{enabled: true, l4_flows: 4096}}\nannounce: {{enabled: true, interface: {INTERFACE}}}\n"
    ));
    y
}

fn start_bird(bird: &Path, ns: &str, dir: &Path, name: &str, conf: &str) -> Child {
    let conf_path = dir.join(format!("{name}.conf"));
    fs::write(&conf_path, conf).unwrap();
    let log = fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let sock = dir.join(format!("{name}.ctl"));
    let argv = [&*bird.to_string_lossy(), "-f", "-c", &conf_path.to_string_lossy(), "-s", &sock.to_string_lossy()];
    lab::command_in(ns, &argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start BIRD in {ns}: {e}"))
}

fn bird_logs(dir: &Path) -> String {
    ["router", "node"]
        .iter()
        .map(|n| {
            format!("\n--- BIRD {n} ---\n{}", fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default())
        })
        .collect()
}

/// The daemon in the LB namespace (its output appended to `log`), killed when dropped.
fn spawn_daemon(lab: &Lab, config: &Path, log: &Path) -> Killed {
    let out = fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = lab::command_in(&lab.ns_lb(), &[env!("CARGO_BIN_EXE_speedmimi"), "-c", &config.to_string_lossy()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("SPEEDMIMI_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start the daemon");
    Killed(child)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls the router's table (every 20 ms, at most `bound`) until BIRD's route to the VIP is there
/// (`present`; its next hops returned) or gone.
fn wait_route(router: &str, present: bool, bound: Duration) -> Result<Vec<Ipv4Addr>, String> {
    let deadline = Instant::now() + bound;
    loop {
        let last = lab::run_in(router, &["ip", "-4", "route", "show", &format!("{}/32", VIP.ip()), "proto", "bird"])
            .unwrap_or_else(|e| e);
        let hops: Vec<Ipv4Addr> = last
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect();
        if hops.is_empty() != present {
            return Ok(hops);
        }
        if Instant::now() >= deadline {
            let want = if present { "a route to the VIP" } else { "no route to the VIP" };
            return Err(format!("the router has not got {want} after {bound:?}; its table: {last:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn set_active(lab: &Lab, id: &str, active: bool) {
    let body = format!("{{\"upstream\": \"web\", \"backend\": {{\"id\": \"{id}\", \"active\": {active}}}}}");
    let answer = lab::in_netns(&lab.ns_lb(), || {
        let mut s = TcpStream::connect_timeout(&ADMIN.into(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "PUT /api/v1/backends/update HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("admin update of {id}: {e}"));
    assert!(answer.starts_with("HTTP/1.1 200"), "admin update of {id}: {answer}");
}

fn get(to: SocketAddrV4) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn wait_exit(child: &mut Child, bound: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit within {bound:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
