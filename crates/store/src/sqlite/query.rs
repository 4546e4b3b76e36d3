//! Users' SQL on the embedded store.
//!
//! A query connection's own main database is an empty in-memory one; the store's file is attached
//! under a schema name drawn at random per process, which users never see. TEMP views —
//! `identities`, `events`, `trait_changes` — read the store's tables through that name, filtered
//! by `roster_environment()`, a function answering the environment of the query running on that
//! connection. Users can reach the store only through the views because they cannot name its
//! schema; an authorizer, active while a user's statement runs, enforces the rest: reads only (no
//! writes, DDL, `ATTACH`, pragmas, transactions, `EXPLAIN`), and no reads outside the store's
//! schema (so not the schema tables that hold the views' text). A progress handler stops a
//! statement past its time limit, and rows past the cap are not read. The connections are separate
//! from the writer's, so a query never delays ingest (WAL readers do not block the writer).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode};
use serde_json::Value;

use crate::model::{EnvironmentId, QueryBounds, QueryOutput};
use crate::{StoreError, StoreResult};

/// The views users query; the only names a user's statement may read through.
pub const VIEW_NAMES: [&str; 5] = ["identities", "events", "trait_changes", "devices", "segment_memberships"];

/// Largest string or blob a user's query may produce, in bytes.
const MAX_VALUE_BYTES: i32 = 16 * 1024 * 1024;

/// Largest answer a user's query may produce, in bytes of values; past it the answer is cut and
/// marked truncated, like the row cap.
const MAX_OUTPUT_BYTES: usize = 64 * 1024 * 1024;

/// Table-valued functions users may call at top level.
const ALLOWED_TABLE_FUNCTIONS: [&str; 2] = ["json_each", "json_tree"];

/// `strftime` of a microsecond column as an RFC 3339 text with milliseconds (sortable as text).
fn iso_time(column: &str) -> String {
    format!("strftime('%Y-%m-%dT%H:%M:%fZ', {column} / 1000000.0, 'unixepoch')")
}

/// The views over the store attached as `store`.
fn views(store: &str) -> String {
    format!(
        "CREATE TEMP VIEW identities AS SELECT \
            p.profile_id AS profile_id, \
            roster_environment_slug() AS environment, \
            p.user_id AS distinct_id, \
            (SELECT json_group_array(i.value) FROM {store}.identifiers i WHERE i.environment_id = p.environment_id \
                AND i.profile_id = p.profile_id AND i.kind = 'anonymous_id') AS anonymous_ids, \
            p.traits ->> '$.email' AS email, \
            p.traits AS traits, \
            p.identified AS identified, \
            {created_at} AS created_at, \
            {updated_at} AS updated_at \
         FROM {store}.profiles p \
         WHERE p.environment_id = roster_environment();
         CREATE TEMP VIEW events AS SELECT \
            ev.event_id AS event_id, \
            roster_environment_slug() AS environment, \
            ev.profile_id AS profile_id, \
            ev.distinct_id AS distinct_id, \
            ev.anonymous_id AS anonymous_id, \
            ev.event AS event, \
            ev.properties AS properties, \
            {timestamp} AS timestamp, \
            {received_at} AS received_at, \
            ev.identity_traits AS identity_traits, \
            ev.context AS context \
         FROM {store}.events ev \
         WHERE ev.environment_id = roster_environment();
         CREATE TEMP VIEW trait_changes AS SELECT \
            h.profile_id AS profile_id, \
            roster_environment_slug() AS environment, \
            p.user_id AS distinct_id, \
            c.value ->> '$.key' AS key, \
            c.value ->> '$.old' AS old_value, \
            c.value ->> '$.new' AS new_value, \
            {changed_at} AS timestamp, \
            {recorded_at} AS recorded_at \
         FROM {store}.trait_history h JOIN json_each(h.changes) c \
         LEFT JOIN {store}.profiles p ON p.environment_id = h.environment_id AND p.profile_id = h.profile_id \
         WHERE h.environment_id = roster_environment();
         CREATE TEMP VIEW devices AS SELECT \
            d.token AS token, \
            roster_environment_slug() AS environment, \
            d.profile_id AS profile_id, \
            p.user_id AS distinct_id, \
            d.platform AS platform, \
            d.attributes AS attributes, \
            {last_used} AS last_used, \
            d.last_status AS last_status, \
            {device_created_at} AS created_at, \
            {device_updated_at} AS updated_at \
         FROM {store}.devices d \
         LEFT JOIN {store}.profiles p ON p.environment_id = d.environment_id AND p.profile_id = d.profile_id \
         WHERE d.environment_id = roster_environment();
         CREATE TEMP VIEW segment_memberships AS SELECT \
            m.segment_id AS segment_id, \
            s.name AS segment, \
            roster_environment_slug() AS environment, \
            m.profile_id AS profile_id, \
            p.user_id AS distinct_id, \
            {entered_at} AS entered_at, \
            {exited_at} AS exited_at, \
            (m.exited_at IS NULL) AS is_member \
         FROM {store}.segment_memberships m \
         JOIN {store}.segments s ON s.segment_id = m.segment_id \
         LEFT JOIN {store}.profiles p ON p.environment_id = m.environment_id AND p.profile_id = m.profile_id \
         WHERE m.environment_id = roster_environment();",
        created_at = iso_time("p.created_at"),
        updated_at = iso_time("p.updated_at"),
        timestamp = iso_time("ev.timestamp"),
        received_at = iso_time("ev.received_at"),
        changed_at = iso_time("(c.value ->> '$.at')"),
        recorded_at = iso_time("h.recorded_at"),
        last_used = iso_time("d.last_used"),
        device_created_at = iso_time("d.created_at"),
        device_updated_at = iso_time("d.updated_at"),
        entered_at = iso_time("m.entered_at"),
        exited_at = iso_time("m.exited_at"),
    )
}

