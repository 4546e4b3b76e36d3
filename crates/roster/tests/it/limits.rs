//! What one request may cost: items per batch, the size of an error answer, requests and body
//! bytes in flight, and how long a slow client may hold a connection.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use roster_core::Limits;
use roster_server::ServerConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{TestServer, assert_error};

/// `count` empty objects as a JSON array: 3 bytes an item, the cheapest batch to send.
fn empty_items(count: usize) -> String {
    let mut text = String::with_capacity(count * 3 + 2);
    text.push('[');
    for index in 0..count {
        if index > 0 {
            text.push(',');
        }
        text.push_str("{}");
    }
    text.push(']');
    text
}

/// Sends raw bytes with the client key (Customer.io's API: the server key, as it takes no other);
/// answers the status and the raw answer text.
async fn post_text(server: &TestServer, method: reqwest::Method, path: &str, body: String) -> (StatusCode, String) {
    let mut request = server.http.request(method, server.url(path)).header("Content-Type", "application/json");
    request = if path.starts_with("/api/v2/") {
        request.basic_auth("site", Some(&server.keys.server_key))
    } else {
        request.header("X-API-Key", &server.keys.client_key)
    };
    let response = request.body(body).send().await.expect("request sent");
    let status = response.status();
    (status, response.text().await.expect("answer body"))
}

async fn stored_profile_count(server: &TestServer) -> usize {
    let (status, listing) = server.get("/v1/profiles?limit=1000", &server.keys.server_key).await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    listing["profiles"].as_array().expect("profiles").len()
}

