//! Where users' SQL runs on PostgreSQL: as a role of its own per environment, which can read that
//! environment's views and nothing else.
//!
//! Each environment gets a schema `<store schema>_env_<id>` holding its views (`identities`,
//! `events`, `trait_changes`, `devices`, `segment_memberships`), each filtered by the
//! environment's id written into the view's text — no setting a query could change — and marked
//! `security_barrier`, so a user's predicate never runs before the environment filter (an
//! error message cannot leak another environment's values). The views are owned by Roster's own
//! role and read its tables with its rights.
//!
//! The query role `roster_q_<hash of database and schema>_<id>` logs in itself (so no
//! `SET ROLE` or `set_config('role', …)` can lead back to Roster's role): it is no superuser,
//! creates nothing, inherits nothing, has `USAGE` on the environment's views schema and `SELECT`
//! on its views, and nothing else. Its connections run each statement in a read-only transaction
//! with a `statement_timeout`, and are reset with `DISCARD ALL` after every query (settings,
//! temporary objects, prepared statements, advisory locks, `LISTEN`s), or closed if that fails.
//!
//! Roster's own locks are out of its reach: writes lock tables in `<store schema>_locks`, a schema
//! the query roles cannot use (see `PostgresStore::write_in`).
//!
//! Creating the roles needs `CREATEROLE` (or a superuser); without it, users' SQL is refused with
//! a message saying what to grant, and everything else works.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use postgres::{Client, IsolationLevel, NoTls};

use super::{Pool, quote_identifier};
use crate::model::{EnvironmentId, QueryBounds, QueryOutput};
use crate::{StoreError, StoreResult};

/// Version of the views' definitions; an environment whose views are older gets them anew.
const VIEWS_VERSION: i32 = 2;

/// Idle query connections kept per environment (more are closed after their query).
const IDLE_CONNECTIONS_PER_ENVIRONMENT: usize = 2;

/// Most idle query connections kept over all environments.
const IDLE_CONNECTIONS_TOTAL: usize = 32;

/// Connections one query role may hold at once (a bound for the database, whatever Roster does).
const ROLE_CONNECTION_LIMIT: u32 = 16;

/// The login an environment's queries run as.
#[derive(Clone)]
struct QueryRole {
    name: String,
    password: String,
}

/// The query roles and their idle connections.
pub(super) struct QuerySandbox {
    pool: Arc<Pool>,
    /// Why users' SQL cannot run on this database, when it cannot (checked at start).
    unavailable: Option<String>,
    roles: Mutex<HashMap<EnvironmentId, QueryRole>>,
    idle: Mutex<HashMap<EnvironmentId, Vec<Client>>>,
}

/// The schema holding environment `environment_id`'s views.
fn views_schema(store_schema: &str, environment_id: EnvironmentId) -> String {
    format!("{store_schema}_env_{environment_id}")
}

impl QuerySandbox {
    /// Checks that Roster's role can create the query roles; if not, users' SQL stays off with a
    /// message saying what to grant.
    pub(super) fn start(pool: Arc<Pool>, client: &mut Client) -> StoreResult<QuerySandbox> {
        let row = client.query_one(
            "SELECT current_user::text, rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user",
            &[],
        )?;
        let (role, can_create_roles): (String, bool) = (row.get(0), row.get(1));
        let unavailable = (!can_create_roles).then(|| {
            format!(
                "SQL queries are off on this PostgreSQL store: each environment's queries run as a role of their \
                 own, and the database role `{role}` may not create roles; grant it with `ALTER ROLE \"{role}\" \
                 CREATEROLE` (see docs/postgres.md)"
            )
        });
        if let Some(message) = &unavailable {
            tracing::warn!(%message, "user sql disabled");
        }
        Ok(QuerySandbox { pool, unavailable, roles: Mutex::new(HashMap::new()), idle: Mutex::new(HashMap::new()) })
    }

    /// Runs a checked statement as `environment_id`'s query role. Blocking: call it from a plain
    /// thread.
    pub(super) fn run(
        &self,
        environment_id: EnvironmentId,
        sql: &str,
        bounds: &QueryBounds,
    ) -> StoreResult<QueryOutput> {
        if let Some(message) = &self.unavailable {
            return Err(StoreError::QueryUnavailable(message.clone()));
        }
        let mut client = self.connection(environment_id)?;
        let views = views_schema(&self.pool.schema, environment_id);
        let outcome = (|| {
            let mut transaction =
                client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
            let output = super::query::run(&mut transaction, &views, sql, bounds);
            transaction.rollback()?;
            output
        })();
        // Whatever the statement did to its session goes: settings, temporary objects, prepared
        // statements, advisory locks, listeners. A connection that cannot be reset is closed.
        let reset = client.batch_execute("DISCARD ALL");
        if reset.is_ok() && !client.is_closed() {
            self.give_back(environment_id, client);
        }
        outcome
    }

