//! The result types of the analysis stage. All owned data, so an [`Analysis`] can be memoised
//! and shared across sessions (`Clone + Send + Sync`).

use std::fmt;

/// What the cache must know about one statement text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Analysis {
    /// A read that may be cached (subject to the session state, rules, hints and size limits,
    /// which are the caller's to check).
    Read(ReadInfo),
    /// Forward and do not cache; nothing to invalidate. The reason becomes a metric label.
    Bypass(BypassReason),
    /// A data write: forward; when it commits, invalidate these tables/keys.
    Write(WriteInfo),
    /// A change of schema, privileges or anything whose effect the proxy cannot attribute to
    /// rows: forward; when it commits, invalidate as [`DdlInfo`] says.
    Ddl(DdlInfo),
    /// Transaction control, SET, SHOW, cursors, LISTEN, ...: forward; nothing to cache or
    /// invalidate. Session-state tracking (SET ROLE, DISCARD, ...) is the caller's job.
    Other,
}

/// A cacheable read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadInfo {
    /// Every relation the statement reads, deduplicated, in order of first appearance.
    /// Names as written (unresolved); may be views, which the caller resolves. Empty for
    /// table-less reads such as `SELECT 1`.
    pub tables: Vec<TableRef>,
    /// Set only when the statement reads exactly one relation exactly once (no joins,
    /// subqueries, CTEs or set operations) and its WHERE ANDs at least one `column = value`.
    pub point: Option<PointKey>,
}

/// The `column = value` equalities ANDed at the top of a single-table read's WHERE.
/// The caller (which has the catalog) uses the read as a point read only if one candidate
/// is the table's single-column primary key; otherwise it is an ordinary read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointKey {
    /// Always equal to `ReadInfo::tables[0]`, the only table read.
    pub table: TableRef,
    /// In order of appearance; never empty.
    pub candidates: Vec<ColumnValue>,
}

/// A data write. Only the written tables are listed: tables a write merely reads
/// (`INSERT ... SELECT`, `UPDATE ... FROM`, `DELETE ... USING`, subqueries) are not affected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteInfo {
    /// One entry per written table occurrence (a table written twice appears twice).
    pub tables: Vec<TableWrite>,
    /// The statement also calls a function that may write tables it does not name (see
    /// [`BypassReason::may_write`]).
    pub hidden_writes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableWrite {
    pub table: TableRef,
    pub effect: WriteEffect,
}

/// Which rows of a table a write may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteEffect {
    /// Unknown rows: bump `wide(t)` (and `any(t)`).
    Wide,
    /// Every row this statement inserts, deletes or changes — before and after the change —
    /// satisfies at least one of these conjunctions of `column = value` (outer and inner
    /// vectors are never empty). INSERT ... VALUES gives one conjunction per row (its literal
    /// and parameter columns); UPDATE/DELETE give one (the WHERE equalities, minus columns
    /// the UPDATE assigns, so a key-changing UPDATE is never keyed). The caller uses key
    /// precision only if every conjunction pins the primary key; otherwise it treats the
    /// write as [`WriteEffect::Wide`].
    Keys(Vec<Vec<ColumnValue>>),
}

/// What a DDL-like statement invalidates when it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdlInfo {
    pub scope: DdlScope,
    /// The statement creates (or, for procedural code, may create) a temporary relation.
    /// Unqualified names in this session may now resolve to private objects the cache key
    /// does not capture, so the caller must stop caching for the session until
    /// `DISCARD TEMP`/`DISCARD ALL` (or pin it).
    pub creates_temp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DdlScope {
    /// These relations (names as written, possibly views) change shape, content or access:
    /// bump `wide(t)` and `any(t)` for each. May be empty (e.g. `CREATE TEMP TABLE`).
    Tables(Vec<TableRef>),
    /// The effect cannot be attributed to tables: drop every entry of this database.
    Database(FlushReason),
}

/// A relation name as written: unresolved, identifiers folded like PostgreSQL does
/// (unquoted → ASCII lower case, quoted → kept) and truncated to 63 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRef {
    pub schema: Option<String>,
    pub name: String,
}

