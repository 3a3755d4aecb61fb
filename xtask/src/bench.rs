//! `cargo xtask bench http`: HTTP/1.1 through SpeedMimi, nginx and HAProxy side by side, plus the
//! direct path, in one interleaved run (round r: each case, each path) over six cases: 13-byte,
//! 10 KiB and 1 MiB responses, a 4 KiB POST, a new connection per request, and 13 bytes over
//! prior-knowledge h2c from the client (h2load; HTTP/1.1 to the backend). Each proxy is pinned to
//! core 0; the load (wrk or h2load) and the backend share core 1 (`--two-workers`: two workers,
//! unpinned; `--cases`: a subset).
//! The figure that matters is requests per proxy core-second (throughput divided by the CPU the
//! proxy process used), beside latency and syscalls per request, as medians over rounds. After
//! the rounds: latency at a fixed rate (half the slowest proxy's throughput, open loop, from each
//! request's due time), again in interleaved rounds with medians, and once per case SpeedMimi's
//! allocations per request (a `count-allocs` build).

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    bench_h2c,
    bench_probe::{self, Case},
    workspace,
};

const BACKEND_PORT: u16 = 18081;
const PROXY_PORT: u16 = 18080;
const ADMIN_PORT: u16 = 18091;
/// The core every benchmark pins the proxy under test to, and the one for load and backends.
pub(crate) const PROXY_CORE: &str = "0";
pub(crate) const LOAD_CORE: &str = "1";
/// Longest fixed-rate run and allocation-counting run per case and path (shorter with `--seconds`).
const FIXED_RATE_SECONDS: u64 = 5;
const ALLOC_SECONDS: u64 = 2;

/// A keep-alive HTTP/1.1 GET with no body: what a case does unless it says otherwise.
const GET: Case = Case { title: "", key: "", path: "", body: 0, close: false, h2c: false };

const CASES: [Case; 6] = [
    Case { title: "GET, 13-byte response, keep-alive", key: "small", path: "/bytes?n=13", ..GET },
    Case { title: "GET, 10 KiB response, keep-alive", key: "10k", path: "/bytes?n=10240", ..GET },
    Case { title: "GET, 1 MiB response, keep-alive", key: "1m", path: "/bytes?n=1048576", ..GET },
    Case {
        title: "POST, 4 KiB body, 13-byte response, keep-alive",
        key: "post",
        path: "/bytes?n=13",
        body: 4096,
        ..GET
    },
    Case {
        title: "GET, 13-byte response, Connection: close (a new connection per request)",
        key: "close",
        path: "/bytes?n=13",
        close: true,
        ..GET
    },
    Case {
        title: "GET, 13-byte response, h2c with prior knowledge from the client (HTTP/1.1 keep-alive to the backend)",
        key: "h2c",
        path: "/bytes?n=13",
        h2c: true,
        ..GET
    },
];

/// Options of one benchmark run.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub connections: u32,
    /// Two workers per proxy, not pinned, instead of one pinned to the proxy core.
    pub two_workers: bool,
    /// Keys of the cases to run; empty runs all.
    pub cases: Vec<String>,
}

/// How the proxies run.
#[derive(Clone, Copy)]
struct Setup {
    workers: u32,
}

impl Setup {
    /// One worker is pinned to the proxy core; more run wherever the scheduler puts them.
    fn core(self) -> Option<&'static str> {
        (self.workers == 1).then_some(PROXY_CORE)
    }
}

/// Starts a proxy: the SpeedMimi binary, the bench directory (for its config), how to run, and
/// whether clients speak prior-knowledge h2c (nginx and HAProxy then listen for HTTP/2 only).
type Start = fn(&Path, &Path, Setup, bool) -> anyhow::Result<Child>;

struct Target {
    name: &'static str,
    /// Started per measurement; None for the direct path.
    start: Option<Start>,
    port: u16,
}

