//! Single-flight fills: the first miss of a key gets the [`FillGuard`]; concurrent misses
//! of the same key wait for it ([`Pending`]) instead of querying upstream too. A filler
//! that fails, is too slow or produced a stale result never leaves waiters stuck: they
//! are woken (or time out) and go upstream themselves.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::l1::{Entry, Inner, Lookup};
use super::{BuildMix, CacheKey, Generations, Snapshot};

/// The miss path of [`L1::lookup`](super::L1::lookup): join the fill in flight for this
/// key, or start one.
#[cold]
pub(super) fn miss(
    this: &Arc<Inner>,
    key: CacheKey,
    gens: &Generations,
    found_stale: bool,
    fills_before: u64,
) -> Lookup {
    let shard = this.shard(key);
    let mut flights = shard.flights.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(flight) = flights.get(&key) {
        if flight.started.elapsed() < this.wait_timeout {
            flight.wanted.store(true, Relaxed);
            return Lookup::Wait(Pending {
                inner: Arc::clone(this),
                key,
                flight: Arc::clone(flight),
                found_stale,
            });
        }
        // The filler is overdue: go upstream alongside it rather than queue behind it.
        return Lookup::Miss(FillGuard::follower(this, key, found_stale));
    }
    // A fill may have completed between our cache read and taking the lock (fillers
    // insert, then count, then leave the in-flight map). Only then is a second cache read
    // worth its cost.
    if shard.fills.load(SeqCst) != fills_before
        && let Some(entry) = this.cache.get(&key)
        && gens.is_current(&entry.snapshot)
    {
        return Lookup::Hit(entry);
    }
    let flight = Arc::new(Flight {
        started: Instant::now(),
        outcome: OnceLock::new(),
        done: Notify::new(),
        wanted: AtomicBool::new(false),
    });
    flights.insert(key, Arc::clone(&flight));
    // A key found stale was cached before: it repeats.
    let admit = found_stale
        || this
            .doorkeeper
            .as_ref()
            .is_none_or(|d| d.missed_before(key));
    Lookup::Miss(FillGuard {
        inner: Arc::clone(this),
        key,
        flight: Some(flight),
        found_stale,
        admit,
    })
}

/// The fills in flight for a share of the keys.
pub(super) struct FlightShard {
    pub(super) flights: Mutex<HashMap<CacheKey, Arc<Flight>, BuildMix>>,
    /// Entries stored by fills of these keys so far: a miss that saw no change since its
    /// cache read knows no fill completed in between.
    pub(super) fills: AtomicU64,
}

impl FlightShard {
    pub(super) fn new(hasher: BuildMix) -> Self {
        Self {
            flights: Mutex::new(HashMap::with_hasher(hasher)),
            fills: AtomicU64::new(0),
        }
    }
}

/// A fill in progress that others can wait for.
pub(super) struct Flight {
    started: Instant,
    /// `Some(entry)` if stored, `None` if the filler gave up or the fill was stale.
    outcome: OnceLock<Option<Arc<Entry>>>,
    done: Notify,
    /// Someone waited for this fill: the key repeats, store it whatever the doorkeeper says.
    wanted: AtomicBool,
}

/// The answer after waiting: never "wait again".
pub enum Resolved {
    Hit(Arc<Entry>),
    Miss(FillGuard),
}

/// What [`FillGuard::fill`] did, for metrics and the adaptive bypass.
#[must_use]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FillOutcome {
    Stored,
    /// A generation moved between the snapshot and the fill: the result may predate a
    /// committed write, so it was not stored.
    Stale,
    /// A zero TTL stores nothing.
    NoTtl,
    /// The key's first miss (and nobody waited for it): not stored, see
    /// [`super::doorkeeper`].
    NotAdmitted,
}

/// The right (and duty) to fill one key after a miss. Dropping it without filling wakes
/// whoever waits for this fill; they then go upstream themselves.
pub struct FillGuard {
    inner: Arc<Inner>,
    key: CacheKey,
    /// `Some` if others may be waiting for this fill.
    flight: Option<Arc<Flight>>,
    found_stale: bool,
    /// Store the result even if nobody waited for it.
    admit: bool,
}

