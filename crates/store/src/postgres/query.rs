//! Users' SQL on PostgreSQL, run by PostgreSQL itself.
//!
//! The views (`identities`, `events`, `trait_changes`, `devices`, `segment_memberships`) live in
//! a schema of their own beside the store's tables, each filtered by the environment set for the
//! transaction (`roster.environment_id`). A statement runs in a read-only transaction with that
//! schema alone on the search path and a `statement_timeout`. Before it runs, it is parsed: one
//! `SELECT`/`WITH`/`VALUES` query, reading only the views, its own CTEs and a few table functions,
//! calling only functions from an allow-list — so it cannot name the store's tables, change the
//! environment setting (`set_config` is not on the list), or run SQL text (`query_to_xml`, ...).
//! Results are fetched through a cursor, so rows past the cap are never produced.

use std::ops::ControlFlow;

use postgres::SimpleQueryMessage;
use postgres::error::SqlState;
use postgres::types::Type;
use serde_json::Value;
use sqlparser::ast::{Expr, ObjectName, ObjectNamePart, Query, SetExpr, Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::model::{QueryBounds, QueryOutput};
use crate::{StoreError, StoreResult};

/// The views users query.
pub const VIEW_NAMES: [&str; 5] = ["identities", "events", "trait_changes", "devices", "segment_memberships"];

/// Table functions a query may read from.
const TABLE_FUNCTIONS: [&str; 8] = [
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_object_keys",
    "generate_series",
    "unnest",
    "jsonb_to_record",
];

/// Functions a query may call: SQL's ordinary scalar, aggregate, window, text, number, time and
/// JSON functions. Nothing that reads files, other tables by name, settings, or runs SQL text.
const FUNCTIONS: &[&str] = &[
    "abs",
    "array_agg",
    "array_length",
    "avg",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "cume_dist",
    "date_bin",
    "date_part",
    "date_trunc",
    "dense_rank",
    "every",
    "exp",
    "first_value",
    "floor",
    "greatest",
    "initcap",
    "json_agg",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_object_agg",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_object_agg",
    "jsonb_path_exists",
    "jsonb_path_query_first",
    "jsonb_strip_nulls",
    "jsonb_typeof",
    "lag",
    "last_value",
    "lead",
    "least",
    "left",
    "length",
    "ln",
    "log",
    "lower",
    "lpad",
    "ltrim",
    "make_interval",
    "max",
    "md5",
    "min",
    "mod",
    "mode",
    "now",
    "nth_value",
    "ntile",
    "nullif",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "position",
    "power",
    "rank",
    "regexp_like",
    "regexp_match",
    "regexp_replace",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
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
    "strpos",
    "substr",
    "sum",
    "to_char",
    "to_date",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "trim",
    "trunc",
    "upper",
    "var_pop",
    "var_samp",
    "variance",
    "width_bucket",
];

/// Rows fetched per round trip from the query's cursor.
const ROWS_PER_FETCH: usize = 64;

/// Largest answer in bytes of values; past it the answer is cut and marked truncated.
const MAX_OUTPUT_BYTES: usize = 64 * 1024 * 1024;

/// The names a relation may resolve to at one level of nesting: the CTEs of that query.
struct Scope {
    /// The query this scope belongs to (compared by address, never dereferenced).
    query: *const Query,
    /// CTE names visible inside this query's body.
    names: Vec<String>,
    /// For a CTE's own body: the CTEs defined before it (and itself when recursive), and whether
    /// the scope of the query defining it is to be skipped (it lists later siblings too, which
    /// PostgreSQL does not let a non-recursive CTE see: there such a name means a real table).
    hides_parent: bool,
    /// The CTE bodies this query defines, with the names each may see.
    cte_bodies: Vec<(*const Query, Vec<String>)>,
}

/// Walks a statement and stops at the first thing a user's query may not read or call.
#[derive(Default)]
struct Reach {
    scopes: Vec<Scope>,
    /// Relation names approved by the table factor being visited; the relation visit that
    /// follows consumes it. A relation reached any other way is refused.
    approved_relation: Option<ObjectName>,
}

impl Reach {
    fn cte_in_scope(&self, name: &str) -> bool {
        let mut index = self.scopes.len();
        while index > 0 {
            index -= 1;
            let scope = &self.scopes[index];
            if scope.names.iter().any(|cte| cte == name) {
                return true;
            }
            if scope.hides_parent {
                index = index.saturating_sub(1);
            }
        }
        false
    }
}

fn refuse(message: String) -> ControlFlow<StoreError> {
    ControlFlow::Break(StoreError::QueryRefused(message))
}

fn not_readable(name: &ObjectName) -> ControlFlow<StoreError> {
    refuse(format!("`{name}` is not readable; queries read the views {}", VIEW_NAMES.join(", ")))
}

/// Whether a query body (through its set operations) is anything but plain reads: `SELECT INTO`
/// a new table, `TABLE name` (which names a relation no table factor shows), or a data-modifying
/// statement (`WITH … DELETE`).
fn is_not_a_plain_read(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(select) => select.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => is_not_a_plain_read(left) || is_not_a_plain_read(right),
        SetExpr::Query(query) => is_not_a_plain_read(&query.body),
        SetExpr::Values(_) => false,
        _ => true,
    }
}

