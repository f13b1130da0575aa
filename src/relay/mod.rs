//! The data path for one client after login: relay messages both ways between the client and
//! a server connection from the pool, in one task.
//!
//! Both directions are buffered and polled together, so neither a client that pipelines
//! without reading nor a server streaming a large result can stall the other direction, and
//! the buffers are bounded (reading stops at a high-water mark). In transaction pool mode the
//! server connection is returned to the pool as soon as the client is idle outside a
//! transaction and has no request in flight.

pub mod bind;
pub mod caching;
mod expect;
mod portal_gap;
pub mod statements;

use crate::analysis::Analysis;
use crate::cache::{BuildMix, CacheKey, TableId};
use crate::cancel::CancelSlot;
use crate::catalog::HiddenChange;
use crate::config::PoolMode;
use crate::invalidation::catch_up::{CatchUp, Ticket};
use crate::metrics::{BypassReason, InvalidationOrigin, metrics};
use crate::protocol::{self, Message, MessageReader, ProtocolError, Severity, cstr_at};
use crate::session::{Effect, Settings};
use crate::upstream::pool::{Pooled, ServerPool};
use crate::upstream::{ServerConn, UpstreamError};
use bytes::{Buf, Bytes, BytesMut};
use caching::{CacheShared, Fill, Invalidation, ReadOutcome};
use expect::{Expect, Expectations};
use portal_gap::PortalGap;
use statements::{ClientStatements, Statement, read_parse};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Stop reading a side once this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("client: {0}")]
    Client(ProtocolError),
    #[error("client write: {0}")]
    ClientWrite(std::io::Error),
    #[error("server connection lost: {0}")]
    ServerLost(String),
    #[error("protocol violation: {0}")]
    Violation(String),
}

/// The session effects of open portals that have any. Most have none, and the map is then
/// empty: every Bind and Execute asks, so an empty map answers without hashing the name.
#[derive(Default)]
struct PortalEffects(HashMap<Bytes, Arc<[Effect]>>);

impl PortalEffects {
    fn get(&self, portal: &[u8]) -> Option<&Arc<[Effect]>> {
        if self.0.is_empty() {
            return None;
        }
        self.0.get(portal)
    }

    fn insert(&mut self, portal: &[u8], effects: Arc<[Effect]>) {
        self.0.insert(Bytes::copy_from_slice(portal), effects);
    }

    fn remove(&mut self, portal: &[u8]) {
        if !self.0.is_empty() {
            self.0.remove(portal);
        }
    }
}

enum Event {
    Client(Result<Option<Message>, ProtocolError>),
    Server(Result<Option<Message>, ProtocolError>),
    WroteClient(std::io::Result<usize>),
    WroteServer(std::io::Result<usize>),
    /// The change source applied the writes whose commit answer is held back.
    SourceHeard,
}

pub struct Relay<R, W> {
    client: MessageReader<R>,
    client_w: W,
    to_client: BytesMut,
    to_server: BytesMut,
    server: Option<Pooled>,
    pool: ServerPool,
    mode: PoolMode,
    expect: Expectations,
    statements: ClientStatements,
    /// Effects of the statement each portal was bound from, for portals that have any.
    portal_effects: PortalEffects,
    settings: Settings,
    cancel: Arc<CancelSlot>,
    tx_status: u8,
    /// Extended-protocol messages sent since the last Sync.
    batch_open: bool,
    copy_in: bool,
    /// pgstash answered an error itself; drop client messages until Sync like Postgres does.
    skip_to_sync: bool,
    /// Why the client may not leave its server connection, if it may not.
    pinned: Option<&'static str>,
    /// Settings the client changed (SET, RESET) since the server was last idle with nothing
    /// in flight: the ParameterStatus reports they cause, and their reverts at ROLLBACK, are
    /// expected.
    /// `None` stands for all of them (RESET ALL, DISCARD ALL, SET LOCAL).
    settings_touched: Option<Vec<String>>,
    /// An error or rollback happened since the server was last idle.
    undone: bool,
    unnamed_on_server: bool,
    /// The client's Parses of its unnamed statement not answered yet, oldest first: each
    /// one's statement, and the client's unnamed statement before it (see
    /// `unnamed_parse_failed`).
    unnamed_in_flight: VecDeque<(Statement, Option<Statement>)>,
    /// An answer from the cache inside a transaction block stood in for a Bind (or a
    /// Query) the server never saw: its unnamed portal may be an older one of this
    /// transaction, which Postgres would have replaced (or, for a Query, destroyed).
    portal_gap: PortalGap,
    cache: Option<Arc<CacheShared>>,
    /// See [`Relay::catalog`]: the version it was found at, and the catalog.
    catalog_kept: Option<(u64, Arc<crate::catalog::Catalog>)>,
    database: String,
    user: String,
    /// Extended-protocol messages held back until Sync, to answer the batch from the cache.
    batch: Vec<Message>,
    /// A miss whose response will be stored once it has been relayed.
    fill: Option<Fill>,
    pending_fill: Option<caching::PendingFill>,
    /// The analysis `serve_query` (or `serve_batch`) made of the Query (or Bind) it could
    /// not answer, for `note_statement` when it is forwarded (a new text is not memoised on
    /// its first sighting, so analysing it again would shape it again).
    query_analyzed: Option<Arc<caching::Analyzed>>,
    /// Scratch space for cache keys (see [`caching::execute_key`]).
    key_buf: Vec<u8>,
    /// The cache key seed, and the settings fingerprint it was made for.
    seed_kept: Option<(u64, u64)>,
    /// A Parse of the batch `serve_batch` could not answer, with its statement built.
    parsed_ahead: Option<(Bytes, Bytes, Statement)>,
    /// Invalidations of the open transaction, applied when it commits.
    pending_inv: Vec<Invalidation>,
    /// Committed invalidations still to be published to other instances; the client hears
    /// of the commit only after they are (or publishing gave up).
    to_publish: Vec<Invalidation>,
    /// Tables this transaction wrote: its reads of them must see its own writes.
    tx_written: HashSet<TableId, BuildMix>,
    /// The open transaction is REPEATABLE READ or SERIALIZABLE: its reads bypass the cache.
    strict_tx: bool,
    /// The open transaction may have written tables no statement names (a trigger's, a
    /// function's): only the change source will tell which.
    tx_hidden_writes: bool,
    /// Such writes committed, and the change source may not have applied them yet.
    unheard: Option<Unheard>,
    /// Set while the held server connection lacks startup values a RESET took away.
    settings_restore: Option<String>,
    /// The transaction changed role or database defaults (`ALTER ROLE ... SET`).
    defaults_changed: bool,
    /// DDL ran in the open transaction: the catalog must be re-read at commit.
    schema_dirty: bool,
    /// The last CommandComplete was ROLLBACK.
    last_tag_rollback: bool,
    /// The client sent Terminate behind requests still being answered: like Postgres, they
    /// are answered first, then the connection closes.
    terminating: bool,
}

/// Extended-protocol messages held back at most, before they are forwarded anyway.
const MAX_BATCH: usize = 16;

