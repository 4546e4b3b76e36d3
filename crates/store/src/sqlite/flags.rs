//! Segments, features and identity overrides on the embedded store. Definitions are stored as the
//! JSON users wrote (validated before they get here); every change bumps the environment's
//! `flags_version`, which tells evaluators compiled elsewhere that they are stale.

use roster_core::flags::{
    FeatureConfig, FeatureDefinition, FlagConfig, IdentityOverride, IdentityOverrideConfig, SegmentConfig,
    SegmentDefinition,
};
use roster_core::{FieldError, Timestamp};
use rusqlite::{Connection, OptionalExtension, params};

use crate::flag_errors;
use crate::model::{EnvironmentId, FlagConfigRecord, MemberPage, SegmentMember};
use crate::{StoreError, StoreResult};

fn bump_version(connection: &Connection, environment_id: EnvironmentId) -> StoreResult<()> {
    connection
        .prepare_cached("UPDATE environments SET flags_version = flags_version + 1 WHERE environment_id = ?1")?
        .execute([environment_id])?;
    Ok(())
}

fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(failure, _) if failure.code == rusqlite::ErrorCode::ConstraintViolation)
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("stored {what} is not valid: {error}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|error| StoreError::Database(format!("cannot serialize: {error}")))
}

pub(super) fn flags_version(connection: &Connection, environment_id: EnvironmentId) -> StoreResult<i64> {
    Ok(connection
        .prepare_cached("SELECT flags_version FROM environments WHERE environment_id = ?1")?
        .query_row([environment_id], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}

pub(super) fn flag_config(connection: &Connection, environment_id: EnvironmentId) -> StoreResult<FlagConfigRecord> {
    let (environment_key, environment_name, version): (String, String, i64) = connection
        .prepare_cached(
            "SELECT COALESCE(evaluation_key, client_key), name, flags_version FROM environments \
             WHERE environment_id = ?1",
        )?
        .query_row([environment_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let mut segments = Vec::new();
    let mut statement = connection
        .prepare_cached("SELECT segment_id, definition FROM segments WHERE environment_id = ?1 ORDER BY segment_id")?;
    for row in statement.query_map([environment_id], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))? {
        let (id, definition) = row?;
        segments.push(SegmentConfig { id, definition: parse(&definition, "segment")? });
    }
    let mut features = Vec::new();
    let mut statement = connection
        .prepare_cached("SELECT feature_id, definition FROM features WHERE environment_id = ?1 ORDER BY feature_id")?;
    for row in statement.query_map([environment_id], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))? {
        let (id, definition) = row?;
        features.push(FeatureConfig { id, definition: parse(&definition, "feature")? });
    }
    let mut identity_overrides = Vec::new();
    let mut statement = connection.prepare_cached(
        "SELECT profile_id, feature_id, enabled, value FROM identity_overrides WHERE environment_id = ?1 \
         ORDER BY profile_id, feature_id",
    )?;
    let rows = statement.query_map([environment_id], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, bool>(2)?, row.get::<_, String>(3)?))
    })?;
    for row in rows {
        let (profile_id, feature_id, enabled, value) = row?;
        identity_overrides.push(IdentityOverrideConfig {
            profile_id,
            feature_id,
            state: IdentityOverride { enabled, value: parse(&value, "override value")? },
        });
    }
    Ok(FlagConfigRecord {
        config: FlagConfig { environment_key, environment_name, segments, features, identity_overrides },
        version,
    })
}

pub(super) fn save_segment(
    connection: &Connection,
    environment_id: EnvironmentId,
    segment_id: Option<i64>,
    definition: &SegmentDefinition,
    at: Timestamp,
) -> StoreResult<Result<i64, FieldError>> {
    let json = to_json(definition)?;
    let written = match segment_id {
        None => connection
            .prepare_cached(
                "INSERT INTO segments (environment_id, name, definition, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?4)",
            )?
            .execute(params![environment_id, definition.name, json, at.as_micros()])
            .map(|_| Some(connection.last_insert_rowid())),
        Some(segment_id) => connection
            .prepare_cached(
                "UPDATE segments SET name = ?3, definition = ?4, updated_at = ?5 \
                 WHERE environment_id = ?1 AND segment_id = ?2",
            )?
            .execute(params![environment_id, segment_id, definition.name, json, at.as_micros()])
            .map(|updated| (updated > 0).then_some(segment_id)),
    };
    match written {
        Ok(Some(segment_id)) => {
            bump_version(connection, environment_id)?;
            Ok(Ok(segment_id))
        }
        Ok(None) => Ok(Err(flag_errors::segment_not_found())),
        Err(error) if is_unique_violation(&error) => Ok(Err(flag_errors::name_taken("segment", &definition.name))),
        Err(error) => Err(error.into()),
    }
}

pub(super) fn delete_segment(
    connection: &Connection,
    environment_id: EnvironmentId,
    segment_id: i64,
) -> StoreResult<Result<bool, FieldError>> {
    let record = flag_config(connection, environment_id)?;
    if let Some(feature) = record.config.feature_overriding(segment_id) {
        return Ok(Err(flag_errors::segment_in_use(&feature.definition.name)));
    }
    let deleted = connection
        .prepare_cached("DELETE FROM segments WHERE environment_id = ?1 AND segment_id = ?2")?
        .execute(params![environment_id, segment_id])?;
    if deleted == 0 {
        return Ok(Ok(false));
    }
    connection
        .prepare_cached("DELETE FROM segment_memberships WHERE environment_id = ?1 AND segment_id = ?2")?
        .execute(params![environment_id, segment_id])?;
    bump_version(connection, environment_id)?;
    Ok(Ok(true))
}

