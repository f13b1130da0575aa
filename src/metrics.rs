//! Prometheus metrics, one process-wide set (`metrics()`), and the HTTP endpoint that serves
//! them with `/healthz` and `/readyz`.
//!
//! Hot-path counters are resolved to their label values once, here, so that counting a hit
//! is one atomic add and never a label lookup.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::{Arc, LazyLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cache::BYPASS_REASONS as ADAPTIVE_REASONS;

pub struct Metrics {
    pub registry: Registry,
    pub hits_l1: IntCounter,
    pub hits_l2: IntCounter,
    pub misses: IntCounter,
    bypasses: IntCounterVec,
    /// `bypasses` by [`BypassReason`], resolved on first use (a series shows once counted,
    /// as with a label lookup each time).
    bypass_by_reason: [std::sync::OnceLock<IntCounter>; BypassReason::COUNT],
    /// The adaptive bypass's reasons, in the order of [`ADAPTIVE_REASONS`].
    adaptive_by_reason: [std::sync::OnceLock<IntCounter>; ADAPTIVE_REASONS.len()],
    invalidations: IntCounterVec,
    invalidations_by_origin: [std::sync::OnceLock<IntCounter>; InvalidationOrigin::COUNT],
    pub fills_stored: IntCounter,
    pub fills_stale: IntCounter,
    pub fills_unfit: IntCounter,
    pub fills_not_admitted: IntCounter,
    pub l1_bytes: IntGauge,
    pub l1_entries: IntGauge,
    pub redis_errors: IntCounter,
    pub redis_breaker_open: IntGauge,
    pub redis_subscribed: IntGauge,
    pub cache_suspended: IntGauge,
    pub upstream_seconds: Histogram,
    pub hit_seconds: Histogram,
    pub staleness_seconds: HistogramVec,
    pub source_healthy: IntGaugeVec,
    pub clients: IntGauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Why a read was not answered from (or stored in) the cache. Closed set: it is a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BypassReason {
    /// The analysis said so (volatile function, locking clause, not a read, ...).
    NotCacheable,
    /// A `/* pgstash: skip */` hint or a `never` rule.
    Rule,
    /// REPEATABLE READ / SERIALIZABLE, settings changed in the transaction, pinned session.
    Transaction,
    /// The transaction wrote a table the read depends on.
    ReadYourWrites,
    /// The database's catalog could not be read.
    NoCatalog,
    /// A change source cannot vouch for the database.
    SourceUnhealthy,
}

impl BypassReason {
    const COUNT: usize = 6;

    pub fn label(self) -> &'static str {
        match self {
            BypassReason::NotCacheable => "not_cacheable",
            BypassReason::Rule => "rule",
            BypassReason::Transaction => "transaction",
            BypassReason::ReadYourWrites => "read_your_writes",
            BypassReason::NoCatalog => "no_catalog",
            BypassReason::SourceUnhealthy => "source_unhealthy",
        }
    }
}

const _: () = assert!(BypassReason::SourceUnhealthy as usize + 1 == BypassReason::COUNT);
const _: () = assert!(InvalidationOrigin::Wal as usize + 1 == InvalidationOrigin::COUNT);

/// Where an invalidation came from (a label).
#[derive(Clone, Copy, Debug)]
pub enum InvalidationOrigin {
    Proxy,
    Redis,
    Notify,
    Wal,
}

impl InvalidationOrigin {
    const COUNT: usize = 4;

    pub fn label(self) -> &'static str {
        match self {
            InvalidationOrigin::Proxy => "proxy",
            InvalidationOrigin::Redis => "redis",
            InvalidationOrigin::Notify => "notify",
            InvalidationOrigin::Wal => "wal",
        }
    }
}

fn latency_buckets() -> Vec<f64> {
    // 1 µs .. ~8 s, doubling: hits live at the bottom, upstream queries higher up.
    prometheus::exponential_buckets(1e-6, 2.0, 24).unwrap_or_default()
}

