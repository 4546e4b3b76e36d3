//! A real Roster (SQLite store, engine, axum server) on a free loopback port, per test.

use std::sync::Arc;

use reqwest::StatusCode;
use roster_core::Limits;
use roster_engine::{Engine, EngineConfig, EnvironmentKeys};
use roster_server::ServerConfig;
use roster_store::SqliteStore;
use serde_json::Value;

pub struct TestServer {
    pub base_url: String,
    pub admin_token: String,
    /// The `development` environment's keys.
    pub keys: EnvironmentKeys,
    pub http: reqwest::Client,
    _data_directory: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        TestServer::start_with(Limits::default(), ServerConfig::default()).await
    }

    pub async fn start_with(limits: Limits, config: ServerConfig) -> Self {
        TestServer::start_with_config(EngineConfig { limits, ..EngineConfig::default() }, config).await
    }

    pub async fn start_with_config(engine_config: EngineConfig, config: ServerConfig) -> Self {
        let data_directory = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(data_directory.path()).expect("open store");
        let engine = Arc::new(Engine::new(Arc::new(store), engine_config).await.expect("engine"));
        let credentials = engine.bootstrap_if_empty().await.expect("bootstrap").expect("fresh store bootstraps");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base_url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(roster_server::serve(listener, engine, config, std::future::pending()));
        TestServer {
            base_url,
            admin_token: credentials.admin_token,
            keys: credentials.environments.into_iter().next().expect("development environment"),
            http: reqwest::Client::new(),
            _data_directory: data_directory,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// POSTs a JSON body with `X-API-Key`.
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> (StatusCode, Value) {
        let response =
            self.http.post(self.url(path)).header("X-API-Key", key).json(body).send().await.expect("request sent");
        read(response).await
    }

    /// POSTs raw bytes with `X-API-Key`.
    pub async fn post_raw(&self, path: &str, key: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(path))
            .header("X-API-Key", key)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent");
        read(response).await
    }

    /// Any method, with `X-API-Key` and an optional JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path)).header("X-API-Key", key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        read(request.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(path)).header("X-API-Key", key).send().await.expect("request sent");
        read(response).await
    }

    /// Identifies with the development client key and asserts it was accepted; returns the item.
    pub async fn identify(&self, body: Value) -> Value {
        let (status, response) = self.post("/identify", &self.keys.client_key, &body).await;
        assert_eq!(status, StatusCode::OK, "identify failed: {response}");
        response["results"][0].clone()
    }

    /// The development environment's profile for a user id (server key).
    pub async fn profile_of_user(&self, user_id: &str) -> Value {
        let (status, response) = self.get(&format!("/v1/profiles?user_id={user_id}"), &self.keys.server_key).await;
        assert_eq!(status, StatusCode::OK, "lookup failed: {response}");
        let profiles = response["profiles"].as_array().expect("profiles array");
        assert_eq!(profiles.len(), 1, "expected one profile for {user_id}: {response}");
        profiles[0].clone()
    }
}

pub async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("response body");
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("response is not JSON ({status}): {text}"));
    (status, body)
}

/// Asserts the public error shape and returns the body for further checks.
pub fn assert_error(status: StatusCode, body: &Value, expected_status: StatusCode, expected_code: &str) {
    assert_eq!(status, expected_status, "unexpected status; body: {body}");
    assert_eq!(body["code"], expected_code, "unexpected code; body: {body}");
    assert!(body["message"].as_str().is_some_and(|message| !message.is_empty()), "message missing: {body}");
    assert!(body["type"].is_string() && body["link"].is_string(), "type/link missing: {body}");
}

/// Says that a test was skipped and why, where the test harness does not swallow it.
pub fn skipped(test: &str, reason: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("SKIPPED {test}: {reason}\n").as_bytes());
}
