use super::*;

#[test]
fn pgbench_point_read_with_parameter() {
    let r = read("SELECT abalance FROM pgbench_accounts WHERE aid = $1");
    assert_eq!(r.tables, vec![t("pgbench_accounts")]);
    let point = r.point.expect("point read");
    assert_eq!(point.table, t("pgbench_accounts"));
    assert_eq!(point.candidates, vec![param("aid", 1)]);
}

#[test]
fn point_read_with_extra_anded_conditions() {
    let r = read("SELECT * FROM t WHERE aid = 5 AND x > 3");
    assert_eq!(r.point.unwrap().candidates, vec![lit("aid", "5")]);
}

#[test]
fn point_read_reports_every_equality_candidate() {
    let r = read("SELECT * FROM t WHERE (a = 1 AND 'x' = b) AND c IS NULL AND d = $2");
    assert_eq!(
        r.point.unwrap().candidates,
        vec![lit("a", "1"), lit("b", "x"), param("d", 2)]
    );
}

#[test]
fn or_in_list_and_expressions_are_not_points() {
    for sql in [
        "SELECT * FROM t WHERE aid = 5 OR aid = 6",
        "SELECT * FROM t WHERE aid IN (5, 6)",
        "SELECT * FROM t WHERE aid = ANY($1)",
        "SELECT * FROM t WHERE aid + 0 = 5",
        "SELECT * FROM t WHERE aid = 5.5",
        "SELECT * FROM t WHERE aid = other",
        "SELECT * FROM t WHERE NOT (aid = 5)",
        "SELECT * FROM t",
    ] {
        assert_eq!(read(sql).point, None, "{sql}");
    }
}

#[test]
fn join_has_no_point_and_lists_both_tables() {
    let r = read("SELECT * FROM a JOIN s.b ON a.id = b.a_id WHERE a.id = 1");
    assert_eq!(r.tables, vec![t("a"), t("s.b")]);
    assert_eq!(r.point, None);
    assert_eq!(read("SELECT * FROM a, b WHERE a.id = 1").point, None);
}

#[test]
fn subquery_reading_same_table_has_no_point() {
    let r = read("SELECT * FROM t WHERE id = 1 AND x IN (SELECT x FROM t)");
    assert_eq!(r.tables, vec![t("t")]);
    assert_eq!(r.point, None);
}

#[test]
fn aggregates_order_and_limit_keep_point() {
    let r = read("SELECT count(*), max(v) FROM t WHERE id = 3 GROUP BY v ORDER BY 1 LIMIT 1");
    assert_eq!(r.point.unwrap().candidates, vec![lit("id", "3")]);
}

#[test]
fn literals_are_canonicalised_and_casts_unwrapped() {
    let cands = |sql| read(sql).point.unwrap().candidates;
    assert_eq!(
        cands("SELECT * FROM t WHERE id = 007"),
        vec![lit("id", "7")]
    );
    assert_eq!(cands("SELECT * FROM t WHERE id = +5"), vec![lit("id", "5")]);
    assert_eq!(
        cands("SELECT * FROM t WHERE id = -05"),
        vec![lit("id", "-5")]
    );
    assert_eq!(
        cands("SELECT * FROM t WHERE id = $1::int"),
        vec![param("id", 1)]
    );
    assert_eq!(
        cands("SELECT * FROM t WHERE id = '5'::int"),
        vec![lit("id", "5")]
    );
    assert_eq!(
        cands("SELECT * FROM t WHERE id = CAST($3 AS bigint)"),
        vec![param("id", 3)]
    );
    assert_eq!(
        cands("SELECT * FROM t WHERE id = (42)"),
        vec![lit("id", "42")]
    );
    assert_eq!(
        cands("SELECT * FROM t WHERE name = 'O''Brien'"),
        vec![lit("name", "O'Brien")]
    );
    assert_eq!(
        cands("SELECT * FROM t WHERE name = '007'"),
        vec![lit("name", "007")]
    );
}

#[test]
fn qualified_columns_must_name_the_table_or_its_alias() {
    let cands = |sql| read(sql).point.map(|p| p.candidates);
    assert_eq!(
        cands("SELECT * FROM s.t WHERE t.id = 1"),
        Some(vec![lit("id", "1")])
    );
    assert_eq!(
        cands("SELECT * FROM s.t WHERE s.t.id = 1"),
        Some(vec![lit("id", "1")])
    );
    assert_eq!(
        cands("SELECT * FROM t AS x WHERE x.id = 1"),
        Some(vec![lit("id", "1")])
    );
    // With an alias the table name is hidden; other qualifiers are not this table.
    assert_eq!(cands("SELECT * FROM t AS x WHERE t.id = 1"), None);
    assert_eq!(cands("SELECT * FROM t WHERE u.id = 1"), None);
}

