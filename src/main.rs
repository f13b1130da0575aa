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
