//! Kernel splicing of upgraded flows, as root, in both modes (spliced and copied): what a
//! client and a backend see must be identical. Without root these tests skip with a reason,
//! except under CI=true, where they fail.

mod support;

use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use speedmimi::datapath::Datapath;
use support::{
    Origin, Proxy,
    flows::{Rng, assert_unspliced, modes},
    one_route, root_or_skip,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::Message;

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
            let data = Rng(seed).bytes(len);
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

// ---------------------------------------------------------------------------------------------
// Raw upgrades with a test-made backend, and the helpers the tests below share.
// ---------------------------------------------------------------------------------------------

/// Bound on one step (a connect, a read of an expected echo, a handshake). Generous: the tests
/// run in parallel on small CI machines with a debug build; it is a hang guard, not a latency check.
const STEP: Duration = Duration::from_secs(30);

/// The explicit bound for a reset to reach the other side.
const RESET_WITHIN: Duration = Duration::from_secs(1);

/// The upgrade request the raw client sends (bytes for the upgraded protocol may follow it in
/// the same write).
const UPGRADE_REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

/// What the raw backend answers, in one write with `HELLO` (the backend speaks first).
const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
const HELLO: &[u8] = b"hello";

/// SHA-256 (ring's, which rustls already uses) plus the exact byte count, fed in pieces of any
/// size.
struct Sha256Count {
    ctx: ring::digest::Context,
    n: u64,
}

impl Default for Sha256Count {
    fn default() -> Self {
        Sha256Count { ctx: ring::digest::Context::new(&ring::digest::SHA256), n: 0 }
    }
}

impl Sha256Count {
    fn update(&mut self, data: &[u8]) {
        self.n += data.len() as u64;
        self.ctx.update(data);
    }

    /// (byte count, SHA-256)
    fn finish(self) -> (u64, Vec<u8>) {
        (self.n, self.ctx.finish().as_ref().to_vec())
    }
}

/// How a read that expects the end of the stream ended.
#[derive(Debug)]
enum Ending {
    Eof,
    Error(#[allow(dead_code, reason = "shown through Debug")] std::io::Error),
    /// Unexpected bytes instead of the end.
    Data(Vec<u8>),
    TimedOut,
}

/// A TCP stream plus bytes already read past a head.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads an HTTP head (up to the blank line); returns it and the connection with what
    /// followed it in `buf`.
    async fn read_head(mut s: TcpStream) -> Result<(String, Conn), String> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let read = async {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let rest = buf.split_off(end + 4);
                    return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
                }
                if buf.len() > 64 * 1024 {
                    return Err(format!("head longer than 64 KiB: {:?}", String::from_utf8_lossy(&buf)));
                }
                match s.read(&mut chunk).await {
                    Ok(0) => return Err(format!("EOF inside the head; got {:?}", String::from_utf8_lossy(&buf))),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(format!("reading the head: {e}")),
                }
            }
        };
        let (head, rest) = tokio::time::timeout(STEP, read).await.map_err(|_| "head timed out".to_string())??;
        Ok((head, Conn { s, buf: rest }))
    }

    /// Exactly `n` bytes (those already buffered first).
    async fn read_exact(&mut self, n: usize, what: &str) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(n);
        let take = self.buf.len().min(n);
        out.extend(self.buf.drain(..take));
        let rest = n - out.len();
        if rest > 0 {
            let start = out.len();
            out.resize(n, 0);
            match tokio::time::timeout(STEP, self.s.read_exact(&mut out[start..])).await {
                Err(_) => return Err(format!("{what}: timed out after {STEP:?} waiting for {rest} of {n} bytes")),
                Ok(Err(e)) => return Err(format!("{what}: {e} while reading {n} bytes")),
                Ok(Ok(_)) => {}
            }
        }
        Ok(out)
    }

    /// Reads expecting the end of the stream within `within`.
    async fn read_end(&mut self, within: Duration) -> Ending {
        if !self.buf.is_empty() {
            return Ending::Data(std::mem::take(&mut self.buf));
        }
        let mut b = [0u8; 4096];
        match tokio::time::timeout(within, self.s.read(&mut b)).await {
            Err(_) => Ending::TimedOut,
            Ok(Ok(0)) => Ending::Eof,
            Ok(Ok(n)) => Ending::Data(b[..n].to_vec()),
            Ok(Err(e)) => Ending::Error(e),
        }
    }

    /// Panics with `what` unless the stream ends with EOF within `within`.
    async fn expect_eof(&mut self, within: Duration, what: &str) {
        match self.read_end(within).await {
            Ending::Eof => {}
            end => panic!("{what}, got {end:?}"),
        }
    }

    /// Panics with `what` unless the stream ends (EOF or reset) within `within`.
    async fn expect_closed(&mut self, within: Duration, what: &str) {
        match self.read_end(within).await {
            Ending::Eof | Ending::Error(_) => {}
            end => panic!("{what}, got {end:?}"),
        }
    }

    async fn send(&mut self, data: &[u8], what: &str) -> Result<(), String> {
        match tokio::time::timeout(STEP, self.s.write_all(data)).await {
            Err(_) => Err(format!("{what}: write of {} bytes timed out", data.len())),
            Ok(Err(e)) => Err(format!("{what}: write of {} bytes: {e}", data.len())),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Sends `data` and expects it back byte for byte.
    async fn echo(&mut self, data: &[u8], what: &str) -> Result<(), String> {
        self.send(data, what).await?;
        let got = self.read_exact(data.len(), what).await?;
        if got != data {
            let at = got.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("{what}: echo of {} bytes differs from byte {at}", data.len()));
        }
        Ok(())
    }

    /// Zero linger: dropping sends RST.
    fn reset(self) {
        socket2::SockRef::from(&self.s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(self);
    }
}

/// Opens a raw upgrade through the proxy: the request and `early` go in one write; the 101 head
/// is checked and the backend's first bytes `hello` read.
async fn raw_upgrade(proxy: std::net::SocketAddr, early: &[u8]) -> Result<Conn, String> {
    let mut s = match tokio::time::timeout(STEP, TcpStream::connect(proxy)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect to the proxy: {e}")),
        Err(_) => return Err("connect to the proxy timed out".into()),
    };
    let mut req = UPGRADE_REQUEST.to_vec();
    req.extend_from_slice(early);
    tokio::time::timeout(STEP, s.write_all(&req))
        .await
        .map_err(|_| "request write timed out")?
        .map_err(|e| format!("request write: {e}"))?;
    let (head, mut c) = Conn::read_head(s).await?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("expected 101, got {head:?} then {:?}", String::from_utf8_lossy(&c.buf)));
    }
    let hello = c.read_exact(HELLO.len(), "the backend's first bytes").await?;
    if hello != HELLO {
        return Err(format!("expected {:?} right after the 101, got {:?}", "hello", String::from_utf8_lossy(&hello)));
    }
    Ok(c)
}

