//! Per-trait last-writer-wins state.
//!
//! Every trait keeps the timestamp of the write that set it; a delete (`null`) is kept as a
//! timestamped tombstone so that a late, older write cannot resurrect it. Entries are compared by
//! `(timestamp, tombstone-over-value, canonical JSON)`, a total order, so applying a set of updates
//! in any order, any number of times, or merging two profiles in either direction, ends in the same
//! state: the set is a join-semilattice.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::timestamp::Timestamp;

/// One trait's state: its value, or `None` for a tombstone, and the timestamp of the write.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitEntry {
    pub value: Option<Value>,
    pub updated_at: Timestamp,
}

impl TraitEntry {
    /// Whether `self` beats `other` for the same key. Ties on timestamp are broken so that the
    /// outcome never depends on arrival order: a tombstone beats a value, then the larger
    /// canonical JSON text wins.
    fn supersedes(&self, other: &TraitEntry) -> bool {
        self.order_against(other) == Ordering::Greater
    }

    fn order_against(&self, other: &TraitEntry) -> Ordering {
        self.updated_at.cmp(&other.updated_at).then_with(|| match (&self.value, &other.value) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(mine), Some(theirs)) if mine == theirs => Ordering::Equal,
            (Some(mine), Some(theirs)) => canonical_json(mine).cmp(&canonical_json(theirs)),
        })
    }
}

/// Canonical text of a value: serde_json's map is ordered by key, so equal values print equally.
fn canonical_json(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// One change of a trait's live value: what trait history records.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitChange {
    pub key: String,
    /// `None`: the trait had no value (never set, or deleted).
    pub old_value: Option<Value>,
    /// `None`: the trait was deleted.
    pub new_value: Option<Value>,
    /// The timestamp of the write that made the change.
    pub updated_at: Timestamp,
}

/// All traits of one profile, tombstones included.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraitSet {
    entries: BTreeMap<String, TraitEntry>,
}

impl TraitSet {
    pub fn new() -> Self {
        TraitSet::default()
    }

    /// Rebuilds the set from its stored form: live values plus the timestamps of every key
    /// (a key with a timestamp and no value is a tombstone).
    pub fn from_stored(live_values: Map<String, Value>, timestamps: BTreeMap<String, Timestamp>) -> Self {
        let mut live_values = live_values;
        let entries = timestamps
            .into_iter()
            .map(|(key, updated_at)| {
                let value = live_values.remove(&key);
                (key, TraitEntry { value, updated_at })
            })
            .collect();
        TraitSet { entries }
    }

    /// Applies one write of `key`. `None` deletes. A write older than (or tied and losing to) the
    /// stored entry is ignored. Returns the change of the live value, if there was one (a newer
    /// write of the same value moves the timestamp but is not a change).
    pub fn apply(&mut self, key: &str, value: Option<Value>, updated_at: Timestamp) -> Option<TraitChange> {
        let incoming = TraitEntry { value, updated_at };
        let old_value = match self.entries.get_mut(key) {
            Some(existing) if !incoming.supersedes(existing) => return None,
            Some(existing) => std::mem::replace(existing, incoming.clone()).value,
            None => {
                self.entries.insert(key.to_owned(), incoming.clone());
                None
            }
        };
        (old_value != incoming.value).then(|| TraitChange {
            key: key.to_owned(),
            old_value,
            new_value: incoming.value,
            updated_at,
        })
    }

    /// Applies a patch: every key sent is written (`null` deletes), keys not sent are left alone.
    /// Returns the changes of live values.
    pub fn apply_patch(&mut self, patch: &Map<String, Value>, updated_at: Timestamp) -> Vec<TraitChange> {
        patch
            .iter()
            .filter_map(|(key, value)| {
                let value = if value.is_null() { None } else { Some(value.clone()) };
                self.apply(key, value, updated_at)
            })
            .collect()
    }

    /// Writes only keys the profile holds no live value for (PostHog's `$set_once`).
    pub fn apply_patch_if_absent(&mut self, patch: &Map<String, Value>, updated_at: Timestamp) -> Vec<TraitChange> {
        let mut changes = Vec::new();
        for (key, value) in patch {
            if value.is_null() || self.entries.get(key).is_some_and(|entry| entry.value.is_some()) {
                continue;
            }
            changes.extend(self.apply(key, Some(value.clone()), updated_at));
        }
        changes
    }

    /// Merges another profile's traits into this one, entry by entry, by the same order as
    /// `apply`. Commutative, associative and idempotent. Returns the changes to this profile.
    pub fn merge(&mut self, other: &TraitSet) -> Vec<TraitChange> {
        other.entries.iter().filter_map(|(key, entry)| self.apply(key, entry.value.clone(), entry.updated_at)).collect()
    }

    pub fn get(&self, key: &str) -> Option<&TraitEntry> {
        self.entries.get(key)
    }

