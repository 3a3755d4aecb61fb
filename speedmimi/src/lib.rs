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

use tokio::net::TcpListener;

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
    let state = Arc::new(State::new(config, datapath)?);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(proxy::serve(listeners.http, state.clone(), Listener::Http, shutdown.clone()));
    if let Some(grpc) = listeners.grpc {
        tasks.spawn(proxy::serve(grpc, state.clone(), Listener::Grpc, shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
