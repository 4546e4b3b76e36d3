//! Segment's HTTP tracking API, driven by Segment's own Python library and by hand.

use std::io::Write;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, skipped};

/// Segment's own Python library and RudderStack's fork of it, unchanged but for the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_and_rudderstack_python_libraries_work_unchanged_against_roster() {
    let Ok(python) = std::env::var("ROSTER_FLAG_ENGINE_PYTHON") else {
        skipped(
            "segment_and_rudderstack_python_libraries_work_unchanged_against_roster",
            "set ROSTER_FLAG_ENGINE_PYTHON (.ci/run does)",
        );
        return;
    };
    let server = TestServer::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/segment_libraries.py");
    for library in ["segment", "rudder"] {
        let output = tokio::process::Command::new(&python)
            .args([script, library, &server.base_url, &server.keys.client_key, library])
            .output()
            .await
            .expect("run the library script");
        assert!(output.status.success(), "{library} script failed: {}", String::from_utf8_lossy(&output.stderr));
        let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from the script");
        assert_eq!(seen["errors"], json!([]), "{library} reported errors");

        let (user, anonymous) = (format!("{library}-user"), format!("{library}-anon"));
        let profile = server.profile_of_user(&user).await;
        assert_eq!(
            profile["traits"],
            json!({ "email": format!("{library}@example.com"), "plan": "team" }),
            "{library}"
        );
        assert!(
            profile["anonymous_ids"].as_array().unwrap().contains(&json!(anonymous)),
            "{library}: anonymous session linked at login"
        );
        let events = server
            .sql(&format!(
                "SELECT event, properties->>'tier', properties->>'name' FROM events WHERE distinct_id = '{user}' ORDER BY timestamp"
            ))
            .await;
        assert_eq!(
            events["rows"],
            json!([["Viewed Pricing", "pro", null], ["Checkout", null, null], ["page", null, "Home"]]),
            "{library}"
        );
    }
}

fn gzip(body: &Value) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body.to_string().as_bytes()).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn segment_batches_authenticate_correct_clock_skew_and_keep_their_limits() {
    let server = TestServer::start().await;
    let basic = format!("Basic {}", base64_encode(&format!("{}:", server.keys.client_key)));
    // sentAt one hour ahead of the server: the device clock is fast, the timestamps are moved back.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    let hour = 3_600_000_000i64;
    let stamp = |micros: i64| roster_core::Timestamp::from_micros(micros).to_rfc3339();
    let batch = json!({ "sentAt": stamp(now + hour), "batch": [
        { "type": "identify", "userId": "skewed", "traits": { "plan": "pro" }, "timestamp": stamp(now + hour - 60_000_000), "messageId": "m1" },
        { "type": "track", "userId": 42, "event": "Numbers Are Ids Too", "messageId": "m2" },
        { "type": "group", "userId": "skewed", "groupId": "acme", "traits": { "seats": 10 } },
    ] });
    let response = server
        .http
        .post(server.url("/v1/batch"))
        .header("Authorization", &basic)
        .header("Content-Type", "text/plain")
        .body(gzip(&batch))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    let profile = server.profile_of_user("skewed").await;
    let stored = profile["trait_timestamps"]["plan"].as_str().unwrap().to_owned();
    let stored = roster_core::Timestamp::parse_rfc3339(&stored, "").unwrap().as_micros();
    assert!((stored - (now - 60_000_000)).abs() < 30_000_000, "corrected for the fast clock: {stored} vs {now}");
    assert_eq!(server.profile_of_user("42").await["identified"], false);
    let group = server.sql("SELECT properties->>'group_id' FROM events WHERE event = 'group'").await;
    assert_eq!(group["rows"], json!([["acme"]]));

    // writeKey in the body; resending a messageId applies it once.
    let single = json!({ "writeKey": server.keys.client_key, "userId": "skewed", "traits": { "plan": "free" }, "messageId": "m1" });
    let (status, body) = server.post_raw("/v1/identify", "", single.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(server.profile_of_user("skewed").await["traits"]["plan"], "pro", "messageId m1 was already applied");

    // Limits and bad input: 400s naming the message and field.
    let huge = json!({ "writeKey": server.keys.client_key, "userId": "u", "traits": { "blob": "x".repeat(40_000) } });
    let (status, body) = server.post_raw("/v1/identify", "", huge.to_string()).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "payload_too_large");
    // In a batch each bad message is refused alone, named in a 200 answer (Segment's libraries
    // would drop a 400 whole, valid messages too).
    let bad = json!({ "writeKey": server.keys.client_key, "batch": [{ "type": "track", "userId": "u" }, { "type": "launch" }] });
    let (status, body) = server.post_raw("/v1/batch", "", bad.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rejected"], 2);
    assert_eq!(body["rejections"][0]["code"], "missing_event_name");
    assert_eq!(body["rejections"][0]["path"], "batch[0].event");
    assert_eq!(body["rejections"][1]["code"], "invalid_type");
    assert_eq!(body["rejections"][1]["path"], "batch[1].type");
    let (status, body) = server.post_raw("/v1/track", "", json!({ "userId": "u", "event": "E" }).to_string()).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "missing_api_key");
}

fn base64_encode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn segment_identify_reads_context_traits_and_original_timestamps() {
    let server = TestServer::start().await;
    let basic = format!("Basic {}", base64_encode(&format!("{}:", server.keys.client_key)));
    // analytics.js puts traits in `context.traits` on some calls and sends `originalTimestamp`.
    let message = json!({ "userId": "ctx", "context": { "traits": { "plan": "pro" } },
        "originalTimestamp": "2026-01-02T03:04:05.000Z" });
    let response = server
        .http
        .post(server.url("/v1/identify"))
        .header("Authorization", &basic)
        .json(&message)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let profile = server.profile_of_user("ctx").await;
    assert_eq!(profile["traits"], json!({ "plan": "pro" }));
    assert_eq!(profile["trait_timestamps"]["plan"], "2026-01-02T03:04:05Z");
}
