//! The YAML config: serde types that mirror the file (`FileConfig`), `validate()` that reports
//! every bad field with its path, and the validated `Config` the daemon runs on.

mod announce;
pub mod limits;
mod upstream;
mod values;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

pub use announce::AnnounceSection;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
pub use upstream::{OutlierSection, RetrySection, UpstreamSection};
pub use values::{ByteSize, Dur};

/// Why a config was rejected. Display gives what an operator needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Syntax or type error; serde_yaml's message names the field path, line and column.
    #[error("invalid config: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// Too large or too deeply nested to parse in bounded time; refused before parsing.
    #[error("invalid config: {0}")]
    Limit(#[from] limits::LimitError),
    /// Not UTF-8 (YAML is text).
    #[error("invalid config: not UTF-8 text: {0}")]
    Encoding(#[from] std::str::Utf8Error),
    #[error("invalid config:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// One bad field: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The file as written. Every section but `backends` and `routing` may be left out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub ssl: SslSection,
    /// Upstream name -> its backends.
    pub backends: BTreeMap<String, Vec<BackendSection>>,
    /// Upstream name -> how it treats its backends (slow start, ejection, retries); optional.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upstreams: BTreeMap<String, UpstreamSection>,
    /// Route name -> route.
    pub routing: BTreeMap<String, RouteSection>,
    #[serde(default)]
    pub grpc: GrpcSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub ebpf: EbpfSection,
    #[serde(default)]
    pub l4: Vec<L4Section>,
    #[serde(default)]
    pub announce: AnnounceSection,
}

/// The HTTP listener and limits on client connections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub host: String,
    pub port: u16,
    /// Bounds reading a whole request (head and body) and waiting on an idle keep-alive connection.
    pub read_timeout: Dur,
    /// Bounds a stalled write to a client.
    pub write_timeout: Dur,
    /// Bounds connecting to a backend. (new)
    pub connect_timeout: Dur,
    /// Bounds waiting for a backend's response head; past it the client gets 504. (new)
    pub upstream_timeout: Dur,
    /// A pooled upstream connection unused for this long is closed, so a burst does not leave
    /// backends holding idle connections for good. (new)
    pub upstream_idle_timeout: Dur,
    /// An upgraded flow (WebSocket) or SSE stream with no bytes in either direction for this
    /// long is closed, spliced or copied (HAProxy's `timeout tunnel`). (new)
    pub tunnel_timeout: Dur,
    /// On SIGTERM/SIGINT, how long open connections may finish their requests before they are
    /// closed (HAProxy's `hard-stop-after`, nginx's `worker_shutdown_timeout`). (new)
    pub drain_timeout: Dur,
    /// Client connections served at once; more wait in the listen backlog.
    pub max_conn: u32,
    /// Connections one client address (an IPv6 client: its /64) may hold open at once, across
    /// all listeners; a connection over it is closed at once. 0 = no limit. (new)
    pub max_conn_per_client: u32,
    /// Event-loop threads serving the HTTP listener, each with its own upstream connection
    /// pools; 0 = one per CPU the process may run on. (new)
    pub workers: u32,
    /// The proxy listeners (HTTP, HTTPS, gRPC) are bound with SO_REUSEPORT: several SpeedMimi
    /// processes on one host then share the ports, the kernel spreading new connections among
    /// them, each process with its own admin port and its own kernel maps. A process started
    /// by mistake on a port in use joins it too instead of failing; off by default. (new)
    pub reuse_port: bool,
    /// Largest request head accepted; larger ones get 431. (new)
    pub max_header_bytes: u32,
    /// Largest request body accepted (a size such as `10MiB`); a larger one gets 413 and, when
    /// its length is declared or it ends within the first 64 KiB read ahead, never reaches a
    /// backend (a longer stream is cut where it passes the limit). Absent: no limit. (new)
    pub max_body_bytes: Option<ByteSize>,
    /// Header a trusted proxy uses to tell us the client's address.
    pub real_ip_header: String,
    /// Peers allowed to set the real-IP and forwarded headers (CIDRs or bare addresses).
    pub trusted_proxies: Vec<String>,
    /// One line per request: empty = off, `-` = stdout, else a file appended to. (new)
    pub access_log: String,
    /// Plain HTTP/1.1 exchanges (no upgrade, no `Expect`, a body of known length) are served
    /// by the proxy's own HTTP/1 engine; anything else, and every connection after it, by
    /// hyper. `false`: hyper serves every connection. Read per connection. (new)
    pub http1_fast_path: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            host: "0.0.0.0".into(),
            port: 8080,
            read_timeout: Dur::secs(30),
            write_timeout: Dur::secs(30),
            connect_timeout: Dur::secs(5),
            upstream_timeout: Dur::secs(60),
            upstream_idle_timeout: Dur::secs(60),
            tunnel_timeout: Dur::secs(3600),
            drain_timeout: Dur::secs(10),
            max_conn: 10_000,
            max_conn_per_client: 0,
            workers: 0,
            reuse_port: false,
            max_header_bytes: 32 * 1024,
            max_body_bytes: None,
            real_ip_header: "X-Real-IP".into(),
            trusted_proxies: Vec::new(),
            http1_fast_path: true,
            access_log: String::new(),
        }
    }
}

