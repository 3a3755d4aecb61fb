//! The proxy's own HTTP/1.1 engine, for the exchanges almost every client makes: a request of
//! a standard method in origin form with at most a small body of known length, to a plain
//! backend. It reads the head with httparse, writes the edited head and the body to a pooled
//! backend connection the request's own task owns (no connection task, no channel), parses the
//! response head and relays the body by its framing, with one buffer per connection and no
//! allocation per request.
//!
//! Anything else (an upgrade, `Expect`, chunked or large request bodies, SSE and gRPC, HTTP/1.0,
//! an absolute-form target, a head httparse or our checks do not accept as plainly valid)
//! hands the connection to hyper from that request on, with the bytes read so far: hyper
//! answers it exactly as it does when this engine is off, including every refusal (400, 413,
//! 431, 501). So this engine never refuses a request itself; it only serves those it is sure of.

use std::{
    io::IoSlice,
    mem::MaybeUninit,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    body::{InFlight, ResponseBody},
    error,
    forward::{Answered, Exchange, Failure, forward},
    headers,
    io::ClientIo,
    service::{Handler, RequestLine},
};
use crate::{
    backend::{Backend, client_hash},
    shutdown::Shutdown,
    state::{Protocol, Route, Settings, Snapshot},
    upstream::RawConn,
};

/// Request heads with more fields go to hyper (whose own limit, and 431, is the same).
const MAX_HEADERS: usize = 100;
/// Request bodies up to this are read whole before a backend is picked (so the backend never
/// waits on a slow client); longer ones go to hyper, which streams them.
const MAX_BODY: u64 = 64 * 1024;
/// A backend's response head longer than this is a bad gateway.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Bytes read from a backend at a time while relaying a body.
const RELAY_CHUNK: usize = 32 * 1024;
/// Names a request's `Connection` may list for removal before it goes to hyper instead.
const MAX_LISTED: usize = 8;

/// How a connection left this engine.
pub(super) enum Served<T> {
    /// Closed (the client left, asked to close, timed out, or the server stopped).
    Closed,
    /// hyper serves the rest; the unread request bytes are back in the connection.
    Hyper(ClientIo<T>),
}

/// What a connection keeps between requests: its buffers, grown to what its exchanges need.
#[derive(Default)]
struct Buffers {
    /// Bytes read from the client; `pos` is where the next request head starts.
    input: Vec<u8>,
    pos: usize,
    /// The head going out (the request's to the backend, then the response's to the client),
    /// and re-chunked body bytes.
    out: Vec<u8>,
    /// Bytes read from the backend.
    upstream: Vec<u8>,
}

/// The connection's stop signal, polled from several places, fired once.
struct Stop<'s, F> {
    wait: Pin<&'s mut F>,
    fired: bool,
}

impl<F: Future<Output = ()>> Stop<'_, F> {
    async fn fired(&mut self) {
        if !self.fired {
            self.wait.as_mut().await;
            self.fired = true;
        }
    }
}

/// Serves plain HTTP/1.1 requests on `io` until the client leaves or a request needs hyper.
pub(super) async fn serve<T>(
    mut io: ClientIo<T>,
    handler: &Handler,
    max_head: usize,
    shutdown: &Shutdown,
    drain: Duration,
) -> Served<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let wait = shutdown.wait();
    tokio::pin!(wait);
    let mut stop = Stop { wait, fired: false };
    let mut b = Buffers { input: Vec::with_capacity(4096), ..Default::default() };
    loop {
        // The next head, whole; the connection's deadline for it is `io`'s (408 or close).
        // Each byte is looked at once however the head trickles in.
        let mut scanned = 0;
        while !head_complete(&b.input[b.pos..], &mut scanned) {
            if b.input.len() - b.pos >= max_head {
                return hand_over(io, handler, &b);
            }
            compact(&mut b);
            b.input.reserve(4096);
            let idle = b.pos == b.input.len();
            let n = tokio::select! {
                r = io.read_buf(&mut b.input) => r,
                _ = stop.fired(), if idle => return Served::Closed,
            };
            match n {
                Ok(0) | Err(_) => return Served::Closed,
                Ok(_) => {}
            }
        }
        let open = handler.activity.open();
        let step = tokio::select! {
            s = exchange(&mut io, handler, &mut b) => s,
            _ = async { stop.fired().await; tokio::time::sleep(drain).await } => Step::Close,
        };
        drop(open);
        match step {
            Step::Next if !stop.fired => {}
            Step::Next | Step::Close => {
                let _ = io.shutdown().await;
                return Served::Closed;
            }
            Step::Hyper => return hand_over(io, handler, &b),
        }
    }
}

