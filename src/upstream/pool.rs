//! Server connections pooled per (database, user), on deadpool's generic manager.
//!
//! deadpool gives the bounded pool, the wait timeout and the create timeout; this module adds
//! what a Postgres pooler needs on top: a liveness probe at checkout (so a restarted Postgres
//! costs no client an error), idle and lifetime limits, and a warm minimum.

use super::{ConnectParams, ServerConn, UpstreamError, connect};
use crate::config::{PoolConfig, UpstreamTarget};
use deadpool::Runtime;
use deadpool::managed::{self, Metrics, QueueMode, RecycleError, RecycleResult};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub type Pooled = managed::Object<ServerManager>;

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no server connection became free within {0:?} (pool.checkout_timeout)")]
    Timeout(Duration),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the pool is closed")]
    Closed,
}

pub struct ServerManager {
    params: RwLock<ConnectParams>,
    max_lifetime: Duration,
    retired: Retired,
}

/// Connections opened before this instant are not handed out again: they started their
/// sessions with role or database defaults (`ALTER ROLE ... SET`) that have since changed.
/// Shared by every pool.
type Retired = Arc<RwLock<Option<std::time::Instant>>>;

impl ServerManager {
    fn connect_params(&self) -> ConnectParams {
        self.params
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl managed::Manager for ServerManager {
    type Type = ServerConn;
    type Error = UpstreamError;

    async fn create(&self) -> Result<ServerConn, UpstreamError> {
        connect(&self.connect_params()).await
    }

    async fn recycle(
        &self,
        conn: &mut ServerConn,
        metrics: &Metrics,
    ) -> RecycleResult<UpstreamError> {
        if metrics.age() > self.max_lifetime {
            return Err(RecycleError::message("max_lifetime reached"));
        }
        if !conn.is_clean_and_alive() {
            return Err(RecycleError::message("connection closed or left unclean"));
        }
        let retired = *self.retired.read().unwrap_or_else(|p| p.into_inner());
        if retired.is_some_and(|t| conn.created <= t) {
            return Err(RecycleError::message(
                "role or database defaults changed since it connected",
            ));
        }
        Ok(())
    }
}

/// One pool of server connections for a (database, user).
#[derive(Clone)]
pub struct ServerPool {
    inner: managed::Pool<ServerManager>,
    checkout_timeout: Duration,
    /// (statement hash, settings fingerprint) pairs Postgres has accepted a Parse of.
    valid_statements: Arc<Mutex<HashSet<(u64, u64)>>>,
    retired: Retired,
    max_prepared: usize,
}

/// Bound on remembered statements; past it the set restarts (costing only server round trips).
const MAX_VALID_STATEMENTS: usize = 100_000;

impl ServerPool {
    /// Postgres accepted a Parse of this statement under these settings.
    pub fn mark_valid(&self, stmt: u64, settings: u64) {
        let mut v = self
            .valid_statements
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if v.len() >= MAX_VALID_STATEMENTS {
            v.clear();
        }
        v.insert((stmt, settings));
    }

    pub fn is_valid(&self, stmt: u64, settings: u64) -> bool {
        let v = self
            .valid_statements
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        v.contains(&(stmt, settings))
    }

    /// Most shared statements a server connection keeps (0: no bound).
    pub fn max_prepared(&self) -> usize {
        self.max_prepared
    }

    pub async fn checkout(&self) -> Result<Pooled, CheckoutError> {
        use managed::{PoolError, TimeoutType};
        match self.inner.get().await {
            Ok(c) => Ok(c),
            Err(PoolError::Backend(e)) => Err(e.into()),
            Err(PoolError::Timeout(TimeoutType::Create)) => {
                Err(CheckoutError::Upstream(UpstreamError::Timeout {
                    addr: self.inner.manager().connect_params().addr,
                    timeout: self.checkout_timeout,
                }))
            }
            Err(PoolError::Timeout(_)) => Err(CheckoutError::Timeout(self.checkout_timeout)),
            Err(_) => Err(CheckoutError::Closed),
        }
    }

    /// Remember the password a client proved at login, for the connections opened later.
    pub fn set_password(&self, password: Option<String>) {
        let mut p = self
            .inner
            .manager()
            .params
            .write()
            .unwrap_or_else(|p| p.into_inner());
        p.password = password;
    }

    pub fn password(&self) -> Option<String> {
        self.inner.manager().connect_params().password
    }

    pub fn status(&self) -> deadpool::Status {
        self.inner.status()
    }

    /// Retire every server connection open now, in every pool: sessions started from here
    /// on get the role and database defaults Postgres has now.
    pub fn retire_all(&self) {
        *self.retired.write().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }
}

/// All pools, created on first use of a (database, user).
pub struct Pools {
    target: UpstreamTarget,
    config: PoolConfig,
    connect_timeout: Duration,
    pools: Mutex<HashMap<(String, String), ServerPool>>,
    retired: Retired,
}

impl Pools {
    pub fn new(target: UpstreamTarget, config: PoolConfig, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Pools {
            target,
            config,
            connect_timeout,
            pools: Mutex::new(HashMap::new()),
            retired: Retired::default(),
        })
    }

    pub fn upstream_addr(&self) -> String {
        self.target.addr()
    }

    /// The pool for `(database, user)`; `password` seeds a new pool's login password.
    pub fn get(&self, database: &str, user: &str, password: Option<String>) -> ServerPool {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let key = (database.to_string(), user.to_string());
        if let Some(p) = pools.get(&key) {
            return p.clone();
        }
        // The upstream URL's password belongs to the URL's user; other users log in with the
        // password their client proved (or none, under trust).
        let password = password.or_else(|| {
            (user == self.target.user)
                .then(|| self.target.password.clone())
                .flatten()
        });
        let manager = ServerManager {
            params: RwLock::new(ConnectParams {
                addr: self.target.addr(),
                user: user.to_string(),
                database: database.to_string(),
                password,
                timeout: self.connect_timeout,
            }),
            max_lifetime: self.config.max_lifetime,
            retired: Arc::clone(&self.retired),
        };
        let inner = managed::Pool::builder(manager)
            .max_size(self.config.max_size)
            .wait_timeout(Some(self.config.checkout_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.connect_timeout))
            .runtime(Runtime::Tokio1)
            // Most recently used first, as PgBouncer does: a quiet client keeps reusing one warm
            // backend (its caches hot, its process just scheduled) instead of cycling through
            // every pooled backend, and connections left idle really age out by idle_timeout.
            .queue_mode(QueueMode::Lifo)
            .build()
            .expect("a runtime is configured");
        let pool = ServerPool {
            inner,
            checkout_timeout: self.config.checkout_timeout,
            valid_statements: Arc::default(),
            retired: Arc::clone(&self.retired),
            max_prepared: self.config.max_prepared_statements,
        };
        pools.insert(key, pool.clone());
        pool
    }

    /// Drop idle and over-age connections and top pools up to `min_size`. Runs periodically.
    pub async fn maintain(&self) {
        let pools: Vec<ServerPool> = {
            let map = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            map.values().cloned().collect()
        };
        let idle = self.config.idle_timeout;
        let life = self.config.max_lifetime;
        for pool in pools {
            pool.inner.retain(|conn, m| {
                m.last_used() < idle && m.age() < life && conn.is_clean_and_alive()
            });
            // Holding min_size connections at once forces the pool to open the missing ones.
            if pool.inner.status().size < self.config.min_size {
                let mut warm = Vec::with_capacity(self.config.min_size);
                for _ in 0..self.config.min_size {
                    match pool.inner.get().await {
                        Ok(c) => warm.push(c),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not open a server connection to keep pool.min_size");
                            break;
                        }
                    }
                }
            }
        }
    }
}
