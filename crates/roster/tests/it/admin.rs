//! Environments: creation, isolation, key rotation.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{TestServer, assert_error};

#[tokio::test]
async fn created_environments_get_working_keys_and_are_isolated() {
    let server = TestServer::start().await;
    let (status, production) = server
        .post("/v1/admin/environments", &server.admin_token, &json!({ "slug": "production", "name": "Production" }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{production}");
    let production_client = production["client_key"].as_str().unwrap();
    let production_server = production["server_key"].as_str().unwrap();
    assert!(production_server.starts_with("ser."));

    server.identify(json!({ "distinct_id": "same-user", "traits": { "plan": "dev" } })).await;
    let (status, _) = server
        .post(
            "/identify",
            production_client,
            &json!({ "environment": "production", "distinct_id": "same-user", "traits": { "plan": "prod" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    assert_eq!(server.profile_of_user("same-user").await["traits"], json!({ "plan": "dev" }));
    let (_, in_production) = server.get("/v1/profiles?user_id=same-user", production_server).await;
    assert_eq!(in_production["profiles"][0]["traits"], json!({ "plan": "prod" }));
    assert_eq!(in_production["profiles"][0]["environment"], "production");

    // A profile id from one environment is not found through another environment's key.
    let dev_profile_id = server.profile_of_user("same-user").await["profile_id"].as_str().unwrap().to_owned();
    let (status, body) = server.get(&format!("/v1/profiles/{dev_profile_id}"), production_server).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    // Writing with one environment's key while naming another is refused.
    let (status, body) =
        server.post("/identify", production_client, &json!({ "environment": "development", "distinct_id": "x" })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "environment_mismatch");
    assert_eq!(body["path"], "environment");
}

#[tokio::test]
async fn duplicate_and_malformed_slugs_are_refused() {
    let server = TestServer::start().await;
    let (status, body) =
        server.post("/v1/admin/environments", &server.admin_token, &json!({ "slug": "development" })).await;
    assert_error(status, &body, StatusCode::CONFLICT, "environment_exists");
    let (status, body) =
        server.post("/v1/admin/environments", &server.admin_token, &json!({ "slug": "Not A Slug" })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_type");
    assert_eq!(body["path"], "slug");
    let (status, body) =
        server.post("/v1/admin/environments", &server.admin_token, &json!({ "name": "no slug" })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_type");
}

#[tokio::test]
async fn rotated_keys_replace_the_old_ones_at_once() {
    let server = TestServer::start().await;
    let (status, rotated) =
        server.post("/v1/admin/environments/development/rotate-keys", &server.admin_token, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let (status, body) = server.post("/identify", &server.keys.client_key, &json!({ "distinct_id": "u" })).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_api_key");
    let (status, body) = server.get("/v1/profiles", &server.keys.server_key).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_api_key");
    let (status, _) =
        server.post("/identify", rotated["client_key"].as_str().unwrap(), &json!({ "distinct_id": "u" })).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.get("/v1/profiles?user_id=u", rotated["server_key"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) =
        server.post("/v1/admin/environments/missing/rotate-keys", &server.admin_token, &json!({})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}
