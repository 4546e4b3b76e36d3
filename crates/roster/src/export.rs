//! `roster export`: every profile of an environment (and with `--events` each profile's events)
//! as NDJSON that `roster import` reads back, or as CSV, from the store or a running server.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use roster_engine::{Engine, EngineConfig, Principal, Profile, ProfileFilter, StoredEvent};
use serde_json::{Map, Value, json};

use crate::TargetArgs;
use crate::progress::{Progress, per_second};

/// Profiles (and events) read per page: the most a listing answers.
const PAGE_SIZE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One profile per line (`"type": "profile"`, the shape `GET /v1/profiles` answers), each
    /// followed by its events as native tracks with `--events`.
    Ndjson,
    /// A header row (`user_id`, `anonymous_id`, one column per trait), one row per profile.
    Csv,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Where to write; `-` (the default) is standard output.
    #[arg(long, short, default_value = "-")]
    output: String,
    /// The output's format; by default from the output's extension (`.csv`), else NDJSON.
    #[arg(long, value_enum)]
    format: Option<ExportFormat>,
    /// Also export each profile's events (NDJSON only), after the profile's line, newest first.
    #[arg(long)]
    events: bool,
    #[command(flatten)]
    target: TargetArgs,
}

/// Where profiles are read from.
enum Source {
    Local { engine: Arc<Engine>, principal: Principal, environment: String },
    Remote { client: reqwest::Client, base_url: String, key: String },
}

/// One page of a listing: the items (as the HTTP API renders them) and the next page's cursor.
struct Page {
    items: Vec<Value>,
    next: Option<String>,
}

impl Source {
    async fn open(args: &ExportArgs) -> anyhow::Result<Self> {
        if let Some(url) = &args.target.url {
            let key = args.target.remote_key("server key")?;
            let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(120)).build()?;
            return Ok(Source::Remote { client, base_url: url.trim_end_matches('/').to_owned(), key });
        }
        let (engine, principal) = args.target.open_locally(EngineConfig::default()).await?;
        Ok(Source::Local { engine, principal, environment: args.target.environment.clone() })
    }

    async fn profiles(&self, after: Option<String>) -> anyhow::Result<Page> {
        match self {
            Source::Local { engine, principal, environment } => {
                let page = engine
                    .list_profiles(principal, ProfileFilter::default(), after, PAGE_SIZE)
                    .await
                    .map_err(|error| anyhow::anyhow!("cannot list profiles: {error}"))?;
                let items = page.profiles.into_iter().map(|profile| profile_document(profile, environment)).collect();
                Ok(Page { items, next: page.next_after })
            }
            Source::Remote { client, base_url, key } => {
                let mut url = format!("{base_url}/v1/profiles?limit={PAGE_SIZE}");
                if let Some(after) = after {
                    url.push_str(&format!("&after={}", percent_encode(&after)));
                }
                let answer = get_json(client, &url, key).await?;
                Ok(Page {
                    items: array_of(&answer, "profiles"),
                    next: answer["next_after"].as_str().map(str::to_owned),
                })
            }
        }
    }

    async fn events(&self, profile_id: &str, before: Option<String>) -> anyhow::Result<Page> {
        match self {
            Source::Local { engine, principal, .. } => {
                let page = engine
                    .profile_events(principal, profile_id, before, PAGE_SIZE)
                    .await
                    .map_err(|error| anyhow::anyhow!("cannot list the events of {profile_id}: {error}"))?;
                Ok(Page { items: page.events.into_iter().map(event_document).collect(), next: page.next_before })
            }
            Source::Remote { client, base_url, key } => {
                let mut url = format!("{base_url}/v1/profiles/{}/events?limit={PAGE_SIZE}", percent_encode(profile_id));
                if let Some(before) = before {
                    url.push_str(&format!("&before={}", percent_encode(&before)));
                }
                let answer = get_json(client, &url, key).await?;
                Ok(Page { items: array_of(&answer, "events"), next: answer["next_before"].as_str().map(str::to_owned) })
            }
        }
    }
}

fn array_of(answer: &Value, field: &str) -> Vec<Value> {
    answer[field].as_array().cloned().unwrap_or_default()
}

