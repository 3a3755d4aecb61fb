//! The dashboard on the admin listener: its data (history, ticks, the stream and its limits)
//! over real sockets, and the page itself in headless Chromium while load runs through the
//! proxy: the token prompt, live rates, and a drain and undrain from the UI checked from the
//! backend's side.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use serde_json::Value;
use support::{Origin, Proxy, admin_call, browser, client, one_route, who};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Requests through the proxy at about `per_second` until `stop` (or 120 s, or 20,000 requests).
fn load(p: &Proxy, per_second: u64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    let url = p.url("/");
    tokio::spawn(async move {
        let c = client();
        let started = Instant::now();
        let mut sent = 0;
        while !stop.load(Relaxed) && started.elapsed() < Duration::from_secs(120) && sent < 20_000 {
            who(&c, &url, &[]).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(1000 / per_second)).await;
        }
        sent
    })
}

/// Opens the event stream; returns the socket after the response head, and the head. HTTP/1.0,
/// so the body comes as it is, without chunked framing.
async fn open_stream(p: &Proxy, token: Option<&str>) -> (TcpStream, String) {
    let mut s = TcpStream::connect(p.admin).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET /api/v1/dashboard/events HTTP/1.0\r\nHost: a\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await.expect("head in time").unwrap();
        assert!(n > 0, "closed before the head: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// Reads the stream until `count` events of kind `event` came (bounded by 10 s); their data.
async fn events(s: &mut TcpStream, event: &str, count: usize) -> Vec<Value> {
    let mut text = String::new();
    let mut buf = [0u8; 65536];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<Value> = text
            .split("\n\n")
            .filter_map(|block| {
                let mut lines = block.lines();
                let kind = lines.clone().find_map(|l| l.strip_prefix("event:"))?.trim();
                let data = lines.find_map(|l| l.strip_prefix("data:"))?.trim();
                (kind == event).then(|| serde_json::from_str(data).ok()).flatten()
            })
            .collect();
        if found.len() >= count {
            return found;
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{count} {event} events not seen in 10 s: {text}"))
            .unwrap();
        assert!(n > 0, "stream closed: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// Without a browser: history and ticks carry what the page draws; the stream starts with the
/// history; a stream left open does not hold up the daemon's stop; more streams than the limit
/// get a JSON 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_carries_history_then_ticks() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let p = Proxy::start(&one_route(&(a.yaml(100) + &b.yaml(100)), "round_robin", "")).await;
    let c = client();
    for _ in 0..40 {
        who(&c, &p.url("/"), &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let (status, v) =
        admin_call(Method::GET, &p.admin_url("/api/v1/dashboard"), None, None, Duration::from_secs(5)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["keep_seconds"], 300);
    let points = v["points"].as_array().expect("points");
    assert!((1..=300).contains(&points.len()), "{} points after 2.5 s", points.len());
    let served: f64 = points.iter().map(|p| p["s"]["b/default/a"][0].as_f64().unwrap_or(0.0)).sum();
    assert!(served > 0.0, "a's rate is in the history: {v}");
    let live = &v["latest"]["live"];
    let backends = live["upstreams"][0]["backends"].as_array().expect("backends");
    assert_eq!(backends.len(), 2);
    for b in backends {
        assert_eq!(b["condition"]["state"], "up", "{b}");
        assert_eq!(b["effective_weight"], 100, "{b}");
        assert!(b["figures"]["rate"].as_f64().unwrap() > 0.0, "{b}");
        assert!(b["figures"]["p99_ms"].as_f64().unwrap() > 0.0, "{b}");
    }
    assert_eq!(live["routes"][0]["name"], "default");
    assert!(live["routes"][0]["figures"]["rate"].as_f64().unwrap() > 0.0, "{live}");
    assert_eq!(live["server"]["config_generation"], 1);
    assert_eq!(live["server"]["config_reloaded_unix_ms"], Value::Null);
    assert_eq!(live["l4"], Value::Array(vec![]), "no XDP datapath, no l4 services");

    // A change moves the generation; a drained backend says so.
    let body = r#"{"upstream": "default", "backend": {"id": "a", "active": false}}"#;
    let (status, _) =
        admin_call(Method::PUT, &p.admin_url("/api/v1/backends/update"), Some(body), None, Duration::from_secs(5))
            .await;
    assert_eq!(status, StatusCode::OK);

    let (mut s, head) = open_stream(&p, None).await;
    assert!(head.contains(" 200 ") && head.contains("text/event-stream"), "{head}");
    let history = events(&mut s, "history", 1).await;
    assert!(!history[0].as_array().unwrap().is_empty(), "history event: {}", history[0]);
    let ticks = events(&mut s, "tick", 2).await;
    let last = &ticks[1]["live"];
    assert_eq!(last["server"]["config_generation"], 2, "{last}");
    let a_live = &last["upstreams"][0]["backends"][0];
    assert_eq!(
        (&a_live["condition"]["state"], &a_live["effective_weight"]),
        (&"drained".into(), &0.into()),
        "{a_live}"
    );
    assert!(ticks[1]["point"]["s"]["server"].is_array(), "{}", ticks[1]);

    // The limit: 32 streams at once (one is open already).
    let mut open = Vec::new();
    for _ in 1..32 {
        let (s, head) = open_stream(&p, None).await;
        assert!(head.contains(" 200 "), "{head}");
        open.push(s);
    }
    let (status, v) =
        admin_call(Method::GET, &p.admin_url("/api/v1/dashboard/events"), None, None, Duration::from_secs(5)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(v["error"].as_str().unwrap().contains("32"), "{v}");
    drop(open);
    // Closed streams give their places back (noticed at the next tick's write, bounded here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let _again = loop {
        let (s, head) = open_stream(&p, None).await;
        if head.contains(" 200 ") {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "places not given back in 10 s: {head}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Open streams end when the daemon stops (`stop` bounds the graceful stop to 15 s).
    p.stop().await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the stream stayed open after the stop");
}

/// With a token: the page loads without it (it holds no data), every data endpoint refuses a
/// missing or wrong token with a JSON 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_loads_and_the_data_needs_the_token() {
    let a = Origin::start("a").await;
    // A variable only this test uses: the environment is process-wide.
    // SAFETY: no other thread reads this variable.
    unsafe { std::env::set_var("SM_DASHBOARD_TOKEN_A", "s3cret") };
    let yaml = one_route(&a.yaml(100), "round_robin", "") + "admin:\n  token_env: SM_DASHBOARD_TOKEN_A\n";
    let p = Proxy::start(&yaml).await;
    let page = support::raw(p.admin, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{}", &page[..page.len().min(300)]);
    assert!(page.contains("text/html") && page.contains("script-src 'self';"), "{}", &page[..600]);
    assert!(!page.contains("<script>"), "no inline script: the policy allows none");
    let script = support::raw(p.admin, b"GET /dashboard.js HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(script.starts_with("HTTP/1.1 200") && script.contains("text/javascript"), "{}", &script[..300]);
    assert!(!script.contains("http://") && !script.contains("https://"), "the script loads nothing from elsewhere");
    assert!(
        page.contains("<title>SpeedMimi</title>") && !page.contains("http://") && !page.contains("https://"),
        "the page is self-contained (no CDN)"
    );
    for token in [None, Some("wrong")] {
        for path in ["/api/v1/dashboard", "/api/v1/dashboard/events"] {
            let (status, v) = admin_call(Method::GET, &p.admin_url(path), None, token, Duration::from_secs(5)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {token:?}: {v}");
            assert!(v["error"].is_string(), "{v}");
        }
    }
    let (status, _) =
        admin_call(Method::GET, &p.admin_url("/api/v1/dashboard"), None, Some("s3cret"), Duration::from_secs(5)).await;
    assert_eq!(status, StatusCode::OK);

    // A page of another site in the operator's browser cannot act, even with the token (a
    // browser could hold it for the tab): refused with a JSON 403, and nothing happens.
    let call = |extra: &str| {
        let body = r#"{"upstream":"default","backend":{"id":"a","weight":7}}"#;
        format!(
            "PUT /api/v1/backends/update HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer s3cret\r\n{extra}\
             Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            p.admin,
            body.len()
        )
    };
    for extra in ["Origin: https://evil.example\r\n", "Sec-Fetch-Site: cross-site\r\n", "Origin: null\r\n"] {
        let answer = support::raw(p.admin, call(extra).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("cross-origin"), "{extra}: {answer}");
    }
    let (_, list) =
        admin_call(Method::GET, &p.admin_url("/api/v1/backends"), None, Some("s3cret"), Duration::from_secs(5)).await;
    assert_eq!(list["upstreams"]["default"][0]["weight"], 100, "a refused call changed the weight");
    // The page's own calls (same origin) go through.
    let answer = support::raw(p.admin, call(&format!("Origin: http://{}\r\n", p.admin)).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    p.stop().await;
}

/// The page in headless Chromium while load runs: a wrong token gets a clear message, the right
/// one opens the page, rates show and move, and a backend drained from the UI stops getting
/// requests (counted at the backend), then gets them again once undrained. A bad weight shows
/// the API's error. Screenshots go to the test's target directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_undrain_from_the_page_in_chromium() {
    let test = "drain_and_undrain_from_the_page_in_chromium";
    let Some(chromium) = support::packages::required(test, "chromium", "chromium") else { return };
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    // SAFETY: no other thread reads this variable.
    unsafe { std::env::set_var("SM_DASHBOARD_TOKEN_B", "open-sesame") };
    let yaml =
        one_route(&(a.yaml(100) + &b.yaml(100)), "round_robin", "") + "admin:\n  token_env: SM_DASHBOARD_TOKEN_B\n";
    let p = Proxy::start(&yaml).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(&p, 100, stop.clone());

    let mut page = browser::Browser::start(&chromium, 1400, 1000).await;
    page.open(&p.admin_url("/")).await;
    let long = Duration::from_secs(15);
    page.wait_for("the token form", "!document.querySelector('#login').hidden", long).await;
    let login = |t: &str| {
        format!(
            "document.querySelector('#token').value = '{t}'; document.querySelector('#login').requestSubmit(); true"
        )
    };
    page.eval(&login("wrong")).await;
    page.wait_for(
        "the wrong-token message",
        "document.querySelector('#login-msg').textContent.includes('Wrong token')",
        long,
    )
    .await;
    page.eval(&login("open-sesame")).await;
    let a_rate = "parseFloat(document.querySelector('tr[data-b=\"default/a\"] .rate').textContent)";
    page.wait_for("a's rate", &format!("{a_rate} > 10"), long).await;
    page.wait_for(
        "b's rate",
        "parseFloat(document.querySelector('tr[data-b=\"default/b\"] .rate').textContent) > 10",
        long,
    )
    .await;
    page.wait_for(
        "a chart with history",
        "document.querySelector('tr[data-b=\"default/a\"] polyline').getAttribute('points').split(' ').length > 3",
        long,
    )
    .await;
    assert_eq!(page.text("#link").await.as_deref(), Some("live"));

    // Drain a from the UI: a confirmation first.
    page.click("tr[data-b=\"default/a\"] button[data-act=drain]").await;
    page.wait_for("the confirmation", "document.querySelector('#ask').open", long).await;
    page.click("#ask-ok").await;
    page.wait_for("the result", "document.querySelector('#status').textContent.includes('a drained')", long).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a0, b0) = (a.requests(), b.requests());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.requests(), a0, "a got requests after its drain from the page");
    assert!(b.requests() > b0 + 50, "b took the traffic: {} -> {}", b0, b.requests());
    page.wait_for(
        "a shown drained",
        "document.querySelector('tr[data-b=\"default/a\"] .st').textContent === 'drained'",
        long,
    )
    .await;
    page.wait_for("a's rate falls to 0", &format!("{a_rate} === 0"), long).await;
    let shot = page.screenshot().await;
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(dir.join("dashboard.png"), &shot).unwrap();
    eprintln!("screenshot: {}", dir.join("dashboard.png").display());

    // A weight the API refuses: its error is shown, nothing changes.
    page.click("tr[data-b=\"default/b\"] button[data-act=weight]").await;
    page.wait_for("the weight dialog", "document.querySelector('#ask').open", long).await;
    page.eval("document.querySelector('#ask-value').value = '0'; true").await;
    page.click("#ask-ok").await;
    page.wait_for("the API's error", "document.querySelector('#status').textContent.includes('out of range')", long)
        .await;

    // Undrain: a gets requests again.
    page.click("tr[data-b=\"default/a\"] button[data-act=undrain]").await;
    page.wait_for("the result", "document.querySelector('#status').textContent.includes('a back in')", long).await;
    let a1 = a.requests();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.requests() < a1 + 20 {
        assert!(Instant::now() < deadline, "a got no requests after its undrain: {} -> {}", a1, a.requests());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // On a phone: the page fits the screen's width (tables scroll inside their boxes).
    page.as_phone(390, 844).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let width = page.eval("document.documentElement.scrollWidth").await;
    assert!(width.as_u64().unwrap() <= 390, "the page is {width} px wide on a 390 px phone");
    std::fs::write(dir.join("dashboard-phone.png"), page.screenshot().await).unwrap();

    stop.store(true, Relaxed);
    let sent = load.await.unwrap();
    assert!(sent > 500, "the load ran ({sent} requests)");
    drop(page);
    p.stop().await;
}
