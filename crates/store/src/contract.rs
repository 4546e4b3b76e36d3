//! The store contract: behaviour every backend must show. Each case is an async function over a
//! `&dyn Store`; `store_contract_suite!` instantiates all of them as tests for one backend, so a new
//! backend proves itself by adding one macro call with its own constructor.

use roster_core::{DeviceUpdate, ErrorCode, IdentifierKind, IdentifyCommand, Limits, Timestamp, TrackCommand};
use serde_json::{Map, Value, json};

use crate::{
    EnvironmentId, NewEnvironment, ProfileFilter, ProfileSelector, QueryBounds, QueryOutput, Store, StoreError,
    WritePolicy,
};

fn at(micros: i64) -> Timestamp {
    Timestamp::from_micros(micros)
}

fn traits(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

fn command(user_id: Option<&str>, anonymous_id: Option<&str>, patch: Value, micros: i64) -> IdentifyCommand {
    IdentifyCommand::new(
        user_id.map(Into::into),
        anonymous_id.map(Into::into),
        traits(patch),
        Map::new(),
        at(micros),
        &Limits::default(),
    )
    .expect("valid test command")
}

fn environment(slug: &str) -> NewEnvironment {
    NewEnvironment {
        slug: slug.into(),
        name: slug.into(),
        client_key: format!("client-{slug}"),
        server_key_hash: format!("hash-{slug}"),
        created_at: at(1),
    }
}

async fn new_environment(store: &dyn Store, slug: &str) -> EnvironmentId {
    store.create_environment(environment(slug)).await.expect("create environment").id
}

/// Applies one identify and returns its profile id, failing the test on any rejection.
async fn identify(store: &dyn Store, environment_id: EnvironmentId, command: IdentifyCommand) -> String {
    let mut results = store.identify(environment_id, vec![command], WritePolicy::default()).await.expect("identify");
    results.remove(0).expect("item accepted").profile_id
}

async fn profile_of(
    store: &dyn Store,
    environment_id: EnvironmentId,
    kind: IdentifierKind,
    value: &str,
) -> crate::Profile {
    store
        .profile_by_identifier(environment_id, kind, value)
        .await
        .expect("lookup")
        .unwrap_or_else(|| panic!("no profile for {} {value}", kind.as_str()))
}

pub async fn bootstrap_happens_once(store: &dyn Store) {
    let first = store.bootstrap(environment("development"), "admin-hash".into()).await.unwrap();
    assert_eq!(first.as_ref().map(|environment| environment.slug.as_str()), Some("development"));
    let second = store.bootstrap(environment("other"), "other-hash".into()).await.unwrap();
    assert!(second.is_none(), "a bootstrapped store must not bootstrap again");
    assert_eq!(store.admin_token_hash().await.unwrap().as_deref(), Some("admin-hash"));
    let slugs: Vec<String> =
        store.environments().await.unwrap().into_iter().map(|environment| environment.slug).collect();
    assert_eq!(slugs, vec!["development".to_owned()]);
}

pub async fn environments_have_unique_slugs_and_rotatable_keys(store: &dyn Store) {
    new_environment(store, "production").await;
    let duplicate = store.create_environment(environment("production")).await;
    assert!(matches!(duplicate, Err(StoreError::Conflict(_))), "got {duplicate:?}");
    let rotated = store
        .replace_environment_keys("production", "client-new".into(), "hash-new".into())
        .await
        .unwrap()
        .expect("environment exists");
    assert_eq!((rotated.client_key.as_str(), rotated.server_key_hash.as_str()), ("client-new", "hash-new"));
    assert!(store.replace_environment_keys("missing", "a".into(), "b".into()).await.unwrap().is_none());
}

pub async fn new_user_and_anonymous_id_make_one_profile(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let profile_id =
        identify(store, environment_id, command(Some("u1"), Some("a1"), json!({ "plan": "pro" }), 10)).await;
    let by_user = profile_of(store, environment_id, IdentifierKind::UserId, "u1").await;
    let by_anonymous = profile_of(store, environment_id, IdentifierKind::AnonymousId, "a1").await;
    assert_eq!(by_user.profile_id, profile_id);
    assert_eq!(by_anonymous.profile_id, profile_id);
    assert_eq!(by_user.user_id.as_deref(), Some("u1"));
    assert!(by_user.identified);
    assert_eq!(by_user.anonymous_ids, vec!["a1".to_owned()]);
    assert_eq!(by_user.traits, traits(json!({ "plan": "pro" })));
    assert_eq!(by_user.trait_timestamps.get("plan"), Some(&at(10)));
    let direct = store.profile(environment_id, &profile_id).await.unwrap().expect("by id");
    assert_eq!(direct, by_user);
}

/// Items of one batch see what the earlier items wrote: the same user twice, an anonymous visitor
/// linked later in the batch, a merge of two profiles both created in the batch.
pub async fn a_batch_sees_its_own_earlier_items(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let results = store
        .identify(
            environment_id,
            vec![
                command(Some("u-a"), None, json!({ "plan": "free", "seats": 1 }), 10),
                command(Some("u-a"), None, json!({ "plan": "pro" }), 20),
                command(None, Some("visitor"), json!({ "source": "ad" }), 30),
                command(Some("u-b"), Some("visitor"), json!({ "role": "admin" }), 40),
                command(None, Some("later"), json!({ "theme": "dark" }), 50),
                command(Some("u-a"), Some("later"), json!({ "seats": 2 }), 60),
            ],
            WritePolicy::default(),
        )
        .await
        .expect("batch applied");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let user_a = profile_of(store, environment_id, IdentifierKind::UserId, "u-a").await;
    assert_eq!(user_a.traits, traits(json!({ "plan": "pro", "seats": 2, "theme": "dark" })));
    assert_eq!(user_a.anonymous_ids, vec!["later".to_owned()]);
    let user_b = profile_of(store, environment_id, IdentifierKind::UserId, "u-b").await;
    assert_eq!(user_b.traits, traits(json!({ "source": "ad", "role": "admin" })));
    assert_eq!(profile_of(store, environment_id, IdentifierKind::AnonymousId, "visitor").await, user_b);
    let page = store.list_profiles(environment_id, ProfileFilter::default(), None, 10).await.unwrap();
    assert_eq!(page.profiles.len(), 2, "the anonymous profiles were absorbed: {page:?}");
}

pub async fn traits_patch_delete_and_order_by_timestamp(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    identify(
        store,
        environment_id,
        command(Some("u1"), None, json!({ "plan": "pro", "seats": 3, "role": "admin" }), 10),
    )
    .await;
    identify(store, environment_id, command(Some("u1"), None, json!({ "seats": null }), 20)).await;
    // Older than the stored plan and the seats tombstone: neither changes; `age` is new and lands.
    let results = store
        .identify(
            environment_id,
            vec![command(Some("u1"), None, json!({ "plan": "free", "seats": 9, "age": 41 }), 5)],
            WritePolicy::default(),
        )
        .await
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap().changed_traits, vec!["age".to_owned()]);
    let profile = profile_of(store, environment_id, IdentifierKind::UserId, "u1").await;
    assert_eq!(profile.traits, traits(json!({ "plan": "pro", "role": "admin", "age": 41 })));
    assert!(!profile.trait_timestamps.contains_key("seats"), "tombstones are not shown as traits");
}

pub async fn numbers_and_nested_values_are_kept_exactly(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let sent: Value = serde_json::from_str(
        r#"{"int":1,"float":1.5,"whole":2.0,"negative":-7,"flag":false,"address":{"city":"Paris","lines":["a",1]}}"#,
    )
    .unwrap();
    identify(store, environment_id, command(Some("u1"), None, sent.clone(), 1)).await;
    let profile = profile_of(store, environment_id, IdentifierKind::UserId, "u1").await;
    assert_eq!(serde_json::to_string(&profile.traits).unwrap(), serde_json::to_string(&sent).unwrap());
}

pub async fn anonymous_profile_becomes_the_users_on_first_identify(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let anonymous_profile =
        identify(store, environment_id, command(None, Some("a1"), json!({ "source": "ad" }), 1)).await;
    let before = profile_of(store, environment_id, IdentifierKind::AnonymousId, "a1").await;
    assert!(!before.identified && before.user_id.is_none());
    let user_profile =
        identify(store, environment_id, command(Some("u1"), Some("a1"), json!({ "plan": "pro" }), 2)).await;
    assert_eq!(user_profile, anonymous_profile, "the anonymous profile is the user's now; its id is kept");
    let profile = profile_of(store, environment_id, IdentifierKind::UserId, "u1").await;
    assert_eq!(profile.traits, traits(json!({ "source": "ad", "plan": "pro" })));
    assert!(profile.identified);
}

