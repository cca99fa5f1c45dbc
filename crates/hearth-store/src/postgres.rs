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
//!
//! **Replicas.** Besides the pool, each store instance keeps two
//! connections of its own: the *lead* connection, whose session holds one
//! advisory lock per tenant this instance reconciles ([`Store::lead`]; the
//! locks end with the session, so a replica that dies frees its tenants at
//! once), and the *listener* (`LISTEN hearth_wake`, [`Store::wakes`]). A
//! task measures the database's clock every [`clock::RESYNC`]
//! ([`crate::clock`]).
//!
//! [`Store::lead`]: crate::Store::lead
//! [`Store::wakes`]: crate::Store::wakes

use crate::secrets::Secrets;
use crate::shared::{WriteCount, WriteTx, impl_store};
use crate::sql::{claim_idle_vm, select_agent, select_owner, select_resource};
use crate::{Leads, Result, Wake, clock};
use hearth_core::ids::TenantId;
use sqlx::Connection;
use sqlx::postgres::PgPoolOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener};
use sqlx::{PgPool, Postgres};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Connections per server process.
const MAX_CONNECTIONS: u32 = 16;

/// The namespace of hearth's advisory locks (the first key of the
/// two-key form, which never meets the one-key form sqlx's migrations use):
/// "hear" in ASCII.
pub const LEAD_LOCK_NAMESPACE: i32 = 0x6865_6172;

/// What the lead connection calls itself (`pg_stat_activity`).
pub const LEAD_APPLICATION_NAME: &str = "hearth-lead";

/// The lead connection's name for `replica` (PostgreSQL keeps 63 bytes).
fn lead_application_name(replica: &str) -> String {
    let mut name = format!("{LEAD_APPLICATION_NAME} {replica}");
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// Longest the lead query may take before the session is taken for dead
/// (a partitioned connection would otherwise hang a pass).
const LEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel replicas wake each other on.
const WAKE_CHANNEL: &str = "hearth_wake";

/// Takes the locks of the tenants not led yet, in one round trip that also
/// proves the session alive.
const TRY_LEAD: &str = "SELECT u.tenant FROM unnest($1::text[], $2::int4[]) AS u(tenant, key) \
                        WHERE pg_try_advisory_lock($3, u.key)";

/// The PostgreSQL store. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// This instance's finished writes (`Store::change_token`).
    writes: Arc<WriteCount>,
    /// The secrets key, once unlocked.
    secrets: Arc<Secrets>,
    /// The session whose advisory locks are this instance's leads.
    lead: Arc<tokio::sync::Mutex<LeadSession>>,
    /// Names this instance in its wakes, so it never wakes itself.
    origin: Arc<str>,
    /// The replica this instance serves, in its lead connection's name
    /// (`hearth-lead <replica>` in `pg_stat_activity`): who reconciles
    /// which tenant is visible to an operator (and a test).
    replica: Arc<std::sync::Mutex<String>>,
    /// Measures the clock while any clone lives.
    _clock: Arc<AbortOnDrop>,
}

#[derive(Debug, Default)]
struct LeadSession {
    conn: Option<PgConnection>,
    /// The tenants whose lock the session holds.
    held: HashSet<TenantId>,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A tenant's lock key in [`LEAD_LOCK_NAMESPACE`]: FNV-1a of its id. Two
/// tenants sharing a key are led together (the lock is re-entrant in one
/// session), never by two replicas at once.
pub fn lead_key(tenant: TenantId) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in tenant.to_string().bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash as i32
}

