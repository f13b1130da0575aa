//! Server side of PostgreSQL password authentication: SCRAM-SHA-256
//! (RFC 5802 / RFC 7677, following the Postgres backend's interpretation)
//! and the legacy MD5 challenge.
//!
//! pgstash terminates client connections itself, so it has to play the
//! backend's part of the handshake. This module only computes message bodies;
//! framing them as AuthenticationSASL*/SASL*Response messages is the caller's job.
//!
//! Passwords are not SASLprep-normalised. For ASCII passwords (and Unicode
//! passwords that SASLprep leaves unchanged) this gives the same keys as
//! Postgres and libpq; secrets parsed from Postgres' stored form are always exact.

use std::fmt;
use std::mem;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use md5::Md5;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Postgres' defaults: `scram_iterations`, `SCRAM_DEFAULT_SALT_LEN`, `SCRAM_RAW_NONCE_LEN`.
const DEFAULT_ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 16;
const SERVER_NONCE_LEN: usize = 18;
const SECRET_FORMAT: &str = "expected SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>";

#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("client requested SCRAM channel binding, which is not supported")]
    UnsupportedChannelBinding,
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    #[error("password authentication failed")]
    BadProof,
    #[error("invalid SCRAM secret: {0}")]
    BadSecret(String),
    #[error("SCRAM message received out of order")]
    OutOfOrder,
}

