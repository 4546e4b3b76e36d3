//! Commands for whoever runs Roster on the host: they work on the store directly (`--data-dir` or
//! `--store`), with the rights of anyone who can open it — key recovery, environments' keys,
//! backups of the embedded store.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use roster_engine::{EngineConfig, Principal};
use roster_store::SqliteStore;

use crate::{StoreArgs, open_engine};

#[derive(Debug, Subcommand)]
pub enum AdminTokenCommand {
    /// Issue a new admin token and print it once; the old one stops working.
    Reset(StoreOnly),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List environments with their client keys (server keys are only ever shown when issued).
    List(StoreOnly),
    /// Create an environment and print its keys once.
    Create {
        slug: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Issue new client and server keys for an environment and print them once.
    Rotate {
        slug: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Args)]
pub struct StoreOnly {
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Where to write the copy (must not exist).
    #[arg(long)]
    to: PathBuf,
    /// The embedded store's data directory (PostgreSQL is backed up with its own tools).
    #[arg(long, env = "ROSTER_DATA_DIR", default_value = "./roster-data")]
    data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A file written by `roster backup`.
    #[arg(long)]
    from: PathBuf,
    #[arg(long, env = "ROSTER_DATA_DIR", default_value = "./roster-data")]
    data_dir: PathBuf,
    /// Replace the store already in the data directory (the server must be stopped).
    #[arg(long)]
    replace: bool,
}

pub async fn admin_token(command: AdminTokenCommand) -> anyhow::Result<()> {
    let AdminTokenCommand::Reset(StoreOnly { store }) = command;
    let engine = open_engine(&store, EngineConfig::default()).await?;
    let token = engine.reset_admin_token().await.map_err(|error| anyhow::anyhow!("{error}"))?;
    println!("{}", serde_json::json!({ "admin_token": token }));
    Ok(())
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    // Whoever can open the store holds every secret's hash and all data anyway: admin rights.
    let admin = Principal::Admin;
    let answer = match command {
        KeysCommand::List(StoreOnly { store }) => {
            let engine = open_engine(&store, EngineConfig::default()).await?;
            let environments = engine.environments(&admin).await.map_err(|error| anyhow::anyhow!("{error}"))?;
            let listed: Vec<_> = environments.iter().map(|environment| (**environment).clone()).collect();
            serde_json::json!({ "environments": listed })
        }
        KeysCommand::Create { slug, name, store } => {
            let engine = open_engine(&store, EngineConfig::default()).await?;
            let keys = engine
                .create_environment(&admin, &slug, name.as_deref())
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            serde_json::to_value(keys)?
        }
        KeysCommand::Rotate { slug, store } => {
            let engine = open_engine(&store, EngineConfig::default()).await?;
            let keys = engine.rotate_keys(&admin, &slug).await.map_err(|error| anyhow::anyhow!("{error}"))?;
            serde_json::to_value(keys)?
        }
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let bytes = SqliteStore::backup(&args.data_dir, &args.to)
        .with_context(|| format!("cannot back up {} to {}", args.data_dir.display(), args.to.display()))?;
    eprintln!(
        "roster: backed up {} to {} ({bytes} bytes, {:.1?})",
        args.data_dir.display(),
        args.to.display(),
        started.elapsed()
    );
    Ok(())
}

/// The file `roster serve` holds locked while it serves a data directory.
const SERVE_LOCK_FILE: &str = "roster.serve.lock";

/// Locks the data directory as served (until the returned file is dropped), or fails when
/// another server already serves it. SQLite lets other processes read and write the store (so
/// `roster query` and `roster backup` work beside a server), but a restore must not replace it.
pub fn lock_served_directory(data_directory: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(data_directory)
        .with_context(|| format!("cannot create data directory {}", data_directory.display()))?;
    let path = data_directory.join(SERVE_LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock only acts on the descriptor, which `file` keeps open.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    anyhow::ensure!(locked, "another roster serve is running on {}", data_directory.display());
    Ok(file)
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let _served = lock_served_directory(&args.data_dir).with_context(|| {
        format!("cannot restore into {} while a server runs on it; stop it first", args.data_dir.display())
    })?;
    SqliteStore::restore(&args.from, &args.data_dir, args.replace)
        .with_context(|| format!("cannot restore {} into {}", args.from.display(), args.data_dir.display()))?;
    eprintln!("roster: restored {} into {}", args.from.display(), args.data_dir.display());
    Ok(())
}
