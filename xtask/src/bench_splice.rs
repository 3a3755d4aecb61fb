//! `cargo xtask bench splice`: upgraded (WebSocket) flows through SpeedMimi (spliced in the kernel
//! and copied in userspace), nginx, HAProxy (with and without `option splice-*`) and direct, in one
//! interleaved run. Proxies are pinned to core 0, the load and the backend (`bench-peer` children)
//! to core 1. Splice work runs in softirq on whichever core the packets arrive, so the cost measure
//! is whole-machine CPU from /proc/stat (softirq included), minus what the direct path costs.

use std::{
    env,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    bench::{self, Guard, LOAD_CORE, PROXY_CORE},
    bench_peer, bench_probe, build_ebpf, workspace,
};

pub(crate) const PROXY_PORT: u16 = 18180;
const BACKEND_PORT: u16 = 18181;
const CONTROL_PORT: u16 = 18182;
pub(crate) const ADMIN_PORT: u16 = 18183;

/// Options of one benchmark run.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub pings: usize,
    pub streams: usize,
    pub idle_flows: usize,
    /// SpeedMimi's `ebpf.splice_budget` for the run.
    pub splice_budget: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proxy {
    Direct,
    SpeedMimi { splice: bool },
    Nginx,
    Haproxy { splice: bool },
}

struct Target {
    name: &'static str,
    proxy: Proxy,
}

const TARGETS: [Target; 6] = [
    Target { name: "direct", proxy: Proxy::Direct },
    Target { name: "speedmimi-splice", proxy: Proxy::SpeedMimi { splice: true } },
    Target { name: "speedmimi-copy", proxy: Proxy::SpeedMimi { splice: false } },
    Target { name: "nginx", proxy: Proxy::Nginx },
    Target { name: "haproxy", proxy: Proxy::Haproxy { splice: false } },
    Target { name: "haproxy-splice", proxy: Proxy::Haproxy { splice: true } },
];
const OURS: &str = "speedmimi-splice";
const COPY: &str = "speedmimi-copy";
const HAPROXY_SPLICE: &str = "haproxy-splice";

/// One target's figures in one round.
struct Sample {
    p50_us: f64,
    p99_us: f64,
    many_gbps: f64,
    /// Whole-machine CPU seconds per GB delivered by the many-streams measurement.
    many_cpu_per_gb: f64,
    bulk_gbps: f64,
    /// KiB of proxy RSS per idle flow; None for direct.
    idle_kib: Option<f64>,
    /// Idle flows SpeedMimi reports spliced (its metrics); None for the others.
    spliced: Option<u64>,
    /// Bytes the sink received minus bytes written, (many streams, bulk): negative = lost,
    /// positive = duplicated; must be 0.
    mismatch: (i64, i64),
    /// Bytes SpeedMimi's verdict cut from segments overlapping bytes already
    /// spliced (each would otherwise have arrived twice); None for the others.
    overlap_cut: Option<u64>,
    /// Share of the bytes written in the (many streams, bulk) phases that SpeedMimi's kernel path
    /// redirected (the rest was passed to userspace and copied while a flow was over its budget).
    kernel_share: Option<(f64, f64)>,
}

