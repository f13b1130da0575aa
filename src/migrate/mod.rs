//! Versioned SQL that pgstash installs in a database (everything in schema `pgstash`),
//! applied and reverted by `pgstash migrate up|down|status`.
//!
//! The SQL lives in `migrations/NNNN_name.up.sql` / `.down.sql` and is compiled in
//! ([`MIGRATIONS`]). The runner keeps its own bookkeeping, `pgstash.schema_migrations`
//! (version, name, SHA-256 of the up SQL, applied_at), which it creates itself: it is not a
//! migration. Each migration applies or reverts in its own transaction together with its
//! bookkeeping row, so a failure leaves the database at the last migration that succeeded.
//!
//! `up` and `down` hold a session advisory lock for the whole run: several pgstash
//! instances starting at once run one after the other, and the later ones find nothing
//! pending. Both refuse to run when an applied migration's SQL differs from what this
//! pgstash embeds ([`MigrateError::ChecksumMismatch`]): the database would not be in the
//! state the code expects. They need a superuser (migration 0002 creates event triggers).
//!
//! Cancelling a run (dropping its future) may leave the lock held by the session: drop that
//! client too rather than returning it to a pool.

mod embedded;
mod ledger;

pub use embedded::{MIGRATIONS, Migration, find};

use crate::pg_error::describe;
use std::time::SystemTime;
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("could not take the migration lock (pg_advisory_lock): {}", describe(.0))]
    Lock(tokio_postgres::Error),
    #[error("could not read or create the bookkeeping table pgstash.schema_migrations: {}", describe(.0))]
    Bookkeeping(tokio_postgres::Error),
    #[error(
        "migration {version:04}_{name} was changed after it was applied: the database recorded \
         checksum {recorded}, this pgstash embeds {embedded}. Restore the SQL that was applied \
         and put the change in a new migration"
    )]
    ChecksumMismatch {
        version: i32,
        name: String,
        recorded: String,
        embedded: String,
    },
    #[error(
        "migration {version:04}_{name} is applied in the database but unknown to this pgstash \
         (applied by a newer version?); revert it with the pgstash that applied it"
    )]
    Unknown { version: i32, name: String },
    #[error("applying migration {} failed: {}", .migration.file_stem(), describe(.error))]
    Apply {
        migration: &'static Migration,
        error: tokio_postgres::Error,
    },
    #[error("reverting migration {} failed: {}", .migration.file_stem(), describe(.error))]
    Revert {
        migration: &'static Migration,
        error: tokio_postgres::Error,
    },
}

/// Where one migration stands in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    Applied {
        at: SystemTime,
    },
    Pending,
    /// Applied, but the embedded SQL has changed since: `up` and `down` refuse to run.
    Edited {
        at: SystemTime,
        recorded: String,
        embedded: String,
    },
    /// Recorded as applied, but not embedded in this pgstash (a newer one applied it).
    Unknown {
        at: SystemTime,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    pub version: i32,
    pub name: String,
    pub state: MigrationState,
}

/// Applies every pending migration in version order, each in its own transaction; returns
/// the ones it applied (none when the database is up to date).
pub async fn up(client: &mut Client) -> Result<Vec<&'static Migration>, MigrateError> {
    locked(client, up_locked).await
}

/// Reverts the last `steps` applied migrations, newest first, each in its own transaction
/// with its down SQL; returns the ones it reverted (fewer when fewer were applied).
/// Reverting the last one removes schema `pgstash` entirely.
pub async fn down(
    client: &mut Client,
    steps: usize,
) -> Result<Vec<&'static Migration>, MigrateError> {
    locked(client, async move |c: &mut Client| {
        down_locked(c, steps).await
    })
    .await
}

