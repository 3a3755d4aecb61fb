//! Long-lived and streamed exchanges through SpeedMimi over real sockets: WebSocket echo and
//! ip_hash stickiness, failed and declined upgrades counted like any request, SSE delivered as it
//! is produced, large streamed bodies, h2c and gRPC.

mod support;

use std::{
    collections::HashSet,
    convert::Infallible,
    pin::Pin,
    process::Stdio,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use support::{Origin, Proxy, client, flows::Rng, h2c, one_route};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, handshake::client::Response as WsResponse},
};

/// Guard against hangs: every await on the network is bounded by this.
const GUARD: Duration = Duration::from_secs(20);

async fn guard<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// FNV-1a over a byte stream.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to `/ws` through the proxy with extra request headers.
async fn ws_connect(proxy: &Proxy, headers: &[(&'static str, &str)]) -> (Ws, WsResponse) {
    let mut req = format!("ws://{}/ws", proxy.addr).into_client_request().expect("ws request");
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().expect("header value"));
    }
    let tcp = guard("connect", TcpStream::connect(proxy.addr)).await.expect("connect to proxy");
    guard("ws handshake", tokio_tungstenite::client_async(req, tcp)).await.expect("ws handshake through proxy")
}

/// Sends `msg` and returns the next data message that comes back.
async fn ws_roundtrip(ws: &mut Ws, msg: Message) -> Message {
    guard("ws send", ws.send(msg)).await.expect("ws send");
    for _ in 0..16 {
        match guard("ws echo", ws.next()).await {
            Some(Ok(m)) if m.is_binary() || m.is_text() => return m,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("unexpected while waiting for echo: {other:?}"),
        }
    }
    panic!("no echo after 16 control frames");
}

/// Closes from the client side and expects the close reply, then the end of the stream.
async fn ws_close(mut ws: Ws) {
    guard("ws close", ws.close(None)).await.expect("send close");
    let mut saw_close = false;
    for _ in 0..16 {
        match guard("ws close reply", ws.next()).await {
            Some(Ok(Message::Close(_))) => saw_close = true,
            Some(Ok(m)) if m.is_ping() || m.is_pong() => {}
            Some(Ok(m)) => panic!("data after close: {m:?}"),
            // tungstenite reports the end of a completed close handshake as ConnectionClosed.
            Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) | None => {
                assert!(saw_close, "stream ended without a close frame from the server");
                return;
            }
            Some(Err(e)) => panic!("ws error while closing (saw close frame: {saw_close}): {e}"),
        }
    }
    panic!("websocket did not end after close");
}

