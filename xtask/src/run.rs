//! `cargo xtask run`: builds everything and runs the daemon, with three demo backends by default.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode},
};

use anyhow::{Context, bail};

use crate::{build_ebpf, workspace};

/// Demo backends started when no config is given: (port, id).
const DEMO_BACKENDS: [(u16, &str); 3] = [(8081, "backend1"), (8082, "backend2"), (8083, "backend3")];
/// Config used with the demo backends, relative to the workspace root.
const DEMO_CONFIG: &str = "configs/config.yaml";

/// Builds the eBPF object and the daemon, then runs the daemon until it exits.
pub fn run(release: bool, daemon_args: &[String]) -> anyhow::Result<ExitCode> {
    if let Err(err) = build_ebpf::build_ebpf(release) {
        eprintln!("xtask: eBPF build unavailable, the daemon will run L7-only: {err:#}");
    }
    let bin = build_daemon(release)?;

    // Ctrl-C reaches the whole foreground process group: the children handle it themselves,
    // and we must survive it to reap them.
    survive_sigint();

    let demo = !has_config_arg(daemon_args);
    let mut backends = Children::default();
    if demo {
        for (port, id) in DEMO_BACKENDS {
            let child = Command::new(&bin)
                .args(["demo-backend", "--port", &port.to_string(), "--id", id])
                .current_dir(workspace::root())
                .spawn()
                .with_context(|| format!("failed to start demo backend {id}"))?;
            backends.0.push(child);
        }
        wait_for_backends(&mut backends)?;
    }

    let mut daemon = daemon_command(&bin, demo, daemon_args);
    println!("xtask: starting {}", workspace::describe(&daemon));
    let mut daemon = daemon.spawn().with_context(|| format!("failed to start {}", workspace::describe(&daemon)))?;
    print_hints();

    let status = daemon.wait().context("failed to wait for the daemon")?;
    drop(backends);
    println!("xtask: daemon exited ({status})");
    Ok(workspace::exit_code(status))
}

/// `cargo build -p speedmimi` with the chosen profile; returns the binary's path.
fn build_daemon(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = workspace::cargo();
    cmd.args(["build", "-p", "speedmimi"]);
    if release {
        cmd.arg("--release");
    }
    workspace::run_checked(&mut cmd)?;
    let bin = workspace::target_dir().join(if release { "release" } else { "debug" }).join("speedmimi");
    if !bin.exists() {
        bail!("the daemon build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Whether the daemon arguments already name a config file.
fn has_config_arg(args: &[String]) -> bool {
    args.iter().any(|a| {
        a == "-c" || a == "--config" || a.starts_with("--config=") || (a.starts_with("-c") && !a.starts_with("--"))
    })
}

/// The daemon command: under `sudo -E` when we are not root and sudo exists.
fn daemon_command(bin: &Path, demo: bool, args: &[String]) -> Command {
    let mut cmd = if workspace::is_root() {
        Command::new(bin)
    } else if let Some(sudo) = workspace::find_on_path("sudo") {
        println!("xtask: not root, running the daemon with sudo -E (eBPF needs root)");
        let mut cmd = Command::new(sudo);
        cmd.arg("-E").arg(bin);
        cmd
    } else {
        println!("xtask: not root and no sudo: the daemon will run L7-only");
        Command::new(bin)
    };
    if demo {
        cmd.args(["--config", DEMO_CONFIG]).current_dir(workspace::root());
    }
    cmd.args(args);
    cmd
}

/// Waits until every demo backend accepts TCP connections, failing if one exits.
fn wait_for_backends(backends: &mut Children) -> anyhow::Result<()> {
    for ((port, id), child) in DEMO_BACKENDS.iter().zip(backends.0.iter_mut()) {
        workspace::wait_port(*port, child)
            .with_context(|| format!("demo backend {id} (is port {port} already in use?)"))?;
    }
    println!("xtask: demo backends listening on ports 8081, 8082, 8083");
    Ok(())
}

/// Commands a newcomer can paste into another terminal.
fn print_hints() {
    println!(
        "\nxtask: try it from another terminal (Ctrl-C here stops everything):\n  \
         curl -s localhost:8080/          # repeat: requests rotate over the backends\n  \
         curl -s localhost:8080/\n  \
         curl -s localhost:8080/\n  \
         curl -s localhost:8080/health\n  \
         curl -N localhost:8080/events    # live server-sent events (SSE)\n  \
         and open http://127.0.0.1:9091/ in a browser: the live dashboard\n"
    );
}

/// Child processes killed and reaped when dropped, on every exit path.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // Already gone after a Ctrl-C: kill then fails harmlessly and wait reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Replaces the default SIGINT action (terminate) with a no-op handler for this process.
///
/// A caught signal is reset to its default on exec, so children still get the normal Ctrl-C.
fn survive_sigint() {
    const SIGINT: i32 = 2;
    extern "C" fn on_sigint(_: i32) {}
    unsafe extern "C" {
        // From the C library std already links; returns the previous handler.
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    }
    // SAFETY: `signal` is the libc function of that signature; the handler is async-signal-safe
    // (it does nothing).
    unsafe {
        signal(SIGINT, on_sigint);
    }
}
