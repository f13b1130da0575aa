//! Behaviour of generations and the L1 store together, as the proxy uses them.

mod concurrency;

use std::time::Duration;

use bytes::Bytes;

use super::*;

const T: TableId = TableId(1);
const U: TableId = TableId(2);
const TTL: Duration = Duration::from_secs(60);

fn key(n: u128) -> CacheKey {
    CacheKey(n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
}

fn entry(gens: &Generations, deps: &[Dependency], body: &'static [u8]) -> Entry {
    Entry::new(Bytes::from_static(body), 1, gens.snapshot(deps))
}

fn is_hit(l1: &L1, k: CacheKey, gens: &Generations) -> bool {
    matches!(l1.lookup(k, gens), Lookup::Hit(_))
}

/// Miss, then fill with a snapshot taken now (as if upstream answered instantly).
fn fill_now(
    l1: &L1,
    gens: &Generations,
    k: CacheKey,
    deps: &[Dependency],
    ttl: Duration,
) -> FillOutcome {
    let Lookup::Miss(guard) = l1.lookup(k, gens) else {
        panic!("expected a miss");
    };
    guard.fill(entry(gens, deps, b"rows"), ttl, gens)
}

#[test]
fn hit_after_fill_returns_the_stored_bytes() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    assert_eq!(
        fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL),
        FillOutcome::Stored
    );
    let Lookup::Hit(e) = l1.lookup(key(1), &gens) else {
        panic!("expected a hit");
    };
    assert_eq!(&e.response[..], b"rows");
    assert_eq!(e.ttl(), TTL);
}

fn admitting_on_second_miss() -> L1 {
    L1::with_config(L1Config {
        max_bytes: 1 << 20,
        admit_on_second_miss: true,
        ..L1Config::default()
    })
}

#[test]
fn under_second_miss_admission_a_key_is_stored_on_its_second_miss() {
    let (gens, l1) = (Generations::new(1024), admitting_on_second_miss());
    let deps = [Dependency::AnyOf(T)];
    assert_eq!(
        fill_now(&l1, &gens, key(1), &deps, TTL),
        FillOutcome::NotAdmitted
    );
    assert!(
        !is_hit(&l1, key(1), &gens),
        "nothing stored, no one left waiting"
    );
    assert_eq!(l1.fills_in_flight(), 0);
    assert_eq!(
        fill_now(&l1, &gens, key(1), &deps, TTL),
        FillOutcome::Stored
    );
    assert!(is_hit(&l1, key(1), &gens));
    // Other keys have their own first miss.
    assert_eq!(
        fill_now(&l1, &gens, key(2), &deps, TTL),
        FillOutcome::NotAdmitted
    );
}

#[test]
fn under_second_miss_admission_a_stale_entry_is_replaced_at_once() {
    let (gens, l1) = (Generations::new(1024), admitting_on_second_miss());
    let deps = [Dependency::AnyOf(T)];
    let _ = fill_now(&l1, &gens, key(1), &deps, TTL);
    assert_eq!(
        fill_now(&l1, &gens, key(1), &deps, TTL),
        FillOutcome::Stored
    );
    gens.bump_wide(T);
    assert_eq!(
        fill_now(&l1, &gens, key(1), &deps, TTL),
        FillOutcome::Stored
    );
    assert!(is_hit(&l1, key(1), &gens));
}

#[test]
fn entry_is_stale_after_bump_wide_and_is_replaced_by_the_next_fill() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    let _ = fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL);
    gens.bump_wide(T);
    for _ in 0..2 {
        let Lookup::Miss(guard) = l1.lookup(key(1), &gens) else {
            panic!("a stale entry must be a miss, every time it is looked up");
        };
        assert!(guard.found_stale());
    }
    assert_eq!(l1.stale_found(), 2);
    assert_eq!(
        fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL),
        FillOutcome::Stored
    );
    assert!(is_hit(&l1, key(1), &gens), "the fresh fill is served");
    l1.run_pending_tasks();
    assert_eq!(l1.entry_count(), 1, "the fill replaced the stale entry");
}

