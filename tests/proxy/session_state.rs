//! Session state the pooler must follow exactly: a setting or role that one client leaves
//! on a server connection must never reach another client, nor be missing for the client
//! that set it, nor put a result under the wrong cache key.

use crate::fixture::{Proxy, fresh_database};
use crate::support::shared_pg;
use tokio_postgres::Client;

/// Schema `s2` shadows `public.t`, and `t` has row-level security per owner: who reads
/// it, and through which search_path, shows in the answer.
fn setup(pool: usize) -> (Proxy, String) {
    let pg = shared_pg();
    let db = fresh_database(pg, "state");
    pg.psql_db(
        &db,
        "CREATE TABLE t (owner text, v text);
         INSERT INTO t VALUES ('md5user', 'mine'), ('postgres', 'public');
         ALTER TABLE t ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON t USING (owner = current_user);
         CREATE SCHEMA s2; CREATE TABLE s2.t (v text); INSERT INTO s2.t VALUES ('s2');
         GRANT USAGE ON SCHEMA s2 TO md5user;
         GRANT SELECT ON t, s2.t TO md5user;
         CREATE TABLE pk (id int PRIMARY KEY, v text);
         INSERT INTO pk SELECT g, 'old' || g FROM generate_series(1, 10) g;",
    );
    let proxy = Proxy::start(pg, move |c| c.pool.max_size = pool);
    (proxy, db)
}

/// Rows `t` shows, comma-separated. The table owner (postgres) is not subject to the
/// policy unless it is forced, so postgres sees both rows, md5user only its own.
async fn rows(c: &Client) -> String {
    let out = c
        .simple_query("SELECT string_agg(v, ',' ORDER BY v) FROM t")
        .await
        .expect("read t");
    out.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default()
}

