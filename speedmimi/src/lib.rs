//! SpeedMimi: an eBPF-assisted L4/L7 load balancer. `run` is the entry point the binary and
//! the integration tests share: it takes bound listeners, so tests bind port 0.

pub mod access_log;
pub mod admin;
#[cfg(feature = "count-allocs")]
pub mod alloc_count;
pub mod announce;
pub mod backend;
pub mod balance;
pub mod command;
pub mod config;
pub mod datapath;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod heap;
pub mod preflight;
pub mod proxy;
pub mod shutdown;
pub mod state;
pub mod stats;
pub mod steering;
pub mod telemetry;
pub mod tls;
pub mod tune;
pub mod upstream;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, signal::unix::SignalKind, sync::Semaphore};

use crate::{
    config::Config,
    datapath::{Datapath, DatapathError},
    proxy::{admission::Admission, server::Listener},
    shutdown::Shutdown,
    state::{State, StateError},
};

/// The sockets SpeedMimi serves on, bound by the caller.
pub struct Listeners {
    pub http: TcpListener,
    /// The h2c listener for gRPC clients (`grpc.enabled`).
    pub grpc: Option<TcpListener>,
    /// The TLS listener on `ssl.port` (`ssl.enabled`; without `ssl.port`, `http` serves TLS).
    pub https: Option<TcpListener>,
    /// The admin API listener.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let f = &config.file;
        let shared = f.server.reuse_port;
        let http = bind(&f.server.host, f.server.port, shared).await?;
        let grpc = if f.grpc.enabled { Some(bind(&f.grpc.host, f.grpc.port, shared).await?) } else { None };
        let https = match (f.ssl.enabled, f.ssl.port) {
            (true, Some(port)) => Some(bind(&f.server.host, port, shared).await?),
            _ => None,
        };
        // Each process has its own admin API: never shared.
        let admin = Some(bind(&f.admin.host, f.admin.port, false).await?);
        Ok(Listeners { http, grpc, https, admin })
    }
}

/// Connections the kernel may queue for a listener before they are accepted (capped by
/// `net.core.somaxconn`, 4096 by default): std's 128 overflowed when 512 clients connected at
/// once, costing each dropped SYN a retransmission second.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener; `shared`: with SO_REUSEPORT (`server.reuse_port`), so other processes may
/// bind the same address.
async fn bind(host: &str, port: u16, shared: bool) -> std::io::Result<TcpListener> {
    let fail = |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {host}:{port}: {e}"));
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await.map_err(fail)? {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
        let bound = socket.and_then(|s| {
            s.set_reuseaddr(true)?;
            if shared {
                s.set_reuseport(true)?;
            }
            s.bind(addr)?;
            s.listen(LISTEN_BACKLOG)
        });
        match bound {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(fail(last.unwrap_or_else(|| std::io::ErrorKind::AddrNotAvailable.into())))
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("announce: {0}")]
    Announce(std::io::Error),
}

/// Serves until `shutdown` fires, then lets open connections finish (bounded) and returns.
/// With `config_path`, SIGHUP re-reads that file and applies it (a bad file changes nothing).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
    config_path: Option<PathBuf>,
) -> Result<(), RunError> {
    let datapath = datapath::start(&config)?;
    run_with(config, listeners, datapath, shutdown, config_path).await
}

