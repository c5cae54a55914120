//! Istio's TCP metadata exchange: the bytes two mesh proxies put at the start of a TCP stream
//! whose mTLS handshake selected the ALPN `istio-peer-exchange`, so that each learns the other's
//! workload for the `istio_tcp_*` metrics (the HTTP form, headers on each request, is
//! crate::peer_metadata). Pure encoding and decoding: no I/O (the stream adapter that strips
//! the peer's exchange is crate::io::MxRead).
//!
//! The specification is Istio's `metadata_exchange` network filter, now in envoyproxy/envoy
//! `contrib/istio/filters/network/metadata_exchange/source/`:
//!
//! - framing (`metadata_exchange_initial_header.h`, `MetadataExchangeInitialHeader`): a 4-byte
//!   magic `0x3D230467` and the 4-byte length of what follows, both in network byte order
//!   (`absl::ghtonl`), then that many bytes: a serialized `google.protobuf.Any`
//!   (`constructProxyHeaderData`);
//! - the `Any` (`writeNodeMetadata`): `type_url` `type.googleapis.com/google.protobuf.Struct`,
//!   `value` the deterministic serialization (`serializeToStringDeterministic`) of a `Struct`
//!   with `x-envoy-peer-metadata` = the workload struct (`convertWorkloadMetadataToStruct`, the
//!   same struct the HTTP exchange sends in base64) and `x-envoy-peer-metadata-id` = the node
//!   id;
//! - reading (`tryReadInitialProxyHeader`, `tryReadProxyData`): fewer than 8 bytes wait for
//!   more, and at end of stream the filter gives up (`Invalid`) and passes them on; a wrong
//!   magic gives up (`initial_header_not_found`, `Invalid`) and passes everything on, the 8
//!   bytes included; with the magic right the header is drained and the filter waits for the
//!   whole length; an `Any` that does not parse gives up (`header_not_found`) and passes on
//!   what follows the header; a parsed one is drained and the bytes after it are the
//!   application's stream (the filter's own test, `metadata_exchange_test.cc`
//!   `MetadataExchangeFound`: the stream after the exchange reads `world`). The peer is
//!   `x-envoy-peer-metadata`'s struct (`convertStructToWorkloadMetadata`); a `Struct` without
//!   that key names no peer.
//!
//! Where Envoy has no bound, this has one: a declared length above [`MAX_METADATA`] is refused
//! ([`Parsed::TooLarge`]; Envoy would buffer up to its connection buffer limit and then stop
//! reading, leaving the connection stalled), and an `Any` whose `type_url` is not a `Struct`'s
//! or whose value is not a `Struct` names no peer (Envoy's `MessageUtil::anyConvert` throws
//! there). Like the HTTP exchange, the values only label metrics and logs; policy never reads
//! them.

use std::collections::BTreeMap;

use prost::Message;
use prost_types::value::Kind;
use prost_types::{Any, Struct, Value};

use crate::peer_metadata::PeerMetadata;

/// The ALPN value that selects the exchange (`outrigger_tls::PEER_EXCHANGE_ALPN`; Istio's
/// `TCPListenerMx` / `TCPClusterMx` filters are configured with `protocol:
/// istio-peer-exchange`, istio/istio `pilot/pkg/xds/filters/filters.go`).
pub const ALPN: &[u8] = outrigger_tls::PEER_EXCHANGE_ALPN;

/// `MetadataExchangeInitialHeader::magic_number` (decimal 1025705063).
pub const MAGIC: u32 = 0x3D23_0467;

/// The header: magic and length, 4 bytes each.
pub const HEADER_LEN: usize = 8;

/// The longest metadata accepted. A sidecar's is a few hundred bytes (its workload's name,
/// namespace, cluster, owner and four labels); Envoy itself stops reading at its connection
/// buffer limit (1 MiB by default) and never completes the exchange past it.
pub const MAX_METADATA: usize = 64 * 1024;

/// The `Any`'s type (`StructTypeUrl` in metadata_exchange.cc).
pub const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";

/// The keys of the exchanged `Struct` (`ExchangeMetadataHeader`, `ExchangeMetadataHeaderId`).
const METADATA_KEY: &str = "x-envoy-peer-metadata";
const ID_KEY: &str = "x-envoy-peer-metadata-id";

