//! The honest ingest baseline: a hand-written SQLite program doing, per identify, the same work
//! Roster's write path does — look the user id up, read the profile, merge the traits by their
//! timestamps, write the profile back (or create it with its identifier), record the trait
//! changes in the history — with the same schema shape, durability (WAL, `synchronous=FULL`) and
//! batches per commit. What it leaves out is what a bare program would not have: HTTP, JSON
//! bodies, validation, linking rules, dedup, segments.

use std::time::Instant;

use serde_json::{Map, Value, json};

use crate::{Options, traits_of};

const SCHEMA: &str = "
    PRAGMA journal_mode = WAL;
    PRAGMA synchronous = FULL;
    CREATE TABLE profiles (
        environment_id INTEGER NOT NULL,
        profile_id TEXT NOT NULL,
        user_id TEXT,
        identified INTEGER NOT NULL,
        traits TEXT NOT NULL,
        trait_timestamps TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (environment_id, profile_id)
    ) WITHOUT ROWID;
    CREATE TABLE identifiers (
        environment_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        PRIMARY KEY (environment_id, kind, value)
    ) WITHOUT ROWID;
    CREATE INDEX identifiers_by_profile ON identifiers (profile_id);
    CREATE TABLE trait_history (
        environment_id INTEGER NOT NULL,
        profile_id TEXT NOT NULL,
        changes TEXT NOT NULL,
        recorded_at INTEGER NOT NULL
    );
    CREATE INDEX trait_history_by_profile ON trait_history (environment_id, profile_id);
";

/// Identifies per second of the same-work program over the run's identifies.
pub fn bare_sqlite_same_work(options: &Options) -> anyhow::Result<f64> {
    let directory = tempfile::tempdir()?;
    let connection = rusqlite::Connection::open(directory.path().join("same-work.db"))?;
    connection.execute_batch(SCHEMA)?;
    let items: Vec<(String, Map<String, Value>)> = (0..options.identifies)
        .map(|index| {
            let traits = traits_of(index).as_object().cloned().unwrap_or_default();
            (format!("user-{}", index % options.users), traits)
        })
        .collect();
    let mut next_profile = 0_u64;
    let started = Instant::now();
    for (batch_number, chunk) in items.chunks(options.batch_size).enumerate() {
        let transaction = connection.unchecked_transaction()?;
        for (offset, (user_id, patch)) in chunk.iter().enumerate() {
            // One microsecond apart, like Roster's receive times.
            let at = i64::try_from(batch_number * options.batch_size + offset).unwrap_or(i64::MAX) + 1;
            let found: Option<String> = transaction
                .prepare_cached(
                    "SELECT profile_id FROM identifiers WHERE environment_id = 1 AND kind = 'user_id' AND value = ?1",
                )?
                .query_row([user_id], |row| row.get(0))
                .ok();
            let (profile_id, mut traits, mut stamps, created) = match found {
                Some(profile_id) => {
                    let (traits, stamps): (String, String) = transaction
                        .prepare_cached(
                            "SELECT traits, trait_timestamps FROM profiles WHERE environment_id = 1 AND profile_id = ?1",
                        )?
                        .query_row([&profile_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
                    let traits: Map<String, Value> = serde_json::from_str(&traits)?;
                    let stamps: Map<String, Value> = serde_json::from_str(&stamps)?;
                    (profile_id, traits, stamps, false)
                }
                None => {
                    next_profile += 1;
                    (format!("profile-{next_profile:016}"), Map::new(), Map::new(), true)
                }
            };
            let mut changes = Vec::new();
            for (key, value) in patch {
                let newer = stamps.get(key).and_then(Value::as_i64).is_none_or(|stored| stored < at);
                if !newer {
                    continue;
                }
                stamps.insert(key.clone(), json!(at));
                let old = traits.insert(key.clone(), value.clone());
                if old.as_ref() != Some(value) {
                    changes.push(json!({ "key": key, "old": old, "new": value, "at": at }));
                }
            }
            let (traits_text, stamps_text) = (serde_json::to_string(&traits)?, serde_json::to_string(&stamps)?);
            if created {
                transaction
                    .prepare_cached(
                        "INSERT INTO profiles (environment_id, profile_id, user_id, identified, traits, trait_timestamps, \
                         created_at, updated_at) VALUES (1, ?1, ?2, 1, ?3, ?4, ?5, ?5)",
                    )?
                    .execute(rusqlite::params![profile_id, user_id, traits_text, stamps_text, at])?;
                transaction
                    .prepare_cached(
                        "INSERT INTO identifiers (environment_id, kind, value, profile_id) VALUES (1, 'user_id', ?1, ?2)",
                    )?
                    .execute(rusqlite::params![user_id, profile_id])?;
            } else {
                transaction
                    .prepare_cached(
                        "UPDATE profiles SET traits = ?2, trait_timestamps = ?3, updated_at = ?4 \
                         WHERE environment_id = 1 AND profile_id = ?1",
                    )?
                    .execute(rusqlite::params![profile_id, traits_text, stamps_text, at])?;
            }
            if !changes.is_empty() {
                transaction
                    .prepare_cached(
                        "INSERT INTO trait_history (environment_id, profile_id, changes, recorded_at) VALUES (1, ?1, ?2, ?3)",
                    )?
                    .execute(rusqlite::params![profile_id, serde_json::to_string(&changes)?, at])?;
            }
        }
        transaction.commit()?;
    }
    let elapsed = started.elapsed();
    println!("bare sqlite, same work: {} identifies in {elapsed:.2?}", options.identifies);
    Ok(options.identifies as f64 / elapsed.as_secs_f64())
}
