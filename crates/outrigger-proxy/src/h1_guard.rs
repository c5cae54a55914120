//! What Envoy's HTTP/1 codec decides differently from hyper's, seen in the raw request head
//! before hyper parses it.
//!
//! hyper normalizes some heads before the service sees them (it drops `content-length` beside
//! `transfer-encoding` and a repeated equal `content-length`, and the fragment of the target)
//! and refuses others with a bare 400 (an HTTP version other than 1.0/1.1, a transfer coding
//! that does not end in `chunked`, `transfer-encoding` in HTTP/1.0, a bare CR or an obs-fold
//! in a header). Envoy answers each of them differently (compared with the real Envoy in
//! tests/codec.rs). This wrapper of the downstream byte stream finds each request head,
//! decides Envoy's answer and hands it to the request handler in [`Verdicts`]; where hyper
//! would refuse a head Envoy answers otherwise, it rewrites the head in place (same length) so
//! that hyper parses it and the handler can answer as Envoy does:
//!
//! * an HTTP version other than 1.0 and 1.1 (`HTTP/1.2`, `HTTP/2.0` in an HTTP/1 request line):
//!   Envoy answers `426 Upgrade Required`; the version is rewritten to `HTTP/1.1`;
//! * `transfer-encoding` in HTTP/1.0: `426`; a transfer coding whose last coding is not
//!   `chunked` (`identity`): `501 Not Implemented` ("unsupported transfer encoding") — the
//!   header's name is rewritten so hyper does not refuse the framing;
//! * `transfer-encoding` beside `content-length`: `400`
//!   (`http1.content_length_and_chunked_not_allowed`, `allow_chunked_length` off in Istio);
//!   two `content-length` fields, even equal: `400` (BalsaFrame `MULTIPLE_CONTENT_LENGTH_KEYS`);
//! * a fragment in the target (`/a#frag`): `400` (Envoy rejects a path with a fragment);
//! * a bare CR in a header value and an obs-fold: Envoy accepts both, and RFC 9112 lets a
//!   recipient replace them with spaces (§2.2: "replace each bare CR with SP"; §5.2: "replace
//!   each received obs-fold with one or more SP octets") — done here, so the request is served.
//!
//! A refused request is the last one on its connection (the handler answers with
//! `connection: close`), so after a refusal, and after a request that may switch protocols
//! (`upgrade`, CONNECT), the rest of the stream passes through unexamined. Bodies are skipped
//! by their framing (`content-length`, or chunk sizes) to find the next head on a keep-alive
//! connection.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use http::StatusCode;
use tokio::io::{AsyncRead, ReadBuf};

use crate::codec_checks::Refusal;

/// A request head larger than this is left to hyper (which answers 431 above 60 KiB).
const MAX_HEAD: usize = 64 * 1024;

/// The refusal the guard decided for one request of a connection, for its handler. At most
/// one per connection: a refused request ends its connection.
#[derive(Default)]
pub(crate) struct Verdicts {
    /// Requests handed to the handler so far.
    served: AtomicU64,
    /// (index of the request, Envoy's answer).
    refusal: Mutex<Option<(u64, Refusal)>>,
}

impl Verdicts {
    /// Called once per request, in order, by the handler: Envoy's answer if the guard refused
    /// this request's head.
    pub(crate) fn next(&self) -> Option<Refusal> {
        let index = self.served.fetch_add(1, Ordering::Relaxed);
        let guard = self.refusal.lock().unwrap_or_else(|e| e.into_inner());
        match *guard {
            Some((i, r)) if i == index => Some(r),
            _ => None,
        }
    }

    fn refuse(&self, index: u64, r: Refusal) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some((index, r));
    }
}

/// Where the byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head (bytes withheld from hyper until it is complete).
    Head,
    /// `content-length` body bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Not examined any more.
    Transparent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line: the size so far, whether an extension started.
    Size { size: u64, ext: bool },
    /// Chunk data left, then CRLF.
    Data(u64),
    /// After the data: the CRLF.
    DataEnd,
    /// After the last chunk: trailer lines; `empty` while the current line has no bytes.
    Trailer { empty: bool },
}

/// The downstream stream of an HTTP/1 connection, examined as described in the module docs.
pub(crate) struct H1Guard<T> {
    inner: T,
    state: State,
    /// The head being collected (and, once complete, any bytes after it).
    head: Vec<u8>,
    /// How far `head` has been searched for its end.
    searched: usize,
    /// Bytes ready for hyper that did not fit its buffer.
    out: Vec<u8>,
    out_pos: usize,
    /// Heads seen (the index of the next one).
    heads: u64,
    verdicts: Arc<Verdicts>,
}

