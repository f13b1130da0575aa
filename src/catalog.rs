//! What the cache needs to know about a database's schema, read from `pg_catalog` over a
//! control-plane connection (tokio-postgres): which relations are views over which tables,
//! which tables inherit from which (partitions), which tables row-security policies read,
//! each table's primary key, and which functions are volatile.
//!
//! Relations are identified by their bare name, whatever the schema: a write to `s1.t`
//! invalidates reads of `s2.t` too. That over-invalidates when two schemas share a table name,
//! but it can never miss one, and it spares resolving every name through each session's
//! `search_path` (results never cross `search_path`s anyway: it is part of the cache key).

use crate::cache::BuildMix;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog connection to {db} failed: {source}")]
    Connect {
        db: String,
        source: tokio_postgres::Error,
    },
    #[error("catalog connection to {0} timed out")]
    Timeout(String),
    #[error("catalog query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// A primary key usable for row-precise invalidation: one column of an integer type, so that
/// every spelling of a value can be brought to one canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntKey {
    pub column: String,
}

/// A setting change a called function may make unseen (see
/// [`Catalog::hidden_setting_change`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenChange {
    /// The role or settings of the session.
    Session,
    /// A setting for the rest of the transaction only.
    Transaction,
}

/// Maps and sets by relation name, looked up for every statement: hashed with the seeded
/// [`BuildMix`], not SipHash.
type NameMap<V> = HashMap<String, V, BuildMix>;
type NameSet = HashSet<String, BuildMix>;

#[derive(Debug, Default, Clone)]
pub struct Catalog {
    /// Relation name → the names of the other relations a read of it reads: a view's base
    /// tables, and the tables a row-security policy on a table reads, recursively.
    bases: NameMap<Vec<String>>,
    /// Relations whose reads run a function that is not immutable where the query text does
    /// not show it (in a view's definition, in a row-security policy, at any depth): like a
    /// volatile call in the text, their reads are never cached.
    opaque: NameSet,
    /// Relation name → the names a write to it changes, itself included: its inheritance
    /// family (partitions, ancestors), the tables its foreign keys cascade into (ON
    /// DELETE/UPDATE CASCADE, SET NULL, SET DEFAULT), a view's base tables, transitively.
    family: NameMap<Vec<String>>,
    /// Relations with user triggers or rules (pgstash's own NOTIFY triggers aside): a write
    /// to them may write any table.
    triggered: NameSet,
    /// Relations whose BEFORE ROW triggers or rules may write other keys than a statement
    /// names: their writes invalidate the whole table.
    rekeyed: NameSet,
    /// Relations whose reads call a volatile user function that the query text does not
    /// show (in a view's definition or a row-security policy, at any depth): such a read
    /// may write any table.
    read_writers: NameSet,
    /// The database has user event triggers: any DDL may write any table.
    pub event_triggers: bool,
    /// Table name → integer primary key, when unambiguous across schemas.
    keys: NameMap<IntKey>,
    /// Function names with at least one overload that is not immutable. Stable functions
    /// count too: one may read tables the cache cannot see it read.
    volatile: HashSet<String>,
    /// Every function name known, to tell "volatile" from "unknown".
    functions: HashSet<String>,
    /// Names of functions outside the system schemas that are not immutable.
    user_volatile: HashSet<String>,
    /// Symbols of operators outside the system schemas whose function is not immutable.
    user_operators: HashSet<String>,
    /// Column name → whether every user relation column of that name (tables, views,
    /// composite types' fields) holds a date or time type, or an array or domain of one.
    time_columns: HashMap<String, bool>,
    /// User relations (and composite types) whose columns `time_columns` covers.
    typed_relations: NameSet,
    /// Lower-cased names of user types that may read the time on input (see
    /// [`crate::analysis::FunctionVolatility::unsafe_type`]).
    unsafe_types: HashSet<String>,
    /// Names of functions outside the system schemas.
    user_functions: HashSet<String>,
    /// Lower-cased names of every type outside the system schemas.
    user_types: HashSet<String>,
    /// Lower-cased names of functions and procedures outside the system schemas whose
    /// source may change the session's role or settings (see [`session_changers`]).
    session_changers: Vec<String>,
    /// Lower-cased names of functions outside the system schemas that call set_config for
    /// the transaction only (and their callers), session changers aside.
    transaction_changers: Vec<String>,
    /// A user-defined implicit or assignment cast that runs code that is not immutable (a
    /// cast from text to timestamptz WITH INOUT reads 'now'): queries may call it where
    /// their text shows no cast, so no read of this database is cached.
    pub hidden_casts: bool,
    /// Whether sessions of this database may start with a default isolation stricter than
    /// READ COMMITTED (postgresql.conf, `ALTER DATABASE`/`ALTER ROLE ... SET
    /// default_transaction_isolation`): a plain BEGIN may then open a snapshot transaction,
    /// whose reads must neither be served from the cache nor fill it.
    pub strict_isolation_default: bool,
    pub loaded_at: Option<Instant>,
    /// Unique per load (0: not loaded from a database). A cached result remembers the epoch
    /// of the catalog its read was planned with: the hit path that skips analysis may serve
    /// it only while that catalog is still the current one.
    pub epoch: u64,
}

