//! What a statement does to session state, as far as the pooler is concerned.

use super::scan::{
    Needles, Tok, call_args, contains_ignore_case, dotted_name, first_word, leading_words,
    standalone_words, statements, tokens,
};

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
    /// `SAVEPOINT name`, `RELEASE name`, `ROLLBACK TO name` (names folded): a rollback to a
    /// savepoint undoes the `SET`s made after it, and only those.
    Savepoint(String),
    Release(String),
    RollbackTo(String),
    /// A setting changed for the current transaction only, in a way the cache key does not
    /// follow (`set_config(..., true)`): the cache is bypassed until the transaction ends.
    TxSetting,
}

/// The session effects of every statement in a query string, in order.
pub fn effects_of(sql: &str) -> Vec<Effect> {
    // Hot path: one statement with nothing to track, decided without the splitter's scan
    // for quotes and comments. With no `;` but at its end, the text is one statement (or
    // none), whether that `;` ends it or sits in a comment or an unclosed quote: that
    // statement is the text, bar blanks and maybe the `;`, which neither the first word nor
    // the words [`surely_no_effect`] looks for can hold.
    let b = sql.as_bytes();
    let one_statement = match memchr::memchr(b';', b) {
        None => true,
        Some(i) => b[i + 1..].iter().all(u8::is_ascii_whitespace),
    };
    if one_statement && surely_no_effect(sql) {
        return Vec::new();
    }
    // Most statements have no effect: the Vec then never allocates.
    statements(sql).filter_map(effect_of).collect()
}

/// Whether `stmt` surely has no session effect: most statements are SELECT/INSERT/UPDATE/
/// DELETE with nothing to track, told by their first word and one scan that allocates
/// nothing. `false`: [`effect_of`] must look closer.
fn surely_no_effect(stmt: &str) -> bool {
    !starts_tracked(stmt) && !EFFECT_WORDS.any_in(stmt)
}

/// Whether `text` holds one of the words whose absence (with a first word `effect_of` does
/// not read in full) proves a statement free of session effects. Letters, `_` and a space
/// only: a literal shape's text and its literals hold one iff the text they stand for does.
pub fn mentions_effect_words(text: &str) -> bool {
    EFFECT_WORDS.any_in(text)
}

/// Each check of `effect_of` for statements it does not read in full starts with one of
/// these words: one pass rules them all out.
static EFFECT_WORDS: Needles = Needles::new(&[
    b"advisory_lock",
    b"into temp",
    b"pg_temp",
    b"set_config",
    b"pg_settings",
]);

/// Whether `stmt`'s first word is one of the statements `effect_of` reads in full.
fn starts_tracked(stmt: &str) -> bool {
    let first = first_word(stmt).unwrap_or("");
    // Bucketed by first letter: every forwarded statement asks, and most start with a word
    // (SELECT, UPDATE, INSERT, BEGIN...) that two comparisons at most rule out.
    let candidates: &[&str] = match first.as_bytes().first().map(u8::to_ascii_lowercase) {
        Some(b'a') => &["abort"],
        Some(b'c') => &["create"],
        Some(b'd') => &["discard", "deallocate", "do", "declare"],
        Some(b'l') => &["listen"],
        Some(b'p') => &["prepare"],
        Some(b'r') => &["reset", "release", "rollback"],
        Some(b's') => &["set", "savepoint"],
        _ => &[],
    };
    candidates.iter().any(|k| first.eq_ignore_ascii_case(k))
}

