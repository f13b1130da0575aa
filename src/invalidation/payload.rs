//! What a payload from the triggers of `migrations/0002_notify_triggers.up.sql` means (the
//! format is described at the top of that file). The NOTIFY source reads it from
//! notifications; the WAL source from the logical decoding messages that the DDL hooks
//! also write since migration 0003.

use super::{Change, TableRef};
use serde::Deserialize;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Meaning {
    Change(Change),
    /// The triggers were removed (down migration): nothing reports writes any more.
    Uninstalled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Payload {
    pub meaning: Meaning,
    /// No later than the change: the writing transaction's start for the row trigger of
    /// migrations 0004 and 0005 (its first write to the table under 0002's), the time of
    /// the command for the DDL hooks. Staleness measured from it is an upper bound.
    pub at: Option<SystemTime>,
    /// The writing transaction, to keep its changes together.
    pub xid: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum PayloadError {
    #[error("not a pgstash payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported payload version {0}")]
    Version(u32),
    #[error("unknown kind {0:?}")]
    Kind(String),
    #[error("kind {0:?} without schema and table")]
    MissingTable(String),
}

/// The payload as the triggers write it; fields this version does not use are ignored.
#[derive(Deserialize)]
struct Wire {
    v: u32,
    kind: String,
    schema: Option<String>,
    table: Option<String>,
    ts: Option<f64>,
    xid: Option<String>,
}

pub(super) fn parse(text: &str) -> Result<Payload, PayloadError> {
    let wire: Wire = serde_json::from_str(text)?;
    if wire.v != 1 {
        return Err(PayloadError::Version(wire.v));
    }
    let table = || match (&wire.schema, &wire.table) {
        (Some(schema), Some(name)) => Ok(TableRef {
            schema: schema.clone(),
            name: name.clone(),
        }),
        _ => Err(PayloadError::MissingTable(wire.kind.clone())),
    };
    let meaning = match wire.kind.as_str() {
        "rows" => Meaning::Change(Change::Rows {
            table: table()?,
            keys: None,
        }),
        "table" => Meaning::Change(Change::Table(table()?)),
        "database" => Meaning::Change(Change::Database),
        "uninstalled" => Meaning::Uninstalled,
        other => return Err(PayloadError::Kind(other.to_owned())),
    };
    Ok(Payload {
        meaning,
        at: wire.ts.and_then(epoch_seconds),
        xid: wire.xid,
    })
}

/// Seconds since the Unix epoch (microsecond precision, as Postgres keeps time) as a time;
/// `None` for what cannot be one. Rounded to whole microseconds: today's epoch in
/// microseconds is far below 2^53, so that undoes the binary fraction's error exactly.
fn epoch_seconds(secs: f64) -> Option<SystemTime> {
    let micros = (secs * 1e6).round();
    if !(0.0..=u64::MAX as f64).contains(&micros) {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_micros(micros as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, name: &str) -> TableRef {
        TableRef {
            schema: schema.into(),
            name: name.into(),
        }
    }

    #[test]
    fn dml_payloads_mean_unknown_rows_of_their_table() {
        // Exactly what Postgres' json_build_object prints, spaces included.
        let p = parse(
            r#"{"v" : 1, "kind" : "rows", "op" : "UPDATE", "schema" : "public", "table" : "pre", "ts" : 1795440571.859492, "xid" : "729"}"#,
        )
        .expect("valid payload");
        assert_eq!(
            p.meaning,
            Meaning::Change(Change::Rows {
                table: t("public", "pre"),
                keys: None
            })
        );
        assert_eq!(p.xid.as_deref(), Some("729"));
        let at = p.at.expect("a time");
        let micros = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after the epoch")
            .as_micros();
        assert_eq!(micros, 1_795_440_571_859_492);
    }

    #[test]
    fn table_payloads_keep_names_that_need_quoting_verbatim() {
        let p = parse(
            r#"{"v":1,"kind":"table","op":"ALTER TABLE","schema":"My \"Schema\"","table":"a.b c\\d","ts":1.5,"xid":null}"#,
        )
        .expect("valid payload");
        assert_eq!(
            p.meaning,
            Meaning::Change(Change::Table(t("My \"Schema\"", "a.b c\\d")))
        );
        assert_eq!(p.xid, None);
    }

    #[test]
    fn database_and_uninstalled_payloads_need_no_table() {
        let db = parse(r#"{"v":1,"kind":"database","op":"GRANT","schema":null,"table":null,"ts":1.0,"xid":"5"}"#)
            .expect("valid payload");
        assert_eq!(db.meaning, Meaning::Change(Change::Database));
        let gone = parse(r#"{"v":1,"kind":"uninstalled","op":"pgstash migrate down","schema":null,"table":null,"ts":1.0,"xid":null}"#)
            .expect("valid payload");
        assert_eq!(gone.meaning, Meaning::Uninstalled);
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for bad in [
            "",
            "hello",
            r#"{"kind":"rows","schema":"s","table":"t"}"#,
            r#"{"v":2,"kind":"rows","schema":"s","table":"t"}"#,
            r#"{"v":1,"kind":"rows","schema":"s"}"#,
            r#"{"v":1,"kind":"table","table":"t"}"#,
            r#"{"v":1,"kind":"everything"}"#,
            r#"{"v":1,"kind":"rows","schema":1,"table":"t"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn impossible_times_are_dropped_not_errors() {
        for ts in ["-1", "1e300"] {
            let p =
                parse(&format!(r#"{{"v":1,"kind":"database","ts":{ts}}}"#)).expect("valid payload");
            assert_eq!(p.at, None, "ts {ts}");
        }
    }
}
