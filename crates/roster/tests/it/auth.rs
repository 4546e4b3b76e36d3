//! Who may do what: missing and wrong keys, client vs server keys, the admin token, and every way
//! of presenting a key.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{TestServer, assert_error, read};

#[tokio::test]
async fn missing_and_unknown_keys_are_401() {
    let server = TestServer::start().await;
    let response = server.http.post(server.url("/identify")).json(&json!({ "distinct_id": "u" })).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "missing_api_key");
    for wrong in ["nope", "ser.nope", "adm.nope"] {
        let (status, body) = server.post("/identify", wrong, &json!({ "distinct_id": "u" })).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_api_key");
    }
    let (status, body) = server.get("/v1/profiles", "ser.nope").await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_api_key");
}

#[tokio::test]
async fn keys_work_as_header_bearer_and_query_parameter() {
    let server = TestServer::start().await;
    let bearer = server
        .http
        .post(server.url("/identify"))
        .bearer_auth(&server.keys.client_key)
        .json(&json!({ "distinct_id": "by-bearer" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);
    let query = server
        .http
        .post(server.url(&format!("/identify?apiKey={}", server.keys.client_key)))
        .json(&json!({ "distinct_id": "by-query" }))
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), StatusCode::OK);
    server.profile_of_user("by-bearer").await;
    server.profile_of_user("by-query").await;
}

#[tokio::test]
async fn client_keys_identify_but_cannot_read() {
    let server = TestServer::start().await;
    let item = server.identify(json!({ "distinct_id": "u" })).await;
    let profile_id = item["profile_id"].as_str().unwrap();
    for path in [format!("/v1/profiles/{profile_id}"), "/v1/profiles".to_owned(), "/v1/profiles?user_id=u".to_owned()] {
        let (status, body) = server.get(&path, &server.keys.client_key).await;
        assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
        assert!(!body.to_string().contains("\"traits\""), "a refused read must not leak data: {body}");
    }
}

#[tokio::test]
async fn server_keys_identify_and_read() {
    let server = TestServer::start().await;
    let (status, _) =
        server.post("/identify", &server.keys.server_key, &json!({ "distinct_id": "u", "traits": { "a": 1 } })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.profile_of_user("u").await["traits"], json!({ "a": 1 }));
}

#[tokio::test]
async fn the_admin_token_manages_environments_but_holds_no_data() {
    let server = TestServer::start().await;
    let (status, body) = server.post("/identify", &server.admin_token, &json!({ "distinct_id": "u" })).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = server.get("/v1/admin/environments", &server.keys.server_key).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = server.get("/v1/admin/environments", &server.keys.client_key).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = server.get("/v1/admin/environments", &server.admin_token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["environments"][0]["slug"], "development");
    assert!(!body.to_string().contains("ser."), "server keys are never listed: {body}");
}
