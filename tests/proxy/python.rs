//! psycopg 3 (libpq underneath) through pgstash: binary results, pipeline mode and its
//! automatic server-side prepared statements.

use crate::fixture::{Proxy, run};
use crate::support::{python, shared_pg};
use std::process::Command;

const SCRIPT: &str = r#"
import sys, datetime, decimal, uuid
import psycopg

url = sys.argv[1]
with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
    # Binary results.
    with conn.cursor(binary=True) as cur:
        u = uuid.uuid4()
        cur.execute("SELECT %s::uuid, %s::numeric, %s::date, %s::bytea, %s::int8[]",
                    (u, decimal.Decimal("3.14159"), datetime.date(2024, 2, 29), b"\x00\xff", [1, None, 3]))
        row = cur.fetchone()
        assert row == (u, decimal.Decimal("3.14159"), datetime.date(2024, 2, 29), b"\x00\xff", [1, None, 3]), row
    # prepare_threshold=0: every query is prepared server-side under a name (_pg3_0, ...).
    for i in range(50):
        got = conn.execute("SELECT %s::int * 3", (i,)).fetchone()[0]
        assert got == i * 3, (i, got)
    # Pipeline mode: many statements in flight before one Sync.
    with conn.pipeline():
        curs = [conn.execute("SELECT %s::int + 1000", (i,)) for i in range(100)]
    assert [c.fetchone()[0] for c in curs] == [i + 1000 for i in range(100)]
    # An error inside a pipeline fails just that part, and the connection stays usable.
    try:
        with conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELECT 1/0")
    except psycopg.errors.DivisionByZero:
        pass
    else:
        raise AssertionError("expected division by zero")
    assert conn.execute("SELECT 'alive'").fetchone()[0] == "alive"
print("python-ok")
"#;

#[test]
fn psycopg_binary_pipeline_and_prepared_statements() {
    let proxy = Proxy::start(shared_pg(), |c| c.pool.max_size = 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("client.py");
    std::fs::write(&script, SCRIPT).expect("write script");
    // Several processes at once so their prepared statements meet on shared connections.
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(python())
                .arg(&script)
                .arg(proxy.url("postgres", "", "postgres"))
                .output()
                .expect("run python")
        })
        .collect();
    for out in children {
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("python-ok"), "{text}");
    }
    let _ = run(Command::new(python()).args(["-c", "import psycopg"]));
}