    /// An idle connection of the environment's query role, or a new one.
    fn connection(&self, environment_id: EnvironmentId) -> StoreResult<Client> {
        if let Some(client) = self.idle.lock().ok().and_then(|mut idle| idle.get_mut(&environment_id)?.pop()) {
            return Ok(client);
        }
        let role = self.role(environment_id)?;
        let mut config = self.pool.config.clone();
        config.user(&role.name).password(&role.password).application_name("roster-query");
        config.connect(NoTls).map_err(|error| {
            StoreError::QueryUnavailable(format!(
                "cannot log in as the query role `{}` (check that pg_hba.conf lets it in with a password, as \
                 docs/postgres.md says): {error}",
                role.name
            ))
        })
    }

    fn give_back(&self, environment_id: EnvironmentId, client: Client) {
        let Ok(mut idle) = self.idle.lock() else { return };
        let total: usize = idle.values().map(Vec::len).sum();
        let connections = idle.entry(environment_id).or_default();
        if connections.len() < IDLE_CONNECTIONS_PER_ENVIRONMENT && total < IDLE_CONNECTIONS_TOTAL {
            connections.push(client);
        }
    }

    /// The environment's query role, created (with its views) on first use.
    fn role(&self, environment_id: EnvironmentId) -> StoreResult<QueryRole> {
        if let Some(role) = self.roles.lock().ok().and_then(|roles| roles.get(&environment_id).cloned()) {
            return Ok(role);
        }
        let mut client = self.pool.connect()?.client;
        let role = ensure_query_role(&mut client, &self.pool.schema, environment_id)?;
        if let Ok(mut roles) = self.roles.lock() {
            roles.insert(environment_id, role.clone());
        }
        Ok(role)
    }
}

impl Drop for QuerySandbox {
    /// The blocking client's connections close by blocking on their own runtime, which must not
    /// happen on a Tokio thread (the store may be dropped on one): they close on a thread.
    fn drop(&mut self) {
        let idle = self.idle.get_mut().map(std::mem::take).unwrap_or_default();
        if idle.is_empty() {
            return;
        }
        let _ = std::thread::Builder::new().name("roster-postgres-close".into()).spawn(move || drop(idle));
    }
}

