//! `cargo xtask bench flows`: the XDP flow table at scale. l4_steer is loaded with its LRU flow tables sized
//! for each count of flows and filled through BPF_PROG_TEST_RUN, one SYN per flow as clients would open them
//! (NAT, so both the client-side and the reply table fill). Then, kernel-measured per packet: a hit (an ACK of
//! an established flow drawn at random, so the lookups touch the table's memory as real traffic does) and a
//! miss (an ACK of a flow the table lacks: a ring lookup, and an insert that evicts the least recently used
//! entry). The tables' memory comes from the kernel's own account of each map (fdinfo `memlock`). Each CPU
//! opens an equal share of the flows: the tables' LRU lists are per CPU.

use std::{fmt::Write as _, fs, net::Ipv4Addr, path::Path, time::Instant};

use anyhow::{Context, bail};
use aya::{maps::PerCpuArray, programs::Xdp};
use speedmimi_common::l4::{self, Counters};

use super::{
    BACKENDS, VIP_NAT, VIP_PORT,
    testrun::{
        ACK, LOOP_REPEAT, SYN, XDP_REDIRECT, ifindex, in_scratch_ns, load_steering, tcp_frame, test_run, xdp_md,
    },
};
use crate::{bench, build_ebpf, workspace};

/// Options of one run.
pub struct Options {
    /// Flow counts, each its own table size.
    pub sizes: Vec<u32>,
    /// Hits and misses timed per size.
    pub samples: u32,
}

/// Client source ports per address; flow `i` is port `PORT_BASE + i % PORTS` of address `i / PORTS`.
const PORTS: u32 = 50_000;
const PORT_BASE: u32 = 10_000;

/// One table size, measured.
struct Row {
    flows: u32,
    fill_secs: f64,
    hit_ns: f64,
    /// Hits that found no entry (the LRU evicted it before the table was full).
    hit_misses: u64,
    /// One established flow's packet, kernel-looped (its entry hot in the caches).
    hot_ns: f64,
    miss_ns: f64,
    /// Both tables (client side and NAT replies), as the kernel accounts them.
    table_bytes: u64,
    /// One dependent read at a random place in a userspace buffer of the tables' size: what the memory
    /// system charges for a lookup that does not hit the caches, without the program.
    load_ns: f64,
}

/// The SYN or ACK of flow `i`: a template with the client address and port patched in (l4_steer does not
/// check checksums; it adjusts them incrementally).
struct Frames {
    syn: Vec<u8>,
    ack: Vec<u8>,
}

impl Frames {
    fn new() -> Frames {
        let at = Ipv4Addr::new(10, 200, 0, 1);
        Frames {
            syn: tcp_frame(at, 1, VIP_NAT, VIP_PORT, SYN, &[]),
            ack: tcp_frame(at, 1, VIP_NAT, VIP_PORT, ACK, &[]),
        }
    }

    fn flow(frame: &mut [u8], i: u32) {
        let host = i / PORTS + 1;
        frame[26..30].copy_from_slice(&[10, 200, (host >> 8) as u8, host as u8]);
        frame[34..36].copy_from_slice(&((PORT_BASE + i % PORTS) as u16).to_be_bytes());
    }
}

/// Runs the sizes and writes `target/bench/flows.md`.
pub fn flows(opts: &Options) -> anyhow::Result<()> {
    if !workspace::is_root() {
        bail!("the benchmark builds a network namespace and loads eBPF: run it as root");
    }
    if opts.sizes.iter().any(|&n| n == 0 || n / PORTS >= 250 * 256) || opts.samples == 0 {
        bail!("--sizes must be 1 to 12,500,000 flows each, --samples at least 1");
    }
    let object = build_ebpf::build_ebpf(true).context("the benchmark loads the eBPF object")?;
    let mut rows = Vec::new();
    for &flows in &opts.sizes {
        println!("bench: {flows} flows: filling the tables, then {} hits and {} misses", opts.samples, opts.samples);
        let name = format!("flb{}-{flows}", std::process::id());
        let row = in_scratch_ns(&name, || measure(&object, flows, opts.samples))?;
        println!(
            "bench: {flows} flows: fill {:.1} s, hit {:.0} ns, miss {:.0} ns, tables {:.1} MiB",
            row.fill_secs,
            row.hit_ns,
            row.miss_ns,
            row.table_bytes as f64 / (1 << 20) as f64
        );
        rows.push(row);
    }
    let table = report(&rows, opts);
    println!("\n{table}");
    let dir = workspace::target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let path = dir.join("flows.md");
    fs::write(&path, &table)?;
    println!("bench: written to {}", path.display());
    Ok(())
}

