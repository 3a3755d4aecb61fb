//! Config loading as an operator sees it: the SPEC seed and example files load, defaults fill gaps, every kind
//! of bad config is rejected with the field (and for YAML errors the line and column) named, and `--check`.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

mod support;

use speedmimi::config::{Algorithm, Config, ConfigError, EbpfMode, FieldError, HealthCheckKind, L4Mode, Scheme};

/// SPEC §2, verbatim: the seed format that must load as written.
const SEED: &str = r#"server:
  host: "0.0.0.0"
  port: 8080
  read_timeout: 30s         # whole request head+body read; idle keep-alive also bounded by this
  write_timeout: 30s
  max_conn: 10000           # accepted client connections at once; beyond it, new ones wait in the backlog
  real_ip_header: "X-Real-IP"
  trusted_proxies: ["127.0.0.1/32", "10.0.0.0/8"]   # only peers in these CIDRs may set the real-IP header

ssl:
  enabled: false
  cert_file: "certs/server.crt"
  key_file: "certs/server.key"
  port: 8443                # (new) HTTPS listener; when absent and enabled, server.port serves TLS

backends:                    # upstream name -> backends
  default:
    - id: "backend1"
      name: "Backend Server 1"
      host: "127.0.0.1"
      port: 8081
      weight: 100
      scheme: "http"         # http | https
      active: true           # false: kept in config, gets no traffic
      max_conn: 1000         # in-flight requests/connections to this backend; full backends are skipped
      health_check:
        path: "/health"
        interval: 30s
        timeout: 5s
        failures: 3          # consecutive failures before down; (new) `successes: 2` to come back
        type: http           # (new) http (GET path, 2xx/3xx = up) | tcp (connect) | grpc (grpc.health.v1 Check)

routing:                     # route name -> route; longest matching path prefix wins
  default:
    path: "/"
    host: "example.com"      # (new, optional) Host match
    upstream: "default"
    load_balancer: "least_connections_weight"
    protocols:               # per-protocol balancer for this route
      websocket: "ip_hash"
      sse: "ip_hash"
      grpc: "least_connections"   # (new)

grpc:                        # a cleartext HTTP/2 (h2c) listener for gRPC clients, routed by the same table
  enabled: true
  host: "127.0.0.1"
  port: 9090

admin:                       # (new) the admin REST API listens on its own socket, loopback by default
  host: "127.0.0.1"
  port: 9091
  token_env: "SPEEDMIMI_ADMIN_TOKEN"   # when set in the environment, every call needs `Authorization: Bearer <token>`

ebpf:                        # (new)
  enabled: auto              # auto | true | false
  splice: true               # sockmap splicing of WebSocket/SSE flows after setup

l4:                          # (new) kernel-steered TCP services
  - name: "ws-l4"
    interface: "eth0"        # where packets for the VIP arrive
    backend_interface: "eth1"  # nat mode: where backends' replies arrive (default: interface, one-arm)
    vip: "10.0.0.10"
    port: 8088
    upstream: "default"      # balancer is always ip_hash (Maglev) here
    mode: nat                # nat (backends route replies via SpeedMimi; no backend setup) | dsr (IPIP to backends)
"#;

/// The smallest valid config: one upstream with one backend, one route. 8 lines.
const MINIMAL: &str = "\
backends:
  default:
    - id: b1
      host: 127.0.0.1
      port: 8081
routing:
  default:
    upstream: default
";

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/config.yaml")
}

/// The error `text` is rejected with; panics when it is accepted.
fn rejected(text: &str) -> ConfigError {
    match Config::parse(text) {
        Ok(c) => panic!("config accepted, expected a rejection:\n{text}\nparsed: {c:#?}"),
        Err(e) => e,
    }
}

/// The message of a YAML (syntax/type) rejection; panics on any other outcome.
fn yaml_error(text: &str) -> String {
    match rejected(text) {
        e @ ConfigError::Yaml(_) => e.to_string(),
        other => panic!("expected a YAML error, got {other:?} ({other})"),
    }
}

/// The field errors and the whole message of a validation rejection; panics on any other outcome.
fn field_errors(text: &str) -> (Vec<FieldError>, String) {
    match rejected(text) {
        ConfigError::Invalid(errs) => {
            let msg = ConfigError::Invalid(errs.clone()).to_string();
            (errs, msg)
        }
        other => panic!("expected field errors, got {other:?} ({other})"),
    }
}

