//! `cargo xtask bench-peer open-loop`: latency at a fixed request rate, measured from the time
//! each request was due rather than sent, so a slow answer also counts against the requests
//! queued behind it (free of coordinated omission, as wrk2 measures; Debian has no wrk2).
//! Requests fall due at even intervals; each goes out on the first free one of `connections`
//! keep-alive HTTP/1.1 connections (or a new connection per request with `--close`), at once if
//! it is already late. One thread and one epoll set, woken with nanosecond timeouts
//! (epoll_pwait2): a thread per connection cost six times wrk's CPU per request and starved the
//! backend sharing the load core. HTTP/1.1 is spoken by hand: the answers are Content-Length framed.
//! A request unanswered `--timeout-ms` after it fell due is counted as timed out and its
//! connection replaced; non-2xx answers, broken connections and timeouts are counted apart.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A run this far past its end gives up on what is left (counted as timed out).
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often requests in flight are checked against `--timeout-ms`.
const TIMEOUT_SCAN: Duration = Duration::from_millis(10);
/// The most requests one run schedules (the latencies are kept to sort them).
const MAX_REQUESTS: u64 = 5_000_000;
/// Longest response head accepted.
const MAX_HEAD: usize = 64 << 10;

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
    /// A request unanswered this long after it fell due counts as timed out.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// What the run saw.
#[derive(Default)]
struct Tally {
    /// Due-to-complete times of the 2xx answers, in nanoseconds.
    latencies: Vec<u64>,
    non_2xx: u64,
    errors: u64,
    timeouts: u64,
}

/// What one run saw, as its result line reports it: `latency <p50 µs> <p99 µs> <p99.9 µs>
/// requests <n> non2xx <n> errors <n> timeouts <n>`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// p50, p99 and p99.9 of the 2xx answers in ms, from each request's due time.
    pub latency: [f64; 3],
    /// 2xx answers.
    pub ok: u64,
    pub non_2xx: u64,
    /// Connections that failed: refused, reset, closed before the end of the answer, or unreadable.
    pub broken: u64,
    /// Requests unanswered `--timeout-ms` after they fell due, or never sent.
    pub timeouts: u64,
}

impl Outcome {
    /// Requests the client did not get a 2xx answer to.
    pub fn errors(&self) -> u64 {
        self.non_2xx + self.broken + self.timeouts
    }

    fn line(&self) -> String {
        let [p50, p99, p999] = self.latency.map(|ms| ms * 1e3);
        format!(
            "latency {p50:.1} {p99:.1} {p999:.1} requests {} non2xx {} errors {} timeouts {}",
            self.ok, self.non_2xx, self.broken, self.timeouts
        )
    }

    /// Reads the result line out of the peer's output.
    pub fn parse(text: &str) -> Option<Outcome> {
        let f: Vec<&str> = text.lines().find_map(|l| l.strip_prefix("latency "))?.split_whitespace().collect();
        let [p50, p99, p999, "requests", ok, "non2xx", non_2xx, "errors", broken, "timeouts", timeouts] = f[..] else {
            return None;
        };
        let ms = |v: &str| v.parse::<f64>().ok().map(|us| us / 1e3);
        Some(Outcome {
            latency: [ms(p50)?, ms(p99)?, ms(p999)?],
            ok: ok.parse().ok()?,
            non_2xx: non_2xx.parse().ok()?,
            broken: broken.parse().ok()?,
            timeouts: timeouts.parse().ok()?,
        })
    }
}

