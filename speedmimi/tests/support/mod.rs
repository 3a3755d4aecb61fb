//! Test support: in-process demo origins and a SpeedMimi instance on 127.0.0.1:0, plus small
//! real clients (hyper, raw TCP) to talk to them.
#![allow(dead_code)]

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use speedmimi::{
    Listeners,
    config::Config,
    datapath::{Datapath, Userspace},
    demo::DemoBackend,
    shutdown::{self, Trigger},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub mod browser;
pub mod daemon;
pub mod flows;
pub mod haproxy;
pub mod lab;
pub mod logging;
pub mod packages;
pub mod recorder;
pub mod tls;
pub mod wire;

/// True when the test may run (running as root, so it can load eBPF). Without root: under
/// CI=true it panics, because CI must run these tests; otherwise it prints why the test is
/// skipped and returns false.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs root to load eBPF, and CI must run it");
    }
    eprintln!("skipping {test}: needs root to load eBPF");
    false
}

/// A demo origin serving on 127.0.0.1:<ephemeral>; stops when dropped.
pub struct Origin {
    pub backend: Arc<DemoBackend>,
    pub addr: SocketAddr,
    _stop: Trigger,
}

impl Origin {
    pub async fn start(id: &str) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = DemoBackend::new(id);
        let (stop, wait) = shutdown::channel();
        tokio::spawn(backend.clone().serve(listener, wait));
        Origin { backend, addr, _stop: stop }
    }

    pub fn requests(&self) -> u64 {
        self.backend.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn connections(&self) -> u64 {
        self.backend.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// TCP connections open to this origin now.
    pub fn open_connections(&self) -> u64 {
        self.backend.open_connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// YAML of this origin as a backend entry (list item, indented for `backends.<up>:`).
    pub fn yaml(&self, weight: u32) -> String {
        backend_yaml(&self.backend.id, self.addr, weight)
    }
}

pub fn backend_yaml(id: &str, addr: SocketAddr, weight: u32) -> String {
    format!("    - id: \"{id}\"\n      host: \"{}\"\n      port: {}\n      weight: {weight}\n", addr.ip(), addr.port())
}

/// An address where nothing listens (a port just released).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A running SpeedMimi; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub grpc: Option<SocketAddr>,
    /// The TLS listener, when the config has `ssl.enabled` with `ssl.port`.
    pub https: Option<SocketAddr>,
    /// The admin API.
    pub admin: SocketAddr,
    stop: Trigger,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Starts SpeedMimi on `yaml` (its listener ports are ignored: tests bind port 0),
    /// with the userspace datapath.
    pub async fn start(yaml: &str) -> Proxy {
        Proxy::start_with(yaml, Arc::new(Userspace)).await
    }

    /// Starts SpeedMimi with the given datapath. With `RUST_LOG` set, its log goes to the test's
    /// output.
    pub async fn start_with(yaml: &str, datapath: Arc<dyn Datapath>) -> Proxy {
        if std::env::var_os("RUST_LOG").is_some() {
            let filter = tracing_subscriber::EnvFilter::from_default_env();
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let config = Config::parse(yaml).unwrap_or_else(|e| panic!("test config rejected: {e}\n{yaml}"));
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = if config.file.grpc.enabled { Some(TcpListener::bind("127.0.0.1:0").await.unwrap()) } else { None };
        let addr = http.local_addr().unwrap();
        let grpc_addr = grpc.as_ref().map(|g| g.local_addr().unwrap());
        let ssl = &config.file.ssl;
        let https = match ssl.enabled && ssl.port.is_some() {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let https_addr = https.as_ref().map(|h| h.local_addr().unwrap());
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (stop, wait) = shutdown::channel();
        let task = tokio::spawn(async move {
            let listeners = Listeners { http, grpc, https, admin: Some(admin) };
            speedmimi::run_with(config, listeners, datapath, wait, None).await.expect("speedmimi run");
        });
        wait_serving(admin_addr, &task).await;
        Proxy { addr, grpc: grpc_addr, https: https_addr, admin: admin_addr, stop, task: Some(task) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// URL of an admin API path.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Stops and waits for the graceful end.
    pub async fn stop(mut self) {
        self.stop.fire();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t).await.expect("graceful stop").unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.fire();
    }
}

/// Waits (at most 10 s) until the daemon answers on its admin listener: its listeners are bound
/// before `run_with` has read its config's files (certificates), and a test that changes them at
/// once must not race that startup. Returns early if the daemon stopped.
async fn wait_serving(admin: SocketAddr, task: &tokio::task::JoinHandle<()>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline && !task.is_finished() {
        let answered = tokio::time::timeout(Duration::from_millis(500), async {
            let mut s = TcpStream::connect(admin).await.ok()?;
            s.write_all(b"GET /api/v1/stats/server HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.ok()?;
            let mut first = [0u8; 1];
            (s.read(&mut first).await.ok()? > 0).then_some(())
        })
        .await;
        if let Ok(Some(())) = answered {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A config with one route `/` over the given `backends:` entries.
pub fn one_route(upstream_yaml: &str, balancer: &str, extra: &str) -> String {
    format!(
        "server:\n  host: 127.0.0.1\n  port: 8080\n{extra}\nbackends:\n  default:\n{upstream_yaml}\nrouting:\n  default:\n    path: /\n    upstream: default\n    load_balancer: {balancer}\n"
    )
}

/// One admin API call, bounded by `within`: the status and the JSON answer (a body that is not
/// JSON comes back as a JSON string).
pub async fn admin_call(
    method: http::Method,
    url: &str,
    body: Option<&str>,
    token: Option<&str>,
    within: Duration,
) -> (StatusCode, serde_json::Value) {
    let mut b = Request::builder().method(method).uri(url);
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let req = b.body(Full::new(Bytes::from(body.unwrap_or("").to_owned()))).unwrap();
    let resp = tokio::time::timeout(within, client().request(req)).await.expect("admin call timed out").unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET with optional extra headers; returns status, response headers and body text.
pub async fn get(c: &HttpClient, url: &str, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, String) {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp: Response<_> = tokio::time::timeout(Duration::from_secs(20), c.request(b.body(Full::default()).unwrap()))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned())
}

/// The backend id a GET of `/` reached.
pub async fn who(c: &HttpClient, url: &str, headers: &[(&str, &str)]) -> String {
    let (status, _, body) = get(c, url, headers).await;
    assert_eq!(status, StatusCode::OK, "body: {body}");
    body.trim().to_owned()
}

/// Sends raw bytes on a new connection and returns everything the proxy answers until it
/// closes or goes quiet for a second.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until the peer closes; returns what it sent, or None if it was still open at `deadline`.
pub async fn read_to_close(s: &mut (impl AsyncReadExt + Unpin), deadline: tokio::time::Instant) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// An empty-bodied request type for h2 clients.
pub type EmptyBody = Empty<Bytes>;

/// A prior-knowledge h2c client connection to `addr` (connect and handshake bounded by 20 s).
pub async fn h2c<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let within = Duration::from_secs(20);
    let tcp =
        tokio::time::timeout(within, TcpStream::connect(addr)).await.expect("connect timed out").expect("connect");
    let handshake = hyper::client::conn::http2::handshake(TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp));
    let (sender, conn) = tokio::time::timeout(within, handshake)
        .await
        .expect("h2 handshake timed out")
        .expect("h2c handshake with the proxy");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// `total` GETs of `/` from `concurrency` tasks (each its own keep-alive client, client i
/// claiming address `10.0.x.y` so that `ip_hash` sees many clients), counted by backend id.
pub async fn spread(proxy: &Proxy, concurrency: usize, total: usize) -> HashMap<String, usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let url = proxy.url("/");
        let n = total / concurrency;
        tasks.spawn(async move {
            let c = client();
            let mut ids = Vec::new();
            for i in 0..n {
                let ip = format!("10.0.{}.{}", t % 256, i % 256);
                ids.push(who(&c, &url, &[("x-real-ip", &ip)]).await);
            }
            ids
        });
    }
    let mut counts = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        for id in r.unwrap() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

/// Reads from `s` until a whole request head has arrived (what followed it, too); None when the
/// peer closed or failed first.
pub async fn read_request_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}
