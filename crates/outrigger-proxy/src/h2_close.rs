//! Envoy's answer to a malformed HTTP/2 request: the connection is closed.
//!
//! Istio leaves Envoy's `stream_error_on_invalid_http_message` off, so a request that breaks
//! RFC 9113 §8.2–8.3 (connection-specific fields, an uppercase name, a missing or repeated
//! pseudo-header, a `te` other than `trailers` …) is a codec error that closes the whole
//! connection (compared with the real Envoy in tests/codec.rs: the client sees the connection
//! close, no RST_STREAM, no GOAWAY). The h2 crate under hyper answers the same requests with
//! `RST_STREAM(PROTOCOL_ERROR)`, or `GOAWAY(PROTOCOL_ERROR)` for an undecodable header block,
//! and offers no hook. This wrapper of the downstream stream reads the frames the server
//! writes: when one of those two frames comes, it is not sent, and the connection is closed
//! instead — what Envoy does.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// RFC 9113 §6.4 and §6.8, §7: frame types and the error code.
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const PROTOCOL_ERROR: u32 = 0x1;

pub(crate) struct H2Close<T> {
    inner: T,
    /// Where the frame stream written so far stands.
    frames: Frames,
    /// Set once a protocol-error frame was withheld: every later write fails.
    closed: bool,
}

impl<T> H2Close<T> {
    pub(crate) fn new(inner: T) -> Self {
        H2Close {
            inner,
            frames: Frames::default(),
            closed: false,
        }
    }
}

/// Position in the written frame stream: payload bytes of the current frame still to pass, or
/// the first bytes of a frame header cut by the end of a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Frames {
    skip: usize,
    header: [u8; 9],
    header_len: usize,
}

impl Frames {
    /// Reads `buf` as the continuation of the stream. Returns where a frame that answers a
    /// protocol error starts in `buf` (the bytes before it are read), or `None` after reading
    /// all of `buf`. A frame whose header or error code is cut by the end of `buf` is passed:
    /// the decision needs the whole of it before any of it is written.
    fn scan(&mut self, buf: &[u8]) -> Option<usize> {
        let mut i = 0;
        loop {
            let n = self.skip.min(buf.len() - i);
            i += n;
            self.skip -= n;
            if i == buf.len() {
                return None;
            }
            if self.header_len > 0 {
                // Completing a header cut by the previous write (already written).
                let n = (9 - self.header_len).min(buf.len() - i);
                self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[i..i + n]);
                self.header_len += n;
                i += n;
                if self.header_len == 9 {
                    self.header_len = 0;
                    self.skip = frame_len(&self.header);
                }
                continue;
            }
            let at_start = buf.len() - i;
            if at_start < 9 {
                self.header[..at_start].copy_from_slice(&buf[i..]);
                self.header_len = at_start;
                return None;
            }
            let head = &buf[i..i + 9];
            let code_at = match head[3] {
                RST_STREAM => Some(9),
                GOAWAY => Some(9 + 4),
                _ => None,
            };
            if let Some(at) = code_at
                && let Some(code) = buf.get(i + at..i + at + 4)
                && u32::from_be_bytes([code[0], code[1], code[2], code[3]]) == PROTOCOL_ERROR
            {
                return Some(i);
            }
            self.skip = frame_len(head);
            i += 9;
        }
    }
}

fn frame_len(head: &[u8]) -> usize {
    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2])
}

impl<T: AsyncRead + Unpin> AsyncRead for H2Close<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H2Close<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        let mut frames = self.frames;
        let pass = frames.scan(buf).unwrap_or(buf.len());
        if pass == 0 {
            // The protocol-error frame is first: close instead of sending it.
            self.closed = true;
            tracing::debug!("malformed HTTP/2 request: closing the connection as Envoy does");
            let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..pass]))?;
        if written == buf.len() {
            self.frames = frames;
        } else {
            // Only what was written counts: read the stream up to there.
            let mut f = self.frames;
            let _ = f.scan(&buf[..written]);
            self.frames = f;
        }
        Poll::Ready(Ok(written))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn scan(buf: &[u8], skip: usize) -> (Option<usize>, usize) {
        let mut f = Frames {
            skip,
            ..Frames::default()
        };
        let at = f.scan(buf);
        (at, f.skip)
    }

    #[test]
    fn finds_protocol_error_frames_and_only_those() {
        let settings = frame(0x4, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, 1, b"hello");
        let rst_cancel = frame(RST_STREAM, 1, &8u32.to_be_bytes());
        let rst_proto = frame(RST_STREAM, 3, &1u32.to_be_bytes());
        let goaway_proto = frame(GOAWAY, 0, &[0, 0, 0, 5, 0, 0, 0, 1]);
        let ok: Vec<u8> = [settings.clone(), data.clone(), rst_cancel].concat();
        assert_eq!(scan(&ok, 0), (None, 0));
        let bad = [settings.clone(), data.clone(), rst_proto].concat();
        assert_eq!(scan(&bad, 0), (Some(settings.len() + data.len()), 0));
        assert_eq!(scan(&goaway_proto, 0), (Some(0), 0));
        // A DATA payload cut by the end of a write: the rest is skipped in the next one.
        assert_eq!(scan(&data[..11], 0), (None, 3));
        assert_eq!(
            scan(&[&data[11..], &goaway_proto[..]].concat(), 3),
            (Some(3), 0)
        );
    }

    /// A header cut by the end of a write is completed by the next one, whatever the cut.
    #[test]
    fn frames_are_followed_across_any_cut() {
        let stream: Vec<u8> = [
            frame(0x4, 0, &[0, 3, 0, 0, 0, 100]),
            frame(0x1, 1, b"hdrs"),
            frame(0x0, 1, &[7u8; 300]),
            frame(RST_STREAM, 1, &8u32.to_be_bytes()),
            frame(0x0, 3, b"x"),
        ]
        .concat();
        for cut in 1..stream.len() {
            let mut f = Frames::default();
            assert_eq!(f.scan(&stream[..cut]), None, "cut at {cut}");
            assert_eq!(f.scan(&stream[cut..]), None, "cut at {cut}");
            assert_eq!((f.skip, f.header_len), (0, 0), "cut at {cut}: out of step");
        }
        // And the protocol error after them is still found.
        let bad = [stream.clone(), frame(RST_STREAM, 5, &1u32.to_be_bytes())].concat();
        let mut f = Frames::default();
        let _ = f.scan(&bad[..100]);
        assert_eq!(f.scan(&bad[100..]), Some(stream.len() - 100));
    }
}
