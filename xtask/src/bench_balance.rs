//! `cargo xtask bench balance`: how each balancer copes with backends that are slow, stall or
//! fail. Per shape, three real origins (`speedmimi demo-backend` processes with their latency and
//! fault knobs): (a) three equal, (b) one 4× slower, (c) one stalling 300 ms every 3 s, (d) one
//! answering 10% of requests 503 and one resetting 2% of them. Rows: SpeedMimi with each balancer,
//! HAProxy `balance leastconn` and nginx `least_conn` each with its own retry options, and direct
//! to a backend with no fault (the floor). Each row takes the open-loop load at a fixed rate
//! (latency from each request's due time); columns: p50, p99, p99.9, each origin's share of the
//! requests that reached an origin (its `/hits`, read directly, not through the proxy) and the
//! errors the client saw. Round r runs every shape, every row; medians over rounds are reported.

use std::{
    fmt::Write as _,
    fs,
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use crate::{
    bench::{self, Guard, LOAD_CORE, PROXY_CORE, median},
    bench_probe,
    open_loop::Outcome,
    workspace,
};

const PROXY_PORT: u16 = 18180;
const ADMIN_PORT: u16 = 18190;
const BACKEND_PORTS: [u16; 3] = [18181, 18182, 18183];
/// A request unanswered this long after it fell due is a client-visible error (a timeout).
const CLIENT_TIMEOUT_MS: u64 = 5000;

/// The faults of the shapes.
const SLOW_FACTOR: u64 = 4;
const STALL_MS: u64 = 300;
const STALL_EVERY_MS: u64 = 3000;
const ERROR_RATE: f64 = 0.10;
const RESET_RATE: f64 = 0.02;

/// SpeedMimi's upstream options (slow start, outlier ejection, retries on statuses: the defaults
/// but for slow start, written out so the report shows them), the one place the bench writes them.
const UPSTREAM_OPTIONS: &str = "upstreams:\n  b:\n    slow_start: 30s\n    outlier_ejection: { consecutive_failures: 5, base_time: 30s, max_ejected_percent: 50 }\n    retries: { statuses: [502, 503, 504], budget_percent: 20, min_per_second: 10 }\n";

/// HAProxy's retry options (added to `defaults`).
const HAPROXY_RETRIES: &str =
    "  retries 2\n  option redispatch 1\n  retry-on conn-failure empty-response response-timeout 502 503 504\n";
/// nginx's retry options (added to the location).
const NGINX_RETRIES: &str =
    "proxy_next_upstream error timeout http_502 http_503 http_504; proxy_next_upstream_tries 2; ";

/// Options of one run.
pub struct Options {
    pub rounds: usize,
    /// Seconds of load per row.
    pub seconds: u64,
    /// Requests per second.
    pub rate: u64,
    /// Every origin's base latency; the slow one's is `SLOW_FACTOR` times it.
    pub delay_ms: u64,
    /// Keep-alive client connections of the load.
    pub connections: u64,
}

/// What one origin of a shape does wrong.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    Slow,
    Stall,
    Errors,
    Resets,
}

impl Fault {
    /// Its `demo-backend` arguments, given the base delay.
    fn args(self, delay_ms: u64) -> Vec<String> {
        let delay = if self == Fault::Slow { delay_ms * SLOW_FACTOR } else { delay_ms };
        let mut args = vec!["--delay-ms".to_owned(), delay.to_string()];
        match self {
            Fault::None | Fault::Slow => {}
            Fault::Stall => {
                args.extend(["--stall-ms".into(), STALL_MS.to_string()]);
                args.extend(["--stall-every-ms".into(), STALL_EVERY_MS.to_string()]);
            }
            Fault::Errors => args.extend(["--error-rate".into(), ERROR_RATE.to_string()]),
            Fault::Resets => args.extend(["--reset-rate".into(), RESET_RATE.to_string()]),
        }
        args
    }
}

struct Shape {
    key: &'static str,
    title: &'static str,
    faults: [Fault; 3],
}

