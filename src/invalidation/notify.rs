//! The NOTIFY change source: a task that listens on channel [`CHANNEL`], where the triggers
//! installed by `pgstash migrate up` (migration 0002) report every committed write, and
//! hands what they report to a [`ChangeSink`].
//!
//! Health: the sink hears `set_healthy(true)` only once `LISTEN` has taken effect and the
//! triggers are installed (the DDL hooks, and a row trigger on every user table: see
//! `installed`), and `set_healthy(false)` as soon as either stops being true: notifications
//! sent while nobody listens are lost, so until the listener is back, the database is
//! unprotected. It reconnects with exponential backoff and checks the connection (and the
//! triggers) every [`ListenerConfig::check_interval`], so a silently dead peer is noticed
//! too; a notification of kind "uninstalled" (down migration, row triggers switched off)
//! makes it report unhealthy at once and check again.
//!
//! The connection is plain TCP or Unix socket (no TLS yet), with `application_name`
//! [`ListenerConfig::application_name`] so operators can tell it apart.

use super::installed::{self, Missing, Source};
use super::payload::{self, Meaning, Payload};
use super::{Change, ChangeSink};
use crate::pg_error::describe;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls, Notification, Socket};
use tokio_util::sync::CancellationToken;

/// The channel the triggers notify (fixed in `migrations/0002_notify_triggers.up.sql`).
pub const CHANNEL: &str = "pgstash_invalidate";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("invalid connection string for the NOTIFY listener of database {db}: {reason}")]
    Config { db: String, reason: String },
    #[error(
        "the NOTIFY source cannot vouch for database {db}: {missing}; or choose another \
         invalidation source"
    )]
    NotInstalled { db: String, missing: Missing },
    #[error(
        "could not check whether pgstash's NOTIFY triggers are installed in database {db}: {reason}"
    )]
    Check { db: String, reason: String },
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Set on the listener's connection, replacing any in the connection string.
    pub application_name: String,
    /// Limit for connecting, `LISTEN`, and each check.
    pub connect_timeout: Duration,
    /// First delay before reconnecting; doubles on each failed attempt up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How often the connection is probed and the triggers checked.
    pub check_interval: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            application_name: "pgstash-notify".to_owned(),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            check_interval: Duration::from_secs(10),
        }
    }
}

impl ListenerConfig {
    /// Probes often enough, and gives up on a probe soon enough, that a listener whose
    /// peer went silent (a half-open connection, a stuck backend) stops vouching within
    /// `max_lag`: notifications it misses meanwhile are staleness the source answers for.
    pub fn within(max_lag: Duration) -> ListenerConfig {
        let d = ListenerConfig::default();
        let half = max_lag / 2;
        ListenerConfig {
            connect_timeout: d.connect_timeout.min(half),
            check_interval: d.check_interval.min(half),
            ..d
        }
    }
}

/// Listens to database `db` (named so for the sink) at `conninfo` (a `postgres://` URL or
/// `key=value` pairs) until `shutdown` fires, delivering changes to `sink`. Connection
/// problems are retried forever; the only error is a connection string that cannot work.
pub async fn run(
    conninfo: String,
    db: String,
    sink: Arc<dyn ChangeSink>,
    config: ListenerConfig,
    shutdown: CancellationToken,
) -> Result<(), NotifyError> {
    let mut pg: tokio_postgres::Config = conninfo.parse().map_err(|e| NotifyError::Config {
        db: db.clone(),
        reason: describe(&e),
    })?;
    pg.application_name(&config.application_name)
        .connect_timeout(config.connect_timeout);
    let listener = Listener {
        pg,
        db,
        sink,
        config,
    };
    listener
        .sink
        .set_healthy(&listener.db, false, "NOTIFY listener not yet listening");
    let mut delay = listener.config.backoff_initial;
    loop {
        let lost = tokio::select! {
            _ = shutdown.cancelled() => break,
            lost = listener.session() => lost,
        };
        listener.sink.set_healthy(&listener.db, false, &lost.reason);
        if lost.was_listening {
            delay = listener.config.backoff_initial;
        }
        tracing::warn!(db = %listener.db, reason = %lost.reason, retry_in = ?delay,
            "NOTIFY listener lost; changes made until it is back are not seen");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(listener.config.backoff_max);
    }
    listener
        .sink
        .set_healthy(&listener.db, false, "NOTIFY listener stopped");
    Ok(())
}