impl TableRef {
    pub fn new(schema: Option<&str>, name: &str) -> Self {
        Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One `column = value` equality.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ColumnValue {
    /// Folded like an identifier (see [`TableRef`]).
    pub column: String,
    pub value: KeyValue,
}

/// The value side of a key equality.
///
/// Literal text is canonical only as far as the text shows: integer number literals are
/// canonicalised (`007` → `7`, `+5` → `5`), strings are kept verbatim (`'007'` stays `007`).
/// Equal keys must compare equal, so the caller must canonicalise by the key column's type
/// before using a value (literal or bound parameter): [`canonical_integer`] for integer keys;
/// for types with several spellings of one value (numeric, uuid, citext, non-deterministic
/// collations, timestamps) either canonicalise or fall back to table-grain invalidation.
///
/// [`canonical_integer`]: super::canonical_integer
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyValue {
    Literal(String),
    /// A `$n` parameter (1-based); casts such as `$1::int` are unwrapped.
    Param(usize),
}

/// Why a statement is forwarded without caching. [`BypassReason::label`] is the metric label;
/// the payloads are for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BypassReason {
    /// The text is longer than the analysis will parse.
    TooLong,
    /// The text nests or chains expressions deeper than the analysis will walk.
    TooComplex,
    /// sqlparser could not parse it (the lexical fallback found it harmless).
    Unparsable,
    /// More than one statement, none of which writes.
    MultipleStatements,
    /// `FOR UPDATE/SHARE` anywhere.
    Locking,
    /// A function that is volatile, time/session dependent or a system function.
    VolatileFunction(String),
    /// A STABLE function: it may read tables the cache cannot see. Callers that trust a
    /// function report it as immutable from their [`FunctionVolatility`](super::FunctionVolatility).
    StableFunction(String),
    /// A function the catalog does not know.
    UnknownFunction(String),
    /// nextval/currval/lastval/setval.
    SequenceFunction(String),
    /// Reads pg_catalog, information_schema or a `pg_*` relation: their changes are not seen
    /// by invalidation.
    SystemCatalog,
    /// Reads a relation qualified with `pg_temp`.
    TempTable,
    /// `TABLESAMPLE`: a different sample each time.
    TableSample,
    /// A literal such as `'now'` or `'today'`, which PostgreSQL turns into the current time.
    TimeLiteral,
    /// A value that may be text (a text column, `->>`, a function's result) cast to a date or
    /// time type (or a type that may hold one): text such as `'now'` stored in a row reads as
    /// the current time, so the answer changes without any write.
    TextAsTime,
    /// An AST shape the analysis does not reason about.
    Unsupported,
}

impl BypassReason {
    /// Whether the statement calls a function that may write tables it does not name: a
    /// volatile or unknown function other than the built-ins the analysis denies by name
    /// (time, randomness, sequences, session and system functions); or its text was not
    /// parsed, so its calls are unknown.
    pub fn may_write(&self) -> bool {
        match self {
            Self::VolatileFunction(name) | Self::UnknownFunction(name) => {
                !super::functions::is_denied_builtin(name)
            }
            Self::TooLong | Self::TooComplex | Self::Unparsable => true,
            _ => false,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLong => "too_long",
            Self::TooComplex => "too_complex",
            Self::Unparsable => "unparsable",
            Self::MultipleStatements => "multiple_statements",
            Self::Locking => "locking",
            Self::VolatileFunction(_) => "volatile_function",
            Self::StableFunction(_) => "stable_function",
            Self::UnknownFunction(_) => "unknown_function",
            Self::SequenceFunction(_) => "sequence_function",
            Self::SystemCatalog => "system_catalog",
            Self::TempTable => "temp_table",
            Self::TableSample => "tablesample",
            Self::TimeLiteral => "time_literal",
            Self::TextAsTime => "text_as_time",
            Self::Unsupported => "unsupported",
        }
    }
}

/// Why a statement flushes the whole database's entries. [`FlushReason::label`] is the
/// metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    /// GRANT/REVOKE on anything but named tables (roles, schemas, ALL TABLES, ...),
    /// ALTER DEFAULT PRIVILEGES.
    Privileges,
    /// CREATE/ALTER/DROP ROLE or USER, REASSIGN/DROP OWNED.
    Role,
    /// CREATE/ALTER/DROP FUNCTION or PROCEDURE: cached results may depend on the old body.
    Function,
    /// Creates or renames a non-temporary relation: the new name may shadow a same-named
    /// relation later in some `search_path`, changing what cached unqualified reads mean.
    NewRelation,
    /// `... CASCADE` also changes objects the text does not name.
    Cascade,
    /// EXECUTE, CALL, DO: arbitrary effects.
    Procedural,
    /// COMMIT PREPARED: commits writes made earlier, possibly by another session.
    TwoPhaseCommit,
    /// Could not be parsed and does not look harmless.
    Unparsable,
    TooLong,
    TooComplex,
    /// Parsed, but not a statement this analysis knows to be harmless or attributable.
    Unrecognised,
    /// CLUSTER, VACUUM FULL: tables rewritten, their rows come back in another order.
    Rewrite,
    /// ALTER SYSTEM, pg_reload_conf(): server defaults (TimeZone, extra_float_digits, ...)
    /// may change, and results rendered under the old ones are keyed only by what clients
    /// set themselves.
    Settings,
}

