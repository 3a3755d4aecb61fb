//! The own engine's exchange with a backend: the request on a pooled raw connection, the
//! response head rewritten for the client, and the body relayed by its framing.

use std::{io::IoSlice, mem::MaybeUninit, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    MAX_HEADERS, MAX_LISTED, MAX_RESPONSE_HEAD, RELAY_CHUNK, chunked,
    request::{is_hop_by_hop, put_header},
};
use crate::{
    backend::Backend,
    proxy::{
        body::{InFlight, ResponseBody},
        error,
        forward::{Answered, Exchange, Failure},
        io::ClientIo,
    },
    state::{Route, Settings},
    upstream::RawConn,
};

/// What the client gets: the proxy's own answer, or a backend's response to relay.
pub(super) enum Reply {
    Local(Response<ResponseBody>),
    Relay(Relay),
}

impl From<Response<ResponseBody>> for Reply {
    fn from(r: Response<ResponseBody>) -> Self {
        Reply::Local(r)
    }
}

/// How a backend's response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes; relayed chunked to the client.
    Close,
}

/// A backend's response whose head is in `Buffers::out` (rewritten for the client) and whose
/// first body bytes are in `Buffers::upstream` from `body_at`.
pub(super) struct Relay {
    conn: RawConn,
    pub(super) guard: InFlight,
    pub(super) status: u16,
    framing: Framing,
    body_at: usize,
    /// The connection may carry another request once the body is through.
    reusable: bool,
}

/// A request the proxy's own engine sends: its head (in `out`) and body, to a raw connection.
pub(super) struct Plain<'a> {
    pub(super) route: &'a Route,
    pub(super) settings: &'a Settings,
    pub(super) out: &'a mut Vec<u8>,
    pub(super) upstream: &'a mut Vec<u8>,
    pub(super) body: &'a [u8],
    pub(super) head_method: bool,
    pub(super) idempotent: bool,
    pub(super) close: bool,
}

/// A backend's response head, parsed.
pub(super) struct Answer {
    pub(super) conn: RawConn,
    pub(super) head_len: usize,
    status: u16,
}

/// Why a send went wrong after the connection was made.
enum Broken {
    /// The connection was closed or reset before any byte of an answer (on a reused one: it
    /// was closed while idle, and the backend read nothing).
    Stale(Option<std::io::Error>),
    Failed(&'static str, Option<std::io::Error>),
    TimedOut,
}

impl Exchange for Plain<'_> {
    type Request = ();
    type Answer = Answer;
    type Pass = std::convert::Infallible;
    type Reply = Reply;
    const NO_BACKEND: &'static str = "no eligible backend";
    const CONNECT_FAILED: &'static str = "connect failed";
    const TIMED_OUT: &'static str = "upstream timed out";

    async fn send(&mut self, backend: &Arc<Backend>, (): (), _: &mut InFlight) -> Result<Answer, Failure<()>> {
        loop {
            let limit = backend.max_conn.load(std::sync::atomic::Ordering::Relaxed);
            let conn = match backend.pool.raw(self.settings.connect_timeout, limit).await {
                Ok(c) => c,
                Err(e) => return Err(Failure::unsent(e, ())),
            };
            let reused = conn.reused;
            match self.try_send(conn).await {
                Ok(answer) => return Ok(answer),
                // Closed by the backend between the check and the request: an idempotent request
                // is sent again on another connection.
                Err(Broken::Stale(_)) if reused && self.idempotent => continue,
                Err(Broken::Stale(e)) => {
                    let why = e.map_or_else(|| "closed".to_owned(), |e| e.to_string());
                    return Err(Failure::Reset(why));
                }
                Err(Broken::TimedOut) => return Err(Failure::Timeout(self.settings.upstream_timeout)),
                Err(Broken::Failed(what, e)) => {
                    tracing::warn!(route = %self.route.name, backend = %backend.id, error = ?e, "{what}");
                    return Err(Failure::Local(error::bad_gateway()));
                }
            }
        }
    }

    fn status(&self, answer: &Answer) -> u16 {
        answer.status
    }

    fn replay(&mut self) -> Option<()> {
        // The head and body are still in their buffers.
        self.idempotent.then_some(())
    }