/// Fails with [`NotifyError::NotInstalled`] unless migration 0002's triggers are in place
/// in the database `client` is connected to (named `db` in the message): the DDL hooks,
/// enabled, and an enabled row trigger on every user table (so not while the row triggers
/// are switched off). Reads only the system catalogs, which every role may read.
pub async fn ensure_installed(client: &Client, db: &str) -> Result<(), NotifyError> {
    match missing(client).await {
        Ok(None) => Ok(()),
        Ok(Some(missing)) => Err(NotifyError::NotInstalled {
            db: db.to_owned(),
            missing,
        }),
        Err(reason) => Err(NotifyError::Check {
            db: db.to_owned(),
            reason,
        }),
    }
}

/// [`ensure_installed`] over a connection of its own to `conninfo` (a URL or `key=value`
/// pairs), for a check at startup.
pub async fn ensure_installed_at(
    conninfo: &str,
    db: &str,
    timeout: Duration,
) -> Result<(), NotifyError> {
    let failed = |reason: String| NotifyError::Check {
        db: db.to_owned(),
        reason,
    };
    let mut pg: tokio_postgres::Config = conninfo.parse().map_err(|e| NotifyError::Config {
        db: db.to_owned(),
        reason: describe(&e),
    })?;
    pg.connect_timeout(timeout);
    let (client, connection) = match tokio::time::timeout(timeout, pg.connect(NoTls)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(failed(format!("cannot connect: {}", describe(&e)))),
        Err(_) => {
            return Err(failed(format!(
                "cannot connect: no answer within {timeout:?}"
            )));
        }
    };
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    match tokio::time::timeout(timeout, ensure_installed(&client, db)).await {
        Ok(result) => result,
        Err(_) => Err(failed(format!("no answer within {timeout:?}"))),
    }
}

/// What keeps this source from vouching for the database, if anything (see `installed`).
/// An error says why the check itself failed.
async fn missing(client: &Client) -> Result<Option<Missing>, String> {
    let messages = client
        .simple_query(installed::sql(Source::Notify))
        .await
        .map_err(|e| describe(&e))?;
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .ok_or("the installation check returned no row")?;
    let values: Vec<Option<&str>> = (0..row.len()).map(|i| row.get(i)).collect();
    installed::verdict(Source::Notify, &values)
}

struct Listener {
    pg: tokio_postgres::Config,
    db: String,
    sink: Arc<dyn ChangeSink>,
    config: ListenerConfig,
}

/// Why a session ended.
struct Lost {
    reason: String,
    /// It got as far as `LISTEN`: the next attempt starts from the shortest backoff.
    was_listening: bool,
}

/// What the task driving the connection passes on.
enum Event {
    Notification(Notification),
    Closed(String),
}