#[test]
fn point_entry_survives_other_keys_but_not_its_key_or_wide() {
    let (gens, l1) = (Generations::new(1 << 16), L1::new(1 << 20));
    let point = [Dependency::Key(T, 42)];
    let _ = fill_now(&l1, &gens, key(1), &point, TTL);
    gens.bump_keys(T, &[7, 8, 9]);
    gens.bump_wide(U);
    assert!(
        is_hit(&l1, key(1), &gens),
        "other keys and tables must not invalidate"
    );
    gens.bump_keys(T, &[42]);
    assert!(!is_hit(&l1, key(1), &gens), "its own key must invalidate");

    let _ = fill_now(&l1, &gens, key(2), &point, TTL);
    gens.bump_wide(T);
    assert!(
        !is_hit(&l1, key(2), &gens),
        "wide(t) must invalidate point reads"
    );
}

#[test]
fn any_of_entry_is_invalidated_by_a_write_to_any_key() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    let _ = fill_now(
        &l1,
        &gens,
        key(1),
        &[Dependency::AnyOf(U), Dependency::AnyOf(T)],
        TTL,
    );
    gens.bump_keys(TableId(3), &[5]);
    assert!(is_hit(&l1, key(1), &gens));
    gens.bump_keys(T, &[123_456]);
    assert!(!is_hit(&l1, key(1), &gens));
}

#[test]
fn fill_is_rejected_when_a_write_committed_between_snapshot_and_fill() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    let Lookup::Miss(guard) = l1.lookup(key(1), &gens) else {
        panic!("expected a miss");
    };
    let e = entry(&gens, &[Dependency::Key(T, 1)], b"old rows"); // snapshot, query sent
    gens.bump_keys(T, &[1]); // a writer commits while the read is upstream
    assert_eq!(guard.fill(e, TTL, &gens), FillOutcome::Stale);
    assert!(!is_hit(&l1, key(1), &gens));
}

#[test]
fn bump_all_invalidates_everything_including_table_free_reads() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    let _ = fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL);
    let _ = fill_now(&l1, &gens, key(2), &[Dependency::Key(U, 1)], TTL);
    let _ = fill_now(&l1, &gens, key(3), &[], TTL); // SELECT 1
    gens.bump_wide(T);
    assert!(
        is_hit(&l1, key(3), &gens),
        "a read of no table survives table bumps"
    );
    gens.bump_all();
    for k in 1..=3 {
        assert!(!is_hit(&l1, key(k), &gens));
    }
}

#[test]
fn bump_of_a_table_nobody_read_changes_nothing_and_later_reads_cache() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    gens.bump_wide(T);
    gens.bump_keys(T, &[1]);
    assert_eq!(gens.table_count(), 0, "bumps must not grow the table map");
    let _ = fill_now(&l1, &gens, key(1), &[Dependency::Key(T, 1)], TTL);
    assert!(is_hit(&l1, key(1), &gens));
}

#[test]
fn suspended_store_serves_and_stores_nothing_and_resume_flushes() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    let _ = fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL);
    gens.suspend();
    gens.bump_all(); // must not end the suspension
    assert!(gens.is_suspended());
    assert!(!is_hit(&l1, key(1), &gens));
    assert_eq!(fill_now(&l1, &gens, key(2), &[], TTL), FillOutcome::Stale);
    let during = gens.snapshot(&[Dependency::AnyOf(T)]);
    gens.resume();
    assert!(
        !gens.is_current(&during),
        "snapshots taken while suspended stay stale"
    );
    assert_eq!(fill_now(&l1, &gens, key(3), &[], TTL), FillOutcome::Stored);
    assert!(is_hit(&l1, key(3), &gens));
}