/// What the raw backend does once it has answered 101 + hello.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    /// Echo every byte; on EOF shut down its write side and close.
    Echo,
    /// Hand the connection to the test (through `RawBackend::conns`).
    Hand,
}

/// A test-made upgrade backend on 127.0.0.1; its accept loop and every connection it still
/// owns end when it is dropped.
struct RawBackend {
    id: &'static str,
    addr: std::net::SocketAddr,
    conns: tokio::sync::mpsc::UnboundedReceiver<Conn>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    async fn start(id: &'static str, then: Then) -> RawBackend {
        RawBackend::start_with_mss(id, then, None).await
    }

    /// With `mss`, the backend's connections use segments of at most that many bytes, both ways
    /// (the listener's TCP_MAXSEG is inherited and announced in the SYN-ACK).
    async fn start_with_mss(id: &'static str, then: Then, mss: Option<u32>) -> RawBackend {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        if let Some(mss) = mss {
            use std::os::fd::AsRawFd;
            let v = mss as libc::c_int;
            // SAFETY: a live socket; the option value is one int of the given size.
            let rc = unsafe {
                libc::setsockopt(
                    l.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_MAXSEG,
                    (&raw const v).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
        }
        let addr = l.local_addr().unwrap();
        let (tx, conns) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut flows = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    r = l.accept() => {
                        let Ok((s, _)) = r else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let tx = tx.clone();
                        flows.spawn(async move {
                            let Ok((_head, mut c)) = Conn::read_head(s).await else { return };
                            let mut first = SWITCHING.to_vec();
                            first.extend_from_slice(HELLO);
                            if c.s.write_all(&first).await.is_err() {
                                return;
                            }
                            match then {
                                Then::Hand => {
                                    let _ = tx.send(c);
                                }
                                Then::Echo => echo_until_eof(c).await,
                            }
                        });
                    }
                    Some(_) = flows.join_next(), if !flows.is_empty() => {}
                }
            }
        });
        RawBackend { id, addr, conns, task }
    }

    fn yaml(&self, extra: &str) -> String {
        format!("{}{extra}", support::backend_yaml(self.id, self.addr, 1))
    }

    /// The backend side of the next upgraded connection (`Then::Hand`).
    async fn next(&mut self) -> Conn {
        tokio::time::timeout(STEP, self.conns.recv())
            .await
            .expect("the raw backend got no upgraded connection")
            .expect("the raw backend stopped")
    }
}

