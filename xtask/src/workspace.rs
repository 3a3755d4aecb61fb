//! Shared facts about the environment: workspace root, cargo binary, target and cargo-home dirs, privileges, CPU
//! time used (per process and whole machine).

use std::{
    env,
    ffi::OsString,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The workspace root (parent of the xtask crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives inside the workspace").to_path_buf()
}

/// A `Command` for the cargo that invoked us (env `CARGO`, falling back to `cargo`), run in the root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// The cargo target directory: `CARGO_TARGET_DIR` (made absolute) or `<root>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() { dir } else { env::current_dir().map(|cwd| cwd.join(&dir)).unwrap_or(dir) }
        }
        None => root().join("target"),
    }
}

/// `$CARGO_HOME`, defaulting to `~/.cargo`.
pub fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
}

/// `PATH` with `$CARGO_HOME/bin` appended (so tools installed by `cargo install` are found).
pub fn path_with_cargo_bin() -> anyhow::Result<OsString> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH").map(|p| env::split_paths(&p).collect()).unwrap_or_default();
    let bin = cargo_home().join("bin");
    if !dirs.contains(&bin) {
        dirs.push(bin);
    }
    env::join_paths(dirs).context("PATH contains an invalid entry")
}

/// Finds an executable named `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

/// Whether `path` is an executable regular file.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Whether we run with effective uid 0 (asks `id -u`).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs `cmd` with inherited stdio and fails unless it exits successfully.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("failed to start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// A human-readable rendering of `cmd` for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Maps a child's exit status to our own exit code (128 + signal when it was killed).
pub fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().or_else(|| status.signal().map(|sig| 128 + sig)).unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Waits (10 s at most) until something accepts TCP connections on 127.0.0.1:`port`, failing
/// early if `child` exits.
pub fn wait_port(port: u16, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("process exited before listening on {port} ({status})");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port} after 10 s")
}

/// This process's hard limit of open files (`Max open files` in /proc/self/limits); 1024 when unread.
pub fn open_files_limit() -> u64 {
    fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            let line = l.lines().find(|l| l.starts_with("Max open files"))?.to_owned();
            line.split_whitespace().nth(4)?.parse().ok()
        })
        .unwrap_or(1024)
}

/// utime + stime of the processes, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks = clock_ticks();
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // After the command, the state is index 0, so utime (field 14) is index 11.
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .sum()
}

/// user + nice + system + irq + softirq + steal of the whole machine, in seconds: softirq is where kernel
/// forwarding, splicing and XDP run, on whichever core the packets arrive.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let f: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 8 {
        bail!("short cpu line in /proc/stat");
    }
    Ok((f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) as f64 / clock_ticks())
}

/// The kernel's clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of /proc CPU times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// Installs each named package whose program (of the same name) is missing.
pub(crate) fn ensure_packages(pkgs: &[&str]) -> anyhow::Result<()> {
    ensure_tools(&pkgs.iter().map(|&p| (p, p)).collect::<Vec<_>>())
}

/// Installs the package of each `(program, package)` whose program is missing.
pub(crate) fn ensure_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(p, _)| find_on_path(p).is_none() && !Path::new(&format!("/usr/sbin/{p}")).exists())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing {} (apt-get)", missing.join(", "));
    run_checked(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    run_checked(
        Command::new("apt-get").args(["install", "-y"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // The packages start system services on install; the benchmark runs its own instances.
    for p in &missing {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("service {p} stop >/dev/null 2>&1; pkill -x {p} || true"))
            .status();
    }
    Ok(())
}