async fn get_json(client: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<Value> {
    let response =
        client.get(url).header("X-API-Key", key).send().await.with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let answer: Value = response.json().await.with_context(|| format!("{url} did not answer JSON"))?;
    anyhow::ensure!(
        status.is_success(),
        "{url} answered {status}: {} ({})",
        answer["message"].as_str().unwrap_or("no reason given"),
        answer["code"].as_str().unwrap_or("")
    );
    Ok(answer)
}

/// Query-string encoding of a cursor or id (anything but unreserved characters).
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A profile as `GET /v1/profiles` renders it.
fn profile_document(profile: Profile, environment: &str) -> Value {
    let devices: Vec<Value> = profile
        .devices
        .into_iter()
        .map(|device| {
            json!({
                "token": device.token,
                "platform": device.platform,
                "attributes": device.attributes,
                "last_used": device.last_used.map(|at| at.to_rfc3339()),
                "last_status": device.last_status,
                "created_at": device.created_at.to_rfc3339(),
                "updated_at": device.updated_at.to_rfc3339(),
            })
        })
        .collect();
    let trait_timestamps: Map<String, Value> =
        profile.trait_timestamps.into_iter().map(|(key, at)| (key, json!(at.to_rfc3339()))).collect();
    json!({
        "profile_id": profile.profile_id,
        "environment": environment,
        "user_id": profile.user_id,
        "identified": profile.identified,
        "anonymous_ids": profile.anonymous_ids,
        "email": profile.email,
        "traits": profile.traits,
        "trait_timestamps": trait_timestamps,
        "devices": devices,
        "created_at": profile.created_at.to_rfc3339(),
        "updated_at": profile.updated_at.to_rfc3339(),
    })
}

/// An event as `GET /v1/profiles/{id}/events` renders it.
fn event_document(event: StoredEvent) -> Value {
    json!({
        "event_id": event.event_id,
        "profile_id": event.profile_id,
        "distinct_id": event.distinct_id,
        "anonymous_id": event.anonymous_id,
        "event": event.event,
        "properties": event.properties,
        "timestamp": event.timestamp.to_rfc3339(),
        "received_at": event.received_at.to_rfc3339(),
        "identity_traits": event.identity_traits,
    })
}

/// An event as a native track that `roster import` applies once: its event id is the message id.
fn event_as_track(event: &Value) -> Value {
    let mut track = Map::new();
    track.insert("type".to_owned(), json!("track"));
    for field in ["event", "distinct_id", "anonymous_id", "properties", "timestamp"] {
        if let Some(value) = event.get(field).filter(|value| !value.is_null()) {
            track.insert(field.to_owned(), value.clone());
        }
    }
    if let Some(event_id) = event.get("event_id").filter(|value| !value.is_null()) {
        track.insert("message_id".to_owned(), event_id.clone());
    }
    Value::Object(track)
}

pub async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let to_stdout = args.output == "-";
    let format = args.format.unwrap_or_else(|| {
        if !to_stdout && args.output.to_ascii_lowercase().ends_with(".csv") {
            ExportFormat::Csv
        } else {
            ExportFormat::Ndjson
        }
    });
    anyhow::ensure!(
        !(args.events && format == ExportFormat::Csv),
        "--events needs NDJSON output (events do not fit the profiles' CSV columns)"
    );
    let source = Source::open(&args).await?;
    let writer: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout())
    } else {
        Box::new(File::create(&args.output).with_context(|| format!("cannot create {}", args.output))?)
    };
    let mut output = BufWriter::with_capacity(256 * 1024, writer);
    let mut progress = Progress::new("export", "profiles", None);
    let written = match format {
        ExportFormat::Ndjson => write_ndjson(&source, &mut output, args.events, &mut progress).await?,
        ExportFormat::Csv => write_csv(&source, &mut output, &mut progress).await?,
    };
    output.flush().with_context(|| format!("cannot write {}", args.output))?;
    let elapsed = progress.elapsed();
    let destination =
        if to_stdout { "standard output".to_owned() } else { PathBuf::from(&args.output).display().to_string() };
    progress.finish(&format!(
        "{} profiles{} written to {destination} in {:.1}s ({:.0} profiles/s){}",
        written.profiles,
        if args.events { format!(", {} events", written.events) } else { String::new() },
        elapsed.as_secs_f64(),
        per_second(written.profiles, elapsed),
        if written.traits_left_out > 0 {
            format!(
                "; {} traits first seen after the header was written were left out (export NDJSON for everything)",
                written.traits_left_out
            )
        } else {
            String::new()
        }
    ));
    Ok(())
}