    fn answer(self, answer: Answer, backend: &Arc<Backend>, guard: InFlight, started: Instant) -> Answered<Reply> {
        backend.connect_succeeded();
        backend.observe_latency(started.elapsed());
        match response_head(&self.upstream[..answer.head_len], self.head_method, self.close, self.out) {
            Ok((status, framing, reusable)) => {
                let relay = Relay { conn: answer.conn, guard, status, framing, body_at: answer.head_len, reusable };
                Answered { response: Reply::Relay(relay), status }
            }
            Err(why) => {
                tracing::warn!(route = %self.route.name, backend = %backend.id, "{why}");
                let resp = error::bad_gateway();
                Answered { status: resp.status().as_u16(), response: Reply::Local(resp) }
            }
        }
    }
}

impl Plain<'_> {
    /// Writes the request and reads the response head (skipping 1xx ones) into `upstream`.
    async fn try_send(&mut self, mut conn: RawConn) -> Result<Answer, Broken> {
        match write_pair(&mut conn.stream, self.out, self.body).await {
            Ok(()) => {}
            // Closed (while idle, when reused) before it took the whole request.
            Err(e) => return Err(Broken::Stale(Some(e))),
        }
        let limit = self.settings.upstream_timeout;
        let up = &mut *self.upstream;
        up.clear();
        let read = async {
            loop {
                match response_head_end(up)? {
                    // Informational: skipped, as hyper's client does.
                    Some((n, code)) if (100..200).contains(&code) && code != 101 => {
                        up.drain(..n);
                        continue;
                    }
                    Some(whole) => return Ok(whole),
                    None => {}
                }
                up.reserve(8192);
                match conn.stream.read_buf(up).await {
                    Ok(0) if up.is_empty() => return Err(Broken::Stale(None)),
                    Err(e) if up.is_empty() => return Err(Broken::Stale(Some(e))),
                    Ok(0) => return Err(Broken::Failed("upstream closed before a whole response head", None)),
                    Err(e) => return Err(Broken::Failed("upstream response failed", Some(e))),
                    Ok(_) => {}
                }
            }
        };
        match tokio::time::timeout(limit, read).await {
            Err(_) => Err(Broken::TimedOut),
            Ok(Err(e)) => Err(e),
            Ok(Ok((head_len, status))) => Ok(Answer { conn, head_len, status }),
        }
    }
}

/// Where the response head at the start of `up` ends, and its status; None while it is not
/// whole. (Not in the async caller: the header slots would live in its future.)
fn response_head_end(up: &[u8]) -> Result<Option<(usize, u16)>, Broken> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, up, &mut slots) {
        Ok(httparse::Status::Complete(n)) => Ok(Some((n, resp.code.unwrap_or_default()))),
        Ok(httparse::Status::Partial) if up.len() < MAX_RESPONSE_HEAD => Ok(None),
        Ok(httparse::Status::Partial) => Err(Broken::Failed("upstream response head too long", None)),
        Err(_) => Err(Broken::Failed("invalid upstream response head", None)),
    }
}

/// Writes `a` then `b`, both in one system call when the socket takes them.
async fn write_pair<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let total = a.len() + b.len();
    let mut done = 0;
    while done < total {
        let n = if done < a.len() {
            w.write_vectored(&[IoSlice::new(&a[done..]), IoSlice::new(b)]).await?
        } else {
            w.write(&b[done - a.len()..]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

/// What a backend's response head says about its message: the status, how its body is
/// delimited, whether the connection may carry another request, and the names its
/// `Connection` lists (to be dropped with the hop-by-hop fields).
pub(super) struct Scanned<'h> {
    pub(super) status: u16,
    pub(super) framing: Framing,
    pub(super) reusable: bool,
    listed: [&'h [u8]; MAX_LISTED],
    n_listed: usize,
}

impl Scanned<'_> {
    /// A field that does not go on to the client: hop-by-hop, or listed in `Connection`.
    pub(super) fn drops(&self, name: &str) -> bool {
        is_hop_by_hop(name) || self.listed[..self.n_listed].iter().any(|l| name.as_bytes().eq_ignore_ascii_case(l))
    }
}

/// Reads a parsed response head's framing and connection fields (RFC 9112 §6.3, §9.6); Err
/// when the head is one to answer 502 for.
fn scan<'h>(resp: &httparse::Response<'_, 'h>, head_method: bool) -> Result<Scanned<'h>, &'static str> {
    let status = resp.code.ok_or("invalid upstream response head")?;
    if status == 101 {
        return Err("upstream switched protocols unasked");
    }
    let mut length: Option<u64> = None;
    let mut te = false;
    let mut chunked = false;
    let mut reusable = resp.version == Some(1);
    let mut listed: [&[u8]; MAX_LISTED] = [&[]; MAX_LISTED];
    let mut n_listed = 0;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
            match (v, length) {
                (None, _) => return Err("invalid Content-Length from upstream"),
                (Some(a), Some(b)) if a != b => return Err("differing Content-Length values from upstream"),
                (Some(a), _) => length = Some(a),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            let last = h.value.rsplit(|&c| c == b',').next().unwrap_or_default().trim_ascii();
            chunked = last.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&c| c == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"upgrade") {
                } else if n_listed < MAX_LISTED {
                    listed[n_listed] = token;
                    n_listed += 1;
                } else {
                    return Err("too many names in the upstream's Connection");
                }
            }
        }
    }
    if te && length.is_some() {
        return Err("upstream reply has both Content-Length and Transfer-Encoding");
    }
    let bodiless = head_method || status == 204 || status == 304 || (100..200).contains(&status);
    let framing = match (bodiless, te, chunked, length) {
        (true, ..) => Framing::Empty,
        (false, true, true, _) => Framing::Chunked,
        (false, true, false, _) => Framing::Close,
        (false, false, _, Some(n)) => Framing::Length(n),
        (false, false, _, None) => Framing::Close,
    };
    if framing == Framing::Close {
        reusable = false;
    }
    Ok(Scanned { status, framing, reusable, listed, n_listed })
}