/// Whether `buf` starts with a whole head: its first empty line (CRLF or bare LF, as httparse
/// reads them) has arrived. Blank lines before a request line are skipped, as httparse skips
/// them. `scanned`: how much of `buf` an earlier call found no end in (updated).
fn head_complete(buf: &[u8], scanned: &mut usize) -> bool {
    let start = buf.iter().position(|&c| c != b'\r' && c != b'\n').unwrap_or(buf.len());
    // An end may straddle what was scanned and what came since: look back two bytes.
    let from = (*scanned).saturating_sub(2).max(start);
    let found = buf[from..]
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && buf.get(from + i + 2) == Some(&b'\n')));
    *scanned = buf.len();
    found
}

/// Drops the bytes of requests already served.
fn compact(b: &mut Buffers) {
    if b.pos == b.input.len() {
        b.input.clear();
    } else if b.pos > 0 {
        b.input.copy_within(b.pos.., 0);
        b.input.truncate(b.input.len() - b.pos);
    }
    b.pos = 0;
}

fn hand_over<T>(mut io: ClientIo<T>, handler: &Handler, b: &Buffers) -> Served<T> {
    handler.state.stats.http1_handovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    io.unread(Bytes::copy_from_slice(&b.input[b.pos..]));
    Served::Hyper(io)
}

/// How one exchange ended for the connection.
enum Step {
    /// Ready for the next request.
    Next,
    /// The connection closes (asked for, or the exchange broke mid-way).
    Close,
    /// The request at `pos` goes to hyper, with the rest of the connection.
    Hyper,
}

/// What the request needs after its head was read and its upstream head written to `out`.
struct Prepared<'s> {
    head_len: usize,
    body_len: usize,
    route: &'s Route,
    hash: u64,
    /// The client asked to close after this exchange.
    close: bool,
    head_method: bool,
    /// Safe to send again if a reused backend connection turns out closed.
    idempotent: bool,
    line: Option<RequestLine>,
}

