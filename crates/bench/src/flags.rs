//! `roster-bench flags`: all flags for one identity in an environment of 50 features, 20 segments
//! and 20 identity overrides, with Roster's compiled evaluator and, in the same run, Flagsmith's
//! reference Python engine on the same environment and identities.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use roster_core::flags::{
    Evaluator, FeatureConfig, FlagConfig, Identity, IdentityOverride, IdentityOverrideConfig, SegmentConfig,
    reference_context,
};
use serde_json::{Map, Value, json};

#[derive(Debug, clap::Args)]
pub struct FlagsOptions {
    /// Distinct identities evaluated (each with 8 traits).
    #[arg(long, default_value_t = 1_000)]
    identities: usize,
    /// Passes over the identities with Roster's evaluator.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Passes over the identities with the reference engine (it is slower).
    #[arg(long, default_value_t = 5)]
    reference_rounds: usize,
    /// A Python with `flagsmith-flag-engine` installed; without one only Roster is measured.
    #[arg(long, env = "ROSTER_FLAG_ENGINE_PYTHON")]
    python: Option<String>,
}

/// The benchmark environment: segments mixing every kind of condition, half the features
/// overridden by segments, a fifth multivariate, 20 identity overrides.
fn environment() -> FlagConfig {
    let rule_kinds = [
        json!({ "property": "plan", "operator": "EQUAL", "value": "pro" }),
        json!({ "property": "app_version", "operator": "GREATER_THAN_INCLUSIVE", "value": "2.3.0:semver" }),
        json!({ "property": "country", "operator": "IN", "value": ["fr", "de", "it", "es", "nl"] }),
        json!({ "property": "email", "operator": "REGEX", "value": ".*@(example|roster)\\.com" }),
        json!({ "operator": "PERCENTAGE_SPLIT", "value": "35" }),
        json!({ "property": "seats", "operator": "MODULO", "value": "3|0" }),
        json!({ "property": "age", "operator": "GREATER_THAN", "value": "30" }),
        json!({ "property": "company", "operator": "CONTAINS", "value": "Corp" }),
        json!({ "property": "beta", "operator": "EQUAL", "value": "true" }),
        json!({ "property": "churned", "operator": "IS_NOT_SET" }),
    ];
    let segments = (0..20)
        .map(|index| {
            let first = &rule_kinds[index % rule_kinds.len()];
            let second = &rule_kinds[(index * 3 + 1) % rule_kinds.len()];
            let third = &rule_kinds[(index * 7 + 2) % rule_kinds.len()];
            let rules = json!([
                { "type": "ALL", "conditions": [first] },
                { "type": "ANY", "conditions": [second, third], "rules": [{ "type": "NONE", "conditions": [
                    { "property": "blocked", "operator": "EQUAL", "value": "yes" }] }] },
            ]);
            let definition = serde_json::from_value(json!({ "name": format!("segment-{index}"), "rules": rules }))
                .expect("benchmark segment is valid");
            SegmentConfig { id: 100 + index as i64, definition }
        })
        .collect::<Vec<_>>();
    let features = (0..50)
        .map(|index| {
            let mut body = json!({ "name": format!("feature-{index}"), "enabled": index % 2 == 0, "value": format!("default-{index}") });
            if index % 5 == 0 {
                body["variants"] = json!([
                    { "key": "a", "value": "A", "weight": 20 }, { "key": "b", "value": "B", "weight": 30 },
                    { "key": "c", "value": "C", "weight": 10 }]);
            }
            if index % 2 == 1 {
                body["segment_overrides"] = json!([
                    { "segment_id": 100 + (index % 20) as i64, "priority": 1, "enabled": true, "value": "segment" },
                    { "segment_id": 100 + ((index * 7) % 20) as i64, "priority": 2, "enabled": false, "value": "other" }]);
            }
            FeatureConfig { id: 1000 + index as i64, definition: serde_json::from_value(body).expect("valid feature") }
        })
        .collect::<Vec<_>>();
    let identity_overrides = (0..20)
        .map(|index| IdentityOverrideConfig {
            profile_id: format!("user-{}", index * 37),
            feature_id: 1000 + (index * 3 % 50) as i64,
            state: IdentityOverride { enabled: true, value: json!("override") },
        })
        .collect();
    FlagConfig {
        environment_key: "bench-environment-key-0001".into(),
        environment_name: "production".into(),
        segments,
        features,
        identity_overrides,
    }
}

