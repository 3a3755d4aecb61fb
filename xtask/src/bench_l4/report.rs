//! The markdown table of `bench l4`: per variant and load the medians over rounds and the marginals over the direct
//! row, then l4_steer's test-run times and the 3×-IPVS target.

use std::fmt::Write as _;

use super::{
    BACKENDS, DIRECT, IN_FLIGHT, LB_CORE, LOAD_CORE, Load, NFT, Options, Pools, Route, VARIANTS,
    load::{Errors, Measured, Sample},
    testrun::{LOOP_REPEAT, SINGLE_CALLS, TestRunRow, XDP_PASS, XDP_REDIRECT},
};
use crate::bench;

/// What the run learned about its surroundings, for the notes above the tables.
pub(super) struct Setup<'a> {
    pub(super) ipvs: String,
    pub(super) xdp_mode: &'static str,
    pub(super) pools: &'a Pools,
}

/// A variant's medians over rounds under one load.
struct Row {
    rate: f64,
    cpu: f64,
    /// Paired with the direct row of the same round, then the median; None for direct.
    marginal: Option<f64>,
    lb: Option<f64>,
    xdp: Option<(f64, f64, f64)>,
    /// Share of successful requests per backend, over all rounds.
    shares: Vec<f64>,
    errors: Errors,
}

fn rows(samples: &[Vec<Sample>], load: Load) -> Vec<Row> {
    let med = |v: &[Sample], f: &dyn Fn(&Measured) -> f64| bench::median(v.iter().map(|s| f(s.of(load))).collect());
    let direct = &samples[DIRECT];
    samples
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let counts: Vec<u64> = (0..BACKENDS).map(|b| v.iter().map(|s| s.of(load).backends[b]).sum()).collect();
            let all = counts.iter().sum::<u64>().max(1) as f64;
            let mut errors = Errors::default();
            v.iter().for_each(|s| errors.add(&s.of(load).errors));
            Row {
                rate: med(v, &|m| m.rate),
                cpu: med(v, &|m| m.cpu_per_op),
                marginal: (i != DIRECT).then(|| {
                    bench::median(
                        v.iter().zip(direct).map(|(s, d)| s.of(load).cpu_per_op - d.of(load).cpu_per_op).collect(),
                    )
                }),
                lb: v.iter().map(|s| s.of(load).lb_per_op).collect::<Option<Vec<f64>>>().map(bench::median),
                xdp: v.iter().map(|s| s.of(load).xdp).collect::<Option<Vec<_>>>().map(|x| {
                    (
                        bench::median(x.iter().map(|t| t.0).collect()),
                        bench::median(x.iter().map(|t| t.1).collect()),
                        bench::median(x.iter().map(|t| t.2).collect()),
                    )
                }),
                shares: counts.iter().map(|&c| c as f64 / all).collect(),
                errors,
            }
        })
        .collect()
}

/// Requests per marginal CPU-second of `row` over nftables DNAT's: Some(inf) when `row` costs no more than direct.
fn vs_nft(row: &Row, nft: &Row) -> Option<f64> {
    let (m, n) = (row.marginal?, nft.marginal?);
    if !(m.is_finite() && n.is_finite() && n > 0.0) {
        return None;
    }
    Some(if m <= 0.0 { f64::INFINITY } else { n / m })
}

fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_infinite() => "∞ (≤ direct)".into(),
        Some(r) => format!("{r:.2}×"),
        None => "–".into(),
    }
}

fn num(x: f64, scale: f64, prec: usize) -> String {
    if x.is_finite() { format!("{:.prec$}", x * scale) } else { "–".into() }
}

fn per_marginal_second(m: Option<f64>) -> String {
    match m {
        Some(m) if m.is_finite() && m > 0.0 => format!("{:.0}", 1.0 / m),
        Some(m) if m.is_finite() => "∞ (≤ direct)".into(),
        _ => "–".into(),
    }
}

fn errors_cell(e: &Errors) -> String {
    if e.total() == 0 { "0".into() } else { format!("**{} ({})**", e.total(), e.text()) }
}

/// How one load's table reads.
struct Units {
    title: String,
    /// One operation: a connection or a request.
    op: &'static str,
    /// The CPU column's unit ("CPU-s per 1000 conns"), and the same in the narrower columns ("CPU-s per 1000").
    cpu: &'static str,
    cpu_short: &'static str,
    /// CPU seconds per operation times `scale` is the unit; shown with `prec` decimals.
    scale: f64,
    prec: usize,
}

