//! Programs tests drive (HAProxy, Chromium): found on PATH or in the sbin directories, else
//! installed from Debian's packages with apt-get when the test runs as root.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

/// `program`'s path; installs `package` first if it is missing (then runs `installed`, e.g. to
/// stop a service the package started). Err says why there is none.
pub fn find_or_install(program: &str, package: &str, installed: impl FnOnce()) -> Result<PathBuf, String> {
    if let Some(path) = find(program) {
        return Ok(path);
    }
    // Tests of one binary run in parallel threads; two apt-gets at once fight over dpkg's lock.
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = APT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = find(program) {
        return Ok(path);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!("{program} is not installed, and installing {package} needs root"));
    }
    // The package lists may be missing or stale: update once if the first try fails.
    apt_get(&["install", "-y", package])
        .or_else(|_| apt_get(&["update"]).and_then(|()| apt_get(&["install", "-y", package])))?;
    installed();
    find(program).ok_or_else(|| format!("apt-get installed {package}, but no {program} is on PATH or in /usr/sbin"))
}

/// `program` for `test`, found or installed: without it, under CI=true a panic (CI must run the
/// test), elsewhere None and a printed reason to skip.
pub fn required(test: &str, program: &str, package: &str) -> Option<PathBuf> {
    match find_or_install(program, package, || {}) {
        Ok(path) => Some(path),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: no {program}, and CI must run it: {e}")
        }
        Err(e) => {
            eprintln!("skipping {test}: {e}");
            None
        }
    }
}

/// BIRD, found or installed (the package may start its own daemon, on the host's config: stopped, ours run on
/// their own); None (with a printed reason) when it cannot be had outside CI.
pub fn bird(test: &str) -> Option<PathBuf> {
    match find_or_install("bird", "bird2", || {
        let _ = std::process::Command::new("pkill").args(["-x", "bird"]).status();
    }) {
        Ok(path) => Some(path),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{test}: no BIRD, and CI must run it: {e}"),
        Err(e) => {
            eprintln!("skipping {test}: {e}");
            None
        }
    }
}

fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn apt_get(args: &[&str]) -> Result<(), String> {
    let out = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("apt-get {}: {e}", args.join(" ")))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "apt-get {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}
