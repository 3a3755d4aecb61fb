//! The admin REST API over a real socket: every endpoint, its bad inputs (each leaving the
//! running state exactly as it was), the bearer token, and that changes reach the traffic.

mod support;

use std::{collections::HashMap, time::Duration};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Origin, Proxy, admin_call, client, one_route, who};

/// One admin call; returns status and the JSON answer.
async fn call(method: Method, url: &str, body: Option<&str>, token: Option<&str>) -> (StatusCode, Value) {
    admin_call(method, url, body, token, Duration::from_secs(10)).await
}

/// The running config and backends, to prove a rejected call changed nothing.
async fn everything(p: &Proxy) -> (Value, Value) {
    let (s1, config) = call(Method::GET, &p.admin_url("/api/v1/config"), None, None).await;
    let (s2, mut backends) = call(Method::GET, &p.admin_url("/api/v1/backends"), None, None).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    // In-flight and latency move by themselves; settings and membership must not.
    for list in backends["upstreams"].as_object_mut().unwrap().values_mut() {
        for b in list.as_array_mut().unwrap() {
            let b = b.as_object_mut().unwrap();
            for volatile in ["in_flight", "latency_ewma_ms", "health", "passive_cooldown", "eligible", "up"] {
                b.remove(volatile);
            }
        }
    }
    (config, backends)
}

async fn rejected(p: &Proxy, method: Method, path: &str, body: Option<&str>, want: StatusCode) -> String {
    let before = everything(p).await;
    let (status, v) = call(method, &p.admin_url(path), body, None).await;
    assert_eq!(status, want, "{path} {body:?}: {v}");
    let msg = v["error"].as_str().unwrap_or_else(|| panic!("error is not JSON {{\"error\"}}: {v}")).to_owned();
    assert_eq!(everything(p).await, before, "{path} {body:?} changed the state although rejected");
    msg
}

async fn tally(p: &Proxy, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts.entry(who(&c, &p.url("/"), &[]).await).or_insert(0) += 1;
    }
    counts
}

