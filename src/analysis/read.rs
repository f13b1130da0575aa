//! Statements that read and/or modify rows (SELECT, VALUES, WITH, INSERT, UPDATE, DELETE,
//! MERGE): a write anywhere makes the whole statement a write; otherwise it is a read that is
//! cacheable unless something in it bypasses.

use sqlparser::ast::{Query, SelectInto, SetExpr, Statement, TableFactor};

use super::collect::{Collected, collect};
use super::combine;
use super::keys::{Qualifiers, relation_parts, table_ref, table_ref_from_parts};
use super::model::{
    Analysis, BypassReason, DdlInfo, DdlScope, FlushReason, FunctionVolatility, PointKey, ReadInfo,
    WriteInfo,
};

pub(crate) fn classify(statement: &Statement, funcs: &dyn FunctionVolatility) -> Analysis {
    let collected = collect(statement, funcs);
    let into = match statement {
        Statement::Query(query) => select_into(&query.body).map(into_effect),
        _ => None,
    };
    if let Some(effect) = effects(&collected, into) {
        return effect;
    }
    let Statement::Query(query) = statement else {
        // A DML statement always has an effect above; be safe if sqlparser grows a new shape.
        return Analysis::Ddl(flush(FlushReason::Unrecognised));
    };
    if let Some(reason) = collected.bypass {
        return Analysis::Bypass(reason);
    }
    let point = point_key(query, &collected);
    Analysis::Read(ReadInfo {
        tables: collected.tables,
        point,
    })
}

/// The writes (and flushes) found in `node`, if any: used where a statement only matters
/// for what it modifies (`COPY (query) TO`).
pub(crate) fn effects_only<T: sqlparser::ast::Visit>(
    node: &T,
    funcs: &dyn FunctionVolatility,
) -> Option<Analysis> {
    effects(&collect(node, funcs), None)
}

fn effects(collected: &Collected, into: Option<Analysis>) -> Option<Analysis> {
    let mut parts = Vec::new();
    if let Some(reason) = collected.flush {
        parts.push(Analysis::Ddl(flush(reason)));
    }
    if !collected.writes.is_empty() {
        parts.push(Analysis::Write(WriteInfo {
            tables: collected.writes.clone(),
            hidden_writes: collected
                .bypass
                .as_ref()
                .is_some_and(BypassReason::may_write),
        }));
    }
    parts.extend(into);
    combine(parts)
}

fn flush(reason: FlushReason) -> DdlInfo {
    DdlInfo {
        scope: DdlScope::Database(reason),
        creates_temp: false,
    }
}

/// `SELECT ... INTO` sits in the leftmost SELECT of the body.
fn select_into(body: &SetExpr) -> Option<&SelectInto> {
    match body {
        SetExpr::Select(select) => select.into.as_ref(),
        SetExpr::SetOperation { left, .. } => select_into(left),
        SetExpr::Query(query) => select_into(&query.body),
        _ => None,
    }
}

/// `SELECT INTO` creates a table, like `CREATE TABLE AS`.
fn into_effect(into: &SelectInto) -> Analysis {
    Analysis::Ddl(match (into.temporary, table_ref(&into.name)) {
        (true, Some(table)) => DdlInfo {
            scope: DdlScope::Tables(vec![table]),
            creates_temp: true,
        },
        (false, Some(_)) => flush(FlushReason::NewRelation),
        (_, None) => flush(FlushReason::Unrecognised),
    })
}

/// A point read: one relation, referenced once, in a plain SELECT whose WHERE ANDs
/// `column = value` equalities.
fn point_key(query: &Query, collected: &Collected) -> Option<PointKey> {
    let [table] = collected.tables.as_slice() else {
        return None;
    };
    if collected.occurrences != 1 || query.with.is_some() {
        return None;
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let [from] = select.from.as_slice() else {
        return None;
    };
    let TableFactor::Table {
        name,
        alias,
        args: None,
        ..
    } = &from.relation
    else {
        return None;
    };
    // `FROM t AS x(a, b)` renames columns: `b = 5` may be any column of t.
    if alias.as_ref().is_some_and(|a| !a.columns.is_empty()) {
        return None;
    }
    let (parts, alias) = relation_parts(name, alias.as_ref())?;
    if !from.joins.is_empty() || table_ref_from_parts(parts).as_ref() != Some(table) {
        return None;
    }
    let qualifiers = Qualifiers { table, alias };
    let candidates = qualifiers.conjunction(select.selection.as_ref()?);
    (!candidates.is_empty()).then(|| PointKey {
        table: table.clone(),
        candidates,
    })
}
