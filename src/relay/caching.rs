//! The relay's side of the cache: deciding, for a request the client sent, whether it is
//! answered from the cache, forwarded with a fill, or forwarded as a write whose tables are
//! invalidated at commit. The decisions are made here; the store is `cache`, the SQL
//! understanding is `analysis`, the schema facts are `catalog`.

use crate::analysis::{
    self, Analysis, ColumnValue, DdlInfo, DdlScope, KeyValue, TableWrite, WriteEffect, WriteInfo,
};
pub use crate::cache::Invalidation;
use crate::cache::{
    BuildMix, Bypass, BypassConfig, CacheKey, Dependency, Doorkeeper, Entry, FillGuard,
    FillOutcome, Generations, Invalidator, L1, L1Config, QueryStats, Resolved, Snapshot, TableId,
    Tracked,
};
use crate::catalog::Catalog;
use crate::config::{CacheConfig, CacheRule, UpstreamTarget};
use crate::invalidation::catch_up::CatchUp;
use crate::metrics::metrics;
use crate::redis_tier::{L2Lookup, RedisSnapshot, RedisTier};
use crate::relay::bind::{BindParams, canonical_int};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, xxh3_128_with_seed};

/// Shared by every client of this pgstash instance.
pub struct CacheShared {
    pub config: CacheConfig,
    pub l1: L1,
    pub gens: Arc<Generations>,
    /// The shared tier, when `redis.url` is set.
    pub tier: Option<Arc<RedisTier>>,
    pub bypass: Option<Bypass>,
    rules: Vec<Rule>,
    /// Databases a change source cannot vouch for right now (see `invalidation`).
    unhealthy: SourceHealth,
    /// Databases a change source watches, and how their clients wait for it to hear
    /// their hidden writes (see [`CatchUp`]).
    catch_ups: std::sync::RwLock<HashMap<String, Arc<CatchUp>>>,
    upstream: UpstreamTarget,
    connect_timeout: Duration,
    catalogs: Mutex<HashMap<String, CatalogCell, BuildMix>>,
    /// Counts the times catalogs were dropped (schema changes): a catalog a client holds on
    /// to is current while this has not moved (see [`CacheShared::catalogs_version`]).
    catalogs_dropped: std::sync::atomic::AtomicU64,
    /// Keyed by (hash of the database name, hash of the query text).
    /// Sharded by text hash: every query of every client looks here, and one lock would
    /// have its cache line bounce between cores on each of them.
    analyses: Box<[Mutex<AnalysisMemo>]>,
    /// Keyed by (hash of the database name, hash of the literal shape's text): see
    /// [`analysis::literal_shape`].
    shapes: Mutex<HashMap<(u64, u64), ShapeMemo, BuildMix>>,
    /// Texts analysed through their shape, by hash: such a text enters `analyses` on its
    /// second sighting only. Under a uniform workload (`pgbench -S -M simple`) most texts
    /// are seen once, and memoising each cost more (a copy, an insert, later a drop) than
    /// shaping it again would; texts that repeat (a hot set) get memoised all the same.
    texts_seen: Doorkeeper,
}

type AnalysisMemo = HashMap<(u64, u64), Arc<Analyzed>, BuildMix>;
const ANALYSIS_SHARDS: usize = 16;

/// What one literal shape analyses to.
struct ShapeMemo {
    /// The shape's text, to tell a hash collision from a memo hit.
    text: Box<str>,
    /// The shape's analysis, if instantiating it with the first text's literals gave that
    /// text's own analysis; `None` if it did not (texts of this shape go to the text memo).
    /// Shared by the [`Analyzed`] of every text of the shape, each with its own literals.
    template: Option<Arc<Analysis>>,
    /// The plan shape of every text instantiated from `template`: it depends on the tables
    /// read and the key column, not on key values, so texts of one shape plan alike, and a
    /// miss on a new value (a new text) costs no catalog lookups.
    plan: PlanCell,
    /// What `text` mentions (see [`ShapeWords`]).
    words: ShapeWords,
}

/// Words a literal shape's text mentions, memoised with the shape: a text of the shape
/// mentions one iff the shape's text or one of the text's literals does (the words are
/// letters, `_` and spaces; see [`shaped_changes_transaction`]).
#[derive(Clone, Copy)]
struct ShapeWords {
    /// [`mentions_isolation`].
    isolation: bool,
    /// [`crate::session::effects::mentions_effect_words`].
    effects: bool,
}

impl ShapeWords {
    fn of(text: &str) -> ShapeWords {
        ShapeWords {
            isolation: mentions_isolation(text),
            effects: crate::session::effects::mentions_effect_words(text),
        }
    }
}

/// The memoised [`PlanShape`] and [`WriteShape`] of an analysis, shared by the texts of a
/// literal shape.
type PlanCell = Arc<PlanCells>;

#[derive(Default)]
struct PlanCells {
    read: CatalogMemo<Option<Arc<PlanShape>>>,
    write: CatalogMemo<Arc<WriteShape>>,
    /// The adaptive bypass's statistics of the query (its fingerprint is the shape's), kept
    /// here so that a call finds them without the bypass's map (a moka lookup, about 900
    /// instructions per call). They outlive an eviction from that map: then the query is
    /// still judged, only not listed in reports.
    bypass_stats: std::sync::OnceLock<Arc<QueryStats>>,
}

/// A value computed from a catalog, with the catalog it was computed from.
type CatalogMemo<T> = std::sync::OnceLock<(std::sync::Weak<Catalog>, T)>;

/// `memo`'s value if it was computed from `catalog`; else `compute()`, remembered if the memo
/// is still empty. The memos of analyses and shapes are dropped when the catalog is reloaded,
/// so the first catalog asked is nearly always the one.
fn for_catalog<T: Clone>(
    memo: &CatalogMemo<T>,
    catalog: &Arc<Catalog>,
    compute: impl Fn() -> T,
) -> T {
    // A `Weak` keeps the catalog's allocation, so its address cannot be reused by a newer
    // catalog while this memo lives.
    let (of, value) = memo.get_or_init(|| (Arc::downgrade(catalog), compute()));
    if std::ptr::eq(of.as_ptr(), Arc::as_ptr(catalog)) {
        value.clone()
    } else {
        compute()
    }
}

/// A database's catalog, loaded once by whichever client needs it first (`None`: unreadable).
type CatalogCell = Arc<OnceCell<Option<Arc<Catalog>>>>;

const MAX_MEMOISED_ANALYSES: usize = 50_000;

