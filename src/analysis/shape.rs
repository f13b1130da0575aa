//! Literal-independent memo keys for simple-protocol texts.
//!
//! A client on the simple query protocol inlines its values (`... WHERE aid = 4711`), so a
//! memo keyed by text sees every value as a new statement and parses each one (tens of
//! microseconds of sqlparser per query: in `pgbench -S -M simple` that is most of the
//! proxy's CPU). [`LiteralShape`] replaces integer and plain string literals by parameters
//! (`... WHERE aid = $1`); texts of one shape analyse alike, except for the values in point
//! keys and write keys, which [`instantiate`] fills back in from the literals.
//!
//! "Analyse alike" is what the caller must check, once per shape: that the analysis of the
//! shape with this text's literals filled in equals the analysis of the text itself. After
//! that, other texts of the shape get the same answer as a parse would give, because the
//! analysis looks at literal values only where this module does not abstract them:
//! - integers become key values through `canonical_integer`, which [`instantiate`] applies
//!   too; only plain digit runs are abstracted (not `1.5`, `0x1F`, `1e3`), with the sign of
//!   a unary minus (`= -5`, `(-5`; not the binary one of `x -5`), which the analysis also
//!   folds into the value;
//! - strings become key values verbatim; only `'...'` without quotes or backslashes inside
//!   is abstracted (no `E''`, `U&''`, `B''`, typed `date '...'`, dollar quotes), so the
//!   content needs no unescaping;
//! - `'now'`, `'today'`, ... make a read uncacheable: they stay in the shape;
//! - `EXPLAIN (ANALYZE 0)` depends on a number: only statements that start with a query or
//!   DML keyword are shaped at all;
//! - texts longer than the parser accepts, with several statements or with a `$` anywhere
//!   (parameters, dollar quotes) are not shaped.

use std::fmt::Write as _;

use super::keys::is_plain_decimal;
use super::lex::{BYTE_CLASS as CLASS, IDENT, NUMBER, WHITESPACE, line_comment_end, string_end};
use super::model::{
    Analysis, ColumnValue, KeyValue, PointKey, ReadInfo, TableWrite, WriteEffect, WriteInfo,
};
use super::{canonical_integer, guard, is_time_literal};

/// A text with its literals replaced by `$1..$n`, and those literals' key values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiteralShape {
    /// The text with each abstracted literal replaced by `$k`; everything else verbatim
    /// (comments included: hints live there).
    pub text: String,
    /// `literals.get(k - 1)` is the key value `$k` stands for, as the analysis would report
    /// it.
    pub literals: Literals,
}

/// The key values of a shaped text's literals, in order.
///
/// All in one string, each value followed by a quote: every new text of a known shape (each
/// write and each missed read of a simple-protocol client) is shaped, and this takes one
/// allocation for its literals instead of one per literal plus the vector's. No value holds
/// a quote: integers are digits and a sign, and only strings without a quote inside are
/// abstracted; [`Literals::push`] refuses any other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Literals(String);

/// Bytes reserved for a text's literals when the first is pushed.
const FIRST_CAPACITY: usize = 48;

impl Literals {
    const END: char = '\'';

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        // A byte loop, not `split_terminator` (its char searcher) nor memchr (its set-up):
        // values are a few bytes, and these cost more than the allocations this type saves.
        let mut rest = self.0.as_str();
        std::iter::from_fn(move || {
            let end = rest.bytes().position(|b| b == Self::END as u8)?;
            let value = &rest[..end];
            rest = &rest[end + 1..];
            Some(value)
        })
    }

    /// The `i`-th value (from 0).
    pub fn get(&self, i: usize) -> Option<&str> {
        self.iter().nth(i)
    }

    /// Appends `value`; `false`, appending nothing, if it holds a quote.
    fn push(&mut self, value: &str) -> bool {
        if value.bytes().any(|b| b == Self::END as u8) {
            return false;
        }
        if self.0.capacity() == 0 {
            // Enough for the few short values of most texts, without regrowing.
            self.0.reserve(FIRST_CAPACITY);
        }
        self.0.push_str(value);
        self.0.push(Self::END);
        true
    }

    /// Appends the canonical form of the integer `text` (digits after an optional `-`);
    /// `false`, appending nothing, if it has none.
    fn push_integer(&mut self, text: &str) -> bool {
        if is_plain_decimal(text) {
            return self.push(text);
        }
        canonical_integer(text).is_some_and(|v| self.push(&v))
    }
}

