//! HTTP/2 requests through the bridge (`proxy/h1/bridge.rs`) and through hyper's client side by
//! side: every case is sent over h2c to a SpeedMimi with `server.http1_fast_path: true`, which
//! forwards bodiless HTTP/2 requests to HTTP/1.1 backends with its own engine, and to one with
//! `false`, which forwards them with hyper's client; both stand in front of one raw-TCP
//! recording backend. The client's answers (status, fields in order, body bytes, trailers, or
//! the stream's error) and the requests the backend read (first line, fields in order, body)
//! must be the same from both, `Date` values aside. `H2_BRIDGE_SHOW=1` prints every case.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http2::SendRequest;
use support::{
    Proxy, backend_yaml, h2c, one_route,
    recorder::{Recorder, Seen, letters, side_by_side},
};
use tokio::time::timeout;

/// Bound of one case through both proxies.
const CASE: Duration = Duration::from_secs(20);

struct Case {
    name: &'static str,
    method: Method,
    /// After the tag: `<script>[?query]`.
    target: &'static str,
    fields: Vec<(String, String)>,
    /// Sent as the request body (the bridge takes only bodiless requests).
    body: Option<&'static [u8]>,
}

fn case(name: &'static str, method: Method, target: &'static str, fields: &[(&str, &str)]) -> Case {
    let fields = fields.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
    Case { name, method, target, fields, body: None }
}

fn cases() -> Vec<Case> {
    let many: Vec<(String, String)> = (0..90).map(|i| (format!("x-req-{i}"), format!("v{i}"))).collect();
    let big = String::from_utf8(letters(12 << 10, 1)).unwrap();
    vec![
        case("GET", Method::GET, "echo?q=1&r=2", &[("user-agent", "t"), ("accept", "*/*")]),
        case("HEAD with Content-Length", Method::HEAD, "sized", &[]),
        case("GET a sized answer", Method::GET, "sized", &[]),
        case("OPTIONS", Method::OPTIONS, "echo", &[]),
        case("DELETE", Method::DELETE, "echo", &[]),
        case("POST without a body", Method::POST, "echo", &[]),
        case("PUT with Content-Length 0", Method::PUT, "echo", &[("content-length", "0")]),
        Case { fields: many, ..case("90 request fields", Method::GET, "echo", &[]) },
        case("a 12 KiB field value", Method::GET, "echo", &[("x-big", &big)]),
        case(
            "repeated Accept and X-Forwarded-For",
            Method::GET,
            "echo",
            &[
                ("accept", "text/html"),
                ("x-forwarded-for", "10.1.1.1"),
                ("accept", "*/*"),
                ("x-forwarded-for", "10.2.2.2"),
            ],
        ),
        case("TE: trailers", Method::GET, "echo", &[("te", "trailers")]),
        case("204", Method::GET, "204", &[]),
        case("304", Method::GET, "304", &[("if-none-match", "\"v1\"")]),
        case("chunked answer with trailers", Method::GET, "chunked", &[]),
        case("HEAD of a chunked answer", Method::HEAD, "chunked", &[]),
        case("close-delimited answer", Method::GET, "unsized", &[]),
        case("HTTP/1.0 answer", Method::GET, "http10", &[]),
        case("1 MiB answer", Method::GET, "big", &[]),
        case("custom reason phrase", Method::GET, "reason", &[]),
        case("backend Connection: close", Method::GET, "close", &[]),
        case("the request after a backend's close", Method::GET, "echo", &[]),
        case("hop-by-hop answer fields", Method::GET, "hop", &[]),
        case("90 answer fields, repeated Set-Cookie and Vary", Method::GET, "many90", &[]),
        case("125 answer fields", Method::GET, "many120", &[]),
        case("an answer cut short", Method::GET, "truncated", &[]),
        Case { body: Some(b"hello"), ..case("POST with a body (hyper on both)", Method::POST, "echo", &[]) },
    ]
}

/// What a client got for one request.
fn render_answer(
    status: StatusCode,
    fields: &http::HeaderMap,
    trailers: Option<http::HeaderMap>,
    body: Bytes,
) -> Vec<String> {
    let mut out = vec![format!("status {status}")];
    for (n, v) in fields {
        let v = if n == "date" { "<any date>".to_owned() } else { String::from_utf8_lossy(v.as_bytes()).into_owned() };
        out.push(format!("    {n}: {}", preview(&v)));
    }
    out.push(format!("    body {} bytes, fnv {:x}", body.len(), fnv(&body)));
    for (n, v) in trailers.iter().flatten() {
        out.push(format!("    trailer {n}: {}", String::from_utf8_lossy(v.as_bytes())));
    }
    out
}

/// What the backend read.
fn render_seen(seen: &[Seen]) -> Vec<String> {
    let mut out = Vec::new();
    for s in seen {
        out.push(format!("backend saw: {}", s.head.first));
        for (n, v) in &s.head.fields {
            out.push(format!("    {n}: {}", preview(v)));
        }
        out.push(format!(
            "    body {} bytes: {}",
            s.body.decoded.len(),
            preview(&String::from_utf8_lossy(&s.body.decoded))
        ));
        if let Some(e) = &s.broken {
            out.push(format!("    broken: {e}"));
        }
    }
    if seen.is_empty() {
        out.push("backend saw nothing".into());
    }
    out
}

