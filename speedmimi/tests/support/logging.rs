//! A raw-TCP origin that records every request it receives (head and body bytes, framed by
//! Content-Length or chunked) and answers each with scripted bytes: "what the backend saw" in
//! the adversarial tests, so they can count requests and check which bytes got through.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// One request as the origin received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The head as sent, up to and including the blank line.
    pub head: String,
    pub body: Vec<u8>,
}

impl Seen {
    /// The value of a header (first occurrence, name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// How many times a header occurs.
    pub fn count(&self, name: &str) -> usize {
        self.head
            .lines()
            .skip(1)
            .filter(|l| l.split_once(':').is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name)))
            .count()
    }

    /// The request line.
    pub fn line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }
}

/// What the origin answers to each request.
#[derive(Clone)]
pub struct Reply {
    pub bytes: Vec<u8>,
    /// Close the connection after answering.
    pub close: bool,
}

impl Reply {
    /// `200 ok`, keep-alive.
    pub fn ok() -> Reply {
        Reply { bytes: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), close: false }
    }

    /// These bytes, then close.
    pub fn raw_then_close(bytes: &[u8]) -> Reply {
        Reply { bytes: bytes.to_vec(), close: true }
    }
}

/// The running origin; stops when dropped.
pub struct LoggingBackend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LoggingBackend {
    pub async fn start(reply: Reply) -> LoggingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, log.clone(), reply.clone()));
            }
        });
        LoggingBackend { addr, seen, task }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for LoggingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(s: TcpStream, log: Arc<Mutex<Vec<Seen>>>, reply: Reply) {
    let mut s = BufReader::new(s);
    loop {
        let Some(seen) = read_request(&mut s).await else { return };
        log.lock().unwrap().push(seen);
        if s.get_mut().write_all(&reply.bytes).await.is_err() {
            return;
        }
        if reply.close {
            let _ = s.get_mut().shutdown().await;
            // Let the peer read the reply before the socket goes.
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0u8; 1])).await;
            return;
        }
    }
}

/// One request, or None when the connection ends first (a partial one is still recorded: a
/// backend that got half a request saw something).
async fn read_request(s: &mut BufReader<TcpStream>) -> Option<Seen> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        if s.read_until(b'\n', &mut head).await.ok()? == 0 {
            return None;
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut seen = Seen { head, body: Vec::new() };
    if seen.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        read_chunked(s, &mut seen.body).await;
    } else if let Some(n) = seen.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        seen.body.resize(n, 0);
        if s.read_exact(&mut seen.body).await.is_err() {
            seen.body.clear();
        }
    }
    Some(seen)
}

async fn read_chunked(s: &mut BufReader<TcpStream>, body: &mut Vec<u8>) {
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let size = line.trim().split(';').next().and_then(|h| usize::from_str_radix(h.trim(), 16).ok());
        let Some(size) = size else { return };
        if size == 0 {
            // Trailers up to the blank line.
            loop {
                line.clear();
                if s.read_line(&mut line).await.unwrap_or(0) == 0 || line.trim().is_empty() {
                    return;
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        if s.read_exact(&mut body[start..]).await.is_err() {
            return;
        }
        line.clear();
        let _ = s.read_line(&mut line).await;
    }
}