/// User types whose input may read the current time or run code that is not immutable:
/// composite types (their fields' input), ranges and multiranges, domains with a constraint
/// (a CHECK may call clock_timestamp()) or over a date or time (typcategory D), base types
/// with an input function that is not immutable (arrays excepted: judged by their element),
/// and every type built on one of those (domains, arrays). Defines `unsafe_type(oid, name)`.
const UNSAFE_TYPES: &str = "WITH RECURSIVE unsafe_type(oid, name) AS (
        SELECT t.oid, t.typname::text FROM pg_type t
         WHERE t.typnamespace NOT IN ('pg_catalog'::regnamespace,
                                      'information_schema'::regnamespace)
           AND (t.typtype IN ('c', 'r', 'm')
                OR (t.typtype = 'd'
                    AND (t.typcategory = 'D'
                         OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.contypid = t.oid)))
                OR (t.typtype = 'b' AND t.typcategory <> 'A'
                    AND EXISTS (SELECT 1 FROM pg_proc p
                                 WHERE p.oid = t.typinput AND p.provolatile <> 'i')))
        UNION
        SELECT t.oid, t.typname::text FROM pg_type t
          JOIN unsafe_type u ON t.typbasetype = u.oid OR t.typelem = u.oid
     )";

/// Views and row-security policies whose reads are never cached, in one query over their
/// stored expression trees (`expr`):
/// - a call of a function that is not immutable (pg_depend does not record built-ins such
///   as now() and nextval(), so the trees are searched for every function id they call),
///   or a CURRENT_DATE-like keyword (SQLValueFunction; those of type `name`, CURRENT_USER
///   and friends, are answered by the cache key, as are current_setting() and the like);
/// - text read as a type whose input is not immutable ('now' stored in a row read as a
///   date): a CoerceViaIO node, whose input function the tree does not name. Its fields end
///   `:resulttype T :resultcollid C :coerceformat`, which no other node's do (RelabelType,
///   ArrayCoerceExpr and CoerceToDomain have a typmod in between), so nested casts are each
///   found;
/// - a table function (XMLTABLE reads text as its column types where no such node shows)
///   or TABLESAMPLE (another sample each time);
/// - values of the unsafe user types made where no conversion shows (hstore's immutable
///   populate_record(NULL::composite, h), a domain's CHECK);
/// - views and policies over system relations (pg_stat_activity, pg_sequences...), which
///   change without writes.
///
/// A materialized view is not here: reading it runs nothing. Views in system schemas are
/// skipped (never cached anyway), or a user table named like an information_schema view
/// would be caught by its name.
/// Relations that call a volatile function outside the system schemas (and pgstash's)
/// where the query text does not show it, and whether reads call it (views, policies) or
/// only writes (column defaults, domain checks; policies too).
const HIDDEN_CALLERS: &str = "
    WITH writer AS (
        SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE p.provolatile = 'v'
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgstash')
    ), calls AS (
        SELECT d.classid, d.objid FROM pg_depend d JOIN writer w ON w.oid = d.refobjid
         WHERE d.refclassid = 'pg_proc'::regclass
    )
    SELECT c.relname::text, true
      FROM calls k JOIN pg_rewrite r ON r.oid = k.objid JOIN pg_class c ON c.oid = r.ev_class
     WHERE k.classid = 'pg_rewrite'::regclass
    UNION
    SELECT c.relname::text, true
      FROM calls k JOIN pg_policy p ON p.oid = k.objid JOIN pg_class c ON c.oid = p.polrelid
     WHERE k.classid = 'pg_policy'::regclass
    UNION
    SELECT c.relname::text, false
      FROM calls k JOIN pg_attrdef a ON a.oid = k.objid JOIN pg_class c ON c.oid = a.adrelid
     WHERE k.classid = 'pg_attrdef'::regclass
    UNION
    SELECT c.relname::text, false
      FROM calls k
      JOIN pg_constraint t ON t.oid = k.objid AND t.contypid <> 0
      JOIN pg_attribute a ON a.atttypid = t.contypid AND a.attnum > 0 AND NOT a.attisdropped
      JOIN pg_class c ON c.oid = a.attrelid
     WHERE k.classid = 'pg_constraint'::regclass";

