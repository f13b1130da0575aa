//! Configuration: `config.toml`, then `PGSTASH_*` environment variables, then command-line flags,
//! later sources winning. Every key is documented in the shipped `config.toml`.
//!
//! Validation happens once, at start, and every message names the key at fault.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub pool: PoolConfig,
    pub auth: AuthConfig,
    pub cache: CacheConfig,
    pub redis: RedisConfig,
    pub invalidation: InvalidationConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Off: pgstash is a plain pooler.
    pub enabled: bool,
    /// Lifetime of an entry when no rule or hint says otherwise.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Bytes of responses held in memory (L1), all entries together.
    pub max_bytes: u64,
    /// Results larger than this many bytes are not cached.
    pub max_result_bytes: usize,
    /// Results with more rows than this are not cached.
    pub max_result_rows: u64,
    /// Store a result on its key's second miss (or when others waited for it), not the first.
    pub admit_on_second_miss: bool,
    /// Per table or per query-text regex: a TTL, or never cache. The first matching rule
    /// wins; a `/* pgstash: ... */` hint in the query beats every rule.
    pub rules: Vec<CacheRule>,
    /// Adaptive bypass: stop caching query fingerprints that do not pay.
    pub adaptive: AdaptiveConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// A table the query reads, as `name` or `schema.name` (views count by their own name).
    pub table: Option<String>,
    /// A regular expression searched in the query text.
    pub query: Option<String>,
    /// Lifetime for matching queries.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Never cache matching queries.
    #[serde(default)]
    pub never: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    pub enabled: bool,
    /// Lookups of sampled keys (one key in 16) in a window before a fingerprint is judged;
    /// a query whose keys miss the sample is judged after 16 times as many lookups.
    pub min_calls: u64,
    /// Below this hit ratio (0..1) a fingerprint is bypassed.
    pub min_hit_ratio: f64,
    /// Above this many invalidations (entries found stale, fills rejected) per lookup, the
    /// query's tables change too often for caching to pay.
    pub max_invalidation_ratio: f64,
    /// Fingerprints whose mean upstream time is below this are not worth caching (0: off;
    /// every hit saves at least a round trip).
    #[serde(with = "humantime_serde")]
    pub min_upstream_time: Duration,
    /// A bypassed fingerprint is cached in full again after this long, to re-measure (its
    /// sampled keys are re-measured all along).
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            // Judged on a sample of keys that stays cached, so a large hot set on a cold
            // cache is bypassed only until its sample warms up (see `cache::bypass`).
            enabled: true,
            min_calls: 200,
            min_hit_ratio: 0.2,
            max_invalidation_ratio: 0.5,
            min_upstream_time: Duration::ZERO,
            retry_after: Duration::from_secs(60),
        }
    }
}

