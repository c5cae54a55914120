//! `cluster.env` as `istioctl x workload entry configure` writes it, read without a shell.
//!
//! istioctl (istio/istio `istioctl/pkg/workload/workload.go`, `mapToString`) writes one
//! `KEY=value` line per entry, sorted, each value passed through `shellescape.Quote`
//! (`pkg/util/shellescape/quote.go`): `''` for an empty value, the value as is when it matches
//! no character outside `[\w@%+=:,./-]`, else the value in single quotes with every `'` inside
//! written `'"'"'`. Older istioctl releases single-quoted every value. istio-agent's start
//! script then sources the file with a POSIX shell (`set -a; . cluster.env`).
//!
//! This reads the part of the POSIX shell's assignment syntax that such a file (or a careful
//! hand edit of one) uses, and refuses the rest with the line and the reason, never guessing
//! what a shell would have made of it:
//!
//! * blank lines, and comments from a `#` that starts a word to the end of the line;
//! * `KEY=value` and `export KEY=value`, `KEY` a shell name (`[A-Za-z_][A-Za-z0-9_]*`);
//! * the value: unquoted characters, `'single-quoted'` text (anything but `'`, newlines
//!   included), `"double-quoted"` text (`\` escapes `"`, `\`, `$`, `` ` `` and a newline),
//!   and `\x` outside quotes, concatenated as a shell concatenates them;
//! * refused: `$` and `` ` `` outside single quotes (expansion and command substitution), an
//!   unterminated quote, `;&|<>()` outside quotes, a second word on the line, a key set twice,
//!   a NUL byte.
//!
//! It has no dependency beyond `std`, so that the fuzz target (`fuzz/fuzz_targets/cluster_env.rs`)
//! can compile this very file.

use std::fmt;

/// One assignment: the key, the value after quote removal, and the 1-based line of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// A refused file: the 1-based line and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ParseError {}

/// The assignments of a `cluster.env`, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterEnv {
    pub entries: Vec<Entry>,
}

impl ClusterEnv {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }
}

struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
}

impl Cursor<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn err<T>(&self, reason: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            line: self.line,
            reason: reason.into(),
        })
    }

    /// Skips spaces and tabs (not newlines).
    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t' | '\r')) {
            self.next();
        }
    }

    /// Skips a comment to the end of the line (not the newline itself).
    fn skip_comment(&mut self) {
        while self.peek().is_some_and(|c| c != '\n') {
            self.next();
        }
    }

    /// A shell name, or `None` when the next character cannot start one.
    fn name(&mut self) -> Option<String> {
        let first = self.peek()?;
        if !(first.is_ascii_alphabetic() || first == '_') {
            return None;
        }
        let mut s = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                s.push(c);
                self.next();
            } else {
                break;
            }
        }
        Some(s)
    }
}

