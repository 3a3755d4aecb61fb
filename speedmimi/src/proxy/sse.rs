//! Spliced server-sent events. An SSE request on a plain HTTP/1.1 connection goes upstream on a
//! connection of its own (`Connection: close`, so the stream is the connection's only message);
//! the response head is relayed by us and the body passes through unchanged, byte for byte, in
//! the kernel. Both ends close with the stream, so the framing the backend chose (chunked,
//! length or close-delimited) stays valid for the client. The client connection is taken from
//! hyper for good: it is the stream's now, like an upgraded one.
//!
//! The client is not expected to send anything after an SSE request; if it does, the flow ends
//! rather than letting unparsed bytes reach the backend.

use std::{sync::Arc, time::Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode, header};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    body::{InFlight, ResponseBody},
    error,
    forward::{Answered, Exchange, Failure, forward},
    headers,
    io::Hijack,
    splice,
    splice::Tally,
};
use crate::{
    backend::Backend,
    datapath::Datapath,
    state::{Protocol, Route, Settings, Snapshot},
    stats::ServerStats,
    tls::Alpn,
    upstream::UpstreamIo,
};

/// Longest response head read from a backend.
const MAX_HEAD: usize = 64 * 1024;

/// Relays an SSE request with a spliced body (a connect failure goes once more to another
/// backend, as for any request); `None` when this request cannot take the raw path (the caller
/// then proxies it the ordinary way, nothing having been sent).
pub async fn relay<B>(
    snap: &Snapshot,
    route: &Route,
    req: &Request<B>,
    hash: u64,
    server: &Arc<ServerStats>,
    splicer: &Arc<dyn Datapath>,
    hijack: &Hijack,
) -> Option<Response<ResponseBody>> {
    let raw = Raw { route, settings: &snap.settings, server, splicer, hijack, head: request_head(req) };
    forward(route, Protocol::Sse, hash, server, (), raw).await.ok()
}

/// An SSE request sent raw on a plain TCP connection of its own, and the client connection the
/// stream takes over once the response head is in.
struct Raw<'a> {
    route: &'a Route,
    settings: &'a Settings,
    server: &'a Arc<ServerStats>,
    splicer: &'a Arc<dyn Datapath>,
    hijack: &'a Hijack,
    /// The request head, as sent to whichever backend is tried.
    head: Vec<u8>,
}

/// A TLS backend: its stream cannot be spliced, so the request is proxied the ordinary way.
struct NotPlain;

/// A backend's answer to the raw request: the head, the body bytes read with it, the connection.
struct Headed {
    head: Head,
    body_ahead: Bytes,
    upstream: TcpStream,
}

impl Exchange for Raw<'_> {
    /// Nothing to give back: the head is in `Raw`, ready for another backend.
    type Request = ();
    type Answer = Headed;
    type Pass = NotPlain;
    type Reply = Response<ResponseBody>;
    // What was logged when this case fell through to the ordinary way, which found none either.
    const NO_BACKEND: &'static str = "no eligible backend";
    const CONNECT_FAILED: &'static str = "connect failed (sse)";
    const TIMED_OUT: &'static str = "upstream timed out (sse)";

    async fn send(
        &mut self,
        backend: &Arc<Backend>,
        (): (),
        _: &mut InFlight,
    ) -> Result<Headed, Failure<(), NotPlain>> {
        let (route, settings) = (&self.route.name, self.settings);
        // A connection of its own, plain TCP: a TLS one cannot be spliced, so proxy normally.
        let mut upstream = match backend.pool.connect_io(settings.connect_timeout, Alpn::Http1).await {
            Ok(UpstreamIo::Tcp(tcp)) => tcp,
            Ok(UpstreamIo::Tls(_)) => return Err(Failure::Pass(NotPlain)),
            Err(e) => return Err(Failure::unsent(e, ())),
        };
        backend.connect_succeeded();
        if let Err(e) = upstream.write_all(&self.head).await {
            tracing::warn!(route = %route, backend = %backend.id, error = %e, "sse request failed");
            return Err(Failure::Local(error::bad_gateway()));
        }
        match tokio::time::timeout(settings.upstream_timeout, read_head(&mut upstream)).await {
            Err(_) => Err(Failure::Timeout(settings.upstream_timeout)),
            Ok(Err(e)) => {
                tracing::warn!(route = %route, backend = %backend.id, error = %e, "bad sse response head");
                Err(Failure::Local(error::bad_gateway()))
            }
            Ok(Ok((head, body_ahead))) => Ok(Headed { head, body_ahead, upstream }),
        }
    }

    fn status(&self, answer: &Headed) -> u16 {
        answer.head.status
    }

    fn replay(&mut self) -> Option<()> {
        // Bodiless, its head kept in `head`: sent again when its method is idempotent.
        let method = self.head.split(|&c| c == b' ').next().unwrap_or_default();
        http::Method::from_bytes(method).is_ok_and(|m| m.is_idempotent()).then_some(())
    }

    fn answer(self, answer: Headed, backend: &Arc<Backend>, guard: InFlight, started: Instant) -> Answered {
        let Headed { head, body_ahead, upstream } = answer;
        let client = match self.hijack.duplicate() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(route = %self.route.name, backend = %backend.id, error = %e,
                    "cannot take over the client connection");
                return error::bad_gateway().into();
            }
        };
        // From here the connection is ours: hyper's answer to this request goes nowhere.
        self.hijack.take_over();
        backend.observe_latency(started.elapsed());
        let tally = Tally { open: self.server.upgraded(), guard };
        let stream = Box::new(Stream {
            client,
            head: head.bytes,
            upstream,
            body_ahead,
            splicer: self.splicer.clone(),
            // A response stream: only the backend's bytes are spliced.
            policy: splice::Policy::of(self.settings, true),
            // Subscribed before the head goes out, so a disconnect from now on reaches this stream.
            closer: backend.closer.subscribe(),
            tally,
            route: self.route.name.clone(),
        });
        tokio::spawn(async move {
            // Boxed: a copied stream's whole life is large; an idle spliced stream's task keeps
            // only what follows.
            if let Some(spliced) = Box::pin(stream.start()).await {
                spliced.run().await;
            }
        });
        // What hyper writes for this goes nowhere; the client already has (or will have) ours.
        // `close` ends hyper's side after it: requests pipelined behind this one are not served.
        let mut resp = Response::new(ResponseBody::Local(None));
        resp.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        Answered { response: resp, status: head.status }
    }
}

