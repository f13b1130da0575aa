//! L1: the in-process store of raw response messages, bounded by bytes, with a TTL per
//! entry; misses go through the single-flight fills of [`super::fill`].
//!
//! Freshness is not this store's to decide: every hit is checked against [`Generations`],
//! and a stale entry is dropped and reported as a miss. The check at fill time only keeps
//! known-stale results out (and lets the caller count them).

use std::sync::atomic::{
    AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::sync::Cache;

use super::bypass::Tracked;
use super::doorkeeper::Doorkeeper;
use super::fill::{self, FillGuard, FlightShard, Pending, Resolved};
use super::front::Front;
use super::{BuildMix, CacheKey, Generations, Snapshot};

/// Bookkeeping bytes charged per entry on top of the response: the entry itself and
/// moka's per-entry nodes (measured roughly; the point is that tiny entries are not free).
const ENTRY_OVERHEAD: usize = size_of::<Entry>() + 160;
/// Shards of the in-flight map: misses of different keys rarely share a lock.
const FLIGHT_SHARDS: usize = 64;

/// One cached result.
#[derive(Debug)]
pub struct Entry {
    /// The raw protocol messages to replay (RowDescription, DataRow…, CommandComplete).
    pub response: Bytes,
    pub rows: u64,
    pub(super) snapshot: Snapshot,
    pub(super) ttl: Duration,
    /// When the TTL runs out (set with `ttl` when the entry is stored; moka counts from its
    /// insert, a moment later).
    pub(super) expires: Instant,
    /// The [`crate::catalog::Catalog::epoch`] the read was planned with (0: unknown).
    catalog_epoch: u64,
    /// The statistics the adaptive bypass keeps of the query that filled it, for hits
    /// found without analysing the query (see [`Entry::tracked`]).
    tracked: Option<Tracked>,
}

impl Entry {
    /// `snapshot` must have been taken before the query that produced `response` was sent.
    pub fn new(response: Bytes, rows: u64, snapshot: Snapshot) -> Self {
        Self {
            response,
            rows,
            snapshot,
            ttl: Duration::ZERO,
            expires: Instant::now(),
            catalog_epoch: 0,
            tracked: None,
        }
    }

    /// Records the adaptive bypass's handle on the query's statistics.
    pub fn tracked_by(mut self, tracked: Option<Tracked>) -> Self {
        self.tracked = tracked;
        self
    }

    /// Where a hit on this entry is counted, when the adaptive bypass is on.
    pub fn tracked(&self) -> Option<&Tracked> {
        self.tracked.as_ref()
    }

    /// Records the epoch of the catalog the read was planned with.
    pub fn planned_with(mut self, catalog_epoch: u64) -> Self {
        self.catalog_epoch = catalog_epoch;
        self
    }

    pub fn catalog_epoch(&self) -> u64 {
        self.catalog_epoch
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The TTL given at fill time.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn weight(&self) -> u32 {
        let bytes = self.response.len() + self.snapshot.heap_size() + ENTRY_OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct L1Config {
    /// Upper bound on the weighted size (response bytes plus overhead).
    pub max_bytes: u64,
    /// How long after a fill started others wait for it before going upstream themselves.
    /// Bounds the cost of a stuck filler for everyone else. Generous: a waiter's own query
    /// would take as long as the filler's, and a filler that gives up wakes its waiters.
    pub wait_timeout: Duration,
    /// Store a result only on its key's second miss (see [`super::doorkeeper`]); off: on
    /// the first.
    pub admit_on_second_miss: bool,
}

impl Default for L1Config {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            wait_timeout: Duration::from_secs(30),
            admit_on_second_miss: false,
        }
    }
}

/// The L1 store. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct L1 {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) cache: Cache<CacheKey, Arc<Entry>, BuildMix>,
    flights: Box<[FlightShard]>,
    pub(super) wait_timeout: Duration,
    /// `Some` when results are admitted on their key's second miss.
    pub(super) doorkeeper: Option<Doorkeeper>,
    stale_found: AtomicU64,
    pub(super) wait_timeouts: AtomicU64,
    /// Recent small hits, in front of moka (see [`super::front`]).
    front: Option<Front>,
}

/// The answer to [`L1::lookup`].
pub enum Lookup {
    /// Fresh entry: replay `response`.
    Hit(Arc<Entry>),
    /// Go upstream, then [`FillGuard::fill`] (or drop the guard if the result is not
    /// cacheable: waiters are woken and go upstream themselves).
    Miss(FillGuard),
    /// Another task is filling this key: [`Pending::wait`] for it.
    Wait(Pending),
}

struct PerEntryTtl;

impl Expiry<CacheKey, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _: &CacheKey, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(e.ttl)
    }

    // Replacing an entry must not inherit the old one's remaining time (moka's default).
    fn expire_after_update(
        &self,
        _: &CacheKey,
        e: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.ttl)
    }
}

impl L1 {
    pub fn new(max_bytes: u64) -> Self {
        Self::with_config(L1Config {
            max_bytes,
            ..L1Config::default()
        })
    }

    pub fn with_config(config: L1Config) -> Self {
        let hasher = BuildMix::new();
        // An eighth of the budget is the front's worst case; moka gets the rest.
        let front = Front::for_budget(config.max_bytes / 8);
        let front_bytes = front.as_ref().map_or(0, Front::worst_case_bytes);
        let cache = Cache::builder()
            .max_capacity(config.max_bytes.saturating_sub(front_bytes))
            .weigher(|_, e: &Arc<Entry>| e.weight())
            .expire_after(PerEntryTtl)
            .build_with_hasher(hasher.clone());
        let flights = (0..FLIGHT_SHARDS)
            .map(|_| FlightShard::new(hasher.clone()))
            .collect();
        Self {
            inner: Arc::new(Inner {
                cache,
                flights,
                wait_timeout: config.wait_timeout,
                doorkeeper: config.admit_on_second_miss.then(Doorkeeper::new),
                stale_found: AtomicU64::new(0),
                wait_timeouts: AtomicU64::new(0),
                front,
            }),
        }
    }

