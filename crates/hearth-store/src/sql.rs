//! What both backends share verbatim: the SQL text, the raw row shapes and
//! their decoding into the typed records of [`crate::types`], and the
//! mapping of constraint violations to [`StoreError`]s.
//!
//! Every statement uses `$N` parameters, which PostgreSQL and sqlx's SQLite
//! driver both accept, and only syntax both dialects understand
//! (`RETURNING`, `ON CONFLICT`, partial indexes). The few
//! statements that differ (row locks, the VM claim) are built here from one
//! text with the backend's locking clause spliced in, so the two copies
//! cannot drift apart.
//!
//! Statements that test a list of states or phases (`state IN (…)`) splice
//! in the enums' fixed spellings: built once (`LazyLock`) for the fixed
//! lists such as [`VmState::LIVE`], per call for a caller's `from` list.
//! No user text is ever spliced into SQL; everything else is a parameter.
//! Flags are BIGINT 0/1 on both backends ([`flag`], [`store_flag`]).

use crate::secrets::SecretsKey;
use crate::{
    AgentPhase, AgentRecord, BakeRecord, BakeState, Build, Identity, InstanceFilter,
    InstanceRecord, InstanceStatus, Millis, NodeCapacity, NodeRecord, NodeState, OnIdle,
    ResourceRecord, Result, StoreError, Tenant, TokenRecord, VmRecord, VmState, WorkspaceState,
};
use hearth_core::ids::{AgentId, IdentityId, InstanceId, NodeId, TenantId, TokenId, VmId};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::Kind;
use std::fmt::Display;
use std::str::FromStr;
use std::sync::LazyLock;

// ---------------------------------------------------------------- tenants

pub const COUNT_TENANTS: &str = "SELECT count(*) FROM tenants";

pub const INSERT_TENANT: &str = "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)";

pub const LIST_TENANTS: &str = "SELECT id, name, created_at FROM tenants ORDER BY created_at, id";

// ------------------------------------------------------------- identities

pub const INSERT_IDENTITY: &str = "INSERT INTO identities (id, tenant_id, name, kind, role, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6)";

pub const GET_IDENTITY: &str = "SELECT id, tenant_id, name, kind, role, created_at FROM identities \
     WHERE tenant_id = $1 AND name = $2";

pub const LIST_IDENTITIES: &str = "SELECT id, tenant_id, name, kind, role, created_at FROM identities \
     WHERE tenant_id = $1 ORDER BY name";

/// Tokens go with it (`ON DELETE CASCADE`).
pub const DELETE_IDENTITY: &str = "DELETE FROM identities WHERE tenant_id = $1 AND name = $2";

// ----------------------------------------------------------------- tokens

pub const INSERT_TOKEN: &str = "INSERT INTO tokens (id, identity_id, secret_sha256, expires_at, created_at) \
     VALUES ($1, $2, $3, $4, $5)";

pub const FIND_TOKEN: &str = "SELECT t.id AS token_id, t.secret_sha256, t.expires_at, \
            i.id, i.tenant_id, i.name, i.kind, i.role, i.created_at \
     FROM tokens t JOIN identities i ON i.id = t.identity_id \
     WHERE t.id = $1";

// -------------------------------------------------------------- secrets

/// The key check, when one was made ([`crate::secrets`]).
pub const SELECT_SECRETS_CHECK: &str = "SELECT key_check FROM secrets_key WHERE id = 1";

/// Records the key check of the first key (`$1`), at `$2`; a check already
/// there stays (it is what every later key must match).
pub const INSERT_SECRETS_CHECK: &str = "INSERT INTO secrets_key (id, key_check, created_at) \
     VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING";

// -------------------------------------------------------------- resources

/// The text of [`SELECT_RESOURCE`], as a literal so a backend can append a
/// locking clause with `concat!`.
macro_rules! select_resource {
    () => {
        "SELECT tenant_id, kind, name, spec, version, created_at, updated_at FROM resources \
         WHERE tenant_id = $1 AND kind = $2 AND name = $3"
    };
}
pub(crate) use select_resource;

pub const SELECT_RESOURCE: &str = select_resource!();

pub const LIST_RESOURCES: &str = "SELECT tenant_id, kind, name, spec, version, created_at, updated_at FROM resources \
     WHERE tenant_id = $1 AND kind = $2 ORDER BY name";

pub const RESOURCE_EXISTS: &str =
    "SELECT 1 FROM resources WHERE tenant_id = $1 AND kind = $2 AND name = $3";

/// A `default` pool config, version 1, for every tenant without one.
pub const BACKFILL_POOL_CONFIGS: &str = "INSERT INTO resources (tenant_id, kind, name, spec, version, created_at, updated_at) \
     SELECT t.id, 'pool-config', 'default', $1, 1, $2, $3 FROM tenants t \
     WHERE NOT EXISTS (SELECT 1 FROM resources r \
         WHERE r.tenant_id = t.id AND r.kind = 'pool-config' AND r.name = 'default') \
     ON CONFLICT (tenant_id, kind, name) DO NOTHING";

pub const INSERT_RESOURCE: &str = "INSERT INTO resources (tenant_id, kind, name, spec, version, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

pub const UPDATE_RESOURCE: &str = "UPDATE resources SET spec = $4, version = $5, updated_at = $6 \
     WHERE tenant_id = $1 AND kind = $2 AND name = $3";

/// Every resource of the kinds that can hold secrets, for sealing the
/// plaintext ones of an older store.
pub const LIST_SECRET_RESOURCES: &str = "SELECT tenant_id, kind, name, spec, version, created_at, updated_at FROM resources \
     WHERE kind IN ('environment', 'workspace') ORDER BY tenant_id, kind, name";

/// Replaces a spec's text only if it is still the one read (a writer with
/// the key may have replaced it meanwhile); version and times unchanged:
/// sealing changes how a spec is stored, not what it says.
pub const RESEAL_RESOURCE: &str = "UPDATE resources SET spec = $4 \
     WHERE tenant_id = $1 AND kind = $2 AND name = $3 AND spec = $5";

pub const DELETE_RESOURCE: &str =
    "DELETE FROM resources WHERE tenant_id = $1 AND kind = $2 AND name = $3";

pub const DELETE_REFS_FROM: &str =
    "DELETE FROM resource_refs WHERE tenant_id = $1 AND from_kind = $2 AND from_name = $3";

pub const INSERT_REF: &str = "INSERT INTO resource_refs (tenant_id, from_kind, from_name, to_kind, to_name) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";

/// The first resource (by kind, then name) that refers to the one named.
pub const FIRST_REFERRER: &str = "SELECT from_kind, from_name FROM resource_refs \
     WHERE tenant_id = $1 AND to_kind = $2 AND to_name = $3 \
     ORDER BY from_kind, from_name LIMIT 1";

// -------------------------------------------------------------------- VMs

/// The columns of a [`VmRow`], in order, as a literal for `concat!`.
macro_rules! vm_columns {
    () => {
        "id, tenant_id, workspace, state, agent_id, driver, env_version, image_version, \
         stale, reserved_for, test, error, created_at, updated_at, setup_digest, node_id, cpus, \
         memory_mib, task_owner"
    };
}
pub(crate) use vm_columns;

/// `$1`…`$19` in [`vm_columns!`] order.
pub const INSERT_VM: &str = concat!(
    "INSERT INTO vms (",
    vm_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
);

/// [`INSERT_VM`] only while the tenant (`$2`) has fewer than `$20` live
/// VMs: the count and the insert as one statement, for a backend whose
/// write transactions are exclusive anyway (SQLite). 0 rows: at capacity.
pub static INSERT_VM_WITHIN_CAP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO vms ({}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
         $16, $17, $18, $19 \
         WHERE (SELECT count(*) FROM vms WHERE tenant_id = $2 AND state IN {}) < $20",
        vm_columns!(),
        in_list(VmState::LIVE.iter().map(|s| s.as_str()))
    )
});

