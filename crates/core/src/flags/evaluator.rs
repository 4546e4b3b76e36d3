//! Flag evaluation, compiled once per configuration change.
//!
//! [`Evaluator::compile`] turns an environment's segments, features and identity overrides into
//! an immutable structure: regexes compiled, `IN` lists hashed, each condition value already cast
//! to every type a trait may have, overrides sorted by precedence. Evaluating then allocates only
//! the identity key and the answer, takes no locks, and parses nothing.
//!
//! The results are those of Flagsmith's reference engine (`flagsmith-flag-engine`) for the same
//! context: identity override > segment override (lowest priority, then earliest segment) >
//! default; multivariate buckets by md5 of `"{feature id},{environment key}_{identifier}"`;
//! percentage splits by md5 of `"{segment id},{value}"`; condition values cast to the trait's
//! type, numeric strings read as numbers, `REGEX` anchored at the start.

use std::collections::{HashMap, HashSet};

use md5::{Digest, Md5};
use serde_json::{Map, Value};
use smallvec::SmallVec;

use super::definition::{
    CONTEXT_PATHS, FeatureDefinition, IdentityOverride, Operator, RuleType, SEMVER_SUFFIX, SegmentDefinition,
    SegmentRule, TRAIT_PATH_PREFIX, compile_regex, parse_modulo, parse_semver,
};
use super::python::{ContextValue, python_float, python_int};

/// A segment as stored: its id is its hashing key.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentConfig {
    pub id: i64,
    pub definition: SegmentDefinition,
}

/// A feature as stored: its id is its hashing key for multivariate buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureConfig {
    pub id: i64,
    pub definition: FeatureDefinition,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IdentityOverrideConfig {
    pub profile_id: String,
    pub feature_id: i64,
    pub state: IdentityOverride,
}

/// Everything flag evaluation in one environment depends on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FlagConfig {
    /// The key identity keys are made of (`"{key}_{identifier}"`), fixed for the environment's life.
    pub environment_key: String,
    pub environment_name: String,
    /// In id order: segment order decides ties between equal override priorities.
    pub segments: Vec<SegmentConfig>,
    pub features: Vec<FeatureConfig>,
    pub identity_overrides: Vec<IdentityOverrideConfig>,
}

impl FlagConfig {
    /// A feature that overrides the segment, if any (a segment in use cannot be deleted).
    pub fn feature_overriding(&self, segment_id: i64) -> Option<&FeatureConfig> {
        self.features.iter().find(|feature| {
            feature
                .definition
                .segment_overrides
                .iter()
                .any(|segment_override| segment_override.segment_id == segment_id)
        })
    }
}

/// The identity flags are evaluated for.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// Flagsmith's identifier: the user id (or the anonymous id of an anonymous visitor).
    pub identifier: &'a str,
    /// For identity overrides, which follow the profile whatever its identifiers become.
    pub profile_id: Option<&'a str>,
    pub traits: &'a Map<String, Value>,
    /// Traits for this evaluation only, read before the stored ones.
    pub transient_traits: Option<&'a Map<String, Value>>,
}

impl<'a> Identity<'a> {
    fn trait_value(&self, key: &str) -> Option<&'a Value> {
        if let Some(value) = self.transient_traits.and_then(|transient| transient.get(key)) {
            return Some(value);
        }
        self.traits.get(key)
    }
}

/// Why a flag has its state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason<'e> {
    IdentityOverride,
    TargetingMatch {
        segment: &'e str,
    },
    Split {
        weight: f64,
    },
    /// The default of a feature some segment overrides (none matched).
    Default,
    /// The default of a feature no segment overrides.
    Static,
}

/// One flag of an evaluation: two references into the evaluator (the feature, and which of its
/// states, all prepared when compiling, is served), so an answer of 50 flags is 800 bytes.
#[derive(Debug, Clone, Copy)]
pub struct FlagState<'e> {
    feature: &'e CompiledFeature,
    served: &'e ServedState,
}

impl<'e> FlagState<'e> {
    pub fn feature_id(&self) -> i64 {
        self.feature.id
    }

    pub fn name(&self) -> &'e str {
        &self.feature.name
    }

    pub fn enabled(&self) -> bool {
        self.served.enabled
    }

    pub fn value(&self) -> &'e Value {
        &self.served.value
    }

    /// The multivariate option served (`"control"` when the identity fell in the remainder);
    /// `None` for features without options, overrides, and evaluations without an identity.
    pub fn variant(&self) -> Option<&'e str> {
        self.served.variant.as_deref()
    }

    pub fn reason(&self) -> Reason<'e> {
        match &self.served.reason {
            ServedReason::IdentityOverride => Reason::IdentityOverride,
            ServedReason::TargetingMatch { segment } => Reason::TargetingMatch { segment },
            ServedReason::Split { weight } => Reason::Split { weight: *weight },
            ServedReason::Default => Reason::Default,
            ServedReason::Static => Reason::Static,
        }
    }
}

impl PartialEq for FlagState<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.feature_id() == other.feature_id()
            && self.enabled() == other.enabled()
            && self.value() == other.value()
            && self.variant() == other.variant()
            && self.reason() == other.reason()
    }
}

/// A state a feature can be served in, built when compiling.
#[derive(Debug)]
struct ServedState {
    enabled: bool,
    value: Value,
    variant: Option<String>,
    reason: ServedReason,
}

