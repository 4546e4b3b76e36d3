//! `roster-bench postgres`: batched identify over real HTTP into Roster on PostgreSQL, with one
//! node and with two nodes sharing the database, against a bare program doing the equivalent
//! upserts (one table keyed by user id, traits merged with `||`) on the same database, in the
//! same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use roster_engine::{Engine, EngineConfig};
use roster_server::ServerConfig;
use roster_store::{PostgresOptions, PostgresStore};
use serde_json::json;

use crate::{Options, batched_phase, traits_of};

#[derive(Debug, clap::Args)]
pub struct PostgresBenchOptions {
    /// The database to measure on (a scratch schema is created and dropped).
    #[arg(long, env = "ROSTER_BENCH_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    url: String,
    #[arg(long, default_value_t = 50_000)]
    identifies: usize,
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Concurrent HTTP clients (and baseline connections).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value_t = 20_000)]
    users: usize,
}

impl PostgresBenchOptions {
    fn ingest(&self) -> Options {
        Options {
            identifies: self.identifies,
            batch_size: self.batch_size,
            clients: self.clients,
            single_rate: 0,
            single_seconds: 0,
            users: self.users,
        }
    }
}

/// Runs blocking database work on a plain thread (the blocking client cannot run on Tokio's).
async fn on_thread<T: Send + 'static>(work: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    let (done, answer) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    answer.await.context("worker thread stopped")?
}

fn bare_upserts(options: &PostgresBenchOptions, schema: &str) -> anyhow::Result<f64> {
    let mut setup = postgres::Client::connect(&options.url, postgres::NoTls)?;
    setup.batch_execute(&format!(
        "CREATE SCHEMA \"{schema}\"; CREATE TABLE \"{schema}\".bench_profiles (user_id TEXT PRIMARY KEY, traits JSONB NOT NULL)"
    ))?;
    let batches: Vec<(Vec<String>, Vec<String>)> = (0..options.identifies)
        .collect::<Vec<_>>()
        .chunks(options.batch_size)
        .map(|chunk| {
            let mut rows: Vec<(String, String)> = chunk
                .iter()
                .map(|index| (format!("user-{}", index % options.users), traits_of(*index).to_string()))
                .collect();
            // Sorted, so concurrent batches lock rows in one order.
            rows.sort();
            rows.into_iter().unzip()
        })
        .collect();
    let batches = Arc::new(batches);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.clients)
        .map(|_| {
            let (batches, next, url, schema) =
                (Arc::clone(&batches), Arc::clone(&next), options.url.clone(), schema.to_owned());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
                let statement = client.prepare(&format!(
                    "INSERT INTO \"{schema}\".bench_profiles (user_id, traits) \
                     SELECT u, t::jsonb FROM unnest($1::text[], $2::text[]) AS x(u, t) \
                     ON CONFLICT (user_id) DO UPDATE SET traits = bench_profiles.traits || excluded.traits"
                ))?;
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some((users, traits)) = batches.get(index) else { return Ok(()) };
                    client.execute(&statement, &[users, traits])?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| anyhow::anyhow!("baseline worker panicked"))??;
    }
    Ok(options.identifies as f64 / started.elapsed().as_secs_f64())
}

/// Starts `nodes` in-process Roster servers on one scratch schema; their URLs and client key.
async fn start_nodes(
    options: &PostgresBenchOptions,
    schema: &str,
    nodes: usize,
) -> anyhow::Result<(Vec<String>, String)> {
    let mut urls = Vec::new();
    let mut client_key = None;
    for _ in 0..nodes {
        let store = PostgresStore::connect(PostgresOptions {
            url: options.url.clone(),
            schema: Some(schema.to_owned()),
            max_connections: 16,
        })
        .await?;
        let engine = Arc::new(Engine::new(Arc::new(store), EngineConfig::default()).await?);
        if let Some(credentials) = engine.bootstrap_if_empty().await? {
            client_key = Some(credentials.environments[0].client_key.clone());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}", listener.local_addr()?));
        tokio::spawn(roster_server::serve(listener, engine, ServerConfig::default(), std::future::pending()));
    }
    Ok((urls, client_key.context("the first node bootstraps")?))
}

fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    roster_store::drop_store_schema(&mut client, schema)?;
    Ok(())
}

pub async fn postgres_bench(options: &PostgresBenchOptions) -> anyhow::Result<()> {
    println!("roster-bench postgres: {options:?}");
    let run = std::process::id();
    let bare_schema = format!("roster_bench_bare_{run}");
    let bare = {
        let (url, schema) = (options.url.clone(), bare_schema.clone());
        let options_copy = PostgresBenchOptions { url: options.url.clone(), ..*options };
        let result = on_thread(move || bare_upserts(&options_copy, &schema)).await;
        on_thread(move || drop_schema(&url, &bare_schema)).await?;
        result?
    };
    let http = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    let mut figures = Vec::new();
    for nodes in [1, 2] {
        let schema = format!("roster_bench_{nodes}_nodes_{run}");
        let (urls, client_key) = start_nodes(options, &schema, nodes).await?;
        let measured = batched_phase(
            &options.ingest(),
            &http,
            &urls,
            &client_key,
            "/identify",
            |index, user| json!({ "distinct_id": user, "traits": traits_of(index) }),
        )
        .await;
        let url = options.url.clone();
        on_thread(move || drop_schema(&url, &schema)).await?;
        figures.push((nodes, measured?));
    }
    println!();
    println!("== results ==");
    println!(
        "bare upserts on the same PostgreSQL ({} per statement, {} connections): {bare:>9.0} rows/s",
        options.batch_size, options.clients
    );
    for (nodes, figure) in &figures {
        println!(
            "roster, {nodes} node(s), batched identify over HTTP: {:>9.0} identifies/s (request p50 {:.1} ms, p99 {:.1} ms), {:.2}× bare",
            figure.per_second,
            figure.p50_ms,
            figure.p99_ms,
            figure.per_second / bare
        );
    }
    Ok(())
}
