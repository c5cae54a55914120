//! Untrusted input: the CSR in a `CreateCertificate` request to `outrigger ca serve`, and the
//! PEM chain in a CA's answer. Reading the CSR's SANs and signing it never panic; a CSR that
//! signs is one whose SANs could be read.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outrigger_tls::ca::{BuiltinCa, IssueOptions, csr_uri_sans};

fn ca() -> &'static BuiltinCa {
    static CA: OnceLock<BuiltinCa> = OnceLock::new();
    CA.get_or_init(|| BuiltinCa::generate("cluster.local").expect("CA"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sans = csr_uri_sans(text);
    let id = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
    let signed = ca().sign_csr(text, &IssueOptions::workload(&id, Duration::from_secs(60)));
    if signed.is_ok() {
        assert!(sans.is_ok(), "signed a CSR whose SANs could not be read");
    }
    // The same text as a CA's answer (chain, key, root).
    let _ = outrigger_tls::WorkloadCerts::from_pem_checked(text, text, text);
});
