//! Tests of the test harness itself: the throwaway servers start, speak their
//! protocols, authenticate as configured, survive restarts, and never outlive
//! the test process (neither on a normal exit nor when it is SIGKILLed).

use crate::support::{self, PgCluster, RedisServer, free_port, python, shared_pg, shared_redis};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

async fn login(url: &str) -> Result<String, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let row = client.query_one("SELECT current_user::text", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn throwaway_postgres_accepts_md5_and_scram_logins() {
    let pg = shared_pg();
    assert_ne!(pg.port, 5432, "must not be the machine's own Postgres");
    // The roles really use the auth methods their names promise.
    let hashes = pg.psql(
        "SELECT rolname, rolpassword LIKE 'md5%', rolpassword LIKE 'SCRAM-SHA-256$%' \
         FROM pg_authid WHERE rolname IN ('md5user', 'scramuser') ORDER BY rolname",
    );
    assert_eq!(hashes, "md5user|t|f\nscramuser|f|t");

    for (user, password) in [("md5user", "md5pass"), ("scramuser", "scrampass")] {
        for db in ["postgres", "other"] {
            let got = login(&pg.url(user, password, db)).await;
            assert_eq!(got.as_deref().ok(), Some(user), "{user}@{db}: {got:?}");
        }
        let err = login(&pg.url(user, "wrong", "postgres"))
            .await
            .expect_err("a wrong password must be rejected");
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "{user}: {err}"
        );
    }
    // The superuser is trusted on loopback, which the harness relies on.
    assert_eq!(
        login(&pg.url("postgres", "", "postgres"))
            .await
            .ok()
            .as_deref(),
        Some("postgres")
    );
    assert_eq!(
        pg.psql("SHOW wal_level; SHOW max_connections"),
        "logical\n300"
    );
}

#[tokio::test]
async fn restarted_postgres_accepts_connections_again() {
    let pg = PgCluster::start();
    let port = pg.port;
    pg.psql("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)");
    let before = pg.client("postgres").await;
    let pid_before = pg.pid();

    pg.restart();
    assert_eq!(pg.port, port);
    assert_ne!(pg.pid(), pid_before, "a new postmaster");
    assert!(
        before.simple_query("SELECT 1").await.is_err(),
        "connections from before the restart must be gone"
    );
    let after = pg.client("postgres").await;
    let row = after
        .query_one("SELECT v FROM kept", &[])
        .await
        .expect("query after restart");
    assert_eq!(row.get::<_, i32>(0), 42, "data survives a restart");

    // stop() then restart() is how tests simulate an outage and recovery.
    pg.stop();
    assert!(
        login(&pg.url("scramuser", "scrampass", "postgres"))
            .await
            .is_err()
    );
    pg.restart();
    assert_eq!(
        login(&pg.url("scramuser", "scrampass", "postgres"))
            .await
            .ok()
            .as_deref(),
        Some("scramuser")
    );
    assert!(
        pg.log_tail(200).contains("database system is ready"),
        "{}",
        pg.log_tail(20)
    );
}

#[test]
fn throwaway_redis_answers_ping() {
    let redis = shared_redis();
    assert_ne!(redis.port, 6379, "must not be the machine's own Redis");
    let mut s = TcpStream::connect(("127.0.0.1", redis.port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set_read_timeout");
    s.write_all(b"PING\r\n").expect("send PING");
    let mut reply = [0u8; 7];
    s.read_exact(&mut reply).expect("read PING reply");
    assert_eq!(&reply, b"+PONG\r\n");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port));
}

#[test]
fn restarted_redis_is_empty_and_answers() {
    let redis = RedisServer::start();
    assert_eq!(redis.cmd(&["SET", "k", "v"]), "OK");
    assert_eq!(redis.cmd(&["GET", "k"]), "v");
    assert!(
        redis
            .try_cmd(&["NOSUCHCOMMAND"])
            .is_err_and(|e| e.starts_with("ERR"))
    );
    redis.stop();
    assert!(redis.try_cmd(&["PING"]).is_err(), "stopped");
    redis.restart();
    assert_eq!(redis.cmd(&["GET", "k"]), "(nil)", "nothing is persisted");
    assert_eq!(
        redis.cmd(&["CONFIG", "GET", "appendonly"]),
        "appendonly\nno"
    );
}

