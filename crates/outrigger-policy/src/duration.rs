//! The one duration parser of the workspace: Go's `time.ParseDuration` syntax, in checked
//! integer arithmetic (no floating point, no overflow, no panic on any input).
//!
//! Who writes durations this way:
//!
//! - **Istio resources.** Istio's API fields are `google.protobuf.Duration`, and istiod reads
//!   resources with the legacy `github.com/golang/protobuf/jsonpb` unmarshaler
//!   (istio/istio `pkg/util/protomarshal/protomarshal.go`: "this package explicitly uses the
//!   legacy jsonpb package"; istio/api's `*_json.gen.go` shims use it too), whose
//!   `google.protobuf.Duration` case is `time.ParseDuration(v)` (golang/protobuf
//!   `jsonpb/decode.go`, `case "Duration"`). So a RequestAuthentication `timeout` may be
//!   `"5s"`, `"1.5s"`, `"1m30s"` or `"500ms"`, and a value beyond Go's `time.Duration`
//!   (±2562047h47m16.854775807s) fails to unmarshal: istiod refuses the resource. That is
//!   [`GoDuration::parse`].
//! - **The agent configuration** (`docs/config.md`): the same syntax, plus `d` (24h) which the
//!   agent has always accepted (`ca issue --ttl 30d`). That is [`GoDuration::parse_with_days`].
//!
//! Go's grammar (`time/format.go`): `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0` alone; units
//! `ns`, `us`, `µs` (U+00B5), `μs` (U+03BC), `ms`, `s`, `m`, `h`. Integer parts and sums are
//! checked integers; a fraction's nanoseconds are computed as Go computes them (see
//! [`fraction_nanos`]) so that every value is Go's to the nanosecond.

use std::fmt;
use std::time::Duration;

/// Nanoseconds per unit, as Go's `unitMap`.
const NS: u128 = 1;
const US: u128 = 1_000;
const MS: u128 = 1_000_000;
const S: u128 = 1_000_000_000;
const M: u128 = 60 * S;
const H: u128 = 60 * M;
const D: u128 = 24 * H;

/// Go's `time.Duration` range: `1<<63 - 1` nanoseconds (a negative value may reach `1<<63`).
const MAX_NANOS: u128 = i64::MAX as u128;

/// Inputs longer than this are quoted shortened in errors (they are never valid anyway).
const QUOTE_MAX: usize = 40;

/// Why a duration string was refused. The message names the input and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration: write a number and a unit, e.g. `10s`, `500ms`, `1h30m`")]
    Empty,
    #[error("`{0}` needs a unit after each number (ns, us, ms, s, m, h), e.g. `10s`")]
    MissingUnit(String),
    #[error("`{input}`: unknown unit `{unit}` (use {units})")]
    UnknownUnit {
        input: String,
        unit: String,
        units: &'static str,
    },
    #[error(
        "`{0}` is not a duration: write numbers with units such as `500ms`, `10s`, `1h30m`, `1.5s`"
    )]
    Syntax(String),
    #[error(
        "`{0}` is out of range: a duration is at most 2562047h47m16.854775807s (about 292 years)"
    )]
    OutOfRange(String),
    #[error("`{0}` is negative: a duration here must be zero or more")]
    Negative(String),
}

/// Shortens an input for an error message (a char boundary is kept).
fn quote(s: &str) -> String {
    if s.chars().count() <= QUOTE_MAX {
        return s.to_string();
    }
    let cut: String = s.chars().take(QUOTE_MAX).collect();
    format!("{cut}…")
}

/// A duration as Go's `time.Duration` holds it: signed nanoseconds in an `i64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(i64);

impl GoDuration {
    pub const ZERO: GoDuration = GoDuration(0);
    pub const MAX: GoDuration = GoDuration(i64::MAX);

    pub const fn from_nanos(ns: i64) -> GoDuration {
        GoDuration(ns)
    }

    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// Exactly Go's `time.ParseDuration`: what istiod accepts for a `google.protobuf.Duration`.
    pub fn parse(s: &str) -> Result<GoDuration, DurationError> {
        parse(s, false)
    }