/// The shape of `sql`, or `None` if it has no literals to abstract or is not eligible
/// (see the module doc).
///
/// One pass over the bytes that tokenizes as [`super::lex::Lexer`] does (the tests hold it to the
/// lexer-driven definition over generated texts): this runs on every new simple-protocol
/// text, and the general lexer's per-item cost was most of the cache's overhead on writes.
pub fn literal_shape(sql: &str) -> Option<LiteralShape> {
    let mut text = String::new();
    let literals = literal_shape_into(sql, &mut text)?;
    Some(LiteralShape { text, literals })
}

/// [`literal_shape`] with the shape's text written to `text` (cleared first; left
/// unspecified on `None`): a caller that shapes text after text can reuse one buffer.
pub fn literal_shape_into(sql: &str, text: &mut String) -> Option<Literals> {
    let b = sql.as_bytes();
    // memchr's vectorised search: `str::contains` scanned for the `$` a word at a time.
    if sql.len() > guard::MAX_LEN || memchr::memchr(b'$', b).is_some() {
        return None;
    }
    text.clear();
    let mut literals = Literals::default();
    let mut count = 0;
    let mut copied = 0;
    let mut leading_checked = false;
    // Whether the previous item can end an operand: then a `-` is binary (`x -5`), else
    // unary (`= -5`, `(-5`, `+ -5`) and belongs to the number, as the analysis reads it.
    let mut after_operand = false;
    let mut unary_minus: Option<usize> = None;
    let mut i = 0;
    loop {
        i = skip(b, i, WHITESPACE);
        let Some(&c) = b.get(i) else { break };
        let start = i;
        let minus = unary_minus.take();
        // Each arm leaves `i` past the item; comments and punctuation `continue`, and only
        // literal-like items (what the lexer calls `Other`) reach the code after the match.
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = line_comment_end(b, i);
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = skip_block_comment(b, i);
                continue;
            }
            b';' => {
                // Only a trailing semicolon (and comments after it) is allowed.
                if !only_comments(&b[i + 1..]) {
                    return None;
                }
                break;
            }
            b'\'' => i = string_end(b, i, false),
            b'"' => {
                i = skip_quoted_ident(b, i);
                if !leading_checked {
                    return None;
                }
                after_operand = true;
                continue;
            }
            b'.' if !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                if !leading_checked {
                    return None;
                }
                i += 1;
                after_operand = false;
                continue;
            }
            b'(' => {
                i += 1;
                after_operand = false;
                continue;
            }
            b',' => {
                if !leading_checked {
                    return None;
                }
                i += 1;
                after_operand = false;
                continue;
            }
            b')' => {
                if !leading_checked {
                    return None;
                }
                i += 1;
                after_operand = true;
                continue;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                i = skip(b, i, IDENT);
                if b.get(i) == Some(&b'\'') {
                    // E'...' takes backslash escapes; B'', X'', N'', U&'' do not matter here.
                    let word = &b[start..i];
                    i = string_end(b, i, word.eq_ignore_ascii_case(b"e"));
                } else {
                    if !leading_checked {
                        if !is_query_or_dml(&sql[start..i]) {
                            return None;
                        }
                        leading_checked = true;
                    } else {
                        after_operand = true;
                    }
                    continue;
                }
            }
            c if c.is_ascii_digit() || c == b'.' => i = skip(b, i, NUMBER),
            // Operators and stray bytes: one ASCII byte (every byte from 0x80 up starts a
            // word above).
            _ => i += 1,
        }
        if !leading_checked {
            return None;
        }
        let token = &sql[start..i];
        let first = b[start];
        if token == "-" && !after_operand && b.get(i).is_some_and(u8::is_ascii_digit) {
            unary_minus = Some(start);
            continue;
        }
        after_operand =
            first.is_ascii_alphanumeric() || matches!(first, b'\'' | b'.') || first >= 0x80;
        let (start, taken) = if token.bytes().all(|b| b.is_ascii_digit()) {
            match minus {
                Some(m) => (m, literals.push_integer(&sql[m..i])),
                None => (start, literals.push_integer(token)),
            }
        } else {
            let taken = plain_string(token)
                .filter(|s| !is_time_literal(s))
                .is_some_and(|s| literals.push(s));
            (start, taken)
        };
        if !taken {
            continue;
        }
        if count == 0 {
            text.reserve(sql.len() + 8);
        }
        count += 1;
        text.push_str(&sql[copied..start]);
        push_parameter(text, count);
        copied = i;
    }
    if count == 0 {
        return None;
    }
    text.push_str(&sql[copied..]);
    Some(literals)
}

