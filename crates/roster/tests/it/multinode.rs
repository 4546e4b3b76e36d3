//! Two real `roster serve` processes on one PostgreSQL database, written to concurrently through
//! both, one of them killed with SIGKILL mid-run. Afterwards: every trait holds its newest write,
//! one profile per user id and per anonymous id, no identifier without its profile, every
//! acknowledged event stored once, and the surviving node kept serving.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::skipped;

struct Node {
    child: Child,
    base_url: String,
}

fn start_node(url: &str, schema: &str) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", url, "--postgres-schema", schema])
        .env("ROSTER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn roster serve");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base_url = loop {
        let line = lines.next().expect("roster serve exited before listening").expect("read stdout");
        if let Some(address) = line.strip_prefix("roster listening on ") {
            break address.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Node { child, base_url }
}

/// One trait write a client attempted: which user, which trait, value, timestamp, and whether
/// the server acknowledged it.
#[derive(Clone, Debug)]
struct TraitWrite {
    user: String,
    key: String,
    value: i64,
    micros: i64,
    acknowledged: bool,
}

struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// `roster init` on a fresh schema of the test database: the schema and the printed credentials.
fn init_schema(url: &str) -> (String, Value) {
    let schema = format!("roster_it_{}", uuid_like());
    let output = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["init", "--json", "--store", url, "--postgres-schema", &schema])
        .output()
        .expect("run roster init");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    (schema, serde_json::from_slice(&output.stdout).unwrap())
}

