//! Fuzz target: the admin API's JSON inputs. Each input is one call (the first byte picks the
//! endpoint, the rest is the body or the query) to `admin::router` over a fresh state, driven
//! with tower's `oneshot`; every answer must be 2xx or 4xx with a JSON body, never 5xx or a panic,
//! and a refused call must leave the running config as it was.
#![no_main]

use std::sync::Arc;

use axum::body::Body;
use http::{Method, Request};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use speedmimi::{admin, config::Config, datapath::Userspace, state::State};
use tower::ServiceExt;

const CONFIG: &str = "
backends:
  default:
    - {id: a, host: 127.0.0.1, port: 9, health_check: {path: /health}}
    - {id: b, host: 127.0.0.1, port: 10, weight: 50}
  other:
    - {id: c, host: 127.0.0.1, port: 11}
routing:
  default: {path: /, upstream: default}
  other: {path: /other, upstream: other, load_balancer: performance}
";

/// Calls with a JSON body, then calls whose input is the query string.
const BODY_CALLS: [(&str, &str); 4] = [
    ("POST", "/api/v1/backends/add"),
    ("PUT", "/api/v1/backends/update"),
    ("PUT", "/api/v1/config"),
    ("POST", "/api/v1/report"),
];
const QUERY_CALLS: [(&str, &str); 5] = [
    ("DELETE", "/api/v1/backends/remove"),
    ("POST", "/api/v1/backends/disconnect"),
    ("GET", "/api/v1/stats/backend"),
    ("GET", "/api/v1/backends"),
    ("POST", "/api/v1/config/reload-ssl"),
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else { return };
    let pick = pick as usize % (BODY_CALLS.len() + QUERY_CALLS.len());
    let req = match BODY_CALLS.get(pick) {
        Some(&(method, path)) => Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .body(Body::from(input.to_vec())),
        None => {
            let (method, path) = QUERY_CALLS[pick - BODY_CALLS.len()];
            // Only bytes a URI may carry; the rest is http's to refuse before axum sees it.
            let Ok(query) = std::str::from_utf8(input) else { return };
            let Ok(uri) = http::Uri::try_from(format!("{path}?{query}")) else { return };
            Request::builder().method(Method::from_bytes(method.as_bytes()).unwrap()).uri(uri).body(Body::empty())
        }
    }
    .expect("request");
    runtime().block_on(async move {
        let config = Config::parse(CONFIG).expect("the fuzz config is valid");
        let state = Arc::new(State::new(config, Arc::new(Userspace)).expect("state"));
        let before = state.config();
        let what = format!("{} {}", req.method(), req.uri());
        let resp = admin::router(state.clone(), None, Default::default()).oneshot(req).await.expect("the router is infallible");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(
            status.is_success() || status.is_client_error(),
            "{what}: status {status}: {}",
            String::from_utf8_lossy(&body)
        );
        let json: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{what}: {status} answered with a body that is not JSON ({e}): {body:?}"));
        if status.is_client_error() {
            assert!(json["error"].is_string(), "{what}: {status} without an error message: {json}");
            assert_eq!(*state.config(), *before, "{what}: refused with {status}, but the config changed");
        }
    });
});
