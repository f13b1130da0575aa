//! Whether a database has what a change source needs from `pgstash migrate up`, asked of the
//! system catalogs only: every role may read those (schema `pgstash` grants nothing), so a
//! source can check with whatever role it connects as.
//!
//! Both sources need the DDL hooks of migration 0002, the event triggers, enabled: they
//! report DDL and REFRESH MATERIALIZED VIEW. The NOTIFY source also needs the statement
//! trigger `pgstash_notify`, enabled, on every user table, or writes to that table go
//! unheard; switching the row triggers off (`pgstash.set_row_triggers(false)`, migration
//! 0003) takes them all away. The WAL source reads writes from the stream instead, but needs
//! migration 0003, whose hooks also write what they report into the WAL.
//!
//! The check is one query with the simple protocol; its row (text values) is judged by
//! [`verdict`], so the NOTIFY source (tokio-postgres) and the WAL source (its own protocol
//! client) share both.

use std::fmt;

/// Which source asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Notify,
    Wal,
}

/// What keeps a source from vouching for a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// This migration is not applied (nor, maybe, the ones after it).
    Migration(i32),
    /// The event triggers of migration 0002 are gone or disabled: DDL goes unreported.
    Hooks,
    /// NOTIFY only: user tables without an enabled `pgstash_notify` trigger.
    RowTriggers { tables: i64, example: String },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Migration(version) => {
                let stem = crate::migrate::find(*version)
                    .map_or_else(|| format!("{version:04}"), |m| m.file_stem());
                write!(
                    f,
                    "migration {stem} is not applied: run `pgstash migrate up` against it \
                     (as a superuser)"
                )
            }
            Missing::Hooks => f.write_str(
                "pgstash's event triggers pgstash_ddl_command_end and pgstash_sql_drop are \
                 missing or disabled, so DDL is not reported: enable them with ALTER EVENT \
                 TRIGGER ... ENABLE, or recreate them as migrations/0002_notify_triggers.up.sql \
                 does",
            ),
            Missing::RowTriggers { tables, example } => write!(
                f,
                "{tables} table(s), {example} among them, have no enabled pgstash_notify \
                 trigger, so writes to them are not reported (the row triggers are switched \
                 off, or were removed): switch them on with `SELECT \
                 pgstash.set_row_triggers(true)` in that database, as a superuser, after \
                 `pgstash migrate up`"
            ),
        }
    }
}

/// 0002 applied, 0003 applied, both event triggers enabled. 'R' (replica-only) and 'D'
/// (disabled) event triggers do not fire in ordinary sessions.
macro_rules! common_columns {
    () => {
        "EXISTS (SELECT 1 FROM pg_catalog.pg_proc p
                   JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
                  WHERE n.nspname = 'pgstash' AND p.proname = 'notify_change'),
         EXISTS (SELECT 1 FROM pg_catalog.pg_proc p
                   JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
                  WHERE n.nspname = 'pgstash' AND p.proname = 'set_row_triggers'),
         (SELECT count(*) FROM pg_catalog.pg_event_trigger
           WHERE evtname IN ('pgstash_ddl_command_end', 'pgstash_sql_drop')
             AND evtenabled IN ('O', 'A')) = 2"
    };
}

/// How many user tables lack an enabled row trigger, and one of them. "User tables" as
/// `pgstash.user_relations` (migration 0002) has them, tables ('r', 'p') only: the ones
/// `pgstash.ensure_trigger` equips.
macro_rules! notify_columns {
    () => {
        ", u.missing, u.example
           FROM (SELECT count(*) AS missing,
                        min(format('%I.%I', n.nspname, c.relname)) AS example
                   FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p')
                    AND c.relpersistence <> 't'
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgstash')
                    AND n.nspname NOT LIKE 'pg\\_toast%'
                    AND n.nspname NOT LIKE 'pg\\_temp\\_%'
                    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                                     WHERE t.tgrelid = c.oid AND t.tgname = 'pgstash_notify'
                                       AND t.tgenabled IN ('O', 'A'))) u"
    };
}

