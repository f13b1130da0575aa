use super::*;

#[test]
fn garbage_does_not_panic() {
    for sql in [
        "asdf qwer",
        "SELECT FROM WHERE",
        "SELECT * FROM",
        "'unterminated",
        "\"unterminated",
        "/* unterminated",
        "$$ unterminated",
        "SELECT $",
        ")))(((",
        "\u{0}\u{1}\u{FFFF}",
        "SELECT 'é' || \u{1F600}",
        "SELECT * FROM t WHERE id = $0",
        "SELECT * FROM t WHERE id = $99999999999999999999999",
    ] {
        let _ = an(sql);
        let _ = hints(sql);
    }
}

#[test]
fn garbage_select_bypasses_and_garbage_other_flushes() {
    assert_eq!(bypass("SELECT FROM WHERE ((("), BypassReason::Unparsable);
    // Unknown leading words might be a write sqlparser does not know: flush if it succeeds.
    assert_eq!(flush_reason("asdf qwer"), FlushReason::Unparsable);
}

#[test]
fn huge_left_deep_chains_do_not_overflow_the_stack() {
    // Run on a 2 MiB stack like a tokio worker.
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let plus = format!("SELECT {}1", "1 + ".repeat(20_000));
            assert_eq!(an(&plus), Analysis::Bypass(BypassReason::TooComplex));
            let and = format!("SELECT * FROM t WHERE {}true", "a = 1 AND ".repeat(10_000));
            assert_eq!(an(&and), Analysis::Bypass(BypassReason::TooComplex));
            let casts = format!("SELECT 1{}", "::int".repeat(20_000));
            assert_eq!(an(&casts), Analysis::Bypass(BypassReason::TooComplex));
            // Just under the weight limit: parsed and walked on the deep stack.
            let near = format!("SELECT * FROM t WHERE {}true", "a = 1 AND ".repeat(990));
            assert!(matches!(an(&near), Analysis::Read(_)));
            let unions = format!("{}SELECT 1", "SELECT 1 UNION ".repeat(1_300));
            assert!(matches!(an(&unions), Analysis::Read(_)));
            let nested = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
            assert!(matches!(an(&nested), Analysis::Bypass(_)));
            let subqueries = format!("SELECT {}1{}", "(SELECT ".repeat(5_000), ")".repeat(5_000));
            assert!(matches!(an(&subqueries), Analysis::Bypass(_)));
        })
        .unwrap();
    handle.join().expect("analysis must not crash");
}

#[test]
fn too_long_text_is_not_parsed_but_writes_are_found() {
    let rows = "(1, 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'), ".repeat(4_000);
    let insert = format!("INSERT INTO big (id, v) VALUES {rows}(0, 'x')");
    assert!(insert.len() > 100 * 1024);
    assert_eq!(write(&insert).tables, vec![wide("big")]);
    let select = format!("SELECT * FROM t WHERE id IN ({}0)", "1, ".repeat(40_000));
    assert_eq!(bypass(&select), BypassReason::TooLong);
}

#[test]
fn long_insert_under_the_limit_is_keyed() {
    let rows = (1..=1000)
        .map(|i| format!("({i}, 'v')"))
        .collect::<Vec<_>>()
        .join(", ");
    let w = write(&format!("INSERT INTO t (id, v) VALUES {rows}"));
    let WriteEffect::Keys(rows) = &w.tables[0].effect else {
        panic!("expected keys")
    };
    assert_eq!(rows.len(), 1000);
    assert_eq!(rows[999], vec![lit("id", "1000"), lit("v", "v")]);
}

#[test]
fn analysis_is_shareable() {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<Analysis>();
    assert_shareable::<Hints>();
}

#[test]
fn labels_are_stable_metric_names() {
    assert_eq!(
        BypassReason::VolatileFunction("now".into()).label(),
        "volatile_function"
    );
    assert_eq!(
        BypassReason::MultipleStatements.label(),
        "multiple_statements"
    );
    assert_eq!(FlushReason::NewRelation.label(), "new_relation");
}

#[test]
fn every_prefix_of_tricky_statements_is_handled() {
    let corpus = [
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
        "WITH d AS (DELETE FROM t WHERE id = $1 RETURNING *) INSERT INTO log SELECT * FROM d",
        "UPDATE ONLY s.\"T\" AS x SET (a, b) = (1, 'é') FROM u WHERE x.id = u.id AND x.k = E'\\''",
        "SELECT /* pgstash: ttl=5s */ $q$;$q$, count(*) FILTER (WHERE a) FROM t FOR UPDATE",
        "INSERT INTO t (id, v) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        "GRANT SELECT ON TABLE a, b TO r; REFRESH MATERIALIZED VIEW CONCURRENTLY mv",
    ];
    for sql in corpus {
        for (end, _) in sql.char_indices() {
            let _ = an(&sql[..end]);
            let _ = hints(&sql[..end]);
        }
    }
}

#[test]
fn backtracking_constructs_are_refused_before_they_explode() {
    // Each of these takes seconds to forever in sqlparser 0.59 at depth 20-48.
    let cases = [
        ("CAST(", " AS int)"),
        ("SUBSTRING(", " FROM 1)"),
        ("ARRAY[", "]"),
        ("f(", ")"),
        ("CASE WHEN true THEN ", " END"),
        ("count(DISTINCT ", ")"),
    ];
    for (open, close) in cases {
        for depth in [7, 20, 48] {
            for tail in ["1", "1 +"] {
                let sql = format!("SELECT {}{tail}{}", open.repeat(depth), close.repeat(depth));
                let started = std::time::Instant::now();
                let result = an(&sql);
                let elapsed = started.elapsed();
                // Generous for unoptimised builds; release is ~8 ms at worst.
                assert!(elapsed.as_secs_f64() < 2.0, "{sql}: {elapsed:?}");
                if depth > guard::MAX_CALL_DEPTH {
                    assert_eq!(result, Analysis::Bypass(BypassReason::TooComplex), "{sql}");
                }
            }
        }
    }
}

#[test]
fn realistic_nesting_is_still_analysed() {
    let r = read(
        "SELECT round(coalesce(sum(CASE WHEN t.kind = 'a' THEN cast(t.amount AS numeric) END), 0), 2) \
         FROM t WHERE (t.a = 1 AND (t.b = 2 OR (t.c IN (SELECT c FROM u WHERE EXISTS (SELECT 1 FROM v)))))",
    );
    assert_eq!(r.tables, vec![t("t"), t("u"), t("v")]);
}
