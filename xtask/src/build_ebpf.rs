//! `cargo xtask build-ebpf`: installs the eBPF toolchain when missing and builds the kernel object.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::workspace;

/// LLVM major version bpf-linker is built against.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_APT_PACKAGE: &str = "llvm-22-dev";
const BPF_TARGET: &str = "bpfel-unknown-none";
const EBPF_PACKAGE: &str = "speedmimi-ebpf";

/// Ensures the toolchain is present, builds `speedmimi-ebpf` and returns the object's path.
pub fn build_ebpf(release: bool) -> anyhow::Result<PathBuf> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    build_object(release)
}

/// Adds the `rust-src` component (needed by `-Z build-std`) if it is missing.
fn ensure_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("failed to run `rustup component list --installed` (is rustup installed?)")?;
    if !out.status.success() {
        bail!("`rustup component list --installed` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let installed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|line| line.trim() == "rust-src" || line.trim().starts_with("rust-src-"));
    if !installed {
        println!("xtask: installing the rust-src component (rustup component add rust-src)");
        workspace::run_checked(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    Ok(())
}

/// Installs bpf-linker (and the LLVM it links against) unless it is on PATH or in `$CARGO_HOME/bin`.
fn ensure_bpf_linker() -> anyhow::Result<()> {
    if workspace::find_on_path("bpf-linker").is_some()
        || workspace::is_executable(&workspace::cargo_home().join("bin").join("bpf-linker"))
    {
        return Ok(());
    }
    ensure_llvm()?;
    println!(
        "xtask: installing bpf-linker against LLVM 22 \
         (cargo install bpf-linker --no-default-features --features llvm-22)"
    );
    workspace::run_checked(
        workspace::cargo()
            .args(["install", "bpf-linker", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )
}

/// Installs the LLVM 22 development package with apt when `llvm-config` is missing.
fn ensure_llvm() -> anyhow::Result<()> {
    let llvm_config = Path::new(LLVM_PREFIX).join("bin/llvm-config");
    if llvm_config.exists() {
        return Ok(());
    }
    if !workspace::is_root() {
        bail!(
            "{} is missing and bpf-linker needs it; install LLVM 22 first with:\n  \
             sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {LLVM_APT_PACKAGE}\n\
             then re-run `cargo xtask build-ebpf`",
            llvm_config.display()
        );
    }
    println!("xtask: updating apt package lists (apt-get update)");
    workspace::run_checked(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    println!("xtask: installing LLVM 22 (apt-get install -y {LLVM_APT_PACKAGE})");
    workspace::run_checked(
        Command::new("apt-get").args(["install", "-y", LLVM_APT_PACKAGE]).env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| {
        format!(
            "could not install {LLVM_APT_PACKAGE}; if apt does not know it, add the LLVM apt \
             repository (https://apt.llvm.org, e.g. `llvm.sh 22`) and retry"
        )
    })?;
    if !llvm_config.exists() {
        bail!("{LLVM_APT_PACKAGE} is installed but {} is still missing", llvm_config.display());
    }
    Ok(())
}

/// Builds the kernel object with `-Z build-std=core` and returns its path.
fn build_object(release: bool) -> anyhow::Result<PathBuf> {
    let target_dir = workspace::target_dir();
    let mut cmd = workspace::cargo();
    cmd.args(["build", "-p", EBPF_PACKAGE, "--target", BPF_TARGET, "-Z", "build-std=core"]);
    if release {
        cmd.arg("--release");
    }
    cmd.env("RUSTC_BOOTSTRAP", "1").env("PATH", workspace::path_with_cargo_bin()?).env("CARGO_TARGET_DIR", &target_dir);
    workspace::run_checked(&mut cmd).context("building the eBPF object failed")?;

    let profile = if release { "release" } else { "debug" };
    let object = target_dir.join(BPF_TARGET).join(profile).join(EBPF_PACKAGE);
    let size = std::fs::metadata(&object)
        .with_context(|| format!("the eBPF build succeeded but {} is missing", object.display()))?
        .len();
    println!("xtask: eBPF object {} ({size} bytes)", object.display());
    Ok(object)
}
