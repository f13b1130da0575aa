//! Client authentication: the challenge/response exchanges pgstash runs as the server side.
//!
//! Which exchange runs for a login is decided in `login`; this module only knows how to ask a
//! client for a password (cleartext, md5 or SCRAM-SHA-256) and check the answer.

pub mod scram;

use crate::config::{AuthMethod, UserConfig};
use crate::protocol::{self, Message, MessageReader, ProtocolError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("client closed the connection during authentication")]
    Disconnected,
    #[error("invalid authentication message: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] ProtocolError),
}

impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::Failed(_) => "28P01",
            _ => "08P01",
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), AuthError> {
    w.write_all(bytes)
        .await
        .map_err(|e| AuthError::Io(e.into()))
}

/// Read the client's PasswordMessage (or SASL response), which all share tag `p`.
async fn read_password_message<R: AsyncRead + Unpin>(
    r: &mut MessageReader<R>,
) -> Result<Message, AuthError> {
    match r.read_message().await? {
        Some(m) if m.tag() == b'p' => Ok(m),
        Some(m) => Err(AuthError::Protocol(format!(
            "expected password response, got message type {:?}",
            m.tag() as char
        ))),
        None => Err(AuthError::Disconnected),
    }
}

/// Ask for a cleartext password and return it (used to authenticate against Postgres itself).
pub async fn ask_cleartext<R, W>(r: &mut MessageReader<R>, w: &mut W) -> Result<String, AuthError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send(w, &protocol::authentication(3, &[])).await?;
    let m = read_password_message(r).await?;
    let body = m.body();
    let pw = body.strip_suffix(b"\0").unwrap_or(body);
    String::from_utf8(pw.to_vec()).map_err(|_| AuthError::Protocol("password is not UTF-8".into()))
}

/// Authenticate a client against a configured user. Does not send AuthenticationOk.
pub async fn authenticate<R, W>(
    user: &UserConfig,
    r: &mut MessageReader<R>,
    w: &mut W,
) -> Result<(), AuthError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let fail = || AuthError::Failed(user.name.clone());
    match user.method {
        AuthMethod::Trust => Ok(()),
        AuthMethod::Cleartext => {
            let given = ask_cleartext(r, w).await?;
            let expected = user.resolved_password().ok_or_else(fail)?;
            use subtle::ConstantTimeEq;
            if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
                Ok(())
            } else {
                Err(fail())
            }
        }
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            send(w, &protocol::authentication(5, &salt)).await?;
            let m = read_password_message(r).await?;
            let body = m.body();
            let answer = body.strip_suffix(b"\0").unwrap_or(body);
            let stored = user.resolved_password().ok_or_else(fail)?;
            if scram::md5_verify(&stored, &user.name, salt, answer) {
                Ok(())
            } else {
                Err(fail())
            }
        }
        AuthMethod::ScramSha256 => {
            let secret = match (&user.scram_secret, user.resolved_password()) {
                (Some(s), _) => scram::ScramSecret::parse(s).map_err(|_| fail())?,
                (None, Some(pw)) => scram::ScramSecret::from_password(&pw),
                (None, None) => return Err(fail()),
            };
            scram_exchange(secret, r, w).await.map_err(|e| match e {
                AuthError::Protocol(_) => fail(),
                other => other,
            })
        }
    }
}

async fn scram_exchange<R, W>(
    secret: scram::ScramSecret,
    r: &mut MessageReader<R>,
    w: &mut W,
) -> Result<(), AuthError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send(w, &protocol::auth_sasl_mechanisms()).await?;
    let m = read_password_message(r).await?;
    // SASLInitialResponse: mechanism name, then an int32 length and the client-first-message.
    let body = m.body();
    let (mech, pos) = protocol::cstr_at(body, 0)
        .ok_or_else(|| AuthError::Protocol("bad SASLInitialResponse".into()))?;
    if mech != b"SCRAM-SHA-256" {
        return Err(AuthError::Protocol("unsupported SASL mechanism".into()));
    }
    let data = body
        .get(pos + 4..)
        .ok_or_else(|| AuthError::Protocol("bad SASLInitialResponse".into()))?;
    let mut server = scram::ScramServer::new(secret);
    let first = server
        .client_first(data)
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
    send(w, &protocol::authentication(11, &first)).await?;
    let m = read_password_message(r).await?;
    let last = server
        .client_final(m.body())
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
    send(w, &protocol::authentication(12, &last)).await?;
    Ok(())
}
