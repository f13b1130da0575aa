//! `pgstash migrate`: the runner against real, fresh databases, and what the migrations
//! install (the row triggers' switch of 0003).

use crate::fixture::fresh_database;
use crate::notify::payload_has;
use crate::support::shared_pg;
use pgstash::invalidation::installed::Missing;
use pgstash::invalidation::notify::{self, NotifyError};
use pgstash::migrate::{self, MIGRATIONS, MigrateError, MigrationState};
use tokio_postgres::Client;

/// A fresh database holding one table from before pgstash, and a superuser client to it.
async fn fresh(prefix: &str) -> (String, Client) {
    let pg = shared_pg();
    let db = fresh_database(pg, prefix);
    pg.psql_db(&db, "CREATE TABLE existing (id int PRIMARY KEY, v int)");
    let client = pg.client(&db).await;
    (db, client)
}

fn versions(ms: &[&migrate::Migration]) -> Vec<i32> {
    ms.iter().map(|m| m.version).collect()
}

fn all_versions() -> Vec<i32> {
    MIGRATIONS.iter().map(|m| m.version).collect()
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", pgstash::pg_error::describe(&e)))
        .get(0)
}

async fn notify_triggers(c: &Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'pgstash_notify' AND tgrelid = 'existing'::regclass",
    )
    .await
}

async fn event_triggers(c: &Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgstash\\_%'",
    )
    .await
}

