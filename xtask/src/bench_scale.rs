//! `cargo xtask bench scale` (`make test-million`): idle upgraded (WebSocket) flows ramped through
//! SpeedMimi (spliced and copied), HAProxy and nginx in steps, until a step's first failed
//! handshake or the last step; then through two spliced SpeedMimi processes sharing the port
//! (`server.reuse_port`), with every step doubled, to show what passes one process's file limit.
//! Each proxy process runs one worker pinned to core 0; four `bench-peer` backends and the idle
//! clients (at most `FLOWS_PER_CLIENT` flows per process, so no load
//! process meets the per-process file limit first) run on core 1. Per step: flows upgraded and
//! failed, time to open the step, flows still open, the proxy's RSS and file descriptors per
//! flow, the kernel's TCP buffer memory (/proc/net/sockstat) and slab (/proc/meminfo) per flow
//! (all four sockets of a flow), and a fresh echo flow's round trips, all measured `SETTLE`
//! after the step's flows are open, from a baseline taken after a warm-up burst.

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    bench::{self, Guard},
    bench_peer, bench_probe, bench_splice,
    bench_splice::{Peer, Proxy, Setup},
    workspace,
};

/// The backends' flow and control ports: four, so no backend meets the file limit before two
/// proxy processes do.
const BACKENDS: [(u16, u16); 4] = [(18181, 18182), (18184, 18185), (18186, 18187), (18188, 18189)];
/// Idle flows one client process holds (one file each): far below the 20,000-file limit.
const FLOWS_PER_CLIENT: usize = 4_000;
/// Flows opened and closed before the baseline.
const WARMUP: usize = 1_000;
/// The wait between opening a step's flows (or closing the warm-up's) and measuring.
const SETTLE: Duration = Duration::from_secs(12);
/// Echo round trips of the sample flow at each step.
const PINGS: usize = 200;

pub struct Options {
    /// Cumulative flow counts, ascending.
    pub steps: Vec<usize>,
}

/// The proxies ramped, and how many processes share the port (each step times that many).
const TARGETS: [(&str, Proxy, u16); 5] = [
    ("speedmimi-splice", Proxy::SpeedMimi { splice: true }, 1),
    ("speedmimi-copy", Proxy::SpeedMimi { splice: false }, 1),
    ("haproxy", Proxy::Haproxy { splice: false }, 1),
    ("nginx", Proxy::Nginx, 1),
    ("speedmimi-splice x2", Proxy::SpeedMimi { splice: true }, 2),
];

/// One step of one ramp.
struct Step {
    flows: usize,
    upgraded: usize,
    failed: usize,
    open_ms: u64,
    alive: usize,
    rss_kib_per_flow: f64,
    fds: usize,
    /// Kernel TCP buffer memory per flow, KiB (client, proxy front, proxy back, backend sockets).
    tcp_kib_per_flow: f64,
    /// Kernel slab memory per flow, KiB (the sockets themselves, their files and epoll entries).
    slab_kib_per_flow: f64,
    ping_p50_us: Option<f64>,
    ping_p99_us: Option<f64>,
    /// Flows SpeedMimi reports spliced now.
    spliced: Option<u64>,
}

pub fn scale(opts: &Options) -> anyhow::Result<()> {
    if opts.steps.is_empty() || opts.steps.windows(2).any(|w| w[0] >= w[1]) || opts.steps[0] == 0 {
        bail!("--steps must be ascending flow counts, the first at least 1");
    }
    let (bin, dir, exe) = bench_splice::prepare()?;

    let mut backends = Vec::new();
    for (port, control) in BACKENDS {
        let mut b =
            Peer::spawn(&exe, "backend", &["backend", "--port", &port.to_string(), "--control", &control.to_string()])?;
        workspace::wait_port(port, &mut b.child.0)?;
        backends.push(b);
    }
    let ports: Vec<u16> = BACKENDS.iter().map(|(p, _)| *p).collect();
    let max = *opts.steps.last().expect("checked non-empty");

    let mut ramps = Vec::new();
    for (name, proxy, processes) in TARGETS {
        let mut children = Vec::new();
        for i in 0..processes {
            let shared = (processes > 1).then_some(i);
            let setup = Setup { name: "scale", backends: &ports, max_flows: max as u32, budget: "4MiB", shared };
            let child = bench_splice::start(proxy, &bin, &dir, &setup)?.context("a proxy target")?;
            let mut child = Guard(child);
            let port = if i == 0 { bench_splice::PROXY_PORT } else { bench_splice::admin_port(i) };
            workspace::wait_port(port, &mut child.0)?;
            children.push(child);
        }
        let roots: Vec<u32> = children.iter().map(|c| c.0.id()).collect();
        let admins: Vec<u16> = match proxy {
            Proxy::SpeedMimi { .. } => (0..processes).map(bench_splice::admin_port).collect(),
            _ => Vec::new(),
        };
        let steps: Vec<usize> = opts.steps.iter().map(|s| s * usize::from(processes)).collect();
        let steps = ramp(name, &exe, &roots, &admins, &steps).with_context(|| format!("target {name}"))?;
        for c in &mut children {
            bench::stop(&mut c.0);
        }
        ramps.push((name, steps));
        // Let the closed flows' sockets go before the next ramp's baseline.
        settle();
    }
    for b in backends {
        b.finish();
    }
    let table = report(&ramps);
    println!("\n{table}");
    let path = dir.join("scale.md");
    fs::write(&path, &table)?;
    println!("bench: table written to {}", path.display());
    Ok(())
}