/// TLS termination (served from the operations-plane issue on).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SslSection {
    pub enabled: bool,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// HTTPS port; when absent and TLS is enabled, `server.port` serves TLS. (new)
    pub port: Option<u16>,
    /// Certificates chosen by the name a client asks for (SNI), for hosts the default
    /// `cert_file` does not cover; a client naming none of them gets the default. (new)
    #[serde(default)]
    pub certificates: Vec<SniCertificate>,
}

/// A certificate served to clients that ask for `server_name` (exact, or `*.example.com` for
/// any one-label subdomain).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    pub server_name: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for SslSection {
    fn default() -> Self {
        SslSection {
            enabled: false,
            cert_file: "certs/server.crt".into(),
            key_file: "certs/server.key".into(),
            port: None,
            certificates: Vec::new(),
        }
    }
}

/// Upstream protocol spoken to a backend.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

/// One backend server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    /// Unique within its upstream; how the admin API names it.
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub scheme: Scheme,
    /// For `scheme: https`: verify the backend's certificate against the public web roots and
    /// its `host`; false accepts any certificate (self-signed backends on a trusted network). (new)
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// false keeps the backend in config without traffic.
    #[serde(default = "default_true")]
    pub active: bool,
    /// In-flight requests/connections at most; a full backend is skipped.
    #[serde(default = "default_backend_max_conn")]
    pub max_conn: u32,
    /// Consecutive connect failures that take the backend out for `fail_timeout`. (new)
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    /// Cool-down after `max_fails` connect failures. (new)
    #[serde(default = "default_fail_timeout")]
    pub fail_timeout: Dur,
    #[serde(default)]
    pub health_check: Option<HealthCheckSection>,
}

fn default_weight() -> u32 {
    100
}
fn default_true() -> bool {
    true
}
fn default_backend_max_conn() -> u32 {
    1000
}
fn default_max_fails() -> u32 {
    1
}
fn default_fail_timeout() -> Dur {
    Dur::secs(10)
}

/// How a backend's health is probed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckSection {
    pub path: String,
    pub interval: Dur,
    pub timeout: Dur,
    /// Consecutive failures before the backend is down.
    pub failures: u32,
    /// Consecutive successes before a down backend is up again. (new)
    pub successes: u32,
    #[serde(rename = "type")]
    pub kind: HealthCheckKind,
}

impl Default for HealthCheckSection {
    fn default() -> Self {
        HealthCheckSection {
            path: "/health".into(),
            interval: Dur::secs(30),
            timeout: Dur::secs(5),
            failures: 3,
            successes: 2,
            kind: HealthCheckKind::Http,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    #[default]
    Http,
    Tcp,
    Grpc,
}

/// The balancing algorithms of SPEC §3.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    Weight,
    LeastConnections,
    LeastConnectionsWeight,
    IpHash,
    #[serde(alias = "performance")]
    PerformanceLeastConnectionsWeight,
}

/// One route: which requests it takes and where they go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Path prefix; the longest matching prefix wins.
    #[serde(default = "default_path")]
    pub path: String,
    /// Optional Host match (exact, case-insensitive, port ignored; `*.example.com` matches subdomains).
    #[serde(default)]
    pub host: Option<String>,
    pub upstream: String,
    #[serde(default)]
    pub load_balancer: Algorithm,
    #[serde(default)]
    pub protocols: ProtocolsSection,
}

