//! Names and key values: identifier folding, relation names, `column = value` conjunctions
//! and the canonical text of key literals.

use sqlparser::ast::{
    BinaryOperator, Expr, Ident, ObjectName, ObjectNamePart, TableAlias, UnaryOperator, Value,
};

use super::model::{ColumnValue, KeyValue, TableRef};

/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
const MAX_IDENT_BYTES: usize = 63;

/// Folds an identifier as PostgreSQL does: unquoted → ASCII lower case (PostgreSQL leaves
/// non-ASCII letters alone in multibyte encodings), quoted → kept; then truncates.
pub(crate) fn fold(ident: &Ident) -> String {
    let mut name = if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    };
    truncate(&mut name);
    name
}

/// Folds an unquoted word from the lexical fallback.
pub(crate) fn fold_word(word: &str) -> String {
    let mut name = word.to_ascii_lowercase();
    truncate(&mut name);
    name
}

pub(crate) fn truncate(name: &mut String) {
    if name.len() > MAX_IDENT_BYTES {
        let mut end = MAX_IDENT_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
}

/// The folded parts of a name, or `None` if a part is not a plain identifier.
pub(crate) fn name_parts(name: &ObjectName) -> Option<Vec<String>> {
    name.0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(ident) => Some(fold(ident)),
            ObjectNamePart::Function(_) => None,
        })
        .collect()
}

/// The real name parts and alias of a relation in FROM / UPDATE / DELETE.
///
/// sqlparser 0.59 reads `FROM ONLY t` as a relation named `ONLY` aliased `t`. PostgreSQL
/// reserves ONLY, so an unquoted relation of that name cannot exist: the alias is the name.
pub(crate) fn relation_parts(
    name: &ObjectName,
    alias: Option<&TableAlias>,
) -> Option<(Vec<String>, Option<String>)> {
    if let [ObjectNamePart::Identifier(ident)] = name.0.as_slice()
        && ident.quote_style.is_none()
        && ident.value.eq_ignore_ascii_case("only")
    {
        let alias = alias.filter(|a| a.columns.is_empty())?;
        return Some((vec![fold(&alias.name)], None));
    }
    Some((name_parts(name)?, alias.map(|a| fold(&a.name))))
}

/// `name`, `schema.name` or `database.schema.name` (the database part is dropped:
/// PostgreSQL only accepts the current database there).
pub(crate) fn table_ref_from_parts(mut parts: Vec<String>) -> Option<TableRef> {
    let name = parts.pop()?;
    let schema = parts.pop();
    if parts.len() > 1 {
        return None;
    }
    Some(TableRef { schema, name })
}

pub(crate) fn table_ref(name: &ObjectName) -> Option<TableRef> {
    table_ref_from_parts(name_parts(name)?)
}

/// How a single table may be named in column qualifiers: by its alias if it has one
/// (PostgreSQL then hides the table name), else by `name` or `schema.name`.
pub(crate) struct Qualifiers<'a> {
    pub table: &'a TableRef,
    pub alias: Option<String>,
}

impl Qualifiers<'_> {
    /// The column an expression names, if it is a column of this table.
    fn column(&self, expr: &Expr) -> Option<String> {
        match expr {
            Expr::Identifier(ident) => Some(fold(ident)),
            Expr::CompoundIdentifier(idents) => {
                let (column, qualifier) = idents.split_last()?;
                let qualifier: Vec<String> = qualifier.iter().map(fold).collect();
                let matches = match (&self.alias, qualifier.as_slice()) {
                    (Some(alias), [q]) => q == alias,
                    (Some(_), _) => false,
                    (None, [name]) => *name == self.table.name,
                    (None, [schema, name]) => {
                        *name == self.table.name && Some(schema) == self.table.schema.as_ref()
                    }
                    (None, _) => false,
                };
                matches.then(|| fold(column))
            }
            Expr::Nested(inner) => self.column(inner),
            _ => None,
        }
    }

    /// The `column = value` equalities ANDed at the top of `filter`, in order. Anything under
    /// an OR, NOT, IN list or other expression contributes nothing.
    pub(crate) fn conjunction(&self, filter: &Expr) -> Vec<ColumnValue> {
        let mut out = Vec::new();
        self.collect(filter, &mut out);
        out
    }

    fn collect(&self, expr: &Expr, out: &mut Vec<ColumnValue>) {
        match expr {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                self.collect(left, out);
                self.collect(right, out);
            }
            Expr::Nested(inner) => self.collect(inner, out),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => {
                let pair = match (self.column(left), self.column(right)) {
                    (Some(column), None) => key_value(right).map(|v| (column, v)),
                    (None, Some(column)) => key_value(left).map(|v| (column, v)),
                    _ => None,
                };
                if let Some((column, value)) = pair {
                    out.push(ColumnValue { column, value });
                }
            }
            _ => {}
        }
    }
}

fn is_integer_type(t: &sqlparser::ast::DataType) -> bool {
    matches!(
        t.to_string().to_ascii_lowercase().as_str(),
        "int" | "integer" | "int2" | "int4" | "int8" | "smallint" | "bigint"
    )
}

