//! Bad input gets a 4xx in the public error shape that names the field and the rule; never a 500,
//! and nothing already accepted is lost.

use reqwest::StatusCode;
use roster_core::Limits;
use roster_server::ServerConfig;
use serde_json::json;

use crate::common::{TestServer, assert_error};

#[tokio::test]
async fn malformed_bodies_are_400_malformed_json() {
    let server = TestServer::start().await;
    for body in ["{bad", "[{\"distinct_id\":\"u\"}", "", "\u{0}"] {
        let (status, response) = server.post_raw("/identify", &server.keys.client_key, body).await;
        assert_error(status, &response, StatusCode::BAD_REQUEST, "malformed_json");
    }
    let (status, response) = server.post_raw("/identify", &server.keys.client_key, vec![0xff, 0xfe]).await;
    assert_error(status, &response, StatusCode::BAD_REQUEST, "malformed_json");
    for body in ["42", "\"text\"", "null", "true"] {
        let (status, response) = server.post_raw("/identify", &server.keys.client_key, body).await;
        assert_error(status, &response, StatusCode::BAD_REQUEST, "invalid_type");
    }
}

#[tokio::test]
async fn each_field_rule_is_named_with_its_path() {
    let server = TestServer::start().await;
    let cases = [
        (json!({ "traits": { "a": 1 } }), "missing_identifier", "distinct_id"),
        (json!({ "distinct_id": "" }), "invalid_identifier", "distinct_id"),
        (json!({ "distinct_id": "u", "anonymous_id": "x".repeat(257) }), "invalid_identifier", "anonymous_id"),
        (json!({ "distinct_id": 7 }), "invalid_type", "distinct_id"),
        (json!({ "distinct_id": "u", "traits": "plan=pro" }), "invalid_type", "traits"),
        (json!({ "distinct_id": "u", "traits": { "bio": "x".repeat(2001) } }), "trait_string_too_long", "traits.bio"),
        (
            json!({ "user_id": "u", "user_traits": { "bio": "x".repeat(2001) } }),
            "trait_string_too_long",
            "user_traits.bio",
        ),
        (json!({ "distinct_id": "u", "traits": { "k".repeat(257): 1 } }), "trait_key_too_long", ""),
        (json!({ "distinct_id": "u", "traits": { "a": [[[[[[[[[1]]]]]]]]] } }), "trait_nesting_too_deep", ""),
        (json!({ "distinct_id": "u", "timestamp": "last tuesday" }), "invalid_timestamp", "timestamp"),
        (json!({ "distinct_id": "u", "timestamp": 1700000000 }), "invalid_type", "timestamp"),
        (json!({ "distinct_id": "u", "trait": { "a": 1 } }), "unknown_field", "trait"),
        (json!({ "distinct_id": "u", "user_id": "v" }), "invalid_type", "user_id"),
        (json!({ "distinct_id": "u", "context": [] }), "invalid_type", "context"),
    ];
    for (body, code, path) in cases {
        let (status, response) = server.post("/identify", &server.keys.client_key, &body).await;
        assert_error(status, &response, StatusCode::BAD_REQUEST, code);
        if path.is_empty() {
            assert!(response["path"].as_str().is_some_and(|path| path.starts_with("traits.")), "{response}");
        } else {
            assert_eq!(response["path"], path, "{response}");
        }
        assert_eq!(response["results"][0]["status"], "rejected");
    }
}

