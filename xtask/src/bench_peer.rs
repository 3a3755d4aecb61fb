//! The peers of `cargo xtask bench splice`, run as `cargo xtask bench-peer <role>` child processes
//! pinned to the load core: a backend that answers a WebSocket upgrade with 101 and then echoes or
//! discards raw bytes, and the clients (ping-pong latency, pushing streams, idle flows). After the
//! 101 no WebSocket framing is spoken: the bytes are opaque to every proxy. Peers talk to the
//! orchestrator in lines on stdin/stdout and exit when their stdin closes. `bench http`'s
//! fixed-rate load generator (`open-loop`) is one too: it prints one line and exits.

use std::{
    io::{self, BufRead, Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::open_loop;

/// The RFC 6455 example key and its accept value: every flow uses them.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// Bounds every blocking socket operation of a client.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes per write of a pushing flow.
const PUSH_CHUNK: usize = 128 << 10;

/// What the backend does with a flow after the 101; the client asks in the query (`/ws?mode=echo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Send every byte back (ping-pong).
    Echo,
    /// Count and discard (throughput); the count is served on the control port.
    Sink,
    /// Hold the flow with a small buffer, discarding whatever comes (memory per idle flow).
    Idle,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Sink => "sink",
            Mode::Idle => "idle",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Role {
    /// Serve upgrades on --port; on --control, answer every byte received with the total bytes
    /// sunk so far (u64, little endian). Exits when stdin closes.
    Backend {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        control: u16,
    },
    /// One echo flow, `count` round trips of `size` bytes after a warm-up; prints
    /// `latency <p50 µs> <p99 µs>`.
    Ping {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(8..=1 << 20))]
        size: u32,
    },
    /// `flows` sink flows written as fast as they go: prints `ready` once all are upgraded, stops
    /// writing on a line from stdin, prints `written <bytes>`, keeps the flows open until stdin closes.
    Push {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        flows: usize,
    },
    /// `flows` idle flows, opened many at a time: prints `ready <upgraded> <failed> <ms>`, answers
    /// `check` with `alive <n>`, holds them until stdin closes.
    Idle {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        flows: usize,
    },
    /// `bench http`'s fixed-rate load (see `open_loop`): runs for its time and exits.
    OpenLoop(open_loop::Load),
}

pub fn run(role: Role) -> anyhow::Result<()> {
    match role {
        Role::Backend { port, control } => backend(port, control),
        Role::Ping { port, count, size } => ping(port, count, size as usize),
        Role::Push { port, flows } => push(port, flows),
        Role::Idle { port, flows } => idle(port, flows),
        Role::OpenLoop(load) => open_loop::run(&load),
    }
}

