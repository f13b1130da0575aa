//! A ChangeSink for tests of the change sources: it writes down everything it is told.

use pgstash::invalidation::{Change, ChangeSink};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

#[derive(Clone, Debug)]
pub enum Event {
    Apply {
        db: String,
        at: Option<SystemTime>,
        changes: Vec<Change>,
    },
    Health {
        healthy: bool,
        reason: String,
    },
}

#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl ChangeSink for Recorder {
    fn apply(&self, db: &str, committed_at: Option<SystemTime>, changes: &[Change]) {
        self.lock().push(Event::Apply {
            db: db.to_owned(),
            at: committed_at,
            changes: changes.to_vec(),
        });
    }

    fn set_healthy(&self, _db: &str, healthy: bool, reason: &str) {
        self.lock().push(Event::Health {
            healthy,
            reason: reason.to_owned(),
        });
    }
}

impl Recorder {
    pub fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Vec<Event> {
        self.lock().clone()
    }
}