impl Units {
    fn of(load: Load) -> Units {
        match load {
            Load::Connections => Units {
                title: "New connection per request (`Connection: close`, read to EOF):".into(),
                op: "conn",
                cpu: "CPU-s per 1000 conns",
                cpu_short: "CPU-s per 1000",
                scale: 1e3,
                prec: 3,
            },
            Load::KeepAlive => Units {
                title: format!(
                    "Keep-alive requests (`GET /` on {IN_FLIGHT} open connections, one per client address):"
                ),
                op: "req",
                cpu: "CPU-µs per req",
                cpu_short: "CPU-µs per req",
                scale: 1e6,
                prec: 2,
            },
        }
    }
}

/// One load's table, then the direct row's spread. Only the connections table has the conns-per-marginal-CPU-second
/// and XDP CPU columns.
fn load_table(s: &mut String, samples: &[Vec<Sample>], rows: &[Row], load: Load) {
    let Units { title, op, cpu, cpu_short, scale, prec } = Units::of(load);
    let conns_only = |cell: String| (load == Load::Connections).then_some(cell);
    let head = [
        Some("path".to_owned()),
        Some(format!("{op}/s")),
        Some(format!("machine {cpu}")),
        Some(format!("marginal {cpu_short}")),
        conns_only(format!("{op}s per marginal CPU-s")),
        Some("÷ nftables DNAT".to_owned()),
        Some(format!("LB process {cpu_short}")),
        Some("XDP ns/packet".to_owned()),
        Some(format!("XDP runs per {op}")),
        conns_only(format!("XDP {cpu_short}")),
        Some("backends b0/b1/b2".to_owned()),
        Some("errors".to_owned()),
    ];
    let head: Vec<String> = head.into_iter().flatten().collect();
    let _ = writeln!(s, "\n{title}\n");
    let _ = writeln!(s, "| {} |", head.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(head.len()));
    for (v, r) in VARIANTS.iter().zip(rows) {
        let (xn, xr, xc) = r.xdp.unwrap_or((f64::NAN, f64::NAN, f64::NAN));
        let marginal = r.marginal.filter(|m| m.is_finite()).map_or("–".into(), |m| format!("{:+.prec$}", m * scale));
        let cells = [
            Some(v.name.to_owned()),
            Some(num(r.rate, 1.0, 0)),
            Some(num(r.cpu, scale, prec)),
            Some(marginal),
            conns_only(per_marginal_second(r.marginal)),
            Some(fmt_ratio(vs_nft(r, &rows[NFT]))),
            Some(r.lb.map_or("–".into(), |l| num(l, scale, prec))),
            Some(num(xn, 1.0, 0)),
            Some(num(xr, 1.0, 1)),
            conns_only(num(xc, scale, prec + 1)),
            Some(shares(&r.shares)),
            Some(errors_cell(&r.errors)),
        ];
        let cells: Vec<String> = cells.into_iter().flatten().collect();
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    noise(s, samples, load, scale, cpu);
}

/// The whole markdown report.
pub(super) fn report(samples: &[Vec<Sample>], tests: &[TestRunRow], setup: &Setup, opts: &Options) -> String {
    let conns = rows(samples, Load::Connections);
    let reqs = rows(samples, Load::KeepAlive);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "L4 in the netns lab (client → LB namespace → {BACKENDS} demo backends), {rounds} interleaved round(s), medians, {secs} s per measurement after a warm-up; {IN_FLIGHT} requests in flight (closed loop) from {clients} client addresses per row. SpeedMimi and HAProxy pinned to core {LB_CORE}, load generator and backends to core {LOAD_CORE}; XDP, forwarding and NAT run in softirq on whichever core sends, so CPU is whole-machine (/proc/stat user+nice+system+irq+softirq+steal) per request, and marginal = minus direct's in the same round. {date}, {machine}",
        rounds = opts.rounds,
        secs = opts.seconds,
        clients = setup.pools.clients,
        date = bench::utc_date(),
        machine = bench::machine_line(),
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "- {}.", setup.ipvs);
    let _ = writeln!(
        s,
        "- nftables: `dnat to jhash ip saddr mod {BACKENDS} map {{…}}` in the LB namespace's prerouting; conntrack follows only that row's client block ({}), the other rows are `notrack`.",
        setup.pools.range(NFT)
    );
    let _ = writeln!(
        s,
        "- l4_steer is attached ({} XDP) to both LB interfaces throughout, so every row pays its pass path; BPF run-time stats are on for all rows (the XDP columns).",
        setup.xdp_mode
    );
    load_table(&mut s, samples, &conns, Load::Connections);
    load_table(&mut s, samples, &reqs, Load::KeepAlive);
    let _ = writeln!(s);
    // The passed packet is unchanged, so its looped figure is the program alone; single runs add the timer.
    let timer =
        tests.iter().find(|t| t.verdict == XDP_PASS && t.loop_verdict == XDP_PASS).map(|t| t.single_ns - t.loop_ns);
    let _ = writeln!(
        s,
        "l4_steer through BPF_PROG_TEST_RUN (one NAT and one DSR service over {BACKENDS} backends, 154-byte frames, established flows), kernel-measured ns per run: the mean of {SINGLE_CALLS} runs of repeat 1, that minus the kernel's timer around a single run ({}), and one run of repeat {LOOP_REPEAT}.",
        timer.map_or("unknown".into(), |t| format!("{t:.0} ns: single − looped of the passed packet"))
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "| packet | verdict | ns per single run | minus timer | ns per looped run | looped verdict |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for t in tests {
        let rewritten = t.loop_verdict != t.verdict;
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {} | {:.1}{} | {} |",
            t.case,
            verdict_name(t.verdict),
            t.single_ns,
            timer.map_or("–".into(), |o| format!("{:.0}", t.single_ns - o)),
            t.loop_ns,
            if rewritten { " †" } else { "" },
            verdict_name(t.loop_verdict)
        );
    }
    if tests.iter().any(|t| t.loop_verdict != t.verdict) {
        let _ = writeln!(
            s,
            "\n† Not this packet's cost: the kernel does not restore the packet between repetitions, so after the first the program sees the packet it rewrote (another path, another verdict). The single-run columns are the ones to read for rewritten packets."
        );
    }
    let _ = writeln!(s);
    let check = |r: Option<f64>| match r {
        Some(r) if r >= 3.0 => "met",
        Some(_) => "MISSED",
        None => "n/a",
    };
    let _ = writeln!(s, "Target: the XDP path at ≥ 3× IPVS (here nftables DNAT) connections per marginal CPU-second:");
    for (i, v) in VARIANTS.iter().enumerate().filter(|(_, v)| matches!(v.route, Route::XdpNat | Route::XdpDsr)) {
        let r = vs_nft(&conns[i], &conns[NFT]);
        let _ = writeln!(s, "- {}: {} ({})", v.name, fmt_ratio(r), check(r));
    }
    let nft = conns[NFT].marginal.unwrap_or(f64::NAN);
    match spread(samples, Load::Connections) {
        Some((lo, hi)) if nft.abs() < hi - lo => {
            let _ = writeln!(
                s,
                "- caution: nftables' marginal ({:+.3} CPU-s per 1000) is within the direct row's spread ({:.3}): the ratio is not resolved; measure longer, with more rounds, on a quiet machine.",
                nft * 1e3,
                (hi - lo) * 1e3
            );
        }
        Some(_) => {}
        None => {
            let _ = writeln!(s, "- caution: one round, so the noise in these marginals is unknown.");
        }
    }
    let failing: Vec<String> = VARIANTS
        .iter()
        .zip(conns.iter().zip(&reqs))
        .filter(|(_, (c, r))| c.errors.total() + r.errors.total() > 0)
        .map(|(v, (c, r))| format!("{}: connections {}; keep-alive {}", v.name, c.errors.text(), r.errors.text()))
        .collect();
    if !failing.is_empty() {
        let _ = writeln!(s, "\nFailed requests (all rounds, warm-up included): {}", failing.join("; "));
    }
    s
}

