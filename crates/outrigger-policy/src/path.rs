//! Request path normalization, as Istio configures Envoy for `meshConfig.pathNormalization`.
//!
//! Istio (https://istio.io/latest/docs/reference/config/security/normalization/):
//! - `NONE`: "No normalization, paths are used as is for any incoming request."
//! - `BASE` (the `DEFAULT`): "normalize according to RFC 3986" — Envoy's `normalize_path`:
//!   dot segments (`.`, `..`) are resolved, `\` becomes `/`, percent-encoded unreserved
//!   characters (`A-Z a-z 0-9 - . _ ~`) are decoded; other escapes are kept (hex in upper case).
//! - `MERGE_SLASHES`: "In addition to the BASE normalization, slashes are merged": `//` → `/`.
//! - `DECODE_AND_MERGE_SLASHES`: "In addition to normalization in MERGE_SLASHES, slash
//!   characters are unescaped, i.e. `%2F`, `%2f`, `%5C` and `%5c` are converted to `/` or `\`";
//!   Envoy unescapes them before normalizing.
//!
//! The query and fragment are split off first; they take no part in normalization or matching.
//! A path that cannot be normalized (not starting with `/`, an escaped NUL `%00`, a control
//! character) is an error: the proxy answers `400 Bad Request`, as Envoy does (compared with the
//! real Envoy in crates/outrigger/tests/codec.rs). A `%` that does not start an escape (`%zz`,
//! a trailing `%4`) is kept as written, as Envoy keeps it.

use std::fmt;

use crate::PathNormalization;
use crate::error::PathError;

/// A normalized request path and the query that came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// The normalized path: what AuthorizationPolicy `paths` match, and what the proxy
    /// forwards upstream (as Envoy does).
    pub path: String,
    /// The query string without `?`, unchanged.
    pub query: Option<String>,
}

