//! tokio-postgres through pgstash: binary values, prepared statements, transactions,
//! LISTEN/NOTIFY, settings and pinning across pooled connections.

use crate::fixture::Proxy;
use crate::support::shared_pg;
use futures_util::StreamExt;
use pgstash::config::PoolMode;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_values_roundtrip_unchanged() {
    let proxy = Proxy::start(shared_pg(), |_| {});
    let c = proxy.connect("postgres", "", "postgres").await;
    let id = uuid::Uuid::new_v4();
    let doc = serde_json::json!({"a": [1, 2, {"b": null}], "c": "ü"});
    let ts = chrono::DateTime::parse_from_rfc3339("2024-02-29T12:34:56.789012+02:00")
        .expect("ts")
        .with_timezone(&chrono::Utc);
    let bytes: Vec<u8> = (0..=255).collect();
    let ints = vec![Some(1i32), None, Some(-7)];
    let row = c
        .query_one(
            "SELECT $1::uuid, $2::jsonb, $3::timestamptz, $4::bytea, $5::int4[], \
             '12345678901234567890.000000001'::numeric::text, '1 year 2 mons 3 days 04:05:06.7'::interval::text",
            &[&id, &doc, &ts, &bytes, &ints],
        )
        .await
        .expect("query");
    assert_eq!(row.get::<_, uuid::Uuid>(0), id);
    assert_eq!(row.get::<_, serde_json::Value>(1), doc);
    assert_eq!(row.get::<_, chrono::DateTime<chrono::Utc>>(2), ts);
    assert_eq!(row.get::<_, Vec<u8>>(3), bytes);
    assert_eq!(row.get::<_, Vec<Option<i32>>>(4), ints);
    assert_eq!(row.get::<_, String>(5), "12345678901234567890.000000001");
    assert_eq!(row.get::<_, String>(6), "1 year 2 mons 3 days 04:05:06.7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_reused_across_pooled_connections() {
    // Pool of 2 shared by 6 clients: each client's statements s0, s1... must keep working
    // on whatever server connection it gets, and never clash with another client's s0.
    let proxy = Proxy::start(shared_pg(), |c| c.pool.max_size = 2);
    let mut tasks = Vec::new();
    for k in 0..6i32 {
        let client = proxy.connect("postgres", "", "postgres").await;
        tasks.push(tokio::spawn(async move {
            let add = client
                .prepare(&format!("SELECT $1::int + {k}"))
                .await
                .expect("prepare");
            let mul = client.prepare("SELECT $1::int * 2").await.expect("prepare");
            for i in 0..200i32 {
                let a: i32 = client.query_one(&add, &[&i]).await.expect("add").get(0);
                assert_eq!(a, i + k);
                let m: i32 = client.query_one(&mul, &[&i]).await.expect("mul").get(0);
                assert_eq!(m, i * 2);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transaction_leaves_nothing_and_commit_keeps_rows() {
    let pg = shared_pg();
    let db = crate::fixture::fresh_database(pg, "txs");
    pg.psql_db(&db, "CREATE TABLE t (id int primary key)");
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 1);
    let mut a = proxy.connect("postgres", "", &db).await;
    let b = proxy.connect("postgres", "", &db).await;
    let tx = a.transaction().await.expect("begin");
    tx.execute("INSERT INTO t VALUES (1)", &[])
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");
    let tx = a.transaction().await.expect("begin");
    tx.execute("INSERT INTO t VALUES (2)", &[])
        .await
        .expect("insert");
    let err = tx
        .execute("INSERT INTO t VALUES (2)", &[])
        .await
        .expect_err("duplicate");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    drop(tx); // rolls back
    a.execute("INSERT INTO t VALUES (3)", &[])
        .await
        .expect("autocommit insert");
    let ids: Vec<i32> = b
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_receives_notify_from_another_client() {
    let proxy = Proxy::start(shared_pg(), |c| c.pool.max_size = 2);
    let (listener, mut conn) = tokio_postgres::connect(
        &proxy.url("postgres", "", "postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener
        .batch_execute("LISTEN pgstash_test")
        .await
        .expect("listen");
    let other = proxy.connect("postgres", "", "postgres").await;
    // Other clients' traffic must not take the listener's server connection away.
    for _ in 0..20 {
        other.simple_query("SELECT 1").await.expect("select");
    }
    other
        .batch_execute("NOTIFY pgstash_test, 'hello'")
        .await
        .expect("notify");
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("notification within 10s")
        .expect("channel open");
    assert_eq!(got, ("pgstash_test".to_string(), "hello".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_the_client_across_server_connections() {
    let proxy = Proxy::start(shared_pg(), |c| c.pool.max_size = 2);
    let a = proxy.connect("postgres", "", "postgres").await;
    let b = proxy.connect("postgres", "", "postgres").await;
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'; SET application_name = 'client_a'")
        .await
        .expect("set");
    b.batch_execute("SET TimeZone = 'America/New_York'")
        .await
        .expect("set");
    let efd_before = first_value(
        &a.simple_query("SHOW extra_float_digits")
            .await
            .expect("show"),
    );
    a.batch_execute("BEGIN; SET extra_float_digits = -3; ROLLBACK")
        .await
        .expect("rolled back set");
    for _ in 0..30 {
        let ra = a.simple_query("SHOW TimeZone").await.expect("show");
        let rb = b.simple_query("SHOW TimeZone").await.expect("show");
        assert_eq!(first_value(&ra), "Asia/Tokyo");
        assert_eq!(first_value(&rb), "America/New_York");
        let app = a.simple_query("SHOW application_name").await.expect("show");
        assert_eq!(first_value(&app), "client_a");
        let efd = a
            .simple_query("SHOW extra_float_digits")
            .await
            .expect("show");
        assert_eq!(
            first_value(&efd),
            efd_before,
            "a rolled-back SET must not stick"
        );
    }
    a.batch_execute("RESET TimeZone").await.expect("reset");
    let b_tz = first_value(&b.simple_query("SHOW TimeZone").await.expect("show"));
    assert_eq!(b_tz, "America/New_York");
    let a_tz = first_value(&a.simple_query("SHOW TimeZone").await.expect("show"));
    assert_ne!(a_tz, "Asia/Tokyo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_table_pins_the_client_to_its_server_connection() {
    let proxy = Proxy::start(shared_pg(), |c| c.pool.max_size = 3);
    let a = proxy.connect("postgres", "", "postgres").await;
    a.batch_execute("CREATE TEMP TABLE mine (v int); INSERT INTO mine VALUES (42)")
        .await
        .expect("temp table");
    let others: Vec<_> =
        futures_util::future::join_all((0..2).map(|_| proxy.connect("postgres", "", "postgres")))
            .await;
    for _ in 0..20 {
        for o in &others {
            o.simple_query("SELECT 1").await.expect("other");
        }
        let v: i32 = a
            .query_one("SELECT v FROM mine", &[])
            .await
            .expect("still mine")
            .get(0);
        assert_eq!(v, 42);
    }
    let a_pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    for o in &others {
        let p: i32 = o
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        assert_ne!(p, a_pid, "a pinned connection must not serve other clients");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_callers_query_and_not_another_clients() {
    let proxy = Proxy::start(shared_pg(), |c| c.pool.max_size = 4);
    let victim = proxy.connect("postgres", "", "postgres").await;
    let bystander = proxy.connect("postgres", "", "postgres").await;
    let token = victim.cancel_token();
    let slow = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(30)").await });
    let calm =
        tokio::spawn(async move { bystander.simple_query("SELECT pg_sleep(2), 'ok'").await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let err = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("cancel took effect")
        .expect("task")
        .expect_err("cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    let ok = calm
        .await
        .expect("task")
        .expect("bystander's query must finish");
    assert_eq!(first_value_at(&ok, 1), "ok");
}

fn first_value(msgs: &[tokio_postgres::SimpleQueryMessage]) -> String {
    first_value_at(msgs, 0)
}

fn first_value_at(msgs: &[tokio_postgres::SimpleQueryMessage], col: usize) -> String {
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(col).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_execute_deallocate_work_while_others_share_the_pool() {
    let proxy = Proxy::start(shared_pg(), |c| c.pool.max_size = 2);
    let a = proxy.connect("postgres", "", "postgres").await;
    let b = proxy.connect("postgres", "", "postgres").await;
    a.batch_execute("PREPARE twice(int) AS SELECT $1 * 2")
        .await
        .expect("prepare");
    for i in 0..20 {
        b.simple_query("SELECT 1").await.expect("other client");
        let got = first_value(
            &a.simple_query(&format!("EXECUTE twice({i})"))
                .await
                .expect("execute"),
        );
        assert_eq!(got, (i * 2).to_string());
    }
    a.batch_execute("DEALLOCATE twice")
        .await
        .expect("deallocate");
    let err = a
        .simple_query("EXECUTE twice(1)")
        .await
        .expect_err("deallocated");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_PSTATEMENT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_query_and_unknown_statement_behave_like_postgres() {
    let proxy = Proxy::start(shared_pg(), |_| {});
    let c = proxy.connect("postgres", "", "postgres").await;
    let msgs = c
        .simple_query("")
        .await
        .expect("empty query is not an error");
    assert!(
        msgs.iter()
            .all(|m| !matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
    );
    let msgs = c.simple_query(";;").await.expect("only semicolons");
    assert!(
        msgs.iter()
            .all(|m| !matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
    );
    let err = c
        .query("SELECT * FROM no_such_table_here", &[])
        .await
        .expect_err("missing table");
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.code(), &tokio_postgres::error::SqlState::UNDEFINED_TABLE);
    assert!(
        db.position().is_some(),
        "all fields relayed, including the position"
    );
    // The connection is usable after the failed extended-protocol batch.
    let v: i32 = c
        .query_one("SELECT 5", &[])
        .await
        .expect("after error")
        .get(0);
    assert_eq!(v, 5);
}

/// Shared statements prepared on the one server connection right now.
async fn server_statements(c: &tokio_postgres::Client) -> i64 {
    let msgs = c
        .simple_query("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgstash\\_%'")
        .await
        .expect("count statements");
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().expect("int")),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connection_keeps_at_most_max_prepared_statements() {
    for mode in [PoolMode::Transaction, PoolMode::Session] {
        let proxy = Proxy::start(shared_pg(), |c| {
            c.pool.max_size = 1;
            c.pool.mode = mode;
            c.pool.max_prepared_statements = 3;
        });
        let c = proxy.connect("postgres", "", "postgres").await;
        let mut stmts = Vec::new();
        for k in 0..10i32 {
            let s = c
                .prepare(&format!("SELECT $1::int + {k}"))
                .await
                .expect("prepare");
            let v: i32 = c.query_one(&s, &[&1]).await.expect("run").get(0);
            assert_eq!(v, 1 + k);
            stmts.push(s);
        }
        let held = server_statements(&c).await;
        assert!(held <= 3, "{mode:?}: {held} statements on the server");
        // Evicted statements are prepared again when used, under the client's same names.
        for (k, s) in stmts.iter().enumerate() {
            let v: i32 = c.query_one(s, &[&2]).await.expect("rerun").get(0);
            assert_eq!(v, 2 + k as i32);
        }
        let held = server_statements(&c).await;
        assert!(held <= 3, "{mode:?}: {held} statements on the server");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_eviction_never_closes_an_open_portal() {
    let proxy = Proxy::start(shared_pg(), |c| {
        c.pool.max_size = 1;
        c.pool.max_prepared_statements = 2;
    });
    let mut c = proxy.connect("postgres", "", "postgres").await;
    let series = c
        .prepare("SELECT g FROM generate_series(1, 10) g")
        .await
        .expect("prepare");
    let tx = c.transaction().await.expect("begin");
    let portal = tx.bind(&series, &[]).await.expect("bind");
    let first: Vec<i32> = tx
        .query_portal(&portal, 3)
        .await
        .expect("first rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(first, vec![1, 2, 3]);
    // Past the cap while the portal is open.
    for k in 0..6i32 {
        let s = tx
            .prepare(&format!("SELECT $1::int * {k}"))
            .await
            .expect("prepare");
        let v: i32 = tx.query_one(&s, &[&3]).await.expect("run").get(0);
        assert_eq!(v, 3 * k);
    }
    let rest: Vec<i32> = tx
        .query_portal(&portal, 0)
        .await
        .expect("the portal is still open")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rest, (4..=10).collect::<Vec<_>>());
    tx.commit().await.expect("commit");
    let held = server_statements(&c).await;
    assert!(
        held <= 2,
        "{held} statements on the server after the transaction"
    );
}