async fn two_backends(balancer: &str) -> (Origin, Origin, Proxy) {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let p = Proxy::start(&one_route(&(a.yaml(100) + &b.yaml(100)), balancer, "")).await;
    (a, b, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_is_readable_and_partially_replaceable() {
    let (_a, _b, p) = two_backends("round_robin").await;
    let (status, config) = call(Method::GET, &p.admin_url("/api/v1/config"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(config["routing"]["default"]["load_balancer"], "round_robin");
    assert_eq!(config["backends"]["default"][1]["id"], "b");
    assert_eq!(config["server"]["read_timeout"], "30s");

    // A partial section: only the route's balancer changes.
    let body = r#"{"config":{"routing":{"default":{"load_balancer":"weight"}}}}"#;
    let (status, v) = call(Method::PUT, &p.admin_url("/api/v1/config"), Some(body), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, config) = call(Method::GET, &p.admin_url("/api/v1/config"), None, None).await;
    assert_eq!(config["routing"]["default"]["load_balancer"], "weight");
    assert_eq!(config["routing"]["default"]["path"], "/");

    let msg = rejected(
        &p,
        Method::PUT,
        "/api/v1/config",
        Some(r#"{"config":{"routing":{"default":{"upstream":"nope"}}}}"#),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(msg.contains("routing.default.upstream") && msg.contains("nope"), "{msg}");
    let msg = rejected(
        &p,
        Method::PUT,
        "/api/v1/config",
        Some(r#"{"config":{"server":{"port":1}}}"#),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(msg.contains("server.port") && msg.contains("restart"), "{msg}");
    let msg = rejected(
        &p,
        Method::PUT,
        "/api/v1/config",
        Some(r#"{"config":{"server":{"bogus":1}}}"#),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(msg.contains("bogus"), "{msg}");
    rejected(&p, Method::PUT, "/api/v1/config", Some(r#"{"config": 5"#), StatusCode::BAD_REQUEST).await;
    rejected(&p, Method::PUT, "/api/v1/config", Some(r#"{"config": 5}"#), StatusCode::BAD_REQUEST).await;
    let msg = rejected(
        &p,
        Method::PUT,
        "/api/v1/config",
        Some(r#"{"config":{"server":{"read_timeout":"3x"}}}"#),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(msg.contains("3x"), "{msg}");
    // Upstream settings: a status that is no 5xx, an upstream that does not exist, a share over 100%.
    for (patch, field) in [
        (
            r#"{"config":{"upstreams":{"default":{"retries":{"statuses":[404]}}}}}"#,
            "upstreams.default.retries.statuses[0]",
        ),
        (r#"{"config":{"upstreams":{"nope":{}}}}"#, "upstreams.nope"),
        (
            r#"{"config":{"upstreams":{"default":{"outlier_ejection":{"max_ejected_percent":101}}}}}"#,
            "upstreams.default.outlier_ejection.max_ejected_percent",
        ),
    ] {
        let msg = rejected(&p, Method::PUT, "/api/v1/config", Some(patch), StatusCode::BAD_REQUEST).await;
        assert!(msg.contains(field), "{patch}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_backends_get_traffic_at_once_and_bad_adds_change_nothing() {
    let (_a, _b, p) = two_backends("round_robin").await;
    let c = Origin::start("c").await;
    let add = |id: &str, port: u16, extra: &str| {
        format!(r#"{{"upstream":"default","backend":{{"id":"{id}","host":"127.0.0.1","port":{port}{extra}}}}}"#)
    };
    let (status, v) =
        call(Method::POST, &p.admin_url("/api/v1/backends/add"), Some(&add("c", c.addr.port(), "")), None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["weight"], 100, "defaults as in config: {v}");
    assert_eq!(v["active"], true);
    let counts = tally(&p, 30).await;
    assert_eq!(counts.get("c"), Some(&10), "{counts:?}");

    let port = c.addr.port();
    let msg = rejected(&p, Method::POST, "/api/v1/backends/add", Some(&add("c", port, "")), StatusCode::CONFLICT).await;
    assert!(msg.contains("\"c\""), "{msg}");
    let body = format!(r#"{{"upstream":"nope","backend":{{"id":"d","host":"127.0.0.1","port":{port}}}}}"#);
    rejected(&p, Method::POST, "/api/v1/backends/add", Some(&body), StatusCode::NOT_FOUND).await;
    let msg = rejected(
        &p,
        Method::POST,
        "/api/v1/backends/add",
        Some(&add("d", port, r#","weight":0"#)),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(msg.contains("weight"), "{msg}");
    let msg = rejected(&p, Method::POST, "/api/v1/backends/add", Some(&add("d", 0, "")), StatusCode::BAD_REQUEST).await;
    assert!(msg.contains("port"), "{msg}");
    let msg = rejected(
        &p,
        Method::POST,
        "/api/v1/backends/add",
        Some(&add("d", port, r#","wieght":5"#)),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(msg.contains("wieght"), "{msg}");
    rejected(&p, Method::POST, "/api/v1/backends/add", Some("{not json"), StatusCode::BAD_REQUEST).await;
    rejected(&p, Method::POST, "/api/v1/backends/add", Some(r#"{"upstream":"default"}"#), StatusCode::BAD_REQUEST)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_change_weights_and_activity_live() {
    let (_a, _b, p) = two_backends("weight").await;
    let upd = |body: &str| format!(r#"{{"upstream":"default","backend":{body}}}"#);
    let (status, v) =
        call(Method::PUT, &p.admin_url("/api/v1/backends/update"), Some(&upd(r#"{"id":"a","weight":300}"#)), None)
            .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["weight"], 300);
    let counts = tally(&p, 40).await;
    assert_eq!((counts.get("a"), counts.get("b")), (Some(&30), Some(&10)), "{counts:?}");

    let (status, _) =
        call(Method::PUT, &p.admin_url("/api/v1/backends/update"), Some(&upd(r#"{"id":"a","active":false}"#)), None)
            .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tally(&p, 10).await.get("b"), Some(&10));

    let path = "/api/v1/backends/update";
    let msg = rejected(&p, Method::PUT, path, Some(&upd(r#"{"id":"a","weight":0}"#)), StatusCode::BAD_REQUEST).await;
    assert!(msg.contains("weight"), "{msg}");
    let msg = rejected(&p, Method::PUT, path, Some(&upd(r#"{"id":"a","max_conn":0}"#)), StatusCode::BAD_REQUEST).await;
    assert!(msg.contains("max_conn"), "{msg}");
    rejected(&p, Method::PUT, path, Some(&upd(r#"{"id":"zz","weight":5}"#)), StatusCode::NOT_FOUND).await;
    rejected(&p, Method::PUT, path, Some(&upd(r#"{"weight":5}"#)), StatusCode::BAD_REQUEST).await;
    rejected(&p, Method::PUT, path, Some(&upd(r#"{"id":"a","weight":"heavy"}"#)), StatusCode::BAD_REQUEST).await;
    rejected(&p, Method::PUT, path, Some(&upd(r#"{"id":"a","colour":"red"}"#)), StatusCode::BAD_REQUEST).await;
    rejected(&p, Method::PUT, path, Some(r#"{"upstream":"x","backend":{"id":"a"}}"#), StatusCode::NOT_FOUND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_backends_drain_and_bad_removes_change_nothing() {
    let (a, b, p) = two_backends("round_robin").await;
    let (status, v) =
        call(Method::DELETE, &p.admin_url("/api/v1/backends/remove?upstream=default&backend_id=a"), None, None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let before = a.requests();
    assert_eq!(tally(&p, 10).await.get("b"), Some(&10));
    assert_eq!(a.requests(), before, "a removed backend got new requests");
    assert!(b.requests() >= 10);

    rejected(&p, Method::DELETE, "/api/v1/backends/remove?upstream=default&backend_id=a", None, StatusCode::NOT_FOUND)
        .await;
    rejected(&p, Method::DELETE, "/api/v1/backends/remove?upstream=zz&backend_id=b", None, StatusCode::NOT_FOUND).await;
    rejected(&p, Method::DELETE, "/api/v1/backends/remove?upstream=default", None, StatusCode::BAD_REQUEST).await;
    let msg = rejected(
        &p,
        Method::DELETE,
        "/api/v1/backends/remove?upstream=default&backend_id=b",
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(msg.contains("at least one backend"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_live_websockets() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let a = Origin::start("a").await;
    let p = Proxy::start(&one_route(&a.yaml(100), "round_robin", "")).await;
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", p.addr), tcp).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));

    rejected(
        &p,
        Method::POST,
        "/api/v1/backends/disconnect?upstream=default&backend_id=zz",
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    let (status, _) =
        call(Method::POST, &p.admin_url("/api/v1/backends/disconnect?upstream=default&backend_id=a"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the WebSocket stayed open after disconnect");
    // The backend still serves new requests.
    assert_eq!(who(&client(), &p.url("/"), &[]).await, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_steer_the_performance_balancer() {
    let (_a, _b, p) = two_backends("performance").await;
    let report = |id: &str, cpu: f64| {
        format!(
            r#"{{"upstream":"default","backend_id":"{id}","performance":{{"cpu_usage":{cpu},"memory_usage":50.0,"load_avg_1":1.0}}}}"#
        )
    };
    let (status, v) = call(Method::POST, &p.admin_url("/api/v1/report"), Some(&report("a", 98.0)), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    call(Method::POST, &p.admin_url("/api/v1/report"), Some(&report("b", 5.0)), None).await;
    // Concurrent load: in-flight counts rise and the loaded backend's smaller capacity shows.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = p.url("/slow?ms=30");
        tasks.spawn(async move {
            let c = client();
            let mut ids = Vec::new();
            for _ in 0..6 {
                ids.push(support::get(&c, &url, &[]).await.2.trim().to_owned());
            }
            ids
        });
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        for id in r.unwrap() {
            *counts.entry(id).or_default() += 1;
        }
    }
    let (a, b) = (counts.get("a").copied().unwrap_or(0), counts.get("b").copied().unwrap_or(0));
    assert!(b > 2 * a, "reported 98% CPU on a, 5% on b, but counts a={a} b={b}");

    let (status, v) =
        call(Method::GET, &p.admin_url("/api/v1/stats/backend?upstream=default&backend_id=a"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["performance_report"]["report"]["cpu_usage"], 98.0, "{v}");

    rejected(&p, Method::POST, "/api/v1/report", Some(&report("zz", 5.0)), StatusCode::NOT_FOUND).await;
    rejected(&p, Method::POST, "/api/v1/report", Some(&report("a", 140.0)), StatusCode::BAD_REQUEST).await;
    rejected(
        &p,
        Method::POST,
        "/api/v1/report",
        Some(r#"{"upstream":"default","backend_id":"a"}"#),
        StatusCode::BAD_REQUEST,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_what_clients_saw() {
    let (_a, _b, p) = two_backends("round_robin").await;
    let c = client();
    for _ in 0..20 {
        who(&c, &p.url("/"), &[]).await;
    }
    let (status, _, _) = support::get(&c, &p.url("/slow?ms=1"), &[("host", "x")]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, s) = call(Method::GET, &p.admin_url("/api/v1/stats/server"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s["requests"]["total"], 21, "{s}");
    assert_eq!(s["status"]["2xx"], 21, "{s}");
    assert!(s["latency"]["p50_ms"].as_f64().is_some() && s["latency"]["p99_ms"].as_f64().is_some(), "{s}");
    assert!(s["connections"]["total"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["bytes"]["sent"].as_u64().unwrap() >= 21 * 2, "{s}");
    assert!(s["uptime_seconds"].as_f64().unwrap() > 0.0);

    let (status, b) =
        call(Method::GET, &p.admin_url("/api/v1/stats/backend?upstream=default&backend_id=a"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(b["requests"]["total"].as_u64().unwrap() >= 10, "{b}");
    assert_eq!(b["backend"]["health"]["up"], json!(true), "{b}");
    rejected(&p, Method::GET, "/api/v1/stats/backend?upstream=default&backend_id=zz", None, StatusCode::NOT_FOUND)
        .await;
    rejected(&p, Method::GET, "/api/v1/backends?upstream=zz", None, StatusCode::NOT_FOUND).await;
    rejected(&p, Method::GET, "/api/v1/nothing-here", None, StatusCode::NOT_FOUND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_token_guards_every_call() {
    let a = Origin::start("a").await;
    // A variable only this test uses: the environment is process-wide.
    // SAFETY: no other thread reads this variable.
    unsafe { std::env::set_var("SM_ADMIN_TOKEN_TEST", "s3cret") };
    let extra = "";
    let yaml = one_route(&a.yaml(100), "round_robin", extra) + "admin:\n  token_env: SM_ADMIN_TOKEN_TEST\n";
    let p = Proxy::start(&yaml).await;
    for (method, path) in [
        (Method::GET, "/api/v1/config"),
        (Method::GET, "/api/v1/backends"),
        (Method::GET, "/metrics"),
        (Method::POST, "/api/v1/backends/disconnect?upstream=default&backend_id=a"),
    ] {
        let (status, v) = call(method.clone(), &p.admin_url(path), None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {v}");
        assert!(v["error"].is_string());
        let (status, _) = call(method.clone(), &p.admin_url(path), None, Some("wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, _) = call(method, &p.admin_url(path), None, Some("s3cret")).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_and_names_are_bounded_and_bad_ones_change_nothing() {
    let (_a, _b, p) = two_backends("round_robin").await;
    let long = "x".repeat(65);
    let huge = "y".repeat(100_000);
    for id in [long.as_str(), "has space", "slash/id", "q?x", "", "ünï"] {
        let body = json!({"upstream": "default", "backend": {"id": id, "host": "127.0.0.1", "port": 9}}).to_string();
        let msg = rejected(&p, Method::POST, "/api/v1/backends/add", Some(&body), StatusCode::BAD_REQUEST).await;
        assert!(msg.contains(".id"), "{id:?}: {msg}");
    }
    // A 100 KB id used to be accepted; the body limit or the id bound refuses it, as JSON.
    let body = json!({"upstream": "default", "backend": {"id": huge, "host": "127.0.0.1", "port": 9}}).to_string();
    let (status, v) = call(Method::POST, &p.admin_url("/api/v1/backends/add"), Some(&body), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].is_string(), "{v}");
    // 64 characters of the allowed set are fine.
    let ok = format!("{}.b_1-Z", "a".repeat(58));
    let body = json!({"upstream": "default", "backend": {"id": ok, "host": "127.0.0.1", "port": 9}}).to_string();
    let (status, v) = call(Method::POST, &p.admin_url("/api/v1/backends/add"), Some(&body), None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");

    // References to ids that could name nothing are 400 too, before any lookup.
    let bad_refs = [
        (Method::DELETE, format!("/api/v1/backends/remove?upstream=default&backend_id={long}")),
        (Method::POST, "/api/v1/backends/disconnect?upstream=default&backend_id=a%20b".to_owned()),
        (Method::GET, format!("/api/v1/stats/backend?upstream={long}&backend_id=a")),
    ];
    for (method, path) in bad_refs {
        let msg = rejected(&p, method, &path, None, StatusCode::BAD_REQUEST).await;
        assert!(msg.contains("id or name"), "{path}: {msg}");
    }
    let body = json!({"upstream": "default", "backend": {"id": "a b", "weight": 5}}).to_string();
    rejected(&p, Method::PUT, "/api/v1/backends/update", Some(&body), StatusCode::BAD_REQUEST).await;
    let body = json!({"upstream": "default", "backend_id": long, "performance": {"cpu_usage": 1.0}}).to_string();
    rejected(&p, Method::POST, "/api/v1/report", Some(&body), StatusCode::BAD_REQUEST).await;
    // Upstream and route names through a config change.
    let body = json!({"config": {"routing": {"bad route": {"upstream": "default"}}}}).to_string();
    let msg = rejected(&p, Method::PUT, "/api/v1/config", Some(&body), StatusCode::BAD_REQUEST).await;
    assert!(msg.contains("route name"), "{msg}");
}

/// The README's curl examples send `-d` without a JSON content type (curl then says
/// `application/x-www-form-urlencoded`), or none at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_are_accepted_whatever_the_content_type() {
    let (_a, _b, p) = two_backends("round_robin").await;
    let c = client();
    for (n, content_type) in
        [None, Some("application/x-www-form-urlencoded"), Some("text/plain")].into_iter().enumerate()
    {
        let body = json!({"upstream": "default", "backend": {"id": format!("c{n}"), "host": "127.0.0.1", "port": 9}});
        let mut req = http::Request::post(p.admin_url("/api/v1/backends/add"));
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req)).await.unwrap().unwrap();
        let status = resp.status();
        let json: Value = {
            use http_body_util::BodyExt;
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).expect("a JSON answer")
        };
        assert_eq!(status, StatusCode::CREATED, "content-type {content_type:?}: {json}");
        assert_eq!(json["id"], format!("c{n}"));
    }
    // Malformed JSON is still a JSON 400.
    let msg =
        rejected(&p, Method::POST, "/api/v1/backends/add", Some("upstream=default"), StatusCode::BAD_REQUEST).await;
    assert!(msg.contains("JSON"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announce_calls_where_nothing_is_announced_are_refused_and_change_nothing() {
    let (_a, _b, p) = two_backends("round_robin").await;
    for (method, path) in [
        (Method::GET, "/api/v1/announce"),
        (Method::POST, "/api/v1/announce/drain"),
        (Method::POST, "/api/v1/announce/undrain"),
    ] {
        let msg = rejected(&p, method, path, None, StatusCode::CONFLICT).await;
        assert!(msg.contains("announce is not running"), "{path}: {msg}");
    }
}
