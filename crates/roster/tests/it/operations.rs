//! Running Roster on a host: a taken port fails before credentials exist, lost credentials are
//! recovered on the host, backups of the embedded store are consistent while it serves, and
//! reads do not count as updates.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{RunningServer, TestServer, init_data_directory};

fn roster(args: &[&str], data_directory: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_roster")).args(args).arg("--data-dir").arg(data_directory).output().unwrap()
}

#[test]
fn serve_on_a_taken_port_fails_before_creating_any_credential() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let data_directory = tempfile::tempdir().unwrap();
    let output = roster(&["serve", "--listen", &address], data_directory.path());
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot listen"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("admin token"), "credentials printed and lost");
    // Nothing was bootstrapped: the first real start (here `init`) still gets the credentials.
    init_data_directory(data_directory.path());
}

#[tokio::test]
async fn lost_admin_token_and_keys_are_recovered_on_the_host() {
    let data_directory = tempfile::tempdir().unwrap();
    let first = init_data_directory(data_directory.path());
    let old_admin = first["admin_token"].as_str().unwrap().to_owned();
    let old_server_key = first["environments"][0]["server_key"].as_str().unwrap().to_owned();

    let reset = roster(&["admin-token", "reset"], data_directory.path());
    assert!(reset.status.success(), "{}", String::from_utf8_lossy(&reset.stderr));
    let new_admin = serde_json::from_slice::<Value>(&reset.stdout).unwrap()["admin_token"].as_str().unwrap().to_owned();
    assert!(new_admin.starts_with("adm.") && new_admin != old_admin);
    let rotated = roster(&["keys", "rotate", "development"], data_directory.path());
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    let new_server_key =
        serde_json::from_slice::<Value>(&rotated.stdout).unwrap()["server_key"].as_str().unwrap().to_owned();
    let created = roster(&["keys", "create", "staging"], data_directory.path());
    assert!(created.status.success());
    let listed = roster(&["keys", "list"], data_directory.path());
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let slugs: Vec<&str> =
        listed["environments"].as_array().unwrap().iter().map(|e| e["slug"].as_str().unwrap()).collect();
    assert_eq!(slugs, ["development", "staging"]);
    assert!(!listed.to_string().contains("ser."), "server keys are never listed");

    let server = RunningServer::start(data_directory.path(), &[]);
    let http = reqwest::Client::new();
    let status = |key: String, path: &'static str| {
        let request = http.get(format!("{}{path}", server.base_url)).header("X-API-Key", key);
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(status(old_admin, "/v1/admin/environments").await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(new_admin, "/v1/admin/environments").await, StatusCode::OK);
    assert_eq!(status(old_server_key, "/v1/profiles").await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(new_server_key, "/v1/profiles").await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_write_load_restores_every_write_acknowledged_before_it() {
    let data_directory = tempfile::tempdir().unwrap();
    let credentials = init_data_directory(data_directory.path());
    let client_key = credentials["environments"][0]["client_key"].as_str().unwrap().to_owned();
    let server = RunningServer::start(data_directory.path(), &[]);
    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..4 {
        let (base_url, key, acknowledged, stop) =
            (server.base_url.clone(), client_key.clone(), Arc::clone(&acknowledged), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut number = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && number < 5_000 {
                let user_id = format!("w{writer}-{number}");
                let batch: Vec<Value> = (0..20).map(|item| json!({ "user_id": format!("{user_id}-{item}") })).collect();
                let response =
                    http.post(format!("{base_url}/identify")).header("X-API-Key", &key).json(&batch).send().await;
                if response.is_ok_and(|response| response.status() == StatusCode::OK) {
                    acknowledged.lock().unwrap().extend((0..20).map(|item| format!("{user_id}-{item}")));
                }
                number += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_backup: BTreeSet<String> = acknowledged.lock().unwrap().iter().cloned().collect();
    let backup_file = data_directory.path().join("../").join(format!("roster-backup-{}.db", std::process::id()));
    let backup_file = std::path::absolute(&backup_file).unwrap();
    let _ = std::fs::remove_file(&backup_file);
    let backup = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["backup", "--to"])
        .arg(&backup_file)
        .arg("--data-dir")
        .arg(data_directory.path())
        .output()
        .unwrap();
    assert!(backup.status.success(), "{}", String::from_utf8_lossy(&backup.stderr));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(before_backup.len() > 100, "the backup ran under load ({} writes before it)", before_backup.len());

    // Restoring over a running server's store is refused; into a fresh directory it works.
    let refused = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["restore", "--replace", "--from"])
        .arg(&backup_file)
        .arg("--data-dir")
        .arg(data_directory.path())
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a restore replaced the store under a running server");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("server runs"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    drop(server);
    let restored_directory = tempfile::tempdir().unwrap();
    let restore = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["restore", "--from"])
        .arg(&backup_file)
        .arg("--data-dir")
        .arg(restored_directory.path())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&backup_file);
    assert!(restore.status.success(), "{}", String::from_utf8_lossy(&restore.stderr));
    // Every profile, however many (a SQL answer stops at its row cap).
    let export = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["export", "--format", "ndjson", "--data-dir"])
        .arg(restored_directory.path())
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let restored: BTreeSet<String> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok()?["user_id"].as_str().map(str::to_owned))
        .collect();
    let missing: Vec<&String> = before_backup.difference(&restored).collect();
    assert!(
        missing.is_empty(),
        "{} writes acknowledged before the backup are missing, e.g. {:?}",
        missing.len(),
        missing.first()
    );
}

#[tokio::test]
async fn reading_flags_without_traits_does_not_count_as_an_update() {
    let server = TestServer::start().await;
    server.identify(json!({ "user_id": "reader", "traits": { "plan": "pro" } })).await;
    let before = server.profile_of_user("reader").await["updated_at"].clone();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (status, _) = server.post("/v1/flags", &server.keys.client_key, &json!({ "user_id": "reader" })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.profile_of_user("reader").await["updated_at"], before);
}
