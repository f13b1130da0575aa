//! A pgstash instance in the test process, in front of a throwaway Postgres: `server::run` on
//! port 0 with its own runtime thread, so tests may block (psql, pgbench) or be async.

use crate::support::PgCluster;
use pgstash::config::{Config, PoolMode};
use std::net::SocketAddr;
use std::thread::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Start pgstash in front of `pg` (upstream user `postgres`, trust), adjusted by `tweak`.
    pub fn start(pg: &PgCluster, tweak: impl FnOnce(&mut Config)) -> Proxy {
        // TEST_LOG=pgstash=debug shows the proxy's logs when a test needs a look (not PGSTASH_*:
        // pgstash reads those as configuration and refuses names it does not know).
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let mut config = Config::default();
        config.upstream.url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
        config.pool.max_size = 4;
        config.pool.mode = PoolMode::Transaction;
        // Most behaviour tests read once and expect the next read to hit. Admission on the
        // second miss (the shipped default) has tests of its own that turn it back on.
        config.cache.admit_on_second_miss = false;
        tweak(&mut config);
        config.validate().expect("test config must be valid");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let unix_socket = config
            .server
            .unix_socket_dir
            .as_ref()
            .map(|d| d.join(format!(".s.PGSQL.{}", addr.port())));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                pgstash::server::run(listener, config, async {
                    let _ = rx.await;
                })
                .await
                .expect("pgstash server");
            });
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        });
        // The TCP listener is bound above; the Unix socket only once the server runs.
        if let Some(path) = unix_socket {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !path.exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "pgstash did not create {}",
                    path.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        Proxy {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A libpq/tokio-postgres URL through the proxy.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        if password.is_empty() {
            format!("postgres://{user}@127.0.0.1:{}/{db}", self.port())
        } else {
            format!(
                "postgres://{user}:{password}@127.0.0.1:{}/{db}",
                self.port()
            )
        }
    }

    /// tokio-postgres client through the proxy (its connection task is spawned).
    pub async fn connect(&self, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
        self.try_connect(user, password, db)
            .await
            .unwrap_or_else(|e| panic!("connect through pgstash as {user} to {db}: {e}"))
    }

    pub async fn try_connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.url(user, password, db), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Run a command to completion, panicking with its output on failure.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout + &stderr
}

/// A fresh database in the shared cluster for tests that write, so they don't interfere.
pub fn fresh_database(pg: &PgCluster, prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    pg.psql(&format!("CREATE DATABASE {name}"));
    name
}

/// A free local address for a proxy's metrics endpoint.
pub fn free_metrics_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::support::free_port()))
}
