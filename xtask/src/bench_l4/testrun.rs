//! l4_steer's own time per packet: the eBPF object loaded into a scratch namespace with one NAT and one DSR service,
//! and crafted frames timed through BPF_PROG_TEST_RUN, singly and kernel-looped.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap},
    programs::{TestRun, TestRunOptions, Xdp, XdpMode},
};
use speedmimi_common::{
    l4::{self, Backend, MODE_DSR, MODE_NAT, PROTO_TCP, Service, ServiceKey},
    maglev::{self, Cursor, EMPTY, Member, TABLE_SIZE},
};

use super::{BACKENDS, VIP_DSR, VIP_NAT, VIP_PORT, setup::sysctls};
use crate::lab;

/// Kernel-looped repetitions of one test-run packet.
pub(super) const LOOP_REPEAT: u32 = 1_000_000;
/// Single-repetition test runs averaged per packet.
pub(super) const SINGLE_CALLS: u32 = 200_000;
pub(super) const XDP_PASS: u32 = 2;
pub(super) const XDP_REDIRECT: u32 = 4;
const TEST_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const TEST_GW: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);

/// One crafted packet timed two ways.
pub(super) struct TestRunRow {
    pub(super) case: &'static str,
    /// Verdict of a single run (the real one).
    pub(super) verdict: u32,
    /// Mean kernel-measured ns of SINGLE_CALLS runs of repeat 1 (includes the kernel's timer, about one
    /// `ktime_get_ns` pair, per run).
    pub(super) single_ns: f64,
    /// Kernel-measured ns per run with repeat LOOP_REPEAT.
    pub(super) loop_ns: f64,
    /// Verdict of the looped run's last repetition: differs when the program rewrote the packet, since the kernel
    /// does not restore it between repetitions.
    pub(super) loop_verdict: u32,
}

/// A namespace of its own (eth0/eth1 veth pair, routes, permanent neighbours, as speedmimi/tests/xdp.rs makes),
/// deleted on drop.
struct ScratchNs(String);

impl Drop for ScratchNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).stderr(Stdio::null()).status();
    }
}

/// Times l4_steer on each crafted packet in a scratch namespace, deleted afterwards.
pub(super) fn test_runs(prefix: &str, object: &Path) -> anyhow::Result<Vec<TestRunRow>> {
    in_scratch_ns(&format!("{prefix}t"), || test_runs_here(object))
}

/// Runs `body` in a namespace of its own set up as the lab's load balancer (interfaces, routes to the
/// clients' and backends' networks, permanent neighbours), deleted afterwards.
pub(super) fn in_scratch_ns<T: Send>(name: &str, body: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    let ns = ScratchNs(name.to_owned());
    let ip = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("run ip")?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    ip(&["netns", "add", &ns.0])?;
    let mut lines = vec![
        "link set lo up".to_string(),
        "link add eth0 type veth peer name eth1".into(),
        "link set eth0 up".into(),
        "link set eth1 up".into(),
        format!("addr add {}/24 dev eth0", lab::LB_FRONT_IP),
        format!("addr add {}/24 dev eth1", lab::LB_BACK_IP),
        format!("route add 10.200.0.0/16 via {TEST_GW}"),
        format!("neigh replace {TEST_GW} lladdr 02:00:00:00:00:c2 dev eth0 nud permanent"),
    ];
    lines.extend((0..BACKENDS).map(|i| {
        format!("neigh replace {} lladdr 02:00:00:00:01:{:02x} dev eth1 nud permanent", lab::backend_addr(i), 10 + i)
    }));
    for line in &lines {
        let mut args = vec!["-n", &ns.0];
        args.extend(line.split(' '));
        ip(&args)?;
    }
    sysctls(&ns.0, &[("net/ipv4/ip_forward", "1")])?;
    lab::in_netns(&ns.0, body).map_err(anyhow::Error::msg)?
}

/// Loads the object with flow tables of `flows` entries and sets up one NAT service (`VIP_NAT:VIP_PORT`) and one
/// DSR service over the three backends, l4_steer attached to eth0 and eth1.
pub(super) fn load_steering(object: &Path, flows: u32) -> anyhow::Result<aya::Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(l4::FLOWS, flows)
        .map_max_entries(l4::REVERSE, flows)
        .load_file(object)
        .with_context(|| format!("load {}", object.display()))?;
    let prog: &mut Xdp = ebpf.program_mut("l4_steer").context("no l4_steer program")?.try_into()?;
    prog.load().context("verifier rejects l4_steer")?;
    // Test runs with an ingress ifindex need the device's XDP receive queue, which exists while XDP is attached.
    for dev in ["eth0", "eth1"] {
        prog.attach(dev, XdpMode::Driver).or_else(|_| prog.attach(dev, XdpMode::Skb)).context("attach l4_steer")?;
    }
    let mut services: HashMap<_, ServiceKey, Service> =
        HashMap::try_from(ebpf.map_mut(l4::SERVICES).context("no services map")?)?;
    let key = |vip: Ipv4Addr, port: u16| ServiceKey {
        addr: u32::from_ne_bytes(vip.octets()),
        port: port.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    };
    services.insert(key(VIP_NAT, VIP_PORT), Service { index: 0, mode: MODE_NAT, encap_src: 0 }, 0)?;
    let encap_src = u32::from_ne_bytes(lab::LB_BACK_IP.octets());
    services.insert(key(VIP_DSR, lab::DEMO_PORT), Service { index: 1, mode: MODE_DSR, encap_src }, 0)?;
    let mut backends: Array<_, Backend> = Array::try_from(ebpf.map_mut(l4::BACKENDS).context("no backends map")?)?;
    for i in 0..BACKENDS {
        let addr = u32::from_ne_bytes(lab::backend_addr(i).octets());
        backends.set(i as u32, Backend { addr, port: lab::DEMO_PORT.to_be(), _pad: 0 }, 0)?;
    }
    let members: Vec<Member> = (0..BACKENDS)
        .map(|i| Member::from_addr(format!("{}:{}", lab::backend_addr(i), lab::DEMO_PORT).as_bytes(), 1))
        .collect();
    let mut table = vec![EMPTY; TABLE_SIZE];
    maglev::build(&members, &mut [Cursor::default(); BACKENDS], &mut table);
    let mut ring: Array<_, u32> = Array::try_from(ebpf.map_mut(l4::RING).context("no ring map")?)?;
    for service in 0..2u32 {
        for (slot, &b) in table.iter().enumerate() {
            ring.set(service * TABLE_SIZE as u32 + slot as u32, b, 0)?;
        }
    }
    Ok(ebpf)
}

