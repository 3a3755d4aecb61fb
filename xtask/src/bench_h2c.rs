//! The h2c instrument of `cargo xtask bench http`: h2load (nghttp2-client) pinned to the load
//! core, speaking prior-knowledge cleartext HTTP/2 to the path under test, closed loop (`-D`) for
//! throughput and at a fixed rate (`--rps`) for latency. Latency percentiles come from h2load's
//! per-request log (`--log-file`), each request timed from when h2load sent it. A run with any
//! failed, errored or timed-out stream or any non-2xx answer fails, as wrk's runs do.

use std::{fs, io, path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::{
    bench::LOAD_CORE,
    bench_probe::{Case, Run},
    open_loop::percentile,
    workspace,
};

/// Concurrent streams per h2load connection. A run keeps as many requests in flight as wrk's
/// connections do in the HTTP/1.1 cases (`--connections`), over a fifth as many connections: the
/// proxies' upstream side then sees the load it sees in the 13-byte HTTP/1.1 case (and stays
/// within nginx's 128 idle upstream connections), so the two rows differ by the client protocol.
const STREAMS: u32 = 5;

/// h2load connections for `in_flight` concurrent requests.
fn clients(in_flight: u32) -> u32 {
    in_flight.div_ceil(STREAMS).max(1)
}

/// What one h2load run reported.
#[derive(Debug, PartialEq)]
struct Summary {
    rps: f64,
    succeeded: u64,
    /// Failed, errored and timed-out streams.
    errors: u64,
    /// 3xx, 4xx and 5xx answers.
    non_2xx: u64,
}

/// Closed loop: `in_flight` concurrent requests for `seconds`; throughput and p50, p99, p99.9.
pub fn h2load(case: &Case, port: u16, seconds: u64, in_flight: u32) -> anyhow::Result<Run> {
    let (summary, latency) = run(case, port, seconds, in_flight, None)?;
    Ok(Run { rps: summary.rps, requests: summary.succeeded, latency })
}

/// h2load at `rate` requests/s in all (`--rps` per connection) over `in_flight` streams: p50, p99
/// and p99.9 in ms. h2load times each request from its send, not from when it fell due: a request
/// waiting for a free stream is not charged the wait (unlike the open-loop peer's HTTP/1.1 rows).
pub fn fixed_rate(case: &Case, port: u16, rate: u64, seconds: u64, in_flight: u32) -> anyhow::Result<[f64; 3]> {
    let (summary, latency) = run(case, port, seconds, in_flight, Some(rate))?;
    let due = rate * seconds;
    if (summary.succeeded as f64) < 0.95 * due as f64 {
        println!(
            "bench: h2load completed {} of the {due} requests due at {rate} req/s on port {port}",
            summary.succeeded
        );
    }
    Ok(latency)
}

/// The report's paragraph on how the h2c case is measured, with `in_flight` requests in flight in
/// the closed-loop runs and `fixed_in_flight` at the fixed rate.
pub fn method(in_flight: u32, fixed_in_flight: u32) -> String {
    format!(
        "The h2c case: {load} (prior-knowledge cleartext HTTP/2 to the proxy, {in_flight} requests in flight as in \
         wrk's cases; SpeedMimi on its HTTP listener, HAProxy `bind ... proto h2`, nginx `listen ... http2`, \
         direct: the demo backend's own h2c), each proxy HTTP/1.1 keep-alive to the backend; its latency columns \
         are percentiles of h2load's per-request log (`--log-file`), from each request's send. Its fixed rate is \
         h2load `--rps` with {fixed}, latency from each request's send, not its due time: a request waiting for a \
         free stream is not charged the wait. Its allocations are counted over an h2load run.",
        load = command_line(in_flight),
        fixed = command_line(fixed_in_flight),
    )
}

fn command_line(in_flight: u32) -> String {
    format!("h2load -t1 -c{} -m{STREAMS}", clients(in_flight))
}

fn run(case: &Case, port: u16, seconds: u64, in_flight: u32, rate: Option<u64>) -> anyhow::Result<(Summary, [f64; 3])> {
    if case.body > 0 || case.close {
        bail!("the h2c case sends GETs on kept connections only");
    }
    let clients = clients(in_flight);
    let log = log_path();
    // h2load appends to its log: a file left by the run before would mix that run's requests in.
    match fs::remove_file(&log) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e).context(format!("remove {}", log.display())),
        _ => {}
    }
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", LOAD_CORE, "h2load", "-t1"])
        .args(["-c", &clients.to_string(), "-m", &STREAMS.to_string(), "-D", &seconds.to_string()])
        .arg(format!("--log-file={}", log.display()));
    if let Some(rate) = rate {
        cmd.arg(format!("--rps={:.3}", rate as f64 / f64::from(clients)));
    }
    let out = cmd.arg(format!("http://127.0.0.1:{port}{}", case.path)).output().context("run h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("h2load failed against port {port}: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let summary = parse_summary(&text).with_context(|| format!("against port {port}"))?;
    if summary.errors > 0 || summary.non_2xx > 0 {
        bail!(
            "h2load saw {} failed, errored or timed-out streams and {} non-2xx answers against port {port}:\n{text}",
            summary.errors,
            summary.non_2xx
        );
    }
    let rows = fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
    let (logged, latency) = latencies(&rows)?;
    // One row per finished request: more or fewer than h2load counted means the log is not this run's.
    if logged.abs_diff(summary.succeeded) > u64::from(in_flight) {
        bail!("{} has {logged} 2xx rows for {} succeeded requests", log.display(), summary.succeeded);
    }
    Ok((summary, latency))
}