async fn echo_until_eof(mut c: Conn) {
    if !c.buf.is_empty() && c.s.write_all(&std::mem::take(&mut c.buf)).await.is_err() {
        return;
    }
    let mut b = vec![0u8; 64 * 1024];
    loop {
        match c.s.read(&mut b).await {
            Ok(0) => {
                let _ = c.s.shutdown().await;
                return;
            }
            Ok(n) => {
                if c.s.write_all(&b[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// While a flow is open and data has made a round trip through it, splice mode must have both of
/// its sockets in the SOCKHASH (otherwise the flow was silently copied).
fn assert_spliced(mode: &str, dp: &Arc<dyn Datapath>, flows: usize) {
    if mode == "splice" {
        assert_eq!(dp.spliced_sockets(), 2 * flows, "{mode}: {flows} open flow(s) must be spliced");
    }
}

/// Waits (bounded, 5 s) until the proxy reports `n` spliced flows parked: quiet flows leave tokio
/// for the parking lot within a fraction of a second. Copy mode never parks and must report 0.
async fn until_parked(mode: &str, proxy: &Proxy, n: u64) {
    let want = if mode == "splice" { n } else { 0 };
    let url = proxy.admin_url("/api/v1/stats/server");
    let mut got = None;
    for _ in 0..250 {
        let (_, stats) = support::admin_call(http::Method::GET, &url, None, None, STEP).await;
        got = stats.get("spliced_flows").and_then(|f| f.get("parked")).and_then(|p| p.as_u64());
        if got == Some(want) {
            // The backends' own gauges agree while flows sit parked (quiet, so none ends between the
            // two calls): `want` parked, each of them spliced.
            if want > 0 {
                let url = proxy.admin_url("/api/v1/backends");
                let (_, list) = support::admin_call(http::Method::GET, &url, None, None, STEP).await;
                let sum = |field: &str| -> u64 {
                    let all =
                        list["upstreams"].as_object().unwrap().values().flat_map(|u| u.as_array().unwrap().iter());
                    all.map(|b| b["upgraded_flows"][field].as_u64().unwrap()).sum()
                };
                assert_eq!(sum("parked_open"), want, "{mode}: backends' parked gauges: {list}");
                assert!(sum("spliced_open") >= want, "{mode}: backends' spliced gauges: {list}");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{mode}: expected {want} parked flow(s) within 5 s; the proxy reports {got:?}");
}

/// One round trip (ping from the client, pong from the backend); then, in splice mode, the flow
/// must be spliced.
async fn round_trip(mode: &str, dp: &Arc<dyn Datapath>, c: &mut Conn, b: &mut Conn) {
    c.send(b"ping", "ping").await.unwrap();
    assert_eq!(b.read_exact(4, "ping at the backend").await.unwrap(), b"ping", "{mode}");
    b.send(b"pong", "pong").await.unwrap();
    assert_eq!(c.read_exact(4, "pong at the client").await.unwrap(), b"pong", "{mode}");
    assert_spliced(mode, dp, 1);
}

fn proxy_yaml(backend: &RawBackend, backend_extra: &str) -> String {
    one_route(&backend.yaml(backend_extra), "round_robin", "")
}

/// 1. Raw WebSocket-like upgrade: the backend speaks first (its bytes share a write with the
/// 101), the client's bytes share a write with the request; both arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_upgrade_keeps_bytes_sent_with_the_handshake_in_both_modes() {
    if !root_or_skip("raw_upgrade_keeps_bytes_sent_with_the_handshake_in_both_modes") {
        return;
    }
    for (mode, dp) in modes() {
        let backend = RawBackend::start("raw", Then::Echo).await;
        let proxy = Proxy::start_with(&proxy_yaml(&backend, ""), dp.clone()).await;
        let mut c = raw_upgrade(proxy.addr, b"early-bytes").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        let early = c.read_exact(11, "echo of early-bytes").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(String::from_utf8_lossy(&early), "early-bytes", "{mode}: echo of the bytes sent with the request");
        let mut rng = Rng(1);
        for (i, len) in [1usize, 7, 100, 1500, 65_536, 300_000, 1 << 20, 3].into_iter().enumerate() {
            let data = rng.bytes(len);
            c.echo(&data, &format!("{mode}: message {i} ({len} B)")).await.unwrap_or_else(|e| panic!("{e}"));
        }
        assert_spliced(mode, &dp, 1);
        c.s.shutdown().await.unwrap();
        c.expect_eof(STEP, &format!("{mode}: expected EOF after the backend closed")).await;
        drop(c);
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// 2. The demo origin's WebSocket echo, byte-exact, for 2,000 messages of 1 B to 1 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_2000_random_messages_is_byte_exact_in_both_modes() {
    if !root_or_skip("websocket_echo_2000_random_messages_is_byte_exact_in_both_modes") {
        return;
    }
    // Sizes are weighted so that a mode moves ~300 MB each way (mean ~154 KiB per message), which
    // keeps CI time sane: 40% up to 1 KiB, 20% up to 64 KiB, 15% up to 256 KiB, 25% up to 1 MiB,
    // plus exactly 1 B and exactly 1 MiB as the first two messages.
    fn size(i: usize, rng: &mut Rng) -> usize {
        let r = rng.next_u64();
        let pick = |max: u64| 1 + ((r >> 8) % max) as usize;
        match (i, r % 20) {
            (0, _) => 1,
            (1, _) => 1 << 20,
            (_, 0..=7) => pick(1024),
            (_, 8..=11) => pick(64 * 1024),
            (_, 12..=14) => pick(256 * 1024),
            _ => pick(1 << 20),
        }
    }
    const MESSAGES: usize = 2000;
    for (mode, dp) in modes() {
        let o = Origin::start("b1").await;
        let proxy = Proxy::start_with(&one_route(&o.yaml(1), "round_robin", ""), dp.clone()).await;
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut ws, _) =
            tokio::time::timeout(STEP, tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.addr), tcp))
                .await
                .expect("handshake timed out")
                .unwrap();
        let mut rng = Rng(0x5EED);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        let mut total = 0usize;
        for i in 0..MESSAGES {
            assert!(tokio::time::Instant::now() < deadline, "{mode}: 10 minutes spent, at message {i}");
            let len = size(i, &mut rng);
            total += len;
            let data = rng.bytes(len);
            tokio::time::timeout(STEP, ws.send(Message::binary(data.clone())))
                .await
                .unwrap_or_else(|_| panic!("{mode}: send of message {i} ({len} B) timed out"))
                .unwrap();
            let got = tokio::time::timeout(STEP, ws.next())
                .await
                .unwrap_or_else(|_| panic!("{mode}: echo of message {i} ({len} B) timed out"))
                .unwrap_or_else(|| panic!("{mode}: stream ended at message {i}"))
                .unwrap_or_else(|e| panic!("{mode}: message {i}: {e}"));
            assert!(got.is_binary(), "{mode}: message {i} came back as {got:?}");
            let got = got.into_data();
            assert!(got.as_ref() == &data[..], "{mode}: message {i} ({len} B) differs (got {} B)", got.len());
            if i == 0 {
                // Checked after the 1-byte message: a flow may later move to copy as a bulk stream.
                assert_spliced(mode, &dp, 1);
            }
        }
        assert!((200 << 20..=400 << 20).contains(&total), "test design: {total} bytes per mode");
        ws.close(None).await.unwrap();
        // The close handshake completes, then the stream ends.
        for _ in 0..10 {
            match tokio::time::timeout(STEP, ws.next()).await.expect("close timed out") {
                None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
        drop(ws);
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// Tests 3a and 3b: one side half-closes first (the client if `client_first`, else the backend);
/// the other side sees EOF, can still send, then closes.
async fn half_close_keeps_the_other_direction_open(client_first: bool) {
    for (mode, dp) in modes() {
        let mut backend = RawBackend::start("raw", Then::Hand).await;
        let proxy = Proxy::start_with(&proxy_yaml(&backend, ""), dp.clone()).await;
        let mut c = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        let mut b = backend.next().await;
        // One round trip so the flow is in its steady state (spliced in splice mode), then quiet
        // until parked: the FIN has to wake it.
        round_trip(mode, &dp, &mut c, &mut b).await;
        until_parked(mode, &proxy, 1).await;

        let ((mut first, closer), (mut second, other), seed) =
            if client_first { ((c, "client"), (b, "backend"), 3) } else { ((b, "backend"), (c, "client"), 4) };
        first.s.shutdown().await.unwrap();
        second.expect_eof(STEP, &format!("{mode}: the {other} should read EOF after the {closer}'s half-close")).await;
        let late = Rng(seed).bytes(200_000);
        let what = format!("{other} data after the {closer}'s FIN");
        second.send(&late, &what).await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        let what = format!("late data at the {closer}");
        let got = first.read_exact(late.len(), &what).await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(got == late, "{mode}: data sent after the {closer}'s half-close differs");
        drop(second);
        first.expect_eof(STEP, &format!("{mode}: the {closer} should read EOF after the {other} closed")).await;
        drop(first);
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// 3a. The client half-closes first: the backend sees EOF, can still send, then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_keeps_the_other_direction_open_in_both_modes() {
    if !root_or_skip("client_half_close_keeps_the_other_direction_open_in_both_modes") {
        return;
    }
    half_close_keeps_the_other_direction_open(true).await;
}

/// 3b. The backend half-closes first: the client sees EOF, can still send, then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_keeps_the_other_direction_open_in_both_modes() {
    if !root_or_skip("backend_half_close_keeps_the_other_direction_open_in_both_modes") {
        return;
    }
    half_close_keeps_the_other_direction_open(false).await;
}

/// 4. A reset on either side reaches the other within 1 s (as the issue requires): its read
/// returns an error or EOF. Right after traffic (the flow is watched by tokio) and once parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_reaches_the_other_side_within_a_second_in_both_modes() {
    if !root_or_skip("reset_reaches_the_other_side_within_a_second_in_both_modes") {
        return;
    }
    for (mode, dp) in modes() {
        let mut backend = RawBackend::start("raw", Then::Hand).await;
        let proxy = Proxy::start_with(&proxy_yaml(&backend, ""), dp.clone()).await;
        for (client_resets, parked) in [(true, false), (false, false), (true, true), (false, true)] {
            let who = if client_resets { "client" } else { "backend" };
            let mut c = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
            let mut b = backend.next().await;
            round_trip(mode, &dp, &mut c, &mut b).await;
            if parked {
                until_parked(mode, &proxy, 1).await;
            }
            let who = format!("{who} ({})", if parked { "parked flow" } else { "right after traffic" });
            let (resetter, mut other) = if client_resets { (c, b) } else { (b, c) };
            resetter.reset();
            let started = std::time::Instant::now();
            match other.read_end(RESET_WITHIN).await {
                Ending::Eof | Ending::Error(_) => {}
                Ending::TimedOut => panic!(
                    "{mode}: the {who} reset, but the other side still saw an open connection after {:?} \
                     (the issue requires it within 1 s)",
                    started.elapsed()
                ),
                Ending::Data(d) => panic!("{mode}: the {who} reset; the other side read {} unexpected bytes", d.len()),
            }
            drop(other);
            assert_unspliced(mode, &dp).await;
        }
        proxy.stop().await;
    }
}

/// 5. 1,000 flows open at once, each echoing a few messages, then all closing; the SOCKHASH
/// holds all of them while open and empties afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_flows_echo_and_close_in_both_modes() {
    if !root_or_skip("thousand_concurrent_flows_echo_and_close_in_both_modes") {
        return;
    }
    const FLOWS: usize = 1000;
    /// Flows connecting at once (the listen backlogs hold 1024; a failed backend connect would
    /// take the backend out).
    const OPENING: usize = 100;
    // Errors of the first few failing flows.
    fn check(mode: &str, phase: &str, results: Vec<Result<(), String>>) {
        let errors: Vec<_> = results.into_iter().filter_map(Result::err).collect();
        assert!(
            errors.is_empty(),
            "{mode}: {} of {FLOWS} flows failed to {phase}; first: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
    }
    async fn join_all<T: Send + 'static>(set: &mut tokio::task::JoinSet<T>, mode: &str, phase: &str) -> Vec<T> {
        let mut out = Vec::new();
        let all = async {
            while let Some(r) = set.join_next().await {
                out.push(r.expect("flow task panicked"));
            }
        };
        tokio::time::timeout(Duration::from_secs(180), all)
            .await
            .unwrap_or_else(|_| panic!("{mode}: {phase}: not done within 180 s"));
        out
    }
    for (mode, dp) in modes() {
        let backend = RawBackend::start("raw", Then::Echo).await;
        // The default per-backend max_conn is exactly 1000: leave room.
        let proxy = Proxy::start_with(&proxy_yaml(&backend, "      max_conn: 5000\n"), dp.clone()).await;

        // Open all of them (at most OPENING connecting at a time); they all stay open.
        let gate = Arc::new(tokio::sync::Semaphore::new(OPENING));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..FLOWS {
            let (gate, addr) = (gate.clone(), proxy.addr);
            set.spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                (i, raw_upgrade(addr, format!("flow {i:04}").as_bytes()).await.map_err(|e| format!("flow {i}: {e}")))
            });
        }
        let mut conns = Vec::with_capacity(FLOWS);
        let mut errors = Vec::new();
        // Completion order differs from flow order: flow i sent "flow {i}".
        let mut opened = join_all(&mut set, mode, "open").await;
        opened.sort_by_key(|(i, _)| *i);
        for (_, r) in opened {
            match r {
                Ok(c) => conns.push(c),
                Err(e) => errors.push(Err(e)),
            }
        }
        check(mode, "open", errors);

        // Every flow sends a few messages at the same time and checks the echoes.
        let mut set = tokio::task::JoinSet::new();
        for (i, mut c) in conns.into_iter().enumerate() {
            set.spawn(async move {
                let r = async {
                    let early = c.read_exact(9, "echo of the early bytes").await?;
                    let early = String::from_utf8_lossy(&early).into_owned();
                    if early != format!("flow {i:04}") {
                        return Err(format!("got {early:?}: bytes of another flow"));
                    }
                    let mut rng = Rng(i as u64);
                    for (m, len) in [1usize, 1000, 20_000].into_iter().enumerate() {
                        let mut data = rng.bytes(len);
                        data[..len.min(8)].copy_from_slice(&(i as u64).to_le_bytes()[..len.min(8)]);
                        c.echo(&data, &format!("message {m}")).await?;
                    }
                    Ok(())
                }
                .await;
                (r.map_err(|e| format!("flow {i}: {e}")), c)
            });
        }
        let mut results = Vec::new();
        let mut conns = Vec::with_capacity(FLOWS);
        for (r, c) in join_all(&mut set, mode, "echo").await {
            results.push(r);
            conns.push(c);
        }
        check(mode, "echo", results);
        assert_spliced(mode, &dp, FLOWS);
        // Quiet now: every flow leaves tokio for the parking lot, and their FINs bring them back.
        until_parked(mode, &proxy, FLOWS as u64).await;

        // All close: the client half-closes, the echo backend closes, the client reads EOF.
        let mut set = tokio::task::JoinSet::new();
        for mut c in conns {
            set.spawn(async move {
                if let Err(e) = c.s.shutdown().await {
                    return Err(format!("shutdown: {e}"));
                }
                match c.read_end(STEP).await {
                    Ending::Eof => Ok(()),
                    other => Err(format!("expected EOF, got {other:?}")),
                }
            });
        }
        let results = join_all(&mut set, mode, "close").await;
        check(mode, "close", results);
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// 6. The admin disconnect closes (spliced) flows, parked or not, and their sockets leave the
/// SOCKHASH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_disconnect_closes_the_flow_in_both_modes() {
    if !root_or_skip("admin_disconnect_closes_the_flow_in_both_modes") {
        return;
    }
    for (mode, dp) in modes() {
        let backend = RawBackend::start("raw1", Then::Echo).await;
        let proxy = Proxy::start_with(&proxy_yaml(&backend, ""), dp.clone()).await;
        // A quiet flow, parked; then a flow with traffic just before the disconnect (most likely
        // still watched by tokio then).
        let mut quiet = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        quiet.echo(&Rng(6).bytes(10_000), "before disconnect").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        until_parked(mode, &proxy, 1).await;
        let mut busy = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        busy.echo(&Rng(7).bytes(10_000), "before disconnect").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_spliced(mode, &dp, 2);

        let url = proxy.admin_url("/api/v1/backends/disconnect?upstream=default&backend_id=raw1");
        let (status, _) = support::admin_call(http::Method::POST, &url, None, None, STEP).await;
        assert_eq!(status, http::StatusCode::OK, "{mode}: disconnect answered");

        for (c, which) in [(&mut quiet, "parked"), (&mut busy, "busy")] {
            let what = format!("{mode}: the {which} flow should end within 5 s of the disconnect");
            c.expect_closed(Duration::from_secs(5), &what).await;
        }
        until_parked(mode, &proxy, 0).await;
        drop((quiet, busy));
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// 7. 1 GiB one way (client -> backend), checked by exact byte count and SHA-256 computed on
/// both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_stream_arrives_with_matching_sha256_in_both_modes() {
    if !root_or_skip("one_gib_stream_arrives_with_matching_sha256_in_both_modes") {
        return;
    }
    const TOTAL: u64 = 1 << 30;
    for (mode, dp) in modes() {
        let mut backend = RawBackend::start("raw", Then::Hand).await;
        let proxy = Proxy::start_with(&proxy_yaml(&backend, ""), dp.clone()).await;
        let mut c = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        let mut b = backend.next().await;
        // One round trip first: spliced then (a bulk stream may later move to copy).
        round_trip(mode, &dp, &mut c, &mut b).await;

        // The backend counts and hashes until EOF, then answers with one byte and closes.
        let receiver = tokio::spawn(async move {
            let mut sum = Sha256Count::default();
            sum.update(&std::mem::take(&mut b.buf));
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match tokio::time::timeout(STEP, b.s.read(&mut buf)).await {
                    Err(_) => return Err(format!("stalled after {} bytes", sum.n)),
                    Ok(Err(e)) => return Err(format!("{e} after {} bytes", sum.n)),
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => sum.update(&buf[..n]),
                }
            }
            b.s.write_all(b"k").await.map_err(|e| format!("answer: {e}"))?;
            Ok(sum.finish())
        });

        // Writes of varying sizes from a random block at varying offsets, so the stream is not
        // periodic at any write boundary.
        let mut rng = Rng(7);
        let block = rng.bytes((1 << 20) + (256 << 10));
        let mut sent = Sha256Count::default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        let mut left = TOTAL;
        let mut writes = 0u64;
        while left > 0 {
            assert!(tokio::time::Instant::now() < deadline, "{mode}: 10 minutes spent, {left} bytes left");
            writes += 1;
            let r = rng.next_u64();
            let len = (1 + (r % (256 << 10))).min(left) as usize;
            let off = ((r >> 32) % (1 << 20)) as usize;
            let chunk = &block[off..off + len];
            sent.update(chunk);
            c.send(chunk, &format!("{mode}: write {writes} ({} bytes left)", left))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            left -= len as u64;
        }
        c.s.shutdown().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(120), receiver)
            .await
            .unwrap_or_else(|_| panic!("{mode}: the backend did not finish"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{mode}: backend: {e}"));
        let want = sent.finish();
        assert_eq!(want.0, TOTAL);
        assert_eq!(got.0, want.0, "{mode}: byte count at the backend");
        assert_eq!(got.1, want.1, "{mode}: SHA-256 at the backend");
        assert_eq!(c.read_exact(1, "the backend's answer").await.unwrap_or_else(|e| panic!("{mode}: {e}")), b"k");
        c.expect_eof(STEP, &format!("{mode}: expected EOF after the backend closed")).await;
        drop(c);
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// 8. `server.tunnel_timeout`: a flow without a byte in either direction for that long is closed
/// (in splice mode it is parked by then); a flow with traffic is not, however long it lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_close_after_the_tunnel_timeout_in_both_modes() {
    if !root_or_skip("idle_flows_close_after_the_tunnel_timeout_in_both_modes") {
        return;
    }
    for (mode, dp) in modes() {
        let backend = RawBackend::start("raw", Then::Echo).await;
        let yaml = one_route(&backend.yaml(""), "round_robin", "  tunnel_timeout: 1s");
        let proxy = Proxy::start_with(&yaml, dp.clone()).await;
        let mut idle = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        let mut busy = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        idle.echo(b"hello", "idle flow's only message").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_spliced(mode, &dp, 2);
        // Three idle limits with a message every 250 ms: the busy flow stays open throughout.
        for i in 0..12u8 {
            busy.echo(&[i; 100], "busy flow").await.unwrap_or_else(|e| panic!("{mode}: message {i}: {e}"));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        idle.expect_closed(Duration::from_secs(5), &format!("{mode}: the idle flow should have been closed")).await;
        assert_spliced(mode, &dp, 1);
        busy.echo(b"still here", "busy flow after").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        drop((idle, busy));
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// 8b. A parked flow comes back to tokio for bytes over its budget: after each quiet spell, 4 MiB
/// echoed through a 64 KiB budget (the kernel passes most of it to userspace) arrive exact, and
/// the flow parks again once quiet; its end brings the gauge back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_flows_wake_for_bytes_over_budget_in_both_modes() {
    if !root_or_skip("parked_flows_wake_for_bytes_over_budget_in_both_modes") {
        return;
    }
    for (mode, dp) in modes() {
        let backend = RawBackend::start("raw", Then::Echo).await;
        let yaml = proxy_yaml(&backend, "") + "ebpf:\n  splice_budget: 64KiB\n";
        let proxy = Proxy::start_with(&yaml, dp.clone()).await;
        let mut c = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        c.echo(b"hello", "first message").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_spliced(mode, &dp, 1);
        let mut rng = Rng(8);
        for round in 0..3 {
            until_parked(mode, &proxy, 1).await;
            let data = rng.bytes(4 << 20);
            // Written and read at once: the echo would fill every buffer on the way otherwise.
            let (mut r, mut w) = c.s.split();
            let mut got = vec![0u8; data.len()];
            let (wrote, read) =
                tokio::time::timeout(STEP, async { tokio::join!(w.write_all(&data), r.read_exact(&mut got)) })
                    .await
                    .unwrap_or_else(|_| panic!("{mode}: round {round}: 4 MiB echo not done within {STEP:?}"));
            wrote.unwrap_or_else(|e| panic!("{mode}: round {round}: write: {e}"));
            read.unwrap_or_else(|e| panic!("{mode}: round {round}: read: {e}"));
            assert!(got == data, "{mode}: round {round}: the 4 MiB echo after parking differs");
        }
        until_parked(mode, &proxy, 1).await;
        drop(c);
        until_parked(mode, &proxy, 0).await;
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// 9. A lossy leg: nftables drops a share of the packets between the proxy and the backend, both
/// ways, while bytes stream both ways at once under a small budget (frequent pauses). TCP
/// retransmits, and segments reach the proxy out of order, duplicated or overlapping bytes it
/// had already received. Every byte must arrive exactly once, in order, in both modes. (The
/// overlap cut itself is shown deterministically by test 9b: overlaps under random loss are
/// rare, about one per GB moved.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_backend_leg_keeps_both_directions_exact_in_both_modes() {
    if !root_or_skip("lossy_backend_leg_keeps_both_directions_exact_in_both_modes") {
        return;
    }
    const EACH_WAY: u64 = 16 << 20;
    for (mode, dp) in modes() {
        // 9,000-byte segments on the lossy leg: retransmissions then overlap more often than
        // with loopback's 64 KiB ones.
        let mut backend = RawBackend::start_with_mss("raw", Then::Hand, Some(9_000)).await;
        let yaml = proxy_yaml(&backend, "") + &format!("ebpf:\n  splice_budget: {LOSSY_BUDGET}\n");
        let proxy = Proxy::start_with(&yaml, dp.clone()).await;
        let loss = Loss::install(backend.addr.port(), LOSS_PERCENT).unwrap_or_else(|e| panic!("{e}"));
        let started = std::time::Instant::now();
        for flow in 1..=LOSSY_FLOWS {
            let mut c = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
            let mut b = backend.next().await;
            round_trip(mode, &dp, &mut c, &mut b).await;
            let (c_read, c_write) = c.s.into_split();
            let (b_read, b_write) = b.s.into_split();
            let seed = 2 * flow as u64;
            let up = tokio::spawn(pump_checked(c_write, b_read, std::mem::take(&mut b.buf), seed, EACH_WAY));
            let down = tokio::spawn(pump_checked(b_write, c_read, std::mem::take(&mut c.buf), seed + 1, EACH_WAY));
            for (dir, task) in [("client -> backend", up), ("backend -> client", down)] {
                tokio::time::timeout(Duration::from_secs(120), task)
                    .await
                    .unwrap_or_else(|_| panic!("{mode}: flow {flow}: {dir}: not done within 120 s"))
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{mode}: flow {flow}: {dir}: {e}"));
            }
        }
        let dropped = loss.dropped();
        println!(
            "{mode}: {LOSSY_FLOWS} flow(s) of {EACH_WAY} bytes each way exact in {:.1?}; {dropped} packets dropped",
            started.elapsed()
        );
        assert!(dropped > 0, "{mode}: the loss rule dropped nothing: the leg was not lossy");
        drop(loss);
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// 9b. An overlapping retransmission, made on purpose: the proxy's ACKs to the backend are
/// dropped while the backend sends four small segments (the proxy gets them) and a fifth (lost
/// too). The backend's retransmission timeout then sends the five collapsed into one segment
/// that starts 4,000 bytes before what the proxy has received. The kernel hands such a segment
/// to the splice verdict whole: the verdict must cut the 4,000 bytes, and the client must see
/// every byte once. The fifth segment is dropped for 60 ms, long enough to lose any tail-loss
/// probe (2 RTTs), short of the retransmission timeout (at least 200 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_retransmission_arrives_once_in_both_modes() {
    if !root_or_skip("overlapping_retransmission_arrives_once_in_both_modes") {
        return;
    }
    const SEGMENT: usize = 1_000;
    for (mode, dp) in modes() {
        let mut backend = RawBackend::start("raw", Then::Hand).await;
        let proxy = Proxy::start_with(&proxy_yaml(&backend, ""), dp.clone()).await;
        let mut c = raw_upgrade(proxy.addr, b"").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        let mut b = backend.next().await;
        round_trip(mode, &dp, &mut c, &mut b).await;
        b.s.set_nodelay(true).unwrap();
        let proxy_port = b.s.peer_addr().unwrap().port();
        let backend_port = backend.addr.port();
        let gate = Gate::install().unwrap_or_else(|e| panic!("{e}"));
        let mut rng = Rng(99);
        let mut attempts = 0;
        loop {
            attempts += 1;
            gate.close("acks", &format!("tcp sport {proxy_port} tcp dport {backend_port}")).unwrap();
            for i in 0..4 {
                let data = rng.bytes(SEGMENT);
                b.send(&data, "a segment").await.unwrap();
                let got =
                    c.read_exact(SEGMENT, "a segment at the client").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
                assert!(got == data, "{mode}: attempt {attempts}: segment {i} differs at the client");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            gate.close("data", &format!("tcp sport {backend_port} tcp dport {proxy_port}")).unwrap();
            let last = rng.bytes(SEGMENT);
            b.send(&last, "the lost segment").await.unwrap();
            // Any tail-loss probe (a few ms) is lost too; the RTO (at least 200 ms after the
            // first segment) is not.
            tokio::time::sleep(Duration::from_millis(60)).await;
            gate.open("data").unwrap();
            let got =
                c.read_exact(SEGMENT, "the retransmitted segment").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
            assert!(got == last, "{mode}: attempt {attempts}: the retransmitted segment differs at the client");
            gate.open("acks").unwrap();
            // Bytes the other way carry the proxy's ACK, so the backend stops retransmitting.
            c.send(b"ping", "ping").await.unwrap();
            assert_eq!(b.read_exact(4, "ping at the backend").await.unwrap(), b"ping", "{mode}");
            match c.read_end(Duration::from_millis(300)).await {
                Ending::TimedOut => {}
                end => panic!("{mode}: attempt {attempts}: the client got more than was sent: {end:?}"),
            }
            let (status, backends) =
                support::admin_call(http::Method::GET, &proxy.admin_url("/api/v1/backends"), None, None, STEP).await;
            assert_eq!(status, http::StatusCode::OK);
            let cut = find_u64(&backends, "spliced_overlap_bytes_cut").unwrap_or(0);
            println!("{mode}: attempt {attempts}: overlap bytes cut so far: {cut}");
            if mode != "splice" || cut > 0 {
                // The four segments the proxy had, plus any earlier bytes whose ACK was also lost.
                assert!(
                    mode != "splice" || cut >= 4 * SEGMENT as u64,
                    "{mode}: cut {cut} bytes, fewer than were overlapped"
                );
                break;
            }
            assert!(
                attempts < 3,
                "splice: no overlapping retransmission in {attempts} attempts: the cut was not exercised"
            );
        }
        round_trip(mode, &dp, &mut c, &mut b).await;
        drop(gate);
        drop((c, b));
        assert_unspliced(mode, &dp).await;
        proxy.stop().await;
    }
}

/// Flows of the lossy-leg test, one after the other (each ends with a FIN racing the verdict's
/// last segments, which once lost a flow's last 3,571 bytes).
const LOSSY_FLOWS: usize = 8;

/// Splice budget of the lossy-leg test.
const LOSSY_BUDGET: &str = "64KiB";

/// Share of the backend leg's packets the lossy-leg test drops, in percent.
const LOSS_PERCENT: u32 = 2;

/// Writes `total` bytes of seeded content into `w` (varying write sizes), while reading them back
/// from `r` (after `ahead`, bytes already read from it) and comparing; then shuts `w` down and
/// expects EOF on `r`.
async fn pump_checked(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut r: tokio::net::tcp::OwnedReadHalf,
    ahead: Vec<u8>,
    seed: u64,
    total: u64,
) -> Result<(), String> {
    let block = Rng(seed).bytes(2 << 20);
    let at = |pos: u64| block[(pos % block.len() as u64) as usize];
    let reader = async move {
        let mut pos = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        let check = |data: &[u8], pos: &mut u64| -> Result<(), String> {
            for &x in data {
                if *pos >= total {
                    return Err(format!("more than the {total} bytes written"));
                }
                if x != at(*pos) {
                    return Err(format!("byte {pos} differs"));
                }
                *pos += 1;
            }
            Ok(())
        };
        check(&ahead, &mut pos)?;
        loop {
            match tokio::time::timeout(STEP, r.read(&mut buf)).await {
                Err(_) => return Err(format!("stalled after {pos} bytes")),
                Ok(Err(e)) => return Err(format!("{e} after {pos} bytes")),
                Ok(Ok(0)) if pos == total => return Ok(()),
                Ok(Ok(0)) => return Err(format!("EOF after {pos} of {total} bytes")),
                Ok(Ok(n)) => check(&buf[..n], &mut pos)?,
            }
        }
    };
    let writer = async move {
        let mut rng = Rng(seed ^ 0xABCD);
        let mut pos = 0u64;
        while pos < total {
            let len = (1 + rng.next_u64() % (128 << 10)).min(total - pos);
            let chunk: Vec<u8> = (pos..pos + len).map(at).collect();
            match tokio::time::timeout(STEP, w.write_all(&chunk)).await {
                Err(_) => return Err(format!("write stalled at {pos}")),
                Ok(Err(e)) => return Err(format!("write at {pos}: {e}")),
                Ok(Ok(())) => pos += len,
            }
        }
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))
    };
    let (r, w) = tokio::join!(reader, writer);
    w.and(r)
}

/// The first number under `key` anywhere in `v`.
fn find_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => {
            m.get(key).and_then(|x| x.as_u64()).or_else(|| m.values().find_map(|x| find_u64(x, key)))
        }
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_u64(x, key)),
        _ => None,
    }
}

/// A table of the test's own in nftables (inet family), deleted when dropped.
struct NftTable {
    nft: std::path::PathBuf,
    name: String,
}

impl NftTable {
    /// Creates `speedmimi_test_<kind>_<pid><suffix>` with `body` (chains, counters) inside.
    fn create(kind: &str, suffix: &str, body: &str) -> Result<NftTable, String> {
        let nft = support::lab::program("nft", "nftables")?;
        let name = format!("speedmimi_test_{kind}_{}{suffix}", std::process::id());
        let table = NftTable { nft, name };
        table.run(&["-f", "-"], Some(&format!("table inet {} {{\n{body}}}\n", table.name)))?;
        Ok(table)
    }

    fn run(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        support::lab::run_fed(std::process::Command::new(&self.nft).args(args), input)
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        if let Err(e) = self.run(&["delete", "table", "inet", &self.name], None) {
            eprintln!("removing nftables table {}: {e}", self.name);
        }
    }
}

/// An nftables table in this (the host's) namespace dropping `percent`% of the TCP packets to
/// and from one loopback port as they arrive; removed on drop, also when the test fails.
struct Loss(NftTable);

impl Loss {
    fn install(port: u16, percent: u32) -> Result<Loss, String> {
        let body = format!(
            "  counter dropped {{ }}\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    iif lo tcp sport {port} numgen random mod 100 < {percent} counter name dropped drop\n    iif lo tcp dport {port} numgen random mod 100 < {percent} counter name dropped drop\n  }}\n"
        );
        NftTable::create("loss", &format!("_{port}"), &body).map(Loss)
    }

    /// Packets dropped so far.
    fn dropped(&self) -> u64 {
        let out = self.0.run(&["list", "counter", "inet", &self.0.name, "dropped"], None).unwrap_or_default();
        out.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
    }
}

/// nftables chains that drop chosen packets on loopback while closed: one chain per name.
struct Gate(NftTable);

impl Gate {
    const CHAINS: [&str; 2] = ["acks", "data"];

    fn install() -> Result<Gate, String> {
        let chains: String = Self::CHAINS
            .iter()
            .map(|c| format!("  chain {c} {{\n    type filter hook input priority 0; policy accept;\n  }}\n"))
            .collect();
        NftTable::create("gate", "", &chains).map(Gate)
    }

    /// Drops loopback packets matching `matches` (nft syntax) until `open(chain)`.
    fn close(&self, chain: &str, matches: &str) -> Result<(), String> {
        let rule = format!("add rule inet {} {chain} iif lo {matches} drop", self.0.name);
        self.0.run(&["-f", "-"], Some(&rule)).map(drop)
    }

    fn open(&self, chain: &str) -> Result<(), String> {
        self.0.run(&["flush", "chain", "inet", &self.0.name, chain], None).map(drop)
    }
}
