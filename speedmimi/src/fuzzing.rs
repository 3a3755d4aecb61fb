//! Entry points for the fuzz targets in `fuzz/` into code the crate keeps private (the framing
//! scanner). Not an API: hidden from the docs, and nothing in the daemon uses it.

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