fn log_path() -> PathBuf {
    workspace::target_dir().join("bench").join("h2load-requests.tsv")
}

fn parse_summary(text: &str) -> anyhow::Result<Summary> {
    if !text.lines().any(|l| l.trim() == "Application protocol: h2c") {
        bail!("h2load did not speak h2c:\n{text}");
    }
    // `finished in 2.00s, 1537.50 req/s, 196.89KB/s`
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1)?.strip_suffix(" req/s")?.parse().ok())
        .with_context(|| format!("no req/s in h2load's output:\n{text}"))?;
    // `requests: 3075 total, 3125 started, 3075 done, 3075 succeeded, 0 failed, 0 errored, 0 timeout`
    let requests = counts(text, "requests:")?;
    // `status codes: 3075 2xx, 0 3xx, 0 4xx, 0 5xx`
    let status = counts(text, "status codes:")?;
    let get = |counts: &[(u64, &str)], label: &str| {
        counts
            .iter()
            .find(|(_, l)| *l == label)
            .map(|(n, _)| *n)
            .with_context(|| format!("no `{label}` count:\n{text}"))
    };
    Ok(Summary {
        rps,
        succeeded: get(&requests, "succeeded")?,
        errors: get(&requests, "failed")? + get(&requests, "errored")? + get(&requests, "timeout")?,
        non_2xx: get(&status, "3xx")? + get(&status, "4xx")? + get(&status, "5xx")?,
    })
}

/// The `<n> <label>` pairs of the line starting with `prefix`.
fn counts<'a>(text: &'a str, prefix: &str) -> anyhow::Result<Vec<(u64, &'a str)>> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .with_context(|| format!("no `{prefix}` line in h2load's output:\n{text}"))?;
    line.split(',')
        .map(|pair| {
            let (n, label) = pair.trim().split_once(' ').with_context(|| format!("bad count {pair:?}"))?;
            Ok((n.parse().with_context(|| format!("bad count {pair:?}"))?, label))
        })
        .collect()
}

/// How many 2xx rows a log has and their p50, p99 and p99.9 in ms (`<start µs>\t<status>\t<µs to the end of
/// the response>`, status -1 for a failed stream).
fn latencies(log: &str) -> anyhow::Result<(u64, [f64; 3])> {
    let mut us: Vec<u64> = log
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t').skip(1);
            let status: i32 = f.next()?.parse().ok()?;
            (200..300).contains(&status).then(|| f.next()?.parse().ok())?
        })
        .collect();
    if us.is_empty() {
        bail!("h2load logged no 2xx request");
    }
    us.sort_unstable();
    Ok((us.len() as u64, [0.50, 0.99, 0.999].map(|q| percentile(&us, q) as f64 / 1e3)))
}

#[cfg(test)]
mod tests {
    use super::{Summary, latencies, parse_summary};

    const OUT: &str = "starting benchmark...\nApplication protocol: h2c\n\
        finished in 2.00s, 1537.50 req/s, 196.89KB/s\n\
        requests: 3075 total, 3125 started, 3075 done, 3075 succeeded, 0 failed, 0 errored, 0 timeout\n\
        status codes: 3076 2xx, 0 3xx, 0 4xx, 0 5xx\n";

    #[test]
    fn summary_of_a_clean_run() {
        let s = parse_summary(OUT).unwrap();
        assert_eq!(s, Summary { rps: 1537.5, succeeded: 3075, errors: 0, non_2xx: 0 });
    }

    #[test]
    fn failures_and_non_2xx_are_counted() {
        let out = OUT
            .replace("0 failed, 0 errored, 0 timeout", "2 failed, 1 errored, 4 timeout")
            .replace("0 4xx, 0 5xx", "3 4xx, 5 5xx");
        let s = parse_summary(&out).unwrap();
        assert_eq!((s.errors, s.non_2xx), (7, 8));
    }

    #[test]
    fn a_run_not_over_h2c_or_without_a_summary_fails() {
        assert!(parse_summary(&OUT.replace("h2c", "http/1.1")).is_err());
        assert!(parse_summary(OUT.split("requests:").next().unwrap()).is_err());
    }

    #[test]
    fn percentiles_of_the_2xx_rows() {
        let mut log: String = (1..=1000).map(|i| format!("17966{i}\t200\t{}\n", i * 1000)).collect();
        log.push_str("1796700\t-1\t999999999\n1796701\t503\t999999999\n");
        assert_eq!(latencies(&log).unwrap(), (1000, [500.0, 990.0, 999.0]));
        assert!(latencies("1796700\t-1\t5\n").is_err());
    }
}
