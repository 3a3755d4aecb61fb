//! Proxy behaviour a client and a backend can see: routing, forwarded headers and who may set
//! them, hop-by-hop removal, request-smuggling defences, limits, timeouts and graceful stop.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{Origin, Proxy, backend_yaml, client, dead_addr, get, one_route, raw};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// Lines `name: value` of the headers the backend received (its `/headers` endpoint).
fn header_of(dump: &str, name: &str) -> Option<String> {
    dump.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
}

/// GET /headers on a fresh connection from `from` (a loopback address), with extra raw header lines.
async fn headers_seen(proxy: &Proxy, from: &str, extra: &str) -> String {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(proxy.addr).await.unwrap();
    let req = format!("GET /headers HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ip_is_trusted_only_from_trusted_proxies() {
    let o = Origin::start("b1").await;
    let extra = "  trusted_proxies: [\"127.0.0.2/32\"]\n";
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", extra)).await;
    let spoof = "X-Real-IP: 203.0.113.9\r\nX-Forwarded-For: 198.51.100.7\r\nX-Forwarded-Proto: https\r\n";

    // 127.0.0.1 is not trusted: everything it claims is replaced by what we saw.
    let seen = headers_seen(&proxy, "127.0.0.1", spoof).await;
    assert_eq!(header_of(&seen, "x-real-ip").as_deref(), Some("127.0.0.1"), "{seen}");
    assert_eq!(header_of(&seen, "x-forwarded-for").as_deref(), Some("127.0.0.1"), "{seen}");
    assert_eq!(header_of(&seen, "x-forwarded-proto").as_deref(), Some("http"), "{seen}");

    // 127.0.0.2 is a trusted proxy: its client address is used and the chain extended.
    let seen = headers_seen(&proxy, "127.0.0.2", spoof).await;
    assert_eq!(header_of(&seen, "x-real-ip").as_deref(), Some("203.0.113.9"), "{seen}");
    assert_eq!(header_of(&seen, "x-forwarded-for").as_deref(), Some("198.51.100.7, 127.0.0.2"), "{seen}");
    assert_eq!(header_of(&seen, "x-forwarded-proto").as_deref(), Some("https"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", "")).await;
    let extra = "X-Secret-Hop: 1\r\nConnection: X-Secret-Hop\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eDp5\r\nTE: gzip\r\nProxy-Connection: keep-alive\r\nX-End-To-End: kept\r\n";
    let seen = headers_seen(&proxy, "127.0.0.1", extra).await;
    for gone in ["x-secret-hop", "keep-alive", "proxy-authorization", "te", "proxy-connection", "upgrade"] {
        assert_eq!(header_of(&seen, gone), None, "{gone} was forwarded:\n{seen}");
    }
    assert_eq!(header_of(&seen, "x-end-to-end").as_deref(), Some("kept"));
    assert_eq!(header_of(&seen, "host").as_deref(), Some("test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_gets_400_and_never_reaches_a_backend() {
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", "")).await;
    let attacks: [(&str, &str); 6] = [
        (
            "CL and TE",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        ("differing CLs", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"),
        ("bad chunk size", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        ("chunk without CRLF", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n"),
        ("obs-fold", "GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n"),
        ("TE not ending in chunked", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
    ];
    for (name, attack) in attacks {
        let answer = raw(proxy.addr, attack.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{name}: answered {answer:?}");
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{name}: a second request was answered: {answer:?}");
    }
    assert_eq!(o.requests(), 0, "a malformed request reached the backend");
    assert_eq!(o.connections(), 0, "the backend was even connected to");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_heads_get_431() {
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", "  max_header_bytes: 16384\n")).await;
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let answer = raw(proxy.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "answered {answer:?}");
    let many: String = (0..120).map(|i| format!("X-H{i}: 1\r\n")).collect();
    let answer = raw(proxy.addr, format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "120 headers answered {answer:?}");
    assert_eq!(o.requests(), 0);
    // A normal request still works.
    let answer = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("b1\n"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_host_then_longest_prefix() {
    let (a, b, c) = (Origin::start("a").await, Origin::start("b").await, Origin::start("c").await);
    let yaml = format!(
        "backends:\n  ua:\n{}  ub:\n{}  uc:\n{}routing:\n  root:\n    path: /\n    upstream: ua\n  api:\n    path: /api\n    upstream: ub\n  admin:\n    path: /\n    host: \"*.admin.test\"\n    upstream: uc\n  only:\n    path: /only\n    host: only.test\n    upstream: uc\n",
        a.yaml(1),
        b.yaml(1),
        c.yaml(1)
    );
    let proxy = Proxy::start(&yaml).await;
    let cl = client();
    let cases = [
        ("/", "www.test", "a"),
        ("/api/v1", "www.test", "b"),
        ("/apis", "www.test", "b"),
        ("/", "x.admin.test:8080", "c"),
        ("/api", "x.admin.test", "b"),
        ("/only/x", "only.test", "c"),
        ("/only/x", "other.test", "a"),
    ];
    for (path, host, want) in cases {
        let (status, h, body) = get(&cl, &proxy.url(path), &[("host", host)]).await;
        assert_eq!(status, StatusCode::OK, "{host}{path}: {body}");
        assert_eq!(h["x-backend-id"], want, "{host}{path}");
    }

    // A host-only table sends other hosts away with 404.
    let yaml = format!(
        "backends:\n  ua:\n{}routing:\n  only:\n    path: /\n    host: example.com\n    upstream: ua\n",
        a.yaml(1)
    );
    let proxy = Proxy::start(&yaml).await;
    let (status, _, _) = get(&cl, &proxy.url("/"), &[("host", "other.com")]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = get(&cl, &proxy.url("/"), &[("host", "EXAMPLE.com")]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gets_504_and_refused_upstream_502() {
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", "  upstream_timeout: 300ms\n")).await;
    let (status, _, body) = get(&client(), &proxy.url("/slow?ms=3000"), &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    let (status, _, _) = get(&client(), &proxy.url("/slow?ms=10"), &[]).await;
    assert_eq!(status, StatusCode::OK);

    let proxy = Proxy::start(&one_route(&backend_yaml("x", dead_addr().await, 1), "round_robin", "")).await;
    let (status, _, _) = get(&client(), &proxy.url("/"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_max_conn_is_respected() {
    let o = Origin::start("b1").await;
    o.backend.delay_ms.store(800, std::sync::atomic::Ordering::SeqCst);
    let ups = format!("    - id: b1\n      host: 127.0.0.1\n      port: {}\n      max_conn: 1\n", o.addr.port());
    let proxy = Proxy::start(&one_route(&ups, "round_robin", "")).await;
    let url = proxy.url("/");
    let first = tokio::spawn(async move { get(&client(), &url, &[]).await.0 });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (second, _, _) = get(&client(), &proxy.url("/"), &[]).await;
    assert_eq!(second, StatusCode::SERVICE_UNAVAILABLE, "a full backend must be skipped");
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    assert_eq!(o.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_max_conn_queues_extra_clients() {
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", "  max_conn: 1\n")).await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    first.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    // The second client waits in the backlog while the first holds the only slot...
    let addr = proxy.addr;
    let second =
        tokio::spawn(async move { raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!second.is_finished(), "second client was served while max_conn was reached");
    // ...and is served once the first leaves.
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(10), second).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_head_is_dropped() {
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", "  read_timeout: 500ms\n")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "connection still open long after read_timeout");
    assert_eq!(o.requests(), 0);
}

/// A backend that answers every request with 64 MiB and counts the connections whose write
/// failed (the proxy closed them).
async fn big_backend() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{Arc, atomic::AtomicUsize};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let closed = counted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if !matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    return;
                }
                let chunk = vec![b'x'; 1 << 20];
                let mut out = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n").await;
                for _ in 0..64 {
                    if out.is_err() {
                        break;
                    }
                    out = s.write_all(&chunk).await;
                }
                if out.is_err() {
                    closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    (addr, closed)
}

/// Slow-read clients (they ask for 64 MiB with a 4 KiB receive buffer and never read) hold
/// both `max_conn` slots; the proxy's write to them stalls, and after `write_timeout` it closes
/// them and their upstream connections: a normal client queued behind them is served, and each
/// attacker's connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_read_clients_are_closed_after_write_timeout() {
    let (big, closed) = big_backend().await;
    let o = Origin::start("small").await;
    let yaml = format!(
        "server:\n  host: 127.0.0.1\n  port: 8080\n  max_conn: 2\n  write_timeout: 1s\nbackends:\n  big:\n{}  small:\n{}routing:\n  big:\n    path: /big\n    upstream: big\n    load_balancer: round_robin\n  small:\n    path: /\n    upstream: small\n    load_balancer: round_robin\n",
        backend_yaml("big", big, 100),
        o.yaml(100)
    );
    let proxy = Proxy::start(&yaml).await;
    let mut attackers = Vec::new();
    for _ in 0..2 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        attackers.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let addr = proxy.addr;
    let normal =
        tokio::spawn(async move { raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await });
    let answer =
        tokio::time::timeout(Duration::from_secs(10), normal).await.expect("the normal client was not served").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("small\n"), "{answer:?}");
    for (i, mut s) in attackers.into_iter().enumerate() {
        let mut sink = vec![0u8; 1 << 16];
        let mut read = 0usize;
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => read += n,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "attacker {i}: its connection is still open");
        assert!(read < 64 << 20, "attacker {i}: got the whole body ({read} bytes): the write never stalled");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while closed.load(std::sync::atomic::Ordering::SeqCst) < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        closed.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the upstream connections of the attackers were not closed"
    );
    proxy.stop().await;
}

/// A connection from `source` (a loopback address) to `to`.
async fn connect_from(source: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// `max_conn_per_client: 2` under `max_conn: 4`: a client that opens six idle connections keeps
/// two, the other four are closed at once (and counted), and a second client is served at
/// once instead of waiting for the first one's connections to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conn_per_client_keeps_one_client_from_taking_every_slot() {
    let o = Origin::start("b1").await;
    let extra = "  max_conn: 4\n  max_conn_per_client: 2\n  read_timeout: 30s\n";
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", extra)).await;
    let mut greedy = Vec::new();
    for _ in 0..6 {
        greedy.push(connect_from("127.0.0.2", proxy.addr).await);
    }
    let mut closed = 0;
    for s in &mut greedy {
        let mut b = [0u8; 16];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(n)) => panic!("an idle connection got {n} bytes"),
            Err(_) => {}
        }
    }
    assert_eq!(closed, 4, "connections over the client's limit must be closed at once");
    let mut other = connect_from("127.0.0.3", proxy.addr).await;
    other.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), other.read_to_end(&mut answer))
        .await
        .expect("the second client was not served while the first held its connections")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&answer));
    let (status, stats) = support::admin_call(
        http::Method::GET,
        &proxy.admin_url("/api/v1/stats/server"),
        None,
        None,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["connections"]["refused_per_client"], 4, "{stats}");
    // Once the first client closes its connections, it may open new ones.
    drop(greedy);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from("127.0.0.2", proxy.addr).await;
    again.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), again.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&answer));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_finishes_in_flight_requests() {
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", "")).await;
    let url = proxy.url("/slow?ms=600");
    let inflight = tokio::spawn(async move { get(&client(), &url, &[]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let addr = proxy.addr;
    proxy.stop().await;
    let (status, _, body) = inflight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "b1\n");
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting after stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_upstream_connections() {
    let o = Origin::start("b1").await;
    // Idle connections are pooled per worker; with one worker the count is exact.
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", "  workers: 1\n")).await;
    // One client connection: a pooling client may open a second one while it puts the first
    // back, and the second may be served before the first's upstream connection is returned.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    for _ in 0..50 {
        let req = http::Request::get("/").header("host", "test").body(http_body_util::Empty::<bytes::Bytes>::new());
        sender.ready().await.expect("the connection takes the next request");
        let resp = sender.send_request(req.unwrap()).await.expect("request through the proxy");
        assert_eq!(resp.status(), StatusCode::OK);
        http_body_util::BodyExt::collect(resp.into_body()).await.expect("body");
    }
    assert_eq!(o.requests(), 50);
    assert_eq!(o.connections(), 1, "sequential requests should share one pooled upstream connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_a_line_per_request() {
    let o = Origin::start("b1").await;
    let path = std::env::temp_dir().join(format!("speedmimi-access-test-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let extra = format!("  access_log: \"{}\"\n", path.display());
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", &extra)).await;
    let c = client();
    get(&c, &proxy.url("/?q=1"), &[("user-agent", "test-agent/1")]).await;
    let (status, _, _) = get(&c, &proxy.url("/second"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let mut text = String::new();
    for _ in 0..200 {
        text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = std::fs::remove_file(&path);
    let first = text.lines().next().unwrap_or_else(|| panic!("no access log lines: {text:?}"));
    assert!(first.starts_with("127.0.0.1 - - ["), "{first}");
    assert!(first.contains("\"GET /?q=1 HTTP/1.1\" 200 3 \"-\" \"test-agent/1\""), "{first}");
    assert!(first.ends_with(" b1"), "{first}");
    assert_eq!(text.lines().count(), 2, "{text}");
}

/// Sends `request` and reads the answer until the proxy closes (at most 15 s): the answer and when
/// the close came.
async fn answer_and_close(addr: std::net::SocketAddr, request: &'static [u8]) -> (String, std::time::Instant) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    (String::from_utf8_lossy(&out).into_owned(), std::time::Instant::now())
}

/// A stop lets a request in flight finish within `server.drain_timeout`, and closes a connection
/// whose request outlasts it (issue 12: SIGTERM with requests in flight, a configurable drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_requests_finish_within_the_drain_time_then_closes_them() {
    let o = Origin::start("b1").await;

    let proxy = Proxy::start(&one_route(&o.yaml(1), "round_robin", "  drain_timeout: 5s\n  workers: 1")).await;
    let done = tokio::spawn(answer_and_close(proxy.addr, b"GET /slow?ms=1000 HTTP/1.1\r\nHost: x\r\n\r\n"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.stop().await;
    let (answer, _) = done.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "a request shorter than the drain time finishes: {answer:?}");
    assert!(answer.ends_with("b1\n"), "with its whole body: {answer:?}");

    let proxy = Proxy::start(&one_route(&o.yaml(1), "round_robin", "  drain_timeout: 500ms\n  workers: 1")).await;
    let cut = tokio::spawn(answer_and_close(proxy.addr, b"GET /slow?ms=8000 HTTP/1.1\r\nHost: x\r\n\r\n"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = std::time::Instant::now();
    proxy.stop().await;
    let (answer, closed) = cut.await.unwrap();
    let after = closed.duration_since(stopped);
    assert!(answer.is_empty(), "a request outlasting the drain time gets no answer: {answer:?}");
    assert!(after < Duration::from_secs(3), "its connection closed {after:?} after the stop (drain 500 ms)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_route_serves_n_bytes_and_drains_a_posted_body() {
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", "")).await;

    let got = raw(proxy.addr, b"GET /bytes?n=10240 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    let (head, body) = got.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200") && head.to_ascii_lowercase().contains("content-length: 10240"), "{head}");
    assert_eq!(body.len(), 10240);

    let post = format!(
        "POST /bytes?n=13 HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n{}",
        "p".repeat(4096)
    );
    let got = raw(proxy.addr, post.as_bytes()).await;
    let (head, body) = got.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "x".repeat(13));
}