    /// Go's syntax plus the unit `d` (24h): the agent configuration's durations.
    pub fn parse_with_days(s: &str) -> Result<GoDuration, DurationError> {
        parse(s, true)
    }

    /// The duration as a `std::time::Duration`; negative durations have none.
    pub fn to_std(self) -> Option<Duration> {
        u64::try_from(self.0).ok().map(Duration::from_nanos)
    }

    /// A `std::time::Duration` in Go's range (saturating at [`GoDuration::MAX`]).
    pub fn from_std(d: Duration) -> GoDuration {
        GoDuration(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }
}

/// Parses a non-negative duration for a setting of the agent (Go syntax and `d`).
pub fn parse_agent_duration(s: &str) -> Result<Duration, DurationError> {
    let d = GoDuration::parse_with_days(s)?;
    d.to_std().ok_or_else(|| DurationError::Negative(quote(s)))
}

fn unit(u: &str, days: bool) -> Option<u128> {
    Some(match u {
        "ns" => NS,
        // Go accepts the micro sign U+00B5 and the Greek mu U+03BC.
        "us" | "\u{b5}s" | "\u{3bc}s" => US,
        "ms" => MS,
        "s" => S,
        "m" => M,
        "h" => H,
        "d" if days => D,
        _ => return None,
    })
}

/// Go's `leadingFraction` and `v += uint64(float64(f) * (float64(unit) / scale))`: the digits
/// are accumulated while they fit (later ones are ignored), then scaled in float64 and
/// truncated. The float cannot overflow: `f < scale`, so the product is below `unit` (at most
/// 8.64e13), and `as u64` saturates rather than panics in any case.
fn fraction_nanos(digits: &[u8], unit: u128) -> Option<u128> {
    let mut f: u64 = 0;
    let mut scale: f64 = 1.0;
    for &b in digits {
        if f > (i64::MAX as u64) / 10 {
            break;
        }
        let y = f * 10 + u64::from(b - b'0');
        if y > 1 << 63 {
            break;
        }
        f = y;
        scale *= 10.0;
    }
    if f == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let ns = (f as f64 * (unit as f64 / scale)) as u64;
    Some(u128::from(ns))
}

fn parse(orig: &str, days: bool) -> Result<GoDuration, DurationError> {
    let syntax = || DurationError::Syntax(quote(orig));
    let range = || DurationError::OutOfRange(quote(orig));
    let mut s = orig.as_bytes();
    let mut neg = false;
    if let Some((&c, rest)) = s.split_first()
        && (c == b'-' || c == b'+')
    {
        neg = c == b'-';
        s = rest;
    }
    // "Special case: if all that is left is "0", this is zero."
    if s == b"0" {
        return Ok(GoDuration::ZERO);
    }
    if s.is_empty() {
        return Err(if orig.is_empty() {
            DurationError::Empty
        } else {
            syntax()
        });
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        // "The next character must be [0-9.]"
        if !(s[0] == b'.' || s[0].is_ascii_digit()) {
            return Err(syntax());
        }
        // [0-9]*: Go refuses an integer part beyond 1<<63.
        let int_len = s.iter().take_while(|b| b.is_ascii_digit()).count();
        let mut int: u128 = 0;
        for &b in &s[..int_len] {
            int = int * 10 + u128::from(b - b'0');
            if int > 1 << 63 {
                return Err(range());
            }
        }
        s = &s[int_len..];
        // (\.[0-9]*)?
        let mut frac_digits: &[u8] = &[];
        let mut had_point_digits = false;
        if s.first() == Some(&b'.') {
            s = &s[1..];
            let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
            frac_digits = &s[..n];
            had_point_digits = n > 0;
            s = &s[n..];
        }
        if int_len == 0 && !had_point_digits {
            // No digits at all, e.g. ".s" or "-.s".
            return Err(syntax());
        }
        // The unit: everything up to the next digit or '.'. Both are ASCII, so the cut is on a
        // char boundary of the original &str.
        let unit_len = s
            .iter()
            .take_while(|&&b| b != b'.' && !b.is_ascii_digit())
            .count();
        if unit_len == 0 {
            return Err(DurationError::MissingUnit(quote(orig)));
        }
        let u = std::str::from_utf8(&s[..unit_len]).map_err(|_| syntax())?;
        s = &s[unit_len..];
        let Some(per) = unit(u, days) else {
            return Err(DurationError::UnknownUnit {
                input: quote(orig),
                unit: quote(u),
                units: if days {
                    "ns, us, ms, s, m, h or d"
                } else {
                    "ns, us, ms, s, m or h"
                },
            });
        };
        // v * unit, refused beyond 1<<63 as Go does.
        let mut v = int.checked_mul(per).ok_or_else(range)?;
        if v > 1 << 63 {
            return Err(range());
        }
        if let Some(add) = fraction_nanos(frac_digits, per) {
            v += add;
            if v > 1 << 63 {
                return Err(range());
            }
        }
        total = total.checked_add(v).ok_or_else(range)?;
        if total > 1 << 63 {
            return Err(range());
        }
    }
    if neg {
        // -(1<<63) is i64::MIN: representable.
        let n = i128::try_from(total).map_err(|_| range())?;
        return i64::try_from(-n).map(GoDuration).map_err(|_| range());
    }
    if total > MAX_NANOS {
        return Err(range());
    }
    i64::try_from(total).map(GoDuration).map_err(|_| range())
}

/// Formats as Go's `Duration.String()` (`1h30m0s`, `1.5s`, `500ms`, `0s`), which
/// [`GoDuration::parse`] reads back to the same value.
impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = self.0 < 0;
        let mut u = self.0.unsigned_abs();
        let mut out = String::new();
        if u < 1_000_000_000 {
            // Under a second: the largest of ns, µs, ms with a fraction.
            let (prec, unit) = match u {
                0 => return f.write_str("0s"),
                u if u < 1_000 => (0, "ns"),
                u if u < 1_000_000 => (3, "\u{b5}s"),
                _ => (6, "ms"),
            };
            let (frac, whole) = fmt_frac(u, prec);
            out.push_str(&whole.to_string());
            out.push_str(&frac);
            out.push_str(unit);
        } else {
            let (frac, secs) = fmt_frac(u, 9);
            u = secs;
            let s = u % 60;
            u /= 60;
            let m = u % 60;
            let h = u / 60;
            if h > 0 {
                out.push_str(&format!("{h}h{m}m"));
            } else if m > 0 {
                out.push_str(&format!("{m}m"));
            }
            out.push_str(&format!("{s}{frac}s"));
        }
        if neg {
            f.write_str("-")?;
        }
        f.write_str(&out)
    }
}