/// Serves the request whose head is at `b.pos`.
async fn exchange<T>(io: &mut ClientIo<T>, handler: &Handler, b: &mut Buffers) -> Step
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let state = &handler.state;
    let snap = state.snapshot();
    let Some(p) = prepare(handler, &snap, b) else { return Step::Hyper };
    let settings = &snap.settings;
    // The body, whole, within the request's read deadline.
    let end = b.pos + p.head_len + p.body_len;
    let deadline = tokio::time::Instant::from_std(started) + settings.read_timeout;
    while b.input.len() < end {
        b.input.reserve(end - b.input.len());
        match tokio::time::timeout_at(deadline, io.read_buf(&mut b.input)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Step::Close,
            Err(_) => {
                tracing::info!(peer = %handler.peer, "request body not received within read_timeout");
                let _ =
                    write_local(io, &mut b.out, error::refused(StatusCode::REQUEST_TIMEOUT, "request timeout\n"), true)
                        .await;
                return Step::Close;
            }
        }
    }
    let body = &b.input[b.pos + p.head_len..end];
    let plain = Plain {
        route: p.route,
        settings,
        out: &mut b.out,
        upstream: &mut b.upstream,
        body,
        head_method: p.head_method,
        idempotent: p.idempotent,
        close: p.close,
    };
    let Ok(reply) = forward(p.route, Protocol::Http, p.hash, &state.stats, (), plain).await;
    let status = match &reply {
        Reply::Local(r) => r.status().as_u16(),
        Reply::Relay(r) => r.status,
    };
    state.stats.traffic.record(status, started.elapsed());
    if let Reply::Relay(r) = &reply {
        r.guard.count_received(p.body_len as u64);
    }
    b.pos = end;
    let (outcome, sent, backend) = match reply {
        Reply::Local(resp) => {
            let len = resp.body().size_hint().exact();
            let close = p.close || resp.headers().get(header::CONNECTION).is_some_and(|v| v == "close");
            let ok = write_local(io, &mut b.out, resp, p.close).await.is_ok();
            (if ok && !close { Step::Next } else { Step::Close }, len, None)
        }
        Reply::Relay(relay) => {
            let sent = relay.sent_length();
            let backend = relay.guard.backend().clone();
            let ok = relay.run(io, &mut b.out, &mut b.upstream).await;
            (if ok && !p.close { Step::Next } else { Step::Close }, sent, Some(backend))
        }
    };
    if let (Some(log), Some(line)) = (&state.access_log, p.line) {
        let id = backend.as_ref().filter(|_| settings.tag_backend).map(|b| b.id.as_str());
        log.log(line.finish(status, sent, id, started));
    }
    outcome
}

/// `prepare` on one request head from `peer` on the HTTP listener: the upstream head, or None
/// when the engine leaves the request to hyper. For the fuzz targets.
pub(crate) fn upstream_head(
    state: &Arc<crate::state::State>,
    peer: std::net::SocketAddr,
    head: &[u8],
) -> Option<Vec<u8>> {
    let activity = super::activity::Activity::new(tokio::time::Instant::now());
    let handler = Handler::new(state.clone(), peer, super::service::Listener::Http, None, None, activity);
    let snap = state.snapshot();
    let mut b = Buffers { input: head.to_vec(), ..Default::default() };
    prepare(&handler, &snap, &mut b).map(|_| b.out)
}

