//! `cargo xtask bench-peer open-loop`: latency at a fixed request rate, measured from the time
//! each request was due rather than sent, so a slow answer also counts against the requests
//! queued behind it (free of coordinated omission, as wrk2 measures; Debian has no wrk2).
//! Requests fall due at even intervals and are dealt round-robin to `connections` threads, each
//! holding one keep-alive HTTP/1.1 connection (or a new one per request with `--close`); a thread
//! behind schedule sends at once. HTTP/1.1 is spoken by hand: the answers are Content-Length framed.

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Bounds every socket operation; a request that takes longer counts as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The most requests one run schedules (the latencies are kept to sort them).
const MAX_REQUESTS: u64 = 5_000_000;

/// What to send, how often and for how long.
#[derive(Debug, clap::Args)]
pub struct Load {
    #[arg(long)]
    pub port: u16,
    /// Request target, such as `/bytes?n=13`.
    #[arg(long)]
    pub path: String,
    /// Requests per second.
    #[arg(long)]
    pub rate: u64,
    #[arg(long)]
    pub seconds: u64,
    #[arg(long, default_value_t = 50)]
    pub connections: u64,
    /// Bytes of a POST body; 0 sends GETs.
    #[arg(long, default_value_t = 0)]
    pub body: usize,
    /// `Connection: close`: a new connection per request.
    #[arg(long)]
    pub close: bool,
}

/// What one client thread saw.
#[derive(Default)]
struct Tally {
    /// Due-to-complete times of the 2xx answers, in nanoseconds.
    latencies: Vec<u64>,
    non_2xx: u64,
    errors: u64,
}

/// Runs the load; prints `latency <p50 µs> <p99 µs> <p99.9 µs> requests <n> non2xx <n> errors <n>`.
pub fn run(load: &Load) -> anyhow::Result<()> {
    if load.rate == 0 || load.seconds == 0 || load.connections == 0 {
        bail!("--rate, --seconds and --connections must all be at least 1");
    }
    let total = (load.rate * load.seconds).min(MAX_REQUESTS);
    let request = request(load);
    // Time for every thread to start and connect before the first request falls due.
    let start = Instant::now() + Duration::from_millis(200);
    let tallies: Vec<Tally> = thread::scope(|s| {
        let clients: Vec<_> = (0..load.connections.min(total))
            .map(|k| {
                let request = &request;
                thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(s, move || client(load, request, start, k, total))
                    .expect("spawn a client thread")
            })
            .collect();
        clients.into_iter().map(|c| c.join().expect("a client thread panicked")).collect()
    });
    let mut all: Vec<u64> = tallies.iter().flat_map(|t| t.latencies.iter().copied()).collect();
    all.sort_unstable();
    let non_2xx: u64 = tallies.iter().map(|t| t.non_2xx).sum();
    let errors: u64 = tallies.iter().map(|t| t.errors).sum();
    let us = |q: f64| percentile(&all, q) as f64 / 1e3;
    println!(
        "latency {:.1} {:.1} {:.1} requests {} non2xx {non_2xx} errors {errors}",
        us(0.50),
        us(0.99),
        us(0.999),
        all.len()
    );
    Ok(())
}

/// The value at quantile `q` of sorted `v` (nearest rank); 0 when empty.
fn percentile(v: &[u64], q: f64) -> u64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied().unwrap_or(0)
}

fn request(load: &Load) -> Vec<u8> {
    let method = if load.body > 0 { "POST" } else { "GET" };
    let mut head = format!("{method} {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n", load.path, load.port);
    if load.body > 0 {
        head.push_str(&format!("Content-Type: application/octet-stream\r\nContent-Length: {}\r\n", load.body));
    }
    if load.close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.resize(bytes.len() + load.body, b'p');
    bytes
}

/// Sends requests `k`, `k + connections`, … of `total`, each when due.
fn client(load: &Load, request: &[u8], start: Instant, k: u64, total: u64) -> Tally {
    // Sleep to within a microsecond of the due time (the default slack is 50 µs).
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and changes only this thread's slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let interval_ns = 1e9 / load.rate as f64;
    // Past this, the target has fallen hopelessly behind: the rest count as errors.
    let give_up = start + Duration::from_secs(2 * load.seconds) + IO_TIMEOUT;
    let mut tally =
        Tally { latencies: Vec::with_capacity((total / load.connections + 1) as usize), ..Tally::default() };
    // Keep-alive connections are opened ahead, so only `--close` times connecting.
    let mut conn = if load.close { None } else { connect(load.port).ok() };
    let mut buf = vec![0u8; 64 << 10];
    for i in (k..total).step_by(load.connections as usize) {
        let due = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
        let now = Instant::now();
        if now > give_up {
            tally.errors += (total - i).div_ceil(load.connections);
            break;
        }
        if due > now {
            thread::sleep(due - now);
        }
        match exchange(&mut conn, load.port, request, &mut buf) {
            Ok((status, keep)) => {
                if (200..300).contains(&status) {
                    tally.latencies.push(due.elapsed().as_nanos() as u64);
                } else {
                    tally.non_2xx += 1;
                }
                if load.close || !keep {
                    conn = None;
                }
            }
            Err(e) => {
                if tally.errors == 0 {
                    eprintln!("open-loop: {e:#}");
                }
                tally.errors += 1;
                conn = None;
            }
        }
    }
    tally
}

fn connect(port: u16) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connect to {port}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One request and its answer on `conn` (connecting first when there is none): the status and
/// whether the connection may be reused.
fn exchange(conn: &mut Option<TcpStream>, port: u16, request: &[u8], buf: &mut [u8]) -> anyhow::Result<(u16, bool)> {
    let s = match conn {
        Some(s) => s,
        None => conn.insert(connect(port)?),
    };
    s.write_all(request).context("send")?;
    let mut filled = 0;
    let head_end = loop {
        if filled == buf.len() {
            bail!("response head longer than {} bytes", buf.len());
        }
        let n = s.read(&mut buf[filled..]).context("read the head")?;
        if n == 0 {
            bail!("closed before the response head");
        }
        filled += n;
        if let Some(p) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let status: u16 =
        head.get(9..12).and_then(|c| c.parse().ok()).with_context(|| format!("bad status line: {head}"))?;
    let header = |name: &str| {
        head.lines().skip(1).filter_map(|l| l.split_once(':')).find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
    };
    let length: usize = header("content-length")
        .and_then(|(_, v)| v.trim().parse().ok())
        .with_context(|| format!("no Content-Length: {head}"))?;
    let keep = !header("connection").is_some_and(|(_, v)| v.trim().eq_ignore_ascii_case("close"));
    let mut left = (length + head_end).checked_sub(filled).context("bytes beyond the response body")?;
    while left > 0 {
        let want = left.min(buf.len());
        let n = s.read(&mut buf[..want]).context("read the body")?;
        if n == 0 {
            bail!("closed {left} bytes before the end of the body");
        }
        left -= n;
    }
    Ok((status, keep))
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&[7], 0.999), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
