//! The `roster` binary: configuration and startup, nothing else.

mod environments;
mod export;
mod host;
mod import;
mod progress;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use roster_core::Limits;
use std::time::Duration;

use roster_engine::{BootstrapCredentials, Engine, EngineConfig, QueryOutput};
use roster_server::ServerConfig;
use roster_store::{PostgresOptions, PostgresStore, SqliteStore, Store};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(name = "roster", version, about = "Self-hosted identity and traits service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server. On an empty data directory, first creates the `development`
    /// environment and prints its keys and the admin token, once.
    Serve(ServeArgs),
    /// Create the data directory, the `development` environment and the admin token, print them,
    /// and exit (no server).
    Init(InitArgs),
    /// Run one read-only SQL statement over the views `identities`, `events`, `trait_changes`:
    /// against a running server (`--url` and `--key`), or directly on a data directory.
    Query(QueryArgs),
    /// Manage environments' settings.
    #[command(subcommand)]
    Environments(EnvironmentsCommand),
    /// Recover the admin token on the host: `roster admin-token reset`.
    #[command(subcommand)]
    AdminToken(host::AdminTokenCommand),
    /// Environments' keys on the host: list, create, rotate.
    #[command(subcommand)]
    Keys(host::KeysCommand),
    /// A consistent copy of the embedded store, taken while it serves.
    Backup(host::BackupArgs),
    /// Put a backup in place as a data directory's store (the server stopped).
    Restore(host::RestoreArgs),
    /// Import identifies, events and aliases from NDJSON, CSV or a JSON array, directly into the
    /// store or into a running server (`--url`); refused lines go to a rejects file.
    Import(import::ImportArgs),
    /// Export profiles (and with `--events` their events) as NDJSON or CSV, from the store or a
    /// running server (`--url`).
    Export(export::ExportArgs),
}

#[derive(Debug, Subcommand)]
enum EnvironmentsCommand {
    /// Change an environment's settings (allowed browser origins, Flagsmith trait reads), on a
    /// running server (`--url`, `--admin-token`) or directly on the store.
    Set(environments::SetArgs),
}

#[derive(Debug, Args)]
struct QueryArgs {
    /// The statement, e.g. "SELECT distinct_id, traits->>'plan' FROM identities".
    sql: String,
    #[command(flatten)]
    target: TargetArgs,
    /// Output: a readable table, JSON, or CSV.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
}

/// Where a command that reads or writes data works: a running server (`--url`, `--key`), or the
/// store itself (`--data-dir` / `--store`) as `--environment`'s server key would.
#[derive(Debug, Args)]
struct TargetArgs {
    /// A running Roster's base URL; without it the data directory (or `--store`) is used directly.
    #[arg(long, env = "ROSTER_URL")]
    url: Option<String>,
    /// The environment's key, with `--url`: its server key (`import` takes a client key too).
    #[arg(long, env = "ROSTER_SERVER_KEY")]
    key: Option<String>,
    /// The environment to work on, without `--url`.
    #[arg(long, default_value = "development")]
    environment: String,
    #[command(flatten)]
    store: StoreArgs,
}

impl TargetArgs {
    /// The key `--url` needs, or an error saying which one to pass.
    fn remote_key(&self, which: &str) -> anyhow::Result<String> {
        self.key.clone().with_context(|| format!("--url needs --key (the environment's {which})"))
    }

