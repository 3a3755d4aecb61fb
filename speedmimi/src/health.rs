//! Active health checks: one checker task per backend that has a `health_check`, probing it over
//! HTTP, TCP or gRPC and turning `Backend::checked_up` off after `failures` consecutive failed
//! probes and on again after `successes` consecutive good ones. The balancers read only the flag.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{
    backend::Backend,
    config::{HealthCheckKind, HealthCheckSection},
    shutdown::Shutdown,
    state::State,
    tls::Alpn,
    upstream::{ConnectError, UpstreamIo},
};

/// How often the supervisor looks for backends that gained, lost or changed a health check.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// The gRPC health method every grpc.health.v1 server answers.
const GRPC_HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";

/// A HealthCheckRequest with no `service` (the server's overall health), gRPC-framed:
/// not compressed, zero-length message.
const GRPC_EMPTY_REQUEST: &[u8] = &[0, 0, 0, 0, 0];

/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// Probe responses bigger than this are failures: a health endpoint answers briefly.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// Starts the supervisor: until `shutdown`, it keeps exactly one checker per configured backend
/// that has a `health_check`, following config changes within a second.
pub fn spawn(state: Arc<State>, shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut checkers = Checkers::default();
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => break,
            }
            let backends: Vec<Arc<Backend>> =
                state.snapshot().upstreams.values().flat_map(|u| u.backends.iter().cloned()).collect();
            checkers.reconcile(backends).await;
        }
        checkers.stop_all();
    })
}

/// The running checkers, keyed by backend identity (the `Arc`'s address; each entry holds its
/// `Arc`, so the address cannot be reused meanwhile): a backend rebuilt by a config change is a
/// new backend with a fresh verdict.
#[derive(Default)]
struct Checkers(HashMap<usize, Checker>);

fn key(b: &Arc<Backend>) -> usize {
    Arc::as_ptr(b) as usize
}

struct Checker {
    backend: Arc<Backend>,
    /// The settings the task runs with; other settings mean a restart.
    conf: HealthCheckSection,
    task: JoinHandle<()>,
}

impl Checkers {
    /// Starts checkers for new backends, restarts those whose settings changed and stops those
    /// whose backend or `health_check` is gone.
    async fn reconcile(&mut self, backends: Vec<Arc<Backend>>) {
        let mut wanted: HashMap<usize, (Arc<Backend>, HealthCheckSection)> = HashMap::new();
        for b in backends {
            if let Some(hc) = b.conf.load().health_check.clone() {
                wanted.insert(key(&b), (b, hc));
            }
        }

        let gone: Vec<usize> = self.0.keys().filter(|k| !wanted.contains_key(*k)).copied().collect();
        for k in gone {
            let Some(c) = self.0.remove(&k) else { continue };
            c.task.abort();
            let _ = c.task.await;
            // Without an active check the backend is judged by passive checks alone.
            let b = &c.backend;
            if !b.checked_up.swap(true, Relaxed) {
                tracing::info!(upstream = %b.upstream, backend = %b.id, "health check removed: backend back in");
            }
            b.health.reset();
        }

        for (k, (backend, hc)) in wanted {
            match self.0.get(&k) {
                Some(c) if c.conf == hc && !c.task.is_finished() => continue,
                Some(c) => {
                    c.task.abort();
                    if let Some(c) = self.0.remove(&k) {
                        let _ = c.task.await;
                    }
                }
                None => {}
            }
            let span = tracing::info_span!("health", upstream = %backend.upstream, backend = %backend.id);
            let task = tokio::spawn(check_loop(backend.clone(), hc.clone()).instrument(span));
            self.0.insert(k, Checker { backend, conf: hc, task });
        }
    }

