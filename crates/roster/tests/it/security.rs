//! The security model from an attacker's side: another environment's server key on PostgreSQL's
//! user SQL, a published client key reading stored data, one environment's queries starving
//! another's. Each test here failed before the fix it names.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use roster_engine::EngineConfig;
use roster_server::ServerConfig;
use serde_json::{Value, json};

use crate::common::{TestServer, postgres_url};

/// A secret only environment `development` holds.
const SECRET_EMAIL: &str = "victim-7f3a@example.com";

/// A second environment with its own keys; answers its server key.
async fn second_environment(server: &TestServer, slug: &str) -> Value {
    let (status, keys) = server.post("/v1/admin/environments", &server.admin_token, &json!({ "slug": slug })).await;
    assert_eq!(status, StatusCode::CREATED, "{keys}");
    keys
}

async fn query(server: &TestServer, key: &str, sql: &str) -> (StatusCode, Value) {
    server.post("/v1/query", key, &json!({ "sql": sql })).await
}

/// The escapes found against the PostgreSQL store, and their relatives: none may answer 2xx with
/// data, and no answer may carry the other environment's secret or a server file.
const ESCAPES: &[&str] = &[
    // CTE names standing for functions in FROM (the original findings).
    "WITH query_to_xml AS (SELECT 1) SELECT * FROM query_to_xml('select user_id, traits from {schema}.profiles', true, false, '')",
    "WITH pg_read_file AS (SELECT 1) SELECT * FROM pg_read_file('/etc/passwd')",
    "WITH set_config AS (SELECT 1) SELECT * FROM set_config('roster.environment_id', '1', false)",
    "WITH pg_advisory_lock AS (SELECT 1) SELECT * FROM pg_advisory_lock(1383035764, 1)",
    // CTE shadowing out of scope: a later sibling, or one defined inside a subquery.
    "WITH x AS (SELECT * FROM pg_shadow), pg_shadow AS (SELECT 1) SELECT * FROM x",
    "SELECT * FROM (WITH pg_authid AS (SELECT 1) SELECT 1) s, pg_authid",
    "WITH profiles AS (SELECT 1) SELECT * FROM (SELECT * FROM {schema}.profiles) p",
    // Catalog and file functions, called or in FROM.
    "SELECT * FROM pg_ls_dir('.')",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT * FROM pg_stat_file('/etc/passwd')",
    "SELECT current_setting('data_directory')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT * FROM query_to_xml('select * from {schema}.profiles', true, false, '')",
    "SELECT table_to_xml('{schema}.profiles', true, false, '')",
    "SELECT * FROM dblink('dbname=test', 'select traits from {schema}.profiles') AS t(traits text)",
    "SELECT set_config('role', 'postgres', false)",
    "SELECT * FROM pg_shadow",
    "SELECT query FROM pg_stat_activity",
    "SELECT * FROM {schema}.profiles",
    "SELECT * FROM {schema}_env_1.identities",
    "SELECT * FROM identities, LATERAL query_to_xml('select 1', true, false, '') x",
    // Statements that are not queries.
    "COPY (SELECT * FROM identities) TO '/tmp/roster-stolen'",
    "DO $$ BEGIN PERFORM pg_sleep(0); END $$",
    "CALL some_procedure()",
    "LISTEN roster",
    "NOTIFY roster, 'x'",
    "SET ROLE postgres",
    "RESET ROLE",
    "SELECT * INTO stolen FROM identities",
    "SELECT * FROM identities FOR UPDATE",
    // Locks and sleeps.
    "SELECT pg_advisory_lock(1383035764, 1)",
    "SELECT pg_try_advisory_xact_lock(1)",
    "SELECT pg_sleep(30)",
];

