//! Segments and feature flags: definitions with their save-time checks, and the compiled
//! evaluator that gives, for the same inputs, the results of Flagsmith's reference engine.

pub mod context;
pub mod definition;
pub mod evaluator;
pub mod python;

pub use context::reference_context;
pub use definition::{
    FeatureDefinition, IdentityOverride, Operator, RuleType, SegmentCondition, SegmentDefinition, SegmentOverride,
    SegmentRule, Variant, validate_feature, validate_identity_override, validate_segment,
};
pub use evaluator::{
    Evaluation, Evaluator, FeatureConfig, FlagConfig, FlagState, Identity, IdentityOverrideConfig, Reason,
    SegmentConfig, hashed_percentage,
};
