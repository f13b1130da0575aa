//! Query hints in comments: `/* pgstash: skip */`, `/* pgstash: ttl=30s */`, or both
//! (`/* pgstash: skip, ttl=5m */`). Separate from [`analyze`](super::analyze) because
//! sqlparser drops comments. Comments are found with the crate's lexer, so hint-like text
//! inside string literals (user data) is never a hint. Unknown directives are ignored, so
//! newer hints do not break older proxies.

use std::time::Duration;

use super::lex::{Item, Lexer};

/// Hints found in a statement text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hints {
    /// Never serve from or fill the cache for this statement.
    pub skip: bool,
    /// Entry TTL requested by the client. If several are given, the shortest wins.
    pub ttl: Option<Duration>,
}

const PREFIX: &str = "pgstash:";

/// Parses every `pgstash:` comment in `sql`.
pub fn hints(sql: &str) -> Hints {
    let mut hints = Hints::default();
    // Cheap reject: most statements carry no hint.
    if !contains_ignore_case(sql, PREFIX) {
        return hints;
    }
    for item in Lexer::new(sql) {
        let Item::Comment(body) = item else { continue };
        let body = body.trim_start();
        let Some(head) = body.get(..PREFIX.len()) else {
            continue;
        };
        if !head.eq_ignore_ascii_case(PREFIX) {
            continue;
        }
        for directive in directives(&body[PREFIX.len()..]) {
            match directive.split_once('=') {
                None if directive.eq_ignore_ascii_case("skip") => hints.skip = true,
                Some((key, value)) if key.eq_ignore_ascii_case("ttl") => {
                    if let Some(ttl) = parse_duration(value) {
                        hints.ttl = Some(hints.ttl.map_or(ttl, |old| old.min(ttl)));
                    }
                }
                _ => {}
            }
        }
    }
    hints
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Splits `skip, ttl = 30s` into `["skip", "ttl=30s"]`.
fn directives(text: &str) -> Vec<String> {
    let mut compact = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            // Drop whitespace next to '=' so `ttl = 30s` is one directive.
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if compact.ends_with('=') || chars.peek() == Some(&'=') {
                continue;
            }
            compact.push(' ');
        } else {
            compact.push(c);
        }
    }
    compact
        .split([',', ' '])
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `30s`, `500ms`, `5m`, `2h`, `1d`, or a bare number of seconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let secs = |factor: u64| n.checked_mul(factor).map(Duration::from_secs);
    match unit.to_ascii_lowercase().as_str() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" | "sec" | "secs" => secs(1),
        "m" | "min" | "mins" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_hint_is_default() {
        assert_eq!(hints("SELECT 1"), Hints::default());
    }

    #[test]
    fn skip_hint_anywhere() {
        assert!(hints("SELECT /* pgstash: skip */ * FROM t").skip);
        assert!(hints("SELECT * FROM t -- pgstash: skip").skip);
        assert!(hints("/*PGSTASH:SKIP*/ SELECT 1").skip);
    }

    #[test]
    fn ttl_hint_units() {
        let ttl = |s: &str| hints(s).ttl;
        assert_eq!(
            ttl("/* pgstash: ttl=30s */ SELECT 1"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            ttl("/* pgstash: ttl = 5m */ SELECT 1"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            ttl("/* pgstash: ttl=250ms */ SELECT 1"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            ttl("/* pgstash: ttl=2h */ SELECT 1"),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(
            ttl("/* pgstash: ttl=10 */ SELECT 1"),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn combined_hints_and_shortest_ttl_wins() {
        let h = hints("/* pgstash: skip, ttl=1m */ SELECT 1 /* pgstash: ttl=10s */");
        assert!(h.skip);
        assert_eq!(h.ttl, Some(Duration::from_secs(10)));
    }

    #[test]
    fn malformed_and_unknown_directives_are_ignored() {
        let h = hints("/* pgstash: ttl=forever, frobnicate, ttl=99999999999999999999d */ SELECT 1");
        assert_eq!(h, Hints::default());
    }

    #[test]
    fn hint_text_inside_string_literal_is_not_a_hint() {
        assert_eq!(hints("SELECT '/* pgstash: skip */'"), Hints::default());
        assert_eq!(hints("SELECT $$ -- pgstash: ttl=1s $$"), Hints::default());
    }

    #[test]
    fn other_comments_are_not_hints() {
        assert_eq!(
            hints("/* cache: skip */ SELECT 1 /* mentions pgstash: skip */"),
            Hints::default()
        );
    }
}
