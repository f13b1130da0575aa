//! A small SQL lexer for what the pooler must notice in statements it relays: where statements
//! end, and their leading keywords. It understands quotes, dollar quotes and comments, so a
//! `;` or a keyword inside a string is never mistaken for one outside.
//!
//! Full analysis (for caching) is sqlparser's job; this runs on every simple query and must
//! stay cheap and total (it never fails, whatever the input).

/// The statements of a query string, trimmed, without their `;`, empty ones skipped. Lazy
/// and allocation-free: most query strings hold one statement and are scanned once.
pub fn statements(sql: &str) -> Statements<'_> {
    Statements { sql, pos: 0 }
}

/// The iterator of [`statements`].
pub struct Statements<'a> {
    sql: &'a str,
    /// Where the next statement starts; past the end once the last one was returned.
    pos: usize,
}

impl<'a> Iterator for Statements<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let b = self.sql.as_bytes();
        while self.pos <= b.len() {
            let start = self.pos;
            let mut i = start;
            // The skip helpers may return past the end on unterminated input.
            let end = loop {
                // Most bytes start nothing: one tight loop over them.
                i += b
                    .get(i..)
                    .and_then(|rest| rest.iter().position(|&c| STARTS_SOMETHING[usize::from(c)]))
                    .unwrap_or(b.len().saturating_sub(i));
                let Some(&c) = b.get(i) else {
                    break b.len();
                };
                match c {
                    b'\'' | b'"' => i = skip_quoted(b, i, c),
                    b'-' if b.get(i + 1) == Some(&b'-') => i = skip_line_comment(b, i),
                    b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i),
                    b'$' => i = skip_dollar(b, i),
                    b';' => break i,
                    _ => i += 1,
                }
            };
            self.pos = end + 1;
            let stmt = self.sql[start..end].trim();
            if !stmt.is_empty() {
                return Some(stmt);
            }
        }
        None
    }
}

/// The bytes the statement splitter must look at: quotes, comment starts, dollar quotes,
/// semicolons.
static STARTS_SOMETHING: [bool; 256] = {
    let mut t = [false; 256];
    let special = b"'\"-/$;";
    let mut k = 0;
    while k < special.len() {
        t[special[k] as usize] = true;
        k += 1;
    }
    t
};

fn skip_quoted(b: &[u8], open: usize, q: u8) -> usize {
    // E'...' strings allow backslash escapes; standard strings double the quote instead.
    let backslash = q == b'\'' && open > 0 && matches!(b[open - 1], b'e' | b'E');
    let mut i = open + 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// Past the `--` comment starting at `open` (and its newline).
fn skip_line_comment(b: &[u8], open: usize) -> usize {
    b[open..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| open + p + 1)
}

fn skip_block_comment(b: &[u8], open: usize) -> usize {
    crate::analysis::lex::block_comment_end(b, open).unwrap_or(b.len())
}

fn skip_dollar(b: &[u8], open: usize) -> usize {
    // `$1` is a parameter, `$tag$` or `$$` opens a dollar-quoted string.
    let mut j = open + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        j += 1;
    }
    if j >= b.len() || b[j] != b'$' || (j > open + 1 && b[open + 1].is_ascii_digit()) {
        return open + 1;
    }
    let tag = &b[open..=j];
    let body = j + 1;
    b[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map_or(b.len(), |p| body + p + tag.len())
}

/// The first keyword of a statement as written (not lowercased), skipping comments; `None`
/// if it does not start with one. For hot paths: it allocates nothing.
pub fn first_word(stmt: &str) -> Option<&str> {
    let b = stmt.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            i = skip_line_comment(b, i);
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(b, i);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            return Some(&stmt[s..i]);
        } else if c == b'\'' || c == b'"' {
            return None;
        } else {
            i += 1;
        }
    }
    None
}