fn default_path() -> String {
    "/".into()
}

/// Per-protocol balancer overrides of a route.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProtocolsSection {
    #[serde(default)]
    pub websocket: Option<Algorithm>,
    #[serde(default)]
    pub sse: Option<Algorithm>,
    #[serde(default)]
    pub grpc: Option<Algorithm>,
}

/// The cleartext HTTP/2 (h2c) listener for gRPC clients.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcSection {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
}

impl Default for GrpcSection {
    fn default() -> Self {
        GrpcSection { enabled: false, host: "127.0.0.1".into(), port: 9090 }
    }
}

/// The admin REST API listener (served from the operations-plane issue on).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub host: String,
    pub port: u16,
    pub token_env: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection { host: "127.0.0.1".into(), port: 9091, token_env: "SPEEDMIMI_ADMIN_TOKEN".into() }
    }
}

/// Whether to use kernel programs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Use eBPF when the process may and the kernel can; otherwise run L7 only and say so once.
    #[default]
    Auto,
    /// eBPF is required: failing to load it is a startup error.
    #[serde(alias = "true")]
    True,
    /// Never load kernel programs.
    #[serde(alias = "false")]
    False,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfSection {
    #[serde(deserialize_with = "values::ebpf_mode")]
    pub enabled: EbpfMode,
    /// Splice WebSocket/SSE flows in the kernel after setup (where eBPF is loaded and both
    /// sides are plain TCP).
    pub splice: bool,
    /// Bytes a spliced flow may have in kernel queues per direction; beyond it the sender is
    /// throttled by TCP's own window until the receiver catches up. (new)
    pub splice_budget: ByteSize,
    /// Entries of the XDP per-flow tables (client flows, and NAT replies), allocated at startup
    /// when `l4:` has services: about 80 bytes each per table. (new)
    pub l4_flows: u32,
}

impl Default for EbpfSection {
    fn default() -> Self {
        EbpfSection { enabled: EbpfMode::Auto, splice: true, splice_budget: ByteSize(4 << 20), l4_flows: 1 << 20 }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum L4Mode {
    #[default]
    Nat,
    Dsr,
}

/// Services the XDP program can steer at once.
pub const L4_MAX_SERVICES: u32 = speedmimi_common::l4::MAX_SERVICES;

/// A kernel-steered TCP service (XDP).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct L4Section {
    pub name: String,
    pub interface: String,
    #[serde(default)]
    pub backend_interface: Option<String>,
    pub vip: IpAddr,
    pub port: u16,
    pub upstream: String,
    #[serde(default)]
    pub mode: L4Mode,
}

/// A config that passed validation; the only kind the daemon runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub file: FileConfig,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<IpNet>,
}

impl Config {
    /// Reads and validates a config file. Reads at most one byte past `limits::MAX_BYTES`, so a
    /// huge file (or a device) is refused without being read whole.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let io = |source| ConfigError::Io { path: path.to_owned(), source };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(limits::MAX_BYTES as u64 + 1).read_to_end(&mut bytes))
            .map_err(io)?;
        Config::parse_bytes(&bytes)
    }

    /// Parses and validates config bytes (UTF-8 YAML).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.len() > limits::MAX_BYTES {
            return Err(limits::LimitError::TooLarge { bytes: bytes.len() }.into());
        }
        Config::parse(std::str::from_utf8(bytes)?)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        limits::check(text)?;
        let file: FileConfig = serde_yaml::from_str(text)?;
        file.validate()
    }

    /// `upstreams.<name>`, or the defaults when it is not written.
    pub fn upstream(&self, name: &str) -> UpstreamSection {
        self.file.upstreams.get(name).cloned().unwrap_or_default()
    }
}