/// This workload's exchange, header included: what `writeNodeMetadata` writes. `id` is left out
/// when empty (Envoy adds it only when the node id is not empty).
pub fn encode(me: &PeerMetadata, id: &str) -> Vec<u8> {
    let mut fields = BTreeMap::new();
    fields.insert(
        METADATA_KEY.to_string(),
        Value {
            kind: Some(Kind::StructValue(me.to_struct())),
        },
    );
    if !id.is_empty() {
        fields.insert(
            ID_KEY.to_string(),
            Value {
                kind: Some(Kind::StringValue(id.to_string())),
            },
        );
    }
    // prost writes a `Struct`'s map in key order, which is protobuf's deterministic order.
    let any = Any {
        type_url: STRUCT_TYPE_URL.to_string(),
        value: Struct { fields }.encode_to_vec(),
    };
    let body = any.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    // The workload struct is built from the configuration's short names: far below 4 GiB.
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// What the start of a stream says, read as the filter reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet (`NeedMoreDataInitialHeader`, `NeedMoreDataProxyHeader`).
    NeedMore,
    /// The exchange was read (`Done`): the first `consumed` bytes were the header and the
    /// metadata; the rest are the application's. `peer` is `None` when the `Struct` had no
    /// `x-envoy-peer-metadata`.
    Exchanged {
        consumed: usize,
        peer: Option<PeerMetadata>,
    },
    /// Not an exchange (`Invalid`): the bytes from `from` on are the application's.
    NotExchanged { from: usize, why: NotExchanged },
    /// The magic is right but the metadata is declared longer than [`MAX_METADATA`].
    TooLarge(u32),
    /// The magic is right but the stream ended inside the metadata: Envoy holds those bytes
    /// back for good (`NeedMoreDataProxyHeader` ignores the end of stream).
    Truncated,
}

/// Why a stream did not start with an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotExchanged {
    /// Fewer than 8 bytes, then the end of the stream ("Upstream closed early, aborting
    /// istio-peer-exchange").
    Short,
    /// The first 4 bytes are not the magic (`initial_header_not_found`: "Peer missing TCP
    /// MetadataExchange filter").
    BadMagic,
    /// The bytes after the header are not a protobuf `Any` (`header_not_found`).
    BadMetadata,
}

impl NotExchanged {
    pub fn as_str(self) -> &'static str {
        match self {
            NotExchanged::Short => "the stream ended before the exchange's header",
            NotExchanged::BadMagic => "the stream does not start with the exchange's magic",
            NotExchanged::BadMetadata => "the exchange's metadata is not a protobuf Any",
        }
    }
}

/// Reads the start of a stream: `buf` is every byte read so far, `eof` whether the stream has
/// ended after them. Never panics; looks at no more than [`HEADER_LEN`] + [`MAX_METADATA`]
/// bytes.
pub fn parse(buf: &[u8], eof: bool) -> Parsed {
    let (Some(magic), Some(len)) = (be_u32(buf, 0), be_u32(buf, 4)) else {
        return if eof {
            Parsed::NotExchanged {
                from: 0,
                why: NotExchanged::Short,
            }
        } else {
            Parsed::NeedMore
        };
    };
    if magic != MAGIC {
        return Parsed::NotExchanged {
            from: 0,
            why: NotExchanged::BadMagic,
        };
    }
    let n = len as usize;
    if n > MAX_METADATA {
        return Parsed::TooLarge(len);
    }
    let Some(data) = buf.get(HEADER_LEN..HEADER_LEN + n) else {
        return if eof {
            Parsed::Truncated
        } else {
            Parsed::NeedMore
        };
    };
    match Any::decode(data) {
        Ok(any) => Parsed::Exchanged {
            consumed: HEADER_LEN + n,
            peer: peer_of(&any),
        },
        Err(_) => Parsed::NotExchanged {
            from: HEADER_LEN,
            why: NotExchanged::BadMetadata,
        },
    }
}

fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

/// `MessageUtil::anyConvert<Struct>` then `fields().find(ExchangeMetadataHeader)`: the peer
/// when the `Struct` has the key (a value that is not a struct reads as an empty one, as
/// protobuf's `struct_value()` does: a peer with every field empty).
fn peer_of(any: &Any) -> Option<PeerMetadata> {
    if !is_struct(&any.type_url) {
        return None;
    }
    let s = Struct::decode(any.value.as_slice()).ok()?;
    let v = s.fields.get(METADATA_KEY)?;
    Some(match &v.kind {
        Some(Kind::StructValue(w)) => PeerMetadata::from_struct(w),
        _ => PeerMetadata::default(),
    })
}

