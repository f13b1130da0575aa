//! Single-flight fills and races between readers and writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Barrier;

use super::{T, TTL, entry, is_hit, key};
use crate::cache::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_of_one_key_make_one_upstream_query() {
    concurrent_misses_make_one_upstream_query(L1::new(1 << 20)).await;
}

/// Waiters prove the key repeats: its first fill is stored although it is its first miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_misses_are_coalesced_and_stored_under_second_miss_admission() {
    concurrent_misses_make_one_upstream_query(L1::with_config(L1Config {
        max_bytes: 1 << 20,
        admit_on_second_miss: true,
        ..L1Config::default()
    }))
    .await;
}

async fn concurrent_misses_make_one_upstream_query(l1: L1) {
    let gens = Arc::new(Generations::new(1024));
    let (barrier, upstream) = (Arc::new(Barrier::new(50)), Arc::new(AtomicUsize::new(0)));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (gens, l1, barrier, upstream) =
                (gens.clone(), l1.clone(), barrier.clone(), upstream.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                match l1.get(key(7), &gens).await {
                    Resolved::Hit(e) => e.response.clone(),
                    Resolved::Miss(guard) => {
                        upstream.fetch_add(1, Ordering::SeqCst);
                        let e = entry(&gens, &[Dependency::AnyOf(T)], b"answer");
                        tokio::time::sleep(Duration::from_millis(50)).await; // upstream
                        let body = e.response.clone();
                        assert_eq!(guard.fill(e, TTL, &gens), FillOutcome::Stored);
                        body
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(&task.await.unwrap()[..], b"answer");
    }
    assert_eq!(upstream.load(Ordering::SeqCst), 1);
    assert_eq!(l1.fills_in_flight(), 0);
}

#[tokio::test]
async fn dropping_the_guard_wakes_waiters_who_go_upstream_themselves() {
    let (gens, l1) = (Arc::new(Generations::new(16)), L1::new(1 << 20));
    let Lookup::Miss(leader) = l1.lookup(key(1), &gens) else {
        panic!("expected a miss");
    };
    assert!(leader.leads());
    let waiters: Vec<_> = (0..3)
        .map(|_| match l1.lookup(key(1), &gens) {
            Lookup::Wait(p) => p,
            _ => panic!("expected to wait for the leader"),
        })
        .collect();
    let started = std::time::Instant::now();
    let woken = tokio::spawn({
        let gens = gens.clone();
        async move {
            let mut guards = Vec::new();
            for p in waiters {
                match p.wait(&gens).await {
                    Resolved::Miss(g) => guards.push(g),
                    Resolved::Hit(_) => panic!("nothing was filled"),
                }
            }
            guards
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(leader); // upstream failed or the result was not cacheable
    let guards = woken.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waiters must not wait for the timeout"
    );
    assert_eq!(guards.len(), 3);
    assert!(
        guards.iter().all(|g| !g.leads()),
        "no new queue behind a failed query"
    );
    // Any of them may fill.
    let mut guards = guards.into_iter();
    let e = entry(&gens, &[], b"late");
    assert_eq!(
        guards.next().unwrap().fill(e, TTL, &gens),
        FillOutcome::Stored
    );
    assert!(is_hit(&l1, key(1), &gens));
}

#[tokio::test]
async fn waiters_give_up_on_a_slow_filler_and_later_lookups_do_not_wait() {
    let gens = Generations::new(16);
    let l1 = L1::with_config(L1Config {
        max_bytes: 1 << 20,
        wait_timeout: Duration::from_millis(300),
        ..L1Config::default()
    });
    let Lookup::Miss(_slow) = l1.lookup(key(1), &gens) else {
        panic!("expected a miss");
    };
    let Lookup::Wait(p) = l1.lookup(key(1), &gens) else {
        panic!("expected to wait");
    };
    let Resolved::Miss(g) = p.wait(&gens).await else {
        panic!("expected to go upstream after the timeout");
    };
    assert!(!g.leads());
    assert_eq!(l1.wait_timeouts(), 1);
    assert!(
        matches!(l1.lookup(key(1), &gens), Lookup::Miss(_)),
        "overdue filler: no wait"
    );
}

#[tokio::test]
async fn waiter_does_not_take_a_fill_that_a_write_made_stale() {
    let (gens, l1) = (Generations::new(16), L1::new(1 << 20));
    let Lookup::Miss(leader) = l1.lookup(key(1), &gens) else {
        panic!("expected a miss");
    };
    let Lookup::Wait(p) = l1.lookup(key(1), &gens) else {
        panic!("expected to wait");
    };
    assert_eq!(
        leader.fill(entry(&gens, &[Dependency::AnyOf(T)], b"v1"), TTL, &gens),
        FillOutcome::Stored
    );
    gens.bump_wide(T);
    assert!(matches!(p.wait(&gens).await, Resolved::Miss(_)));
}

/// Readers racing a writer never see a version older than the last write whose
/// invalidation finished before their lookup began.
#[test]
fn no_stale_hit_under_concurrent_writes() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let (gens, l1) = (Arc::new(Generations::new(1 << 10)), L1::new(1 << 20));
    let (db, invalidated, stop) = (AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(false));
    let deps = [Dependency::Key(T, 5)];
    std::thread::scope(|s| {
        s.spawn(|| {
            let started = std::time::Instant::now();
            for v in 1.. {
                if started.elapsed() > Duration::from_millis(150) {
                    break;
                }
                db.store(v, Ordering::SeqCst); // commit
                gens.bump_keys(T, &[5]); // then invalidate
                invalidated.store(v, Ordering::SeqCst);
            }
            stop.store(true, Ordering::SeqCst);
        });
        for _ in 0..3 {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let floor = invalidated.load(Ordering::SeqCst);
                    match l1.lookup(key(1), &gens) {
                        Lookup::Hit(e) => {
                            let seen = u64::from_le_bytes(e.response[..8].try_into().unwrap());
                            assert!(seen >= floor, "stale hit: {seen} < {floor}");
                        }
                        Lookup::Miss(guard) => {
                            let snapshot = gens.snapshot(&deps); // before the "query"
                            let v = db.load(Ordering::SeqCst);
                            std::thread::yield_now(); // let the writer overtake us
                            let body = Bytes::copy_from_slice(&v.to_le_bytes());
                            let _ = guard.fill(Entry::new(body, 1, snapshot), TTL, &gens);
                        }
                        Lookup::Wait(_) => {}
                    }
                }
            });
        }
    });
}