/// What the login phase hands over.
pub struct RelayStart<R, W> {
    pub client: MessageReader<R>,
    pub client_w: W,
    pub server: Pooled,
    pub pool: ServerPool,
    pub mode: PoolMode,
    pub settings: Settings,
    pub cancel: Arc<CancelSlot>,
    pub cache: Option<Arc<CacheShared>>,
    pub database: String,
    pub user: String,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Relay<R, W> {
    pub fn new(s: RelayStart<R, W>) -> Self {
        Relay {
            client: s.client,
            client_w: s.client_w,
            to_client: BytesMut::with_capacity(16 * 1024),
            to_server: BytesMut::with_capacity(16 * 1024),
            server: Some(s.server),
            pool: s.pool,
            mode: s.mode,
            expect: Expectations::default(),
            statements: ClientStatements::default(),
            portal_effects: PortalEffects::default(),
            settings: s.settings,
            cancel: s.cancel,
            tx_status: b'I',
            batch_open: false,
            copy_in: false,
            skip_to_sync: false,
            pinned: None,
            settings_touched: Some(Vec::new()),
            undone: false,
            unnamed_on_server: false,
            unnamed_in_flight: VecDeque::new(),
            portal_gap: PortalGap::None,
            cache: s.cache,
            catalog_kept: None,
            database: s.database,
            user: s.user,
            batch: Vec::new(),
            fill: None,
            pending_fill: None,
            query_analyzed: None,
            parsed_ahead: None,
            key_buf: Vec::new(),
            seed_kept: None,
            pending_inv: Vec::new(),
            to_publish: Vec::new(),
            tx_written: HashSet::default(),
            strict_tx: false,
            tx_hidden_writes: false,
            unheard: None,
            settings_restore: None,
            defaults_changed: false,
            schema_dirty: false,
            last_tag_rollback: false,
            terminating: false,
        }
    }

    /// Relay until the client leaves; then leave the server connection clean or discard it.
    pub async fn run(mut self) -> Result<(), RelayError> {
        let result = self.event_loop().await;
        if let Err(RelayError::Client(e)) = &result
            && !e.is_disconnect()
        {
            // Tell the client why, as Postgres would, before closing.
            let msg = protocol::error_response(Severity::Fatal, "08P01", &e.to_string());
            let _ = self.client_w.write_all(&msg).await;
        }
        self.finish().await;
        result
    }

    async fn event_loop(&mut self) -> Result<(), RelayError> {
        loop {
            match self.write_now() {
                Ok(()) => {}
                Err(WriteNowError::Client(e)) => return Err(RelayError::ClientWrite(e)),
                Err(WriteNowError::Server(e)) => return self.server_lost(e.to_string()).await,
            }
            self.maybe_release().await;
            if self.terminating && self.answered_all() {
                return Ok(());
            }
            let event = {
                let has_server = self.server.is_some();
                let read_client = self.to_server.len() < HIGH_WATER && !self.terminating;
                // A response captured for the cache is held back until it is complete, so
                // it must be read up to the size it may be stored at (past that, the fill
                // is dropped and the buffer flows again); else neither side would move.
                let capturing = match (&self.fill, &self.cache) {
                    (Some(f), Some(c)) => {
                        self.to_client.len() - f.start <= c.config.max_result_bytes
                    }
                    _ => false,
                };
                let read_server = self.to_client.len() < HIGH_WATER || capturing;
                let write_client = self.may_write_client();
                let (sr, sw) = match self.server.as_deref_mut() {
                    Some(c) => (Some(&mut c.reader), Some(&mut c.writer)),
                    None => (None, None),
                };
                let held = self
                    .unheard
                    .as_ref()
                    .filter(|u| u.holds_answers)
                    .map(|u| (Arc::clone(&u.catch_up), u.ticket));
                let holding = held.is_some();
                let (to_client, to_server) = (&self.to_client, &self.to_server);
                let (client, client_w) = (&mut self.client, &mut self.client_w);
                tokio::select! {
                    biased;
                    r = client_w.write(to_client), if write_client => Event::WroteClient(r),
                    r = write_some(sw, to_server), if has_server && !to_server.is_empty() => Event::WroteServer(r),
                    r = read_some(sr), if has_server && read_server => Event::Server(r),
                    r = client.read_message(), if read_client => Event::Client(r),
                    () = until_passed(held), if holding => Event::SourceHeard,
                }
            };
            match event {
                Event::SourceHeard => {
                    if let Some(u) = &mut self.unheard {
                        u.holds_answers = false;
                    }
                }
                Event::WroteClient(r) => {
                    let n = r.map_err(RelayError::ClientWrite)?;
                    self.to_client.advance(n);
                }
                Event::WroteServer(r) => match r {
                    Ok(n) => self.to_server.advance(n),
                    Err(e) => return self.server_lost(e.to_string()).await,
                },
                Event::Server(r) => match r {
                    Ok(Some(msg)) => {
                        self.on_server(msg);
                        loop {
                            let next = match self.server.as_deref_mut() {
                                Some(c) => c.reader.next_buffered(),
                                None => Ok(None),
                            };
                            match next {
                                Ok(Some(m)) => self.on_server(m),
                                Ok(None) => break,
                                Err(e) => return self.server_lost(e.to_string()).await,
                            }
                        }
                        self.publish_committed().await;
                    }
                    Ok(None) => {
                        return self
                            .server_lost("server closed the connection".into())
                            .await;
                    }
                    Err(e) => return self.server_lost(e.to_string()).await,
                },
                Event::Client(r) => {
                    let Some(msg) = r.map_err(RelayError::Client)? else {
                        return Ok(());
                    };
                    if !self.on_client(msg).await? {
                        self.terminate();
                        continue;
                    }
                    while let Some(m) = self.client.next_buffered().map_err(RelayError::Client)? {
                        if !self.on_client(m).await? {
                            self.terminate();
                            break;
                        }
                    }
                }
            }
        }
    }

    /// The client said goodbye (Terminate): what it sent before is still answered, as
    /// Postgres answers it, and then the connection closes (see the event loop).
    fn terminate(&mut self) {
        self.terminating = true;
        // Postgres answers messages after the last Sync only as far as the client flushed
        // them: a batch pgstash holds back is dropped with the connection, as it would be.
        self.batch.clear();
        if self.copy_in {
            // A COPY the client abandons fails on the server; nothing more is owed.
            self.expect = Expectations::default();
            self.to_client.clear();
            return;
        }
        if !self.answered_all() && self.server.is_some() {
            // Answers to messages forwarded with no Sync or Flush behind them would stay in
            // the server's buffer: ask for them.
            self.to_server.extend_from_slice(&protocol::flush());
        }
    }

    /// Whether what is buffered for the client may go out now. While a response is being
    /// captured for the cache it stays in the buffer, and while a commit's invalidation has
    /// not been heard from the change source nothing reaches the client.
    fn may_write_client(&self) -> bool {
        !self.to_client.is_empty()
            && self.fill.is_none()
            && !self.unheard.as_ref().is_some_and(|u| u.holds_answers)
    }

    /// Writes to each side what its socket takes at once, without waiting. Nearly always a
    /// socket is writable, and a turn of the event loop just to find that out would build
    /// every `select!` branch and poll both reads, which are not ready yet. What a socket
    /// does not take now stays buffered for the loop, which waits for it with the reads.
    fn write_now(&mut self) -> Result<(), WriteNowError> {
        if self.may_write_client()
            && let Some(r) = write_without_waiting(&mut self.client_w, &self.to_client)
        {
            self.to_client.advance(r.map_err(WriteNowError::Client)?);
        }
        if !self.to_server.is_empty()
            && let Some(c) = self.server.as_deref_mut()
            && let Some(r) = write_without_waiting(&mut c.writer, &self.to_server)
        {
            self.to_server.advance(r.map_err(WriteNowError::Server)?);
        }
        Ok(())
    }

    /// Nothing is owed to the client: no answer expected, none waiting to be written.
    fn answered_all(&self) -> bool {
        self.expect.is_empty() && self.to_client.is_empty() && self.fill.is_none()
    }

    /// Handle one client message. Returns false when the client said goodbye.
    async fn on_client(&mut self, msg: Message) -> Result<bool, RelayError> {
        let tag = msg.tag();
        tracing::trace!(tag = %(tag as char), server = self.server.is_some(), queued = !self.expect.is_empty(), "client message");
        if tag == b'X' {
            return Ok(false);
        }
        if self.cache.is_some() && !self.skip_to_sync {
            match tag {
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    self.batch.push(msg);
                    if self.batch.len() > MAX_BATCH {
                        self.flush_batch().await?;
                    }
                    return Ok(true);
                }
                b'S' if !self.batch.is_empty() => {
                    if self.serve_batch().await? {
                        return Ok(true);
                    }
                    self.flush_batch().await?;
                }
                b'Q' => {
                    self.flush_batch().await?;
                    // Answered from the cache or not, the Query ends the client's unnamed
                    // statement (the server's, if it has one, is closed before any Bind).
                    self.statements.unnamed = None;
                    if self.serve_query(&msg).await? {
                        return Ok(true);
                    }
                }
                _ => self.flush_batch().await?,
            }
        }
        self.dispatch(msg).await
    }

