//! The `wal` change source: a small logical-replication client that streams pgoutput from a
//! slot of our own, turns each committed transaction into [`Change`]s for the sink, and tells
//! the sink whether it currently vouches for the database (DESIGN.md "Freshness").
//!
//! One session = a normal connection (publication and slot setup, then a periodic heartbeat
//! transaction whose WAL position the stream must reach within `max_lag`: that bounds
//! staleness even when the walsender is stuck or far behind) plus a replication connection
//! streaming the slot. Any error ends the session; [`run`] reports the database unhealthy and
//! starts a new one after a backoff of 100 ms doubling up to 5 s. The slot's confirmed
//! position moves only after the sink applied a transaction, so whatever was not applied
//! before a crash or disconnect is streamed again.
//!
//! DDL and `REFRESH MATERIALIZED VIEW` are not in pgoutput's stream. pgstash's DDL hooks
//! (migrations 0002 and 0003) write what they report into the WAL as transactional logical
//! decoding messages, which the stream carries inside their transaction: they are applied
//! and confirmed with it. So the source needs migration 0003 in its database: each session
//! checks for it before it touches the slot, and again with every heartbeat (a disabled
//! event trigger reports nothing); when it is missing, or a transaction reverts it, the
//! session ends and the database is unhealthy until it is back.

use super::changes::Collector;
use super::installed::Missing;
use super::lag::{Lag, LagState};
use super::lsn::Lsn;
use super::replication::{ReplicationStream, WalMessage};
use super::{Change, ChangeSink, pgoutput, setup};
use crate::upstream::{ConnectParams, ServerConn, connect_with};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use super::replication::WalError;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const OBJECT_IN_USE: &str = "55006";
const DROP_SLOT_PATIENCE: Duration = Duration::from_secs(10);
/// `application_name` of the replication connection (find it in `pg_stat_replication`).
pub const APPLICATION_NAME: &str = "pgstash_wal";

/// Where and how to stream.
#[derive(Clone)]
pub struct WalConfig {
    /// Server, user and database; the database's name is the `db` the sink hears about. The
    /// user needs the REPLICATION attribute, and superuser to create the publication.
    pub conn: ConnectParams,
    /// Logical replication slot (one per pgstash instance: a slot has one reader at a time).
    pub slot: String,
    pub publication: String,
    /// How long a WAL position the server reported may stay unapplied before the database
    /// is reported unhealthy.
    pub max_lag: Duration,
    /// How often the applied position is reported to the server and a heartbeat committed
    /// (one transaction id and a few dozen bytes of WAL each).
    pub status_interval: Duration,
    /// Keys kept per table and transaction; beyond it the table's rows count as unknown.
    pub max_keys_per_table: usize,
}

impl WalConfig {
    /// Defaults: slot and publication `pgstash`, max_lag 5 s, status every 1 s, 10,000 keys.
    pub fn new(conn: ConnectParams) -> WalConfig {
        WalConfig {
            conn,
            slot: "pgstash".into(),
            publication: "pgstash".into(),
            max_lag: Duration::from_secs(5),
            status_interval: Duration::from_secs(1),
            max_keys_per_table: 10_000,
        }
    }

    pub fn validate(&self) -> Result<(), WalError> {
        for (what, name) in [("slot", &self.slot), ("publication", &self.publication)] {
            if !setup::valid_name(name) {
                return Err(WalError::Setup(format!(
                    "WAL source {what} name {name:?} must be 1-63 characters of a-z, 0-9 and _"
                )));
            }
        }
        if self.max_lag.is_zero() || self.status_interval.is_zero() {
            return Err(WalError::Setup(
                "WAL source max_lag and status_interval must be above zero".into(),
            ));
        }
        // The server drops a replication connection silent for wal_sender_timeout (60 s).
        if self.status_interval > Duration::from_secs(30) {
            return Err(WalError::Setup(
                "WAL source status_interval must be at most 30s".into(),
            ));
        }
        Ok(())
    }

    fn db(&self) -> &str {
        &self.conn.database
    }
}

