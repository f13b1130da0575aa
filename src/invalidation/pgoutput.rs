//! Decoding the messages of Postgres's `pgoutput` logical-decoding plugin, protocol version 1
//! (the payload of each XLogData message a `START_REPLICATION ... (proto_version '1')` stream
//! carries). Pure decoding: no state, no I/O; `changes` turns the messages into
//! [`Change`](super::Change)s.
//!
//! The input comes from the network, so every read is bounds-checked and a short or malformed
//! message is a [`DecodeError`], never a panic.

use super::lsn::Lsn;
use bytes::Bytes;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("pgoutput {what} message is truncated")]
    Truncated { what: &'static str },
    #[error("unknown pgoutput message type {0:?}")]
    UnknownMessage(char),
    #[error("pgoutput {what} message: unexpected {found:?} where {expected} belongs")]
    Unexpected {
        what: &'static str,
        found: char,
        expected: &'static str,
    },
    #[error("pgoutput {what} message has {extra} trailing bytes")]
    Trailing { what: &'static str, extra: usize },
}

/// One pgoutput v1 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutput {
    Begin {
        final_lsn: Lsn,
        /// Microseconds since 2000-01-01 UTC, Postgres's epoch.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        /// End of the transaction's commit record: the position to confirm once applied.
        end_lsn: Lsn,
        commit_time: i64,
    },
    /// The transaction was replicated from another origin; nothing to do for us.
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    /// Describes a non-built-in type used by a relation's columns; not needed for keys.
    Type {
        oid: u32,
        schema: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        /// The old key ('K', only when the key changed) or the whole old row ('O', with
        /// REPLICA IDENTITY FULL).
        old: Option<OldRow>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldRow,
    },
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        relations: Vec<u32>,
    },
    /// A `pg_logical_emit_message` (sent only when the `messages` option asks for them).
    Message {
        /// Sent inside its transaction, at its commit (and not at all if it rolled back);
        /// otherwise sent as soon as it was written, between transactions.
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// A relation as pgoutput describes it before the first change to it in a session (and again
/// after its definition changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    /// Empty for `pg_catalog`, as pgoutput sends it.
    pub schema: String,
    pub name: String,
    /// `relreplident`: 'd' default (primary key), 'n' nothing, 'f' full, 'i' index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (with 'd': the primary key).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Which old values an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': the replica-identity columns only (the others are null).
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Row,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldRow {
    pub kind: OldKind,
    pub tuple: Tuple,
}

pub type Tuple = Vec<Datum>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// A TOASTed value the change did not touch: pgoutput does not send it.
    UnchangedToast,
    /// The value in its text output form, in the database's encoding.
    Text(Bytes),
    /// The value in binary form (only with the `binary` option).
    Binary(Bytes),
}

