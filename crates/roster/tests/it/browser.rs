//! A real browser (Debian's chromium, driven by `playwright-core` from `tests/browser`, installed
//! by `.ci/run`) running Roster's own browser SDK and vendors' browser SDKs against Roster. The
//! pages come from another origin than Roster's, so every call crosses origins through the
//! server's own CORS answers. What the pages saw comes back as JSON; what Roster stored is read
//! with the server key.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, skipped};

const DIRECTORY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
const CHROMIUM: &str = "/usr/bin/chromium";

/// One browser at a time: the machine may have two cores.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether the browser tests can run here; says why not otherwise.
fn available(test: &str) -> bool {
    if !Path::new(DIRECTORY).join("node_modules").is_dir() {
        skipped(test, "run `npm ci` in crates/roster/tests/browser (.ci/run does)");
        return false;
    }
    if !Path::new(CHROMIUM).exists() {
        skipped(test, "install Debian's chromium (`apt-get install chromium`; .ci/run does)");
        return false;
    }
    true
}

/// The segment `plan = pro` and the feature `checkout` (off, "v1"; on, "v2" for that segment).
async fn checkout_flag(server: &TestServer) {
    let segment = json!({ "name": "pro users", "rules": [{ "type": "ALL", "conditions": [
        { "property": "plan", "operator": "EQUAL", "value": "pro" }] }] });
    let (status, segment) = server.post("/v1/segments", &server.keys.server_key, &segment).await;
    assert_eq!(status, StatusCode::CREATED, "{segment}");
    let feature = json!({ "name": "checkout", "enabled": false, "value": "v1",
        "segment_overrides": [{ "segment_id": segment["id"], "enabled": true, "value": "v2" }] });
    let (status, feature) = server.post("/v1/features", &server.keys.server_key, &feature).await;
    assert_eq!(status, StatusCode::CREATED, "{feature}");
}

/// Runs `run.js SUITE` against the server and returns what the pages saw.
async fn run_pages(server: &TestServer, suite: &str) -> Value {
    let _turn = BROWSER.lock().await;
    let child = tokio::process::Command::new("node")
        .current_dir(DIRECTORY)
        .args(["run.js", suite, &server.base_url, &server.keys.client_key])
        .kill_on_drop(true)
        .output();
    let output =
        tokio::time::timeout(Duration::from_secs(90), child).await.expect("browser run timed out").expect("run node");
    assert!(output.status.success(), "node failed: {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from node");
    assert_eq!(seen["page_errors"], json!([]), "pages threw: {seen}");
    seen
}

/// The events of a user (pre-login events included once linked), oldest first.
async fn events_of(server: &TestServer, user_id: &str) -> Vec<String> {
    let rows = server
        .sql(&format!("SELECT event FROM events WHERE distinct_id = '{user_id}' ORDER BY timestamp, received_at"))
        .await;
    rows["rows"].as_array().unwrap().iter().map(|row| row[0].as_str().unwrap().to_owned()).collect()
}

