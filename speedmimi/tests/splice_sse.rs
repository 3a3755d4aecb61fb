//! Server-sent events through the proxy in both modes (spliced in the kernel, copied in
//! userspace): 10,000 events arrive byte-exact and in order, and in splice mode the stream really
//! was spliced; a connect failure moves the stream to another backend, still spliced. Root only;
//! under CI=true a missing root is a failure.

mod support;

use std::{sync::Arc, time::Duration};

use speedmimi::datapath::{Datapath, Userspace, kernel::Kernel};
use support::{Origin, Proxy, one_route, root_or_skip};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Decodes a chunked body (the demo origin streams SSE chunked).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n", "chunk terminator");
        raw = &raw[size + 2..];
    }
}

/// Asks for `/events?{query}` as SSE on a connection of its own and reads the answer up to the
/// end of the chunked body or the close; None if that takes longer than `bound`.
async fn sse_stream(proxy: &Proxy, query: &str, bound: Duration) -> Option<Vec<u8>> {
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!("GET /events?{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 65536];
    // Copy mode keeps the connection alive after the stream: stop at its end.
    let read = async {
        while !raw.ends_with(b"\r\n0\r\n\r\n") {
            let n = c.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(bound, read).await.ok()?;
    Some(raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_of_10000_events_is_exact_in_both_modes() {
    if !root_or_skip("sse_stream_of_10000_events_is_exact_in_both_modes") {
        return;
    }
    let modes: [(&str, Arc<dyn Datapath>); 2] = [
        ("splice", Arc::new(Kernel::load(&Default::default(), &[]).expect("eBPF loads"))),
        ("copy", Arc::new(Userspace)),
    ];
    for (mode, dp) in modes {
        let o = Origin::start("b1").await;
        let proxy = Proxy::start_with(&one_route(&o.yaml(1), "round_robin", ""), dp.clone()).await;
        let raw = sse_stream(&proxy, "count=10000&interval_ms=0", Duration::from_secs(60)).await;
        let raw = raw.unwrap_or_else(|| panic!("{mode}: stream did not end"));
        let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{mode}: {head}");
        assert!(head.contains("content-type: text/event-stream"), "{mode}: {head}");
        eprintln!("{mode}: {} bytes", raw.len());
        std::fs::write(format!("/tmp/sse_{mode}.bin"), &raw).unwrap();
        let body = dechunk(&raw[head_end..]);
        let expected: String = (0..10_000).map(|i| format!("id: {i}\nevent: tick\ndata: b1 {i}\n\n")).collect();
        assert_eq!(body.len(), expected.len(), "{mode}: body length");
        assert!(body == expected.as_bytes(), "{mode}: events differ");

        // The flow is counted when it has ended (the backend closes after the stream).
        let want = u64::from(mode == "splice");
        let mut stats = serde_json::Value::Null;
        for _ in 0..100 {
            let c = support::client();
            let (_, _, text) = support::get(&c, &proxy.admin_url("/api/v1/stats/server"), &[]).await;
            stats = serde_json::from_str(&text).unwrap();
            if stats["spliced_flows"]["total"] == want && stats["spliced_flows"]["open"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if mode == "splice" {
            assert_eq!(
                stats["spliced_flows"]["total"], 1,
                "{mode}: the stream was not spliced (or did not end): {stats}"
            );
            for _ in 0..100 {
                if dp.spliced_sockets() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(dp.spliced_sockets(), 0, "SOCKHASH empty after the stream");
        } else {
            assert_eq!(stats["spliced_flows"]["total"], 0, "{stats}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_goes_spliced_to_another_backend_after_a_connect_failure() {
    if !root_or_skip("sse_goes_spliced_to_another_backend_after_a_connect_failure") {
        return;
    }
    let dp: Arc<dyn Datapath> = Arc::new(Kernel::load(&Default::default(), &[]).expect("eBPF loads"));
    let live = Origin::start("live").await;
    // Round robin tries the first backend first: nothing listens there.
    let upstream = support::backend_yaml("dead", support::dead_addr().await, 1) + &live.yaml(1);
    let proxy = Proxy::start_with(&one_route(&upstream, "round_robin", ""), dp.clone()).await;
    let raw = sse_stream(&proxy, "count=20&interval_ms=50", Duration::from_secs(20)).await.expect("stream ends");
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("data: live 19\n"), "{text}");

    // The raw path went on to `live` (taken over: an upgraded flow, and one that lasts is
    // spliced), where it used to fall back to the ordinary path; it is counted for `live`.
    let client = support::client();
    let mut stats = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, _, text) = support::get(&client, &proxy.admin_url("/api/v1/stats/server"), &[]).await;
        stats = serde_json::from_str(&text).unwrap();
        if stats["spliced_flows"]["total"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats["upgraded_flows"]["total"], 1, "the stream was not taken over: {stats}");
    assert_eq!(stats["spliced_flows"]["total"], 1, "the stream was not spliced: {stats}");
    for (id, requests) in [("dead", 0), ("live", 1)] {
        let url = proxy.admin_url(&format!("/api/v1/stats/backend?upstream=default&backend_id={id}"));
        let (_, _, text) = support::get(&client, &url, &[]).await;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["requests"]["total"], requests, "{id}: {v}");
    }
}
