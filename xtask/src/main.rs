//! Command-line entry point of `cargo xtask`: parses the subcommand and dispatches to its module.

mod bench;
mod build_ebpf;
mod run;
mod test;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// SpeedMimi developer tasks (`cargo xtask <command>`).
#[derive(Debug, Parser)]
#[command(name = "xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the eBPF toolchain if missing (rust-src, LLVM 22, bpf-linker) and build the kernel object.
    BuildEbpf {
        /// Build the eBPF object with the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build everything and start the daemon (with three demo backends unless a config is given).
    Run {
        /// Build with the release profile (the default).
        #[arg(long, conflicts_with = "debug")]
        release: bool,
        /// Build with the dev profile.
        #[arg(long)]
        debug: bool,
        /// Arguments passed to the daemon (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks, side by side with the peers (needs root: installs nginx, haproxy, wrk).
    Bench {
        #[command(subcommand)]
        which: BenchKind,
    },
    /// Build the eBPF object, then run the workspace test suite.
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum BenchKind {
    /// HTTP/1.1 keep-alive small responses: SpeedMimi, HAProxy, nginx and direct.
    Http {
        /// Interleaved rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent client connections.
        #[arg(long, default_value_t = 50)]
        connections: u32,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::BuildEbpf { debug } => {
            build_ebpf::build_ebpf(!debug)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { release: _, debug, args } => run::run(!debug, &args),
        Command::Test { args } => test::test(&args),
        Command::Bench { which: BenchKind::Http { rounds, seconds, connections } } => {
            bench::http(&bench::Options { rounds, seconds, connections })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
