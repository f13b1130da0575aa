//! The in-process cache: the L1 store of raw responses, the generation bookkeeping that
//! proves an entry still fresh, and the adaptive bypass that stops caching queries that do
//! not pay.
//!
//! This module owns:
//! - [`Generations`]: per-table `any`/`wide` and per-key generations, the global epoch, and
//!   the freshness check ([`Generations::is_current`]) that every hit must pass;
//! - [`L1`]: a moka cache bounded by bytes with per-entry TTL and single-flight fills;
//! - [`Bypass`]: per query fingerprint statistics and the decision to stop (and later
//!   re-probe) caching it.
//!
//! It does no network I/O and knows nothing about SQL or the wire protocol: callers build
//! the [`CacheKey`], resolve tables to [`TableId`]s, decide the [`Dependency`]s of a read,
//! and turn a committed write into an [`Invalidation`]. The shared tier (Redis) plugs in
//! behind [`Invalidator`]: invalidations are values that can be applied locally and
//! published to other instances, and [`Generations::suspend`] / [`Generations::resume`]
//! stop serving L1 while the instance cannot prove it has seen every remote invalidation.
//!
//! The read path, in order (the snapshot must be taken before the query goes upstream):
//!
//! ```text
//! match l1.get(key, &gens).await {               // sync on a hit; waits only behind a fill
//!     Resolved::Hit(e) => replay(&e.response),
//!     Resolved::Miss(guard) => {
//!         let snapshot = gens.snapshot(&deps);    // [Key(t, k)] or [AnyOf(t), ...]
//!         let (response, rows) = upstream().await;  // drop `guard` if not cacheable
//!         let outcome = guard.fill(Entry::new(response, rows, snapshot), ttl, &gens);
//!     }
//! }
//! // On commit of a write:  gens.invalidate(&Invalidation::Keys(t, keys))  (or Wide / All)
//! ```

mod bypass;
mod doorkeeper;
mod fill;
mod front;
mod generations;
mod l1;
#[cfg(test)]
mod tests;

pub use bypass::{
    Bypass, BypassConfig, QueryReport, QueryStats, REASONS as BYPASS_REASONS, Tracked, in_sample,
};
pub use doorkeeper::Doorkeeper;
pub use fill::{FillGuard, FillOutcome, Pending, Resolved};
pub use generations::{Dependency, Generations, Invalidation, Invalidator, Snapshot, TableId};
pub use l1::{Entry, L1, L1Config, Lookup};

use std::hash::{BuildHasher, Hasher, RandomState};

/// 128-bit cache key: xxh3-128 of everything that can change the bytes of the answer
/// (see DESIGN.md "The cache key"). The caller builds it; this module only compares it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CacheKey(pub u128);

/// Multiply-fold mixing of two words (the core of wyhash/foldhash): a few cycles, and good
/// enough spreading for hash tables and stripe indexes.
#[inline]
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let p =
        u128::from(a ^ 0x243f_6a88_85a3_08d3).wrapping_mul(u128::from(b ^ 0x9e37_79b9_7f4a_7c15));
    (p as u64) ^ ((p >> 64) as u64)
}

/// Hasher for keys that are already hashes (cache keys, table ids, fingerprints).
///
/// Why not the std SipHash: the hit path hashes once per lookup and SipHash would be a
/// noticeable part of it. Why seeded: keys derive from client-chosen text, so a fixed
/// function would let a client aim many keys at one bucket.
#[derive(Clone, Debug)]
pub(crate) struct BuildMix {
    seed: u64,
}

impl BuildMix {
    pub(crate) fn new() -> Self {
        Self {
            seed: RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl Default for BuildMix {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildHasher for BuildMix {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher(self.seed)
    }
}

pub(crate) struct MixHasher(u64);

impl Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.0 = mix(self.0, x);
    }
    #[inline]
    fn write_u128(&mut self, x: u128) {
        self.write_u64(x as u64);
        self.write_u64((x >> 64) as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}
