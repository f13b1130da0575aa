//! From pgoutput messages to the [`Change`]s of each committed transaction: keeps the
//! relations the stream described and, per transaction, the key values of every changed row,
//! and adds what pgstash's DDL hooks reported in the transaction (logical decoding messages
//! with prefix [`MESSAGE_PREFIX`], written since migration 0003: DDL and REFRESH
//! MATERIALIZED VIEW, which the stream does not carry).

use super::lsn::Lsn;
use super::payload::{self, Meaning};
use super::pgoutput::{Datum, PgOutput, Relation, Tuple};
use super::{Change, TableRef};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

/// Postgres counts time from 2000-01-01 UTC, 946,684,800 s after the Unix epoch.
const PG_EPOCH_OFFSET: Duration = Duration::from_secs(946_684_800);

/// Prefix of the logical decoding messages of pgstash's DDL hooks (`pgstash.send` in
/// `migrations/0003_wal_source.up.sql`); messages with other prefixes are someone else's.
pub const MESSAGE_PREFIX: &str = "pgstash";

/// The prefix of an instance's echo (see `catch_up`): a transaction of its own whose only
/// content is the message; the stream hands it out when it reaches that commit.
pub const ECHO_PREFIX: &str = "pgstash_echo";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("pgoutput stream out of order: {0}")]
    OutOfOrder(&'static str),
    #[error("pgoutput change to relation {0} that the stream never described")]
    UnknownRelation(u32),
}

/// What one transaction changed, ready for [`ChangeSink::apply`](super::ChangeSink::apply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The position to confirm once applied; `None` for a non-transactional message, which
    /// belongs to no transaction (keepalives confirm past it).
    pub end_lsn: Option<Lsn>,
    pub committed_at: Option<SystemTime>,
    pub changes: Vec<Change>,
    /// The transaction removed pgstash's DDL hooks from the WAL (reverted migration 0003):
    /// DDL committed after it is not reported.
    pub uninstalled: bool,
    /// Echoes an instance sent through the WAL (see [`ECHO_PREFIX`]), to be told once
    /// `changes` are applied.
    pub echoes: Vec<String>,
}

/// What we keep of a relation: its name and where its single-column primary key is.
struct RelationInfo {
    table: TableRef,
    /// Set only when the flagged key columns are the primary key (REPLICA IDENTITY DEFAULT)
    /// and there is exactly one: any other key would name rows by something the cache does
    /// not key on, so its values must not be reported as primary-key values.
    key_column: Option<usize>,
}

/// The rows a transaction changed in one table.
enum Rows {
    Keys(Vec<String>, HashSet<String>),
    Unknown,
    /// The table as a whole: TRUNCATE, DDL, REFRESH MATERIALIZED VIEW.
    Whole,
}

#[derive(Default)]
struct Transaction {
    /// Tables in the order they were first changed, each with its rows.
    tables: Vec<(TableRef, Rows)>,
    index: HashMap<TableRef, usize>,
    /// A change no table accounts for: everything in the database.
    database: bool,
    uninstalled: bool,
    echoes: Vec<String>,
}

pub struct Collector {
    relations: HashMap<u32, RelationInfo>,
    tx: Option<Transaction>,
    max_keys: usize,
    server_utf8: bool,
}

impl Collector {
    /// `max_keys` bounds the keys kept per table and transaction (beyond it the table's rows
    /// become unknown). `server_utf8`: whether the database's encoding is UTF8; otherwise
    /// only ASCII key values are reported, since the cache compares keys as UTF-8 text.
    pub fn new(max_keys: usize, server_utf8: bool) -> Collector {
        Collector {
            relations: HashMap::new(),
            tx: None,
            max_keys,
            server_utf8,
        }
    }

    /// Between transactions: everything received so far has been handed out.
    pub fn is_idle(&self) -> bool {
        self.tx.is_none()
    }

