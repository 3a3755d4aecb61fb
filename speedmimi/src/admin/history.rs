//! The dashboard's memory: once a second, a tick of live figures for the server and every
//! upstream, backend, route and `l4:` service, handed to the pages watching; and the last five
//! minutes of rate, p99 and errors per scope, so a page opened now draws history at once.
//! Sampled off the request path from the counters the proxy keeps anyway.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{
            AtomicBool,
            Ordering::{Relaxed, SeqCst},
        },
    },
    time::Instant,
};

use serde_json::{Value, json};
use tokio::sync::watch;

use super::backends::view;
use crate::{
    state::State,
    stats::{RouteBackendStats, Traffic, quantile_of, unix_ms},
    steering::Steering,
};

/// Seconds of history kept, one point per second: five minutes.
pub const KEEP: usize = 300;
/// Live rates and quantiles cover this many seconds; the history's points cover one each.
const WINDOW: usize = 10;

/// Cumulative counters of one scope at one moment.
#[derive(Clone)]
struct Reading {
    at: Instant,
    requests: u64,
    c4xx: u64,
    c5xx: u64,
    /// Latency histogram buckets (empty for routes, which keep none).
    buckets: Vec<u64>,
    /// Packets XDP steered to a backend, and bytes the kernel spliced to and from it.
    packets: u64,
    spliced_bytes: u64,
}

impl Reading {
    fn new(at: Instant) -> Reading {
        Reading { at, requests: 0, c4xx: 0, c5xx: 0, buckets: Vec::new(), packets: 0, spliced_bytes: 0 }
    }

    fn of(at: Instant, t: &Traffic) -> Reading {
        Reading {
            requests: t.requests.load(Relaxed),
            c4xx: t.classes[3].load(Relaxed),
            c5xx: t.classes[4].load(Relaxed),
            buckets: t.latency.counts(),
            ..Reading::new(at)
        }
    }

    fn of_route(at: Instant, stats: &[Arc<RouteBackendStats>]) -> Reading {
        let mut r = Reading::new(at);
        for (code, n) in stats.iter().flat_map(|s| s.codes()) {
            r.requests += n;
            match code / 100 {
                4 => r.c4xx += n,
                5 => r.c5xx += n,
                _ => {}
            }
        }
        r
    }

    fn add(&mut self, o: &Reading) {
        self.requests += o.requests;
        self.c4xx += o.c4xx;
        self.c5xx += o.c5xx;
        self.packets += o.packets;
        self.spliced_bytes += o.spliced_bytes;
        if self.buckets.len() < o.buckets.len() {
            self.buckets.resize(o.buckets.len(), 0);
        }
        self.buckets.iter_mut().zip(&o.buckets).for_each(|(a, b)| *a += b);
    }
}

/// What a scope did over a span of time, per second.
#[derive(Default, Clone, Copy)]
struct Figures {
    rate: f64,
    e4: f64,
    e5: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    pps: f64,
    spliced_bps: f64,
}

impl Figures {
    fn json(&self) -> Value {
        json!({
            "rate": r2(self.rate), "errors_4xx": r2(self.e4), "errors_5xx": r2(self.e5),
            "p50_ms": self.p50, "p99_ms": self.p99,
        })
    }

    /// One point of a chart: rate, p99, 4xx and 5xx per second.
    fn point(&self) -> Value {
        json!([r2(self.rate), self.p99, r2(self.e4), r2(self.e5)])
    }
}

fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The last readings of one scope, enough for the live window.
#[derive(Default)]
struct Trail(VecDeque<Reading>);

impl Trail {
    fn push(&mut self, r: Reading) {
        self.0.push_back(r);
        if self.0.len() > WINDOW + 1 {
            self.0.pop_front();
        }
    }

    /// Figures over the last `steps` readings (fewer while the trail is young). Counters that
    /// went back (an upstream that lost a backend) count as no traffic, never as negative.
    fn over(&self, steps: usize) -> Figures {
        let n = self.0.len();
        if n < 2 {
            return Figures::default();
        }
        let (a, b) = (&self.0[n - 1 - steps.min(n - 1)], &self.0[n - 1]);
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
        let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
        let mut span = b.buckets.clone();
        span.iter_mut().zip(&a.buckets).for_each(|(y, x)| *y = y.saturating_sub(*x));
        Figures {
            rate: per(a.requests, b.requests),
            e4: per(a.c4xx, b.c4xx),
            e5: per(a.c5xx, b.c5xx),
            p50: quantile_of(&span, 0.5),
            p99: quantile_of(&span, 0.99),
            pps: per(a.packets, b.packets),
            spliced_bps: per(a.spliced_bytes, b.spliced_bytes),
        }
    }
}

