//! Rows as the rest of hearth sees them.

use hearth_core::ids::{AgentId, IdentityId, InstanceId, NodeId, TenantId, TokenId, VmId};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::{Kind, ResourceRef};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Milliseconds since the Unix epoch (how every timestamp is stored).
pub type Millis = i64;

/// Now by the store's clock (the database's), in [`Millis`].
pub use crate::clock::now_millis;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: IdentityId,
    pub tenant_id: TenantId,
    pub name: String,
    pub kind: IdentityKind,
    pub role: Role,
    pub created_at: Millis,
}

/// A token to store: only the SHA-256 of its secret half is kept.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: TokenId,
    pub secret_sha256: Vec<u8>,
    pub expires_at: Option<Millis>,
}

/// A stored token with the identity it speaks for.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: TokenId,
    pub secret_sha256: Vec<u8>,
    pub expires_at: Option<Millis>,
    pub identity: Identity,
}

/// One stored resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceRecord {
    pub tenant_id: TenantId,
    pub kind: Kind,
    pub name: String,
    pub spec: serde_json::Value,
    /// Starts at 1; bumps on every change of the spec.
    pub version: i64,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// What a write must find before it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever is there.
    None,
    /// The resource must exist at exactly this version (read-modify-write).
    Version(i64),
}

/// A create-or-replace of one resource.
#[derive(Debug, Clone)]
pub struct PutResource<'a> {
    pub tenant: TenantId,
    pub kind: Kind,
    pub name: &'a str,
    pub spec: &'a serde_json::Value,
    /// Resources that must exist now and cannot be deleted while this one
    /// refers to them.
    pub references: &'a [ResourceRef],
    pub precondition: Precondition,
    /// The identity writing it, named in its `resource.written` event
    /// (`None` for the server's own writes).
    pub actor: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PutOutcome {
    pub record: ResourceRecord,
    pub created: bool,
    pub changed: bool,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    Booting,
    Provisioning,
    Idle,
    Assigned,
    Draining,
    Destroyed,
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Booting => "booting",
            VmState::Provisioning => "provisioning",
            VmState::Idle => "idle",
            VmState::Assigned => "assigned",
            VmState::Draining => "draining",
            VmState::Destroyed => "destroyed",
            VmState::Failed => "failed",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "booting" => VmState::Booting,
            "provisioning" => VmState::Provisioning,
            "idle" => VmState::Idle,
            "assigned" => VmState::Assigned,
            "draining" => VmState::Draining,
            "destroyed" => VmState::Destroyed,
            "failed" => VmState::Failed,
            other => return Err(format!("unknown VM state {other:?}")),
        })
    }
}

impl VmState {
    /// States in which a VM exists (or may exist) and counts against
    /// `max_vms`: everything but `destroyed` and `failed`.
    pub const LIVE: &'static [VmState] = &[
        VmState::Booting,
        VmState::Provisioning,
        VmState::Idle,
        VmState::Assigned,
        VmState::Draining,
    ];

    pub fn is_live(self) -> bool {
        Self::LIVE.contains(&self)
    }
}

/// One VM's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub id: VmId,
    pub tenant_id: TenantId,
    pub workspace: String,
    pub state: VmState,
    /// The agent the VM is assigned to (state `assigned`).
    pub agent_id: Option<AgentId>,
    /// The driver that runs it (`DriverKind` spelling: sandbox, qemu, fake).
    pub driver: String,
    /// Versions of the environment and image it was built from.
    pub env_version: i64,
    pub image_version: i64,
    /// Digest of the workspace's provisioning inputs it was built from
    /// (`hearth_core::fingerprint::setup_digest`); empty for a VM recorded
    /// before digests existed, which therefore reads as built from another
    /// setup. The store only keeps it: the reconciler computes it.
    pub setup_digest: String,
    /// Built from an older environment or image version, or another setup,
    /// than the current.
    pub stale: bool,
    /// A cold boot for this queued agent: handed to it when ready.
    pub reserved_for: Option<AgentId>,
    /// Never handed to an agent (a warm-pool test boot).
    pub test: bool,
    /// Why it failed, when it did.
    pub error: Option<String>,
    pub created_at: Millis,
    /// When `state` last changed.
    pub updated_at: Millis,
    /// The node it runs on (`None`: recorded before nodes existed, or not
    /// placed).
    pub node_id: Option<NodeId>,
    /// What it takes of its node: vCPUs and memory.
    pub cpus: i64,
    pub memory_mib: i64,
    /// The replica with a task (boot, destroy, return) in flight on it.
    pub task_owner: Option<String>,
}

