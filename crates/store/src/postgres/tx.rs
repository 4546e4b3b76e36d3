//! [`IdentityTx`] on a PostgreSQL transaction: the write path's lookups and writes as SQL.

use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{Row, Statement, Transaction};
use roster_core::{DeviceUpdate, IdentifierKind, Timestamp};
use serde_json::Value;

use crate::model::{Device, EnvironmentId, Profile};
use crate::resolution::{EventWrite, IdentityTx, ProfileWrite, SeenMessage, StoredProfile};
use crate::rows::{StoredProfileRow, identifier_kind, parse_object};
use crate::{StoreError, StoreResult};

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// An open transaction and the connection's prepared statements.
pub struct PgTx<'c> {
    transaction: Option<Transaction<'c>>,
    statements: &'c mut HashMap<&'static str, Statement>,
    /// Environments seen to have no suppressed user ids in this transaction. It holds the
    /// environment's write lock, under which suppressions change, so one look per transaction
    /// spares a round trip per item.
    unsuppressed_environments: Vec<EnvironmentId>,
    /// Rows only ever appended by the write path, sent in one statement each at commit (or
    /// before anything that reads or changes those tables): one round trip per batch instead of
    /// one per item.
    pending_events: PendingEvents,
    pending_history: PendingHistory,
    /// Profile and identifier writes, also sent in one statement each: the write path reads them
    /// back through this buffer, and every statement that reads or changes those tables by
    /// other means sends the buffer first (see `query`), so SQL never sees a stale row.
    pending_identity: PendingIdentity,
    /// Identifier lookups answered ahead for a whole batch (`prefetch_identifiers`), `None` for
    /// identifiers known to be absent. Dropped by any statement that may change identifiers or
    /// profiles other than through the buffer.
    prefetched: HashMap<(EnvironmentId, &'static str, String), Option<StoredProfile>>,
}

#[derive(Default)]
struct PendingIdentity {
    /// The latest write of each profile, by (environment, profile id).
    profiles: HashMap<(EnvironmentId, String), (StoredProfile, String, String)>,
    /// The latest owner of each identifier, by (environment, kind, value).
    identifiers: HashMap<(EnvironmentId, &'static str, String), String>,
}

impl PendingIdentity {
    fn is_empty(&self) -> bool {
        self.profiles.is_empty() && self.identifiers.is_empty()
    }
}

#[derive(Default)]
struct PendingEvents {
    environment_ids: Vec<i64>,
    event_ids: Vec<String>,
    profile_ids: Vec<String>,
    distinct_ids: Vec<Option<String>>,
    anonymous_ids: Vec<Option<String>>,
    events: Vec<String>,
    properties: Vec<String>,
    timestamps: Vec<i64>,
    received_at: Vec<i64>,
    identity_traits: Vec<String>,
    message_ids: Vec<Option<String>>,
    contexts: Vec<Option<String>>,
}

#[derive(Default)]
struct PendingHistory {
    environment_ids: Vec<i64>,
    profile_ids: Vec<String>,
    changes: Vec<String>,
    recorded_at: Vec<i64>,
}

impl<'c> PgTx<'c> {
    pub(super) fn new(transaction: Transaction<'c>, statements: &'c mut HashMap<&'static str, Statement>) -> Self {
        PgTx {
            transaction: Some(transaction),
            statements,
            unsuppressed_environments: Vec::new(),
            pending_events: PendingEvents::default(),
            pending_history: PendingHistory::default(),
            pending_identity: PendingIdentity::default(),
            prefetched: HashMap::new(),
        }
    }

    fn transaction(&mut self) -> StoreResult<&mut Transaction<'c>> {
        self.transaction.as_mut().ok_or_else(|| StoreError::Database("the transaction is already finished".into()))
    }