async fn one(c: &Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_and_set_local_in_one_query_make_the_transaction_read_through() {
    let (proxy, db) = setup(2);
    let warm = proxy.connect("postgres", "", &db).await;
    for _ in 0..3 {
        assert_eq!(rows(&warm).await, "mine,public");
    }
    let c = proxy.connect("postgres", "", &db).await;
    c.simple_query("BEGIN; SET LOCAL ROLE md5user")
        .await
        .expect("begin");
    assert_eq!(rows(&c).await, "mine", "as md5user, inside the transaction");
    c.batch_execute("COMMIT").await.expect("commit");
    c.simple_query("BEGIN; SET LOCAL search_path = s2")
        .await
        .expect("begin");
    assert_eq!(rows(&c).await, "s2");
    c.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(rows(&c).await, "mine,public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_keeps_the_role_as_postgres_does() {
    let (proxy, db) = setup(1);
    let a = proxy.connect("postgres", "", &db).await;
    a.batch_execute("SET ROLE md5user; RESET ALL")
        .await
        .expect("set role, reset all");
    assert_eq!(one(&a, "SELECT current_user::text").await, "md5user");
    for _ in 0..3 {
        assert_eq!(rows(&a).await, "mine");
    }
    // The only server connection goes to b between a's statements.
    let b = proxy.connect("postgres", "", &db).await;
    assert_eq!(one(&b, "SELECT current_user::text").await, "postgres");
    for _ in 0..3 {
        assert_eq!(rows(&b).await, "mine,public");
    }
    assert_eq!(rows(&a).await, "mine");
    // RESET SESSION AUTHORIZATION ends the role too.
    a.batch_execute("RESET SESSION AUTHORIZATION")
        .await
        .expect("reset session authorization");
    assert_eq!(one(&a, "SELECT current_user::text").await, "postgres");
    assert_eq!(rows(&a).await, "mine,public");
    let c = proxy.connect("postgres", "", &db).await;
    c.batch_execute("SET ROLE md5user").await.expect("set role");
    assert_eq!(rows(&c).await, "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_to_savepoint_undoes_only_the_sets_after_it() {
    let (proxy, db) = setup(1);
    let a = proxy.connect("postgres", "", &db).await;
    a.batch_execute("BEGIN; SET ROLE md5user; SAVEPOINT a")
        .await
        .expect("begin");
    a.batch_execute("SELECT 1/0")
        .await
        .expect_err("division by zero");
    a.batch_execute("ROLLBACK TO SAVEPOINT a; COMMIT")
        .await
        .expect("rollback to, commit");
    assert_eq!(one(&a, "SELECT current_user::text").await, "md5user");
    let b = proxy.connect("postgres", "", &db).await;
    for _ in 0..3 {
        assert_eq!(rows(&b).await, "mine,public");
    }
    assert_eq!(rows(&a).await, "mine");
    let c = proxy.connect("postgres", "", &db).await;
    c.batch_execute("BEGIN; SAVEPOINT a; SET search_path = s2; ROLLBACK TO a; COMMIT")
        .await
        .expect("set undone by rollback to");
    for _ in 0..3 {
        assert_eq!(rows(&c).await, "mine,public");
        assert_eq!(rows(&b).await, "mine,public");
    }
    // COMMIT AND CHAIN keeps what the first transaction set, whatever the next one does.
    let d = proxy.connect("postgres", "", &db).await;
    d.batch_execute("BEGIN; SET search_path = s2; COMMIT AND CHAIN; ROLLBACK")
        .await
        .expect("commit and chain");
    assert_eq!(rows(&d).await, "s2");
    assert_eq!(rows(&b).await, "mine,public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_setting_names_are_followed() {
    let (proxy, db) = setup(1);
    let a = proxy.connect("postgres", "", &db).await;
    a.batch_execute("SET \"search_path\" TO s2")
        .await
        .expect("set");
    assert_eq!(rows(&a).await, "s2");
    let b = proxy.connect("postgres", "", &db).await;
    for _ in 0..3 {
        assert_eq!(rows(&b).await, "mine,public");
    }
    assert_eq!(rows(&a).await, "s2");
    a.batch_execute("RESET \"search_path\"")
        .await
        .expect("reset");
    assert_eq!(rows(&a).await, "mine,public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_restores_the_startup_value_as_postgres_does() {
    let (proxy, db) = setup(1);
    let url = format!(
        "{}?options=-c%20search_path%3Ds2",
        proxy.url("postgres", "", &db)
    );
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect with options");
        tokio::spawn(conn);
        client
    };
    let a = connect().await;
    assert_eq!(rows(&a).await, "s2");
    a.batch_execute("SET search_path = public")
        .await
        .expect("set");
    assert_eq!(rows(&a).await, "mine,public");
    a.batch_execute("RESET search_path").await.expect("reset");
    assert_eq!(rows(&a).await, "s2", "back to the startup value");
    let b = connect().await;
    for _ in 0..3 {
        assert_eq!(rows(&b).await, "s2");
    }
    for reset in ["RESET ALL", "DISCARD ALL"] {
        a.batch_execute(reset).await.expect(reset);
        assert_eq!(one(&a, "SHOW search_path").await, "s2", "after {reset}");
        assert_eq!(rows(&a).await, "s2", "after {reset}");
        assert_eq!(rows(&b).await, "s2");
    }
    let plain = proxy.connect("postgres", "", &db).await;
    assert_eq!(rows(&plain).await, "mine,public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_invalidates_even_when_the_query_goes_on_to_roll_back() {
    let (proxy, db) = setup(2);
    let c = proxy.connect("postgres", "", &db).await;
    let read = "SELECT v FROM pk WHERE id = 9";
    for _ in 0..3 {
        assert_eq!(one(&c, read).await, "old9");
    }
    c.batch_execute("BEGIN; UPDATE pk SET v = 'new9' WHERE id = 9; COMMIT; BEGIN; ROLLBACK")
        .await
        .expect("commit then rollback");
    assert_eq!(one(&c, read).await, "new9");
    // COMMIT AND CHAIN: committed while the next transaction is open.
    let other = proxy.connect("postgres", "", &db).await;
    let read8 = "SELECT v FROM pk WHERE id = 8";
    for _ in 0..3 {
        assert_eq!(one(&other, read8).await, "old8");
    }
    c.batch_execute("BEGIN; UPDATE pk SET v = 'new8' WHERE id = 8; COMMIT AND CHAIN")
        .await
        .expect("commit and chain");
    assert_eq!(one(&other, read8).await, "new8");
    c.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(one(&other, read8).await, "new8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_float_parameters_are_not_read_as_integer_keys() {
    use tokio_postgres::types::Type;
    let (proxy, db) = setup(2);
    let c = proxy.connect("postgres", "", &db).await;
    let by_float = c
        .prepare_typed("SELECT v FROM pk WHERE id = $1", &[Type::FLOAT8])
        .await
        .expect("prepare");
    for _ in 0..3 {
        let v: String = c
            .query_one(&by_float, &[&5.0f64])
            .await
            .expect("read")
            .get(0);
        assert_eq!(v, "old5");
    }
    c.batch_execute("UPDATE pk SET v = 'new5' WHERE id = 5")
        .await
        .expect("update");
    let v: String = c
        .query_one(&by_float, &[&5.0f64])
        .await
        .expect("read")
        .get(0);
    assert_eq!(v, "new5");
    // And a write keyed by a float parameter invalidates the integer point read.
    for _ in 0..3 {
        assert_eq!(one(&c, "SELECT v FROM pk WHERE id = 6").await, "old6");
    }
    let update = c
        .prepare_typed("UPDATE pk SET v = 'new6' WHERE id = $1", &[Type::FLOAT8])
        .await
        .expect("prepare update");
    c.execute(&update, &[&6.0f64]).await.expect("update");
    assert_eq!(one(&c, "SELECT v FROM pk WHERE id = 6").await, "new6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_defaults_changed_through_pgstash_reach_new_sessions() {
    let (proxy, db) = setup(1);
    let a = proxy.connect("postgres", "", &db).await;
    let q = "SELECT '2024-01-02'::date::text";
    for _ in 0..3 {
        assert_eq!(one(&a, q).await, "2024-01-02");
    }
    a.batch_execute(&format!(
        "ALTER DATABASE \"{db}\" SET DateStyle = 'SQL, DMY'"
    ))
    .await
    .expect("alter database");
    // A new session starts with the database's new default, as it would on Postgres.
    let b = proxy.connect("postgres", "", &db).await;
    assert_eq!(one(&b, "SHOW DateStyle").await, "SQL, DMY");
    for _ in 0..3 {
        assert_eq!(one(&b, q).await, "02/01/2024");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_settings_survive_comments_and_combine_like_postgres() {
    let (proxy, db) = setup(1);
    let a = proxy.connect("postgres", "", &db).await;
    a.batch_execute("SET search_path TO public -- app init")
        .await
        .expect("set with a comment");
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .expect("tz");
    a.batch_execute("SET DateStyle = 'SQL'").await.expect("ds");
    a.batch_execute("SET DateStyle = 'DMY'")
        .await
        .expect("ds order");
    a.batch_execute("SET XML OPTION DOCUMENT; RESET xmloption")
        .await
        .expect("xml option");
    let q = "SELECT '2024-01-02 03:04:05+00'::timestamptz::text";
    // b takes the only server connection in between: a's settings are replayed for a.
    let b = proxy.connect("postgres", "", &db).await;
    for _ in 0..3 {
        assert_eq!(one(&b, q).await, "2024-01-02 03:04:05+00");
        assert_eq!(one(&a, "SHOW TimeZone").await, "Asia/Tokyo");
        assert_eq!(one(&a, "SHOW DateStyle").await, "SQL, DMY");
        assert_eq!(one(&a, "SHOW xmloption").await, "content");
        assert_eq!(one(&a, q).await, "02/01/2024 12:04:05 JST");
    }
    // Another client with only the order part gets its own rendering.
    let c = proxy.connect("postgres", "", &db).await;
    c.batch_execute("SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'DMY'")
        .await
        .expect("set");
    for _ in 0..3 {
        assert_eq!(one(&c, q).await, "2024-01-02 12:04:05+09");
    }
    assert_eq!(one(&a, q).await, "02/01/2024 12:04:05 JST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_follow_ddl_and_search_path() {
    let (proxy, db) = setup(1);
    shared_pg().psql_db(
        &db,
        "CREATE TABLE t2 (id int PRIMARY KEY, a text);
         INSERT INTO t2 VALUES (1, 'a');
         CREATE SCHEMA s1; CREATE TABLE s1.u (id int, v text); INSERT INTO s1.u VALUES (5, 's1-five');
         CREATE TABLE s2.u (id text, v text); INSERT INTO s2.u VALUES ('5', 's2-five');",
    );
    let a = proxy.connect("postgres", "", &db).await;
    let sel = "SELECT * FROM t2 WHERE id = $1";
    let rows = a.query(sel, &[&1i32]).await.expect("prepared read");
    assert_eq!(rows[0].len(), 2);
    a.batch_execute("ALTER TABLE t2 ADD COLUMN b text DEFAULT 'new'")
        .await
        .expect("alter");
    // A new client preparing the same text gets the new shape, as on Postgres.
    let b = proxy.connect("postgres", "", &db).await;
    let rows = b.query(sel, &[&1i32]).await.expect("prepared after DDL");
    assert_eq!(rows[0].len(), 3);
    assert_eq!(rows[0].get::<_, String>(2), "new");
    // The same text under two search_paths: parameter types inferred per path.
    let c = proxy.connect("postgres", "", &db).await;
    c.batch_execute("SET search_path = s1").await.expect("path");
    let d = proxy.connect("postgres", "", &db).await;
    d.batch_execute("SET search_path = s2").await.expect("path");
    let q = "SELECT v FROM u WHERE id = $1";
    let sc = c.prepare(q).await.expect("prepare s1");
    let sd = d.prepare(q).await.expect("prepare s2");
    assert_eq!(sd.params(), &[tokio_postgres::types::Type::TEXT]);
    let vc: String = c.query_one(&sc, &[&5i32]).await.expect("s1").get(0);
    let vd: String = d.query_one(&sd, &[&"5"]).await.expect("s2").get(0);
    assert_eq!((vc.as_str(), vd.as_str()), ("s1-five", "s2-five"));
    // And a Parse after DROP TABLE is refused by Postgres, not answered from memory.
    a.query("SELECT id FROM t2 WHERE id = $1", &[&1i32])
        .await
        .expect("prepared");
    a.batch_execute("DROP TABLE t2").await.expect("drop");
    let err = b
        .prepare("SELECT id FROM t2 WHERE id = $1")
        .await
        .expect_err("t2 is gone");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_postgres_takes_only_at_session_start_do_not_refuse_the_client() {
    let (proxy, db) = setup(1);
    let url = format!(
        "{}?options=-c%20log_disconnections%3Don%20-c%20search_path%3Ds2",
        proxy.url("postgres", "", &db)
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect with session-start options");
    tokio::spawn(conn);
    assert_eq!(rows(&client).await, "s2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_changed_inside_a_function_stays_with_its_client() {
    let (proxy, db) = setup(1);
    let pg = shared_pg();
    pg.psql_db(
        &db,
        "CREATE FUNCTION to_tokyo() RETURNS int LANGUAGE plpgsql
             AS $$ BEGIN SET timezone = 'Asia/Tokyo'; RETURN 1; END $$;",
    );
    let read = "SELECT '2020-01-01 00:00+00'::timestamptz::text";
    let direct = pg.client(&db).await;
    let expected: String = direct.query_one(read, &[]).await.expect("direct").get(0);
    assert!(!expected.ends_with("+09"), "{expected}");
    // The function's SET shows only as a ParameterStatus: the client keeps its server
    // connection, and nothing it reads under Tokyo time goes into the cache.
    let a = proxy.connect("postgres", "", &db).await;
    one(&a, "SELECT to_tokyo()::text").await;
    for _ in 0..3 {
        assert_eq!(one(&a, read).await, "2020-01-01 09:00:00+09");
    }
    drop(a);
    // Through a pool of one: the next client gets another server connection, and the
    // time as its own settings (none) render it.
    let b = proxy.connect("postgres", "", &db).await;
    for _ in 0..3 {
        assert_eq!(one(&b, read).await, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_pipelined_behind_another_statement_does_not_pin() {
    let pg = shared_pg();
    let db = fresh_database(pg, "pipeset");
    let proxy = Proxy::start(pg, |c| {
        c.pool.max_size = 1;
        c.pool.checkout_timeout = std::time::Duration::from_secs(2);
    });
    let a = proxy.connect("postgres", "", &db).await;
    // Both go out before the first ReadyForQuery comes back: the SET's ParameterStatus
    // arrives after the SELECT's ReadyForQuery, and is still the client's own doing.
    let (first, set) = futures_util::join!(
        a.simple_query("SELECT 1"),
        a.simple_query("SET TimeZone = 'Asia/Tokyo'")
    );
    first.expect("select");
    set.expect("set");
    assert_eq!(one(&a, "SHOW TimeZone").await, "Asia/Tokyo");
    // Not pinned: the only server connection is free for another client between
    // transactions.
    let b = proxy.connect("postgres", "", &db).await;
    assert_eq!(one(&b, "SELECT 2::text").await, "2");
    assert_eq!(one(&a, "SHOW TimeZone").await, "Asia/Tokyo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_changed_inside_a_function_is_never_shared_nor_served_from_the_cache() {
    let (proxy, db) = setup(1);
    let pg = shared_pg();
    // SET ROLE between two roles that are not superusers: Postgres reports nothing.
    pg.psql_db(
        &db,
        "CREATE ROLE rolefn_a LOGIN PASSWORD 'rolefnpass'; CREATE ROLE rolefn_b; GRANT rolefn_b TO rolefn_a;
         GRANT SELECT ON t TO rolefn_a, rolefn_b;
         INSERT INTO t VALUES ('rolefn_a', 'a-row'), ('rolefn_b', 'b-row');
         CREATE FUNCTION become(r text) RETURNS text LANGUAGE plpgsql
             AS $$ BEGIN EXECUTE format('SET ROLE %I', r); RETURN r; END $$;",
    );
    let a = proxy.connect("rolefn_a", "rolefnpass", &db).await;
    for _ in 0..3 {
        assert_eq!(rows(&a).await, "a-row");
    }
    assert_eq!(one(&a, "SELECT become('rolefn_b')").await, "rolefn_b");
    for _ in 0..2 {
        assert_eq!(rows(&a).await, "b-row", "read as rolefn_b now");
        assert_eq!(one(&a, "SELECT current_user::text").await, "rolefn_b");
    }
    drop(a);
    // Through a pool of one: the next client of the same role does not inherit rolefn_b.
    let b = proxy.connect("rolefn_a", "rolefnpass", &db).await;
    assert_eq!(one(&b, "SELECT current_user::text").await, "rolefn_a");
    for _ in 0..3 {
        assert_eq!(rows(&b).await, "a-row");
    }
    // A superuser becoming someone else: Postgres reports is_superuser, which pins too,
    // even for a function the catalog has not seen (created behind pgstash's back).
    let c = proxy.connect("postgres", "", &db).await;
    for _ in 0..3 {
        assert!(rows(&c).await.contains("public"));
    }
    pg.psql_db(
        &db,
        "CREATE FUNCTION become_late(r text) RETURNS text LANGUAGE plpgsql
             AS $$ BEGIN EXECUTE format('SET ROLE %I', r); RETURN r; END $$;",
    );
    assert_eq!(one(&c, "SELECT become_late('md5user')").await, "md5user");
    for _ in 0..2 {
        assert_eq!(rows(&c).await, "mine");
    }
}
