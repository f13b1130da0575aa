//! Accepting clients: the TCP (and optional Unix socket) listeners, the connection limit and
//! the state every connection shares.

use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::upstream::pool::Pools;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

/// What all client connections share. Passed down explicitly; there are no globals.
pub struct Shared {
    pub config: Config,
    pub pools: Arc<Pools>,
    pub cancels: Arc<CancelRegistry>,
    pub client_slots: Arc<Semaphore>,
    /// `None` when `cache.enabled` is false.
    pub cache: Option<Arc<crate::relay::caching::CacheShared>>,
}

impl Shared {
    /// Fails only on a Redis URL the client library rejects.
    pub fn new(config: Config) -> Result<Arc<Self>, crate::redis_tier::TierError> {
        let pools = Pools::new(
            config.upstream_target(),
            config.pool.clone(),
            config.upstream.connect_timeout,
        );
        let target = config.upstream_target();
        let cache = match (config.cache.enabled, &config.redis.url) {
            (false, _) => None,
            (true, url) => {
                let tier = url
                    .as_deref()
                    .map(|u| {
                        crate::redis_tier::RedisTier::new(config.redis.clone(), u, &target.addr())
                    })
                    .transpose()?;
                Some(crate::relay::caching::CacheShared::new(
                    config.cache.clone(),
                    tier,
                    target,
                    config.upstream.connect_timeout,
                ))
            }
        };
        Ok(Arc::new(Shared {
            cache,
            client_slots: Arc::new(Semaphore::new(config.server.max_client_connections)),
            pools,
            cancels: Arc::new(CancelRegistry::default()),
            config,
        }))
    }
}

