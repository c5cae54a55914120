//! Input from a file the mesh's CA publishes: `certificates.crl` (PEM or DER CRLs). Parsing
//! never panics, and a file that parses reports at least one CRL.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = outrigger_tls::crl::Revocation::from_bytes(
        std::path::Path::new("fuzz.pem"),
        data,
        false,
    ) {
        assert!(r.counts().0 >= 1);
    }
});
