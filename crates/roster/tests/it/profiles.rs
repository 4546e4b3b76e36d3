//! The read API: listing, pagination, trait filters, lookups.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{TestServer, assert_error};

#[tokio::test]
async fn listing_pages_through_every_profile_once() {
    let server = TestServer::start().await;
    let batch: Vec<_> =
        (0..7).map(|index| json!({ "distinct_id": format!("u{index}"), "traits": { "n": index } })).collect();
    server.post("/identify", &server.keys.client_key, &json!(batch)).await;

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(after) => format!("/v1/profiles?limit=3&after={after}"),
            None => "/v1/profiles?limit=3".to_owned(),
        };
        let (status, page) = server.get(&path, &server.keys.server_key).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let profiles = page["profiles"].as_array().unwrap();
        assert!(profiles.len() <= 3);
        seen.extend(profiles.iter().map(|profile| profile["user_id"].as_str().unwrap().to_owned()));
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, (0..7).map(|index| format!("u{index}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn trait_filter_matches_type_and_value() {
    let server = TestServer::start().await;
    let batch = json!([
        { "distinct_id": "a", "traits": { "plan": "pro", "seats": 30 } },
        { "distinct_id": "b", "traits": { "plan": "free", "seats": "30" } },
        { "distinct_id": "c", "traits": { "plan": "pro", "vip": true } }
    ]);
    server.post("/identify", &server.keys.client_key, &batch).await;
    let users = |body: serde_json::Value| -> Vec<String> {
        let mut users: Vec<String> = body["profiles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|profile| profile["user_id"].as_str().unwrap().to_owned())
            .collect();
        users.sort();
        users
    };
    let (_, pro) = server.get("/v1/profiles?trait.plan=pro", &server.keys.server_key).await;
    assert_eq!(users(pro), vec!["a", "c"]);
    let (_, numeric) = server.get("/v1/profiles?trait.seats=30", &server.keys.server_key).await;
    assert_eq!(users(numeric), vec!["a"]);
    let (_, text) = server.get("/v1/profiles?trait.seats=%2230%22", &server.keys.server_key).await;
    assert_eq!(users(text), vec!["b"]);
    let (_, vip) = server.get("/v1/profiles?trait.vip=true", &server.keys.server_key).await;
    assert_eq!(users(vip), vec!["c"]);
}

#[tokio::test]
async fn unknown_lookups_answer_empty_or_404() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/v1/profiles?user_id=nobody", &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["profiles"], json!([]));
    let (status, body) = server.get("/v1/profiles/00000000-0000-0000-0000-000000000000", &server.keys.server_key).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn bad_listing_parameters_are_named() {
    let server = TestServer::start().await;
    for (query, parameter) in
        [("limit=0", "limit"), ("limit=abc", "limit"), ("limit=100000", "limit"), ("color=red", "color")]
    {
        let (status, body) = server.get(&format!("/v1/profiles?{query}"), &server.keys.server_key).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query_parameter");
        assert_eq!(body["path"], parameter, "{body}");
    }
}