/// A booted VM (`$1`) reserved for no agent goes idle at `$2`: the common
/// case of [`Store::vm_ready`](crate::Store::vm_ready) as one statement.
pub const READY_UNRESERVED_VM_TO_IDLE: &str = "UPDATE vms \
     SET state = 'idle', agent_id = NULL, updated_at = $2 \
     WHERE id = $1 AND state IN ('booting', 'provisioning') AND reserved_for IS NULL \
     RETURNING tenant_id, workspace";

pub const GET_VM: &str = concat!("SELECT ", vm_columns!(), " FROM vms WHERE id = $1");

pub const LIST_VMS: &str = concat!(
    "SELECT ",
    vm_columns!(),
    " FROM vms WHERE tenant_id = $1 ORDER BY created_at, id"
);

/// The tenant's live VMs, oldest first.
pub static LIST_LIVE_VMS_OF_TENANT: LazyLock<String> = LazyLock::new(|| {
    format!(
        concat!(
            "SELECT ",
            vm_columns!(),
            " FROM vms WHERE tenant_id = $1 AND state IN {} ORDER BY created_at, id"
        ),
        in_list(VmState::LIVE.iter().map(|s| s.as_str()))
    )
});

/// Every tenant's live VMs, oldest first.
pub static LIST_LIVE_VMS: LazyLock<String> = LazyLock::new(|| {
    format!(
        concat!(
            "SELECT ",
            vm_columns!(),
            " FROM vms WHERE state IN {} ORDER BY created_at, id"
        ),
        in_list(VmState::LIVE.iter().map(|s| s.as_str()))
    )
});

/// How many live VMs a tenant has (`$1`): what counts against `max_vms`.
pub static COUNT_LIVE_VMS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT count(*) FROM vms WHERE tenant_id = $1 AND state IN {}",
        in_list(VmState::LIVE.iter().map(|s| s.as_str()))
    )
});

/// The VM claim as one compare-and-set statement: `$1` tenant, `$2`
/// workspace, `$3` agent, `$4` now. Fresh VMs before stale ones, then
/// oldest first; test VMs never, nor VMs of a draining node (they are
/// being replaced elsewhere). The argument is the locking clause of the
/// inner select (`"FOR UPDATE SKIP LOCKED"` on PostgreSQL, `""` on SQLite,
/// whose single writer serializes claims anyway); the outer
/// `state = 'idle'` makes the update a no-op if the row changed meanwhile.
macro_rules! claim_idle_vm {
    ($lock:literal) => {
        concat!(
            "UPDATE vms SET state = 'assigned', agent_id = $3, reserved_for = NULL, updated_at = $4 \
             WHERE id = (SELECT id FROM vms \
                         WHERE tenant_id = $1 AND workspace = $2 AND state = 'idle' AND test = 0 \
                         AND (node_id IS NULL OR node_id NOT IN \
                              (SELECT id FROM nodes WHERE state = 'draining')) \
                         ORDER BY stale, created_at, id LIMIT 1 ",
            $lock,
            ") AND state = 'idle' AND test = 0 RETURNING ",
            $crate::sql::vm_columns!()
        )
    };
}
pub(crate) use claim_idle_vm;

/// Whether an agent (`$2`, tenant `$1`) is `queued`: a cheap early out
/// before a claim, which [`START_QUEUED_AGENT`] still confirms.
/// A `queued` agent that holds no VM (a resurrected or woken agent whose
/// previous VM is not given back yet waits for that first).
pub const AGENT_IS_QUEUED: &str = "SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2 AND phase = 'queued' \
     AND NOT EXISTS (SELECT 1 FROM vms WHERE vms.agent_id = agents.id)";

/// Makes a `queued` agent (`$2`, tenant `$1`) `running` on VM `$3` at `$4`;
/// 0 rows when it is not `queued` (any more).
pub const START_QUEUED_AGENT: &str = "UPDATE agents \
     SET phase = 'running', vm_id = $3, started_at = $4, updated_at = $4 \
     WHERE tenant_id = $1 AND id = $2 AND phase = 'queued'";

/// Makes a `queued` agent (`$2`, tenant `$1`) `provisioning` at `$3` (a VM
/// is being booted for it); 0 rows when it is not `queued`.
pub const RESERVE_QUEUED_AGENT: &str = "UPDATE agents SET phase = 'provisioning', updated_at = $3 \
     WHERE tenant_id = $1 AND id = $2 AND phase = 'queued'";

/// A VM that is still booting or provisioning (`$1`): its tenant, the
/// agent it is reserved for and its workspace.
pub const SELECT_BOOTING_VM: &str = "SELECT tenant_id, reserved_for, workspace FROM vms \
     WHERE id = $1 AND state IN ('booting', 'provisioning')";

/// A booted VM (`$1`) goes to the agent (`$2`) it was reserved for, at `$3`;
/// 0 rows unless it is still booting/provisioning and reserved for `$2`.
pub const READY_VM_TO_AGENT: &str = "UPDATE vms \
     SET state = 'assigned', agent_id = $2, reserved_for = NULL, updated_at = $3 \
     WHERE id = $1 AND state IN ('booting', 'provisioning') AND reserved_for = $2";

/// A booted VM (`$1`) becomes warm at `$2`; 0 rows unless it is still
/// booting/provisioning.
pub const READY_VM_TO_IDLE: &str = "UPDATE vms \
     SET state = 'idle', agent_id = NULL, reserved_for = NULL, updated_at = $2 \
     WHERE id = $1 AND state IN ('booting', 'provisioning')";

/// Undoes [`READY_VM_TO_AGENT`] in the same transaction when the agent
/// turned out not to be `provisioning` any more: the VM (`$1`) is warm
/// instead, at `$2`.
pub const UNASSIGN_READY_VM: &str = "UPDATE vms \
     SET state = 'idle', agent_id = NULL, updated_at = $2 \
     WHERE id = $1 AND state = 'assigned'";

/// The reserved agent (`$2`, tenant `$3`) of a booted VM (`$1`) starts
/// running on it at `$4`; 0 rows unless it is still `provisioning`.
pub const START_PROVISIONING_AGENT: &str = "UPDATE agents \
     SET phase = 'running', vm_id = $1, started_at = $4, updated_at = $4 \
     WHERE id = $2 AND tenant_id = $3 AND phase = 'provisioning'";

/// Releases an `assigned` VM (`$1`) still held by the agent the caller saw
/// (`$4`, `NULL` for none) to state `$2` at `$3`.
pub const RELEASE_VM: &str = "UPDATE vms \
     SET state = $2, agent_id = NULL, reserved_for = NULL, updated_at = $3 \
     WHERE id = $1 AND state = 'assigned' AND COALESCE(agent_id, '') = COALESCE($4, '') \
     RETURNING tenant_id, workspace";

/// Forgets the VM (`$2`) of an agent (`$1`) that gave it back, at `$3`,
/// unless the agent is terminal (then it is the VM it was last on).
pub static FORGET_AGENT_VM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE agents SET vm_id = NULL, updated_at = $3 \
         WHERE id = $1 AND vm_id = $2 AND phase NOT IN {}",
        in_list(AgentPhase::TERMINAL.iter().map(|p| p.as_str()))
    )
});

/// `$1` tenant, `$2` workspace, `$3` env version, `$4` image version,
/// `$5` setup digest.
pub static MARK_STALE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE vms SET stale = 1 \
         WHERE tenant_id = $1 AND workspace = $2 AND state IN {} AND stale = 0 \
           AND (env_version <> $3 OR image_version <> $4 OR setup_digest <> $5)",
        in_list(VmState::LIVE.iter().map(|s| s.as_str()))
    )
});

