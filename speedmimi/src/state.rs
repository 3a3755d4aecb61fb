//! The running state: the routing snapshot the request path reads without locking, and the
//! long-lived backends whose counters survive a rebuild of that snapshot.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, OnceLock, atomic::Ordering::Relaxed},
    time::Duration,
};

use arc_swap::ArcSwap;
use http::HeaderName;
use ipnet::IpNet;
use speedmimi_common::maglev::Member;

use crate::{
    access_log::AccessLog,
    backend::{Backend, Verdict, now_ms},
    balance::{self, Backends, Balancer},
    command::Command,
    config::{Algorithm, BackendSection, Config, ConfigError, FileConfig, UpstreamSection},
    datapath::Datapath,
    stats::{RouteBackendStats, ServerStats},
    tls::{TlsError, TlsState},
    upstream::RetryBudget,
};

/// Why a change (or the startup config) could not be applied. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("backends.{upstream}: cannot resolve {authority}: {reason}")]
    Resolve { upstream: String, authority: String, reason: String },
    #[error("unknown upstream {0:?}")]
    UnknownUpstream(String),
    #[error("unknown backend {id:?} in upstream {upstream:?}")]
    UnknownBackend { upstream: String, id: String },
    #[error("backend {id:?} already exists in upstream {upstream:?}")]
    Duplicate { upstream: String, id: String },
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("{0}")]
    BadInput(String),
    #[error("changing {} needs a restart; nothing was changed", .0.join(", "))]
    RestartNeeded(Vec<String>),
    /// The certificates named in `ssl:` could not be loaded (the message names the file).
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What kind of exchange a request starts; routes may balance each kind differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http = 0,
    WebSocket = 1,
    Sse = 2,
    Grpc = 3,
}

pub struct Upstream {
    pub name: String,
    pub backends: Backends,
    /// Backends removed since startup, still holding their Maglev places as down backends, so
    /// that a removal moves only the removed backend's clients (`ip_hash` and XDP rings).
    pub ghosts: Arc<[Member]>,
    /// `upstreams.<name>` (defaults when not written).
    pub conf: UpstreamSection,
    /// Kept across rebuilds, like the backends.
    pub budget: Arc<RetryBudget>,
}

impl Upstream {
    /// A backend of this upstream failed (a 5xx, a connect failure, a reset): outlier ejection
    /// may take it out.
    pub fn failed(&self, b: &Backend) {
        let peers = self.backends.len();
        match b.standing.failure(peers, || self.backends.iter().filter(|x| x.standing.ejected()).count()) {
            Verdict::Ejected { ms, nth } => tracing::warn!(upstream = %self.name, backend = %b.id,
                ejected_for = ?Duration::from_millis(ms), ejections_in_a_row = nth, "backend ejected: failures in a row"),
            Verdict::Spared => tracing::debug!(upstream = %self.name, backend = %b.id,
                "backend not ejected: the upstream has its most ejected already"),
            Verdict::Kept => {}
        }
    }
}

pub struct Route {
    pub name: String,
    host: Option<HostMatch>,
    pub prefix: String,
    pub upstream: Arc<Upstream>,
    /// Indexed by `Protocol`.
    balancers: [Arc<dyn Balancer>; 4],
    /// Per backend (same order as the upstream's): this route's requests to it by status.
    pub stats: Vec<Arc<RouteBackendStats>>,
}

impl Route {
    /// The route's balancer for this kind of request, over backends that accept one more
    /// (`skip`: those this request already tried); the backend and its index in the upstream.
    /// A backend in its slow start takes a pick only with its current share, unless no other
    /// takes it (`ip_hash` ramps by ring slot itself, so that a client moves to it once).
    pub fn pick(&self, protocol: Protocol, hash: u64, skip: &[Arc<Backend>]) -> Option<(usize, Arc<Backend>)> {
        let balancer = self.balancer(protocol);
        let fresh = |b: &Backend| b.accepts() && !skip.iter().any(|s| std::ptr::eq(&**s, b));
        let sticky = balancer.sticky();
        let draw = || balance::unit(balance::random());
        let i = match balancer.pick(hash, &mut |b| fresh(b) && (sticky || b.standing.admits(draw))) {
            Some(i) => i,
            None => balancer.pick(hash, &mut |b| fresh(b))?,
        };
        Some((i, self.upstream.backends[i].clone()))
    }

