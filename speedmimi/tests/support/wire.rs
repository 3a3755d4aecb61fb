//! HTTP/1 messages read off a raw socket, for tests that must see the bytes a peer sent rather
//! than what a client library makes of them: heads parsed by httparse with names kept as sent,
//! bodies framed by Content-Length, chunks (extensions and trailers kept) or the close, and
//! whether the peer closed. Every read is bounded.

use std::time::Duration;

use tokio::{io::AsyncReadExt, net::TcpStream, time::timeout};

/// A connection read through a buffer; every read is bounded.
pub struct Wire {
    pub s: TcpStream,
    /// Read and not yet taken.
    buf: Vec<u8>,
    /// Bound of a read when no message is under way.
    idle: Duration,
    /// Bound of a read inside a message.
    within: Duration,
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Framing {
    None,
    Length(usize),
    Chunked,
    Close,
}

/// A message head as read: its first line and its fields in order, names as sent.
#[derive(Clone)]
pub struct Head {
    pub first: String,
    pub fields: Vec<(String, String)>,
}

impl Head {
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.fields.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The framing the fields give (RFC 9112 §6.3): chunked when it is the final coding, else
    /// Content-Length, else `or_else` (none for a request, the close for a response). What the
    /// method or status decides (HEAD, 1xx, 204, 304) is the caller's.
    pub fn framing(&self, or_else: Framing) -> Framing {
        let te = self.values("transfer-encoding").collect::<Vec<_>>().join(",");
        if te.rsplit(',').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked")) {
            return Framing::Chunked;
        }
        match self.values("content-length").next().and_then(|v| v.trim().parse().ok()) {
            Some(n) => Framing::Length(n),
            None => or_else,
        }
    }
}

#[derive(Clone, Default)]
pub struct Body {
    /// As on the wire, chunk lines and trailers included.
    pub raw: Vec<u8>,
    pub decoded: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// Chunk extensions seen, in order.
    pub extensions: Vec<String>,
    pub chunked: bool,
}

impl Wire {
    pub fn new(s: TcpStream, idle: Duration, within: Duration) -> Wire {
        Wire { s, buf: Vec::new(), idle, within }
    }

    /// Reads more into the buffer; false at the end of the stream.
    pub async fn fill(&mut self) -> Result<bool, String> {
        let bound = if self.buf.is_empty() { self.idle } else { self.within };
        let mut chunk = vec![0u8; 64 << 10];
        match timeout(bound, self.s.read(&mut chunk)).await {
            Err(_) => Err(format!("nothing read for {bound:?}")),
            Ok(Err(e)) => Err(format!("read: {e}")),
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
        }
    }

    pub async fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(format!("closed {} bytes short", n - self.buf.len()));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Up to the first `end`, included.
    pub async fn until(&mut self, end: &[u8]) -> Result<Option<Vec<u8>>, String> {
        loop {
            if let Some(i) = self.buf.windows(end.len()).position(|w| w == end) {
                return Ok(Some(self.buf.drain(..i + end.len()).collect()));
            }
            if !self.fill().await? {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(format!("closed inside a line or head: {:?}", preview(&self.buf))),
                };
            }
        }
    }

    pub async fn line(&mut self) -> Result<Vec<u8>, String> {
        self.until(b"\r\n").await?.ok_or_else(|| "closed before a line".to_owned())
    }

    pub async fn body(&mut self, framing: Framing) -> Result<Body, String> {
        let mut b = Body::default();
        match framing {
            Framing::None => {}
            Framing::Length(n) => b.raw = self.exact(n).await?,
            Framing::Close => {
                while self.fill().await? {}
                b.raw = std::mem::take(&mut self.buf);
            }
            Framing::Chunked => return self.chunked().await,
        }
        b.decoded = b.raw.clone();
        Ok(b)
    }

    pub async fn chunked(&mut self) -> Result<Body, String> {
        let mut b = Body { chunked: true, ..Body::default() };
        loop {
            let line = self.line().await?;
            b.raw.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let (size, ext) = text.split_once(';').map_or((text.as_str(), None), |(s, e)| (s, Some(e)));
            if let Some(ext) = ext {
                b.extensions.push(ext.trim().to_owned());
            }
            let size = usize::from_str_radix(size.trim(), 16).map_err(|_| format!("bad chunk size line {text:?}"))?;
            if size == 0 {
                break;
            }
            let data = self.exact(size + 2).await?;
            if !data.ends_with(b"\r\n") {
                return Err("chunk data not followed by CRLF".into());
            }
            b.decoded.extend_from_slice(&data[..size]);
            b.raw.extend_from_slice(&data);
        }
        loop {
            let line = self.line().await?;
            b.raw.extend_from_slice(&line);
            if line == b"\r\n" {
                return Ok(b);
            }
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let (n, v) = text.split_once(':').ok_or_else(|| format!("bad trailer {text:?}"))?;
            b.trailers.push((n.to_owned(), v.trim().to_owned()));
        }
    }

    /// Whether the peer closes within `within` (a reset counts as a close). Bytes instead
    /// are an error: nothing may follow the answers a case waits for.
    pub async fn closes(&mut self, within: Duration) -> Result<bool, String> {
        if !self.buf.is_empty() {
            return Err(format!("{} bytes after the last answer: {:?}", self.buf.len(), preview(&self.buf)));
        }
        let mut one = [0u8; 4096];
        match timeout(within, self.s.read(&mut one)).await {
            Err(_) => Ok(false),
            Ok(Ok(0)) | Ok(Err(_)) => Ok(true),
            Ok(Ok(n)) => Err(format!("{n} bytes after the last answer: {:?}", preview(&one[..n]))),
        }
    }
}

pub const MAX_FIELDS: usize = 512;

fn fields(parsed: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    parsed.iter().map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned())).collect()
}

/// A request head: the head and its method.
pub fn parse_request(raw: &[u8]) -> Result<(Head, String), String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut r = httparse::Request::new(&mut slots);
    match r.parse(raw) {
        Ok(httparse::Status::Complete(_)) => {}
        other => return Err(format!("unparseable request head ({other:?}): {:?}", preview(raw))),
    }
    let method = r.method.unwrap_or_default().to_owned();
    let first = format!("{method} {} HTTP/1.{}", r.path.unwrap_or_default(), r.version.unwrap_or_default());
    Ok((Head { first, fields: fields(r.headers) }, method))
}

/// A response head and its status.
pub fn parse_response(raw: &[u8]) -> Result<(Head, u16), String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut r = httparse::Response::new(&mut slots);
    match r.parse(raw) {
        Ok(httparse::Status::Complete(_)) => {}
        other => return Err(format!("unparseable response head ({other:?}): {:?}", preview(raw))),
    }
    let code = r.code.unwrap_or_default();
    let first = format!("HTTP/1.{} {code} {}", r.version.unwrap_or_default(), r.reason.unwrap_or_default());
    Ok((Head { first, fields: fields(r.headers) }, code))
}

/// Up to 48 bytes, escaped: for lines and messages.
pub fn preview(b: &[u8]) -> String {
    let shown: String = b.iter().take(48).flat_map(|c| c.escape_ascii()).map(char::from).collect();
    if b.len() > 48 { format!("{shown}…") } else { shown }
}
