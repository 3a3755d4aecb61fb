//! `announce`: an `l4:` VIP reaches the router through a real BGP daemon while this node can serve
//! it, and leaves it when the node cannot: its upstream lost every backend, the daemon stops, or
//! the daemon is killed with -9. In the cluster lab with one node (`lab::cluster`): BIRD 2 runs
//! in the node (exporting SpeedMimi's interface with `protocol direct`) and in the router, whose
//! kernel table is what is checked. As root (BIRD installed with apt when missing); without root
//! it skips, except under CI=true.

mod support;

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use support::lab::{
    self,
    cluster::{self, Cluster},
    wait_exit,
};

/// The announced service (DSR keeps the backends' port).
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), lab::DEMO_PORT);
/// The node's admin API, inside its namespace.
const ADMIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9093);
/// Bound on the first announcement (BGP session set-up included).
const FIRST: Duration = Duration::from_secs(30);
/// Bound on every later change to reach the router; the test prints what it measured.
const CHANGE: Duration = Duration::from_secs(10);

#[test]
fn vips_follow_servability_and_drain_through_bird_and_leave_when_the_process_stops_or_is_killed() {
    const TEST: &str = "vips_follow_servability_and_drain_through_bird_and_leave_when_the_process_stops_or_is_killed";
    let Some((c, tmp, config)) = lab::dsr_cluster(TEST, 1, 2, 0, VIP, ADMIN.port()) else { return };
    let log = tmp.0.join("speedmimi.log");
    let show_log = |c: &Cluster| fs::read_to_string(&log).unwrap_or_default() + &c.bird_logs();

    // Announced once servable; traffic to the VIP reaches a backend.
    let started = Instant::now();
    let mut daemon = lab::start_node(&c, 0, &config, &log);
    let first = wait_route(&c, true, FIRST).unwrap_or_else(|e| panic!("{e}\n{}", show_log(&c)));
    eprintln!("announced {:?} after the daemon started", started.elapsed());
    assert_eq!(first, vec![cluster::node_ip(0)], "the router's next hops for the VIP");
    let answer = lab::in_netns(&c.ns_client(), || get(VIP)).unwrap().unwrap_or_else(|e| panic!("GET the VIP: {e}"));
    assert!(answer.starts_with("HTTP/1.1 200"), "the VIP's answer: {answer}");

    // The upstream loses its last usable backend: withdrawn; one back: announced again.
    set_active(&c, "b0", false);
    let t = Instant::now();
    set_active(&c, "b1", false);
    wait_route(&c, false, CHANGE).unwrap_or_else(|e| panic!("no backend left: {e}\n{}", show_log(&c)));
    eprintln!("withdrawn {:?} after the last backend was disabled", t.elapsed());
    let t = Instant::now();
    set_active(&c, "b1", true);
    wait_route(&c, true, CHANGE).unwrap_or_else(|e| panic!("a backend back: {e}\n{}", show_log(&c)));
    eprintln!("announced again {:?} after a backend was enabled", t.elapsed());

    // Drained by the operator: withdrawn while the daemon keeps serving; undrained: announced again.
    let (status, v) = admin(&c, "GET", "/api/v1/announce", "");
    assert_eq!(
        (status, &v["drained"], &v["announced"]),
        (200, &false.into(), &serde_json::json!([VIP.ip().to_string()]))
    );
    let t = Instant::now();
    let (status, v) = admin(&c, "POST", "/api/v1/announce/drain", "");
    assert_eq!((status, &v["drained"], &v["announced"]), (200, &true.into(), &serde_json::json!([])), "{v}");
    wait_route(&c, false, CHANGE).unwrap_or_else(|e| panic!("drained: {e}\n{}", show_log(&c)));
    eprintln!("withdrawn {:?} after the drain call", t.elapsed());
    // Still drained when the backends change meanwhile.
    set_active(&c, "b0", true);
    thread::sleep(Duration::from_millis(300));
    assert!(c.next_hops(*VIP.ip()).unwrap().is_empty(), "a drained node announced again");
    let t = Instant::now();
    let (status, v) = admin(&c, "POST", "/api/v1/announce/undrain", "");
    assert_eq!((status, &v["drained"]), (200, &false.into()), "{v}");
    wait_route(&c, true, CHANGE).unwrap_or_else(|e| panic!("undrained: {e}\n{}", show_log(&c)));
    eprintln!("announced again {:?} after the undrain call", t.elapsed());

    // SIGTERM: withdrawn at the start of the stop.
    let t = Instant::now();
    // SAFETY: kill has no memory preconditions; the pid is the daemon this test started.
    assert_eq!(unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) }, 0);
    wait_route(&c, false, CHANGE).unwrap_or_else(|e| panic!("after SIGTERM: {e}\n{}", show_log(&c)));
    eprintln!("withdrawn {:?} after SIGTERM", t.elapsed());
    let status = wait_exit(&mut daemon.0, CHANGE);
    assert!(status.success(), "the daemon's exit after SIGTERM: {status}\n{}", show_log(&c));

    // Started again, then killed with -9: the kernel deletes the interface, BIRD withdraws.
    let mut daemon = lab::start_node(&c, 0, &config, &log);
    wait_route(&c, true, FIRST).unwrap_or_else(|e| panic!("after a restart: {e}\n{}", show_log(&c)));
    let t = Instant::now();
    daemon.0.kill().unwrap();
    wait_route(&c, false, CHANGE).unwrap_or_else(|e| panic!("after kill -9: {e}\n{}", show_log(&c)));
    eprintln!("withdrawn {:?} after kill -9", t.elapsed());
    let _ = daemon.0.wait();
    let links = lab::run_in(&c.ns_node(0), &["ip", "link", "show"]).unwrap();
    assert!(!links.contains(cluster::VIP_INTERFACE), "the interface outlived the killed process:\n{links}");
}

/// Until BIRD's route to the VIP is in the router's table (`present`; its next hops returned) or gone,
/// at most `bound`.
fn wait_route(c: &Cluster, present: bool, bound: Duration) -> Result<Vec<Ipv4Addr>, String> {
    let what = if present { "a route" } else { "no route" };
    c.wait_next_hops(*VIP.ip(), bound, what, |h| h.is_empty() != present)
}

fn set_active(c: &Cluster, id: &str, active: bool) {
    let body = format!("{{\"upstream\": \"web\", \"backend\": {{\"id\": \"{id}\", \"active\": {active}}}}}");
    let (status, answer) = admin(c, "PUT", "/api/v1/backends/update", &body);
    assert_eq!(status, 200, "admin update of {id}: {answer}");
}

/// `method path` with a JSON `body` on the node's admin API: the status and the JSON answer.
fn admin(c: &Cluster, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let answer = lab::in_netns(&c.ns_node(0), || {
        let mut s = TcpStream::connect_timeout(&ADMIN.into(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("admin {method} {path}: {e}"));
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let json = answer.split("\r\n\r\n").nth(1).and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
    (status, json)
}

fn get(to: SocketAddrV4) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
