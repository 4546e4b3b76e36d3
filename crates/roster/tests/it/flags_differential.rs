//! Roster's flag evaluator against Flagsmith's reference engine (PyPI `flagsmith-flag-engine`):
//! random environments, identities and traits go through both, and every flag (enabled, value,
//! variant) and every segment list must be identical.
//!
//! Needs `ROSTER_FLAG_ENGINE_PYTHON`: a Python with `flagsmith-flag-engine` installed (`.ci/run`
//! makes one in a virtualenv). Without it the test says so and is skipped.

use std::io::Write;
use std::process::{Command, Stdio};

use roster_core::flags::{
    Evaluator, FeatureConfig, FeatureDefinition, FlagConfig, Identity, IdentityOverride, IdentityOverrideConfig,
    SegmentConfig, SegmentDefinition, reference_context, validate_feature, validate_segment,
};
use serde_json::{Map, Value, json};

/// Deterministic generator (SplitMix64), so a failure names a seed that reproduces it.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

const TRAIT_KEYS: [&str; 9] = ["plan", "age", "score", "app_version", "email", "beta", "country", "n", "ratio"];

fn trait_value(random: &mut Random) -> Value {
    random.pick(&[
        json!("pro"),
        json!("free"),
        json!("team"),
        json!("10"),
        json!("42"),
        json!("-3"),
        json!("7.5"),
        json!("007"),
        json!("1.2.3"),
        json!("1.2.3-beta.1"),
        json!("1.2.3-beta.11"),
        json!("2.0.0"),
        json!("1.10.0+build.5"),
        json!("ada@example.com"),
        json!("x@test.org"),
        json!("True"),
        json!("false"),
        json!(""),
        json!("1e5"),
        json!(" 42"),
        json!("Pro"),
        json!(0),
        json!(1),
        json!(2),
        json!(10),
        json!(42),
        json!(-3),
        json!(7.5),
        json!(1e20),
        json!(0.1),
        json!(2.0),
        json!(true),
        json!(false),
        Value::Null,
    ])
}

fn property(random: &mut Random) -> String {
    if random.chance(12) {
        return random
            .pick(&[
                "$.identity.identifier",
                "$.identity.key",
                "$.environment.name",
                "$.environment.key",
                "$.identity.traits.plan",
                "$.identity.traits.age",
            ])
            .to_owned();
    }
    random.pick(&TRAIT_KEYS).to_owned()
}

fn condition(random: &mut Random) -> Value {
    let comparison_values = [
        "pro",
        "free",
        "10",
        "42",
        "-3",
        "7.5",
        "7.50",
        "1.2.3",
        "True",
        "false",
        "",
        "1e1",
        " 42 ",
        "1_0",
        "a",
        "Pro",
        "0",
        "2",
        "x@test.org",
        "1.2.3:semver",
        "1.2.3-beta.2:semver",
        "2.0.0:semver",
        "1.10.0:semver",
        "0.9.0-rc.1:semver",
    ];
    let operator = random.pick(&[
        "EQUAL",
        "NOT_EQUAL",
        "GREATER_THAN",
        "GREATER_THAN_INCLUSIVE",
        "LESS_THAN",
        "LESS_THAN_INCLUSIVE",
        "CONTAINS",
        "NOT_CONTAINS",
        "REGEX",
        "IN",
        "MODULO",
        "IS_SET",
        "IS_NOT_SET",
        "PERCENTAGE_SPLIT",
    ]);
    let value = match operator {
        "IS_SET" | "IS_NOT_SET" => Value::Null,
        "REGEX" => {
            json!(random.pick(&[".*@example\\.com", "[0-9]+", "pro|team", "1\\.2", "T", "(?i)PRO", "-?\\d+\\.5"]))
        }
        "MODULO" => json!(random.pick(&["2|0", "3|1", "2.5|0.5", "-2|0", "10|0", "4|2", "0.5|0"])),
        "PERCENTAGE_SPLIT" => json!(random.pick(&["0", "25", "50.5", "100", "75", "99.99"])),
        "IN" => random.pick(&[
            json!(["pro", "team"]),
            json!("pro,team"),
            json!("[1, 2, 42]"),
            json!([10, true, "x@test.org"]),
            json!("10,42,-3"),
            json!([7.5, "7.5", 2.0]),
            json!("user-1,user-3,42"),
        ]),
        "CONTAINS" | "NOT_CONTAINS" => json!(random.pick(&["pro", "@", "example", "1", "e", "2"])),
        _ => json!(random.pick(&comparison_values)),
    };
    let property = if operator == "PERCENTAGE_SPLIT" && random.chance(60) { String::new() } else { property(random) };
    let mut condition = json!({ "property": property, "operator": operator });
    if !value.is_null() {
        condition["value"] = value;
    }
    condition
}

