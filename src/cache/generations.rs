//! Generations: the counters that prove a cached entry fresh (DESIGN.md "Freshness" and
//! "Row-precise invalidation").
//!
//! Every table has `any(t)` (bumped by every write) and `wide(t)` (bumped by DDL, TRUNCATE
//! and writes whose keys are unknown); every key value has `key(t, k)`, kept in a fixed
//! array of stripes indexed by a hash of `(t, k)`. A reader takes a [`Snapshot`] of the
//! generations it depends on *before* its query goes upstream; the entry it fills is served
//! only while the snapshot is current.
//!
//! Safety argument, in one place: every bump stores a value taken from one process-wide
//! counter that only grows, so a location never holds the same value twice. A snapshot that
//! still equals the current value therefore proves no bump happened in between. Losing a
//! value (a stripe shared by two keys, a table entry reset) can only make values differ,
//! that is cause a miss, never a stale hit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{BuildMix, mix};

/// A table identity (an OID, or a hash of "schema.table"; the caller resolves names).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TableId(pub u64);

impl TableId {
    /// Not a table: a `Wide` invalidation of it tells other instances that the schema of
    /// some database changed (DDL), so their catalogs and analyses must be reloaded.
    /// Nothing depends on it, so locally it bumps nothing.
    pub const SCHEMA_CHANGED: TableId = TableId(u64::MAX);
}

/// What a cached read depends on.
///
/// There is no stand-alone "wide" dependency: a point read that watched only `key(t, k)`
/// would survive a TRUNCATE, so [`Dependency::Key`] always includes `wide(t)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Dependency {
    /// Any change to the table: every read that is not a point read, per table read.
    AnyOf(TableId),
    /// A point read pinning the primary key of its single table by equality: depends on
    /// `wide(t)` and `key(t, k)`, where `k` hashes the canonical key value.
    Key(TableId, u64),
}

/// A committed change, as a value: applied locally and, later, published to other
/// instances (which apply it to their own [`Generations`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Invalidation {
    /// A write whose affected keys (hashes of canonical key values) are known: bumps
    /// `any(t)` and each `key(t, k)`.
    Keys(TableId, Vec<u64>),
    /// Unknown keys, DDL, TRUNCATE, GRANT/REVOKE on the table: bumps `wide(t)` and `any(t)`.
    Wide(TableId),
    /// Everything (unattributable DDL, FLUSH, a resync with the shared tier).
    All,
}

impl Invalidation {
    /// The same bumps as `invs`, in fewer items: per table one `Wide` (which bumps every
    /// generation a `Keys` of the table would) or one `Keys` with the union of the keys, and
    /// one `All`. `All` does not absorb the rest, so a `Wide` of
    /// [`TableId::SCHEMA_CHANGED`] still tells other instances to reload their catalogs.
    /// Tables keep the order of their first item.
    pub fn coalesce(invs: impl IntoIterator<Item = Invalidation>) -> Vec<Invalidation> {
        // Per table: `None` once a `Wide` was seen, else the keys so far.
        let mut tables: Vec<(TableId, Option<Vec<u64>>)> = Vec::new();
        let mut at: HashMap<TableId, usize> = HashMap::new();
        let mut all = false;
        for inv in invs {
            let (t, keys) = match inv {
                Invalidation::All => {
                    all = true;
                    continue;
                }
                Invalidation::Wide(t) => (t, None),
                Invalidation::Keys(t, keys) => (t, Some(keys)),
            };
            match at.get(&t) {
                None => {
                    at.insert(t, tables.len());
                    tables.push((t, keys));
                }
                Some(&i) => match (&mut tables[i].1, keys) {
                    (Some(have), Some(more)) => have.extend(more),
                    (slot, _) => *slot = None,
                },
            }
        }
        let mut out = Vec::with_capacity(tables.len() + usize::from(all));
        if all {
            out.push(Invalidation::All);
        }
        out.extend(tables.into_iter().map(|(t, keys)| match keys {
            None => Invalidation::Wide(t),
            Some(mut keys) => {
                keys.sort_unstable();
                keys.dedup();
                Invalidation::Keys(t, keys)
            }
        }));
        out
    }
}