/// Checks the head at `b.pos` and writes the request's upstream head to `b.out`; None when
/// the request is not one this engine serves (hyper will).
fn prepare<'s>(handler: &Handler, snap: &'s Snapshot, b: &mut Buffers) -> Option<Prepared<'s>> {
    let settings = &snap.settings;
    if handler.ambiguous.as_ref().is_some_and(|a| a.is_set()) {
        // The scanner saw a head with both framings on this connection: hyper refuses it.
        return None;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(&b.input[b.pos..], &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    if req.version != Some(1) {
        return None;
    }
    let method = req.method?;
    let (head_method, idempotent) = match method {
        "GET" | "OPTIONS" | "PUT" | "DELETE" => (false, true),
        "HEAD" => (true, true),
        "POST" | "PATCH" => (false, false),
        _ => return None,
    };
    let target = req.path?;
    if !plain_target(target) {
        return None;
    }
    let mut host = None;
    let mut length: Option<u64> = None;
    let mut close = false;
    let mut listed: [&[u8]; MAX_LISTED] = [&[]; MAX_LISTED];
    let mut n_listed = 0;
    let mut first_xff = None;
    let mut first_real_ip = None;
    let real_ip = settings.real_ip_header.as_str();
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() || !plain_host(value) {
                return None;
            }
            host = Some(std::str::from_utf8(value).ok()?);
        } else if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() || value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            length = Some(std::str::from_utf8(value).ok()?.parse().ok()?);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&c| c == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                } else if token.eq_ignore_ascii_case(b"upgrade")
                    || n_listed == MAX_LISTED
                    || ["host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-real-ip", real_ip]
                        .iter()
                        .any(|n| token.eq_ignore_ascii_case(n.as_bytes()))
                {
                    return None;
                } else {
                    listed[n_listed] = token;
                    n_listed += 1;
                }
            }
        } else if ["transfer-encoding", "upgrade", "expect", "http2-settings"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
            || (name.eq_ignore_ascii_case("content-type") && contains_ignore_case(value, b"application/grpc"))
            || (name.eq_ignore_ascii_case("accept") && contains_ignore_case(value, b"text/event-stream"))
        {
            return None;
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            first_xff.get_or_insert(value);
        }
        if name.eq_ignore_ascii_case(real_ip) {
            first_real_ip.get_or_insert(value);
        }
    }
    let host = host?;
    let body_len = length.unwrap_or(0);
    if body_len > MAX_BODY || settings.max_body_bytes.is_some_and(|max| body_len > max) {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    let route = snap.route(Some(host), path)?;
    if !route.upstream.backends.iter().all(|b| b.pool.is_plain()) {
        return None;
    }

    // The client's address, as the hyper path resolves it (`headers::client_ip`).
    let peer = handler.peer.ip();
    let trusted = headers::is_trusted(peer, &settings.trusted_proxies);
    let client = match first_real_ip.filter(|_| trusted).and_then(|v| std::str::from_utf8(v).ok()) {
        Some(v) => v.trim().parse().map_or(headers::canonical(peer), headers::canonical),
        None => headers::canonical(peer),
    };

    let out = &mut b.out;
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut proto_kept = false;
    for h in req.headers.iter() {
        let name = h.name;
        let forwarded = ["x-forwarded-for", "x-real-ip", real_ip].iter().any(|n| name.eq_ignore_ascii_case(n));
        let proto = name.eq_ignore_ascii_case("x-forwarded-proto");
        if forwarded
            || (proto && !trusted)
            || is_hop_by_hop(name)
            || listed[..n_listed].iter().any(|l| name.as_bytes().eq_ignore_ascii_case(l))
        {
            continue;
        }
        proto_kept |= proto;
        put_header(out, name.as_bytes(), h.value);
    }
    put_forwarded(out, handler, trusted, client, first_xff, proto_kept, real_ip);
    out.extend_from_slice(b"\r\n");

    let line = handler.state.access_log.as_ref().map(|_| {
        let field = |n: &str| {
            req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(n)).and_then(|h| std::str::from_utf8(h.value).ok())
        };
        RequestLine {
            client: peer,
            method: http::Method::from_bytes(method.as_bytes()).unwrap_or_default(),
            target: target.to_owned(),
            version: http::Version::HTTP_11,
            referer: field("referer").unwrap_or("-").to_owned(),
            user_agent: field("user-agent").unwrap_or("-").to_owned(),
        }
    });
    Some(Prepared {
        head_len,
        body_len: body_len as usize,
        route,
        hash: client_hash(client),
        close,
        head_method,
        idempotent,
        line,
    })
}

/// The forwarded headers as `headers::set_forwarded` sets them: from an untrusted peer, all
/// of them are the peer; from a trusted one, the chain is extended and the client is the one
/// its real-IP header named.
fn put_forwarded(
    out: &mut Vec<u8>,
    handler: &Handler,
    trusted: bool,
    client: IpAddr,
    first_xff: Option<&[u8]>,
    proto_kept: bool,
    real_ip: &str,
) {
    use std::io::Write as _;
    let peer = handler.peer_header.as_bytes();
    out.extend_from_slice(b"x-forwarded-for: ");
    if trusted {
        // `HeaderValue::to_str`: visible ASCII only, else the previous chain is not read.
        let prev = first_xff.filter(|v| v.iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c)));
        let chain = match prev {
            Some(prev) if !prev.trim_ascii().is_empty() => {
                out.extend_from_slice(prev);
                true
            }
            _ if !client_is(client, peer) => {
                let _ = write!(out, "{client}");
                true
            }
            _ => false,
        };
        if chain {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(peer);
    } else {
        out.extend_from_slice(peer);
    }
    out.extend_from_slice(b"\r\n");
    if !proto_kept {
        out.extend_from_slice(b"x-forwarded-proto: ");
        out.extend_from_slice(handler.proto.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut put_client = |name: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        if trusted {
            let _ = write!(out, "{client}");
        } else {
            out.extend_from_slice(peer);
        }
        out.extend_from_slice(b"\r\n");
    };
    if real_ip != "x-real-ip" {
        put_client(real_ip.as_bytes());
    }
    put_client(b"x-real-ip");
}

