//! Segments, features and identity overrides on PostgreSQL (the same contract as the embedded
//! store's `flags` module; every change bumps the environment's `flags_version`).

use roster_core::flags::{
    FeatureConfig, FeatureDefinition, FlagConfig, IdentityOverride, IdentityOverrideConfig, SegmentConfig,
    SegmentDefinition,
};
use roster_core::{FieldError, Timestamp};

use super::PgTx;
use crate::flag_errors;
use crate::model::{EnvironmentId, FlagConfigRecord, MemberPage, SegmentMember};
use crate::{StoreError, StoreResult};

fn bump_version(tx: &mut PgTx<'_>, environment_id: EnvironmentId) -> StoreResult<()> {
    tx.execute(
        "UPDATE environments SET flags_version = flags_version + 1 WHERE environment_id = $1",
        &[&environment_id],
    )?;
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("stored {what} is not valid: {error}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|error| StoreError::Database(format!("cannot serialize: {error}")))
}

pub(super) fn flag_config(tx: &mut PgTx<'_>, environment_id: EnvironmentId) -> StoreResult<FlagConfigRecord> {
    let environment = tx.query_one(
        "SELECT evaluation_key, name, flags_version FROM environments WHERE environment_id = $1",
        &[&environment_id],
    )?;
    let mut segments = Vec::new();
    for row in tx.query(
        "SELECT segment_id, definition FROM segments WHERE environment_id = $1 ORDER BY segment_id",
        &[&environment_id],
    )? {
        segments.push(SegmentConfig { id: row.get(0), definition: parse(row.get(1), "segment")? });
    }
    let mut features = Vec::new();
    for row in tx.query(
        "SELECT feature_id, definition FROM features WHERE environment_id = $1 ORDER BY feature_id",
        &[&environment_id],
    )? {
        features.push(FeatureConfig { id: row.get(0), definition: parse(row.get(1), "feature")? });
    }
    let mut identity_overrides = Vec::new();
    for row in tx.query(
        "SELECT profile_id, feature_id, enabled, value FROM identity_overrides WHERE environment_id = $1 \
         ORDER BY profile_id, feature_id",
        &[&environment_id],
    )? {
        identity_overrides.push(IdentityOverrideConfig {
            profile_id: row.get(0),
            feature_id: row.get(1),
            state: IdentityOverride { enabled: row.get(2), value: parse(row.get(3), "override value")? },
        });
    }
    Ok(FlagConfigRecord {
        config: FlagConfig {
            environment_key: environment.get(0),
            environment_name: environment.get(1),
            segments,
            features,
            identity_overrides,
        },
        version: environment.get(2),
    })
}

/// Whether another segment or feature of the environment already has the name (checked before
/// writing, so a taken name is reported rather than retried as a race).
fn name_taken(
    tx: &mut PgTx<'_>,
    sql: &'static str,
    environment_id: EnvironmentId,
    name: &str,
    own_id: Option<i64>,
) -> StoreResult<bool> {
    Ok(tx.query_opt(sql, &[&environment_id, &name, &own_id.unwrap_or(-1)])?.is_some())
}

pub(super) fn save_segment(
    tx: &mut PgTx<'_>,
    environment_id: EnvironmentId,
    segment_id: Option<i64>,
    definition: &SegmentDefinition,
    at: Timestamp,
) -> StoreResult<Result<i64, FieldError>> {
    const TAKEN: &str = "SELECT 1 FROM segments WHERE environment_id = $1 AND name = $2 AND segment_id <> $3";
    if name_taken(tx, TAKEN, environment_id, &definition.name, segment_id)? {
        return Ok(Err(flag_errors::name_taken("segment", &definition.name)));
    }
    let json = to_json(definition)?;
    let saved: Option<i64> = match segment_id {
        None => Some(
            tx.query_one(
                "INSERT INTO segments (environment_id, name, definition, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4) RETURNING segment_id",
                &[&environment_id, &definition.name, &json, &at.as_micros()],
            )?
            .get(0),
        ),
        Some(segment_id) => tx
            .query_opt(
                "UPDATE segments SET name = $3, definition = $4, updated_at = $5 \
                 WHERE environment_id = $1 AND segment_id = $2 RETURNING segment_id",
                &[&environment_id, &segment_id, &definition.name, &json, &at.as_micros()],
            )?
            .map(|row| row.get(0)),
    };
    let Some(saved) = saved else {
        return Ok(Err(flag_errors::segment_not_found()));
    };
    bump_version(tx, environment_id)?;
    Ok(Ok(saved))
}

pub(super) fn delete_segment(
    tx: &mut PgTx<'_>,
    environment_id: EnvironmentId,
    segment_id: i64,
) -> StoreResult<Result<bool, FieldError>> {
    let record = flag_config(tx, environment_id)?;
    if let Some(feature) = record.config.feature_overriding(segment_id) {
        return Ok(Err(flag_errors::segment_in_use(&feature.definition.name)));
    }
    let deleted = tx.execute(
        "DELETE FROM segments WHERE environment_id = $1 AND segment_id = $2",
        &[&environment_id, &segment_id],
    )?;
    if deleted == 0 {
        return Ok(Ok(false));
    }
    tx.execute(
        "DELETE FROM segment_memberships WHERE environment_id = $1 AND segment_id = $2",
        &[&environment_id, &segment_id],
    )?;
    bump_version(tx, environment_id)?;
    Ok(Ok(true))
}

pub(super) fn save_feature(
    tx: &mut PgTx<'_>,
    environment_id: EnvironmentId,
    feature_id: Option<i64>,
    definition: &FeatureDefinition,
    at: Timestamp,
) -> StoreResult<Result<i64, FieldError>> {
    for (index, segment_override) in definition.segment_overrides.iter().enumerate() {
        let exists = tx
            .query_opt(
                "SELECT 1 FROM segments WHERE environment_id = $1 AND segment_id = $2",
                &[&environment_id, &segment_override.segment_id],
            )?
            .is_some();
        if !exists {
            return Ok(Err(flag_errors::unknown_override_segment(index, segment_override.segment_id)));
        }
    }
    const TAKEN: &str = "SELECT 1 FROM features WHERE environment_id = $1 AND name = $2 AND feature_id <> $3";
    if name_taken(tx, TAKEN, environment_id, &definition.name, feature_id)? {
        return Ok(Err(flag_errors::name_taken("feature", &definition.name)));
    }
    let json = to_json(definition)?;
    let saved: Option<i64> = match feature_id {
        None => Some(
            tx.query_one(
                "INSERT INTO features (environment_id, name, definition, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4) RETURNING feature_id",
                &[&environment_id, &definition.name, &json, &at.as_micros()],
            )?
            .get(0),
        ),
        Some(feature_id) => tx
            .query_opt(
                "UPDATE features SET name = $3, definition = $4, updated_at = $5 \
                 WHERE environment_id = $1 AND feature_id = $2 RETURNING feature_id",
                &[&environment_id, &feature_id, &definition.name, &json, &at.as_micros()],
            )?
            .map(|row| row.get(0)),
    };
    let Some(saved) = saved else {
        return Ok(Err(flag_errors::feature_not_found()));
    };
    bump_version(tx, environment_id)?;
    Ok(Ok(saved))
}

pub(super) fn delete_feature(tx: &mut PgTx<'_>, environment_id: EnvironmentId, feature_id: i64) -> StoreResult<bool> {
    let deleted = tx.execute(
        "DELETE FROM features WHERE environment_id = $1 AND feature_id = $2",
        &[&environment_id, &feature_id],
    )?;
    if deleted == 0 {
        return Ok(false);
    }
    tx.execute(
        "DELETE FROM identity_overrides WHERE environment_id = $1 AND feature_id = $2",
        &[&environment_id, &feature_id],
    )?;
    bump_version(tx, environment_id)?;
    Ok(true)
}

pub(super) fn put_identity_override(
    tx: &mut PgTx<'_>,
    environment_id: EnvironmentId,
    profile_id: &str,
    feature_id: i64,
    state: &IdentityOverride,
    at: Timestamp,
) -> StoreResult<Result<(), FieldError>> {
    let exists = tx
        .query_opt(
            "SELECT 1 FROM features WHERE environment_id = $1 AND feature_id = $2",
            &[&environment_id, &feature_id],
        )?
        .is_some();
    if !exists {
        return Ok(Err(flag_errors::feature_not_found()));
    }
    tx.execute(
        "INSERT INTO identity_overrides (environment_id, profile_id, feature_id, enabled, value, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (environment_id, profile_id, feature_id) DO UPDATE SET \
         enabled = excluded.enabled, value = excluded.value, updated_at = excluded.updated_at",
        &[&environment_id, &profile_id, &feature_id, &state.enabled, &to_json(&state.value)?, &at.as_micros()],
    )?;
    bump_version(tx, environment_id)?;
    Ok(Ok(()))
}

pub(super) fn delete_identity_override(
    tx: &mut PgTx<'_>,
    environment_id: EnvironmentId,
    profile_id: &str,
    feature_id: i64,
) -> StoreResult<bool> {
    let deleted = tx.execute(
        "DELETE FROM identity_overrides WHERE environment_id = $1 AND profile_id = $2 AND feature_id = $3",
        &[&environment_id, &profile_id, &feature_id],
    )?;
    if deleted > 0 {
        bump_version(tx, environment_id)?;
    }
    Ok(deleted > 0)
}

pub(super) fn segment_members(
    tx: &mut PgTx<'_>,
    environment_id: EnvironmentId,
    segment_id: i64,
    after: Option<&str>,
    limit: usize,
) -> StoreResult<MemberPage> {
    let total: i64 = tx
        .query_one(
            "SELECT count(*) FROM segment_memberships WHERE environment_id = $1 AND segment_id = $2 \
             AND exited_at IS NULL",
            &[&environment_id, &segment_id],
        )?
        .get(0);
    let rows = tx.query(
        "SELECT m.profile_id, p.user_id, m.entered_at FROM segment_memberships m \
         LEFT JOIN profiles p ON p.environment_id = m.environment_id AND p.profile_id = m.profile_id \
         WHERE m.environment_id = $1 AND m.segment_id = $2 AND m.exited_at IS NULL AND m.profile_id > $3 \
         ORDER BY m.profile_id LIMIT $4",
        &[
            &environment_id,
            &segment_id,
            &after.unwrap_or(""),
            &i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX),
        ],
    )?;
    let mut members: Vec<SegmentMember> = rows
        .iter()
        .map(|row| SegmentMember {
            profile_id: row.get(0),
            user_id: row.get(1),
            entered_at: Timestamp::from_micros(row.get(2)),
        })
        .collect();
    let next_after = if members.len() > limit {
        members.truncate(limit);
        members.last().map(|member| member.profile_id.clone())
    } else {
        None
    };
    Ok(MemberPage { members, total: u64::try_from(total).unwrap_or(0), next_after })
}
