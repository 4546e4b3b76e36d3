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
