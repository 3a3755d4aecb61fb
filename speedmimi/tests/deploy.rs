//! What we ship for deployment, checked with the tools operators use: the systemd unit passes
//! `systemd-analyze verify` and its hardening scores as systemd rates it; the capabilities the
//! unit grants are enough to load the eBPF programs as an unprivileged user (the daemon run
//! under `setpriv` with exactly them), and without them the daemon names what is missing.

mod support;

use std::{path::Path, process::Command, time::Duration};

use support::{
    Origin,
    daemon::{Daemon, free_ports},
    packages::required,
    root_or_skip,
    tls::TempDir,
};

const UNIT: &str = include_str!("../../deploy/speedmimi.service");

/// The unit as installed, with this build's binary where `make install` puts the binary.
fn unit_here(dir: &TempDir) -> std::path::PathBuf {
    dir.write("speedmimi.service", &UNIT.replace("/usr/local/bin/speedmimi", env!("CARGO_BIN_EXE_speedmimi")))
}

#[test]
fn the_unit_verifies_and_scores_as_hardened() {
    let Some(analyze) = required("the_unit_verifies_and_scores_as_hardened", "systemd-analyze", "systemd") else {
        return;
    };
    let dir = TempDir::new();
    let unit = unit_here(&dir);
    let out = Command::new(&analyze).arg("verify").arg(&unit).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");

    // A unit with a misspelt setting is not silently accepted: the check can fail.
    let bad = dir.write("bad.service", &std::fs::read_to_string(&unit).unwrap().replace("RestartSec=", "RestartSecs="));
    let out = Command::new(&analyze).arg("verify").arg(&bad).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("RestartSecs"), "a bad key went unnoticed");

    let out = Command::new(&analyze).args(["security", "--offline=yes", "--no-pager"]).arg(&unit).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for speedmimi.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}{}", String::from_utf8_lossy(&out.stderr)));
    eprintln!("systemd-analyze security: exposure {score} (0 = locked down, 10 = none)");
    assert!(score <= 3.0, "the unit's exposure is {score}:\n{text}");
    for needed in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "LimitNOFILE=", "Restart=on-failure", "ExecReload="] {
        assert!(UNIT.contains(needed), "the unit lacks {needed}");
    }
}

/// This build's binary run as user `nobody` (`setpriv`), with `caps` (setpriv's syntax, e.g.
/// `,+bpf`) as its inheritable, ambient and bounding sets, so they survive the exec; with no
/// `caps`, the capability sets are left as setpriv leaves them for a non-root user.
fn as_nobody_cmd(caps: Option<&str>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    if let Some(caps) = caps {
        let set = format!("-all{caps}");
        cmd.arg(format!("--inh-caps={set}")).arg(format!("--ambient-caps={set}")).arg(format!("--bounding-set={set}"));
    }
    cmd.arg("--").arg(env!("CARGO_BIN_EXE_speedmimi"));
    cmd
}