pub async fn anonymous_profile_merges_into_a_known_user(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let user_profile = identify(
        store,
        environment_id,
        command(Some("u1"), Some("laptop"), json!({ "plan": "pro", "color": "red" }), 10),
    )
    .await;
    let anonymous_profile = identify(
        store,
        environment_id,
        command(None, Some("phone"), json!({ "plan": "free", "color": "blue", "os": "ios" }), 5),
    )
    .await;
    identify(store, environment_id, command(None, Some("phone"), json!({ "color": "blue" }), 20)).await;
    assert_ne!(user_profile, anonymous_profile);

    let results = store
        .identify(environment_id, vec![command(Some("u1"), Some("phone"), json!({}), 30)], WritePolicy::default())
        .await
        .unwrap();
    let outcome = results[0].as_ref().unwrap();
    assert_eq!(outcome.profile_id, user_profile);
    assert_eq!(outcome.merged_profile_ids, vec![anonymous_profile.clone()]);

    let merged = profile_of(store, environment_id, IdentifierKind::UserId, "u1").await;
    // Each trait keeps its newest write, wherever it came from.
    assert_eq!(merged.traits, traits(json!({ "plan": "pro", "color": "blue", "os": "ios" })));
    assert_eq!(merged.anonymous_ids, vec!["laptop".to_owned(), "phone".to_owned()]);
    assert_eq!(profile_of(store, environment_id, IdentifierKind::AnonymousId, "phone").await.profile_id, user_profile);
    let forwarded = store.profile(environment_id, &anonymous_profile).await.unwrap().expect("old id forwards");
    assert_eq!(forwarded.profile_id, user_profile);
}

pub async fn two_identified_users_are_never_merged(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let first =
        identify(store, environment_id, command(Some("alice"), Some("shared-tablet"), json!({ "name": "Alice" }), 1))
            .await;
    let results = store
        .identify(
            environment_id,
            vec![command(Some("bob"), Some("shared-tablet"), json!({ "name": "Bob" }), 2)],
            WritePolicy::default(),
        )
        .await
        .unwrap();
    let outcome = results[0].as_ref().unwrap();
    assert_ne!(outcome.profile_id, first);
    assert!(outcome.merged_profile_ids.is_empty());
    assert_eq!(outcome.warnings.len(), 1);
    let alice = profile_of(store, environment_id, IdentifierKind::UserId, "alice").await;
    let bob = profile_of(store, environment_id, IdentifierKind::UserId, "bob").await;
    assert_eq!(alice.traits, traits(json!({ "name": "Alice" })));
    assert_eq!(bob.traits, traits(json!({ "name": "Bob" })));
    assert_eq!(profile_of(store, environment_id, IdentifierKind::AnonymousId, "shared-tablet").await.profile_id, first);
}

pub async fn environments_are_isolated(store: &dyn Store) {
    let production = new_environment(store, "production").await;
    let staging = new_environment(store, "staging").await;
    let in_production = identify(store, production, command(Some("u1"), None, json!({ "plan": "pro" }), 1)).await;
    let in_staging = identify(store, staging, command(Some("u1"), None, json!({ "plan": "free" }), 1)).await;
    assert_ne!(in_production, in_staging);
    assert!(store.profile(staging, &in_production).await.unwrap().is_none());
    assert_eq!(
        profile_of(store, production, IdentifierKind::UserId, "u1").await.traits,
        traits(json!({ "plan": "pro" }))
    );
    let listed = store.list_profiles(staging, ProfileFilter::default(), None, 10).await.unwrap();
    assert_eq!(listed.profiles.len(), 1);
}

pub async fn profile_limits_reject_only_the_offending_item(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let limits = Limits { max_traits_per_profile: 2, ..Limits::default() };
    let results = store
        .identify(
            environment_id,
            vec![
                command(Some("u1"), None, json!({ "a": 1, "b": 2 }), 1),
                command(Some("u1"), None, json!({ "c": 3 }), 2),
                command(Some("u2"), None, json!({ "a": 1 }), 3),
            ],
            WritePolicy { limits, ..WritePolicy::default() },
        )
        .await
        .unwrap();
    assert!(results[0].is_ok());
    assert_eq!(results[1].as_ref().unwrap_err().code, ErrorCode::TooManyTraits);
    assert!(results[2].is_ok());
    assert_eq!(
        profile_of(store, environment_id, IdentifierKind::UserId, "u1").await.traits,
        traits(json!({ "a": 1, "b": 2 }))
    );
}

pub async fn listing_pages_in_id_order_and_filters_by_typed_trait(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    for index in 0..5 {
        let plan = if index % 2 == 0 { json!("pro") } else { json!("free") };
        identify(
            store,
            environment_id,
            command(Some(&format!("u{index}")), None, json!({ "plan": plan, "seats": 30 }), 1),
        )
        .await;
    }
    identify(store, environment_id, command(Some("string-seats"), None, json!({ "seats": "30" }), 1)).await;

    let first = store.list_profiles(environment_id, ProfileFilter::default(), None, 4).await.unwrap();
    assert_eq!(first.profiles.len(), 4);
    let second =
        store.list_profiles(environment_id, ProfileFilter::default(), first.next_after.clone(), 4).await.unwrap();
    assert_eq!(second.profiles.len(), 2);
    assert!(second.next_after.is_none());
    let mut all: Vec<String> =
        first.profiles.iter().chain(&second.profiles).map(|profile| profile.profile_id.clone()).collect();
    let listed = all.clone();
    all.sort();
    all.dedup();
    assert_eq!(all, listed, "pages are ordered and do not overlap");

    let pro = ProfileFilter { trait_equals: Some(("plan".into(), json!("pro"))) };
    assert_eq!(store.list_profiles(environment_id, pro, None, 10).await.unwrap().profiles.len(), 3);
    let numeric_seats = ProfileFilter { trait_equals: Some(("seats".into(), json!(30))) };
    assert_eq!(store.list_profiles(environment_id, numeric_seats, None, 10).await.unwrap().profiles.len(), 5);
    let text_seats = ProfileFilter { trait_equals: Some(("seats".into(), json!("30"))) };
    let text_matches = store.list_profiles(environment_id, text_seats, None, 10).await.unwrap().profiles;
    assert_eq!(text_matches.len(), 1);
    assert_eq!(text_matches[0].user_id.as_deref(), Some("string-seats"));
}

pub async fn replaying_a_batch_in_any_order_gives_the_same_profile(store: &dyn Store) {
    let production = new_environment(store, "production").await;
    let replica = new_environment(store, "replica").await;
    let batch = vec![
        command(Some("u1"), None, json!({ "plan": "pro", "seats": 3 }), 10),
        command(Some("u1"), None, json!({ "plan": "team", "seats": null }), 30),
        command(Some("u1"), None, json!({ "plan": "free", "role": "owner" }), 20),
    ];
    store.identify(production, batch.clone(), WritePolicy::default()).await.unwrap();
    store.identify(production, batch.clone(), WritePolicy::default()).await.unwrap();
    let mut reversed = batch;
    reversed.reverse();
    store.identify(replica, reversed, WritePolicy::default()).await.unwrap();
    let forward = profile_of(store, production, IdentifierKind::UserId, "u1").await;
    let backward = profile_of(store, replica, IdentifierKind::UserId, "u1").await;
    assert_eq!(forward.traits, traits(json!({ "plan": "team", "role": "owner" })));
    assert_eq!(forward.traits, backward.traits);
    assert_eq!(forward.trait_timestamps, backward.trait_timestamps);
}

fn track(user_id: Option<&str>, anonymous_id: Option<&str>, event: &str, micros: i64) -> TrackCommand {
    TrackCommand::new(
        user_id.map(Into::into),
        anonymous_id.map(Into::into),
        Some(event.into()),
        traits(json!({ "source": "test" })),
        at(micros),
        None,
        &Limits::default(),
    )
    .expect("valid test event")
}

async fn record(store: &dyn Store, environment_id: EnvironmentId, command: TrackCommand) -> crate::TrackOutcome {
    let mut results = store.track(environment_id, vec![command], WritePolicy::default()).await.expect("track");
    results.remove(0).expect("event accepted")
}

fn bounds() -> QueryBounds {
    QueryBounds { timeout: std::time::Duration::from_secs(5), max_rows: 1000 }
}

async fn sql(store: &dyn Store, environment_id: EnvironmentId, statement: &str) -> QueryOutput {
    store.query(environment_id, statement, bounds()).await.unwrap_or_else(|error| panic!("{statement}: {error}"))
}

pub async fn events_carry_the_traits_of_their_moment(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let profile_id = identify(store, environment_id, command(Some("u1"), None, json!({ "plan": "free" }), 1)).await;
    let first = record(store, environment_id, track(Some("u1"), None, "Viewed Pricing", 2)).await;
    identify(store, environment_id, command(Some("u1"), None, json!({ "plan": "pro" }), 3)).await;
    let second = record(store, environment_id, track(Some("u1"), None, "Upgraded", 4)).await;
    assert_eq!((first.profile_id.as_str(), second.profile_id.as_str()), (profile_id.as_str(), profile_id.as_str()));

    let page = store.profile_events(environment_id, &profile_id, None, 10).await.unwrap().expect("profile exists");
    let names: Vec<&str> = page.events.iter().map(|event| event.event.as_str()).collect();
    assert_eq!(names, vec!["Upgraded", "Viewed Pricing"], "newest first");
    assert_eq!(page.events[0].identity_traits, traits(json!({ "plan": "pro" })));
    assert_eq!(page.events[1].identity_traits, traits(json!({ "plan": "free" })));
    assert_eq!(page.events[0].properties, traits(json!({ "source": "test" })));
    assert_eq!(page.events[0].timestamp, at(4));
    assert!(store.profile_events(environment_id, "missing", None, 10).await.unwrap().is_none());
}

