//! A client's first moments: SSL/GSSENC negotiation, cancel requests, the startup packet,
//! authentication, a first server connection carrying the client's settings, and the
//! ParameterStatus/BackendKeyData/ReadyForQuery greeting. Then the relay takes over.

use crate::auth::{self, AuthError};
use crate::config::{Config, UserConfig};
use crate::protocol::{self, MessageReader, ProtocolError, Severity, Startup, read_startup};
use crate::relay::{Relay, RelayStart, sync_settings, upstream_error_message};
use crate::server::Shared;
use crate::session::Settings;
use crate::upstream::pool::{CheckoutError, Pooled, ServerPool};
use crate::upstream::{ConnectParams, UpstreamError, connect};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// A client socket that splits into independently owned halves (no lock between them).
pub trait SplitStream {
    type R: AsyncRead + Unpin + Send + 'static;
    type W: AsyncWrite + Unpin + Send + 'static;
    fn split_owned(self) -> (Self::R, Self::W);
}

impl SplitStream for tokio::net::TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    fn split_owned(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

impl SplitStream for tokio::net::UnixStream {
    type R = tokio::net::unix::OwnedReadHalf;
    type W = tokio::net::unix::OwnedWriteHalf;
    fn split_owned(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("startup timed out")]
    Timeout,
    #[error("refused: {0}")]
    Refused(String),
}

/// Serve one client connection from its first byte to its last.
pub async fn serve<S: SplitStream>(
    stream: S,
    shared: Arc<Shared>,
    loopback: bool,
) -> Result<(), LoginError> {
    let (mut r, mut w) = stream.split_owned();
    let startup = tokio::time::timeout(
        shared.config.server.startup_timeout,
        negotiate(&mut r, &mut w, &shared),
    )
    .await
    .map_err(|_| LoginError::Timeout)??;
    let Some((minor, params)) = startup else {
        return Ok(());
    };
    if minor > 0 || params.0.iter().any(|(k, _)| k.starts_with("_pq_.")) {
        let unsupported: Vec<String> = params
            .0
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.clone())
            .collect();
        w.write_all(&protocol::negotiate_protocol_version(0, &unsupported))
            .await
            .map_err(ProtocolError::from)?;
    }
    let fatal = |code: &str, msg: &str| protocol::error_response(Severity::Fatal, code, msg);
    let Ok(_permit) = shared.client_slots.clone().try_acquire_owned() else {
        let _ = w
            .write_all(&fatal("53300", "sorry, too many clients already"))
            .await;
        return Err(LoginError::Refused("connection limit".into()));
    };
    let Some(user) = params.get("user").map(str::to_string) else {
        let _ = w
            .write_all(&fatal(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            ))
            .await;
        return Err(LoginError::Refused("no user".into()));
    };
    if params
        .get("replication")
        .is_some_and(|v| v != "false" && v != "0")
    {
        let _ = w
            .write_all(&fatal(
                "08P01",
                "pgstash does not proxy replication connections",
            ))
            .await;
        return Err(LoginError::Refused("replication".into()));
    }
    let database = params.get("database").unwrap_or(&user).to_string();
    tracing::trace!(user, database, "login");
    let mut reader = MessageReader::new(r, shared.config.server.max_message_size);
    let settings = Settings::from_startup(&params.0);

    let login = Login {
        config: &shared.config,
        user: &user,
        database: &database,
        loopback,
    };
    let (pool, mut server) = match login.authenticate(&shared, &mut reader, &mut w).await {
        Ok(v) => v,
        Err(msg) => {
            let _ = w.write_all(&msg).await;
            return Err(LoginError::Refused(format!(
                "login of {user} to {database}"
            )));
        }
    };
    if let Err(e) = sync_settings(&mut server, &settings).await {
        // Postgres refuses bad startup settings with a FATAL; so do we, with its words.
        let _ = w
            .write_all(&upstream_error_message(&e, Severity::Fatal))
            .await;
        server.broken = true;
        return Err(LoginError::Refused(e.to_string()));
    }
    let registration = shared.cancels.register();
    let mut greeting = BytesMut::new();
    greeting.extend_from_slice(&protocol::authentication(0, &[]));
    for (k, v) in &server.params {
        greeting.extend_from_slice(&protocol::parameter_status(k, v));
    }
    greeting.extend_from_slice(&protocol::backend_key_data(
        registration.pid,
        registration.secret,
    ));
    greeting.extend_from_slice(&protocol::ready_for_query(b'I'));
    w.write_all(&greeting).await.map_err(ProtocolError::from)?;
    registration
        .slot
        .set(Some((server.addr.clone(), server.key)))
        .await;

    tracing::trace!(user, database, "logged in");
    let relay = Relay::new(RelayStart {
        client: reader,
        client_w: w,
        server,
        pool,
        mode: shared.config.pool.mode,
        settings,
        cancel: registration.slot.clone(),
        cache: shared.cache.clone(),
        database: database.clone(),
        user: user.clone(),
    });
    match relay.run().await {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, user, database, "client session ended with an error");
            Ok(())
        }
    }
}