pub fn splice(opts: &Options) -> anyhow::Result<()> {
    if opts.rounds == 0 || opts.seconds == 0 || opts.pings == 0 || opts.streams == 0 || opts.idle_flows == 0 {
        bail!("--rounds, --seconds, --pings, --streams and --idle-flows must all be at least 1");
    }
    let (bin, dir, exe) = prepare()?;

    let mut backend = Peer::spawn(
        &exe,
        "backend",
        &["backend", "--port", &BACKEND_PORT.to_string(), "--control", &CONTROL_PORT.to_string()],
    )?;
    workspace::wait_port(BACKEND_PORT, &mut backend.child.0)?;
    workspace::wait_port(CONTROL_PORT, &mut backend.child.0)?;
    let mut control = Control::connect()?;

    let mut samples: Vec<Vec<Sample>> = TARGETS.iter().map(|_| Vec::new()).collect();
    for round in 0..opts.rounds {
        for (t, out) in TARGETS.iter().zip(samples.iter_mut()) {
            let setup = Setup {
                name: "splice",
                backends: &[BACKEND_PORT],
                max_flows: 5_000,
                budget: &opts.splice_budget,
                shared: None,
            };
            let mut proxy = match start(t.proxy, &bin, &dir, &setup)? {
                Some(child) => {
                    let mut child = Guard(child);
                    workspace::wait_port(PROXY_PORT, &mut child.0)?;
                    Some(child)
                }
                None => None,
            };
            let port = if proxy.is_some() { PROXY_PORT } else { BACKEND_PORT };
            let root = proxy.as_ref().map(|p| p.0.id());
            let s = measure(t, port, root, opts, &exe, &mut control).with_context(|| format!("target {}", t.name))?;
            println!(
                "bench: round {} {:<16} ping p50 {:>6.1} µs p99 {:>6.1} µs | {} streams {:>5.2} GB/s {:>5.2} CPU-s/GB | bulk {:>5.2} GB/s | idle {}{}{}{}{}",
                round + 1,
                t.name,
                s.p50_us,
                s.p99_us,
                opts.streams,
                s.many_gbps,
                s.many_cpu_per_gb,
                s.bulk_gbps,
                s.idle_kib.map_or("–".into(), |k| format!("{k:.2} KiB/flow")),
                s.spliced.map_or(String::new(), |n| format!(" ({n}/{} spliced)", opts.idle_flows)),
                mismatch_text(s.mismatch, opts.streams).map_or(String::new(), |m| format!(" | sink − written: {m}")),
                s.overlap_cut.filter(|n| *n > 0).map_or(String::new(), |n| format!(" | overlap bytes cut: {n}")),
                s.kernel_share.map_or(String::new(), |(m, b)| format!(
                    " | in-kernel share: streams {:.1}%, bulk {:.1}%",
                    m * 100.0,
                    b * 100.0
                )),
            );
            out.push(s);
            if let Some(p) = proxy.as_mut() {
                bench::stop(&mut p.0);
            }
        }
    }
    drop(control);
    backend.finish();

    let table = report(&samples, opts);
    println!("\n{table}");
    let path = dir.join("splice.md");
    fs::write(&path, &table)?;
    println!("bench: table written to {}", path.display());
    Ok(())
}

/// What the upgraded-flow benchmarks need first: root, nginx and HAProxy, the eBPF object and the
/// release daemon. (daemon, the directory of configs and tables, this xtask binary)
pub(crate) fn prepare() -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    if !workspace::is_root() {
        bail!("the benchmark loads eBPF, installs nginx and haproxy with apt and pins processes: run it as root");
    }
    workspace::ensure_packages(&["nginx", "haproxy"])?;
    build_ebpf::build_ebpf(true).context("speedmimi-splice needs the eBPF object")?;
    let bin = bench::build_release()?;
    let dir = workspace::target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let exe = env::current_exe().context("locate the xtask binary")?;
    Ok((bin, dir, exe))
}

fn measure(
    t: &Target,
    port: u16,
    root: Option<u32>,
    opts: &Options,
    exe: &Path,
    control: &mut Control,
) -> anyhow::Result<Sample> {
    let (p50_us, p99_us) = ping(exe, port, opts.pings)?;
    // Idle memory before the throughput runs: buffers they leave in the allocator would absorb it.
    let (idle_kib, spliced) = idle(exe, port, opts.idle_flows, root, matches!(t.proxy, Proxy::SpeedMimi { .. }))?;
    let speedmimi = matches!(t.proxy, Proxy::SpeedMimi { .. });
    let spliced_bytes = || -> anyhow::Result<Option<u64>> {
        if speedmimi { Ok(Some(metric("speedmimi_spliced_bytes_total")?.unwrap_or(0))) } else { Ok(None) }
    };
    let k0 = spliced_bytes()?;
    let many = stream(exe, port, opts.streams, opts.seconds, control)?;
    let k1 = spliced_bytes()?;
    let bulk = stream(exe, port, 1, opts.seconds, control)?;
    let k2 = spliced_bytes()?;
    let share = |a: Option<u64>, b: Option<u64>, written: u64| Some((b? - a?) as f64 / written.max(1) as f64);
    let kernel_share = share(k0, k1, many.written).zip(share(k1, k2, bulk.written));
    let overlap_cut = if speedmimi { metric("speedmimi_spliced_overlap_bytes_cut_total")? } else { None };
    Ok(Sample {
        p50_us,
        p99_us,
        many_gbps: many.gbps,
        many_cpu_per_gb: many.cpu_per_gb,
        bulk_gbps: bulk.gbps,
        idle_kib,
        spliced,
        mismatch: (many.mismatch, bulk.mismatch),
        overlap_cut,
        kernel_share,
    })
}

