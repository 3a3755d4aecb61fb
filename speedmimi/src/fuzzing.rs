//! Entry points for the fuzz targets in `fuzz/` into code the crate keeps private (the framing
//! scanner, protocol sniffing, Host admission, the own HTTP/1 engine's reading of responses). Not an API: hidden from the docs, and nothing in
//! the daemon uses it.

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::Request;
use tokio::io::{AsyncRead, ReadBuf};

use crate::proxy::framing::Scanner;

/// Feeds `chunks` to a fresh framing scanner, as reads from one client connection; whether it
/// flagged a request head with both Content-Length and Transfer-Encoding.
pub fn framing_flagged<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> bool {
    let (mut scanner, flag) = Scanner::new();
    for chunk in chunks {
        scanner.feed(chunk);
    }
    flag.is_set()
}

/// A client whose bytes arrive in the given reads, then its FIN.
struct Reads(VecDeque<Vec<u8>>);

impl AsyncRead for Reads {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(mut read) = self.0.pop_front() {
            let n = read.len().min(buf.remaining());
            buf.put_slice(&read[..n]);
            if n < read.len() {
                self.0.push_front(read.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Runs the listener's protocol sniffing on a client sending `reads`: (whether it is HTTP/1, the
/// bytes read to tell, the bytes left unread), or None when the client left before it told.
pub fn sniff(reads: Vec<Vec<u8>>) -> Option<(bool, Bytes, Vec<u8>)> {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime"));
    let mut client = Reads(reads.into());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
    let told = rt.block_on(crate::proxy::server::sniff_http1(&mut client, deadline))?;
    Some((told.0, told.1, client.0.into_iter().flatten().collect()))
}

/// Host admission, as the request handler runs it before routing.
pub fn admit_host(req: &mut Request<()>) -> Result<(), &'static str> {
    crate::proxy::service::admit_host(req)
}

/// The own HTTP/1 engine's rewrite of a backend's response head for the client: (status, the
/// head as the client gets it, whether the body is re-chunked, whether the backend connection
/// may be reused), or why the proxy answers 502 instead.
pub fn h1_response_head(
    head: &[u8],
    head_method: bool,
    close: bool,
) -> Result<(u16, Vec<u8>, bool, bool), &'static str> {
    use crate::proxy::h1::Framing;
    let mut out = Vec::new();
    let (status, framing, reusable) = crate::proxy::h1::response_head(head, head_method, close, &mut out)?;
    Ok((status, out, matches!(framing, Framing::Chunked | Framing::Close), reusable))
}

/// The own HTTP/1 engine's chunked-body reader fed `pieces` as they arrive: (Ok(true) once the
/// body ended, Ok(false) while it goes on, Err on bad framing; the data; whether nothing
/// followed the end).
pub fn h1_chunked<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Result<bool, ()>, Vec<u8>, bool) {
    let mut d = crate::proxy::h1::chunked::Decoder::default();
    let mut data = Vec::new();
    let mut r = Ok(false);
    for p in pieces {
        // Bytes after the end are read too: they must not be taken for the body, and they
        // make the connection unusable, as a later read's would when the pool takes it back.
        r = d.feed(p, |x| data.extend_from_slice(x));
        if r.is_err() {
            break;
        }
    }
    (r, data, d.done_exactly())
}

/// The own HTTP/1 engine's head for the backend, made from a client's request head from
/// `peer` on the HTTP listener; None when the engine leaves the request to hyper.
pub fn h1_upstream_head(
    state: &std::sync::Arc<crate::state::State>,
    peer: std::net::SocketAddr,
    head: &[u8],
) -> Option<Vec<u8>> {
    crate::proxy::h1::upstream_head(state, peer, head)
}
