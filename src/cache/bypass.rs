//! Adaptive bypass (DESIGN.md "Caching must never lose"): per query fingerprint, measure
//! whether caching pays and stop caching the queries that do not, with a reason operators
//! can see. Bypassed queries are re-probed now and then, since workloads change.
//!
//! Decisions use tumbling windows of at least `min_samples` lookups, so an old good run
//! does not hide a new bad one. Counters are relaxed atomics: the decision is a heuristic
//! and a lost race costs at most one window of imprecision.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::BuildMix;

#[derive(Clone, Copy, Debug)]
pub struct BypassConfig {
    /// Lookups in a window before a fingerprint is judged.
    pub min_samples: u64,
    /// Below this hit ratio (hits / lookups) caching is not worth its memory and work.
    pub min_hit_ratio: f64,
    /// Above this ratio of invalidations observed (entries found stale, fills rejected as
    /// stale) per lookup, the query's tables change too often for caching to pay.
    pub max_stale_ratio: f64,
    /// A bypassed fingerprint is cached again after this many calls…
    pub probe_calls: u64,
    /// …or this much time, whichever comes first, to re-measure.
    pub probe_interval: Duration,
    /// Fingerprints tracked at most (least used ones are forgotten, and start over).
    pub max_fingerprints: u64,
    /// Queries whose mean upstream time is below this do not pay for their memory (zero:
    /// never judged on cost).
    pub min_upstream: Duration,
}

impl Default for BypassConfig {
    fn default() -> Self {
        Self {
            min_samples: 200,
            min_hit_ratio: 0.2,
            max_stale_ratio: 0.5,
            probe_calls: 1000,
            probe_interval: Duration::from_secs(60),
            max_fingerprints: 10_000,
            min_upstream: Duration::ZERO,
        }
    }
}

const CACHING: u8 = 0;
const LOW_HIT_RATIO: u8 = 1;
const INVALIDATED: u8 = 2;
const CHEAP: u8 = 3;

/// Bypass reasons, as metric labels.
fn reason(code: u8) -> &'static str {
    match code {
        LOW_HIT_RATIO => "low_hit_ratio",
        CHEAP => "cheap_upstream",
        _ => "invalidated_too_often",
    }
}

/// Statistics of one fingerprint. Callers on a hot path may keep the `Arc` (e.g. per
/// prepared statement) to skip the map lookup.
#[derive(Debug, Default)]
pub struct QueryStats {
    calls: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    upstream_micros: AtomicU64,
    upstream_calls: AtomicU64,
    // Totals at the start of the current window.
    base_hits: AtomicU64,
    base_misses: AtomicU64,
    base_invalidations: AtomicU64,
    /// `CACHING`, or why caching is bypassed.
    state: AtomicU8,
    bypass_since_micros: AtomicU64,
    bypassed_calls: AtomicU64,
}

impl QueryStats {
    pub fn hit(&self) {
        self.hits.fetch_add(1, Relaxed);
    }

    pub fn miss(&self) {
        self.misses.fetch_add(1, Relaxed);
    }

    /// An entry found stale, or a fill rejected as stale.
    pub fn invalidated(&self) {
        self.invalidations.fetch_add(1, Relaxed);
    }

    /// Time the query spent upstream (cached misses and bypassed calls alike).
    /// Mean time a call of this query took upstream, once any was measured.
    fn mean_upstream(&self) -> Option<Duration> {
        let calls = self.upstream_calls.load(Relaxed);
        (calls > 0).then(|| Duration::from_micros(self.upstream_micros.load(Relaxed) / calls))
    }

    pub fn upstream(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.upstream_micros.fetch_add(micros, Relaxed);
        self.upstream_calls.fetch_add(1, Relaxed);
    }

    fn start_window(&self) {
        self.base_hits.store(self.hits.load(Relaxed), Relaxed);
        self.base_misses.store(self.misses.load(Relaxed), Relaxed);
        let invalidations = self.invalidations.load(Relaxed);
        self.base_invalidations.store(invalidations, Relaxed);
    }

    fn report(&self, fingerprint: u64) -> QueryReport {
        let state = self.state.load(Relaxed);
        QueryReport {
            fingerprint,
            calls: self.calls.load(Relaxed),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
            upstream_calls: self.upstream_calls.load(Relaxed),
            upstream_time: Duration::from_micros(self.upstream_micros.load(Relaxed)),
            bypassed: (state != CACHING).then(|| reason(state)),
        }
    }
}

/// One row of `SHOW QUERIES`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryReport {
    pub fingerprint: u64,
    pub calls: u64,
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
    pub upstream_calls: u64,
    pub upstream_time: Duration,
    /// `Some(reason)` while caching is bypassed.
    pub bypassed: Option<&'static str>,
}

