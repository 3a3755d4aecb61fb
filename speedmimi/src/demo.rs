//! The demo and test origin (`speedmimi demo-backend`): answers with its id, serves `/health`,
//! a WebSocket echo at `/ws`, an SSE ticker at `/events`, and a few endpoints the tests use to
//! see what reached a backend (`/headers`, `/echo`) and to slow it down (`/slow`, `delay_ms`),
//! and `/bytes?n=N`, a body of N bytes that costs the origin little (the benchmarks' response).
//! HTTP/1.1 and prior-knowledge h2c; gRPC-framed requests are echoed with trailers.
//!
//! The catch-all answer (`/` and any path not named above) is the one the balance benchmark
//! shapes: it waits `delay_ms`, then for the end of a stall if one is under way, unless its
//! [`Faults`] answer it 503 at once or reset its connection first. `/hits` reports how many
//! requests reached it, whatever became of them, so a benchmark can read each origin's share
//! without going through the proxy.
use std::{
    convert::Infallible,
    os::fd::{AsRawFd, BorrowedFd},
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    net::TcpListener,
    sync::{Notify, mpsc},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{handshake::derive_accept_key, protocol::Role},
};

use crate::shutdown::Shutdown;

mod faults;

pub use faults::{Fate, Faults, Stall};

/// Largest body `/bytes` serves.
const MAX_BYTES: usize = 16 << 20;

/// A demo origin. Counters let tests see exactly what reached it.
pub struct DemoBackend {
    pub id: String,
    /// Requests received (any path).
    pub requests: AtomicU64,
    /// TCP connections accepted.
    pub connections: AtomicU64,
    /// TCP connections open now (accepted and not yet closed by either side).
    pub open_connections: AtomicU64,
    /// `/health` answers 200 while true, 503 otherwise.
    pub healthy: AtomicBool,
    /// Extra delay (ms) before answering `/`.
    pub delay_ms: AtomicU64,
    /// Requests that reached the catch-all answer (`/`), whatever their fate; served at `/hits`.
    pub hits: AtomicU64,
    /// Stalls, 503s and resets of the catch-all answer.
    faults: Faults,
    /// Where the stall schedule starts.
    started: Instant,
}

impl DemoBackend {
    pub fn new(id: impl Into<String>) -> Arc<Self> {
        Self::with_faults(id, Faults::default())
    }

    pub fn with_faults(id: impl Into<String>, faults: Faults) -> Arc<Self> {
        Arc::new(DemoBackend {
            id: id.into(),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            delay_ms: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            faults,
            started: Instant::now(),
        })
    }