    /// The engine over the store, and server-key rights on `--environment`: whoever can open the
    /// store can read it all anyway.
    async fn open_locally(&self, config: EngineConfig) -> anyhow::Result<(Arc<Engine>, roster_engine::Principal)> {
        let engine = open_engine(&self.store, config).await?;
        let principal = engine.local_principal(&self.environment).with_context(|| {
            format!(
                "no environment `{}` in {} (a new data directory needs `roster init` first)",
                self.environment,
                self.store.describe()
            )
        })?;
        Ok((engine, principal))
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// Where the embedded store keeps its files.
    #[arg(long, env = "ROSTER_DATA_DIR", default_value = "./roster-data")]
    data_dir: PathBuf,
    /// `postgres://user@host:port/database` to keep everything in PostgreSQL instead of the
    /// embedded store (several nodes may share one database).
    #[arg(long, env = "ROSTER_STORE")]
    store: Option<String>,
    /// The PostgreSQL schema Roster's tables live in (created if missing).
    #[arg(long, env = "ROSTER_POSTGRES_SCHEMA", default_value = "public")]
    postgres_schema: String,
    /// Connections this node opens to PostgreSQL.
    #[arg(long, env = "ROSTER_POSTGRES_MAX_CONNECTIONS", default_value_t = 16)]
    postgres_max_connections: usize,
}

impl StoreArgs {
    /// Where the data is, for messages (never the password).
    fn describe(&self) -> String {
        match &self.store {
            Some(url) => format!("the PostgreSQL database {}", redact_password(url)),
            None => self.data_dir.display().to_string(),
        }
    }
}

/// A connection URL with its password hidden.
fn redact_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Address to listen on (`127.0.0.1:0` picks a free port; the chosen address is printed).
    #[arg(long, env = "ROSTER_LISTEN", default_value = "127.0.0.1:7400")]
    listen: String,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "ROSTER_MAX_BODY_BYTES", default_value_t = ServerConfig::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Most items in one batch request (native arrays, Segment, Customer.io, Flagsmith bulk).
    #[arg(long, env = "ROSTER_MAX_BATCH_ITEMS", default_value_t = ServerConfig::default().max_batch_items)]
    max_batch_items: usize,
    /// Most requests served at once; past it, 503 with Retry-After.
    #[arg(long, env = "ROSTER_MAX_REQUESTS_IN_FLIGHT", default_value_t = ServerConfig::default().max_requests_in_flight)]
    max_requests_in_flight: usize,
    /// Most request-body bytes held in memory at once; past it, 503 with Retry-After.
    #[arg(long, env = "ROSTER_MAX_BODY_BYTES_IN_FLIGHT", default_value_t = ServerConfig::default().max_body_bytes_in_flight)]
    max_body_bytes_in_flight: usize,
    /// Longest a client may take to send a request body, in milliseconds.
    #[arg(long, env = "ROSTER_BODY_READ_TIMEOUT_MS", default_value_t = millis(ServerConfig::default().body_read_timeout))]
    body_read_timeout_ms: u64,
    /// Longest a client may take to send request headers, and longest an idle connection stays
    /// open, in milliseconds.
    #[arg(long, env = "ROSTER_HEADER_READ_TIMEOUT_MS", default_value_t = millis(ServerConfig::default().header_read_timeout))]
    header_read_timeout_ms: u64,
    /// Most open client connections (lowered to fit the process's open-file limit).
    #[arg(long, env = "ROSTER_MAX_CONNECTIONS", default_value_t = ServerConfig::default().max_connections)]
    max_connections: usize,
    /// Where `GET /metrics` is served: on the main listener when unset, on this address instead
    /// (e.g. `0.0.0.0:9400` for a scraper on another interface), or nowhere with `off`.
    #[arg(long, env = "ROSTER_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    /// A resent message id within this many hours is applied once.
    #[arg(long, env = "ROSTER_DEDUP_WINDOW_HOURS", default_value_t = 24)]
    dedup_window_hours: u64,
    /// Days of trait history kept; 0 keeps it forever.
    #[arg(long, env = "ROSTER_TRAIT_HISTORY_DAYS", default_value_t = 365)]
    trait_history_days: u64,
    /// Longest a SQL query may run, in milliseconds.
    #[arg(long, env = "ROSTER_QUERY_TIMEOUT_MS", default_value_t = 10_000)]
    query_timeout_ms: u64,
    /// Most rows a SQL query answers.
    #[arg(long, env = "ROSTER_QUERY_MAX_ROWS", default_value_t = 10_000)]
    query_max_rows: usize,
    /// SQL queries running at once over all environments (default: one per core, at least 2).
    #[arg(long, env = "ROSTER_QUERY_CONCURRENCY", default_value_t = roster_engine::default_query_concurrency().0)]
    query_concurrency: usize,
    /// SQL queries running at once in one environment, so that one cannot starve the others
    /// (default: half of `--query-concurrency`).
    #[arg(
        long,
        env = "ROSTER_QUERY_CONCURRENCY_PER_ENVIRONMENT",
        default_value_t = roster_engine::default_query_concurrency().1
    )]
    query_concurrency_per_environment: usize,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl ServeArgs {
    fn server_config(&self) -> ServerConfig {
        ServerConfig {
            max_body_bytes: self.max_body_bytes,
            max_batch_items: self.max_batch_items,
            max_requests_in_flight: self.max_requests_in_flight,
            max_body_bytes_in_flight: self.max_body_bytes_in_flight,
            body_read_timeout: Duration::from_millis(self.body_read_timeout_ms),
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            max_connections: self.max_connections,
            serve_metrics: self.metrics_listen.is_none(),
        }
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            limits: self.limits.limits(),
            dedup_window: Duration::from_secs(self.dedup_window_hours * 3600),
            trait_history_retention: (self.trait_history_days > 0)
                .then(|| Duration::from_secs(self.trait_history_days * 24 * 3600)),
            query_timeout: Duration::from_millis(self.query_timeout_ms),
            query_max_rows: self.query_max_rows,
            query_concurrency: self.query_concurrency,
            query_concurrency_per_environment: self.query_concurrency_per_environment,
        }
    }
}

