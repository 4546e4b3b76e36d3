//! The identity graph over HTTP: emails, identifier changes, alias and explicit merges, devices,
//! reserved traits, erasure, suppression, and races.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{TestServer, assert_error};

#[tokio::test]
async fn profiles_are_found_by_email_and_an_email_is_claimed_once() {
    let server = TestServer::start().await;
    let ada = server.identify(json!({ "distinct_id": "ada", "traits": { "email": "Ada@Example.com" } })).await;
    let (_, found) = server.get("/v1/profiles?email=%20Ada@EXAMPLE.com", &server.keys.server_key).await;
    assert_eq!(found["profiles"][0]["profile_id"], ada["profile_id"]);
    assert_eq!(found["profiles"][0]["email"], "Ada@example.com");

    let other = server.identify(json!({ "distinct_id": "other", "traits": { "email": "Ada@example.com" } })).await;
    assert_eq!(other["status"], "accepted");
    assert_eq!(other["warnings"][0]["code"], "email_owned_by_other_profile");
    assert!(other["warnings"][0]["message"].as_str().unwrap().contains(ada["profile_id"].as_str().unwrap()));
    assert_eq!(server.profile_of_user("other").await["traits"]["email"], "Ada@example.com");
}

#[tokio::test]
async fn reserved_traits_are_typed_and_name_is_filled() {
    let server = TestServer::start().await;
    let (status, body) = server
        .post("/identify", &server.keys.client_key, &json!({ "distinct_id": "u", "traits": { "age": "forty" } }))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_reserved_trait");
    assert_eq!(body["path"], "traits.age");
    let (status, body) = server
        .post(
            "/identify",
            &server.keys.client_key,
            &json!({ "distinct_id": "u", "traits": { "birthday": "next spring" } }),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_reserved_trait");
    server
        .identify(json!({ "distinct_id": "u", "traits": { "first_name": "Grace", "last_name": "Hopper", "birthday": "1906-12-09",
                         "company": { "name": "Navy", "employee_count": 10 } } }))
        .await;
    assert_eq!(server.profile_of_user("u").await["traits"]["name"], "Grace Hopper");
}

#[tokio::test]
async fn identifiers_change_but_the_profile_id_stays() {
    let server = TestServer::start().await;
    let item = server.identify(json!({ "distinct_id": "old", "traits": { "plan": "pro" } })).await;
    let profile_id = item["profile_id"].as_str().unwrap();
    server.identify(json!({ "distinct_id": "someone-else" })).await;
    let path = format!("/v1/profiles/{profile_id}/identifiers");
    let (status, body) = server
        .send(
            reqwest::Method::PATCH,
            &path,
            &server.keys.server_key,
            Some(json!({ "user_id": "new", "email": "n@example.com" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["profile_id"], profile_id);
    assert_eq!((body["user_id"].as_str(), body["email"].as_str()), (Some("new"), Some("n@example.com")));
    assert_eq!(server.profile_of_user("new").await["traits"]["plan"], "pro");

    let (status, body) = server
        .send(reqwest::Method::PATCH, &path, &server.keys.server_key, Some(json!({ "user_id": "someone-else" })))
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "identifier_taken");
    let (status, body) = server.send(reqwest::Method::PATCH, &path, &server.keys.server_key, Some(json!({}))).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "missing_identifier");
    let (status, body) =
        server.send(reqwest::Method::PATCH, &path, &server.keys.client_key, Some(json!({ "user_id": "x" }))).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");

    // A suppressed id cannot be given to a profile.
    let (status, _) = server.send(reqwest::Method::PUT, "/v1/suppressions/hidden", &server.keys.server_key, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) =
        server.send(reqwest::Method::PATCH, &path, &server.keys.server_key, Some(json!({ "user_id": "hidden" }))).await;
    assert_error(status, &body, StatusCode::CONFLICT, "identifier_suppressed");
    assert_eq!(body["path"], "user_id");
}

#[tokio::test]
async fn alias_links_under_identify_rules() {
    let server = TestServer::start().await;
    let anonymous = server.identify(json!({ "anonymous_id": "anon-1", "traits": { "utm": "ad" } })).await;
    let (status, body) =
        server.post("/alias", &server.keys.server_key, &json!({ "previous_id": "anon-1", "user_id": "u1" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["profile_id"], anonymous["profile_id"]);
    assert_eq!(server.profile_of_user("u1").await["traits"]["utm"], "ad");

    server.identify(json!({ "distinct_id": "u2" })).await;
    let (status, body) =
        server.post("/alias", &server.keys.client_key, &json!([{ "previous_id": "u1", "user_id": "u2" }])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["results"][0]["warnings"][0]["code"], "anonymous_id_owned_by_other_user",
        "two identified users never merge by alias"
    );
    let (status, body) = server.post("/alias", &server.keys.client_key, &json!({ "user_id": "u3" })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "missing_identifier");
    assert_eq!(body["path"], "previous_id");
}

#[tokio::test]
async fn an_explicit_merge_joins_two_users_and_reports_what_moved() {
    let server = TestServer::start().await;
    let primary = server.identify(json!({ "distinct_id": "main", "traits": { "plan": "pro" } })).await;
    let secondary =
        server.identify(json!({ "distinct_id": "dup", "anonymous_id": "phone", "traits": { "seats": 2 } })).await;
    let request = json!({ "primary": { "user_id": "main" }, "secondary": { "profile_id": secondary["profile_id"] } });
    let (status, body) = server.post("/v1/profiles/merge", &server.keys.client_key, &request).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = server.post("/v1/profiles/merge", &server.keys.server_key, &request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["profile_id"], primary["profile_id"]);
    assert_eq!(body["merged_profile_id"], secondary["profile_id"]);
    assert_eq!(body["moved_identifiers"].as_array().unwrap().len(), 2);
    assert_eq!(server.profile_of_user("main").await["traits"], json!({ "plan": "pro", "seats": 2 }));

    let (status, body) = server
        .post(
            "/v1/profiles/merge",
            &server.keys.server_key,
            &json!({ "primary": { "user_id": "main" }, "secondary": {} }),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_type");
    assert_eq!(body["path"], "secondary");
    let (status, body) = server
        .post(
            "/v1/profiles/merge",
            &server.keys.server_key,
            &json!({ "primary": { "user_id": "main" }, "secondary": { "email": "none@example.com" } }),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // The merged-away id forwards to the survivor for writes too.
    let old_id = secondary["profile_id"].as_str().unwrap();
    let (status, body) = server
        .send(
            reqwest::Method::PUT,
            &format!("/v1/profiles/{old_id}/devices/tok-m"),
            &server.keys.server_key,
            Some(json!({ "platform": "ios" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["profile_id"], primary["profile_id"]);
    let (status, body) =
        server.send(reqwest::Method::DELETE, &format!("/v1/profiles/{old_id}"), &server.keys.client_key, None).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) =
        server.send(reqwest::Method::DELETE, &format!("/v1/profiles/{old_id}"), &server.keys.server_key, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, found) = server.get("/v1/profiles?user_id=main", &server.keys.server_key).await;
    assert_eq!(found["profiles"], json!([]));
}

#[tokio::test]
async fn devices_are_registered_from_context_and_managed_by_token() {
    let server = TestServer::start().await;
    let item = server
        .identify(json!({ "distinct_id": "u", "context": { "device": { "token": "apns-1", "type": "ios" }, "network": { "cellular": true } } }))
        .await;
    let profile_id = item["profile_id"].as_str().unwrap();
    let device = &server.profile_of_user("u").await["devices"][0];
    assert_eq!((device["token"].as_str(), device["platform"].as_str()), (Some("apns-1"), Some("ios")));
    assert_eq!(device["attributes"]["network_cellular"], true);
    assert!(device["last_used"].is_string());

    let path = format!("/v1/profiles/{profile_id}/devices/fcm-2");
    let (status, body) = server
        .send(
            reqwest::Method::PUT,
            &path,
            &server.keys.server_key,
            Some(json!({ "platform": "android", "attributes": { "push_enabled": true }, "last_status": "sent" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["devices"].as_array().unwrap().len(), 2);
    let (status, body) = server.send(reqwest::Method::DELETE, &path, &server.keys.client_key, None).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, _) = server.send(reqwest::Method::DELETE, &path, &server.keys.server_key, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server.send(reqwest::Method::DELETE, &path, &server.keys.server_key, None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = server.send(reqwest::Method::PUT, &path, &server.keys.client_key, Some(json!({}))).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = server
        .send(reqwest::Method::PUT, "/v1/profiles/nobody/devices/t", &server.keys.server_key, Some(json!({})))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = server
        .post(
            "/identify",
            &server.keys.client_key,
            &json!({ "distinct_id": "u", "context": { "device": { "token": 7 } } }),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_type");
    assert_eq!(body["path"], "context.device.token");
}

#[tokio::test]
async fn erasure_by_any_identifier_leaves_nothing() {
    let server = TestServer::start().await;
    server
        .identify(json!({ "distinct_id": "gone", "anonymous_id": "anon-g", "traits": { "email": "g@example.com" } }))
        .await;
    server.track(json!({ "event": "Bought", "distinct_id": "gone" })).await;
    let (status, body) =
        server.post("/v1/profiles/erase", &server.keys.client_key, &json!({ "anonymous_id": "anon-g" })).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) =
        server.post("/v1/profiles/erase", &server.keys.server_key, &json!({ "anonymous_id": "anon-g" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for lookup in ["user_id=gone", "anonymous_id=anon-g", "email=g@example.com"] {
        let (_, found) = server.get(&format!("/v1/profiles?{lookup}"), &server.keys.server_key).await;
        assert_eq!(found["profiles"], json!([]), "{lookup}");
    }
    assert_eq!(server.sql("SELECT count(*) FROM events").await["rows"], json!([[0]]));
    let (status, body) =
        server.post("/v1/profiles/erase", &server.keys.server_key, &json!({ "user_id": "gone" })).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    let item = server.identify(json!({ "distinct_id": "by-id" })).await;
    let path = format!("/v1/profiles/{}", item["profile_id"].as_str().unwrap());
    let (status, _) = server.send(reqwest::Method::DELETE, &path, &server.keys.server_key, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.get(&path, &server.keys.server_key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn suppressed_user_ids_are_acknowledged_and_dropped_until_lifted() {
    let server = TestServer::start().await;
    let (status, body) =
        server.send(reqwest::Method::PUT, "/v1/suppressions/quiet", &server.keys.client_key, None).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, _) = server.send(reqwest::Method::PUT, "/v1/suppressions/quiet", &server.keys.server_key, None).await;
    assert_eq!(status, StatusCode::OK);
    let item = server.identify(json!({ "distinct_id": "quiet", "traits": { "a": 1 } })).await;
    assert_eq!(item["suppressed"], true);
    let (_, event) =
        server.post("/track", &server.keys.server_key, &json!({ "event": "E", "distinct_id": "quiet" })).await;
    assert_eq!(event["results"][0]["suppressed"], true);
    // A client key is acknowledged without learning that the person is suppressed.
    let item = server.identify_with_client_key(json!({ "distinct_id": "quiet", "traits": { "a": 1 } })).await;
    assert_eq!(item["status"], "accepted");
    assert!(item.get("suppressed").is_none() && item.get("profile_id").is_none(), "{item}");
    let (_, event) =
        server.post("/track", &server.keys.client_key, &json!({ "event": "E", "distinct_id": "quiet" })).await;
    assert!(event["results"][0].get("suppressed").is_none(), "{event}");
    let (_, found) = server.get("/v1/profiles?user_id=quiet", &server.keys.server_key).await;
    assert_eq!(found["profiles"], json!([]));
    let (status, _) =
        server.send(reqwest::Method::DELETE, "/v1/suppressions/quiet", &server.keys.server_key, None).await;
    assert_eq!(status, StatusCode::OK);
    server.identify(json!({ "distinct_id": "quiet", "anonymous_id": "quiet-laptop", "traits": { "a": 2 } })).await;
    assert_eq!(server.profile_of_user("quiet").await["traits"], json!({ "a": 2 }));

    // Once suppressed again, calls naming the person only by a linked anonymous id drop too.
    server.send(reqwest::Method::PUT, "/v1/suppressions/quiet", &server.keys.server_key, None).await;
    let item = server.identify(json!({ "anonymous_id": "quiet-laptop", "traits": { "a": 3 } })).await;
    assert_eq!(item["suppressed"], true);
    let (_, event) =
        server.post("/track", &server.keys.server_key, &json!({ "event": "E", "anonymous_id": "quiet-laptop" })).await;
    assert_eq!(event["results"][0]["suppressed"], true);
    assert_eq!(server.sql("SELECT count(*) FROM events").await["rows"], json!([[0]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_identifies_for_a_new_user_id_create_exactly_one_profile() {
    let server = Arc::new(TestServer::start().await);
    for round in 0..20 {
        let user_id = format!("newcomer-{round}");
        let tasks: Vec<_> = (0..6)
            .map(|racer| {
                let (server, user_id) = (Arc::clone(&server), user_id.clone());
                tokio::spawn(async move {
                    server
                        .identify(json!({ "distinct_id": user_id, "anonymous_id": format!("device-{round}-{racer}"),
                                          "traits": { format!("from_{racer}"): racer } }))
                        .await
                })
            })
            .collect();
        let mut profile_ids = Vec::new();
        for task in tasks {
            profile_ids.push(task.await.unwrap()["profile_id"].clone());
        }
        profile_ids.dedup();
        assert_eq!(profile_ids.len(), 1, "round {round}: every racer lands on one profile");
        let (_, found) = server.get(&format!("/v1/profiles?user_id={user_id}"), &server.keys.server_key).await;
        assert_eq!(found["profiles"].as_array().unwrap().len(), 1);
        assert_eq!(found["profiles"][0]["anonymous_ids"].as_array().unwrap().len(), 6, "round {round}");
        assert_eq!(found["profiles"][0]["traits"].as_object().unwrap().len(), 6, "round {round}");
    }
    let counted = server.sql("SELECT count(*), count(DISTINCT distinct_id) FROM identities").await;
    assert_eq!(counted["rows"], json!([[20, 20]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_logins_on_one_device_leave_the_anonymous_id_in_exactly_one_profile() {
    let server = Arc::new(TestServer::start().await);
    for round in 0..20 {
        let device = format!("shared-device-{round}");
        server.identify(json!({ "anonymous_id": device, "traits": { "round": round } })).await;
        let tasks: Vec<_> = ["alice", "bob"]
            .into_iter()
            .map(|user| {
                let (server, device) = (Arc::clone(&server), device.clone());
                tokio::spawn(async move {
                    server.identify(json!({ "distinct_id": format!("{user}-{round}"), "anonymous_id": device })).await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let alice = server.profile_of_user(&format!("alice-{round}")).await;
        let bob = server.profile_of_user(&format!("bob-{round}")).await;
        let holders = [&alice, &bob]
            .into_iter()
            .filter(|profile| profile["anonymous_ids"].as_array().unwrap().iter().any(|id| id == &json!(device)))
            .count();
        assert_eq!(holders, 1, "round {round}: the anonymous id must be in exactly one profile");
        let (_, by_device) = server.get(&format!("/v1/profiles?anonymous_id={device}"), &server.keys.server_key).await;
        assert_eq!(by_device["profiles"].as_array().unwrap().len(), 1);
    }
}