/// (1) One flow, 1 KiB ping-pong: (p50, p99) in µs.
pub(crate) fn ping(exe: &Path, port: u16, pings: usize) -> anyhow::Result<(f64, f64)> {
    let mut p = Peer::spawn(
        exe,
        "ping client",
        &["ping", "--port", &port.to_string(), "--count", &pings.to_string(), "--size", "1024"],
    )?;
    let line = p.line(Duration::from_secs(30) + Duration::from_millis(pings as u64))?;
    p.finish();
    let mut f = line.strip_prefix("latency ").unwrap_or("").split(' ').map(|v| v.parse::<f64>());
    match (f.next(), f.next()) {
        (Some(Ok(p50)), Some(Ok(p99))) => Ok((p50, p99)),
        _ => bail!("ping client said {line:?}"),
    }
}

/// What one streaming phase measured.
struct Streamed {
    /// GB/s at the sink.
    gbps: f64,
    /// Whole-machine CPU seconds per GB delivered.
    cpu_per_gb: f64,
    /// Bytes received minus bytes written.
    mismatch: i64,
    /// Bytes the writers wrote, warm-up included.
    written: u64,
}

/// (2), (3) `flows` flows pushing to the sink. Measured in steady state after a warm-up; then the
/// writers stop and exactly the bytes written must arrive within 10 s (a mismatch is reported, not fatal).
fn stream(exe: &Path, port: u16, flows: usize, seconds: u64, control: &mut Control) -> anyhow::Result<Streamed> {
    let base = control.count()?;
    let mut p = Peer::spawn(exe, "push client", &["push", "--port", &port.to_string(), "--flows", &flows.to_string()])?;
    p.expect("ready", Duration::from_secs(30))?;
    thread::sleep(Duration::from_millis((seconds * 250).min(1000)));
    let (c0, m0, t0) = (control.count()?, workspace::machine_busy_seconds()?, Instant::now());
    thread::sleep(Duration::from_secs(seconds));
    let (c1, m1) = (control.count()?, workspace::machine_busy_seconds()?);
    let wall = t0.elapsed().as_secs_f64();
    p.say("stop")?;
    let line = p.line(Duration::from_secs(30))?;
    let written: u64 = line
        .strip_prefix("written ")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("push client said {line:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mismatch = loop {
        let got = control.count()? - base;
        if got == written {
            break 0;
        }
        // More than written can only grow: no need to wait for it.
        if got > written || Instant::now() > deadline {
            eprintln!(
                "bench: WARNING {flows} flow(s) through port {port}: {written} bytes written, {got} reached the sink"
            );
            break got as i64 - written as i64;
        }
        thread::sleep(Duration::from_millis(5));
    };
    p.finish();
    let gb = (c1 - c0) as f64 / 1e9;
    if gb <= 0.0 {
        bail!("{flows} flow(s) through port {port}: nothing reached the sink in {seconds} s");
    }
    Ok(Streamed { gbps: gb / wall, cpu_per_gb: (m1 - m0) / gb, mismatch, written })
}