const OPAQUE_RELATIONS: [&str; 3] = [
    UNSAFE_TYPES,
    r",
    expr AS (
        SELECT v.relname::text AS rel, r.ev_action::text AS tree
          FROM pg_rewrite r
          JOIN pg_class v ON v.oid = r.ev_class
         WHERE v.relkind = 'v'
           AND v.relnamespace NOT IN ('pg_catalog'::regnamespace,
                                      'information_schema'::regnamespace)
        UNION ALL
        SELECT c.relname::text, pol.polqual::text
          FROM pg_policy pol
          JOIN pg_class c ON c.oid = pol.polrelid
         WHERE pol.polqual IS NOT NULL
    )",
    r"
    SELECT e.rel
      FROM expr e,
           regexp_matches(e.tree, ':(?:funcid|opfuncid|aggfnoid|winfnoid) (\d+)', 'g') m
      JOIN pg_proc p ON p.oid = m[1]::oid
     WHERE p.provolatile <> 'i'
       AND p.proname NOT IN ('current_setting', 'current_user', 'session_user',
                             'current_role', 'current_schema', 'current_database')
    UNION
    SELECT e.rel
      FROM expr e,
           regexp_matches(e.tree, '\{SQLVALUEFUNCTION :op \d+ :type (\d+)', 'g') m
     WHERE m[1] <> '19'
    UNION
    SELECT e.rel
      FROM expr e,
           regexp_matches(e.tree, ':resulttype (\d+) :resultcollid \d+ :coerceformat', 'g') m
      JOIN pg_type t ON t.oid = m[1]::oid
      JOIN pg_proc p ON p.oid = t.typinput
     WHERE p.provolatile <> 'i'
    UNION
    SELECT e.rel FROM expr e
     WHERE e.tree LIKE '%{TABLEFUNC %' OR e.tree LIKE '%{TABLESAMPLECLAUSE %'
    UNION
    SELECT e.rel
      FROM expr e,
           regexp_matches(e.tree,
               ':(?:resulttype|funcresulttype|opresulttype|consttype) (\d+)', 'g') m
     WHERE m[1]::oid IN (SELECT oid FROM unsafe_type)
    UNION
    SELECT v.relname::text
      FROM pg_depend d
      JOIN pg_rewrite r ON r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass
      JOIN pg_class v ON v.oid = r.ev_class
      JOIN pg_class t ON t.oid = d.refobjid AND d.refclassid = 'pg_class'::regclass
     WHERE v.relkind = 'v' AND t.oid <> v.oid
       AND v.relnamespace NOT IN ('pg_catalog'::regnamespace,
                                  'information_schema'::regnamespace)
       AND t.relnamespace IN ('pg_catalog'::regnamespace,
                              'information_schema'::regnamespace,
                              'pg_toast'::regnamespace)
    UNION
    SELECT c.relname::text
      FROM pg_depend d
      JOIN pg_policy pol ON pol.oid = d.objid AND d.classid = 'pg_policy'::regclass
      JOIN pg_class c ON c.oid = pol.polrelid
      JOIN pg_class t ON t.oid = d.refobjid AND d.refclassid = 'pg_class'::regclass
     WHERE t.relnamespace IN ('pg_catalog'::regnamespace,
                              'information_schema'::regnamespace,
                              'pg_toast'::regnamespace)",
];