#[tokio::test]
async fn postgres_user_sql_cannot_leave_its_environment() {
    let Some(url) = postgres_url("postgres_user_sql_cannot_leave_its_environment") else { return };
    let server = TestServer::start_postgres(&url, EngineConfig::default(), ServerConfig::default()).await;
    let schema = server.postgres_schema().expect("on postgres").schema.clone();
    server.identify(json!({ "user_id": "victim", "traits": { "email": SECRET_EMAIL } })).await;
    let attacker = second_environment(&server, "attacker").await;
    let attacker_key = attacker["server_key"].as_str().unwrap();
    let (status, _) =
        server.post("/identify", attacker["client_key"].as_str().unwrap(), &json!({ "user_id": "mallory" })).await;
    assert_eq!(status, StatusCode::OK);

    for escape in ESCAPES {
        let statement = escape.replace("{schema}", &format!("\"{schema}\""));
        let started = Instant::now();
        let (status, body) = query(&server, attacker_key, &statement).await;
        let text = body.to_string();
        assert!(status.is_client_error(), "{statement} answered {status}: {text}");
        assert!(!text.contains(SECRET_EMAIL), "{statement} leaked the other environment: {text}");
        assert!(!text.contains("root:"), "{statement} leaked a server file: {text}");
        assert!(started.elapsed() < Duration::from_secs(12), "{statement} was not stopped in time");
    }
    // A CTE in scope may take any name: it then reads the CTE, nothing else.
    for shadow in
        ["WITH pg_shadow AS (SELECT 1) SELECT * FROM pg_shadow", "WITH profiles AS (SELECT 1) SELECT * FROM profiles"]
    {
        let (status, body) = query(&server, attacker_key, shadow).await;
        assert_eq!(status, StatusCode::OK, "{shadow}: {body}");
        assert_eq!(body["rows"], json!([[1]]), "{shadow}");
    }
    // The attacker's own view of the data is its own environment, whatever it tries.
    let (status, own) = query(&server, attacker_key, "SELECT distinct_id, environment FROM identities").await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(own["rows"], json!([["mallory", "attacker"]]));
    let (status, victims) = query(&server, &server.keys.server_key, "SELECT traits->>'email' FROM identities").await;
    assert_eq!(status, StatusCode::OK, "{victims}");
    assert_eq!(victims["rows"], json!([[SECRET_EMAIL]]));
}

/// Connects to the test database as the query role of environment `slug` (the credentials
/// Roster stored), to test the second wall alone: what the database itself lets that role do.
fn connect_as_query_role(url: &str, schema: &str, slug: &str) -> postgres::Client {
    let mut owner = postgres::Client::connect(url, postgres::NoTls).expect("connect as the test user");
    let row = owner
        .query_one(
            &format!(
                "SELECT r.role_name, r.password, r.environment_id FROM \"{schema}\".query_roles r \
                 JOIN \"{schema}\".environments e ON e.environment_id = r.environment_id WHERE e.slug = $1"
            ),
            &[&slug],
        )
        .expect("the environment has a query role after its first query");
    let (role, password, environment_id): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
    let mut config: postgres::Config = url.parse().expect("test database URL");
    config.user(&role).password(&password);
    let mut client = config.connect(postgres::NoTls).expect("log in as the query role");
    client.batch_execute(&format!("SET search_path TO \"{schema}_env_{environment_id}\"")).expect("search path");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_role_itself_cannot_reach_beyond_its_views() {
    let Some(url) = postgres_url("the_query_role_itself_cannot_reach_beyond_its_views") else { return };
    let server = TestServer::start_postgres(&url, EngineConfig::default(), ServerConfig::default()).await;
    let schema = server.postgres_schema().expect("on postgres").schema.clone();
    server.identify(json!({ "user_id": "victim", "traits": { "email": SECRET_EMAIL } })).await;
    let attacker = second_environment(&server, "attacker").await;
    let attacker_key = attacker["server_key"].as_str().unwrap().to_owned();
    let (status, body) = query(&server, &attacker_key, "SELECT count(*) FROM identities").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = query(&server, &server.keys.server_key, "SELECT count(*) FROM identities").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let identify_key = server.keys.client_key.clone();
    let base_url = server.base_url.clone();
    let checks = std::thread::spawn(move || {
        let mut role = connect_as_query_role(&url, &schema, "attacker");
        // Without the statement checker in front: the database refuses each of these itself.
        for statement in [
            format!("SELECT * FROM query_to_xml('select traits from \"{schema}\".profiles', true, false, '')"),
            format!("SELECT traits FROM \"{schema}\".profiles"),
            format!("SELECT * FROM \"{schema}_env_1\".identities"),
            "SELECT pg_read_file('/etc/passwd')".to_owned(),
            "SELECT * FROM pg_ls_dir('.')".to_owned(),
            "SELECT set_config('role', 'postgres', false)".to_owned(),
            "SET ROLE postgres".to_owned(),
            "SET SESSION AUTHORIZATION postgres".to_owned(),
            "SELECT passwd FROM pg_shadow".to_owned(),
            "CREATE TABLE stolen (x int)".to_owned(),
            "CREATE TEMP TABLE stolen (x int)".to_owned(),
            format!("LOCK TABLE \"{schema}_locks\".environment_write_lock_1 IN EXCLUSIVE MODE"),
            format!("SELECT * FROM \"{schema}_locks\".environment_write_lock_1 FOR UPDATE"),
        ] {
            let refused = role.batch_execute(&statement);
            assert!(refused.is_err(), "the query role could run: {statement}");
            let _ = role.batch_execute("ROLLBACK");
        }
        let others: i64 = role
            .query_one("SELECT count(*) FROM identities WHERE traits->>'email' = $1", &[&SECRET_EMAIL])
            .expect("own views readable")
            .get(0);
        assert_eq!(others, 0, "the attacker's views show another environment");
        // Other sessions' statements are hidden from it.
        let visible: i64 = role
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename <> current_user AND query <> '<insufficient privilege>' AND query <> ''",
                &[],
            )
            .expect("pg_stat_activity")
            .get(0);
        assert_eq!(visible, 0, "the query role sees other sessions' statements");

        // Advisory locks on every key Roster ever used stop nobody: writes lock tables the
        // role cannot reach.
        role.batch_execute(
            "SELECT pg_advisory_lock(1383035764, 1); SELECT pg_advisory_lock(1383035764, 2); \
             SELECT pg_advisory_lock(125779257861490)",
        )
        .expect("advisory locks are the role's own business");
        let started = Instant::now();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let status = runtime.block_on(async {
            reqwest::Client::new()
                .post(format!("{base_url}/identify?sync=true"))
                .header("X-API-Key", identify_key)
                .json(&json!({ "user_id": "written-while-locked" }))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map(|response| response.status())
        });
        assert_eq!(status.expect("identify answered"), StatusCode::OK);
        assert!(started.elapsed() < Duration::from_secs(3), "a held lock delayed another environment's write");
    });
    tokio::task::spawn_blocking(move || checks.join()).await.unwrap().expect("query role checks");
}

