//! Everything around the measured paths: nft and HAProxy (installed when missing), a killed run's namespaces, the
//! DSR decapsulators, the nftables rules, SpeedMimi and HAProxy in the LB namespace, and waiting until each of them
//! listens or has attached XDP.

use std::{
    fs,
    net::{SocketAddrV4, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{BACKENDS, HAPROXY_PORT, L7_PORT, LB_CORE, LOAD_CORE, NS_TAG, Route, VIP_DSR, VIP_NAT, VIP_NFT, VIP_PORT};
use crate::{bench::Guard, lab, workspace};

/// How long daemons get to listen and attach.
const STARTUP: Duration = Duration::from_secs(15);

/// Whether IPVS exists here, in one line for the output.
pub(super) fn ipvs_note() -> String {
    let proc = Path::new("/proc/net/ip_vs").exists() || Path::new("/sys/module/ip_vs").exists();
    let tool = workspace::find_on_path("ipvsadm").is_some() || Path::new("/usr/sbin/ipvsadm").exists();
    if proc {
        "IPVS: this kernel has IPVS, but this benchmark measures nftables DNAT with conntrack in its place".into()
    } else {
        format!(
            "IPVS: unavailable in this kernel (no /proc/net/ip_vs, no ip_vs module{}): nftables DNAT with \
             conntrack stands in for it",
            if tool { "; ipvsadm is installed but has nothing to drive" } else { ", no ipvsadm" }
        )
    }
}

/// Removes the namespaces of earlier runs whose process is gone (a run killed before its cleanup).
pub(super) fn remove_stale() -> anyhow::Result<()> {
    for ns in lab::list_namespaces(NS_TAG).map_err(anyhow::Error::msg)? {
        let Some(pid) = ns[NS_TAG.len()..].split_once('-').and_then(|(p, _)| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let gone = lab::cleanup_stale(&format!("{NS_TAG}{pid}-")).map_err(anyhow::Error::msg)?;
            if !gone.is_empty() {
                println!("bench: removed namespaces a killed run left: {}", gone.join(" "));
            }
        }
    }
    Ok(())
}

/// Writes `/proc/sys/<key>` values inside `ns`.
pub(super) fn sysctls(ns: &str, values: &[(&str, &str)]) -> anyhow::Result<()> {
    lab::in_netns(ns, || -> anyhow::Result<()> {
        for (key, value) in values {
            fs::write(Path::new("/proc/sys").join(key), value).with_context(|| format!("sysctl {key} in {ns}"))?;
        }
        Ok(())
    })
    .map_err(anyhow::Error::msg)?
}

/// DSR's backend half: the VIP on `lo` and `speedmimi xdp-decap` on eth0 (this kernel has no ipip module).
pub(super) fn start_decap(lab: &mut lab::Lab, bin: &Path, dir: &Path) -> anyhow::Result<()> {
    for i in 0..BACKENDS {
        let ns = lab.ns_backend(i);
        lab::run_in(&ns, &["ip", "addr", "add", &format!("{VIP_DSR}/32"), "dev", "lo"]).map_err(anyhow::Error::msg)?;
        let log = dir.join(format!("l4-decap-b{i}.log"));
        let child = lab::command_in(&ns, &[&bin.to_string_lossy(), "xdp-decap", "--interface", lab::BACKEND_IF])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("start xdp-decap")?;
        lab.adopt(child);
        let deadline = Instant::now() + STARTUP;
        while xdp_attached(&ns, lab::BACKEND_IF)?.is_none() {
            if Instant::now() > deadline {
                bail!("xdp-decap did not attach to {} in {ns}: {}", lab::BACKEND_IF, tail(&log));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Pins every process of `ns` (the demo backend and the decapsulator) to the load core.
pub(super) fn pin_namespace(ns: &str) -> anyhow::Result<()> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output().context("ip netns pids")?;
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", &LOAD_CORE.to_string(), pid])
            .stdout(Stdio::null())
            .status()
            .context("run taskset")?;
        if !status.success() {
            bail!("cannot pin pid {pid} of {ns} to core {LOAD_CORE}");
        }
    }
    Ok(())
}

/// DNAT of the nftables VIP, hashed on the client address like the other L4 rows, with conntrack following only
/// the nftables row's client block: the other rows pay no conntrack, as they would on a box without these rules.
pub(super) fn nft_rules(pool: &str) -> String {
    let map: Vec<String> = (0..BACKENDS).map(|i| format!("{i} : {}", lab::backend_addr(i))).collect();
    format!(
        "table ip speedmimi_bench {{\n  chain raw_pre {{\n    type filter hook prerouting priority raw; policy accept;\n    ip saddr != {pool} ip daddr != {pool} notrack\n  }}\n  chain raw_out {{\n    type filter hook output priority raw; policy accept;\n    notrack\n  }}\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {VIP_NFT} tcp dport {VIP_PORT} dnat to jhash ip saddr mod {BACKENDS} map {{ {} }} : {}\n  }}\n}}\n",
        map.join(", "),
        lab::DEMO_PORT
    )
}

pub(super) fn start_daemon(ns: &str, bin: &Path, dir: &Path) -> anyhow::Result<Guard> {
    let backends: String = (0..BACKENDS)
        .map(|i| {
            format!("    - {{id: b{i}, host: {}, port: {}, max_conn: 100000}}\n", lab::backend_addr(i), lab::DEMO_PORT)
        })
        .collect();
    let (front, back) = (lab::LB_FRONT_IF, lab::LB_BACK_IF);
    let config = dir.join("l4-speedmimi.yaml");
    fs::write(
        &config,
        format!(
            "server: {{host: {}, port: {L7_PORT}}}\nadmin: {{host: 127.0.0.1, port: 9091}}\nbackends:\n  web:\n{backends}routing:\n  main: {{upstream: web, load_balancer: ip_hash}}\nl4:\n  - {{name: web-l4, interface: {front}, backend_interface: {back}, vip: {VIP_NAT}, port: {VIP_PORT}, upstream: web}}\n  - {{name: web-dsr, interface: {front}, backend_interface: {back}, vip: {VIP_DSR}, port: {}, upstream: web, mode: dsr}}\nebpf: {{enabled: true, l4_flows: 262144}}\n",
            lab::LB_FRONT_IP,
            lab::DEMO_PORT
        ),
    )?;
    let log = dir.join("l4-speedmimi.log");
    let child =
        lab::command_in(ns, &["taskset", "-c", LB_CORE, &bin.to_string_lossy(), "-c", &config.to_string_lossy()])
            .env("RUST_LOG", "warn")
            .env_remove("SPEEDMIMI_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("start speedmimi")?;
    let mut daemon = Guard(child);
    wait_listening(ns, Route::L7.target(0), &mut daemon.0).with_context(|| tail(&log))?;
    Ok(daemon)
}

pub(super) fn start_haproxy(ns: &str, haproxy: &Path, dir: &Path) -> anyhow::Result<Guard> {
    let servers: String =
        (0..BACKENDS).map(|i| format!("  server b{i} {}:{}\n", lab::backend_addr(i), lab::DEMO_PORT)).collect();
    let config = dir.join("l4-haproxy.cfg");
    fs::write(
        &config,
        format!(
            "global\n  nbthread 1\n  maxconn 5000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend f\n  bind {}:{HAPROXY_PORT}\n  default_backend b\nbackend b\n  balance source\n{servers}",
            lab::LB_FRONT_IP
        ),
    )?;
    let child = lab::command_in(ns, &["taskset", "-c", LB_CORE, &haproxy.to_string_lossy(), "-db", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("start haproxy")?;
    Ok(Guard(child))
}

/// Waits until `addr` accepts connections from inside `ns`, failing early if `child` exits.
pub(super) fn wait_listening(ns: &str, addr: SocketAddrV4, child: &mut Child) -> anyhow::Result<()> {
    lab::in_netns(ns, || -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("exited ({status}) before listening on {addr}");
            }
            if TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {addr} after {} s", STARTUP.as_secs());
            }
            thread::sleep(Duration::from_millis(50));
        }
    })
    .map_err(anyhow::Error::msg)?
}

/// Waits until one XDP program is attached to both LB interfaces: (program id, "native" or "generic").
pub(super) fn wait_xdp(ns: &str, daemon: &mut Child) -> anyhow::Result<(u32, &'static str)> {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Some(status) = daemon.try_wait()? {
            bail!("speedmimi exited ({status}) before attaching XDP");
        }
        if let (Some(a), Some(b)) = (xdp_attached(ns, lab::LB_FRONT_IF)?, xdp_attached(ns, lab::LB_BACK_IF)?)
            && a.0 == b.0
        {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!("speedmimi did not attach XDP to {} and {} in {ns}", lab::LB_FRONT_IF, lab::LB_BACK_IF);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The XDP program attached to `dev` in `ns`, from `ip link`'s "prog/xdp id N" (or "prog/xdpgeneric").
fn xdp_attached(ns: &str, dev: &str) -> anyhow::Result<Option<(u32, &'static str)>> {
    let out = lab::run_in(ns, &["ip", "link", "show", "dev", dev]).map_err(anyhow::Error::msg)?;
    let words: Vec<&str> = out.split_whitespace().collect();
    Ok(words.windows(3).find_map(|w| {
        let mode = match w[0] {
            "prog/xdp" | "prog/xdpdrv" => "native",
            "prog/xdpgeneric" => "generic",
            _ => return None,
        };
        (w[1] == "id").then(|| w[2].parse().ok().map(|id| (id, mode))).flatten()
    }))
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("{} says: {}", log.display(), lines[lines.len().saturating_sub(5)..].join("\n"))
}
