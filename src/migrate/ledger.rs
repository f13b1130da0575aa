//! The runner's bookkeeping in the database: which migrations are applied (table
//! `pgstash.schema_migrations`, which is not itself a migration) and the lock that keeps
//! concurrent runners apart.

use std::time::SystemTime;
use tokio_postgres::{Client, GenericClient};

/// Session advisory lock key held around a whole `up` or `down` ("pgstash" in ASCII, then
/// 1), so that instances starting at once run one after the other. Advisory locks are per
/// database, like the migrations.
const LOCK_KEY: i64 = 0x7067_7374_6173_6801;

/// A row of `pgstash.schema_migrations`.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub version: i32,
    pub name: String,
    pub checksum: String,
    pub applied_at: SystemTime,
}

pub(super) async fn lock(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map(drop)
}

pub(super) async fn unlock(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
        .map(drop)
}

/// Whether the bookkeeping table exists (nothing was ever applied if not).
pub(super) async fn exists(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT to_regclass('pgstash.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Creates schema `pgstash` and the bookkeeping table if missing. Call under [`lock`]:
/// concurrent `CREATE ... IF NOT EXISTS` can still fail on a unique index.
///
/// Checks first rather than always running `IF NOT EXISTS`: once the notify triggers are
/// installed, even a DDL statement that does nothing reaches the event triggers, which
/// would tell every listener to flush the whole database on each start of pgstash.
pub(super) async fn ensure(client: &Client) -> Result<(), tokio_postgres::Error> {
    if exists(client).await? {
        return Ok(());
    }
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgstash;
             CREATE TABLE pgstash.schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 checksum text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
}

/// Every applied migration, in version order; none when the table does not exist.
pub(super) async fn applied(
    client: &impl GenericClient,
) -> Result<Vec<Record>, tokio_postgres::Error> {
    if !exists(client).await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT version, name, checksum, applied_at
               FROM pgstash.schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Record {
            version: r.get(0),
            name: r.get(1),
            checksum: r.get(2),
            applied_at: r.get(3),
        })
        .collect())
}

pub(super) async fn record(
    client: &impl GenericClient,
    version: i32,
    name: &str,
    checksum: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO pgstash.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&version, &name, &checksum],
        )
        .await
        .map(drop)
}

/// Removes the record of `version`. When it was the last one, drops the bookkeeping table
/// too, so that reverting migration 0001 can drop the then empty schema (see
/// `migrations/0001_schema.down.sql`).
pub(super) async fn forget(
    client: &impl GenericClient,
    version: i32,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM pgstash.schema_migrations WHERE version = $1",
            &[&version],
        )
        .await?;
    let left: i64 = client
        .query_one("SELECT count(*) FROM pgstash.schema_migrations", &[])
        .await?
        .get(0);
    if left == 0 {
        client
            .batch_execute("DROP TABLE pgstash.schema_migrations")
            .await?;
    }
    Ok(())
}