/// Measures the database's clock against this host's (three samples, the
/// shortest round trip kept) and sets the store's offset.
async fn measure_clock(pool: &PgPool) -> Result<i64> {
    let mut samples = Vec::with_capacity(3);
    for _ in 0..3 {
        let before = clock::local_millis();
        let db: i64 =
            sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8")
                .fetch_one(pool)
                .await?;
        samples.push((before, db, clock::local_millis()));
    }
    let offset = clock::offset_from(&samples).unwrap_or(0);
    clock::set_offset(offset);
    Ok(offset)
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
        let offset = measure_clock(&pool).await?;
        if offset.abs() > 1_000 {
            tracing::warn!(
                offset_ms = offset,
                "this host's clock is off the database's; the store keeps the database's time"
            );
        }
        let resync = {
            let pool = pool.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(clock::RESYNC).await;
                    if let Err(e) = measure_clock(&pool).await {
                        tracing::warn!(error = %e, "cannot measure the database's clock");
                    }
                }
            })
        };
        Ok(PgStore {
            pool,
            writes: Arc::default(),
            secrets: Arc::default(),
            lead: Arc::default(),
            origin: uuid::Uuid::new_v4().simple().to_string().into(),
            replica: Arc::new(std::sync::Mutex::new(String::new())),
            _clock: Arc::new(AbortOnDrop(resync)),
        })
    }

    /// Measures the database's clock now (as every [`clock::RESYNC`]) and
    /// answers the offset in use.
    pub async fn measure_clock(&self) -> Result<i64> {
        measure_clock(&self.pool).await
    }

    /// The lead connection's options: the pool's, named, with TCP
    /// keepalives on the server's side so a replica cut off frees its
    /// tenants within seconds, not when the kernel gives up.
    fn lead_options(&self) -> PgConnectOptions {
        self.pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&lead_application_name(
                &self.replica.lock().expect("replica name lock"),
            ))
            .options([
                ("tcp_keepalives_idle", "5"),
                ("tcp_keepalives_interval", "2"),
                ("tcp_keepalives_count", "3"),
            ])
    }

    fn set_replica_name(&self, replica: &str) {
        *self.replica.lock().expect("replica name lock") = replica.to_owned();
    }

    async fn lead_tenants(&self, tenants: &[TenantId]) -> Result<Leads> {
        let mut guard = self.lead.lock().await;
        let session = &mut *guard;
        let mut lost = HashSet::new();
        loop {
            let fresh = session.conn.is_none();
            if fresh {
                session.conn = Some(PgConnection::connect_with(&self.lead_options()).await?);
            }
            let wanted: Vec<TenantId> = tenants
                .iter()
                .filter(|t| !session.held.contains(t))
                .copied()
                .collect();
            let names: Vec<String> = wanted.iter().map(|t| t.to_string()).collect();
            let keys: Vec<i32> = wanted.iter().map(|t| lead_key(*t)).collect();
            let conn = session.conn.as_mut().expect("connected above");
            let answer = tokio::time::timeout(
                LEAD_TIMEOUT,
                sqlx::query_scalar::<_, String>(TRY_LEAD)
                    .bind(names)
                    .bind(keys)
                    .bind(LEAD_LOCK_NAMESPACE)
                    .fetch_all(&mut *conn),
            )
            .await;
            match answer {
                Ok(Ok(taken)) => {
                    for name in taken {
                        if let Some(t) = wanted.iter().find(|t| t.to_string() == name) {
                            session.held.insert(*t);
                        }
                    }
                    return Ok(Leads {
                        led: session.held.clone(),
                        lost,
                    });
                }
                failed => {
                    // The session is gone (or unusable): its locks went with
                    // it, or go when the server notices. Start over on a new
                    // one; a new one failing too is the caller's error.
                    session.conn = None;
                    lost.extend(session.held.drain());
                    if !lost.is_empty() {
                        tracing::warn!(
                            tenants = lost.len(),
                            "the lead connection died: its leads are lost"
                        );
                    }
                    if fresh {
                        return Err(match failed {
                            Ok(Err(e)) => e.into(),
                            _ => sqlx::Error::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "the lead query timed out",
                            ))
                            .into(),
                        });
                    }
                }
            }
        }
    }

    /// Test hook: the process id of the lead session, if connected (a
    /// test ends it with `pg_terminate_backend` to play a lost connection).
    #[doc(hidden)]
    pub async fn lead_backend_pid(&self) -> Option<i32> {
        let mut guard = self.lead.lock().await;
        let conn = guard.conn.as_mut()?;
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(conn)
            .await
            .ok()
    }

    async fn send_wake(&self, tenant: Option<TenantId>) -> Result<()> {
        let what = tenant.map_or_else(|| "*".to_owned(), |t| t.to_string());
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(WAKE_CHANNEL)
            .bind(format!("{} {what}", self.origin))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn listen_wakes(&self) -> tokio::sync::mpsc::UnboundedReceiver<Wake> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let pool = self.pool.clone();
        let origin = self.origin.clone();
        tokio::spawn(async move {
            let mut listener = None::<PgListener>;
            loop {
                let Some(l) = listener.as_mut() else {
                    let opened = async {
                        let mut l = PgListener::connect_with(&pool).await?;
                        l.listen(WAKE_CHANNEL).await?;
                        Ok::<_, sqlx::Error>(l)
                    };
                    tokio::select! {
                        _ = tx.closed() => return,
                        opened = opened => match opened {
                            Ok(l) => {
                                listener = Some(l);
                                // Wakes sent while no one listened are lost.
                                if tx.send(None).is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot listen for other replicas' wakes; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        },
                    }
                    continue;
                };
                let received = tokio::select! {
                    _ = tx.closed() => return,
                    received = l.try_recv() => received,
                };
                let wake = match received {
                    Ok(Some(n)) => match n.payload().split_once(' ') {
                        Some((from, _)) if from == &*origin => continue,
                        Some((_, tenant)) => tenant.parse::<TenantId>().ok(),
                        None => None,
                    },
                    // The connection was lost; the next call reconnects,
                    // and wakes sent meanwhile are lost.
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "listening for other replicas' wakes failed; reconnecting");
                        listener = None;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        None
                    }
                };
                if tx.send(wake).is_err() {
                    return;
                }
            }
        });
        rx
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
    /// Orders a tenant's events by commit: the transaction appending them
    /// holds this lock (`$1`: tenant id) until it ends, so ids taken after
    /// it commit after it ("hevt" namespace, two-key form).
    const LOCK_EVENTS: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(1751479924, hashtext($1))::text");
    /// Serializes `create_agent`'s cap check per owner (see
    /// [`LOCK_TENANT`](Self::LOCK_TENANT) for `NO KEY UPDATE`).
    const SELECT_OWNER_FOR_CAP: &'static str = concat!(select_owner!(), " FOR NO KEY UPDATE");
    /// A spawn's parent check: `FOR SHARE` conflicts with the row lock of
    /// the `UPDATE` that kills or ends the parent, so a parent cannot end
    /// between the check and the child's commit unseen.
    const SELECT_PARENT_FOR_SPAWN: &'static str = concat!(select_agent!(), " FOR SHARE");
    /// Appended to the reads a write makes before it changes a row and
    /// emits its event (the old phase, steps or state the event names).
    const ROW_LOCK: &'static str = " FOR UPDATE";

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
