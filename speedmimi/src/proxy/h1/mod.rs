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

pub(crate) mod bridge;
pub(crate) mod chunked;
mod request;
mod upstream;

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{StatusCode, header};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(crate) use self::upstream::{Framing, response_head};
use self::{
    request::prepare,
    upstream::{Plain, Reply, write_local},
};
use super::{
    error,
    forward::forward,
    io::ClientIo,
    service::{Handler, Listener, RequestLine},
};
use crate::{
    shutdown::Shutdown,
    state::{Protocol, Route},
};

/// Request heads with more fields go to hyper (whose own limit, and 431, is the same).
pub(super) const MAX_HEADERS: usize = 100;
/// Request bodies up to this are read whole before a backend is picked (so the backend never
/// waits on a slow client); longer ones go to hyper, which streams them.
pub(super) const MAX_BODY: u64 = 64 * 1024;
/// A backend's response head longer than this is a bad gateway.
pub(super) const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Bytes read from a backend at a time while relaying a body.
pub(super) const RELAY_CHUNK: usize = 32 * 1024;
/// Names a request's `Connection` may list for removal before it goes to hyper instead.
pub(super) const MAX_LISTED: usize = 8;

/// Whether the own engine can speak to every backend of `route` (none runs TLS).
pub(super) fn plain_backends(route: &Route) -> bool {
    route.upstream.backends.iter().all(|b| b.pool.is_plain())
}

/// How a connection left this engine.
pub(super) enum Served<T> {
    /// Closed (the client left, asked to close, timed out, or the server stopped).
    Closed,
    /// hyper serves the rest; the unread request bytes are back in the connection.
    Hyper(ClientIo<T>),
}

/// What a connection keeps between requests: its buffers, grown to what its exchanges need.
#[derive(Default)]
pub(super) struct Buffers {
    /// Bytes read from the client; `pos` is where the next request head starts.
    pub(super) input: Vec<u8>,
    pub(super) pos: usize,
    /// The head going out (the request's to the backend, then the response's to the client),
    /// and re-chunked body bytes.
    pub(super) out: Vec<u8>,
    /// Bytes read from the backend.
    pub(super) upstream: Vec<u8>,
}

/// Buffers of ended connections, kept for the next ones on this thread (a worker's runtime
/// is one thread): a connection per request then allocates no buffers. At most `SPARE_MAX`,
/// each vector at most `SPARE_BYTES` (a larger one is freed rather than kept).
const SPARE_MAX: usize = 16;
const SPARE_BYTES: usize = 64 * 1024;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<Buffers>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A connection's buffers, a spare set when there is one; given back when dropped (also when
/// the connection's task is).
struct Held(Buffers);

impl Held {
    fn take() -> Held {
        let spare = SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten();
        Held(spare.unwrap_or_else(|| Buffers { input: Vec::with_capacity(4096), ..Default::default() }))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut b = std::mem::take(&mut self.0);
        if [&b.input, &b.out, &b.upstream].iter().any(|v| v.capacity() > SPARE_BYTES) {
            return;
        }
        b.input.clear();
        b.out.clear();
        b.upstream.clear();
        b.pos = 0;
        // `try_with`: a connection dropped while its thread exits finds the set gone.
        let _ = SPARE.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < SPARE_MAX {
                spare.push(b);
            }
        });
    }
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
    let mut held = Held::take();
    let b = &mut held.0;
    loop {
        // The next head, whole; the connection's deadline for it is `io`'s (408 or close).
        // Each byte is looked at once however the head trickles in.
        let mut scanned = 0;
        while !head_complete(&b.input[b.pos..], &mut scanned) {
            if b.input.len() - b.pos >= max_head {
                return hand_over(io, handler, b);
            }
            compact(b);
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
            s = exchange(&mut io, handler, b) => s,
            _ = async { stop.fired().await; tokio::time::sleep(drain).await } => Step::Close,
        };
        drop(open);
        match step {
            Step::Next if !stop.fired => {}
            Step::Next | Step::Close => {
                // TLS ends with its close_notify; a plain connection's close sends the FIN
                // itself, and a shutdown before it was one more syscall per connection.
                if handler.listener == Listener::Https {
                    let _ = io.shutdown().await;
                }
                return Served::Closed;
            }
            Step::Hyper => return hand_over(io, handler, b),
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
pub(super) struct Prepared<'s> {
    pub(super) head_len: usize,
    pub(super) body_len: usize,
    pub(super) route: &'s Route,
    pub(super) hash: u64,
    /// The client asked to close after this exchange.
    pub(super) close: bool,
    pub(super) head_method: bool,
    /// Safe to send again if a reused backend connection turns out closed.
    pub(super) idempotent: bool,
    pub(super) line: Option<RequestLine>,
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
            // Kept only for the access log: no reference count taken per request otherwise.
            let backend = p.line.as_ref().map(|_| relay.guard.backend().clone());
            let ok = relay.run(io, &mut b.out, &mut b.upstream).await;
            (if ok && !p.close { Step::Next } else { Step::Close }, sent, backend)
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

#[cfg(test)]
mod tests {
    use super::{
        request::{plain_host, plain_target},
        *,
    };

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
