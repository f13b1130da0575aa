//! The server-side objects the WAL source needs: a publication of all tables, a logical
//! replication slot with the pgoutput plugin, and pgstash's DDL hooks (migration 0003,
//! installed by `pgstash migrate up`, only checked here). Run over a normal
//! (non-replication) connection.
//!
//! Several pgstash instances may start at once: creating an object someone else just created
//! fails with `duplicate_object`, which means it exists — the goal — and is not an error.

use super::installed::{self, Missing, Source};
use super::lsn::Lsn;
use super::replication::{WalError, simple_query};
use crate::upstream::ServerConn;

const DUPLICATE_OBJECT: &str = "42710";
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Slot and publication names are spliced into SQL and replication commands, so they are
/// restricted to what a replication slot name may be anyway: `[a-z0-9_]{1,63}`.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Make sure `publication` exists; returns whether it existed before this call.
pub async fn ensure_publication(
    conn: &mut ServerConn,
    publication: &str,
) -> Result<bool, WalError> {
    let rows = simple_query(
        conn,
        &format!(
            "SELECT puballtables, pubviaroot FROM pg_catalog.pg_publication \
             WHERE pubname = '{publication}'"
        ),
    )
    .await?;
    if let Some(row) = rows.first() {
        if row.first().and_then(|v| v.as_deref()) != Some("t") {
            tracing::warn!(
                publication,
                "publication does not cover all tables: writes to tables outside it are not seen"
            );
        }
        if row.get(1).and_then(|v| v.as_deref()) == Some("t") {
            tracing::warn!(
                publication,
                "publication has publish_via_partition_root = true: writes to partitions are \
                 reported as writes to the partitioned table"
            );
        }
        return Ok(true);
    }
    // publish_via_partition_root = false: a write to a partition names the partition.
    let create = format!(
        "CREATE PUBLICATION {publication} FOR ALL TABLES \
         WITH (publish_via_partition_root = false)"
    );
    match simple_query(conn, &create).await {
        Ok(_) => {
            tracing::info!(publication, "created publication for all tables");
            Ok(false)
        }
        Err(e) if e.sqlstate() == Some(DUPLICATE_OBJECT) => Ok(true),
        Err(e) if e.sqlstate() == Some(INSUFFICIENT_PRIVILEGE) => Err(WalError::Setup(format!(
            "{e}; a publication FOR ALL TABLES needs a superuser: run `{create}` once as one"
        ))),
        Err(e) => Err(e),
    }
}

/// Tables the publication covers whose UPDATE and DELETE Postgres refuses (55000, "does not
/// have a replica identity and publishes updates"): no primary key and the default replica
/// identity, or REPLICA IDENTITY NOTHING. Writes through pgstash or not, the application
/// breaks on them as soon as a publication of all tables exists, so they are named in the
/// log; how to mend each (a primary key, or `REPLICA IDENTITY FULL`) is the user's call.
pub async fn tables_refusing_updates(
    conn: &mut ServerConn,
    publication: &str,
) -> Result<Vec<String>, WalError> {
    let rows = simple_query(
        conn,
        &format!(
            "SELECT c.oid::regclass::text
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_publication p ON p.pubname = '{publication}'
              WHERE c.relkind = 'r' AND c.relpersistence = 'p'
                AND c.relnamespace NOT IN ('pg_catalog'::regnamespace,
                                           'information_schema'::regnamespace)
                AND c.relnamespace::regnamespace::text NOT LIKE 'pg_toast%'
                AND (p.pubupdate OR p.pubdelete)
                AND (p.puballtables OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables t
                                                WHERE t.pubname = p.pubname
                                                  AND t.schemaname = c.relnamespace::regnamespace::text
                                                  AND t.tablename = c.relname))
                AND (c.relreplident = 'n'
                     OR (c.relreplident = 'd'
                         AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                                          WHERE i.indrelid = c.oid AND i.indisprimary)))
              ORDER BY 1
              LIMIT 50"
        ),
    )
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect())
}

/// What `pg_replication_slots` says about a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub confirmed: Option<Lsn>,
}

pub async fn find_slot(conn: &mut ServerConn, slot: &str) -> Result<Option<SlotInfo>, WalError> {
    let rows = simple_query(
        conn,
        &format!(
            "SELECT plugin, database, confirmed_flush_lsn FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = '{slot}'"
        ),
    )
    .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    let mut cols = row.into_iter();
    let plugin = cols.next().flatten();
    let database = cols.next().flatten();
    let confirmed = match cols.next().flatten() {
        Some(text) => Some(
            text.parse()
                .map_err(|e| WalError::Protocol(format!("confirmed_flush_lsn: {e}")))?,
        ),
        None => None,
    };
    Ok(Some(SlotInfo {
        plugin,
        database,
        confirmed,
    }))
}

