//! `cargo xtask bench http`: HTTP/1.1 keep-alive, small responses, through SpeedMimi, nginx and
//! HAProxy side by side in one interleaved run, plus the direct path. Each proxy is pinned to
//! core 0; wrk and the backend share core 1. The figure that matters is requests per proxy
//! core-second (throughput divided by the CPU the proxy process used), as medians over rounds.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::workspace;

const BACKEND_PORT: u16 = 18081;
const PROXY_PORT: u16 = 18080;
/// The core every benchmark pins the proxy under test to, and the one for load and backends.
pub(crate) const PROXY_CORE: &str = "0";
pub(crate) const LOAD_CORE: &str = "1";

/// Options of one benchmark run.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub connections: u32,
}

struct Target {
    name: &'static str,
    /// Started per round; None for the direct path.
    start: Option<fn(&Path, &Path) -> anyhow::Result<Child>>,
    port: u16,
}

struct Sample {
    rps: f64,
    /// CPU seconds the proxy used per wall second (1.0 = one core busy).
    cores: f64,
    p99_ms: f64,
}

pub fn http(opts: &Options) -> anyhow::Result<()> {
    if !workspace::is_root() {
        bail!("the benchmark installs nginx, haproxy and wrk with apt and pins processes: run it as root");
    }
    ensure_packages(&["nginx", "haproxy", "wrk"])?;
    let bin = build_release()?;
    let dir = workspace::target_dir().join("bench");
    fs::create_dir_all(&dir)?;

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

    let targets = [
        Target { name: "direct", start: None, port: BACKEND_PORT },
        Target { name: "speedmimi", start: Some(start_speedmimi), port: PROXY_PORT },
        Target { name: "haproxy", start: Some(start_haproxy), port: PROXY_PORT },
        Target { name: "nginx", start: Some(start_nginx), port: PROXY_PORT },
    ];
    let mut samples: Vec<Vec<Sample>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..opts.rounds {
        for (t, out) in targets.iter().zip(samples.iter_mut()) {
            let mut proxy = match t.start {
                Some(start) => {
                    let mut child = Guard(start(&bin, &dir)?);
                    workspace::wait_port(t.port, &mut child.0)?;
                    Some(child)
                }
                None => None,
            };
            let pids = match &proxy {
                Some(p) => process_tree(p.0.id()),
                None => Vec::new(),
            };
            // Warm up connections and caches.
            wrk(t.port, 1, opts.connections)?;
            let cpu0 = workspace::cpu_seconds(&pids);
            let started = Instant::now();
            let (rps, p99_ms) = wrk(t.port, opts.seconds, opts.connections)?;
            let wall = started.elapsed().as_secs_f64();
            let cores = if pids.is_empty() { 0.0 } else { (workspace::cpu_seconds(&pids) - cpu0) / wall };
            println!(
                "bench: round {} {:<10} {:>9.0} req/s  proxy {:.2} cores  p99 {:.2} ms",
                round + 1,
                t.name,
                rps,
                cores,
                p99_ms
            );
            out.push(Sample { rps, cores, p99_ms });
            if let Some(p) = proxy.as_mut() {
                stop(&mut p.0);
            }
        }
    }

    let table = report(&targets, &samples, opts);
    println!("\n{table}");
    let path = dir.join("http.md");
    fs::write(&path, &table)?;
    println!("bench: table written to {}", path.display());
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(targets: &[Target], samples: &[Vec<Sample>], opts: &Options) -> String {
    let machine = machine_line();
    let date = utc_date();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "HTTP/1.1 keep-alive, 3-byte response bodies, wrk -c{} ({} s × {} rounds, medians), proxy pinned to core {PROXY_CORE}, wrk and backend on core {LOAD_CORE}; {date}, {machine}",
        opts.connections, opts.seconds, opts.rounds
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "| path | req/s | proxy cores busy | req per proxy core-second | SpeedMimi ÷ this | p99 ms |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let per_core: Vec<f64> = samples
        .iter()
        .map(|v| median(v.iter().map(|x| if x.cores > 0.0 { x.rps / x.cores } else { 0.0 }).collect()))
        .collect();
    let ours = targets.iter().position(|t| t.name == "speedmimi").map(|i| per_core[i]).unwrap_or(0.0);
    for ((t, v), pc) in targets.iter().zip(samples).zip(&per_core) {
        let rps = median(v.iter().map(|x| x.rps).collect());
        let cores = median(v.iter().map(|x| x.cores).collect());
        let p99 = median(v.iter().map(|x| x.p99_ms).collect());
        if t.start.is_none() {
            let _ = writeln!(s, "| {} | {rps:.0} | – | – | – | {p99:.2} |", t.name);
        } else {
            let ratio = if *pc > 0.0 { ours / pc } else { 0.0 };
            let _ = writeln!(s, "| {} | {rps:.0} | {cores:.2} | {pc:.0} | {ratio:.2}× | {p99:.2} |", t.name);
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

/// Runs wrk pinned to the load core; returns (requests/s, p99 latency in ms).
fn wrk(port: u16, seconds: u64, connections: u32) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("taskset")
        .args(["-c", LOAD_CORE, "wrk", "-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors against port {port}:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let p99 =
        text.lines().find_map(|l| l.trim().strip_prefix("99%")).map(|v| parse_latency_ms(v.trim())).unwrap_or(f64::NAN);
    Ok((rps, p99))
}

fn parse_latency_ms(v: &str) -> f64 {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().map(|x| x * mult).unwrap_or(f64::NAN)
}

fn start_speedmimi(bin: &Path, dir: &Path) -> anyhow::Result<Child> {
    let config = dir.join("speedmimi.yaml");
    fs::write(
        &config,
        format!(
            "server:\n  host: 127.0.0.1\n  port: {PROXY_PORT}\nbackends:\n  b:\n    - id: b1\n      host: 127.0.0.1\n      port: {BACKEND_PORT}\nrouting:\n  all:\n    path: /\n    upstream: b\n    load_balancer: round_robin\nebpf:\n  enabled: false\n"
        ),
    )?;
    spawn_speedmimi(bin, &config, PROXY_CORE)
}

/// The SpeedMimi binary on `config`, pinned to `core`, logging warnings only.
pub(crate) fn spawn_speedmimi(bin: &Path, config: &Path, core: &str) -> anyhow::Result<Child> {
    Command::new("taskset")
        .args(["-c", core])
        .arg(bin)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .env_remove("SPEEDMIMI_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("start speedmimi")
}

fn start_nginx(_bin: &Path, dir: &Path) -> anyhow::Result<Child> {
    let config = dir.join("nginx.conf");
    fs::write(
        &config,
        format!(
            "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {pid};\nerror_log stderr error;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  upstream b {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{PROXY_PORT};\n    keepalive_requests 1000000;\n    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
            pid = dir.join("nginx.pid").display(),
            tmp = dir.display()
        ),
    )?;
    Command::new("taskset").args(["-c", PROXY_CORE, "nginx", "-c"]).arg(&config).spawn().context("start nginx")
}

fn start_haproxy(_bin: &Path, dir: &Path) -> anyhow::Result<Child> {
    let config = dir.join("haproxy.cfg");
    fs::write(
        &config,
        format!(
            "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\nfrontend f\n  bind 127.0.0.1:{PROXY_PORT}\n  default_backend b\nbackend b\n  server b1 127.0.0.1:{BACKEND_PORT}\n"
        ),
    )?;
    Command::new("taskset")
        .args(["-c", PROXY_CORE, "haproxy", "-db", "-f"])
        .arg(&config)
        .spawn()
        .context("start haproxy")
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

pub(crate) fn ensure_packages(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| workspace::find_on_path(p).is_none() && !Path::new(&format!("/usr/sbin/{p}")).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing {} (apt-get)", missing.join(", "));
    workspace::run_checked(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    workspace::run_checked(
        Command::new("apt-get").args(["install", "-y"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // The packages start system services on install; the benchmark runs its own instances.
    for p in &missing {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("service {p} stop >/dev/null 2>&1; pkill -x {p} || true"))
            .status();
    }
    Ok(())
}

pub(crate) fn build_release() -> anyhow::Result<PathBuf> {
    workspace::run_checked(workspace::cargo().args(["build", "--release", "-p", "speedmimi"]))?;
    Ok(workspace::target_dir().join("release/speedmimi"))
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
