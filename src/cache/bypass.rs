//! Adaptive bypass (DESIGN.md "Caching must never lose"): per query fingerprint, measure
//! whether caching pays and stop caching the queries that do not, with a reason operators
//! can see.
//!
//! Judged on a sample of keys. One key in [`SAMPLE_EVERY`] (by its hash) is always cached,
//! bypass or not, and windows of at least `min_samples` of those lookups decide. Sampled
//! keys are cached all along, so their hit ratio is what caching every key would reach:
//! a large hot set on a cold cache is bypassed only until its sampled keys warm up, and the
//! keys that were bypassed meanwhile, cold when caching resumes, do not make the next
//! window look bad (judged on every lookup, a window after a resume saw mostly those cold
//! keys, and W1/W5 flipped back to bypassed for good). A query with few keys may have none
//! in the sample: a window of `min_samples` × [`SAMPLE_EVERY`] lookups of any keys decides
//! then, and a bypassed query is cached in full again after `probe_interval` to be
//! re-measured.
//!
//! Decisions use tumbling windows, so an old good run does not hide a new bad one.
//! Counters are relaxed atomics: the decision is a heuristic and a lost race costs at most
//! one window of imprecision.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::{BuildMix, CacheKey};

/// One key in this many is in the sample.
pub const SAMPLE_EVERY: u64 = 16;

/// Whether `key` is in the sample: the low bits of its high half, which nothing else
/// indexes by, are clear (the doorkeeper, the fill shards and the front's tags read the
/// low half; the front's set index is scaled from the top bits of the high half).
pub fn in_sample(key: CacheKey) -> bool {
    ((key.0 >> 64) as u64).is_multiple_of(SAMPLE_EVERY)
}

#[derive(Clone, Copy, Debug)]
pub struct BypassConfig {
    /// Sampled lookups in a window before a fingerprint is judged.
    pub min_samples: u64,
    /// Below this hit ratio (hits / lookups) caching is not worth its memory and work.
    pub min_hit_ratio: f64,
    /// Above this ratio of invalidations observed (entries found stale, fills rejected as
    /// stale) per lookup, the query's tables change too often for caching to pay.
    pub max_stale_ratio: f64,
    /// A bypassed fingerprint is cached in full again after this long, to re-measure.
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

/// Every reason a query is bypassed for, as metric labels.
pub const REASONS: [&str; 3] = ["low_hit_ratio", "invalidated_too_often", "cheap_upstream"];

/// A bypass reason's label.
fn reason(code: u8) -> &'static str {
    match code {
        LOW_HIT_RATIO => REASONS[0],
        CHEAP => REASONS[2],
        _ => REASONS[1],
    }
}

/// Lookup outcomes of one fingerprint: running totals, and their values when the current
/// window started.
#[derive(Debug, Default)]
struct Counts {
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    base_hits: AtomicU64,
    base_misses: AtomicU64,
    base_invalidations: AtomicU64,
}

/// What a window saw.
struct Window {
    hits: u64,
    lookups: u64,
    invalidations: u64,
}

impl Counts {
    fn start_window(&self) {
        self.base_hits.store(self.hits.load(Relaxed), Relaxed);
        self.base_misses.store(self.misses.load(Relaxed), Relaxed);
        let invalidations = self.invalidations.load(Relaxed);
        self.base_invalidations.store(invalidations, Relaxed);
    }

    fn window(&self) -> Window {
        let since = |total: &AtomicU64, base: &AtomicU64| {
            total.load(Relaxed).saturating_sub(base.load(Relaxed))
        };
        let hits = since(&self.hits, &self.base_hits);
        Window {
            hits,
            lookups: hits + since(&self.misses, &self.base_misses),
            invalidations: since(&self.invalidations, &self.base_invalidations),
        }
    }
}

/// Statistics of one fingerprint.
#[derive(Debug, Default)]
pub struct QueryStats {
    calls: AtomicU64,
    /// Every lookup's outcome (for reports)…
    all: Counts,
    /// …and the sampled keys' (for decisions).
    sampled: Counts,
    upstream_micros: AtomicU64,
    upstream_calls: AtomicU64,
    /// `CACHING`, or why caching is bypassed.
    state: AtomicU8,
    bypass_since_micros: AtomicU64,
}

impl QueryStats {
    /// Whether the query is cached in full now (its last verdict, or a probe), rather than
    /// only for its sampled keys. A hint for a caller deciding whether to look for an entry
    /// before [`Bypass::track`] decides the call.
    pub fn caching(&self) -> bool {
        self.state.load(Relaxed) == CACHING
    }