const TARGETS: [Target; 4] = [
    Target { name: "direct", start: None, port: BACKEND_PORT },
    Target { name: "speedmimi", start: Some(start_speedmimi), port: PROXY_PORT },
    Target { name: "haproxy", start: Some(start_haproxy), port: PROXY_PORT },
    Target { name: "nginx", start: Some(start_nginx), port: PROXY_PORT },
];

/// One throughput measurement.
struct Sample {
    rps: f64,
    /// CPU seconds the proxy used per wall second (1.0 = one core busy).
    cores: f64,
    /// p50, p99, p99.9 in ms.
    latency: [f64; 3],
    syscalls: Option<f64>,
}

/// Everything measured for one case.
struct CaseResult {
    /// Per target, one sample per round.
    samples: Vec<Vec<Sample>>,
    /// The fixed rate (requests/s) and, per target, p50, p99, p99.9 in ms at it, per round.
    rate: u64,
    fixed: Vec<Vec<[f64; 3]>>,
    /// SpeedMimi's heap allocations per request.
    allocations: f64,
}

pub fn http(opts: &Options) -> anyhow::Result<()> {
    if !workspace::is_root() {
        bail!("the benchmark installs nginx, haproxy, wrk and h2load with apt and pins processes: run it as root");
    }
    if opts.rounds == 0 || opts.seconds == 0 || opts.connections == 0 {
        bail!("--rounds, --seconds and --connections must all be at least 1");
    }
    let cases = select(&opts.cases)?;
    workspace::ensure_tools(&[
        ("nginx", "nginx"),
        ("haproxy", "haproxy"),
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
    ])?;
    if workspace::find_on_path("perf").is_none() {
        bail!("perf counts the proxies' syscalls: install it (apt-get install linux-perf)");
    }
    let bin = build_release()?;
    let counting = build_counting()?;
    let peer = build_peer()?;
    let dir = workspace::target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let scripts = cases.iter().map(|c| bench_probe::write_script(&dir, c)).collect::<anyhow::Result<Vec<_>>>()?;
    let setup = Setup { workers: if opts.two_workers { 2 } else { 1 } };
    let bench = Bench { dir: &dir, setup, connections: opts.connections };

    // A process left on a port (a stale backend) would answer in place of ours.
    for port in [BACKEND_PORT, PROXY_PORT, ADMIN_PORT] {
        TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("port {port} is taken (a process left by an earlier run?)"))?;
    }
    let mut backend = Guard(
        Command::new("taskset")
            .args(["-c", LOAD_CORE])
            .arg(&bin)
            .args(["demo-backend", "--port", &BACKEND_PORT.to_string(), "--id", "b1"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("start the demo backend")?,
    );
    workspace::wait_port(BACKEND_PORT, &mut backend.0)?;

    let mut samples: Vec<Vec<Vec<Sample>>> =
        cases.iter().map(|_| TARGETS.iter().map(|_| Vec::new()).collect()).collect();
    for round in 0..opts.rounds {
        for ((&case, script), per_target) in cases.iter().zip(&scripts).zip(samples.iter_mut()) {
            for (t, out) in TARGETS.iter().zip(per_target.iter_mut()) {
                let sample = bench
                    .with_target(t, &bin, (case, script), |pids| {
                        let cpu0 = workspace::cpu_seconds(pids);
                        let started = Instant::now();
                        let (run, syscalls) = bench_probe::load_with_syscalls(
                            script,
                            case,
                            t.port,
                            opts.seconds,
                            opts.connections,
                            pids,
                        )?;
                        let wall = started.elapsed().as_secs_f64();
                        let cores = if pids.is_empty() { 0.0 } else { (workspace::cpu_seconds(pids) - cpu0) / wall };
                        Ok(Sample { rps: run.rps, cores, latency: run.latency, syscalls })
                    })
                    .with_context(|| format!("{} against {}", case.key, t.name))?;
                println!(
                    "bench: round {} {:<6} {:<10} {:>9.0} req/s  proxy {:.2} cores  p99 {:.2} ms  {} syscalls/req",
                    round + 1,
                    case.key,
                    t.name,
                    sample.rps,
                    sample.cores,
                    sample.latency[1],
                    sample.syscalls.map_or("–".into(), |s| format!("{s:.2}"))
                );
                out.push(sample);
            }
        }
    }

    let mut results: Vec<CaseResult> = samples
        .into_iter()
        .map(|per_target| {
            // Half the slowest proxy's median throughput: every proxy can keep up.
            let slowest = TARGETS
                .iter()
                .zip(&per_target)
                .filter(|(t, _)| t.start.is_some())
                .map(|(_, v)| median(v.iter().map(|x| x.rps).collect()))
                .fold(f64::INFINITY, f64::min);
            let rate = ((slowest / 2.0) as u64).max(1);
            CaseResult { samples: per_target, rate, fixed: vec![Vec::new(); TARGETS.len()], allocations: f64::NAN }
        })
        .collect();
    // One open-loop run is at the mercy of one hiccup of the host: rounds, as for throughput.
    for round in 0..opts.rounds {
        for ((&case, script), result) in cases.iter().zip(&scripts).zip(results.iter_mut()) {
            let rate = result.rate;
            for (t, out) in TARGETS.iter().zip(result.fixed.iter_mut()) {
                let seconds = opts.seconds.min(FIXED_RATE_SECONDS);
                let latency = bench
                    .with_target(t, &bin, (case, script), |_| {
                        bench_probe::fixed_rate(&peer, case, t.port, rate, seconds)
                    })
                    .with_context(|| format!("{} at {rate} req/s against {}", case.key, t.name))?;
                println!(
                    "bench: round {} fixed {rate} req/s {:<6} {:<10} p50 {:.3} p99 {:.3} p99.9 {:.3} ms",
                    round + 1,
                    case.key,
                    t.name,
                    latency[0],
                    latency[1],
                    latency[2]
                );
                out.push(latency);
            }
        }
    }

    let counter = Target { name: "speedmimi (count-allocs)", start: Some(start_speedmimi), port: PROXY_PORT };
    bench.with_target(&counter, &counting, (cases[0], &scripts[0]), |_| {
        for ((&case, script), result) in cases.iter().zip(&scripts).zip(results.iter_mut()) {
            // A second of the case warms connections and buffers; the next run is counted.
            bench_probe::load(script, case, PROXY_PORT, 1, opts.connections)?;
            let seconds = opts.seconds.min(ALLOC_SECONDS);
            result.allocations =
                bench_probe::allocations_per_request(script, case, PROXY_PORT, ADMIN_PORT, seconds, opts.connections)?;
            println!("bench: {:<6} speedmimi {:.2} allocations/req", case.key, result.allocations);
        }
        Ok(())
    })?;

    let table = report(&cases, &results, opts, setup);
    println!("\n{table}");
    let path = dir.join("http.md");
    fs::write(&path, &table)?;
    println!("bench: table written to {}", path.display());
    Ok(())
}

/// What every measurement of a run shares.
struct Bench<'a> {
    dir: &'a Path,
    setup: Setup,
    connections: u32,
}