#[test]
fn schema_qualified_and_quoted_names() {
    let r = read(r#"SELECT * FROM "MySchema"."Accounts" WHERE "Id" = 1"#);
    assert_eq!(r.tables, vec![t("MySchema.Accounts")]);
    assert_eq!(r.point.unwrap().candidates, vec![lit("Id", "1")]);
    assert_eq!(
        read("SELECT * FROM Public.ACCOUNTS").tables,
        vec![t("public.accounts")]
    );
    assert_eq!(
        read("SELECT * FROM mydb.public.t").tables,
        vec![t("public.t")]
    );
}

#[test]
fn tables_collected_from_everywhere() {
    let r = read(
        "SELECT (SELECT max(x) FROM s1), y FROM a \
         LEFT JOIN (SELECT * FROM b) sub ON true \
         WHERE EXISTS (SELECT 1 FROM c WHERE c.id = a.id) AND a.v IN (SELECT v FROM d) \
         UNION ALL SELECT 1, 2 FROM e",
    );
    assert_eq!(
        r.tables,
        vec![t("s1"), t("a"), t("b"), t("c"), t("d"), t("e")]
    );
}

#[test]
fn cte_names_are_not_tables_but_their_bodies_are() {
    let r = read(
        "WITH x AS (SELECT * FROM base), y AS (SELECT * FROM x) SELECT * FROM y JOIN x ON true",
    );
    assert_eq!(r.tables, vec![t("base")]);
    assert_eq!(r.point, None);
}

#[test]
fn later_cte_name_inside_earlier_body_is_a_real_table() {
    // Without RECURSIVE, `b` in the first body is not yet the CTE: it is table b.
    let r = read("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b");
    assert_eq!(r.tables, vec![t("b")]);
}

#[test]
fn recursive_cte_refers_to_itself() {
    let r = read(
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT * FROM r",
    );
    assert_eq!(r.tables, Vec::<TableRef>::new());
}

#[test]
fn cte_scope_ends_with_its_query() {
    let r = read("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) s, x");
    assert_eq!(r.tables, vec![t("x")]);
    // A qualified name is never a CTE.
    assert_eq!(
        read("WITH x AS (SELECT 1) SELECT * FROM public.x").tables,
        vec![t("public.x")]
    );
}

#[test]
fn values_and_table_less_reads() {
    assert_eq!(read("VALUES (1), (2)").tables, Vec::<TableRef>::new());
    assert_eq!(
        read("SELECT 1 + 1, lower('A')").tables,
        Vec::<TableRef>::new()
    );
}

#[test]
fn table_command_inside_with() {
    assert_eq!(
        read("WITH x AS (SELECT 1) TABLE x").tables,
        Vec::<TableRef>::new()
    );
    assert_eq!(
        read("WITH x AS (SELECT 1) TABLE s.t").tables,
        vec![t("s.t")]
    );
    // sqlparser drops the quotes of TABLE names, so mixed case is ambiguous.
    assert_eq!(
        bypass("WITH x AS (SELECT 1) TABLE \"Ids\""),
        BypassReason::Unsupported
    );
}

#[test]
fn set_returning_functions_in_from_are_calls_not_tables() {
    let r = read("SELECT * FROM generate_series(1, 3) AS g(x), LATERAL unnest(ARRAY[1]) u");
    assert_eq!(r.tables, Vec::<TableRef>::new());
    assert_eq!(
        bypass("SELECT * FROM my_srf(1)"),
        BypassReason::UnknownFunction("my_srf".into())
    );
}

#[test]
fn locking_clauses_bypass() {
    assert_eq!(bypass("SELECT * FROM t FOR UPDATE"), BypassReason::Locking);
    assert_eq!(
        bypass("SELECT * FROM t WHERE id = 5 FOR SHARE OF t"),
        BypassReason::Locking
    );
    assert_eq!(
        bypass("SELECT * FROM (SELECT * FROM t FOR UPDATE) s"),
        BypassReason::Locking
    );
    // sqlparser cannot parse NO KEY UPDATE: the fallback still bypasses.
    assert!(matches!(
        an("SELECT * FROM t FOR NO KEY UPDATE"),
        Analysis::Bypass(_)
    ));
}

#[test]
fn system_catalogs_and_temp_tables_bypass() {
    assert_eq!(
        bypass("SELECT * FROM pg_class"),
        BypassReason::SystemCatalog
    );
    assert_eq!(
        bypass("SELECT * FROM pg_catalog.pg_namespace"),
        BypassReason::SystemCatalog
    );
    assert_eq!(
        bypass("SELECT * FROM information_schema.tables"),
        BypassReason::SystemCatalog
    );
    assert_eq!(
        bypass("SELECT * FROM t JOIN pg_stat_activity ON true"),
        BypassReason::SystemCatalog
    );
    assert_eq!(
        bypass("SELECT * FROM pg_temp.scratch"),
        BypassReason::TempTable
    );
    // pgbench tables are not system tables.
    assert!(matches!(
        an("SELECT * FROM pgbench_branches"),
        Analysis::Read(_)
    ));
}

#[test]
fn tablesample_bypasses() {
    assert_eq!(
        bypass("SELECT * FROM t TABLESAMPLE SYSTEM (10)"),
        BypassReason::TableSample
    );
}

#[test]
fn from_only_names_the_table_not_only() {
    let r = read("SELECT * FROM ONLY t WHERE t.id = 1");
    assert_eq!(r.tables, vec![t("t")]);
    assert_eq!(r.point.unwrap().candidates, vec![lit("id", "1")]);
}