/// Creates (or brings up to date) the environment's views schema and query role, once across
/// all nodes: the `query_roles` table's lock makes concurrent creators take turns.
fn ensure_query_role(client: &mut Client, store_schema: &str, environment_id: EnvironmentId) -> StoreResult<QueryRole> {
    let mut transaction = client.transaction()?;
    transaction.batch_execute("LOCK TABLE query_roles IN EXCLUSIVE MODE")?;
    let existing = transaction.query_opt(
        "SELECT role_name, password, views_version FROM query_roles WHERE environment_id = $1",
        &[&environment_id],
    )?;
    if let Some(row) = &existing
        && row.get::<_, i32>(2) == VIEWS_VERSION
    {
        return Ok(QueryRole { name: row.get(0), password: row.get(1) });
    }
    let known = transaction.query_opt("SELECT 1 FROM environments WHERE environment_id = $1", &[&environment_id])?;
    if known.is_none() {
        return Err(StoreError::Database(format!("no environment {environment_id}")));
    }
    let role = match &existing {
        Some(row) => QueryRole { name: row.get(0), password: row.get(1) },
        None => {
            let row = transaction.query_one(
                "SELECT 'roster_q_' || left(md5(current_database() || '.' || $1::text), 12) || '_' || $2::text, \
                        replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')",
                &[&store_schema, &environment_id.to_string()],
            )?;
            QueryRole { name: row.get(0), password: row.get(1) }
        }
    };
    let role_name = quote_identifier(&role.name);
    // A role of that name may be left from an earlier store of the same database and schema.
    let role_exists = transaction.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role.name])?.is_some();
    let attributes = format!(
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS \
         CONNECTION LIMIT {ROLE_CONNECTION_LIMIT} PASSWORD '{}'",
        role.password
    );
    let create_or_alter = if role_exists {
        format!("ALTER ROLE {role_name} WITH {attributes}")
    } else {
        format!("CREATE ROLE {role_name} WITH {attributes}")
    };
    transaction.batch_execute(&create_or_alter).map_err(|error| {
        StoreError::QueryUnavailable(format!("cannot create the query role `{}`: {error}", role.name))
    })?;
    // Nothing may come with the role from elsewhere: no memberships (and so no inherited rights).
    let memberships: i64 = transaction
        .query_one(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = $1",
            &[&role.name],
        )?
        .get(0);
    if memberships > 0 {
        return Err(StoreError::QueryUnavailable(format!(
            "the query role `{}` is a member of other roles; revoke those memberships or drop the role",
            role.name
        )));
    }
    let views = quote_identifier(&views_schema(store_schema, environment_id));
    transaction.batch_execute(&format!(
        "ALTER ROLE {role_name} SET default_transaction_read_only = on;
         ALTER ROLE {role_name} SET idle_in_transaction_session_timeout = '60s';
         DROP SCHEMA IF EXISTS {views} CASCADE;
         CREATE SCHEMA {views};
         {view_definitions}
         GRANT USAGE ON SCHEMA {views} TO {role_name};
         GRANT SELECT ON ALL TABLES IN SCHEMA {views} TO {role_name};",
        view_definitions = view_definitions(store_schema, &views, environment_id),
    ))?;
    transaction.execute(
        "INSERT INTO query_roles (environment_id, role_name, password, views_version, created_at) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (environment_id) DO UPDATE SET views_version = EXCLUDED.views_version",
        &[&environment_id, &role.name, &role.password, &VIEWS_VERSION, &super::now().as_micros()],
    )?;
    transaction.commit()?;
    tracing::info!(environment_id, role = %role.name, "created the environment's query role and views");
    Ok(role)
}

/// Drops a store's schema with everything Roster made beside it: the environments' views
/// schemas and query roles, and the locks schema. For operators retiring a store, and for tests.
pub fn drop_store_schema(client: &mut Client, store_schema: &str) -> StoreResult<()> {
    let store = quote_identifier(store_schema);
    let roles: Vec<(EnvironmentId, String)> = client
        .query(&format!("SELECT environment_id, role_name FROM {store}.query_roles"), &[])
        .map(|rows| rows.iter().map(|row| (row.get(0), row.get(1))).collect())
        .unwrap_or_default();
    let mut sql = String::new();
    for (environment_id, _) in &roles {
        sql.push_str(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE;",
            quote_identifier(&views_schema(store_schema, *environment_id))
        ));
    }
    for (_, role) in &roles {
        sql.push_str(&format!("DROP ROLE IF EXISTS {};", quote_identifier(role)));
    }
    sql.push_str(&format!(
        "DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {store} CASCADE;",
        quote_identifier(&super::locks_schema(store_schema))
    ));
    client.batch_execute(&sql)?;
    Ok(())
}

fn iso_time(column: &str) -> String {
    format!("to_char(to_timestamp({column} / 1000000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
}

/// The environment's views, in the schema `views` (already quoted).
fn view_definitions(store_schema: &str, views: &str, environment_id: EnvironmentId) -> String {
    let store = quote_identifier(store_schema);
    let environment = environment_id;
    format!(
        "CREATE VIEW {views}.identities WITH (security_barrier) AS SELECT
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
        CREATE VIEW {views}.events WITH (security_barrier) AS SELECT
            ev.event_id AS event_id,
            e.slug AS environment,
            ev.profile_id AS profile_id,
            ev.distinct_id AS distinct_id,
            ev.anonymous_id AS anonymous_id,
            ev.event AS event,
            ev.properties AS properties,
            {timestamp} AS timestamp,
            {received_at} AS received_at,
            ev.identity_traits AS identity_traits,
            ev.context AS context
         FROM {store}.events ev JOIN {store}.environments e ON e.environment_id = ev.environment_id
         WHERE ev.environment_id = {environment};
        CREATE VIEW {views}.trait_changes WITH (security_barrier) AS SELECT
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
        CREATE VIEW {views}.devices WITH (security_barrier) AS SELECT
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
        CREATE VIEW {views}.segment_memberships WITH (security_barrier) AS SELECT
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
    )
}