impl<T> H1Guard<T> {
    pub(crate) fn new(inner: T, verdicts: Arc<Verdicts>) -> Self {
        H1Guard {
            inner,
            state: State::Head,
            head: Vec::new(),
            searched: 0,
            out: Vec::new(),
            out_pos: 0,
            heads: 0,
            verdicts,
        }
    }

    /// Moves what is decided in `head` to `out`: complete heads (checked, perhaps rewritten)
    /// and the body bytes after them; an incomplete head stays.
    fn drain_head(&mut self) {
        loop {
            match self.state {
                State::Transparent => {
                    self.out.append(&mut self.head);
                    self.searched = 0;
                    return;
                }
                State::Length(_) | State::Chunked(_) => {
                    let n = skip_body(&mut self.state, &self.head);
                    self.out.extend(self.head.drain(..n));
                    if self.head.is_empty() {
                        return;
                    }
                }
                State::Head => {
                    let Some(end) = head_end(&self.head, self.searched) else {
                        self.searched = self.head.len().saturating_sub(3);
                        if self.head.len() > MAX_HEAD {
                            self.state = State::Transparent;
                            continue;
                        }
                        return;
                    };
                    self.searched = 0;
                    let index = self.heads;
                    self.heads += 1;
                    self.state = match examine(&mut self.head[..end]) {
                        Outcome::Refuse(r) => {
                            self.verdicts.refuse(index, r);
                            State::Transparent
                        }
                        Outcome::Switch => State::Transparent,
                        Outcome::Body(b) => b,
                    };
                    self.out.extend(self.head.drain(..end));
                    if self.head.is_empty() {
                        return;
                    }
                }
            }
        }
    }
}

/// Skips body bytes of the current message; returns how many of `bytes` belong to it (the
/// rest starts the next head). Chunked framing as RFC 9112 §7.1 (chunk extensions skipped,
/// trailer lines up to the blank line); anything malformed stops the examination — hyper
/// refuses it and closes the connection.
fn skip_body(state: &mut State, bytes: &[u8]) -> usize {
    let mut i = 0;
    while i < bytes.len() {
        match *state {
            State::Head | State::Transparent => return i,
            State::Length(left) => {
                let n = left.min((bytes.len() - i) as u64);
                i += n as usize;
                *state = if left == n {
                    State::Head
                } else {
                    State::Length(left - n)
                };
            }
            State::Chunked(Chunk::Data(left)) => {
                let n = left.min((bytes.len() - i) as u64);
                i += n as usize;
                *state = State::Chunked(if left == n {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                });
            }
            State::Chunked(c) => {
                *state = next_chunk_state(c, bytes[i]);
                i += 1;
            }
        }
    }
    i
}

/// One byte of chunked framing outside chunk data.
fn next_chunk_state(c: Chunk, b: u8) -> State {
    match c {
        Chunk::Size { size, ext } => match b {
            b'\n' if size == 0 => State::Chunked(Chunk::Trailer { empty: true }),
            b'\n' => State::Chunked(Chunk::Data(size)),
            b'\r' => State::Chunked(c),
            _ if ext => State::Chunked(c),
            b';' | b' ' | b'\t' => State::Chunked(Chunk::Size { size, ext: true }),
            _ => match (b as char).to_digit(16) {
                // More than 2^60 bytes is not a size hyper accepts either.
                Some(d) if size < (1 << 56) => State::Chunked(Chunk::Size {
                    size: size * 16 + u64::from(d),
                    ext: false,
                }),
                _ => State::Transparent,
            },
        },
        // Handled in `skip_body` (a run of bytes at once).
        Chunk::Data(_) => State::Chunked(c),
        Chunk::DataEnd => match b {
            b'\r' => State::Chunked(c),
            b'\n' => State::Chunked(Chunk::Size {
                size: 0,
                ext: false,
            }),
            _ => State::Transparent,
        },
        Chunk::Trailer { empty } => match b {
            b'\n' if empty => State::Head,
            b'\n' => State::Chunked(Chunk::Trailer { empty: true }),
            b'\r' => State::Chunked(c),
            _ => State::Chunked(Chunk::Trailer { empty: false }),
        },
    }
}

/// The end (exclusive) of a complete head in `buf` (blank line reached), searching from
/// `from`; leading empty lines (which a server ignores, RFC 9112 §2.2) are not an end.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = buf.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let mut i = from.max(start);
    while let Some(p) = buf[i..].iter().position(|b| *b == b'\n') {
        let nl = i + p;
        // "\n\n" or "\n\r\n" ends the head.
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            Some(_) => i = nl + 1,
            None => return None,
        }
    }
    None
}

