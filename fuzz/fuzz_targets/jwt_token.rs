//! Untrusted input: a JWT as a client sends it, and a JWKS as an issuer serves it. Neither
//! may panic, and a token that decodes must go through signature and claim checks without
//! panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_policy::jwt::{self, ClaimRules, Jwks};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Split the input: first line a key set, the rest a token.
    let (keys, token) = text.split_once('\n').unwrap_or(("", text));
    let jwks = Jwks::parse(keys).unwrap_or_default();
    if let Ok(t) = jwt::decode(token) {
        let _ = t.verify_signature(&jwks);
        let _ = t.check_claims(&ClaimRules {
            issuer: "https://issuer.example",
            audiences: &[],
            now: 1_700_000_000,
            clock_skew: jwt::DEFAULT_CLOCK_SKEW_SECS,
        });
        let _ = t.issuer();
    }
});
