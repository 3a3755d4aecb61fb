//! A backend at runtime: its settings and the live counters the balancers and the proxy
//! share. One `Arc<Backend>` lives as long as the backend is configured, across rebuilds of
//! the routing snapshot, so in-flight counts and health survive config changes.

pub mod health;
pub mod latency;
pub mod outlier;

pub use health::{Health, HealthSnapshot};
pub use latency::PeakEwma;
pub use outlier::{Standing, Verdict};

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use speedmimi_common::maglev;
use tokio::sync::watch;

use crate::{
    command::PerformanceReport,
    config::{BackendSection, Scheme},
    stats::Traffic,
    tls::UpstreamTls,
    upstream::Pool,
};

/// A fresh kernel-counter slot (slots are recycled only after 16,384 backends have come and gone).
fn next_slot() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, Relaxed) % speedmimi_common::splice::BACKENDS
}

/// The process's start, as the backend clocks count it (set by the first use).
pub fn epoch() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds since process start, plus an hour (so that a time shortly before the start,
/// such as a ramp placed in the past, is still a positive number): cheap, monotonic, fits an
/// atomic, never 0 (which fields use as "never").
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 3_600_000
}

pub struct Backend {
    /// The backend's current settings as configured (the admin API may change them).
    pub conf: ArcSwap<BackendSection>,
    pub id: String,
    pub upstream: String,
    /// This backend's key in the kernel's per-backend counters.
    pub slot: u32,
    /// Upgraded flows to this backend that were spliced in the kernel, and copied.
    pub spliced_flows: AtomicU64,
    pub copied_flows: AtomicU64,
    /// Upgraded flows to this backend spliced in the kernel now, and those of them parked now
    /// (each held by a [`Gauge`]).
    pub spliced_open: AtomicU64,
    pub parked_open: AtomicU64,
    /// `host:port` as configured: the Maglev identity and the upstream `Host` for health checks.
    pub authority: String,
    pub scheme: Scheme,
    pub maglev: maglev::Member,
    pub weight: AtomicU32,
    pub active: AtomicBool,
    pub max_conn: AtomicU32,
    /// Requests and upgraded connections in flight to this backend.
    pub inflight: AtomicU32,
    /// Consecutive connect failures (passive health).
    fails: AtomicU32,
    /// Until when (`now_ms`) passive health keeps the backend out; 0 = in.
    down_until: AtomicU64,
    /// Active health verdict (true until an active check says otherwise).
    pub checked_up: AtomicBool,
    /// The active checker's record behind `checked_up` (counts, last error), for the admin API.
    pub health: health::Health,
    /// Peak-EWMA of response-head latency (`performance`).
    pub latency: PeakEwma,
    /// Outlier ejection and slow start.
    pub standing: Standing,
    /// Score from the last performance report, ×1e6 (1e6 = neutral), and when it came.
    report_score: AtomicU32,
    report_at_ms: AtomicU64,
    /// The last performance report as received, for the admin API.
    pub last_report: ArcSwapOption<PerformanceReport>,
    pub pool: Pool,
    /// Requests, statuses, latency and bytes through this backend.
    pub traffic: std::sync::Arc<Traffic>,
    /// Bumped to close this backend's upgraded flows (disconnect, or the end of a drain).
    pub closer: watch::Sender<u64>,
}

impl Backend {
    /// `addr` is the backend's resolved socket address.
    pub fn new(upstream: &str, conf: &BackendSection, addr: SocketAddr) -> Backend {
        let authority = conf.authority();
        Backend {
            conf: ArcSwap::from_pointee(conf.clone()),
            id: conf.id.clone(),
            upstream: upstream.to_owned(),
            slot: next_slot(),
            spliced_flows: AtomicU64::new(0),
            copied_flows: AtomicU64::new(0),
            spliced_open: AtomicU64::new(0),
            parked_open: AtomicU64::new(0),
            maglev: maglev::Member::from_addr(authority.as_bytes(), conf.weight),
            scheme: conf.scheme,
            weight: AtomicU32::new(conf.weight),
            active: AtomicBool::new(conf.active),
            max_conn: AtomicU32::new(conf.max_conn),
            inflight: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            down_until: AtomicU64::new(0),
            checked_up: AtomicBool::new(true),
            health: health::Health::default(),
            latency: PeakEwma::default(),
            standing: Standing::default(),
            report_score: AtomicU32::new(NEUTRAL),
            report_at_ms: AtomicU64::new(0),
            last_report: ArcSwapOption::empty(),
            traffic: Default::default(),
            closer: watch::Sender::new(0),
            pool: Pool::new(addr, UpstreamTls::for_backend(conf, addr.ip())),
            authority,
        }
    }

    /// Active and healthy (active checks and passive failures): may get traffic at all.
    pub fn is_up(&self) -> bool {
        self.active.load(Relaxed) && self.checked_up.load(Relaxed) && self.passive_ok()
    }

    fn passive_ok(&self) -> bool {
        let until = self.down_until.load(Relaxed);
        until == 0 || now_ms() >= until
    }

