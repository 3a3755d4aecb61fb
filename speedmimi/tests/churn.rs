//! Churn: backends are added, reweighted, switched off and on, removed and the config is
//! partially replaced, over and over, while keep-alive clients hammer the proxy and a WebSocket
//! on an untouched backend stays open. Not one client request may fail.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use support::{Origin, Proxy, admin_call, client};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);
const CLIENTS: usize = 4;
const PER_CLIENT: usize = 300;
const ITERATIONS: usize = 15;

/// One admin call; returns status and the JSON answer.
async fn call(method: Method, url: &str, body: Option<&str>) -> (StatusCode, Value) {
    admin_call(method, url, body, None, WAIT).await
}

/// An admin call that must answer `want`.
async fn expect(p: &Proxy, method: Method, path: &str, body: Option<&str>, want: StatusCode) -> Value {
    let (status, v) = call(method, &p.admin_url(path), body).await;
    assert_eq!(status, want, "{path} {body:?}: {v}");
    v
}

/// Upstream `default` (stable, o2, o3) behind `/`; upstream `ws` (stable only) behind `/ws`.
fn config(stable: &Origin, o2: &Origin, o3: &Origin, balancer: &str) -> String {
    format!(
        "server:\n  host: 127.0.0.1\n  port: 8080\nbackends:\n  default:\n{}{}{}  ws:\n{}\
         routing:\n  default:\n    path: /\n    upstream: default\n    load_balancer: {balancer}\n  \
         ws:\n    path: /ws\n    upstream: ws\n    load_balancer: round_robin\n    protocols:\n      \
         websocket: round_robin\n",
        stable.yaml(100),
        o2.yaml(100),
        o3.yaml(100),
        stable.yaml(100),
    )
}

/// What one load client saw.
#[derive(Default)]
struct Outcome {
    ok: usize,
    failures: Vec<String>,
}

async fn load(url: String, done: Arc<AtomicUsize>) -> Outcome {
    let c = client();
    let mut out = Outcome::default();
    for i in 0..PER_CLIENT {
        let req = Request::get(&url).body(Full::default()).unwrap();
        let result = match tokio::time::timeout(WAIT, c.request(req)).await {
            Err(_) => Err("timed out".to_owned()),
            Ok(Err(e)) => Err(format!("request failed: {e:?}")),
            Ok(Ok(resp)) => {
                let status = resp.status();
                match tokio::time::timeout(WAIT, resp.into_body().collect()).await {
                    Err(_) => Err(format!("{status}: body timed out")),
                    Ok(Err(e)) => Err(format!("{status}: body failed: {e:?}")),
                    Ok(Ok(b)) if status == StatusCode::OK => Ok(b.to_bytes()),
                    Ok(Ok(b)) => Err(format!("{status}: {}", String::from_utf8_lossy(&b.to_bytes()))),
                }
            }
        };
        match result {
            Ok(_) => out.ok += 1,
            Err(e) => out.failures.push(format!("request {i}: {e}")),
        }
        done.fetch_add(1, Ordering::SeqCst);
    }
    out
}

/// Sends `text` on the WebSocket and expects it back.
async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(WAIT, ws.send(Message::text(text))).await.expect("ws send timed out").expect("ws send");
    let got = tokio::time::timeout(WAIT, ws.next()).await.expect("ws echo timed out");
    match got {
        Some(Ok(m)) => assert_eq!(m, Message::text(text), "the WebSocket echoed something else"),
        other => panic!("the WebSocket ended while sending {text:?}: {other:?}"),
    }
}