fn staleness_buckets() -> Vec<f64> {
    // Commit to invalidation: fine-grained from 0.5 ms to 100 ms, where a healthy source
    // lives and where the target (p99 < 50 ms, DESIGN.md) must be judged; then coarse up to
    // a source that fell behind by seconds.
    vec![
        0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
        0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
}

impl Metrics {
    fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("pgstash".into()), None).unwrap_or_else(|_| Registry::new());
        // Registration fails only on a duplicate name, which is a programming error caught
        // by the unit test below; the metric still counts, it is just not exported.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            let _ = r.register(Box::new(c.clone()));
            c
        }
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let gauge =
            |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("valid"));
        let hits = reg(
            &registry,
            IntCounterVec::new(
                Opts::new("cache_hits_total", "Reads answered from the cache, by tier"),
                &["tier"],
            )
            .expect("valid"),
        );
        let fills = reg(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cache_fills_total",
                    "Responses offered to the cache, by outcome (stale: a write committed \
                     while the query ran, so it was not stored)",
                ),
                &["outcome"],
            )
            .expect("valid"),
        );
        Metrics {
            hits_l1: hits.with_label_values(&["l1"]),
            hits_l2: hits.with_label_values(&["l2"]),
            misses: counter(
                "cache_misses_total",
                "Cacheable reads that went to Postgres",
            ),
            bypasses: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "cache_bypass_total",
                        "Reads not served from the cache, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid"),
            ),
            bypass_by_reason: Default::default(),
            adaptive_by_reason: Default::default(),
            invalidations: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("invalidations_total", "Invalidations applied, by source"),
                    &["source"],
                )
                .expect("valid"),
            ),
            invalidations_by_origin: Default::default(),
            fills_stored: fills.with_label_values(&["stored"]),
            fills_stale: fills.with_label_values(&["stale"]),
            fills_unfit: fills.with_label_values(&["unfit"]),
            fills_not_admitted: fills.with_label_values(&["not_admitted"]),
            l1_bytes: gauge("l1_bytes", "Bytes of responses held in L1"),
            l1_entries: gauge("l1_entries", "Entries held in L1"),
            redis_errors: counter("redis_errors_total", "Failed or timed-out Redis operations"),
            redis_breaker_open: gauge(
                "redis_breaker_open",
                "1 while the Redis circuit breaker is open (Redis skipped)",
            ),
            redis_subscribed: gauge(
                "redis_subscribed",
                "1 while invalidations from other instances are being heard",
            ),
            cache_suspended: gauge(
                "cache_suspended",
                "1 while L1 is not served because freshness cannot be proven",
            ),
            upstream_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "upstream_seconds",
                        "Time from forwarding a cacheable read to its ReadyForQuery",
                    )
                    .buckets(latency_buckets()),
                )
                .expect("valid"),
            ),
            hit_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("hit_seconds", "Time to look up and answer a hit")
                        .buckets(latency_buckets()),
                )
                .expect("valid"),
            ),
            staleness_seconds: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "staleness_seconds",
                        "Time from a commit to its invalidation by the change source (every commit the source \
                         reports, also those pgstash relayed and invalidated at once)",
                    )
                    .buckets(staleness_buckets()),
                    &["source"],
                )
                .expect("valid"),
            ),
            source_healthy: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "source_healthy",
                        "1 while the change source vouches for the database",
                    ),
                    &["source", "database"],
                )
                .expect("valid"),
            ),
            clients: gauge("clients", "Client connections open"),
            registry,
        }
    }

    pub fn bypass(&self, reason: BypassReason) {
        self.bypass_by_reason[reason as usize]
            .get_or_init(|| self.bypasses.with_label_values(&[reason.label()]))
            .inc();
    }

    /// An adaptive-bypass verdict, labelled with its own reason (`low_hit_ratio`, ...).
    pub fn bypass_adaptive(&self, reason: &'static str) {
        // A bypassed query counts here on every call: spare the label lookup.
        match ADAPTIVE_REASONS.iter().position(|r| *r == reason) {
            Some(i) => self.adaptive_by_reason[i]
                .get_or_init(|| self.bypasses.with_label_values(&[reason]))
                .inc(),
            None => self.bypasses.with_label_values(&[reason]).inc(),
        }
    }

    pub fn invalidated(&self, origin: InvalidationOrigin, n: u64) {
        // Every transaction end reports, most with nothing: spare the label lookup.
        if n == 0 {
            return;
        }
        self.invalidations_by_origin[origin as usize]
            .get_or_init(|| self.invalidations.with_label_values(&[origin.label()]))
            .inc_by(n);
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// What `/healthz` and `/readyz` report beyond "the process is up".
pub trait HealthReport: Send + Sync + 'static {
    /// Lines describing degraded parts (empty: all well). Refresh gauges as a side effect.
    fn degraded(&self) -> Vec<String>;
}

/// Serve `/metrics`, `/healthz` and `/readyz` until the task is dropped.
///
/// A deliberately small HTTP/1.0-style responder (one request per connection): scrapers and
/// probes need nothing more, and it keeps a web framework off the proxy's dependency list.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<dyn HealthReport>,
) -> std::io::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read up to the end of the request head (or give up on a slow/huge one).
            let head = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                loop {
                    let n = stream.read(&mut buf[len..]).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                        return Some(());
                    }
                }
            })
            .await;
            if !matches!(head, Ok(Some(()))) {
                return;
            }
            let line = buf[..len].split(|b| *b == b'\r').next().unwrap_or_default();
            let mut parts = line.split(|b| *b == b' ');
            let method = parts.next().unwrap_or_default();
            let path = parts.next().unwrap_or_default();
            let (status, body, ctype) = match (method, path) {
                (b"GET", b"/metrics") => {
                    health.degraded();
                    (
                        "200 OK",
                        metrics().render(),
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                }
                (b"GET", b"/healthz") => ("200 OK", "ok\n".to_string(), "text/plain"),
                (b"GET", b"/readyz") => {
                    let d = health.degraded();
                    let body = if d.is_empty() {
                        "ready\n".to_string()
                    } else {
                        // Degraded is still ready: Postgres answers whatever the cache cannot.
                        format!("ready (degraded)\n{}\n", d.join("\n"))
                    };
                    ("200 OK", body, "text/plain")
                }
                (b"GET", _) => ("404 Not Found", "not found\n".into(), "text/plain"),
                _ => ("405 Method Not Allowed", "GET only\n".into(), "text/plain"),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_registered_once_and_rendered_with_the_prefix() {
        let m = metrics();
        m.hits_l1.inc();
        m.bypass(BypassReason::Rule);
        m.invalidated(InvalidationOrigin::Proxy, 2);
        m.staleness_seconds
            .with_label_values(&["notify"])
            .observe(0.001);
        m.source_healthy.with_label_values(&["notify", "db"]).set(1);
        let text = m.render();
        for name in [
            "pgstash_cache_hits_total{tier=\"l1\"}",
            "pgstash_cache_misses_total",
            "pgstash_cache_bypass_total{reason=\"rule\"}",
            "pgstash_invalidations_total{source=\"proxy\"}",
            "pgstash_l1_bytes",
            "pgstash_redis_breaker_open",
            "pgstash_upstream_seconds_bucket",
            "pgstash_hit_seconds_bucket",
            "pgstash_staleness_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        // 16 metric families: a duplicate name would have failed registration silently.
        assert_eq!(m.registry.gather().len(), 16, "{text}");
    }
}
