//! HTTP/2 requests to HTTP/1.1 backends through the own engine's upstream exchange. hyper still
//! serves the client's HTTP/2 connection; a bodiless request of a standard method to a route
//! whose backends are all plain goes up on a pooled raw connection its stream's task writes
//! and reads itself (`Plain`), instead of through hyper's client (a connection task and a
//! channel per exchange). The response goes back to hyper as its client would have given it:
//! the same status and fields (hop-by-hop ones and those `Connection` lists removed, as
//! `headers::strip_hop_by_hop` does), the same body bytes, a chunked body's trailers.

use std::{
    convert::Infallible,
    io,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};

use super::{
    MAX_HEADERS, RELAY_CHUNK, chunked,
    request::put_header,
    upstream::{Answer, Framing, Plain, read_head},
};
use crate::{
    backend::Backend,
    proxy::{
        body::{InFlight, ResponseBody},
        error,
        forward::{Answered, Exchange, Failure, forward},
        service::BackendTag,
    },
    state::{Protocol, Route, Settings},
    stats::ServerStats,
    upstream::{BoxError, RawConn},
};

/// Whether the bridge forwards `req` (an HTTP/2 request, its head checked and edited for the
/// backend): no body, a standard method, an origin-form target, only plain backends.
pub(crate) fn takes<B: http_body::Body>(route: &Route, req: &Request<B>) -> bool {
    req.version() == Version::HTTP_2
        && req.body().is_end_stream()
        && [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE, Method::POST, Method::PATCH]
            .contains(req.method())
        && req.uri().path().starts_with('/')
        && super::plain_backends(route)
}

/// Forwards a request `takes` accepted to a backend of `route`, as `Handler::proxy` does.
pub(crate) async fn forward_h2<B>(
    route: &Route,
    req: Request<B>,
    hash: u64,
    server: &Arc<ServerStats>,
    settings: &Settings,
) -> Response<ResponseBody> {
    let mut out = Vec::with_capacity(512);
    head(&req, &mut out);
    let mut upstream = Vec::new();
    let method = req.method();
    let plain = Plain {
        route,
        settings,
        out: &mut out,
        upstream: &mut upstream,
        body: &[],
        head_method: method == Method::HEAD,
        idempotent: method.is_idempotent(),
        close: false,
    };
    let Ok(resp) = forward(route, Protocol::Http, hash, server, (), Bridge(plain)).await;
    resp
}

/// The request head hyper's client would write for `req`: its method, target and fields as
/// they are, in their order.
fn head<B>(req: &Request<B>, out: &mut Vec<u8>) {
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// The own engine's exchange, answering with a response for hyper's HTTP/2 server.
struct Bridge<'a>(Plain<'a>);

impl Exchange for Bridge<'_> {
    type Request = ();
    type Answer = Answer;
    type Pass = Infallible;
    type Reply = Response<ResponseBody>;
    const NO_BACKEND: &'static str = <Plain<'_> as Exchange>::NO_BACKEND;
    const CONNECT_FAILED: &'static str = <Plain<'_> as Exchange>::CONNECT_FAILED;
    const TIMED_OUT: &'static str = <Plain<'_> as Exchange>::TIMED_OUT;

    async fn send(&mut self, backend: &Arc<Backend>, (): (), guard: &mut InFlight) -> Result<Answer, Failure<()>> {
        self.0.send(backend, (), guard).await
    }

    fn status(&self, answer: &Answer) -> u16 {
        self.0.status(answer)
    }

    fn replay(&mut self) -> Option<()> {
        self.0.replay()
    }

    fn answer(self, answer: Answer, backend: &Arc<Backend>, guard: InFlight, started: Instant) -> Answered {
        backend.connect_succeeded();
        backend.observe_latency(started.elapsed());
        let Plain { route, settings, upstream, head_method, .. } = self.0;
        let read = Bytes::from(std::mem::take(upstream));
        match response(&read, answer.head_len, head_method) {
            Ok((mut parts, framing, reusable)) => {
                if settings.tag_backend {
                    parts.extensions.insert(BackendTag(backend.clone()));
                }
                let ahead = read.slice(answer.head_len..);
                let body = RawBody::new(answer.conn, guard, framing, ahead, reusable);
                Response::from_parts(parts, ResponseBody::Raw(Box::new(body))).into()
            }
            Err(why) => {
                // Dropped with its guard: the connection is not reused.
                tracing::warn!(route = %route.name, backend = %backend.id, "{why}");
                error::bad_gateway().into()
            }
        }
    }
}