#[derive(Clone)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramSecret {
    /// Derive from a cleartext password with a random 16-byte salt and 4096 iterations.
    pub fn from_password(password: &str) -> Self {
        let mut salt = [0u8; SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::from_password_with(password, &salt, DEFAULT_ITERATIONS)
    }

    /// An iteration count of 0 is raised to 1: PBKDF2 needs at least one
    /// round, and clients compute one regardless.
    pub fn from_password_with(password: &str, salt: &[u8], iterations: u32) -> Self {
        let iterations = iterations.max(1);
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Parse Postgres' stored form
    /// `SCRAM-SHA-256$<iter>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>`.
    pub fn parse(s: &str) -> Result<Self, ScramError> {
        let parse = || {
            let (params, keys) = s.strip_prefix("SCRAM-SHA-256$")?.split_once('$')?;
            let (iterations, salt) = params.split_once(':')?;
            let (stored_key, server_key) = keys.split_once(':')?;
            Some(Self {
                iterations: iterations.parse().ok().filter(|&i| i > 0)?,
                salt: STANDARD.decode(salt).ok().filter(|s| !s.is_empty())?,
                stored_key: decode32(stored_key)?,
                server_key: decode32(server_key)?,
            })
        };
        // Deliberately not echoing the input: it is a password equivalent.
        parse().ok_or_else(|| ScramError::BadSecret(SECRET_FORMAT.into()))
    }

    /// The form Postgres stores in `pg_authid.rolpassword`; inverse of [`Self::parse`].
    pub fn to_postgres_string(&self) -> String {
        let b64 = |b: &[u8]| STANDARD.encode(b);
        let keys = format!("{}:{}", b64(&self.stored_key), b64(&self.server_key));
        format!(
            "SCRAM-SHA-256${}:{}${keys}",
            self.iterations,
            b64(&self.salt)
        )
    }
}

// StoredKey + ServerKey are enough to impersonate the server to clients, so
// they must never reach logs.
impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("ScramSecret");
        s.field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

// Everything held here has been on the wire, so deriving Debug leaks nothing.
#[derive(Debug)]
enum State {
    Initial,
    SentServerFirst {
        gs2_header: Vec<u8>,
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
        nonce: Vec<u8>,
    },
    Finished,
}

/// One SCRAM-SHA-256 exchange. Any error ends it: a client gets exactly one
/// attempt per `ScramServer`, as with a Postgres backend.
#[derive(Debug)]
pub struct ScramServer {
    secret: ScramSecret,
    state: State,
}

impl ScramServer {
    pub fn new(secret: ScramSecret) -> Self {
        Self {
            secret,
            state: State::Initial,
        }
    }

    /// Takes the client-first-message (SASLInitialResponse data) and returns
    /// the server-first-message (AuthenticationSASLContinue data).
    pub fn client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::Initial = mem::replace(&mut self.state, State::Finished) else {
            return Err(ScramError::OutOfOrder);
        };
        let mut parts = data.splitn(3, |&b| b == b',');
        let flag = parts.next().unwrap_or_default();
        match flag {
            // "y": the client could bind but believes we can't. Without TLS
            // channel binding on our side that is true, so it's no downgrade.
            b"n" | b"y" => {}
            f if f.starts_with(b"p=") => return Err(ScramError::UnsupportedChannelBinding),
            _ => return Err(ScramError::Malformed("invalid channel-binding flag")),
        }
        // Postgres also refuses an authzid: the role comes from the startup packet.
        let (Some(b""), Some(bare)) = (parts.next(), parts.next()) else {
            return Err(ScramError::Malformed("bad GS2 header or authzid"));
        };

        let mut attrs = bare.split(|&b| b == b',');
        let first = attrs.next();
        if first.is_some_and(|f| f.starts_with(b"m=")) {
            return Err(ScramError::Malformed("unsupported mandatory extension"));
        }
        // The username is ignored, as in Postgres (libpq sends it empty).
        attr(first, b'n', "expected n=")?;
        let client_nonce = attr(attrs.next(), b'r', "expected r=")?;
        // It is echoed inside our message, so it must be printable and comma-free.
        if client_nonce.is_empty() || !client_nonce.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(ScramError::Malformed("invalid client nonce"));
        }

        let mut random = [0u8; SERVER_NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut random);
        let nonce = [client_nonce, STANDARD.encode(random).as_bytes()].concat();
        let params = format!(
            ",s={},i={}",
            STANDARD.encode(&self.secret.salt),
            self.secret.iterations
        );
        let server_first = [b"r=", &nonce[..], params.as_bytes()].concat();
        self.state = State::SentServerFirst {
            gs2_header: [flag, b",,"].concat(),
            client_first_bare: bare.to_vec(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first)
    }

    /// Takes the client-final-message (SASLResponse data) and returns the
    /// server-final-message (AuthenticationSASLFinal data) if the proof is right.
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::SentServerFirst {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = mem::replace(&mut self.state, State::Finished)
        else {
            return Err(ScramError::OutOfOrder);
        };
        // The proof is the last attribute and the only part left out of AuthMessage.
        let Some(split) = data.windows(3).rposition(|w| w == b",p=") else {
            return Err(ScramError::Malformed("missing client proof"));
        };
        let (without_proof, proof) = (&data[..split], &data[split + 3..]);

        let mut attrs = without_proof.split(|&b| b == b',');
        let cbind = attr(attrs.next(), b'c', "expected c=")?;
        let cbind = STANDARD
            .decode(cbind)
            .map_err(|_| ScramError::Malformed("bad c="))?;
        // Must repeat the first header, so a MITM can't have stripped a "p=" flag.
        if cbind != gs2_header {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if attr(attrs.next(), b'r', "expected r=")? != nonce {
            return Err(ScramError::NonceMismatch);
        }
        let proof = decode32(proof).ok_or(ScramError::Malformed("bad p="))?;

        let auth_message = [&client_first_bare[..], &server_first, without_proof].join(&b',');
        let client_signature = hmac(&self.secret.stored_key, &auth_message);
        let client_key: [u8; 32] = std::array::from_fn(|i| proof[i] ^ client_signature[i]);
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(computed.ct_eq(&self.secret.stored_key)) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.secret.server_key, &auth_message);
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

/// Value of `name=value`, or Err(Malformed(what)).
fn attr<'a>(part: Option<&'a [u8]>, name: u8, what: &'static str) -> Result<&'a [u8], ScramError> {
    match part {
        Some([n, b'=', value @ ..]) if *n == name => Ok(value),
        _ => Err(ScramError::Malformed(what)),
    }
}

fn decode32(b64: impl AsRef<[u8]>) -> Option<[u8; 32]> {
    STANDARD.decode(b64).ok()?.try_into().ok()
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let hex: String = Md5::digest(parts.concat())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("md5{hex}")
}

/// Postgres' md5 stored form: "md5" + hex(md5(password ++ user)).
pub fn md5_stored(user: &str, password: &str) -> String {
    md5_hex(&[password.as_bytes(), user.as_bytes()])
}

/// Verify a PasswordMessage answer to AuthenticationMD5Password(salt).
/// `stored` is the "md5..." form or the cleartext password. A SCRAM secret
/// can never satisfy MD5 (as in Postgres), so it yields false.
pub fn md5_verify(stored: &str, user: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    // Same test as Postgres' get_password_type(), so a cleartext password that
    // merely starts with "md5" is still treated as cleartext.
    let is_md5 = stored.len() == 35
        && stored.starts_with("md5")
        && stored[3..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let stored = if is_md5 {
        stored.to_owned()
    } else if ScramSecret::parse(stored).is_ok() {
        return false;
    } else {
        md5_stored(user, stored)
    };
    let expected = md5_hex(&[&stored.as_bytes()[3..], &salt]);
    expected.as_bytes().ct_eq(client_response).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Made by Postgres 15 for password 'pw' (CREATE ROLE .. PASSWORD 'pw', then rolpassword).
    const PG_SECRET: &str = "SCRAM-SHA-256$4096:8CRBicpxVII2rzdmEaUU5g==$n+zvlxI627SSzPsBnmXw2NQii5MfRqATXQGLqM6XFok=:v6dNYkR+ZbNX0eiFHDzleaEPvjkviHEcDg3v605MgrA=";

    macro_rules! assert_err {
        ($res:expr, $pat:pat) => {{
            let res = $res;
            assert!(matches!(res, Err($pat)), "{res:?}");
        }};
    }

    /// Drives a real client through our server, including its check of our signature.
    fn exchange(secret: ScramSecret, password: &str, cb: ChannelBinding) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), cb);
        let mut server = ScramServer::new(secret);
        let server_first = server.client_first(client.message())?;
        client
            .update(&server_first)
            .expect("client takes server-first");
        let server_final = server.client_final(client.message())?;
        client
            .finish(&server_final)
            .expect("client checks ServerSignature");
        Ok(())
    }

    /// A server past client-first, with the combined nonce it expects back.
    fn started_server() -> (ScramServer, String) {
        let mut server = ScramServer::new(ScramSecret::from_password_with("pw", b"salt", 1));
        let first = server.client_first(b"n,,n=,r=abc").expect("valid");
        let first = String::from_utf8(first).expect("ascii");
        let nonce = first.split(',').next().expect("r=").replace("r=", "");
        (server, nonce)
    }

    #[test]
    fn right_password_completes_exchange_with_postgres_protocol_client() {
        let secret = ScramSecret::from_password("hunter2");
        exchange(secret.clone(), "hunter2", ChannelBinding::unsupported()).expect("n,, works");
        exchange(secret, "hunter2", ChannelBinding::unrequested()).expect("y,, works");
    }

    #[test]
    fn wrong_password_is_bad_proof() {
        let secret = ScramSecret::from_password("hunter2");
        let res = exchange(secret, "hunter3", ChannelBinding::unsupported());
        assert_err!(res, ScramError::BadProof);
    }

    #[test]
    fn parses_postgres_stored_secret_and_roundtrips() {
        let made = ScramSecret::from_password_with("pw", b"0123456789abcdef", 4096);
        let reparsed = ScramSecret::parse(&made.to_postgres_string()).expect("own format parses");
        assert_eq!(reparsed.to_postgres_string(), made.to_postgres_string());

        let pg = ScramSecret::parse(PG_SECRET).expect("postgres secret parses");
        assert_eq!(pg.to_postgres_string(), PG_SECRET);
        let derived = ScramSecret::from_password_with("pw", &pg.salt, pg.iterations);
        assert_eq!(derived.to_postgres_string(), PG_SECRET);
        exchange(pg.clone(), "pw", ChannelBinding::unsupported()).expect("pw authenticates");
        assert_err!(
            exchange(pg, "pW", ChannelBinding::unsupported()),
            ScramError::BadProof
        );
    }

    #[test]
    fn malformed_secret_is_bad_secret_without_echoing_it() {
        let edits = "SCRAM-SHA-256$>|SCRAM>scram|4096>0|4096>x|8CRBicpxVII2rzdmEaUU5g==>\
            |8CRB>!!|MgrA=>|$n+>:n+|:v6>$v6";
        for edit in edits.split('|') {
            let (from, to) = edit.split_once('>').expect("edit");
            let res = ScramSecret::parse(&PG_SECRET.replacen(from, to, 1));
            assert!(
                matches!(&res, Err(ScramError::BadSecret(m)) if !m.contains("v6d")),
                "{edit}"
            );
        }
        assert_err!(ScramSecret::parse(""), ScramError::BadSecret(_));
    }

    #[test]
    fn debug_does_not_print_keys() {
        let secret = ScramSecret::parse(PG_SECRET).expect("parses");
        let shown = format!("{secret:?} {:?}", ScramServer::new(secret.clone()));
        assert!(shown.contains("4096") && !shown.contains("key") && !shown.contains("salt"));
    }

    #[test]
    fn server_nonce_extends_client_nonce_and_username_is_ignored() {
        let mut server = ScramServer::new(ScramSecret::from_password_with("pw", b"salt", 7));
        let first = server
            .client_first(b"y,,n=whoever,r=abc,x=ext")
            .expect("valid");
        let first = String::from_utf8(first).expect("ascii");
        let (nonce, rest) = first.split_once(',').expect("has params");
        assert!(
            nonce.starts_with("r=abc") && nonce.len() == 5 + 24,
            "{first}"
        );
        assert_eq!(rest, "s=c2FsdA==,i=7");
    }

    #[test]
    fn malformed_client_first_is_error_not_panic() {
        let inputs = b"|n|n,|n,,|,,n=,r=abc|x,,n=,r=abc|n,a=admin,n=,r=abc|n,,m=ext,n=,r=abc\
            |n,,r=abc|n,,n=|n,,n=,r=|n,,n=,s=abc|n,,n=,r=a\xffb|n,,n=,r=a b|\xff\xfe\x00";
        for input in inputs.split(|&b| b == b'|') {
            let mut server = ScramServer::new(ScramSecret::from_password("pw"));
            assert_err!(server.client_first(input), ScramError::Malformed(_));
        }
    }

    #[test]
    fn malformed_client_final_is_error_not_panic() {
        let inputs = "|,p=|c=biws,r={n}|c=biws,p=AAAA|c=biws,r={n},p=|c=biws,r={n},p=!!\
            |c=biws,r={n},p=AAAA|c=!!,r={n},p=AAAA|r={n},c=biws,p=AAAA|c=biws,p=,r={n}";
        for input in inputs.split('|') {
            let (mut server, nonce) = started_server();
            let input = input.replace("{n}", &nonce);
            assert_err!(
                server.client_final(input.as_bytes()),
                ScramError::Malformed(_)
            );
        }
        let (mut server, nonce) = started_server();
        let input = format!("c=eSws,r={nonce},p=AAAA");
        assert_err!(
            server.client_final(input.as_bytes()),
            ScramError::ChannelBindingMismatch
        );
        let res = started_server().0.client_final(b"c=biws,r=abc,p=AAAA");
        assert_err!(res, ScramError::NonceMismatch);
    }

    #[test]
    fn channel_binding_p_is_refused() {
        let client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![1; 32]));
        let mut server = ScramServer::new(ScramSecret::from_password("pw"));
        assert_err!(
            server.client_first(client.message()),
            ScramError::UnsupportedChannelBinding
        );
    }

    #[test]
    fn messages_out_of_order_are_errors() {
        let mut fresh = ScramServer::new(ScramSecret::from_password("pw"));
        assert_err!(fresh.client_final(b"c=biws"), ScramError::OutOfOrder);
        let (mut server, _) = started_server();
        assert_err!(server.client_first(b"n,,n=,r=abc"), ScramError::OutOfOrder);
        // A failed attempt ends the exchange: no second guess against the same nonce.
        let (mut server, nonce) = started_server();
        assert!(server.client_final(b"garbage").is_err());
        let retry = format!("c=biws,r={nonce},p=AAAA");
        assert_err!(
            server.client_final(retry.as_bytes()),
            ScramError::OutOfOrder
        );
    }

    #[test]
    fn md5_verify_accepts_right_and_rejects_wrong() {
        let salt = [0x12, 0x34, 0x56, 0x78];
        let answer = md5_hash(b"alice", b"secret", salt);
        let answer = answer.as_bytes();
        let stored = md5_stored("alice", "secret");
        assert_eq!(stored, postgres_protocol::password::md5(b"secret", "alice"));
        assert!(md5_verify(&stored, "alice", salt, answer));
        assert!(md5_verify("secret", "alice", salt, answer));

        assert!(!md5_verify(&stored, "alice", [0; 4], answer));
        assert!(!md5_verify("Secret", "alice", salt, answer));
        assert!(!md5_verify("secret", "bob", salt, answer));
        assert!(!md5_verify(&stored, "alice", salt, &answer[..34]));
        assert!(!md5_verify(&stored, "alice", salt, b""));
        assert!(!md5_verify(PG_SECRET, "alice", salt, answer));
        // A cleartext password that merely starts with "md5" stays cleartext.
        let answer = md5_hash(b"alice", b"md5short", salt);
        assert!(md5_verify("md5short", "alice", salt, answer.as_bytes()));
    }
}