/// Whether `client` formats as the peer's header value.
fn client_is(client: IpAddr, peer: &[u8]) -> bool {
    std::str::from_utf8(peer).ok().and_then(|p| p.parse::<IpAddr>().ok()) == Some(client)
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The hop-by-hop fields `headers::strip_hop_by_hop` removes, in any case.
fn is_hop_by_hop(name: &str) -> bool {
    headers::HOP_BY_HOP.iter().any(|n| name.eq_ignore_ascii_case(n))
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// An origin-form target of characters any URI parser accepts unescaped (RFC 3986 `pchar`,
/// `/`, `?`, `%`); anything else, a fragment included, is hyper's to judge.
fn plain_target(t: &str) -> bool {
    t.starts_with('/')
        && t.len() < 16 * 1024
        && t.bytes().all(|c| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&c))
}

/// A Host value of a name or IPv4 address with an optional port; anything else (IPv6
/// literals, odd characters) is hyper's to judge.
fn plain_host(v: &[u8]) -> bool {
    let (name, port) = match v.iter().rposition(|&c| c == b':') {
        Some(i) => (&v[..i], Some(&v[i + 1..])),
        None => (v, None),
    };
    !name.is_empty()
        && name.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        && port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit))
}

/// What the client gets: the proxy's own answer, or a backend's response to relay.
enum Reply {
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
struct Relay {
    conn: RawConn,
    guard: InFlight,
    status: u16,
    framing: Framing,
    body_at: usize,
    /// The connection may carry another request once the body is through.
    reusable: bool,
}

/// A request the proxy's own engine sends: its head (in `out`) and body, to a raw connection.
struct Plain<'a> {
    route: &'a Route,
    settings: &'a Settings,
    out: &'a mut Vec<u8>,
    upstream: &'a mut Vec<u8>,
    body: &'a [u8],
    head_method: bool,
    idempotent: bool,
    close: bool,
}

/// A backend's response head, parsed.
struct Answer {
    conn: RawConn,
    head_len: usize,
}

/// Why a send went wrong after the connection was made.
enum Broken {
    /// The reused connection was found closed before any byte of an answer.
    Stale,
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
                Err(Broken::Stale) if reused && self.idempotent => continue,
                Err(Broken::Stale) => {
                    tracing::warn!(route = %self.route.name, backend = %backend.id, "upstream closed the connection before answering");
                    return Err(Failure::Local(error::bad_gateway()));
                }
                Err(Broken::TimedOut) => return Err(Failure::Timeout(self.settings.upstream_timeout)),
                Err(Broken::Failed(what, e)) => {
                    tracing::warn!(route = %self.route.name, backend = %backend.id, error = ?e, "{what}");
                    return Err(Failure::Local(error::bad_gateway()));
                }
            }
        }
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
            // Closed while idle: the backend read nothing of it.
            Err(_) if conn.reused => return Err(Broken::Stale),
            Err(e) => return Err(Broken::Failed("upstream request failed", Some(e))),
        }
        let limit = self.settings.upstream_timeout;
        let up = &mut *self.upstream;
        up.clear();
        let read = async {
            loop {
                let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut []);
                match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, up, &mut slots) {
                    Ok(httparse::Status::Complete(n)) => match resp.code {
                        Some(100..=199) if resp.code != Some(101) => {
                            // Informational: skipped, as hyper's client does.
                            up.drain(..n);
                            continue;
                        }
                        _ => return Ok(n),
                    },
                    Ok(httparse::Status::Partial) if up.len() < MAX_RESPONSE_HEAD => {}
                    Ok(httparse::Status::Partial) => {
                        return Err(Broken::Failed("upstream response head too long", None));
                    }
                    Err(_) => return Err(Broken::Failed("invalid upstream response head", None)),
                }
                up.reserve(8192);
                match conn.stream.read_buf(up).await {
                    Ok(0) | Err(_) if up.is_empty() && conn.reused => return Err(Broken::Stale),
                    Ok(0) => return Err(Broken::Failed("upstream closed before a whole response head", None)),
                    Err(e) => return Err(Broken::Failed("upstream response failed", Some(e))),
                    Ok(_) => {}
                }
            }
        };
        match tokio::time::timeout(limit, read).await {
            Err(_) => Err(Broken::TimedOut),
            Ok(Err(e)) => Err(e),
            Ok(Ok(head_len)) => Ok(Answer { conn, head_len }),
        }
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
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, head, &mut slots);
    if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
        return Err("invalid upstream response head");
    }
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
        if is_hop_by_hop(name)
            || (no_length && length)
            || (!length && listed[..n_listed].iter().any(|l| name.as_bytes().eq_ignore_ascii_case(l)))
        {
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
    Ok((status, framing, reusable))
}

