//! hearth's store: the one interface to desired state and the record of every
//! VM, with two real backends chosen by the database URL — embedded SQLite
//! (default, WAL) and PostgreSQL (for several server replicas).
//!
//! **Invariants:**
//! - Every multi-row change is one transaction; a VM claim is one statement
//!   (compare-and-set in SQLite, `FOR UPDATE SKIP LOCKED` in PostgreSQL),
//!   never a read followed by a write in another transaction.
//! - Every lifecycle change appends its event(s) in the same transaction
//!   (the outbox, `emit.rs`): a change never commits without its event, nor
//!   an event without its change; a change that fails or does nothing
//!   appends none.
//! - Every query is scoped by tenant; no method returns another tenant's rows.
//! - The store never calls a driver and never validates specs: it stores the
//!   JSON the API has already parsed and validated.
//! - Migrations are versioned, one folder per backend, applied on open.

pub mod clock;
mod emit;
mod error;
mod postgres;
pub mod secrets;
mod shared;
mod sql;
mod sqlite;
mod types;

pub use error::{IdentityRefusal, ParentProblem, StoreError};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use types::*;

/// The store's own SQL text, for benchmarks that measure the database
/// alone against the same statements (`hearth-bench throughput`). Nothing
/// in hearth uses it; it exists so that a raw baseline runs exactly what
/// the store runs.
pub mod raw {
    use crate::sql::claim_idle_vm;

    /// The VM claim as [`SqliteStore`](crate::SqliteStore) runs it (the
    /// same macro and locking clause as its `CLAIM_IDLE_VM`): `$1` tenant,
    /// `$2` workspace, `$3` agent, `$4` now (ms); returns the claimed row.
    pub const SQLITE_CLAIM_IDLE_VM: &str = claim_idle_vm!("");

    /// The VM claim as [`PgStore`](crate::PgStore) runs it (the same macro
    /// and locking clause as its `CLAIM_IDLE_VM`); parameters as
    /// [`SQLITE_CLAIM_IDLE_VM`].
    pub const POSTGRES_CLAIM_IDLE_VM: &str = claim_idle_vm!("FOR UPDATE SKIP LOCKED");
}

/// Command output (and errors carrying it) as it can be stored: a NUL,
/// which PostgreSQL's text cannot hold, becomes U+FFFD. Output is whatever
/// bytes a command printed; it is kept, not refused.
pub fn storable_text(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

use async_trait::async_trait;
use hearth_core::ids::{AgentId, InstanceId, NodeId, TenantId, TokenId, VmId};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::Kind;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// Result of a store call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What [`Store::change_token`] answers: equal tokens mean nothing was
/// written in between. Opaque; only compared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChangeToken {
    /// Writes this store instance has finished.
    writes: u64,
    /// The database's own mark of every writer's commits.
    database: String,
}

impl ChangeToken {
    pub(crate) fn new(writes: u64, database: String) -> ChangeToken {
        ChangeToken { writes, database }
    }
}

/// What [`Store::lead`] answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leads {
    /// The tenants this store instance leads now (of those asked for and
    /// those it led already).
    pub led: HashSet<TenantId>,
    /// Tenants it led before this call and lost since: its lock connection
    /// died, so another replica may have led them meanwhile. Those in `led`
    /// again were taken anew and need a takeover like any new lead.
    pub lost: HashSet<TenantId>,
}

/// What [`Store::wakes`] delivers: a tenant another replica wrote to, or
/// `None` when some wakes may have been missed (the listening connection
/// was lost and is back) or the writer did not say which tenant.
pub type Wake = Option<TenantId>;