fn measure(object: &Path, flows: u32, samples: u32) -> anyhow::Result<Row> {
    let ebpf = load_steering(object, flows)?;
    let prog: &Xdp = ebpf.program("l4_steer").context("no l4_steer program")?.try_into()?;
    let counters: PerCpuArray<_, Counters> = PerCpuArray::try_from(ebpf.map(l4::COUNTERS).context("no counters map")?)?;
    let new_flows = || -> anyhow::Result<u64> {
        let mut n = 0;
        for slot in 0..BACKENDS as u32 {
            n += counters.get(&slot, 0)?.iter().map(|c| c.new_flows).sum::<u64>();
        }
        Ok(n)
    };
    let eth0 = ifindex("eth0")?;
    let mut frames = Frames::new();
    let ctx = xdp_md(frames.syn.len(), eth0);

    // The tables keep per-CPU LRU lists (BPF_F_NO_COMMON_LRU): each CPU inserts into its own share of the
    // entries, max_entries / CPUs. Filled from one CPU, half of a two-CPU table was evicted again (measured);
    // a NIC's receive queues spread flows over the CPUs, so each online CPU opens its share here. The kernel
    // divides by the possible CPUs: where some are offline, their shares stay empty (reported).
    let online = aya::util::online_cpus().map_err(|(path, e)| anyhow::anyhow!("{path}: {e}"))?;
    let possible = aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("{path}: {e}"))?;
    if online.len() < possible {
        println!(
            "bench: {} of {possible} possible CPUs online: the tables hold at most {}% of their entries",
            online.len(),
            online.len() * 100 / possible
        );
    }
    let n = online.len() as u32;
    let started = Instant::now();
    for (k, &cpu) in (0u32..).zip(&online) {
        pin_to(cpu)?;
        for i in flows / n * k..if k + 1 == n { flows } else { flows / n * (k + 1) } {
            Frames::flow(&mut frames.syn, i);
            redirected(prog, &frames.syn, &ctx, "a new flow's SYN")?;
        }
    }
    let fill_secs = started.elapsed().as_secs_f64();
    pin_to(online[0])?;

    // Hits: established flows in a fixed pseudo-random order (the same for every size).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let before = new_flows()?;
    let mut total = 0u128;
    for _ in 0..samples {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Frames::flow(&mut frames.ack, (x % u64::from(flows)) as u32);
        total += redirected(prog, &frames.ack, &ctx, "an established flow's ACK")?;
    }
    let hit_ns = total as f64 / f64::from(samples);
    let hit_misses = new_flows()? - before;
    // One established flow, kernel-looped: its entry stays in the CPU's caches.
    Frames::flow(&mut frames.ack, flows / 2);
    let hot_ns = test_run(prog, &frames.ack, &ctx, LOOP_REPEAT)?.duration.as_nanos() as f64;

    // Misses: flows never opened (numbered past the table), each inserted and evicting one.
    let mut total = 0u128;
    for i in 0..samples {
        Frames::flow(&mut frames.ack, flows + i);
        total += redirected(prog, &frames.ack, &ctx, "an unknown flow's ACK")?;
    }
    let miss_ns = total as f64 / f64::from(samples);
    let table_bytes = lru_memlock(flows)?;
    let load_ns = random_load_ns(table_bytes as usize, samples.max(1_000_000));
    Ok(Row { flows, fill_secs, hit_ns, hit_misses, hot_ns, miss_ns, table_bytes, load_ns })
}

