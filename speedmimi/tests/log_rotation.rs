//! Log rotation as operators run it: the real binary writes its access log under load, the
//! real logrotate rotates it with the snippet we ship (`deploy/speedmimi.logrotate`, its path
//! and signal command pointed at this test's daemon), and every request has exactly one line,
//! in the rotated file or the new one.

mod support;

use std::{collections::HashMap, time::Duration};

use support::{
    Origin, client,
    daemon::{Daemon, free_ports},
    packages::required,
    tls::TempDir,
    who,
};

/// Clients, and requests each sends.
const CLIENTS: usize = 4;
const EACH: usize = 750;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logrotate_under_load_loses_and_repeats_no_line() {
    let Some(logrotate) = required("logrotate_under_load_loses_and_repeats_no_line", "logrotate", "logrotate") else {
        return;
    };
    let dir = TempDir::new();
    let access = dir.0.join("access.log");
    let origin = Origin::start("a").await;
    let (port, admin) = free_ports();
    let config = dir.write(
        "config.yaml",
        &format!(
            "server: {{host: 127.0.0.1, port: {port}, access_log: \"{}\"}}\nadmin: {{host: 127.0.0.1, port: {admin}}}\n\
             backends:\n  default:\n{}routing:\n  default: {{path: /, upstream: default}}\n\
             grpc: {{enabled: false}}\nebpf: {{enabled: false}}\n",
            access.display(),
            origin.yaml(100)
        ),
    );
    let daemon = Daemon::spawn(&config, dir.0.join("daemon.log"));
    let url = format!("http://127.0.0.1:{port}/");
    let c = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::timeout(Duration::from_secs(1), c.get(url.parse().unwrap())).await.map_or(true, |r| r.is_err()) {
        assert!(tokio::time::Instant::now() < deadline, "the daemon did not serve in 10 s: {}", daemon.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The shipped snippet, pointed at this test's file and daemon.
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/speedmimi.logrotate")).unwrap();
    let conf = shipped
        .replace("/var/log/speedmimi/access.log", &access.display().to_string())
        .lines()
        .filter(|l| !l.trim_start().starts_with("create "))
        .map(|l| {
            if l.contains("systemctl kill") {
                format!("        kill -USR1 {}", daemon.child.id())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(conf.contains("kill -USR1") && conf.contains(&access.display().to_string()), "{conf}");
    let conf_path = dir.write("logrotate.conf", &conf);

    let load: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = client();
                for i in 0..EACH {
                    who(&c, &format!("{url}?r={t}-{i}"), &[]).await;
                }
            })
        })
        .collect();
    // Rotate while the load runs: after about a third of it.
    let lines = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default().lines().count();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while lines(&access) < CLIENTS * EACH / 3 {
        assert!(tokio::time::Instant::now() < deadline, "the access log did not grow: {}", daemon.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let out = std::process::Command::new(&logrotate)
        .arg("--force")
        .arg("--state")
        .arg(dir.0.join("logrotate.state"))
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "logrotate: {}", String::from_utf8_lossy(&out.stderr));
    for l in load {
        l.await.unwrap();
    }

    // Every request once, across the two files; both got lines.
    let rotated = dir.0.join("access.log.1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lines(&rotated) + lines(&access) < CLIENTS * EACH && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for path in [&rotated, &access] {
        for line in std::fs::read_to_string(path).unwrap().lines() {
            if let Some(tag) = line.split("?r=").nth(1).and_then(|t| t.split_whitespace().next()) {
                *seen.entry(tag.to_owned()).or_default() += 1;
            }
        }
    }
    let (before, after) = (lines(&rotated), lines(&access));
    eprintln!("rotation under load: {before} lines in the rotated file, {after} in the new one");
    assert!(before > 0 && after > 0, "lines before {before}, after {after}");
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "lines written twice: {repeated:?}");
    assert_eq!(seen.len(), CLIENTS * EACH, "requests with a line, of {}", CLIENTS * EACH);
    assert!(daemon.log().contains("access log reopened"), "{}", daemon.log());
}
