use super::*;

#[test]
fn grant_and_revoke_on_tables_name_them() {
    assert_eq!(ddl_tables("GRANT SELECT ON t TO r"), vec![t("t")]);
    assert_eq!(
        ddl_tables("GRANT SELECT ON TABLE s.t, u TO r"),
        vec![t("s.t"), t("u")]
    );
    assert_eq!(ddl_tables("REVOKE SELECT ON t FROM r"), vec![t("t")]);
}

#[test]
fn other_grants_flush_the_database() {
    for sql in [
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO r",
        "GRANT USAGE ON SCHEMA s TO r",
        "GRANT r1 TO r2",
        "REVOKE r1 FROM r2",
        "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO r",
    ] {
        assert_eq!(flush_reason(sql), FlushReason::Privileges, "{sql}");
    }
}

#[test]
fn role_changes_flush_the_database() {
    for sql in [
        "ALTER ROLE x SET search_path = y",
        "ALTER USER x WITH PASSWORD 'y'",
        "CREATE ROLE x",
        "DROP ROLE x",
        "REASSIGN OWNED BY a TO b",
        "DROP OWNED BY a",
    ] {
        assert_eq!(flush_reason(sql), FlushReason::Role, "{sql}");
    }
}

#[test]
fn policies_name_their_table() {
    assert_eq!(
        ddl_tables("CREATE POLICY p ON t USING (true)"),
        vec![t("t")]
    );
    assert_eq!(
        ddl_tables("ALTER POLICY p ON s.t USING (false)"),
        vec![t("s.t")]
    );
    assert_eq!(ddl_tables("DROP POLICY p ON t"), vec![t("t")]);
}

#[test]
fn function_changes_flush_the_database() {
    for sql in [
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
        "CREATE OR REPLACE FUNCTION f() RETURNS int AS $$ select 1; $$ LANGUAGE sql",
        "DROP FUNCTION f",
        "ALTER FUNCTION f() STABLE",
    ] {
        assert_eq!(flush_reason(sql), FlushReason::Function, "{sql}");
    }
}

#[test]
fn table_ddl_names_the_table() {
    assert_eq!(ddl_tables("ALTER TABLE t ADD COLUMN c int"), vec![t("t")]);
    assert_eq!(
        ddl_tables("ALTER TABLE t ENABLE ROW LEVEL SECURITY"),
        vec![t("t")]
    );
    assert_eq!(ddl_tables("DROP TABLE a, s.b"), vec![t("a"), t("s.b")]);
    assert_eq!(ddl_tables("DROP VIEW v"), vec![t("v")]);
    assert_eq!(ddl_tables("DROP MATERIALIZED VIEW mv"), vec![t("mv")]);
    assert_eq!(ddl_tables("CREATE INDEX i ON t (a)"), vec![t("t")]);
    assert_eq!(
        ddl_tables("CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON s.t USING btree (a)"),
        vec![t("s.t")]
    );
    assert_eq!(
        ddl_tables("CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()"),
        vec![t("t")]
    );
    assert_eq!(ddl_tables("DROP TRIGGER tr ON t"), vec![t("t")]);
}

#[test]
fn refresh_materialized_view_names_it() {
    // Unparsable for sqlparser: attributed by the lexical fallback.
    assert_eq!(ddl_tables("REFRESH MATERIALIZED VIEW mv"), vec![t("mv")]);
    assert_eq!(
        ddl_tables("REFRESH MATERIALIZED VIEW CONCURRENTLY s.\"MV\" WITH DATA"),
        vec![t("s.MV")]
    );
}

#[test]
fn new_or_renamed_relations_flush_the_database() {
    for sql in [
        "CREATE TABLE t (id int)",
        "CREATE TABLE t AS SELECT 1",
        "CREATE VIEW v AS SELECT 1",
        "CREATE OR REPLACE VIEW v AS SELECT * FROM t",
        "CREATE MATERIALIZED VIEW mv AS SELECT 1",
        "CREATE SEQUENCE sq",
        "SELECT * INTO t2 FROM t",
        "ALTER TABLE t RENAME TO u",
    ] {
        assert_eq!(flush_reason(sql), FlushReason::NewRelation, "{sql}");
    }
}

