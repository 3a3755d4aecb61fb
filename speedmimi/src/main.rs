//! The `speedmimi` binary: parse the command line, load the config, run until a signal.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use speedmimi::{
    Listeners,
    config::Config,
    demo::{DemoBackend, Faults, Stall},
    preflight, shutdown, telemetry,
};

/// Bench builds count allocations, reported as `speedmimi_allocations_total` in `/metrics`.
#[cfg(feature = "count-allocs")]
#[global_allocator]
static ALLOCATOR: speedmimi::alloc_count::Counting = speedmimi::alloc_count::Counting;

#[derive(Parser)]
#[command(name = "speedmimi", version, about = "eBPF-assisted L4/L7 load balancer")]
struct Cli {
    /// Config file.
    #[arg(short, long, default_value = "configs/config.yaml", global = true)]
    config: PathBuf,
    /// Validate the config and exit (0 when valid).
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a demo origin: answers with its id, /health, WebSocket echo at /ws, SSE at /events,
    /// N bytes at /bytes?n=N. The knobs shape the answer to / (the balance benchmark's backends);
    /// /hits counts the requests it got.
    DemoBackend {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        id: String,
        #[command(flatten)]
        knobs: DemoKnobs,
    },
    /// On a DSR backend whose kernel lacks IPIP: strip the IPIP header SpeedMimi adds (XDP on
    /// the interface), so the stack sees the client's packet to the VIP. Runs until a signal.
    XdpDecap {
        #[arg(long)]
        interface: String,
    },
    /// Print the kernel settings a busy load balancer wants (current -> proposed, and why);
    /// with --apply, raise them live and in /etc/sysctl.d (root). Never lowers a value.
    Tune {
        /// Make the changes (the default only prints them).
        #[arg(long)]
        apply: bool,
        /// Where the sysctls are (for tests: a copy of /proc/sys).
        #[arg(long, default_value = "/proc/sys", hide = true)]
        sysctl_root: PathBuf,
        /// The persistent file --apply writes.
        #[arg(long, default_value = "/etc/sysctl.d/60-speedmimi.conf")]
        conf: PathBuf,
    },
}

/// Latency and faults of the demo origin's answer to `/`.
#[derive(clap::Args)]
struct DemoKnobs {
    /// Milliseconds every answer waits.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Milliseconds of a stall at the end of every `--stall-every-ms` period: answers due in it
    /// wait until it ends.
    #[arg(long, requires = "stall_every_ms")]
    stall_ms: Option<u64>,
    #[arg(long, requires = "stall_ms")]
    stall_every_ms: Option<u64>,
    /// Share of requests (0.0-1.0) answered 503 at once.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Share of requests (0.0-1.0) whose connection is reset (SO_LINGER 0) before any answer byte.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
}

impl DemoKnobs {
    fn faults(&self) -> anyhow::Result<Faults> {
        let stall = self.stall_ms.zip(self.stall_every_ms).map(|(length, every)| Stall {
            length: std::time::Duration::from_millis(length),
            every: std::time::Duration::from_millis(every),
        });
        let faults = Faults { stall, error_rate: self.error_rate, reset_rate: self.reset_rate };
        match faults.problem() {
            Some(p) => anyhow::bail!("demo-backend: {p}"),
            None => Ok(faults),
        }
    }
}

fn main() -> ExitCode {
    // SIGUSR1 (log rotation) would end the process by default until the daemon's handler is
    // installed; ignored until then, so a logrotate during startup costs nothing.
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
    telemetry::init();
    let cli = Cli::parse();
    if cli.check {
        // Everything startup checks short of binding and loading eBPF (see `preflight`).
        return match Config::load(&cli.config).and_then(|c| preflight::check(&c)) {
            Ok(_) => {
                println!("{}: ok", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", cli.config.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Tune { apply, sysctl_root, conf }) = &cli.command {
        return tune(*apply, speedmimi::tune::Host { sysctl: sysctl_root.clone(), conf: conf.clone() });
    }
    // One single-threaded event loop here; `run` adds one per further CPU (server.workers).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("speedmimi: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main(cli: Cli) -> anyhow::Result<()> {
    let (trigger, stop) = shutdown::channel();
    tokio::spawn(async move {
        wait_for_stop_signal().await;
        tracing::info!("stopping: no new connections, finishing open ones");
        trigger.fire();
    });
    match cli.command {
        Some(Command::DemoBackend { host, port, id, knobs }) => {
            let faults = knobs.faults()?;
            let listener = tokio::net::TcpListener::bind((host.as_str(), port))
                .await
                .with_context(|| format!("cannot listen on {host}:{port}"))?;
            tracing::info!(%id, addr = %listener.local_addr()?, "demo backend listening");
            let backend = DemoBackend::with_faults(id, faults);
            backend.delay_ms.store(knobs.delay_ms, std::sync::atomic::Ordering::Relaxed);
            backend.serve(listener, stop).await;
            Ok(())
        }
        Some(Command::Tune { .. }) => unreachable!("handled before the runtime starts"),
        Some(Command::XdpDecap { interface }) => {
            let attached = speedmimi::datapath::kernel::Decap::attach(&interface)?;
            tracing::info!(%interface, mode = attached.mode(), "XDP IPIP decapsulation attached");
            stop.wait().await;
            drop(attached);
            Ok(())
        }
        None => {
            let config = Config::load(&cli.config)
                .and_then(|c| preflight::check(&c).map(|()| c))
                .with_context(|| format!("config {}", cli.config.display()))?;
            let listeners = Listeners::bind(&config).await?;
            speedmimi::run(config, listeners, stop, Some(cli.config.clone())).await?;
            Ok(())
        }
    }
}

/// `speedmimi tune [--apply]`: the report, then the changes if asked (see `speedmimi::tune`).
fn tune(apply: bool, host: speedmimi::tune::Host) -> ExitCode {
    let findings = speedmimi::tune::inspect(&host);
    print!("{}", speedmimi::tune::report(&findings));
    if !apply {
        let pending = findings.iter().filter(|f| f.change.is_some()).count();
        println!("{pending} to change; `speedmimi tune --apply` (as root) makes these changes");
        return ExitCode::SUCCESS;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match speedmimi::tune::apply(&host, &findings, root) {
        Ok(changed) => {
            println!("applied: {changed} changed now; kept across reboots in {}", host.conf.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("speedmimi tune: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