fn rule(random: &mut Random, depth: usize) -> Value {
    let conditions: Vec<Value> = (0..random.below(4)).map(|_| condition(random)).collect();
    let rules: Vec<Value> = if depth < 3 && random.chance(30) {
        (0..1 + random.below(2)).map(|_| rule(random, depth + 1)).collect()
    } else {
        Vec::new()
    };
    json!({ "type": random.pick(&["ALL", "ANY", "NONE"]), "conditions": conditions, "rules": rules })
}

fn flag_value(random: &mut Random) -> Value {
    random.pick(&[json!("on"), json!("blue"), json!(3), json!(2.5), json!(true), json!(false), Value::Null, json!("")])
}

struct Case {
    config: FlagConfig,
    /// (identifier, traits); `None` evaluates without an identity.
    identities: Vec<Option<(String, Map<String, Value>)>>,
}

fn environment(random: &mut Random, case_number: usize) -> Case {
    let environment_key: String = (0..22)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[random.below(62)]))
        .collect();
    let mut segments = Vec::new();
    for index in 0..random.below(7) {
        let rules: Vec<Value> = (0..1 + random.below(2)).map(|_| rule(random, 1)).collect();
        let definition: SegmentDefinition =
            serde_json::from_value(json!({ "name": format!("segment-{index}"), "rules": rules })).unwrap();
        validate_segment(&definition)
            .unwrap_or_else(|error| panic!("case {case_number}: generated segment refused: {error:?}"));
        segments.push(SegmentConfig { id: 100 + index as i64 * 7 + case_number as i64, definition });
    }
    let mut features = Vec::new();
    for index in 0..1 + random.below(6) {
        let mut variants = Vec::new();
        if random.chance(40) {
            let mut left = 100.0;
            for key in ["a", "b", "c"].iter().take(1 + random.below(3)) {
                let weight = random.pick(&[0.0, 10.0, 25.5, 33.3, 50.0, 100.0f64]).min(left);
                left -= weight;
                variants.push(json!({ "key": key, "value": flag_value(random), "weight": weight }));
            }
        }
        let mut segment_overrides = Vec::new();
        for segment in &segments {
            if random.chance(40) {
                segment_overrides.push(json!({ "segment_id": segment.id, "priority": random.below(3),
                    "enabled": random.chance(50), "value": flag_value(random) }));
            }
        }
        let definition: FeatureDefinition = serde_json::from_value(json!({
            "name": format!("feature-{index}"), "enabled": random.chance(50), "value": flag_value(random),
            "variants": variants, "segment_overrides": segment_overrides,
        }))
        .unwrap();
        validate_feature(&definition).unwrap();
        features.push(FeatureConfig { id: 1000 + index as i64 * 13 + case_number as i64, definition });
    }
    let identifiers = ["user-1", "user-2", "user-3", "42", "7", "abc", "user-10", "x@test.org"];
    let mut identity_overrides = Vec::new();
    for identifier in identifiers.iter().take(4) {
        for feature in &features {
            if random.chance(15) {
                identity_overrides.push(IdentityOverrideConfig {
                    profile_id: (*identifier).to_owned(),
                    feature_id: feature.id,
                    state: IdentityOverride { enabled: random.chance(50), value: flag_value(random) },
                });
            }
        }
    }
    let mut identities = vec![None];
    for _ in 0..12 {
        let mut traits = Map::new();
        for _ in 0..random.below(6) {
            traits.insert(random.pick(&TRAIT_KEYS).to_owned(), trait_value(random));
        }
        identities.push(Some((random.pick(&identifiers).to_owned(), traits)));
    }
    let config = FlagConfig {
        environment_key,
        environment_name: random.pick(&["production", "staging", "42"]).to_owned(),
        segments,
        features,
        identity_overrides,
    };
    Case { config, identities }
}