/// Go's `fmtFrac`: the `prec` low decimal digits of `v` as `.ddd` without trailing zeros (empty
/// when they are all zero), and `v / 10^prec`.
fn fmt_frac(mut v: u64, prec: u32) -> (String, u64) {
    let mut digits = Vec::new();
    let mut print = false;
    for _ in 0..prec {
        let d = (v % 10) as u8;
        print = print || d != 0;
        if print {
            digits.push(b'0' + d);
        }
        v /= 10;
    }
    if digits.is_empty() {
        return (String::new(), v);
    }
    digits.push(b'.');
    digits.reverse();
    (String::from_utf8(digits).unwrap_or_default(), v)
}

/// Istio resources carry durations as strings; parsing one at load time means a bad value is
/// a located load error (`spec.jwtRules[0].timeout: ...`), never a surprise at request time.
impl<'de> serde::Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (a duration such as \"5s\", \"1.5s\" or \"1m30s\")")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<GoDuration, E> {
                GoDuration::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> i64 {
        GoDuration::parse(s).unwrap().as_nanos()
    }

    // The expectations below are Go's own, from time_test.go's parseDurationTests.
    #[test]
    fn go_parse_duration_tests() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("5s", 5_000_000_000),
            ("30s", 30_000_000_000),
            ("1478s", 1_478_000_000_000),
            ("-5s", -5_000_000_000),
            ("+5s", 5_000_000_000),
            ("-0", 0),
            ("+0", 0),
            ("5.0s", 5_000_000_000),
            ("5.6s", 5_600_000_000),
            ("5.s", 5_000_000_000),
            (".5s", 500_000_000),
            ("1.0s", 1_000_000_000),
            ("1.00s", 1_000_000_000),
            ("1.004s", 1_004_000_000),
            ("1.0040s", 1_004_000_000),
            ("100.00100s", 100_001_000_000),
            ("10ns", 10),
            ("11us", 11_000),
            ("12µs", 12_000),
            ("12μs", 12_000),
            ("13ms", 13_000_000),
            ("14s", 14_000_000_000),
            ("15m", 900_000_000_000),
            ("16h", 57_600_000_000_000),
            ("3h30m", 12_600_000_000_000),
            ("10.5s4m", 250_500_000_000),
            ("-2m3.4s", -123_400_000_000),
            ("1h2m3s4ms5us6ns", 3_723_004_005_006),
            ("39h9m14.425s", 140_954_425_000_000),
            ("52763797000ns", 52_763_797_000),
            ("0.3333333333333333333h", 1_200_000_000_000),
            ("9007199254740993ns", 9_007_199_254_740_993),
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("-9223372036s854ms775us808ns", i64::MIN),
            ("-2562047h47m16.854775808s", i64::MIN),
            ("0.100000000000000000000h", 360_000_000_000),
            ("0.830103483285477580700h", 2_988_372_539_827),
        ];
        for (s, want) in cases {
            assert_eq!(ns(s), *want, "{s}");
        }
    }

    // Go's invalid inputs (time_test.go parseDurationErrorTests and the overflow cases).
    #[test]
    fn go_parse_duration_errors() {
        for bad in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "\u{85}\u{85}",
            "\u{ffd}",
            "9223372036854775810ns",
            "9223372036854775808ns",
            "-9223372036854775809ns",
            "9223372036854775.808us",
            "9223372036854ms775us808ns",
            "99999999999999999999s",
            "2562047h47m16.854775808s",
            "5 s",
            " 5s",
        ] {
            assert!(GoDuration::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(GoDuration::parse(""), Err(DurationError::Empty));
        assert!(matches!(
            GoDuration::parse("10"),
            Err(DurationError::MissingUnit(_))
        ));
        assert!(matches!(
            GoDuration::parse("5y"),
            Err(DurationError::UnknownUnit { ref unit, .. }) if unit == "y"
        ));
        let e = GoDuration::parse("99999999999999999999s").unwrap_err();
        assert_eq!(e, DurationError::OutOfRange("99999999999999999999s".into()));
        assert!(e.to_string().contains("out of range"), "{e}");
        let long = "9".repeat(1000) + "s";
        let e = GoDuration::parse(&long).unwrap_err().to_string();
        assert!(e.len() < 200, "the input is shortened: {e}");
    }

    #[test]
    fn days_only_for_the_agent() {
        assert!(GoDuration::parse("30d").is_err());
        assert_eq!(
            parse_agent_duration("30d"),
            Ok(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(
            parse_agent_duration("1d12h"),
            Ok(Duration::from_secs(36 * 3600))
        );
        assert_eq!(
            parse_agent_duration("-1s"),
            Err(DurationError::Negative("-1s".into()))
        );
        assert_eq!(
            parse_agent_duration("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert!(
            parse_agent_duration("106752d").is_err(),
            "beyond Go's range"
        );
    }

    // Go's durationTests for Duration.String().
    #[test]
    fn formats_as_go() {
        let cases: &[(i64, &str)] = &[
            (0, "0s"),
            (1, "1ns"),
            (1_100, "1.1µs"),
            (2_200_000, "2.2ms"),
            (3_300_000_000, "3.3s"),
            (240_000_000_000, "4m0s"),
            (250_000_000_000, "4m10s"),
            (301_100_000_000, "5m1.1s"),
            (
                6 * 3_600_000_000_000 + 420_000_000_000 + 1_100_000_000,
                "6h7m1.1s",
            ),
            (8 * 3_600_000_000_000 + 1, "8h0m0.000000001s"),
            (i64::MAX, "2562047h47m16.854775807s"),
            (i64::MIN, "-2562047h47m16.854775808s"),
            (-1, "-1ns"),
        ];
        for (n, want) in cases {
            assert_eq!(GoDuration::from_nanos(*n).to_string(), *want);
        }
    }
}
