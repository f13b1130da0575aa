//! A direct-mapped front of recent L1 hits, for the hottest small results.
//!
//! A hit through moka walks its concurrent hash table and records the read for its
//! eviction policy (and now and then runs that policy's housekeeping on the reader's
//! thread): measured at ~12 % of the proxy's CPU under `pgbench -M prepared` on a hot set.
//! The front is one slot per key hash, holding the last entry hit there: a hit in it is one
//! uncontended lock and a compare.
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
const MAX_SLOTS: usize = 1 << 14;

struct Slot {
    key: CacheKey,
    entry: Arc<Entry>,
    epoch: u64,
}

pub(super) struct Front {
    slots: Box<[Mutex<Option<Slot>>]>,
    /// Per slot, a tag of the key it holds (0: none), read without the lock so that a
    /// miss, by far the most common outcome for keys that are not hot, takes no lock.
    tags: Box<[AtomicU64]>,
    /// Bumped by `clear`: slots filled before it are ignored.
    epoch: AtomicU64,
}

impl Front {
    /// A front whose worst case fits in `budget` bytes, or `None` if not even a few slots
    /// would (tiny caches do without).
    pub(super) fn for_budget(budget: u64) -> Option<Self> {
        let fit = usize::try_from(budget / SLOT_WORST_CASE).unwrap_or(usize::MAX);
        let n = fit.min(MAX_SLOTS);
        if n < 64 {
            return None;
        }
        // A power of two, so a mask picks the slot.
        let n = 1usize << (usize::BITS - 1 - n.leading_zeros());
        Some(Self {
            slots: (0..n).map(|_| Mutex::new(None)).collect(),
            tags: (0..n).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
        })
    }

    /// The most memory the front can hold on to.
    pub(super) fn worst_case_bytes(&self) -> u64 {
        self.slots.len() as u64 * SLOT_WORST_CASE
    }

    fn index(&self, key: CacheKey) -> usize {
        // The high half of the key: the low bits already pick doorkeeper bits and flight
        // shards.
        ((key.0 >> 64) as usize) & (self.slots.len() - 1)
    }

    fn slot(&self, key: CacheKey) -> &Mutex<Option<Slot>> {
        &self.slots[self.index(key)]
    }

    /// Never 0 (the empty tag). A tag shared by two keys only costs a lock and a compare.
    fn tag(key: CacheKey) -> u64 {
        key.0 as u64 | 1
    }

    /// The entry last hit under `key`, if the slot still holds it, no clear happened since
    /// and its TTL has not run out. The caller must still check its snapshot.
    pub(super) fn get(&self, key: CacheKey) -> Option<Arc<Entry>> {
        if self.tags[self.index(key)].load(Relaxed) != Self::tag(key) {
            return None;
        }
        let epoch = self.epoch.load(Relaxed);
        let slot = self
            .slot(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let s = slot.as_ref()?;
        (s.key == key && s.epoch == epoch && Instant::now() < s.entry.expires)
            .then(|| Arc::clone(&s.entry))
    }

    /// Remember a fresh hit (small responses only).
    pub(super) fn put(&self, key: CacheKey, entry: &Arc<Entry>) {
        if entry.response.len() > MAX_RESPONSE {
            return;
        }
        let epoch = self.epoch.load(Relaxed);
        let mut slot = self
            .slot(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *slot = Some(Slot {
            key,
            entry: Arc::clone(entry),
            epoch,
        });
        // Under the lock, so the tag always names the key the slot last got.
        self.tags[self.index(key)].store(Self::tag(key), Relaxed);
    }

    /// Forget `key`'s slot if it holds `entry` (found stale: free its memory now).
    pub(super) fn forget(&self, key: CacheKey, entry: &Arc<Entry>) {
        let mut slot = self
            .slot(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(&s.entry, entry)) {
            *slot = None;
            self.tags[self.index(key)].store(0, Relaxed);
        }
    }

    /// Forget everything (FLUSH).
    pub(super) fn clear(&self) {
        // FLUSH is about memory, not freshness (the generations see to that): an entry
        // that a concurrent hit puts back right after this is still checked like any other.
        self.epoch.fetch_add(1, Relaxed);
        for (s, t) in self.slots.iter().zip(self.tags.iter()) {
            *s.lock().unwrap_or_else(PoisonError::into_inner) = None;
            t.store(0, Relaxed);
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

    /// Keys that share a slot (same high half) but differ.
    fn key(slot: u64, low: u64) -> CacheKey {
        CacheKey((u128::from(slot) << 64) | u128::from(low))
    }

    #[test]
    fn a_slot_answers_only_for_the_key_it_holds() {
        let f = Front::for_budget(1 << 20).expect("room for a front");
        let e = entry(10, Duration::from_secs(60));
        f.put(key(3, 1), &e);
        assert!(f.get(key(3, 1)).is_some_and(|got| Arc::ptr_eq(&got, &e)));
        assert!(f.get(key(3, 2)).is_none(), "same slot, other key");
        assert!(f.get(key(4, 1)).is_none(), "other slot");
        let other = entry(10, Duration::from_secs(60));
        f.put(key(3, 2), &other);
        assert!(f.get(key(3, 1)).is_none(), "replaced");
        f.forget(key(3, 2), &e);
        assert!(f.get(key(3, 2)).is_some(), "forget needs the same entry");
        f.forget(key(3, 2), &other);
        assert!(f.get(key(3, 2)).is_none());
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
            assert!(f.slots.len().is_power_of_two() && f.slots.len() <= MAX_SLOTS);
        }
    }
}