/// Asserts exactly one field error, at `path`, whose message contains each of `parts`; the operator's
/// message must show `path: message`.
fn assert_one_field_error(text: &str, path: &str, parts: &[&str]) {
    let (errs, msg) = field_errors(text);
    assert_eq!(errs.len(), 1, "expected one error at {path}, got {errs:?}");
    assert_eq!(errs[0].path, path, "{errs:?}");
    for p in parts {
        assert!(errs[0].message.contains(p), "message {:?} lacks {p:?}", errs[0].message);
    }
    assert!(msg.contains(&format!("{path}: ")), "displayed error {msg:?} does not name {path}");
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Files that must load

#[test]
fn spec_seed_loads_as_written() {
    let c = Config::parse(SEED).unwrap_or_else(|e| panic!("SPEC §2 seed rejected: {e}"));
    let f = &c.file;
    assert_eq!(f.server.read_timeout.get(), Duration::from_secs(30));
    assert_eq!(f.server.write_timeout.get(), Duration::from_secs(30));
    assert_eq!(f.server.max_conn, 10_000);
    assert_eq!(f.server.real_ip_header, "X-Real-IP");
    assert_eq!(c.trusted_proxies.len(), 2);
    assert!(c.trusted_proxies[1].contains(&"10.1.2.3".parse::<IpAddr>().unwrap()));
    assert_eq!(f.ssl.port, Some(8443));

    let b = &f.backends["default"][0];
    assert_eq!((b.id.as_str(), b.name.as_deref(), b.port, b.weight), ("backend1", Some("Backend Server 1"), 8081, 100));
    assert_eq!(b.scheme, Scheme::Http);
    let hc = b.health_check.as_ref().expect("health_check");
    assert_eq!(
        (hc.interval.get(), hc.timeout.get(), hc.failures),
        (Duration::from_secs(30), Duration::from_secs(5), 3)
    );
    assert_eq!(hc.kind, HealthCheckKind::Http);

    let r = &f.routing["default"];
    assert_eq!(r.host.as_deref(), Some("example.com"));
    assert_eq!(r.load_balancer, Algorithm::LeastConnectionsWeight);
    assert_eq!(r.protocols.websocket, Some(Algorithm::IpHash));
    assert_eq!(r.protocols.sse, Some(Algorithm::IpHash));
    assert_eq!(r.protocols.grpc, Some(Algorithm::LeastConnections));

    assert!(f.grpc.enabled);
    assert_eq!(f.grpc.port, 9090);
    assert_eq!((f.admin.port, f.admin.token_env.as_str()), (9091, "SPEEDMIMI_ADMIN_TOKEN"));
    assert_eq!(f.ebpf.enabled, EbpfMode::Auto);
    assert!(f.ebpf.splice);

    assert_eq!(f.l4.len(), 1);
    let l4 = &f.l4[0];
    assert_eq!(l4.mode, L4Mode::Nat);
    assert_eq!(l4.backend_interface.as_deref(), Some("eth1"));
    assert_eq!(l4.vip, "10.0.0.10".parse::<IpAddr>().unwrap());
    assert_eq!((l4.port, l4.upstream.as_str()), (8088, "default"));
}

#[test]
fn example_config_file_loads() {
    let path = example_path();
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{} rejected: {e}", path.display()));
    let ids: Vec<&str> = c.file.backends["default"].iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["backend1", "backend2", "backend3"]);
    assert_eq!(c.file.routing["default"].load_balancer, Algorithm::Weight);
}