/// A status code's three digits.
fn itoa3(status: u16) -> [u8; 3] {
    [b'0' + (status / 100 % 10) as u8, b'0' + (status / 10 % 10) as u8, b'0' + (status % 10) as u8]
}

impl Relay {
    /// The body length the client is told, for the access log.
    fn sent_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Empty => Some(0),
            _ => None,
        }
    }

    /// Writes the head in `out` and relays the body; the backend connection goes back to the
    /// pool when its response ended exactly. False when the exchange broke (the client
    /// connection then closes: its response cannot be completed).
    async fn run<T>(self, io: &mut ClientIo<T>, out: &mut Vec<u8>, up: &mut Vec<u8>) -> bool
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
async fn write_local<T>(
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
        ResponseBody::Upstream { .. } => Bytes::new(),
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

/// Reading a chunked body's framing (RFC 9112 §7.1) as it streams by.
pub(crate) mod chunked {
    /// Longest chunk-size line (with extensions) and trailer section accepted.
    const MAX_LINE: usize = 4096;
    const MAX_TRAILERS: usize = 16 * 1024;

    #[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
    enum State {
        #[default]
        Size,
        /// In a chunk-size line's extensions, up to its LF.
        Ext,
        Data(u64),
        /// The CRLF after a chunk's data.
        DataEnd {
            cr: bool,
        },
        /// Trailer lines after the last chunk; `len` of the current one.
        Trailer {
            len: usize,
        },
        Done,
    }

    #[derive(Default, Debug)]
    pub struct Decoder {
        state: State,
        size: u64,
        digits: usize,
        line: usize,
        trailers: usize,
        /// Bytes seen after the end of the body (the connection cannot be reused).
        extra: bool,
    }

    impl Decoder {
        /// Feeds body bytes, handing each piece of chunk data to `data`; Ok(true) once the
        /// body's end was read; Err on bad framing.
        pub fn feed(&mut self, buf: &[u8], mut data: impl FnMut(&[u8])) -> Result<bool, ()> {
            let mut i = 0;
            while i < buf.len() {
                let c = buf[i];
                match self.state {
                    State::Done => {
                        self.extra = true;
                        return Ok(true);
                    }
                    State::Data(left) => {
                        let n = (left as usize).min(buf.len() - i);
                        data(&buf[i..i + n]);
                        i += n;
                        self.state = match left - n as u64 {
                            0 => State::DataEnd { cr: false },
                            rest => State::Data(rest),
                        };
                        continue;
                    }
                    State::DataEnd { cr } => match (c, cr) {
                        (b'\r', false) => self.state = State::DataEnd { cr: true },
                        (b'\n', _) => self.state = State::Size,
                        _ => return Err(()),
                    },
                    State::Size => match c {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            self.digits += 1;
                            if self.digits > 15 {
                                return Err(());
                            }
                            self.size = self.size * 16 + (c as char).to_digit(16).unwrap_or(0) as u64;
                            self.line += 1;
                        }
                        b';' | b' ' | b'\t' | b'\r' if self.digits > 0 => {
                            self.state = State::Ext;
                            self.line += 1;
                        }
                        b'\n' if self.digits > 0 => self.end_size_line(),
                        _ => return Err(()),
                    },
                    State::Ext => {
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err(());
                        }
                        if c == b'\n' {
                            self.end_size_line();
                        }
                    }
                    State::Trailer { len } => {
                        self.trailers += 1;
                        if self.trailers > MAX_TRAILERS {
                            return Err(());
                        }
                        match c {
                            b'\n' if len == 0 => self.state = State::Done,
                            b'\n' => self.state = State::Trailer { len: 0 },
                            b'\r' => {}
                            _ => self.state = State::Trailer { len: len + 1 },
                        }
                    }
                }
                i += 1;
            }
            Ok(self.state == State::Done)
        }

        fn end_size_line(&mut self) {
            self.state = if self.size == 0 { State::Trailer { len: 0 } } else { State::Data(self.size) };
            self.size = 0;
            self.digits = 0;
            self.line = 0;
        }

        /// The body ended and nothing followed it.
        pub fn done_exactly(&self) -> bool {
            self.state == State::Done && !self.extra
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn decode(pieces: &[&[u8]]) -> (Result<bool, ()>, Vec<u8>, bool) {
            let mut d = Decoder::default();
            let mut out = Vec::new();
            let mut r = Ok(false);
            for p in pieces {
                r = d.feed(p, |x| out.extend_from_slice(x));
                if r != Ok(false) {
                    break;
                }
            }
            (r, out, d.done_exactly())
        }

        #[test]
        fn bodies_split_anywhere_decode_the_same() {
            let body: &[u8] = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
            for cut in 0..body.len() {
                let (r, out, exact) = decode(&[&body[..cut], &body[cut..]]);
                assert_eq!((r, out.as_slice(), exact), (Ok(true), &b"hello world"[..], true), "cut at {cut}");
            }
        }

        #[test]
        fn bad_framing_and_trailing_bytes_are_seen() {
            assert_eq!(decode(&[b"zz\r\n"]).0, Err(()));
            assert_eq!(decode(&[b"3\r\nabcX\r\n"]).0, Err(()));
            assert_eq!(decode(&[b"ffffffffffffffff\r\n"]).0, Err(()));
            let (r, _, exact) = decode(&[b"0\r\n\r\nHTTP/1.1 200 OK\r\n"]);
            assert_eq!((r, exact), (Ok(true), false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_complete_at_its_first_empty_line() {
        let whole = |b: &[u8]| head_complete(b, &mut 0);
        assert!(whole(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(whole(b"\r\nGET / HTTP/1.1\nHost: a\n\n"));
        assert!(!whole(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!whole(b"\r\n\r\n"));
        // However it trickles in, byte by byte or in pieces, the end is found where it is.
        let head = b"\r\nGET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n";
        for step in 1..head.len() {
            let mut scanned = 0;
            let ends: Vec<usize> = (1..=head.len()).filter(|&n| n % step == 0 || n == head.len()).collect();
            let first = ends.iter().find(|&&n| head_complete(&head[..n], &mut scanned));
            assert_eq!(first, Some(&head.len()), "in pieces of {step}");
        }
    }

    #[test]
    fn only_plain_targets_and_hosts_stay() {
        assert!(plain_target("/a/b?c=d&e=%20"));
        assert!(!plain_target("http://x/"));
        assert!(!plain_target("/a#frag"));
        assert!(!plain_target("/a\"b"));
        assert!(plain_host(b"example.com:8080"));
        assert!(!plain_host(b"[::1]:80"));
        assert!(!plain_host(b"a@b"));
        assert!(!plain_host(b"a:"));
    }
}
