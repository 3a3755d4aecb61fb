//! A receiver that stops reading must not make a spliced flow grow kernel memory without
//! bound (KERNEL-NOTES measured 6.4 GB in 8 s without flow control). The sender pushes as fast
//! as it can for 5 s while the backend reads nothing; kernel memory (MemAvailable and Slab)
//! may grow by the flow's budget plus ordinary TCP buffering only; then the backend reads
//! again and every byte arrives, in order. Alone in its own test binary so nothing else moves
//! memory meanwhile. Root only; under CI=true a missing root is a failure.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use speedmimi::datapath::{Datapath, Userspace, kernel::Kernel};
use support::{
    Proxy, backend_yaml,
    flows::{byte_at, read_head},
    one_route, root_or_skip,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const BUDGET: u64 = 4 << 20;
/// Ordinary TCP buffering on the path: the sender's send queue, two receive queues and one
/// send queue, each bounded by the tcp_rmem/tcp_wmem maxima (4-6 MiB here).
const TCP_BUFFERS: u64 = 32 << 20;
/// MemAvailable moves with everything else on the machine too (page cache, other processes):
/// the memory check allows this much noise. Without flow control the flow alone takes
/// hundreds of MiB in the same 5 s (measured: 467 MiB accepted, 450 MiB grown).
const NOISE: u64 = 128 << 20;
const STALL: Duration = Duration::from_secs(5);

/// Kernel memory in use as /proc/meminfo sees it: (MemTotal - MemAvailable) and Slab, bytes.
fn kernel_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("MemTotal:") - field("MemAvailable:"), field("Slab:"))
}

/// A backend that answers the upgrade, then reads nothing until `go` is set, then reads
/// everything, checking each byte; returns the count of correct bytes (stops at the first wrong one).
async fn stalled_backend(listener: TcpListener, go: Arc<AtomicBool>) -> Result<u64, String> {
    let (mut s, _) = listener.accept().await.unwrap();
    read_head(&mut s).await.unwrap();
    s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    while !go.load(SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(pos);
        }
        for &x in &buf[..n] {
            if x != byte_at(pos) {
                return Err(format!("byte {pos} is {x}, expected {}", byte_at(pos)));
            }
            pos += 1;
        }
    }
}

async fn run(mode: &str, dp: Arc<dyn Datapath>) {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let yaml = one_route(&backend_yaml("stall", backend.local_addr().unwrap(), 1), "round_robin", "")
        + &format!("ebpf:\n  splice_budget: {BUDGET}\n");
    let proxy = Proxy::start_with(&yaml, dp.clone()).await;
    let go = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(stalled_backend(backend, go.clone()));

    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await.unwrap();
    let head = read_head(&mut c).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 101"), "{mode}: {}", String::from_utf8_lossy(&head));

    let (base_used, base_slab) = kernel_memory();
    let sent = Arc::new(AtomicU64::new(0));
    let (mut rd, mut wr) = c.into_split();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            let mut pos = 0u64;
            let end = Instant::now() + STALL;
            // Push as fast as the path accepts, for the stall period only. `write` is cancel
            // safe: a timed-out call wrote nothing, so `pos` is exactly what was accepted.
            while Instant::now() < end {
                for (i, x) in buf.iter_mut().enumerate() {
                    *x = byte_at(pos + i as u64);
                }
                match tokio::time::timeout(Duration::from_millis(100), wr.write(&buf)).await {
                    Ok(Ok(n)) => {
                        pos += n as u64;
                        sent.store(pos, SeqCst);
                    }
                    Ok(Err(e)) => panic!("write failed: {e}"),
                    // Blocked: TCP's window is closed, as it should be.
                    Err(_) => {}
                }
            }
            wr
        })
    };
    let mut peak_used = 0u64;
    let mut peak_slab = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < STALL + Duration::from_millis(500) {
        let (u, s) = kernel_memory();
        peak_used = peak_used.max(u.saturating_sub(base_used));
        peak_slab = peak_slab.max(s.saturating_sub(base_slab));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wr = writer.await.unwrap();
    let total = sent.load(SeqCst);
    eprintln!(
        "{mode}: sent {} MiB into a stalled receiver; kernel memory grew at most {} MiB (slab {} MiB)",
        total >> 20,
        peak_used >> 20,
        peak_slab >> 20
    );
    // What the stalled path accepted is what kernel queues hold: the budget plus TCP's own buffers.
    assert!(total <= BUDGET + TCP_BUFFERS, "{mode}: {} MiB accepted by a stalled path", total >> 20);
    assert!(peak_used <= BUDGET + TCP_BUFFERS + NOISE, "{mode}: kernel memory grew by {} MiB", peak_used >> 20);
    assert!(peak_slab <= BUDGET + TCP_BUFFERS + NOISE, "{mode}: slab grew by {} MiB", peak_slab >> 20);

    // The receiver resumes: every byte arrives, in order.
    go.store(true, SeqCst);
    drop(wr);
    let got = tokio::time::timeout(Duration::from_secs(60), reader).await.expect("backend never finished").unwrap();
    assert_eq!(got, Ok(total), "{mode}: bytes lost or reordered");
    drop(rd.read(&mut [0u8; 16]).await);
    if mode == "splice" {
        for _ in 0..100 {
            if dp.spliced_sockets() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(dp.spliced_sockets(), 0, "SOCKHASH empty after the flow ended");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_receiver_bounds_kernel_memory() {
    if !root_or_skip("a_stalled_receiver_bounds_kernel_memory") {
        return;
    }
    run("splice", Arc::new(Kernel::load(&Default::default(), &[]).expect("eBPF loads"))).await;
    run("copy", Arc::new(Userspace)).await;
}
