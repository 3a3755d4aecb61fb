//! Faults under load: a backend killed with -9 while requests are in flight, a backend that
//! resets mid-response, a backend that never answers, certificate rotation and config changes
//! while clients keep asking; and a kernel that refuses BPF (seccomp), where the daemon must run
//! the L7 path alone and say so. Every load is bounded in count and time.

mod support;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use http::{Method, StatusCode};
use support::{
    Origin, Proxy, admin_call, backend_yaml, client,
    daemon::{Daemon, free_ports},
    one_route,
    tls::{Ca, TempDir, h1, peer_cert, send, ssl_yaml, tls_connect},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Concurrent clients of each load.
const TASKS: usize = 4;
/// Bound on any one request of a load.
const REQUEST_BOUND: Duration = Duration::from_secs(10);

/// What a load's requests got.
#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    /// One line per request that did not get a 200 (status or error).
    failed: Vec<String>,
}

/// `TASKS` keep-alive clients, each sending `per_task` GETs of `url` one after the other.
async fn load(url: String, per_task: usize) -> Tally {
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = client();
                let mut t = Tally::default();
                for _ in 0..per_task {
                    let req = http::Request::get(&url).body(Default::default()).unwrap();
                    let outcome = match tokio::time::timeout(REQUEST_BOUND, c.request(req)).await {
                        Err(_) => Err("timed out".to_owned()),
                        Ok(Err(e)) => Err(format!("{e:?}")),
                        Ok(Ok(resp)) => {
                            let status = resp.status();
                            match http_body_util::BodyExt::collect(resp.into_body()).await {
                                Ok(_) if status == StatusCode::OK => Ok(()),
                                Ok(_) => Err(status.to_string()),
                                Err(e) => Err(format!("{status}, then the body failed: {e:?}")),
                            }
                        }
                    };
                    match outcome {
                        Ok(()) => t.ok += 1,
                        Err(e) => t.failed.push(e),
                    }
                }
                t
            })
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        all.ok += t.ok;
        all.failed.extend(t.failed);
    }
    all
}

/// `speedmimi demo-backend` as its own process, to be killed with -9.
struct DemoProcess {
    child: Child,
    addr: SocketAddr,
}

