//! Untrusted input: a peer's certificate (DER). Extracting its SPIFFE identity never panics,
//! and whatever identity comes out round-trips through its string form.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = outrigger_identity::identity_from_der(data) {
        let again: outrigger_identity::Identity = id.to_string().parse().expect("round trip");
        assert_eq!(again, id);
    }
    let _ = outrigger_identity::spiffe_uris_from_der(data);
});