#[tokio::test]
async fn postgres_user_sql_needs_a_role_that_may_create_roles() {
    let Some(url) = postgres_url("postgres_user_sql_needs_a_role_that_may_create_roles") else { return };
    // A restricted application role, as production has: no superuser, first without CREATEROLE.
    let role = crate::common::fresh_schema("roster_app");
    let setup_url = url.clone();
    let setup_role = role.clone();
    std::thread::spawn(move || {
        let mut admin = postgres::Client::connect(&setup_url, postgres::NoTls).unwrap();
        let database: String = admin.query_one("SELECT current_database()", &[]).unwrap().get(0);
        admin
            .batch_execute(&format!(
                "CREATE ROLE \"{setup_role}\" LOGIN NOSUPERUSER NOCREATEROLE PASSWORD 'app'; \
                 GRANT CREATE ON DATABASE \"{database}\" TO \"{setup_role}\""
            ))
            .unwrap();
    })
    .join()
    .unwrap();
    let mut config: postgres::Config = url.parse().unwrap();
    config.user(&role).password("app");
    let host = config.get_hosts().first().map(|host| match host {
        postgres::config::Host::Tcp(name) => name.clone(),
        #[allow(unreachable_patterns)]
        _ => "127.0.0.1".to_owned(),
    });
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().unwrap_or("test").to_owned();
    let app_url = format!("postgres://{role}:app@{}:{port}/{database}", host.unwrap_or_else(|| "127.0.0.1".into()));

    {
        let server = TestServer::start_postgres(&app_url, EngineConfig::default(), ServerConfig::default()).await;
        server.identify(json!({ "user_id": "ada" })).await;
        let (status, body) = query(&server, &server.keys.server_key, "SELECT count(*) FROM identities").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["code"], "query_unavailable");
        assert!(body["message"].as_str().unwrap().contains("CREATEROLE"), "{body}");
    }
    let grant_url = url.clone();
    let grant_role = role.clone();
    std::thread::spawn(move || {
        let mut admin = postgres::Client::connect(&grant_url, postgres::NoTls).unwrap();
        admin.batch_execute(&format!("ALTER ROLE \"{grant_role}\" CREATEROLE")).unwrap();
    })
    .join()
    .unwrap();
    {
        let server = TestServer::start_postgres(&app_url, EngineConfig::default(), ServerConfig::default()).await;
        server.identify(json!({ "user_id": "ada", "traits": { "plan": "pro" } })).await;
        let (status, body) =
            query(&server, &server.keys.server_key, "SELECT distinct_id, traits->>'plan' FROM identities").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["rows"], json!([["ada", "pro"]]));
        let other = second_environment(&server, "other").await;
        let (status, body) =
            query(&server, other["server_key"].as_str().unwrap(), "SELECT count(*) FROM identities").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["rows"], json!([[0]]));
    }
    std::thread::spawn(move || {
        let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let database: String = admin.query_one("SELECT current_database()", &[]).unwrap().get(0);
        let _ = admin.batch_execute(&format!(
            "REVOKE CREATE ON DATABASE \"{database}\" FROM \"{role}\"; DROP ROLE IF EXISTS \"{role}\""
        ));
    })
    .join()
    .unwrap();
}