/// (4) `flows` idle upgraded flows: (proxy RSS KiB per flow, flows SpeedMimi reports spliced).
fn idle(
    exe: &Path,
    port: u16,
    flows: usize,
    root: Option<u32>,
    speedmimi: bool,
) -> anyhow::Result<(Option<f64>, Option<u64>)> {
    // Let the proxy finish closing the previous measurement's flows.
    thread::sleep(Duration::from_millis(300));
    let before = root.map(rss_kib);
    let mut p = Peer::spawn(exe, "idle client", &["idle", "--port", &port.to_string(), "--flows", &flows.to_string()])?;
    let ready = p.line(Duration::from_secs(30) + Duration::from_millis(5 * flows as u64))?;
    let (_, failed, _) = bench_peer::parse_ready(&ready)?;
    if failed > 0 {
        bail!("{failed} of {flows} idle flows through port {port} were not upgraded");
    }
    thread::sleep(Duration::from_secs(1));
    let after = root.map(rss_kib);
    // Proof the flows really are spliced.
    let spliced = if speedmimi {
        Some(metric("speedmimi_spliced_flows_open")?.context("no speedmimi_spliced_flows_open in /metrics")?)
    } else {
        None
    };
    p.finish();
    let kib = match (before, after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / flows as f64),
        _ => None,
    };
    Ok((kib, spliced))
}

/// VmRSS summed over the process and its descendants, in KiB.
pub(crate) fn rss_kib(root: u32) -> u64 {
    bench::process_tree(root)
        .iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// A metric from SpeedMimi's `/metrics`, summed over its label sets (None when absent).
pub(crate) fn metric(name: &str) -> anyhow::Result<Option<u64>> {
    bench_probe::admin_metric(ADMIN_PORT, name)
}

/// The backend's control connection: the total of bytes its sinks received.
struct Control(TcpStream);

impl Control {
    fn connect() -> anyhow::Result<Control> {
        let s = TcpStream::connect(("127.0.0.1", CONTROL_PORT)).context("connect to the backend's control port")?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Control(s))
    }

    fn count(&mut self) -> anyhow::Result<u64> {
        self.0.write_all(b"?")?;
        let mut b = [0u8; 8];
        self.0.read_exact(&mut b).context("read the backend's byte count")?;
        Ok(u64::from_le_bytes(b))
    }
}

/// A `bench-peer` child pinned to the load core, spoken to in lines; killed on drop.
pub(crate) struct Peer {
    what: &'static str,
    pub(crate) child: Guard,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    pub(crate) fn spawn(exe: &Path, what: &'static str, args: &[&str]) -> anyhow::Result<Peer> {
        let mut child = Command::new("taskset")
            .args(["-c", LOAD_CORE])
            .arg(exe)
            .arg("bench-peer")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start the {what}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("child stdout")?;
        let child = Guard(child);
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Peer { what, child, stdin, lines })
    }

    pub(crate) fn line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => bail!("the {} said nothing within {timeout:?}", self.what),
            Err(RecvTimeoutError::Disconnected) => {
                thread::sleep(Duration::from_millis(100));
                match self.child.0.try_wait() {
                    Ok(Some(status)) => bail!("the {} exited ({status})", self.what),
                    _ => bail!("the {} closed its output", self.what),
                }
            }
        }
    }

    fn expect(&mut self, word: &str, timeout: Duration) -> anyhow::Result<()> {
        let line = self.line(timeout)?;
        if line != word {
            bail!("the {} said {line:?}, expected {word:?}", self.what);
        }
        Ok(())
    }

    pub(crate) fn say(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("peer stdin already closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes stdin (the peer exits on EOF) and gives it a moment; the guard kills it otherwise.
    pub(crate) fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Proxies

/// What a proxy under test is set up for: its backends (bench-peer backends on loopback), the
/// flows it must hold, SpeedMimi's splice budget, and a name for its config files.
pub(crate) struct Setup<'a> {
    pub(crate) name: &'a str,
    pub(crate) backends: &'a [u16],
    pub(crate) max_flows: u32,
    pub(crate) budget: &'a str,
    /// SpeedMimi only: this process is one of several sharing the proxy port
    /// (`server.reuse_port`), the given one (its admin port is `admin_port` of it).
    pub(crate) shared: Option<u16>,
}

/// The admin port of SpeedMimi process `instance` of several sharing the proxy port.
pub(crate) fn admin_port(instance: u16) -> u16 {
    ADMIN_PORT + 10 * instance
}

pub(crate) fn start(
    proxy: Proxy,
    bin: &Path,
    dir: &Path,
    setup: &Setup,
) -> anyhow::Result<Option<std::process::Child>> {
    let child = match proxy {
        Proxy::Direct => return Ok(None),
        Proxy::SpeedMimi { splice } => start_speedmimi(bin, dir, splice, setup)?,
        Proxy::Nginx => start_nginx(dir, setup)?,
        Proxy::Haproxy { splice } => start_haproxy(dir, splice, setup)?,
    };
    Ok(Some(child))
}

fn write_config(path: PathBuf, text: String) -> anyhow::Result<PathBuf> {
    fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

fn start_speedmimi(bin: &Path, dir: &Path, splice: bool, setup: &Setup) -> anyhow::Result<std::process::Child> {
    let backends: String = setup
        .backends
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!("    - id: b{}\n      host: 127.0.0.1\n      port: {port}\n      max_conn: 100000\n", i + 1)
        })
        .collect();
    let Setup { name, max_flows, budget, shared, .. } = setup;
    let (admin, instance) = (admin_port(shared.unwrap_or(0)), shared.map_or(String::new(), |i| format!("-{i}")));
    let config = write_config(
        dir.join(format!("{name}-speedmimi-{}{instance}.yaml", if splice { "splice" } else { "copy" })),
        format!(
            "server:\n  host: 127.0.0.1\n  port: {PROXY_PORT}\n  workers: 1\n  max_conn: {}\n  reuse_port: {}\nadmin:\n  host: 127.0.0.1\n  port: {admin}\nbackends:\n  b:\n{backends}routing:\n  all:\n    path: /\n    upstream: b\n    load_balancer: least_connections\nebpf:\n  enabled: true\n  splice: {splice}\n  splice_budget: {budget}\n",
            max_flows.max(&10_000),
            shared.is_some()
        ),
    )?;
    crate::bench::spawn_speedmimi(bin, &config, Some(PROXY_CORE))
}

