//! `/api/v1/stats/server` and `/api/v1/stats/backend`.

use std::sync::atomic::Ordering::Relaxed;

use axum::{Json, extract::State as AxState};
use serde_json::{Value, json};

use super::{Admin, AdminError, BackendRef, Query, backends::view};

pub async fn server(AxState(admin): AxState<Admin>) -> Json<Value> {
    let s = &admin.state.stats;
    let t = s.traffic.report();
    Json(json!({
        "uptime_seconds": s.started.elapsed().as_secs_f64(),
        "connections": {
            "open": s.connections_open.load(Relaxed),
            "total": s.connections_total.load(Relaxed),
            "refused_per_client": s.refused_per_client.load(Relaxed),
            "http1_handovers": s.http1_handovers.load(Relaxed),
        },
        "requests": t.requests,
        "requests_h2_bridged": s.h2_bridged.load(Relaxed),
        "status": t.status,
        "latency": t.latency,
        "bytes": t.bytes,
        "upgraded_flows": {
            "open": s.upgraded_open.load(Relaxed),
            "total": s.upgraded_total.load(Relaxed),
        },
        "spliced_flows": {
            "open": admin.state.datapath.spliced_sockets() / 2,
            "total": s.spliced_flows.load(Relaxed),
            "parked": s.spliced_parked.load(Relaxed),
        },
        "copied_flows_total": s.copied_flows.load(Relaxed),
        "datapath": admin.state.datapath.describe(),
    }))
}

pub async fn backend(AxState(admin): AxState<Admin>, Query(q): Query<BackendRef>) -> Result<Json<Value>, AdminError> {
    let snap = admin.state.snapshot();
    let up = snap
        .upstreams
        .get(&q.upstream)
        .ok_or_else(|| AdminError::NotFound(format!("unknown upstream {:?}", q.upstream)))?;
    let b = up.backends.iter().find(|b| b.id == q.backend_id).ok_or_else(|| {
        AdminError::NotFound(format!("unknown backend {:?} in upstream {:?}", q.backend_id, q.upstream))
    })?;
    let t = b.traffic.report();
    Ok(Json(json!({
        "backend": view(b, &*admin.state.datapath),
        "requests": t.requests,
        "status": t.status,
        "latency": t.latency,
        "bytes": t.bytes,
        "performance_report": b.last_report.load_full().map(|r| json!({
            "report": *r,
            "age_seconds": b.report_age().map(|a| a.as_secs_f64()),
            "factor": b.report_factor(),
        })),
    })))
}
