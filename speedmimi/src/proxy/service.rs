//! One request through the proxy: validate framing, route, and forward it (`forward`: a backend
//! picked, one retry on another when connecting fails) as a plain request, an upgrade or a
//! spliced SSE stream; a plain one's answer streams back.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Instant,
};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header, uri::PathAndQuery};
use http_body::Body as _;
use hyper::body::Incoming;

use super::{
    activity::Activity,
    body::{InFlight, ResponseBody},
    error,
    forward::{Answered, Exchange, Failure, forward},
    framing::Ambiguous,
    h1, headers,
    io::Hijack,
    sse, upgrade,
};
use crate::{
    backend::{Backend, client_hash},
    config::Scheme,
    datapath::Datapath,
    state::{Protocol, Route, Settings, Snapshot, State},
    upstream::{BodyTooLarge, ConnectError, RequestBody},
};

/// Chunked body bytes read ahead of forwarding, to catch bad framing before a backend sees
/// anything (nginx buffers whole bodies by default; we stream past this much).
const READ_AHEAD: usize = 64 * 1024;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Http,
    /// TLS-terminating: HTTP/1.1 or h2 by ALPN.
    Https,
    Grpc,
}

/// Per-connection context of the request handler.
#[derive(Clone)]
pub struct Handler {
    pub state: Arc<State>,
    pub peer: SocketAddr,
    /// The peer address as a header value, made once per connection: it is the forwarded
    /// address of every request from an untrusted peer.
    pub peer_header: HeaderValue,
    pub listener: Listener,
    /// Raised by the connection's framing scanner (HTTP/1 listener only).
    pub ambiguous: Option<Ambiguous>,
    /// A plain HTTP/1 connection the handler may take over (spliced SSE).
    pub hijack: Option<Hijack>,
    /// `X-Forwarded-Proto` for requests from an untrusted peer: how they reached us.
    pub proto: &'static str,
    /// The connection's open requests; told when it switches protocols.
    pub activity: Arc<Activity>,
}

impl Handler {
    pub fn new(
        state: Arc<State>,
        peer: SocketAddr,
        listener: Listener,
        ambiguous: Option<Ambiguous>,
        hijack: Option<Hijack>,
        activity: Arc<Activity>,
    ) -> Handler {
        // Formatted on the stack: one allocation (the value's own) per connection, not three.
        let mut text = [0u8; 64];
        let len = {
            let mut w = &mut text[..];
            let _ = std::io::Write::write_fmt(&mut w, format_args!("{}", headers::canonical(peer.ip())));
            64 - w.len()
        };
        let peer_header = HeaderValue::from_bytes(&text[..len]).expect("an IP address is a valid header value");
        let proto = if listener == Listener::Https { "https" } else { "http" };
        Handler { state, peer, peer_header, listener, ambiguous, proto, hijack, activity }
    }

    /// The datapath that splices upgraded flows and SSE streams, when this daemon splices at all.
    fn splicer(&self) -> Option<Arc<dyn Datapath>> {
        let splice = self.state.config().file.ebpf.splice;
        (splice && self.state.datapath.can_splice()).then(|| self.state.datapath.clone())
    }

    pub async fn handle(self, req: Request<Incoming>) -> Result<Response<ResponseBody>, std::convert::Infallible> {
        let started = Instant::now();
        let snap = self.state.snapshot();
        let line = self.state.access_log.as_ref().map(|_| RequestLine::of(&req, self.peer));
        let resp = self.proxy(&snap, req).await;
        self.state.stats.traffic.record(resp.status().as_u16(), started.elapsed());
        if let (Some(log), Some(line)) = (&self.state.access_log, line) {
            let bytes = resp.body().size_hint().exact();
            let backend = resp.extensions().get::<BackendTag>().map(|t| t.0.id.as_str());
            log.log(line.finish(resp.status().as_u16(), bytes, backend, started));
        }
        Ok(resp)
    }