    /// Mean time a call of this query took upstream, once any was measured.
    fn mean_upstream(&self) -> Option<Duration> {
        let calls = self.upstream_calls.load(Relaxed);
        (calls > 0).then(|| Duration::from_micros(self.upstream_micros.load(Relaxed) / calls))
    }

    fn start_window(&self) {
        self.all.start_window();
        self.sampled.start_window();
    }

    fn report(&self, fingerprint: u64) -> QueryReport {
        let state = self.state.load(Relaxed);
        QueryReport {
            fingerprint,
            calls: self.calls.load(Relaxed),
            hits: self.all.hits.load(Relaxed),
            misses: self.all.misses.load(Relaxed),
            invalidations: self.all.invalidations.load(Relaxed),
            upstream_calls: self.upstream_calls.load(Relaxed),
            upstream_time: Duration::from_micros(self.upstream_micros.load(Relaxed)),
            bypassed: (state != CACHING).then(|| reason(state)),
        }
    }
}

/// One call's handle on its fingerprint's statistics, which knows whether the call's key
/// is in the sample. Callers on a hot path may keep the `Arc` inside (e.g. per prepared
/// statement) to skip the map lookup.
#[derive(Clone, Debug)]
pub struct Tracked {
    stats: Arc<QueryStats>,
    sampled: bool,
}

impl Tracked {
    fn count(&self, pick: impl Fn(&Counts) -> &AtomicU64) {
        pick(&self.stats.all).fetch_add(1, Relaxed);
        if self.sampled {
            pick(&self.stats.sampled).fetch_add(1, Relaxed);
        }
    }

    pub fn hit(&self) {
        self.count(|c| &c.hits);
    }

    pub fn miss(&self) {
        self.count(|c| &c.misses);
    }

    /// An entry found stale, or a fill rejected as stale.
    pub fn invalidated(&self) {
        self.count(|c| &c.invalidations);
    }

    /// Time a cached miss spent upstream.
    pub fn upstream(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.stats.upstream_micros.fetch_add(micros, Relaxed);
        self.stats.upstream_calls.fetch_add(1, Relaxed);
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

    /// The statistics of a fingerprint, created on first use. Callers on a hot path keep
    /// the `Arc` (per query) and pass it to [`Bypass::track`].
    pub fn stats(&self, fingerprint: u64) -> Arc<QueryStats> {
        self.queries.get_with(fingerprint, Arc::default)
    }

    /// Counts a call of the query `stats` belong to with `key` and decides whether to use
    /// the cache for it: `Ok` with the handle its lookup reports to, or `Err` naming the
    /// reason (a metric label) when the call bypasses.
    pub fn track(&self, stats: &Arc<QueryStats>, key: CacheKey) -> Result<Tracked, &'static str> {
        let tracked = Tracked {
            stats: Arc::clone(stats),
            sampled: in_sample(key),
        };
        self.decide(&tracked, Instant::now())?;
        Ok(tracked)
    }