/// The history and the latest tick. One per admin listener.
pub struct History {
    inner: Mutex<Inner>,
    /// The latest tick as JSON text, serialised once for every page watching; `None` before the
    /// first sample and after `close`.
    ticks: watch::Sender<Option<Arc<str>>>,
    closed: AtomicBool,
}

#[derive(Default)]
struct Inner {
    trails: HashMap<String, Trail>,
    /// One JSON point per second, oldest first.
    points: VecDeque<Arc<str>>,
}

impl Default for History {
    fn default() -> Self {
        History { inner: Mutex::default(), ticks: watch::Sender::new(None), closed: AtomicBool::new(false) }
    }
}

impl History {
    /// Reads every counter once (called every second): publishes the tick and keeps its point.
    pub fn sample(&self, state: &State, steering: Option<&Steering>) {
        let mut inner = self.inner.lock().expect("history lock");
        let (live, point) = inner.tick(state, steering, Instant::now());
        let point: Arc<str> = point.to_string().into();
        inner.points.push_back(point.clone());
        if inner.points.len() > KEEP {
            inner.points.pop_front();
        }
        drop(inner);
        let tick = format!("{{\"live\":{live},\"point\":{point}}}");
        if !self.closed.load(SeqCst) {
            self.ticks.send_replace(Some(tick.into()));
        }
    }

    /// The points kept, oldest first, as one JSON array.
    pub fn points_json(&self) -> String {
        let inner = self.inner.lock().expect("history lock");
        let mut out = String::with_capacity(2 + inner.points.iter().map(|p| p.len() + 1).sum::<usize>());
        out.push('[');
        for (i, p) in inner.points.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(p);
        }
        out.push(']');
        out
    }

    /// The latest tick (`{"live": .., "point": ..}`), if one was taken.
    pub fn latest(&self) -> Option<Arc<str>> {
        self.ticks.borrow().clone()
    }

    /// Ticks as they come; `None` when the history was closed. Checked after subscribing: a
    /// close from then on is a change the receiver sees, so no stream outlives it.
    pub fn subscribe(&self) -> Option<watch::Receiver<Option<Arc<str>>>> {
        let rx = self.ticks.subscribe();
        (!self.closed.load(SeqCst)).then_some(rx)
    }

    /// Ends every page's stream (the daemon stops: open streams must not hold up the stop).
    pub fn close(&self) {
        self.closed.store(true, SeqCst);
        self.ticks.send_replace(None);
    }
}

impl Inner {
    /// Moves a scope's trail on by one reading; its figures over the live window and over the
    /// last second.
    fn step(&mut self, kept: &mut HashMap<String, Trail>, key: String, r: Reading) -> (Figures, Figures) {
        let mut trail = self.trails.remove(&key).unwrap_or_default();
        trail.push(r);
        let figures = (trail.over(WINDOW), trail.over(1));
        kept.insert(key, trail);
        figures
    }