/// Stream changes of `cfg`'s database into `sink` until `cancel` fires. Never returns an
/// error: problems are logged and reported through [`ChangeSink::set_healthy`], and the
/// source keeps trying.
pub async fn run(cfg: WalConfig, sink: Arc<dyn ChangeSink>, cancel: CancellationToken) {
    let mut src = Source {
        health: Health {
            sink: sink.clone(),
            db: cfg.db().to_string(),
            last: None,
        },
        sink,
        slot_known: false,
        install_lost: false,
        last_applied: None,
        backoff: BACKOFF_MIN,
        cfg,
    };
    src.health.report(false, "starting", || {
        "WAL change source is connecting".into()
    });
    if let Err(e) = src.cfg.validate() {
        tracing::error!(error = %e, "WAL change source not started");
        src.health.report(false, "config", || e.to_string());
        return;
    }
    loop {
        let ended = tokio::select! {
            biased;
            r = src.session(&cancel) => r,
            _ = cancel.cancelled() => Ok(()),
        };
        if cancel.is_cancelled() {
            break;
        }
        match ended {
            Err(e @ WalError::NotInstalled { .. }) => {
                tracing::warn!(db = %src.cfg.db(), error = %e, retry_in = ?src.backoff, "WAL change source cannot vouch for the database");
                src.install_lost = true;
                // One kind per remedy, so that the sink hears when the remedy changes.
                let kind = match &e {
                    WalError::NotInstalled {
                        missing: Missing::Hooks,
                        ..
                    } => "hooks disabled",
                    _ => "not installed",
                };
                src.health.report(false, kind, || e.to_string());
            }
            Err(e) => {
                tracing::warn!(db = %src.cfg.db(), slot = %src.cfg.slot, error = %e, retry_in = ?src.backoff, "WAL change source session ended");
                src.health.report(false, "disconnected", || {
                    format!("WAL change source not streaming: {e}")
                });
            }
            Ok(()) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(src.backoff) => {}
            _ = cancel.cancelled() => break,
        }
        src.backoff = (src.backoff * 2).min(BACKOFF_MAX);
    }
    src.health
        .report(false, "stopped", || "WAL change source stopped".into());
}

/// Fails with [`WalError::NotInstalled`] (naming the database) unless migration 0003 is
/// applied in `cfg`'s database and its DDL hooks are enabled: without them the source would
/// miss DDL and `REFRESH MATERIALIZED VIEW`. For a check at startup; [`run`] checks as well.
pub async fn ensure_installed(cfg: &WalConfig) -> Result<(), WalError> {
    let mut conn = connect_with(&cfg.conn, &[("application_name", APPLICATION_NAME)]).await?;
    if let Some(missing) = setup::check_installed(&mut conn).await? {
        return Err(WalError::NotInstalled {
            db: cfg.db().to_string(),
            missing,
        });
    }
    let row_triggers = setup::row_triggers(&mut conn).await?;
    if row_triggers > 0 {
        tracing::info!(
            db = %cfg.db(),
            row_triggers,
            "the NOTIFY source's row triggers are on: every writing transaction queues a \
             notification the WAL source does not need. Unless a NOTIFY source watches this \
             database, switch them off: SELECT pgstash.set_row_triggers(false)"
        );
    }
    Ok(())
}

/// The tables on which Postgres refuses UPDATE and DELETE because `cfg`'s publication
/// publishes them and they have no replica identity (see the start-up warning of [`run`]).
pub async fn tables_refusing_updates(cfg: &WalConfig) -> Result<Vec<String>, WalError> {
    let mut conn = connect_with(&cfg.conn, &[("application_name", APPLICATION_NAME)]).await?;
    setup::tables_refusing_updates(&mut conn, &cfg.publication).await
}

