//! Classification of one parsed statement: reads and DML go to `read`, everything else is
//! sorted here into harmless (`Other`), attributable DDL (tables) or a database flush.
//! Unknown statement kinds flush: when in doubt, invalidate wider.

use sqlparser::ast::{
    AlterTableOperation, CascadeOption, CopySource, Expr, GrantObjects, ObjectName, ObjectType,
    Statement, UtilityOption, Value,
};

use super::keys::table_ref;
use super::model::{
    Analysis, DdlInfo, DdlScope, FlushReason, FunctionVolatility, TableWrite, WriteEffect,
    WriteInfo,
};
use super::read;

pub(crate) fn classify(statement: &Statement, funcs: &dyn FunctionVolatility) -> Analysis {
    use Statement as S;
    match statement {
        S::Query(_) | S::Insert(_) | S::Update { .. } | S::Delete(_) | S::Merge { .. } => {
            read::classify(statement, funcs)
        }

        S::Truncate {
            table_names,
            cascade,
            ..
        } => {
            if matches!(cascade, Some(CascadeOption::Cascade)) {
                // Also truncates every table with a foreign key to these.
                return flush(FlushReason::Cascade);
            }
            wide_writes(table_names.iter().map(|t| &t.name))
        }
        S::Copy { source, to, .. } => match (source, to) {
            (CopySource::Table { table_name, .. }, false) => wide_writes([table_name]),
            (CopySource::Table { .. }, true) => Analysis::Other,
            // `COPY (DELETE ... RETURNING *) TO STDOUT` writes.
            (CopySource::Query(query), true) => read::effects_only(query.as_ref(), funcs)
                .unwrap_or_else(|| writer_call(&Statement::Query(query.clone()), funcs)),
            (CopySource::Query(_), false) => flush(FlushReason::Unrecognised),
        },
        S::Explain {
            analyze,
            options,
            statement,
            ..
        } => {
            let runs = *analyze || options.iter().flatten().any(is_analyze_option);
            match classify(statement, funcs) {
                effect @ (Analysis::Write(_) | Analysis::Ddl(_)) if runs => effect,
                // EXPLAIN ANALYZE runs the query, and with it any function that writes.
                Analysis::Bypass(r) if runs && r.may_write() => Analysis::Bypass(r),
                _ => Analysis::Other,
            }
        }
        // A cursor runs its query (as FETCHes ask): its calls may write.
        S::Declare { stmts } => {
            for d in stmts {
                if let Some(q) = &d.for_query {
                    let a = writer_call(&Statement::Query(q.clone()), funcs);
                    if !matches!(a, Analysis::Other) {
                        return a;
                    }
                }
            }
            Analysis::Other
        }

        S::Grant { objects, .. } | S::Revoke { objects, .. } => match objects {
            Some(GrantObjects::Tables(names)) => tables(names),
            _ => flush(FlushReason::Privileges),
        },
        S::Deny(_) => flush(FlushReason::Privileges),
        S::AlterRole { .. } | S::CreateRole { .. } | S::CreateUser(_) => flush(FlushReason::Role),
        S::CreatePolicy { table_name, .. }
        | S::AlterPolicy { table_name, .. }
        | S::DropPolicy { table_name, .. } => tables([table_name]),
        S::CreateFunction(_)
        | S::DropFunction { .. }
        | S::CreateProcedure { .. }
        | S::DropProcedure { .. }
        | S::CreateMacro { .. } => flush(FlushReason::Function),

        S::AlterTable {
            name, operations, ..
        } => {
            if operations
                .iter()
                .any(|op| matches!(op, AlterTableOperation::RenameTable { .. }))
            {
                flush(FlushReason::NewRelation)
            } else {
                tables([name])
            }
        }
        S::AlterView { name, .. } => tables([name]),
        S::CreateIndex(index) => tables([&index.table_name]),
        S::CreateTrigger(trigger) => tables([&trigger.table_name]),
        S::DropTrigger(trigger) => match &trigger.table_name {
            Some(table) => tables([table]),
            None => flush(FlushReason::Unrecognised),
        },
        S::CreateView {
            name, temporary, ..
        } => create_relation(*temporary, name),
        S::CreateTable(table) => create_relation(table.temporary, &table.name),
        S::CreateSequence {
            temporary, name, ..
        } => create_relation(*temporary, name),
        S::CreateVirtualTable { .. } => flush(FlushReason::NewRelation),
        S::Drop {
            object_type,
            names,
            cascade,
            ..
        } => drop(*object_type, names, *cascade),

        S::Execute { .. } => flush(FlushReason::Procedural),
        // Procedures commonly create temp tables.
        S::Call(_) => Analysis::Ddl(DdlInfo {
            scope: DdlScope::Database(FlushReason::Procedural),
            creates_temp: true,
        }),

        // Rows come back in another order: what a read without ORDER BY shows changes.
        S::Vacuum(v) if v.full || v.recluster => flush(FlushReason::Rewrite),
        S::StartTransaction { .. }
        | S::Commit { .. }
        | S::Rollback { .. }
        | S::Savepoint { .. }
        | S::ReleaseSavepoint { .. }
        | S::Set(_)
        | S::ShowVariable { .. }
        | S::ShowVariables { .. }
        | S::ShowStatus { .. }
        | S::Discard { .. }
        | S::LISTEN { .. }
        | S::UNLISTEN { .. }
        | S::NOTIFY { .. }
        | S::Deallocate { .. }
        | S::Prepare { .. }
        | S::Fetch { .. }
        | S::Close { .. }
        | S::Vacuum(_)
        | S::Analyze { .. }
        | S::Comment { .. }
        | S::AlterIndex { .. } => Analysis::Other,

        _ => flush(FlushReason::Unrecognised),
    }
}

