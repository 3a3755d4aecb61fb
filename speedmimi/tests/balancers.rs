//! Each balancer seen from a client, through real sockets: shares, stickiness, avoidance of a
//! slow backend, retry past a dead one, and what happens when nothing is eligible.

mod support;

use std::{collections::HashMap, time::Duration};

use http::StatusCode;
use support::{Origin, Proxy, admin_call, backend_yaml, client, dead_addr, get, one_route, who};

/// Bound on one admin call.
const ADMIN_WAIT: Duration = Duration::from_secs(10);

async fn origins(n: usize) -> Vec<Origin> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Origin::start(&format!("b{}", i + 1)).await);
    }
    v
}

/// `n` sequential keep-alive GETs of `/`, counted by backend id.
async fn tally(proxy: &Proxy, n: usize, headers: impl Fn(usize) -> Vec<(String, String)>) -> HashMap<String, usize> {
    let c = client();
    let mut counts = HashMap::new();
    for i in 0..n {
        let h = headers(i);
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        *counts.entry(who(&c, &proxy.url("/"), &h).await).or_insert(0) += 1;
    }
    counts
}

fn no_headers(_: usize) -> Vec<(String, String)> {
    Vec::new()
}

/// X-Real-IP for client number `i`, trusted because the proxy trusts 127.0.0.1.
fn client_ip(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

const TRUST_LOCAL: &str = "  trusted_proxies: [\"127.0.0.1/32\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_rotates_evenly() {
    let o = origins(3).await;
    let ups: String = o.iter().map(|x| x.yaml(100)).collect();
    let proxy = Proxy::start(&one_route(&ups, "round_robin", "")).await;
    let counts = tally(&proxy, 300, no_headers).await;
    for x in &o {
        assert_eq!(counts.get(&x.backend.id), Some(&100), "{counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_shares_follow_weights_over_full_cycles() {
    let o = origins(3).await;
    let weights = [50, 30, 20];
    let ups: String = o.iter().zip(weights).map(|(x, w)| x.yaml(w)).collect();
    let proxy = Proxy::start(&one_route(&ups, "weight", "")).await;
    // 100 full cycles of 10.
    let counts = tally(&proxy, 1000, no_headers).await;
    for (x, w) in o.iter().zip(weights) {
        let got = counts.get(&x.backend.id).copied().unwrap_or(0) as f64 / 1000.0;
        let want = w as f64 / 100.0;
        assert!((got - want).abs() <= 0.02, "{}: share {got}, weight share {want}: {counts:?}", x.backend.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_is_sticky_and_spread_by_weight() {
    let o = origins(3).await;
    let weights = [100, 100, 200];
    let ups: String = o.iter().zip(weights).map(|(x, w)| x.yaml(w)).collect();
    let proxy = Proxy::start(&one_route(&ups, "ip_hash", TRUST_LOCAL)).await;
    let c = client();
    let clients = 2000;
    let mut owner = Vec::with_capacity(clients);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..clients {
        let ip = client_ip(i);
        let id = who(&c, &proxy.url("/"), &[("x-real-ip", &ip)]).await;
        *counts.entry(id.clone()).or_default() += 1;
        owner.push(id);
    }
    for (x, w) in o.iter().zip(weights) {
        let got = counts.get(&x.backend.id).copied().unwrap_or(0) as f64 / clients as f64;
        let want = w as f64 / 400.0;
        assert!((got - want).abs() <= 0.05, "{}: share {got}, want {want}: {counts:?}", x.backend.id);
    }
    // Every client comes back to its backend.
    for (i, id) in owner.iter().enumerate().step_by(7) {
        for _ in 0..3 {
            assert_eq!(&who(&c, &proxy.url("/"), &[("x-real-ip", &client_ip(i))]).await, id, "client {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_moves_only_the_clients_of_a_dead_backend() {
    let mut o = origins(3).await;
    let ups: String = o.iter().map(|x| x.yaml(100)).collect();
    let proxy = Proxy::start(&one_route(&ups, "ip_hash", TRUST_LOCAL)).await;
    let c = client();
    let clients = 600;
    let mut before = Vec::new();
    for i in 0..clients {
        before.push(who(&c, &proxy.url("/"), &[("x-real-ip", &client_ip(i))]).await);
    }
    let dead = o.remove(1);
    let dead_id = dead.backend.id.clone();
    drop(dead);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut moved = 0;
    for (i, was) in before.iter().enumerate() {
        let now = who(&c, &proxy.url("/"), &[("x-real-ip", &client_ip(i))]).await;
        if *was == dead_id {
            assert_ne!(now, dead_id);
            moved += 1;
        } else {
            assert_eq!(&now, was, "client {i} of a live backend moved");
        }
    }
    assert!(moved > 0, "the dead backend had no clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_removal_moves_only_the_removed_backends_clients_and_readding_restores_them() {
    // Ten backends: a plain Maglev rebuild without one would move a sliver (1-2%) of the other
    // backends' clients too, which 1,500 clients show; the removed backend's place must be kept.
    let o = origins(10).await;
    let ups: String = o.iter().map(|x| x.yaml(100)).collect();
    let proxy = Proxy::start(&one_route(&ups, "ip_hash", TRUST_LOCAL)).await;
    let c = client();
    let clients = 1500;
    let mapping = |proxy: &Proxy| {
        let (c, url) = (c.clone(), proxy.url("/"));
        async move {
            let mut out = Vec::new();
            for i in 0..clients {
                out.push(who(&c, &url, &[("x-real-ip", &client_ip(i))]).await);
            }
            out
        }
    };
    let before = mapping(&proxy).await;
    let gone = o[2].backend.id.clone();
    let path = format!("/api/v1/backends/remove?upstream=default&backend_id={gone}");
    assert_eq!(
        admin_call(http::Method::DELETE, &proxy.admin_url(&path), None, None, ADMIN_WAIT).await.0,
        StatusCode::OK
    );
    let after = mapping(&proxy).await;
    let mut moved = 0;
    for (i, (was, now)) in before.iter().zip(&after).enumerate() {
        if *was == gone {
            assert_ne!(now, &gone, "client {i} still on the removed backend");
            moved += 1;
        } else {
            assert_eq!(now, was, "client {i} of a remaining backend moved");
        }
    }
    assert!(moved > 0, "the removed backend had no clients");

    // The removed backend comes back under its address: its clients return to it.
    let body = format!(
        r#"{{"upstream":"default","backend":{{"id":"{gone}","host":"127.0.0.1","port":{}}}}}"#,
        o[2].addr.port()
    );
    assert_eq!(
        admin_call(http::Method::POST, &proxy.admin_url("/api/v1/backends/add"), Some(&body), None, ADMIN_WAIT).await.0,
        StatusCode::CREATED
    );
    assert_eq!(mapping(&proxy).await, before, "re-adding restores every client's backend");
}

/// Fires `concurrency × per_task` requests from `concurrency` tasks at once and counts backends.
async fn concurrent_tally(proxy: &Proxy, concurrency: usize, per_task: usize) -> HashMap<String, usize> {
    support::spread(proxy, concurrency, concurrency * per_task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_a_slowed_backend() {
    let o = origins(3).await;
    o[0].backend.delay_ms.store(300, std::sync::atomic::Ordering::SeqCst);
    let ups: String = o.iter().map(|x| x.yaml(100)).collect();
    let proxy = Proxy::start(&one_route(&ups, "least_connections", "")).await;
    let counts = concurrent_tally(&proxy, 12, 10).await;
    let slow = counts.get("b1").copied().unwrap_or(0);
    let fast = counts.get("b2").copied().unwrap_or(0) + counts.get("b3").copied().unwrap_or(0);
    assert_eq!(slow + fast, 120);
    assert!(slow * 5 < fast, "slow backend got {slow} of 120: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_weight_loads_by_weight() {
    let o = origins(2).await;
    for x in &o {
        x.backend.delay_ms.store(100, std::sync::atomic::Ordering::SeqCst);
    }
    let ups = o[0].yaml(100) + &o[1].yaml(300);
    let proxy = Proxy::start(&one_route(&ups, "least_connections_weight", "")).await;
    let counts = concurrent_tally(&proxy, 16, 5).await;
    let (light, heavy) = (counts.get("b1").copied().unwrap_or(0), counts.get("b2").copied().unwrap_or(0));
    assert_eq!(light + heavy, 80);
    assert!(heavy >= 2 * light, "weights 100:300 but counts {light}:{heavy}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn performance_balancer_prefers_the_faster_backend() {
    let o = origins(2).await;
    o[0].backend.delay_ms.store(80, std::sync::atomic::Ordering::SeqCst);
    let ups: String = o.iter().map(|x| x.yaml(100)).collect();
    let proxy = Proxy::start(&one_route(&ups, "performance", "")).await;
    // One at a time, in-flight counts always tie: only observed latency can tell them apart.
    let counts = tally(&proxy, 40, no_headers).await;
    let slow = counts.get("b1").copied().unwrap_or(0);
    assert!(slow <= 4, "slow backend got {slow} of 40: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_saves_requests_when_a_backend_is_down() {
    let live = Origin::start("live").await;
    let ups = backend_yaml("dead", dead_addr().await, 100) + &live.yaml(100);
    let proxy = Proxy::start(&one_route(&ups, "round_robin", "")).await;
    let c = client();
    for _ in 0..20 {
        assert_eq!(who(&c, &proxy.url("/"), &[]).await, "live");
    }
    // Also for a request with a body.
    let req = http::Request::post(proxy.url("/echo")).body(http_body_util::Full::from("payload")).unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_eligible_is_503_and_dead_upstream_is_502() {
    let idle = Origin::start("idle").await;
    let inactive =
        format!("    - id: off\n      host: 127.0.0.1\n      port: {}\n      active: false\n", idle.addr.port());
    let proxy = Proxy::start(&one_route(&inactive, "round_robin", "")).await;
    let (status, _, body) = get(&client(), &proxy.url("/"), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(idle.requests(), 0);

    let dead = backend_yaml("dead", dead_addr().await, 100);
    let proxy = Proxy::start(&one_route(&dead, "round_robin", "")).await;
    let (status, _, _) = get(&client(), &proxy.url("/"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    // Now the dead backend sits out its cool-down: nothing is eligible.
    let (status, _, _) = get(&client(), &proxy.url("/"), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_overrides_pick_their_own_balancer() {
    // `/` round-robins, but SSE requests use ip_hash: one client keeps one backend for SSE.
    let o = origins(3).await;
    let ups: String = o.iter().map(|x| x.yaml(100)).collect();
    let yaml = one_route(&ups, "round_robin", TRUST_LOCAL) + "    protocols:\n      sse: ip_hash\n";
    let proxy = Proxy::start(&yaml).await;
    let c = client();
    let mut sse = std::collections::HashSet::new();
    let mut plain = std::collections::HashSet::new();
    for _ in 0..6 {
        let h = [("x-real-ip", "10.9.8.7"), ("accept", "text/event-stream")];
        sse.insert(who(&c, &proxy.url("/"), &h).await);
        plain.insert(who(&c, &proxy.url("/"), &[("x-real-ip", "10.9.8.7")]).await);
    }
    assert_eq!(sse.len(), 1, "{sse:?}");
    assert_eq!(plain.len(), 3, "{plain:?}");
}
