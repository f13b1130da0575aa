//! The order of responses. Every message sent to the server that will be answered is recorded
//! here, with the answers pgstash makes itself (a ParseComplete for a statement the server
//! already has) in between, so the client receives exactly the sequence Postgres would send.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

/// What a forwarded message will be answered with, or rather: which message ends its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Simple Query or FunctionCall: ends with ReadyForQuery.
    Query,
    Sync,
    /// `hash`/`client_name` let a failed Parse be forgotten on both sides.
    /// `client_unnamed`: the client's own Parse of its unnamed statement, not a copy
    /// pgstash sent to make a server connection hold the client's statement.
    Parse {
        hash: Option<u64>,
        client_name: Option<Bytes>,
        client_unnamed: bool,
    },
    Bind,
    Describe,
    Execute,
    Close,
}

impl Expect {
    fn ends_with(&self, tag: u8) -> bool {
        match self {
            Expect::Query | Expect::Sync => tag == b'Z',
            Expect::Parse { .. } => tag == b'1',
            Expect::Bind => tag == b'2',
            Expect::Describe => tag == b'T' || tag == b'n',
            Expect::Execute => matches!(tag, b'C' | b'I' | b's'),
            Expect::Close => tag == b'3',
        }
    }

    /// An error in these ends the message's answer and makes the server skip to Sync.
    fn is_extended(&self) -> bool {
        !matches!(self, Expect::Query | Expect::Sync)
    }
}

#[derive(Debug)]
enum Entry {
    Server {
        expect: Expect,
        swallow: bool,
    },
    Synthetic(Bytes),
    /// Where the client's CopyDone or CopyFail went out: no answer of its own, but Syncs
    /// after it are real ones (see [`Expectations::drop_queued_syncs`]).
    CopyEnd,
}

/// A Parse that never took effect on the server (it failed, or was skipped after an error).
#[derive(Debug, PartialEq, Eq)]
pub struct FailedParse {
    pub hash: Option<u64>,
    pub client_name: Option<Bytes>,
    pub client_unnamed: bool,
    /// It failed itself; otherwise it was skipped, after an earlier message failed.
    pub erred: bool,
}

#[derive(Debug, Default)]
pub struct Expectations {
    queue: VecDeque<Entry>,
    /// An error made the server skip messages up to a Sync that has not been sent yet (the
    /// error came after a Flush): it will ignore whatever the client sends until its next
    /// Sync. See [`Expectations::take_server_skipping`].
    server_skipping: bool,
}

impl Expectations {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// A forwarded message; `swallow` hides its answer (for messages pgstash injected).
    pub fn push(&mut self, expect: Expect, swallow: bool) {
        self.queue.push_back(Entry::Server { expect, swallow });
    }

    /// An answer made by pgstash; goes out as soon as everything before it has.
    pub fn push_synthetic(&mut self, msg: Bytes, out: &mut BytesMut) {
        self.queue.push_back(Entry::Synthetic(msg));
        self.flush_synthetic(out);
    }

    /// Whether an error since the last call left the server skipping messages until the
    /// client's next Sync (no Sync was in flight to end the skip).
    pub fn take_server_skipping(&mut self) -> bool {
        std::mem::take(&mut self.server_skipping)
    }

    pub fn head(&self) -> Option<&Expect> {
        match self.queue.front() {
            Some(Entry::Server { expect, .. }) => Some(expect),
            _ => None,
        }
    }

    /// The client ended COPY FROM STDIN (CopyDone or CopyFail) here.
    pub fn push_copy_end(&mut self, out: &mut BytesMut) {
        self.queue.push_back(Entry::CopyEnd);
        self.flush_synthetic(out);
    }

    /// In extended-protocol COPY FROM STDIN the server ignores Syncs sent before CopyDone
    /// (or CopyFail); the ones after it count.
    pub fn drop_queued_syncs(&mut self) {
        let mut in_copy = true;
        self.queue.retain(|e| match e {
            Entry::CopyEnd => {
                in_copy = false;
                true
            }
            Entry::Server {
                expect: Expect::Sync,
                ..
            } => !in_copy,
            _ => true,
        });
    }

