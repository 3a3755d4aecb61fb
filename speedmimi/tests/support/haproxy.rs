//! HAProxy as a second opinion: finds (or, as root, installs) the binary and runs one instance
//! in the foreground on a listener the test bound, so differential tests can send it the same
//! bytes they send SpeedMimi. The instance is killed and its files removed when dropped.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::tls::TempDir;

/// A path HAProxy answers itself (`monitor-uri`), so a probe never reaches the backend.
const READY_PATH: &str = "/.haproxy-ready";

/// How long an instance may take to answer its first probe.
const START_WITHIN: Duration = Duration::from_secs(10);

/// The haproxy binary: on PATH or in /usr/sbin, else installed with apt-get when we are root.
/// Err says why there is none.
pub fn find_or_install() -> Result<PathBuf, String> {
    super::packages::find_or_install("haproxy", "haproxy", || {
        // Where the system lets the package start its own service, it is stopped: our instances
        // are the only ones wanted (a container's policy-rc.d usually keeps it from starting).
        let _ = Command::new("service").args(["haproxy", "stop"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    })
}

/// A running HAProxy; killed when dropped.
pub struct HaProxy {
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl HaProxy {
    /// Starts `bin` with one thread in `mode http`, every timeout at `timeout`, and a frontend
    /// `f` whose `bind` and `monitor-uri` lines are ours and whose other lines are `frontend`;
    /// `rest` (backends) follows. Returns once the instance answers.
    pub fn start(bin: &Path, timeout: Duration, frontend: &str, rest: &str) -> Result<HaProxy, String> {
        // Bound here and inherited, so there is no window in which another test takes the port.
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| format!("bind: {e}"))?;
        let fd = listener.as_raw_fd();
        let t = timeout.as_millis();
        let cfg = format!(
            "global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect {t}ms\n  timeout client {t}ms\n  timeout server {t}ms\n  timeout http-request {t}ms\nfrontend f\n  bind fd@{fd}\n  monitor-uri {READY_PATH}\n{frontend}{rest}"
        );
        let dir = TempDir::new();
        let cfg_path = dir.write("haproxy.cfg", &cfg);
        let log = File::create(dir.0.join("stderr")).map_err(|e| format!("haproxy log file: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-db").arg("-f").arg(&cfg_path).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        // SAFETY: runs in the forked child before exec, where only async-signal-safe calls are
        // allowed; fcntl is one, and the closure allocates nothing. Clearing FD_CLOEXEC there
        // lets the listener survive exec in this child only.
        unsafe {
            cmd.pre_exec(move || match libc::fcntl(fd, libc::F_SETFD, 0) {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            });
        }
        let child = cmd.spawn().map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        // HAProxy holds the listener now; ours would keep the port open if HAProxy died.
        drop(listener);
        let mut haproxy = HaProxy { addr, child, dir };
        haproxy.wait_ready()?;
        Ok(haproxy)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("haproxy exited ({status}): {}", self.stderr()));
            }
            if self.answers_probe() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("haproxy did not answer within {START_WITHIN:?}: {}", self.stderr()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers_probe(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut got = Vec::new();
        s.write_all(format!("GET {READY_PATH} HTTP/1.0\r\n\r\n").as_bytes()).is_ok()
            && s.read_to_end(&mut got).is_ok()
            && got.starts_with(b"HTTP/1.1 200 ")
    }

    /// What the instance wrote to stderr so far (its warnings and alerts).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("stderr")).unwrap_or_default().trim().to_owned()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        // SIGKILL to our own child by its pid; -db keeps HAProxy in this one process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