pub async fn event_pages_walk_back_in_time_without_overlap(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    for micros in 0..7 {
        record(store, environment_id, track(Some("u1"), None, &format!("e{micros}"), micros)).await;
    }
    let profile_id = profile_of(store, environment_id, IdentifierKind::UserId, "u1").await.profile_id;
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store.profile_events(environment_id, &profile_id, before, 3).await.unwrap().unwrap();
        seen.extend(page.events.iter().map(|event| event.event.clone()));
        match page.next_before {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, vec!["e6", "e5", "e4", "e3", "e2", "e1", "e0"]);
}

pub async fn track_only_distinct_id_is_not_identified_and_merges_at_login(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    // Before login the SDK sends the device id as distinct_id.
    let device = record(store, environment_id, track(Some("device-1"), None, "Opened App", 1)).await;
    let before = profile_of(store, environment_id, IdentifierKind::UserId, "device-1").await;
    assert!(!before.identified, "a distinct id seen only in track is not identified");
    let user_profile = identify(store, environment_id, command(Some("u1"), None, json!({ "plan": "pro" }), 2)).await;
    // At login: identify(distinct_id=user, anonymous_id=<the earlier distinct_id>).
    let results = store
        .identify(environment_id, vec![command(Some("u1"), Some("device-1"), json!({}), 3)], WritePolicy::default())
        .await
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap().merged_profile_ids, vec![device.profile_id.clone()]);
    let page = store.profile_events(environment_id, &user_profile, None, 10).await.unwrap().unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].distinct_id.as_deref(), Some("u1"));
    let output = sql(store, environment_id, "SELECT distinct_id, event FROM events").await;
    assert_eq!(output.rows, vec![vec![json!("u1"), json!("Opened App")]]);
    assert!(store.profile_by_identifier(environment_id, IdentifierKind::UserId, "device-1").await.unwrap().is_none());
    assert_eq!(
        profile_of(store, environment_id, IdentifierKind::AnonymousId, "device-1").await.profile_id,
        user_profile
    );
}

pub async fn a_track_only_profile_becomes_the_new_users_at_login(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let device = record(store, environment_id, track(Some("device-2"), None, "Opened App", 1)).await;
    let login = store
        .identify(
            environment_id,
            vec![command(Some("u2"), Some("device-2"), json!({ "plan": "free" }), 2)],
            WritePolicy::default(),
        )
        .await
        .unwrap();
    let outcome = login[0].as_ref().unwrap();
    assert_eq!(outcome.profile_id, device.profile_id, "the device's profile is the user's now");
    assert!(outcome.merged_profile_ids.is_empty());
    let profile = profile_of(store, environment_id, IdentifierKind::UserId, "u2").await;
    assert!(profile.identified);
    assert_eq!(profile.anonymous_ids, vec!["device-2".to_owned()], "the old distinct id is kept as a device id");
    assert!(store.profile_by_identifier(environment_id, IdentifierKind::UserId, "device-2").await.unwrap().is_none());
    let output = sql(store, environment_id, "SELECT distinct_id FROM events").await;
    assert_eq!(output.rows, vec![vec![json!("u2")]]);
    // A late pre-login event, sent with the device id after login, still lands on the user.
    let late = record(store, environment_id, track(Some("device-2"), None, "Late", 3)).await;
    assert_eq!(late.profile_id, device.profile_id);
}

pub async fn an_identify_and_a_track_may_share_a_message_id(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let identify_command =
        command(Some("u1"), None, json!({}), 1).with_message_id(Some("m".into()), &Limits::default()).unwrap();
    store.identify(environment_id, vec![identify_command], WritePolicy::default()).await.unwrap();
    let mut event = track(Some("u1"), None, "Paid", 2);
    event.message_id = Some("m".into());
    let outcome = record(store, environment_id, event).await;
    assert!(!outcome.duplicate);
    assert!(!outcome.event_id.is_empty());
}

pub async fn deletes_of_unknown_traits_count_towards_the_profile_size(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let policy =
        WritePolicy { limits: Limits { max_profile_bytes: 200, ..Limits::default() }, ..WritePolicy::default() };
    let deletes: Map<String, Value> = (0..50).map(|index| (format!("made_up_{index}"), Value::Null)).collect();
    let results = store
        .identify(environment_id, vec![command(Some("u1"), None, Value::Object(deletes), 1)], policy)
        .await
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap_err().code, ErrorCode::ProfileTooLarge);
}

pub async fn anonymous_events_follow_the_profile_when_it_is_identified(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    record(store, environment_id, track(None, Some("anon-7"), "Landing", 1)).await;
    identify(store, environment_id, command(Some("u7"), Some("anon-7"), json!({}), 2)).await;
    let output = sql(store, environment_id, "SELECT distinct_id, anonymous_id FROM events").await;
    assert_eq!(output.rows, vec![vec![json!("u7"), json!("anon-7")]]);
}

pub async fn resent_message_ids_are_applied_once(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let first = command(Some("u1"), None, json!({ "n": 1 }), 1)
        .with_message_id(Some("m-1".into()), &Limits::default())
        .unwrap();
    let resent = command(Some("u1"), None, json!({ "n": 2 }), 2)
        .with_message_id(Some("m-1".into()), &Limits::default())
        .unwrap();
    let results = store.identify(environment_id, vec![first, resent], WritePolicy::default()).await.unwrap();
    assert!(!results[0].as_ref().unwrap().duplicate);
    assert!(results[1].as_ref().unwrap().duplicate);
    assert_eq!(results[1].as_ref().unwrap().profile_id, results[0].as_ref().unwrap().profile_id);
    assert_eq!(profile_of(store, environment_id, IdentifierKind::UserId, "u1").await.traits, traits(json!({ "n": 1 })));

    let mut event = track(Some("u1"), None, "Paid", 3);
    event.message_id = Some("m-2".into());
    let outcomes =
        store.track(environment_id, vec![event.clone(), event.clone()], WritePolicy::default()).await.unwrap();
    assert!(outcomes[1].as_ref().unwrap().duplicate);
    assert_eq!(outcomes[1].as_ref().unwrap().event_id, outcomes[0].as_ref().unwrap().event_id);
    assert_eq!(sql(store, environment_id, "SELECT count(*) FROM events").await.rows, vec![vec![json!(1)]]);

    // Outside the window a resend counts again.
    let no_window = WritePolicy { dedup_window_micros: 0, ..WritePolicy::default() };
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let outcomes = store.track(environment_id, vec![event], no_window).await.unwrap();
    assert!(!outcomes[0].as_ref().unwrap().duplicate);
}

pub async fn trait_history_records_winning_changes_only(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    identify(store, environment_id, command(Some("u1"), None, json!({ "plan": "free" }), 10)).await;
    identify(store, environment_id, command(Some("u1"), None, json!({ "plan": "free" }), 15)).await;
    identify(store, environment_id, command(Some("u1"), None, json!({ "plan": "pro" }), 20)).await;
    identify(store, environment_id, command(Some("u1"), None, json!({ "plan": "starter" }), 5)).await;
    identify(store, environment_id, command(Some("u1"), None, json!({ "plan": null }), 30)).await;
    let output = sql(
        store,
        environment_id,
        "SELECT key, old_value, new_value, distinct_id FROM trait_changes WHERE key = 'plan' ORDER BY timestamp",
    )
    .await;
    assert_eq!(
        output.rows,
        vec![
            vec![json!("plan"), json!(null), json!("free"), json!("u1")],
            vec![json!("plan"), json!("free"), json!("pro"), json!("u1")],
            vec![json!("plan"), json!("pro"), json!(null), json!("u1")],
        ]
    );
}

pub async fn expired_message_ids_and_history_are_purged(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let tagged = |micros| {
        command(Some("u1"), None, json!({ "plan": format!("p{micros}") }), micros)
            .with_message_id(Some("m-1".into()), &Limits::default())
            .unwrap()
    };
    store.identify(environment_id, vec![tagged(1)], WritePolicy::default()).await.unwrap();
    let count = |output: QueryOutput| output.rows[0][0].clone();
    assert_eq!(count(sql(store, environment_id, "SELECT count(*) FROM trait_changes").await), json!(1));

    // Nothing is older than the epoch: nothing goes.
    assert_eq!(store.purge_expired(at(0), Some(at(0))).await.unwrap(), 0);
    let far_future = Timestamp::from_micros(i64::MAX);
    assert!(store.purge_expired(far_future, Some(far_future)).await.unwrap() >= 2);
    assert_eq!(count(sql(store, environment_id, "SELECT count(*) FROM trait_changes").await), json!(0));
    let resent = store.identify(environment_id, vec![tagged(2)], WritePolicy::default()).await.unwrap();
    assert!(!resent[0].as_ref().unwrap().duplicate, "a purged message id counts as new");
    // Without a history retention, history stays.
    store.purge_expired(far_future, None).await.unwrap();
    assert_eq!(count(sql(store, environment_id, "SELECT count(*) FROM trait_changes").await), json!(1));
}