/// `run` with a datapath chosen by the caller (tests pick one explicitly).
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    datapath: Arc<dyn Datapath>,
    shutdown: Shutdown,
    config_path: Option<PathBuf>,
) -> Result<(), RunError> {
    let admin_token = std::env::var(&config.file.admin.token_env).ok();
    let ssl = &config.file.ssl;
    // Without its own port, TLS is served on the HTTP listener.
    let http_kind = if ssl.enabled && ssl.port.is_none() { Listener::Https } else { Listener::Http };
    if listeners.https.is_some() != (ssl.enabled && ssl.port.is_some()) {
        tracing::warn!(enabled = ssl.enabled, port = ?ssl.port, "HTTPS listener given does not match ssl.enabled/ssl.port");
    }
    if !datapath.steers() {
        for l4 in &config.file.l4 {
            tracing::warn!(service = %l4.name, "this datapath does not steer: l4 service {} is not served", l4.name);
        }
    }
    let workers = match config.file.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    let max_conn = config.file.server.max_conn as usize;
    let steering = steering::Steering::new(datapath.clone(), &config.file.l4);
    let follower = steering.clone().map(|s| s as Arc<dyn state::SnapshotFollower>);
    let state = Arc::new(State::with_follower(config, datapath, follower)?);
    health::spawn(state.clone(), shutdown.clone());
    // The dashboard's history only where there is an admin listener to show it.
    let history = listeners.admin.as_ref().map(|_| Arc::new(admin::history::History::default()));
    spawn_sampler(state.clone(), history.clone(), steering.clone(), shutdown.clone());
    spawn_pool_reaper(state.clone(), shutdown.clone());
    heap::spawn_trimmer(shutdown.clone());
    let announcer = match (&steering, config_announce(&state)) {
        (Some(_), Some(interface)) => {
            let a = Arc::new(announce::Announcer::open(&interface).map_err(RunError::Announce)?);
            tracing::info!(interface, "announce: servable l4 VIPs go on this interface for the BGP daemon");
            let _ = state.announcer.set(a.clone());
            Some(a)
        }
        (None, Some(interface)) => {
            tracing::warn!(
                interface,
                "announce: no XDP steering runs (the eBPF datapath is not loaded): nothing is announced"
            );
            None
        }
        _ => None,
    };
    if let Some(steering) = steering {
        spawn_steering_checker(steering, announcer, shutdown.clone());
    }
    if let Some(path) = config_path {
        spawn_reloader(state.clone(), path, shutdown.clone());
    }
    spawn_log_reopener(state.clone(), shutdown.clone());
    let per_client = proxy::admission::PerClient::new(state.config().file.server.max_conn_per_client);
    let http_limit = Admission { slots: Arc::new(Semaphore::new(max_conn)), per_client: per_client.clone() };
    tracing::info!(addr = ?listeners.http.local_addr().ok(), kind = ?http_kind, workers, max_conn, "HTTP listener ready");

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
                upstream::set_worker(i);
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("worker runtime");
                rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => proxy::serve(l, state, http_kind, limit, shutdown).await,
                        Err(e) => tracing::error!(worker = i, error = %e, "worker cannot listen"),
                    }
                });
            })
            .map_err(RunError::Listener)?;
        threads.push(thread);
    }
    let mut tasks = tokio::task::JoinSet::new();
    let http = TcpListener::from_std(http).map_err(RunError::Listener)?;
    if let Some(https) = listeners.https.filter(|_| state.tls.is_some()) {
        tracing::info!(addr = ?https.local_addr().ok(), "HTTPS listener ready");
        tasks.spawn(proxy::serve(https, state.clone(), Listener::Https, http_limit.clone(), shutdown.clone()));
    }
    tasks.spawn(proxy::serve(http, state.clone(), http_kind, http_limit, shutdown.clone()));
    if let Some(grpc) = listeners.grpc {
        tracing::info!(addr = ?grpc.local_addr().ok(), "gRPC (h2c) listener ready");
        let limit = Admission { slots: Arc::new(Semaphore::new(max_conn)), per_client };
        tasks.spawn(proxy::serve(grpc, state.clone(), Listener::Grpc, limit, shutdown.clone()));
    }
    if let (Some(admin), Some(history)) = (listeners.admin, history) {
        tracing::info!(addr = ?admin.local_addr().ok(), auth = admin_token.is_some(), "admin API listening");
        let router = admin::router(state.clone(), admin_token, history);
        tasks.spawn(admin::serve(admin, router, state.clone(), shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
    // Upgraded flows are not HTTP exchanges a graceful stop waits for: close them now.
    for u in state.snapshot().upstreams.values() {
        for b in u.backends.iter() {
            b.disconnect();
        }
    }
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    Ok(())
}

/// Once a second, off the request path: remembers request counts for the rate windows, and
/// takes the dashboard's tick (with an admin listener). At shutdown it ends the dashboard's streams, which would
/// otherwise hold the admin listener's graceful stop.
fn spawn_sampler(
    state: Arc<State>,
    history: Option<Arc<admin::history::History>>,
    steering: Option<Arc<steering::Steering>>,
    shutdown: Shutdown,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => break,
            }
            state.stats.traffic.sample();
            for u in state.snapshot().upstreams.values() {
                for b in u.backends.iter() {
                    b.traffic.sample();
                }
            }
            if let Some(h) = &history {
                h.sample(&state, steering.as_deref());
            }
        }
        if let Some(h) = &history {
            h.close();
        }
    });
}

