//! The network-namespace lab of `cargo xtask lab`, included by path so the tests build the very topology
//! the engineers use by hand (the file is std-only for that reason), and the tests' way of asking a demo
//! backend behind it who answered.

// Test binaries that build no lab leave this unused.
#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::TcpStream,
};

#[path = "../../../xtask/src/lab.rs"]
mod shared;

// Test binaries that build no lab leave this unused.
#[allow(unused_imports)]
pub use shared::*;

/// Sends `GET /` and returns the backend id the answer names.
pub fn ask(s: &mut TcpStream, keep_alive: bool) -> Result<String, String> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| format!("write: {e}"))?;
    match read_response(s).map_err(|e| format!("read: {e}"))? {
        (200, body) => Ok(body.trim().to_owned()),
        (status, body) => Err(format!("status {status}: {body}")),
    }
}

/// Reads one HTTP/1.1 response: its status and its body (Content-Length long, else up to the close).
pub fn read_response(s: &mut TcpStream) -> io::Result<(u16, String)> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk)? {
            0 => return Err(bad(format!("closed after {} bytes, before the end of the head", buf.len()))),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad(format!("head: {head}")))?;
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
    });
    let mut body = buf.split_off(head_end);
    match length {
        Some(n) => {
            while body.len() < n {
                match s.read(&mut chunk)? {
                    0 => return Err(bad(format!("closed after {} of {n} body bytes", body.len()))),
                    k => body.extend_from_slice(&chunk[..k]),
                }
            }
            body.truncate(n);
        }
        None => {
            s.read_to_end(&mut body)?;
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A process the test started in a namespace (a daemon, BIRD), killed when dropped, also when the test fails.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (polling every 20 ms, at most `bound`) for `child` to exit; panics past the bound.
pub fn wait_exit(child: &mut std::process::Child, bound: std::time::Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "the process did not exit within {bound:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A DSR cluster lab for `test`: `nodes` nodes, `backends` demo backends ready for DSR to `vip`, `clients` client
/// addresses, and the nodes' config (the one service on `vip`, the admin API on 127.0.0.1:`admin_port`) written
/// in a temp dir, returned with it. The nodes are not started. Without root or BIRD: None after a printed reason,
/// or a panic under CI=true.
pub fn dsr_cluster(
    test: &str,
    nodes: usize,
    backends: usize,
    clients: usize,
    vip: std::net::SocketAddrV4,
    admin_port: u16,
) -> Option<(cluster::Cluster, super::tls::TempDir, std::path::PathBuf)> {
    if !super::root_or_skip(test) {
        return None;
    }
    let bird = super::packages::bird(test)?;
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_speedmimi"));
    let spec =
        cluster::ClusterSpec { prefix: unique_prefix(), nodes, backends, clients, speedmimi: Some(bin.clone()), bird };
    let mut c = cluster::Cluster::up(spec).unwrap_or_else(|e| panic!("cluster: {e}"));
    c.prepare_dsr(&bin, *vip.ip()).unwrap_or_else(|e| panic!("{e}"));
    let tmp = super::tls::TempDir::new();
    let config = tmp.write("node.yaml", &cluster::node_config(&c, *vip.ip(), vip.port(), "dsr", admin_port));
    Some((c, tmp, config))
}

/// SpeedMimi on cluster node `i` with `config`, its output appended to `log`; killed when dropped.
pub fn start_node(c: &cluster::Cluster, i: usize, config: &std::path::Path, log: &std::path::Path) -> Killed {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = command_in(&c.ns_node(i), &[env!("CARGO_BIN_EXE_speedmimi"), "-c", &config.to_string_lossy()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("SPEEDMIMI_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start a node");
    Killed(child)
}
