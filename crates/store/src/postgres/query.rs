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

use std::collections::HashSet;
use std::ops::ControlFlow;

use postgres::error::SqlState;
use postgres::types::Type;
use postgres::{Client, SimpleQueryMessage};
use serde_json::Value;
use sqlparser::ast::{Expr, ObjectName, ObjectNamePart, Query, Statement, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::PgTx;
use crate::model::{EnvironmentId, QueryBounds, QueryOutput};
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

/// Largest answer in bytes of values; past it the answer is cut and marked truncated.
const MAX_OUTPUT_BYTES: usize = 64 * 1024 * 1024;

/// The schema the views live in, beside the store's schema.
pub(super) fn views_schema(store_schema: &str) -> String {
    format!("{store_schema}_views")
}

fn iso_time(column: &str) -> String {
    format!("to_char(to_timestamp({column} / 1000000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
}

/// Creates or replaces the views (run with the migrations; views hold no data).
pub(super) fn install_views(client: &mut Client, store_schema: &str) -> StoreResult<()> {
    let store = super::quote_identifier(store_schema);
    let views = super::quote_identifier(&views_schema(store_schema));
    let environment = "current_setting('roster.environment_id')::bigint";
    let sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {views};
        CREATE OR REPLACE VIEW {views}.identities AS SELECT
            p.profile_id AS profile_id,
            e.slug AS environment,
            p.user_id AS distinct_id,
            (SELECT COALESCE(json_agg(i.value ORDER BY i.value), '[]'::json)::text FROM {store}.identifiers i
                WHERE i.environment_id = p.environment_id AND i.profile_id = p.profile_id AND i.kind = 'anonymous_id')
                AS anonymous_ids,
            p.traits ->> 'email' AS email,
            p.traits AS traits,
            p.identified::int AS identified,
            {created_at} AS created_at,
            {updated_at} AS updated_at
         FROM {store}.profiles p JOIN {store}.environments e ON e.environment_id = p.environment_id
         WHERE p.environment_id = {environment};
        CREATE OR REPLACE VIEW {views}.events AS SELECT
            ev.event_id AS event_id,
            e.slug AS environment,
            ev.profile_id AS profile_id,
            ev.distinct_id AS distinct_id,
            ev.anonymous_id AS anonymous_id,
            ev.event AS event,
            ev.properties AS properties,
            {timestamp} AS timestamp,
            {received_at} AS received_at,
            ev.identity_traits AS identity_traits
         FROM {store}.events ev JOIN {store}.environments e ON e.environment_id = ev.environment_id
         WHERE ev.environment_id = {environment};
        CREATE OR REPLACE VIEW {views}.trait_changes AS SELECT
            h.profile_id AS profile_id,
            e.slug AS environment,
            p.user_id AS distinct_id,
            c.value ->> 'key' AS key,
            c.value ->> 'old' AS old_value,
            c.value ->> 'new' AS new_value,
            {changed_at} AS timestamp,
            {recorded_at} AS recorded_at
         FROM {store}.trait_history h CROSS JOIN LATERAL jsonb_array_elements(h.changes) AS c(value)
         JOIN {store}.environments e ON e.environment_id = h.environment_id
         LEFT JOIN {store}.profiles p ON p.environment_id = h.environment_id AND p.profile_id = h.profile_id
         WHERE h.environment_id = {environment};
        CREATE OR REPLACE VIEW {views}.devices AS SELECT
            d.token AS token,
            e.slug AS environment,
            d.profile_id AS profile_id,
            p.user_id AS distinct_id,
            d.platform AS platform,
            d.attributes AS attributes,
            {last_used} AS last_used,
            d.last_status AS last_status,
            {device_created_at} AS created_at,
            {device_updated_at} AS updated_at
         FROM {store}.devices d JOIN {store}.environments e ON e.environment_id = d.environment_id
         LEFT JOIN {store}.profiles p ON p.environment_id = d.environment_id AND p.profile_id = d.profile_id
         WHERE d.environment_id = {environment};
        CREATE OR REPLACE VIEW {views}.segment_memberships AS SELECT
            m.segment_id AS segment_id,
            s.name AS segment,
            e.slug AS environment,
            m.profile_id AS profile_id,
            p.user_id AS distinct_id,
            {entered_at} AS entered_at,
            {exited_at} AS exited_at,
            (m.exited_at IS NULL)::int AS is_member
         FROM {store}.segment_memberships m
         JOIN {store}.segments s ON s.segment_id = m.segment_id
         JOIN {store}.environments e ON e.environment_id = m.environment_id
         LEFT JOIN {store}.profiles p ON p.environment_id = m.environment_id AND p.profile_id = m.profile_id
         WHERE m.environment_id = {environment};",
        created_at = iso_time("p.created_at"),
        updated_at = iso_time("p.updated_at"),
        timestamp = iso_time("ev.timestamp"),
        received_at = iso_time("ev.received_at"),
        changed_at = iso_time("(c.value ->> 'at')::bigint"),
        recorded_at = iso_time("h.recorded_at"),
        last_used = iso_time("d.last_used"),
        device_created_at = iso_time("d.created_at"),
        device_updated_at = iso_time("d.updated_at"),
        entered_at = iso_time("m.entered_at"),
        exited_at = iso_time("m.exited_at"),
    );
    client.batch_execute(&sql)?;
    Ok(())
}

/// Collects what a statement reads and calls.
#[derive(Default)]
struct Reach {
    relations: Vec<ObjectName>,
    functions: Vec<ObjectName>,
    ctes: HashSet<String>,
}

impl Visitor for Reach {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(cte.alias.name.value.to_lowercase());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        self.relations.push(relation.clone());
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(function) = expr {
            self.functions.push(function.name.clone());
        }
        ControlFlow::Continue(())
    }
}