thread_local! {
    /// [`CacheShared::analyze`]'s buffer for literal shapes' texts.
    static SHAPE_TEXT: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// Largest shape text buffer kept for the next text: one huge text does not hold on to
/// its memory.
const MAX_KEPT_SHAPE_TEXT: usize = 16 * 1024;

/// A statement's analysis and what the configuration says about caching it, memoised by
/// query text (rules and hints depend on nothing else).
pub struct Analyzed {
    /// For a text analysed through its literal shape, the shape's analysis (shared by the
    /// texts of the shape): its key values are `$k`, standing for `literals.get(k - 1)`. Read key
    /// values through [`Analyzed::read_plan`] and [`Analyzed::invalidations`], which know that.
    pub analysis: Arc<Analysis>,
    /// The shaped text's literals when `analysis` is its shape's; else empty. Sharing the
    /// shape's analysis instead of instantiating it spares every new text of a known shape
    /// (each write and each missed read of `pgbench -M simple`) copying the table and column
    /// names and key values, and later freeing them.
    literals: analysis::Literals,
    pub policy: Policy,
    /// Identifies the query for the adaptive bypass: a hash of its text.
    pub fingerprint: u64,
    /// The text, to tell a hash collision from a memo hit.
    sql: Box<str>,
    /// See [`changes_transaction`].
    pub changes_transaction: bool,
    /// Running the text surely has no session effect: [`crate::session::effects_of`] of it is
    /// empty, and need not be scanned for. `false` when not known.
    pub no_session_effects: bool,
    /// See [`Analyzed::read_plan`]; shared by the texts of a literal shape.
    plan_shape: PlanCell,
}

impl Analyzed {
    /// The adaptive bypass's statistics of this query, from `bypass` the first time.
    pub fn bypass_stats(&self, bypass: &Bypass) -> &Arc<QueryStats> {
        self.plan_shape
            .bypass_stats
            .get_or_init(|| bypass.stats(self.fingerprint))
    }

    /// Whether this is the analysis of `sql`.
    pub fn is_for(&self, sql: &str) -> bool {
        *self.sql == *sql
    }

    /// Where the `$k` of `analysis` get their values: the text's own literals when it is
    /// a shape's analysis (a shaped text has no `$` of its own), else the Bind's parameters.
    fn values<'a>(&'a self, params: Option<&'a BindParams<'a>>) -> Values<'a> {
        if self.literals.is_empty() {
            Values::Params(params)
        } else {
            Values::Literals(&self.literals)
        }
    }

    /// The analysis with its key values filled in: what [`analysis::analyze`] gives for the
    /// text itself.
    #[cfg(test)]
    fn instance(&self) -> Analysis {
        if self.literals.is_empty() {
            (*self.analysis).clone()
        } else {
            analysis::instantiate(&self.analysis, &self.literals)
        }
    }
}

