//! The `pgstash_<hash>` statements one server connection holds, in order of last use.
//!
//! Statements are shared by every client of the pool, and their names change with settings
//! and schema epochs, so without a bound a long-lived server connection would keep a plan for
//! every statement any client ever prepared. Past the bound the least recently used ones are
//! closed, as PgBouncer's `max_prepared_statements` does; a client that uses one again gets its
//! Parse re-sent in the same pipeline (a re-plan, not a round trip).

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct ServerStatements {
    /// Statement hash to the tick of its last use.
    last_used: HashMap<u64, u64>,
    tick: u64,
}

impl ServerStatements {
    /// Whether the connection has the statement; marks it used.
    pub fn use_if_present(&mut self, hash: u64) -> bool {
        self.tick += 1;
        match self.last_used.get_mut(&hash) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    pub fn insert(&mut self, hash: u64) {
        self.tick += 1;
        self.last_used.insert(hash, self.tick);
    }

    pub fn remove(&mut self, hash: u64) {
        self.last_used.remove(&hash);
    }

    pub fn clear(&mut self) {
        self.last_used.clear();
    }

    pub fn len(&self) -> usize {
        self.last_used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_used.is_empty()
    }

    /// Forget the least recently used statements beyond `cap` and return them, for the caller
    /// to close on the server. `cap == 0` means no bound.
    pub fn evict_beyond(&mut self, cap: usize) -> Vec<u64> {
        if cap == 0 || self.last_used.len() <= cap {
            return Vec::new();
        }
        let mut by_age: Vec<(u64, u64)> = self.last_used.iter().map(|(&h, &t)| (t, h)).collect();
        let excess = by_age.len() - cap;
        by_age.select_nth_unstable(excess - 1);
        by_age.truncate(excess);
        by_age
            .into_iter()
            .map(|(_, h)| {
                self.last_used.remove(&h);
                h
            })
            .collect()
    }
}

/// The server-side name of a shared statement.
pub fn server_name(hash: u64) -> String {
    format!("pgstash_{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_takes_the_least_recently_used_and_keeps_the_cap() {
        let mut s = ServerStatements::default();
        for h in 1..=5 {
            s.insert(h);
        }
        assert!(s.use_if_present(1));
        assert!(s.use_if_present(3));
        let mut gone = s.evict_beyond(3);
        gone.sort_unstable();
        assert_eq!(gone, vec![2, 4]);
        assert_eq!(s.len(), 3);
        assert!(s.use_if_present(1) && s.use_if_present(3) && s.use_if_present(5));
        assert!(!s.use_if_present(2));
    }

    #[test]
    fn within_the_cap_or_unbounded_nothing_is_evicted() {
        let mut s = ServerStatements::default();
        for h in 0..10 {
            s.insert(h);
        }
        assert!(s.evict_beyond(10).is_empty());
        assert!(s.evict_beyond(0).is_empty());
        assert_eq!(s.len(), 10);
    }

    #[test]
    fn server_name_matches_the_name_statements_are_parsed_under() {
        assert_eq!(server_name(0xab), "pgstash_00000000000000ab");
    }
}