#[derive(Debug)]
enum ServedReason {
    IdentityOverride,
    TargetingMatch { segment: String },
    Split { weight: f64 },
    Default,
    Static,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation<'e> {
    /// In feature order.
    pub flags: Vec<FlagState<'e>>,
    /// The segments the identity is in, as `(id, name)`, in segment order.
    pub segments: Vec<(i64, &'e str)>,
}

/// An environment's flags, ready to evaluate. Immutable; shared by all requests.
#[derive(Debug)]
pub struct Evaluator {
    environment_key: String,
    environment_name: String,
    segments: Vec<CompiledSegment>,
    features: Vec<CompiledFeature>,
    /// The distinct trait keys conditions read: each is looked up and mapped once per evaluation,
    /// however many conditions read it.
    trait_slots: Vec<String>,
    /// `(key, slot)` sorted by key: an identity's traits (a sorted map) are matched to the slots
    /// in one merge pass instead of one map search per slot.
    sorted_trait_slots: Vec<(String, usize)>,
    /// Every distinct condition (see `ConditionTable`).
    conditions: Vec<CompiledCondition>,
    /// Profile id → (feature index, state served).
    identity_overrides: HashMap<String, Vec<(usize, ServedState)>>,
}

#[derive(Debug)]
struct CompiledSegment {
    id: i64,
    name: String,
    /// `"{id},"`: how a percentage split's hashed text starts.
    hash_prefix: String,
    rules: Vec<CompiledRule>,
}

#[derive(Debug)]
struct CompiledRule {
    rule_type: RuleType,
    /// Indices into `Evaluator::conditions`, cheapest first.
    conditions: Vec<usize>,
    rules: Vec<CompiledRule>,
}

/// The distinct conditions of all segments: one that several segments share (the same property,
/// operator and value) is evaluated once per evaluation. A percentage split hashes its segment's
/// id, so splits are shared only within a segment.
#[derive(Debug, Default)]
struct ConditionTable {
    conditions: Vec<CompiledCondition>,
    index: HashMap<String, usize>,
}

#[derive(Debug)]
struct CompiledCondition {
    source: Source,
    matcher: Matcher,
}

/// Where a condition's value comes from.
#[derive(Debug)]
enum Source {
    /// A trait, by its slot in `Evaluator::trait_slots`.
    Trait(usize),
    /// A `$.` path: a trait literally named so wins, as in the reference.
    Path { literal: String, path: ContextPath },
    /// `PERCENTAGE_SPLIT` with no property: the identity key, unmapped.
    IdentityKey,
}

#[derive(Debug)]
enum ContextPath {
    Identifier,
    Key,
    EnvironmentName,
    EnvironmentKey,
    /// `$.identity.traits.<name>`: only scalar values are seen through a path.
    Trait(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Comparison {
    Equal,
    NotEqual,
    GreaterThan,
    GreaterThanInclusive,
    LessThan,
    LessThanInclusive,
    Contains,
}

impl Comparison {
    fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::{Equal, Greater, Less};
        match self {
            Comparison::Equal => ordering == Equal,
            Comparison::NotEqual => ordering != Equal,
            Comparison::GreaterThan => ordering == Greater,
            Comparison::GreaterThanInclusive => ordering != Less,
            Comparison::LessThan => ordering == Less,
            Comparison::LessThanInclusive => ordering != Greater,
            Comparison::Contains => false,
        }
    }
}

#[derive(Debug)]
enum Matcher {
    /// The comparison operators: the condition value cast once to each type a trait may have
    /// (`None` where the cast fails, which makes the condition false).
    Typed {
        comparison: Comparison,
        text: String,
        integer: Option<i128>,
        float: Option<f64>,
        boolean: bool,
        /// Set for a `:semver` value: compared as versions against text traits.
        version: Option<semver::Version>,
    },
    NotContains(String),
    Regex(Box<CompiledRegex>),
    In(InSet),
    Modulo {
        divisor: f64,
        remainder: f64,
    },
    IsSet,
    IsNotSet,
    PercentageSplit {
        threshold: f64,
    },
}

/// Largest dense DFA built for one `REGEX` condition; larger ones use the `regex` crate.
const MAX_DFA_BYTES: usize = 1 << 20;

/// A `REGEX` condition's pattern (anchored at the start, as the reference's `re.match`).
#[derive(Debug)]
struct CompiledRegex {
    /// A fully built DFA: searching it needs no mutable scratch space, so evaluating takes no
    /// lock (the `regex` crate keeps its search caches in a pool that threads share).
    dense: Option<regex_automata::dfa::dense::DFA<Vec<u32>>>,
    /// For patterns a DFA cannot express (Unicode word boundaries) or whose DFA would be large.
    fallback: regex::Regex,
}

impl CompiledRegex {
    fn new(pattern: &str) -> Result<CompiledRegex, CompileError> {
        let fallback = compile_regex(pattern).map_err(CompileError)?;
        let dense = regex_automata::dfa::dense::Builder::new()
            .configure(
                regex_automata::dfa::dense::DFA::config()
                    .start_kind(regex_automata::dfa::StartKind::Anchored)
                    .dfa_size_limit(Some(MAX_DFA_BYTES))
                    .determinize_size_limit(Some(MAX_DFA_BYTES)),
            )
            .build(fallback.as_str())
            .ok();
        Ok(CompiledRegex { dense, fallback })
    }

    fn is_match(&self, text: &str) -> bool {
        use regex_automata::dfa::Automaton;
        if let Some(dense) = &self.dense {
            let input = regex_automata::Input::new(text).anchored(regex_automata::Anchored::Yes).earliest(true);
            if let Ok(found) = dense.try_search_fwd(&input) {
                return found.is_some();
            }
        }
        self.fallback.is_match(text)
    }
}

/// An `IN` list: scanned when short (cheaper than hashing the value), hashed when long.
#[derive(Debug)]
enum InSet {
    Few(Vec<String>),
    Many(HashSet<String>),
}

impl InSet {
    fn new(items: HashSet<String>) -> InSet {
        if items.len() <= 16 { InSet::Few(items.into_iter().collect()) } else { InSet::Many(items) }
    }

