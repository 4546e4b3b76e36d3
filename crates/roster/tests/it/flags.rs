//! Segments, features, identity overrides, evaluation and membership over HTTP.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error};

impl TestServer {
    async fn create(&self, path: &str, body: Value) -> Value {
        let (status, created) = self.post(path, &self.keys.server_key, &body).await;
        assert_eq!(status, StatusCode::CREATED, "{path}: {created}");
        created
    }

    /// Flags for an identity with the server key (whose answer carries the profile id and every
    /// segment; what a client key hears is tested in `security.rs`).
    async fn flags_for(&self, body: Value) -> Value {
        let (status, answer) = self.post("/v1/flags", &self.keys.server_key, &body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer
    }

    /// Waits for the background membership pass to finish.
    async fn memberships_ready(&self, segment_id: &Value) -> Value {
        for _ in 0..200 {
            let (_, segment) = self.get(&format!("/v1/segments/{segment_id}"), &self.keys.server_key).await;
            if segment["membership"]["state"] == "ready" {
                return segment;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("membership of segment {segment_id} never became ready");
    }
}

fn flag<'a>(answer: &'a Value, feature: &str) -> &'a Value {
    answer["flags"].as_array().unwrap().iter().find(|flag| flag["feature"] == feature).expect("flag present")
}

fn pro_segment() -> Value {
    json!({ "name": "pro users", "rules": [{ "type": "ALL", "conditions": [
        { "property": "plan", "operator": "EQUAL", "value": "pro" },
        { "property": "app_version", "operator": "GREATER_THAN_INCLUSIVE", "value": "2.0.0:semver" }] }] })
}

#[tokio::test]
async fn segments_and_features_are_managed_with_the_server_key_and_checked_when_saved() {
    let server = TestServer::start().await;
    let (status, body) = server.post("/v1/segments", &server.keys.client_key, &pro_segment()).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let segment = server.create("/v1/segments", pro_segment()).await;
    assert_eq!(segment["name"], "pro users");
    let (status, body) = server.post("/v1/segments", &server.keys.server_key, &pro_segment()).await;
    assert_error(status, &body, StatusCode::CONFLICT, "name_taken");

    for (condition, rule) in [
        (json!({ "property": "email", "operator": "REGEX", "value": "(unclosed" }), "regular expression"),
        (json!({ "property": "n", "operator": "MODULO", "value": "0|1" }), "divisor"),
        (json!({ "property": "v", "operator": "EQUAL", "value": "1.2:semver" }), "semantic version"),
    ] {
        let bad = json!({ "name": "bad", "rules": [{ "type": "ANY", "rules": [{ "type": "ALL", "conditions": [condition] }] }] });
        let (status, body) = server.post("/v1/segments", &server.keys.server_key, &bad).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_segment_rule");
        assert_eq!(body["path"], "rules[0].rules[0].conditions[0].value");
        assert!(body["message"].as_str().unwrap().contains(rule), "{body}");
    }
    let (status, body) = server
        .post("/v1/segments", &server.keys.server_key, &json!({ "name": "x", "rules": [{ "type": "SOME" }] }))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_type");
    assert_eq!(body["path"], "rules[0].type");

    let feature = json!({ "name": "checkout", "enabled": false, "value": "v1",
        "variants": [{ "key": "blue", "value": "v2-blue", "weight": 60 }, { "key": "green", "value": "v2-green", "weight": 50 }] });
    let (status, body) = server.post("/v1/features", &server.keys.server_key, &feature).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_feature");
    assert_eq!(body["path"], "variants");
    let dangling = json!({ "name": "checkout", "segment_overrides": [{ "segment_id": 424242, "enabled": true }] });
    let (status, body) = server.post("/v1/features", &server.keys.server_key, &dangling).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_feature");
    assert_eq!(body["path"], "segment_overrides[0].segment_id");

    let created = server
        .create(
            "/v1/features",
            json!({ "name": "checkout", "value": "v1",
                "segment_overrides": [{ "segment_id": segment["id"], "priority": 1, "enabled": true, "value": "v2" }] }),
        )
        .await;
    let (status, listed) = server.get("/v1/features", &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["features"][0]["id"], created["id"]);
    let path = format!("/v1/segments/{}", segment["id"]);
    let (status, body) = server.send(Method::DELETE, &path, &server.keys.server_key, None).await;
    assert_error(status, &body, StatusCode::CONFLICT, "segment_in_use");
    let (status, _) =
        server.send(Method::DELETE, &format!("/v1/features/{}", created["id"]), &server.keys.server_key, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.send(Method::DELETE, &path, &server.keys.server_key, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server.get(&path, &server.keys.server_key).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = server.get("/v1/segments/abc", &server.keys.server_key).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_type");
}

#[tokio::test]
async fn evaluation_stores_traits_then_uses_the_full_trait_set_with_overrides_in_order() {
    let server = TestServer::start().await;
    let segment = server.create("/v1/segments", pro_segment()).await;
    let feature = server
        .create(
            "/v1/features",
            json!({ "name": "checkout", "enabled": false, "value": "v1",
                "segment_overrides": [{ "segment_id": segment["id"], "priority": 1, "enabled": true, "value": "v2" }] }),
        )
        .await;
    server.create("/v1/features", json!({ "name": "banner", "enabled": true, "value": 3 })).await;

    // Defaults with no identity; client keys may read them.
    let (status, defaults) = server.get("/v1/flags", &server.keys.client_key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (flag(&defaults, "checkout")["enabled"].clone(), flag(&defaults, "checkout")["value"].clone()),
        (json!(false), json!("v1"))
    );
    assert_eq!(flag(&defaults, "banner")["value"], 3);

    // Traits sent are stored first; evaluation sees them together with the ones stored before.
    server.identify(json!({ "distinct_id": "ada", "traits": { "app_version": "2.1.0" } })).await;
    let answer = server.flags_for(json!({ "distinct_id": "ada", "traits": { "plan": "pro" } })).await;
    assert_eq!(flag(&answer, "checkout")["value"], "v2");
    assert_eq!(flag(&answer, "checkout")["reason"], "TARGETING_MATCH; segment=pro users");
    assert_eq!(answer["segments"], json!([{ "id": segment["id"], "name": "pro users" }]));
    assert_eq!(server.profile_of_user("ada").await["traits"]["plan"], "pro");

    // Transient traits count for this evaluation only.
    let answer =
        server.flags_for(json!({ "distinct_id": "ada", "transient_traits": { "app_version": "1.0.0" } })).await;
    assert_eq!(flag(&answer, "checkout")["value"], "v1");
    assert_eq!(server.profile_of_user("ada").await["traits"]["app_version"], "2.1.0");
    let answer = server.flags_for(json!({ "distinct_id": "ada" })).await;
    assert_eq!(flag(&answer, "checkout")["value"], "v2", "stored traits alone still match");

    // An identity override beats the segment override; only the server key sets it.
    let profile_id = answer["profile_id"].as_str().unwrap().to_owned();
    let override_path = format!("/v1/features/{}/overrides/{profile_id}", feature["id"]);
    let body = json!({ "enabled": false, "value": "mine" });
    let (status, refused) = server.send(Method::PUT, &override_path, &server.keys.client_key, Some(body.clone())).await;
    assert_error(status, &refused, StatusCode::FORBIDDEN, "forbidden");
    let (status, _) = server.send(Method::PUT, &override_path, &server.keys.server_key, Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    let answer = server.flags_for(json!({ "distinct_id": "ada" })).await;
    assert_eq!(
        (flag(&answer, "checkout")["enabled"].clone(), flag(&answer, "checkout")["value"].clone()),
        (json!(false), json!("mine"))
    );
    assert_eq!(flag(&answer, "checkout")["reason"], "IDENTITY_OVERRIDE");
    let other =
        server.flags_for(json!({ "distinct_id": "bob", "traits": { "plan": "pro", "app_version": "3.0.0" } })).await;
    assert_eq!(flag(&other, "checkout")["value"], "v2", "the override is ada's alone");
    let (status, _) = server.send(Method::DELETE, &override_path, &server.keys.server_key, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(flag(&server.flags_for(json!({ "distinct_id": "ada" })).await, "checkout")["value"], "v2");

    // Bad input names the field.
    let (status, body) = server
        .post("/v1/flags", &server.keys.client_key, &json!({ "distinct_id": "ada", "transient_traits": 3 }))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_type");
    assert_eq!(body["path"], "transient_traits");
    let (status, body) =
        server.post("/v1/flags", &server.keys.client_key, &json!({ "distinct_id": "ada", "trait": {} })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "unknown_field");
}

#[tokio::test]
async fn the_environment_document_carries_features_segments_and_overrides_for_the_server_key() {
    let server = TestServer::start().await;
    let segment = server.create("/v1/segments", pro_segment()).await;
    let feature = server
        .create(
            "/v1/features",
            json!({ "name": "checkout", "value": "v1",
                "variants": [{ "key": "blue", "value": "b", "weight": 50 }],
                "segment_overrides": [{ "segment_id": segment["id"], "priority": 0, "enabled": true, "value": "v2" }] }),
        )
        .await;
    let profile_id = server.identify(json!({ "distinct_id": "ada" })).await["profile_id"].as_str().unwrap().to_owned();
    server
        .send(
            Method::PUT,
            &format!("/v1/features/{}/overrides/{profile_id}", feature["id"]),
            &server.keys.server_key,
            Some(json!({ "enabled": true, "value": "mine" })),
        )
        .await;
    let (status, body) = server.get("/v1/environment-document", &server.keys.client_key).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, document) = server.get("/v1/environment-document", &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(document["api_key"], server.keys.client_key);
    assert_eq!(document["feature_states"][0]["feature"]["name"], "checkout");
    assert_eq!(document["feature_states"][0]["django_id"], feature["id"]);
    assert_eq!(document["feature_states"][0]["multivariate_feature_state_values"][0]["percentage_allocation"], 50.0);
    assert_eq!(document["project"]["segments"][0]["rules"][0]["conditions"][0]["property_"], "plan");
    assert_eq!(document["project"]["segments"][0]["feature_states"][0]["feature_segment"]["priority"], 0);
    assert_eq!(document["identity_overrides"][0]["identifier"], "ada");
    assert_eq!(document["identity_overrides"][0]["identity_features"][0]["feature_state_value"], "mine");
}

#[tokio::test]
async fn memberships_are_computed_for_existing_profiles_and_follow_trait_changes() {
    let server = TestServer::start().await;
    for (user, plan) in [("ada", "pro"), ("bob", "free"), ("cy", "pro")] {
        server.identify(json!({ "distinct_id": user, "traits": { "plan": plan, "app_version": "2.0.0" } })).await;
    }
    let segment = server.create("/v1/segments", pro_segment()).await;
    let ready = server.memberships_ready(&segment["id"]).await;
    assert_eq!(ready["membership"]["profiles_processed"], 3);
    let members_path = format!("/v1/segments/{}/members", segment["id"]);
    let (status, members) = server.get(&members_path, &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK, "{members}");
    assert_eq!(members["total"], 2);
    let (_, first_page) = server.get(&format!("{members_path}?limit=1"), &server.keys.server_key).await;
    assert_eq!(first_page["members"].as_array().unwrap().len(), 1);
    assert!(first_page["next_after"].is_string());

    // Leaving and joining are recorded as they happen.
    server.identify(json!({ "distinct_id": "ada", "traits": { "plan": "free" } })).await;
    server.identify(json!({ "distinct_id": "bob", "traits": { "plan": "pro" } })).await;
    let (_, members) = server.get(&members_path, &server.keys.server_key).await;
    let mut current: Vec<&str> =
        members["members"].as_array().unwrap().iter().map(|member| member["distinct_id"].as_str().unwrap()).collect();
    current.sort_unstable();
    assert_eq!(current, vec!["bob", "cy"]);
    let history = server
        .sql("SELECT distinct_id, exited_at IS NOT NULL FROM segment_memberships WHERE distinct_id = 'ada'")
        .await;
    assert_eq!(history["rows"], json!([["ada", 1]]));

    // Editing the segment recomputes everyone.
    let everyone = json!({ "name": "pro users", "rules": [{ "type": "ALL", "conditions": [{ "property": "plan", "operator": "IS_SET" }] }] });
    let (status, _) = server
        .send(Method::PUT, &format!("/v1/segments/{}", segment["id"]), &server.keys.server_key, Some(everyone))
        .await;
    assert_eq!(status, StatusCode::OK);
    server.memberships_ready(&segment["id"]).await;
    let (_, members) = server.get(&members_path, &server.keys.server_key).await;
    assert_eq!(members["total"], 3);
}

/// Remote evaluation (`POST /v1/flags`) and local evaluation by Flagsmith's Python SDK from the
/// environment document give every identity the same flags, variants and segments.
#[tokio::test]
async fn local_evaluation_from_the_environment_document_matches_remote_evaluation() {
    let Ok(python) = std::env::var("ROSTER_FLAG_ENGINE_PYTHON") else {
        crate::common::skipped(
            "local_evaluation_from_the_environment_document_matches_remote_evaluation",
            "set ROSTER_FLAG_ENGINE_PYTHON (.ci/run does)",
        );
        return;
    };
    let server = TestServer::start().await;
    let pro = server.create("/v1/segments", pro_segment()).await;
    let half = server
        .create(
            "/v1/segments",
            json!({ "name": "half", "rules": [{ "type": "ALL", "conditions": [{ "operator": "PERCENTAGE_SPLIT", "value": "50" }] }] }),
        )
        .await;
    let numbers = server
        .create(
            "/v1/segments",
            json!({ "name": "numbers", "rules": [{ "type": "ANY", "conditions": [
                { "property": "seats", "operator": "MODULO", "value": "2|0" },
                { "property": "country", "operator": "IN", "value": ["fr", "de"] },
                { "property": "email", "operator": "REGEX", "value": ".*@example\\.com" }] }] }),
        )
        .await;
    let checkout = server
        .create(
            "/v1/features",
            json!({ "name": "checkout", "value": "v1",
                "variants": [{ "key": "blue", "value": "b", "weight": 30 }, { "key": "green", "value": "g", "weight": 30 }],
                "segment_overrides": [
                    { "segment_id": pro["id"], "priority": 2, "enabled": true, "value": "pro" },
                    { "segment_id": numbers["id"], "priority": 1, "enabled": true, "value": "numbers" }] }),
        )
        .await;
    server
        .create(
            "/v1/features",
            json!({ "name": "banner", "enabled": true, "value": 7,
                "segment_overrides": [{ "segment_id": half["id"], "enabled": false, "value": 0 }] }),
        )
        .await;

    const COUNTRIES: [&str; 4] = ["fr", "us", "de", "jp"];
    let mut identities = Vec::new();
    let mut remote = Vec::new();
    for number in 0..40 {
        let identifier = format!("user-{number}");
        let traits = json!({
            "plan": if number % 3 == 0 { "pro" } else { "free" },
            "app_version": if number % 2 == 0 { "2.1.0" } else { "1.9.9" },
            "seats": number,
            "country": COUNTRIES[number % 4],
            "email": format!("{identifier}@{}", if number % 5 == 0 { "example.com" } else { "test.org" }),
        });
        let answer = server.flags_for(json!({ "distinct_id": identifier, "traits": traits })).await;
        if number == 7 {
            let path = format!("/v1/features/{}/overrides/{}", checkout["id"], answer["profile_id"].as_str().unwrap());
            let (status, _) = server
                .send(Method::PUT, &path, &server.keys.server_key, Some(json!({ "enabled": false, "value": "seven" })))
                .await;
            assert_eq!(status, StatusCode::OK);
        }
        identities.push(json!({ "identifier": identifier, "traits": traits }));
    }
    // With the server key, which hears every segment the identity is in (a client key hears
    // only the segments that decided a flag).
    for identity in &identities {
        let (status, answer) =
            server.post("/v1/flags", &server.keys.server_key, &json!({ "distinct_id": identity["identifier"] })).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        remote.push(answer);
    }
    let (_, document) = server.get("/v1/environment-document", &server.keys.server_key).await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/local_evaluation.py");
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    let request = json!({ "document": document, "identities": identities }).to_string();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), request.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "local evaluation failed: {}", String::from_utf8_lossy(&output.stderr));
    let local: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();

    let mut variants = 0;
    for ((identity, remote), local) in identities.iter().zip(&remote).zip(&local) {
        for remote_flag in remote["flags"].as_array().unwrap() {
            let name = remote_flag["feature"].as_str().unwrap();
            let expected = json!({ "enabled": remote_flag["enabled"], "value": remote_flag["value"], "variant": remote_flag["variant"] });
            assert_eq!(local["flags"][name], expected, "{} {name}", identity["identifier"]);
            variants += usize::from(remote_flag["variant"].as_str().is_some_and(|variant| variant != "control"));
        }
        let remote_segments: Vec<&Value> =
            remote["segments"].as_array().unwrap().iter().map(|segment| &segment["name"]).collect();
        assert_eq!(json!(remote_segments), local["segments"], "{}", identity["identifier"]);
    }
    assert!(variants > 0, "some identities must fall in a variant");
    assert_eq!(flag(&remote[7], "checkout")["value"], "seven");
}
