//! Reading a chunked body's framing (RFC 9112 §7.1) as it streams by.

/// Longest chunk-size line (with extensions) and trailer section accepted.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    /// In a chunk-size line's extensions, up to its LF.
    Ext,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd {
        cr: bool,
    },
    /// Trailer lines after the last chunk; `len` of the current one.
    Trailer {
        len: usize,
    },
    Done,
}

#[derive(Default, Debug)]
pub struct Decoder {
    state: State,
    size: u64,
    digits: usize,
    line: usize,
    trailers: usize,
    /// Bytes seen after the end of the body (the connection cannot be reused).
    extra: bool,
    /// The trailer section's bytes, when they are kept (see `keeping_trailers`).
    kept: Option<Vec<u8>>,
}

impl Decoder {
    /// A decoder that keeps the trailer section's bytes for `trailers`.
    pub fn keeping_trailers() -> Self {
        Decoder { kept: Some(Vec::new()), ..Decoder::default() }
    }

    /// The trailer section read so far (its lines and the empty line that ends it), when kept.
    pub fn trailers(&self) -> Option<&[u8]> {
        self.kept.as_deref()
    }

    /// Feeds body bytes, handing each piece of chunk data to `data`; Ok(true) once the
    /// body's end was read; Err on bad framing.
    pub fn feed(&mut self, buf: &[u8], mut data: impl FnMut(&[u8])) -> Result<bool, ()> {
        let mut i = 0;
        while i < buf.len() {
            let c = buf[i];
            match self.state {
                State::Done => {
                    self.extra = true;
                    return Ok(true);
                }
                State::Data(left) => {
                    let n = (left as usize).min(buf.len() - i);
                    data(&buf[i..i + n]);
                    i += n;
                    self.state = match left - n as u64 {
                        0 => State::DataEnd { cr: false },
                        rest => State::Data(rest),
                    };
                    continue;
                }
                State::DataEnd { cr } => match (c, cr) {
                    (b'\r', false) => self.state = State::DataEnd { cr: true },
                    (b'\n', _) => self.state = State::Size,
                    _ => return Err(()),
                },
                State::Size => match c {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(());
                        }
                        self.size = self.size * 16 + (c as char).to_digit(16).unwrap_or(0) as u64;
                        self.line += 1;
                    }
                    b';' | b' ' | b'\t' | b'\r' if self.digits > 0 => {
                        self.state = State::Ext;
                        self.line += 1;
                    }
                    b'\n' if self.digits > 0 => self.end_size_line(),
                    _ => return Err(()),
                },
                State::Ext => {
                    self.line += 1;
                    if self.line > MAX_LINE {
                        return Err(());
                    }
                    if c == b'\n' {
                        self.end_size_line();
                    }
                }
                State::Trailer { len } => {
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err(());
                    }
                    if let Some(kept) = &mut self.kept {
                        kept.push(c);
                    }
                    match c {
                        b'\n' if len == 0 => self.state = State::Done,
                        b'\n' => self.state = State::Trailer { len: 0 },
                        b'\r' => {}
                        _ => self.state = State::Trailer { len: len + 1 },
                    }
                }
            }
            i += 1;
        }
        Ok(self.state == State::Done)
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 { State::Trailer { len: 0 } } else { State::Data(self.size) };
        self.size = 0;
        self.digits = 0;
        self.line = 0;
    }

    /// The body ended and nothing followed it.
    pub fn done_exactly(&self) -> bool {
        self.state == State::Done && !self.extra
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(pieces: &[&[u8]]) -> (Result<bool, ()>, Vec<u8>, bool) {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        let mut r = Ok(false);
        for p in pieces {
            r = d.feed(p, |x| out.extend_from_slice(x));
            if r != Ok(false) {
                break;
            }
        }
        (r, out, d.done_exactly())
    }

    #[test]
    fn bodies_split_anywhere_decode_the_same() {
        let body: &[u8] = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
        for cut in 0..body.len() {
            let (r, out, exact) = decode(&[&body[..cut], &body[cut..]]);
            assert_eq!((r, out.as_slice(), exact), (Ok(true), &b"hello world"[..], true), "cut at {cut}");
        }
    }

    #[test]
    fn trailers_are_kept_when_asked_however_they_arrive() {
        let body: &[u8] = b"3\r\nabc\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\n";
        for cut in 0..body.len() {
            let mut d = Decoder::keeping_trailers();
            let mut out = Vec::new();
            let first = d.feed(&body[..cut], |x| out.extend_from_slice(x));
            let done = first == Ok(true) || d.feed(&body[cut..], |x| out.extend_from_slice(x)) == Ok(true);
            assert!(done && d.done_exactly(), "cut at {cut}");
            assert_eq!((out.as_slice(), d.trailers()), (&b"abc"[..], Some(&b"X-T: 1\r\nY: 2\r\n\r\n"[..])));
        }
        assert_eq!(decode(&[b"0\r\n\r\n"]).0, Ok(true));
        assert_eq!(Decoder::default().trailers(), None);
    }

    #[test]
    fn bad_framing_and_trailing_bytes_are_seen() {
        assert_eq!(decode(&[b"zz\r\n"]).0, Err(()));
        assert_eq!(decode(&[b"3\r\nabcX\r\n"]).0, Err(()));
        assert_eq!(decode(&[b"ffffffffffffffff\r\n"]).0, Err(()));
        let (r, _, exact) = decode(&[b"0\r\n\r\nHTTP/1.1 200 OK\r\n"]);
        assert_eq!((r, exact), (Ok(true), false));
    }
}