impl DemoProcess {
    async fn start(id: &str) -> DemoProcess {
        let (port, _) = free_ports();
        let child = Command::new(env!("CARGO_BIN_EXE_speedmimi"))
            .args(["demo-backend", "--port", &port.to_string(), "--id", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the demo backend");
        // Owned by the guard from here on: a failed wait below kills it.
        let demo = DemoProcess { child, addr: ([127, 0, 0, 1], port).into() };
        for _ in 0..200 {
            if TcpStream::connect(demo.addr).await.is_ok() {
                return demo;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the demo backend process never listened on {}", demo.addr);
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A backend killed with -9 while four clients keep requests in flight: only the requests on
/// its connections at that moment fail (502; SpeedMimi does not retry a request once sent), and
/// every request after that goes to the other backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_with_requests_in_flight() {
    let a = Origin::start("a").await;
    let mut b = DemoProcess::start("b").await;
    let yaml = one_route(&(a.yaml(100) + &backend_yaml("b", b.addr, 100)), "round_robin", "");
    let p = Proxy::start(&yaml).await;
    // 50 ms a request: about 40 requests are in flight per second per client.
    let running = tokio::spawn(load(p.url("/slow?ms=50"), 40));
    tokio::time::sleep(Duration::from_millis(700)).await;
    b.kill();
    let t = running.await.unwrap();
    println!("killed mid-load: {} ok, {} failed: {:?}", t.ok, t.failed.len(), t.failed);
    // A request in flight on each client, plus at most one more per client that took a pooled
    // connection the kernel had already reset before the proxy saw it close.
    assert!(t.failed.len() <= 2 * TASKS, "{} requests failed for one killed backend: {:?}", t.failed.len(), t.failed);
    assert!(t.failed.iter().all(|f| f == "502 Bad Gateway"), "failures other than 502: {:?}", t.failed);
    let after = load(p.url("/"), 10).await;
    assert!(after.failed.is_empty(), "after the kill: {:?}", after.failed);
    p.stop().await;
}

/// A backend that answers `/rst` with a head and 1,000 of 100,000 promised bytes, then resets;
/// anything else it answers whole. Returns its address and how many resets it made.
async fn resetting_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let resets = Arc::new(AtomicUsize::new(0));
    let counted = resets.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let resets = counted.clone();
            tokio::spawn(async move {
                let Some(head) = support::read_request_head(&mut s).await else { return };
                if head.starts_with(b"GET /rst ") {
                    let mut out = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
                    out.extend_from_slice(&[b'x'; 1000]);
                    let _ = s.write_all(&out).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    s.set_zero_linger().unwrap();
                    resets.fetch_add(1, SeqCst);
                    drop(s);
                } else {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n").await;
                }
            });
        }
    });
    (addr, resets)
}

/// What a raw `Connection: close` GET got until the proxy closed: bytes, or None when the
/// connection was still open after `REQUEST_BOUND`.
async fn raw_get(proxy: SocketAddr, path: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(REQUEST_BOUND, read).await.ok().map(|_| out)
}

/// A reset mid-response ends that response only: its client gets the head and a short body and
/// then the connection closes (or a 502 when the reset came before the head was relayed), never
/// a hang and never bytes of another response; requests between them are answered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_response_ends_that_response_only() {
    let (backend, resets) = resetting_backend().await;
    let p = Proxy::start(&one_route(&backend_yaml("r", backend, 100), "round_robin", "")).await;
    let (truncated, whole) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (truncated, whole) = (truncated.clone(), whole.clone());
            tokio::spawn(async move {
                for i in 0..20 {
                    let path = if (task + i) % 2 == 0 { "/rst" } else { "/ok" };
                    let got = raw_get(p.addr, path)
                        .await
                        .unwrap_or_else(|| panic!("{path}: no end within {REQUEST_BOUND:?}"));
                    let text = String::from_utf8_lossy(&got);
                    if path == "/ok" {
                        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nok\n"), "/ok got {text:?}");
                        whole.fetch_add(1, SeqCst);
                        continue;
                    }
                    if text.starts_with("HTTP/1.1 502") {
                        continue;
                    }
                    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
                    assert!(
                        text.starts_with("HTTP/1.1 200") && body < 100_000,
                        "/rst got {} bytes: {:.200}",
                        got.len(),
                        text
                    );
                    assert!(
                        text[text.find("\r\n\r\n").unwrap() + 4..].bytes().all(|b| b == b'x'),
                        "/rst: foreign bytes in the body"
                    );
                    truncated.fetch_add(1, SeqCst);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "resets: {}; truncated 200s: {}; whole answers: {}",
        resets.load(SeqCst),
        truncated.load(SeqCst),
        whole.load(SeqCst)
    );
    assert_eq!(resets.load(SeqCst), TASKS * 10, "the backend reset each /rst once");
    assert_eq!(whole.load(SeqCst), TASKS * 10);
    p.stop().await;
}

/// A backend that accepts and reads but never answers: with `upstream_timeout: 1s` and
/// `max_conn: 8`, sixteen clients at once all get a 504 (the second eight once slots free), the
/// proxy closes every connection it opened to that backend, and a route to a working backend
/// is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_holds_no_slot() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let (o, o2) = (open.clone(), opened.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = silent.accept().await {
            o.fetch_add(1, SeqCst);
            o2.fetch_add(1, SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                o.fetch_sub(1, SeqCst);
            });
        }
    });
    let good = Origin::start("good").await;
    let yaml = format!(
        "server:\n  host: 127.0.0.1\n  port: 8080\n  max_conn: 8\n  upstream_timeout: 1s\nbackends:\n  silent:\n{}  good:\n{}routing:\n  silent:\n    path: /silent\n    upstream: silent\n    load_balancer: round_robin\n  good:\n    path: /\n    upstream: good\n    load_balancer: round_robin\n",
        backend_yaml("s", silent_addr, 100),
        good.yaml(100)
    );
    let p = Proxy::start(&yaml).await;
    let started = tokio::time::Instant::now();
    let clients: Vec<_> = (0..16).map(|_| tokio::spawn(raw_get(p.addr, "/silent"))).collect();
    for c in clients {
        let got = c.await.unwrap().expect("a client of the silent backend got no end");
        assert!(got.starts_with(b"HTTP/1.1 504"), "got {:?}", String::from_utf8_lossy(&got));
    }
    println!("16 clients answered 504 in {:?}", started.elapsed());
    let served = raw_get(p.addr, "/").await.expect("the good route");
    assert!(served.starts_with(b"HTTP/1.1 200"), "the good route got {:?}", String::from_utf8_lossy(&served));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while open.load(SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open.load(SeqCst), 0, "connections to the silent backend left open (of {})", opened.load(SeqCst));
    p.stop().await;
}

