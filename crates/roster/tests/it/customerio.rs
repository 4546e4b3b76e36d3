//! Customer.io's Track API, driven by Customer.io's own Python client.

use serde_json::{Value, json};

use crate::common::{TestServer, skipped};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customerio_python_client_works_against_roster() {
    let Ok(python) = std::env::var("ROSTER_FLAG_ENGINE_PYTHON") else {
        skipped("customerio_python_client_works_against_roster", "set ROSTER_FLAG_ENGINE_PYTHON (.ci/run does)");
        return;
    };
    let server = TestServer::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/customerio_sdk.py");
    let output = tokio::process::Command::new(&python)
        .args([script, &server.base_url, "development", &server.keys.server_key])
        .output()
        .await
        .expect("run the Customer.io client script");
    assert!(output.status.success(), "script failed: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from the script");
    assert_eq!(seen["errors"], json!([]), "the client raised errors");

    let profile = server.profile_of_user("u-cio").await;
    assert_eq!(profile["traits"]["email"], "cio@example.com");
    assert_eq!(profile["traits"]["plan"], "team", "the later identify wins");
    assert_eq!(profile["traits"]["seats"], 2, "the merged customer's traits came over");
    assert_eq!(profile["traits"]["created_at"], 1_700_000_000);
    let anonymous: Vec<&str> =
        profile["anonymous_ids"].as_array().unwrap().iter().map(|id| id.as_str().unwrap()).collect();
    assert!(anonymous.contains(&"anon-cio"), "anonymous activity linked: {anonymous:?}");
    assert!(anonymous.contains(&"u-dup"), "merged customer's id kept: {anonymous:?}");
    assert_eq!(profile["devices"][0]["token"], "apns-cio");
    assert_eq!(profile["devices"][0]["platform"], "ios");
    assert_eq!(profile["devices"][0]["attributes"]["app_version"], "2.1");
    let events = server.sql("SELECT event, distinct_id FROM events ORDER BY timestamp").await;
    assert_eq!(events["rows"], json!([["Viewed Pricing", "u-cio"], ["Checkout", "u-cio"]]), "event ids deduplicate");
    let (_, gone) = server.get("/v1/profiles?user_id=gone", &server.keys.server_key).await;
    assert_eq!(gone["profiles"], json!([]), "deleted customer is erased");
    let (_, quiet) = server.get("/v1/profiles?user_id=quiet", &server.keys.server_key).await;
    assert_eq!(quiet["profiles"], json!([]), "suppressed customer's event dropped");
}

#[tokio::test]
async fn customerio_requests_need_the_server_key_and_name_bad_fields() {
    let server = TestServer::start().await;
    let put = |key: &str, body: Value| {
        server.http.put(server.url("/api/v1/customers/ada")).basic_auth("development", Some(key)).json(&body).send()
    };
    let refused = put(&server.keys.client_key, json!({ "plan": "pro" })).await.unwrap();
    assert_eq!(refused.status(), 403, "client keys cannot write through Customer.io's server API");
    let bad = put(&server.keys.server_key, json!({ "age": "forty" })).await.unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!((body["code"].as_str(), body["path"].as_str()), (Some("invalid_reserved_trait"), Some("age")));
    let missing = server.http.put(server.url("/api/v1/customers/ada")).json(&json!({})).send().await.unwrap();
    assert_eq!(missing.status(), 401);
}

#[tokio::test]
async fn customerio_v2_batches_apply_person_operations_in_order() {
    let server = TestServer::start().await;
    let batch = json!({ "batch": [
        { "type": "person", "action": "identify", "identifiers": { "id": "b-ada" }, "attributes": { "plan": "pro", "email": "b@example.com" } },
        { "type": "person", "action": "event", "identifiers": { "email": "b@example.com" }, "name": "Upgraded", "attributes": { "to": "pro" }, "id": "e-1" },
        { "type": "person", "action": "add_device", "identifiers": { "id": "b-ada" }, "device": { "token": "apns-b", "platform": "ios" } },
        { "type": "person", "action": "identify", "identifiers": { "id": "b-dup" }, "attributes": { "seats": 3 } },
        { "type": "person", "action": "merge", "primary": { "id": "b-ada" }, "secondary": { "id": "b-dup" } },
        { "type": "person", "action": "suppress", "identifiers": { "id": "b-quiet" } },
    ] });
    let response = server
        .http
        .post(server.url("/api/v2/batch"))
        .basic_auth("development", Some(&server.keys.server_key))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let profile = server.profile_of_user("b-ada").await;
    assert_eq!(profile["traits"], json!({ "plan": "pro", "email": "b@example.com", "seats": 3 }));
    assert_eq!(profile["devices"][0]["token"], "apns-b");
    let events = server.sql("SELECT event, distinct_id FROM events").await;
    assert_eq!(events["rows"], json!([["Upgraded", "b-ada"]]));

    let bad = json!({ "batch": [
        { "type": "person", "action": "identify", "identifiers": { "id": "b-ok" }, "attributes": { "plan": "pro" } },
        { "type": "person", "action": "launch", "identifiers": { "id": "b-ok" } },
        { "type": "person", "action": "identify", "identifiers": { "id": "b-after" }, "attributes": { "plan": "team" } },
        { "type": "person", "unknown_field": true },
    ] });
    let response = server
        .http
        .post(server.url("/api/v2/batch"))
        .basic_auth("development", Some(&server.keys.server_key))
        .json(&bad)
        .send()
        .await
        .unwrap();
    // Each refused operation is refused alone; the others are applied whatever their order.
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["batch_index"], 1);
    assert_eq!(body["errors"][0]["field"], "batch[1].action");
    assert_eq!(body["errors"][1]["batch_index"], 3);
    assert_eq!(body["errors"][1]["reason"], "invalid_type", "{body}");
    assert_eq!(server.profile_of_user("b-ok").await["traits"]["plan"], "pro");
    assert_eq!(server.profile_of_user("b-after").await["traits"]["plan"], "team", "operations after a refused one");
    let (_, log) = server.get("/v1/rejections", &server.keys.server_key).await;
    assert_eq!(log["rejections"][0]["dialect"], "customerio");
    assert_eq!(log["rejections"][0]["path"], "batch[3]");
}
