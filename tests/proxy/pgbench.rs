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
