//! What one request may cost: items per batch, the size of an error answer, requests and body
//! bytes in flight, and how long a slow client may hold a connection.

use reqwest::StatusCode;
use roster_core::Limits;
use roster_server::ServerConfig;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error};

/// `count` empty objects as a JSON array: 3 bytes an item, the cheapest batch to send.
fn empty_items(count: usize) -> String {
    let mut text = String::with_capacity(count * 3 + 2);
    text.push('[');
    for index in 0..count {
        if index > 0 {
            text.push(',');
        }
        text.push_str("{}");
    }
    text.push(']');
    text
}

/// Sends raw bytes with the client key (Customer.io's API: the server key, as it takes no other);
/// answers the status and the raw answer text.
async fn post_text(server: &TestServer, method: reqwest::Method, path: &str, body: String) -> (StatusCode, String) {
    let mut request = server.http.request(method, server.url(path)).header("Content-Type", "application/json");
    request = if path.starts_with("/api/v2/") {
        request.basic_auth("site", Some(&server.keys.server_key))
    } else {
        request.header("X-API-Key", &server.keys.client_key)
    };
    let response = request.body(body).send().await.expect("request sent");
    let status = response.status();
    (status, response.text().await.expect("answer body"))
}

async fn stored_profile_count(server: &TestServer) -> usize {
    let (status, listing) = server.get("/v1/profiles?limit=1000", &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    listing["profiles"].as_array().expect("profiles").len()
}

#[tokio::test]
async fn a_million_items_get_one_small_answer_in_every_dialect() {
    let server = TestServer::start().await;
    let million = empty_items(1_000_000);
    let cases: Vec<(reqwest::Method, &str, String, StatusCode)> = vec![
        (reqwest::Method::POST, "/identify", million.clone(), StatusCode::PAYLOAD_TOO_LARGE),
        (reqwest::Method::POST, "/track", million.clone(), StatusCode::PAYLOAD_TOO_LARGE),
        (reqwest::Method::POST, "/alias", million.clone(), StatusCode::PAYLOAD_TOO_LARGE),
        // Segment's 500 KB batch limit comes first for bigger bodies; this is still 150 times the cap.
        (reqwest::Method::POST, "/v1/batch", format!(r#"{{"batch":{}}}"#, empty_items(150_000)), StatusCode::BAD_REQUEST),
        (reqwest::Method::POST, "/api/v2/batch", format!(r#"{{"batch":{million}}}"#), StatusCode::PAYLOAD_TOO_LARGE),
        (
            reqwest::Method::POST,
            "/api/v1/bulk-identities/",
            format!(r#"{{"data":{million}}}"#),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (reqwest::Method::PUT, "/api/v1/traits/bulk/", million.clone(), StatusCode::PAYLOAD_TOO_LARGE),
    ];
    for (method, path, body, expected_status) in cases {
        let (status, text) = post_text(&server, method, path, body).await;
        assert!(text.len() < 4096, "{path}: the answer is {} bytes", text.len());
        let answer: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"));
        assert_error(status, &answer, expected_status, "too_many_items");
        assert!(answer["message"].as_str().unwrap().contains("1000"), "{path}: the limit is named: {answer}");
    }
    assert_eq!(stored_profile_count(&server).await, 0, "nothing of a refused batch is stored");
}

#[tokio::test]
async fn a_batch_at_the_item_limit_is_applied_and_one_more_is_refused() {
    let config = ServerConfig { max_batch_items: 3, ..ServerConfig::default() };
    let server = TestServer::start_with(Limits::default(), config).await;
    let three: Vec<Value> = (0..3).map(|index| json!({"distinct_id": format!("u_{index}")})).collect();
    let (status, answer) = server.post("/identify", &server.keys.client_key, &json!(three)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let four: Vec<Value> = (0..4).map(|index| json!({"distinct_id": format!("v_{index}")})).collect();
    let (status, answer) = server.post("/identify", &server.keys.client_key, &json!(four)).await;
    assert_error(status, &answer, StatusCode::PAYLOAD_TOO_LARGE, "too_many_items");
    // A key escaped in the body is the same field to the parser, so it is counted too.
    let escaped = r#"{"b\u0061tch":[{"type":"person","action":"identify","identifiers":{"id":"a"}},{},{},{}]}"#;
    let (status, text) = post_text(&server, reqwest::Method::POST, "/api/v2/batch", escaped.to_owned()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert_eq!(stored_profile_count(&server).await, 3);
}

#[tokio::test]
async fn the_answer_to_thousands_of_bad_items_stays_small() {
    let config = ServerConfig { max_batch_items: 5000, ..ServerConfig::default() };
    let server = TestServer::start_with(Limits::default(), config).await;
    let mut items: Vec<Value> = (0..3000).map(|_| json!({})).collect();
    items.push(json!({"distinct_id": "good"}));
    let (status, text) = post_text(&server, reqwest::Method::POST, "/identify", json!(items).to_string()).await;
    assert!(text.len() < 32 * 1024, "the answer is {} bytes", text.len());
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "missing_identifier");
    assert_eq!(answer["accepted"], 1);
    assert_eq!(answer["rejected"], 3000);
    assert_eq!(answer["unlisted_rejections"], 2950);
    assert_eq!(answer["rejections_by_code"], json!({"missing_identifier": 3000}));
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 51, "the first 50 rejections and the accepted item are listed");
    assert_eq!(results[0]["index"], 0);
    assert_eq!(results[0]["error"]["code"], "missing_identifier");
    assert_eq!(results[50]["index"], 3000);
    assert_eq!(results[50]["status"], "accepted");
    assert_eq!(server.profile_of_user("good").await["user_id"], "good");
}

#[tokio::test]
async fn echoed_input_is_cut_short_in_error_messages() {
    let server = TestServer::start().await;
    let long_key = "k".repeat(1_000_000);
    let long_value = "v".repeat(1_000_000);
    let bodies = [
        format!(r#"{{"distinct_id":"u","{long_key}":1}}"#),
        format!(r#"{{"distinct_id":"u","traits":"{long_value}"}}"#),
        format!(r#"{{"distinct_id":"u","traits":{{"{long_key}":1}}}}"#),
    ];
    for body in bodies {
        let (status, text) = post_text(&server, reqwest::Method::POST, "/identify", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}", &text[..text.len().min(300)]);
        assert!(text.len() < 4096, "the answer is {} bytes", text.len());
    }
}