    async fn proxy(&self, snap: &Snapshot, mut req: Request<Incoming>) -> Response<ResponseBody> {
        if self.hijack.as_ref().is_some_and(Hijack::is_taken) {
            // A spliced SSE stream owns this connection: a request pipelined behind it is not
            // forwarded (its answer could never be delivered), and this one goes nowhere.
            tracing::info!(peer = %self.peer, "request pipelined after an SSE stream dropped");
            return error::bad_request("bad request: pipelined after an event stream\n");
        }
        let scanned =
            self.ambiguous.as_ref().is_some_and(|a| a.is_set()).then_some("both Content-Length and Transfer-Encoding");
        if let Some(reason) = scanned.or_else(|| ambiguous_framing(&req)) {
            tracing::info!(peer = %self.peer, reason, "rejected request with ambiguous framing");
            return error::bad_request("bad request: ambiguous message framing\n");
        }
        if let Err((status, reason)) = transfer_codings(req.headers()) {
            tracing::info!(peer = %self.peer, reason, "rejected request with unusable transfer codings");
            return error::refused(status, "bad request: unusable Transfer-Encoding\n");
        }
        if let Err(reason) = admit_host(&mut req) {
            tracing::info!(peer = %self.peer, reason, "rejected request with a bad Host");
            return error::bad_request("bad request: missing, repeated or invalid Host\n");
        }
        let Some(route) = snap.route(request_host(&req), req.uri().path()) else {
            tracing::info!(peer = %self.peer, host = ?request_host(&req), path = req.uri().path(), "no route");
            return error::no_route();
        };
        let settings = &snap.settings;
        let protocol = protocol_of(&req, self.listener);
        let peer_ip = self.peer.ip();
        let trusted = headers::is_trusted(peer_ip, &settings.trusted_proxies);
        let client = headers::client_ip(peer_ip, trusted, req.headers(), &settings.real_ip_header);
        let is_upgrade = protocol == Protocol::WebSocket || wants_upgrade(&req);
        if is_upgrade && !req.body().is_end_stream() {
            // Its body would have to go before the switch, which the relay does not do: refuse
            // rather than forward a Content-Length without its body.
            tracing::info!(peer = %self.peer, route = %route.name, "rejected upgrade request with a body");
            return error::bad_request("bad request: upgrade request with a body\n");
        }

        {
            let h = req.headers_mut();
            headers::strip_hop_by_hop(h, is_upgrade, protocol == Protocol::Grpc);
            let forwarded = headers::Forwarded { peer: &self.peer_header, trusted, client, proto: self.proto };
            headers::set_forwarded(h, &forwarded, &settings.real_ip_header);
        }
        let hash = client_hash(client);

        if is_upgrade {
            let resp = upgrade::relay(snap, route, req, hash, &self.state.stats, self.splicer()).await;
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                self.activity.switch();
            }
            return resp;
        }

        if protocol == Protocol::Sse
            && req.version() == Version::HTTP_11
            && req.body().is_end_stream()
            && let (Some(hijack), Some(splicer)) = (&self.hijack, self.splicer())
            && let Some(resp) = sse::relay(snap, route, &req, hash, &self.state.stats, &splicer, hijack).await
        {
            return resp;
        }

        if settings.http1_fast_path && h1::bridge::takes(route, &req) {
            self.state.stats.h2_bridged.fetch_add(1, Relaxed);
            return h1::bridge::forward_h2(route, req, hash, &self.state.stats, settings).await;
        }

        let (parts, body) = req.into_parts();
        if let Some(max) = settings.max_body_bytes
            && body.size_hint().lower() > max
        {
            tracing::info!(peer = %self.peer, route = %route.name, length = body.size_hint().lower(), max,
                "request body too large");
            return error::payload_too_large();
        }
        let http1 = parts.version == Version::HTTP_11 || parts.version == Version::HTTP_10;
        // An idempotent request without a body can be sent again to another backend: its head is
        // kept for that, when the upstream has another backend to send it to.
        let replay = (body.is_end_stream()
            && parts.method.is_idempotent()
            && route.upstream.conf.retries.max > 0
            && route.upstream.backends.len() > 1)
            .then(|| parts.clone());
        let body = if body.is_end_stream() {
            RequestBody::empty()
        } else if http1 && body.size_hint().exact().is_none() {
            // Chunked: its framing is ours to check before anything goes upstream.
            match RequestBody::read_ahead(body, settings.read_timeout, READ_AHEAD, settings.max_body_bytes).await {
                Ok(b) => b,
                Err(e) if BodyTooLarge::caused(&*e) => {
                    tracing::info!(peer = %self.peer, route = %route.name, error = %e, "request body too large");
                    return error::payload_too_large();
                }
                Err(e) => {
                    tracing::info!(peer = %self.peer, route = %route.name, error = %e, "bad request body");
                    return error::bad_request("bad request: invalid body\n");
                }
            }
        } else {
            let read_timeout = (protocol != Protocol::Grpc).then_some(settings.read_timeout);
            RequestBody::streamed(body, read_timeout, settings.max_body_bytes)
        };
        let plain = Plain { route, protocol, settings, replay };
        let req = Request::from_parts(parts, body);
        let Ok(resp) = forward(route, protocol, hash, &self.state.stats, req, plain).await;
        resp
    }
}

