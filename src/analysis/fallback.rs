//! Lexical classification of text the parser refused (unparsable, too long, too complex).
//!
//! Bypassing the cache is always safe for reads, but a write or DDL that the proxy fails to
//! see would leave stale entries behind: sqlparser rejects plenty of valid PostgreSQL
//! (`REFRESH MATERIALIZED VIEW`, `COPY ... FROM STDIN`, `ALTER DEFAULT PRIVILEGES`, `DO`,
//! `CREATE UNLOGGED TABLE`, ...). So the text is split into statements and each is judged by
//! its leading keywords: known-harmless ones bypass, simple DML names its target (wide), a
//! few DDL forms are attributed, and everything else flushes the database when it commits.

use super::combine;
use super::keys::{fold_word, table_ref_from_parts};
use super::lex::{Item, statements};
use super::model::{
    Analysis, BypassReason, DdlInfo, DdlScope, FlushReason, TableRef, TableWrite, WriteEffect,
    WriteInfo,
};

/// Why the parser was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    TooLong,
    TooComplex,
    Unparsable,
}

impl Refusal {
    fn bypass(self) -> BypassReason {
        match self {
            Self::TooLong => BypassReason::TooLong,
            Self::TooComplex => BypassReason::TooComplex,
            Self::Unparsable => BypassReason::Unparsable,
        }
    }

    fn flush(self) -> FlushReason {
        match self {
            Self::TooLong => FlushReason::TooLong,
            Self::TooComplex => FlushReason::TooComplex,
            Self::Unparsable => FlushReason::Unparsable,
        }
    }
}

/// Statements that change nothing the cache holds (session and transaction control,
/// cursors, maintenance). Session-state changes (SET ROLE, ...) are tracked by the caller.
const HARMLESS: &[&str] = &[
    "abort",
    "analyse",
    "analyze",
    "begin",
    "checkpoint",
    "close",
    "comment",
    "commit",
    "deallocate",
    "declare",
    "discard",
    "end",
    "fetch",
    "listen",
    "load",
    "lock",
    "move",
    "notify",
    "prepare",
    "reindex",
    "release",
    "reset",
    "rollback",
    "savepoint",
    "set",
    "show",
    "start",
    "table",
    "unlisten",
    "vacuum",
    "values",
];

pub(crate) fn classify(sql: &str, why: Refusal) -> Analysis {
    let statements = statements(sql);
    if statements.is_empty() {
        return Analysis::Other;
    }
    let parts: Vec<Analysis> = statements.iter().map(|s| statement(s, why)).collect();
    combine(parts).unwrap_or(Analysis::Bypass(why.bypass()))
}

struct Words<'s, 'a> {
    items: &'s [Item<'a>],
}

impl Words<'_, '_> {
    /// The `i`-th item as a lower-cased keyword, if it is an unquoted word.
    fn word(&self, i: usize) -> Option<String> {
        match self.items.get(i) {
            Some(Item::Word(w)) => Some(w.to_ascii_lowercase()),
            _ => None,
        }
    }

    fn is(&self, i: usize, keyword: &str) -> bool {
        matches!(self.items.get(i), Some(Item::Word(w)) if w.eq_ignore_ascii_case(keyword))
    }

    fn has_any(&self, keywords: &[&str]) -> bool {
        self.items.iter().any(|item| {
            matches!(item, Item::Word(w) if keywords.iter().any(|k| w.eq_ignore_ascii_case(k)))
        })
    }

    /// A relation name starting at `i` (after an optional ONLY).
    fn name_at(&self, mut i: usize) -> Option<TableRef> {
        if self.is(i, "only") {
            i += 1;
        }
        let mut parts = Vec::new();
        loop {
            match self.items.get(i)? {
                Item::Word(w) => parts.push(fold_word(w)),
                Item::Quoted(q) => {
                    let mut q = q.clone();
                    super::keys::truncate(&mut q);
                    parts.push(q);
                }
                _ => return None,
            }
            if self.items.get(i + 1) != Some(&Item::Dot) {
                break;
            }
            i += 2;
        }
        table_ref_from_parts(parts)
    }
}