impl VmRecord {
    /// A new `booting` record.
    pub fn booting(
        id: VmId,
        tenant_id: TenantId,
        workspace: &str,
        driver: &str,
        env_version: i64,
        image_version: i64,
    ) -> Self {
        let now = now_millis();
        VmRecord {
            id,
            tenant_id,
            workspace: workspace.to_owned(),
            state: VmState::Booting,
            agent_id: None,
            driver: driver.to_owned(),
            env_version,
            image_version,
            setup_digest: String::new(),
            stale: false,
            reserved_for: None,
            test: false,
            error: None,
            created_at: now,
            updated_at: now,
            node_id: None,
            cpus: 0,
            memory_mib: 0,
            task_owner: None,
        }
    }
}

/// What [`crate::Store::insert_vm_within_cap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertVm {
    Inserted,
    /// The tenant already has `max_vms` live VMs.
    AtCapacity,
    /// The VM was reserved for an agent that is no longer `queued`.
    AgentNotQueued,
    /// Its node has no room left (cpus, memory, VM slots or boots in
    /// flight), or is not `ready` any more.
    NodeFull,
}

/// An operator's setting of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes new VMs.
    Ready,
    /// Takes no new VMs; keeps those it runs.
    Cordoned,
    /// Takes no new VMs; its idle VMs are replaced elsewhere.
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Cordoned => "cordoned",
            NodeState::Draining => "draining",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "ready" => NodeState::Ready,
            "cordoned" => NodeState::Cordoned,
            "draining" => NodeState::Draining,
            other => return Err(format!("unknown node state {other:?}")),
        })
    }
}

/// What a node offers, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeCapacity {
    /// The drivers it runs (`DriverKind` spellings: sandbox, qemu, fake).
    pub drivers: Vec<String>,
    pub cpus: i64,
    pub memory_mib: i64,
    pub disk_mib: i64,
    /// The most VMs it runs at once.
    pub vm_slots: i64,
    /// The most VMs booting on it at once.
    pub max_boots: i64,
}

/// One node's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    /// Where the control plane reaches it (`https://host:port`).
    pub address: String,
    /// The CA its TLS certificate is issued by (PEM).
    pub ca_pem: String,
    /// SHA-256 (hex) of its credential.
    pub credential_hash: String,
    pub state: NodeState,
    pub capacity: NodeCapacity,
    pub joined_at: Millis,
    /// When it last reported, by the store's clock.
    pub last_heartbeat: Millis,
    pub updated_at: Millis,
}

/// What a node's live VMs take of it (from the VM records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeUsage {
    pub node: Option<NodeId>,
    pub vms: i64,
    pub booting: i64,
    pub cpus: i64,
    pub memory_mib: i64,
}

/// What [`crate::Store::vm_ready`] did with a VM that finished booting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// It is warm (`idle`).
    Idle,
    /// It went straight to the agent it was booted for (`assigned`; the
    /// agent is `running`).
    Assigned(AgentId),
    /// It was no longer booting (destroyed meanwhile); nothing changed.
    Gone,
}

/// An agent's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentPhase {
    Queued,
    Provisioning,
    Running,
    Idle,
    Sleeping,
    Completed,
    Failed,
    Killed,
}

impl AgentPhase {
    pub const ALL: &'static [AgentPhase] = &[
        AgentPhase::Queued,
        AgentPhase::Provisioning,
        AgentPhase::Running,
        AgentPhase::Idle,
        AgentPhase::Sleeping,
        AgentPhase::Completed,
        AgentPhase::Failed,
        AgentPhase::Killed,
    ];
    pub const ACTIVE: &'static [AgentPhase] = &[
        AgentPhase::Queued,
        AgentPhase::Provisioning,
        AgentPhase::Running,
        AgentPhase::Idle,
        AgentPhase::Sleeping,
    ];
    pub const TERMINAL: &'static [AgentPhase] = &[
        AgentPhase::Completed,
        AgentPhase::Failed,
        AgentPhase::Killed,
    ];

    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AgentPhase::Queued => "queued",
            AgentPhase::Provisioning => "provisioning",
            AgentPhase::Running => "running",
            AgentPhase::Idle => "idle",
            AgentPhase::Sleeping => "sleeping",
            AgentPhase::Completed => "completed",
            AgentPhase::Failed => "failed",
            AgentPhase::Killed => "killed",
        }
    }
}