/// The values of an analysis' `$k` key values.
#[derive(Clone, Copy)]
enum Values<'a> {
    /// A shaped text's literals (see [`Analyzed::analysis`]).
    Literals(&'a analysis::Literals),
    /// The Bind's parameters, if any.
    Params(Option<&'a BindParams<'a>>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// Cache with this lifetime.
    Cache(Duration),
    /// Never cache (a `never` rule or a `skip` hint).
    Never,
}

/// A compiled `[[cache.rules]]` entry.
struct Rule {
    matcher: RuleMatch,
    policy: Policy,
}

enum RuleMatch {
    /// `name` or `schema.name`, compared with the names the query reads.
    Table {
        schema: Option<String>,
        name: String,
    },
    Query(regex::Regex),
}

impl Rule {
    fn compile(r: &CacheRule) -> Option<Rule> {
        let policy = match r.ttl {
            Some(ttl) if !r.never => Policy::Cache(ttl),
            _ => Policy::Never,
        };
        let matcher = match (&r.table, &r.query) {
            (Some(t), _) => {
                let t = t.to_ascii_lowercase();
                match t.split_once('.') {
                    Some((schema, name)) => RuleMatch::Table {
                        schema: Some(schema.to_string()),
                        name: name.to_string(),
                    },
                    None => RuleMatch::Table {
                        schema: None,
                        name: t,
                    },
                }
            }
            // Validated at load; a rule that no longer compiles is dropped, loudly.
            (None, Some(q)) => match regex::Regex::new(q) {
                Ok(re) => RuleMatch::Query(re),
                Err(e) => {
                    tracing::error!(error = %e, "cache rule ignored");
                    return None;
                }
            },
            (None, None) => return None,
        };
        Some(Rule { matcher, policy })
    }

    fn matches(&self, sql: &str, a: &Analysis) -> bool {
        match &self.matcher {
            RuleMatch::Query(re) => re.is_match(sql),
            RuleMatch::Table { schema, name } => {
                let Analysis::Read(r) = a else { return false };
                r.tables.iter().any(|t| {
                    t.name.eq_ignore_ascii_case(name)
                        && match (schema, &t.schema) {
                            (Some(want), Some(have)) => want.eq_ignore_ascii_case(have),
                            // A qualified rule does not match an unqualified name: it may
                            // resolve to another schema through search_path.
                            (Some(_), None) => false,
                            (None, _) => true,
                        }
                })
            }
        }
    }
}

/// Per-database health as reported by change sources: a count for the hot path, the set
/// with reasons for everything else.
#[derive(Default)]
struct SourceHealth {
    count: std::sync::atomic::AtomicUsize,
    dbs: Mutex<HashMap<String, String>>,
}

impl CacheShared {
    pub fn new(
        config: CacheConfig,
        tier: Option<Arc<RedisTier>>,
        upstream: UpstreamTarget,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let a = &config.adaptive;
        let bypass = a.enabled.then(|| {
            Bypass::new(BypassConfig {
                min_samples: a.min_calls,
                min_hit_ratio: a.min_hit_ratio,
                max_stale_ratio: a.max_invalidation_ratio,
                min_upstream: a.min_upstream_time,
                probe_interval: a.retry_after,
                ..BypassConfig::default()
            })
        });
        Arc::new(CacheShared {
            l1: L1::with_config(L1Config {
                max_bytes: config.max_bytes,
                admit_on_second_miss: config.admit_on_second_miss,
                ..L1Config::default()
            }),
            gens: Arc::new(Generations::new(1 << 20)),
            rules: config.rules.iter().filter_map(Rule::compile).collect(),
            bypass,
            tier,
            unhealthy: SourceHealth::default(),
            catch_ups: Default::default(),
            config,
            upstream,
            connect_timeout,
            catalogs: Mutex::new(HashMap::with_hasher(BuildMix::new())),
            catalogs_dropped: std::sync::atomic::AtomicU64::new(0),
            analyses: (0..ANALYSIS_SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(BuildMix::new())))
                .collect(),
            shapes: Mutex::new(HashMap::with_hasher(BuildMix::new())),
            texts_seen: Doorkeeper::with_bits_log2(18),
        })
    }

    /// The catalog of `db`, loaded on first use. `None` when it cannot be read: then nothing
    /// in that database is cached (a read could not be tied to the tables it depends on).
    pub async fn catalog(&self, db: &str) -> Option<Arc<Catalog>> {
        let cell = {
            let mut map = self.catalogs.lock().unwrap_or_else(|p| p.into_inner());
            // The hot path: loaded already, no allocation.
            if let Some(c) = map.get(db).and_then(|cell| cell.get()) {
                return c.clone();
            }
            map.entry(db.to_string()).or_default().clone()
        };
        cell.get_or_init(|| async {
            let mut t = self.upstream.clone();
            t.database = db.to_string();
            let url = control_url(&t);
            match Catalog::load(&url, db, self.connect_timeout).await {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    tracing::warn!(error = %e, db, "catalog unavailable: caching disabled for this database until it loads");
                    None
                }
            }
        })
        .await
        .clone()
    }

    /// Read before [`CacheShared::catalog`]: while it returns the same, the catalog that
    /// call gave is still the one it would give (for callers that keep it between calls).
    pub fn catalogs_version(&self) -> u64 {
        self.catalogs_dropped
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The catalog of `db` if it is loaded (no waiting: for callers that must not block).
    pub fn loaded_catalog(&self, db: &str) -> Option<Arc<Catalog>> {
        let map = self.catalogs.lock().unwrap_or_else(|p| p.into_inner());
        map.get(db)?.get()?.clone()
    }

    /// Forget what we know of `db`'s schema (after DDL), and the analyses that used it.
    /// Another instance saw DDL in a database it does not name: forget every database's
    /// catalog and analyses (each reloads on its next use).
    pub fn schema_changed_everywhere(&self) {
        self.catalogs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.catalogs_dropped
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for shard in &self.analyses {
            shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        self.shapes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub fn schema_changed(&self, db: &str) {
        self.catalogs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(db);
        self.catalogs_dropped
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = xxh3_64(db.as_bytes());
        for shard in &self.analyses {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(of, _), _| *of != d);
        }
        self.shapes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(of, _), _| *of != d);
    }

    /// The memoised analysis of `sql`. A text seen before is one map lookup (the hit path
    /// of every repeated query); a new text is analysed through its literal shape if it has
    /// one, else parsed.
    pub fn analyze(&self, db: &str, sql: &str, catalog: &Catalog) -> Arc<Analyzed> {
        let db_hash = xxh3_64(db.as_bytes());
        let text_hash = xxh3_64(sql.as_bytes());
        let key = (db_hash, text_hash);
        let seen_key = db_hash ^ text_hash;
        let shard = &self.analyses[text_hash as usize % ANALYSIS_SHARDS];
        // A text enters the memo only with its bit in `texts_seen` set (below): a text whose
        // bit is clear (new, or seen before the bitmap was last cleared) spares the shard's
        // lock, whose cache line would move between cores on every new text of a uniform
        // workload. After a clear, a memoised text is analysed once more, then found again.
        if self.texts_seen.maybe_seen(seen_key)
            && let Some(a) = shard.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && *a.sql == *sql
        {
            return a.clone();
        }
        // The shape's text is only looked up (and copied into the memo when new): one buffer
        // per thread spares an allocation for each new text.
        let mut shape_text = SHAPE_TEXT.take();
        let shape_literals = analysis::literal_shape_into(sql, &mut shape_text);
        let ((analysis, literals, fingerprint, plan_shape), (changes_tx, no_effects)) =
            match shape_literals {
                Some(literals) => {
                    let (analysis, templated, fingerprint, plan, words) = self.analyze_shaped(
                        db_hash,
                        text_hash,
                        sql,
                        (&shape_text, &literals),
                        catalog,
                    );
                    let changes = shaped_changes_transaction(sql, &literals, words.isolation);
                    // A shaped text starts with a query or DML keyword, none of which
                    // `effects_of` reads in full: only the words decide.
                    let no_effects = !words.effects
                        && !literals
                            .iter()
                            .any(crate::session::effects::mentions_effect_words);
                    let literals = if templated {
                        literals
                    } else {
                        analysis::Literals::default()
                    };
                    (
                        (analysis, literals, fingerprint, plan),
                        (changes, no_effects),
                    )
                }
                // Memoised whatever it is: its scan for effects is paid once.
                None => (
                    (
                        Arc::new(analysis::analyze(sql, catalog)),
                        analysis::Literals::default(),
                        text_hash,
                        PlanCell::default(),
                    ),
                    (
                        changes_transaction(sql),
                        crate::session::effects_of(sql).is_empty(),
                    ),
                ),
            };
        if shape_text.capacity() <= MAX_KEPT_SHAPE_TEXT {
            SHAPE_TEXT.set(shape_text);
        }
        let policy = self.policy(sql, &analysis);
        let a = Arc::new(Analyzed {
            analysis,
            literals,
            policy,
            fingerprint,
            sql: sql.into(),
            changes_transaction: changes_tx,
            no_session_effects: no_effects,
            plan_shape,
        });
        let shaped = fingerprint != text_hash;
        // Recorded for every text, so that a memoised one has its bit set.
        let seen_before = self.texts_seen.seen_before(seen_key);
        if shaped && !seen_before {
            return a;
        }
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_MEMOISED_ANALYSES / ANALYSIS_SHARDS {
            map.clear();
        }
        map.insert(key, a.clone());
        a
    }

    /// The analysis of a new text that has a literal shape, whether it is the shape's
    /// (its `$k` stand for the text's literals; see [`Analyzed::analysis`]), with its
    /// fingerprint and plan cell: from the shape's memo (the shape's analysis, fingerprint
    /// and plan cell: one query, whatever its values), or, for the first text of a shape,
    /// parsed twice (as itself and as the shape) to decide whether the shape can stand for
    /// its texts. Texts of a shape that cannot are parsed one by one (their own analysis,
    /// fingerprint and plan cell). Last, the words the shape's text mentions.
    fn analyze_shaped(
        &self,
        db_hash: u64,
        text_hash: u64,
        sql: &str,
        (shape_text, literals): (&str, &analysis::Literals),
        catalog: &Catalog,
    ) -> (Arc<Analysis>, bool, u64, PlanCell, ShapeWords) {
        let fingerprint = xxh3_64(shape_text.as_bytes());
        let key = (db_hash, fingerprint);
        let known = {
            let map = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&key).filter(|m| *m.text == *shape_text).map(|m| {
                let analysis = m.template.as_ref().map(|t| (Arc::clone(t), m.plan.clone()));
                (analysis, m.words)
            })
        };
        match known {
            Some((Some((template, plan)), mentions)) => {
                (template, true, fingerprint, plan, mentions)
            }
            Some((None, mentions)) => (
                Arc::new(analysis::analyze(sql, catalog)),
                false,
                text_hash,
                PlanCell::default(),
                mentions,
            ),
            None => {
                let own = analysis::analyze(sql, catalog);
                let template = analysis::analyze(shape_text, catalog);
                let agrees = analysis::instantiate(&template, literals) == own;
                let plan = PlanCell::default();
                let mentions = ShapeWords::of(shape_text);
                let mut map = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() >= MAX_MEMOISED_ANALYSES {
                    map.clear();
                }
                map.insert(
                    key,
                    ShapeMemo {
                        text: shape_text.into(),
                        template: agrees.then(|| Arc::new(template)),
                        plan: plan.clone(),
                        words: mentions,
                    },
                );
                // The first text keeps its own analysis (with its key values in place); if the
                // shape cannot stand for it, its own fingerprint and plan cell too.
                let (fingerprint, plan) = if agrees {
                    (fingerprint, plan)
                } else {
                    (text_hash, PlanCell::default())
                };
                (Arc::new(own), false, fingerprint, plan, mentions)
            }
        }
    }

    /// Hints beat rules; the first matching rule beats the default.
    fn policy(&self, sql: &str, a: &Analysis) -> Policy {
        // Most queries carry no hint: a substring test spares the comment scan.
        if sql.contains("pgstash:") {
            let h = analysis::hints(sql);
            if h.skip {
                return Policy::Never;
            }
            if let Some(ttl) = h.ttl {
                return Policy::Cache(ttl);
            }
        }
        self.rules
            .iter()
            .find(|r| r.matches(sql, a))
            .map(|r| r.policy)
            .unwrap_or(Policy::Cache(self.config.default_ttl))
    }

    /// Apply a committed write locally (the relay publishes it to other instances).
    pub fn invalidate(&self, inv: &Invalidation) {
        self.gens.invalidate(inv);
    }

    /// A change source is to watch `db`: how its clients will wait for it to hear their
    /// hidden writes, for at most `max_wait` each.
    pub fn watched_by_source(&self, db: &str, max_wait: Duration) -> Arc<CatchUp> {
        let mut map = self.catch_ups.write().unwrap_or_else(|p| p.into_inner());
        map.entry(db.to_string())
            .or_insert_with(|| Arc::new(CatchUp::new(max_wait)))
            .clone()
    }

    /// How clients of `db` wait for its change source; `None` when no source watches it
    /// (then writes no statement names are never heard at all: README, "Known gaps").
    pub fn catch_up(&self, db: &str) -> Option<Arc<CatchUp>> {
        let map = self.catch_ups.read().unwrap_or_else(|p| p.into_inner());
        map.get(db).cloned()
    }

    /// Whether a change source vouches for `db` (always, when no source reported trouble).
    #[inline]
    pub fn source_healthy(&self, db: &str) -> bool {
        self.unhealthy
            .count
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
            || !self
                .unhealthy
                .dbs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(db)
    }

    /// A change source's report. Back to healthy drops everything cached: entries filled
    /// while the source was deaf may have missed invalidations.
    pub fn set_source_health(&self, db: &str, healthy: bool, reason: &str) {
        let changed = {
            let mut dbs = self.unhealthy.dbs.lock().unwrap_or_else(|p| p.into_inner());
            let changed = if healthy {
                let was = dbs.remove(db).is_some();
                if was {
                    self.gens.bump_all();
                }
                was
            } else {
                dbs.insert(db.to_string(), reason.to_string()).is_none()
            };
            self.unhealthy
                .count
                .store(dbs.len(), std::sync::atomic::Ordering::Release);
            changed
        };
        if healthy {
            if changed {
                tracing::info!(db, "change source caught up: caching resumes");
                // Everything cached before was just dropped: no commit need wait for the
                // echoes of writes made before (lost with the source's connection, maybe).
                if let Some(catch_up) = self.catch_up(db) {
                    catch_up.release_all();
                }
            }
            return;
        }
        if !changed {
            return;
        }
        tracing::warn!(
            db,
            reason,
            "change source cannot vouch for freshness: not serving cached results"
        );
        // Commits waiting for the source's echo need not wait any longer: nothing is served
        // from the cache here until the source is back, and then nothing from before. (A
        // commit from now on is not held: the relay sees the source unhealthy.)
        let Some(catch_up) = self.catch_up(db) else {
            return;
        };
        match self.tier.clone() {
            // Other instances may not know yet (a follower polls the leader's health), and
            // no source will tell them what the held commits wrote: they drop everything
            // before those commits are answered.
            Some(tier) if catch_up.waiting() => {
                tokio::spawn(async move {
                    tier.publish(&[Invalidation::All]).await;
                    catch_up.release_all();
                });
            }
            _ => catch_up.release_all(),
        }
    }

    /// Databases not served from the cache, with the reason.
    pub fn unhealthy_sources(&self) -> Vec<(String, String)> {
        let dbs = self.unhealthy.dbs.lock().unwrap_or_else(|p| p.into_inner());
        dbs.iter().map(|(d, r)| (d.clone(), r.clone())).collect()
    }

    /// Store a captured response in L1 (and L2 when it had a Redis snapshot). The bytes
    /// are copied only if they are going to be stored.
    pub fn fill(&self, key: CacheKey, fill: Fill, response: &[u8]) -> FillOutcome {
        let refused = fill.guard.refusal(&fill.snapshot, fill.ttl, &self.gens);
        let (outcome, response) = match refused {
            // Dropping the guard tells whoever waits for this fill to go upstream.
            Some(refused) => (refused, None),
            None => {
                let response = bytes::Bytes::copy_from_slice(response);
                let entry = Entry::new(response.clone(), fill.rows, fill.snapshot)
                    .planned_with(fill.catalog_epoch)
                    .tracked_by(fill.stats.clone());
                (fill.guard.fill(entry, fill.ttl, &self.gens), Some(response))
            }
        };
        let m = metrics();
        match outcome {
            FillOutcome::Stored => {
                m.fills_stored.inc();
                if let (Some(tier), Some(snap), Some(response)) = (&self.tier, fill.redis, response)
                {
                    tier.store(key, snap, response, fill.rows, fill.ttl);
                }
            }
            FillOutcome::Stale => {
                m.fills_stale.inc();
                if let Some(s) = &fill.stats {
                    s.invalidated();
                }
            }
            FillOutcome::NotAdmitted => m.fills_not_admitted.inc(),
            FillOutcome::NoTtl => {}
        }
        outcome
    }
}