impl Bench<'_> {
    /// Starts the target (when it is a proxy) on `bin`, warms it up with a second of `case`, runs
    /// `f` with its processes' ids (none for the direct path), and stops it.
    fn with_target<R>(
        &self,
        t: &Target,
        bin: &Path,
        (case, script): (&Case, &Path),
        f: impl FnOnce(&[u32]) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut proxy = match t.start {
            Some(start) => {
                let mut child = Guard(start(bin, self.dir, self.setup, case.h2c)?);
                workspace::wait_port(t.port, &mut child.0)?;
                Some(child)
            }
            None => None,
        };
        // Warm up connections and caches; by then every worker process has forked.
        bench_probe::load(script, case, t.port, 1, self.connections)?;
        let pids = proxy.as_ref().map(|p| process_tree(p.0.id())).unwrap_or_default();
        let out = f(&pids);
        if let Some(p) = proxy.as_mut() {
            stop(&mut p.0);
        }
        out
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The cases `keys` name, in the table's order; all of them when `keys` is empty.
fn select(keys: &[String]) -> anyhow::Result<Vec<&'static Case>> {
    if let Some(unknown) = keys.iter().find(|k| !CASES.iter().any(|c| c.key == k.as_str())) {
        let known = CASES.iter().map(|c| c.key).collect::<Vec<_>>().join(", ");
        bail!("no case {unknown:?} (cases: {known})");
    }
    Ok(CASES.iter().filter(|c| keys.is_empty() || keys.iter().any(|k| k == c.key)).collect())
}

