//! With several pgstash instances sharing Redis, one of them runs a database's change
//! source (one LISTEN connection, one replication slot reader) and the others hear its
//! invalidations on the Redis channel. The reader is whoever holds a Redis lease; when it
//! stops renewing, another instance takes over within the lease time.
//!
//! Freshness across the hand-over: the leader mirrors its source's health into Redis and
//! the followers adopt it, so nobody serves from the cache while the source is down; and
//! whenever a leader's source becomes healthy it publishes a global invalidation, because
//! whatever changed while no source was listening was heard by nobody.

use super::{Change, ChangeSink};
use crate::cache::Invalidation;
use crate::redis_tier::RedisTier;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Starts a database's change source, delivering to the given sink until cancelled.
pub type StartSource = Arc<
    dyn Fn(Arc<dyn ChangeSink>, CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// How long a lease lasts without renewal; renewed three times as often.
pub const LEASE: Duration = Duration::from_secs(3);

/// Elect, run the source while leader, follow the leader's health otherwise.
pub async fn run(
    tier: Arc<RedisTier>,
    kind: &'static str,
    db: String,
    sink: Arc<dyn ChangeSink>,
    start: StartSource,
    cancel: CancellationToken,
) {
    let lease_key = tier.key(&format!("leader:{kind}:{db}"));
    let health_key = tier.key(&format!("health:{kind}:{db}"));
    let tick = LEASE / 3;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match tier.hold_lease(&lease_key, LEASE).await {
            Some(true) => {
                tracing::info!(db, kind, "this instance reads the change source");
                let mirror = Arc::new(Mirror {
                    inner: Arc::clone(&sink),
                    tier: Arc::clone(&tier),
                    key: health_key.clone(),
                    state: Arc::new(Mutex::new((false, "starting".into()))),
                });
                let child = cancel.child_token();
                let task = tokio::spawn(start(mirror.clone(), child.clone()));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            child.cancel();
                            let _ = task.await;
                            tier.release_lease(&lease_key).await;
                            return;
                        }
                        _ = tokio::time::sleep(tick) => {}
                    }
                    mirror.publish_health().await;
                    if tier.hold_lease(&lease_key, LEASE).await != Some(true) {
                        tracing::warn!(
                            db,
                            kind,
                            "lost the change-source lease: stopping the source"
                        );
                        child.cancel();
                        let _ = task.await;
                        sink.set_healthy(&db, false, "lost the change-source lease");
                        break;
                    }
                }
            }
            Some(false) => {
                match tier.get_string(&health_key).await {
                    Some(Some(v)) if v == "ok" => sink.set_healthy(&db, true, ""),
                    Some(Some(v)) => sink.set_healthy(&db, false, &format!("leader's source: {v}")),
                    Some(None) => {
                        sink.set_healthy(&db, false, "no instance reads the change source")
                    }
                    None => sink.set_healthy(
                        &db,
                        false,
                        "redis unavailable: the change source's leader cannot be heard",
                    ),
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(tick) => {}
                }
            }
            None => {
                sink.set_healthy(
                    &db,
                    false,
                    "redis unavailable: no change-source leader can be elected",
                );
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(tick) => {}
                }
            }
        }
    }
}

/// The leader's sink: the local cache, plus the health mirror and the catch-up flush.
struct Mirror {
    inner: Arc<dyn ChangeSink>,
    tier: Arc<RedisTier>,
    key: String,
    /// The source's latest report; whatever writes the key writes this, so concurrent
    /// writes cannot leave an older state behind.
    state: Arc<Mutex<(bool, String)>>,
}

fn health_value(state: &Mutex<(bool, String)>) -> String {
    let s = state.lock().unwrap_or_else(PoisonError::into_inner);
    if s.0 { "ok".to_string() } else { s.1.clone() }
}

impl Mirror {
    /// Refresh the health key (it expires with the lease, so a dead leader reads as none).
    async fn publish_health(&self) {
        let value = health_value(&self.state);
        self.tier.set_for(&self.key, &value, LEASE).await;
    }
}

impl ChangeSink for Mirror {
    fn apply(&self, db: &str, committed_at: Option<SystemTime>, changes: &[Change]) {
        self.inner.apply(db, committed_at, changes);
    }

    fn echo(&self, db: &str, payload: &str) {
        self.inner.echo(db, payload);
    }

    fn set_healthy(&self, db: &str, healthy: bool, reason: &str) {
        let was = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let was = s.0;
            *s = (healthy, reason.to_string());
            was
        };
        let (tier, key, state) = (
            Arc::clone(&self.tier),
            self.key.clone(),
            Arc::clone(&self.state),
        );
        let flush = healthy && !was;
        if flush {
            // In line with the source's stream (the sink publishes in the order it hears
            // things), so that an echo heard next is passed on only after this. The sink
            // does not say when its publication is done, and followers must not read "ok"
            // before it is: the task below publishes once more and awaits it (a second
            // global flush, once per recovery).
            self.inner.apply(db, None, &[Change::Database]);
        }
        tokio::spawn(async move {
            if flush {
                // Changes made while no source listened were heard by nobody: everyone
                // drops everything before followers are told to serve again.
                tier.publish(&[Invalidation::All]).await;
            }
            let value = health_value(&state);
            tier.set_for(&key, &value, LEASE).await;
        });
        self.inner.set_healthy(db, healthy, reason);
    }
}
