//! Active health checks end to end: a failing backend leaves the rotation within a few
//! intervals and comes back once healthy; tcp and grpc checks judge what they probe.

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering::SeqCst},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::{body::Frame, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use speedmimi::{
    backend::{Backend, HealthSnapshot},
    config::Config,
    datapath::Userspace,
    health,
    shutdown::{self, Trigger},
    state::State,
};
use support::{Origin, Proxy, backend_yaml, client, one_route, who};
use tokio::net::TcpListener;

/// Polls `check` every 50ms until it holds; fails after a generous deadline (never a timing
/// assertion: the deadline only keeps a broken build from hanging).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `health_check:` block for a backend entry.
fn check_yaml(kind: &str, failures: u32, successes: u32) -> String {
    format!(
        "      health_check:\n        path: /health\n        interval: 100ms\n        timeout: 1s\n        failures: {failures}\n        successes: {successes}\n        type: {kind}\n"
    )
}

#[tokio::test]
async fn failing_http_check_takes_a_backend_out_and_back() {
    let (b1, b2) = (Origin::start("b1").await, Origin::start("b2").await);
    let check = check_yaml("http", 2, 2);
    let backends = format!("{}{check}{}{check}", b1.yaml(100), b2.yaml(100));
    let proxy = Proxy::start(&one_route(&backends, "round_robin", "")).await;
    let c = client();
    let url = proxy.url("/");

    // Healthy: the probes reach /health and both backends serve.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(who(&c, &url, &[]).await);
    }
    assert!(seen.contains(&"b1".to_owned()) && seen.contains(&"b2".to_owned()), "{seen:?}");

    b1.backend.healthy.store(false, SeqCst);
    eventually("b1 is out of the rotation", async || {
        for _ in 0..4 {
            if who(&c, &url, &[]).await == "b1" {
                return false;
            }
        }
        true
    })
    .await;
    for i in 0..30 {
        assert_eq!(who(&c, &url, &[]).await, "b2", "request {i} went to the unhealthy backend");
    }

    b1.backend.healthy.store(true, SeqCst);
    eventually("b1 is back in the rotation", async || {
        for _ in 0..4 {
            if who(&c, &url, &[]).await == "b1" {
                return true;
            }
        }
        false
    })
    .await;
    proxy.stop().await;
}

/// A running state with the health supervisor, for checks of backends that are not HTTP.
struct Checked {
    state: Arc<State>,
    _stop: Trigger,
}

impl Checked {
    fn start(backends_yaml: &str) -> Checked {
        let yaml = one_route(backends_yaml, "round_robin", "");
        let config = Config::parse(&yaml).unwrap_or_else(|e| panic!("test config rejected: {e}\n{yaml}"));
        let state = Arc::new(State::new(config, Arc::new(Userspace)).expect("state"));
        let (stop, wait) = shutdown::channel();
        health::spawn(state.clone(), wait);
        Checked { state, _stop: stop }
    }

    fn backend(&self, id: &str) -> Arc<Backend> {
        self.state.backend("default", id).expect("backend")
    }

    fn health(&self, id: &str) -> HealthSnapshot {
        self.backend(id).health_snapshot()
    }
}

#[tokio::test]
async fn tcp_check_takes_out_a_backend_that_stops_listening() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let checked = Checked::start(&format!("{}{}", backend_yaml("t1", addr, 100), check_yaml("tcp", 2, 2)));

    eventually("a few probes passed", async || checked.health("t1").checks >= 3).await;
    let h = checked.health("t1");
    assert!(h.up && h.consecutive_failures == 0 && h.last_error.is_none(), "{h:?}");
    assert!(checked.backend("t1").accepts());

    drop(listener);
    eventually("t1 is down", async || !checked.health("t1").up).await;
    let h = checked.health("t1");
    assert!(h.consecutive_failures >= 2 && h.last_error.is_some(), "{h:?}");
    assert!(!checked.backend("t1").accepts(), "a down backend is not eligible");

    // Listening again: back after two good probes.
    let _listener = TcpListener::bind(addr).await.expect("rebind the same port");
    eventually("t1 is up again", async || checked.health("t1").up).await;
    let h = checked.health("t1");
    assert!(h.consecutive_successes >= 2, "{h:?}");
}

/// A grpc.health.v1 server over h2c answering with `status` (1 = SERVING, 2 = NOT_SERVING);
/// anything but a proper empty Check request counts in `bad` and gets UNIMPLEMENTED.
async fn grpc_health_server(status: Arc<AtomicU32>, bad: Arc<AtomicU32>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (status, bad) = (status.clone(), bad.clone());
            let service = service_fn(move |req: Request<Incoming>| {
                let (status, bad) = (status.clone(), bad.clone());
                async move { Ok::<_, Infallible>(answer_check(req, &status, &bad).await) }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

type GrpcBody = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

async fn answer_check(req: Request<Incoming>, status: &AtomicU32, bad: &AtomicU32) -> Response<GrpcBody> {
    let proper = req.uri().path() == "/grpc.health.v1.Health/Check"
        && req.headers().get("content-type").is_some_and(|v| v == "application/grpc");
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let mut trailers = HeaderMap::new();
    let mut frames = Vec::new();
    if proper && body.as_ref() == [0, 0, 0, 0, 0] {
        // HealthCheckResponse { status (field 1, varint) }
        let status = status.load(SeqCst) as u8;
        frames.push(Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
    } else {
        bad.fetch_add(1, SeqCst);
        trailers.insert("grpc-status", HeaderValue::from_static("12"));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
    resp.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
    resp
}

#[tokio::test]
async fn grpc_check_follows_the_serving_status() {
    let (status, bad) = (Arc::new(AtomicU32::new(1)), Arc::new(AtomicU32::new(0)));
    let addr = grpc_health_server(status.clone(), bad.clone()).await;
    let checked = Checked::start(&format!("{}{}", backend_yaml("g1", addr, 100), check_yaml("grpc", 2, 2)));

    eventually("a few probes passed", async || checked.health("g1").checks >= 3).await;
    let h = checked.health("g1");
    assert!(h.up && h.consecutive_failures == 0 && h.last_error.is_none(), "{h:?}");

    status.store(2, SeqCst);
    eventually("g1 is down", async || !checked.health("g1").up).await;
    let h = checked.health("g1");
    assert!(h.last_error.as_deref().is_some_and(|e| e.contains("NOT_SERVING")), "{h:?}");

    status.store(1, SeqCst);
    eventually("g1 is up again", async || checked.health("g1").up).await;
    assert_eq!(bad.load(SeqCst), 0, "every probe was a proper empty Check request");
}

#[tokio::test]
async fn a_backend_without_a_check_stays_up_and_unprobed() {
    let b1 = Origin::start("b1").await;
    let checked = Checked::start(&b1.yaml(100));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = checked.health("b1");
    assert!(h.up && h.kind.is_none() && h.checks == 0, "{h:?}");
    assert_eq!(b1.requests(), 0, "no probe reached the origin");
}
