//! Track, deduplication, pre-login attribution, trait history and the timeline, over HTTP.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error};

impl TestServer {
    /// Tracks with the server key (whose answer carries the event and profile ids) and asserts
    /// acceptance; returns the item result.
    pub async fn track(&self, body: Value) -> Value {
        let (status, response) = self.post("/track", &self.keys.server_key, &body).await;
        assert_eq!(status, StatusCode::OK, "track failed: {response}");
        response["results"][0].clone()
    }

    pub async fn sql(&self, statement: &str) -> Value {
        let (status, response) = self.post("/v1/query", &self.keys.server_key, &json!({ "sql": statement })).await;
        assert_eq!(status, StatusCode::OK, "query failed: {response}");
        response
    }
}

#[tokio::test]
async fn tracked_events_keep_the_traits_of_their_moment() {
    let server = TestServer::start().await;
    server.identify(json!({ "distinct_id": "u_1", "traits": { "plan": "free", "email": "a@example.com" } })).await;
    let first = server
        .track(json!({ "event": "Viewed Pricing", "distinct_id": "u_1", "properties": { "page": "/pricing" }, "timestamp": "2026-01-01T00:00:01Z" }))
        .await;
    assert_eq!(first["status"], "accepted");
    assert!(first["event_id"].is_string());
    server.identify(json!({ "distinct_id": "u_1", "traits": { "plan": "pro" } })).await;
    server.track(json!({ "event": "Upgraded", "user_id": "u_1", "timestamp": "2026-01-01T00:00:02Z" })).await;

    let profile_id = first["profile_id"].as_str().unwrap();
    let (status, timeline) = server.get(&format!("/v1/profiles/{profile_id}/events"), &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK, "{timeline}");
    let events = timeline["events"].as_array().unwrap();
    assert_eq!(events[0]["event"], "Upgraded");
    assert_eq!(events[0]["identity_traits"]["plan"], "pro");
    assert_eq!(events[1]["event"], "Viewed Pricing");
    assert_eq!(events[1]["identity_traits"]["plan"], "free");
    assert_eq!(events[1]["properties"], json!({ "page": "/pricing" }));
    assert_eq!(events[1]["timestamp"], "2026-01-01T00:00:01Z");
}

#[tokio::test]
async fn a_batch_of_events_reports_each_invalid_one() {
    let server = TestServer::start().await;
    let (status, response) = server
        .post(
            "/track",
            &server.keys.client_key,
            &json!([
                { "event": "Ok", "distinct_id": "u" },
                { "distinct_id": "u" },
                { "event": "No One" },
                { "event": "Typo", "distinct_id": "u", "propertes": {} },
                { "event": "Ok Too", "anonymous_id": "a" }
            ]),
        )
        .await;
    assert_error(status, &response, StatusCode::BAD_REQUEST, "missing_event_name");
    let results = response["results"].as_array().unwrap();
    assert_eq!(response["accepted"], 2);
    assert_eq!(results[1]["error"]["path"], "[1].event");
    assert_eq!(results[2]["error"]["code"], "missing_identifier");
    assert_eq!(results[3]["error"]["code"], "unknown_field");
    assert_eq!(results[4]["status"], "accepted");
}

#[tokio::test]
async fn oversized_event_properties_are_refused_with_the_limit() {
    let server = TestServer::start().await;
    let body = json!({ "event": "Big", "distinct_id": "u", "properties": { "blob": "x".repeat(40_000) } });
    let (status, response) = server.post("/track", &server.keys.client_key, &body).await;
    assert_error(status, &response, StatusCode::BAD_REQUEST, "event_too_large");
    assert_eq!(response["path"], "properties");
}

#[tokio::test]
async fn resent_messages_are_stored_once() {
    let server = TestServer::start().await;
    let identify = json!({ "distinct_id": "u", "traits": { "n": 1 }, "message_id": "msg-1" });
    let first = server.identify(identify.clone()).await;
    let again = server.identify(json!({ "distinct_id": "u", "traits": { "n": 2 }, "message_id": "msg-1" })).await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["profile_id"], first["profile_id"]);
    assert_eq!(server.profile_of_user("u").await["traits"], json!({ "n": 1 }));

    let event = json!([{ "event": "Paid", "distinct_id": "u", "message_id": "msg-2" }]);
    for _ in 0..3 {
        let (status, _) = server.post("/track", &server.keys.client_key, &event).await;
        assert_eq!(status, StatusCode::OK);
    }
    let count = server.sql("SELECT count(*) AS n FROM events WHERE event = 'Paid'").await;
    assert_eq!(count["rows"], json!([[1]]));
}