/// Parses the whole response head `head`, scans it (`scan`), and gives both to `read`; Err when
/// the head is one to answer 502 for.
pub(super) fn read_head<'h, R>(
    head: &'h [u8],
    head_method: bool,
    read: impl FnOnce(&httparse::Response<'_, 'h>, Scanned<'h>) -> Result<R, &'static str>,
) -> Result<R, &'static str> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, head, &mut slots);
    if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
        return Err("invalid upstream response head");
    }
    let scanned = scan(&resp, head_method)?;
    read(&resp, scanned)
}

/// Rewrites a backend's response head for the client into `out`, as the hyper path would
/// send it: hop-by-hop fields and those its `Connection` lists removed, the body's framing as
/// the relay will send it, a `Date` when it has none, `Connection: close` when the client
/// asked for it. Returns the status, the body's framing and whether the backend connection may
/// be reused; Err when the head is one to answer 502 for.
pub(crate) fn response_head(
    head: &[u8],
    head_method: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<(u16, Framing, bool), &'static str> {
    read_head(head, head_method, |resp, scanned| Ok(write_head(resp, &scanned, close, out)))
}

/// `response_head`'s writing, of a head read and scanned.
fn write_head(
    resp: &httparse::Response<'_, '_>,
    scanned: &Scanned<'_>,
    close: bool,
    out: &mut Vec<u8>,
) -> (u16, Framing, bool) {
    let Scanned { status, framing, reusable, .. } = *scanned;
    let no_length = status == 204 || status == 304 || (100..200).contains(&status);

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    let canonical = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    match resp.reason {
        Some(r) if !r.is_empty() => out.extend_from_slice(r.as_bytes()),
        _ => out.extend_from_slice(canonical.as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    for h in resp.headers.iter() {
        let name = h.name;
        let length = name.eq_ignore_ascii_case("content-length");
        // A length `Connection` lists still frames the body (hyper writes it again).
        if (no_length && length) || (!length && scanned.drops(name)) {
            continue;
        }
        has_date |= name.eq_ignore_ascii_case("date");
        put_header(out, name.as_bytes(), h.value);
    }
    if matches!(framing, Framing::Chunked | Framing::Close) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::put(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (status, framing, reusable)
}

/// A status code's three digits.
fn itoa3(status: u16) -> [u8; 3] {
    [b'0' + (status / 100 % 10) as u8, b'0' + (status / 10 % 10) as u8, b'0' + (status % 10) as u8]
}

impl Relay {
    /// The body length the client is told, for the access log.
    pub(super) fn sent_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Empty => Some(0),
            _ => None,
        }
    }

    /// Writes the head in `out` and relays the body; the backend connection goes back to the
    /// pool when its response ended exactly. False when the exchange broke (the client
    /// connection then closes: its response cannot be completed).
    pub(super) async fn run<T>(self, io: &mut ClientIo<T>, out: &mut Vec<u8>, up: &mut Vec<u8>) -> bool
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let Relay { mut conn, guard, framing, body_at, mut reusable, .. } = self;
        let mut sent = 0u64;
        let ok = match framing {
            Framing::Empty => {
                reusable &= up.len() == body_at;
                io.write_all(out).await.is_ok()
            }
            Framing::Length(n) => {
                let ahead = (up.len() - body_at) as u64;
                let first = ahead.min(n) as usize;
                reusable &= ahead <= n;
                let head_ok = write_pair(io, out, &up[body_at..body_at + first]).await.is_ok();
                sent += first as u64;
                let mut ok = head_ok;
                while ok && sent < n {
                    up.clear();
                    up.reserve(RELAY_CHUNK);
                    let want = ((n - sent) as usize).min(RELAY_CHUNK);
                    match (&mut conn.stream).take(want as u64).read_buf(up).await {
                        Ok(0) | Err(_) => ok = false,
                        Ok(k) => {
                            ok = io.write_all(&up[..k]).await.is_ok();
                            sent += k as u64;
                        }
                    }
                }
                ok
            }
            Framing::Chunked => {
                let mut decoder = chunked::Decoder::default();
                let ok = relay_chunks(io, &mut conn, out, up, body_at, Some(&mut decoder), &mut sent).await;
                reusable &= decoder.done_exactly();
                ok
            }
            Framing::Close => {
                reusable = false;
                relay_chunks(io, &mut conn, out, up, body_at, None, &mut sent).await
            }
        };
        let ok = ok && io.flush().await.is_ok();
        guard.count_sent(sent);
        if ok && reusable {
            guard.backend().pool.put_raw(conn);
        }
        drop(guard);
        ok
    }
}

