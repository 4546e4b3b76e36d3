//! Segment's and Flagsmith's Node SDKs (`@segment/analytics-node`, `flagsmith-nodejs`, from the
//! committed lockfile in `tests/node`, installed by `.ci/run` with `npm ci`) against Roster.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{TestServer, skipped};

/// The Node SDKs' directory once `npm ci` installed `package` there; otherwise the test says it
/// is skipped and gets `None`.
fn node_directory(test: &str, package: &str) -> Option<&'static str> {
    let directory = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node");
    if std::path::Path::new(directory).join(package).is_dir() {
        return Some(directory);
    }
    skipped(test, "run `npm ci` in crates/roster/tests/node (.ci/run does)");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_and_flagsmith_node_sdks_work_unchanged_against_roster() {
    let Some(directory) =
        node_directory("segment_and_flagsmith_node_sdks_work_unchanged_against_roster", "node_modules")
    else {
        return;
    };
    let server = TestServer::start().await;
    let segment = json!({ "name": "pro users", "rules": [{ "type": "ALL", "conditions": [
        { "property": "plan", "operator": "EQUAL", "value": "pro" }] }] });
    let (_, segment) = server.post("/v1/segments", &server.keys.server_key, &segment).await;
    let feature = json!({ "name": "checkout", "enabled": false, "value": "v1",
        "segment_overrides": [{ "segment_id": segment["id"], "enabled": true, "value": "v2" }] });
    let (status, feature) = server.post("/v1/features", &server.keys.server_key, &feature).await;
    assert_eq!(status, StatusCode::CREATED, "{feature}");
    let vip = server.identify(json!({ "distinct_id": "vip" })).await;
    let path = format!("/v1/features/{}/overrides/{}", feature["id"], vip["profile_id"].as_str().unwrap());
    server.send(Method::PUT, &path, &server.keys.server_key, Some(json!({ "enabled": true, "value": "mine" }))).await;

    let output = tokio::process::Command::new("node")
        .current_dir(directory)
        .args(["sdks.js", &server.base_url, &server.keys.client_key, &server.keys.server_key])
        .output()
        .await
        .expect("run node");
    assert!(output.status.success(), "node failed: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from node");
    assert_eq!(seen["segment_errors"], json!([]));
    let profile = server.profile_of_user("node-user").await;
    assert_eq!(profile["traits"], json!({ "email": "node@example.com", "plan": "team" }));
    assert!(profile["anonymous_ids"].as_array().unwrap().contains(&json!("node-anon")), "anonymous session linked");
    let events = server.sql("SELECT event FROM events WHERE distinct_id = 'node-user' ORDER BY timestamp").await;
    assert_eq!(events["rows"], json!([["Viewed Pricing"], ["Checkout"]]));

    let state = |enabled: bool, value: &str| json!({ "enabled": enabled, "value": value });
    let flags = &seen["flagsmith"];
    assert_eq!(flags["environment"], state(false, "v1"));
    assert_eq!(flags["pro"], state(true, "v2"));
    assert_eq!(flags["downgraded"], state(false, "v1"));
    assert_eq!(flags["vip"], state(true, "mine"));
    assert_eq!(flags["local_pro"], state(true, "v2"));
    assert_eq!(flags["local_vip"], state(true, "mine"));
    assert_eq!(server.profile_of_user("node-ada").await["traits"]["plan"], "free");
}

/// Customer.io's Node client. It speaks HTTPS only, so the script puts a TLS proxy with a
/// throwaway certificate in front of Roster (see `tests/node/customerio.js`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customerio_node_client_works_against_roster_behind_tls() {
    let Some(directory) = node_directory("customerio_node_client_works_against_roster_behind_tls", "node_modules")
    else {
        return;
    };
    let server = TestServer::start().await;
    let output = tokio::process::Command::new("node")
        .current_dir(directory)
        .env("NODE_TLS_REJECT_UNAUTHORIZED", "0")
        .args(["customerio.js", &server.base_url, "development", &server.keys.server_key])
        .output()
        .await
        .expect("run node");
    assert!(output.status.success(), "node failed: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from node");
    assert_eq!(seen["errors"], json!([]));
    let profile = server.profile_of_user("node-cio").await;
    assert_eq!(profile["traits"], json!({ "email": "node-cio@example.com", "plan": "team" }));
    assert!(profile["anonymous_ids"].as_array().unwrap().contains(&json!("node-cio-anon")));
    assert_eq!(profile["devices"][0]["token"], "fcm-node");
    assert_eq!(profile["devices"][0]["attributes"]["app_version"], "3.0");
    let events = server.sql("SELECT event FROM events WHERE distinct_id = 'node-cio' ORDER BY timestamp").await;
    assert_eq!(events["rows"], json!([["Viewed Pricing"], ["Checkout"]]));
}

/// Customer.io's Data Pipelines Node SDK (`@customerio/cdp-analytics-node`), pointed at Roster:
/// its semantic events register and delete devices, erase and suppress people.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customerio_data_pipelines_node_sdk_acts_on_devices_and_people() {
    let Some(directory) = node_directory(
        "customerio_data_pipelines_node_sdk_acts_on_devices_and_people",
        "node_modules/@customerio/cdp-analytics-node",
    ) else {
        return;
    };
    let server = TestServer::start().await;
    let output = tokio::process::Command::new("node")
        .current_dir(directory)
        .args(["cdp.js", &server.base_url, &server.keys.client_key, &server.keys.server_key])
        .output()
        .await
        .expect("run node");
    assert!(output.status.success(), "node failed: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from node");
    assert_eq!(seen["errors"], json!([]));
    let profile = server.profile_of_user("cdp-user").await;
    assert_eq!(profile["traits"]["plan"], "pro");
    let devices = profile["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "the deleted device is gone: {devices:?}");
    assert_eq!(devices[0]["token"], "fcm-node-1");
    assert_eq!(devices[0]["platform"], "android");
    assert_eq!(devices[0]["attributes"]["network_wifi"], true);
    assert_eq!(devices[0]["attributes"]["push_enabled"], true);
    assert!(devices[0]["last_used"].is_string());
    let events = server.sql("SELECT event FROM events WHERE distinct_id = 'cdp-user' ORDER BY timestamp").await;
    assert_eq!(events["rows"], json!([["Opened App"]]), "semantic events are not ordinary events");
    let (_, gone) = server.get("/v1/profiles?user_id=cdp-gone", &server.keys.server_key).await;
    assert_eq!(gone["profiles"], json!([]), "User Deleted erased the person");
    let (_, dropped) = server.post("/identify", &server.keys.server_key, &json!({ "user_id": "cdp-quiet" })).await;
    assert_eq!(dropped["results"][0]["suppressed"], true, "User Suppressed took effect");
}
