//! Header rules of a proxy hop: hop-by-hop removal (including the headers `Connection` names),
//! the resolved client address, and the forwarded headers, trusted only from trusted peers.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};
use ipnet::IpNet;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The hop-by-hop headers of RFC 9110 §7.6.1 (and the non-standard ones still seen), lower case.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "proxy-authenticate",
    "proxy-authorization",
    "keep-alive",
    "proxy-connection",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Removes hop-by-hop headers and those listed in `Connection`. With `keep_upgrade`, the
/// `Upgrade` header and a `Connection: upgrade` survive (a WebSocket handshake being relayed).
/// With `keep_te_trailers`, `TE: trailers` survives (gRPC needs it end to end).
/// One pass over the names finds nothing to do in the usual case.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool, keep_te_trailers: bool) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Every `Connection` field counts (a client may send several), and its tokens are read as
    // bytes: one non-ASCII byte elsewhere in the value must not hide the names it lists.
    // The usual `keep-alive`/`close`/`upgrade` tokens name nothing else.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .filter(|t| !["keep-alive", "close", "upgrade"].iter().any(|k| t.eq_ignore_ascii_case(k.as_bytes())))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(&name);
        }
    }
    let te_trailers = keep_te_trailers
        && headers.get(header::TE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("trailers"));
    let upgrade = if keep_upgrade { headers.remove(header::UPGRADE) } else { None };
    let present: Vec<HeaderName> = headers.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for name in present {
        headers.remove(name);
    }
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether a field value contains `needle`, ASCII case ignored (`application/grpc`,
/// `websocket`, `text/event-stream` in the fields that name a request's kind).
pub fn contains_ignore_case(value: &[u8], needle: &[u8]) -> bool {
    value.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    let peer = canonical(peer);
    trusted.iter().any(|n| n.contains(&peer))
}

/// IPv4-mapped IPv6 peers compare as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the real-IP header's value when the peer is trusted and sent a valid
/// one, the peer's own address otherwise.
pub fn client_ip(peer: IpAddr, peer_trusted: bool, headers: &HeaderMap, real_ip_header: &HeaderName) -> IpAddr {
    if peer_trusted
        && let Some(ip) = headers.get(real_ip_header).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
    {
        return canonical(ip);
    }
    canonical(peer)
}

/// What the forwarded headers are made of.
pub struct Forwarded<'a> {
    /// The peer's address as a header value (made once per connection).
    pub peer: &'a HeaderValue,
    pub trusted: bool,
    /// The resolved client address.
    pub client: IpAddr,
    pub proto: &'static str,
}

/// Sets `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Real-IP` (and the configured real-IP header).
/// From a trusted peer the existing chain is extended; from anyone else it is replaced.
pub fn set_forwarded(headers: &mut HeaderMap, f: &Forwarded<'_>, real_ip_header: &HeaderName) {
    let client = if f.trusted {
        let peer = f.peer.to_str().unwrap_or_default();
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {peer}"),
            _ if f.client.to_string() != peer => format!("{}, {peer}", f.client),
            _ => peer.to_owned(),
        };
        if let Ok(v) = HeaderValue::try_from(xff) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(f.proto));
        }
        HeaderValue::try_from(f.client.to_string()).expect("an IP address is a valid header value")
    } else {
        // The common case: everything is the peer, already formatted.
        headers.insert(X_FORWARDED_FOR.clone(), f.peer.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(f.proto));
        f.peer.clone()
    };
    if *real_ip_header != X_REAL_IP {
        headers.insert(real_ip_header.clone(), client.clone());
    }
    headers.insert(X_REAL_IP.clone(), client);
}

/// A message framed both by Content-Length and Transfer-Encoding (RFC 9112 §6.3: a sign of
/// smuggling). From a backend, hyper reads it as chunked; relaying it would leave the client a
/// Content-Length that does not match the body, so the proxy answers 502 instead.
pub fn both_framings(h: &HeaderMap) -> bool {
    h.contains_key(http::header::TRANSFER_ENCODING) && h.contains_key(http::header::CONTENT_LENGTH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    /// Found by the request_head fuzz target: only the first `Connection` field was read, so
    /// `Connection: close` + `Connection: X-Secret` forwarded X-Secret; and a value with a
    /// non-ASCII byte hid every name it listed.
    #[test]
    fn names_in_every_connection_field_go() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(header::CONNECTION, HeaderValue::from_static("X-Secret"));
        h.append(header::CONNECTION, HeaderValue::from_bytes(b"x-other, \xe9t\xe9").unwrap());
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false, false);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn upgrade_survives_when_relayed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true, false);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
