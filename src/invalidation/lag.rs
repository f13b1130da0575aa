//! Whether the WAL source keeps up: every WAL position the server reports (keepalives,
//! XLogData, and the periodic heartbeat of `setup::wal_heartbeat`) becomes a target with the
//! time we learned of it; a target not reached within `max_lag` means changes that Postgres already
//! committed may still be missing from the cache's view.
//!
//! Pure bookkeeping with the clock passed in, so it can be tested without waiting.

use super::lsn::Lsn;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Beyond this many pending targets, new ones are merged into the newest (keeping its
/// older time: merging can only make us report lag sooner, never later).
const MAX_TARGETS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagState {
    /// No target reached since (re)connecting: still replaying what accumulated.
    CatchingUp,
    /// Every target older than `max_lag` is reached.
    CaughtUp,
    /// `target` was learned of `behind` ago and is still not reached.
    Lagging {
        target: Lsn,
        applied: Lsn,
        behind: Duration,
    },
}

pub struct Lag {
    applied: Lsn,
    /// Oldest first; positions strictly increase.
    pending: VecDeque<(Lsn, Instant)>,
    reached_once: bool,
}

impl Lag {
    /// Starting at `applied` (the slot's confirmed position) with nothing reached yet.
    pub fn new(applied: Lsn) -> Lag {
        Lag {
            applied,
            pending: VecDeque::new(),
            reached_once: false,
        }
    }

    pub fn applied(&self) -> Lsn {
        self.applied
    }

    /// The server's WAL was at `lsn` at time `seen` (or later).
    pub fn target(&mut self, lsn: Lsn, seen: Instant) {
        if lsn <= self.applied {
            self.reached_once = true;
            return;
        }
        let full = self.pending.len() >= MAX_TARGETS;
        match self.pending.back_mut() {
            Some((last, _)) if *last >= lsn => {}
            Some((last, _)) if full => *last = lsn,
            _ => self.pending.push_back((lsn, seen)),
        }
    }

    /// Everything up to `lsn` has been applied.
    pub fn advance(&mut self, lsn: Lsn) {
        if lsn <= self.applied {
            return;
        }
        self.applied = lsn;
        while let Some(&(target, _)) = self.pending.front() {
            if target > lsn {
                break;
            }
            self.pending.pop_front();
            self.reached_once = true;
        }
    }

    pub fn state(&self, now: Instant, max_lag: Duration) -> LagState {
        if let Some(&(target, seen)) = self.pending.front() {
            let behind = now.saturating_duration_since(seen);
            if behind > max_lag {
                return LagState::Lagging {
                    target,
                    applied: self.applied,
                    behind,
                };
            }
        }
        if self.reached_once {
            LagState::CaughtUp
        } else {
            LagState::CatchingUp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn catching_up_until_a_reported_position_is_reached() {
        let t0 = Instant::now();
        let mut lag = Lag::new(Lsn(100));
        assert_eq!(lag.state(t0, MAX), LagState::CatchingUp);
        lag.target(Lsn(200), t0);
        assert_eq!(lag.state(t0, MAX), LagState::CatchingUp);
        lag.advance(Lsn(150));
        assert_eq!(lag.state(t0, MAX), LagState::CatchingUp);
        lag.advance(Lsn(200));
        assert_eq!(lag.state(t0, MAX), LagState::CaughtUp);
        assert_eq!(lag.applied(), Lsn(200));
    }

    #[test]
    fn a_position_already_applied_counts_as_reached() {
        let t0 = Instant::now();
        let mut lag = Lag::new(Lsn(100));
        lag.target(Lsn(100), t0);
        assert_eq!(lag.state(t0, MAX), LagState::CaughtUp);
    }

    #[test]
    fn a_target_unreached_for_longer_than_max_lag_is_lagging() {
        let t0 = Instant::now();
        let mut lag = Lag::new(Lsn(100));
        lag.target(Lsn(100), t0);
        lag.target(Lsn(300), t0);
        lag.target(Lsn(400), t0 + Duration::from_secs(3));
        assert_eq!(lag.state(t0 + MAX, MAX), LagState::CaughtUp);
        assert!(matches!(
            lag.state(t0 + Duration::from_secs(6), MAX),
            LagState::Lagging {
                target: Lsn(300),
                behind,
                ..
            } if behind == Duration::from_secs(6)
        ));
        // Reaching the first target leaves the second, which is not yet overdue.
        lag.advance(Lsn(350));
        assert_eq!(
            lag.state(t0 + Duration::from_secs(6), MAX),
            LagState::CaughtUp
        );
        assert!(matches!(
            lag.state(t0 + Duration::from_secs(9), MAX),
            LagState::Lagging {
                target: Lsn(400),
                ..
            }
        ));
        lag.advance(Lsn(400));
        assert_eq!(
            lag.state(t0 + Duration::from_secs(60), MAX),
            LagState::CaughtUp
        );
    }

    #[test]
    fn many_targets_merge_without_hiding_lag() {
        let t0 = Instant::now();
        let mut lag = Lag::new(Lsn(0));
        for i in 1..=10_000u64 {
            lag.target(Lsn(i), t0 + Duration::from_millis(i));
        }
        assert!(lag.pending.len() <= MAX_TARGETS);
        // The newest position carries an older time than it was seen at: lag shows early.
        lag.advance(Lsn(9_999));
        let (last, seen) = *lag.pending.front().expect("one target left");
        assert_eq!(last, Lsn(10_000));
        assert!(seen < t0 + Duration::from_millis(10_000));
    }
}
