//! What a payload from pgstash's triggers means. Two formats: the JSON object of
//! `migrations/0002_notify_triggers.up.sql` (described at the top of that file), which the
//! DDL hooks send, and the compact line of `migrations/0006_compact_notify_payload.up.sql`,
//! which the row trigger sends. The NOTIFY source reads both from notifications; the WAL
//! source reads the DDL hooks' JSON from the logical decoding messages they also write
//! since migration 0003.

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
    /// Identifies the writing transaction among those of the sending backend, to keep its
    /// changes together: the xid in JSON payloads, the transaction's start in compact ones.
    pub tx: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum PayloadError {
    #[error("not a pgstash payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported payload version {0}")]
    Version(u32),
    #[error("malformed compact payload: {0}")]
    Compact(&'static str),
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
    match text.strip_prefix("2 ") {
        Some(rest) => parse_compact(rest),
        None => parse_json(text),
    }
}

/// `<op> <ts> <schema>.<table>`, each name as `quote_ident` prints it.
fn parse_compact(text: &str) -> Result<Payload, PayloadError> {
    let (op, rest) = text
        .split_once(' ')
        .ok_or(PayloadError::Compact("no time"))?;
    let (ts, names) = rest
        .split_once(' ')
        .ok_or(PayloadError::Compact("no table"))?;
    let secs: f64 = ts.parse().map_err(|_| PayloadError::Compact("bad time"))?;
    let (schema, rest) = unquote_ident(names)?;
    let rest = rest
        .strip_prefix('.')
        .ok_or(PayloadError::Compact("no dot after the schema"))?;
    let (name, rest) = unquote_ident(rest)?;
    if !rest.is_empty() {
        return Err(PayloadError::Compact("text after the table"));
    }
    let table = TableRef { schema, name };
    let meaning = match op {
        "TRUNCATE" => Meaning::Change(Change::Table(table)),
        "INSERT" | "UPDATE" | "DELETE" => Meaning::Change(Change::Rows { table, keys: None }),
        _ => return Err(PayloadError::Kind(op.to_owned())),
    };
    Ok(Payload {
        meaning,
        at: epoch_seconds(secs),
        tx: Some(ts.to_owned()),
    })
}

/// One name as `quote_ident` prints it, and what follows it. Unquoted, it is the name as
/// it stands: quote_ident leaves only names of lower-case ASCII letters, digits and
/// underscores (not starting with a digit) unquoted, so anything else ends it. Quoted,
/// inner quotes are doubled.
fn unquote_ident(text: &str) -> Result<(String, &str), PayloadError> {
    let Some(quoted) = text.strip_prefix('"') else {
        let end = text
            .find(|c: char| !matches!(c, 'a'..='z' | '0'..='9' | '_'))
            .unwrap_or(text.len());
        if end == 0 || text.as_bytes()[0].is_ascii_digit() {
            return Err(PayloadError::Compact("not a name"));
        }
        return Ok((text[..end].to_owned(), &text[end..]));
    };
    let mut name = String::new();
    let mut rest = quoted;
    loop {
        let at = rest
            .find('"')
            .ok_or(PayloadError::Compact("unterminated quoted name"))?;
        name.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        match rest.strip_prefix('"') {
            Some(after) => {
                name.push('"');
                rest = after;
            }
            None => return Ok((name, rest)),
        }
    }
}

fn parse_json(text: &str) -> Result<Payload, PayloadError> {
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
        tx: wire.xid,
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
        assert_eq!(p.tx.as_deref(), Some("729"));
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
        assert_eq!(p.tx, None);
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
    fn compact_payloads_mean_rows_or_the_whole_table() {
        let p = parse("2 UPDATE 1796209028.019654 public.pgbench_branches").expect("valid");
        assert_eq!(
            p.meaning,
            Meaning::Change(Change::Rows {
                table: t("public", "pgbench_branches"),
                keys: None
            })
        );
        assert_eq!(p.tx.as_deref(), Some("1796209028.019654"));
        let micros =
            p.at.expect("a time")
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("after the epoch")
                .as_micros();
        assert_eq!(micros, 1_796_209_028_019_654);
        for op in ["INSERT", "DELETE"] {
            let p = parse(&format!("2 {op} 1.5 s.t")).expect("valid");
            assert!(
                matches!(p.meaning, Meaning::Change(Change::Rows { .. })),
                "{op}"
            );
        }
        let p = parse("2 TRUNCATE 1796209028 s.t").expect("valid");
        assert_eq!(p.meaning, Meaning::Change(Change::Table(t("s", "t"))));
    }

    #[test]
    fn compact_payloads_read_names_as_quote_ident_prints_them() {
        // What quote_ident gives for the schema `My "Schema" \` and the table `a.b "c"`,
        // a keyword, upper case, a space and a tab.
        let p = parse(r#"2 INSERT 1.0 "My ""Schema"" \"."a.b ""c""""#).expect("valid");
        assert_eq!(
            p.meaning,
            Meaning::Change(Change::Rows {
                table: t(r#"My "Schema" \"#, r#"a.b "c""#),
                keys: None
            })
        );
        for (text, schema, name) in [
            (r#"2 INSERT 1 public."user""#, "public", "user"),
            (r#"2 INSERT 1 "Public"."Tab""#, "Public", "Tab"),
            ("2 INSERT 1 _s1.t_2", "_s1", "t_2"),
            ("2 INSERT 1 s.\"été\"", "s", "été"),
            ("2 INSERT 1 s.\"tab\tbed\"", "s", "tab\tbed"),
            (r#"2 INSERT 1 "".t"#, "", "t"),
        ] {
            let p = parse(text).expect(text);
            assert_eq!(
                p.meaning,
                Meaning::Change(Change::Rows {
                    table: t(schema, name),
                    keys: None
                }),
                "{text}"
            );
        }
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
            "2 ",
            "2 UPDATE",
            "2 UPDATE 1.5",
            "2 UPDATE 1.5 t",
            "2 UPDATE now s.t",
            "2 MERGE 1.5 s.t",
            "2 UPDATE 1.5 .t",
            "2 UPDATE 1.5 s.",
            "2 UPDATE 1.5 s.t.u",
            r#"2 UPDATE 1.5 "s.t"#,
            r#"2 UPDATE 1.5 "s"t.u"#,
            "2 UPDATE 1.5 s.t ",
            "2 UPDATE 1.5 S.t",
            "2 UPDATE 1.5 1s.t",
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