    /// Forward the held-back batch through the normal path.
    async fn flush_batch(&mut self) -> Result<(), RelayError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        // Drained, not taken: the next batch reuses the allocation.
        let mut batch = std::mem::take(&mut self.batch);
        for m in batch.drain(..) {
            self.dispatch(m).await?;
        }
        self.batch = batch;
        Ok(())
    }

    /// Forward or answer one client message (after the cache had its say).
    async fn dispatch(&mut self, msg: Message) -> Result<bool, RelayError> {
        let tag = msg.tag();
        if let Some(p) = self.pending_fill.take() {
            // Everything the client receives from here to ReadyForQuery is the response.
            self.fill = Some(Fill {
                guard: p.guard,
                snapshot: p.snapshot,
                redis: p.redis,
                key: p.key,
                catalog_epoch: p.catalog_epoch,
                stats: p.stats,
                start: self.to_client.len(),
                ttl: p.ttl,
                rows: 0,
                started: std::time::Instant::now(),
                spoiled: false,
            });
        }
        if self.skip_to_sync && tag != b'S' {
            return Ok(true);
        }
        if self.settings_restore.is_some()
            && self.server.is_some()
            && self.tx_status == b'I'
            && self.server_idle()
        {
            self.restore_settings().await?;
        }
        if self.server.is_none() {
            // Without a server connection nothing is in flight and no transaction is open, so
            // some messages can be answered here. This is not only cheaper: drivers that
            // prepare synchronously while other connections of the same process sit in
            // transactions (pgbench -M prepared) would otherwise deadlock a small pool.
            match tag {
                b'S' => {
                    self.skip_to_sync = false;
                    self.fill = None;
                    let rfq = protocol::ready_for_query(b'I');
                    self.expect.push_synthetic(rfq, &mut self.to_client);
                    return Ok(true);
                }
                b'H' => return Ok(true),
                b'C' if msg.body().first() == Some(&b'S') => {
                    self.on_close(msg)?;
                    return Ok(true);
                }
                b'P' if self.parse_locally(&msg)? => return Ok(true),
                _ => {}
            }
            if !self.acquire(tag).await? {
                return Ok(true);
            }
        }
        if self.tx_status == b'I' && self.server_idle() {
            self.close_unused_statements();
        }
        match tag {
            b'Q' => {
                // A simple Query destroys the unnamed statement and portal, on the server
                // and for the client.
                self.statements.unnamed = None;
                self.unnamed_on_server = false;
                self.portal_gap = PortalGap::None;
                let sql = cstr_at(msg.body(), 0)
                    .map(|(s, _)| utf8_or_lossy(s))
                    .ok_or_else(|| RelayError::Violation("Query without a terminator".into()))?;
                let analyzed = self.query_analyzed.take();
                let effects = match &analyzed {
                    Some(a) if a.no_session_effects && a.is_for(&sql) => Vec::new(),
                    _ => crate::session::effects_of(&sql),
                };
                self.apply_effects(&effects);
                self.note_statement(&sql, None, analyzed).await;
                self.forward(&msg, Expect::Query);
            }
            b'F' => self.forward(&msg, Expect::Query),
            b'P' => self.on_parse(msg)?,
            b'B' => {
                self.note_bind(&msg).await;
                self.on_bind(msg)?
            }
            b'D' => self.on_describe(msg)?,
            b'E' => {
                let portal = cstr_at(msg.body(), 0)
                    .map(|(p, _)| p)
                    .ok_or_else(|| RelayError::Violation("bad Execute".into()))?;
                if portal.is_empty() && self.answer_gap_portal(GapMessage::Execute) {
                    return Ok(true);
                }
                if let Some(effects) = self.portal_effects.get(portal).cloned() {
                    self.apply_effects(&effects);
                }
                if portal.is_empty() {
                    self.close_gap_portal();
                }
                self.batch_open = true;
                self.forward(&msg, Expect::Execute);
            }
            b'C' => self.on_close(msg)?,
            b'S' => {
                self.skip_to_sync = false;
                self.batch_open = false;
                self.to_server.extend_from_slice(msg.raw());
                // During COPY FROM STDIN the server ignores Sync: no answer will come.
                if !self.copy_in {
                    self.expect.push(Expect::Sync, false);
                }
            }
            b'H' => self.to_server.extend_from_slice(msg.raw()),
            b'd' => self.to_server.extend_from_slice(msg.raw()),
            b'c' | b'f' => {
                self.copy_in = false;
                self.to_server.extend_from_slice(msg.raw());
                self.expect.push_copy_end(&mut self.to_client);
            }
            other => {
                return Err(RelayError::Client(ProtocolError::UnexpectedMessage(other)));
            }
        }
        Ok(true)
    }

    fn forward(&mut self, msg: &Message, expect: Expect) {
        self.to_server.extend_from_slice(msg.raw());
        self.expect.push(expect, false);
    }

    fn server_conn(&mut self) -> &mut ServerConn {
        self.server
            .as_deref_mut()
            .expect("a server connection is held while relaying a request")
    }

    fn on_parse(&mut self, msg: Message) -> Result<(), RelayError> {
        self.batch_open = true;
        // `serve_batch` read this very Parse already (same bytes): its name and statement.
        if let Some((_, name, stmt)) = self
            .parsed_ahead
            .take()
            .filter(|(raw, ..)| raw.as_ptr() == msg.raw().as_ptr() && raw.len() == msg.raw().len())
        {
            if name.is_empty() {
                self.parse_unnamed(&msg, stmt);
            } else if !self.refuse_existing(&name) {
                self.parse_named(name, stmt);
            }
            return Ok(());
        }
        let body =
            read_parse(msg.body()).ok_or_else(|| RelayError::Violation("bad Parse".into()))?;
        if body.name.is_empty() {
            let stmt = self.statements.unnamed_for(msg.raw(), &body);
            self.parse_unnamed(&msg, stmt);
            return Ok(());
        }
        if self.refuse_existing(body.name) {
            return Ok(());
        }
        let stmt = Statement::new(&body, statements::scope(self.settings.fingerprint()));
        self.parse_named(Bytes::copy_from_slice(body.name), stmt);
        Ok(())
    }

    /// Forward a Parse of the unnamed statement `stmt`.
    fn parse_unnamed(&mut self, msg: &Message, stmt: Statement) {
        let before = self.statements.unnamed.replace(stmt.clone());
        self.unnamed_in_flight.push_back((stmt, before));
        self.unnamed_on_server = true;
        self.forward(
            msg,
            Expect::Parse {
                hash: None,
                client_name: None,
                client_unnamed: true,
            },
        );
    }

    /// Answer a Parse of a name the client already uses with Postgres' error: true if so.
    fn refuse_existing(&mut self, name: &[u8]) -> bool {
        if !self.statements.contains(name) {
            return false;
        }
        let text = format!(
            "prepared statement \"{}\" already exists",
            String::from_utf8_lossy(name)
        );
        let err = protocol::error_response(Severity::Error, "42P05", &text);
        self.expect.push_synthetic(err, &mut self.to_client);
        self.skip_to_sync = true;
        true
    }

    /// Take a named statement: prepared on the server connection if it lacks it.
    fn parse_named(&mut self, name: Bytes, stmt: Statement) {
        self.send_statement(&stmt, Some(name.clone()), false);
        self.statements.insert(name, stmt);
    }

    /// Answer a named Parse without a server when Postgres already accepted the same statement
    /// under the same settings; the Parse is sent when the statement is first used on a server.
    fn parse_locally(&mut self, msg: &Message) -> Result<bool, RelayError> {
        let body =
            read_parse(msg.body()).ok_or_else(|| RelayError::Violation("bad Parse".into()))?;
        if body.name.is_empty() || self.statements.contains(body.name) {
            return Ok(false);
        }
        let stmt = Statement::new(&body, statements::scope(self.settings.fingerprint()));
        if !self.pool.is_valid(stmt.hash, self.settings.fingerprint()) {
            return Ok(false);
        }
        self.statements
            .insert(Bytes::copy_from_slice(body.name), stmt);
        self.expect
            .push_synthetic(protocol::parse_complete(), &mut self.to_client);
        Ok(true)
    }

    /// Keep the server connection within `pool.max_prepared_statements`. Only called between
    /// transactions with nothing in flight, when no portal can exist: the protocol documents
    /// that closing a statement closes the portals made from it (Postgres 15 lets them run on,
    /// but nothing here depends on that). The closes ride in front of the client's next message.
    fn close_unused_statements(&mut self) {
        let cap = self.pool.max_prepared();
        let conn = self.server_conn();
        if cap == 0 || conn.prepared.len() <= cap {
            return;
        }
        for hash in conn.prepared.evict_beyond(cap) {
            let name = crate::upstream::prepared::server_name(hash);
            self.to_server
                .extend_from_slice(&protocol::with_statement_name(b'C', b"S", &name, &[]));
            self.expect.push(Expect::Close, true);
        }
    }

    /// Make sure the server has `stmt`: send its Parse (answer hidden when `inject`) or, when it
    /// is already there and the client asked, answer ParseComplete ourselves.
    fn send_statement(&mut self, stmt: &Statement, client_name: Option<Bytes>, inject: bool) {
        let conn = self.server_conn();
        if conn.prepared.use_if_present(stmt.hash) {
            if !inject {
                self.expect
                    .push_synthetic(protocol::parse_complete(), &mut self.to_client);
            }
            return;
        }
        conn.prepared.insert(stmt.hash);
        self.to_server.extend_from_slice(&stmt.parse);
        self.expect.push(
            Expect::Parse {
                hash: Some(stmt.hash),
                client_name,
                client_unnamed: false,
            },
            inject,
        );
    }

    /// Resolve a client statement name for Bind/Describe: `Some(server name)` when known and
    /// now present on the server, `None` when unknown (forwarded so Postgres reports it).
    fn resolve(&mut self, name: &[u8]) -> Option<Arc<str>> {
        if name.is_empty() {
            if self.statements.unnamed.is_none() {
                // The client has no unnamed statement (never parsed, closed, or destroyed by
                // a simple Query), but this server connection may hold one: another
                // client's, or one a Close or a cached Query kept from being destroyed.
                // Close it, so that Postgres answers as it would the client alone (26000).
                self.to_server
                    .extend_from_slice(&protocol::with_statement_name(b'C', b"S", "", &[]));
                self.expect.push(Expect::Close, true);
                self.unnamed_on_server = false;
            }
            if !self.unnamed_on_server
                && let Some(s) = self.statements.unnamed.clone()
            {
                self.to_server.extend_from_slice(&s.parse);
                self.expect.push(
                    Expect::Parse {
                        hash: None,
                        client_name: None,
                        client_unnamed: false,
                    },
                    true,
                );
                self.unnamed_on_server = true;
            }
            return None;
        }
        let stmt = self.statements.get(name)?.clone();
        self.send_statement(&stmt, None, true);
        Some(stmt.server_name.clone())
    }

    fn on_bind(&mut self, msg: Message) -> Result<(), RelayError> {
        self.batch_open = true;
        let body = msg.body();
        let bad = || RelayError::Violation("bad Bind".into());
        let (portal, p1) = cstr_at(body, 0).ok_or_else(bad)?;
        let (stmt, p2) = cstr_at(body, p1).ok_or_else(bad)?;
        if portal.is_empty() {
            // The server's unnamed portal is replaced by this one.
            self.portal_gap = PortalGap::None;
        }
        let effects = if stmt.is_empty() {
            self.statements.unnamed.as_ref().map(|s| s.effects.clone())
        } else {
            self.statements.get(stmt).map(|s| s.effects.clone())
        };
        match effects {
            Some(e) if !e.is_empty() => {
                self.portal_effects.insert(portal, e);
            }
            _ => {
                self.portal_effects.remove(portal);
            }
        }
        match self.resolve(stmt) {
            Some(server_name) => {
                let rewritten =
                    protocol::with_statement_name(b'B', &body[..p1], &server_name, &body[p2..]);
                self.to_server.extend_from_slice(&rewritten);
                self.expect.push(Expect::Bind, false);
            }
            None => self.forward(&msg, Expect::Bind),
        }
        Ok(())
    }

    fn on_describe(&mut self, msg: Message) -> Result<(), RelayError> {
        let body = msg.body();
        let (name, _) =
            cstr_at(body, 1).ok_or_else(|| RelayError::Violation("bad Describe".into()))?;
        if body[0] == b'P' && name.is_empty() {
            if self.answer_gap_portal(GapMessage::Describe) {
                return Ok(());
            }
            self.close_gap_portal();
        }
        self.batch_open = true;
        if body[0] == b'S'
            && let Some(server_name) = self.resolve(name)
        {
            let rewritten = protocol::with_statement_name(b'D', b"S", &server_name, &[]);
            self.to_server.extend_from_slice(&rewritten);
            self.expect.push(Expect::Describe, false);
            return Ok(());
        }
        self.forward(&msg, Expect::Describe);
        Ok(())
    }

    fn on_close(&mut self, msg: Message) -> Result<(), RelayError> {
        let body = msg.body();
        let (name, _) =
            cstr_at(body, 1).ok_or_else(|| RelayError::Violation("bad Close".into()))?;
        if body[0] == b'S' {
            // Server-side statements are shared; the client's name just goes away.
            if name.is_empty() {
                self.statements.unnamed = None;
            } else {
                self.statements.remove(name);
            }
            self.expect
                .push_synthetic(protocol::close_complete(), &mut self.to_client);
            return Ok(());
        }
        self.batch_open = true;
        if name.is_empty() {
            self.close_gap_portal();
        }
        self.portal_effects.remove(name);
        self.forward(&msg, Expect::Close);
        Ok(())
    }

    /// Answer an Execute or Describe of the unnamed portal for the finished portal of a
    /// cached batch, as Postgres would; false when pgstash cannot say what Postgres would
    /// answer, and the message goes to the server. Only with nothing but Syncs in flight, so
    /// that the last ReadyForQuery tells the transaction's state for sure (a message queued
    /// behind an error would be skipped): healthy, the portal runs again to no rows, or
    /// describes itself (if the batch described it); aborted, any use of it fails with
    /// 25P02, and Postgres then skips to the next Sync. Nothing goes to the server.
    fn answer_gap_portal(&mut self, msg: GapMessage) -> bool {
        // Syncs in flight (after answers of this kind) leave the state as it was.
        if self.batch_open || self.copy_in || !self.expect.only_syncs_pending() {
            return false;
        }
        let PortalGap::Finished { done, description } = &self.portal_gap else {
            return false;
        };
        let answer = match (self.tx_status, msg) {
            (b'T', GapMessage::Execute) => done.clone(),
            (b'T', GapMessage::Describe) => match description {
                Some(d) => d.clone(),
                None => return false,
            },
            (b'E', _) => {
                self.skip_to_sync = true;
                protocol::error_response(
                    Severity::Error,
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                )
            }
            _ => return false,
        };
        self.expect.push_synthetic(answer, &mut self.to_client);
        true
    }

    /// Before a message about the unnamed portal reaches the server after a cache answer
    /// in this transaction (one `answer_gap_portal` could not answer): close the server's
    /// unnamed portal, an older one Postgres would no longer have. Where Postgres would
    /// still have the answered one (a Describe of it after a batch that did not describe
    /// it, or messages to the server in flight before it), the server gives 34000 instead:
    /// an error, never another query's columns or rows.
    fn close_gap_portal(&mut self) {
        if std::mem::take(&mut self.portal_gap) != PortalGap::None {
            self.to_server
                .extend_from_slice(&protocol::with_statement_name(b'C', b"P", "", &[]));
            self.expect.push(Expect::Close, true);
        }
    }

    fn apply_effects(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Pin(why) => {
                    if self.pinned.is_none() && self.mode == PoolMode::Transaction {
                        tracing::debug!(reason = why, "client pinned to its server connection");
                    }
                    self.pinned.get_or_insert(why);
                }
                // The transaction's settings are no longer the ones the cache key holds.
                Effect::TxSetting => {
                    self.strict_tx = true;
                    self.settings_touched = None;
                }
                Effect::DiscardAll | Effect::DeallocateAll => {
                    self.statements.clear();
                    self.server_conn().prepared.clear();
                    self.settings.stage(e.clone());
                    self.settings_touched = None;
                }
                Effect::Set { key, .. } | Effect::Reset { key } => {
                    if let Some(keys) = self.settings_touched.as_mut() {
                        keys.push(key.clone());
                    }
                    self.settings.stage(e.clone());
                }
                Effect::ResetAll => {
                    self.settings_touched = None;
                    self.settings.stage(e.clone());
                }
                other => self.settings.stage(other.clone()),
            }
        }
    }

    fn on_server(&mut self, msg: Message) {
        let tag = msg.tag();
        tracing::trace!(tag = %(tag as char), "server message");
        if let Some(f) = self.fill.as_mut() {
            match tag {
                b'D' => f.rows += 1,
                b'Z' => {}
                // Errors, partial results, session changes and notifications must not be
                // replayed to someone else later.
                b'E' | b's' | b'S' | b'A' | b'G' | b'H' | b'W' => f.spoiled = true,
                _ => {}
            }
        }
        if tag == b'Z' {
            self.finish_fill();
        }
        match tag {
            b'S' => {
                self.server_conn().note_parameter(&msg);
                self.check_setting_report(&msg);
            }
            b'Z' => {
                self.tx_status = msg.body().first().copied().unwrap_or(b'I');
                if self.tx_status == b'I' {
                    // Portals end with their transaction.
                    self.portal_gap = PortalGap::None;
                }
                self.copy_in = false;
                if self.tx_status == b'I' {
                    self.transaction_ended();
                }
                let undone = self.undone;
                if self.tx_status == b'I' {
                    self.undone = false;
                }
                let changed = self.settings.settle(self.tx_status, undone);
                self.settings_settled(changed);
            }
            b'E' => {
                self.undone = true;
                self.copy_in = false;
            }
            b'C' => {
                self.copy_in = false;
                let tag = msg.body();
                // DDL: later Parses get fresh server statements (see SCHEMA_EPOCH). Not for
                // pinned clients, whose DDL is mostly temporary tables: each bump leaves
                // a copy of every statement on long-lived server connections.
                if self.pinned.is_none()
                    && (tag.starts_with(b"ALTER ")
                        || tag.starts_with(b"CREATE ")
                        || tag.starts_with(b"DROP "))
                {
                    statements::SCHEMA_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.last_tag_rollback = tag.starts_with(b"ROLLBACK\0");
                if self.last_tag_rollback {
                    self.undone = true;
                } else if tag.starts_with(b"COMMIT\0") {
                    // Committed now, whatever follows in this query string or pipeline (a
                    // new transaction that rolls back, COMMIT AND CHAIN's next one).
                    let changed = self.settings.commit();
                    self.settings_settled(changed);
                    self.writes_committed();
                    self.undone = false;
                } else if tag.starts_with(b"COMMIT PREPARED\0") {
                    // A prepared transaction, maybe another session's, whose writes we
                    // may never have seen.
                    self.pending_inv.push(crate::cache::Invalidation::All);
                    self.writes_committed();
                }
            }
            b'G' => {
                self.copy_in = true;
                if self.expect.head() == Some(&Expect::Execute) {
                    self.expect.drop_queued_syncs();
                }
            }
            _ => {}
        }
        let mut failed = Vec::new();
        let done = self
            .expect
            .on_server_message(tag, msg.raw(), &mut self.to_client, &mut failed);
        if self.expect.take_server_skipping() {
            // Postgres ignores everything up to the client's next Sync, so pgstash must too:
            // no answers of its own, no statements taken as made.
            self.skip_to_sync = true;
        }
        // Idle with nothing more in flight: SETs the client pipelined behind this
        // ReadyForQuery were recorded when they went out, and their reports are still due.
        if tag == b'Z' && self.tx_status == b'I' && self.expect.is_empty() {
            self.settings_touched = Some(Vec::new());
        }
        match done {
            Some(Expect::Parse { hash: Some(h), .. }) => {
                self.pool.mark_valid(h, self.settings.fingerprint());
            }
            Some(Expect::Parse {
                client_unnamed: true,
                ..
            }) => {
                self.unnamed_in_flight.pop_front();
            }
            _ => {}
        }
        if let (Some(f), Some(c)) = (&self.fill, &self.cache)
            && self.to_client.len() - f.start > c.config.max_result_bytes
        {
            // Too large to store: stop holding it back.
            self.fill = None;
        }
        for f in failed {
            match f.hash {
                Some(h) => {
                    self.server_conn().prepared.remove(h);
                    if let Some(n) = f.client_name {
                        self.statements.forget_failed(&n, h);
                    }
                }
                None => self.unnamed_on_server = false,
            }
            if f.client_unnamed {
                self.unnamed_parse_failed(f.erred);
            }
        }
    }

    /// The oldest client Parse of the unnamed statement in flight did not take effect.
    /// Postgres drops the unnamed statement before parsing a new one, so after a Parse that
    /// failed the client has none; a Parse skipped after an earlier error changed nothing,
    /// and the statement before it stands. `statements.unnamed` was set when the Parse went
    /// out: it is set back unless the client replaced it since (a later Parse, a Query, a
    /// Close), and so is what the next Parse in flight found there.
    fn unnamed_parse_failed(&mut self, erred: bool) {
        let Some((parse, before)) = self.unnamed_in_flight.pop_front() else {
            return;
        };
        let now = if erred { None } else { before };
        let same = |s: &Option<Statement>| s.as_ref().is_some_and(|s| s.is(&parse));
        match self.unnamed_in_flight.front_mut() {
            // Later Parses in flight decide the statement; the next one replaced this one.
            Some((_, next_before)) => {
                if same(next_before) {
                    *next_before = now;
                }
            }
            None => {
                if same(&self.statements.unnamed) {
                    self.statements.unnamed = now;
                }
            }
        }
    }

    /// A ParameterStatus for a setting that shapes results (how values render, how text is
    /// read or encoded), which no SET or RESET the client sent explains: a function body
    /// ran `SET`, or the server's configuration was reloaded. The session's settings are
    /// no longer the ones its key and replay describe, so the client keeps its server
    /// connection (closed when it leaves, never handed on) and is served by Postgres only.
    fn check_setting_report(&mut self, msg: &Message) {
        const SHAPES_RESULTS: &[&str] = &[
            "client_encoding",
            "datestyle",
            "intervalstyle",
            "standard_conforming_strings",
            "timezone",
        ];
        let Some((key, _)) = cstr_at(msg.body(), 0) else {
            return;
        };
        let key = String::from_utf8_lossy(key).to_ascii_lowercase();
        // Who the session is: reported when a role change makes it superuser or not, or
        // its session authorization changes. A SET ROLE or SET SESSION AUTHORIZATION of the
        // client's own explains both.
        let explained_by: &[&str] = match key.as_str() {
            "is_superuser" => &["role", "session_authorization"],
            "session_authorization" => &["session_authorization"],
            k if SHAPES_RESULTS.contains(&k) => &[],
            _ => return,
        };
        let explained = self.settings_touched.as_ref().is_none_or(|keys| {
            keys.contains(&key) || keys.iter().any(|k| explained_by.contains(&k.as_str()))
        });
        if !explained {
            tracing::debug!(setting = %key, "setting changed where no SET shows it: client pinned");
            self.pinned
                .get_or_insert("a setting changed where no SET shows it");
        }
    }

    /// Whether reads may use the cache in the current transaction state (DESIGN.md,
    /// "Freshness": READ COMMITTED transactions may, stricter ones may not).
    fn cache_allowed_now(&self) -> bool {
        // A pinned client may have temp tables shadowing names, or other private state the
        // cache key does not capture: it is served by Postgres only.
        self.pinned.is_none()
            && self.settings_restore.is_none()
            // Nothing pending on the server: messages sent without a Sync yet (`P B E H`)
            // leave it mid-batch (an implicit transaction, SETs not settled, or an error
            // skipping to Sync). Answering from the cache would keep the client's Sync from
            // it, and the cache key would not carry those SETs.
            && self.server_idle()
            && match self.tx_status {
                b'I' => true,
                // Both settings can make every later BEGIN REPEATABLE READ or SERIALIZABLE,
                // whose reads see the transaction's snapshot: they must neither be served
                // from the cache nor fill it (an old snapshot would be stored as fresh).
                // The database's own default is checked in `read_gate`, with its catalog.
                b'T' => {
                    !self.strict_tx
                        && !self.settings.has("default_transaction_isolation")
                        && !self.settings.has("session_characteristics")
                }
                _ => false,
            }
    }

    /// Whether this client committed writes no statement named that the change source has
    /// not applied yet: the cache may still hold what they changed.
    fn own_writes_unheard(&self) -> bool {
        self.unheard
            .as_ref()
            .is_some_and(|u| !u.catch_up.passed(&u.ticket))
    }

    /// A simple Query: answer it from the cache if possible. Returns true when answered.
    async fn serve_query(&mut self, msg: &Message) -> Result<bool, RelayError> {
        let Some(cache) = self.cache.clone() else {
            return Ok(false);
        };
        let Some((sql, _)) = cstr_at(msg.body(), 0) else {
            return Ok(false);
        };
        let Ok(sql) = std::str::from_utf8(sql) else {
            return Ok(false);
        };
        let Some(catalog) = self.catalog(&cache).await else {
            metrics().bypass(BypassReason::NoCatalog);
            return Ok(false);
        };
        let seed = self.key_seed();
        let key = caching::query_key(seed, sql);
        let started = std::time::Instant::now();
        if let Some(entry) = self.known_hit(&cache, &catalog, key) {
            self.answer_hit(
                entry.response.clone(),
                caching::Tier::L1,
                started,
                HitOf::Query,
            );
            return Ok(true);
        }
        let analyzed = cache.analyze(&self.database, sql, &catalog);
        let Some(shape) = analyzed.plan_shape(&catalog) else {
            if matches!(*analyzed.analysis, Analysis::Bypass(_)) {
                metrics().bypass(BypassReason::NotCacheable);
            }
            self.query_analyzed = Some(analyzed);
            return Ok(false);
        };
        let make_plan = || analyzed.plan_with(shape.clone(), &catalog, key, None);
        let answered = match self.read_gate(&cache, &catalog, key, &analyzed, &make_plan) {
            Some((ttl, stats, plan)) => {
                let plan = plan.unwrap_or_else(make_plan);
                self.serve_lookup(&cache, &plan, ttl, stats, started, HitOf::Query)
                    .await?
            }
            None => false,
        };
        if !answered {
            self.query_analyzed = Some(analyzed);
        }
        Ok(answered)
    }

    /// [`CacheShared::catalog`] of the client's database, kept between statements while no
    /// schema change has dropped it: most statements then take no lock to find it.
    async fn catalog(&mut self, cache: &CacheShared) -> Option<Arc<crate::catalog::Catalog>> {
        let version = cache.catalogs_version();
        if let Some((v, c)) = &self.catalog_kept
            && *v == version
        {
            return Some(c.clone());
        }
        let c = cache.catalog(&self.database).await?;
        self.catalog_kept = Some((version, c.clone()));
        Some(c)
    }

    /// A fresh L1 entry for a Query's or a batch's key, found without analysing the text:
    /// most hits of a hot set. Sound because the full path would reach the same entry: the
    /// key covers the text (with a batch's parameters and formats) and the session's
    /// settings, the entry was stored by that path for this key under this very catalog (so
    /// the analysis, which depends only on the text and the catalog, found it cacheable, and
    /// config rules do not change at run time), and the session-level reasons to bypass are
    /// checked here as there. A fresh entry is served even if the adaptive bypass no longer
    /// caches its query (that decision is about cost, not correctness); its hit is counted
    /// for the query all the same. Inside a transaction block (whose own writes and
    /// isolation matter), after the catalog was reloaded, or on any doubt: `None`, and the
    /// full path decides.
    fn known_hit(
        &self,
        cache: &CacheShared,
        catalog: &crate::catalog::Catalog,
        key: crate::cache::CacheKey,
    ) -> Option<Arc<crate::cache::Entry>> {
        if !self.may_know_hit(cache, catalog) {
            return None;
        }
        let entry = cache.l1.peek(key, &cache.gens)?;
        if entry.catalog_epoch() != catalog.epoch {
            return None;
        }
        if let Some(t) = entry.tracked() {
            t.hit();
        }
        Some(entry)
    }

    /// Whether [`Relay::known_hit`] may answer now, whatever the key.
    fn may_know_hit(&self, cache: &CacheShared, catalog: &crate::catalog::Catalog) -> bool {
        self.tx_status == b'I'
            && self.tx_written.is_empty()
            && catalog.epoch != 0
            && self.cache_allowed_now()
            && cache.source_healthy(&self.database)
            && !self.own_writes_unheard()
    }

    /// Answer from the cache: the stored response, then ReadyForQuery; counted as a hit of
    /// `tier` (L2 hits are counted where they are found), timed from `started`.
    fn answer_hit(
        &mut self,
        response: Bytes,
        tier: caching::Tier,
        started: std::time::Instant,
        of: HitOf,
    ) {
        if let HitOf::Batch { .. } = of {
            // The answered Bind replaced the unnamed portal; a cached read has no effects.
            self.portal_effects.remove(b"");
        }
        if self.tx_status == b'T' {
            self.portal_gap = match of {
                HitOf::Query => PortalGap::Gone,
                HitOf::Batch { described_portal } => {
                    PortalGap::finished(&response, described_portal)
                }
            };
        }
        self.expect.push_synthetic(response, &mut self.to_client);
        let rfq = protocol::ready_for_query(self.tx_status);
        self.expect.push_synthetic(rfq, &mut self.to_client);
        let m = metrics();
        if tier == caching::Tier::L1 {
            m.hits_l1.inc();
        }
        m.hit_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// Whether a cacheable read with `key` may be looked up in the cache now: its lifetime,
    /// its adaptive statistics and, if planning it was needed to decide, its plan; if not,
    /// the bypass is counted. The plan (`make_plan`: the key value read out of the
    /// parameters or literals, the dependencies) is made only when needed: a read the
    /// adaptive bypass no longer caches, most reads of a uniform workload, never uses it.
    fn read_gate(
        &mut self,
        cache: &CacheShared,
        catalog: &crate::catalog::Catalog,
        key: CacheKey,
        analyzed: &caching::Analyzed,
        make_plan: &dyn Fn() -> caching::ReadPlan,
    ) -> Option<(
        std::time::Duration,
        Option<crate::cache::Tracked>,
        Option<caching::ReadPlan>,
    )> {
        let m = metrics();
        let ttl = match analyzed.policy {
            caching::Policy::Cache(ttl) => ttl,
            caching::Policy::Never => {
                m.bypass(BypassReason::Rule);
                return None;
            }
        };
        // A plain BEGIN may open a snapshot transaction where the database (or a role)
        // defaults to REPEATABLE READ or SERIALIZABLE.
        if !self.cache_allowed_now() || (self.tx_status == b'T' && catalog.strict_isolation_default)
        {
            m.bypass(BypassReason::Transaction);
            return None;
        }
        let mut plan = None;
        if !self.tx_written.is_empty() {
            let p = make_plan();
            if p.table_ids().any(|t| self.tx_written.contains(&t)) {
                m.bypass(BypassReason::ReadYourWrites);
                return None;
            }
            plan = Some(p);
        }
        if !cache.source_healthy(&self.database) {
            m.bypass(BypassReason::SourceUnhealthy);
            return None;
        }
        if self.own_writes_unheard() {
            m.bypass(BypassReason::ReadYourWrites);
            return None;
        }
        self.unheard = None;
        let stats = match &cache.bypass {
            Some(b) => match b.track(analyzed.bypass_stats(b), key) {
                Ok(tracked) => Some(tracked),
                Err(reason) => {
                    m.bypass_adaptive(reason);
                    return None;
                }
            },
            None => None,
        };
        Some((ttl, stats, plan))
    }

    /// The lookup of a read [`Relay::read_gate`] let through.
    async fn serve_lookup(
        &mut self,
        cache: &CacheShared,
        plan: &caching::ReadPlan,
        ttl: std::time::Duration,
        stats: Option<crate::cache::Tracked>,
        started: std::time::Instant,
        of: HitOf,
    ) -> Result<bool, RelayError> {
        let outcome = caching::lookup(cache, plan, ttl, stats.clone()).await;
        tracing::trace!(
            hit = matches!(outcome, ReadOutcome::Hit(..)),
            "cache lookup"
        );
        match outcome {
            ReadOutcome::Hit(bytes, tier) => {
                if let Some(s) = &stats {
                    s.hit();
                }
                self.answer_hit(bytes, tier, started, of);
                Ok(true)
            }
            ReadOutcome::Fill(pending) => {
                if let Some(s) = &stats {
                    s.miss();
                }
                metrics().misses.inc();
                self.pending_fill = Some(pending);
                Ok(false)
            }
        }
    }

    /// At Sync: answer a held-back `[Parse] Bind [Describe portal] Execute` batch from the
    /// cache if possible. Returns true when answered (the batch is consumed).
    async fn serve_batch(&mut self) -> Result<bool, RelayError> {
        let Some(cache) = self.cache.clone() else {
            return Ok(false);
        };
        if !self.cache_allowed_now() {
            return Ok(false);
        }
        let Some(shape) = BatchShape::of(&self.batch) else {
            return Ok(false);
        };
        let parse = match shape.parse {
            Some(i) => match read_parse(self.batch[i].body()) {
                Some(p) if p.name.is_empty() || !self.statements.contains(p.name) => {
                    let stmt = if p.name.is_empty() {
                        self.statements.unnamed_for(self.batch[i].raw(), &p)
                    } else {
                        Statement::new(&p, statements::scope(self.settings.fingerprint()))
                    };
                    Some((Bytes::copy_from_slice(p.name), stmt))
                }
                _ => return Ok(false),
            },
            None => None,
        };
        let Some(catalog) = self.catalog(&cache).await else {
            return Ok(false);
        };
        // Owned (a reference count), so that what is read from it outlives `&mut self` calls.
        let bind_raw = self.batch[shape.bind].raw().clone();
        let bind_body = &bind_raw[5..];
        let Some((_, p1)) = cstr_at(bind_body, 0) else {
            return Ok(false);
        };
        let Some((stmt_name, _)) = cstr_at(bind_body, p1) else {
            return Ok(false);
        };
        if let Described::Statement(i) = shape.describe
            && cstr_at(self.batch[i].body(), 1).map(|(name, _)| name) != Some(stmt_name)
        {
            return Ok(false);
        }
        let stmt = match &parse {
            Some((name, s)) if name.as_ref() == stmt_name => s.clone(),
            Some(_) => return Ok(false),
            None if stmt_name.is_empty() => match &self.statements.unnamed {
                Some(s) => s.clone(),
                None => return Ok(false),
            },
            None => match self.statements.get(stmt_name) {
                Some(s) => s.clone(),
                None => return Ok(false),
            },
        };
        // The parameters, unless they spell a time relative to now (such a result is not
        // reusable later).
        let read_params = || {
            let params = bind::BindParams::parse(bind_body)?.with_types(&stmt.param_types);
            (!params.has_time_literal()).then_some(params)
        };
        let flags = [parse.is_some() as u8, shape.describe.key_byte()];
        let of = HitOf::Batch {
            described_portal: shape.describe == Described::Portal,
        };
        let started = std::time::Instant::now();
        // Most hits of a hot set are found by their key alone, before the read is planned
        // (the analysis is memoised by text). Where `known_hit` cannot answer (in a
        // transaction block, after a write...) a statement that is no cacheable read (a
        // write, BEGIN, COMMIT) needs neither its parameters read nor a key.
        let mut keyed = None;
        let analyzed = cache.analyze(&self.database, &stmt.sql, &catalog);
        if self.may_know_hit(&cache, &catalog) && !surely_not_a_read(&stmt.sql) {
            let Some(params) = read_params() else {
                return Ok(false);
            };
            let key = self.batch_key(&stmt, &params, flags);
            // Keys of a query the adaptive bypass caches only for its sample are rarely
            // stored (before the verdict, during a probe): looking for one costs two cache
            // misses (the front's tags, the doorkeeper's bitmap) on every call of a uniform
            // workload. The analysis, memoised by text, comes first to tell.
            let bypassed = cache.bypass.as_ref().is_some_and(|b| {
                !crate::cache::in_sample(key) && !analyzed.bypass_stats(b).caching()
            });
            if !bypassed && let Some(entry) = self.known_hit(&cache, &catalog, key) {
                self.answer_hit(entry.response.clone(), caching::Tier::L1, started, of);
                self.adopt_parse(parse);
                self.batch.clear();
                return Ok(true);
            }
            keyed = Some((params, key));
        }
        let Some(read_shape) = analyzed.plan_shape(&catalog) else {
            if matches!(*analyzed.analysis, Analysis::Bypass(_)) {
                metrics().bypass(BypassReason::NotCacheable);
            }
            self.stash_batch_work(parse, shape.parse, analyzed);
            return Ok(false);
        };
        // A cacheable read: its parameters and its key (the adaptive bypass samples by key).
        let (params, key) = match keyed {
            Some(keyed) => keyed,
            None => {
                let Some(params) = read_params() else {
                    self.stash_batch_work(parse, shape.parse, analyzed);
                    return Ok(false);
                };
                let key = self.batch_key(&stmt, &params, flags);
                (params, key)
            }
        };
        let make_plan = || analyzed.plan_with(read_shape.clone(), &catalog, key, Some(&params));
        let Some((ttl, stats, plan)) = self.read_gate(&cache, &catalog, key, &analyzed, &make_plan)
        else {
            self.stash_batch_work(parse, shape.parse, analyzed);
            return Ok(false);
        };
        let plan = plan.unwrap_or_else(make_plan);
        if self
            .serve_lookup(&cache, &plan, ttl, stats, started, of)
            .await?
        {
            self.adopt_parse(parse);
            self.batch.clear();
            return Ok(true);
        }
        self.stash_batch_work(parse, shape.parse, analyzed);
        Ok(false)
    }

    /// The cache key of a batch running `stmt` with `params`.
    fn batch_key(
        &mut self,
        stmt: &Statement,
        params: &bind::BindParams<'_>,
        flags: [u8; 2],
    ) -> CacheKey {
        let seed = self.key_seed();
        caching::execute_key(
            &mut self.key_buf,
            seed,
            &stmt.sql,
            &stmt.param_types,
            params.tail,
            flags,
        )
    }

    /// [`caching::key_seed`] of this client now, remembered for its settings fingerprint.
    fn key_seed(&mut self) -> u64 {
        let fp = self.settings.fingerprint();
        match self.seed_kept {
            Some((of, seed)) if of == fp => seed,
            _ => {
                let seed = caching::key_seed(&self.database, &self.user, fp);
                self.seed_kept = Some((fp, seed));
                seed
            }
        }
    }

    /// A batch answered from the cache: its Parse takes effect as it would have on the
    /// server.
    fn adopt_parse(&mut self, parse: Option<(Bytes, Statement)>) {
        if let Some((name, s)) = parse {
            if name.is_empty() {
                self.statements.unnamed = Some(s);
                self.unnamed_on_server = false;
            } else {
                self.statements.insert(name, s);
            }
        }
    }

    /// The batch goes to the server after all: keep what `serve_batch` worked out (the
    /// Parse's statement, the analysis) for `on_parse` and `note_bind` to reuse.
    fn stash_batch_work(
        &mut self,
        parse: Option<(Bytes, Statement)>,
        at: Option<usize>,
        analyzed: Arc<caching::Analyzed>,
    ) {
        if let (Some((name, stmt)), Some(i)) = (parse, at) {
            self.parsed_ahead = Some((self.batch[i].raw().clone(), name, stmt));
        }
        self.query_analyzed = Some(analyzed);
    }

    /// Store the captured response if it is complete and fit.
    fn finish_fill(&mut self) {
        let (Some(f), Some(cache)) = (self.fill.take(), self.cache.clone()) else {
            return;
        };
        let took = f.started.elapsed();
        metrics().upstream_seconds.observe(took.as_secs_f64());
        if let Some(s) = &f.stats {
            s.upstream(took);
        }
        let len = self.to_client.len() - f.start;
        tracing::trace!(spoiled = f.spoiled, len, "fill complete");
        if f.spoiled
            || len == 0
            || len > cache.config.max_result_bytes
            || f.rows > cache.config.max_result_rows
        {
            metrics().fills_unfit.inc();
            return;
        }
        let start = f.start;
        let outcome = cache.fill(f.key, f, &self.to_client[start..]);
        tracing::trace!(?outcome, len, "cache fill");
    }

    /// Record what a statement about to run will invalidate, and its transaction effects.
    /// `analyzed` is the analysis of `sql` if the caller has it already.
    async fn note_statement(
        &mut self,
        sql: &str,
        params: Option<&bind::BindParams<'_>>,
        analyzed: Option<Arc<caching::Analyzed>>,
    ) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        let catalog = self.catalog(&cache).await;
        let analyzed = match (analyzed, &catalog) {
            (Some(a), _) if a.is_for(sql) => Some(a),
            (_, Some(c)) => Some(cache.analyze(&self.database, sql, c)),
            _ => None,
        };
        // Stricter isolation, and settings changed inside the transaction (SET LOCAL ROLE,
        // SET search_path before COMMIT...) that the cache key does not carry yet: bypass the
        // cache until the transaction ends.
        if analyzed.as_ref().map_or_else(
            || caching::changes_transaction(sql),
            |a| a.changes_transaction,
        ) {
            self.strict_tx = true;
        }
        // A function that may SET ROLE (or other settings) for the session: Postgres does
        // not report it, so nothing this client reads may be shared, nor its server
        // connection handed to another client with the role it left there.
        match catalog.as_ref().and_then(|c| c.hidden_setting_change(sql)) {
            Some(HiddenChange::Session) => {
                self.pinned
                    .get_or_insert("a function that may change the role or settings");
            }
            // set_config(..., true) in a function: as written in the query itself, the
            // rest of the transaction reads through.
            Some(HiddenChange::Transaction) => self.strict_tx = true,
            None => {}
        }
        let (Some(catalog), Some(analyzed)) = (catalog, analyzed) else {
            return;
        };
        if let Analysis::Ddl(d) = &*analyzed.analysis {
            self.schema_dirty = true;
            // ALTER ROLE/USER/DATABASE ... SET: new sessions start with other defaults.
            let w = crate::session::scan::leading_words(sql, 2);
            if w.first().is_some_and(|w| w == "alter")
                && w.get(1)
                    .is_some_and(|w| matches!(w.as_str(), "role" | "user" | "database"))
            {
                self.defaults_changed = true;
            }
            if d.creates_temp {
                self.pinned.get_or_insert("temporary relation");
            }
        }
        // A write no statement names (a function's, a procedure's, a trigger's) is visible to
        // the rest of its transaction: the cache cannot say which reads it changed.
        if caching::writes_unnamed_tables(&analyzed.analysis, &catalog) {
            self.strict_tx = true;
            self.tx_hidden_writes = true;
        }
        analyzed.invalidations(
            &catalog,
            params,
            &mut self.pending_inv,
            &mut self.tx_written,
        );
    }

    async fn note_bind(&mut self, msg: &Message) {
        if self.cache.is_none() {
            return;
        }
        let body = msg.body();
        let Some((_, p1)) = cstr_at(body, 0) else {
            return;
        };
        let Some((stmt, _)) = cstr_at(body, p1) else {
            return;
        };
        let statement = if stmt.is_empty() {
            self.statements.unnamed.as_ref()
        } else {
            self.statements.get(stmt)
        };
        let Some((sql, types)) = statement.map(|s| (s.sql.clone(), s.param_types.clone())) else {
            return;
        };
        if let Some(params) = bind::BindParams::parse(body) {
            let params = params.with_types(&types);
            let analyzed = self.query_analyzed.take();
            self.note_statement(&sql, Some(&params), analyzed).await;
        }
    }

    /// The settings may have changed as a transaction ended or committed: record what the
    /// server connection now carries.
    fn settings_settled(&mut self, changed: bool) {
        if let Some(sql) = self.settings.take_restore_sql() {
            // It carries the server's defaults where the client expects its startup values:
            // nobody may take it for settled until they are restored (see `dispatch`).
            self.server_conn().settings_hash = 0;
            self.settings_restore = Some(sql);
        } else if changed {
            let fp = self.settings.fingerprint();
            self.server_conn().settings_hash = fp;
        }
    }

    /// Give back the startup values a RESET took from the held server connection.
    async fn restore_settings(&mut self) -> Result<(), RelayError> {
        let Some(sql) = self.settings_restore.take() else {
            return Ok(());
        };
        let fp = self.settings.fingerprint();
        let conn = self.server_conn();
        let answer = async {
            conn.send(&protocol::query(&sql)).await.ok()?;
            conn.drain_until_ready().await.ok()
        }
        .await;
        match answer {
            Some(msgs) if !msgs.iter().any(|m| m.tag() == b'E') => {
                conn.settings_hash = fp;
                Ok(())
            }
            _ => {
                self.server_lost("could not restore the session's startup settings".into())
                    .await
            }
        }
    }

    /// ReadyForQuery with status idle: what the transaction wrote is now visible to others.
    fn transaction_ended(&mut self) {
        // Only a final ROLLBACK undoes writes; anything else (even an error after a COMMIT in
        // the same query string) may have committed them, so invalidate.
        if !self.last_tag_rollback {
            self.writes_committed();
        }
        self.pending_inv.clear();
        self.tx_written.clear();
        self.strict_tx = false;
        self.tx_hidden_writes = false;
        self.schema_dirty = false;
        self.defaults_changed = false;
    }

    /// The writes noted so far are committed: invalidate what they touched.
    fn writes_committed(&mut self) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        {
            metrics().invalidated(InvalidationOrigin::Proxy, self.pending_inv.len() as u64);
            if cache.tier.is_some() {
                // Redis first, then L1 (in `publish_committed`, before the client hears of
                // the commit): a reader that snapshots L1 after our local bump must find
                // Redis bumped too, or it could copy an old L2 value into L1 as fresh.
                self.to_publish.append(&mut self.pending_inv);
            } else {
                for inv in &self.pending_inv {
                    cache.invalidate(inv);
                }
            }
            if self.schema_dirty {
                cache.schema_changed(&self.database);
                if cache.tier.is_some() {
                    // Other instances reload their catalogs too.
                    self.to_publish
                        .push(Invalidation::Wide(crate::cache::TableId::SCHEMA_CHANGED));
                }
            }
        }
        if std::mem::take(&mut self.defaults_changed) {
            self.pool.retire_all();
        }
        // Taken now that the commit is done: the echo is sent after it.
        if std::mem::take(&mut self.tx_hidden_writes)
            && let Some(catch_up) = cache.catch_up(&self.database)
        {
            let ticket = catch_up.take();
            if cache.source_healthy(&self.database) {
                self.unheard = Some(Unheard {
                    catch_up,
                    ticket,
                    holds_answers: true,
                });
            } else if cache.tier.is_some() {
                // Nothing cached for the database is served here while its source cannot
                // vouch, and everything is dropped when it is back. Other instances may
                // not know yet (a follower polls the leader's health): they drop
                // everything before the client hears of the commit, since no source will
                // tell them what it wrote.
                self.to_publish.push(Invalidation::All);
            }
        }
        self.pending_inv.clear();
        self.tx_written.clear();
        self.schema_dirty = false;
    }

    /// Tell other instances what the transaction that just committed invalidated.
    async fn publish_committed(&mut self) {
        if self.to_publish.is_empty() {
            return;
        }
        let invs = std::mem::take(&mut self.to_publish);
        let Some(cache) = self.cache.clone() else {
            return;
        };
        if let Some(tier) = &cache.tier {
            tier.publish(&invs).await;
        }
        for inv in &invs {
            cache.invalidate(inv);
        }
    }

    /// Get a server connection for a client message with tag `tag`. On failure the client
    /// gets an error in protocol order and `false` is returned.
    async fn acquire(&mut self, tag: u8) -> Result<bool, RelayError> {
        // Deliver what the client is owed before possibly waiting on the pool (unless a
        // response is being captured: its start offset in the buffer must stay valid).
        if self.fill.is_none() {
            self.flush_client().await?;
        }
        let error = match self.pool.checkout().await {
            Ok(mut conn) => match sync_settings(&mut conn, &self.settings).await {
                Ok(()) => {
                    self.cancel.set(Some((conn.addr.clone(), conn.key))).await;
                    self.unnamed_on_server = false;
                    self.tx_status = b'I';
                    self.server = Some(conn);
                    return Ok(true);
                }
                Err(e) => {
                    conn.broken = true;
                    conn.discard();
                    upstream_error_message(&e, Severity::Error)
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "server connection checkout failed");
                let code = match &e {
                    crate::upstream::pool::CheckoutError::Upstream(u) => u.sqlstate().to_string(),
                    _ => "08P01".into(),
                };
                protocol::error_response(Severity::Error, &code, &format!("pgstash: {e}"))
            }
        };
        // No response will be captured: drop the fill (and its guard, so that readers of
        // the same key waiting behind it move on).
        self.fill = None;
        self.expect.push_synthetic(error, &mut self.to_client);
        if matches!(tag, b'Q' | b'F' | b'S') {
            let rfq = protocol::ready_for_query(b'I');
            self.expect.push_synthetic(rfq, &mut self.to_client);
        } else {
            self.skip_to_sync = true;
        }
        Ok(false)
    }

    async fn flush_client(&mut self) -> Result<(), RelayError> {
        if !self.to_client.is_empty() {
            self.client_w
                .write_all(&self.to_client)
                .await
                .map_err(RelayError::ClientWrite)?;
            self.to_client.clear();
        }
        Ok(())
    }

    fn server_idle(&self) -> bool {
        self.expect.is_empty() && !self.batch_open && !self.copy_in && self.to_server.is_empty()
    }

    async fn maybe_release(&mut self) {
        if self.mode != PoolMode::Transaction
            || self.server.is_none()
            || self.pinned.is_some()
            || self.tx_status != b'I'
            || !self.server_idle()
        {
            return;
        }
        self.cancel.set(None).await;
        self.server = None;
        // Its settings hash says "unknown": the next checkout gives it all the settings.
        self.settings_restore = None;
    }

    async fn server_lost(&mut self, why: String) -> Result<(), RelayError> {
        if let Some(conn) = self.server.take() {
            conn.discard();
        }
        let msg = protocol::error_response(
            Severity::Fatal,
            "08006",
            &format!("pgstash: server connection lost: {why}"),
        );
        self.to_client.extend_from_slice(&msg);
        let _ = self.flush_client().await;
        Err(RelayError::ServerLost(why))
    }

    /// The client is gone: give the server connection back only if it is clean.
    async fn finish(&mut self) {
        // A commit seen just before the end still invalidates.
        self.publish_committed().await;
        self.cancel.set(None).await;
        let Some(mut conn) = self.server.take() else {
            return;
        };
        let reusable = self.pinned.is_none() && self.server_idle();
        if reusable && self.tx_status != b'I' {
            let rollback = async {
                conn.send(&protocol::query("ROLLBACK")).await.ok()?;
                conn.drain_until_ready().await.ok()
            };
            let done = tokio::time::timeout(std::time::Duration::from_secs(5), rollback).await;
            if matches!(done, Ok(Some(_))) {
                return;
            }
        } else if reusable {
            return;
        }
        conn.broken = true;
        conn.discard();
    }
}

