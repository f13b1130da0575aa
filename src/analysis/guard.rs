//! Keeps sqlparser and the AST walks from exhausting the stack (a stack overflow aborts the
//! whole proxy; it cannot be caught) or burning seconds of CPU on one statement.
//!
//! Two hazards, both measured on sqlparser 0.59:
//! - **Depth.** The recursion limit bounds nesting, but a left-deep chain such as
//!   `a + a + ... + a` or `x = 1 AND y = 2 AND ...` is built by a loop, and the derived visitor
//!   and `Drop` then recurse once per link: in a debug build ~1,000 links overflow a 2 MiB
//!   tokio worker stack. The token stream is measured first: a token's *weight* is how many
//!   tokens precede it in its own comma/paren-delimited run, summed over all enclosing runs.
//!   Every AST level needs at least one token on that path, so the maximum weight bounds the
//!   depth of any walk. Parsing, classification and dropping the AST then run on a stack big
//!   enough for that bound: the current one when it has room (the common case), else a
//!   dedicated one (allocating it costs ~13 µs, so it is avoided when possible).
//! - **Time.** sqlparser backtracks, and some constructs re-parse their contents once per
//!   alternative: nested function calls double the time per level, `CAST(`/`SUBSTRING(` with
//!   a syntax error inside multiply it by ~8, and nested `ARRAY[` at the recursion limit
//!   never finishes. Nested calls, casts, `[`, and CASE are therefore limited to
//!   [`MAX_CALL_DEPTH`] (worst measured case at that depth: a few milliseconds). Parentheses
//!   after structural keywords (`IN (`, `EXISTS (`, `AND (`, `AS (`, ...) or operators are
//!   linear and not counted.
//!
//! Refused texts go to the lexical fallback, which still finds writes.

use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Token, TokenWithSpan};

/// Longer statements are not parsed.
pub(crate) const MAX_LEN: usize = 100 * 1024;

/// Maximum token weight (see module doc) that is parsed.
pub(crate) const MAX_WEIGHT: usize = 4_000;

/// Maximum nesting of calls, casts, brackets and CASE (see module doc).
pub(crate) const MAX_CALL_DEPTH: usize = 7;

/// sqlparser's own nesting limit (its default).
pub(crate) const RECURSION_LIMIT: usize = 50;

/// Stack needed regardless of weight (nesting up to `RECURSION_LIMIT`) and per unit of
/// weight. Measured worst cases: release 767 KiB for 48 nested subqueries and ~45 B per
/// weight unit; debug 2.7 MiB and ~1.1 KiB. These are about twice that.
const BASE_STACK: usize = if cfg!(debug_assertions) {
    6 << 20
} else {
    3 << 19
};
const STACK_PER_WEIGHT: usize = if cfg!(debug_assertions) { 2 << 10 } else { 256 };

/// Size of a dedicated stack; covers `BASE_STACK + MAX_WEIGHT * STACK_PER_WEIGHT` in both
/// profiles. Only touched pages are committed.
const STACK_SIZE: usize = 32 << 20;

/// What the guard measures in a token stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub weight: usize,
    pub call_depth: usize,
}

