//! A bounded fuzz run per wire format: generated bodies — shaped like each vendor's messages,
//! with wrong types, odd nesting, huge and empty values, and raw bytes — go to a real server.
//! Every answer must be a 2xx or a 4xx in the public error shape: no panic, no 5xx.
//! `ROSTER_FUZZ_CASES` sets the cases per format (default 150; CI runs the default).

use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::common::TestServer;

/// Field names each format reads, so generated messages reach past the first type check.
const VOCABULARY: &[&str] = &[
    "type",
    "userId",
    "anonymousId",
    "previousId",
    "groupId",
    "traits",
    "context",
    "properties",
    "event",
    "name",
    "category",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "messageId",
    "writeKey",
    "batch",
    "distinct_id",
    "user_id",
    "anonymous_id",
    "previous_id",
    "new_user_id",
    "device_id",
    "traits_set_once",
    "message_id",
    "environment",
    "identifier",
    "trait_key",
    "trait_value",
    "transient",
    "identity",
    "data",
    "id",
    "email",
    "platform",
    "device",
    "primary",
    "secondary",
    "cio_id",
    "transient_traits",
    "plan",
    "age",
    "birthday",
    "address",
    "company",
    "first_name",
    "last_name",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON numbers are finite", |number| number.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
        prop::sample::select(vec![
            "identify",
            "track",
            "page",
            "alias",
            "group",
            "screen",
            "2024-01-01T00:00:00Z",
            "",
            "x@y.z"
        ])
        .prop_map(|text| Value::String(text.to_owned())),
        (1usize..3).prop_map(|size| Value::String("x".repeat(size * 40_000))),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(VOCABULARY.to_vec()), inner), 0..6).prop_map(|fields| {
                Value::Object(fields.into_iter().map(|(key, value)| (key.to_owned(), value)).collect::<Map<_, _>>())
            }),
        ]
    })
}

/// A request body: mostly a JSON object of known fields, sometimes an array, sometimes raw bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::collection::vec((prop::sample::select(VOCABULARY.to_vec()), value()), 0..8).prop_map(|fields| {
            let object: Map<String, Value> = fields.into_iter().map(|(key, value)| (key.to_owned(), value)).collect();
            Value::Object(object).to_string().into_bytes()
        }),
        2 => prop::collection::vec(value(), 0..4).prop_map(|items| Value::Array(items).to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => Just(vec![0x1f, 0x8b, 0x08, 0x00, 0xff, 0xff]),
    ]
}

struct Target {
    method: Method,
    path: &'static str,
    /// `basic`, `environment` or `api`: how this format sends its key.
    auth: &'static str,
    server_key: bool,
}

const TARGETS: &[Target] = &[
    Target { method: Method::POST, path: "/v1/batch", auth: "basic", server_key: false },
    Target { method: Method::POST, path: "/v1/identify", auth: "basic", server_key: false },
    Target { method: Method::POST, path: "/v1/track", auth: "basic", server_key: false },
    Target { method: Method::POST, path: "/v1/alias", auth: "basic", server_key: false },
    Target { method: Method::POST, path: "/v1/group", auth: "basic", server_key: false },
    Target { method: Method::POST, path: "/identify", auth: "api", server_key: false },
    Target { method: Method::POST, path: "/track", auth: "api", server_key: false },
    Target { method: Method::POST, path: "/alias", auth: "api", server_key: false },
    Target { method: Method::POST, path: "/v1/flags", auth: "api", server_key: false },
    Target { method: Method::POST, path: "/api/v1/identities/", auth: "environment", server_key: false },
    Target { method: Method::POST, path: "/api/v1/traits/", auth: "environment", server_key: false },
    Target { method: Method::PUT, path: "/api/v1/traits/bulk/", auth: "environment", server_key: false },
    Target { method: Method::POST, path: "/api/v1/bulk-identities/", auth: "environment", server_key: false },
    Target { method: Method::PUT, path: "/api/v1/customers/fuzz-user", auth: "basic", server_key: true },
    Target { method: Method::POST, path: "/api/v1/customers/fuzz-user/events", auth: "basic", server_key: true },
    Target { method: Method::POST, path: "/api/v1/events", auth: "basic", server_key: true },
    Target { method: Method::PUT, path: "/api/v1/customers/fuzz-user/devices", auth: "basic", server_key: true },
    Target { method: Method::POST, path: "/api/v1/merge_customers", auth: "basic", server_key: true },
    Target { method: Method::POST, path: "/v1/segments", auth: "api", server_key: true },
    Target { method: Method::POST, path: "/v1/features", auth: "api", server_key: true },
    Target { method: Method::POST, path: "/v1/profiles/merge", auth: "api", server_key: true },
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

#[test]
fn every_wire_format_answers_generated_bodies_with_2xx_or_a_clear_4xx() {
    let cases: u32 = std::env::var("ROSTER_FUZZ_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(150);
    let server = Arc::new(runtime().block_on(TestServer::start()));
    for target in TARGETS {
        let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
        let result = runner.run(&body(), |bytes| {
            let server = Arc::clone(&server);
            let (status, answer) = runtime().block_on(async move {
                let key = if target.server_key { &server.keys.server_key } else { &server.keys.client_key };
                let mut request = server.http.request(target.method.clone(), server.url(target.path)).body(bytes);
                request = match target.auth {
                    "basic" => request.basic_auth(if target.server_key { "site" } else { key.as_str() }, Some(key)),
                    "environment" => request.header("X-Environment-Key", key),
                    _ => request.header("X-API-Key", key),
                };
                let response = request.header("Content-Type", "application/json").send().await.expect("request sent");
                let status = response.status();
                (status, response.bytes().await.unwrap_or_default())
            });
            prop_assert!(
                status.as_u16() < 500,
                "{} {} answered {status}: {}",
                target.method,
                target.path,
                String::from_utf8_lossy(&answer)
            );
            if status.is_client_error() {
                let error: Value = serde_json::from_slice(&answer).unwrap_or(json!(null));
                prop_assert!(
                    error["code"].is_string() && error["message"].is_string(),
                    "{} {} answered {status} without the error shape: {}",
                    target.method,
                    target.path,
                    String::from_utf8_lossy(&answer)
                );
            }
            Ok(())
        });
        if let Err(failure) = result {
            panic!("{} {}: {failure}", target.method, target.path);
        }
    }
}