/// The compare-and-set of [`Store::set_vm_state`](crate::Store::set_vm_state):
/// `$1` id, `$2` new state, `$3` now, `$4` error (`NULL`: keep). `from` is
/// spliced in as fixed spellings. Leaving the pre-ready states
/// (booting, provisioning) drops the reservation; leaving `assigned` drops
/// the agent.
pub fn set_vm_state(from: &[VmState], to: VmState) -> String {
    let agent = if to == VmState::Assigned {
        ""
    } else {
        ", agent_id = NULL"
    };
    let reservation = match to {
        VmState::Booting | VmState::Provisioning | VmState::Assigned => "",
        _ => ", reserved_for = NULL",
    };
    format!(
        "UPDATE vms SET state = $2, updated_at = $3, error = COALESCE($4, error){agent}{reservation} \
         WHERE id = $1 AND state IN {}",
        in_list(from.iter().map(|s| s.as_str()))
    )
}

// ----------------------------------------------------------------- agents

/// The columns of an [`AgentRow`], in order, as a literal for `concat!`.
macro_rules! agent_columns {
    () => {
        "id, tenant_id, workspace, owner_id, owner_name, owner_kind, parent_id, phase, vm_id, \
         on_idle, command, build, exit_code, output, error, resurrections, created_at, \
         updated_at, queued_at, started_at, finished_at"
    };
}
pub(crate) use agent_columns;

/// `$1`…`$21` in [`agent_columns!`] order.
pub const INSERT_AGENT: &str = concat!(
    "INSERT INTO agents (",
    agent_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
     $18, $19, $20, $21)"
);

/// The owner (`$2`) of a new agent in tenant `$1`, as a literal so a
/// backend can append a row lock with `concat!`: what serializes the
/// cap check of concurrent creates for one owner.
macro_rules! select_owner {
    () => {
        "SELECT id FROM identities WHERE tenant_id = $1 AND id = $2"
    };
}
pub(crate) use select_owner;

/// How many active top-level agents an owner (`$2`) has in tenant `$1`.
pub static COUNT_ACTIVE_TOP_LEVEL_AGENTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT count(*) FROM agents \
         WHERE tenant_id = $1 AND owner_id = $2 AND parent_id IS NULL AND phase IN {}",
        in_list(AgentPhase::ACTIVE.iter().map(|p| p.as_str()))
    )
});

/// Agent `$2` of tenant `$1`, as a literal so a backend can append a row
/// lock with `concat!` (a spawn's parent check).
macro_rules! select_agent {
    () => {
        concat!(
            "SELECT ",
            $crate::sql::agent_columns!(),
            " FROM agents WHERE tenant_id = $1 AND id = $2"
        )
    };
}
pub(crate) use select_agent;

pub const GET_AGENT: &str = select_agent!();

pub const LIST_QUEUED_AGENTS: &str = concat!(
    "SELECT ",
    agent_columns!(),
    " FROM agents WHERE tenant_id = $1 AND phase = 'queued' ORDER BY queued_at, id"
);

/// `$1` tenant, `$2` workspace or `NULL`, `$3` owner or `NULL`; the phases
/// (none: all) are spliced in as fixed spellings.
pub fn list_agents(phases: &[AgentPhase]) -> String {
    let phases = if phases.is_empty() {
        String::new()
    } else {
        format!(
            " AND phase IN {}",
            in_list(phases.iter().map(|p| p.as_str()))
        )
    };
    format!(
        concat!(
            "SELECT ",
            agent_columns!(),
            " FROM agents WHERE tenant_id = $1 AND ($2 IS NULL OR workspace = $2) \
             AND ($3 IS NULL OR owner_id = $3){} ORDER BY created_at, id"
        ),
        phases
    )
}

/// The compare-and-set of
/// [`Store::transition_agent`](crate::Store::transition_agent): `$1`
/// tenant, `$2` id, `$3` now, `$4` exit code, `$5` output, `$6` error (each
/// `NULL`: keep, or clear when entering `queued`). `from` (not empty) and
/// `to` are spliced in as fixed spellings.
pub fn transition_agent(from: &[AgentPhase], to: AgentPhase) -> String {
    let mut set = format!("phase = '{}', updated_at = $3", to.as_str());
    if to == AgentPhase::Queued {
        // On the right-hand side `phase` is still the old phase.
        set.push_str(&format!(
            ", queued_at = $3, vm_id = NULL, exit_code = $4, output = COALESCE($5, ''), \
             error = $6, resurrections = resurrections + \
             CASE WHEN phase IN {} THEN 1 ELSE 0 END",
            in_list(AgentPhase::TERMINAL.iter().map(|p| p.as_str()))
        ));
    } else {
        set.push_str(
            ", exit_code = COALESCE($4, exit_code), output = COALESCE($5, output), \
             error = COALESCE($6, error)",
        );
    }
    if to == AgentPhase::Running {
        set.push_str(", started_at = $3");
    }
    if to.is_terminal() {
        set.push_str(", finished_at = $3");
    }
    format!(
        concat!(
            "UPDATE agents SET {} WHERE tenant_id = $1 AND id = $2 AND phase IN {} RETURNING ",
            agent_columns!()
        ),
        set,
        in_list(from.iter().map(|p| p.as_str()))
    )
}

// ------------------------------------------------------------- pool state

pub const GET_POOL_STATE: &str = "SELECT stopped FROM pool_states WHERE tenant_id = $1";

pub const PUT_POOL_STATE: &str = "INSERT INTO pool_states (tenant_id, stopped, updated_at) \
     VALUES ($1, $2, $3) \
     ON CONFLICT (tenant_id) DO UPDATE SET stopped = excluded.stopped, updated_at = excluded.updated_at";

pub const LIST_WORKSPACE_STATES: &str = "SELECT workspace, consecutive_failures, backoff_until, \
            hard_limited, last_error, config_fingerprint \
     FROM workspace_states WHERE tenant_id = $1 ORDER BY workspace";

pub const GET_WORKSPACE_STATE: &str = "SELECT workspace, consecutive_failures, backoff_until, \
            hard_limited, last_error, config_fingerprint \
     FROM workspace_states WHERE tenant_id = $1 AND workspace = $2";

pub const PUT_WORKSPACE_STATE: &str = "INSERT INTO workspace_states \
            (tenant_id, workspace, consecutive_failures, backoff_until, hard_limited, \
             last_error, config_fingerprint) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (tenant_id, workspace) DO UPDATE SET \
         consecutive_failures = excluded.consecutive_failures, \
         backoff_until = excluded.backoff_until, \
         hard_limited = excluded.hard_limited, \
         last_error = excluded.last_error, \
         config_fingerprint = excluded.config_fingerprint";

// ----------------------------------------------------------------- builds

pub const INSERT_BUILD: &str = "INSERT INTO builds (id, first_seen, retired_at) VALUES ($1, $2, NULL) \
     ON CONFLICT (id) DO NOTHING";

pub const GET_BUILD: &str = "SELECT id, first_seen, retired_at FROM builds WHERE id = $1";

/// Keeps the first retirement time.
pub const RETIRE_BUILD: &str = "UPDATE builds SET retired_at = COALESCE(retired_at, $2) \
     WHERE id = $1 RETURNING id, first_seen, retired_at";

pub const LIST_BUILDS: &str =
    "SELECT id, first_seen, retired_at FROM builds ORDER BY first_seen, id";

// -------------------------------------------------------------- instances

/// The columns of an [`InstanceRow`], in order, as a literal for `concat!`.
macro_rules! instance_columns {
    () => {
        "id, tenant_id, workspace, vm_id, test, status, summary, steps, created_at, \
         updated_at, finished_at"
    };
}

/// `$1`…`$11` in [`instance_columns!`] order.
pub const INSERT_INSTANCE: &str = concat!(
    "INSERT INTO instances (",
    instance_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
);

