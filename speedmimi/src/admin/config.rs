//! `/api/v1/config`: read the running config, change it (whole or partial sections, merged as
//! a JSON merge patch), and re-read the TLS certificate.

use axum::{Json, extract::State as AxState};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Admin, AdminError, Body};
use crate::{command::Command, config::FileConfig, state::merge};

pub async fn get_config(AxState(admin): AxState<Admin>) -> Json<Value> {
    Json(serde_json::to_value(&admin.state.config().file).expect("config serializes"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutConfig {
    config: Value,
}

pub async fn put_config(AxState(admin): AxState<Admin>, Body(req): Body<PutConfig>) -> Result<Json<Value>, AdminError> {
    if !req.config.is_object() {
        return Err(AdminError::BadRequest("config: expected an object of config sections".into()));
    }
    let mut merged = serde_json::to_value(&admin.state.config().file).expect("config serializes");
    merge(&mut merged, req.config);
    let file: FileConfig =
        serde_json::from_value(merged).map_err(|e| AdminError::BadRequest(format!("invalid config: {e}")))?;
    let applied = admin.state.apply(Command::ReplaceConfig(Box::new(file)))?;
    tracing::info!(?applied, "config changed through the admin API");
    Ok(Json(json!({ "status": "applied", "changed": applied == crate::state::Applied::Done })))
}

pub async fn reload_ssl(AxState(admin): AxState<Admin>) -> Result<Json<Value>, AdminError> {
    admin.state.reload_tls().map_err(|e| AdminError::BadRequest(e.to_string()))?;
    Ok(Json(json!({ "status": "reloaded" })))
}
