//! The binary's set-up commands.

use std::process::Command;

#[test]
fn init_prints_credentials_as_json_once() {
    let data_directory = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["init", "--json", "--data-dir"])
        .arg(data_directory.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "init failed: {}", String::from_utf8_lossy(&output.stderr));
    let credentials: serde_json::Value = serde_json::from_slice(&output.stdout).expect("init --json prints JSON");
    assert!(credentials["admin_token"].as_str().unwrap().starts_with("adm."));
    let environment = &credentials["environments"][0];
    assert_eq!(environment["slug"], "development");
    assert!(environment["client_key"].as_str().is_some_and(|key| !key.is_empty()));
    assert!(environment["server_key"].as_str().unwrap().starts_with("ser."));

    let again = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["init", "--json", "--data-dir"])
        .arg(data_directory.path())
        .output()
        .unwrap();
    assert!(!again.status.success(), "a second init must not mint new credentials");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already initialised"));
}

#[test]
fn environment_settings_are_changed_from_the_command_line() {
    let data_directory = tempfile::tempdir().unwrap();
    crate::common::init_data_directory(data_directory.path());
    let set = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args([
            "environments",
            "set",
            "development",
            "--allowed-origins",
            "https://app.example.com, http://localhost:3000",
        ])
        .args(["--flagsmith-client-key-reads-traits", "false", "--data-dir"])
        .arg(data_directory.path())
        .output()
        .unwrap();
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&set.stdout).unwrap();
    assert_eq!(
        answer["settings"]["allowed_origins"],
        serde_json::json!(["https://app.example.com", "http://localhost:3000"])
    );
    assert_eq!(answer["settings"]["flagsmith_client_key_reads_traits"], false);
    let refused = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["environments", "set", "development", "--allowed-origins", "https://app.example.com/path", "--data-dir"])
        .arg(data_directory.path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("allowed_origins[0]"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn query_reads_a_data_directory_directly() {
    let data_directory = tempfile::tempdir().unwrap();
    crate::common::init_data_directory(data_directory.path());
    let table = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["query", "SELECT count(*) AS profiles, 'x' AS label FROM identities", "--data-dir"])
        .arg(data_directory.path())
        .output()
        .unwrap();
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    assert_eq!(String::from_utf8_lossy(&table.stdout), "profiles | label\n---------+------\n0        | x\n(1 row)\n");
    let refused = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["query", "DELETE FROM identities", "--data-dir"])
        .arg(data_directory.path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("read-only"));
}

#[tokio::test]
async fn query_asks_a_running_server() {
    let server = crate::common::TestServer::start().await;
    server.identify(serde_json::json!({ "distinct_id": "u_1", "traits": { "plan": "pro" } })).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["query", "SELECT distinct_id, traits->>'plan' AS plan FROM identities", "--format", "json", "--url"])
        .arg(&server.base_url)
        .arg("--key")
        .arg(&server.keys.server_key)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["rows"], serde_json::json!([["u_1", "pro"]]));
}
