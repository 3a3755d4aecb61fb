//! What startup needs from the machine, short of binding sockets and loading eBPF: listener
//! addresses and backend hosts that resolve, certificate and key files that load, an access log
//! that opens. `--check` and startup both run it, and startup's own steps use the same helpers,
//! so a config `--check` accepts does not then fail to start for any of these reasons.

use std::{
    io,
    net::{SocketAddr, ToSocketAddrs},
};

use crate::{
    access_log,
    config::{Config, ConfigError, FieldError},
    tls::TlsState,
};

/// Every machine-dependent problem of `config`, each naming its field; `Ok` when there is none.
///
/// Not checked, and why: whether the ports are free (only binding tells, and the daemon that
/// holds them may be the one being replaced); eBPF (needs root, which `--check` may lack, and
/// `ebpf.enabled: auto` falls back anyway); `l4` interfaces (looked up by the kernel when XDP is
/// attached, as root; a host under test may name interfaces that exist only in production).
pub fn check(config: &Config) -> Result<(), ConfigError> {
    let f = &config.file;
    let mut errs = Vec::new();
    let mut bad = |path: String, message: String| errs.push(FieldError { path, message });
    let mut listeners =
        vec![("server.host", &f.server.host, f.server.port), ("admin.host", &f.admin.host, f.admin.port)];
    if f.grpc.enabled {
        listeners.push(("grpc.host", &f.grpc.host, f.grpc.port));
    }
    for (field, host, port) in listeners {
        if let Err(e) = resolve((host.as_str(), port)) {
            bad(field.into(), format!("{host:?} cannot be listened on: {e}"));
        }
    }
    for (up, list) in &f.backends {
        for (i, b) in list.iter().enumerate() {
            if let Err(e) = resolve(b.authority()) {
                bad(format!("backends.{up}[{i}].host"), format!("cannot resolve {:?}: {e}", b.host));
            }
        }
    }
    if f.ssl.enabled
        && let Err(e) = TlsState::new(&f.ssl)
    {
        bad("ssl".into(), e.to_string());
    }
    if let Err(e) = access_log::open_target(&f.server.access_log) {
        bad("server.access_log".into(), format!("cannot open {:?}: {e}", f.server.access_log));
    }
    if errs.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(errs)) }
}

/// The first address `addr` resolves to, as the listeners (`host`, `port`) and backends
/// (`host:port`) use it: an IP literal, or a name the system resolver knows.
pub fn resolve(addr: impl ToSocketAddrs) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
}