impl FileConfig {
    /// Checks everything serde cannot: references, uniqueness, ranges. Reports every problem.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let sections = [
            ("server.", self.server.problems()),
            ("ssl.", self.ssl.problems()),
            ("grpc.", self.grpc.problems()),
            ("ebpf.", self.ebpf.problems()),
            ("admin.", self.admin.problems()),
            ("", self.upstream_problems()),
            ("", self.routing_problems()),
            ("", self.l4_problems()),
            ("announce.", self.announce.problems(self.l4.len())),
        ];
        let errs: Vec<FieldError> = sections
            .into_iter()
            .flat_map(|(prefix, problems)| {
                problems.into_iter().map(move |(path, message)| FieldError { path: format!("{prefix}{path}"), message })
            })
            .collect();
        if !errs.is_empty() {
            return Err(ConfigError::Invalid(errs));
        }
        let trusted = self.server.trusted_proxies.iter().filter_map(|p| parse_cidr(p)).collect();
        Ok(Config { file: self, trusted_proxies: trusted })
    }

    /// `backends`: names, at least one upstream of at least one backend, unique ids, and each
    /// backend's own fields.
    fn upstream_problems(&self) -> Problems {
        let mut out = Problems::new();
        if self.backends.is_empty() {
            out.push(("backends".into(), "at least one upstream is needed".into()));
        }
        for (up, list) in &self.backends {
            if let Some(problem) = name_problem(up) {
                out.push((format!("backends.{up}"), format!("upstream name {problem}")));
            }
            if list.is_empty() {
                out.push((format!("backends.{up}"), "an upstream needs at least one backend".into()));
            }
            let mut ids = HashSet::new();
            for (i, b) in list.iter().enumerate() {
                let at = format!("backends.{up}[{i}]");
                if let Some(problem) = name_problem(&b.id) {
                    out.push((format!("{at}.id"), problem));
                } else if !ids.insert(b.id.as_str()) {
                    out.push((format!("{at}.id"), format!("duplicate id {:?} in upstream {up:?}", b.id)));
                }
                out.extend(b.problems().into_iter().map(|(field, msg)| (format!("{at}.{field}"), msg)));
            }
        }
        for (up, section) in &self.upstreams {
            let at = format!("upstreams.{up}");
            if !self.backends.contains_key(up) {
                out.push((at.clone(), "no such upstream in backends".into()));
            }
            out.extend(section.problems().into_iter().map(|(field, msg)| (format!("{at}.{field}"), msg)));
        }
        out
    }

    /// `routing`: names, known upstreams, paths, hosts, and no two routes for the same host
    /// and path.
    fn routing_problems(&self) -> Problems {
        let mut out = Problems::new();
        if self.routing.is_empty() {
            out.push(("routing".into(), "at least one route is needed".into()));
        }
        let mut seen = HashSet::new();
        for (name, r) in &self.routing {
            let at = format!("routing.{name}");
            if let Some(problem) = name_problem(name) {
                out.push((at.clone(), format!("route name {problem}")));
            }
            if !self.backends.contains_key(&r.upstream) {
                out.push((format!("{at}.upstream"), format!("unknown upstream {:?}", r.upstream)));
            }
            if !r.path.starts_with('/') {
                out.push((format!("{at}.path"), format!("{:?} must start with '/'", r.path)));
            }
            if let Some(h) = &r.host
                && (h.is_empty() || h.contains('/') || h.contains(' '))
            {
                out.push((format!("{at}.host"), format!("{h:?} is not a host name")));
            }
            let key = (r.host.as_deref().map(str::to_ascii_lowercase), r.path.clone());
            if !seen.insert(key) {
                out.push((at, format!("another route already has host {:?} and path {:?}", r.host, r.path)));
            }
        }
        out
    }

    /// `l4`: how many, unique names and addresses, interfaces, and upstreams whose backends the
    /// XDP program can reach (IPv4 hosts; in DSR mode, the service's port).
    fn l4_problems(&self) -> Problems {
        let mut out = Problems::new();
        if self.l4.len() > L4_MAX_SERVICES as usize {
            out.push(("l4".into(), format!("{} services; at most {L4_MAX_SERVICES} are steered", self.l4.len())));
        }
        if !self.l4.is_empty() && self.ebpf.enabled == EbpfMode::False {
            out.push(("ebpf.enabled".into(), "is false, but l4 services are steered by the eBPF datapath only".into()));
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in self.l4.iter().enumerate() {
            let at = format!("l4[{i}]");
            if let Some(problem) = name_problem(&l.name) {
                out.push((format!("{at}.name"), problem));
            } else if !names.insert(l.name.as_str()) {
                out.push((format!("{at}.name"), format!("duplicate l4 service {:?}", l.name)));
            }
            if l.port == 0 {
                out.push((format!("{at}.port"), "must be 1-65535".into()));
            }
            if !addrs.insert((l.vip, l.port)) {
                out.push((format!("{at}.vip"), format!("another l4 service already has {}:{}", l.vip, l.port)));
            }
            if !l.vip.is_ipv4() || l.vip.is_unspecified() {
                out.push((
                    format!("{at}.vip"),
                    format!("{} is not a unicast IPv4 address (IPv6 is not steered yet)", l.vip),
                ));
            }
            for (field, name) in
                [("interface", Some(&l.interface)), ("backend_interface", l.backend_interface.as_ref())]
            {
                if let Some(n) = name
                    && (n.is_empty() || n.len() > 15 || n.contains(['/', ' ']))
                {
                    out.push((format!("{at}.{field}"), format!("{n:?} is not a network interface name")));
                }
            }
            let Some(list) = self.backends.get(&l.upstream) else {
                out.push((format!("{at}.upstream"), format!("unknown upstream {:?}", l.upstream)));
                continue;
            };
            for (j, b) in list.iter().enumerate() {
                if b.host.parse::<std::net::Ipv4Addr>().is_err() {
                    out.push((
                        format!("backends.{}[{j}].host", l.upstream),
                        format!("{:?} must be an IPv4 address: l4 service {:?} steers to it", b.host, l.name),
                    ));
                }
                if l.mode == L4Mode::Dsr && b.port != l.port {
                    out.push((
                        format!("backends.{}[{j}].port", l.upstream),
                        format!(
                            "{} differs from port {} of dsr service {:?} (DSR keeps ports)",
                            b.port, l.port, l.name
                        ),
                    ));
                }
            }
        }
        out
    }
}