#[test]
fn load_of_missing_file_names_the_path() {
    let path = std::env::temp_dir().join(format!("speedmimi-config-test-{}-absent.yaml", std::process::id()));
    let err = Config::load(&path).expect_err("missing file accepted");
    assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
    assert_contains(&err.to_string(), &["cannot read config", &path.display().to_string()]);
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Defaults

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = Config::parse(MINIMAL).unwrap_or_else(|e| panic!("minimal config rejected: {e}"));
    let f = &c.file;
    let s = &f.server;
    assert_eq!((s.host.as_str(), s.port), ("0.0.0.0", 8080));
    assert_eq!(s.read_timeout.get(), Duration::from_secs(30));
    assert_eq!(s.write_timeout.get(), Duration::from_secs(30));
    assert_eq!(s.connect_timeout.get(), Duration::from_secs(5));
    assert_eq!(s.upstream_timeout.get(), Duration::from_secs(60));
    assert_eq!(s.tunnel_timeout.get(), Duration::from_secs(3600));
    assert_eq!(s.max_conn, 10_000);
    assert_eq!(s.max_header_bytes, 32 * 1024);
    assert_eq!(s.real_ip_header, "X-Real-IP");
    assert!(s.trusted_proxies.is_empty() && c.trusted_proxies.is_empty());

    assert!(!f.ssl.enabled);
    assert_eq!(f.ssl.port, None);

    let b = &f.backends["default"][0];
    assert_eq!(b.weight, 100);
    assert!(b.active);
    assert_eq!(b.scheme, Scheme::Http);
    assert_eq!(b.max_conn, 1000);
    assert_eq!(b.max_fails, 1);
    assert_eq!(b.fail_timeout.get(), Duration::from_secs(10));
    assert_eq!(b.name, None);
    assert_eq!(b.health_check, None);

    let r = &f.routing["default"];
    assert_eq!(r.path, "/");
    assert_eq!(r.host, None);
    assert_eq!(r.load_balancer, Algorithm::RoundRobin);
    assert_eq!((r.protocols.websocket, r.protocols.sse, r.protocols.grpc), (None, None, None));

    assert!(!f.grpc.enabled);
    assert_eq!((f.grpc.host.as_str(), f.grpc.port), ("127.0.0.1", 9090));
    assert_eq!((f.admin.host.as_str(), f.admin.port), ("127.0.0.1", 9091));
    assert_eq!(f.admin.token_env, "SPEEDMIMI_ADMIN_TOKEN");
    assert_eq!(f.ebpf.enabled, EbpfMode::Auto);
    assert!(f.ebpf.splice, "splicing is on by default");
    assert_eq!(f.ebpf.splice_budget.0, 4 << 20);
    assert!(f.l4.is_empty());
}