/// The daemon as user `nobody` with the given capabilities.
fn as_nobody(caps: &str, config: &Path, log: std::path::PathBuf) -> Daemon {
    Daemon::spawn_with(as_nobody_cmd(Some(caps)), config, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_units_capabilities_load_ebpf_without_root() {
    if !root_or_skip("the_units_capabilities_load_ebpf_without_root") {
        return;
    }
    let dir = TempDir::new();
    let origin = Origin::start("a").await;
    let (port, admin) = free_ports();
    let config = dir.write(
        "config.yaml",
        &format!(
            "server: {{host: 127.0.0.1, port: {port}}}\nadmin: {{host: 127.0.0.1, port: {admin}}}\n\
             backends:\n  default:\n{}routing:\n  default: {{path: /, upstream: default}}\n\
             grpc: {{enabled: false}}\nebpf: {{enabled: true}}\n",
            origin.yaml(100)
        ),
    );
    let daemon = as_nobody(",+bpf,+net_admin,+perfmon", &config, dir.0.join("caps.log"));
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", admin)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("http://127.0.0.1:{admin}/api/v1/stats/server");
    let (_, stats) = support::admin_call(http::Method::GET, &url, None, None, Duration::from_secs(5)).await;
    let datapath = stats["datapath"].as_str().unwrap_or_else(|| panic!("no answer: {}", daemon.log())).to_owned();
    assert!(datapath.starts_with("kernel"), "datapath {datapath:?}: {}", daemon.log());
    let c = support::client();
    assert_eq!(support::who(&c, &format!("http://127.0.0.1:{port}/"), &[]).await, "a");
    drop(daemon);

    // Without them: eBPF required (`enabled: true`) means a refused start that names them.
    let (port2, admin2) = free_ports();
    let config = dir.write(
        "config2.yaml",
        &std::fs::read_to_string(&config)
            .unwrap()
            .replace(&format!("port: {port}}}"), &format!("port: {port2}}}"))
            .replace(&format!("port: {admin}}}"), &format!("port: {admin2}}}")),
    );
    let mut daemon = as_nobody("", &config, dir.0.join("nocaps.log"));
    let status = daemon.exit(Duration::from_secs(10)).await.expect("the daemon should refuse to start");
    assert!(!status.success());
    let log = daemon.log();
    assert!(log.contains("CAP_BPF") && log.contains("uid 65534"), "{log}");
}

/// `speedmimi tune` against a copy of this host's settings: it prints each with its reason, the
/// first `--apply` raises what is low (never lowering a higher value), the second changes
/// nothing; without root `--apply` refuses and changes nothing, while printing still works.
#[test]
fn tune_prints_then_applies_once_and_only_raises() {
    let dir = TempDir::new();
    let root = dir.0.join("sys");
    let keys = ["net.core.somaxconn", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_tw_reuse", "fs.nr_open"];
    let set = |key: &str, value: &str| {
        let path = root.join(key.replace('.', "/"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, value).unwrap();
    };
    let get = |key: &str| std::fs::read_to_string(root.join(key.replace('.', "/"))).unwrap();
    for key in keys {
        let live = std::fs::read_to_string(Path::new("/proc/sys").join(key.replace('.', "/"))).unwrap();
        set(key, live.trim());
    }
    // Tuned further than we would: stays.
    set("fs.nr_open", "9000000");
    set("net.core.somaxconn", "128");
    set("net.ipv4.ip_local_port_range", "32768\t60999");
    let tune = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_speedmimi"))
            .arg("tune")
            .arg("--sysctl-root")
            .arg(&root)
            .arg("--conf")
            .arg(dir.0.join("60-speedmimi.conf"))
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, printed) = tune(&[]);
    assert!(ok, "{printed}");
    assert!(printed.contains("net.core.somaxconn             128 -> 65535"), "{printed}");
    assert!(printed.contains("fs.nr_open                     9000000 (ok)"), "{printed}");
    assert!(printed.contains("# listen backlog cap"), "every line says why: {printed}");
    assert!(printed.contains("net.ipv4.tcp_max_syn_backlog") && printed.contains("not on this kernel"), "{printed}");
    assert_eq!(get("net.core.somaxconn"), "128", "printing changed a value");

    let reuse_changes = usize::from(get("net.ipv4.tcp_tw_reuse").trim() != "1");
    let (ok, applied) = tune(&["--apply"]);
    assert!(ok && applied.contains(&format!("applied: {} changed now", 2 + reuse_changes)), "{applied}");
    assert_eq!(get("net.core.somaxconn"), "65535");
    assert_eq!(get("net.ipv4.ip_local_port_range"), "10000 65535");
    assert_eq!(get("net.ipv4.tcp_tw_reuse"), "1");
    assert_eq!(get("fs.nr_open"), "9000000", "a higher value was lowered");
    let conf = std::fs::read_to_string(dir.0.join("60-speedmimi.conf")).unwrap();
    assert!(conf.contains("net.core.somaxconn = 65535") && conf.contains("net.ipv4.tcp_tw_reuse = 1"), "{conf}");
    assert!(!conf.contains("fs.nr_open"), "the operator's own higher value went into our file: {conf}");

    let (ok, again) = tune(&["--apply"]);
    assert!(ok && again.contains("applied: 0 changed now"), "not idempotent: {again}");
    assert_eq!(std::fs::read_to_string(dir.0.join("60-speedmimi.conf")).unwrap(), conf);

    // Without root (as nobody, where we are root): a polite refusal; the real settings print.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        set("net.core.somaxconn", "128");
        let out = as_nobody_cmd(None)
            .args(["tune", "--apply", "--sysctl-root"])
            .arg(&root)
            .arg("--conf")
            .arg(dir.0.join("60-speedmimi.conf"))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains("needs root") && said.contains("sudo"), "{said}");
        assert_eq!(get("net.core.somaxconn"), "128", "a refused apply changed a value");
        let out = as_nobody_cmd(None).arg("tune").output().unwrap();
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("fs.nr_open"));
    }
}