enum Outcome {
    Refuse(Refusal),
    /// Upgrade or CONNECT: the stream may carry another protocol.
    Switch,
    /// The framing of the message body.
    Body(State),
}

const fn refusal(status: StatusCode, details: &'static str) -> Refusal {
    Refusal {
        status,
        flag: "DPE",
        details,
    }
}

/// Decides Envoy's answer for one complete head and rewrites it in place where hyper needs it
/// (see the module docs).
fn examine(head: &mut [u8]) -> Outcome {
    let start = head
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(0);
    let Some(line_end) = head[start..]
        .iter()
        .position(|b| *b == b'\n')
        .map(|p| start + p)
    else {
        return Outcome::Body(State::Head);
    };
    // Bare CR and obs-fold in the header section become spaces (RFC 9112 §2.2, §5.2).
    for i in line_end + 1..head.len() {
        if head[i] == b'\r' && head.get(i + 1) != Some(&b'\n') {
            head[i] = b' ';
        }
        if head[i] == b'\n'
            && i + 1 < head.len()
            && matches!(head[i + 1], b' ' | b'\t')
            && !is_blank_line_before(head, i)
        {
            head[i] = b' ';
            if i > 0 && head[i - 1] == b'\r' {
                head[i - 1] = b' ';
            }
        }
    }

    // The request line: method SP target SP version.
    let line = &head[start..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|b| *b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let version = parts.next().unwrap_or_default();
    let three_parts = parts.next().is_none();
    let connect = method == b"CONNECT";
    let fragment = target.contains(&b'#');
    let http10 = version == b"HTTP/1.0";
    // `HTTP/d.d` other than 1.0 and 1.1, as the last of exactly three parts.
    let other_version = three_parts
        && version.len() == 8
        && version.starts_with(b"HTTP/")
        && version[5].is_ascii_digit()
        && version[6] == b'.'
        && version[7].is_ascii_digit()
        && !http10
        && version != b"HTTP/1.1";
    if other_version {
        // The version ends the line: rewritten so that hyper parses the head.
        let at = start + line.len() - 8;
        head[at..at + 8].copy_from_slice(b"HTTP/1.1");
    }

    // The header fields.
    let mut content_lengths = 0;
    // Where each `transfer-encoding` field starts, and whether the last coding is `chunked`.
    let mut te_fields = Vec::new();
    let mut chunked = false;
    let mut upgrade = false;
    let mut i = line_end + 1;
    while i < head.len() {
        let end = head[i..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(head.len(), |p| i + p);
        let field = &head[i..end];
        let field = field.strip_suffix(b"\r").unwrap_or(field);
        if let Some(colon) = field.iter().position(|b| *b == b':') {
            let name = &field[..colon];
            let value = field[colon + 1..].trim_ascii();
            if name.eq_ignore_ascii_case(b"content-length") {
                content_lengths += 1;
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                let last = value
                    .rsplit(|b| *b == b',')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                te_fields.push(i);
                chunked = last.eq_ignore_ascii_case(b"chunked");
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                upgrade = true;
            }
        }
        i = end + 1;
    }

    if other_version {
        return Outcome::Refuse(refusal(
            StatusCode::UPGRADE_REQUIRED,
            "http1.version_not_1_1",
        ));
    }
    if !te_fields.is_empty() {
        // Every `transfer-encoding` field renamed (same length, a token hyper ignores) when
        // hyper would refuse the framing Envoy answers otherwise.
        let hide = |head: &mut [u8]| {
            for &at in &te_fields {
                head[at..at + 17].copy_from_slice(b"x-refused-te-code");
            }
        };
        if http10 {
            hide(head);
            return Outcome::Refuse(refusal(StatusCode::UPGRADE_REQUIRED, "low_version"));
        }
        if !chunked {
            hide(head);
            return Outcome::Refuse(refusal(
                StatusCode::NOT_IMPLEMENTED,
                "http1.invalid_transfer_encoding",
            ));
        }
        if content_lengths > 0 {
            return Outcome::Refuse(refusal(
                StatusCode::BAD_REQUEST,
                "http1.content_length_and_chunked_not_allowed",
            ));
        }
    }
    if content_lengths > 1 {
        return Outcome::Refuse(refusal(
            StatusCode::BAD_REQUEST,
            "http1.codec_error{MULTIPLE_CONTENT_LENGTH_KEYS}",
        ));
    }
    if fragment {
        return Outcome::Refuse(refusal(
            StatusCode::BAD_REQUEST,
            "http1.invalid_url_fragment",
        ));
    }
    if upgrade || connect {
        return Outcome::Switch;
    }
    if !te_fields.is_empty() {
        return Outcome::Body(State::Chunked(Chunk::Size {
            size: 0,
            ext: false,
        }));
    }
    match content_length(head) {
        Some(0) | None => Outcome::Body(State::Head),
        Some(n) => Outcome::Body(State::Length(n)),
    }
}

/// Whether the LF at `i` ends an empty line (the blank line ending the head is not a fold).
fn is_blank_line_before(head: &[u8], i: usize) -> bool {
    let before = &head[..i];
    let before = before.strip_suffix(b"\r").unwrap_or(before);
    before.is_empty() || before.ends_with(b"\n")
}

/// The value of the one `content-length` field, if it is a plain number.
fn content_length(head: &[u8]) -> Option<u64> {
    head.split(|b| *b == b'\n').find_map(|field| {
        let field = field.strip_suffix(b"\r").unwrap_or(field);
        let colon = field.iter().position(|b| *b == b':')?;
        if !field[..colon].eq_ignore_ascii_case(b"content-length") {
            return None;
        }
        std::str::from_utf8(field[colon + 1..].trim_ascii())
            .ok()?
            .parse()
            .ok()
    })
}

impl<T: AsyncRead + Unpin> AsyncRead for H1Guard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            // Decided bytes first, in stream order.
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Transparent && this.head.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let end = buf.filled().len();
            if end == before {
                // End of stream: hand over an incomplete head as it is (hyper reports it).
                this.state = State::Transparent;
                if this.head.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.drain_head();
                continue;
            }
            // Body bytes pass in place; a head is collected.
            let mut i = before;
            while i < end && this.state != State::Head && this.state != State::Transparent {
                i += skip_body(&mut this.state, &buf.filled()[i..end]);
            }
            if i < end && this.state == State::Head {
                this.head.extend_from_slice(&buf.filled()[i..end]);
                buf.set_filled(i);
                this.drain_head();
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            // Everything read went into an incomplete head, or into `out`: loop.
        }
    }
}