    /// Serves until `shutdown` fires, then closes every connection.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(20)).await; continue; }
                },
                _ = shutdown.wait() => return,
            };
            let _ = stream.set_nodelay(true);
            self.connections.fetch_add(1, Relaxed);
            self.open_connections.fetch_add(1, Relaxed);
            let me = self.clone();
            let builder = builder.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let counter = me.clone();
                let fd = stream.as_raw_fd();
                let reset = Arc::new(Notify::new());
                let asked = reset.clone();
                let service = service_fn(move |req| me.clone().handle(req, asked.clone()));
                {
                    let serve = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::pin!(serve);
                    // A stopped origin drops its open connections too, as a crashed one would.
                    tokio::select! {
                        _ = &mut serve => {}
                        _ = stop.wait() => {}
                        _ = reset.notified() => {
                            // SAFETY: `serve` owns the stream, so `fd` stays open until the end of this block.
                            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                            // Closing with a zero linger sends RST instead of FIN.
                            let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                        }
                    }
                }
                counter.open_connections.fetch_sub(1, Relaxed);
            });
        }
    }

    /// Answers one request; `reset` asks the connection's task to reset the connection.
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        reset: Arc<Notify>,
    ) -> Result<Response<DemoBody>, Infallible> {
        self.requests.fetch_add(1, Relaxed);
        let is_grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if is_grpc {
            return Ok(self.grpc_echo(req));
        }
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let resp = match path.as_str() {
            "/health" => {
                if self.healthy.load(Relaxed) {
                    text(StatusCode::OK, "ok\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
                }
            }
            "/ws" => self.websocket(req),
            "/events" => self.events(&query),
            "/headers" => {
                let mut out = String::new();
                for (k, v) in req.headers() {
                    out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("<binary>")));
                }
                text(StatusCode::OK, out)
            }
            "/echo" => {
                // Streams the request body back as it arrives.
                let (tx, body) = DemoBody::channel();
                tokio::spawn(echo_data(req.into_body(), tx));
                Response::new(body)
            }
            "/bytes" => {
                // A request body (the POST benchmark's) is read to its end and dropped.
                let mut body = req.into_body();
                while let Some(Ok(_)) = body.frame().await {}
                match param(&query, "n").filter(|&n| n <= MAX_BYTES as u64) {
                    Some(n) => text(StatusCode::OK, filler().slice(..n as usize)),
                    None => text(StatusCode::BAD_REQUEST, format!("/bytes needs n=0..={MAX_BYTES}\n")),
                }
            }
            "/hits" => text(StatusCode::OK, format!("{}\n", self.hits.load(Relaxed))),
            "/slow" => {
                let ms = param(&query, "ms").unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, format!("{}\n", self.id))
            }
            _ => self.catch_all(reset).await,
        };
        let mut resp = resp;
        if let Ok(v) = HeaderValue::try_from(self.id.as_str()) {
            resp.headers_mut().insert("x-backend-id", v);
        }
        Ok(resp)
    }

    /// The answer `/` gets: its id after the delay and any stall, or the fault its number draws.
    async fn catch_all(&self, reset: Arc<Notify>) -> Response<DemoBody> {
        match self.faults.fate(self.hits.fetch_add(1, Relaxed)) {
            Fate::Reset => {
                reset.notify_one();
                // The connection's task drops this future with the connection.
                std::future::pending().await
            }
            Fate::Unavailable => text(StatusCode::SERVICE_UNAVAILABLE, format!("{} unavailable\n", self.id)),
            Fate::Answer => {
                let delay = self.delay_ms.load(Relaxed);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if let Some(stall) = self.faults.stall {
                    let wait = stall.wait(self.started.elapsed());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                text(StatusCode::OK, format!("{}\n", self.id))
            }
        }
    }

    /// WebSocket echo: every text or binary message comes back unchanged.
    fn websocket(&self, mut req: Request<Incoming>) -> Response<DemoBody> {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return text(StatusCode::BAD_REQUEST, "not a websocket handshake\n");
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else { return };
            let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    // tungstenite queued the Close reply when it read the peer's Close; send it.
                    let _ = ws.flush().await;
                    return;
                }
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::new(DemoBody::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            "sec-websocket-accept",
            HeaderValue::try_from(derive_accept_key(key.as_bytes())).expect("base64 is a valid header value"),
        );
        resp
    }

    /// SSE ticker: `count` events (default: unending), `interval_ms` apart (default 1000).
    fn events(&self, query: &str) -> Response<DemoBody> {
        let count = param(query, "count").unwrap_or(u64::MAX);
        let interval = Duration::from_millis(param(query, "interval_ms").unwrap_or(1000));
        let (tx, body) = DemoBody::channel();
        let id = self.id.clone();
        tokio::spawn(async move {
            for i in 0..count {
                let event = format!("id: {i}\nevent: tick\ndata: {id} {i}\n\n");
                if tx.send(Frame::data(Bytes::from(event))).await.is_err() {
                    return;
                }
                // A zero interval streams as fast as the client reads (a timer would still tick).
                if i + 1 < count && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
            }
        });
        let mut resp = Response::new(body);
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    /// Echoes each length-prefixed gRPC message, then trailers `grpc-status: 0` and the id.
    fn grpc_echo(&self, req: Request<Incoming>) -> Response<DemoBody> {
        let (tx, body) = DemoBody::channel();
        let id = self.id.clone();
        let incoming = req.into_body();
        tokio::spawn(async move {
            let Some(tx) = echo_data(incoming, tx).await else { return };
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("grpc-message", HeaderValue::from_static("ok"));
            if let Ok(v) = HeaderValue::try_from(id) {
                trailers.insert("x-backend-id", v);
            }
            let _ = tx.send(Frame::trailers(trailers)).await;
        });
        let mut resp = Response::new(body);
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        resp
    }
}

fn param(query: &str, name: &str) -> Option<u64> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).and_then(|(_, v)| v.parse().ok())
}

/// The bytes `/bytes` slices its answers from: built once, so an answer costs a reference count.
fn filler() -> &'static Bytes {
    static FILLER: OnceLock<Bytes> = OnceLock::new();
    FILLER.get_or_init(|| Bytes::from(vec![b'x'; MAX_BYTES]))
}

/// Sends the data frames of `incoming` back on `tx` as they arrive; the sender once the body
/// ended, None when the client went away.
async fn echo_data(mut incoming: Incoming, tx: mpsc::Sender<Frame<Bytes>>) -> Option<mpsc::Sender<Frame<Bytes>>> {
    while let Some(Ok(frame)) = incoming.frame().await {
        if let Ok(data) = frame.into_data()
            && tx.send(Frame::data(data)).await.is_err()
        {
            return None;
        }
    }
    Some(tx)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<DemoBody> {
    let mut r = Response::new(DemoBody::full(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// A body that is either complete or fed frame by frame from a task.
pub enum DemoBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Frame<Bytes>>),
}

impl DemoBody {
    fn empty() -> Self {
        DemoBody::Full(None)
    }
    fn full(b: Bytes) -> Self {
        DemoBody::Full(Some(b))
    }
    fn channel() -> (mpsc::Sender<Frame<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(16);
        (tx, DemoBody::Channel(rx))
    }
}

impl Body for DemoBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            DemoBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            DemoBody::Channel(rx) => rx.poll_recv(cx).map(|f| f.map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, DemoBody::Full(None))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            DemoBody::Full(b) => http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            DemoBody::Channel(_) => http_body::SizeHint::default(),
        }
    }
}
