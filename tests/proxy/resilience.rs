//! Failures around the proxy: Postgres restarts, hostile or broken clients. Each must stay
//! that one client's problem.

use crate::fixture::Proxy;
use crate::support::{PgCluster, shared_pg};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_succeed_again_after_postgres_restarts() {
    let pg = PgCluster::start();
    let proxy = Proxy::start(&pg, |c| c.pool.max_size = 3);
    let client = proxy.connect("postgres", "", "postgres").await;
    for _ in 0..5 {
        client
            .simple_query("SELECT 1")
            .await
            .expect("before restart");
    }
    tokio::task::block_in_place(|| pg.restart());
    // The client never held a server connection between queries (transaction mode), so its
    // next query gets a fresh one; the pool must notice its idle connections died.
    let v: i32 = client
        .query_one("SELECT 41 + 1", &[])
        .await
        .expect("first query after the restart")
        .get(0);
    assert_eq!(v, 42);
    let fresh = proxy.connect("postgres", "", "postgres").await;
    fresh
        .simple_query("SELECT 1")
        .await
        .expect("new client after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_messages_hurt_only_their_sender() {
    let proxy = Proxy::start(shared_pg(), |c| c.server.max_message_size = 64 * 1024);
    let healthy = proxy.connect("postgres", "", "postgres").await;
    let addr = proxy.addr;
    let hostile = tokio::task::spawn_blocking(move || {
        // Pure garbage instead of a startup packet.
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8])
            .expect("write");
        assert_closed(&mut s);
        // A startup length that lies about its size.
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(&i32::MAX.to_be_bytes()).expect("write");
        assert_closed(&mut s);
        // A valid login, then a message above the configured maximum.
        let mut s = login(addr);
        let mut huge = vec![b'Q'];
        huge.extend_from_slice(&(10_000_000i32).to_be_bytes());
        s.write_all(&huge).expect("write");
        let reply = read_all(&mut s);
        assert!(
            reply.windows(5).any(|w| w == b"08P01"),
            "expected a protocol error, got {reply:?}"
        );
        // A valid login, then a length field below the minimum.
        let mut s = login(addr);
        s.write_all(&[b'Q', 0, 0, 0, 1]).expect("write");
        let reply = read_all(&mut s);
        assert!(
            reply.windows(5).any(|w| w == b"08P01"),
            "expected a protocol error, got {reply:?}"
        );
        // An unknown message type.
        let mut s = login(addr);
        s.write_all(&[b'~', 0, 0, 0, 4]).expect("write");
        let reply = read_all(&mut s);
        assert!(
            reply.windows(5).any(|w| w == b"08P01"),
            "expected a protocol error, got {reply:?}"
        );
        // A client that vanishes in the middle of a query and of a COPY.
        let mut s = login(addr);
        s.write_all(&query("SELECT pg_sleep(0.5)")).expect("write");
        drop(s);
        let mut s = login(addr);
        s.write_all(&query("COPY (SELECT 1) TO STDOUT"))
            .expect("write");
        drop(s);
        let mut s = login(addr);
        s.write_all(&query("CREATE TEMP TABLE x (a int); COPY x FROM STDIN"))
            .expect("write");
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
    });
    for i in 0..50 {
        let v: i64 = healthy
            .query_one("SELECT $1::int8", &[&i])
            .await
            .expect("healthy client keeps working")
            .get(0);
        assert_eq!(v, i);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hostile.await.expect("hostile clients");
    // And the pool is still usable by everyone after the debris is cleaned up.
    let clients: Vec<_> =
        futures_util::future::join_all((0..6).map(|_| proxy.connect("postgres", "", "postgres")))
            .await;
    for c in &clients {
        c.simple_query("SELECT 1")
            .await
            .expect("after hostile clients");
    }
}

fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// Log in as postgres (trust) with raw bytes and read up to ReadyForQuery.
fn login(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut p = ((params.len() + 8) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&196608i32.to_be_bytes());
    p.extend_from_slice(params);
    s.write_all(&p).expect("startup");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = s.read(&mut buf).expect("read greeting");
        assert!(n > 0, "closed during login: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    s
}

fn read_all(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn assert_closed(s: &mut TcpStream) {
    let got = read_all(s);
    assert!(got.len() < 1024, "unexpected reply {got:?}");
}
