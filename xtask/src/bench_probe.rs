//! The instruments of `cargo xtask bench http`: wrk driven by a Lua script per case (method,
//! body, headers, and the latency percentiles it prints when done), or h2load for the h2c case
//! (`bench_h2c`), perf counting the proxy's syscalls beside either, SpeedMimi's allocation
//! counter, and the open-loop peer for latency at a fixed rate. Each returns numbers or fails on
//! any non-2xx answer or socket error.

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, bail};

use crate::{bench::LOAD_CORE, bench_h2c, open_loop::Outcome};

/// Keep-alive connections of the fixed-rate load (requests in flight at most, for h2c).
pub const FIXED_RATE_CONNECTIONS: u32 = 50;

/// One request shape, run against every path.
pub struct Case {
    /// Table heading.
    pub title: &'static str,
    /// File-name stem of its wrk script.
    pub key: &'static str,
    /// Request target on the demo backend.
    pub path: &'static str,
    /// Bytes of a POST body; 0: GET.
    pub body: usize,
    /// `Connection: close` on every request: a new connection per request.
    pub close: bool,
    /// Prior-knowledge h2c from the client (h2load) instead of HTTP/1.1 (wrk).
    pub h2c: bool,
}

/// What wrk or h2load measured.
pub struct Run {
    pub rps: f64,
    pub requests: u64,
    /// p50, p99 and p99.9 in ms (closed loop: wrk's own schedule).
    pub latency: [f64; 3],
}

/// Writes the case's wrk script into `dir` and returns its path.
pub fn write_script(dir: &Path, case: &Case) -> anyhow::Result<PathBuf> {
    let mut lua = String::new();
    if case.body > 0 {
        lua.push_str(&format!(
            "wrk.method = \"POST\"\nwrk.body = string.rep(\"p\", {})\nwrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n",
            case.body
        ));
    }
    if case.close {
        lua.push_str("wrk.headers[\"Connection\"] = \"close\"\n");
    }
    lua.push_str(
        "done = function(summary, latency, requests)\n  io.write(string.format(\"bench: requests %d p50 %.1f p99 %.1f p999 %.1f\\n\", summary.requests,\n    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))\nend\n",
    );
    let path = dir.join(format!("wrk-{}.lua", case.key));
    fs::write(&path, lua).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// The case's load for `seconds` with `connections` requests in flight: wrk with its script, or
/// h2load for the h2c case (the script unused).
pub fn load(script: &Path, case: &Case, port: u16, seconds: u64, connections: u32) -> anyhow::Result<Run> {
    if case.h2c {
        return bench_h2c::h2load(case, port, seconds, connections);
    }
    wrk(script, case, port, seconds, connections)
}

/// wrk pinned to the load core, one thread, `connections` connections, for `seconds`.
fn wrk(script: &Path, case: &Case, port: u16, seconds: u64, connections: u32) -> anyhow::Result<Run> {
    let child = Command::new("taskset")
        .args(["-c", LOAD_CORE, "wrk", "-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "-s"])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}{}", case.path))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run wrk")?;
    wrk_result(child.wait_with_output().context("wait for wrk")?, port)
}

/// [`load`] with perf counting the syscalls of `pids` over its middle: the run and syscalls per
/// request (None when `pids` is empty).
pub fn load_with_syscalls(
    script: &Path,
    case: &Case,
    port: u16,
    seconds: u64,
    connections: u32,
    pids: &[u32],
) -> anyhow::Result<(Run, Option<f64>)> {
    if pids.is_empty() {
        return Ok((load(script, case, port, seconds, connections)?, None));
    }
    // perf counts over the middle of the run, clear of the load's start and end.
    let lead = (seconds as f64 * 0.2).min(0.5);
    let window = seconds as f64 - 2.0 * lead;
    let measured = thread::scope(|s| {
        let run = s.spawn(|| load(script, case, port, seconds, connections));
        thread::sleep(Duration::from_secs_f64(lead));
        let syscalls = syscalls(pids, window);
        (run.join().expect("the load thread panicked"), syscalls)
    });
    let (run, syscalls) = (measured.0?, measured.1?);
    let per_request = syscalls as f64 / (run.rps * window);
    Ok((run, Some(per_request)))
}

fn wrk_result(out: Output, port: u16) -> anyhow::Result<Run> {
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("against port {port}"))
}

fn parse_wrk(text: &str) -> anyhow::Result<Run> {
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    // `bench: requests N p50 µs p99 µs p999 µs`, from the script's done().
    let done: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("bench: "))
        .map(|l| l.split_whitespace().skip(1).step_by(2).filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    let [requests, p50, p99, p999] = done[..] else { bail!("no summary line from the wrk script:\n{text}") };
    Ok(Run { rps, requests: requests as u64, latency: [p50 / 1e3, p99 / 1e3, p999 / 1e3] })
}