/// Runs the load and prints its [`Outcome`] line.
pub fn run(load: &Load) -> anyhow::Result<()> {
    if load.rate == 0 || load.seconds == 0 || load.connections == 0 {
        bail!("--rate, --seconds and --connections must all be at least 1");
    }
    // Wake within a microsecond of the due time (the default slack is 50 µs).
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and changes only this thread's slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let total = (load.rate * load.seconds).min(MAX_REQUESTS);
    let request = request(load);
    let epoll = Epoll::new().context("epoll_create1")?;
    let mut conns: Vec<Conn> = (0..load.connections).map(|_| Conn::default()).collect();
    if !load.close {
        // Keep-alive connections are opened ahead, so only `--close` times connecting.
        for (i, c) in conns.iter_mut().enumerate() {
            c.open(load.port, &epoll, i)?;
        }
    }
    let mut idle: Vec<usize> = (0..conns.len()).rev().collect();
    let start = Instant::now() + Duration::from_millis(20);
    let interval_ns = 1e9 / load.rate as f64;
    let due = |i: u64| start + Duration::from_nanos((i as f64 * interval_ns) as u64);
    let give_up = start + Duration::from_secs(2 * load.seconds) + IO_TIMEOUT;
    let timeout = Duration::from_millis(load.timeout_ms.max(1));
    let mut next_scan = start;
    let mut tally = Tally { latencies: Vec::with_capacity(total as usize), ..Tally::default() };
    let (mut next, mut in_flight) = (0u64, 0u64);
    let mut buf = vec![0u8; 256 << 10];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        let now = Instant::now();
        while next < total && due(next) <= now {
            let Some(i) = idle.pop() else { break };
            match conns[i].send(load.port, &epoll, i, &request, due(next)) {
                Ok(()) => in_flight += 1,
                Err(e) => {
                    tally.error(&e);
                    conns[i] = Conn::default();
                    idle.push(i);
                }
            }
            next += 1;
        }
        if now >= next_scan {
            next_scan = now + TIMEOUT_SCAN;
            for (i, c) in conns.iter_mut().enumerate() {
                if c.due.is_some_and(|d| now >= d + timeout) {
                    // Closing the socket takes it out of the epoll set.
                    *c = Conn::default();
                    tally.timeouts += 1;
                    in_flight -= 1;
                    idle.push(i);
                }
            }
        }
        if next == total && in_flight == 0 {
            break;
        }
        if now > give_up {
            tally.timeouts += total - next + in_flight;
            break;
        }
        // Until the next request falls due (when a connection is free to send it), an answer comes
        // or it is time to look for requests that timed out.
        let wait = if next < total && !idle.is_empty() { due(next) - now.min(due(next)) } else { TIMEOUT_SCAN };
        let wait = wait.min(TIMEOUT_SCAN);
        let ready = epoll.wait(&mut events, wait)?;
        for ev in &events[..ready] {
            let i = ev.u64 as usize;
            if conns[i].due.is_none() {
                // An idle connection the server closed (or wrote to unasked): replaced at its next send.
                conns[i] = Conn::default();
                continue;
            }
            match conns[i].on_readable(&mut buf) {
                Ok(None) => continue,
                Ok(Some((status, latency))) => {
                    if (200..300).contains(&status) {
                        tally.latencies.push(latency.as_nanos() as u64);
                    } else {
                        tally.non_2xx += 1;
                    }
                    if load.close || !conns[i].keep {
                        conns[i] = Conn::default();
                    }
                }
                Err(e) => {
                    tally.error(&e);
                    conns[i] = Conn::default();
                }
            }
            in_flight -= 1;
            idle.push(i);
        }
    }
    let mut all = tally.latencies;
    all.sort_unstable();
    let ms = |q: f64| percentile(&all, q) as f64 / 1e6;
    let outcome = Outcome {
        latency: [ms(0.50), ms(0.99), ms(0.999)],
        ok: all.len() as u64,
        non_2xx: tally.non_2xx,
        broken: tally.errors,
        timeouts: tally.timeouts,
    };
    println!("{}", outcome.line());
    Ok(())
}

impl Tally {
    fn error(&mut self, e: &anyhow::Error) {
        if self.errors == 0 {
            eprintln!("open-loop: {e:#}");
        }
        self.errors += 1;
    }
}

