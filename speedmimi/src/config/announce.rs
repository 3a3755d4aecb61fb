//! `announce`: this node tells the network which `l4:` VIPs it serves, through the host's BGP
//! daemon (see `crate::announce`).

use serde::{Deserialize, Serialize};

use super::Problems;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnnounceSection {
    /// Put each servable `l4:` VIP on `interface` for the BGP daemon to export.
    pub enabled: bool,
    /// The interface SpeedMimi creates and owns (a TUN device that ends with the process).
    pub interface: String,
}

impl Default for AnnounceSection {
    fn default() -> Self {
        AnnounceSection { enabled: false, interface: "speedmimi-vip".into() }
    }
}

impl AnnounceSection {
    pub(super) fn problems(&self, l4_services: usize) -> Problems {
        let mut out = Problems::new();
        let name = &self.interface;
        if name.is_empty() || name.len() > 15 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            out.push((
                "interface".into(),
                format!("{name:?} is not a network interface name (1-15 of A-Z a-z 0-9 - _ .)"),
            ));
        }
        if self.enabled && l4_services == 0 {
            out.push(("enabled".into(), "is true, but there are no l4 services whose VIPs it would announce".into()));
        }
        out
    }
}
