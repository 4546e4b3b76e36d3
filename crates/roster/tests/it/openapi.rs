//! The OpenAPI document: served, well formed, and every path it lists is a route the server has.

use serde_json::Value;

use crate::common::TestServer;

#[tokio::test]
async fn the_openapi_document_lists_only_routes_the_server_has() {
    let server = TestServer::start().await;
    let response = server.http.get(server.url("/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let document: Value = response.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let paths = document["paths"].as_object().unwrap();
    assert!(paths.len() > 40, "native, management and dialect paths are listed");
    for (path, operations) in paths {
        let concrete = path
            .replace("{profile_id}", "p")
            .replace("{token}", "t")
            .replace("{user_id}", "u")
            .replace("{segment_id}", "1")
            .replace("{feature_id}", "1")
            .replace("{slug}", "s")
            .replace("{identifier}", "i");
        for method in operations.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = server.http.request(method.clone(), server.url(&concrete)).send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            // Without a key a real route answers 401 (or 200 for the open ones); an unknown one 404.
            let unrouted = body["message"].as_str().is_some_and(|message| message.starts_with("no such endpoint"));
            assert!(!unrouted, "{method} {path} is listed but not served: {status} {body}");
            assert_ne!(status, 405, "{method} {path}: the server does not take this method");
        }
    }
}