/// Relays a chunked (`decoder`) or close-delimited (None) body, chunked to the client: the
/// head in `out` goes first, with the body bytes already read.
async fn relay_chunks<T>(
    io: &mut ClientIo<T>,
    conn: &mut RawConn,
    out: &mut Vec<u8>,
    up: &mut Vec<u8>,
    body_at: usize,
    mut decoder: Option<&mut chunked::Decoder>,
    sent: &mut u64,
) -> bool
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut start = body_at;
    loop {
        let mut piece = |data: &[u8]| {
            put_chunk(out, data);
            *sent += data.len() as u64;
        };
        let finished = match decoder.as_deref_mut() {
            Some(d) => match d.feed(&up[start..], &mut piece) {
                Ok(done) => done,
                Err(()) => return false,
            },
            None => {
                piece(&up[start..]);
                false
            }
        };
        if finished {
            out.extend_from_slice(b"0\r\n\r\n");
            return io.write_all(out).await.is_ok();
        }
        if !out.is_empty() && io.write_all(out).await.is_err() {
            return false;
        }
        out.clear();
        up.clear();
        up.reserve(RELAY_CHUNK);
        start = 0;
        match conn.stream.read_buf(up).await {
            Ok(0) if decoder.is_none() => {
                out.extend_from_slice(b"0\r\n\r\n");
                return io.write_all(out).await.is_ok();
            }
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    if !data.is_empty() {
        let _ = write!(out, "{:x}\r\n", data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes the proxy's own answer (hyper's way: `content-length`, `date`, and `connection:
/// close` when the client asked for it).
pub(super) async fn write_local<T>(
    io: &mut ClientIo<T>,
    out: &mut Vec<u8>,
    resp: Response<ResponseBody>,
    close: bool,
) -> std::io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    use std::io::Write as _;
    let (parts, body) = resp.into_parts();
    let body = match body {
        ResponseBody::Local(b) => b.unwrap_or_default(),
        ResponseBody::Upstream { .. } | ResponseBody::Raw(_) => Bytes::new(),
    };
    out.clear();
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", parts.status.as_str(), parts.status.canonical_reason().unwrap_or(""));
    let mut has_close = false;
    for (name, value) in &parts.headers {
        has_close |= name == header::CONNECTION && value == "close";
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if close && !has_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(out, "content-length: {}\r\ndate: ", body.len());
    date::put(out);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&body);
    io.write_all(out).await?;
    io.flush().await
}

/// The `Date` header's value, formatted once a second per thread.
mod date {
    use std::{cell::RefCell, time::SystemTime};

    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub fn put(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(c.1.as_bytes());
        });
    }
}
