//! The replication side of the wire protocol, over the project's own server connection
//! ([`crate::upstream::connect_with`] with `replication=database`): simple queries,
//! `START_REPLICATION`, and the CopyBoth stream of XLogData and keepalives in one direction
//! and standby status updates in the other.

use super::changes::StreamError;
use super::installed::Missing;
use super::lsn::Lsn;
use super::pgoutput::DecodeError;
use crate::protocol::{self, ProtocolError};
use crate::upstream::{ServerConn, UpstreamError};
use bytes::{BufMut, Bytes, BytesMut};
use std::time::{Duration, SystemTime};

/// Everything that can go wrong in the WAL source. Each ends the current replication session;
/// the source reconnects with backoff.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(transparent)]
    Connect(#[from] UpstreamError),
    #[error("connection to Postgres lost: {0}")]
    Lost(#[from] ProtocolError),
    #[error("Postgres refused {what}: {message} (SQLSTATE {code})")]
    Server {
        what: String,
        code: String,
        message: String,
    },
    #[error("replication protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(
        "the WAL source cannot vouch for database {db}: {missing}; or choose another \
         invalidation source"
    )]
    NotInstalled { db: String, missing: Missing },
    #[error("{0}")]
    Setup(String),
}

impl WalError {
    /// The SQLSTATE of an error Postgres reported, if it was one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            WalError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// What the server sends inside the CopyBoth stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMessage {
    /// 'w': `data` is one pgoutput message; `end` is the server's WAL end when sent.
    XLogData { start: Lsn, end: Lsn, data: Bytes },
    /// 'k': the server has sent everything up to `end`; `reply` asks for a status update now.
    Keepalive { end: Lsn, reply: bool },
}

/// Run `sql` with the simple query protocol; the rows' values in text form.
pub async fn simple_query(
    conn: &mut ServerConn,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, WalError> {
    conn.send(&protocol::query(sql))
        .await
        .map_err(|e| WalError::Lost(e.into()))?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let msg = read(conn).await?;
        match msg.tag() {
            b'D' => rows.push(data_row(msg.body())?),
            b'E' => error = Some(server_error(sql, msg.body())),
            b'S' => conn.note_parameter(&msg),
            b'Z' => break,
            // RowDescription, CommandComplete, EmptyQueryResponse, notices.
            _ => {}
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(rows),
    }
}

async fn read(conn: &mut ServerConn) -> Result<protocol::Message, WalError> {
    conn.reader
        .read_message()
        .await?
        .ok_or_else(|| WalError::Protocol("server closed the connection".into()))
}

fn server_error(what: &str, body: &[u8]) -> WalError {
    let fields = protocol::error_fields(body);
    let field = |f: u8| {
        fields
            .iter()
            .find(|(k, _)| *k == f)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    WalError::Server {
        what: what.to_string(),
        code: field(b'C'),
        message: field(b'M'),
    }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, WalError> {
    let short = || WalError::Protocol("short DataRow".into());
    let n = body.get(..2).ok_or_else(short)?;
    let n = u16::from_be_bytes([n[0], n[1]]);
    let mut pos = 2;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let len = body.get(pos..pos + 4).ok_or_else(short)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        pos += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let end = pos + len as usize;
        let v = body.get(pos..end).ok_or_else(short)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        pos = end;
    }
    Ok(out)
}

/// A replication connection in streaming mode.
pub struct ReplicationStream {
    conn: ServerConn,
}

impl ReplicationStream {
    /// Start streaming `slot` from its confirmed position with pgoutput v1 for `publication`,
    /// logical decoding messages included (pgstash's DDL hooks report through them). Names
    /// must already be validated identifiers (they are spliced into the command).
    pub async fn start(
        mut conn: ServerConn,
        slot: &str,
        publication: &str,
    ) -> Result<ReplicationStream, WalError> {
        // 0/0: the server starts from the slot's confirmed_flush_lsn.
        let cmd = format!(
            "START_REPLICATION SLOT {slot} LOGICAL 0/0 \
             (proto_version '1', publication_names '{publication}', messages 'true')"
        );
        conn.send(&protocol::query(&cmd))
            .await
            .map_err(|e| WalError::Lost(e.into()))?;
        loop {
            let msg = read(&mut conn).await?;
            match msg.tag() {
                b'W' => return Ok(ReplicationStream { conn }),
                b'E' => return Err(server_error("START_REPLICATION", msg.body())),
                b'N' | b'S' => {}
                other => {
                    return Err(WalError::Protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        other as char
                    )));
                }
            }
        }
    }

    /// The next XLogData or keepalive. Cancel-safe: a message is consumed only when returned.
    pub async fn next(&mut self) -> Result<WalMessage, WalError> {
        loop {
            let msg = read(&mut self.conn).await?;
            match msg.tag() {
                b'd' => return parse_copy_data(msg.into_raw().slice(5..)),
                b'E' => return Err(server_error("replication", msg.body())),
                b'c' => {
                    return Err(WalError::Protocol(
                        "server ended the replication stream".into(),
                    ));
                }
                b'N' | b'S' => {}
                other => {
                    return Err(WalError::Protocol(format!(
                        "unexpected message {:?} in the replication stream",
                        other as char
                    )));
                }
            }
        }
    }

    /// Report `applied` as written, flushed and applied: the slot may forget everything
    /// before it.
    pub async fn send_status(&mut self, applied: Lsn) -> Result<(), WalError> {
        self.conn
            .send(&standby_status(applied, SystemTime::now()))
            .await
            .map_err(|e| WalError::Lost(e.into()))
    }

    /// Leave politely: CopyDone and Terminate (best effort, the socket closes anyway).
    pub async fn close(mut self) {
        let _ = self.conn.send(b"c\0\0\0\x04").await;
        let _ = self.conn.send(&protocol::terminate()).await;
    }
}

