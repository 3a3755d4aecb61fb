//! Traffic statistics: atomic counters and latency histograms updated on the request path
//! (no locks there), read by the admin API and `/metrics`. Rates over 1 s and 10 s come from a
//! once-a-second sampler off the request path.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// Latency histogram: 4 buckets per power of two of microseconds, from 1 µs to ~2^36 µs (19 h).
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
    count: AtomicU64,
}

const SUB: usize = 4;
const POWERS: usize = 36;
const BUCKETS: usize = POWERS * SUB + 1;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

/// Bucket of a value in µs: values below 4 are exact; above, 4 sub-buckets per power of two.
fn bucket_of(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let power = 63 - us.leading_zeros() as usize; // >= 2
    let sub = ((us >> (power - 2)) & 3) as usize;
    ((power - 1) * SUB + sub).min(BUCKETS - 1)
}

/// Upper bound (exclusive, µs) of a bucket.
fn bucket_upper(b: usize) -> u64 {
    if b < SUB {
        return b as u64 + 1;
    }
    let power = b / SUB + 1;
    let sub = (b % SUB) as u64;
    (4 + sub + 1) << (power - 2)
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.buckets[bucket_of(us)].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_us.load(Relaxed))
    }

    /// The `q` quantile (0..1) in ms, as the upper bound of its bucket (at most 25% high).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        quantile_of(&self.counts(), q)
    }

    /// Every bucket's count: the dashboard keeps a few, and the difference of two is the
    /// histogram of the time between them.
    pub fn counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Relaxed)).collect()
    }

    /// Cumulative counts at the given bounds (µs, ascending), for Prometheus `le` buckets.
    /// A bound counts the buckets whose whole range lies below it.
    pub fn cumulative(&self, bounds_us: &[u64]) -> Vec<u64> {
        let counts = self.counts();
        bounds_us
            .iter()
            .map(|&bound| counts.iter().enumerate().filter(|(b, _)| bucket_upper(*b) <= bound).map(|(_, c)| c).sum())
            .collect()
    }

    pub fn summary(&self) -> Latency {
        Latency {
            p50_ms: self.quantile_ms(0.5),
            p90_ms: self.quantile_ms(0.9),
            p99_ms: self.quantile_ms(0.99),
            mean_ms: match self.count() {
                0 => None,
                n => Some(self.sum().as_secs_f64() * 1000.0 / n as f64),
            },
        }
    }
}

/// The `q` quantile (0..1) in ms of a histogram's bucket counts ([`Histogram::counts`], or the
/// difference of two), as the upper bound of its bucket (at most 25% high).
pub fn quantile_of(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (b, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bucket_upper(b) as f64 / 1000.0);
        }
    }
    None
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

/// Counters of one scope (the whole server, or one backend).
#[derive(Default)]
pub struct Traffic {
    pub requests: AtomicU64,
    /// By status class: 1xx..5xx.
    pub classes: [AtomicU64; 5],
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub latency: Histogram,
    rate: Mutex<VecDeque<u64>>,
}

impl Traffic {
    pub fn record(&self, status: u16, latency: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if let Some(c) = self.classes.get((status / 100).saturating_sub(1) as usize) {
            c.fetch_add(1, Relaxed);
        }
        self.latency.record(latency);
    }

    /// Called once a second (off the request path): remembers the request count for rates.
    pub fn sample(&self) {
        let mut r = self.rate.lock().expect("rate lock");
        r.push_back(self.requests.load(Relaxed));
        if r.len() > 11 {
            r.pop_front();
        }
    }

    /// Requests per second over the last `secs` whole seconds (1 or 10).
    fn rate(&self, secs: usize) -> f64 {
        let r = self.rate.lock().expect("rate lock");
        let (Some(&last), n) = (r.back(), r.len()) else { return 0.0 };
        if n < 2 {
            return 0.0;
        }
        let span = secs.min(n - 1);
        (last - r[n - 1 - span]) as f64 / span as f64
    }