    fn decide(&self, t: &Tracked, now: Instant) -> Result<(), &'static str> {
        let (cfg, q) = (&self.config, &*t.stats);
        q.calls.fetch_add(1, Relaxed);
        let now_micros = u64::try_from(now.saturating_duration_since(self.origin).as_micros())
            .unwrap_or(u64::MAX);
        // Judged by any call once a window is complete: the sampled keys of a warm hot set
        // are hit without asking (`Entry::tracked`), so they may never come here themselves.
        if let Some(w) = self.complete_window(q) {
            q.start_window();
            let verdict = self.verdict(q, &w);
            if verdict != CACHING && q.state.load(Relaxed) == CACHING {
                q.bypass_since_micros.store(now_micros, Relaxed);
            }
            q.state.store(verdict, Relaxed);
        }
        let state = q.state.load(Relaxed);
        // Sampled keys are cached whatever the verdict: they measure the next window.
        if state == CACHING || t.sampled {
            return Ok(());
        }
        let since = q.bypass_since_micros.load(Relaxed);
        if Duration::from_micros(now_micros.saturating_sub(since)) < cfg.probe_interval {
            return Err(reason(state));
        }
        // Probe: cache every key again for a fresh window and judge anew (a query whose keys
        // miss the sample is measured no other way).
        q.start_window();
        q.state.store(CACHING, Relaxed);
        Ok(())
    }

    /// The current window, if it is complete: `min_samples` lookups of sampled keys, or
    /// [`SAMPLE_EVERY`] times as many of any keys.
    fn complete_window(&self, q: &QueryStats) -> Option<Window> {
        let min = self.config.min_samples.max(1);
        let sampled = q.sampled.window();
        if sampled.lookups >= min {
            return Some(sampled);
        }
        let all = q.all.window();
        (all.lookups >= min.saturating_mul(SAMPLE_EVERY)).then_some(all)
    }

    /// `CACHING` if the window shows that caching pays, else why not.
    fn verdict(&self, q: &QueryStats, w: &Window) -> u8 {
        let cfg = &self.config;
        if (w.hits as f64) < cfg.min_hit_ratio * w.lookups as f64 {
            LOW_HIT_RATIO
        } else if w.invalidations as f64 > cfg.max_stale_ratio * w.lookups as f64 {
            INVALIDATED
        } else if !cfg.min_upstream.is_zero()
            && q.mean_upstream().is_some_and(|m| m < cfg.min_upstream)
        {
            CHEAP
        } else {
            CACHING
        }
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
            probe_interval: Duration::from_secs(60),
            max_fingerprints: 100,
            min_upstream: Duration::ZERO,
        }
    }

    /// A key in the sample, or not.
    fn key(sampled: bool, n: u64) -> CacheKey {
        let k = CacheKey(u128::from(n) | if sampled { 0 } else { 1 << 64 });
        assert_eq!(in_sample(k), sampled);
        k
    }

    /// Runs `n` calls of `fp` through the decision, with sampled keys or not, recording a
    /// hit for every `hit_every`-th call that may use the cache and a miss for the others;
    /// returns the last decision.
    fn calls(
        b: &Bypass,
        fp: u64,
        sampled: bool,
        n: u64,
        hit_every: u64,
    ) -> Result<(), &'static str> {
        let mut last = Ok(());
        for i in 0..n {
            last = b.track(&b.stats(fp), key(sampled, i)).map(|t| {
                if i % hit_every == 0 {
                    t.hit()
                } else {
                    t.miss()
                }
            });
        }
        last
    }

    fn decide_at(b: &Bypass, fp: u64, sampled: bool, at: Instant) -> Result<(), &'static str> {
        let t = Tracked {
            stats: b.stats(fp),
            sampled,
        };
        b.decide(&t, at)
    }

    #[test]
    fn about_one_key_in_sixteen_is_in_the_sample() {
        let sampled = (0..16_000u64)
            .filter(|n| in_sample(CacheKey(xxhash_rust::xxh3::xxh3_128(&n.to_le_bytes()))))
            .count();
        assert!((800..1200).contains(&sampled), "{sampled} of 16000");
    }

    #[test]
    fn keeps_caching_until_enough_samples() {
        let b = Bypass::new(config());
        assert_eq!(
            calls(&b, 1, true, 199, u64::MAX),
            Ok(()),
            "199 sampled misses are not enough to judge"
        );
        assert_eq!(
            calls(&b, 2, false, 200 * 16 - 1, u64::MAX),
            Ok(()),
            "nor are 16 times as many misses of keys outside the sample"
        );
    }

    #[test]
    fn bypasses_a_query_whose_sampled_keys_hit_too_rarely() {
        let b = Bypass::new(config());
        // 10 % hits; the 201st call is judged, and being sampled it is cached anyway.
        assert_eq!(calls(&b, 1, true, 201, 10), Ok(()));
        assert_eq!(
            b.track(&b.stats(1), key(false, 0)).err(),
            Some("low_hit_ratio")
        );
        assert_eq!(b.report_one(1).unwrap().bypassed, Some("low_hit_ratio"));
        assert!(
            b.track(&b.stats(1), key(true, 0)).is_ok(),
            "sampled keys are cached while the query is bypassed"
        );
    }

    #[test]
    fn is_judged_on_its_sampled_keys_not_on_cold_ones() {
        let b = Bypass::new(config());
        // Sampled keys hit half the time; fifteen times as many other keys are cold (all
        // misses), as just after a resume: the sample decides, and it pays.
        for round in 0..40u64 {
            assert_eq!(calls(&b, 1, true, 10, 2), Ok(()), "round {round}");
            assert_eq!(calls(&b, 1, false, 150, u64::MAX), Ok(()), "round {round}");
        }
        assert_eq!(b.report_one(1).unwrap().bypassed, None);
    }

    #[test]
    fn resumes_caching_once_its_sampled_keys_hit() {
        let b = Bypass::new(config());
        assert!(calls(&b, 1, true, 201, u64::MAX).is_ok());
        assert!(
            b.track(&b.stats(1), key(false, 0)).is_err(),
            "bypassed while cold"
        );
        // The sample warms up (every lookup hits now): a window of it resumes caching.
        assert_eq!(calls(&b, 1, true, 200, 1), Ok(()));
        assert_eq!(b.track(&b.stats(1), key(false, 0)).err(), None);
    }

    #[test]
    fn hits_counted_without_a_decision_resume_caching_at_the_next_call() {
        let b = Bypass::new(config());
        assert!(calls(&b, 1, true, 201, u64::MAX).is_ok());
        let t = b.track(&b.stats(1), key(true, 7)).expect("sampled");
        // Hits found without analysis (of entries that carry `t`) decide nothing…
        for _ in 0..300 {
            t.hit();
        }
        // …but the next call of any key judges the complete window.
        assert_eq!(b.track(&b.stats(1), key(false, 0)).err(), None);
    }

    #[test]
    fn a_query_without_sampled_keys_is_judged_on_all_of_them() {
        let b = Bypass::new(config());
        assert_eq!(
            calls(&b, 1, false, 200 * 16 + 1, u64::MAX),
            Err("low_hit_ratio")
        );
    }

    #[test]
    fn bypasses_a_query_invalidated_too_often() {
        let b = Bypass::new(config());
        // A third of lookups hit; every miss found its entry stale and its refill was
        // rejected as stale too: well above the hit-ratio floor, but churning.
        for i in 0..200 {
            let t = b
                .track(&b.stats(1), key(true, i))
                .expect("cached while judged");
            if i % 3 == 0 {
                t.hit();
            } else {
                t.miss();
                t.invalidated();
                t.invalidated();
            }
        }
        assert_eq!(
            b.track(&b.stats(1), key(false, 0)).err(),
            Some("invalidated_too_often")
        );
    }

    #[test]
    fn queries_cheaper_upstream_than_the_bound_are_bypassed_when_configured() {
        let b = Bypass::new(BypassConfig {
            min_samples: 10,
            min_upstream: Duration::from_millis(5),
            ..config()
        });
        for (fp, took) in [
            (9, Duration::from_micros(100)),
            (10, Duration::from_millis(50)),
        ] {
            for i in 0..10 {
                let t = b
                    .track(&b.stats(fp), key(true, i))
                    .expect("judged after 10");
                t.hit();
                t.upstream(took);
            }
        }
        assert_eq!(
            b.track(&b.stats(9), key(false, 0)).err(),
            Some("cheap_upstream")
        );
        assert!(
            b.track(&b.stats(10), key(false, 0)).is_ok(),
            "an expensive query keeps being cached"
        );
    }

    #[test]
    fn probes_in_full_again_after_the_interval() {
        let b = Bypass::new(config());
        assert!(calls(&b, 1, false, 200 * 16 + 1, u64::MAX).is_err());
        let later = Instant::now() + Duration::from_secs(30);
        assert!(decide_at(&b, 1, false, later).is_err());
        let much_later = Instant::now() + Duration::from_secs(61);
        assert_eq!(decide_at(&b, 1, false, much_later), Ok(()));
        // The probe window starts empty: a now-hitting query stays cached.
        assert_eq!(calls(&b, 1, false, 200 * 16 + 1, 1), Ok(()));
    }

    #[test]
    fn a_query_that_turns_bad_is_caught_in_the_next_window() {
        let b = Bypass::new(config());
        assert_eq!(calls(&b, 1, true, 2000, 1), Ok(())); // all hits
        assert_eq!(calls(&b, 1, true, 400, u64::MAX), Ok(()), "sampled: cached");
        assert_eq!(
            b.track(&b.stats(1), key(false, 0)).err(),
            Some("low_hit_ratio")
        );
    }

    #[test]
    fn fingerprints_are_independent_and_bounded() {
        let b = Bypass::new(config());
        assert!(calls(&b, 1, true, 201, u64::MAX).is_ok());
        assert!(b.track(&b.stats(1), key(false, 0)).is_err());
        assert!(b.track(&b.stats(2), key(false, 0)).is_ok());
        for fp in 0..1000 {
            let _ = b.track(&b.stats(fp), key(false, 0));
        }
        b.queries.run_pending_tasks();
        assert!(b.queries.entry_count() <= 100);
    }

    #[test]
    fn report_estimates_time_saved() {
        let b = Bypass::new(config());
        let t = b.track(&b.stats(9), key(true, 0)).expect("new query");
        t.upstream(Duration::from_millis(10));
        t.miss();
        for _ in 0..3 {
            t.hit();
        }
        let r = b.report_one(9).unwrap();
        assert_eq!((r.hits, r.misses, r.upstream_calls), (3, 1, 1));
        assert_eq!(r.time_saved(), Duration::from_millis(30));
    }
}