#[tokio::test]
async fn a_batch_applies_valid_items_and_reports_each_invalid_one() {
    let server = TestServer::start().await;
    let batch = json!([
        { "distinct_id": "good-1", "traits": { "plan": "pro" } },
        { "distinct_id": "bad", "traits": { "bio": "x".repeat(2001) } },
        "not an object",
        { "distinct_id": "good-2" },
        { "traits": {} }
    ]);
    let (status, response) = server.post("/identify", &server.keys.client_key, &batch).await;
    assert_error(status, &response, StatusCode::BAD_REQUEST, "trait_string_too_long");
    assert_eq!(response["accepted"], 2);
    assert_eq!(response["rejected"], 3);
    let results = response["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], "accepted");
    assert_eq!(results[1]["error"]["path"], "[1].traits.bio");
    assert_eq!(results[2]["error"]["code"], "invalid_type");
    assert_eq!(results[2]["error"]["path"], "[2]");
    assert_eq!(results[3]["status"], "accepted");
    assert_eq!(results[4]["error"]["code"], "missing_identifier");
    assert_eq!(results[4]["index"], 4);
    assert_eq!(server.profile_of_user("good-1").await["traits"], json!({ "plan": "pro" }));
    server.profile_of_user("good-2").await;
    let (_, bad) = server.get("/v1/profiles?user_id=bad", &server.keys.server_key).await;
    assert_eq!(bad["profiles"], json!([]), "a rejected item writes nothing");
}

#[tokio::test]
async fn oversized_bodies_are_413_and_nothing_accepted_is_lost() {
    let server =
        TestServer::start_with(Limits::default(), ServerConfig { max_body_bytes: 1024, ..ServerConfig::default() })
            .await;
    server.identify(json!({ "distinct_id": "before", "traits": { "kept": true } })).await;
    let big = json!({ "distinct_id": "u", "traits": { "a": "x".repeat(1500) } });
    let (status, response) = server.post("/identify", &server.keys.client_key, &big).await;
    assert_error(status, &response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(response["message"].as_str().unwrap().contains("1024"));
    assert_eq!(server.profile_of_user("before").await["traits"], json!({ "kept": true }));
}

#[tokio::test]
async fn configured_limits_are_enforced_and_named() {
    let limits = Limits { max_string_bytes: 10, max_traits_per_profile: 2, ..Limits::default() };
    let server = TestServer::start_with(limits, ServerConfig::default()).await;
    let (status, response) = server
        .post("/identify", &server.keys.client_key, &json!({ "distinct_id": "u", "traits": { "s": "12345678901" } }))
        .await;
    assert_error(status, &response, StatusCode::BAD_REQUEST, "trait_string_too_long");
    assert!(response["message"].as_str().unwrap().contains("10 bytes"), "{response}");

    server.identify(json!({ "distinct_id": "u", "traits": { "a": 1, "b": 2 } })).await;
    let (status, response) =
        server.post("/identify", &server.keys.client_key, &json!({ "distinct_id": "u", "traits": { "c": 3 } })).await;
    assert_error(status, &response, StatusCode::BAD_REQUEST, "too_many_traits");
    assert_eq!(server.profile_of_user("u").await["traits"], json!({ "a": 1, "b": 2 }));
    // Replacing and deleting within the limit still works.
    server.identify(json!({ "distinct_id": "u", "traits": { "a": null, "c": 3 } })).await;
    assert_eq!(server.profile_of_user("u").await["traits"], json!({ "b": 2, "c": 3 }));
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/no/such/route", &server.keys.server_key).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = server.get("/identify", &server.keys.server_key).await;
    assert_error(status, &body, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn the_nul_character_is_refused_wherever_text_is_stored() {
    let server = TestServer::start().await;
    for (body, path) in [
        (json!({ "distinct_id": "u", "traits": { "bio": "a\u{0}b" } }), "traits.bio"),
        (json!({ "distinct_id": "u", "traits": { "a\u{0}": 1 } }), "traits.a\u{0}"),
        (json!({ "distinct_id": "u\u{0}" }), "distinct_id"),
    ] {
        let (status, response) = server.post("/identify", &server.keys.client_key, &body).await;
        assert_error(status, &response, StatusCode::BAD_REQUEST, "nul_character");
        assert_eq!(response["path"], path);
    }
    let (status, response) =
        server.post("/track", &server.keys.client_key, &json!({ "distinct_id": "u", "event": "E\u{0}" })).await;
    assert_error(status, &response, StatusCode::BAD_REQUEST, "nul_character");
}
