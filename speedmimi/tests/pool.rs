//! Upstream connections as a backend sees them: idle pooled connections are closed after
//! `server.upstream_idle_timeout`, a backend never has more HTTP/1.1 connections from us than its
//! `max_conn` whatever the clients do, and a burst of gRPC streams shares one HTTP/2 connection
//! (issue 12, item 12).

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use support::{Origin, Proxy, h2c, one_route};

/// Every await on the network is bounded by this.
const GUARD: Duration = Duration::from_secs(20);

async fn guard<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// `n` concurrent GETs of `path` as streams of one h2 client connection; their statuses.
async fn h2_burst(proxy: &Proxy, path: &str, n: usize) -> Vec<StatusCode> {
    let sender = h2c::<Empty<Bytes>>(proxy.addr).await;
    let calls = (0..n).map(|_| {
        let mut s = sender.clone();
        let req = Request::get(proxy.url(path)).body(Empty::new()).unwrap();
        async move {
            let resp = s.send_request(req).await.expect("h2 request");
            let status = resp.status();
            resp.into_body().collect().await.expect("h2 body");
            status
        }
    });
    guard("h2 burst", futures_util::future::join_all(calls)).await
}

/// Waits until `f` holds, up to `within`; false if it never did.
async fn eventually(within: Duration, f: impl Fn() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let origin = Origin::start("idle").await;
    let proxy = Proxy::start(&one_route(&origin.yaml(1), "round_robin", "  upstream_idle_timeout: 400ms")).await;
    // Concurrent slow requests make several upstream connections at once; all then go idle.
    let statuses = h2_burst(&proxy, "/slow?ms=200", 12).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    let opened = origin.open_connections();
    assert!(opened >= 2, "the burst should have opened several upstream connections, {opened} are open");
    assert!(
        eventually(Duration::from_secs(3), || origin.open_connections() == 0).await,
        "{} of {opened} idle upstream connections still open 3 s after a 400 ms idle timeout",
        origin.open_connections()
    );
    // The pool recovers: the next request opens a fresh connection.
    assert_eq!(h2_burst(&proxy, "/", 1).await, [StatusCode::OK]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_within_the_timeout_are_reused() {
    let origin = Origin::start("reuse").await;
    let proxy =
        Proxy::start(&one_route(&origin.yaml(1), "round_robin", "  workers: 1\n  upstream_idle_timeout: 10s")).await;
    for _ in 0..5 {
        assert_eq!(h2_burst(&proxy, "/", 1).await, [StatusCode::OK]);
    }
    assert_eq!(origin.connections(), 1, "sequential requests should share one pooled connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_clients_open_no_more_upstream_connections_than_max_conn() {
    const MAX_CONN: u64 = 4;
    let origin = Origin::start("bounded").await;
    let backend = format!("{}      max_conn: {MAX_CONN}\n", origin.yaml(1));
    // Two workers: each kept its own idle connections, and opened new ones past max_conn while
    // the other worker's sat idle.
    let proxy = Proxy::start(&one_route(&backend, "round_robin", "  workers: 2\n  upstream_idle_timeout: 60s")).await;
    let mut served = 0;
    for _round in 0..3 {
        // Several client connections, so both workers serve some, each with many streams.
        let bursts = (0..8).map(|_| h2_burst(&proxy, "/slow?ms=30", 16));
        let statuses: Vec<StatusCode> = futures_util::future::join_all(bursts).await.into_iter().flatten().collect();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE),
            "only 200, or 503 past max_conn, expected: {statuses:?}"
        );
        served += statuses.iter().filter(|s| **s == StatusCode::OK).count();
    }
    assert!(served > 0, "nothing was served");
    assert!(
        origin.connections() <= MAX_CONN,
        "the backend accepted {} connections from the proxy; max_conn is {MAX_CONN}",
        origin.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_grpc_streams_shares_one_upstream_connection() {
    let origin = Origin::start("g").await;
    let proxy = Proxy::start(&one_route(
        &origin.yaml(1),
        "round_robin",
        "grpc:\n  enabled: true\n  host: 127.0.0.1\n  port: 9090",
    ))
    .await;
    let grpc = proxy.grpc.expect("grpc listener");
    let sender = h2c::<Full<Bytes>>(grpc).await;
    // An empty gRPC message: flag 0, length 0.
    let frame = Bytes::from_static(&[0, 0, 0, 0, 0]);
    let calls = (0..64).map(|_| {
        let mut s = sender.clone();
        let req = Request::post(format!("http://{grpc}/test.Echo/Say"))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(Full::new(frame.clone()))
            .unwrap();
        async move {
            let resp = s.send_request(req).await.expect("grpc call");
            let status = resp.status();
            resp.into_body().collect().await.expect("grpc body");
            status
        }
    });
    let statuses = guard("grpc burst", futures_util::future::join_all(calls)).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    assert_eq!(origin.requests(), 64);
    assert_eq!(
        origin.connections(),
        1,
        "64 concurrent gRPC streams made {} upstream connections",
        origin.connections()
    );
}