fn request(mode: Mode) -> String {
    format!(
        "GET /ws?mode={} HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        mode.as_str()
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether the head has header `name` (case-insensitive) with exactly `value`.
fn has_header(head: &str, name: &str, value: &str) -> bool {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .any(|(k, v)| k.trim().eq_ignore_ascii_case(name) && v.trim() == value)
}

fn ready(word: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{word}")?;
    out.flush()?;
    Ok(())
}

/// Blocks until stdin closes (the orchestrator is done with us, or gone).
fn wait_stdin_eof() {
    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
}

// ---------------------------------------------------------------------------------------------
// Backend

fn backend(port: u16, control: u16) -> anyhow::Result<()> {
    std::thread::spawn(|| {
        wait_stdin_eof();
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let flows = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.with_context(|| format!("bind {port}"))?;
        let ctl =
            tokio::net::TcpListener::bind(("127.0.0.1", control)).await.with_context(|| format!("bind {control}"))?;
        let sunk = Arc::new(AtomicU64::new(0));
        let counter = sunk.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = ctl.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    while matches!(s.read(&mut b).await, Ok(1)) {
                        if s.write_all(&counter.load(Relaxed).to_le_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        loop {
            let s = match flows.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    eprintln!("bench-peer backend: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let sunk = sunk.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(s, &sunk).await
                    && !matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
                {
                    eprintln!("bench-peer backend: {e}");
                }
            });
        }
    })
}

/// One flow: read the upgrade head, answer 101, then echo, sink or idle until EOF.
async fn serve(mut s: tokio::net::TcpStream, sunk: &AtomicU64) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut head = vec![0u8; 4096];
    let mut n = 0;
    let end = loop {
        if n == head.len() {
            s.write_all(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
            return Ok(());
        }
        let r = s.read(&mut head[n..]).await?;
        if r == 0 {
            return Ok(());
        }
        n += r;
        if let Some(p) = find(&head[..n], b"\r\n\r\n") {
            break p + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]);
    let target = text.split(' ').nth(1).unwrap_or("");
    let mode = [Mode::Echo, Mode::Sink, Mode::Idle].into_iter().find(|m| target == format!("/ws?mode={}", m.as_str()));
    let (Some(mode), true) = (mode, has_header(&text, "sec-websocket-key", WS_KEY)) else {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
        return Ok(());
    };
    s.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let ahead = head[end..n].to_vec();
    match mode {
        Mode::Echo => {
            s.write_all(&ahead).await?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let r = s.read(&mut buf).await?;
                if r == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..r]).await?;
            }
        }
        Mode::Sink | Mode::Idle => {
            sunk.fetch_add(ahead.len() as u64, Relaxed);
            // Idle flows keep only the small head buffer: 2,000 of them must not cost the backend much.
            let mut buf = if mode == Mode::Sink { vec![0u8; 256 << 10] } else { head };
            loop {
                let r = s.read(&mut buf).await?;
                if r == 0 {
                    return Ok(());
                }
                sunk.fetch_add(r as u64, Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Connects, sends the upgrade request and waits for the 101 head; the backend never speaks first,
/// so nothing may follow the head.
fn connect(port: u16, mode: Mode) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connect to {port}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(request(mode).as_bytes()).context("send the upgrade request")?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).context("read the 101 head")?;
        head.extend_from_slice(&buf[..n]);
        if upgraded(&head, n == 0, port)? {
            return Ok(s);
        }
    }
}

/// `connect` for many flows at once, on a tokio runtime.
async fn connect_async(port: u16, mode: Mode) -> anyhow::Result<tokio::net::TcpStream> {
    let mut s =
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.with_context(|| format!("connect to {port}"))?;
    s.set_nodelay(true)?;
    s.write_all(request(mode).as_bytes()).await.context("send the upgrade request")?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).await.context("read the 101 head")?;
        head.extend_from_slice(&buf[..n]);
        if upgraded(&head, n == 0, port)? {
            return Ok(s);
        }
    }
}

/// Whether `head` (what the proxy sent so far; `closed` once it closed) is a whole 101 with the
/// right accept value and nothing after it; false while more is needed.
fn upgraded(head: &[u8], closed: bool, port: u16) -> anyhow::Result<bool> {
    let Some(p) = find(head, b"\r\n\r\n") else {
        if closed {
            bail!("connection to {port} closed before the 101 head");
        }
        if head.len() > 16 << 10 {
            bail!("port {port}: 101 head longer than 16 KiB");
        }
        return Ok(false);
    };
    let text = String::from_utf8_lossy(&head[..p]);
    if !text.starts_with("HTTP/1.1 101") {
        bail!("port {port} answered {:?} instead of 101", text.lines().next().unwrap_or(""));
    }
    if !has_header(&text, "sec-websocket-accept", WS_ACCEPT) {
        bail!("port {port}: the 101 lacks Sec-WebSocket-Accept: {WS_ACCEPT}");
    }
    if p + 4 != head.len() {
        bail!("port {port}: bytes followed the 101 head");
    }
    Ok(true)
}

