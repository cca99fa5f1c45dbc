//! The embedded backend: one SQLite file in WAL mode.
//!
//! This file owns what is SQLite-specific: opening the file (pragmas,
//! creating it and its directory), the two pools, and the dialect constants
//! [`impl_store!`](crate::shared::impl_store) needs. The [`Store`](crate::Store)
//! methods themselves are shared with PostgreSQL (`shared.rs`, `sql.rs`).
//!
//! **Concurrency model.** SQLite allows one writer at a time per file. All
//! writes go through a pool of exactly one connection, so in-process writers
//! queue on the pool instead of contending for the file lock, and every
//! write transaction starts with `BEGIN IMMEDIATE`, taking the write lock up
//! front: a transaction never reads and then fails to upgrade to a writer
//! (the `SQLITE_BUSY` deadlock of deferred transactions), and another
//! process writing the same file is waited for (`busy_timeout`), not raced.
//! Reads use a separate pool of several `query_only` connections, which in
//! WAL mode never block on, nor are blocked by, the writer.

use crate::sql::{claim_idle_vm, select_owner, select_resource};
use crate::{Result, shared::impl_store};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};
use std::path::Path;
use std::time::Duration;

/// How long a connection waits for another process's lock on the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections in the read pool.
const READERS: u32 = 4;

/// The SQLite store. Cheap to clone (the pools are shared).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed, with its parent directories) the database
    /// file at `path` and applies the migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);

        let write = SqlitePoolOptions::new()
            .max_connections(1)
            // Writers queue here; keep the connection for good.
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone().create_if_missing(true))
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&write).await?;

        let read = SqlitePoolOptions::new()
            .max_connections(READERS)
            .acquire_timeout(Duration::from_secs(30))
            // Refuses writes, so nothing can bypass the single writer.
            .connect_with(options.pragma("query_only", "ON"))
            .await?;

        Ok(SqliteStore { write, read })
    }

    /// The pool of one connection every write goes through.
    pub fn write_pool(&self) -> &SqlitePool {
        &self.write
    }

    /// The pool of read-only connections.
    pub fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    /// Closes both pools, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }

    // ---- what `impl_store!` needs (see `shared.rs`)

    const BACKEND: &'static str = "sqlite";
    /// None: `BEGIN IMMEDIATE` already makes a write transaction exclusive.
    const LOCK_TENANTS: Option<&'static str> = None;
    /// No row locks in SQLite; the write transaction holds the file's lock.
    const SELECT_RESOURCE_FOR_WRITE: &'static str = select_resource!();
    const CLAIM_IDLE_VM: &'static str = claim_idle_vm!("");
    /// None: `BEGIN IMMEDIATE` already serializes every write transaction.
    const LOCK_TENANT: Option<&'static str> = None;
    /// No row locks; the write transaction holds the file's lock.
    const SELECT_OWNER_FOR_CAP: &'static str = select_owner!();

    fn reader(&self) -> &SqlitePool {
        &self.read
    }

    fn writer(&self) -> &SqlitePool {
        &self.write
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }
}

impl_store!(SqliteStore, Sqlite);
