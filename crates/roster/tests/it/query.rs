//! `POST /v1/query`: the seed queries, isolation, refusals, limits, CSV, and the CLI.

use reqwest::StatusCode;
use roster_engine::EngineConfig;
use roster_server::ServerConfig;
use serde_json::json;

use crate::common::{TestServer, assert_error};

#[tokio::test]
async fn the_seed_queries_run_as_written() {
    let server = TestServer::start().await;
    server.identify(json!({ "distinct_id": "u_1", "traits": { "email": "ada@example.com", "plan": "premium" } })).await;
    server.track(json!({ "event": "Checkout", "distinct_id": "u_1", "properties": { "total": 49.99 } })).await;
    let identities = server
        .sql("SELECT distinct_id, traits->>'email' AS email, traits->>'plan' AS plan, updated_at FROM identities ORDER BY updated_at DESC;")
        .await;
    assert_eq!(identities["columns"], json!(["distinct_id", "email", "plan", "updated_at"]));
    assert_eq!(
        identities["rows"][0].as_array().unwrap()[0..3],
        [json!("u_1"), json!("ada@example.com"), json!("premium")]
    );
    let events = server
        .sql(
            "SELECT e.event, e.properties, e.timestamp, e.identity_traits->>'email' AS email, e.identity_traits->>'plan' AS plan \
             FROM events e WHERE e.distinct_id = 'u_1' ORDER BY e.timestamp DESC;",
        )
        .await;
    assert_eq!(events["rows"][0][0], "Checkout");
    assert_eq!(events["rows"][0][1], "{\"total\":49.99}");
    assert_eq!(events["rows"][0].as_array().unwrap()[3..5], [json!("ada@example.com"), json!("premium")]);
    assert_eq!(events["truncated"], false);
}

#[tokio::test]
async fn a_query_sees_only_its_keys_environment() {
    let server = TestServer::start().await;
    let (_, production) =
        server.post("/v1/admin/environments", &server.admin_token, &json!({ "slug": "production" })).await;
    server.identify(json!({ "distinct_id": "dev-user" })).await;
    let (status, _) = server
        .post("/identify", production["client_key"].as_str().unwrap(), &json!({ "distinct_id": "prod-user" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let development = server.sql("SELECT distinct_id, environment FROM identities").await;
    assert_eq!(development["rows"], json!([["dev-user", "development"]]));
    let (_, in_production) = server
        .post(
            "/v1/query",
            production["server_key"].as_str().unwrap(),
            &json!({ "sql": "SELECT distinct_id FROM identities" }),
        )
        .await;
    assert_eq!(in_production["rows"], json!([["prod-user"]]));
}

#[tokio::test]
async fn every_refused_statement_kind_is_a_clear_400() {
    let server = TestServer::start().await;
    server.identify(json!({ "distinct_id": "u" })).await;
    for statement in [
        "DELETE FROM identities",
        "UPDATE identities SET email = 'x'",
        "INSERT INTO identities (distinct_id) VALUES ('x')",
        "CREATE TABLE t (x)",
        "DROP VIEW events",
        "ATTACH DATABASE 'x.db' AS x",
        "PRAGMA journal_mode",
        "BEGIN",
        "SELECT 1; SELECT 2",
        "SELECT * FROM profiles",
        "SELECT sql FROM sqlite_temp_master",
    ] {
        let (status, body) = server.post("/v1/query", &server.keys.server_key, &json!({ "sql": statement })).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "query_refused");
    }
    let (status, body) =
        server.post("/v1/query", &server.keys.server_key, &json!({ "sql": "SELECT nope FROM identities" })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "query_failed");
    assert!(body["message"].as_str().unwrap().contains("nope"));
    let (status, body) = server.post("/v1/query", &server.keys.server_key, &json!({ "query": "SELECT 1" })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "unknown_field");
    let (status, body) = server.post("/v1/query", &server.keys.client_key, &json!({ "sql": "SELECT 1" })).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn runaway_queries_stop_at_the_timeout_and_the_row_cap() {
    let config = EngineConfig {
        query_timeout: std::time::Duration::from_millis(200),
        query_max_rows: 5,
        ..EngineConfig::default()
    };
    let server = TestServer::start_with_config(config, ServerConfig::default()).await;
    let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT max(i) FROM n";
    let (status, body) = server.post("/v1/query", &server.keys.server_key, &json!({ "sql": endless })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "query_timeout");
    // Ingest is not blocked by queries.
    server.identify(json!({ "distinct_id": "still-writing" })).await;
    let many = server
        .sql("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) SELECT i FROM n")
        .await;
    assert_eq!(many["rows"].as_array().unwrap().len(), 5);
    assert_eq!(many["truncated"], true);
}

#[tokio::test]
async fn csv_output_on_request() {
    let server = TestServer::start().await;
    server.identify(json!({ "distinct_id": "u,1", "traits": { "plan": "pro" } })).await;
    let response = server
        .http
        .post(server.url("/v1/query"))
        .header("X-API-Key", &server.keys.server_key)
        .json(&json!({ "sql": "SELECT distinct_id, traits->>'plan' AS plan FROM identities", "format": "csv" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    assert_eq!(response.text().await.unwrap(), "distinct_id,plan\r\n\"u,1\",pro\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_query_does_not_hold_up_ingest() {
    let config = EngineConfig { query_timeout: std::time::Duration::from_secs(3), ..EngineConfig::default() };
    let server = std::sync::Arc::new(TestServer::start_with_config(config, ServerConfig::default()).await);
    let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT max(i) FROM n";
    let query = {
        let server = std::sync::Arc::clone(&server);
        tokio::spawn(async move { server.post("/v1/query", &server.keys.server_key, &json!({ "sql": endless })).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    for index in 0..20 {
        server.identify(json!({ "distinct_id": format!("while-querying-{index}"), "traits": { "n": index } })).await;
    }
    let ingest_time = started.elapsed();
    assert!(!query.is_finished(), "the query should still be running while ingest completes");
    assert!(ingest_time < std::time::Duration::from_secs(2), "ingest waited for the query: {ingest_time:?}");
    let (status, body) = query.await.unwrap();
    assert_error(status, &body, StatusCode::BAD_REQUEST, "query_timeout");
}
