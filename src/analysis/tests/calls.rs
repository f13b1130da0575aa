use super::*;

#[test]
fn time_functions_bypass_in_every_spelling() {
    for sql in [
        "SELECT now()",
        "SELECT * FROM t WHERE ts > now() - interval '1 day'",
        "SELECT current_timestamp",
        "SELECT CURRENT_DATE",
        "SELECT current_time(3)",
        "SELECT localtime",
        "SELECT localtimestamp",
        "SELECT clock_timestamp()",
        "SELECT statement_timestamp()",
        "SELECT transaction_timestamp()",
        "SELECT timeofday()",
        "SELECT pg_catalog.now()",
        "SELECT age(ts) FROM t",
    ] {
        assert!(
            matches!(bypass(sql), BypassReason::VolatileFunction(_)),
            "{sql}"
        );
    }
}

#[test]
fn randomness_session_and_system_functions_bypass() {
    for sql in [
        "SELECT random()",
        "SELECT setseed(0.5)",
        "SELECT gen_random_uuid()",
        "SELECT uuid_generate_v4()",
        "SELECT current_user",
        "SELECT session_user",
        "SELECT user",
        "SELECT current_role",
        "SELECT current_schema",
        "SELECT current_schemas(true)",
        "SELECT current_database()",
        "SELECT current_setting('x')",
        "SELECT set_config('a', 'b', false)",
        "SELECT pg_backend_pid()",
        "SELECT txid_current()",
        "SELECT pg_current_xact_id()",
        "SELECT inet_client_addr()",
        "SELECT pg_sleep(1)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock(1)",
        "SELECT pg_notify('c', 'x')",
        "SELECT * FROM t WHERE owner = current_user",
    ] {
        assert!(
            matches!(bypass(sql), BypassReason::VolatileFunction(_)),
            "{sql}"
        );
    }
}