/// Answer SSL/GSSENC requests and cancels until a StartupMessage arrives.
async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    shared: &Shared,
) -> Result<Option<(u16, protocol::StartupParams)>, LoginError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        match read_startup(r).await? {
            None => return Ok(None),
            Some(Startup::SslRequest | Startup::GssEncRequest) => {
                // Encryption is not offered yet: `N` lets the client go on in plaintext.
                w.write_all(b"N").await.map_err(ProtocolError::from)?;
            }
            Some(Startup::Cancel { pid, secret }) => {
                shared.cancels.cancel(pid, secret).await;
                return Ok(None);
            }
            Some(Startup::Startup { minor, params }) => return Ok(Some((minor, params))),
        }
    }
}

struct Login<'a> {
    config: &'a Config,
    user: &'a str,
    database: &'a str,
    loopback: bool,
}

impl Login<'_> {
    /// Authenticate the client and return its pool with a first server connection, or the
    /// FATAL ErrorResponse to send.
    async fn authenticate<R, W>(
        &self,
        shared: &Shared,
        r: &mut MessageReader<R>,
        w: &mut W,
    ) -> Result<(ServerPool, Pooled), Bytes>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let users = &self.config.auth.users;
        if users.is_empty() {
            return self.passthrough(shared, r, w).await;
        }
        let Some(user) = users.iter().find(|u| u.name == self.user) else {
            return Err(fatal(
                "28000",
                &format!("role \"{}\" does not exist", self.user),
            ));
        };
        self.check_trust_allowed(user)?;
        auth::authenticate(user, r, w)
            .await
            .map_err(|e| auth_error(&e))?;
        let pool = shared
            .pools
            .get(self.database, self.user, user.resolved_password());
        let server = pool.checkout().await.map_err(|e| checkout_error(&e))?;
        Ok((pool, server))
    }

    fn check_trust_allowed(&self, user: &UserConfig) -> Result<(), Bytes> {
        if user.method == crate::config::AuthMethod::Trust
            && !self.loopback
            && !self.config.auth.allow_remote_trust
        {
            return Err(fatal(
                "28000",
                "trust authentication is only allowed from loopback (auth.allow_remote_trust)",
            ));
        }
        Ok(())
    }

    /// No users configured: the client proves itself to Postgres, at every login, on a
    /// connection of its own (closed right after): Postgres alone knows whether the role
    /// still exists, may log in, has not expired, and which password it has now. If
    /// Postgres lets us in without a password the client is in; otherwise the client's
    /// password must be one Postgres accepts, and it becomes the pool's login password
    /// (the newest one proved wins: a password changed since is followed).
    async fn passthrough<R, W>(
        &self,
        shared: &Shared,
        r: &mut MessageReader<R>,
        w: &mut W,
    ) -> Result<(ServerPool, Pooled), Bytes>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let pool = shared.pools.get(self.database, self.user, None);
        let mut params = ConnectParams {
            addr: shared.pools.upstream_addr(),
            user: self.user.to_string(),
            database: self.database.to_string(),
            password: None,
            timeout: self.config.upstream.connect_timeout,
        };
        match connect(&params).await {
            Ok(proof) => proof.terminate().await,
            Err(UpstreamError::PasswordRequired) => {
                let given = auth::ask_cleartext(r, w)
                    .await
                    .map_err(|e| auth_error(&e))?;
                params.password = Some(given.clone());
                match connect(&params).await {
                    Ok(proof) => {
                        proof.terminate().await;
                        pool.set_password(Some(given));
                    }
                    Err(e) => return Err(upstream_error_message(&e, Severity::Fatal)),
                }
            }
            Err(e) => return Err(upstream_error_message(&e, Severity::Fatal)),
        }
        let server = pool.checkout().await.map_err(|e| checkout_error(&e))?;
        Ok((pool, server))
    }
}

fn fatal(code: &str, msg: &str) -> Bytes {
    protocol::error_response(Severity::Fatal, code, msg)
}

fn auth_error(e: &AuthError) -> Bytes {
    fatal(e.sqlstate(), &e.to_string())
}

fn checkout_error(e: &CheckoutError) -> Bytes {
    match e {
        CheckoutError::Upstream(u) => upstream_error_message(u, Severity::Fatal),
        other => fatal("08P01", &format!("pgstash: {other}")),
    }
}