/// Writes a client committed that no statement named (a trigger's, a function's), until
/// the change source has applied them: the client reads through Postgres until then (see
/// [`CatchUp`]).
struct Unheard {
    catch_up: Arc<CatchUp>,
    ticket: Ticket,
    /// Nothing more reaches the client until then either, the commit's answer included,
    /// so that once it has it, every client reads what the commit wrote.
    holds_answers: bool,
}

/// Until the held answers may go to the client (see [`Unheard::holds_answers`]).
async fn until_passed(held: Option<(Arc<CatchUp>, Ticket)>) {
    if let Some((catch_up, ticket)) = held {
        // Boxed: the event loop builds this future on every turn (select! builds disabled
        // branches too) and copies it; unboxed, the wait's state (a `Notified`, a timer)
        // would be copied with it although it is rarely polled at all.
        Box::pin(catch_up.until_passed(ticket)).await;
    }
}

async fn read_some<R: AsyncRead + Unpin>(
    r: Option<&mut MessageReader<R>>,
) -> Result<Option<Message>, ProtocolError> {
    match r {
        Some(r) => r.read_message().await,
        None => std::future::pending().await,
    }
}

/// One write attempt that does not wait: `None` when the socket would block. The no-op
/// waker is never woken; the event loop polls a write that did not finish again (with its
/// own waker) before it waits.
fn write_without_waiting<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
) -> Option<std::io::Result<usize>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(w).poll_write(&mut cx, buf) {
        std::task::Poll::Ready(r) => Some(r),
        std::task::Poll::Pending => None,
    }
}

