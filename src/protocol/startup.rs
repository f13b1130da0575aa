//! The untagged packets a client may send first: SSLRequest, GSSENCRequest, CancelRequest and
//! the StartupMessage itself.

use super::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Postgres refuses startup packets above this size; so do we.
const MAX_STARTUP_PACKET: usize = 10_000;
const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// The parameters of a StartupMessage in the order the client sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupParams(pub Vec<(String, String)>);

impl StartupParams {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup {
        /// Minor protocol version the client asked for (major is always 3 here).
        minor: u16,
        params: StartupParams,
    },
}

/// Read one untagged startup-phase packet. `None` when the client closed before sending one.
pub async fn read_startup<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Startup>, ProtocolError> {
    let mut len_buf = [0u8; 4];
    match r.read_exact(&mut len_buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len_buf);
    if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
        return Err(ProtocolError::BadStartup(format!(
            "invalid length of startup packet: {len}"
        )));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    parse_startup(&body).map(Some)
}

fn parse_startup(body: &[u8]) -> Result<Startup, ProtocolError> {
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    match code {
        SSL_REQUEST => Ok(Startup::SslRequest),
        GSSENC_REQUEST => Ok(Startup::GssEncRequest),
        CANCEL_REQUEST => {
            if body.len() != 12 {
                return Err(ProtocolError::BadStartup(
                    "bad cancel request length".into(),
                ));
            }
            let pid = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
            let secret = i32::from_be_bytes([body[8], body[9], body[10], body[11]]);
            Ok(Startup::Cancel { pid, secret })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::BadStartup(format!(
                    "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                )));
            }
            Ok(Startup::Startup {
                minor,
                params: parse_params(&body[4..])?,
            })
        }
    }
}

fn parse_params(mut rest: &[u8]) -> Result<StartupParams, ProtocolError> {
    let mut params = Vec::new();
    let next = |rest: &mut &[u8]| -> Result<String, ProtocolError> {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| ProtocolError::BadStartup("unterminated string".into()))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| ProtocolError::BadStartup("parameter is not UTF-8".into()))?
            .to_owned();
        *rest = &rest[end + 1..];
        Ok(s)
    };
    loop {
        let key = next(&mut rest)?;
        if key.is_empty() {
            break;
        }
        let value = next(&mut rest)?;
        params.push((key, value));
    }
    if !rest.is_empty() {
        return Err(ProtocolError::BadStartup(
            "trailing bytes after parameters".into(),
        ));
    }
    Ok(StartupParams(params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[tokio::test]
    async fn parses_startup_parameters_in_order() {
        let wire = packet(196608, b"user\0alice\0database\0app\0\0");
        let got = read_startup(&mut &wire[..]).await.unwrap().unwrap();
        let Startup::Startup { minor, params } = got else {
            panic!("not a startup: {got:?}")
        };
        assert_eq!(minor, 0);
        assert_eq!(params.get("user"), Some("alice"));
        assert_eq!(params.get("database"), Some("app"));
    }

    #[tokio::test]
    async fn recognises_ssl_and_cancel_requests() {
        let wire = packet(SSL_REQUEST, b"");
        assert_eq!(
            read_startup(&mut &wire[..]).await.unwrap(),
            Some(Startup::SslRequest)
        );
        let mut payload = 7i32.to_be_bytes().to_vec();
        payload.extend_from_slice(&9i32.to_be_bytes());
        let wire = packet(CANCEL_REQUEST, &payload);
        assert_eq!(
            read_startup(&mut &wire[..]).await.unwrap(),
            Some(Startup::Cancel { pid: 7, secret: 9 })
        );
    }

    #[tokio::test]
    async fn oversized_or_garbage_startup_is_an_error() {
        let wire = 1_000_000i32.to_be_bytes();
        assert!(read_startup(&mut &wire[..]).await.is_err());
        let wire = packet(196608, b"user\0alice");
        assert!(read_startup(&mut &wire[..]).await.is_err());
        let wire = packet(0x0002_0000, b"\0");
        assert!(read_startup(&mut &wire[..]).await.is_err());
    }
}
