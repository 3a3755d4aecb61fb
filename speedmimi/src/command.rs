//! The one vocabulary of change. Startup, the admin API and reloads all express what they want
//! as a `Command`; `State::apply` carries it out whole or not at all.

use serde::Deserialize;

use crate::config::{BackendSection, FileConfig};

#[derive(Debug, Clone)]
pub enum Command {
    /// Adds a backend to an existing upstream; it gets traffic at once.
    AddBackend { upstream: String, backend: BackendSection },
    /// Removes a backend: no new requests; in-flight ones finish; upgraded flows are closed
    /// after the drain deadline (`server.write_timeout`).
    RemoveBackend { upstream: String, id: String },
    /// Changes the given fields of a backend (a JSON object merged onto its settings; `id` names it).
    UpdateBackend { upstream: String, id: String, patch: serde_json::Map<String, serde_json::Value> },
    /// Closes a backend's live connections (idle pooled and upgraded ones) now.
    Disconnect { upstream: String, id: String },
    /// Replaces the whole config (reload, or `PUT /api/v1/config` after merging).
    ReplaceConfig(Box<FileConfig>),
    /// A backend's own report of its load, for the performance balancer.
    Report { upstream: String, id: String, report: PerformanceReport },
}

/// `POST /api/v1/report`'s `performance` object.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PerformanceReport {
    /// Percent, 0-100.
    pub cpu_usage: f64,
    /// Percent, 0-100.
    pub memory_usage: f64,
    /// One-minute load average.
    pub load_avg_1: f64,
}

impl PerformanceReport {
    /// Out-of-range values are refused rather than clamped: a broken reporter should be seen.
    pub fn problems(&self) -> Option<String> {
        let pct = |v: f64| v.is_finite() && (0.0..=100.0).contains(&v);
        if !pct(self.cpu_usage) {
            Some(format!("performance.cpu_usage: {} is not a percentage 0-100", self.cpu_usage))
        } else if !pct(self.memory_usage) {
            Some(format!("performance.memory_usage: {} is not a percentage 0-100", self.memory_usage))
        } else if !(self.load_avg_1.is_finite() && self.load_avg_1 >= 0.0) {
            Some(format!("performance.load_avg_1: {} is not a load average", self.load_avg_1))
        } else {
            None
        }
    }
}