/// Every embedded migration and every recorded one, in version order. Reads only: creates
/// nothing and takes no lock.
pub async fn status(client: &Client) -> Result<Vec<MigrationStatus>, MigrateError> {
    let records = ledger::applied(client)
        .await
        .map_err(MigrateError::Bookkeeping)?;
    let mut out: Vec<MigrationStatus> = MIGRATIONS
        .iter()
        .map(|m| {
            let state = match records.iter().find(|r| r.version == m.version) {
                None => MigrationState::Pending,
                Some(r) if r.checksum == m.checksum() => {
                    MigrationState::Applied { at: r.applied_at }
                }
                Some(r) => MigrationState::Edited {
                    at: r.applied_at,
                    recorded: r.checksum.clone(),
                    embedded: m.checksum(),
                },
            };
            MigrationStatus {
                version: m.version,
                name: m.name.to_owned(),
                state,
            }
        })
        .collect();
    for r in records.iter().filter(|r| find(r.version).is_none()) {
        out.push(MigrationStatus {
            version: r.version,
            name: r.name.clone(),
            state: MigrationState::Unknown { at: r.applied_at },
        });
    }
    out.sort_by_key(|s| s.version);
    Ok(out)
}

/// Whether migration `version` is recorded as applied.
pub async fn is_applied(client: &Client, version: i32) -> Result<bool, MigrateError> {
    let records = ledger::applied(client)
        .await
        .map_err(MigrateError::Bookkeeping)?;
    Ok(records.iter().any(|r| r.version == version))
}

/// Runs `run` while holding the migration lock, and releases the lock whatever happened
/// (an error in `run` wins over one releasing it; a broken session releases it anyway).
async fn locked<F, T>(client: &mut Client, run: F) -> Result<T, MigrateError>
where
    F: AsyncFnOnce(&mut Client) -> Result<T, MigrateError>,
{
    ledger::lock(client).await.map_err(MigrateError::Lock)?;
    let result = run(client).await;
    let released = ledger::unlock(client).await.map_err(MigrateError::Lock);
    let value = result?;
    released?;
    Ok(value)
}

async fn up_locked(client: &mut Client) -> Result<Vec<&'static Migration>, MigrateError> {
    ledger::ensure(client)
        .await
        .map_err(MigrateError::Bookkeeping)?;
    let records = ledger::applied(&*client)
        .await
        .map_err(MigrateError::Bookkeeping)?;
    verify_checksums(&records)?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        if records.iter().any(|r| r.version == m.version) {
            continue;
        }
        let fail = |error| MigrateError::Apply {
            migration: m,
            error,
        };
        let tx = client.transaction().await.map_err(fail)?;
        tx.batch_execute(m.up).await.map_err(fail)?;
        ledger::record(&tx, m.version, m.name, &m.checksum())
            .await
            .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        tracing::info!(migration = %m.file_stem(), "applied migration");
        applied.push(m);
    }
    Ok(applied)
}

async fn down_locked(
    client: &mut Client,
    steps: usize,
) -> Result<Vec<&'static Migration>, MigrateError> {
    let records = ledger::applied(&*client)
        .await
        .map_err(MigrateError::Bookkeeping)?;
    verify_checksums(&records)?;
    // Check every migration to revert first: stopping half way for want of SQL is worse.
    let targets = records
        .iter()
        .rev()
        .take(steps)
        .map(|r| {
            find(r.version).ok_or_else(|| MigrateError::Unknown {
                version: r.version,
                name: r.name.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut reverted = Vec::new();
    for m in targets {
        let fail = |error| MigrateError::Revert {
            migration: m,
            error,
        };
        let tx = client.transaction().await.map_err(fail)?;
        // Bookkeeping first: forgetting the last migration drops the table, which must be
        // gone before 0001's down SQL drops the schema it lives in.
        ledger::forget(&tx, m.version).await.map_err(fail)?;
        tx.batch_execute(m.down).await.map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        tracing::info!(migration = %m.file_stem(), "reverted migration");
        reverted.push(m);
    }
    Ok(reverted)
}

/// Refuses when an applied migration's SQL is not the one this pgstash embeds.
fn verify_checksums(records: &[ledger::Record]) -> Result<(), MigrateError> {
    for r in records {
        if let Some(m) = find(r.version) {
            let embedded = m.checksum();
            if r.checksum != embedded {
                return Err(MigrateError::ChecksumMismatch {
                    version: r.version,
                    name: m.name.to_owned(),
                    recorded: r.checksum.clone(),
                    embedded,
                });
            }
        }
    }
    Ok(())
}