/// A request forwarded the ordinary way: HTTP/1.1 on a pooled connection, or over the backend's
/// HTTP/2 connection for gRPC.
struct Plain<'a> {
    route: &'a Route,
    protocol: Protocol,
    settings: &'a Settings,
    /// The request's head, when it may be sent again (idempotent, no body).
    replay: Option<http::request::Parts>,
}

impl Exchange for Plain<'_> {
    type Request = Request<RequestBody>;
    type Answer = Response<Incoming>;
    type Pass = Infallible;
    type Reply = Response<ResponseBody>;
    const NO_BACKEND: &'static str = "no eligible backend";
    const CONNECT_FAILED: &'static str = "connect failed";
    const TIMED_OUT: &'static str = "upstream timed out";

    async fn send(
        &mut self,
        backend: &Arc<Backend>,
        mut req: Request<RequestBody>,
        guard: &mut InFlight,
    ) -> Result<Response<Incoming>, Failure<Request<RequestBody>>> {
        req.body_mut().meter = Some(guard.meter());
        let sent = if self.protocol == Protocol::Grpc {
            send_h2(backend, req, self.settings).await
        } else {
            send_h1(backend, req, guard, self.settings).await
        };
        let route = &self.route.name;
        sent.map_err(|e| match e {
            SendError::Connect(e, back) => Failure::Connect(e, back),
            SendError::Timeout => Failure::Timeout(self.settings.upstream_timeout),
            SendError::Upstream(e) if BodyTooLarge::caused(&e) => {
                tracing::info!(route = %route, backend = %backend.id, error = %e, "request body too large");
                Failure::Local(error::payload_too_large())
            }
            SendError::Upstream(e) if closed_before_answer(&e) => Failure::Reset(e.to_string()),
            SendError::Upstream(e) => {
                tracing::warn!(route = %route, backend = %backend.id, error = %e, "upstream request failed");
                Failure::Local(error::bad_gateway())
            }
        })
    }

    fn status(&self, resp: &Response<Incoming>) -> u16 {
        resp.status().as_u16()
    }

    fn replay(&mut self) -> Option<Request<RequestBody>> {
        self.replay.clone().map(|parts| Request::from_parts(parts, RequestBody::empty()))
    }

    fn answer(self, resp: Response<Incoming>, backend: &Arc<Backend>, guard: InFlight, started: Instant) -> Answered {
        backend.connect_succeeded();
        backend.observe_latency(started.elapsed());
        if headers::both_framings(resp.headers()) {
            // Dropped unread with its guard not clean: the connection is not reused.
            tracing::warn!(route = %self.route.name, backend = %backend.id,
                "upstream reply has both Content-Length and Transfer-Encoding");
            return error::bad_gateway().into();
        }
        let (mut parts, body) = resp.into_parts();
        // An intermediary sends its own HTTP version (RFC 9110 §6.2): an HTTP/1.0 backend's
        // answer goes out as HTTP/1.1, re-framed, on a connection that stays open.
        parts.version = Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers, false, false);
        if self.settings.tag_backend {
            parts.extensions.insert(BackendTag(backend.clone()));
        }
        Response::from_parts(parts, ResponseBody::upstream(body, guard)).into()
    }
}

/// The backend closed or reset the connection before a whole response head came.
fn closed_before_answer(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted);
        }
        source = s.source();
    }
    false
}

enum SendError {
    /// Nothing was sent; the request comes back when it can be resent.
    Connect(ConnectError, Option<Box<Request<RequestBody>>>),
    Upstream(hyper::Error),
    Timeout,
}