impl FlushReason {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Privileges => "privileges",
            Self::Role => "role",
            Self::Function => "function",
            Self::NewRelation => "new_relation",
            Self::Cascade => "cascade",
            Self::Procedural => "procedural",
            Self::TwoPhaseCommit => "two_phase_commit",
            Self::Unparsable => "unparsable",
            Self::TooLong => "too_long",
            Self::TooComplex => "too_complex",
            Self::Unrecognised => "unrecognised",
            Self::Rewrite => "rewrite",
            Self::Settings => "settings",
        }
    }
}

/// PostgreSQL function volatility (`pg_proc.provolatile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Volatility {
    Immutable,
    Stable,
    Volatile,
}

/// The caller's view of the catalog for functions that are in neither built-in list.
/// `schema` and `name` are as written (folded); `None` from the lookup means unknown, and
/// bypasses. An implementation is also the policy point: answer `Immutable` for a function the
/// configuration explicitly allows.
pub trait FunctionVolatility {
    fn volatility(&self, schema: Option<&str>, name: &str) -> Option<Volatility>;

    /// Whether a function of this name that is not immutable exists outside the system
    /// schemas: then a built-in name on the allow list may resolve to it (an overload
    /// `public.md5(int)`), and the allow list must not vouch for the call.
    fn user_overload(&self, _name: &str) -> bool {
        false
    }

    /// Whether an operator with this symbol, outside the system schemas, runs a function
    /// that is not immutable (users may overload `##` or define `~~~`).
    fn user_operator(&self, _symbol: &str) -> bool {
        false
    }

    /// Whether every column of this name in the user relations holds a date or time type
    /// (or an array or domain of one): its value can never be text such as `'now'`, so a
    /// cast of it to a date or time type is as repeatable as the column. Unknown: `false`.
    fn time_column(&self, _name: &str) -> bool {
        false
    }

    /// Whether a user-defined type of this name (any schema, case-insensitively) may read
    /// the current time or run code that is not immutable when a value is converted to it:
    /// a composite type (its fields' input), a range, a domain with a constraint or over a
    /// date or time, a base type whose input function is not immutable, arrays of those. A
    /// cast to it is never cached, whatever its operand (`NULL::composite` steers functions
    /// like `populate_record`, a domain's CHECK may call `clock_timestamp()`).
    fn unsafe_type(&self, _name: &str) -> bool {
        false
    }

    /// Whether a user-defined type of this name exists (any schema, case-insensitively): an
    /// enum, a domain, a base type from an extension... Together with
    /// [`FunctionVolatility::unsafe_type`] it tells a type whose input cannot read the time.
    fn user_type(&self, _name: &str) -> bool {
        false
    }

    /// Whether a function of this name exists outside the system schemas (whatever its
    /// volatility): a built-in name the analysis trusts may then resolve to it.
    fn user_function(&self, _name: &str) -> bool {
        false
    }

    /// Whether the database has user-defined implicit (or assignment) casts that run code
    /// that is not immutable: a query may then call one where its text shows no cast.
    fn hidden_casts(&self) -> bool {
        false
    }

    /// Whether the column types of relation `name` (unqualified) are known, that is whether
    /// [`FunctionVolatility::time_column`] speaks for its columns.
    fn knows_relation(&self, _name: &str) -> bool {
        false
    }
}

/// Knows no functions: every function outside the built-in allow list bypasses.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCatalog;

impl FunctionVolatility for NoCatalog {
    fn volatility(&self, _schema: Option<&str>, _name: &str) -> Option<Volatility> {
        None
    }
}

impl<F> FunctionVolatility for F
where
    F: Fn(Option<&str>, &str) -> Option<Volatility>,
{
    fn volatility(&self, schema: Option<&str>, name: &str) -> Option<Volatility> {
        self(schema, name)
    }
}