/// Closes from the client side without judging the close handshake (checked on its own in
/// the `websocket_close_*` tests): the connection just has to end.
async fn ws_close_lenient(mut ws: Ws) {
    let _ = guard("ws close", ws.close(None)).await;
    for _ in 0..16 {
        match guard("ws end", ws.next()).await {
            Some(Ok(m)) if m.is_close() || m.is_ping() || m.is_pong() => {}
            Some(Ok(m)) => panic!("data after close: {m:?}"),
            Some(Err(_)) | None => return,
        }
    }
    panic!("websocket did not end after close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_is_byte_exact_across_frame_size_boundaries() {
    let origin = Origin::start("ws1").await;
    let proxy = Proxy::start(&one_route(&origin.yaml(1), "round_robin", "")).await;

    let (mut ws, resp) = ws_connect(&proxy, &[]).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS, "handshake response: {resp:?}");
    assert_eq!(
        resp.headers().get("x-backend-id").and_then(|v| v.to_str().ok()),
        Some("ws1"),
        "the 101 should be the origin's, relayed by the proxy: {:?}",
        resp.headers()
    );
    assert!(
        resp.headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "101 without Upgrade: websocket: {:?}",
        resp.headers()
    );
    assert!(resp.headers().contains_key("sec-websocket-accept"), "101 without accept key: {:?}", resp.headers());
    assert_eq!(origin.requests(), 1, "the handshake should have reached the origin once");

    let mut rng = Rng(0x5eed_0001);
    let mut sizes = vec![1usize, 2, 125, 126, 65535, 65536, 1_048_576];
    for _ in 0..3 {
        sizes.push(127 + (rng.next_u64() % (65535 - 127)) as usize);
        sizes.push(65537 + (rng.next_u64() % (1_048_576 - 65537)) as usize);
    }
    for (i, &size) in sizes.iter().enumerate() {
        let data = rng.bytes(size);
        let echoed = ws_roundtrip(&mut ws, Message::binary(data.clone())).await;
        assert!(echoed.is_binary(), "message {i} (size {size}) came back as {echoed:?}");
        let echoed = echoed.into_data();
        assert_eq!(echoed.len(), size, "message {i}: echoed length differs");
        assert!(echoed[..] == data[..], "message {i} (size {size}): echoed bytes differ");
    }

    let text = "héllo through SpeedMimi ✓ — text frame";
    let echoed = ws_roundtrip(&mut ws, Message::text(text)).await;
    assert_eq!(echoed, Message::text(text));

    ws_close_lenient(ws).await;
    // The whole conversation was one upgraded request to the origin.
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_close_handshake_through_proxy_to_demo_origin() {
    let origin = Origin::start("wsc").await;
    let proxy = Proxy::start(&one_route(&origin.yaml(1), "round_robin", "")).await;
    let (mut ws, resp) = ws_connect(&proxy, &[]).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(ws_roundtrip(&mut ws, Message::text("bye")).await, Message::text("bye"));
    // The client's Close must be answered with the server's Close before the connection ends
    // (RFC 6455 §5.5.1).
    ws_close(ws).await;
}

/// A WebSocket origin written with tungstenite's own server handshake and close handling
/// (echoes data messages; answers a Close and then closes the TCP connection).
async fn conforming_ws_origin() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
        for _ in 0..1024 {
            match ws.next().await {
                Some(Ok(m)) if m.is_text() || m.is_binary() => {
                    if ws.send(m).await.is_err() {
                        return;
                    }
                }
                // tungstenite queues the Close reply itself; flushing it ends the session.
                Some(Ok(Message::Close(_))) => {
                    let _ = ws.flush().await;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_close_handshake_is_relayed_both_ways() {
    let (addr, origin) = conforming_ws_origin().await;
    let upstream = support::backend_yaml("tws", addr, 1);
    let proxy = Proxy::start(&one_route(&upstream, "round_robin", "")).await;
    let (mut ws, resp) = ws_connect(&proxy, &[]).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let data = Rng(7).bytes(70_000);
    let echoed = ws_roundtrip(&mut ws, Message::binary(data.clone())).await;
    assert!(echoed.into_data()[..] == data[..], "echo through proxy differs");
    ws_close(ws).await;
    guard("origin session end", origin).await.expect("origin task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ip_hash_keeps_a_client_on_one_origin() {
    let origins = [Origin::start("h1").await, Origin::start("h2").await, Origin::start("h3").await];
    let upstream: String = origins.iter().map(|o| o.yaml(1)).collect();
    let yaml = one_route(
        &upstream,
        "round_robin\n    protocols:\n      websocket: ip_hash",
        "  trusted_proxies: [\"127.0.0.1/32\"]",
    );
    let proxy = Proxy::start(&yaml).await;
    let counts = || origins.iter().map(Origin::requests).collect::<Vec<_>>();

    /// Opens one WebSocket as `ip`, checks the echo, and returns the origin it reached.
    async fn connect_as(proxy: &Proxy, origins: &[Origin], ip: &str) -> String {
        let before: Vec<u64> = origins.iter().map(Origin::requests).collect();
        let (mut ws, resp) = ws_connect(proxy, &[("x-real-ip", ip)]).await;
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let echoed = ws_roundtrip(&mut ws, Message::text(format!("from {ip}"))).await;
        assert_eq!(echoed, Message::text(format!("from {ip}")));
        ws_close_lenient(ws).await;
        let after: Vec<u64> = origins.iter().map(Origin::requests).collect();
        let reached: Vec<&str> = origins
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a > b)
            .map(|(o, _)| o.backend.id.as_str())
            .collect();
        assert_eq!(reached.len(), 1, "one handshake should reach exactly one origin: {before:?} -> {after:?}");
        let header_id = resp.headers().get("x-backend-id").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert_eq!(header_id, reached[0], "101's x-backend-id vs origin counters");
        reached[0].to_owned()
    }

    for ip in ["203.0.113.7", "198.51.100.23"] {
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(connect_as(&proxy, &origins, ip).await);
        }
        assert!(seen.iter().all(|s| *s == seen[0]), "X-Real-IP {ip} moved between origins: {seen:?}");
    }

    // The hash is of X-Real-IP (not of the proxy's peer 127.0.0.1): distinct client addresses
    // spread over more than one origin (deterministic for these addresses).
    let mut reached = HashSet::new();
    for i in 1..=12u8 {
        reached.insert(connect_as(&proxy, &origins, &format!("192.0.2.{}", i * 17)).await);
    }
    assert!(reached.len() > 1, "12 different X-Real-IP values all reached {reached:?}; counters {:?}", counts());
}

/// A WebSocket upgrade request for `path` on a connection of its own; returns the status the
/// proxy answered with.
async fn upgrade_status(proxy: &Proxy, path: String) -> u16 {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let answer = guard("upgrade answer", support::raw(proxy.addr, req.as_bytes())).await;
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok());
    status.unwrap_or_else(|| panic!("{path}: no status line in {answer:?}"))
}

/// The value of the exposition line `key value` (a count), 0 when absent.
fn metric(text: &str, key: &str) -> u64 {
    text.lines().filter_map(|l| l.rsplit_once(' ')).find(|(k, _)| *k == key).map_or(0, |(_, v)| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_declined_upgrades_are_counted_for_route_and_backend() {
    use support::logging::{LoggingBackend, Reply};
    let garbage = LoggingBackend::start(Reply::raw_then_close(b"SSH-2.0-not-http\r\n\r\n")).await;
    let closes = LoggingBackend::start(Reply::raw_then_close(b"")).await;
    let not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n".to_vec();
    let missing = LoggingBackend::start(Reply { bytes: not_found, close: false }).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let (declined, ws) = (Origin::start("declined").await, Origin::start("ws").await);
    // Two addresses where nothing listens (both bound at once, so they differ).
    let (l1, l2) =
        (std::net::TcpListener::bind("127.0.0.1:0").unwrap(), std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let (dead1, dead2) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
    drop((l1, l2));

    // (route and upstream, its backends, what the client gets): failed (502, 504), declined
    // with the backend's own answer (200 from `/declined`, 404), and a 101 counted once.
    let cases = [
        ("garbage", vec![("garbage", garbage.addr)], 502),
        ("closes", vec![("closes", closes.addr)], 502),
        ("silent", vec![("silent", silent_addr)], 504),
        ("dead", vec![("dead1", dead1), ("dead2", dead2)], 502),
        ("declined", vec![("declined", declined.addr)], 200),
        ("missing", vec![("missing", missing.addr)], 404),
        ("ws", vec![("ws", ws.addr)], 101),
    ];
    let mut yaml = "server:\n  host: 127.0.0.1\n  port: 8080\n  upstream_timeout: 500ms\nbackends:\n".to_owned();
    for (name, backends, _) in &cases {
        yaml += &format!("  {name}:\n");
        for (id, addr) in backends {
            yaml += &support::backend_yaml(id, *addr, 1);
        }
    }
    yaml += "routing:\n";
    for (name, ..) in &cases {
        yaml += &format!("  {name}:\n    path: /{name}\n    upstream: {name}\n    load_balancer: round_robin\n");
    }
    let proxy = Proxy::start(&yaml).await;

    let statuses =
        futures_util::future::join_all(cases.iter().map(|(name, ..)| upgrade_status(&proxy, format!("/{name}")))).await;
    let want: Vec<u16> = cases.iter().map(|c| c.2).collect();
    assert_eq!(statuses, want, "answers to {:?}", cases.iter().map(|c| c.0).collect::<Vec<_>>());

    let c = client();
    let (_, _, metrics) = support::get(&c, &proxy.admin_url("/metrics"), &[]).await;
    let mut wrong = Vec::new();
    for (name, backends, code) in &cases {
        let (mut total, mut in_class, mut by_code, mut timed) = (0, 0, 0, 0);
        for (id, _) in backends {
            let url = proxy.admin_url(&format!("/api/v1/stats/backend?upstream={name}&backend_id={id}"));
            let (status, _, text) = support::get(&c, &url, &[]).await;
            assert_eq!(status, StatusCode::OK, "{text}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            total += v["requests"]["total"].as_u64().unwrap();
            in_class += v["status"][format!("{}xx", code / 100)].as_u64().unwrap();
            let labels = format!("route=\"{name}\",upstream=\"{name}\",backend=\"{id}\"");
            by_code += metric(&metrics, &format!("speedmimi_requests_total{{{labels},code=\"{code}\"}}"));
            let labels = format!("upstream=\"{name}\",backend=\"{id}\"");
            timed += metric(&metrics, &format!("speedmimi_request_duration_seconds_count{{{labels}}}"));
        }
        let per_route: u64 = metrics
            .lines()
            .filter(|l| l.starts_with(&format!("speedmimi_requests_total{{route=\"{name}\",")))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum();
        let counted = (total, in_class, by_code, per_route, timed);
        if counted != (1, 1, 1, 1, 1) {
            wrong.push(format!("{name} ({code}): {counted:?}"));
        }
    }
    holder.abort();
    assert!(
        wrong.is_empty(),
        "counted once for backend (requests, {{class}}xx in /api/v1/stats/backend), route (its code, all its \
         codes in speedmimi_requests_total) and backend latency (_count), not so for:\n{}\n{metrics}",
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Server-sent events
// ---------------------------------------------------------------------------------------------

/// The `data:` lines of an SSE text, as (backend id, event number).
fn sse_data(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            let (id, n) = d.rsplit_once(' ').unwrap_or_else(|| panic!("bad data line {d:?}"));
            (id.to_owned(), n.trim().parse().unwrap_or_else(|_| panic!("bad event number in {d:?}")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_are_delivered_as_they_are_produced() {
    let origin = Origin::start("sse1").await;
    let proxy = Proxy::start(&one_route(&origin.yaml(1), "round_robin", "")).await;
    let c = client();
    let req = Request::get(proxy.url("/events?count=5&interval_ms=300"))
        .header(header::ACCEPT, "text/event-stream")
        .body(Full::default())
        .unwrap();
    let resp = guard("sse response head", c.request(req)).await.expect("sse request");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
        Some("text/event-stream"),
        "{:?}",
        resp.headers()
    );
    let mut body = resp.into_body();
    let mut text = String::new();

    // Read until the first event is complete.
    let mut frames = 0;
    while !text.contains("data: sse1 0\n\n") {
        frames += 1;
        assert!(frames <= 64, "first event not complete after 64 frames: {text:?}");
        let frame = guard("first sse event", body.frame()).await;
        let Some(frame) = frame else { panic!("stream ended before the first event: {text:?}") };
        if let Ok(data) = frame.expect("sse body frame").into_data() {
            text.push_str(std::str::from_utf8(&data).expect("utf-8 events"));
        }
    }
    // The first event arrived on its own: the last one is not produced yet, so the proxy did
    // not buffer the stream, and more frames are still to come.
    assert!(!text.contains("data: sse1 4"), "first event only delivered together with the last: {text:?}");
    assert!(!body.is_end_stream(), "body at its end after the first event");
    let next = guard("second sse frame", body.frame()).await;
    let Some(next) = next else { panic!("stream ended right after the first event: {text:?}") };
    if let Ok(data) = next.expect("sse body frame").into_data() {
        text.push_str(std::str::from_utf8(&data).expect("utf-8 events"));
    }

    // The rest, then the end of the stream.
    let mut ended = false;
    for _ in 0..64 {
        match guard("sse events", body.frame()).await {
            None => {
                ended = true;
                break;
            }
            Some(frame) => {
                if let Ok(data) = frame.expect("sse body frame").into_data() {
                    text.push_str(std::str::from_utf8(&data).expect("utf-8 events"));
                }
            }
        }
    }
    assert!(ended, "stream did not end after 64 more frames: {text:?}");
    let events = sse_data(&text);
    let expected: Vec<(String, u64)> = (0..5).map(|i| ("sse1".to_owned(), i)).collect();
    assert_eq!(events, expected, "full stream: {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_through_curl_no_buffer() {
    let origin = Origin::start("sse2").await;
    let proxy = Proxy::start(&one_route(&origin.yaml(1), "round_robin", "")).await;
    let child = tokio::process::Command::new("/usr/bin/curl")
        .args(["-sN", "--max-time", "10", "-H", "Accept: text/event-stream"])
        .arg(proxy.url("/events?count=3&interval_ms=50"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn curl");
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("curl did not finish within 10 s")
        .expect("curl output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {:?}; stderr: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let events = sse_data(&stdout);
    let expected: Vec<(String, u64)> = (0..3).map(|i| ("sse2".to_owned(), i)).collect();
    assert_eq!(events, expected, "curl output: {stdout:?}");
    assert_eq!(stdout.matches("event: tick\n").count(), 3, "curl output: {stdout:?}");
}

// ---------------------------------------------------------------------------------------------
// Large streamed body
// ---------------------------------------------------------------------------------------------

/// A request body fed chunk by chunk through a channel (no length known up front).
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streamed_body_echoes_byte_exact() {
    const TOTAL: usize = 8 * 1024 * 1024;
    const CHUNK: usize = 61 * 1024 + 7; // odd size so chunks never line up with buffers
    let origin = Origin::start("big1").await;
    let proxy = Proxy::start(&one_route(&origin.yaml(1), "round_robin", "")).await;

    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let producer = tokio::spawn(async move {
        let mut rng = Rng(0x0b16_b0d7);
        let mut sum = Fnv::new();
        let mut sent = 0usize;
        while sent < TOTAL {
            let n = CHUNK.min(TOTAL - sent);
            let chunk = rng.bytes(n);
            sum.update(&chunk);
            if tx.send(Bytes::from(chunk)).await.is_err() {
                break;
            }
            sent += n;
        }
        (sent, sum.0)
    });

    let c: Client<_, ChanBody> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(proxy.url("/echo"))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(ChanBody(rx))
        .unwrap();
    let resp = guard("echo response head", c.request(req)).await.expect("echo request");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = 0usize;
    let mut sum = Fnv::new();
    let mut frames = 0usize;
    loop {
        frames += 1;
        assert!(frames <= TOTAL, "too many frames");
        match guard("echo body", body.frame()).await {
            None => break,
            Some(f) => {
                if let Ok(d) = f.expect("echo body frame").into_data() {
                    got += d.len();
                    sum.update(&d);
                }
            }
        }
    }
    let (sent, sent_sum) = guard("producer", producer).await.expect("producer task");
    assert_eq!(sent, TOTAL, "the proxy stopped taking the request body after {sent} bytes");
    assert_eq!(got, TOTAL, "echoed length");
    assert_eq!(sum.0, sent_sum, "echoed content checksum differs");
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 (h2c) and gRPC
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_on_the_http_listener() {
    let origin = Origin::start("h2o").await;
    let proxy = Proxy::start(&one_route(&origin.yaml(1), "round_robin", "")).await;
    let mut sender = h2c::<Empty<Bytes>>(proxy.addr).await;
    for _ in 0..2 {
        let req = Request::get(proxy.url("/")).body(Empty::new()).unwrap();
        let resp = guard("h2 request", sender.send_request(req)).await.expect("h2 request");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers().get("x-backend-id").and_then(|v| v.to_str().ok()), Some("h2o"));
        let body = guard("h2 body", resp.into_body().collect()).await.expect("h2 body").to_bytes();
        assert_eq!(&body[..], b"h2o\n");
    }
    assert_eq!(origin.requests(), 2);
}

fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(payload.len() + 5);
    f.push(0);
    f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    f.extend_from_slice(payload);
    Bytes::from(f)
}

/// One unary call; returns (echoed body, trailers).
async fn grpc_call(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    grpc: std::net::SocketAddr,
    frame: Bytes,
) -> (Bytes, HeaderMap) {
    let req = Request::post(format!("http://{grpc}/test.Echo/Say"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(Full::new(frame))
        .unwrap();
    let resp = guard("grpc response head", sender.send_request(req)).await.expect("grpc call through the proxy");
    assert_eq!(resp.status(), StatusCode::OK, "{resp:?}");
    assert_eq!(
        resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
        Some("application/grpc"),
        "{:?}",
        resp.headers()
    );
    let collected = guard("grpc body", resp.into_body().collect()).await.expect("grpc body");
    let trailers = collected.trailers().cloned().unwrap_or_else(|| panic!("no trailers in the gRPC response"));
    (collected.to_bytes(), trailers)
}

fn grpc_yaml(origin: &Origin) -> String {
    one_route(&origin.yaml(1), "round_robin", "grpc:\n  enabled: true\n  host: 127.0.0.1\n  port: 9090")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_echo_with_trailers() {
    let origin = Origin::start("g1").await;
    let proxy = Proxy::start(&grpc_yaml(&origin)).await;
    let grpc = proxy.grpc.expect("grpc listener");
    let mut sender = h2c::<Full<Bytes>>(grpc).await;

    let frame = grpc_frame(b"\x0a\x05hello");
    let (body, trailers) = grpc_call(&mut sender, grpc, frame.clone()).await;
    assert_eq!(body, frame, "echoed gRPC frame differs");
    assert_eq!(trailers.get("grpc-status").and_then(|v| v.to_str().ok()), Some("0"), "trailers: {trailers:?}");
    assert_eq!(trailers.get("grpc-message").and_then(|v| v.to_str().ok()), Some("ok"), "trailers: {trailers:?}");
    assert_eq!(trailers.get("x-backend-id").and_then(|v| v.to_str().ok()), Some("g1"), "trailers: {trailers:?}");
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_concurrent_calls_share_one_h2_connection() {
    let origin = Origin::start("g2").await;
    let proxy = Proxy::start(&grpc_yaml(&origin)).await;
    let grpc = proxy.grpc.expect("grpc listener");
    let sender = h2c::<Full<Bytes>>(grpc).await;

    let mut rng = Rng(0x09f0_ca11);
    let payloads: Vec<Vec<u8>> = [16usize, 4096, 200 * 1024].iter().map(|&n| rng.bytes(n)).collect();
    let calls = payloads.iter().map(|p| {
        let mut s = sender.clone();
        let frame = grpc_frame(p);
        async move {
            let (body, trailers) = grpc_call(&mut s, grpc, frame.clone()).await;
            (frame, body, trailers)
        }
    });
    let results = guard("concurrent grpc calls", futures_util::future::join_all(calls)).await;
    assert_eq!(results.len(), 3);
    for (i, (frame, body, trailers)) in results.into_iter().enumerate() {
        assert_eq!(body.len(), frame.len(), "call {i}: echoed length");
        assert!(body == frame, "call {i}: echoed bytes differ");
        assert_eq!(trailers.get("grpc-status").and_then(|v| v.to_str().ok()), Some("0"), "call {i}: {trailers:?}");
        assert_eq!(trailers.get("x-backend-id").and_then(|v| v.to_str().ok()), Some("g2"), "call {i}: {trailers:?}");
    }
    assert_eq!(origin.requests(), 3);
}
