//! The kernel datapath for real, as root: the embedded sk_skb program loads, attaches to the
//! SOCKHASH and moves bytes between real TCP sockets; the daemon starts with `ebpf.enabled: true`.
//! Without root these tests skip with a reason, except under CI=true, where they fail.

mod support;

use std::{os::fd::AsFd, sync::Arc, time::Duration};

use speedmimi::{
    config::Config,
    datapath::{self, Datapath, Limits, kernel::Kernel},
};
use support::{Origin, Proxy, client, one_route, root_or_skip, who};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A connected pair: (the end a client holds, the end a proxy would hold).
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, _) = l.accept().await.unwrap();
    (client, server)
}

async fn read_exact_within(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("spliced bytes did not arrive within 5 s")
        .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_program_moves_bytes_between_real_sockets() {
    if !root_or_skip("splice_program_moves_bytes_between_real_sockets") {
        return;
    }
    let kernel = Kernel::load(&Default::default(), &[])
        .expect("the embedded eBPF object loads and attaches (run `cargo xtask build-ebpf`)");
    assert!(kernel.can_splice());

    // Two flows: client A <-> proxy end A, client B <-> proxy end B. Splicing the proxy ends
    // joins client A to client B through the kernel.
    let (mut client_a, proxy_a) = tcp_pair().await;
    let (mut client_b, proxy_b) = tcp_pair().await;

    // Bytes that arrived before the sockets entered the map are released too.
    client_a.write_all(b"early").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let pair = kernel
        .splice(proxy_a.as_fd(), proxy_b.as_fd(), Limits { to_backend: u64::MAX, to_client: u64::MAX }, 7)
        .expect("insert into SOCKHASH");
    assert_eq!(kernel.spliced_sockets(), 2);

    client_a.write_all(b"-and-late").await.unwrap();
    assert_eq!(read_exact_within(&mut client_b, 14).await, b"early-and-late");

    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let writer = {
        let big = big.clone();
        tokio::spawn(async move {
            client_b.write_all(&big).await.unwrap();
            client_b
        })
    };
    assert_eq!(read_exact_within(&mut client_a, big.len()).await, big);
    let _client_b = writer.await.unwrap();

    // The verdict program counted what it moved, per socket.
    assert_eq!(kernel.peer(pair.b).map(|p| p.redirected_bytes), Some(big.len() as u64));
    assert!(kernel.peer(pair.a).unwrap().redirected_bytes >= 9, "late bytes counted");
    // ...and per backend, per direction, summed over CPUs.
    let c = kernel.counters(7).expect("counters for the flow's backend slot");
    assert_eq!(c.bytes_to_client, big.len() as u64);
    assert_eq!(c.bytes_to_backend, kernel.peer(pair.a).unwrap().redirected_bytes);
    assert_eq!(kernel.counters(8), None, "no other backend moved bytes");

    kernel.unsplice(pair).unwrap();
    assert_eq!(kernel.spliced_sockets(), 0, "SOCKHASH empty after unsplice");
    assert_eq!(kernel.peer(pair.a).map(|p| p.redirected_bytes), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_starts_with_ebpf_required_and_serves() {
    if !root_or_skip("daemon_starts_with_ebpf_required_and_serves") {
        return;
    }
    let o = Origin::start("b1").await;
    let yaml = format!("{}ebpf:\n  enabled: true\n", one_route(&o.yaml(1), "round_robin", ""));
    let dp: Arc<dyn Datapath> =
        datapath::start(&Config::parse(&yaml).unwrap()).expect("ebpf.enabled: true starts as root");
    assert!(dp.can_splice());
    let proxy = Proxy::start_with(&yaml, dp).await;
    assert_eq!(who(&client(), &proxy.url("/"), &[]).await, "b1");
}