    /// The live values (tombstones left out), as stored in the `traits` column and shown to users.
    pub fn live_values(&self) -> Map<String, Value> {
        self.entries.iter().filter_map(|(key, entry)| entry.value.clone().map(|value| (key.clone(), value))).collect()
    }

    /// Timestamps of every key, tombstones included (the stored companion of `live_values`).
    pub fn timestamps(&self) -> BTreeMap<String, Timestamp> {
        self.entries.iter().map(|(key, entry)| (key.clone(), entry.updated_at)).collect()
    }

    /// The live values as a JSON object text, written straight from the entries (no copy of the
    /// values): this runs for every stored write.
    pub fn live_values_json(&self) -> String {
        let live = self.entries.iter().filter_map(|(key, entry)| entry.value.as_ref().map(|value| (key, value)));
        serde_json::to_string(&SerializeMap(std::cell::Cell::new(Some(live)))).unwrap_or_else(|_| "{}".to_owned())
    }

    /// The timestamps of every key (tombstones included) as a JSON object of microseconds.
    pub fn timestamps_json(&self) -> String {
        let timestamps = self.entries.iter().map(|(key, entry)| (key, entry.updated_at.as_micros()));
        serde_json::to_string(&SerializeMap(std::cell::Cell::new(Some(timestamps)))).unwrap_or_else(|_| "{}".to_owned())
    }

    pub fn live_count(&self) -> usize {
        self.entries.values().filter(|entry| entry.value.is_some()).count()
    }

    pub fn entries(&self) -> impl Iterator<Item = (&String, &TraitEntry)> {
        self.entries.iter()
    }
}

/// Serializes an iterator of pairs as a JSON object without collecting it first.
struct SerializeMap<I>(std::cell::Cell<Option<I>>);

