//! The server connection pool on its own, against a real Postgres: which connection a
//! checkout gets, the bound and the wait, and the limits that close connections.

use crate::support::shared_pg;
use pgstash::config::{PoolConfig, UpstreamTarget};
use pgstash::upstream::pool::{CheckoutError, Pools, ServerPool};
use std::sync::Arc;
use std::time::Duration;

fn pools(tweak: impl FnOnce(&mut PoolConfig)) -> (Arc<Pools>, ServerPool) {
    let pg = shared_pg();
    let target = UpstreamTarget::parse(&format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        pg.port
    ))
    .expect("upstream url");
    let mut config = PoolConfig {
        max_size: 4,
        ..PoolConfig::default()
    };
    tweak(&mut config);
    let pools = Pools::new(target, config, Duration::from_secs(5));
    let pool = pools.get("postgres", "postgres", None);
    (pools, pool)
}

/// The backend pid of each of `pids` still connected, by asking Postgres.
async fn alive(pids: &[i32]) -> Vec<i32> {
    let c = shared_pg().client("postgres").await;
    let rows = c
        .query(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1) ORDER BY pid",
            &[&pids.to_vec()],
        )
        .await
        .expect("pg_stat_activity");
    rows.iter().map(|r| r.get(0)).collect()
}

async fn closed_by_postgres(pid: i32) -> bool {
    for _ in 0..100 {
        if alive(&[pid]).await.is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_given_back_last_is_handed_out_first() {
    let (_pools, pool) = pools(|_| {});
    let a = pool.checkout().await.expect("a");
    let b = pool.checkout().await.expect("b");
    let (pa, pb) = (a.key.pid, b.key.pid);
    assert_ne!(pa, pb);
    drop(b);
    drop(a);
    assert_eq!(pool.checkout().await.expect("again").key.pid, pa);
    assert_eq!(pool.open(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_waits_for_a_free_connection_up_to_the_checkout_timeout() {
    let (_pools, pool) = pools(|c| {
        c.max_size = 1;
        c.checkout_timeout = Duration::from_millis(300);
    });
    let held = pool.checkout().await.expect("first");
    let pid = held.key.pid;
    match pool.checkout().await {
        Err(CheckoutError::Timeout(t)) => assert_eq!(t, Duration::from_millis(300)),
        Err(e) => panic!("expected a checkout timeout, got {e}"),
        Ok(_) => panic!("a second connection past max_size 1"),
    }
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout().await.map(|c| c.key.pid) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    let got = waiter.await.expect("join").expect("the freed connection");
    assert_eq!(got, pid, "the waiter gets the connection given back");
    assert_eq!(pool.open(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarded_connection_is_closed_and_frees_its_place() {
    let (_pools, pool) = pools(|c| c.max_size = 1);
    let conn = pool.checkout().await.expect("first");
    let pid = conn.key.pid;
    conn.discard();
    assert_eq!(pool.open(), 0);
    assert!(
        closed_by_postgres(pid).await,
        "backend {pid} still connected"
    );
    let next = pool.checkout().await.expect("a new one within max_size");
    assert_ne!(next.key.pid, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_postgres_closed_is_replaced_at_checkout() {
    let (_pools, pool) = pools(|_| {});
    let pid = pool.checkout().await.expect("first").key.pid;
    let c = shared_pg().client("postgres").await;
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    assert!(closed_by_postgres(pid).await);
    let mut next = pool.checkout().await.expect("a replacement");
    assert_ne!(next.key.pid, pid);
    next.send(b"Q\0\0\0\x0dSELECT 1\0")
        .await
        .expect("the replacement takes a query");
    let answer = next.drain_until_ready().await.expect("answered");
    assert!(answer.iter().any(|m| m.tag() == b'D'), "a row");
    assert_eq!(pool.open(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_max_lifetime_is_not_handed_out_again() {
    let (_pools, pool) = pools(|c| c.max_lifetime = Duration::from_millis(200));
    let pid = pool.checkout().await.expect("first").key.pid;
    assert_eq!(
        pool.checkout().await.expect("young").key.pid,
        pid,
        "reused while young"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = pool.checkout().await.expect("after max_lifetime");
    assert_ne!(next.key.pid, pid);
    assert!(closed_by_postgres(pid).await, "the old one is closed");
    assert_eq!(pool.open(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_closes_idle_connections_and_keeps_min_size_open() {
    let (pools, pool) = pools(|c| {
        c.min_size = 2;
        c.idle_timeout = Duration::from_millis(200);
    });
    pools.maintain().await;
    assert_eq!(pool.open(), 2, "topped up to min_size");
    assert_eq!(pool.idle(), 2);
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| pool.checkout())).await;
    let pids: Vec<i32> = held
        .into_iter()
        .map(|c| c.expect("checkout").key.pid)
        .collect();
    assert_eq!(pool.open(), 3);
    assert_eq!(pool.idle(), 3, "given back");
    tokio::time::sleep(Duration::from_millis(300)).await;
    pools.maintain().await;
    assert_eq!(
        pool.open(),
        2,
        "idle ones closed, then min_size opened again"
    );
    for _ in 0..100 {
        if alive(&pids).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        alive(&pids).await.is_empty(),
        "every connection idle past idle_timeout is closed"
    );
}
