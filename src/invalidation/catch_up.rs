//! Read-after-write for writes only a change source sees: what a trigger, a function or a
//! procedure wrote. The proxy invalidates the tables a statement names before its client
//! hears of the commit; the rest reaches the cache through the source a few milliseconds
//! later, so a read right after such a commit could be served the old rows.
//!
//! So a client whose committed transaction wrote where no statement shows takes a
//! [`Ticket`] and waits for an *echo* sent after that commit: a marker that travels the
//! source's own stream (a NOTIFY on the source's channel, a transaction holding a logical
//! decoding message in the WAL), which delivers commits in commit order. Once the echo is
//! back, every change committed before it has been applied to the cache. The relay holds
//! the commit's answer until then, so that no client reads old rows after the commit was
//! answered, and the writing client reads through Postgres until then in any case.
//!
//! Every instance sends its own echoes ([`send_echoes`], a connection of its own); the
//! instance reading the source hears them all, and with Redis passes the others' back over
//! Redis once the invalidations heard before them are in Redis too (`apply::CacheSink`).
//!
//! One echo answers every ticket taken before it was sent: tickets are numbered, and the
//! sender sends the highest number asked for when it gets round to it (one echo in flight
//! at a time, so a burst of commits shares echoes).
//!
//! An echo lost with a connection (a NOTIFY sent while the reader was reconnecting) is
//! sent again after [`RESEND`]; a ticket also passes once `max_wait` (the source's
//! `max_lag`, the staleness the source is trusted to) has gone by since it was taken, and
//! when the source stops or starts vouching for the database (everything cached is
//! dropped then).
//!
//! Any role may LISTEN on the NOTIFY source's channel and NOTIFY on it, so an echo carries a
//! one-time random token besides its number: only an echo this instance sent, and has not
//! heard yet, is taken. Someone who copies an echo sees it when the real one is already
//! delivered (in commit order, before the copy), and cannot make up the next one; a forged
//! echo could otherwise pass every ticket at once.

use crate::pg_error::describe;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// Shared by a database's change source and the clients of that database.
#[derive(Debug)]
pub struct CatchUp {
    /// The highest ticket number handed out.
    requested: AtomicU64,
    /// The highest ticket number whose echo the source heard back.
    heard: AtomicU64,
    wake: Notify,
    /// Told whenever an echo comes back.
    echoed: Notify,
    /// Tells this instance's echoes from another's on a shared channel.
    nonce: u64,
    /// Echoes sent and not heard yet: (ticket number, one-time token), oldest first.
    in_flight: Mutex<VecDeque<(u64, u64)>>,
    max_wait: Duration,
}

/// Echoes remembered while unheard; older ones (lost with their connection) are forgotten:
/// their tickets pass with a later echo or after `max_wait`.
const IN_FLIGHT: usize = 16;

/// A client's claim: its writes committed before this ticket was taken.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    number: u64,
    taken: Instant,
}

impl CatchUp {
    pub fn new(max_wait: Duration) -> CatchUp {
        CatchUp {
            requested: AtomicU64::new(0),
            heard: AtomicU64::new(0),
            wake: Notify::new(),
            echoed: Notify::new(),
            nonce: rand::random(),
            in_flight: Mutex::default(),
            max_wait,
        }
    }

    /// Called after the commit: the source will send an echo past it.
    pub fn take(&self) -> Ticket {
        let number = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake.notify_one();
        Ticket {
            number,
            taken: Instant::now(),
        }
    }

    /// Whether the source has applied everything committed before `ticket` was taken (or
    /// the ticket has waited as long as the source may lag).
    pub fn passed(&self, ticket: &Ticket) -> bool {
        self.heard.load(Ordering::Acquire) >= ticket.number
            || ticket.taken.elapsed() >= self.max_wait
    }

    /// Until `ticket` has [`passed`](CatchUp::passed).
    pub async fn until_passed(&self, ticket: Ticket) {
        loop {
            let echoed = self.echoed.notified();
            tokio::pin!(echoed);
            echoed.as_mut().enable();
            if self.passed(&ticket) {
                return;
            }
            let left = self.max_wait.saturating_sub(ticket.taken.elapsed());
            let _ = tokio::time::timeout(left, echoed).await;
        }
    }

    /// For the sender: waits until a ticket newer than `sent` is taken, and returns the
    /// newest. Send an echo of it; it is [`CatchUp::heard`] when it comes back.
    pub async fn wanted(&self, sent: u64) -> u64 {
        loop {
            let notified = self.wake.notified();
            let newest = self.requested.load(Ordering::Acquire);
            if newest > sent {
                return newest;
            }
            notified.await;
        }
    }

    /// The newest ticket whose echo was heard: a sender that (re)connects starts waiting
    /// from here, so that it echoes tickets whose echo was lost with its last connection.
    pub fn heard_through(&self) -> u64 {
        self.heard.load(Ordering::Acquire)
    }