/// Create the logical slot; returns `false` when someone else created it first.
pub async fn create_slot(conn: &mut ServerConn, slot: &str) -> Result<bool, WalError> {
    // Waits until transactions running right now have finished (the slot needs a consistent
    // starting point), so this may take as long as the longest of them.
    let sql = format!("SELECT pg_catalog.pg_create_logical_replication_slot('{slot}', 'pgoutput')");
    match simple_query(conn, &sql).await {
        Ok(_) => Ok(true),
        Err(e) if e.sqlstate() == Some(DUPLICATE_OBJECT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Drop the slot if it exists; returns whether it did. Fails while a walsender uses it.
pub async fn drop_slot(conn: &mut ServerConn, slot: &str) -> Result<bool, WalError> {
    let rows = simple_query(
        conn,
        &format!(
            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .await?;
    Ok(!rows.is_empty())
}

/// What keeps the WAL source from vouching for the database, if anything: migration 0003
/// missing, or the DDL hooks disabled.
pub async fn check_installed(conn: &mut ServerConn) -> Result<Option<Missing>, WalError> {
    let rows = simple_query(conn, installed::sql(Source::Wal)).await?;
    let row = rows
        .first()
        .ok_or_else(|| WalError::Protocol("the installation check returned no row".into()))?;
    verdict(row)
}

/// How many tables carry the row trigger of the NOTIFY source, which the WAL source does not
/// need (for a hint at start).
pub async fn row_triggers(conn: &mut ServerConn) -> Result<i64, WalError> {
    let rows = simple_query(
        conn,
        "SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgname = 'pgstash_notify'",
    )
    .await?;
    rows.first()
        .and_then(|r| r.first())
        .and_then(|v| v.as_deref())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| WalError::Protocol("counting row triggers returned no number".into()))
}

fn verdict(row: &[Option<String>]) -> Result<Option<Missing>, WalError> {
    let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
    installed::verdict(Source::Wal, &values).map_err(WalError::Protocol)
}

/// Prepare a connection for [`wal_heartbeat`]: its commits flush the WAL at once, without
/// waiting for synchronous standbys.
pub async fn prepare_heartbeat(conn: &mut ServerConn) -> Result<(), WalError> {
    simple_query(conn, "SET synchronous_commit = local").await?;
    Ok(())
}

/// A WAL position every transaction committed before this call ends at or before, and that
/// the replication stream is sure to reach.
///
/// The server's write or flush position will not do: it can stop at a page boundary in the
/// middle of a record that nothing flushes while the server is otherwise idle (the WAL
/// writer flushes only whole pages and commits; think of a row inserted by a transaction
/// that stays open), so decoding would not get there and we would report lag that is not
/// there. So the heartbeat
/// reads the insert position and then commits a transaction of its own (`txid_current()`
/// gives it an xid, hence a commit record), flushed at commit: the stream must pass that
/// commit, which lies after the position read. Costs one transaction id and a few dozen
/// bytes of WAL per call.
///
/// It also runs [`check_installed`]'s check, in the same round trip: disabling an event
/// trigger is not itself reported by one, so only asking shows it.
pub async fn wal_heartbeat(conn: &mut ServerConn) -> Result<(Lsn, Option<Missing>), WalError> {
    let sql = format!(
        "SELECT pg_catalog.pg_current_wal_insert_lsn(), pg_catalog.txid_current(), {}",
        installed::WAL_COLUMNS
    );
    let rows = simple_query(conn, &sql).await?;
    let row = rows
        .first()
        .ok_or_else(|| WalError::Protocol("pg_current_wal_insert_lsn() returned no row".into()))?;
    let text = row.first().and_then(|v| v.as_deref()).ok_or_else(|| {
        WalError::Protocol("pg_current_wal_insert_lsn() returned no value".into())
    })?;
    let lsn = text
        .parse()
        .map_err(|e| WalError::Protocol(format!("pg_current_wal_insert_lsn(): {e}")))?;
    Ok((lsn, verdict(row.get(2..).unwrap_or_default())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_what_a_slot_name_may_be() {
        for ok in ["pgstash", "pgstash_2", "a", &"x".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "PgStash",
            "pg-stash",
            "a'b",
            "a b",
            "ä",
            &"x".repeat(64),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
