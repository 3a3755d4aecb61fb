//! Which accepted connections a listener serves: one of `server.max_conn` slots each, and at
//! most `server.max_conn_per_client` per client address across every listener and worker, so
//! that one client cannot take all the slots. IPv6 clients are counted by their /64 (one host
//! owns a whole /64 as easily as one address); IPv4-mapped IPv6 addresses count as the IPv4
//! address.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::sync::Semaphore;

/// A listener's limits; cloned for each worker and listener that shares them.
#[derive(Clone)]
pub struct Admission {
    /// One permit per `server.max_conn` (the gRPC listener has its own).
    pub slots: Arc<Semaphore>,
    /// Shared by every listener; None without a per-client limit.
    pub per_client: Option<Arc<PerClient>>,
}

/// The open connections per client. Taken once per accepted connection, never per request.
pub struct PerClient {
    limit: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// A client's connection counted; uncounted when dropped.
pub struct ClientSlot {
    table: Arc<PerClient>,
    key: IpAddr,
}

impl PerClient {
    /// `limit` 0: no limit (nothing is counted).
    pub fn new(limit: u32) -> Option<Arc<PerClient>> {
        (limit > 0).then(|| Arc::new(PerClient { limit, open: Mutex::new(HashMap::new()) }))
    }

    /// Counts a new connection from `ip`; None when that client already holds `limit`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot { table: self.clone(), key })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// What a client is counted by: its IPv4 address, or its IPv6 /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_client_and_frees_on_drop() {
        let t = PerClient::new(2).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let (x, y) = (t.admit(a).unwrap(), t.admit(a).unwrap());
        assert!(t.admit(a).is_none(), "a third connection from the same address");
        assert!(t.admit("192.0.2.2".parse().unwrap()).is_some(), "another address is not limited by the first");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(t.admit(mapped).is_none(), "an IPv4-mapped address counts as its IPv4 address");
        drop(x);
        let z = t.admit(a).expect("a slot freed by a closed connection");
        drop((y, z));
        assert!(t.open.lock().unwrap().is_empty(), "entries of clients with nothing open are removed");
    }

    #[test]
    fn ipv6_counts_by_slash_64() {
        let t = PerClient::new(1).unwrap();
        let _held = t.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(t.admit("2001:db8:1:2:ffff::9".parse().unwrap()).is_none(), "same /64");
        assert!(t.admit("2001:db8:1:3::1".parse().unwrap()).is_some(), "another /64");
    }

    #[test]
    fn zero_is_no_limit() {
        assert!(PerClient::new(0).is_none());
    }
}