fn report(cases: &[&Case], results: &[CaseResult], opts: &Options, setup: Setup) -> String {
    let machine = machine_line();
    let date = utc_date();
    let placement = if setup.workers == 1 {
        format!("each proxy one worker pinned to core {PROXY_CORE}, load and backend on core {LOAD_CORE}")
    } else {
        format!(
            "each proxy {} workers, not pinned (SpeedMimi server.workers, HAProxy nbthread, nginx worker_processes), load and backend on core {LOAD_CORE}",
            setup.workers
        )
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "HTTP/1.1 through each proxy to `speedmimi demo-backend` (`/bytes?n=N`); {date}, {machine}; {placement}. \
         Throughput: wrk -t1 -c{c}, {secs} s × {rounds} rounds interleaved (round r: each case, each path), medians; \
         latency columns are wrk's (closed loop). Syscalls per request: perf stat raw_syscalls:sys_enter on the \
         proxy's processes over the middle of the run. Fixed rate: open loop at half the slowest proxy's median \
         req/s, {fixed_conns} connections, {fixed} s × {rounds} rounds interleaved, latency from each request's due \
         time, medians (and each round's p99). Allocations per request: a \
         count-allocs build of SpeedMimi, {alloc} s of wrk per case after a 1 s warm-up.",
        c = opts.connections,
        secs = opts.seconds,
        rounds = opts.rounds,
        fixed = opts.seconds.min(FIXED_RATE_SECONDS),
        fixed_conns = bench_probe::FIXED_RATE_CONNECTIONS,
        alloc = opts.seconds.min(ALLOC_SECONDS),
    );
    if cases.iter().any(|c| c.h2c) {
        let _ = writeln!(s, "\n{}", bench_h2c::method(opts.connections, bench_probe::FIXED_RATE_CONNECTIONS));
    }
    for (case, r) in cases.iter().zip(results) {
        let _ = writeln!(s, "\n### {}\n\nFixed rate: {} req/s.\n", case.title, r.rate);
        let _ = writeln!(
            s,
            "| path | req/s | proxy cores busy | req per proxy core-second | SpeedMimi ÷ this (median of rounds; each round) | p50 / p99 / p99.9 ms | syscalls per req | allocations per req | fixed rate p50 / p99 / p99.9 ms (each round's p99) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        let round_per_core = |v: &[Sample]| -> Vec<f64> {
            v.iter().map(|x| if x.cores > 0.0 { x.rps / x.cores } else { 0.0 }).collect()
        };
        let per_core: Vec<f64> = r.samples.iter().map(|v| median(round_per_core(v))).collect();
        // The ratio is taken round by round (the paths of one round ran minutes apart), then
        // the median: the machine's speed drifts over a run more than the paths differ.
        let ours_rounds = TARGETS
            .iter()
            .position(|t| t.name == "speedmimi")
            .map(|i| round_per_core(&r.samples[i]))
            .unwrap_or_default();
        let ms = |l: [f64; 3]| format!("{:.3} / {:.3} / {:.3}", l[0], l[1], l[2]);
        let fixed_ms = |v: &[[f64; 3]]| {
            let each = v.iter().map(|l| format!("{:.2}", l[1])).collect::<Vec<_>>().join(", ");
            format!("{} ({each})", ms(std::array::from_fn(|i| median(v.iter().map(|l| l[i]).collect()))))
        };
        for (((t, v), pc), fixed) in TARGETS.iter().zip(&r.samples).zip(&per_core).zip(&r.fixed) {
            let rps = median(v.iter().map(|x| x.rps).collect());
            let latency: [f64; 3] = std::array::from_fn(|i| median(v.iter().map(|x| x.latency[i]).collect()));
            let allocations = if t.name == "speedmimi" { format!("{:.2}", r.allocations) } else { "–".into() };
            let (cores, pc, ratio, syscalls) = if t.start.is_none() {
                ("–".into(), "–".into(), "–".into(), "–".into())
            } else {
                let cores = median(v.iter().map(|x| x.cores).collect());
                let syscalls = median(v.iter().filter_map(|x| x.syscalls).collect());
                let ratios: Vec<f64> =
                    ours_rounds.iter().zip(round_per_core(v)).map(|(o, t)| if t > 0.0 { o / t } else { 0.0 }).collect();
                let each = ratios.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
                let ratio = format!("{:.2}× ({each})", median(ratios));
                (format!("{cores:.2}"), format!("{pc:.0}"), ratio, format!("{syscalls:.2}"))
            };
            let _ = writeln!(
                s,
                "| {} | {rps:.0} | {cores} | {pc} | {ratio} | {} | {syscalls} | {allocations} | {} |",
                t.name,
                ms(latency),
                fixed_ms(fixed)
            );
        }
    }
    s
}

