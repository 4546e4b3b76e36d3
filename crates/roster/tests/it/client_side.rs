//! What browsers and apps meet: CORS per environment, analytics.js' short paths and `text/plain`
//! bodies, batches that keep their valid messages (and log the refused ones), and Customer.io
//! Data Pipelines' semantic events acting on devices and people.

use reqwest::StatusCode;
use reqwest::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
};
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, read};

/// Every path a client key may call from a browser.
const CLIENT_PATHS: &[&str] = &[
    "/identify",
    "/track",
    "/alias",
    "/v1/flags",
    "/v1/identify",
    "/v1/track",
    "/v1/page",
    "/v1/screen",
    "/v1/group",
    "/v1/alias",
    "/v1/batch",
    "/v1/i",
    "/v1/t",
    "/v1/p",
    "/v1/s",
    "/v1/g",
    "/v1/a",
    "/v1/b",
    "/api/v1/flags/",
    "/api/v1/identities/",
    "/api/v1/traits/",
    "/api/v1/traits/bulk/",
];

async fn preflight(server: &TestServer, path: &str, origin: &str) -> reqwest::Response {
    server
        .http
        .request(reqwest::Method::OPTIONS, server.url(path))
        .header(ORIGIN, origin)
        .header(ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(ACCESS_CONTROL_REQUEST_HEADERS, "authorization,content-type,x-environment-key,flagsmith-sdk-user-agent")
        .send()
        .await
        .expect("preflight sent")
}

fn allow_origin(response: &reqwest::Response) -> Option<String> {
    response.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).map(|value| value.to_str().unwrap().to_owned())
}