/// ns per read of a pointer chase through `bytes` of memory: one cache line each, in a random cycle
/// over all of them (Sattolo's shuffle), so every read waits for the one before and no prefetcher can
/// guess the next; `reads` of them, after one lap (at most 10 M reads) to fault the pages in.
fn random_load_ns(bytes: usize, reads: u32) -> f64 {
    const LINE: usize = 64 / size_of::<usize>();
    let lines = (bytes / 64).max(2);
    let mut next = vec![0usize; lines * LINE];
    let mut order: Vec<usize> = (0..lines).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..lines).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % i as u64) as usize);
    }
    for w in order.windows(2) {
        next[w[0] * LINE] = w[1] * LINE;
    }
    next[order[lines - 1] * LINE] = order[0] * LINE;
    drop(order);
    let mut at = 0;
    for _ in 0..lines.min(10_000_000) {
        at = next[at];
    }
    let started = Instant::now();
    for _ in 0..reads {
        at = next[at];
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(reads);
    std::hint::black_box(at);
    ns
}

/// One test run of `frame`, which must be redirected; the kernel-measured ns it took.
fn redirected(prog: &Xdp, frame: &[u8], ctx: &[u8], what: &str) -> anyhow::Result<u128> {
    let r = test_run(prog, frame, ctx, 1)?;
    if r.return_value != XDP_REDIRECT {
        bail!("{what} was not redirected (verdict {})", r.return_value);
    }
    Ok(r.duration.as_nanos())
}

/// Moves the calling thread to `cpu` (test runs execute on the caller's CPU).
fn pin_to(cpu: u32) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity get valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The kernel's `memlock` of this process's LRU hash maps sized `entries` (the two flow tables).
fn lru_memlock(entries: u32) -> anyhow::Result<u64> {
    const BPF_MAP_TYPE_LRU_HASH: &str = "9";
    let mut total = 0;
    for fd in fs::read_dir("/proc/self/fdinfo")? {
        let Ok(info) = fs::read_to_string(fd?.path()) else { continue };
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        if field("map_type:") == Some(BPF_MAP_TYPE_LRU_HASH) && field("max_entries:") == Some(&entries.to_string()) {
            total += field("memlock:").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    if total == 0 {
        bail!("no LRU map of {entries} entries in /proc/self/fdinfo");
    }
    Ok(total)
}

fn report(rows: &[Row], opts: &Options) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### XDP flow table at scale ({}, {})\n", bench::utc_date(), bench::machine_line());
    let _ = writeln!(
        out,
        "`cargo xtask bench flows --samples {}`: l4_steer through BPF_PROG_TEST_RUN, NAT service, tables filled with \
         one SYN per flow; kernel-measured ns per packet (one run each, mean of {} packets; includes the kernel's \
         timer).\n",
        opts.samples, opts.samples
    );
    out.push_str(
        "| flows | fill (s) | hit, random flows, ns/pkt | hits the LRU had evicted | hit, one flow looped, ns/pkt \
         | miss ns/pkt | both tables | bytes/flow | a random read in memory of the tables' size, ns |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.0} | {} | {:.0} | {:.0} | {:.1} MiB | {:.0} | {:.1} |",
            r.flows,
            r.fill_secs,
            r.hit_ns,
            r.hit_misses,
            r.hot_ns,
            r.miss_ns,
            r.table_bytes as f64 / (1 << 20) as f64,
            r.table_bytes as f64 / f64::from(r.flows),
            r.load_ns
        );
    }
    if let (Some(small), Some(big)) = (rows.first(), rows.iter().find(|r| r.flows >= 1_000_000)) {
        let _ = writeln!(
            out,
            "\nHit cost at {} flows against {} flows (target: within 1.2×): {:.2}× for random flows (each \
             lookup a cache miss into the table), {:.2}× for one flow's packets in a row. A random read in memory \
             of the tables' size alone costs {:.1} ns against {:.1} ns: {:.0} ns more per memory access, before \
             the program does anything.",
            big.flows,
            small.flows,
            big.hit_ns / small.hit_ns,
            big.hot_ns / small.hot_ns,
            big.load_ns,
            small.load_ns,
            big.load_ns - small.load_ns
        );
    }
    if let Some(big) = rows.last() {
        let per_flow = big.table_bytes as f64 / f64::from(big.flows);
        let _ = writeln!(
            out,
            "A 128 GiB host giving half its memory to the tables holds {:.0} M flows at {:.0} bytes each.",
            64.0 * (1u64 << 30) as f64 / per_flow / 1e6,
            per_flow
        );
    }
    out
}
