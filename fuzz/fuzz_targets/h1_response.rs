//! Fuzz target: how the proxy's own HTTP/1 engine (`proxy/h1/`) reads a backend's answer.
//! - the response head rewrite: a head it accepts goes to the client as a head httparse reads
//!   whole, with the same status, no hop-by-hop field but the framing and close it adds itself,
//!   none of the names the backend's `Connection` listed, and a `Date`; the body is re-chunked
//!   exactly when the backend's framing was chunked or close-delimited;
//! - the chunked body reader: however the bytes are split into reads it decides the same and
//!   yields the same data, and what it yields, chunked again, reads back to the same data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use speedmimi::{
    fuzzing::{h1_chunked, h1_response_head},
    proxy::headers::HOP_BY_HOP,
};

fuzz_target!(|data: &[u8]| {
    let [flags, split_hi, split_lo, rest @ ..] = data else { return };
    let (head_method, close) = (flags & 1 == 1, flags & 2 == 2);
    let split = usize::from(u16::from_be_bytes([*split_hi, *split_lo]));

    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut resp = httparse::Response::new(&mut headers);
    if let Ok(httparse::Status::Complete(len)) = resp.parse(rest) {
        let listed: Vec<Vec<u8>> = resp
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|&c| c == b','))
            .map(|t| t.trim_ascii().to_ascii_lowercase())
            .filter(|t| !t.is_empty() && !HOP_BY_HOP.iter().any(|n| n.as_bytes() == t.as_slice()))
            // The proxy adds its own Date, and a listed Content-Length still frames the body.
            .filter(|t| !matches!(t.as_slice(), b"close" | b"date" | b"content-length"))
            .collect();
        let chunked_in = resp.headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
        let length_in = resp.headers.iter().any(|h| h.name.eq_ignore_ascii_case("content-length"));
        if let Ok((status, out, rechunked, _)) = h1_response_head(&rest[..len], head_method, close) {
            let mut h2 = [httparse::EMPTY_HEADER; 110];
            let mut again = httparse::Response::new(&mut h2);
            let parsed = again.parse(&out);
            assert!(matches!(parsed, Ok(httparse::Status::Complete(n)) if n == out.len()), "{:?}", String::from_utf8_lossy(&out));
            assert_eq!(again.code, Some(status));
            let bodiless = head_method || status == 204 || status == 304 || (100..200).contains(&status);
            assert_eq!(rechunked, !bodiless && (chunked_in || !length_in), "{:?}", String::from_utf8_lossy(&out));
            for h in again.headers.iter() {
                let name = h.name.to_ascii_lowercase();
                match name.as_str() {
                    "transfer-encoding" => assert!(rechunked && h.value == b"chunked"),
                    "connection" => assert!(close && h.value == b"close"),
                    n => assert!(!HOP_BY_HOP.contains(&n), "{n} reached the client"),
                }
                assert!(!listed.iter().any(|l| l.as_slice() == name.as_bytes()), "{name} was listed in Connection");
            }
            assert!(again.headers.iter().any(|h| h.name.eq_ignore_ascii_case("date")));
        }
    }

    // The bytes as a chunked body, in one read and in two.
    let whole = h1_chunked([rest]);
    let cut = split.min(rest.len());
    let two = h1_chunked([&rest[..cut], &rest[cut..]]);
    assert_eq!(whole, two, "the reads' split changed the verdict");
    if let (Ok(true), data, _) = &whole {
        let mut encoded = format!("{:x}\r\n", data.len()).into_bytes();
        encoded.extend_from_slice(data);
        encoded.extend_from_slice(b"\r\n0\r\n\r\n");
        let encoded = if data.is_empty() { b"0\r\n\r\n".to_vec() } else { encoded };
        assert_eq!(h1_chunked([encoded.as_slice()]), (Ok(true), data.clone(), true));
    }
});
