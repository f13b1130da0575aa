//! The analysis stage: for one SQL statement text, decide what the cache must know — is it a
//! cacheable read (of which tables, and is it a point read), a write (which tables, which
//! keys), DDL (which tables, or the whole database), or something to forward untouched.
//!
//! This module owns that decision and nothing else. It is pure: no I/O, no catalog access
//! (the catalog is consulted only through [`FunctionVolatility`]), no global state, and it
//! never panics whatever the input. Memoising results by query text is the caller's job
//! ([`Analysis`] is `Clone + Send + Sync`). Names are reported as written; resolving them
//! (search_path, views to base tables, partitions) and checking primary keys is the caller's.
//!
//! Pipeline ([`analyze`]): length guard → sqlparser tokenizer → depth and backtracking
//! guards (`guard`) → parse with `PostgreSqlDialect` on a stack big enough for the text →
//! per-statement classification (`statement`, `read`, `write`, `collect`). Text that is
//! refused or fails to parse goes to a lexical fallback (`fallback`) that still recognises
//! writes and DDL, because a write the proxy does not see leaves stale entries behind.
//!
//! Effects are meant to be applied only if the statement succeeds, and only when its
//! transaction commits (DESIGN.md "Freshness").

mod collect;
mod fallback;
mod functions;
mod guard;
mod hints;
mod keys;
pub(crate) mod lex;
mod model;
mod read;
mod shape;
mod statement;
mod write;

#[cfg(test)]
mod tests;

use std::panic::{AssertUnwindSafe, catch_unwind};

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Tokenizer;

use fallback::Refusal;

pub use hints::{Hints, hints};
pub use keys::{binary_holds_time_word, canonical_integer, is_time_literal};
pub use model::{
    Analysis, BypassReason, ColumnValue, DdlInfo, DdlScope, FlushReason, FunctionVolatility,
    KeyValue, NoCatalog, PointKey, ReadInfo, TableRef, TableWrite, Volatility, WriteEffect,
    WriteInfo,
};
pub use shape::{LiteralShape, Literals, instantiate, literal_shape, literal_shape_into};

/// Analyses one statement text (as sent in a Query or Parse message).
///
/// A text with several statements (simple query protocol) is never cached, but its effects
/// are still reported: if any statement writes or is DDL, the result is the combination
/// (`Ddl` if any is DDL — its tables plus all written tables, or a database flush if any
/// flushes; else `Write` with every written table); otherwise `Bypass(MultipleStatements)`.
/// Transaction control inside such a text is not reported: the caller follows transaction
/// state from ReadyForQuery.
pub fn analyze(sql: &str, funcs: &dyn FunctionVolatility) -> Analysis {
    if sql.len() > guard::MAX_LEN {
        return fallback::classify(sql, Refusal::TooLong);
    }
    // sqlparser is not expected to panic, but a bug there must cost one bypass, not a session.
    catch_unwind(AssertUnwindSafe(|| parse_and_classify(sql, funcs)))
        .unwrap_or(Err(Refusal::Unparsable))
        .unwrap_or_else(|refusal| fallback::classify(sql, refusal))
}

fn parse_and_classify(sql: &str, funcs: &dyn FunctionVolatility) -> Result<Analysis, Refusal> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|_| Refusal::Unparsable)?;
    let shape = guard::shape(&tokens);
    if !shape.acceptable() {
        return Err(Refusal::TooComplex);
    }
    // The AST is built, walked and dropped inside: all of it needs the deep stack.
    guard::with_stack_for(shape.weight, || {
        let statements = Parser::new(&dialect)
            .with_recursion_limit(guard::RECURSION_LIMIT)
            .with_tokens_with_locations(tokens)
            .parse_statements()
            .map_err(|_| Refusal::Unparsable)?;
        Ok(match statements.as_slice() {
            [] => Analysis::Other,
            [one] => statement::classify(one, funcs),
            many => {
                let parts: Vec<Analysis> =
                    many.iter().map(|s| statement::classify(s, funcs)).collect();
                // Reads only: say so, unless one of them calls a function that may write.
                let writer = parts.iter().find_map(|p| match p {
                    Analysis::Bypass(r) if r.may_write() => Some(r.clone()),
                    _ => None,
                });
                combine(parts).unwrap_or(Analysis::Bypass(
                    writer.unwrap_or(BypassReason::MultipleStatements),
                ))
            }
        })
    })
}

/// Combines the effects of several analyses (statements of one text, or parts of one
/// statement); `None` if none of them writes or is DDL. When in doubt, wider: any database
/// flush wins, any DDL turns writes into table-wide DDL invalidation.
pub(crate) fn combine(parts: impl IntoIterator<Item = Analysis>) -> Option<Analysis> {
    let mut writes = Vec::new();
    let mut ddl_tables = Vec::new();
    let mut any_ddl = false;
    let mut flush = None;
    let mut creates_temp = false;
    let mut hidden_writes = false;
    for part in parts {
        match part {
            Analysis::Write(w) => {
                hidden_writes |= w.hidden_writes;
                writes.extend(w.tables);
            }
            Analysis::Ddl(d) => {
                any_ddl = true;
                creates_temp |= d.creates_temp;
                match d.scope {
                    DdlScope::Tables(tables) => ddl_tables.extend(tables),
                    DdlScope::Database(reason) => {
                        flush.get_or_insert(reason);
                    }
                }
            }
            // `UPDATE t ...; SELECT add_log()`: the text writes, and more than it names.
            Analysis::Bypass(r) if r.may_write() => hidden_writes = true,
            Analysis::Read(_) | Analysis::Bypass(_) | Analysis::Other => {}
        }
    }
    if any_ddl {
        let scope = match flush {
            Some(reason) => DdlScope::Database(reason),
            None => {
                for table in writes.into_iter().map(|w| w.table) {
                    if !ddl_tables.contains(&table) {
                        ddl_tables.push(table);
                    }
                }
                DdlScope::Tables(ddl_tables)
            }
        };
        Some(Analysis::Ddl(DdlInfo {
            scope,
            creates_temp,
        }))
    } else if !writes.is_empty() {
        Some(Analysis::Write(WriteInfo {
            tables: writes,
            hidden_writes,
        }))
    } else {
        None
    }
}