/// The response head at the start of `read` (`head_len` bytes) as hyper's client gives it to
/// the proxy, its field values views of `read`; the body's framing; whether the connection may
/// be reused.
fn response(
    read: &Bytes,
    head_len: usize,
    head_method: bool,
) -> Result<(http::response::Parts, Framing, bool), &'static str> {
    read_head(&read[..head_len], head_method, |resp, scanned| {
        let mut headers = HeaderMap::with_capacity(resp.headers.len());
        for h in resp.headers.iter().filter(|h| !scanned.drops(h.name)) {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "invalid upstream header name")?;
            let value =
                HeaderValue::from_maybe_shared(read.slice_ref(h.value)).map_err(|_| "invalid upstream header value")?;
            headers.append(name, value);
        }
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = StatusCode::from_u16(scanned.status).map_err(|_| "invalid upstream status")?;
        parts.headers = headers;
        Ok((parts, scanned.framing, scanned.reusable))
    })
}

/// A backend's response body read from its raw connection by its framing. The connection goes
/// back to the pool when the body ended exactly where the next response may begin, and the
/// backend's in-flight slot is released when the body ends or is dropped.
pub struct RawBody {
    conn: Option<RawConn>,
    guard: Option<InFlight>,
    framing: Framing,
    /// Body bytes left to read (`Framing::Length`).
    left: u64,
    /// Bytes read and not yet handed on.
    ahead: Bytes,
    read: BytesMut,
    decoder: chunked::Decoder,
    reusable: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
}

impl RawBody {
    fn new(conn: RawConn, guard: InFlight, framing: Framing, ahead: Bytes, reusable: bool) -> RawBody {
        let left = if let Framing::Length(n) = framing { n } else { 0 };
        let mut body = RawBody {
            conn: Some(conn),
            guard: Some(guard),
            framing,
            left,
            ahead,
            read: BytesMut::new(),
            decoder: chunked::Decoder::keeping_trailers(),
            reusable,
            trailers: None,
            ended: false,
        };
        // hyper may never poll a body that is already at its end.
        if framing == Framing::Empty || framing == Framing::Length(0) {
            body.end();
        }
        body
    }