pub(super) fn save_feature(
    connection: &Connection,
    environment_id: EnvironmentId,
    feature_id: Option<i64>,
    definition: &FeatureDefinition,
    at: Timestamp,
) -> StoreResult<Result<i64, FieldError>> {
    for (index, segment_override) in definition.segment_overrides.iter().enumerate() {
        let exists = connection
            .prepare_cached("SELECT 1 FROM segments WHERE environment_id = ?1 AND segment_id = ?2")?
            .exists(params![environment_id, segment_override.segment_id])?;
        if !exists {
            return Ok(Err(flag_errors::unknown_override_segment(index, segment_override.segment_id)));
        }
    }
    let json = to_json(definition)?;
    let written = match feature_id {
        None => connection
            .prepare_cached(
                "INSERT INTO features (environment_id, name, definition, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?4)",
            )?
            .execute(params![environment_id, definition.name, json, at.as_micros()])
            .map(|_| Some(connection.last_insert_rowid())),
        Some(feature_id) => connection
            .prepare_cached(
                "UPDATE features SET name = ?3, definition = ?4, updated_at = ?5 \
                 WHERE environment_id = ?1 AND feature_id = ?2",
            )?
            .execute(params![environment_id, feature_id, definition.name, json, at.as_micros()])
            .map(|updated| (updated > 0).then_some(feature_id)),
    };
    match written {
        Ok(Some(feature_id)) => {
            bump_version(connection, environment_id)?;
            Ok(Ok(feature_id))
        }
        Ok(None) => Ok(Err(flag_errors::feature_not_found())),
        Err(error) if is_unique_violation(&error) => Ok(Err(flag_errors::name_taken("feature", &definition.name))),
        Err(error) => Err(error.into()),
    }
}

pub(super) fn delete_feature(
    connection: &Connection,
    environment_id: EnvironmentId,
    feature_id: i64,
) -> StoreResult<bool> {
    let deleted = connection
        .prepare_cached("DELETE FROM features WHERE environment_id = ?1 AND feature_id = ?2")?
        .execute(params![environment_id, feature_id])?;
    if deleted == 0 {
        return Ok(false);
    }
    connection
        .prepare_cached("DELETE FROM identity_overrides WHERE environment_id = ?1 AND feature_id = ?2")?
        .execute(params![environment_id, feature_id])?;
    bump_version(connection, environment_id)?;
    Ok(true)
}

fn feature_exists(connection: &Connection, environment_id: EnvironmentId, feature_id: i64) -> StoreResult<bool> {
    Ok(connection
        .prepare_cached("SELECT 1 FROM features WHERE environment_id = ?1 AND feature_id = ?2")?
        .exists(params![environment_id, feature_id])?)
}

/// Sets a profile's override of a feature (the profile already resolved through forwards).
pub(super) fn put_identity_override(
    connection: &Connection,
    environment_id: EnvironmentId,
    profile_id: &str,
    feature_id: i64,
    state: &IdentityOverride,
    at: Timestamp,
) -> StoreResult<Result<(), FieldError>> {
    if !feature_exists(connection, environment_id, feature_id)? {
        return Ok(Err(flag_errors::feature_not_found()));
    }
    connection
        .prepare_cached(
            "INSERT INTO identity_overrides (environment_id, profile_id, feature_id, enabled, value, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (environment_id, profile_id, feature_id) DO UPDATE SET \
             enabled = excluded.enabled, value = excluded.value, updated_at = excluded.updated_at",
        )?
        .execute(params![
            environment_id,
            profile_id,
            feature_id,
            state.enabled,
            to_json(&state.value)?,
            at.as_micros()
        ])?;
    bump_version(connection, environment_id)?;
    Ok(Ok(()))
}

pub(super) fn delete_identity_override(
    connection: &Connection,
    environment_id: EnvironmentId,
    profile_id: &str,
    feature_id: i64,
) -> StoreResult<bool> {
    let deleted = connection
        .prepare_cached(
            "DELETE FROM identity_overrides WHERE environment_id = ?1 AND profile_id = ?2 AND feature_id = ?3",
        )?
        .execute(params![environment_id, profile_id, feature_id])?;
    if deleted > 0 {
        bump_version(connection, environment_id)?;
    }
    Ok(deleted > 0)
}

pub(super) fn segment_members(
    connection: &Connection,
    environment_id: EnvironmentId,
    segment_id: i64,
    after: Option<&str>,
    limit: usize,
) -> StoreResult<MemberPage> {
    let total: i64 = connection
        .prepare_cached(
            "SELECT count(*) FROM segment_memberships WHERE environment_id = ?1 AND segment_id = ?2 \
             AND exited_at IS NULL",
        )?
        .query_row(params![environment_id, segment_id], |row| row.get(0))?;
    let mut statement = connection.prepare_cached(
        "SELECT m.profile_id, p.user_id, m.entered_at FROM segment_memberships m \
         LEFT JOIN profiles p ON p.environment_id = m.environment_id AND p.profile_id = m.profile_id \
         WHERE m.environment_id = ?1 AND m.segment_id = ?2 AND m.exited_at IS NULL AND m.profile_id > ?3 \
         ORDER BY m.profile_id LIMIT ?4",
    )?;
    let rows =
        statement.query_map(params![environment_id, segment_id, after.unwrap_or(""), limit as i64 + 1], |row| {
            Ok(SegmentMember {
                profile_id: row.get(0)?,
                user_id: row.get(1)?,
                entered_at: Timestamp::from_micros(row.get(2)?),
            })
        })?;
    let mut members = rows.collect::<Result<Vec<_>, _>>()?;
    let next_after = if members.len() > limit {
        members.truncate(limit);
        members.last().map(|member| member.profile_id.clone())
    } else {
        None
    };
    Ok(MemberPage { members, total: u64::try_from(total).unwrap_or(0), next_after })
}