    /// Take one message; a Commit returns the transaction's changes.
    pub fn handle(&mut self, msg: PgOutput) -> Result<Option<Committed>, StreamError> {
        match msg {
            PgOutput::Begin { .. } => {
                if self.tx.is_some() {
                    return Err(StreamError::OutOfOrder("Begin inside a transaction"));
                }
                self.tx = Some(Transaction::default());
            }
            PgOutput::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                let mut tx = self
                    .tx
                    .take()
                    .ok_or(StreamError::OutOfOrder("Commit outside a transaction"))?;
                let uninstalled = tx.uninstalled;
                let echoes = std::mem::take(&mut tx.echoes);
                return Ok(Some(Committed {
                    end_lsn: Some(end_lsn),
                    committed_at: pg_time(commit_time),
                    changes: tx.into_changes(),
                    uninstalled,
                    echoes,
                }));
            }
            PgOutput::Relation(rel) => {
                let info = relation_info(&rel);
                self.relations.insert(rel.id, info);
            }
            PgOutput::Insert { relation, new } => {
                self.row_change(relation, None, Some(&new))?;
            }
            PgOutput::Update { relation, old, new } => {
                self.row_change(relation, old.as_ref().map(|o| &o.tuple), Some(&new))?;
            }
            PgOutput::Delete { relation, old } => {
                self.row_change(relation, Some(&old.tuple), None)?;
            }
            PgOutput::Truncate { relations, .. } => {
                for id in relations {
                    let table = self.table_of(id)?.clone();
                    *self.tx_mut()?.rows(table) = Rows::Whole;
                }
            }
            PgOutput::Message {
                transactional,
                prefix,
                content,
                ..
            } if prefix == MESSAGE_PREFIX => return self.message(transactional, &content),
            PgOutput::Message {
                transactional,
                prefix,
                content,
                ..
            } if prefix == ECHO_PREFIX => {
                let echo = String::from_utf8_lossy(&content).into_owned();
                match self.tx.as_mut() {
                    Some(tx) => tx.echoes.push(echo),
                    // Sent outside a transaction (not by pgstash): it still comes after
                    // every commit before it, so it can be told at once.
                    None if !transactional => {
                        return Ok(Some(Committed {
                            end_lsn: None,
                            committed_at: None,
                            changes: Vec::new(),
                            uninstalled: false,
                            echoes: vec![echo],
                        }));
                    }
                    None => {
                        return Err(StreamError::OutOfOrder(
                            "transactional message outside a transaction",
                        ));
                    }
                }
            }
            PgOutput::Origin { .. } | PgOutput::Type { .. } | PgOutput::Message { .. } => {}
        }
        Ok(None)
    }

    /// A report of pgstash's DDL hooks: it joins its transaction. pgstash sends no
    /// non-transactional ones, but anyone may: one outside a transaction is handed out on
    /// its own at once (it can only invalidate more), and never counts as uninstalling,
    /// since it is not tied to a commit that removed anything.
    fn message(
        &mut self,
        transactional: bool,
        content: &[u8],
    ) -> Result<Option<Committed>, StreamError> {
        let parsed = std::str::from_utf8(content)
            .map_err(|e| e.to_string())
            .and_then(|text| payload::parse(text).map_err(|e| e.to_string()));
        let (change, uninstalled, at) = match parsed {
            Ok(p) => match p.meaning {
                Meaning::Change(change) => (change, false, p.at),
                Meaning::Uninstalled => (Change::Database, transactional, p.at),
            },
            Err(error) => {
                // When in doubt, invalidate wider.
                tracing::warn!(%error, content = %String::from_utf8_lossy(content),
                    "unreadable pgstash message in the WAL; invalidating the whole database");
                (Change::Database, false, None)
            }
        };
        match self.tx.as_mut() {
            Some(tx) => {
                tx.add(change);
                tx.uninstalled |= uninstalled;
                Ok(None)
            }
            None if transactional => Err(StreamError::OutOfOrder(
                "transactional message outside a transaction",
            )),
            None => Ok(Some(Committed {
                end_lsn: None,
                committed_at: at,
                changes: vec![change],
                uninstalled: false,
                echoes: Vec::new(),
            })),
        }
    }

    fn tx_mut(&mut self) -> Result<&mut Transaction, StreamError> {
        self.tx
            .as_mut()
            .ok_or(StreamError::OutOfOrder("row change outside a transaction"))
    }

    fn table_of(&self, id: u32) -> Result<&TableRef, StreamError> {
        self.relations
            .get(&id)
            .map(|r| &r.table)
            .ok_or(StreamError::UnknownRelation(id))
    }

    /// Record the keys of one changed row: the old key when the change carries one (an
    /// update that changed the key, a delete), and the new row's key.
    fn row_change(
        &mut self,
        id: u32,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
    ) -> Result<(), StreamError> {
        let info = self
            .relations
            .get(&id)
            .ok_or(StreamError::UnknownRelation(id))?;
        let keys = info.key_column.and_then(|col| {
            let mut keys = Vec::with_capacity(2);
            for tuple in [old, new].into_iter().flatten() {
                keys.push(key_text(tuple.get(col)?, self.server_utf8)?);
            }
            Some(keys)
        });
        let table = info.table.clone();
        let max_keys = self.max_keys;
        let rows = self.tx_mut()?.rows(table);
        match (keys, &mut *rows) {
            (_, Rows::Whole | Rows::Unknown) => {}
            (Some(keys), Rows::Keys(list, seen)) => {
                for k in keys {
                    if !seen.contains(&k) {
                        if list.len() >= max_keys {
                            // Bounded memory: a huge transaction invalidates the table instead.
                            *rows = Rows::Unknown;
                            return Ok(());
                        }
                        seen.insert(k.clone());
                        list.push(k);
                    }
                }
            }
            (None, _) => *rows = Rows::Unknown,
        }
        Ok(())
    }
}

