//! `server.reuse_port`: several SpeedMimi processes share the proxy port (SO_REUSEPORT), each
//! with its own admin API, and the kernel spreads new connections among them; a process
//! without it cannot take a port that is in use.

mod support;

use std::{path::PathBuf, time::Duration};

use support::{
    Origin,
    daemon::{Daemon, free_ports},
    tls::TempDir,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connections sent through the shared port, each a request of its own.
const CONNECTIONS: usize = 64;

fn config(dir: &TempDir, name: &str, port: u16, admin: u16, reuse_port: bool, origin: &Origin) -> PathBuf {
    dir.write(
        &format!("{name}.yaml"),
        &format!(
            "server: {{host: 127.0.0.1, port: {port}, workers: 1, reuse_port: {reuse_port}}}\n\
             admin: {{host: 127.0.0.1, port: {admin}}}\n\
             backends:\n  default:\n{}routing:\n  default: {{path: /, upstream: default}}\n\
             grpc: {{enabled: false}}\nebpf: {{enabled: false}}\n",
            origin.yaml(100)
        ),
    )
}

/// The daemon's server stats, once its admin API answers (bounded, 10 s).
async fn stats(daemon: &Daemon, admin: u16) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = get(admin, "/api/v1/stats/server").await
            && let Some(body) = text.split("\r\n\r\n").nth(1)
            && let Ok(v) = serde_json::from_str(body)
        {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "admin API on {admin} did not answer in 10 s: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request on a connection of its own: the whole answer.
async fn get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.map_err(std::io::Error::other)??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_port_and_a_third_without_reuse_port_is_refused() {
    let dir = TempDir::new();
    let origin = Origin::start("a").await;
    let (port, admin_a) = free_ports();
    let (admin_b, admin_c) = free_ports();
    let a = Daemon::spawn(&config(&dir, "a", port, admin_a, true, &origin), dir.0.join("a.log"));
    let b = Daemon::spawn(&config(&dir, "b", port, admin_b, true, &origin), dir.0.join("b.log"));
    let total = |v: &serde_json::Value| v["connections"]["total"].as_u64().expect("connections.total");
    let before = [total(&stats(&a, admin_a).await), total(&stats(&b, admin_b).await)];

    // Without reuse_port, the port is taken: the third process says so and exits.
    let mut c = Daemon::spawn(&config(&dir, "c", port, admin_c, false, &origin), dir.0.join("c.log"));
    let status = c.exit(Duration::from_secs(10)).await.expect("a process without reuse_port kept running");
    assert!(!status.success(), "it exited with success");
    assert!(c.log().contains(&format!("cannot listen on 127.0.0.1:{port}")), "its log: {}", c.log());

    // Each connection goes to one of the two, and both get some (all 64 to one of two equal
    // listeners happens with probability 2^-63).
    for i in 0..CONNECTIONS {
        let answer = get(port, &format!("/?n={i}")).await.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
    }
    let served = [total(&stats(&a, admin_a).await) - before[0], total(&stats(&b, admin_b).await) - before[1]];
    assert_eq!(served.iter().sum::<u64>(), CONNECTIONS as u64, "connections served by each: {served:?}");
    assert!(served.iter().all(|n| *n > 0), "connections served by each: {served:?}");
}