/// A literal or `$n`, looking through casts and parentheses (`$1::int`, `'5'::int`,
/// `CAST(5 AS bigint)`, `int '5'`). Non-integer numbers, NULL and booleans are not keys.
pub(crate) fn key_value(expr: &Expr) -> Option<KeyValue> {
    match expr {
        Expr::Nested(inner) => key_value(inner),
        // Only integer casts keep the value: `16777217::float4` is 16777216, `5.5::int` is 6.
        Expr::Cast {
            expr, data_type, ..
        } if is_integer_type(data_type) => key_value(expr),
        Expr::Cast { .. } => None,
        Expr::TypedString(typed) => literal(&typed.value.value),
        Expr::Value(v) => literal(&v.value),
        Expr::UnaryOp { op, expr } => {
            let sign = match op {
                UnaryOperator::Plus => "",
                UnaryOperator::Minus => "-",
                _ => return None,
            };
            match expr.as_ref() {
                Expr::Value(v) => match &v.value {
                    Value::Number(n, _) => {
                        canonical_integer(&format!("{sign}{n}")).map(KeyValue::Literal)
                    }
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

fn literal(value: &Value) -> Option<KeyValue> {
    match value {
        Value::Number(n, _) => canonical_integer(n).map(KeyValue::Literal),
        Value::Placeholder(p) => {
            let n: usize = p.strip_prefix('$')?.parse().ok()?;
            (n >= 1).then_some(KeyValue::Param(n))
        }
        _ => string_value(value).map(|s| KeyValue::Literal(s.to_owned())),
    }
}

/// The text of a string literal of any quoting style.
pub(crate) fn string_value(value: &Value) -> Option<&str> {
    match value {
        Value::SingleQuotedString(s)
        | Value::EscapedStringLiteral(s)
        | Value::UnicodeStringLiteral(s)
        | Value::NationalStringLiteral(s)
        | Value::TripleSingleQuotedString(s)
        | Value::TripleDoubleQuotedString(s)
        | Value::DoubleQuotedString(s) => Some(s),
        Value::DollarQuotedString(d) => Some(&d.value),
        _ => None,
    }
}

/// The canonical decimal text of an integer literal, or `None` if `text` is not one.
/// Accepts an optional sign, leading zeros, PostgreSQL 16 digit separators (`1_000`) and
/// `0x`/`0o`/`0b` prefixes, and surrounding whitespace (as integer input does), so the caller
/// can use it on string literals and text-format parameters bound to integer keys.
pub fn canonical_integer(text: &str) -> Option<String> {
    // Nearly all integer literals are plain decimal digits, their own canonical form: one
    // allocation instead of the general path's several.
    if is_plain_decimal(text) {
        Some(text.to_owned())
    } else {
        any_integer(text)
    }
}

/// [`canonical_integer`] the long way, for every form it accepts.
fn any_integer(text: &str) -> Option<String> {
    let text = text.trim();
    let (negative, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = match body.get(..2).map(str::to_ascii_lowercase).as_deref() {
        Some("0x") => (16, &body[2..]),
        Some("0o") => (8, &body[2..]),
        Some("0b") => (2, &body[2..]),
        _ => (10, body),
    };
    // Underscores only between digits.
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let digits: String = digits.chars().filter(|&c| c != '_').collect();
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = if radix == 10 {
        let trimmed = digits.trim_start_matches('0');
        if trimmed.is_empty() {
            "0".to_owned()
        } else {
            trimmed.to_owned()
        }
    } else {
        // Beyond u128 no integer key type can hold it; not a key.
        u128::from_str_radix(&digits, radix).ok()?.to_string()
    };
    Some(if negative && magnitude != "0" {
        format!("-{magnitude}")
    } else {
        magnitude
    })
}

/// Whether `text` is its own [`canonical_integer`]: an optional `-` and ASCII digits without
/// leading zeros (nor `-0`). Literal shapes take such integers as they are, without an
/// allocation each.
pub fn is_plain_decimal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let b = digits.as_bytes();
    match b.first() {
        None => false,
        Some(b'0') => b.len() == 1 && digits.len() == text.len(),
        Some(_) => b.iter().all(u8::is_ascii_digit),
    }
}

/// Whether a string holds one of PostgreSQL's special date/time inputs that mean "the
/// current time" as a word of its own: alone (`'now'::timestamptz`, `date 'today'`) or
/// inside an array, range or longer input (`'{now}'`, `'[today,infinity)'`,
/// `'today 10:00'`). A string that merely contains such a word ('Now and then') bypasses
/// too: wider, never wrong. The caller also applies it to text parameters.
///
/// With `standard_conforming_strings` off, Postgres reads backslash escapes in plain literals
/// (`'\156ow'` is `'now'`), so text holding a backslash is also checked as decoded.
pub fn is_time_literal(text: &str) -> bool {
    has_time_word(text.as_bytes())
        || (text.contains('\\') && has_time_word(&unescape_backslashes(text)))
}

/// `text` with C-style backslash escapes decoded as in an `E'...'` literal: `\b \f \n \r
/// \t`, octal `\o`..`\ooo`, hex `\xh`/`\xhh`, `\uXXXX`, `\UXXXXXXXX`, any other `\c` as `c`.
fn unescape_backslashes(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let digits = |from: usize, max: usize, radix: u32| {
        let mut n = 0u32;
        let mut len = 0;
        while len < max
            && let Some(d) = b
                .get(from + len)
                .and_then(|c| char::from(*c).to_digit(radix))
        {
            n = n.wrapping_mul(radix).wrapping_add(d);
            len += 1;
        }
        (n, len)
    };
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' || i + 1 == b.len() {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = b[i + 1];
        i += 2;
        let (code, used) = match c {
            b'0'..=b'7' => {
                let (n, len) = digits(i - 1, 3, 8);
                (Some(n), len - 1)
            }
            b'x' => match digits(i, 2, 16) {
                (_, 0) => (None, 0),
                (n, len) => (Some(n), len),
            },
            b'u' | b'U' => match digits(i, if c == b'u' { 4 } else { 8 }, 16) {
                (_, 0) => (None, 0),
                (n, len) => (Some(n), len),
            },
            _ => (None, 0),
        };
        i += used;
        match code {
            Some(n) => {
                let ch = char::from_u32(n).unwrap_or(char::REPLACEMENT_CHARACTER);
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
            None => out.push(match c {
                b'b' => 8,
                b'f' => 12,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                other => other,
            }),
        }
    }
    out
}

/// [`is_time_literal`] for a binary-format value: the binary form of text (and of arrays
/// and records of text) carries the text's bytes as they are, so a time word among them may
/// reach a date/time input function (`$1::timestamptz` with `$1` declared `text`). Other
/// binary values rarely contain such a word; when one does, its read is not cached.
pub fn binary_holds_time_word(value: &[u8]) -> bool {
    has_time_word(value)
}

/// Whether `b` holds one of the time words as a word of its own (see [`is_time_literal`]).
fn has_time_word(b: &[u8]) -> bool {
    const WORDS: [&[u8]; 4] = [b"now", b"today", b"tomorrow", b"yesterday"];
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_alphabetic() {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_alphabetic() {
            i += 1;
        }
        let word = &b[start..i];
        if WORDS.iter().any(|w| word.eq_ignore_ascii_case(w)) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_integer_forms() {
        let c = |s| canonical_integer(s);
        assert_eq!(c("007").as_deref(), Some("7"));
        assert_eq!(c("+5").as_deref(), Some("5"));
        assert_eq!(c("-0").as_deref(), Some("0"));
        assert_eq!(c("-012").as_deref(), Some("-12"));
        assert_eq!(c(" 42 ").as_deref(), Some("42"));
        assert_eq!(c("1_000").as_deref(), Some("1000"));
        assert_eq!(c("0x1F").as_deref(), Some("31"));
        assert_eq!(c("0b101").as_deref(), Some("5"));
        assert_eq!(
            c("99999999999999999999999999999").as_deref(),
            Some("99999999999999999999999999999")
        );
        for bad in [
            "", "-", "1.5", "1e3", "abc", "_1", "1_", "1__0", "0x", "12a", "1.0",
        ] {
            assert_eq!(c(bad), None, "{bad}");
        }
    }

    #[test]
    fn plain_decimals_take_the_short_path_to_the_same_answer() {
        let mut taken = 0;
        for digits in ["0", "7", "10", "00", "01", "123456789012345678901234567890"] {
            for text in [
                digits.to_owned(),
                format!("-{digits}"),
                format!("+{digits}"),
                format!(" {digits}"),
                format!("{digits}_0"),
            ] {
                let short = is_plain_decimal(&text).then(|| text.clone());
                if short.is_some() {
                    taken += 1;
                    assert_eq!(short, any_integer(&text), "{text:?}");
                }
                assert_eq!(canonical_integer(&text), any_integer(&text), "{text:?}");
            }
        }
        // "0", "7", "10", the long one, each also negated, except "-0".
        assert_eq!(taken, 7);
    }

    #[test]
    fn time_words_spelled_with_backslash_escapes_count() {
        for text in [
            r"\156ow",
            r"n\x6fw",
            r"\u006Eow",
            r"to\day",
            r"\U0000006eow",
            r"{\156ow}",
        ] {
            assert!(is_time_literal(text), "{text}");
        }
        for text in [r"\156", r"n\x", r"\\", r"a\", r"\u00"] {
            assert!(!is_time_literal(text), "{text}");
        }
    }

    #[test]
    fn time_literals() {
        assert!(is_time_literal("now"));
        assert!(is_time_literal(" Today "));
        assert!(!is_time_literal("epoch"));
        assert!(!is_time_literal("nowhere"));
    }

    #[test]
    fn long_identifiers_truncate_on_char_boundary() {
        let mut s = "é".repeat(40); // 80 bytes
        truncate(&mut s);
        assert_eq!(s.len(), 62);
    }
}