impl Transaction {
    fn rows(&mut self, table: TableRef) -> &mut Rows {
        let i = *self.index.entry(table.clone()).or_insert_with(|| {
            self.tables
                .push((table, Rows::Keys(Vec::new(), HashSet::new())));
            self.tables.len() - 1
        });
        &mut self.tables[i].1
    }

    /// A change reported by a message (which never carries keys).
    fn add(&mut self, change: Change) {
        match change {
            Change::Database => self.database = true,
            Change::Table(table) => *self.rows(table) = Rows::Whole,
            Change::Rows { table, .. } => {
                let rows = self.rows(table);
                if !matches!(rows, Rows::Whole) {
                    *rows = Rows::Unknown;
                }
            }
        }
    }

    fn into_changes(self) -> Vec<Change> {
        if self.database {
            // Covers every table the transaction touched, too.
            return vec![Change::Database];
        }
        self.tables
            .into_iter()
            .map(|(table, rows)| match rows {
                Rows::Keys(keys, _) => Change::Rows {
                    table,
                    keys: Some(keys),
                },
                Rows::Unknown => Change::Rows { table, keys: None },
                Rows::Whole => Change::Table(table),
            })
            .collect()
    }
}

fn relation_info(rel: &Relation) -> RelationInfo {
    let mut keys = rel.columns.iter().enumerate().filter(|(_, c)| c.key);
    let key_column = match (rel.replica_identity, keys.next(), keys.next()) {
        (b'd', Some((i, _)), None) => Some(i),
        _ => None,
    };
    RelationInfo {
        table: TableRef {
            // pgoutput sends an empty namespace for pg_catalog.
            schema: if rel.schema.is_empty() {
                "pg_catalog".into()
            } else {
                rel.schema.clone()
            },
            name: rel.name.clone(),
        },
        key_column,
    }
}

/// A key value as the cache compares it, or `None` when this value cannot name the row
/// (null, an unchanged TOASTed value we were not sent, binary, or text the cache would
/// spell differently).
fn key_text(d: &Datum, server_utf8: bool) -> Option<String> {
    match d {
        Datum::Text(b) if server_utf8 || b.is_ascii() => {
            std::str::from_utf8(b).ok().map(str::to_owned)
        }
        _ => None,
    }
}

/// Postgres timestamps: microseconds since 2000-01-01 UTC.
fn pg_time(micros: i64) -> Option<SystemTime> {
    let epoch = SystemTime::UNIX_EPOCH + PG_EPOCH_OFFSET;
    if micros >= 0 {
        epoch.checked_add(Duration::from_micros(micros as u64))
    } else {
        epoch.checked_sub(Duration::from_micros(micros.unsigned_abs()))
    }
}

#[cfg(test)]
mod tests;
