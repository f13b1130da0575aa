//! Behaviour tests for [`analyze`](super::analyze), grouped by topic.

mod calls;
mod ddl;
mod other;
mod reads;
mod robustness;
mod writes;

use super::*;

/// Analyses with no catalog: only built-in functions are known.
fn an(sql: &str) -> Analysis {
    analyze(sql, &NoCatalog)
}

fn t(name: &str) -> TableRef {
    match name.split_once('.') {
        Some((schema, name)) => TableRef::new(Some(schema), name),
        None => TableRef::new(None, name),
    }
}

fn lit(column: &str, value: &str) -> ColumnValue {
    ColumnValue {
        column: column.into(),
        value: KeyValue::Literal(value.into()),
    }
}

fn param(column: &str, n: usize) -> ColumnValue {
    ColumnValue {
        column: column.into(),
        value: KeyValue::Param(n),
    }
}

#[track_caller]
fn read(sql: &str) -> ReadInfo {
    match an(sql) {
        Analysis::Read(info) => info,
        other => panic!("{sql}: expected Read, got {other:?}"),
    }
}

#[track_caller]
fn write(sql: &str) -> WriteInfo {
    match an(sql) {
        Analysis::Write(info) => info,
        other => panic!("{sql}: expected Write, got {other:?}"),
    }
}

#[track_caller]
fn ddl(sql: &str) -> DdlInfo {
    match an(sql) {
        Analysis::Ddl(info) => info,
        other => panic!("{sql}: expected Ddl, got {other:?}"),
    }
}

#[track_caller]
fn bypass(sql: &str) -> BypassReason {
    match an(sql) {
        Analysis::Bypass(reason) => reason,
        other => panic!("{sql}: expected Bypass, got {other:?}"),
    }
}

#[track_caller]
fn ddl_tables(sql: &str) -> Vec<TableRef> {
    match ddl(sql).scope {
        DdlScope::Tables(tables) => tables,
        other => panic!("{sql}: expected table DDL, got {other:?}"),
    }
}

#[track_caller]
fn flush_reason(sql: &str) -> FlushReason {
    match ddl(sql).scope {
        DdlScope::Database(reason) => reason,
        other => panic!("{sql}: expected database flush, got {other:?}"),
    }
}

fn wide(name: &str) -> TableWrite {
    TableWrite {
        table: t(name),
        effect: WriteEffect::Wide,
    }
}

fn keys(name: &str, rows: Vec<Vec<ColumnValue>>) -> TableWrite {
    TableWrite {
        table: t(name),
        effect: WriteEffect::Keys(rows),
    }
}
