//! Throwaway PostgreSQL clusters on free ports.
//!
//! Layout of a cluster's scratch dir (owned by the `postgres` OS user when we
//! are root, since Postgres refuses to run as root):
//! `<dir>/data` (PGDATA, with `postgres.log` holding the server's output) and
//! the Unix socket `<dir>/.s.PGSQL.<port>`.
//!
//! `postgres` is run directly rather than through `pg_ctl` (which daemonizes
//! and so would escape PR_SET_PDEATHSIG); stopping is a signal plus a wait:
//! SIGINT = fast shutdown, SIGQUIT = immediate shutdown.

use super::pgbin::{as_user, pg_bin, postgres_user, without_libpq_env};
use super::proc::Supervised;
use super::scratch::scratch_dir;
use super::{free_port, hint_for, run_checked, tail};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The superuser is trusted (the harness itself needs no password); md5user
/// must log in with md5, every other role with SCRAM-SHA-256.
const HBA: &str = "\
local all all trust
local replication all trust
host all postgres 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
host all md5user 127.0.0.1/32 md5
host all all 127.0.0.1/32 scram-sha-256
";

/// Roles and databases every cluster has; see the pg_hba.conf above.
const SETUP_SQL: &str = "\
SET password_encryption = 'md5';
CREATE ROLE md5user LOGIN PASSWORD 'md5pass';
SET password_encryption = 'scram-sha-256';
CREATE ROLE scramuser LOGIN PASSWORD 'scrampass';
CREATE DATABASE other;
GRANT ALL ON DATABASE postgres, other TO md5user, scramuser;
GRANT ALL ON SCHEMA public TO md5user, scramuser;
";

pub struct PgCluster {
    pub port: u16,
    // Field order matters: the server must stop before its dir is removed.
    proc: Supervised,
    dir: tempfile::TempDir,
    /// (uid, gid) of the `postgres` OS user when we are root.
    run_as: Option<(u32, u32)>,
}

/// The cluster shared by all tests of this binary, started on first use and
/// stopped at process exit. Tests that stop or restart Postgres must use their
/// own [`PgCluster::start`] instead.
pub fn shared_pg() -> &'static PgCluster {
    static PG: OnceLock<PgCluster> = OnceLock::new();
    PG.get_or_init(PgCluster::start)
}

