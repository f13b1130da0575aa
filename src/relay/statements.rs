//! Named prepared statements across pooled server connections.
//!
//! A client's statement `s0` is prepared on the server as `pgstash_<hash of text and types>`,
//! so any server connection can hold it for any client, and two clients' `s0`s never collide.
//! Each server connection remembers which hashes it has; a Bind or Describe of a statement the
//! current connection lacks gets the Parse injected first.

use crate::protocol::{self, cstr_at};
use crate::session::{Effect, effects_of};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use xxhash_rust::xxh3::Xxh3;

/// A prepared statement as a client sees it; cloned for every Parse a driver repeats (and
/// remembered in several places), so its fields sit behind one shared pointer.
#[derive(Debug, Clone)]
pub struct Statement(Arc<StatementData>);

impl Statement {
    /// The same statement (the same Parse taken once), not merely an equal one.
    pub fn is(&self, other: &Statement) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Statement {
    type Target = StatementData;
    fn deref(&self) -> &StatementData {
        &self.0
    }
}

#[derive(Debug)]
pub struct StatementData {
    pub hash: u64,
    pub server_name: Arc<str>,
    /// The Parse to send when a server connection lacks this statement (already renamed).
    pub parse: Bytes,
    /// Session effects of running it (a prepared `SET`, `LISTEN`, ...).
    pub effects: Arc<[Effect]>,
    /// The query text and parameter types, for cache analysis and keys.
    pub sql: Arc<str>,
    pub param_types: Bytes,
}

/// A parsed Parse message body.
pub struct ParseBody<'a> {
    pub name: &'a [u8],
    pub sql: &'a [u8],
    pub param_types: &'a [u8],
}

pub fn read_parse(body: &[u8]) -> Option<ParseBody<'_>> {
    let (name, p1) = cstr_at(body, 0)?;
    let (sql, p2) = cstr_at(body, p1)?;
    Some(ParseBody {
        name,
        sql,
        param_types: body.get(p2..)?,
    })
}

/// Bumped when the relay sees DDL complete (a CREATE, ALTER or DROP tag). Statements
/// parsed afterwards get new server names, so a server connection never runs a plan of
/// the old schema for them ("cached plan must not change result type"), and no earlier
/// acceptance of their Parse is taken for granted.
pub static SCHEMA_EPOCH: AtomicU64 = AtomicU64::new(0);

/// What a server-side statement is shared under besides its text and types: the client's
/// settings (search_path decides what the names mean and which parameter types Postgres
/// infers) and the schema epoch.
pub fn scope(settings_fingerprint: u64) -> u64 {
    settings_fingerprint
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(SCHEMA_EPOCH.load(Relaxed))
}

impl Statement {
    pub fn new(p: &ParseBody<'_>, scope: u64) -> Statement {
        let mut h = Xxh3::new();
        h.update(p.sql);
        h.update(&[0]);
        h.update(p.param_types);
        h.update(&scope.to_le_bytes());
        let hash = h.digest();
        let server_name: Arc<str> = crate::upstream::prepared::server_name(hash).into();
        let sql: Arc<str> = String::from_utf8_lossy(p.sql).into();
        Statement(Arc::new(StatementData {
            hash,
            parse: protocol::parse(&server_name, p.sql, p.param_types),
            server_name,
            effects: effects_of(&sql).into(),
            sql,
            param_types: Bytes::copy_from_slice(p.param_types),
        }))
    }

    /// The client's unnamed statement: sent as is, tracked only to re-send it when the client
    /// binds it on a different server connection.
    pub fn unnamed(raw: Bytes, p: &ParseBody<'_>) -> Statement {
        let sql: Arc<str> = String::from_utf8_lossy(p.sql).into();
        Statement(Arc::new(StatementData {
            hash: 0,
            server_name: "".into(),
            parse: raw,
            effects: effects_of(&sql).into(),
            sql,
            param_types: Bytes::copy_from_slice(p.param_types),
        }))
    }
}

/// The statements one client has prepared, by the client's names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    named: HashMap<Bytes, Statement>,
    pub unnamed: Option<Statement>,
    /// Unnamed statements parsed lately, oldest first (see [`ClientStatements::unnamed_for`]).
    recent_unnamed: VecDeque<Statement>,
}

/// How many recent unnamed statements a client keeps: more than the statements of a
/// pgbench transaction (7), and as many as a scan compares in a few instructions each.
const RECENT_UNNAMED: usize = 8;

impl ClientStatements {
    pub fn get(&self, name: &[u8]) -> Option<&Statement> {
        self.named.get(name)
    }

    pub fn contains(&self, name: &[u8]) -> bool {
        self.named.contains_key(name)
    }

