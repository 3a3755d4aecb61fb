//! Fuzz target: what SpeedMimi does with a request head before hyper's answer reaches a backend.
//! - protocol sniffing (`sniff_http1`): however the bytes are split into reads, it tells h2c's
//!   preface from HTTP/1, loses and reorders no byte, and gives up only on a client that left
//!   before its bytes could tell;
//! - Host admission (`admit_host`): an admitted request carries at most one Host (exactly one
//!   on HTTP/1.1), a valid authority without userinfo, equal to an absolute-form target's
//!   authority, and its target is in origin form;
//! - the framing scanner (`proxy/framing.rs`) reads the raw bytes: however the bytes are split
//!   into reads it decides the same, and a head httparse accepts with both Content-Length and
//!   Transfer-Encoding is flagged;
//! - the real-IP and forwarded headers (`proxy/headers.rs`): an untrusted peer's headers never
//!   choose the client address, and every hop-by-hop header, and every header `Connection`
//!   names, is gone;
//! - host routing (`Snapshot::route`) of the admitted request agrees with a plain model of the
//!   rules (longest prefix, host-specific first, port ignored, `*.suffix`);
//! - the own HTTP/1 engine (`proxy/h1/`): a head it serves itself goes to the backend with the
//!   same method and target, as HTTP/1.1, and with the very fields the hyper path would send
//!   (hop-by-hop removal, then the forwarded headers, for trusted and untrusted peers).
#![no_main]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, OnceLock},
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version, header::HOST, uri::Authority};
use libfuzzer_sys::fuzz_target;
use speedmimi::{
    config::Config,
    datapath::Userspace,
    fuzzing::{admit_host, framing_flagged, h1_upstream_head, sniff},
    proxy::headers::{Forwarded, canonical, client_ip, is_trusted, set_forwarded, strip_hop_by_hop},
    state::State,
};

const ROUTES: &str = "
server:
  trusted_proxies: [\"10.0.0.0/8\", \"::1\"]
  real_ip_header: X-Client-IP
backends:
  b:
    - {id: b1, host: 127.0.0.1, port: 9}
routing:
  any: {path: /, upstream: b}
  static: {path: /static/, upstream: b}
  api: {path: /api, host: api.example.com, upstream: b}
  wild: {path: /, host: \"*.example.com\", upstream: b}
  exact: {path: /, host: example.com, upstream: b}
";

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let config = Config::parse(ROUTES).expect("the routing config is valid");
        State::new(config, Arc::new(Userspace)).expect("state")
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (seed, data) = (u16::from_le_bytes([data[0], data[1]]), &data[2..]);
    sniffing(seed, data);
    framing(seed, data);
    own_engine(seed, data);

    let mut storage = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut storage);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else { return };
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) {
            headers.append(n, v);
        }
    }
    forwarding(seed, &headers);
    if let Some(admitted) = host_admission(&req, headers) {
        let host = admitted.headers().get(HOST).and_then(|v| v.to_str().ok());
        routing(host, admitted.uri().path());
    }
});

/// `data` cut into reads of 1 to 7 bytes, the cuts chosen by `seed`.
fn split(seed: u16, data: &[u8]) -> Vec<&[u8]> {
    let mut chunks = Vec::new();
    let (mut rest, mut x) = (data, u32::from(seed) | 1);
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (x as usize % 7 + 1).min(rest.len());
        chunks.push(&rest[..n]);
        rest = &rest[n..];
    }
    chunks
}

/// h2c or HTTP/1, told from the first reads without losing a byte.
fn sniffing(seed: u16, data: &[u8]) {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let reads = if seed & 0x100 == 0 { split(seed, data) } else { vec![data] };
    match sniff(reads.into_iter().map(<[u8]>::to_vec).collect()) {
        None => assert!(PREFACE.starts_with(data), "sniffing gave up on a client whose bytes told"),
        Some((http1, told, rest)) => {
            assert_eq!([&told[..], &rest[..]].concat(), data, "sniffing lost or reordered bytes");
            assert!(!told.is_empty(), "sniffing told from no byte");
            match http1 {
                true => assert!(!told.starts_with(PREFACE) && !PREFACE.starts_with(&told), "{told:?} taken for HTTP/1"),
                false => assert!(told.starts_with(PREFACE), "h2c without its preface"),
            }
        }
    }
}

