//! A raw-TCP origin that records each request as it read it and answers by a script the
//! request's target names (`/a/<script>` or `/b/<script>`, the letter telling whose request it
//! is): the backend of the tests that compare two ways through the proxy (`fast_path`,
//! `h2_bridge`).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{io::AsyncWriteExt, net::TcpListener};

use super::wire::{Body, Framing, Head, Wire, parse_request};

/// Bound of every read and write inside a request.
pub const IO: Duration = Duration::from_secs(5);
/// How long a backend connection may wait for its next request (a pooled one waits long).
const BACKEND_IDLE: Duration = Duration::from_secs(60);
/// Stands in a request target for the proxy's tag (`/a/` or `/b/`), so the one backend can
/// tell whose request it is reading.
pub const TAG: &[u8] = b"/~/";

/// One request as the backend read it.
#[derive(Clone)]
pub struct Seen {
    /// b'a', b'b', or b'?' when the target carries no tag.
    pub tag: u8,
    pub head: Head,
    pub body: Body,
    /// Why the request could not be read whole, if it could not.
    pub broken: Option<String>,
}

/// A raw-TCP origin that records each request and answers by the script its target names.
pub struct Recorder {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests whose head has been read and whose record is not written yet.
    busy: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let busy = Arc::new(AtomicUsize::new(0));
        let (log, count) = (seen.clone(), busy.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(Wire::new(s, BACKEND_IDLE, IO), log.clone(), count.clone()));
            }
        });
        Recorder { addr, seen, busy, task }
    }

    /// Once no request is being read (bounded), takes the records of `tag`.
    /// The requests recorded with `tag` (once none is being read), taken out of the record.
    pub async fn take(&self, tag: u8) -> Vec<Seen> {
        for _ in 0..300 {
            if self.busy.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut all = self.seen.lock().unwrap();
        let (mine, rest) = all.drain(..).partition(|s| s.tag == tag);
        *all = rest;
        mine
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut w: Wire, log: Arc<Mutex<Vec<Seen>>>, busy: Arc<AtomicUsize>) {
    loop {
        let raw = match w.until(b"\r\n\r\n").await {
            Ok(Some(raw)) => raw,
            Ok(None) => return,
            Err(e) => {
                let head = Head { first: String::new(), fields: Vec::new() };
                let broken = Some(format!("head: {e}"));
                log.lock().unwrap().push(Seen { tag: b'?', head, body: Body::default(), broken });
                return;
            }
        };
        busy.fetch_add(1, Ordering::SeqCst);
        let keep = answer(&mut w, &raw, &log).await;
        busy.fetch_sub(1, Ordering::SeqCst);
        if !keep {
            let _ = w.s.shutdown().await;
            return;
        }
    }
}

/// Reads the body of the request whose head is `raw`, records it, and answers; false when the
/// connection is to close.
async fn answer(w: &mut Wire, raw: &[u8], log: &Mutex<Vec<Seen>>) -> bool {
    let (mut head, method) = match parse_request(raw) {
        Ok(x) => x,
        Err(e) => {
            let head = Head { first: String::from_utf8_lossy(raw).into_owned(), fields: Vec::new() };
            log.lock().unwrap().push(Seen { tag: b'?', head, body: Body::default(), broken: Some(e) });
            return false;
        }
    };
    let (tag, script) = untag(&mut head.first);
    // A failed write here shows as a body that cannot be read.
    let early = script == "early";
    let _ = match script.as_str() {
        "continue" => w.s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await,
        "early" => w.s.write_all(&reply(&script, &method, &[]).0).await,
        _ => Ok(()),
    };
    let (body, broken) = match w.body(head.framing(Framing::None)).await {
        Ok(b) => (b, None),
        Err(e) => (Body::default(), Some(e)),
    };
    let ok = broken.is_none();
    let (bytes, close) = reply(&script, &method, &body.decoded);
    log.lock().unwrap().push(Seen { tag, head, body, broken });
    if early {
        return ok;
    }
    ok && w.s.write_all(&bytes).await.is_ok() && !close
}

/// Finds the tag in a request line's target (origin or absolute form) and puts `TAG` back in
/// its place; returns the tag and the script named after it (`/a/<script>...`).
fn untag(first: &mut String) -> (u8, String) {
    let target = first.split(' ').nth(1).unwrap_or_default();
    let path_at = match target.find("://") {
        Some(i) => target[i + 3..].find('/').map_or(target.len(), |j| i + 3 + j),
        None => 0,
    };
    let path = &target[path_at..];
    let tag = match path.as_bytes() {
        [b'/', t @ (b'a' | b'b'), b'/', ..] => *t,
        _ => return (b'?', String::new()),
    };
    let script = path[3..].split(['/', '?']).next().unwrap_or_default().to_owned();
    let at = first.find(' ').unwrap_or(0) + 1 + path_at;
    first.replace_range(at..at + 3, std::str::from_utf8(TAG).unwrap());
    (tag, script)
}

/// The answer a script gives to `method` with request body `body`, and whether the backend
/// closes after it. A HEAD gets the head alone.
pub fn reply(script: &str, method: &str, body: &[u8]) -> (Vec<u8>, bool) {
    let ok = "HTTP/1.1 200 OK\r\n";
    let (head, payload, close): (String, Vec<u8>, bool) = match script {
        "204" => ("HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n".into(), vec![], false),
        "304" => {
            ("HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nCache-Control: max-age=60\r\n\r\n".into(), vec![], false)
        }
        "sized" => (format!("{ok}Content-Type: text/plain\r\nContent-Length: 1234\r\n\r\n"), letters(1234, 3), false),
        "chunked" => (
            format!("{ok}Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"),
            b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Checksum: abc123\r\nX-Other: 1\r\n\r\n".to_vec(),
            false,
        ),
        "unsized" => (format!("{ok}Content-Type: text/plain\r\n\r\n"), b"no length: read to the close".to_vec(), true),
        "http10" => ("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n".into(), b"old".to_vec(), true),
        "big" => (format!("{ok}Content-Length: {}\r\n\r\n", 1 << 20), letters(1 << 20, 5), false),
        "reason" => ("HTTP/1.1 418 Short And Stout\r\nContent-Length: 6\r\n\r\n".into(), b"teapot".to_vec(), false),
        "close" => (format!("{ok}Connection: close\r\nContent-Length: 3\r\n\r\n"), b"bye".to_vec(), true),
        "early" => (format!("{ok}Content-Length: 5\r\n\r\n"), b"early".to_vec(), false),
        // Promises 100 bytes, sends 10 and closes.
        "truncated" => (format!("{ok}Content-Length: 100\r\n\r\n"), letters(10, 9), true),
        "hop" => (
            format!(
                "{ok}Connection: keep-alive, X-Internal\r\nKeep-Alive: timeout=5\r\nX-Internal: secret\r\n\
                 Proxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\nTrailer: X-T\r\nUpgrade: h2c\r\n\
                 X-Kept: yes\r\nContent-Length: 2\r\n\r\n"
            ),
            b"ok".to_vec(),
            false,
        ),
        "many90" | "many120" => {
            let n = if script == "many90" { 90 } else { 120 };
            let many: String = (0..n).map(|i| format!("X-H-{i}: value-{i}\r\n")).collect();
            let dup = "Set-Cookie: a=1\r\nVary: Accept\r\nSet-Cookie: b=2\r\nVary: Origin\r\nSet-Cookie: c=3\r\n";
            (format!("{ok}{many}{dup}Content-Length: 2\r\n\r\n"), b"ok".to_vec(), false)
        }
        // `echo` and anything else: the request body back.
        _ => {
            let payload = [b"echo:".as_slice(), body].concat();
            let head = format!("{ok}Content-Type: application/octet-stream\r\nX-Method: {method}\r\n");
            (format!("{head}Content-Length: {}\r\n\r\n", payload.len()), payload, false)
        }
    };
    let mut out = head.into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(&payload);
    }
    (out, close)
}

/// `n` bytes of lowercase letters from `seed`: never a tag, easy to read in a failure.
pub fn letters(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + ((i * 7 + seed) % 26) as u8).collect()
}

/// Two renderings of one case in columns, `left` and hyper's, lines that differ marked.
pub fn side_by_side(name: &str, left: &str, a: &[String], b: &[String]) -> String {
    const W: usize = 70;
    let mut s = format!("\n=== {name}: {left} (left) | hyper (right); '!' marks a differing line\n");
    for i in 0..a.len().max(b.len()) {
        let (l, r) = (a.get(i).map_or("", String::as_str), b.get(i).map_or("", String::as_str));
        let cut: String = l.chars().take(W).collect();
        s += &format!("{} {cut:<W$} | {r}\n", if l == r { ' ' } else { '!' });
    }
    s
}