/// Today's date in UTC (YYYY-MM-DD), for the tables' headers; empty if `date` fails.
pub(crate) fn utc_date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub(crate) fn machine_line() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

/// SpeedMimi's HTTP listener takes HTTP/1.1 and prior-knowledge h2c alike.
fn start_speedmimi(bin: &Path, dir: &Path, setup: Setup, _h2c: bool) -> anyhow::Result<Child> {
    let config = dir.join("speedmimi.yaml");
    fs::write(
        &config,
        format!(
            "server:\n  host: 127.0.0.1\n  port: {PROXY_PORT}\n  workers: {workers}\nadmin:\n  host: 127.0.0.1\n  port: {ADMIN_PORT}\nbackends:\n  b:\n    - id: b1\n      host: 127.0.0.1\n      port: {BACKEND_PORT}\nrouting:\n  all:\n    path: /\n    upstream: b\n    load_balancer: round_robin\nebpf:\n  enabled: false\n",
            workers = setup.workers
        ),
    )?;
    spawn_speedmimi(bin, &config, setup.core())
}

/// The SpeedMimi binary on `config`, pinned to `core` (if any), logging warnings only.
pub(crate) fn spawn_speedmimi(bin: &Path, config: &Path, core: Option<&str>) -> anyhow::Result<Child> {
    speedmimi_command(bin, config, core).spawn().context("start speedmimi")
}