    /// Whether every answer still due is a Sync's (or pgstash's own): Syncs that cannot
    /// change the transaction's state, which the last ReadyForQuery then still tells.
    pub fn only_syncs_pending(&self) -> bool {
        self.queue.iter().all(|e| {
            matches!(
                e,
                Entry::Server {
                    expect: Expect::Sync,
                    ..
                } | Entry::Synthetic(_)
                    | Entry::CopyEnd
            )
        })
    }

    /// Route one server message: append what the client must see to `out`, and report Parses
    /// that did not happen. Returns the expectation this message completed, if any.
    pub fn on_server_message(
        &mut self,
        tag: u8,
        raw: &Bytes,
        out: &mut BytesMut,
        failed: &mut Vec<FailedParse>,
    ) -> Option<Expect> {
        // Asynchronous messages can arrive at any time and belong to no request.
        if matches!(tag, b'N' | b'A' | b'S') {
            out.extend_from_slice(raw);
            return None;
        }
        // A copy end the client sent with nothing before it (outside COPY: Postgres
        // ignores it) must not stand in the way.
        self.flush_synthetic(out);
        let Some(Entry::Server { expect, swallow }) = self.queue.front() else {
            // Nothing asked for: a FATAL at server shutdown, say. The client should see it.
            out.extend_from_slice(raw);
            return None;
        };
        if tag == b'E' && expect.is_extended() {
            // Errors always reach the client, even for injected messages: the client's own
            // message that depended on it fails with it.
            out.extend_from_slice(raw);
            self.skip_to_sync(failed);
            return None;
        }
        if !swallow {
            out.extend_from_slice(raw);
        }
        if !expect.ends_with(tag) {
            return None;
        }
        let done = match self.queue.pop_front() {
            Some(Entry::Server { expect, .. }) => Some(expect),
            _ => None,
        };
        self.flush_synthetic(out);
        done
    }

    fn skip_to_sync(&mut self, failed: &mut Vec<FailedParse>) {
        // The first message dropped is the one the error answers.
        let mut erred = true;
        loop {
            let Some(front) = self.queue.front() else {
                self.server_skipping = true;
                break;
            };
            if let Entry::Server {
                expect: Expect::Sync,
                ..
            } = front
            {
                break;
            }
            if let Some(Entry::Server {
                expect:
                    Expect::Parse {
                        hash,
                        client_name,
                        client_unnamed,
                    },
                ..
            }) = self.queue.pop_front()
            {
                failed.push(FailedParse {
                    hash,
                    client_name,
                    client_unnamed,
                    erred,
                });
            }
            erred = false;
        }
    }

