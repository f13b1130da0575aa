//! The NOTIFY change source: after `pgstash migrate up`, every kind of committed write
//! reaches a ChangeSink as the right change for the right table, and nothing else does.

use crate::fixture::fresh_database;
use crate::recorder::{Event as Seen, Recorder};
use crate::support::shared_pg;
use futures_util::SinkExt;
use pgstash::invalidation::notify::{self, ListenerConfig, NotifyError};
use pgstash::invalidation::{Change, TableRef};
use pgstash::migrate;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// How long a change may take to arrive before a test fails.
const PATIENCE: Duration = Duration::from_secs(10);

impl Recorder {
    /// A position in the record: what comes after it happened after this call.
    fn mark(&self) -> usize {
        self.lock().len()
    }

    fn since(&self, mark: usize) -> Vec<Seen> {
        self.lock()[mark..].to_vec()
    }

    /// Waits until `done` holds for what was seen since `mark`, and returns that.
    async fn wait(&self, mark: usize, what: &str, done: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen = self.since(mark);
            if done(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "waited {PATIENCE:?} for {what}; the sink saw: {seen:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn changes(seen: &[Seen]) -> Vec<Change> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Apply { changes, .. } => Some(changes.clone()),
            Seen::Health { .. } => None,
        })
        .flatten()
        .collect()
}

fn t(name: &str) -> TableRef {
    TableRef {
        schema: "public".into(),
        name: name.into(),
    }
}

fn rows(name: &str) -> Change {
    Change::Rows {
        table: t(name),
        keys: None,
    }
}

fn table(name: &str) -> Change {
    Change::Table(t(name))
}

fn config() -> ListenerConfig {
    ListenerConfig {
        backoff_initial: Duration::from_millis(50),
        check_interval: Duration::from_millis(300),
        ..ListenerConfig::default()
    }
}

/// A fresh database set up with `setup`, migrated, with a listener delivering to a
/// [`Recorder`]. The listener stops when this is dropped.
struct Watched {
    db: String,
    client: Client,
    sink: Arc<Recorder>,
    stop: CancellationToken,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn watch(setup: &str) -> Watched {
    let pg = shared_pg();
    let db = fresh_database(pg, "notify");
    if !setup.is_empty() {
        pg.psql_db(&db, setup);
    }
    let mut client = pg.client(&db).await;
    migrate::up(&mut client).await.expect("migrate up");
    // A table for marker writes: once its change arrives, everything committed before it
    // has arrived too (notifications are delivered in commit order).
    client
        .batch_execute("CREATE TABLE marker (n int)")
        .await
        .expect("creating the marker table");
    let sink = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let mark = sink.mark();
    tokio::spawn(notify::run(
        pg.url("postgres", "", &db),
        db.clone(),
        sink.clone(),
        config(),
        stop.clone(),
    ));
    sink.wait(mark, "the listener to become healthy", |seen| {
        seen.iter()
            .any(|s| matches!(s, Seen::Health { healthy: true, .. }))
    })
    .await;
    Watched {
        db,
        client,
        sink,
        stop,
    }
}

impl Watched {
    async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", pgstash::pg_error::describe(&e)));
    }

    /// Runs `sql`, waits until every change in `expected` has arrived, and returns all
    /// changes that arrived since `sql` started.
    async fn expect(&self, sql: &str, expected: &[Change]) -> Vec<Change> {
        let mark = self.sink.mark();
        self.exec(sql).await;
        let seen = self
            .sink
            .wait(mark, &format!("{expected:?} after {sql:?}"), |seen| {
                let got = changes(seen);
                expected.iter().all(|c| got.contains(c))
            })
            .await;
        changes(&seen)
    }

