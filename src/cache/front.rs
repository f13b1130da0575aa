//! A small set-associative front of recent L1 hits, for the hottest small results.
//!
//! A hit through moka walks its concurrent hash table and records the read for its
//! eviction policy (and now and then runs that policy's housekeeping on the reader's
//! thread): measured at ~12 % of the proxy's CPU under `pgbench -M prepared` on a hot set.
//! The front picks a set of two slots by key hash, holding the last entries hit there: a
//! hit in it is one uncontended lock and a compare or two.
//!
//! It never decides freshness. A front hit is only offered when the slot holds this exact
//! key, was filled since the last [`Front::clear`], and the entry's own TTL has not run out;
//! the caller then checks the entry's snapshot against the generations exactly as for a
//! moka hit. So the front can serve an entry moka has already evicted (for memory), never
//! one that a write made stale or whose TTL passed.
//!
//! Memory: the front may keep entries moka dropped alive. Only responses up to
//! [`MAX_RESPONSE`] bytes go in, and the slot count is chosen so that the front's worst
//! case fits in the share of the L1 byte budget set aside for it (see [`Front::for_budget`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::CacheKey;
use super::l1::Entry;

/// Largest response kept in the front: point reads, not reports.
pub(super) const MAX_RESPONSE: usize = 1024;
/// What one slot can hold at most, overhead included (for the budget).
const SLOT_WORST_CASE: u64 = MAX_RESPONSE as u64 + 256;
/// Most slots: enough for a hot set of some ten thousand keys.
const MAX_SLOTS: usize = 1 << 15;
/// Slots per set. Two keys of a hot set that share a set then both stay (direct-mapped,
/// a W1 hot set of 10,000 keys in 16,384 slots sent a quarter of its hits to moka).
const WAYS: usize = 2;

struct Slot {
    key: CacheKey,
    entry: Arc<Entry>,
    epoch: u64,
}

/// One set: its ways, most recently used first.
type Set = [Option<Slot>; WAYS];

pub(super) struct Front {
    sets: Box<[Mutex<Set>]>,
    /// Per way of each set, a tag of the key it holds (0: none), read without the lock so
    /// that a miss, by far the most common outcome for keys that are not hot, takes no lock.
    tags: Box<[AtomicU64]>,
    /// Bumped by `clear`: slots filled before it are ignored.
    epoch: AtomicU64,
}

impl Front {
    /// A front whose worst case fits in `budget` bytes, or `None` if not even a few slots
    /// would (tiny caches do without).
    pub(super) fn for_budget(budget: u64) -> Option<Self> {
        let fit = usize::try_from(budget / SLOT_WORST_CASE).unwrap_or(usize::MAX);
        let sets = fit.min(MAX_SLOTS) / WAYS;
        if sets * WAYS < 64 {
            return None;
        }
        Some(Self {
            sets: (0..sets).map(|_| Mutex::new(Default::default())).collect(),
            tags: (0..sets * WAYS).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
        })
    }

    /// The most memory the front can hold on to.
    pub(super) fn worst_case_bytes(&self) -> u64 {
        (self.sets.len() * WAYS) as u64 * SLOT_WORST_CASE
    }

    fn set_index(&self, key: CacheKey) -> usize {
        // The high half of the key (the low bits already pick doorkeeper bits and flight
        // shards), scaled to the set count: any count, not only powers of two, so the
        // whole budget is used.
        let high = (key.0 >> 64) as u64;
        ((u128::from(high) * self.sets.len() as u128) >> 64) as usize
    }

    /// Never 0 (the empty tag). A tag shared by two keys only costs a lock and a compare.
    fn tag(key: CacheKey) -> u64 {
        key.0 as u64 | 1
    }

    fn lock(&self, set: usize) -> std::sync::MutexGuard<'_, Set> {
        self.sets[set]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tags follow their slots; called under the set's lock.
    fn retag(&self, set: usize, ways: &Set) {
        for (w, slot) in ways.iter().enumerate() {
            let tag = slot.as_ref().map_or(0, |s| Self::tag(s.key));
            self.tags[set * WAYS + w].store(tag, Relaxed);
        }
    }

