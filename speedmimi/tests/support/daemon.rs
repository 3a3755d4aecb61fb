//! The `speedmimi` binary as a child process, for tests of what only the real process does
//! (signals, startup, its datapath choice).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// The `speedmimi` binary running on a config file; killed (and its log shown on failure) when
/// dropped.
pub struct Daemon {
    pub child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(config: &Path, log: PathBuf) -> Daemon {
        Daemon::spawn_with(Command::new(env!("CARGO_BIN_EXE_speedmimi")), config, log)
    }

    /// Like `spawn`, from a prepared command (extra environment, a pre_exec hook).
    pub fn spawn_with(mut command: Command, config: &Path, log: PathBuf) -> Daemon {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = command
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("SPEEDMIMI_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start speedmimi");
        Daemon { child, log }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for the process to end.
    pub async fn exit(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + bound;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- speedmimi log ---\n{}", self.log());
        }
    }
}

/// Two distinct ports free a moment ago.
pub fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}
