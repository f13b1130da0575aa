//! A circuit breaker: after a failure, Redis is skipped for a cooldown instead of making
//! every client wait for a timeout. After the cooldown the next operations try again (half
//! open); one success closes it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

pub struct Breaker {
    base: Instant,
    cooldown: Duration,
    /// Milliseconds since `base` before which Redis is skipped; 0 when closed.
    open_until: AtomicU64,
}

impl Breaker {
    pub fn new(cooldown: Duration) -> Self {
        Breaker {
            base: Instant::now(),
            cooldown,
            open_until: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    pub fn allows(&self) -> bool {
        let until = self.open_until.load(Relaxed);
        until == 0 || self.now_ms() >= until
    }

    /// Open (again). Returns true when it was closed before (worth a log line).
    pub fn trip(&self) -> bool {
        let until = (self.now_ms() + self.cooldown.as_millis() as u64).max(1);
        self.open_until.swap(until, Relaxed) == 0
    }

    /// Close after a success. Returns true when it was open before.
    pub fn close(&self) -> bool {
        self.open_until.load(Relaxed) != 0 && self.open_until.swap(0, Relaxed) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_skips_redis_for_the_cooldown_then_lets_it_be_tried() {
        let b = Breaker::new(Duration::from_millis(30));
        assert!(b.allows());
        assert!(b.trip());
        assert!(!b.allows());
        assert!(!b.trip(), "already open");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allows(), "half open after the cooldown");
        assert!(b.close());
        assert!(!b.close(), "already closed");
        assert!(b.allows());
    }
}
