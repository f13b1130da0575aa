//! Writes pgstash cannot see, heard from Postgres itself (invalidation.source = "notify" or
//! "wal"): cached reads through pgstash become fresh shortly after such writes commit, and
//! while a source is down (also while Postgres restarts) nothing is served from the cache.

use crate::cache::scrape;
use crate::fixture::{Proxy, free_metrics_port, fresh_database};
use crate::support::{PgCluster, shared_pg};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The first column of the first row.
async fn one(c: &Client, sql: &str) -> String {
    row(c, sql)
        .await
        .split('|')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The first row, its columns joined by `|`: shows the shape of `SELECT *` too.
async fn row(c: &Client, sql: &str) -> String {
    try_row(c, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// [`row`], or the error the query got.
async fn try_row(c: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    Ok(c.simple_query(sql)
        .await?
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .unwrap_or_else(|| "no row".into()))
}

/// Reads `sql` through pgstash until its first row is `want` (columns joined by `|`; the
/// source's bound is what the deadline allows; the notify path takes milliseconds).
async fn fresh_soon(c: &Client, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = row(c, sql).await;
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

#[derive(Clone, Copy, PartialEq)]
enum Src {
    Notify,
    Wal,
}

impl Src {
    /// `invalidation.source` for this source.
    fn setting(self) -> pgstash::config::InvalidationSource {
        match self {
            Src::Notify => pgstash::config::InvalidationSource::Notify,
            Src::Wal => pgstash::config::InvalidationSource::Wal,
        }
    }
}

/// Ends the connection `src` reads database `db` with (the LISTEN connection or the
/// walsender), as an operator's `pg_terminate_backend` would; other databases' are spared.
async fn kill_source(direct: &Client, src: Src, db: &str) {
    let application = match src {
        Src::Notify => "pgstash-notify",
        Src::Wal => "pgstash_wal",
    };
    direct
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = $1 AND datname = $2",
            &[&application, &db],
        )
        .await
        .expect("terminate the source's connection");
}

/// A proxy with the source watching `db` of `pg`; drops its replication slot (if any) when
/// done.
struct Watched<'a> {
    pg: &'a PgCluster,
    /// The proxy's `/metrics`, `/readyz` endpoint.
    metrics: std::net::SocketAddr,
    proxy: Option<Proxy>,
    slot: Option<String>,
    db: String,
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        drop(self.proxy.take());
        if let Some(slot) = &self.slot {
            // The walsender may take a moment to let go of the slot after pgstash stopped.
            // A cluster that does not answer (stopped by a failed test) is left alone.
            for _ in 0..100 {
                let Ok(out) = self.pg.try_psql_db(
                    &self.db,
                    &format!(
                        "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots
                         WHERE slot_name = '{slot}' AND NOT active"
                    ),
                ) else {
                    break;
                };
                let Ok(left) = self.pg.try_psql_db(
                    &self.db,
                    &format!(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"
                    ),
                ) else {
                    break;
                };
                if out.contains('1') || left.trim().ends_with('0') {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Watched<'_> {
    /// Whether `/readyz` says the source vouches for the database (does not list it as not
    /// served from the cache); with what it says.
    fn vouched(&self) -> (bool, String) {
        let ready = tokio::task::block_in_place(|| scrape(self.metrics, "/readyz"));
        let unvouched = format!("source: database {} not served", self.db);
        (!ready.contains(&unvouched), ready)
    }

    async fn wait_until_vouched(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (vouched, ready) = self.vouched();
            if vouched {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the change source never came back:\n{ready}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn watched<'a>(pg: &'a PgCluster, db: &str, src: Src) -> (Watched<'a>, Client, Client) {
    watched_with(pg, db, src, |_| {}).await
}

/// [`watched`], with more configuration.
async fn watched_with<'a>(
    pg: &'a PgCluster,
    db: &str,
    src: Src,
    tweak: impl FnOnce(&mut pgstash::config::Config),
) -> (Watched<'a>, Client, Client) {
    let mut direct = pg.client(db).await;
    pgstash::migrate::up(&mut direct).await.expect("migrate up");
    match src {
        Src::Notify => direct
            .batch_execute("CREATE TABLE probe (v int); INSERT INTO probe VALUES (0)")
            .await
            .expect("probe"),
        Src::Wal => direct
            // As a WAL user should: the source has no use for the NOTIFY row triggers.
            // Unlogged: its writes are not in the WAL, so the source cannot see them.
            .batch_execute(
                "SELECT pgstash.set_row_triggers(false);
                 CREATE UNLOGGED TABLE probe (v int); INSERT INTO probe VALUES (0)",
            )
            .await
            .expect("probe"),
    }
    let slot = (src == Src::Wal).then(|| {
        format!(
            "t_{}",
            db.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        )
        .to_ascii_lowercase()
    });
    let (db_owned, slot_cfg) = (db.to_string(), slot.clone());
    let metrics = free_metrics_port();
    let proxy = Proxy::start(pg, move |c| {
        c.metrics.listen = Some(metrics);
        c.invalidation.source = src.setting();
        c.invalidation.databases = vec![db_owned];
        if let Some(s) = slot_cfg {
            c.invalidation.slot = s;
        }
        tweak(c);
    });
    let through = proxy.connect("postgres", "", db).await;
    let w = Watched {
        pg,
        metrics,
        proxy: Some(proxy),
        slot,
        db: db.to_string(),
    };
    (w, through, direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_behind_pgstash_invalidate_through_notify() {
    writes_behind_pgstash_invalidate(Src::Notify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_behind_pgstash_invalidate_through_the_wal() {
    writes_behind_pgstash_invalidate(Src::Wal).await;
}

async fn writes_behind_pgstash_invalidate(src: Src) {
    let pg = shared_pg();
    let db = fresh_database(pg, "srcwrites");
    pg.psql_db(
        &db,
        "CREATE TABLE parent (id int PRIMARY KEY, v int);
         CREATE TABLE child (id int PRIMARY KEY, pid int REFERENCES parent ON DELETE CASCADE ON UPDATE CASCADE, v int);
         INSERT INTO parent VALUES (1, 1), (2, 2); INSERT INTO child VALUES (10, 1, 0), (20, 2, 0);
         CREATE TABLE audit (id int PRIMARY KEY DEFAULT 1, n int); INSERT INTO audit VALUES (1, 0);
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
    let (_w, c, direct) = watched(pg, &db, src).await;
    wait_until_caching(&c, &direct, src).await;
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
    // A materialized view refresh (for the WAL source: not in the replication stream; the
    // DDL hooks write it into the WAL). The view still says 0 until then.
    assert_eq!(one(&c, "SELECT s FROM mv").await, "0", "fills the cache");
    direct
        .batch_execute("REFRESH MATERIALIZED VIEW mv")
        .await
        .expect("refresh");
    fresh_soon(&c, "SELECT s FROM mv", "105").await;
    // DDL behind pgstash's back: a cached SELECT * must take the new shape.
    let star = "SELECT * FROM src WHERE id = 1";
    assert_eq!(row(&c, star).await, "1|105", "fills the cache");
    direct
        .batch_execute("ALTER TABLE src ADD COLUMN w int DEFAULT 7")
        .await
        .expect("ddl");
    fresh_soon(&c, star, "1|105|7").await;
    fresh_soon(&c, "SELECT w FROM src WHERE id = 1", "7").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reads_its_own_trigger_and_function_writes_at_once_through_notify() {
    own_hidden_writes_are_read_at_once(Src::Notify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reads_its_own_trigger_and_function_writes_at_once_through_the_wal() {
    own_hidden_writes_are_read_at_once(Src::Wal).await;
}

/// What a trigger or a function wrote reaches the cache through the source, milliseconds
/// after the commit; the writing client's next read must see it all the same. Many rounds:
/// each one the source is slower than the client's next read would serve a stale row.
async fn own_hidden_writes_are_read_at_once(src: Src) {
    let pg = shared_pg();
    let db = fresh_database(pg, "ownhidden");
    hidden_writers(pg, &db);
    // A source lag bound far above the test's deadlines: caching that resumes after the
    // hidden writes below has heard their echo; it did not just wait max_lag out.
    let (_w, c, direct) = watched_with(pg, &db, src, |cfg| {
        cfg.invalidation.max_lag = Duration::from_secs(600);
    })
    .await;
    wait_until_caching(&c, &direct, src).await;
    let read = "SELECT n FROM tl WHERE id = 1";
    for round in 0..30 {
        let n = 2 * round;
        // Twice: the second read is served from the cache.
        assert_eq!(one(&c, read).await, n.to_string(), "round {round}");
        assert_eq!(one(&c, read).await, n.to_string(), "round {round}");
        answered(&c, "UPDATE tw SET v = v + 1 WHERE id = 1").await;
        assert_eq!(
            one(&c, read).await,
            (n + 1).to_string(),
            "round {round}: right after a write whose trigger wrote tl"
        );
        assert_eq!(one(&c, read).await, (n + 1).to_string(), "round {round}");
        assert_eq!(
            one(&c, "SELECT bump()").await,
            (n + 2).to_string(),
            "round {round}: the function's write"
        );
        assert_eq!(
            one(&c, read).await,
            (n + 2).to_string(),
            "round {round}: right after a function's write"
        );
    }
    // The client is served from the cache again once the source has heard it.
    wait_until_caching(&c, &direct, src).await;
}

/// Writes hidden one step further: in a column default, a domain's check, a view, a
/// materialized view's query, an event trigger, next to a plain write in one text, or in
/// text the parser does not take. Each statement below makes `bump()` count in `tl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reads_writes_hidden_in_defaults_views_and_event_triggers_at_once() {
    let pg = shared_pg();
    let db = fresh_database(pg, "deephidden");
    hidden_writers(pg, &db);
    pg.psql_db(
        &db,
        "CREATE TABLE plain (id int PRIMARY KEY, v int); INSERT INTO plain VALUES (1, 0);
         CREATE TABLE defaulted (id int PRIMARY KEY, n int DEFAULT bump());
         CREATE DOMAIN counted AS int CHECK (bump() > 0);
         CREATE TABLE checked (v counted);
         CREATE VIEW counting AS SELECT bump() AS n;
         CREATE MATERIALIZED VIEW counted_once AS SELECT bump() AS n WITH NO DATA;
         CREATE FUNCTION on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS
           $$ BEGIN UPDATE tl SET n = n + 1 WHERE id = 1; END $$;
         CREATE EVENT TRIGGER counts_ddl ON ddl_command_end
           WHEN TAG IN ('CREATE INDEX') EXECUTE FUNCTION on_ddl();",
    );
    // The wal source: the slower one, so a missed hidden write shows sooner.
    let (_w, c, direct) = watched_with(pg, &db, Src::Wal, |cfg| {
        cfg.invalidation.max_lag = Duration::from_secs(600);
    })
    .await;
    wait_until_caching(&c, &direct, Src::Wal).await;
    let read = "SELECT n FROM tl WHERE id = 1";
    let mut n = 0;
    let mut stale = Vec::new();
    let statements: [&dyn Fn(usize) -> String; 7] = [
        &|round| format!("INSERT INTO defaulted (id) VALUES ({round})"),
        &|_| "INSERT INTO checked VALUES (1)".into(),
        &|_| "SELECT n FROM counting".into(),
        &|_| "REFRESH MATERIALIZED VIEW counted_once".into(),
        &|_| "CREATE INDEX ON plain (v)".into(),
        &|_| "UPDATE plain SET v = v + 1 WHERE id = 1; SELECT bump()".into(),
        &|_| "SELECT bump() AS b ORDER BY b USING <".into(),
    ];
    for statement in statements {
        // Many rounds: each one the source is slower than the client's next read would
        // serve a stale row.
        for round in 0..12 {
            let sql = statement(round);
            assert_eq!(one(&c, read).await, n.to_string(), "before {sql}");
            assert_eq!(one(&c, read).await, n.to_string(), "before {sql}");
            answered(&c, &sql).await;
            n += 1;
            let got = one(&c, read).await;
            if got != n.to_string() {
                stale.push(format!("right after {sql}: {got}, not {n}"));
                fresh_soon(&c, read, &n.to_string()).await;
                break;
            }
            assert_eq!(one(&c, read).await, n.to_string(), "after {sql}");
        }
    }
    assert!(stale.is_empty(), "stale reads:\n{}", stale.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_commit_is_answered_every_client_reads_what_its_triggers_wrote_through_notify() {
    hidden_writes_are_read_by_others_once_committed(Src::Notify, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_commit_is_answered_every_client_reads_what_its_triggers_wrote_through_the_wal() {
    hidden_writes_are_read_by_others_once_committed(Src::Wal, false).await;
}

/// With Redis the shared tier holds results too: the commit's answer also waits until
/// Redis has the source's invalidations, or a reader could copy an old L2 value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_commit_is_answered_no_client_reads_an_old_shared_value_of_what_its_triggers_wrote()
{
    hidden_writes_are_read_by_others_once_committed(Src::Notify, true).await;
}

/// An application writes on one pooled connection and reads on another: as with Postgres,
/// once the commit is answered the other connection must read what the commit's triggers
/// and functions wrote, although only the source tells pgstash which tables those are.
async fn hidden_writes_are_read_by_others_once_committed(src: Src, shared: bool) {
    let pg = shared_pg();
    let db = fresh_database(pg, "otherhidden");
    let prefix = format!("{db}:");
    hidden_writers(pg, &db);
    let (w, writer, direct) = watched_with(pg, &db, src, |cfg| {
        cfg.invalidation.max_lag = Duration::from_secs(600);
        if shared {
            cfg.redis.url = Some(crate::support::shared_redis().url());
            cfg.redis.prefix = prefix;
        }
    })
    .await;
    let proxy = w.proxy.as_ref().expect("running");
    let reader = proxy.connect("postgres", "", &db).await;
    // Each round's first read is a miss that fills both tiers; with Redis, a second client
    // reads that value from Redis while L1 copies are invalidated.
    let l2_reader = proxy.connect("postgres", "", &db).await;
    wait_until_caching(&reader, &direct, src).await;
    let read = "SELECT n FROM tl WHERE id = 1";
    for round in 0..30 {
        let n = 2 * round;
        assert_eq!(one(&reader, read).await, n.to_string(), "round {round}");
        assert_eq!(one(&reader, read).await, n.to_string(), "round {round}");
        answered(
            &writer,
            "BEGIN; UPDATE tw SET v = v + 1 WHERE id = 1; COMMIT",
        )
        .await;
        assert_eq!(
            one(&reader, read).await,
            (n + 1).to_string(),
            "round {round}: another client, right after a commit whose trigger wrote tl"
        );
        assert_eq!(
            one(&l2_reader, read).await,
            (n + 1).to_string(),
            "round {round}"
        );
        assert_eq!(
            one(&reader, read).await,
            (n + 1).to_string(),
            "round {round}"
        );
        answered(&writer, "SELECT bump()").await;
        assert_eq!(
            one(&reader, read).await,
            (n + 2).to_string(),
            "round {round}: another client, right after a function's write"
        );
    }
    wait_until_caching(&reader, &direct, src).await;
}

/// Runs `sql`, whose commit's answer waits for the change source's echo: an echo that never
/// comes back would hold it for max_lag, which these tests set far beyond this deadline.
async fn answered(c: &Client, sql: &str) {
    match tokio::time::timeout(Duration::from_secs(10), c.batch_execute(sql)).await {
        Ok(done) => done.unwrap_or_else(|e| panic!("{sql}: {e}")),
        Err(_) => panic!("{sql}: no answer within 10 s: its echo never came back"),
    }
}

/// `tw`, whose row trigger counts its updates in `tl` (`n` of row 1), and `bump()`, a
/// function that counts in `tl` as well: writes to `tl` that no statement names.
fn hidden_writers(pg: &PgCluster, db: &str) {
    pg.psql_db(
        db,
        "CREATE TABLE tw (id int PRIMARY KEY, v int); INSERT INTO tw VALUES (1, 0);
         CREATE TABLE tl (id int PRIMARY KEY, n int); INSERT INTO tl VALUES (1, 0);
         CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN UPDATE tl SET n = n + 1 WHERE id = 1; RETURN NULL; END $$;
         CREATE TRIGGER t AFTER UPDATE ON tw FOR EACH ROW EXECUTE FUNCTION log_write();
         CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS
           $$ UPDATE tl SET n = n + 1 WHERE id = 1 RETURNING n $$;",
    );
}

/// A write of `probe` the source cannot see: replica role skips ordinary triggers (notify);
/// probe is unlogged (wal).
fn hidden(v: i32, src: Src) -> String {
    match src {
        Src::Notify => format!(
            "SET session_replication_role = replica; UPDATE probe SET v = {v}; RESET session_replication_role"
        ),
        Src::Wal => format!("UPDATE probe SET v = {v}"),
    }
}

/// Until the source is up nothing is cached: wait until a read of `probe` is a hit.
async fn wait_until_caching(c: &Client, direct: &Client, src: Src) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before: i32 = one(c, "SELECT v FROM probe").await.parse().expect("int");
        direct
            .batch_execute(&hidden(before + 1, src))
            .await
            .expect("hidden write");
        if one(c, "SELECT v FROM probe").await == before.to_string() {
            return; // served from the cache: the source is up
        }
        assert!(Instant::now() < deadline, "the change source never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notify_listener_stops_the_cache_until_it_is_back() {
    a_lost_source_stops_the_cache_until_it_is_back(Src::Notify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replication_connection_stops_the_cache_until_it_is_back() {
    a_lost_source_stops_the_cache_until_it_is_back(Src::Wal).await;
}

async fn a_lost_source_stops_the_cache_until_it_is_back(src: Src) {
    let pg = shared_pg();
    let db = fresh_database(pg, "srckill");
    let (_w, c, direct) = watched(pg, &db, src).await;
    direct
        .batch_execute("CREATE TABLE seen (id int PRIMARY KEY DEFAULT 1, v int); INSERT INTO seen VALUES (1, 1)")
        .await
        .expect("seen");
    wait_until_caching(&c, &direct, src).await;
    let q = "SELECT v FROM probe";
    kill_source(&direct, src, &db).await;
    direct
        .batch_execute(&hidden(500, src))
        .await
        .expect("hidden");
    // As soon as the source notices (it reports before reconnecting), reads go to Postgres.
    fresh_soon(&c, q, "500").await;
    // Back: caching works again...
    wait_until_caching(&c, &direct, src).await;
    // ...and so does invalidation.
    assert_eq!(one(&c, "SELECT v FROM seen").await, "1");
    direct
        .batch_execute("UPDATE seen SET v = 2")
        .await
        .expect("w");
    fresh_soon(&c, "SELECT v FROM seen", "2").await;
}

/// The listener's backend stops answering without closing its connection (SIGSTOP: what a
/// half-open connection looks like from pgstash's side). Notifications stop arriving, so
/// the source must stop vouching within `invalidation.max_lag`, well before its default
/// probe period (10 s) and probe timeout (10 s) would notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_notify_listener_stops_vouching_within_max_lag() {
    let pg = shared_pg();
    let db = fresh_database(pg, "silent");
    let (_w, c, direct) = watched_with(pg, &db, Src::Notify, |cfg| {
        cfg.invalidation.max_lag = Duration::from_secs(2);
    })
    .await;
    wait_until_caching(&c, &direct, Src::Notify).await;
    let pids: Vec<i32> = direct
        .query(
            "SELECT pid FROM pg_stat_activity
              WHERE application_name = 'pgstash-notify' AND datname = $1",
            &[&db],
        )
        .await
        .expect("listener pid")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!pids.is_empty(), "no listener backend");
    let stopped = Stopped::new(&pids);
    let since = Instant::now();
    // Unseen by the source in any case: fresh only once the source stops vouching.
    direct
        .batch_execute(&hidden(7777, Src::Notify))
        .await
        .expect("hidden write");
    loop {
        if one(&c, "SELECT v FROM probe").await == "7777" {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(8),
            "still served from the cache {:?} after the listener went silent",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stopped);
    // It reconnects and vouches again.
    wait_until_caching(&c, &direct, Src::Notify).await;
}

/// Postgres backends stopped with SIGSTOP, continued when dropped (also on a panic).
struct Stopped(Vec<i32>);

impl Stopped {
    fn new(pids: &[i32]) -> Stopped {
        for pid in pids {
            signal("-STOP", *pid);
        }
        Stopped(pids.to_vec())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for pid in &self.0 {
            signal("-CONT", *pid);
        }
    }
}

fn signal(sig: &str, pid: i32) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_source_survives_a_postgres_restart() {
    a_source_survives_a_postgres_restart(Src::Notify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_source_survives_a_postgres_restart() {
    a_source_survives_a_postgres_restart(Src::Wal).await;
}

/// Postgres stops and starts again on its port under a running pgstash: while the source is
/// cut off nothing of the database comes from the cache, the source comes back by itself,
/// and no write committed before the stop (seen by the source or not) or after the start is
/// served stale.
async fn a_source_survives_a_postgres_restart(src: Src) {
    // Stopping would disturb every other test on the shared cluster: a private one.
    let pg = PgCluster::start();
    let db = fresh_database(&pg, "srcrestart");
    let (w, c, direct) = watched(&pg, &db, src).await;
    direct
        .batch_execute("CREATE TABLE seen (id int PRIMARY KEY DEFAULT 1, v int); INSERT INTO seen VALUES (1, 1)")
        .await
        .expect("seen");
    wait_until_caching(&c, &direct, src).await;
    let (seen, probe) = ("SELECT v FROM seen", "SELECT v FROM probe");
    assert_eq!(one(&c, seen).await, "1", "fills the cache");
    // Committed right before the stop: a write the source sees and one it cannot.
    direct
        .batch_execute("UPDATE seen SET v = 2")
        .await
        .expect("seen write");
    direct
        .batch_execute(&hidden(1000, src))
        .await
        .expect("hidden write");
    assert_ne!(
        one(&c, probe).await,
        "1000",
        "probe is served from the cache"
    );
    tokio::task::block_in_place(|| pg.stop());
    // Postgres is down: a read answered at all would come from the cache.
    unserved_soon(&c, probe).await;
    unserved_soon(&c, seen).await;
    let (vouched, ready) = w.vouched();
    assert!(
        !vouched,
        "the source vouches while Postgres is down:\n{ready}"
    );
    tokio::task::block_in_place(|| pg.restart());
    // Whether or not the source is back yet, nothing from before the stop is served.
    fresh_once_answered(&c, seen, "2").await;
    fresh_once_answered(&c, probe, "1000").await;
    let direct = pg.client(&db).await;
    direct
        .batch_execute("UPDATE seen SET v = 3")
        .await
        .expect("write after the start");
    // Back without a pgstash restart, and having dropped what it could not vouch for.
    w.wait_until_vouched().await;
    assert_eq!(
        one(&c, probe).await,
        "1000",
        "stale once the source is back"
    );
    fresh_soon(&c, seen, "3").await;
    // A repeated read is a hit again...
    wait_until_caching(&c, &direct, src).await;
    // ...and writes behind pgstash's back invalidate again.
    assert_eq!(one(&c, seen).await, "3", "fills the cache");
    direct
        .batch_execute("UPDATE seen SET v = 4")
        .await
        .expect("write once the source is back");
    fresh_soon(&c, seen, "4").await;
}

/// Reads `sql` through pgstash, with Postgres down, until it fails: it may be answered (from
/// the cache) only until the source notices that it lost Postgres, at most 5 s.
async fn unserved_soon(c: &Client, sql: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = match try_row(c, sql).await {
            Err(_) => return,
            Ok(got) => got,
        };
        assert!(
            Instant::now() < deadline,
            "{sql}: served {got} while Postgres is down and the source cut off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `sql` through pgstash until it is answered (its pool reconnects after a restart);
/// the first answer must be `want`.
async fn fresh_once_answered(c: &Client, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_row(c, sql).await {
            Ok(got) => {
                assert_eq!(got, want, "{sql}: stale after the restart");
                return;
            }
            Err(e) => assert!(Instant::now() < deadline, "{sql}: still failing: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_reads_the_source_and_another_takes_over_when_it_stops() {
    let pg = shared_pg();
    let redis = crate::support::shared_redis();
    let db = fresh_database(pg, "srcelect");
    let mut direct = pg.client(&db).await;
    pgstash::migrate::up(&mut direct).await.expect("migrate up");
    direct
        .batch_execute(
            "CREATE TABLE probe (v int); INSERT INTO probe VALUES (0);
             CREATE TABLE seen (id int PRIMARY KEY DEFAULT 1, v int); INSERT INTO seen VALUES (1, 1);",
        )
        .await
        .expect("tables");
    let prefix = format!("elect{}:", std::process::id());
    let start = || {
        let (db, url, prefix) = (db.clone(), redis.url(), prefix.clone());
        Proxy::start(pg, move |c| {
            c.invalidation.source = pgstash::config::InvalidationSource::Notify;
            c.invalidation.databases = vec![db];
            c.redis.url = Some(url);
            c.redis.prefix = prefix;
        })
    };
    let listeners = async || -> Vec<i32> {
        direct
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgstash-notify' AND datname = current_database()",
                &[],
            )
            .await
            .expect("listeners")
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // A alone: it becomes the reader.
    let a = start();
    let ca = a.connect("postgres", "", &db).await;
    wait_until_caching(&ca, &direct, Src::Notify).await;
    // B joins: it follows (no second listener) and still caches and invalidates.
    let b = start();
    let cb = b.connect("postgres", "", &db).await;
    wait_until_caching(&cb, &direct, Src::Notify).await;
    let first = listeners().await;
    assert_eq!(first.len(), 1, "one instance reads the source");
    assert_eq!(one(&cb, "SELECT v FROM seen").await, "1");
    assert_eq!(one(&ca, "SELECT v FROM seen").await, "1");
    direct
        .batch_execute("UPDATE seen SET v = 2")
        .await
        .expect("w");
    fresh_soon(&ca, "SELECT v FROM seen", "2").await;
    fresh_soon(&cb, "SELECT v FROM seen", "2").await;
    // The reader stops: B takes over, and writes behind pgstash invalidate through B again.
    drop(ca);
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = listeners().await;
        if now.len() == 1 && now != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no instance took over the source"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until_caching(&cb, &direct, Src::Notify).await;
    assert_eq!(one(&cb, "SELECT v FROM seen").await, "2");
    direct
        .batch_execute("UPDATE seen SET v = 3")
        .await
        .expect("w");
    fresh_soon(&cb, "SELECT v FROM seen", "3").await;
}

/// Two instances over Redis, one reading the source: a commit with trigger writes is
/// answered, on either instance, only once both read what the triggers wrote. The
/// follower's echo travels through Postgres to the reader, which passes it on over Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_through_either_instance_is_read_by_both_once_answered() {
    for src in [Src::Notify, Src::Wal] {
        hidden_writes_across_instances(src).await;
    }
}

async fn hidden_writes_across_instances(src: Src) {
    let pg = shared_pg();
    let two = TwoInstances::start(pg, src, "twohidden").await;
    let (ca, cb) = (&two.ca, &two.cb);
    let read = "SELECT n FROM tl WHERE id = 1";
    for round in 0..20 {
        let (writer, other) = if round % 2 == 0 { (cb, ca) } else { (ca, cb) };
        for c in [ca, cb, ca, cb] {
            assert_eq!(one(c, read).await, round.to_string(), "round {round}");
        }
        answered(writer, "UPDATE tw SET v = v + 1 WHERE id = 1").await;
        let want = (round + 1).to_string();
        assert_eq!(
            one(other, read).await,
            want,
            "round {round}: the other instance"
        );
        assert_eq!(
            one(writer, read).await,
            want,
            "round {round}: the writer's instance"
        );
    }
    // Both instances serve from the cache again: the echoes came back, max_lag is far.
    wait_until_caching(cb, &two.direct, src).await;
    wait_until_caching(ca, &two.direct, src).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_answered_while_the_notify_reader_is_lost_is_read_fresh_by_both_instances() {
    hidden_writes_while_the_reader_is_lost(Src::Notify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_answered_while_the_wal_reader_is_lost_is_read_fresh_by_both_instances() {
    hidden_writes_while_the_reader_is_lost(Src::Wal).await;
}

/// The source's connection dies under the instance reading it (the follower hears of it
/// only when it next polls the reader's health, up to a second later), and a commit with
/// hidden writes is answered meanwhile, through either instance: no source tells anyone
/// what it wrote, yet both instances must read it once it is answered.
async fn hidden_writes_while_the_reader_is_lost(src: Src) {
    let pg = shared_pg();
    let two = TwoInstances::start(pg, src, "lostreader").await;
    let (ca, cb) = (&two.ca, &two.cb);
    let read = "SELECT n FROM tl WHERE id = 1";
    for round in 0..6 {
        let (writer, other) = if round % 2 == 0 { (ca, cb) } else { (cb, ca) };
        // Both instances cache tl again (the source came back since the last round).
        wait_until_caching(ca, &two.direct, src).await;
        wait_until_caching(cb, &two.direct, src).await;
        for c in [ca, cb, ca, cb] {
            assert_eq!(one(c, read).await, round.to_string(), "round {round}");
        }
        kill_source(&two.direct, src, &two.db).await;
        answered(writer, "UPDATE tw SET v = v + 1 WHERE id = 1").await;
        let want = (round + 1).to_string();
        assert_eq!(
            one(other, read).await,
            want,
            "round {round}: the other instance"
        );
        assert_eq!(
            one(writer, read).await,
            want,
            "round {round}: the writer's instance"
        );
    }
}

/// Two pgstash instances sharing a Redis and watching one database with `src` (the first
/// reads the source, the second follows it), with [`hidden_writers`] installed; `max_lag`
/// far beyond the tests' deadlines.
struct TwoInstances<'a> {
    // Dropped in this order: clients before their proxies (which wait for their clients
    // to leave), the follower before the reader (or it could take over the source the
    // reader's drop cleans up).
    ca: Client,
    cb: Client,
    direct: Client,
    db: String,
    _b: Proxy,
    _a: Watched<'a>,
}

impl<'a> TwoInstances<'a> {
    async fn start(pg: &'a PgCluster, src: Src, tag: &str) -> TwoInstances<'a> {
        let redis = crate::support::shared_redis();
        let db = fresh_database(pg, tag);
        hidden_writers(pg, &db);
        let prefix = format!("{db}:");
        let tweak = |c: &mut pgstash::config::Config| {
            c.invalidation.max_lag = Duration::from_secs(600);
            c.redis.url = Some(redis.url());
            c.redis.prefix = prefix.clone();
        };
        let (a, ca, direct) = watched_with(pg, &db, src, tweak).await;
        wait_until_caching(&ca, &direct, src).await;
        let b = Proxy::start(pg, |c| {
            c.invalidation.source = src.setting();
            c.invalidation.databases = vec![db.clone()];
            if let Some(slot) = &a.slot {
                c.invalidation.slot = slot.clone();
            }
            tweak(c);
        });
        let cb = b.connect("postgres", "", &db).await;
        wait_until_caching(&cb, &direct, src).await;
        TwoInstances {
            ca,
            cb,
            direct,
            db,
            _b: b,
            _a: a,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_changes_behind_pgstash_invalidate_through_notify() {
    role_changes_behind_pgstash_invalidate(Src::Notify, "n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_changes_behind_pgstash_invalidate_through_the_wal() {
    role_changes_behind_pgstash_invalidate(Src::Wal, "w").await;
}

/// A membership revoked straight in Postgres: no event trigger fires for it and logical
/// decoding does not carry it, yet the member may no longer read what it read.
async fn role_changes_behind_pgstash_invalidate(src: Src, tag: &str) {
    let pg = shared_pg();
    let db = fresh_database(pg, "srcroles");
    let (reader, user) = (
        format!("rolesrc_reader_{tag}"),
        format!("rolesrc_user_{tag}"),
    );
    pg.psql_db(
        &db,
        &format!(
            "CREATE TABLE r (id int PRIMARY KEY, v text); INSERT INTO r VALUES (1, 'one');
             CREATE ROLE {reader}; GRANT SELECT ON r TO {reader};
             CREATE ROLE {user} LOGIN PASSWORD 'rolesrcpass'; GRANT {reader} TO {user};"
        ),
    );
    let (w, _through, direct) = watched(pg, &db, src).await;
    w.wait_until_vouched().await;
    let proxy = w.proxy.as_ref().expect("running");
    let c = proxy.connect(&user, "rolesrcpass", &db).await;
    let read = "SELECT v FROM r WHERE id = 1";
    for _ in 0..3 {
        assert_eq!(one(&c, read).await, "one");
    }
    direct
        .batch_execute(&format!("REVOKE {reader} FROM {user}"))
        .await
        .expect("revoke behind pgstash's back");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match try_row(&c, read).await {
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                break;
            }
            got => assert!(
                Instant::now() < deadline,
                "still read after the revoke: {got:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