fn flush(reason: FlushReason) -> Analysis {
    Analysis::Ddl(DdlInfo {
        scope: DdlScope::Database(reason),
        creates_temp: false,
    })
}

/// DDL on named relations; flush if a name is not a plain identifier path.
fn tables<'a>(names: impl IntoIterator<Item = &'a ObjectName>) -> Analysis {
    match names.into_iter().map(table_ref).collect::<Option<Vec<_>>>() {
        Some(tables) => Analysis::Ddl(DdlInfo {
            scope: DdlScope::Tables(tables),
            creates_temp: false,
        }),
        None => flush(FlushReason::Unrecognised),
    }
}

fn wide_writes<'a>(names: impl IntoIterator<Item = &'a ObjectName>) -> Analysis {
    let writes = names.into_iter().map(|name| {
        table_ref(name).map(|table| TableWrite {
            table,
            effect: WriteEffect::Wide,
        })
    });
    match writes.collect::<Option<Vec<_>>>() {
        Some(tables) => Analysis::Write(WriteInfo {
            tables,
            hidden_writes: false,
        }),
        None => flush(FlushReason::Unrecognised),
    }
}

/// A new relation: temp ones are private to the session (the caller stops caching for it);
/// others may shadow a same-named relation on some search_path, so they flush.
fn create_relation(temporary: bool, name: &ObjectName) -> Analysis {
    match (temporary, table_ref(name)) {
        (true, Some(table)) => Analysis::Ddl(DdlInfo {
            scope: DdlScope::Tables(vec![table]),
            creates_temp: true,
        }),
        (false, Some(_)) => flush(FlushReason::NewRelation),
        (_, None) => flush(FlushReason::Unrecognised),
    }
}

fn drop(object_type: ObjectType, names: &[ObjectName], cascade: bool) -> Analysis {
    match object_type {
        // CASCADE also drops dependent views and constraints the text does not name.
        _ if cascade => flush(FlushReason::Cascade),
        ObjectType::Table | ObjectType::View | ObjectType::MaterializedView => tables(names),
        // Without CASCADE these cannot be in use by a relation's data.
        ObjectType::Index | ObjectType::Sequence => Analysis::Other,
        ObjectType::Role | ObjectType::User => flush(FlushReason::Role),
        _ => flush(FlushReason::Unrecognised),
    }
}

/// `EXPLAIN (ANALYZE)` / `(ANALYZE true)` runs the statement; `(ANALYZE false)` does not.
fn is_analyze_option(option: &UtilityOption) -> bool {
    if !option.name.value.eq_ignore_ascii_case("analyze") {
        return false;
    }
    let off = match &option.arg {
        None => false,
        Some(Expr::Value(v)) => match &v.value {
            Value::Boolean(b) => !b,
            Value::Number(n, _) => n == "0",
            Value::SingleQuotedString(s) => matches!(
                s.to_ascii_lowercase().as_str(),
                "off" | "false" | "0" | "no"
            ),
            _ => false,
        },
        Some(Expr::Identifier(ident)) => {
            matches!(
                ident.value.to_ascii_lowercase().as_str(),
                "off" | "false" | "no"
            )
        }
        Some(_) => false,
    };
    !off
}

/// For statements that run a query without caching it (a cursor, COPY TO, EXPLAIN ANALYZE):
/// its writes if any, else the bypass reason if it calls a function that may write (the
/// transaction must then stop trusting the cache), else `Other`.
fn writer_call(statement: &Statement, funcs: &dyn FunctionVolatility) -> Analysis {
    match super::read::classify(statement, funcs) {
        effect @ (Analysis::Write(_) | Analysis::Ddl(_)) => effect,
        Analysis::Bypass(r) if r.may_write() => Analysis::Bypass(r),
        _ => Analysis::Other,
    }
}