impl Shape {
    pub(crate) fn acceptable(&self) -> bool {
        self.weight <= MAX_WEIGHT && self.call_depth <= MAX_CALL_DEPTH
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Opener {
    /// `(` after an operator, another `(` or a structural keyword; `{`.
    Plain,
    /// `(` after a name (call, cast, type modifier) or `[`.
    Call,
    Case,
}

/// Keywords after which `(` starts a subquery, list or grouping rather than a call.
fn is_structural(keyword: Keyword) -> bool {
    use Keyword as K;
    matches!(
        keyword,
        K::AND
            | K::AS
            | K::BY
            | K::ELSE
            | K::EXCEPT
            | K::EXISTS
            | K::FROM
            | K::HAVING
            | K::IN
            | K::INTERSECT
            | K::JOIN
            | K::LATERAL
            | K::NOT
            | K::ON
            | K::OR
            | K::OVER
            | K::SELECT
            | K::THEN
            | K::UNION
            | K::USING
            | K::WHEN
            | K::WHERE
    )
}

pub(crate) fn shape(tokens: &[TokenWithSpan]) -> Shape {
    // runs[i] = tokens so far in the current run at paren level i.
    let mut runs: Vec<usize> = vec![0];
    let mut total = 0usize;
    let mut openers: Vec<Opener> = Vec::new();
    let mut calls = 0usize;
    let mut shape = Shape {
        weight: 0,
        call_depth: 0,
    };
    let mut previous: Option<&Token> = None;
    for token in tokens {
        match &token.token {
            Token::Whitespace(_) | Token::EOF => continue,
            Token::LParen | Token::LBracket | Token::LBrace => {
                bump(&mut runs, &mut total);
                runs.push(0);
                let opener = match (&token.token, previous) {
                    (Token::LBracket, _) => Opener::Call,
                    (Token::LParen, Some(Token::Word(w))) if !is_structural(w.keyword) => {
                        Opener::Call
                    }
                    _ => Opener::Plain,
                };
                calls += usize::from(opener != Opener::Plain);
                openers.push(opener);
            }
            Token::RParen | Token::RBracket | Token::RBrace => {
                if runs.len() > 1 {
                    total -= runs.pop().unwrap_or(0);
                }
                bump(&mut runs, &mut total);
                // Also closes any CASE left open inside the parentheses.
                while let Some(opener) = openers.pop() {
                    calls -= usize::from(opener != Opener::Plain);
                    if opener != Opener::Case {
                        break;
                    }
                }
            }
            Token::Comma => {
                let last = runs.last_mut().expect("runs is never empty");
                total -= *last;
                *last = 0;
            }
            Token::SemiColon => {
                runs.clear();
                runs.push(0);
                total = 0;
                openers.clear();
                calls = 0;
            }
            Token::Word(w) if w.keyword == Keyword::CASE => {
                bump(&mut runs, &mut total);
                openers.push(Opener::Case);
                calls += 1;
            }
            Token::Word(w) if w.keyword == Keyword::END => {
                bump(&mut runs, &mut total);
                if openers.last() == Some(&Opener::Case) {
                    openers.pop();
                    calls -= 1;
                }
            }
            _ => bump(&mut runs, &mut total),
        }
        previous = Some(&token.token);
        shape.weight = shape.weight.max(total);
        shape.call_depth = shape.call_depth.max(calls);
    }
    shape
}

fn bump(runs: &mut [usize], total: &mut usize) {
    if let Some(last) = runs.last_mut() {
        *last += 1;
        *total += 1;
    }
}

/// Runs `f` on a stack with room for a statement of this weight.
pub(crate) fn with_stack_for<R>(weight: usize, f: impl FnOnce() -> R) -> R {
    let needed = BASE_STACK + weight * STACK_PER_WEIGHT;
    match stacker::remaining_stack() {
        Some(remaining) if remaining >= needed => f(),
        _ => stacker::grow(STACK_SIZE, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::tokenizer::Tokenizer;

    fn sh(sql: &str) -> Shape {
        shape(
            &Tokenizer::new(&PostgreSqlDialect {}, sql)
                .tokenize_with_location()
                .unwrap(),
        )
    }

    #[test]
    fn weight_grows_with_chains_not_with_lists() {
        let chain = format!("SELECT {}1", "1 + ".repeat(100));
        let list = format!("SELECT {}1", "1, ".repeat(1000));
        let rows = format!("INSERT INTO t VALUES {}(1)", "(1, 'a'), ".repeat(1000));
        assert!(sh(&chain).weight > 200);
        assert!(sh(&list).weight < 10);
        assert!(sh(&rows).weight < 10);
    }

    #[test]
    fn weight_sums_enclosing_runs() {
        assert_eq!(sh("a b (c d (e f").weight, 8);
        assert_eq!(sh("a b (c d) e").weight, 5);
        assert_eq!(sh("a b; c").weight, 2);
    }

    #[test]
    fn call_depth_counts_calls_casts_brackets_and_case() {
        assert_eq!(sh("SELECT f(g(h(1)))").call_depth, 3);
        assert_eq!(sh("SELECT CAST(ARRAY[1] AS int[])").call_depth, 2);
        assert_eq!(
            sh("SELECT CASE WHEN a THEN CASE WHEN b THEN f(1) END END").call_depth,
            3
        );
        assert_eq!(sh("SELECT f(1), g(2), h(3)").call_depth, 1);
        assert_eq!(
            sh("SELECT CASE WHEN a THEN 1 END, CASE WHEN b THEN 2 END").call_depth,
            1
        );
    }

    #[test]
    fn structural_parentheses_are_not_calls() {
        let sql = "SELECT * FROM t WHERE (a AND (b OR (c))) AND x IN (SELECT y FROM u \
                   WHERE EXISTS (SELECT 1 FROM v WHERE z IN (1, 2)))";
        assert_eq!(sh(sql).call_depth, 0);
        assert_eq!(
            sh("WITH x AS (SELECT 1) SELECT count(*) OVER (PARTITION BY a)").call_depth,
            1
        );
    }
}
