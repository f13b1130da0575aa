//! The relay's side of the cache: deciding, for a request the client sent, whether it is
//! answered from the cache, forwarded with a fill, or forwarded as a write whose tables are
//! invalidated at commit. The decisions are made here; the store is `cache`, the SQL
//! understanding is `analysis`, the schema facts are `catalog`.

use crate::analysis::{self, Analysis, ColumnValue, DdlScope, KeyValue, TableWrite, WriteEffect};
pub use crate::cache::Invalidation;
use crate::cache::{
    CacheKey, Dependency, Entry, FillGuard, FillOutcome, Generations, Invalidator, L1, Resolved,
    Snapshot, TableId,
};
use crate::catalog::Catalog;
use crate::config::{CacheConfig, UpstreamTarget};
use crate::relay::bind::{BindParams, canonical_int};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// Shared by every client of this pgstash instance.
pub struct CacheShared {
    pub config: CacheConfig,
    pub l1: L1,
    pub gens: Generations,
    upstream: UpstreamTarget,
    connect_timeout: Duration,
    catalogs: Mutex<HashMap<String, CatalogCell>>,
    analyses: Mutex<HashMap<(String, u64), Arc<Analysis>>>,
}

/// A database's catalog, loaded once by whichever client needs it first (`None`: unreadable).
type CatalogCell = Arc<OnceCell<Option<Arc<Catalog>>>>;

const MAX_MEMOISED_ANALYSES: usize = 50_000;

impl CacheShared {
    pub fn new(
        config: CacheConfig,
        upstream: UpstreamTarget,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(CacheShared {
            l1: L1::new(config.max_bytes),
            gens: Generations::new(1 << 20),
            config,
            upstream,
            connect_timeout,
            catalogs: Mutex::default(),
            analyses: Mutex::default(),
        })
    }

    /// The catalog of `db`, loaded on first use. `None` when it cannot be read: then nothing
    /// in that database is cached (a read could not be tied to the tables it depends on).
    pub async fn catalog(&self, db: &str) -> Option<Arc<Catalog>> {
        let cell = {
            let mut map = self.catalogs.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Forget what we know of `db`'s schema (after DDL), and the analyses that used it.
    pub fn schema_changed(&self, db: &str) {
        self.catalogs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(db);
        self.analyses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(d, _), _| d != db);
    }

    pub fn analyze(&self, db: &str, sql: &str, catalog: &Catalog) -> Arc<Analysis> {
        let key = (db.to_string(), xxh3_64(sql.as_bytes()));
        if let Some(a) = self
            .analyses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return a.clone();
        }
        let a = Arc::new(analysis::analyze(sql, catalog));
        let mut map = self.analyses.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_MEMOISED_ANALYSES {
            map.clear();
        }
        map.insert(key, a.clone());
        a
    }

    /// Invalidate what a committed write touched.
    pub fn invalidate(&self, inv: &Invalidation) {
        self.gens.invalidate(inv);
    }

    /// Store a captured response; says whether it was stored.
    pub fn fill(
        &self,
        guard: FillGuard,
        response: bytes::Bytes,
        snapshot: Snapshot,
        rows: u64,
        ttl: Duration,
    ) -> bool {
        matches!(
            guard.fill(Entry::new(response, rows, snapshot), ttl, &self.gens),
            FillOutcome::Stored
        )
    }
}

