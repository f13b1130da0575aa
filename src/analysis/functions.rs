//! Which function calls a cacheable read may contain.
//!
//! Order of decision: a hard-coded deny list (time, randomness, session, transaction,
//! sequence and system functions are never cached, whatever the catalog says), then a small
//! allow list of immutable built-ins (so common queries need no catalog round trip), then the
//! caller's [`FunctionVolatility`]. The built-in lists only apply to unqualified or
//! `pg_catalog.` names: a schema-qualified user function of the same name is the catalog's call.

use super::model::{BypassReason, FunctionVolatility, Volatility};

/// Exact names never cached.
const DENY: &[&str] = &[
    "age", // age(ts) is relative to current_date
    "clock_timestamp",
    "current_catalog",
    "current_database",
    "current_date",
    "current_query",
    "current_role",
    "current_schema",
    "current_schemas",
    "current_setting",
    "current_time",
    "current_timestamp",
    "current_user",
    "gen_random_uuid",
    "localtime",
    "localtimestamp",
    "now",
    // hstore's populate_record is immutable, yet reads its text values with the record's
    // field types' input functions ('now' as a timestamptz field).
    "populate_record",
    "random",
    "random_normal",
    "session_user",
    "set_config",
    "setseed",
    "statement_timestamp",
    "system_user",
    "timeofday",
    "transaction_timestamp",
    "user",
    "uuidv4",
    "uuidv7",
    "version",
];

/// Name prefixes never cached: system/admin functions, transaction ids, connection info,
/// uuid generators, large objects, dblink.
const DENY_PREFIXES: &[&str] = &[
    "pg_",
    "txid_",
    "inet_client_",
    "inet_server_",
    "uuid_generate_",
    "lo_",
    "dblink",
];

const SEQUENCE: &[&str] = &["currval", "lastval", "nextval", "setval"];

/// Immutable built-ins, aggregates and window functions over them, and syntax that
/// sqlparser reports as calls (`ARRAY(subquery)`, `ROW(...)`). Sorted: binary search.
const ALLOW: &[&str] = &[
    "abs",
    "array",
    "array_agg",
    "array_append",
    "array_cat",
    "array_dims",
    "array_length",
    "array_lower",
    "array_ndims",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_to_json",
    "array_to_string",
    "array_upper",
    "ascii",
    "avg",
    "bit_and",
    "bit_length",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "cbrt",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "cume_dist",
    "date_part",
    "date_trunc",
    "decode",
    "degrees",
    "dense_rank",
    "div",
    "encode",
    "every",
    "exp",
    "first_value",
    "floor",
    "gcd",
    "generate_series",
    "generate_subscripts",
    "greatest",
    "grouping",
    "initcap",
    "json_agg",
    "json_array_elements",
    "json_array_elements_text",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_each_text",
    "json_extract_path",
    "json_extract_path_text",
    "json_object_agg",
    "json_object_keys",
    "json_strip_nulls",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_insert",
    "jsonb_object_agg",
    "jsonb_object_keys",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_typeof",
    "lag",
    "last_value",
    "lcm",
    "lead",
    "least",
    "left",
    "length",
    "ln",
    "log",
    "log10",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "max",
    "md5",
    "min",
    "mod",
    "nth_value",
    "ntile",
    "nullif",
    "num_nonnulls",
    "num_nulls",
    "octet_length",
    "percent_rank",
    "pi",
    "position",
    "pow",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "radians",
    "rank",
    "regexp_count",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_substr",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "sign",
    "split_part",
    "sqrt",
    "starts_with",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "string_to_array",
    "strpos",
    "substr",
    "substring",
    "sum",
    "to_json",
    "to_jsonb",
    "translate",
    "trim",
    "trunc",
    "unnest",
    "upper",
    "var_pop",
    "var_samp",
    "variance",
    "width_bucket",
];

