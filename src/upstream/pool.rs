//! Server connections pooled per (database, user).
//!
//! In transaction mode every transaction checks a connection out and back in, so the common
//! case is what this pool is shaped for: a free permit and an idle connection cost one
//! uncontended lock and no timer. Only a checkout that must wait for a connection arms the
//! checkout timeout. (deadpool, which this replaced, armed its wait and recycle timeouts and
//! updated its metrics on every checkout: about a fifth of pgstash's own instructions for
//! a `pgbench -S` transaction.)
//!
//! Beside the bound and the wait, the pool gives what a Postgres pooler needs: a liveness
//! probe at checkout (so a restarted Postgres costs no client an error), idle and lifetime
//! limits, retirement of connections whose role or database defaults changed, and a warm
//! minimum.

use super::{ConnectParams, ServerConn, UpstreamError, connect};
use crate::config::{PoolConfig, UpstreamTarget};
use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no server connection became free within {0:?} (pool.checkout_timeout)")]
    Timeout(Duration),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the pool is closed")]
    Closed,
}

/// Connections opened before this instant are not handed out again: they started their
/// sessions with role or database defaults (`ALTER ROLE ... SET`) that have since changed.
/// Shared by every pool.
type Retired = Arc<RwLock<Option<Instant>>>;

/// A server connection checked out of its pool. Dropping it gives it back (whether it may
/// be handed out again is decided at the next checkout); [`Pooled::discard`] closes it.
pub struct Pooled {
    /// `Some` until dropped or discarded.
    conn: Option<ServerConn>,
    home: Arc<Shared>,
    /// Held as long as the connection is out: the pool's bound.
    _permit: OwnedSemaphorePermit,
}

impl Pooled {
    /// Closes the connection instead of giving it back: it is broken, or in a state no other
    /// client may inherit.
    pub fn discard(mut self) {
        if self.conn.take().is_some() {
            self.home.open.fetch_sub(1, Relaxed);
        }
    }
}