#[test]
fn health_check_section_defaults() {
    let text = MINIMAL.replace("      port: 8081\n", "      port: 8081\n      health_check: {}\n");
    let c = Config::parse(&text).unwrap_or_else(|e| panic!("rejected: {e}"));
    let hc = c.file.backends["default"][0].health_check.clone().expect("health_check");
    assert_eq!(hc.path, "/health");
    assert_eq!((hc.interval.get(), hc.timeout.get()), (Duration::from_secs(30), Duration::from_secs(5)));
    assert_eq!((hc.failures, hc.successes, hc.kind), (3, 2, HealthCheckKind::Http));
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Rejections: YAML-level (serde) errors carry the field, line and column

#[test]
fn unknown_field_is_named_with_line_and_column() {
    let text = format!("server:\n  port: 8080\n  prot: 1\n{MINIMAL}");
    let msg = yaml_error(&text);
    assert_contains(&msg, &["unknown field `prot`", "server", "at line 3 column 3"]);
}

#[test]
fn unknown_field_in_a_backend_is_named_with_its_path() {
    let text = MINIMAL.replace("      port: 8081\n", "      port: 8081\n      wieght: 5\n");
    let msg = yaml_error(&text);
    assert_contains(&msg, &["backends.default[0]", "unknown field `wieght`", "at line 6 column 7"]);
}

#[test]
fn bad_duration_is_named_with_line_and_column() {
    let text = format!("server:\n  read_timeout: 30x\n{MINIMAL}");
    let msg = yaml_error(&text);
    // The value and its line identify the field; serde_yaml reports the path as `server` here.
    assert_contains(&msg, &["server", "invalid duration", "\"30x\"", "unknown unit", "at line 2 column "]);
}

#[test]
fn unknown_load_balancer_is_named_with_line_and_column() {
    let text = format!("{MINIMAL}    load_balancer: fastest\n");
    let msg = yaml_error(&text);
    assert_contains(&msg, &["routing.default.load_balancer", "unknown variant `fastest`", "at line 9 column 20"]);
}

#[test]
fn yaml_syntax_error_has_line_and_column() {
    // `host` is indented one space less than its sibling `port`.
    let text = format!("server:\n  port: 8080\n host: 0.0.0.0\n{MINIMAL}");
    let msg = yaml_error(&text);
    assert_contains(&msg, &["did not find expected key", "at line 3 column 2"]);
}

#[test]
fn wrong_type_is_named_with_line_and_column() {
    let text = format!("server:\n  port: \"abc\"\n{MINIMAL}");
    let msg = yaml_error(&text);
    assert_contains(&msg, &["server.port", "invalid type", "\"abc\"", "at line 2 column 9"]);
}

#[test]
fn ebpf_enabled_maybe_is_rejected_naming_the_field() {
    let text = format!("ebpf:\n  enabled: maybe\n{MINIMAL}");
    let msg = yaml_error(&text);
    assert_contains(&msg, &["enabled", "\"maybe\"", "auto, true or false", "at line 2 column "]);
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Rejections: validation errors carry the field path

#[test]
fn unknown_upstream_in_a_route_is_named() {
    let text = MINIMAL.replace("    upstream: default\n", "    upstream: nowhere\n");
    assert_one_field_error(&text, "routing.default.upstream", &["unknown upstream", "nowhere"]);
}

#[test]
fn duplicate_backend_id_is_named() {
    let text = MINIMAL.replace("routing:\n", "    - id: b1\n      host: 127.0.0.2\n      port: 8082\nrouting:\n");
    assert_one_field_error(&text, "backends.default[1].id", &["duplicate id", "b1"]);
}

#[test]
fn bad_cidr_in_trusted_proxies_is_named() {
    let text = format!("server:\n  trusted_proxies: [\"10.0.0.0/8\", \"10.0.0.0/33\", \"::1\"]\n{MINIMAL}");
    assert_one_field_error(&text, "server.trusted_proxies[1]", &["10.0.0.0/33", "not a CIDR"]);
}

#[test]
fn server_port_zero_is_rejected() {
    let text = format!("server:\n  port: 0\n{MINIMAL}");
    assert_one_field_error(&text, "server.port", &["1-65535"]);
}

#[test]
fn backend_port_zero_is_rejected() {
    let text = MINIMAL.replace("      port: 8081\n", "      port: 0\n");
    assert_one_field_error(&text, "backends.default[0].port", &["1-65535"]);
}

#[test]
fn backend_weight_zero_is_rejected() {
    let text = MINIMAL.replace("      port: 8081\n", "      port: 8081\n      weight: 0\n");
    assert_one_field_error(&text, "backends.default[0].weight", &["out of range", "active: false"]);
}

#[test]
fn empty_backend_list_is_rejected() {
    let text =
        MINIMAL.replace("  default:\n    - id: b1\n      host: 127.0.0.1\n      port: 8081\n", "  default: []\n");
    assert_one_field_error(&text, "backends.default", &["at least one backend"]);
}

#[test]
fn no_upstreams_at_all_is_rejected() {
    let text = "backends: {}\nrouting:\n  default:\n    upstream: default\n";
    let (errs, msg) = field_errors(text);
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"backends"), "{errs:?}");
    assert!(paths.contains(&"routing.default.upstream"), "{errs:?}");
    assert_contains(&msg, &["backends: at least one upstream is needed"]);
}

#[test]
fn every_bad_field_is_reported_at_once() {
    let text = format!("server:\n  port: 0\n  trusted_proxies: [\"nope\"]\n{MINIMAL}")
        .replace("      port: 8081\n", "      port: 8081\n      weight: 0\n")
        .replace("    upstream: default\n", "    upstream: nowhere\n");
    let (errs, msg) = field_errors(&text);
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for want in ["server.port", "server.trusted_proxies[0]", "backends.default[0].weight", "routing.default.upstream"] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
        assert!(msg.contains(&format!("  - {want}: ")), "{want} missing from displayed error:\n{msg}");
    }
    assert_eq!(errs.len(), 4, "{errs:?}");
}

/// An `l4:` service over the MINIMAL upstream.
fn l4(extra: &str) -> String {
    format!(
        "{MINIMAL}l4:\n  - name: s1\n    interface: eth0\n    vip: 10.0.0.10\n    port: 8081\n    upstream: default\n{extra}"
    )
}