    /// Send pgstash's own answers that are next, and step over copy ends (which get none).
    fn flush_synthetic(&mut self, out: &mut BytesMut) {
        while let Some(Entry::Synthetic(_) | Entry::CopyEnd) = self.queue.front() {
            if let Some(Entry::Synthetic(m)) = self.queue.pop_front() {
                out.extend_from_slice(&m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;

    fn msg(tag: u8) -> Bytes {
        Bytes::from(vec![tag, 0, 0, 0, 4])
    }

    #[test]
    fn synthetic_parse_complete_lands_between_server_answers() {
        let mut e = Expectations::default();
        let mut out = BytesMut::new();
        let mut failed = vec![];
        e.push(Expect::Bind, false);
        e.push_synthetic(protocol::parse_complete(), &mut out);
        e.push(Expect::Sync, false);
        assert!(out.is_empty(), "must wait for BindComplete");
        e.on_server_message(b'2', &msg(b'2'), &mut out, &mut failed);
        e.on_server_message(b'Z', &msg(b'Z'), &mut out, &mut failed);
        assert_eq!(&out[..], b"2\0\0\0\x041\0\0\0\x04Z\0\0\0\x04");
        assert!(e.is_empty());
    }

    #[test]
    fn error_skips_to_sync_and_reports_unexecuted_parses() {
        let mut e = Expectations::default();
        let mut out = BytesMut::new();
        let mut failed = vec![];
        e.push(
            Expect::Parse {
                hash: Some(1),
                client_name: Some(Bytes::from_static(b"s0")),
                client_unnamed: false,
            },
            false,
        );
        e.push(
            Expect::Parse {
                hash: Some(2),
                client_name: None,
                client_unnamed: false,
            },
            true,
        );
        e.push_synthetic(protocol::close_complete(), &mut out);
        e.push(Expect::Sync, false);
        e.on_server_message(b'E', &msg(b'E'), &mut out, &mut failed);
        assert_eq!(failed.len(), 2);
        // The first Parse failed, the second was skipped.
        assert_eq!(
            failed.iter().map(|f| f.erred).collect::<Vec<_>>(),
            [true, false]
        );
        assert_eq!(e.head(), Some(&Expect::Sync));
        e.on_server_message(b'Z', &msg(b'Z'), &mut out, &mut failed);
        assert_eq!(&out[..], b"E\0\0\0\x04Z\0\0\0\x04");
    }

    #[test]
    fn an_error_with_no_sync_in_flight_leaves_the_server_skipping() {
        let mut e = Expectations::default();
        let mut out = BytesMut::new();
        let mut failed = vec![];
        e.push(Expect::Bind, false);
        e.on_server_message(b'E', &msg(b'E'), &mut out, &mut failed);
        assert!(e.is_empty());
        assert!(e.take_server_skipping());
        assert!(!e.take_server_skipping(), "reported once");
        // With a Sync in flight the skip ends there.
        e.push(Expect::Bind, false);
        e.push(Expect::Sync, false);
        e.on_server_message(b'E', &msg(b'E'), &mut out, &mut failed);
        assert!(!e.take_server_skipping());
        assert_eq!(e.head(), Some(&Expect::Sync));
    }

    #[test]
    fn syncs_sent_during_copy_in_are_dropped_and_those_after_its_end_kept() {
        let mut e = Expectations::default();
        let mut out = BytesMut::new();
        let mut failed = vec![];
        e.push(Expect::Execute, false);
        e.push(Expect::Sync, false);
        e.push_copy_end(&mut out);
        e.push(Expect::Sync, false);
        // CopyInResponse: the first Sync is ignored by the server, the second is not.
        e.drop_queued_syncs();
        e.on_server_message(b'E', &msg(b'E'), &mut out, &mut failed);
        assert!(
            !e.take_server_skipping(),
            "the Sync after the copy ends the skip"
        );
        assert_eq!(e.head(), Some(&Expect::Sync));
        e.on_server_message(b'Z', &msg(b'Z'), &mut out, &mut failed);
        assert!(e.is_empty());
        assert!(e.only_syncs_pending());
    }

    #[test]
    fn swallowed_answers_are_hidden_but_notices_pass() {
        let mut e = Expectations::default();
        let mut out = BytesMut::new();
        let mut failed = vec![];
        e.push(
            Expect::Parse {
                hash: Some(1),
                client_name: None,
                client_unnamed: false,
            },
            true,
        );
        e.on_server_message(b'N', &msg(b'N'), &mut out, &mut failed);
        e.on_server_message(b'1', &msg(b'1'), &mut out, &mut failed);
        assert_eq!(&out[..], b"N\0\0\0\x04");
        assert!(e.is_empty());
    }

    #[test]
    fn simple_query_error_waits_for_ready_for_query() {
        let mut e = Expectations::default();
        let mut out = BytesMut::new();
        let mut failed = vec![];
        e.push(Expect::Query, false);
        e.on_server_message(b'E', &msg(b'E'), &mut out, &mut failed);
        assert!(!e.is_empty());
        e.on_server_message(b'Z', &msg(b'Z'), &mut out, &mut failed);
        assert!(e.is_empty());
    }
}
