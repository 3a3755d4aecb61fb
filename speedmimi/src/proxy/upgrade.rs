//! Protocol upgrades (WebSocket): the handshake is relayed on a dedicated backend connection;
//! after a 101 both sides are joined: spliced in the kernel when both are plain TCP and the
//! datapath can, copied in userspace otherwise (TLS, no eBPF, `ebpf.splice: false`, a failed
//! insertion), with the same behaviour seen from outside.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::{
    body::Incoming,
    client::conn::http1,
    upgrade::{OnUpgrade, Upgraded},
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

use super::{
    body::{InFlight, ResponseBody},
    copy::half,
    error,
    forward::{Answered, Exchange, Failure, forward},
    headers, idle,
    io::ClientIo,
    splice::{self, Tally},
};
use crate::{
    backend::Backend,
    datapath::Datapath,
    state::{Protocol, Route, Settings, Snapshot},
    stats::ServerStats,
    tls::Alpn,
    upstream::{RequestBody, UpstreamIo},
};

/// Relays an upgrade request: the handshake goes to a backend on a connection of its own; a 101
/// joins the client and that connection, any other answer goes back as an ordinary response.
pub async fn relay(
    snap: &Snapshot,
    route: &Route,
    mut req: Request<Incoming>,
    hash: u64,
    server: &Arc<ServerStats>,
    splicer: Option<Arc<dyn Datapath>>,
) -> Response<ResponseBody> {
    let client = hyper::upgrade::on(&mut req);
    let (parts, _body) = req.into_parts();
    let handshake = Handshake { route, settings: &snap.settings, server, client, splicer };
    let Ok(resp) = forward(route, Protocol::WebSocket, hash, server, parts, handshake).await;
    resp
}

/// An upgrade handshake with one backend, and what the client side needs once it succeeds.
struct Handshake<'a> {
    route: &'a Route,
    settings: &'a Settings,
    server: &'a Arc<ServerStats>,
    client: OnUpgrade,
    /// The datapath that splices the flow when both sides are plain TCP.
    splicer: Option<Arc<dyn Datapath>>,
}

impl Exchange for Handshake<'_> {
    type Request = http::request::Parts;
    type Answer = Response<Incoming>;
    type Pass = Infallible;
    type Reply = Response<ResponseBody>;
    const NO_BACKEND: &'static str = "no eligible backend for upgrade";
    const CONNECT_FAILED: &'static str = "connect failed";
    const TIMED_OUT: &'static str = "upstream timed out on upgrade";

    async fn send(
        &mut self,
        backend: &Arc<Backend>,
        parts: http::request::Parts,
        _guard: &mut InFlight,
    ) -> Result<Response<Incoming>, Failure<http::request::Parts>> {
        let (route, settings) = (&self.route.name, self.settings);
        let stream = match backend.pool.connect_io(settings.connect_timeout, Alpn::Http1).await {
            Ok(s) => s,
            Err(e) => return Err(Failure::unsent(e, parts)),
        };
        backend.connect_succeeded();
        let (mut sender, conn) = match http1::handshake(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(route = %route, backend = %backend.id, error = %e, "upstream handshake failed");
                return Err(Failure::Local(error::bad_gateway()));
            }
        };
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgrade connection ended");
            }
        });
        let mut up_req = Request::from_parts(parts, RequestBody::empty());
        *up_req.version_mut() = http::Version::HTTP_11;
        match tokio::time::timeout(settings.upstream_timeout, sender.send_request(up_req)).await {
            Err(_) => Err(Failure::Timeout(settings.upstream_timeout)),
            Ok(Err(e)) => {
                tracing::warn!(route = %route, backend = %backend.id, error = %e, "upgrade request failed");
                Err(Failure::Local(error::bad_gateway()))
            }
            Ok(Ok(r)) => Ok(r),
        }
    }

    fn status(&self, resp: &Response<Incoming>) -> u16 {
        resp.status().as_u16()
    }

    fn replay(&mut self) -> Option<http::request::Parts> {
        // The handshake's head went to the backend whole: an upgrade is not sent twice.
        None
    }

    fn answer(self, mut resp: Response<Incoming>, backend: &Arc<Backend>, guard: InFlight, _: Instant) -> Answered {
        if headers::both_framings(resp.headers()) {
            tracing::warn!(route = %self.route.name, backend = %backend.id,
                "upstream reply to an upgrade has both Content-Length and Transfer-Encoding");
            return error::bad_gateway().into();
        }
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The backend declined: its answer goes back as an ordinary response.
            let (mut p, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut p.headers, false, false);
            return Response::from_parts(p, ResponseBody::upstream(body, guard)).into();
        }
        let upstream = hyper::upgrade::on(&mut resp);
        let (mut p, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut p.headers, true, false);
        let pending = Box::new(Pending {
            client: self.client,
            upstream,
            splicer: self.splicer,
            policy: splice::Policy::of(self.settings, false),
            // Subscribed before the 101 goes out, so a disconnect from now on reaches this flow.
            closer: backend.closer.subscribe(),
            guard,
            server: self.server.clone(),
            route: self.route.name.clone(),
        });
        tokio::spawn(async move {
            // Boxed: everything before a flow is spliced (the upgrade, a copied flow's whole
            // life) is large; an idle spliced flow's task keeps only what follows.
            if let Some(spliced) = Box::pin(pending.join()).await {
                spliced.run().await;
            }
        });
        Response::from_parts(p, ResponseBody::Local(None)).into()
    }
}

