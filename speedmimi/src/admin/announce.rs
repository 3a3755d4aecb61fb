//! `/api/v1/announce`: the VIPs this node announces (`announce`), and draining the node: its VIPs
//! withdrawn from the router while it keeps serving what still reaches it, until undrained.

use axum::{Json, extract::State as AxState};
use serde_json::{Value, json};

use super::{Admin, AdminError};

pub async fn status(AxState(admin): AxState<Admin>) -> Result<Json<Value>, AdminError> {
    view(&admin)
}

pub async fn drain(AxState(admin): AxState<Admin>) -> Result<Json<Value>, AdminError> {
    set(&admin, true)
}

pub async fn undrain(AxState(admin): AxState<Admin>) -> Result<Json<Value>, AdminError> {
    set(&admin, false)
}

fn set(admin: &Admin, drained: bool) -> Result<Json<Value>, AdminError> {
    let a = admin.state.announcer.get().ok_or_else(not_running)?;
    a.drain(drained);
    view(admin)
}

fn view(admin: &Admin) -> Result<Json<Value>, AdminError> {
    let s = admin.state.announcer.get().ok_or_else(not_running)?.status();
    Ok(Json(json!({
        "interface": s.interface,
        "drained": s.drained,
        "announced": s.announced.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
    })))
}

fn not_running() -> AdminError {
    AdminError::Conflict(
        "announce is not running here (announce.enabled is false, or no XDP datapath is loaded)".into(),
    )
}