    /// Eligible for one more request now: up, not ejected as an outlier, and below `max_conn`.
    pub fn accepts(&self) -> bool {
        self.is_up() && self.inflight.load(Relaxed) < self.max_conn.load(Relaxed) && !self.standing.ejected()
    }

    /// Takes new settings (same address): weights, limits and health settings change in place,
    /// so in-flight counts and health state carry over. A backend switched back on ramps up.
    pub fn apply_conf(&self, conf: &BackendSection) {
        self.weight.store(conf.weight, Relaxed);
        let was_active = self.active.swap(conf.active, Relaxed);
        if conf.active && !was_active {
            self.standing.ramp_after(now_ms());
        }
        self.max_conn.store(conf.max_conn, Relaxed);
        self.conf.store(std::sync::Arc::new(conf.clone()));
    }

    /// Closes the upgraded flows and idle pooled connections to this backend.
    pub fn disconnect(&self) {
        self.closer.send_modify(|g| *g += 1);
        self.pool.clear();
    }

    /// Connect failure: after `max_fails` in a row the backend sits out `fail_timeout`.
    pub fn connect_failed(&self) {
        let conf = self.conf.load();
        let n = self.fails.fetch_add(1, Relaxed) + 1;
        if n >= conf.max_fails {
            let was_in = self.passive_ok();
            let cooldown = conf.fail_timeout.get();
            let until = now_ms() + cooldown.as_millis() as u64;
            self.down_until.store(until, Relaxed);
            self.standing.ramp_after(until);
            self.fails.store(0, Relaxed);
            if was_in {
                tracing::warn!(upstream = %self.upstream, backend = %self.id, failures = n,
                    cooldown = ?cooldown, "backend out after connect failures");
            }
        }
    }

    /// Whether passive health keeps the backend out right now.
    pub fn cooling_down(&self) -> bool {
        !self.passive_ok()
    }

    pub fn connect_succeeded(&self) {
        if self.fails.load(Relaxed) != 0 {
            self.fails.store(0, Relaxed);
        }
    }

    /// Feeds one response-head latency into the peak-EWMA.
    pub fn observe_latency(&self, d: Duration) {
        self.latency.observe(d, Instant::now());
    }

    /// Records a performance report.
    pub fn report(&self, r: PerformanceReport) {
        let score = report_score(r.cpu_usage, r.memory_usage, r.load_avg_1);
        self.report_score.store((score * NEUTRAL as f64) as u32, Relaxed);
        self.report_at_ms.store(now_ms().max(1), Relaxed);
        self.last_report.store(Some(std::sync::Arc::new(r)));
    }

    /// Age of the last report, if any.
    pub fn report_age(&self) -> Option<Duration> {
        match self.report_at_ms.load(Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(now_ms().saturating_sub(at))),
        }
    }

    /// The report's score in (0, 1]; a missing or stale report counts as neutral (1).
    pub fn report_factor(&self) -> f64 {
        let at = self.report_at_ms.load(Relaxed);
        if at == 0 || now_ms().saturating_sub(at) > self.conf.load().report_ttl().as_millis() as u64 {
            return 1.0;
        }
        self.report_score.load(Relaxed) as f64 / NEUTRAL as f64
    }
}

/// One unit of one of a backend's gauges (`spliced_open`, `parked_open`), held while a flow is
/// in that state and given back when dropped, however the flow ends.
pub struct Gauge {
    backend: std::sync::Arc<Backend>,
    of: fn(&Backend) -> &AtomicU64,
}

impl Gauge {
    pub fn hold(backend: &std::sync::Arc<Backend>, of: fn(&Backend) -> &AtomicU64) -> Gauge {
        of(backend).fetch_add(1, Relaxed);
        Gauge { backend: backend.clone(), of }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        (self.of)(&self.backend).fetch_sub(1, Relaxed);
    }
}

const NEUTRAL: u32 = 1_000_000;

/// Health score of a report: falls with CPU and memory use and with load; never below 0.05,
/// so a loaded backend still gets a trickle and can show it recovered.
fn report_score(cpu: f64, mem: f64, load: f64) -> f64 {
    let cpu = (cpu / 100.0).clamp(0.0, 1.0);
    let mem = (mem / 100.0).clamp(0.0, 1.0);
    let load = if load.is_finite() { load.max(0.0) } else { 0.0 };
    let s = 0.6 * (1.0 - cpu) + 0.2 * (1.0 - mem) + 0.2 / (1.0 + load);
    s.clamp(0.05, 1.0)
}

/// The client address the balancer hashes: IPv4-mapped IPv6 counts as IPv4.
pub fn client_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => speedmimi_common::hash::client_v4(u32::from(v4)),
        IpAddr::V6(v6) => speedmimi_common::hash::client_v6(u128::from(v6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_score_orders_load() {
        let idle = report_score(5.0, 20.0, 0.1);
        let busy = report_score(95.0, 90.0, 8.0);
        assert!(idle > 0.8 && (0.05..0.2).contains(&busy), "{idle} {busy}");
    }
}