    /// The body ended: its connection goes back to the pool if nothing followed it.
    fn end(&mut self) {
        self.ended = true;
        let exact = self.ahead.is_empty() && self.read.is_empty();
        if let (Some(conn), Some(guard)) = (self.conn.take(), self.guard.take())
            && self.reusable
            && exact
        {
            guard.backend().pool.put_raw(conn);
        }
    }

    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.ended = true;
        self.conn = None;
        self.guard = None;
        Poll::Ready(Some(Err(why.into())))
    }

    /// Reads more from the backend into `ahead`; Ok(false) at its end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let Some(conn) = self.conn.as_mut() else { return Poll::Ready(Ok(false)) };
        self.read.reserve(RELAY_CHUNK);
        loop {
            ready!(conn.stream.poll_read_ready(cx))?;
            match conn.stream.try_read_buf(&mut self.read) {
                Ok(n) => {
                    self.ahead = self.read.split().freeze();
                    return Poll::Ready(Ok(n > 0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// The next frame from the bytes in `ahead`, if they make one, counted as sent; the end
    /// noted when reached (after the count: the end releases the guard that counts).
    fn take(&mut self) -> Result<Option<Bytes>, &'static str> {
        let (data, done) = match self.framing {
            Framing::Empty => (Bytes::new(), true),
            Framing::Length(_) => {
                let n = (self.ahead.len() as u64).min(self.left) as usize;
                self.left -= n as u64;
                (self.ahead.split_to(n), self.left == 0)
            }
            Framing::Close => (std::mem::take(&mut self.ahead), false),
            Framing::Chunked => {
                let mut data = BytesMut::new();
                let done = self
                    .decoder
                    .feed(&self.ahead, |piece| data.extend_from_slice(piece))
                    .map_err(|()| "invalid chunked body from upstream")?;
                self.ahead = Bytes::new();
                if done {
                    self.reusable &= self.decoder.done_exactly();
                    self.trailers = trailers(self.decoder.trailers().unwrap_or_default())?;
                }
                (data.freeze(), done)
            }
        };
        if let Some(g) = &self.guard {
            g.count_sent(data.len() as u64);
        }
        if done {
            self.end();
        }
        Ok((!data.is_empty()).then_some(data))
    }

    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.ended {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if !self.ahead.is_empty() {
                match self.take() {
                    Err(why) => return self.fail(why),
                    Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(None) => continue,
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) if self.framing == Framing::Close => {
                    self.reusable = false;
                    self.end();
                }
                Ok(false) => return self.fail("upstream closed before the body's end"),
                Err(_) => return self.fail("upstream body read failed"),
            }
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.ended && self.trailers.is_none()
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(_) if !self.ended => SizeHint::with_exact(self.left),
            _ if self.ended => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A chunked body's trailer fields as hyper's client reads them; None when there are none.
fn trailers(section: &[u8]) -> Result<Option<HeaderMap>, &'static str> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut slots) {
        Ok(httparse::Status::Complete((_, []))) => Ok(None),
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields.iter() {
                let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| "invalid upstream trailer")?;
                let value = HeaderValue::from_bytes(f.value).map_err(|_| "invalid upstream trailer")?;
                map.append(name, value);
            }
            Ok(Some(map))
        }
        _ => Err("invalid upstream trailers"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_is_hypers_and_the_response_drops_what_hyper_strips() {
        let req = Request::builder()
            .method(Method::GET)
            .uri("/a?b=c")
            .header("host", "x")
            .header("x-a", "1")
            .header("x-a", "2")
            .body(())
            .unwrap();
        let mut out = Vec::new();
        head(&req, &mut out);
        assert_eq!(out, b"GET /a?b=c HTTP/1.1\r\nhost: x\r\nx-a: 1\r\nx-a: 2\r\n\r\n");

        let raw = Bytes::from_static(
            b"HTTP/1.1 200 OK\r\nConnection: x-gone, close\r\nX-Gone: 1\r\nKeep-Alive: t=1\r\nX-Kept: a\r\nX-Kept: b\r\nContent-Length: 2\r\n\r\nhi",
        );
        let (parts, framing, reusable) = response(&raw, raw.len() - 2, false).unwrap();
        assert_eq!((parts.status.as_u16(), framing, reusable), (200, Framing::Length(2), false));
        let kept: Vec<_> = parts.headers.iter().map(|(n, v)| format!("{n}: {}", v.to_str().unwrap())).collect();
        assert_eq!(kept, ["x-kept: a", "x-kept: b", "content-length: 2"]);
    }

    #[test]
    fn trailers_are_read_as_fields() {
        assert_eq!(trailers(b"\r\n"), Ok(None));
        let map = trailers(b"X-T: 1\r\nY: 2\r\n\r\n").unwrap().unwrap();
        assert_eq!((map["x-t"].as_bytes(), map["y"].as_bytes()), (&b"1"[..], &b"2"[..]));
        assert!(trailers(b"bad line\r\n\r\n").is_err());
    }
}
