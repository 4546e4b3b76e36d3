//! `roster import` and `roster export`, run as the real binary on data directories and against a
//! running server.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use crate::common::TestServer;

fn roster(args: &[&str], data_directory: &Path) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_roster")).args(args).arg("--data-dir").arg(data_directory).output();
    output.expect("roster runs")
}

fn succeeded(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "roster failed: {stderr}");
    stderr
}

fn initialised_data_directory() -> tempfile::TempDir {
    let data_directory = tempfile::tempdir().unwrap();
    succeeded(&roster(&["init", "--json"], data_directory.path()));
    data_directory
}

/// The rows of a query on a data directory.
fn query(data_directory: &Path, sql: &str) -> Vec<Value> {
    let output = roster(&["query", sql, "--format", "json"], data_directory);
    succeeded(&output);
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    answer["rows"].as_array().unwrap().clone()
}

/// The summary's figure before `label` (`7 applied`).
fn summary_count(stderr: &str, label: &str) -> u64 {
    let summary = stderr.lines().rfind(|line| line.starts_with("roster import:")).expect("a summary line");
    let words: Vec<&str> = summary.split(|character: char| character == ' ' || character == ',').collect();
    let position = words.iter().position(|word| *word == label).unwrap_or_else(|| panic!("no `{label}` in {summary}"));
    words[position - 1].parse().unwrap()
}

