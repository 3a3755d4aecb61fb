//! The `speedmimi` binary: parse the command line, load the config, run until a signal.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use speedmimi::{Listeners, config::Config, demo::DemoBackend, preflight, shutdown, telemetry};

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
    /// N bytes at /bytes?n=N.
    DemoBackend {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        id: String,
    },
    /// On a DSR backend whose kernel lacks IPIP: strip the IPIP header SpeedMimi adds (XDP on
    /// the interface), so the stack sees the client's packet to the VIP. Runs until a signal.
    XdpDecap {
        #[arg(long)]
        interface: String,
    },
}

fn main() -> ExitCode {
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
        Some(Command::DemoBackend { host, port, id }) => {
            let listener = tokio::net::TcpListener::bind((host.as_str(), port))
                .await
                .with_context(|| format!("cannot listen on {host}:{port}"))?;
            tracing::info!(%id, addr = %listener.local_addr()?, "demo backend listening");
            DemoBackend::new(id).serve(listener, stop).await;
            Ok(())
        }
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