/// `$1` id, `$2` status, `$3` steps, `$4` summary (`NULL`: none), `$5` now,
/// `$6` finish time (`NULL` while provisioning: keep the recorded one).
pub const UPDATE_INSTANCE: &str = "UPDATE instances \
     SET status = $2, steps = $3, summary = $4, updated_at = $5, \
         finished_at = COALESCE($6, finished_at) \
     WHERE id = $1 AND (status = 'provisioning' OR $2 <> 'provisioning')";

pub const GET_INSTANCE: &str = concat!(
    "SELECT ",
    instance_columns!(),
    " FROM instances WHERE tenant_id = $1 AND id = $2"
);

/// `$1` tenant, `$2` workspace, `$3` status, `$4` test flag, `$5` VM (each
/// `NULL`: any), `$6` limit; newest first.
pub const LIST_INSTANCES: &str = concat!(
    "SELECT ",
    instance_columns!(),
    " FROM instances WHERE tenant_id = $1 AND ($2 IS NULL OR workspace = $2) \
     AND ($3 IS NULL OR status = $3) AND ($4 IS NULL OR test = $4) \
     AND ($5 IS NULL OR vm_id = $5) \
     ORDER BY created_at DESC, id DESC LIMIT $6"
);

/// Ready, provisioning and recently failed pool VMs of a workspace.
pub const WARM_POOL_COUNTS: &str = "SELECT \
     (SELECT count(*) FROM vms WHERE tenant_id = $1 AND workspace = $2 AND test = 0 \
         AND state = 'idle'), \
     (SELECT count(*) FROM vms WHERE tenant_id = $1 AND workspace = $2 AND test = 0 \
         AND state IN ('booting', 'provisioning')), \
     (SELECT count(*) FROM instances WHERE tenant_id = $1 AND workspace = $2 AND test = 0 \
         AND status = 'failed' AND created_at >= $3)";

/// How many runs [`LIST_INSTANCES`] returns when the filter names no limit.
pub const DEFAULT_INSTANCE_LIMIT: i64 = 100;
/// The most runs one [`LIST_INSTANCES`] returns.
pub const MAX_INSTANCE_LIMIT: i64 = 1000;

/// The `LIMIT` of a listing: the filter's (default
/// [`DEFAULT_INSTANCE_LIMIT`]), clamped to `1..=`[`MAX_INSTANCE_LIMIT`].
pub fn instance_limit(filter: &InstanceFilter) -> i64 {
    filter
        .limit
        .unwrap_or(DEFAULT_INSTANCE_LIMIT)
        .clamp(1, MAX_INSTANCE_LIMIT)
}

/// `('a', 'b', …)` from fixed spellings (never user text). Callers never
/// pass an empty list: `IN ()` is not SQL.
fn in_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = items.into_iter().map(|i| format!("'{i}'")).collect();
    debug_assert!(!quoted.is_empty(), "IN () is not SQL");
    format!("({})", quoted.join(", "))
}

// ------------------------------------------------------------------ nodes

macro_rules! node_columns {
    () => {
        "id, name, address, ca_pem, credential_hash, state, drivers, cpus, memory_mib, \
         disk_mib, vm_slots, max_boots, joined_at, last_heartbeat, updated_at"
    };
}

/// A node joins (`$1`…`$15` in [`node_columns!`] order), or joins again
/// under its name: then its address, CA, credential, capacity and
/// heartbeat are replaced; its id, state and first join are kept.
pub const JOIN_NODE: &str = concat!(
    "INSERT INTO nodes (",
    node_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
     ON CONFLICT (name) DO UPDATE SET address = excluded.address, ca_pem = excluded.ca_pem, \
     credential_hash = excluded.credential_hash, drivers = excluded.drivers, \
     cpus = excluded.cpus, memory_mib = excluded.memory_mib, disk_mib = excluded.disk_mib, \
     vm_slots = excluded.vm_slots, max_boots = excluded.max_boots, \
     last_heartbeat = excluded.last_heartbeat, updated_at = excluded.updated_at \
     RETURNING ",
    node_columns!()
);

pub const GET_NODE: &str = concat!("SELECT ", node_columns!(), " FROM nodes WHERE id = $1");

pub const LIST_NODES: &str = concat!("SELECT ", node_columns!(), " FROM nodes ORDER BY name");

/// A heartbeat of node `$1` at `$2` with its capacity (`$3` drivers, `$4`
/// cpus, `$5` memory, `$6` disk, `$7` slots, `$8` boots).
pub const NODE_HEARTBEAT: &str = concat!(
    "UPDATE nodes SET last_heartbeat = $2, drivers = $3, cpus = $4, memory_mib = $5, \
     disk_mib = $6, vm_slots = $7, max_boots = $8 WHERE id = $1 RETURNING ",
    node_columns!()
);

/// An operator sets node `$1`'s state to `$2` at `$3`.
pub const SET_NODE_STATE: &str = concat!(
    "UPDATE nodes SET state = $2, updated_at = $3 WHERE name = $1 RETURNING ",
    node_columns!()
);

/// Takes node `$1`'s row lock (PostgreSQL; SQLite's write transactions
/// are exclusive anyway) so that placements on one node serialize.
pub const LOCK_NODE: &str = "UPDATE nodes SET updated_at = updated_at WHERE id = $1";

/// Node `$1`'s state and capacity, for the room check of a placement.
pub const NODE_ROOM: &str =
    "SELECT state, cpus, memory_mib, vm_slots, max_boots FROM nodes WHERE id = $1";

/// What the live VMs take of each node: (node, VMs, booting, cpus, memory).
/// The sums are cast: PostgreSQL's `sum` of a BIGINT is a NUMERIC.
pub static NODE_USAGE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT node_id, count(*), \
         CAST(coalesce(sum(CASE WHEN state IN ('booting', 'provisioning') THEN 1 ELSE 0 END), 0) AS BIGINT), \
         CAST(coalesce(sum(cpus), 0) AS BIGINT), CAST(coalesce(sum(memory_mib), 0) AS BIGINT) \
         FROM vms WHERE state IN {} GROUP BY node_id",
        in_list(VmState::LIVE.iter().map(|s| s.as_str()))
    )
});

/// [`NODE_USAGE`] of one node (`$1`).
pub static ONE_NODE_USAGE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT count(*), \
         CAST(coalesce(sum(CASE WHEN state IN ('booting', 'provisioning') THEN 1 ELSE 0 END), 0) AS BIGINT), \
         CAST(coalesce(sum(cpus), 0) AS BIGINT), CAST(coalesce(sum(memory_mib), 0) AS BIGINT) \
         FROM vms WHERE node_id = $1 AND state IN {}",
        in_list(VmState::LIVE.iter().map(|s| s.as_str()))
    )
});

/// Node `$1`'s live VMs, oldest first.
pub static LIST_NODE_VMS: LazyLock<String> = LazyLock::new(|| {
    format!(
        concat!(
            "SELECT ",
            vm_columns!(),
            " FROM vms WHERE node_id = $1 AND state IN {} ORDER BY created_at, id"
        ),
        in_list(VmState::LIVE.iter().map(|s| s.as_str()))
    )
});

// ------------------------------------------------------------------- rows

/// A `nodes` row as stored.
#[derive(sqlx::FromRow)]
pub struct NodeRow {
    id: String,
    name: String,
    address: String,
    ca_pem: String,
    credential_hash: String,
    state: String,
    drivers: String,
    cpus: i64,
    memory_mib: i64,
    disk_mib: i64,
    vm_slots: i64,
    max_boots: i64,
    joined_at: Millis,
    last_heartbeat: Millis,
    updated_at: Millis,
}