#[derive(Debug, Args)]
struct InitArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print the credentials as JSON: {"admin_token":…, "environments":[{"slug","client_key","server_key"}]}.
    #[arg(long)]
    json: bool,
}

/// Limits on what one write may store (DESIGN.md, identify contract item 4).
#[derive(Debug, Args)]
struct LimitArgs {
    /// Longest string value inside a trait, in bytes.
    #[arg(long, env = "ROSTER_MAX_TRAIT_STRING_BYTES", default_value_t = Limits::default().max_string_bytes)]
    max_trait_string_bytes: usize,
    /// Longest trait key, in bytes.
    #[arg(long, env = "ROSTER_MAX_TRAIT_KEY_BYTES", default_value_t = Limits::default().max_key_bytes)]
    max_trait_key_bytes: usize,
    /// Deepest nesting of objects/arrays in one trait value.
    #[arg(long, env = "ROSTER_MAX_TRAIT_DEPTH", default_value_t = Limits::default().max_depth)]
    max_trait_depth: usize,
    /// Most live traits per profile.
    #[arg(long, env = "ROSTER_MAX_TRAITS_PER_PROFILE", default_value_t = Limits::default().max_traits_per_profile)]
    max_traits_per_profile: usize,
    /// Largest serialized size of one profile's traits, in bytes.
    #[arg(long, env = "ROSTER_MAX_PROFILE_BYTES", default_value_t = Limits::default().max_profile_bytes)]
    max_profile_bytes: usize,
    /// Longest identifier (user id, anonymous id), in bytes.
    #[arg(long, env = "ROSTER_MAX_IDENTIFIER_BYTES", default_value_t = Limits::default().max_identifier_bytes)]
    max_identifier_bytes: usize,
    /// Largest serialized properties of one event, in bytes.
    #[arg(long, env = "ROSTER_MAX_EVENT_BYTES", default_value_t = Limits::default().max_event_bytes)]
    max_event_bytes: usize,
    /// Most identifiers (user id, anonymous ids, email) per profile.
    #[arg(long, env = "ROSTER_MAX_IDENTIFIERS_PER_PROFILE", default_value_t = Limits::default().max_identifiers_per_profile)]
    max_identifiers_per_profile: usize,
    /// Most profiles merged into one profile over its life.
    #[arg(long, env = "ROSTER_MAX_MERGES_PER_PROFILE", default_value_t = Limits::default().max_merges_per_profile)]
    max_merges_per_profile: usize,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_string_bytes: self.max_trait_string_bytes,
            max_key_bytes: self.max_trait_key_bytes,
            max_depth: self.max_trait_depth,
            max_traits_per_profile: self.max_traits_per_profile,
            max_profile_bytes: self.max_profile_bytes,
            max_identifier_bytes: self.max_identifier_bytes,
            max_event_bytes: self.max_event_bytes,
            max_identifiers_per_profile: self.max_identifiers_per_profile,
            max_merges_per_profile: self.max_merges_per_profile,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROSTER_LOG").unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Init(args) => init(args).await,
            Command::Query(args) => query(args).await,
            Command::Environments(EnvironmentsCommand::Set(args)) => environments::set(args).await,
            Command::AdminToken(command) => host::admin_token(command).await,
            Command::Keys(command) => host::keys(command).await,
            Command::Backup(args) => host::backup(args),
            Command::Restore(args) => host::restore(args),
            Command::Import(args) => import::import(args).await,
            Command::Export(args) => export::export(args).await,
        }
    })
}

