//! A spliced flow that turns out to be a bulk stream moves to userspace copy mid-flow without
//! losing, duplicating or reordering a byte, in both directions. The bulk threshold is set low
//! so any fast flow qualifies. Root only; under CI=true a missing root is a failure.

mod support;

use std::{sync::Arc, time::Duration};

use speedmimi::{datapath::kernel::Kernel, proxy::splice::BULK_SWITCHES};
use support::{Proxy, backend_yaml, one_route, root_or_skip};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const TOTAL: u64 = 256 << 20;

fn byte_at(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Answers the upgrade, then echoes every byte.
async fn echo_backend(listener: TcpListener) {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let (mut r, mut w) = s.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_moves_to_copy_without_losing_a_byte() {
    if !root_or_skip("a_bulk_stream_moves_to_copy_without_losing_a_byte") {
        return;
    }
    let dp = Arc::new(Kernel::load().expect("eBPF loads"));
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let yaml = one_route(&backend_yaml("bulk", backend.local_addr().unwrap(), 1), "round_robin", "")
        + "ebpf:\n  splice_bulk_rate: 1MiB\n";
    let proxy = Proxy::start_with(&yaml, dp.clone()).await;
    tokio::spawn(echo_backend(backend));
    let switched_before = BULK_SWITCHES.load(std::sync::atomic::Ordering::SeqCst);

    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let (mut rd, mut wr) = c.into_split();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        let mut pos = 0u64;
        while pos < TOTAL {
            for (i, x) in buf.iter_mut().enumerate() {
                *x = byte_at(pos + i as u64);
            }
            wr.write_all(&buf).await.unwrap();
            pos += buf.len() as u64;
        }
        wr.shutdown().await.unwrap();
    });
    let checked = tokio::time::timeout(Duration::from_secs(120), async {
        let mut buf = vec![0u8; 1 << 16];
        let mut pos = 0u64;
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                return pos;
            }
            for &x in &buf[..n] {
                assert_eq!(x, byte_at(pos), "byte {pos} of the echo");
                pos += 1;
            }
        }
    })
    .await
    .expect("echo did not finish");
    writer.await.unwrap();
    assert_eq!(checked, TOTAL, "every byte came back, once");
    assert!(BULK_SWITCHES.load(std::sync::atomic::Ordering::SeqCst) > switched_before, "the flow never moved to copy");
    for _ in 0..100 {
        if speedmimi::datapath::Datapath::spliced_sockets(&*dp) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(speedmimi::datapath::Datapath::spliced_sockets(&*dp), 0, "SOCKHASH empty after the flow");
}