/// [`spawn_speedmimi`]'s command, to be given other stdio first.
pub(crate) fn speedmimi_command(bin: &Path, config: &Path, core: Option<&str>) -> Command {
    let mut cmd = pinned(core, bin);
    cmd.arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .env_remove("SPEEDMIMI_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null());
    cmd
}

/// `program` under `taskset -c <core>`, or on its own when `core` is None.
pub(crate) fn pinned(core: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match core {
        Some(core) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", core]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

fn start_nginx(_bin: &Path, dir: &Path, setup: Setup, h2c: bool) -> anyhow::Result<Child> {
    let upstream = format!("server 127.0.0.1:{BACKEND_PORT};");
    nginx_command(dir, PROXY_PORT, setup.workers, setup.core(), &upstream, "", h2c)?.spawn().context("start nginx")
}

/// nginx on 127.0.0.1:`port` proxying everything to upstream `b` (`upstream`: its servers and
/// balancing; `location`: more proxy directives; `h2c`: the listener speaks prior-knowledge h2c
/// only), its config and temporary files in `dir`: the config is written, the command returned.
pub(crate) fn nginx_command(
    dir: &Path,
    port: u16,
    workers: u32,
    core: Option<&str>,
    upstream: &str,
    location: &str,
    h2c: bool,
) -> anyhow::Result<Command> {
    let config = dir.join("nginx.conf");
    // More than one worker needs the master process. Responses larger than the proxy buffers
    // stream to the client rather than through a temporary file (proxy_max_temp_file_size 0).
    fs::write(
        &config,
        format!(
            "worker_processes {workers};\ndaemon off;\nmaster_process {master};\npid {pid};\nerror_log stderr error;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  upstream b {{ {upstream} keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{port}{http2};\n    keepalive_requests 1000000;\n    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_max_temp_file_size 0; {location}}}\n  }}\n}}\n",
            master = if workers > 1 { "on" } else { "off" },
            // Cleartext `http2` is prior-knowledge h2c only; keepalive_requests bounds its streams too.
            http2 = if h2c { " http2" } else { "" },
            pid = dir.join("nginx.pid").display(),
            tmp = dir.display()
        ),
    )?;
    let mut cmd = pinned(core, "nginx");
    cmd.arg("-c").arg(&config);
    Ok(cmd)
}

fn start_haproxy(_bin: &Path, dir: &Path, setup: Setup, h2c: bool) -> anyhow::Result<Child> {
    let backend = format!("  server b1 127.0.0.1:{BACKEND_PORT}\n");
    haproxy_command(dir, PROXY_PORT, setup.workers, setup.core(), "", &backend, h2c)?.spawn().context("start haproxy")
}

/// HAProxy on 127.0.0.1:`port` in HTTP mode with keep-alive both ways, sending everything to
/// backend `b` (`backend`: its lines, servers included; `defaults`: more lines for `defaults`;
/// `h2c`: the frontend speaks prior-knowledge h2c only), its config in `dir`: the config is
/// written, the command returned.
pub(crate) fn haproxy_command(
    dir: &Path,
    port: u16,
    workers: u32,
    core: Option<&str>,
    defaults: &str,
    backend: &str,
    h2c: bool,
) -> anyhow::Result<Command> {
    let config = dir.join("haproxy.cfg");
    fs::write(
        &config,
        format!(
            "global\n  nbthread {workers}\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n{defaults}frontend f\n  bind 127.0.0.1:{port}{proto}\n  default_backend b\nbackend b\n{backend}",
            proto = if h2c { " proto h2" } else { "" },
        ),
    )?;
    let mut cmd = pinned(core, "haproxy");
    cmd.arg("-db").arg("-f").arg(&config);
    Ok(cmd)
}

/// The process and its descendants (nginx and haproxy may fork).
pub(crate) fn process_tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    let mut i = 0;
    while i < pids.len() {
        let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", pids[i])).unwrap_or_default();
        pids.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        i += 1;
    }
    pids
}

pub(crate) fn build_release() -> anyhow::Result<PathBuf> {
    workspace::run_checked(workspace::cargo().args(["build", "--release", "-p", "speedmimi"]))?;
    Ok(workspace::target_dir().join("release/speedmimi"))
}

/// xtask with the release profile, for the open-loop peer: a dev build spends ten times the user
/// CPU per request on the core the peer shares with the backend.
pub(crate) fn build_peer() -> anyhow::Result<PathBuf> {
    workspace::run_checked(workspace::cargo().args(["build", "--release", "-p", "xtask"]))?;
    Ok(workspace::target_dir().join("release/xtask"))
}

/// SpeedMimi with its allocation counter (`count-allocs`), in a target directory of its own so
/// the two builds do not replace each other.
fn build_counting() -> anyhow::Result<PathBuf> {
    let target = workspace::target_dir().join("bench-alloc");
    workspace::run_checked(workspace::cargo().env("CARGO_TARGET_DIR", &target).args([
        "build",
        "--release",
        "-p",
        "speedmimi",
        "--features",
        "count-allocs",
    ]))?;
    Ok(target.join("release/speedmimi"))
}

pub(crate) fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).stderr(Stdio::null()).status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills its child on every exit path.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        stop(&mut self.0);
    }
}
