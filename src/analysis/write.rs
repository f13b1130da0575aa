//! Targets and row keys of data-modifying statements (INSERT, UPDATE, DELETE, MERGE),
//! wherever they appear (top level or writable CTE).

use sqlparser::ast::{
    AssignmentTarget, Delete, Expr, FromTable, Insert, OnConflictAction, OnInsert, SetExpr,
    Statement, TableFactor, TableObject, TableWithJoins,
};

use super::keys::{Qualifiers, fold, key_value, relation_parts, table_ref, table_ref_from_parts};
use super::model::{ColumnValue, TableRef, TableWrite, WriteEffect};

/// The tables a DML statement writes, with the rows it may touch; `None` if a target cannot
/// be named (the caller then flushes). Other statements write nothing.
pub(crate) fn targets(statement: &Statement) -> Option<Vec<TableWrite>> {
    match statement {
        Statement::Insert(insert) => insert_target(insert).map(|w| vec![w]),
        Statement::Update {
            table,
            assignments,
            from,
            selection,
            ..
        } => {
            let (target, alias) = relation(&table.relation)?;
            let effect = if table.joins.is_empty() && from.is_none() {
                let assigned: Vec<String> = assignments
                    .iter()
                    .flat_map(|a| match &a.target {
                        AssignmentTarget::ColumnName(name) => vec![name],
                        AssignmentTarget::Tuple(names) => names.iter().collect(),
                    })
                    .filter_map(|name| name.0.last().and_then(|p| p.as_ident()).map(fold))
                    .collect();
                keyed(&target, alias, selection.as_ref(), &assigned)
            } else {
                // Joined updates: an unqualified column may belong to another table.
                WriteEffect::Wide
            };
            Some(vec![TableWrite {
                table: target,
                effect,
            }])
        }
        Statement::Delete(delete) => delete_targets(delete),
        Statement::Merge { table, .. } => {
            let (target, _) = relation(table)?;
            Some(vec![TableWrite {
                table: target,
                effect: WriteEffect::Wide,
            }])
        }
        _ => Some(Vec::new()),
    }
}

/// A plain relation (`t`, `s.t`, `t AS x`) and its alias.
fn relation(factor: &TableFactor) -> Option<(TableRef, Option<String>)> {
    match factor {
        TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } => {
            let (parts, alias) = relation_parts(name, alias.as_ref())?;
            Some((table_ref_from_parts(parts)?, alias))
        }
        _ => None,
    }
}

/// Keys from a WHERE that ANDs `column = value`, ignoring columns the statement assigns (a
/// row whose key changes is no longer found by its old key).
fn keyed(
    table: &TableRef,
    alias: Option<String>,
    filter: Option<&Expr>,
    assigned: &[String],
) -> WriteEffect {
    let Some(filter) = filter else {
        return WriteEffect::Wide;
    };
    let conjunction: Vec<ColumnValue> = Qualifiers { table, alias }
        .conjunction(filter)
        .into_iter()
        .filter(|cv| !assigned.contains(&cv.column))
        .collect();
    if conjunction.is_empty() {
        WriteEffect::Wide
    } else {
        WriteEffect::Keys(vec![conjunction])
    }
}

fn delete_targets(delete: &Delete) -> Option<Vec<TableWrite>> {
    let from = match &delete.from {
        FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from) => from,
    };
    let simple = delete.tables.is_empty() && delete.using.is_none() && from.len() == 1;
    match from.as_slice() {
        [
            TableWithJoins {
                relation: target,
                joins,
            },
        ] if simple && joins.is_empty() => {
            let (target, alias) = relation(target)?;
            let effect = keyed(&target, alias, delete.selection.as_ref(), &[]);
            Some(vec![TableWrite {
                table: target,
                effect,
            }])
        }
        // Multi-table forms (not PostgreSQL) or USING: every named table, wide.
        _ => {
            let mut out = Vec::new();
            for name in &delete.tables {
                out.push(wide(table_ref(name)?));
            }
            for twj in from {
                out.push(wide(relation(&twj.relation)?.0));
            }
            Some(out)
        }
    }
}

fn wide(table: TableRef) -> TableWrite {
    TableWrite {
        table,
        effect: WriteEffect::Wide,
    }
}

fn insert_target(insert: &Insert) -> Option<TableWrite> {
    let TableObject::TableName(name) = &insert.table else {
        return None;
    };
    let table = table_ref(name)?;
    let effect = insert_rows(insert).map_or(WriteEffect::Wide, WriteEffect::Keys);
    Some(TableWrite { table, effect })
}

/// One conjunction per `VALUES` row: its literal/parameter columns. `None` (wide) for
/// `INSERT ... SELECT`, `DEFAULT VALUES`, no column list, `ON CONFLICT DO UPDATE` (it
/// updates a conflicting row, which may be keyed by another unique constraint), or a row
/// without any literal column.
fn insert_rows(insert: &Insert) -> Option<Vec<Vec<ColumnValue>>> {
    match &insert.on {
        None => {}
        Some(OnInsert::OnConflict(c)) if matches!(c.action, OnConflictAction::DoNothing) => {}
        Some(_) => return None,
    }
    if insert.columns.is_empty() || !insert.assignments.is_empty() {
        return None;
    }
    let source = insert.source.as_ref()?;
    if source.with.is_some() || source.order_by.is_some() || source.limit_clause.is_some() {
        return None;
    }
    let SetExpr::Values(values) = source.body.as_ref() else {
        return None;
    };
    let columns: Vec<String> = insert.columns.iter().map(fold).collect();
    let mut rows = Vec::with_capacity(values.rows.len());
    for row in &values.rows {
        if row.len() != columns.len() {
            return None;
        }
        let conjunction: Vec<ColumnValue> = columns
            .iter()
            .zip(row)
            .filter_map(|(column, expr)| {
                key_value(expr).map(|value| ColumnValue {
                    column: column.clone(),
                    value,
                })
            })
            .collect();
        if conjunction.is_empty() {
            return None;
        }
        rows.push(conjunction);
    }
    (!rows.is_empty()).then_some(rows)
}