#[test]
fn l4_backends_must_be_ipv4_addresses() {
    let text = l4("").replace("      host: 127.0.0.1\n", "      host: backend.local\n");
    assert_one_field_error(&text, "backends.default[0].host", &["backend.local", "IPv4 address", "\"s1\""]);
}

#[test]
fn l4_dsr_needs_the_backend_port_to_equal_the_vip_port() {
    let text = l4("    mode: dsr\n").replace("    port: 8081\n    upstream", "    port: 80\n    upstream");
    assert_one_field_error(&text, "backends.default[0].port", &["8081 differs from port 80", "DSR keeps ports"]);
    Config::parse(&l4("    mode: dsr\n")).expect("same port is fine");
}

#[test]
fn l4_vip_must_be_ipv4_and_unique() {
    assert_one_field_error(&l4("").replace("vip: 10.0.0.10", "vip: \"fd00::10\""), "l4[0].vip", &["IPv6"]);
    let twice = format!(
        "{}  - name: s2\n    interface: eth1\n    vip: 10.0.0.10\n    port: 8081\n    upstream: default\n",
        l4("")
    );
    assert_one_field_error(&twice, "l4[1].vip", &["already has 10.0.0.10:8081"]);
}

#[test]
fn announce_needs_l4_services_and_an_interface_name() {
    assert_one_field_error(&format!("announce: {{enabled: true}}\n{MINIMAL}"), "announce.enabled", &["no l4 services"]);
    for bad in ["\"\"", "a-name-far-too-long", "\"sm vip\"", "sm/vip"] {
        let text = format!("announce: {{enabled: true, interface: {bad}}}\n{}", l4(""));
        assert_one_field_error(&text, "announce.interface", &["not a network interface name"]);
    }
    let c = Config::parse(&format!("announce: {{enabled: true}}\n{}", l4(""))).unwrap();
    assert_eq!(c.file.announce.interface, "speedmimi-vip");
    assert!(!Config::parse(MINIMAL).unwrap().file.announce.enabled);
}

#[test]
fn l4_flow_table_size_is_bounded() {
    let text = format!("ebpf:\n  l4_flows: 10\n{MINIMAL}");
    assert_one_field_error(&text, "ebpf.l4_flows", &["out of range"]);
    let c = Config::parse(&format!("ebpf:\n  l4_flows: 2000000\n{MINIMAL}")).unwrap();
    assert_eq!(c.file.ebpf.l4_flows, 2_000_000);
    assert_eq!(Config::parse(MINIMAL).unwrap().file.ebpf.l4_flows, 1 << 20);
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Value syntaxes

#[test]
fn ebpf_enabled_accepts_auto_and_yaml_bools() {
    for (written, want) in [
        ("auto", EbpfMode::Auto),
        ("true", EbpfMode::True),
        ("false", EbpfMode::False),
        ("\"true\"", EbpfMode::True),
        ("\"false\"", EbpfMode::False),
    ] {
        let text = format!("ebpf:\n  enabled: {written}\n{MINIMAL}");
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("enabled: {written} rejected: {e}"));
        assert_eq!(c.file.ebpf.enabled, want, "enabled: {written}");
    }
}

