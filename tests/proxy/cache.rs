//! The query cache seen from clients: hits happen, and nothing stale or private is served.
//!
//! A hit is observed by changing a row *behind pgstash's back* (a direct connection to
//! Postgres, which pgstash cannot see until the invalidation sources of a later issue exist):
//! a read through pgstash that still returns the old value was answered from the cache.

use crate::fixture::{Proxy, fresh_database};
use crate::support::shared_pg;
use tokio_postgres::Client;

async fn setup(rows: i32) -> (Proxy, String, Client) {
    let (db, direct) = table_t(rows).await;
    let proxy = Proxy::start(shared_pg(), |c| c.pool.max_size = 4);
    (proxy, db, direct)
}

/// A fresh database whose table `t` holds `rows` rows (and a view `tv` over it), with a
/// direct connection to it.
async fn table_t(rows: i32) -> (String, Client) {
    let pg = shared_pg();
    let db = fresh_database(pg, "cache");
    pg.psql_db(
        &db,
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL, note text);
             INSERT INTO t SELECT g, g * 10, 'n' || g FROM generate_series(1, {rows}) g;
             CREATE VIEW tv AS SELECT id, v FROM t;"
        ),
    );
    let direct = pg.client(&db).await;
    (db, direct)
}

async fn v_of(c: &Client, sql: &str, id: i32) -> i32 {
    c.query_one(sql, &[&id]).await.expect("read").get(0)
}