/// Serve clients from `listener` (and a Unix socket if configured) until `shutdown` resolves,
/// then wait a bounded time for running sessions to end.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let shared = Shared::new(config).map_err(std::io::Error::other)?;
    let mut background = Vec::new();
    if let Some(cache) = &shared.cache
        && let Some(tier) = &cache.tier
    {
        let reload = Arc::clone(cache);
        let echoes = Arc::clone(cache);
        background.push(tokio::spawn(tier.clone().subscribe_forever(
            cache.gens.clone(),
            Arc::new(move || reload.schema_changed_everywhere()),
            Arc::new(move |db, echo| {
                if let Some(catch_up) = echoes.catch_up(db) {
                    catch_up.echo_back(echo);
                }
            }),
        )));
    }
    let sources = tokio_util::sync::CancellationToken::new();
    if let Some(cache) = &shared.cache {
        start_change_source(&shared.config, cache, &sources).await?;
    }
    if let Some(addr) = shared.config.metrics.listen {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} (metrics.listen): {e}"),
            )
        })?;
        let health: Arc<dyn crate::metrics::HealthReport> = match &shared.cache {
            Some(c) => c.clone(),
            None => Arc::new(NoCache),
        };
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        background.push(tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, health).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        }));
    }
    let unix = match &shared.config.server.unix_socket_dir {
        Some(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", listener.local_addr()?.port()));
            let _ = std::fs::remove_file(&path);
            Some(UnixListener::bind(&path)?)
        }
        None => None,
    };
    let tracker = TaskTracker::new();
    let maintenance = tokio::spawn({
        let pools = shared.pools.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                pools.maintain().await;
            }
        }
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    stream.set_nodelay(true).ok();
                    let shared = shared.clone();
                    tracker.spawn(async move {
                        let _open = ClientGauge::open();
                        if let Err(e) = crate::login::serve(stream, shared, peer.ip().is_loopback()).await {
                            tracing::info!(%peer, error = %e, "client connection ended");
                        }
                    });
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            accepted = accept_unix(unix.as_ref()) => match accepted {
                Ok(stream) => {
                    let shared = shared.clone();
                    tracker.spawn(async move {
                        let _open = ClientGauge::open();
                        if let Err(e) = crate::login::serve(stream, shared, true).await {
                            tracing::info!(error = %e, "unix-socket client connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "unix socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    maintenance.abort();
    sources.cancel();
    for task in background {
        task.abort();
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
    Ok(())
}

async fn accept_unix(l: Option<&UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Health when the cache is off: nothing can be degraded.
struct NoCache;

impl crate::metrics::HealthReport for NoCache {
    fn degraded(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Start the configured change source for each database it watches. Until a source says it
/// is listening (and caught up), its databases are not served from the cache.
async fn start_change_source(
    config: &Config,
    cache: &Arc<crate::relay::caching::CacheShared>,
    cancel: &tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use crate::config::InvalidationSource;
    use crate::invalidation::leader::StartSource;
    use crate::invalidation::{ChangeSink, apply::CacheSink, notify, roles};
    use crate::metrics::InvalidationOrigin;
    let source = config.invalidation.source;
    if source == InvalidationSource::Proxy {
        return Ok(());
    }
    let target = config.upstream_target();
    let dbs = match config.invalidation.databases.as_slice() {
        [] => vec![target.database.clone()],
        dbs => dbs.to_vec(),
    };
    let origin = match source {
        InvalidationSource::Notify => InvalidationOrigin::Notify,
        _ => InvalidationOrigin::Wal,
    };
    let sink: Arc<dyn ChangeSink> = Arc::new(CacheSink::new(Arc::clone(cache), origin));
    for (index, db) in dbs.into_iter().enumerate() {
        let mut t = target.clone();
        t.database = db.clone();
        let conninfo = crate::relay::caching::control_url(&t);
        sink.set_healthy(&db, false, "change source starting");
        // Every instance sends its echoes through the source's stream; the one reading it
        // (with Redis, the elected one) hears them and passes the others' on.
        let catch_up = cache.watched_by_source(&db, config.invalidation.max_lag);
        let via = match source {
            InvalidationSource::Notify => crate::invalidation::catch_up::EchoVia::Notify,
            _ => crate::invalidation::catch_up::EchoVia::Wal,
        };
        tokio::spawn(crate::invalidation::catch_up::send_echoes(
            conninfo.clone(),
            Arc::clone(&catch_up),
            via,
            config.upstream.connect_timeout,
            cancel.clone(),
        ));
        match source {
            InvalidationSource::Notify => {
                notify::ensure_installed_at(&conninfo, &db, config.upstream.connect_timeout)
                    .await
                    .map_err(|e| {
                        std::io::Error::other(format!("invalidation.source = \"notify\": {e}"))
                    })?;
                let listen_db = db.clone();
                let timeout = config.upstream.connect_timeout;
                let max_lag = config.invalidation.max_lag;
                let start: StartSource = Arc::new(move |sink, cancel| {
                    let (conninfo, db) = (conninfo.clone(), listen_db.clone());
                    let roles = roles::watch(
                        conninfo.clone(),
                        db.clone(),
                        Arc::clone(&sink),
                        timeout,
                        cancel.clone(),
                    );
                    Box::pin(async move {
                        let cfg = notify::ListenerConfig::within(max_lag);
                        let listen = async {
                            if let Err(e) = notify::run(conninfo, db, sink, cfg, cancel).await {
                                tracing::error!(error = %e, "NOTIFY listener cannot start");
                            }
                        };
                        // The role watch runs as long as the source does.
                        tokio::select! {
                            () = listen => {}
                            () = roles => {}
                        }
                    })
                });
                spawn_source(cache, "notify", db, &sink, start, cancel);
            }
            InvalidationSource::Wal => {
                use crate::invalidation::wal;
                let mut cfg = wal::WalConfig::new(crate::upstream::ConnectParams {
                    addr: t.addr(),
                    user: t.user.clone(),
                    database: db.clone(),
                    password: t.password.clone(),
                    timeout: config.upstream.connect_timeout,
                });
                // One slot per database (a slot belongs to one database).
                cfg.slot = match index {
                    0 => config.invalidation.slot.clone(),
                    i => format!("{}_{i}", config.invalidation.slot),
                };
                cfg.publication = config.invalidation.publication.clone();
                cfg.max_lag = config.invalidation.max_lag;
                cfg.validate().map_err(|e| {
                    std::io::Error::other(format!("invalidation.slot / publication: {e}"))
                })?;
                // Without migration 0003 DDL would go unseen: refuse to start rather than
                // run a source that cannot vouch for the database.
                wal::ensure_installed(&cfg).await.map_err(|e| {
                    std::io::Error::other(format!("invalidation.source = \"wal\": {e}"))
                })?;
                let (roles_conninfo, roles_db) = (conninfo.clone(), db.clone());
                let timeout = config.upstream.connect_timeout;
                let start: StartSource = Arc::new(move |sink, cancel| {
                    let roles = roles::watch(
                        roles_conninfo.clone(),
                        roles_db.clone(),
                        Arc::clone(&sink),
                        timeout,
                        cancel.clone(),
                    );
                    let source = wal::run(cfg.clone(), sink, cancel);
                    Box::pin(async move {
                        // The role watch runs as long as the source does.
                        tokio::select! {
                            () = source => {}
                            () = roles => {}
                        }
                    })
                });
                spawn_source(cache, "wal", db, &sink, start, cancel);
            }
            InvalidationSource::Proxy => return Ok(()),
        }
    }
    Ok(())
}

/// Counts a client connection in `pgstash_clients` for as long as it lives.
struct ClientGauge;

impl ClientGauge {
    fn open() -> ClientGauge {
        crate::metrics::metrics().clients.inc();
        ClientGauge
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        crate::metrics::metrics().clients.dec();
    }
}

/// Run a database's change source here, or, with Redis, wherever the election puts it.
fn spawn_source(
    cache: &Arc<crate::relay::caching::CacheShared>,
    kind: &'static str,
    db: String,
    sink: &Arc<dyn crate::invalidation::ChangeSink>,
    start: crate::invalidation::leader::StartSource,
    cancel: &tokio_util::sync::CancellationToken,
) {
    let (sink, cancel) = (Arc::clone(sink), cancel.clone());
    match &cache.tier {
        Some(tier) => {
            tokio::spawn(crate::invalidation::leader::run(
                Arc::clone(tier),
                kind,
                db,
                sink,
                start,
                cancel,
            ));
        }
        None => {
            tokio::spawn(start(sink, cancel));
        }
    }
}