#[test]
fn performance_is_an_alias_of_performance_least_connections_weight() {
    for name in ["performance", "performance_least_connections_weight"] {
        let text = format!("{MINIMAL}    load_balancer: {name}\n    protocols:\n      grpc: {name}\n");
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("load_balancer: {name} rejected: {e}"));
        let r = &c.file.routing["default"];
        assert_eq!(r.load_balancer, Algorithm::PerformanceLeastConnectionsWeight, "{name}");
        assert_eq!(r.protocols.grpc, Some(Algorithm::PerformanceLeastConnectionsWeight), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 5. The CLI: `speedmimi --check --config FILE`

/// A config file in the temp dir, removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(contents: &str) -> TempConfig {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("speedmimi-config-test-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        TempConfig(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check(flag: &str, path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_speedmimi"))
        .args(["--check", flag])
        .arg(path)
        .env_remove("RUST_LOG")
        .output()
        .expect("run speedmimi")
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_accepts_a_valid_file() {
    let file = TempConfig::new(SEED);
    for flag in ["--config", "-c"] {
        let out = check(flag, &file.0);
        assert!(out.status.success(), "{flag}: {}", describe(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("ok"), "{flag}: {}", describe(&out));
        assert!(stdout.contains(&file.0.display().to_string()), "{flag}: {}", describe(&out));
    }
}

#[test]
fn check_accepts_the_example_config() {
    let out = check("-c", &example_path());
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"), "{}", describe(&out));
}

#[test]
fn check_rejects_an_invalid_file_naming_the_field() {
    let file = TempConfig::new(&MINIMAL.replace("      port: 8081\n", "      port: 8081\n      weight: 0\n"));
    for flag in ["--config", "-c"] {
        let out = check(flag, &file.0);
        assert!(!out.status.success(), "{flag}: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("backends.default[0].weight"), "{flag}: {}", describe(&out));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("ok"), "{flag}: {}", describe(&out));
    }
}

#[test]
fn check_rejects_a_yaml_error_with_line_and_column() {
    let file = TempConfig::new(&format!("server:\n  prot: 1\n{MINIMAL}"));
    let out = check("--config", &file.0);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prot") && stderr.contains("line 2 column 3"), "{}", describe(&out));
}

#[test]
fn check_reports_a_missing_file_clearly() {
    let path = std::env::temp_dir().join(format!("speedmimi-config-test-{}-missing.yaml", std::process::id()));
    let out = check("--config", &path);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read config"), "{}", describe(&out));
    assert!(stderr.contains(&path.display().to_string()), "{}", describe(&out));
    assert!(stderr.contains("No such file"), "{}", describe(&out));
}

// ---------------------------------------------------------------------------------------------------------------
// 6. `--check` does every check startup does short of binding (issue 12, defect 9)

/// `--check -c` on `text`: the exit status and stderr.
fn check_text(text: &str) -> (bool, String) {
    let file = TempConfig::new(text);
    let out = check("-c", &file.0);
    let ok = out.status.success();
    assert_eq!(ok, String::from_utf8_lossy(&out.stdout).contains(": ok"), "{}", describe(&out));
    (ok, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_rejects_a_missing_certificate_file() {
    let dir = support::tls::TempDir::new();
    let cert = dir.0.join("absent.crt");
    let text = format!("{MINIMAL}{}", support::tls::ssl_yaml(&cert, &dir.0.join("absent.key"), false, ""));
    let (ok, stderr) = check_text(&text);
    assert!(!ok, "a missing certificate passed --check");
    assert_contains(&stderr, &["ssl: ", "cannot read", &cert.display().to_string()]);
}

#[test]
fn check_rejects_a_key_that_does_not_match_its_certificate() {
    let dir = support::tls::TempDir::new();
    let ca = support::tls::Ca::new();
    let (cert, _) = ca.issue(&["a.example"]).write(&dir, "a");
    let (_, other_key) = ca.issue(&["b.example"]).write(&dir, "b");
    let (ok, stderr) = check_text(&format!("{MINIMAL}{}", support::tls::ssl_yaml(&cert, &other_key, false, "")));
    assert!(!ok, "a mismatched key passed --check");
    assert_contains(&stderr, &["does not match"]);
}

#[test]
fn check_accepts_a_loadable_certificate() {
    let dir = support::tls::TempDir::new();
    let (cert, key) = support::tls::Ca::new().issue(&["a.example"]).write(&dir, "a");
    let (ok, stderr) = check_text(&format!("{MINIMAL}{}", support::tls::ssl_yaml(&cert, &key, true, "")));
    assert!(ok, "{stderr}");
}

#[test]
fn check_rejects_listener_hosts_that_are_not_addresses() {
    for (section, field) in [("server", "server.host"), ("admin", "admin.host"), ("grpc", "grpc.host")] {
        let enable = if section == "grpc" { "  enabled: true\n" } else { "" };
        let (ok, stderr) = check_text(&format!("{MINIMAL}{section}:\n  host: \"not an ip\"\n{enable}"));
        assert!(!ok, "{field}: \"not an ip\" passed --check");
        assert_contains(&stderr, &[&format!("{field}: "), "not an ip"]);
    }
}

#[test]
fn check_rejects_an_unresolvable_backend_host() {
    let (ok, stderr) = check_text(&MINIMAL.replace("127.0.0.1", "no-such-host.invalid"));
    assert!(!ok, "an unresolvable backend host passed --check");
    assert_contains(&stderr, &["backends.default[0].host: ", "no-such-host.invalid"]);
}

#[test]
fn check_reports_every_startup_problem_at_once() {
    let text = format!("{}server:\n  host: \"nope nope\"\n", MINIMAL.replace("127.0.0.1", "no-such-host.invalid"));
    let (ok, stderr) = check_text(&text);
    assert!(!ok);
    assert_contains(&stderr, &["server.host: ", "backends.default[0].host: "]);
}

#[test]
fn startup_refuses_what_check_refuses_with_the_same_message() {
    let file = TempConfig::new(&format!("{MINIMAL}server:\n  host: \"not an ip\"\n"));
    let out = Command::new(env!("CARGO_BIN_EXE_speedmimi"))
        .arg("-c")
        .arg(&file.0)
        .env_remove("RUST_LOG")
        .output()
        .expect("run speedmimi");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.host: "), "{}", describe(&out));
}

#[test]
fn l4_services_with_ebpf_disabled_are_rejected() {
    assert_one_field_error(&l4("ebpf:\n  enabled: false\n"), "ebpf.enabled", &["l4"]);
}

// ---------------------------------------------------------------------------------------------------------------
// 7. Bounded parsing time: size and nesting are capped before the YAML parser runs

#[test]
fn deep_nesting_is_refused_quickly() {
    // 200 KB of flow nesting took serde_yaml over 20 s; block nesting and `- - -` likewise.
    let flow = format!("{MINIMAL}x: {}\n", "[".repeat(200_000));
    let block: String = (0..600).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
    let dashes = format!("{MINIMAL}x:\n{}1\n", "- ".repeat(100_000));
    for text in [flow, block, dashes] {
        let started = std::time::Instant::now();
        let e = rejected(&text);
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        assert!(matches!(e, ConfigError::Limit(_)), "{e:?}");
        assert_contains(&e.to_string(), &["nesting deeper than"]);
    }
}

#[test]
fn oversized_file_is_refused_without_reading_it_whole() {
    let big = format!("{MINIMAL}{}", "# padding\n".repeat(120_000));
    let file = TempConfig::new(&big);
    let e = Config::load(&file.0).expect_err("a 1.2 MB config was accepted");
    assert!(matches!(e, ConfigError::Limit(_)), "{e:?}");
    assert_contains(&e.to_string(), &["bytes", "at most"]);
    let out = check("-c", &file.0);
    assert!(!out.status.success(), "{}", describe(&out));
}

#[test]
fn non_utf8_config_is_an_error_not_a_panic() {
    assert!(matches!(Config::parse_bytes(b"backends: \xff\xfe\n"), Err(ConfigError::Encoding(_))));
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Ids and names are bounded (issue 12, item 12)

#[test]
fn backend_ids_are_bounded_in_length_and_charset() {
    let long = "b".repeat(65);
    for (id, part) in
        [(long.as_str(), "at most 64"), ("\"a b\"", "contains ' '"), ("\"a/b\"", "contains '/'"), ("\"\"", "empty")]
    {
        assert_one_field_error(&MINIMAL.replace("id: b1", &format!("id: {id}")), "backends.default[0].id", &[part]);
    }
    let ok = format!("{}.b_1-Z", "a".repeat(58));
    Config::parse(&MINIMAL.replace("id: b1", &format!("id: {ok}"))).expect("64 allowed characters");
}

#[test]
fn upstream_route_and_l4_names_are_bounded() {
    let text = MINIMAL
        .replace("  default:\n    - id", "  \"up stream\":\n    - id")
        .replace("upstream: default", "upstream: \"up stream\"");
    assert_one_field_error(&text, "backends.up stream", &["upstream name", "contains ' '"]);
    let route = "r".repeat(65);
    let text = MINIMAL.replace("routing:\n  default:", &format!("routing:\n  {route}:"));
    assert_one_field_error(&text, &format!("routing.{route}"), &["route name", "at most 64"]);
    assert_one_field_error(&l4("").replace("name: s1", "name: \"s 1\""), "l4[0].name", &["contains ' '"]);
}