impl fmt::Display for AgentPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AgentPhase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AgentPhase::ALL
            .iter()
            .copied()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown agent phase {s:?}"))
    }
}

/// What happens when an agent's work pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnIdle {
    /// Give the VM back and keep the session (default).
    #[default]
    Sleep,
    /// End the agent (`completed`).
    Terminate,
    /// Keep the VM.
    KeepAlive,
}

impl OnIdle {
    pub fn as_str(self) -> &'static str {
        match self {
            OnIdle::Sleep => "sleep",
            OnIdle::Terminate => "terminate",
            OnIdle::KeepAlive => "keep-alive",
        }
    }
}

impl FromStr for OnIdle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sleep" => Ok(OnIdle::Sleep),
            "terminate" => Ok(OnIdle::Terminate),
            "keep-alive" => Ok(OnIdle::KeepAlive),
            _ => Err(format!(
                "unknown on_idle policy {s:?}: expected sleep, terminate or keep-alive"
            )),
        }
    }
}

/// A new agent, always stored `queued`.
#[derive(Debug, Clone)]
pub struct NewAgent {
    pub id: AgentId,
    pub tenant_id: TenantId,
    pub workspace: String,
    pub owner_id: IdentityId,
    pub owner_name: String,
    pub owner_kind: IdentityKind,
    pub parent_id: Option<AgentId>,
    pub on_idle: OnIdle,
    /// A shell command to run on the VM; the agent ends with its exit.
    pub command: Option<String>,
    /// The control-plane build that starts its workflow.
    pub build: String,
}

/// One agent's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: AgentId,
    pub tenant_id: TenantId,
    pub workspace: String,
    pub owner_id: IdentityId,
    pub owner_name: String,
    pub owner_kind: IdentityKind,
    pub parent_id: Option<AgentId>,
    pub phase: AgentPhase,
    /// The VM it is on (running, idle), or was last on.
    pub vm_id: Option<VmId>,
    pub on_idle: OnIdle,
    pub command: Option<String>,
    pub build: String,
    pub exit_code: Option<i32>,
    /// The tail of the command's output.
    pub output: String,
    pub error: Option<String>,
    /// How many times it was resurrected.
    pub resurrections: i64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// When it last entered `queued` (the FIFO order).
    pub queued_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
}

/// Fields a phase change may set alongside the phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentUpdate {
    pub exit_code: Option<i32>,
    pub output: Option<String>,
    pub error: Option<String>,
}

/// Which agents to list.
#[derive(Debug, Clone, Default)]
pub struct AgentFilter {
    pub workspace: Option<String>,
    /// Empty: every phase.
    pub phases: Vec<AgentPhase>,
    pub owner_id: Option<IdentityId>,
}

/// How many of a workspace's pool VMs (test boots aside) are warm, on
/// their way, and failed lately ([`crate::Store::warm_pool_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WarmPoolCounts {
    /// `idle`: warm, ready to claim.
    pub ready: i64,
    /// `booting` or `provisioning`.
    pub provisioning: i64,
    /// Runs started since the given time that ended `failed`.
    pub failed: i64,
}

/// The pool's own state per tenant (not the user's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolState {
    /// Stopped by `pool flush --nuke` until `pool up`.
    pub stopped: bool,
}

/// Failure back-off of one workspace's boots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkspaceState {
    pub workspace: String,
    pub consecutive_failures: i64,
    /// No boot before this instant.
    pub backoff_until: Option<Millis>,
    /// Stopped refilling until its config changes or an operator resets it.
    pub hard_limited: bool,
    pub last_error: Option<String>,
    /// The workspace/environment/image versions the failures were seen with.
    pub config_fingerprint: String,
}

/// A control-plane build that agents' workflows are pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub id: String,
    pub first_seen: Millis,
    pub retired_at: Option<Millis>,
}

/// Where a provisioning run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceStatus {
    Provisioning,
    Ready,
    Failed,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Provisioning => "provisioning",
            InstanceStatus::Ready => "ready",
            InstanceStatus::Failed => "failed",
        }
    }
}

impl FromStr for InstanceStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "provisioning" => Ok(InstanceStatus::Provisioning),
            "ready" => Ok(InstanceStatus::Ready),
            "failed" => Ok(InstanceStatus::Failed),
            _ => Err(format!(
                "unknown instance status {s:?}: expected provisioning, ready or failed"
            )),
        }
    }
}

