//! The shared tier: L2 values in Redis, generations in Redis, and invalidations broadcast on a
//! Redis channel so every pgstash instance drops what another one's writes made stale
//! (DESIGN.md "Tiers and failure", "Freshness").
//!
//! Correctness does not depend on Redis being up:
//! - an L2 value carries the Redis generations its reader saw *before* going upstream, and is
//!   served only while they are still current (the same proof as L1, one tier down);
//! - a commit sets its generation keys and publishes before the client hears of the commit,
//!   so any instance that looks at Redis afterwards sees it; and it waits (at most
//!   `redis.timeout`) until every instance that received the message confirmed it applied
//!   it, so a client that saw the commit cannot then read the old row from another
//!   instance's L1;
//! - while this instance cannot hear the channel, L1 is served at most `unheard_bound`, then
//!   suspended; when the subscription is back everything L1 holds is dropped (it may have
//!   missed invalidations), and if our own publishes failed meanwhile we publish "all";
//! - every Redis operation has a timeout and a circuit breaker: a Redis problem costs a
//!   cache miss, never a client error.

mod breaker;
pub mod codec;

use crate::cache::{CacheKey, Dependency, Generations, Invalidation, Invalidator};
use crate::config::RedisConfig;
use crate::metrics::{InvalidationOrigin, metrics};
use breaker::Breaker;
use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Sets the generation keys of a commit to a fresh value and publishes the message, in one
/// step. Values come from one counter that only grows and restarts above the server clock in
/// microseconds if it was lost, so a generation key never takes a value it had before (a
/// value stored with an older generation can only become a miss).
const PUBLISH_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local c = redis.call('INCR', KEYS[1])
if c < now then
  c = now
  redis.call('SET', KEYS[1], string.format('%d', c))
end
local g = string.format('%d', c)
local ntable = tonumber(ARGV[2])
for i = 2, ntable + 1 do
  redis.call('SET', KEYS[i], g)
end
for i = ntable + 2, #KEYS do
  redis.call('SET', KEYS[i], g, 'PX', ARGV[3])
end
return redis.call('PUBLISH', ARGV[4], ARGV[1])
";

/// Take the lease if free, extend it if ours: 1 when held by ARGV[1] afterwards.
const LEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
";

const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What this instance does when the channel says something.
/// Told of an echo passed on by the instance reading a change source: (database, echo).
pub type OnEcho = Arc<dyn Fn(&str, &str) + Send + Sync>;

pub struct RedisTier {
    cfg: RedisConfig,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    breaker: Breaker,
    /// Distinguishes our own messages on the channel (already applied locally).
    instance: u64,
    /// Values of different upstream clusters must never meet, even in one Redis.
    scope: u64,
    publish: redis::Script,
    lease: redis::Script,
    release: redis::Script,
    /// A publish failed: others may hold entries our writes made stale.
    missed_publish: AtomicBool,
    /// When we stopped hearing the channel (`None` while subscribed).
    unheard_since: Mutex<Option<Instant>>,
    next_seq: AtomicU64,
    /// Our published messages still waiting for other instances' confirmations.
    acks: Mutex<HashMap<u64, Arc<AckWait>>>,
    /// Commits waiting to be published, for the task that publishes them in batches
    /// (started by the first publish, which runs inside the runtime, and again should it
    /// ever have ended).
    publisher: Mutex<Option<tokio::sync::mpsc::UnboundedSender<PublishRequest>>>,
}

/// One commit's invalidations, and who to tell once they are published (or given up on).
struct PublishRequest {
    invs: Vec<Invalidation>,
    done: tokio::sync::oneshot::Sender<()>,
}

/// Most commits published in one batch: bounds the script's key list and the message.
const MAX_BATCH: usize = 256;

/// Publishes whatever commits queued up while the previous batch was in flight, until the
/// tier is dropped.
async fn publisher(
    tier: std::sync::Weak<RedisTier>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<PublishRequest>,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let Some(tier) = tier.upgrade() else { return };
        let invs =
            Invalidation::coalesce(batch.iter_mut().flat_map(|r| std::mem::take(&mut r.invs)));
        tier.publish_batch(&invs).await;
        for r in batch.drain(..) {
            // The committer may have gone (its client disconnected): nobody to tell.
            let _ = r.done.send(());
        }
    }
}