    /// Runs `sql` then a marker write, and returns every change that arrived before the
    /// marker's: all `sql` caused.
    async fn everything_from(&self, sql: &str) -> Vec<Change> {
        let mark = self.sink.mark();
        self.exec(sql).await;
        self.exec("INSERT INTO marker VALUES (1)").await;
        let seen = self
            .sink
            .wait(mark, "the marker write", |seen| {
                changes(seen).contains(&rows("marker"))
            })
            .await;
        let mut got = changes(&seen);
        let at = got
            .iter()
            .position(|c| *c == rows("marker"))
            .expect("the marker is there");
        got.truncate(at);
        got
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_need_quoting_reach_the_listener_verbatim() {
    // The trigger quotes names itself (quote_ident, migration 0006): quotes, dots,
    // backslashes and control characters in names must be read back as written.
    let w = watch(concat!(
        r#"CREATE SCHEMA "My ""Schema"" \";"#,
        r#"CREATE TABLE "My ""Schema"" \"."a.b ""c"" \d" (id int);"#,
        "CREATE TABLE \"tab\tbed\" (id int)",
    ))
    .await;
    let odd = Change::Rows {
        table: TableRef {
            schema: r#"My "Schema" \"#.into(),
            name: r#"a.b "c" \d"#.into(),
        },
        keys: None,
    };
    w.expect(
        r#"INSERT INTO "My ""Schema"" \"."a.b ""c"" \d" VALUES (1)"#,
        &[odd],
    )
    .await;
    w.expect("INSERT INTO \"tab\tbed\" VALUES (1)", &[rows("tab\tbed")])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_and_deletes_report_rows_of_their_table() {
    let w = watch("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let before = SystemTime::now();
    w.expect("INSERT INTO t VALUES (1, 1), (2, 2)", &[rows("t")])
        .await;
    let after = SystemTime::now();
    w.expect("UPDATE t SET v = v + 1 WHERE id = 1", &[rows("t")])
        .await;
    w.expect("DELETE FROM t WHERE id = 2", &[rows("t")]).await;
    w.expect(
        "INSERT INTO t VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET v = t.v + 1",
        &[rows("t")],
    )
    .await;
    w.expect(
        "MERGE INTO t USING (SELECT 5 AS id) s ON t.id = s.id
         WHEN NOT MATCHED THEN INSERT VALUES (5, 5)",
        &[rows("t")],
    )
    .await;
    let mark = w.sink.mark();
    let copy = w
        .client
        .copy_in::<_, bytes::Bytes>("COPY t FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    futures_util::pin_mut!(copy);
    copy.send(bytes::Bytes::from_static(b"7\t7\n"))
        .await
        .expect("COPY data");
    copy.finish().await.expect("COPY done");
    w.sink
        .wait(mark, "COPY FROM to report rows of t", |seen| {
            changes(seen).contains(&rows("t"))
        })
        .await;
    // The time says when the write happened, so the staleness window can be measured.
    let seen = w.sink.since(0);
    let at = seen
        .iter()
        .find_map(|s| match s {
            Seen::Apply { at, db, .. } if db == &w.db => *at,
            _ => None,
        })
        .expect("a delivery with a time");
    let slack = Duration::from_secs(1);
    assert!(
        at + slack >= before && at <= after + slack,
        "{at:?} not within {before:?}..{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascading_foreign_keys_report_the_child_table() {
    let w = watch(
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (id int PRIMARY KEY,
             parent_id int REFERENCES parent ON DELETE CASCADE ON UPDATE CASCADE);
         INSERT INTO parent VALUES (1), (2);
         INSERT INTO child VALUES (10, 1), (20, 2);",
    )
    .await;
    w.expect(
        "DELETE FROM parent WHERE id = 1",
        &[rows("parent"), rows("child")],
    )
    .await;
    w.expect(
        "UPDATE parent SET id = 3 WHERE id = 2",
        &[rows("parent"), rows("child")],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_by_triggers_functions_and_procedures_report_the_tables_written() {
    let w = watch(
        "CREATE TABLE watched (id int);
         CREATE TABLE audit (what text);
         CREATE FUNCTION audit_it() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO audit VALUES (TG_OP); RETURN NULL; END $$;
         CREATE TRIGGER audit_it AFTER INSERT ON watched FOR EACH ROW EXECUTE FUNCTION audit_it();
         CREATE TABLE written (id int);
         CREATE FUNCTION write_it() RETURNS int LANGUAGE sql AS
           $$ INSERT INTO written VALUES (1) RETURNING id $$;
         CREATE TABLE proc_written (id int);
         CREATE PROCEDURE write_proc() LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO proc_written VALUES (1); END $$;",
    )
    .await;
    w.expect(
        "INSERT INTO watched VALUES (1)",
        &[rows("watched"), rows("audit")],
    )
    .await;
    w.expect("SELECT write_it()", &[rows("written")]).await;
    w.expect("CALL write_proc()", &[rows("proc_written")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_report_the_table_a_write_names() {
    let w = watch(
        "CREATE TABLE measurements (id int, region int) PARTITION BY LIST (region);
         CREATE TABLE measurements_1 PARTITION OF measurements FOR VALUES IN (1);
         CREATE TABLE measurements_2 PARTITION OF measurements FOR VALUES IN (2);",
    )
    .await;
    let through_parent = w
        .everything_from("INSERT INTO measurements VALUES (1, 1), (2, 2)")
        .await;
    assert_eq!(through_parent, vec![rows("measurements")]);
    let direct = w.everything_from("UPDATE measurements_2 SET id = 3").await;
    assert_eq!(direct, vec![rows("measurements_2")]);
    w.expect(
        "TRUNCATE measurements",
        &[
            table("measurements"),
            table("measurements_1"),
            table("measurements_2"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_materialized_view_reports_the_view_as_a_whole() {
    let w = watch(
        "CREATE TABLE base (id int PRIMARY KEY);
         CREATE MATERIALIZED VIEW summary AS SELECT count(*) AS n FROM base;
         CREATE UNIQUE INDEX ON summary (n);",
    )
    .await;
    for refresh in [
        "REFRESH MATERIALIZED VIEW summary",
        // Works through temporary tables, which must not flush anything.
        "REFRESH MATERIALIZED VIEW CONCURRENTLY summary",
    ] {
        let got = w.everything_from(refresh).await;
        assert_eq!(got, vec![table("summary")], "{refresh}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_reports_the_whole_table() {
    let w = watch("CREATE TABLE t (id int); INSERT INTO t VALUES (1);").await;
    let got = w.everything_from("TRUNCATE t").await;
    assert_eq!(got, vec![table("t")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_reports_the_table_and_a_rename_reports_both_names() {
    let w = watch("CREATE TABLE t (id int)").await;
    w.expect("ALTER TABLE t ADD COLUMN v int", &[table("t")])
        .await;
    w.expect(
        "ALTER TABLE t RENAME TO renamed",
        &[table("t"), table("renamed")],
    )
    .await;
    w.exec("CREATE SCHEMA archive").await;
    let moved = w
        .expect(
            "ALTER TABLE renamed SET SCHEMA archive",
            &[table("renamed")],
        )
        .await;
    let archived = Change::Table(TableRef {
        schema: "archive".into(),
        name: "renamed".into(),
    });
    assert!(moved.contains(&archived), "{moved:?}");
    w.expect("DROP TABLE archive.renamed", &[archived]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_that_names_no_table_invalidates_the_whole_database() {
    let w = watch("CREATE TABLE t (id int)").await;
    w.expect("GRANT SELECT ON t TO PUBLIC", &[Change::Database])
        .await;
    w.expect(
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        &[Change::Database],
    )
    .await;
    // DDL that changes no result flushes nothing.
    let harmless = w
        .everything_from(
            "CREATE INDEX ON t (id); CREATE TABLE IF NOT EXISTS t (id int);
             CREATE SEQUENCE seq; CREATE SCHEMA empty;",
        )
        .await;
    assert_eq!(harmless, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_created_after_the_migration_get_the_trigger() {
    let w =
        watch("CREATE TABLE measurements (id int, region int) PARTITION BY LIST (region)").await;
    w.expect("CREATE TABLE later (id int)", &[table("later")])
        .await;
    w.expect("INSERT INTO later VALUES (1)", &[rows("later")])
        .await;
    w.expect("CREATE TABLE copied AS SELECT 1 AS id", &[table("copied")])
        .await;
    w.expect("UPDATE copied SET id = 2", &[rows("copied")])
        .await;
    w.expect("SELECT 1 AS id INTO selected", &[table("selected")])
        .await;
    w.expect("DELETE FROM selected", &[rows("selected")]).await;
    w.expect(
        "CREATE TABLE measurements_3 PARTITION OF measurements FOR VALUES IN (3)",
        &[table("measurements_3")],
    )
    .await;
    let direct = w
        .everything_from("INSERT INTO measurements_3 VALUES (1, 3)")
        .await;
    assert_eq!(direct, vec![rows("measurements_3")]);
    // Temporary tables are private to their session: no trigger, nothing reported.
    let temp = w
        .everything_from("CREATE TEMP TABLE scratch (id int); INSERT INTO scratch VALUES (1)")
        .await;
    assert_eq!(temp, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_writes_report_nothing() {
    let w = watch("CREATE TABLE t (id int); CREATE TABLE u (id int);").await;
    let got = w
        .everything_from(
            "BEGIN; INSERT INTO t VALUES (1); TRUNCATE u; ROLLBACK;
             BEGIN; INSERT INTO u VALUES (1); SAVEPOINT s; INSERT INTO t VALUES (2);
             ROLLBACK TO s; COMMIT;",
        )
        .await;
    assert_eq!(got, vec![rows("u")]);
}

/// Whether a raw payload's field `key` is the string `value` (payloads are JSON; how the
/// trigger spaces it is its own business).
/// Whether a payload's field `key` is `value`: a JSON payload's own field, or for the row
/// trigger's compact payload (`2 <op> <ts> <schema>.<table>`, migration 0006) the fields
/// the JSON one would have had. Compact names are compared as quote_ident prints them, so
/// a test that looks for a table by name uses names that need no quoting.
pub(crate) fn payload_has(payload: &str, key: &str, value: &str) -> bool {
    if let Some(compact) = payload.strip_prefix("2 ") {
        let mut fields = compact.splitn(3, ' ');
        let (Some(op), Some(_ts), Some(names)) = (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        let (schema, table) = names.split_once('.').unwrap_or(("", ""));
        let kind = if op == "TRUNCATE" { "table" } else { "rows" };
        return match key {
            "op" => op == value,
            "kind" => kind == value,
            "schema" => schema == value,
            "table" => table == value,
            _ => false,
        };
    }
    serde_json::from_str::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get(key).and_then(|f| f.as_str().map(|f| f == value)))
        .unwrap_or(false)
}

/// The raw payloads on the channel, from a LISTEN of the test's own.
pub(crate) async fn raw_listener(
    db: &str,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (client, mut conn) =
        tokio_postgres::connect(&shared_pg().url("postgres", "", db), tokio_postgres::NoTls)
            .await
            .expect("connecting the raw listener");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", notify::CHANNEL))
        .await
        .expect("LISTEN");
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_writes_to_a_table_in_one_transaction_send_one_notification_per_kind_of_write() {
    let w = watch("CREATE TABLE t (id int)").await;
    let (_raw, mut payloads) = raw_listener(&w.db).await;
    let sql = "BEGIN; INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);
               UPDATE t SET id = id + 1; DELETE FROM t WHERE id = 3; COMMIT;
               BEGIN; SAVEPOINT s; INSERT INTO t VALUES (1); ROLLBACK TO s;
               INSERT INTO t VALUES (2); COMMIT;
               INSERT INTO marker VALUES (1);";
    w.exec(sql).await;
    let mut about_t = Vec::new();
    loop {
        let payload = tokio::time::timeout(PATIENCE, payloads.recv())
            .await
            .expect("the marker's notification")
            .expect("the raw listener is running");
        if payload_has(&payload, "table", "marker") {
            break;
        }
        if payload_has(&payload, "table", "t") {
            about_t.push(payload);
        }
    }
    // One per transaction and kind of write: INSERT, UPDATE and DELETE in the first; in the
    // second, the savepoint rolled back took its INSERT's notification along, and the later
    // INSERT sent one again.
    let ops: Vec<&str> = about_t
        .iter()
        .map(|p| {
            ["INSERT", "UPDATE", "DELETE"]
                .into_iter()
                .find(|op| payload_has(p, "op", op))
                .unwrap_or("?")
        })
        .collect();
    assert_eq!(
        ops,
        ["INSERT", "UPDATE", "DELETE", "INSERT"],
        "{about_t:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_table_names_arrive_verbatim() {
    let w =
        watch(r#"CREATE SCHEMA "My ""Schema"""; CREATE TABLE "My ""Schema""".",x.y'z" (id int);"#)
            .await;
    let odd = TableRef {
        schema: r#"My "Schema""#.into(),
        name: ",x.y'z".into(),
    };
    w.expect(
        r#"INSERT INTO "My ""Schema""".",x.y'z" VALUES (1)"#,
        &[Change::Rows {
            table: odd,
            keys: None,
        }],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_and_writes_by_an_ordinary_role_are_reported() {
    let w = watch("").await;
    w.exec("GRANT CREATE ON SCHEMA public TO scramuser").await;
    let (user, conn) = tokio_postgres::connect(
        &shared_pg().url("scramuser", "scrampass", &w.db),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connecting as scramuser");
    tokio::spawn(conn);
    let mark = w.sink.mark();
    user.batch_execute("CREATE TABLE mine (id int); INSERT INTO mine VALUES (1);")
        .await
        .expect("an ordinary role's DDL and writes must keep working");
    w.sink
        .wait(mark, "the role's table and write", |seen| {
            let got = changes(seen);
            got.contains(&table("mine")) && got.contains(&rows("mine"))
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listener_reports_unhealthy_reconnects_and_delivers_again() {
    let w = watch("CREATE TABLE t (id int)").await;
    let mark = w.sink.mark();
    let killed = w
        .client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'pgstash-notify' AND datname = $1",
            &[&w.db],
        )
        .await
        .expect("terminating the listener");
    assert_eq!(killed.len(), 1, "exactly one listener connection");
    let seen = w
        .sink
        .wait(mark, "unhealthy, then healthy again", |seen| {
            let down = seen
                .iter()
                .position(|s| matches!(s, Seen::Health { healthy: false, .. }));
            down.is_some_and(|at| {
                seen[at..]
                    .iter()
                    .any(|s| matches!(s, Seen::Health { healthy: true, .. }))
            })
        })
        .await;
    assert!(
        matches!(seen.first(), Some(Seen::Health { healthy: false, .. })),
        "the first thing the sink hears is that it is not protected: {seen:?}"
    );
    w.expect("INSERT INTO t VALUES (1)", &[rows("t")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_triggers_makes_the_listener_unhealthy_until_they_are_back() {
    let mut w = watch("CREATE TABLE t (id int)").await;
    let mark = w.sink.mark();
    // 0006, 0005 and 0004 (the trigger's body), 0003 (the WAL messages and the switch)
    // and 0002 (the triggers).
    migrate::down(&mut w.client, 5).await.expect("down");
    let seen = w
        .sink
        .wait(mark, "unhealthy after down", |seen| {
            seen.iter()
                .any(|s| matches!(s, Seen::Health { healthy: false, .. }))
        })
        .await;
    assert!(changes(&seen).contains(&Change::Database));
    // Unhealthy at once; then the check says what to do.
    let reason = health(&w, mark, false, "pgstash migrate up").await;
    assert!(reason.contains("0002_notify_triggers"), "{reason}");

    let mark = w.sink.mark();
    migrate::up(&mut w.client).await.expect("up again");
    w.sink
        .wait(mark, "healthy after up", |seen| {
            seen.iter()
                .any(|s| matches!(s, Seen::Health { healthy: true, .. }))
        })
        .await;
    w.expect("INSERT INTO t VALUES (1)", &[rows("t")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_installed_refuses_a_database_without_the_migration() {
    let pg = shared_pg();
    let db = fresh_database(pg, "notify_check");
    let mut client = pg.client(&db).await;
    let err = notify::ensure_installed(&client, &db)
        .await
        .expect_err("nothing is installed yet");
    assert!(matches!(err, NotifyError::NotInstalled { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&db) && text.contains("pgstash migrate up"),
        "{text}"
    );
    let url = pg.url("postgres", "", &db);
    let at = notify::ensure_installed_at(&url, &db, PATIENCE)
        .await
        .expect_err("nothing is installed yet");
    assert!(matches!(at, NotifyError::NotInstalled { .. }), "{at:?}");
    migrate::up(&mut client).await.expect("up");
    notify::ensure_installed(&client, &db)
        .await
        .expect("installed after up");
    notify::ensure_installed_at(&url, &db, PATIENCE)
        .await
        .expect("installed after up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_stops_when_cancelled_and_says_so() {
    let pg = shared_pg();
    let db = fresh_database(pg, "notify_stop");
    let mut client = pg.client(&db).await;
    migrate::up(&mut client).await.expect("up");
    let sink = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(notify::run(
        pg.url("postgres", "", &db),
        db.clone(),
        sink.clone(),
        config(),
        stop.clone(),
    ));
    sink.wait(0, "healthy", |seen| {
        seen.iter()
            .any(|s| matches!(s, Seen::Health { healthy: true, .. }))
    })
    .await;
    stop.cancel();
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the listener stops promptly")
        .expect("task")
        .expect("a clean stop");
    assert!(
        matches!(
            sink.since(0).last(),
            Some(Seen::Health { healthy: false, .. })
        ),
        "a stopped listener no longer vouches for the database"
    );
    // Its connection is closed too (the backend may take a moment to notice).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'pgstash-notify' AND datname = $1",
                &[&db],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the listener's backend is still there"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_connection_string_is_an_error_naming_the_database() {
    let err = notify::run(
        "host=127.0.0.1 port=notaport".to_owned(),
        "appdb".to_owned(),
        Arc::new(Recorder::default()),
        config(),
        CancellationToken::new(),
    )
    .await
    .expect_err("a port must be a number");
    assert!(matches!(err, NotifyError::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("appdb"), "{err}");
}

/// Waits for a health report after `mark` that is `healthy` and whose reason contains
/// `part`; returns the reason.
async fn health(w: &Watched, mark: usize, healthy: bool, part: &str) -> String {
    let seen = w
        .sink
        .wait(mark, &format!("healthy = {healthy} about {part:?}"), |seen| {
            seen.iter().any(|s| matches!(s, Seen::Health { healthy: h, reason } if *h == healthy && reason.contains(part)))
        })
        .await;
    seen.iter()
        .find_map(|s| match s {
            Seen::Health { healthy: h, reason } if *h == healthy && reason.contains(part) => {
                Some(reason.clone())
            }
            _ => None,
        })
        .expect("found above")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_the_row_triggers_off_makes_the_listener_unhealthy_until_they_are_back() {
    let w = watch("CREATE TABLE t (id int)").await;
    let mark = w.sink.mark();
    w.exec("SELECT pgstash.set_row_triggers(false)").await;
    // At once (the switch says so), then with what to do about it.
    let reason = health(&w, mark, false, "set_row_triggers(true)").await;
    assert!(reason.contains(&w.db), "{reason}");
    // The periodic check agrees: still unhealthy several checks later.
    tokio::time::sleep(config().check_interval * 3).await;
    assert!(
        !w.sink
            .since(mark)
            .iter()
            .any(|s| matches!(s, Seen::Health { healthy: true, .. })),
        "healthy without row triggers: {:#?}",
        w.sink.since(mark)
    );
    let mark = w.sink.mark();
    w.exec("SELECT pgstash.set_row_triggers(true)").await;
    health(&w, mark, true, "").await;
    w.expect("INSERT INTO t VALUES (1)", &[rows("t")]).await;

    // One table's trigger dropped by hand: unhealthy at once, naming the table.
    let mark = w.sink.mark();
    w.exec("DROP TRIGGER pgstash_notify ON t").await;
    health(&w, mark, false, "public.t").await;
    let mark = w.sink.mark();
    w.exec("SELECT pgstash.set_row_triggers(true)").await;
    health(&w, mark, true, "").await;
    w.expect("INSERT INTO t VALUES (2)", &[rows("t")]).await;
}
