use super::*;

#[test]
fn transaction_and_session_statements_are_other() {
    for sql in [
        "BEGIN",
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        "START TRANSACTION READ ONLY",
        "COMMIT",
        "END",
        "ROLLBACK",
        "SAVEPOINT a",
        "RELEASE SAVEPOINT a",
        "ROLLBACK TO SAVEPOINT a",
        "SET x = 1",
        "SET LOCAL statement_timeout = 5",
        "SET ROLE r",
        "SET TIME ZONE 'UTC'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SHOW x",
        "SHOW ALL",
        "DISCARD ALL",
        "LISTEN c",
        "UNLISTEN *",
        "NOTIFY c, 'x'",
        "DEALLOCATE p",
        "DEALLOCATE ALL",
        "PREPARE p AS SELECT 1",
        "PREPARE p (int) AS UPDATE t SET a = $1",
        "EXPLAIN SELECT 1",
        "VACUUM",
        "ANALYZE t",
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t",
        "FETCH 10 FROM c",
        "CLOSE c",
        "COMMENT ON TABLE t IS 'x'",
        "DROP INDEX i",
        "",
        ";",
        "-- only a comment",
    ] {
        assert_eq!(an(sql), Analysis::Other, "{sql}");
    }
}

#[test]
fn unparsable_harmless_statements_bypass() {
    for sql in [
        "ABORT",
        "RESET ALL",
        "CHECKPOINT",
        "MOVE c",
        "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
        "PREPARE TRANSACTION 'x'",
        "ROLLBACK PREPARED 'x'",
        "VACUUM ANALYZE t",
        "REINDEX TABLE t",
        "SET SESSION AUTHORIZATION r",
        "TABLE t",
    ] {
        assert_eq!(an(sql), Analysis::Bypass(BypassReason::Unparsable), "{sql}");
    }
}

#[test]
fn multiple_reads_bypass() {
    assert_eq!(
        bypass("SELECT 1; SELECT 2"),
        BypassReason::MultipleStatements
    );
    assert_eq!(
        bypass("BEGIN; SELECT * FROM t; COMMIT"),
        BypassReason::MultipleStatements
    );
}

#[test]
fn multiple_statements_report_their_writes() {
    let w = write("BEGIN; UPDATE t SET v = 1 WHERE id = 2; SELECT 1; DELETE FROM u; COMMIT");
    assert_eq!(
        w.tables,
        vec![keys("t", vec![vec![lit("id", "2")]]), wide("u")]
    );
}

#[test]
fn multiple_statements_with_ddl_combine_widely() {
    let info = ddl("UPDATE t SET v = 1 WHERE id = 2; ALTER TABLE u ADD COLUMN c int");
    assert_eq!(info.scope, DdlScope::Tables(vec![t("u"), t("t")]));
    assert_eq!(
        flush_reason("INSERT INTO t (id) VALUES (1); GRANT r1 TO r2"),
        FlushReason::Privileges
    );
}

#[test]
fn unparsable_multi_statement_text_is_split_and_classified() {
    assert_eq!(
        ddl_tables("BEGIN; REFRESH MATERIALIZED VIEW mv; COMMIT"),
        vec![t("mv")]
    );
    let w = write("COPY t FROM STDIN; SELECT 1");
    assert_eq!(w.tables, vec![wide("t")]);
}

#[test]
fn select_reporting_writes_and_read_tables_is_never_read() {
    // A write plus a volatile call is still a write.
    let w = write("WITH d AS (DELETE FROM t RETURNING *) SELECT now(), * FROM d");
    assert_eq!(w.tables, vec![wide("t")]);
}
