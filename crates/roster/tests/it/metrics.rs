//! `GET /metrics` and `GET /readyz`. Metrics are process-wide and the tests of this binary run at
//! once, so every check compares a scrape taken before the test's traffic with one taken after,
//! and asks for at least the increase that traffic causes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use reqwest::StatusCode;
use roster_engine::EngineConfig;
use roster_server::ServerConfig;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, postgres_url, read};

/// One series of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Every series of a scrape (comments skipped). Label values are read with their escapes, since
/// route templates hold braces.
fn parse_exposition(text: &str) -> Vec<Series> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in `{line}`"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of `{line}` is not a number"));
            let Some((name, labels)) = series.split_once('{') else {
                return Series { name: series.to_owned(), labels: Vec::new(), value };
            };
            let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in `{line}`"));
            Series { name: name.to_owned(), labels: parse_labels(labels), value }
        })
        .collect()
}

fn parse_labels(mut text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    while !text.is_empty() {
        let (key, rest) = text.split_once("=\"").expect("label key");
        let mut value = String::new();
        let mut characters = rest.char_indices();
        let end = loop {
            match characters.next().expect("closing quote") {
                (_, '\\') => value.push(characters.next().expect("escaped character").1),
                (index, '"') => break index,
                (_, character) => value.push(character),
            }
        };
        labels.push((key.trim_start_matches(',').to_owned(), value));
        text = rest[end + 1..].trim_start_matches(',');
    }
    labels
}

/// The sum of the series named `name` whose labels include all of `wanted` (0 when none).
fn total(series: &[Series], name: &str, wanted: &[(&str, &str)]) -> f64 {
    series
        .iter()
        .filter(|one| one.name == name)
        .filter(|one| {
            wanted.iter().all(|(key, value)| one.labels.iter().any(|(have_key, have)| have_key == key && have == value))
        })
        .map(|one| one.value)
        .sum()
}

async fn scrape(http: &reqwest::Client, url: &str) -> Vec<Series> {
    let response = http.get(url).send().await.expect("scrape sent");
    assert_eq!(response.status(), StatusCode::OK, "scrape of {url} failed");
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "not the Prometheus text format: {content_type}");
    parse_exposition(&response.text().await.expect("scrape body"))
}

/// Asserts that `name{wanted}` grew by at least `expected` between the two scrapes.
fn assert_grew(before: &[Series], after: &[Series], name: &str, wanted: &[(&str, &str)], expected: f64) {
    let growth = total(after, name, wanted) - total(before, name, wanted);
    assert!(growth >= expected, "{name}{wanted:?} grew by {growth}, expected at least {expected}");
}

#[test]
fn the_exposition_parser_reads_braces_and_escapes_in_label_values() {
    let series = parse_exposition(
        "# TYPE x counter\nx{route=\"/v1/profiles/{profile_id}\",note=\"a \\\"quoted\\\" word\"} 3\ny 1.5\n",
    );
    assert_eq!(
        series[0].labels,
        vec![("route".to_owned(), "/v1/profiles/{profile_id}".to_owned()), ("note".into(), "a \"quoted\" word".into())]
    );
    assert_eq!(total(&series, "x", &[("route", "/v1/profiles/{profile_id}")]), 3.0);
    assert_eq!(total(&series, "y", &[]), 1.5);
    assert_eq!(total(&series, "x", &[("route", "/other")]), 0.0);
}