impl QueryReport {
    /// Upstream time the hits saved, estimated from the mean upstream time.
    pub fn time_saved(&self) -> Duration {
        if self.upstream_calls == 0 {
            return Duration::ZERO;
        }
        let mean = self.upstream_time.as_secs_f64() / self.upstream_calls as f64;
        Duration::from_secs_f64(mean * self.hits as f64)
    }
}

/// Per-fingerprint tracker and decision.
pub struct Bypass {
    config: BypassConfig,
    queries: Cache<u64, Arc<QueryStats>, BuildMix>,
    origin: Instant,
}

impl Bypass {
    pub fn new(config: BypassConfig) -> Self {
        let queries = Cache::builder()
            .max_capacity(config.max_fingerprints)
            .build_with_hasher(BuildMix::new());
        Self {
            config,
            queries,
            origin: Instant::now(),
        }
    }

    /// The statistics of a fingerprint, created on first use.
    pub fn stats(&self, fingerprint: u64) -> Arc<QueryStats> {
        self.queries.get_with(fingerprint, Arc::default)
    }

    /// Counts a call and decides whether to use the cache for it; `Err` names the reason
    /// (a metric label) when the fingerprint is bypassed.
    pub fn should_cache(&self, fingerprint: u64) -> Result<(), &'static str> {
        self.decide(&self.stats(fingerprint))
    }

    /// [`Bypass::should_cache`] on statistics the caller already holds.
    pub fn decide(&self, q: &QueryStats) -> Result<(), &'static str> {
        self.decide_at(q, Instant::now())
    }

    pub(crate) fn decide_at(&self, q: &QueryStats, now: Instant) -> Result<(), &'static str> {
        let cfg = &self.config;
        q.calls.fetch_add(1, Relaxed);
        let now_micros = u64::try_from(now.saturating_duration_since(self.origin).as_micros())
            .unwrap_or(u64::MAX);
        let state = q.state.load(Relaxed);
        if state != CACHING {
            let calls = q.bypassed_calls.fetch_add(1, Relaxed) + 1;
            let since = q.bypass_since_micros.load(Relaxed);
            let elapsed = Duration::from_micros(now_micros.saturating_sub(since));
            if calls < cfg.probe_calls && elapsed < cfg.probe_interval {
                return Err(reason(state));
            }
            // Probe: cache again for a fresh window and judge anew.
            q.start_window();
            q.state.store(CACHING, Relaxed);
            return Ok(());
        }
        let hits = q
            .hits
            .load(Relaxed)
            .saturating_sub(q.base_hits.load(Relaxed));
        let misses = q
            .misses
            .load(Relaxed)
            .saturating_sub(q.base_misses.load(Relaxed));
        let lookups = hits + misses;
        if lookups < cfg.min_samples.max(1) {
            return Ok(());
        }
        let invalidations = q
            .invalidations
            .load(Relaxed)
            .saturating_sub(q.base_invalidations.load(Relaxed));
        q.start_window();
        let verdict = if (hits as f64) < cfg.min_hit_ratio * lookups as f64 {
            LOW_HIT_RATIO
        } else if invalidations as f64 > cfg.max_stale_ratio * lookups as f64 {
            INVALIDATED
        } else if !cfg.min_upstream.is_zero()
            && q.mean_upstream().is_some_and(|m| m < cfg.min_upstream)
        {
            CHEAP
        } else {
            return Ok(());
        };
        q.bypass_since_micros.store(now_micros, Relaxed);
        q.bypassed_calls.store(0, Relaxed);
        q.state.store(verdict, Relaxed);
        Err(reason(verdict))
    }

    /// Every tracked fingerprint (for `SHOW QUERIES` and metrics).
    pub fn report(&self) -> Vec<QueryReport> {
        self.queries.iter().map(|(fp, q)| q.report(*fp)).collect()
    }

    /// One fingerprint's report, if tracked.
    pub fn report_one(&self, fingerprint: u64) -> Option<QueryReport> {
        self.queries
            .get(&fingerprint)
            .map(|q| q.report(fingerprint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BypassConfig {
        BypassConfig {
            min_samples: 200,
            min_hit_ratio: 0.2,
            max_stale_ratio: 0.5,
            probe_calls: 1000,
            probe_interval: Duration::from_secs(60),
            max_fingerprints: 100,
            min_upstream: Duration::ZERO,
        }
    }

    #[test]
    fn queries_cheaper_upstream_than_the_bound_are_bypassed_when_configured() {
        let b = Bypass::new(BypassConfig {
            min_samples: 10,
            min_upstream: Duration::from_millis(5),
            ..config()
        });
        let q = b.stats(9);
        for _ in 0..10 {
            assert!(b.decide(&q).is_ok());
            q.hit();
            q.upstream(Duration::from_micros(100));
        }
        assert_eq!(b.decide(&q), Err("cheap_upstream"));
        let slow = b.stats(10);
        for _ in 0..10 {
            assert!(b.decide(&slow).is_ok());
            slow.hit();
            slow.upstream(Duration::from_millis(50));
        }
        assert!(
            b.decide(&slow).is_ok(),
            "an expensive query keeps being cached"
        );
    }

    /// Runs `n` calls through the decision, recording a hit for every `hit_every`-th one
    /// and a miss otherwise; returns the last decision.
    fn calls(b: &Bypass, fp: u64, n: u64, hit_every: u64) -> Result<(), &'static str> {
        let q = b.stats(fp);
        let mut last = Ok(());
        for i in 0..n {
            last = b.decide(&q);
            if last.is_ok() {
                if i % hit_every == 0 {
                    q.hit()
                } else {
                    q.miss()
                }
            }
        }
        last
    }

    #[test]
    fn keeps_caching_until_enough_samples() {
        let b = Bypass::new(config());
        assert_eq!(
            calls(&b, 1, 199, u64::MAX),
            Ok(()),
            "199 misses are not enough to judge"
        );
    }

    #[test]
    fn bypasses_a_query_with_a_low_hit_ratio() {
        let b = Bypass::new(config());
        assert_eq!(calls(&b, 1, 201, 10), Err("low_hit_ratio")); // 10 % hits
        assert_eq!(b.should_cache(1), Err("low_hit_ratio"));
        assert_eq!(b.report_one(1).unwrap().bypassed, Some("low_hit_ratio"));
    }

    #[test]
    fn keeps_caching_a_query_that_hits() {
        let b = Bypass::new(config());
        assert_eq!(calls(&b, 1, 5000, 2), Ok(())); // 50 % hits, many windows
        assert_eq!(b.report_one(1).unwrap().bypassed, None);
    }

    #[test]
    fn bypasses_a_query_invalidated_too_often() {
        let b = Bypass::new(config());
        let q = b.stats(1);
        // A third of lookups hit; every miss found its entry stale and its refill was
        // rejected as stale too: well above the hit-ratio floor, but churning.
        for i in 0..200 {
            assert_eq!(b.decide(&q), Ok(()));
            if i % 3 == 0 {
                q.hit();
            } else {
                q.miss();
                q.invalidated();
                q.invalidated();
            }
        }
        assert_eq!(b.decide(&q), Err("invalidated_too_often"));
    }

    #[test]
    fn probes_again_after_enough_bypassed_calls() {
        let b = Bypass::new(config());
        assert!(calls(&b, 1, 201, u64::MAX).is_err());
        let q = b.stats(1);
        for _ in 0..999 {
            assert!(b.decide(&q).is_err());
        }
        assert_eq!(b.decide(&q), Ok(()), "the 1000th bypassed call re-probes");
        // The probe window starts empty: a now-hitting query stays cached.
        assert_eq!(calls(&b, 1, 400, 1), Ok(()));
    }

    #[test]
    fn probes_again_after_the_interval() {
        let b = Bypass::new(config());
        assert!(calls(&b, 1, 201, u64::MAX).is_err());
        let q = b.stats(1);
        let later = Instant::now() + Duration::from_secs(30);
        assert!(b.decide_at(&q, later).is_err());
        let much_later = Instant::now() + Duration::from_secs(61);
        assert_eq!(b.decide_at(&q, much_later), Ok(()));
    }

    #[test]
    fn a_query_that_turns_bad_is_caught_in_the_next_window() {
        let b = Bypass::new(config());
        assert_eq!(calls(&b, 1, 2000, 1), Ok(())); // all hits
        assert_eq!(calls(&b, 1, 400, u64::MAX), Err("low_hit_ratio"));
    }

    #[test]
    fn fingerprints_are_independent_and_bounded() {
        let b = Bypass::new(config());
        assert!(calls(&b, 1, 201, u64::MAX).is_err());
        assert_eq!(b.should_cache(2), Ok(()));
        for fp in 0..1000 {
            let _ = b.should_cache(fp);
        }
        b.queries.run_pending_tasks();
        assert!(b.queries.entry_count() <= 100);
    }

    #[test]
    fn report_estimates_time_saved() {
        let b = Bypass::new(config());
        let q = b.stats(9);
        q.upstream(Duration::from_millis(10));
        q.miss();
        for _ in 0..3 {
            q.hit();
        }
        let r = b.report_one(9).unwrap();
        assert_eq!((r.hits, r.misses, r.upstream_calls), (3, 1, 1));
        assert_eq!(r.time_saved(), Duration::from_millis(30));
    }
}