pub async fn the_seed_queries_run_as_written(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    identify(
        store,
        environment_id,
        command(Some("u_1"), None, json!({ "plan": "premium", "email": "a@example.com" }), 1),
    )
    .await;
    record(store, environment_id, track(Some("u_1"), None, "Checkout", 2)).await;
    let identities = sql(
        store,
        environment_id,
        "SELECT distinct_id, traits->>'email' AS email, traits->>'plan' AS plan, updated_at FROM identities ORDER BY updated_at DESC;",
    )
    .await;
    assert_eq!(identities.columns, vec!["distinct_id", "email", "plan", "updated_at"]);
    assert_eq!(&identities.rows[0][..3], &[json!("u_1"), json!("a@example.com"), json!("premium")]);
    let events = sql(
        store,
        environment_id,
        "SELECT e.event, e.properties, e.timestamp, e.identity_traits->>'email' AS email, e.identity_traits->>'plan' AS plan \
         FROM events e WHERE e.distinct_id = 'u_1' ORDER BY e.timestamp DESC;",
    )
    .await;
    assert_eq!(events.rows.len(), 1);
    assert_eq!(events.rows[0][0], json!("Checkout"));
    assert_eq!(events.rows[0][2], json!("1970-01-01T00:00:00.000Z"));
    assert_eq!(&events.rows[0][3..], &[json!("a@example.com"), json!("premium")]);
}

pub async fn queries_see_only_their_environment(store: &dyn Store) {
    let production = new_environment(store, "production").await;
    let staging = new_environment(store, "staging").await;
    for index in 0..3 {
        identify(store, production, command(Some(&format!("p{index}")), None, json!({}), 1)).await;
    }
    identify(store, staging, command(Some("s0"), None, json!({}), 1)).await;
    record(store, staging, track(Some("s0"), None, "Only Staging", 1)).await;
    assert_eq!(sql(store, production, "SELECT count(*) FROM identities").await.rows, vec![vec![json!(3)]]);
    assert_eq!(
        sql(store, staging, "SELECT count(*), min(environment) FROM identities").await.rows,
        vec![vec![json!(1), json!("staging")]]
    );
    assert_eq!(sql(store, production, "SELECT count(*) FROM events").await.rows, vec![vec![json!(0)]]);
    let joined =
        sql(store, production, "SELECT count(*) FROM identities i JOIN events e ON e.profile_id = i.profile_id").await;
    assert_eq!(joined.rows, vec![vec![json!(0)]]);
}

pub async fn queries_refuse_writes_and_escapes(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    identify(store, environment_id, command(Some("u1"), None, json!({}), 1)).await;
    for statement in [
        "DELETE FROM identities",
        "INSERT INTO events (event) VALUES ('x')",
        "UPDATE identities SET distinct_id = 'x'",
        "CREATE TABLE stolen AS SELECT * FROM identities",
        "DROP VIEW identities",
        "PRAGMA table_info(profiles)",
        "ATTACH DATABASE '/tmp/other.db' AS other",
        "BEGIN",
        "EXPLAIN SELECT * FROM identities",
        "SELECT 1; DELETE FROM identities",
    ] {
        let result = store.query(environment_id, statement, bounds()).await;
        assert!(matches!(result, Err(StoreError::QueryRefused(_))), "{statement} was not refused: {result:?}");
    }
    // Anything beyond the views is refused or does not exist; either way no rows come back.
    for statement in [
        "SELECT * FROM profiles",
        "SELECT count(*) FROM profiles",
        "SELECT * FROM main.profiles",
        "SELECT * FROM identifiers",
        "SELECT * FROM environments",
        "SELECT * FROM trait_history",
        "SELECT name FROM sqlite_master",
        "SELECT sql FROM sqlite_temp_master",
        "SELECT * FROM pragma_table_info('profiles')",
        "SELECT * FROM pragma_database_list",
        "SELECT count(*) FROM pragma_table_list",
        "SELECT * FROM sqlite_stat1",
    ] {
        let result = store.query(environment_id, statement, bounds()).await;
        assert!(
            matches!(result, Err(StoreError::QueryRefused(_) | StoreError::QueryFailed(_))),
            "{statement} reached beyond the views: {result:?}"
        );
    }
    assert!(matches!(
        store.query(environment_id, "SELECT no_such_column FROM identities", bounds()).await,
        Err(StoreError::QueryFailed(_))
    ));
    assert_eq!(sql(store, environment_id, "SELECT count(*) FROM identities").await.rows, vec![vec![json!(1)]]);
}