impl FillGuard {
    /// Followers went upstream after waiting for a fill: their key repeats.
    pub(super) fn follower(inner: &Arc<Inner>, key: CacheKey, found_stale: bool) -> Self {
        Self {
            inner: Arc::clone(inner),
            key,
            flight: None,
            found_stale,
            admit: true,
        }
    }

    /// Stores the entry unless a generation it depends on moved since its snapshot (the
    /// fill race: a read that started before a write committed must not stay cached).
    pub fn fill(mut self, mut entry: Entry, ttl: Duration, gens: &Generations) -> FillOutcome {
        if let Some(refused) = self.refusal(&entry.snapshot, ttl, gens) {
            self.finish(None);
            return refused;
        }
        entry.ttl = ttl;
        // A TTL too long for the clock is as good as none.
        let now = std::time::Instant::now();
        entry.expires = now
            .checked_add(ttl)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        let entry = Arc::new(entry);
        // A bump landing right here leaves a stale entry in the map; harmless, because
        // every hit re-checks the snapshot.
        self.inner.cache.insert(self.key, Arc::clone(&entry));
        self.inner.shard(self.key).fills.fetch_add(1, SeqCst);
        self.finish(Some(entry));
        FillOutcome::Stored
    }

    /// Why [`FillGuard::fill`] would not store a result with this snapshot and TTL now, if
    /// it would not: lets the caller skip building an entry that would be thrown away (most
    /// first misses, under `admit_on_second_miss`). The refusals are checked in this order.
    pub fn refusal(
        &self,
        snapshot: &Snapshot,
        ttl: Duration,
        gens: &Generations,
    ) -> Option<FillOutcome> {
        if ttl.is_zero() {
            Some(FillOutcome::NoTtl)
        } else if !gens.is_current(snapshot) {
            Some(FillOutcome::Stale)
        } else if !self.admit && !self.flight.as_ref().is_some_and(|f| f.wanted.load(Relaxed)) {
            // A waiter joining right now finds no entry and goes upstream itself: one
            // uncoalesced query, never a wrong answer.
            Some(FillOutcome::NotAdmitted)
        } else {
            None
        }
    }

    /// Store the result even on the key's first miss (the caller knows it repeats: another
    /// instance cached it).
    pub fn admit(&mut self) {
        self.admit = true;
    }

    /// Whether this miss replaced an entry that was found stale (an invalidation observed).
    pub fn found_stale(&self) -> bool {
        self.found_stale
    }

    /// Whether other lookups of this key are coalesced behind this fill.
    pub fn leads(&self) -> bool {
        self.flight.is_some()
    }

    fn finish(&mut self, outcome: Option<Arc<Entry>>) {
        let Some(flight) = self.flight.take() else {
            return;
        };
        {
            let shard = self.inner.shard(self.key);
            let mut flights = shard.flights.lock().unwrap_or_else(PoisonError::into_inner);
            if flights
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &flight))
            {
                flights.remove(&self.key);
            }
        }
        let _ = flight.outcome.set(outcome);
        flight.done.notify_waiters();
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// A lookup coalesced behind another task's fill.
pub struct Pending {
    inner: Arc<Inner>,
    key: CacheKey,
    flight: Arc<Flight>,
    found_stale: bool,
}

impl Pending {
    /// Waits for the fill (at most until `wait_timeout` after it started). Returns the
    /// filled entry if it is still fresh, otherwise a guard to go upstream with.
    pub async fn wait(self, gens: &Generations) -> Resolved {
        let mut notified = pin!(self.flight.done.notified());
        // Register before checking the outcome so a fill finishing in between still wakes us.
        notified.as_mut().enable();
        if self.flight.outcome.get().is_none() {
            let deadline =
                tokio::time::Instant::from_std(self.flight.started + self.inner.wait_timeout);
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.inner.wait_timeouts.fetch_add(1, Relaxed);
                return Resolved::Miss(FillGuard::follower(
                    &self.inner,
                    self.key,
                    self.found_stale,
                ));
            }
        }
        match self.flight.outcome.get() {
            Some(Some(entry)) if gens.is_current(&entry.snapshot) => {
                Resolved::Hit(Arc::clone(entry))
            }
            _ => Resolved::Miss(FillGuard::follower(&self.inner, self.key, self.found_stale)),
        }
    }

    pub fn found_stale(&self) -> bool {
        self.found_stale
    }
}
