//! Balancing quality seen from clients and backends, through real sockets: equal backends share
//! at concurrency 1 and 50 under every algorithm, a slow backend's share falls, slow start
//! ramps an added backend, a failing backend is ejected and comes back, retries save idempotent
//! requests within their budget, and a request whose body was sent is never sent twice.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::SeqCst},
    },
    time::Duration,
};

use http::StatusCode;
use support::{Origin, Proxy, admin_call, backend_yaml, client, get, spread, who};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const ADMIN_WAIT: Duration = Duration::from_secs(10);
const TRUST_LOCAL: &str = "  trusted_proxies: [\"127.0.0.1/32\"]\n";

/// A config with one route `/` over `backends` and `upstreams.default` set to `upstream`
/// (lines indented by four).
fn config(backends: &str, balancer: &str, upstream: &str) -> String {
    format!(
        "server:\n  host: 127.0.0.1\n  port: 8080\n{TRUST_LOCAL}upstreams:\n  default:\n{upstream}    slow_start: 0s\nbackends:\n  default:\n{backends}routing:\n  default:\n    path: /\n    upstream: default\n    load_balancer: {balancer}\n"
    )
}

async fn origins(n: usize) -> Vec<Origin> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Origin::start(&format!("b{}", i + 1)).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_backends_share_at_concurrency_1_and_50_under_every_algorithm() {
    let o = origins(3).await;
    let ups: String = o.iter().map(|x| x.yaml(100)).collect();
    for balancer in ["round_robin", "weight", "least_connections", "least_connections_weight", "ip_hash", "performance"]
    {
        let proxy = Proxy::start(&config(&ups, balancer, "")).await;
        for (concurrency, total) in [(1, 600), (50, 1500)] {
            let counts = spread(&proxy, concurrency, total).await;
            for x in &o {
                let share = counts.get(&x.backend.id).copied().unwrap_or(0) as f64 / total as f64;
                assert!(
                    (0.2..=0.47).contains(&share),
                    "{balancer} at concurrency {concurrency}: {} took {share:.3}: {counts:?}",
                    x.backend.id
                );
            }
        }
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_weight_follows_weights_one_request_at_a_time() {
    let o = origins(2).await;
    let ups = o[0].yaml(100) + &o[1].yaml(300);
    let proxy = Proxy::start(&config(&ups, "least_connections_weight", "")).await;
    let counts = spread(&proxy, 1, 800).await;
    let heavy = counts.get("b2").copied().unwrap_or(0) as f64 / 800.0;
    assert!((0.67..=0.83).contains(&heavy), "weights 1:3, heavy share {heavy:.3}: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn performance_sends_less_to_a_slow_backend() {
    let o = origins(3).await;
    for x in &o {
        x.backend.delay_ms.store(10, SeqCst);
    }
    o[0].backend.delay_ms.store(40, SeqCst);
    let ups: String = o.iter().map(|x| x.yaml(100)).collect();
    let proxy = Proxy::start(&config(&ups, "performance", "")).await;
    for concurrency in [1, 8] {
        let before = o[0].requests();
        let total = 240;
        spread(&proxy, concurrency, total).await;
        let slow = (o[0].requests() - before) as f64 / total as f64;
        assert!(slow < 0.15, "at concurrency {concurrency} the 4x slower backend took {slow:.3}");
    }
}

/// The admin API's view of backend `id` of `default`.
async fn backend_view(proxy: &Proxy, id: &str) -> serde_json::Value {
    let (status, v) =
        admin_call(http::Method::GET, &proxy.admin_url("/api/v1/backends?upstream=default"), None, None, ADMIN_WAIT)
            .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let list = v["upstreams"]["default"].as_array().cloned().unwrap_or_default();
    list.into_iter().find(|b| b["id"] == id).unwrap_or_else(|| panic!("no backend {id} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_an_added_backend() {
    let o = origins(3).await;
    let ups = o[0].yaml(100) + &o[1].yaml(100);
    let proxy =
        Proxy::start(&config(&ups, "round_robin", "    slow_start: 3s\n").replace("    slow_start: 0s\n", "")).await;
    let body =
        format!(r#"{{"upstream":"default","backend":{{"id":"b3","host":"127.0.0.1","port":{}}}}}"#, o[2].addr.port());
    let (status, v) =
        admin_call(http::Method::POST, &proxy.admin_url("/api/v1/backends/add"), Some(&body), None, ADMIN_WAIT).await;
    assert!(status.is_success(), "{status} {v}");
    // Right after: about a tenth of its full third.
    let early = spread(&proxy, 1, 150).await;
    let early_share = early.get("b3").copied().unwrap_or(0) as f64 / 150.0;
    assert!(early_share < 0.2, "b3 took {early_share:.3} at once: {early:?}");
    assert!(backend_view(&proxy, "b3").await["slow_start_share"].as_f64().unwrap() < 1.0);
    // Once the ramp is over (the API says so), its full third.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while backend_view(&proxy, "b3").await["slow_start_share"].as_f64().unwrap() < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the ramp never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let late = spread(&proxy, 1, 300).await;
    let late_share = late.get("b3").copied().unwrap_or(0) as f64 / 300.0;
    assert!((0.28..=0.39).contains(&late_share), "b3 took {late_share:.3} after the ramp: {late:?}");
}

/// What a misbehaving backend does with each request.
#[derive(Clone, Copy)]
enum Rude {
    /// Answers 503 (keep-alive).
    Unavailable,
    /// Reads the whole request, then resets the connection without a byte.
    Reset,
}

/// A raw backend that misbehaves; `requests` counts whole requests it read.
struct Misbehaving {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl Misbehaving {
    async fn start(how: Rude) -> Misbehaving {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let count = requests.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, how, count.clone()));
            }
        });
        Misbehaving { addr, requests }
    }

    fn requests(&self) -> u64 {
        self.requests.load(SeqCst)
    }
}

async fn serve(mut s: TcpStream, how: Rude, count: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    loop {
        // One request: its head, then a Content-Length body if any.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        buf.drain(..head_end + length);
        count.fetch_add(1, SeqCst);
        match how {
            Rude::Unavailable => {
                let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nbusy\n";
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
            Rude::Reset => {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                return;
            }
        }
    }
}

async fn metric(proxy: &Proxy, name: &str) -> f64 {
    let (_, _, text) = get(&client(), &proxy.admin_url("/metrics"), &[]).await;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_ejected_and_comes_back_for_longer_ejections() {
    let good = Origin::start("good").await;
    let bad = Misbehaving::start(Rude::Unavailable).await;
    let ups = good.yaml(100) + &backend_yaml("bad", bad.addr, 100);
    let upstream = "    outlier_ejection: { consecutive_failures: 3, base_time: 1s }\n    retries: { max: 0 }\n";
    let proxy = Proxy::start(&config(&ups, "round_robin", upstream)).await;
    let c = client();
    let mut unavailable = 0;
    for _ in 0..20 {
        let (status, _, _) = get(&c, &proxy.url("/"), &[]).await;
        unavailable += usize::from(status == StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!((unavailable, bad.requests()), (3, 3), "ejected after three 503s in a row");
    let view = backend_view(&proxy, "bad").await;
    assert_eq!(view["outlier"]["ejected"], true, "{view}");
    assert_eq!(metric(&proxy, "speedmimi_backend_ejections_total{upstream=\"default\",backend=\"bad\"}").await, 1.0);
    // Its time is up: it gets traffic again, fails three more times, and goes for two seconds.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for _ in 0..20 {
        get(&c, &proxy.url("/"), &[]).await;
    }
    assert_eq!(bad.requests(), 6, "back after one base time, out again after three more");
    let view = backend_view(&proxy, "bad").await;
    let left = view["outlier"]["ejected_for_ms"].as_u64().unwrap();
    assert!(left > 1000 && view["outlier"]["ejections"] == 2, "the second ejection lasts two base times: {view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_save_idempotent_requests_and_the_budget_caps_them() {
    let good = Origin::start("good").await;
    let bad = Misbehaving::start(Rude::Unavailable).await;
    let ups = good.yaml(100) + &backend_yaml("bad", bad.addr, 100);
    // No share of requests, one retry per second of floor: ten in the 10 s window.
    let upstream =
        "    outlier_ejection: { consecutive_failures: 0 }\n    retries: { budget_percent: 0, min_per_second: 1 }\n";
    let proxy = Proxy::start(&config(&ups, "round_robin", upstream)).await;
    let c = client();
    let mut unavailable = 0;
    for _ in 0..40 {
        let (status, _, _) = get(&c, &proxy.url("/"), &[]).await;
        assert!(status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE, "{status}");
        unavailable += u64::from(status == StatusCode::SERVICE_UNAVAILABLE);
    }
    let retried = metric(&proxy, "speedmimi_upstream_retries_total{upstream=\"default\"}").await;
    let refused = metric(&proxy, "speedmimi_upstream_retries_refused_total{upstream=\"default\"}").await;
    assert_eq!(retried, 10.0, "the budget's floor");
    assert_eq!(refused, unavailable as f64, "each refused retry is a 503 the client saw");
    assert_eq!(bad.requests(), 10 + unavailable, "every 503 was retried or reached the client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_answer_is_retried_for_a_get_and_never_for_a_sent_post() {
    let good = Origin::start("good").await;
    let bad = Misbehaving::start(Rude::Reset).await;
    let ups = good.yaml(100) + &backend_yaml("bad", bad.addr, 100);
    let proxy = Proxy::start(&config(&ups, "round_robin", "    outlier_ejection: { consecutive_failures: 0 }\n")).await;
    let c = client();
    for _ in 0..10 {
        assert_eq!(who(&c, &proxy.url("/"), &[]).await, "good");
    }
    assert!(bad.requests() >= 3, "the resetting backend was tried: {}", bad.requests());
    // POSTs: each that reached the resetting backend is a 502, and it saw each once.
    let before = bad.requests();
    let mut bad_gateway = 0;
    for _ in 0..10 {
        let req = http::Request::post(proxy.url("/echo")).body(http_body_util::Full::from("payload")).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req)).await.unwrap().unwrap();
        assert!(resp.status() == StatusCode::OK || resp.status() == StatusCode::BAD_GATEWAY, "{}", resp.status());
        bad_gateway += u64::from(resp.status() == StatusCode::BAD_GATEWAY);
    }
    assert!(bad_gateway > 0, "round robin sent some POSTs to the resetting backend");
    assert_eq!(bad.requests() - before, bad_gateway, "a POST whose body was sent is never sent again");
}