/// Appends `$k`.
fn push_parameter(text: &mut String, k: usize) {
    text.push('$');
    match u8::try_from(k) {
        // Most texts have a few literals: no formatting machinery for those.
        Ok(n @ 0..=9) => text.push(char::from(b'0' + n)),
        // Writing to a String cannot fail.
        _ => {
            let _ = write!(text, "{k}");
        }
    }
}

/// The index of the first byte from `from` on outside `class`, or the end.
fn skip(b: &[u8], from: usize, class: u8) -> usize {
    // An indexed loop: `position` over the slice compiled to about twice the instructions
    // per byte, and this loop is most of the scanner's time.
    let mut i = from;
    while i < b.len() && CLASS[usize::from(b[i])] & class != 0 {
        i += 1;
    }
    i
}

/// Past the quoted identifier whose opening quote is at `open` (`""` inside is a quote).
fn skip_quoted_ident(b: &[u8], open: usize) -> usize {
    let mut i = open + 1;
    while let Some(n) = b[i..].iter().position(|&c| c == b'"') {
        let quote = i + n;
        if b.get(quote + 1) != Some(&b'"') {
            return quote + 1;
        }
        i = quote + 2;
    }
    b.len()
}

/// Past the block comment whose `/*` is at `open`, or the end of the text.
fn skip_block_comment(b: &[u8], open: usize) -> usize {
    super::lex::block_comment_end(b, open).unwrap_or(b.len())
}

/// Whether `b` holds nothing but whitespace and comments.
fn only_comments(b: &[u8]) -> bool {
    let mut i = 0;
    loop {
        i = skip(b, i, WHITESPACE);
        match b.get(i) {
            None => return true,
            Some(b'-') if b.get(i + 1) == Some(&b'-') => i = line_comment_end(b, i),
            Some(b'/') if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i),
            Some(_) => return false,
        }
    }
}

fn is_query_or_dml(word: &str) -> bool {
    [
        "select", "insert", "update", "delete", "with", "values", "table",
    ]
    .iter()
    .any(|k| word.eq_ignore_ascii_case(k))
}

/// The content of `'...'` if nothing inside needs unescaping.
fn plain_string(token: &str) -> Option<&str> {
    let inner = token.strip_prefix('\'')?.strip_suffix('\'')?;
    (!inner.contains(['\'', '\\'])).then_some(inner)
}