enum WriteNowError {
    Client(std::io::Error),
    Server(std::io::Error),
}

async fn write_some<W: AsyncWrite + Unpin>(
    w: Option<&mut W>,
    buf: &[u8],
) -> std::io::Result<usize> {
    match w {
        Some(w) => w.write(buf).await,
        None => std::future::pending().await,
    }
}

/// Give `conn` the client's settings unless it already has exactly them.
pub async fn sync_settings(
    conn: &mut ServerConn,
    settings: &Settings,
) -> Result<(), UpstreamError> {
    if conn.settings_hash == settings.fingerprint() {
        return Ok(());
    }
    conn.send(&protocol::query(&settings.apply_sql()))
        .await
        .map_err(|e| UpstreamError::Lost(e.into()))?;
    let answer = conn.drain_until_ready().await?;
    if let Some(err) = answer.iter().find(|m| m.tag() == b'E') {
        conn.settings_hash = 0;
        let fields = protocol::error_fields(err.body());
        let message = fields
            .iter()
            .find(|(f, _)| *f == b'M')
            .map(|(_, m)| m.clone())
            .unwrap_or_default();
        return Err(UpstreamError::Rejected { message, fields });
    }
    conn.settings_hash = settings.fingerprint();
    Ok(())
}

/// A statement text as `&str`: borrowed when it is valid UTF-8 (checked by `from_utf8`, much
/// faster than the lossy decoder's walk), else with invalid bytes replaced.
fn utf8_or_lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// An ErrorResponse for an upstream failure: Postgres' own fields when it refused, else ours.
pub fn upstream_error_message(e: &UpstreamError, severity: Severity) -> Bytes {
    match e {
        UpstreamError::Rejected { fields, .. } => {
            let sev = match severity {
                Severity::Error => "ERROR",
                Severity::Fatal => "FATAL",
            };
            let fields: Vec<(u8, String)> = fields
                .iter()
                .map(|(f, v)| match f {
                    b'S' | b'V' => (*f, sev.to_string()),
                    _ => (*f, v.clone()),
                })
                .collect();
            protocol::error_from_fields(&fields)
        }
        other => protocol::error_response(severity, other.sqlstate(), &format!("pgstash: {other}")),
    }
}

