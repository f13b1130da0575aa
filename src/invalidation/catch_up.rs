//! Read-after-write for writes only a change source sees: what a trigger, a function or a
//! procedure wrote. The proxy invalidates the tables a statement names before its client
//! hears of the commit; the rest reaches the cache through the source a few milliseconds
//! later, so a read right after such a commit could be served the old rows.
//!
//! So a client whose committed transaction wrote where no statement shows takes a
//! [`Ticket`] and waits for an *echo* sent after that commit: a marker that travels the
//! source's own stream (a NOTIFY on the listener's channel, a heartbeat transaction in the
//! WAL), which delivers commits in commit order. Once the echo is back, every change
//! committed before it has been applied to the cache. Where the source runs in this
//! instance, the relay holds the commit's answer until then, so that no client of the
//! instance reads old rows after the commit was answered; and the writing client reads
//! through Postgres until then in any case.
//!
//! One echo answers every ticket taken before it was sent: tickets are numbered, and the
//! source sends the highest number asked for when it gets round to it (one echo in flight
//! at a time, so a burst of commits shares echoes).
//!
//! An instance that does not run the source (a follower of another instance over Redis)
//! never hears an echo; nor does a client whose echo was lost with the source's connection.
//! A ticket also passes once `max_wait` (the source's `max_lag`, the staleness the source
//! is trusted to) has gone by since it was taken.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

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
    /// Whether this instance runs the source right now (with Redis, only the elected one).
    source_here: AtomicBool,
    /// Tells this instance's echoes from another's on a shared channel.
    nonce: u64,
    max_wait: Duration,
}

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
            source_here: AtomicBool::new(false),
            nonce: rand::random(),
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

    /// Whether this instance runs the change source now, and so hears its echoes.
    pub fn source_here(&self) -> bool {
        self.source_here.load(Ordering::Acquire)
    }

    /// For the source: it runs here from now on (`true`), or no longer (`false`).
    pub fn set_source_here(&self, here: bool) {
        self.source_here.store(here, Ordering::Release);
    }

    /// For the source: waits until a ticket newer than `sent` is taken, and returns the
    /// newest. Send an echo of it, and [`CatchUp::heard`] it when it comes back.
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

    /// The newest ticket whose echo was heard: a source that (re)connects starts waiting
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

    /// The echo's text on a NOTIFY channel: `echo <nonce> <number>`.
    pub fn echo_payload(&self, number: u64) -> String {
        format!("echo {:x} {number}", self.nonce)
    }

    /// The ticket number of an echo this instance sent, from its payload text.
    pub fn own_echo(&self, payload: &str) -> Option<u64> {
        let rest = payload.strip_prefix("echo ")?;
        let (nonce, number) = rest.split_once(' ')?;
        if u64::from_str_radix(nonce, 16).ok()? != self.nonce {
            return None;
        }
        number.parse().ok()
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
        assert_eq!(ours.own_echo(&payload), Some(7));
        assert_eq!(theirs.own_echo(&payload), None);
        assert_eq!(ours.own_echo("echo"), None);
        assert_eq!(ours.own_echo("2 U 1.5 public.t"), None);
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