async fn set_allowed_origins(server: &TestServer, origins: Value) {
    let (status, body) = server
        .send(
            reqwest::Method::PATCH,
            "/v1/admin/environments/development",
            &server.admin_token,
            Some(json!({ "settings": { "allowed_origins": origins } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn client_paths_answer_preflights_for_allowed_origins_only() {
    let server = TestServer::start().await;
    let page = "http://localhost:5173";
    for path in CLIENT_PATHS {
        let response = preflight(&server, path, page).await;
        assert!(response.status().is_success(), "{path}: {}", response.status());
        assert_eq!(allow_origin(&response).as_deref(), Some(page), "{path}");
        let headers = response.headers()[ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap().to_ascii_lowercase();
        for needed in ["authorization", "content-type", "x-api-key", "x-environment-key", "flagsmith-sdk-user-agent"] {
            assert!(headers.contains(needed), "{path} does not allow {needed}: {headers}");
        }
        assert!(response.headers().contains_key(ACCESS_CONTROL_MAX_AGE), "{path}: preflight not cacheable");
    }

    // Restricted to one origin: others get no CORS headers and their requests do nothing.
    set_allowed_origins(&server, json!(["https://app.example.com"])).await;
    let refused = preflight(&server, "/identify", "https://evil.example").await;
    assert_eq!(allow_origin(&refused), None);
    let allowed = preflight(&server, "/identify", "https://app.example.com").await;
    assert_eq!(allow_origin(&allowed).as_deref(), Some("https://app.example.com"));
    let response = server
        .http
        .post(server.url("/identify"))
        .header(ORIGIN, "https://evil.example")
        .header("X-API-Key", &server.keys.client_key)
        .json(&json!({ "user_id": "from-evil" }))
        .send()
        .await
        .unwrap();
    assert_eq!(allow_origin(&response), None);
    let (status, body) = read(response).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "origin_not_allowed");
    let response = server
        .http
        .post(server.url("/v1/t"))
        .header(ORIGIN, "https://evil.example")
        .header("Content-Type", "text/plain")
        .body(json!({ "writeKey": server.keys.client_key, "userId": "from-evil", "event": "E" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = server
        .http
        .post(server.url("/identify"))
        .header(ORIGIN, "https://app.example.com")
        .header("X-API-Key", &server.keys.client_key)
        .json(&json!({ "user_id": "from-app" }))
        .send()
        .await
        .unwrap();
    assert_eq!(allow_origin(&response).as_deref(), Some("https://app.example.com"));
    assert_eq!(response.status(), StatusCode::OK);
    let stored = server.sql("SELECT distinct_id FROM identities ORDER BY distinct_id").await;
    assert_eq!(stored["rows"], json!([["from-app"]]), "a refused origin's request wrote nothing");

    // No origin at all: nothing cross-origin.
    set_allowed_origins(&server, json!([])).await;
    assert_eq!(allow_origin(&preflight(&server, "/identify", "https://app.example.com").await), None);
    // Servers and apps send no Origin and are not affected.
    server.identify(json!({ "user_id": "from-a-server" })).await;
}

#[tokio::test]
async fn server_key_and_admin_endpoints_stay_same_origin() {
    let server = TestServer::start().await;
    for path in ["/v1/query", "/v1/profiles", "/v1/segments", "/v1/admin/environments", "/v1/rejections"] {
        let response = preflight(&server, path, "http://localhost:5173").await;
        assert_eq!(allow_origin(&response), None, "{path} answered a cross-origin preflight");
    }
    let response = server
        .http
        .get(server.url("/v1/profiles"))
        .header(ORIGIN, "http://localhost:5173")
        .header("X-API-Key", &server.keys.server_key)
        .send()
        .await
        .unwrap();
    assert_eq!(allow_origin(&response), None, "a server-key answer readable cross-origin");
}

#[tokio::test]
async fn analytics_js_short_paths_take_text_plain_bodies_with_the_write_key_inside() {
    let server = TestServer::start().await;
    let key = server.keys.client_key.clone();
    let send = |path: &'static str, body: Value| {
        let request = server
            .http
            .post(server.url(path))
            .header(ORIGIN, "http://localhost:5173")
            .header("Content-Type", "text/plain;charset=UTF-8")
            .body(body.to_string());
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(allow_origin(&response).as_deref(), Some("http://localhost:5173"), "{path}");
            let (status, body) = read(response).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
        }
    };
    send("/v1/p", json!({ "writeKey": key, "anonymousId": "anon-js", "name": "Home", "properties": { "path": "/" } }))
        .await;
    send(
        "/v1/t",
        json!({ "writeKey": key, "anonymousId": "anon-js", "event": "Viewed Pricing",
                "context": { "page": { "path": "/pricing" }, "userAgent": "test-agent" } }),
    )
    .await;
    send(
        "/v1/i",
        json!({ "writeKey": key, "anonymousId": "anon-js", "userId": "js-user", "traits": { "plan": "pro" } }),
    )
    .await;
    send("/v1/g", json!({ "writeKey": key, "userId": "js-user", "groupId": "acme" })).await;
    send("/v1/b", json!({ "writeKey": key, "batch": [{ "type": "track", "userId": "js-user", "event": "Batched" }] }))
        .await;
    let events =
        server.sql("SELECT event FROM events WHERE distinct_id = 'js-user' ORDER BY timestamp, event_id").await;
    assert_eq!(
        events["rows"],
        json!([["page"], ["Viewed Pricing"], ["group"], ["Batched"]]),
        "pre-login events linked"
    );
    assert_eq!(server.profile_of_user("js-user").await["traits"]["plan"], "pro");
    // A track keeps its context, in SQL and in the timeline.
    let context = server.sql("SELECT context ->> '$.page.path' FROM events WHERE event = 'Viewed Pricing'").await;
    assert_eq!(context["rows"], json!([["/pricing"]]));
    let profile_id = server.profile_of_user("js-user").await["profile_id"].as_str().unwrap().to_owned();
    let (_, timeline) = server.get(&format!("/v1/profiles/{profile_id}/events"), &server.keys.server_key).await;
    let viewed =
        timeline["events"].as_array().unwrap().iter().find(|event| event["event"] == "Viewed Pricing").unwrap();
    assert_eq!(viewed["context"]["userAgent"], "test-agent");
}

#[tokio::test]
async fn a_batch_keeps_its_valid_messages_and_logs_the_refused_one() {
    let server = TestServer::start().await;
    let mut batch: Vec<Value> = (0..500)
        .map(|index| json!({ "type": "track", "userId": format!("u{index}"), "event": "Bought", "messageId": format!("m{index}") }))
        .collect();
    batch[137] = json!({ "type": "track", "userId": "u137", "event": "Bought", "messageId": "m137",
        "properties": { "blob": "x".repeat(40 * 1024) } });
    let body = json!({ "writeKey": server.keys.client_key, "batch": batch });
    let (status, answer) = server.post_raw("/v1/batch", "", body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "Segment's libraries must not drop or retry the valid 499: {answer}");
    assert_eq!(answer["rejected"], 1);
    assert_eq!(answer["rejections"][0]["path"], "batch[137]");
    assert_eq!(answer["rejections"][0]["code"], "payload_too_large");
    assert_eq!(server.sql("SELECT count(*) FROM events").await["rows"], json!([[499]]));

    let (status, log) = server.get("/v1/rejections", &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK, "{log}");
    let entry = &log["rejections"][0];
    assert_eq!(entry["dialect"], "segment");
    assert_eq!(entry["endpoint"], "/v1/batch");
    assert_eq!(entry["path"], "batch[137]");
    assert_eq!(entry["message_id"], "m137");
    assert_eq!(entry["code"], "payload_too_large");
    assert!(entry["payload"].as_str().unwrap().len() < 4 * 1024, "the copy is cut");
    let (status, _) = server.get("/v1/rejections", &server.keys.client_key).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the log is the server key's");

    // The native dialect logs its refusals too.
    let (status, _) = server
        .post(
            "/track",
            &server.keys.client_key,
            &json!([{ "distinct_id": "ok", "event": "Fine" }, { "distinct_id": "bad", "message_id": "n1" }]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, log) = server.get("/v1/rejections?limit=1", &server.keys.server_key).await;
    assert_eq!(log["rejections"][0]["dialect"], "native");
    assert_eq!(log["rejections"][0]["path"], "[1].event");
    assert_eq!(log["rejections"][0]["message_id"], "n1");
    assert!(log["next_before"].is_i64(), "{log}");
}

/// Posts a Segment-shaped batch (Customer.io Data Pipelines' wire format) with `key`.
async fn cdp_batch(server: &TestServer, key: &str, messages: Value) -> Value {
    let body = json!({ "batch": messages });
    let response = server
        .http
        .post(server.url("/v1/batch"))
        .basic_auth(key, Some(""))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let (status, answer) = read(response).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

#[tokio::test]
async fn customerio_data_pipelines_semantic_events_act_on_devices_and_people() {
    let server = TestServer::start().await;
    let client_key = server.keys.client_key.clone();
    let device_context = json!({ "device": { "token": "apns-1", "type": "ios", "model": "iPhone15,2" },
        "network": { "cellular": true }, "app": { "version": "2.3.0" } });
    let answer = cdp_batch(
        &server,
        &client_key,
        json!([
            { "type": "identify", "userId": "cio-user", "traits": { "email": "cio@example.com" } },
            { "type": "track", "userId": "cio-user", "event": "Device Created or Updated",
              "context": device_context, "properties": { "push_enabled": true, "prefs": { "quiet_hours": [22, 7] } } },
        ]),
    )
    .await;
    assert!(answer.get("rejections").is_none(), "{answer}");
    let profile = server.profile_of_user("cio-user").await;
    let device = &profile["devices"][0];
    assert_eq!(device["token"], "apns-1");
    assert_eq!(device["platform"], "ios");
    assert_eq!(device["attributes"]["network_cellular"], true, "context flattened: {device}");
    assert_eq!(device["attributes"]["app_version"], "2.3.0");
    assert_eq!(device["attributes"]["push_enabled"], true);
    assert_eq!(device["attributes"]["prefs"], json!({ "quiet_hours": [22, 7] }), "custom attributes keep nesting");
    let first_used = device["last_used"].as_str().unwrap().to_owned();
    let events = server.sql("SELECT count(*) FROM events").await;
    assert_eq!(events["rows"], json!([[0]]), "a device event is not an ordinary event");

    // Any message with the device's token refreshes its last use.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    cdp_batch(
        &server,
        &client_key,
        json!([{ "type": "track", "userId": "cio-user", "event": "Opened App", "context": { "device": { "token": "apns-1" } } }]),
    )
    .await;
    let refreshed = server.profile_of_user("cio-user").await["devices"][0]["last_used"].as_str().unwrap().to_owned();
    assert!(refreshed > first_used, "{refreshed} vs {first_used}");

    // Deleting someone else's device by token does nothing; the owner's own call removes it.
    server.identify(json!({ "user_id": "someone-else" })).await;
    cdp_batch(
        &server,
        &client_key,
        json!([{ "type": "track", "userId": "someone-else", "event": "Device Deleted", "context": { "device": { "token": "apns-1" } } }]),
    )
    .await;
    assert_eq!(server.profile_of_user("cio-user").await["devices"].as_array().unwrap().len(), 1);
    cdp_batch(
        &server,
        &client_key,
        json!([{ "type": "track", "userId": "cio-user", "event": "Device Deleted", "context": { "device": { "token": "apns-1" } } }]),
    )
    .await;
    assert_eq!(server.profile_of_user("cio-user").await["devices"], json!([]));

    // People are the server key's to erase or suppress; a client key is refused, by message.
    let refused = cdp_batch(
        &server,
        &client_key,
        json!([{ "type": "track", "userId": "cio-user", "event": "User Deleted" },
               { "type": "track", "userId": "cio-user", "event": "User Suppressed" }]),
    )
    .await;
    assert_eq!(refused["rejected"], 2, "{refused}");
    assert_eq!(refused["rejections"][0]["code"], "forbidden");
    server.profile_of_user("cio-user").await;
    let server_key = server.keys.server_key.clone();
    cdp_batch(&server, &server_key, json!([{ "type": "track", "userId": "quiet-one", "event": "User Suppressed" }]))
        .await;
    let (_, dropped) = server.post("/identify", &server_key, &json!({ "user_id": "quiet-one" })).await;
    assert_eq!(dropped["results"][0]["suppressed"], true);
    cdp_batch(&server, &server_key, json!([{ "type": "track", "userId": "quiet-one", "event": "User Unsuppressed" }]))
        .await;
    let (_, kept) = server.post("/identify", &server_key, &json!({ "user_id": "quiet-one" })).await;
    assert!(kept["results"][0].get("suppressed").is_none(), "{kept}");
    cdp_batch(&server, &server_key, json!([{ "type": "track", "userId": "cio-user", "event": "User Deleted" }])).await;
    let (_, gone) = server.get("/v1/profiles?user_id=cio-user", &server_key).await;
    assert_eq!(gone["profiles"], json!([]), "erased");
}

#[tokio::test]
async fn flagsmith_bulk_identities_store_every_valid_identity_and_log_the_refused_one() {
    let server = TestServer::start().await;
    let body = json!({ "data": [
        { "identifier": "bulk-1", "traits": [{ "trait_key": "plan", "trait_value": "pro" }] },
        { "identifier": "bulk-2", "traits": [{ "trait_key": "", "trait_value": "no key" }] },
        { "identifier": "bulk-3", "traits": [{ "trait_key": "plan", "trait_value": "team" }] },
        { "identifier": "bulk-4", "traits": "not a list" },
    ] });
    let (status, answer) = server.post("/api/v1/bulk-identities/", &server.keys.server_key, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["path"], "data[1].traits[0].trait_key");
    assert_eq!(server.profile_of_user("bulk-1").await["traits"]["plan"], "pro");
    assert_eq!(server.profile_of_user("bulk-3").await["traits"]["plan"], "team", "identities after a refused one");
    let (_, log) = server.get("/v1/rejections", &server.keys.server_key).await;
    let paths: Vec<&str> =
        log["rejections"].as_array().unwrap().iter().map(|entry| entry["path"].as_str().unwrap()).collect();
    assert_eq!(paths.len(), 2, "{log}");
    assert!(paths.iter().any(|path| path.starts_with("data[3]")), "{paths:?}");
    assert_eq!(log["rejections"][0]["dialect"], "flagsmith");
}

#[tokio::test]
async fn erasing_a_person_removes_the_refused_messages_that_name_them() {
    let server = TestServer::start().await;
    server.identify(json!({ "user_id": "pii-person", "anonymous_id": "pii-device" })).await;
    // Refused messages naming the person by user id and by anonymous id, and one about someone else.
    let (status, _) = server
        .post(
            "/track",
            &server.keys.client_key,
            &json!([{ "distinct_id": "pii-person" }, { "anonymous_id": "pii-device" }, { "distinct_id": "bystander" }]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, log) = server.get("/v1/rejections", &server.keys.server_key).await;
    assert_eq!(log["rejections"].as_array().unwrap().len(), 3);
    let (status, erased) =
        server.post("/v1/profiles/erase", &server.keys.server_key, &json!({ "user_id": "pii-person" })).await;
    assert_eq!(status, StatusCode::OK, "{erased}");
    let (_, log) = server.get("/v1/rejections", &server.keys.server_key).await;
    let left: Vec<&str> =
        log["rejections"].as_array().unwrap().iter().map(|entry| entry["payload"].as_str().unwrap()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains("bystander"));
}