#[test]
fn snapshot_from_another_store_is_never_current() {
    let (a, b) = (Generations::new(16), Generations::new(16));
    assert!(!b.is_current(&a.snapshot(&[Dependency::AnyOf(T)])));
}

#[test]
fn table_map_reset_makes_old_snapshots_stale() {
    let gens = Generations::new(16).with_max_tables(2);
    let old = gens.snapshot(&[Dependency::AnyOf(T), Dependency::Key(U, 1)]);
    assert!(gens.is_current(&old));
    let _ = gens.snapshot(&[Dependency::AnyOf(TableId(3))]); // third table: reset
    assert_eq!(gens.table_resets(), 1);
    assert!(!gens.is_current(&old));
    gens.bump_wide(T); // reaches the new entry only
    let new = gens.snapshot(&[Dependency::AnyOf(T)]);
    assert!(gens.is_current(&new));
}

#[test]
fn invalidations_applied_through_the_invalidator_trait() {
    let gens = Generations::new(1024);
    let sink: &dyn Invalidator = &gens;
    let point = gens.snapshot(&[Dependency::Key(T, 9)]);
    let table = gens.snapshot(&[Dependency::AnyOf(U)]);
    sink.invalidate(&Invalidation::Keys(T, vec![9]));
    assert!(!gens.is_current(&point));
    assert!(gens.is_current(&table));
    sink.invalidate(&Invalidation::Wide(U));
    assert!(!gens.is_current(&table));
}

#[tokio::test]
async fn each_entry_expires_after_its_own_ttl() {
    let (gens, l1) = (Generations::new(16), L1::new(1 << 20));
    let _ = fill_now(&l1, &gens, key(1), &[], Duration::from_millis(300));
    let _ = fill_now(&l1, &gens, key(2), &[], Duration::from_secs(10));
    assert!(is_hit(&l1, key(1), &gens));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!is_hit(&l1, key(1), &gens));
    assert!(is_hit(&l1, key(2), &gens));
}

#[tokio::test]
async fn replacing_an_entry_takes_the_new_entrys_ttl() {
    let (gens, l1) = (Generations::new(16), L1::new(1 << 20));
    let _ = fill_now(
        &l1,
        &gens,
        key(1),
        &[Dependency::AnyOf(T)],
        Duration::from_millis(50),
    );
    gens.bump_wide(T);
    let _ = fill_now(
        &l1,
        &gens,
        key(1),
        &[Dependency::AnyOf(T)],
        Duration::from_secs(10),
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(is_hit(&l1, key(1), &gens));
}

#[test]
fn weighted_size_stays_within_the_byte_bound() {
    let (gens, max) = (Generations::new(16), 64 * 1024);
    let l1 = L1::new(max);
    for n in 0..100 {
        let Lookup::Miss(guard) = l1.lookup(key(n), &gens) else {
            panic!("expected a miss");
        };
        let body = Bytes::from(vec![b'x'; 4096]);
        let _ = guard.fill(Entry::new(body, 1, gens.snapshot(&[])), TTL, &gens);
    }
    l1.run_pending_tasks();
    assert!(l1.weighted_size() <= max, "{} > {max}", l1.weighted_size());
    assert!(l1.entry_count() < 100 && l1.entry_count() > 0);
}

#[test]
fn an_absurd_ttl_is_accepted_without_panic() {
    let (gens, l1) = (Generations::new(16), L1::new(1 << 20));
    assert_eq!(
        fill_now(&l1, &gens, key(1), &[], Duration::MAX),
        FillOutcome::Stored
    );
    l1.run_pending_tasks();
    assert!(is_hit(&l1, key(1), &gens));
}

// The front of recent hits (cache/front.rs) is only a shortcut: what it serves is held to
// the same generations, TTL and FLUSH as moka's entries.

#[test]
fn a_hit_from_the_front_is_still_checked_against_the_generations() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    let _ = fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL);
    assert!(
        is_hit(&l1, key(1), &gens),
        "the first hit goes to the front"
    );
    assert!(is_hit(&l1, key(1), &gens), "served from the front");
    gens.bump_wide(T);
    let Lookup::Miss(guard) = l1.lookup(key(1), &gens) else {
        panic!("a stale entry must be a miss, from the front too");
    };
    assert!(guard.found_stale());
}