/// Whether `sql` starts with a keyword no cacheable read starts with (BEGIN, COMMIT, a write):
/// then looking its key up before the analysis would be wasted. A quick look at a leading
/// word only (after whitespace, not comments); `false` decides nothing (the analysis does).
fn surely_not_a_read(sql: &str) -> bool {
    let b = sql.trim_ascii_start().as_bytes();
    let mut word = [0u8; 9];
    let mut n = 0;
    for &c in b {
        if !c.is_ascii_alphabetic() {
            if c.is_ascii_digit() || c == b'_' || c >= 0x80 {
                return false;
            }
            break;
        }
        if n == word.len() {
            return false;
        }
        word[n] = c.to_ascii_lowercase();
        n += 1;
    }
    matches!(
        &word[..n],
        b"begin"
            | b"start"
            | b"commit"
            | b"end"
            | b"rollback"
            | b"insert"
            | b"update"
            | b"delete"
            | b"merge"
            | b"set"
            | b"savepoint"
            | b"release"
    )
}

/// Where the messages of a cacheable extended-protocol batch are.
struct BatchShape {
    parse: Option<usize>,
    bind: usize,
    describe: Described,
}

/// What a cache answer stood in for: a simple Query, or an extended-protocol batch (which
/// leaves its portal behind, described or not; see `PortalGap`).
#[derive(Clone, Copy)]
enum HitOf {
    Query,
    Batch { described_portal: bool },
}

