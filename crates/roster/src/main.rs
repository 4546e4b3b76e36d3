//! The `roster` binary: configuration and startup, nothing else.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use roster_core::Limits;
use roster_engine::{BootstrapCredentials, Engine, EngineConfig};
use roster_server::ServerConfig;
use roster_store::SqliteStore;
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
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// Where the embedded store keeps its files.
    #[arg(long, env = "ROSTER_DATA_DIR", default_value = "./roster-data")]
    data_dir: PathBuf,
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
    #[command(flatten)]
    limits: LimitArgs,
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
        }
    })
}

async fn open_engine(store: &StoreArgs, limits: Limits) -> anyhow::Result<Arc<Engine>> {
    let store = SqliteStore::open(&store.data_dir)
        .with_context(|| format!("cannot open the embedded store in {}", store.data_dir.display()))?;
    let engine = Engine::new(Arc::new(store), EngineConfig { limits }).await.context("cannot load environments")?;
    Ok(Arc::new(engine))
}

async fn init(args: InitArgs) -> anyhow::Result<()> {
    let engine = open_engine(&args.store, Limits::default()).await?;
    let Some(credentials) = engine.bootstrap_if_empty().await? else {
        anyhow::bail!(
            "{} is already initialised; its keys were printed when it was created (rotate them with the admin API)",
            args.store.data_dir.display()
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
    let engine = open_engine(&args.store, args.limits.limits()).await?;
    if let Some(credentials) = engine.bootstrap_if_empty().await? {
        print_credentials(&credentials);
    }
    let listener =
        TcpListener::bind(&args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    println!("roster listening on http://{address}");
    std::io::stdout().flush()?;
    let config = ServerConfig { max_body_bytes: args.max_body_bytes };
    roster_server::serve(listener, engine, config, shutdown_signal()).await.context("server failed")?;
    tracing::info!("roster stopped");
    Ok(())
}

fn print_credentials(credentials: &BootstrapCredentials) {
    println!("roster: first start, created these credentials. They are shown once; keep them now.");
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
