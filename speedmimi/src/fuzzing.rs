//! Entry points for the fuzz targets in `fuzz/` into code the crate keeps private (the framing
//! scanner, protocol sniffing, Host admission). Not an API: hidden from the docs, and nothing in
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
