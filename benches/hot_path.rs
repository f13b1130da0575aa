//! Micro-benchmarks of the hit path and of the analysis a miss or a write pays for, without
//! the network: `cargo bench --bench hot_path`. Prints nanoseconds per operation (median of
//! several rounds); numbers are for comparing commits on one machine, not across machines.

use pgstash::analysis::{NoCatalog, analyze, instantiate, literal_shape, literal_shape_into};
use pgstash::cache::{CacheKey, Dependency, Entry, Generations, L1, Lookup, TableId};
use pgstash::catalog::Catalog;
use pgstash::config::{CacheConfig, UpstreamTarget};
use pgstash::relay::caching::CacheShared;
use std::hint::black_box;
use std::time::Instant;

fn per_op(name: &str, iters: u64, mut f: impl FnMut(u64)) {
    let mut rounds: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for i in 0..iters {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    rounds.sort_by(|a, b| a.total_cmp(b));
    println!("{name:<48} {:>10.1} ns/op", rounds[rounds.len() / 2]);
}

fn main() {
    let gens = Generations::new(1 << 16);
    let l1 = L1::new(64 << 20);
    let table = TableId(7);
    // 10,000 point-read entries, as W1 keeps hot.
    for k in 0..10_000u64 {
        let key = CacheKey(u128::from(k));
        if let Lookup::Miss(guard) = l1.lookup(key, &gens) {
            let snap = gens.snapshot(&[Dependency::Key(table, k)]);
            let response = bytes::Bytes::from(vec![b'D'; 64]);
            let _ = guard.fill(
                Entry::new(response, 1, snap),
                std::time::Duration::from_secs(600),
                &gens,
            );
        }
    }
    per_op("L1 hit (lookup + freshness check)", 1_000_000, |i| {
        let key = CacheKey(u128::from(i % 10_000));
        black_box(matches!(l1.lookup(key, &gens), Lookup::Hit(_)));
    });
    per_op(
        "cache key: xxh3-128 of a W1 query + params",
        1_000_000,
        |i| {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(b"postgres\0postgres\0");
            h.update(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1");
            h.update(&i.to_be_bytes());
            black_box(h.digest128());
        },
    );
    let mut fresh = 1u64 << 40;
    per_op("L1 miss of a new key + fill, stored", 200_000, |_| {
        fresh += 1;
        let key = CacheKey(u128::from(fresh));
        if let Lookup::Miss(guard) = l1.lookup(key, &gens) {
            let snap = gens.snapshot(&[Dependency::Key(table, fresh)]);
            let response = bytes::Bytes::from(vec![b'D'; 64]);
            let _ = black_box(guard.fill(
                Entry::new(response, 1, snap),
                std::time::Duration::from_secs(600),
                &gens,
            ));
        }
    });
    // The memoised analysis as the relay calls it (text memo, then literal shape).
    let shared = CacheShared::new(
        CacheConfig::default(),
        None,
        UpstreamTarget::parse("postgres://bench@127.0.0.1:1/bench").expect("a valid URL"),
        std::time::Duration::from_secs(1),
    );
    let catalog = Catalog::default();
    let w1 = |i: u64| {
        format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
            i % 10_000
        )
    };
    for i in 0..20_000 {
        shared.analyze("bench", &w1(i), &catalog);
    }
    per_op("memoised analysis: repeated W1 text", 200_000, |i| {
        let sql = w1(i);
        black_box(shared.analyze("bench", &sql, &catalog));
    });
    let mut aid = 1u64 << 32;
    per_op(
        "memoised analysis: new W2 text (shape known)",
        200_000,
        |_| {
            aid += 1;
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}");
            black_box(shared.analyze("bench", &sql, &catalog));
        },
    );
    // The same with admission on the second miss (the default): W2's keys are seen once,
    // so the fill is declined and nothing is stored.
    let admitting = L1::with_config(pgstash::cache::L1Config {
        max_bytes: 64 << 20,
        admit_on_second_miss: true,
        ..Default::default()
    });
    per_op(
        "L1 miss of a new key, fill declined (admission)",
        200_000,
        |_| {
            fresh += 1;
            let key = CacheKey(u128::from(fresh));
            if let Lookup::Miss(guard) = admitting.lookup(key, &gens) {
                // As the relay does: the response is copied only if it is going to be stored.
                let snap = gens.snapshot(&[Dependency::Key(table, fresh)]);
                let ttl = std::time::Duration::from_secs(600);
                match guard.refusal(&snap, ttl, &gens) {
                    Some(refused) => drop(black_box(refused)),
                    None => {
                        let response = bytes::Bytes::from(vec![b'D'; 64]);
                        let _ = black_box(guard.fill(Entry::new(response, 1, snap), ttl, &gens));
                    }
                }
            }
        },
    );
    per_op("generation bump of one key", 1_000_000, |i| {
        gens.bump_keys(table, &[i % 10_000]);
    });
    per_op("analysis: W1 point read (sqlparser)", 20_000, |i| {
        let sql = format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
            i % 10_000
        );
        black_box(analyze(&sql, &NoCatalog));
    });
    per_op("analysis: W4 update by key (sqlparser)", 20_000, |i| {
        let sql = format!(
            "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {}",
            i % 5000,
            i % 100_000
        );
        black_box(analyze(&sql, &NoCatalog));
    });
    let template = analyze(
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        &NoCatalog,
    );
    // Into one reused buffer, as the proxy shapes texts.
    let mut text = String::new();
    per_op("literal shape of a W4 update", 500_000, |i| {
        let sql = format!(
            "UPDATE pgbench_accounts SET abalance = abalance + -{} WHERE aid = {};",
            i % 5000,
            i % 100_000
        );
        black_box(literal_shape_into(&sql, &mut text));
    });
    per_op(
        "analysis: W4 update by key (literal shape memo hit)",
        200_000,
        |i| {
            let sql = format!(
                "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {}",
                i % 5000,
                i % 100_000
            );
            // What a memo hit costs: shaping the text and filling in its literals (the map
            // lookup itself is measured by the L1 line above).
            if let Some(shape) = literal_shape(&sql) {
                black_box(xxhash_rust::xxh3::xxh3_64(shape.text.as_bytes()));
                black_box(instantiate(&template, &shape.literals));
            }
        },
    );
}