#[test]
fn python_venv_has_psycopg() {
    let py = python();
    let out = Command::new(&py)
        .args(["-c", "import psycopg; print(psycopg.__version__)"])
        .output()
        .expect("run the venv python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(version.starts_with('3'), "psycopg version {version}");

    // And it can actually talk to the throwaway Postgres (SCRAM over TCP).
    let url = shared_pg().url("scramuser", "scrampass", "other");
    let script = "import sys, psycopg\n\
                  with psycopg.connect(sys.argv[1]) as c:\n    \
                  print(c.execute('SELECT current_database()').fetchone()[0])";
    let out = Command::new(&py)
        .args(["-c", script, &url])
        .output()
        .expect("run the venv python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "other");
}

#[test]
fn free_ports_are_distinct() {
    let ports: std::collections::HashSet<u16> = (0..200).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 200);
}

/// The child half of the two tests below, run when the test re-executes itself with
/// `PGSTASH_HARNESS_HOLD` set. It starts servers, reports their pids and dirs on stdout,
/// then either returns (so the process exits normally) or hangs until the parent SIGKILLs it.
fn hold_servers_for_parent(mode: &str) {
    let (pg, redis) = (shared_pg(), shared_redis());
    let owned = RedisServer::start(); // also a non-static one that gets leaked
    println!(
        "HOLDING {} {} {} {} {} {}",
        pg.pid().expect("pg pid"),
        redis.pid().expect("redis pid"),
        owned.pid().expect("redis pid"),
        pg.data_dir().parent().expect("pg dir").display(),
        redis.dir().display(),
        owned.dir().display(),
    );
    std::mem::forget(owned);
    if mode == "hang" {
        std::thread::sleep(Duration::from_secs(600));
    }
}

/// True (after doing the child's work) when this process is the re-executed child.
fn acting_as_holder() -> bool {
    match std::env::var("PGSTASH_HARNESS_HOLD") {
        Ok(mode) => {
            hold_servers_for_parent(&mode);
            true
        }
        Err(_) => false,
    }
}

/// Re-runs test `test` in a child test process that acts as the holder; returns it, the
/// server pids and the scratch dirs it printed.
fn spawn_holder(test: &str, mode: &str) -> (std::process::Child, Vec<i32>, Vec<String>) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([test, "--exact", "--nocapture"])
        .env("PGSTASH_HARNESS_HOLD", mode)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder test process");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let line = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("HOLDING "))
        .expect("holder printed no HOLDING line (see its stderr above)");
    // Keep reading: a closed pipe would make the holder's libtest fail.
    std::thread::spawn(move || lines.for_each(drop));
    let fields: Vec<&str> = line.split_whitespace().skip(1).collect();
    let pids = fields[..3]
        .iter()
        .map(|p| p.parse().expect("pid"))
        .collect();
    (
        child,
        pids,
        fields[3..].iter().map(|s| s.to_string()).collect(),
    )
}

/// Gone, or a zombie waiting for an init that may never reap it.
fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn assert_dead_soon(pids: &[i32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pids.iter().all(|&p| is_dead(p)) {
        assert!(
            Instant::now() < deadline,
            "{what}: server processes {pids:?} still alive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn servers_stop_when_the_test_process_exits() {
    if acting_as_holder() {
        return;
    }
    let (mut child, pids, dirs) =
        spawn_holder("harness::servers_stop_when_the_test_process_exits", "exit");
    let status = child.wait().expect("wait for holder");
    assert!(status.success(), "holder failed: {status}");
    // The atexit hook waits for the servers, so they are gone already.
    assert!(
        pids.iter().all(|&p| is_dead(p)),
        "alive after exit: {pids:?}"
    );
    for d in &dirs {
        assert!(!std::path::Path::new(d).exists(), "{d} left behind");
    }
}

#[test]
fn servers_die_when_the_test_process_is_killed() {
    if acting_as_holder() {
        return;
    }
    let (mut child, pids, dirs) = spawn_holder(
        "harness::servers_die_when_the_test_process_is_killed",
        "hang",
    );
    child.kill().expect("SIGKILL the holder");
    child.wait().expect("reap the holder");
    assert_dead_soon(&pids, "PR_SET_PDEATHSIG");
    // Nothing could clean up; the next process's sweep does.
    support::sweep_stale_dirs();
    for d in &dirs {
        assert!(!std::path::Path::new(d).exists(), "{d} not swept");
    }
}
