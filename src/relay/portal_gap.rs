//! The client's unnamed portal after an answer from the cache inside a transaction block.
//!
//! Postgres keeps the unnamed portal until the next Bind or the end of the transaction. A
//! cached answer stands in for messages the server never saw, so the server's unnamed
//! portal may then be an older one of the transaction, or none, while Postgres would have
//! the answered one (or, after a Query, none). [`PortalGap`] says which, so that a later
//! message about the unnamed portal gets Postgres' answer, never another query's rows.

use bytes::Bytes;

/// What Postgres would have as the client's unnamed portal, where the server's may differ.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PortalGap {
    /// No difference (no cached answer since the last Bind, or outside a transaction).
    #[default]
    None,
    /// No unnamed portal: a simple Query answered from the cache destroyed it. The server's
    /// is closed before the next message about it, which then fails as in Postgres
    /// (34000).
    Gone,
    /// A batch answered from the cache: its portal, run to completion. Executing it again
    /// gives `done` (no rows); describing it gives `description`, if the batch described
    /// its portal (else that is not known here, and it is treated as [`PortalGap::Gone`]).
    Finished {
        done: Bytes,
        description: Option<Bytes>,
    },
}

impl PortalGap {
    /// The gap after a batch answered with `response` (as stored: ParseComplete,
    /// BindComplete, the portal's RowDescription if `described_portal`, rows,
    /// CommandComplete). A response that cannot be read so gives [`PortalGap::Gone`]: an
    /// error later, never rows.
    pub fn finished(response: &[u8], described_portal: bool) -> PortalGap {
        let mut done = None;
        let mut description = None;
        let mut rest = response;
        while rest.len() >= 5 {
            let Ok(len) = <[u8; 4]>::try_from(&rest[1..5]).map(u32::from_be_bytes) else {
                break;
            };
            let end = 1 + len as usize;
            if len < 4 || end > rest.len() {
                break;
            }
            let (msg, next) = rest.split_at(end);
            match msg[0] {
                b'T' | b'n' if described_portal => {
                    description = Some(Bytes::copy_from_slice(msg));
                }
                b'C' => done = finished_tag(&msg[5..]),
                _ => {}
            }
            rest = next;
        }
        match done {
            Some(done) => PortalGap::Finished { done, description },
            None => PortalGap::Gone,
        }
    }
}

/// The CommandComplete of executing a finished portal again, from the one it finished with:
/// `SELECT 2` becomes `SELECT 0`.
fn finished_tag(body: &[u8]) -> Option<Bytes> {
    let tag = body.strip_suffix(b"\0")?;
    let tag = std::str::from_utf8(tag).ok()?;
    let zero = match tag.rsplit_once(' ') {
        Some((word, count)) if count.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{word} 0")
        }
        _ => tag.to_owned(),
    };
    Some(crate::protocol::command_complete(&zero))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_finished_portal_runs_again_to_no_rows_and_keeps_its_description() {
        let t = msg(
            b'T',
            b"\0\x01v\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0",
        );
        let response = [
            msg(b'1', b""),
            msg(b'2', b""),
            t.clone(),
            msg(b'D', b"\0\x01\0\0\0\x02v7"),
            msg(b'C', b"SELECT 1\0"),
        ]
        .concat();
        assert_eq!(
            PortalGap::finished(&response, true),
            PortalGap::Finished {
                done: Bytes::from(msg(b'C', b"SELECT 0\0")),
                description: Some(Bytes::from(t)),
            }
        );
        // The statement's description is not the portal's (its formats are not the Bind's).
        assert_eq!(
            PortalGap::finished(&response, false),
            PortalGap::Finished {
                done: Bytes::from(msg(b'C', b"SELECT 0\0")),
                description: None,
            }
        );
    }

    #[test]
    fn an_unreadable_response_leaves_no_portal_to_run() {
        for response in [
            Vec::new(),
            msg(b'2', b""),
            msg(b'C', b"SELECT 1"),
            b"C\0\0\0\x09SELECT 1\0".to_vec(),
        ] {
            assert_eq!(PortalGap::finished(&response, true), PortalGap::Gone);
        }
    }
}
