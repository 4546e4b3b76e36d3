//! The embedded default backend: SQLite in WAL mode.
//!
//! Writes go through one writer thread that owns the only write connection and group-commits:
//! it takes every job waiting in its queue, runs them in one transaction (each under its own
//! savepoint, so one failing job does not take the others down), commits with
//! `synchronous=FULL` (the WAL is fsync'd before the commit returns), and only then answers each
//! job. Durability costs one fsync per group instead of one per request. Reads run on a small pool
//! of separate connections in parallel; WAL lets them proceed while the writer commits.
//!
//! Checkpoints (copying the WAL back into the database file, two more fsyncs) run on a thread of
//! their own: with SQLite's automatic checkpoint the commit that crosses the threshold does it,
//! and every request in that group waits milliseconds for it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use roster_core::flags::{FeatureDefinition, IdentityOverride, SegmentDefinition};
use roster_core::{DeviceUpdate, ErrorCode, FieldError, IdentifierKind, IdentifyCommand, Timestamp, TrackCommand};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::model::{
    Device, EnvironmentId, EnvironmentRecord, EventPage, FlagConfigRecord, MemberPage, MergeOutcome, NewEnvironment,
    Profile, ProfileFilter, ProfilePage, ProfileSelector, QueryBounds, QueryOutput, Rejection, StoredEvent,
    WritePolicy,
};
use crate::resolution::{
    EventWrite, IdentityTx, ProfileWrite, SeenMessage, StoredProfile, apply_device_delete, apply_device_upsert,
    apply_erase, apply_identifier_change, apply_identify, apply_membership_refresh, apply_merge, apply_track, resolve,
};
use crate::rows::{StoredProfileRow, identifier_kind, parse_event_cursor, parse_object};
use crate::{ItemResult, Store, StoreError, StoreResult, TrackResult};

mod flags;
mod query;

/// File name of the database inside the data directory.
pub const DATABASE_FILE_NAME: &str = "roster.db";

/// Most jobs one group commit takes; bounds the latency a commit adds to the first job in it.
const MAX_JOBS_PER_COMMIT: usize = 512;

/// Jobs waiting for the writer before senders are made to wait (back-pressure instead of
/// unbounded memory).
const WRITE_QUEUE_CAPACITY: usize = 4096;

/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 8;