/// Syscalls the processes `pids` (all their threads) enter during `window` seconds.
fn syscalls(pids: &[u32], window: f64) -> anyhow::Result<u64> {
    let list = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = Command::new("perf")
        .args(["stat", "-e", "raw_syscalls:sys_enter", "-x", ",", "-p", &list, "--", "sleep"])
        .arg(format!("{window:.3}"))
        .stdout(Stdio::null())
        .output()
        .context("run perf stat")?;
    let text = String::from_utf8_lossy(&out.stderr);
    // A process that never ran in the window reads `<not counted>`.
    text.lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| match l.split(',').next()?.trim() {
            "<not counted>" => Some(0),
            n => n.parse().ok(),
        })
        .with_context(|| format!("no syscall count from perf stat ({}):\n{text}", out.status))
}

/// A metric from SpeedMimi's `/metrics` on the admin `port`, summed over its label sets (None
/// when absent).
pub fn admin_metric(port: u16, name: &str) -> anyhow::Result<Option<u64>> {
    let text = http_get(port, "/metrics")?;
    let values: Vec<u64> = text
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    Ok((!values.is_empty()).then(|| values.iter().sum()))
}

/// GET `path` from 127.0.0.1:`port` on a connection of its own: the whole answer, head and body.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("connect to {port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text).with_context(|| format!("read {path} from {port}"))?;
    Ok(text)
}

/// Heap allocations SpeedMimi (a `count-allocs` build, admin API on `admin`) makes per request
/// of a `seconds`-long run of the case's load, less what reading the counter itself costs.
pub fn allocations_per_request(
    script: &Path,
    case: &Case,
    port: u16,
    admin: u16,
    seconds: u64,
    connections: u32,
) -> anyhow::Result<f64> {
    let read = || {
        admin_metric(admin, "speedmimi_allocations_total")?
            .context("no speedmimi_allocations_total in /metrics: not a count-allocs build?")
    };
    let (a, b) = (read()?, read()?);
    let run = load(script, case, port, seconds, connections)?;
    let c = read()?;
    let allocations = (c - b).saturating_sub(b - a);
    Ok(allocations as f64 / run.requests.max(1) as f64)
}

/// The open-loop peer pinned to the load core at `rate` requests/s (h2load `--rps` for the h2c
/// case): p50, p99 and p99.9 in ms.
pub fn fixed_rate(exe: &Path, case: &Case, port: u16, rate: u64, seconds: u64) -> anyhow::Result<[f64; 3]> {
    if case.h2c {
        return bench_h2c::fixed_rate(case, port, rate, seconds, FIXED_RATE_CONNECTIONS);
    }
    let mut args = vec!["--port".to_owned(), port.to_string(), "--path".into(), case.path.into()];
    args.extend(["--rate".into(), rate.to_string(), "--seconds".into(), seconds.to_string()]);
    args.extend(["--body".into(), case.body.to_string()]);
    args.extend(["--connections".into(), FIXED_RATE_CONNECTIONS.to_string()]);
    if case.close {
        args.push("--close".into());
    }
    let (outcome, text) = open_loop(exe, &args)?;
    if outcome.errors() > 0 {
        bail!("the open-loop peer saw errors against port {port}: {text}");
    }
    Ok(outcome.latency)
}

/// The open-loop peer (`bench-peer open-loop <args>`, see `open_loop`) pinned to the load core:
/// what it saw, and its output for messages.
pub fn open_loop(exe: &Path, args: &[String]) -> anyhow::Result<(Outcome, String)> {
    let out = Command::new("taskset")
        .args(["-c", LOAD_CORE])
        .arg(exe)
        .args(["bench-peer", "open-loop"])
        .args(args)
        .output()
        .context("run the open-loop peer")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("the open-loop peer failed: {text}");
    }
    let outcome = Outcome::parse(&text).with_context(|| format!("no result line from the open-loop peer:\n{text}"))?;
    Ok((outcome, text))
}

#[cfg(test)]
mod tests {
    use super::parse_wrk;

    const OUT: &str = "Running 1s test @ http://127.0.0.1:18080/bytes?n=13\n  1 threads and 2 connections\n  \
        15297 requests in 1.10s, 2.22MB read\nRequests/sec:  13946.26\nTransfer/sec:      2.02MB\n\
        bench: requests 15297 p50 76.0 p99 438.5 p999 5430.0\n";

    #[test]
    fn wrk_output_with_the_script_summary() {
        let run = parse_wrk(OUT).unwrap();
        assert_eq!(run.rps, 13946.26);
        assert_eq!(run.requests, 15297);
        assert_eq!(run.latency, [0.076, 0.4385, 5.43]);
    }

    #[test]
    fn errors_or_a_missing_summary_fail() {
        assert!(parse_wrk(&format!("{OUT}  Non-2xx or 3xx responses: 3\n")).is_err());
        assert!(parse_wrk(&format!("{OUT}  Socket errors: connect 0, read 1, write 0, timeout 0\n")).is_err());
        assert!(parse_wrk(OUT.split("bench:").next().unwrap()).is_err());
    }
}