    fn stop_all(&mut self) {
        for (_, c) in self.0.drain() {
            c.task.abort();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Why a probe failed. Its text is what `/api/v1/backends` shows as the last error.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{protocol} handshake: {source}")]
    Handshake { protocol: &'static str, source: hyper::Error },
    #[error("bad health request: {0}")]
    Request(#[from] http::Error),
    /// The exchange failed before an answer (`what`: `GET /path`, or `grpc Check`).
    #[error("{what}: {source}")]
    Exchange { what: String, source: hyper::Error },
    #[error("GET {path}: status {status}")]
    Status { path: String, status: StatusCode },
    #[error("grpc Check: http status {0}")]
    GrpcHttpStatus(StatusCode),
    #[error("grpc Check: reading answer: {0}")]
    GrpcBody(Box<dyn std::error::Error + Send + Sync>),
    #[error("grpc Check: grpc-status {0}")]
    GrpcStatus(String),
    #[error("grpc Check: no grpc-status")]
    NoGrpcStatus,
    #[error("grpc Check: status {}", serving_status_name(*.0))]
    NotServing(u64),
    /// The answer's message could not be read.
    #[error("grpc Check: {0}")]
    GrpcAnswer(String),
}

/// Probes every `interval`, the first one right away, and records each outcome.
async fn check_loop(backend: Arc<Backend>, hc: HealthCheckSection) {
    let mut tick = tokio::time::interval(hc.interval.get());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let timeout = hc.timeout.get();
        let result = match tokio::time::timeout(timeout, probe(&backend, &hc)).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(timeout)),
        };
        backend.record_probe(&hc, result.err().as_ref().map(|e| e as &dyn std::fmt::Display));
    }
}

/// One probe of the configured kind; the caller bounds it with `timeout`.
async fn probe(b: &Backend, hc: &HealthCheckSection) -> Result<(), ProbeError> {
    let alpn = if hc.kind == HealthCheckKind::Grpc { Alpn::H2 } else { Alpn::Http1 };
    // Made through the backend's pool like the proxy's own: TLS (and its verification) for https.
    let stream = b.pool.connect_io(hc.timeout.get(), alpn).await?;
    match hc.kind {
        HealthCheckKind::Tcp => Ok(()),
        HealthCheckKind::Http => probe_http(b, hc, stream).await,
        HealthCheckKind::Grpc => probe_grpc(b, stream).await,
    }
}

/// Aborts a connection task when the probe is over, answered or not.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET path` with `Host` = the backend's authority; 2xx and 3xx are up.
async fn probe_http(b: &Backend, hc: &HealthCheckSection, stream: UpstreamIo) -> Result<(), ProbeError> {
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProbeError::Handshake { protocol: "http", source })?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = Request::get(hc.path.as_str())
        .header(header::HOST, b.authority.as_str())
        .header(header::USER_AGENT, "speedmimi-health")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| ProbeError::Exchange { what: format!("GET {}", hc.path), source })?;
    let status = resp.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(ProbeError::Status { path: hc.path.clone(), status })
    }
}

/// grpc.health.v1 `Check` over prior-knowledge h2c; up when grpc-status is 0 and the answer
/// says SERVING.
async fn probe_grpc(b: &Backend, stream: UpstreamIo) -> Result<(), ProbeError> {
    let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProbeError::Handshake { protocol: "h2", source })?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = Request::post(format!("http://{}{GRPC_HEALTH_PATH}", b.authority))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "speedmimi-health")
        .body(Full::new(Bytes::from_static(GRPC_EMPTY_REQUEST)))?;
    let resp =
        sender.send_request(req).await.map_err(|source| ProbeError::Exchange { what: "grpc Check".into(), source })?;
    if resp.status() != StatusCode::OK {
        return Err(ProbeError::GrpcHttpStatus(resp.status()));
    }
    let (parts, body) = resp.into_parts();
    let collected = Limited::new(body, MAX_PROBE_BODY).collect().await.map_err(ProbeError::GrpcBody)?;
    // A trailers-only answer carries grpc-status in the headers.
    let grpc_status = grpc_status(collected.trailers()).or_else(|| grpc_status(Some(&parts.headers)));
    match grpc_status {
        Some("0") => {}
        Some(code) => return Err(ProbeError::GrpcStatus(code.to_owned())),
        None => return Err(ProbeError::NoGrpcStatus),
    }
    match serving_status(&collected.to_bytes()) {
        Ok(SERVING) => Ok(()),
        Ok(s) => Err(ProbeError::NotServing(s)),
        Err(e) => Err(ProbeError::GrpcAnswer(e)),
    }
}

fn grpc_status(h: Option<&HeaderMap>) -> Option<&str> {
    h?.get("grpc-status")?.to_str().ok()
}

fn serving_status_name(s: u64) -> String {
    match s {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        n => n.to_string(),
    }
}

/// `HealthCheckResponse.status` (field 1, an enum) from one gRPC-framed message; absent = 0.
fn serving_status(body: &[u8]) -> Result<u64, String> {
    let [flag, l0, l1, l2, l3, rest @ ..] = body else {
        return Err("answer shorter than a gRPC frame header".into());
    };
    if *flag != 0 {
        return Err("compressed answer".into());
    }
    let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
    let mut msg = rest.get(..len).ok_or("truncated gRPC frame")?;
    let mut status = 0;
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(&mut msg)?;
                if field == 1 {
                    status = v;
                }
            }
            1 => msg = msg.get(8..).ok_or("truncated fixed64 field")?,
            2 => {
                let n = usize::try_from(varint(&mut msg)?).map_err(|_| "length field too large")?;
                msg = msg.get(n..).ok_or("truncated length-delimited field")?;
            }
            5 => msg = msg.get(4..).ok_or("truncated fixed32 field")?,
            w => return Err(format!("unsupported protobuf wire type {w}")),
        }
    }
    Ok(status)
}