/// The record of one VM's provisioning run.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    pub id: InstanceId,
    pub tenant_id: TenantId,
    pub workspace: String,
    pub vm_id: VmId,
    /// A warm-pool test boot (its VM is never handed to an agent).
    pub test: bool,
    pub status: InstanceStatus,
    /// `{success, failedStep, error}` once the run ended.
    pub summary: Option<serde_json::Value>,
    /// The steps, as JSON (an array).
    pub steps: serde_json::Value,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub finished_at: Option<Millis>,
}

/// Which instances to list.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    pub workspace: Option<String>,
    pub status: Option<InstanceStatus>,
    pub test: Option<bool>,
    pub vm: Option<VmId>,
    /// Newest first, at most this many (default 100).
    pub limit: Option<i64>,
}

/// Where an image bake job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BakeState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl BakeState {
    pub fn as_str(self) -> &'static str {
        match self {
            BakeState::Queued => "queued",
            BakeState::Running => "running",
            BakeState::Succeeded => "succeeded",
            BakeState::Failed => "failed",
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, BakeState::Succeeded | BakeState::Failed)
    }
}

impl FromStr for BakeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "queued" => Ok(BakeState::Queued),
            "running" => Ok(BakeState::Running),
            "succeeded" => Ok(BakeState::Succeeded),
            "failed" => Ok(BakeState::Failed),
            _ => Err(format!(
                "unknown bake state {s:?}: expected queued, running, succeeded or failed"
            )),
        }
    }
}

/// One bake job of an image: the server runs it, appending to its log.
#[derive(Debug, Clone, PartialEq)]
pub struct BakeRecord {
    /// A UUID, hex with dashes.
    pub id: String,
    pub tenant_id: TenantId,
    pub image: String,
    pub state: BakeState,
    /// The identity that asked for it.
    pub requested_by: String,
    /// What is baked (the image's recipe when the job was made), as JSON.
    pub recipe: serde_json::Value,
    /// The last progress line.
    pub step: String,
    pub log: String,
    pub error: Option<String>,
    /// The version folder a successful bake wrote.
    pub bake: Option<i64>,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub finished_at: Option<Millis>,
}

/// A change to a running bake job: its state, progress line, log lines
/// to append, and at the end its error or version folder.
#[derive(Debug, Clone)]
pub struct BakeUpdate<'a> {
    pub state: BakeState,
    pub step: &'a str,
    pub append_log: &'a str,
    pub error: Option<&'a str>,
    pub bake: Option<i64>,
}

/// The most bytes one artifact chunk holds ([`crate::Store::put_artifact`]).
pub const ARTIFACT_CHUNK_BYTES: usize = 1 << 20;

/// A whole artifact in the store: its bytes hash to `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Lower-case SHA-256 hex of its bytes.
    pub digest: String,
    pub size: i64,
    /// Its chunks are numbered `0..chunks`.
    pub chunks: i64,
    pub created_at: Millis,
}

