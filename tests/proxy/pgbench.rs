//! pgbench through pgstash in every query mode and both pool modes, with more clients than
//! server connections in transaction mode.

use crate::fixture::{Proxy, fresh_database, run};
use crate::support::shared_pg;
use pgstash::config::PoolMode;
use std::process::Command;

const CLIENTS: u32 = 16;
const TX_PER_CLIENT: u32 = 200;

fn pgbench(proxy: &Proxy, db: &str, args: &[&str]) -> String {
    let pg = shared_pg();
    run(Command::new(pg.bin("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(args)
        .arg(db))
}

fn bench_all_modes(mode: PoolMode, pool_size: usize) {
    let pg = shared_pg();
    let db = fresh_database(pg, "bench");
    let proxy = Proxy::start(pg, |c| {
        c.pool.mode = mode;
        c.pool.max_size = pool_size;
        c.pool.checkout_timeout = std::time::Duration::from_secs(30);
    });
    // -i goes through the proxy too: it uses COPY FROM STDIN and DDL.
    pgbench(&proxy, &db, &["-i", "-s", "1", "-q"]);
    let expected = format!(
        "number of transactions actually processed: {0}/{0}",
        CLIENTS * TX_PER_CLIENT
    );
    for query_mode in ["simple", "extended", "prepared"] {
        let out = pgbench(
            &proxy,
            &db,
            &[
                "-n",
                "-M",
                query_mode,
                "-c",
                &CLIENTS.to_string(),
                "-j",
                "2",
                "-t",
                &TX_PER_CLIENT.to_string(),
            ],
        );
        assert!(out.contains(&expected), "{mode:?}/{query_mode}:\n{out}");
        assert!(
            out.contains("number of failed transactions: 0 "),
            "{mode:?}/{query_mode}:\n{out}"
        );
    }
    // The balances pgbench moved must add up, whatever connection ran each transaction.
    let sums = pg.psql_db(
        &db,
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history)",
    );
    assert_eq!(sums.trim(), "t");
}

#[test]
fn pgbench_all_query_modes_in_transaction_mode_with_fewer_servers_than_clients() {
    bench_all_modes(PoolMode::Transaction, 4);
}

#[test]
fn pgbench_all_query_modes_in_session_mode() {
    bench_all_modes(PoolMode::Session, CLIENTS as usize + 2);
}

#[test]
fn extended_protocol_statements_in_turn_each_get_their_own_answer() {
    // pgbench -M extended sends an unnamed Parse before every execution. pgstash reuses the
    // unnamed statement when the Parse is the same as the last one; statements taking turns
    // must each keep their own text in the cache key (a mix-up would answer one statement
    // with another's cached rows, which the script checks client-side).
    let pg = shared_pg();
    let db = fresh_database(pg, "turns");
    pg.psql_db(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO t SELECT g, g * 10 FROM generate_series(1, 20) g;",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 4);
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("turns.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 20)
SELECT v AS a FROM t WHERE id = :id \\gset
SELECT v + 1 AS b FROM t WHERE id = :id \\gset
SELECT v * 2 AS c FROM t WHERE id = :id \\gset
\\if :a != :id * 10 or :b != :id * 10 + 1 or :c != :id * 20
SELECT 1 / 0;
\\endif
",
    )
    .expect("write script");
    let out = pgbench(
        &proxy,
        &db,
        &[
            "-n",
            "-M",
            "extended",
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "300",
            "-f",
            script.to_str().expect("utf-8 path"),
        ],
    );
    assert!(
        out.contains("number of transactions actually processed: 1200/1200"),
        "{out}"
    );
    assert!(out.contains("number of failed transactions: 0 "), "{out}");
}