impl Listener {
    /// One connection: connect, LISTEN, then deliver until the connection fails.
    async fn session(&self) -> Lost {
        let lost = |reason: String| Lost {
            reason,
            was_listening: false,
        };
        let limit = self.config.connect_timeout;
        let (client, connection) = match tokio::time::timeout(limit, self.pg.connect(NoTls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return lost(format!("cannot connect: {}", describe(&e))),
            Err(_) => return lost(format!("cannot connect: no answer within {limit:?}")),
        };
        let (events_tx, mut events) = mpsc::unbounded_channel();
        // Named so it lives to the end of the session, which aborts it however it ends.
        let _driver = AbortOnDrop(tokio::spawn(drive(connection, events_tx)));
        match tokio::time::timeout(limit, client.batch_execute(&format!("LISTEN {CHANNEL}"))).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return lost(format!("LISTEN failed: {}", describe(&e))),
            Err(_) => return lost(format!("LISTEN got no answer within {limit:?}")),
        }
        // From here on every commit is heard; check the triggers only now, so that removing
        // them just before is seen by the check and just after by the notification.
        let mut missing = match self.check(&client).await {
            Ok(missing) => missing,
            Err(reason) => return lost(reason),
        };
        tracing::info!(db = %self.db, installed = missing.is_none(), "listening for NOTIFY invalidations");
        self.report(&missing);
        let mut ticks = tokio::time::interval(self.config.check_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate; we just checked
        let lost = |reason: String| Lost {
            reason,
            was_listening: true,
        };
        loop {
            tokio::select! {
                event = events.recv() => {
                    let Some(Event::Notification(first)) = event else {
                        let reason = match event {
                            Some(Event::Closed(reason)) => reason,
                            _ => "connection task ended".to_owned(),
                        };
                        return lost(reason);
                    };
                    // Take everything that has arrived, so that one transaction's
                    // notifications (consecutive in the queue) reach the sink together.
                    let mut batch = vec![first];
                    let mut closed = None;
                    while let Ok(event) = events.try_recv() {
                        match event {
                            Event::Notification(n) => batch.push(n),
                            Event::Closed(reason) => {
                                closed = Some(reason);
                                break;
                            }
                        }
                    }
                    let uninstalled = self.deliver(&batch);
                    if let Some(reason) = closed {
                        return lost(reason);
                    }
                    if uninstalled {
                        // deliver() already said unhealthy; now find out why, or that it is
                        // over already (the triggers switched back on since).
                        match self.check(&client).await {
                            Ok(now) => {
                                missing = now;
                                self.report(&missing);
                            }
                            Err(reason) => return lost(reason),
                        }
                    }
                }
                _ = ticks.tick() => {
                    match self.check(&client).await {
                        Ok(now) if now != missing => {
                            missing = now;
                            self.report(&missing);
                        }
                        Ok(_) => {}
                        Err(reason) => return lost(reason),
                    }
                }
            }
        }
    }

    /// What is missing of the triggers; an error means the connection is not usable.
    async fn check(&self, client: &Client) -> Result<Option<Missing>, String> {
        let limit = self.config.connect_timeout;
        match tokio::time::timeout(limit, missing(client)).await {
            Ok(Ok(missing)) => Ok(missing),
            Ok(Err(e)) => Err(format!("check query failed: {e}")),
            Err(_) => Err(format!("check query got no answer within {limit:?}")),
        }
    }

    fn report(&self, missing: &Option<Missing>) {
        match missing {
            None => self.sink.set_healthy(&self.db, true, ""),
            Some(missing) => {
                let e = NotifyError::NotInstalled {
                    db: self.db.clone(),
                    missing: missing.clone(),
                };
                tracing::error!(db = %self.db, "{e}");
                self.sink.set_healthy(&self.db, false, &e.to_string());
            }
        }
    }

    /// Hands the changes in `batch` to the sink, one `apply` per transaction. Returns
    /// whether one of them said the triggers were removed (then the sink has heard that the
    /// database is unprotected).
    fn deliver(&self, batch: &[Notification]) -> bool {
        let mut uninstalled = false;
        let mut group: Vec<Change> = Vec::new();
        let mut group_at: Option<SystemTime> = None;
        let mut group_of: Option<(i32, String)> = None;
        for n in batch {
            if n.channel() != CHANNEL {
                continue;
            }
            if n.payload().starts_with("echo ") {
                // An instance's echo: everything committed before it is in the batch before
                // it, so that is applied first.
                self.apply(&group, group_at);
                group.clear();
                group_at = None;
                group_of = None;
                self.sink.echo(&self.db, n.payload());
                continue;
            }
            let p = match payload::parse(n.payload()) {
                Ok(p) => p,
                Err(e) => {
                    // When in doubt, invalidate wider.
                    tracing::warn!(db = %self.db, error = %e, payload = n.payload(),
                        "unreadable NOTIFY payload; invalidating the whole database");
                    Payload {
                        meaning: Meaning::Change(Change::Database),
                        at: None,
                        tx: None,
                    }
                }
            };
            let change = match p.meaning {
                Meaning::Change(c) => c,
                Meaning::Uninstalled => {
                    uninstalled = true;
                    Change::Database
                }
            };
            let of = p.tx.map(|tx| (n.process_id(), tx));
            if of.is_none() || of != group_of {
                self.apply(&group, group_at);
                group.clear();
                group_at = None;
                group_of = of;
            }
            if !group.contains(&change) {
                group.push(change);
            }
            group_at = group_at.max(p.at);
        }
        self.apply(&group, group_at);
        if uninstalled {
            // At once: the check that says why comes after a round trip.
            self.sink.set_healthy(
                &self.db,
                false,
                "pgstash's triggers said they no longer report every write (uninstalled, or \
                 row triggers switched off); checking what is missing",
            );
        }
        uninstalled
    }

    fn apply(&self, changes: &[Change], at: Option<SystemTime>) {
        if !changes.is_empty() {
            self.sink.apply(&self.db, at, changes);
        }
    }
}

/// Drives the connection (it does the socket I/O for `client` too) and passes on what the
/// server sends by itself, until the connection ends.
async fn drive(
    mut connection: Connection<Socket, NoTlsStream>,
    events: mpsc::UnboundedSender<Event>,
) {
    loop {
        let event = match poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => Event::Notification(n),
            Some(Ok(AsyncMessage::Notice(notice))) => {
                tracing::debug!(%notice, "notice on the NOTIFY listener's connection");
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => Event::Closed(format!("connection lost: {}", describe(&e))),
            None => Event::Closed("the server closed the connection".to_owned()),
        };
        let closed = matches!(event, Event::Closed(_));
        if events.send(event).is_err() || closed {
            return;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