#[test]
fn quoted_user_column_is_not_the_user_function() {
    assert!(matches!(an(r#"SELECT "user" FROM t"#), Analysis::Read(_)));
}

#[test]
fn sequence_functions_bypass() {
    for (sql, name) in [
        ("SELECT nextval('s')", "nextval"),
        ("SELECT currval('s')", "currval"),
        ("SELECT lastval()", "lastval"),
        ("SELECT setval('s', 1)", "setval"),
    ] {
        assert_eq!(bypass(sql), BypassReason::SequenceFunction(name.into()));
    }
}

#[test]
fn time_literals_bypass() {
    assert_eq!(
        bypass("SELECT * FROM t WHERE ts > 'now'::timestamptz"),
        BypassReason::TimeLiteral
    );
    assert_eq!(bypass("SELECT date 'today'"), BypassReason::TimeLiteral);
    assert!(matches!(an("SELECT date '2024-01-01'"), Analysis::Read(_)));
}

#[test]
fn time_words_inside_literals_and_built_text_bypass() {
    for sql in [
        "SELECT '{now}'::timestamptz[]",
        "SELECT '(now)'::timestamptz",
        "SELECT 'today 10:00'::timestamp",
        "SELECT '[today,infinity)'::daterange",
        "SELECT * FROM t WHERE d < 'Tomorrow'",
        "SELECT ('no' || 'w')::timestamptz",
        "SELECT CAST(lower('NOW') AS date)",
        "SELECT concat('to', 'day')::date",
    ] {
        assert_eq!(bypass(sql), BypassReason::TimeLiteral, "{sql}");
    }
    for sql in [
        "SELECT 'snowy'::text FROM t",
        "SELECT (a || b)::text FROM t",
        "SELECT '2024-01-01 10:00'::timestamptz",
    ] {
        assert!(matches!(an(sql), Analysis::Read(_)), "{sql}");
    }
}

#[test]
fn common_builtins_need_no_catalog() {
    let r = read(
        "SELECT count(*), sum(a), avg(b), min(c), max(d), coalesce(e, 0), lower(f), upper(g), \
         length(h), abs(i), round(j, 2), row_number() OVER (ORDER BY a), string_agg(f, ',') \
         FROM t WHERE id = 1 GROUP BY e",
    );
    assert_eq!(r.tables, vec![t("t")]);
}

#[test]
fn unknown_function_bypasses_without_catalog() {
    assert_eq!(
        bypass("SELECT my_func(1)"),
        BypassReason::UnknownFunction("my_func".into())
    );
    assert_eq!(
        bypass("SELECT app.f(x) FROM t"),
        BypassReason::UnknownFunction("app.f".into())
    );
}

#[test]
fn catalog_decides_for_user_functions() {
    let catalog = |schema: Option<&str>, name: &str| match (schema, name) {
        (None, "slugify") => Some(Volatility::Immutable),
        (Some("app"), "balance_of") => Some(Volatility::Stable),
        (None, "bump") => Some(Volatility::Volatile),
        _ => None,
    };
    assert!(matches!(
        analyze("SELECT slugify(name) FROM t", &catalog),
        Analysis::Read(_)
    ));
    assert_eq!(
        analyze("SELECT app.balance_of(1)", &catalog),
        Analysis::Bypass(BypassReason::StableFunction("app.balance_of".into()))
    );
    assert_eq!(
        analyze("SELECT * FROM t WHERE x = bump()", &catalog),
        Analysis::Bypass(BypassReason::VolatileFunction("bump".into()))
    );
}

#[test]
fn catalog_cannot_allow_a_denied_function() {
    let everything_immutable = |_: Option<&str>, _: &str| Some(Volatility::Immutable);
    assert!(matches!(
        analyze("SELECT now()", &everything_immutable),
        Analysis::Bypass(BypassReason::VolatileFunction(_))
    ));
}

#[test]
fn function_calls_in_subqueries_and_ctes_count() {
    assert!(matches!(
        bypass("WITH x AS (SELECT random() r) SELECT * FROM x"),
        BypassReason::VolatileFunction(_)
    ));
    assert!(matches!(
        bypass("SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE ts < now())"),
        BypassReason::VolatileFunction(_)
    ));
}

#[test]
fn syntax_reported_as_calls_is_allowed() {
    assert!(matches!(
        an("SELECT ARRAY(SELECT id FROM t), ROW(1, 2)"),
        Analysis::Read(_)
    ));
    assert!(matches!(
        an("SELECT a, GROUPING(a) FROM t GROUP BY ROLLUP (a)"),
        Analysis::Read(_)
    ));
}

#[test]
fn calls_that_may_write_are_told_apart_from_denied_built_ins() {
    // NoCatalog knows no user function: unknown ones may write, built-ins denied by name
    // (time, randomness, sequences, system functions) do not.
    assert!(bypass("SELECT add_row(1)").may_write());
    assert!(bypass("SELECT app.add_row(1)").may_write());
    for sql in [
        "SELECT now()",
        "SELECT random()",
        "SELECT nextval('s')",
        "SELECT pg_catalog.pg_backend_pid()",
        "SELECT * FROM t WHERE ts > now()",
    ] {
        assert!(!bypass(sql).may_write(), "{sql}");
    }
    // Whatever comes first, a call that may write is the reason given.
    assert!(bypass("SELECT now(), add_row(1)").may_write());
    assert!(bypass("SELECT add_row(1), now()").may_write());
    assert!(bypass("SELECT now(); SELECT add_row(1)").may_write());
    assert_eq!(
        bypass("SELECT 1; SELECT 2"),
        BypassReason::MultipleStatements
    );
    // In a write, the call is recorded next to the written tables.
    assert!(write("INSERT INTO orders VALUES (next_order_no(), 1)").hidden_writes);
    assert!(!write("INSERT INTO orders VALUES (1, 2)").hidden_writes);
    assert!(!write("UPDATE t SET ts = now() WHERE id = 1").hidden_writes);
    // Next to a write in the same text, too, in either order.
    assert!(write("UPDATE t SET v = 1 WHERE id = 1; SELECT add_row(1)").hidden_writes);
    assert!(write("SELECT add_row(1); DELETE FROM t WHERE id = 2").hidden_writes);
    assert!(!write("UPDATE t SET v = 1 WHERE id = 1; SELECT now()").hidden_writes);
}

#[test]
fn text_the_parser_refused_may_call_functions_that_write() {
    // Valid PostgreSQL that sqlparser does not take: its calls are unknown.
    let unparsed = "SELECT add_row(1) FROM t ORDER BY v USING <";
    assert_eq!(bypass(unparsed), BypassReason::Unparsable);
    assert!(bypass(unparsed).may_write());
    let long = format!("SELECT add_row(1) /* {} */", "x".repeat(200_000));
    assert_eq!(bypass(&long), BypassReason::TooLong);
    assert!(bypass(&long).may_write());
    // And so does an unparsed write.
    assert!(
        write("UPDATE t SET v = 1 WHERE v IN (SELECT v FROM u ORDER BY v USING <)").hidden_writes
    );
}

#[test]
fn catalog_lookups_and_wrapped_writer_calls_are_seen() {
    assert_eq!(
        bypass("SELECT 'gone'::regclass::oid"),
        BypassReason::SystemCatalog
    );
    assert_eq!(
        bypass("SELECT CAST('int4' AS regtype)"),
        BypassReason::SystemCatalog
    );
    for sql in [
        "DECLARE c CURSOR FOR SELECT add_log()",
        "EXPLAIN ANALYZE SELECT add_log()",
        "EXPLAIN (ANALYZE) SELECT add_log()",
        "COPY (SELECT add_log()) TO STDOUT",
    ] {
        assert!(bypass(sql).may_write(), "{sql}");
    }
    assert_eq!(an("EXPLAIN SELECT add_log()"), Analysis::Other);
    assert_eq!(an("DECLARE c CURSOR FOR SELECT 1"), Analysis::Other);
    assert!(matches!(
        bypass("SELECT 1 ~~~ 2"),
        BypassReason::UnknownFunction(_)
    ));
}

#[test]
fn only_integer_casts_keep_a_key_value() {
    assert!(
        read("SELECT v FROM t WHERE id = 16777217::float4")
            .point
            .is_none()
    );
    assert!(
        read("SELECT v FROM t WHERE id = 5::numeric")
            .point
            .is_none()
    );
    assert!(read("SELECT v FROM t WHERE id = '5'::int").point.is_some());
    assert!(
        read("SELECT v FROM t WHERE id = CAST($1 AS bigint)")
            .point
            .is_some()
    );
    assert!(
        read("SELECT * FROM t AS x(n, id) WHERE id = 5")
            .point
            .is_none()
    );
    assert!(read("SELECT * FROM t AS x WHERE x.id = 5").point.is_some());
}

/// Knows relations `t` and `u`, whose columns `ts` and `d` hold dates or times and whose
/// other columns do not.
struct Typed;

impl FunctionVolatility for Typed {
    /// A user function that fills a record from text and says it is immutable.
    fn volatility(&self, _schema: Option<&str>, name: &str) -> Option<Volatility> {
        (name == "fill_record").then_some(Volatility::Immutable)
    }

    fn unsafe_type(&self, name: &str) -> bool {
        matches!(name, "c1" | "odd_sec" | "ltree" | "string" | "uuid")
    }

    fn user_function(&self, name: &str) -> bool {
        name == "make_date"
    }

    fn user_type(&self, name: &str) -> bool {
        matches!(name, "order_status" | "citext" | "c1" | "odd_sec" | "ltree")
    }

    fn time_column(&self, name: &str) -> bool {
        matches!(name, "ts" | "d")
    }

    fn knows_relation(&self, name: &str) -> bool {
        matches!(name, "t" | "u")
    }
}

#[test]
fn text_that_may_be_read_as_the_current_time_bypasses() {
    for sql in [
        "SELECT note::timestamptz FROM t",
        "SELECT CAST(note AS date) FROM t",
        "SELECT t.note::date FROM t WHERE id = 1",
        "SELECT note::date[] FROM t",
        "SELECT (j ->> 'at')::timestamptz FROM t",
        "SELECT coalesce(note, '2024-01-01')::date FROM t",
        "SELECT ts::text::date FROM t",
        "SELECT (SELECT note FROM t LIMIT 1)::date",
        "SELECT ts::date FROM (SELECT note AS ts FROM t) s",
        "WITH c AS (SELECT note AS ts FROM t) SELECT ts::date FROM c",
        "SELECT d::date FROM t, jsonb_each_text(t.j) AS e(k, d)",
        "SELECT ts::date FROM v",
        "SELECT ts::date FROM t JOIN v USING (id)",
        "SELECT note::app.day FROM t",
        "SELECT note::tstzrange FROM t",
        // A subquery that sees the columns of a renaming FROM item around it.
        "SELECT (SELECT s.ts::date FROM u LIMIT 1) FROM (SELECT note AS ts FROM t) AS s",
        "SELECT * FROM (SELECT note AS ts FROM t) AS s, LATERAL (SELECT s.ts::date FROM u) AS l",
        // Columns renamed by an alias list: `ts` is t's text column here.
        "SELECT x.ts::timestamptz FROM t x(id, ts)",
        "SELECT ts::date FROM (t JOIN u USING (id)) AS j(id, ts)",
        // User types, also named like types that hold no time (a domain `ltree`, a
        // `public.uuid` ahead of pg_catalog in the search_path), composites steering a
        // function, domains whose CHECK reads the clock.
        "SELECT note::ltree FROM t",
        "SELECT note::string FROM t",
        "SELECT note::uuid FROM t",
        "SELECT string_to_array(note, ',')::ltree[] FROM t",
        "SELECT (fill_record(NULL::c1, h)).d FROM t",
        "SELECT 1::odd_sec",
        // A user function named like a built-in that builds a date.
        "SELECT make_date(note)::timestamptz FROM t",
        // Table functions whose column definitions read text as a time.
        "SELECT d FROM t, XMLTABLE('/r' PASSING t.x COLUMNS d timestamptz PATH 'd') AS xt",
    ] {
        assert_eq!(
            analyze(sql, &Typed),
            Analysis::Bypass(BypassReason::TextAsTime),
            "{sql}"
        );
    }
    // hstore's populate_record says it is immutable, yet reads text as the record's types.
    assert_eq!(
        analyze("SELECT (populate_record(l, t.h)).d FROM logs l, t", &Typed),
        Analysis::Bypass(BypassReason::VolatileFunction("populate_record".into()))
    );
    // Without a catalog no column is known to hold a date or time.
    assert_eq!(
        an("SELECT ts::date FROM t"),
        Analysis::Bypass(BypassReason::TextAsTime)
    );
}

#[test]
fn dates_and_times_cast_to_dates_and_times_stay_cacheable() {
    for sql in [
        "SELECT ts::date FROM t",
        "SELECT t.ts::date, d FROM t WHERE id = 1",
        "SELECT (ts + interval '1 day')::date FROM t",
        "SELECT (ts AT TIME ZONE 'UTC')::date FROM t",
        "SELECT date_trunc('day', ts)::date FROM t",
        "SELECT ts::timestamp::date FROM t",
        "SELECT CAST(d AS timestamp) FROM t JOIN u USING (id)",
        "SELECT ts::date FROM t WHERE id IN (SELECT id FROM u)",
        "SELECT note::text, id::int8, j::jsonb FROM t",
        "SELECT '2024-01-01'::date, NULL::timestamptz FROM t",
        "SELECT $1::date FROM t",
        "SELECT x.ts::date FROM t AS x",
        // Casts inside subqueries and CTEs that see only catalog relations, wrapped for
        // pagination or counting as ORMs do.
        "SELECT * FROM (SELECT id, ts::date FROM t) AS sub LIMIT 10",
        "SELECT count(*) FROM (SELECT DISTINCT t.ts::date FROM t) AS subquery",
        "WITH c AS (SELECT ts::date AS day FROM t) SELECT day FROM c",
        "SELECT ts::date FROM t WHERE id IN (SELECT id FROM (SELECT id FROM u) AS x)",
        "SELECT make_timestamp(2024, 1, 1, 0, 0, 0)::date FROM t",
        "SELECT 'a'::mood FROM t",
        // Prisma's enum filter: text cast to an enum, which cannot hold a time.
        "SELECT id FROM t WHERE status = CAST($1::text AS \"public\".\"order_status\")",
        "SELECT note::citext FROM t",
    ] {
        assert!(matches!(analyze(sql, &Typed), Analysis::Read(_)), "{sql}");
    }
}