/// `template` (the analysis of a shape's text) with each `$k` key value replaced by the
/// k-th literal. A parameter without a literal (impossible for shapes from
/// [`literal_shape`], which refuses texts with `$`) is left as it is.
pub fn instantiate(template: &Analysis, literals: &Literals) -> Analysis {
    let fill = |cv: &ColumnValue| ColumnValue {
        column: cv.column.clone(),
        value: match &cv.value {
            KeyValue::Param(k) => match literals.get(k.wrapping_sub(1)) {
                Some(lit) => KeyValue::Literal(lit.to_owned()),
                None => cv.value.clone(),
            },
            literal => literal.clone(),
        },
    };
    // Built field by field: cloning the template whole would copy the key values only to
    // replace them (this runs for every new text of a known shape).
    match template {
        Analysis::Read(r) => Analysis::Read(ReadInfo {
            tables: r.tables.clone(),
            point: r.point.as_ref().map(|p| PointKey {
                table: p.table.clone(),
                candidates: p.candidates.iter().map(fill).collect(),
            }),
        }),
        Analysis::Write(w) => Analysis::Write(WriteInfo {
            tables: w
                .tables
                .iter()
                .map(|t| TableWrite {
                    table: t.table.clone(),
                    effect: match &t.effect {
                        WriteEffect::Keys(rows) => WriteEffect::Keys(
                            rows.iter()
                                .map(|row| row.iter().map(fill).collect())
                                .collect(),
                        ),
                        other => other.clone(),
                    },
                })
                .collect(),
            hidden_writes: w.hidden_writes,
        }),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::lex::{Item, Lexer};
    use crate::analysis::{NoCatalog, analyze};

    /// The lexer-driven definition [`literal_shape`] was written from: simpler to check by
    /// eye, and the scanner must agree with it on every text.
    fn lexer_shape(sql: &str) -> Option<LiteralShape> {
        if sql.len() > guard::MAX_LEN || sql.contains('$') {
            return None;
        }
        let mut lexer = Lexer::new(sql);
        let mut text = String::with_capacity(sql.len());
        let mut literals = Literals::default();
        let mut count = 0;
        let mut copied = 0;
        let mut leading_checked = false;
        // Whether the previous item can end an operand: then a `-` is binary (`x -5`), else
        // unary (`= -5`, `(-5`, `+ -5`) and belongs to the number, as the analysis reads it.
        let mut after_operand = false;
        let mut unary_minus: Option<usize> = None;
        while let Some(item) = lexer.next() {
            let span = lexer.last_span();
            let minus = unary_minus.take();
            match item {
                Item::Semi => {
                    // Only a trailing semicolon (and comments after it) is allowed.
                    if lexer.any(|i| !matches!(i, Item::Comment(_))) {
                        return None;
                    }
                    break;
                }
                Item::Comment(_) => continue,
                Item::Word(w) if !leading_checked => {
                    leading_checked = true;
                    if !is_query_or_dml(w) {
                        return None;
                    }
                    continue;
                }
                _ if !leading_checked => {
                    if item == Item::LParen {
                        continue;
                    }
                    return None;
                }
                Item::Other => {}
                Item::Word(_) | Item::Quoted(_) | Item::RParen => {
                    after_operand = true;
                    continue;
                }
                Item::LParen | Item::Comma | Item::Dot => {
                    after_operand = false;
                    continue;
                }
            }
            let token = &sql[span.clone()];
            let first = token.as_bytes()[0];
            if token == "-"
                && !after_operand
                && sql.as_bytes().get(span.end).is_some_and(u8::is_ascii_digit)
            {
                unary_minus = Some(span.start);
                continue;
            }
            after_operand =
                first.is_ascii_alphanumeric() || matches!(first, b'\'' | b'.') || first >= 0x80;
            let (start, value) = if token.bytes().all(|b| b.is_ascii_digit()) {
                match minus {
                    Some(m) => (m, canonical_integer(&sql[m..span.end])),
                    None => (span.start, canonical_integer(token)),
                }
            } else {
                let value = plain_string(token)
                    .filter(|s| !is_time_literal(s))
                    .map(str::to_owned);
                (span.start, value)
            };
            let Some(value) = value else { continue };
            if !literals.push(&value) {
                continue;
            }
            count += 1;
            text.push_str(&sql[copied..start]);
            push_parameter(&mut text, count);
            copied = span.end;
        }
        if count == 0 {
            return None;
        }
        text.push_str(&sql[copied..]);
        Some(LiteralShape { text, literals })
    }

    /// Texts built from the pieces where a scanner and the lexer could disagree: quotes
    /// of each kind (closed and not), comments (nested, unclosed), signs, numbers, words
    /// that prefix strings, non-ASCII, odd whitespace, with and without separators.
    fn generated_text(rng: &mut impl rand::Rng) -> String {
        const PIECES: &[&str] = &[
            "select",
            "SELECT",
            "update",
            "insert",
            "with",
            "explain",
            "e",
            "E",
            "b",
            "x",
            "from",
            "t",
            "_a1",
            "\u{e9}t\u{e9}",
            "0",
            "42",
            "007",
            "-",
            "-5",
            "-007",
            "--",
            "- 5",
            "1.5",
            ".5",
            "1e3",
            "0x1F",
            "'a'",
            "'it''s'",
            "'now'",
            "E'\\'x'",
            "e'a\\\\'",
            "'",
            "\"q\"",
            "\"a\"\"b\"",
            "\"",
            "(",
            ")",
            ",",
            ".",
            ";",
            "+",
            "=",
            "*",
            "/",
            "<=",
            "-- c\n",
            "--",
            "/* c */",
            "/* a /* b */ c */",
            "/*",
            "*/",
            " ",
            "\n",
            "\t",
            "\u{b}",
            "\u{c}",
            "\r",
            "\u{a0}",
            "!",
            "::",
            "[",
            "]",
        ];
        let n = rng.gen_range(0..14);
        // Most texts start as eligible ones do, so the rest of the text gets scanned.
        let mut s = String::from(match rng.gen_range(0..4) {
            0 => "",
            1 => "( select ",
            _ => "select ",
        });
        for _ in 0..n {
            s.push_str(PIECES[rng.gen_range(0..PIECES.len())]);
            if rng.gen_bool(0.5) {
                s.push(' ');
            }
        }
        s
    }

    #[test]
    fn the_scanner_shapes_every_text_as_the_lexer_defines() {
        use rand::SeedableRng as _;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for _ in 0..200_000 {
            let sql = generated_text(&mut rng);
            assert_eq!(literal_shape(&sql), lexer_shape(&sql), "{sql:?}");
        }
    }

    fn shape(sql: &str) -> Option<(String, Vec<&'static str>)> {
        literal_shape(sql).map(|s| {
            let lits = s
                .literals
                .iter()
                .map(|l| &*Box::leak(l.to_owned().into_boxed_str()))
                .collect();
            (s.text, lits)
        })
    }

    #[test]
    fn integers_and_plain_strings_become_parameters() {
        assert_eq!(
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 0042 AND name = 'x y'"),
            Some((
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1 AND name = $2".into(),
                vec!["42", "x y"]
            ))
        );
        assert_eq!(
            shape("/* pgstash: ttl=5s */ (select 1);"),
            Some(("/* pgstash: ttl=5s */ (select $1);".into(), vec!["1"]))
        );
        let eleven = (1..=11).map(|n| n.to_string()).collect::<Vec<_>>();
        let (text, literals) = shape(&format!(
            "SELECT * FROM t WHERE k IN ({})",
            eleven.join(", ")
        ))
        .expect("shape");
        assert_eq!(
            text,
            "SELECT * FROM t WHERE k IN ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        assert_eq!(literals, eleven);
    }

    #[test]
    fn literals_the_analysis_reads_stay_in_the_text() {
        for sql in [
            "SELECT * FROM t WHERE d = 'now'",
            "SELECT * FROM t WHERE d = ' Today '",
            "SELECT * FROM t WHERE x = 1.5",
            "SELECT * FROM t WHERE x = 0x1F",
            "SELECT * FROM t WHERE x = E'a'",
            "SELECT * FROM t WHERE x = 'it''s'",
            "SELECT * FROM t WHERE x = 'a\\b'",
            "SELECT * FROM t",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
        // Identifiers with digits are not literals; a unary minus belongs to its number,
        // a binary one does not.
        assert_eq!(
            shape("SELECT t1.c2 FROM t1 WHERE c2 = -5 AND c3 = (-0) AND c4 = c2 -6 - -7"),
            Some((
                "SELECT t1.c2 FROM t1 WHERE c2 = $1 AND c3 = ($2) AND c4 = c2 -$3 - $4".into(),
                vec!["-5", "0", "6", "-7"]
            ))
        );
        assert_eq!(
            shape("SELECT - 5, -x"),
            Some(("SELECT - $1, -x".into(), vec!["5"]))
        );
    }

    #[test]
    fn only_single_query_or_dml_statements_are_shaped() {
        for sql in [
            "EXPLAIN (ANALYZE 0) SELECT 1",
            "SET x = 1",
            "SELECT 1; SELECT 2",
            "PREPARE p AS SELECT $1 + 1",
            "SELECT $q$a$q$ || 'b'",
            "-- only a comment 1",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
        assert!(shape("SELECT 1; -- done").is_some());
        assert!(shape("WITH x AS (SELECT 1) SELECT * FROM x").is_some());
        assert!(shape("UPDATE t SET v = v + 1 WHERE id = 3").is_some());
    }

    #[test]
    fn literals_keep_each_value_whole_and_refuse_quotes() {
        let mut l = Literals::default();
        assert!(l.is_empty());
        for v in ["42", "", "a b", "-7", ""] {
            assert!(l.push(v), "{v:?}");
        }
        assert!(!l.push("it's"));
        assert!(!l.push_integer("'1"));
        assert_eq!(l.iter().collect::<Vec<_>>(), ["42", "", "a b", "-7", ""]);
        assert_eq!(
            (l.get(2), l.get(4), l.get(5)),
            (Some("a b"), Some(""), None)
        );
        assert!(l.push_integer("007") && l.push_integer("-0") && l.push_integer("-12"));
        assert_eq!(l.iter().skip(5).collect::<Vec<_>>(), ["7", "0", "-12"]);
        assert!(!l.is_empty());
    }

    #[test]
    fn a_reused_buffer_shapes_each_text_as_a_fresh_one_does() {
        let mut text = String::new();
        for sql in [
            "SELECT * FROM a_rather_long_table_name WHERE id = 1 AND k = 'x'",
            "SELECT 1",
            "SELECT * FROM t",
            "UPDATE t SET v = '' WHERE id = -3",
        ] {
            let reused = literal_shape_into(sql, &mut text).map(|literals| LiteralShape {
                text: text.clone(),
                literals,
            });
            assert_eq!(reused, literal_shape(sql), "{sql}");
        }
    }

    /// The property the memo relies on, over texts whose literals land in keys.
    #[test]
    fn instantiating_the_shape_analysis_gives_the_text_analysis() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 007",
            "SELECT v FROM t WHERE id = '12' AND k = 'abc'",
            "UPDATE pgbench_accounts SET abalance = abalance + -4 WHERE aid = 99",
            "INSERT INTO h (tid, bid, aid, delta) VALUES (1, 2, 3, 4), (5, 6, 7, 8)",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 77, -4321, CURRENT_TIMESTAMP)",
            "SELECT v FROM t WHERE id = -7",
            "DELETE FROM t WHERE id = 5 AND tag = 'x'",
            "SELECT count(*) FROM t WHERE id <= 50000 GROUP BY bid",
            "SELECT * FROM t WHERE id = 1 FOR UPDATE",
            "SELECT random() FROM t WHERE id = 1",
        ] {
            let s = literal_shape(sql).expect(sql);
            let template = analyze(&s.text, &NoCatalog);
            assert_eq!(
                instantiate(&template, &s.literals),
                analyze(sql, &NoCatalog),
                "{sql} as {}",
                s.text
            );
        }
    }
}