fn parse_copy_data(data: Bytes) -> Result<WalMessage, WalError> {
    let short = |what: &str| WalError::Protocol(format!("short {what} message"));
    let u64_at = |at: usize| -> Option<u64> {
        data.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_be_bytes)
    };
    match data.first() {
        Some(b'w') => {
            let start = u64_at(1).ok_or_else(|| short("XLogData"))?;
            let end = u64_at(9).ok_or_else(|| short("XLogData"))?;
            // 17..25 is the server's send time; we keep our own clock.
            if data.len() < 25 {
                return Err(short("XLogData"));
            }
            Ok(WalMessage::XLogData {
                start: Lsn(start),
                end: Lsn(end),
                data: data.slice(25..),
            })
        }
        Some(b'k') => {
            let end = u64_at(1).ok_or_else(|| short("keepalive"))?;
            let reply = *data.get(17).ok_or_else(|| short("keepalive"))?;
            Ok(WalMessage::Keepalive {
                end: Lsn(end),
                reply: reply != 0,
            })
        }
        Some(&other) => Err(WalError::Protocol(format!(
            "unknown replication message {:?}",
            other as char
        ))),
        None => Err(short("CopyData")),
    }
}

/// A CopyData holding a standby status update ('r').
fn standby_status(applied: Lsn, now: SystemTime) -> Bytes {
    let mut b = BytesMut::with_capacity(40);
    b.put_u8(b'd');
    b.put_i32(4 + 1 + 8 * 4 + 1);
    b.put_u8(b'r');
    for _ in 0..3 {
        b.put_u64(applied.0);
    }
    b.put_i64(pg_micros(now));
    b.put_u8(0);
    b.freeze()
}

/// Microseconds since 2000-01-01 UTC.
fn pg_micros(t: SystemTime) -> i64 {
    const PG_EPOCH: Duration = Duration::from_secs(946_684_800);
    t.duration_since(SystemTime::UNIX_EPOCH + PG_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlogdata_and_keepalive_parse() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x10u64.to_be_bytes());
        w.extend_from_slice(&0x20u64.to_be_bytes());
        w.extend_from_slice(&0u64.to_be_bytes());
        w.extend_from_slice(b"Bpayload");
        assert_eq!(
            parse_copy_data(Bytes::from(w)).expect("XLogData"),
            WalMessage::XLogData {
                start: Lsn(0x10),
                end: Lsn(0x20),
                data: Bytes::from_static(b"Bpayload")
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x30u64.to_be_bytes());
        k.extend_from_slice(&0u64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k.clone())).expect("keepalive"),
            WalMessage::Keepalive {
                end: Lsn(0x30),
                reply: true
            }
        );
        for cut in 0..k.len() {
            assert!(parse_copy_data(Bytes::from(k[..cut].to_vec())).is_err());
        }
        assert!(parse_copy_data(Bytes::from_static(b"w123")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"?")).is_err());
    }

    #[test]
    fn standby_status_reports_one_position_three_times() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_801);
        let m = standby_status(Lsn(0xABCD), now);
        assert_eq!(m.len(), 1 + 4 + 1 + 32 + 1);
        assert_eq!(&m[..6], b"d\0\0\0\x26r");
        for i in 0..3 {
            let at = 6 + 8 * i;
            assert_eq!(&m[at..at + 8], &0xABCDu64.to_be_bytes());
        }
        assert_eq!(&m[30..38], &1_000_000i64.to_be_bytes());
        assert_eq!(m[38], 0);
    }

    #[test]
    fn data_rows_with_nulls_and_short_input() {
        let mut body = vec![0, 2];
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"ok");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            data_row(&body).expect("row"),
            [Some("ok".to_string()), None]
        );
        assert!(data_row(&body[..5]).is_err());
        assert!(data_row(&[0]).is_err());
    }
}