impl TryFrom<NodeRow> for NodeRecord {
    type Error = StoreError;
    fn try_from(row: NodeRow) -> Result<NodeRecord> {
        Ok(NodeRecord {
            id: parse::<NodeId>("node id", &row.id)?,
            name: row.name,
            address: row.address,
            ca_pem: row.ca_pem,
            credential_hash: row.credential_hash,
            state: parse::<NodeState>("node state", &row.state)?,
            capacity: NodeCapacity {
                drivers: row
                    .drivers
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
                    .collect(),
                cpus: row.cpus,
                memory_mib: row.memory_mib,
                disk_mib: row.disk_mib,
                vm_slots: row.vm_slots,
                max_boots: row.max_boots,
            },
            joined_at: row.joined_at,
            last_heartbeat: row.last_heartbeat,
            updated_at: row.updated_at,
        })
    }
}

/// A `tenants` row as stored.
#[derive(sqlx::FromRow)]
pub struct TenantRow {
    id: String,
    name: String,
    created_at: Millis,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = StoreError;
    fn try_from(row: TenantRow) -> Result<Tenant> {
        Ok(Tenant {
            id: parse("tenant id", &row.id)?,
            name: row.name,
            created_at: row.created_at,
        })
    }
}

/// An `identities` row as stored.
#[derive(sqlx::FromRow)]
pub struct IdentityRow {
    id: String,
    tenant_id: String,
    name: String,
    kind: String,
    role: String,
    created_at: Millis,
}

impl TryFrom<IdentityRow> for Identity {
    type Error = StoreError;
    fn try_from(row: IdentityRow) -> Result<Identity> {
        Ok(Identity {
            id: parse::<IdentityId>("identity id", &row.id)?,
            tenant_id: parse::<TenantId>("tenant id", &row.tenant_id)?,
            kind: parse::<IdentityKind>("identity kind", &row.kind)?,
            role: parse::<Role>("role", &row.role)?,
            name: row.name,
            created_at: row.created_at,
        })
    }
}

/// A token joined with its identity ([`FIND_TOKEN`]).
#[derive(sqlx::FromRow)]
pub struct TokenRow {
    token_id: String,
    secret_sha256: Vec<u8>,
    expires_at: Option<Millis>,
    #[sqlx(flatten)]
    identity: IdentityRow,
}

impl TryFrom<TokenRow> for TokenRecord {
    type Error = StoreError;
    fn try_from(row: TokenRow) -> Result<TokenRecord> {
        Ok(TokenRecord {
            id: parse::<TokenId>("token id", &row.token_id)?,
            secret_sha256: row.secret_sha256,
            expires_at: row.expires_at,
            identity: row.identity.try_into()?,
        })
    }
}

/// A `resources` row as stored (the spec still JSON text).
#[derive(sqlx::FromRow)]
pub struct ResourceRow {
    tenant_id: String,
    kind: String,
    name: String,
    spec: String,
    version: i64,
    created_at: Millis,
    updated_at: Millis,
}

impl ResourceRow {
    /// The record, its sealed secrets opened with `key`
    /// ([`crate::secrets`]): `SecretsLocked` when one cannot be.
    pub fn decode(self, key: Option<&SecretsKey>) -> Result<ResourceRecord> {
        let kind = parse::<Kind>("kind", &self.kind)?;
        let mut spec = serde_json::from_str(&self.spec).map_err(|e| {
            StoreError::Corrupt(format!("spec of {} {:?}: {e}", self.kind, self.name))
        })?;
        crate::secrets::open_with(key, kind, &self.name, &mut spec)?;
        Ok(ResourceRecord {
            tenant_id: parse::<TenantId>("tenant id", &self.tenant_id)?,
            kind,
            name: self.name,
            spec,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }

    /// The row's kind, name and spec text as stored (for sealing the
    /// plaintext secrets of an older store).
    pub fn stored(&self) -> (&str, &str, &str) {
        (&self.kind, &self.name, &self.spec)
    }

    /// The row's tenant id as stored.
    pub fn tenant(&self) -> &str {
        &self.tenant_id
    }
}

/// A `vms` row as stored.
#[derive(sqlx::FromRow)]
pub struct VmRow {
    id: String,
    tenant_id: String,
    workspace: String,
    state: String,
    agent_id: Option<String>,
    driver: String,
    env_version: i64,
    image_version: i64,
    stale: i64,
    reserved_for: Option<String>,
    test: i64,
    error: Option<String>,
    created_at: Millis,
    updated_at: Millis,
    setup_digest: String,
    node_id: Option<String>,
    cpus: i64,
    memory_mib: i64,
    task_owner: Option<String>,
}

impl TryFrom<VmRow> for VmRecord {
    type Error = StoreError;
    fn try_from(row: VmRow) -> Result<VmRecord> {
        Ok(VmRecord {
            id: parse::<VmId>("VM id", &row.id)?,
            tenant_id: parse::<TenantId>("tenant id", &row.tenant_id)?,
            workspace: row.workspace,
            state: parse::<VmState>("VM state", &row.state)?,
            agent_id: parse_opt::<AgentId>("agent id", row.agent_id.as_deref())?,
            driver: row.driver,
            env_version: row.env_version,
            image_version: row.image_version,
            setup_digest: row.setup_digest,
            stale: flag("VM stale flag", row.stale)?,
            reserved_for: parse_opt::<AgentId>("agent id", row.reserved_for.as_deref())?,
            test: flag("VM test flag", row.test)?,
            error: row.error,
            created_at: row.created_at,
            updated_at: row.updated_at,
            node_id: parse_opt::<NodeId>("node id", row.node_id.as_deref())?,
            cpus: row.cpus,
            memory_mib: row.memory_mib,
            task_owner: row.task_owner,
        })
    }
}

/// An `agents` row as stored.
#[derive(sqlx::FromRow)]
pub struct AgentRow {
    id: String,
    tenant_id: String,
    workspace: String,
    owner_id: String,
    owner_name: String,
    owner_kind: String,
    parent_id: Option<String>,
    phase: String,
    vm_id: Option<String>,
    on_idle: String,
    command: Option<String>,
    build: String,
    exit_code: Option<i32>,
    output: String,
    error: Option<String>,
    resurrections: i64,
    created_at: Millis,
    updated_at: Millis,
    queued_at: Millis,
    started_at: Option<Millis>,
    finished_at: Option<Millis>,
}

impl TryFrom<AgentRow> for AgentRecord {
    type Error = StoreError;
    fn try_from(row: AgentRow) -> Result<AgentRecord> {
        Ok(AgentRecord {
            id: parse::<AgentId>("agent id", &row.id)?,
            tenant_id: parse::<TenantId>("tenant id", &row.tenant_id)?,
            workspace: row.workspace,
            owner_id: parse::<IdentityId>("identity id", &row.owner_id)?,
            owner_name: row.owner_name,
            owner_kind: parse::<IdentityKind>("identity kind", &row.owner_kind)?,
            parent_id: parse_opt::<AgentId>("agent id", row.parent_id.as_deref())?,
            phase: parse::<AgentPhase>("agent phase", &row.phase)?,
            vm_id: parse_opt::<VmId>("VM id", row.vm_id.as_deref())?,
            on_idle: parse::<OnIdle>("on_idle policy", &row.on_idle)?,
            command: row.command,
            build: row.build,
            exit_code: row.exit_code,
            output: row.output,
            error: row.error,
            resurrections: row.resurrections,
            created_at: row.created_at,
            updated_at: row.updated_at,
            queued_at: row.queued_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
        })
    }
}

/// A `workspace_states` row as stored (without its tenant).
#[derive(sqlx::FromRow)]
pub struct WorkspaceStateRow {
    workspace: String,
    consecutive_failures: i64,
    backoff_until: Option<Millis>,
    hard_limited: i64,
    last_error: Option<String>,
    config_fingerprint: String,
}

impl TryFrom<WorkspaceStateRow> for WorkspaceState {
    type Error = StoreError;
    fn try_from(row: WorkspaceStateRow) -> Result<WorkspaceState> {
        Ok(WorkspaceState {
            hard_limited: flag("workspace hard_limited flag", row.hard_limited)?,
            workspace: row.workspace,
            consecutive_failures: row.consecutive_failures,
            backoff_until: row.backoff_until,
            last_error: row.last_error,
            config_fingerprint: row.config_fingerprint,
        })
    }
}

/// A `builds` row as stored.
#[derive(sqlx::FromRow)]
pub struct BuildRow {
    id: String,
    first_seen: Millis,
    retired_at: Option<Millis>,
}

impl TryFrom<BuildRow> for Build {
    type Error = StoreError;
    fn try_from(row: BuildRow) -> Result<Build> {
        Ok(Build {
            id: row.id,
            first_seen: row.first_seen,
            retired_at: row.retired_at,
        })
    }
}

/// An `instances` row as stored (summary and steps still JSON text).
#[derive(sqlx::FromRow)]
pub struct InstanceRow {
    id: String,
    tenant_id: String,
    workspace: String,
    vm_id: String,
    test: i64,
    status: String,
    summary: Option<String>,
    steps: String,
    created_at: Millis,
    updated_at: Millis,
    finished_at: Option<Millis>,
}

impl TryFrom<InstanceRow> for InstanceRecord {
    type Error = StoreError;
    fn try_from(row: InstanceRow) -> Result<InstanceRecord> {
        let json = |what: &str, text: &str| {
            serde_json::from_str(text)
                .map_err(|e| StoreError::Corrupt(format!("{what} of instance {}: {e}", row.id)))
        };
        let steps = json("steps", &row.steps)?;
        let summary = row
            .summary
            .as_deref()
            .map(|text| json("summary", text))
            .transpose()?;
        Ok(InstanceRecord {
            id: parse::<InstanceId>("instance id", &row.id)?,
            tenant_id: parse::<TenantId>("tenant id", &row.tenant_id)?,
            workspace: row.workspace,
            vm_id: parse::<VmId>("VM id", &row.vm_id)?,
            test: flag("instance test flag", row.test)?,
            status: parse::<InstanceStatus>("instance status", &row.status)?,
            summary,
            steps,
            created_at: row.created_at,
            updated_at: row.updated_at,
            finished_at: row.finished_at,
        })
    }
}

/// Decodes every row, failing on the first corrupt one.
pub fn decode_all<R, T>(rows: Vec<R>) -> Result<Vec<T>>
where
    T: TryFrom<R, Error = StoreError>,
{
    rows.into_iter().map(T::try_from).collect()
}

/// Parses a stored string back into its typed value; `Corrupt` if it is not
/// one.
pub fn parse<T>(what: &str, text: &str) -> Result<T>
where
    T: FromStr,
    T::Err: Display,
{
    text.parse()
        .map_err(|e| StoreError::Corrupt(format!("{what} {text:?}: {e}")))
}

/// [`parse`] for a nullable column.
pub fn parse_opt<T>(what: &str, text: Option<&str>) -> Result<Option<T>>
where
    T: FromStr,
    T::Err: Display,
{
    text.map(|t| parse(what, t)).transpose()
}

/// A stored 0/1 flag; `Corrupt` if it is anything else.
pub fn flag(what: &str, value: i64) -> Result<bool> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(StoreError::Corrupt(format!(
            "{what} {other}: expected 0 or 1"
        ))),
    }
}