fn control_url(t: &UpstreamTarget) -> String {
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

fn key_hash(k: i64) -> u64 {
    xxh3_64(&k.to_be_bytes())
}

/// What a write will invalidate, and the table names it wrote (for read-your-writes bypass).
pub fn invalidations(
    a: &Analysis,
    catalog: &Catalog,
    params: Option<&BindParams<'_>>,
) -> (Vec<Invalidation>, Vec<String>) {
    let mut out = Vec::new();
    let mut names = Vec::new();
    match a {
        Analysis::Write(w) => {
            for tw in &w.tables {
                let name = tw.table.name.clone();
                let family = catalog.write_targets(&name);
                match int_keys(tw, catalog, params) {
                    Some(keys) => {
                        out.push(Invalidation::Keys(table_id(&name), keys));
                        for other in family.iter().filter(|f| **f != name) {
                            out.push(Invalidation::Wide(table_id(other)));
                        }
                    }
                    None => out.extend(family.iter().map(|f| Invalidation::Wide(table_id(f)))),
                }
                names.extend(family);
            }
        }
        Analysis::Ddl(d) => match &d.scope {
            DdlScope::Tables(tables) => {
                for t in tables {
                    for f in catalog.write_targets(&t.name) {
                        out.push(Invalidation::Wide(table_id(&f)));
                        names.push(f);
                    }
                }
            }
            DdlScope::Database(_) => out.push(Invalidation::All),
        },
        _ => {}
    }
    (out, names)
}

/// The canonical integer keys a write touches, if every row it touches is pinned by the
/// table's integer primary key.
fn int_keys(
    tw: &TableWrite,
    catalog: &Catalog,
    params: Option<&BindParams<'_>>,
) -> Option<Vec<u64>> {
    let pk = catalog.int_key(&tw.table.name)?;
    let WriteEffect::Keys(conjunctions) = &tw.effect else {
        return None;
    };
    conjunctions
        .iter()
        .map(|conj| pk_value(conj, &pk.column, params).map(key_hash))
        .collect()
}

fn pk_value(conj: &[ColumnValue], pk: &str, params: Option<&BindParams<'_>>) -> Option<i64> {
    conj.iter()
        .find(|cv| cv.column == pk)
        .and_then(|cv| value_int(&cv.value, params))
}

fn value_int(v: &KeyValue, params: Option<&BindParams<'_>>) -> Option<i64> {
    match v {
        KeyValue::Literal(s) => canonical_int(s),
        KeyValue::Param(n) => params?.int_param(*n),
    }
}

/// A cacheable read: its key and what it depends on.
pub struct ReadPlan {
    pub key: CacheKey,
    pub deps: Vec<Dependency>,
    pub tables: Vec<String>,
}

/// Key material that does not depend on the request: who is asking, where, with which
/// settings (role, search_path, TimeZone, ... all live in the settings fingerprint).
pub fn key_prefix(db: &str, user: &str, settings_fingerprint: u64) -> Xxh3 {
    let mut h = Xxh3::new();
    h.update(db.as_bytes());
    h.update(&[0]);
    h.update(user.as_bytes());
    h.update(&[0]);
    h.update(&settings_fingerprint.to_le_bytes());
    h
}

/// Plan a read: `None` when the analysis says it must not be cached.
pub fn read_plan(
    a: &Analysis,
    catalog: &Catalog,
    mut key: Xxh3,
    params: Option<&BindParams<'_>>,
) -> Option<ReadPlan> {
    let Analysis::Read(r) = a else { return None };
    let mut deps = Vec::new();
    let mut tables = Vec::new();
    let point = r.point.as_ref().and_then(|p| {
        let pk = catalog.int_key(&p.table.name)?;
        (r.tables.len() == 1).then_some(())?;
        pk_value(&p.candidates, &pk.column, params).map(|k| (p.table.name.clone(), key_hash(k)))
    });
    match point {
        Some((name, k)) => {
            let t = table_id(&name);
            deps.push(Dependency::Key(t, k));
            tables.push(name);
        }
        None => {
            for t in &r.tables {
                for dep in catalog.read_dependencies(&t.name) {
                    deps.push(Dependency::AnyOf(table_id(&dep)));
                    tables.push(dep);
                }
            }
        }
    }
    key.update(&[0xff]);
    Some(ReadPlan {
        key: CacheKey(key.digest128()),
        deps,
        tables,
    })
}

/// A fill in progress: the response bytes are captured while they are relayed.
pub struct Fill {
    pub guard: FillGuard,
    pub snapshot: Snapshot,
    /// Where in the client buffer this response starts.
    pub start: usize,
    pub ttl: Duration,
    pub rows: u64,
    /// Set when something makes the response unfit to store (error, suspended portal,
    /// notification, parameter change, too large).
    pub spoiled: bool,
}

/// Outcome of a lookup for a planned read.
pub enum ReadOutcome {
    Hit(bytes::Bytes),
    Fill(FillGuard, Snapshot),
    /// Another client is filling and did not finish in time, or the fingerprint is bypassed.
    Forward,
}

pub async fn lookup(shared: &CacheShared, plan: &ReadPlan) -> ReadOutcome {
    match shared.l1.get(plan.key, &shared.gens).await {
        Resolved::Hit(e) => ReadOutcome::Hit(e.response.clone()),
        Resolved::Miss(guard) => ReadOutcome::Fill(guard, shared.gens.snapshot(&plan.deps)),
    }
}

/// The lifetime for a read's entry, from its `/* pgstash: ... */` hint or the default;
/// `None` when the hint says to skip the cache.
pub fn ttl_for(config: &CacheConfig, sql: &str) -> Option<Duration> {
    // Most queries carry no hint: a substring test spares the comment scan.
    if !sql.contains("pgstash:") {
        return Some(config.default_ttl);
    }
    let h = analysis::hints(sql);
    if h.skip {
        return None;
    }
    Some(h.ttl.unwrap_or(config.default_ttl))
}