impl crate::metrics::HealthReport for CacheShared {
    fn degraded(&self) -> Vec<String> {
        let m = metrics();
        m.l1_bytes.set(self.l1.weighted_size() as i64);
        m.l1_entries.set(self.l1.entry_count() as i64);
        m.cache_suspended.set(i64::from(self.gens.is_suspended()));
        let mut out = Vec::new();
        if let Some(t) = &self.tier {
            m.redis_breaker_open.set(i64::from(t.breaker_open()));
            if t.breaker_open() {
                out.push("redis: unavailable (circuit breaker open)".to_string());
            }
            if !t.is_subscribed() {
                out.push("redis: invalidation channel not heard".to_string());
            }
        }
        if self.gens.is_suspended() {
            out.push("cache: L1 suspended (freshness cannot be proven)".to_string());
        }
        for (db, reason) in self.unhealthy_sources() {
            out.push(format!(
                "source: database {db} not served from cache: {reason}"
            ));
        }
        out
    }
}

/// A tokio-postgres connection string for control-plane connections to `t`.
pub fn control_url(t: &UpstreamTarget) -> String {
    let mut url = format!(
        "host={} port={} user={} dbname={}",
        t.host,
        t.port,
        quote(&t.user),
        quote(&t.database)
    );
    if let Some(p) = &t.password {
        url.push_str(&format!(" password={}", quote(p)));
    }
    url.push_str(" application_name=pgstash-catalog");
    url
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

pub fn table_id(name: &str) -> TableId {
    TableId(xxh3_64(name.as_bytes()))
}

pub fn key_hash(k: i64) -> u64 {
    xxh3_64(&k.to_be_bytes())
}

/// What DDL invalidates, appended to `out`, and the tables it changed, added to `written`
/// (see [`Analyzed::invalidations`]).
fn ddl_invalidations(
    d: &DdlInfo,
    catalog: &Catalog,
    out: &mut Vec<Invalidation>,
    written: &mut impl Extend<TableId>,
) {
    match &d.scope {
        DdlScope::Tables(tables) => {
            for t in tables {
                for f in catalog.write_family(&t.name).map(table_id) {
                    out.push(Invalidation::Wide(f));
                    written.extend(Some(f));
                }
            }
        }
        DdlScope::Database(_) => out.push(Invalidation::All),
    }
}

/// What a write's invalidations take from the catalog, per table the write names (in the
/// analysis' order). Computed once per memoised analysis and catalog, so that a repeated
/// write (or a new text of a known shape) does no catalog lookups or name hashing.
#[derive(Debug)]
pub struct WriteShape {
    tables: Vec<WrittenTable>,
}

#[derive(Debug)]
struct WrittenTable {
    own: TableId,
    /// The table's integer primary key column: a write pinning it by equality invalidates
    /// only those keys (and the rest of the family wholly).
    key: Option<String>,
    /// What a write to it must invalidate ([`Catalog::write_family`]), itself included.
    family: Vec<TableId>,
}

impl WriteShape {
    fn of(w: &WriteInfo, catalog: &Catalog) -> WriteShape {
        let tables = w
            .tables
            .iter()
            .map(|tw| {
                let name = tw.table.name.as_str();
                WrittenTable {
                    own: table_id(name),
                    key: catalog.int_key(name).map(|k| k.column.clone()),
                    family: catalog.write_family(name).map(table_id).collect(),
                }
            })
            .collect();
        WriteShape { tables }
    }
}

/// Whether a statement may write tables that neither its text nor the catalog's write
/// targets name: a call of a function that may write (in the text, or in a view, policy,
/// column default or domain check it reaches), a procedure, unparsed or database-wide
/// DDL, any DDL under a user event trigger, or a write to a table with triggers or rules.
pub fn writes_unnamed_tables(a: &Analysis, catalog: &Catalog) -> bool {
    match a {
        Analysis::Bypass(reason) => reason.may_write(),
        Analysis::Write(w) => {
            w.hidden_writes
                || w.tables
                    .iter()
                    .any(|t| catalog.writes_elsewhere(&t.table.name))
        }
        Analysis::Ddl(d) => match &d.scope {
            DdlScope::Database(_) => true,
            // REFRESH MATERIALIZED VIEW runs the view's query.
            DdlScope::Tables(tables) => {
                catalog.event_triggers || tables.iter().any(|t| catalog.reads_write(&t.name))
            }
        },
        Analysis::Read(r) => r.tables.iter().any(|t| catalog.reads_write(&t.name)),
        Analysis::Other => false,
    }
}

/// The canonical integer keys a write touches, if every row it touches is pinned by the
/// table's integer primary key `pk`.
fn row_keys(tw: &TableWrite, pk: &str, values: Values<'_>) -> Option<Vec<u64>> {
    let WriteEffect::Keys(conjunctions) = &tw.effect else {
        return None;
    };
    conjunctions
        .iter()
        .map(|conj| pk_value(conj, pk, values).map(key_hash))
        .collect()
}

fn pk_value(conj: &[ColumnValue], pk: &str, values: Values<'_>) -> Option<i64> {
    conj.iter()
        .find(|cv| cv.column == pk)
        .and_then(|cv| value_int(&cv.value, values))
}

fn value_int(v: &KeyValue, values: Values<'_>) -> Option<i64> {
    match (v, values) {
        (KeyValue::Literal(s), _) => canonical_int(s),
        (KeyValue::Param(n), Values::Literals(literals)) => {
            canonical_int(literals.get(n.checked_sub(1)?)?)
        }
        (KeyValue::Param(n), Values::Params(params)) => params?.int_param(*n),
    }
}

/// A cacheable read: its key and what it depends on.
pub struct ReadPlan {
    pub key: CacheKey,
    /// The epoch of the catalog this plan was made with (see [`Entry::catalog_epoch`]).
    pub catalog_epoch: u64,
    /// A point read's key dependency: the value it pins.
    point_key: Option<Dependency>,
    shape: Arc<PlanShape>,
}

impl ReadPlan {
    /// The generations the result depends on (needed on a miss only).
    pub fn deps(&self) -> Vec<Dependency> {
        match self.point_key {
            Some(k) => std::iter::once(k)
                .chain(self.shape.point_deps.iter().copied())
                .collect(),
            None => self.shape.wide_deps.clone(),
        }
    }

    /// The ids of [`ReadPlan::tables`].
    pub fn table_ids(&self) -> impl Iterator<Item = TableId> + '_ {
        let (deps, own) = match (&self.point_key, &self.shape.point) {
            (Some(_), Some((t, _))) => (&self.shape.point_deps, Some(*t)),
            _ => (&self.shape.wide_deps, None),
        };
        deps.iter()
            .map(|d| match d {
                Dependency::AnyOf(t) | Dependency::Key(t, _) => *t,
            })
            .chain(own)
    }

    /// The tables the result depends on, by name.
    pub fn tables(&self) -> &[String] {
        match self.point_key {
            Some(_) => &self.shape.point_tables,
            None => &self.shape.wide_tables,
        }
    }
}