async fn pgstash_schema_exists(c: &Client) -> bool {
    count(
        c,
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgstash'",
    )
    .await
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_applies_every_migration_once_and_status_reports_them_applied() {
    let (_db, mut c) = fresh("migrate_up").await;
    let before = migrate::status(&c).await.expect("status before up");
    assert!(
        before.iter().all(|s| s.state == MigrationState::Pending),
        "{before:?}"
    );
    assert_eq!(
        before.iter().map(|s| s.version).collect::<Vec<_>>(),
        all_versions()
    );
    assert!(
        !pgstash_schema_exists(&c).await,
        "status must not create anything"
    );

    let applied = migrate::up(&mut c).await.expect("first up");
    assert_eq!(versions(&applied), all_versions());
    let rows = c
        .query(
            "SELECT version, name, checksum FROM pgstash.schema_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("reading the bookkeeping");
    let recorded: Vec<(i32, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected: Vec<(i32, String, String)> = MIGRATIONS
        .iter()
        .map(|m| (m.version, m.name.to_owned(), m.checksum()))
        .collect();
    assert_eq!(recorded, expected);
    let after = migrate::status(&c).await.expect("status after up");
    assert!(
        after
            .iter()
            .all(|s| matches!(s.state, MigrationState::Applied { .. })),
        "{after:?}"
    );
    assert_eq!(
        notify_triggers(&c).await,
        1,
        "existing tables get the trigger"
    );
    assert_eq!(event_triggers(&c).await, 2);

    let again = migrate::up(&mut c).await.expect("second up");
    assert!(again.is_empty(), "nothing is pending: {again:?}");
    assert!(migrate::is_applied(&c, 2).await.expect("is_applied"));
}

/// The body of the row triggers' function.
async fn notify_change_source(c: &Client) -> String {
    c.query_one(
        "SELECT prosrc FROM pg_proc WHERE oid = 'pgstash.notify_change()'::regprocedure",
        &[],
    )
    .await
    .expect("pgstash.notify_change exists")
    .get(0)
}

async fn pending(c: &Client) -> Vec<(i32, bool)> {
    migrate::status(c)
        .await
        .expect("status")
        .iter()
        .map(|s| (s.version, s.state == MigrationState::Pending))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_reverts_the_newest_migrations_and_up_reapplies_them() {
    let (_db, mut c) = fresh("migrate_down").await;
    migrate::up(&mut c).await.expect("up");

    // 0006 first: the row trigger sends 0005's JSON payload again.
    assert!(
        notify_change_source(&c).await.contains("quote_ident"),
        "0006 sends the compact payload"
    );
    let reverted = migrate::down(&mut c, 1).await.expect("down 1");
    assert_eq!(versions(&reverted), vec![6]);
    assert!(
        notify_change_source(&c)
            .await
            .contains("to_json(TG_TABLE_NAME)"),
        "down restores 0005's trigger function"
    );
    // Then 0005: the payload is built with json_build_object again, as 0004 had it.
    assert!(
        !notify_change_source(&c).await.contains("json_build_object"),
        "0005 builds the payload by concatenation"
    );
    let reverted = migrate::down(&mut c, 1).await.expect("down 1");
    assert_eq!(versions(&reverted), vec![5]);
    assert!(
        notify_change_source(&c).await.contains("json_build_object"),
        "down restores 0004's trigger function"
    );
    // Then 0004: the row trigger's function is 0002's again.
    assert!(
        !notify_change_source(&c).await.contains("pgstash.notified"),
        "0004 replaced 0002's bookkeeping"
    );
    let reverted = migrate::down(&mut c, 1).await.expect("down 1");
    assert_eq!(versions(&reverted), vec![4]);
    assert!(
        notify_change_source(&c).await.contains("pgstash.notified"),
        "down restores 0002's trigger function"
    );
    // Then 0003: the row triggers and the DDL hooks stay, the switch goes.
    c.batch_execute("SELECT pgstash.set_row_triggers(false)")
        .await
        .expect("row triggers off");
    assert_eq!(notify_triggers(&c).await, 0);
    let reverted = migrate::down(&mut c, 1).await.expect("down 1");
    assert_eq!(versions(&reverted), vec![3]);
    assert_eq!(
        pending(&c).await,
        vec![
            (1, false),
            (2, false),
            (3, true),
            (4, true),
            (5, true),
            (6, true)
        ]
    );
    assert_eq!(
        notify_triggers(&c).await,
        1,
        "0002 alone cannot switch them off: they are back"
    );
    assert_eq!(event_triggers(&c).await, 2);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgstash'::regnamespace
               AND proname IN ('set_row_triggers', 'payload', 'send_unwatched')"
        )
        .await
            + count(
                &c,
                "SELECT count(*) FROM pg_class WHERE relname = 'options'"
            )
            .await,
        0,
        "down removes what 0003 added"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_proc WHERE oid = 'pgstash.send(text, text, text, text)'::regprocedure
               AND prolang = (SELECT oid FROM pg_language WHERE lanname = 'sql')"
        )
        .await,
        1,
        "and restores what it replaced"
    );
    let reapplied = migrate::up(&mut c).await.expect("up 0003 again");
    assert_eq!(versions(&reapplied), vec![3, 4, 5, 6]);
    assert!(!notify_change_source(&c).await.contains("pgstash.notified"));
    assert!(!notify_change_source(&c).await.contains("json_build_object"));

    let reverted = migrate::down(&mut c, 5).await.expect("down 5");
    assert_eq!(versions(&reverted), vec![6, 5, 4, 3, 2]);
    assert_eq!(
        pending(&c).await,
        vec![
            (1, false),
            (2, true),
            (3, true),
            (4, true),
            (5, true),
            (6, true)
        ]
    );
    assert_eq!(
        notify_triggers(&c).await,
        0,
        "down removes the table triggers"
    );
    assert_eq!(
        event_triggers(&c).await,
        0,
        "down removes the event triggers"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgstash'::regnamespace"
        )
        .await,
        0,
        "down removes the functions"
    );

    let reapplied = migrate::up(&mut c).await.expect("up again");
    assert_eq!(versions(&reapplied), vec![2, 3, 4, 5, 6]);
    assert_eq!(notify_triggers(&c).await, 1);

    let all = migrate::down(&mut c, 10).await.expect("down everything");
    assert_eq!(versions(&all), vec![6, 5, 4, 3, 2, 1], "newest first");
    assert!(
        !pgstash_schema_exists(&c).await,
        "reverting 0001 leaves nothing of pgstash"
    );
    let none = migrate::down(&mut c, 1).await.expect("down on nothing");
    assert!(none.is_empty());

    let fresh_again = migrate::up(&mut c).await.expect("up from nothing");
    assert_eq!(versions(&fresh_again), all_versions());
    assert_eq!(notify_triggers(&c).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_migration_edited_afterwards_makes_up_and_down_refuse() {
    let (_db, mut c) = fresh("migrate_tamper").await;
    migrate::up(&mut c).await.expect("up");
    c.execute(
        "UPDATE pgstash.schema_migrations SET checksum = 'tampered' WHERE version = 1",
        &[],
    )
    .await
    .expect("tampering with the record");

    let embedded = MIGRATIONS[0].checksum();
    for (what, result) in [
        ("up", migrate::up(&mut c).await),
        ("down", migrate::down(&mut c, 1).await),
    ] {
        let err = result.expect_err(&format!("{what} must refuse"));
        match &err {
            MigrateError::ChecksumMismatch {
                version,
                name,
                recorded,
                embedded: e,
            } => {
                assert_eq!((*version, name.as_str()), (1, "schema"));
                assert_eq!(recorded, "tampered");
                assert_eq!(e, &embedded);
            }
            other => panic!("{what}: expected ChecksumMismatch, got {other:?}"),
        }
        let text = err.to_string();
        for part in ["0001_schema", "tampered", embedded.as_str()] {
            assert!(text.contains(part), "{what}: {text:?} should name {part}");
        }
    }
    // Refusing means doing nothing: 0002 is still applied.
    assert_eq!(notify_triggers(&c).await, 1);
    let status = migrate::status(&c).await.expect("status");
    assert!(
        matches!(&status[0].state, MigrationState::Edited { recorded, .. } if recorded == "tampered"),
        "{status:?}"
    );
    assert!(matches!(status[1].state, MigrationState::Applied { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_apply_each_migration_exactly_once() {
    let pg = shared_pg();
    let db = fresh_database(pg, "migrate_race");
    pg.psql_db(&db, "CREATE TABLE existing (id int PRIMARY KEY, v int)");
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut c = pg.client(&db).await;
                migrate::up(&mut c)
                    .await
                    .map(|applied| versions(&applied))
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut applied = Vec::new();
    for run in runs {
        applied.extend(run.await.expect("task").expect("every run succeeds"));
    }
    applied.sort();
    assert_eq!(
        applied,
        all_versions(),
        "each migration applied by exactly one run"
    );
    let c = pg.client(&db).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM pgstash.schema_migrations").await,
        MIGRATIONS.len() as i64
    );
    assert_eq!(notify_triggers(&c).await, 1);
    assert_eq!(event_triggers(&c).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_migration_is_rolled_back_alone_and_releases_the_lock() {
    let pg = shared_pg();
    let (db, mut c) = fresh("migrate_fail").await;
    // Something in the way of 0002, created by hand.
    pg.psql_db(
        &db,
        "CREATE SCHEMA pgstash; CREATE TABLE pgstash.relation_names (x int)",
    );
    let err = migrate::up(&mut c).await.expect_err("0002 must fail");
    assert!(
        matches!(&err, MigrateError::Apply { migration, .. } if migration.version == 2),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("0002_notify_triggers") && text.contains("already exists"),
        "the error names the migration and what Postgres said: {text}"
    );
    assert_eq!(
        pending(&c).await,
        vec![
            (1, false),
            (2, true),
            (3, true),
            (4, true),
            (5, true),
            (6, true)
        ],
        "0001 stays applied, the later ones pending"
    );
    assert_eq!(notify_triggers(&c).await, 0, "nothing of 0002 is left");

    pg.psql_db(&db, "DROP TABLE pgstash.relation_names");
    // Another session: it would wait forever if the failed run had kept the lock.
    let mut other = pg.client(&db).await;
    let applied = tokio::time::timeout(std::time::Duration::from_secs(30), migrate::up(&mut other))
        .await
        .expect("the lock was released")
        .expect("up after the obstacle is gone");
    assert_eq!(versions(&applied), vec![2, 3, 4, 5, 6]);
}

async fn all_notify_triggers(c: &Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'pgstash_notify' AND tgenabled = 'O'",
    )
    .await
}

async fn set_row_triggers(c: &Client, on: bool) -> i32 {
    c.query_one("SELECT pgstash.set_row_triggers($1)", &[&on])
        .await
        .unwrap_or_else(|e| {
            panic!(
                "set_row_triggers({on}): {}",
                pgstash::pg_error::describe(&e)
            )
        })
        .get(0)
}

/// Payloads heard on the channel up to and including the first whose field `last.0` is
/// `last.1`.
async fn payloads_until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    last: (&str, &str),
) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let payload = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no payload with {last:?}; heard {seen:#?}"))
            .expect("the raw listener is running");
        let done = payload_has(&payload, last.0, last.1);
        seen.push(payload);
        if done {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_triggers_switch_off_and_back_on() {
    let (db, mut c) = fresh("migrate_rows").await;
    migrate::up(&mut c).await.expect("up");
    let (_raw, mut payloads) = crate::notify::raw_listener(&db).await;
    let choice = async |c: &Client| -> bool {
        c.query_one("SELECT row_triggers FROM pgstash.options", &[])
            .await
            .expect("pgstash.options")
            .get(0)
    };
    assert!(choice(&c).await, "on by default");

    assert_eq!(set_row_triggers(&c, false).await, 1, "one table had one");
    assert_eq!(all_notify_triggers(&c).await, 0);
    assert!(!choice(&c).await);
    // A NOTIFY listener hears at once that it can no longer vouch for the database.
    payloads_until(&mut payloads, ("kind", "uninstalled")).await;
    // Writes send nothing now, and a table created later gets no trigger (its DDL is
    // still reported, in commit order after the write).
    c.batch_execute("INSERT INTO existing VALUES (1, 1); CREATE TABLE later (id int);")
        .await
        .expect("write and create");
    let heard = payloads_until(&mut payloads, ("table", "later")).await;
    assert!(
        !heard.iter().any(|p| payload_has(p, "kind", "rows")),
        "{heard:#?}"
    );
    payloads_until(&mut payloads, ("kind", "uninstalled")).await;
    assert_eq!(all_notify_triggers(&c).await, 0);
    // So the NOTIFY source refuses the database, and says how to switch them back on.
    let err = notify::ensure_installed(&c, &db)
        .await
        .expect_err("row triggers are off");
    assert!(
        matches!(
            &err,
            NotifyError::NotInstalled {
                missing: Missing::RowTriggers { tables: 2, .. },
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&db) && text.contains("SELECT pgstash.set_row_triggers(true)"),
        "{text}"
    );

    // Back on: every table has its trigger, the one created meanwhile too.
    assert_eq!(set_row_triggers(&c, true).await, 2);
    assert!(choice(&c).await);
    assert_eq!(all_notify_triggers(&c).await, 2);
    notify::ensure_installed(&c, &db)
        .await
        .expect("installed again");
    c.batch_execute("INSERT INTO later VALUES (1)")
        .await
        .expect("write");
    let heard = payloads_until(&mut payloads, ("table", "later")).await;
    assert!(
        heard.last().is_some_and(|p| payload_has(p, "kind", "rows")),
        "{heard:#?}"
    );

    // A disabled trigger counts as missing; switching on enables it again.
    c.batch_execute("ALTER TABLE existing DISABLE TRIGGER pgstash_notify")
        .await
        .expect("disable");
    let err = notify::ensure_installed(&c, &db)
        .await
        .expect_err("one trigger is disabled");
    assert!(
        matches!(
            &err,
            NotifyError::NotInstalled {
                missing: Missing::RowTriggers { tables: 1, example },
                ..
            } if example == "public.existing"
        ),
        "{err:?}"
    );
    assert_eq!(set_row_triggers(&c, true).await, 1);
    notify::ensure_installed(&c, &db)
        .await
        .expect("enabled again");

    // Off, then 0006, 0005, 0004 and 0003 reverted: 0002 has no switch, so every table
    // gets its trigger back.
    set_row_triggers(&c, false).await;
    migrate::down(&mut c, 4)
        .await
        .expect("down 0006, 0005, 0004 and 0003");
    assert_eq!(all_notify_triggers(&c).await, 2);
    notify::ensure_installed(&c, &db)
        .await
        .expect("installed after down");
}
