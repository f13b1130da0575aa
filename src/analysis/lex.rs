//! A small, infallible SQL lexer for the parts that must work on text sqlparser cannot
//! handle: comments (for hints, which sqlparser drops), statement splitting and the leading
//! keywords used by the lexical fallback. It understands just enough of PostgreSQL's lexical
//! rules (quotes, E'' strings, dollar quoting, nested block comments) that semicolons, words
//! and comments inside literals are never mistaken for syntax. Anything else is `Other`.

/// One lexical item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item<'a> {
    /// An unquoted identifier or keyword, as written.
    Word(&'a str),
    /// A double-quoted identifier, `""` unescaped.
    Quoted(String),
    /// The body of a `--` or `/* */` comment.
    Comment(&'a str),
    Semi,
    Dot,
    Comma,
    LParen,
    RParen,
    /// Literals, numbers, parameters, operators.
    Other,
}

pub(crate) struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    /// Where the item last returned starts (after whitespace); it ends at `pos`.
    start: usize,
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(src: &'a str) -> Self {
        Self {
            src,
            pos: 0,
            start: 0,
        }
    }

    /// The text of the item last returned by `next` (the lexer-driven definition of a
    /// literal shape, kept in its tests, needs it).
    #[cfg(test)]
    pub(crate) fn last_span(&self) -> std::ops::Range<usize> {
        self.start..self.pos
    }

    fn bytes(&self) -> &'a [u8] {
        self.src.as_bytes()
    }

    fn peek(&self, offset: usize) -> Option<u8> {
        self.peek_at(self.pos + offset)
    }

    fn peek_at(&self, index: usize) -> Option<u8> {
        self.bytes().get(index).copied()
    }

    /// Skips a single-quoted literal starting at `self.pos` (on the opening quote).
    fn skip_string(&mut self, backslash_escapes: bool) {
        self.pos = string_end(self.bytes(), self.pos, backslash_escapes);
    }

    /// At a `$`: a dollar-quoted string (`$tag$ ... $tag$`), else a parameter or operator.
    fn skip_dollar(&mut self) {
        let b = self.bytes();
        let start = self.pos;
        let mut i = start + 1;
        // A tag is empty or an identifier that does not start with a digit (`$1` is a parameter).
        let tag_ok = b.get(i).is_some_and(|&c| c == b'$' || is_ident_start(c));
        if tag_ok {
            while i < b.len() && b[i] != b'$' && is_ident_byte(b[i]) {
                i += 1;
            }
        }
        if !tag_ok || b.get(i) != Some(&b'$') {
            self.pos = start + 1;
            while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
            return;
        }
        let tag = &self.src[start..=i];
        match self.src[i + 1..].find(tag) {
            Some(end) => self.pos = i + 1 + end + tag.len(),
            None => self.pos = b.len(),
        }
    }

    /// At `/*`: a block comment, nested as PostgreSQL allows. Returns its body.
    fn block_comment(&mut self) -> &'a str {
        let body_start = self.pos + 2;
        match block_comment_end(self.bytes(), self.pos) {
            Some(end) => {
                self.pos = end;
                &self.src[body_start..end - 2]
            }
            None => {
                self.pos = self.src.len();
                &self.src[body_start..]
            }
        }
    }
}

/// Past the string literal whose opening quote is at `open` (`''` inside is a quote, and
/// with `backslash_escapes`, as in `E''`, so is `\'`), or the end of `b` if it never closes.
pub(crate) fn string_end(b: &[u8], open: usize, backslash_escapes: bool) -> usize {
    let mut i = open + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslash_escapes => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// Where the `--` comment starting at `open` ends: its newline (not included), or the end.
pub(crate) fn line_comment_end(b: &[u8], open: usize) -> usize {
    memchr::memchr(b'\n', &b[open..]).map_or(b.len(), |n| open + n)
}

/// Past the block comment whose `/*` is at `open`, nested as PostgreSQL allows; `None` if
/// it never closes. (The one definition for the lexer and the other scanners of SQL text.)
pub(crate) fn block_comment_end(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 1usize;
    let mut i = open + 2;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_byte(c: u8) -> bool {
    BYTE_CLASS[usize::from(c)] & IDENT != 0
}

fn is_number_byte(c: u8) -> bool {
    BYTE_CLASS[usize::from(c)] & NUMBER != 0
}

/// Byte classes, looked up rather than computed: the lexer (and the literal-shape scanner,
/// which tokenizes alike) runs over every new query text (every miss of a simple-protocol
/// workload), and its loops over words and numbers are most of its cost.
pub(crate) const IDENT: u8 = 1;
pub(crate) const NUMBER: u8 = 2;
/// What the lexer skips between items (`u8::is_ascii_whitespace`).
pub(crate) const WHITESPACE: u8 = 4;
pub(crate) static BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_whitespace() {
            t[c] |= WHITESPACE;
        }
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80 {
            t[c] |= IDENT;
        }
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' {
            t[c] |= NUMBER;
        }
        c += 1;
    }
    t
};

