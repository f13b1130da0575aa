//! The front door: configuration checks, listeners, limits and the startup handshake.

use crate::fixture::{Proxy, run};
use crate::support::shared_pg;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

#[test]
fn check_config_accepts_the_shipped_file_and_names_a_bad_key() {
    let bin = env!("CARGO_BIN_EXE_pgstash");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let out = run(Command::new(bin).args(["--config", shipped, "check-config"]));
    assert!(out.contains("configuration OK"), "{out}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[pool]\nmax_size = \"lots\"\n").expect("write");
    let out = Command::new(bin)
        .args(["--config", bad.to_str().expect("utf8"), "check-config"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("max_size"), "{err}");

    let out = Command::new(bin)
        .arg("check-config")
        .env("PGSTASH_POOL__MODE", "sometimes")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.to_lowercase().contains("pool.mode"), "{err}");
}

#[test]
fn unix_socket_serves_psql() {
    let pg = shared_pg();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_dir = dir.path().to_path_buf();
    let proxy = Proxy::start(pg, |c| c.server.unix_socket_dir = Some(sock_dir));
    let out = run(Command::new(pg.bin("psql")).args([
        "-X",
        "-At",
        "-h",
        dir.path().to_str().expect("utf8"),
        "-p",
        &proxy.port().to_string(),
        "-U",
        "postgres",
        "-c",
        "SELECT 'via unix socket'",
    ]));
    assert_eq!(out.trim(), "via unix socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_with_53300() {
    let proxy = Proxy::start(shared_pg(), |c| c.server.max_client_connections = 2);
    let _a = proxy.connect("postgres", "", "postgres").await;
    let _b = proxy.connect("postgres", "", "postgres").await;
    let Err(err) = proxy.try_connect("postgres", "", "postgres").await else {
        panic!("a third client must be refused");
    };
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS)
    );
    drop(_a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.connect("postgres", "", "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_answers_with_an_error_instead_of_hanging() {
    let proxy = Proxy::start(shared_pg(), |c| {
        c.pool.max_size = 1;
        c.pool.checkout_timeout = Duration::from_millis(300);
    });
    let holder = proxy.connect("postgres", "", "postgres").await;
    let waiter = proxy.connect("postgres", "", "postgres").await;
    holder.batch_execute("BEGIN").await.expect("begin");
    let err = waiter
        .simple_query("SELECT 1")
        .await
        .expect_err("pool exhausted");
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a dropped connection");
    assert!(db.message().contains("checkout_timeout"), "{db:?}");
    // The waiter's session is still usable once the holder lets go.
    holder.batch_execute("COMMIT").await.expect("commit");
    waiter
        .simple_query("SELECT 1")
        .await
        .expect("after release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_transaction_leaves_a_clean_connection() {
    let pg = shared_pg();
    let db = crate::fixture::fresh_database(pg, "vanish");
    pg.psql_db(&db, "CREATE TABLE t (id int)");
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 1);
    {
        let a = proxy.connect("postgres", "", &db).await;
        a.batch_execute("BEGIN; INSERT INTO t VALUES (1); SET LOCAL statement_timeout = 1")
            .await
            .expect("open transaction");
    } // dropped mid-transaction
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = proxy.connect("postgres", "", &db).await;
    let n: i64 = b
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "the vanished client's insert must be rolled back");
    let rows = b.simple_query("SELECT pg_sleep(0.01), 1").await;
    assert!(rows.is_ok(), "no leftover SET LOCAL: {rows:?}");
}

#[test]
fn newer_protocol_minor_gets_negotiate_protocol_version() {
    let proxy = Proxy::start(shared_pg(), |_| {});
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let params = b"user\0postgres\0database\0postgres\0_pq_.future\0x\0\0";
    let mut p = ((params.len() + 8) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&0x0003_0002i32.to_be_bytes());
    p.extend_from_slice(params);
    s.write_all(&p).expect("startup");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got[0], b'v', "NegotiateProtocolVersion first: {got:?}");
    assert_eq!(&got[5..9], &0x0003_0000i32.to_be_bytes());
    assert!(got.windows(11).any(|w| w == b"_pq_.future"));
}

#[test]
fn ssl_request_is_declined_and_the_session_continues() {
    let proxy = Proxy::start(shared_pg(), |_| {});
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f])
        .expect("ssl request");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("answer");
    assert_eq!(&b, b"N");
}