/// Where committed writes are reported. [`Generations`] implements it for one instance;
/// the shared tier will add an implementation that also publishes to other instances.
/// Must not block: it is called on the commit path.
pub trait Invalidator: Send + Sync {
    fn invalidate(&self, inv: &Invalidation);
}

/// Epoch value while suspended; never equal to any snapshot's epoch check.
const SUSPENDED: u64 = 0;
/// Value of a table entry that was dropped from the map; never current.
const RETIRED: u64 = u64::MAX;
/// Bound on the table map when none is given (tables are few; clients can name many).
const DEFAULT_MAX_TABLES: usize = 65_536;

static NEXT_ORIGIN: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
struct TableGens {
    any: AtomicU64,
    wide: AtomicU64,
}

/// One dependency as seen at snapshot time. Holding the table's `Arc` makes the freshness
/// check a few atomic loads, with no map lookup and no lock on the hit path.
#[derive(Debug)]
enum Seen {
    Any {
        table: Arc<TableGens>,
        any: u64,
    },
    Key {
        table: Arc<TableGens>,
        wide: u64,
        stripe: usize,
        key: u64,
    },
}

/// Generations a reader saw before it sent its query upstream. Only meaningful to the
/// [`Generations`] that made it (checked).
#[derive(Debug)]
pub struct Snapshot {
    origin: u64,
    epoch: u64,
    seen: SeenList,
}

/// Most reads depend on one table or one key: keep that case inline, which saves an
/// allocation per fill and a dependent cache miss per hit.
#[derive(Debug)]
enum SeenList {
    One(Seen),
    Many(Box<[Seen]>),
}

impl SeenList {
    fn as_slice(&self) -> &[Seen] {
        match self {
            Self::One(seen) => std::slice::from_ref(seen),
            Self::Many(seen) => seen,
        }
    }
}

impl Snapshot {
    /// Heap bytes held, for the cache weigher.
    pub(crate) fn heap_size(&self) -> usize {
        match &self.seen {
            SeenList::One(_) => 0,
            SeenList::Many(seen) => seen.len() * size_of::<Seen>(),
        }
    }
}

/// Tables one thread remembers (see [`Generations::with_table`]).
const MEMO_TABLES: usize = 32;

/// A thread's recent tables of one store, valid while that store has had no reset since.
#[derive(Default)]
struct TableMemo {
    origin: u64,
    resets: u64,
    tables: Vec<(TableId, Arc<TableGens>)>,
}

thread_local! {
    static TABLE_MEMO: std::cell::RefCell<TableMemo> = std::cell::RefCell::default();
}

/// The generation store of one instance.
#[derive(Debug)]
pub struct Generations {
    /// Distinguishes instances so a snapshot is never checked against another store.
    origin: u64,
    /// Source of every generation value: only grows, so values never repeat.
    clock: AtomicU64,
    /// Value of locations never bumped since start.
    start: u64,
    /// Part of every snapshot: `bump_all` and `suspend` change it.
    epoch: AtomicU64,
    /// Tables some snapshot depends on. Bumps happen under this lock (read side) so that
    /// retiring entries (write side) is atomic with respect to them: a retired entry is
    /// never bumped again. Snapshots may read an entry outside it (see `with_table`);
    /// `is_current` does not take it.
    tables: RwLock<HashMap<TableId, Arc<TableGens>, BuildMix>>,
    max_tables: usize,
    table_resets: AtomicU64,
    keys: Box<[AtomicU64]>,
    key_mask: usize,
    stripe_seed: u64,
}

impl Generations {
    /// `key_stripes` is rounded up to a power of two (8 bytes each). More stripes mean
    /// fewer extra misses from unrelated keys sharing a stripe; never a stale hit.
    pub fn new(key_stripes: usize) -> Self {
        let stripes = key_stripes.clamp(1, 1 << 30).next_power_of_two();
        // Seeding from the wall clock keeps values above those of an earlier run, so a
        // generation persisted elsewhere (the shared tier) is not matched after a restart.
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let start = micros.max(1);
        Self {
            origin: NEXT_ORIGIN.fetch_add(1, SeqCst),
            clock: AtomicU64::new(start),
            start,
            epoch: AtomicU64::new(start),
            tables: RwLock::new(HashMap::with_hasher(BuildMix::new())),
            max_tables: DEFAULT_MAX_TABLES,
            table_resets: AtomicU64::new(0),
            keys: new_stripes(stripes, start),
            key_mask: stripes - 1,
            stripe_seed: BuildMix::new().seed,
        }
    }

