//! Invalidation from writes the proxy cannot see: the change sources that listen to
//! Postgres itself (DESIGN.md "Freshness"). Writes the proxy relays are handled in
//! `relay::caching`; this module turns what Postgres reports (NOTIFY payloads from the
//! triggers in `migrations/`, or the logical replication stream) into [`Change`]s and hands
//! them to a [`ChangeSink`], which maps them onto the cache's generations.

pub mod apply;
pub mod catch_up;
mod changes;
pub mod installed;
mod lag;
pub mod leader;
pub mod lsn;
pub mod notify;
mod payload;
pub mod pgoutput;
mod replication;
pub mod roles;
mod setup;
pub mod wal;

use std::time::SystemTime;

/// A table as Postgres names it.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TableRef {
    pub schema: String,
    pub name: String,
}

/// One committed change, as precise as the source can tell.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Change {
    /// Rows of `table` changed. `keys` holds the primary-key values (text form, as
    /// Postgres prints them) of every changed row, old and new, when the table has a
    /// single-column primary key and the source carries it; `None` when the rows are
    /// not known (every cached read of the table is then stale).
    Rows {
        table: TableRef,
        keys: Option<Vec<String>>,
    },
    /// The table as a whole changed: TRUNCATE, ALTER, DROP, REFRESH MATERIALIZED VIEW.
    Table(TableRef),
    /// A schema change that cannot be attributed to tables: everything in the database.
    Database,
}

/// Where a change source delivers. Implemented by the cache; sources call it from their own
/// task. Both methods must be quick and must not block.
pub trait ChangeSink: Send + Sync + 'static {
    /// Changes that committed together in database `db`. `committed_at` is when Postgres
    /// committed them (or the closest time the source knows), for the staleness histogram.
    /// A source must call this before it acknowledges the changes (a replication slot's
    /// confirmed position moves only after `apply` returned).
    fn apply(&self, db: &str, committed_at: Option<SystemTime>, changes: &[Change]);

    /// Whether the source currently vouches for database `db`: connected and caught up
    /// (`true`), or disconnected / lagging / slot lost (`false`, with the reason). While it
    /// does not, the cache must not serve entries that depend on what the source covers.
    fn set_healthy(&self, db: &str, healthy: bool, reason: &str);

    /// The source heard an echo (see [`catch_up`]), `echo <nonce> <ticket>`, that some
    /// instance sent: every change it heard before has been handed to
    /// [`ChangeSink::apply`]. Once those changes are in effect, the instance that sent it
    /// is to be told.
    fn echo(&self, _db: &str, _payload: &str) {}
}