#[derive(Debug, Default)]
struct Written {
    profiles: u64,
    events: u64,
    /// CSV: trait values whose key appeared between the two passes.
    traits_left_out: u64,
}

impl Written {
    fn details(&self) -> String {
        if self.events > 0 { format!("{} events", self.events) } else { String::new() }
    }
}

async fn write_ndjson(
    source: &Source,
    output: &mut impl Write,
    with_events: bool,
    progress: &mut Progress,
) -> anyhow::Result<Written> {
    let mut written = Written::default();
    let mut after = None;
    loop {
        let page = source.profiles(after).await?;
        for mut profile in page.items {
            let profile_id = profile["profile_id"].as_str().unwrap_or_default().to_owned();
            if let Value::Object(fields) = &mut profile {
                fields.insert("type".to_owned(), json!("profile"));
            }
            writeln!(output, "{profile}").context("cannot write the export")?;
            written.profiles += 1;
            if with_events {
                let mut before = None;
                loop {
                    let events = source.events(&profile_id, before).await?;
                    for event in &events.items {
                        writeln!(output, "{}", event_as_track(event)).context("cannot write the export")?;
                        written.events += 1;
                    }
                    match events.next {
                        Some(next) if !events.items.is_empty() => before = Some(next),
                        _ => break,
                    }
                }
            }
        }
        progress.update(written.profiles, None, &written.details());
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(written),
        }
    }
}

/// Two passes: the first collects every trait key (the CSV header must come first), the second
/// writes the rows. A profile with several anonymous ids gets one more row per further id, with
/// only `user_id` and `anonymous_id`, so that importing the file links them all.
async fn write_csv(source: &Source, output: &mut impl Write, progress: &mut Progress) -> anyhow::Result<Written> {
    let mut trait_keys = BTreeSet::new();
    let mut after = None;
    loop {
        let page = source.profiles(after).await?;
        for profile in &page.items {
            if let Some(traits) = profile["traits"].as_object() {
                trait_keys.extend(traits.keys().cloned());
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let trait_keys: Vec<String> = trait_keys.into_iter().collect();
    let mut writer = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(output);
    let mut header = vec!["user_id".to_owned(), "anonymous_id".to_owned()];
    header.extend(trait_keys.iter().cloned());
    writer.write_record(&header).context("cannot write the export")?;
    let mut written = Written::default();
    let mut after = None;
    loop {
        let page = source.profiles(after).await?;
        for profile in &page.items {
            let user_id = profile["user_id"].as_str().unwrap_or_default();
            let anonymous_ids: Vec<&str> = profile["anonymous_ids"]
                .as_array()
                .map(|ids| ids.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let empty = Map::new();
            let traits = profile["traits"].as_object().unwrap_or(&empty);
            written.traits_left_out +=
                traits.keys().filter(|key| trait_keys.binary_search(key).is_err()).count() as u64;
            let mut row = vec![user_id.to_owned(), anonymous_ids.first().copied().unwrap_or_default().to_owned()];
            row.extend(trait_keys.iter().map(|key| traits.get(key).map(csv_cell).unwrap_or_default()));
            writer.write_record(&row).context("cannot write the export")?;
            for anonymous_id in anonymous_ids.iter().skip(1) {
                let mut link = vec![user_id.to_owned(), (*anonymous_id).to_owned()];
                link.resize(header.len(), String::new());
                writer.write_record(&link).context("cannot write the export")?;
            }
            written.profiles += 1;
        }
        progress.update(written.profiles, None, "");
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    writer.flush().context("cannot write the export")?;
    Ok(written)
}

/// A trait value as a CSV cell, as `roster import` reads it back: strings as they are, numbers
/// and booleans as JSON writes them, objects and arrays as JSON.
fn csv_cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}