/// Source of [`Catalog::epoch`]: never reused within the process.
static NEXT_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Catalog {
    /// Load from the database at `url` (a postgres:// URL).
    pub async fn load(url: &str, db: &str, timeout: Duration) -> Result<Catalog, CatalogError> {
        let connect = tokio_postgres::connect(url, NoTls);
        let (client, conn) = match tokio::time::timeout(timeout, connect).await {
            Ok(r) => r.map_err(|source| CatalogError::Connect {
                db: db.to_string(),
                source,
            })?,
            Err(_) => return Err(CatalogError::Timeout(db.to_string())),
        };
        let task = tokio::spawn(conn);
        let result = Self::query(&client).await;
        drop(client);
        task.abort();
        result
    }

    async fn query(client: &tokio_postgres::Client) -> Result<Catalog, CatalogError> {
        let mut cat = Catalog::default();
        // Views and materialized views → the tables their rewrite rules read, recursively
        // resolved below.
        let rows = client
            .query(
                "SELECT DISTINCT v.relname::text, t.relname::text
                   FROM pg_rewrite r
                   JOIN pg_class v ON v.oid = r.ev_class
                   JOIN pg_depend d ON d.objid = r.oid AND d.classid = 'pg_rewrite'::regclass
                   JOIN pg_class t ON t.oid = d.refobjid AND d.refclassid = 'pg_class'::regclass
                  WHERE v.relkind IN ('v', 'm') AND t.oid <> v.oid
                    AND v.relnamespace NOT IN ('pg_catalog'::regnamespace,
                                               'information_schema'::regnamespace)",
                &[],
            )
            .await?;
        let mut direct: HashMap<String, Vec<String>> = HashMap::new();
        for r in rows {
            direct.entry(r.get(0)).or_default().push(r.get(1));
        }
        // A write through an (auto-updatable) view changes its base table.
        let mut write_edges = direct.clone();
        // Row-security policies: a policy's expression may read other tables (a membership
        // subquery), and its rows change when they do. Policies count whether or not row
        // security is enabled or applies to the reader: when in doubt, depend.
        let rows = client
            .query(
                "SELECT DISTINCT c.relname::text, t.relname::text
                   FROM pg_policy pol
                   JOIN pg_class c ON c.oid = pol.polrelid
                   JOIN pg_depend d ON d.objid = pol.oid AND d.classid = 'pg_policy'::regclass
                   JOIN pg_class t ON t.oid = d.refobjid AND d.refclassid = 'pg_class'::regclass
                  WHERE t.oid <> c.oid",
                &[],
            )
            .await?;
        for r in rows {
            direct.entry(r.get(0)).or_default().push(r.get(1));
        }
        // Views and policies that read what no write changes (see OPAQUE_RELATIONS).
        let rows = client.query(&OPAQUE_RELATIONS.concat(), &[]).await?;
        let mut opaque: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        // Relations whose contents change without a write to them: a sequence (nextval() is
        // no write), a foreign table (written in another server), and a table with foreign
        // partitions or children.
        let rows = client
            .query(
                "WITH RECURSIVE up(oid) AS (
                    SELECT oid FROM pg_class
                     WHERE relkind IN ('S', 'f')
                       AND relnamespace NOT IN ('pg_catalog'::regnamespace,
                                                'information_schema'::regnamespace)
                    UNION
                    SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.oid
                 )
                 SELECT c.relname::text FROM up JOIN pg_class c USING (oid)",
                &[],
            )
            .await?;
        opaque.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        for rel in direct.keys() {
            let mut seen = closure(&direct, rel);
            if seen.iter().any(|n| opaque.contains(n)) {
                cat.opaque.insert(rel.clone());
            }
            seen.remove(rel);
            cat.bases.insert(rel.clone(), seen.into_iter().collect());
        }
        cat.opaque.extend(opaque);
        let rows = client
            .query(
                "SELECT c.relname::text, p.relname::text
                   FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid
                   JOIN pg_class p ON p.oid = i.inhparent",
                &[],
            )
            .await?;
        for r in rows {
            let (child, parent): (String, String) = (r.get(0), r.get(1));
            write_edges
                .entry(child.clone())
                .or_default()
                .push(parent.clone());
            write_edges.entry(parent).or_default().push(child);
        }
        let rows = client
            .query(
                "SELECT DISTINCT p.relname::text, c.relname::text
                   FROM pg_constraint k
                   JOIN pg_class c ON c.oid = k.conrelid
                   JOIN pg_class p ON p.oid = k.confrelid
                  WHERE k.contype = 'f'
                    AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))",
                &[],
            )
            .await?;
        for r in rows {
            write_edges.entry(r.get(0)).or_default().push(r.get(1));
        }
        for start in write_edges.keys() {
            let reach = closure(&write_edges, start);
            cat.family
                .insert(start.clone(), reach.into_iter().collect());
        }
        let rows = client
            .query(
                "SELECT c.relname::text
                   FROM pg_trigger t
                   JOIN pg_class c ON c.oid = t.tgrelid
                   JOIN pg_proc f ON f.oid = t.tgfoid
                   JOIN pg_namespace n ON n.oid = f.pronamespace
                  WHERE NOT t.tgisinternal AND n.nspname <> 'pgstash'
                 UNION
                 SELECT c.relname::text
                   FROM pg_rewrite r
                   JOIN pg_class c ON c.oid = r.ev_class
                  WHERE r.rulename <> '_RETURN'",
                &[],
            )
            .await?;
        cat.triggered = rows.iter().map(|r| r.get(0)).collect();
        // What calls a volatile user function where no statement shows it: a view or
        // policy (on reads), a column default, a policy or a domain's check (on writes).
        let rows = client.query(HIDDEN_CALLERS, &[]).await?;
        let mut read_writers = HashSet::new();
        for r in rows {
            let (rel, on_read): (String, bool) = (r.get(0), r.get(1));
            if on_read {
                read_writers.insert(rel.clone());
            }
            cat.triggered.insert(rel);
        }
        for (rel, bases) in &cat.bases {
            if bases.iter().any(|b| read_writers.contains(b)) {
                cat.read_writers.insert(rel.clone());
            }
        }
        cat.read_writers.extend(read_writers);
        cat.event_triggers = client
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_event_trigger e
                                  JOIN pg_proc f ON f.oid = e.evtfoid
                                 WHERE e.evtenabled <> 'D'
                                   AND f.pronamespace::regnamespace::text <> 'pgstash')",
                &[],
            )
            .await?
            .get(0);
        // BEFORE ROW INSERT/UPDATE triggers (tgtype bits: row 1, before 2, insert 4, update
        // 16) may change NEW's key, and rules may rewrite the write: the keys a statement
        // names are then not the keys it writes.
        let rows = client
            .query(
                "SELECT c.relname::text
                   FROM pg_trigger t
                   JOIN pg_class c ON c.oid = t.tgrelid
                  WHERE NOT t.tgisinternal AND t.tgtype & 3 = 3 AND t.tgtype & 20 <> 0
                 UNION
                 SELECT c.relname::text
                   FROM pg_rewrite r
                   JOIN pg_class c ON c.oid = r.ev_class
                  WHERE r.rulename <> '_RETURN'",
                &[],
            )
            .await?;
        cat.rekeyed = rows.iter().map(|r| r.get(0)).collect();
        let rows = client
            .query(
                "SELECT c.relname::text, count(*) OVER (PARTITION BY c.relname),
                        a.attname::text, a.atttypid::oid::int8,
                        array_length(i.indkey::int2[], 1)
                   FROM pg_index i
                   JOIN pg_class c ON c.oid = i.indrelid
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
                  WHERE i.indisprimary AND a.attgenerated = ''",
                &[],
            )
            .await?;
        for r in rows {
            let (name, same_name, column, typ, ncols): (String, i64, String, i64, i32) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            // int2, int4, int8 only, single column, and one table of that name.
            if same_name == 1 && ncols == 1 && matches!(typ, 20 | 21 | 23) {
                cat.keys.insert(name, IntKey { column });
            }
        }
        let rows = client
            .query(
                "SELECT proname::text, bool_or(provolatile <> 'i') FROM pg_proc GROUP BY proname",
                &[],
            )
            .await?;
        for r in rows {
            let (name, volatile): (String, bool) = (r.get(0), r.get(1));
            if volatile {
                cat.volatile.insert(name.clone());
            }
            cat.functions.insert(name);
        }
        let rows = client
            .query(
                "SELECT DISTINCT proname::text FROM pg_proc
                  WHERE provolatile <> 'i'
                    AND pronamespace NOT IN ('pg_catalog'::regnamespace,
                                             'information_schema'::regnamespace)",
                &[],
            )
            .await?;
        cat.user_volatile = rows.iter().map(|r| r.get(0)).collect();
        let rows = client
            .query(
                "SELECT DISTINCT o.oprname::text FROM pg_operator o
                   JOIN pg_proc p ON p.oid = o.oprcode
                  WHERE p.provolatile <> 'i'
                    AND o.oprnamespace NOT IN ('pg_catalog'::regnamespace,
                                               'information_schema'::regnamespace)",
                &[],
            )
            .await?;
        cat.user_operators = rows.iter().map(|r| r.get(0)).collect();
        // When in doubt (any setting that is not plainly READ COMMITTED/UNCOMMITTED, for
        // this database or all, for any role), strict.
        let row = client
            .query_one(
                "SELECT lower(current_setting('default_transaction_isolation'))
                          NOT IN ('read committed', 'read uncommitted')
                     OR EXISTS (
                        SELECT 1
                          FROM pg_db_role_setting s, unnest(s.setconfig) AS c(item)
                         WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database
                                                      WHERE datname = current_database()))
                           AND lower(c.item) LIKE '%transaction_isolation=%'
                           AND lower(btrim(split_part(c.item, '=', 2), ' ''\"'))
                               NOT IN ('read committed', 'read uncommitted'))",
                &[],
            )
            .await?;
        cat.strict_isolation_default = row.get(0);
        // Column types, by name: date/time (category D, also through domains and arrays)
        // or not. Composite types count as relations: `t.rec.field` names a field.
        let rows = client
            .query(
                "SELECT c.relname::text, a.attname::text,
                        coalesce(e.typcategory, t.typcategory) = 'D'
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN pg_type t ON t.oid = a.atttypid
                   LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
                  WHERE a.attnum > 0 AND NOT a.attisdropped
                    AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
                    AND c.relnamespace NOT IN ('pg_catalog'::regnamespace,
                                               'information_schema'::regnamespace,
                                               'pg_toast'::regnamespace)",
                &[],
            )
            .await?;
        let types = client
            .query(
                &format!("{UNSAFE_TYPES} SELECT DISTINCT lower(name) FROM unsafe_type"),
                &[],
            )
            .await?;
        cat.unsafe_types = types.iter().map(|r| r.get(0)).collect();
        let types = client
            .query(
                "SELECT DISTINCT lower(typname::text) FROM pg_type
                  WHERE typnamespace NOT IN ('pg_catalog'::regnamespace,
                                             'information_schema'::regnamespace)",
                &[],
            )
            .await?;
        cat.user_types = types.iter().map(|r| r.get(0)).collect();
        let functions = client
            .query(
                "SELECT DISTINCT proname::text FROM pg_proc
                  WHERE pronamespace NOT IN ('pg_catalog'::regnamespace,
                                             'information_schema'::regnamespace)",
                &[],
            )
            .await?;
        cat.user_functions = functions.iter().map(|r| r.get(0)).collect();
        let sources = client
            .query(
                "SELECT p.proname::text, p.prosrc FROM pg_proc p
                  WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace,
                                               'information_schema'::regnamespace)
                    AND p.prolang NOT IN (SELECT oid FROM pg_language
                                           WHERE lanname IN ('internal', 'c'))",
                &[],
            )
            .await?;
        let sources: Vec<(String, String)> = sources
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        cat.session_changers = session_changers(&sources);
        let any_set_config = changers_by(&sources, &|src| src.contains("set_config"));
        cat.transaction_changers = any_set_config
            .into_iter()
            .filter(|n| !cat.session_changers.contains(n))
            .collect();
        let row = client
            .query_one(
                "SELECT EXISTS (
                    SELECT 1 FROM pg_cast c
                      JOIN pg_type t ON t.oid = c.casttarget
                      LEFT JOIN pg_proc f ON f.oid = c.castfunc
                      LEFT JOIN pg_proc i ON i.oid = t.typinput
                     WHERE c.oid >= 16384 AND c.castcontext IN ('i', 'a')
                       AND ((c.castmethod = 'f' AND f.provolatile <> 'i')
                            OR (c.castmethod = 'i' AND i.provolatile <> 'i')))",
                &[],
            )
            .await?;
        cat.hidden_casts = row.get(0);
        for r in rows {
            let (rel, column, time): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
            cat.typed_relations.insert(rel);
            *cat.time_columns.entry(column).or_insert(true) &= time;
        }
        cat.loaded_at = Some(Instant::now());
        cat.epoch = NEXT_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(cat)
    }

    /// The base tables a read of relation `name` depends on (the name itself included).
    pub fn read_dependencies(&self, name: &str) -> Vec<String> {
        let mut out = vec![name.to_string()];
        out.extend(self.other_reads(name).iter().cloned());
        out
    }

    /// The relations a read of `name` reads besides itself (a view's tables, its policies'
    /// tables); empty for most tables.
    pub fn other_reads(&self, name: &str) -> &[String] {
        if self.bases.is_empty() {
            return &[];
        }
        self.bases.get(name).map_or(&[], Vec::as_slice)
    }

    /// Whether `name` is a user table, view, materialized view, foreign table or composite
    /// type with at least one column, as of the last load.
    pub fn is_user_relation(&self, name: &str) -> bool {
        self.typed_relations.contains(name)
    }

    /// Whether `sql` names a function or procedure that may change the session's role or
    /// settings where no statement shows it (see [`session_changers`]).
    pub fn calls_session_changer(&self, sql: &str) -> bool {
        self.hidden_setting_change(sql) == Some(HiddenChange::Session)
    }

    /// Whether `sql` names a function that may change the role or settings where no
    /// statement shows it: for the session (see [`session_changers`]), or for the rest of
    /// the transaction (`set_config(..., true)` in its source). One lower-casing of `sql`,
    /// and none when the database has no such function.
    pub fn hidden_setting_change(&self, sql: &str) -> Option<HiddenChange> {
        if self.session_changers.is_empty() && self.transaction_changers.is_empty() {
            return None;
        }
        let sql = sql.to_lowercase();
        let names = |list: &[String]| list.iter().any(|name| mentions_word(&sql, name));
        if names(&self.session_changers) {
            Some(HiddenChange::Session)
        } else if names(&self.transaction_changers) {
            Some(HiddenChange::Transaction)
        } else {
            None
        }
    }

    /// Whether reading `name` runs functions the cache cannot vouch for (see `opaque`).
    pub fn is_opaque(&self, name: &str) -> bool {
        !self.opaque.is_empty() && self.opaque.contains(name)
    }

    /// Whether reading `name` may write tables no statement names (see `read_writers`).
    pub fn reads_write(&self, name: &str) -> bool {
        !self.read_writers.is_empty() && self.read_writers.contains(name)
    }

    /// The names a write to relation `name` must invalidate (see `family`).
    pub fn write_targets(&self, name: &str) -> Vec<String> {
        self.write_family(name).map(str::to_string).collect()
    }

    /// [`Catalog::write_targets`], borrowed: nothing is copied.
    pub fn write_family<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + Clone {
        let (family, own) = match self.family.get(name) {
            Some(f) => (f.as_slice(), None),
            None => (&[][..], Some(name)),
        };
        family.iter().map(String::as_str).chain(own)
    }

    /// Whether a write to `name` may also write tables no statement names (a trigger or
    /// rule on it, or on a table the write reaches).
    pub fn writes_elsewhere(&self, name: &str) -> bool {
        if self.triggered.is_empty() {
            return false;
        }
        match self.family.get(name) {
            Some(f) => f.iter().any(|t| self.triggered.contains(t)),
            None => self.triggered.contains(name),
        }
    }

    /// A catalog that also lists `table` (for tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn with_relation(mut self, table: &str) -> Catalog {
        self.typed_relations.insert(table.to_string());
        self
    }

    /// A catalog knowing one table's integer key, and the table (for tests elsewhere in
    /// the crate).
    #[cfg(test)]
    pub(crate) fn with_int_key(mut self, table: &str, column: &str) -> Catalog {
        self.typed_relations.insert(table.to_string());
        self.keys.insert(
            table.to_string(),
            IntKey {
                column: column.to_string(),
            },
        );
        self
    }

    /// The integer primary key that row-precise invalidation follows, unless a trigger or
    /// rule may write other keys than the statement names.
    pub fn int_key(&self, table: &str) -> Option<&IntKey> {
        if !self.rekeyed.is_empty() && self.rekeyed.contains(table) {
            return None;
        }
        self.keys.get(table)
    }

    /// `Some(true)` when every overload of `name` is immutable, `Some(false)` when one is not,
    /// `None` when no such function exists.
    pub fn function_is_safe(&self, name: &str) -> Option<bool> {
        if self.volatile.contains(name) {
            Some(false)
        } else if self.functions.contains(name) {
            Some(true)
        } else {
            None
        }
    }
}

