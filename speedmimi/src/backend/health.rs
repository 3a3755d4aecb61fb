//! A backend's active-check record, beside the backend it describes: the counters and last error
//! the checker tasks (`crate::health`) update through [`Backend::record_probe`], and the admin
//! API reads through [`Backend::health_snapshot`]. The verdict itself is `Backend::checked_up`,
//! which the balancers honour.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde::Serialize;

use super::{Backend, now_ms};
use crate::config::{HealthCheckKind, HealthCheckSection};

/// The active-check record of one backend, for the logs and the admin API.
#[derive(Debug, Default)]
pub struct Health {
    successes: AtomicU32,
    failures: AtomicU32,
    checks: AtomicU64,
    /// `now_ms()` of the last finished probe; 0 = none yet.
    last_check_ms: AtomicU64,
    /// Why the last failed probe failed (kept after recovery, as history).
    last_error: Mutex<Option<String>>,
}

impl Health {
    /// Consecutive successful probes (0 after a failure).
    pub fn consecutive_successes(&self) -> u32 {
        self.successes.load(Relaxed)
    }

    /// Consecutive failed probes (0 after a success).
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Relaxed)
    }

    /// Probes finished since the check started (or was last reset).
    pub fn checks(&self) -> u64 {
        self.checks.load(Relaxed)
    }

    /// How long ago the last probe finished; None before the first.
    pub fn last_check_age(&self) -> Option<Duration> {
        match self.last_check_ms.load(Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(now_ms().saturating_sub(at))),
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("health lock").clone()
    }

    /// Forgets everything: the backend's check was removed.
    pub(crate) fn reset(&self) {
        self.successes.store(0, Relaxed);
        self.failures.store(0, Relaxed);
        self.checks.store(0, Relaxed);
        self.last_check_ms.store(0, Relaxed);
        *self.last_error.lock().expect("health lock") = None;
    }
}

/// A backend's health as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthSnapshot {
    /// The configured active check, None when the backend has none.
    #[serde(rename = "type")]
    pub kind: Option<HealthCheckKind>,
    /// The active-check verdict (true when no check is configured).
    pub up: bool,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    pub checks: u64,
    /// Milliseconds since the last probe finished.
    pub last_check_ms_ago: Option<u64>,
    pub last_error: Option<String>,
}

impl Backend {
    /// The current active-check state.
    pub fn health_snapshot(&self) -> HealthSnapshot {
        let h = &self.health;
        HealthSnapshot {
            kind: self.conf.load().health_check.as_ref().map(|c| c.kind),
            up: self.checked_up.load(Relaxed),
            consecutive_successes: h.consecutive_successes(),
            consecutive_failures: h.consecutive_failures(),
            checks: h.checks(),
            last_check_ms_ago: h.last_check_age().map(|d| d.as_millis() as u64),
            last_error: h.last_error(),
        }
    }

    /// Counts one probe outcome (`failure`: why it failed) and flips the active-check verdict
    /// when `hc`'s threshold is reached.
    pub fn record_probe(&self, hc: &HealthCheckSection, failure: Option<&dyn std::fmt::Display>) {
        let h = &self.health;
        h.checks.fetch_add(1, Relaxed);
        h.last_check_ms.store(now_ms().max(1), Relaxed);
        match failure {
            None => {
                h.failures.store(0, Relaxed);
                let n = h.successes.fetch_add(1, Relaxed).saturating_add(1);
                tracing::trace!(successes = n, "health probe passed");
                if n >= hc.successes && !self.checked_up.swap(true, Relaxed) {
                    self.standing.ramp_after(super::now_ms());
                    tracing::info!(upstream = %self.upstream, backend = %self.id, successes = n,
                        last_error = h.last_error().as_deref().unwrap_or(""), "backend up: health checks pass again");
                }
            }
            Some(error) => {
                h.successes.store(0, Relaxed);
                let n = h.failures.fetch_add(1, Relaxed).saturating_add(1);
                tracing::debug!(failures = n, %error, "health probe failed");
                *h.last_error.lock().expect("health lock") = Some(error.to_string());
                if n >= hc.failures && self.checked_up.swap(false, Relaxed) {
                    tracing::warn!(upstream = %self.upstream, backend = %self.id, failures = n, %error,
                        "backend down: health checks fail");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use super::*;
    use crate::config::BackendSection;

    fn backend(hc: Option<HealthCheckSection>) -> Arc<Backend> {
        let conf: BackendSection = serde_yaml::from_str("id: b1\nhost: 127.0.0.1\nport: 1\n").unwrap();
        let conf = BackendSection { health_check: hc, ..conf };
        Arc::new(Backend::new("default", &conf, SocketAddr::from(([127, 0, 0, 1], 1))))
    }

    #[test]
    fn thresholds_flip_the_verdict_once() {
        let hc = HealthCheckSection { failures: 2, successes: 3, kind: HealthCheckKind::Tcp, ..Default::default() };
        let b = backend(Some(hc.clone()));
        b.record_probe(&hc, Some(&"connect refused"));
        assert!(b.checked_up.load(Relaxed), "one failure of two");
        b.record_probe(&hc, Some(&"grpc Check: grpc-status 14"));
        assert!(!b.checked_up.load(Relaxed));
        b.record_probe(&hc, None);
        b.record_probe(&hc, None);
        assert!(!b.checked_up.load(Relaxed), "two successes of three");
        b.record_probe(&hc, None);
        let s = b.health_snapshot();
        assert!(s.up);
        assert_eq!((s.consecutive_successes, s.consecutive_failures, s.checks), (3, 0, 5));
        assert_eq!(s.last_error.as_deref(), Some("grpc Check: grpc-status 14"));
        assert_eq!(s.kind, Some(HealthCheckKind::Tcp));
    }
}
