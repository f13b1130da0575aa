//! What a statement does to session state, as far as the pooler is concerned.

use super::scan::{call_args, contains_ignore_case, first_word, leading_words, statements};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A session-level `SET`: the statement text, replayed verbatim on other connections,
    /// keyed by the parameter it sets so a later `SET` of the same one replaces it.
    Set {
        key: String,
        stmt: String,
    },
    /// `RESET name`: forget our `SET` of it (the startup value or default comes back).
    Reset {
        key: String,
    },
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL` / `DEALLOCATE ALL`: settings and/or prepared statements are gone.
    DiscardAll,
    DeallocateAll,
    /// Session state that lives only in this server connection (temp tables, session advisory
    /// locks, LISTEN, WITH HOLD cursors, SQL PREPARE): the client must keep it.
    Pin(&'static str),
    /// A setting changed for the current transaction only, in a way the cache key does not
    /// follow (`set_config(..., true)`): the cache is bypassed until the transaction ends.
    TxSetting,
}

/// The session effects of every statement in a query string, in order.
pub fn effects_of(sql: &str) -> Vec<Effect> {
    let mut out = Vec::new();
    for stmt in statements(sql) {
        if let Some(e) = effect_of(stmt) {
            out.push(e);
        }
    }
    out
}

fn effect_of(stmt: &str) -> Option<Effect> {
    // Hot path: most statements are SELECT/INSERT/UPDATE/DELETE with nothing to track; decide
    // those from the first word and a scan that allocates nothing.
    let first = first_word(stmt).unwrap_or("");
    if ![
        "set",
        "reset",
        "discard",
        "deallocate",
        "listen",
        "prepare",
        "do",
        "create",
        "declare",
    ]
    .iter()
    .any(|k| first.eq_ignore_ascii_case(k))
    {
        if contains_ignore_case(stmt, b"advisory_lock") {
            let lower = stmt.to_ascii_lowercase();
            if lower.contains("pg_advisory_lock") || lower.contains("pg_try_advisory_lock") {
                return Some(Effect::Pin("session advisory lock"));
            }
        }
        if contains_ignore_case(stmt, b"into temp") {
            return Some(Effect::Pin("temporary table"));
        }
        if contains_ignore_case(stmt, b"set_config") {
            return set_config_effect(stmt);
        }
        return None;
    }
    let w = leading_words(stmt, 4);
    let word = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    match word(0) {
        "set" => set_effect(stmt, &w),
        "reset" => Some(match word(1) {
            "all" => Effect::ResetAll,
            "session" if word(2) == "authorization" => Effect::Reset {
                key: "session_authorization".into(),
            },
            "time" => Effect::Reset {
                key: "timezone".into(),
            },
            k => Effect::Reset { key: k.into() },
        }),
        "discard" if word(1) == "all" => Some(Effect::DiscardAll),
        "discard" if word(1) == "temp" || word(1) == "temporary" => None,
        "deallocate" if word(1) == "all" || (word(1) == "prepare" && word(2) == "all") => {
            Some(Effect::DeallocateAll)
        }
        "listen" => Some(Effect::Pin("LISTEN")),
        "prepare" => Some(Effect::Pin("SQL PREPARE")),
        "create" if is_temp_create(&w) => Some(Effect::Pin("temporary table")),
        "declare" if contains_words(stmt, "with hold") => Some(Effect::Pin("WITH HOLD cursor")),
        // A DO block can SET (or set_config) for the session in ways no statement text we
        // relay shows; "set" anywhere in it is enough to keep its connection.
        "do" if contains_ignore_case(stmt, b"set") => {
            Some(Effect::Pin("DO block that may change settings"))
        }
        _ => None,
    }
}

/// `set_config(name, value, is_local)` changes a setting without a `SET` statement, so the
/// pooler cannot replay it and the cache key cannot carry it. A session-wide change keeps
/// the client on its server connection (which is discarded afterwards, never handed to
/// anyone else); a change for the transaction only makes the rest of the transaction
/// bypass the cache. Only a literal `true` counts as local: `$3` or an expression might not be.
fn set_config_effect(stmt: &str) -> Option<Effect> {
    let calls = call_args(stmt, "set_config");
    if calls.is_empty() {
        // The name, but not as a call (a string, a column): nothing to follow.
        return None;
    }
    let all_local = calls.iter().all(
        |c| matches!(c, Some(args) if args.len() == 3 && args[2].eq_ignore_ascii_case("true")),
    );
    Some(if all_local {
        Effect::TxSetting
    } else {
        Effect::Pin("set_config")
    })
}

fn is_temp_create(w: &[String]) -> bool {
    let next: Vec<&str> = w.iter().skip(1).map(String::as_str).collect();
    matches!(
        next.as_slice(),
        ["temp" | "temporary", ..] | ["local" | "global", "temp" | "temporary", ..]
    ) || (next.first() == Some(&"or") && next.iter().any(|x| *x == "temp" || *x == "temporary"))
}

fn contains_words(stmt: &str, phrase: &str) -> bool {
    let norm: String = stmt
        .to_ascii_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    norm.contains(phrase)
}

fn set_effect(stmt: &str, w: &[String]) -> Option<Effect> {
    let word = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    // SET LOCAL and transaction-scoped forms end with the transaction: nothing to carry.
    let (base, i) = if word(1) == "session" { (2, 2) } else { (1, 1) };
    let key = match word(i) {
        "local" | "transaction" | "constraints" => return None,
        "characteristics" => "session_characteristics".to_string(),
        "time" if word(i + 1) == "zone" => "timezone".into(),
        "authorization" if base == 2 => "session_authorization".into(),
        "names" => "client_encoding".into(),
        "schema" => "search_path".into(),
        "" => return None,
        k => k.to_string(),
    };
    Some(Effect::Set {
        key,
        stmt: stmt.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_set_is_tracked_and_local_set_is_not() {
        assert_eq!(
            effects_of("SET search_path TO app, public; SET LOCAL work_mem = '1MB'"),
            vec![Effect::Set {
                key: "search_path".into(),
                stmt: "SET search_path TO app, public".into()
            }]
        );
        assert_eq!(
            effects_of("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            vec![]
        );
        assert!(
            matches!(&effects_of("set time zone 'UTC'")[0], Effect::Set { key, .. } if key == "timezone")
        );
        assert!(
            matches!(&effects_of("SET SESSION AUTHORIZATION bob")[0], Effect::Set { key, .. } if key == "session_authorization")
        );
    }

    #[test]
    fn reset_forms() {
        assert_eq!(effects_of("RESET ALL"), vec![Effect::ResetAll]);
        assert_eq!(
            effects_of("reset statement_timeout"),
            vec![Effect::Reset {
                key: "statement_timeout".into()
            }]
        );
        assert_eq!(effects_of("DISCARD ALL"), vec![Effect::DiscardAll]);
    }

    #[test]
    fn connection_bound_features_pin() {
        for sql in [
            "CREATE TEMP TABLE t (a int)",
            "create temporary table t (a int)",
            "CREATE LOCAL TEMPORARY TABLE t (a int)",
            "SELECT pg_advisory_lock(1)",
            "select pg_try_advisory_lock(1)",
            "LISTEN chan",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "PREPARE p AS SELECT 1",
        ] {
            assert!(
                matches!(effects_of(sql).as_slice(), [Effect::Pin(_)]),
                "{sql}"
            );
        }
        assert_eq!(effects_of("SELECT pg_advisory_xact_lock(1)"), vec![]);
        assert_eq!(effects_of("SELECT 'LISTEN x'"), vec![]);
        assert_eq!(effects_of("CREATE TABLE temp (a int)"), vec![]);
    }

    #[test]
    fn set_config_pins_unless_every_call_is_transaction_local() {
        for sql in [
            "SELECT set_config('search_path', 'a', false)",
            "select pg_catalog.SET_CONFIG('role', 'bob', $3)",
            "SELECT set_config('a', 'b', true), set_config('c', 'd', false)",
            "SELECT set_config('a', 'b'",
            "DO $$ BEGIN PERFORM set_config('search_path', 'a', false); END $$",
            "do $$ begin execute 'SET search_path = a'; end $$",
        ] {
            assert!(
                matches!(effects_of(sql).as_slice(), [Effect::Pin(_)]),
                "{sql}"
            );
        }
        assert_eq!(
            effects_of(
                "SELECT set_config('search_path', 'a,b', TRUE), set_config('x.y', '1', true)"
            ),
            vec![Effect::TxSetting]
        );
        assert_eq!(
            effects_of("SELECT 'set_config(1, 2, false)' AS s"),
            vec![Effect::Pin("set_config")]
        );
        assert_eq!(effects_of("SELECT set_config_count FROM t"), vec![]);
        assert_eq!(effects_of("DO $$ BEGIN RAISE NOTICE 'hi'; END $$"), vec![]);
    }
}
