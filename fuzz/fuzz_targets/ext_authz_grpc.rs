//! Untrusted input: the body of an external authorizer's `Authorization/Check` answer
//! (outrigger_proxy::ext_authz::read_grpc_answer). Never panics; a denial's status is an HTTP
//! status and every header it passes is valid HTTP.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_proxy::ext_authz::{Outcome, read_grpc_answer};

fuzz_target!(|data: &[u8]| {
    if let Ok(Outcome::Deny { status, .. }) = read_grpc_answer(data) {
        assert!((100..1000).contains(&status.as_u16()));
    }
});