#[test]
fn roster_flags_match_the_reference_engine() {
    let Ok(python) = std::env::var("ROSTER_FLAG_ENGINE_PYTHON") else {
        crate::common::skipped(
            "roster_flags_match_the_reference_engine",
            "set ROSTER_FLAG_ENGINE_PYTHON to a Python with \
             flagsmith-flag-engine installed (.ci/run does)",
        );
        return;
    };
    let seed: u64 =
        std::env::var("ROSTER_DIFFERENTIAL_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or(20261123);
    let environments: usize =
        std::env::var("ROSTER_DIFFERENTIAL_ENVIRONMENTS").ok().and_then(|count| count.parse().ok()).unwrap_or(400);
    let mut random = Random(seed);
    let cases: Vec<Case> = (0..environments).map(|number| environment(&mut random, number)).collect();

    let mut input = String::new();
    for (case_number, case) in cases.iter().enumerate() {
        for (identity_number, identity) in case.identities.iter().enumerate() {
            let line = json!({ "id": [case_number, identity_number], "context": reference_context(&case.config, identity.as_ref().map(|(identifier, traits)| (identifier.as_str(), traits))) });
            input.push_str(&line.to_string());
            input.push('\n');
        }
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/flag_engine_reference.py");
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {python}: {error}"));
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(output.status.success(), "reference engine failed: {}", String::from_utf8_lossy(&output.stderr));

    let mut compared = 0;
    let mut matched_segments = 0;
    let mut variants_served = 0;
    for line in String::from_utf8(output.stdout).unwrap().lines() {
        let expected: Value = serde_json::from_str(line).unwrap();
        let case_number = expected["id"][0].as_u64().unwrap() as usize;
        let identity_number = expected["id"][1].as_u64().unwrap() as usize;
        let case = &cases[case_number];
        let evaluator = Evaluator::compile(&case.config).unwrap();
        let identity = case.identities[identity_number].as_ref().map(|(identifier, traits)| Identity {
            identifier,
            profile_id: Some(identifier),
            traits,
            transient_traits: None,
        });
        let evaluation = evaluator.evaluate(identity.as_ref());
        let mut flags = Map::new();
        for flag in &evaluation.flags {
            variants_served += usize::from(flag.variant().is_some_and(|variant| variant != "control"));
            flags.insert(
                flag.name().to_owned(),
                json!({ "enabled": flag.enabled(), "value": flag.value(), "variant": flag.variant() }),
            );
        }
        let segments: Vec<&str> = evaluation.segments.iter().map(|(_, name)| *name).collect();
        matched_segments += segments.len();
        let context = reference_context(
            &case.config,
            case.identities[identity_number].as_ref().map(|(identifier, traits)| (identifier.as_str(), traits)),
        );
        assert_eq!(
            Value::Object(flags),
            expected["flags"],
            "seed {seed}, case {case_number}, identity {identity_number}: flags differ\ncontext: {context}"
        );
        assert_eq!(
            json!(segments),
            expected["segments"],
            "seed {seed}, case {case_number}, identity {identity_number}: segments differ\ncontext: {context}"
        );
        compared += 1;
    }
    let expected_count: usize = cases.iter().map(|case| case.identities.len()).sum();
    assert_eq!(compared, expected_count, "the reference answered every evaluation");
    // The generator must exercise matches and variants, or agreement proves little.
    assert!(matched_segments > compared / 10, "too few segment matches ({matched_segments}) to be meaningful");
    assert!(variants_served > 100, "too few variants served ({variants_served})");
    eprintln!(
        "compared {compared} evaluations with the reference engine: {matched_segments} segment matches, {variants_served} variants"
    );
}
