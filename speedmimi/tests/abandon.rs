//! A client that leaves in the middle of a response (an HTTP/2 stream reset, an HTTP/1.1 connection closed)
//! must not keep the backend's connection or its in-flight slot: the proxy drops the upstream connection and
//! the backend's `in_flight` falls back to 0, while the backend stalls mid-body.

mod support;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use support::{Proxy, admin_call, backend_yaml, h2c, one_route};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::timeout,
};

/// Bound on the proxy letting go after the client left.
const RELEASE: Duration = Duration::from_secs(5);

/// A backend that answers every request with the head of a 1 MB response and its first 1,000 bytes, then sends
/// nothing more; each connection reports on `closed` when the proxy closes it.
async fn stalling_backend() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if support::read_request_head(&mut s).await.is_none() {
                    return;
                }
                let mut buf = [0u8; 4096];
                let answer = [b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n".as_slice(), &[b'x'; 1000]].concat();
                if s.write_all(&answer).await.is_err() {
                    return;
                }
                // Until the proxy closes (or resets) the connection.
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = tx.send(());
            });
        }
    });
    (addr, rx)
}

/// The backend's `in_flight` as the admin API shows it.
async fn in_flight(proxy: &Proxy) -> u64 {
    let url = proxy.admin_url("/api/v1/backends?upstream=default");
    let (status, v) = admin_call(Method::GET, &url, None, None, RELEASE).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["upstreams"]["default"][0]["in_flight"].as_u64().expect("in_flight")
}

/// Waits until the proxy has closed one upstream connection and the backend has nothing in flight.
async fn released(proxy: &Proxy, closed: &mut mpsc::UnboundedReceiver<()>, how: &str) {
    timeout(RELEASE, closed.recv())
        .await
        .unwrap_or_else(|_| panic!("{how}: the proxy kept the backend's connection {RELEASE:?} after the client left"));
    let deadline = tokio::time::Instant::now() + RELEASE;
    while in_flight(proxy).await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "{how}: the backend's in-flight slot was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config(backend: SocketAddr, fast: bool) -> String {
    one_route(&backend_yaml("stall", backend, 100), "round_robin", &format!("  http1_fast_path: {fast}\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_reset_mid_response_releases_the_backend_connection_and_slot() {
    for fast in [true, false] {
        let (backend, mut closed) = stalling_backend().await;
        let proxy = Proxy::start(&config(backend, fast)).await;
        let path = if fast { "h2 bridge" } else { "hyper's client" };
        let mut sender = h2c::<Empty<Bytes>>(proxy.addr).await;
        for round in ["first stream", "second stream on the same connection"] {
            // The head and a first body frame arrive, then the client resets the stream (drops the body).
            let resp = sender.send_request(Request::get("/h2").body(Empty::new()).unwrap()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}, {round}");
            let mut body = resp.into_body();
            let first = timeout(RELEASE, body.frame()).await.expect("a first body frame").expect("a frame").unwrap();
            assert!(first.data_ref().is_some_and(|d| !d.is_empty()), "{path}, {round}: a data frame first");
            assert_eq!(in_flight(&proxy).await, 1, "{path}, {round}: the response in progress counts");
            drop(body);
            released(&proxy, &mut closed, &format!("{path}, {round} reset")).await;
        }
    }
}

/// Through hyper's server. The own HTTP/1 engine does not pass this yet: it notices that the client left only
/// when it writes to it, so a backend that stalls mid-body keeps the connection and the slot (found with this
/// test; see the closing note of 2026-12-07).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_closing_mid_response_releases_the_backend_connection_and_slot_through_hyper() {
    let (backend, mut closed) = stalling_backend().await;
    let proxy = Proxy::start(&config(backend, false)).await;
    // The head and some body arrive, then the client closes its connection.
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET /h1 HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 1000 {
        let n = timeout(RELEASE, c.read(&mut buf)).await.expect("the answer's start").unwrap();
        assert!(n > 0, "the proxy closed before any body: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..64]));
    assert_eq!(in_flight(&proxy).await, 1, "the response in progress counts");
    drop(c);
    released(&proxy, &mut closed, "HTTP/1.1 client closed").await;
}
