//! The shared tier: L2 in Redis and invalidations between pgstash instances, with a real
//! redis-server started by the harness (and killed by some tests).

use crate::cache::{scrape, scrape_sum};
use crate::fixture::{Proxy, free_metrics_port, fresh_database};
use crate::support::{RedisServer, shared_pg, shared_redis};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_postgres::Client;

async fn v(c: &Client, id: i32) -> i32 {
    c.query_one("SELECT v FROM t WHERE id = $1", &[&id])
        .await
        .expect("read")
        .get(0)
}

fn table_db(prefix: &str, rows: i32) -> String {
    let pg = shared_pg();
    let db = fresh_database(pg, prefix);
    pg.psql_db(
        &db,
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO t SELECT g, g * 10 FROM generate_series(1, {rows}) g;"
        ),
    );
    db
}

fn with_redis(redis: &RedisServer, prefix: &str) -> impl FnOnce(&mut pgstash::config::Config) {
    let (url, prefix) = (redis.url(), prefix.to_string());
    move |c| {
        c.redis.url = Some(url);
        c.redis.prefix = prefix;
        c.redis.unheard_bound = Duration::from_millis(300);
        c.redis.breaker_cooldown = Duration::from_millis(200);
    }
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two instances, A and B, sharing `redis` under a prefix made from `name` and this process,
/// once B hears the invalidation channel; with B's metrics address.
async fn two_instances(redis: &RedisServer, name: &str) -> (Proxy, Proxy, SocketAddr) {
    let prefix = format!("{name}{}:", std::process::id());
    let metrics_b = free_metrics_port();
    let a = Proxy::start(shared_pg(), with_redis(redis, &prefix));
    let b = Proxy::start(shared_pg(), |c| {
        with_redis(redis, &prefix)(c);
        c.metrics.listen = Some(metrics_b);
    });
    wait_for("both instances subscribed", async || {
        !scrape(metrics_b, "/readyz").contains("not heard")
    })
    .await;
    (a, b, metrics_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_is_never_read_stale_through_another() {
    let redis = shared_redis();
    let db = table_db("twoinst", 20);
    let (a, b, metrics_b) = two_instances(redis, "two").await;
    let ca = a.connect("postgres", "", &db).await;
    let cb = b.connect("postgres", "", &db).await;
    // L2 is shared: B's fill answers A's first read (proved by a change behind both).
    assert_eq!(v(&cb, 2).await, 20);
    let direct = shared_pg().client(&db).await;
    direct
        .execute("UPDATE t SET v = 21 WHERE id = 2", &[])
        .await
        .expect("direct");
    let l2_before = scrape_sum(metrics_b, "pgstash_cache_hits_total{tier=\"l2\"}");
    assert_eq!(v(&ca, 2).await, 20, "A answered from B's L2 entry");
    assert!(scrape_sum(metrics_b, "pgstash_cache_hits_total{tier=\"l2\"}") > l2_before);
    // Writes through A, reads through B (which has the rows in its L1): always fresh.
    for round in 0..100 {
        let id = round % 5 + 1;
        v(&cb, id).await;
        let new = 1000 + round;
        ca.execute("UPDATE t SET v = $2 WHERE id = $1", &[&id, &new])
            .await
            .expect("write through A");
        assert_eq!(v(&cb, id).await, new, "round {round}: B read stale");
        // And a range read on B, filled before the write, is fresh after it.
        let sum: i64 = cb
            .query_one("SELECT sum(v) FROM t", &[])
            .await
            .expect("sum")
            .get(0);
        ca.execute("UPDATE t SET v = v + 1 WHERE id = 20", &[])
            .await
            .expect("wide write through A");
        let after: i64 = cb
            .query_one("SELECT sum(v) FROM t", &[])
            .await
            .expect("sum")
            .get(0);
        assert_eq!(after, sum + 1, "round {round}: B's range read stale");
    }
}

/// Commits that come in together are published to Redis together (one batch while the
/// previous one is in flight): every writer must still find its own write through the other
/// instance the moment its commit returns, not only the writer that led the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_one_instance_are_each_fresh_through_another_at_once() {
    let redis = shared_redis();
    let writers = 16;
    let db = table_db("batchpub", writers);
    let (a, b, metrics_b) = two_instances(redis, "batch").await;
    let mut tasks = Vec::new();
    for id in 1..=writers {
        let ca = a.connect("postgres", "", &db).await;
        let cb = b.connect("postgres", "", &db).await;
        tasks.push(tokio::spawn(async move {
            for round in 0..40 {
                // In B's L1 (test proxies store on the first miss; the second read hits)
                // before A's write.
                v(&cb, id).await;
                v(&cb, id).await;
                let new = id * 1000 + round;
                ca.execute("UPDATE t SET v = $2 WHERE id = $1", &[&id, &new])
                    .await
                    .expect("write through A");
                assert_eq!(
                    v(&cb, id).await,
                    new,
                    "writer {id}, round {round}: B read stale"
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("a writer failed");
    }
    let hits = scrape_sum(metrics_b, "pgstash_cache_hits_total");
    assert!(
        hits >= f64::from(writers * 40),
        "B answered the repeated reads from its cache ({hits} hits), so only the \
         invalidations can have kept the reads after each write fresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_costs_no_client_an_error_nor_a_stale_read() {
    let redis = RedisServer::start();
    let db = table_db("rediskill", 10);
    let metrics = free_metrics_port();
    let proxy = Proxy::start(shared_pg(), |c| {
        with_redis(&redis, "kill:")(c);
        c.metrics.listen = Some(metrics);
    });
    wait_for("subscribed", async || {
        !scrape(metrics, "/readyz").contains("not heard")
    })
    .await;
    let c = proxy.connect("postgres", "", &db).await;
    let w = proxy.connect("postgres", "", &db).await;
    let direct = shared_pg().client(&db).await;
    assert_eq!(v(&c, 1).await, 10);

    redis.stop();
    // Reads and writes keep working; writes through pgstash are seen at once.
    for i in 0..20 {
        w.execute("UPDATE t SET v = $1 WHERE id = 1", &[&(100 + i)])
            .await
            .expect("write with redis down");
        assert_eq!(v(&c, 1).await, 100 + i, "fresh with redis down");
    }
    // Deaf beyond the bound: L1 is not trusted, so a change behind pgstash's back shows.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(scrape(metrics, "/readyz").contains("suspended"));
    v(&c, 3).await;
    direct
        .execute("UPDATE t SET v = 31 WHERE id = 3", &[])
        .await
        .expect("direct");
    assert_eq!(
        v(&c, 3).await,
        31,
        "no L1 hit while invalidations are unheard"
    );

    redis.restart();
    wait_for("resubscribed", async || {
        !scrape(metrics, "/readyz").contains("not heard")
    })
    .await;
    // Hits resume: a fill, a change behind pgstash's back, and the cached value is served.
    wait_for("hits resume", async || {
        v(&c, 4).await;
        let hits = scrape_sum(metrics, "pgstash_cache_hits_total");
        v(&c, 4).await;
        scrape_sum(metrics, "pgstash_cache_hits_total") > hits
    })
    .await;
    direct
        .execute("UPDATE t SET v = 41 WHERE id = 4", &[])
        .await
        .expect("direct");
    assert_eq!(v(&c, 4).await, 40, "served from the cache again");
    w.execute("UPDATE t SET v = 42 WHERE id = 4", &[])
        .await
        .expect("write");
    assert_eq!(
        v(&c, 4).await,
        42,
        "and invalidated by writes through pgstash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_through_one_instance_reloads_the_catalog_of_the_other() {
    let redis = shared_redis();
    let db = table_db("twoddl", 3);
    shared_pg().psql_db(
        &db,
        "CREATE TABLE par (id int PRIMARY KEY);
         INSERT INTO par VALUES (1), (2);",
    );
    let (a, b, _) = two_instances(redis, "ddl").await;
    let ca = a.connect("postgres", "", &db).await;
    let cb = b.connect("postgres", "", &db).await;
    // B loads its catalog before the DDL.
    assert_eq!(v(&cb, 1).await, 10);
    ca.batch_execute(
        "CREATE SEQUENCE s;
         CREATE VIEW seq_v AS SELECT nextval('s')::text AS n;
         CREATE TABLE kid (id int PRIMARY KEY, par int REFERENCES par ON DELETE CASCADE);
         INSERT INTO kid VALUES (10, 1), (20, 2);",
    )
    .await
    .expect("ddl through A");
    let one =
        async |c: &Client, sql: &str| -> String { c.query_one(sql, &[]).await.expect(sql).get(0) };
    // Eventually B hears of it; from then on it must be right every time.
    wait_for("B sees the new view", async || {
        c_try(&cb, "SELECT n FROM seq_v").await
    })
    .await;
    let mut last = one(&cb, "SELECT n FROM seq_v").await;
    for _ in 0..3 {
        let next = one(&cb, "SELECT n FROM seq_v").await;
        assert_ne!(next, last, "B served a view over nextval() from its cache");
        last = next;
    }
    for _ in 0..3 {
        assert_eq!(one(&cb, "SELECT count(*)::text FROM kid").await, "2");
    }
    cb.batch_execute("DELETE FROM par WHERE id = 1")
        .await
        .expect("cascade through B");
    assert_eq!(one(&cb, "SELECT count(*)::text FROM kid").await, "1");
    assert_eq!(one(&ca, "SELECT count(*)::text FROM kid").await, "1");
}

async fn c_try(c: &Client, sql: &str) -> bool {
    c.query_one(sql, &[]).await.is_ok()
}