    /// A hit only if the entry's snapshot is still current; a stale entry makes the lookup a
    /// miss, whose fill replaces it. Synchronous: a hit is one map read, a few atomic
    /// loads and an `Arc` clone.
    #[inline]
    pub fn lookup(&self, key: CacheKey, gens: &Generations) -> Lookup {
        let front = self.inner.front.as_ref();
        if let Some((f, entry)) = front.and_then(|f| Some((f, f.get(key)?))) {
            if gens.is_current(&entry.snapshot) {
                return Lookup::Hit(entry);
            }
            f.forget(key, &entry);
        }
        let mut found_stale = false;
        let fills_before = self.inner.shard(key).fills.load(SeqCst);
        // A key never missed is not in moka: spare its lookup (and the bookkeeping moka
        // does on every read), which is most of what a miss of a uniform workload costs.
        if self
            .inner
            .doorkeeper
            .as_ref()
            .is_some_and(|d| !d.maybe_missed(key))
        {
            return fill::miss(&self.inner, key, gens, false, fills_before);
        }
        if let Some(entry) = self.inner.cache.get(&key) {
            if gens.is_current(&entry.snapshot) {
                if let Some(f) = front {
                    f.put(key, &entry);
                }
                return Lookup::Hit(entry);
            }
            self.inner.found_stale(key, &entry);
            found_stale = true;
        }
        fill::miss(&self.inner, key, gens, found_stale, fills_before)
    }

    /// A fresh entry for `key`, if there is one; unlike [`L1::lookup`] a miss leaves no
    /// trace (no fill is started, nothing is counted), for callers that then take the full
    /// path, which finds a stale entry stale again.
    #[inline]
    pub fn peek(&self, key: CacheKey, gens: &Generations) -> Option<Arc<Entry>> {
        let front = self.inner.front.as_ref();
        if let Some(entry) = front.and_then(|f| f.get(key)) {
            return gens.is_current(&entry.snapshot).then_some(entry);
        }
        if self
            .inner
            .doorkeeper
            .as_ref()
            .is_some_and(|d| !d.maybe_missed(key))
        {
            return None;
        }
        let entry = self.inner.cache.get(&key)?;
        if !gens.is_current(&entry.snapshot) {
            return None;
        }
        if let Some(f) = front {
            f.put(key, &entry);
        }
        Some(entry)
    }

    /// [`L1::lookup`], waiting for a concurrent fill if there is one.
    pub async fn get(&self, key: CacheKey, gens: &Generations) -> Resolved {
        match self.lookup(key, gens) {
            Lookup::Hit(entry) => Resolved::Hit(entry),
            Lookup::Miss(guard) => Resolved::Miss(guard),
            Lookup::Wait(pending) => pending.wait(gens).await,
        }
    }

    /// Entries currently held (approximate until [`L1::run_pending_tasks`]).
    pub fn entry_count(&self) -> u64 {
        self.inner.cache.entry_count()
    }

    /// Weighted bytes currently held (approximate until [`L1::run_pending_tasks`]).
    pub fn weighted_size(&self) -> u64 {
        self.inner.cache.weighted_size()
    }

    /// Lookups that found their entry stale (each then a miss).
    pub fn stale_found(&self) -> u64 {
        self.inner.stale_found.load(Relaxed)
    }

    /// Waits that gave up on a slow filler and went upstream.
    pub fn wait_timeouts(&self) -> u64 {
        self.inner.wait_timeouts.load(Relaxed)
    }

    /// Fills in progress that others may wait for.
    pub fn fills_in_flight(&self) -> usize {
        let shards = self.inner.flights.iter();
        shards
            .map(|s| {
                s.flights
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len()
            })
            .sum()
    }

    /// Drops every entry (FLUSH). Freshness does not need it (`bump_all` suffices); memory
    /// does.
    pub fn clear(&self) {
        self.inner.cache.invalidate_all();
        if let Some(f) = &self.inner.front {
            f.clear();
        }
    }

    /// Applies moka's deferred evictions and counters now (tests, metrics scrapes).
    pub fn run_pending_tasks(&self) {
        self.inner.cache.run_pending_tasks();
    }
}

impl Inner {
    pub(super) fn shard(&self, key: CacheKey) -> &FlightShard {
        &self.flights[(key.0 as usize) % FLIGHT_SHARDS]
    }

    /// A stale entry stays in moka: the miss that found it fills the key again, and that
    /// insert replaces it (an entry's generations only move on, so it is never served
    /// again); if that fill stores nothing, it ages out by TTL or size like any entry.
    /// Removing it first cost moka's entry API, which pins and flushes the epoch collector:
    /// about 8,000 instructions per stale lookup, 7 % of all of W5's on a warm cache.
    #[cold]
    fn found_stale(&self, key: CacheKey, stale: &Arc<Entry>) {
        self.stale_found.fetch_add(1, Relaxed);
        if let Some(f) = &self.front {
            f.forget(key, stale);
        }
    }
}

#[cfg(test)]
impl L1 {
    pub(super) fn inner_for_tests(&self) -> &Arc<Inner> {
        &self.inner
    }
}