/// Closes pooled upstream connections idle past `server.upstream_idle_timeout` (read from each
/// snapshot, so a reload takes effect), checking a few times per timeout.
fn spawn_pool_reaper(state: Arc<State>, shutdown: Shutdown) {
    tokio::spawn(async move {
        loop {
            let timeout = state.snapshot().settings.upstream_idle_timeout;
            tokio::select! {
                _ = tokio::time::sleep(proxy::idle::check_period(timeout)) => {}
                _ = shutdown.wait() => return,
            }
            let timeout = state.snapshot().settings.upstream_idle_timeout;
            for u in state.snapshot().upstreams.values() {
                for b in u.backends.iter() {
                    let closed = b.pool.expire(timeout);
                    if closed > 0 {
                        tracing::debug!(upstream = %b.upstream, backend = %b.id, closed, "idle upstream connections closed");
                    }
                }
            }
        }
    });
}

/// Health changes make no snapshot: every 100 ms the XDP rings catch up with them, and the
/// announced VIPs with the rings. At shutdown every VIP is withdrawn first, so the router sends
/// no new flows while connections drain.
fn spawn_steering_checker(
    steering: Arc<steering::Steering>,
    announcer: Option<Arc<announce::Announcer>>,
    shutdown: Shutdown,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => break,
            }
            steering.recheck();
            if let Some(a) = &announcer {
                a.sync(&steering.servable());
            }
        }
        if let Some(a) = &announcer {
            a.sync(&Default::default());
        }
    });
}

/// `announce.interface` when announcing is on.
fn config_announce(state: &State) -> Option<String> {
    let a = &state.config().file.announce;
    a.enabled.then(|| a.interface.clone())
}

/// SIGHUP: re-read the config file and apply it through the same path as the admin API.
fn spawn_reloader(state: Arc<State>, path: PathBuf, shutdown: Shutdown) {
    let unavailable = "cannot listen for SIGHUP; reload through the admin API only";
    on_signal(SignalKind::hangup(), unavailable, shutdown, move || {
        match reload(&state, &path) {
            Ok(applied) => tracing::info!(path = %path.display(), ?applied, "config reloaded"),
            Err(e) => tracing::error!(path = %path.display(), error = %e, "reload rejected; the running config stays"),
        }
        std::future::ready(())
    });
}

/// SIGUSR1: reopen the access log file (after logrotate renamed it), as nginx does.
fn spawn_log_reopener(state: Arc<State>, shutdown: Shutdown) {
    let unavailable = "cannot listen for SIGUSR1; the access log cannot be reopened";
    on_signal(SignalKind::user_defined1(), unavailable, shutdown, move || {
        let st = state.clone();
        async move {
            // Blocking: it waits for the writer to take the reopen behind the queued lines.
            match tokio::task::spawn_blocking(move || st.access_log.as_ref().map(|l| l.reopen())).await {
                Ok(Some(Ok(()))) => tracing::info!("access log reopened"),
                Ok(Some(Err(e))) => {
                    tracing::error!(error = %e, "cannot reopen the access log; writing to the old file")
                }
                Ok(None) => tracing::info!("SIGUSR1: no access log to reopen"),
                Err(e) => tracing::error!(error = %e, "access log reopen failed"),
            }
        }
    });
}

/// Runs `act` for each `kind` signal until shutdown; logs `unavailable` when the signal cannot
/// be listened for.
fn on_signal<F, Fut>(kind: SignalKind, unavailable: &'static str, shutdown: Shutdown, mut act: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let Ok(mut signals) = tokio::signal::unix::signal(kind) else {
        tracing::warn!("{unavailable}");
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = signals.recv() => {}
                _ = shutdown.wait() => return,
            }
            act().await;
        }
    });
}

/// Re-reads `path` and applies it, and re-reads the TLS certificate files.
pub fn reload(state: &State, path: &std::path::Path) -> Result<state::Applied, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let applied = state.apply(command::Command::ReplaceConfig(Box::new(config.file))).map_err(|e| e.to_string())?;
    if state.tls.is_some() {
        state.reload_tls().map_err(|e| format!("config applied, but the certificate reload failed: {e}"))?;
    }
    Ok(applied)
}
