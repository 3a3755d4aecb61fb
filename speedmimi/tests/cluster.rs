//! Several SpeedMimi nodes behind ECMP, in the cluster lab (`lab::cluster`): three nodes announce one DSR VIP over
//! BGP (each its own BIRD session to the router's BIRD), the router spreads client flows over them, every node
//! picks the same backend for a client (the same Maglev ring from the same config), and established flows
//! survive when a node is drained (admin API, then SIGTERM) and when another is killed with -9, because whichever
//! node a flow's packets reach sends them to the same backend. As root (BIRD installed with apt when missing); without root it
//! skips, except under CI=true.

mod support;

use std::{
    collections::BTreeMap,
    fs, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use support::lab::{
    self, Killed, ask,
    cluster::{self, Cluster},
    wait_exit,
};

/// The DSR service: DSR keeps the backends' port.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 20), lab::DEMO_PORT);
/// Long-lived flows, one per client address.
const FLOWS: usize = 3_000;
/// Clients asked through each node in turn.
const SAMPLE: usize = 100;
/// Every node's admin API, inside its namespace.
const ADMIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9094);
/// Bound on the first announcements (BGP sessions set up) and on later route changes.
const FIRST: Duration = Duration::from_secs(30);
const CHANGE: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn three_nodes_share_flows_pick_the_same_backend_and_keep_dsr_flows_through_a_drain_and_a_kill() {
    const TEST: &str = "three_nodes_share_flows_pick_the_same_backend_and_keep_dsr_flows_through_a_drain_and_a_kill";
    let Some((c, tmp, config)) = lab::dsr_cluster(TEST, 3, 3, FLOWS, VIP, ADMIN.port()) else { return };
    let dir = tmp.0.clone();
    let mut nodes: Vec<Killed> =
        (0..c.nodes).map(|i| lab::start_node(&c, i, &config, &dir.join(format!("node{i}.log")))).collect();
    let logs = |c: &Cluster| node_logs(&dir, c.nodes) + &c.bird_logs();

    // All three announce: the router holds three next hops.
    let hops = wait_hops(&c, 3, FIRST).unwrap_or_else(|e| panic!("{e}\n{}", logs(&c)));
    let mut want: Vec<Ipv4Addr> = (0..3).map(cluster::node_ip).collect();
    want.sort();
    assert_eq!(sorted(hops), want, "the router's next hops for the VIP");

    // 3,000 long-lived flows, one per client address: every one served, and spread over the nodes.
    let before = new_flows(&c);
    let mut flows: Vec<(usize, String, TcpStream)> = lab::in_netns(&c.ns_client(), || {
        (0..FLOWS)
            .map(|i| {
                let mut s = connect(i).unwrap_or_else(|e| panic!("client {i}: connect: {e}"));
                let who = ask(&mut s, true).unwrap_or_else(|e| panic!("client {i}: {e}"));
                (i, who, s)
            })
            .collect()
    })
    .unwrap();
    let per_node: Vec<u64> = new_flows(&c).iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!("{FLOWS} flows: new flows per node {per_node:?}, per backend {:?}", tally(&flows));
    assert!(per_node.iter().sum::<u64>() >= FLOWS as u64, "new flows per node {per_node:?}");
    assert!(per_node.iter().all(|n| *n >= FLOWS as u64 / 10), "flows not spread over the nodes: {per_node:?}");

    // The same client reaches the same backend through every node: the router pinned to one node at a time.
    let router = c.ns_router();
    for i in 0..c.nodes {
        let table = (100 + i).to_string();
        let via = cluster::node_ip(i).to_string();
        let vip = format!("{}/32", VIP.ip());
        lab::run_in(&router, &["ip", "route", "add", &vip, "via", &via, "table", &table]).unwrap();
        lab::run_in(&router, &["ip", "rule", "add", "from", "10.200.0.0/16", "lookup", &table, "priority", "100"])
            .unwrap();
        let before = new_flows(&c);
        let answers: Vec<String> = lab::in_netns(&c.ns_client(), || {
            (0..SAMPLE)
                .map(|k| connect(k).map_err(|e| e.to_string()).and_then(|mut s| ask(&mut s, false)))
                .map(|r| r.unwrap_or_else(|e| format!("failed: {e}")))
                .collect()
        })
        .unwrap();
        lab::run_in(&router, &["ip", "rule", "del", "priority", "100"]).unwrap();
        let through = new_flows(&c)[i] - before[i];
        assert!(through >= SAMPLE as u64, "node {i} took {through} of the {SAMPLE} pinned flows");
        let differ: Vec<String> = (0..SAMPLE)
            .filter(|k| answers[*k] != flows[*k].1)
            .map(|k| format!("client {k}: {} through the router, {} through node {i}", flows[k].1, answers[k]))
            .collect();
        assert!(differ.is_empty(), "clients reached another backend through node {i}:\n{}", differ.join("\n"));
    }

    // Node 0 drained through its admin API: withdrawn while it keeps running, and every established flow answers
    // again, from its backend; then stopped (SIGTERM), as an operator takes a node out, and they still do.
    let t = Instant::now();
    let answer = lab::in_netns(&c.ns_node(0), || admin_post("/api/v1/announce/drain")).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("\"drained\":true"), "drain: {answer}");
    wait_hops(&c, 2, CHANGE).unwrap_or_else(|e| panic!("after draining node 0: {e}\n{}", logs(&c)));
    eprintln!("node 0 withdrawn {:?} after the drain call", t.elapsed());
    let broken = ask_all(&c, &mut flows);
    eprintln!("after the drain of node 0: {} of {FLOWS} established flows broken", broken.len());
    assert!(broken.is_empty(), "{} flows broke after the drain of node 0:\n{}", broken.len(), first(&broken));
    // SAFETY: kill has no memory preconditions; the pid is node 0's daemon, started by this test.
    assert_eq!(unsafe { libc::kill(nodes[0].0.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut nodes[0].0, CHANGE);
    assert!(status.success(), "node 0's exit: {status}");
    let broken = ask_all(&c, &mut flows);
    eprintln!("after node 0 stopped: {} of {FLOWS} established flows broken", broken.len());
    assert!(broken.is_empty(), "{} flows broke after node 0 stopped:\n{}", broken.len(), first(&broken));

    // Node 1 killed with -9: withdrawn (the kernel deletes its interface), flows answer through node 2.
    let t = Instant::now();
    nodes[1].0.kill().unwrap();
    wait_hops(&c, 1, CHANGE).unwrap_or_else(|e| panic!("after killing node 1: {e}\n{}", logs(&c)));
    eprintln!("node 1 withdrawn {:?} after kill -9", t.elapsed());
    let broken = ask_all(&c, &mut flows);
    eprintln!("after kill -9 of node 1: {} of {FLOWS} established flows broken", broken.len());
    assert!(broken.is_empty(), "{} flows broke after node 1 was killed:\n{}", broken.len(), first(&broken));
}

/// A connection from client address `i` to the VIP (on a thread in the client namespace).
fn connect(i: usize) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::from((lab::client_addr(i), 0)).into())?;
    s.connect_timeout(&SocketAddr::V4(VIP).into(), IO_TIMEOUT)?;
    let s = TcpStream::from(s);
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Asks again on every held flow; the ones that failed or reached another backend.
fn ask_all(c: &Cluster, flows: &mut [(usize, String, TcpStream)]) -> Vec<String> {
    lab::in_netns(&c.ns_client(), || {
        flows
            .iter_mut()
            .filter_map(|(i, who, s)| match ask(s, true) {
                Ok(now) if now == *who => None,
                Ok(now) => Some(format!("client {i}: {now} instead of {who}")),
                Err(e) => Some(format!("client {i} (on {who}): {e}")),
            })
            .collect()
    })
    .unwrap()
}