/// Confirmations received for one published message.
#[derive(Default)]
struct AckWait {
    got: AtomicUsize,
    done: tokio::sync::Notify,
}

/// A `GET value` + `MGET generations` reply.
type ValueAndGens = (Option<Vec<u8>>, Vec<Option<u64>>);

/// Generations seen in Redis before a read went upstream; stored with its value.
pub struct RedisSnapshot {
    gens: Vec<u64>,
    taken: Instant,
}

pub enum L2Lookup {
    Hit {
        response: Bytes,
        rows: u64,
    },
    Miss(RedisSnapshot),
    /// Redis skipped or failed: no L2 for this read.
    Unavailable,
}

#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("redis.url: {0}")]
    Url(#[from] redis::RedisError),
}

impl RedisTier {
    pub fn new(cfg: RedisConfig, url: &str, upstream: &str) -> Result<Arc<Self>, TierError> {
        let client = redis::Client::open(url)?;
        Ok(Arc::new(RedisTier {
            breaker: Breaker::new(cfg.breaker_cooldown),
            cfg,
            client,
            conn: tokio::sync::Mutex::new(None),
            instance: rand::random::<u64>() | 1,
            scope: xxhash_rust::xxh3::xxh3_64(upstream.as_bytes()),
            publish: redis::Script::new(PUBLISH_SCRIPT),
            lease: redis::Script::new(LEASE_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
            missed_publish: AtomicBool::new(false),
            unheard_since: Mutex::new(Some(Instant::now())),
            next_seq: AtomicU64::new(1),
            acks: Mutex::default(),
            publisher: Mutex::default(),
        }))
    }

    fn prefix(&self) -> &str {
        &self.cfg.prefix
    }

    /// A connection, made on first use and after the breaker lets us try again.
    async fn conn(&self) -> Option<ConnectionManager> {
        if !self.breaker.allows() {
            return None;
        }
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Some(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.cfg.timeout)
            .set_response_timeout(self.cfg.timeout)
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            self.cfg.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        let c = self.settle(made, "connect timed out")?;
        *slot = Some(c.clone());
        Some(c)
    }

    /// A timed Redis result as an option; failures trip the breaker.
    fn settle<T>(
        &self,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        on_timeout: &str,
    ) -> Option<T> {
        match r {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed(on_timeout);
                None
            }
        }
    }