/// Every name reachable from `start` along `edges`, `start` included.
/// The functions (lower-cased names) whose source, given as (name, source) pairs, may
/// change the session's role or settings for the session, not only while they run: a
/// `SET ROLE`, `SET SESSION AUTHORIZATION`, `RESET ROLE` or `RESET ALL`, a `set_config`
/// call, or dynamic SQL (`EXECUTE`) that mentions the role; and, transitively, functions
/// whose source names one of those. Postgres reports none of this unless the change makes
/// the session superuser or not, so the relay pins a client that calls one. The match is
/// on text, deliberately wide (a comment or a string mentioning them counts); C and
/// internal functions cannot be read and are not listed.
fn session_changers(sources: &[(String, String)]) -> Vec<String> {
    static DIRECT: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"(?is)session[\s_]+authorization|\b(set|reset)\s+((local|session)\s+)?role\b|\breset\s+all\b|\bexecute\b[^;]*\brole\b",
        )
        .expect("a valid pattern")
    });
    // set_config(name, value, true) changes a setting for the transaction only, as it does
    // written in a query: only a call that is not plainly transaction-local counts, read
    // as the relay reads queries.
    let session_set_config = |src: &str| {
        src.contains("set_config")
            && crate::session::effects_of(src)
                .iter()
                .any(|e| matches!(e, crate::session::Effect::Pin(_)))
    };
    changers_by(sources, &|src| {
        DIRECT.is_match(src) || session_set_config(src)
    })
}