async fn open_engine(store: &StoreArgs, config: EngineConfig) -> anyhow::Result<Arc<Engine>> {
    let opened: Arc<dyn Store> = match &store.store {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let options = PostgresOptions {
                url: url.clone(),
                schema: Some(store.postgres_schema.clone()),
                max_connections: store.postgres_max_connections,
            };
            Arc::new(
                PostgresStore::connect(options).await.with_context(|| format!("cannot open {}", store.describe()))?,
            )
        }
        Some(other) => anyhow::bail!(
            "--store must be a postgres:// URL (leave it out for the embedded store), not `{}`",
            redact_password(other)
        ),
        None => Arc::new(
            SqliteStore::open(&store.data_dir)
                .with_context(|| format!("cannot open the embedded store in {}", store.data_dir.display()))?,
        ),
    };
    let engine = Engine::new(opened, config).await.context("cannot load environments")?;
    Ok(Arc::new(engine))
}

async fn init(args: InitArgs) -> anyhow::Result<()> {
    let engine = open_engine(&args.store, EngineConfig::default()).await?;
    let Some(credentials) = engine.bootstrap_if_empty().await? else {
        anyhow::bail!(
            "{} is already initialised; its keys were printed when it was created (rotate them with the admin API)",
            args.store.describe()
        );
    };
    if args.json {
        println!("{}", serde_json::to_string(&credentials)?);
    } else {
        print_credentials(&credentials);
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Bound first: a taken port fails before a first start creates (and prints) credentials that
    // nobody would see again.
    let listener =
        TcpListener::bind(&args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    if let Some(metrics_listen) = args.metrics_listen.as_deref().filter(|address| *address != "off") {
        let metrics_listener = TcpListener::bind(metrics_listen)
            .await
            .with_context(|| format!("cannot listen for metrics on {metrics_listen}"))?;
        println!("roster metrics listening on http://{}/metrics", metrics_listener.local_addr()?);
        tokio::spawn(roster_server::serve_metrics(metrics_listener));
    }
    let _served_directory = match args.store.store {
        None => Some(host::lock_served_directory(&args.store.data_dir)?),
        Some(_) => None,
    };
    let engine = open_engine(&args.store, args.engine_config()).await?;
    if let Some(credentials) = engine.bootstrap_if_empty().await? {
        print_credentials(&credentials);
    }
    let _maintenance = engine.spawn_maintenance(MAINTENANCE_INTERVAL);
    let _memory_trimmer = tokio::spawn(return_freed_memory());
    // Keys and flags changed outside this process — by other nodes on PostgreSQL, or by
    // `roster keys rotate` / `admin-token reset` on the host — take effect within this bound.
    let _shared_state_refresh = engine.spawn_shared_state_refresh(SHARED_STATE_REFRESH_INTERVAL);
    let address = listener.local_addr()?;
    println!("roster listening on http://{address}");
    std::io::stdout().flush()?;
    let mut config = args.server_config();
    let open_file_limit = raise_open_file_limit();
    if let Some(limit) = open_file_limit {
        let fitting = usize::try_from(limit.saturating_sub(RESERVED_FILE_DESCRIPTORS)).unwrap_or(usize::MAX).max(1);
        if config.max_connections > fitting {
            tracing::warn!(
                max_connections = config.max_connections,
                open_file_limit = limit,
                lowered_to = fitting,
                "max connections lowered to fit the open-file limit"
            );
            config.max_connections = fitting;
        }
    }
    roster_server::serve(listener, engine, config, shutdown_signal()).await.context("server failed")?;
    tracing::info!("roster stopped");
    Ok(())
}

/// File descriptors kept for everything but client connections: the store's files, PostgreSQL
/// connections, the listener.
const RESERVED_FILE_DESCRIPTORS: u64 = 256;

/// Raises the soft open-file limit to the hard one, since every connection holds a descriptor and
/// the usual soft default (1024) is far below what the server may keep open. Answers the soft
/// limit now in force (`None` if it cannot be read).
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given, which lives on this frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return Some(limit.rlim_cur);
    }
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(soft = limit.rlim_cur, hard = limit.rlim_max, "the open-file limit could not be raised");
        return Some(limit.rlim_cur);
    }
    tracing::debug!(from = limit.rlim_cur, to = limit.rlim_max, "open-file limit raised");
    Some(limit.rlim_max)
}

/// How often the allocator is asked how much freed memory it holds.
const MEMORY_TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// Freed memory the allocator may keep for reuse before it is handed back to the system.
const MEMORY_TRIM_THRESHOLD_BYTES: usize = 32 * 1024 * 1024;