/// Whether `haystack` contains `needle` (ASCII, case-insensitively), without allocating.
pub fn contains_ignore_case(haystack: &str, needle: &[u8]) -> bool {
    let h = haystack.as_bytes();
    let Some(first) = needle.first().map(u8::to_ascii_lowercase) else {
        return true;
    };
    let Some(last_start) = h.len().checked_sub(needle.len()) else {
        return false;
    };
    // Every statement the relay forwards is scanned for a few needles: compare one byte per
    // position until the first one matches.
    h[..=last_start].iter().enumerate().any(|(i, c)| {
        c.to_ascii_lowercase() == first && h[i..i + needle.len()].eq_ignore_ascii_case(needle)
    })
}

/// Lower-case ASCII needles looked for together, case-insensitively, in one pass over a
/// text: what the relay checks every forwarded statement for, where one pass per needle
/// would cost several times as much and nearly always find nothing.
///
/// Each needle is anchored on its rarest byte in SQL text (`k` of `advisory_lock`, `_` of
/// `pg_temp`), not its first: most bytes of a statement then anchor nothing and cost one
/// table lookup, where first letters (`a`, `i`, `p`, `s`) matched at every few bytes.
pub struct Needles {
    list: &'static [&'static [u8]],
    /// `anchor[k]`: where in `list[k]` its anchor byte is.
    anchor: [usize; MAX_NEEDLES],
    /// For each byte, the needles (bit `k` for `list[k]`) it anchors, in either case.
    anchors: [u8; 256],
}

const MAX_NEEDLES: usize = 8;

/// Bytes of SQL text from most to least common (English letter frequency, with `_` rarer
/// than most letters); a byte not listed counts as rarer than all of these.
const COMMONNESS: &[u8] = b" etaonisrlcdhupmbfgywv_kxjqz";

const fn commonness(c: u8) -> usize {
    let mut i = 0;
    while i < COMMONNESS.len() {
        if COMMONNESS[i] == c {
            return COMMONNESS.len() - i;
        }
        i += 1;
    }
    0
}

impl Needles {
    /// `list` must be at most 8 non-empty lower-case ASCII strings.
    pub const fn new(list: &'static [&'static [u8]]) -> Needles {
        assert!(list.len() <= MAX_NEEDLES, "too many needles");
        let mut anchor = [0; MAX_NEEDLES];
        let mut anchors = [0u8; 256];
        let mut k = 0;
        while k < list.len() {
            let needle = list[k];
            assert!(!needle.is_empty(), "an empty needle");
            let mut best = 0;
            let mut i = 1;
            while i < needle.len() {
                if commonness(needle[i]) < commonness(needle[best]) {
                    best = i;
                }
                i += 1;
            }
            anchor[k] = best;
            let c = needle[best];
            anchors[c as usize] |= 1 << k;
            anchors[c.to_ascii_uppercase() as usize] |= 1 << k;
            k += 1;
        }
        Needles {
            list,
            anchor,
            anchors,
        }
    }

    /// Whether `haystack` contains any of the needles (as [`contains_ignore_case`] would say
    /// of each).
    pub fn any_in(&self, haystack: &str) -> bool {
        let h = haystack.as_bytes();
        let mut i = 0;
        // Most bytes anchor nothing: eight table lookups or-ed together rule out eight
        // bytes at once, with one branch instead of eight.
        while let Some(chunk) = h.get(i..i + 8) {
            let anchored = chunk
                .iter()
                .fold(0u8, |any, &c| any | self.anchors[usize::from(c)]);
            if anchored != 0 && (i..i + 8).any(|at| self.found_at(h, at)) {
                return true;
            }
            i += 8;
        }
        (i..h.len()).any(|at| self.found_at(h, at))
    }

    /// Whether a needle anchored on `h[at]` occurs around it.
    fn found_at(&self, h: &[u8], at: usize) -> bool {
        let mut candidates = self.anchors[usize::from(h[at])];
        while candidates != 0 {
            let k = candidates.trailing_zeros() as usize;
            candidates &= candidates - 1;
            let needle = self.list[k];
            let found = at.checked_sub(self.anchor[k]).is_some_and(|start| {
                h.get(start..start + needle.len())
                    .is_some_and(|w| w.eq_ignore_ascii_case(needle))
            });
            if found {
                return true;
            }
        }
        false
    }
}