fn ping(port: u16, count: usize, size: usize) -> anyhow::Result<()> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let mut s = connect(port, Mode::Echo)?;
    let mut out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let warm = (count / 10).clamp(100, 2000);
    let mut rtts = Vec::with_capacity(count);
    for i in 0..warm + count {
        out[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        s.write_all(&out).context("ping write")?;
        s.read_exact(&mut back).context("ping read")?;
        let rtt = t.elapsed();
        if back != out {
            bail!("echo {i} came back different");
        }
        if i >= warm {
            rtts.push(rtt);
        }
    }
    rtts.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p99 = rtts[(rtts.len() * 99 / 100).min(rtts.len() - 1)];
    ready(&format!("latency {:.1} {:.1}", us(rtts[rtts.len() / 2]), us(p99)))
}

fn push(port: u16, flows: usize) -> anyhow::Result<()> {
    let mut streams = Vec::with_capacity(flows);
    for _ in 0..flows {
        let s = connect(port, Mode::Sink)?;
        s.set_nonblocking(true)?;
        streams.push(s);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::with_capacity(flows);
        for s in streams {
            let mut s = tokio::net::TcpStream::from_std(s)?;
            let mut stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                let buf = vec![0xa5u8; PUSH_CHUNK];
                let mut written = 0u64;
                loop {
                    tokio::select! {
                        biased;
                        _ = stopped.changed() => break,
                        r = s.write(&buf) => written += r? as u64,
                    }
                }
                io::Result::Ok((s, written))
            }));
        }
        ready("ready")?;
        // Any line, or EOF, means stop.
        tokio::task::spawn_blocking(|| io::stdin().lock().read_line(&mut String::new())).await??;
        let _ = stop.send(true);
        let mut total = 0u64;
        let mut keep = Vec::with_capacity(flows);
        for t in tasks {
            let (s, n) = t.await?.context("push write")?;
            total += n;
            keep.push(s);
        }
        ready(&format!("written {total}"))?;
        // Keep the flows open until the orchestrator has seen every byte arrive.
        tokio::task::spawn_blocking(wait_stdin_eof).await?;
        drop(keep);
        Ok(())
    })
}

/// The idle client's `ready <upgraded> <failed> <ms>` line, as numbers.
pub fn parse_ready(line: &str) -> anyhow::Result<(usize, usize, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f[..] {
        ["ready", ok, failed, ms] => Ok((ok.parse()?, failed.parse()?, ms.parse()?)),
        _ => bail!("the idle client said {line:?}, expected `ready <upgraded> <failed> <ms>`"),
    }
}

/// Opens `flows` idle flows, `IDLE_CONCURRENCY` at a time, each bounded by `IDLE_TIMEOUT`; prints
/// `ready <upgraded> <failed> <ms>`. Then answers each `check` line with `alive <n>` (flows the
/// proxy has not closed), and exits when stdin closes.
fn idle(port: u16, flows: usize) -> anyhow::Result<()> {
    const IDLE_CONCURRENCY: usize = 128;
    const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let started = Instant::now();
        let mut held = Vec::with_capacity(flows);
        let mut failed = 0usize;
        let mut first_error = None;
        let (mut pending, mut started_flows) = (tokio::task::JoinSet::new(), 0);
        loop {
            while started_flows < flows && pending.len() < IDLE_CONCURRENCY {
                pending.spawn(tokio::time::timeout(IDLE_TIMEOUT, connect_async(port, Mode::Idle)));
                started_flows += 1;
            }
            let Some(r) = pending.join_next().await else { break };
            match r? {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
                Err(_) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("no 101 within {IDLE_TIMEOUT:?}"));
                }
            }
        }
        if let Some(e) = first_error {
            eprintln!("bench-peer idle: {failed} of {flows} flows failed, the first: {e}");
        }
        ready(&format!("ready {} {failed} {}", held.len(), started.elapsed().as_millis()))?;
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await? {
            if line.trim() == "check" {
                let mut buf = [0u8; 64];
                let alive = held
                    .iter()
                    .filter(|s| match s.try_read(&mut buf) {
                        Ok(n) => n > 0,
                        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                    })
                    .count();
                ready(&format!("alive {alive}"))?;
            }
        }
        drop(held);
        Ok(())
    })
}