/// The store interface. Both backends pass the same test suite.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// Checks the database answers.
    async fn ping(&self) -> Result<()>;

    /// A cheap mark of everything written to the database so far: read it
    /// *before* reading some state, and while later calls answer an equal
    /// token, nothing has been written since, so what was read is still
    /// what the store holds (a reader can keep it instead of reading again).
    ///
    /// **Guarantee:** let a call answer T. Every write that a read started
    /// after that call might not see — by this store instance (a
    /// transaction, a single statement, whatever its outcome) or by
    /// anything else on the same database (another store instance or
    /// process, another server replica) — makes every call started once
    /// that write has ended (its method returned, its commit is done)
    /// answer a token other than T. So reads started after T was answered
    /// hold everything written as long as the token still equals T.
    /// Tokens may also change when nothing relevant was written (another
    /// database on the same PostgreSQL server, a write that changed no
    /// row): a conservative false positive, never a missed change.
    ///
    /// How: an in-process count of this instance's writes, each counted
    /// once it has ended, plus what the database says of every writer —
    /// on SQLite `PRAGMA data_version` of a connection of its own (it
    /// moves on every commit by any other connection, in this process or
    /// another), on PostgreSQL the current snapshot (`pg_current_snapshot()`:
    /// it changes for good whenever any transaction of the server that
    /// wrote something ends, and a write not yet visible to a read is still
    /// in progress in it).
    async fn change_token(&self) -> Result<ChangeToken>;

    /// Names the replica this store serves where the database shows its
    /// sessions (PostgreSQL: the lead connection's `application_name`,
    /// `hearth-lead <replica>`); nothing elsewhere.
    fn name_replica(&self, replica: &str) {
        let _ = replica;
    }

    /// On an empty store (no tenant at all), creates the first tenant, its
    /// pool config (`pool_config`, the spec of the `default` singleton), an
    /// `operator` developer identity in it and that identity's token, in one
    /// transaction, and returns them. On a store with any tenant, does
    /// nothing and returns `None`. Safe to race from several servers.
    async fn bootstrap(
        &self,
        tenant_name: &str,
        identity_name: &str,
        token: &NewToken,
        pool_config: &serde_json::Value,
    ) -> Result<Option<(Tenant, Identity)>>;

    /// Creates a tenant with its pool config (`pool_config`, the spec of
    /// the `default` singleton), one `admin` developer identity and its
    /// token, in one transaction. `AlreadyExists` when the name is taken.
    async fn create_tenant(
        &self,
        name: &str,
        admin_name: &str,
        token: &NewToken,
        pool_config: &serde_json::Value,
    ) -> Result<(Tenant, Identity)>;

    /// Gives every tenant that has no pool config this one (stores written
    /// before every tenant had one), in one statement; returns how many
    /// got one. Safe to race from several servers.
    async fn backfill_pool_configs(&self, pool_config: &serde_json::Value) -> Result<u64>;

    /// All tenants, oldest first.
    async fn list_tenants(&self) -> Result<Vec<Tenant>>;

    /// Creates an identity (and, when given, its first token) in one
    /// transaction. `AlreadyExists` when the name is taken in the tenant.
    async fn create_identity(
        &self,
        tenant: TenantId,
        name: &str,
        kind: IdentityKind,
        role: Role,
        token: Option<&NewToken>,
    ) -> Result<Identity>;

    /// One identity by name. `NotFound` when absent.
    async fn get_identity(&self, tenant: TenantId, name: &str) -> Result<Identity>;

    /// The tenant's identities, by name.
    async fn list_identities(&self, tenant: TenantId) -> Result<Vec<Identity>>;

    /// Deletes an identity and every token of it, in one transaction that
    /// also checks: its role is at most `ceiling` (else
    /// `IdentityRefused(AboveCeiling)`), and it is not the tenant's last
    /// identity whose role holds `identity.update` (else
    /// `IdentityRefused(LastManager)`). Concurrent deletes in one tenant
    /// serialize, so two admins deleting each other cannot both succeed.
    /// Returns the deleted identity; `NotFound` when absent.
    async fn delete_identity(
        &self,
        tenant: TenantId,
        name: &str,
        ceiling: Role,
    ) -> Result<Identity>;

    /// Adds a token to an existing identity whose role is at most
    /// `ceiling` (else `IdentityRefused(AboveCeiling)`), in one
    /// transaction. `NotFound` when absent.
    async fn create_token(
        &self,
        tenant: TenantId,
        identity_name: &str,
        token: &NewToken,
        ceiling: Role,
    ) -> Result<()>;

    /// Looks a token up by its public id, with its identity and tenant.
    async fn find_token(&self, id: TokenId) -> Result<Option<TokenRecord>>;

    /// Whether the database holds a secrets key check: some key has sealed
    /// (or was set to seal) its secrets, and only that key opens them.
    async fn secrets_sealed(&self) -> Result<bool>;

    /// From now on seals every secret written (environment `env` values,
    /// repo URLs with a credential) with `key` and opens them on read
    /// ([`secrets`]). In one transaction: makes the key check when there
    /// is none, refuses a key that does not match it (`SecretsLocked`),
    /// and seals every secret still stored as plaintext (a store from
    /// before, or written unlocked), leaving versions alone; idempotent.
    /// Returns how many resources it sealed. A store never unlocked stores
    /// secrets as given and refuses to read sealed ones.
    async fn unlock_secrets(&self, key: secrets::SecretsKey) -> Result<u64>;

    /// One resource, or `None`.
    async fn get_resource(
        &self,
        tenant: TenantId,
        kind: Kind,
        name: &str,
    ) -> Result<Option<ResourceRecord>>;

    /// The tenant's resources of one kind, by name.
    async fn list_resources(&self, tenant: TenantId, kind: Kind) -> Result<Vec<ResourceRecord>>;

    /// Creates or replaces a resource in one transaction: checks the
    /// precondition (`Conflict`), checks every reference exists
    /// (`MissingReference`), writes the spec (bumping `version` only when
    /// the spec changed) and replaces the resource's recorded references;
    /// a change appends `resource.written` naming `put.actor`.
    async fn put_resource(&self, put: PutResource<'_>) -> Result<PutOutcome>;

    /// Deletes a resource in one transaction, with its `resource.deleted`
    /// event naming `actor` (the identity that deleted it, when one did).
    /// `NotFound` when absent, `InUse` while another resource refers to it.
    async fn delete_resource(
        &self,
        tenant: TenantId,
        kind: Kind,
        name: &str,
        actor: Option<&str>,
    ) -> Result<ResourceRecord>;

    /// Takes the lead of `tenants` this instance does not lead yet and
    /// answers every tenant it leads. One reconciler per tenant: on
    /// PostgreSQL a session advisory lock per tenant (key in hearth's own
    /// namespace) on one connection of its own, outside the pool, so a lead
    /// lasts exactly as long as that session; the call is one round trip
    /// (`pg_try_advisory_lock` over `unnest`) that also proves the session
    /// alive. When it died, every lead is lost (answered in
    /// [`Leads::lost`]): it connects again and starts over. An error means
    /// nothing is led (the caller must assume every lead lost). SQLite is
    /// one process: it leads everything it is asked for.
    async fn lead(&self, tenants: &[TenantId]) -> Result<Leads>;

    /// Tells every other store instance on the database that something of
    /// `tenant` (or, `None`, of some tenant) changed: PostgreSQL `NOTIFY
    /// hearth_wake`; SQLite: nothing (one process).
    async fn notify_wake(&self, tenant: Option<TenantId>) -> Result<()>;

    /// The wakes other store instances send ([`Store::notify_wake`]; never
    /// this instance's own), from `LISTEN hearth_wake` on a connection of
    /// its own that reconnects by itself (a [`Wake`] of `None` after each
    /// reconnection: wakes may have been missed). The listening ends when
    /// the receiver is dropped. SQLite: a receiver that is closed at once.
    fn wakes(&self) -> tokio::sync::mpsc::UnboundedReceiver<Wake>;

    /// Compare-and-set of a VM's `task_owner` (the replica with a task in
    /// flight on it): only when it is `from` (`None`: no owner). Changes
    /// nothing else. Returns whether it changed.
    async fn set_vm_task_owner(
        &self,
        id: VmId,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<bool>;

    /// A node joins the fleet, or joins again under its name (its id,
    /// state and first join kept; everything else replaced). Returns the
    /// stored record.
    async fn join_node(&self, node: &NodeRecord) -> Result<NodeRecord>;

    /// `NotFound` when no such node joined.
    async fn get_node(&self, id: NodeId) -> Result<NodeRecord>;

    /// Every node, by name.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>>;

    /// A node reports: its heartbeat is now (the store's clock), its
    /// capacity as given.
    async fn node_heartbeat(&self, id: NodeId, capacity: &NodeCapacity) -> Result<NodeRecord>;

    /// An operator cordons, drains or readies a node (by name).
    async fn set_node_state(&self, name: &str, state: NodeState) -> Result<NodeRecord>;

    /// What the live VMs take of each node (one entry per node with live
    /// VMs; `node: None` for VMs not placed).
    async fn node_usage(&self) -> Result<Vec<NodeUsage>>;

    /// A node's live VMs, oldest first.
    async fn list_node_vms(&self, node: NodeId) -> Result<Vec<VmRecord>>;

    // ---- events (the log of every lifecycle change; see `EventKind`)

    /// Appends `events` to `tenant`'s log in one transaction of their own,
    /// for changes that are not a store write (a flush's result, a step a
    /// driver ran). Changes the store writes append theirs in the same
    /// transaction as the change.
    async fn append_events(&self, tenant: TenantId, events: &[NewEvent]) -> Result<()>;

    /// `tenant`'s events after `filter.after`, oldest first, at most
    /// `filter.limit` (at most [`EVENT_PAGE_MAX`]). Ids grow in commit
    /// order within a tenant: a reader that saw id N never later finds an
    /// unseen event below N.
    async fn list_events(&self, tenant: TenantId, filter: &EventFilter)
    -> Result<Vec<EventRecord>>;

    /// Deletes every tenant's events older than `before` (the retention
    /// window); returns how many.
    async fn prune_events(&self, before: Millis) -> Result<u64>;

    /// Stores the artifact whose bytes `data` yields, under `digest` (its
    /// SHA-256, lower-case hex), streamed in chunks of
    /// [`ARTIFACT_CHUNK_BYTES`], never whole in memory. The bytes are
    /// hashed as they are written and the marker row that makes the
    /// artifact servable is written last, only when they hash to `digest`:
    /// a half-written artifact (an upload that died, or read bytes that do
    /// not match) is never served. Bytes that hash to another digest are
    /// `InvalidArtifact`, and their chunks are dropped. An artifact already
    /// whole is not written again. Returns the stored artifact.
    async fn put_artifact(
        &self,
        digest: &str,
        data: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    ) -> Result<Artifact>;

    /// The whole artifact stored under `digest`, if there is one.
    async fn get_artifact(&self, digest: &str) -> Result<Option<Artifact>>;

    /// Chunk `seq` (from 0) of the whole artifact `digest`; `NotFound` when
    /// the artifact is not whole or has no such chunk.
    async fn read_artifact_chunk(&self, digest: &str, seq: i64) -> Result<Vec<u8>>;

    /// Records a VM as given, with no capacity check (tests, benchmarks and
    /// adoption use it; the pool uses [`Store::insert_vm_within_cap`]).
    async fn insert_vm(&self, vm: &VmRecord) -> Result<()>;

    /// In one transaction: counts the tenant's live VMs
    /// ([`VmState::LIVE`]) and inserts `vm` only while that count is below
    /// `max_vms`. When `vm.reserved_for` names an agent, that agent must be
    /// `queued` (in the VM's tenant) and becomes `provisioning` in the same
    /// transaction. Capacity is checked first: a refused insert reserves
    /// nothing. `NotFound` for an unknown tenant.
    async fn insert_vm_within_cap(&self, vm: &VmRecord, max_vms: i64) -> Result<InsertVm>;

    /// Claims the tenant's oldest non-stale idle, non-test VM of a workspace
    /// (a stale one when no fresh one is idle) for an agent, in one
    /// statement: no VM is ever handed to two agents.
    async fn claim_idle_vm(
        &self,
        tenant: TenantId,
        workspace: &str,
        agent: AgentId,
    ) -> Result<Option<VmRecord>>;

    /// In one transaction: claims an idle VM (as [`Store::claim_idle_vm`])
    /// for a `queued` agent and makes the agent `running` on it. `None`
    /// when nothing is idle or the agent is no longer `queued` (or unknown,
    /// or another tenant's); the VM then stays idle. `AlreadyExists` when a
    /// queued agent still holds another VM (it was never released).
    async fn assign_idle_vm(
        &self,
        tenant: TenantId,
        workspace: &str,
        agent: AgentId,
    ) -> Result<Option<VmRecord>>;

    /// One VM. `NotFound` when absent.
    async fn get_vm(&self, id: VmId) -> Result<VmRecord>;

    /// The tenant's VMs, oldest first; only live ones unless `include_dead`.
    async fn list_vms(&self, tenant: TenantId, include_dead: bool) -> Result<Vec<VmRecord>>;

    /// Every live VM of every tenant (for adoption at start).
    async fn list_live_vms(&self) -> Result<Vec<VmRecord>>;

    /// Compare-and-set of a VM's state: only when it is in `from` (empty:
    /// never). Sets `error` when given (keeps the recorded one otherwise);
    /// clears `agent_id` when `to` is not `assigned`, and `reserved_for` when
    /// `to` is not `booting`, `provisioning` or `assigned` (a cold boot keeps
    /// its reservation through its provisioning step). Returns whether it
    /// changed.
    async fn set_vm_state(
        &self,
        id: VmId,
        from: &[VmState],
        to: VmState,
        error: Option<&str>,
    ) -> Result<bool>;

    /// A VM finished booting, in one transaction: if it is `reserved_for` an
    /// agent that is still `provisioning`, it becomes `assigned` to it and
    /// the agent `running` (vm_id, started_at); otherwise it becomes `idle`.
    /// Either way the reservation is cleared (it is fulfilled or void).
    /// `Gone` when it is not booting/provisioning (unknown included).
    async fn vm_ready(&self, id: VmId) -> Result<Ready>;

    /// Gives an `assigned` VM back, in one transaction: to `idle` (agent
    /// cleared) or to `draining` — only while it is still assigned to
    /// `holder`, the agent the caller saw on it (compare-and-set: a VM that
    /// changed hands since is left alone). The agent's `vm_id` is cleared if
    /// it still names this VM and the agent is not terminal. Returns whether
    /// it changed.
    async fn release_vm(&self, id: VmId, holder: Option<AgentId>, to_idle: bool) -> Result<bool>;

    /// Marks live VMs of a workspace stale when built from other versions
    /// or another setup digest than these (an empty recorded digest, from
    /// before digests existed, differs from every current one); returns how
    /// many were newly marked.
    async fn mark_stale(
        &self,
        tenant: TenantId,
        workspace: &str,
        env_version: i64,
        image_version: i64,
        setup_digest: &str,
    ) -> Result<u64>;

    /// Spawns an agent in one transaction: when it has a parent, the
    /// parent must be an agent of the tenant (`BadParent(NotFound)`), of
    /// the same owner (`BadParent(OtherOwner)`) and not terminal
    /// (`BadParent(Terminal)`) — checked under a lock on the parent's row,
    /// so a kill committing meanwhile is either seen or waits; then the
    /// cap check of [`Store::create_agent`], a claim of an idle VM of its workspace (as
    /// [`Store::claim_idle_vm`]) and the agent's insert — `running` on the
    /// claimed VM, or `queued` when none is idle. Nothing else (the pool
    /// reconciler included) sees the agent before it is settled, so it
    /// cannot be claimed for twice. Errors as [`Store::create_agent`].
    async fn spawn_agent(
        &self,
        agent: &NewAgent,
        developer_cap: Option<i32>,
    ) -> Result<AgentRecord>;

    /// Creates a `queued` agent, in one transaction with the cap check: when
    /// `developer_cap` is `Some(n)` with n > 0, the owner is a developer and
    /// the agent has no parent, the owner's active top-level agents
    /// ([`AgentPhase::ACTIVE`], parent_id null) must be fewer than n, else
    /// `LimitReached(n)`. Concurrent creates for one owner serialize. When
    /// the cap applies the owner must be an identity of the tenant
    /// (`NotFound` otherwise); `AlreadyExists` for a taken id, `NotFound`
    /// for an unknown tenant.
    async fn create_agent(
        &self,
        agent: &NewAgent,
        developer_cap: Option<i32>,
    ) -> Result<AgentRecord>;

    /// One agent of the tenant. `NotFound` when absent.
    async fn get_agent(&self, tenant: TenantId, id: AgentId) -> Result<AgentRecord>;

    /// The tenant's agents matching `filter`, oldest first.
    async fn list_agents(&self, tenant: TenantId, filter: &AgentFilter)
    -> Result<Vec<AgentRecord>>;

    /// The tenant's `queued` agents in FIFO order (queued_at, id).
    async fn list_queued_agents(&self, tenant: TenantId) -> Result<Vec<AgentRecord>>;

    /// Compare-and-set of an agent's phase: only from one of `from`, else
    /// `Conflict`. Entering `queued` sets queued_at and clears vm_id,
    /// exit_code, error and output; entering a terminal phase sets
    /// finished_at; entering `running` sets started_at; `update` fields
    /// that are `Some` are written. Resurrection (terminal → queued) adds
    /// one to `resurrections`.
    async fn transition_agent(
        &self,
        tenant: TenantId,
        id: AgentId,
        from: &[AgentPhase],
        to: AgentPhase,
        update: &AgentUpdate,
    ) -> Result<AgentRecord>;

    /// The pool's own state for a tenant (default: running).
    async fn get_pool_state(&self, tenant: TenantId) -> Result<PoolState>;

    /// Stops (`pool flush --nuke`) or starts (`pool up`) a tenant's pool.
    async fn set_pool_stopped(&self, tenant: TenantId, stopped: bool) -> Result<()>;

    /// The tenant's workspace back-off states, by workspace.
    async fn list_workspace_states(&self, tenant: TenantId) -> Result<Vec<WorkspaceState>>;

    /// One workspace's back-off state, if it has one.
    async fn get_workspace_state(
        &self,
        tenant: TenantId,
        workspace: &str,
    ) -> Result<Option<WorkspaceState>>;

    /// Creates or replaces one workspace's back-off state.
    async fn put_workspace_state(&self, tenant: TenantId, state: &WorkspaceState) -> Result<()>;

    /// Records a build the first time a server of it starts (idempotent).
    async fn register_build(&self, id: &str) -> Result<Build>;

    /// Retires a build (idempotent; keeps the first retirement time).
    /// `NotFound` when unknown.
    async fn retire_build(&self, id: &str) -> Result<Build>;

    /// Every build, oldest first.
    async fn list_builds(&self) -> Result<Vec<Build>>;

    /// Records a provisioning run.
    async fn create_instance(&self, instance: &InstanceRecord) -> Result<()>;

    /// Updates a run's status, steps and summary (one statement); sets
    /// `finished_at` when the status is not `provisioning`. A `provisioning`
    /// update of a run that has ended already changes nothing (a late
    /// progress write never undoes the end). `NotFound` when absent or,
    /// for such a late progress write, ended.
    async fn update_instance(
        &self,
        id: InstanceId,
        status: InstanceStatus,
        steps: &serde_json::Value,
        summary: Option<&serde_json::Value>,
    ) -> Result<()>;

    /// A workspace's pool VMs (never test boots) that are warm and on
    /// their way, and its pool boots started at `failed_since` or later
    /// that failed.
    async fn warm_pool_counts(
        &self,
        tenant: TenantId,
        workspace: &str,
        failed_since: Millis,
    ) -> Result<WarmPoolCounts>;

    /// One run of the tenant. `NotFound` when absent.
    async fn get_instance(&self, tenant: TenantId, id: InstanceId) -> Result<InstanceRecord>;

    /// The tenant's runs matching `filter`, newest first.
    async fn list_instances(
        &self,
        tenant: TenantId,
        filter: &InstanceFilter,
    ) -> Result<Vec<InstanceRecord>>;

    /// Records a new bake job (state `queued`). `Conflict` when a bake of
    /// the same image is queued or running already (a unique index holds
    /// it: two bakes of one image never run at once, whichever server asks).
    async fn create_bake(&self, bake: &BakeRecord) -> Result<()>;

    /// Moves a job on and appends to its log (one statement). A job that
    /// has ended changes no more: `NotFound` when absent or ended.
    async fn update_bake(&self, id: &str, update: BakeUpdate<'_>) -> Result<()>;

    /// One bake job of the tenant. `NotFound` when absent.
    async fn get_bake(&self, tenant: TenantId, id: &str) -> Result<BakeRecord>;

    /// An image's bake jobs, newest first (at most 100).
    async fn list_bakes(&self, tenant: TenantId, image: &str) -> Result<Vec<BakeRecord>>;

    /// Marks every queued or running bake failed with `reason` (at server
    /// start: a bake that was running when the server died never ends by
    /// itself). Returns how many.
    async fn fail_active_bakes(&self, reason: &str) -> Result<u64>;

    // ---- webhooks (per-tenant endpoints sent the tenant's events)
    //
    // Delivery is at least once. A replica delivers a webhook's events only
    // while it holds the webhook's lease ([`Store::lease_webhooks`], a
    // compare-and-set on `lease_owner`/`lease_until`), one event at a time
    // in id order, and records each attempt with
    // [`Store::record_delivery`], which moves the cursor only while the
    // lease is still its own. So two replicas never deliver one webhook at
    // once while the lease holds; a replica that dies after the receiver
    // answered but before it recorded the attempt leaves the event to be
    // sent again by whoever takes the lease over (receivers deduplicate on
    // `X-Hearth-Delivery`).

    /// Creates a webhook, its secret sealed with the secrets key (when the
    /// store has one); its cursor starts at the tenant's newest event.
    /// `Conflict` when the tenant has one of that name.
    async fn create_webhook(&self, webhook: &NewWebhook) -> Result<WebhookRecord>;

    /// `tenant`'s webhooks by name.
    async fn list_webhooks(&self, tenant: TenantId) -> Result<Vec<WebhookRecord>>;

    /// `tenant`'s webhook named `name`.
    async fn get_webhook(&self, tenant: TenantId, name: &str) -> Result<Option<WebhookRecord>>;

    /// Deletes `tenant`'s webhook named `name` and its delivery log;
    /// whether there was one.
    async fn delete_webhook(&self, tenant: TenantId, name: &str) -> Result<bool>;

    /// Takes, or renews, the lease of every enabled webhook (of every
    /// tenant) whose lease is free, expired or `owner`'s own, until
    /// `now + lease_ms`, and answers them.
    async fn lease_webhooks(&self, owner: &str, lease_ms: i64) -> Result<Vec<WebhookRecord>>;

    /// Gives `owner`'s webhook leases up, so another replica takes them
    /// over at once (at shutdown).
    async fn release_webhooks(&self, owner: &str) -> Result<()>;

    /// Records one attempt at delivering `attempt.event_id` to `webhook`,
    /// in one transaction with the state it leaves: delivered or failed
    /// moves the cursor to the event, retrying keeps it and remembers the
    /// attempts and the next attempt's time. Nothing is written (`false`)
    /// when `owner` no longer holds the lease or the cursor is already
    /// past the event.
    async fn record_delivery(
        &self,
        owner: &str,
        webhook: &str,
        attempt: &DeliveryAttempt,
    ) -> Result<bool>;

    /// Webhook `webhook`'s (by id) delivery log, newest first, at most
    /// `limit` (at most [`DELIVERY_PAGE_MAX`]).
    async fn list_webhook_deliveries(
        &self,
        webhook: &str,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>>;

    /// Deletes every delivery-log row that finished before `before` (the
    /// log's retention window); returns how many.
    async fn prune_webhook_deliveries(&self, before: Millis) -> Result<u64>;

    // ---- dashboard sessions (H4)

    /// Opens a dashboard session for `session.token`, recording the token's
    /// identity and tenant with it, and forgets expired sessions. Fails
    /// with `NotFound` when the token is gone.
    async fn create_ui_session(&self, session: &NewUiSession) -> Result<()>;

    /// The live session whose id hashes to `id_sha256`: `None` when it is
    /// unknown or expired, or its token is gone, expired, or no longer the
    /// identity's and tenant's it was opened for.
    async fn find_ui_session(&self, id_sha256: &[u8]) -> Result<Option<UiSession>>;

    /// Ends a session (signing out); true when there was one.
    async fn delete_ui_session(&self, id_sha256: &[u8]) -> Result<bool>;

    // ---- pass status (reconcile passes)

    /// Keeps `pass` as its tenant's last reconcile pass, over the one
    /// before (one statement). Like every write, it moves the change token:
    /// the leader calls it only for passes worth showing elsewhere.
    async fn put_reconcile_pass(&self, pass: &ReconcilePassRecord) -> Result<()>;

    /// The tenant's last reconcile pass kept, if any.
    async fn get_reconcile_pass(&self, tenant: TenantId) -> Result<Option<ReconcilePassRecord>>;
}

/// Opens the store a URL names, applying migrations: `postgres://…` or
/// `postgresql://…` for PostgreSQL, `sqlite://PATH` or no URL for SQLite
/// (default file: `<data_dir>/hearth.db`).
pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Store>> {
    match url {
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            Ok(Arc::new(PgStore::connect(u).await?))
        }
        Some(u) if u.starts_with("sqlite:") => {
            let path = u
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            Ok(Arc::new(SqliteStore::open(Path::new(path)).await?))
        }
        Some(u) => Err(StoreError::InvalidUrl(u.to_owned())),
        None => Ok(Arc::new(
            SqliteStore::open(&data_dir.join("hearth.db")).await?,
        )),
    }
}
