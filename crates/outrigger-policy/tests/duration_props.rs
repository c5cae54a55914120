//! Property tests of the workspace's one duration parser (`outrigger_policy::duration`): no
//! string makes it panic, and what it formats it reads back to the same value.

use outrigger_policy::duration::{GoDuration, parse_agent_duration};
use proptest::prelude::*;

/// Strings made of the pieces a duration is written with, and of the ones that break parsers:
/// huge digit runs, signs, points, unknown and non-ASCII units.
fn duration_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[0-9]{1,25}".prop_map(|s| s),
        Just(".".to_string()),
        Just("-".to_string()),
        Just("+".to_string()),
        Just("ns".to_string()),
        Just("us".to_string()),
        Just("µs".to_string()),
        Just("μs".to_string()),
        Just("ms".to_string()),
        Just("s".to_string()),
        Just("m".to_string()),
        Just("h".to_string()),
        Just("d".to_string()),
        Just("y".to_string()),
        Just(" ".to_string()),
        Just("\u{0}".to_string()),
        Just("é".to_string()),
        Just("99999999999999999999".to_string()),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Any string: an answer, never a panic (a panic is an outage under `panic = "abort"`).
    #[test]
    fn no_string_panics(s in any::<String>()) {
        let _ = GoDuration::parse(&s);
        let _ = GoDuration::parse_with_days(&s);
        let _ = parse_agent_duration(&s);
    }

    #[test]
    fn no_duration_like_string_panics(s in duration_like()) {
        let go = GoDuration::parse(&s);
        let agent = GoDuration::parse_with_days(&s);
        // The agent's syntax is Go's plus `d`: whatever Go accepts, it accepts alike.
        if let Ok(d) = go {
            prop_assert_eq!(agent.clone(), Ok(d));
        }
        if let Ok(d) = agent {
            // Accepted values are in Go's range and format back to something Go reads.
            prop_assert_eq!(GoDuration::parse(&d.to_string()), Ok(d));
        }
    }

    /// Go's `Duration.String()` form parses back to the same value, over the whole range.
    #[test]
    fn format_then_parse_round_trips(n in any::<i64>()) {
        let d = GoDuration::from_nanos(n);
        prop_assert_eq!(GoDuration::parse(&d.to_string()), Ok(d));
        prop_assert_eq!(GoDuration::parse_with_days(&d.to_string()), Ok(d));
    }

    /// Whole units written out parse to exactly their value, or are refused as out of range.
    #[test]
    fn whole_units_are_exact(n in any::<u64>(), unit in 0usize..7) {
        let (suffix, per): (&str, u128) = [
            ("ns", 1),
            ("us", 1_000),
            ("ms", 1_000_000),
            ("s", 1_000_000_000),
            ("m", 60_000_000_000),
            ("h", 3_600_000_000_000),
            ("d", 86_400_000_000_000),
        ][unit];
        let want = u128::from(n) * per;
        let got = GoDuration::parse_with_days(&format!("{n}{suffix}"));
        if want <= i64::MAX as u128 {
            prop_assert_eq!(got.map(|d| d.as_nanos() as u128), Ok(want));
        } else {
            prop_assert!(got.is_err());
        }
    }
}