/// The request hyper would hand the handler, through Host admission: the admitted request, or
/// None when it is refused (400) or hyper would not have parsed it.
fn host_admission(req: &httparse::Request, headers: HeaderMap) -> Option<Request<()>> {
    let target: Uri = req.path?.parse().ok()?;
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let version = if req.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut r = Request::builder().method(method).uri(target.clone()).version(version).body(()).ok()?;
    *r.headers_mut() = headers;
    admit_host(&mut r).ok()?;
    let hosts: Vec<&HeaderValue> = r.headers().get_all(HOST).iter().collect();
    assert!(hosts.len() <= 1, "{} Host headers admitted", hosts.len());
    assert!(r.uri().authority().is_none() && r.uri().scheme().is_none(), "target {} not in origin form", r.uri());
    if let Some(authority) = target.authority() {
        assert_eq!(
            hosts.first().map(|h| h.as_bytes()),
            Some(authority.as_str().as_bytes()),
            "Host is not the target's authority"
        );
    } else if version == Version::HTTP_11 {
        assert_eq!(hosts.len(), 1, "an HTTP/1.1 request admitted without Host");
    }
    if let Some(h) = hosts.first() {
        assert!(!h.as_bytes().contains(&b'@'), "userinfo in the admitted Host {h:?}");
        assert!(Authority::try_from(h.as_bytes()).is_ok(), "admitted Host {h:?} is not an authority");
    }
    Some(r)
}

/// Split invariance, and CL+TE in a head httparse accepts is flagged.
fn framing(seed: u16, data: &[u8]) {
    let whole = framing_flagged([data]);
    let chunks = split(seed, data);
    assert_eq!(framing_flagged(chunks), whole, "the scanner's verdict depends on how reads split the bytes");

    let mut storage = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut storage);
    if let Ok(httparse::Status::Complete(len)) = req.parse(data) {
        let has = |name: &str| req.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
        if has("content-length") && has("transfer-encoding") {
            assert!(
                framing_flagged([&data[..len]]),
                "a head with Content-Length and Transfer-Encoding was not flagged"
            );
        }
    }
}

/// Real IP, forwarded headers and hop-by-hop removal, for a peer chosen by `seed`.
fn forwarding(seed: u16, headers: &HeaderMap) {
    let peer = match seed % 4 {
        0 => IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        1 => IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        2 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V6(Ipv4Addr::new(10, 9, 9, 9).to_ipv6_mapped()),
    };
    let settings = &state().snapshot().settings;
    let real_ip_header = &settings.real_ip_header;
    let trusted = is_trusted(peer, &settings.trusted_proxies);
    let client = client_ip(peer, trusted, headers, real_ip_header);
    if !trusted {
        assert_eq!(client, canonical(peer), "an untrusted peer chose its client address");
    }
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h, false, false);
    for name in ["connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer", "proxy-connection"] {
        assert!(!h.contains_key(name), "hop-by-hop {name} survived");
    }
    for value in headers.get_all(http::header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if let Ok(name) = HeaderName::from_bytes(token) {
                assert!(!h.contains_key(&name), "{name}, listed in Connection, survived");
            }
        }
    }
    let peer_value = HeaderValue::try_from(canonical(peer).to_string()).unwrap();
    let f = Forwarded { peer: &peer_value, trusted, client, proto: "http" };
    set_forwarded(&mut h, &f, real_ip_header);
    let real = h.get("x-real-ip").expect("X-Real-IP set");
    assert_eq!(h.get(real_ip_header), Some(real), "the real-IP header and X-Real-IP differ");
    if trusted {
        assert_eq!(real, client.to_string().as_str());
        let xff = h.get("x-forwarded-for").expect("X-Forwarded-For set").to_str().unwrap();
        assert!(xff.ends_with(peer_value.to_str().unwrap()), "X-Forwarded-For {xff:?} does not end with the peer");
    } else {
        assert_eq!(real, &peer_value);
        assert_eq!(h.get("x-forwarded-for"), Some(&peer_value), "an untrusted peer's X-Forwarded-For survived");
    }
}

