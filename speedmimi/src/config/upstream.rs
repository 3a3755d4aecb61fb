//! `upstreams.<name>`: how an upstream treats its backends beyond picking one: slow start,
//! outlier ejection, retries and their budget, and the latency estimate `performance` uses.
//! Every field has a default, and an upstream left out of `upstreams:` gets them all.

use serde::{Deserialize, Serialize};

use super::{Dur, Problems};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// An added, re-enabled or recovered backend's share ramps from 10% to full over this long;
    /// 0 = at once.
    pub slow_start: Dur,
    /// How fast `performance`'s latency estimate forgets a slow answer (peak-EWMA time constant).
    pub latency_decay: Dur,
    pub outlier_ejection: OutlierSection,
    pub retries: RetrySection,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        UpstreamSection {
            slow_start: Dur::secs(0),
            latency_decay: Dur::secs(10),
            outlier_ejection: OutlierSection::default(),
            retries: RetrySection::default(),
        }
    }
}

/// Passive ejection of a backend that keeps failing (5xx answers, connect failures, resets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierSection {
    /// Failures in a row that eject a backend; 0 = never eject.
    pub consecutive_failures: u32,
    /// The n-th ejection in a row lasts n × this (at most 10×).
    pub base_time: Dur,
    /// At most this share of the upstream's backends is ejected at once (rounded down, so an
    /// upstream of one backend never loses it to ejection).
    pub max_ejected_percent: u32,
}

impl Default for OutlierSection {
    fn default() -> Self {
        OutlierSection { consecutive_failures: 5, base_time: Dur::secs(30), max_ejected_percent: 50 }
    }
}

/// Retries on another backend, bounded by a budget so that they cannot amplify an outage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySection {
    /// Retries of one request at most, each on a backend not tried yet for it; 0 = no retries.
    pub max: u32,
    /// Statuses that make an idempotent request go to another backend.
    pub statuses: Vec<u16>,
    /// Retries may be this share of requests (over the last 10 s) ...
    pub budget_percent: u32,
    /// ... plus this many per second.
    pub min_per_second: u32,
}

impl Default for RetrySection {
    fn default() -> Self {
        RetrySection { max: 2, statuses: vec![502, 503, 504], budget_percent: 20, min_per_second: 10 }
    }
}

impl UpstreamSection {
    pub fn problems(&self) -> Problems {
        let mut out = Problems::new();
        if self.slow_start.get() > std::time::Duration::from_secs(3600) {
            out.push(("slow_start".into(), "at most 1h".into()));
        }
        let decay = self.latency_decay.get();
        if decay < std::time::Duration::from_millis(10) || decay > std::time::Duration::from_secs(600) {
            out.push(("latency_decay".into(), "must be within 10ms..10m".into()));
        }
        let o = &self.outlier_ejection;
        if o.consecutive_failures > 1000 {
            out.push(("outlier_ejection.consecutive_failures".into(), "at most 1000 (0 = off)".into()));
        }
        if o.base_time.get().is_zero() || o.base_time.get() > std::time::Duration::from_secs(3600) {
            out.push(("outlier_ejection.base_time".into(), "must be within 1ms..1h".into()));
        }
        if o.max_ejected_percent > 100 {
            out.push(("outlier_ejection.max_ejected_percent".into(), "at most 100".into()));
        }
        let r = &self.retries;
        if r.max > 10 {
            out.push(("retries.max".into(), "at most 10".into()));
        }
        for (i, s) in r.statuses.iter().enumerate() {
            if !(500..=599).contains(s) {
                out.push((format!("retries.statuses[{i}]"), format!("{s} is not a 5xx status")));
            }
        }
        if r.budget_percent > 100 {
            out.push(("retries.budget_percent".into(), "at most 100".into()));
        }
        if r.min_per_second > 100_000 {
            out.push(("retries.min_per_second".into(), "at most 100000".into()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str =
        "backends:\n  web:\n    - { id: a, host: 127.0.0.1, port: 1 }\nrouting:\n  r: { upstream: web }\n";

    #[test]
    fn defaults_apply_and_bad_values_are_named() {
        let c = Config::parse(BASE).unwrap();
        assert!(c.file.upstreams.is_empty());
        assert_eq!(c.upstream("web").retries.statuses, vec![502, 503, 504]);
        let bad = format!(
            "{BASE}upstreams:\n  web:\n    retries: {{ statuses: [404] }}\n    outlier_ejection: {{ max_ejected_percent: 101 }}\n  nope: {{}}\n"
        );
        let e = Config::parse(&bad).unwrap_err().to_string();
        for want in [
            "upstreams.web.retries.statuses[0]: 404 is not a 5xx status",
            "upstreams.web.outlier_ejection.max_ejected_percent: at most 100",
            "upstreams.nope: no such upstream in backends",
        ] {
            assert!(e.contains(want), "{want} not in {e}");
        }
        let typo = format!("{BASE}upstreams:\n  web:\n    slowstart: 1s\n");
        let e = Config::parse(&typo).unwrap_err().to_string();
        assert!(e.contains("slowstart") && e.contains("line"), "{e}");
    }
}