/// protobuf's `Any::Is<Struct>` (`AnyMetadata::InternalIs`): the type URL ends with
/// `/google.protobuf.Struct`, whatever comes before the slash.
fn is_struct(type_url: &str) -> bool {
    type_url
        .strip_suffix("google.protobuf.Struct")
        .is_some_and(|prefix| prefix.ends_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf length-delimited field, written by hand (tag, varint length, bytes), so that
    /// these tests check the codec against the wire format, not against itself.
    fn field(tag: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let mut n = bytes.len();
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(bytes);
        out
    }

    /// `Struct` map entry `key` → `Value` (field 1 of Struct: key = 1, value = 2).
    fn entry(key: &str, value: &[u8]) -> Vec<u8> {
        field(
            0x0a,
            &[field(0x0a, key.as_bytes()), field(0x12, value)].concat(),
        )
    }

    fn string_value(s: &str) -> Vec<u8> {
        field(0x1a, s.as_bytes())
    }

    fn any(type_url: &str, value: &[u8]) -> Vec<u8> {
        [field(0x0a, type_url.as_bytes()), field(0x12, value)].concat()
    }

    /// `constructProxyHeaderData` in metadata_exchange_test.cc: magic and length in network
    /// byte order, then the serialized `Any`.
    fn framed(any: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&(any.len() as u32).to_be_bytes());
        out.extend_from_slice(any);
        out
    }

    /// envoyproxy/envoy `contrib/istio/filters/network/metadata_exchange/test/
    /// metadata_exchange_test.cc`, `MetadataExchangeFound`: the `Any` wraps the struct
    /// `{namespace: default, labels: "{app, productpage}"}` directly (no
    /// `x-envoy-peer-metadata` key), followed by `world`. The filter drains the exchange —
    /// `data.toString() == "world"` — counts neither `initial_header_not_found` nor
    /// `header_not_found`, and names no peer (`updatePeer` is not called without the key).
    #[test]
    fn envoys_metadata_exchange_found_bytes() {
        let productpage = [
            entry("labels", &string_value("{app, productpage}")),
            entry("namespace", &string_value("default")),
        ]
        .concat();
        let any = any(STRUCT_TYPE_URL, &productpage);
        assert_eq!(any.len(), 102);
        let mut data = framed(&any);
        assert_eq!(&data[..8], &[0x3d, 0x23, 0x04, 0x67, 0, 0, 0, 102]);
        data.extend_from_slice(b"world");
        match parse(&data, false) {
            Parsed::Exchanged { consumed, peer } => {
                assert_eq!(&data[consumed..], b"world");
                assert_eq!(peer, None);
            }
            other => panic!("{other:?}"),
        }
        // Every prefix shorter than the exchange waits for more; at end of stream, a short
        // header is given up on and a cut metadata is held back.
        for cut in 0..110 {
            assert_eq!(parse(&data[..cut], false), Parsed::NeedMore, "{cut}");
            let at_end = parse(&data[..cut], true);
            if cut < HEADER_LEN {
                assert_eq!(
                    at_end,
                    Parsed::NotExchanged {
                        from: 0,
                        why: NotExchanged::Short
                    }
                );
            } else {
                assert_eq!(at_end, Parsed::Truncated, "{cut}");
            }
        }
    }

    /// What an Istio sidecar writes (`writeNodeMetadata`): the workload struct under
    /// `x-envoy-peer-metadata` and the node id, in key order; read back, the workload is the
    /// peer. The bytes are compared with a hand-built serialization.
    #[test]
    fn our_exchange_is_what_writenodemetadata_writes() {
        let me = PeerMetadata {
            namespace: "ns".into(),
            workload: "w".into(),
            app: "a".into(),
            ..Default::default()
        };
        let bytes = encode(&me, "sidecar~x");
        // convertWorkloadMetadataToStruct: LABELS {app}, NAMESPACE, WORKLOAD_NAME, in key order.
        let workload = [
            entry("LABELS", &field(0x2a, &entry("app", &string_value("a")))),
            entry("NAMESPACE", &string_value("ns")),
            entry("WORKLOAD_NAME", &string_value("w")),
        ]
        .concat();
        let outer = [
            entry(METADATA_KEY, &field(0x2a, &workload)),
            entry(ID_KEY, &string_value("sidecar~x")),
        ]
        .concat();
        assert_eq!(bytes, framed(&any(STRUCT_TYPE_URL, &outer)));
        let mut stream = bytes.clone();
        stream.extend_from_slice(b"app data");
        assert_eq!(
            parse(&stream, false),
            Parsed::Exchanged {
                consumed: bytes.len(),
                peer: Some(me.clone())
            }
        );
        // No id: the key is left out.
        let no_id = encode(&me, "");
        assert_eq!(
            no_id,
            framed(&any(
                STRUCT_TYPE_URL,
                &entry(METADATA_KEY, &field(0x2a, &workload))
            ))
        );
    }

    /// `MetadataExchangeNotFound`'s counterparts on the data path: a stream that does not
    /// start with the magic is passed on whole; metadata that is not an `Any` is passed on
    /// after the header; both name no peer.
    #[test]
    fn a_wrong_magic_or_bad_metadata_is_passed_on() {
        let http = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(
            parse(http, false),
            Parsed::NotExchanged {
                from: 0,
                why: NotExchanged::BadMagic
            }
        );
        // A wrong magic needs only the 8 bytes of a header to be seen (Envoy waits for them).
        assert_eq!(parse(&http[..7], false), Parsed::NeedMore);
        let garbage = framed(&[0xff; 10]);
        assert_eq!(
            parse(&garbage, false),
            Parsed::NotExchanged {
                from: HEADER_LEN,
                why: NotExchanged::BadMetadata
            }
        );
    }

    #[test]
    fn declared_lengths_are_bounded() {
        let mut header = MAGIC.to_be_bytes().to_vec();
        header.extend_from_slice(&(MAX_METADATA as u32 + 1).to_be_bytes());
        assert_eq!(
            parse(&header, false),
            Parsed::TooLarge(MAX_METADATA as u32 + 1)
        );
        let mut header = MAGIC.to_be_bytes().to_vec();
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse(&header, true), Parsed::TooLarge(u32::MAX));
        // An empty `Any` (length 0) parses: no type, no peer.
        let empty = framed(&[]);
        assert_eq!(
            parse(&empty, false),
            Parsed::Exchanged {
                consumed: 8,
                peer: None
            }
        );
    }

    /// `Any::Is<Struct>`: any prefix ending in `/`; another type, or a value that is not a
    /// `Struct`, names no peer (Envoy's `anyConvert` throws); a key whose value is not a
    /// struct names a peer with nothing known.
    #[test]
    fn the_any_must_hold_a_struct() {
        let workload = entry(
            METADATA_KEY,
            &field(0x2a, &entry("NAMESPACE", &string_value("n"))),
        );
        let peer = |type_url: &str, value: &[u8]| match parse(&framed(&any(type_url, value)), true)
        {
            Parsed::Exchanged { peer, .. } => peer,
            other => panic!("{other:?}"),
        };
        let named = Some(PeerMetadata {
            namespace: "n".into(),
            ..Default::default()
        });
        assert_eq!(peer(STRUCT_TYPE_URL, &workload), named);
        assert_eq!(peer("x/google.protobuf.Struct", &workload), named);
        assert_eq!(peer("google.protobuf.Struct", &workload), None);
        assert_eq!(
            peer("type.googleapis.com/google.protobuf.Value", &workload),
            None
        );
        assert_eq!(peer(STRUCT_TYPE_URL, &[0xff, 0xff]), None);
        assert_eq!(
            peer(STRUCT_TYPE_URL, &entry(METADATA_KEY, &string_value("x"))),
            Some(PeerMetadata::default())
        );
    }

    use proptest::arbitrary::any as arb;
    use proptest::prelude::{Just, prop_assert_eq, prop_oneof, proptest};

    proptest! {
        /// The outcome is the same however much of the stream has arrived once it is known
        /// (what crate::io::MxRead relies on: it parses after every read), whatever the bytes.
        #[test]
        fn the_outcome_does_not_depend_on_read_boundaries(
            magic in prop_oneof![Just(MAGIC), arb::<u32>()],
            body in proptest::collection::vec(arb::<u8>(), 0..160),
            tail in proptest::collection::vec(arb::<u8>(), 0..16),
        ) {
            let mut buf = magic.to_be_bytes().to_vec();
            buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
            buf.extend_from_slice(&body);
            buf.extend_from_slice(&tail);
            let whole = parse(&buf, false);
            let first = (0..=buf.len())
                .map(|k| parse(&buf[..k], false))
                .find(|p| *p != Parsed::NeedMore)
                .unwrap_or(Parsed::NeedMore);
            prop_assert_eq!(first, whole);
        }

        /// Any workload this side can describe is read back as itself.
        #[test]
        fn any_workload_round_trips(
            workload in ".{0,40}", namespace in "[a-z0-9-]{0,20}", app in ".{0,20}",
            revision in ".{0,10}", id in ".{0,60}",
        ) {
            let me = PeerMetadata {
                workload, namespace, app, canonical_revision: revision,
                ..Default::default()
            };
            let bytes = encode(&me, &id);
            prop_assert_eq!(
                parse(&bytes, true),
                Parsed::Exchanged { consumed: bytes.len(), peer: Some(me) }
            );
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..300usize {
            let mut buf = MAGIC.to_be_bytes().to_vec();
            buf.extend_from_slice(&(len as u32).to_be_bytes());
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                buf.push(seed as u8);
            }
            let _ = parse(&buf, false);
            let _ = parse(&buf, true);
            let _ = parse(&buf[8..], true);
        }
    }
}