/// What a read's plan takes from its analysis and the catalog: everything but the key
/// value a point read pins and the cache key. Computed once per memoised analysis and
/// catalog, so that a repeated query does no catalog lookups.
#[derive(Debug)]
pub struct PlanShape {
    /// The single table read and its integer key column, when the read pins it by equality.
    point: Option<(TableId, String)>,
    /// For a point read that finds its key value: the dependencies besides that key, and
    /// the tables it reads.
    point_deps: Vec<Dependency>,
    point_tables: Vec<String>,
    /// For any other read.
    wide_deps: Vec<Dependency>,
    wide_tables: Vec<String>,
}

impl PlanShape {
    /// `None` when the analysis says the read must not be cached.
    pub fn of(a: &Analysis, catalog: &Catalog) -> Option<PlanShape> {
        let Analysis::Read(r) = a else { return None };
        // A relation the catalog does not list as a table, view or the like is either a
        // sequence, a system relation, or one created since the catalog was read (behind
        // pgstash's back, and not reported: the DDL hooks skip sequences): nothing would
        // invalidate what is read from it.
        if r.tables
            .iter()
            .any(|t| catalog.is_opaque(&t.name) || !catalog.is_user_relation(&t.name))
        {
            return None;
        }
        let mut shape = PlanShape {
            point: None,
            point_deps: Vec::new(),
            point_tables: Vec::new(),
            wide_deps: Vec::new(),
            wide_tables: Vec::new(),
        };
        if let Some(p) = r.point.as_ref().filter(|_| r.tables.len() == 1)
            && let Some(pk) = catalog.int_key(&p.table.name)
        {
            let name = &p.table.name;
            for other in catalog.other_reads(name) {
                shape.point_deps.push(Dependency::AnyOf(table_id(other)));
                shape.point_tables.push(other.clone());
            }
            shape.point_tables.push(name.clone());
            shape.point = Some((table_id(name), pk.column.clone()));
        }
        for t in &r.tables {
            for dep in catalog.read_dependencies(&t.name) {
                shape.wide_deps.push(Dependency::AnyOf(table_id(&dep)));
                shape.wide_tables.push(dep);
            }
        }
        Some(shape)
    }
}

/// Whether running `sql` may make the rest of its transaction stricter than READ COMMITTED
/// or change settings the cache key does not carry yet (`SET LOCAL ROLE`, `SET search_path`
/// before COMMIT): the transaction then bypasses the cache until it ends. A property of the
/// text alone, memoised with its analysis.
pub fn changes_transaction(sql: &str) -> bool {
    use crate::session::scan::{first_word, statements};
    let changes_settings = |stmt: &str| {
        let first = first_word(stmt).unwrap_or("");
        first.eq_ignore_ascii_case("set") || first.eq_ignore_ascii_case("reset")
    };
    names_strict_isolation(sql)
        // `BEGIN; SET LOCAL ROLE r` in one query string: every statement counts.
        || statements(sql).any(changes_settings)
}

/// [`changes_transaction`] of a text that has a literal shape: one statement that starts
/// with a query or DML keyword, never SET or RESET, so only the isolation words matter.
/// `shape_mentions` is [`mentions_isolation`] of the shape's text, memoised with the shape.
///
/// The words are letters only, so each of their occurrences in `sql` lies either in text
/// the shape keeps verbatim or inside one literal's value (plain strings are kept verbatim,
/// integers hold no letters, and the `$k` standing in for a literal holds none to join an
/// occurrence across it): `sql` mentions one iff the shape's text or a literal does. Most
/// texts mention none, and their full scan is skipped.
fn shaped_changes_transaction(
    sql: &str,
    literals: &analysis::Literals,
    shape_mentions: bool,
) -> bool {
    (shape_mentions || literals.iter().any(mentions_isolation)) && names_strict_isolation(sql)
}

/// Whether `sql` holds REPEATABLE or SERIALIZABLE anywhere (the words
/// [`names_strict_isolation`] looks for), case-insensitively.
fn mentions_isolation(sql: &str) -> bool {
    static ISOLATION: crate::session::scan::Needles =
        crate::session::scan::Needles::new(&[b"repeatable", b"serializable"]);
    ISOLATION.any_in(sql)
}

/// Whether `sql` says REPEATABLE READ or SERIALIZABLE anywhere.
fn names_strict_isolation(sql: &str) -> bool {
    use crate::session::scan::{Tok, contains_ignore_case, statements, tokens};
    // REPEATABLE READ as two tokens, whatever spacing or comments stand between them.
    let repeatable_read = |stmt: &str| {
        let t = tokens(stmt, 32);
        t.windows(2).any(|w| {
            matches!(&w[0], Tok::Word(a) if a == "repeatable")
                && matches!(&w[1], Tok::Word(b) if b == "read")
        })
    };
    // One pass rules both words out (nearly always), instead of one pass for each.
    mentions_isolation(sql)
        && ((contains_ignore_case(sql, b"repeatable") && statements(sql).any(repeatable_read))
            || contains_ignore_case(sql, b"serializable"))
}

/// The cache key's seed: who is asking, where, with which settings (role, search_path,
/// TimeZone, ... all live in the settings fingerprint). Keys of different seeds differ.
pub fn key_seed(db: &str, user: &str, settings_fingerprint: u64) -> u64 {
    xxh3_64_with_seed(
        user.as_bytes(),
        xxh3_64_with_seed(db.as_bytes(), settings_fingerprint),
    )
}