/// Clients keep asking over TLS (a new handshake every five requests) and plain HTTP while the
/// certificate is rotated five times and the config is changed five times: not one request
/// fails, and handshakes after the last rotation get the last certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_and_config_changes_under_load_lose_no_request() {
    let (dir, ca) = (TempDir::new(), Arc::new(Ca::new()));
    let (cert, key) = ca.issue(&["localhost"]).write(&dir, "server");
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let yaml = one_route(&(a.yaml(100) + &b.yaml(100)), "round_robin", &ssl_yaml(&cert, &key, true, ""));
    let p = Proxy::start(&yaml).await;
    let https = p.https.expect("HTTPS listener");
    let tls_clients: Vec<_> = (0..2)
        .map(|_| {
            let ca = ca.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    let mut c = h1(tls_connect(https, &ca, "localhost", &[b"http/1.1"]).await).await;
                    for _ in 0..5 {
                        let (status, body) = send(&mut c, "/").await;
                        assert_eq!(status, StatusCode::OK, "over TLS: {body}");
                    }
                }
            })
        })
        .collect();
    let plain = tokio::spawn(load(p.url("/"), 100));
    let mut last = None;
    for round in 0..5 {
        let leaf = ca.issue(&["localhost"]);
        leaf.write(&dir, "server");
        let (status, v) =
            admin_call(Method::POST, &p.admin_url("/api/v1/config/reload-ssl"), None, None, REQUEST_BOUND).await;
        assert_eq!(status, StatusCode::OK, "reload-ssl: {v}");
        last = Some(leaf);
        let weight = 50 + 10 * round as u32;
        let balancer = ["least_connections", "round_robin"][round % 2];
        let body = format!(r#"{{"config": {{"routing": {{"default": {{"load_balancer": "{balancer}"}}}}}}}}"#);
        let (status, v) =
            admin_call(Method::PUT, &p.admin_url("/api/v1/config"), Some(&body), None, REQUEST_BOUND).await;
        assert_eq!(status, StatusCode::OK, "config change: {v}");
        let body = format!(r#"{{"upstream": "default", "backend": {{"id": "b", "weight": {weight}}}}}"#);
        let (status, v) =
            admin_call(Method::PUT, &p.admin_url("/api/v1/backends/update"), Some(&body), None, REQUEST_BOUND).await;
        assert_eq!(status, StatusCode::OK, "weight change: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in tls_clients {
        c.await.unwrap();
    }
    let t = plain.await.unwrap();
    assert!(t.failed.is_empty(), "plain HTTP under rotation: {:?}", t.failed);
    assert_eq!(t.ok, TASKS * 100);
    let s = tls_connect(https, &ca, "localhost", &[b"http/1.1"]).await;
    assert!(peer_cert(&s) == last.unwrap().der, "a handshake after the last rotation got an older certificate");
    p.stop().await;
}

/// Makes `bpf(2)` fail with EPERM in the child (seccomp), as in a container without CAP_BPF
/// or on a kernel without BPF.
fn deny_bpf(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let hook = || {
        let filter = [
            // Load the syscall number (offset 0 of seccomp_data).
            libc::sock_filter { code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, jt: 0, jf: 0, k: 0 },
            libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: libc::SYS_bpf as u32,
            },
            libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            },
            libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: libc::SECCOMP_RET_ALLOW },
        ];
        let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
        // SAFETY: prctl with integer arguments, and with a pointer to a filter that lives
        // until the call returns (the kernel copies it).
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const prog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec and only calls prctl, which is
    // async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// The daemon's config for the fallback test.
fn fallback_yaml(port: u16, admin: u16, backend: &str, ebpf: &str, extra: &str) -> String {
    format!(
        "server:\n  host: \"127.0.0.1\"\n  port: {port}\nbackends:\n  default:\n{backend}routing:\n  default:\n    path: /\n    upstream: default\n    load_balancer: round_robin\ngrpc:\n  enabled: false\nadmin:\n  host: \"127.0.0.1\"\n  port: {admin}\nebpf:\n  enabled: {ebpf}\n{extra}"
    )
}

/// A kernel that refuses BPF: with `ebpf.enabled: auto` the daemon serves HTTP and WebSocket
/// (copied in userspace) and says once why there is no kernel path; with `true` it refuses to
/// start, naming the cause; `l4:` services, which only the kernel can steer, refuse too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_bpf_the_daemon_runs_the_l7_path_alone_and_says_so() {
    let o = Origin::start("o").await;
    let dir = TempDir::new();
    let (port, admin) = free_ports();
    let daemon = |yaml: &str, name: &str| {
        let config = dir.write(&format!("{name}.yaml"), yaml);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_speedmimi"));
        deny_bpf(&mut cmd);
        Daemon::spawn_with(cmd, &config, dir.0.join(format!("{name}.log")))
    };

    let auto = daemon(&fallback_yaml(port, admin, &o.yaml(100), "auto", ""), "auto");
    let url = format!("http://127.0.0.1:{port}/");
    let c = client();
    let mut served = None;
    for _ in 0..200 {
        let req = http::Request::get(&url).body(Default::default()).unwrap();
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(1), c.request(req)).await {
            served = Some(resp.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served, Some(StatusCode::OK), "the daemon without BPF did not serve\n{}", auto.log());
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws")).await.expect("WebSocket upgrade");
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text("hello")).await.unwrap();
    let echo = tokio::time::timeout(REQUEST_BOUND, ws.next()).await.expect("echo in time").expect("echo").unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "hello");
    let log = auto.log();
    assert_eq!(log.matches("eBPF unavailable").count(), 1, "one line must say why there is no kernel path:\n{log}");
    assert!(log.contains("Operation not permitted") || log.contains("EPERM"), "the line must give the cause:\n{log}");
    drop((ws, auto));

    for (name, ebpf, extra) in [
        ("required", "true", ""),
        (
            "l4",
            "auto",
            "l4:\n  - name: ws\n    interface: lo\n    vip: \"127.0.0.1\"\n    port: 9\n    upstream: default\n",
        ),
    ] {
        let mut d = daemon(&fallback_yaml(port, admin, &o.yaml(100), ebpf, extra), name);
        let status =
            d.exit(Duration::from_secs(20)).await.unwrap_or_else(|| panic!("{name}: still running\n{}", d.log()));
        assert!(!status.success(), "{name}: started without BPF\n{}", d.log());
        let log = d.log();
        assert!(log.contains("Operation not permitted"), "{name}: the error must give the cause:\n{log}");
    }
}