fn start_nginx(dir: &Path, setup: &Setup) -> anyhow::Result<std::process::Child> {
    let servers: String = setup.backends.iter().map(|port| format!("    server 127.0.0.1:{port};\n")).collect();
    // Each flow takes two of nginx's connections (client and upstream).
    let connections = (2 * setup.max_flows + 100).max(10_000);
    // Upgrade headers as in nginx's WebSocket proxying docs.
    let config = write_config(
        dir.join(format!("{}-nginx.conf", setup.name)),
        format!(
            "worker_processes 1;\nworker_rlimit_nofile 20000;\ndaemon off;\nmaster_process off;\npid {pid};\nerror_log stderr error;\nevents {{ worker_connections {connections}; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n  upstream b {{\n    least_conn;\n{servers}  }}\n  server {{\n    listen 127.0.0.1:{PROXY_PORT} backlog=4096;\n    location / {{\n      proxy_pass http://b;\n      proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n      proxy_set_header Host $host;\n      proxy_buffer_size 64k;\n      proxy_buffers 8 16k;\n      proxy_busy_buffers_size 64k;\n      proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }}\n  }}\n}}\n",
            pid = dir.join(format!("{}-nginx.pid", setup.name)).display(),
            tmp = dir.display()
        ),
    )?;
    Command::new("taskset")
        .args(["-c", PROXY_CORE, "nginx", "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
        .context("start nginx")
}

fn start_haproxy(dir: &Path, splice: bool, setup: &Setup) -> anyhow::Result<std::process::Child> {
    let splice_opts = if splice { "  option splice-request\n  option splice-response\n" } else { "" };
    // HAProxy refuses to start when its connections (two files each, and a few more) would need
    // more files than the hard limit allows.
    let maxconn = setup.max_flows.max(5_000).min((workspace::open_files_limit().saturating_sub(100) / 2) as u32);
    let servers: String =
        setup.backends.iter().enumerate().map(|(i, port)| format!("  server b{} 127.0.0.1:{port}\n", i + 1)).collect();
    let config = write_config(
        dir.join(format!("{}-haproxy{}.cfg", setup.name, if splice { "-splice" } else { "" })),
        format!(
            "global\n  nbthread 1\n  maxconn {}\ndefaults\n  mode http\n  maxconn {}\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  timeout tunnel 1h\n{splice_opts}frontend f\n  bind 127.0.0.1:{PROXY_PORT}\n  default_backend b\nbackend b\n  balance leastconn\n{servers}",
            maxconn, maxconn
        ),
    )?;
    Command::new("taskset")
        .args(["-c", PROXY_CORE, "haproxy", "-db", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
        .context("start haproxy")
}

// ---------------------------------------------------------------------------------------------
// Report

/// "64 streams +65483 B, bulk -6400000 B" for the non-zero parts; None when both are 0.
fn mismatch_text((many, bulk): (i64, i64), streams: usize) -> Option<String> {
    let parts: Vec<String> = [(format!("{streams} streams"), many), ("bulk".to_owned(), bulk)]
        .into_iter()
        .filter(|(_, d)| *d != 0)
        .map(|(what, d)| format!("{what} {d:+} B"))
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b > 0.0).then(|| a / b)
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}

struct Row {
    p50: f64,
    p99: f64,
    gbps: f64,
    cpu: f64,
    /// None for direct.
    marginal: Option<f64>,
    bulk: f64,
    idle_kib: Option<f64>,
    spliced: Option<u64>,
    /// Per-round mismatches, joined (empty when all were 0).
    mismatch: String,
}

fn report(samples: &[Vec<Sample>], opts: &Options) -> String {
    let med = |v: &[Sample], f: &dyn Fn(&Sample) -> f64| bench::median(v.iter().map(f).collect());
    let direct = &samples[0];
    let rows: Vec<Row> = TARGETS
        .iter()
        .zip(samples)
        .map(|(t, v)| Row {
            p50: med(v, &|s| s.p50_us),
            p99: med(v, &|s| s.p99_us),
            gbps: med(v, &|s| s.many_gbps),
            cpu: med(v, &|s| s.many_cpu_per_gb),
            // Paired with the direct run of the same round, then the median.
            marginal: (t.proxy != Proxy::Direct).then(|| {
                bench::median(v.iter().zip(direct).map(|(s, d)| s.many_cpu_per_gb - d.many_cpu_per_gb).collect())
            }),
            bulk: med(v, &|s| s.bulk_gbps),
            idle_kib: v.iter().map(|s| s.idle_kib).collect::<Option<Vec<f64>>>().map(bench::median),
            spliced: v.iter().filter_map(|s| s.spliced).min(),
            mismatch: v.iter().filter_map(|s| mismatch_text(s.mismatch, opts.streams)).collect::<Vec<_>>().join("; "),
        })
        .collect();
    let at = |name: &str| TARGETS.iter().position(|t| t.name == name).map(|i| &rows[i]).expect("known target");
    let (ours, copy, hs) = (at(OURS), at(COPY), at(HAPROXY_SPLICE));

    let date = bench::utc_date();
    let machine = bench::machine_line();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Upgraded (WebSocket) flows, raw bytes after the 101: 1 KiB ping-pong × {pings}, {n} streams to a sink and 1 bulk stream ({secs} s each), {idle} idle flows; {rounds} interleaved rounds, medians. Proxy pinned to core {PROXY_CORE}, load and backend on core {LOAD_CORE}. CPU is whole-machine (/proc/stat user+nice+system+irq+softirq+steal) per GB delivered; marginal = minus direct's in the same round. {date}, {machine}",
        pings = opts.pings,
        n = opts.streams,
        secs = opts.seconds,
        idle = opts.idle_flows,
        rounds = opts.rounds,
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| path | ping p50 µs | ping p99 µs | p50 ÷ copy | p99 ÷ copy | {n} streams GB/s | machine CPU-s/GB | marginal CPU-s/GB | marginal ÷ copy | marginal ÷ haproxy-splice | bulk GB/s | bulk ÷ copy | proxy RSS KiB per idle flow | idle flows spliced | sink − written bytes |",
        n = opts.streams
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (t, r) in TARGETS.iter().zip(&rows) {
        let dash = || "–".to_owned();
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {:.2} | {} | {} | {} | {} |",
            t.name,
            r.p50,
            r.p99,
            fmt_ratio(ratio(r.p50, copy.p50)),
            fmt_ratio(ratio(r.p99, copy.p99)),
            r.gbps,
            r.cpu,
            r.marginal.map_or_else(dash, |m| format!("{m:+.3}")),
            fmt_ratio(r.marginal.and_then(|m| ratio(m, copy.marginal?))),
            fmt_ratio(r.marginal.and_then(|m| ratio(m, hs.marginal?))),
            r.bulk,
            fmt_ratio(ratio(r.bulk, copy.bulk)),
            r.idle_kib.map_or_else(dash, |k| format!("{k:.2}")),
            r.spliced.map_or_else(dash, |n| format!("{n}/{}", opts.idle_flows)),
            if r.mismatch.is_empty() { "0".to_owned() } else { format!("**{}**", r.mismatch) },
        );
    }
    let _ = writeln!(s);
    let check = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "n/a",
    };
    let p50 = ratio(ours.p50, copy.p50);
    let p99 = ratio(ours.p99, copy.p99);
    let m_copy = ours.marginal.and_then(|m| ratio(m, copy.marginal?));
    let m_hs = ours.marginal.and_then(|m| ratio(m, hs.marginal?));
    let bulk = ratio(ours.bulk, copy.bulk);
    let _ = writeln!(s, "Targets for {OURS}:");
    let _ = writeln!(s, "- ping p50 ≤ 0.75× copy: {} ({})", fmt_ratio(p50), check(p50.map(|r| r <= 0.75)));
    let _ = writeln!(s, "- ping p99 ≤ 1.00× copy: {} ({})", fmt_ratio(p99), check(p99.map(|r| r <= 1.0)));
    let _ = writeln!(
        s,
        "- {} streams marginal CPU per GB ≤ 0.70× copy: {} ({})",
        opts.streams,
        fmt_ratio(m_copy),
        check(m_copy.map(|r| r <= 0.7))
    );
    let _ = writeln!(
        s,
        "- {} streams marginal CPU per GB ≤ haproxy-splice: {} ({})",
        opts.streams,
        fmt_ratio(m_hs),
        check(m_hs.map(|r| r <= 1.0))
    );
    let _ = writeln!(s, "- bulk stream ≥ 0.90× copy: {} ({})", fmt_ratio(bulk), check(bulk.map(|r| r >= 0.9)));
    let _ = writeln!(
        s,
        "- proxy RSS per idle flow ≤ 1 KiB: {} ({})",
        ours.idle_kib.map_or("–".into(), |k| format!("{k:.2} KiB")),
        check(ours.idle_kib.map(|k| k <= 1.0))
    );
    let ours_samples = &samples[TARGETS.iter().position(|t| t.name == OURS).expect("known target")];
    let cut: Vec<String> = ours_samples.iter().filter_map(|s| s.overlap_cut).map(|n| n.to_string()).collect();
    if !cut.is_empty() {
        let _ = writeln!(
            s,
            "\nBytes {OURS}'s verdict cut from segments that overlapped bytes already spliced, per round (each would otherwise have arrived twice): {}",
            cut.join(", ")
        );
    }
    let shares: Vec<String> = ours_samples
        .iter()
        .filter_map(|s| s.kernel_share)
        .map(|(m, b)| format!("{:.1}% / {:.1}%", m * 100.0, b * 100.0))
        .collect();
    if !shares.is_empty() {
        let _ = writeln!(
            s,
            "\nShare of the bytes written that {OURS}'s kernel path redirected (the rest was copied in userspace while a flow was over its budget), 64 streams / bulk, per round: {}",
            shares.join(", ")
        );
    }
    let lossy: Vec<String> = TARGETS
        .iter()
        .zip(&rows)
        .filter(|(_, r)| !r.mismatch.is_empty())
        .map(|(t, r)| format!("{}: {}", t.name, r.mismatch))
        .collect();
    if !lossy.is_empty() {
        let _ = writeln!(
            s,
            "\nDelivery errors (bytes the sink received minus bytes written, per failing round; - lost, + duplicated): {}",
            lossy.join(", ")
        );
    }
    s
}