/// The messages about the unnamed portal that pgstash may answer itself after a cached
/// batch (see `Relay::answer_gap_portal`).
#[derive(Clone, Copy)]
enum GapMessage {
    Execute,
    Describe,
}

/// What a batch's Describe asks about. Its answer is part of the stored response, so the kind
/// is part of the key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Described {
    Nothing,
    /// The unnamed portal: RowDescription or NoData (`pgbench -M extended`, most drivers).
    Portal,
    /// A statement, at this index of the batch: ParameterDescription, then RowDescription or
    /// NoData (tokio-postgres' `query_typed`). Served only when it is the statement the Bind
    /// runs, whose text and types the key holds.
    Statement(usize),
}

impl Described {
    fn key_byte(self) -> u8 {
        match self {
            Described::Nothing => 0,
            Described::Portal => 1,
            Described::Statement(_) => 2,
        }
    }
}

impl BatchShape {
    /// `[Parse] Bind [Describe(portal "" or a statement)] Execute(portal "", all rows)`,
    /// nothing else.
    fn of(batch: &[Message]) -> Option<BatchShape> {
        let mut i = 0;
        let parse = (batch.first()?.tag() == b'P').then(|| {
            i += 1;
            0
        });
        let bind = i;
        if batch.get(i)?.tag() != b'B' || !batch[i].body().starts_with(b"\0") {
            return None;
        }
        i += 1;
        let describe = match batch.get(i) {
            Some(m) if m.tag() == b'D' && m.body() == b"P\0" => Described::Portal,
            Some(m) if m.tag() == b'D' && m.body().first() == Some(&b'S') => {
                Described::Statement(i)
            }
            _ => Described::Nothing,
        };
        if describe != Described::Nothing {
            i += 1;
        }
        let exec = batch.get(i)?;
        if exec.tag() != b'E' || exec.body() != b"\0\0\0\0\0" || i + 1 != batch.len() {
            return None;
        }
        Some(BatchShape {
            parse,
            bind,
            describe,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Effect, PortalEffects, surely_not_a_read, write_without_waiting};
    use tokio::io::AsyncReadExt;

    #[test]
    fn a_portal_keeps_its_effects_until_it_is_closed_and_others_have_none() {
        let mut p = PortalEffects::default();
        assert!(p.get(b"").is_none());
        p.remove(b"");
        let pin: std::sync::Arc<[Effect]> = vec![Effect::Pin("temporary table")].into();
        p.insert(b"c1", pin.clone());
        assert_eq!(p.get(b"c1"), Some(&pin));
        assert!(p.get(b"").is_none(), "the unnamed portal has none");
        p.remove(b"");
        assert_eq!(p.get(b"c1"), Some(&pin), "closing another portal keeps it");
        p.remove(b"c1");
        assert!(p.get(b"c1").is_none());
    }

    #[tokio::test]
    async fn a_write_without_waiting_takes_what_fits_and_never_blocks() {
        let (mut near, mut far) = tokio::io::duplex(8);
        assert_eq!(
            write_without_waiting(&mut near, b"0123456789").map(|r| r.unwrap()),
            Some(8),
            "the pipe takes what fits"
        );
        assert!(
            write_without_waiting(&mut near, b"89").is_none(),
            "a full pipe answers at once instead of waiting"
        );
        let mut got = [0; 8];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"01234567");
        assert_eq!(
            write_without_waiting(&mut near, b"89").map(|r| r.unwrap()),
            Some(2),
            "room again once the other side read"
        );
    }

    #[test]
    fn only_leading_non_read_keywords_skip_the_early_lookup() {
        for sql in [
            "BEGIN",
            "  commit;",
            "END",
            "UPDATE t SET a = 1",
            "insert into t values (1)",
        ] {
            assert!(surely_not_a_read(sql), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "select_x",
            "with w as (delete from t returning *) select * from w",
            "/* x */ BEGIN",
            "updatex",
            "savepoints",
            "",
            "(SELECT 1)",
        ] {
            assert!(!surely_not_a_read(sql), "{sql}");
        }
    }
}