#[tokio::test]
async fn metrics_count_the_traffic_sent_with_route_templates_as_labels() {
    let server = TestServer::start().await;
    let metrics_url = server.url("/metrics");
    let before = scrape(&server.http, &metrics_url).await;

    for user in ["metrics_ada", "metrics_grace", "metrics_linus"] {
        server.identify(json!({ "distinct_id": user, "traits": { "plan": "pro" } })).await;
    }
    for event in ["Signed In", "Checkout"] {
        let (status, body) = server
            .post("/track", &server.keys.client_key, &json!({ "event": event, "distinct_id": "metrics_ada" }))
            .await;
        assert_eq!(status, StatusCode::OK, "track failed: {body}");
    }
    // One accepted item and one refused (no identifier) in the same batch.
    let (status, batch) = server
        .post(
            "/identify",
            &server.keys.client_key,
            &json!([{ "distinct_id": "metrics_margaret" }, { "traits": { "plan": "free" } }]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{batch}");
    let refused_code = batch["results"][1]["error"]["code"].as_str().expect("the second item is refused").to_owned();
    let (status, flags) =
        server.post("/v1/flags", &server.keys.client_key, &json!({ "distinct_id": "metrics_ada" })).await;
    assert_eq!(status, StatusCode::OK, "{flags}");
    let (status, answer) = server
        .post("/v1/query", &server.keys.server_key, &json!({ "sql": "SELECT distinct_id FROM identities" }))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let profile_id = server.profile_of_user("metrics_ada").await["profile_id"].as_str().expect("profile id").to_owned();
    let (status, profile) = server.get(&format!("/v1/profiles/{profile_id}"), &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    let (status, _) = server.get("/metrics-test/no/such/path", &server.keys.server_key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The same operation through two other wire formats, counted under their dialects.
    let segment = json!({ "writeKey": server.keys.client_key, "batch": [
        { "type": "identify", "userId": "metrics_seg" }, { "type": "track", "userId": "metrics_seg", "event": "E" }] });
    let (status, _) = server.post_raw("/v1/batch", "", segment.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let bulk = json!({ "data": [{ "identifier": "metrics_flagsmith", "traits": [] }] });
    let (status, _) = server.post("/api/v1/bulk-identities/", &server.keys.server_key, &bulk).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let after = scrape(&server.http, &metrics_url).await;
    // 3 single identifies, the batch's valid item and the identify of `POST /v1/flags`.
    let native_identify = [("dialect", "native"), ("operation", "identify")];
    assert_grew(
        &before,
        &after,
        "roster_items_total",
        &[native_identify[0], native_identify[1], ("outcome", "accepted")],
        5.0,
    );
    assert_grew(
        &before,
        &after,
        "roster_items_total",
        &[native_identify[0], native_identify[1], ("outcome", "rejected")],
        1.0,
    );
    assert_grew(
        &before,
        &after,
        "roster_items_total",
        &[("dialect", "native"), ("operation", "track"), ("outcome", "accepted")],
        2.0,
    );
    for (dialect, operation) in [("segment", "identify"), ("segment", "track"), ("flagsmith", "identify")] {
        let labels = [("dialect", dialect), ("operation", operation), ("outcome", "accepted")];
        assert_grew(&before, &after, "roster_items_total", &labels, 1.0);
    }
    assert_grew(
        &before,
        &after,
        "roster_rejected_items_total",
        &[("dialect", "native"), ("code", refused_code.as_str())],
        1.0,
    );
    assert_grew(&before, &after, "roster_flag_evaluations_total", &[("subject", "identity")], 1.0);
    assert_grew(&before, &after, "roster_sql_queries_total", &[("outcome", "ok")], 1.0);
    assert_grew(&before, &after, "roster_sql_query_duration_seconds_count", &[("outcome", "ok")], 1.0);

    let profile_route = [("method", "GET"), ("route", "/v1/profiles/{profile_id}")];
    assert_grew(
        &before,
        &after,
        "roster_http_requests_total",
        &[profile_route[0], profile_route[1], ("status", "200")],
        1.0,
    );
    assert_grew(&before, &after, "roster_http_request_duration_seconds_count", &profile_route, 1.0);
    assert_grew(
        &before,
        &after,
        "roster_http_requests_total",
        &[("method", "POST"), ("route", "/identify"), ("status", "400"), ("status_class", "4xx")],
        1.0,
    );
    assert_grew(&before, &after, "roster_http_requests_total", &[("route", "unmatched"), ("status", "404")], 1.0);
    let concrete_paths: Vec<&Series> = after
        .iter()
        .filter(|one| one.labels.iter().any(|(_, value)| value.contains(&profile_id) || value.contains("metrics-test")))
        .collect();
    assert!(concrete_paths.is_empty(), "ids or raw paths became labels: {concrete_paths:?}");

    // The embedded store's writer committed this traffic.
    assert_grew(&before, &after, "roster_sqlite_group_commit_jobs_count", &[], 1.0);
    assert_grew(&before, &after, "roster_sqlite_group_commit_seconds_count", &[], 1.0);
    assert_grew(&before, &after, "roster_sqlite_commit_seconds_count", &[], 1.0);
    assert!(after.iter().any(|one| one.name == "roster_sqlite_write_queue_depth"), "the write-queue gauge is exported");
}

#[tokio::test]
async fn readiness_and_metrics_need_no_key() {
    let server = TestServer::start().await;
    let response = server.http.get(server.url("/readyz")).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "status": "ready" }));
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
}

#[tokio::test]
async fn metrics_can_be_turned_off_on_the_main_listener() {
    let config = ServerConfig { serve_metrics: false, ..ServerConfig::default() };
    let server = TestServer::start_with_config(EngineConfig::default(), config).await;
    let (status, body) = read(server.http.get(server.url("/metrics")).send().await.unwrap()).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}

/// A server on PostgreSQL turns not ready when its connections are cut and its data cannot be
/// read on reconnection, while `/healthz` (liveness) keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_when_postgres_cannot_be_read_while_liveness_holds() {
    let Some(url) = postgres_url("readiness_fails_when_postgres_cannot_be_read_while_liveness_holds") else { return };
    // A name of its own, so only this server's connections are cut (other tests share the
    // database at the same time).
    let application_name = format!("roster_readyz_{}", std::process::id());
    let separator = if url.contains('?') { '&' } else { '?' };
    let tagged_url = format!("{url}{separator}application_name={application_name}");
    let server = TestServer::start_postgres(&tagged_url, EngineConfig::default(), ServerConfig::default()).await;
    let schema = server.postgres_schema().expect("a postgres server").schema.clone();

    let (status, body) = read(server.http.get(server.url("/readyz")).send().await.unwrap()).await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({ "status": "ready" })));
    // The readiness read ran on one of the pool's connections, which the busy gauge tracks.
    let scraped = scrape(&server.http, &server.url("/metrics")).await;
    assert!(scraped.iter().any(|one| one.name == "roster_postgres_connections_busy"), "the busy-connections gauge");

    // From a separate connection: drop the table the readiness read needs, then cut every
    // connection of this server, so the reconnected ones find nothing to read either.
    let administration_url = url.clone();
    let cut = std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&administration_url, postgres::NoTls).expect("admin connection");
        client
            .batch_execute(&format!("DROP TABLE \"{}\".settings", schema.replace('"', "\"\"")))
            .expect("drop the settings table");
        client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&application_name],
            )
            .expect("terminate the server's connections")
            .len()
    })
    .join()
    .expect("admin thread");
    assert!(cut > 0, "the server's connections carry its application name");

    let (status, body) = read(server.http.get(server.url("/readyz")).send().await.unwrap()).await;
    assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE, "not_ready");
    let liveness = server.http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(liveness.status(), StatusCode::OK);
    assert_eq!(liveness.text().await.unwrap(), "ok");
}

