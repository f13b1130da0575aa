//! The cache's side of a change source: turns [`Change`]s into generation bumps (through the
//! catalog: partitions and inheritance children invalidate their family, integer primary
//! keys invalidate row by row), publishes them to other instances, measures staleness, and
//! stops the cache for a database while its source cannot vouch for it.

use super::{Change, ChangeSink};
use crate::cache::Invalidation;
use crate::metrics::{InvalidationOrigin, metrics};
use crate::relay::bind::canonical_int;
use crate::relay::caching::{CacheShared, key_hash, table_id};
use std::sync::Arc;
use std::time::SystemTime;

pub struct CacheSink {
    cache: Arc<CacheShared>,
    origin: InvalidationOrigin,
    /// Held (shared) by each publication to Redis while it runs; an echo takes it
    /// exclusively, so that it is told only once the publications before it are done (the
    /// lock is fair: later publications wait behind the echo).
    publishing: Arc<tokio::sync::RwLock<()>>,
}

impl CacheSink {
    pub fn new(cache: Arc<CacheShared>, origin: InvalidationOrigin) -> CacheSink {
        CacheSink {
            cache,
            origin,
            publishing: Arc::default(),
        }
    }

    fn invalidations(&self, db: &str, changes: &[Change]) -> Vec<Invalidation> {
        // Without the catalog the family and key of a table are unknown: everything.
        let Some(catalog) = self.cache.loaded_catalog(db) else {
            return vec![Invalidation::All];
        };
        let mut out = Vec::new();
        for change in changes {
            match change {
                Change::Database => return vec![Invalidation::All],
                Change::Table(t) => out.extend(
                    catalog
                        .write_targets(&t.name)
                        .iter()
                        .map(|f| Invalidation::Wide(table_id(f))),
                ),
                Change::Rows { table, keys } => {
                    let family = catalog.write_targets(&table.name);
                    let keyed = keys.as_ref().and_then(|ks| {
                        catalog.int_key(&table.name)?;
                        ks.iter()
                            .map(|k| canonical_int(k).map(key_hash))
                            .collect::<Option<Vec<u64>>>()
                    });
                    match keyed {
                        Some(ks) => {
                            out.push(Invalidation::Keys(table_id(&table.name), ks));
                            out.extend(
                                family
                                    .iter()
                                    .filter(|f| **f != table.name)
                                    .map(|f| Invalidation::Wide(table_id(f))),
                            );
                        }
                        None => out.extend(family.iter().map(|f| Invalidation::Wide(table_id(f)))),
                    }
                }
            }
        }
        out
    }
}

impl ChangeSink for CacheSink {
    fn apply(&self, db: &str, committed_at: Option<SystemTime>, changes: &[Change]) {
        let mut invs = self.invalidations(db, changes);
        let ddl = changes
            .iter()
            .any(|c| matches!(c, Change::Database | Change::Table(_)));
        if ddl && self.cache.tier.is_some() {
            // Other instances reload their catalogs too (see TableId::SCHEMA_CHANGED).
            invs.push(Invalidation::Wide(crate::cache::TableId::SCHEMA_CHANGED));
        }
        // Locally at once; then Redis (other instances, L2), then locally again: an L1 copy
        // of an old L2 value made between the first bump and Redis's is dropped too.
        for inv in &invs {
            self.cache.invalidate(inv);
        }
        metrics().invalidated(self.origin, invs.len() as u64);
        // DDL behind pgstash's back (ALTER TABLE, a new view...) may change what the
        // catalog says; TRUNCATE and REFRESH come this way too, and a reload is cheap.
        if changes
            .iter()
            .any(|c| matches!(c, Change::Database | Change::Table(_)))
        {
            self.cache.schema_changed(db);
        }
        if let Some(at) = committed_at
            && let Ok(lag) = SystemTime::now().duration_since(at)
        {
            metrics()
                .staleness_seconds
                .with_label_values(&[self.origin.label()])
                .observe(lag.as_secs_f64());
        }
        if let Some(tier) = self.cache.tier.clone() {
            let cache = Arc::clone(&self.cache);
            // Taken now, in the order the source heard the changes (see `publishing`).
            let held = Arc::clone(&self.publishing).try_read_owned().ok();
            let publishing = Arc::clone(&self.publishing);
            tokio::spawn(async move {
                let _held = match held {
                    Some(guard) => guard,
                    None => publishing.read_owned().await,
                };
                tier.publish(&invs).await;
                for inv in &invs {
                    cache.invalidate(inv);
                }
            });
        }
    }

    /// With Redis, the changes heard before the echo are in effect once Redis has them
    /// too: until then another client could copy an old value from the shared tier. Then
    /// this instance's own echo is heard here, another's is passed on through Redis.
    fn echo(&self, db: &str, payload: &str) {
        let Some(tier) = self.cache.tier.clone() else {
            if let Some(catch_up) = self.cache.catch_up(db) {
                catch_up.echo_back(payload);
            }
            return;
        };
        let (publishing, cache) = (Arc::clone(&self.publishing), Arc::clone(&self.cache));
        let (db, payload) = (db.to_string(), payload.to_string());
        tokio::spawn(async move {
            drop(publishing.write().await);
            let own = cache
                .catch_up(&db)
                .is_some_and(|catch_up| catch_up.echo_back(&payload));
            if !own {
                tier.publish_echo(&db, &payload).await;
            }
        });
    }

    fn set_healthy(&self, db: &str, healthy: bool, reason: &str) {
        metrics()
            .source_healthy
            .with_label_values(&[self.origin.label(), db])
            .set(i64::from(healthy));
        self.cache.set_source_health(db, healthy, reason);
    }
}
