//! `/api/v1/backends*` and `/api/v1/report`: list, add, remove (drain), update, disconnect,
//! and performance reports. Each change is one `Command`.

use std::sync::atomic::Ordering::Relaxed;

use axum::{Json, extract::State as AxState, http::StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Admin, AdminError, BackendRef, Body, Query, name};
use crate::{
    backend::Backend,
    command::{Command, PerformanceReport},
    config::BackendSection,
    datapath::Datapath,
};

/// A backend as operators see it: settings, health and live counters.
pub fn view(b: &Backend, dp: &dyn Datapath) -> Value {
    let conf = b.conf.load();
    let (ejections, ejected_for_ms) = b.standing.ejections();
    json!({
        "id": b.id,
        "upstream": b.upstream,
        "name": conf.name,
        "host": conf.host,
        "port": conf.port,
        "scheme": conf.scheme,
        "weight": b.weight.load(Relaxed),
        "active": b.active.load(Relaxed),
        "max_conn": b.max_conn.load(Relaxed),
        "in_flight": b.inflight.load(Relaxed),
        "up": b.is_up(),
        "eligible": b.accepts(),
        "health": b.health_snapshot(),
        "passive_cooldown": b.cooling_down(),
        "latency_ewma_ms": match b.latency.average_us() { 0 => None, us => Some(us as f64 / 1000.0) },
        // Outlier ejection, and the share a slow start lets it take now (1 = full).
        "outlier": {
            "ejected": b.standing.ejected(),
            "ejections": ejections,
            "ejected_for_ms": ejected_for_ms,
        },
        "slow_start_share": b.standing.share(),
        "condition": condition(b),
        // The weight the balancers use now: none while out, a part of it during a slow start.
        "effective_weight": if b.is_up() && !b.standing.ejected() {
            (f64::from(b.weight.load(Relaxed)) * b.standing.share()).round() as u32
        } else {
            0
        },
        "health_check": conf.health_check,
        // Spliced flows that ended and copied flows begun, since start; spliced and parked now.
        "upgraded_flows": {
            "spliced": b.spliced_flows.load(Relaxed),
            "copied": b.copied_flows.load(Relaxed),
            "spliced_open": b.spliced_open.load(Relaxed),
            "parked_open": b.parked_open.load(Relaxed),
        },
        // What the kernel moved for this backend: spliced bytes, and with `l4:` services what
        // XDP steered (null without eBPF).
        "kernel": kernel_view(b, dp),
    })
}

/// The one word an operator wants first (`up`, `slow_start`, `full`, `ejected`, `down`,
/// `drained`) and why, most decisive reason first.
fn condition(b: &Backend) -> Value {
    let (state, why) = if !b.active.load(Relaxed) {
        ("drained", "no new requests or flows (active: false)".to_owned())
    } else if !b.checked_up.load(Relaxed) {
        let error = b.health.last_error().unwrap_or_else(|| "no answer".into());
        ("down", format!("health check failing: {error}"))
    } else if b.cooling_down() {
        let conf = b.conf.load();
        (
            "down",
            format!(
                "{} connect failures in a row: out for fail_timeout ({:?})",
                conf.max_fails,
                conf.fail_timeout.get()
            ),
        )
    } else if b.standing.ejected() {
        let (n, ms) = b.standing.ejections();
        ("ejected", format!("outlier: failures in a row; ejection {n}, back in {ms} ms"))
    } else if b.inflight.load(Relaxed) >= b.max_conn.load(Relaxed) {
        ("full", format!("max_conn reached ({})", b.max_conn.load(Relaxed)))
    } else if b.standing.share() < 1.0 {
        ("slow_start", format!("slow start: takes {:.0}% of its share", b.standing.share() * 100.0))
    } else {
        ("up", String::new())
    };
    json!({ "state": state, "why": why })
}

