//! One walk over a statement's AST (sqlparser's derived visitor, so no node kind can be
//! forgotten) that gathers what the read and write classifications need: relations read,
//! CTE scoping, function calls, locking clauses and data-modifying statements anywhere
//! (writable CTEs, the statement itself).

use std::ops::ControlFlow;
use std::ptr;

use sqlparser::ast::{
    Expr, ObjectName, Query, SetExpr, Statement, TableFactor, Value, Visit, Visitor,
};

use super::functions;
use super::keys::{
    fold, is_time_literal, name_parts, relation_parts, string_value, table_ref_from_parts,
};
use super::model::{BypassReason, FlushReason, FunctionVolatility, TableRef, TableWrite};
use super::write;

pub(crate) struct Collected {
    /// Relations read, deduplicated, in order of first appearance.
    pub tables: Vec<TableRef>,
    /// Relation references including duplicates (a point read needs exactly one).
    pub occurrences: usize,
    /// The first reason found that makes a read uncacheable.
    pub bypass: Option<BypassReason>,
    /// Tables written by data-modifying statements found anywhere.
    pub writes: Vec<TableWrite>,
    /// A data-modifying statement whose target could not be named.
    pub flush: Option<FlushReason>,
}

/// CTE names visible inside one query. While a non-recursive CTE body is being visited only
/// the earlier CTEs are visible (a later name there means a real table); in the main body
/// all are.
struct Scope {
    names: Vec<String>,
    bodies: Vec<*const Query>,
    recursive: bool,
    visible: usize,
}

struct Collector<'f> {
    funcs: &'f dyn FunctionVolatility,
    scopes: Vec<Scope>,
    /// A relation name already handled by `pre_visit_table_factor`.
    handled_relation: Option<*const ObjectName>,
    /// Columns cast to a date or time type, with the query scope they were named in: the
    /// read is cacheable only if each is a date/time column for sure (see
    /// `time_casts_are_repeatable`).
    time_cast_columns: Vec<(usize, Vec<String>)>,
    /// Every query scope met (0: the statement itself), and the path to the current one.
    typing: Vec<Typing>,
    typing_path: Vec<usize>,
    /// Queries that see no column of the query around them: FROM subqueries (not LATERAL)
    /// and CTE bodies.
    self_contained: Vec<*const Query>,
    out: Collected,
}

/// Whether a query scope's column names can be trusted to be the catalog's.
struct Typing {
    parent: usize,
    /// Sees no column of its parent scope.
    self_contained: bool,
    /// A FROM item whose columns the catalog does not describe (a subquery, a function, a
    /// CTE, VALUES, an alias list): a column name may then stand for text of any origin.
    untyped: bool,
}

/// Walks `node` (a statement or a query) and everything below it.
pub(crate) fn collect<T: Visit>(node: &T, funcs: &dyn FunctionVolatility) -> Collected {
    let mut collector = Collector {
        funcs,
        scopes: Vec::new(),
        handled_relation: None,
        time_cast_columns: Vec::new(),
        typing: vec![Typing {
            parent: 0,
            self_contained: true,
            untyped: false,
        }],
        typing_path: Vec::new(),
        self_contained: Vec::new(),
        out: Collected {
            tables: Vec::new(),
            occurrences: 0,
            bypass: None,
            writes: Vec::new(),
            flush: None,
        },
    };
    let _ = node.visit(&mut collector);
    if !collector.time_casts_are_repeatable() || collector.funcs.hidden_casts() {
        collector.bypass(BypassReason::TextAsTime);
    }
    collector.out
}