fn identity_traits(index: usize) -> Map<String, Value> {
    const PLANS: [&str; 3] = ["free", "pro", "team"];
    const COUNTRIES: [&str; 5] = ["fr", "us", "de", "jp", "br"];
    const DOMAINS: [&str; 3] = ["example.com", "test.org", "roster.com"];
    const COMPANIES: [&str; 3] = ["Acme Corp", "Initech", "Globex Corporation"];
    let traits = json!({
        "plan": PLANS[index % 3],
        "app_version": format!("2.{}.{}", index % 6, index % 4),
        "country": COUNTRIES[index % 5],
        "email": format!("user{index}@{}", DOMAINS[index % 3]),
        "seats": index % 50,
        "age": 18 + index % 60,
        "company": COMPANIES[index % 3],
        "beta": index.is_multiple_of(4),
    });
    traits.as_object().cloned().unwrap_or_default()
}

pub fn flags_bench(options: &FlagsOptions) -> anyhow::Result<()> {
    if options.identities == 0 || options.rounds == 0 {
        bail!("--identities and --rounds must be positive");
    }
    println!("roster-bench flags: {options:?}");
    let config = environment();
    let compile_started = Instant::now();
    let evaluator = Evaluator::compile(&config).context("compile benchmark environment")?;
    let compile_time = compile_started.elapsed();
    let identities: Vec<(String, Map<String, Value>)> =
        (0..options.identities).map(|index| (format!("user-{index}"), identity_traits(index))).collect();

    // Checksum, so the evaluations cannot be optimised away and the run shows it evaluated.
    let mut enabled = 0usize;
    let mut batch_nanos = Vec::with_capacity(options.rounds);
    let started = Instant::now();
    for _ in 0..options.rounds {
        let batch_started = Instant::now();
        for (identifier, traits) in &identities {
            let identity = Identity { identifier, profile_id: Some(identifier), traits, transient_traits: None };
            let evaluation = evaluator.evaluate(Some(&identity));
            enabled += evaluation.flags.iter().filter(|flag| flag.enabled()).count() + evaluation.segments.len();
        }
        batch_nanos.push(batch_started.elapsed().as_nanos() as f64 / options.identities as f64);
    }
    let evaluations = options.rounds * options.identities;
    let roster_mean_us = started.elapsed().as_secs_f64() * 1e6 / evaluations as f64;
    batch_nanos.sort_by(f64::total_cmp);
    // Each side is summed up by its median pass, which a noisy neighbour moves least.
    let roster_us = batch_nanos[batch_nanos.len() / 2] / 1000.0;
    let p99_batch_us = batch_nanos[(batch_nanos.len() * 99 / 100).min(batch_nanos.len() - 1)] / 1000.0;

    println!();
    println!("== results ==");
    println!(
        "environment: 50 features (10 multivariate, 25 with segment overrides), 20 segments, 20 identity overrides"
    );
    println!("compile once per configuration change:   {:>10.1} µs", compile_time.as_secs_f64() * 1e6);
    println!(
        "roster evaluator, all flags per identity: {roster_us:>10.2} µs   (median pass; mean {roster_mean_us:.2}, slowest pass {p99_batch_us:.2}; {evaluations} evaluations, checksum {enabled})"
    );
    println!("target < 5 µs per identity:               {}", if roster_us < 5.0 { "met" } else { "NOT met" });

    let Some(python) = &options.python else {
        println!("reference engine: skipped (pass --python or set ROSTER_FLAG_ENGINE_PYTHON)");
        return Ok(());
    };
    let contexts: Vec<Value> = identities
        .iter()
        .map(|(identifier, traits)| reference_context(&config, Some((identifier.as_str(), traits))))
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/reference_bench.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("run {python}"))?;
    let request = json!({ "contexts": contexts, "rounds": options.reference_rounds }).to_string();
    child.stdin.take().context("python stdin")?.write_all(request.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("the reference engine failed");
    }
    let answer: Value = serde_json::from_slice(&output.stdout).context("reference answer")?;
    let reference_us = answer["median_us"].as_f64().context("median_us")?;
    let reference_mean_us = answer["mean_us"].as_f64().context("mean_us")?;
    let speedup = reference_us / roster_us;
    println!(
        "reference engine (flagsmith-flag-engine): {reference_us:>10.2} µs   (median pass; mean {reference_mean_us:.2}; {} evaluations)",
        answer["evaluations"]
    );
    println!(
        "speed-up roster / reference:              {speedup:>10.0}×   (target ≥ 200×: {})",
        if speedup >= 200.0 { "met" } else { "NOT met" }
    );
    println!("speed-up by the means instead:            {:>10.0}×", reference_mean_us / roster_mean_us);
    Ok(())
}
