//! Watches the raw bytes of an HTTP/1 client connection for a request head carrying both
//! Content-Length and Transfer-Encoding. hyper handles such a request by the RFC's other
//! option (drop Content-Length, use chunked, close after), and leaves no trace of it; our
//! contract is to refuse it with 400 before any backend sees it. This scanner follows message
//! boundaries (Content-Length and chunked bodies) so body bytes are never mistaken for heads,
//! and flags the connection; the request handler answers 400 when the flag is up. A request
//! asking to upgrade is framed like any other: only a switch that happened (101, which the
//! connection's IO stops feeding us after) ends the HTTP stream.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering::Relaxed},
};

/// Longest prefix of a header line we look at: enough for the names we care about.
const NAME_PREFIX: usize = 24;

/// Set when a request head on this connection had both framing headers.
#[derive(Clone, Default)]
pub struct Ambiguous(Arc<AtomicBool>);

impl Ambiguous {
    pub fn is_set(&self) -> bool {
        self.0.load(Relaxed)
    }
}

pub struct Scanner {
    flag: Ambiguous,
    state: State,
    /// Start of the current head line (lower-cased), up to NAME_PREFIX bytes.
    line: [u8; NAME_PREFIX],
    line_len: usize,
    first_line: bool,
    content_length: Option<u64>,
    chunked: bool,
    cl_seen: bool,
    te_seen: bool,
    /// Digits of a Content-Length value being read.
    cl_value: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize {
        size: u64,
        digits: bool,
    },
    ChunkExt {
        size: u64,
    },
    ChunkData(u64),
    ChunkDataEnd {
        seen_cr: bool,
    },
    Trailer {
        empty_line: bool,
        line_len: usize,
    },
    /// Nothing more to check (HTTP/2, or framing hyper will reject itself).
    Off,
}

impl Scanner {
    pub fn new() -> (Scanner, Ambiguous) {
        let flag = Ambiguous::default();
        let s = Scanner {
            flag: flag.clone(),
            state: State::Head,
            line: [0; NAME_PREFIX],
            line_len: 0,
            first_line: true,
            content_length: None,
            chunked: false,
            cl_seen: false,
            te_seen: false,
            cl_value: None,
        };
        (s, flag)
    }

    /// Whether part of a request head has arrived and not its end.
    pub fn mid_head(&self) -> bool {
        self.state == State::Head && (self.line_len > 0 || !self.first_line)
    }

