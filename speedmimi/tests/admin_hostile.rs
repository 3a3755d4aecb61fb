//! The admin listener against clients that misbehave: stalled heads and bodies, idle
//! connections, more connections than it takes, a dashboard reader that stops reading, and a
//! stop with all of them open. None may hold a slot, a file descriptor or the stop past its
//! timeout.

mod support;

use std::time::Duration;

use http::Method;
use support::{Origin, Proxy, admin_call, backend_yaml, dead_addr, one_route, read_to_close};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpSocket, TcpStream},
    time::Instant,
};

/// Admin connections the daemon takes at once (`admin::serve::MAX_CONN`).
const MAX_CONN: usize = 64;

async fn daemon(extra: &str) -> (Origin, Proxy) {
    let o = Origin::start("b1").await;
    let p = Proxy::start(&one_route(&o.yaml(100), "round_robin", extra)).await;
    (o, p)
}

/// The number of backends the admin API lists.
async fn backends(p: &Proxy) -> usize {
    let (status, body) =
        admin_call(Method::GET, &p.admin_url("/api/v1/backends"), None, None, Duration::from_secs(5)).await;
    assert_eq!(status, 200, "{body}");
    body["backends"].as_array().map_or(0, Vec::len)
}

/// A connection that has not sent a whole request head within `read_timeout` (of its accept or
/// of its last answer) is closed, and so is one whose request body stalls; a stalled body
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_admin_connections_are_closed() {
    const READ_TIMEOUT: Duration = Duration::from_secs(2);
    let (_o, p) = daemon("  read_timeout: 2s\n").await;
    let before = backends(&p).await;
    let add = b"POST /api/v1/backends/add HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"upstream\":\"default\",";
    let cases: &[(&str, &[u8])] = &[
        ("nothing sent", b""),
        ("half a head", b"GET /api/v1/stats/server HTTP/1.1\r\nHost: a\r\n"),
        ("an idle keep-alive connection", b"GET /api/v1/stats/server HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("half a body", add),
    ];
    let deadline = Instant::now() + READ_TIMEOUT + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for &(name, bytes) in cases {
        let addr = p.admin;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(bytes).await.unwrap();
            match read_to_close(&mut s, deadline).await {
                Some(_) => Ok(()),
                None => Err(format!("{name}: still open {READ_TIMEOUT:?} past read_timeout")),
            }
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failed.push(e);
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(backends(&p).await, before, "a body that never came whole changed the backends");
}

/// Past `MAX_CONN` open admin connections, one more is told 503 (JSON) and closed; once the
/// idle ones time out, their slots are back and calls are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped_and_given_back() {
    const READ_TIMEOUT: Duration = Duration::from_secs(2);
    let (_o, p) = daemon("  read_timeout: 2s\n").await;
    let mut idle = Vec::new();
    for _ in 0..MAX_CONN {
        idle.push(TcpStream::connect(p.admin).await.unwrap());
    }
    // The accept loop sees them in order: the one past the limit is refused, not queued.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = TcpStream::connect(p.admin).await.unwrap();
    let refused = read_to_close(&mut extra, Instant::now() + Duration::from_secs(5)).await.expect("refused and closed");
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    let body = refused.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert!(json["error"].as_str().is_some_and(|e| e.contains("too many admin connections")), "{json}");

    let deadline = Instant::now() + READ_TIMEOUT + Duration::from_secs(3);
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(read_to_close(s, deadline).await.is_some(), "idle admin connection {i} still open");
    }
    let (status, body) =
        admin_call(Method::GET, &p.admin_url("/api/v1/stats/server"), None, None, Duration::from_secs(5)).await;
    assert_eq!(status, 200, "{body}");
}

/// A dashboard stream whose reader stopped reading ends once a write has made no progress for
/// `write_timeout`, instead of holding its connection for as long as the reader likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_reader_that_stops_reading_is_cut_off() {
    // Many backends make each tick large (about 65 KB a second), so the buffers fill in seconds.
    let mut upstream = String::new();
    for i in 0..60 {
        upstream += &backend_yaml(&format!("idle-{i}"), dead_addr().await, 1);
    }
    let p = Proxy::start(&one_route(&upstream, "round_robin", "  write_timeout: 1s\n")).await;
    let sock = TcpSocket::new_v4().unwrap();
    // A small window fills at once: the daemon's writes stall after a few ticks.
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(p.admin).await.unwrap();
    s.write_all(b"GET /api/v1/dashboard/events HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    // Not read: the buffers fill, then a write makes no progress for `write_timeout`.
    let ours = s.local_addr().unwrap().port();
    let started = Instant::now();
    let mut state = server_side_state(p.admin.port(), ours);
    while state == Some(ESTABLISHED) && started.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        state = server_side_state(p.admin.port(), ours);
    }
    assert_ne!(state, Some(ESTABLISHED), "the daemon still writes to a reader that stopped 40 s ago");
    // What was sent before the close can still be read, then the end.
    let got = read_to_close(&mut s, Instant::now() + Duration::from_secs(5)).await;
    assert!(got.is_some_and(|g| g.starts_with(b"HTTP/1.1 200 ")), "no stream, or no end after the close");
}

const ESTABLISHED: u8 = 1;

/// The TCP state (`/proc/net/tcp`) of the daemon's side of a connection from `client_port` to
/// `admin_port`; None once the socket is gone.
fn server_side_state(admin_port: u16, client_port: u16) -> Option<u8> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |addr: &str| addr.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
    tcp.lines().skip(1).find_map(|l| {
        let f: Vec<_> = l.split_whitespace().collect();
        (f.len() > 3 && port(f[1]) == Some(admin_port) && port(f[2]) == Some(client_port))
            .then(|| u8::from_str_radix(f[3], 16).unwrap_or(0))
    })
}

/// A stop ends, within `drain_timeout`, with admin connections in every stalled state open: half
/// a head, a stalled body, a dashboard stream nobody reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_is_not_held_by_stalled_admin_connections() {
    let (_o, p) = daemon("  read_timeout: 60s\n  write_timeout: 60s\n  drain_timeout: 1s\n").await;
    let mut open = Vec::new();
    for bytes in [
        &b"GET /api/v1/stats/server HTTP/1.1\r\nHost: a\r\n"[..],
        b"PUT /api/v1/backends/update HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{",
        b"GET /api/v1/dashboard/events HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(p.admin).await.unwrap();
        s.write_all(bytes).await.unwrap();
        open.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = std::time::Instant::now();
    // `stop` itself fails past 15 s; the bound here is the drain time and a noisy machine's slack.
    p.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "the stop took {took:?} with a 1 s drain_timeout");
    drop(open);
}
