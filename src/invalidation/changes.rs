//! From pgoutput messages to the [`Change`]s of each committed transaction: keeps the
//! relations the stream described and, per transaction, the key values of every changed row.

use super::lsn::Lsn;
use super::pgoutput::{Datum, PgOutput, Relation, Tuple};
use super::{Change, TableRef};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

/// Postgres counts time from 2000-01-01 UTC, 946,684,800 s after the Unix epoch.
const PG_EPOCH_OFFSET: Duration = Duration::from_secs(946_684_800);

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
    pub end_lsn: Lsn,
    pub committed_at: Option<SystemTime>,
    pub changes: Vec<Change>,
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
    Truncated,
}

struct Transaction {
    /// Tables in the order they were first changed, each with its rows.
    tables: Vec<(TableRef, Rows)>,
    index: HashMap<TableRef, usize>,
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
                self.tx = Some(Transaction {
                    tables: Vec::new(),
                    index: HashMap::new(),
                });
            }
            PgOutput::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                let tx = self
                    .tx
                    .take()
                    .ok_or(StreamError::OutOfOrder("Commit outside a transaction"))?;
                return Ok(Some(Committed {
                    end_lsn,
                    committed_at: pg_time(commit_time),
                    changes: tx.into_changes(),
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
                    *self.tx_mut()?.rows(table) = Rows::Truncated;
                }
            }
            PgOutput::Origin { .. } | PgOutput::Type { .. } | PgOutput::Message { .. } => {}
        }
        Ok(None)
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
            (_, Rows::Truncated | Rows::Unknown) => {}
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

    fn into_changes(self) -> Vec<Change> {
        self.tables
            .into_iter()
            .map(|(table, rows)| match rows {
                Rows::Keys(keys, _) => Change::Rows {
                    table,
                    keys: Some(keys),
                },
                Rows::Unknown => Change::Rows { table, keys: None },
                Rows::Truncated => Change::Table(table),
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
mod tests {
    use super::super::pgoutput::decode;
    use super::super::pgoutput::tests::{Msg, relation};
    use super::*;

    fn t(name: &str) -> TableRef {
        TableRef {
            schema: "public".into(),
            name: name.into(),
        }
    }

    fn keys(name: &str, ks: &[&str]) -> Change {
        Change::Rows {
            table: t(name),
            keys: Some(ks.iter().map(|k| k.to_string()).collect()),
        }
    }

    /// Feed raw messages through the decoder; return the changes of each commit.
    fn run(c: &mut Collector, msgs: &[bytes::Bytes]) -> Vec<Committed> {
        msgs.iter()
            .filter_map(|m| c.handle(decode(m).expect("decodes")).expect("in order"))
            .collect()
    }

    fn begin() -> bytes::Bytes {
        Msg::new(b'B').u64(0x100).u64(0).u32(7).bytes()
    }

    fn commit(end: u64, time: u64) -> bytes::Bytes {
        Msg::new(b'C').u8(0).u64(0x100).u64(end).u64(time).bytes()
    }

    fn insert(rel: u32, cols: &[Option<&str>]) -> bytes::Bytes {
        Msg::new(b'I').u32(rel).u8(b'N').tuple(cols).bytes()
    }

    fn pk_table() -> bytes::Bytes {
        relation(1, "t", b'd', &[("id", true), ("v", false)])
    }

    #[test]
    fn a_commit_reports_every_changed_key_with_its_time_and_position() {
        let mut c = Collector::new(100, true);
        let out = run(
            &mut c,
            &[
                begin(),
                pk_table(),
                insert(1, &[Some("1"), Some("10")]),
                insert(1, &[Some("2"), None]),
                insert(1, &[Some("1"), Some("11")]),
                commit(0x200, 1_000_000),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].changes, [keys("t", &["1", "2"])]);
        assert_eq!(out[0].end_lsn, Lsn(0x200));
        assert_eq!(
            out[0].committed_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_801))
        );
        assert!(c.is_idle());
    }

    #[test]
    fn an_update_changing_the_key_reports_old_and_new_key() {
        let mut c = Collector::new(100, true);
        let update = Msg::new(b'U')
            .u32(1)
            .u8(b'K')
            .tuple(&[Some("5"), None])
            .u8(b'N')
            .tuple(&[Some("50"), Some("\u{1}")])
            .bytes();
        let same_key = Msg::new(b'U')
            .u32(1)
            .u8(b'N')
            .tuple(&[Some("7"), Some("1")])
            .bytes();
        let out = run(
            &mut c,
            &[begin(), pk_table(), update, same_key, commit(0x200, 0)],
        );
        assert_eq!(out[0].changes, [keys("t", &["5", "50", "7"])]);
    }

    #[test]
    fn a_delete_reports_the_old_key() {
        let mut c = Collector::new(100, true);
        let delete = Msg::new(b'D')
            .u32(1)
            .u8(b'K')
            .tuple(&[Some("9"), None])
            .bytes();
        let out = run(&mut c, &[begin(), pk_table(), delete, commit(0x200, 0)]);
        assert_eq!(out[0].changes, [keys("t", &["9"])]);
    }

    #[test]
    fn rows_without_a_usable_single_column_key_are_unknown() {
        let mut c = Collector::new(100, true);
        let no_key = relation(2, "nokey", b'd', &[("a", false), ("b", false)]);
        let two_keys = relation(3, "pair", b'd', &[("a", true), ("b", true)]);
        // REPLICA IDENTITY FULL flags every column; a lone column is still not the PK.
        let full = relation(4, "full", b'f', &[("a", true)]);
        let full_delete = Msg::new(b'D').u32(4).u8(b'O').tuple(&[Some("3")]).bytes();
        // REPLICA IDENTITY USING INDEX: a unique index, not the primary key.
        let by_index = relation(5, "byidx", b'i', &[("id", false), ("code", true)]);
        let out = run(
            &mut c,
            &[
                begin(),
                no_key,
                two_keys,
                full,
                by_index,
                insert(2, &[Some("1"), Some("2")]),
                insert(3, &[Some("1"), Some("2")]),
                full_delete,
                insert(5, &[Some("1"), Some("c")]),
                commit(0x200, 0),
            ],
        );
        let unknown = |n: &str| Change::Rows {
            table: t(n),
            keys: None,
        };
        assert_eq!(
            out[0].changes,
            [
                unknown("nokey"),
                unknown("pair"),
                unknown("full"),
                unknown("byidx")
            ]
        );
    }

    #[test]
    fn a_key_the_change_does_not_carry_makes_the_rows_unknown() {
        // An unchanged TOASTed key and a null key cannot name the row.
        for key in [Some("\u{1}"), None] {
            let mut c = Collector::new(100, true);
            let update = Msg::new(b'U')
                .u32(1)
                .u8(b'N')
                .tuple(&[key, Some("1")])
                .bytes();
            let out = run(
                &mut c,
                &[
                    begin(),
                    pk_table(),
                    insert(1, &[Some("1"), None]),
                    update,
                    insert(1, &[Some("2"), None]),
                    commit(0x200, 0),
                ],
            );
            assert_eq!(
                out[0].changes,
                [Change::Rows {
                    table: t("t"),
                    keys: None
                }]
            );
        }
    }

    #[test]
    fn non_ascii_keys_are_unknown_unless_the_server_speaks_utf8() {
        let msgs = [
            begin(),
            relation(1, "t", b'd', &[("name", true)]),
            insert(1, &[Some("zoë")]),
            commit(0x200, 0),
        ];
        assert_eq!(
            run(&mut Collector::new(9, true), &msgs)[0].changes,
            [keys("t", &["zoë"])]
        );
        assert_eq!(
            run(&mut Collector::new(9, false), &msgs)[0].changes,
            [Change::Rows {
                table: t("t"),
                keys: None
            }]
        );
    }

    #[test]
    fn too_many_keys_in_one_transaction_degrade_to_unknown_rows() {
        let mut c = Collector::new(3, true);
        let mut msgs = vec![begin(), pk_table()];
        for i in 0..5 {
            msgs.push(insert(1, &[Some(&i.to_string()), None]));
        }
        msgs.push(commit(0x200, 0));
        assert_eq!(
            run(&mut c, &msgs)[0].changes,
            [Change::Rows {
                table: t("t"),
                keys: None
            }]
        );
        // The next transaction starts afresh.
        let out = run(
            &mut c,
            &[begin(), insert(1, &[Some("1"), None]), commit(0x300, 0)],
        );
        assert_eq!(out[0].changes, [keys("t", &["1"])]);
    }

    #[test]
    fn truncate_of_several_tables_reports_each_table_whole() {
        let mut c = Collector::new(100, true);
        let out = run(
            &mut c,
            &[
                begin(),
                pk_table(),
                relation(2, "u", b'd', &[("id", true)]),
                insert(1, &[Some("1"), None]),
                Msg::new(b'T').u32(2).u8(1).u32(1).u32(2).bytes(),
                insert(1, &[Some("2"), None]),
                commit(0x200, 0),
            ],
        );
        assert_eq!(
            out[0].changes,
            [Change::Table(t("t")), Change::Table(t("u"))]
        );
    }

    #[test]
    fn pg_catalog_relations_get_their_schema_name_back() {
        let mut c = Collector::new(100, true);
        let rel = Msg::new(b'R')
            .u32(8)
            .cstr("")
            .cstr("pg_thing")
            .u8(b'n')
            .u16(0)
            .bytes();
        let out = run(&mut c, &[begin(), rel, insert(8, &[]), commit(1, 0)]);
        assert_eq!(
            out[0].changes,
            [Change::Rows {
                table: TableRef {
                    schema: "pg_catalog".into(),
                    name: "pg_thing".into()
                },
                keys: None
            }]
        );
    }

    #[test]
    fn an_empty_transaction_commits_no_changes() {
        let mut c = Collector::new(100, true);
        let out = run(&mut c, &[begin(), commit(0x200, 0)]);
        assert_eq!(out[0].changes, []);
    }

    #[test]
    fn messages_out_of_order_are_errors() {
        let mut c = Collector::new(100, true);
        let dec = |b: bytes::Bytes| decode(&b).expect("decodes");
        assert!(c.handle(dec(commit(1, 0))).is_err());
        assert!(c.handle(dec(pk_table())).is_ok());
        assert!(c.handle(dec(insert(1, &[Some("1"), None]))).is_err());
        assert!(c.handle(dec(begin())).is_ok());
        assert!(c.handle(dec(begin())).is_err());
        assert_eq!(
            c.handle(dec(insert(99, &[Some("1")]))),
            Err(StreamError::UnknownRelation(99))
        );
    }
}