/// A name as PostgreSQL resolves it: unquoted identifiers fold to lower case, quoted ones keep
/// their case (so `"PG_LOCKS"` is not `pg_locks`).
fn resolved_name(ident: &sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() { ident.value.clone() } else { ident.value.to_lowercase() }
}

impl Visitor for Reach {
    type Break = StoreError;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<StoreError> {
        if !query.locks.is_empty() || query.for_clause.is_some() || is_not_a_plain_read(&query.body) {
            return refuse(
                "queries only read: SELECT or VALUES over the views (no TABLE, SELECT INTO, FOR UPDATE/SHARE, or writes)"
                    .into(),
            );
        }
        let address: *const Query = query;
        // A CTE's body sees the CTEs before it (and itself, in a recursive WITH), not later ones.
        let (names_before, hides_parent) = match self.scopes.last().and_then(|parent| {
            parent.cte_bodies.iter().find(|(body, _)| std::ptr::eq(*body, address)).map(|(_, names)| names.clone())
        }) {
            Some(names) => (names, true),
            None => (Vec::new(), false),
        };
        if hides_parent {
            // The body's own scope: what it may see, then (below) what it defines itself.
            self.scopes.push(Scope { query: address, names: names_before, hides_parent, cte_bodies: Vec::new() });
            // A CTE body with its own WITH gets one more scope for that WITH.
            if query.with.is_none() {
                return ControlFlow::Continue(());
            }
        }
        let mut scope = Scope { query: address, names: Vec::new(), hides_parent: false, cte_bodies: Vec::new() };
        if let Some(with) = &query.with {
            let names: Vec<String> = with.cte_tables.iter().map(|cte| resolved_name(&cte.alias.name)).collect();
            for (index, cte) in with.cte_tables.iter().enumerate() {
                let visible = if with.recursive { names[..=index].to_vec() } else { names[..index].to_vec() };
                scope.cte_bodies.push((&*cte.query as *const Query, visible));
            }
            scope.names = names;
        }
        self.scopes.push(scope);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<StoreError> {
        let address: *const Query = query;
        while self.scopes.last().is_some_and(|scope| std::ptr::eq(scope.query, address)) {
            self.scopes.pop();
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<StoreError> {
        match factor {
            TableFactor::Table { name, args: None, .. } => {
                let allowed = simple_name(name)
                    .is_some_and(|simple| VIEW_NAMES.contains(&simple.as_str()) || self.cte_in_scope(&simple));
                if !allowed {
                    return not_readable(name);
                }
                self.approved_relation = Some(name.clone());
            }
            // A function in FROM is a table function whatever CTE shares its name.
            TableFactor::Table { name, args: Some(_), .. } | TableFactor::Function { name, .. } => {
                if !simple_name(name).is_some_and(|simple| TABLE_FUNCTIONS.contains(&simple.as_str())) {
                    return refuse(format!("the table function `{name}` is not available to queries"));
                }
                self.approved_relation = Some(name.clone());
            }
            TableFactor::Derived { .. } | TableFactor::NestedJoin { .. } | TableFactor::UNNEST { .. } => {}
            other => return refuse(format!("`{other}` is not available to queries")),
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<StoreError> {
        match self.approved_relation.take() {
            Some(approved) if approved == *relation => ControlFlow::Continue(()),
            _ => not_readable(relation),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<StoreError> {
        if let Expr::Function(function) = expr {
            let allowed = simple_name(&function.name).is_some_and(|name| {
                FUNCTIONS.binary_search(&name.as_str()).is_ok() || TABLE_FUNCTIONS.contains(&name.as_str())
            });
            if !allowed {
                return refuse(format!("the function `{}` is not available to queries", function.name));
            }
        }
        ControlFlow::Continue(())
    }
}

/// The single unqualified, lower-cased name of an object, if it is one.
fn simple_name(name: &ObjectName) -> Option<String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => Some(resolved_name(ident)),
        _ => None,
    }
}

/// Refuses a statement that is not one read-only query over the views (see the module comment).
/// A second wall: the query role (see `sandbox`) could not reach anything else anyway.
pub(super) fn check_statement(sql: &str) -> StoreResult<()> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|error| {
        // A statement that does not even start like a query is refused; a query with a syntax
        // error failed.
        let first_word = sql.trim_start_matches(|character: char| character.is_whitespace() || character == '(');
        let first_word: String =
            first_word.chars().take_while(char::is_ascii_alphabetic).collect::<String>().to_lowercase();
        if ["select", "with", "values"].contains(&first_word.as_str()) {
            StoreError::QueryFailed(format!("could not parse the statement: {error}"))
        } else {
            StoreError::QueryRefused("only SELECT, WITH and VALUES queries over the views run".into())
        }
    })?;
    let [statement] = statements.as_slice() else {
        return Err(StoreError::QueryRefused("send exactly one statement per query".into()));
    };
    let Statement::Query(query) = statement else {
        return Err(StoreError::QueryRefused(
            "only SELECT, WITH and VALUES queries over the views run (no writes, DDL, SET, transactions)".into(),
        ));
    };
    match query.visit(&mut Reach::default()) {
        ControlFlow::Break(refusal) => Err(refusal),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Runs one checked statement within `bounds` in `transaction`: a read-only transaction of the
/// environment's query role, whose search path holds the environment's views alone.
pub(super) fn run(
    transaction: &mut postgres::Transaction<'_>,
    views_schema: &str,
    sql: &str,
    bounds: &QueryBounds,
) -> StoreResult<QueryOutput> {
    let timeout_ms = bounds.timeout.as_millis().max(1);
    transaction.batch_execute(&format!(
        "SET LOCAL search_path TO {}; SET LOCAL statement_timeout = {timeout_ms}",
        super::quote_identifier(views_schema)
    ))?;
    let statement = transaction.prepare(sql).map_err(|error| query_error(error, bounds))?;
    let columns: Vec<(String, Type)> =
        statement.columns().iter().map(|column| (column.name().to_owned(), column.type_().clone())).collect();
    transaction
        .batch_execute(&format!("DECLARE roster_query NO SCROLL CURSOR FOR {sql}"))
        .map_err(|error| query_error(error, bounds))?;
    // Fetched a few rows at a time, so the answer's size cap bounds what is held in memory (a
    // whole fetch arrives at once); one value is still at most PostgreSQL's 1 GB.
    let mut rows = Vec::new();
    let mut truncated = false;
    let mut output_bytes = 0usize;
    'fetching: loop {
        let messages = transaction
            .simple_query(&format!("FETCH FORWARD {ROWS_PER_FETCH} FROM roster_query"))
            .map_err(|error| query_error(error, bounds))?;
        let mut fetched = 0;
        for message in messages {
            let SimpleQueryMessage::Row(row) = message else { continue };
            fetched += 1;
            if rows.len() == bounds.max_rows {
                truncated = true;
                break 'fetching;
            }
            let mut values = Vec::with_capacity(columns.len());
            for (index, (_, column_type)) in columns.iter().enumerate() {
                let text = row.get(index);
                output_bytes += text.map_or(0, str::len);
                values.push(to_json(text, column_type));
            }
            if output_bytes > MAX_OUTPUT_BYTES {
                truncated = true;
                break 'fetching;
            }
            rows.push(values);
        }
        if fetched < ROWS_PER_FETCH {
            break;
        }
    }
    Ok(QueryOutput { columns: columns.into_iter().map(|(name, _)| name).collect(), rows, truncated })
}

/// A value in PostgreSQL's text form as JSON: numbers and booleans typed, JSON columns as their
/// text (as on the embedded store), everything else as text.
fn to_json(text: Option<&str>, column_type: &Type) -> Value {
    let Some(text) = text else { return Value::Null };
    match *column_type {
        Type::BOOL => Value::Bool(text == "t"),
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
            text.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => match serde_json::from_str::<serde_json::Number>(text) {
            Ok(number) => Value::Number(number),
            Err(_) => Value::String(text.to_owned()),
        },
        _ => Value::String(text.to_owned()),
    }
}

fn query_error(error: postgres::Error, bounds: &QueryBounds) -> StoreError {
    if error.code() == Some(&SqlState::QUERY_CANCELED) {
        return StoreError::QueryTimeout(bounds.timeout);
    }
    match error.as_db_error() {
        Some(db_error) => StoreError::QueryFailed(db_error.message().to_owned()),
        None => StoreError::QueryFailed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_function_list_is_sorted_for_binary_search() {
        let mut sorted = FUNCTIONS.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, FUNCTIONS);
    }

    #[test]
    fn only_queries_over_the_views_pass() {
        for allowed in [
            "SELECT distinct_id, traits->>'plan' FROM identities",
            "WITH recent AS (SELECT * FROM events) SELECT count(*) FROM recent",
            "SELECT key, count(*) FROM identities, jsonb_each(traits) GROUP BY key",
            "VALUES (1)",
            "SELECT lower(event) FROM events ORDER BY timestamp DESC LIMIT 5",
        ] {
            check_statement(allowed).unwrap_or_else(|error| panic!("{allowed}: {error}"));
        }
        for refused in [
            "SELECT * FROM profiles",
            "SELECT * FROM public.profiles",
            "SELECT * FROM pg_catalog.pg_tables",
            "SELECT set_config('roster.environment_id', '2', true)",
            "SELECT * FROM identities WHERE set_config('roster.environment_id', '2', true) IS NOT NULL",
            "SELECT query_to_xml('select 1', true, true, '')",
            "SELECT pg_sleep(10)",
            "SELECT current_setting('roster.environment_id')",
            "DELETE FROM identities",
            "SET roster.environment_id = 2",
            "SELECT 1; SELECT 2",
            "SELECT pg_read_file('/etc/passwd')",
            "WITH t AS (TABLE pg_stat_user_tables) SELECT * FROM t",
            "TABLE identities",
            "WITH \"PG_LOCKS\" AS (SELECT 1) SELECT * FROM pg_locks",
            "WITH gone AS (DELETE FROM identities RETURNING *) SELECT * FROM gone",
        ] {
            assert!(check_statement(refused).is_err(), "{refused} must be refused");
        }
    }
}
