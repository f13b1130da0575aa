//! psql through pgstash: what an interactive user sees must be what Postgres shows.

use crate::fixture::{Proxy, fresh_database, run};
use crate::support::shared_pg;
use std::process::Command;

fn psql(proxy: &Proxy, db: &str) -> Command {
    let mut c = Command::new(shared_pg().bin("psql"));
    c.args([
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        &proxy.port().to_string(),
        "-U",
        "postgres",
        "-d",
        db,
    ]);
    c.env_remove("PGPASSWORD");
    c
}

#[test]
fn multi_statement_string_returns_every_result() {
    let pg = shared_pg();
    let proxy = Proxy::start(pg, |_| {});
    let out = run(psql(&proxy, "postgres").args([
        "-At",
        "-c",
        "SELECT 1; SELECT 'two'; SELECT 3 WHERE false; SELECT 4",
    ]));
    assert_eq!(out.trim(), "1\ntwo\n4");
}

#[test]
fn errors_keep_their_sqlstate_and_notices_arrive() {
    let pg = shared_pg();
    let proxy = Proxy::start(pg, |_| {});
    let out = psql(&proxy, "postgres")
        .args(["-v", "VERBOSITY=verbose", "-c", "SELECT 1/0"])
        .output()
        .expect("psql");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("22012"), "{err}");
    assert!(err.contains("division by zero"), "{err}");

    let out = run(psql(&proxy, "postgres").args([
        "-c",
        "DO $$ BEGIN RAISE NOTICE 'hello from %', 'plpgsql'; END $$",
    ]));
    assert!(out.contains("NOTICE:  hello from plpgsql"), "{out}");
}

#[test]
fn copy_in_and_out_roundtrip_through_psql() {
    let pg = shared_pg();
    let db = fresh_database(pg, "psqlcopy");
    let proxy = Proxy::start(pg, |_| {});
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("in.csv");
    let rows: String = (1..=5000).map(|i| format!("{i},name {i}\n")).collect();
    std::fs::write(&src, &rows).expect("write csv");
    let dst = dir.path().join("out.csv");
    run(psql(&proxy, &db).args([
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        "CREATE TABLE t (id int primary key, name text)",
        "-c",
        &format!("\\copy t FROM '{}' WITH (FORMAT csv)", src.display()),
        "-c",
        &format!(
            "\\copy (SELECT * FROM t ORDER BY id) TO '{}' WITH (FORMAT csv)",
            dst.display()
        ),
    ]));
    assert_eq!(std::fs::read_to_string(&dst).expect("read out"), rows);
    // A failing COPY reports the Postgres error and leaves the session usable.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "1,dup\n").expect("write");
    let out = psql(&proxy, &db)
        .args([
            "-c",
            &format!("\\copy t FROM '{}' WITH (FORMAT csv)", bad.display()),
            "-c",
            "SELECT count(*) FROM t",
        ])
        .output()
        .expect("psql");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("duplicate key"), "{text}");
    assert!(text.contains("5000"), "{text}");
}