    fn contains(&self, text: &str) -> bool {
        match self {
            InSet::Few(items) => items.iter().any(|item| item == text),
            InSet::Many(items) => items.contains(text),
        }
    }
}

#[derive(Debug)]
struct CompiledFeature {
    id: i64,
    name: String,
    /// `"{id},"`: how a multivariate bucket's hashed text starts.
    hash_prefix: String,
    /// The default: `DEFAULT` when some segment overrides the feature, else `STATIC`.
    fallback: ServedState,
    /// The default when the identity falls in no variant's range (variant `"control"`).
    control: ServedState,
    /// (weight, state) per multivariate option, in order.
    variants: Vec<(f64, ServedState)>,
    /// (segment index, state), by precedence: priority, then segment order.
    overrides: Vec<(usize, ServedState)>,
}

/// A configuration the evaluator cannot compile; save-time validation makes this unreachable
/// for stored configurations.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CompileError(String);

impl Evaluator {
    pub fn compile(config: &FlagConfig) -> Result<Evaluator, CompileError> {
        let mut segments: Vec<CompiledSegment> = Vec::with_capacity(config.segments.len());
        let mut trait_slots = Vec::new();
        let mut table = ConditionTable::default();
        for segment in &config.segments {
            let hash_prefix = format!("{},", segment.id);
            let rules = segment
                .definition
                .rules
                .iter()
                .map(|rule| compile_rule(rule, &hash_prefix, &mut trait_slots, &mut table))
                .collect::<Result<Vec<_>, _>>()?;
            segments.push(CompiledSegment {
                id: segment.id,
                name: segment.definition.name.clone(),
                hash_prefix,
                rules,
            });
        }
        let segment_index: HashMap<i64, usize> =
            segments.iter().enumerate().map(|(index, segment)| (segment.id, index)).collect();
        let mut features = Vec::with_capacity(config.features.len());
        for feature in &config.features {
            let definition = &feature.definition;
            let mut overrides = Vec::new();
            for segment_override in &definition.segment_overrides {
                // An override of a deleted segment matches nobody.
                if let Some(index) = segment_index.get(&segment_override.segment_id) {
                    overrides.push((*index, segment_override));
                }
            }
            overrides.sort_by_key(|(index, segment_override)| (segment_override.priority, *index));
            let fallback_reason = || if overrides.is_empty() { ServedReason::Static } else { ServedReason::Default };
            let default_state = |variant: Option<&str>| ServedState {
                enabled: definition.enabled,
                value: definition.value.clone(),
                variant: variant.map(str::to_owned),
                reason: fallback_reason(),
            };
            features.push(CompiledFeature {
                id: feature.id,
                name: definition.name.clone(),
                hash_prefix: format!("{},", feature.id),
                fallback: default_state(None),
                control: default_state(Some("control")),
                variants: definition
                    .variants
                    .iter()
                    .map(|variant| {
                        let state = ServedState {
                            enabled: definition.enabled,
                            value: variant.value.clone(),
                            variant: Some(variant.key.clone()),
                            reason: ServedReason::Split { weight: variant.weight },
                        };
                        (variant.weight, state)
                    })
                    .collect(),
                overrides: overrides
                    .iter()
                    .map(|(index, segment_override)| {
                        let state = ServedState {
                            enabled: segment_override.enabled,
                            value: segment_override.value.clone(),
                            variant: None,
                            reason: ServedReason::TargetingMatch { segment: segments[*index].name.clone() },
                        };
                        (*index, state)
                    })
                    .collect(),
            });
        }
        let feature_index: HashMap<i64, usize> =
            features.iter().enumerate().map(|(index, feature)| (feature.id, index)).collect();
        let mut identity_overrides: HashMap<String, Vec<(usize, ServedState)>> = HashMap::new();
        for identity_override in &config.identity_overrides {
            if let Some(index) = feature_index.get(&identity_override.feature_id) {
                let state = ServedState {
                    enabled: identity_override.state.enabled,
                    value: identity_override.state.value.clone(),
                    variant: None,
                    reason: ServedReason::IdentityOverride,
                };
                identity_overrides.entry(identity_override.profile_id.clone()).or_default().push((*index, state));
            }
        }
        Ok(Evaluator {
            environment_key: config.environment_key.clone(),
            environment_name: config.environment_name.clone(),
            segments,
            features,
            sorted_trait_slots: {
                let mut sorted: Vec<(String, usize)> =
                    trait_slots.iter().enumerate().map(|(slot, key)| (key.clone(), slot)).collect();
                sorted.sort();
                sorted
            },
            trait_slots,
            conditions: table.conditions,
            identity_overrides,
        })
    }

