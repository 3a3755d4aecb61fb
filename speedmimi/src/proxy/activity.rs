//! What a client connection's transport (`io::ClientIo`, the h2 idle watch in `server`) and its
//! request handler share: how many requests are open on it and since when none has been, which
//! is the clock of "a request head within `read_timeout`" (HTTP/1) and of the idle timeout
//! (HTTP/2); and whether it switched protocols, after which its bytes are a tunnel's.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use tokio::time::Instant;

/// One per client connection. The counters are the connection's own (never shared between
/// connections), so updating them per request costs no contention.
pub struct Activity {
    base: Instant,
    open: AtomicUsize,
    /// When the last open request ended (or the connection was accepted), in ms since `base`.
    quiet_since: AtomicU64,
    switched: AtomicBool,
}

impl Activity {
    /// A connection accepted at `accepted`: its first request head is due `read_timeout` from
    /// then, however long sniffing or the TLS handshake took.
    pub fn new(accepted: Instant) -> Arc<Activity> {
        Arc::new(Activity {
            base: accepted,
            open: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(0),
            switched: AtomicBool::new(false),
        })
    }

    /// Marks a request open until the returned guard is dropped (with its response body).
    pub fn open(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, SeqCst);
        Open(self.clone())
    }

    /// When the connection is due to be closed for want of a request: `limit` after the last
    /// request ended. None while a request is open or once the connection switched protocols.
    pub fn deadline(&self, limit: Duration) -> Option<Instant> {
        if self.open.load(SeqCst) > 0 || self.switched.load(SeqCst) {
            return None;
        }
        Some(self.base + Duration::from_millis(self.quiet_since.load(SeqCst)) + limit)
    }

    /// The connection switched protocols (101): what follows is not HTTP.
    pub fn switch(&self) {
        self.switched.store(true, SeqCst);
    }

    pub fn switched(&self) -> bool {
        self.switched.load(SeqCst)
    }
}

/// An open request; see [`Activity::open`].
pub struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        // Stamped before the count drops, so no one sees "nothing open" with an old stamp.
        let now = Instant::now().saturating_duration_since(self.0.base).as_millis() as u64;
        self.0.quiet_since.store(now, SeqCst);
        self.0.open.fetch_sub(1, SeqCst);
    }
}

/// Resolves when the connection has had no open request for `limit` (never once it switched).
pub async fn idle(activity: &Activity, limit: Duration) {
    loop {
        match activity.deadline(limit) {
            Some(due) if due <= Instant::now() => return,
            Some(due) => tokio::time::sleep_until(due).await,
            // Busy: look again later (a request may last long; this wakes once per `limit`).
            None => tokio::time::sleep(limit).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deadline_follows_the_last_request() {
        let a = Activity::new(Instant::now());
        let limit = Duration::from_secs(5);
        assert_eq!(a.deadline(limit), Some(a.base + limit));
        let first = a.open();
        let second = a.open();
        assert_eq!(a.deadline(limit), None);
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(first);
        assert_eq!(a.deadline(limit), None, "one request still open");
        drop(second);
        let due = a.deadline(limit).expect("quiet");
        assert!(due >= a.base + Duration::from_millis(30) + limit, "the clock restarts when the last request ends");
        a.switch();
        assert_eq!(a.deadline(limit), None);
    }
}