/// `Snapshot::route` against a model of ROUTES.
fn routing(host: Option<&str>, path: &str) {
    let snap = state().snapshot();
    let got = snap.route(host, path).map(|r| r.name.as_str());
    let bare = host.map(|h| match h.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest).to_owned(),
        None => match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
            _ => h.to_owned(),
        },
    });
    let bare = bare.map(|h| h.to_ascii_lowercase());
    let host_is = |want: &str| bare.as_deref() == Some(want);
    let under_example = bare.as_deref().is_some_and(|h| h.len() > ".example.com".len() && h.ends_with(".example.com"));
    let want = if path.starts_with("/static/") {
        "static"
    } else if path.starts_with("/api") && host_is("api.example.com") {
        "api"
    } else if path.starts_with('/') && host_is("example.com") {
        "exact"
    } else if path.starts_with('/') && under_example {
        "wild"
    } else if path.starts_with('/') {
        "any"
    } else {
        ""
    };
    assert_eq!(got.unwrap_or(""), want, "host {host:?} path {path:?}");
}

/// The own HTTP/1 engine's upstream head against the hyper path's edits of the same head.
fn own_engine(seed: u16, data: &[u8]) {
    static ENGINE: OnceLock<Arc<State>> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        let config = Config::parse(ROUTES).expect("the routing config is valid");
        Arc::new(State::new(config, Arc::new(Userspace)).expect("state"))
    });
    let peers: [IpAddr; 5] = [
        Ipv4Addr::new(10, 0, 0, 7).into(),
        Ipv4Addr::new(192, 0, 2, 9).into(),
        Ipv6Addr::LOCALHOST.into(),
        Ipv4Addr::new(10, 0, 0, 8).to_ipv6_mapped().into(),
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
    ];
    let peer = SocketAddr::new(peers[seed as usize % peers.len()], 40000);
    let Some(out) = h1_upstream_head(engine, peer, data) else { return };

    // The engine takes up to 100 fields, as hyper does.
    let mut storage = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut storage);
    assert!(matches!(req.parse(data), Ok(httparse::Status::Complete(_))), "served a head httparse does not take");
    let mut sent = [httparse::EMPTY_HEADER; 110];
    let mut up = httparse::Request::new(&mut sent);
    let parsed = up.parse(&out);
    assert!(matches!(parsed, Ok(httparse::Status::Complete(n)) if n == out.len()), "{:?}", String::from_utf8_lossy(&out));
    assert_eq!((up.method, up.path, up.version), (req.method, req.path, Some(1)));

    // What the hyper path sends for the same head.
    let settings = &engine.snapshot().settings;
    let mut model = HeaderMap::new();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).expect("served a head with a name hyper refuses");
        let value = HeaderValue::from_bytes(h.value).expect("served a head with a value hyper refuses");
        model.append(name, value);
    }
    let trusted = is_trusted(peer.ip(), &settings.trusted_proxies);
    let client = client_ip(peer.ip(), trusted, &model, &settings.real_ip_header);
    strip_hop_by_hop(&mut model, false, false);
    let peer_value = HeaderValue::try_from(canonical(peer.ip()).to_string()).expect("an address");
    let forwarded = Forwarded { peer: &peer_value, trusted, client, proto: "http" };
    set_forwarded(&mut model, &forwarded, &settings.real_ip_header);

    let mut want: BTreeMap<String, Vec<&[u8]>> = BTreeMap::new();
    for (name, value) in &model {
        want.entry(name.as_str().to_owned()).or_default().push(value.as_bytes());
    }
    let mut got: BTreeMap<String, Vec<&[u8]>> = BTreeMap::new();
    for h in up.headers.iter() {
        got.entry(h.name.to_ascii_lowercase()).or_default().push(h.value);
    }
    assert_eq!(got, want, "the engines send different fields for {:?}", String::from_utf8_lossy(data));
}
