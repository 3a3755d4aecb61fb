//! `cargo xtask fuzz`: installs cargo-fuzz when missing, builds the libFuzzer targets under `fuzz/`
//! and runs each for a bounded time from its committed seed corpus; fails on a crash or a hang.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, bail};

use crate::{build_ebpf, workspace};

/// The targets, in the order they run. `xdp` needs root (BPF_PROG_TEST_RUN) and the eBPF object.
pub const TARGETS: [&str; 5] = ["config", "request_head", "h1_response", "admin", "xdp"];
/// The cargo-fuzz release the targets are known to build with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// One input running longer than this is a hang: libFuzzer stops and saves it (`-timeout`).
const INPUT_TIMEOUT_SECS: u64 = 10;

pub struct Options {
    /// Seconds of fuzzing per target.
    pub time: u64,
    /// Targets to run; empty = all.
    pub targets: Vec<String>,
}

/// Builds every target, then runs each for `time` seconds; stops at the first that fails.
pub fn fuzz(opts: &Options) -> anyhow::Result<ExitCode> {
    let targets: Vec<&str> = match opts.targets.is_empty() {
        true => TARGETS.to_vec(),
        false => opts.targets.iter().map(String::as_str).collect(),
    };
    if let Some(bad) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!("no fuzz target {bad:?}; the targets are {}", TARGETS.join(", "));
    }
    let mut targets = targets;
    if targets.contains(&"xdp") {
        if workspace::is_root() {
            build_ebpf::build_ebpf(true).context("the xdp target runs the eBPF object, which must build first")?;
        } else if std::env::var("CI").as_deref() == Ok("true") {
            bail!("the xdp fuzz target needs root (BPF_PROG_TEST_RUN), and CI must run it");
        } else {
            println!("xtask: skipping the xdp fuzz target: it needs root (BPF_PROG_TEST_RUN)");
            targets.retain(|t| *t != "xdp");
        }
    }
    ensure_cxx()?;
    ensure_cargo_fuzz()?;
    let fuzz_dir = workspace::root().join("fuzz");
    let started = Instant::now();
    workspace::run_checked(&mut fuzz_command(&fuzz_dir, "build", &[]))?;
    println!("xtask: fuzz targets built in {:.0?}", started.elapsed());

    for target in targets {
        // New inputs go to a scratch corpus under target/; the committed seeds stay as they are.
        let scratch = workspace::target_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch).with_context(|| format!("create {}", scratch.display()))?;
        let seeds = fuzz_dir.join("corpus").join(target);
        let args = [
            target.to_owned(),
            scratch.display().to_string(),
            seeds.display().to_string(),
            "--".into(),
            format!("-max_total_time={}", opts.time),
            format!("-timeout={INPUT_TIMEOUT_SECS}"),
            "-rss_limit_mb=2048".into(),
            "-print_final_stats=1".into(),
        ];
        println!("xtask: fuzzing {target} for {} s", opts.time);
        let mut cmd = fuzz_command(&fuzz_dir, "run", &args);
        let status = cmd.status().with_context(|| format!("failed to start {}", workspace::describe(&cmd)))?;
        if !status.success() {
            println!(
                "xtask: fuzz target {target} failed ({status}); the input is under {}",
                fuzz_dir.join("artifacts").join(target).display()
            );
            return Ok(workspace::exit_code(status));
        }
    }
    println!("xtask: the fuzz targets ran without a crash or a hang ({:.0?} in all)", started.elapsed());
    Ok(ExitCode::SUCCESS)
}

/// `cargo fuzz <sub> --sanitizer none ...` in `fuzz/`, on the stable toolchain.
///
/// cargo-fuzz passes `-Z` flags, which `RUSTC_BOOTSTRAP=1` allows on stable. No sanitizer: the
/// code under test is safe Rust (the eBPF program is checked by the verifier instead), and an
/// AddressSanitizer build of every dependency would double the build time CI pays for.
fn fuzz_command(fuzz_dir: &Path, sub: &str, args: &[String]) -> Command {
    let mut cmd = workspace::cargo();
    cmd.current_dir(fuzz_dir)
        .args(["fuzz", sub, "--sanitizer", "none"])
        .args(args)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", workspace::path_with_cargo_bin().unwrap_or_default());
    cmd
}

/// Installs cargo-fuzz unless `cargo fuzz` already runs.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let bin: PathBuf = workspace::cargo_home().join("bin").join("cargo-fuzz");
    if workspace::find_on_path("cargo-fuzz").is_some() || workspace::is_executable(&bin) {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install cargo-fuzz --locked)");
    workspace::run_checked(workspace::cargo().args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// libfuzzer-sys compiles libFuzzer itself: a C++ compiler must be present (g++ from apt if not).
fn ensure_cxx() -> anyhow::Result<()> {
    if ["c++", "g++", "clang++"].iter().any(|c| workspace::find_on_path(c).is_some()) {
        return Ok(());
    }
    if !workspace::is_root() {
        bail!("no C++ compiler (libfuzzer-sys builds libFuzzer): install g++, e.g. `sudo apt-get install g++`");
    }
    println!("xtask: installing g++ (libfuzzer-sys builds libFuzzer)");
    workspace::run_checked(Command::new("apt-get").args(["update"]))?;
    workspace::run_checked(
        Command::new("apt-get").args(["install", "-y", "g++"]).env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