fn statement(items: &[Item<'_>], why: Refusal) -> Analysis {
    // `(SELECT ...) UNION ...`
    let start = items.iter().take_while(|i| **i == Item::LParen).count();
    let w = Words {
        items: &items[start..],
    };
    let Some(first) = w.word(0) else {
        return flush(why.flush());
    };
    let wide_write = |table: Option<TableRef>| match table {
        Some(table) => Analysis::Write(WriteInfo {
            tables: vec![TableWrite {
                table,
                effect: WriteEffect::Wide,
            }],
            // Unparsed text: its calls are unknown.
            hidden_writes: true,
        }),
        None => flush(why.flush()),
    };
    const DML: &[&str] = &["insert", "update", "delete", "merge"];
    match first.as_str() {
        "select" if w.has_any(&["into"]) => flush(why.flush()),
        "with" if w.has_any(DML) || w.has_any(&["into"]) => flush(why.flush()),
        "select" | "with" => Analysis::Bypass(why.bypass()),
        "explain" if w.has_any(&["analyze", "analyse"]) => flush(why.flush()),
        "explain" => Analysis::Bypass(why.bypass()),
        "insert" if w.is(1, "into") => wide_write(w.name_at(2)),
        "merge" if w.is(1, "into") => wide_write(w.name_at(2)),
        "update" => wide_write(w.name_at(1)),
        "delete" if w.is(1, "from") => wide_write(w.name_at(2)),
        "copy" if w.items.get(1) == Some(&Item::LParen) => {
            if w.has_any(DML) {
                flush(why.flush())
            } else {
                Analysis::Bypass(why.bypass())
            }
        }
        "copy" if w.has_any(&["from"]) => wide_write(w.name_at(1)),
        "copy" => Analysis::Bypass(why.bypass()),
        "refresh" if w.is(1, "materialized") && w.is(2, "view") => {
            let at = if w.is(3, "concurrently") { 4 } else { 3 };
            match w.name_at(at) {
                Some(table) => Analysis::Ddl(DdlInfo {
                    scope: DdlScope::Tables(vec![table]),
                    creates_temp: false,
                }),
                None => flush(why.flush()),
            }
        }
        "commit" if w.is(1, "prepared") => flush(FlushReason::TwoPhaseCommit),
        "do" | "call" => Analysis::Ddl(DdlInfo {
            scope: DdlScope::Database(FlushReason::Procedural),
            creates_temp: true,
        }),
        "execute" => flush(FlushReason::Procedural),
        "create" if creates_temp(&w) => Analysis::Ddl(DdlInfo {
            scope: DdlScope::Tables(Vec::new()),
            creates_temp: true,
        }),
        "grant" | "revoke" => flush(FlushReason::Privileges),
        "alter" => match w.word(1).as_deref() {
            Some("role" | "user" | "group") => flush(FlushReason::Role),
            Some("system") => flush(FlushReason::Settings),
            Some("default") => flush(FlushReason::Privileges),
            Some("function" | "procedure" | "routine" | "aggregate") => {
                flush(FlushReason::Function)
            }
            _ => flush(why.flush()),
        },
        "reassign" => flush(FlushReason::Role),
        // Rows come back in another order: what a read without ORDER BY shows changes.
        "cluster" => flush(FlushReason::Rewrite),
        "vacuum" if w.has_any(&["full"]) => flush(FlushReason::Rewrite),
        "drop" if w.is(1, "owned") => flush(FlushReason::Role),
        other if HARMLESS.contains(&other) => Analysis::Bypass(why.bypass()),
        _ => flush(why.flush()),
    }
}

/// `CREATE [OR REPLACE] {TEMP | TEMPORARY | LOCAL TEMP | GLOBAL TEMP} ...`
fn creates_temp(w: &Words<'_, '_>) -> bool {
    let mut i = 1;
    if w.is(1, "or") && w.is(2, "replace") {
        i = 3;
    }
    if w.is(i, "local") || w.is(i, "global") {
        i += 1;
    }
    w.is(i, "temp") || w.is(i, "temporary")
}

fn flush(reason: FlushReason) -> Analysis {
    Analysis::Ddl(DdlInfo {
        scope: DdlScope::Database(reason),
        creates_temp: false,
    })
}