/// `deploy/install.sh` into a scratch root: a dry run changes nothing, the install puts every
/// file (paths following --prefix), a second run changes nothing, and an operator's config is
/// never overwritten.
#[test]
fn install_is_idempotent_and_keeps_the_operators_config() {
    let dir = TempDir::new();
    let dest = dir.0.join("root");
    let install = |extra: &[&str]| {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/install.sh"))
            .args(["--binary", env!("CARGO_BIN_EXE_speedmimi"), "--prefix", "/opt/sm", "--destdir"])
            .arg(&dest)
            .args(extra)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "install.sh {extra:?}: {said}");
        said
    };
    let files = [
        "opt/sm/bin/speedmimi",
        "etc/speedmimi/config.yaml",
        "etc/speedmimi/config.yaml.default",
        "etc/systemd/system/speedmimi.service",
        "etc/logrotate.d/speedmimi",
        "opt/sm/share/doc/speedmimi/README.md",
    ];
    let dry = install(&["--dry-run"]);
    assert_eq!(dry.matches("would put").count(), files.len(), "{dry}");
    assert!(!dest.exists(), "a dry run wrote files");

    let first = install(&[]);
    assert_eq!(first.matches("installed").count(), files.len(), "{first}");
    for f in files {
        assert!(dest.join(f).is_file(), "{f} missing after install: {first}");
    }
    let unit = std::fs::read_to_string(dest.join("etc/systemd/system/speedmimi.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/sm/bin/speedmimi --config") && !unit.contains("/usr/local/"), "{unit}");
    // The installed config is valid (its access log moved somewhere this test may write).
    let config = std::fs::read_to_string(dest.join("etc/speedmimi/config.yaml")).unwrap();
    assert!(config.contains("access_log: \"/var/log/speedmimi/access.log\""), "{config}");
    let here = dir.write(
        "check.yaml",
        &config.replace("/var/log/speedmimi/access.log", &dir.0.join("a.log").display().to_string()),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_speedmimi")).arg("--check").arg("-c").arg(&here).output().unwrap();
    assert!(out.status.success(), "the installed config: {}", String::from_utf8_lossy(&out.stderr));

    let again = install(&[]);
    assert!(!again.contains("installed"), "a second run changed files: {again}");
    assert_eq!(again.matches("unchanged").count(), files.len() - 1, "{again}");

    std::fs::write(dest.join("etc/speedmimi/config.yaml"), "# mine\n").unwrap();
    let mine = install(&[]);
    assert!(mine.contains("kept") && !mine.contains("installed"), "{mine}");
    assert_eq!(std::fs::read_to_string(dest.join("etc/speedmimi/config.yaml")).unwrap(), "# mine\n");
}

/// Images this test made; removed (and unmounted) when dropped, also when the test fails.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("podman").args(["image", "unmount", image]).output();
            let _ = Command::new("podman").args(["rmi", "--force", image]).output();
        }
    }
}

/// `deploy/Containerfile` built with podman as far as this machine allows: no registry is reachable and no
/// container can start here (README, Install), so the base is made from this build's own libraries and the
/// binary comes prebuilt (`BINARY_FROM`); the runtime stage builds, and the binary inside the image, run by
/// chroot, accepts the image's config.
#[test]
fn the_container_image_builds_and_its_binary_runs() {
    if !root_or_skip("the_container_image_builds_and_its_binary_runs") {
        return;
    }
    let Some(podman) = required("the_container_image_builds_and_its_binary_runs", "podman", "podman") else { return };
    let run = |args: &[&str], input: Option<&Path>| {
        let mut cmd = Command::new(&podman);
        cmd.args(args);
        if let Some(dir) = input {
            // `podman import -` of the directory's tar.
            let tar = Command::new("tar").arg("-C").arg(dir).args(["-c", "."]).output().unwrap();
            assert!(tar.status.success());
            let mut child =
                cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), &tar.stdout).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "podman {args:?}");
            return String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let dir = TempDir::new();
    let tag = std::process::id();
    let (base, binary, image) = (
        format!("localhost/speedmimi-test-base:{tag}"),
        format!("localhost/speedmimi-test-binary:{tag}"),
        format!("localhost/speedmimi-test:{tag}"),
    );
    let _images = Images(vec![image.clone(), binary.clone(), base.clone()]);

    // The base: the shared libraries the binary links, where the loader looks for them.
    let exe = env!("CARGO_BIN_EXE_speedmimi");
    let ldd = String::from_utf8(Command::new("ldd").arg(exe).output().unwrap().stdout).unwrap();
    let root = dir.0.join("base");
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(lib, &to).unwrap();
    }
    run(&["import", "-", &base], Some(&root));
    let bin = dir.0.join("bin");
    std::fs::create_dir_all(bin.join("out")).unwrap();
    std::fs::copy(exe, bin.join("out/speedmimi")).unwrap();
    run(&["import", "-", &binary], Some(&bin));

    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    run(
        &[
            "build",
            "--build-arg",
            &format!("BINARY_FROM={binary}"),
            "--build-arg",
            &format!("RUNTIME_IMAGE={base}"),
            "-t",
            &image,
            "-f",
            &format!("{repo}/deploy/Containerfile"),
            repo,
        ],
        None,
    );
    let mount = run(&["image", "mount", &image], None);
    let out = Command::new("chroot")
        .arg(&mount)
        .args(["/usr/local/bin/speedmimi", "--check", "--config", "/etc/speedmimi/config.yaml"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("/etc/speedmimi/config.yaml: ok"), "{said}");
}