    /// Every flag, and the segments the identity is in. Without an identity: the defaults, with
    /// overrides of segments that match on the environment alone.
    pub fn evaluate(&self, identity: Option<&Identity<'_>>) -> Evaluation<'_> {
        let identity_key = identity.map(|identity| identity_key(&self.environment_key, identity.identifier));
        Scope::with(self, identity, identity_key.as_deref(), |scope| {
            let mut matched: SmallVec<[bool; INLINE_SEGMENTS]> = SmallVec::from_elem(false, self.segments.len());
            let mut segments = Vec::with_capacity(self.segments.len());
            for (in_segment, segment) in matched.iter_mut().zip(&self.segments) {
                *in_segment = scope.in_segment(segment);
                if *in_segment {
                    segments.push((segment.id, segment.name.as_str()));
                }
            }
            let matched_segments: &[bool] = &matched;
            let overridden = identity
                .and_then(|identity| identity.profile_id)
                .and_then(|profile_id| self.identity_overrides.get(profile_id));
            let flags = self
                .features
                .iter()
                .enumerate()
                .map(|(index, feature)| {
                    let served = overridden
                        .and_then(|overrides| overrides.iter().find(|(feature_index, _)| *feature_index == index))
                        .or_else(|| {
                            feature.overrides.iter().find(|(segment_index, _)| matched_segments[*segment_index])
                        })
                        .map(|(_, state)| state)
                        .unwrap_or_else(|| scope.default_state(feature));
                    FlagState { feature, served }
                })
                .collect();
            Evaluation { flags, segments }
        })
    }

    /// The ids of the segments an identity is in (for membership tracking).
    pub fn segment_ids_of(&self, identity: &Identity<'_>) -> Vec<i64> {
        let identity_key = identity_key(&self.environment_key, identity.identifier);
        Scope::with(self, Some(identity), Some(&identity_key), |scope| {
            self.segments.iter().filter(|segment| scope.in_segment(segment)).map(|segment| segment.id).collect()
        })
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn feature_count(&self) -> usize {
        self.features.len()
    }
}

/// Sizes up to which an evaluation's scratch space stays on the stack: an evaluation allocates
/// nothing but its answer in environments of this size.
const INLINE_SEGMENTS: usize = 64;
const INLINE_TRAIT_SLOTS: usize = 16;
const INLINE_CONDITIONS: usize = 128;

/// `"{environment key}_{identifier}"`: what identity-keyed hashes and `$.identity.key` read.
fn identity_key(environment_key: &str, identifier: &str) -> String {
    [environment_key, "_", identifier].concat()
}

impl Evaluator {
    /// Maps the traits the conditions read into their slots, walking the traits (a sorted map)
    /// and the sorted slot keys side by side.
    fn fill_trait_slots<'i>(&self, traits: &'i Map<String, Value>, slots: &mut [Option<ContextValue<'i>>]) {
        let mut wanted = self.sorted_trait_slots.iter().peekable();
        let mut previous_key: Option<&str> = None;
        for (key, value) in traits {
            // A map in insertion order (serde_json's `preserve_order`) cannot be merged.
            if previous_key.is_some_and(|previous| previous > key.as_str()) {
                for (slot_key, slot) in &self.sorted_trait_slots {
                    if let Some(value) = traits.get(slot_key) {
                        slots[*slot] = ContextValue::from_json(value);
                    }
                }
                return;
            }
            previous_key = Some(key);
            while let Some((slot_key, slot)) = wanted.peek() {
                match short_key_order(slot_key, key) {
                    std::cmp::Ordering::Less => {
                        wanted.next();
                    }
                    std::cmp::Ordering::Equal => {
                        slots[*slot] = ContextValue::from_json(value);
                        wanted.next();
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            if wanted.peek().is_none() {
                return;
            }
        }
    }
}

/// Byte order of two trait keys, the order of the map they come from. Trait keys are short and
/// usually differ in their first bytes: a plain loop beats a call to `memcmp`.
#[inline]
fn short_key_order(left: &str, right: &str) -> std::cmp::Ordering {
    for (left_byte, right_byte) in left.bytes().zip(right.bytes()) {
        if left_byte != right_byte {
            return left_byte.cmp(&right_byte);
        }
    }
    left.len().cmp(&right.len())
}

/// One evaluation's inputs.
struct Scope<'s, 'i> {
    evaluator: &'s Evaluator,
    identity: Option<&'s Identity<'i>>,
    identity_key: Option<&'s str>,
    /// The mapped value of each trait slot.
    traits: &'s [Option<ContextValue<'i>>],
    /// Each distinct condition's verdict once known (0 unknown, 1 false, 2 true).
    verdicts: &'s [std::cell::Cell<u8>],
}

impl<'s, 'i> Scope<'s, 'i> {
    /// Runs `work` with a scope whose scratch space lives in this stack frame (the slices it
    /// reads are plain slices: no inline-or-heap branch on each access, nothing moved).
    fn with<R>(
        evaluator: &'s Evaluator,
        identity: Option<&'s Identity<'i>>,
        identity_key: Option<&'s str>,
        work: impl FnOnce(&Scope<'_, 'i>) -> R,
    ) -> R {
        let mut traits: SmallVec<[Option<ContextValue<'i>>; INLINE_TRAIT_SLOTS]> = SmallVec::new();
        if let Some(identity) = identity {
            traits.resize(evaluator.trait_slots.len(), None);
            evaluator.fill_trait_slots(identity.traits, &mut traits);
            // Transient traits are read before the stored ones (a transient null hides one).
            if let Some(transient) = identity.transient_traits {
                evaluator.fill_trait_slots(transient, &mut traits);
            }
        }
        let verdicts: SmallVec<[std::cell::Cell<u8>; INLINE_CONDITIONS]> =
            SmallVec::from_elem(std::cell::Cell::new(0), evaluator.conditions.len());
        work(&Scope { evaluator, identity, identity_key, traits: &traits, verdicts: &verdicts })
    }

    fn in_segment(&self, segment: &CompiledSegment) -> bool {
        !segment.rules.is_empty() && segment.rules.iter().all(|rule| self.rule_matches(rule, &segment.hash_prefix))
    }

    fn rule_matches(&self, rule: &CompiledRule, segment_hash_prefix: &str) -> bool {
        let conditions_match = rule.conditions.is_empty()
            || combine(rule.rule_type, rule.conditions.iter().map(|index| self.verdict(*index, segment_hash_prefix)));
        conditions_match
            && (rule.rules.is_empty()
                || combine(
                    rule.rule_type,
                    rule.rules.iter().map(|sub_rule| self.rule_matches(sub_rule, segment_hash_prefix)),
                ))
    }

    /// The value of a source other than a trait slot (those are read in place).
    fn computed_value_of(&self, source: &Source) -> Option<ContextValue<'_>> {
        match source {
            Source::Trait(slot) => self.traits.get(*slot).cloned().flatten(),
            Source::IdentityKey => self.identity_key.map(|key| ContextValue::Text(std::borrow::Cow::Borrowed(key))),
            Source::Path { literal, path } => {
                if let Some(value) = self.identity.and_then(|identity| identity.trait_value(literal))
                    && !value.is_null()
                {
                    return ContextValue::from_json(value);
                }
                match path {
                    ContextPath::Identifier => {
                        self.identity.map(|identity| ContextValue::from_text(identity.identifier))
                    }
                    ContextPath::Key => self.identity_key.map(ContextValue::from_text),
                    ContextPath::EnvironmentName => Some(ContextValue::from_text(&self.evaluator.environment_name)),
                    ContextPath::EnvironmentKey => Some(ContextValue::from_text(&self.evaluator.environment_key)),
                    ContextPath::Trait(key) => match self.identity?.trait_value(key)? {
                        Value::Object(_) | Value::Array(_) => None,
                        scalar => ContextValue::from_json(scalar),
                    },
                }
            }
        }
    }

    /// A condition's verdict, computed the first time any segment asks for it.
    #[inline]
    fn verdict(&self, index: usize, segment_hash_prefix: &str) -> bool {
        match self.verdicts[index].get() {
            1 => false,
            2 => true,
            _ => {
                let matched = self.condition_matches(&self.evaluator.conditions[index], segment_hash_prefix);
                self.verdicts[index].set(1 + u8::from(matched));
                matched
            }
        }
    }

    #[inline(never)]
    fn condition_matches(&self, condition: &CompiledCondition, segment_hash_prefix: &str) -> bool {
        let computed;
        let value = match &condition.source {
            Source::Trait(slot) => self.traits.get(*slot).and_then(Option::as_ref),
            other => {
                computed = self.computed_value_of(other);
                computed.as_ref()
            }
        };
        match &condition.matcher {
            Matcher::IsSet => value.is_some(),
            Matcher::IsNotSet => value.is_none(),
            Matcher::In(items) => match value {
                Some(ContextValue::Text(text)) => items.contains(text.as_ref()),
                Some(ContextValue::Integer(integer)) => items.contains(&integer.to_string()),
                _ => false,
            },
            Matcher::PercentageSplit { threshold } => match value {
                Some(value) => percentage_after(segment_hash_prefix, &value.python_str()) <= *threshold,
                None => false,
            },
            matcher => value.is_some_and(|value| matches_value(matcher, value)),
        }
    }

    fn default_state<'e>(&self, feature: &'e CompiledFeature) -> &'e ServedState {
        let Some(identity_key) = self.identity_key else { return &feature.fallback };
        if feature.variants.is_empty() {
            return &feature.fallback;
        }
        let percentage = percentage_after(&feature.hash_prefix, identity_key);
        let mut start = 0.0;
        for (weight, state) in &feature.variants {
            let limit = weight + start;
            if start <= percentage && percentage < limit {
                return state;
            }
            start = limit;
        }
        &feature.control
    }
}

fn combine(rule_type: RuleType, mut results: impl Iterator<Item = bool>) -> bool {
    match rule_type {
        RuleType::All => results.all(|matched| matched),
        RuleType::Any => results.any(|matched| matched),
        RuleType::None => !results.any(|matched| matched),
    }
}

fn matches_value(matcher: &Matcher, value: &ContextValue<'_>) -> bool {
    match matcher {
        Matcher::Typed { comparison, text, integer, float, boolean, version } => match value {
            ContextValue::Text(context_text) => match version {
                Some(target) => match semver::Version::parse(context_text) {
                    Ok(context_version) => comparison.holds(compare_versions(&context_version, target)),
                    Err(_) => false,
                },
                None if *comparison == Comparison::Contains => context_text.contains(text.as_str()),
                None => comparison.holds(context_text.as_ref().cmp(text.as_str())),
            },
            ContextValue::Integer(context_integer) => match integer {
                Some(target) => comparison.holds(context_integer.cmp(target)),
                None => false,
            },
            ContextValue::Float(context_float) => match float {
                // NaN: only `!=` holds, as in Python.
                Some(target) => match context_float.partial_cmp(target) {
                    Some(ordering) => comparison.holds(ordering),
                    None => *comparison == Comparison::NotEqual,
                },
                None => false,
            },
            ContextValue::Boolean(context_boolean) => comparison.holds(context_boolean.cmp(boolean)),
        },
        Matcher::NotContains(text) => match value {
            ContextValue::Text(context_text) => !context_text.contains(text.as_str()),
            _ => false,
        },
        Matcher::Regex(regex) => regex.is_match(&value.python_str()),
        Matcher::Modulo { divisor, remainder } => {
            let dividend = match value {
                ContextValue::Integer(integer) => *integer as f64,
                ContextValue::Float(float) => *float,
                ContextValue::Boolean(flag) => f64::from(u8::from(*flag)),
                ContextValue::Text(_) => return false,
            };
            python_modulo(dividend, *divisor) == *remainder
        }
        Matcher::IsSet | Matcher::IsNotSet | Matcher::In(_) | Matcher::PercentageSplit { .. } => false,
    }
}

/// `Contains` does not order: treat it as never holding for numbers (a TypeError in Python).
impl Comparison {
    fn from_operator(operator: Operator) -> Option<Comparison> {
        Some(match operator {
            Operator::Equal => Comparison::Equal,
            Operator::NotEqual => Comparison::NotEqual,
            Operator::GreaterThan => Comparison::GreaterThan,
            Operator::GreaterThanInclusive => Comparison::GreaterThanInclusive,
            Operator::LessThan => Comparison::LessThan,
            Operator::LessThanInclusive => Comparison::LessThanInclusive,
            Operator::Contains => Comparison::Contains,
            _ => return None,
        })
    }
}

/// Python's float `%`: the result takes the divisor's sign.
fn python_modulo(dividend: f64, divisor: f64) -> f64 {
    let remainder = dividend % divisor;
    if remainder != 0.0 && ((divisor < 0.0) != (remainder < 0.0)) { remainder + divisor } else { remainder }
}

/// Semantic-version precedence: build metadata ignored, a pre-release below its release.
fn compare_versions(left: &semver::Version, right: &semver::Version) -> std::cmp::Ordering {
    (left.major, left.minor, left.patch).cmp(&(right.major, right.minor, right.patch)).then_with(|| {
        match (left.pre.is_empty(), right.pre.is_empty()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => left.pre.cmp(&right.pre),
        }
    })
}

/// `value % 9999` in 64-bit steps (128-bit division is a slow library call).
fn modulo_9999(value: u128) -> u64 {
    const DIVISOR: u64 = 9999;
    const HIGH_WEIGHT: u64 = ((u64::MAX % DIVISOR) + 1) % DIVISOR; // 2^64 mod 9999
    let (high, low) = ((value >> 64) as u64, value as u64);
    ((high % DIVISOR) * HIGH_WEIGHT + low % DIVISOR) % DIVISOR
}

/// [`hashed_percentage`] of `[id, value]`, given `"{id},"`: the hash evaluation runs ten times or
/// more per identity, so its message is written once, already padded, straight into MD5 blocks
/// on the stack and handed to the compression function (no hasher state, no buffering).
fn percentage_after(prefix_with_comma: &str, value: &str) -> f64 {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        const BLOCK: usize = 64;
        const MAX_BLOCKS: usize = 4;
        let length = prefix_with_comma.len() + value.len();
        // The message, a 0x80 byte, zeros, then its length in bits (8 bytes): MD5's padding.
        let block_count = (length + 8) / BLOCK + 1;
        if block_count <= MAX_BLOCKS {
            let mut blocks = [[0u8; BLOCK]; MAX_BLOCKS];
            let bytes = blocks.as_flattened_mut();
            bytes[..prefix_with_comma.len()].copy_from_slice(prefix_with_comma.as_bytes());
            bytes[prefix_with_comma.len()..length].copy_from_slice(value.as_bytes());
            bytes[length] = 0x80;
            let end = block_count * BLOCK;
            bytes[end - 8..end].copy_from_slice(&((length as u64) * 8).to_le_bytes());
            let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
            md5_asm::compress(&mut state, &blocks[..block_count]);
            let mut digest = [0u8; 16];
            for (chunk, word) in digest.chunks_exact_mut(4).zip(state) {
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            let value = (modulo_9999(u128::from_be_bytes(digest)) as f64 / 9998.0) * 100.0;
            if value != 100.0 {
                return value;
            }
        }
    }
    let id = prefix_with_comma.strip_suffix(',').unwrap_or(prefix_with_comma);
    hashed_percentage(&[id, value])
}

/// A number in [0, 100) from the md5 of the comma-joined ids; a result of exactly 100 hashes
/// the ids repeated once more, as the reference does.
pub fn hashed_percentage(ids: &[&str]) -> f64 {
    let mut iterations = 1;
    let mut buffer = [0u8; 256];
    loop {
        let mut length = 0;
        let mut fits = true;
        for iteration in 0..iterations {
            for (index, id) in ids.iter().enumerate() {
                let separator = usize::from(iteration > 0 || index > 0);
                if length + separator + id.len() > buffer.len() {
                    fits = false;
                    break;
                }
                if separator == 1 {
                    buffer[length] = b',';
                }
                buffer[length + separator..length + separator + id.len()].copy_from_slice(id.as_bytes());
                length += separator + id.len();
            }
        }
        // Long ids (rare) are hashed from the heap; the usual case stays on the stack.
        let digest: [u8; 16] = if fits {
            Md5::digest(&buffer[..length]).into()
        } else {
            let joined = vec![ids.join(","); iterations].join(",");
            Md5::digest(joined.as_bytes()).into()
        };
        let bucket = modulo_9999(u128::from_be_bytes(digest));
        let value = (bucket as f64 / 9998.0) * 100.0;
        if value != 100.0 {
            return value;
        }
        iterations += 1;
    }
}

fn compile_rule(
    rule: &SegmentRule,
    segment_hash_prefix: &str,
    trait_slots: &mut Vec<String>,
    table: &mut ConditionTable,
) -> Result<CompiledRule, CompileError> {
    let mut conditions = Vec::with_capacity(rule.conditions.len());
    for condition in &rule.conditions {
        let split = condition.operator == Operator::PercentageSplit;
        let key = format!(
            "{}\u{1}{:?}\u{1}{}\u{1}{}",
            condition.property,
            condition.operator,
            condition.value,
            if split { segment_hash_prefix } else { "" }
        );
        let index = match table.index.get(&key) {
            Some(index) => *index,
            None => {
                table.conditions.push(CompiledCondition {
                    source: compile_source(&condition.property, condition.operator, trait_slots),
                    matcher: compile_matcher(condition.operator, &condition.value)?,
                });
                table.index.insert(key, table.conditions.len() - 1);
                table.conditions.len() - 1
            }
        };
        conditions.push(index);
    }
    // Conditions are pure, so any order gives the same answer; cheap ones first lets ALL, ANY
    // and NONE stop before a regex or a hash is needed.
    conditions.sort_by_key(|index| table.conditions[*index].matcher.cost());
    let rules = rule
        .rules
        .iter()
        .map(|sub_rule| compile_rule(sub_rule, segment_hash_prefix, trait_slots, table))
        .collect::<Result<_, _>>()?;
    Ok(CompiledRule { rule_type: rule.rule_type, conditions, rules })
}

impl Matcher {
    /// Relative cost of evaluating the matcher, for ordering a rule's conditions.
    fn cost(&self) -> u8 {
        match self {
            Matcher::IsSet | Matcher::IsNotSet => 0,
            Matcher::Typed { version: None, .. } | Matcher::NotContains(_) | Matcher::Modulo { .. } => 1,
            Matcher::In(_) => 2,
            Matcher::Typed { version: Some(_), .. } => 3,
            Matcher::Regex(_) => 4,
            Matcher::PercentageSplit { .. } => 5,
        }
    }
}

fn trait_slot(key: &str, trait_slots: &mut Vec<String>) -> Source {
    let slot = match trait_slots.iter().position(|known| known == key) {
        Some(slot) => slot,
        None => {
            trait_slots.push(key.to_owned());
            trait_slots.len() - 1
        }
    };
    Source::Trait(slot)
}

fn compile_source(property: &str, operator: Operator, trait_slots: &mut Vec<String>) -> Source {
    if property.is_empty() && operator == Operator::PercentageSplit {
        return Source::IdentityKey;
    }
    if !property.starts_with("$.") {
        return trait_slot(property, trait_slots);
    }
    let path = match property {
        _ if property == CONTEXT_PATHS[0] => ContextPath::Identifier,
        _ if property == CONTEXT_PATHS[1] => ContextPath::Key,
        _ if property == CONTEXT_PATHS[2] => ContextPath::EnvironmentName,
        _ if property == CONTEXT_PATHS[3] => ContextPath::EnvironmentKey,
        _ => match property.strip_prefix(TRAIT_PATH_PREFIX) {
            Some(name) if super::definition::is_simple_name(name) => ContextPath::Trait(name.to_owned()),
            // Not a path the reference can read either: a trait of that literal name.
            _ => return trait_slot(property, trait_slots),
        },
    };
    Source::Path { literal: property.to_owned(), path }
}

fn compile_matcher(operator: Operator, value: &Value) -> Result<Matcher, CompileError> {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    Ok(match operator {
        Operator::IsSet => Matcher::IsSet,
        Operator::IsNotSet => Matcher::IsNotSet,
        Operator::In => Matcher::In(InSet::new(in_items(value))),
        Operator::NotContains => Matcher::NotContains(text),
        Operator::Regex => Matcher::Regex(Box::new(CompiledRegex::new(&text)?)),
        Operator::Modulo => {
            let (divisor, remainder) = parse_modulo(&text).map_err(CompileError)?;
            Matcher::Modulo { divisor, remainder }
        }
        Operator::PercentageSplit => Matcher::PercentageSplit {
            threshold: python_float(&text).ok_or_else(|| CompileError(format!("`{text}` is not a percentage")))?,
        },
        comparison => {
            let version = match text.strip_suffix(SEMVER_SUFFIX) {
                Some(version) => Some(parse_semver(version).map_err(CompileError)?),
                None => None,
            };
            Matcher::Typed {
                comparison: Comparison::from_operator(comparison)
                    .ok_or_else(|| CompileError(format!("{comparison:?} is not a comparison")))?,
                integer: python_int(&text),
                float: python_float(&text),
                boolean: text != "False" && text != "false",
                version,
                text,
            }
        }
    })
}

/// An `IN` value as the set of strings it matches: a list, a bracketed JSON list, or a
/// comma-separated string; non-string items as Python's `str()` prints them.
fn in_items(value: &Value) -> HashSet<String> {
    let item_text = |item: &Value| match item {
        Value::String(text) => text.clone(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Null => "None".to_owned(),
        Value::Number(number) => match number.as_i64().map(i128::from).or(number.as_u64().map(i128::from)) {
            Some(integer) => integer.to_string(),
            None => super::python::float_repr(number.as_f64().unwrap_or(f64::NAN)),
        },
        nested => nested.to_string(),
    };
    match value {
        Value::Array(items) => items.iter().map(item_text).collect(),
        Value::String(text) if text.starts_with('[') => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => items.iter().map(item_text).collect(),
            _ => text.split(',').map(str::to_owned).collect(),
        },
        Value::String(text) => text.split(',').map(str::to_owned).collect(),
        _ => HashSet::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn one_condition_segment(condition: Value) -> FlagConfig {
        FlagConfig {
            environment_key: "k".into(),
            environment_name: "n".into(),
            segments: vec![SegmentConfig {
                id: 1,
                definition: serde_json::from_value(
                    json!({ "name": "s", "rules": [{ "type": "ALL", "conditions": [condition] }] }),
                )
                .unwrap(),
            }],
            ..FlagConfig::default()
        }
    }

    fn in_segment(config: &FlagConfig, identifier: &str, traits: &Map<String, Value>) -> bool {
        let evaluator = Evaluator::compile(config).unwrap();
        let identity = Identity { identifier, profile_id: None, traits, transient_traits: None };
        !evaluator.evaluate(Some(&identity)).segments.is_empty()
    }

    /// Each row: trait value, operator, condition value, whether it matches. Every row was
    /// checked against the reference engine (flagsmith-flag-engine 11.1.1).
    #[test]
    fn every_operator_casts_and_compares_like_the_reference() {
        let cases: Vec<(Value, String, Value, bool)> =
            serde_json::from_str(include_str!("operator_cases.json")).unwrap();
        for (trait_value, operator, value, expected) in cases {
            let mut condition = json!({ "property": "t", "operator": operator });
            if !value.is_null() {
                condition["value"] = value.clone();
            }
            let config = one_condition_segment(condition);
            let mut traits = Map::new();
            traits.insert("t".into(), trait_value.clone());
            assert_eq!(in_segment(&config, "u", &traits), expected, "{trait_value} {operator} {value}");
        }
    }

    #[test]
    fn percentage_buckets_follow_the_reference_hash() {
        // md5("1,k_u") as the reference computes it, and its boundaries.
        let percentage = hashed_percentage(&["1", "k_u"]);
        assert!((0.0..100.0).contains(&percentage));
        let at = |threshold: f64| {
            let config =
                one_condition_segment(json!({ "operator": "PERCENTAGE_SPLIT", "value": threshold.to_string() }));
            in_segment(&config, "u", &Map::new())
        };
        assert!(at(percentage), "the split includes its boundary");
        assert!(!at(percentage - 1e-9));
        // Values printed by the reference engine's get_hashed_percentage_for_object_ids.
        assert_eq!(hashed_percentage(&["a", "b"]), 56.72134426885377);
        assert_eq!(percentage, 21.064212842568512);
        assert_eq!(hashed_percentage(&["12", "user-7"]), 55.78115623124626);
    }

    proptest::proptest! {
        /// A pattern's DFA and the `regex` crate agree on every text.
        #[test]
        fn dense_regexes_match_like_the_regex_crate(
            pattern in proptest::sample::select(vec![
                "a", "[a-c]+x", ".*@(example|roster)\\.com", "(?i)pro", "\\d{2,4}-\\w+", "x*", "[^@]+@[^@]+",
                "\\p{Greek}+", "é+", "a|ab|abc", ".", "$", "^$", "(a|b)*c$",
            ]),
            text in "[abcxé@.\\-0-9αβPROpro ]{0,12}",
        ) {
            let compiled = CompiledRegex::new(pattern).unwrap();
            proptest::prop_assert!(compiled.dense.is_some(), "{} has a DFA", pattern);
            let expected = compile_regex(pattern).unwrap().is_match(&text);
            proptest::prop_assert_eq!(compiled.is_match(&text), expected, "{} on {:?}", pattern, text);
        }

        /// The padded-block fast path hashes exactly what the general path (the `md-5` hasher
        /// over the joined ids) hashes, on both sides of every block boundary.
        #[test]
        fn prepared_blocks_hash_like_the_hasher(id in 0u64..100_000_000, value in "\\PC{0,300}") {
            let prefix = format!("{id},");
            proptest::prop_assert_eq!(percentage_after(&prefix, &value), hashed_percentage(&[&id.to_string(), &value]));
        }
    }

    #[test]
    fn patterns_a_dfa_cannot_express_still_match() {
        let compiled = CompiledRegex::new("\\bword\\b").unwrap();
        assert!(compiled.dense.is_none(), "Unicode word boundaries need the regex crate");
        assert!(compiled.is_match("word up"));
        assert!(!compiled.is_match("wordy"));
    }

    #[test]
    fn prepared_blocks_hash_like_the_hasher_at_block_boundaries() {
        for length in 0..300 {
            let value = "v".repeat(length);
            assert_eq!(percentage_after("12,", &value), hashed_percentage(&["12", &value]), "value of {length} bytes");
        }
    }

    #[test]
    fn every_trait_a_condition_reads_is_found_whatever_its_neighbours() {
        let condition = |property: &str, operator: &str, value: Value| json!({ "property": property, "operator": operator, "value": value });
        let config = FlagConfig {
            segments: vec![SegmentConfig {
                id: 1,
                definition: serde_json::from_value(json!({ "name": "s", "rules": [{ "type": "ALL", "conditions": [
                    condition("ab", "EQUAL", json!("2")),
                    condition("a", "EQUAL", json!("1")),
                    condition("é", "EQUAL", json!("4")),
                    condition("zz", "IS_NOT_SET", Value::Null),
                    condition("", "IS_NOT_SET", Value::Null),
                ] }] }))
                .unwrap(),
            }],
            ..FlagConfig::default()
        };
        let traits: Map<String, Value> =
            serde_json::from_value(json!({ "": null, "0": 0, "a": 1, "aa": 0, "ab": 2, "b": 3, "é": 4, "z": 5 }))
                .unwrap();
        assert!(in_segment(&config, "u", &traits));
        for missing in ["a", "ab", "é"] {
            let mut without = traits.clone();
            without.remove(missing);
            assert!(!in_segment(&config, "u", &without), "without {missing}");
        }
        let mut with_zz = traits.clone();
        with_zz.insert("zz".into(), json!(1));
        assert!(!in_segment(&config, "u", &with_zz), "zz is set");
    }

    #[test]
    fn modulo_in_64_bit_steps_is_the_128_bit_modulo() {
        for value in [
            0u128,
            9998,
            9999,
            u128::from(u64::MAX),
            u128::from(u64::MAX) + 1,
            u128::MAX,
            0x1234_5678_9abc_def0_fedc_ba98_7654_3210,
        ] {
            assert_eq!(u128::from(modulo_9999(value)), value % 9999, "{value}");
        }
    }

    fn feature(id: i64, body: Value) -> FeatureConfig {
        let mut body = body;
        body["name"] = json!(format!("f{id}"));
        FeatureConfig { id, definition: serde_json::from_value(body).unwrap() }
    }

    #[test]
    fn identity_override_beats_segment_override_beats_default() {
        let mut config = one_condition_segment(json!({ "property": "plan", "operator": "EQUAL", "value": "pro" }));
        config.segments.push(SegmentConfig {
            id: 2,
            definition: serde_json::from_value(json!({ "name": "everyone", "rules": [{ "type": "ALL",
                "conditions": [{ "property": "plan", "operator": "IS_SET" }] }] }))
            .unwrap(),
        });
        config.features = vec![feature(
            10,
            json!({ "enabled": false, "value": "default", "segment_overrides": [
                { "segment_id": 2, "priority": 5, "enabled": true, "value": "everyone" },
                { "segment_id": 1, "priority": 1, "enabled": true, "value": "pro" }] }),
        )];
        config.identity_overrides = vec![IdentityOverrideConfig {
            profile_id: "p-vip".into(),
            feature_id: 10,
            state: IdentityOverride { enabled: false, value: json!("vip") },
        }];
        let evaluator = Evaluator::compile(&config).unwrap();
        let traits = |plan: &str| {
            let mut traits = Map::new();
            traits.insert("plan".into(), json!(plan));
            traits
        };
        let state = |profile_id: Option<&str>, traits: &Map<String, Value>| {
            let identity = Identity { identifier: "u", profile_id, traits, transient_traits: None };
            let evaluation = evaluator.evaluate(Some(&identity));
            (evaluation.flags[0].enabled(), evaluation.flags[0].value().clone())
        };
        assert_eq!(state(None, &traits("pro")), (true, json!("pro")), "lower priority number wins");
        assert_eq!(state(None, &traits("free")), (true, json!("everyone")));
        assert_eq!(state(None, &Map::new()), (false, json!("default")));
        assert_eq!(state(Some("p-vip"), &traits("pro")), (false, json!("vip")), "identity override first");
        // Transient traits take part without being stored.
        let stored = traits("free");
        let transient = traits("pro");
        let identity =
            Identity { identifier: "u", profile_id: None, traits: &stored, transient_traits: Some(&transient) };
        assert_eq!(evaluator.evaluate(Some(&identity)).flags[0].value(), &json!("pro"));
        // Without an identity: defaults (no variants, no trait-based segments).
        assert_eq!(evaluator.evaluate(None).flags[0].value(), &json!("default"));
    }

    #[test]
    fn equal_priorities_go_to_the_earlier_segment() {
        let mut config = one_condition_segment(json!({ "property": "a", "operator": "IS_SET" }));
        config.segments.push(SegmentConfig { id: 2, definition: config.segments[0].definition.clone() });
        config.features = vec![feature(
            10,
            json!({ "segment_overrides": [
                { "segment_id": 2, "priority": 0, "enabled": true, "value": "second" },
                { "segment_id": 1, "priority": 0, "enabled": true, "value": "first" }] }),
        )];
        let evaluator = Evaluator::compile(&config).unwrap();
        let mut traits = Map::new();
        traits.insert("a".into(), json!(1));
        let identity = Identity { identifier: "u", profile_id: None, traits: &traits, transient_traits: None };
        assert_eq!(evaluator.evaluate(Some(&identity)).flags[0].value(), &json!("first"));
    }

    #[test]
    fn variants_split_identities_by_weight() {
        let config = FlagConfig {
            environment_key: "env".into(),
            features: vec![feature(
                7,
                json!({ "value": "control-value", "variants": [
                    { "key": "a", "value": "A", "weight": 30 }, { "key": "b", "value": "B", "weight": 20 }] }),
            )],
            ..FlagConfig::default()
        };
        let evaluator = Evaluator::compile(&config).unwrap();
        let traits = Map::new();
        let mut counts = std::collections::HashMap::new();
        for number in 0..4000 {
            let identifier = format!("user-{number}");
            let identity =
                Identity { identifier: &identifier, profile_id: None, traits: &traits, transient_traits: None };
            let evaluation = evaluator.evaluate(Some(&identity));
            let flag = &evaluation.flags[0];
            let percentage = hashed_percentage(&["7", &format!("env_{identifier}")]);
            let expected = if percentage < 30.0 {
                "a"
            } else if percentage < 50.0 {
                "b"
            } else {
                "control"
            };
            assert_eq!(flag.variant(), Some(expected));
            *counts.entry(expected).or_insert(0) += 1;
        }
        assert!((1000..1400).contains(&counts["a"]), "{counts:?}");
        assert!((600..1000).contains(&counts["b"]), "{counts:?}");
        assert_eq!(evaluator.evaluate(None).flags[0].variant(), None);
    }

    #[test]
    fn context_paths_read_identity_and_environment() {
        let config =
            one_condition_segment(json!({ "property": "$.environment.name", "operator": "EQUAL", "value": "n" }));
        assert!(Evaluator::compile(&config).unwrap().evaluate(None).segments.len() == 1, "matches with no identity");
        let config =
            one_condition_segment(json!({ "property": "$.identity.identifier", "operator": "EQUAL", "value": "42" }));
        assert!(in_segment(&config, "42", &Map::new()));
        let config =
            one_condition_segment(json!({ "property": "$.identity.key", "operator": "EQUAL", "value": "k_u" }));
        assert!(in_segment(&config, "u", &Map::new()));
        // A trait literally named like the path wins over the path.
        let config =
            one_condition_segment(json!({ "property": "$.identity.identifier", "operator": "EQUAL", "value": "x" }));
        let mut traits = Map::new();
        traits.insert("$.identity.identifier".into(), json!("x"));
        assert!(in_segment(&config, "u", &traits));
        // Through a path, nested traits are not values.
        let config = one_condition_segment(json!({ "property": "$.identity.traits.t", "operator": "IS_SET" }));
        let mut traits = Map::new();
        traits.insert("t".into(), json!({ "a": 1 }));
        assert!(!in_segment(&config, "u", &traits));
    }

    #[test]
    fn nested_rules_combine_all_any_none() {
        let config = FlagConfig {
            segments: vec![SegmentConfig {
                id: 1,
                definition: serde_json::from_value(json!({ "name": "s", "rules": [{ "type": "ALL", "rules": [
                    { "type": "ANY", "conditions": [
                        { "property": "a", "operator": "EQUAL", "value": "1" },
                        { "property": "b", "operator": "EQUAL", "value": "1" }] },
                    { "type": "NONE", "conditions": [{ "property": "banned", "operator": "IS_SET" }] }] }] }))
                .unwrap(),
            }],
            ..FlagConfig::default()
        };
        let with = |pairs: &[(&str, Value)]| {
            let traits: Map<String, Value> =
                pairs.iter().map(|(key, value)| ((*key).to_owned(), value.clone())).collect();
            in_segment(&config, "u", &traits)
        };
        assert!(with(&[("b", json!(1))]));
        assert!(!with(&[("c", json!(1))]));
        assert!(!with(&[("a", json!(1)), ("banned", json!(true))]));
    }
}
