//! Admission on the second miss: a result is stored only when its key was missed before
//! (recently), was found stale, or others were waiting for it.
//!
//! Most keys of a uniform workload over a large table (`pgbench -S`) are read once in a
//! long while. Storing each one costs a map insert, memory traffic and evictions of entries
//! that would have been hit, and pays nothing back. Keys that repeat are missed twice and
//! stored on the second miss: one extra upstream query per hot key. CDNs call this
//! "cache on second hit"; moka's own TinyLFU admission only starts once the cache is full.
//!
//! The memory of earlier misses is a bitmap indexed by the key's hash (one bit per key, so a
//! key can be admitted early by a collision: harmless, it is only a cost decision). It is
//! cleared once an eighth of its bits are set, which keeps false admissions rare and makes
//! "recently" mean "within the last ~`bits / 8` distinct missed keys".

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use super::CacheKey;

pub struct Doorkeeper {
    words: Box<[AtomicU64]>,
    /// Bits set since the last clear.
    set: AtomicUsize,
    bits_log2: u32,
}

/// 2^22 bits (512 KiB): remembers the last ~500,000 distinct missed keys.
const BITS_LOG2: u32 = 22;

impl Doorkeeper {
    pub(super) fn new() -> Self {
        Self::with_bits_log2(BITS_LOG2)
    }

    /// A bitmap of 2^`bits_log2` bits, remembering about 2^`bits_log2` / 8 hashes.
    pub fn with_bits_log2(bits_log2: u32) -> Self {
        let bits_log2 = bits_log2.clamp(6, 30);
        Self {
            words: (0..(1usize << bits_log2) / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
            set: AtomicUsize::new(0),
            bits_log2,
        }
    }

    /// Records a miss of `key`; whether it was missed before (since the last clear).
    pub(super) fn missed_before(&self, key: CacheKey) -> bool {
        // The key is already a uniform 128-bit hash: its low bits index the bitmap.
        self.seen_before(key.0 as u64)
    }

    /// Records `hash` (uniformly distributed, such as an xxh3 digest); whether it was
    /// recorded before (since the last clear).
    pub fn seen_before(&self, hash: u64) -> bool {
        let bit = (hash as usize) & ((1usize << self.bits_log2) - 1);
        let mask = 1u64 << (bit % 64);
        let previous = self.words[bit / 64].fetch_or(mask, Relaxed);
        if previous & mask != 0 {
            return true;
        }
        if self.set.fetch_add(1, Relaxed) + 1 >= (1usize << self.bits_log2) / 8 {
            self.clear();
        }
        false
    }

    /// Whether `key` was missed since the last clear, without recording anything. Every
    /// stored entry was missed first, so `false` means L1 holds no entry for it, or one
    /// stored before the last clear (then one more miss brings it back into use).
    pub(super) fn maybe_missed(&self, key: CacheKey) -> bool {
        self.maybe_seen(key.0 as u64)
    }

    /// Whether `hash` was recorded since the last clear, without recording it: a load, so
    /// the bitmap's cache lines are shared between cores until a bit is set.
    pub fn maybe_seen(&self, hash: u64) -> bool {
        let bit = (hash as usize) & ((1usize << self.bits_log2) - 1);
        self.words[bit / 64].load(Relaxed) & (1u64 << (bit % 64)) != 0
    }

    fn clear(&self) {
        self.set.store(0, Relaxed);
        for w in self.words.iter() {
            w.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_new_once_then_known() {
        let d = Doorkeeper::new();
        assert!(!d.missed_before(CacheKey(42)));
        assert!(d.missed_before(CacheKey(42)));
        assert!(!d.missed_before(CacheKey(43)));
    }

    #[test]
    fn it_forgets_after_an_eighth_of_its_bits_are_set() {
        let d = Doorkeeper::new();
        assert!(!d.missed_before(CacheKey(0)));
        for k in 1..(1u128 << BITS_LOG2) / 8 {
            d.missed_before(CacheKey(k));
        }
        assert!(!d.missed_before(CacheKey(0)), "cleared, so new again");
    }
}