/// Characters that end a word or mean something to the shell outside quotes.
fn ends_word(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

fn operator(c: char) -> bool {
    matches!(c, ';' | '&' | '|' | '<' | '>' | '(' | ')')
}

/// Parses the text of a `cluster.env`.
pub fn parse(text: &str) -> Result<ClusterEnv, ParseError> {
    let mut cur = Cursor {
        chars: text.chars().peekable(),
        line: 1,
    };
    let mut env = ClusterEnv::default();
    loop {
        cur.skip_blanks();
        match cur.peek() {
            None => break,
            Some('\n') => {
                cur.next();
                continue;
            }
            Some('#') => {
                cur.skip_comment();
                continue;
            }
            Some(_) => {}
        }
        let line = cur.line;
        let Some(mut key) = cur.name() else {
            let c = cur.peek().unwrap_or(' ');
            return cur.err(format!(
                "expected KEY=value, found {c:?}: a key is letters, digits and `_`, not starting with a digit"
            ));
        };
        if key == "export" && matches!(cur.peek(), Some(' ' | '\t')) {
            cur.skip_blanks();
            key = match cur.name() {
                Some(k) => k,
                None => return cur.err("expected KEY=value after `export`"),
            };
        }
        if cur.peek() != Some('=') {
            return cur.err(format!(
                "expected `=` right after the key `{key}` (KEY=value, no spaces around `=`)"
            ));
        }
        cur.next();
        let value = value(&mut cur, &key)?;
        // After the value: blanks, then a comment or the end of the line.
        cur.skip_blanks();
        match cur.peek() {
            None | Some('\n') => {}
            Some('#') => cur.skip_comment(),
            Some(c) => {
                return cur.err(format!(
                    "unexpected {c:?} after the value of {key}: one KEY=value per line (quote a value that has spaces)"
                ));
            }
        }
        if let Some(prev) = env.get(&key) {
            return Err(ParseError {
                line,
                reason: format!(
                    "{key} is set twice (lines {} and {line}); a shell would keep the last silently, so remove one",
                    prev.line
                ),
            });
        }
        env.entries.push(Entry { key, value, line });
    }
    Ok(env)
}

/// The value after `KEY=`: a word made of unquoted, single- and double-quoted parts.
fn value(cur: &mut Cursor<'_>, key: &str) -> Result<String, ParseError> {
    let mut v = String::new();
    while let Some(c) = cur.peek() {
        if ends_word(c) {
            break;
        }
        match c {
            '\0' => return cur.err(format!("a NUL byte in the value of {key}")),
            '\'' => {
                let start = cur.line;
                cur.next();
                loop {
                    match cur.next() {
                        None => {
                            return Err(ParseError {
                                line: start,
                                reason: format!(
                                    "the value of {key} opens a single quote that is never closed"
                                ),
                            });
                        }
                        Some('\'') => break,
                        Some('\0') => return cur.err(format!("a NUL byte in the value of {key}")),
                        Some(c) => v.push(c),
                    }
                }
            }
            '"' => {
                let start = cur.line;
                cur.next();
                loop {
                    match cur.next() {
                        None => {
                            return Err(ParseError {
                                line: start,
                                reason: format!(
                                    "the value of {key} opens a double quote that is never closed"
                                ),
                            });
                        }
                        Some('"') => break,
                        Some('\\') => match cur.next() {
                            // A backslash-newline inside double quotes joins the lines.
                            Some('\n') => {}
                            Some(e @ ('"' | '\\' | '$' | '`')) => v.push(e),
                            // Found by the fuzz target: an escaped NUL is a NUL too.
                            Some('\0') => {
                                return cur.err(format!("a NUL byte in the value of {key}"));
                            }
                            Some(other) => {
                                v.push('\\');
                                v.push(other);
                            }
                            None => {
                                return Err(ParseError {
                                    line: start,
                                    reason: format!(
                                        "the value of {key} opens a double quote that is never closed"
                                    ),
                                });
                            }
                        },
                        Some('$' | '`') => {
                            return cur.err(format!(
                                "the value of {key} has `$` or `` ` `` inside double quotes: shell expansion is not supported; put the value in single quotes"
                            ));
                        }
                        Some('\0') => return cur.err(format!("a NUL byte in the value of {key}")),
                        Some(c) => v.push(c),
                    }
                }
            }
            '\\' => {
                cur.next();
                match cur.next() {
                    // Line continuation.
                    Some('\n') => {}
                    Some('\0') => return cur.err(format!("a NUL byte in the value of {key}")),
                    Some(e) => v.push(e),
                    None => {
                        return cur.err(format!("the value of {key} ends with a lone backslash"));
                    }
                }
            }
            '$' | '`' => {
                return cur.err(format!(
                    "the value of {key} has an unquoted `{c}`: shell expansion is not supported; put the value in single quotes"
                ));
            }
            c if operator(c) => {
                return cur.err(format!(
                    "the value of {key} has an unquoted {c:?}, which a shell reads as an operator; put the value in single quotes"
                ));
            }
            c => {
                cur.next();
                v.push(c);
            }
        }
    }
    Ok(v)
}

/// `shellescape.Quote` (istio/istio `pkg/util/shellescape/quote.go`), the quoting istioctl
/// writes: used by the tests to write samples the way istioctl does, and to check that
/// [`parse`] reads back whatever it quotes.
#[cfg(test)]
pub fn shell_quote(s: &str) -> String {
    if s.is_empty() {
        return "''".to_string();
    }
    // `[^\w@%+=:,./-]` in Go's RE2: `\w` is ASCII `[0-9A-Za-z_]`.
    let unsafe_char = |c: char| {
        !(c.is_ascii_alphanumeric()
            || matches!(c, '_' | '@' | '%' | '+' | '=' | ':' | ',' | '.' | '/' | '-'))
    };
    if s.chars().any(unsafe_char) {
        format!("'{}'", s.replace('\'', "'\"'\"'"))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(text: &str) -> Vec<(String, String)> {
        parse(text)
            .unwrap_or_else(|e| panic!("{e} in {text:?}"))
            .entries
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect()
    }

    fn err(text: &str) -> ParseError {
        parse(text).expect_err(text)
    }

    #[test]
    fn reads_istioctl_quoting() {
        // Lines as istioctl's golden file testdata/vmconfig/ipv4/cluster.env.golden has them
        // (all quoted: older releases), and as the current shellescape.Quote writes them.
        let text = "CANONICAL_REVISION='latest'\nCA_ADDR='istiod-rev-1.istio-system.svc:15012'\n\
                    ISTIO_INBOUND_PORTS='*'\nISTIO_METAJSON_LABELS='{\"app\":\"foo\"}'\n\
                    ISTIO_META_MESH_ID=''\nPOD_NAMESPACE=bar\nTRUST_DOMAIN=cluster.local\n";
        assert_eq!(
            kv(text),
            [
                ("CANONICAL_REVISION", "latest"),
                ("CA_ADDR", "istiod-rev-1.istio-system.svc:15012"),
                ("ISTIO_INBOUND_PORTS", "*"),
                ("ISTIO_METAJSON_LABELS", "{\"app\":\"foo\"}"),
                ("ISTIO_META_MESH_ID", ""),
                ("POD_NAMESPACE", "bar"),
                ("TRUST_DOMAIN", "cluster.local"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let e = parse(text).unwrap();
        assert_eq!(e.get("POD_NAMESPACE").unwrap().line, 6);
    }

    #[test]
    fn a_quote_inside_a_value_and_other_edge_cases() {
        assert_eq!(kv("A='it'\"'\"'s'\n")[0].1, "it's");
        assert_eq!(kv("A='two\nlines'\nB=x")[0].1, "two\nlines");
        assert_eq!(kv("A=\"d \\\"q\\\" \\\\ \\n\"")[0].1, "d \"q\" \\ \\n");
        assert_eq!(kv("A=a\\ b")[0].1, "a b");
        assert_eq!(kv("A=")[0].1, "");
        assert_eq!(kv("export A=1 # note\n\n# c\n  B=2\r\n")[1].1, "2");
        assert_eq!(kv("A='x'y\"z\"")[0].1, "xyz");
        assert_eq!(kv("A=#not-a-comment")[0].1, "#not-a-comment");
        assert_eq!(kv("A='$HOME'")[0].1, "$HOME");
    }

    #[test]
    fn refusals_name_the_line_and_reason() {
        let e = err("A=1\nB='open\n");
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("never closed"), "{e}");
        let e = err("A=1\nA=2\n");
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("A is set twice (lines 1 and 2)"), "{e}");
        assert!(err("A=$HOME").reason.contains("unquoted `$`"));
        assert!(err("A=\"$HOME\"").reason.contains("inside double quotes"));
        assert!(err("A=1 B=2").reason.contains("one KEY=value per line"));
        assert!(err("A = 1").reason.contains("expected `=`"));
        assert!(err("1A=1").reason.contains("expected KEY=value"));
        assert!(err("A=x;rm").reason.contains("operator"));
        assert!(err("A=\\").reason.contains("lone backslash"));
        assert!(err("A='\0'").reason.contains("NUL"));
        assert!(err("A=\"\\\0\"").reason.contains("NUL"));
        assert_eq!(err("\n\n\nA=1 2").line, 4);
    }

    #[test]
    fn reads_back_whatever_shellescape_quotes() {
        for v in [
            "",
            "*",
            "a b",
            "it's",
            "''",
            "'\"'\"'",
            "{\"a\":\"b c\"}",
            "[{\"name\":\"http\",\"containerPort\":8080}]",
            "x\ny",
            "$(reboot)",
            "ünïcödé",
            "back\\slash",
            "#hash",
        ] {
            let text = format!("K={}\n", shell_quote(v));
            assert_eq!(kv(&text), [("K".to_string(), v.to_string())], "{text}");
        }
    }

    /// A property test without a framework: many generated inputs from a fixed seed, built
    /// from the characters that matter to the grammar. No input panics; every accepted input
    /// yields keys that are shell names; every value `shell_quote` writes reads back.
    #[test]
    fn no_input_panics_and_quoting_round_trips() {
        let alphabet: Vec<char> = "AZaz_09=' \"\\\n\t\r#$`;|&<>()*{}[]:,./-@%+é\0x"
            .chars()
            .collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = move || {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for _ in 0..20_000 {
            let len = (rnd() % 40) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                .collect();
            if let Ok(env) = parse(&s) {
                for e in &env.entries {
                    assert!(!e.key.is_empty() && !e.key.starts_with(|c: char| c.is_ascii_digit()));
                    assert!(e.line >= 1);
                }
            }
            let text = format!("KEY={}\n", shell_quote(&s));
            match parse(&text) {
                Ok(env) => assert_eq!(env.entries[0].value, s, "{text:?}"),
                // The only refusal of a quoted value: a NUL byte.
                Err(e) => assert!(s.contains('\0'), "{text:?}: {e}"),
            }
        }
    }
}