#[tokio::test]
async fn pre_login_events_belong_to_the_user_after_login() {
    let server = TestServer::start().await;
    // The browser SDK tracks with the device id as distinct_id before login.
    server.track(json!({ "event": "Landing", "distinct_id": "device-abc" })).await;
    server.track(json!({ "event": "Signup Started", "anonymous_id": "anon-xyz" })).await;
    server.identify(json!({ "distinct_id": "u_9", "traits": { "plan": "pro" } })).await;
    server.identify(json!({ "distinct_id": "u_9", "anonymous_id": "device-abc" })).await;
    server.identify(json!({ "distinct_id": "u_9", "anonymous_id": "anon-xyz" })).await;

    let profile = server.profile_of_user("u_9").await;
    let (_, timeline) = server
        .get(&format!("/v1/profiles/{}/events", profile["profile_id"].as_str().unwrap()), &server.keys.server_key)
        .await;
    let mut names: Vec<&str> =
        timeline["events"].as_array().unwrap().iter().map(|event| event["event"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["Landing", "Signup Started"]);
    let rows = server.sql("SELECT DISTINCT distinct_id FROM events").await;
    assert_eq!(rows["rows"], json!([["u_9"]]), "SQL shows pre-login events under the user's distinct_id");
}

#[tokio::test]
async fn trait_history_answers_when_a_plan_changed() {
    let server = TestServer::start().await;
    server
        .identify(json!({ "distinct_id": "u", "traits": { "plan": "free" }, "timestamp": "2026-01-01T00:00:00Z" }))
        .await;
    server
        .identify(json!({ "distinct_id": "u", "traits": { "plan": "pro" }, "timestamp": "2026-02-01T00:00:00Z" }))
        .await;
    // Late and older than the stored value: not a change.
    server
        .identify(json!({ "distinct_id": "u", "traits": { "plan": "starter" }, "timestamp": "2026-01-15T00:00:00Z" }))
        .await;
    let history = server
        .sql("SELECT old_value, new_value, timestamp FROM trait_changes WHERE distinct_id = 'u' AND key = 'plan' ORDER BY timestamp")
        .await;
    assert_eq!(
        history["rows"],
        json!([[null, "free", "2026-01-01T00:00:00.000Z"], ["free", "pro", "2026-02-01T00:00:00.000Z"]])
    );
}

#[tokio::test]
async fn the_timeline_pages_and_guards_its_parameters() {
    let server = TestServer::start().await;
    let batch: Vec<Value> = (0..5)
        .map(|index| json!({ "event": format!("e{index}"), "distinct_id": "u", "timestamp": format!("2026-01-01T00:00:0{index}Z") }))
        .collect();
    server.post("/track", &server.keys.client_key, &json!(batch)).await;
    let profile_id = server.profile_of_user("u").await["profile_id"].as_str().unwrap().to_owned();
    let (_, first) = server.get(&format!("/v1/profiles/{profile_id}/events?limit=2"), &server.keys.server_key).await;
    assert_eq!(first["events"].as_array().unwrap().len(), 2);
    assert_eq!(first["events"][0]["event"], "e4");
    let cursor = first["next_before"].as_str().unwrap();
    let (_, second) =
        server.get(&format!("/v1/profiles/{profile_id}/events?limit=2&before={cursor}"), &server.keys.server_key).await;
    assert_eq!(second["events"][0]["event"], "e2");

    let (status, body) =
        server.get(&format!("/v1/profiles/{profile_id}/events?before=garbage"), &server.keys.server_key).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query_parameter");
    let (status, body) = server.get(&format!("/v1/profiles/{profile_id}/events"), &server.keys.client_key).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = server.get("/v1/profiles/nobody/events", &server.keys.server_key).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}