/// The functions (lower-cased names) whose lower-cased source satisfies `direct`, and,
/// transitively, the functions whose source names one of them.
fn changers_by(sources: &[(String, String)], direct: &dyn Fn(&str) -> bool) -> Vec<String> {
    let lowered: Vec<(String, String)> = sources
        .iter()
        .map(|(n, src)| (n.to_lowercase(), src.to_lowercase()))
        .collect();
    let mut found: HashSet<String> = lowered
        .iter()
        .filter(|(_, src)| direct(src))
        .map(|(n, _)| n.clone())
        .collect();
    loop {
        let more: Vec<String> = lowered
            .iter()
            .filter(|(n, src)| !found.contains(n) && found.iter().any(|f| mentions_word(src, f)))
            .map(|(n, _)| n.clone())
            .collect();
        if more.is_empty() {
            break;
        }
        found.extend(more);
    }
    let mut out: Vec<String> = found.into_iter().collect();
    out.sort();
    out
}

/// Whether `word` occurs in `text` as a word of its own (not inside a longer identifier).
/// Both lower-cased by the caller.
fn mentions_word(text: &str, word: &str) -> bool {
    let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
    text.match_indices(word).any(|(at, _)| {
        !ident(text[..at].chars().next_back()) && !ident(text[at + word.len()..].chars().next())
    })
}