/// Hands memory freed after a burst of requests back to the system. glibc's malloc keeps freed
/// memory in its per-thread arenas (resident memory stays at the burst's peak); `malloc_trim`
/// releases the free pages of every arena. It is called only when much is free, so quiet and
/// steady servers never pay for it.
async fn return_freed_memory() {
    let mut interval = tokio::time::interval(MEMORY_TRIM_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let _ = tokio::task::spawn_blocking(trim_if_much_is_free).await;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_if_much_is_free() {
    // SAFETY: mallinfo2 and malloc_trim take no pointers and only lock the allocator's arenas.
    let free_bytes = unsafe { libc::mallinfo2() }.fordblks;
    if free_bytes < MEMORY_TRIM_THRESHOLD_BYTES {
        return;
    }
    // SAFETY: as above.
    unsafe { libc::malloc_trim(0) };
    tracing::debug!(free_bytes, "freed memory returned to the system");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_if_much_is_free() {}

/// How often expired message ids and trait history are purged.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(600);

/// How often a node sharing its database checks for keys and flags changed elsewhere.
const SHARED_STATE_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

async fn query(args: QueryArgs) -> anyhow::Result<()> {
    let output = match &args.target.url {
        Some(url) => {
            let key = args.target.remote_key("server key")?;
            let response = reqwest::Client::new()
                .post(format!("{}/v1/query", url.trim_end_matches('/')))
                .header("X-API-Key", key)
                .json(&serde_json::json!({ "sql": args.sql }))
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?;
            let status = response.status();
            let body: serde_json::Value = response.json().await.context("the server's answer is not JSON")?;
            if !status.is_success() {
                anyhow::bail!(
                    "{} ({})",
                    body["message"].as_str().unwrap_or("query failed"),
                    body["code"].as_str().unwrap_or("")
                );
            }
            serde_json::from_value::<RemoteOutput>(body).context("unexpected answer shape")?.into()
        }
        None => {
            let (engine, principal) = args.target.open_locally(EngineConfig::default()).await?;
            engine.query(&principal, &args.sql).await.map_err(|error| anyhow::anyhow!("{error}"))?
        }
    };
    match args.format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({ "columns": output.columns, "rows": output.rows, "truncated": output.truncated })
        ),
        OutputFormat::Csv => print!("{}", roster_server::csv(&output)),
        OutputFormat::Table => print!("{}", table(&output)),
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct RemoteOutput {
    columns: Vec<String>,
    rows: Vec<Vec<serde_json::Value>>,
    truncated: bool,
}

impl From<RemoteOutput> for QueryOutput {
    fn from(remote: RemoteOutput) -> Self {
        QueryOutput { columns: remote.columns, rows: remote.rows, truncated: remote.truncated }
    }
}

/// A plain-text table with aligned columns and a row count.
fn table(output: &QueryOutput) -> String {
    let cell = |value: &serde_json::Value| match value {
        serde_json::Value::Null => "NULL".to_owned(),
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let cells: Vec<Vec<String>> = output.rows.iter().map(|row| row.iter().map(cell).collect()).collect();
    let widths: Vec<usize> = (0..output.columns.len())
        .map(|index| {
            cells
                .iter()
                .map(|row| row[index].chars().count())
                .chain([output.columns[index].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: &[String]| -> String {
        let padded: Vec<String> =
            values.iter().zip(&widths).map(|(value, width)| format!("{value:<width$}", width = *width)).collect();
        format!("{}\n", padded.join(" | ").trim_end())
    };
    let mut text = line(&output.columns);
    text.push_str(&format!("{}\n", widths.iter().map(|width| "-".repeat(*width)).collect::<Vec<_>>().join("-+-")));
    for row in &cells {
        text.push_str(&line(row));
    }
    let count = output.rows.len();
    text.push_str(&format!(
        "({count} row{}{})\n",
        if count == 1 { "" } else { "s" },
        if output.truncated { ", truncated" } else { "" }
    ));
    text
}

fn print_credentials(credentials: &BootstrapCredentials) {
    println!("roster: first start, created these credentials. They are shown once; keep them now.");
    println!("  (lost them? on this host: `roster admin-token reset`, `roster keys rotate <slug>`)");
    println!("  admin token: {}", credentials.admin_token);
    for environment in &credentials.environments {
        println!("  environment `{}`", environment.slug);
        println!("    client key: {}", environment.client_key);
        println!("    server key: {}", environment.server_key);
    }
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
