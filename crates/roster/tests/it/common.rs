//! A real Roster (SQLite store, engine, axum server) on a free loopback port, per test.

use std::sync::Arc;

use reqwest::StatusCode;
use roster_core::Limits;
use roster_engine::{Engine, EngineConfig, EnvironmentKeys};
use roster_server::ServerConfig;
use roster_store::{PostgresOptions, PostgresStore, SqliteStore, Store};
use serde_json::Value;

pub struct TestServer {
    pub base_url: String,
    pub admin_token: String,
    /// The `development` environment's keys.
    pub keys: EnvironmentKeys,
    pub http: reqwest::Client,
    /// What the server stores into, kept until the server is dropped.
    _storage: Storage,
}

/// A test server's storage: a temporary data directory, or a PostgreSQL schema dropped (with the
/// query roles made for it) at the end.
enum Storage {
    Directory(#[allow(dead_code)] tempfile::TempDir),
    Postgres(PostgresSchema),
}

pub struct PostgresSchema {
    pub url: String,
    pub schema: String,
}

impl Drop for PostgresSchema {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        // The blocking client must not run on the test's runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(mut client) = postgres::Client::connect(&url, postgres::NoTls) {
                let _ = roster_store::drop_store_schema(&mut client, &schema);
            }
        })
        .join();
    }
}

/// The PostgreSQL test database's URL, or `None` after saying the test is skipped.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("ROSTER_TEST_DATABASE_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            skipped(test, "set ROSTER_TEST_DATABASE_URL (.ci/run does)");
            None
        }
    }
}

/// A fresh schema name for one test.
pub fn fresh_schema(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}_{}_{nanos:x}_{next}", std::process::id())
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
        TestServer::start_on(Arc::new(store), Storage::Directory(data_directory), engine_config, config).await
    }

    /// A server on a fresh schema of the PostgreSQL test database at `url`.
    pub async fn start_postgres(url: &str, engine_config: EngineConfig, config: ServerConfig) -> Self {
        let schema = fresh_schema("roster_it");
        let options = PostgresOptions { schema: Some(schema.clone()), ..PostgresOptions::new(url) };
        let storage = Storage::Postgres(PostgresSchema { url: url.to_owned(), schema });
        let store = PostgresStore::connect(options).await.expect("connect to the test database");
        TestServer::start_on(Arc::new(store), storage, engine_config, config).await
    }

    /// The PostgreSQL schema the server stores into, if it is on PostgreSQL.
    pub fn postgres_schema(&self) -> Option<&PostgresSchema> {
        match &self._storage {
            Storage::Postgres(schema) => Some(schema),
            Storage::Directory(_) => None,
        }
    }

    async fn start_on(
        store: Arc<dyn Store>,
        storage: Storage,
        engine_config: EngineConfig,
        config: ServerConfig,
    ) -> Self {
        let engine = Arc::new(Engine::new(store, engine_config).await.expect("engine"));
        let credentials = engine.bootstrap_if_empty().await.expect("bootstrap").expect("fresh store bootstraps");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base_url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(roster_server::serve(listener, engine, config, std::future::pending()));
        TestServer {
            base_url,
            admin_token: credentials.admin_token,
            keys: credentials.environments.into_iter().next().expect("development environment"),
            http: reqwest::Client::new(),
            _storage: storage,
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

    /// Identifies with the development server key (whose answer carries the profile id) and
    /// asserts it was accepted; returns the item. What a client key hears is tested apart.
    pub async fn identify(&self, body: Value) -> Value {
        let (status, response) = self.post("/identify", &self.keys.server_key, &body).await;
        assert_eq!(status, StatusCode::OK, "identify failed: {response}");
        response["results"][0].clone()
    }

    /// Identifies with the development client key, as browsers and apps do, and asserts it was
    /// accepted; returns the item (which tells a client key little: see `security.rs`).
    pub async fn identify_with_client_key(&self, body: Value) -> Value {
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

/// A real `roster serve` child process on a data directory; killed when dropped.
pub struct RunningServer {
    pub child: std::process::Child,
    pub base_url: String,
}

impl RunningServer {
    /// Starts `roster serve --listen 127.0.0.1:0 --data-dir DIR` plus `extra` arguments and waits
    /// until it prints where it listens.
    pub fn start(data_directory: &std::path::Path, extra: &[&str]) -> RunningServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_directory)
            .args(extra)
            .env("ROSTER_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn roster serve");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let base_url = loop {
            let line = lines.next().expect("roster serve exited before listening").expect("read stdout");
            if let Some(address) = line.strip_prefix("roster listening on ") {
                break address.trim().to_owned();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        RunningServer { child, base_url }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `roster init --json` on a data directory: the credentials it prints.
pub fn init_data_directory(data_directory: &std::path::Path) -> Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["init", "--json", "--data-dir"])
        .arg(data_directory)
        .output()
        .expect("run roster init");
    assert!(output.status.success(), "init failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("init --json prints JSON")
}