fn closure(edges: &HashMap<String, Vec<String>>, start: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut stack = vec![start.to_string()];
    while let Some(n) = stack.pop() {
        if seen.insert(n.clone())
            && let Some(next) = edges.get(&n)
        {
            stack.extend(next.iter().cloned());
        }
    }
    seen
}

impl crate::analysis::FunctionVolatility for Catalog {
    /// Stable counts as volatile here: a stable function may read tables the analysis cannot
    /// see it read, so its results could not be invalidated.
    fn user_overload(&self, name: &str) -> bool {
        self.user_volatile.contains(name)
    }

    fn user_operator(&self, symbol: &str) -> bool {
        !self.user_operators.is_empty() && self.user_operators.contains(symbol)
    }

    fn time_column(&self, name: &str) -> bool {
        self.time_columns.get(name).copied().unwrap_or(false)
    }

    fn knows_relation(&self, name: &str) -> bool {
        self.typed_relations.contains(name)
    }

    fn unsafe_type(&self, name: &str) -> bool {
        !self.unsafe_types.is_empty() && self.unsafe_types.contains(&name.to_lowercase())
    }

    fn user_function(&self, name: &str) -> bool {
        self.user_functions.contains(name)
    }

    fn user_type(&self, name: &str) -> bool {
        self.user_types.contains(&name.to_lowercase())
    }