    /// The statement for `sql`, prepared once per connection.
    fn statement(&mut self, sql: &'static str) -> StoreResult<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.transaction()?.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    // Every statement sends the buffered profile and identifier writes first, except those the
    // `_beside_identity` variants run: statements on other tables, picked one by one.

    pub(crate) fn query(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<Vec<Row>> {
        self.flush_identity()?;
        self.query_beside_identity(sql, params)
    }

    pub(crate) fn query_opt(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<Option<Row>> {
        self.flush_identity()?;
        self.query_opt_beside_identity(sql, params)
    }

    pub(crate) fn query_one(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<Row> {
        self.flush_identity()?;
        let statement = self.statement(sql)?;
        Ok(self.transaction()?.query_one(&statement, params)?)
    }

    pub(crate) fn execute(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<u64> {
        self.flush_identity()?;
        self.execute_beside_identity(sql, params)
    }

    /// Statements built at run time (users' SQL, settings): not cached.
    pub(crate) fn raw(&mut self) -> StoreResult<&mut Transaction<'c>> {
        self.flush_identity()?;
        self.transaction()
    }

    /// A statement that neither reads nor writes `profiles` or `identifiers`.
    fn query_beside_identity(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<Vec<Row>> {
        let statement = self.statement(sql)?;
        Ok(self.transaction()?.query(&statement, params)?)
    }

    fn query_opt_beside_identity(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<Option<Row>> {
        let statement = self.statement(sql)?;
        Ok(self.transaction()?.query_opt(&statement, params)?)
    }

    fn execute_beside_identity(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<u64> {
        let statement = self.statement(sql)?;
        Ok(self.transaction()?.execute(&statement, params)?)
    }

    /// Looks up, in one statement, every identifier of either kind a batch's items may look for
    /// (a user id is also looked up as an anonymous id and the other way round).
    pub(super) fn prefetch_identifiers<'v>(
        &mut self,
        environment_id: EnvironmentId,
        values: impl Iterator<Item = &'v str>,
    ) -> StoreResult<()> {
        let mut kinds = Vec::new();
        let mut wanted = Vec::new();
        for value in values {
            for kind in [IdentifierKind::UserId, IdentifierKind::AnonymousId] {
                kinds.push(kind.as_str());
                wanted.push(value.to_owned());
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let rows = self.query(
            "SELECT w.kind, w.value, p.profile_id, p.user_id, p.identified, p.traits::text, p.trait_timestamps, \
             p.created_at, p.updated_at, p.merge_count FROM unnest($2::text[], $3::text[]) AS w(kind, value) \
             CROSS JOIN LATERAL (SELECT p.* FROM identifiers i JOIN profiles p ON p.environment_id = i.environment_id \
             AND p.profile_id = i.profile_id WHERE i.environment_id = $1 AND i.kind = w.kind AND i.value = w.value) p",
            &[&environment_id, &kinds, &wanted],
        )?;
        for (kind, value) in kinds.into_iter().zip(wanted) {
            self.prefetched.insert((environment_id, kind, value), None);
        }
        for row in rows {
            let kind = identifier_kind(row.get(0))?.as_str();
            let value: String = row.get(1);
            let profile = profile_from_columns(&row, 2).into_stored()?;
            self.prefetched.insert((environment_id, kind, value), Some(profile));
        }
        Ok(())
    }

    /// Writes the buffered profiles, then the buffered identifiers.
    fn flush_identity(&mut self) -> StoreResult<()> {
        self.prefetched.clear();
        if self.pending_identity.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending_identity);
        if !pending.profiles.is_empty() {
            let mut environment_ids = Vec::with_capacity(pending.profiles.len());
            let mut profile_ids = Vec::with_capacity(pending.profiles.len());
            let mut user_ids = Vec::with_capacity(pending.profiles.len());
            let mut identified = Vec::with_capacity(pending.profiles.len());
            let mut traits = Vec::with_capacity(pending.profiles.len());
            let mut trait_timestamps = Vec::with_capacity(pending.profiles.len());
            let mut created_at = Vec::with_capacity(pending.profiles.len());
            let mut updated_at = Vec::with_capacity(pending.profiles.len());
            let mut merge_counts = Vec::with_capacity(pending.profiles.len());
            for ((environment_id, profile_id), (profile, traits_json, timestamps_json)) in pending.profiles {
                environment_ids.push(environment_id);
                profile_ids.push(profile_id);
                user_ids.push(profile.user_id);
                identified.push(profile.identified);
                traits.push(traits_json);
                trait_timestamps.push(timestamps_json);
                created_at.push(profile.created_at.as_micros());
                updated_at.push(profile.updated_at.as_micros());
                merge_counts.push(profile.merge_count);
            }
            self.execute_beside_identity(
                "INSERT INTO profiles (environment_id, profile_id, user_id, identified, traits, trait_timestamps, \
                 created_at, updated_at, merge_count) SELECT e, p, u, i, t::jsonb, ts, c, up, m FROM \
                 unnest($1::bigint[], $2::text[], $3::text[], $4::bool[], $5::text[], $6::text[], $7::bigint[], \
                 $8::bigint[], $9::bigint[]) AS x(e, p, u, i, t, ts, c, up, m) \
                 ON CONFLICT (environment_id, profile_id) DO UPDATE SET user_id = excluded.user_id, \
                 identified = excluded.identified, traits = excluded.traits, trait_timestamps = excluded.trait_timestamps, \
                 created_at = excluded.created_at, updated_at = excluded.updated_at, merge_count = excluded.merge_count",
                &[
                    &environment_ids,
                    &profile_ids,
                    &user_ids,
                    &identified,
                    &traits,
                    &trait_timestamps,
                    &created_at,
                    &updated_at,
                    &merge_counts,
                ],
            )?;
        }
        if !pending.identifiers.is_empty() {
            let mut environment_ids = Vec::with_capacity(pending.identifiers.len());
            let mut kinds = Vec::with_capacity(pending.identifiers.len());
            let mut values = Vec::with_capacity(pending.identifiers.len());
            let mut profile_ids = Vec::with_capacity(pending.identifiers.len());
            for ((environment_id, kind, value), profile_id) in pending.identifiers {
                environment_ids.push(environment_id);
                kinds.push(kind);
                values.push(value);
                profile_ids.push(profile_id);
            }
            self.execute_beside_identity(
                "INSERT INTO identifiers (environment_id, kind, value, profile_id) SELECT e, k, v, p FROM \
                 unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) AS x(e, k, v, p) \
                 ON CONFLICT (environment_id, kind, value) DO UPDATE SET profile_id = excluded.profile_id",
                &[&environment_ids, &kinds, &values, &profile_ids],
            )?;
        }
        Ok(())
    }

    /// Writes the buffered appends (after the buffered profiles they belong to).
    fn flush(&mut self) -> StoreResult<()> {
        self.flush_identity()?;
        if !self.pending_events.event_ids.is_empty() {
            let pending = std::mem::take(&mut self.pending_events);
            self.execute(
                "INSERT INTO events (environment_id, event_id, profile_id, distinct_id, anonymous_id, event, \
                 properties, timestamp, received_at, identity_traits, message_id, context) \
                 SELECT e, i, p, d, a, n, pr::jsonb, t, r, it::jsonb, m, c::jsonb FROM unnest($1::bigint[], $2::text[], \
                 $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], \
                 $10::text[], $11::text[], $12::text[]) AS x(e, i, p, d, a, n, pr, t, r, it, m, c)",
                &[
                    &pending.environment_ids,
                    &pending.event_ids,
                    &pending.profile_ids,
                    &pending.distinct_ids,
                    &pending.anonymous_ids,
                    &pending.events,
                    &pending.properties,
                    &pending.timestamps,
                    &pending.received_at,
                    &pending.identity_traits,
                    &pending.message_ids,
                    &pending.contexts,
                ],
            )?;
        }
        if !self.pending_history.profile_ids.is_empty() {
            let pending = std::mem::take(&mut self.pending_history);
            self.execute(
                "INSERT INTO trait_history (environment_id, profile_id, changes, recorded_at) \
                 SELECT e, p, c::jsonb, r FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[]) \
                 AS x(e, p, c, r)",
                &[&pending.environment_ids, &pending.profile_ids, &pending.changes, &pending.recorded_at],
            )?;
        }
        Ok(())
    }

    pub(super) fn commit(&mut self) -> StoreResult<()> {
        self.flush_identity()?;
        self.flush()?;
        match self.transaction.take() {
            Some(transaction) => Ok(transaction.commit()?),
            None => Ok(()),
        }
    }

    /// The id a profile id stands for now: itself, or the survivor it was merged into.
    pub(crate) fn current_profile_id(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
    ) -> StoreResult<Option<String>> {
        if let Some(survivor) = self.forwarded_profile_id(environment_id, profile_id)? {
            return Ok(Some(survivor));
        }
        let exists = self
            .query_opt(
                "SELECT 1 FROM profiles WHERE environment_id = $1 AND profile_id = $2",
                &[&environment_id, &profile_id],
            )?
            .is_some();
        Ok(exists.then(|| profile_id.to_owned()))
    }

    /// A profile as read back, with identifiers and devices.
    pub(crate) fn full_profile(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
    ) -> StoreResult<Option<Profile>> {
        let Some(row) = self.profile_row(environment_id, profile_id)? else { return Ok(None) };
        let identifiers = self.identifiers_of(environment_id, profile_id)?;
        let devices = self.devices_of(environment_id, profile_id)?;
        row.into_profile_with(identifiers, devices).map(Some)
    }

    fn profile_row(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
    ) -> StoreResult<Option<StoredProfileRow>> {
        Ok(self
            .query_opt(
                "SELECT profile_id, user_id, identified, traits::text, trait_timestamps, created_at, updated_at, \
                 merge_count FROM profiles WHERE environment_id = $1 AND profile_id = $2",
                &[&environment_id, &profile_id],
            )?
            .as_ref()
            .map(profile_from_row))
    }

    fn devices_of(&mut self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Vec<Device>> {
        let rows = self.query(
            "SELECT token, platform, attributes::text, last_used, last_status, created_at, updated_at FROM devices \
             WHERE environment_id = $1 AND profile_id = $2 ORDER BY token",
            &[&environment_id, &profile_id],
        )?;
        rows.iter()
            .map(|row| {
                let token: String = row.get(0);
                Ok(Device {
                    attributes: parse_object(row.get(2), &token)?,
                    platform: row.get(1),
                    last_used: row.get::<_, Option<i64>>(3).map(Timestamp::from_micros),
                    last_status: row.get(4),
                    created_at: Timestamp::from_micros(row.get(5)),
                    updated_at: Timestamp::from_micros(row.get(6)),
                    token,
                })
            })
            .collect()
    }
}

fn profile_from_row(row: &Row) -> StoredProfileRow {
    profile_from_columns(row, 0)
}

/// The eight profile columns, in the order the queries select them, from column `first` on.
fn profile_from_columns(row: &Row, first: usize) -> StoredProfileRow {
    StoredProfileRow {
        profile_id: row.get(first),
        user_id: row.get(first + 1),
        identified: row.get(first + 2),
        traits_json: row.get(first + 3),
        trait_timestamps_json: row.get(first + 4),
        created_at: row.get(first + 5),
        updated_at: row.get(first + 6),
        merge_count: row.get(first + 7),
    }
}

impl IdentityTx for PgTx<'_> {
    fn find_by_identifier(
        &mut self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
    ) -> StoreResult<Option<StoredProfile>> {
        let pending_owner =
            self.pending_identity.identifiers.get(&(environment_id, kind.as_str(), value.to_owned())).cloned();
        if let Some(profile_id) = pending_owner {
            return self.load_profile(environment_id, &profile_id);
        }
        if let Some(prefetched) = self.prefetched.get(&(environment_id, kind.as_str(), value.to_owned())) {
            let Some(profile) = prefetched else { return Ok(None) };
            // The profile may have been written since.
            if let Some((pending, _, _)) =
                self.pending_identity.profiles.get(&(environment_id, profile.profile_id.clone()))
            {
                return Ok(Some(pending.clone()));
            }
            return Ok(Some(profile.clone()));
        }
        // Identifiers not in the buffer are as stored; their profile may have a newer write.
        let row = self.query_opt_beside_identity(
            "SELECT p.profile_id, p.user_id, p.identified, p.traits::text, p.trait_timestamps, p.created_at, \
             p.updated_at, p.merge_count FROM identifiers i JOIN profiles p ON p.environment_id = i.environment_id \
             AND p.profile_id = i.profile_id WHERE i.environment_id = $1 AND i.kind = $2 AND i.value = $3",
            &[&environment_id, &kind.as_str(), &value],
        )?;
        let Some(row) = row else { return Ok(None) };
        let stored = profile_from_row(&row);
        if let Some((pending, _, _)) = self.pending_identity.profiles.get(&(environment_id, stored.profile_id.clone()))
        {
            return Ok(Some(pending.clone()));
        }
        stored.into_stored().map(Some)
    }

    fn load_profile(&mut self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Option<StoredProfile>> {
        if let Some((pending, _, _)) = self.pending_identity.profiles.get(&(environment_id, profile_id.to_owned())) {
            return Ok(Some(pending.clone()));
        }
        // Not in the buffer: the stored row is the latest.
        self.query_opt_beside_identity(
            "SELECT profile_id, user_id, identified, traits::text, trait_timestamps, created_at, updated_at, \
             merge_count FROM profiles WHERE environment_id = $1 AND profile_id = $2",
            &[&environment_id, &profile_id],
        )?
        .as_ref()
        .map(|row| profile_from_row(row).into_stored())
        .transpose()
    }

    fn forwarded_profile_id(&mut self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Option<String>> {
        Ok(self
            .query_opt_beside_identity(
                "SELECT profile_id FROM profile_forwards WHERE environment_id = $1 AND old_profile_id = $2",
                &[&environment_id, &profile_id],
            )?
            .map(|row| row.get(0)))
    }

    fn save_profile(&mut self, environment_id: EnvironmentId, write: &ProfileWrite<'_>) -> StoreResult<()> {
        self.pending_identity.profiles.insert(
            (environment_id, write.profile.profile_id.clone()),
            (write.profile.clone(), write.traits_json.clone(), write.trait_timestamps_json.clone()),
        );
        Ok(())
    }

    fn put_identifier(
        &mut self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
        profile_id: &str,
    ) -> StoreResult<()> {
        self.pending_identity
            .identifiers
            .insert((environment_id, kind.as_str(), value.to_owned()), profile_id.to_owned());
        Ok(())
    }

    fn delete_identifier(
        &mut self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
    ) -> StoreResult<()> {
        self.execute(
            "DELETE FROM identifiers WHERE environment_id = $1 AND kind = $2 AND value = $3",
            &[&environment_id, &kind.as_str(), &value],
        )?;
        Ok(())
    }

    fn move_identifiers(&mut self, environment_id: EnvironmentId, from: &str, to: &str) -> StoreResult<()> {
        self.execute(
            "UPDATE identifiers SET profile_id = $3 WHERE environment_id = $1 AND profile_id = $2",
            &[&environment_id, &from, &to],
        )?;
        Ok(())
    }

    fn retire_profile(&mut self, environment_id: EnvironmentId, from: &str, to: &str) -> StoreResult<()> {
        self.execute("DELETE FROM profiles WHERE environment_id = $1 AND profile_id = $2", &[&environment_id, &from])?;
        self.execute(
            "UPDATE profile_forwards SET profile_id = $3 WHERE environment_id = $1 AND profile_id = $2",
            &[&environment_id, &from, &to],
        )?;
        self.execute(
            "INSERT INTO profile_forwards (old_profile_id, environment_id, profile_id) VALUES ($1, $2, $3) \
             ON CONFLICT (old_profile_id) DO UPDATE SET profile_id = excluded.profile_id",
            &[&from, &environment_id, &to],
        )?;
        Ok(())
    }

    fn move_activity(&mut self, environment_id: EnvironmentId, from: &str, to: &str) -> StoreResult<()> {
        self.flush()?;
        const MOVES: [&str; 4] = [
            "UPDATE events SET profile_id = $3 WHERE environment_id = $1 AND profile_id = $2",
            "UPDATE trait_history SET profile_id = $3 WHERE environment_id = $1 AND profile_id = $2",
            "UPDATE devices SET profile_id = $3 WHERE environment_id = $1 AND profile_id = $2",
            "UPDATE segment_memberships SET profile_id = $3 WHERE environment_id = $1 AND profile_id = $2",
        ];
        for sql in MOVES {
            self.execute(sql, &[&environment_id, &from, &to])?;
        }
        // The survivor's own overrides win over the absorbed profile's.
        self.execute(
            "INSERT INTO identity_overrides (environment_id, profile_id, feature_id, enabled, value, updated_at) \
             SELECT environment_id, $3, feature_id, enabled, value, updated_at FROM identity_overrides \
             WHERE environment_id = $1 AND profile_id = $2 ON CONFLICT DO NOTHING",
            &[&environment_id, &from, &to],
        )?;
        self.execute(
            "DELETE FROM identity_overrides WHERE environment_id = $1 AND profile_id = $2",
            &[&environment_id, &from],
        )?;
        Ok(())
    }

    fn set_events_distinct_id(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        distinct_id: &str,
    ) -> StoreResult<()> {
        self.flush()?;
        self.execute(
            "UPDATE events SET distinct_id = $3 WHERE environment_id = $1 AND profile_id = $2 \
             AND distinct_id IS DISTINCT FROM $3",
            &[&environment_id, &profile_id, &distinct_id],
        )?;
        Ok(())
    }

    fn insert_event(&mut self, environment_id: EnvironmentId, event: &EventWrite<'_>) -> StoreResult<()> {
        let pending = &mut self.pending_events;
        pending.environment_ids.push(environment_id);
        pending.event_ids.push(event.event_id.to_owned());
        pending.profile_ids.push(event.profile_id.to_owned());
        pending.distinct_ids.push(event.distinct_id.map(str::to_owned));
        pending.anonymous_ids.push(event.anonymous_id.map(str::to_owned));
        pending.events.push(event.command.event.clone());
        pending.properties.push(event.command.properties_json.clone());
        pending.timestamps.push(event.command.timestamp.as_micros());
        pending.received_at.push(event.received_at.as_micros());
        pending.identity_traits.push(event.identity_traits_json.to_owned());
        pending.message_ids.push(event.command.message_id.clone());
        pending.contexts.push(event.command.context_json.clone());
        Ok(())
    }

    fn record_trait_changes(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        changes_json: &str,
        recorded_at: Timestamp,
    ) -> StoreResult<()> {
        let pending = &mut self.pending_history;
        pending.environment_ids.push(environment_id);
        pending.profile_ids.push(profile_id.to_owned());
        pending.changes.push(changes_json.to_owned());
        pending.recorded_at.push(recorded_at.as_micros());
        Ok(())
    }

    fn find_message(&mut self, environment_id: EnvironmentId, message_id: &str) -> StoreResult<Option<SeenMessage>> {
        Ok(self
            .query_opt_beside_identity(
                "SELECT received_at, profile_id, event_id FROM message_ids WHERE environment_id = $1 AND message_id = $2",
                &[&environment_id, &message_id],
            )?
            .map(|row| SeenMessage {
                received_at: Timestamp::from_micros(row.get(0)),
                profile_id: row.get(1),
                event_id: row.get(2),
            }))
    }

    fn put_message(&mut self, environment_id: EnvironmentId, message_id: &str, seen: &SeenMessage) -> StoreResult<()> {
        self.execute_beside_identity(
            "INSERT INTO message_ids (environment_id, message_id, received_at, profile_id, event_id) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (environment_id, message_id) DO UPDATE SET \
             received_at = excluded.received_at, profile_id = excluded.profile_id, event_id = excluded.event_id",
            &[&environment_id, &message_id, &seen.received_at.as_micros(), &seen.profile_id, &seen.event_id],
        )?;
        Ok(())
    }

    fn new_id(&mut self) -> String {
        uuid::Uuid::now_v7().to_string()
    }

    fn identifiers_of(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
    ) -> StoreResult<Vec<(IdentifierKind, String)>> {
        let rows = self.query(
            "SELECT kind, value FROM identifiers WHERE environment_id = $1 AND profile_id = $2 ORDER BY kind, value",
            &[&environment_id, &profile_id],
        )?;
        rows.iter().map(|row| Ok((identifier_kind(row.get(0))?, row.get(1)))).collect()
    }

    fn is_suppressed(&mut self, environment_id: EnvironmentId, user_id: &str) -> StoreResult<bool> {
        if self.unsuppressed_environments.contains(&environment_id) {
            return Ok(false);
        }
        let any = self
            .query_opt_beside_identity(
                "SELECT 1 FROM suppressions WHERE environment_id = $1 LIMIT 1",
                &[&environment_id],
            )?
            .is_some();
        if !any {
            self.unsuppressed_environments.push(environment_id);
            return Ok(false);
        }
        Ok(self
            .query_opt_beside_identity(
                "SELECT 1 FROM suppressions WHERE environment_id = $1 AND user_id = $2",
                &[&environment_id, &user_id],
            )?
            .is_some())
    }

    fn set_suppressed(
        &mut self,
        environment_id: EnvironmentId,
        user_id: &str,
        suppressed: bool,
        at: Timestamp,
    ) -> StoreResult<()> {
        self.unsuppressed_environments.retain(|known| *known != environment_id);
        if suppressed {
            self.execute(
                "INSERT INTO suppressions (environment_id, user_id, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (environment_id, user_id) DO NOTHING",
                &[&environment_id, &user_id, &at.as_micros()],
            )?;
        } else {
            self.execute(
                "DELETE FROM suppressions WHERE environment_id = $1 AND user_id = $2",
                &[&environment_id, &user_id],
            )?;
        }
        Ok(())
    }

    fn upsert_device(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        device: &DeviceUpdate,
        at: Timestamp,
    ) -> StoreResult<()> {
        let existing = self.query_opt(
            "SELECT profile_id, attributes::text, created_at FROM devices WHERE environment_id = $1 AND token = $2",
            &[&environment_id, &device.token],
        )?;
        // A token changing hands starts afresh: what the previous owner's app recorded is theirs.
        let changes_hands = existing.as_ref().is_some_and(|row| row.get::<_, &str>(0) != profile_id);
        let (stored, created_at) = match &existing {
            Some(row) if !changes_hands => (Some(parse_object(row.get(1), &device.token)?), row.get::<_, i64>(2)),
            _ => (None, at.as_micros()),
        };
        let attributes = Value::Object(device.merged_attributes(stored)).to_string();
        let last_used = device.mark_used.then_some(at.as_micros());
        self.execute(
            "INSERT INTO devices (environment_id, token, profile_id, platform, attributes, last_used, last_status, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7, $8, $9) \
             ON CONFLICT (environment_id, token) DO UPDATE SET profile_id = excluded.profile_id, \
             platform = COALESCE(excluded.platform, devices.platform), attributes = excluded.attributes, \
             last_used = COALESCE(excluded.last_used, devices.last_used), \
             last_status = CASE WHEN $10 THEN excluded.last_status \
                 ELSE COALESCE(excluded.last_status, devices.last_status) END, \
             created_at = excluded.created_at, updated_at = excluded.updated_at",
            &[
                &environment_id,
                &device.token,
                &profile_id,
                &device.platform,
                &attributes,
                &last_used,
                &device.last_status,
                &created_at,
                &at.as_micros(),
                &changes_hands,
            ],
        )?;
        Ok(())
    }

    fn delete_device(&mut self, environment_id: EnvironmentId, profile_id: &str, token: &str) -> StoreResult<bool> {
        let deleted = self.execute(
            "DELETE FROM devices WHERE environment_id = $1 AND profile_id = $2 AND token = $3",
            &[&environment_id, &profile_id, &token],
        )?;
        Ok(deleted > 0)
    }

    fn erase_profile(&mut self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<()> {
        self.flush()?;
        const ERASURES: [&str; 8] = [
            "DELETE FROM profiles WHERE environment_id = $1 AND profile_id = $2",
            "DELETE FROM identifiers WHERE environment_id = $1 AND profile_id = $2",
            "DELETE FROM devices WHERE environment_id = $1 AND profile_id = $2",
            "DELETE FROM events WHERE environment_id = $1 AND profile_id = $2",
            "DELETE FROM trait_history WHERE environment_id = $1 AND profile_id = $2",
            "DELETE FROM profile_forwards WHERE environment_id = $1 AND profile_id = $2",
            "DELETE FROM segment_memberships WHERE environment_id = $1 AND profile_id = $2",
            "DELETE FROM identity_overrides WHERE environment_id = $1 AND profile_id = $2",
        ];
        for sql in ERASURES {
            self.execute(sql, &[&environment_id, &profile_id])?;
        }
        Ok(())
    }

    fn open_memberships(&mut self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Vec<i64>> {
        Ok(self
            .query_beside_identity(
                "SELECT segment_id FROM segment_memberships WHERE environment_id = $1 AND profile_id = $2 \
                 AND exited_at IS NULL",
                &[&environment_id, &profile_id],
            )?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    fn enter_segment(
        &mut self,
        environment_id: EnvironmentId,
        segment_id: i64,
        profile_id: &str,
        at: Timestamp,
    ) -> StoreResult<()> {
        self.execute_beside_identity(
            "INSERT INTO segment_memberships (environment_id, segment_id, profile_id, entered_at) VALUES ($1, $2, $3, $4)",
            &[&environment_id, &segment_id, &profile_id, &at.as_micros()],
        )?;
        Ok(())
    }

    fn exit_segment(
        &mut self,
        environment_id: EnvironmentId,
        segment_id: i64,
        profile_id: &str,
        at: Timestamp,
    ) -> StoreResult<()> {
        self.execute_beside_identity(
            "UPDATE segment_memberships SET exited_at = $4 WHERE environment_id = $1 AND segment_id = $2 \
             AND profile_id = $3 AND exited_at IS NULL",
            &[&environment_id, &segment_id, &profile_id, &at.as_micros()],
        )?;
        Ok(())
    }

    fn profile_ids_after(
        &mut self,
        environment_id: EnvironmentId,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        Ok(self
            .query(
                "SELECT profile_id FROM profiles WHERE environment_id = $1 AND profile_id > $2 ORDER BY profile_id LIMIT $3",
                &[&environment_id, &after.unwrap_or(""), &i64::try_from(limit).unwrap_or(i64::MAX)],
            )?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }
}