#[test]
fn an_entry_past_its_ttl_is_not_served_from_the_front() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    let ttl = Duration::from_millis(50);
    let _ = fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], ttl);
    assert!(is_hit(&l1, key(1), &gens));
    std::thread::sleep(Duration::from_millis(80));
    assert!(!is_hit(&l1, key(1), &gens), "expired");
}

#[test]
fn flush_empties_the_front_too() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    let _ = fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL);
    assert!(is_hit(&l1, key(1), &gens));
    l1.clear();
    assert!(!is_hit(&l1, key(1), &gens));
}

#[test]
fn refusal_says_in_advance_what_fill_would_refuse() {
    let (gens, l1) = (Generations::new(1024), admitting_on_second_miss());
    let deps = [Dependency::AnyOf(T)];
    let Lookup::Miss(first) = l1.lookup(key(1), &gens) else {
        panic!("expected a miss");
    };
    let snap = gens.snapshot(&deps);
    assert_eq!(
        first.refusal(&snap, Duration::ZERO, &gens),
        Some(FillOutcome::NoTtl)
    );
    assert_eq!(
        first.refusal(&snap, TTL, &gens),
        Some(FillOutcome::NotAdmitted)
    );
    drop(first);
    let Lookup::Miss(second) = l1.lookup(key(1), &gens) else {
        panic!("expected a miss");
    };
    let snap = gens.snapshot(&deps);
    assert_eq!(
        second.refusal(&snap, TTL, &gens),
        None,
        "second miss: stored"
    );
    gens.bump_wide(T);
    assert_eq!(
        second.refusal(&snap, TTL, &gens),
        Some(FillOutcome::Stale),
        "a write since the snapshot comes before admission"
    );
    assert_eq!(
        second.fill(Entry::new(Bytes::from_static(b"rows"), 1, snap), TTL, &gens),
        FillOutcome::Stale
    );
}

#[test]
fn a_fill_completing_between_a_cache_read_and_the_in_flight_check_is_a_hit() {
    use std::sync::atomic::Ordering::SeqCst;
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    let inner = l1.inner_for_tests();
    // A lookup read the shard's fill count, then missed in the cache...
    let fills_before = inner.shard(key(1)).fills.load(SeqCst);
    // ...while another lookup's fill of the same key completed...
    assert_eq!(
        fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL),
        FillOutcome::Stored
    );
    // ...so the first one, finding no fill in flight, must read the cache again.
    assert!(matches!(
        fill::miss(inner, key(1), &gens, false, fills_before),
        Lookup::Hit(_)
    ));
    // With no fill since its read, a miss is a miss.
    let fills_now = inner.shard(key(2)).fills.load(SeqCst);
    assert!(matches!(
        fill::miss(inner, key(2), &gens, false, fills_now),
        Lookup::Miss(_)
    ));
}

#[test]
fn peek_finds_fresh_entries_and_leaves_no_trace_of_a_miss() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    assert!(l1.peek(key(1), &gens).is_none());
    // The peek started no fill: the next lookup is the first miss, not a wait behind one.
    assert_eq!(
        fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL),
        FillOutcome::Stored
    );
    let e = l1.peek(key(1), &gens).expect("fresh entry");
    assert_eq!(&e.response[..], b"rows");
    // Twice: the second comes from the front, which the first peek filled.
    assert!(l1.peek(key(1), &gens).is_some());
    assert!(l1.peek(key(2), &gens).is_none());
}