/// A read connection set up for users' SQL.
pub(super) struct QueryConnection {
    connection: Connection,
    /// The environment `roster_environment()` answers while a query runs.
    environment: Arc<AtomicI64>,
    /// Its slug, answered by `roster_environment_slug()` (cheaper than joining `environments`).
    environment_slug: Arc<Mutex<String>>,
    /// The first action the authorizer denied, for the error message.
    denied: Arc<Mutex<Option<String>>>,
    /// The secret schema name the store is attached under.
    store_schema: String,
}

impl QueryConnection {
    /// Opens a query connection on the store file at `database_path`, attached as `store_schema`.
    pub(super) fn open(database_path: &std::path::Path, store_schema: &str) -> StoreResult<Self> {
        let connection = Connection::open_in_memory()?;
        connection.execute_batch("PRAGMA busy_timeout = 10000;")?;
        // No single value a query builds may exceed this (e.g. `randomblob(1e9)` per row).
        connection.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)?;
        connection
            .execute("ATTACH DATABASE ?1 AS ?2", rusqlite::params![database_path.to_string_lossy(), store_schema])?;
        connection.execute_batch(&format!("PRAGMA {store_schema}.mmap_size = 268435456;"))?;
        // -1 matches no environment: a view read outside `run` sees nothing.
        let environment = Arc::new(AtomicI64::new(-1));
        let scope = Arc::clone(&environment);
        connection.create_scalar_function(
            "roster_environment",
            0,
            FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
            move |_| Ok(scope.load(Ordering::Relaxed)),
        )?;
        let environment_slug: Arc<Mutex<String>> = Arc::default();
        let slug = Arc::clone(&environment_slug);
        connection.create_scalar_function(
            "roster_environment_slug",
            0,
            FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
            move |_| Ok(slug.lock().map(|slug| slug.clone()).unwrap_or_default()),
        )?;
        connection.execute_batch(&views(store_schema))?;
        shadow_store_tables(&connection, store_schema)?;
        connection.execute_batch("PRAGMA query_only = ON;")?;
        Ok(QueryConnection {
            connection,
            environment,
            environment_slug,
            denied: Arc::default(),
            store_schema: store_schema.to_owned(),
        })
    }

    /// Runs one statement for `environment_id` within `bounds`.
    pub(super) fn run(
        &mut self,
        environment_id: EnvironmentId,
        sql: &str,
        bounds: &QueryBounds,
    ) -> StoreResult<QueryOutput> {
        let slug: String = self.connection.query_row(
            &format!("SELECT slug FROM {}.environments WHERE environment_id = ?1", self.store_schema),
            [environment_id],
            |row| row.get(0),
        )?;
        *self.environment_slug.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = slug;
        self.environment.store(environment_id, Ordering::Relaxed);
        *self.denied.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        let denied = Arc::clone(&self.denied);
        let store_schema = self.store_schema.clone();
        self.connection
            .authorizer(Some(move |context: AuthContext<'_>| authorize(&context, &store_schema, &denied)))?;
        let deadline = Instant::now() + bounds.timeout;
        // Checked every few thousand VM steps; returning true interrupts the statement.
        self.connection.progress_handler(4_000, Some(move || Instant::now() > deadline))?;

        let result = self.execute(sql, bounds);

        self.connection.progress_handler(0, None::<fn() -> bool>)?;
        self.connection.authorizer(None::<fn(AuthContext<'_>) -> Authorization>)?;
        self.environment.store(-1, Ordering::Relaxed);
        result
    }

    fn execute(&self, sql: &str, bounds: &QueryBounds) -> StoreResult<QueryOutput> {
        if has_second_statement(sql) {
            return Err(StoreError::QueryRefused("send one statement per query (no `;` followed by another)".into()));
        }
        let keyword = first_keyword(sql);
        if !["select", "with", "values"].contains(&keyword.as_str()) {
            return Err(StoreError::QueryRefused(format!(
                "only read-only statements (SELECT, WITH … SELECT, VALUES) are allowed, not `{}`",
                keyword.to_uppercase()
            )));
        }
        let mut statement = match self.connection.prepare(sql) {
            Ok(statement) => statement,
            Err(error) => return Err(self.prepare_error(error)),
        };
        if !statement.readonly() || statement.is_explain() != 0 {
            return Err(StoreError::QueryRefused(
                "only read-only statements (SELECT, WITH … SELECT) are allowed".into(),
            ));
        }
        let columns: Vec<String> = statement.column_names().map(str::to_owned).collect();
        let mut rows = statement.query([]).map_err(|error| run_error(error, bounds))?;
        let mut output = QueryOutput { columns, rows: Vec::new(), truncated: false };
        let mut output_bytes = 0usize;
        while let Some(row) = rows.next().map_err(|error| run_error(error, bounds))? {
            if output.rows.len() == bounds.max_rows || output_bytes > MAX_OUTPUT_BYTES {
                output.truncated = true;
                break;
            }
            let values = (0..output.columns.len())
                .map(|index| row.get_ref(index).map(json_value))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| run_error(error, bounds))?;
            output_bytes += values.iter().map(approximate_size).sum::<usize>();
            output.rows.push(values);
        }
        Ok(output)
    }

    fn prepare_error(&self, error: rusqlite::Error) -> StoreError {
        match &error {
            rusqlite::Error::MultipleStatement => {
                StoreError::QueryRefused("send one statement per query (no `;` followed by another)".into())
            }
            rusqlite::Error::SqliteFailure(failure, _)
                if failure.code == ErrorCode::AuthorizationForStatementDenied =>
            {
                let attempted = self.denied.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
                StoreError::QueryRefused(format!(
                    "statement refused: only reads of the views {} are allowed (no writes, DDL, ATTACH, PRAGMA, \
                     transactions, or other tables){}",
                    VIEW_NAMES.join(", "),
                    attempted.map(|attempted| format!("; it tried to {attempted}")).unwrap_or_default()
                ))
            }
            rusqlite::Error::SqliteFailure(_, Some(message)) => StoreError::QueryFailed(message.clone()),
            _ => StoreError::QueryFailed(error.to_string()),
        }
    }
}

/// Unqualified names resolve in `temp` before attached schemas: an empty TEMP view per store table
/// makes `profiles` (say) name nothing instead of the store's table, whose schema users cannot
/// name. A shadow reads the in-memory main schema, which the authorizer refuses, so even
/// `count(*)` of a shadow is refused rather than answering 0.
fn shadow_store_tables(connection: &Connection, store_schema: &str) -> StoreResult<()> {
    let mut statement = connection
        .prepare(&format!("SELECT name FROM {store_schema}.sqlite_master WHERE type IN ('table', 'view')"))?;
    let names = statement.query_map([], |row| row.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    for name in names.iter().filter(|name| !VIEW_NAMES.contains(&name.as_str()) && !name.starts_with("sqlite_")) {
        connection.execute_batch(&format!(
            "CREATE TEMP VIEW \"{name}\" AS SELECT NULL AS shadowed FROM main.sqlite_master WHERE 0;"
        ))?;
    }
    Ok(())
}

/// Whether anything but white space and comments follows the first top-level `;` (string
/// literals and quoted names are skipped).
fn has_second_statement(sql: &str) -> bool {
    let mut characters = sql.char_indices().peekable();
    while let Some((index, character)) = characters.next() {
        match character {
            '\'' | '"' | '`' => {
                for (_, inner) in characters.by_ref() {
                    if inner == character {
                        break;
                    }
                }
            }
            '[' => {
                for (_, inner) in characters.by_ref() {
                    if inner == ']' {
                        break;
                    }
                }
            }
            '-' if characters.peek().is_some_and(|(_, next)| *next == '-') => {
                for (_, inner) in characters.by_ref() {
                    if inner == '\n' {
                        break;
                    }
                }
            }
            '/' if characters.peek().is_some_and(|(_, next)| *next == '*') => {
                characters.next();
                let mut previous = ' ';
                for (_, inner) in characters.by_ref() {
                    if previous == '*' && inner == '/' {
                        break;
                    }
                    previous = inner;
                }
            }
            ';' => {
                return !first_keyword(&sql[index + 1..]).is_empty() || sql[index + 1..].trim_start().starts_with(';');
            }
            _ => {}
        }
    }
    false
}

/// The statement's first keyword, lower-cased, past white space, comments and parentheses.
fn first_keyword(sql: &str) -> String {
    let mut rest = sql;
    loop {
        rest = rest.trim_start_matches(|character: char| character.is_whitespace() || character == '(');
        if let Some(comment) = rest.strip_prefix("--") {
            rest = comment.split_once('\n').map(|(_, after)| after).unwrap_or("");
        } else if let Some(comment) = rest.strip_prefix("/*") {
            rest = comment.split_once("*/").map(|(_, after)| after).unwrap_or("");
        } else {
            break;
        }
    }
    rest.chars().take_while(|character| character.is_ascii_alphabetic()).collect::<String>().to_lowercase()
}

fn run_error(error: rusqlite::Error, bounds: &QueryBounds) -> StoreError {
    match &error {
        rusqlite::Error::SqliteFailure(failure, _) if failure.code == ErrorCode::OperationInterrupted => {
            StoreError::QueryTimeout(bounds.timeout)
        }
        rusqlite::Error::SqliteFailure(_, Some(message)) => StoreError::QueryFailed(message.clone()),
        _ => StoreError::QueryFailed(error.to_string()),
    }
}

/// The authorizer of users' statements: reads of the store's schema (reachable only through the
/// views, since users cannot name it) and of `json_each`/`json_tree`; nothing else.
fn authorize(context: &AuthContext<'_>, store_schema: &str, denied: &Mutex<Option<String>>) -> Authorization {
    let allowed = match context.action {
        AuthAction::Select | AuthAction::Recursive | AuthAction::Function { .. } => true,
        AuthAction::Read { table_name, column_name } => match context.database_name {
            // The store's tables, read by one of the views (the accessor) and nothing else. SQLite
            // reports the rows a flattened view only counts as a read of no column with no accessor.
            Some(schema) if schema == store_schema => {
                !table_name.starts_with("sqlite_")
                    && (context.accessor.is_some_and(|view| VIEW_NAMES.contains(&view)) || column_name.is_empty())
            }
            Some("temp") => VIEW_NAMES.contains(&table_name),
            // Common table expressions and subqueries of the statement itself.
            None => !(table_name.starts_with("sqlite_") || table_name.starts_with("pragma_") || table_name == "dbstat"),
            Some(_) => ALLOWED_TABLE_FUNCTIONS.contains(&table_name),
        },
        _ => false,
    };
    if allowed {
        return Authorization::Allow;
    }
    let mut first_denied = denied.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if first_denied.is_none() {
        *first_denied = Some(match context.accessor {
            Some(shadow) if !VIEW_NAMES.contains(&shadow) => format!("read table `{shadow}`"),
            _ => describe(&context.action),
        });
    }
    Authorization::Deny
}

fn describe(action: &AuthAction<'_>) -> String {
    match action {
        AuthAction::Read { table_name, .. } => format!("read table `{table_name}`"),
        AuthAction::Pragma { pragma_name, .. } => format!("run PRAGMA {pragma_name}"),
        AuthAction::Attach { .. } => "ATTACH a database".into(),
        AuthAction::Insert { table_name } => format!("INSERT into `{table_name}`"),
        AuthAction::Update { table_name, .. } => format!("UPDATE `{table_name}`"),
        AuthAction::Delete { table_name } => format!("DELETE from `{table_name}`"),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn approximate_size(value: &Value) -> usize {
    match value {
        Value::String(text) => text.len(),
        _ => 8,
    }
}

fn json_value(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(integer) => Value::from(integer),
        ValueRef::Real(real) => serde_json::Number::from_f64(real).map(Value::Number).unwrap_or(Value::Null),
        ValueRef::Text(text) => Value::String(String::from_utf8_lossy(text).into_owned()),
        ValueRef::Blob(bytes) => Value::String(bytes.iter().map(|byte| format!("{byte:02x}")).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::first_keyword;

    #[test]
    fn first_keyword_skips_comments_and_parentheses() {
        assert_eq!(first_keyword("  -- note\n /* x */ (SELECT 1)"), "select");
        assert_eq!(first_keyword("with t as (select 1) select * from t"), "with");
        assert_eq!(first_keyword("DELETE FROM identities"), "delete");
        assert_eq!(first_keyword("/* unterminated"), "");
    }

    #[test]
    fn a_second_statement_is_found_outside_literals_only() {
        use super::has_second_statement;
        assert!(has_second_statement("SELECT 1; DELETE FROM identities"));
        assert!(has_second_statement("SELECT 1;;"));
        assert!(!has_second_statement("SELECT 1;"));
        assert!(!has_second_statement("SELECT 1; -- done"));
        assert!(!has_second_statement("SELECT ';DROP' AS text"));
        assert!(!has_second_statement("SELECT \"a;b\" FROM identities"));
        assert!(!has_second_statement("SELECT 1 /* ; DELETE */"));
    }
}