/// How a flag is stored.
pub fn store_flag(value: bool) -> i64 {
    i64::from(value)
}

// ----------------------------------------------------------------- errors

/// Turns the constraint violations of one statement into the [`StoreError`]
/// they mean there; any other error passes through. Chainable:
/// `.on_unique(…).on_foreign_key(…)`.
pub trait ViolationExt<T> {
    /// A unique (or primary key) violation becomes `unique()`.
    fn on_unique(self, unique: impl FnOnce() -> StoreError) -> Result<T>;
    /// A foreign key violation becomes `foreign_key()`.
    fn on_foreign_key(self, foreign_key: impl FnOnce() -> StoreError) -> Result<T>;
}

impl<T, E: Into<StoreError>> ViolationExt<T> for Result<T, E> {
    fn on_unique(self, unique: impl FnOnce() -> StoreError) -> Result<T> {
        self.map_err(|e| match e.into() {
            StoreError::Database(sqlx::Error::Database(d)) if d.is_unique_violation() => unique(),
            other => other,
        })
    }

    fn on_foreign_key(self, foreign_key: impl FnOnce() -> StoreError) -> Result<T> {
        self.map_err(|e| match e.into() {
            StoreError::Database(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => {
                foreign_key()
            }
            other => other,
        })
    }
}

/// The columns of a [`BakeRow`], in order, as a literal for `concat!`.
macro_rules! bake_columns {
    () => {
        "id, tenant_id, image, state, requested_by, recipe, step, log, error, bake, \
         created_at, updated_at, finished_at"
    };
}

pub const INSERT_BAKE: &str = concat!(
    "INSERT INTO image_bakes (",
    bake_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
);

/// Only a job that has not ended changes: a late write after the job was
/// marked failed (by a restart) changes nothing.
pub const UPDATE_BAKE: &str = "UPDATE image_bakes \
     SET state = $2, step = $3, log = log || $4, error = COALESCE($5, error), \
         bake = COALESCE($6, bake), updated_at = $7, \
         finished_at = CASE WHEN $2 IN ('succeeded', 'failed') THEN $7 ELSE finished_at END \
     WHERE id = $1 AND state IN ('queued', 'running')";

pub const GET_BAKE: &str = concat!(
    "SELECT ",
    bake_columns!(),
    " FROM image_bakes WHERE tenant_id = $1 AND id = $2"
);

pub const LIST_BAKES: &str = concat!(
    "SELECT ",
    bake_columns!(),
    " FROM image_bakes WHERE tenant_id = $1 AND image = $2 \
      ORDER BY created_at DESC, id DESC LIMIT 100"
);

pub const FAIL_ACTIVE_BAKES: &str = "UPDATE image_bakes \
     SET state = 'failed', error = $1, updated_at = $2, finished_at = $2, \
         log = log || $3 \
     WHERE state IN ('queued', 'running')";

/// An `image_bakes` row as stored (recipe still JSON text).
#[derive(sqlx::FromRow)]
pub struct BakeRow {
    id: String,
    tenant_id: String,
    image: String,
    state: String,
    requested_by: String,
    recipe: String,
    step: String,
    log: String,
    error: Option<String>,
    bake: Option<i64>,
    created_at: Millis,
    updated_at: Millis,
    finished_at: Option<Millis>,
}

impl TryFrom<BakeRow> for BakeRecord {
    type Error = StoreError;
    fn try_from(row: BakeRow) -> Result<BakeRecord> {
        let recipe = serde_json::from_str(&row.recipe)
            .map_err(|e| StoreError::Corrupt(format!("recipe of bake {}: {e}", row.id)))?;
        Ok(BakeRecord {
            tenant_id: parse::<TenantId>("tenant id", &row.tenant_id)?,
            state: parse::<BakeState>("bake state", &row.state)?,
            id: row.id,
            image: row.image,
            requested_by: row.requested_by,
            recipe,
            step: row.step,
            log: row.log,
            error: row.error,
            bake: row.bake,
            created_at: row.created_at,
            updated_at: row.updated_at,
            finished_at: row.finished_at,
        })
    }
}

// ---------------------------------------------------------------- artifacts

/// Chunk `$2` of the upload of artifact `$1` (bytes `$3`). A chunk left by
/// an upload that died is overwritten: chunks are only served once the
/// marker row says the whole artifact hashed to its digest.
pub const PUT_ARTIFACT_CHUNK: &str = "INSERT INTO artifact_chunks (digest, seq, data) \
     VALUES ($1, $2, $3) ON CONFLICT (digest, seq) DO UPDATE SET data = excluded.data";

/// The marker row of artifact `$1` (`$2` size, `$3` chunks, `$4` now),
/// written last; a concurrent upload of the same bytes that finished first
/// keeps its row.
pub const FINISH_ARTIFACT: &str = "INSERT INTO artifacts (digest, size, chunks, created_at) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (digest) DO NOTHING";

/// Drops the chunks of an upload of `$1` that did not hash to it, unless
/// the artifact is whole already (then they are another upload's, good).
pub const DROP_UNFINISHED_ARTIFACT: &str = "DELETE FROM artifact_chunks WHERE digest = $1 \
     AND NOT EXISTS (SELECT 1 FROM artifacts WHERE digest = $1)";

/// Drops chunks `$2` and beyond of `$1` (a died upload's tail past the
/// artifact's end) before the marker row is written.
pub const DROP_ARTIFACT_TAIL: &str = "DELETE FROM artifact_chunks WHERE digest = $1 AND seq >= $2";

pub const GET_ARTIFACT: &str =
    "SELECT digest, size, chunks, created_at FROM artifacts WHERE digest = $1";

/// Chunk `$2` of the whole artifact `$1` (none while it is not whole).
pub const READ_ARTIFACT_CHUNK: &str = "SELECT c.data FROM artifact_chunks c \
     JOIN artifacts a ON a.digest = c.digest \
     WHERE c.digest = $1 AND c.seq = $2 AND c.seq < a.chunks";

// ---------------------------------------------------------------- events

/// Appends one event: `$1` tenant, `$2` at, `$3` kind, `$4` subject,
/// `$5` actor, `$6` data (JSON text).
pub const INSERT_EVENT: &str = "INSERT INTO events (tenant_id, at, kind, subject, actor, data) \
     VALUES ($1, $2, $3, $4, $5, $6)";

/// Events of tenant `$1` after id `$2`, oldest first, at most `$3`.
pub const LIST_EVENTS: &str = "SELECT id, tenant_id, at, kind, subject, actor, data FROM events \
     WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3";

/// Events older than `$1` (ms).
pub const PRUNE_EVENTS: &str = "DELETE FROM events WHERE at < $1";

/// An `events` row as stored (data still JSON text).
#[derive(sqlx::FromRow)]
pub struct EventRow {
    id: i64,
    tenant_id: String,
    at: Millis,
    kind: String,
    subject: String,
    actor: Option<String>,
    data: String,
}

impl TryFrom<EventRow> for crate::EventRecord {
    type Error = StoreError;
    fn try_from(row: EventRow) -> Result<crate::EventRecord> {
        Ok(crate::EventRecord {
            id: row.id,
            tenant_id: parse("event tenant id", &row.tenant_id)?,
            at: row.at,
            kind: crate::EventKind::parse(&row.kind)
                .ok_or_else(|| StoreError::Corrupt(format!("event kind {:?}", row.kind)))?,
            subject: row.subject,
            actor: row.actor,
            data: serde_json::from_str(&row.data)
                .map_err(|e| StoreError::Corrupt(format!("event {} data: {e}", row.id)))?,
        })
    }
}

// ---------------------------------------------------------------- pass status

/// Writes the last pass of tenant `$1` over the one before: `$2` replica,
/// `$3` iteration, `$4` started at, `$5` status (JSON text).
pub const PUT_RECONCILE_PASS: &str = "INSERT INTO reconcile_passes \
     (tenant_id, replica, iteration, started_at, status) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (tenant_id) DO UPDATE SET replica = excluded.replica, \
     iteration = excluded.iteration, started_at = excluded.started_at, status = excluded.status";

/// The last pass kept of tenant `$1`.
pub const GET_RECONCILE_PASS: &str = "SELECT tenant_id, replica, iteration, started_at, status \
     FROM reconcile_passes WHERE tenant_id = $1";

/// A `reconcile_passes` row as stored (status still JSON text).
#[derive(sqlx::FromRow)]
pub struct ReconcilePassRow {
    tenant_id: String,
    replica: String,
    iteration: i64,
    started_at: Millis,
    status: String,
}

impl TryFrom<ReconcilePassRow> for crate::ReconcilePassRecord {
    type Error = StoreError;
    fn try_from(row: ReconcilePassRow) -> Result<crate::ReconcilePassRecord> {
        Ok(crate::ReconcilePassRecord {
            tenant_id: parse("reconcile pass tenant id", &row.tenant_id)?,
            replica: row.replica,
            iteration: row.iteration,
            started_at: row.started_at,
            status: serde_json::from_str(&row.status).map_err(|e| {
                StoreError::Corrupt(format!("reconcile pass of {}: {e}", row.tenant_id))
            })?,
        })
    }
}

// ---- dashboard sessions (H4)

/// Opens a session: `$1` id hash, `$2` token id, `$3` created at, `$4`
/// expires at, `$5` CSRF token. The identity and tenant are the token's
/// own at this moment; nothing is inserted when the token is unknown.
pub const INSERT_UI_SESSION: &str = "INSERT INTO ui_sessions \
     (id_sha256, token_id, identity_id, tenant_id, csrf_token, created_at, expires_at) \
     SELECT $1, t.id, i.id, i.tenant_id, $5, $3, $4 \
     FROM tokens t JOIN identities i ON i.id = t.identity_id WHERE t.id = $2";

/// The live session whose id hashes to `$1` at time `$2`, with its token
/// and identity: only while the session and its token are unexpired and
/// the token still belongs to the identity and tenant it was opened for.
pub const FIND_UI_SESSION: &str = "SELECT s.csrf_token, s.expires_at AS session_expires_at, \
            t.id AS token_id, t.secret_sha256, t.expires_at, \
            i.id, i.tenant_id, i.name, i.kind, i.role, i.created_at \
     FROM ui_sessions s \
     JOIN tokens t ON t.id = s.token_id \
     JOIN identities i ON i.id = t.identity_id \
     WHERE s.id_sha256 = $1 AND s.expires_at > $2 \
       AND (t.expires_at IS NULL OR t.expires_at > $2) \
       AND i.id = s.identity_id AND i.tenant_id = s.tenant_id";

/// Ends the session whose id hashes to `$1`.
pub const DELETE_UI_SESSION: &str = "DELETE FROM ui_sessions WHERE id_sha256 = $1";

/// Forgets sessions expired at `$1`.
pub const PRUNE_UI_SESSIONS: &str = "DELETE FROM ui_sessions WHERE expires_at <= $1";

/// A session joined with its token and identity ([`FIND_UI_SESSION`]).
#[derive(sqlx::FromRow)]
pub struct UiSessionRow {
    csrf_token: String,
    session_expires_at: Millis,
    #[sqlx(flatten)]
    token: TokenRow,
}

impl TryFrom<UiSessionRow> for crate::UiSession {
    type Error = StoreError;
    fn try_from(row: UiSessionRow) -> Result<crate::UiSession> {
        Ok(crate::UiSession {
            token: TokenRecord::try_from(row.token)?,
            csrf_token: row.csrf_token,
            expires_at: row.session_expires_at,
        })
    }
}

// ---- webhooks

/// Columns of a `webhooks` row, in [`WebhookRow`]'s order.
macro_rules! webhook_columns {
    () => {
        "id, tenant_id, name, url, secret, kinds, enabled, created_at, event_cursor, attempts, next_attempt_at"
    };
}

/// Creates a webhook whose cursor is the tenant's newest event (it is sent
/// what happens from now on): `$1` id, `$2` tenant, `$3` name, `$4` url,
/// `$5` secret (sealed), `$6` kinds, `$7` created_at.
pub const INSERT_WEBHOOK: &str = concat!(
    "INSERT INTO webhooks (id, tenant_id, name, url, secret, kinds, enabled, created_at, event_cursor) \
     VALUES ($1, $2, $3, $4, $5, $6, 1, $7, \
     (SELECT COALESCE(MAX(id), 0) FROM events WHERE tenant_id = $2)) RETURNING ",
    webhook_columns!()
);

/// Tenant `$1`'s webhooks by name.
pub const LIST_WEBHOOKS: &str = concat!(
    "SELECT ",
    webhook_columns!(),
    " FROM webhooks WHERE tenant_id = $1 ORDER BY name"
);

/// Tenant `$1`'s webhook named `$2`.
pub const GET_WEBHOOK: &str = concat!(
    "SELECT ",
    webhook_columns!(),
    " FROM webhooks WHERE tenant_id = $1 AND name = $2"
);

/// Deletes tenant `$1`'s webhook named `$2`, answering its id.
pub const DELETE_WEBHOOK: &str =
    "DELETE FROM webhooks WHERE tenant_id = $1 AND name = $2 RETURNING id";

/// Deletes the delivery log of webhook `$1`.
pub const DELETE_WEBHOOK_DELIVERIES: &str = "DELETE FROM webhook_deliveries WHERE webhook_id = $1";

/// The compare-and-set lease: replica `$1` takes (or renews) every enabled
/// webhook whose lease is free, expired (`lease_until < $3`, now) or its
/// own, until `$2`. On PostgreSQL two replicas racing for one row
/// serialize on its row lock, and the second re-checks the condition
/// against the first's write, so only one of them gets it.
pub const LEASE_WEBHOOKS: &str = concat!(
    "UPDATE webhooks SET lease_owner = $1, lease_until = $2 \
     WHERE enabled = 1 AND (lease_owner IS NULL OR lease_owner = $1 OR lease_until < $3) \
     RETURNING ",
    webhook_columns!()
);

/// Gives replica `$1`'s leases up (at shutdown).
pub const RELEASE_WEBHOOKS: &str =
    "UPDATE webhooks SET lease_owner = NULL, lease_until = 0 WHERE lease_owner = $1";

/// A delivered or given-up event moves webhook `$1`'s cursor to it (`$3`),
/// only while replica `$2` holds the lease and the cursor is before it.
pub const RECORD_WEBHOOK_DONE: &str = "UPDATE webhooks SET event_cursor = $3, attempts = 0, next_attempt_at = 0 \
     WHERE id = $1 AND lease_owner = $2 AND event_cursor < $3";

/// A failed attempt at event `$3` that will be retried: webhook `$1`
/// remembers `$4` attempts and the next one's time `$5`, only while
/// replica `$2` holds the lease and the cursor is before the event.
pub const RECORD_WEBHOOK_RETRY: &str = "UPDATE webhooks SET attempts = $4, next_attempt_at = $5 \
     WHERE id = $1 AND lease_owner = $2 AND event_cursor < $3";

/// Appends one attempt to the log: `$1` webhook, `$2` event, `$3` kind,
/// `$4` attempt, `$5` started, `$6` finished, `$7` status, `$8` error,
/// `$9` outcome, `$10` next_retry_at.
pub const INSERT_DELIVERY: &str = "INSERT INTO webhook_deliveries \
     (webhook_id, event_id, kind, attempt, started_at, finished_at, status, error, outcome, next_retry_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// Webhook `$1`'s log, newest first, at most `$2`.
pub const LIST_DELIVERIES: &str = "SELECT id, webhook_id, event_id, kind, attempt, started_at, finished_at, \
     status, error, outcome, next_retry_at FROM webhook_deliveries \
     WHERE webhook_id = $1 ORDER BY id DESC LIMIT $2";

/// Delivery-log rows that finished before `$1` (ms).
pub const PRUNE_DELIVERIES: &str = "DELETE FROM webhook_deliveries WHERE finished_at < $1";

/// A `webhooks` row as stored (secret maybe sealed, kinds as text).
#[derive(sqlx::FromRow)]
pub struct WebhookRow {
    id: String,
    tenant_id: String,
    name: String,
    url: String,
    secret: String,
    kinds: String,
    enabled: i32,
    created_at: Millis,
    event_cursor: i64,
    attempts: i32,
    next_attempt_at: Millis,
}

/// The stored form of a kind filter.
pub fn kinds_text(kinds: &[crate::EventKind]) -> String {
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

impl WebhookRow {
    /// The record, its secret opened with `key` (refused when it is sealed
    /// and no key, or another, was given).
    pub fn decode(self, key: Option<&crate::secrets::SecretsKey>) -> Result<crate::WebhookRecord> {
        let secret = if crate::secrets::is_sealed(&self.secret) {
            let Some(key) = key else {
                return Err(StoreError::SecretsLocked(format!(
                    "webhook {:?} holds a secret sealed with a secrets key, and none was given",
                    self.name
                )));
            };
            key.open(&self.secret).ok_or_else(|| {
                StoreError::SecretsLocked(format!(
                    "the secret of webhook {:?} does not open with this secrets key (another key sealed it, or it was altered)",
                    self.name
                ))
            })?
        } else {
            self.secret
        };
        let kinds = self
            .kinds
            .split(',')
            .filter(|k| !k.is_empty())
            .map(|k| {
                crate::EventKind::parse(k)
                    .ok_or_else(|| StoreError::Corrupt(format!("webhook event kind {k:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(crate::WebhookRecord {
            id: self.id,
            tenant_id: parse("webhook tenant id", &self.tenant_id)?,
            name: self.name,
            url: self.url,
            secret,
            kinds,
            enabled: self.enabled != 0,
            created_at: self.created_at,
            cursor: self.event_cursor,
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at,
        })
    }
}

/// A `webhook_deliveries` row as stored.
#[derive(sqlx::FromRow)]
pub struct DeliveryRow {
    id: i64,
    webhook_id: String,
    event_id: i64,
    kind: String,
    attempt: i32,
    started_at: Millis,
    finished_at: Millis,
    status: Option<i32>,
    error: Option<String>,
    outcome: String,
    next_retry_at: Option<Millis>,
}

impl TryFrom<DeliveryRow> for crate::DeliveryRecord {
    type Error = StoreError;
    fn try_from(row: DeliveryRow) -> Result<crate::DeliveryRecord> {
        Ok(crate::DeliveryRecord {
            id: row.id,
            webhook_id: row.webhook_id,
            attempt: crate::DeliveryAttempt {
                event_id: row.event_id,
                kind: crate::EventKind::parse(&row.kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("delivery kind {:?}", row.kind)))?,
                attempt: row.attempt,
                started_at: row.started_at,
                finished_at: row.finished_at,
                status: row.status,
                error: row.error,
                outcome: crate::DeliveryOutcome::parse(&row.outcome).ok_or_else(|| {
                    StoreError::Corrupt(format!("delivery outcome {:?}", row.outcome))
                })?,
                next_retry_at: row.next_retry_at,
            },
        })
    }
}

// ---- event emission (the outbox: each write's events in its transaction)

/// [`set_vm_state`] answering the changed VM's tenant and workspace, for
/// the changes that append an event.
pub fn set_vm_state_returning(from: &[VmState], to: VmState) -> String {
    format!("{} RETURNING tenant_id, workspace", set_vm_state(from, to))
}

/// An agent's phase and workspace before a transition (`$1` tenant, `$2`
/// id); the backend's row lock is appended.
pub const SELECT_AGENT_PHASE: &str =
    "SELECT phase, workspace FROM agents WHERE tenant_id = $1 AND id = $2";

/// A provisioning run before an update (`$1` id); the backend's row lock
/// is appended.
pub const SELECT_INSTANCE_BEFORE: &str =
    "SELECT tenant_id, workspace, vm_id, status, steps FROM instances WHERE id = $1";