#[test]
fn peek_never_returns_a_stale_entry_and_leaves_it_to_lookup() {
    let (gens, l1) = (Generations::new(1024), L1::new(1 << 20));
    assert_eq!(
        fill_now(&l1, &gens, key(1), &[Dependency::AnyOf(T)], TTL),
        FillOutcome::Stored
    );
    assert!(l1.peek(key(1), &gens).is_some());
    gens.bump_wide(T);
    assert!(l1.peek(key(1), &gens).is_none());
    assert!(l1.peek(key(1), &gens).is_none());
    // The full lookup still finds it stale (and removes it).
    let Lookup::Miss(guard) = l1.lookup(key(1), &gens) else {
        panic!("expected a miss");
    };
    assert!(guard.found_stale());
}

#[test]
fn an_entry_keeps_the_catalog_epoch_it_was_planned_with() {
    let gens = Generations::new(1024);
    assert_eq!(entry(&gens, &[], b"x").catalog_epoch(), 0);
    assert_eq!(entry(&gens, &[], b"x").planned_with(7).catalog_epoch(), 7);
}

/// Whether applying `invs` makes a read with dependency `d` stale, by the contract of
/// [`Invalidation`]: `Keys` bumps `any(t)` and its keys, `Wide` bumps `wide(t)` and `any(t)`.
fn stales(invs: &[Invalidation], d: Dependency) -> bool {
    invs.iter().any(|inv| match (inv, d) {
        (Invalidation::All, _) => true,
        (Invalidation::Wide(t), Dependency::AnyOf(u) | Dependency::Key(u, _)) => *t == u,
        (Invalidation::Keys(t, _), Dependency::AnyOf(u)) => *t == u,
        (Invalidation::Keys(t, keys), Dependency::Key(u, k)) => *t == u && keys.contains(&k),
    })
}

/// Coalescing a batch of commits' invalidations (as the shared tier publishes them) must
/// leave exactly the reads stale that applying each one would: generated batches over a few
/// tables and keys, each read's fate compared under both.
#[test]
fn coalesced_invalidations_make_exactly_the_same_reads_stale() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let tables = [T, U, TableId(3)];
    let mut deps = vec![];
    for t in tables {
        deps.push(Dependency::AnyOf(t));
        deps.extend((0..4).map(|k| Dependency::Key(t, k)));
    }
    let mut shrunk = 0;
    for _ in 0..2000 {
        let batch: Vec<Invalidation> = (0..rng.gen_range(1..8))
            .map(|_| {
                let t = tables[rng.gen_range(0..tables.len())];
                match rng.gen_range(0..12) {
                    0 => Invalidation::All,
                    1 | 2 => Invalidation::Wide(t),
                    _ => {
                        let n = rng.gen_range(0..3);
                        Invalidation::Keys(t, (0..n).map(|_| rng.gen_range(0..4)).collect())
                    }
                }
            })
            .collect();
        let coalesced = Invalidation::coalesce(batch.clone());
        shrunk += usize::from(coalesced.len() < batch.len());
        for &d in &deps {
            assert_eq!(
                stales(&batch, d),
                stales(&coalesced, d),
                "{d:?} after {batch:?} coalesced to {coalesced:?}"
            );
        }
    }
    assert!(
        shrunk > 500,
        "batches should often coalesce ({shrunk} of 2000 did)"
    );
}

#[test]
fn coalescing_keeps_the_schema_change_signal_beside_all() {
    let schema = Invalidation::Wide(TableId::SCHEMA_CHANGED);
    let got = Invalidation::coalesce([
        Invalidation::Keys(T, vec![3, 1]),
        schema.clone(),
        Invalidation::All,
        Invalidation::Keys(T, vec![1, 2]),
    ]);
    assert_eq!(
        got,
        [
            Invalidation::All,
            Invalidation::Keys(T, vec![1, 2, 3]),
            schema
        ]
    );
}