/// The shared tier. Without `url` there is no L2 and no cross-instance invalidation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db`; empty: no Redis.
    pub url: Option<String>,
    /// Each Redis operation gives up after this long (and counts as a failure).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// After a failure, Redis is left alone this long before it is tried again.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// While invalidations from other instances cannot be heard, L1 entries are served at
    /// most this long; after that only Postgres answers until Redis is back.
    #[serde(with = "humantime_serde")]
    pub unheard_bound: Duration,
    /// Prefix of every key and of the invalidation channel.
    pub prefix: String,
    /// Upper bound on an L2 value's lifetime (rules and hints are capped to it).
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            timeout: Duration::from_millis(250),
            breaker_cooldown: Duration::from_secs(1),
            unheard_bound: Duration::from_millis(500),
            prefix: "pgstash:".into(),
            max_ttl: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InvalidationSource {
    /// Only writes relayed by pgstash invalidate.
    #[default]
    Proxy,
    /// Triggers installed by `pgstash migrate up` NOTIFY every committed write.
    Notify,
    /// A logical replication slot streams every committed change.
    Wal,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvalidationConfig {
    pub source: InvalidationSource,
    /// Databases the source watches; empty: the upstream URL's database.
    pub databases: Vec<String>,
    /// A source this far behind (or disconnected) stops the cache for its databases.
    #[serde(with = "humantime_serde")]
    pub max_lag: Duration,
    /// Logical replication slot and publication (source = "wal").
    pub slot: String,
    pub publication: String,
}

impl Default for InvalidationConfig {
    fn default() -> Self {
        InvalidationConfig {
            source: InvalidationSource::Proxy,
            databases: Vec::new(),
            max_lag: Duration::from_secs(5),
            slot: "pgstash".into(),
            publication: "pgstash".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// HTTP address for /metrics, /healthz and /readyz; empty: off.
    pub listen: Option<SocketAddr>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            default_ttl: Duration::from_secs(60),
            max_bytes: 256 * 1024 * 1024,
            max_result_bytes: 1024 * 1024,
            max_result_rows: 10_000,
            admit_on_second_miss: true,
            rules: Vec::new(),
            adaptive: AdaptiveConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Directory for a `.s.PGSQL.<port>` Unix socket, like Postgres' `unix_socket_directories`.
    pub unix_socket_dir: Option<PathBuf>,
    pub max_client_connections: usize,
    /// Bytes; larger messages from a client end that client's connection.
    pub max_message_size: usize,
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Runtime worker threads; 0 means half the CPUs (at least one), leaving the rest to a
    /// Postgres on the same host and to the clients.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ([127, 0, 0, 1], 6432).into(),
            unix_socket_dir: None,
            max_client_connections: 1000,
            max_message_size: 64 * 1024 * 1024,
            startup_timeout: Duration::from_secs(15),
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    pub min_size: usize,
    pub max_size: usize,
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Most shared prepared statements one server connection keeps; 0 means no bound.
    pub max_prepared_statements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            min_size: 0,
            max_size: 20,
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            max_prepared_statements: 200,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum AuthMethod {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "cleartext")]
    Cleartext,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Trust is refused for non-loopback clients unless this is set.
    pub allow_remote_trust: bool,
    /// Empty: clients are authenticated by Postgres itself at login.
    pub users: Vec<UserConfig>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub method: AuthMethod,
    /// Cleartext password; used for client auth and for the upstream login.
    #[serde(default)]
    pub password: Option<String>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A Postgres-format `SCRAM-SHA-256$...` secret (client auth only).
    #[serde(default)]
    pub scram_secret: Option<String>,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl UserConfig {
    /// The cleartext password from the file or the environment.
    pub fn resolved_password(&self) -> Option<String> {
        self.password.clone().or_else(|| {
            self.password_env
                .as_ref()
                .and_then(|v| std::env::var(v).ok())
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `pgstash=debug`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

/// Where and as whom to reach Postgres, parsed from `upstream.url`.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

impl std::fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }
}

impl UpstreamTarget {
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let key = "upstream.url";
        let u = url::Url::parse(url).map_err(|e| invalid(key, format!("{e}: {url:?}")))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(invalid(key, "the scheme must be postgres://"));
        }
        let decode = |s: &str| -> Result<String, ConfigError> {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .ok_or_else(|| invalid(key, "bad percent-encoding"))
        };
        let host = u
            .host_str()
            .ok_or_else(|| invalid(key, "a host is required"))?
            .to_string();
        let user = if u.username().is_empty() {
            "postgres".to_string()
        } else {
            decode(u.username())?
        };
        let password = u.password().map(decode).transpose()?;
        let database = match u.path().trim_start_matches('/') {
            "" => user.clone(),
            db => decode(db)?,
        };
        Ok(UpstreamTarget {
            host,
            port: u.port().unwrap_or(5432),
            user,
            password,
            database,
        })
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Values given on the command line; they override the file and the environment.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

impl Config {
    /// Load from an optional file, the environment and overrides, then validate.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(p) = path {
            fig = fig.merge(Toml::file_exact(p));
        }
        fig = fig.merge(Env::prefixed("PGSTASH_").split("__"));
        if let Some(l) = overrides.listen {
            fig = fig.merge(Serialized::default("server.listen", l));
        }
        if let Some(u) = &overrides.upstream {
            fig = fig.merge(Serialized::default("upstream.url", u));
        }
        if let Some(r) = &overrides.redis {
            fig = fig.merge(Serialized::default("redis.url", r));
        }
        if let Some(m) = overrides.metrics {
            fig = fig.merge(Serialized::default("metrics.listen", m));
        }
        let mut config: Config = fig.extract().map_err(Box::new)?;
        // PGSTASH_REDIS__URL="" means no Redis, as an absent key does.
        config.redis.url = config.redis.url.filter(|u| !u.is_empty());
        config.validate()?;
        Ok(config)
    }

    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(s))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        UpstreamTarget::parse(&self.upstream.url)?;
        if self.pool.max_size == 0 {
            return Err(invalid("pool.max_size", "must be at least 1"));
        }
        if self.pool.min_size > self.pool.max_size {
            return Err(invalid("pool.min_size", "must not exceed pool.max_size"));
        }
        if self.server.max_client_connections == 0 {
            return Err(invalid(
                "server.max_client_connections",
                "must be at least 1",
            ));
        }
        if self.server.max_message_size < 1024 {
            return Err(invalid(
                "server.max_message_size",
                "must be at least 1024 bytes",
            ));
        }
        if self.cache.default_ttl.is_zero() {
            return Err(invalid("cache.default_ttl", "must be above zero"));
        }
        for (i, r) in self.cache.rules.iter().enumerate() {
            if r.table.is_some() == r.query.is_some() {
                return Err(invalid(
                    "cache.rules",
                    format!("rule #{i}: give exactly one of `table` or `query`"),
                ));
            }
            if r.never == r.ttl.is_some() {
                return Err(invalid(
                    "cache.rules",
                    format!("rule #{i}: give exactly one of `ttl` or `never = true`"),
                ));
            }
            if let Some(q) = &r.query {
                regex::Regex::new(q).map_err(|e| {
                    invalid("cache.rules", format!("rule #{i}: bad `query` regex: {e}"))
                })?;
            }
            if r.ttl.is_some_and(|t| t.is_zero()) {
                return Err(invalid(
                    "cache.rules",
                    format!("rule #{i}: ttl must be above zero"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.cache.adaptive.min_hit_ratio) {
            return Err(invalid(
                "cache.adaptive.min_hit_ratio",
                "must be between 0 and 1",
            ));
        }
        if let Some(u) = &self.redis.url {
            let parsed =
                url::Url::parse(u).map_err(|e| invalid("redis.url", format!("not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
                return Err(invalid("redis.url", "must start with redis:// or unix://"));
            }
        }
        if self.redis.timeout.is_zero() {
            return Err(invalid("redis.timeout", "must be above zero"));
        }
        if self.redis.max_ttl.is_zero() {
            return Err(invalid("redis.max_ttl", "must be above zero"));
        }
        if self.invalidation.max_lag.is_zero() {
            return Err(invalid("invalidation.max_lag", "must be above zero"));
        }
        if self.pool.checkout_timeout.is_zero() {
            return Err(invalid("pool.checkout_timeout", "must be above zero"));
        }
        for (i, u) in self.auth.users.iter().enumerate() {
            let has_secret = u.resolved_password().is_some() || u.scram_secret.is_some();
            if u.method != AuthMethod::Trust && !has_secret {
                return Err(invalid(
                    "auth.users",
                    format!(
                        "user #{i} ({}) needs password, password_env or scram_secret",
                        u.name
                    ),
                ));
            }
            let needs_cleartext = !matches!(u.method, AuthMethod::ScramSha256 | AuthMethod::Trust);
            if needs_cleartext && u.resolved_password().is_none() {
                return Err(invalid(
                    "auth.users",
                    format!(
                        "user #{i} ({}): {:?} needs a cleartext password",
                        u.name, u.method
                    ),
                ));
            }
            if let Some(s) = &u.scram_secret {
                crate::auth::scram::ScramSecret::parse(s).map_err(|e| {
                    invalid(
                        "auth.users",
                        format!("user #{i} ({}): scram_secret: {e}", u.name),
                    )
                })?;
            }
        }
        Ok(())
    }

    /// `server.worker_threads` with 0 resolved.
    pub fn worker_threads(&self) -> usize {
        match self.server.worker_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get().div_ceil(2))
                .unwrap_or(1),
            n => n,
        }
    }

    pub fn upstream_target(&self) -> UpstreamTarget {
        UpstreamTarget::parse(&self.upstream.url).expect("validated at load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_is_valid() {
        let text = include_str!("../config.toml");
        Config::from_toml_str(text).expect("config.toml must load");
    }

    #[test]
    fn unknown_key_is_named_in_the_error() {
        let err = Config::from_toml_str("[pool]\nmax_sise = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_sise"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = Config::from_toml_str("[pool]\ncheckout_timeout = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("checkout_timeout"), "{err}");
        let err = Config::from_toml_str("[pool]\nmax_size = 0\n").unwrap_err();
        assert!(err.to_string().contains("pool.max_size"), "{err}");
    }

    #[test]
    fn upstream_url_defaults_database_to_user_and_decodes_password() {
        let t = UpstreamTarget::parse("postgres://app:p%40ss@db:6000").unwrap();
        assert_eq!(t.database, "app");
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert_eq!(t.port, 6000);
        assert!(!format!("{t:?}").contains("p@ss"));
    }
}