/// The first `n` words of a statement, lower-cased, skipping comments and parentheses.
pub fn leading_words(stmt: &str, n: usize) -> Vec<String> {
    let b = stmt.as_bytes();
    let mut words = Vec::new();
    let mut i = 0;
    while i < b.len() && words.len() < n {
        let c = b[i];
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            i = skip_line_comment(b, i);
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(b, i);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            words.push(stmt[s..i].to_ascii_lowercase());
        } else if c == b'\'' || c == b'"' {
            // A quoted identifier or literal ends keyword scanning: what follows is operands.
            break;
        } else {
            i += 1;
        }
    }
    words
}

/// A token of a statement's head, for the few statements whose operands the pooler reads
/// (SET/RESET names, savepoint names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    /// An unquoted word, lower-cased.
    Word(String),
    /// A double-quoted identifier, as written inside the quotes (`""` undoubled).
    Quoted(String),
    /// Any other character outside comments and whitespace; a string literal or dollar
    /// quote ends tokenizing, as operands follow.
    Punct(u8),
}

/// The first `n` tokens of `stmt`, skipping comments.
pub fn tokens(stmt: &str, n: usize) -> Vec<Tok> {
    let b = stmt.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() && out.len() < n {
        let c = b[i];
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            i = skip_line_comment(b, i);
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(b, i);
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            let s = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80)
            {
                i += 1;
            }
            out.push(Tok::Word(stmt[s..i].to_ascii_lowercase()));
        } else if c == b'"' {
            let end = skip_quoted(b, i, b'"');
            if end > b.len() || end < i + 2 || b[end - 1] != b'"' {
                break;
            }
            out.push(Tok::Quoted(stmt[i + 1..end - 1].replace("\"\"", "\"")));
            i = end;
        } else if c == b'\'' || c == b'$' {
            break;
        } else {
            out.push(Tok::Punct(c));
            i += 1;
        }
    }
    out
}

/// A possibly dotted, possibly quoted name starting at token `i` (`app.tenant`,
/// `"TimeZone"`), lower-cased as PostgreSQL looks settings up; and the index after it.
pub fn dotted_name(toks: &[Tok], mut i: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    loop {
        match toks.get(i)? {
            Tok::Word(w) => name.push_str(w),
            Tok::Quoted(q) => name.push_str(&q.to_lowercase()),
            Tok::Punct(_) => return None,
        }
        i += 1;
        if toks.get(i) == Some(&Tok::Punct(b'.')) {
            name.push('.');
            i += 1;
        } else {
            return Some((name, i));
        }
    }
}

/// How often `word` occurs (ASCII case-insensitively) not as part of a longer identifier.
pub fn standalone_words(stmt: &str, word: &[u8]) -> usize {
    let b = stmt.as_bytes();
    (0..b.len().saturating_sub(word.len() - 1))
        .filter(|&i| {
            b[i..i + word.len()].eq_ignore_ascii_case(word)
                && (i == 0 || !is_ident_byte(b[i - 1]))
                && b.get(i + word.len()).is_none_or(|&c| !is_ident_byte(c))
        })
        .count()
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$'
}

/// The top-level arguments of every call of `name(...)` in `stmt` (matched ASCII
/// case-insensitively, also when schema-qualified, and also inside literals, which only
/// errs on the side of noticing), each argument trimmed. A call whose closing parenthesis
/// is missing yields `None` in its place: the caller must assume the worst.
pub fn call_args<'a>(stmt: &'a str, name: &str) -> Vec<Option<Vec<&'a str>>> {
    let b = stmt.as_bytes();
    let n = name.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i + n <= b.len() {
        let word_start = i == 0 || !is_ident_byte(b[i - 1]);
        if !(word_start && b[i..i + n].eq_ignore_ascii_case(name.as_bytes())) {
            i += 1;
            continue;
        }
        let mut j = i + n;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if b.get(j) != Some(&b'(') {
            i += n;
            continue;
        }
        let (args, end) = split_args(stmt, j);
        out.push(args);
        i = end;
    }
    out
}