async fn simple_int(c: &Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .expect("simple read")
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reads_are_answered_from_the_cache_in_both_protocols() {
    let (proxy, db, direct) = setup(10).await;
    let c = proxy.connect("postgres", "", &db).await;
    assert_eq!(v_of(&c, "SELECT v FROM t WHERE id = $1", 3).await, 30);
    assert_eq!(simple_int(&c, "SELECT v FROM t WHERE id = 3").await, "30");
    direct
        .execute("UPDATE t SET v = 31 WHERE id = 3", &[])
        .await
        .expect("direct write");
    // pgstash did not see that write: both protocols answer from the cache.
    assert_eq!(v_of(&c, "SELECT v FROM t WHERE id = $1", 3).await, 30);
    assert_eq!(simple_int(&c, "SELECT v FROM t WHERE id = 3").await, "30");
    // Another client with the same settings shares the entries.
    let other = proxy.connect("postgres", "", &db).await;
    assert_eq!(v_of(&other, "SELECT v FROM t WHERE id = $1", 3).await, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_write_through_pgstash_invalidates_reads() {
    let (proxy, db, _direct) = setup(10).await;
    let reader = proxy.connect("postgres", "", &db).await;
    let writer = proxy.connect("postgres", "", &db).await;
    let count = "SELECT count(*)::int FROM t";
    let sum = "SELECT coalesce(sum(v), 0)::int FROM t";
    let view = "SELECT coalesce(sum(v), 0)::int FROM tv";
    let qualified = "SELECT coalesce(sum(v), 0)::int FROM public.t";
    let writes = [
        "INSERT INTO t VALUES (100, 1, 'x')",
        "UPDATE t SET v = v + 1 WHERE id = 100",
        "UPDATE t SET v = v + 1 WHERE note = 'x'",
        "DELETE FROM t WHERE id = 100",
        "INSERT INTO t VALUES (101, 5, 'y') ON CONFLICT (id) DO UPDATE SET v = t.v + 1",
        "INSERT INTO t VALUES (101, 5, 'y') ON CONFLICT (id) DO UPDATE SET v = t.v + 1",
        "WITH d AS (DELETE FROM t WHERE id = 101 RETURNING *) SELECT count(*) FROM d",
        "MERGE INTO t USING (SELECT 102 AS id) s ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (102, 7, 'm')",
        "UPDATE public.t SET v = v * 2 WHERE id = 102",
        "TRUNCATE t",
        "INSERT INTO t SELECT g, g, 'z' FROM generate_series(1, 5) g",
        "ALTER TABLE t ADD COLUMN extra int DEFAULT 0",
        "CREATE OR REPLACE VIEW tv AS SELECT id, v * 100 AS v FROM t",
    ];
    for w in writes {
        for q in [count, sum, view, qualified] {
            simple_int(&reader, q).await; // make sure the read is cached
        }
        writer
            .batch_execute(w)
            .await
            .unwrap_or_else(|e| panic!("{w}: {e}"));
        let direct = shared_pg().client(&db).await;
        for q in [count, sum, view, qualified] {
            let expected = simple_int(&direct, q).await;
            assert_eq!(
                simple_int(&reader, q).await,
                expected,
                "after `{w}`, `{q}` is stale"
            );
        }
    }
    // COPY FROM through pgstash.
    simple_int(&reader, count).await;
    let sink = writer
        .copy_in("COPY t (id, v, note) FROM STDIN")
        .await
        .expect("copy");
    use futures_util::SinkExt;
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from_static(b"500\t1\tc\n501\t2\tc\n"))
        .await
        .expect("copy data");
    sink.as_mut().finish().await.expect("copy done");
    let direct = shared_pg().client(&db).await;
    assert_eq!(
        simple_int(&reader, count).await,
        simple_int(&direct, count).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_uncommitted_writes_leave_no_trace() {
    let (proxy, db, _direct) = setup(5).await;
    let mut a = proxy.connect("postgres", "", &db).await;
    let b = proxy.connect("postgres", "", &db).await;
    let q = "SELECT v FROM t WHERE id = $1";
    assert_eq!(v_of(&b, q, 1).await, 10);
    let tx = a.transaction().await.expect("begin");
    tx.execute("UPDATE t SET v = 99 WHERE id = 1", &[])
        .await
        .expect("update");
    // The writer sees its own write; it must not be cached for anyone.
    assert_eq!(
        tx.query_one(q, &[&1])
            .await
            .expect("own read")
            .get::<_, i32>(0),
        99
    );
    assert_eq!(
        v_of(&b, q, 1).await,
        10,
        "uncommitted data must not be visible"
    );
    tx.rollback().await.expect("rollback");
    assert_eq!(v_of(&b, q, 1).await, 10);
    assert_eq!(v_of(&a, q, 1).await, 10);
    // And a commit is seen at once by the other client.
    a.execute("UPDATE t SET v = 11 WHERE id = 1", &[])
        .await
        .expect("autocommit update");
    assert_eq!(v_of(&b, q, 1).await, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_functions_locking_reads_and_repeatable_read_bypass_the_cache() {
    let (proxy, db, direct) = setup(5).await;
    let c = proxy.connect("postgres", "", &db).await;
    let cases = [
        "SELECT v FROM t WHERE id = 2 AND now() IS NOT NULL",
        "SELECT v FROM t WHERE id = 2 AND random() < 2",
        "SELECT v FROM t WHERE id = 2 FOR UPDATE",
        "SELECT v FROM t WHERE id = 2 FOR SHARE",
    ];
    for q in cases {
        simple_int(&c, q).await;
    }
    direct
        .execute("UPDATE t SET v = v + 1 WHERE id = 2", &[])
        .await
        .expect("direct");
    let expected = simple_int(&direct, "SELECT v FROM t WHERE id = 2").await;
    for q in cases {
        assert_eq!(
            simple_int(&c, q).await,
            expected,
            "`{q}` must not be cached"
        );
    }
    // REPEATABLE READ: reads go to Postgres (and see the transaction's snapshot).
    simple_int(&c, "SELECT v FROM t WHERE id = 3").await;
    direct
        .execute("UPDATE t SET v = v + 1 WHERE id = 3", &[])
        .await
        .expect("direct");
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .expect("begin");
    let fresh = simple_int(&direct, "SELECT v FROM t WHERE id = 3").await;
    assert_eq!(simple_int(&c, "SELECT v FROM t WHERE id = 3").await, fresh);
    c.batch_execute("COMMIT").await.expect("commit");
}

/// In a transaction that `begin` opens with a snapshot (REPEATABLE READ), reads must see
/// the snapshot, not what the cache holds now, and must not leave that snapshot in the cache.
async fn a_snapshot_transaction_bypasses_the_cache(c: &Client, other: &Client, begin: &str) {
    c.batch_execute(begin).await.expect("begin");
    let before = simple_int(c, "SELECT v FROM t WHERE id = 4").await;
    other
        .execute("UPDATE t SET v = v + 1 WHERE id = 4", &[])
        .await
        .expect("update through pgstash");
    // Cached by the other client, fresh for everyone outside c's transaction.
    let after = simple_int(other, "SELECT v FROM t WHERE id = 4").await;
    assert_eq!(
        simple_int(other, "SELECT v FROM t WHERE id = 4").await,
        after
    );
    assert_ne!(before, after);
    assert_eq!(
        simple_int(c, "SELECT v FROM t WHERE id = 4").await,
        before,
        "the transaction's snapshot, not the cached row"
    );
    c.batch_execute("COMMIT").await.expect("commit");
    // Outside a transaction block each statement is its own snapshot: the cache may serve,
    // and must not hold the old snapshot's row.
    assert_eq!(simple_int(c, "SELECT v FROM t WHERE id = 4").await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_characteristics_make_later_transactions_bypass_the_cache() {
    let (proxy, db, _direct) = setup(5).await;
    let c = proxy.connect("postgres", "", &db).await;
    let other = proxy.connect("postgres", "", &db).await;
    c.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .expect("set");
    a_snapshot_transaction_bypasses_the_cache(&c, &other, "BEGIN").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_default_of_repeatable_read_makes_transactions_bypass_the_cache() {
    let (proxy, db, direct) = setup(5).await;
    direct
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET default_transaction_isolation = 'repeatable read'"
        ))
        .await
        .expect("alter database");
    // New sessions (and pgstash's server connections) start with it.
    let c = proxy.connect("postgres", "", &db).await;
    let other = proxy.connect("postgres", "", &db).await;
    assert_eq!(
        simple_int(&c, "SHOW default_transaction_isolation").await,
        "repeatable read"
    );
    a_snapshot_transaction_bypasses_the_cache(&c, &other, "BEGIN").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_never_leaks_a_search_path_into_the_cache_or_to_other_clients() {
    let pg = shared_pg();
    let db = fresh_database(pg, "setconfig");
    pg.psql_db(
        &db,
        "CREATE SCHEMA a; CREATE TABLE a.s (x text); INSERT INTO a.s VALUES ('schema a');
         CREATE TABLE public.s (x text); INSERT INTO public.s VALUES ('public');",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let q = "SELECT x FROM s";
    let pa = proxy.connect("postgres", "", &db).await;
    let pb = proxy.connect("postgres", "", &db).await;
    pa.simple_query("SELECT set_config('search_path', 'a', false)")
        .await
        .expect("set_config");
    // The pool is LIFO: without care, pb is handed the connection pa just changed, which
    // carries the same settings fingerprint as a fresh one.
    for _ in 0..2 {
        assert_eq!(simple_int(&pb, q).await, "public");
        assert_eq!(simple_int(&pa, q).await, "schema a");
    }
    drop(pa);
    let pc = proxy.connect("postgres", "", &db).await;
    for _ in 0..3 {
        assert_eq!(simple_int(&pc, q).await, "public");
        assert_eq!(simple_int(&pb, q).await, "public");
    }
    // For one transaction only, in both protocols: the rest of it reads through.
    pb.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(simple_int(&pb, q).await, "public");
    pb.simple_query("SELECT set_config('search_path', 'a', true)")
        .await
        .expect("local set_config");
    assert_eq!(simple_int(&pb, q).await, "schema a");
    let row = pb.query_one(q, &[]).await.expect("extended read");
    assert_eq!(row.get::<_, String>(0), "schema a");
    pb.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(simple_int(&pb, q).await, "public");
    pb.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(simple_int(&pb, q).await, "public");
    pb.query("SELECT set_config($1, $2, true)", &[&"search_path", &"a"])
        .await
        .expect("local set_config, extended");
    assert_eq!(simple_int(&pb, q).await, "schema a");
    pb.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(simple_int(&pb, q).await, "public");
    assert_eq!(simple_int(&pc, q).await, "public");
}

/// A client that stays connected across a schema change plans its reads with the new
/// schema: a view redefined over another table is invalidated by writes to that table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_session_sees_a_view_redefined_over_another_table() {
    let pg = shared_pg();
    let db = fresh_database(pg, "viewswap");
    pg.psql_db(
        &db,
        "CREATE TABLE old_t (id int PRIMARY KEY, v text);
         CREATE TABLE new_t (id int PRIMARY KEY, v text);
         INSERT INTO old_t VALUES (1, 'old');
         INSERT INTO new_t VALUES (1, 'new');
         CREATE VIEW cur AS SELECT id, v FROM old_t;",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let reader = proxy.connect("postgres", "", &db).await;
    let writer = proxy.connect("postgres", "", &db).await;
    let q = "SELECT v FROM cur WHERE id = 1";
    assert_eq!(simple_int(&reader, q).await, "old");
    writer
        .batch_execute("CREATE OR REPLACE VIEW cur AS SELECT id, v FROM new_t")
        .await
        .expect("redefine the view");
    for _ in 0..3 {
        assert_eq!(simple_int(&reader, q).await, "new");
    }
    writer
        .batch_execute("UPDATE new_t SET v = 'newer' WHERE id = 1")
        .await
        .expect("update");
    assert_eq!(simple_int(&reader, q).await, "newer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_that_call_functions_are_never_served_stale() {
    let pg = shared_pg();
    let db = fresh_database(pg, "viewfn");
    pg.psql_db(
        &db,
        "CREATE SEQUENCE sq;
         CREATE VIEW nv AS SELECT nextval('sq')::text AS n;
         CREATE VIEW nv2 AS SELECT n FROM nv;
         CREATE TABLE owners (id int PRIMARY KEY, name text);
         INSERT INTO owners VALUES (1, 'ann');
         CREATE FUNCTION owner_name(int) RETURNS text STABLE LANGUAGE sql
             AS $$ SELECT name FROM owners WHERE id = $1 $$;
         CREATE VIEW ov AS SELECT owner_name(1) AS o;
         CREATE TABLE stock (id int PRIMARY KEY, n int);
         INSERT INTO stock VALUES (1, 5);
         CREATE VIEW plain AS SELECT n + 1 AS n1 FROM stock;",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let c = proxy.connect("postgres", "", &db).await;
    // Each read of a view over nextval() advances the sequence, as Postgres would.
    for expected in 1..=4 {
        assert_eq!(
            simple_int(&c, "SELECT n FROM nv").await,
            expected.to_string()
        );
    }
    assert_eq!(simple_int(&c, "SELECT n FROM nv2").await, "5");
    assert_eq!(simple_int(&c, "SELECT n FROM nv2").await, "6");
    // A stable function reads a table the view's text does not name.
    for _ in 0..3 {
        assert_eq!(simple_int(&c, "SELECT o FROM ov").await, "ann");
    }
    c.batch_execute("UPDATE owners SET name = 'bob' WHERE id = 1")
        .await
        .expect("update");
    assert_eq!(simple_int(&c, "SELECT o FROM ov").await, "bob");
    // A view of immutable expressions over a table is still cached, and still fresh.
    for _ in 0..3 {
        assert_eq!(simple_int(&c, "SELECT n1::text FROM plain").await, "6");
    }
    c.batch_execute("UPDATE stock SET n = 7 WHERE id = 1")
        .await
        .expect("update");
    assert_eq!(simple_int(&c, "SELECT n1::text FROM plain").await, "8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_stored_as_now_and_read_as_a_time_is_never_served_stale() {
    let pg = shared_pg();
    let db = fresh_database(pg, "textnow");
    pg.psql_db(
        &db,
        "CREATE TABLE notes (id int PRIMARY KEY, note text, at timestamptz, doc jsonb);
         INSERT INTO notes VALUES (1, 'now', '2024-01-01 12:00+00', '{\"at\": \"now\"}');
         CREATE VIEW note_times AS SELECT id, note::timestamptz AS t FROM notes;
         CREATE VIEW note_times2 AS SELECT id, t FROM note_times;",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let c = proxy.connect("postgres", "", &db).await;
    // Each of these reads the current time from the text 'now': two reads a few
    // milliseconds apart must differ, as they do straight from Postgres.
    for sql in [
        "SELECT note::timestamptz::text FROM notes WHERE id = 1",
        "SELECT CAST(n.note AS timestamp)::text FROM notes n WHERE id = 1",
        "SELECT (doc ->> 'at')::timestamptz::text FROM notes WHERE id = 1",
        "SELECT x::timestamptz::text FROM (SELECT note AS x FROM notes) s",
        "SELECT t::text FROM note_times WHERE id = 1",
        "SELECT t::text FROM note_times2 WHERE id = 1",
    ] {
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(simple_int(&c, sql).await);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            seen[0] != seen[1] && seen[1] != seen[2],
            "{sql}: the same time three times: {seen:?}"
        );
    }
    // A timestamptz column cast to a date is still cached: a change made behind pgstash's
    // back (source = proxy sees none) is not seen until a write through pgstash.
    let day = "SELECT at::date::text FROM notes WHERE id = 1";
    for _ in 0..2 {
        assert_eq!(simple_int(&c, day).await, "2024-01-01");
    }
    let direct = pg.client(&db).await;
    direct
        .batch_execute("UPDATE notes SET at = '2025-06-30 12:00+00' WHERE id = 1")
        .await
        .expect("direct update");
    assert_eq!(simple_int(&c, day).await, "2024-01-01");
    c.batch_execute("UPDATE notes SET note = 'now' WHERE id = 1")
        .await
        .expect("update through pgstash");
    assert_eq!(simple_int(&c, day).await, "2025-06-30");
}

/// Three reads of `sql` a few milliseconds apart all differ, as they do straight from
/// Postgres when the answer follows the clock: none was a cached copy.
async fn follows_the_clock(c: &Client, sql: &str) {
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(simple_int(c, sql).await);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        seen[0] != seen[1] && seen[1] != seen[2],
        "{sql}: the same answer three times: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_read_from_text_by_any_route_is_never_served_stale() {
    let pg = shared_pg();
    let db = fresh_database(pg, "textnow2");
    pg.psql_db(
        &db,
        "CREATE EXTENSION hstore;
         CREATE TABLE t (id int PRIMARY KEY, note text, h hstore, x xml);
         INSERT INTO t VALUES (1, 'now', 'd=>now', '<r><d>now</d></r>');
         CREATE TABLE logs (id int PRIMARY KEY, at timestamptz);
         INSERT INTO logs VALUES (1, '2024-01-01');
         CREATE TYPE c1 AS (d timestamptz);
         CREATE DOMAIN ltree AS timestamptz;
         CREATE DOMAIN later AS timestamptz CHECK (VALUE > clock_timestamp());
         CREATE FUNCTION make_date(text) RETURNS text IMMUTABLE LANGUAGE sql AS 'SELECT $1';
         CREATE TYPE mood AS ENUM ('a', 'b');
         CREATE TABLE moods (id int PRIMARY KEY, m mood);
         INSERT INTO moods VALUES (1, 'a');
         CREATE VIEW vh AS SELECT id, (populate_record(NULL::c1, h)).d FROM t;
         CREATE VIEW vx AS SELECT d FROM t,
             xmltable('/r' PASSING t.x COLUMNS d timestamptz PATH 'd') AS xt;",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let c = proxy.connect("postgres", "", &db).await;
    for sql in [
        // Renamed by an alias list: `at` is t's text column here.
        "SELECT x.at::timestamptz::text FROM t x(id, at) WHERE id = 1",
        // A user type named like an extension's, a composite steering an immutable function.
        "SELECT note::ltree::text FROM t",
        "SELECT (populate_record(NULL::c1, h)).d::text FROM t",
        "SELECT d::text FROM vh",
        // A user function named like the built-in that builds a date.
        "SELECT make_date(note)::timestamptz::text FROM t",
        // Table functions whose column definitions read text as a time.
        "SELECT d::text FROM t, xmltable('/r' PASSING t.x COLUMNS d timestamptz PATH 'd') AS xt",
        "SELECT d::text FROM vx",
    ] {
        follows_the_clock(&c, sql).await;
    }
    // A parameter declared text, in binary format (tokio-postgres sends every one so).
    let stmt = c
        .prepare_typed(
            "SELECT $1::timestamptz::text",
            &[tokio_postgres::types::Type::TEXT],
        )
        .await
        .expect("prepare");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let row = c.query_one(&stmt, &[&"now"]).await.expect("read");
        seen.push(row.get::<_, String>(0));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(seen[0] != seen[1] && seen[1] != seen[2], "{seen:?}");
    // Backslash escapes in plain literals, as Postgres reads them with this setting off.
    c.batch_execute("SET standard_conforming_strings = off")
        .await
        .expect("set");
    follows_the_clock(&c, r"SELECT '\156ow'::timestamptz::text").await;
    c.batch_execute("RESET standard_conforming_strings")
        .await
        .expect("reset");
    // A domain whose CHECK reads the clock: valid now, refused once the moment has passed.
    let soon = simple_int(&c, "SELECT (clock_timestamp() + interval '3 s')::text").await;
    let sql = format!("SELECT '{soon}'::later::text");
    assert_eq!(simple_int(&c, &sql).await, simple_int(&c, &sql).await);
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let err = c
        .simple_query(&sql)
        .await
        .expect_err("the moment has passed");
    assert!(format!("{err:?}").contains("later"), "{err:?}");
    // Dates and times cast to dates are still cached (a change behind pgstash's back is not
    // seen), also through a table alias without a column list.
    let day = "SELECT l.at::date::text FROM logs AS l WHERE id = 1";
    for _ in 0..2 {
        assert_eq!(simple_int(&c, day).await, "2024-01-01");
    }
    let direct = pg.client(&db).await;
    direct
        .batch_execute("UPDATE logs SET at = '2025-06-30' WHERE id = 1")
        .await
        .expect("direct update");
    assert_eq!(simple_int(&c, day).await, "2024-01-01");
    // Text cast to an enum (as Prisma writes every enum filter) cannot hold a time: cached.
    let moods = "SELECT count(*)::text FROM moods WHERE m = CAST('a'::text AS mood)";
    for _ in 0..2 {
        assert_eq!(simple_int(&c, moods).await, "1");
    }
    direct
        .batch_execute("UPDATE moods SET m = 'b'")
        .await
        .expect("direct update");
    assert_eq!(simple_int(&c, moods).await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_change_without_a_visible_write_are_never_served_stale() {
    let pg = shared_pg();
    let db = fresh_database(pg, "nowrite");
    pg.psql_db(
        &db,
        "CREATE EXTENSION hstore;
         CREATE TABLE t (id int PRIMARY KEY, note text, h hstore);
         INSERT INTO t VALUES (1, 'now', 'at=>now');
         CREATE TABLE logs (id int PRIMARY KEY, at timestamptz);
         INSERT INTO logs VALUES (1, '2024-01-01');
         CREATE TABLE big AS SELECT g AS id FROM generate_series(1, 2000) g;
         CREATE VIEW sample AS SELECT count(*) AS n FROM big TABLESAMPLE BERNOULLI (50);
         CREATE SEQUENCE s;
         CREATE VIEW seqs AS SELECT last_value FROM pg_sequences WHERE sequencename = 's';
         CREATE TABLE w (id int PRIMARY KEY, v int);
         INSERT INTO w VALUES (3, 3), (1, 1), (2, 2);",
    );
    let db2 = fresh_database(pg, "nowrite2");
    pg.psql_db(
        &db2,
        "CREATE TABLE t (id int PRIMARY KEY, note text);
         INSERT INTO t VALUES (1, 'now');
         CREATE CAST (text AS timestamptz) WITH INOUT AS IMPLICIT;",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 4);
    let c = proxy.connect("postgres", "", &db).await;
    // hstore's immutable populate_record reads 'now' as the record's timestamptz field.
    follows_the_clock(
        &c,
        "SELECT (populate_record(l, t.h)).at::text FROM logs l, t",
    )
    .await;
    // A user-defined implicit cast from text runs where the text shows no cast.
    let c2 = proxy.connect("postgres", "", &db2).await;
    follows_the_clock(&c2, "SELECT date_trunc('milliseconds', note)::text FROM t").await;
    // A view with TABLESAMPLE: another sample each time.
    let mut samples = std::collections::HashSet::new();
    for _ in 0..6 {
        samples.insert(simple_int(&c, "SELECT n::text FROM sample").await);
    }
    assert!(
        samples.len() >= 4,
        "the same sample again and again: {samples:?}"
    );
    // A view over a system view: nextval() changes it and writes nothing.
    let seq = "SELECT coalesce(last_value, 0)::text FROM seqs";
    for _ in 0..2 {
        assert_eq!(simple_int(&c, seq).await, "0");
    }
    simple_int(&c, "SELECT nextval('s')::text").await;
    assert_eq!(simple_int(&c, seq).await, "1");
    // CLUSTER puts the rows in another order.
    let order = "SELECT string_agg(id::text, ',') FROM w";
    for _ in 0..2 {
        assert_eq!(simple_int(&c, order).await, "3,1,2");
    }
    c.batch_execute("CLUSTER w USING w_pkey")
        .await
        .expect("cluster");
    assert_eq!(simple_int(&c, order).await, "1,2,3");
    // A temp table created by naming pg_temp shadows `w` for its own session only, also
    // through a pool of one server connection: the client keeps it, and it is not handed on.
    drop((c, c2));
    drop(proxy);
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 1);
    let a = proxy.connect("postgres", "", &db).await;
    a.batch_execute("CREATE TABLE pg_temp.w AS SELECT 1 AS id, 999 AS v")
        .await
        .expect("temp table");
    let point = "SELECT v::text FROM w WHERE id = 1";
    for _ in 0..3 {
        assert_eq!(simple_int(&a, point).await, "999");
    }
    drop(a);
    let b = proxy.connect("postgres", "", &db).await;
    for _ in 0..3 {
        assert_eq!(simple_int(&b, point).await, "1");
    }
}

/// The first column of the first row, or "none" when there is no row.
async fn first_or_none(c: &Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .expect("read")
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| "none".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_keys_the_text_does_not_show_and_snapshot_reads_stay_fresh() {
    let pg = shared_pg();
    let db = fresh_database(pg, "rekey");
    pg.psql_db(
        &db,
        "CREATE TABLE gen (x int, id int GENERATED ALWAYS AS (x) STORED PRIMARY KEY, v int);
         INSERT INTO gen (x, v) VALUES (20, 200);
         CREATE TABLE tr (id int PRIMARY KEY, v int);
         INSERT INTO tr VALUES (1, 1);
         CREATE FUNCTION shift() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN NEW.id := NEW.id + 100; RETURN NEW; END $$;
         CREATE TRIGGER shift BEFORE UPDATE ON tr FOR EACH ROW EXECUTE FUNCTION shift();
         CREATE TABLE snap (id int PRIMARY KEY, v int);
         INSERT INTO snap VALUES (1, 1);",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 4);
    let c = proxy.connect("postgres", "", &db).await;
    // A generated key column: the UPDATE names x, the row moves from id 20 to id 21.
    let moved = "SELECT v FROM gen WHERE id = 21";
    for _ in 0..2 {
        assert_eq!(first_or_none(&c, moved).await, "none");
    }
    c.batch_execute("UPDATE gen SET x = 21 WHERE id = 20")
        .await
        .expect("update");
    assert_eq!(first_or_none(&c, moved).await, "200");
    // A BEFORE ROW trigger moves the row from id 1 to id 101.
    let shifted = "SELECT v FROM tr WHERE id = 101";
    for _ in 0..2 {
        assert_eq!(first_or_none(&c, shifted).await, "none");
    }
    c.batch_execute("UPDATE tr SET v = 5 WHERE id = 1")
        .await
        .expect("update");
    assert_eq!(first_or_none(&c, shifted).await, "5");
    // A REPEATABLE READ transaction however it is spelled: its snapshot's reads are not
    // stored for others.
    let a = proxy.connect("postgres", "", &db).await;
    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE /* x */\n  READ")
        .await
        .expect("begin");
    let read = "SELECT v FROM snap WHERE id = 1";
    assert_eq!(first_or_none(&a, read).await, "1");
    c.batch_execute("UPDATE snap SET v = 2 WHERE id = 1")
        .await
        .expect("concurrent update");
    for _ in 0..3 {
        assert_eq!(first_or_none(&a, read).await, "1");
    }
    for _ in 0..2 {
        assert_eq!(first_or_none(&c, read).await, "2");
    }
    a.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_security_policies_that_read_other_tables_are_never_served_stale() {
    let pg = shared_pg();
    let db = fresh_database(pg, "rlsdeps");
    pg.psql_db(
        &db,
        "CREATE TABLE members (usr text, org int);
         INSERT INTO members VALUES ('md5user', 1);
         CREATE TABLE docs (id int PRIMARY KEY, org int, body text);
         INSERT INTO docs VALUES (1, 1, 'org one'), (2, 2, 'org two');
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY member_of ON docs
             USING (org IN (SELECT m.org FROM members m WHERE m.usr = current_user));
         CREATE TABLE switch (enabled bool);
         INSERT INTO switch VALUES (true);
         CREATE FUNCTION notes_enabled() RETURNS bool STABLE LANGUAGE sql
             AS $$ SELECT enabled FROM switch $$;
         CREATE TABLE notes (id int PRIMARY KEY, body text);
         INSERT INTO notes VALUES (1, 'note');
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY when_enabled ON notes USING (notes_enabled());
         GRANT SELECT ON members, docs, switch, notes TO md5user;",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 4);
    let m = proxy.connect("md5user", "md5pass", &db).await;
    let admin = proxy.connect("postgres", "", &db).await;
    let all = "SELECT coalesce(string_agg(body, ','), '-') FROM docs";
    let point = "SELECT coalesce((SELECT body FROM docs WHERE id = 1), '-')";
    let point_ext = "SELECT body FROM docs WHERE id = $1";
    for _ in 0..3 {
        assert_eq!(simple_int(&m, all).await, "org one");
        assert_eq!(simple_int(&m, point).await, "org one");
        assert_eq!(m.query(point_ext, &[&1i32]).await.expect("read").len(), 1);
        assert_eq!(
            simple_int(&m, "SELECT count(*)::text FROM notes").await,
            "1"
        );
    }
    admin
        .batch_execute(
            "DELETE FROM members WHERE usr = 'md5user'; UPDATE switch SET enabled = false",
        )
        .await
        .expect("revoke membership");
    assert_eq!(simple_int(&m, all).await, "-");
    assert_eq!(simple_int(&m, point).await, "-");
    assert_eq!(m.query(point_ext, &[&1i32]).await.expect("read").len(), 0);
    assert_eq!(
        simple_int(&m, "SELECT count(*)::text FROM notes").await,
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_text_does_not_show_are_seen_by_the_transaction_and_after_it() {
    let pg = shared_pg();
    let db = fresh_database(pg, "hidden");
    pg.psql_db(
        &db,
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (id int PRIMARY KEY,
                             parent_id int REFERENCES parent ON DELETE CASCADE);
         INSERT INTO parent VALUES (1), (2);
         INSERT INTO child VALUES (10, 1), (20, 2);
         CREATE VIEW child_v AS SELECT id, parent_id FROM child;
         CREATE TABLE log (n int);
         CREATE FUNCTION add_log() RETURNS int VOLATILE LANGUAGE sql
             AS $$ INSERT INTO log VALUES (1) RETURNING n $$;
         CREATE PROCEDURE add_log_proc() LANGUAGE sql AS $$ INSERT INTO log VALUES (2) $$;
         CREATE TABLE audited (id int PRIMARY KEY);
         CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN INSERT INTO log VALUES (3); RETURN NEW; END $$;
         CREATE TRIGGER audit AFTER INSERT ON audited FOR EACH ROW EXECUTE FUNCTION audit();",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let c = proxy.connect("postgres", "", &db).await;
    let children = "SELECT count(*)::text FROM child";
    let logs = "SELECT count(*)::text FROM log";
    for _ in 0..3 {
        assert_eq!(simple_int(&c, children).await, "2");
        assert_eq!(simple_int(&c, logs).await, "0");
    }
    // Inside a transaction, Postgres shows the transaction its own writes, wherever
    // they came from: a cascade, a function, a procedure, a trigger.
    for (write, read, expected) in [
        ("DELETE FROM parent WHERE id = 1", children, "1"),
        ("SELECT add_log()", logs, "1"),
        ("CALL add_log_proc()", logs, "1"),
        ("INSERT INTO audited VALUES (1)", logs, "1"),
    ] {
        c.batch_execute("BEGIN").await.expect("begin");
        c.batch_execute(write).await.expect(write);
        assert_eq!(simple_int(&c, read).await, expected, "after {write}");
        let table = if read == logs { "log" } else { "child" };
        let extended: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("extended read")
            .get(0);
        assert_eq!(extended.to_string(), expected, "extended, after {write}");
        c.batch_execute("ROLLBACK").await.expect("rollback");
        assert_eq!(
            simple_int(&c, read).await,
            if read == logs { "0" } else { "2" }
        );
    }
    // Committed, through pgstash: the cascade and the write through a view invalidate the
    // tables they really changed.
    c.batch_execute("DELETE FROM parent WHERE id = 2")
        .await
        .expect("cascade");
    assert_eq!(simple_int(&c, children).await, "1");
    for _ in 0..2 {
        assert_eq!(simple_int(&c, children).await, "1");
    }
    c.batch_execute("INSERT INTO child_v VALUES (30, 1)")
        .await
        .expect("insert through a view");
    assert_eq!(simple_int(&c, children).await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_and_foreign_tables_are_read_from_postgres() {
    let pg = shared_pg();
    let db = fresh_database(pg, "outside");
    pg.psql_db(
        &db,
        &format!(
            "CREATE SEQUENCE sq;
             CREATE VIEW sq_v AS SELECT last_value FROM sq;
             CREATE EXTENSION postgres_fdw;
             CREATE SERVER here FOREIGN DATA WRAPPER postgres_fdw
                 OPTIONS (host '127.0.0.1', port '{port}', dbname '{db}');
             CREATE USER MAPPING FOR CURRENT_USER SERVER here OPTIONS (user 'postgres');
             CREATE TABLE remote_src (id int, v int);
             INSERT INTO remote_src VALUES (1, 1);
             CREATE FOREIGN TABLE remote (id int, v int)
                 SERVER here OPTIONS (table_name 'remote_src');
             CREATE TABLE parted (id int, v int) PARTITION BY RANGE (id);
             CREATE FOREIGN TABLE parted_far PARTITION OF parted FOR VALUES FROM (0) TO (100)
                 SERVER here OPTIONS (table_name 'remote_src');",
            port = pg.port
        ),
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let c = proxy.connect("postgres", "", &db).await;
    let reads = [
        "SELECT last_value::text FROM sq",
        "SELECT last_value::text FROM sq_v",
    ];
    for n in 1..=3 {
        simple_int(&c, "SELECT nextval('sq')::text").await;
        for r in reads {
            assert_eq!(simple_int(&c, r).await, n.to_string(), "{r}");
        }
    }
    // The foreign table's rows live in remote_src: a write there changes them.
    let reads = ["SELECT v::text FROM remote", "SELECT v::text FROM parted"];
    for _ in 0..3 {
        for r in reads {
            assert_eq!(simple_int(&c, r).await, "1", "{r}");
        }
    }
    c.batch_execute("UPDATE remote_src SET v = 2")
        .await
        .expect("update");
    for r in reads {
        assert_eq!(simple_int(&c, r).await, "2", "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_cacheable_results_are_relayed_whole() {
    let pg = shared_pg();
    let db = fresh_database(pg, "large");
    pg.psql_db(
        &db,
        "CREATE TABLE big (id int PRIMARY KEY, p text);
         INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g;",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let c = proxy.connect("postgres", "", &db).await;
    // About 370 KiB (above the relay's buffer mark, below max_result_bytes), and about
    // 2.4 MiB (above both), in both protocols, three times each.
    for n in [3000i32, 20000] {
        for _ in 0..3 {
            let simple = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                c.simple_query(&format!("SELECT id, p FROM big WHERE id <= {n}")),
            )
            .await
            .expect("the simple read finishes")
            .expect("simple read");
            let rows = simple
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count();
            assert_eq!(rows, n as usize);
            let extended = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                c.query("SELECT id, p FROM big WHERE id <= $1", &[&n]),
            )
            .await
            .expect("the extended read finishes")
            .expect("extended read");
            assert_eq!(extended.len(), n as usize);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_whose_meaning_the_text_hides_are_not_cached_wrongly() {
    let pg = shared_pg();
    let db = fresh_database(pg, "hidden2");
    pg.psql_db(
        &db,
        "CREATE TABLE pk (id int PRIMARY KEY, v text);
         INSERT INTO pk VALUES (16777216, 'big'), (5, 'five'), (6, 'six');
         CREATE TABLE gone (a int);
         CREATE TABLE logt (n int);
         CREATE FUNCTION add_log() RETURNS int VOLATILE LANGUAGE sql
             AS $$ INSERT INTO logt VALUES (1) RETURNING n $$;
         CREATE FUNCTION public.md5(int) RETURNS text VOLATILE LANGUAGE sql
             AS $$ SELECT random()::text $$;
         CREATE FUNCTION vol_op(int, int) RETURNS int VOLATILE LANGUAGE sql
             AS $$ SELECT (random() * 1000000)::int $$;
         CREATE OPERATOR ## (LEFTARG = int, RIGHTARG = int, FUNCTION = vol_op);",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let c = proxy.connect("postgres", "", &db).await;
    // A float4 cast rounds: the key is not 16777217, the row read is 16777216.
    let q = "SELECT v FROM pk WHERE id = 16777217::float4";
    for _ in 0..3 {
        assert_eq!(simple_int(&c, q).await, "big");
    }
    c.batch_execute("UPDATE pk SET v = 'changed' WHERE id = 16777216")
        .await
        .expect("update");
    assert_eq!(simple_int(&c, q).await, "changed");
    // Column aliases rename: `id` below is pk's second column.
    let aliased = "SELECT coalesce((SELECT id FROM pk AS x(n, id) WHERE n = 6), '-')";
    let renamed = "SELECT count(*)::text FROM pk AS x(id, w) WHERE w = 'six'";
    for _ in 0..3 {
        assert_eq!(simple_int(&c, aliased).await, "six");
        assert_eq!(simple_int(&c, renamed).await, "1");
    }
    c.batch_execute("UPDATE pk SET v = 'SIX' WHERE id = 6")
        .await
        .expect("update");
    assert_eq!(simple_int(&c, renamed).await, "0");
    // regclass reads the catalog.
    for _ in 0..3 {
        simple_int(&c, "SELECT 'gone'::regclass::oid::text").await;
    }
    c.batch_execute("DROP TABLE gone").await.expect("drop");
    let err = c
        .simple_query("SELECT 'gone'::regclass::oid::text")
        .await
        .expect_err("dropped");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
    // A user overload of a built-in name, and a user operator, both volatile.
    let distinct = async |sql: &str| {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            seen.insert(simple_int(&c, sql).await);
        }
        seen.len()
    };
    assert!(
        distinct("SELECT md5(5)").await > 1,
        "md5(int) is the user's volatile one"
    );
    assert!(
        distinct("SELECT (1 ## 2)::text").await > 1,
        "## runs a volatile function"
    );
    // Cursors, EXPLAIN ANALYZE and COPY run the calls they wrap.
    for (run, fetch) in [
        (
            "DECLARE cur CURSOR FOR SELECT add_log()",
            "FETCH ALL FROM cur",
        ),
        ("EXPLAIN ANALYZE SELECT add_log()", ""),
    ] {
        for _ in 0..3 {
            assert_eq!(simple_int(&c, "SELECT count(*)::text FROM logt").await, "0");
        }
        c.batch_execute("BEGIN").await.expect("begin");
        c.batch_execute(run).await.expect(run);
        if !fetch.is_empty() {
            c.batch_execute(fetch).await.expect(fetch);
        }
        assert_eq!(
            simple_int(&c, "SELECT count(*)::text FROM logt").await,
            "1",
            "after {run}"
        );
        c.batch_execute("ROLLBACK").await.expect("rollback");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_search_paths_databases_and_timezones_never_share_entries() {
    let pg = shared_pg();
    let db = fresh_database(pg, "privacy");
    pg.psql_db(
        &db,
        "CREATE SCHEMA a; CREATE SCHEMA b;
         CREATE TABLE a.s (x text); INSERT INTO a.s VALUES ('schema a');
         CREATE TABLE b.s (x text); INSERT INTO b.s VALUES ('schema b');
         CREATE TABLE secret (owner text, x text);
         INSERT INTO secret VALUES ('md5user', 'md5 row'), ('scramuser', 'scram row');
         ALTER TABLE secret ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON secret USING (owner = current_user);
         GRANT USAGE ON SCHEMA a, b TO PUBLIC;
         GRANT SELECT ON ALL TABLES IN SCHEMA a, b, public TO md5user, scramuser;",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 4);
    let m = proxy.connect("md5user", "md5pass", &db).await;
    let s = proxy.connect("scramuser", "scrampass", &db).await;
    for _ in 0..2 {
        assert_eq!(
            simple_int(&m, "SELECT string_agg(x, ',') FROM secret").await,
            "md5 row"
        );
        assert_eq!(
            simple_int(&s, "SELECT string_agg(x, ',') FROM secret").await,
            "scram row"
        );
    }
    let pa = proxy.connect("postgres", "", &db).await;
    let pb = proxy.connect("postgres", "", &db).await;
    pa.batch_execute("SET search_path = a").await.expect("set");
    pb.batch_execute("SET search_path = b").await.expect("set");
    for _ in 0..2 {
        assert_eq!(simple_int(&pa, "SELECT x FROM s").await, "schema a");
        assert_eq!(simple_int(&pb, "SELECT x FROM s").await, "schema b");
    }
    pa.batch_execute("SET TimeZone = 'UTC'").await.expect("tz");
    pb.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .expect("tz");
    let q = "SELECT '2024-01-01 00:00:00+00'::timestamptz::text";
    for _ in 0..2 {
        assert_eq!(simple_int(&pa, q).await, "2024-01-01 00:00:00+00");
        assert_eq!(simple_int(&pb, q).await, "2024-01-01 09:00:00+09");
    }
    // Two databases with the same table name and query text.
    let db2 = fresh_database(pg, "privacy2");
    pg.psql_db(&db2, "CREATE TABLE secret (owner text, x text); INSERT INTO secret VALUES ('postgres', 'other db');");
    let c1 = proxy.connect("postgres", "", &db).await;
    let c2 = proxy.connect("postgres", "", &db2).await;
    for _ in 0..2 {
        assert_eq!(
            simple_int(&c1, "SELECT count(*)::text FROM secret").await,
            "2"
        );
        assert_eq!(
            simple_int(&c2, "SELECT count(*)::text FROM secret").await,
            "1"
        );
    }
    // After REVOKE through pgstash, the cached rows are not served to the revoked role.
    assert_eq!(simple_int(&m, "SELECT x FROM a.s").await, "schema a");
    pa.batch_execute("REVOKE SELECT ON a.s FROM md5user")
        .await
        .expect("revoke");
    let err = m
        .simple_query("SELECT x FROM a.s")
        .await
        .expect_err("revoked");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_queries_of_one_shape_read_and_invalidate_their_own_rows() {
    // Texts that differ only in their values share one analysis (their shape's): each must
    // still read its own key and invalidate its own row.
    let (proxy, db, direct) = setup(10).await;
    let c = proxy.connect("postgres", "", &db).await;
    let w = proxy.connect("postgres", "", &db).await;
    let read = |id: i32| format!("SELECT v FROM t WHERE id = {id}");
    // Cached: each text's second miss stores it, the third read is a hit.
    for id in [5, 6, 7] {
        for _ in 0..3 {
            assert_eq!(simple_int(&c, &read(id)).await, (id * 10).to_string());
        }
    }
    // The rows change behind pgstash's back: their cached reads keep the old values.
    direct
        .batch_execute("UPDATE t SET v = v + 1 WHERE id IN (5, 6, 7)")
        .await
        .expect("direct");
    assert_eq!(simple_int(&c, &read(6)).await, "60", "a hit");
    // Two writes of one shape through pgstash; the second is analysed through the shape.
    w.batch_execute("UPDATE t SET v = 500 WHERE id = 5")
        .await
        .expect("update 5");
    w.batch_execute("UPDATE t SET v = 700 WHERE id = 7")
        .await
        .expect("update 7");
    assert_eq!(simple_int(&c, &read(5)).await, "500");
    assert_eq!(simple_int(&c, &read(7)).await, "700");
    assert_eq!(
        simple_int(&c, &read(6)).await,
        "60",
        "another row's point read is still a hit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_reads_are_invalidated_row_by_row() {
    let (proxy, db, direct) = setup(10).await;
    let c = proxy.connect("postgres", "", &db).await;
    let w = proxy.connect("postgres", "", &db).await;
    let q = "SELECT v FROM t WHERE id = $1";
    let range = "SELECT sum(v)::int FROM t WHERE id BETWEEN 1 AND 10";
    assert_eq!(v_of(&c, q, 5).await, 50);
    assert_eq!(v_of(&c, q, 6).await, 60);
    simple_int(&c, range).await;
    // Row 6 changes behind pgstash's back: a cached point read of 6 keeps the old value.
    direct
        .execute("UPDATE t SET v = 61 WHERE id = 6", &[])
        .await
        .expect("direct");
    w.execute("UPDATE t SET v = 51 WHERE id = $1", &[&5])
        .await
        .expect("update by key");
    assert_eq!(v_of(&c, q, 5).await, 51, "the written row is fresh");
    assert_eq!(
        v_of(&c, q, 6).await,
        60,
        "another row's point read is still a hit"
    );
    let fresh = simple_int(&direct, range).await;
    assert_eq!(
        simple_int(&c, range).await,
        fresh,
        "a range read over t is fresh"
    );
    // A write by a non-key column invalidates every read of t.
    w.execute("UPDATE t SET v = v WHERE note = 'n9'", &[])
        .await
        .expect("non-key update");
    assert_eq!(v_of(&c, q, 6).await, 61);
    // Changing the key invalidates both keys.
    assert_eq!(v_of(&c, q, 7).await, 70);
    assert!(c.query_opt(q, &[&77]).await.expect("q").is_none());
    w.execute("UPDATE t SET id = 77 WHERE id = 7", &[])
        .await
        .expect("key change");
    assert!(c.query_opt(q, &[&7]).await.expect("q").is_none());
    assert_eq!(v_of(&c, q, 77).await, 70);
}

#[test]
fn pgbench_prepared_point_reads_return_each_rows_own_value() {
    // Many clients, many values, one parameterised statement: every answer is checked by
    // pgbench's \gset + \if against the value computed from the key.
    let pg = shared_pg();
    let db = fresh_database(pg, "pointbench");
    pg.psql_db(&db, "CREATE TABLE acc (aid int PRIMARY KEY, bal int NOT NULL); INSERT INTO acc SELECT g, g * 7 FROM generate_series(1, 2000) g;");
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 4);
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("check.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 2000)\nSELECT bal FROM acc WHERE aid = :aid \\gset\n\\if :bal != :aid * 7\nSELECT 1/0;\n\\endif\n",
    )
    .expect("script");
    for mode in ["prepared", "extended", "simple"] {
        let out = crate::fixture::run(
            std::process::Command::new(pg.bin("pgbench"))
                .args([
                    "-n",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &proxy.port().to_string(),
                    "-U",
                    "postgres",
                ])
                .args(["-M", mode, "-c", "16", "-j", "2", "-t", "500", "-f"])
                .arg(&script)
                .arg(&db),
        );
        assert!(
            out.contains("number of failed transactions: 0 "),
            "{mode}: {out}"
        );
        assert!(
            out.contains("actually processed: 8000/8000"),
            "{mode}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_hints_skip_the_cache_or_shorten_the_ttl() {
    let (proxy, db, direct) = setup(5).await;
    let c = proxy.connect("postgres", "", &db).await;
    let skip = "SELECT /* pgstash: skip */ v FROM t WHERE id = 4";
    let short = "SELECT /* pgstash: ttl=1s */ v FROM t WHERE id = 4";
    assert_eq!(simple_int(&c, skip).await, "40");
    assert_eq!(simple_int(&c, short).await, "40");
    direct
        .execute("UPDATE t SET v = 41 WHERE id = 4", &[])
        .await
        .expect("direct");
    assert_eq!(simple_int(&c, skip).await, "41", "skip hint: never cached");
    assert_eq!(simple_int(&c, short).await, "40", "within its ttl: a hit");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(simple_int(&c, short).await, "41", "after its ttl: fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_started_before_a_commit_does_not_stay_cached() {
    let (proxy, db, direct) = setup(3).await;
    // `gate` claims to be immutable (so the read is cacheable) but waits for an advisory
    // lock the test holds: the read has taken its snapshot, and blocks until we let it go.
    direct
        .batch_execute(
            "CREATE FUNCTION gate(x int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN x; END $$;",
        )
        .await
        .expect("gate function");
    let q = "SELECT gate(v) FROM t WHERE id = 1";
    let locker = pg_client_for(&db).await;
    locker
        .execute("SELECT pg_advisory_lock(4242)", &[])
        .await
        .expect("lock");
    let reader = proxy.connect("postgres", "", &db).await;
    let read = tokio::spawn(async move { simple_int(&reader, q).await });
    // Wait until the reader is blocked inside its query (snapshot taken, old row read).
    wait_until_blocked(&direct, "gate(v)").await;
    let writer = proxy.connect("postgres", "", &db).await;
    writer
        .execute("UPDATE t SET v = 11 WHERE id = 1", &[])
        .await
        .expect("write commits while the read is in flight");
    locker
        .execute("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .expect("unlock");
    assert_eq!(
        read.await.expect("reader"),
        "10",
        "the read saw its snapshot"
    );
    let c = proxy.connect("postgres", "", &db).await;
    assert_eq!(
        simple_int(&c, q).await,
        "11",
        "the pre-commit result must not have been stored"
    );
}

async fn pg_client_for(db: &str) -> Client {
    shared_pg().client(db).await
}

/// Polls pg_stat_activity until a backend running a query containing `needle` waits on a lock.
async fn wait_until_blocked(direct: &Client, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND strpos(query, $1) > 0 AND pid <> pg_backend_pid()",
                &[&needle],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reader never blocked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_by_table_and_by_query_text_set_ttl_or_forbid_caching() {
    let pg = shared_pg();
    let db = fresh_database(pg, "rules");
    pg.psql_db(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         CREATE TABLE secret (id int PRIMARY KEY, v int);
         INSERT INTO t VALUES (1, 10), (2, 20); INSERT INTO secret VALUES (1, 100);",
    );
    let proxy = Proxy::start(pg, |c| {
        c.cache.rules = vec![
            pgstash::config::CacheRule {
                table: Some("public.secret".into()),
                never: true,
                ..Default::default()
            },
            pgstash::config::CacheRule {
                query: Some("(?i)where id = 2".into()),
                ttl: Some(std::time::Duration::from_secs(1)),
                ..Default::default()
            },
        ]
    });
    let direct = pg.client(&db).await;
    let c = proxy.connect("postgres", "", &db).await;
    let qualified = "SELECT v FROM public.secret WHERE id = 1";
    let short = "SELECT v FROM t WHERE id = 2";
    let default = "SELECT v FROM t WHERE id = 1";
    for q in [qualified, short, default] {
        simple_int(&c, q).await;
    }
    direct
        .batch_execute("UPDATE secret SET v = 101; UPDATE t SET v = v + 1")
        .await
        .expect("direct writes");
    assert_eq!(simple_int(&c, qualified).await, "101", "never-cache rule");
    assert_eq!(simple_int(&c, short).await, "20", "regex rule: cached");
    assert_eq!(simple_int(&c, default).await, "10", "default ttl: cached");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(simple_int(&c, short).await, "21", "regex rule: 1 s ttl");
    assert_eq!(
        simple_int(&c, default).await,
        "10",
        "default ttl: still cached"
    );
    // A bad rule is refused at start, naming the key.
    let mut bad = pgstash::config::Config::default();
    bad.cache.rules = vec![pgstash::config::CacheRule {
        query: Some("(".into()),
        never: true,
        ..Default::default()
    }];
    let err = bad.validate().expect_err("bad regex");
    assert!(err.to_string().contains("cache.rules"), "{err}");
}

/// A client of a proxy whose adaptive bypass judges a query after 5 sampled lookups or 80
/// of any keys, whichever comes first, and wants half of them hits, on a fresh database
/// whose `t` holds 500 rows; with the proxy, its metrics address and a direct connection.
async fn quickly_judged_client() -> (Proxy, std::net::SocketAddr, Client, Client) {
    let (db, direct) = table_t(500).await;
    let metrics = crate::fixture::free_metrics_port();
    let proxy = Proxy::start(shared_pg(), |c| {
        c.cache.adaptive.enabled = true;
        c.cache.adaptive.min_calls = 5;
        c.cache.adaptive.min_hit_ratio = 0.5;
        c.metrics.listen = Some(metrics);
    });
    let c = proxy.connect("postgres", "", &db).await;
    (proxy, metrics, c, direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_that_never_hit_stop_being_cached_and_say_why() {
    let (_proxy, proxy_metrics, c, direct) = quickly_judged_client().await;
    let q = "SELECT v FROM t WHERE id = $1";
    let before = scrape_sum(
        proxy_metrics,
        "pgstash_cache_bypass_total{reason=\"low_hit_ratio\"}",
    );
    // Every call a different row: a 0 % hit ratio.
    for id in 1..=120 {
        assert_eq!(v_of(&c, q, id).await, id * 10);
    }
    let after = scrape_sum(
        proxy_metrics,
        "pgstash_cache_bypass_total{reason=\"low_hit_ratio\"}",
    );
    assert!(after > before, "the bypass is visible with its reason");
    // Bypassed: rows changed behind pgstash's back are read fresh even though they were
    // read (and would have been cached) before. All but the keys in the bypass's sample
    // (one in 16, cached all along to keep measuring): 16 rows, of which well over half
    // must be fresh (with every key cached, none would be).
    for id in 200..216 {
        v_of(&c, q, id).await;
    }
    direct
        .execute("UPDATE t SET v = 1 WHERE id >= 200 AND id < 216", &[])
        .await
        .expect("direct");
    let mut fresh = 0;
    for id in 200..216 {
        fresh += i32::from(v_of(&c, q, id).await == 1);
    }
    assert!(fresh >= 8, "{fresh} of 16 rows read fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_set_bypassed_while_cold_is_cached_again_once_its_sample_warms_up() {
    let (_proxy, proxy_metrics, c, _direct) = quickly_judged_client().await;
    let q = "SELECT v FROM t WHERE id = $1";
    let bypassed = || {
        scrape_sum(
            proxy_metrics,
            "pgstash_cache_bypass_total{reason=\"low_hit_ratio\"}",
        )
    };
    let hits = || scrape_sum(proxy_metrics, "pgstash_cache_hits_total{tier=\"l1\"}");
    // A hot set of 300 rows read round after round. Its first round is all misses, which
    // get it bypassed; its sampled keys stay cached, warm up (the test proxies store on
    // the first miss) and are then hit without analysis, which must still count for the
    // query.
    for id in 1..=300 {
        assert_eq!(v_of(&c, q, id).await, id * 10);
    }
    assert!(bypassed() > 0.0, "a cold first round is bypassed");
    let mut last_round_hits = 0.0;
    for _ in 0..6 {
        let before = hits();
        for id in 1..=300 {
            assert_eq!(v_of(&c, q, id).await, id * 10);
        }
        last_round_hits = hits() - before;
    }
    assert!(
        last_round_hits >= 270.0,
        "the whole hot set is cached again: {last_round_hits} hits of 300 in the last round"
    );
}

/// The value of a metric line (sum over every line starting with `name`).
pub fn scrape_sum(addr: std::net::SocketAddr, name: &str) -> f64 {
    scrape(addr, "/metrics")
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn scrape(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    // The endpoint is bound once the proxy's runtime is up, shortly after `Proxy::start`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut s = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => panic!("metrics endpoint: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    };
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_hits_misses_and_answers_health_probes() {
    let pg = shared_pg();
    let db = fresh_database(pg, "metrics");
    pg.psql_db(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 1);",
    );
    let addr = crate::fixture::free_metrics_port();
    let proxy = Proxy::start(pg, |c| c.metrics.listen = Some(addr));
    let c = proxy.connect("postgres", "", &db).await;
    let hits = || scrape_sum(addr, "pgstash_cache_hits_total{tier=\"l1\"}");
    let misses = || scrape_sum(addr, "pgstash_cache_misses_total");
    let (h0, m0) = (hits(), misses());
    simple_int(&c, "SELECT v FROM t WHERE id = 1").await;
    simple_int(&c, "SELECT v FROM t WHERE id = 1").await;
    assert!(misses() >= m0 + 1.0);
    assert!(hits() >= h0 + 1.0);
    let text = scrape(addr, "/metrics");
    for family in [
        "pgstash_l1_bytes",
        "pgstash_hit_seconds_bucket",
        "pgstash_upstream_seconds_bucket",
        "pgstash_cache_fills_total{outcome=\"stored\"}",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    assert!(scrape(addr, "/healthz").contains("200 OK"));
    assert!(scrape(addr, "/readyz").contains("ready"));
    assert!(scrape(addr, "/nope").contains("404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_is_stored_on_its_second_miss_and_refilled_at_once_after_a_write() {
    // Writes on a direct connection are invisible to pgstash (source = proxy): a read that
    // still returns the old value was answered from the cache. (Metrics are shared by every
    // test in this process, so they cannot tell.)
    let pg = shared_pg();
    let db = fresh_database(pg, "admission");
    pg.psql_db(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 10);",
    );
    let proxy = Proxy::start(pg, |c| c.cache.admit_on_second_miss = true);
    let c = proxy.connect("postgres", "", &db).await;
    let direct = pg.client(&db).await;
    let behind = |v: i32| format!("UPDATE t SET v = {v} WHERE id = 1");
    let q = "SELECT v FROM t WHERE id = 1";
    assert_eq!(simple_int(&c, q).await, "10");
    direct.batch_execute(&behind(12)).await.expect("direct");
    assert_eq!(
        simple_int(&c, q).await,
        "12",
        "the first miss was not stored"
    );
    direct.batch_execute(&behind(13)).await.expect("direct");
    assert_eq!(simple_int(&c, q).await, "12", "the second miss was stored");
    // After a write through pgstash the key is known to repeat: refilled on the next miss.
    c.batch_execute("UPDATE t SET v = 14 WHERE id = 1")
        .await
        .expect("update");
    assert_eq!(simple_int(&c, q).await, "14");
    direct.batch_execute(&behind(15)).await.expect("direct");
    assert_eq!(simple_int(&c, q).await, "14", "refilled at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_under_write_churn_never_see_a_value_older_than_a_committed_one() {
    // W5 in miniature: writers only increment and publish what they committed; a reader
    // that starts after a commit must see at least that value. Both protocols, L1 and L2.
    let redis = crate::support::shared_redis();
    let pg = shared_pg();
    let db = fresh_database(pg, "churn");
    const ROWS: usize = 50;
    pg.psql_db(
        &db,
        &format!(
            "CREATE TABLE acc (aid int PRIMARY KEY, bal bigint NOT NULL);
             INSERT INTO acc SELECT g, 0 FROM generate_series(1, {ROWS}) g;"
        ),
    );
    let prefix = format!("churn{}:", std::process::id());
    let proxy = Proxy::start(pg, |c| {
        c.pool.max_size = 6;
        c.redis.url = Some(redis.url());
        c.redis.prefix = prefix.clone();
        c.cache.admit_on_second_miss = true; // as shipped
    });
    let committed: std::sync::Arc<Vec<std::sync::atomic::AtomicI64>> = std::sync::Arc::new(
        (0..=ROWS)
            .map(|_| std::sync::atomic::AtomicI64::new(0))
            .collect(),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..2 {
        let c = proxy.connect("postgres", "", &db).await;
        let (committed, stop) = (committed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let aid = (i * 7 % ROWS + 1) as i32;
                i += 1;
                let bal: i64 = c
                    .query_one(
                        "UPDATE acc SET bal = bal + 1 WHERE aid = $1 RETURNING bal",
                        &[&aid],
                    )
                    .await
                    .expect("write")
                    .get(0);
                committed[aid as usize].fetch_max(bal, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }));
    }
    for r in 0..6 {
        let c = proxy.connect("postgres", "", &db).await;
        let (committed, stop, reads) = (committed.clone(), stop.clone(), reads.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = r * 13;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let aid = i % ROWS + 1;
                i += 1;
                let floor = committed[aid].load(std::sync::atomic::Ordering::SeqCst);
                let got: i64 = if r % 2 == 0 {
                    c.query_one("SELECT bal FROM acc WHERE aid = $1", &[&(aid as i32)])
                        .await
                        .expect("read")
                        .get(0)
                } else {
                    simple_int(&c, &format!("SELECT bal FROM acc WHERE aid = {aid}"))
                        .await
                        .parse()
                        .expect("int")
                };
                assert!(
                    got >= floor,
                    "stale read of row {aid}: got {got}, but {floor} was committed before the read"
                );
                reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.expect("no stale read, no error");
    }
    assert!(
        reads.load(std::sync::atomic::Ordering::Relaxed) > 500,
        "enough reads ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_that_describe_their_statement_are_cached_too() {
    // tokio-postgres' query_typed sends Parse, Bind, Describe(statement), Execute, Sync: the
    // stored answer carries the ParameterDescription and RowDescription that Describe gets.
    use tokio_postgres::types::Type;
    let (proxy, db, direct) = setup(10).await;
    let c = proxy.connect("postgres", "", &db).await;
    let read = |sql: &'static str, id: i32| {
        let c = &c;
        async move {
            c.query_typed(sql, &[(&id, Type::INT4)])
                .await
                .expect("query_typed")
        }
    };
    for _ in 0..3 {
        for id in 1..=3 {
            let rows = read("SELECT v FROM t WHERE id = $1", id).await;
            assert_eq!(rows[0].get::<_, i32>(0), id * 10);
            let rows = read("SELECT note, v FROM t WHERE id = $1", id).await;
            assert_eq!(rows[0].get::<_, String>(0), format!("n{id}"));
            assert_eq!(rows[0].get::<_, i32>(1), id * 10);
        }
    }
    direct
        .execute("UPDATE t SET v = 21 WHERE id = 2", &[])
        .await
        .expect("direct write");
    // Not seen by pgstash: served from the cache, with the description the client needs.
    let rows = read("SELECT v FROM t WHERE id = $1", 2).await;
    assert_eq!(rows[0].get::<_, i32>(0), 20);
    assert_eq!(rows[0].columns()[0].type_(), &Type::INT4);
    // A write through pgstash invalidates them like any other read.
    c.execute("UPDATE t SET v = 22 WHERE id = 2", &[])
        .await
        .expect("write");
    let rows = read("SELECT v FROM t WHERE id = $1", 2).await;
    assert_eq!(rows[0].get::<_, i32>(0), 22);
    let rows = read("SELECT note, v FROM t WHERE id = $1", 2).await;
    assert_eq!(rows[0].get::<_, i32>(1), 22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_earlier_in_the_search_path_takes_over_cached_reads_of_its_name() {
    let pg = shared_pg();
    let db = fresh_database(pg, "shadowlater");
    pg.psql_db(
        &db,
        "CREATE SCHEMA early;
         CREATE TABLE public.t (id int PRIMARY KEY, v text);
         INSERT INTO public.t VALUES (1, 'public');",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    let c = proxy.connect("postgres", "", &db).await;
    c.batch_execute("SET search_path = early, public")
        .await
        .expect("set");
    let read = "SELECT v FROM t WHERE id = 1";
    let scan = "SELECT string_agg(v, ',') FROM t";
    for _ in 0..3 {
        assert_eq!(simple_int(&c, read).await, "public");
        assert_eq!(simple_int(&c, scan).await, "public");
    }
    // Through pgstash: `t` now names early.t for this session.
    c.batch_execute(
        "CREATE TABLE early.t (id int PRIMARY KEY, v text);
         INSERT INTO early.t VALUES (1, 'early');",
    )
    .await
    .expect("create the shadowing table");
    for _ in 0..3 {
        assert_eq!(simple_int(&c, read).await, "early");
        assert_eq!(simple_int(&c, scan).await, "early");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relations_unknown_to_the_catalog_are_read_through() {
    let (proxy, db, direct) = setup(10).await;
    let c = proxy.connect("postgres", "", &db).await;
    // The catalog is read now; the sequence and the table come after, behind its back.
    assert_eq!(simple_int(&c, "SELECT v FROM t WHERE id = 1").await, "10");
    direct
        .batch_execute("CREATE SEQUENCE s; CREATE TABLE late (id int); INSERT INTO late VALUES (1)")
        .await
        .expect("direct DDL");
    for _ in 0..3 {
        assert_eq!(simple_int(&c, "SELECT last_value FROM s").await, "1");
        assert_eq!(simple_int(&c, "SELECT count(*) FROM late").await, "1");
    }
    direct
        .batch_execute("SELECT setval('s', 42); INSERT INTO late VALUES (2)")
        .await
        .expect("direct writes");
    assert_eq!(simple_int(&c, "SELECT last_value FROM s").await, "42");
    assert_eq!(simple_int(&c, "SELECT count(*) FROM late").await, "2");
}