/// Sends on a pooled HTTP/1.1 connection and waits for the response head (bounded by
/// `upstream_timeout` from the end of the request body). A pooled connection found closed
/// before the request left is replaced by a fresh one.
async fn send_h1(
    backend: &Backend,
    mut req: Request<RequestBody>,
    guard: &mut InFlight,
    settings: &Settings,
) -> Result<Response<Incoming>, SendError> {
    *req.version_mut() = Version::HTTP_11;
    loop {
        let mut conn = match backend.pool.h1(settings.connect_timeout, backend.max_conn.load(Relaxed)).await {
            Ok(c) => c,
            Err(e) => return Err(SendError::Connect(e, Some(Box::new(req)))),
        };
        let uploaded = req.body_mut().uploaded();
        let outcome = head_within(conn.sender.try_send_request(req), uploaded, settings.upstream_timeout).await;
        match outcome {
            Err(_) => return Err(SendError::Timeout),
            Ok(Ok(resp)) => {
                guard.set_conn(conn.sender);
                return Ok(resp);
            }
            Ok(Err(mut e)) => match e.take_message() {
                // Never sent: the kept-alive connection had been closed by the backend.
                Some(back) if conn.reused => req = back,
                _ => return Err(SendError::Upstream(e.into_error())),
            },
        }
    }
}

/// Sends over the backend's HTTP/2 connection (gRPC), with the absolute URI h2 needs.
async fn send_h2(
    backend: &Backend,
    mut req: Request<RequestBody>,
    settings: &Settings,
) -> Result<Response<Incoming>, SendError> {
    let mut sender = match backend.pool.h2(settings.connect_timeout).await {
        Ok(s) => s,
        Err(e) => return Err(SendError::Connect(e, Some(Box::new(req)))),
    };
    *req.version_mut() = Version::HTTP_2;
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| backend.authority.clone());
    let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let scheme = if backend.scheme == Scheme::Https { "https" } else { "http" };
    match Uri::builder().scheme(scheme).authority(authority).path_and_query(pq).build() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(e) => {
            return Err(SendError::Connect(
                ConnectError::Io {
                    addr: backend.pool.addr(),
                    source: std::io::Error::other(format!("request authority is not valid: {e}")),
                },
                None,
            ));
        }
    }
    let uploaded = req.body_mut().uploaded();
    match head_within(sender.send_request(req), uploaded, settings.upstream_timeout).await {
        Err(_) => Err(SendError::Timeout),
        Ok(r) => r.map_err(SendError::Upstream),
    }
}

/// Waits for a backend's response head: as long as the request body is still going up (its own
/// read deadline bounds that: a slow client is not a slow backend), then `limit` more.
async fn head_within<F: Future>(
    send: F,
    uploaded: tokio::sync::oneshot::Receiver<()>,
    limit: std::time::Duration,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::pin!(send);
    tokio::select! {
        r = &mut send => return Ok(r),
        _ = uploaded => {}
    }
    tokio::time::timeout(limit, send).await
}

/// Request-smuggling guards hyper does not apply itself: a message with both Content-Length
/// and Transfer-Encoding is rejected rather than reinterpreted (RFC 9112 §6.1 allows either).
fn ambiguous_framing<B>(req: &Request<B>) -> Option<&'static str> {
    let h = req.headers();
    if headers::both_framings(h) {
        return Some("both Content-Length and Transfer-Encoding");
    }
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next()
        && lengths.any(|v| v != first)
    {
        return Some("differing Content-Length values");
    }
    None
}

/// The request's transfer codings (RFC 9112 §6.1, §7). hyper decodes one final `chunked` and
/// the body is forwarded re-chunked, so any other coding would silently be lost on the way:
/// `chunked` more than once is a framing error (400), and a coding the proxy does not implement
/// gets 501 (RFC 9112 §6.1's SHOULD).
fn transfer_codings(h: &http::HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let (mut fields, mut chunked, mut other) = (0, 0, 0);
    for value in h.get_all(header::TRANSFER_ENCODING) {
        fields += 1;
        // Empty list elements are allowed and mean nothing (RFC 9110 §5.6.1).
        for coding in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|c| !c.is_empty()) {
            match coding.eq_ignore_ascii_case(b"chunked") {
                true => chunked += 1,
                false => other += 1,
            }
        }
    }
    match (fields, chunked, other) {
        (0, ..) | (_, 1, 0) => Ok(()),
        (_, 2.., _) => Err((StatusCode::BAD_REQUEST, "chunked applied more than once")),
        (_, 0, 0) => Err((StatusCode::BAD_REQUEST, "empty Transfer-Encoding")),
        _ => Err((StatusCode::NOT_IMPLEMENTED, "a transfer coding other than chunked")),
    }
}

