//! The own engine's reading of a request head: whether it serves the request itself, and the
//! head it sends upstream (hop-by-hop fields and those `Connection` lists removed, the
//! forwarded headers set as the hyper path sets them).

use std::{mem::MaybeUninit, net::IpAddr};

use super::{Buffers, MAX_BODY, MAX_HEADERS, MAX_LISTED, Prepared};
use crate::{
    backend::client_hash,
    proxy::{
        headers,
        service::{Handler, RequestLine},
    },
    state::Snapshot,
};

/// Checks the head at `b.pos` and writes the request's upstream head to `b.out`; None when
/// the request is not one this engine serves (hyper will).
pub(super) fn prepare<'s>(handler: &Handler, snap: &'s Snapshot, b: &mut Buffers) -> Option<Prepared<'s>> {
    let settings = &snap.settings;
    if handler.ambiguous.as_ref().is_some_and(|a| a.is_set()) {
        // The scanner saw a head with both framings on this connection: hyper refuses it.
        return None;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(&b.input[b.pos..], &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    if req.version != Some(1) {
        return None;
    }
    let method = req.method?;
    let (head_method, idempotent) = match method {
        "GET" | "OPTIONS" | "PUT" | "DELETE" => (false, true),
        "HEAD" => (true, true),
        "POST" | "PATCH" => (false, false),
        _ => return None,
    };
    let target = req.path?;
    if !plain_target(target) {
        return None;
    }
    let mut host = None;
    let mut length: Option<u64> = None;
    let mut close = false;
    let mut listed: [&[u8]; MAX_LISTED] = [&[]; MAX_LISTED];
    let mut n_listed = 0;
    let mut first_xff = None;
    let mut first_real_ip = None;
    let real_ip = settings.real_ip_header.as_str();
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() || !plain_host(value) {
                return None;
            }
            host = Some(std::str::from_utf8(value).ok()?);
        } else if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() || value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            length = Some(std::str::from_utf8(value).ok()?.parse().ok()?);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&c| c == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                } else if token.eq_ignore_ascii_case(b"upgrade")
                    || n_listed == MAX_LISTED
                    || ["host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-real-ip", real_ip]
                        .iter()
                        .any(|n| token.eq_ignore_ascii_case(n.as_bytes()))
                {
                    return None;
                } else {
                    listed[n_listed] = token;
                    n_listed += 1;
                }
            }
        } else if ["transfer-encoding", "upgrade", "expect", "http2-settings"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
            || (name.eq_ignore_ascii_case("content-type") && headers::contains_ignore_case(value, b"application/grpc"))
            || (name.eq_ignore_ascii_case("accept") && headers::contains_ignore_case(value, b"text/event-stream"))
        {
            return None;
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            first_xff.get_or_insert(value);
        }
        if name.eq_ignore_ascii_case(real_ip) {
            first_real_ip.get_or_insert(value);
        }
    }
    let host = host?;
    let body_len = length.unwrap_or(0);
    if body_len > MAX_BODY || settings.max_body_bytes.is_some_and(|max| body_len > max) {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    let route = snap.route(Some(host), path)?;
    if !super::plain_backends(route) {
        return None;
    }

    // The client's address, as the hyper path resolves it (`headers::client_ip`).
    let peer = handler.peer.ip();
    let trusted = headers::is_trusted(peer, &settings.trusted_proxies);
    let client = match first_real_ip.filter(|_| trusted).and_then(|v| std::str::from_utf8(v).ok()) {
        Some(v) => v.trim().parse().map_or(headers::canonical(peer), headers::canonical),
        None => headers::canonical(peer),
    };

    let out = &mut b.out;
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut proto_kept = false;
    for h in req.headers.iter() {
        let name = h.name;
        let forwarded = ["x-forwarded-for", "x-real-ip", real_ip].iter().any(|n| name.eq_ignore_ascii_case(n));
        let proto = name.eq_ignore_ascii_case("x-forwarded-proto");
        if forwarded
            || (proto && !trusted)
            || is_hop_by_hop(name)
            || listed[..n_listed].iter().any(|l| name.as_bytes().eq_ignore_ascii_case(l))
        {
            continue;
        }
        proto_kept |= proto;
        put_header(out, name.as_bytes(), h.value);
    }
    put_forwarded(out, handler, trusted, client, first_xff, proto_kept, real_ip);
    out.extend_from_slice(b"\r\n");

    let line = handler.state.access_log.as_ref().map(|_| {
        let field = |n: &str| {
            req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(n)).and_then(|h| std::str::from_utf8(h.value).ok())
        };
        RequestLine {
            client: peer,
            method: http::Method::from_bytes(method.as_bytes()).unwrap_or_default(),
            target: target.to_owned(),
            version: http::Version::HTTP_11,
            referer: field("referer").unwrap_or("-").to_owned(),
            user_agent: field("user-agent").unwrap_or("-").to_owned(),
        }
    });
    Some(Prepared {
        head_len,
        body_len: body_len as usize,
        route,
        hash: client_hash(client),
        close,
        head_method,
        idempotent,
        line,
    })
}

/// The forwarded headers as `headers::set_forwarded` sets them: from an untrusted peer, all
/// of them are the peer; from a trusted one, the chain is extended and the client is the one
/// its real-IP header named.
fn put_forwarded(
    out: &mut Vec<u8>,
    handler: &Handler,
    trusted: bool,
    client: IpAddr,
    first_xff: Option<&[u8]>,
    proto_kept: bool,
    real_ip: &str,
) {
    use std::io::Write as _;
    let peer = handler.peer_header.as_bytes();
    out.extend_from_slice(b"x-forwarded-for: ");
    if trusted {
        // `HeaderValue::to_str`: visible ASCII only, else the previous chain is not read.
        let prev = first_xff.filter(|v| v.iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c)));
        let chain = match prev {
            Some(prev) if !prev.trim_ascii().is_empty() => {
                out.extend_from_slice(prev);
                true
            }
            // The peer's header value is `canonical(peer)` formatted.
            _ if client != headers::canonical(handler.peer.ip()) => {
                let _ = write!(out, "{client}");
                true
            }
            _ => false,
        };
        if chain {
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(peer);
    out.extend_from_slice(b"\r\n");
    if !proto_kept {
        out.extend_from_slice(b"x-forwarded-proto: ");
        out.extend_from_slice(handler.proto.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut put_client = |name: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        if trusted {
            let _ = write!(out, "{client}");
        } else {
            out.extend_from_slice(peer);
        }
        out.extend_from_slice(b"\r\n");
    };
    if real_ip != "x-real-ip" {
        put_client(real_ip.as_bytes());
    }
    put_client(b"x-real-ip");
}

pub(super) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The hop-by-hop fields `headers::strip_hop_by_hop` removes, in any case.
pub(super) fn is_hop_by_hop(name: &str) -> bool {
    headers::HOP_BY_HOP.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// An origin-form target of characters any URI parser accepts unescaped (RFC 3986 `pchar`,
/// `/`, `?`, `%`); anything else, a fragment included, is hyper's to judge.
pub(super) fn plain_target(t: &str) -> bool {
    t.starts_with('/')
        && t.len() < 16 * 1024
        && t.bytes().all(|c| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&c))
}

/// A Host value of a name or IPv4 address with an optional port; anything else (IPv6
/// literals, odd characters) is hyper's to judge.
pub(super) fn plain_host(v: &[u8]) -> bool {
    let (name, port) = match v.iter().rposition(|&c| c == b':') {
        Some(i) => (&v[..i], Some(&v[i + 1..])),
        None => (v, None),
    };
    !name.is_empty()
        && name.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        && port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit))
}
