//! The admin REST API (SPEC §5) on its own listener: `router(state)` is everything, so tests
//! drive it with `oneshot` or over a socket. Every change goes through `State::apply`; errors
//! answer JSON `{"error": ...}` with 400/401/404/409 and never internals.

mod backends;
mod config;
mod dashboard;
pub mod history;
pub mod metrics;
mod stats;

use std::sync::{Arc, atomic::AtomicUsize};

use axum::{
    Json, Router,
    extract::{Request, State as AxState},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
};
use serde_json::json;

use self::history::History;
use crate::state::{State, StateError};

/// What the handlers share.
#[derive(Clone)]
pub struct Admin {
    pub state: Arc<State>,
    /// When set, every call needs `Authorization: Bearer <token>`.
    token: Option<Arc<str>>,
    /// What the dashboard draws: sampled every second by the daemon (`History::sample`).
    history: Arc<History>,
    /// Dashboard event streams open now.
    streams: Arc<AtomicUsize>,
}

/// The admin API, and the dashboard page at `/`. `token` comes from the environment variable
/// `admin.token_env` names; `history` is the one the daemon samples.
pub fn router(state: Arc<State>, token: Option<String>, history: Arc<History>) -> Router {
    let admin =
        Admin { state, token: token.filter(|t| !t.is_empty()).map(Arc::from), history, streams: Arc::default() };
    let api = Router::new()
        .route("/api/v1/config", get(config::get_config).put(config::put_config))
        .route("/api/v1/config/reload-ssl", post(config::reload_ssl))
        .route("/api/v1/backends", get(backends::list))
        .route("/api/v1/backends/add", post(backends::add))
        .route("/api/v1/backends/remove", delete(backends::remove))
        .route("/api/v1/backends/update", put(backends::update))
        .route("/api/v1/backends/disconnect", post(backends::disconnect))
        .route("/api/v1/stats/server", get(stats::server))
        .route("/api/v1/stats/backend", get(stats::backend))
        .route("/api/v1/report", post(backends::report))
        .route("/api/v1/dashboard", get(dashboard::snapshot))
        .route("/api/v1/dashboard/events", get(dashboard::events))
        .route("/metrics", get(metrics::render))
        .fallback(|| async { AdminError::NotFound("no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(admin.clone(), authorize));
    // The page holds no data: it loads without the token and asks for it (`dashboard`).
    Router::new().route("/", get(dashboard::page)).merge(api).with_state(admin)
}

async fn authorize(AxState(admin): AxState<Admin>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(token) = &admin.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return AdminError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Equal-length inputs take the same time whatever their content; the length itself is not secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An admin call that failed; nothing was changed.
#[derive(Debug)]
pub enum AdminError {
    BadRequest(String),
    Unauthorized,
    NotFound(String),
    Conflict(String),
    TooMany(String),
}

impl From<StateError> for AdminError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::UnknownUpstream(_) | StateError::UnknownBackend { .. } => AdminError::NotFound(e.to_string()),
            StateError::Duplicate { .. } => AdminError::Conflict(e.to_string()),
            other => AdminError::BadRequest(other.to_string()),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            AdminError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            AdminError::Unauthorized => (StatusCode::UNAUTHORIZED, "missing or wrong bearer token".to_owned()),
            AdminError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            AdminError::Conflict(m) => (StatusCode::CONFLICT, m),
            AdminError::TooMany(m) => (StatusCode::TOO_MANY_REQUESTS, m),
        };
        (status, Json(json!({ "error": msg }))).into_response()
    }
}

/// A JSON body, or a JSON 400 naming what is wrong. Any `Content-Type` is accepted: the API
/// speaks only JSON, and `curl -d` (as in the README) sends a form content type; axum's `Json`
/// refused those with a plain-text 400.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = bytes::Bytes::from_request(req, state).await.map_err(|e| AdminError::BadRequest(e.body_text()))?;
        serde_json::from_slice(&bytes).map(Body).map_err(|e| AdminError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

/// Query string or a JSON 400.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(AdminError::BadRequest(e.body_text())),
        }
    }
}

/// `?upstream=U&backend_id=ID`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    #[serde(deserialize_with = "name")]
    pub upstream: String,
    #[serde(deserialize_with = "name")]
    pub backend_id: String,
}

/// An upstream name or backend id from a request; one that could name nothing
/// (`config::name_problem`) is a 400 before any lookup.
pub fn name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    match crate::config::name_problem(&s) {
        None => Ok(s),
        Some(problem) => Err(serde::de::Error::custom(format!("id or name {problem}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