/// The arguments between the parenthesis at `open` and its match, and where scanning
/// resumes.
fn split_args(stmt: &str, open: usize) -> (Option<Vec<&str>>, usize) {
    let b = stmt.as_bytes();
    let mut args = Vec::new();
    let mut depth = 0usize;
    let mut start = open + 1;
    let mut i = open + 1;
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => i = skip_quoted(b, i, b[i]),
            b'-' if b.get(i + 1) == Some(&b'-') => i = skip_line_comment(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i),
            b'$' => i = skip_dollar(b, i),
            b'(' | b'[' => {
                depth += 1;
                i += 1;
            }
            b')' | b']' if depth > 0 => {
                depth -= 1;
                i += 1;
            }
            b')' => {
                args.push(stmt[start..i].trim());
                return (Some(args), i + 1);
            }
            b',' if depth == 0 => {
                args.push(stmt[start..i].trim());
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    (None, b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_word_skips_comments_and_agrees_with_leading_words() {
        for sql in [
            "SELECT 1",
            "  /* hint */ -- note\n  Set search_path = x",
            "(SELECT 1)",
            "'x'",
            "",
            "-- only a comment",
            "_under9 x",
        ] {
            let lowered = first_word(sql).map(str::to_ascii_lowercase);
            assert_eq!(
                lowered.as_deref(),
                leading_words(sql, 1).first().map(String::as_str),
                "{sql:?}"
            );
        }
        assert_eq!(first_word("  /* c */ Set x = 1"), Some("Set"));
    }

    #[test]
    fn contains_ignore_case_finds_any_casing() {
        assert!(contains_ignore_case(
            "select pg_Advisory_Lock(1)",
            b"advisory_lock"
        ));
        assert!(!contains_ignore_case("select 1", b"advisory_lock"));
        assert!(!contains_ignore_case("", b"x"));
        assert!(contains_ignore_case("x", b"X"));
        assert!(!contains_ignore_case("pg_advisory_loc", b"advisory_lock"));
        assert!(contains_ignore_case("ADVISORY_LOCK", b"advisory_lock"));
    }

    #[test]
    fn needles_are_found_as_contains_ignore_case_finds_each() {
        static NEEDLES: Needles = Needles::new(&[b"advisory_lock", b"into temp", b"pg_temp"]);
        for text in [
            "",
            "a",
            "SELECT 1",
            "select pg_Advisory_Lock(1)",
            "SELECT * INTO TEMP t FROM x",
            "into tem",
            "CREATE TABLE Pg_Temp.t ()",
            "pg_tem",
            "xx advisory_loc",
            "é pg_temp é",
        ] {
            let each = NEEDLES.list.iter().any(|n| contains_ignore_case(text, n));
            assert_eq!(NEEDLES.any_in(text), each, "{text:?}");
        }
        assert!(NEEDLES.any_in("SELECT * INTO TEMP t FROM x"));
        assert!(!NEEDLES.any_in("SELECT 1"));
    }

    /// Needles, their halves and near misses, in random case, at the start, the end and
    /// the middle of texts: where an anchored search could look outside the text or miss.
    #[test]
    fn needles_agree_with_contains_ignore_case_on_generated_texts() {
        use rand::{Rng as _, SeedableRng as _};
        static LIST: &[&[u8]] = &[
            b"advisory_lock",
            b"into temp",
            b"pg_temp",
            b"set_config",
            b"pg_settings",
            b"repeatable",
            b"serializable",
        ];
        static NEEDLES: Needles = Needles::new(LIST);
        let mut pieces: Vec<String> = vec![" ".into(), "x".into(), "é".into(), "_".into()];
        for n in LIST {
            let n = std::str::from_utf8(n).expect("ASCII");
            for cut in 0..=n.len() {
                pieces.push(n[..cut].into());
                pieces.push(n[cut..].into());
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut found = 0;
        for _ in 0..50_000 {
            let mut text = String::new();
            for _ in 0..rng.gen_range(0..5) {
                let piece = &pieces[rng.gen_range(0..pieces.len())];
                text.extend(piece.chars().map(|c| {
                    if rng.gen_bool(0.5) {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                }));
            }
            let each = LIST.iter().any(|n| contains_ignore_case(&text, n));
            assert_eq!(NEEDLES.any_in(&text), each, "{text:?}");
            found += usize::from(each);
        }
        // The texts must exercise both answers for the comparison to mean anything.
        assert!(
            found > 1_000 && found < 49_000,
            "{found} of 50000 texts held a needle"
        );
    }

    #[test]
    fn splits_on_semicolons_outside_quotes_comments_and_dollar_quotes() {
        let sql = "SELECT ';'; SET x = 'a;b' -- c;d\n; DO $f$ BEGIN; END $f$; /* ; */ SELECT $1";
        assert_eq!(
            statements(sql).collect::<Vec<_>>(),
            vec![
                "SELECT ';'",
                "SET x = 'a;b' -- c;d",
                "DO $f$ BEGIN; END $f$",
                "/* ; */ SELECT $1"
            ]
        );
    }

    #[test]
    fn empty_statements_are_skipped() {
        assert_eq!(statements("").count(), 0);
        assert_eq!(statements(" ; ;\n").count(), 0);
        assert_eq!(
            statements("SELECT 1;").collect::<Vec<_>>(),
            vec!["SELECT 1"]
        );
        assert_eq!(
            statements(";SELECT 1;;SELECT 2").collect::<Vec<_>>(),
            vec!["SELECT 1", "SELECT 2"]
        );
    }

    #[test]
    fn escaped_quotes_do_not_end_strings() {
        assert_eq!(statements(r"SELECT E'\';'; SELECT 'it''s;'").count(), 2);
    }

    #[test]
    fn leading_words_skip_comments_and_lowercase() {
        assert_eq!(
            leading_words("/* hi */ -- x\n  Set LOCAL work_mem = 1", 3),
            vec!["set", "local", "work_mem"]
        );
        assert_eq!(
            leading_words("SET search_path TO 'a'", 5),
            vec!["set", "search_path", "to"]
        );
    }

    #[test]
    fn unterminated_input_never_panics() {
        for s in ["'", "$a$", "/*", "E'\\", "\"", "$", "$1$"] {
            let _ = statements(s).count();
            let _ = leading_words(s, 3);
        }
    }

    #[test]
    fn call_args_split_at_top_level_commas_only() {
        assert_eq!(
            call_args(
                "SELECT pg_catalog.Set_Config('a', 'x,y)', true), my_set_config(1), set_config ( f(1, 2), $1, false )",
                "set_config"
            ),
            vec![
                Some(vec!["'a'", "'x,y)'", "true"]),
                Some(vec!["f(1, 2)", "$1", "false"])
            ]
        );
        assert_eq!(
            call_args("SELECT set_config('a', 'b'", "set_config"),
            vec![None]
        );
        assert!(call_args("SELECT 'set_config'", "set_config").is_empty());
    }

    #[test]
    fn tokens_read_quoted_and_dotted_names() {
        let t = tokens("SET /* c */ \"Time\"\"Zone\" TO 'x'", 8);
        assert_eq!(
            t,
            vec![
                Tok::Word("set".into()),
                Tok::Quoted("Time\"Zone".into()),
                Tok::Word("to".into())
            ]
        );
        let t = tokens("set session MyApp.\"Tenant\" = 1", 8);
        assert_eq!(dotted_name(&t, 2), Some(("myapp.tenant".into(), 5)));
        assert_eq!(dotted_name(&tokens("reset \"unterminated", 4), 1), None);
        assert_eq!(dotted_name(&tokens("reset = x", 4), 1), None);
    }
}