    /// Feeds bytes just read from the client.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Off => return,
                State::Body(n) => {
                    let take = (n as usize).min(data.len());
                    data = &data[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 { self.message_done() } else { State::Body(left) };
                }
                State::ChunkData(n) => {
                    let take = (n as usize).min(data.len());
                    data = &data[take..];
                    let left = n - take as u64;
                    self.state =
                        if left == 0 { State::ChunkDataEnd { seen_cr: false } } else { State::ChunkData(left) };
                }
                _ => {
                    self.byte(data[0]);
                    data = &data[1..];
                }
            }
        }
    }

    fn byte(&mut self, b: u8) {
        self.state = match self.state {
            State::Head => {
                self.head_byte(b);
                return;
            }
            State::ChunkSize { size, digits } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                    match size.checked_mul(16).and_then(|s| s.checked_add(d)) {
                        Some(size) => State::ChunkSize { size, digits: true },
                        None => State::Off,
                    }
                }
                b';' | b' ' | b'\t' | b'\r' if digits => State::ChunkExt { size },
                b'\n' if digits => self.after_size(size),
                _ => State::Off,
            },
            State::ChunkExt { size } => {
                if b == b'\n' {
                    self.after_size(size)
                } else {
                    State::ChunkExt { size }
                }
            }
            State::ChunkDataEnd { seen_cr } => match (b, seen_cr) {
                (b'\r', false) => State::ChunkDataEnd { seen_cr: true },
                (b'\n', _) => State::ChunkSize { size: 0, digits: false },
                _ => State::Off,
            },
            State::Trailer { empty_line, line_len } => match b {
                b'\n' if empty_line || line_len == 0 => self.message_done(),
                b'\n' => State::Trailer { empty_line: true, line_len: 0 },
                b'\r' => State::Trailer { empty_line, line_len },
                _ => State::Trailer { empty_line: false, line_len: line_len + 1 },
            },
            other => other,
        };
    }

    fn after_size(&mut self, size: u64) -> State {
        if size == 0 { State::Trailer { empty_line: true, line_len: 0 } } else { State::ChunkData(size) }
    }

    fn head_byte(&mut self, b: u8) {
        if b != b'\n' {
            if self.line_len < NAME_PREFIX {
                self.line[self.line_len] = b.to_ascii_lowercase();
            }
            self.line_len += 1;
            if self.cl_value.is_some() || (self.line_len > 15 && self.line.starts_with(b"content-length:")) {
                self.content_length_digit(b);
            }
            return;
        }
        let line = &self.line[..self.line_len.min(NAME_PREFIX)];
        let blank = self.line_len == 0 || (self.line_len == 1 && line[0] == b'\r');
        if self.first_line {
            if blank {
                // Tolerated empty lines before a request line (RFC 9112 §2.2).
            } else if line.starts_with(b"pri * http/2") {
                self.state = State::Off;
            } else {
                self.first_line = false;
            }
        } else if blank {
            self.end_of_head();
        } else if line.starts_with(b"content-length:") {
            self.cl_seen = true;
            self.content_length = self.cl_value.or(self.content_length);
        } else if line.starts_with(b"transfer-encoding:") {
            self.te_seen = true;
            self.chunked = true;
        }
        self.cl_value = None;
        self.line_len = 0;
    }

    /// Accumulates the value of a Content-Length line (digits after the colon).
    fn content_length_digit(&mut self, b: u8) {
        if self.line_len <= 15 {
            return;
        }
        // Digits accumulate; whitespace around them is skipped. A malformed value is hyper's
        // to reject (400), so its exact reading here does not matter.
        if b.is_ascii_digit() {
            let v = self.cl_value.unwrap_or(0);
            self.cl_value = v.checked_mul(10).and_then(|v| v.checked_add((b - b'0') as u64));
        }
    }

    fn end_of_head(&mut self) {
        if self.cl_seen && self.te_seen {
            self.flag.0.store(true, Relaxed);
            // hyper closes the connection after this request: nothing more to follow.
            self.state = State::Off;
            return;
        }
        self.state = if self.chunked {
            State::ChunkSize { size: 0, digits: false }
        } else {
            match self.content_length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            }
        };
        if self.state == State::Head {
            self.reset_head();
        }
    }

    fn message_done(&mut self) -> State {
        self.reset_head();
        State::Head
    }

    fn reset_head(&mut self) {
        self.first_line = true;
        self.content_length = None;
        self.chunked = false;
        self.cl_seen = false;
        self.te_seen = false;
        self.cl_value = None;
        self.line_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(parts: &[&[u8]]) -> bool {
        let (mut s, flag) = Scanner::new();
        for p in parts {
            s.feed(p);
        }
        flag.is_set()
    }

    #[test]
    fn flags_cl_and_te_in_either_order_and_split_reads() {
        assert!(scan(&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"]));
        assert!(scan(&[b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 5\r\n\r\n"]));
        assert!(scan(&[b"POST / HTTP/1.1\r\nContent-Le", b"ngth: 5\r\nTransfer-", b"Encoding: chunked\r\n\r\n"]));
    }

    #[test]
    fn body_bytes_are_not_heads() {
        // A body that looks like a smuggling head must not trip the flag.
        let body = b"x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
        assert!(!scan(&[head.as_bytes(), body, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]));
        let chunked = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{}\r\n0\r\nX-Trailer: 1\r\n\r\n",
            body.len(),
            String::from_utf8_lossy(body)
        );
        let chunked = chunked.as_bytes();
        assert!(!scan(&[chunked]));
        // ...but the next head after those bodies is checked.
        let evil = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(scan(&[head.as_bytes(), body, evil]));
        assert!(scan(&[chunked, evil]));
    }

    /// Found by the differential test of the two HTTP/1 engines: the end of a Content-Length
    /// body did not reset the head state, so a chunked request after a Content-Length one on
    /// the same connection was taken for one with both framings (400, connection closed).
    #[test]
    fn a_length_body_ends_its_message() {
        let post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(!scan(&[post, chunked]));
        assert!(!scan(&[&[post.as_slice(), chunked.as_slice()].concat()]));
        let evil = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(scan(&[post, evil]));
    }

    #[test]
    fn upgrade_requests_do_not_stop_scanning() {
        // Declined or not a real upgrade: the next request is HTTP and checked.
        let evil = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let ws = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        assert!(scan(&[ws, evil]));
        assert!(scan(&[b"GET / HTTP/1.1\r\nUpgrade: foo\r\n\r\n", evil]));
    }

    #[test]
    fn mid_head_is_a_started_unfinished_head() {
        let (mut s, _) = Scanner::new();
        assert!(!s.mid_head());
        s.feed(b"\r\n");
        assert!(!s.mid_head(), "blank lines before a request are not a head");
        s.feed(b"GET / HT");
        assert!(s.mid_head());
        s.feed(b"TP/1.1\r\nHost: a\r\n");
        assert!(s.mid_head());
        s.feed(b"\r\n");
        assert!(!s.mid_head());
        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab");
        assert!(!s.mid_head(), "in a body");
    }

    #[test]
    fn h2_stops_scanning() {
        assert!(!scan(&[
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n"
        ]));
    }
}