/// Problems of a section: (field path, message).
type Problems = Vec<(String, String)>;

impl ServerSection {
    fn problems(&self) -> Problems {
        let mut out = Problems::new();
        let mut bad = |field: &str, message: String| out.push((field.to_owned(), message));
        if self.port == 0 {
            bad("port", "must be 1-65535".into());
        }
        if self.max_conn == 0 {
            bad("max_conn", "must be at least 1".into());
        }
        if self.workers > 256 {
            bad("workers", format!("{} is more than 256", self.workers));
        }
        if self.max_header_bytes < 1024 {
            bad("max_header_bytes", "must be at least 1024".into());
        }
        for (field, d) in [
            ("read_timeout", self.read_timeout),
            ("write_timeout", self.write_timeout),
            ("connect_timeout", self.connect_timeout),
            ("upstream_timeout", self.upstream_timeout),
            ("upstream_idle_timeout", self.upstream_idle_timeout),
            ("tunnel_timeout", self.tunnel_timeout),
            ("drain_timeout", self.drain_timeout),
        ] {
            if d.get().is_zero() {
                bad(field, "must be longer than 0".into());
            }
        }
        if http::HeaderName::from_bytes(self.real_ip_header.as_bytes()).is_err() {
            bad("real_ip_header", format!("{:?} is not a header name", self.real_ip_header));
        }
        for (i, p) in self.trusted_proxies.iter().enumerate() {
            if parse_cidr(p).is_none() {
                bad(&format!("trusted_proxies[{i}]"), format!("{p:?} is not a CIDR or IP address"));
            }
        }
        out
    }
}