/// Waits (up to 10 s) for a SQL count to reach `expected`; returns the last count.
async fn count_reaching(server: &TestServer, statement: &str, expected: i64) -> i64 {
    let mut count = -1;
    for _ in 0..100 {
        count = server.sql(statement).await["rows"][0][0].as_i64().unwrap();
        if count >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    count
}

fn scenario<'a>(seen: &'a Value, name: &str) -> &'a Value {
    let result = &seen[name];
    assert!(result.get("failed").is_none(), "scenario {name} failed in the browser: {}", result["failed"]);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roster_browser_sdk_links_persists_retries_beacons_and_serves_flags() {
    if !available("roster_browser_sdk_links_persists_retries_beacons_and_serves_flags") {
        return;
    }
    let server = TestServer::start().await;
    checkout_flag(&server).await;
    let seen = run_pages(&server, "roster").await;

    // A page closed with its batch still waiting: the messages left as beacons.
    assert_eq!(scenario(&seen, "beacon")["queued_when_closed"], 4, "identify and three tracks were waiting");
    let beaconed = "SELECT count(*) FROM events WHERE distinct_id = 'beacon-user' AND event = 'Before Close'";
    assert_eq!(count_reaching(&server, beaconed, 3).await, 3, "the closed page's events arrived");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.sql(beaconed).await["rows"], json!([[3]]), "each once");

    // Anonymous page view and event, then identify: they belong to the user; flags follow.
    let link = scenario(&seen, "link");
    assert_eq!(link["delivered"], true);
    assert_eq!(link["distinct_id"], "browser-ada");
    assert_eq!(
        link["before"],
        json!({ "flags": { "enabled": false, "value": "v1" }, "enabled": false, "value": "v1" })
    );
    assert_eq!(link["after"], json!({ "flags": { "enabled": true, "value": "v2" }, "enabled": true, "value": "v2" }));
    assert!(link["flag_loads"].as_i64().unwrap() >= 2, "onFlags heard the load after identify: {link}");
    assert_eq!(events_of(&server, "browser-ada").await, ["$pageview", "Viewed Pricing", "Checkout"]);
    let ada = server.profile_of_user("browser-ada").await;
    assert!(ada["anonymous_ids"].as_array().unwrap().contains(&link["anonymous_id"]), "{ada}");
    assert_eq!(ada["traits"], json!({ "plan": "pro", "email": "ada@example.com" }));
    let page = server.sql("SELECT properties->>'path', properties->>'title' FROM events WHERE event = '$pageview' AND distinct_id = 'browser-ada'").await;
    assert_eq!(page["rows"], json!([["/roster.html", "Roster browser test"]]));

    // Reload keeps the ids; reset renews the anonymous id, and the device id only when asked.
    let reload = scenario(&seen, "reload");
    assert_eq!(reload["first"], reload["reloaded"]);
    assert!(reload["first"]["anonymous_id"].as_str().unwrap().starts_with("anon-"), "{reload}");
    assert_ne!(reload["reset"]["anonymous_id"], reload["first"]["anonymous_id"]);
    assert_eq!(reload["reset"]["device_id"], reload["first"]["device_id"]);
    assert_ne!(reload["reset_device"]["device_id"], reload["first"]["device_id"]);
    assert_ne!(reload["reset_device"]["anonymous_id"], reload["reset"]["anonymous_id"]);

    // Two users on one browser stay two people.
    let two = scenario(&seen, "two_users");
    assert_eq!(two["delivered"], true);
    assert_ne!(two["bob_anonymous_id"], two["carol_anonymous_id"], "the second login started a new session");
    let (bob, carol) = (server.profile_of_user("browser-bob").await, server.profile_of_user("browser-carol").await);
    assert_ne!(bob["profile_id"], carol["profile_id"]);
    assert!(!bob["anonymous_ids"].as_array().unwrap().contains(&two["carol_anonymous_id"]), "{bob}");
    assert!(!carol["anonymous_ids"].as_array().unwrap().contains(&two["bob_anonymous_id"]), "{carol}");
    assert_eq!(events_of(&server, "browser-bob").await, ["Bob Event"]);
    assert_eq!(events_of(&server, "browser-carol").await, ["Carol Event"]);

    // Offline: held and retried, then delivered exactly once (same page; stored queue next visit).
    let offline = scenario(&seen, "offline");
    assert_eq!(offline["while_offline"], false);
    assert_eq!(offline["back"], true);
    assert_eq!(offline["stored_when_closed"], 1, "the message waited in storage: {offline}");
    assert_eq!(offline["next_visit"], true);
    let counts = server
        .sql("SELECT event, count(*) FROM events WHERE distinct_id = 'browser-dave' GROUP BY event ORDER BY event")
        .await;
    assert_eq!(counts["rows"], json!([["Offline One", 1], ["Offline Two", 1]]));

    // Junk ids never leave the browser.
    let junk = scenario(&seen, "junk");
    assert_eq!(junk["delivered"], true);
    assert!(junk["distinct_id"].as_str().unwrap().starts_with("anon-"), "{junk}");
    let errors = seen["console_errors"]["junk"].as_array().unwrap();
    assert_eq!(errors.len(), 7, "one console error per refused id: {errors:?}");
    assert!(errors.iter().all(|error| error.as_str().unwrap().contains("identify refused")), "{errors:?}");
    let junk_profiles =
        server.sql("SELECT count(*) FROM identities WHERE distinct_id IN ('', 'null', 'undefined', '0')").await;
    assert_eq!(junk_profiles["rows"], json!([[0]]));
    assert_eq!(server.sql("SELECT count(*) FROM events WHERE event = 'After Junk'").await["rows"], json!([[1]]));

    // A refused batch is dropped with a warning (its valid message was applied), not retried.
    assert_eq!(scenario(&seen, "refused"), &json!({ "delivered": true, "queued": 0 }));
    let warnings = seen["console_warnings"]["refused"].as_array().unwrap();
    assert!(
        warnings.len() == 1 && warnings[0].as_str().unwrap().contains("refused by the server (HTTP 400)"),
        "{warnings:?}"
    );
    assert_eq!(server.sql("SELECT count(*) FROM events WHERE event = 'After Refused'").await["rows"], json!([[1]]));

    // Calls made before the script loaded and before init ran, in order, once init was called.
    assert_eq!(scenario(&seen, "early"), &json!({ "distinct_id": "browser-early", "delivered": true }));
    assert_eq!(events_of(&server, "browser-early").await, ["Queued Before Load"]);

    // The ES module build works the same.
    let module = scenario(&seen, "module");
    assert_eq!(module, &json!({ "exports": { "createRoster": "function" }, "delivered": true }));
    assert_eq!(server.profile_of_user("browser-esm").await["traits"], json!({ "plan": "free" }));

    // No console errors but the refused ids' and the browser's own notes on offline requests.
    let mut console_errors = seen["console_errors"].clone();
    console_errors.as_object_mut().unwrap().remove("junk");
    console_errors.as_object_mut().unwrap().remove("refused"); // the browser notes the 400
    let offline_errors = console_errors.as_object_mut().unwrap().remove("offline").unwrap();
    let disconnected = |error: &Value| error.as_str().unwrap().contains("ERR_INTERNET_DISCONNECTED");
    assert!(offline_errors.as_array().unwrap().iter().all(disconnected), "{offline_errors}");
    assert!(console_errors.as_object().unwrap().values().all(|errors| errors == &json!([])), "{console_errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_browser_sdks_work_against_roster_with_only_the_host_changed() {
    if !available("vendor_browser_sdks_work_against_roster_with_only_the_host_changed") {
        return;
    }
    let server = TestServer::start().await;
    checkout_flag(&server).await;
    let seen = run_pages(&server, "vendors").await;

    // Segment's analytics-next: the anonymous page view and event join the user at identify.
    let segment = scenario(&seen, "segment");
    let events = "SELECT count(*) FROM events WHERE distinct_id = 'browser-segment'";
    assert_eq!(count_reaching(&server, events, 3).await, 3);
    assert_eq!(events_of(&server, "browser-segment").await, ["page", "Viewed Pricing", "Checkout"]);
    let user = server.profile_of_user("browser-segment").await;
    assert!(user["anonymous_ids"].as_array().unwrap().contains(&segment["anonymous_id"]), "{user}");
    assert_eq!(user["traits"]["plan"], "pro");

    // Customer.io's browser SDK: identify, events, and a device registered by its semantic event.
    let customerio = scenario(&seen, "customerio");
    let events =
        "SELECT count(*) FROM events WHERE distinct_id = 'browser-cio' AND event IN ('Viewed Pricing', 'Checkout')";
    assert_eq!(count_reaching(&server, events, 2).await, 2);
    let user = server.profile_of_user("browser-cio").await;
    assert_eq!(user["traits"]["email"], "cio@example.com");
    assert_eq!(user["traits"]["plan"], "team");
    assert!(user["anonymous_ids"].as_array().unwrap().contains(&customerio["anonymous_id"]), "{user}");
    let devices = "SELECT count(*) FROM devices WHERE distinct_id = 'browser-cio' AND token = 'browser-cio-token'";
    assert_eq!(count_reaching(&server, devices, 1).await, 1, "the device event registered the token");

    // Flagsmith's JavaScript client: environment flags, then the segment override for the identity.
    let flagsmith = scenario(&seen, "flagsmith");
    assert_eq!(flagsmith["before"], json!({ "enabled": false, "value": "v1" }));
    assert_eq!(flagsmith["identified"], json!({ "enabled": true, "value": "v2" }));
    assert_eq!(flagsmith["downgraded"], json!({ "enabled": false, "value": "v1" }));
    assert_eq!(server.profile_of_user("browser-flagsmith").await["traits"]["plan"], "free");
}

/// The SDK is served as JavaScript, cached, revalidated by ETag, and loadable from any origin.
#[tokio::test]
async fn the_sdk_is_served_as_a_script_and_a_module() {
    let server = TestServer::start().await;
    for (path, marker) in [("/sdk/roster.js", "window.roster = roster"), ("/sdk/roster.mjs", "export default roster")] {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        assert_eq!(header("content-type"), "text/javascript; charset=utf-8");
        assert_eq!(header("cache-control"), "public, max-age=3600");
        assert_eq!(header("access-control-allow-origin"), "*");
        let etag = header("etag");
        let source = response.text().await.unwrap();
        assert!(source.contains("function createRoster(") && source.contains(marker), "{path}");
        let again = server.http.get(server.url(path)).header("If-None-Match", &etag).send().await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
    }
    let (script, module) = (
        server.http.get(server.url("/sdk/roster.js")).send().await.unwrap(),
        server.http.get(server.url("/sdk/roster.mjs")).send().await.unwrap(),
    );
    assert_ne!(script.headers()["etag"], module.headers()["etag"]);
}
