//! Untrusted input: the `cluster.env` that `istioctl x workload entry configure` wrote and that
//! was copied to the host (`outrigger bootstrap --from DIR`). The parser must never panic;
//! what it accepts has shell-name keys, 1-based lines in file order, and no key twice.
//!
//! The parser lives in the `outrigger` binary crate, which has no library target; it uses
//! only `std`, so this target compiles the very same file.
#![no_main]

#[path = "../../crates/outrigger/src/bootstrap/cluster_env.rs"]
#[allow(dead_code)]
mod cluster_env;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(env) = cluster_env::parse(text) else {
        return;
    };
    let mut last_line = 0;
    let mut seen = std::collections::BTreeSet::new();
    for e in &env.entries {
        assert!(e.key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'));
        assert!(e.key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert!(e.line > last_line, "lines out of order");
        last_line = e.line;
        assert!(seen.insert(e.key.clone()), "{} twice", e.key);
        assert!(!e.value.contains('\0'));
    }
});
