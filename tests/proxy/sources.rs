//! Writes pgstash cannot see, heard from Postgres itself (invalidation.source = "notify"):
//! cached reads through pgstash become fresh shortly after such writes commit.

use crate::fixture::{Proxy, fresh_database};
use crate::support::shared_pg;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

async fn one(c: &Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.get(0).unwrap_or("NULL").to_string())
            }
            _ => None,
        })
        .unwrap_or_else(|| "no row".into())
}

/// Reads `sql` through pgstash until it returns `want` (the source's bound is what the
/// deadline allows; the notify path takes milliseconds).
async fn fresh_soon(c: &Client, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = one(c, sql).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: still {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn notify_proxy(db: &str) -> (Proxy, Client, Client) {
    let pg = shared_pg();
    let mut c = pg.client(db).await;
    pgstash::migrate::up(&mut c).await.expect("migrate up");
    let db_owned = db.to_string();
    let proxy = Proxy::start(pg, move |c| {
        c.invalidation.source = pgstash::config::InvalidationSource::Notify;
        c.invalidation.databases = vec![db_owned];
    });
    let through = proxy.connect("postgres", "", db).await;
    // The source reports healthy once it listens; until then nothing is cached. Wait until
    // a repeated read is a hit (a change behind pgstash's back does not show at once).
    (proxy, through, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_behind_pgstash_invalidate_through_notify() {
    let pg = shared_pg();
    let db = fresh_database(pg, "notifysrc");
    pg.psql_db(
        &db,
        "CREATE TABLE parent (id int PRIMARY KEY, v int);
         CREATE TABLE child (id int PRIMARY KEY, pid int REFERENCES parent ON DELETE CASCADE ON UPDATE CASCADE, v int);
         INSERT INTO parent VALUES (1, 1), (2, 2); INSERT INTO child VALUES (10, 1, 0), (20, 2, 0);
         CREATE TABLE audit (n int); INSERT INTO audit VALUES (0);
         CREATE TABLE src (id int PRIMARY KEY, v int); INSERT INTO src VALUES (1, 0);
         CREATE FUNCTION bump_audit() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN UPDATE audit SET n = n + 1; RETURN NULL; END $$;
         CREATE TRIGGER t AFTER UPDATE ON src FOR EACH STATEMENT EXECUTE FUNCTION bump_audit();
         CREATE FUNCTION writer() RETURNS int LANGUAGE sql AS $$ UPDATE src SET v = v + 100 RETURNING v $$;
         CREATE PROCEDURE proc() LANGUAGE sql AS $$ UPDATE parent SET v = v + 1000 WHERE id = 3 $$;
         CREATE TABLE part (id int, v int) PARTITION BY RANGE (id);
         CREATE TABLE part_a PARTITION OF part FOR VALUES FROM (0) TO (100);
         INSERT INTO part VALUES (1, 1);
         CREATE MATERIALIZED VIEW mv AS SELECT sum(v) AS s FROM src;",
    );
    let (_proxy, c, direct) = notify_proxy(&db).await;
    wait_until_caching(&c, &direct).await;
    let cached = "SELECT count(*) FROM child";
    let reads = [
        (cached, "2"),
        ("SELECT n FROM audit", "0"),
        ("SELECT v FROM src WHERE id = 1", "0"),
        ("SELECT sum(v) FROM part", "1"),
        ("SELECT s FROM mv", "0"),
        ("SELECT v FROM parent WHERE id = 2", "2"),
        ("SELECT sum(pid) FROM child", "3"),
    ];
    for (q, want) in reads {
        assert_eq!(one(&c, q).await, want, "{q}");
    }
    // A plain write on a direct connection.
    direct
        .batch_execute("UPDATE src SET v = 5 WHERE id = 1")
        .await
        .expect("direct");
    fresh_soon(&c, "SELECT v FROM src WHERE id = 1", "5").await;
    // ...which fired a trigger writing another table.
    fresh_soon(&c, "SELECT n FROM audit", "1").await;
    // ON DELETE CASCADE, ON UPDATE CASCADE.
    direct
        .batch_execute("DELETE FROM parent WHERE id = 1")
        .await
        .expect("cascade delete");
    fresh_soon(&c, cached, "1").await;
    direct
        .batch_execute("UPDATE parent SET id = 3 WHERE id = 2")
        .await
        .expect("cascade update");
    fresh_soon(&c, "SELECT sum(pid) FROM child", "3").await;
    one(&c, "SELECT sum(pid) FROM child").await;
    // A function that writes, and a procedure.
    direct
        .batch_execute("SELECT writer()")
        .await
        .expect("function");
    fresh_soon(&c, "SELECT v FROM src WHERE id = 1", "105").await;
    assert_eq!(one(&c, "SELECT v FROM parent WHERE id = 3").await, "2");
    direct
        .batch_execute("CALL proc()")
        .await
        .expect("procedure");
    fresh_soon(&c, "SELECT v FROM parent WHERE id = 3", "1002").await;
    // A partitioned table written through a partition, then through its parent.
    direct
        .batch_execute("INSERT INTO part_a VALUES (2, 10)")
        .await
        .expect("partition");
    fresh_soon(&c, "SELECT sum(v) FROM part", "11").await;
    direct
        .batch_execute("INSERT INTO part VALUES (3, 100)")
        .await
        .expect("parent");
    fresh_soon(&c, "SELECT sum(v) FROM part", "111").await;
    // A materialized view refresh.
    direct
        .batch_execute("REFRESH MATERIALIZED VIEW mv")
        .await
        .expect("refresh");
    fresh_soon(&c, "SELECT s FROM mv", "105").await;
    // DDL behind pgstash's back.
    direct
        .batch_execute("ALTER TABLE src ADD COLUMN w int DEFAULT 7")
        .await
        .expect("ddl");
    fresh_soon(&c, "SELECT w FROM src WHERE id = 1", "7").await;
}

/// A write the triggers cannot see (replica role skips ordinary triggers).
fn hidden(v: i32) -> String {
    format!(
        "SET session_replication_role = replica; UPDATE probe SET v = {v}; RESET session_replication_role"
    )
}

/// Until the source is up nothing is cached; wait until a read of `probe` is a hit.
async fn wait_until_caching(c: &Client, direct: &Client) {
    direct
        .batch_execute("CREATE TABLE IF NOT EXISTS probe (v int); INSERT INTO probe SELECT 0 WHERE NOT EXISTS (SELECT FROM probe)")
        .await
        .expect("probe table");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 10;
    loop {
        direct
            .batch_execute(&format!("UPDATE probe SET v = {n}"))
            .await
            .expect("w");
        fresh_soon(c, "SELECT v FROM probe", &n.to_string()).await;
        direct
            .batch_execute(&hidden(n + 1))
            .await
            .expect("hidden write");
        if one(c, "SELECT v FROM probe").await == n.to_string() {
            return; // served from the cache: the source is up
        }
        assert!(Instant::now() < deadline, "the change source never came up");
        n += 10;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_stops_the_cache_until_it_is_back() {
    let pg = shared_pg();
    let db = fresh_database(pg, "notifykill");
    let (_proxy, c, direct) = notify_proxy(&db).await;
    wait_until_caching(&c, &direct).await;
    let q = "SELECT v FROM probe";
    // Kill the listener's backend: until it is back, nothing is served from the cache.
    direct
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgstash-notify'",
        )
        .await
        .expect("terminate");
    // The reconnect takes ≥ 100 ms of backoff: right away, reads go to Postgres.
    direct
        .batch_execute(&hidden(500))
        .await
        .expect("hidden write");
    assert_eq!(
        one(&c, q).await,
        "500",
        "no cached answer while the source is down"
    );
    // Back: caching and invalidation work again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        one(&c, q).await;
        direct
            .batch_execute(&hidden(600))
            .await
            .expect("hidden write");
        if one(&c, q).await == "500" {
            break;
        }
        direct.batch_execute(&hidden(500)).await.expect("reset");
        assert!(Instant::now() < deadline, "the source never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    direct
        .batch_execute("UPDATE probe SET v = 700")
        .await
        .expect("w");
    fresh_soon(&c, q, "700").await;
}