impl Deref for Pooled {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("a Pooled holds its connection until dropped")
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("a Pooled holds its connection until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Back on the idle stack before the permit goes (fields drop after this), so a
        // checkout woken by the permit finds the connection.
        if let Some(conn) = self.conn.take() {
            self.home.lock_idle().push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

struct Idle {
    conn: ServerConn,
    /// When it was given back.
    since: Instant,
}

struct Shared {
    params: RwLock<ConnectParams>,
    /// Most recently given back last: checkouts take from the end (LIFO), as PgBouncer
    /// does, so a quiet client keeps reusing one warm backend (its caches hot, its process
    /// just scheduled) instead of cycling through every pooled one, and connections left
    /// idle really age out by idle_timeout.
    idle: Mutex<Vec<Idle>>,
    /// One permit per connection the pool may have out at once (`pool.max_size`).
    permits: Arc<Semaphore>,
    /// Connections open: idle or checked out.
    open: AtomicUsize,
    max_lifetime: Duration,
    retired: Retired,
}

impl Shared {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connect_params(&self) -> ConnectParams {
        self.params
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why an idle connection may not be handed out now, if it may not.
    fn unfit(&self, conn: &ServerConn, now: Instant) -> Option<&'static str> {
        if now.saturating_duration_since(conn.created) > self.max_lifetime {
            return Some("max_lifetime reached");
        }
        if !conn.is_clean_and_alive() {
            return Some("connection closed or left unclean");
        }
        let retired = *self.retired.read().unwrap_or_else(|p| p.into_inner());
        if retired.is_some_and(|t| conn.created <= t) {
            return Some("role or database defaults changed since it connected");
        }
        None
    }
}

/// One pool of server connections for a (database, user).
#[derive(Clone)]
pub struct ServerPool {
    shared: Arc<Shared>,
    checkout_timeout: Duration,
    /// (statement hash, settings fingerprint) pairs Postgres has accepted a Parse of.
    valid_statements: Arc<Mutex<HashSet<(u64, u64)>>>,
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

    /// A connection for the caller alone: the most recently given back one that is still fit
    /// (unfit ones are closed on the way), else a new one. Waits at most
    /// `pool.checkout_timeout` for one to become free when all `pool.max_size` are out.
    pub async fn checkout(&self) -> Result<Pooled, CheckoutError> {
        let permits = &self.shared.permits;
        let permit = match Arc::clone(permits).try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(CheckoutError::Closed),
            Err(TryAcquireError::NoPermits) => {
                match tokio::time::timeout(
                    self.checkout_timeout,
                    Arc::clone(permits).acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(CheckoutError::Closed),
                    Err(_) => return Err(CheckoutError::Timeout(self.checkout_timeout)),
                }
            }
        };
        let now = Instant::now();
        loop {
            let Some(idle) = self.shared.lock_idle().pop() else {
                break;
            };
            match self.shared.unfit(&idle.conn, now) {
                None => return Ok(self.hand_out(idle.conn, permit)),
                Some(why) => {
                    tracing::debug!(reason = why, "closing a pooled server connection");
                    self.shared.open.fetch_sub(1, Relaxed);
                }
            }
        }
        // The connection attempt has a timeout of its own (upstream.connect_timeout).
        let conn = connect(&self.shared.connect_params()).await?;
        self.shared.open.fetch_add(1, Relaxed);
        Ok(self.hand_out(conn, permit))
    }

    fn hand_out(&self, conn: ServerConn, permit: OwnedSemaphorePermit) -> Pooled {
        Pooled {
            conn: Some(conn),
            home: Arc::clone(&self.shared),
            _permit: permit,
        }
    }

    /// Connections open now, idle or checked out.
    pub fn open(&self) -> usize {
        self.shared.open.load(Relaxed)
    }

    /// Connections idle in the pool now.
    pub fn idle(&self) -> usize {
        self.shared.lock_idle().len()
    }

    /// Close the idle connections `keep` rejects.
    fn retain_idle(&self, mut keep: impl FnMut(&Idle) -> bool) {
        let closed: Vec<Idle> = {
            let mut idle = self.shared.lock_idle();
            let (kept, closed) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|i| keep(i));
            *idle = kept;
            closed
        };
        self.shared.open.fetch_sub(closed.len(), Relaxed);
    }

    /// Remember the password a client proved at login, for the connections opened later.
    pub fn set_password(&self, password: Option<String>) {
        let mut p = self
            .shared
            .params
            .write()
            .unwrap_or_else(|p| p.into_inner());
        p.password = password;
    }

    pub fn password(&self) -> Option<String> {
        self.shared.connect_params().password
    }

    /// Retire every server connection open now, in every pool: sessions started from here
    /// on get the role and database defaults Postgres has now.
    pub fn retire_all(&self) {
        *self
            .shared
            .retired
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
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
        let shared = Shared {
            params: RwLock::new(ConnectParams {
                addr: self.target.addr(),
                user: user.to_string(),
                database: database.to_string(),
                password,
                timeout: self.connect_timeout,
            }),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(self.config.max_size)),
            open: AtomicUsize::new(0),
            max_lifetime: self.config.max_lifetime,
            retired: Arc::clone(&self.retired),
        };
        let pool = ServerPool {
            shared: Arc::new(shared),
            checkout_timeout: self.config.checkout_timeout,
            valid_statements: Arc::default(),
            max_prepared: self.config.max_prepared_statements,
        };
        pools.insert(key, pool.clone());
        pool
    }

    /// Close idle and over-age connections and top pools up to `min_size`. Runs periodically.
    pub async fn maintain(&self) {
        let pools: Vec<ServerPool> = {
            let map = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            map.values().cloned().collect()
        };
        let idle = self.config.idle_timeout;
        for pool in pools {
            let now = Instant::now();
            // What a checkout would refuse (lifetime, liveness, retirement), and idleness.
            pool.retain_idle(|i| {
                now.saturating_duration_since(i.since) < idle
                    && pool.shared.unfit(&i.conn, now).is_none()
            });
            // Holding min_size connections at once forces the pool to open the missing ones.
            if pool.open() < self.config.min_size {
                let mut warm = Vec::with_capacity(self.config.min_size);
                for _ in 0..self.config.min_size {
                    match pool.checkout().await {
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