    fn hidden_casts(&self) -> bool {
        self.hidden_casts
    }

    fn volatility(&self, _schema: Option<&str>, name: &str) -> Option<crate::analysis::Volatility> {
        use crate::analysis::Volatility;
        self.function_is_safe(name).map(|safe| {
            if safe {
                Volatility::Immutable
            } else {
                Volatility::Volatile
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changers(sources: &[(&str, &str)]) -> Vec<String> {
        session_changers(
            &sources
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn functions_that_may_change_the_role_or_settings_are_found_through_their_callers() {
        let found = changers(&[
            (
                "become",
                "BEGIN EXECUTE format('SET ROLE %I', r); RETURN r; END",
            ),
            ("Become_Admin", "BEGIN SET\n  LOCAL   ROLE admin; END"),
            ("auth", "SET SESSION AUTHORIZATION bob"),
            (
                "cfg",
                "SELECT pg_catalog.set_config('search_path', $1, false)",
            ),
            // For the transaction only: not a session change.
            (
                "tenant",
                "BEGIN PERFORM set_config('app.tenant', t, true); END",
            ),
            (
                "dyn",
                "BEGIN EXECUTE 'SET ' || quote_ident('role') || ' = ' || r; END",
            ),
            ("wipe", "BEGIN RESET ALL; END"),
            ("outer_fn", "BEGIN PERFORM become('x'); END"),
            ("outermost", "SELECT outer_fn()"),
            ("report", "SELECT role, count(*) FROM users GROUP BY role"),
            // Wide on purpose: `SET role = x` is also how a SET ROLE may be spelt.
            ("update_roles", "UPDATE users SET role = $1 WHERE id = $2"),
            ("becomes", "SELECT becomes_x()"),
        ]);
        assert_eq!(
            found,
            [
                "auth",
                "become",
                "become_admin",
                "cfg",
                "dyn",
                "outer_fn",
                "outermost",
                "update_roles",
                "wipe"
            ]
        );
    }

    #[test]
    fn a_transaction_local_set_config_in_a_function_changes_the_transaction_only() {
        let sources: Vec<(String, String)> = [
            (
                "tenant",
                "BEGIN PERFORM set_config('app.tenant', t, true); END",
            ),
            ("cfg", "SELECT set_config('search_path', $1, false)"),
            ("with_tenant", "BEGIN PERFORM tenant(1); END"),
        ]
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
        let session = session_changers(&sources);
        assert_eq!(session, ["cfg"]);
        let transaction: Vec<String> = changers_by(&sources, &|src| src.contains("set_config"))
            .into_iter()
            .filter(|n| !session.contains(n))
            .collect();
        assert_eq!(transaction, ["tenant", "with_tenant"]);
    }

    #[test]
    fn a_statement_calls_a_session_changer_only_by_its_name_as_a_word() {
        let cat = Catalog {
            session_changers: vec!["become".into()],
            ..Catalog::default()
        };
        assert!(cat.calls_session_changer("SELECT become('bob')"));
        assert!(cat.calls_session_changer("SELECT public.BECOME('bob')"));
        assert!(cat.calls_session_changer("CALL \"become\"('bob')"));
        assert!(!cat.calls_session_changer("SELECT becomes FROM t"));
        assert!(!cat.calls_session_changer("SELECT unbecome()"));
        assert!(!Catalog::default().calls_session_changer("SELECT become('bob')"));
    }
}
