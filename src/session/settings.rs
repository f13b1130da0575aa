//! The settings a client expects on whatever server connection it is given.
//!
//! Startup parameters are applied with `set_config`, then the client's session-level `SET`s
//! are replayed verbatim, after `RESET ALL` wiped what the previous client left. A fingerprint
//! of the whole lets the relay skip this when the server already has exactly these settings,
//! which is the common case (every pgbench or ORM client sets the same things).
//!
//! `SET`s inside a transaction are staged and only kept if it commits.

use super::Effect;
use xxhash_rust::xxh3::Xxh3;

/// Startup keys that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// Settings Postgres takes only when a session starts (context `backend` and
/// `superuser-backend` in pg_settings). A pooled server connection has started already, so
/// they cannot be applied with set_config; they only steer logging and debugging, not any
/// result, so they are left out rather than refuse the client (PgBouncer's
/// `ignore_startup_parameters`, for these).
const AT_START_ONLY: &[&str] = &[
    "ignore_system_indexes",
    "jit_debugging_support",
    "jit_profiling_support",
    "log_connections",
    "log_disconnections",
    "post_auth_delay",
];

#[derive(Debug, Clone, Default)]
pub struct Settings {
    startup: Vec<(String, String)>,
    /// Session `SET`s in the order they were made, one per parameter.
    sets: Vec<(String, String)>,
    staged: Vec<Effect>,
    /// Open savepoints of the current transaction: name and how many effects were staged
    /// when it was set.
    savepoints: Vec<(String, usize)>,
    /// Startup parameters a committed RESET (or RESET ALL, DISCARD ALL) sent back to the
    /// server's default: Postgres would have restored the startup value, so the relay must.
    restore: Vec<String>,
    hash: u64,
}

/// DateStyle SETs whose value this module cannot read, kept for replay; past this the oldest
/// goes. Postgres accepts no such value, so these SETs failed and were never applied.
const MAX_DATESTYLE_SETS: usize = 8;

/// What a `SET DateStyle` statement sets: (output style, field order). `None` when its value
/// holds a word Postgres does not accept there.
fn datestyle_parts(stmt: &str) -> Option<(bool, bool)> {
    let lower = stmt.to_ascii_lowercase();
    let value = &lower[lower.find("datestyle")? + "datestyle".len()..];
    let (mut style, mut order) = (false, false);
    let words = value.split(|c: char| !c.is_ascii_alphanumeric() && c != '_');
    for (i, word) in words.filter(|w| !w.is_empty()).enumerate() {
        match word {
            "to" if i == 0 => {}
            "iso" | "sql" | "postgres" | "german" => style = true,
            "ymd" | "dmy" | "mdy" | "euro" | "european" | "us" | "noneuro" | "noneuropean" => {
                order = true
            }
            "default" => (style, order) = (true, true),
            _ => return None,
        }
    }
    Some((style, order))
}

/// Settings `RESET ALL` leaves alone (GUC_NO_RESET_ALL in PostgreSQL).
const NOT_RESET_BY_ALL: &[&str] = &["role", "session_authorization"];

impl Settings {
    /// From the startup packet's parameters, including `-c name=value` items of `options`.
    pub fn from_startup(params: &[(String, String)]) -> Self {
        let mut startup = Vec::new();
        for (k, v) in params {
            if k == "options" {
                startup.extend(
                    parse_options(v)
                        .into_iter()
                        .filter(|(k, _)| !AT_START_ONLY.iter().any(|a| a.eq_ignore_ascii_case(k))),
                );
            } else if AT_START_ONLY.iter().any(|a| a.eq_ignore_ascii_case(k)) {
                continue;
            } else if !NOT_SETTINGS.contains(&k.as_str()) && !k.starts_with("_pq_.") {
                startup.push((k.clone(), v.clone()));
            }
        }
        let mut s = Settings {
            startup,
            ..Default::default()
        };
        s.rehash();
        s
    }

    /// The fingerprint a server connection records once it carries these settings.
    /// Never 0, which marks a fresh connection.
    pub fn fingerprint(&self) -> u64 {
        self.hash
    }

    /// Whether the client set `key` (case-insensitively), at startup or with `SET`.
    pub fn has(&self, key: &str) -> bool {
        self.startup
            .iter()
            .chain(self.sets.iter())
            .any(|(k, _)| k.eq_ignore_ascii_case(key))
    }

