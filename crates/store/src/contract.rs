//! The store contract: behaviour every backend must show. Each case is an async function over a
//! `&dyn Store`; `store_contract_suite!` instantiates all of them as tests for one backend, so a new
//! backend proves itself by adding one macro call with its own constructor.

use roster_core::{ErrorCode, IdentifierKind, IdentifyCommand, Limits, Timestamp};
use serde_json::{Map, Value, json};

use crate::{EnvironmentId, NewEnvironment, ProfileFilter, Store, StoreError};

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
    let mut results = store.identify(environment_id, vec![command], Limits::default()).await.expect("identify");
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
            Limits::default(),
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
        .identify(environment_id, vec![command(Some("u1"), Some("phone"), json!({}), 30)], Limits::default())
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
            Limits::default(),
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
            limits,
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
            command(Some(&format!("u{index}")), None, json!({ "plan": plan, "age": 30 }), 1),
        )
        .await;
    }
    identify(store, environment_id, command(Some("string-age"), None, json!({ "age": "30" }), 1)).await;

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
    let numeric_age = ProfileFilter { trait_equals: Some(("age".into(), json!(30))) };
    assert_eq!(store.list_profiles(environment_id, numeric_age, None, 10).await.unwrap().profiles.len(), 5);
    let text_age = ProfileFilter { trait_equals: Some(("age".into(), json!("30"))) };
    let text_matches = store.list_profiles(environment_id, text_age, None, 10).await.unwrap().profiles;
    assert_eq!(text_matches.len(), 1);
    assert_eq!(text_matches[0].user_id.as_deref(), Some("string-age"));
}

pub async fn replaying_a_batch_in_any_order_gives_the_same_profile(store: &dyn Store) {
    let production = new_environment(store, "production").await;
    let replica = new_environment(store, "replica").await;
    let batch = vec![
        command(Some("u1"), None, json!({ "plan": "pro", "seats": 3 }), 10),
        command(Some("u1"), None, json!({ "plan": "team", "seats": null }), 30),
        command(Some("u1"), None, json!({ "plan": "free", "role": "owner" }), 20),
    ];
    store.identify(production, batch.clone(), Limits::default()).await.unwrap();
    store.identify(production, batch.clone(), Limits::default()).await.unwrap();
    let mut reversed = batch;
    reversed.reverse();
    store.identify(replica, reversed, Limits::default()).await.unwrap();
    let forward = profile_of(store, production, IdentifierKind::UserId, "u1").await;
    let backward = profile_of(store, replica, IdentifierKind::UserId, "u1").await;
    assert_eq!(forward.traits, traits(json!({ "plan": "team", "role": "owner" })));
    assert_eq!(forward.traits, backward.traits);
    assert_eq!(forward.trait_timestamps, backward.trait_timestamps);
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

/// Instantiates every contract case as a test for one backend. `$make` is an async expression
/// producing `(Arc<dyn Store>, guard)`; the guard (e.g. a temp dir) lives until the test ends.
#[macro_export]
macro_rules! store_contract_suite {
    ($make:expr) => {
        $crate::store_contract_suite!(@cases $make;
            bootstrap_happens_once,
            environments_have_unique_slugs_and_rotatable_keys,
            new_user_and_anonymous_id_make_one_profile,
            traits_patch_delete_and_order_by_timestamp,
            numbers_and_nested_values_are_kept_exactly,
            anonymous_profile_becomes_the_users_on_first_identify,
            anonymous_profile_merges_into_a_known_user,
            two_identified_users_are_never_merged,
            environments_are_isolated,
            profile_limits_reject_only_the_offending_item,
            listing_pages_in_id_order_and_filters_by_typed_trait,
            replaying_a_batch_in_any_order_gives_the_same_profile,
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_identifies_for_one_new_user_make_one_profile() {
            let (store, _guard) = $make.await;
            $crate::contract::concurrent_identifies_for_one_new_user_make_one_profile(store).await;
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _guard) = $make.await;
                $crate::contract::$case(store.as_ref()).await;
            }
        )*
    };
}
