//! The access log: one line per request, off by default, to stdout (`-`) or a file. Lines are
//! handed to a writer thread through a bounded queue; when the queue is full a line is dropped
//! and counted rather than slowing the request path down. SIGUSR1 reopens the file (log
//! rotation, as with nginx): the reopen travels the same queue as the lines, so every line
//! before it lands in the old file and every line after it in the new one.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{Receiver, Sender, SyncSender, TrySendError, channel, sync_channel},
    },
};

const QUEUE: usize = 16 * 1024;

/// What the writer thread is given, in order.
enum Entry {
    Line(String),
    /// Flush, open the target again (a rotated file is replaced by a new one), say how it went.
    Reopen(Sender<io::Result<()>>),
}

pub struct AccessLog {
    tx: SyncSender<Entry>,
    /// Lines dropped because the writer fell behind.
    pub dropped: AtomicU64,
}

impl AccessLog {
    /// `""` = off (None), `"-"` = stdout, anything else = a file appended to.
    pub fn open(target: &str) -> io::Result<Option<AccessLog>> {
        let Some(out) = open_target(target)? else { return Ok(None) };
        let (tx, rx) = sync_channel(QUEUE);
        let target = target.to_owned();
        std::thread::Builder::new().name("speedmimi-access-log".into()).spawn(move || write_lines(rx, out, &target))?;
        Ok(Some(AccessLog { tx, dropped: AtomicU64::new(0) }))
    }

    pub fn log(&self, line: String) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Entry::Line(line)) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Reopens the file after the lines queued so far are written to the old one; blocks until
    /// done (waiting for room in the queue if the writer is behind: no line is dropped for it).
    /// On error the old file stays in use.
    pub fn reopen(&self) -> io::Result<()> {
        let (ack, done) = channel();
        self.tx.send(Entry::Reopen(ack)).map_err(|_| io::Error::other("the access log writer stopped"))?;
        done.recv().map_err(|_| io::Error::other("the access log writer stopped"))?
    }
}

/// The writer `target` names (`""` = none); `preflight` opens it the same way startup does.
pub fn open_target(target: &str) -> io::Result<Option<Box<dyn Write + Send>>> {
    Ok(match target {
        "" => None,
        "-" => Some(Box::new(io::stdout())),
        path => Some(Box::new(OpenOptions::new().create(true).append(true).open(path)?)),
    })
}

fn write_lines(rx: Receiver<Entry>, out: Box<dyn Write + Send>, target: &str) {
    let mut out = BufWriter::new(out);
    let mut next = rx.recv().ok();
    while let Some(entry) = next.take() {
        match entry {
            Entry::Line(line) => {
                let _ = writeln!(out, "{line}");
            }
            Entry::Reopen(ack) => {
                let reopened = out.flush().and_then(|()| open_target(target)).map(|new| {
                    if let Some(new) = new {
                        out = BufWriter::new(new);
                    }
                });
                let _ = ack.send(reopened);
            }
        }
        // Flush whenever the queue runs dry, so lines appear promptly without a write per line.
        next = rx.try_recv().ok();
        if next.is_none() {
            let _ = out.flush();
            next = rx.recv().ok();
        }
    }
}

/// UTC time as `2026-11-26T13:45:02.123Z` (no time-zone database needed).
pub fn timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2026-11-26T13:45:02.5Z
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_millis(1_795_700_702_500)), "2026-11-26T13:45:02.500Z");
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn lines_reach_the_file() {
        let path = std::env::temp_dir().join(format!("speedmimi-access-{}.log", std::process::id()));
        let log = AccessLog::open(path.to_str().unwrap()).unwrap().unwrap();
        log.log("first".into());
        log.log("second".into());
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&path);
        assert_eq!(text, "first\nsecond\n");
        assert!(AccessLog::open("").unwrap().is_none());
    }

    /// A rotation: the file is renamed, lines queued before the reopen go to it, lines after to
    /// a new file under the old name.
    #[test]
    fn reopen_after_a_rename_splits_lines_at_the_reopen() {
        let path = std::env::temp_dir().join(format!("speedmimi-access-reopen-{}.log", std::process::id()));
        let rotated = path.with_extension("log.1");
        let log = AccessLog::open(path.to_str().unwrap()).unwrap().unwrap();
        for i in 0..100 {
            log.log(format!("before {i}"));
        }
        std::fs::rename(&path, &rotated).unwrap();
        log.log("still before".into());
        log.reopen().unwrap();
        log.log("after".into());
        drop(log);
        let mut new = String::new();
        for _ in 0..100 {
            new = std::fs::read_to_string(&path).unwrap_or_default();
            if !new.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let old = std::fs::read_to_string(&rotated).unwrap();
        let _ = (std::fs::remove_file(&path), std::fs::remove_file(&rotated));
        assert_eq!(old.lines().count(), 101, "{old}");
        assert!(old.ends_with("before 99\nstill before\n"));
        assert_eq!(new, "after\n");
    }
}