/// A `roster serve` child, killed when dropped.
struct ServingChild {
    child: Child,
    lines: Vec<String>,
}

impl Drop for ServingChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `roster serve` on a fresh data directory with `extra` arguments and returns it once
/// it prints its main address, with the lines printed until then.
fn serve(data_directory: &std::path::Path, extra: &[&str]) -> ServingChild {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_directory)
        .args(extra)
        .env("ROSTER_LOG", "warn")
        .env_remove("ROSTER_METRICS_LISTEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn roster serve");
    let mut lines = BufReader::new(child.stdout.take().expect("child stdout")).lines();
    let mut printed = Vec::new();
    loop {
        let line = lines.next().expect("roster serve exited before listening").expect("read stdout");
        let listening = line.starts_with("roster listening on ");
        printed.push(line);
        if listening {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    ServingChild { child, lines: printed }
}

fn printed_address(lines: &[String], prefix: &str) -> String {
    lines
        .iter()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("`{prefix}` not printed: {lines:?}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn metrics_listen_serves_metrics_on_its_own_address_and_not_on_the_main_one() {
    let data_directory = tempfile::tempdir().unwrap();
    let running = serve(data_directory.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let base_url = printed_address(&running.lines, "roster listening on ");
    let metrics_url = printed_address(&running.lines, "roster metrics listening on ");
    assert!(metrics_url.ends_with("/metrics"), "{metrics_url}");
    let http = reqwest::Client::new();

    let health = http.get(format!("{base_url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let on_main = http.get(format!("{base_url}/metrics")).send().await.unwrap();
    assert_eq!(on_main.status(), StatusCode::NOT_FOUND, "the main listener must not serve /metrics");

    let scraped = scrape(&http, &metrics_url).await;
    assert!(
        total(&scraped, "roster_http_requests_total", &[("route", "/healthz"), ("status", "200")]) >= 1.0,
        "the main listener's requests are counted: {scraped:?}"
    );
    let api_on_metrics_port = http.get(metrics_url.replace("/metrics", "/healthz")).send().await.unwrap();
    assert_eq!(api_on_metrics_port.status(), StatusCode::NOT_FOUND, "the metrics listener serves only /metrics");
}

#[tokio::test]
async fn metrics_listen_off_serves_metrics_nowhere() {
    let data_directory = tempfile::tempdir().unwrap();
    let running = serve(data_directory.path(), &["--metrics-listen", "off"]);
    let base_url = printed_address(&running.lines, "roster listening on ");
    assert!(!running.lines.iter().any(|line| line.contains("metrics listening")), "{:?}", running.lines);
    let (status, body) = read(reqwest::get(format!("{base_url}/metrics")).await.unwrap()).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let ready: Value = reqwest::get(format!("{base_url}/readyz")).await.unwrap().json().await.unwrap();
    assert_eq!(ready, json!({ "status": "ready" }));
}
