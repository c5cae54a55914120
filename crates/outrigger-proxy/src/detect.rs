//! Protocol detection: TLS versus plaintext on the raw socket, then HTTP/1, HTTP/2 or opaque
//! TCP on the (possibly decrypted) stream. Detection reads a bounded number of bytes under a
//! timeout; whatever it read is replayed to the next stage by [`crate::io::Rewind`].

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest HTTP/1 method we recognise, plus the space after it. Anything longer without a
/// space is not HTTP/1.
const MAX_METHOD: usize = 24;

/// What the first bytes of a stream say it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    Opaque,
}

/// Waits (at most `timeout`) for the client's first byte and says whether it starts a TLS
/// handshake record (content type 22). `None`: the client sent nothing in time or closed.
pub async fn peek_is_tls(stream: &TcpStream, timeout: Duration) -> io::Result<Option<bool>> {
    let mut b = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut b)).await {
        Err(_) => Ok(None),
        Ok(Ok(0)) => Ok(None),
        Ok(Ok(_)) => Ok(Some(b[0] == 0x16)),
        Ok(Err(e)) => Err(e),
    }
}

/// Classifies a prefix of a stream. `None` means more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Sniffed::Http2)
        } else {
            None
        };
    }
    // HTTP/1 request line: method token, then a space (RFC 9112 §3). Methods are tokens; in
    // practice uppercase letters, which is also what Envoy's HTTP inspector accepts.
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD) {
        if b == b' ' {
            return Some(if i > 0 {
                Sniffed::Http1
            } else {
                Sniffed::Opaque
            });
        }
        if !(b.is_ascii_uppercase() || b == b'-' || b == b'_') {
            return Some(Sniffed::Opaque);
        }
    }
    if buf.len() >= MAX_METHOD {
        Some(Sniffed::Opaque)
    } else {
        None
    }
}

/// Reads until [`classify`] decides, the stream ends, or `timeout` passes (then: opaque, so a
/// server-first protocol still works, after the timeout). Returns what was read for replay.
pub async fn sniff<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
) -> io::Result<(Sniffed, Bytes)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    // `timeouts.detect` is at most 24h (docs/config.md); the addition is checked all the same.
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400));
    loop {
        if let Some(s) = classify(&buf) {
            return Ok((s, buf.freeze()));
        }
        let mut chunk = [0u8; H2_PREFACE.len()];
        let want = H2_PREFACE.len().max(MAX_METHOD) - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Err(_) => return Ok((Sniffed::Opaque, buf.freeze())),
            Ok(Ok(0)) => return Ok((Sniffed::Opaque, buf.freeze())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Sniffed::Http1));
        assert_eq!(classify(b"PRI * HTTP/2.0"), None);
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"\x00\x01binary"), Some(Sniffed::Opaque));
        assert_eq!(classify(b" GET"), Some(Sniffed::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Sniffed::Opaque));
        assert_eq!(
            classify(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            Some(Sniffed::Opaque)
        );
    }

    #[tokio::test]
    async fn sniff_times_out_to_opaque_and_keeps_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PRI")
            .await
            .unwrap();
        let (s, b) = sniff(&mut server, Duration::from_millis(50)).await.unwrap();
        assert_eq!(s, Sniffed::Opaque);
        assert_eq!(&b[..], b"PRI");
    }

    #[tokio::test]
    async fn sniff_reads_split_preface() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            for part in H2_PREFACE.chunks(5) {
                tokio::io::AsyncWriteExt::write_all(&mut client, part)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client
        });
        let (s, b) = sniff(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(s, Sniffed::Http2);
        assert_eq!(&b[..], H2_PREFACE);
    }
}
