//! Protocol upgrades (WebSocket): the handshake is relayed on a dedicated backend connection;
//! after a 101 both sides are joined and bytes are copied until either side closes.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;

use super::{
    body::{InFlight, RequestBody, ResponseBody},
    error, headers,
    service::pick,
};
use crate::{
    backend::Backend,
    state::{Protocol, Route, Snapshot},
    stats::ServerStats,
    tls::Alpn,
};

/// Copy buffer per direction: large enough for bulk streams, small enough for many idle flows.
const COPY_BUF: usize = 64 * 1024;

pub async fn relay(
    snap: &Snapshot,
    route: &Route,
    mut req: Request<Incoming>,
    hash: u64,
    server: &Arc<ServerStats>,
) -> Response<ResponseBody> {
    let settings = &snap.settings;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _body) = req.into_parts();
    let mut failed: Option<Arc<Backend>> = None;
    for attempt in 0..2 {
        let Some((index, backend)) = pick(route, Protocol::WebSocket, hash, failed.as_deref()) else {
            tracing::warn!(route = %route.name, upstream = %route.upstream.name, "no eligible backend for upgrade");
            return if failed.is_some() { error::bad_gateway() } else { error::unavailable() };
        };
        let guard = InFlight::new(backend.clone(), server.clone());
        let started = std::time::Instant::now();
        let stream = match backend.pool.connect_io(settings.connect_timeout, Alpn::Http1).await {
            Ok(s) => s,
            Err(e) => {
                backend.connect_failed();
                tracing::warn!(route = %route.name, backend = %backend.id, attempt, error = %e, "connect failed");
                failed = Some(backend);
                continue;
            }
        };
        backend.connect_succeeded();
        let (mut sender, conn) = match http1::handshake(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(route = %route.name, backend = %backend.id, error = %e, "upstream handshake failed");
                return error::bad_gateway();
            }
        };
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgrade connection ended");
            }
        });
        let mut up_req = Request::from_parts(parts, RequestBody::empty());
        *up_req.version_mut() = http::Version::HTTP_11;
        let resp = match tokio::time::timeout(settings.upstream_timeout, sender.send_request(up_req)).await {
            Err(_) => {
                tracing::warn!(route = %route.name, backend = %backend.id, "upstream timed out on upgrade");
                return error::gateway_timeout();
            }
            Ok(Err(e)) => {
                tracing::warn!(route = %route.name, backend = %backend.id, error = %e, "upgrade request failed");
                return error::bad_gateway();
            }
            Ok(Ok(r)) => r,
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The backend declined: its answer goes back as an ordinary response.
            let (mut p, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut p.headers, false, false);
            return Response::from_parts(p, ResponseBody::upstream(body, guard));
        }
        let mut resp = resp;
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (mut p, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut p.headers, true, false);
        super::service::record(route, index, &backend, StatusCode::SWITCHING_PROTOCOLS.as_u16(), started);
        let route_name = route.name.clone();
        let server = server.clone();
        // Subscribed before the 101 goes out, so a disconnect from now on reaches this flow.
        let mut closer = backend.closer.subscribe();
        tokio::spawn(async move {
            let _guard = guard;
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(route = %route_name, error = %e, "upgrade did not complete");
                    return;
                }
            };
            let _open = server.upgraded();
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUF, COPY_BUF) => match r {
                    Ok((up, down)) => tracing::debug!(route = %route_name, up, down, "upgraded flow closed"),
                    Err(e) => tracing::debug!(route = %route_name, error = %e, "upgraded flow ended with error"),
                },
                _ = closer.changed() => tracing::info!(route = %route_name, "upgraded flow closed by disconnect or drain"),
            }
        });
        return Response::from_parts(p, ResponseBody::Local(None));
    }
    error::bad_gateway()
}
