//! One request through the proxy: validate framing, route, pick a backend, forward, stream
//! the answer back; one retry on another backend when connecting fails.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::{HeaderValue, Method, Request, Response, Uri, Version, header, uri::PathAndQuery};
use http_body::Body as _;
use hyper::body::Incoming;

use super::{
    body::{InFlight, RequestBody, ResponseBody},
    error,
    framing::Ambiguous,
    headers, upgrade,
    upstream::ConnectError,
};
use crate::{
    backend::{Backend, client_hash},
    state::{Protocol, Route, Snapshot, State},
};

/// Chunked body bytes read ahead of forwarding, to catch bad framing before a backend sees
/// anything (nginx buffers whole bodies by default; we stream past this much).
const READ_AHEAD: usize = 64 * 1024;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Http,
    Grpc,
}

/// Per-connection context of the request handler.
#[derive(Clone)]
pub struct Handler {
    pub state: Arc<State>,
    pub peer: SocketAddr,
    pub listener: Listener,
    /// Raised by the connection's framing scanner (HTTP/1 listener only).
    pub ambiguous: Option<Ambiguous>,
}

impl Handler {
    pub async fn handle(self, req: Request<Incoming>) -> Result<Response<ResponseBody>, std::convert::Infallible> {
        let snap = self.state.snapshot();
        Ok(self.proxy(&snap, req).await)
    }

    async fn proxy(&self, snap: &Snapshot, mut req: Request<Incoming>) -> Response<ResponseBody> {
        let scanned =
            self.ambiguous.as_ref().is_some_and(|a| a.is_set()).then_some("both Content-Length and Transfer-Encoding");
        if let Some(reason) = scanned.or_else(|| ambiguous_framing(&req)) {
            tracing::info!(peer = %self.peer, reason, "rejected request with ambiguous framing");
            return error::bad_request("bad request: ambiguous message framing\n");
        }
        let host = request_host(&req);
        let Some(route) = snap.route(host.as_deref(), req.uri().path()) else {
            tracing::info!(peer = %self.peer, host = ?host, path = req.uri().path(), "no route");
            return error::no_route();
        };
        let settings = &snap.settings;
        let protocol = protocol_of(&req, self.listener);
        let peer_ip = self.peer.ip();
        let trusted = headers::is_trusted(peer_ip, &settings.trusted_proxies);
        let client = headers::client_ip(peer_ip, trusted, req.headers(), &settings.real_ip_header);
        let is_upgrade = protocol == Protocol::WebSocket || wants_upgrade(&req);

        let original_host = host.and_then(|h| HeaderValue::try_from(h).ok());
        {
            let h = req.headers_mut();
            headers::strip_hop_by_hop(h, is_upgrade, protocol == Protocol::Grpc);
            headers::set_forwarded(h, peer_ip, trusted, client, "http", &settings.real_ip_header);
            if let Some(host) = &original_host {
                h.insert(header::HOST, host.clone());
            }
        }
        let hash = client_hash(client);

        if is_upgrade {
            return upgrade::relay(snap, route, req, hash).await;
        }

        let (mut parts, body) = req.into_parts();
        let http1 = parts.version == Version::HTTP_11 || parts.version == Version::HTTP_10;
        let body = if body.is_end_stream() {
            RequestBody::empty()
        } else if http1 && body.size_hint().exact().is_none() {
            // Chunked: its framing is ours to check before anything goes upstream.
            match RequestBody::read_ahead(body, settings.read_timeout, READ_AHEAD).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::info!(peer = %self.peer, route = %route.name, error = %e, "bad request body");
                    return error::bad_request("bad request: invalid body\n");
                }
            }
        } else {
            RequestBody::streamed(body, (protocol != Protocol::Grpc).then_some(settings.read_timeout))
        };
        parts.uri = origin_form(&parts.uri);
        forward(snap, route, protocol, Request::from_parts(parts, body), hash).await
    }
}

/// Sends the request to a backend chosen by the route's balancer; on a connect failure, once
/// more to another backend (nothing reached the first one, so any method is safe to resend).
async fn forward(
    snap: &Snapshot,
    route: &Route,
    protocol: Protocol,
    mut req: Request<RequestBody>,
    hash: u64,
) -> Response<ResponseBody> {
    let settings = &snap.settings;
    let mut failed: Option<Arc<Backend>> = None;
    for attempt in 0..2 {
        let Some(backend) = pick(route, protocol, hash, failed.as_deref()) else {
            tracing::warn!(route = %route.name, upstream = %route.upstream.name, "no eligible backend");
            return if failed.is_some() { error::bad_gateway() } else { error::unavailable() };
        };
        let mut guard = InFlight::new(backend.clone());
        let started = Instant::now();
        let sent = if protocol == Protocol::Grpc {
            send_h2(&backend, req, settings.connect_timeout).await
        } else {
            send_h1(&backend, req, &mut guard, settings.connect_timeout, settings.upstream_timeout).await
        };
        let result = match sent {
            Ok(fut) => fut,
            Err(SendError::Connect(e, back)) => {
                backend.connect_failed();
                tracing::warn!(route = %route.name, backend = %backend.id, attempt, error = %e, "connect failed");
                match back {
                    Some(r) if attempt == 0 => {
                        req = *r;
                        failed = Some(backend);
                        continue;
                    }
                    _ => return error::bad_gateway(),
                }
            }
            Err(SendError::Timeout) => {
                tracing::warn!(route = %route.name, backend = %backend.id, timeout = ?settings.upstream_timeout,
                    "upstream timed out");
                return error::gateway_timeout();
            }
            Err(SendError::Upstream(e)) => {
                tracing::warn!(route = %route.name, backend = %backend.id, error = %e, "upstream request failed");
                return error::bad_gateway();
            }
        };
        backend.connect_succeeded();
        return match tokio::time::timeout(settings.upstream_timeout, result).await {
            Err(_) => {
                tracing::warn!(route = %route.name, backend = %backend.id, timeout = ?settings.upstream_timeout,
                    "upstream timed out");
                error::gateway_timeout()
            }
            Ok(Err(e)) => {
                tracing::warn!(route = %route.name, backend = %backend.id, error = %e, "upstream failed");
                error::bad_gateway()
            }
            Ok(Ok(resp)) => {
                backend.observe_latency(started.elapsed());
                let (mut parts, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers, false, false);
                Response::from_parts(parts, ResponseBody::upstream(body, guard))
            }
        };
    }
    error::bad_gateway()
}