/// Drop `cfg`'s replication slot if it exists (stop [`run`] first). Returns whether it did.
/// A walsender that is still winding down after [`run`] stopped keeps the slot busy for a
/// moment: that is waited out for up to `DROP_SLOT_PATIENCE`.
pub async fn drop_slot(cfg: &WalConfig) -> Result<bool, WalError> {
    cfg.validate()?;
    let mut conn = connect_with(&cfg.conn, &[("application_name", APPLICATION_NAME)]).await?;
    let deadline = Instant::now() + DROP_SLOT_PATIENCE;
    loop {
        match setup::drop_slot(&mut conn, &cfg.slot).await {
            Err(e) if e.sqlstate() == Some(OBJECT_IN_USE) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

/// Tells the sink about health changes, once per change of state.
struct Health {
    sink: Arc<dyn ChangeSink>,
    db: String,
    /// Last report: healthy, and the kind of reason (the reason's text may vary within one
    /// kind, e.g. how far behind; that alone is not worth a new report).
    last: Option<(bool, &'static str)>,
}

impl Health {
    fn report(&mut self, healthy: bool, kind: &'static str, reason: impl FnOnce() -> String) {
        if self.last == Some((healthy, kind)) {
            return;
        }
        self.last = Some((healthy, kind));
        let reason = reason();
        if healthy {
            tracing::info!(db = %self.db, "WAL change source streaming and caught up");
        } else {
            tracing::warn!(db = %self.db, reason = %reason, "WAL change source does not vouch for the database");
        }
        self.sink.set_healthy(&self.db, healthy, &reason);
    }
}

struct Source {
    cfg: WalConfig,
    sink: Arc<dyn ChangeSink>,
    health: Health,
    /// The slot existed at some point during this run: if it is missing now, it was lost.
    slot_known: bool,
    /// A session ended because the DDL hooks were missing: DDL may have gone unreported.
    install_lost: bool,
    /// Our applied position at the end of the last session.
    last_applied: Option<Lsn>,
    backoff: Duration,
}

impl Source {
    /// One connection's worth of streaming. Returns `Ok` only when cancelled.
    async fn session(&mut self, cancel: &CancellationToken) -> Result<(), WalError> {
        let cfg = self.cfg.clone();
        let mut sql = connect_with(&cfg.conn, &[("application_name", APPLICATION_NAME)]).await?;
        // Before the slot: a slot that nobody can use keeps WAL from being recycled.
        if let Some(missing) = setup::check_installed(&mut sql).await? {
            return Err(self.not_installed(missing));
        }
        if self.install_lost {
            tracing::info!(db = %cfg.db(), "pgstash's DDL hooks are back; invalidating the database");
            self.sink.apply(cfg.db(), None, &[Change::Database]);
            self.install_lost = false;
        }
        let start = self.prepare_slot(&mut sql).await?;
        let repl = connect_with(
            &cfg.conn,
            &[
                ("replication", "database"),
                ("application_name", APPLICATION_NAME),
            ],
        )
        .await?;
        let server_utf8 = repl.params.get("server_encoding").map(String::as_str) == Some("UTF8");
        // A slot dropped since the check above fails here; the next session's check then
        // finds it missing and handles the loss.
        let stream = ReplicationStream::start(repl, &cfg.slot, &cfg.publication).await?;
        self.slot_known = true;
        tracing::info!(db = %cfg.db(), slot = %cfg.slot, from = %start, "WAL change source streaming");
        self.health.report(false, "catching up", || {
            format!("WAL change source catching up from {start}")
        });
        let mut lag = Lag::new(start);
        let r = self
            .stream(stream, &mut sql, &mut lag, server_utf8, cancel)
            .await;
        self.last_applied = Some(lag.applied());
        r
    }

    fn not_installed(&self, missing: Missing) -> WalError {
        WalError::NotInstalled {
            db: self.cfg.db().to_string(),
            missing,
        }
    }

    /// Ensure publication and slot; returns where streaming starts.
    async fn prepare_slot(&mut self, sql: &mut ServerConn) -> Result<Lsn, WalError> {
        let cfg = &self.cfg;
        let publication_existed = setup::ensure_publication(sql, &cfg.publication).await?;
        let refusing = setup::tables_refusing_updates(sql, &cfg.publication).await?;
        if !refusing.is_empty() {
            tracing::warn!(
                db = %cfg.db(),
                publication = %cfg.publication,
                tables = %refusing.join(", "),
                "Postgres refuses UPDATE and DELETE (SQLSTATE 55000) on these tables while the \
                 publication publishes them: they have neither a primary key nor a replica \
                 identity; give each a primary key or REPLICA IDENTITY FULL"
            );
        }
        if let Some(slot) = setup::find_slot(sql, &cfg.slot).await? {
            if slot.plugin.as_deref() != Some("pgoutput")
                || slot.database.as_deref() != Some(cfg.db())
            {
                return Err(WalError::Setup(format!(
                    "replication slot {} exists but is not a pgoutput slot of database {} \
                     (plugin {:?}, database {:?}): choose another slot name",
                    cfg.slot,
                    cfg.db(),
                    slot.plugin,
                    slot.database
                )));
            }
            let confirmed = slot.confirmed.unwrap_or_default();
            // Only our status updates move the slot; a position past ours means someone
            // else consumed it, or dropped and recreated it: changes were skipped.
            match self.last_applied {
                Some(ours) if confirmed > ours => {
                    let reason = format!(
                        "replication slot {} moved from {ours} to {confirmed} without us: \
                         another reader consumed it or it was recreated; changes in between \
                         were not seen, invalidating database {}",
                        cfg.slot,
                        cfg.db()
                    );
                    tracing::error!("{reason}");
                    self.health.report(false, "slot lost", || reason);
                    self.sink.apply(cfg.db(), None, &[Change::Database]);
                }
                _ => {}
            }
            // Report (and invalidate) that once, even if this session fails before streaming.
            self.last_applied = Some(
                self.last_applied
                    .map_or(confirmed, |ours| ours.max(confirmed)),
            );
            return Ok(confirmed);
        }
        if self.slot_known || publication_existed {
            let reason = format!(
                "replication slot {} was lost (dropped while pgstash {}); changes since are \
                 not known, so it is recreated and database {} invalidated",
                cfg.slot,
                if self.slot_known {
                    "was using it"
                } else {
                    "was stopped, or never created for this publication"
                },
                cfg.db()
            );
            if self.slot_known {
                tracing::error!("{reason}");
            } else {
                tracing::warn!("{reason}");
            }
            self.health.report(false, "slot lost", || reason);
        }
        if setup::create_slot(sql, &cfg.slot).await? {
            tracing::info!(slot = %cfg.slot, db = %cfg.db(), "created logical replication slot");
        }
        // The slot covers changes from its creation on. Whatever was cached before may
        // depend on changes nobody reported.
        self.sink.apply(cfg.db(), None, &[Change::Database]);
        let slot = setup::find_slot(sql, &cfg.slot).await?.ok_or_else(|| {
            WalError::Setup(format!(
                "replication slot {} vanished right after it was created",
                cfg.slot
            ))
        })?;
        let start = slot.confirmed.unwrap_or_default();
        // Positions of a previous slot mean nothing for this one.
        self.last_applied = Some(start);
        Ok(start)
    }

    async fn stream(
        &mut self,
        mut stream: ReplicationStream,
        sql: &mut ServerConn,
        lag: &mut Lag,
        server_utf8: bool,
        cancel: &CancellationToken,
    ) -> Result<(), WalError> {
        let cfg = self.cfg.clone();
        let db = cfg.db();
        let mut collector = Collector::new(cfg.max_keys_per_table, server_utf8);
        // Health is re-evaluated on every tick too: lag grows without any message.
        let every = cfg
            .status_interval
            .min(cfg.max_lag / 2)
            .max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (probe_tx, mut probe_rx) = mpsc::channel(4);
        let probe = probe_wal_end(
            sql,
            cfg.status_interval,
            cfg.max_lag.max(Duration::from_secs(1)),
            probe_tx,
        );
        tokio::pin!(probe);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    // Save the server from replaying what we already applied.
                    let goodbye = async {
                        let _ = stream.send_status(lag.applied()).await;
                        stream.close().await;
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
                    return Ok(());
                }
                e = &mut probe => {
                    return Err(match e {
                        WalError::NotInstalled { missing, .. } => self.not_installed(missing),
                        e => e,
                    });
                }
                // Before the stream: a flood of XLogData must not starve status updates.
                _ = tick.tick() => send_status(&mut stream, lag.applied(), cfg.max_lag).await?,
                Some((lsn, seen)) = probe_rx.recv() => lag.target(lsn, seen),
                msg = stream.next() => match msg? {
                    WalMessage::XLogData { start, end, data } => {
                        lag.target(start.max(end), Instant::now());
                        let msg = pgoutput::decode(&data)?;
                        if let Some(tx) = collector.handle(msg)? {
                            if !tx.changes.is_empty() {
                                tracing::debug!(db, lsn = ?tx.end_lsn, changes = tx.changes.len(), "WAL transaction");
                                self.sink.apply(db, tx.committed_at, &tx.changes);
                            }
                            // Echoes come after every commit before them (see `catch_up`).
                            for echo in &tx.echoes {
                                self.sink.echo(db, echo);
                            }
                            // Only now may the slot forget this transaction. (A message sent
                            // outside any transaction has no position of its own to confirm.)
                            if let Some(end) = tx.end_lsn {
                                lag.advance(end);
                            }
                            if tx.uninstalled {
                                // DDL committed from here on is not in the stream. Confirm
                                // this transaction first, so that it is not replayed.
                                send_status(&mut stream, lag.applied(), cfg.max_lag).await?;
                                return Err(self.not_installed(Missing::Migration(3)));
                            }
                        }
                    }
                    WalMessage::Keepalive { end, reply } => {
                        // Between transactions, everything before `end` has been sent to
                        // us and applied: nothing of ours is pending before it.
                        if collector.is_idle() {
                            lag.advance(end);
                        }
                        lag.target(end, Instant::now());
                        if reply {
                            send_status(&mut stream, lag.applied(), cfg.max_lag).await?;
                        }
                    }
                },
            }
            self.judge(lag);
        }
    }

    fn judge(&mut self, lag: &Lag) {
        match lag.state(Instant::now(), self.cfg.max_lag) {
            LagState::CaughtUp => {
                self.health.report(true, "caught up", String::new);
                self.backoff = BACKOFF_MIN;
            }
            LagState::CatchingUp => {}
            LagState::Lagging {
                target,
                applied,
                behind,
            } => {
                let max_lag = self.cfg.max_lag;
                self.health.report(false, "lagging", || {
                    format!(
                        "WAL change source lagging: server WAL position {target} seen \
                         {behind:?} ago is not applied yet (applied {applied}, max_lag {max_lag:?})"
                    )
                });
            }
        }
    }
}

/// A status update that cannot be written within `within` (a server that stopped reading)
/// ends the session: waiting on it would also stop us from noticing the lag.
async fn send_status(
    stream: &mut ReplicationStream,
    applied: Lsn,
    within: Duration,
) -> Result<(), WalError> {
    tokio::time::timeout(within, stream.send_status(applied))
        .await
        .map_err(|_| {
            WalError::Protocol(format!(
                "Postgres did not take a status update within {within:?}"
            ))
        })?
}

/// Every `every`, commit a heartbeat and send (its WAL position, when we asked) to `out`.
/// Runs until it fails; a heartbeat not answered within `timeout` is a failure, since
/// silence could hide lag, and so is a heartbeat that finds the DDL hooks missing
/// ([`WalError::NotInstalled`], its `db` left for the caller to fill in).
async fn probe_wal_end(
    conn: &mut ServerConn,
    every: Duration,
    timeout: Duration,
    out: mpsc::Sender<(Lsn, Instant)>,
) -> WalError {
    if let Err(e) = setup::prepare_heartbeat(conn).await {
        return e;
    }
    loop {
        let asked = Instant::now();
        let lsn = match tokio::time::timeout(timeout, setup::wal_heartbeat(conn)).await {
            Ok(Ok((lsn, None))) => lsn,
            Ok(Ok((_, Some(missing)))) => {
                return WalError::NotInstalled {
                    db: String::new(),
                    missing,
                };
            }
            Ok(Err(e)) => return e,
            Err(_) => {
                return WalError::Protocol(format!(
                    "Postgres did not answer the WAL heartbeat within {timeout:?}"
                ));
            }
        };
        if out.send((lsn, asked)).await.is_err() {
            return WalError::Protocol("WAL heartbeat receiver gone".into());
        }
        tokio::time::sleep(every).await;
    }
}
