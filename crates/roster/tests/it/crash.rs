//! Durability under `kill -9`: a real `roster serve` child takes concurrent identifies and is
//! killed with SIGKILL mid-load, several times. After each restart the store opens cleanly and
//! every write that was acknowledged before the kill is there.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::RunningServer;

fn start_server(data_directory: &Path) -> RunningServer {
    RunningServer::start(data_directory, &[])
}

/// `roster init --json` on a data directory: the development environment's client and server keys.
fn init(data_directory: &Path) -> (String, String) {
    let credentials = crate::common::init_data_directory(data_directory);
    let environment = &credentials["environments"][0];
    (environment["client_key"].as_str().unwrap().to_owned(), environment["server_key"].as_str().unwrap().to_owned())
}

/// Every profile of the environment, as user id → traits, through the public read API.
async fn all_profiles(http: &reqwest::Client, base_url: &str, server_key: &str) -> BTreeMap<String, Value> {
    let mut profiles = BTreeMap::new();
    let mut after = String::new();
    loop {
        let url = format!("{base_url}/v1/profiles?limit=1000&after={after}");
        let page: Value =
            http.get(url).header("X-API-Key", server_key).send().await.expect("list").json().await.expect("json");
        for profile in page["profiles"].as_array().expect("profiles") {
            profiles.insert(profile["user_id"].as_str().unwrap().to_owned(), profile["traits"].clone());
        }
        match page["next_after"].as_str() {
            Some(next) => after = next.to_owned(),
            None => return profiles,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_sigkill() {
    let data_directory = tempfile::tempdir().unwrap();
    let (client_key, server_key) = init(data_directory.path());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    // user id → traits of every identify the server acknowledged with 200.
    let acknowledged: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();

    for round in 0..4 {
        let mut server = start_server(data_directory.path());
        let before_round = acknowledged.lock().unwrap().len();
        let mut writers = Vec::new();
        for writer in 0..8 {
            let (http, base_url, client_key, acknowledged) =
                (http.clone(), server.base_url.clone(), client_key.clone(), Arc::clone(&acknowledged));
            writers.push(tokio::spawn(async move {
                for sequence in 0..100_000 {
                    let batch: Vec<Value> = (0..10)
                        .map(|item| {
                            json!({
                                "distinct_id": format!("r{round}-w{writer}-s{sequence}-i{item}"),
                                "traits": { "round": round, "sequence": sequence, "item": item }
                            })
                        })
                        .collect();
                    let sent = http
                        .post(format!("{base_url}/identify?sync=true"))
                        .header("X-API-Key", &client_key)
                        .json(&batch)
                        .send()
                        .await;
                    let Ok(response) = sent else { return };
                    if response.status() != reqwest::StatusCode::OK {
                        return;
                    }
                    let mut acknowledged = acknowledged.lock().unwrap();
                    for item in &batch {
                        acknowledged.insert(item["distinct_id"].as_str().unwrap().to_owned(), item["traits"].clone());
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(600 + 150 * round as u64)).await;
        server.child.kill().expect("SIGKILL");
        server.child.wait().unwrap();
        for writer in writers {
            writer.await.unwrap();
        }
        assert!(acknowledged.lock().unwrap().len() > before_round, "round {round} acknowledged nothing");

        let mut restarted = start_server(data_directory.path());
        let stored = all_profiles(&http, &restarted.base_url, &server_key).await;
        let acknowledged = acknowledged.lock().unwrap().clone();
        let missing: Vec<&String> = acknowledged.keys().filter(|user_id| !stored.contains_key(*user_id)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} acknowledged writes lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        for (user_id, traits) in &acknowledged {
            assert_eq!(&stored[user_id], traits, "round {round}: traits of {user_id} differ");
        }
        eprintln!("round {round}: {} acknowledged writes present after SIGKILL and restart", acknowledged.len());
        restarted.child.kill().unwrap();
        restarted.child.wait().unwrap();
    }
}