fn kernel_view(b: &Backend, dp: &dyn Datapath) -> Option<Value> {
    let splice = dp.counters(b.slot);
    let xdp = dp.l4_counters(b.slot);
    if splice.is_none() && xdp.is_none() {
        return None;
    }
    let mut v = json!({
        "spliced_bytes_to_backend": splice.map_or(0, |c| c.bytes_to_backend),
        "spliced_bytes_to_client": splice.map_or(0, |c| c.bytes_to_client),
        "spliced_overlap_bytes_cut": splice.map_or(0, |c| c.overlap_bytes_cut),
    });
    if let Some(x) = xdp {
        v["xdp"] = json!({
            "packets": x.packets,
            "bytes": x.bytes,
            "reply_packets": x.reply_packets,
            "reply_bytes": x.reply_bytes,
            "new_flows": x.new_flows,
        });
    }
    Some(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    upstream: Option<String>,
}

pub async fn list(AxState(admin): AxState<Admin>, Query(q): Query<ListQuery>) -> Result<Json<Value>, AdminError> {
    let snap = admin.state.snapshot();
    let mut out = Map::new();
    for (name, up) in &snap.upstreams {
        if q.upstream.as_ref().is_some_and(|u| u != name) {
            continue;
        }
        out.insert(name.clone(), Value::Array(up.backends.iter().map(|b| view(b, &*admin.state.datapath)).collect()));
    }
    if let Some(u) = &q.upstream
        && out.is_empty()
    {
        return Err(AdminError::NotFound(format!("unknown upstream {u:?}")));
    }
    Ok(Json(json!({ "upstreams": out })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBody {
    #[serde(deserialize_with = "name")]
    upstream: String,
    backend: Value,
}

pub async fn add(
    AxState(admin): AxState<Admin>,
    Body(req): Body<AddBody>,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    let backend: BackendSection =
        serde_json::from_value(req.backend).map_err(|e| AdminError::BadRequest(format!("backend: {e}")))?;
    let id = backend.id.clone();
    admin.state.apply(Command::AddBackend { upstream: req.upstream.clone(), backend })?;
    // Another call may have removed it since: report what is true now.
    let b = admin
        .state
        .backend(&req.upstream, &id)
        .ok_or_else(|| AdminError::NotFound(format!("backend {id:?} was removed meanwhile")))?;
    tracing::info!(upstream = %req.upstream, backend = %id, "backend added");
    Ok((StatusCode::CREATED, Json(view(&b, &*admin.state.datapath))))
}

pub async fn remove(AxState(admin): AxState<Admin>, Query(q): Query<BackendRef>) -> Result<Json<Value>, AdminError> {
    admin.state.apply(Command::RemoveBackend { upstream: q.upstream.clone(), id: q.backend_id.clone() })?;
    tracing::info!(upstream = %q.upstream, backend = %q.backend_id, "backend removed (draining)");
    Ok(Json(json!({ "status": "draining", "upstream": q.upstream, "backend_id": q.backend_id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    #[serde(deserialize_with = "name")]
    upstream: String,
    backend: Map<String, Value>,
}

pub async fn update(AxState(admin): AxState<Admin>, Body(req): Body<UpdateBody>) -> Result<Json<Value>, AdminError> {
    let Some(Value::String(id)) = req.backend.get("id").cloned() else {
        return Err(AdminError::BadRequest("backend.id: required, a string".into()));
    };
    if let Some(problem) = crate::config::name_problem(&id) {
        return Err(AdminError::BadRequest(format!("backend.id: {problem}")));
    }
    admin.state.apply(Command::UpdateBackend { upstream: req.upstream.clone(), id: id.clone(), patch: req.backend })?;
    // Another call may have removed it since: report what is true now.
    let b = admin
        .state
        .backend(&req.upstream, &id)
        .ok_or_else(|| AdminError::NotFound(format!("backend {id:?} was removed meanwhile")))?;
    tracing::info!(upstream = %req.upstream, backend = %id, "backend updated");
    Ok(Json(view(&b, &*admin.state.datapath)))
}

pub async fn disconnect(
    AxState(admin): AxState<Admin>,
    Query(q): Query<BackendRef>,
) -> Result<Json<Value>, AdminError> {
    admin.state.apply(Command::Disconnect { upstream: q.upstream.clone(), id: q.backend_id.clone() })?;
    Ok(Json(json!({ "status": "disconnected", "upstream": q.upstream, "backend_id": q.backend_id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportBody {
    #[serde(deserialize_with = "name")]
    upstream: String,
    #[serde(deserialize_with = "name")]
    backend_id: String,
    performance: PerformanceReport,
}

pub async fn report(AxState(admin): AxState<Admin>, Body(req): Body<ReportBody>) -> Result<Json<Value>, AdminError> {
    admin.state.apply(Command::Report { upstream: req.upstream, id: req.backend_id, report: req.performance })?;
    Ok(Json(json!({ "status": "recorded" })))
}