/// Decode one pgoutput message (the data of one XLogData).
pub fn decode(msg: &Bytes) -> Result<PgOutput, DecodeError> {
    let tag = *msg.first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        buf: msg,
        pos: 1,
        what: "",
    };
    let out = match tag {
        b'B' => {
            r.what = "Begin";
            PgOutput::Begin {
                final_lsn: Lsn(r.u64()?),
                commit_time: r.i64()?,
                xid: r.u32()?,
            }
        }
        b'C' => {
            r.what = "Commit";
            let _flags = r.u8()?;
            PgOutput::Commit {
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_time: r.i64()?,
            }
        }
        b'O' => {
            r.what = "Origin";
            PgOutput::Origin {
                commit_lsn: Lsn(r.u64()?),
                name: r.cstr()?,
            }
        }
        b'R' => {
            r.what = "Relation";
            let id = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let ncols = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(ncols).min(r.remaining()));
            for _ in 0..ncols {
                columns.push(Column {
                    key: r.u8()? & 1 != 0,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            PgOutput::Relation(Relation {
                id,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => {
            r.what = "Type";
            PgOutput::Type {
                oid: r.u32()?,
                schema: r.cstr()?,
                name: r.cstr()?,
            }
        }
        b'I' => {
            r.what = "Insert";
            let relation = r.u32()?;
            r.expect(b'N', "'N' (new tuple)")?;
            PgOutput::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            r.what = "Update";
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'N' => None,
                kind @ (b'K' | b'O') => {
                    let old = r.old_row(kind)?;
                    r.expect(b'N', "'N' (new tuple)")?;
                    Some(old)
                }
                other => {
                    return Err(DecodeError::Unexpected {
                        what: r.what,
                        found: other as char,
                        expected: "'K', 'O' or 'N'",
                    });
                }
            };
            PgOutput::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            r.what = "Delete";
            let relation = r.u32()?;
            let old = match r.u8()? {
                kind @ (b'K' | b'O') => r.old_row(kind)?,
                other => {
                    return Err(DecodeError::Unexpected {
                        what: r.what,
                        found: other as char,
                        expected: "'K' or 'O'",
                    });
                }
            };
            PgOutput::Delete { relation, old }
        }
        b'T' => {
            r.what = "Truncate";
            let n = r.u32()?;
            let options = r.u8()?;
            let mut relations = Vec::with_capacity((n as usize).min(r.remaining() / 4));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            PgOutput::Truncate { options, relations }
        }
        b'M' => {
            r.what = "Message";
            // Flags: bit 1 is "transactional"; no other is defined.
            let transactional = r.u8()? & 1 != 0;
            let lsn = Lsn(r.u64()?);
            let prefix = r.cstr()?;
            let len = r.u32()? as usize;
            let start = r.pos;
            r.take(len)?;
            PgOutput::Message {
                transactional,
                lsn,
                prefix,
                content: r.buf.slice(start..start + len),
            }
        }
        other => return Err(DecodeError::UnknownMessage(other as char)),
    };
    if r.remaining() != 0 {
        return Err(DecodeError::Trailing {
            what: r.what,
            extra: r.remaining(),
        });
    }
    Ok(out)
}

/// Bounds-checked big-endian reads; `what` names the message for errors.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    what: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(DecodeError::Truncated { what: self.what })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let what = self.what;
        self.take(N)?
            .try_into()
            .map_err(|_| DecodeError::Truncated { what })
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// A NUL-terminated name. Names are shown to operators only, so lossy UTF-8 is fine.
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { what: self.what })?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), DecodeError> {
        match self.u8()? {
            b if b == byte => Ok(()),
            other => Err(DecodeError::Unexpected {
                what: self.what,
                found: other as char,
                expected,
            }),
        }
    }

    fn old_row(&mut self, kind: u8) -> Result<OldRow, DecodeError> {
        Ok(OldRow {
            kind: if kind == b'K' {
                OldKind::Key
            } else {
                OldKind::Row
            },
            tuple: self.tuple()?,
        })
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.u16()?;
        // Each column takes at least one byte: a lying count cannot allocate much.
        let mut cols = Vec::with_capacity(usize::from(n).min(self.remaining()));
        for _ in 0..n {
            cols.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.u32()? as usize;
                    let start = self.pos;
                    self.take(len)?;
                    let value = self.buf.slice(start..start + len);
                    if kind == b't' {
                        Datum::Text(value)
                    } else {
                        Datum::Binary(value)
                    }
                }
                other => {
                    return Err(DecodeError::Unexpected {
                        what: self.what,
                        found: other as char,
                        expected: "a column kind ('n', 'u', 't' or 'b')",
                    });
                }
            });
        }
        Ok(cols)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput messages the way the server lays them out.
    #[derive(Default)]
    pub(crate) struct Msg(pub Vec<u8>);

    impl Msg {
        pub(crate) fn new(tag: u8) -> Msg {
            Msg(vec![tag])
        }
        pub(crate) fn u8(mut self, v: u8) -> Msg {
            self.0.push(v);
            self
        }
        pub(crate) fn u16(mut self, v: u16) -> Msg {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn u32(mut self, v: u32) -> Msg {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn u64(mut self, v: u64) -> Msg {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn cstr(mut self, s: &str) -> Msg {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        /// Tuple data: `None` = null, `Some("\u{1}")` = unchanged TOAST, else a text value.
        pub(crate) fn tuple(mut self, cols: &[Option<&str>]) -> Msg {
            self = self.u16(cols.len() as u16);
            for c in cols {
                self = match c {
                    None => self.u8(b'n'),
                    Some("\u{1}") => self.u8(b'u'),
                    Some(v) => {
                        let mut m = self.u8(b't').u32(v.len() as u32);
                        m.0.extend_from_slice(v.as_bytes());
                        m
                    }
                };
            }
            self
        }
        pub(crate) fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    pub(crate) fn relation(id: u32, name: &str, identity: u8, cols: &[(&str, bool)]) -> Bytes {
        let mut m = Msg::new(b'R')
            .u32(id)
            .cstr("public")
            .cstr(name)
            .u8(identity)
            .u16(cols.len() as u16);
        for (col, key) in cols {
            m = m.u8(u8::from(*key)).cstr(col).u32(23).u32(u32::MAX);
        }
        m.bytes()
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn begin_and_commit_carry_positions_and_time() {
        let begin = Msg::new(b'B').u64(0x10).u64(7).u32(42).bytes();
        assert_eq!(
            decode(&begin),
            Ok(PgOutput::Begin {
                final_lsn: Lsn(0x10),
                commit_time: 7,
                xid: 42
            })
        );
        let commit = Msg::new(b'C').u8(0).u64(0x10).u64(0x28).u64(7).bytes();
        assert_eq!(
            decode(&commit),
            Ok(PgOutput::Commit {
                commit_lsn: Lsn(0x10),
                end_lsn: Lsn(0x28),
                commit_time: 7
            })
        );
    }

    #[test]
    fn relation_flags_its_key_columns() {
        let m = relation(16384, "t", b'd', &[("id", true), ("v", false)]);
        let PgOutput::Relation(rel) = decode(&m).expect("decodes") else {
            panic!("not a relation")
        };
        assert_eq!(
            (rel.id, rel.schema.as_str(), rel.name.as_str()),
            (16384, "public", "t")
        );
        assert_eq!(rel.replica_identity, b'd');
        assert_eq!(
            rel.columns
                .iter()
                .map(|c| (c.name.as_str(), c.key))
                .collect::<Vec<_>>(),
            [("id", true), ("v", false)]
        );
        assert_eq!(rel.columns[0].type_oid, 23);
        assert_eq!(rel.columns[0].type_modifier, -1);
    }

    #[test]
    fn insert_tuple_distinguishes_text_null_and_unchanged_toast() {
        let m = Msg::new(b'I')
            .u32(1)
            .u8(b'N')
            .tuple(&[Some("1"), None, Some("\u{1}"), Some("")])
            .bytes();
        assert_eq!(
            decode(&m),
            Ok(PgOutput::Insert {
                relation: 1,
                new: vec![text("1"), Datum::Null, Datum::UnchangedToast, text("")]
            })
        );
    }

    #[test]
    fn update_that_changes_the_key_carries_the_old_key() {
        let m = Msg::new(b'U')
            .u32(1)
            .u8(b'K')
            .tuple(&[Some("5"), None])
            .u8(b'N')
            .tuple(&[Some("50"), Some("\u{1}")])
            .bytes();
        assert_eq!(
            decode(&m),
            Ok(PgOutput::Update {
                relation: 1,
                old: Some(OldRow {
                    kind: OldKind::Key,
                    tuple: vec![text("5"), Datum::Null]
                }),
                new: vec![text("50"), Datum::UnchangedToast]
            })
        );
        let plain = Msg::new(b'U').u32(1).u8(b'N').tuple(&[Some("5")]).bytes();
        assert!(matches!(
            decode(&plain),
            Ok(PgOutput::Update { old: None, .. })
        ));
    }

    #[test]
    fn delete_with_the_whole_old_row() {
        let m = Msg::new(b'D')
            .u32(9)
            .u8(b'O')
            .tuple(&[Some("3"), Some("x")])
            .bytes();
        assert_eq!(
            decode(&m),
            Ok(PgOutput::Delete {
                relation: 9,
                old: OldRow {
                    kind: OldKind::Row,
                    tuple: vec![text("3"), text("x")]
                }
            })
        );
    }

    #[test]
    fn truncate_lists_every_relation() {
        let m = Msg::new(b'T').u32(3).u8(1).u32(10).u32(11).u32(12).bytes();
        assert_eq!(
            decode(&m),
            Ok(PgOutput::Truncate {
                options: 1,
                relations: vec![10, 11, 12]
            })
        );
    }

    #[test]
    fn origin_type_and_logical_messages_decode() {
        let o = Msg::new(b'O').u64(5).cstr("elsewhere").bytes();
        assert!(matches!(decode(&o), Ok(PgOutput::Origin { name, .. }) if name == "elsewhere"));
        let y = Msg::new(b'Y').u32(77).cstr("public").cstr("mood").bytes();
        assert!(matches!(decode(&y), Ok(PgOutput::Type { oid: 77, .. })));
        let mut m = Msg::new(b'M').u8(1).u64(5).cstr("p").u32(3);
        m.0.extend_from_slice(b"abc");
        assert_eq!(
            decode(&m.bytes()),
            Ok(PgOutput::Message {
                transactional: true,
                lsn: Lsn(5),
                prefix: "p".into(),
                content: Bytes::from_static(b"abc")
            })
        );
        let mut m = Msg::new(b'M').u8(0).u64(6).cstr("q").u32(0);
        assert!(matches!(
            decode(&m.bytes()),
            Ok(PgOutput::Message { transactional: false, content, .. }) if content.is_empty()
        ));
        // A content length beyond the message.
        m = Msg::new(b'M').u8(1).u64(5).cstr("p").u32(4);
        m.0.extend_from_slice(b"abc");
        assert!(matches!(
            decode(&m.bytes()),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn short_or_malformed_input_is_an_error_not_a_panic() {
        let whole = [
            Msg::new(b'B').u64(1).u64(2).u32(3).bytes(),
            Msg::new(b'C').u8(0).u64(1).u64(2).u64(3).bytes(),
            relation(1, "t", b'd', &[("id", true), ("v", false)]),
            Msg::new(b'U')
                .u32(1)
                .u8(b'K')
                .tuple(&[Some("5"), None])
                .u8(b'N')
                .tuple(&[Some("50"), Some("x")])
                .bytes(),
            Msg::new(b'D').u32(1).u8(b'K').tuple(&[Some("5")]).bytes(),
            Msg::new(b'T').u32(2).u8(0).u32(1).u32(2).bytes(),
            Msg::new(b'M')
                .u8(1)
                .u64(5)
                .cstr("p")
                .u32(1)
                .u8(b'x')
                .bytes(),
        ];
        // Every proper prefix of a valid message is truncated.
        for m in &whole {
            assert!(decode(m).is_ok(), "{m:?}");
            for cut in 0..m.len() {
                assert!(decode(&m.slice(..cut)).is_err(), "{:?}", m.slice(..cut));
            }
        }
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            decode(&Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownMessage('Z'))
        );
        // A column kind that does not exist.
        let bad_kind = Msg::new(b'I').u32(1).u8(b'N').u16(1).u8(b'q').bytes();
        assert!(matches!(
            decode(&bad_kind),
            Err(DecodeError::Unexpected { found: 'q', .. })
        ));
        // A delete without old values.
        let bad_delete = Msg::new(b'D').u32(1).u8(b'N').tuple(&[Some("1")]).bytes();
        assert!(decode(&bad_delete).is_err());
        // A value length far beyond the message.
        let huge = Msg::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .u32(u32::MAX)
            .bytes();
        assert!(matches!(decode(&huge), Err(DecodeError::Truncated { .. })));
        // Counts that promise more than is there.
        let many = Msg::new(b'T').u32(u32::MAX).u8(0).u32(1).bytes();
        assert!(matches!(decode(&many), Err(DecodeError::Truncated { .. })));
        // Bytes after the end of a message.
        let trailing = Msg::new(b'B').u64(1).u64(2).u32(3).u8(0).bytes();
        assert!(matches!(
            decode(&trailing),
            Err(DecodeError::Trailing { extra: 1, .. })
        ));
    }
}
