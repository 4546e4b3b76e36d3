//! `roster-bench`: identify ingest through real HTTP against an in-process Roster on the embedded
//! store, and, in the same run, a bare SQLite program doing the equivalent durable upserts, so the
//! ratio between them is measured on the same machine at the same moment.
//!
//! `roster-bench query` measures SQL on the embedded store: a group-by over many identities and a
//! user's latest events among many events.
//!
//! `roster-bench flags` measures flag evaluation against Flagsmith's reference engine.
//!
//! Run: `cargo run --release -p roster-bench -- --help`. Not a test: it prints figures and compares
//! them with the targets in DESIGN.md; it fails only if something errors.

mod flags;
mod postgres;
mod same_work;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use roster_engine::{Engine, EngineConfig};
use roster_server::ServerConfig;
use roster_store::SqliteStore;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "Roster benchmarks: identify/track ingest over HTTP vs bare SQLite, and SQL on the embedded store")]
struct Cli {
    #[command(subcommand)]
    bench: Option<Bench>,
    #[command(flatten)]
    ingest: Options,
}

#[derive(Debug, clap::Subcommand)]
enum Bench {
    /// Ingest (the default): batched identify, batched track, single sync identify, bare SQLite.
    Ingest,
    /// SQL: GROUP BY over identities, a user's last 50 events.
    Query(QueryOptions),
    /// Flag evaluation: Roster's compiled evaluator vs Flagsmith's reference engine.
    Flags(flags::FlagsOptions),
    /// Identify ingest on PostgreSQL: one node, two nodes, and bare upserts on the same database.
    Postgres(postgres::PostgresBenchOptions),
}