#[tokio::test]
async fn a_client_key_reads_no_stored_traits_and_hears_of_no_other_profile() {
    let server = TestServer::start().await;
    let client_key = server.keys.client_key.clone();
    let server_key = server.keys.server_key.clone();
    let (status, victim) = server
        .post(
            "/identify",
            &server_key,
            &json!({ "user_id": "victim", "traits": { "email": SECRET_EMAIL, "plan": "vip" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{victim}");
    let victim_profile = victim["results"][0]["profile_id"].as_str().unwrap().to_owned();
    let (status, segment) = server
        .post(
            "/v1/segments",
            &server_key,
            &json!({ "name": "vips", "rules": [{ "type": "ALL", "conditions": [{ "property": "plan", "operator": "EQUAL", "value": "vip" }] }] }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{segment}");

    // Flags for a named user: flags, but none of the stored traits nor segment memberships.
    let (status, flags) = server.post("/v1/flags", &client_key, &json!({ "user_id": "victim" })).await;
    assert_eq!(status, StatusCode::OK, "{flags}");
    assert!(!flags.to_string().contains(SECRET_EMAIL), "client key read stored traits: {flags}");
    assert_eq!(flags["traits"], json!({}));
    assert!(flags["profile_id"].is_null(), "a UUIDv7 profile id tells when the person was first seen: {flags}");
    assert_eq!(flags["segments"], json!([]), "segment membership tells about stored traits");
    let (status, with_sent) =
        server.post("/v1/flags", &client_key, &json!({ "user_id": "victim", "traits": { "theme": "dark" } })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(with_sent["traits"], json!({ "theme": "dark" }), "a client hears back only what it sent");
    let (status, full) = server.post("/v1/flags", &server_key, &json!({ "user_id": "victim" })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(full["traits"]["email"], SECRET_EMAIL, "the server key reads everything");
    assert_eq!(full["segments"][0]["name"], "vips");

    // Is this email registered? A client key cannot find out.
    let (status, probe) = server
        .post("/identify", &client_key, &json!({ "user_id": "mallory", "traits": { "email": SECRET_EMAIL } }))
        .await;
    assert_eq!(status, StatusCode::OK, "{probe}");
    let item = &probe["results"][0];
    assert!(!probe.to_string().contains(&victim_profile), "answer names the owner: {probe}");
    assert!(item.get("warnings").is_none(), "a taken email is an oracle: {probe}");
    assert!(item.get("created").is_none(), "`created` says whether a user id is known: {probe}");
    assert!(item.get("profile_id").is_none(), "a UUIDv7 profile id says since when a user id is known: {probe}");
    // Is this user id known? Neither.
    let (_, known) = server.post("/identify", &client_key, &json!({ "user_id": "victim" })).await;
    let (_, unknown) = server.post("/identify", &client_key, &json!({ "user_id": "nobody-yet" })).await;
    let shape = |answer: &Value| {
        let mut keys: Vec<String> = answer["results"][0].as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(shape(&known), shape(&unknown));
    // The server key still hears all of it.
    let (_, told) = server
        .post("/identify", &server_key, &json!({ "user_id": "trudy", "traits": { "email": SECRET_EMAIL } }))
        .await;
    assert_eq!(told["results"][0]["warnings"][0]["code"], "email_owned_by_other_profile");
    assert!(told.to_string().contains(&victim_profile));
    assert_eq!(told["results"][0]["created"], true);

    // Two people on one device: the warning does not name the other profile to a client key.
    server.identify(json!({ "user_id": "alice", "anonymous_id": "shared-tablet" })).await;
    let alice = server.profile_of_user("alice").await;
    let (_, bob) =
        server.post("/identify", &client_key, &json!({ "user_id": "bob", "anonymous_id": "shared-tablet" })).await;
    assert_eq!(bob["results"][0]["warnings"][0]["code"], "anonymous_id_owned_by_other_user");
    assert!(!bob.to_string().contains(alice["profile_id"].as_str().unwrap()), "{bob}");
}

#[tokio::test]
async fn flagsmith_identities_answer_stored_traits_to_client_keys_unless_the_environment_hides_them() {
    let server = TestServer::start().await;
    server.identify(json!({ "user_id": "victim", "traits": { "email": SECRET_EMAIL } })).await;
    let identity = |server: &TestServer| {
        let request = server
            .http
            .get(server.url("/api/v1/identities/?identifier=victim"))
            .header("X-Environment-Key", server.keys.client_key.clone());
        async move { crate::common::read(request.send().await.unwrap()).await }
    };
    // Flagsmith's behaviour by default: its SDKs read traits from this answer.
    let (status, answer) = identity(&server).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["traits"].to_string().contains(SECRET_EMAIL), "{answer}");

    let (status, environment) = server
        .send(
            reqwest::Method::PATCH,
            "/v1/admin/environments/development",
            &server.admin_token,
            Some(json!({ "settings": { "flagsmith_client_key_reads_traits": false } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{environment}");
    assert_eq!(environment["settings"]["flagsmith_client_key_reads_traits"], false);
    let (status, answer) = identity(&server).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["traits"], json!([]), "{answer}");
    assert!(answer["flags"].is_array());

    // The setting is the admin's: a server key may not change it, and typos are refused by name.
    let (status, _) = server
        .send(
            reqwest::Method::PATCH,
            "/v1/admin/environments/development",
            &server.keys.server_key,
            Some(json!({ "settings": { "flagsmith_client_key_reads_traits": true } })),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, refused) = server
        .send(
            reqwest::Method::PATCH,
            "/v1/admin/environments/development",
            &server.admin_token,
            Some(json!({ "settings": { "flagsmith_client_reads": true } })),
        )
        .await;
    crate::common::assert_error(status, &refused, StatusCode::BAD_REQUEST, "unknown_field");
    assert!(refused["message"].as_str().unwrap().contains("flagsmith_client_reads"));
}

/// One environment's slow queries, as many as it may run, leave another's quick one unaffected.
async fn queries_take_fair_turns(server: &TestServer) {
    let other = second_environment(server, "other").await;
    let other_key = other["server_key"].as_str().unwrap().to_owned();
    let slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n";
    let mut slow_queries = Vec::new();
    for _ in 0..4 {
        let (http, url, key) = (server.http.clone(), server.url("/v1/query"), server.keys.server_key.clone());
        slow_queries.push(tokio::spawn(async move {
            let response = http.post(url).header("X-API-Key", key).json(&json!({ "sql": slow })).send().await;
            response.map(|response| response.status())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, body) = query(server, &other_key, "SELECT 1").await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(waited < Duration::from_millis(1500), "another environment's query waited {waited:?}");
    let mut statuses = Vec::new();
    for slow_query in slow_queries {
        statuses.push(slow_query.await.unwrap().unwrap());
    }
    // Slow queries past their environment's turns waited, then timed out or were told to retry.
    assert!(
        statuses.iter().all(|status| *status == StatusCode::BAD_REQUEST || *status == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
}

fn fair_query_config() -> EngineConfig {
    EngineConfig {
        query_timeout: Duration::from_millis(2000),
        query_concurrency: 2,
        query_concurrency_per_environment: 1,
        ..EngineConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_take_fair_turns_at_sql_on_the_embedded_store() {
    let server = TestServer::start_with_config(fair_query_config(), ServerConfig::default()).await;
    queries_take_fair_turns(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_take_fair_turns_at_sql_on_postgres() {
    let Some(url) = postgres_url("environments_take_fair_turns_at_sql_on_postgres") else { return };
    let server = TestServer::start_postgres(&url, fair_query_config(), ServerConfig::default()).await;
    queries_take_fair_turns(&server).await;
}