    /// The echo of ticket `number` came back through the source, after everything committed
    /// before it.
    pub fn heard(&self, number: u64) {
        self.heard.fetch_max(number, Ordering::AcqRel);
        self.echoed.notify_waiters();
    }

    /// Whether a ticket taken so far has not passed by its echo (or `release_all`).
    pub fn waiting(&self) -> bool {
        self.requested.load(Ordering::Acquire) > self.heard.load(Ordering::Acquire)
    }

    /// Every ticket taken so far passes: the source can no longer vouch for the database,
    /// so its cache is not served until the source is back and has dropped everything.
    pub fn release_all(&self) {
        self.heard(self.requested.load(Ordering::Acquire));
    }

    /// The text of a new echo of ticket `number`, `echo <nonce> <number> <token>`: sent once,
    /// it is taken back once.
    pub fn echo_payload(&self, number: u64) -> String {
        let token: u64 = rand::random();
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if in_flight.len() == IN_FLIGHT {
            in_flight.pop_front();
        }
        in_flight.push_back((number, token));
        format!("echo {:x} {number} {token:x}", self.nonce)
    }

    /// An echo came back: if this instance sent it and has not heard it yet, its ticket is
    /// heard. Returns whether it was this instance's (false for a copy or a forgery too).
    pub fn echo_back(&self, payload: &str) -> bool {
        match self.own_echo(payload) {
            Some(ticket) => {
                self.heard(ticket);
                true
            }
            None => false,
        }
    }

    /// The ticket number of an unheard echo this instance sent, from its payload text; it
    /// is no longer in flight afterwards (nor are older ones: the stream is in order).
    fn own_echo(&self, payload: &str) -> Option<u64> {
        let mut parts = payload.strip_prefix("echo ")?.split(' ');
        let nonce = u64::from_str_radix(parts.next()?, 16).ok()?;
        let number: u64 = parts.next()?.parse().ok()?;
        let token = u64::from_str_radix(parts.next()?, 16).ok()?;
        if nonce != self.nonce || parts.next().is_some() {
            return None;
        }
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let at = in_flight.iter().position(|&sent| sent == (number, token))?;
        in_flight.drain(..=at);
        Some(number)
    }
}

/// How long an echo may be out before it is sent again (it comes back in well under a
/// millisecond on a quiet machine).
const RESEND: Duration = Duration::from_millis(250);

/// The stream an echo travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoVia {
    /// A notification on the NOTIFY source's channel, in commit order with the triggers'.
    Notify,
    /// A transaction holding only a logical decoding message (prefix `pgstash_echo`),
    /// flushed at commit so that the stream gets to it at once.
    Wal,
}

impl EchoVia {
    fn sql(self, payload: &str) -> String {
        match self {
            EchoVia::Notify => format!("NOTIFY {}, '{payload}'", super::notify::CHANNEL),
            EchoVia::Wal => format!(
                "SELECT pg_catalog.pg_logical_emit_message(true, '{}', '{payload}')",
                super::changes::ECHO_PREFIX
            ),
        }
    }
}

