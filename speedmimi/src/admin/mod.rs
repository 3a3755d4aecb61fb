//! The admin REST API (SPEC §5) on its own listener: `router(state)` is everything, so tests
//! drive it with `oneshot` or over a socket. Every change goes through `State::apply`; errors
//! answer JSON `{"error": ...}` with 400/401/404/409 and never internals.

mod announce;
mod backends;
mod config;
mod dashboard;
pub mod history;
pub mod metrics;
mod serve;
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
pub use self::serve::serve;
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
        .route("/api/v1/announce", get(announce::status))
        .route("/api/v1/announce/drain", post(announce::drain))
        .route("/api/v1/announce/undrain", post(announce::undrain))
        .route("/api/v1/stats/server", get(stats::server))
        .route("/api/v1/stats/backend", get(stats::backend))
        .route("/api/v1/report", post(backends::report))
        .route("/api/v1/dashboard", get(dashboard::snapshot))
        .route("/api/v1/dashboard/events", get(dashboard::events))
        .route("/metrics", get(metrics::render))
        .fallback(|| async { AdminError::NotFound("no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(admin.clone(), authorize));
    // The page holds no data: it loads without the token and asks for it (`dashboard`).
    Router::new()
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .merge(api)
        .with_state(admin)
}

async fn authorize(AxState(admin): AxState<Admin>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(why) = cross_origin(&headers) {
        return AdminError::Forbidden(format!("cross-origin request refused ({why})")).into_response();
    }
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

/// Why a request comes from a page of another origin, if it does. Any site open in the operator's
/// browser can send requests to a loopback admin listener (a form POST needs no preflight); the
/// browser marks them with `Sec-Fetch-Site` and `Origin`. The dashboard's own calls are
/// same-origin, and curl and scripts send neither header, so refusing these costs no client.
fn cross_origin(headers: &HeaderMap) -> Option<String> {
    let get = |name: header::HeaderName| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    if let Some(site) = get(header::HeaderName::from_static("sec-fetch-site"))
        && !matches!(site, "same-origin" | "none")
    {
        return Some(format!("Sec-Fetch-Site: {site}"));
    }
    let origin = get(header::ORIGIN)?;
    let host = get(header::HOST).unwrap_or("");
    match origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) {
        Some(o) if o == host => None,
        _ => Some(format!("Origin {origin} is not this listener's ({host})")),
    }
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
    Forbidden(String),
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
            AdminError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
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
    fn cross_origin_requests_are_told_apart() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            super::cross_origin(&m)
        };
        assert_eq!(h(&[("host", "127.0.0.1:9091")]), None, "curl");
        assert_eq!(h(&[("host", "127.0.0.1:9091"), ("origin", "http://127.0.0.1:9091")]), None);
        assert_eq!(h(&[("sec-fetch-site", "same-origin"), ("host", "a")]), None);
        assert!(h(&[("host", "127.0.0.1:9091"), ("origin", "https://evil.example")]).is_some());
        assert!(h(&[("host", "127.0.0.1:9091"), ("origin", "null")]).is_some());
        assert!(h(&[("sec-fetch-site", "cross-site")]).is_some());
        assert!(h(&[("sec-fetch-site", "same-site")]).is_some());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