fn preview(s: &str) -> String {
    if s.len() <= 60 {
        s.to_owned()
    } else {
        format!("{}… ({} bytes, fnv {:x})", &s[..40], s.len(), fnv(s.as_bytes()))
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &c| (h ^ c as u64).wrapping_mul(0x100000001b3))
}

/// Sends the case with `tag` over `sender` and renders what came back.
async fn send(sender: &mut SendRequest<Full<Bytes>>, case: &Case, tag: char) -> Vec<String> {
    let mut req = Request::builder().method(case.method.clone()).uri(format!("http://h.example/{tag}/{}", case.target));
    for (n, v) in &case.fields {
        req = req.header(n, v);
    }
    let req = req.body(Full::new(Bytes::from_static(case.body.unwrap_or_default()))).unwrap();
    if let Err(e) = sender.ready().await {
        return vec![format!("connection lost before the request: {e}")];
    }
    // A backend's answer that breaks off mid-body resets the stream: whether its head reached
    // the client first depends on when the proxy saw the backend's end (both ways send the
    // head, then the reset; h2 drops a reset stream's frames not yet written). So a reset
    // before the head and one after it are the same outcome here.
    const BROKE: &str = "the answer broke off (stream reset)";
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) if e.to_string().contains("http2 error") => return vec![BROKE.into()],
        Err(e) => return vec![format!("request failed: {e}")],
    };
    let (parts, body) = resp.into_parts();
    match body.collect().await {
        Ok(c) => render_answer(parts.status, &parts.headers, c.trailers().cloned(), c.to_bytes()),
        Err(_) => vec![BROKE.into()],
    }
}

/// The proxy's server stats.
async fn stats(proxy: &Proxy) -> serde_json::Value {
    let url = proxy.admin_url("/api/v1/stats/server");
    let (status, stats) = support::admin_call(Method::GET, &url, None, None, Duration::from_secs(5)).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    stats
}

/// HTTP/2 requests the proxy forwarded through the bridge so far.
async fn bridged(proxy: &Proxy) -> u64 {
    stats(proxy).await["requests_h2_bridged"].as_u64().expect("requests_h2_bridged counted")
}

fn config(backend: std::net::SocketAddr, fast: bool) -> String {
    one_route(&backend_yaml("recorder", backend, 100), "round_robin", &format!("  http1_fast_path: {fast}\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_and_hypers_client_answer_alike() {
    let rec = Recorder::start().await;
    let bridge = Proxy::start(&config(rec.addr, true)).await;
    let hyper = Proxy::start(&config(rec.addr, false)).await;
    let (mut a, mut b) = (h2c::<Full<Bytes>>(bridge.addr).await, h2c::<Full<Bytes>>(hyper.addr).await);
    let mut failed = Vec::new();
    for case in cases() {
        let before = bridged(&bridge).await;
        let both = async { tokio::join!(send(&mut a, &case, 'a'), send(&mut b, &case, 'b')) };
        let (mut ra, mut rb) = timeout(CASE, both).await.expect("case within its bound");
        ra.extend(render_seen(&rec.take(b'a').await));
        rb.extend(render_seen(&rec.take(b'b').await));
        let mut problems = Vec::new();
        let stray = rec.take(b'?').await;
        if !stray.is_empty() {
            problems.push(format!("the backend read {} untagged or unreadable requests", stray.len()));
        }
        if ra != rb {
            problems.push(side_by_side(case.name, "bridge", &ra, &rb));
        }
        let took = bridged(&bridge).await - before;
        let want = u64::from(case.body.is_none());
        if took != want {
            problems.push(format!("the bridge took {took} requests of this case, expected {want}"));
        }
        if std::env::var_os("H2_BRIDGE_SHOW").is_some() {
            println!("{}", side_by_side(case.name, "bridge", &ra, &rb));
        }
        println!("{:<48} {}", case.name, if problems.is_empty() { "same" } else { "DIFFERENT" });
        if !problems.is_empty() {
            failed.push((case.name, problems));
        }
    }
    assert_eq!(bridged(&hyper).await, 0, "the proxy without the fast path bridged requests");
    for (name, problems) in &failed {
        eprintln!("--- {name}\n{}", problems.join("\n"));
    }
    assert!(failed.is_empty(), "the two ways differ in: {:?}", failed.iter().map(|f| f.0).collect::<Vec<_>>());
    drop((a, b));
    bridge.stop().await;
    hyper.stop().await;
}

/// GETs through the bridge get the backend's body whole, and are counted: as bridged, and
/// their body bytes as sent, as through hyper's client (a body's last frame was once counted
/// after its end had released the counter, so not at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bodiless_h2_get_goes_through_the_bridge_and_is_counted() {
    let rec = Recorder::start().await;
    let proxy = Proxy::start(&config(rec.addr, true)).await;
    let mut sender = h2c::<Empty<Bytes>>(proxy.addr).await;
    for i in 0..3 {
        let req = Request::get(format!("http://h.example/a/sized?i={i}")).body(Empty::new()).unwrap();
        let resp = timeout(CASE, sender.send_request(req)).await.expect("answer in time").expect("answer");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("whole body").to_bytes();
        assert_eq!(body.as_ref(), letters(1234, 3).as_slice());
    }
    let stats = stats(&proxy).await;
    assert_eq!(stats["requests_h2_bridged"], 3);
    assert_eq!(stats["bytes"]["sent"], 3 * 1234, "{stats}");
    assert_eq!(rec.take(b'a').await.len(), 3);
    drop(sender);
    proxy.stop().await;
}