/// Whether `digest` is a SHA-256 as artifacts are named: 64 lower-case hex
/// characters.
pub fn is_artifact_digest(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What an event says happened (`events.kind`): `<family>.<what>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "vm.booting")]
    VmBooting,
    #[serde(rename = "vm.ready")]
    VmReady,
    #[serde(rename = "vm.assigned")]
    VmAssigned,
    #[serde(rename = "vm.returned")]
    VmReturned,
    #[serde(rename = "vm.destroyed")]
    VmDestroyed,
    #[serde(rename = "vm.failed")]
    VmFailed,
    #[serde(rename = "agent.queued")]
    AgentQueued,
    #[serde(rename = "agent.provisioning")]
    AgentProvisioning,
    #[serde(rename = "agent.running")]
    AgentRunning,
    #[serde(rename = "agent.idle")]
    AgentIdle,
    #[serde(rename = "agent.sleeping")]
    AgentSleeping,
    #[serde(rename = "agent.completed")]
    AgentCompleted,
    #[serde(rename = "agent.failed")]
    AgentFailed,
    #[serde(rename = "agent.killed")]
    AgentKilled,
    #[serde(rename = "instance.step")]
    InstanceStep,
    #[serde(rename = "instance.ready")]
    InstanceReady,
    #[serde(rename = "instance.failed")]
    InstanceFailed,
    #[serde(rename = "resource.written")]
    ResourceWritten,
    #[serde(rename = "resource.deleted")]
    ResourceDeleted,
    #[serde(rename = "workspace.backing_off")]
    WorkspaceBackingOff,
    #[serde(rename = "workspace.hard_limited")]
    WorkspaceHardLimited,
    #[serde(rename = "workspace.recovered")]
    WorkspaceRecovered,
    #[serde(rename = "pool.flushed")]
    PoolFlushed,
    #[serde(rename = "pool.nuked")]
    PoolNuked,
    #[serde(rename = "pool.up")]
    PoolUp,
}

impl EventKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: &'static [EventKind] = &[
        EventKind::VmBooting,
        EventKind::VmReady,
        EventKind::VmAssigned,
        EventKind::VmReturned,
        EventKind::VmDestroyed,
        EventKind::VmFailed,
        EventKind::AgentQueued,
        EventKind::AgentProvisioning,
        EventKind::AgentRunning,
        EventKind::AgentIdle,
        EventKind::AgentSleeping,
        EventKind::AgentCompleted,
        EventKind::AgentFailed,
        EventKind::AgentKilled,
        EventKind::InstanceStep,
        EventKind::InstanceReady,
        EventKind::InstanceFailed,
        EventKind::ResourceWritten,
        EventKind::ResourceDeleted,
        EventKind::WorkspaceBackingOff,
        EventKind::WorkspaceHardLimited,
        EventKind::WorkspaceRecovered,
        EventKind::PoolFlushed,
        EventKind::PoolNuked,
        EventKind::PoolUp,
    ];

    /// Its name as stored and as the API spells it (`vm.ready`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::VmBooting => "vm.booting",
            EventKind::VmReady => "vm.ready",
            EventKind::VmAssigned => "vm.assigned",
            EventKind::VmReturned => "vm.returned",
            EventKind::VmDestroyed => "vm.destroyed",
            EventKind::VmFailed => "vm.failed",
            EventKind::AgentQueued => "agent.queued",
            EventKind::AgentProvisioning => "agent.provisioning",
            EventKind::AgentRunning => "agent.running",
            EventKind::AgentIdle => "agent.idle",
            EventKind::AgentSleeping => "agent.sleeping",
            EventKind::AgentCompleted => "agent.completed",
            EventKind::AgentFailed => "agent.failed",
            EventKind::AgentKilled => "agent.killed",
            EventKind::InstanceStep => "instance.step",
            EventKind::InstanceReady => "instance.ready",
            EventKind::InstanceFailed => "instance.failed",
            EventKind::ResourceWritten => "resource.written",
            EventKind::ResourceDeleted => "resource.deleted",
            EventKind::WorkspaceBackingOff => "workspace.backing_off",
            EventKind::WorkspaceHardLimited => "workspace.hard_limited",
            EventKind::WorkspaceRecovered => "workspace.recovered",
            EventKind::PoolFlushed => "pool.flushed",
            EventKind::PoolNuked => "pool.nuked",
            EventKind::PoolUp => "pool.up",
        }
    }

    /// The kind named `name`, if there is one.
    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.iter().copied().find(|k| k.as_str() == name)
    }

    /// The kind of the event an agent entering `phase` makes.
    pub fn of_agent_phase(phase: AgentPhase) -> EventKind {
        match phase {
            AgentPhase::Queued => EventKind::AgentQueued,
            AgentPhase::Provisioning => EventKind::AgentProvisioning,
            AgentPhase::Running => EventKind::AgentRunning,
            AgentPhase::Idle => EventKind::AgentIdle,
            AgentPhase::Sleeping => EventKind::AgentSleeping,
            AgentPhase::Completed => EventKind::AgentCompleted,
            AgentPhase::Failed => EventKind::AgentFailed,
            AgentPhase::Killed => EventKind::AgentKilled,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event to append to a tenant's log.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: EventKind,
    /// What changed: `vm/<id>`, `agent/<id>`, `instance/<id>`,
    /// `workspace/<name>`, `<kind>/<name>` for resources, `pool/default`.
    pub subject: String,
    /// The identity that caused it, when an identity did.
    pub actor: Option<String>,
    /// Details of the kind (a JSON object).
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn new(kind: EventKind, subject: impl Into<String>, data: serde_json::Value) -> NewEvent {
        NewEvent {
            kind,
            subject: subject.into(),
            actor: None,
            data,
        }
    }

    pub fn by(mut self, actor: impl Into<String>) -> NewEvent {
        self.actor = Some(actor.into());
        self
    }
}

/// One event of a tenant's log.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// Increases in commit order within the tenant: the cursor.
    pub id: i64,
    pub tenant_id: TenantId,
    pub at: Millis,
    pub kind: EventKind,
    pub subject: String,
    pub actor: Option<String>,
    pub data: serde_json::Value,
}

/// Which events [`crate::Store::list_events`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    /// Only events with a larger id (the cursor of the last one seen).
    pub after: Option<i64>,
    /// Only these kinds (all when empty).
    pub kinds: Vec<EventKind>,
    /// At most this many, oldest first (a store default when 0).
    pub limit: i64,
}

/// How many events one [`crate::Store::list_events`] call returns at most.
pub const EVENT_PAGE_MAX: i64 = 1000;

// ---- webhooks (per-tenant endpoints sent the tenant's events; see
// `Store::lease_webhooks` for the delivery semantics)

/// A webhook to create ([`crate::Store::create_webhook`]).
#[derive(Clone)]
pub struct NewWebhook {
    pub tenant_id: TenantId,
    /// Unique within the tenant.
    pub name: String,
    pub url: String,
    /// The HMAC-SHA256 signing key (`whsec_...`), sealed at rest.
    pub secret: String,
    /// The kinds it is sent (every kind when empty).
    pub kinds: Vec<EventKind>,
}

/// A webhook as stored, its secret opened.
#[derive(Clone, PartialEq)]
pub struct WebhookRecord {
    pub id: String,
    pub tenant_id: TenantId,
    pub name: String,
    pub url: String,
    /// The signing key in plaintext: never shown by the API, never logged
    /// (`Debug` leaves it out).
    pub secret: String,
    /// The kinds it is sent (every kind when empty).
    pub kinds: Vec<EventKind>,
    pub enabled: bool,
    pub created_at: Millis,
    /// The id of the last event it was given (delivered or given up on).
    pub cursor: i64,
    /// Failed attempts at the event after the cursor.
    pub attempts: i32,
    /// When the next attempt may start (ms; 0: at once).
    pub next_attempt_at: Millis,
}

impl fmt::Debug for WebhookRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookRecord")
            .field("id", &self.id)
            .field("tenant_id", &self.tenant_id)
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &"<hidden>")
            .field("kinds", &self.kinds)
            .field("enabled", &self.enabled)
            .field("cursor", &self.cursor)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// It failed; another attempt follows at `next_retry_at`.
    Retrying,
    /// The last allowed attempt failed: given up, the cursor moved on.
    Failed,
}

impl DeliveryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retrying => "retrying",
            DeliveryOutcome::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<DeliveryOutcome> {
        [
            DeliveryOutcome::Delivered,
            DeliveryOutcome::Retrying,
            DeliveryOutcome::Failed,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }
}

/// One attempt to deliver one event to one webhook, as the log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryAttempt {
    pub event_id: i64,
    pub kind: EventKind,
    /// 1 for the first attempt at this event.
    pub attempt: i32,
    pub started_at: Millis,
    pub finished_at: Millis,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<i32>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    pub outcome: DeliveryOutcome,
    /// When the next attempt may start (`Retrying` only).
    pub next_retry_at: Option<Millis>,
}

/// A row of a webhook's delivery log.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub id: i64,
    pub webhook_id: String,
    pub attempt: DeliveryAttempt,
}

/// How many rows [`crate::Store::list_webhook_deliveries`] returns at most.
pub const DELIVERY_PAGE_MAX: i64 = 500;

// ---- dashboard sessions (H4)

/// A dashboard session to open ([`crate::Store::create_ui_session`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewUiSession {
    /// SHA-256 of the session id the browser holds; the id is never stored.
    pub id_sha256: Vec<u8>,
    /// The token the session was opened with (its identity and tenant are
    /// recorded with it).
    pub token: TokenId,
    /// What a state-changing request with the cookie must repeat in its
    /// `X-Hearth-CSRF` header.
    pub csrf_token: String,
    /// When the session ends; never later than the token's own expiry.
    pub expires_at: Millis,
}

/// A live dashboard session: who it signs in, and its CSRF token.
#[derive(Debug, Clone)]
pub struct UiSession {
    /// The token the session stands for, with its identity.
    pub token: TokenRecord,
    pub csrf_token: String,
    pub expires_at: Millis,
}

// ---- pass status (reconcile passes)

/// The last reconcile pass of a tenant its leader kept in the store
/// ([`crate::Store::put_reconcile_pass`]), for the replicas that do not lead
/// it. The store keeps `status` as the reconcilers wrote it (their
/// `PassStatus` as JSON) and reads nothing inside it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcilePassRecord {
    pub tenant_id: TenantId,
    /// The replica that ran the pass.
    pub replica: String,
    /// The pass's number on that replica.
    pub iteration: i64,
    pub started_at: Millis,
    pub status: serde_json::Value,
}