#[test]
fn unparsable_ddl_flushes_the_database() {
    for sql in [
        "CREATE UNLOGGED TABLE t (id int)",
        "ALTER TABLE s.t SET SCHEMA u",
        "ALTER VIEW v RENAME TO w",
        "SECURITY LABEL ON TABLE t IS 'x'",
        "CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING",
        "IMPORT FOREIGN SCHEMA x FROM SERVER s INTO y",
    ] {
        assert_eq!(flush_reason(sql), FlushReason::Unparsable, "{sql}");
    }
}

#[test]
fn temp_relations_mark_the_session() {
    for (sql, name) in [
        ("CREATE TEMP TABLE scratch (id int)", "scratch"),
        ("CREATE TEMPORARY TABLE scratch AS SELECT 1", "scratch"),
        ("CREATE TEMP VIEW v AS SELECT 1", "v"),
        ("SELECT * INTO TEMP scratch FROM t", "scratch"),
    ] {
        let info = ddl(sql);
        assert!(info.creates_temp, "{sql}");
        assert_eq!(info.scope, DdlScope::Tables(vec![t(name)]), "{sql}");
    }
    // Unparsable temp creation still marks the session.
    let info = ddl("CREATE GLOBAL TEMPORARY TABLE x (a int) ON COMMIT DROP PRESERVE");
    assert!(info.creates_temp);
}

#[test]
fn cascade_flushes_the_database() {
    assert_eq!(flush_reason("DROP TABLE a CASCADE"), FlushReason::Cascade);
    assert_eq!(flush_reason("DROP SCHEMA s CASCADE"), FlushReason::Cascade);
}

#[test]
fn procedural_statements_flush_the_database() {
    assert_eq!(flush_reason("EXECUTE p"), FlushReason::Procedural);
    assert_eq!(flush_reason("EXECUTE p(1, 'a')"), FlushReason::Procedural);
    for sql in ["CALL p(1)", "DO $$ BEGIN CREATE TEMP TABLE x(); END $$"] {
        let info = ddl(sql);
        assert_eq!(
            info.scope,
            DdlScope::Database(FlushReason::Procedural),
            "{sql}"
        );
        assert!(info.creates_temp, "{sql}");
    }
}

#[test]
fn commit_prepared_flushes() {
    assert_eq!(
        flush_reason("COMMIT PREPARED 'x'"),
        FlushReason::TwoPhaseCommit
    );
}

#[test]
fn unrecognised_parsed_statements_flush() {
    for sql in [
        "CREATE SCHEMA s",
        "CREATE EXTENSION pgcrypto",
        "CREATE TYPE mood AS ENUM ('a')",
    ] {
        assert_eq!(flush_reason(sql), FlushReason::Unrecognised, "{sql}");
    }
}

#[test]
fn cluster_and_vacuum_full_flush_because_row_order_changes() {
    for sql in [
        "CLUSTER w USING w_pkey",
        "CLUSTER",
        "VACUUM FULL w",
        "VACUUM (FULL) w",
        "vacuum (full, analyze) w",
    ] {
        assert_eq!(
            an(sql),
            Analysis::Ddl(DdlInfo {
                scope: DdlScope::Database(FlushReason::Rewrite),
                creates_temp: false,
            }),
            "{sql}"
        );
    }
    for sql in ["VACUUM w", "VACUUM (ANALYZE) w"] {
        assert!(!matches!(an(sql), Analysis::Ddl(_)), "{sql}");
    }
}

#[test]
fn server_setting_changes_flush() {
    for sql in [
        "ALTER SYSTEM SET timezone = 'Asia/Tokyo'",
        "alter system reset all",
        "SELECT pg_reload_conf()",
        "SELECT pg_catalog.pg_reload_conf()",
    ] {
        assert_eq!(
            an(sql),
            Analysis::Ddl(DdlInfo {
                scope: DdlScope::Database(FlushReason::Settings),
                creates_temp: false,
            }),
            "{sql}"
        );
    }
}