fn rfc3339(micros: i64) -> String {
    roster_core::Timestamp::from_micros(micros).to_rfc3339()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_one_database_lose_nothing_when_one_is_killed() {
    let Ok(url) = std::env::var("ROSTER_TEST_DATABASE_URL") else {
        skipped(
            "two_nodes_on_one_database_lose_nothing_when_one_is_killed",
            "set ROSTER_TEST_DATABASE_URL (.ci/run does)",
        );
        return;
    };
    let (schema, credentials) = init_schema(&url);
    let client_key = credentials["environments"][0]["client_key"].as_str().unwrap().to_owned();
    let server_key = credentials["environments"][0]["server_key"].as_str().unwrap().to_owned();

    let mut first = start_node(&url, &schema);
    let second = start_node(&url, &schema);
    let urls = [first.base_url.clone(), second.base_url.clone()];
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let writes: Arc<Mutex<Vec<TraitWrite>>> = Arc::default();
    let events: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let first_killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let base_micros: i64 = 1_700_000_000_000_000;
    let started = Instant::now();
    let run_for = Duration::from_secs(4);

    let mut clients = Vec::new();
    for client in 0..24u64 {
        let (http, urls, client_key, server_key) = (http.clone(), urls.clone(), client_key.clone(), server_key.clone());
        let (writes, events, first_killed) = (Arc::clone(&writes), Arc::clone(&events), Arc::clone(&first_killed));
        clients.push(tokio::spawn(async move {
            let mut random = Random(0x9E37_79B9_7F4A_7C15 ^ ((client + 1) * 0x1234_5678));
            let mut sequence = 0u64;
            while started.elapsed() < run_for {
                sequence += 1;
                // After the kill, everything goes to the surviving node.
                let node = if first_killed.load(std::sync::atomic::Ordering::Relaxed) { 1 } else { random.below(2) as usize };
                let base_url = &urls[node];
                let user = format!("u{}", random.below(30));
                match random.below(10) {
                    0..=5 => {
                        let key = format!("t{}", random.below(4));
                        let value = random.below(1_000_000) as i64;
                        let micros = base_micros + random.below(1_000_000_000_000) as i64;
                        let body = json!({ "distinct_id": user, "timestamp": rfc3339(micros), "traits": { key.clone(): value } });
                        let sent = http.post(format!("{base_url}/identify")).header("X-API-Key", &client_key).json(&body).send().await;
                        let acknowledged = sent.is_ok_and(|response| response.status() == reqwest::StatusCode::OK);
                        writes.lock().unwrap().push(TraitWrite { user, key, value, micros, acknowledged });
                    }
                    6 => {
                        let anonymous_id = format!("a{}", random.below(40));
                        let body = json!({ "distinct_id": user, "anonymous_id": anonymous_id });
                        let _ = http.post(format!("{base_url}/identify")).header("X-API-Key", &client_key).json(&body).send().await;
                    }
                    7 => {
                        let anonymous_id = format!("a{}", random.below(40));
                        let body = json!({ "anonymous_id": anonymous_id, "traits": { "seen": sequence } });
                        let _ = http.post(format!("{base_url}/identify")).header("X-API-Key", &client_key).json(&body).send().await;
                    }
                    8 => {
                        let message_id = format!("m-{client}-{sequence}");
                        let body = json!({ "event": "Tick", "distinct_id": user, "message_id": message_id });
                        let sent = http.post(format!("{base_url}/track")).header("X-API-Key", &client_key).json(&body).send().await;
                        let acknowledged = sent.is_ok_and(|response| response.status() == reqwest::StatusCode::OK);
                        events.lock().unwrap().push((message_id, acknowledged));
                    }
                    _ => {
                        let other = format!("u{}", random.below(30));
                        let body = json!({ "primary": { "user_id": user }, "secondary": { "user_id": other } });
                        let _ = http
                            .post(format!("{base_url}/v1/profiles/merge"))
                            .header("X-API-Key", &server_key)
                            .json(&body)
                            .send()
                            .await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    first.child.kill().expect("SIGKILL the first node");
    first.child.wait().unwrap();
    first_killed.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }

    let survivor = &urls[1];
    let (status, body) = get(&http, &format!("{survivor}/v1/profiles?limit=1"), &server_key).await;
    assert_eq!(status, 200, "the surviving node keeps serving: {body}");
    let writes = writes.lock().unwrap().clone();
    let acknowledged_after_kill = writes.iter().filter(|write| write.acknowledged).count();
    assert!(acknowledged_after_kill > 200, "the run must have written something ({acknowledged_after_kill})");

    // Which profile each user's writes ended up in (merges pool several users' writes).
    let mut profile_of_user: HashMap<String, String> = HashMap::new();
    let mut traits_of_profile: HashMap<String, Value> = HashMap::new();
    for user in writes.iter().map(|write| write.user.clone()).collect::<std::collections::BTreeSet<_>>() {
        let mut found = None;
        for lookup in ["user_id", "anonymous_id"] {
            let (_, page) = get(&http, &format!("{survivor}/v1/profiles?{lookup}={user}"), &server_key).await;
            if let Some(profile) = page["profiles"].as_array().and_then(|profiles| profiles.first()) {
                found = Some(profile.clone());
                break;
            }
        }
        let profile = found.unwrap_or_else(|| panic!("user {user} has no profile"));
        let profile_id = profile["profile_id"].as_str().unwrap().to_owned();
        traits_of_profile.insert(profile_id.clone(), profile["traits"].clone());
        profile_of_user.insert(user, profile_id);
    }
    let mut by_profile_trait: BTreeMap<(String, String), Vec<&TraitWrite>> = BTreeMap::new();
    for write in &writes {
        by_profile_trait.entry((profile_of_user[&write.user].clone(), write.key.clone())).or_default().push(write);
    }
    for ((profile_id, key), attempts) in &by_profile_trait {
        let Some(newest_acknowledged) =
            attempts.iter().filter(|write| write.acknowledged).max_by_key(|write| write.micros)
        else {
            continue;
        };
        let stored = &traits_of_profile[profile_id][key];
        // The newest acknowledged write, or a newer one whose answer was lost with the node.
        let explained =
            attempts.iter().any(|write| write.micros >= newest_acknowledged.micros && json!(write.value) == *stored);
        assert!(explained, "{profile_id}.{key} = {stored}, newest acknowledged {newest_acknowledged:?}");
    }

    let duplicates = sql(
        &http,
        survivor,
        &server_key,
        "SELECT distinct_id FROM identities WHERE distinct_id IS NOT NULL GROUP BY distinct_id HAVING count(*) > 1",
    )
    .await;
    assert_eq!(duplicates["rows"], json!([]), "one profile per user id");
    let events_stored = sql(&http, survivor, &server_key, "SELECT event_id FROM events").await;
    let stored_events = events_stored["rows"].as_array().unwrap().len();
    let acknowledged_events = events.lock().unwrap().iter().filter(|(_, acknowledged)| *acknowledged).count();
    let attempted_events = events.lock().unwrap().len();
    assert!(
        (acknowledged_events..=attempted_events).contains(&stored_events),
        "{acknowledged_events} ≤ {stored_events} ≤ {attempted_events}"
    );

    // Straight from the database: identifiers all point at profiles, anonymous ids and message
    // ids are unique, every acknowledged event is there exactly once.
    let (url_for_check, schema_for_check) = (url.clone(), schema.clone());
    let acknowledged_ids: Vec<String> =
        events.lock().unwrap().iter().filter(|(_, acknowledged)| *acknowledged).map(|(id, _)| id.clone()).collect();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url_for_check, postgres::NoTls).unwrap();
        client.batch_execute(&format!("SET search_path TO \"{schema_for_check}\"")).unwrap();
        let dangling: i64 = client
            .query_one("SELECT count(*) FROM identifiers i LEFT JOIN profiles p ON p.environment_id = i.environment_id AND p.profile_id = i.profile_id WHERE p.profile_id IS NULL", &[])
            .unwrap()
            .get(0);
        assert_eq!(dangling, 0, "identifiers pointing at missing profiles");
        let repeated: i64 = client
            .query_one("SELECT count(*) FROM (SELECT message_id FROM events WHERE message_id IS NOT NULL GROUP BY message_id HAVING count(*) > 1) r", &[])
            .unwrap()
            .get(0);
        assert_eq!(repeated, 0, "events stored twice");
        for message_id in &acknowledged_ids {
            let count: i64 =
                client.query_one("SELECT count(*) FROM events WHERE message_id = $1", &[message_id]).unwrap().get(0);
            assert_eq!(count, 1, "acknowledged event {message_id}");
        }
        roster_store::drop_store_schema(&mut client, &schema_for_check).unwrap();
    })
    .join()
    .expect("database checks");
    drop(second);
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{nanos:x}{}", std::process::id())
}

async fn get(http: &reqwest::Client, url: &str, key: &str) -> (u16, Value) {
    let response = http.get(url).header("X-API-Key", key).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn sql(http: &reqwest::Client, base_url: &str, key: &str, statement: &str) -> Value {
    let response = http
        .post(format!("{base_url}/v1/query"))
        .header("X-API-Key", key)
        .json(&json!({ "sql": statement }))
        .send()
        .await
        .expect("query");
    assert_eq!(response.status(), 200, "{statement}");
    response.json().await.unwrap()
}

/// Flags and environments changed through one node are seen by the other within the refresh
/// bound (one second, plus a round trip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_changed_on_one_node_reaches_the_other_within_the_bound() {
    let Ok(url) = std::env::var("ROSTER_TEST_DATABASE_URL") else {
        skipped(
            "configuration_changed_on_one_node_reaches_the_other_within_the_bound",
            "set ROSTER_TEST_DATABASE_URL (.ci/run does)",
        );
        return;
    };
    let (schema, credentials) = init_schema(&url);
    let client_key = credentials["environments"][0]["client_key"].as_str().unwrap().to_owned();
    let server_key = credentials["environments"][0]["server_key"].as_str().unwrap().to_owned();
    let admin_token = credentials["admin_token"].as_str().unwrap().to_owned();
    let (writer, reader) = (start_node(&url, &schema), start_node(&url, &schema));
    let http = reqwest::Client::new();

    // Both nodes have compiled the (empty) flags before the change.
    let (status, _) = get(&http, &format!("{}/v1/flags", reader.base_url), &client_key).await;
    assert_eq!(status, 200);
    let created = http
        .post(format!("{}/v1/features", writer.base_url))
        .header("X-API-Key", &server_key)
        .json(&json!({ "name": "rollout", "enabled": true, "value": "on" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let changed_at = Instant::now();
    loop {
        let (_, flags) = get(&http, &format!("{}/v1/flags", reader.base_url), &client_key).await;
        if flags["flags"].as_array().is_some_and(|flags| flags.iter().any(|flag| flag["feature"] == "rollout")) {
            break;
        }
        assert!(changed_at.elapsed() < Duration::from_secs(3), "the other node never saw the new feature");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A new environment's keys work on the other node too.
    let environment: Value = http
        .post(format!("{}/v1/admin/environments", writer.base_url))
        .header("X-API-Key", &admin_token)
        .json(&json!({ "slug": "staging" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let staging_key = environment["client_key"].as_str().unwrap().to_owned();
    let changed_at = Instant::now();
    loop {
        let (status, _) = get(&http, &format!("{}/v1/flags", reader.base_url), &staging_key).await;
        if status == 200 {
            break;
        }
        assert!(changed_at.elapsed() < Duration::from_secs(3), "the other node never accepted the new key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((writer, reader));
    let _ = std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        roster_store::drop_store_schema(&mut client, &schema).unwrap();
    })
    .join();
}