/// Sends an echo for every new ticket of `catch_up` into database `conninfo`, on a
/// connection of its own (every instance does, elected to read the source or not), until
/// `cancel` fires. Connection problems are retried; meanwhile tickets wait out `max_wait`.
pub async fn send_echoes(
    conninfo: String,
    catch_up: Arc<CatchUp>,
    via: EchoVia,
    timeout: Duration,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut connected = false;
        let ended = tokio::select! {
            _ = cancel.cancelled() => return,
            e = echo_session(&conninfo, &catch_up, via, timeout, &mut connected) => e,
        };
        if connected {
            backoff = Duration::from_millis(100);
        }
        tracing::warn!(error = %ended, retry_in = ?backoff,
            "echo connection lost; clients waiting for the change source wait out max_lag");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection's worth of echoes; returns why it ended.
async fn echo_session(
    conninfo: &str,
    catch_up: &CatchUp,
    via: EchoVia,
    timeout: Duration,
    connected: &mut bool,
) -> String {
    let mut pg: tokio_postgres::Config = match conninfo.parse() {
        Ok(pg) => pg,
        Err(e) => return format!("invalid connection string: {}", describe(&e)),
    };
    pg.application_name("pgstash-echo").connect_timeout(timeout);
    let (client, connection) = match tokio::time::timeout(timeout, pg.connect(NoTls)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return format!("cannot connect: {}", describe(&e)),
        Err(_) => return format!("cannot connect: no answer within {timeout:?}"),
    };
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let _abort = AbortOnDrop(driver);
    if via == EchoVia::Wal
        && let Err(e) = client.batch_execute("SET synchronous_commit = local").await
    {
        return describe(&e);
    }
    *connected = true;
    let mut sent = catch_up.heard_through();
    loop {
        let newest = if catch_up.heard_through() >= sent {
            catch_up.wanted(sent).await
        } else {
            // The last echo is not back: it may have been lost with the reader's
            // connection to the source (a NOTIFY nobody listened to), on this instance or
            // another. Once in a while, send it again.
            match tokio::time::timeout(RESEND, catch_up.wanted(sent)).await {
                Ok(newest) => newest,
                Err(_) => sent,
            }
        };
        let sql = via.sql(&catch_up.echo_payload(newest));
        match tokio::time::timeout(timeout, client.batch_execute(&sql)).await {
            Ok(Ok(())) => sent = newest,
            Ok(Err(e)) => return format!("echo failed: {}", describe(&e)),
            Err(_) => return format!("echo got no answer within {timeout:?}"),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_passes_when_its_echo_or_a_later_one_is_heard() {
        let c = CatchUp::new(Duration::from_secs(60));
        let first = c.take();
        let second = c.take();
        assert!(!c.passed(&first) && !c.passed(&second));
        assert_eq!(c.heard_through(), 0);
        c.heard(1);
        assert!(c.passed(&first));
        assert!(!c.passed(&second));
        c.heard(2);
        assert!(c.passed(&second));
        assert_eq!(c.heard_through(), 2);
        // An older echo arriving late does not undo a newer one.
        c.heard(1);
        assert!(c.passed(&second));
    }

    #[test]
    fn releasing_all_passes_every_ticket_taken_before() {
        let c = CatchUp::new(Duration::from_secs(60));
        let (a, b) = (c.take(), c.take());
        c.release_all();
        assert!(c.passed(&a) && c.passed(&b));
        assert!(!c.passed(&c.take()), "a ticket taken after is not released");
    }

    #[test]
    fn a_ticket_passes_after_max_wait_without_an_echo() {
        let c = CatchUp::new(Duration::from_millis(20));
        let t = c.take();
        assert!(!c.passed(&t));
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.passed(&t));
    }

    #[test]
    fn only_this_instances_echoes_are_its_own() {
        let ours = CatchUp::new(Duration::from_secs(1));
        let theirs = CatchUp::new(Duration::from_secs(1));
        let payload = ours.echo_payload(7);
        assert_eq!(theirs.own_echo(&payload), None);
        assert_eq!(ours.own_echo(&payload), Some(7));
        assert_eq!(ours.own_echo("echo"), None);
        assert_eq!(ours.own_echo("2 U 1.5 public.t"), None);
    }

    #[test]
    fn a_copied_or_made_up_echo_passes_no_ticket() {
        let c = CatchUp::new(Duration::from_secs(60));
        let first = c.take();
        let real = c.echo_payload(first.number);
        let later = c.take();
        // Someone who saw the real echo (a LISTENer on the channel) makes up the next one,
        // or one far ahead, with the same nonce and token.
        let (nonce, rest) = real["echo ".len()..].split_once(' ').expect("nonce");
        let token = rest.split_once(' ').expect("token").1;
        for forged in [
            format!("echo {nonce} {} {token}", later.number),
            format!("echo {nonce} {} {token}", u64::MAX),
            format!("echo {nonce} {}", u64::MAX),
        ] {
            assert!(!c.echo_back(&forged), "{forged}");
        }
        assert!(!c.passed(&first) && !c.passed(&later));
        assert!(c.echo_back(&real));
        assert!(c.passed(&first));
        assert!(!c.passed(&later));
        // The same echo again (a copy sent after it) is no longer taken.
        assert!(!c.echo_back(&real));
        let next = c.echo_payload(later.number);
        assert!(c.echo_back(&next));
        assert!(c.passed(&later));
    }

    #[test]
    fn an_echo_heard_forgets_the_older_ones_still_in_flight() {
        let c = CatchUp::new(Duration::from_secs(60));
        let (a, b) = (c.take(), c.take());
        let lost = c.echo_payload(a.number);
        let heard = c.echo_payload(b.number);
        assert!(c.echo_back(&heard));
        assert!(c.passed(&a) && c.passed(&b));
        assert!(
            !c.echo_back(&lost),
            "an older echo is not taken after a newer one"
        );
    }

    #[tokio::test]
    async fn a_waiter_is_released_by_the_echo_or_else_by_max_wait() {
        let c = std::sync::Arc::new(CatchUp::new(Duration::from_secs(600)));
        let t = c.take();
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.until_passed(t).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        c.heard(1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released by the echo")
            .expect("task");
        let short = CatchUp::new(Duration::from_millis(20));
        let t = short.take();
        tokio::time::timeout(Duration::from_secs(5), short.until_passed(t))
            .await
            .expect("released after max_wait without an echo");
    }

    #[tokio::test]
    async fn the_source_is_woken_for_the_newest_ticket() {
        let c = std::sync::Arc::new(CatchUp::new(Duration::from_secs(1)));
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.wanted(0).await }
        });
        tokio::task::yield_now().await;
        c.take();
        c.take();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert!(got >= 1);
        assert_eq!(c.wanted(1).await, 2, "a ticket taken while not waiting");
    }
}