const SHAPES: [Shape; 4] = [
    Shape { key: "a-equal", title: "(a) three equal backends", faults: [Fault::None; 3] },
    Shape { key: "b-slow", title: "(b) b3 answers 4× slower", faults: [Fault::None, Fault::None, Fault::Slow] },
    Shape {
        key: "c-stall",
        title: "(c) b3 stalls 300 ms every 3 s (answers due in a stall wait for its end)",
        faults: [Fault::None, Fault::None, Fault::Stall],
    },
    Shape {
        key: "d-fail",
        title: "(d) b2 answers 10% of requests 503 at once, b3 resets the connection of 2% before any answer byte",
        faults: [Fault::None, Fault::Errors, Fault::Resets],
    },
];

/// What a row's load goes through.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// Straight to b1, the origin with no fault in every shape.
    Direct,
    /// SpeedMimi with this `load_balancer`.
    SpeedMimi(&'static str),
    Haproxy,
    Nginx,
}

const ROWS: [Via; 9] = [
    Via::Direct,
    Via::SpeedMimi("round_robin"),
    Via::SpeedMimi("weight"),
    Via::SpeedMimi("least_connections"),
    Via::SpeedMimi("least_connections_weight"),
    Via::SpeedMimi("ip_hash"),
    Via::SpeedMimi("performance"),
    Via::Haproxy,
    Via::Nginx,
];

impl Via {
    fn name(self) -> String {
        match self {
            Via::Direct => "direct (b1)".into(),
            Via::SpeedMimi(lb) => format!("speedmimi {lb}"),
            Via::Haproxy => "haproxy leastconn".into(),
            Via::Nginx => "nginx least_conn".into(),
        }
    }

    fn port(self) -> u16 {
        if self == Via::Direct { BACKEND_PORTS[0] } else { PROXY_PORT }
    }

    /// Starts the proxy (nothing for the direct path), its output to a log in `dir`.
    fn start(self, bin: &Path, dir: &Path) -> anyhow::Result<Option<Guard>> {
        let core = Some(PROXY_CORE);
        let servers = || BACKEND_PORTS.iter().zip(1..);
        let mut cmd = match self {
            Via::Direct => return Ok(None),
            Via::SpeedMimi(lb) => {
                let config = dir.join("speedmimi.yaml");
                fs::write(&config, speedmimi_config(lb))?;
                bench::speedmimi_command(bin, &config, core)
            }
            Via::Haproxy => {
                let mut backend = "  balance leastconn\n".to_owned();
                for (port, i) in servers() {
                    let _ = writeln!(backend, "  server b{i} 127.0.0.1:{port}");
                }
                bench::haproxy_command(dir, PROXY_PORT, 1, core, HAPROXY_RETRIES, &backend, false)?
            }
            Via::Nginx => {
                let mut upstream = "least_conn;".to_owned();
                for (port, _) in servers() {
                    let _ = write!(upstream, " server 127.0.0.1:{port};");
                }
                bench::nginx_command(dir, PROXY_PORT, 1, core, &upstream, NGINX_RETRIES, false)?
            }
        };
        // Failures are logged per request; they would flood the terminal.
        let log = dir.join("logs").join(format!("{}.log", self.name().replace(' ', "-")));
        let out = fs::OpenOptions::new().create(true).append(true).open(&log)?;
        cmd.stdout(out.try_clone()?).stderr(out);
        let mut child = Guard(cmd.spawn().with_context(|| format!("start {}", self.name()))?);
        workspace::wait_port(PROXY_PORT, &mut child.0)
            .with_context(|| format!("{} did not start (see {})", self.name(), log.display()))?;
        Ok(Some(child))
    }
}

fn speedmimi_config(lb: &str) -> String {
    let mut s = format!(
        "server:\n  host: 127.0.0.1\n  port: {PROXY_PORT}\n  workers: 1\nadmin:\n  host: 127.0.0.1\n  port: {ADMIN_PORT}\nebpf:\n  enabled: false\nrouting:\n  all:\n    path: /\n    upstream: b\n    load_balancer: {lb}\nbackends:\n  b:\n"
    );
    for (port, i) in BACKEND_PORTS.iter().zip(1..) {
        let _ = writeln!(s, "    - id: b{i}\n      host: 127.0.0.1\n      port: {port}");
    }
    s.push_str(UPSTREAM_OPTIONS);
    s
}

/// One row's measurement.
struct Sample {
    outcome: Outcome,
    /// Requests that reached each origin during the load.
    hits: [u64; 3],
}

