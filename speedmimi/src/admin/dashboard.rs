//! The dashboard: the page at `/` (embedded in the binary, no CDN, works offline) and what it
//! draws from: `GET /api/v1/dashboard/events`, a server-sent event stream (the five-minute
//! history once, then one tick a second), and `GET /api/v1/dashboard`, the same as one JSON
//! document for scripts. The page carries no data, so it is served without the token; it asks
//! for the token when the API answers 401 and sends it as a bearer header like any client.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use axum::{
    extract::State as AxState,
    http::header,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures_util::{Stream, StreamExt, stream};

use super::{Admin, AdminError, history::KEEP};

/// The page (HTML and CSS) and its script, a file of its own so that the page's content security
/// policy can allow scripts from this origin only, never inline ones.
pub const PAGE: &str = include_str!("dashboard.html");
pub const SCRIPT: &str = include_str!("dashboard.js");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; \
                   img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Pages watching at once; each costs a task and one tick's text a second. A browser tab holds
/// one; past this, something is leaking or looping.
const MAX_STREAMS: usize = 32;

pub async fn page() -> Response {
    static_file("text/html; charset=utf-8", PAGE)
}

pub async fn script() -> Response {
    static_file("text/javascript; charset=utf-8", SCRIPT)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `{"keep_seconds": 300, "points": [...], "latest": {"live": .., "point": ..} | null}`.
pub async fn snapshot(AxState(admin): AxState<Admin>) -> Response {
    let latest = admin.history.latest();
    let body = format!(
        "{{\"keep_seconds\":{KEEP},\"points\":{},\"latest\":{}}}",
        admin.history.points_json(),
        latest.as_deref().unwrap_or("null")
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Counts an open stream until it is dropped.
struct Watcher(Arc<AtomicUsize>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Event `history` (the points kept, a JSON array), then event `tick` every second
/// (`{"live": .., "point": ..}`); ends when the daemon stops.
pub async fn events(
    AxState(admin): AxState<Admin>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, AdminError> {
    let open = admin.streams.fetch_add(1, Relaxed) + 1;
    let watcher = Watcher(admin.streams.clone());
    if open > MAX_STREAMS {
        return Err(AdminError::TooMany(format!("{MAX_STREAMS} dashboard streams are open already")));
    }
    let ticks = admin.history.subscribe();
    let history = Event::default().event("history").data(admin.history.points_json());
    // The latest tick at once, so the page fills without waiting a second.
    let first = admin.history.latest().map(|t| Event::default().event("tick").data(&*t));
    let head = stream::iter([Some(history), first].into_iter().flatten().map(Ok));
    let tail = stream::unfold((ticks, watcher), |(rx, watcher)| async move {
        let mut rx = rx?;
        rx.changed().await.ok()?;
        let tick = rx.borrow_and_update().clone()?;
        Some((Ok(Event::default().event("tick").data(&*tick)), (Some(rx), watcher)))
    });
    Ok(Sse::new(head.chain(tail)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