/// The key of a simple Query's answer: the whole text (one hash pass, no streaming state).
pub fn query_key(seed: u64, sql: &str) -> CacheKey {
    CacheKey(xxh3_128_with_seed(sql.as_bytes(), seed ^ QUERY_TAG))
}

/// The key of an extended-protocol answer: text, parameter types, the Bind's parameters and
/// result formats, and whether the batch parsed and described (their answers are stored).
/// `buf` is scratch space: the parts are hashed in one pass over their concatenation (the
/// same key as hashing them in a stream, for less work on short inputs).
pub fn execute_key(
    buf: &mut Vec<u8>,
    seed: u64,
    sql: &str,
    param_types: &[u8],
    bind_tail: &[u8],
    flags: [u8; 2],
) -> CacheKey {
    buf.clear();
    buf.extend_from_slice(sql.as_bytes());
    buf.push(0);
    buf.extend_from_slice(param_types);
    buf.push(0);
    buf.extend_from_slice(bind_tail);
    buf.extend_from_slice(&flags);
    CacheKey(xxh3_128_with_seed(buf, seed ^ EXECUTE_TAG))
}

/// Keep the two protocols' keys apart.
const QUERY_TAG: u64 = 0x5155_4552_5900_0000;
const EXECUTE_TAG: u64 = 0x4558_4543_5554_4500;

impl Analyzed {
    /// Plan a read: `None` when it must not be cached. `key` covers everything the answer
    /// depends on but the tables' contents.
    pub fn read_plan(
        &self,
        catalog: &Arc<Catalog>,
        key: CacheKey,
        params: Option<&BindParams<'_>>,
    ) -> Option<ReadPlan> {
        Some(self.plan_with(self.plan_shape(catalog)?, catalog, key, params))
    }

    /// [`Analyzed::read_plan`] with the shape [`Analyzed::plan_shape`] gave.
    pub fn plan_with(
        &self,
        shape: Arc<PlanShape>,
        catalog: &Catalog,
        key: CacheKey,
        params: Option<&BindParams<'_>>,
    ) -> ReadPlan {
        let point_key = shape.point.as_ref().and_then(|(t, column)| {
            let Analysis::Read(r) = &*self.analysis else {
                return None;
            };
            let k = pk_value(&r.point.as_ref()?.candidates, column, self.values(params))?;
            Some(Dependency::Key(*t, key_hash(k)))
        });
        ReadPlan {
            key,
            catalog_epoch: catalog.epoch,
            point_key,
            shape,
        }
    }

    /// What this statement invalidates when its transaction commits (appended to `out`), and
    /// the tables it writes (to `written`). `params`: the Bind's, for the extended protocol.
    pub fn invalidations(
        &self,
        catalog: &Arc<Catalog>,
        params: Option<&BindParams<'_>>,
        out: &mut Vec<Invalidation>,
        written: &mut impl Extend<TableId>,
    ) {
        let values = self.values(params);
        match &*self.analysis {
            Analysis::Write(w) => {
                let shape = for_catalog(&self.plan_shape.write, catalog, || {
                    Arc::new(WriteShape::of(w, catalog))
                });
                for (tw, t) in w.tables.iter().zip(&shape.tables) {
                    match t.key.as_deref().and_then(|pk| row_keys(tw, pk, values)) {
                        Some(keys) => {
                            out.push(Invalidation::Keys(t.own, keys));
                            // The rest of the family wholly. Ids, not names: generations
                            // are kept by id, so equal ids are one table to the cache.
                            out.extend(
                                t.family
                                    .iter()
                                    .filter(|&&f| f != t.own)
                                    .map(|&f| Invalidation::Wide(f)),
                            );
                        }
                        None => out.extend(t.family.iter().map(|&f| Invalidation::Wide(f))),
                    }
                    written.extend(t.family.iter().copied());
                }
            }
            Analysis::Ddl(d) => ddl_invalidations(d, catalog, out, written),
            _ => {}
        }
    }

    /// The plan shape under `catalog` (see [`for_catalog`]), `None` when the read must not
    /// be cached: memoised, so this tells cacheability for a lookup, and
    /// [`Analyzed::plan_with`] then plans the read with its key value.
    pub fn plan_shape(&self, catalog: &Arc<Catalog>) -> Option<Arc<PlanShape>> {
        for_catalog(&self.plan_shape.read, catalog, || {
            PlanShape::of(&self.analysis, catalog).map(Arc::new)
        })
    }
}

/// A fill in progress: the response bytes are captured while they are relayed.
pub struct Fill {
    pub guard: FillGuard,
    pub snapshot: Snapshot,
    /// The Redis generations seen before going upstream, when L2 was consulted.
    pub redis: Option<RedisSnapshot>,
    pub key: CacheKey,
    pub catalog_epoch: u64,
    pub stats: Option<Tracked>,
    /// Where in the client buffer this response starts.
    pub start: usize,
    pub ttl: Duration,
    pub rows: u64,
    pub started: std::time::Instant,
    /// Set when something makes the response unfit to store (error, suspended portal,
    /// notification, parameter change, too large).
    pub spoiled: bool,
}