impl PgCluster {
    /// initdb + start on a free port + create the test roles and databases.
    pub fn start() -> PgCluster {
        let run_as = postgres_user();
        let mut dir = scratch_dir("pg");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {:?} to postgres: {e}", dir.path()));
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(pg_bin("initdb"));
        initdb.arg("-D").arg(&data);
        initdb.args(["-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"]);
        initdb.args(["--auth-local=trust", "--auth-host=scram-sha-256"]);
        as_user(&mut initdb, run_as).current_dir(dir.path());
        run_checked("initdb for a throwaway cluster", &mut initdb);
        std::fs::write(data.join("pg_hba.conf"), HBA).expect("writing pg_hba.conf");
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("opening postgresql.conf for appending");
        // The port lives in an included file so a retry can change it.
        writeln!(conf, "include 'pgstash-test.conf'").expect("appending to postgresql.conf");

        let mut last_err = String::new();
        // Another process can grab our free port before postgres binds it.
        for _attempt in 0..3 {
            let port = free_port();
            let settings = format!(
                "listen_addresses = '127.0.0.1'\nport = {port}\n\
                 unix_socket_directories = '{}'\n\
                 fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
                 wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
                 max_connections = 300\nshared_buffers = 128MB\n\
                 # in PGDATA, not /dev/shm: a SIGKILLed cluster would leak it there\n\
                 dynamic_shared_memory_type = mmap\n\
                 log_line_prefix = '%m [%p] %q%u@%d '\n",
                dir.path().display()
            );
            std::fs::write(data.join("pgstash-test.conf"), settings)
                .expect("writing pgstash-test.conf");
            let pg = PgCluster {
                port,
                proc: Supervised::new(
                    format!("postgres on port {port}"),
                    dir.path(),
                    libc::SIGQUIT,
                ),
                dir,
                run_as,
            };
            match pg.launch() {
                Ok(()) => {
                    pg.psql(SETUP_SQL);
                    // PG15+ no longer lets everyone CREATE in public.
                    pg.psql_db("other", "GRANT ALL ON SCHEMA public TO md5user, scramuser");
                    return pg;
                }
                Err(e) if e.contains("could not bind") || e.contains("Address already in use") => {
                    last_err = e;
                    // Reuse the initdb'd directory with the next port.
                    pg.proc.stop(libc::SIGQUIT, Duration::from_secs(10));
                    let PgCluster { dir: d, .. } = pg;
                    dir = d;
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("postgres could not bind a free port 3 times; last error:\n{last_err}");
    }

    /// Fast shutdown (SIGINT) and wait. A no-op if not running.
    pub fn stop(&self) {
        self.proc.stop(libc::SIGINT, Duration::from_secs(60));
    }

    /// Stops (fast) if running, then starts again on the same port with the
    /// same data. Also the way to bring back a cluster after [`stop`](Self::stop).
    pub fn restart(&self) {
        self.stop();
        if let Err(e) = self.launch() {
            panic!("restarting the cluster failed: {e}");
        }
    }

    /// `postgres://user[:password]@127.0.0.1:port/db`; empty password = none.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        let auth = if password.is_empty() {
            enc(user)
        } else {
            format!("{}:{}", enc(user), enc(password))
        };
        format!("postgres://{auth}@127.0.0.1:{}/{}", self.port, enc(db))
    }

    /// Runs `sql` with psql as the superuser in database `postgres`; returns
    /// the unaligned, tuples-only output. Statements run one by one (so
    /// CREATE DATABASE works); the first error panics with psql's stderr.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// [`psql`](Self::psql) in database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        self.try_psql_db(db, sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`psql_db`](Self::psql_db) that returns psql's failure instead of panicking: for
    /// cleanup in `Drop`, where the cluster may be down (a panic there aborts the tests).
    pub fn try_psql_db(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(pg_bin("psql"));
        without_libpq_env(&mut cmd)
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-f", "-", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=10",
                self.port
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}{}", hint_for(&e)));
        let mut stdin = child.stdin.take().expect("psql stdin was piped");
        let input = sql.to_owned();
        // A separate writer so a large output cannot deadlock a large input.
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().expect("waiting for psql");
        let _ = writer.join();
        if !out.status.success() {
            return Err(format!(
                "psql failed ({}) on port {} running:\n{sql}\n--- stderr ---\n{}",
                out.status,
                self.port,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_owned())
    }

    /// A tokio-postgres client to `db` as the superuser (connection task spawned).
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let url = self.url("postgres", "", db);
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Path of a PostgreSQL program of the version this cluster runs.
    pub fn bin(&self, name: &str) -> PathBuf {
        pg_bin(name)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the Unix socket `.s.PGSQL.<port>`.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir().join("postgres.log")
    }

    /// The last `lines` lines of the server log, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Spawns postgres and waits until it accepts connections.
    fn launch(&self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening postgres.log");
        if let Some((uid, gid)) = self.run_as {
            let _ = std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid));
        }
        let stderr = log.try_clone().expect("duplicating the log file handle");
        let mut cmd = Command::new(pg_bin("postgres"));
        cmd.arg("-D").arg(self.data_dir());
        as_user(&mut cmd, self.run_as)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        self.proc
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("cannot spawn postgres: {e}{}", hint_for(&e)));
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Some(status) = self.proc.exited() {
                return Err(format!(
                    "{} exited ({status}) while starting; log tail:\n{}",
                    self.proc.what,
                    self.log_tail(30)
                ));
            }
            // Cheap TCP probe first; pg_isready also knows "starting up".
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                let ready = without_libpq_env(&mut Command::new(pg_bin("pg_isready")))
                    .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-t", "2", "-p"])
                    .arg(self.port.to_string())
                    .status();
                if matches!(ready, Ok(s) if s.success()) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} not ready after {timeout:?}; log tail:\n{}",
                    self.proc.what,
                    self.log_tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Percent-encodes everything but unreserved URL characters.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