fn effect_of(stmt: &str) -> Option<Effect> {
    if !starts_tracked(stmt) {
        if !EFFECT_WORDS.any_in(stmt) {
            return None;
        }
        if contains_ignore_case(stmt, b"advisory_lock") {
            let lower = stmt.to_ascii_lowercase();
            if lower.contains("pg_advisory_lock") || lower.contains("pg_try_advisory_lock") {
                return Some(Effect::Pin("session advisory lock"));
            }
        }
        if contains_ignore_case(stmt, b"into temp") {
            return Some(Effect::Pin("temporary table"));
        }
        if names_temp_schema(stmt) {
            return Some(Effect::Pin("temporary schema"));
        }
        if contains_ignore_case(stmt, b"set_config") {
            return set_config_effect(stmt);
        }
        // pg_settings is a view whose UPDATE runs set_config().
        if contains_ignore_case(stmt, b"pg_settings") && contains_ignore_case(stmt, b"update") {
            return Some(Effect::Pin("UPDATE of pg_settings"));
        }
        return None;
    }
    // The session's temporary schema named outright: `CREATE TABLE pg_temp.t`, or a
    // search_path that puts it first, so that a plain CREATE TABLE makes a temp table.
    if names_temp_schema(stmt) {
        return Some(Effect::Pin("temporary schema"));
    }
    let toks = tokens(stmt, 8);
    let tword = |i: usize| match toks.get(i) {
        Some(Tok::Word(w)) => w.as_str(),
        _ => "",
    };
    match tword(0) {
        "set" => return Some(set_effect(stmt, &toks)),
        "reset" => return Some(reset_effect(&toks)),
        "savepoint" => return Some(savepoint_effect(&toks, 1, Effect::Savepoint)),
        "release" => {
            let at = if tword(1) == "savepoint" { 2 } else { 1 };
            return Some(savepoint_effect(&toks, at, Effect::Release));
        }
        "rollback" | "abort" => {
            // ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name
            let mut at = 1;
            if matches!(tword(at), "work" | "transaction") {
                at += 1;
            }
            if tword(at) != "to" {
                return None;
            }
            at += 1;
            if tword(at) == "savepoint" {
                at += 1;
            }
            return Some(savepoint_effect(&toks, at, Effect::RollbackTo));
        }
        _ => {}
    }
    let w = leading_words(stmt, 4);
    let word = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    match word(0) {
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
    if calls.len() < standalone_words(stmt, b"set_config") {
        // Written some other way (`"set_config"(...)`, a comment before the parenthesis):
        // maybe a call whose arguments are not readable here.
        return Some(Effect::Pin("set_config"));
    }
    if calls.is_empty() {
        // Only inside longer identifiers (`set_config_count`): nothing to follow.
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

/// Whether `stmt` names the temporary schema: `pg_temp` or `pg_temp_<n>` as a name of its
/// own (`pg_temp.t`, `search_path = pg_temp, public`, `'pg_temp'`), not inside a longer
/// one (`jpg_template`).
fn names_temp_schema(stmt: &str) -> bool {
    if !contains_ignore_case(stmt, b"pg_temp") {
        return false;
    }
    let b = stmt.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    (0..b.len().saturating_sub(6)).any(|i| {
        if !b[i..i + 7].eq_ignore_ascii_case(b"pg_temp") || (i > 0 && ident(b[i - 1])) {
            return false;
        }
        let mut j = i + 7;
        if b.get(j) == Some(&b'_') && b.get(j + 1).is_some_and(u8::is_ascii_digit) {
            j += 1;
            while b.get(j).is_some_and(u8::is_ascii_digit) {
                j += 1;
            }
        }
        b.get(j).is_none_or(|&c| !ident(c))
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

/// `SET [SESSION | LOCAL] ...`: what to carry to other connections. A name the pooler
/// cannot read keeps the client on its connection rather than guess.
fn set_effect(stmt: &str, toks: &[Tok]) -> Effect {
    let word = |i: usize| match toks.get(i) {
        Some(Tok::Word(w)) => w.as_str(),
        _ => "",
    };
    let i = if word(1) == "session" { 2 } else { 1 };
    let (key, value_at) = match word(i) {
        // SET LOCAL and transaction-scoped forms end with the transaction: nothing to carry
        // (the relay bypasses the cache for the rest of it).
        "local" | "transaction" | "constraints" if i == 1 => return Effect::TxSetting,
        "characteristics" if i == 2 => ("session_characteristics".to_string(), None),
        "authorization" if i == 2 => ("session_authorization".to_string(), None),
        "time" if word(i + 1) == "zone" => ("timezone".to_string(), Some(i + 2)),
        "names" => ("client_encoding".to_string(), Some(i + 1)),
        "xml" if word(i + 1) == "option" => ("xmloption".to_string(), Some(i + 2)),
        "schema" => ("search_path".to_string(), Some(i + 1)),
        _ => match dotted_name(toks, i) {
            Some((name, next)) => (name, Some(next)),
            None => return Effect::Pin("a SET the pooler cannot read"),
        },
    };
    // `SET x TO DEFAULT` (and `SET TIME ZONE LOCAL`) is `RESET x`: the session goes back to
    // its startup value, which a verbatim replay elsewhere would not restore.
    if let Some(mut at) = value_at {
        if matches!(toks.get(at), Some(Tok::Word(w)) if w == "to")
            || toks.get(at) == Some(&Tok::Punct(b'='))
        {
            at += 1;
        }
        let resets = match toks.get(at) {
            Some(Tok::Word(w)) => w == "default" || (key == "timezone" && w == "local"),
            _ => false,
        };
        if resets && toks.len() == at + 1 {
            return Effect::Reset { key };
        }
    }
    Effect::Set {
        key,
        stmt: stmt.to_string(),
    }
}

/// `RESET name | ALL | SESSION AUTHORIZATION | TIME ZONE`.
fn reset_effect(toks: &[Tok]) -> Effect {
    let word = |i: usize| match toks.get(i) {
        Some(Tok::Word(w)) => w.as_str(),
        _ => "",
    };
    let key = match word(1) {
        "all" => return Effect::ResetAll,
        "session" if word(2) == "authorization" => "session_authorization".to_string(),
        "time" if word(2) == "zone" => "timezone".to_string(),
        _ => match dotted_name(toks, 1) {
            Some((name, _)) => name,
            None => return Effect::Pin("a RESET the pooler cannot read"),
        },
    };
    Effect::Reset { key }
}

fn savepoint_effect(toks: &[Tok], at: usize, make: fn(String) -> Effect) -> Effect {
    match toks.get(at) {
        Some(Tok::Word(w)) => make(w.clone()),
        Some(Tok::Quoted(q)) => make(q.clone()),
        _ => Effect::Pin("a savepoint the pooler cannot read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_read_in_full_is_recognised_by_its_first_word_in_any_case() {
        for word in [
            "set",
            "reset",
            "discard",
            "deallocate",
            "listen",
            "prepare",
            "do",
            "create",
            "declare",
            "savepoint",
            "release",
            "rollback",
            "abort",
        ] {
            for spelled in [word.to_string(), word.to_ascii_uppercase()] {
                assert!(starts_tracked(&format!("/* c */ {spelled} x")), "{spelled}");
            }
        }
        for other in [
            "select 1", "SETTLE", "update t", "commit", "deal", "", "'set'",
        ] {
            assert!(!starts_tracked(other), "{other}");
        }
    }

    #[test]
    fn one_statement_texts_are_judged_as_the_splitter_would() {
        let bodies = [
            "SELECT 1",
            "UPDATE t SET v = v + -5 WHERE id = 7",
            "SELECT pg_advisory_lock(1)",
            "SELECT 'pg_advisory_lock'",
            "SELECT set_config('search_path', 'x', false)",
            "SELECT set_config('search_path', 'x;', false)",
            "SET search_path = a",
            "set work_mem = '1MB'",
            "/* SET x = 1 */ SELECT 1",
            "-- SET x = 1\nSELECT 1",
            "SELECT 'unclosed",
            "SELECT 'unclosed; SET search_path = b",
            "SELECT 1 /* unclosed",
            "CREATE TEMP TABLE t (a int)",
            "SELECT * INTO TEMP t FROM u",
            "UPDATE pg_settings SET setting = 'x' WHERE name = 'y'",
            "LISTEN chan",
            "SELECT $$;$$",
            "",
            "  ",
        ];
        for body in bodies {
            for sql in [
                body.to_string(),
                format!("{body};"),
                format!("  {body} ;  \n"),
                format!("{body};;"),
                format!("{body}; SET search_path = c"),
                format!("SET search_path = c; {body}"),
                format!("{body};\u{a0}"),
            ] {
                let split: Vec<Effect> = statements(&sql).filter_map(effect_of).collect();
                assert_eq!(effects_of(&sql), split, "{sql:?}");
            }
        }
    }

    #[test]
    fn session_set_is_tracked_and_local_set_is_not() {
        assert_eq!(
            effects_of("SET search_path TO app, public; SET LOCAL work_mem = '1MB'"),
            vec![
                Effect::Set {
                    key: "search_path".into(),
                    stmt: "SET search_path TO app, public".into()
                },
                Effect::TxSetting
            ]
        );
        assert_eq!(
            effects_of("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            vec![Effect::TxSetting]
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
    fn set_to_default_is_a_reset() {
        for (sql, key) in [
            ("SET TimeZone TO DEFAULT", "timezone"),
            ("set search_path = default", "search_path"),
            ("SET TIME ZONE DEFAULT", "timezone"),
            ("SET TIME ZONE LOCAL", "timezone"),
            ("SET SESSION app.tenant TO DEFAULT", "app.tenant"),
        ] {
            assert_eq!(
                effects_of(sql),
                vec![Effect::Reset { key: key.into() }],
                "{sql}"
            );
        }
        for sql in [
            "SET TimeZone TO 'default'",
            "SET search_path TO default, public",
        ] {
            assert!(
                matches!(effects_of(sql).as_slice(), [Effect::Set { .. }]),
                "{sql}"
            );
        }
    }

    #[test]
    fn naming_the_temporary_schema_pins() {
        for sql in [
            "CREATE TABLE pg_temp.w AS SELECT 1",
            "create view PG_TEMP.v as select 1",
            "SET search_path = pg_temp, public",
            "SELECT set_config('search_path', 'pg_temp,public', true)",
            "SELECT * FROM pg_temp.w",
            "create table pg_temp_3.w (id int)",
            "SET search_path = 'pg_temp'",
        ] {
            assert!(
                matches!(
                    effects_of(sql).as_slice(),
                    [Effect::Pin("temporary schema")]
                ),
                "{sql}"
            );
        }
        for sql in [
            "SELECT 'jpg_template.png'",
            "CREATE TABLE my_pg_temps (id int)",
            "SELECT * FROM pg_templates",
        ] {
            assert!(effects_of(sql).is_empty(), "{sql}");
        }
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

    #[test]
    fn quoted_and_dotted_setting_names_are_tracked_by_their_folded_name() {
        let key = |sql: &str| match effects_of(sql).as_slice() {
            [Effect::Set { key, .. }] | [Effect::Reset { key }] => key.clone(),
            other => panic!("{sql}: {other:?}"),
        };
        assert_eq!(key("SET \"search_path\" TO s2"), "search_path");
        assert_eq!(key("RESET \"TimeZone\""), "timezone");
        assert_eq!(key("SET SESSION \"TimeZone\" = 'UTC'"), "timezone");
        assert_eq!(key("SET myapp.tenant = 4"), "myapp.tenant");
        assert_eq!(key("SET myapp.\"Other\" = 4"), "myapp.other");
        assert_eq!(key("reset myapp.tenant"), "myapp.tenant");
        assert_eq!(key("RESET ROLE"), "role");
        assert_eq!(
            key("SET SESSION AUTHORIZATION bob"),
            "session_authorization"
        );
        assert!(matches!(effects_of("SET = 1").as_slice(), [Effect::Pin(_)]));
    }

    #[test]
    fn savepoint_statements_are_recognised() {
        assert_eq!(
            effects_of("SAVEPOINT a"),
            vec![Effect::Savepoint("a".into())]
        );
        assert_eq!(
            effects_of("savepoint \"B\""),
            vec![Effect::Savepoint("B".into())]
        );
        assert_eq!(
            effects_of("RELEASE SAVEPOINT a"),
            vec![Effect::Release("a".into())]
        );
        assert_eq!(effects_of("release A"), vec![Effect::Release("a".into())]);
        for sql in [
            "ROLLBACK TO a",
            "ROLLBACK TO SAVEPOINT a",
            "rollback work to savepoint A",
            "ROLLBACK TRANSACTION TO a",
        ] {
            assert_eq!(
                effects_of(sql),
                vec![Effect::RollbackTo("a".into())],
                "{sql}"
            );
        }
        assert_eq!(effects_of("ROLLBACK"), vec![]);
        assert_eq!(effects_of("ROLLBACK AND CHAIN"), vec![]);
    }

    #[test]
    fn other_ways_to_change_settings_pin() {
        for sql in [
            "SELECT \"set_config\"('search_path', 's2', false)",
            "SELECT set_config/**/('search_path', 's2', true)",
            "UPDATE pg_settings SET setting = 's2' WHERE name = 'search_path'",
        ] {
            assert!(
                matches!(effects_of(sql).as_slice(), [Effect::Pin(_)]),
                "{sql}"
            );
        }
    }
}