pub fn balance(opts: &Options) -> anyhow::Result<()> {
    if !workspace::is_root() {
        bail!("the benchmark installs nginx and haproxy with apt and pins processes: run it as root");
    }
    if opts.rounds == 0 || opts.seconds == 0 || opts.rate == 0 || opts.connections == 0 {
        bail!("--rounds, --seconds, --rate and --connections must all be at least 1");
    }
    workspace::ensure_packages(&["nginx", "haproxy"])?;
    let bin = bench::build_release()?;
    let peer = bench::build_peer()?;
    let dir = workspace::target_dir().join("bench-balance");
    let _ = fs::remove_dir_all(dir.join("logs"));
    fs::create_dir_all(dir.join("logs"))?;
    // A process left on a port (a stale backend) would answer in place of ours.
    for port in BACKEND_PORTS.into_iter().chain([PROXY_PORT, ADMIN_PORT]) {
        TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("port {port} is taken (a process left by an earlier run?)"))?;
    }
    let started = Instant::now();
    let minutes = (opts.rounds * SHAPES.len() * ROWS.len()) as f64 * (opts.seconds as f64 + 0.5) / 60.0;
    println!("bench: {} shapes × {} rows × {} round(s), about {minutes:.0} min", SHAPES.len(), ROWS.len(), opts.rounds);

    // Per shape, per row, one sample per round.
    let mut samples: Vec<Vec<Vec<Sample>>> = SHAPES.iter().map(|_| ROWS.iter().map(|_| Vec::new()).collect()).collect();
    for round in 1..=opts.rounds {
        for (shape, per_row) in SHAPES.iter().zip(samples.iter_mut()) {
            // Fresh origins per shape and round: the stall schedule starts with them.
            let _origins = start_origins(&bin, shape, opts)?;
            for (via, rounds) in ROWS.iter().zip(per_row.iter_mut()) {
                let sample = measure(*via, &bin, &peer, &dir, opts)
                    .with_context(|| format!("{} through {}", shape.key, via.name()))?;
                let [p50, p99, p999] = sample.outcome.latency;
                println!(
                    "bench: round {round} {:<8} {:<35} p50 {p50:.2} p99 {p99:.2} p99.9 {p999:.2} ms  shares {}  errors {}",
                    shape.key,
                    via.name(),
                    shares(&sample.hits),
                    sample.outcome.errors()
                );
                rounds.push(sample);
            }
        }
    }

    let text = report(&samples, opts);
    println!("\n{text}");
    let path = dir.join("balance.md");
    fs::write(&path, &text)?;
    println!(
        "bench: {:.0} s; table written to {} (proxy logs in {})",
        started.elapsed().as_secs_f64(),
        path.display(),
        dir.join("logs").display()
    );
    Ok(())
}

/// The shape's three origins, pinned to the load core, listening.
fn start_origins(bin: &Path, shape: &Shape, opts: &Options) -> anyhow::Result<Vec<Guard>> {
    let mut origins = Vec::with_capacity(3);
    for ((port, fault), i) in BACKEND_PORTS.iter().zip(shape.faults).zip(1..) {
        let mut child = Guard(
            Command::new("taskset")
                .args(["-c", LOAD_CORE])
                .arg(bin)
                .args(["demo-backend", "--port", &port.to_string(), "--id", &format!("b{i}")])
                .args(fault.args(opts.delay_ms))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .context("start a demo backend")?,
        );
        workspace::wait_port(*port, &mut child.0)?;
        origins.push(child);
    }
    Ok(origins)
}

/// One row: start its proxy, read the origins' hits, run the load, read them again, stop.
fn measure(via: Via, bin: &Path, peer: &Path, dir: &Path, opts: &Options) -> anyhow::Result<Sample> {
    let _proxy = via.start(bin, dir)?;
    let before = hits()?;
    let mut args = vec!["--port".to_owned(), via.port().to_string(), "--path".into(), "/".into()];
    args.extend(["--rate".into(), opts.rate.to_string(), "--seconds".into(), opts.seconds.to_string()]);
    args.extend(["--connections".into(), opts.connections.to_string()]);
    args.extend(["--timeout-ms".into(), CLIENT_TIMEOUT_MS.to_string()]);
    let (outcome, _) = bench_probe::open_loop(peer, &args)?;
    let after = hits()?;
    Ok(Sample { outcome, hits: std::array::from_fn(|i| after[i].saturating_sub(before[i])) })
}