/// A miss that will be filled by the response to the forwarded request.
pub struct PendingFill {
    pub guard: FillGuard,
    pub snapshot: Snapshot,
    pub redis: Option<RedisSnapshot>,
    pub key: CacheKey,
    pub catalog_epoch: u64,
    pub stats: Option<Tracked>,
    pub ttl: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tier {
    L1,
    L2,
}

/// Outcome of a lookup for a planned read.
pub enum ReadOutcome {
    Hit(bytes::Bytes, Tier),
    Fill(PendingFill),
}

/// L1, then L2. The local snapshot is taken before L2 is asked, so an invalidation that
/// arrives while Redis answers makes the L1 copy of an L2 hit stale, never wrongly fresh.
pub async fn lookup(
    shared: &CacheShared,
    plan: &ReadPlan,
    ttl: Duration,
    stats: Option<Tracked>,
) -> ReadOutcome {
    let mut guard = match shared.l1.get(plan.key, &shared.gens).await {
        Resolved::Hit(e) => return ReadOutcome::Hit(e.response.clone(), Tier::L1),
        Resolved::Miss(guard) => guard,
    };
    if guard.found_stale()
        && let Some(s) = &stats
    {
        s.invalidated();
    }
    let deps = plan.deps();
    let snapshot = shared.gens.snapshot(&deps);
    let mut redis = None;
    if let Some(tier) = &shared.tier {
        match tier.lookup(plan.key, &deps).await {
            L2Lookup::Hit { response, rows } => {
                metrics().hits_l2.inc();
                let entry = Entry::new(response.clone(), rows, snapshot)
                    .planned_with(plan.catalog_epoch)
                    .tracked_by(stats.clone());
                guard.admit(); // cached by some instance: the key repeats
                let _ = guard.fill(entry, ttl, &shared.gens);
                return ReadOutcome::Hit(response, Tier::L2);
            }
            L2Lookup::Miss(snap) => redis = Some(snap),
            L2Lookup::Unavailable => {}
        }
    }
    ReadOutcome::Fill(PendingFill {
        guard,
        snapshot,
        redis,
        key: plan.key,
        catalog_epoch: plan.catalog_epoch,
        stats,
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{PointKey, ReadInfo, TableRef};

    fn shared() -> Arc<CacheShared> {
        let upstream = UpstreamTarget::parse("postgres://u@127.0.0.1:1/db").expect("url");
        CacheShared::new(
            CacheConfig::default(),
            None,
            upstream,
            Duration::from_secs(1),
        )
    }

    /// The cache, and two catalogs of table `t`: with the integer key `id` (a catalog as
    /// loaded), and without (as reloaded after the key was dropped).
    fn keyed_and_plain() -> (Arc<CacheShared>, Arc<Catalog>, Arc<Catalog>) {
        (
            shared(),
            Arc::new(Catalog::default().with_int_key("t", "id")),
            Arc::new(Catalog::default().with_relation("t")),
        )
    }

    fn point(table: &str, column: &str, value: &str) -> Analysis {
        let table = TableRef::new(None, table);
        Analysis::Read(ReadInfo {
            tables: vec![table.clone()],
            point: Some(PointKey {
                table,
                candidates: vec![ColumnValue {
                    column: column.into(),
                    value: KeyValue::Literal(value.into()),
                }],
            }),
        })
    }

    #[test]
    fn execute_keys_are_the_streamed_hash_of_their_parts() {
        let mut buf = Vec::new();
        for n in [0usize, 3, 17, 100, 200, 300, 5000] {
            let tail = vec![7u8; n];
            let mut h = xxhash_rust::xxh3::Xxh3::with_seed(42 ^ EXECUTE_TAG);
            for part in [
                &b"SELECT $1"[..],
                &[0],
                b"\0\x01\0\0\0\x17",
                &[0],
                &tail,
                &[1, 2],
            ] {
                h.update(part);
            }
            let key = execute_key(
                &mut buf,
                42,
                "SELECT $1",
                b"\0\x01\0\0\0\x17",
                &tail,
                [1, 2],
            );
            assert_eq!(key, CacheKey(h.digest128()), "{n}");
        }
    }

    #[test]
    fn every_schema_change_moves_the_catalogs_version() {
        let c = shared();
        let v0 = c.catalogs_version();
        c.schema_changed("db");
        let v1 = c.catalogs_version();
        assert_ne!(v1, v0);
        c.schema_changed_everywhere();
        assert_ne!(c.catalogs_version(), v1);
    }

    #[test]
    fn reads_of_relations_the_catalog_does_not_list_are_not_cached() {
        // A sequence, a system relation, or a table created since the catalog was read.
        let c = shared();
        let cat = Arc::new(Catalog::default().with_relation("t"));
        for sql in [
            "SELECT last_value FROM s",
            "SELECT relname FROM pg_class WHERE oid = 1",
            "SELECT v FROM t JOIN later USING (id)",
        ] {
            let a = c.analyze("db", sql, &cat);
            assert!(a.read_plan(&cat, CacheKey(1), None).is_none(), "{sql}");
        }
        let a = c.analyze("db", "SELECT v FROM t", &cat);
        assert!(a.read_plan(&cat, CacheKey(1), None).is_some());
    }

    #[test]
    fn a_plan_shape_is_memoised_for_its_own_catalog_only() {
        let (c, keyed, plain) = keyed_and_plain();
        let a = c.analyze("db", "SELECT v FROM t WHERE id = 5", &keyed);
        let key = CacheKey(1);
        let is_point = |p: ReadPlan| matches!(p.deps()[..], [Dependency::Key(_, _)]);
        assert!(is_point(a.read_plan(&keyed, key, None).expect("cacheable")));
        // The same analysis under another catalog (reloaded, the key gone): not the memo's.
        let wide = a.read_plan(&plain, key, None).expect("cacheable");
        assert_eq!(wide.deps(), vec![Dependency::AnyOf(table_id("t"))]);
        assert_eq!(wide.tables(), ["t".to_string()]);
        assert!(is_point(a.read_plan(&keyed, key, None).expect("cacheable")));
    }

    #[test]
    fn a_text_is_known_free_of_session_effects_only_when_it_is() {
        let c = shared();
        let cat = Catalog::default();
        // In this order: a shape's first text is analysed as itself, the next ones through
        // the shape's memo.
        for (sql, free) in [
            ("SELECT v FROM t WHERE id = 1", true),
            ("SELECT v FROM t WHERE id = 2", true),
            ("UPDATE t SET v = 'a' WHERE id = 1;", true),
            ("UPDATE t SET v = 'b' WHERE id = 2;", true),
            ("BEGIN", true),
            ("BEGIN", true),
            ("SET search_path = a", false),
            ("SELECT pg_advisory_lock(1)", false),
            ("SELECT pg_advisory_lock(2)", false),
            ("SELECT set_config('search_path', 'a', false)", false),
            ("SELECT set_config('search_path', 'b', false)", false),
            // The words in a literal of a known shape, and in a comment the shape keeps.
            ("SELECT v FROM t WHERE s = 'x'", true),
            ("SELECT v FROM t WHERE s = 'set_config'", false),
            ("SELECT 1 /* pg_temp */", false),
            ("SELECT 2 /* pg_temp */", false),
        ] {
            let a = c.analyze("db", sql, &cat);
            assert_eq!(a.no_session_effects, free, "{sql}");
            if free {
                assert!(crate::session::effects_of(sql).is_empty(), "{sql}");
            }
        }
        // What the texts above not claimed free do, as the scan sees it.
        for sql in [
            "SET search_path = a",
            "SELECT pg_advisory_lock(2)",
            "SELECT set_config('search_path', 'b', false)",
        ] {
            assert!(!crate::session::effects_of(sql).is_empty(), "{sql}");
        }
    }

    #[test]
    fn a_write_shape_is_memoised_for_its_own_catalog_only() {
        let (c, keyed, plain) = keyed_and_plain();
        let a = c.analyze("db", "UPDATE t SET v = 1 WHERE id = 5", &keyed);
        let invalidated = |cat: &Arc<Catalog>| {
            let (mut out, mut written) = (Vec::new(), Vec::new());
            a.invalidations(cat, None, &mut out, &mut written);
            assert_eq!(written, vec![table_id("t")]);
            out
        };
        let t = table_id("t");
        let by_key = vec![Invalidation::Keys(t, vec![key_hash(5)])];
        assert_eq!(invalidated(&keyed), by_key);
        // The same analysis under another catalog (reloaded, the key gone): not the memo's.
        assert_eq!(invalidated(&plain), vec![Invalidation::Wide(t)]);
        assert_eq!(invalidated(&keyed), by_key);
    }

    #[test]
    fn texts_of_one_shape_share_a_fingerprint_and_keep_their_own_key_values() {
        let c = shared();
        let cat = Catalog::default();
        let a = c.analyze("db", "SELECT v FROM t WHERE id = 5", &cat);
        let b = c.analyze("db", "SELECT v FROM t WHERE id = 0006", &cat);
        assert_eq!(a.instance(), point("t", "id", "5"));
        assert_eq!(b.instance(), point("t", "id", "6"));
        assert_eq!(a.fingerprint, b.fingerprint);
        // Another database has its own memo (its catalog may differ).
        let other = c.analyze("db2", "SELECT v FROM t WHERE id = 7", &cat);
        assert_eq!(other.instance(), point("t", "id", "7"));
    }

    #[test]
    fn texts_of_one_shape_invalidate_their_own_keys() {
        let c = shared();
        let cat = Arc::new(Catalog::default().with_int_key("t", "id"));
        let invalidated = |sql: &str| {
            let a = c.analyze("db", sql, &cat);
            let (mut out, mut written) = (Vec::new(), Vec::new());
            a.invalidations(&cat, None, &mut out, &mut written);
            assert_eq!(written, vec![table_id("t")], "{sql}");
            out
        };
        let t = table_id("t");
        // The first text of the shape is analysed as itself; the next ones share the shape's
        // analysis, whose key is `$2` (the string literal is `$1`).
        for (sql, key) in [
            ("UPDATE t SET v = 'a' WHERE id = 5", 5),
            ("UPDATE t SET v = 'b' WHERE id = 6", 6),
            ("UPDATE t SET v = 'a' WHERE id = 0007", 7),
            ("UPDATE t SET v = 'c' WHERE id = -8", -8),
        ] {
            assert_eq!(
                invalidated(sql),
                vec![Invalidation::Keys(t, vec![key_hash(key)])],
                "{sql}"
            );
        }
        let shared_shape = c.analyze("db", "UPDATE t SET v = 'd' WHERE id = 9", &cat);
        assert!(
            !shared_shape.literals.is_empty(),
            "analysed through the shape"
        );
        assert_eq!(
            shared_shape.instance(),
            analysis::analyze("UPDATE t SET v = 'd' WHERE id = 9", &*cat)
        );
        // Rows not pinned by the key: the whole table, for every text of the shape.
        for sql in [
            "UPDATE t SET v = 'e' WHERE w = 10",
            "UPDATE t SET v = 'f' WHERE w = 11",
        ] {
            assert_eq!(invalidated(sql), vec![Invalidation::Wide(t)], "{sql}");
        }
    }

    #[test]
    fn texts_of_one_shape_plan_once_and_keep_their_own_point_keys() {
        let c = shared();
        let cat = Arc::new(Catalog::default().with_int_key("t", "id"));
        let plan = |sql: &str| {
            c.analyze("db", sql, &cat)
                .read_plan(&cat, CacheKey(1), None)
                .expect("cacheable")
        };
        let five = plan("SELECT v FROM t WHERE id = 5");
        let six = plan("SELECT v FROM t WHERE id = 6");
        assert!(Arc::ptr_eq(&five.shape, &six.shape), "one plan shape");
        let t = table_id("t");
        assert_eq!(five.deps(), vec![Dependency::Key(t, key_hash(5))]);
        assert_eq!(six.deps(), vec![Dependency::Key(t, key_hash(6))]);
        // Another shape, another plan.
        let other = plan("SELECT v, 1 FROM t WHERE id = 5");
        assert!(!Arc::ptr_eq(&five.shape, &other.shape));
    }

    #[test]
    fn a_shape_that_analyses_differently_from_its_text_is_analysed_text_by_text() {
        let c = shared();
        let cat = Catalog::default();
        // `+5` is a key value, `+$1` is not: the shape's analysis differs from the text's,
        // so each text is parsed on its own.
        for sql in [
            "SELECT v FROM t WHERE id = +5",
            "SELECT v FROM t WHERE id = +6",
        ] {
            let got = c.analyze("db", sql, &cat);
            assert_eq!(got.instance(), analysis::analyze(sql, &cat), "{sql}");
            assert_eq!(got.fingerprint, xxh3_64(sql.as_bytes()));
        }
        assert_eq!(
            c.analyze("db", "SELECT v FROM t WHERE id = -6", &cat)
                .instance(),
            point("t", "id", "-6")
        );
    }

    #[test]
    fn a_shaped_text_is_memoised_on_its_second_sighting_only() {
        let c = shared();
        let cat = Catalog::default();
        let memoised = |c: &CacheShared| {
            c.analyses
                .iter()
                .map(|s| s.lock().expect("memo").len())
                .sum::<usize>()
        };
        // The shape's first text is parsed (and memoised: parsing is the costly path).
        c.analyze("db", "SELECT v FROM t WHERE id = 1", &cat);
        let after_first = memoised(&c);
        // A new text of a known shape: analysed through the shape, not memoised yet...
        let once = c.analyze("db", "SELECT v FROM t WHERE id = 2", &cat);
        assert_eq!(memoised(&c), after_first);
        // ...the same text again: the same analysis, and now memoised.
        let twice = c.analyze("db", "SELECT v FROM t WHERE id = 2", &cat);
        assert_eq!(memoised(&c), after_first + 1);
        assert_eq!(once.instance(), point("t", "id", "2"));
        assert_eq!(twice.instance(), once.instance());
        assert_eq!(twice.fingerprint, once.fingerprint);
        let thrice = c.analyze("db", "SELECT v FROM t WHERE id = 2", &cat);
        assert!(Arc::ptr_eq(&thrice, &twice), "served from the memo");
        assert!(thrice.is_for("SELECT v FROM t WHERE id = 2"));
        assert!(!thrice.is_for("SELECT v FROM t WHERE id = 3"));
    }

    #[test]
    fn a_text_without_literals_is_served_from_the_memo_from_its_second_sighting() {
        let c = shared();
        let cat = Catalog::default();
        let first = c.analyze("db", "SELECT v FROM t", &cat);
        let second = c.analyze("db", "SELECT v FROM t", &cat);
        assert!(Arc::ptr_eq(&first, &second), "served from the memo");
        let other_db = c.analyze("other", "SELECT v FROM t", &cat);
        assert!(!Arc::ptr_eq(&first, &other_db), "memoised per database");
    }

    #[test]
    fn shaped_texts_change_their_transaction_as_their_full_scan_says() {
        let mut shaped = 0;
        for sql in [
            "SELECT v FROM t WHERE id = 1",
            "/* set x */ SELECT v FROM t WHERE id = 1",
            "-- reset\n(SELECT v FROM t WHERE id = 1);",
            "SELECT set_config('transaction_isolation', 'serializable', true), 1",
            "SELECT 1 AS repeatable, 2 AS read FROM t",
            "SELECT repeatable read FROM t WHERE id = 3",
            "SELECT v FROM t WHERE note = 'SERIALIZABLE' AND id = 3",
            "SELECT v FROM t WHERE note = 'repeatable read' AND id = 3",
            "UPDATE t SET v = 1 WHERE id = 2",
            "SET search_path = 'x'",
            "BEGIN; SELECT 1",
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        ] {
            if let Some(shape) = analysis::literal_shape(sql) {
                shaped += 1;
                let shape_mentions = mentions_isolation(&shape.text);
                assert_eq!(
                    shaped_changes_transaction(sql, &shape.literals, shape_mentions),
                    changes_transaction(sql),
                    "{sql}"
                );
            }
        }
        // All but the last three, which have no literal shape.
        assert_eq!(shaped, 9);
    }

    /// The memo path: texts of a known shape take the isolation words of the shape from
    /// its memo and their own literals' from themselves.
    #[test]
    fn texts_of_a_known_shape_change_their_transaction_as_each_says() {
        let c = shared();
        let cat = Catalog::default();
        let changes = |sql: &str| c.analyze("db", sql, &cat).changes_transaction;
        for (first, second, expected) in [
            (
                "SELECT repeatable read FROM t WHERE id = 3",
                "SELECT repeatable read FROM t WHERE id = 4",
                true,
            ),
            (
                "SELECT v FROM t WHERE note = 'plain' AND id = 3",
                "SELECT v FROM t WHERE note = 'Serializable' AND id = 4",
                true,
            ),
            (
                "SELECT v FROM t WHERE note = 'serializable' AND id = 3",
                "SELECT v FROM t WHERE note = 'plain' AND id = 4",
                false,
            ),
        ] {
            changes(first);
            assert_eq!(changes(second), expected, "{second} after {first}");
            assert_eq!(changes_transaction(second), expected, "{second}");
        }
    }

    #[test]
    fn repeatable_read_is_found_however_it_is_spaced_and_only_then() {
        for sql in [
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
            "begin isolation level repeatable  read",
            "BEGIN ISOLATION LEVEL REPEATABLE /* c */\n READ",
            "START TRANSACTION READ ONLY, ISOLATION LEVEL REPEATABLE -- c\n READ",
            "SELECT 1; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        ] {
            assert!(changes_transaction(sql), "{sql}");
        }
        for sql in [
            "SELECT * FROM t WHERE NOT repeatable",
            "SELECT * FROM t TABLESAMPLE SYSTEM (10) REPEATABLE (1)",
            "BEGIN",
        ] {
            assert!(!changes_transaction(sql), "{sql}");
        }
    }

    #[test]
    fn time_literals_never_reach_a_cacheable_shape() {
        let c = shared();
        let cat = Catalog::default();
        c.analyze("db", "SELECT v FROM t WHERE d = '2020-01-01'", &cat);
        let now = c.analyze("db", "SELECT v FROM t WHERE d = 'now'", &cat);
        assert!(
            matches!(*now.analysis, Analysis::Bypass(_)),
            "{:?}",
            now.analysis
        );
    }
}