fn rejects(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn write_file(directory: &Path, name: &str, contents: &[u8]) -> std::path::PathBuf {
    let path = directory.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn good_lines_are_applied_and_every_bad_line_is_listed_with_its_line_and_error() {
    let data_directory = initialised_data_directory();
    let files = tempfile::tempdir().unwrap();
    let long_bio = "x".repeat(3000);
    let mut input = Vec::new();
    let lines: Vec<Vec<u8>> = vec![
        br#"{"user_id":"u1","anonymous_id":"a1","traits":{"plan":"pro","age":30}}"#.to_vec(),
        b"{\"user_id\":\"u9\",\"traits\":{\"name\":\"\xff\xfe\"}}".to_vec(),
        br#"{"user_id": "u2", "traits": {"plan": "free""#.to_vec(),
        br#"{"user_id": 42}"#.to_vec(),
        br#"{"user_id":"u3","traits":{"age":"thirty"}}"#.to_vec(),
        format!(r#"{{"user_id":"u4","traits":{{"bio":"{long_bio}"}}}}"#).into_bytes(),
        br#"{"traits":{"plan":"pro"}}"#.to_vec(),
        b"   ".to_vec(),
        br#"{"event":"Checkout","user_id":"u1","properties":{"total":5}}"#.to_vec(),
        br#"{"type":"alias","previous_id":"a2","user_id":"u1"}"#.to_vec(),
        br#"{"user_id":"u5","traits":{"plan":"team"}}"#.to_vec(),
    ];
    for line in &lines {
        input.extend_from_slice(line);
        input.push(b'\n');
    }
    let path = write_file(files.path(), "people.ndjson", &input);

    let stderr = succeeded(&roster(&["import", path.to_str().unwrap()], data_directory.path()));
    assert_eq!(summary_count(&stderr, "lines"), 10, "{stderr}");
    assert_eq!(summary_count(&stderr, "applied"), 4, "{stderr}");
    assert_eq!(summary_count(&stderr, "refused"), 6, "{stderr}");

    let refused = rejects(&files.path().join("people.ndjson.rejects.ndjson"));
    let summary: Vec<(u64, &str, &str)> = refused
        .iter()
        .map(|line| {
            (
                line["line"].as_u64().unwrap(),
                line["error"]["code"].as_str().unwrap(),
                line["error"]["path"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (2, "malformed_json", ""),
            (3, "malformed_json", ""),
            (4, "invalid_type", "user_id"),
            (5, "invalid_reserved_trait", "traits.age"),
            (6, "trait_string_too_long", "traits.bio"),
            (7, "missing_identifier", "distinct_id"),
        ]
    );
    assert!(refused[0]["error"]["message"].as_str().unwrap().contains("UTF-8"));
    assert_eq!(refused[3]["input"], r#"{"user_id":"u3","traits":{"age":"thirty"}}"#);
    let cut = refused[4]["input"].as_str().unwrap();
    assert!(cut.len() <= 2048 + '…'.len_utf8() && cut.ends_with('…'), "the input is cut: {} bytes", cut.len());

    let profiles =
        query(data_directory.path(), "SELECT distinct_id, anonymous_ids, traits FROM identities ORDER BY distinct_id");
    assert_eq!(profiles.len(), 2, "{profiles:?}");
    assert_eq!(profiles[0][0], "u1");
    let anonymous_ids: Value = serde_json::from_str(profiles[0][1].as_str().unwrap()).unwrap();
    assert_eq!(anonymous_ids, json!(["a1", "a2"]));
    assert_eq!(
        serde_json::from_str::<Value>(profiles[0][2].as_str().unwrap()).unwrap(),
        json!({"plan": "pro", "age": 30})
    );
    assert_eq!(profiles[1][0], "u5");
    assert_eq!(query(data_directory.path(), "SELECT count(*) FROM events"), vec![json!([1])]);
}

#[test]
fn an_interrupted_import_run_again_applies_nothing_twice() {
    let data_directory = initialised_data_directory();
    let files = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..40)
        .map(|index| match index % 2 {
            0 => json!({"user_id": format!("u{index}"), "traits": {"n": index}}).to_string(),
            _ => json!({"event": "Visit", "user_id": format!("u{}", index - 1)}).to_string(),
        })
        .collect();
    let first_half = write_file(files.path(), "first_half.ndjson", format!("{}\n", lines[..20].join("\n")).as_bytes());
    let whole = write_file(files.path(), "whole.ndjson", format!("{}\n", lines.join("\n")).as_bytes());

    succeeded(&roster(&["import", first_half.to_str().unwrap(), "--batch-size", "7"], data_directory.path()));
    assert_eq!(query(data_directory.path(), "SELECT count(*) FROM events"), vec![json!([10])]);

    let again = succeeded(&roster(&["import", whole.to_str().unwrap(), "--batch-size", "7"], data_directory.path()));
    assert_eq!(summary_count(&again, "applied"), 20, "{again}");
    assert_eq!(summary_count(&again, "duplicates"), 20, "{again}");
    assert_eq!(query(data_directory.path(), "SELECT count(*) FROM events"), vec![json!([20])]);
    assert_eq!(query(data_directory.path(), "SELECT count(*) FROM identities"), vec![json!([20])]);

    let third = succeeded(&roster(&["import", whole.to_str().unwrap()], data_directory.path()));
    assert_eq!(summary_count(&third, "applied"), 0, "{third}");
    assert_eq!(summary_count(&third, "duplicates"), 40, "{third}");
    assert_eq!(query(data_directory.path(), "SELECT count(*) FROM events"), vec![json!([20])]);
}

#[test]
fn csv_rows_become_identifies_with_typed_traits_and_mapped_columns() {
    let data_directory = initialised_data_directory();
    let files = tempfile::tempdir().unwrap();
    let csv = "\
user_id,anonymous_id,plan,seats,active,zip,timestamp,signup,notes
u1,a1,pro,5,true,007,2026-01-02T03:04:05Z,2025-12-01,\"said \"\"hi\"\", then left\"
u2,,free,1.5,false,,,,
,,orphan,1,,,,,
u3,a3,short
u4,,team,12345678901234567890123,TRUE,,,,[1]
";
    let path = write_file(files.path(), "accounts.csv", csv.as_bytes());
    let stderr = succeeded(&roster(
        &["import", path.to_str().unwrap(), "--map", "plan=traits.tier", "--map", "signup=traits.signed_up_on"],
        data_directory.path(),
    ));
    assert_eq!(summary_count(&stderr, "applied"), 3, "{stderr}");

    let refused = rejects(&files.path().join("accounts.csv.rejects.ndjson"));
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(
        (refused[0]["line"].as_u64(), refused[0]["error"]["code"].as_str()),
        (Some(4), Some("missing_identifier"))
    );
    assert_eq!(refused[0]["input"], ",,orphan,1,,,,,");
    assert_eq!(refused[1]["line"], 5);
    assert!(refused[1]["error"]["message"].as_str().unwrap().contains("3 fields"), "{refused:?}");

    let rows =
        query(data_directory.path(), "SELECT distinct_id, anonymous_ids, traits FROM identities ORDER BY distinct_id");
    let traits: Vec<Value> = rows.iter().map(|row| serde_json::from_str(row[2].as_str().unwrap()).unwrap()).collect();
    assert_eq!(rows[0][0], "u1");
    assert_eq!(rows[0][1], r#"["a1"]"#);
    assert_eq!(
        traits[0],
        json!({"tier": "pro", "seats": 5, "active": true, "zip": "007", "signed_up_on": "2025-12-01",
               "notes": "said \"hi\", then left"})
    );
    assert_eq!(traits[1], json!({"tier": "free", "seats": 1.5, "active": false}));
    assert_eq!(traits[2], json!({"tier": "team", "seats": "12345678901234567890123", "active": "TRUE", "notes": [1]}));
    let written_at =
        query(data_directory.path(), "SELECT timestamp FROM trait_changes WHERE distinct_id = 'u1' AND key = 'tier'");
    assert_eq!(written_at, vec![json!(["2026-01-02T03:04:05.000Z"])]);
}

#[test]
fn a_json_array_from_standard_input_reports_the_line_each_element_starts_on() {
    let data_directory = initialised_data_directory();
    let files = tempfile::tempdir().unwrap();
    let rejects_path = files.path().join("refused.ndjson");
    let mut child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["import", "-", "--format", "json", "--rejects", rejects_path.to_str().unwrap(), "--data-dir"])
        .arg(data_directory.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"[\n  {\"user_id\": \"u1\"},\n  {\"user_id\": \"u2\",\n   \"traits\": 7},\n  {\"event\": \"Open\", \"anonymous_id\": \"a1\"}\n]\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = succeeded(&output);
    assert_eq!(summary_count(&stderr, "applied"), 2, "{stderr}");
    let refused = rejects(&rejects_path);
    assert_eq!(refused.len(), 1);
    assert_eq!((refused[0]["line"].as_u64(), refused[0]["error"]["path"].as_str()), (Some(3), Some("traits")));

    let without_format =
        Command::new(env!("CARGO_BIN_EXE_roster")).args(["import", "-"]).stdin(Stdio::null()).output().unwrap();
    assert!(!without_format.status.success(), "standard input needs --format");
    assert!(String::from_utf8_lossy(&without_format.stderr).contains("--format"));
    let missing = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["import", files.path().join("nothing-here.ndjson").to_str().unwrap(), "--data-dir"])
        .arg(data_directory.path())
        .output()
        .unwrap();
    assert!(!missing.status.success(), "a missing file is fatal");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot open"));
}

#[tokio::test]
async fn import_posts_batches_to_a_running_server_and_export_reads_them_back() {
    let server = TestServer::start().await;
    let files = tempfile::tempdir().unwrap();
    let mut lines = vec![
        json!({"user_id": "u1", "anonymous_id": "a1", "traits": {"plan": "pro"}}).to_string(),
        json!({"event": "Checkout", "user_id": "u1", "properties": {"total": 3}}).to_string(),
        json!({"event": "Checkout", "user_id": "u1", "properties": {"total": 4}}).to_string(),
        "{oops".to_owned(),
        json!({"previous_id": "a2", "user_id": "u1"}).to_string(),
    ];
    // More refusals in one batch than a batch answer lists (50): each still gets its own error.
    for index in 0..60 {
        lines.push(json!({"user_id": format!("long{index}"), "traits": {"bio": "y".repeat(3000)}}).to_string());
    }
    lines.push(json!({"user_id": "u2", "traits": {"plan": "free"}}).to_string());
    let path = write_file(files.path(), "remote.ndjson", format!("{}\n", lines.join("\n")).as_bytes());

    let import = |path: std::path::PathBuf| {
        let (base_url, key) = (server.base_url.clone(), server.keys.client_key.clone());
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_roster"))
                .args(["import", path.to_str().unwrap(), "--batch-size", "2", "--url", &base_url, "--key", &key])
                .output()
                .await
                .unwrap()
        }
    };
    let output = import(path.clone()).await;
    let stderr = succeeded(&output);
    assert_eq!(summary_count(&stderr, "applied"), 5, "{stderr}");
    assert_eq!(summary_count(&stderr, "refused"), 61, "{stderr}");
    let refused = rejects(&files.path().join("remote.ndjson.rejects.ndjson"));
    assert_eq!(refused[0]["line"], 4);
    assert_eq!(refused[0]["error"]["code"], "malformed_json");
    assert_eq!(refused.len(), 61);
    for (offset, line) in refused[1..].iter().enumerate() {
        assert_eq!(line["line"], 6 + offset as u64);
        assert_eq!(
            (line["error"]["code"].as_str(), line["error"]["path"].as_str()),
            (Some("trait_string_too_long"), Some("traits.bio"))
        );
    }
    let again = succeeded(&import(path).await);
    assert_eq!(summary_count(&again, "duplicates"), 5, "{again}");

    let profile = server.profile_of_user("u1").await;
    assert_eq!(profile["anonymous_ids"], json!(["a1", "a2"]));
    let (_, events) = server
        .get(&format!("/v1/profiles/{}/events", profile["profile_id"].as_str().unwrap()), &server.keys.server_key)
        .await;
    assert_eq!(events["events"].as_array().unwrap().len(), 2, "each event once: {events}");

    let export = tokio::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["export", "--events", "--url", &server.base_url, "--key", &server.keys.server_key])
        .output()
        .await
        .unwrap();
    succeeded(&export);
    let exported: Vec<Value> =
        String::from_utf8(export.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let kinds: Vec<(&str, &str)> = exported
        .iter()
        .map(|line| {
            (line["type"].as_str().unwrap(), line["user_id"].as_str().or(line["distinct_id"].as_str()).unwrap())
        })
        .collect();
    assert_eq!(kinds, vec![("profile", "u1"), ("track", "u1"), ("track", "u1"), ("profile", "u2")]);
    assert_eq!(exported[0]["traits"], json!({"plan": "pro"}));
}

/// What identifies a profile and what it holds, without the ids and times a new store mints.
fn portable_profiles(data_directory: &Path) -> Vec<Value> {
    let output = roster(&["export"], data_directory);
    succeeded(&output);
    let mut profiles: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let profile: Value = serde_json::from_str(line).unwrap();
            let mut anonymous_ids: Vec<String> = serde_json::from_value(profile["anonymous_ids"].clone()).unwrap();
            anonymous_ids.sort();
            json!({"user_id": profile["user_id"], "anonymous_ids": anonymous_ids, "email": profile["email"],
                   "traits": profile["traits"], "trait_timestamps": profile["trait_timestamps"]})
        })
        .collect();
    profiles.sort_by_key(|profile| profile.to_string());
    profiles
}

fn portable_events(data_directory: &Path) -> Vec<Value> {
    query(
        data_directory,
        "SELECT distinct_id, anonymous_id, event, properties, timestamp FROM events ORDER BY timestamp, event",
    )
}

#[test]
fn export_then_import_round_trips_profiles_and_events() {
    let original = initialised_data_directory();
    let files = tempfile::tempdir().unwrap();
    let lines = [
        json!({"user_id": "u1", "anonymous_id": "a1", "timestamp": "2026-01-01T00:00:00Z",
               "traits": {"plan": "pro", "email": "Ada@Example.com", "address": {"city": "Paris"}, "tags": ["a", "b"]}}),
        json!({"user_id": "u1", "anonymous_id": "a2", "timestamp": "2026-02-01T00:00:00Z", "traits": {"plan": "team", "seats": 3}}),
        json!({"anonymous_id": "visitor", "timestamp": "2026-01-05T00:00:00Z", "traits": {"utm": "ad"}}),
        json!({"user_id": "u2", "timestamp": "2026-01-03T00:00:00Z", "traits": {"active": false, "score": 1.25}}),
        json!({"event": "Checkout", "user_id": "u1", "timestamp": "2026-02-02T00:00:00Z", "properties": {"total": 9.5}}),
        json!({"event": "Browse", "anonymous_id": "visitor", "timestamp": "2026-01-06T00:00:00Z"}),
    ];
    let source = write_file(
        files.path(),
        "source.ndjson",
        lines.iter().map(|line| format!("{line}\n")).collect::<String>().as_bytes(),
    );
    succeeded(&roster(&["import", source.to_str().unwrap()], original.path()));

    let exported = files.path().join("export.ndjson");
    succeeded(&roster(&["export", "--events", "-o", exported.to_str().unwrap()], original.path()));
    let copy = initialised_data_directory();
    let stderr = succeeded(&roster(&["import", exported.to_str().unwrap()], copy.path()));
    assert_eq!(summary_count(&stderr, "refused"), 0, "{stderr}");
    assert_eq!(portable_profiles(copy.path()), portable_profiles(original.path()));
    assert_eq!(portable_events(copy.path()), portable_events(original.path()));
    assert_eq!(portable_events(copy.path()).len(), 2);

    // Importing the export again changes nothing: every event id is its message id.
    let again = succeeded(&roster(&["import", exported.to_str().unwrap()], copy.path()));
    assert_eq!(summary_count(&again, "applied"), 0, "{again}");
    assert_eq!(portable_events(copy.path()).len(), 2);

    // CSV keeps user ids, anonymous ids and traits (not the times each trait was written).
    let csv = files.path().join("export.csv");
    succeeded(&roster(&["export", "-o", csv.to_str().unwrap()], original.path()));
    let from_csv = initialised_data_directory();
    let stderr = succeeded(&roster(&["import", csv.to_str().unwrap()], from_csv.path()));
    assert_eq!(summary_count(&stderr, "refused"), 0, "{stderr}");
    let without_times = |profiles: Vec<Value>| -> Vec<Value> {
        profiles
            .into_iter()
            .map(|mut profile| {
                profile.as_object_mut().unwrap().remove("trait_timestamps");
                profile
            })
            .collect()
    };
    assert_eq!(without_times(portable_profiles(from_csv.path())), without_times(portable_profiles(original.path())));
}