/// The direct row's lowest and highest CPU per request over the rounds (None with fewer than two).
fn spread(samples: &[Vec<Sample>], load: Load) -> Option<(f64, f64)> {
    let v: Vec<f64> = samples[DIRECT].iter().map(|x| x.of(load).cpu_per_op).filter(|x| x.is_finite()).collect();
    (v.len() >= 2).then(|| (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max)))
}

/// The direct row's spread over rounds, in the table's unit: marginals smaller than it are noise.
fn noise(s: &mut String, samples: &[Vec<Sample>], load: Load, scale: f64, unit: &str) {
    let _ = match spread(samples, load) {
        Some((lo, hi)) => writeln!(
            s,
            "\nDirect row over {} rounds: {:.3}–{:.3} {unit}; marginals smaller than that spread are noise.",
            samples[DIRECT].len(),
            lo * scale,
            hi * scale
        ),
        None => writeln!(s, "\nOne round: no spread of the direct row to judge the marginals by."),
    };
}

fn shares(v: &[f64]) -> String {
    v.iter().map(|x| format!("{:.0}%", x * 100.0)).collect::<Vec<_>>().join("/")
}

fn verdict_name(v: u32) -> String {
    match v {
        0 => "XDP_ABORTED".into(),
        1 => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        3 => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        n => format!("{n}"),
    }
}
