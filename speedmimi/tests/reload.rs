//! Reloading a running SpeedMimi: SIGHUP on the real binary (a good file is applied, a bad one
//! changes nothing, SIGTERM stops it cleanly), and certificate rotation through the admin API.

mod support;

use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use support::{
    Origin, Proxy, admin_call, client,
    daemon::{Daemon, free_ports},
    get, one_route,
    tls::{Ca, TempDir, h1, peer_cert, send, ssl_yaml, tls_connect},
};

const WAIT: Duration = Duration::from_secs(10);

/// One admin call; returns status and the JSON answer.
async fn call(method: Method, url: &str) -> (StatusCode, Value) {
    admin_call(method, url, None, None, WAIT).await
}

// ---- SIGHUP on the binary ----

fn daemon_yaml(port: u16, admin: u16, backends: &str, upstream: &str) -> String {
    format!(
        "server:\n  host: \"127.0.0.1\"\n  port: {port}\nbackends:\n  default:\n{backends}\
         routing:\n  default:\n    path: /\n    upstream: {upstream}\n    load_balancer: round_robin\n\
         grpc:\n  enabled: false\nadmin:\n  host: \"127.0.0.1\"\n  port: {admin}\nebpf:\n  enabled: false\n"
    )
}

/// The backend ids a GET of `/` reaches, or why not.
async fn try_who(url: &str) -> Result<String, String> {
    let req = Request::get(url).body(Full::default()).unwrap();
    match tokio::time::timeout(Duration::from_secs(2), client().request(req)).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Ok(Ok(resp)) => {
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| format!("{e:?}"))?.to_bytes();
            let body = String::from_utf8_lossy(&body).trim().to_owned();
            if status == StatusCode::OK { Ok(body) } else { Err(format!("{status}: {body}")) }
        }
    }
}

/// Polls (bounded) until a GET of `/` reaches `id`.
async fn until_reaches(url: &str, id: &str, daemon: &Daemon) {
    let mut last = Err(String::from("never asked"));
    for _ in 0..200 {
        last = try_who(url).await;
        if last.as_deref() == Ok(id) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("requests never reached {id:?}; last answer {last:?}\n--- log ---\n{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_file_ignores_a_bad_one_and_sigterm_stops_cleanly() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let dir = TempDir::new();
    let (port, admin) = free_ports();
    let config = dir.write("config.yaml", &daemon_yaml(port, admin, &a.yaml(100), "default"));
    let mut daemon = Daemon::spawn(&config, dir.0.join("daemon.log"));
    let url = format!("http://127.0.0.1:{port}/");
    let admin_url = |path: &str| format!("http://127.0.0.1:{admin}{path}");
    until_reaches(&url, "a", &daemon).await;

    // A good file: the next requests go to b, and the admin API shows it.
    dir.write("config.yaml", &daemon_yaml(port, admin, &b.yaml(100), "default"));
    daemon.signal("HUP");
    until_reaches(&url, "b", &daemon).await;
    let (status, running) = call(Method::GET, &admin_url("/api/v1/config")).await;
    assert_eq!(status, StatusCode::OK, "{running}");
    assert_eq!(running["backends"]["default"][0]["id"], "b", "{running}");
    assert_eq!(running["backends"]["default"].as_array().map(Vec::len), Some(1), "{running}");

    // A bad file (a route to an unknown upstream): rejected with a log line saying why, and
    // nothing changes.
    let logged = daemon.log().len();
    dir.write("config.yaml", &daemon_yaml(port, admin, &b.yaml(100), "nope"));
    let a_before = a.requests();
    daemon.signal("HUP");
    let mut said = false;
    for _ in 0..200 {
        if daemon.log().get(logged..).is_some_and(|new| new.contains("nope")) {
            said = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(said, "no log line names the bad upstream after SIGHUP\n--- log ---\n{}", daemon.log());
    let c = client();
    for _ in 0..5 {
        let (status, _, body) = get(&c, &url, &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "b\n"));
    }
    assert_eq!(a.requests(), a_before);
    let (status, after) = call(Method::GET, &admin_url("/api/v1/config")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(after, running, "a rejected SIGHUP reload changed the running config");
    assert!(daemon.child.try_wait().unwrap().is_none(), "a bad file stopped the daemon");

    // SIGTERM, with an idle keep-alive client connected: a clean exit.
    daemon.signal("TERM");
    let status = daemon.exit(Duration::from_secs(20)).await;
    assert!(status.is_some(), "speedmimi did not exit within 20s of SIGTERM\n--- log ---\n{}", daemon.log());
    let status = status.unwrap();
    assert!(status.success(), "exit status {status:?}\n--- log ---\n{}", daemon.log());
    drop(c);
}

// ---- certificate rotation through the admin API ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_ssl_rotates_the_certificate_for_new_handshakes_and_refuses_garbage() {
    let (dir, ca) = (TempDir::new(), Ca::new());
    let first = ca.issue(&["localhost"]);
    let (cert, key) = first.write(&dir, "server");
    let o = Origin::start("t1").await;
    let p = Proxy::start(&one_route(&o.yaml(100), "round_robin", &ssl_yaml(&cert, &key, true, ""))).await;
    let https = p.https.expect("HTTPS listener");

    let a = tls_connect(https, &ca, "localhost", &[b"http/1.1"]).await;
    assert!(peer_cert(&a) == first.der, "the first handshake got another certificate");
    let mut a = h1(a).await;
    assert_eq!(send(&mut a, "/").await, (StatusCode::OK, "t1\n".to_owned()));

    let second = ca.issue(&["localhost"]);
    assert_eq!(second.write(&dir, "server"), (cert.clone(), key.clone()));
    let (status, v) = call(Method::POST, &p.admin_url("/api/v1/config/reload-ssl")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let b = tls_connect(https, &ca, "localhost", &[b"http/1.1"]).await;
    assert!(peer_cert(&b) == second.der, "a handshake after reload-ssl did not get the new certificate");
    let mut b = h1(b).await;
    assert_eq!(send(&mut b, "/").await, (StatusCode::OK, "t1\n".to_owned()));
    assert_eq!(send(&mut a, "/").await, (StatusCode::OK, "t1\n".to_owned()), "the older connection broke");

    // A garbage certificate: 400 naming the file; the second certificate keeps serving.
    dir.write("server.crt", "this is not a certificate\n");
    let (status, v) = call(Method::POST, &p.admin_url("/api/v1/config/reload-ssl")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["error"].as_str().unwrap_or_else(|| panic!("error is not JSON {{\"error\"}}: {v}"));
    assert!(msg.contains(&*cert.to_string_lossy()), "the error does not name {}: {msg}", cert.display());
    for _ in 0..2 {
        let again = tls_connect(https, &ca, "localhost", &[b"http/1.1"]).await;
        assert!(peer_cert(&again) == second.der, "a refused reload changed the certificate");
        assert_eq!(send(&mut h1(again).await, "/").await, (StatusCode::OK, "t1\n".to_owned()));
    }
    assert_eq!(send(&mut a, "/").await, (StatusCode::OK, "t1\n".to_owned()));
    assert_eq!(send(&mut b, "/").await, (StatusCode::OK, "t1\n".to_owned()));
    drop((a, b));
    p.stop().await;
}
