//! Property tests for the parsers of peer-supplied identity data: a bearer token's compact
//! JWS and a SPIFFE ID. Neither panics on any input (each also has a fuzz target under fuzz/).

use outrigger_identity::Identity;
use outrigger_policy::jwt::decode;
use proptest::prelude::*;

proptest! {
    #[test]
    fn token_decoding_never_panics(
        raw in prop_oneof![
            "\\PC{0,80}",
            "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}",
            "eyJ[A-Za-z0-9_-]{0,40}\\.eyJ[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,20}",
        ]
    ) {
        if let Ok(t) = decode(&raw) {
            let _ = t.issuer();
        }
    }

    /// A SPIFFE ID that parses prints back as itself.
    #[test]
    fn spiffe_ids_round_trip(
        raw in prop_oneof![
            "\\PC{0,60}",
            "spiffe://[a-z0-9.-]{0,20}/ns/[a-z0-9-]{0,12}/sa/[a-z0-9-]{0,12}",
        ]
    ) {
        if let Ok(id) = raw.parse::<Identity>() {
            prop_assert_eq!(id.to_string(), raw);
        }
    }
}
