//! The running state: the routing snapshot the request path reads without locking, and the
//! long-lived backends whose counters survive a rebuild of that snapshot.

use std::{
    collections::{BTreeMap, HashMap},
    net::{SocketAddr, ToSocketAddrs},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use http::HeaderName;
use ipnet::IpNet;

use crate::{
    backend::Backend,
    balance::{self, Backends, Balancer},
    config::{Algorithm, Config, Scheme},
    datapath::Datapath,
};

/// Why a config could not be turned into a running state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("backends.{upstream}: cannot resolve {authority}: {reason}")]
    Resolve { upstream: String, authority: String, reason: String },
    #[error("backends.{upstream}: backend {id:?} uses scheme https, which needs TLS support (not in this build yet)")]
    HttpsUnsupported { upstream: String, id: String },
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
}

pub struct Route {
    pub name: String,
    host: Option<HostMatch>,
    pub prefix: String,
    pub upstream: Arc<Upstream>,
    /// Indexed by `Protocol`.
    balancers: [Arc<dyn Balancer>; 4],
}

impl Route {
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
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub real_ip_header: HeaderName,
}

/// An immutable view of routes and upstreams, replaced whole on every change.
pub struct Snapshot {
    /// Sorted so the first match wins: longest prefix first, host-specific before any-host.
    routes: Vec<Route>,
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

pub struct State {
    snapshot: ArcSwap<Snapshot>,
    config: ArcSwap<Config>,
    pub datapath: Arc<dyn Datapath>,
}

impl State {
    pub fn new(config: Config, datapath: Arc<dyn Datapath>) -> Result<State, StateError> {
        let snapshot = build_snapshot(&config, &HashMap::new())?;
        Ok(State { snapshot: ArcSwap::from_pointee(snapshot), config: ArcSwap::from_pointee(config), datapath })
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
}

/// Builds routes and upstreams, reusing `previous` backends (by upstream and id) whose address
/// did not change so that their counters carry over.
fn build_snapshot(config: &Config, previous: &HashMap<(String, String), Arc<Backend>>) -> Result<Snapshot, StateError> {
    let file = &config.file;
    let mut upstreams = BTreeMap::new();
    for (name, list) in &file.backends {
        let mut backends = Vec::with_capacity(list.len());
        for conf in list {
            if conf.scheme == Scheme::Https {
                return Err(StateError::HttpsUnsupported { upstream: name.clone(), id: conf.id.clone() });
            }
            let authority = conf.authority();
            let addr = resolve(&authority).map_err(|reason| StateError::Resolve {
                upstream: name.clone(),
                authority: authority.clone(),
                reason,
            })?;
            let backend = match previous.get(&(name.clone(), conf.id.clone())) {
                Some(b) if b.authority == authority => b.clone(),
                _ => Arc::new(Backend::new(name, conf, addr)),
            };
            backends.push(backend);
        }
        upstreams.insert(name.clone(), Arc::new(Upstream { name: name.clone(), backends: backends.into() }));
    }

    let mut routes: Vec<Route> = file
        .routing
        .iter()
        .map(|(name, r)| {
            let upstream = upstreams[&r.upstream].clone();
            let make = |a: Option<Algorithm>| balance::build(a.unwrap_or(r.load_balancer), upstream.backends.clone());
            Route {
                name: name.clone(),
                host: r.host.as_deref().map(HostMatch::parse),
                prefix: r.path.clone(),
                balancers: [make(None), make(r.protocols.websocket), make(r.protocols.sse), make(r.protocols.grpc)],
                upstream,
            }
        })
        .collect();
    routes.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then(b.host.is_some().cmp(&a.host.is_some())));

    let s = &file.server;
    let settings = Settings {
        connect_timeout: s.connect_timeout.get(),
        upstream_timeout: s.upstream_timeout.get(),
        read_timeout: s.read_timeout.get(),
        write_timeout: s.write_timeout.get(),
        trusted_proxies: config.trusted_proxies.clone(),
        real_ip_header: HeaderName::from_bytes(s.real_ip_header.as_bytes()).expect("validated header name"),
    };
    Ok(Snapshot { routes, upstreams, settings })
}

fn resolve(authority: &str) -> Result<SocketAddr, String> {
    authority.to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or_else(|| "no address".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        let m = HostMatch::parse("*.Example.com");
        assert!(m.matches("api.example.COM") && !m.matches("example.com") && !m.matches("xexample.com"));
    }
}