/// Each node's `speedmimi_xdp_new_flows_total` (0 for a node that does not answer).
fn new_flows(c: &Cluster) -> Vec<u64> {
    (0..c.nodes)
        .map(|i| lab::in_netns(&c.ns_node(i), || metric("speedmimi_xdp_new_flows_total").unwrap_or(0)).unwrap())
        .collect()
}

fn metric(name: &str) -> Option<u64> {
    let text = admin("GET", "/metrics").ok()?;
    let sum = text
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    Some(sum)
}

/// `method path` on the admin API of the node whose namespace the calling thread is in: the whole answer.
fn admin(method: &str, path: &str) -> io::Result<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&ADMIN.into(), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

fn admin_post(path: &str) -> String {
    admin("POST", path).unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// Until the router's route to the VIP has `n` next hops (at most `bound`).
fn wait_hops(c: &Cluster, n: usize, bound: Duration) -> Result<Vec<Ipv4Addr>, String> {
    c.wait_next_hops(*VIP.ip(), bound, &format!("{n} next hops"), |h| h.len() == n)
}

fn node_logs(dir: &Path, nodes: usize) -> String {
    (0..nodes)
        .map(|i| {
            let text = fs::read_to_string(dir.join(format!("node{i}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!("--- node {i} ---\n{}\n", lines[lines.len().saturating_sub(15)..].join("\n"))
        })
        .collect()
}

fn tally(flows: &[(usize, String, TcpStream)]) -> BTreeMap<&str, usize> {
    let mut out = BTreeMap::new();
    for (_, who, _) in flows {
        *out.entry(who.as_str()).or_default() += 1;
    }
    out
}

fn sorted(mut v: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
    v.sort();
    v
}

fn first(lines: &[String]) -> String {
    lines.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
}