/// Times the cases on a freshly loaded program.
fn test_runs_here(object: &Path) -> anyhow::Result<Vec<TestRunRow>> {
    let ebpf = load_steering(object, 4096)?;
    let prog: &Xdp = ebpf.program("l4_steer").context("no l4_steer program")?.try_into()?;
    let (eth0, eth1) = (ifindex("eth0")?, ifindex("eth1")?);
    let payload = [b'x'; 100];
    // Handshakes first, so the timed packets belong to established flows.
    let syn = tcp_frame(TEST_CLIENT, 40000, VIP_NAT, VIP_PORT, SYN, &[]);
    let (verdict, out) = run_once(prog, &syn, eth0)?;
    if verdict != XDP_REDIRECT || out.len() < 34 {
        bail!("test run: the NAT SYN was not redirected (verdict {verdict})");
    }
    let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    run_once(prog, &tcp_frame(TEST_CLIENT, 40001, VIP_DSR, lab::DEMO_PORT, SYN, &[]), eth0)?;
    let cases = [
        (
            "NAT, established flow: client → VIP rewritten to the backend",
            tcp_frame(TEST_CLIENT, 40000, VIP_NAT, VIP_PORT, ACK, &payload),
            eth0,
        ),
        (
            "NAT, reply: backend → client rewritten to the VIP",
            tcp_frame(backend, lab::DEMO_PORT, TEST_CLIENT, 40000, ACK, &payload),
            eth1,
        ),
        (
            "DSR, established flow: IPIP-encapsulated to the backend",
            tcp_frame(TEST_CLIENT, 40001, VIP_DSR, lab::DEMO_PORT, ACK, &payload),
            eth0,
        ),
        (
            "foreign TCP packet (not a VIP): passed",
            tcp_frame(TEST_CLIENT, 40002, Ipv4Addr::new(10, 0, 0, 99), VIP_PORT, ACK, &payload),
            eth0,
        ),
    ];
    let mut rows = Vec::new();
    for (case, frame, ingress) in cases {
        let ctx = xdp_md(frame.len(), ingress);
        let mut total = 0u128;
        let mut verdict = None;
        for _ in 0..SINGLE_CALLS {
            let r = test_run(prog, &frame, &ctx, 1)?;
            total += r.duration.as_nanos();
            if *verdict.get_or_insert(r.return_value) != r.return_value {
                bail!("test run of {case:?}: the verdict changed between runs of the same packet");
            }
        }
        let looped = test_run(prog, &frame, &ctx, LOOP_REPEAT)?;
        rows.push(TestRunRow {
            case,
            verdict: verdict.unwrap_or(0),
            single_ns: total as f64 / f64::from(SINGLE_CALLS),
            loop_ns: looped.duration.as_nanos() as f64,
            loop_verdict: looped.return_value,
        });
    }
    Ok(rows)
}

pub(super) const SYN: u8 = 0x02;
pub(super) const ACK: u8 = 0x10;

pub(super) fn test_run(
    prog: &Xdp,
    frame: &[u8],
    ctx: &[u8],
    repeat: u32,
) -> anyhow::Result<aya::programs::TestRunResult> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(ctx);
    opts.repeat = repeat;
    prog.test_run(opts).context("BPF_PROG_TEST_RUN")
}

/// One run that also returns the packet as the program left it.
fn run_once(prog: &Xdp, frame: &[u8], ingress: u32) -> anyhow::Result<(u32, Vec<u8>)> {
    let ctx = xdp_md(frame.len(), ingress);
    let mut out = vec![0u8; frame.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// `struct xdp_md` for a test run: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
pub(super) fn xdp_md(len: usize, ingress: u32) -> Vec<u8> {
    [0, len as u32, 0, ingress, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect()
}

pub(super) fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}");
    }
    Ok(i)
}

/// An Ethernet/IPv4/TCP frame with correct checksums.
pub(super) fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend(sport.to_be_bytes());
    tcp.extend(dport.to_be_bytes());
    tcp.extend(1u32.to_be_bytes());
    tcp.extend(1u32.to_be_bytes());
    tcp.extend([5 << 4, flags]);
    tcp.extend(65535u16.to_be_bytes());
    tcp.extend([0, 0, 0, 0]);
    tcp.extend(payload);
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, PROTO_TCP]);
    pseudo.extend((tcp.len() as u16).to_be_bytes());
    pseudo.extend(&tcp);
    let c = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend([0x12, 0x34, 0x40, 0, 64, PROTO_TCP, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    frame.extend(ip);
    frame.extend(tcp);
    frame
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|p| u32::from(u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