impl fmt::Display for NormalizedPath {
    /// `path?query`, the request-target to forward.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Normalizes a request-target's path (`raw` may carry `?query` and `#fragment`).
pub fn normalize_path(raw: &str, mode: PathNormalization) -> Result<NormalizedPath, PathError> {
    let (before_fragment, _fragment) = raw.split_once('#').unwrap_or((raw, ""));
    let (path, query) = match before_fragment.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (before_fragment, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if let Some(b) = path.bytes().find(|b| *b < 0x20 || *b == 0x7f || *b == b' ') {
        return Err(PathError::ForbiddenCharacter(b));
    }
    if mode == PathNormalization::None {
        return Ok(NormalizedPath {
            path: path.to_string(),
            query,
        });
    }

    // 1. Percent-decoding: unreserved always; `/` and `\` for DECODE_AND_MERGE_SLASHES.
    //    Backslashes become `/`. Non-ASCII bytes are percent-encoded (as Envoy's canonicalizer).
    let decode_slashes = mode == PathNormalization::DecodeAndMergeSlashes;
    let bytes = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    // Where a `%` that starts no escape was kept in `out`.
    let mut stray: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (h, l) = match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => (h, l),
                // Not an escape: kept as written, as Envoy's canonicalizer keeps it.
                _ => {
                    stray.push(out.len());
                    out.push(b'%');
                    i += 1;
                    continue;
                }
            };
            let c = h * 16 + l;
            if c == 0 {
                // Envoy refuses an escaped NUL in the path (`400`), though it forwards every
                // other escaped byte.
                return Err(PathError::BadPercentEncoding(i));
            }
            if is_unreserved(c) {
                out.push(c);
            } else if decode_slashes && (c == b'/' || c == b'\\') {
                out.push(b'/');
            } else {
                out.extend_from_slice(&[b'%', HEX[h as usize], HEX[l as usize]]);
            }
            i += 3;
            continue;
        }
        if b == b'\\' {
            out.push(b'/');
        } else if b >= 0x80 {
            out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        } else {
            out.push(b);
        }
        i += 1;
    }

    // A kept `%` that decoding has put in front of two hex digits (`%%36%31` → `%61`) would
    // be read as an escape by whoever decodes the path next, so it becomes `%25`, as Envoy's
    // canonicalizer writes it (`/%%36%31dmin` is forwarded as `/%2561dmin`: tests/codec.rs).
    // Then the result is stable: normalizing it again changes nothing.
    for &at in stray.iter().rev() {
        if out.get(at + 1).copied().and_then(hex).is_some()
            && out.get(at + 2).copied().and_then(hex).is_some()
        {
            out.splice(at + 1..at + 1, *b"25");
        }
    }

    // 2. RFC 3986 section 5.2.4, remove_dot_segments, on `/`-separated segments.
    let merge = matches!(
        mode,
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
    );
    let text = String::from_utf8(out).map_err(|_| PathError::ForbiddenCharacter(0x80))?;
    let mut segs: Vec<&str> = Vec::new();
    let mut parts = text[1..].split('/').peekable();
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            "." => {
                if last {
                    segs.push("");
                }
            }
            ".." => {
                segs.pop();
                if last {
                    segs.push("");
                }
            }
            s => segs.push(s),
        }
    }
    let mut path = String::with_capacity(text.len());
    for s in &segs {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() {
        path.push('/');
    }
    if merge {
        // A trailing empty segment after merging: `/a//` → `/a/`.
        while path.contains("//") {
            path = path.replace("//", "/");
        }
    }
    Ok(NormalizedPath { path, query })
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    fn n(p: &str, m: PathNormalization) -> String {
        normalize_path(p, m).unwrap().path
    }

    #[test]
    fn base() {
        assert_eq!(n("/a/../admin", Base), "/admin");
        assert_eq!(n("/a/./b", Base), "/a/b");
        assert_eq!(n("/..", Base), "/");
        assert_eq!(n("/a/..", Base), "/");
        assert_eq!(n("/a/b/..", Base), "/a/");
        assert_eq!(n("/a/.", Base), "/a/");
        assert_eq!(n("/../../x", Base), "/x");
        assert_eq!(n("/%2e%2e/admin", Base), "/admin");
        assert_eq!(n("/a/%2E%2e/admin", Base), "/admin");
        assert_eq!(n("/a\\..\\admin", Base), "/admin");
        assert_eq!(n("//admin", Base), "//admin");
        assert_eq!(n("/a%2Fb", Base), "/a%2Fb");
        assert_eq!(n("/a%2fb", Base), "/a%2Fb");
        assert_eq!(n("/%41dmin", Base), "/Admin");
        assert_eq!(n("/Admin", Base), "/Admin");
        assert_eq!(n("/é", Base), "/%C3%A9");
        assert_eq!(n("/a?x=/../y#f", Base), "/a");
        let q = normalize_path("/a/../b?x=1", Base).unwrap();
        assert_eq!(q.query.as_deref(), Some("x=1"));
        assert_eq!(q.to_string(), "/b?x=1");
    }

    #[test]
    fn merge_and_decode() {
        assert_eq!(n("//admin", MergeSlashes), "/admin");
        assert_eq!(n("/a//b///c/", MergeSlashes), "/a/b/c/");
        assert_eq!(n("/a%2Fb", MergeSlashes), "/a%2Fb");
        assert_eq!(n("/a%2Fb", DecodeAndMergeSlashes), "/a/b");
        assert_eq!(n("/a%2f..%2fadmin", DecodeAndMergeSlashes), "/admin");
        assert_eq!(n("/a%5C..%5cadmin", DecodeAndMergeSlashes), "/admin");
        assert_eq!(n("/%2F%2Fadmin", DecodeAndMergeSlashes), "/admin");
        assert_eq!(n("//a/../admin", None), "//a/../admin");
        assert_eq!(n("/a%2f", None), "/a%2f");
    }

    #[test]
    fn errors() {
        assert_eq!(normalize_path("", Base), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("admin", Base), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("*", Base), Err(PathError::NotAbsolute));
        // Envoy (tests/codec.rs against the real Envoy): an escaped NUL is refused, a `%`
        // that starts no escape is kept, every other escaped byte is forwarded.
        assert_eq!(
            normalize_path("/a%00b", Base),
            Err(PathError::BadPercentEncoding(2))
        );
        assert_eq!(n("/a%00b", None), "/a%00b");
        assert_eq!(n("/a%zz", Base), "/a%zz");
        assert_eq!(n("/a%2", Base), "/a%2");
        assert_eq!(n("/a%", Base), "/a%");
        assert_eq!(n("/a%01%7f%ff", Base), "/a%01%7F%FF");
        // Decoding never makes a new escape (Envoy: `/%2561dmin`), and the result is stable.
        assert_eq!(n("/%%36%31dmin", Base), "/%2561dmin");
        assert_eq!(n("/%2561dmin", Base), "/%2561dmin");
        assert_eq!(n("/%%41", Base), "/%A");
        // What the fuzz target `path_normalization` found (not idempotent before the `%25`
        // step): `%%33` decoded to `%3` followed by a digit.
        let found = "/////.///^[/|////////%\\//%\\///\\///%&\\///%\\//%\\///%///\\\\//!%LLLo%!/B1//./%//22e/eH/1%2f//X2e-1f/%2e+/333333L%o%%3333333333/w33/%%2f//X2/%%%//eHe-1//..f/%/2%2f//X2e-";
        for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
            let once = n(found, mode);
            assert_eq!(n(&once, mode), once, "{mode:?}");
        }
        assert_eq!(n("/a?x=%00", Base), "/a");
        assert_eq!(
            normalize_path("/a b", Base),
            Err(PathError::ForbiddenCharacter(b' '))
        );
        assert_eq!(
            normalize_path("/a\0", None),
            Err(PathError::ForbiddenCharacter(0))
        );
    }
}