#[tokio::test]
async fn a_million_items_get_one_small_answer_in_every_dialect() {
    let server = TestServer::start().await;
    let million = empty_items(1_000_000);
    let cases: Vec<(reqwest::Method, &str, String, StatusCode)> = vec![
        (reqwest::Method::POST, "/identify", million.clone(), StatusCode::PAYLOAD_TOO_LARGE),
        (reqwest::Method::POST, "/track", million.clone(), StatusCode::PAYLOAD_TOO_LARGE),
        (reqwest::Method::POST, "/alias", million.clone(), StatusCode::PAYLOAD_TOO_LARGE),
        // Segment's 500 KB batch limit comes first for bigger bodies; this is still 150 times the cap.
        (
            reqwest::Method::POST,
            "/v1/batch",
            format!(r#"{{"batch":{}}}"#, empty_items(150_000)),
            StatusCode::BAD_REQUEST,
        ),
        (reqwest::Method::POST, "/api/v2/batch", format!(r#"{{"batch":{million}}}"#), StatusCode::PAYLOAD_TOO_LARGE),
        (
            reqwest::Method::POST,
            "/api/v1/bulk-identities/",
            format!(r#"{{"data":{million}}}"#),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (reqwest::Method::PUT, "/api/v1/traits/bulk/", million.clone(), StatusCode::PAYLOAD_TOO_LARGE),
    ];
    for (method, path, body, expected_status) in cases {
        let (status, text) = post_text(&server, method, path, body).await;
        assert!(text.len() < 4096, "{path}: the answer is {} bytes", text.len());
        let answer: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"));
        assert_error(status, &answer, expected_status, "too_many_items");
        assert!(answer["message"].as_str().unwrap().contains("1000"), "{path}: the limit is named: {answer}");
    }
    assert_eq!(stored_profile_count(&server).await, 0, "nothing of a refused batch is stored");
}

#[tokio::test]
async fn a_batch_at_the_item_limit_is_applied_and_one_more_is_refused() {
    let config = ServerConfig { max_batch_items: 3, ..ServerConfig::default() };
    let server = TestServer::start_with(Limits::default(), config).await;
    let three: Vec<Value> = (0..3).map(|index| json!({"distinct_id": format!("u_{index}")})).collect();
    let (status, answer) = server.post("/identify", &server.keys.client_key, &json!(three)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let four: Vec<Value> = (0..4).map(|index| json!({"distinct_id": format!("v_{index}")})).collect();
    let (status, answer) = server.post("/identify", &server.keys.client_key, &json!(four)).await;
    assert_error(status, &answer, StatusCode::PAYLOAD_TOO_LARGE, "too_many_items");
    // A key escaped in the body is the same field to the parser, so it is counted too.
    let escaped = r#"{"b\u0061tch":[{"type":"person","action":"identify","identifiers":{"id":"a"}},{},{},{}]}"#;
    let (status, text) = post_text(&server, reqwest::Method::POST, "/api/v2/batch", escaped.to_owned()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert_eq!(stored_profile_count(&server).await, 3);
}

#[tokio::test]
async fn the_answer_to_thousands_of_bad_items_stays_small() {
    let config = ServerConfig { max_batch_items: 5000, ..ServerConfig::default() };
    let server = TestServer::start_with(Limits::default(), config).await;
    let mut items: Vec<Value> = (0..3000).map(|_| json!({})).collect();
    items.push(json!({"distinct_id": "good"}));
    let (status, text) = post_text(&server, reqwest::Method::POST, "/identify", json!(items).to_string()).await;
    assert!(text.len() < 32 * 1024, "the answer is {} bytes", text.len());
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "missing_identifier");
    assert_eq!(answer["accepted"], 1);
    assert_eq!(answer["rejected"], 3000);
    assert_eq!(answer["unlisted_rejections"], 2950);
    assert_eq!(answer["rejections_by_code"], json!({"missing_identifier": 3000}));
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 51, "the first 50 rejections and the accepted item are listed");
    assert_eq!(results[0]["index"], 0);
    assert_eq!(results[0]["error"]["code"], "missing_identifier");
    assert_eq!(results[50]["index"], 3000);
    assert_eq!(results[50]["status"], "accepted");
    assert_eq!(server.profile_of_user("good").await["user_id"], "good");
}

#[tokio::test]
async fn echoed_input_is_cut_short_in_error_messages() {
    let server = TestServer::start().await;
    let long_key = "k".repeat(1_000_000);
    let long_value = "v".repeat(1_000_000);
    let bodies = [
        format!(r#"{{"distinct_id":"u","{long_key}":1}}"#),
        format!(r#"{{"distinct_id":"u","traits":"{long_value}"}}"#),
        format!(r#"{{"distinct_id":"u","traits":{{"{long_key}":1}}}}"#),
    ];
    for body in bodies {
        let (status, text) = post_text(&server, reqwest::Method::POST, "/identify", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}", &text[..text.len().min(300)]);
        assert!(text.len() < 4096, "the answer is {} bytes", text.len());
    }
}

/// The server's `host:port`.
fn address(server: &TestServer) -> String {
    server.base_url.trim_start_matches("http://").to_owned()
}

/// Opens a connection and sends `head` (and nothing more).
async fn send_raw(server: &TestServer, head: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(address(server)).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("send");
    stream
}

/// Reads until the server closes the connection; answers what it sent, or `None` if it was
/// still open after `wait`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, wait: Duration) -> Option<String> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(wait, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(count) => received.extend_from_slice(&buffer[..count]),
            }
        }
    })
    .await;
    read.ok().map(|()| String::from_utf8_lossy(&received).into_owned())
}

/// Headers of an identify whose body is `length` bytes long, of which none is sent yet.
fn identify_head(server: &TestServer, length: usize) -> String {
    format!(
        "POST /identify HTTP/1.1\r\nHost: roster\r\nX-API-Key: {}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n",
        server.keys.client_key
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_requests_in_flight_a_request_gets_503_with_retry_after_at_once() {
    let config = ServerConfig {
        max_requests_in_flight: 2,
        body_read_timeout: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let engine_config = roster_engine::EngineConfig {
        query_timeout: Duration::from_millis(1500),
        ..roster_engine::EngineConfig::default()
    };
    let server = TestServer::start_with_config(engine_config, config).await;
    // Requests whose bodies never come hold no slot: a whole request is still served.
    let first = send_raw(&server, &identify_head(&server, 100)).await;
    let second = send_raw(&server, &identify_head(&server, 100)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = server.post("/identify", &server.keys.client_key, &json!({"distinct_id": "served"})).await;
    assert_eq!(status, StatusCode::OK, "slow bodies took the slots others need");
    drop((first, second));

    // Two requests being served (slow queries) hold both slots: a third is refused at once.
    let slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n";
    let mut busy = Vec::new();
    for _ in 0..2 {
        let (http, url, key) = (server.http.clone(), server.url("/v1/query"), server.keys.server_key.clone());
        busy.push(tokio::spawn(async move {
            http.post(url).header("X-API-Key", key).json(&json!({ "sql": slow })).send().await.map(|r| r.status())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let response = server
        .http
        .post(server.url("/identify"))
        .header("X-API-Key", &server.keys.client_key)
        .header("Origin", "http://localhost:5173")
        .json(&json!({"distinct_id": "refused"}))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    // A browser can read the refusal (and its `Retry-After`) too.
    assert_eq!(response.headers()["access-control-allow-origin"], "http://localhost:5173");
    assert!(response.headers()["access-control-expose-headers"].to_str().unwrap().contains("Retry-After"));
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["code"], "overloaded");
    assert_eq!(answer["type"], "unavailable");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not after a wait");
    let health = server.http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "the health check is answered however busy the server is");
    for request in busy {
        request.await.unwrap().unwrap();
    }
    // Slots are free again once those answered.
    let (status, _) = server.post("/identify", &server.keys.client_key, &json!({"distinct_id": "later"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored_profile_count(&server).await, 2, "the refused identify stored nothing");
}

#[tokio::test]
async fn body_bytes_are_reserved_before_they_are_buffered_with_or_without_a_length() {
    let config = ServerConfig {
        max_body_bytes: 64 * 1024,
        max_body_bytes_in_flight: 64 * 1024,
        body_read_timeout: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(Limits::default(), config).await;
    // A chunked body: its first 40 KB are held while the rest does not come.
    let head = format!(
        "POST /identify HTTP/1.1\r\nHost: roster\r\nX-API-Key: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        server.keys.client_key
    );
    let mut chunked = send_raw(&server, &head).await;
    let chunk = format!("[{}", " ".repeat(40 * 1024 - 1));
    chunked.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 40 KB declared does not fit in what is left: refused before it is read.
    let body = format!(r#"{{"distinct_id":"big","traits":{{"note":"{}"}}}}"#, "x".repeat(1000));
    let padded = format!("{body}{}", " ".repeat(40 * 1024 - body.len()));
    let (status, answer) = server.post_raw("/identify", &server.keys.client_key, padded.clone()).await;
    assert_error(status, &answer, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    // Once the chunked request is gone (its connection closed), the same body fits.
    drop(chunked);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = server.post_raw("/identify", &server.keys.client_key, padded).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[tokio::test]
async fn a_body_that_stalls_is_answered_408_and_its_connection_closed() {
    let config = ServerConfig { body_read_timeout: Duration::from_millis(500), ..ServerConfig::default() };
    let server = TestServer::start_with(Limits::default(), config).await;
    let mut stalled = send_raw(&server, &identify_head(&server, 100)).await;
    stalled.write_all(br#"{"distinct_id":"#).await.unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut stalled, Duration::from_secs(5)).await.expect("the connection is closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3), "closed after {:?}", started.elapsed());
    assert_eq!(stored_profile_count(&server).await, 0);
}

#[tokio::test]
async fn under_a_flood_some_are_refused_fast_and_every_acknowledged_message_is_stored() {
    let config = ServerConfig { max_requests_in_flight: 8, ..ServerConfig::default() };
    let server = TestServer::start_with(Limits::default(), config).await;
    let mut requests = tokio::task::JoinSet::new();
    for client in 0..200 {
        // One client (and so one connection) per request, all at once.
        let http = reqwest::Client::new();
        let url = server.url("/identify");
        let key = server.keys.client_key.clone();
        requests.spawn(async move {
            let user_ids: Vec<String> = (0..20).map(|item| format!("flood_{client}_{item}")).collect();
            let batch: Vec<Value> = user_ids.iter().map(|user_id| json!({"distinct_id": user_id})).collect();
            let response = http.post(url).header("X-API-Key", key).json(&batch).send().await.expect("sent");
            let retry_after = response.headers().get("retry-after").map(|value| value.to_str().unwrap().to_owned());
            (response.status(), retry_after, user_ids)
        });
    }
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    while let Some(outcome) = requests.join_next().await {
        let (status, retry_after, user_ids) = outcome.unwrap();
        match status {
            StatusCode::OK => acknowledged.extend(user_ids),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(retry_after.as_deref(), Some("1"));
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused > 0, "200 requests at once against 8 slots: some are refused");
    assert!(!acknowledged.is_empty(), "and some are served");
    let mut stored = std::collections::BTreeSet::new();
    let mut after = String::new();
    loop {
        let (status, page) =
            server.get(&format!("/v1/profiles?limit=1000&after={after}"), &server.keys.server_key).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for profile in page["profiles"].as_array().unwrap() {
            stored.insert(profile["user_id"].as_str().unwrap().to_owned());
        }
        match page["next_after"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    for user_id in &acknowledged {
        assert!(stored.contains(user_id), "{user_id} was acknowledged but is not stored");
    }
    assert_eq!(stored.len(), acknowledged.len(), "nothing refused was stored");
}

#[tokio::test]
async fn idle_and_slow_header_connections_are_closed_while_others_are_served() {
    let config = ServerConfig { header_read_timeout: Duration::from_millis(700), ..ServerConfig::default() };
    let server = TestServer::start_with(Limits::default(), config).await;
    let started = Instant::now();
    let mut silent = send_raw(&server, "").await;
    let mut dribbling = send_raw(&server, "POST /identify HTTP/1.1\r\n").await;
    let dribble = tokio::spawn(async move {
        // One header byte every 100 ms: never a whole request within the timeout.
        for byte in b"X-API-Key: slowly-slowly-slowly-slowly\r\n" {
            if dribbling.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        read_until_closed(&mut dribbling, Duration::from_secs(5)).await
    });
    // Meanwhile a normal client is served.
    let served = server.identify(json!({"distinct_id": "meanwhile"})).await;
    assert_eq!(served["status"], "accepted");
    assert!(read_until_closed(&mut silent, Duration::from_secs(5)).await.is_some(), "the silent connection is closed");
    let closed_silent_after = started.elapsed();
    assert!(dribble.await.unwrap().is_some(), "the dribbling connection is closed");
    let closed_dribbling_after = started.elapsed();
    assert!(closed_silent_after >= Duration::from_millis(600), "not before the timeout: {closed_silent_after:?}");
    assert!(closed_silent_after < Duration::from_secs(3), "closed after {closed_silent_after:?}");
    assert!(closed_dribbling_after < Duration::from_secs(3), "closed after {closed_dribbling_after:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let config = ServerConfig { header_read_timeout: Duration::from_millis(500), ..ServerConfig::default() };
    let server = TestServer::start_with(Limits::default(), config).await;
    let mut connection = send_raw(&server, "GET /healthz HTTP/1.1\r\nHost: roster\r\n\r\n").await;
    let mut buffer = [0u8; 1024];
    let count = connection.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..count]).starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    let rest = read_until_closed(&mut connection, Duration::from_secs(5)).await;
    assert!(rest.is_some(), "the idle keep-alive connection is closed");
    assert!(answered.elapsed() < Duration::from_secs(3), "closed after {:?}", answered.elapsed());
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_wait_until_one_closes() {
    let config =
        ServerConfig { max_connections: 2, header_read_timeout: Duration::from_secs(30), ..ServerConfig::default() };
    let server = TestServer::start_with(Limits::default(), config).await;
    let first = send_raw(&server, "").await;
    let _second = send_raw(&server, "").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = server.http.get(server.url("/healthz")).timeout(Duration::from_millis(500)).send().await;
    assert!(waiting.is_err(), "a third connection is not served while two are open");
    drop(first);
    let served = server.http.get(server.url("/healthz")).timeout(Duration::from_secs(5)).send().await;
    assert_eq!(served.expect("served once a connection closed").status(), StatusCode::OK);
}

/// Resident memory of a process, in bytes (Linux).
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS line");
    let kilobytes: u64 = line.split_whitespace().nth(1).and_then(|value| value.parse().ok()).expect("VmRSS value");
    kilobytes * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_taken_by_a_burst_is_returned_afterwards() {
    use std::io::BufRead;
    let data_directory = tempfile::tempdir().unwrap();
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["init", "--json", "--data-dir"])
        .arg(data_directory.path())
        .output()
        .expect("run roster init");
    let credentials: Value = serde_json::from_slice(&init.stdout).unwrap();
    let client_key = credentials["environments"][0]["client_key"].as_str().unwrap().to_owned();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["serve", "--listen", "127.0.0.1:0", "--max-body-bytes-in-flight", "268435456", "--data-dir"])
        .arg(data_directory.path())
        .env("ROSTER_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn roster serve");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let base_url = loop {
        let line = lines.next().expect("roster serve exited before listening").unwrap();
        if let Some(address) = line.strip_prefix("roster listening on ") {
            break address.trim().to_owned();
        }
    };
    let pid = child.id();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let _ = http.get(format!("{base_url}/healthz")).send().await;
    let before = resident_bytes(pid);

    // 1,000 items a request, each with a 3 KB trait string: parsed whole, then refused by the
    // string limit, so the burst costs parsing memory and no disk time.
    let item = json!({"distinct_id": "u", "traits": {"note": "n".repeat(3000)}});
    let body = json!(vec![item; 1000]).to_string();
    let mut peak = before;
    for _round in 0..3 {
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..48 {
            let request = http.post(format!("{base_url}/identify")).header("X-API-Key", &client_key).body(body.clone());
            requests.spawn(async move { request.send().await.map(|response| response.status()) });
        }
        let sampler = async {
            let mut highest = 0;
            for _ in 0..20 {
                highest = highest.max(resident_bytes(pid));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            highest
        };
        let (_, highest) = tokio::join!(async { while requests.join_next().await.is_some() {} }, sampler);
        peak = peak.max(highest);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resident_bytes(pid);
    child.kill().unwrap();
    let _ = child.wait();
    let megabytes = |bytes: u64| bytes / (1024 * 1024);
    eprintln!(
        "resident memory: before {} MB, peak {} MB, after {} MB",
        megabytes(before),
        megabytes(peak),
        megabytes(after)
    );
    assert!(peak > before + 100 * 1024 * 1024, "the burst took memory: peak {} MB", megabytes(peak));
    assert!(
        after < before + 64 * 1024 * 1024,
        "memory returned after the burst: before {} MB, after {} MB (peak {} MB)",
        megabytes(before),
        megabytes(after),
        megabytes(peak)
    );
}