/// Ramps one proxy (its processes `roots`; SpeedMimi's admin ports `admins`) through the steps;
/// stops after the first step with a failed handshake.
fn ramp(name: &str, exe: &Path, roots: &[u32], admins: &[u16], steps: &[usize]) -> anyhow::Result<Vec<Step>> {
    let rss_kib = || roots.iter().map(|r| bench_splice::rss_kib(*r)).sum::<u64>();
    let port = bench_splice::PROXY_PORT.to_string();
    // Warm-up: a burst of flows opened and closed, then the settle time, before the baseline. The
    // proxy's allocator has then seen a burst of handshakes and given back what it gives back
    // (SpeedMimi's heap trim would otherwise also return free heap left from startup during the
    // first step, and make the flows look cheaper than they are).
    let mut warm = Peer::spawn(exe, "idle client", &["idle", "--port", &port, "--flows", &WARMUP.to_string()])?;
    let (_, bad, _) = bench_peer::parse_ready(&warm.line(Duration::from_secs(60))?)?;
    if bad > 0 {
        bail!("{bad} of the {WARMUP} warm-up flows failed");
    }
    warm.finish();
    thread::sleep(SETTLE);
    let (rss0, tcp0, slab0) = (rss_kib(), tcp_mem_kib()?, slab_kib()?);
    let mut clients: Vec<Peer> = Vec::new();
    let mut out = Vec::new();
    let (mut upgraded, mut failed) = (0, 0);
    for &want in steps {
        let started = Instant::now();
        while upgraded + failed < want {
            let n = (want - upgraded - failed).min(FLOWS_PER_CLIENT);
            let mut p = Peer::spawn(exe, "idle client", &["idle", "--port", &port, "--flows", &n.to_string()])?;
            // Failed flows wait out their 5 s timeout, 128 at a time.
            let line = p.line(Duration::from_secs(60) + Duration::from_millis(40 * n as u64))?;
            let (ok, bad, _) = bench_peer::parse_ready(&line)?;
            upgraded += ok;
            failed += bad;
            clients.push(p);
        }
        let open_ms = started.elapsed().as_millis() as u64;
        // Idle flows are long-lived: measured once the proxy has settled (SpeedMimi returns free
        // heap every 10 s; the peers keep their own schedules), the same wait for every proxy.
        thread::sleep(SETTLE);
        let mut alive = 0;
        for p in &mut clients {
            p.say("check")?;
            let line = p.line(Duration::from_secs(10))?;
            alive += line.strip_prefix("alive ").and_then(|n| n.parse::<usize>().ok()).context("alive count")?;
        }
        let flows = upgraded.max(1) as f64;
        let rss = rss_kib().saturating_sub(rss0) as f64 / flows;
        let tcp = (tcp_mem_kib()?.saturating_sub(tcp0)) as f64 / flows;
        let slab = (slab_kib()?.saturating_sub(slab0)) as f64 / flows;
        let fds = roots.iter().flat_map(|r| bench::process_tree(*r)).map(open_files).sum();
        let ping = bench_splice::ping(exe, bench_splice::PROXY_PORT, PINGS).ok();
        let spliced = match admins {
            [] => None,
            _ => admins
                .iter()
                .map(|port| bench_probe::admin_metric(*port, "speedmimi_spliced_flows_open").ok().flatten())
                .sum::<Option<u64>>(),
        };
        let step = Step {
            flows: want,
            upgraded,
            failed,
            open_ms,
            alive,
            rss_kib_per_flow: rss,
            fds,
            tcp_kib_per_flow: tcp,
            slab_kib_per_flow: slab,
            ping_p50_us: ping.map(|p| p.0),
            ping_p99_us: ping.map(|p| p.1),
            spliced,
        };
        println!(
            "bench: {name:<16} {want:>6} flows: {upgraded} upgraded, {failed} failed, {alive} alive, opened in {open_ms} ms | proxy RSS {rss:.2} KiB/flow, {fds} fds | kernel TCP buffers {tcp:.2}, slab {slab:.2} KiB/flow | echo p50 {} µs{}",
            step.ping_p50_us.map_or("–".into(), |v| format!("{v:.0}")),
            spliced.map_or(String::new(), |n| format!(" | {n} spliced")),
        );
        out.push(step);
        if failed > 0 {
            break;
        }
    }
    for p in clients {
        p.finish();
    }
    Ok(out)
}