/// WAL size, in pages, from which each commit asks the checkpointer to run (SQLite's own
/// automatic-checkpoint threshold, ~4 MB).
const CHECKPOINT_AFTER_WAL_PAGES: i32 = 1000;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE environments (
        environment_id INTEGER PRIMARY KEY,
        slug TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        client_key TEXT NOT NULL UNIQUE,
        server_key_hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE profiles (
        environment_id INTEGER NOT NULL,
        profile_id TEXT NOT NULL,
        user_id TEXT,
        identified INTEGER NOT NULL,
        traits TEXT NOT NULL,
        trait_timestamps TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (environment_id, profile_id)
    ) WITHOUT ROWID;
    CREATE TABLE identifiers (
        environment_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        PRIMARY KEY (environment_id, kind, value)
    ) WITHOUT ROWID;
    CREATE INDEX identifiers_by_profile ON identifiers (profile_id);
    CREATE TABLE profile_forwards (
        old_profile_id TEXT PRIMARY KEY,
        environment_id INTEGER NOT NULL,
        profile_id TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX profile_forwards_by_target ON profile_forwards (profile_id);
"#,
    r#"
    CREATE TABLE events (
        environment_id INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        distinct_id TEXT,
        anonymous_id TEXT,
        event TEXT NOT NULL,
        properties TEXT NOT NULL,
        timestamp INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        identity_traits TEXT NOT NULL,
        message_id TEXT
    );
    CREATE INDEX events_by_profile ON events (environment_id, profile_id, timestamp, event_id);
    CREATE INDEX events_by_distinct_id ON events (environment_id, distinct_id, timestamp);
    CREATE TABLE trait_history (
        environment_id INTEGER NOT NULL,
        profile_id TEXT NOT NULL,
        changes TEXT NOT NULL,
        recorded_at INTEGER NOT NULL
    );
    CREATE INDEX trait_history_by_profile ON trait_history (environment_id, profile_id);
    CREATE TABLE message_ids (
        environment_id INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        profile_id TEXT NOT NULL,
        event_id TEXT,
        PRIMARY KEY (environment_id, message_id)
    ) WITHOUT ROWID;
    CREATE INDEX message_ids_by_age ON message_ids (received_at);
"#,
    r#"
    CREATE TABLE devices (
        environment_id INTEGER NOT NULL,
        token TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        platform TEXT,
        attributes TEXT NOT NULL,
        last_used INTEGER,
        last_status TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (environment_id, token)
    ) WITHOUT ROWID;
    CREATE INDEX devices_by_profile ON devices (environment_id, profile_id);
    CREATE TABLE suppressions (
        environment_id INTEGER NOT NULL,
        user_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (environment_id, user_id)
    ) WITHOUT ROWID;
    ALTER TABLE profiles ADD COLUMN merge_count INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
    ALTER TABLE environments ADD COLUMN evaluation_key TEXT;
    UPDATE environments SET evaluation_key = client_key;
    ALTER TABLE environments ADD COLUMN flags_version INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE segments (
        segment_id INTEGER PRIMARY KEY AUTOINCREMENT,
        environment_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        definition TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        UNIQUE (environment_id, name)
    );
    CREATE TABLE features (
        feature_id INTEGER PRIMARY KEY AUTOINCREMENT,
        environment_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        definition TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        UNIQUE (environment_id, name)
    );
    CREATE TABLE identity_overrides (
        environment_id INTEGER NOT NULL,
        profile_id TEXT NOT NULL,
        feature_id INTEGER NOT NULL,
        enabled INTEGER NOT NULL,
        value TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (environment_id, profile_id, feature_id)
    ) WITHOUT ROWID;
    CREATE INDEX identity_overrides_by_feature ON identity_overrides (feature_id);
    CREATE TABLE segment_memberships (
        environment_id INTEGER NOT NULL,
        segment_id INTEGER NOT NULL,
        profile_id TEXT NOT NULL,
        entered_at INTEGER NOT NULL,
        exited_at INTEGER
    );
    CREATE INDEX segment_memberships_by_segment ON segment_memberships (environment_id, segment_id, exited_at, profile_id);
    CREATE INDEX segment_memberships_by_profile ON segment_memberships (environment_id, profile_id, exited_at);
"#,
    r#"
    ALTER TABLE environments ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE events ADD COLUMN context TEXT;
    CREATE TABLE rejections (
        rejection_id INTEGER PRIMARY KEY AUTOINCREMENT,
        environment_id INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        dialect TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        path TEXT NOT NULL,
        message_id TEXT,
        code TEXT NOT NULL,
        error TEXT NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX rejections_by_environment ON rejections (environment_id, rejection_id);
"#,
];

const ADMIN_TOKEN_SETTING: &str = "admin_token_hash";

/// A unit of work for the writer thread: runs on the open transaction and says whether it
/// succeeded (a failed job's savepoint is rolled back); the returned completion is called with the
/// commit's outcome, so no caller hears "done" before its write is durable.
type WriteJob = Box<dyn FnOnce(&Connection) -> (bool, Completion) + Send>;
type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;

pub struct SqliteStore {
    database_path: PathBuf,
    write_queue: mpsc::Sender<WriteJob>,
    readers: Arc<ReaderPool>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_directory`, runs migrations and starts the
    /// writer thread. Must be called inside a Tokio runtime.
    pub fn open(data_directory: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(data_directory).map_err(|error| {
            StoreError::Database(format!("cannot create data directory {}: {error}", data_directory.display()))
        })?;
        let database_path = data_directory.join(DATABASE_FILE_NAME);
        let mut writer = Connection::open(&database_path)?;
        configure_writer(&writer)?;
        migrate(&mut writer)?;
        let checkpoint_requests = start_checkpointer(&database_path)?;
        // Replaces SQLite's automatic checkpoint (itself a WAL hook). The hook lives as long as
        // the writer's connection; the checkpointer stops when it is gone.
        writer.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, wal_pages: std::ffi::c_int| {
            if wal_pages >= CHECKPOINT_AFTER_WAL_PAGES {
                // A request already pending covers this one.
                let _ = checkpoint_requests.try_send(());
            }
            Ok(())
        }))?;

        let (write_queue, jobs) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("roster-sqlite-writer".into())
            .spawn(move || run_writer(writer, jobs))
            .map_err(|error| StoreError::Database(format!("cannot start writer thread: {error}")))?;

        let readers = Arc::new(ReaderPool {
            database_path: database_path.clone(),
            idle: Mutex::new(Vec::new()),
            idle_query: Mutex::new(Vec::new()),
            store_schema: format!("store_{}", uuid::Uuid::now_v7().simple()),
        });
        Ok(SqliteStore { database_path, write_queue, readers })
    }

    /// Writes a consistent copy of the store in `data_directory` to `destination` (which must
    /// not exist), while a server may be writing to it: SQLite's `VACUUM INTO` reads one snapshot
    /// (WAL readers never block the writer) and writes a compact database. Answers its size.
    pub fn backup(data_directory: &Path, destination: &Path) -> StoreResult<u64> {
        let source = data_directory.join(DATABASE_FILE_NAME);
        if !source.exists() {
            return Err(StoreError::Database(format!("no Roster store in {}", data_directory.display())));
        }
        if destination.exists() {
            return Err(StoreError::Conflict(format!("the backup file {}", destination.display())));
        }
        let connection = Connection::open_with_flags(&source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        connection.busy_timeout(std::time::Duration::from_secs(30))?;
        let target = destination.to_str().ok_or_else(|| {
            StoreError::InvalidInput(format!("the backup path {} is not UTF-8", destination.display()))
        })?;
        connection.execute("VACUUM INTO ?1", [target])?;
        // The copy is complete once VACUUM returns; make it durable before saying so.
        std::fs::File::open(destination).and_then(|file| file.sync_all()).map_err(|error| {
            StoreError::Database(format!("cannot flush the backup {}: {error}", destination.display()))
        })?;
        Ok(std::fs::metadata(destination).map(|metadata| metadata.len()).unwrap_or(0))
    }

    /// Puts a backup made by [`SqliteStore::backup`] in place as `data_directory`'s store. Refuses
    /// a file that is not an intact Roster store, and a data directory whose store is open (a
    /// server running on it) or exists unless `replace`.
    pub fn restore(backup: &Path, data_directory: &Path, replace: bool) -> StoreResult<()> {
        let checked = Connection::open_with_flags(backup, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let integrity: String = checked.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
        let is_roster: bool = checked.query_row(
            "SELECT count(*) = 2 FROM sqlite_master WHERE type = 'table' AND name IN ('profiles', 'environments')",
            [],
            |row| row.get(0),
        )?;
        drop(checked);
        if integrity != "ok" || !is_roster {
            return Err(StoreError::InvalidInput(format!(
                "{} is not an intact Roster backup ({integrity})",
                backup.display()
            )));
        }
        std::fs::create_dir_all(data_directory).map_err(|error| {
            StoreError::Database(format!("cannot create data directory {}: {error}", data_directory.display()))
        })?;
        let target = data_directory.join(DATABASE_FILE_NAME);
        if target.exists() {
            if !replace {
                return Err(StoreError::Conflict(format!("a store in {} (pass --replace)", data_directory.display())));
            }
            // Everything the old store's WAL holds goes into its file and the WAL is emptied, so no
            // stale frame can be replayed onto the restored file; failing to, something else has
            // the store open.
            let current = Connection::open(&target)?;
            let emptied: (i64, i64, i64) = current
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            if emptied.0 != 0 {
                return Err(StoreError::Conflict(format!(
                    "another process using the store in {}; stop every roster process on it first",
                    data_directory.display()
                )));
            }
            drop(current);
        }
        // Copied beside the store, flushed, then renamed over it (the old WAL is empty by now): a
        // crash leaves one store or the other, never a mix. The empty WAL and shared-memory
        // files of the old store go after.
        let incoming = data_directory.join(format!("{DATABASE_FILE_NAME}.restoring"));
        let copy = || -> std::io::Result<()> {
            std::fs::copy(backup, &incoming)?;
            std::fs::File::open(&incoming)?.sync_all()?;
            std::fs::rename(&incoming, &target)?;
            std::fs::File::open(data_directory)?.sync_all()?;
            for suffix in ["-wal", "-shm"] {
                let stale = data_directory.join(format!("{DATABASE_FILE_NAME}{suffix}"));
                if stale.exists() {
                    std::fs::remove_file(stale)?;
                }
            }
            Ok(())
        };
        copy()
            .map_err(|error| StoreError::Database(format!("cannot restore into {}: {error}", data_directory.display())))
    }

    pub fn database_path(&self) -> &Path {
        &self.database_path
    }

    /// Runs `work` on the writer's transaction and waits until it is committed and durable.
    async fn write<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: WriteJob = Box::new(move |connection| {
            let result = work(connection);
            let succeeded = result.is_ok();
            let completion: Completion = Box::new(move |commit| {
                let outcome = match commit {
                    Ok(()) => result,
                    Err(message) => Err(StoreError::Database(message)),
                };
                let _ = reply.send(outcome);
            });
            (succeeded, completion)
        });
        self.write_queue.send(job).await.map_err(|_| StoreError::Closed)?;
        // Seen from the sending side too, so the gauge rises while the writer is stuck in a
        // long commit (the writer only samples it between commits).
        record_write_queue_depth(self.write_queue.max_capacity() - self.write_queue.capacity());
        answer.await.map_err(|_| StoreError::Database("the write could not start; nothing was applied".into()))?
    }

    /// Runs `work` on a pooled read connection on the blocking thread pool.
    async fn read<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let connection = readers.take()?;
            let result = work(&connection);
            readers.give_back(connection);
            result
        })
        .await
        .map_err(|error| StoreError::Database(format!("read task failed: {error}")))?
    }
}

/// Starts the thread that checkpoints the WAL when the writer asks, on a connection of its own.
/// Passive checkpoints never block the writer or readers: the writer keeps appending to the WAL
/// meanwhile, and restarts it from the beginning once it has been copied back entirely.
fn start_checkpointer(database_path: &Path) -> StoreResult<std::sync::mpsc::SyncSender<()>> {
    let connection = Connection::open(database_path)?;
    // synchronous=FULL: the database file is fsync'd before the WAL may be reused.
    connection.execute_batch("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000;")?;
    let (requests, requested) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("roster-sqlite-checkpointer".into())
        .spawn(move || {
            while requested.recv().is_ok() {
                let outcome = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                    Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
                });
                match outcome {
                    Ok((wal_pages, copied_pages)) => {
                        tracing::debug!(wal_pages, copied_pages, "sqlite wal checkpointed")
                    }
                    Err(error) => tracing::warn!(%error, "sqlite wal checkpoint failed; retried at the next request"),
                }
            }
            tracing::debug!("sqlite checkpointer stopped");
        })
        .map_err(|error| StoreError::Database(format!("cannot start checkpointer thread: {error}")))?;
    Ok(requests)
}

fn configure_writer(connection: &Connection) -> StoreResult<()> {
    // WAL: readers never block on the writer. synchronous=FULL: the WAL is fsync'd at every
    // commit, so an acknowledged write survives power loss, not only a process crash.
    // secure_delete: an erased person's data is overwritten in the file, not only unlinked.
    // cache_size stays small (8 MB; pages are read through mmap anyway): after a b-tree page split
    // SQLite's page cache scans its whole hash table at every commit (the split renumbers pages
    // through the lock page's number, which stays the cache's highest key), so a 64 MB cache
    // cost each commit a scan of ~16k buckets: measured, single `sync=true` identifies at
    // 2k/s went from a p99 of 4–10 ms to 1.5–2.4 ms, batched ingest +10 %.
    connection.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA busy_timeout = 10000;
         PRAGMA foreign_keys = OFF;
         PRAGMA cache_size = -8192;
         PRAGMA mmap_size = 268435456;
         PRAGMA secure_delete = ON;",
    )?;
    disable_replanning(connection)?;
    let mode: String = connection.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Database(format!("could not enable WAL (journal_mode is {mode})")));
    }
    Ok(())
}

/// The bundled SQLite is built with STAT4, which re-prepares a cached statement whenever a bound
/// value might change its plan: every lookup would be parsed and planned again. Our plans do not
/// depend on the values, so the query-planner stability guarantee keeps the first plan.
fn disable_replanning(connection: &Connection) -> StoreResult<()> {
    connection.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

fn migrate(connection: &mut Connection) -> StoreResult<()> {
    let applied: usize = connection.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))? as usize;
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Database(format!(
            "the database schema (version {applied}) is newer than this roster (version {}); upgrade roster",
            MIGRATIONS.len()
        )));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(migration)?;
        transaction.execute_batch(&format!("PRAGMA user_version = {}", index + 1))?;
        transaction.commit()?;
        tracing::info!(version = index + 1, "applied sqlite schema migration");
    }
    Ok(())
}

/// Jobs waiting for the writer (`roster_sqlite_write_queue_depth`).
fn record_write_queue_depth(depth: usize) {
    metrics::gauge!("roster_sqlite_write_queue_depth").set(depth as f64);
}

fn run_writer(connection: Connection, mut jobs: mpsc::Receiver<WriteJob>) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(MAX_JOBS_PER_COMMIT);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_JOBS_PER_COMMIT {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        record_write_queue_depth(jobs.len());
        metrics::histogram!("roster_sqlite_group_commit_jobs").record(batch.len() as f64);
        let started = Instant::now();
        commit_group(&connection, &mut batch);
        metrics::histogram!("roster_sqlite_group_commit_seconds").record(started.elapsed().as_secs_f64());
    }
    tracing::debug!("sqlite writer stopped");
}

fn commit_group(connection: &Connection, batch: &mut Vec<WriteJob>) {
    if let Err(error) = connection.execute_batch("BEGIN IMMEDIATE") {
        tracing::error!(%error, "sqlite begin failed; the waiting writes are answered with an error");
        // Dropping a job unrun drops its reply channel: its caller gets an error, nothing is written.
        batch.clear();
        let _ = connection.execute_batch("ROLLBACK");
        return;
    }
    let mut completions = Vec::with_capacity(batch.len());
    for job in batch.drain(..) {
        let savepoint_opened = run_cached(connection, "SAVEPOINT job").is_ok();
        let (succeeded, completion) = job(connection);
        if savepoint_opened {
            let closed = if succeeded {
                run_cached(connection, "RELEASE job")
            } else {
                run_cached(connection, "ROLLBACK TO job").and_then(|()| run_cached(connection, "RELEASE job"))
            };
            if let Err(error) = closed {
                tracing::error!(%error, "sqlite savepoint release failed");
            }
        }
        completions.push(completion);
    }
    // With synchronous=FULL the COMMIT is where the WAL is fsync'd: its duration is the
    // storage's durability cost, apart from the jobs' own work.
    let commit_started = Instant::now();
    let commit = connection.execute_batch("COMMIT").map_err(|error| {
        tracing::error!(%error, "sqlite commit failed");
        let _ = connection.execute_batch("ROLLBACK");
        format!("commit failed: {error}")
    });
    metrics::histogram!("roster_sqlite_commit_seconds").record(commit_started.elapsed().as_secs_f64());
    for completion in completions {
        completion(commit.clone());
    }
}

/// Runs a parameterless statement through the statement cache (no parsing per call).
fn run_cached(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Read connections, opened on demand and kept for reuse.
struct ReaderPool {
    database_path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Connections for users' SQL: they carry the per-environment views (see `query`).
    idle_query: Mutex<Vec<query::QueryConnection>>,
    /// The schema name query connections attach the store under; random, so users cannot name it.
    store_schema: String,
}

impl ReaderPool {
    fn open_reader(&self) -> StoreResult<Connection> {
        let connection = Connection::open_with_flags(
            &self.database_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )?;
        connection.execute_batch("PRAGMA busy_timeout = 10000; PRAGMA mmap_size = 268435456;")?;
        disable_replanning(&connection)?;
        Ok(connection)
    }

    fn take(&self) -> StoreResult<Connection> {
        if let Some(connection) = self.idle.lock().map_err(|_| StoreError::Closed)?.pop() {
            return Ok(connection);
        }
        let connection = self.open_reader()?;
        // Readers never write: query_only turns any attempt into an error.
        connection.execute_batch("PRAGMA query_only = ON;")?;
        Ok(connection)
    }

    fn give_back(&self, connection: Connection) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE_READERS
        {
            idle.push(connection);
        }
    }

    fn take_query(&self) -> StoreResult<query::QueryConnection> {
        if let Some(connection) = self.idle_query.lock().map_err(|_| StoreError::Closed)?.pop() {
            return Ok(connection);
        }
        query::QueryConnection::open(&self.database_path, &self.store_schema)
    }

    fn give_back_query(&self, connection: query::QueryConnection) {
        if let Ok(mut idle) = self.idle_query.lock()
            && idle.len() < MAX_IDLE_READERS
        {
            idle.push(connection);
        }
    }
}

/// [`IdentityTx`] on the writer's open transaction.
struct SqliteIdentityTx<'a> {
    connection: &'a Connection,
    /// Environments seen to have no suppressed user ids during this job (the writer is the only
    /// one changing suppressions, and a job runs alone): one look per job, not one per item.
    unsuppressed_environments: Vec<EnvironmentId>,
}

impl<'a> SqliteIdentityTx<'a> {
    fn new(connection: &'a Connection) -> Self {
        SqliteIdentityTx { connection, unsuppressed_environments: Vec::new() }
    }
}

/// The columns `stored_profile_from_row` reads, as a macro so that queries are `concat!`ed
/// constants (no formatting per call on the hot path).
macro_rules! profile_columns {
    () => {
        "p.profile_id, p.user_id, p.identified, p.traits, p.trait_timestamps, p.created_at, p.updated_at, p.merge_count"
    };
}

fn stored_profile_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredProfileRow> {
    Ok(StoredProfileRow {
        profile_id: row.get(0)?,
        user_id: row.get(1)?,
        identified: row.get(2)?,
        traits_json: row.get(3)?,
        trait_timestamps_json: row.get(4)?,
        created_at: row.get(5)?,
        updated_at: row.get(6)?,
        merge_count: row.get(7)?,
    })
}

impl StoredProfileRow {
    fn into_profile(self, connection: &Connection, environment_id: EnvironmentId) -> StoreResult<Profile> {
        let identifiers = identifiers_of(connection, environment_id, &self.profile_id)?;
        let devices = devices_of(connection, environment_id, &self.profile_id)?;
        self.into_profile_with(identifiers, devices)
    }
}

fn identifiers_of(
    connection: &Connection,
    environment_id: EnvironmentId,
    profile_id: &str,
) -> StoreResult<Vec<(IdentifierKind, String)>> {
    let mut statement = connection.prepare_cached(
        "SELECT kind, value FROM identifiers WHERE environment_id = ?1 AND profile_id = ?2 ORDER BY kind, value",
    )?;
    let rows = statement
        .query_map(params![environment_id, profile_id], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(|(kind, value)| Ok((identifier_kind(&kind)?, value))).collect()
}

fn devices_of(connection: &Connection, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Vec<Device>> {
    let mut statement = connection.prepare_cached(
        "SELECT token, platform, attributes, last_used, last_status, created_at, updated_at FROM devices \
         WHERE environment_id = ?1 AND profile_id = ?2 ORDER BY token",
    )?;
    let rows = statement
        .query_map(params![environment_id, profile_id], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, Option<i64>>(3)?,
                row.get::<_, Option<String>>(4)?,
                row.get::<_, i64>(5)?,
                row.get::<_, i64>(6)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(token, platform, attributes, last_used, last_status, created_at, updated_at)| {
            Ok(Device {
                attributes: parse_object(&attributes, &token)?,
                token,
                platform,
                last_used: last_used.map(Timestamp::from_micros),
                last_status,
                created_at: Timestamp::from_micros(created_at),
                updated_at: Timestamp::from_micros(updated_at),
            })
        })
        .collect()
}

impl IdentityTx for SqliteIdentityTx<'_> {
    fn find_by_identifier(
        &mut self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
    ) -> StoreResult<Option<StoredProfile>> {
        find_row_by_identifier(self.connection, environment_id, kind, value)?
            .map(StoredProfileRow::into_stored)
            .transpose()
    }

    fn load_profile(&mut self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Option<StoredProfile>> {
        load_row(self.connection, environment_id, profile_id)?.map(StoredProfileRow::into_stored).transpose()
    }

    fn forwarded_profile_id(&mut self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Option<String>> {
        Ok(self
            .connection
            .prepare_cached(
                "SELECT profile_id FROM profile_forwards WHERE environment_id = ?1 AND old_profile_id = ?2",
            )?
            .query_row(params![environment_id, profile_id], |row| row.get(0))
            .optional()?)
    }

    fn save_profile(&mut self, environment_id: EnvironmentId, write: &ProfileWrite<'_>) -> StoreResult<()> {
        let profile = write.profile;
        self.connection
            .prepare_cached(
                "INSERT INTO profiles (profile_id, environment_id, user_id, identified, traits, trait_timestamps, \
                 created_at, updated_at, merge_count) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (environment_id, profile_id) DO UPDATE SET user_id = excluded.user_id, \
                 identified = excluded.identified, traits = excluded.traits, trait_timestamps = excluded.trait_timestamps, \
                 created_at = excluded.created_at, updated_at = excluded.updated_at, merge_count = excluded.merge_count",
            )?
            .execute(params![
                profile.profile_id,
                environment_id,
                profile.user_id,
                profile.identified,
                write.traits_json,
                write.trait_timestamps_json,
                profile.created_at.as_micros(),
                profile.updated_at.as_micros(),
                profile.merge_count,
            ])?;
        Ok(())
    }

    fn put_identifier(
        &mut self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
        profile_id: &str,
    ) -> StoreResult<()> {
        self.connection
            .prepare_cached(
                "INSERT INTO identifiers (environment_id, kind, value, profile_id) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (environment_id, kind, value) DO UPDATE SET profile_id = excluded.profile_id",
            )?
            .execute(params![environment_id, kind.as_str(), value, profile_id])?;
        Ok(())
    }

    fn delete_identifier(
        &mut self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
    ) -> StoreResult<()> {
        self.connection
            .prepare_cached("DELETE FROM identifiers WHERE environment_id = ?1 AND kind = ?2 AND value = ?3")?
            .execute(params![environment_id, kind.as_str(), value])?;
        Ok(())
    }

    fn move_identifiers(&mut self, environment_id: EnvironmentId, from: &str, to: &str) -> StoreResult<()> {
        self.connection
            .prepare_cached("UPDATE identifiers SET profile_id = ?3 WHERE environment_id = ?1 AND profile_id = ?2")?
            .execute(params![environment_id, from, to])?;
        Ok(())
    }

    fn retire_profile(&mut self, environment_id: EnvironmentId, from: &str, to: &str) -> StoreResult<()> {
        self.connection
            .prepare_cached("DELETE FROM profiles WHERE environment_id = ?1 AND profile_id = ?2")?
            .execute(params![environment_id, from])?;
        self.connection
            .prepare_cached(
                "UPDATE profile_forwards SET profile_id = ?3 WHERE environment_id = ?1 AND profile_id = ?2",
            )?
            .execute(params![environment_id, from, to])?;
        self.connection
            .prepare_cached(
                "INSERT INTO profile_forwards (old_profile_id, environment_id, profile_id) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (old_profile_id) DO UPDATE SET profile_id = excluded.profile_id",
            )?
            .execute(params![from, environment_id, to])?;
        Ok(())
    }

    fn move_activity(&mut self, environment_id: EnvironmentId, from: &str, to: &str) -> StoreResult<()> {
        self.connection
            .prepare_cached("UPDATE events SET profile_id = ?3 WHERE environment_id = ?1 AND profile_id = ?2")?
            .execute(params![environment_id, from, to])?;
        self.connection
            .prepare_cached("UPDATE trait_history SET profile_id = ?3 WHERE environment_id = ?1 AND profile_id = ?2")?
            .execute(params![environment_id, from, to])?;
        self.connection
            .prepare_cached("UPDATE devices SET profile_id = ?3 WHERE environment_id = ?1 AND profile_id = ?2")?
            .execute(params![environment_id, from, to])?;
        self.connection
            .prepare_cached(
                "UPDATE segment_memberships SET profile_id = ?3 WHERE environment_id = ?1 AND profile_id = ?2",
            )?
            .execute(params![environment_id, from, to])?;
        // The survivor's own overrides win over the absorbed profile's.
        self.connection
            .prepare_cached(
                "INSERT OR IGNORE INTO identity_overrides (environment_id, profile_id, feature_id, enabled, value, \
                 updated_at) SELECT environment_id, ?3, feature_id, enabled, value, updated_at FROM identity_overrides \
                 WHERE environment_id = ?1 AND profile_id = ?2",
            )?
            .execute(params![environment_id, from, to])?;
        self.connection
            .prepare_cached("DELETE FROM identity_overrides WHERE environment_id = ?1 AND profile_id = ?2")?
            .execute(params![environment_id, from])?;
        Ok(())
    }

    fn set_events_distinct_id(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        distinct_id: &str,
    ) -> StoreResult<()> {
        self.connection
            .prepare_cached(
                "UPDATE events SET distinct_id = ?3 WHERE environment_id = ?1 AND profile_id = ?2 \
                 AND distinct_id IS NOT ?3",
            )?
            .execute(params![environment_id, profile_id, distinct_id])?;
        Ok(())
    }

    fn insert_event(&mut self, environment_id: EnvironmentId, event: &EventWrite<'_>) -> StoreResult<()> {
        self.connection
            .prepare_cached(
                "INSERT INTO events (environment_id, event_id, profile_id, distinct_id, anonymous_id, event, \
                 properties, timestamp, received_at, identity_traits, message_id, context) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?
            .execute(params![
                environment_id,
                event.event_id,
                event.profile_id,
                event.distinct_id,
                event.anonymous_id,
                event.command.event,
                event.command.properties_json,
                event.command.timestamp.as_micros(),
                event.received_at.as_micros(),
                event.identity_traits_json,
                event.command.message_id,
                event.command.context_json,
            ])?;
        Ok(())
    }

    fn record_trait_changes(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        changes_json: &str,
        recorded_at: Timestamp,
    ) -> StoreResult<()> {
        self.connection
            .prepare_cached(
                "INSERT INTO trait_history (environment_id, profile_id, changes, recorded_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![environment_id, profile_id, changes_json, recorded_at.as_micros()])?;
        Ok(())
    }

    fn find_message(&mut self, environment_id: EnvironmentId, message_id: &str) -> StoreResult<Option<SeenMessage>> {
        Ok(self
            .connection
            .prepare_cached(
                "SELECT received_at, profile_id, event_id FROM message_ids WHERE environment_id = ?1 AND message_id = ?2",
            )?
            .query_row(params![environment_id, message_id], |row| {
                Ok(SeenMessage {
                    received_at: Timestamp::from_micros(row.get(0)?),
                    profile_id: row.get(1)?,
                    event_id: row.get(2)?,
                })
            })
            .optional()?)
    }

    fn put_message(&mut self, environment_id: EnvironmentId, message_id: &str, seen: &SeenMessage) -> StoreResult<()> {
        self.connection
            .prepare_cached(
                "INSERT INTO message_ids (environment_id, message_id, received_at, profile_id, event_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (environment_id, message_id) DO UPDATE SET \
                 received_at = excluded.received_at, profile_id = excluded.profile_id, event_id = excluded.event_id",
            )?
            .execute(params![
                environment_id,
                message_id,
                seen.received_at.as_micros(),
                seen.profile_id,
                seen.event_id
            ])?;
        Ok(())
    }

    fn new_id(&mut self) -> String {
        uuid::Uuid::now_v7().to_string()
    }

    fn identifiers_of(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
    ) -> StoreResult<Vec<(IdentifierKind, String)>> {
        identifiers_of(self.connection, environment_id, profile_id)
    }

    fn is_suppressed(&mut self, environment_id: EnvironmentId, user_id: &str) -> StoreResult<bool> {
        if self.unsuppressed_environments.contains(&environment_id) {
            return Ok(false);
        }
        let any = self
            .connection
            .prepare_cached("SELECT 1 FROM suppressions WHERE environment_id = ?1 LIMIT 1")?
            .exists(params![environment_id])?;
        if !any {
            self.unsuppressed_environments.push(environment_id);
            return Ok(false);
        }
        Ok(self
            .connection
            .prepare_cached("SELECT 1 FROM suppressions WHERE environment_id = ?1 AND user_id = ?2")?
            .exists(params![environment_id, user_id])?)
    }

    fn set_suppressed(
        &mut self,
        environment_id: EnvironmentId,
        user_id: &str,
        suppressed: bool,
        at: Timestamp,
    ) -> StoreResult<()> {
        self.unsuppressed_environments.retain(|known| *known != environment_id);
        if suppressed {
            self.connection
                .prepare_cached(
                    "INSERT INTO suppressions (environment_id, user_id, created_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (environment_id, user_id) DO NOTHING",
                )?
                .execute(params![environment_id, user_id, at.as_micros()])?;
        } else {
            self.connection
                .prepare_cached("DELETE FROM suppressions WHERE environment_id = ?1 AND user_id = ?2")?
                .execute(params![environment_id, user_id])?;
        }
        Ok(())
    }

    fn upsert_device(
        &mut self,
        environment_id: EnvironmentId,
        profile_id: &str,
        device: &DeviceUpdate,
        at: Timestamp,
    ) -> StoreResult<()> {
        let existing: Option<(String, String, i64)> = self
            .connection
            .prepare_cached(
                "SELECT profile_id, attributes, created_at FROM devices WHERE environment_id = ?1 AND token = ?2",
            )?
            .query_row(params![environment_id, device.token], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .optional()?;
        // A token changing hands starts afresh: what the previous owner's app recorded is theirs.
        let changes_hands = existing.as_ref().is_some_and(|(owner, _, _)| owner != profile_id);
        let (stored, created_at) = match existing {
            Some((_, attributes, created_at)) if !changes_hands => {
                (Some(parse_object(&attributes, &device.token)?), created_at)
            }
            _ => (None, at.as_micros()),
        };
        let attributes = Value::Object(device.merged_attributes(stored)).to_string();
        self.connection
            .prepare_cached(
                "INSERT INTO devices (environment_id, token, profile_id, platform, attributes, last_used, last_status, \
                 created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (environment_id, token) DO UPDATE SET profile_id = excluded.profile_id, \
                 platform = COALESCE(excluded.platform, devices.platform), attributes = excluded.attributes, \
                 last_used = COALESCE(excluded.last_used, devices.last_used), \
                 last_status = CASE WHEN ?10 THEN excluded.last_status \
                     ELSE COALESCE(excluded.last_status, devices.last_status) END, \
                 created_at = excluded.created_at, updated_at = excluded.updated_at",
            )?
            .execute(params![
                environment_id,
                device.token,
                profile_id,
                device.platform,
                attributes,
                device.mark_used.then_some(at.as_micros()),
                device.last_status,
                created_at,
                at.as_micros(),
                changes_hands,
            ])?;
        Ok(())
    }

    fn delete_device(&mut self, environment_id: EnvironmentId, profile_id: &str, token: &str) -> StoreResult<bool> {
        let deleted = self
            .connection
            .prepare_cached("DELETE FROM devices WHERE environment_id = ?1 AND profile_id = ?2 AND token = ?3")?
            .execute(params![environment_id, profile_id, token])?;
        Ok(deleted > 0)
    }

    fn erase_profile(&mut self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<()> {
        for sql in [
            "DELETE FROM profiles WHERE environment_id = ?1 AND profile_id = ?2",
            "DELETE FROM identifiers WHERE environment_id = ?1 AND profile_id = ?2",
            "DELETE FROM devices WHERE environment_id = ?1 AND profile_id = ?2",
            "DELETE FROM events WHERE environment_id = ?1 AND profile_id = ?2",
            "DELETE FROM trait_history WHERE environment_id = ?1 AND profile_id = ?2",
            "DELETE FROM profile_forwards WHERE environment_id = ?1 AND profile_id = ?2",
            "DELETE FROM segment_memberships WHERE environment_id = ?1 AND profile_id = ?2",
            "DELETE FROM identity_overrides WHERE environment_id = ?1 AND profile_id = ?2",
        ] {
            self.connection.prepare_cached(sql)?.execute(params![environment_id, profile_id])?;
        }
        Ok(())
    }

    fn open_memberships(&mut self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Vec<i64>> {
        let mut statement = self.connection.prepare_cached(
            "SELECT segment_id FROM segment_memberships WHERE environment_id = ?1 AND profile_id = ?2 \
             AND exited_at IS NULL",
        )?;
        let rows = statement.query_map(params![environment_id, profile_id], |row| row.get(0))?;
        Ok(rows.collect::<Result<Vec<i64>, _>>()?)
    }

    fn enter_segment(
        &mut self,
        environment_id: EnvironmentId,
        segment_id: i64,
        profile_id: &str,
        at: Timestamp,
    ) -> StoreResult<()> {
        self.connection
            .prepare_cached(
                "INSERT INTO segment_memberships (environment_id, segment_id, profile_id, entered_at) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![environment_id, segment_id, profile_id, at.as_micros()])?;
        Ok(())
    }

    fn exit_segment(
        &mut self,
        environment_id: EnvironmentId,
        segment_id: i64,
        profile_id: &str,
        at: Timestamp,
    ) -> StoreResult<()> {
        self.connection
            .prepare_cached(
                "UPDATE segment_memberships SET exited_at = ?4 WHERE environment_id = ?1 AND segment_id = ?2 \
                 AND profile_id = ?3 AND exited_at IS NULL",
            )?
            .execute(params![environment_id, segment_id, profile_id, at.as_micros()])?;
        Ok(())
    }

    fn profile_ids_after(
        &mut self,
        environment_id: EnvironmentId,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        let mut statement = self.connection.prepare_cached(
            "SELECT profile_id FROM profiles WHERE environment_id = ?1 AND profile_id > ?2 ORDER BY profile_id LIMIT ?3",
        )?;
        let rows = statement.query_map(params![environment_id, after.unwrap_or(""), limit as i64], |row| row.get(0))?;
        Ok(rows.collect::<Result<Vec<String>, _>>()?)
    }
}

fn find_row_by_identifier(
    connection: &Connection,
    environment_id: EnvironmentId,
    kind: IdentifierKind,
    value: &str,
) -> StoreResult<Option<StoredProfileRow>> {
    const SQL: &str = concat!(
        "SELECT ",
        profile_columns!(),
        " FROM identifiers i JOIN profiles p ON p.environment_id = i.environment_id AND p.profile_id = i.profile_id \
         WHERE i.environment_id = ?1 AND i.kind = ?2 AND i.value = ?3"
    );
    Ok(connection
        .prepare_cached(SQL)?
        .query_row(params![environment_id, kind.as_str(), value], stored_profile_from_row)
        .optional()?)
}

fn load_row(
    connection: &Connection,
    environment_id: EnvironmentId,
    profile_id: &str,
) -> StoreResult<Option<StoredProfileRow>> {
    const SQL: &str =
        concat!("SELECT ", profile_columns!(), " FROM profiles p WHERE p.environment_id = ?1 AND p.profile_id = ?2");
    Ok(connection
        .prepare_cached(SQL)?
        .query_row(params![environment_id, profile_id], stored_profile_from_row)
        .optional()?)
}

/// The id a profile id stands for now: itself, or the survivor it was merged into.
fn current_profile_id(
    connection: &Connection,
    environment_id: EnvironmentId,
    profile_id: &str,
) -> StoreResult<Option<String>> {
    let forwarded: Option<String> = connection
        .prepare_cached("SELECT profile_id FROM profile_forwards WHERE environment_id = ?1 AND old_profile_id = ?2")?
        .query_row(params![environment_id, profile_id], |row| row.get(0))
        .optional()?;
    if forwarded.is_some() {
        return Ok(forwarded);
    }
    let exists = connection
        .prepare_cached("SELECT 1 FROM profiles WHERE environment_id = ?1 AND profile_id = ?2")?
        .exists(params![environment_id, profile_id])?;
    Ok(exists.then(|| profile_id.to_owned()))
}

fn environment_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<EnvironmentRecord> {
    Ok(EnvironmentRecord {
        id: row.get(0)?,
        slug: row.get(1)?,
        name: row.get(2)?,
        client_key: row.get(3)?,
        server_key_hash: row.get(4)?,
        created_at: Timestamp::from_micros(row.get(5)?),
        settings: row.get(6)?,
    })
}

const ENVIRONMENT_COLUMNS: &str = "environment_id, slug, name, client_key, server_key_hash, created_at, settings";

fn insert_environment(connection: &Connection, environment: &NewEnvironment) -> StoreResult<EnvironmentRecord> {
    let inserted = connection.execute(
        "INSERT INTO environments (slug, name, client_key, server_key_hash, created_at, evaluation_key) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?3)",
        params![
            environment.slug,
            environment.name,
            environment.client_key,
            environment.server_key_hash,
            environment.created_at.as_micros()
        ],
    );
    match inserted {
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(failure, _)) if failure.code == rusqlite::ErrorCode::ConstraintViolation => {
            return Err(StoreError::Conflict(format!("environment `{}`", environment.slug)));
        }
        Err(error) => return Err(error.into()),
    }
    Ok(EnvironmentRecord {
        id: connection.last_insert_rowid(),
        slug: environment.slug.clone(),
        name: environment.name.clone(),
        client_key: environment.client_key.clone(),
        server_key_hash: environment.server_key_hash.clone(),
        created_at: environment.created_at,
        settings: "{}".to_owned(),
    })
}

fn now() -> Timestamp {
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_micros()).unwrap_or_default();
    Timestamp::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

#[async_trait]
impl Store for SqliteStore {
    async fn bootstrap(
        &self,
        first_environment: NewEnvironment,
        admin_token_hash: String,
    ) -> StoreResult<Option<EnvironmentRecord>> {
        self.write(move |connection| {
            let already: Option<String> = connection
                .query_row("SELECT value FROM settings WHERE name = ?1", [ADMIN_TOKEN_SETTING], |row| row.get(0))
                .optional()?;
            if already.is_some() {
                return Ok(None);
            }
            connection.execute(
                "INSERT INTO settings (name, value) VALUES (?1, ?2)",
                params![ADMIN_TOKEN_SETTING, admin_token_hash],
            )?;
            insert_environment(connection, &first_environment).map(Some)
        })
        .await
    }

    async fn admin_token_hash(&self) -> StoreResult<Option<String>> {
        self.read(|connection| {
            Ok(connection
                .query_row("SELECT value FROM settings WHERE name = ?1", [ADMIN_TOKEN_SETTING], |row| row.get(0))
                .optional()?)
        })
        .await
    }

    async fn replace_admin_token_hash(&self, admin_token_hash: String) -> StoreResult<bool> {
        self.write(move |connection| {
            let replaced = connection.execute(
                "UPDATE settings SET value = ?2 WHERE name = ?1",
                params![ADMIN_TOKEN_SETTING, admin_token_hash],
            )?;
            Ok(replaced == 1)
        })
        .await
    }

    async fn environments(&self) -> StoreResult<Vec<EnvironmentRecord>> {
        self.read(|connection| {
            let sql = format!("SELECT {ENVIRONMENT_COLUMNS} FROM environments ORDER BY environment_id");
            let mut statement = connection.prepare_cached(&sql)?;
            let rows = statement.query_map([], environment_from_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn create_environment(&self, environment: NewEnvironment) -> StoreResult<EnvironmentRecord> {
        self.write(move |connection| insert_environment(connection, &environment)).await
    }

    async fn replace_environment_settings(
        &self,
        slug: &str,
        settings: String,
    ) -> StoreResult<Option<EnvironmentRecord>> {
        let slug = slug.to_owned();
        self.write(move |connection| {
            connection.execute("UPDATE environments SET settings = ?2 WHERE slug = ?1", params![slug, settings])?;
            let sql = format!("SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE slug = ?1");
            Ok(connection.query_row(&sql, [&slug], environment_from_row).optional()?)
        })
        .await
    }

    async fn replace_environment_keys(
        &self,
        slug: &str,
        client_key: String,
        server_key_hash: String,
    ) -> StoreResult<Option<EnvironmentRecord>> {
        let slug = slug.to_owned();
        self.write(move |connection| {
            connection.execute(
                "UPDATE environments SET client_key = ?2, server_key_hash = ?3 WHERE slug = ?1",
                params![slug, client_key, server_key_hash],
            )?;
            let sql = format!("SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE slug = ?1");
            Ok(connection.query_row(&sql, [&slug], environment_from_row).optional()?)
        })
        .await
    }

    async fn identify(
        &self,
        environment_id: EnvironmentId,
        commands: Vec<IdentifyCommand>,
        policy: WritePolicy,
    ) -> StoreResult<Vec<ItemResult>> {
        self.write(move |connection| {
            let received_at = now();
            let mut tx = SqliteIdentityTx::new(connection);
            commands
                .iter()
                .map(|command| apply_identify(&mut tx, environment_id, command, &policy, received_at))
                .collect()
        })
        .await
    }

    async fn track(
        &self,
        environment_id: EnvironmentId,
        commands: Vec<TrackCommand>,
        policy: WritePolicy,
    ) -> StoreResult<Vec<TrackResult>> {
        self.write(move |connection| {
            let received_at = now();
            let mut tx = SqliteIdentityTx::new(connection);
            commands.iter().map(|command| apply_track(&mut tx, environment_id, command, &policy, received_at)).collect()
        })
        .await
    }

    async fn profile_events(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        before: Option<String>,
        limit: usize,
    ) -> StoreResult<Option<EventPage>> {
        let profile_id = profile_id.to_owned();
        self.read(move |connection| {
            let Some(current_id) = current_profile_id(connection, environment_id, &profile_id)? else {
                return Ok(None);
            };
            let (before_micros, before_event_id) = parse_event_cursor(before.as_deref());
            let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
            let mut statement = connection.prepare_cached(
                "SELECT event_id, profile_id, distinct_id, anonymous_id, event, properties, timestamp, received_at, \
                 identity_traits, context FROM events WHERE environment_id = ?1 AND profile_id = ?2 \
                 AND (timestamp, event_id) < (?3, ?4) ORDER BY timestamp DESC, event_id DESC LIMIT ?5",
            )?;
            let rows = statement
                .query_map(params![environment_id, current_id, before_micros, before_event_id, fetch], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, Option<String>>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, String>(5)?,
                        row.get::<_, i64>(6)?,
                        row.get::<_, i64>(7)?,
                        row.get::<_, String>(8)?,
                        row.get::<_, Option<String>>(9)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let has_more = rows.len() > limit;
            let mut events = Vec::with_capacity(rows.len().min(limit));
            for (
                event_id,
                profile_id,
                distinct_id,
                anonymous_id,
                event,
                properties,
                timestamp,
                received_at,
                traits,
                context,
            ) in rows.into_iter().take(limit)
            {
                events.push(StoredEvent {
                    context: context.map(|context| parse_object(&context, &event_id)).transpose()?,
                    properties: parse_object(&properties, &event_id)?,
                    identity_traits: parse_object(&traits, &event_id)?,
                    event_id,
                    profile_id,
                    distinct_id,
                    anonymous_id,
                    event,
                    timestamp: Timestamp::from_micros(timestamp),
                    received_at: Timestamp::from_micros(received_at),
                });
            }
            let next_before = if has_more {
                events.last().map(|event| format!("{}:{}", event.timestamp.as_micros(), event.event_id))
            } else {
                None
            };
            Ok(Some(EventPage { events, next_before }))
        })
        .await
    }

    async fn query(&self, environment_id: EnvironmentId, sql: &str, bounds: QueryBounds) -> StoreResult<QueryOutput> {
        let sql = sql.to_owned();
        let readers = Arc::clone(&self.readers);
        // How many run at once is the engine's to bound (fairly between environments).
        tokio::task::spawn_blocking(move || {
            let mut connection = readers.take_query()?;
            let result = connection.run(environment_id, &sql, &bounds);
            readers.give_back_query(connection);
            result
        })
        .await
        .map_err(|error| StoreError::Database(format!("query task failed: {error}")))?
    }

    async fn merge_profiles(
        &self,
        environment_id: EnvironmentId,
        primary: ProfileSelector,
        secondary: ProfileSelector,
        policy: WritePolicy,
    ) -> StoreResult<Result<MergeOutcome, FieldError>> {
        self.write(move |connection| {
            let mut tx = SqliteIdentityTx::new(connection);
            apply_merge(&mut tx, environment_id, &primary, &secondary, &policy, now())
        })
        .await
    }

    async fn change_identifiers(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        user_id: Option<String>,
        email: Option<String>,
        policy: WritePolicy,
    ) -> StoreResult<Result<String, FieldError>> {
        let profile_id = profile_id.to_owned();
        self.write(move |connection| {
            let mut tx = SqliteIdentityTx::new(connection);
            apply_identifier_change(
                &mut tx,
                environment_id,
                &profile_id,
                user_id.as_deref(),
                email.as_deref(),
                &policy,
                now(),
            )
        })
        .await
    }

    async fn erase_profile(
        &self,
        environment_id: EnvironmentId,
        selector: ProfileSelector,
    ) -> StoreResult<Option<String>> {
        self.write(move |connection| apply_erase(&mut SqliteIdentityTx::new(connection), environment_id, &selector))
            .await
    }

    async fn set_suppressed(&self, environment_id: EnvironmentId, user_id: &str, suppressed: bool) -> StoreResult<()> {
        let user_id = user_id.to_owned();
        self.write(move |connection| {
            SqliteIdentityTx::new(connection).set_suppressed(environment_id, &user_id, suppressed, now())
        })
        .await
    }

    async fn upsert_device(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        device: DeviceUpdate,
    ) -> StoreResult<bool> {
        let profile_id = profile_id.to_owned();
        self.write(move |connection| {
            apply_device_upsert(&mut SqliteIdentityTx::new(connection), environment_id, &profile_id, &device, now())
        })
        .await
    }

    async fn delete_device(&self, environment_id: EnvironmentId, profile_id: &str, token: &str) -> StoreResult<bool> {
        let (profile_id, token) = (profile_id.to_owned(), token.to_owned());
        self.write(move |connection| {
            apply_device_delete(&mut SqliteIdentityTx::new(connection), environment_id, &profile_id, &token)
        })
        .await
    }

    async fn record_rejections(
        &self,
        environment_id: EnvironmentId,
        rejections: Vec<Rejection>,
        keep: usize,
    ) -> StoreResult<()> {
        self.write(move |connection| {
            let mut insert = connection.prepare_cached(
                "INSERT INTO rejections (environment_id, received_at, dialect, endpoint, path, message_id, code, error, payload) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for rejection in &rejections {
                insert.execute(params![
                    environment_id,
                    rejection.received_at.as_micros(),
                    rejection.dialect,
                    rejection.endpoint,
                    rejection.path,
                    rejection.message_id,
                    rejection.code,
                    rejection.error,
                    rejection.payload,
                ])?;
            }
            connection
                .prepare_cached(
                    "DELETE FROM rejections WHERE environment_id = ?1 AND rejection_id <= \
                     (SELECT rejection_id FROM rejections WHERE environment_id = ?1 ORDER BY rejection_id DESC LIMIT 1 OFFSET ?2)",
                )?
                .execute(params![environment_id, i64::try_from(keep).unwrap_or(i64::MAX)])?;
            Ok(())
        })
        .await
    }

    async fn forget_rejections(
        &self,
        environment_id: EnvironmentId,
        mentions: Vec<String>,
        before: Option<Timestamp>,
    ) -> StoreResult<usize> {
        self.write(move |connection| {
            let mut removed = 0;
            let mut by_mention = connection
                .prepare_cached("DELETE FROM rejections WHERE environment_id = ?1 AND instr(payload, ?2) > 0")?;
            for mention in &mentions {
                removed += by_mention.execute(params![environment_id, mention])?;
            }
            if let Some(before) = before {
                removed += connection
                    .prepare_cached("DELETE FROM rejections WHERE environment_id = ?1 AND received_at < ?2")?
                    .execute(params![environment_id, before.as_micros()])?;
            }
            Ok(removed)
        })
        .await
    }

    async fn rejections(
        &self,
        environment_id: EnvironmentId,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<Rejection>> {
        self.read(move |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT rejection_id, received_at, dialect, endpoint, path, message_id, code, error, payload \
                 FROM rejections WHERE environment_id = ?1 AND rejection_id < ?2 ORDER BY rejection_id DESC LIMIT ?3",
            )?;
            let rows = statement.query_map(
                params![environment_id, before.unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX)],
                |row| {
                    Ok(Rejection {
                        rejection_id: row.get(0)?,
                        received_at: Timestamp::from_micros(row.get(1)?),
                        dialect: row.get(2)?,
                        endpoint: row.get(3)?,
                        path: row.get(4)?,
                        message_id: row.get(5)?,
                        code: row.get(6)?,
                        error: row.get(7)?,
                        payload: row.get(8)?,
                    })
                },
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn purge_expired(&self, messages_before: Timestamp, history_before: Option<Timestamp>) -> StoreResult<usize> {
        self.write(move |connection| {
            // Bounded per call so a purge never holds the writer for long; the caller repeats.
            let mut removed = connection
                .prepare_cached(
                    "DELETE FROM message_ids WHERE (environment_id, message_id) IN \
                     (SELECT environment_id, message_id FROM message_ids WHERE received_at < ?1 LIMIT 10000)",
                )?
                .execute([messages_before.as_micros()])?;
            if let Some(history_before) = history_before {
                removed += connection
                    .prepare_cached(
                        // Rows are appended in recording order by the one writer, so the oldest
                        // rowids are the oldest records: no index on recorded_at is needed.
                        "DELETE FROM trait_history WHERE rowid IN \
                         (SELECT rowid FROM trait_history ORDER BY rowid LIMIT 10000) AND recorded_at < ?1",
                    )?
                    .execute([history_before.as_micros()])?;
            }
            Ok(removed)
        })
        .await
    }

    async fn flag_config(&self, environment_id: EnvironmentId) -> StoreResult<FlagConfigRecord> {
        self.read(move |connection| flags::flag_config(connection, environment_id)).await
    }

    async fn flags_version(&self, environment_id: EnvironmentId) -> StoreResult<i64> {
        self.read(move |connection| flags::flags_version(connection, environment_id)).await
    }

    async fn save_segment(
        &self,
        environment_id: EnvironmentId,
        segment_id: Option<i64>,
        definition: SegmentDefinition,
    ) -> StoreResult<Result<i64, FieldError>> {
        self.write(move |connection| flags::save_segment(connection, environment_id, segment_id, &definition, now()))
            .await
    }

    async fn delete_segment(
        &self,
        environment_id: EnvironmentId,
        segment_id: i64,
    ) -> StoreResult<Result<bool, FieldError>> {
        self.write(move |connection| flags::delete_segment(connection, environment_id, segment_id)).await
    }

    async fn save_feature(
        &self,
        environment_id: EnvironmentId,
        feature_id: Option<i64>,
        definition: FeatureDefinition,
    ) -> StoreResult<Result<i64, FieldError>> {
        self.write(move |connection| flags::save_feature(connection, environment_id, feature_id, &definition, now()))
            .await
    }

    async fn delete_feature(&self, environment_id: EnvironmentId, feature_id: i64) -> StoreResult<bool> {
        self.write(move |connection| flags::delete_feature(connection, environment_id, feature_id)).await
    }

    async fn put_identity_override(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        feature_id: i64,
        state: IdentityOverride,
    ) -> StoreResult<Result<String, FieldError>> {
        let profile_id = profile_id.to_owned();
        self.write(move |connection| {
            let selector = ProfileSelector::ProfileId(profile_id);
            let Some(profile) = resolve(&mut SqliteIdentityTx::new(connection), environment_id, &selector)? else {
                return Ok(Err(FieldError::new(ErrorCode::NotFound, "profile_id", "no such profile")));
            };
            Ok(flags::put_identity_override(
                connection,
                environment_id,
                &profile.profile_id,
                feature_id,
                &state,
                now(),
            )?
            .map(|()| profile.profile_id))
        })
        .await
    }

    async fn delete_identity_override(
        &self,
        environment_id: EnvironmentId,
        profile_id: &str,
        feature_id: i64,
    ) -> StoreResult<bool> {
        let profile_id = profile_id.to_owned();
        self.write(move |connection| {
            let selector = ProfileSelector::ProfileId(profile_id);
            let Some(profile) = resolve(&mut SqliteIdentityTx::new(connection), environment_id, &selector)? else {
                return Ok(false);
            };
            flags::delete_identity_override(connection, environment_id, &profile.profile_id, feature_id)
        })
        .await
    }

    async fn refresh_memberships(
        &self,
        environment_id: EnvironmentId,
        policy: WritePolicy,
        after: Option<String>,
        limit: usize,
    ) -> StoreResult<(usize, Option<String>)> {
        self.write(move |connection| {
            let mut tx = SqliteIdentityTx::new(connection);
            apply_membership_refresh(&mut tx, environment_id, &policy, after.as_deref(), limit, now())
        })
        .await
    }

    async fn segment_members(
        &self,
        environment_id: EnvironmentId,
        segment_id: i64,
        after: Option<String>,
        limit: usize,
    ) -> StoreResult<MemberPage> {
        self.read(move |connection| {
            flags::segment_members(connection, environment_id, segment_id, after.as_deref(), limit)
        })
        .await
    }

    async fn profile(&self, environment_id: EnvironmentId, profile_id: &str) -> StoreResult<Option<Profile>> {
        let profile_id = profile_id.to_owned();
        self.read(move |connection| {
            let Some(current_id) = current_profile_id(connection, environment_id, &profile_id)? else {
                return Ok(None);
            };
            load_row(connection, environment_id, &current_id)?
                .map(|row| row.into_profile(connection, environment_id))
                .transpose()
        })
        .await
    }

    async fn profile_by_identifier(
        &self,
        environment_id: EnvironmentId,
        kind: IdentifierKind,
        value: &str,
    ) -> StoreResult<Option<Profile>> {
        let value = value.to_owned();
        self.read(move |connection| {
            find_row_by_identifier(connection, environment_id, kind, &value)?
                .map(|row| row.into_profile(connection, environment_id))
                .transpose()
        })
        .await
    }

    async fn list_profiles(
        &self,
        environment_id: EnvironmentId,
        filter: ProfileFilter,
        after: Option<String>,
        limit: usize,
    ) -> StoreResult<ProfilePage> {
        self.read(move |connection| {
            let after = after.unwrap_or_default();
            // One more row than asked tells whether another page exists.
            let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
            let rows: Vec<StoredProfileRow> = match &filter.trait_equals {
                None => {
                    let sql = format!(
                        "SELECT {} FROM profiles p WHERE p.environment_id = ?1 AND p.profile_id > ?2 \
                         ORDER BY p.profile_id LIMIT ?3",
                        profile_columns!()
                    );
                    let mut statement = connection.prepare_cached(&sql)?;
                    statement
                        .query_map(params![environment_id, after, fetch], stored_profile_from_row)?
                        .collect::<Result<_, _>>()?
                }
                Some((key, value)) => {
                    // `->` yields the trait's JSON text, so comparing with the canonical JSON of
                    // the wanted value matches type and value exactly (30 ≠ "30").
                    let sql = format!(
                        "SELECT {} FROM profiles p WHERE p.environment_id = ?1 AND p.profile_id > ?2 \
                         AND (p.traits -> ?4) = ?5 ORDER BY p.profile_id LIMIT ?3",
                        profile_columns!()
                    );
                    let path = format!("$.\"{key}\"");
                    let wanted =
                        serde_json::to_string(value).map_err(|error| StoreError::Corrupt(error.to_string()))?;
                    let mut statement = connection.prepare_cached(&sql)?;
                    statement
                        .query_map(params![environment_id, after, fetch, path, wanted], stored_profile_from_row)?
                        .collect::<Result<_, _>>()?
                }
            };
            let has_more = rows.len() > limit;
            let profiles = rows
                .into_iter()
                .take(limit)
                .map(|row| row.into_profile(connection, environment_id))
                .collect::<StoreResult<Vec<_>>>()?;
            let next_after = if has_more { profiles.last().map(|profile| profile.profile_id.clone()) } else { None };
            Ok(ProfilePage { profiles, next_after })
        })
        .await
    }
}

#[cfg(test)]
mod contract_tests {
    use std::sync::Arc;

    use super::SqliteStore;
    use crate::Store;

    async fn fresh_store() -> Option<(Arc<dyn Store>, tempfile::TempDir)> {
        let directory = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(directory.path()).expect("open sqlite store");
        Some((Arc::new(store), directory))
    }

    crate::store_contract_suite!(fresh_store());

    async fn production_environment(store: &dyn Store) -> crate::EnvironmentRecord {
        store
            .create_environment(crate::NewEnvironment {
                slug: "production".into(),
                name: "production".into(),
                client_key: "client".into(),
                server_key_hash: "hash".into(),
                created_at: roster_core::Timestamp::from_micros(1),
            })
            .await
            .unwrap()
    }

    /// A value too large to build is an error, not an allocation that takes the server down.
    #[tokio::test]
    async fn a_value_too_large_to_build_fails_the_query() {
        let (store, _directory) = fresh_store().await.expect("sqlite store");
        let environment = production_environment(store.as_ref()).await;
        let bounds = crate::QueryBounds { timeout: std::time::Duration::from_secs(5), max_rows: 10 };
        let huge = store.query(environment.id, "SELECT length(randomblob(1000000000))", bounds).await;
        assert!(matches!(huge, Err(crate::StoreError::QueryFailed(_))), "{huge:?}");
    }

    /// The WAL is copied back into the database file while the store runs (by the checkpointer
    /// thread, since no commit does it any more), so the WAL does not grow without bound.
    #[tokio::test]
    async fn the_wal_is_checkpointed_into_the_database_file_while_the_store_runs() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(directory.path()).unwrap();
        let environment = production_environment(&store).await;
        let database_file = directory.path().join(super::DATABASE_FILE_NAME);
        let size_before = std::fs::metadata(&database_file).unwrap().len();
        let mut traits = serde_json::Map::new();
        traits.insert("about".into(), serde_json::Value::String("x".repeat(1500)));
        traits.insert("bio".into(), serde_json::Value::String("y".repeat(1500)));
        // 2,000 profiles of ~3 KB: about twice the WAL size that asks for a checkpoint.
        for batch in 0..20 {
            let commands = (0..100)
                .map(|index| {
                    roster_core::IdentifyCommand::new(
                        Some(format!("user-{batch}-{index}")),
                        None,
                        traits.clone(),
                        serde_json::Map::new(),
                        roster_core::Timestamp::from_micros(2),
                        &roster_core::Limits::default(),
                    )
                    .unwrap()
                })
                .collect();
            store.identify(environment.id, commands, crate::WritePolicy::default()).await.unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let size = std::fs::metadata(&database_file).unwrap().len();
            if size > size_before + 4_000_000 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the database file is still {size} bytes (was {size_before}): the WAL was not checkpointed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn committed_writes_are_there_after_reopening() {
        let directory = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(directory.path()).unwrap();
            crate::contract::new_user_and_anonymous_id_make_one_profile(&store).await;
        }
        let reopened = SqliteStore::open(directory.path()).unwrap();
        let environments = reopened.environments().await.unwrap();
        let profile = reopened
            .profile_by_identifier(environments[0].id, roster_core::IdentifierKind::UserId, "u1")
            .await
            .unwrap();
        assert!(profile.is_some());
    }
}
