//! `cargo xtask test`: builds the eBPF object, then runs the workspace test suite.

use std::process::ExitCode;

use anyhow::Context;

use crate::{build_ebpf, workspace};

/// Builds the eBPF object (root-only tests load it) and runs `cargo test` on the workspace.
pub fn test(extra: &[String]) -> anyhow::Result<ExitCode> {
    build_ebpf::build_ebpf(true).context("the test suite includes eBPF tests, so the eBPF object must build first")?;

    if !workspace::is_root() && std::env::var("CI").as_deref() != Ok("true") {
        println!("xtask: note: not running as root, so root-only (eBPF) tests will skip");
    }

    let mut cmd = workspace::cargo();
    cmd.args(["test", "--workspace", "--exclude", "speedmimi-ebpf"]).args(extra);
    let status = cmd.status().with_context(|| format!("failed to start {}", workspace::describe(&cmd)))?;
    Ok(workspace::exit_code(status))
}
