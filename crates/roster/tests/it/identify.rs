//! The native identify contract over HTTP: patches, deletes, ordering, exact values, linking.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::TestServer;

#[tokio::test]
async fn identify_creates_a_profile_that_the_server_key_reads_back() {
    let server = TestServer::start().await;
    let item = server
        .identify(json!({
            "environment": "development",
            "distinct_id": "u_01",
            "anonymous_id": "anon_123",
            "traits": { "plan": "premium", "email": "ada@example.com" },
            "timestamp": "2026-03-01T10:00:00.5Z",
            "context": { "ip": "127.0.0.1" },
            "message_id": "m-1"
        }))
        .await;
    assert_eq!(item["status"], "accepted");
    assert_eq!(item["created"], true);
    let profile_id = item["profile_id"].as_str().unwrap().to_owned();

    let profile = server.profile_of_user("u_01").await;
    assert_eq!(profile["profile_id"], profile_id);
    assert_eq!(profile["environment"], "development");
    assert_eq!(profile["identified"], true);
    assert_eq!(profile["anonymous_ids"], json!(["anon_123"]));
    assert_eq!(profile["traits"], json!({ "plan": "premium", "email": "ada@example.com" }));
    assert_eq!(profile["trait_timestamps"]["plan"], "2026-03-01T10:00:00.5Z");
    assert!(profile["created_at"].is_string() && profile["updated_at"].is_string());

    let (status, by_id) = server.get(&format!("/v1/profiles/{profile_id}"), &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_id, profile);
    let (_, by_anonymous) = server.get("/v1/profiles?anonymous_id=anon_123", &server.keys.server_key).await;
    assert_eq!(by_anonymous["profiles"][0]["profile_id"], profile_id);
}

#[tokio::test]
async fn user_id_and_user_traits_are_accepted_spellings() {
    let server = TestServer::start().await;
    server.identify(json!({ "user_id": "u_1", "user_traits": { "role": "admin" } })).await;
    assert_eq!(server.profile_of_user("u_1").await["traits"], json!({ "role": "admin" }));
}

#[tokio::test]
async fn traits_are_a_patch_null_deletes_and_older_updates_lose() {
    let server = TestServer::start().await;
    server
        .identify(json!({ "distinct_id": "u", "traits": { "plan": "pro", "seats": 3, "role": "admin" }, "timestamp": "2026-01-01T00:00:10Z" }))
        .await;
    server
        .identify(json!({ "distinct_id": "u", "traits": { "seats": null }, "timestamp": "2026-01-01T00:00:20Z" }))
        .await;
    // Late and older: `plan` keeps its newer value and `seats` stays deleted; `age` is new.
    server
        .identify(json!({ "distinct_id": "u", "traits": { "plan": "free", "seats": 99, "age": 41 }, "timestamp": "2026-01-01T00:00:05Z" }))
        .await;
    let profile = server.profile_of_user("u").await;
    assert_eq!(profile["traits"], json!({ "plan": "pro", "role": "admin", "age": 41 }));
    assert_eq!(profile["trait_timestamps"]["plan"], "2026-01-01T00:00:10Z");

    server.identify(json!({ "distinct_id": "u", "traits": { "seats": 5 }, "timestamp": "2026-01-01T00:00:30Z" })).await;
    assert_eq!(server.profile_of_user("u").await["traits"]["seats"], 5);
}

#[tokio::test]
async fn replaying_a_batch_in_reverse_order_gives_the_same_profile() {
    let server = TestServer::start().await;
    let batch = json!([
        { "distinct_id": "forward", "traits": { "plan": "pro", "seats": 3 }, "timestamp": "2026-01-01T00:00:10Z" },
        { "distinct_id": "forward", "traits": { "plan": "team", "seats": null }, "timestamp": "2026-01-01T00:00:30Z" },
        { "distinct_id": "forward", "traits": { "plan": "free", "role": "owner" }, "timestamp": "2026-01-01T00:00:20Z" }
    ]);
    let mut reversed: Vec<serde_json::Value> = batch.as_array().unwrap().clone();
    reversed.reverse();
    for item in &mut reversed {
        item["distinct_id"] = json!("backward");
    }
    for _ in 0..2 {
        let (status, _) = server.post("/identify", &server.keys.client_key, &batch).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _) = server.post("/identify", &server.keys.client_key, &json!(reversed)).await;
    assert_eq!(status, StatusCode::OK);
    let forward = server.profile_of_user("forward").await;
    let backward = server.profile_of_user("backward").await;
    assert_eq!(forward["traits"], json!({ "plan": "team", "role": "owner" }));
    assert_eq!(forward["traits"], backward["traits"]);
    assert_eq!(forward["trait_timestamps"], backward["trait_timestamps"]);
}