/// Admission by Host (RFC 9112 §3.2): an HTTP/1.1 request carries exactly one valid Host; an
/// absolute-form target's authority (or h2's `:authority`) replaces any Host sent with it. After
/// this, the Host header is the one authority the request is routed by and forwarded with, and
/// the target is in origin form.
pub(crate) fn admit_host<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    if let Some(authority) = req.uri().authority() {
        if authority.as_str().contains('@') {
            return Err("userinfo in the target's authority");
        }
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| "target authority is not a header value")?;
        req.headers_mut().insert(header::HOST, host);
        let uri = origin_form(req.uri());
        *req.uri_mut() = uri;
        return Ok(());
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err("more than one Host"),
        (None, _) if req.version() == Version::HTTP_11 => Err("HTTP/1.1 request without Host"),
        (None, _) => Ok(()),
        (Some(h), None) if valid_host(h.as_bytes()) => Ok(()),
        (Some(_), None) => Err("invalid Host value"),
    }
}

/// `uri-host [ ":" port ]`: a non-empty authority without userinfo.
fn valid_host(v: &[u8]) -> bool {
    !v.is_empty() && !v.contains(&b'@') && http::uri::Authority::try_from(v).is_ok()
}

/// The Host a request is routed by (set by `admit_host`; absent only on HTTP/1.0 and h2
/// requests that named none).
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok())
}

/// `path?query` for the upstream request line.
fn origin_form(uri: &Uri) -> Uri {
    let pq = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(pq)
}

fn protocol_of<B>(req: &Request<B>, listener: Listener) -> Protocol {
    let h = req.headers();
    let has = |name: header::HeaderName, needle: &[u8]| {
        h.get(name).is_some_and(|v| headers::contains_ignore_case(v.as_bytes(), needle))
    };
    if listener == Listener::Grpc || has(header::CONTENT_TYPE, b"application/grpc") {
        Protocol::Grpc
    } else if has(header::UPGRADE, b"websocket") && req.method() == Method::GET {
        Protocol::WebSocket
    } else if has(header::ACCEPT, b"text/event-stream") {
        Protocol::Sse
    } else {
        Protocol::Http
    }
}

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` plus `Upgrade`).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Which backend answered, attached to responses when the access log wants it.
#[derive(Clone)]
pub struct BackendTag(pub Arc<Backend>);

/// What the access log keeps of a request until its response is known.
pub(super) struct RequestLine {
    pub client: std::net::IpAddr,
    pub method: Method,
    pub target: String,
    pub version: Version,
    pub referer: String,
    pub user_agent: String,
}

impl RequestLine {
    fn of<B>(req: &Request<B>, peer: SocketAddr) -> RequestLine {
        let h = |name| req.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok()).unwrap_or("-").to_owned();
        RequestLine {
            client: peer.ip(),
            method: req.method().clone(),
            target: req.uri().path_and_query().map_or_else(|| req.uri().to_string(), |pq| pq.as_str().to_owned()),
            version: req.version(),
            referer: h(header::REFERER),
            user_agent: h(header::USER_AGENT),
        }
    }

    /// `client - - [time] "METHOD target VERSION" status bytes "referer" "agent" ms backend`
    pub(super) fn finish(self, status: u16, bytes: Option<u64>, backend: Option<&str>, started: Instant) -> String {
        let bytes = bytes.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let backend = backend.unwrap_or("-");
        format!(
            "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" {:.3} {}",
            self.client,
            crate::access_log::timestamp(std::time::SystemTime::now()),
            self.method,
            self.target,
            self.version,
            status,
            bytes,
            self.referer,
            self.user_agent,
            started.elapsed().as_secs_f64() * 1000.0,
            backend,
        )
    }
}