/// The kernel's TCP socket memory (`/proc/net/sockstat`, `TCP: ... mem <pages>`), in KiB.
fn tcp_mem_kib() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/net/sockstat").context("read /proc/net/sockstat")?;
    let line = text.lines().find(|l| l.starts_with("TCP:")).context("no TCP line in /proc/net/sockstat")?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let pages = f.windows(2).find(|w| w[0] == "mem").and_then(|w| w[1].parse::<u64>().ok()).context("no TCP mem")?;
    Ok(pages * 4)
}

/// The kernel's slab memory (`Slab:` in /proc/meminfo), in KiB.
fn slab_kib() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    let line = text.lines().find_map(|l| l.strip_prefix("Slab:")).context("no Slab in /proc/meminfo")?;
    line.trim().trim_end_matches("kB").trim().parse().context("Slab in /proc/meminfo")
}

fn open_files(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Waits (at most 30 s) until the kernel's TCP memory stops falling.
fn settle() {
    let mut last = tcp_mem_kib().unwrap_or(0);
    for _ in 0..30 {
        thread::sleep(Duration::from_secs(1));
        let now = tcp_mem_kib().unwrap_or(0);
        if now >= last {
            return;
        }
        last = now;
    }
}

/// Proxy RSS growth from step `a` to step `b` over the flows `b` added, KiB per flow.
fn marginal(a: &Step, b: &Step) -> f64 {
    let (ra, rb) = (a.rss_kib_per_flow * a.upgraded as f64, b.rss_kib_per_flow * b.upgraded as f64);
    (rb - ra) / (b.upgraded.saturating_sub(a.upgraded)).max(1) as f64
}

fn report(ramps: &[(&str, Vec<Step>)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Idle upgraded (WebSocket) flows ramped in steps through each proxy (one worker pinned to core 0; four backends and \
         clients of at most {FLOWS_PER_CLIENT} flows each on core 1; `x2`: two SpeedMimi processes sharing the port with \
         `server.reuse_port`, both on core 0, every step doubled, figures summed over both), `cargo xtask bench scale`. \
         {}, {}.\n",
        bench::utc_date(),
        bench::machine_line()
    );
    let _ = writeln!(
        s,
        "| proxy | flows | upgraded | failed | still open | time to open the step (ms) | proxy RSS KiB/flow | marginal RSS KiB/flow | proxy fds | kernel TCP buffers KiB/flow | kernel slab KiB/flow | echo p50 / p99 µs | spliced |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, steps) in ramps {
        for (i, st) in steps.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {:.2} | {:.2} | {} | {} |",
                st.flows,
                st.upgraded,
                st.failed,
                st.alive,
                st.open_ms,
                st.rss_kib_per_flow,
                i.checked_sub(1).map_or("–".into(), |j| format!("{:.2}", marginal(&steps[j], st))),
                st.fds,
                st.tcp_kib_per_flow,
                st.slab_kib_per_flow,
                match (st.ping_p50_us, st.ping_p99_us) {
                    (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
                    _ => "failed".into(),
                },
                st.spliced.map_or("–".into(), |n| n.to_string()),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nProxy RSS per flow is the growth since the ramp began over the flows held; the marginal figure is the growth \
         from the previous step over the flows it added, which leaves out what the first step's concurrent handshakes \
         left in the allocator."
    );
    let _ = writeln!(s, "\nLargest step held with no failed handshake:");
    for (name, steps) in ramps {
        match steps.iter().enumerate().rev().find(|(_, st)| st.failed == 0 && st.alive == st.upgraded) {
            Some((i, st)) => {
                let _ = writeln!(
                    s,
                    "- {name}: {} flows, {:.2} KiB proxy RSS per flow ({} marginal)",
                    st.flows,
                    st.rss_kib_per_flow,
                    i.checked_sub(1).map_or("–".into(), |j| format!("{:.2} KiB", marginal(&steps[j], st)))
                );
            }
            None => {
                let _ = writeln!(s, "- {name}: none");
            }
        }
    }
    s
}