    /// Bounds the table map. Past the bound every table entry is retired at once (their
    /// snapshots become stale), which only a flood of distinct table names can trigger.
    pub fn with_max_tables(mut self, max_tables: usize) -> Self {
        self.max_tables = max_tables.max(1);
        self
    }

    /// Take before sending a read upstream; store it in the entry the read fills.
    pub fn snapshot(&self, deps: &[Dependency]) -> Snapshot {
        let epoch = self.epoch.load(SeqCst);
        let see = |dep: &Dependency| match *dep {
            Dependency::AnyOf(t) => self.with_table(t, |table| Seen::Any {
                any: table.any.load(SeqCst),
                table: Arc::clone(table),
            }),
            Dependency::Key(t, k) => {
                let stripe = self.stripe(t, k);
                self.with_table(t, |table| Seen::Key {
                    wide: table.wide.load(SeqCst),
                    key: self.keys[stripe].load(SeqCst),
                    stripe,
                    table: Arc::clone(table),
                })
            }
        };
        let seen = match deps {
            [dep] => SeenList::One(see(dep)),
            deps => SeenList::Many(deps.iter().map(see).collect()),
        };
        Snapshot {
            origin: self.origin,
            epoch,
            seen,
        }
    }

    /// Whether nothing the snapshot depends on was bumped since it was taken. The hit path:
    /// a handful of atomic loads, no lock, no allocation.
    #[inline]
    pub fn is_current(&self, s: &Snapshot) -> bool {
        let epoch = self.epoch.load(SeqCst);
        s.origin == self.origin
            && epoch != SUSPENDED
            && epoch == s.epoch
            && s.seen.as_slice().iter().all(|seen| match seen {
                Seen::Any { table, any } => *any != RETIRED && table.any.load(SeqCst) == *any,
                Seen::Key {
                    table,
                    wide,
                    stripe,
                    key,
                } => {
                    *wide != RETIRED
                        && table.wide.load(SeqCst) == *wide
                        && self
                            .keys
                            .get(*stripe)
                            .is_some_and(|g| g.load(SeqCst) == *key)
                }
            })
    }

    /// A committed write whose affected keys are known: bumps `any(t)` and each key.
    pub fn bump_keys(&self, t: TableId, keys: &[u64]) {
        self.bump_table(t, |table, value| {
            for &k in keys {
                self.keys[self.stripe(t, k)].store(value, SeqCst);
            }
            table.any.store(value, SeqCst);
        });
    }

    /// Unknown keys, DDL, TRUNCATE: bumps `wide(t)` and `any(t)`.
    pub fn bump_wide(&self, t: TableId) {
        self.bump_table(t, |table, value| {
            table.wide.store(value, SeqCst);
            table.any.store(value, SeqCst);
        });
    }

    /// Makes every existing snapshot stale.
    pub fn bump_all(&self) {
        // A suspended store stays suspended: `resume` decides when serving is safe again.
        let _ = self.epoch.fetch_update(SeqCst, SeqCst, |e| {
            (e != SUSPENDED).then(|| self.next_value())
        });
    }

    /// Stop proving anything fresh: while suspended, no snapshot is current and no fill is
    /// stored. For when invalidations from other instances may be missed (shared tier
    /// unreachable beyond the configured bound).
    pub fn suspend(&self) {
        self.epoch.store(SUSPENDED, SeqCst);
    }

    /// Serve again, with everything taken before (or during) the suspension stale.
    pub fn resume(&self) {
        self.epoch.store(self.next_value(), SeqCst);
    }

    pub fn is_suspended(&self) -> bool {
        self.epoch.load(SeqCst) == SUSPENDED
    }

