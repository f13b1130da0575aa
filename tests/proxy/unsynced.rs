//! Messages a client sent without a Sync yet (`Parse Bind Execute Flush`) leave the server
//! mid-batch: an implicit transaction open, SETs not settled, or an error skipping to the
//! next Sync. A cached answer must never take that Sync's place.

use crate::fixture::{Proxy, fresh_database};
use crate::support::{PgCluster, shared_pg};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A client that writes protocol messages by hand.
struct Wire {
    s: Box<dyn Stream>,
    buf: Vec<u8>,
}

impl Wire {
    fn connect(proxy: &Proxy, db: &str) -> Wire {
        let s = TcpStream::connect(proxy.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Wire::start(Box::new(s), db)
    }

    /// Straight to Postgres (its Unix socket trusts the superuser), to compare with.
    fn connect_postgres(pg: &PgCluster, db: &str) -> Wire {
        let path = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port));
        let s = UnixStream::connect(&path).expect("connect to postgres");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Wire::start(Box::new(s), db)
    }

    fn start(s: Box<dyn Stream>, db: &str) -> Wire {
        let mut w = Wire { s, buf: Vec::new() };
        let params = format!("user\0postgres\0database\0{db}\0\0");
        let mut p = ((params.len() + 8) as i32).to_be_bytes().to_vec();
        p.extend_from_slice(&0x0003_0000i32.to_be_bytes());
        p.extend_from_slice(params.as_bytes());
        w.s.write_all(&p).expect("startup");
        w.until_ready();
        w
    }

    fn send(&mut self, tag: u8, body: &[u8]) {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        self.s.write_all(&m).expect("write");
    }

    fn parse(&mut self, sql: &str) {
        self.send(b'P', format!("\0{sql}\0\0\0").as_bytes());
    }

    /// Bind of the unnamed statement to the unnamed portal, text parameters.
    fn bind(&mut self, params: &[&str]) {
        let mut b = b"\0\0\0\0".to_vec();
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        self.send(b'B', &b);
    }

    fn describe_portal(&mut self) {
        self.send(b'D', b"P\0");
    }

    fn execute(&mut self) {
        self.send(b'E', b"\0\0\0\0\0");
    }

    /// The next message: tag and body.
    fn next(&mut self) -> (u8, Vec<u8>) {
        self.next_or_end().expect("connection closed")
    }

    /// The next message, or `None` once the other side closed the connection.
    fn next_or_end(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if self.buf.len() > len {
                    let msg: Vec<u8> = self.buf.drain(..len + 1).collect();
                    return Some((msg[0], msg[5..].to_vec()));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .s
                .read(&mut chunk)
                .expect("an answer within 10 s (none: the server is still waiting for a Sync)");
            if n == 0 {
                assert!(self.buf.is_empty(), "connection closed mid-message");
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Terminate, and the transcript of everything sent before the connection closed.
    fn terminate(&mut self) -> String {
        self.send(b'X', b"");
        let mut out = Vec::new();
        while let Some((tag, body)) = self.next_or_end() {
            out.push(short(tag, &body));
        }
        out.join(" ")
    }

    /// Tags up to and including the next ReadyForQuery.
    fn until_ready(&mut self) -> Vec<u8> {
        let mut tags = Vec::new();
        loop {
            let (tag, _) = self.next();
            tags.push(tag);
            if tag == b'Z' {
                return tags;
            }
        }
    }

    /// Everything up to and including the next ReadyForQuery, in short: tags, with the
    /// SQLSTATE of errors (`E[26000]`), the first column of rows (`D[v7]`) and command
    /// tags (`C[SELECT 1]`).
    fn transcript(&mut self) -> String {
        self.read_until(|_, tag| tag == b'Z')
    }

    /// The next `n` messages, as [`Wire::transcript`] writes them (after a Flush, which
    /// ends with no ReadyForQuery).
    fn take(&mut self, n: usize) -> String {
        self.read_until(|seen, _| seen == n)
    }

    fn read_until(&mut self, done: impl Fn(usize, u8) -> bool) -> String {
        let mut out = Vec::new();
        loop {
            let (tag, body) = self.next();
            out.push(short(tag, &body));
            if done(out.len(), tag) {
                return out.join(" ");
            }
        }
    }

    /// Sync, and the transcript of everything up to its ReadyForQuery.
    fn sync(&mut self) -> String {
        self.send(b'S', b"");
        self.transcript()
    }

    /// A simple Query, and its transcript.
    fn query(&mut self, sql: &str) -> String {
        self.send(b'Q', format!("{sql}\0").as_bytes());
        self.transcript()
    }

    /// Flush, and the next `n` messages.
    fn flush(&mut self, n: usize) -> String {
        self.send(b'H', b"");
        self.take(n)
    }

    /// Bind of statement `stmt` to the unnamed portal, no parameters.
    fn bind_statement(&mut self, stmt: &str) {
        self.send(b'B', format!("\0{stmt}\0\0\0\0\0\0\0").as_bytes());
    }

    /// Tags up to and including the first with tag `last`.
    fn until(&mut self, last: u8) -> Vec<u8> {
        let mut tags = Vec::new();
        loop {
            let (tag, _) = self.next();
            tags.push(tag);
            if tag == last {
                return tags;
            }
        }
    }

    /// `sql` as `Parse Bind Execute Flush`: sent, no Sync.
    fn unsynced(&mut self, sql: &str) {
        self.parse(sql);
        self.bind(&[]);
        self.execute();
        self.send(b'H', b"");
    }

    /// `SELECT v FROM t WHERE id = 7` as `Parse Bind Execute Sync`: the values of its rows.
    fn read_v7(&mut self) -> Vec<String> {
        self.parse("SELECT v FROM t WHERE id = $1");
        self.bind(&["7"]);
        self.execute();
        self.send(b'S', b"");
        let mut rows = Vec::new();
        loop {
            let (tag, body) = self.next();
            if tag == b'D' {
                // Column count (2 bytes), first column's length (4), its text.
                rows.push(String::from_utf8_lossy(&body[6..]).into_owned());
            }
            if tag == b'Z' {
                return rows;
            }
        }
    }

    /// The cacheable batch: `Parse Bind Describe Execute Sync`.
    fn cached_read(&mut self) -> Vec<u8> {
        self.parse("SELECT v FROM t WHERE id = $1");
        self.bind(&["7"]);
        self.describe_portal();
        self.execute();
        self.send(b'S', b"");
        self.until_ready()
    }
}

/// A message in a transcript: its tag, with the SQLSTATE of an error (`E[26000]`), the
/// first column of a row (`D[v7]`), the tag of a CommandComplete (`C[SELECT 1]`).
fn short(tag: u8, body: &[u8]) -> String {
    match tag {
        b'E' => {
            let code = body
                .split(|b| *b == 0)
                .find_map(|f| f.strip_prefix(b"C"))
                .unwrap_or(b"?");
            format!("E[{}]", String::from_utf8_lossy(code))
        }
        b'D' => format!("D[{}]", String::from_utf8_lossy(&body[6..])),
        b'C' => format!("C[{}]", String::from_utf8_lossy(&body[..body.len() - 1])),
        other => char::from(other).to_string(),
    }
}

fn setup() -> (Proxy, String) {
    let pg = shared_pg();
    let db = fresh_database(pg, "unsynced");
    pg.psql_db(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g;
         CREATE TABLE w (id int);",
    );
    let proxy = Proxy::start(pg, |c| c.pool.max_size = 2);
    (proxy, db)
}

fn warm(proxy: &Proxy, db: &str) {
    let mut w = Wire::connect(proxy, db);
    for _ in 0..3 {
        assert_eq!(w.cached_read(), b"12TDCZ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_read_does_not_swallow_the_sync_that_commits_an_unsynced_write() {
    let (proxy, db) = setup();
    warm(&proxy, &db);
    let mut w = Wire::connect(&proxy, &db);
    w.unsynced("INSERT INTO w VALUES (1)");
    assert_eq!(w.until(b'C'), b"12C");
    // The cached read's Sync ends the implicit transaction the INSERT runs in.
    assert_eq!(w.cached_read(), b"12TDCZ");
    let direct = shared_pg().client(&db).await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM w", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1, "the INSERT is committed once its batch was synced");
    w.send(b'Q', b"SELECT 42\0");
    assert_eq!(w.until_ready(), b"TDCZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_unsynced_error_a_cached_read_is_skipped_like_postgres_skips_it() {
    let (proxy, db) = setup();
    warm(&proxy, &db);
    let mut w = Wire::connect(&proxy, &db);
    w.unsynced("SELECT 1/0");
    // 1/0 is folded when the statement is planned, at Bind.
    assert_eq!(w.until(b'E'), b"1E");
    // Postgres ignores everything up to the Sync after an error: only ReadyForQuery.
    assert_eq!(w.cached_read(), b"Z");
    w.send(b'Q', b"SELECT 42\0");
    assert_eq!(w.until_ready(), b"TDCZ");
    assert_eq!(w.cached_read(), b"12TDCZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsynced_set_is_settled_before_a_read_is_answered_or_cached() {
    let pg = shared_pg();
    let (proxy, db) = setup();
    pg.psql_db(
        &db,
        "CREATE SCHEMA sb; CREATE TABLE sb.t (id int PRIMARY KEY, v text);
         INSERT INTO sb.t VALUES (7, 'from sb');",
    );
    warm(&proxy, &db);
    let mut w = Wire::connect(&proxy, &db);
    w.unsynced("SET search_path = sb");
    assert_eq!(w.until(b'C'), b"12C");
    for _ in 0..3 {
        assert_eq!(w.read_v7(), ["from sb"], "read under search_path sb");
    }
    // Nothing read under sb went in under the default search_path.
    let mut other = Wire::connect(&proxy, &db);
    assert_eq!(other.cached_read(), b"12TDCZ");
    assert_eq!(other.read_v7(), ["v7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_ends_where_postgres_ends_it() {
    let (proxy, db) = setup();
    warm(&proxy, &db);
    let mut w = Wire::connect(&proxy, &db);
    let bind_execute = |w: &mut Wire| {
        w.bind(&["7"]);
        w.execute();
        w.send(b'S', b"");
        w.until_ready()
    };
    // A simple Query destroys it: the Bind fails (26000) and skips to the Sync.
    w.parse("SELECT v FROM t WHERE id = $1");
    w.send(b'S', b"");
    assert_eq!(w.until_ready(), b"1Z");
    w.send(b'Q', b"SELECT 42\0");
    assert_eq!(w.until_ready(), b"TDCZ");
    assert_eq!(bind_execute(&mut w), b"EZ");
    // So does a Query answered from the cache.
    w.parse("SELECT v FROM t WHERE id = $1");
    w.send(b'S', b"");
    assert_eq!(w.until_ready(), b"1Z");
    for _ in 0..3 {
        w.send(b'Q', b"SELECT v FROM t WHERE id = 3\0");
        assert_eq!(w.until_ready(), b"TDCZ");
    }
    assert_eq!(bind_execute(&mut w), b"EZ");
    // And Close of it, even though the server keeps its copy until the next Parse.
    w.parse("SELECT v FROM t WHERE id = $1");
    w.send(b'S', b"");
    assert_eq!(w.until_ready(), b"1Z");
    w.send(b'C', b"S\0");
    w.send(b'S', b"");
    assert_eq!(w.until_ready(), b"3Z");
    assert_eq!(bind_execute(&mut w), b"EZ");
    // Parsed again, it works.
    w.parse("SELECT v FROM t WHERE id = $1");
    assert_eq!(bind_execute(&mut w), b"12DCZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_cached_answer_in_a_transaction_the_unnamed_portal_is_the_one_postgres_has() {
    let (proxy, db) = setup();
    let run = |w: &mut Wire| {
        let mut seen = Vec::new();
        seen.push(w.query("BEGIN"));
        // An unnamed portal of this transaction, on the server, not executed yet.
        w.parse("SELECT 77");
        w.bind(&[]);
        seen.push(w.sync());
        // Answered from the cache: in Postgres this Bind replaced that portal, and the
        // portal ran to completion.
        w.parse("SELECT v FROM t WHERE id = $1");
        w.bind(&["7"]);
        w.describe_portal();
        w.execute();
        seen.push(w.sync());
        // Executed again (with or without a row limit) it gives no rows; described, the
        // same columns. Never 77.
        w.execute();
        seen.push(w.sync());
        w.send(b'E', b"\0\0\0\0\x01");
        w.describe_portal();
        seen.push(w.sync());
        // Closed, it is gone (an error, which ends the transaction).
        w.send(b'C', b"P\0");
        w.execute();
        seen.push(w.sync());
        seen.push(w.query("ROLLBACK"));
        // A simple Query answered from the cache destroys the unnamed portal.
        seen.push(w.query("BEGIN"));
        w.parse("SELECT 78");
        w.bind(&[]);
        seen.push(w.sync());
        seen.push(w.query("SELECT v FROM t WHERE id = 3"));
        w.execute();
        seen.push(w.sync());
        seen.push(w.query("ROLLBACK"));
        seen
    };
    let postgres = run(&mut Wire::connect_postgres(shared_pg(), &db));
    // Through pgstash both reads are answered from the cache: warmed, then changed behind
    // pgstash's back (source = "proxy" does not hear of it), they still show what
    // Postgres showed above.
    warm(&proxy, &db);
    for _ in 0..3 {
        let mut w = Wire::connect(&proxy, &db);
        w.send(b'Q', b"SELECT v FROM t WHERE id = 3\0");
        w.until_ready();
    }
    shared_pg().psql_db(&db, "UPDATE t SET v = 'changed' WHERE id IN (3, 7)");
    let through_pgstash = run(&mut Wire::connect(&proxy, &db));
    assert_eq!(
        postgres,
        [
            "C[BEGIN] Z",
            "1 2 Z",
            "1 2 T D[v7] C[SELECT 1] Z",
            "C[SELECT 0] Z",
            "C[SELECT 0] T Z",
            "3 E[34000] Z",
            "C[ROLLBACK] Z",
            "C[BEGIN] Z",
            "1 2 Z",
            "T D[v3] C[SELECT 1] Z",
            "E[34000] Z",
            "C[ROLLBACK] Z",
        ],
        "what Postgres does changed: this test's premise is wrong"
    );
    assert_eq!(through_pgstash, postgres);
}

/// The unnamed statement after a Parse of it that did not take effect, as Postgres leaves
/// it: gone after a Parse that failed (Postgres drops it before parsing), unchanged after
/// one skipped because an earlier message of its batch failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_of_the_unnamed_statement_that_fails_or_is_skipped_leaves_it_as_postgres_does() {
    let (proxy, db) = setup();
    let run = |w: &mut Wire| {
        let mut seen = Vec::new();
        // A Parse that fails: the statement before it is gone too.
        w.parse("SELECT v FROM t WHERE id = 7");
        seen.push(w.sync());
        w.parse("SELECT v FROM no_such_table");
        seen.push(w.sync());
        w.bind(&[]);
        w.execute();
        seen.push(w.sync());
        // A Parse skipped after a failed Bind (of a statement that does not exist): the
        // statement before it stands.
        w.parse("SELECT v FROM t WHERE id = 8");
        seen.push(w.sync());
        w.send(b'B', b"\0nope\0\0\0\0\0\0\0");
        w.parse("SELECT v FROM t WHERE id = 9");
        seen.push(w.sync());
        w.bind(&[]);
        w.execute();
        seen.push(w.sync());
        // Both in one batch: the first fails, the second is skipped; none is left.
        w.parse("SELECT v FROM no_such_table");
        w.parse("SELECT v FROM t WHERE id = 9");
        seen.push(w.sync());
        w.bind(&[]);
        w.execute();
        seen.push(w.sync());
        seen
    };
    let through_pgstash = run(&mut Wire::connect(&proxy, &db));
    let postgres = run(&mut Wire::connect_postgres(shared_pg(), &db));
    assert_eq!(
        postgres,
        [
            "1 Z",
            "E[42P01] Z",
            "E[26000] Z",
            "1 Z",
            "E[26000] Z",
            "2 D[v8] C[SELECT 1] Z",
            "E[42P01] Z",
            "E[26000] Z",
        ],
        "what Postgres does changed: this test's premise is wrong"
    );
    assert_eq!(through_pgstash, postgres);
}

/// After an error, Postgres ignores every message up to the client's next Sync. When the
/// error came after a Flush (no Sync in flight), pgstash must ignore them too: no answers
/// of its own (a ParseComplete for a statement the server already has, the unnamed
/// portal's SELECT 0), no statement taken as made, and no answer waited for that will never
/// come (which hung the client and swallowed later answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_error_delivered_by_a_flush_pgstash_ignores_what_postgres_ignores() {
    let (proxy, db) = setup();
    let q = "SELECT v FROM t WHERE id = 4";
    let run = |w: &mut Wire| {
        let mut seen = Vec::new();
        // A named Parse of a text the server already has, while Postgres skips it.
        w.send(b'P', format!("s1\0{q}\0\0\0").as_bytes());
        seen.push(w.sync());
        w.bind_statement("nosuch");
        seen.push(w.flush(1));
        w.send(b'P', format!("s2\0{q}\0\0\0").as_bytes());
        seen.push(w.sync());
        w.bind_statement("s2");
        w.execute();
        seen.push(w.sync());
        // The unnamed statement, which pgstash knows is absent, while Postgres skips: then
        // a Sync, another, and a Query, each answered.
        w.bind_statement("nosuch");
        seen.push(w.flush(1));
        w.bind_statement("");
        seen.push(w.sync());
        seen.push(w.sync());
        w.send(b'Q', b"SELECT 1\0");
        seen.push(w.transcript());
        // A Query sent while Postgres skips is ignored too.
        w.bind_statement("nosuch");
        seen.push(w.flush(1));
        w.send(b'Q', b"SELECT 2\0");
        seen.push(w.sync());
        seen
    };
    let postgres = run(&mut Wire::connect_postgres(shared_pg(), &db));
    assert_eq!(
        postgres,
        [
            "1 Z",
            "E[26000]",
            "Z",
            "E[26000] Z",
            "E[26000]",
            "Z",
            "Z",
            "T D[1] C[SELECT 1] Z",
            "E[26000]",
            "Z",
        ],
        "what Postgres does changed: this test's premise is wrong"
    );
    assert_eq!(run(&mut Wire::connect(&proxy, &db)), postgres);
}

/// After a batch answered from the cache in a transaction, Postgres answers for the
/// finished portal only while the transaction is healthy and nothing is skipped: in an
/// aborted transaction it is an error (25P02), and while skipping to a Sync nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finished_portal_of_a_cached_batch_is_not_answered_in_an_aborted_transaction() {
    let (proxy, db) = setup();
    let run = |w: &mut Wire| {
        let mut seen = Vec::new();
        seen.push(w.query("BEGIN"));
        seen.push(String::from_utf8_lossy(&w.cached_read()).into_owned());
        // An error aborts the transaction.
        w.parse("selec oops");
        seen.push(w.sync());
        w.execute();
        seen.push(w.sync());
        w.describe_portal();
        seen.push(w.sync());
        seen.push(w.query("ROLLBACK"));
        // An error after a Flush: the Execute after it is skipped.
        seen.push(w.query("BEGIN"));
        seen.push(String::from_utf8_lossy(&w.cached_read()).into_owned());
        w.parse("selec oops");
        w.send(b'H', b"");
        seen.push(w.take(1));
        w.execute();
        seen.push(w.sync());
        seen.push(w.query("ROLLBACK"));
        seen
    };
    let postgres = run(&mut Wire::connect_postgres(shared_pg(), &db));
    // Through pgstash the reads are answered from the cache (warmed, then changed behind
    // pgstash's back: they still show what Postgres showed above).
    warm(&proxy, &db);
    shared_pg().psql_db(&db, "UPDATE t SET v = 'changed' WHERE id = 7");
    let through_pgstash = run(&mut Wire::connect(&proxy, &db));
    assert_eq!(
        postgres,
        [
            "C[BEGIN] Z",
            "12TDCZ",
            "E[42601] Z",
            "E[25P02] Z",
            "E[25P02] Z",
            "C[ROLLBACK] Z",
            "C[BEGIN] Z",
            "12TDCZ",
            "E[42601]",
            "Z",
            "C[ROLLBACK] Z",
        ],
        "what Postgres does changed: this test's premise is wrong"
    );
    assert_eq!(through_pgstash, postgres);
}

/// COPY FROM STDIN through the extended protocol, with everything pipelined: Syncs sent
/// during the copy are ignored by Postgres, the one after CopyDone or CopyFail is not, and
/// the answers after it (a Query's included) all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_after_a_pipelined_copy_end_count_and_nothing_after_them_is_lost() {
    let (proxy, db) = setup();
    let run = |w: &mut Wire| {
        let mut seen = Vec::new();
        let copy = |w: &mut Wire| {
            w.parse("COPY w FROM STDIN");
            w.bind(&[]);
            w.execute();
        };
        // Failed with CopyFail after a Flush, then a Query.
        copy(w);
        w.send(b'H', b"");
        w.send(b'f', b"no thanks\0");
        w.send(b'S', b"");
        w.send(b'Q', b"SELECT 'a'\0");
        seen.push(w.transcript());
        seen.push(w.transcript());
        // Done after a Flush, then a Query that writes.
        copy(w);
        w.send(b'H', b"");
        w.send(b'd', b"5\n");
        w.send(b'c', b"");
        w.send(b'S', b"");
        w.send(b'Q', b"INSERT INTO w VALUES (6)\0");
        seen.push(w.transcript());
        seen.push(w.transcript());
        // A Sync during the copy is ignored; the one after CopyDone answers.
        copy(w);
        w.send(b'S', b"");
        w.send(b'd', b"7\n");
        w.send(b'c', b"");
        w.send(b'S', b"");
        w.send(b'Q', b"SELECT count(*) FROM w\0");
        seen.push(w.transcript());
        seen.push(w.transcript());
        w.send(b'Q', b"DELETE FROM w\0");
        seen.push(w.transcript());
        seen
    };
    let postgres = run(&mut Wire::connect_postgres(shared_pg(), &db));
    assert_eq!(
        postgres,
        [
            "1 2 G E[57014] Z",
            "T D[a] C[SELECT 1] Z",
            "1 2 G C[COPY 1] Z",
            "C[INSERT 0 1] Z",
            "1 2 G C[COPY 1] Z",
            "T D[3] C[SELECT 1] Z",
            "C[DELETE 3] Z",
        ],
        "what Postgres does changed: this test's premise is wrong"
    );
    assert_eq!(run(&mut Wire::connect(&proxy, &db)), postgres);
}

/// Two Executes of the finished portal of a cached batch, each with its Sync, pipelined:
/// the Sync in flight between them changes nothing, and both give no rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finished_portal_answers_every_pipelined_execute() {
    let (proxy, db) = setup();
    let run = |w: &mut Wire| {
        let mut seen = Vec::new();
        w.send(b'Q', b"BEGIN\0");
        seen.push(w.transcript());
        seen.push(String::from_utf8_lossy(&w.cached_read()).into_owned());
        for _ in 0..2 {
            w.execute();
            w.send(b'S', b"");
        }
        seen.push(w.transcript());
        seen.push(w.transcript());
        w.send(b'Q', b"ROLLBACK\0");
        seen.push(w.transcript());
        seen
    };
    let postgres = run(&mut Wire::connect_postgres(shared_pg(), &db));
    warm(&proxy, &db);
    shared_pg().psql_db(&db, "UPDATE t SET v = 'changed' WHERE id = 7");
    assert_eq!(
        postgres,
        [
            "C[BEGIN] Z",
            "12TDCZ",
            "C[SELECT 0] Z",
            "C[SELECT 0] Z",
            "C[ROLLBACK] Z"
        ],
        "what Postgres does changed: this test's premise is wrong"
    );
    assert_eq!(run(&mut Wire::connect(&proxy, &db)), postgres);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_right_behind_requests_gets_their_answers_first_like_postgres() {
    let (proxy, db) = setup();
    warm(&proxy, &db);
    let pg = shared_pg();
    let written = || pg.psql_db(&db, "SELECT count(*) FROM w").trim().to_string();
    let mut transcripts = Vec::new();
    for (i, to_postgres) in [false, true].into_iter().enumerate() {
        let open = || match to_postgres {
            true => Wire::connect_postgres(pg, &db),
            false => Wire::connect(&proxy, &db),
        };
        let mut got = Vec::new();
        // A multi-statement Query still running when Terminate arrives: answered in full,
        // its write committed.
        let mut w = open();
        w.send(
            b'Q',
            b"SELECT pg_sleep(0.2); INSERT INTO w VALUES (1); SELECT v FROM t WHERE id = 7\0",
        );
        got.push(w.terminate());
        assert_eq!(
            written(),
            (i + 1).to_string(),
            "the Query's write committed"
        );
        // A cached batch, then one that waits on the server, then Terminate.
        let mut w = open();
        w.parse("SELECT v FROM t WHERE id = $1");
        w.bind(&["7"]);
        w.describe_portal();
        w.execute();
        w.send(b'S', b"");
        w.parse("SELECT pg_sleep(0.2)");
        w.bind(&[]);
        w.execute();
        w.send(b'S', b"");
        got.push(w.terminate());
        // A write delivered by a Flush, no Sync: its answers, and nothing committed.
        let mut w = open();
        w.unsynced("INSERT INTO w VALUES (2)");
        got.push(w.terminate());
        // The same without the Flush: the server owes nothing.
        let mut w = open();
        w.parse("INSERT INTO w VALUES (3)");
        w.bind(&[]);
        w.execute();
        got.push(w.terminate());
        assert_eq!(
            written(),
            (i + 1).to_string(),
            "unsynced writes never commit"
        );
        transcripts.push(got);
    }
    assert_eq!(transcripts[0], transcripts[1], "pgstash, then Postgres");
    assert_eq!(
        transcripts[0][0],
        "T D[] C[SELECT 1] C[INSERT 0 1] T D[v7] C[SELECT 1] Z"
    );
}