/// Each origin's `/hits`, asked directly.
fn hits() -> anyhow::Result<[u64; 3]> {
    let mut out = [0; 3];
    for (slot, port) in out.iter_mut().zip(BACKEND_PORTS) {
        let text = bench_probe::http_get(port, "/hits")?;
        *slot = text
            .split_once("\r\n\r\n")
            .and_then(|(_, body)| body.trim().parse().ok())
            .with_context(|| format!("no count in /hits of port {port}: {text}"))?;
    }
    Ok(out)
}

/// `b1 / b2 / b3` shares in percent.
fn shares(hits: &[u64; 3]) -> String {
    let total = hits.iter().sum::<u64>().max(1) as f64;
    hits.iter().map(|&h| format!("{:.1}%", 100.0 * h as f64 / total)).collect::<Vec<_>>().join(" / ")
}

/// HAProxy's and nginx's versions, for the report.
fn peer_versions() -> (String, String) {
    let run = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_default()
    };
    let haproxy = run("haproxy", "-v").split_whitespace().nth(2).unwrap_or("?").to_owned();
    let nginx = run("nginx", "-v").split('/').nth(1).unwrap_or("?").trim().to_owned();
    (haproxy, nginx)
}

fn report(samples: &[Vec<Vec<Sample>>], opts: &Options) -> String {
    let mut s = String::new();
    header(&mut s, opts);
    for (shape, per_row) in SHAPES.iter().zip(samples) {
        let _ = writeln!(s, "\n### {}\n", shape.title);
        let _ = writeln!(
            s,
            "| row | p50 ms | p99 ms (each round) | p99.9 ms | share b1 / b2 / b3 | errors, median per round (all rounds: non-2xx / broken / timed out) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for (via, rounds) in ROWS.iter().zip(per_row) {
            let q = |i: usize| median(rounds.iter().map(|x| x.outcome.latency[i]).collect());
            let each = rounds.iter().map(|x| format!("{:.2}", x.outcome.latency[1])).collect::<Vec<_>>().join(", ");
            let hits: [u64; 3] = std::array::from_fn(|i| rounds.iter().map(|x| x.hits[i]).sum());
            let errors = median(rounds.iter().map(|x| x.outcome.errors() as f64).collect());
            let sum = |f: fn(&Outcome) -> u64| rounds.iter().map(|x| f(&x.outcome)).sum::<u64>();
            let _ = writeln!(
                s,
                "| {} | {:.2} | {:.2} ({each}) | {:.2} | {} | {errors:.0} ({} / {} / {}) |",
                via.name(),
                q(0),
                q(1),
                q(2),
                shares(&hits),
                sum(|o| o.non_2xx),
                sum(|o| o.broken),
                sum(|o| o.timeouts)
            );
        }
    }
    targets(&mut s, samples);
    s
}