    /// The entry last hit under `key`, if its set still holds it, no clear happened since
    /// and its TTL has not run out. The caller must still check its snapshot.
    pub(super) fn get(&self, key: CacheKey) -> Option<Arc<Entry>> {
        let set = self.set_index(key);
        let tag = Self::tag(key);
        if !self.tags[set * WAYS..(set + 1) * WAYS]
            .iter()
            .any(|t| t.load(Relaxed) == tag)
        {
            return None;
        }
        let epoch = self.epoch.load(Relaxed);
        let mut ways = self.lock(set);
        let w = ways
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.key == key))?;
        let s = ways[w].as_ref()?;
        if s.epoch != epoch || Instant::now() >= s.entry.expires {
            return None;
        }
        let entry = Arc::clone(&s.entry);
        if w > 0 {
            // Most recently used first: the other way is the one to give up next.
            ways.swap(0, w);
            self.retag(set, &ways);
        }
        Some(entry)
    }

    /// Remember a fresh hit (small responses only).
    pub(super) fn put(&self, key: CacheKey, entry: &Arc<Entry>) {
        if entry.response.len() > MAX_RESPONSE {
            return;
        }
        let epoch = self.epoch.load(Relaxed);
        let set = self.set_index(key);
        let mut ways = self.lock(set);
        let w = ways
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.key == key))
            .unwrap_or(WAYS - 1);
        ways[w] = Some(Slot {
            key,
            entry: Arc::clone(entry),
            epoch,
        });
        ways[..=w].rotate_right(1);
        // Under the lock, so the tags always name the keys the set last got.
        self.retag(set, &ways);
    }

    /// Forget `key`'s slot if it holds `entry` (found stale: free its memory now).
    pub(super) fn forget(&self, key: CacheKey, entry: &Arc<Entry>) {
        let set = self.set_index(key);
        let mut ways = self.lock(set);
        if let Some(w) = ways.iter().position(|s| {
            s.as_ref()
                .is_some_and(|s| s.key == key && Arc::ptr_eq(&s.entry, entry))
        }) {
            ways[w] = None;
            self.retag(set, &ways);
        }
    }

    /// Forget everything (FLUSH).
    pub(super) fn clear(&self) {
        // FLUSH is about memory, not freshness (the generations see to that): an entry
        // that a concurrent hit puts back right after this is still checked like any other.
        self.epoch.fetch_add(1, Relaxed);
        for (i, set) in self.sets.iter().enumerate() {
            let mut ways = set.lock().unwrap_or_else(PoisonError::into_inner);
            *ways = Default::default();
            self.retag(i, &ways);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Dependency, Generations, TableId};
    use bytes::Bytes;
    use std::time::Duration;

    fn entry(body: usize, ttl: Duration) -> Arc<Entry> {
        let gens = Generations::new(64);
        let mut e = Entry::new(
            Bytes::from(vec![b'D'; body]),
            1,
            gens.snapshot(&[Dependency::AnyOf(TableId(1))]),
        );
        e.expires = Instant::now() + ttl;
        Arc::new(e)
    }

    /// Keys with the same `set` (below 16) share a set (same high half) but differ.
    fn key(set: u64, low: u64) -> CacheKey {
        CacheKey((u128::from(set << 60) << 64) | u128::from(low))
    }

    #[test]
    fn a_set_answers_only_for_the_keys_it_holds() {
        let f = Front::for_budget(1 << 20).expect("room for a front");
        let e = entry(10, Duration::from_secs(60));
        f.put(key(3, 1), &e);
        assert!(f.get(key(3, 1)).is_some_and(|got| Arc::ptr_eq(&got, &e)));
        assert!(f.get(key(3, 2)).is_none(), "same set, other key");
        assert!(f.get(key(4, 1)).is_none(), "other set");
        let other = entry(10, Duration::from_secs(60));
        f.put(key(3, 2), &other);
        assert!(f.get(key(3, 1)).is_some(), "two ways: both kept");
        assert!(f.get(key(3, 2)).is_some());
        f.forget(key(3, 2), &e);
        assert!(f.get(key(3, 2)).is_some(), "forget needs the same entry");
        f.forget(key(3, 2), &other);
        assert!(f.get(key(3, 2)).is_none());
    }

    #[test]
    fn a_full_set_gives_up_its_least_recently_used_way() {
        let f = Front::for_budget(1 << 20).expect("room for a front");
        let e = entry(10, Duration::from_secs(60));
        f.put(key(7, 1), &e);
        f.put(key(7, 2), &e);
        assert!(f.get(key(7, 1)).is_some(), "used: now the most recent");
        f.put(key(7, 3), &e);
        assert!(f.get(key(7, 2)).is_none(), "least recently used, gone");
        assert!(f.get(key(7, 1)).is_some());
        assert!(f.get(key(7, 3)).is_some());
    }

    #[test]
    fn expired_large_and_flushed_entries_are_not_offered() {
        let f = Front::for_budget(1 << 20).expect("room for a front");
        f.put(key(1, 1), &entry(10, Duration::ZERO));
        assert!(f.get(key(1, 1)).is_none(), "TTL over");
        f.put(key(2, 1), &entry(MAX_RESPONSE + 1, Duration::from_secs(60)));
        assert!(f.get(key(2, 1)).is_none(), "too large to keep");
        f.put(key(5, 1), &entry(MAX_RESPONSE, Duration::from_secs(60)));
        assert!(f.get(key(5, 1)).is_some());
        f.clear();
        assert!(f.get(key(5, 1)).is_none(), "cleared");
    }

    #[test]
    fn the_worst_case_fits_the_budget() {
        assert!(Front::for_budget(1000).is_none(), "too small for a front");
        for budget in [64 * SLOT_WORST_CASE, 1 << 20, 32 << 20, 1 << 40] {
            let f = Front::for_budget(budget).expect("a front");
            assert!(f.worst_case_bytes() <= budget, "{budget}");
            assert!(f.sets.len() * WAYS <= MAX_SLOTS);
        }
    }
}
