//! SpeedMimi: an eBPF-assisted L4/L7 load balancer. `run` is the entry point the binary and
//! the integration tests share: it takes bound listeners, so tests bind port 0.

pub mod backend;
pub mod balance;
pub mod config;
pub mod datapath;
pub mod demo;
pub mod proxy;
pub mod shutdown;
pub mod state;
pub mod telemetry;

use std::sync::Arc;

use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    config::Config,
    datapath::{Datapath, DatapathError},
    proxy::server::Listener,
    shutdown::Shutdown,
    state::{State, StateError},
};

/// The sockets SpeedMimi serves on, bound by the caller.
pub struct Listeners {
    pub http: TcpListener,
    /// The h2c listener for gRPC clients (`grpc.enabled`).
    pub grpc: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let f = &config.file;
        let http = bind(&f.server.host, f.server.port).await?;
        let grpc = if f.grpc.enabled { Some(bind(&f.grpc.host, f.grpc.port).await?) } else { None };
        Ok(Listeners { http, grpc })
    }
}

async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {host}:{port}: {e}")))
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("listener: {0}")]
    Listener(std::io::Error),
}

/// Serves until `shutdown` fires, then lets open connections finish (bounded) and returns.
pub async fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), RunError> {
    let datapath = datapath::start(&config.file.ebpf)?;
    run_with(config, listeners, datapath, shutdown).await
}

/// `run` with a datapath chosen by the caller (tests pick one explicitly).
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    datapath: Arc<dyn Datapath>,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    if config.file.ssl.enabled {
        tracing::warn!("ssl.enabled is set, but TLS termination is not in this build yet: serving plain HTTP only");
    }
    for l4 in &config.file.l4 {
        tracing::warn!(service = %l4.name, "l4 services are not in this build yet: {} is not served", l4.name);
    }
    let workers = match config.file.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    let max_conn = config.file.server.max_conn as usize;
    let state = Arc::new(State::new(config, datapath)?);
    let http_limit = Arc::new(Semaphore::new(max_conn));
    tracing::info!(addr = ?listeners.http.local_addr().ok(), workers, max_conn, "HTTP listener ready");

    // Workers 1.. each run their own single-threaded event loop on a clone of the listening
    // socket; worker 0 is the caller's runtime.
    let http = listeners.http.into_std().map_err(RunError::Listener)?;
    let mut threads = Vec::new();
    for i in 1..workers {
        let listener = http.try_clone().map_err(RunError::Listener)?;
        let (state, limit, shutdown) = (state.clone(), http_limit.clone(), shutdown.clone());
        let thread = std::thread::Builder::new()
            .name(format!("speedmimi-w{i}"))
            .spawn(move || {
                proxy::upstream::set_worker(i);
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("worker runtime");
                rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => proxy::serve(l, state, Listener::Http, limit, shutdown).await,
                        Err(e) => tracing::error!(worker = i, error = %e, "worker cannot listen"),
                    }
                });
            })
            .map_err(RunError::Listener)?;
        threads.push(thread);
    }
    let mut tasks = tokio::task::JoinSet::new();
    let http = TcpListener::from_std(http).map_err(RunError::Listener)?;
    tasks.spawn(proxy::serve(http, state.clone(), Listener::Http, http_limit, shutdown.clone()));
    if let Some(grpc) = listeners.grpc {
        tracing::info!(addr = ?grpc.local_addr().ok(), "gRPC (h2c) listener ready");
        let limit = Arc::new(Semaphore::new(max_conn));
        tasks.spawn(proxy::serve(grpc, state.clone(), Listener::Grpc, limit, shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    Ok(())
}