impl SslSection {
    fn problems(&self) -> Problems {
        let mut out = Problems::new();
        if self.port == Some(0) {
            out.push(("port".into(), "must be 1-65535".into()));
        }
        let mut names = HashSet::new();
        for (i, c) in self.certificates.iter().enumerate() {
            let at = format!("certificates[{i}]");
            let name = c.server_name.to_ascii_lowercase();
            let wild = name.strip_prefix("*.").unwrap_or(&name);
            if name.is_empty() {
                out.push((format!("{at}.server_name"), "must not be empty".into()));
            } else if wild.is_empty() || wild.contains(['*', '/', ' ', ':']) {
                out.push((format!("{at}.server_name"), format!("{:?} is not a host name or *.suffix", c.server_name)));
            } else if !names.insert(name) {
                out.push((format!("{at}.server_name"), format!("duplicate server_name {:?}", c.server_name)));
            }
            for (field, path) in [("cert_file", &c.cert_file), ("key_file", &c.key_file)] {
                if path.as_os_str().is_empty() {
                    out.push((format!("{at}.{field}"), "must name a PEM file".into()));
                }
            }
        }
        out
    }
}

impl GrpcSection {
    fn problems(&self) -> Problems {
        match self.enabled && self.port == 0 {
            true => vec![("port".into(), "must be 1-65535".into())],
            false => Problems::new(),
        }
    }
}

impl EbpfSection {
    fn problems(&self) -> Problems {
        let mut out = Problems::new();
        if self.splice_budget.0 < 64 * 1024 {
            out.push(("splice_budget".into(), format!("{} is below the 64KiB minimum", self.splice_budget)));
        }
        if !(1024..=1 << 24).contains(&self.l4_flows) {
            out.push(("l4_flows".into(), format!("{} is out of range 1024-16777216", self.l4_flows)));
        }
        out
    }
}

impl AdminSection {
    fn problems(&self) -> Problems {
        match self.port {
            0 => vec![("port".into(), "must be 1-65535".into())],
            _ => Problems::new(),
        }
    }
}

impl BackendSection {
    /// Field-local problems of one backend, as (field, message); shared by config and admin API.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.host.is_empty() {
            out.push(("host", "must not be empty".into()));
        }
        if self.port == 0 {
            out.push(("port", "must be 1-65535".into()));
        }
        if !(1..=1_000_000).contains(&self.weight) {
            out.push((
                "weight",
                format!("{} is out of range 1-1000000 (use active: false to stop traffic)", self.weight),
            ));
        }
        if self.max_conn == 0 {
            out.push(("max_conn", "must be at least 1".into()));
        }
        if self.max_fails == 0 {
            out.push(("max_fails", "must be at least 1".into()));
        }
        if let Some(h) = &self.health_check {
            if h.interval.get().is_zero() {
                out.push(("health_check.interval", "must be longer than 0".into()));
            }
            if h.timeout.get().is_zero() {
                out.push(("health_check.timeout", "must be longer than 0".into()));
            }
            if h.failures == 0 {
                out.push(("health_check.failures", "must be at least 1".into()));
            }
            if h.successes == 0 {
                out.push(("health_check.successes", "must be at least 1".into()));
            }
            if !h.path.starts_with('/') {
                out.push(("health_check.path", format!("{:?} must start with '/'", h.path)));
            }
        }
        out
    }

    /// `host:port` as a URI authority (IPv6 literals bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// How long a report from this backend stays fresh for the performance balancer.
    pub fn report_ttl(&self) -> Duration {
        3 * self.health_check.as_ref().map_or(Duration::from_secs(10), |h| h.interval.get())
    }
}

/// Longest backend id, upstream, route or l4 service name.
pub const MAX_NAME_LEN: usize = 64;

/// Why `name` cannot be a backend id, upstream, route or l4 service name; None when it can.
///
/// Ids and names end up in URLs (`?backend_id=`), metric labels and log lines, and are typed by
/// operators: 1 to `MAX_NAME_LEN` ASCII letters, digits, `.`, `_` or `-` keep them all readable
/// and unescaped, and keep one backend from bloating `/metrics` (a 100 KB id was accepted).
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("must not be empty".into())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!("is {} characters long; at most {MAX_NAME_LEN} are allowed", name.len()))
    } else {
        let bad = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
        bad.map(|c| format!("{name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"))
    }
}

/// A CIDR, or a bare address meaning just that host.
fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}