    /// Counts a backend's answer (or the proxy's on its behalf) for this route and the backend;
    /// a 5xx counts towards the backend's ejection, anything else ends a run of failures.
    pub fn record(&self, index: usize, backend: &Backend, status: u16, took: std::time::Duration) {
        self.stats[index].record(status);
        backend.traffic.record(status, took);
        if status >= 500 {
            self.upstream.failed(backend);
        } else {
            backend.standing.success();
        }
    }

    pub fn balancer(&self, p: Protocol) -> &dyn Balancer {
        &*self.balancers[p as usize]
    }
}

enum HostMatch {
    Exact(String),
    /// `*.example.com`: stored as `.example.com`.
    Suffix(String),
}

impl HostMatch {
    fn parse(h: &str) -> HostMatch {
        let h = h.to_ascii_lowercase();
        match h.strip_prefix('*') {
            Some(suffix) => HostMatch::Suffix(suffix.to_owned()),
            None => HostMatch::Exact(h),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len() && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// Proxy settings taken from `server:`.
pub struct Settings {
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    /// Idle pooled upstream connections older than this are closed.
    pub upstream_idle_timeout: Duration,
    pub read_timeout: Duration,
    /// `server.max_body_bytes`: larger request bodies get 413.
    pub max_body_bytes: Option<u64>,
    /// Idle limit of upgraded flows and SSE streams.
    pub tunnel_timeout: Duration,
    /// `ebpf.splice_budget`: bytes per direction a spliced flow may have in kernel queues.
    pub splice_budget: u64,
    pub trusted_proxies: Vec<IpNet>,
    pub real_ip_header: HeaderName,
    /// Responses carry which backend answered (for the access log).
    pub tag_backend: bool,
    /// `server.http1_fast_path`: the own engine serves what it can (also HTTP/2 requests'
    /// upstream leg, `h1::bridge`).
    pub http1_fast_path: bool,
}

/// An immutable view of routes and upstreams, replaced whole on every change.
pub struct Snapshot {
    /// Sorted so the first match wins: longest prefix first, host-specific before any-host.
    pub routes: Vec<Route>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub settings: Settings,
}

impl Snapshot {
    /// The route for a request, by Host (port stripped) and path.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.map(strip_port);
        self.routes.iter().find(|r| {
            path.starts_with(r.prefix.as_str())
                && match (&r.host, host) {
                    (None, _) => true,
                    (Some(m), Some(h)) => m.matches(h),
                    (Some(_), None) => false,
                }
        })
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Told of every routing snapshot before it is published (startup, admin API, reload); the XDP
/// rings follow the pools through it (`crate::steering`).
pub trait SnapshotFollower: Send + Sync {
    fn follow(&self, snapshot: &Snapshot);
}

pub struct State {
    snapshot: ArcSwap<Snapshot>,
    config: ArcSwap<Config>,
    pub datapath: Arc<dyn Datapath>,
    pub stats: Arc<ServerStats>,
    /// One line per request when `server.access_log` is set.
    pub access_log: Option<AccessLog>,
    /// Serialises changes; the request path never takes it.
    writer: Mutex<Registry>,
    /// TLS termination (`ssl.enabled`): the certificates, reloadable in place.
    pub tls: Option<Arc<TlsState>>,
    follower: Option<Arc<dyn SnapshotFollower>>,
    /// The VIP announcer (`announce`), once the daemon has made it.
    pub announcer: OnceLock<Arc<crate::announce::Announcer>>,
}

/// What survives snapshot rebuilds besides backends: per route-backend counters.
#[derive(Default)]
struct Registry {
    route_stats: HashMap<(String, String, String), Arc<RouteBackendStats>>,
    /// Per upstream: the Maglev members of its backends last time, and its ghosts.
    members: HashMap<String, (Vec<Member>, Arc<[Member]>)>,
    budgets: HashMap<String, Arc<RetryBudget>>,
}

/// Ghosts kept per upstream; past this many removals the oldest ghost's slots are rebuilt.
const MAX_GHOSTS: usize = 64;

/// The ghosts of an upstream whose members become `now`: every member it had before (and every
/// earlier ghost) that is gone now, newest last. A backend that comes back stops being a ghost.
fn ghosts_after(before: Option<&(Vec<Member>, Arc<[Member]>)>, now: &[Member]) -> Arc<[Member]> {
    let Some((members, ghosts)) = before else { return Arc::from([]) };
    let mut out: Vec<Member> = Vec::new();
    for m in ghosts.iter().chain(members) {
        if now.iter().all(|n| n.id_hash != m.id_hash) && out.iter().all(|g| g.id_hash != m.id_hash) {
            out.push(*m);
        }
    }
    let excess = out.len().saturating_sub(MAX_GHOSTS);
    out.drain(..excess);
    out.into()
}

/// What `apply` did, for the caller's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// Nothing differed.
    Unchanged,
}

impl State {
    pub fn new(config: Config, datapath: Arc<dyn Datapath>) -> Result<State, StateError> {
        State::with_follower(config, datapath, None)
    }

    /// A state whose snapshots `follower` sees before they are published.
    pub fn with_follower(
        config: Config,
        datapath: Arc<dyn Datapath>,
        follower: Option<Arc<dyn SnapshotFollower>>,
    ) -> Result<State, StateError> {
        let mut registry = Registry::default();
        let prepared = prepare(&config, &HashMap::new())?;
        let snapshot = commit(&config, prepared, &mut registry);
        if let Some(f) = &follower {
            f.follow(&snapshot);
        }
        let access_log = AccessLog::open(&config.file.server.access_log).map_err(|e| {
            StateError::BadInput(format!("server.access_log: cannot open {:?}: {e}", config.file.server.access_log))
        })?;
        let tls = match config.file.ssl.enabled {
            true => Some(Arc::new(TlsState::new(&config.file.ssl)?)),
            false => None,
        };
        Ok(State {
            tls,
            snapshot: ArcSwap::from_pointee(snapshot),
            config: ArcSwap::from_pointee(config),
            datapath,
            stats: Arc::default(),
            access_log,
            writer: Mutex::new(registry),
            follower,
            announcer: OnceLock::new(),
        })
    }

    /// Re-reads the certificate and key files the running config names; on error the
    /// certificates in use stay.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        let tls = self.tls.as_ref().ok_or(TlsError::Disabled)?;
        tls.reload(&self.config().file.ssl)
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The running backend `id` of `upstream`.
    pub fn backend(&self, upstream: &str, id: &str) -> Option<Arc<Backend>> {
        self.snapshot().upstreams.get(upstream)?.backends.iter().find(|b| b.id == id).cloned()
    }

    /// Carries out a command entirely, or returns why not and changes nothing.
    pub fn apply(&self, cmd: Command) -> Result<Applied, StateError> {
        let mut registry = self.writer.lock().expect("state writer lock");
        let current = self.config.load_full();
        let whole = matches!(cmd, Command::ReplaceConfig(_));
        let file = match cmd {
            Command::Disconnect { upstream, id } => {
                let b = self.find(&upstream, &id)?;
                tracing::info!(%upstream, backend = %id, "disconnecting live connections");
                b.disconnect();
                return Ok(Applied::Done);
            }
            Command::Report { upstream, id, report } => {
                if let Some(reason) = report.problems() {
                    return Err(StateError::BadInput(reason));
                }
                self.find(&upstream, &id)?.report(report);
                return Ok(Applied::Done);
            }
            Command::AddBackend { upstream, backend } => {
                let mut file = current.file.clone();
                let list = file.backends.get_mut(&upstream).ok_or(StateError::UnknownUpstream(upstream.clone()))?;
                if list.iter().any(|b| b.id == backend.id) {
                    return Err(StateError::Duplicate { upstream, id: backend.id });
                }
                list.push(backend);
                file
            }
            Command::RemoveBackend { upstream, id } => {
                let mut file = current.file.clone();
                let list = file.backends.get_mut(&upstream).ok_or(StateError::UnknownUpstream(upstream.clone()))?;
                let before = list.len();
                list.retain(|b| b.id != id);
                if list.len() == before {
                    return Err(StateError::UnknownBackend { upstream, id });
                }
                file
            }
            Command::UpdateBackend { upstream, id, patch } => {
                let mut file = current.file.clone();
                let list = file.backends.get_mut(&upstream).ok_or(StateError::UnknownUpstream(upstream.clone()))?;
                let slot = list
                    .iter_mut()
                    .find(|b| b.id == id)
                    .ok_or_else(|| StateError::UnknownBackend { upstream: upstream.clone(), id: id.clone() })?;
                let mut value = serde_json::to_value(&*slot).expect("backend settings serialize");
                merge(&mut value, serde_json::Value::Object(patch));
                let updated: BackendSection =
                    serde_json::from_value(value).map_err(|e| StateError::BadInput(format!("backend: {e}")))?;
                if updated.id != id {
                    return Err(StateError::BadInput("backend.id: a backend's id cannot change".into()));
                }
                *slot = updated;
                file
            }
            Command::ReplaceConfig(file) => {
                let restart = restart_only_changes(&current.file, &file);
                if !restart.is_empty() {
                    return Err(StateError::RestartNeeded(restart));
                }
                *file
            }
        };
        if file == current.file {
            return Ok(Applied::Unchanged);
        }
        let config = file.validate().map_err(StateError::Invalid)?;
        let old = self.snapshot.load_full();
        let previous: HashMap<(String, String), Arc<Backend>> = old
            .upstreams
            .values()
            .flat_map(|u| u.backends.iter().map(|b| ((b.upstream.clone(), b.id.clone()), b.clone())))
            .collect();
        let prepared = prepare(&config, &previous)?;
        // Nothing below can fail.
        let snapshot = commit(&config, prepared, &mut registry);
        for b in snapshot.upstreams.values().flat_map(|u| u.backends.iter()) {
            if !previous.values().any(|p| Arc::ptr_eq(p, b)) {
                // Added (or re-created at a new address) while running: it ramps up.
                b.standing.ramp_after(now_ms());
            }
        }
        let drain = config.file.server.write_timeout.get();
        for b in previous.values() {
            let kept =
                snapshot.upstreams.get(&b.upstream).is_some_and(|u| u.backends.iter().any(|x| Arc::ptr_eq(x, b)));
            if !kept {
                drain_backend(b.clone(), drain);
            }
        }
        if let Some(f) = &self.follower {
            f.follow(&snapshot);
        }
        self.snapshot.store(Arc::new(snapshot));
        self.config.store(Arc::new(config));
        self.stats.config_applied(whole);
        debug_assert!(self.invariants_hold());
        Ok(Applied::Done)
    }

    fn find(&self, upstream: &str, id: &str) -> Result<Arc<Backend>, StateError> {
        let snap = self.snapshot();
        let up = snap.upstreams.get(upstream).ok_or_else(|| StateError::UnknownUpstream(upstream.to_owned()))?;
        up.backends
            .iter()
            .find(|b| b.id == id)
            .cloned()
            .ok_or_else(|| StateError::UnknownBackend { upstream: upstream.to_owned(), id: id.to_owned() })
    }

    /// Snapshot and config agree: every configured backend runs once, every route has its upstream.
    fn invariants_hold(&self) -> bool {
        let snap = self.snapshot();
        let config = self.config();
        config.file.backends.iter().all(|(name, list)| {
            snap.upstreams.get(name).is_some_and(|u| {
                u.backends.len() == list.len() && u.backends.iter().zip(list).all(|(b, c)| b.id == c.id)
            })
        }) && snap.routes.iter().all(|r| r.stats.len() == r.upstream.backends.len())
    }
}

/// Stops sending to a removed backend at once (it is no longer in the snapshot); its in-flight
/// requests finish; its upgraded flows are closed when the drain deadline passes.
fn drain_backend(b: Arc<Backend>, deadline: Duration) {
    tracing::info!(upstream = %b.upstream, backend = %b.id, ?deadline, "draining removed backend");
    b.pool.clear();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            tokio::time::sleep(deadline).await;
            b.disconnect();
        });
    } else {
        b.disconnect();
    }
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` deletes, anything else replaces.
pub fn merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    use serde_json::Value;
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

/// Fields that take effect only with new sockets or threads: a running daemon refuses to
/// change them rather than pretend it did.
fn restart_only_changes(old: &FileConfig, new: &FileConfig) -> Vec<String> {
    let mut out = Vec::new();
    let (o, n) = (&old.server, &new.server);
    let mut check = |name: &str, same: bool| {
        if !same {
            out.push(name.to_owned());
        }
    };
    check("server.host", o.host == n.host);
    check("server.port", o.port == n.port);
    check("server.max_conn", o.max_conn == n.max_conn);
    check("server.max_conn_per_client", o.max_conn_per_client == n.max_conn_per_client);
    check("server.workers", o.workers == n.workers);
    check("server.reuse_port", o.reuse_port == n.reuse_port);
    check("server.max_header_bytes", o.max_header_bytes == n.max_header_bytes);
    check("server.read_timeout", o.read_timeout == n.read_timeout);
    check("server.access_log", o.access_log == n.access_log);
    check("ssl.enabled", old.ssl.enabled == new.ssl.enabled);
    check("ssl.port", old.ssl.port == new.ssl.port);
    check("grpc", old.grpc == new.grpc);
    check("admin", old.admin == new.admin);
    check("ebpf", old.ebpf == new.ebpf);
    check("l4", old.l4 == new.l4);
    check("announce", old.announce == new.announce);
    out
}

/// The backends of one upstream in the next snapshot, each reused (with its new settings) or new.
type PreparedUpstream = (String, Vec<(Arc<Backend>, BackendSection)>);

struct Prepared {
    upstreams: Vec<PreparedUpstream>,
}

/// The fallible half of a rebuild: resolves addresses and creates new backends; shares nothing yet.
fn prepare(config: &Config, previous: &HashMap<(String, String), Arc<Backend>>) -> Result<Prepared, StateError> {
    let mut upstreams = Vec::new();
    for (name, list) in &config.file.backends {
        let mut backends = Vec::with_capacity(list.len());
        for conf in list {
            let authority = conf.authority();
            let backend = match previous.get(&(name.clone(), conf.id.clone())) {
                // Same address and transport: keep it, with its counters, health and pool.
                Some(b)
                    if b.authority == authority
                        && b.scheme == conf.scheme
                        && b.conf.load().tls_verify == conf.tls_verify =>
                {
                    b.clone()
                }
                _ => {
                    let addr = crate::preflight::resolve(authority.as_str()).map_err(|e| StateError::Resolve {
                        upstream: name.clone(),
                        authority: authority.clone(),
                        reason: e.to_string(),
                    })?;
                    Arc::new(Backend::new(name, conf, addr))
                }
            };
            backends.push((backend, conf.clone()));
        }
        upstreams.push((name.clone(), backends));
    }
    Ok(Prepared { upstreams })
}

/// The infallible half: applies settings to reused backends and builds routes and balancers.
fn commit(config: &Config, prepared: Prepared, registry: &mut Registry) -> Snapshot {
    let file = &config.file;
    let mut upstreams = BTreeMap::new();
    let mut members = HashMap::new();
    let mut budgets = HashMap::new();
    for (name, list) in prepared.upstreams {
        let conf = config.upstream(&name);
        let backends: Vec<Arc<Backend>> = list
            .into_iter()
            .map(|(b, c)| {
                b.standing.configure(&conf);
                b.latency.set_decay(conf.latency_decay.get());
                b.apply_conf(&c);
                b
            })
            .collect();
        let budget = registry.budgets.get(&name).cloned().unwrap_or_default();
        budget.configure(&conf.retries);
        budgets.insert(name.clone(), budget.clone());
        let now: Vec<Member> = backends.iter().map(|b| Member { weight: b.weight.load(Relaxed), ..b.maglev }).collect();
        let ghosts = ghosts_after(registry.members.get(&name), &now);
        members.insert(name.clone(), (now, ghosts.clone()));
        upstreams.insert(name.clone(), Arc::new(Upstream { name, backends: backends.into(), ghosts, conf, budget }));
    }
    registry.members = members;
    registry.budgets = budgets;

    let mut live_stats = HashMap::new();
    let mut routes: Vec<Route> = file
        .routing
        .iter()
        .map(|(name, r)| {
            let upstream = upstreams[&r.upstream].clone();
            let make = |a: Option<Algorithm>| {
                balance::build(a.unwrap_or(r.load_balancer), &upstream.backends, &upstream.ghosts)
            };
            let stats = upstream
                .backends
                .iter()
                .map(|b| {
                    let key = (name.clone(), upstream.name.clone(), b.id.clone());
                    let s = registry
                        .route_stats
                        .get(&key)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(RouteBackendStats::new(name, &upstream.name, &b.id)));
                    live_stats.insert(key, s.clone());
                    s
                })
                .collect();
            Route {
                name: name.clone(),
                host: r.host.as_deref().map(HostMatch::parse),
                prefix: r.path.clone(),
                balancers: [make(None), make(r.protocols.websocket), make(r.protocols.sse), make(r.protocols.grpc)],
                stats,
                upstream,
            }
        })
        .collect();
    routes.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then(b.host.is_some().cmp(&a.host.is_some())));
    registry.route_stats = live_stats;

    let s = &file.server;
    let settings = Settings {
        connect_timeout: s.connect_timeout.get(),
        upstream_timeout: s.upstream_timeout.get(),
        upstream_idle_timeout: s.upstream_idle_timeout.get(),
        read_timeout: s.read_timeout.get(),
        max_body_bytes: s.max_body_bytes.map(|b| b.0),
        tunnel_timeout: s.tunnel_timeout.get(),
        splice_budget: file.ebpf.splice_budget.0,
        trusted_proxies: config.trusted_proxies.clone(),
        real_ip_header: HeaderName::from_bytes(s.real_ip_header.as_bytes()).expect("validated header name"),
        tag_backend: !s.access_log.is_empty(),
        http1_fast_path: s.http1_fast_path,
    };
    Snapshot { routes, upstreams, settings }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_members_become_ghosts_until_they_return() {
        let m = |id: u64| Member { id_hash: id, weight: 10 };
        let first = (vec![m(1), m(2), m(3)], Arc::from([]));
        let g = ghosts_after(Some(&first), &[m(1), m(3)]);
        assert_eq!(&*g, &[m(2)]);
        let second = (vec![m(1), m(3)], g);
        let g = ghosts_after(Some(&second), &[m(1)]);
        assert_eq!(&*g, &[m(2), m(3)], "older ghosts first");
        let third = (vec![m(1)], g);
        assert_eq!(&*ghosts_after(Some(&third), &[m(1), m(2)]), &[m(3)], "a returning backend is no ghost");
        assert!(ghosts_after(None, &[m(1)]).is_empty());
        let many = (vec![], (0..100).map(m).collect::<Vec<_>>().into());
        let g = ghosts_after(Some(&many), &[]);
        assert_eq!(g.len(), MAX_GHOSTS);
        assert_eq!(g[0], m(100 - MAX_GHOSTS as u64), "the oldest ghosts go first");
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        let m = HostMatch::parse("*.Example.com");
        assert!(m.matches("api.example.COM") && !m.matches("example.com") && !m.matches("xexample.com"));
    }
}