impl<'a> Iterator for Lexer<'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Item<'a>> {
        self.pos = skip_while(self.bytes(), self.pos, |c| c.is_ascii_whitespace());
        let c = self.peek(0)?;
        self.start = self.pos;
        let item = match c {
            b'-' if self.peek(1) == Some(b'-') => {
                let start = self.pos + 2;
                let end = line_comment_end(self.bytes(), self.pos);
                self.pos = end;
                Item::Comment(&self.src[start..end])
            }
            b'/' if self.peek(1) == Some(b'*') => Item::Comment(self.block_comment()),
            b'\'' => {
                self.skip_string(false);
                Item::Other
            }
            b'"' => {
                let mut ident = String::new();
                let mut i = self.pos + 1;
                loop {
                    match self.src[i..].find('"') {
                        None => {
                            ident.push_str(&self.src[i..]);
                            self.pos = self.src.len();
                            break;
                        }
                        Some(n) => {
                            let quote = i + n;
                            ident.push_str(&self.src[i..quote]);
                            if self.peek_at(quote + 1) == Some(b'"') {
                                ident.push('"');
                                i = quote + 2;
                            } else {
                                self.pos = quote + 1;
                                break;
                            }
                        }
                    }
                }
                Item::Quoted(ident)
            }
            b'$' => {
                self.skip_dollar();
                Item::Other
            }
            b';' => {
                self.pos += 1;
                Item::Semi
            }
            b'.' if !self.peek(1).is_some_and(|c| c.is_ascii_digit()) => {
                self.pos += 1;
                Item::Dot
            }
            b',' => {
                self.pos += 1;
                Item::Comma
            }
            b'(' => {
                self.pos += 1;
                Item::LParen
            }
            b')' => {
                self.pos += 1;
                Item::RParen
            }
            c if is_ident_start(c) => {
                let start = self.pos;
                self.pos = skip_while(self.bytes(), start, is_ident_byte);
                let word = &self.src[start..self.pos];
                if self.peek(0) == Some(b'\'') {
                    // E'...' takes backslash escapes; B'', X'', N'', U&'' do not matter here.
                    self.skip_string(word.eq_ignore_ascii_case("e"));
                    Item::Other
                } else {
                    Item::Word(word)
                }
            }
            c if c.is_ascii_digit() || c == b'.' => {
                self.pos = skip_while(self.bytes(), self.pos, is_number_byte);
                Item::Other
            }
            _ => {
                // Operators and stray bytes; step over a whole UTF-8 character.
                let len = self.src[self.pos..]
                    .chars()
                    .next()
                    .map_or(1, char::len_utf8);
                self.pos += len;
                Item::Other
            }
        };
        Some(item)
    }
}

/// The index of the first byte from `from` on that is not `class`, or the end.
fn skip_while(b: &[u8], from: usize, class: impl Fn(u8) -> bool) -> usize {
    b.get(from..)
        .and_then(|rest| rest.iter().position(|&c| !class(c)))
        .map_or(b.len(), |n| from + n)
}

/// The statements of a text, split at top-level semicolons, without comments; empty
/// statements are dropped.
pub(crate) fn statements(src: &str) -> Vec<Vec<Item<'_>>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    for item in Lexer::new(src) {
        match item {
            Item::Comment(_) => {}
            Item::Semi => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            other => current.push(other),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(s: &str) -> Vec<Item<'_>> {
        Lexer::new(s).collect()
    }

    #[test]
    fn strings_and_quotes_hide_their_contents() {
        let got = items(r#"SELECT 'a;--b', E'x\';y', "we""ird;", $t$ ; $t$ , $1"#);
        assert_eq!(
            got,
            vec![
                Item::Word("SELECT"),
                Item::Other,
                Item::Comma,
                Item::Other,
                Item::Comma,
                Item::Quoted("we\"ird;".into()),
                Item::Comma,
                Item::Other,
                Item::Comma,
                Item::Other,
            ]
        );
    }

    #[test]
    fn nested_block_comments_and_line_comments() {
        let got = items("/* a /* b */ c */ x -- tail\n y");
        assert_eq!(
            got,
            vec![
                Item::Comment(" a /* b */ c "),
                Item::Word("x"),
                Item::Comment(" tail"),
                Item::Word("y"),
            ]
        );
    }

    #[test]
    fn splits_statements_at_top_level_semicolons_only() {
        let s = statements("BEGIN; SELECT ';'; ; DO $$ a; b $$;  -- c;\n");
        assert_eq!(s.len(), 3);
        assert_eq!(s[2][0], Item::Word("DO"));
    }

    #[test]
    fn the_byte_tables_classify_as_the_ascii_rules_do() {
        for c in 0..=255u8 {
            let ident = c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
            let number = c.is_ascii_alphanumeric() || c == b'.' || c == b'_';
            assert_eq!(is_ident_byte(c), ident, "{c}");
            assert_eq!(is_number_byte(c), number, "{c}");
        }
        let words = |s| {
            Lexer::new(s)
                .map(|i| match i {
                    Item::Word(w) => w,
                    _ => "#",
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            words("  sel$ct\t_a1 é 1.5e3x.y 7"),
            ["sel$ct", "_a1", "é", "#", "#"]
        );
    }

    #[test]
    fn unterminated_everything_does_not_panic() {
        for s in [
            "'abc",
            "\"abc",
            "$q$ abc",
            "/* abc",
            "E'\\",
            "$",
            "$1",
            "é'",
            "\u{1F600}",
        ] {
            let _ = items(s);
            let _ = statements(s);
        }
    }
}