/// An upgrade on its way: the 101 is going out to the client.
struct Pending {
    client: OnUpgrade,
    upstream: OnUpgrade,
    splicer: Option<Arc<dyn Datapath>>,
    policy: splice::Policy,
    /// Fires on a disconnect or drain of the backend.
    closer: watch::Receiver<u64>,
    guard: InFlight,
    server: Arc<ServerStats>,
    route: String,
}

impl Pending {
    /// Completes the upgrade on both sides and joins them: returns the flow when the kernel
    /// splices it; copies it to its end otherwise.
    async fn join(self: Box<Self>) -> Option<splice::Started> {
        let Pending { client, upstream, splicer, policy, closer, guard, server, route } = *self;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(route, error = %e, "upgrade did not complete");
                return None;
            }
        };
        let tally = Tally { open: server.upgraded(), guard };
        let (flow, datapath) = match plan(client, upstream, splicer) {
            Some(Plan::Splice(flow, datapath)) => (flow, datapath),
            Some(Plan::Copy(client, upstream, upstream_ahead)) => {
                tally.copied();
                copy(TokioIo::new(client), Bytes::new(), upstream, upstream_ahead, closer, policy.idle, &route).await;
                return None;
            }
            None => {
                tracing::error!(route, "upstream connection of unexpected type");
                return None;
            }
        };
        match splice::start(datapath, flow, policy, closer.clone(), tally).await {
            Ok(started) => {
                tracing::debug!(route, "flow spliced");
                Some(started)
            }
            Err(unspliced) => {
                let splice::Unspliced { client, upstream, reason, tally } = *unspliced;
                // Prefixes were written already and nothing is in flight: copy on from here.
                tracing::debug!(route, %reason, "copying this flow");
                tally.copied();
                copy(client, Bytes::new(), UpstreamIo::Tcp(upstream), Bytes::new(), closer, policy.idle, &route).await;
                None
            }
        }
    }
}

/// How an upgraded flow is joined.
enum Plan {
    /// Both sides are plain TCP and splicing is on.
    Splice(splice::Flow, Arc<dyn Datapath>),
    /// The client connection, the upstream one and what hyper read ahead from the upstream.
    Copy(Upgraded, UpstreamIo, Bytes),
}

/// Takes the sockets out of the upgraded connections. Not async, so that the connections' wrappers
/// (large) never become part of the flow task's state, which an idle flow holds for its life.
/// None when the upstream connection is not ours (never expected).
fn plan(client: Upgraded, upstream: Upgraded, splicer: Option<Arc<dyn Datapath>>) -> Option<Plan> {
    // Our upstream connections are always `UpstreamIo`; only plain TCP on both sides splices.
    let upstream = upstream.downcast::<TokioIo<UpstreamIo>>().ok()?;
    let (up_io, upstream_ahead) = (upstream.io.into_inner(), upstream.read_buf);
    let (splicer, up_tcp) = match (splicer, up_io) {
        (Some(s), UpstreamIo::Tcp(tcp)) => (s, tcp),
        (_, up_io) => return Some(Plan::Copy(client, up_io, upstream_ahead)),
    };
    match client.downcast::<TokioIo<ClientIo<TcpStream>>>() {
        Ok(client) => {
            let (client_tcp, unread) = client.io.into_inner().into_parts();
            // Sniffed bytes hyper never asked for (none in practice: a head is longer) go first.
            let client_ahead = match unread.is_empty() {
                true => client.read_buf,
                false => [unread, client.read_buf].concat().into(),
            };
            let flow = splice::Flow { client: client_tcp, client_ahead, upstream: up_tcp, upstream_ahead };
            Some(Plan::Splice(flow, splicer))
        }
        Err(client) => Some(Plan::Copy(client, UpstreamIo::Tcp(up_tcp), upstream_ahead)),
    }
}

/// Userspace copy in both directions, after writing what each side had already sent.
async fn copy<C>(
    client: C,
    client_ahead: Bytes,
    upstream: UpstreamIo,
    upstream_ahead: Bytes,
    mut closer: watch::Receiver<u64>,
    idle: Duration,
    route: &str,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let clock = idle::Clock::new();
    let (mut client, mut upstream) = (idle::Stamped::new(client, &clock), idle::Stamped::new(upstream, &clock));
    let copied = async {
        if !client_ahead.is_empty() {
            upstream.write_all(&client_ahead).await?;
        }
        if !upstream_ahead.is_empty() {
            client.write_all(&upstream_ahead).await?;
        }
        // Even empty, these may be views of a connection's whole read buffer, which an idle flow
        // would otherwise hold for its life.
        drop((client_ahead, upstream_ahead));
        let ((cr, cw), (ur, uw)) = (tokio::io::split(client), tokio::io::split(upstream));
        tokio::try_join!(half(cr, uw, true), half(ur, cw, true))
    };
    tokio::select! {
        r = copied => match r {
            Ok((up, down)) => tracing::debug!(route, up, down, "upgraded flow closed"),
            Err(e) => tracing::debug!(route, error = %e, "upgraded flow ended with error"),
        },
        _ = closer.changed() => tracing::info!(route, "upgraded flow closed by disconnect or drain"),
        _ = clock.expired(idle) => tracing::debug!(route, ?idle, "idle upgraded flow closed"),
    }
}