/// A stream whose head is going out to the client.
struct Stream {
    client: TcpStream,
    head: Bytes,
    upstream: TcpStream,
    body_ahead: Bytes,
    splicer: Arc<dyn Datapath>,
    policy: splice::Policy,
    closer: tokio::sync::watch::Receiver<u64>,
    tally: Tally,
    route: String,
}

impl Stream {
    /// Writes the head and hands the body to the kernel: returns the flow when the kernel splices
    /// it; copies it to its end otherwise.
    async fn start(self: Box<Self>) -> Option<splice::Started> {
        let Stream { mut client, head, upstream, body_ahead, splicer, policy, closer, tally, route } = *self;
        client.write_all(&head).await.ok()?;
        drop(head);
        let flow = splice::Flow { client, client_ahead: Bytes::new(), upstream, upstream_ahead: body_ahead };
        match splice::start(splicer, flow, policy, closer.clone(), tally).await {
            Ok(started) => {
                tracing::debug!(route, "sse stream spliced");
                Some(started)
            }
            Err(unspliced) => {
                let splice::Unspliced { client, upstream, reason, tally } = *unspliced;
                tracing::debug!(route, %reason, "copying this sse stream");
                tally.copied();
                copy_one_way(upstream, client, closer, policy.idle).await;
                None
            }
        }
    }
}

/// Copies the stream to the client until it ends; the client sending anything ends it too, and
/// so does the idle limit.
async fn copy_one_way(
    mut upstream: TcpStream,
    mut client: TcpStream,
    mut closer: tokio::sync::watch::Receiver<u64>,
    idle: std::time::Duration,
) {
    let clock = super::idle::Clock::new();
    let (up_rd, _up_wr) = upstream.split();
    let mut up_rd = super::idle::Stamped::new(up_rd, &clock);
    let (mut cl_rd, mut cl_wr) = client.split();
    let mut probe = [0u8; 1];
    tokio::select! {
        // `half` shuts the client's side down at the stream's end.
        _ = super::copy::half(&mut up_rd, &mut cl_wr, true) => {}
        _ = cl_rd.read(&mut probe) => {}
        _ = closer.changed() => {}
        _ = clock.expired(idle) => {}
    }
}

/// The request as an HTTP/1.1 head for a connection of its own.
fn request_head<B>(req: &Request<B>) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(512);
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.put_slice(format!("{} {target} HTTP/1.1\r\n", req.method()).as_bytes());
    write_headers(&mut out, req.headers());
    out.put_slice(b"connection: close\r\n\r\n");
    out.to_vec()
}

fn write_headers(out: &mut BytesMut, h: &HeaderMap) {
    for (name, value) in h {
        if name == header::CONNECTION {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
}

/// A backend's response head, rewritten for the client.
struct Head {
    status: u16,
    bytes: Bytes,
}

/// Reads the response head; returns it (hop-by-hop headers removed except the body's own
/// framing, `Connection: close` added) and the body bytes read past it.
async fn read_head(s: &mut TcpStream) -> std::io::Result<(Head, Bytes)> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "backend closed before the head"));
        }
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(502);
                let mut map = HeaderMap::new();
                for h in resp.headers.iter() {
                    if let (Ok(n), Ok(v)) =
                        (http::HeaderName::from_bytes(h.name.as_bytes()), http::HeaderValue::from_bytes(h.value))
                    {
                        map.append(n, v);
                    }
                }
                if headers::both_framings(&map) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "both Content-Length and Transfer-Encoding",
                    ));
                }
                // The body's framing passes through with the body; everything else hop-by-hop goes.
                let te = map.get_all(header::TRANSFER_ENCODING).iter().cloned().collect::<Vec<_>>();
                headers::strip_hop_by_hop(&mut map, false, false);
                for v in te {
                    map.append(header::TRANSFER_ENCODING, v);
                }
                let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
                let mut out = BytesMut::with_capacity(len + 32);
                out.put_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
                write_headers(&mut out, &map);
                out.put_slice(b"connection: close\r\n\r\n");
                let ahead = buf.split_off(len).freeze();
                return Ok((Head { status, bytes: out.freeze() }, ahead));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "response head too long"));
            }
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())),
        }
    }
}