    pub fn report(&self) -> TrafficReport {
        let c = |i: usize| self.classes[i].load(Relaxed);
        TrafficReport {
            requests: RequestsReport {
                total: self.requests.load(Relaxed),
                per_second_1s: self.rate(1),
                per_second_10s: self.rate(10),
            },
            status: StatusReport { c1xx: c(0), c2xx: c(1), c3xx: c(2), c4xx: c(3), c5xx: c(4) },
            latency: self.latency.summary(),
            bytes: BytesReport { received: self.bytes_in.load(Relaxed), sent: self.bytes_out.load(Relaxed) },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TrafficReport {
    pub requests: RequestsReport,
    pub status: StatusReport,
    pub latency: Latency,
    pub bytes: BytesReport,
}

#[derive(Debug, Serialize)]
pub struct RequestsReport {
    pub total: u64,
    pub per_second_1s: f64,
    pub per_second_10s: f64,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    #[serde(rename = "1xx")]
    pub c1xx: u64,
    #[serde(rename = "2xx")]
    pub c2xx: u64,
    #[serde(rename = "3xx")]
    pub c3xx: u64,
    #[serde(rename = "4xx")]
    pub c4xx: u64,
    #[serde(rename = "5xx")]
    pub c5xx: u64,
}

#[derive(Debug, Serialize)]
pub struct BytesReport {
    /// From clients (request bodies).
    pub received: u64,
    /// To clients (response bodies).
    pub sent: u64,
}

/// Whole-server counters.
pub struct ServerStats {
    pub started: Instant,
    pub traffic: Traffic,
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    /// Connections closed at accept for `server.max_conn_per_client`.
    pub refused_per_client: AtomicU64,
    /// HTTP/1 connections the proxy's own engine handed to hyper (at a request it does not
    /// serve itself: an upgrade, a chunked body, ...).
    pub http1_handovers: AtomicU64,
    /// HTTP/2 requests forwarded to their HTTP/1.1 backend by the own engine (`h1::bridge`).
    pub h2_bridged: AtomicU64,
    pub upgraded_open: AtomicU64,
    pub upgraded_total: AtomicU64,
    /// Upgraded flows that ended, by how they were joined.
    pub spliced_flows: AtomicU64,
    pub copied_flows: AtomicU64,
    /// Spliced flows parked now: quiet, so watched by the parking lot instead of tokio.
    pub spliced_parked: AtomicU64,
    /// Running config changes applied since start (admin API or reload); 1 is the startup config.
    pub config_generation: AtomicU64,
    /// When the running config last changed, and when a whole config was last reloaded (SIGHUP
    /// or `PUT /api/v1/config`): Unix milliseconds, 0 for never.
    pub config_changed_unix_ms: AtomicU64,
    pub config_reloaded_unix_ms: AtomicU64,
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats {
            started: Instant::now(),
            traffic: Traffic::default(),
            connections_open: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            refused_per_client: AtomicU64::new(0),
            http1_handovers: AtomicU64::new(0),
            h2_bridged: AtomicU64::new(0),
            upgraded_open: AtomicU64::new(0),
            upgraded_total: AtomicU64::new(0),
            spliced_flows: AtomicU64::new(0),
            copied_flows: AtomicU64::new(0),
            spliced_parked: AtomicU64::new(0),
            config_generation: AtomicU64::new(1),
            config_changed_unix_ms: AtomicU64::new(unix_ms()),
            config_reloaded_unix_ms: AtomicU64::new(0),
        }
    }
}

impl ServerStats {
    /// A config change was applied; `whole`: a whole config replaced the running one.
    pub fn config_applied(&self, whole: bool) {
        let now = unix_ms();
        self.config_generation.fetch_add(1, Relaxed);
        self.config_changed_unix_ms.store(now, Relaxed);
        if whole {
            self.config_reloaded_unix_ms.store(now, Relaxed);
        }
    }
}

/// Wall-clock time in Unix milliseconds (what a browser's clock compares with).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Held while a client connection is open.
pub struct ConnectionGuard(std::sync::Arc<ServerStats>);

impl ServerStats {
    pub fn connection(self: &std::sync::Arc<Self>) -> ConnectionGuard {
        self.connections_open.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
        ConnectionGuard(self.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

/// Held while an upgraded (WebSocket) flow is open.
pub struct UpgradedGuard(std::sync::Arc<ServerStats>);

impl ServerStats {
    pub fn upgraded(self: &std::sync::Arc<Self>) -> UpgradedGuard {
        self.upgraded_open.fetch_add(1, Relaxed);
        self.upgraded_total.fetch_add(1, Relaxed);
        UpgradedGuard(self.clone())
    }
}

impl Drop for UpgradedGuard {
    fn drop(&mut self) {
        self.0.upgraded_open.fetch_sub(1, Relaxed);
    }
}

/// Held while a spliced flow is parked (outside tokio), also when it is dropped parked.
pub struct ParkedGuard(std::sync::Arc<ServerStats>);

impl ServerStats {
    pub fn parked(self: &std::sync::Arc<Self>) -> ParkedGuard {
        self.spliced_parked.fetch_add(1, Relaxed);
        ParkedGuard(self.clone())
    }
}

impl Drop for ParkedGuard {
    fn drop(&mut self) {
        self.0.spliced_parked.fetch_sub(1, Relaxed);
    }
}

/// Requests of one route to one backend, by exact status code (`speedmimi_requests_total`).
pub struct RouteBackendStats {
    pub route: String,
    pub upstream: String,
    pub backend: String,
    codes: Box<[AtomicU64; 500]>,
}

impl RouteBackendStats {
    pub fn new(route: &str, upstream: &str, backend: &str) -> Self {
        RouteBackendStats {
            route: route.to_owned(),
            upstream: upstream.to_owned(),
            backend: backend.to_owned(),
            codes: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    pub fn record(&self, status: u16) {
        if let Some(c) = self.codes.get((status as usize).wrapping_sub(100)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// (code, count) for every code seen.
    pub fn codes(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.codes.iter().enumerate().map(|(i, c)| (i as u16 + 100, c.load(Relaxed))).filter(|(_, n)| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order() {
        let mut last = 0;
        for us in [0u64, 1, 3, 4, 5, 7, 8, 100, 1000, 12_345, 1 << 30] {
            let b = bucket_of(us);
            assert!(b >= last, "{us}");
            assert!(bucket_upper(b) > us, "{us} above its bucket's bound {}", bucket_upper(b));
            last = b;
        }
    }

    #[test]
    fn quantiles_are_close() {
        let h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((50.0..=63.0).contains(&p50), "{p50}");
        assert!((99.0..=124.0).contains(&p99), "{p99}");
        assert_eq!(h.cumulative(&[u64::MAX])[0], 100);
    }
}
