use clap::{Parser, Subcommand};
use pgstash::config::{Config, LogFormat, Overrides};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// pgstash: a caching proxy for PostgreSQL.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, defaults and PGSTASH_* variables apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on (server.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Postgres to proxy, as postgres://user:password@host:port/db (upstream.url).
    #[arg(long)]
    upstream: Option<String>,
    /// Redis for the shared tier, as redis://host:port (redis.url).
    #[arg(long)]
    redis: Option<String>,
    /// Address for the HTTP endpoint with /metrics, /healthz, /readyz (metrics.listen).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit.
    CheckConfig,
    /// Install, list or remove what pgstash keeps inside the upstream database (schema
    /// `pgstash`: the triggers invalidation.source = "notify" and "wal" need).
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
        /// Database to migrate (default: the database of upstream.url).
        #[arg(long, global = true)]
        database: Option<String>,
    },
}

#[derive(Subcommand)]
enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// List migrations: applied (when), pending, or edited after they were applied.
    Status,
    /// Revert the newest applied migrations.
    Down {
        /// How many to revert.
        #[arg(long, default_value_t = 1)]
        steps: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        upstream: cli.upstream.clone(),
        redis: cli.redis.clone(),
        metrics: cli.metrics,
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgstash: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        println!("configuration OK (upstream {:?})", config.upstream_target());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Migrate { action, database }) = cli.command {
        return migrate(&config, action, database);
    }
    init_logging(&config);
    // One worker: a current-thread runtime, which skips the work-stealing machinery.
    let mut builder = match config.worker_threads() {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgstash: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgstash: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let addr = config.server.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (server.listen)"))?;
    tracing::info!(%addr, upstream = ?config.upstream_target(), mode = ?config.pool.mode, "pgstash listening");
    pgstash::server::run(listener, config, shutdown_signal()).await?;
    tracing::info!("pgstash stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn migrate(config: &Config, action: MigrateAction, database: Option<String>) -> ExitCode {
    use pgstash::migrate::{self, MigrationState};
    let mut target = config.upstream_target();
    if let Some(db) = database {
        target.database = db;
    }
    let db = target.database.clone();
    let url = pgstash::relay::caching::control_url(&target);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgstash: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        use anyhow::Context;
        let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .map_err(|e| anyhow::anyhow!(pgstash::pg_error::describe(&e)))
            .with_context(|| format!("connecting to database {db} at {}", target.addr()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        match action {
            MigrateAction::Up => {
                let done = migrate::up(&mut client)
                    .await
                    .with_context(|| format!("migrating database {db} up"))?;
                if done.is_empty() {
                    println!("{db}: up to date");
                }
                for m in done {
                    println!("{db}: applied {}", m.file_stem());
                }
            }
            MigrateAction::Down { steps } => {
                let done = migrate::down(&mut client, steps)
                    .await
                    .with_context(|| format!("migrating database {db} down"))?;
                if done.is_empty() {
                    println!("{db}: nothing to revert");
                }
                for m in done {
                    println!("{db}: reverted {}", m.file_stem());
                }
            }
            MigrateAction::Status => {
                let list = migrate::status(&client)
                    .await
                    .with_context(|| format!("reading migrations of database {db}"))?;
                for m in list {
                    let state = match m.state {
                        MigrationState::Applied { at } => format!("applied {}", humantime::format_rfc3339_seconds(at)),
                        MigrationState::Pending => "pending".into(),
                        MigrationState::Edited { recorded, embedded, .. } => format!(
                            "EDITED after it was applied (recorded checksum {recorded}, this pgstash has {embedded})"
                        ),
                        MigrationState::Unknown { at } => format!(
                            "applied {} by a newer pgstash (unknown to this one)",
                            humantime::format_rfc3339_seconds(at)
                        ),
                    };
                    println!("{db}: {:04}_{} {state}", m.version, m.name);
                }
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgstash: {e:#}");
            ExitCode::FAILURE
        }
    }
}
