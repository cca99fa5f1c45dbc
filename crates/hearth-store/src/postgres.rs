//! The PostgreSQL backend, for several server replicas sharing one database.
//!
//! This file owns what is PostgreSQL-specific: connecting (one pool for
//! reads and writes alike) and the dialect constants
//! [`impl_store!`](crate::shared::impl_store) needs — row locks
//! (`SELECT … FOR UPDATE`) in read-modify-write transactions, `LOCK TABLE`
//! around bootstrap, a lock on the tenant's row around the capped VM insert
//! and on the owner's row around the capped agent create, and
//! `FOR UPDATE SKIP LOCKED` in the VM claim so that concurrent claimers take
//! different VMs instead of queueing on the same one. The [`Store`](crate::Store) methods themselves are shared with
//! SQLite (`shared.rs`, `sql.rs`).
//!
//! Transactions run at PostgreSQL's default isolation, READ COMMITTED; the
//! locks above, the foreign keys and the unique constraints are what make
//! concurrent writers safe, not the isolation level.

use crate::Result;
use crate::secrets::Secrets;
use crate::shared::{WriteCount, WriteTx, impl_store};
use crate::sql::{claim_idle_vm, select_agent, select_owner, select_resource};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use std::sync::Arc;
use std::time::Duration;

/// Connections per server process.
const MAX_CONNECTIONS: u32 = 16;

/// The PostgreSQL store. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// This instance's finished writes (`Store::change_token`).
    writes: Arc<WriteCount>,
    /// The secrets key, once unlocked.
    secrets: Arc<Secrets>,
}

impl PgStore {
    /// Connects to the database at `url` and applies the migrations (sqlx
    /// holds an advisory lock while migrating, so replicas starting together
    /// are safe).
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            // No ping before each use (a round trip per statement, on the
            // claim path too). A connection broken under it fails its
            // statement and is dropped; callers retry as for any error.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PgStore {
            pool,
            writes: Arc::default(),
            secrets: Arc::default(),
        })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- what `impl_store!` needs (see `shared.rs`)

    const BACKEND: &'static str = "postgres";
    /// Makes bootstrap's count-then-insert exclusive across servers: it
    /// waits for any transaction that wrote `tenants` (another bootstrap, a
    /// `create_tenant`) to finish, and counts only after that committed.
    const LOCK_TENANTS: Option<&'static str> = Some("LOCK TABLE tenants IN EXCLUSIVE MODE");
    const SELECT_RESOURCE_FOR_WRITE: &'static str = concat!(select_resource!(), " FOR UPDATE");
    const CLAIM_IDLE_VM: &'static str = claim_idle_vm!("FOR UPDATE SKIP LOCKED");
    /// Serializes `insert_vm_within_cap` per tenant: the count of one
    /// caller sees every VM an earlier one inserted. `NO KEY UPDATE`
    /// conflicts with itself but not with the `KEY SHARE` locks that
    /// foreign-key checks take, so inserts referring to the tenant (VMs,
    /// agents, resources) do not wait on it.
    const LOCK_TENANT: Option<&'static str> =
        Some("SELECT id FROM tenants WHERE id = $1 FOR NO KEY UPDATE");
    /// Serializes `create_agent`'s cap check per owner (see
    /// [`LOCK_TENANT`](Self::LOCK_TENANT) for `NO KEY UPDATE`).
    const SELECT_OWNER_FOR_CAP: &'static str = concat!(select_owner!(), " FOR NO KEY UPDATE");
    /// A spawn's parent check: `FOR SHARE` conflicts with the row lock of
    /// the `UPDATE` that kills or ends the parent, so a parent cannot end
    /// between the check and the child's commit unseen.
    const SELECT_PARENT_FOR_SPAWN: &'static str = concat!(select_agent!(), " FOR SHARE");

    fn reader(&self) -> &PgPool {
        &self.pool
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<WriteTx<Postgres>> {
        Ok(WriteTx::new(self.pool.begin().await?, self.writes.clone()))
    }

    fn writes(&self) -> &WriteCount {
        &self.writes
    }

    fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Rewrites `resources` (`VACUUM FULL`), so the row versions that held
    /// the plaintext are no longer in the table's files. Only after a
    /// store's first sealing (a one-time upgrade): it locks the table while
    /// it runs. Old copies in PostgreSQL's WAL and backups are not hearth's
    /// to erase (ARCHITECTURE.md, Trust boundaries).
    async fn after_sealing(&self) -> Result<()> {
        sqlx::query("VACUUM FULL resources")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The server's current snapshot (`xmin:xmax:in-progress ids`). A
    /// write a later read does not see has not ended yet: its transaction
    /// id is at or past `xmax`, or in the list. Once it ends, every later
    /// snapshot has it below `xmax` and out of the list, so the text never
    /// comes back. Cluster-wide: any database's writes move it too.
    async fn database_mark(&self) -> Result<String> {
        Ok(sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&self.pool)
            .await?)
    }
}

impl_store!(PgStore, Postgres);
