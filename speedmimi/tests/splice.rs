//! Kernel splicing of upgraded flows, as root, in both modes (spliced and copied): what a
//! client and a backend see must be identical. Without root these tests skip with a reason,
//! except under CI=true, where they fail.

mod support;

use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use speedmimi::datapath::{Datapath, Userspace, kernel::Kernel};
use support::{Origin, Proxy, one_route};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn root_or_skip(test: &str) -> bool {
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

/// The two modes: the kernel datapath (splicing) and userspace copy.
fn modes() -> Vec<(&'static str, Arc<dyn Datapath>)> {
    vec![("splice", Arc::new(Kernel::load().expect("eBPF loads"))), ("copy", Arc::new(Userspace))]
}

/// Deterministic content.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_is_byte_exact_in_both_modes() {
    if !root_or_skip("websocket_echo_is_byte_exact_in_both_modes") {
        return;
    }
    for (mode, dp) in modes() {
        let o = Origin::start("b1").await;
        let proxy = Proxy::start_with(&one_route(&o.yaml(1), "round_robin", ""), dp.clone()).await;
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.addr), tcp).await.unwrap();
        let mut seed = 7u64;
        for i in 0..200 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = match i % 4 {
                0 => 1 + (seed >> 40) as usize % 100,
                1 => 1 + (seed >> 40) as usize % 10_000,
                2 => 1 + (seed >> 40) as usize % 200_000,
                _ => 1 + (seed >> 40) as usize % (1 << 20),
            };
            let data = payload(seed, len);
            ws.send(Message::binary(data.clone())).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("echo timed out");
            assert_eq!(got.unwrap().unwrap().into_data().as_ref(), &data[..], "{mode}: message {i} ({len} B)");
        }
        if mode == "splice" {
            assert_eq!(dp.spliced_sockets(), 2, "the flow is in the SOCKHASH while open");
        }
        ws.close(None).await.unwrap();
        drop(ws);
        for _ in 0..100 {
            if dp.spliced_sockets() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(dp.spliced_sockets(), 0, "{mode}: SOCKHASH empty after the flow ended");
    }
}