/// Whether `name` (as a bypass reason names it) is one of the built-ins denied by name.
pub(crate) fn is_denied_builtin(name: &str) -> bool {
    let name = name.strip_prefix("pg_catalog.").unwrap_or(name);
    SEQUENCE.contains(&name)
        || DENY.contains(&name)
        || DENY_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Returns why a call to `schema.name` makes a read uncacheable, or `None` if it is safe.
pub(crate) fn check(
    schema: Option<&str>,
    name: &str,
    funcs: &dyn FunctionVolatility,
) -> Option<BypassReason> {
    let builtin_scope = matches!(schema, None | Some("pg_catalog"));
    if builtin_scope {
        if SEQUENCE.contains(&name) {
            return Some(BypassReason::SequenceFunction(name.to_owned()));
        }
        if DENY.contains(&name) || DENY_PREFIXES.iter().any(|p| name.starts_with(p)) {
            return Some(BypassReason::VolatileFunction(name.to_owned()));
        }
        if ALLOW.binary_search(&name).is_ok() && !funcs.user_overload(name) {
            return None;
        }
    }
    let display = || match schema {
        Some(schema) => format!("{schema}.{name}"),
        None => name.to_owned(),
    };
    match funcs.volatility(schema, name) {
        Some(Volatility::Immutable) => None,
        Some(Volatility::Stable) => Some(BypassReason::StableFunction(display())),
        Some(Volatility::Volatile) => Some(BypassReason::VolatileFunction(display())),
        None => Some(BypassReason::UnknownFunction(display())),
    }
}

/// SQL keywords that PostgreSQL evaluates as functions when written bare (sqlparser gives
/// some of them as plain identifiers). Only unquoted identifiers count: `"user"` is a column.
pub(crate) fn is_bare_function_keyword(name: &str) -> bool {
    matches!(
        name,
        "current_catalog"
            | "current_date"
            | "current_role"
            | "current_schema"
            | "current_time"
            | "current_timestamp"
            | "current_user"
            | "localtime"
            | "localtimestamp"
            | "session_user"
            | "system_user"
            | "user"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::model::NoCatalog;

    #[test]
    fn allow_list_is_sorted_and_disjoint_from_deny_list() {
        assert!(
            ALLOW.windows(2).all(|w| w[0] < w[1]),
            "ALLOW must be sorted"
        );
        for name in ALLOW {
            assert!(!DENY.contains(name) && !DENY_PREFIXES.iter().any(|p| name.starts_with(p)));
        }
    }

    #[test]
    fn deny_list_wins_over_catalog() {
        let says_immutable = |_: Option<&str>, _: &str| Some(Volatility::Immutable);
        assert!(check(None, "now", &says_immutable).is_some());
        assert!(check(Some("pg_catalog"), "random", &says_immutable).is_some());
        assert!(check(None, "pg_sleep", &says_immutable).is_some());
        assert_eq!(
            check(None, "nextval", &says_immutable),
            Some(BypassReason::SequenceFunction("nextval".into()))
        );
    }

    #[test]
    fn qualified_user_function_with_builtin_name_asks_catalog() {
        let says_immutable = |_: Option<&str>, _: &str| Some(Volatility::Immutable);
        assert_eq!(check(Some("app"), "now", &says_immutable), None);
        assert_eq!(
            check(Some("app"), "lower", &NoCatalog),
            Some(BypassReason::UnknownFunction("app.lower".into()))
        );
    }

    #[test]
    fn catalog_answers_map_to_reasons() {
        let cat = |_: Option<&str>, name: &str| match name {
            "f_imm" => Some(Volatility::Immutable),
            "f_stable" => Some(Volatility::Stable),
            "f_vol" => Some(Volatility::Volatile),
            _ => None,
        };
        assert_eq!(check(None, "f_imm", &cat), None);
        assert_eq!(
            check(None, "f_stable", &cat),
            Some(BypassReason::StableFunction("f_stable".into()))
        );
        assert_eq!(
            check(None, "f_vol", &cat),
            Some(BypassReason::VolatileFunction("f_vol".into()))
        );
        assert_eq!(
            check(None, "f_x", &cat),
            Some(BypassReason::UnknownFunction("f_x".into()))
        );
        assert_eq!(check(None, "lower", &NoCatalog), None);
    }
}