/// The value at quantile `q` of sorted `v` (nearest rank); 0 when empty.
pub(crate) fn percentile(v: &[u64], q: f64) -> u64 {
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

/// One connection and the exchange in flight on it.
#[derive(Default)]
struct Conn {
    stream: Option<TcpStream>,
    /// When the request in flight fell due.
    due: Option<Instant>,
    /// The response head read so far.
    head: Vec<u8>,
    /// Once the head is read: its status and the body bytes still to come.
    body: Option<(u16, usize)>,
    /// Whether the last answer allows another request on the connection.
    keep: bool,
}

impl Conn {
    fn open(&mut self, port: u16, epoll: &Epoll, token: usize) -> anyhow::Result<()> {
        // On loopback a blocking connect returns at once.
        let s = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connect to {port}"))?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        epoll.add(s.as_raw_fd(), token).context("epoll_ctl")?;
        self.stream = Some(s);
        Ok(())
    }

    fn send(&mut self, port: u16, epoll: &Epoll, token: usize, request: &[u8], due: Instant) -> anyhow::Result<()> {
        if self.stream.is_none() {
            self.open(port, epoll, token)?;
        }
        let s = self.stream.as_mut().expect("opened above");
        // An idle socket's send buffer takes a whole request.
        let n = s.write(request).context("send")?;
        if n < request.len() {
            bail!("sent {n} of {} request bytes", request.len());
        }
        self.due = Some(due);
        Ok(())
    }

    /// Reads what arrived; the status and due-to-now time once the answer is complete.
    fn on_readable(&mut self, buf: &mut [u8]) -> anyhow::Result<Option<(u16, Duration)>> {
        let s = self.stream.as_mut().context("an event on a closed connection")?;
        let n = match s.read(buf) {
            Ok(0) => bail!("closed before the end of the answer"),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e).context("read"),
        };
        let (status, left) = match self.body {
            Some((status, left)) => (status, left.checked_sub(n).context("bytes beyond the response body")?),
            None => {
                let from = self.head.len().saturating_sub(3);
                self.head.extend_from_slice(&buf[..n]);
                let Some(p) = self.head[from..].windows(4).position(|w| w == b"\r\n\r\n") else {
                    if self.head.len() > MAX_HEAD {
                        bail!("response head longer than {MAX_HEAD} bytes");
                    }
                    return Ok(None);
                };
                let end = from + p + 4;
                let (status, length, keep) = parse_head(&self.head[..end])?;
                self.keep = keep;
                let left = length.checked_sub(self.head.len() - end).context("bytes beyond the response body")?;
                self.head.clear();
                (status, left)
            }
        };
        if left > 0 {
            self.body = Some((status, left));
            return Ok(None);
        }
        self.body = None;
        let due = self.due.take().context("an answer to no request")?;
        Ok(Some((status, due.elapsed())))
    }
}

/// Status, Content-Length and whether the connection stays open.
fn parse_head(head: &[u8]) -> anyhow::Result<(u16, usize, bool)> {
    let head = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let status = head.get(9..12).and_then(|c| c.parse().ok()).with_context(|| format!("bad status line: {head}"))?;
    let header = |name: &str| {
        head.lines().skip(1).filter_map(|l| l.split_once(':')).find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
    };
    let length = header("content-length")
        .and_then(|(_, v)| v.trim().parse().ok())
        .with_context(|| format!("no Content-Length: {head}"))?;
    let keep = !header("connection").is_some_and(|(_, v)| v.trim().eq_ignore_ascii_case("close"));
    Ok((status, length, keep))
}

/// An epoll set of readable sockets, each known by a token.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes a flag and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for reading; closing the socket removes it.
    fn add(&self, fd: RawFd, token: usize) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token as u64 };
        // SAFETY: both descriptors are open and `ev` lives across the call.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` (to the nanosecond: epoll_pwait2) and returns how many `events` are filled.
    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos().into() };
        // SAFETY: `events` is writable for its length, `ts` lives across the call, and a null
        // signal mask leaves the mask alone.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                &ts as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::{Outcome, percentile};

    #[test]
    fn the_result_line_reads_back() {
        let o = Outcome { latency: [0.25, 12.5, 301.0], ok: 9000, non_2xx: 3, broken: 2, timeouts: 1 };
        assert_eq!(Outcome::parse(&format!("noise\n{}\n", o.line())), Some(o));
        assert_eq!(o.errors(), 6);
        assert_eq!(Outcome::parse("latency 1 2 3 requests 4 non2xx 5 errors 6\n"), None);
    }

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