/// The route's balancer for this kind of request, over backends that accept one more.
pub(super) fn pick(route: &Route, protocol: Protocol, hash: u64, skip: Option<&Backend>) -> Option<Arc<Backend>> {
    let backends = &route.upstream.backends;
    let i = route.balancer(protocol).pick(hash, &mut |b| b.accepts() && !skip.is_some_and(|s| std::ptr::eq(s, b)))?;
    Some(backends[i].clone())
}

enum SendError {
    /// Nothing was sent; the request comes back when it can be resent.
    Connect(ConnectError, Option<Box<Request<RequestBody>>>),
    Upstream(hyper::Error),
    Timeout,
}

type ResponseFuture = std::pin::Pin<Box<dyn Future<Output = Result<Response<Incoming>, hyper::Error>> + Send>>;

/// Sends on a pooled HTTP/1.1 connection; a pooled connection found closed before the
/// request left is replaced by a fresh one.
async fn send_h1(
    backend: &Backend,
    mut req: Request<RequestBody>,
    guard: &mut InFlight,
    connect_timeout: std::time::Duration,
    upstream_timeout: std::time::Duration,
) -> Result<ResponseFuture, SendError> {
    *req.version_mut() = Version::HTTP_11;
    loop {
        let mut conn = match backend.pool.h1(connect_timeout).await {
            Ok(c) => c,
            Err(e) => return Err(SendError::Connect(e, Some(Box::new(req)))),
        };
        let fut = conn.sender.try_send_request(req);
        if conn.reused {
            // Wait for the outcome here: a stale keep-alive connection fails before sending.
            let Ok(outcome) = tokio::time::timeout(upstream_timeout, fut).await else {
                return Err(SendError::Timeout);
            };
            match outcome {
                Ok(resp) => {
                    guard.set_conn(conn.sender);
                    return Ok(Box::pin(async move { Ok(resp) }));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => {
                        req = back;
                        continue;
                    }
                    None => return Err(SendError::Upstream(e.into_error())),
                },
            }
        }
        guard.set_conn(conn.sender);
        return Ok(Box::pin(async move { fut.await.map_err(|e| e.into_error()) }));
    }
}

/// Sends over the backend's HTTP/2 connection (gRPC), with the absolute URI h2 needs.
async fn send_h2(
    backend: &Backend,
    mut req: Request<RequestBody>,
    connect_timeout: std::time::Duration,
) -> Result<ResponseFuture, SendError> {
    let mut sender = match backend.pool.h2(connect_timeout).await {
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
    match Uri::builder().scheme("http").authority(authority).path_and_query(pq).build() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => {
            return Err(SendError::Connect(
                ConnectError::Io {
                    addr: backend.pool.addr(),
                    source: std::io::Error::other("request authority is not valid"),
                },
                None,
            ));
        }
    }
    Ok(Box::pin(sender.send_request(req)))
}

/// Request-smuggling guards hyper does not apply itself: a message with both Content-Length
/// and Transfer-Encoding is rejected rather than reinterpreted (RFC 9112 §6.1 allows either).
fn ambiguous_framing<B>(req: &Request<B>) -> Option<&'static str> {
    let h = req.headers();
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
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

/// The Host a request names: the URI authority (HTTP/2, absolute-form) or the Host header.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_owned());
    }
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned)
}

/// `path?query` for the upstream request line.
fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    let pq = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(pq)
}

fn protocol_of<B>(req: &Request<B>, listener: Listener) -> Protocol {
    let h = req.headers();
    let has = |name: header::HeaderName, needle: &str| {
        h.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| v.to_ascii_lowercase().contains(needle))
    };
    if listener == Listener::Grpc || has(header::CONTENT_TYPE, "application/grpc") {
        Protocol::Grpc
    } else if has(header::UPGRADE, "websocket") && req.method() == Method::GET {
        Protocol::WebSocket
    } else if has(header::ACCEPT, "text/event-stream") {
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