impl Collector<'_> {
    /// Whether the columns cast to a date or time type certainly hold one: each FROM item is
    /// a relation the catalog describes, and no column of any of them by that name has
    /// another type (column names are checked across all user relations, which covers
    /// whichever relation a name resolves to).
    fn time_casts_are_repeatable(&self) -> bool {
        self.time_cast_columns.is_empty()
            || (self
                .out
                .tables
                .iter()
                .all(|t| self.funcs.knows_relation(&t.name))
                && self.time_cast_columns.iter().all(|(scope, columns)| {
                    self.typed(*scope) && columns.iter().all(|c| self.funcs.time_column(c))
                }))
    }

    /// Whether every column a scope can name (its own FROM items', and those of the scopes
    /// around it that it sees) is a catalog relation's.
    fn typed(&self, scope: usize) -> bool {
        let t = &self.typing[scope];
        !t.untyped && (t.self_contained || scope == 0 || self.typed(t.parent))
    }

    fn scope(&self) -> usize {
        self.typing_path.last().copied().unwrap_or(0)
    }

    fn mark_untyped(&mut self) {
        let scope = self.scope();
        self.typing[scope].untyped = true;
    }

    /// A cast of `inner` to a type that may hold a date or time.
    fn time_cast(&mut self, inner: &Expr) {
        let mut columns = Vec::new();
        if yields_no_text(inner, self.funcs, &mut columns) {
            let scope = self.scope();
            self.time_cast_columns.push((scope, columns));
        } else {
            self.bypass(BypassReason::TextAsTime);
        }
    }

    fn bypass(&mut self, reason: BypassReason) {
        // The first reason, unless a later one says the statement may write: callers need
        // that one to know a transaction's reads can no longer trust the cache.
        match &self.out.bypass {
            Some(old) if old.may_write() || !reason.may_write() => {}
            _ => self.out.bypass = Some(reason),
        }
    }

    fn is_cte(&self, name: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| s.names[..s.visible].iter().any(|n| n == name))
    }

    fn read_relation(&mut self, parts: Option<Vec<String>>) {
        let Some(parts) = parts else {
            return self.bypass(BypassReason::Unsupported);
        };
        if let [single] = parts.as_slice()
            && self.is_cte(single)
        {
            self.mark_untyped();
            return;
        }
        let Some(table) = table_ref_from_parts(parts) else {
            return self.bypass(BypassReason::Unsupported);
        };
        if let Some(reason) = catalog_reason(&table) {
            self.bypass(reason);
        }
        self.out.occurrences += 1;
        if !self.out.tables.contains(&table) {
            self.out.tables.push(table);
        }
    }

    fn call(&mut self, name: &ObjectName) {
        let Some(mut parts) = name_parts(name) else {
            return self.bypass(BypassReason::Unsupported);
        };
        let Some(function) = parts.pop() else { return };
        let schema = parts.pop();
        if !parts.is_empty() {
            return self.bypass(BypassReason::Unsupported);
        }
        if let Some(reason) = functions::check(schema.as_deref(), &function, self.funcs) {
            self.bypass(reason);
        }
        if function == "pg_reload_conf" && matches!(schema.as_deref(), None | Some("pg_catalog")) {
            self.out.flush.get_or_insert(FlushReason::Settings);
        }
    }

    /// `TABLE name` is a set-expression leaf holding plain strings, not a relation node, so
    /// the visitor never reports it: find it here.
    fn table_commands(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Table(table) => {
                let parts = table.table_name.as_deref().and_then(|name| {
                    let mut parts: Vec<String> = Vec::new();
                    for part in table.schema_name.iter().map(String::as_str).chain([name]) {
                        parts.push(table_command_part(part)?);
                    }
                    Some(parts)
                });
                self.read_relation(parts);
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.table_commands(left);
                self.table_commands(right);
            }
            _ => {}
        }
    }
}

/// sqlparser keeps `TABLE` names as strings without their quotes, so `Ids` may have been
/// `"Ids"` or `Ids` (= `ids`). Only names that fold to themselves are unambiguous.
fn table_command_part(part: &str) -> Option<String> {
    (!part.bytes().any(|b| b.is_ascii_uppercase())).then(|| part.to_owned())
}

/// System catalogs and temp relations change without any write the proxy sees.
fn catalog_reason(table: &TableRef) -> Option<BypassReason> {
    match table.schema.as_deref() {
        Some(s) if s.starts_with("pg_temp") => Some(BypassReason::TempTable),
        Some("pg_catalog" | "information_schema" | "pg_toast") => Some(BypassReason::SystemCatalog),
        _ if table.name.starts_with("pg_") => Some(BypassReason::SystemCatalog),
        _ => None,
    }
}