/// The WAL source does not need the row triggers; the same shape keeps [`verdict`] simple.
/// Cheap enough for every heartbeat: a few catalog index lookups.
macro_rules! wal_columns {
    () => {
        ", 0, NULL"
    };
}

/// The check for `source`: one row of text values for [`verdict`].
pub(super) fn sql(source: Source) -> &'static str {
    match source {
        Source::Notify => concat!("SELECT ", common_columns!(), notify_columns!()),
        Source::Wal => concat!("SELECT ", common_columns!(), wal_columns!()),
    }
}

/// The WAL check's columns, to add to a query of one's own (the WAL heartbeat's), last.
pub(super) const WAL_COLUMNS: &str = concat!(common_columns!(), wal_columns!());

/// What the check's row says is missing (`None`: nothing). An error for a row that is not
/// what the query returns.
pub(super) fn verdict(source: Source, row: &[Option<&str>]) -> Result<Option<Missing>, String> {
    let bad = || format!("unexpected answer to the installation check: {row:?}");
    let [has_0002, has_0003, hooks, missing, example] = row else {
        return Err(bad());
    };
    let flag = |v: &Option<&str>| match v {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        _ => Err(bad()),
    };
    let (has_0002, has_0003, hooks) = (flag(has_0002)?, flag(has_0003)?, flag(hooks)?);
    let missing: i64 = missing.and_then(|m| m.parse().ok()).ok_or_else(bad)?;
    Ok(if !has_0002 {
        Some(Missing::Migration(2))
    } else if source == Source::Wal && !has_0003 {
        Some(Missing::Migration(3))
    } else if !hooks {
        Some(Missing::Hooks)
    } else if source == Source::Notify && missing > 0 {
        Some(Missing::RowTriggers {
            tables: missing,
            example: example.unwrap_or("?").to_owned(),
        })
    } else {
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(v: &[&'a str]) -> Vec<Option<&'a str>> {
        v.iter().map(|s| (*s != "NULL").then_some(*s)).collect()
    }

    #[test]
    fn each_source_needs_its_migrations_and_enabled_hooks() {
        let all = row(&["t", "t", "t", "0", "NULL"]);
        for source in [Source::Notify, Source::Wal] {
            assert_eq!(verdict(source, &all), Ok(None));
            assert_eq!(
                verdict(source, &row(&["f", "f", "f", "0", "NULL"])),
                Ok(Some(Missing::Migration(2)))
            );
            assert_eq!(
                verdict(source, &row(&["t", "t", "f", "0", "NULL"])),
                Ok(Some(Missing::Hooks))
            );
        }
        let without_0003 = row(&["t", "f", "t", "0", "NULL"]);
        assert_eq!(verdict(Source::Notify, &without_0003), Ok(None));
        assert_eq!(
            verdict(Source::Wal, &without_0003),
            Ok(Some(Missing::Migration(3)))
        );
    }

    #[test]
    fn only_the_notify_source_needs_the_row_triggers() {
        let unwatched = row(&["t", "t", "t", "2", "public.t"]);
        assert_eq!(
            verdict(Source::Notify, &unwatched),
            Ok(Some(Missing::RowTriggers {
                tables: 2,
                example: "public.t".into()
            }))
        );
        assert_eq!(verdict(Source::Wal, &unwatched), Ok(None));
    }

    #[test]
    fn messages_say_what_to_run() {
        let m = Missing::Migration(3).to_string();
        assert!(
            m.contains("0003_wal_source") && m.contains("pgstash migrate up"),
            "{m}"
        );
        let r = Missing::RowTriggers {
            tables: 1,
            example: "public.t".into(),
        }
        .to_string();
        assert!(
            r.contains("public.t") && r.contains("pgstash.set_row_triggers(true)"),
            "{r}"
        );
    }

    #[test]
    fn answers_of_another_shape_are_errors() {
        for bad in [
            row(&["t", "t", "t", "0"]),
            row(&["yes", "t", "t", "0", "NULL"]),
            row(&["t", "t", "t", "NULL", "NULL"]),
            row(&["t", "t", "t", "many", "NULL"]),
        ] {
            assert!(verdict(Source::Notify, &bad).is_err(), "{bad:?}");
        }
    }
}