    /// Tables currently tracked (for metrics).
    pub fn table_count(&self) -> usize {
        self.tables
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// How many times the table map hit its bound and was reset (for metrics).
    pub fn table_resets(&self) -> u64 {
        self.table_resets.load(SeqCst)
    }

    fn next_value(&self) -> u64 {
        self.clock.fetch_add(1, SeqCst) + 1
    }

    #[inline]
    fn stripe(&self, t: TableId, k: u64) -> usize {
        (mix(self.stripe_seed ^ t.0, k) as usize) & self.key_mask
    }

    /// Runs `f` on the table's generations, inserting the table if missing. Most calls are
    /// answered by this thread's memo of recent tables, without the shared lock (whose
    /// cache line would otherwise bounce between cores on every miss of every client).
    /// A memoised entry may have been retired since: its values are then `RETIRED`, which
    /// no snapshot counts as current, so the memo can cost a miss, never a stale hit.
    fn with_table<R>(&self, t: TableId, f: impl FnOnce(&Arc<TableGens>) -> R) -> R {
        let resets = self.table_resets.load(SeqCst);
        let memoised = TABLE_MEMO.with_borrow(|m| {
            (m.origin == self.origin && m.resets == resets)
                .then(|| {
                    m.tables
                        .iter()
                        .find(|(id, _)| *id == t)
                        .map(|(_, g)| g.clone())
                })
                .flatten()
        });
        if let Some(table) = memoised {
            return f(&table);
        }
        let table = self.with_table_locked(t);
        TABLE_MEMO.with_borrow_mut(|m| {
            if m.origin != self.origin || m.resets != resets || m.tables.len() >= MEMO_TABLES {
                m.origin = self.origin;
                m.resets = resets;
                m.tables.clear();
            }
            m.tables.push((t, table.clone()));
        });
        f(&table)
    }

    /// The table's generations from the shared map, inserting the table if missing.
    fn with_table_locked(&self, t: TableId) -> Arc<TableGens> {
        {
            let tables = self.tables.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(table) = tables.get(&t) {
                return table.clone();
            }
        }
        let mut tables = self.tables.write().unwrap_or_else(PoisonError::into_inner);
        if !tables.contains_key(&t) && tables.len() >= self.max_tables {
            // Snapshots hold these Arcs: marking them RETIRED makes those snapshots stale,
            // since later bumps go to fresh entries the old Arcs never see.
            for table in tables.values() {
                table.any.store(RETIRED, SeqCst);
                table.wide.store(RETIRED, SeqCst);
            }
            tables.clear();
            self.table_resets.fetch_add(1, SeqCst);
        }
        tables
            .entry(t)
            .or_insert_with(|| {
                Arc::new(TableGens {
                    any: AtomicU64::new(self.start),
                    wide: AtomicU64::new(self.start),
                })
            })
            .clone()
    }

    /// Bumps a table with one fresh value. A table not in the map has no snapshot that
    /// depends on it (snapshots insert it), so there is nothing to invalidate; a snapshot
    /// inserting it concurrently was taken after the commit and sees the write.
    fn bump_table(&self, t: TableId, f: impl FnOnce(&TableGens, u64)) {
        let tables = self.tables.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(table) = tables.get(&t) {
            f(table, self.next_value());
        }
    }
}

/// `n` stripes holding `start`, on huge pages where the kernel allows it. A miss's snapshot
/// reads one stripe at random: on 4 KiB pages an 8 MiB array makes that a TLB miss as well
/// as a cache miss nearly every time (in a VM, a two-level page walk).
fn new_stripes(n: usize, start: u64) -> Box<[AtomicU64]> {
    let mut stripes: Vec<AtomicU64> = Vec::with_capacity(n);
    // Before the first write: pages already touched would stay small.
    crate::huge_pages::advise(stripes.as_mut_ptr().cast(), n * size_of::<AtomicU64>());
    stripes.extend((0..n).map(|_| AtomicU64::new(start)));
    stripes.into_boxed_slice()
}

impl Invalidator for Generations {
    fn invalidate(&self, inv: &Invalidation) {
        match inv {
            Invalidation::Keys(table, keys) => self.bump_keys(*table, keys),
            Invalidation::Wide(table) => self.bump_wide(*table),
            Invalidation::All => self.bump_all(),
        }
    }
}
