//! Untrusted input: a duration string from an Istio resource (RequestAuthentication
//! `timeout`) or the agent configuration. The parser must never panic, and what it accepts
//! must format back (Go's `Duration.String()`) to a string that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_policy::duration::{GoDuration, parse_agent_duration};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = GoDuration::parse(text) {
        assert_eq!(GoDuration::parse(&d.to_string()), Ok(d));
        assert_eq!(GoDuration::parse_with_days(text), Ok(d));
    }
    if let Ok(d) = GoDuration::parse_with_days(text) {
        assert_eq!(GoDuration::parse(&d.to_string()), Ok(d));
    }
    let _ = parse_agent_duration(text);
});
