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
//! WAL mode never block on, nor are blocked by, the writer. One more
//! `query_only` connection, opened on first use, only answers `PRAGMA
//! data_version` for [`Store::change_token`](crate::Store::change_token).

use crate::secrets::Secrets;
use crate::shared::{WriteCount, WriteTx, impl_store};
use crate::sql::{claim_idle_vm, select_agent, select_owner, select_resource};
use crate::{Leads, Result, Wake};
use hearth_core::ids::TenantId;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Sqlite, SqlitePool};
use std::path::Path;
use std::sync::Arc;
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
    /// This instance's finished writes (`Store::change_token`).
    writes: Arc<WriteCount>,
    watch: Arc<tokio::sync::Mutex<Watch>>,
    /// The secrets key, once unlocked.
    secrets: Arc<Secrets>,
}

/// The connection of its own that `PRAGMA data_version` is asked on for
/// `Store::change_token`: its answer moves whenever any other connection
/// (the writer, another process) commits, and is only comparable between
/// calls on one connection.
#[derive(Debug)]
struct Watch {
    options: SqliteConnectOptions,
    conn: Option<SqliteConnection>,
    /// Connections opened so far, part of the mark: a new connection's
    /// answers do not compare with an old one's.
    opened: u64,
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
            // No ping before each use: it is a round trip to the
            // connection's thread, as dear as a statement, and a SQLite
            // file connection does not go stale.
            .test_before_acquire(false)
            // Writers queue here; keep the connection for good.
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(30))
            // What a write replaces or deletes is overwritten with zeros
            // in the file, so no old secret (a value sealed over, a
            // deleted environment) lingers in free space of a copy.
            .connect_with(
                options
                    .clone()
                    .create_if_missing(true)
                    .pragma("secure_delete", "ON"),
            )
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&write).await?;

        let read = SqlitePoolOptions::new()
            .max_connections(READERS)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            // Refuses writes, so nothing can bypass the single writer.
            .connect_with(options.clone().pragma("query_only", "ON"))
            .await?;

        let watch = Watch {
            options: options.pragma("query_only", "ON"),
            conn: None,
            opened: 0,
        };
        Ok(SqliteStore {
            write,
            read,
            writes: Arc::default(),
            watch: Arc::new(tokio::sync::Mutex::new(watch)),
            secrets: Arc::default(),
        })
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
        if let Some(conn) = self.watch.lock().await.conn.take() {
            let _ = conn.close().await;
        }
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
    /// None: the one writer commits events in id order already.
    const LOCK_EVENTS: Option<&'static str> = None;
    /// No row locks; the write transaction holds the file's lock.
    const SELECT_OWNER_FOR_CAP: &'static str = select_owner!();
    /// No row locks; the write transaction holds the file's lock.
    const SELECT_PARENT_FOR_SPAWN: &'static str = select_agent!();
    /// No row locks; the write transaction holds the file's lock.
    const ROW_LOCK: &'static str = "";

    fn reader(&self) -> &SqlitePool {
        &self.read
    }

    fn writer(&self) -> &SqlitePool {
        &self.write
    }

    async fn begin_write(&self) -> Result<WriteTx<Sqlite>> {
        let tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTx::new(tx, self.writes.clone()))
    }

    fn writes(&self) -> &WriteCount {
        &self.writes
    }

    fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Checkpoints the WAL into the file and truncates it, so the frames
    /// that held the plaintext are gone (the file's old cells are zeroed by
    /// `secure_delete`).
    async fn after_sealing(&self) -> Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// `<connections opened>:<PRAGMA data_version>` on the watch
    /// connection (opened again after an error).
    async fn database_mark(&self) -> Result<String> {
        let mut guard = self.watch.lock().await;
        let watch = &mut *guard;
        let conn = match &mut watch.conn {
            Some(conn) => conn,
            None => {
                let conn = watch.options.connect().await?;
                watch.opened += 1;
                watch.conn.insert(conn)
            }
        };
        match sqlx::query_scalar::<_, i64>("PRAGMA data_version")
            .fetch_one(&mut *conn)
            .await
        {
            Ok(version) => Ok(format!("{}:{version}", watch.opened)),
            Err(e) => {
                watch.conn = None;
                Err(e.into())
            }
        }
    }

    /// One process: it leads every tenant it is asked for, and never loses
    /// a lead.
    fn set_replica_name(&self, _replica: &str) {}

    async fn lead_tenants(&self, tenants: &[TenantId]) -> Result<Leads> {
        Ok(Leads {
            led: tenants.iter().copied().collect(),
            lost: Default::default(),
        })
    }

    /// Nothing to tell: no other process reconciles this file.
    async fn send_wake(&self, _tenant: Option<TenantId>) -> Result<()> {
        Ok(())
    }

    /// Closed at once: no other process sends wakes.
    fn listen_wakes(&self) -> tokio::sync::mpsc::UnboundedReceiver<Wake> {
        tokio::sync::mpsc::unbounded_channel().1
    }
}

impl_store!(SqliteStore, Sqlite);
