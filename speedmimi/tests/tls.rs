//! TLS as clients and backends see it: termination with HTTP/1.1 and h2 by ALPN, certificate
//! errors at startup, hot reload under live connections, SNI, and `https` backends.

mod support;

use std::{convert::Infallible, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, client::conn::http2, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::{
    ServerConfig,
    pki_types::{PrivateKeyDer, pem::PemObject},
};
use speedmimi::{
    Listeners,
    config::Config,
    datapath::Userspace,
    proxy::{admission::Admission, server::Listener},
    shutdown::{self, Trigger},
    state::State,
};
use support::{
    Origin, Proxy, backend_yaml, client, get, one_route,
    tls::{Ca, Leaf, TempDir, h1, peer_cert, ring, send, ssl_yaml, tls_connect},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::{TlsAcceptor, client::TlsStream};

const WAIT: Duration = Duration::from_secs(10);

fn alpn(s: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

fn header_of(dump: &str, name: &str) -> Option<String> {
    dump.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_serves_http1_with_forwarded_proto() {
    let (dir, ca) = (TempDir::new(), Ca::new());
    let (cert, key) = ca.issue(&["localhost"]).write(&dir, "server");
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", &ssl_yaml(&cert, &key, true, ""))).await;
    let https = proxy.https.expect("HTTPS listener");

    // A client that does not speak TLS is dropped without harm to anyone else.
    let mut plain = TcpStream::connect(https).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut sink)).await.expect("non-TLS client closed");

    let tls = tls_connect(https, &ca, "localhost", &[b"http/1.1"]).await;
    assert_eq!(alpn(&tls).as_deref(), Some(&b"http/1.1"[..]));
    let mut sender = h1(tls).await;
    let (status, seen) = send(&mut sender, "/headers").await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(header_of(&seen, "x-forwarded-proto").as_deref(), Some("https"), "{seen}");
    assert_eq!(send(&mut sender, "/").await, (StatusCode::OK, "b1\n".to_owned()));

    // The plain listener still speaks plain HTTP, and says so.
    let (status, _, seen) = get(&client(), &proxy.url("/headers"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header_of(&seen, "x-forwarded-proto").as_deref(), Some("http"), "{seen}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_is_negotiated_by_alpn() {
    let (dir, ca) = (TempDir::new(), Ca::new());
    let (cert, key) = ca.issue(&["localhost"]).write(&dir, "server");
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", &ssl_yaml(&cert, &key, true, ""))).await;

    let tls = tls_connect(proxy.https.unwrap(), &ca, "localhost", &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]));
    let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    for path in ["/", "/headers"] {
        let req = Request::get(format!("https://localhost{path}")).body(Empty::<Bytes>::new()).unwrap();
        let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await.unwrap().unwrap();
        assert_eq!((resp.status(), resp.version()), (StatusCode::OK, http::Version::HTTP_2));
        let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        match path {
            "/" => assert_eq!(body, "b1\n"),
            _ => assert_eq!(header_of(&body, "x-forwarded-proto").as_deref(), Some("https"), "{body}"),
        }
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ssl_port_the_http_port_serves_tls() {
    let (dir, ca) = (TempDir::new(), Ca::new());
    let (cert, key) = ca.issue(&["localhost"]).write(&dir, "server");
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", &ssl_yaml(&cert, &key, false, ""))).await;
    assert!(proxy.https.is_none());
    let mut sender = h1(tls_connect(proxy.addr, &ca, "localhost", &[b"http/1.1"]).await).await;
    assert_eq!(send(&mut sender, "/").await, (StatusCode::OK, "b1\n".to_owned()));
    proxy.stop().await;
}

/// Starts with `yaml` and expects startup to fail; returns the error.
async fn startup_error(yaml: &str) -> String {
    let config = Config::parse(yaml).unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listeners = Listeners { http, grpc: None, https: None, admin: None };
    let (_stop, wait) = shutdown::channel();
    let run = speedmimi::run_with(config, listeners, Arc::new(Userspace), wait, None);
    let result = tokio::time::timeout(WAIT, run).await.expect("startup should fail, not serve");
    result.expect_err("bad certificate files must fail startup").to_string()
}

#[tokio::test]
async fn bad_certificate_files_are_startup_errors_naming_the_file() {
    let (dir, ca) = (TempDir::new(), Ca::new());
    let (cert, _) = ca.issue(&["localhost"]).write(&dir, "a");
    let (_, other_key) = ca.issue(&["localhost"]).write(&dir, "b");
    let route = |ssl: String| one_route(&backend_yaml("b1", "127.0.0.1:9".parse().unwrap(), 100), "round_robin", &ssl);

    let e = startup_error(&route(ssl_yaml(&cert, &other_key, false, ""))).await;
    assert!(e.contains("does not match") && e.contains(&*other_key.to_string_lossy()), "{e}");

    let garbage = dir.write("garbage.crt", "this is not a certificate\n");
    let e = startup_error(&route(ssl_yaml(&garbage, &other_key, false, ""))).await;
    assert!(e.contains("no PEM certificate") && e.contains(&*garbage.to_string_lossy()), "{e}");

    let broken = dir.write("broken.crt", "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n");
    let e = startup_error(&route(ssl_yaml(&broken, &other_key, false, ""))).await;
    assert!(e.contains("bad PEM") && e.contains(&*broken.to_string_lossy()), "{e}");

    let e = startup_error(&route(ssl_yaml(&cert, &cert, false, ""))).await;
    assert!(e.contains("no PEM private key") && e.contains(&*cert.to_string_lossy()), "{e}");

    let missing = dir.0.join("missing.key");
    let e = startup_error(&route(ssl_yaml(&cert, &missing, false, ""))).await;
    assert!(e.contains("cannot read") && e.contains(&*missing.to_string_lossy()), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_new_certificate_to_new_handshakes_only() {
    let (dir, ca) = (TempDir::new(), Ca::new());
    let first = ca.issue(&["localhost"]);
    let (cert, key) = first.write(&dir, "server");
    let o = Origin::start("b1").await;
    let yaml = one_route(&o.yaml(100), "round_robin", &ssl_yaml(&cert, &key, false, ""));
    let state = Arc::new(State::new(Config::parse(&yaml).unwrap(), Arc::new(Userspace)).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, wait) = shutdown::channel();
    let limit = Admission { slots: Arc::new(Semaphore::new(100)), per_client: None };
    let server = tokio::spawn(speedmimi::proxy::serve(listener, state.clone(), Listener::Https, limit, wait));

    let old = tls_connect(addr, &ca, "localhost", &[b"http/1.1"]).await;
    assert_eq!(peer_cert(&old), first.der);
    let mut old = h1(old).await;
    assert_eq!(send(&mut old, "/").await.0, StatusCode::OK);

    let second = ca.issue(&["localhost"]);
    second.write(&dir, "server");
    state.reload_tls().expect("reload with good files");
    let new = tls_connect(addr, &ca, "localhost", &[b"http/1.1"]).await;
    assert_eq!(peer_cert(&new), second.der, "a new handshake gets the new certificate");
    let mut new = h1(new).await;
    assert_eq!(send(&mut new, "/").await.0, StatusCode::OK);
    assert_eq!(send(&mut old, "/").await, (StatusCode::OK, "b1\n".to_owned()), "the older connection lives on");

    // Broken files are refused and the certificate in use stays.
    dir.write("server.crt", "garbage");
    let e = state.reload_tls().expect_err("garbage certificate").to_string();
    assert!(e.contains(&*cert.to_string_lossy()), "{e}");
    let third = ca.issue(&["localhost"]);
    dir.write("server.crt", &third.pem);
    let e = state.reload_tls().expect_err("certificate without its key").to_string();
    assert!(e.contains("does not match"), "{e}");
    let again = tls_connect(addr, &ca, "localhost", &[b"http/1.1"]).await;
    assert_eq!(peer_cert(&again), second.der, "the last good certificate still serves");
    assert_eq!(send(&mut h1(again).await, "/").await.0, StatusCode::OK);

    drop((old, new));
    stop.fire();
    tokio::time::timeout(Duration::from_secs(15), server).await.expect("graceful stop").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_matching_certificate() {
    let (dir, ca) = (TempDir::new(), Ca::new());
    let default = ca.issue(&["localhost", "other.test"]);
    let (api, wild) = (ca.issue(&["api.test"]), ca.issue(&["*.wild.test"]));
    let (cert, key) = default.write(&dir, "default");
    let (api_cert, api_key) = api.write(&dir, "api");
    let (wild_cert, wild_key) = wild.write(&dir, "wild");
    let entry = |name: &str, c: &Path, k: &Path| {
        format!(
            "    - server_name: \"{name}\"\n      cert_file: \"{}\"\n      key_file: \"{}\"\n",
            c.display(),
            k.display()
        )
    };
    let sni = format!(
        "  certificates:\n{}{}",
        entry("API.test", &api_cert, &api_key),
        entry("*.wild.test", &wild_cert, &wild_key)
    );
    let o = Origin::start("b1").await;
    let proxy = Proxy::start(&one_route(&o.yaml(100), "round_robin", &ssl_yaml(&cert, &key, true, &sni))).await;
    let https = proxy.https.unwrap();

    for (name, want) in [("api.test", &api), ("x.wild.test", &wild), ("other.test", &default), ("localhost", &default)]
    {
        let tls = tls_connect(https, &ca, name, &[b"http/1.1"]).await;
        assert!(peer_cert(&tls) == want.der, "{name} got the wrong certificate");
    }
    proxy.stop().await;
}

#[test]
fn sni_entries_are_validated() {
    let yaml = |names: &[&str]| {
        let list: String = names
            .iter()
            .map(|n| format!("    - server_name: \"{n}\"\n      cert_file: a\n      key_file: b\n"))
            .collect();
        let ssl = format!("ssl:\n  enabled: true\n  certificates:\n{list}");
        one_route(&backend_yaml("b1", "127.0.0.1:9".parse().unwrap(), 100), "round_robin", &ssl)
    };
    assert!(Config::parse(&yaml(&["a.test", "*.b.test"])).is_ok());
    let e = Config::parse(&yaml(&["a.test", ""])).unwrap_err().to_string();
    assert!(e.contains("ssl.certificates[1].server_name"), "{e}");
    let e = Config::parse(&yaml(&["a.test", "A.test"])).unwrap_err().to_string();
    assert!(e.contains("ssl.certificates[1].server_name") && e.contains("duplicate"), "{e}");
    let e = Config::parse(&yaml(&["a.*.test"])).unwrap_err().to_string();
    assert!(e.contains("ssl.certificates[0].server_name"), "{e}");
}

/// An https origin answering `<id> <version> <alpn>`; an `Upgrade` request gets 101 and an echo.
struct TlsOrigin {
    addr: SocketAddr,
    _stop: Trigger,
}

impl TlsOrigin {
    async fn start(id: &'static str, leaf: &Leaf) -> TlsOrigin {
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut config = ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der.clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, wait) = shutdown::channel();
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    r = listener.accept() => r.unwrap().0,
                    _ = wait.wait() => return,
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that rejects our certificate ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let alpn = String::from_utf8_lossy(tls.get_ref().1.alpn_protocol().unwrap_or(b"-")).into_owned();
                    let service = service_fn(move |req| answer(id, alpn.clone(), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection_with_upgrades(TokioIo::new(tls), service).await;
                });
            }
        });
        TlsOrigin { addr, _stop: stop }
    }

    fn yaml(&self, id: &str, verify: bool) -> String {
        format!("{}      scheme: https\n      tls_verify: {verify}\n", backend_yaml(id, self.addr, 100))
    }
}

async fn answer(id: &str, alpn: String, mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.headers().contains_key(header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = io.read(&mut buf).await {
                if io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "upgrade")
            .body(Full::default())
            .unwrap();
        return Ok(resp);
    }
    Ok(Response::new(Full::from(format!("{id} {:?} {alpn}", req.version()))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backend_without_verification() {
    let ca = Ca::new();
    let origin = TlsOrigin::start("tls1", &ca.issue(&["localhost", "127.0.0.1"])).await;
    let proxy = Proxy::start(&one_route(&origin.yaml("tls1", false), "round_robin", "")).await;

    // HTTP/1.1 over TLS, twice (the second on a pooled connection).
    for _ in 0..2 {
        let (status, _, body) = get(&client(), &proxy.url("/"), &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "tls1 HTTP/1.1 http/1.1"));
    }

    // gRPC goes upstream as h2, chosen by ALPN.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{}/pkg.Svc/Call", proxy.addr))
        .header(header::CONTENT_TYPE, "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"tls1 HTTP/2.0 h2");

    // An upgrade is relayed over a TLS backend connection.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let handshake = "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    s.write_all(handshake.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(WAIT, support::flows::read_head(&mut s)).await.unwrap().unwrap();
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s.write_all(b"ping over tls").await.unwrap();
    let mut echo = [0u8; 13];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(&echo, b"ping over tls");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backend_with_untrusted_certificate_is_a_bad_gateway() {
    let ca = Ca::new();
    let origin = TlsOrigin::start("tls1", &ca.issue(&["localhost", "127.0.0.1"])).await;
    let proxy = Proxy::start(&one_route(&origin.yaml("tls1", true), "round_robin", "")).await;
    let (status, _, body) = get(&client(), &proxy.url("/"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    proxy.stop().await;
}
