//! Opening one server connection: TCP, StartupMessage, password authentication, and the
//! ParameterStatus/BackendKeyData that follow.

use super::prepared::ServerStatements;
use crate::protocol::{self, Message, MessageReader, cstr_at};
use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Server responses are trusted more than client input, but a bound still protects memory.
const MAX_SERVER_MESSAGE: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to upstream {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to upstream {addr} after {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// Postgres refused the login; its ErrorResponse is relayed to the client as is.
    #[error("upstream refused the login: {message}")]
    Rejected {
        message: String,
        fields: Vec<(u8, String)>,
    },
    #[error("upstream asks for a password and none is known")]
    PasswordRequired,
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream connection lost: {0}")]
    Lost(#[from] protocol::ProtocolError),
}

impl UpstreamError {
    pub fn sqlstate(&self) -> &str {
        match self {
            UpstreamError::Rejected { fields, .. } => fields
                .iter()
                .find(|(f, _)| *f == b'C')
                .map(|(_, c)| c.as_str())
                .unwrap_or("08006"),
            UpstreamError::PasswordRequired => "28P01",
            _ => "08006",
        }
    }
}

/// The key a CancelRequest to Postgres must carry for this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// Who to log in as and where.
#[derive(Clone)]
pub struct ConnectParams {
    pub addr: String,
    pub user: String,
    pub database: String,
    pub password: Option<String>,
    pub timeout: Duration,
}

/// One authenticated server connection, idle at ReadyForQuery.
pub struct ServerConn {
    pub reader: MessageReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
    pub key: BackendKey,
    /// Shared: every checkout hands it to the client's cancel slot.
    pub addr: Arc<str>,
    /// Every ParameterStatus this connection has reported, kept current by the relay.
    pub params: BTreeMap<String, String>,
    /// Hashes of the statements prepared on this connection under `pgstash_<hash>` names.
    pub prepared: ServerStatements,
    /// Fingerprint of the client settings last applied here (see `session::Settings`).
    pub settings_hash: u64,
    /// Set when the relay could not leave the connection clean; the pool then drops it.
    pub broken: bool,
    pub created: Instant,
}

impl ServerConn {
    /// True when Postgres has neither closed the socket nor sent anything unasked — the
    /// state in which a pooled connection may be handed to the next client.
    pub fn is_clean_and_alive(&self) -> bool {
        if self.broken || self.reader.has_buffered() {
            return false;
        }
        let mut probe = [0u8; 1];
        match self.reader.get_ref().try_read(&mut probe) {
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            Ok(_) => false, // EOF or unsolicited bytes (e.g. a FATAL at shutdown)
        }
    }

    /// Say goodbye (Terminate) and close, so that Postgres logs no broken connection.
    pub async fn terminate(mut self) {
        let _ = self.writer.write_all(b"X\0\0\0\x04").await;
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }

    /// Read until ReadyForQuery, returning the messages before it (used for internal queries
    /// whose answers the client never sees).
    pub async fn drain_until_ready(&mut self) -> Result<Vec<Message>, UpstreamError> {
        let mut out = Vec::new();
        loop {
            let msg =
                self.reader.read_message().await?.ok_or_else(|| {
                    UpstreamError::Protocol("server closed the connection".into())
                })?;
            match msg.tag() {
                b'Z' => return Ok(out),
                b'S' => self.note_parameter(&msg),
                _ => {}
            }
            out.push(msg);
        }
    }

    /// Track a ParameterStatus the server sent.
    pub fn note_parameter(&mut self, msg: &Message) {
        let body = msg.body();
        if let Some((k, next)) = cstr_at(body, 0)
            && let Some((v, _)) = cstr_at(body, next)
        {
            self.params.insert(
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            );
        }
    }
}

fn startup_packet(user: &str, database: &str, extra: &[(&str, &str)]) -> BytesMut {
    let mut b = BytesMut::with_capacity(64);
    b.put_i32(0);
    b.put_i32(196608);
    for &(k, v) in [("user", user), ("database", database)].iter().chain(extra) {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = b.len() as i32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

fn password_message(payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(payload.len() + 5);
    b.put_u8(b'p');
    b.put_i32(payload.len() as i32 + 4);
    b.put_slice(payload);
    b
}

/// Open and authenticate a server connection.
pub async fn connect(p: &ConnectParams) -> Result<ServerConn, UpstreamError> {
    connect_with(p, &[]).await
}

/// [`connect`] with extra startup parameters, e.g. `replication=database` for the WAL change
/// source or an `application_name` that makes its connections recognisable in
/// `pg_stat_activity`.
pub async fn connect_with(
    p: &ConnectParams,
    extra: &[(&str, &str)],
) -> Result<ServerConn, UpstreamError> {
    match tokio::time::timeout(p.timeout, connect_inner(p, extra)).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Timeout {
            addr: p.addr.clone(),
            timeout: p.timeout,
        }),
    }
}

async fn connect_inner(
    p: &ConnectParams,
    extra: &[(&str, &str)],
) -> Result<ServerConn, UpstreamError> {
    let stream = TcpStream::connect(&p.addr)
        .await
        .map_err(|source| UpstreamError::Connect {
            addr: p.addr.clone(),
            source,
        })?;
    // Small request/response messages: Nagle would add a round trip of latency to each.
    stream.set_nodelay(true).ok();
    let (r, mut w) = stream.into_split();
    let mut reader = MessageReader::new(r, MAX_SERVER_MESSAGE);
    w.write_all(&startup_packet(&p.user, &p.database, extra))
        .await
        .map_err(|e| UpstreamError::Lost(e.into()))?;

    let mut scram: Option<sasl::ScramSha256> = None;
    let mut key = None;
    let mut params = BTreeMap::new();
    loop {
        let msg = reader
            .read_message()
            .await?
            .ok_or_else(|| UpstreamError::Protocol("server closed during startup".into()))?;
        let body = msg.body();
        match msg.tag() {
            b'R' => {
                let code = read_i32(body, 0)?;
                let reply = match code {
                    0 => continue,
                    3 => {
                        let pw = p.password.as_ref().ok_or(UpstreamError::PasswordRequired)?;
                        let mut v = pw.as_bytes().to_vec();
                        v.push(0);
                        password_message(&v)
                    }
                    5 => {
                        let pw = p.password.as_ref().ok_or(UpstreamError::PasswordRequired)?;
                        let salt: [u8; 4] = body
                            .get(4..8)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| UpstreamError::Protocol("short md5 salt".into()))?;
                        let mut v = md5_hash(p.user.as_bytes(), pw.as_bytes(), salt).into_bytes();
                        v.push(0);
                        password_message(&v)
                    }
                    10 => {
                        let pw = p.password.as_ref().ok_or(UpstreamError::PasswordRequired)?;
                        let mechs = String::from_utf8_lossy(&body[4..]);
                        if !mechs.split('\0').any(|m| m == sasl::SCRAM_SHA_256) {
                            return Err(UpstreamError::Protocol(format!(
                                "unsupported SASL mechanisms {mechs:?}"
                            )));
                        }
                        let s = sasl::ScramSha256::new(
                            pw.as_bytes(),
                            sasl::ChannelBinding::unsupported(),
                        );
                        let mut v = BytesMut::new();
                        v.put_slice(sasl::SCRAM_SHA_256.as_bytes());
                        v.put_u8(0);
                        v.put_i32(s.message().len() as i32);
                        v.put_slice(s.message());
                        scram = Some(s);
                        password_message(&v)
                    }
                    11 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| UpstreamError::Protocol("SASL out of order".into()))?;
                        s.update(&body[4..])
                            .map_err(|e| UpstreamError::Protocol(format!("SCRAM: {e}")))?;
                        password_message(s.message())
                    }
                    12 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| UpstreamError::Protocol("SASL out of order".into()))?;
                        s.finish(&body[4..]).map_err(|e| {
                            UpstreamError::Protocol(format!("server SCRAM proof invalid: {e}"))
                        })?;
                        continue;
                    }
                    other => {
                        return Err(UpstreamError::Protocol(format!(
                            "unsupported authentication request {other}"
                        )));
                    }
                };
                w.write_all(&reply)
                    .await
                    .map_err(|e| UpstreamError::Lost(e.into()))?;
            }
            b'S' => {
                if let Some((k, next)) = cstr_at(body, 0)
                    && let Some((v, _)) = cstr_at(body, next)
                {
                    params.insert(
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    );
                }
            }
            b'K' => {
                key = Some(BackendKey {
                    pid: read_i32(body, 0)?,
                    secret: read_i32(body, 4)?,
                })
            }
            b'E' => {
                let fields = protocol::error_fields(body);
                let message = fields
                    .iter()
                    .find(|(f, _)| *f == b'M')
                    .map(|(_, m)| m.clone())
                    .unwrap_or_default();
                return Err(UpstreamError::Rejected { message, fields });
            }
            b'N' | b'v' => {}
            b'Z' => {
                let key = key.ok_or_else(|| UpstreamError::Protocol("no BackendKeyData".into()))?;
                return Ok(ServerConn {
                    reader,
                    writer: w,
                    key,
                    addr: p.addr.as_str().into(),
                    params,
                    prepared: ServerStatements::default(),
                    settings_hash: 0,
                    broken: false,
                    created: Instant::now(),
                });
            }
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?} during startup",
                    other as char
                )));
            }
        }
    }
}

fn read_i32(body: &[u8], at: usize) -> Result<i32, UpstreamError> {
    body.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(i32::from_be_bytes)
        .ok_or_else(|| UpstreamError::Protocol("short message".into()))
}