fn header(s: &mut String, opts: &Options) {
    let (haproxy, nginx) = peer_versions();
    let _ = writeln!(
        s,
        "Balancing over three `speedmimi demo-backend` origins per shape (`GET /`, base latency {d} ms), open loop at \
         {rate} req/s over {c} keep-alive connections, {secs} s per row × {rounds} round(s) interleaved (round r: every \
         shape, every row), medians; latency from each request's due time, over the 2xx answers. {date}, {machine}; \
         each proxy one worker pinned to core {PROXY_CORE}, the load generator and the origins on core {LOAD_CORE}. \
         At this rate and latency about {inflight:.0} requests are in flight, {per:.1} per origin when shared evenly.\n",
        d = opts.delay_ms,
        rate = opts.rate,
        c = opts.connections,
        secs = opts.seconds,
        rounds = opts.rounds,
        date = bench::utc_date(),
        machine = bench::machine_line(),
        inflight = opts.rate as f64 * opts.delay_ms as f64 / 1e3,
        per = opts.rate as f64 * opts.delay_ms as f64 / 3e3,
    );
    let upstreams = format!("`{}`", UPSTREAM_OPTIONS.replace('\n', " ").replace("    ", "").trim());
    let lines = [
        format!(
            "Share: requests that reached each origin during the row (its `/hits`, read directly before and after), \
             retries included. Errors: what the client saw: non-2xx answers, broken connections (reset, or closed \
             before the answer's end) and requests unanswered {CLIENT_TIMEOUT_MS} ms after they fell due."
        ),
        format!(
            "SpeedMimi: `server.workers: 1`, `ebpf.enabled: false`, the route's `load_balancer` per row, backends with \
             default settings (weight 100, `max_fails: 1`, `fail_timeout: 10s`); {upstreams}. How it retries: README, \
             How it behaves (Failures)."
        ),
        format!(
            "HAProxy {haproxy}: `balance leastconn`, `{}` (response-timeout acts only after `timeout server`, 30 s); \
             servers without `check`.",
            HAPROXY_RETRIES.trim().replace("\n  ", "`, `")
        ),
        format!(
            "nginx {nginx}: `least_conn`, `{}`, `keepalive 128`; servers with the default `max_fails=1 \
             fail_timeout=10s`: one attempt that fails in a way `proxy_next_upstream` names takes a server out for 10 s.",
            NGINX_RETRIES.trim()
        ),
        "direct (b1): the load straight to b1, which has no fault in any shape: the floor, nothing balanced. \
         ip_hash: every request comes from 127.0.0.1, so one origin takes them all (by design)."
            .into(),
        format!(
            "Origins: {d} ms per answer; (b) b3 {slow} ms; (c) b3's stall is the last {STALL_MS} ms of every \
             {STALL_EVERY_MS} ms from its start{phase}; (d) b2 and b3 draw their 503s and resets from a seeded hash \
             of each request's number, and a 503 goes out at once.",
            d = opts.delay_ms,
            slow = opts.delay_ms * SLOW_FACTOR,
            phase = if (opts.seconds * 1000).is_multiple_of(STALL_EVERY_MS) {
                ""
            } else {
                " (rows are not a whole number of periods long, so rows see different stall time)"
            },
        ),
    ];
    for l in lines {
        let _ = writeln!(s, "- {l}");
    }
}

/// The targets, checked against this run.
fn targets(s: &mut String, samples: &[Vec<Vec<Sample>>]) {
    let p99 = |shape: usize, via: Via| {
        let row = ROWS.iter().position(|v| *v == via).expect("every Via is a row");
        median(samples[shape][row].iter().map(|x| x.outcome.latency[1]).collect())
    };
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let _ = writeln!(s, "\nTargets (issue 15):");
    for shape in [1, 2] {
        let ours = p99(shape, Via::SpeedMimi("performance"));
        let (h, n) = (p99(shape, Via::Haproxy), p99(shape, Via::Nginx));
        let ratio = ours / h.min(n);
        let _ = writeln!(
            s,
            "- {}: performance p99 ≤ 0.70× the better peer's (haproxy {h:.2} ms, nginx {n:.2} ms): {ours:.2} ms, {ratio:.2}× ({})",
            &SHAPES[shape].title[..3],
            verdict(ratio <= 0.70)
        );
    }
    let failing: Vec<(String, u64)> = ROWS
        .iter()
        .zip(&samples[3])
        .filter(|(v, _)| matches!(v, Via::SpeedMimi(_)))
        .map(|(v, r)| (v.name(), r.iter().map(|x| x.outcome.errors()).sum::<u64>()))
        .collect();
    let each = failing.iter().map(|(n, e)| format!("{n} {e}")).collect::<Vec<_>>().join(", ");
    let _ = writeln!(
        s,
        "- (d): no client-visible errors through SpeedMimi (every request is a GET), all rounds: {each} ({})",
        verdict(failing.iter().all(|(_, e)| *e == 0))
    );
    let even: Vec<String> = ROWS
        .iter()
        .zip(&samples[0])
        .filter(|(v, _)| matches!(v, Via::SpeedMimi(lb) if *lb != "ip_hash"))
        .map(|(v, r)| {
            let hits: [u64; 3] = std::array::from_fn(|i| r.iter().map(|x| x.hits[i]).sum());
            let total = hits.iter().sum::<u64>().max(1) as f64;
            let ok = hits.iter().all(|&h| (h as f64 / total * 3.0 - 1.0).abs() <= 0.10);
            format!("{} {}", v.name(), verdict(ok))
        })
        .collect();
    let _ = writeln!(
        s,
        "- (a): every origin's share within ±10% of a third (30.0-36.7%), every SpeedMimi balancer but ip_hash: {}",
        even.join(", ")
    );
}