impl<'a, V, I> serde::Serialize for SerializeMap<I>
where
    I: Iterator<Item = (&'a String, V)>,
    V: serde::Serialize,
{
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.take() {
            Some(pairs) => serializer.collect_map(pairs),
            None => serializer.collect_map(std::iter::empty::<(&String, V)>()),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn at(micros: i64) -> Timestamp {
        Timestamp::from_micros(micros)
    }

    fn patch(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn patch_leaves_unsent_keys_and_null_deletes() {
        let mut traits = TraitSet::new();
        traits.apply_patch(&patch(json!({ "plan": "pro", "seats": 3 })), at(10));
        traits.apply_patch(&patch(json!({ "seats": null })), at(20));
        assert_eq!(traits.live_values(), patch(json!({ "plan": "pro" })));
        assert_eq!(traits.get("seats").unwrap().value, None);
        assert_eq!(traits.get("seats").unwrap().updated_at, at(20));
    }

    #[test]
    fn older_write_does_not_change_a_newer_trait() {
        let mut traits = TraitSet::new();
        traits.apply_patch(&patch(json!({ "plan": "enterprise" })), at(20));
        let changes = traits.apply_patch(&patch(json!({ "plan": "starter", "role": "admin" })), at(10));
        assert_eq!(changes.len(), 1);
        assert_eq!((changes[0].key.as_str(), &changes[0].old_value), ("role", &None));
        assert_eq!(changes[0].new_value, Some(json!("admin")));
        assert_eq!(traits.live_values(), patch(json!({ "plan": "enterprise", "role": "admin" })));
    }

    #[test]
    fn tombstone_blocks_resurrection_by_an_older_write() {
        let mut traits = TraitSet::new();
        traits.apply_patch(&patch(json!({ "plan": "pro" })), at(10));
        traits.apply_patch(&patch(json!({ "plan": null })), at(30));
        traits.apply_patch(&patch(json!({ "plan": "starter" })), at(20));
        assert!(traits.live_values().is_empty());
        traits.apply_patch(&patch(json!({ "plan": "team" })), at(40));
        assert_eq!(traits.live_values(), patch(json!({ "plan": "team" })));
    }

    #[test]
    fn changes_report_old_and_new_values_but_not_rewrites_of_the_same_value() {
        let mut traits = TraitSet::new();
        traits.apply_patch(&patch(json!({ "plan": "free" })), at(1));
        assert!(traits.apply_patch(&patch(json!({ "plan": "free" })), at(2)).is_empty());
        assert_eq!(traits.get("plan").unwrap().updated_at, at(2), "the timestamp still moves");
        let changes = traits.apply_patch(&patch(json!({ "plan": "pro" })), at(3));
        assert_eq!(
            changes,
            vec![TraitChange {
                key: "plan".into(),
                old_value: Some(json!("free")),
                new_value: Some(json!("pro")),
                updated_at: at(3)
            }]
        );
        let deleted = traits.apply_patch(&patch(json!({ "plan": null })), at(4));
        assert_eq!((deleted[0].old_value.clone(), deleted[0].new_value.clone()), (Some(json!("pro")), None));
        assert!(traits.apply_patch(&patch(json!({ "never_set": null })), at(5)).is_empty());
    }

    #[test]
    fn nested_object_replaces_the_whole_value() {
        let mut traits = TraitSet::new();
        traits.apply_patch(&patch(json!({ "address": { "city": "Paris", "zip": "75001" } })), at(1));
        traits.apply_patch(&patch(json!({ "address": { "city": "Lyon" } })), at(2));
        assert_eq!(traits.live_values(), patch(json!({ "address": { "city": "Lyon" } })));
    }

    #[test]
    fn numbers_keep_their_exact_type() {
        let mut traits = TraitSet::new();
        let sent: Map<String, Value> =
            serde_json::from_str(r#"{"int":1,"float":1.5,"whole_float":2.0,"big":9007199254740993}"#).unwrap();
        traits.apply_patch(&sent, at(1));
        assert_eq!(
            serde_json::to_string(&traits.live_values()).unwrap(),
            r#"{"big":9007199254740993,"float":1.5,"int":1,"whole_float":2.0}"#
        );
    }

    #[test]
    fn set_once_only_fills_keys_without_a_live_value() {
        let mut traits = TraitSet::new();
        traits.apply_patch(&patch(json!({ "first_seen": "a" })), at(5));
        let changes = traits.apply_patch_if_absent(&patch(json!({ "first_seen": "b", "source": "ad" })), at(9));
        assert_eq!(changes.iter().map(|change| change.key.as_str()).collect::<Vec<_>>(), vec!["source"]);
        assert_eq!(traits.get("first_seen").unwrap().value, Some(json!("a")));
    }

    #[test]
    fn stored_form_round_trips_including_tombstones() {
        let mut traits = TraitSet::new();
        traits.apply_patch(&patch(json!({ "a": 1, "b": "x" })), at(1));
        traits.apply_patch(&patch(json!({ "b": null })), at(2));
        let rebuilt = TraitSet::from_stored(traits.live_values(), traits.timestamps());
        assert_eq!(rebuilt, traits);
        assert_eq!(traits.live_values_json(), r#"{"a":1}"#);
        assert_eq!(traits.timestamps_json(), r#"{"a":1,"b":2}"#);
    }

    /// One write: a key from a small set (so writes collide), a value or a delete, and a timestamp
    /// from a small range (so ties happen and the tie-break is exercised).
    fn update_strategy() -> impl Strategy<Value = (String, Option<Value>, i64)> {
        let key = prop::sample::select(vec!["plan", "email", "age", "address"]).prop_map(str::to_owned);
        let value = prop_oneof![
            Just(None),
            any::<bool>().prop_map(|flag| Some(json!(flag))),
            (-3i64..3).prop_map(|number| Some(json!(number))),
            prop::sample::select(vec![0.5f64, 1.5]).prop_map(|number| Some(json!(number))),
            prop::sample::select(vec!["pro", "free"]).prop_map(|text| Some(json!(text))),
            Just(Some(json!({ "city": "Paris" }))),
        ];
        (key, value, 0i64..4)
    }

    fn apply_all(updates: &[(String, Option<Value>, i64)]) -> TraitSet {
        let mut traits = TraitSet::new();
        for (key, value, micros) in updates {
            traits.apply(key, value.clone(), at(*micros));
        }
        traits
    }

    proptest! {
        #[test]
        fn any_order_of_the_same_updates_gives_the_same_profile(
            (updates, shuffled) in prop::collection::vec(update_strategy(), 0..24)
                .prop_flat_map(|updates| {
                    let shuffled = Just(updates.clone()).prop_shuffle();
                    (Just(updates), shuffled)
                })
        ) {
            prop_assert_eq!(apply_all(&updates), apply_all(&shuffled));
        }

        #[test]
        fn replaying_a_batch_changes_nothing(updates in prop::collection::vec(update_strategy(), 0..24)) {
            let once = apply_all(&updates);
            let mut twice = updates.clone();
            twice.extend(updates.iter().cloned());
            prop_assert_eq!(once, apply_all(&twice));
        }

        #[test]
        fn merging_split_profiles_equals_applying_everything_to_one(
            updates in prop::collection::vec(update_strategy(), 0..24),
            split in 0usize..24,
        ) {
            let split = split.min(updates.len());
            let (left, right) = updates.split_at(split);
            let mut left_into_right = apply_all(right);
            left_into_right.merge(&apply_all(left));
            let mut right_into_left = apply_all(left);
            right_into_left.merge(&apply_all(right));
            let everything = apply_all(&updates);
            prop_assert_eq!(&left_into_right, &everything);
            prop_assert_eq!(&right_into_left, &everything);
        }
    }
}