/// Reads one protobuf base-128 varint off the front of `buf`.
fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Ok(value);
        }
    }
    Err("bad varint".into())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::BackendSection;

    #[test]
    fn varints_decode() {
        let cases: &[(&[u8], u64)] = &[
            (&[0x00], 0),
            (&[0x01], 1),
            (&[0x7f], 127),
            (&[0x80, 0x01], 128),
            (&[0xac, 0x02], 300),
            (&[0xff, 0xff, 0xff, 0xff, 0x0f], u32::MAX as u64),
            (&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], u64::MAX),
        ];
        for (bytes, want) in cases {
            let buf = [*bytes, &[0xaa]].concat();
            let mut s = buf.as_slice();
            assert_eq!(varint(&mut s), Ok(*want), "{bytes:02x?}");
            assert_eq!(s, &[0xaa], "rest after {bytes:02x?}");
        }
        assert!(varint(&mut &[0x80u8, 0x80][..]).is_err(), "unterminated");
        assert!(varint(&mut &[][..]).is_err(), "empty");
        assert!(varint(&mut &[0xffu8; 11][..]).is_err(), "longer than 10 bytes");
    }

    #[test]
    fn health_responses_decode() {
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x01]), Ok(SERVING));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x02]), Ok(2));
        // Empty message: status left at its default, UNKNOWN.
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Ok(0));
        // Unknown fields before the status are skipped.
        assert_eq!(serving_status(&[0, 0, 0, 0, 6, 0x12, 0x02, b'h', b'i', 0x08, 0x01]), Ok(SERVING));
        assert!(serving_status(&[0, 0, 0, 0, 3, 0x08, 0x01]).is_err(), "truncated");
        assert!(serving_status(&[1, 0, 0, 0, 2, 0x08, 0x01]).is_err(), "compressed");
        assert!(serving_status(&[0, 0]).is_err(), "no frame header");
    }

    fn backend(hc: Option<HealthCheckSection>) -> Arc<Backend> {
        let conf: BackendSection = serde_yaml::from_str("id: b1\nhost: 127.0.0.1\nport: 1\n").unwrap();
        let conf = BackendSection { health_check: hc, ..conf };
        Arc::new(Backend::new("default", &conf, SocketAddr::from(([127, 0, 0, 1], 1))))
    }

    fn tcp_check() -> HealthCheckSection {
        HealthCheckSection { kind: HealthCheckKind::Tcp, failures: 1, successes: 1, ..Default::default() }
    }

    #[tokio::test]
    async fn https_backends_are_probed_over_tls() {
        // A listener that accepts TCP but never speaks TLS: an https backend there is down.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let yaml = format!("id: s1\nhost: 127.0.0.1\nport: {}\nscheme: https\ntls_verify: false\n", addr.port());
        let conf: BackendSection = serde_yaml::from_str(&yaml).unwrap();
        let b = Backend::new("default", &conf, addr);
        let hc = HealthCheckSection { timeout: crate::config::Dur::parse("200ms").unwrap(), ..Default::default() };
        let tcp = HealthCheckSection { kind: HealthCheckKind::Tcp, ..hc.clone() };
        let r = tokio::time::timeout(Duration::from_secs(2), probe(&b, &hc)).await;
        assert!(matches!(r, Ok(Err(_)) | Err(_)), "a TLS-less port passed an https health check: {r:?}");
        let r = tokio::time::timeout(Duration::from_secs(2), probe(&b, &tcp)).await;
        assert!(matches!(r, Ok(Err(_)) | Err(_)), "the tcp check of an https backend includes the handshake: {r:?}");
    }

    #[tokio::test]
    async fn checkers_follow_the_backends() {
        let mut checkers = Checkers::default();
        let plain = backend(None);
        let checked = backend(Some(tcp_check()));
        checkers.reconcile(vec![plain.clone(), checked.clone()]).await;
        assert_eq!(checkers.len(), 1);
        // Port 1 refuses: the first probe runs at once and takes the backend out.
        for _ in 0..200 {
            if !checked.checked_up.load(Relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!checked.checked_up.load(Relaxed));
        assert!(checked.health.last_error().is_some());

        // Same settings: the same task keeps running.
        let first = checkers.0.values().next().unwrap().task.id();
        checkers.reconcile(vec![plain.clone(), checked.clone()]).await;
        assert_eq!(checkers.0.values().next().unwrap().task.id(), first);

        // The check is removed from the running backend: its checker stops, the verdict resets.
        let conf = BackendSection { health_check: None, ..(**checked.conf.load()).clone() };
        checked.conf.store(Arc::new(conf));
        checkers.reconcile(vec![plain.clone(), checked.clone()]).await;
        assert_eq!(checkers.len(), 0);
        assert!(checked.checked_up.load(Relaxed));
        assert_eq!(checked.health_snapshot().checks, 0);

        // A rebuilt backend (new Arc) replaces the old one's checker.
        let rebuilt = backend(Some(tcp_check()));
        checkers.reconcile(vec![checked.clone(), rebuilt.clone()]).await;
        assert_eq!(checkers.len(), 1);
        assert!(checkers.0.contains_key(&key(&rebuilt)));
        checkers.reconcile(vec![]).await;
        assert_eq!(checkers.len(), 0);
        checkers.stop_all();
    }
}
