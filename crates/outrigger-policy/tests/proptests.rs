//! Property tests: path normalization and matching.

use outrigger_policy::{PathNormalization, normalize_path};
use proptest::prelude::*;

fn modes() -> impl Strategy<Value = PathNormalization> {
    prop_oneof![
        Just(PathNormalization::None),
        Just(PathNormalization::Base),
        Just(PathNormalization::MergeSlashes),
        Just(PathNormalization::DecodeAndMergeSlashes),
    ]
}

/// Paths made of the pieces attacks use.
fn paths() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just("//".to_string()),
        Just("\\".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2E".to_string()),
        Just("%2f".to_string()),
        Just("%2F".to_string()),
        Just("%5c".to_string()),
        Just("%25".to_string()),
        Just("%41".to_string()),
        Just("%7e".to_string()),
        Just("%zz".to_string()),
        Just("%00".to_string()),
        Just("%".to_string()),
        Just("admin".to_string()),
        Just("a".to_string()),
        Just("é".to_string()),
        "[a-z0-9._~-]{1,4}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| format!("/{}", v.concat()))
}

/// RFC 3986 5.2.4 remove_dot_segments, written from the spec's algorithm (input buffer /
/// output buffer), for comparison.
fn rfc_remove_dot_segments(input: &str) -> String {
    let mut input = input.to_string();
    let mut output = String::new();
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../") {
            input = rest.to_string();
        } else if let Some(rest) = input.strip_prefix("./") {
            input = rest.to_string();
        } else if input.starts_with("/./") {
            input = input[2..].to_string();
        } else if input == "/." {
            input = "/".to_string();
        } else if input.starts_with("/../") || input == "/.." {
            input = if input == "/.." {
                "/".to_string()
            } else {
                input[3..].to_string()
            };
            if let Some(i) = output.rfind('/') {
                output.truncate(i);
            } else {
                output.clear();
            }
        } else if input == "." || input == ".." {
            input.clear();
        } else {
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push_str(&input[..end]);
            input = input[end..].to_string();
        }
    }
    output
}

/// Percent-decodes unreserved characters, `\` → `/`, as BASE does before dot removal.
fn decode_unreserved(p: &str) -> Option<String> {
    let b = p.as_bytes();
    let mut out = String::new();
    let mut stray = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // A `%` that starts no escape is kept (Envoy keeps it); `%00` is refused.
            let Some(c) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|x| x.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            else {
                stray.push(out.len());
                out.push('%');
                i += 1;
                continue;
            };
            if c == 0 {
                return None;
            }
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                out.push(c as char);
            } else {
                out.push_str(&format!("%{:02X}", c));
            }
            i += 3;
        } else if b[i] == b'\\' {
            out.push('/');
            i += 1;
        } else {
            let ch = p[i..].chars().next()?;
            if ch.is_ascii() {
                out.push(ch);
            } else {
                let mut buf = [0u8; 4];
                for byte in ch.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
            i += ch.len_utf8();
        }
    }
    // Envoy's canonicalizer (not the RFC): a kept `%` that now stands before two hex digits
    // is written `%25`, so that decoding the result again cannot make a new escape.
    for at in stray.into_iter().rev() {
        let next: Vec<char> = out[at + 1..].chars().take(2).collect();
        if next.len() == 2 && next.iter().all(char::is_ascii_hexdigit) {
            out.insert_str(at + 1, "25");
        }
    }
    Some(out)
}

proptest! {
    #[test]
    fn normalization_is_idempotent(p in paths(), mode in modes()) {
        if let Ok(once) = normalize_path(&p, mode) {
            let twice = normalize_path(&once.path, mode).expect("a normalized path normalizes");
            prop_assert_eq!(&once.path, &twice.path);
        }
    }

    #[test]
    fn normalized_paths_have_no_dot_segments_or_backslashes(p in paths(), mode in prop_oneof![
        Just(PathNormalization::Base),
        Just(PathNormalization::MergeSlashes),
        Just(PathNormalization::DecodeAndMergeSlashes),
    ]) {
        if let Ok(n) = normalize_path(&p, mode) {
            prop_assert!(n.path.starts_with('/'));
            prop_assert!(!n.path.contains('\\'));
            prop_assert!(n.path.split('/').all(|s| s != "." && s != ".."), "{}", n.path);
            if mode != PathNormalization::Base {
                prop_assert!(!n.path.contains("//"), "{}", n.path);
            }
        }
    }

    /// BASE is exactly RFC 3986 (decode unreserved, `\` → `/`, remove_dot_segments), so a
    /// path lands inside a DENY prefix like `/admin` iff the RFC says it does.
    #[test]
    fn base_matches_the_rfc_on_deny_prefixes(p in paths()) {
        let ours = normalize_path(&p, PathNormalization::Base);
        let reference = decode_unreserved(&p).map(|d| rfc_remove_dot_segments(&d));
        match (ours, reference) {
            (Ok(n), Some(r)) => {
                let r = if r.is_empty() { "/".to_string() } else { r };
                prop_assert_eq!(&n.path, &r);
                prop_assert_eq!(n.path.starts_with("/admin"), r.starts_with("/admin"));
            }
            (Err(_), None) => {}
            (o, r) => prop_assert!(false, "ours {:?} reference {:?}", o, r),
        }
    }
}