#[tokio::test]
async fn values_keep_their_exact_json_types() {
    let server = TestServer::start().await;
    let body = r#"{"distinct_id":"u","traits":{"int":1,"float":1.5,"whole_float":2.0,"big":9007199254740993,"yes":true,"address":{"city":"Paris","zip":"75001"},"tags":["a",2,{"b":null}]}}"#;
    let (status, _) = server.post_raw("/identify", &server.keys.client_key, body).await;
    assert_eq!(status, StatusCode::OK);
    let response = server
        .http
        .get(server.url("/v1/profiles?user_id=u"))
        .header("X-API-Key", &server.keys.server_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        response.contains(r#""traits":{"address":{"city":"Paris","zip":"75001"},"big":9007199254740993,"float":1.5,"int":1,"tags":["a",2,{"b":null}],"whole_float":2.0,"yes":true}"#),
        "traits not kept exactly: {response}"
    );
}

#[tokio::test]
async fn anonymous_activity_is_linked_at_login_keeping_the_profile_id() {
    let server = TestServer::start().await;
    let anonymous = server.identify(json!({ "anonymous_id": "anon_9", "traits": { "utm_source": "ad" } })).await;
    let (_, before) = server.get("/v1/profiles?anonymous_id=anon_9", &server.keys.server_key).await;
    assert_eq!(before["profiles"][0]["identified"], false);
    assert_eq!(before["profiles"][0]["user_id"], serde_json::Value::Null);

    let login =
        server.identify(json!({ "distinct_id": "u_9", "anonymous_id": "anon_9", "traits": { "plan": "pro" } })).await;
    assert_eq!(login["profile_id"], anonymous["profile_id"]);
    assert_eq!(login["created"], false);
    let profile = server.profile_of_user("u_9").await;
    assert_eq!(profile["traits"], json!({ "utm_source": "ad", "plan": "pro" }));
    assert_eq!(profile["identified"], true);
}

#[tokio::test]
async fn anonymous_profile_merges_into_a_known_user_and_its_id_forwards() {
    let server = TestServer::start().await;
    let user = server
        .identify(json!({ "distinct_id": "u_1", "traits": { "plan": "pro", "theme": "dark" }, "timestamp": "2026-01-01T00:00:10Z" }))
        .await;
    let phone = server
        .identify(json!({ "anonymous_id": "phone", "traits": { "plan": "free", "theme": "light", "os": "ios" }, "timestamp": "2026-01-01T00:00:20Z" }))
        .await;
    let merged = server.identify(json!({ "distinct_id": "u_1", "anonymous_id": "phone" })).await;
    assert_eq!(merged["profile_id"], user["profile_id"]);
    assert_eq!(merged["merged_profile_ids"], json!([phone["profile_id"]]));

    let profile = server.profile_of_user("u_1").await;
    // Traits merged by timestamp: the phone's writes were newer.
    assert_eq!(profile["traits"], json!({ "plan": "free", "theme": "light", "os": "ios" }));
    assert_eq!(profile["anonymous_ids"], json!(["phone"]));
    let (status, forwarded) =
        server.get(&format!("/v1/profiles/{}", phone["profile_id"].as_str().unwrap()), &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(forwarded["profile_id"], user["profile_id"]);
}

#[tokio::test]
async fn an_anonymous_id_of_another_identified_user_is_never_merged() {
    let server = TestServer::start().await;
    let alice = server
        .identify(json!({ "distinct_id": "alice", "anonymous_id": "family-ipad", "traits": { "name": "Alice" } }))
        .await;
    let bob = server
        .identify(json!({ "distinct_id": "bob", "anonymous_id": "family-ipad", "traits": { "name": "Bob" } }))
        .await;
    assert_eq!(bob["status"], "accepted");
    assert_ne!(bob["profile_id"], alice["profile_id"]);
    assert_eq!(bob["warnings"][0]["code"], "anonymous_id_owned_by_other_user");
    assert!(bob["warnings"][0]["message"].as_str().unwrap().contains("family-ipad"));
    assert_eq!(server.profile_of_user("alice").await["traits"], json!({ "name": "Alice" }));
    assert_eq!(server.profile_of_user("bob").await["traits"], json!({ "name": "Bob" }));
    assert_eq!(server.profile_of_user("bob").await["anonymous_ids"], json!([]));
}

#[tokio::test]
async fn sync_true_answers_after_the_write_is_visible() {
    let server = TestServer::start().await;
    let (status, response) = server
        .post("/identify?sync=true", &server.keys.client_key, &json!({ "distinct_id": "u_sync", "traits": { "n": 1 } }))
        .await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(server.profile_of_user("u_sync").await["traits"]["n"], 1);
}

#[tokio::test]
async fn set_once_traits_only_fill_missing_values() {
    let server = TestServer::start().await;
    server.identify(json!({ "distinct_id": "u", "traits_set_once": { "first_source": "ad" } })).await;
    server
        .identify(json!({ "distinct_id": "u", "traits_set_once": { "first_source": "email", "first_plan": "free" } }))
        .await;
    assert_eq!(server.profile_of_user("u").await["traits"], json!({ "first_source": "ad", "first_plan": "free" }));
}

#[tokio::test]
async fn concurrent_identifies_of_one_new_user_create_exactly_one_profile() {
    let server = std::sync::Arc::new(TestServer::start().await);
    for round in 0..5 {
        let user_id = format!("racer-{round}");
        let mut tasks = Vec::new();
        for index in 0..12 {
            let server = std::sync::Arc::clone(&server);
            let user_id = user_id.clone();
            tasks.push(tokio::spawn(async move {
                let item =
                    server.identify(json!({ "distinct_id": user_id, "traits": { format!("k{index}"): index } })).await;
                item["profile_id"].as_str().unwrap().to_owned()
            }));
        }
        let mut profile_ids = Vec::new();
        for task in tasks {
            profile_ids.push(task.await.unwrap());
        }
        profile_ids.sort();
        profile_ids.dedup();
        assert_eq!(profile_ids.len(), 1, "racing identifies made several profiles: {profile_ids:?}");
        assert_eq!(server.profile_of_user(&user_id).await["traits"].as_object().unwrap().len(), 12);
    }
}