    /// Record an effect seen in a statement the server is executing.
    pub fn stage(&mut self, e: Effect) {
        match e {
            Effect::Set { .. } | Effect::Reset { .. } | Effect::ResetAll | Effect::DiscardAll => {
                self.staged.push(e)
            }
            Effect::Savepoint(name) => self.savepoints.push((name, self.staged.len())),
            Effect::Release(name) => {
                if let Some(at) = self.savepoints.iter().rposition(|(n, _)| *n == name) {
                    self.savepoints.truncate(at);
                }
            }
            // The savepoint stays; what was staged after it is undone.
            Effect::RollbackTo(name) => {
                if let Some(at) = self.savepoints.iter().rposition(|(n, _)| *n == name) {
                    self.staged.truncate(self.savepoints[at].1);
                    self.savepoints.truncate(at + 1);
                }
            }
            _ => {}
        }
    }

    /// A COMMIT completed (possibly `AND CHAIN`, possibly followed by more statements in
    /// the same query string): what was staged is in effect. Returns true when the settings
    /// changed.
    pub fn commit(&mut self) -> bool {
        self.savepoints.clear();
        self.apply_staged()
    }

    /// The SQL that gives back the startup values a committed RESET removed, if any; the
    /// server connection does not carry these settings until it has run.
    pub fn take_restore_sql(&mut self) -> Option<String> {
        if self.restore.is_empty() {
            return None;
        }
        let keys = std::mem::take(&mut self.restore);
        let items: Vec<String> = self
            .startup
            .iter()
            .filter(|(k, _)| keys.iter().any(|r| r.eq_ignore_ascii_case(k)))
            .map(|(k, v)| {
                format!(
                    "pg_catalog.set_config({},{},false)",
                    quote_literal(k),
                    quote_literal(v)
                )
            })
            .collect();
        (!items.is_empty()).then(|| format!("SELECT {}", items.join(",")))
    }

    /// The server reached ReadyForQuery: keep staged effects if what ran is committed (idle
    /// and nothing failed or rolled back), drop them if it was undone, wait if still in a
    /// transaction. Returns true when the settings changed.
    pub fn settle(&mut self, status: u8, undone: bool) -> bool {
        if status != b'I' {
            return false;
        }
        self.savepoints.clear();
        if undone {
            self.staged.clear();
            return false;
        }
        self.apply_staged()
    }

    /// Drops the DateStyle SETs that no longer matter: walking from the newest, a SET is
    /// needed while it sets a part (style, order) that no newer one sets. Unreadable ones are
    /// kept (up to [`MAX_DATESTYLE_SETS`]).
    fn prune_datestyle_sets(&mut self) {
        let (mut style_set, mut order_set) = (false, false);
        let mut unreadable = 0;
        let mut drop = vec![false; self.sets.len()];
        for (i, (k, stmt)) in self.sets.iter().enumerate().rev() {
            if k != "datestyle" {
                continue;
            }
            match datestyle_parts(stmt) {
                Some((style, order)) => {
                    let sets_something_new = (style && !style_set) || (order && !order_set);
                    drop[i] = !sets_something_new;
                    style_set |= style;
                    order_set |= order;
                }
                None => {
                    unreadable += 1;
                    drop[i] = unreadable > MAX_DATESTYLE_SETS;
                }
            }
        }
        let mut i = 0;
        self.sets.retain(|_| {
            i += 1;
            !drop[i - 1]
        });
    }

    fn apply_staged(&mut self) -> bool {
        if self.staged.is_empty() {
            return false;
        }
        for e in std::mem::take(&mut self.staged) {
            match e {
                Effect::Set { key, stmt } => {
                    // SET SESSION AUTHORIZATION also resets the role.
                    if key == "session_authorization" {
                        self.sets.retain(|(k, _)| k != "role");
                    }
                    if key == "datestyle" {
                        // `SET DateStyle = 'DMY'` changes only the order, keeping the output
                        // format an earlier SET chose: replay them in order (a repeat of the
                        // same text moves to the end), all but those whose every part a later
                        // one sets again.
                        self.sets.retain(|(k, s)| *k != key || *s != stmt);
                        self.sets.push((key, stmt));
                        self.prune_datestyle_sets();
                    } else {
                        self.sets.retain(|(k, _)| *k != key);
                        self.sets.push((key, stmt));
                    }
                }
                Effect::Reset { key } => {
                    if key == "session_authorization" {
                        self.sets.retain(|(k, _)| k != "role");
                    }
                    self.sets.retain(|(k, _)| *k != key);
                    if self
                        .startup
                        .iter()
                        .any(|(k, _)| k.eq_ignore_ascii_case(&key))
                    {
                        self.restore.push(key);
                    }
                }
                Effect::ResetAll => {
                    self.sets
                        .retain(|(k, _)| NOT_RESET_BY_ALL.contains(&k.as_str()));
                    self.restore
                        .extend(self.startup.iter().map(|(k, _)| k.clone()));
                }
                Effect::DiscardAll => {
                    self.sets.clear();
                    self.restore
                        .extend(self.startup.iter().map(|(k, _)| k.clone()));
                }
                _ => {}
            }
        }
        self.rehash();
        true
    }

