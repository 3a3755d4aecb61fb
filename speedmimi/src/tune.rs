//! `speedmimi tune`: the kernel settings a busy load balancer wants, each with one line of why.
//! It prints what it would change (the default) and changes it only with `--apply`: the live
//! value under /proc/sys and a file in /etc/sysctl.d so a reboot keeps it. It only ever raises
//! an amount (or widens a range): a host tuned further already is left alone, and its values are
//! not written into our file. Modes (`tcp_tw_reuse`) are set to exactly the one wanted. Running it
//! twice changes nothing the second time.

use std::{
    fmt::Write as _,
    io,
    path::{Path, PathBuf},
};

/// One setting: its sysctl name, the value we want (numbers; a range is two), and why.
pub struct Setting {
    pub key: &'static str,
    pub want: &'static [u64],
    pub why: &'static str,
    /// A mode rather than an amount: set to exactly `want` (tcp_tw_reuse's 2 is not "more" than 1).
    pub exact: bool,
}

pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "net.core.somaxconn",
        want: &[65535],
        why: "listen backlog cap: SpeedMimi asks for 4096; bursts of new connections wait instead of being dropped",
        exact: false,
    },
    Setting {
        key: "net.ipv4.tcp_max_syn_backlog",
        want: &[65535],
        why: "half-open connections queued per listener during a burst of SYNs",
        exact: false,
    },
    Setting {
        key: "net.ipv4.ip_local_port_range",
        want: &[10_000, 65535],
        why: "source ports for connections to backends: ~55k per backend address instead of ~28k, \
              from 10000 up to keep clear of services' own ports",
        exact: false,
    },
    Setting {
        key: "net.ipv4.tcp_tw_reuse",
        want: &[1],
        why: "reuse TIME_WAIT ports for new connections to backends (1: every address; 2 is loopback only)",
        exact: true,
    },
    Setting {
        key: "fs.nr_open",
        want: &[2_097_152],
        why: "ceiling of a process's file limit: two descriptors per proxied flow; LimitNOFILE cannot pass it",
        exact: false,
    },
    Setting { key: "fs.file-max", want: &[4_194_304], why: "open files for the whole host", exact: false },
    Setting {
        key: "net.core.rmem_max",
        want: &[16_777_216],
        why: "largest receive buffer a socket may grow to (fast or distant clients, spliced flows)",
        exact: false,
    },
    Setting {
        key: "net.core.wmem_max",
        want: &[16_777_216],
        why: "largest send buffer a socket may grow to",
        exact: false,
    },
    Setting {
        key: "net.ipv4.tcp_rmem",
        want: &[4096, 131_072, 16_777_216],
        why: "TCP receive buffer min/default/max: autotuning may grow to 16 MiB",
        exact: false,
    },
    Setting {
        key: "net.ipv4.tcp_wmem",
        want: &[4096, 65_536, 16_777_216],
        why: "TCP send buffer min/default/max: autotuning may grow to 16 MiB",
        exact: false,
    },
    Setting {
        key: "net.core.netdev_max_backlog",
        want: &[16_384],
        why: "packets queued per CPU between the NIC and the stack before drops",
        exact: false,
    },
];

/// Where settings live: `/proc/sys` and the persistent file, or a test's directory.
pub struct Host {
    pub sysctl: PathBuf,
    pub conf: PathBuf,
}

/// A setting as found: its current value (None when the kernel has no such setting) and what
/// `--apply` would write (None when it is good already).
pub struct Finding {
    pub setting: &'static Setting,
    pub current: Option<Vec<u64>>,
    pub change: Option<Vec<u64>>,
}

fn path_of(root: &Path, key: &str) -> PathBuf {
    root.join(key.replace('.', "/"))
}

/// The value wanted given the current one: each field raised to ours, never lowered; the low
/// end of a port range lowered to ours (a wider range).
fn target(want: &[u64], current: &[u64]) -> Vec<u64> {
    if want.len() == 2 && current.len() == 2 && want[0] < want[1] {
        return vec![want[0].min(current[0]), want[1].max(current[1])];
    }
    want.iter().enumerate().map(|(i, w)| (*w).max(current.get(i).copied().unwrap_or(0))).collect()
}

pub fn inspect(host: &Host) -> Vec<Finding> {
    SETTINGS
        .iter()
        .map(|s| {
            let current = std::fs::read_to_string(path_of(&host.sysctl, s.key))
                .ok()
                .and_then(|t| t.split_whitespace().map(|v| v.parse().ok()).collect::<Option<Vec<u64>>>());
            let change = current
                .as_ref()
                .map(|c| if s.exact { s.want.to_vec() } else { target(s.want, c) })
                .filter(|t| Some(t) != current.as_ref());
            Finding { setting: s, current, change }
        })
        .collect()
}

fn show(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

/// The report `--print` shows: one line per setting, then the limit the unit sets.
pub fn report(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let s = f.setting;
        let state = match (&f.current, &f.change) {
            (None, _) => "not on this kernel; skipped".to_owned(),
            (Some(c), None) => format!("{} (ok)", show(c)),
            (Some(c), Some(t)) => format!("{} -> {}", show(c), show(t)),
        };
        let _ = writeln!(out, "{:<30} {state}\n{:<30} # {}", s.key, "", s.why);
    }
    out.push_str("(the file limit per process comes from the service: LimitNOFILE=1048576 in speedmimi.service)\n");
    out
}

/// Why `--apply` did not run.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("`speedmimi tune --apply` needs root (it writes {0}); run it with sudo, or apply the lines above by hand")]
    NotRoot(String),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
}

/// Writes each change live and all our settings to the persistent file; returns how many live
/// values changed (0 on a second run).
pub fn apply(host: &Host, findings: &[Finding], root: bool) -> Result<usize, TuneError> {
    if !root {
        return Err(TuneError::NotRoot(format!("{} and {}", host.sysctl.display(), host.conf.display())));
    }
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|source| TuneError::Write { path: path.display().to_string(), source })
    };
    let mut changed = 0;
    let mut conf =
        String::from("# Written by `speedmimi tune --apply`; values only ever raised. See `speedmimi tune`.\n");
    for f in findings {
        let Some(current) = &f.current else { continue };
        let value = f.change.as_ref().unwrap_or(current);
        // Ours: what we change now, or set on an earlier run. A value the host has beyond ours is
        // the operator's, kept out of our file.
        if value != f.setting.want {
            continue;
        }
        let _ = writeln!(conf, "# {}\n{} = {}", f.setting.why, f.setting.key, show(value));
        if let Some(t) = &f.change {
            write(&path_of(&host.sysctl, f.setting.key), &show(t))?;
            changed += 1;
        }
    }
    if std::fs::read_to_string(&host.conf).ok().as_deref() != Some(conf.as_str()) {
        if let Some(dir) = host.conf.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|source| TuneError::Write { path: dir.display().to_string(), source })?;
        }
        write(&host.conf, &conf)?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_only_raised_and_ranges_only_widened() {
        assert_eq!(target(&[65535], &[4096]), [65535]);
        assert_eq!(target(&[65535], &[100_000]), [100_000]);
        assert_eq!(target(&[10_000, 65535], &[32768, 60999]), [10_000, 65535]);
        assert_eq!(target(&[10_000, 65535], &[500, 65535]), [500, 65535]);
        assert_eq!(target(&[4096, 131_072, 16_777_216], &[4096, 131_072, 6_291_456]), [4096, 131_072, 16_777_216]);
    }
}
