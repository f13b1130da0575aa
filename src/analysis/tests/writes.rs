use super::*;

#[test]
fn pgbench_update_is_keyed_by_its_where() {
    let w = write("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2");
    assert_eq!(
        w.tables,
        vec![keys("pgbench_accounts", vec![vec![param("aid", 2)]])]
    );
}

#[test]
fn update_that_assigns_the_key_column_is_wide() {
    let w = write("UPDATE t SET id = 7 WHERE id = 5");
    assert_eq!(w.tables, vec![wide("t")]);
    // Other equalities survive; the assigned one is dropped.
    let w = write("UPDATE t SET (status, v) = ('b', 1) WHERE id = 5 AND status = 'a'");
    assert_eq!(w.tables, vec![keys("t", vec![vec![lit("id", "5")]])]);
}

#[test]
fn update_without_pinning_where_is_wide() {
    for sql in [
        "UPDATE t SET v = 1",
        "UPDATE t SET v = 1 WHERE id = 1 OR id = 2",
        "UPDATE t SET v = 1 WHERE id IN (1, 2)",
        "UPDATE t SET v = 1 WHERE CURRENT OF c",
    ] {
        assert_eq!(write(sql).tables, vec![wide("t")], "{sql}");
    }
}

#[test]
fn update_from_is_wide_and_lists_only_the_target() {
    let w = write("UPDATE t AS x SET a = u.a FROM u WHERE x.id = u.id AND x.id = 1");
    assert_eq!(w.tables, vec![wide("t")]);
}

#[test]
fn update_with_alias_keyed() {
    let w = write("UPDATE s.t AS x SET a = 1 WHERE x.id = 9");
    assert_eq!(w.tables, vec![keys("s.t", vec![vec![lit("id", "9")]])]);
}

#[test]
fn delete_keyed_and_wide() {
    assert_eq!(
        write("DELETE FROM ONLY t WHERE id = $1").tables,
        vec![keys("t", vec![vec![param("id", 1)]])]
    );
    assert_eq!(write("DELETE FROM t").tables, vec![wide("t")]);
    assert_eq!(
        write("DELETE FROM t USING u WHERE t.id = u.id AND t.id = 1").tables,
        vec![wide("t")]
    );
}

#[test]
fn insert_values_keys_per_row() {
    let w = write("INSERT INTO t (id, v) VALUES (1, 'a'), (2, 'b')");
    assert_eq!(
        w.tables,
        vec![keys(
            "t",
            vec![
                vec![lit("id", "1"), lit("v", "a")],
                vec![lit("id", "2"), lit("v", "b")]
            ]
        )]
    );
}

#[test]
fn insert_keys_skip_expression_columns() {
    let w = write("INSERT INTO t (id, created, v) VALUES ($1, now(), lower($2)) RETURNING id");
    assert_eq!(w.tables, vec![keys("t", vec![vec![param("id", 1)]])]);
}

#[test]
fn insert_wide_cases() {
    for sql in [
        "INSERT INTO t SELECT * FROM u",
        "INSERT INTO t (id) SELECT id FROM u",
        "INSERT INTO t VALUES (1, 'a')",
        "INSERT INTO t DEFAULT VALUES",
        "INSERT INTO t (id) VALUES (DEFAULT)",
        "INSERT INTO t (id, v) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET v = excluded.v",
    ] {
        assert_eq!(write(sql).tables, vec![wide("t")], "{sql}");
    }
}

#[test]
fn insert_on_conflict_do_nothing_keeps_keys() {
    let w = write("INSERT INTO t (id) VALUES (1) ON CONFLICT DO NOTHING");
    assert_eq!(w.tables, vec![keys("t", vec![vec![lit("id", "1")]])]);
}

#[test]
fn merge_is_wide_on_target_only() {
    let w = write("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v");
    assert_eq!(w.tables, vec![wide("t")]);
}

#[test]
fn truncate_lists_all_tables_wide() {
    assert_eq!(
        write("TRUNCATE a, s.b").tables,
        vec![wide("a"), wide("s.b")]
    );
    assert_eq!(
        write("TRUNCATE TABLE ONLY a RESTART IDENTITY").tables,
        vec![wide("a")]
    );
    assert_eq!(flush_reason("TRUNCATE a CASCADE"), FlushReason::Cascade);
}

#[test]
fn copy_from_writes_copy_to_does_not() {
    // sqlparser wants inline data after FROM STDIN; the fallback still finds the target.
    assert_eq!(write("COPY t FROM STDIN").tables, vec![wide("t")]);
    assert_eq!(
        write("COPY s.t (a, b) FROM STDIN WITH (FORMAT csv)").tables,
        vec![wide("s.t")]
    );
    assert_eq!(an("COPY t TO STDOUT"), Analysis::Other);
    assert_eq!(an("COPY (SELECT * FROM t) TO STDOUT"), Analysis::Other);
}

#[test]
fn data_modifying_cte_makes_a_write() {
    let w = write("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d");
    assert_eq!(w.tables, vec![wide("t")]);
    let w = write(
        "WITH a AS (UPDATE x SET v = 1 WHERE id = 2 RETURNING id), \
              b AS (INSERT INTO y (id) SELECT id FROM a RETURNING id) \
         DELETE FROM z WHERE id IN (SELECT id FROM b)",
    );
    assert_eq!(
        w.tables,
        vec![keys("x", vec![vec![lit("id", "2")]]), wide("y"), wide("z")]
    );
}

#[test]
fn with_insert_select_writes_target_only() {
    let w = write("WITH x AS (SELECT * FROM src) INSERT INTO dst SELECT * FROM x");
    assert_eq!(w.tables, vec![wide("dst")]);
}

#[test]
fn writes_ignore_volatile_functions() {
    let w = write("UPDATE t SET touched = now() WHERE id = 1");
    assert_eq!(w.tables, vec![keys("t", vec![vec![lit("id", "1")]])]);
}

#[test]
fn explain_analyze_of_a_write_writes() {
    assert_eq!(
        write("EXPLAIN ANALYZE DELETE FROM t").tables,
        vec![wide("t")]
    );
    assert_eq!(
        write("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t").tables,
        vec![wide("t")]
    );
    assert_eq!(an("EXPLAIN (ANALYZE false) DELETE FROM t"), Analysis::Other);
    assert_eq!(an("EXPLAIN DELETE FROM t"), Analysis::Other);
    assert_eq!(an("EXPLAIN ANALYZE SELECT * FROM t"), Analysis::Other);
}

#[test]
fn update_only_names_the_table_not_only() {
    assert_eq!(
        write("UPDATE ONLY t SET a = 1 WHERE id = 1").tables,
        vec![keys("t", vec![vec![lit("id", "1")]])]
    );
}