    /// The simple query that gives a server connection exactly these settings.
    pub fn apply_sql(&self) -> String {
        let mut sql = String::from("SET SESSION AUTHORIZATION DEFAULT;RESET ALL;");
        if !self.startup.is_empty() {
            sql.push_str("SELECT ");
            for (i, (k, v)) in self.startup.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "pg_catalog.set_config({},{},false)",
                    quote_literal(k),
                    quote_literal(v)
                ));
            }
            sql.push(';');
        }
        for (_, stmt) in &self.sets {
            sql.push_str(stmt);
            // A newline first: a statement may end in a `--` comment.
            sql.push_str("\n;");
        }
        sql
    }

    fn rehash(&mut self) {
        let mut h = Xxh3::new();
        for (k, v) in self.startup.iter().chain(self.sets.iter()) {
            h.update(k.as_bytes());
            h.update(&[0]);
            h.update(v.as_bytes());
            h.update(&[0]);
        }
        self.hash = h.digest().max(1);
    }
}

/// `options` holds command-line style switches: `-c name=value` or `--name=value`, with
/// backslash-escaped spaces.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let item = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("-c").map(str::to_string)
        };
        if let Some((k, v)) = item.as_deref().and_then(|i| i.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_string()));
        }
    }
    out
}

fn quote_literal(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        q.push('E');
    }
    q.push('\'');
    for c in s.chars() {
        match c {
            '\'' => q.push_str("''"),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push('\'');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn startup_options_become_settings() {
        let s = Settings::from_startup(&p(&[
            ("user", "u"),
            ("application_name", "psql"),
            ("options", "-c search_path=a,b --statement-timeout=5s"),
        ]));
        let sql = s.apply_sql();
        assert!(sql.contains("set_config('application_name','psql',false)"));
        assert!(sql.contains("set_config('search_path','a,b',false)"));
        assert!(sql.contains("set_config('statement_timeout','5s',false)"));
        assert!(!sql.contains("'user'"));
    }

    #[test]
    fn committed_set_changes_fingerprint_and_rollback_does_not() {
        let mut s = Settings::from_startup(&p(&[("application_name", "x")]));
        let before = s.fingerprint();
        s.stage(Effect::Set {
            key: "timezone".into(),
            stmt: "SET TimeZone = 'UTC'".into(),
        });
        assert!(!s.settle(b'T', false));
        assert!(!s.settle(b'I', true));
        assert_eq!(s.fingerprint(), before);
        s.stage(Effect::Set {
            key: "timezone".into(),
            stmt: "SET TimeZone = 'UTC'".into(),
        });
        assert!(s.settle(b'I', false));
        assert_ne!(s.fingerprint(), before);
        assert!(s.apply_sql().ends_with("SET TimeZone = 'UTC'\n;"));
        s.stage(Effect::Reset {
            key: "timezone".into(),
        });
        s.settle(b'I', false);
        assert_eq!(s.fingerprint(), before);
    }

    #[test]
    fn literals_are_quoted_safely() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
    }

    fn set(key: &str, stmt: &str) -> Effect {
        Effect::Set {
            key: key.into(),
            stmt: stmt.into(),
        }
    }

    #[test]
    fn reset_all_keeps_the_role_and_session_authorization_drops_it() {
        let mut s = Settings::from_startup(&[]);
        let plain = s.fingerprint();
        s.stage(set("role", "SET ROLE alice"));
        s.stage(set("search_path", "SET search_path = s2"));
        s.stage(Effect::ResetAll);
        assert!(s.settle(b'I', false));
        assert_eq!(
            s.apply_sql(),
            "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;SET ROLE alice\n;"
        );
        s.stage(Effect::Reset {
            key: "session_authorization".into(),
        });
        s.settle(b'I', false);
        assert_eq!(s.fingerprint(), plain);
        s.stage(set("role", "SET ROLE alice"));
        s.stage(Effect::DiscardAll);
        s.settle(b'I', false);
        assert_eq!(s.fingerprint(), plain);
    }

    #[test]
    fn rollback_to_savepoint_undoes_only_what_came_after_it() {
        let mut s = Settings::from_startup(&[]);
        s.stage(set("role", "SET ROLE alice"));
        s.stage(Effect::Savepoint("a".into()));
        s.stage(set("search_path", "SET search_path = s2"));
        s.stage(Effect::RollbackTo("a".into()));
        s.stage(set("timezone", "SET TimeZone = 'UTC'"));
        s.stage(Effect::Release("a".into()));
        // An error inside the savepoint made the server say ROLLBACK once; COMMIT decides.
        assert!(s.commit());
        assert_eq!(
            s.apply_sql(),
            "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;SET ROLE alice\n;SET TimeZone = 'UTC'\n;"
        );
        assert!(
            !s.settle(b'I', true),
            "a later rolled-back transaction changes nothing"
        );
        assert!(s.apply_sql().contains("SET ROLE alice"));
    }

    #[test]
    fn resetting_a_startup_parameter_asks_for_its_startup_value_back() {
        let mut s = Settings::from_startup(&p(&[
            ("options", "-c search_path=s2"),
            ("application_name", "app"),
        ]));
        let fp = s.fingerprint();
        s.stage(Effect::Reset {
            key: "search_path".into(),
        });
        s.settle(b'I', false);
        assert_eq!(s.fingerprint(), fp);
        assert_eq!(
            s.take_restore_sql().as_deref(),
            Some("SELECT pg_catalog.set_config('search_path','s2',false)")
        );
        assert_eq!(s.take_restore_sql(), None);
        s.stage(Effect::Reset {
            key: "work_mem".into(),
        });
        s.settle(b'I', false);
        assert_eq!(s.take_restore_sql(), None);
        s.stage(Effect::DiscardAll);
        s.settle(b'I', false);
        let sql = s.take_restore_sql().expect("restore");
        assert!(sql.contains("'search_path','s2'") && sql.contains("'application_name','app'"));
    }

    #[test]
    fn replayed_sets_survive_trailing_comments_and_partial_datestyles() {
        let mut s = Settings::from_startup(&[]);
        s.stage(set("search_path", "SET search_path TO public -- app init"));
        s.stage(set("timezone", "SET TimeZone = 'Asia/Tokyo'"));
        s.stage(set("datestyle", "SET DateStyle = 'SQL'"));
        s.stage(set("datestyle", "SET DateStyle = 'DMY'"));
        s.settle(b'I', false);
        let sql = s.apply_sql();
        assert!(
            sql.contains("-- app init\n;SET TimeZone = 'Asia/Tokyo'\n;"),
            "{sql}"
        );
        assert!(
            sql.ends_with("SET DateStyle = 'SQL'\n;SET DateStyle = 'DMY'\n;"),
            "{sql}"
        );
        let only_dmy = {
            let mut o = Settings::from_startup(&[]);
            o.stage(set("search_path", "SET search_path TO public -- app init"));
            o.stage(set("timezone", "SET TimeZone = 'Asia/Tokyo'"));
            o.stage(set("datestyle", "SET DateStyle = 'DMY'"));
            o.settle(b'I', false);
            o.fingerprint()
        };
        assert_ne!(s.fingerprint(), only_dmy);
    }

    #[test]
    fn a_datestyle_style_survives_any_number_of_later_order_only_sets() {
        let mut s = Settings::from_startup(&[]);
        s.stage(set("datestyle", "SET DateStyle = 'German'"));
        for order in [
            "MDY",
            "YMD",
            "US",
            "NonEuropean",
            "Euro",
            "European",
            "ymd",
            "DMY",
            "MDY",
        ] {
            s.stage(set("datestyle", &format!("SET DateStyle = '{order}'")));
        }
        s.settle(b'I', false);
        assert!(
            s.apply_sql()
                .ends_with(";RESET ALL;SET DateStyle = 'German'\n;SET DateStyle = 'MDY'\n;"),
            "{}",
            s.apply_sql()
        );
        // A SET of both parts makes every earlier one moot.
        s.stage(set("datestyle", "SET datestyle TO iso, dmy"));
        s.settle(b'I', false);
        assert!(
            s.apply_sql()
                .ends_with(";RESET ALL;SET datestyle TO iso, dmy\n;"),
            "{}",
            s.apply_sql()
        );
        assert_eq!(
            datestyle_parts("SET DateStyle = 'Postgres'"),
            Some((true, false))
        );
        assert_eq!(
            datestyle_parts("SET DateStyle TO DEFAULT"),
            Some((true, true))
        );
        assert_eq!(datestyle_parts("SET DateStyle = 'ISO, bogus'"), None);
    }

    #[test]
    fn session_start_only_settings_are_left_out() {
        let s = Settings::from_startup(&p(&[
            ("options", "-c log_disconnections=on -c search_path=a"),
            ("log_connections", "on"),
        ]));
        let sql = s.apply_sql();
        assert!(!sql.contains("log_"), "{sql}");
        assert!(sql.contains("'search_path','a'"));
    }
}