    pub fn insert(&mut self, name: Bytes, s: Statement) {
        self.named.insert(name, s);
    }

    pub fn remove(&mut self, name: &[u8]) {
        self.named.remove(name);
    }

    /// Forget `name` if it still refers to the statement with `hash` (its Parse failed).
    pub fn forget_failed(&mut self, name: &[u8], hash: u64) {
        if self.named.get(name).is_some_and(|s| s.hash == hash) {
            self.named.remove(name);
        }
    }

    pub fn clear(&mut self) {
        self.named.clear();
        self.unnamed = None;
    }

    /// The statement of an unnamed Parse. Drivers send the same few Parses over and over
    /// (`pgbench -M extended` cycles through a transaction's statements, ORMs through their
    /// queries): the same bytes as one of the last unnamed Parses make the same statement (it
    /// depends on nothing else), without decoding and scanning the text again.
    pub fn unnamed_for(&mut self, raw: &Bytes, body: &ParseBody<'_>) -> Statement {
        if let Some(s) = self.unnamed.as_ref().filter(|s| s.parse[..] == raw[..]) {
            return s.clone();
        }
        if let Some(s) = self.recent_unnamed.iter().find(|s| s.parse[..] == raw[..]) {
            return s.clone();
        }
        // Its own copy of the Parse: a slice of the read buffer would keep that whole buffer
        // alive as long as the statement is remembered.
        let s = Statement::unnamed(Bytes::copy_from_slice(raw), body);
        if self.recent_unnamed.len() == RECENT_UNNAMED {
            self.recent_unnamed.pop_front();
        }
        self.recent_unnamed.push_back(s.clone());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SELECT $1` under client name `name`, parameter type `oid`, in `scope`.
    fn select_param(name: &[u8], oid: u8, scope: u64) -> Statement {
        let types = [0, 1, 0, 0, 0, oid];
        Statement::new(
            &ParseBody {
                name,
                sql: b"SELECT $1",
                param_types: &types,
            },
            scope,
        )
    }

    #[test]
    fn same_text_and_types_share_a_server_name_and_others_do_not() {
        let a = select_param(b"s0", 0x17, 7);
        let b = select_param(b"s9", 0x17, 7);
        let c = select_param(b"s0", 0x19, 7);
        assert_eq!(a.server_name, b.server_name);
        assert_ne!(a.server_name, c.server_name);
        let other_scope = select_param(b"s0", 0x17, 8);
        assert_ne!(a.server_name, other_scope.server_name);
        let parsed = read_parse(&a.parse[5..]).unwrap();
        assert_eq!(parsed.name, a.server_name.as_bytes());
        assert_eq!(parsed.sql, b"SELECT $1");
    }

    #[test]
    fn unnamed_parses_seen_lately_are_not_decoded_again() {
        let mut c = ClientStatements::default();
        let parse = |sql: &str| protocol::parse("", sql.as_bytes(), b"\0\0");
        let parsed = |c: &mut ClientStatements, raw: &Bytes| {
            let body = read_parse(&raw[5..]).expect("parse body");
            c.unnamed_for(raw, &body)
        };
        let texts: Vec<String> = (0..RECENT_UNNAMED)
            .map(|k| format!("SET search_path = s{k}"))
            .collect();
        let first: Vec<Statement> = texts.iter().map(|t| parsed(&mut c, &parse(t))).collect();
        for (t, s) in texts.iter().zip(&first) {
            assert_eq!(&*s.sql, t.as_str());
            assert!(
                matches!(&s.effects[..], [Effect::Set { .. }]),
                "{t}: {:?}",
                s.effects
            );
            // Its own copy of the Parse, not a slice of the message it came in.
            let raw = parse(t);
            let again = parsed(&mut c, &raw);
            assert_eq!(again.parse.as_ptr(), s.parse.as_ptr(), "{t}: remembered");
            assert_ne!(again.parse.as_ptr(), raw.as_ptr());
            assert_eq!(&*again.sql, t.as_str());
        }
        // One more text pushes the oldest out: it is decoded anew, the others are not.
        parsed(&mut c, &parse("SELECT 1"));
        let oldest = parsed(&mut c, &parse(&texts[0]));
        assert_ne!(oldest.parse.as_ptr(), first[0].parse.as_ptr());
        assert_eq!(oldest.parse[..], first[0].parse[..]);
        let kept = parsed(&mut c, &parse(&texts[RECENT_UNNAMED - 1]));
        assert_eq!(
            kept.parse.as_ptr(),
            first[RECENT_UNNAMED - 1].parse.as_ptr()
        );
    }

    #[test]
    fn truncated_parse_body_is_rejected() {
        assert!(read_parse(b"s0\0SELECT").is_none());
    }
}
