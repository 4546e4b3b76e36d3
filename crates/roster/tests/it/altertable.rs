//! Altertable's Python SDK against Roster's native endpoints (`/identify`, `/track`, `/alias`
//! with `X-API-Key`).

use serde_json::{Value, json};

use crate::common::{TestServer, skipped};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altertable_python_sdk_works_unchanged_against_roster() {
    let Ok(python) = std::env::var("ROSTER_FLAG_ENGINE_PYTHON") else {
        skipped("altertable_python_sdk_works_unchanged_against_roster", "set ROSTER_FLAG_ENGINE_PYTHON (.ci/run does)");
        return;
    };
    let server = TestServer::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/altertable_sdk.py");
    let output = tokio::process::Command::new(&python)
        .args([script, &server.base_url, &server.keys.client_key, "development"])
        .output()
        .await
        .expect("run the Altertable SDK script");
    assert!(output.status.success(), "script failed: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from the script");
    assert_eq!(seen["errors"], json!([]), "the SDK raised errors");

    let profile = server.profile_of_user("u-alt").await;
    assert_eq!(profile["traits"], json!({ "email": "alt@example.com", "plan": "team" }));
    assert!(profile["anonymous_ids"].as_array().unwrap().contains(&json!("anon-alt")), "alias linked the earlier id");
    let events = server.sql("SELECT event, distinct_id FROM events ORDER BY timestamp").await;
    assert_eq!(events["rows"], json!([["Viewed Pricing", "u-alt"], ["Checkout", "u-alt"]]));
}