    /// This second's live view and chart point. Scopes that went away lose their trails.
    fn tick(&mut self, state: &State, steering: Option<&Steering>, now: Instant) -> (Value, Value) {
        let snap = state.snapshot();
        let dp = &*state.datapath;
        let s = &state.stats;
        let mut kept = HashMap::new();
        let mut points = serde_json::Map::new();
        let mut point = |key: &str, f: &Figures| points.insert(key.to_owned(), f.point());

        let (live, last) = self.step(&mut kept, "server".into(), Reading::of(now, &s.traffic));
        point("server", &last);
        let server = json!({
            "uptime_seconds": s.started.elapsed().as_secs(),
            "connections_open": s.connections_open.load(Relaxed),
            "connections_total": s.connections_total.load(Relaxed),
            "datapath": dp.describe(),
            "config_generation": s.config_generation.load(Relaxed),
            "config_changed_unix_ms": s.config_changed_unix_ms.load(Relaxed),
            "config_reloaded_unix_ms": match s.config_reloaded_unix_ms.load(Relaxed) { 0 => None, t => Some(t) },
            "tls": state.tls.is_some(),
            "upgraded_open": s.upgraded_open.load(Relaxed),
            "spliced_open": dp.spliced_sockets() / 2,
            "spliced_parked": s.spliced_parked.load(Relaxed),
            "figures": live.json(),
        });

        let mut backend_pps = HashMap::new();
        let mut upstreams = Vec::new();
        for (name, up) in &snap.upstreams {
            let mut sum = Reading::new(now);
            let mut backends = Vec::new();
            let mut rates: (Vec<Figures>, Vec<Figures>) = (Vec::new(), Vec::new());
            for b in up.backends.iter() {
                let mut r = Reading::of(now, &b.traffic);
                let splice = dp.counters(b.slot);
                r.spliced_bytes = splice.map_or(0, |c| c.bytes_to_backend + c.bytes_to_client);
                r.packets = dp.l4_counters(b.slot).map_or(0, |x| x.packets);
                sum.add(&r);
                let key = format!("b/{name}/{}", b.id);
                let (live, last) = self.step(&mut kept, key.clone(), r);
                point(&key, &last);
                rates.0.push(live);
                rates.1.push(last);
                backend_pps.insert((name.clone(), b.id.clone()), live.pps);
                let mut v = view(b, dp);
                v["figures"] = live.json();
                v["figures"]["xdp_packets_per_second"] = json!(r2(live.pps));
                v["figures"]["spliced_bytes_per_second"] = json!(r2(live.spliced_bps));
                backends.push(v);
            }
            let key = format!("u/{name}");
            let (mut live, mut last) = self.step(&mut kept, key.clone(), sum);
            // Rates are the backends' own: a removed backend's totals leaving the sum must not
            // read as a fall in traffic. Quantiles come from the summed histograms.
            for (f, of) in [(&mut live, &rates.0), (&mut last, &rates.1)] {
                (f.rate, f.e4, f.e5) = of.iter().fold((0.0, 0.0, 0.0), |a, b| (a.0 + b.rate, a.1 + b.e4, a.2 + b.e5));
            }
            point(&key, &last);
            upstreams.push(json!({ "name": name, "figures": live.json(), "backends": backends }));
        }

        let mut routes = Vec::new();
        for route in &snap.routes {
            let key = format!("r/{}", route.name);
            let (live, last) = self.step(&mut kept, key.clone(), Reading::of_route(now, &route.stats));
            point(&key, &last);
            routes.push(json!({
                "name": route.name, "prefix": route.prefix, "upstream": route.upstream.name, "figures": live.json(),
            }));
        }
        self.trails = kept;

        let config = state.config();
        let l4: Vec<Value> = steering
            .map(Steering::shares)
            .unwrap_or_default()
            .into_iter()
            .map(|ring| {
                let conf = config.file.l4.iter().find(|c| c.name == ring.service);
                let owners: Vec<Value> = ring
                    .owners
                    .iter()
                    .map(|(id, share)| {
                        let pps = backend_pps.get(&(ring.upstream.clone(), id.clone())).copied().unwrap_or(0.0);
                        json!({ "backend": id, "ring_share": r2(*share * 100.0) / 100.0, "packets_per_second": r2(pps) })
                    })
                    .collect();
                json!({
                    "service": ring.service, "upstream": ring.upstream,
                    "vip": conf.map(|c| c.vip.to_string()), "port": conf.map(|c| c.port),
                    "interface": conf.map(|c| c.interface.clone()), "backends": owners,
                })
            })
            .collect();

        let t = unix_ms();
        let live = json!({ "t": t, "server": server, "upstreams": upstreams, "routes": routes, "l4": l4 });
        (live, json!({ "t": t, "s": points }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A trail of readings one second apart: rates are per second of real time between them,
    /// quantiles come from the span's own requests, and a counter that went back reads as 0.
    #[test]
    fn figures_come_from_the_span_only() {
        let t0 = Instant::now();
        let traffic = Traffic::default();
        let mut trail = Trail::default();
        for ms in [100u64; 50] {
            traffic.record(200, Duration::from_millis(ms));
        }
        trail.push(Reading::of(t0, &traffic));
        for _ in 0..20 {
            traffic.record(503, Duration::from_millis(2));
        }
        traffic.record(404, Duration::from_millis(2));
        trail.push(Reading::of(t0 + Duration::from_secs(2), &traffic));
        let f = trail.over(1);
        assert_eq!((f.rate, f.e4, f.e5), (10.5, 0.5, 10.0));
        // The 100 ms requests came before the span: its p99 is the 2 ms ones'.
        assert!(f.p99.unwrap() < 3.0, "{:?}", f.p99);

        let mut gone = Reading::new(t0 + Duration::from_secs(3));
        gone.requests = 1;
        trail.push(gone);
        let f = trail.over(1);
        assert_eq!((f.rate, f.p99), (0.0, None));
        for i in 0..30 {
            trail.push(Reading::new(t0 + Duration::from_secs(4 + i)));
        }
        assert_eq!(trail.0.len(), WINDOW + 1, "a trail keeps only the live window");
    }
}