pub async fn queries_stop_at_their_time_and_row_limits(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n";
    let quick = QueryBounds { timeout: std::time::Duration::from_millis(100), max_rows: 10 };
    let started = std::time::Instant::now();
    let result = store.query(environment_id, endless, quick.clone()).await;
    assert!(matches!(result, Err(StoreError::QueryTimeout(_))), "{result:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let many = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) SELECT i FROM n";
    let output = store.query(environment_id, many, quick.clone()).await.unwrap();
    assert_eq!(output.rows.len(), 10);
    assert!(output.truncated);
}

fn with_device(mut command: IdentifyCommand, context: Value) -> IdentifyCommand {
    command = command.with_context(context.as_object(), &Limits::default()).expect("valid context");
    command
}

fn by_user(user_id: &str) -> ProfileSelector {
    ProfileSelector::Identifier(IdentifierKind::UserId, user_id.into())
}

pub async fn email_becomes_a_normalised_identifier_held_by_one_profile(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let ada =
        identify(store, environment_id, command(Some("ada"), None, json!({ "email": " Ada@Example.COM " }), 1)).await;
    let by_email = profile_of(store, environment_id, IdentifierKind::Email, "Ada@example.com").await;
    assert_eq!(by_email.profile_id, ada);
    assert_eq!(by_email.email.as_deref(), Some("Ada@example.com"));

    let results = store
        .identify(
            environment_id,
            vec![command(Some("impostor"), None, json!({ "email": "Ada@example.com" }), 2)],
            WritePolicy::default(),
        )
        .await
        .unwrap();
    let outcome = results[0].as_ref().unwrap();
    assert_eq!(outcome.warnings.len(), 1);
    assert_eq!(outcome.warnings[0].code(), "email_owned_by_other_profile");
    assert!(outcome.warnings[0].message().contains(&ada));
    let impostor = profile_of(store, environment_id, IdentifierKind::UserId, "impostor").await;
    assert_eq!(impostor.traits["email"], json!("Ada@example.com"), "the trait is still stored");
    assert_eq!(impostor.email, None);
    assert_eq!(profile_of(store, environment_id, IdentifierKind::Email, "Ada@example.com").await.profile_id, ada);

    // Changing the email moves the identifier; deleting it removes it.
    identify(store, environment_id, command(Some("ada"), None, json!({ "email": "ada@new.example" }), 3)).await;
    assert!(
        store.profile_by_identifier(environment_id, IdentifierKind::Email, "Ada@example.com").await.unwrap().is_none()
    );
    assert_eq!(profile_of(store, environment_id, IdentifierKind::Email, "ada@new.example").await.profile_id, ada);
    identify(store, environment_id, command(Some("ada"), None, json!({ "email": null }), 4)).await;
    assert!(
        store.profile_by_identifier(environment_id, IdentifierKind::Email, "ada@new.example").await.unwrap().is_none()
    );
}

pub async fn name_is_filled_from_first_and_last_name(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    identify(
        store,
        environment_id,
        command(Some("u1"), None, json!({ "first_name": "Ada", "last_name": "Lovelace" }), 1),
    )
    .await;
    assert_eq!(
        profile_of(store, environment_id, IdentifierKind::UserId, "u1").await.traits["name"],
        json!("Ada Lovelace")
    );
    identify(store, environment_id, command(Some("u1"), None, json!({ "last_name": "King" }), 2)).await;
    assert_eq!(profile_of(store, environment_id, IdentifierKind::UserId, "u1").await.traits["name"], json!("Ada King"));
    identify(store, environment_id, command(Some("u1"), None, json!({ "first_name": "A.", "name": "Countess" }), 3))
        .await;
    assert_eq!(profile_of(store, environment_id, IdentifierKind::UserId, "u1").await.traits["name"], json!("Countess"));
    // A name the user chose stays when a part changes later.
    identify(store, environment_id, command(Some("u1"), None, json!({ "last_name": "Byron" }), 4)).await;
    let traits = profile_of(store, environment_id, IdentifierKind::UserId, "u1").await.traits;
    assert_eq!((&traits["name"], &traits["last_name"]), (&json!("Countess"), &json!("Byron")));
}

pub async fn devices_come_from_context_and_follow_their_current_user(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let context =
        json!({ "device": { "token": "tok-1", "type": "ios", "model": "iPhone" }, "network": { "cellular": true } });
    let alice = identify(store, environment_id, with_device(command(Some("alice"), None, json!({}), 1), context)).await;
    let profile = profile_of(store, environment_id, IdentifierKind::UserId, "alice").await;
    assert_eq!(profile.devices.len(), 1);
    let device = &profile.devices[0];
    assert_eq!((device.token.as_str(), device.platform.as_deref()), ("tok-1", Some("ios")));
    assert_eq!(device.attributes["network_cellular"], json!(true));
    assert_eq!(device.attributes["device_model"], json!("iPhone"));
    assert!(device.last_used.is_some());

    // Custom attributes merge as a patch; last_status can be set.
    let update = DeviceUpdate::new(
        "tok-1".into(),
        None,
        traits(json!({ "push_enabled": true, "network_cellular": null })),
        Some("delivered".into()),
        &Limits::default(),
        "",
    )
    .unwrap();
    assert!(store.upsert_device(environment_id, &alice, update).await.unwrap());
    let device = profile_of(store, environment_id, IdentifierKind::UserId, "alice").await.devices.remove(0);
    assert_eq!(device.attributes["push_enabled"], json!(true));
    assert_eq!(device.attributes["device_model"], json!("iPhone"));
    assert!(!device.attributes.contains_key("network_cellular"));
    assert_eq!((device.platform.as_deref(), device.last_status.as_deref()), (Some("ios"), Some("delivered")));

    // The phone changes hands: the token moves to the new user.
    let bob_context = json!({ "device": { "token": "tok-1" } });
    identify(store, environment_id, with_device(command(Some("bob"), None, json!({}), 2), bob_context)).await;
    assert!(profile_of(store, environment_id, IdentifierKind::UserId, "alice").await.devices.is_empty());
    let moved = profile_of(store, environment_id, IdentifierKind::UserId, "bob").await.devices.remove(0);
    assert_eq!(moved.token, "tok-1");
    // What alice's app recorded about the device is hers, not bob's.
    assert!(!moved.attributes.contains_key("push_enabled"), "{:?}", moved.attributes);
    assert!(!moved.attributes.contains_key("device_model"), "{:?}", moved.attributes);
    assert_eq!(moved.last_status, None);
    let output = sql(store, environment_id, "SELECT token, distinct_id, platform FROM devices").await;
    assert_eq!(output.rows, vec![vec![json!("tok-1"), json!("bob"), json!("ios")]]);

    let bob = profile_of(store, environment_id, IdentifierKind::UserId, "bob").await.profile_id;
    assert!(store.delete_device(environment_id, &bob, "tok-1").await.unwrap());
    assert!(!store.delete_device(environment_id, &bob, "tok-1").await.unwrap());
    assert!(
        !store
            .upsert_device(
                environment_id,
                "missing",
                DeviceUpdate::new("t".into(), None, Map::new(), None, &Limits::default(), "").unwrap()
            )
            .await
            .unwrap()
    );
}

pub async fn an_explicit_merge_joins_two_identified_users(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let primary = identify(
        store,
        environment_id,
        command(Some("u-main"), Some("laptop"), json!({ "plan": "pro", "seats": 3 }), 10),
    )
    .await;
    let secondary = identify(
        store,
        environment_id,
        command(Some("u-dup"), Some("phone"), json!({ "plan": "free", "email": "dup@example.com" }), 20),
    )
    .await;
    record(store, environment_id, track(Some("u-dup"), None, "Dup Event", 21)).await;

    let merged = store
        .merge_profiles(
            environment_id,
            by_user("u-main"),
            ProfileSelector::ProfileId(secondary.clone()),
            WritePolicy::default(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!((merged.profile_id.as_str(), merged.merged_profile_id.as_str()), (primary.as_str(), secondary.as_str()));
    let mut moved: Vec<(String, String)> =
        merged.moved_identifiers.iter().map(|(kind, value)| (kind.as_str().to_owned(), value.clone())).collect();
    moved.sort();
    assert_eq!(
        moved,
        vec![
            ("anonymous_id".to_owned(), "phone".to_owned()),
            ("anonymous_id".to_owned(), "u-dup".to_owned()),
            ("email".to_owned(), "dup@example.com".to_owned()),
        ]
    );
    let profile = profile_of(store, environment_id, IdentifierKind::UserId, "u-main").await;
    assert_eq!(profile.traits, traits(json!({ "plan": "free", "seats": 3, "email": "dup@example.com" })));
    assert_eq!(profile.email.as_deref(), Some("dup@example.com"));
    assert_eq!(profile.anonymous_ids, vec!["laptop".to_owned(), "phone".to_owned(), "u-dup".to_owned()]);
    assert_eq!(store.profile(environment_id, &secondary).await.unwrap().unwrap().profile_id, primary);
    let output = sql(store, environment_id, "SELECT distinct_id FROM events").await;
    assert_eq!(output.rows, vec![vec![json!("u-main")]]);
    // Later calls with the merged-away user id land on the survivor.
    assert_eq!(record(store, environment_id, track(Some("u-dup"), None, "Later", 30)).await.profile_id, primary);
    assert_eq!(
        identify(store, environment_id, command(Some("u-dup"), None, json!({ "late": true }), 31)).await,
        primary
    );

    let same = store
        .merge_profiles(environment_id, by_user("u-main"), by_user("u-main"), WritePolicy::default())
        .await
        .unwrap();
    assert_eq!(same.unwrap_err().path, "secondary");
    let missing = store
        .merge_profiles(environment_id, by_user("u-main"), by_user("nobody"), WritePolicy::default())
        .await
        .unwrap();
    assert_eq!(missing.unwrap_err().code, ErrorCode::NotFound);
}

pub async fn a_merge_reports_what_the_survivor_holds(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    // The primary keeps its own email; the secondary's cannot move and is not reported as moved.
    identify(store, environment_id, command(Some("keep"), None, json!({ "email": "keep@example.com" }), 10)).await;
    identify(store, environment_id, command(Some("lose"), Some("dev-l"), json!({ "email": "lose@example.com" }), 5))
        .await;
    let merged =
        store.merge_profiles(environment_id, by_user("keep"), by_user("lose"), WritePolicy::default()).await.unwrap();
    let mut moved: Vec<(&str, String)> =
        merged.unwrap().moved_identifiers.into_iter().map(|(kind, value)| (kind.as_str(), value)).collect();
    moved.sort();
    assert_eq!(moved, vec![("anonymous_id", "dev-l".to_owned()), ("anonymous_id", "lose".to_owned())]);
    assert_eq!(
        profile_of(store, environment_id, IdentifierKind::Email, "keep@example.com").await.user_id.as_deref(),
        Some("keep")
    );
    assert!(
        store.profile_by_identifier(environment_id, IdentifierKind::Email, "lose@example.com").await.unwrap().is_none()
    );

    // A primary known only anonymously takes the secondary's user id.
    let anonymous = identify(store, environment_id, command(None, Some("visitor"), json!({ "seen": 1 }), 1)).await;
    identify(store, environment_id, command(Some("member"), None, json!({ "plan": "pro" }), 2)).await;
    let merged = store
        .merge_profiles(
            environment_id,
            ProfileSelector::ProfileId(anonymous.clone()),
            by_user("member"),
            WritePolicy::default(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(merged.profile_id, anonymous);
    assert!(merged.moved_identifiers.contains(&(IdentifierKind::UserId, "member".to_owned())));
    let survivor = profile_of(store, environment_id, IdentifierKind::UserId, "member").await;
    assert_eq!((survivor.profile_id.as_str(), survivor.identified), (anonymous.as_str(), true));
    assert_eq!(survivor.traits, traits(json!({ "seen": 1, "plan": "pro" })));
}

pub async fn merged_away_profile_ids_forward_for_writes(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let survivor = identify(store, environment_id, command(Some("main"), None, json!({}), 1)).await;
    let merged_away = identify(store, environment_id, command(Some("dup"), None, json!({}), 2)).await;
    store
        .merge_profiles(environment_id, by_user("main"), by_user("dup"), WritePolicy::default())
        .await
        .unwrap()
        .unwrap();

    let device =
        DeviceUpdate::new("tok-f".into(), Some("android".into()), Map::new(), None, &Limits::default(), "").unwrap();
    assert!(store.upsert_device(environment_id, &merged_away, device).await.unwrap());
    assert_eq!(profile_of(store, environment_id, IdentifierKind::UserId, "main").await.devices[0].token, "tok-f");
    assert!(store.delete_device(environment_id, &merged_away, "tok-f").await.unwrap());
    let changed = store
        .change_identifiers(environment_id, &merged_away, Some("main-2".into()), None, WritePolicy::default())
        .await
        .unwrap();
    assert_eq!(changed.unwrap(), survivor);
    assert_eq!(profile_of(store, environment_id, IdentifierKind::UserId, "main-2").await.profile_id, survivor);
    let erased = store.erase_profile(environment_id, ProfileSelector::ProfileId(merged_away.clone())).await.unwrap();
    assert_eq!(erased.as_deref(), Some(survivor.as_str()));
    assert!(store.profile(environment_id, &survivor).await.unwrap().is_none());
    assert!(store.profile(environment_id, &merged_away).await.unwrap().is_none());
}

pub async fn suppression_covers_every_identifier_of_the_person(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    identify(store, environment_id, command(Some("quiet"), Some("quiet-device"), json!({ "v": 1 }), 1)).await;
    identify(store, environment_id, command(Some("other"), None, json!({}), 1)).await;
    store.set_suppressed(environment_id, "quiet", true).await.unwrap();

    // Calls naming the suppressed person only by an anonymous id are dropped as well.
    let outcome = store
        .identify(
            environment_id,
            vec![command(None, Some("quiet-device"), json!({ "v": 2 }), 2)],
            WritePolicy::default(),
        )
        .await
        .unwrap();
    assert!(outcome[0].as_ref().unwrap().suppressed);
    let tracked = store
        .track(environment_id, vec![track(None, Some("quiet-device"), "Dropped", 3)], WritePolicy::default())
        .await
        .unwrap();
    assert!(tracked[0].as_ref().unwrap().suppressed);
    assert_eq!(profile_of(store, environment_id, IdentifierKind::UserId, "quiet").await.traits["v"], json!(1));
    assert!(sql(store, environment_id, "SELECT event FROM events").await.rows.is_empty());

    // Nobody can be moved onto a suppressed id.
    let other = profile_of(store, environment_id, IdentifierKind::UserId, "other").await.profile_id;
    let refused = store
        .change_identifiers(environment_id, &other, Some("quiet".into()), None, WritePolicy::default())
        .await
        .unwrap();
    assert_eq!(refused.unwrap_err().code, ErrorCode::IdentifierSuppressed);
}

pub async fn identifier_and_merge_caps_are_enforced(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let capped = WritePolicy {
        limits: Limits { max_identifiers_per_profile: 3, max_merges_per_profile: 1, ..Limits::default() },
        ..WritePolicy::default()
    };
    store.identify(environment_id, vec![command(Some("u"), Some("a1"), json!({}), 1)], capped.clone()).await.unwrap();
    let second = store
        .identify(environment_id, vec![command(Some("u"), Some("a2"), json!({}), 2)], capped.clone())
        .await
        .unwrap();
    assert!(second[0].is_ok());
    let third = store
        .identify(environment_id, vec![command(Some("u"), Some("a3"), json!({}), 3)], capped.clone())
        .await
        .unwrap();
    assert_eq!(third[0].as_ref().unwrap_err().code, ErrorCode::TooManyIdentifiers);
    // At the cap, identifies naming identifiers the profile already holds still go through.
    let again = store
        .identify(environment_id, vec![command(Some("u"), Some("a2"), json!({ "k": 1 }), 4)], capped.clone())
        .await
        .unwrap();
    assert!(again[0].is_ok(), "{again:?}");

    identify(store, environment_id, command(Some("v"), None, json!({}), 4)).await;
    identify(store, environment_id, command(Some("w"), None, json!({}), 5)).await;
    identify(store, environment_id, command(Some("x"), None, json!({}), 6)).await;
    assert!(store.merge_profiles(environment_id, by_user("v"), by_user("w"), capped.clone()).await.unwrap().is_ok());
    let again = store.merge_profiles(environment_id, by_user("v"), by_user("x"), capped).await.unwrap();
    assert_eq!(again.unwrap_err().code, ErrorCode::TooManyMerges);
}

pub async fn identifiers_change_while_the_profile_stays(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let profile_id = identify(
        store,
        environment_id,
        command(Some("old-id"), None, json!({ "plan": "pro", "email": "a@example.com" }), 1),
    )
    .await;
    record(store, environment_id, track(Some("old-id"), None, "Before", 2)).await;
    identify(store, environment_id, command(Some("taken"), None, json!({ "email": "b@example.com" }), 3)).await;

    let changed = store
        .change_identifiers(
            environment_id,
            &profile_id,
            Some("new-id".into()),
            Some("c@example.com".into()),
            WritePolicy::default(),
        )
        .await
        .unwrap();
    assert_eq!(changed.unwrap(), profile_id);
    let profile = profile_of(store, environment_id, IdentifierKind::UserId, "new-id").await;
    assert_eq!(profile.profile_id, profile_id);
    assert_eq!(profile.traits["plan"], json!("pro"));
    assert_eq!(profile.email.as_deref(), Some("c@example.com"));
    assert!(store.profile_by_identifier(environment_id, IdentifierKind::UserId, "old-id").await.unwrap().is_none());
    assert!(
        store.profile_by_identifier(environment_id, IdentifierKind::Email, "a@example.com").await.unwrap().is_none()
    );
    assert_eq!(sql(store, environment_id, "SELECT distinct_id FROM events").await.rows, vec![vec![json!("new-id")]]);

    for (user_id, email, field) in [(Some("taken"), None, "user_id"), (None, Some("b@example.com"), "email")] {
        let refused = store
            .change_identifiers(
                environment_id,
                &profile_id,
                user_id.map(Into::into),
                email.map(Into::into),
                WritePolicy::default(),
            )
            .await
            .unwrap();
        let error = refused.unwrap_err();
        assert_eq!((error.code, error.path.as_str()), (ErrorCode::IdentifierTaken, field));
    }
}

pub async fn erasure_removes_everything_about_a_person(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let anonymous = identify(store, environment_id, command(None, Some("anon"), json!({ "utm": "x" }), 1)).await;
    let user =
        identify(store, environment_id, command(Some("gone"), None, json!({ "email": "gone@example.com" }), 2)).await;
    identify(
        store,
        environment_id,
        with_device(
            command(Some("gone"), Some("anon"), json!({ "plan": "pro" }), 3),
            json!({ "device": { "token": "t-gone" } }),
        ),
    )
    .await;
    record(store, environment_id, track(Some("gone"), None, "Bought", 4)).await;
    identify(store, environment_id, command(Some("kept"), None, json!({ "plan": "free" }), 5)).await;

    let erased = store
        .erase_profile(environment_id, ProfileSelector::Identifier(IdentifierKind::Email, "gone@example.com".into()))
        .await
        .unwrap();
    assert_eq!(erased.as_deref(), Some(user.as_str()));
    for (kind, value) in [
        (IdentifierKind::UserId, "gone"),
        (IdentifierKind::AnonymousId, "anon"),
        (IdentifierKind::Email, "gone@example.com"),
    ] {
        assert!(
            store.profile_by_identifier(environment_id, kind, value).await.unwrap().is_none(),
            "{value} still resolves"
        );
    }
    assert!(store.profile(environment_id, &user).await.unwrap().is_none());
    assert!(
        store.profile(environment_id, &anonymous).await.unwrap().is_none(),
        "forwards to an erased profile are gone"
    );
    for view in ["events", "devices", "trait_changes"] {
        let output = sql(store, environment_id, &format!("SELECT count(*) FROM {view}")).await;
        assert_eq!(output.rows, vec![vec![json!(if view == "trait_changes" { 1 } else { 0 })]], "{view}");
    }
    assert_eq!(
        sql(store, environment_id, "SELECT distinct_id FROM trait_changes").await.rows,
        vec![vec![json!("kept")]]
    );
    assert!(store.erase_profile(environment_id, by_user("gone")).await.unwrap().is_none());
}

pub async fn suppressed_user_ids_are_acknowledged_and_dropped(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    store.set_suppressed(environment_id, "opted-out", true).await.unwrap();
    let results = store
        .identify(environment_id, vec![command(Some("opted-out"), None, json!({ "a": 1 }), 1)], WritePolicy::default())
        .await
        .unwrap();
    assert!(results[0].as_ref().unwrap().suppressed);
    let tracked = record(store, environment_id, track(Some("opted-out"), None, "Ignored", 2)).await;
    assert!(tracked.suppressed);
    assert!(store.profile_by_identifier(environment_id, IdentifierKind::UserId, "opted-out").await.unwrap().is_none());
    assert_eq!(sql(store, environment_id, "SELECT count(*) FROM events").await.rows, vec![vec![json!(0)]]);

    store.set_suppressed(environment_id, "opted-out", false).await.unwrap();
    identify(store, environment_id, command(Some("opted-out"), None, json!({ "a": 2 }), 3)).await;
    assert_eq!(
        profile_of(store, environment_id, IdentifierKind::UserId, "opted-out").await.traits,
        traits(json!({ "a": 2 }))
    );
}

pub async fn concurrent_identifies_for_one_new_user_make_one_profile(store: std::sync::Arc<dyn Store>) {
    let environment_id = new_environment(store.as_ref(), "production").await;
    let mut tasks = Vec::new();
    for index in 0..16i64 {
        let store = std::sync::Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let patch = json!({ format!("k{index}"): index });
            identify(store.as_ref(), environment_id, command(Some("racer"), None, patch, index)).await
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every racing identify lands on one profile");
    assert_eq!(profile_of(store.as_ref(), environment_id, IdentifierKind::UserId, "racer").await.traits.len(), 16);
}

fn segment(name: &str, rules: Value) -> roster_core::flags::SegmentDefinition {
    serde_json::from_value(json!({ "name": name, "rules": rules })).expect("valid segment")
}

fn feature(body: Value) -> roster_core::flags::FeatureDefinition {
    serde_json::from_value(body).expect("valid feature")
}

/// A write policy that tracks memberships of the environment's segments as stored now.
async fn tracking(store: &dyn Store, environment_id: EnvironmentId) -> WritePolicy {
    let record = store.flag_config(environment_id).await.unwrap();
    let evaluator = roster_core::flags::Evaluator::compile(&record.config).unwrap();
    WritePolicy { segments: Some(std::sync::Arc::new(evaluator)), ..WritePolicy::default() }
}

pub async fn flag_configuration_is_stored_and_versioned(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let other = new_environment(store, "staging").await;
    let initial = store.flag_config(environment_id).await.unwrap();
    assert_eq!(initial.config.environment_key, "client-production");
    assert_eq!(initial.config.environment_name, "production");
    let pro = segment(
        "pro",
        json!([{ "type": "ALL", "conditions": [{ "property": "plan", "operator": "EQUAL", "value": "pro" }] }]),
    );
    let segment_id = store.save_segment(environment_id, None, pro.clone()).await.unwrap().unwrap();
    assert_eq!(
        store.save_segment(environment_id, None, pro.clone()).await.unwrap().unwrap_err().code,
        ErrorCode::NameTaken
    );
    // Names are per environment.
    store.save_segment(other, None, pro.clone()).await.unwrap().unwrap();

    let checkout = feature(json!({ "name": "checkout", "enabled": false, "value": "old",
        "segment_overrides": [{ "segment_id": segment_id, "priority": 1, "enabled": true, "value": "new" }] }));
    let feature_id = store.save_feature(environment_id, None, checkout.clone()).await.unwrap().unwrap();
    let dangling = feature(json!({ "name": "x", "segment_overrides": [{ "segment_id": 999_999, "enabled": true }] }));
    let refused = store.save_feature(environment_id, None, dangling).await.unwrap().unwrap_err();
    assert_eq!((refused.code, refused.path.as_str()), (ErrorCode::InvalidFeature, "segment_overrides[0].segment_id"));

    let profile_id = identify(store, environment_id, command(Some("vip"), None, json!({}), 1)).await;
    let state = roster_core::flags::IdentityOverride { enabled: true, value: json!("vip") };
    assert_eq!(
        store.put_identity_override(environment_id, &profile_id, feature_id, state.clone()).await.unwrap().unwrap(),
        profile_id
    );
    let missing = store.put_identity_override(environment_id, &profile_id, 999_999, state.clone()).await.unwrap();
    assert_eq!(missing.unwrap_err().code, ErrorCode::NotFound);

    let record = store.flag_config(environment_id).await.unwrap();
    assert!(record.version > initial.version);
    assert_eq!(store.flags_version(environment_id).await.unwrap(), record.version);
    assert_eq!(record.config.segments.len(), 1);
    assert_eq!(record.config.segments[0].definition, pro);
    assert_eq!(record.config.features[0].definition, checkout);
    assert_eq!(record.config.identity_overrides[0].profile_id, profile_id);
    assert_eq!(record.config.identity_overrides[0].state, state);

    // A segment a feature overrides cannot go; the feature can, taking its overrides with it.
    let in_use = store.delete_segment(environment_id, segment_id).await.unwrap();
    assert_eq!(in_use.unwrap_err().code, ErrorCode::SegmentInUse);
    assert!(store.delete_feature(environment_id, feature_id).await.unwrap());
    assert!(store.delete_segment(environment_id, segment_id).await.unwrap().unwrap());
    let emptied = store.flag_config(environment_id).await.unwrap();
    assert!(emptied.config.segments.is_empty() && emptied.config.features.is_empty());
    assert!(emptied.config.identity_overrides.is_empty());
    assert_eq!(store.flag_config(other).await.unwrap().config.segments.len(), 1);
}

pub async fn segment_memberships_follow_traits_with_history(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    // Profiles that exist before the segment does.
    identify(store, environment_id, command(Some("early-pro"), None, json!({ "plan": "pro" }), 1)).await;
    identify(store, environment_id, command(Some("early-free"), None, json!({ "plan": "free" }), 1)).await;
    let rules = json!([{ "type": "ALL", "conditions": [{ "property": "plan", "operator": "EQUAL", "value": "pro" }] }]);
    let segment_id = store.save_segment(environment_id, None, segment("pro", rules)).await.unwrap().unwrap();
    let policy = tracking(store, environment_id).await;

    // The background recomputation, one page at a time.
    let (processed, next) = store.refresh_memberships(environment_id, policy.clone(), None, 1).await.unwrap();
    assert_eq!(processed, 1);
    let (processed, next) = store.refresh_memberships(environment_id, policy.clone(), next, 1).await.unwrap();
    assert_eq!(processed, 1);
    let (processed, next) = store.refresh_memberships(environment_id, policy.clone(), next, 1).await.unwrap();
    assert_eq!((processed, next), (0, None));
    let members = store.segment_members(environment_id, segment_id, None, 10).await.unwrap();
    assert_eq!(members.total, 1);
    assert_eq!(members.members[0].user_id.as_deref(), Some("early-pro"));

    // Writes re-evaluate in the same transaction: entering and leaving are recorded.
    let identify_with = |user: &str, plan: &str, micros: i64| {
        let policy = policy.clone();
        let command = command(Some(user), None, json!({ "plan": plan }), micros);
        async move { store.identify(environment_id, vec![command], policy).await.unwrap().remove(0).unwrap() }
    };
    identify_with("ada", "pro", 2).await;
    identify_with("ada", "free", 3).await;
    identify_with("ada", "pro", 4).await;
    identify_with("early-pro", "free", 5).await;
    let members = store.segment_members(environment_id, segment_id, None, 10).await.unwrap();
    let member_ids: Vec<Option<&str>> = members.members.iter().map(|member| member.user_id.as_deref()).collect();
    assert_eq!((members.total, member_ids), (1, vec![Some("ada")]));
    let history = sql(
        store,
        environment_id,
        "SELECT distinct_id, segment, CASE WHEN exited_at IS NULL THEN 1 ELSE 0 END, is_member FROM segment_memberships \
         WHERE distinct_id = 'ada' ORDER BY is_member",
    )
    .await;
    assert_eq!(
        history.rows,
        vec![
            vec![json!("ada"), json!("pro"), json!(0), json!(0)],
            vec![json!("ada"), json!("pro"), json!(1), json!(1)]
        ]
    );

    // Tracks that create a profile and explicit merges keep memberships right too.
    let not_pro =
        json!([{ "type": "NONE", "conditions": [{ "property": "plan", "operator": "EQUAL", "value": "pro" }] }]);
    let others = store.save_segment(environment_id, None, segment("not pro", not_pro)).await.unwrap().unwrap();
    let policy = tracking(store, environment_id).await;
    store.track(environment_id, vec![track(Some("walk-in"), None, "Visit", 6)], policy.clone()).await.unwrap();
    let others_members = store.segment_members(environment_id, others, None, 10).await.unwrap();
    assert!(others_members.members.iter().any(|member| member.user_id.as_deref() == Some("walk-in")));
    store.merge_profiles(environment_id, by_user("ada"), by_user("early-free"), policy.clone()).await.unwrap().unwrap();
    let count = sql(
        store,
        environment_id,
        "SELECT count(*) FROM segment_memberships WHERE is_member = 1 AND distinct_id = 'ada'",
    )
    .await;
    assert_eq!(count.rows, vec![vec![json!(1)]], "the survivor is in `pro` once");

    // Erasure takes the history; deleting a segment takes its memberships.
    store.erase_profile(environment_id, by_user("ada")).await.unwrap();
    assert_eq!(store.segment_members(environment_id, segment_id, None, 10).await.unwrap().total, 0);
    assert!(store.delete_segment(environment_id, others).await.unwrap().unwrap());
    assert_eq!(store.segment_members(environment_id, others, None, 10).await.unwrap().total, 0);
}

pub async fn trait_increments_add_in_the_write(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let increment = |amount: Value, micros: i64| {
        let mut increments = Map::new();
        increments.insert("logins".to_owned(), amount);
        command(Some("ada"), None, json!({}), micros).with_increments(increments, &Limits::default()).unwrap()
    };
    identify(store, environment_id, increment(json!(2), 1)).await;
    identify(store, environment_id, increment(json!(3), 2)).await;
    // An increment older than the stored value still counts.
    identify(store, environment_id, increment(json!(1), 1)).await;
    assert_eq!(profile_of(store, environment_id, IdentifierKind::UserId, "ada").await.traits["logins"], json!(6));
    identify(store, environment_id, increment(json!(0.5), 3)).await;
    assert_eq!(profile_of(store, environment_id, IdentifierKind::UserId, "ada").await.traits["logins"], json!(6.5));
    identify(store, environment_id, command(Some("ada"), None, json!({ "plan": "pro" }), 4)).await;
    let mut not_a_number = Map::new();
    not_a_number.insert("plan".to_owned(), json!(1));
    let refused = store
        .identify(
            environment_id,
            vec![command(Some("ada"), None, json!({}), 5).with_increments(not_a_number, &Limits::default()).unwrap()],
            WritePolicy::default(),
        )
        .await
        .unwrap();
    assert_eq!(refused[0].as_ref().unwrap_err().path, "trait_increments.plan");
}

pub async fn the_rejections_log_keeps_the_newest_entries_per_environment(store: &dyn Store) {
    let production = new_environment(store, "production").await;
    let staging = new_environment(store, "staging").await;
    let rejection = |number: usize| crate::Rejection {
        rejection_id: 0,
        received_at: Timestamp::from_micros(i64::try_from(number).unwrap()),
        dialect: "segment".into(),
        endpoint: "/v1/batch".into(),
        path: format!("batch[{number}]"),
        message_id: Some(format!("m-{number}")),
        code: "payload_too_large".into(),
        error: "too large".into(),
        payload: "{}".into(),
    };
    store.record_rejections(production, (0..3).map(rejection).collect(), 4).await.unwrap();
    store.record_rejections(production, (3..5).map(rejection).collect(), 4).await.unwrap();
    store.record_rejections(staging, vec![rejection(9)], 4).await.unwrap();
    let newest = store.rejections(production, None, 10).await.unwrap();
    let paths: Vec<&str> = newest.iter().map(|entry| entry.path.as_str()).collect();
    assert_eq!(paths, ["batch[4]", "batch[3]", "batch[2]", "batch[1]"], "newest first, oldest beyond 4 gone");
    assert_eq!(newest[0].message_id.as_deref(), Some("m-4"));
    let older = store.rejections(production, Some(newest[1].rejection_id), 10).await.unwrap();
    assert_eq!(older.iter().map(|entry| entry.path.as_str()).collect::<Vec<_>>(), ["batch[2]", "batch[1]"]);
    assert_eq!(store.rejections(staging, None, 10).await.unwrap().len(), 1, "environments keep their own logs");

    // Forgetting a person removes the entries that name them; old entries expire.
    let naming =
        |path: &str, payload: &str| crate::Rejection { path: path.into(), payload: payload.into(), ..rejection(0) };
    store
        .record_rejections(
            production,
            vec![naming("erased", r#"{"user_id":"ada","x":1}"#), naming("kept", r#"{"user_id":"adam"}"#)],
            100,
        )
        .await
        .unwrap();
    let forgotten = store.forget_rejections(production, vec![r#""ada""#.into()], None).await.unwrap();
    assert_eq!(forgotten, 1, "only the entry naming exactly `ada`");
    let left: Vec<String> =
        store.rejections(production, None, 100).await.unwrap().into_iter().map(|entry| entry.path).collect();
    assert!(left.contains(&"kept".to_owned()) && !left.contains(&"erased".to_owned()), "{left:?}");
    store.forget_rejections(production, Vec::new(), Some(Timestamp::from_micros(3))).await.unwrap();
    let left = store.rejections(production, None, 100).await.unwrap();
    assert!(left.iter().all(|entry| entry.received_at.as_micros() >= 3), "entries older than the cut-off are gone");
}

pub async fn an_identify_that_changes_nothing_leaves_updated_at_alone(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let profile_id =
        identify(store, environment_id, command(Some("ada"), Some("laptop"), json!({ "plan": "pro" }), 10)).await;
    let written = store.profile(environment_id, &profile_id).await.unwrap().unwrap().updated_at;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    // Named again with nothing new (what a flags read sends), or with a trait already held.
    identify(store, environment_id, command(Some("ada"), None, json!({}), 20)).await;
    identify(store, environment_id, command(Some("ada"), Some("laptop"), json!({}), 30)).await;
    let read_only = store.profile(environment_id, &profile_id).await.unwrap().unwrap();
    assert_eq!(read_only.updated_at, written, "a read must not look like an update");
    // A real change still moves it, and so does a newer timestamp for a held value (the order
    // of later writes depends on it).
    identify(store, environment_id, command(Some("ada"), None, json!({ "plan": "pro" }), 40)).await;
    let retimed = store.profile(environment_id, &profile_id).await.unwrap().unwrap().updated_at;
    assert!(retimed > written);
    identify(store, environment_id, command(Some("ada"), None, json!({ "plan": "free" }), 35)).await;
    assert_eq!(
        profile_of(store, environment_id, IdentifierKind::UserId, "ada").await.traits["plan"],
        json!("pro"),
        "the newer timestamp was kept"
    );
    identify(store, environment_id, command(Some("ada"), Some("phone"), json!({}), 50)).await;
    let linked = store.profile(environment_id, &profile_id).await.unwrap().unwrap().updated_at;
    assert!(linked > retimed, "a new identifier is a change");
}

pub async fn events_keep_their_context(store: &dyn Store) {
    let environment_id = new_environment(store, "production").await;
    let context = json!({ "page": { "path": "/pricing" }, "library": { "name": "analytics.js" } });
    let with_context =
        track(Some("ada"), None, "Viewed", 10).with_context(context.as_object(), &Limits::default()).unwrap();
    let results =
        store.track(environment_id, vec![with_context, track(Some("ada"), None, "Bare", 20)], WritePolicy::default());
    let profile_id = results.await.unwrap().remove(0).unwrap().profile_id;
    let page = store.profile_events(environment_id, &profile_id, None, 10).await.unwrap().unwrap();
    assert_eq!(page.events[0].event, "Bare");
    assert_eq!(page.events[0].context, None);
    assert_eq!(page.events[1].context.as_ref().map(|context| Value::Object(context.clone())), Some(context));
    let path = sql(store, environment_id, "SELECT count(*) FROM events WHERE context IS NOT NULL").await;
    assert_eq!(path.rows, vec![vec![json!(1)]], "the views show the context");
}

/// Instantiates every contract case as a test for one backend. `$make` is an async expression
/// producing `Option<(Arc<dyn Store>, guard)>`; the guard (e.g. a temp dir) lives until the test
/// ends, and `None` skips the case (the backend's maker says why).
#[macro_export]
macro_rules! store_contract_suite {
    ($make:expr) => {
        $crate::store_contract_suite!(@cases $make;
            bootstrap_happens_once,
            environments_have_unique_slugs_and_rotatable_keys,
            new_user_and_anonymous_id_make_one_profile,
            a_batch_sees_its_own_earlier_items,
            traits_patch_delete_and_order_by_timestamp,
            numbers_and_nested_values_are_kept_exactly,
            anonymous_profile_becomes_the_users_on_first_identify,
            anonymous_profile_merges_into_a_known_user,
            two_identified_users_are_never_merged,
            environments_are_isolated,
            profile_limits_reject_only_the_offending_item,
            listing_pages_in_id_order_and_filters_by_typed_trait,
            replaying_a_batch_in_any_order_gives_the_same_profile,
            events_carry_the_traits_of_their_moment,
            event_pages_walk_back_in_time_without_overlap,
            track_only_distinct_id_is_not_identified_and_merges_at_login,
            anonymous_events_follow_the_profile_when_it_is_identified,
            a_track_only_profile_becomes_the_new_users_at_login,
            an_identify_and_a_track_may_share_a_message_id,
            deletes_of_unknown_traits_count_towards_the_profile_size,
            resent_message_ids_are_applied_once,
            trait_history_records_winning_changes_only,
            the_seed_queries_run_as_written,
            expired_message_ids_and_history_are_purged,
            email_becomes_a_normalised_identifier_held_by_one_profile,
            name_is_filled_from_first_and_last_name,
            trait_increments_add_in_the_write,
            devices_come_from_context_and_follow_their_current_user,
            an_explicit_merge_joins_two_identified_users,
            flag_configuration_is_stored_and_versioned,
            segment_memberships_follow_traits_with_history,
            a_merge_reports_what_the_survivor_holds,
            merged_away_profile_ids_forward_for_writes,
            suppression_covers_every_identifier_of_the_person,
            identifier_and_merge_caps_are_enforced,
            identifiers_change_while_the_profile_stays,
            erasure_removes_everything_about_a_person,
            suppressed_user_ids_are_acknowledged_and_dropped,
            queries_see_only_their_environment,
            queries_refuse_writes_and_escapes,
            queries_stop_at_their_time_and_row_limits,
            the_rejections_log_keeps_the_newest_entries_per_environment,
            an_identify_that_changes_nothing_leaves_updated_at_alone,
            events_keep_their_context,
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_identifies_for_one_new_user_make_one_profile() {
            let Some((store, _guard)) = $make.await else { return };
            $crate::contract::concurrent_identifies_for_one_new_user_make_one_profile(store).await;
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((store, _guard)) = $make.await else { return };
                $crate::contract::$case(store.as_ref()).await;
            }
        )*
    };
}
