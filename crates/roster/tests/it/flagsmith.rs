//! Flagsmith's own Python SDK against Roster: remote evaluation with the client key (identity
//! with traits, a trait update, a transient trait, an identity override) and local evaluation
//! from the environment document with the server key.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{TestServer, skipped};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagsmith_python_sdk_works_unchanged_against_roster() {
    let Ok(python) = std::env::var("ROSTER_FLAG_ENGINE_PYTHON") else {
        skipped("flagsmith_python_sdk_works_unchanged_against_roster", "set ROSTER_FLAG_ENGINE_PYTHON (.ci/run does)");
        return;
    };
    let server = TestServer::start().await;
    let segment = json!({ "name": "pro users", "rules": [{ "type": "ALL", "conditions": [
        { "property": "plan", "operator": "EQUAL", "value": "pro" }] }] });
    let (status, segment) = server.post("/v1/segments", &server.keys.server_key, &segment).await;
    assert_eq!(status, StatusCode::CREATED, "{segment}");
    let feature = json!({ "name": "checkout", "enabled": false, "value": "v1",
        "segment_overrides": [{ "segment_id": segment["id"], "enabled": true, "value": "v2" }] });
    let (status, feature) = server.post("/v1/features", &server.keys.server_key, &feature).await;
    assert_eq!(status, StatusCode::CREATED, "{feature}");
    let vip = server.identify(json!({ "distinct_id": "vip" })).await;
    let override_path = format!("/v1/features/{}/overrides/{}", feature["id"], vip["profile_id"].as_str().unwrap());
    let (status, _) = server
        .send(Method::PUT, &override_path, &server.keys.server_key, Some(json!({ "enabled": true, "value": "mine" })))
        .await;
    assert_eq!(status, StatusCode::OK);

    let (base_url, client_key, server_key) =
        (server.base_url.clone(), server.keys.client_key.clone(), server.keys.server_key.clone());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/flagsmith_sdk.py");
    let output = tokio::process::Command::new(&python)
        .args([script, &base_url, &client_key, &server_key])
        .output()
        .await
        .expect("run the Flagsmith SDK script");
    assert!(output.status.success(), "SDK script failed: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from the SDK script");

    let state = |enabled: bool, value: &str| json!({ "enabled": enabled, "value": value });
    assert_eq!(seen["environment"], state(false, "v1"));
    assert_eq!(seen["pro"], state(true, "v2"), "segment override through remote evaluation");
    assert_eq!(seen["downgraded"], state(false, "v1"), "the trait update is stored and used");
    assert_eq!(seen["transient"], state(true, "v2"), "a transient trait counts for its call");
    assert_eq!(seen["vip"], state(true, "mine"), "identity override");
    assert_eq!(seen["local_pro"], state(true, "v2"), "local evaluation from the environment document");
    assert_eq!(seen["local_free"], state(false, "v1"));
    assert_eq!(seen["local_vip"], state(true, "mine"));
    assert_eq!(seen["local_environment"], state(false, "v1"));

    // What the SDK stored, through Roster's own read API.
    let ada = server.profile_of_user("ada").await;
    assert_eq!(ada["traits"]["plan"], "free", "transient traits are not stored");
    assert_eq!(ada["traits"]["app_version"], "2.1.0");
    assert!(
        server.get("/v1/profiles?user_id=bob", &server.keys.server_key).await.1["profiles"][0].is_null(),
        "local evaluation stores nothing"
    );
}

impl TestServer {
    async fn flagsmith(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path)).header("X-Environment-Key", key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        crate::common::read(request.send().await.expect("request sent")).await
    }
}