crate::io::writes_go_to_inner!(H1Guard);

/// Runs the guard over a byte stream arriving in `chunks`, read through buffers of
/// `read_size` bytes: returns what hyper would read and the index of the refused request, if
/// any. For tests and the fuzz target (`fuzz/fuzz_targets/h1_guard.rs`): the output must not
/// depend on how the stream is cut, and has the input's length (rewrites are in place).
pub fn scan(chunks: &[&[u8]], read_size: usize) -> (Vec<u8>, Option<(u64, u16)>) {
    /// Yields the chunks in order, each at most a read buffer's worth at a time.
    struct Chunks<'a> {
        chunks: &'a [&'a [u8]],
        next: usize,
        offset: usize,
    }
    impl AsyncRead for Chunks<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            while let Some(c) = self.chunks.get(self.next) {
                let rest = &c[self.offset..];
                if rest.is_empty() {
                    self.next += 1;
                    self.offset = 0;
                    continue;
                }
                let n = rest.len().min(buf.remaining());
                buf.put_slice(&rest[..n]);
                self.offset += n;
                break;
            }
            Poll::Ready(Ok(()))
        }
    }
    let verdicts = Arc::new(Verdicts::default());
    let mut guard = H1Guard::new(
        Chunks {
            chunks,
            next: 0,
            offset: 0,
        },
        verdicts.clone(),
    );
    let mut out = Vec::new();
    let mut storage = vec![0u8; read_size.max(1)];
    let mut cx = Context::from_waker(std::task::Waker::noop());
    loop {
        let mut buf = ReadBuf::new(&mut storage);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => out.extend_from_slice(buf.filled()),
            Poll::Ready(Err(_)) | Poll::Pending => break,
        }
    }
    let refused = *verdicts.refusal.lock().unwrap_or_else(|e| e.into_inner());
    (out, refused.map(|(i, r)| (i, r.status.as_u16())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "Host: a\r\n";

    /// The stream read whole, one byte at a time and in odd pieces: always the same.
    fn run(input: &str) -> (String, Option<(u64, u16)>) {
        let bytes = input.as_bytes();
        let whole = scan(&[bytes], 64 * 1024);
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(scan(&bytewise, 3), whole, "byte by byte");
        let odd: Vec<&[u8]> = bytes.chunks(7).collect();
        assert_eq!(scan(&odd, 5), whole, "in pieces of 7");
        assert_eq!(whole.0.len(), bytes.len(), "bytes lost or added");
        (String::from_utf8_lossy(&whole.0).into_owned(), whole.1)
    }

    #[test]
    fn keep_alive_requests_with_bodies_pass_unchanged() {
        let stream = format!(
            "POST /a HTTP/1.1\r\n{H}Content-Length: 5\r\n\r\nhello\
             POST /b HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n\
             3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n\
             \r\nGET /c HTTP/1.1\r\n{H}\r\n"
        );
        assert_eq!(run(&stream), (stream.clone(), None));
    }

    /// A refusal is attributed to its request, after any number of good ones, and the rest of
    /// the stream passes unexamined.
    #[test]
    fn refusals_name_their_request() {
        let good = format!("GET / HTTP/1.1\r\n{H}\r\n");
        let cases = [
            (
                format!(
                    "POST / HTTP/1.1\r\n{H}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                ),
                400,
            ),
            (
                format!("POST / HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
                400,
            ),
            (format!("GET /a#f HTTP/1.1\r\n{H}\r\n"), 400),
            (format!("GET / HTTP/1.2\r\n{H}\r\n"), 426),
            (
                format!("POST / HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n"),
                426,
            ),
            (
                format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: identity\r\n\r\n"),
                501,
            ),
        ];
        for (bad, status) in cases {
            let stream = format!("{good}{good}{bad}{good}");
            let (_, refused) = run(&stream);
            assert_eq!(refused, Some((2, status)), "{bad:?}");
        }
    }

    #[test]
    fn heads_hyper_would_refuse_are_rewritten_in_place() {
        let (out, refused) = run(&format!("GET / HTTP/2.0\r\n{H}\r\n"));
        assert_eq!(
            (out.as_str(), refused),
            (&*format!("GET / HTTP/1.1\r\n{H}\r\n"), Some((0, 426)))
        );
        let (out, _) = run(&format!(
            "POST / HTTP/1.1\r\n{H}transfer-encoding: identity\r\nTransfer-Encoding: x\r\n\r\n"
        ));
        assert_eq!(out.matches("x-refused-te-code:").count(), 2, "{out}");
        // RFC 9112 §2.2 and §5.2: a bare CR and an obs-fold become spaces.
        let (out, refused) = run(&format!(
            "GET / HTTP/1.1\r\n{H}X-A: a\rb\r\nX-B: c\r\n d\r\n\r\n"
        ));
        assert_eq!(
            out,
            format!("GET / HTTP/1.1\r\n{H}X-A: a b\r\nX-B: c   d\r\n\r\n")
        );
        assert_eq!(refused, None);
    }

    #[test]
    fn upgrades_and_malformed_framing_stop_the_examination() {
        // After an upgrade the bytes are another protocol's: a "head" in them is not examined.
        let stream = format!(
            "GET /ws HTTP/1.1\r\n{H}Connection: upgrade\r\nUpgrade: websocket\r\n\r\n\
             POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"
        );
        assert_eq!(run(&stream), (stream.clone(), None));
        let bad_chunk = format!(
            "POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\nzz\r\nGET /a#b HTTP/1.1\r\n\r\n"
        );
        assert_eq!(run(&bad_chunk), (bad_chunk.clone(), None));
        // An incomplete head at the end of the stream is handed over as it is.
        assert_eq!(
            run("GET / HTTP/1.1\r\nHost"),
            ("GET / HTTP/1.1\r\nHost".into(), None)
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Pieces of HTTP/1 streams, well-formed and not, to build streams from.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
            Just(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".to_vec()),
            Just(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
            Just(b"5;e\r\nhello\r\n0\r\nT: 1\r\n\r\n".to_vec()),
            Just(b"GET / HTTP/1.2\r\n".to_vec()),
            Just(b"X: a\r\n b\r\n".to_vec()),
            Just(b"Content-Length: 2\r\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\r".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..16),
        ]
    }

    proptest! {
        /// No panic, no byte lost or added, and the same outcome however the reads are cut.
        #[test]
        fn the_outcome_does_not_depend_on_read_boundaries(
            pieces in proptest::collection::vec(piece(), 0..12),
            cut in 1usize..40,
        ) {
            let stream: Vec<u8> = pieces.concat();
            let whole = scan(&[&stream], 64 * 1024);
            prop_assert_eq!(whole.0.len(), stream.len());
            let parts: Vec<&[u8]> = stream.chunks(cut).collect();
            prop_assert_eq!(scan(&parts, cut), whole);
        }
    }
}