    fn failed(&self, why: &str) {
        metrics().redis_errors.inc();
        if self.breaker.trip() {
            tracing::warn!(
                error = why,
                "redis unavailable: serving from L1 and Postgres"
            );
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        cmd: impl AsyncFnOnce(ConnectionManager) -> redis::RedisResult<T>,
    ) -> Option<T> {
        let conn = self.conn().await?;
        let done = tokio::time::timeout(self.cfg.timeout, cmd(conn)).await;
        let v = self.settle(done, "operation timed out")?;
        if self.breaker.close() {
            tracing::info!("redis reachable again");
        }
        Some(v)
    }

    /// One round trip: the value if its generations are still current, else the current
    /// generations to store with the fill.
    pub async fn lookup(&self, key: CacheKey, deps: &[Dependency]) -> L2Lookup {
        let taken = Instant::now();
        let value_key = self.value_key(key);
        let gen_keys = codec::dependency_keys(self.prefix(), deps);
        let got: Option<ValueAndGens> = self
            .run(async |mut c| {
                redis::pipe()
                    .get(&value_key)
                    .mget(&gen_keys)
                    .query_async(&mut c)
                    .await
            })
            .await;
        let Some((value, current)) = got else {
            return L2Lookup::Unavailable;
        };
        let current: Vec<u64> = current.into_iter().map(|g| g.unwrap_or(0)).collect();
        if let Some(v) = value.as_deref().and_then(codec::decode_value)
            && v.gens == current
        {
            return L2Lookup::Hit {
                response: v.response,
                rows: v.rows,
            };
        }
        L2Lookup::Miss(RedisSnapshot {
            gens: current,
            taken,
        })
    }

    /// Store a fill in the background (the client does not wait for it).
    pub fn store(
        self: &Arc<Self>,
        key: CacheKey,
        snap: RedisSnapshot,
        response: Bytes,
        rows: u64,
        ttl: Duration,
    ) {
        // Row generation keys live 2 × max_ttl: a value older than max_ttl could outlive
        // the record of a write it missed, so it is not stored.
        if snap.taken.elapsed() >= self.cfg.max_ttl {
            return;
        }
        let ttl = ttl.min(self.cfg.max_ttl);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let value = codec::encode_value(&snap.gens, rows, &response);
            this.set_for(&this.value_key(key), value, ttl).await;
        });
    }

    /// Record committed invalidations in Redis and tell the other instances. Returns when
    /// done or given up on (each batch is bounded by `redis.timeout`, and one batch may be
    /// ahead of ours); failures are remembered and repaired with a global invalidation once
    /// Redis is back.
    ///
    /// Commits that arrive while a batch is in flight go out together in the next one: one
    /// script run, one message and one confirmation round for all of them instead of one
    /// each. Under concurrent writes that divides Redis's work and the subscribers' by the
    /// batch size, and no commit waits longer than the batch ahead of it.
    pub async fn publish(self: &Arc<Self>, invs: &[Invalidation]) {
        if invs.is_empty() {
            return;
        }
        let (done, published) = tokio::sync::oneshot::channel();
        let queued = self.publisher_queue().send(PublishRequest {
            invs: invs.to_vec(),
            done,
        });
        // `Err` only if the publisher ended without publishing our batch (it panicked, or
        // the runtime is shutting down): the others were not told, and are told to drop
        // everything when Redis is next heard.
        if queued.is_err() || published.await.is_err() {
            self.missed_publish.store(true, Ordering::SeqCst);
        }
    }

    /// The publisher's queue, starting the publisher if it is not running.
    fn publisher_queue(self: &Arc<Self>) -> tokio::sync::mpsc::UnboundedSender<PublishRequest> {
        let mut slot = self
            .publisher
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match slot.as_ref() {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(publisher(Arc::downgrade(self), rx));
                *slot = Some(tx.clone());
                tx
            }
        }
    }

    /// One batch: set the generation keys of every invalidation in `invs`, publish them as
    /// one message, and wait for the other instances to confirm it.
    async fn publish_batch(&self, invs: &[Invalidation]) {
        let prefix = self.prefix();
        let mut table_keys = Vec::new();
        let mut row_keys = Vec::new();
        for inv in invs {
            let (t, r) = codec::bumped_keys(prefix, inv);
            table_keys.extend(t);
            row_keys.extend(r);
        }
        // Row keys are distinct already: a coalesced batch names each key once.
        table_keys.sort();
        table_keys.dedup();
        let id = codec::MessageId {
            sender: self.instance,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        let message = codec::encode_message(id, invs);
        let wait = Arc::new(AckWait::default());
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.seq, Arc::clone(&wait));
        let subscribed = self.is_subscribed();
        let row_ttl_ms = (self.cfg.max_ttl * 2 + Duration::from_secs(60)).as_millis() as u64;
        let n_table = table_keys.len();
        let clock = codec::clock_key(prefix);
        let channel = codec::channel(prefix);
        let done: Option<i64> = self
            .run(async |mut c| {
                let mut inv = self.publish.prepare_invoke();
                inv.key(&clock);
                for k in table_keys.iter().chain(row_keys.iter()) {
                    inv.key(k);
                }
                inv.arg(&message).arg(n_table).arg(row_ttl_ms).arg(&channel);
                inv.invoke_async(&mut c).await
            })
            .await;
        match done {
            None => self.missed_publish.store(true, Ordering::SeqCst),
            Some(receivers) => {
                // Our own subscription received it too (and does not confirm).
                let others = (receivers.max(0) as usize).saturating_sub(usize::from(subscribed));
                self.await_acks(&wait, others).await;
            }
        }
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id.seq);
    }

    /// Pass on an echo another instance sent through the change source of database `db`
    /// (see `invalidation::catch_up`). Lost if Redis cannot take it: that instance's
    /// client then waits out `invalidation.max_lag`.
    pub async fn publish_echo(&self, db: &str, echo: &str) {
        let channel = codec::echo_channel(self.prefix());
        self.send(&channel, &format!("{echo}\n{db}")).await;
    }

    /// Until `needed` instances confirmed, or `redis.timeout` passed (an instance that slow
    /// is then as stale as the time it takes; counted as a Redis error).
    async fn await_acks(&self, wait: &AckWait, needed: usize) {
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        loop {
            let notified = wait.done.notified();
            if wait.got.load(Ordering::SeqCst) >= needed {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                metrics().redis_errors.inc();
                tracing::warn!(
                    needed,
                    got = wait.got.load(Ordering::SeqCst),
                    "other instances did not confirm an invalidation in time"
                );
                return;
            }
        }
    }

    fn on_ack(&self, payload: &str) {
        let Some(id) = codec::decode_ack(payload) else {
            return;
        };
        if id.sender != self.instance {
            return;
        }
        let wait = self
            .acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id.seq)
            .cloned();
        if let Some(w) = wait {
            w.got.fetch_add(1, Ordering::SeqCst);
            w.done.notify_waiters();
        }
    }

    /// Tell the sender we applied its message (in the background: the subscriber must keep
    /// reading).
    fn confirm(self: &Arc<Self>, id: codec::MessageId) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let channel = codec::ack_channel(this.prefix());
            this.send(&channel, &codec::encode_ack(id)).await;
        });
    }

    /// PUBLISH `message` on `channel`, best effort (a failure counts against the breaker).
    async fn send(&self, channel: &str, message: &str) {
        let _: Option<i64> = self
            .run(async |mut c| {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async(&mut c)
                    .await
            })
            .await;
    }

    /// A key under this tier's prefix.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix())
    }

    /// This instance's name in leases.
    pub fn instance_name(&self) -> String {
        format!("{:016x}", self.instance)
    }

    /// Take or extend the lease `key` for `ttl`: `Some(true)` when this instance holds it,
    /// `Some(false)` when another does, `None` when Redis cannot be asked.
    pub async fn hold_lease(&self, key: &str, ttl: Duration) -> Option<bool> {
        let me = self.instance_name();
        let ms = ttl.as_millis().max(1) as u64;
        let held: Option<i64> = self
            .run(async |mut c| {
                self.lease
                    .key(key)
                    .arg(&me)
                    .arg(ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        held.map(|h| h == 1)
    }

    /// Give the lease up now (if held), so another instance need not wait for it to expire.
    pub async fn release_lease(&self, key: &str) {
        let me = self.instance_name();
        let _: Option<i64> = self
            .run(async |mut c| self.release.key(key).arg(&me).invoke_async(&mut c).await)
            .await;
    }

    /// `SET key value PX ttl`; false when Redis could not be told.
    pub async fn set_for(&self, key: &str, value: impl AsRef<[u8]>, ttl: Duration) -> bool {
        let ms = ttl.as_millis().max(1) as u64;
        let done: Option<()> = self
            .run(async |mut c| {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value.as_ref())
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await;
        done.is_some()
    }

    /// `GET key`: `None` when Redis cannot be asked, `Some(None)` when the key is absent.
    pub async fn get_string(&self, key: &str) -> Option<Option<String>> {
        self.run(async |mut c| redis::cmd("GET").arg(key).query_async(&mut c).await)
            .await
    }

    fn value_key(&self, key: CacheKey) -> String {
        format!("{}v:{:016x}:{:032x}", self.prefix(), self.scope, key.0)
    }

    /// Whether the channel is being heard, for health and tests.
    pub fn is_subscribed(&self) -> bool {
        self.unheard_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    pub fn breaker_open(&self) -> bool {
        !self.breaker.allows()
    }

    /// Listen to the channel for as long as the process lives: apply other instances'
    /// invalidations to `gens`, suspend L1 when deaf for too long, resync when back.
    /// `on_schema_change` runs when another instance reports DDL (see
    /// [`TableId::SCHEMA_CHANGED`](crate::cache::TableId::SCHEMA_CHANGED)).
    pub async fn subscribe_forever(
        self: Arc<Self>,
        gens: Arc<Generations>,
        on_schema_change: Arc<dyn Fn() + Send + Sync>,
        on_echo: OnEcho,
    ) {
        tokio::spawn(Arc::clone(&self).watchdog(Arc::clone(&gens)));
        let channel = codec::channel(self.prefix());
        let ack_channel = codec::ack_channel(self.prefix());
        let echo_channel = codec::echo_channel(self.prefix());
        let mut backoff = Duration::from_millis(50);
        loop {
            let attempt = tokio::time::timeout(self.cfg.timeout * 4, async {
                let mut ps = self.client.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                ps.subscribe(&ack_channel).await?;
                ps.subscribe(&echo_channel).await?;
                Ok::<_, redis::RedisError>(ps)
            })
            .await;
            let pubsub = match attempt {
                Ok(Ok(ps)) => ps,
                Ok(Err(e)) => {
                    metrics().redis_errors.inc();
                    tracing::debug!(error = %e, "redis subscription failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(_) => {
                    metrics().redis_errors.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            {
                // Under the watchdog's lock, so it cannot suspend right after this resume.
                let mut unheard = self
                    .unheard_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                *unheard = None;
                // Whatever L1 holds may have missed invalidations while we were deaf.
                gens.resume();
            }
            metrics().cache_suspended.set(0);
            metrics().redis_subscribed.set(1);
            tracing::info!(channel, "listening for invalidations from other instances");
            if self.missed_publish.swap(false, Ordering::SeqCst) {
                // Our writes during the outage never reached the others: make them drop all.
                self.publish(&[Invalidation::All]).await;
            }
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let payload = msg.get_payload::<String>();
                if msg.get_channel_name() == ack_channel {
                    if let Ok(p) = payload {
                        self.on_ack(&p);
                    }
                    continue;
                }
                if msg.get_channel_name() == echo_channel {
                    if let Some((echo, db)) =
                        payload.as_deref().ok().and_then(|p| p.split_once('\n'))
                    {
                        on_echo(db, echo);
                    }
                    continue;
                }
                let Ok(payload) = payload else {
                    gens.bump_all();
                    continue;
                };
                let (id, invs) = codec::decode_message(&payload);
                if id.is_some_and(|id| id.sender == self.instance) {
                    continue;
                }
                for inv in &invs {
                    gens.invalidate(inv);
                }
                if invs.iter().any(|i| {
                    matches!(i, Invalidation::Wide(t) if *t == crate::cache::TableId::SCHEMA_CHANGED)
                }) {
                    on_schema_change();
                }
                metrics().invalidated(InvalidationOrigin::Redis, invs.len() as u64);
                if let Some(id) = id {
                    self.confirm(id);
                }
            }
            *self
                .unheard_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            metrics().redis_subscribed.set(0);
            tracing::warn!("lost the redis invalidation channel; reconnecting");
        }
    }

    /// Suspends L1 once the channel has been unheard for longer than the bound.
    async fn watchdog(self: Arc<Self>, gens: Arc<Generations>) {
        let tick = (self.cfg.unheard_bound / 4).max(Duration::from_millis(5));
        loop {
            tokio::time::sleep(tick).await;
            let unheard = self
                .unheard_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(t) = *unheard
                && t.elapsed() >= self.cfg.unheard_bound
                && !gens.is_suspended()
            {
                gens.suspend();
                drop(unheard);
                metrics().cache_suspended.set(1);
                tracing::warn!(
                    bound = ?self.cfg.unheard_bound,
                    "invalidations from other instances unheard: L1 suspended until redis is back"
                );
            }
            metrics()
                .redis_breaker_open
                .set(i64::from(!self.breaker.allows()));
        }
    }
}