async fn churn(balancer: &str, other: &str) {
    let (stable, o2, o3) = (Origin::start("stable").await, Origin::start("o2").await, Origin::start("o3").await);
    let extra = Origin::start("d").await;
    let p = Proxy::start(&config(&stable, &o2, &o3, balancer)).await;
    let (_, initial) = call(Method::GET, &p.admin_url("/api/v1/config"), None).await;
    assert_eq!(initial["routing"]["default"]["load_balancer"], balancer, "{initial}");

    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut ws, resp) =
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async(format!("ws://{}/ws", p.addr), tcp))
            .await
            .expect("WebSocket handshake timed out")
            .expect("WebSocket handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    echo(&mut ws, "before the churn").await;

    let done = Arc::new(AtomicUsize::new(0));
    let total = CLIENTS * PER_CLIENT;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        tasks.spawn(load(p.url("/"), done.clone()));
    }

    let add = format!(
        r#"{{"upstream":"default","backend":{{"id":"d","host":"127.0.0.1","port":{},"weight":100}}}}"#,
        extra.addr.port()
    );
    let update = |body: &str| format!(r#"{{"upstream":"default","backend":{body}}}"#);
    let balance = |b: &str| format!(r#"{{"config":{{"routing":{{"default":{{"load_balancer":"{b}"}}}}}}}}"#);
    for i in 0..ITERATIONS {
        // Keep the churn spread over the load: iteration i starts once i/(N+1) of it is done.
        let due = i * total / (ITERATIONS + 1);
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            while done.load(Ordering::SeqCst) < due {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "load stalled at {} of {total} requests", done.load(Ordering::SeqCst));

        let v = expect(&p, Method::POST, "/api/v1/backends/add", Some(&add), StatusCode::CREATED).await;
        assert_eq!(v["id"], "d", "{v}");
        let weight = 10 + i * 20;
        let v = expect(
            &p,
            Method::PUT,
            "/api/v1/backends/update",
            Some(&update(&format!(r#"{{"id":"o2","weight":{weight}}}"#))),
            StatusCode::OK,
        )
        .await;
        assert_eq!(v["weight"], weight, "{v}");
        expect(&p, Method::PUT, "/api/v1/backends/update", Some(&update(r#"{"id":"d","weight":300}"#)), StatusCode::OK)
            .await;
        let v = expect(
            &p,
            Method::PUT,
            "/api/v1/backends/update",
            Some(&update(r#"{"id":"o3","active":false}"#)),
            StatusCode::OK,
        )
        .await;
        assert_eq!(v["active"], false, "{v}");
        expect(&p, Method::PUT, "/api/v1/config", Some(&balance(other)), StatusCode::OK).await;
        let v = expect(
            &p,
            Method::PUT,
            "/api/v1/backends/update",
            Some(&update(r#"{"id":"o3","active":true}"#)),
            StatusCode::OK,
        )
        .await;
        assert_eq!(v["active"], true, "{v}");
        expect(&p, Method::DELETE, "/api/v1/backends/remove?upstream=default&backend_id=d", None, StatusCode::OK).await;
        expect(
            &p,
            Method::PUT,
            "/api/v1/backends/update",
            Some(&update(r#"{"id":"o2","weight":100}"#)),
            StatusCode::OK,
        )
        .await;
        expect(&p, Method::PUT, "/api/v1/config", Some(&balance(balancer)), StatusCode::OK).await;

        echo(&mut ws, &format!("after iteration {i}")).await;
    }

    let mut ok = 0;
    let mut failures = Vec::new();
    let joined = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(r) = tasks.join_next().await {
            let out = r.expect("load task panicked");
            ok += out.ok;
            failures.extend(out.failures);
        }
    })
    .await;
    assert!(joined.is_ok(), "the load did not finish");
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed under churn; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert_eq!(ok, total);

    // The WebSocket lived through all of it.
    echo(&mut ws, "after the churn").await;
    tokio::time::timeout(WAIT, ws.close(None)).await.expect("ws close timed out").expect("ws close");

    let (status, s) = call(Method::GET, &p.admin_url("/api/v1/stats/server"), None).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["status"]["5xx"], 0, "{s}");
    assert_eq!(s["status"]["4xx"], 0, "{s}");
    assert_eq!(s["status"]["2xx"], total, "{s}");
    assert!(stable.requests() > 0, "the stable backend got no load");

    // Every change was undone: the running config is the one it started with.
    let (_, after) = call(Method::GET, &p.admin_url("/api/v1/config"), None).await;
    assert_eq!(after, initial);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_serves_every_request_through_churn() {
    churn("round_robin", "least_connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_serves_every_request_through_churn() {
    churn("least_connections", "round_robin").await;
}