#[tokio::test]
async fn flagsmith_trait_and_identity_endpoints_store_through_the_identify_path() {
    let server = TestServer::start().await;
    let key = server.keys.client_key.clone();
    let (status, _) = server
        .flagsmith(
            Method::POST,
            "/api/v1/traits/",
            &key,
            Some(json!({ "identity": { "identifier": "ada" }, "trait_key": "plan", "trait_value": "pro" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .flagsmith(
            Method::PUT,
            "/api/v1/traits/bulk/",
            &key,
            Some(json!([
            { "identity": { "identifier": "ada" }, "trait_key": "seats", "trait_value": 3 },
            { "identity": { "identifier": "bob" }, "trait_key": "plan", "trait_value": "free" }])),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .flagsmith(
            Method::POST,
            "/api/v1/bulk-identities/",
            &key,
            Some(json!({ "data": [
            { "identifier": "cy", "traits": [{ "trait_key": "plan", "trait_value": "team" }] }] })),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(server.profile_of_user("ada").await["traits"], json!({ "plan": "pro", "seats": 3 }));
    assert_eq!(server.profile_of_user("bob").await["traits"]["plan"], "free");
    assert_eq!(server.profile_of_user("cy").await["traits"]["plan"], "team");

    let (status, identity) = server.flagsmith(Method::GET, "/api/v1/identities/?identifier=ada", &key, None).await;
    assert_eq!(status, StatusCode::OK, "{identity}");
    assert_eq!(identity["identifier"], "ada");
    let mut traits: Vec<Value> = identity["traits"].as_array().unwrap().clone();
    traits.sort_by_key(|item| item["trait_key"].as_str().unwrap().to_owned());
    assert_eq!(
        traits,
        vec![json!({ "trait_key": "plan", "trait_value": "pro" }), json!({ "trait_key": "seats", "trait_value": 3 })]
    );
    // A null value deletes the trait, as in Flagsmith.
    server
        .flagsmith(
            Method::POST,
            "/api/v1/traits/",
            &key,
            Some(json!({ "identity": { "identifier": "ada" }, "trait_key": "seats", "trait_value": null })),
        )
        .await;
    assert_eq!(server.profile_of_user("ada").await["traits"], json!({ "plan": "pro" }));

    // Increments add atomically; concurrent ones all count.
    let increments: Vec<_> = (0..10)
        .map(|_| {
            let (http, url, key) = (server.http.clone(), server.url("/api/v1/traits/increment-value/"), key.clone());
            tokio::spawn(async move {
                http.post(url)
                    .header("X-Environment-Key", key)
                    .json(&json!({ "trait_key": "logins", "increment_by": 2, "identifier": "ada" }))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for increment in increments {
        assert_eq!(increment.await.unwrap(), StatusCode::OK);
    }
    let (status, answer) = server
        .flagsmith(
            Method::POST,
            "/api/v1/traits/increment-value/",
            &key,
            Some(json!({ "trait_key": "logins", "increment_by": 0.5, "identifier": "ada" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!({ "trait_key": "logins", "trait_value": 20.5, "identifier": "ada" }));
    let (status, body) = server
        .flagsmith(
            Method::POST,
            "/api/v1/traits/increment-value/",
            &key,
            Some(json!({ "trait_key": "plan", "increment_by": 1, "identifier": "ada" })),
        )
        .await;
    crate::common::assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_type");
    assert_eq!(body["path"], "increment_by");
    server
        .flagsmith(
            Method::POST,
            "/api/v1/traits/",
            &key,
            Some(json!({ "identity": { "identifier": "ada" }, "trait_key": "logins", "trait_value": null })),
        )
        .await;

    let (status, body) = server.flagsmith(Method::GET, "/api/v1/identities/", &key, None).await;
    crate::common::assert_error(status, &body, StatusCode::BAD_REQUEST, "missing_identifier");
    let (status, body) = server
        .flagsmith(
            Method::POST,
            "/api/v1/identities/",
            &key,
            Some(json!({ "identifier": "ada", "traits": [{ "key": "x" }] })),
        )
        .await;
    crate::common::assert_error(status, &body, StatusCode::BAD_REQUEST, "unknown_field");
    assert_eq!(body["path"], "traits[0].key");
    let (status, body) = server.flagsmith(Method::GET, "/api/v1/environment-document/", &key, None).await;
    crate::common::assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = server.flagsmith(Method::GET, "/api/v1/flags/", "not-a-key", None).await;
    crate::common::assert_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_api_key");
}