/// The single unqualified, lower-cased name of an object, if it is one.
fn simple_name(name: &ObjectName) -> Option<String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => Some(ident.value.to_lowercase()),
        _ => None,
    }
}

/// Refuses a statement that is not one read-only query over the views (see the module comment).
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
    let mut reach = Reach::default();
    let _ = query.visit(&mut reach);
    for relation in &reach.relations {
        let allowed = simple_name(relation).is_some_and(|name| {
            VIEW_NAMES.contains(&name.as_str())
                || TABLE_FUNCTIONS.contains(&name.as_str())
                || reach.ctes.contains(&name)
        });
        if !allowed {
            return Err(StoreError::QueryRefused(format!(
                "`{relation}` is not readable; queries read the views {}",
                VIEW_NAMES.join(", ")
            )));
        }
    }
    for function in &reach.functions {
        let allowed = simple_name(function).is_some_and(|name| {
            FUNCTIONS.binary_search(&name.as_str()).is_ok() || TABLE_FUNCTIONS.contains(&name.as_str())
        });
        if !allowed {
            return Err(StoreError::QueryRefused(format!("the function `{function}` is not available to queries")));
        }
    }
    Ok(())
}

/// Runs one checked statement for `environment_id` within `bounds`, in the read-only transaction
/// `tx`.
pub(super) fn run(
    tx: &mut PgTx<'_>,
    store_schema: &str,
    environment_id: EnvironmentId,
    sql: &str,
    bounds: &QueryBounds,
) -> StoreResult<QueryOutput> {
    let timeout_ms = bounds.timeout.as_millis().max(1);
    let transaction = tx.raw()?;
    transaction.batch_execute(&format!(
        "SET LOCAL search_path TO {}; SET LOCAL roster.environment_id = '{environment_id}'; \
         SET LOCAL statement_timeout = {timeout_ms}",
        super::quote_identifier(&views_schema(store_schema))
    ))?;
    let statement = transaction.prepare(sql).map_err(|error| query_error(error, bounds))?;
    let columns: Vec<(String, Type)> =
        statement.columns().iter().map(|column| (column.name().to_owned(), column.type_().clone())).collect();
    transaction
        .batch_execute(&format!("DECLARE roster_query NO SCROLL CURSOR FOR {sql}"))
        .map_err(|error| query_error(error, bounds))?;
    let fetch = bounds.max_rows.saturating_add(1);
    let messages = transaction
        .simple_query(&format!("FETCH FORWARD {fetch} FROM roster_query"))
        .map_err(|error| query_error(error, bounds))?;
    let mut rows = Vec::new();
    let mut truncated = false;
    let mut output_bytes = 0usize;
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else { continue };
        if rows.len() == bounds.max_rows {
            truncated = true;
            break;
        }
        let mut values = Vec::with_capacity(columns.len());
        for (index, (_, column_type)) in columns.iter().enumerate() {
            let text = row.get(index);
            output_bytes += text.map_or(0, str::len);
            values.push(to_json(text, column_type));
        }
        if output_bytes > MAX_OUTPUT_BYTES {
            truncated = true;
            break;
        }
        rows.push(values);
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
        ] {
            assert!(check_statement(refused).is_err(), "{refused} must be refused");
        }
    }
}