#[derive(Debug, clap::Args)]
struct QueryOptions {
    /// Identities loaded before measuring.
    #[arg(long, default_value_t = 1_000_000)]
    identities: usize,
    /// Events loaded before measuring (spread over the identities).
    #[arg(long, default_value_t = 10_000_000)]
    events: usize,
    /// Per-user lookups measured.
    #[arg(long, default_value_t = 200)]
    lookups: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct Options {
    /// Identifies sent in the batched-ingest phase (and upserted by the bare SQLite baseline).
    #[arg(long, default_value_t = 200_000)]
    identifies: usize,
    /// Identifies per batch request (and per baseline transaction).
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Concurrent HTTP clients in the batched phase.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Target rate of single `sync=true` identifies, per second.
    #[arg(long, default_value_t = 2_000)]
    single_rate: u64,
    /// How long the single-identify phase runs, in seconds.
    #[arg(long, default_value_t = 5)]
    single_seconds: u64,
    /// Distinct users; identifies beyond this count update existing profiles.
    #[arg(long, default_value_t = 100_000)]
    users: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Server-side errors during a run are worth seeing (`ROSTER_LOG=debug` for more).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("ROSTER_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Some(Bench::Flags(options)) = &cli.bench {
        return flags::flags_bench(options);
    }
    if let Some(Bench::Postgres(options)) = &cli.bench {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return runtime.block_on(postgres::postgres_bench(options));
    }
    if let Some(Bench::Query(options)) = &cli.bench {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return runtime.block_on(query_bench(options));
    }
    let options = cli.ingest;
    if options.batch_size == 0 || options.clients == 0 || options.users == 0 {
        bail!("--batch-size, --clients and --users must be positive");
    }
    println!("roster-bench: {options:?}");
    let bare = bare_sqlite_upserts(&options)?;
    let same_work = same_work::bare_sqlite_same_work(&options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let store_only = runtime.block_on(store_phase(&options))?;
    let (batched, tracked, single) = runtime.block_on(roster_phases(&options))?;

    println!();
    println!("== results ==");
    println!("bare sqlite upserts (durable, {} per commit): {:>10.0} rows/s", options.batch_size, bare);
    println!("roster store only (no HTTP, same batches):   {:>10.0} identifies/s", store_only);
    println!(
        "roster batched identify over HTTP:            {:>10.0} identifies/s  (request p50 {:.2} ms, p99 {:.2} ms)",
        batched.per_second, batched.p50_ms, batched.p99_ms
    );
    println!("bare sqlite, same work per identify:          {:>10.0} identifies/s", same_work);
    println!("ratio roster / bare one-table upserts:        {:>10.2}", batched.per_second / bare);
    println!(
        "ratio roster / bare same work:                {:>10.2}   (target ≥ 0.70: {})",
        batched.per_second / same_work,
        verdict(batched.per_second / same_work >= 0.70)
    );
    println!("target 150k identifies/s batched:             {}", verdict(batched.per_second >= 150_000.0));
    println!(
        "roster batched track over HTTP:               {:>10.0} events/s      (request p50 {:.2} ms, p99 {:.2} ms)",
        tracked.per_second, tracked.p50_ms, tracked.p99_ms
    );
    println!(
        "single sync=true identify at {}/s offered:    achieved {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 < 1 ms: {})",
        options.single_rate,
        single.per_second,
        single.p50_ms,
        single.p99_ms,
        single.max_ms,
        verdict(single.p99_ms < 1.0)
    );
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

struct Figures {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1_000.0
}

fn figures(count: usize, elapsed: Duration, mut latencies: Vec<Duration>) -> Figures {
    latencies.sort();
    Figures {
        per_second: count as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().map(|max| max.as_secs_f64() * 1_000.0).unwrap_or_default(),
    }
}

/// The traits of identify number `index`: three typed traits, the same shape for both sides.
fn traits_of(index: usize) -> serde_json::Value {
    json!({ "plan": if index.is_multiple_of(3) { "pro" } else { "free" }, "seats": index % 50, "score": (index % 1000) as f64 / 10.0 })
}

/// The baseline: what a hand-written program does for the same work. One table keyed by user id,
/// an upsert that patches the traits JSON, WAL with `synchronous=FULL`, `batch_size` rows per
/// commit: the same durability Roster gives.
fn bare_sqlite_upserts(options: &Options) -> anyhow::Result<f64> {
    let directory = tempfile::tempdir()?;
    let connection = rusqlite::Connection::open(directory.path().join("bare.db"))?;
    connection.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE profiles (user_id TEXT PRIMARY KEY, traits TEXT NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID;",
    )?;
    let rows: Vec<(String, String)> = (0..options.identifies)
        .map(|index| (format!("user-{}", index % options.users), traits_of(index).to_string()))
        .collect();
    let started = Instant::now();
    for chunk in rows.chunks(options.batch_size) {
        let transaction = connection.unchecked_transaction()?;
        {
            let mut upsert = transaction.prepare_cached(
                "INSERT INTO profiles (user_id, traits, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (user_id) DO UPDATE SET traits = json_patch(profiles.traits, excluded.traits), updated_at = excluded.updated_at",
            )?;
            for (user_id, traits) in chunk {
                upsert.execute(rusqlite::params![user_id, traits, 1_i64])?;
            }
        }
        transaction.commit()?;
    }
    let per_second = options.identifies as f64 / started.elapsed().as_secs_f64();
    println!("bare sqlite: {} upserts in {:.2?}", options.identifies, started.elapsed());
    Ok(per_second)
}

/// The embedded store alone, without HTTP and JSON: shows how the cost splits between the write
/// path and the transport.
async fn store_phase(options: &Options) -> anyhow::Result<f64> {
    use roster_core::{IdentifyCommand, Limits, Timestamp};
    use roster_store::Store;
    let directory = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open(directory.path())?);
    let environment = bench_environment(store.as_ref()).await?;
    let batches: Vec<Vec<IdentifyCommand>> = (0..options.identifies)
        .collect::<Vec<_>>()
        .chunks(options.batch_size)
        .map(|chunk| {
            chunk
                .iter()
                .map(|index| {
                    let traits = traits_of(*index).as_object().cloned().unwrap_or_default();
                    IdentifyCommand::new(
                        Some(format!("user-{}", index % options.users)),
                        None,
                        traits,
                        Default::default(),
                        Timestamp::from_micros(*index as i64),
                        &Limits::default(),
                    )
                    .expect("valid")
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    let batches = Arc::new(std::sync::Mutex::new(batches.into_iter()));
    for _ in 0..options.clients {
        let (store, batches) = (Arc::clone(&store), Arc::clone(&batches));
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(batch) = batches.lock().expect("lock").next() else { return Ok::<_, anyhow::Error>(()) };
                store.identify(environment.id, batch, roster_store::WritePolicy::default()).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    println!("roster store only: {} identifies in {elapsed:.2?}", options.identifies);
    Ok(options.identifies as f64 / elapsed.as_secs_f64())
}

async fn roster_phases(options: &Options) -> anyhow::Result<(Figures, Figures, Figures)> {
    let directory = tempfile::tempdir()?;
    let store = SqliteStore::open(directory.path())?;
    let engine = Arc::new(Engine::new(Arc::new(store), EngineConfig::default()).await?);
    let credentials = engine.bootstrap_if_empty().await?.context("fresh store bootstraps")?;
    let client_key = credentials.environments[0].client_key.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base_url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(roster_server::serve(listener, engine, ServerConfig::default(), std::future::pending()));
    let http = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;

    let base_urls = [base_url.clone()];
    let batched = batched_phase(
        options,
        &http,
        &base_urls,
        &client_key,
        "/identify",
        |index, user| json!({ "distinct_id": user, "traits": traits_of(index) }),
    )
    .await?;
    let tracked = batched_phase(options, &http, &base_urls, &client_key, "/track", |index, user| {
        json!({ "event": "Page Viewed", "distinct_id": user, "properties": { "path": format!("/page/{}", index % 100), "n": index } })
    })
    .await?;
    let single = single_phase(options, &http, &base_url, &client_key).await?;
    Ok((batched, tracked, single))
}

/// Posts pre-built batches from `options.clients` clients; client `n` talks to
/// `base_urls[n % len]` (several URLs: several nodes).
async fn batched_phase(
    options: &Options,
    http: &reqwest::Client,
    base_urls: &[String],
    client_key: &str,
    path: &str,
    item: impl Fn(usize, String) -> serde_json::Value,
) -> anyhow::Result<Figures> {
    // Bodies are built before the clock starts: the client's own serialization is not Roster's cost.
    let bodies: Vec<bytes::Bytes> = (0..options.identifies)
        .collect::<Vec<_>>()
        .chunks(options.batch_size)
        .map(|chunk| {
            let batch: Vec<_> =
                chunk.iter().map(|index| item(*index, format!("user-{}", index % options.users))).collect();
            bytes::Bytes::from(serde_json::to_vec(&batch).expect("serialize"))
        })
        .collect();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for client in 0..options.clients {
        let url = format!("{}{path}", base_urls[client % base_urls.len()]);
        let (bodies, next, http, client_key) =
            (Arc::clone(&bodies), Arc::clone(&next), http.clone(), client_key.to_owned());
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(index) else { return Ok::<_, anyhow::Error>(latencies) };
                let sent = Instant::now();
                let response = http
                    .post(&url)
                    .header("X-API-Key", &client_key)
                    .header("Content-Type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("batch rejected: {} {}", response.status(), response.text().await.unwrap_or_default());
                }
                response.bytes().await?;
                latencies.push(sent.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await??);
    }
    let elapsed = started.elapsed();
    println!("roster batched {path}: {} items in {:.2?} ({} requests)", options.identifies, elapsed, latencies.len());
    Ok(figures(options.identifies, elapsed, latencies))
}

/// Open-loop load: requests start on a fixed schedule whatever the latency, so slow answers show up
/// as latency instead of silently lowering the rate.
async fn single_phase(
    options: &Options,
    http: &reqwest::Client,
    base_url: &str,
    client_key: &str,
) -> anyhow::Result<Figures> {
    let total = (options.single_rate * options.single_seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / options.single_rate as f64);
    let url = format!("{base_url}/identify?sync=true");
    // Warm the connection pool so the measured phase does not pay for TCP set-up.
    let warm_up: Vec<_> = (0..64)
        .map(|index| {
            let (http, url, client_key) = (http.clone(), url.clone(), client_key.to_owned());
            tokio::spawn(async move {
                let body = json!({ "distinct_id": format!("warm-{index}"), "traits": traits_of(index) }).to_string();
                http.post(&url).header("X-API-Key", client_key).body(body).send().await.map(|_| ())
            })
        })
        .collect();
    for task in warm_up {
        task.await??;
    }
    let started = Instant::now();
    let mut requests = Vec::with_capacity(total);
    for index in 0..total {
        let due = started + interval * index as u32;
        tokio::time::sleep_until(due.into()).await;
        let (http, url, client_key) = (http.clone(), url.clone(), client_key.to_owned());
        let body = json!({ "distinct_id": format!("single-{}", index % options.users), "traits": traits_of(index) })
            .to_string();
        requests.push(tokio::spawn(async move {
            let sent = Instant::now();
            let response = http
                .post(&url)
                .header("X-API-Key", client_key)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("identify rejected: {}", response.status());
            }
            response.bytes().await?;
            Ok::<_, anyhow::Error>(sent.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for request in requests {
        latencies.push(request.await??);
    }
    let elapsed = started.elapsed();
    println!("roster single sync=true: {total} identifies in {elapsed:.2?}");
    Ok(figures(total, elapsed, latencies))
}

/// The one environment a store-level benchmark writes to.
async fn bench_environment(store: &SqliteStore) -> anyhow::Result<roster_store::EnvironmentRecord> {
    use roster_store::Store;
    let environment = roster_store::NewEnvironment {
        slug: "bench".into(),
        name: "bench".into(),
        client_key: "bench".into(),
        server_key_hash: "bench".into(),
        created_at: roster_core::Timestamp::from_micros(0),
    };
    Ok(store.create_environment(environment).await?)
}

/// Loads `identities` profiles and `events` events straight into a fresh store file (setup, not
/// measured: the same rows the write path produces, written in large unsynchronised
/// transactions), then measures SQL through the store's query path, views and guards included.
async fn query_bench(options: &QueryOptions) -> anyhow::Result<()> {
    use roster_store::{QueryBounds, Store};
    let directory = tempfile::tempdir()?;
    let store = SqliteStore::open(directory.path())?;
    let environment = bench_environment(&store).await?;
    let loading = Instant::now();
    load_rows(store.database_path(), environment.id, options)?;
    println!("loaded {} identities and {} events in {:.2?}", options.identities, options.events, loading.elapsed());
    let bounds = QueryBounds { timeout: Duration::from_secs(60), max_rows: 100_000 };

    let group_by = "SELECT traits->>'plan' AS plan, count(*) AS identities FROM identities GROUP BY traits->>'plan' ORDER BY 2 DESC";
    let mut group_by_times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let output = store.query(environment.id, group_by, bounds.clone()).await?;
        group_by_times.push(started.elapsed());
        if group_by_times.len() == 1 {
            println!("group-by answer: {:?}", output.rows);
        }
    }
    let mut lookup_times = Vec::new();
    for lookup in 0..options.lookups {
        let user = (lookup * 7919) % options.identities.min(options.events);
        let sql = format!(
            "SELECT e.event, e.properties, e.timestamp, e.identity_traits->>'plan' AS plan FROM events e \
             WHERE e.distinct_id = 'user-{user}' ORDER BY e.timestamp DESC LIMIT 50"
        );
        let started = Instant::now();
        let output = store.query(environment.id, &sql, bounds.clone()).await?;
        lookup_times.push(started.elapsed());
        if output.rows.is_empty() {
            bail!("user-{user} has no events");
        }
    }
    group_by_times.sort();
    lookup_times.sort();
    let group_by_median = percentile(&group_by_times, 0.5);
    let lookup_p50 = percentile(&lookup_times, 0.5);
    let lookup_p99 = percentile(&lookup_times, 0.99);
    println!();
    println!("== results ==");
    println!(
        "GROUP BY traits->>'plan' over {} identities: median {:.1} ms (target < 1000 ms: {})",
        options.identities,
        group_by_median,
        verdict(group_by_median < 1000.0)
    );
    println!(
        "a user's last 50 events among {} events: p50 {:.2} ms, p99 {:.2} ms (target < 10 ms: {})",
        options.events,
        lookup_p50,
        lookup_p99,
        verdict(lookup_p99 < 10.0)
    );
    Ok(())
}

fn load_rows(database: &std::path::Path, environment_id: i64, options: &QueryOptions) -> anyhow::Result<()> {
    let connection = rusqlite::Connection::open(database)?;
    connection.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")?;
    let plans = ["free", "starter", "pro", "team", "enterprise"];
    let profile_id = |user: usize| format!("00000000-0000-7000-8000-{user:012}");
    for chunk_start in (0..options.identities).step_by(100_000) {
        let transaction = connection.unchecked_transaction()?;
        {
            let mut profile = transaction.prepare(
                "INSERT INTO profiles (environment_id, profile_id, user_id, identified, traits, trait_timestamps, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, 1, ?4, ?5, 0, 0)",
            )?;
            let mut identifier = transaction.prepare(
                "INSERT INTO identifiers (environment_id, kind, value, profile_id) VALUES (?1, 'user_id', ?2, ?3)",
            )?;
            for user in chunk_start..(chunk_start + 100_000).min(options.identities) {
                let traits = json!({ "plan": plans[user % plans.len()], "seats": user % 50, "email": format!("user{user}@example.com") });
                let timestamps = json!({ "plan": 1, "seats": 1, "email": 1 });
                profile.execute(rusqlite::params![
                    environment_id,
                    profile_id(user),
                    format!("user-{user}"),
                    traits.to_string(),
                    timestamps.to_string()
                ])?;
                identifier.execute(rusqlite::params![environment_id, format!("user-{user}"), profile_id(user)])?;
            }
        }
        transaction.commit()?;
    }
    for chunk_start in (0..options.events).step_by(200_000) {
        let transaction = connection.unchecked_transaction()?;
        {
            let mut event = transaction.prepare(
                "INSERT INTO events (environment_id, event_id, profile_id, distinct_id, anonymous_id, event, properties, \
                 timestamp, received_at, identity_traits, message_id) VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7, ?7, ?8, NULL)",
            )?;
            for index in chunk_start..(chunk_start + 200_000).min(options.events) {
                let user = index % options.identities;
                let traits = json!({ "plan": plans[user % plans.len()], "email": format!("user{user}@example.com") });
                event.execute(rusqlite::params![
                    environment_id,
                    format!("00000000-0000-7000-9000-{index:012}"),
                    profile_id(user),
                    format!("user-{user}"),
                    if index % 3 == 0 { "Page Viewed" } else { "Clicked" },
                    json!({ "n": index }).to_string(),
                    i64::try_from(index).unwrap_or(i64::MAX) * 1_000,
                    traits.to_string(),
                ])?;
            }
        }
        transaction.commit()?;
    }
    connection.execute_batch("ANALYZE;")?;
    Ok(())
}