impl Visitor for Collector<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            self.bypass(BypassReason::Locking);
        }
        let cte_body = self
            .scopes
            .last()
            .is_some_and(|parent| parent.bodies.iter().any(|b| ptr::eq(*b, query)));
        let self_contained = cte_body || self.self_contained.iter().any(|q| ptr::eq(*q, query));
        self.typing.push(Typing {
            parent: self.scope(),
            self_contained,
            untyped: false,
        });
        self.typing_path.push(self.typing.len() - 1);
        if let Some(parent) = self.scopes.last_mut()
            && let Some(i) = parent.bodies.iter().position(|b| ptr::eq(*b, query))
        {
            parent.visible = if parent.recursive {
                parent.names.len()
            } else {
                i
            };
        }
        let (names, bodies, recursive) = match &query.with {
            Some(with) => (
                with.cte_tables
                    .iter()
                    .map(|c| fold(&c.alias.name))
                    .collect(),
                with.cte_tables
                    .iter()
                    .map(|c| ptr::from_ref(c.query.as_ref()))
                    .collect(),
                with.recursive,
            ),
            None => (Vec::new(), Vec::new(), false),
        };
        let visible = names.len();
        self.scopes.push(Scope {
            names,
            bodies,
            recursive,
            visible,
        });
        self.table_commands(&query.body);
        // The first thing visited next is the first CTE body, which sets `visible` itself.
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.scopes.pop();
        self.typing_path.pop();
        if let Some(parent) = self.scopes.last_mut()
            && parent.bodies.iter().any(|b| ptr::eq(*b, query))
        {
            parent.visible = parent.names.len();
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        // `FROM t AS x(id, at)` renames columns: `at` may now be a text column.
        if table_factor_renames_columns(factor) {
            self.mark_untyped();
        }
        if let TableFactor::Derived {
            lateral: false,
            subquery,
            ..
        } = factor
        {
            self.self_contained.push(ptr::from_ref(subquery.as_ref()));
        }
        match factor {
            TableFactor::Table {
                name,
                alias,
                args,
                sample,
                ..
            } => {
                self.handled_relation = Some(ptr::from_ref(name));
                if args.is_some() {
                    // `FROM generate_series(1, 3)`: a function, not a relation.
                    self.mark_untyped();
                    self.call(name);
                } else {
                    self.read_relation(
                        relation_parts(name, alias.as_ref()).map(|(parts, _)| parts),
                    );
                }
                if sample.is_some() {
                    self.bypass(BypassReason::TableSample);
                }
            }
            TableFactor::Function { name, .. } => {
                self.mark_untyped();
                self.call(name);
            }
            TableFactor::NestedJoin { .. } => {}
            // Their column definitions read text as any type, dates and times included.
            TableFactor::XmlTable { .. }
            | TableFactor::JsonTable { .. }
            | TableFactor::OpenJsonTable { .. } => self.bypass(BypassReason::TextAsTime),
            // Subqueries, UNNEST, ...: their columns are not the catalog's.
            _ => self.mark_untyped(),
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if self.handled_relation.take() == Some(ptr::from_ref(relation)) {
            return ControlFlow::Continue(());
        }
        // Any other relation node (DML targets, ...) counts as read: over-reporting only
        // costs precision.
        self.read_relation(name_parts(relation));
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(function) => self.call(&function.name),
            // 'name'::regclass and friends look names up in the catalog, which no table
            // generation follows.
            Expr::Cast { data_type, .. } if is_reg_type(data_type) => {
                self.bypass(BypassReason::SystemCatalog);
            }
            // Text computed in the query and read as a date or time ('no' || 'w') may
            // spell "now"; a literal is judged on its own.
            Expr::Cast {
                expr: inner,
                data_type,
                ..
            } if builds_text(inner) && is_datetime_type(data_type) => {
                self.bypass(BypassReason::TimeLiteral);
            }
            // A user type whose input may read the time or run code (a composite's fields,
            // a domain's CHECK), whatever the operand: also `NULL::t` steering a function.
            Expr::Cast { data_type, .. } if self.funcs.unsafe_type(&type_name(data_type)) => {
                self.bypass(BypassReason::TextAsTime);
            }
            // So may text stored in a row, or returned by an operator or a function.
            Expr::Cast {
                expr: inner,
                data_type,
                ..
            } if may_hold_time(data_type, self.funcs) => self.time_cast(inner),
            // A user-defined operator runs a function the analysis cannot see.
            Expr::BinaryOp {
                op:
                    sqlparser::ast::BinaryOperator::Custom(_)
                    | sqlparser::ast::BinaryOperator::PGCustomBinaryOperator(_),
                ..
            } => {
                self.bypass(BypassReason::UnknownFunction("operator".into()));
            }
            Expr::BinaryOp { op, .. } if self.funcs.user_operator(&op.to_string()) => {
                self.bypass(BypassReason::VolatileFunction(format!("operator {op}")));
            }
            Expr::Identifier(ident) if ident.quote_style.is_none() => {
                let name = ident.value.to_ascii_lowercase();
                if functions::is_bare_function_keyword(&name) {
                    self.bypass(BypassReason::VolatileFunction(name));
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_value(&mut self, value: &Value) -> ControlFlow<()> {
        if string_value(value).is_some_and(is_time_literal) {
            self.bypass(BypassReason::TimeLiteral);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        if matches!(
            statement,
            Statement::Insert(_)
                | Statement::Update { .. }
                | Statement::Delete(_)
                | Statement::Merge { .. }
        ) {
            match write::targets(statement) {
                Some(writes) => self.out.writes.extend(writes),
                None => {
                    self.out.flush.get_or_insert(FlushReason::Unrecognised);
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// Whether `e` computes text from pieces: a concatenation or a string function.
fn builds_text(e: &Expr) -> bool {
    const STRING_FUNCTIONS: &[&str] = &[
        "btrim",
        "concat",
        "concat_ws",
        "format",
        "initcap",
        "left",
        "lower",
        "lpad",
        "ltrim",
        "overlay",
        "regexp_replace",
        "repeat",
        "replace",
        "reverse",
        "right",
        "rpad",
        "rtrim",
        "split_part",
        "substr",
        "substring",
        "translate",
        "trim",
        "upper",
    ];
    match e {
        Expr::Nested(inner) => builds_text(inner),
        Expr::Cast { expr, .. } => builds_text(expr),
        Expr::BinaryOp {
            op: sqlparser::ast::BinaryOperator::StringConcat,
            ..
        }
        | Expr::Substring { .. }
        | Expr::Trim { .. }
        | Expr::Overlay { .. } => true,
        Expr::Function(f) => f.name.0.last().is_some_and(|part| {
            part.as_ident()
                .is_some_and(|i| STRING_FUNCTIONS.contains(&i.value.to_ascii_lowercase().as_str()))
        }),
        _ => false,
    }
}

/// Date, time and timestamp types, their arrays and ranges, by name.
fn is_datetime_type(t: &sqlparser::ast::DataType) -> bool {
    let name = t.to_string().to_ascii_lowercase();
    [
        "date",
        "time",
        "tsrange",
        "tstzrange",
        "tsmultirange",
        "tstzmultirange",
    ]
    .iter()
    .any(|w| name.contains(w))
}

/// Whether `e` yields something other than text, provided that the columns it names (pushed
/// onto `columns`) hold dates or times: literals and parameters (whose values are checked
/// for time words on their own), date/time casts (checked on their own), arithmetic on
/// such values, and the built-ins that build a date or time from parts.
fn yields_no_text(e: &Expr, funcs: &dyn FunctionVolatility, columns: &mut Vec<String>) -> bool {
    const DATETIME_FUNCTIONS: &[&str] = &[
        "date_bin",
        "date_trunc",
        "make_date",
        "make_time",
        "make_timestamp",
        "make_timestamptz",
        "to_date",
        "to_timestamp",
    ];
    match e {
        Expr::Value(_) | Expr::TypedString { .. } | Expr::Interval(_) => true,
        Expr::Nested(inner) => yields_no_text(inner, funcs, columns),
        Expr::Identifier(ident) => {
            columns.push(fold(ident));
            true
        }
        Expr::CompoundIdentifier(parts) => parts.last().is_some_and(|last| {
            columns.push(fold(last));
            true
        }),
        Expr::Cast { data_type, .. } => is_builtin_datetime(data_type),
        Expr::AtTimeZone { timestamp, .. } => yields_no_text(timestamp, funcs, columns),
        Expr::BinaryOp {
            op: sqlparser::ast::BinaryOperator::Plus | sqlparser::ast::BinaryOperator::Minus,
            left,
            right,
        } => yields_no_text(left, funcs, columns) && yields_no_text(right, funcs, columns),
        Expr::Function(f) => {
            let Some(parts) = name_parts(&f.name) else {
                return false;
            };
            let builtin = match parts.as_slice() {
                [name] | [_, name] if parts.len() == 1 || parts[0] == "pg_catalog" => name,
                _ => return false,
            };
            // A user function of the same name may be what the call resolves to.
            DATETIME_FUNCTIONS.contains(&builtin.as_str()) && !funcs.user_function(builtin)
        }
        _ => false,
    }
}

/// A type whose input may read text such as `'now'` as the current time: the date and time
/// types, their arrays and ranges, and any type this analysis does not know to be free of
/// them (a domain over `date`, a composite type with a `timestamptz` field).
fn may_hold_time(t: &sqlparser::ast::DataType, funcs: &dyn FunctionVolatility) -> bool {
    use sqlparser::ast::{ArrayElemTypeDef, DataType};
    // Built-in types only: an extension's type (citext, hstore) is a user type, judged by
    // the catalog (`unsafe_type`), as is a user type shadowing one of these names.
    const NO_TIME: &[&str] = &[
        "bit", "bool", "box", "bpchar", "bytea", "cidr", "circle", "float4", "float8", "inet",
        "int2", "int4", "int8", "interval", "json", "jsonb", "jsonpath", "line", "lseg", "macaddr",
        "macaddr8", "money", "name", "numeric", "oid", "path", "pg_lsn", "point", "polygon",
        "text", "tsquery", "tsvector", "uuid", "varbit", "varchar", "xml",
    ];
    match t {
        _ if is_datetime_type(t) => true,
        DataType::Array(
            ArrayElemTypeDef::SquareBracket(inner, _)
            | ArrayElemTypeDef::AngleBracket(inner)
            | ArrayElemTypeDef::Parenthesis(inner),
        ) => may_hold_time(inner, funcs),
        // A user type the catalog knows and does not list as unsafe (an enum, a domain over
        // text, citext): its input cannot read the time. Unsafe ones bypass before this.
        DataType::Custom(name, _) => {
            let name = name.to_string().to_ascii_lowercase();
            let user_name = type_name(t);
            let known_safe_user_type =
                funcs.user_type(&user_name) && !funcs.unsafe_type(&user_name);
            !NO_TIME.contains(&name.trim_start_matches("pg_catalog.")) && !known_safe_user_type
        }
        _ => false,
    }
}

/// The name a type is looked up by: its last name part, lower-cased, without type
/// modifiers or array brackets (`app."Day"(3)[]` → `day`).
fn type_name(t: &sqlparser::ast::DataType) -> String {
    let text = t.to_string().to_ascii_lowercase();
    let base = text.split(['(', '[']).next().unwrap_or_default().trim();
    base.rsplit('.')
        .next()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

/// Whether a FROM item gives its columns names of its own (`t AS x(a, b)`).
fn table_factor_renames_columns(factor: &TableFactor) -> bool {
    let alias = match factor {
        TableFactor::Table { alias, .. }
        | TableFactor::Derived { alias, .. }
        | TableFactor::NestedJoin { alias, .. }
        | TableFactor::Function { alias, .. }
        | TableFactor::UNNEST { alias, .. } => alias.as_ref(),
        _ => None,
    };
    alias.is_some_and(|a| !a.columns.is_empty())
}

/// The built-in date and time types themselves (no arrays or ranges), by name.
fn is_builtin_datetime(t: &sqlparser::ast::DataType) -> bool {
    let mut name = String::new();
    let mut depth = 0;
    for c in t.to_string().to_ascii_lowercase().chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 => name.push(c),
            _ => {}
        }
    }
    let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
    matches!(
        name.trim_start_matches("pg_catalog."),
        "date"
            | "time"
            | "timetz"
            | "timestamp"
            | "timestamptz"
            | "time with time zone"
            | "time without time zone"
            | "timestamp with time zone"
            | "timestamp without time zone"
    )
}

/// regclass, regtype, regproc, ...: object identifier types whose input reads the catalog.
fn is_reg_type(t: &sqlparser::ast::DataType) -> bool {
    let name = t.to_string().to_ascii_lowercase();
    name.trim_start_matches("pg_catalog.").starts_with("reg")
}
