//! Agents: spawn (claiming a warm VM in one transaction), list, get, kill,
//! sleep, wake, resurrect, finish, idle, and exec on the agent's VM.
//!
//! **Who may do what to an agent.** Besides the route's permission, every
//! action on one agent (kill, sleep, wake, resurrect, finish, idle, exec)
//! checks that the caller may act on *that* agent ([`may_act`]): admins and
//! operators on every agent of their tenant, everyone else (developers,
//! service identities) on its own agents and their descendants. The same
//! rule decides who reads an agent's output: a view of an agent the caller
//! may not act on (any agent, for a viewer) carries no `output` and no
//! `error` (which can quote output) and says so with `output_hidden`.

use crate::auth::Caller;
use crate::{ApiError, AppState, body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_core::Error;
use hearth_core::ids::AgentId;
use hearth_core::rbac::{IdentityKind, Permission, Role};
use hearth_core::resource::{Kind, POOL_CONFIG_NAME, PoolConfig};
use hearth_reconcilers::PoolError;
use hearth_reconcilers::metrics::Outcome;
use hearth_reconcilers::status::rfc3339;
use hearth_store::{
    AgentFilter, AgentPhase, AgentRecord, AgentUpdate, NewAgent, OnIdle, ParentProblem, StoreError,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// An agent as the API shows it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentView {
    pub id: String,
    pub workspace: String,
    pub owner: String,
    /// `developer` or `service`.
    pub owner_kind: String,
    pub parent: Option<String>,
    /// queued, provisioning, running, idle, sleeping, completed, failed, killed.
    pub phase: String,
    pub vm: Option<String>,
    /// sleep, terminate or keep-alive.
    pub on_idle: String,
    pub command: Option<String>,
    /// The control-plane build its workflow is pinned to.
    pub build: String,
    pub exit_code: Option<i32>,
    /// The tail of its command's output; `null` when `output_hidden`.
    pub output: Option<String>,
    /// Why it failed or was killed; `null` when there is none, or when
    /// `output_hidden` (an error can quote output).
    pub error: Option<String>,
    /// Whether `output` and `error` are withheld from the caller: it is a
    /// viewer, or a developer (or service) and the agent is not its own nor
    /// a descendant of its own.
    pub output_hidden: bool,
    pub resurrections: i64,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl AgentView {
    /// The view for a caller that may not read the agent's output: the
    /// same with `output` and `error` left out.
    fn without_output(mut self) -> Self {
        self.output = None;
        self.error = None;
        self.output_hidden = true;
        self
    }
}

/// The full view, for a caller that may act on the agent.
impl From<&AgentRecord> for AgentView {
    fn from(a: &AgentRecord) -> Self {
        AgentView {
            id: a.id.to_string(),
            workspace: a.workspace.clone(),
            owner: a.owner_name.clone(),
            owner_kind: a.owner_kind.as_str().to_owned(),
            parent: a.parent_id.map(|p| p.to_string()),
            phase: a.phase.as_str().to_owned(),
            vm: a.vm_id.map(|v| v.to_string()),
            on_idle: a.on_idle.as_str().to_owned(),
            command: a.command.clone(),
            build: a.build.clone(),
            exit_code: a.exit_code,
            output: Some(a.output.clone()),
            error: a.error.clone(),
            output_hidden: false,
            resurrections: a.resurrections,
            created_at: rfc3339(a.created_at),
            updated_at: rfc3339(a.updated_at),
            started_at: a.started_at.map(rfc3339),
            finished_at: a.finished_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentList {
    pub items: Vec<AgentView>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub workspace: String,
    /// A shell command run from `/home` on the VM; the agent ends with it.
    #[serde(default)]
    pub command: Option<String>,
    /// The agent that spawns this one: one of the caller's own active
    /// agents (children are exempt from the cap).
    #[serde(default)]
    pub parent: Option<String>,
    /// sleep (default), terminate or keep-alive.
    #[serde(default)]
    pub on_idle: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    /// `completed` or `failed`.
    pub status: String,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub command: String,
    /// Such as `60s`; default 10m.
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecAnswer {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    pub workspace: Option<String>,
    pub phase: Option<String>,
}

pub(crate) fn pool_error(e: PoolError) -> ApiError {
    match e {
        PoolError::Store(s) => s.into(),
        PoolError::Driver(d) => {
            tracing::error!(error = %d, "driver error");
            Error::new(
                hearth_core::ErrorCode::Unavailable,
                format!("the VM did not answer: {d}"),
            )
            .into()
        }
        PoolError::Precondition(m) => Error::failed_precondition(m).into(),
    }
}

fn parse_id(id: &str) -> Result<AgentId, ApiError> {
    id.parse()
        .map_err(|_| Error::not_found(format!("agent {id:?} not found")).into())
}

async fn load(state: &AppState, caller: &Caller, id: &str) -> Result<AgentRecord, ApiError> {
    let id = parse_id(id)?;
    state
        .store
        .get_agent(caller.tenant(), id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound(_) => Error::not_found(format!("agent {id} not found")).into(),
            e => e.into(),
        })
}

/// How far up a parent chain [`may_act`] looks for one of the caller's own
/// agents. Children are spawned only under the spawner's own agents, so a
/// chain mixing owners is not made by the API; the bound only keeps a
/// store written by hand from making the walk endless.
const MAX_ANCESTRY: usize = 64;

/// Whether `caller` may act on `agent` (and read its output): admins and
/// operators on every agent of their tenant; a caller whose role can spawn
/// (a developer, or a service identity with that role) on its own agents
/// and their descendants; a viewer on none. `known` holds agents already
/// read (a list), so walking up a chain reads the store only for the rest.
async fn may_act(
    state: &AppState,
    caller: &Caller,
    agent: &AgentRecord,
    known: &std::collections::HashMap<AgentId, &AgentRecord>,
) -> Result<bool, ApiError> {
    if caller.identity.role >= Role::Admin {
        return Ok(true);
    }
    if !caller.identity.role.allows(Permission::AgentSpawn) {
        return Ok(false);
    }
    let me = caller.identity.id;
    if agent.owner_id == me {
        return Ok(true);
    }
    let mut parent = agent.parent_id;
    for _ in 0..MAX_ANCESTRY {
        let Some(id) = parent else { return Ok(false) };
        let (owner, next) = match known.get(&id) {
            Some(a) => (a.owner_id, a.parent_id),
            None => match state.store.get_agent(caller.tenant(), id).await {
                Ok(a) => (a.owner_id, a.parent_id),
                Err(StoreError::NotFound(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            },
        };
        if owner == me {
            return Ok(true);
        }
        parent = next;
    }
    Ok(false)
}

/// Loads an agent the caller means to act on: `NOT_FOUND` when it is not
/// in the caller's tenant, `PERMISSION_DENIED` naming the agent and its
/// owner when the caller may not act on it ([`may_act`]).
async fn load_own(state: &AppState, caller: &Caller, id: &str) -> Result<AgentRecord, ApiError> {
    let agent = load(state, caller, id).await?;
    if may_act(state, caller, &agent, &Default::default()).await? {
        return Ok(agent);
    }
    tracing::info!(tenant = %caller.tenant(), agent = %agent.id, by = %caller.identity.name, owner = %agent.owner_name,
        "agent action refused: not the caller's own");
    Err(Error::new(
        hearth_core::ErrorCode::PermissionDenied,
        format!(
            "agent {} belongs to {:?}: a {} acts only on its own agents and their children (admins act on every agent of the tenant)",
            agent.id, agent.owner_name, caller.identity.role
        ),
    )
    .into())
}

/// Spawns an agent: claims a warm VM at once when one is idle, else queues
/// it for a cold boot (or for capacity, at `max_vms`).
#[utoipa::path(post, path = "/v1/agents", tag = "agent", operation_id = "spawn_agent", security(("bearer" = [])), request_body = SpawnRequest,
    responses((status = 201, body = AgentView), (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error),
              (status = 409, body = hearth_core::Error), (status = 429, body = hearth_core::Error)))]
pub async fn spawn(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<AgentView>), ApiError> {
    caller.require(Permission::AgentSpawn)?;
    let received = std::time::Instant::now();
    let request: SpawnRequest = body::json(body)?;
    let tenant = caller.tenant();
    let on_idle = match request.on_idle.as_deref() {
        None => OnIdle::default(),
        Some(text) => text.parse::<OnIdle>().map_err(Error::invalid)?,
    };
    let config = state
        .store
        .get_resource(tenant, Kind::PoolConfig, POOL_CONFIG_NAME)
        .await?
        .ok_or_else(|| {
            Error::failed_precondition(
                "no pool config: set one with `hearth set pool-config default`",
            )
        })?;
    let config: PoolConfig =
        serde_json::from_value(config.spec).map_err(|e| Error::internal(e.to_string()))?;
    if state.store.get_pool_state(tenant).await?.stopped {
        return Err(Error::failed_precondition(
            "the pool is stopped (pool flush --nuke); start it with `hearth pool up`",
        )
        .into());
    }
    if state
        .store
        .get_resource(tenant, Kind::Workspace, &request.workspace)
        .await?
        .is_none()
    {
        return Err(
            Error::not_found(format!("workspace {:?} not found", request.workspace)).into(),
        );
    }
    // Whether the parent may be one (the caller's own, active agent) is
    // checked inside the spawn's transaction, so it cannot race a kill.
    let parent = match &request.parent {
        Some(p) => Some(
            p.parse::<AgentId>()
                .map_err(|_| Error::invalid(format!("parent {p:?} is not an agent id")))?,
        ),
        None => None,
    };
    let new = NewAgent {
        id: AgentId::new(),
        tenant_id: tenant,
        workspace: request.workspace.clone(),
        owner_id: caller.identity.id,
        owner_name: caller.identity.name.clone(),
        owner_kind: caller.identity.kind,
        parent_id: parent,
        on_idle,
        command: request.command.clone().filter(|c| !c.trim().is_empty()),
        build: state.pool.options().build.clone(),
    };
    let cap = (caller.identity.kind == IdentityKind::Developer)
        .then_some(config.max_agents_per_developer);
    // One transaction: the cap check, the claim of an idle VM and the
    // agent, already `running` on it (or `queued`).
    let agent = match state.store.spawn_agent(&new, cap).await {
        Ok(agent) => agent,
        Err(StoreError::LimitReached(n)) => {
            count_claim(&state, tenant, &new.workspace, Outcome::Rejected, None).await;
            return Err(Error::new(
                hearth_core::ErrorCode::ResourceExhausted,
                format!(
                    "you have reached your organization's limit of {n} active agents (this includes idle and sleeping agents) — contact your admin to raise the max agents per developer"
                ),
            )
            .into());
        }
        Err(StoreError::BadParent { parent, problem }) => {
            return Err(bad_parent(parent, problem));
        }
        Err(e) => return Err(e.into()),
    };
    if agent.vm_id.is_some() {
        count_claim(
            &state,
            tenant,
            &agent.workspace,
            Outcome::Warm,
            Some(received),
        )
        .await;
        state.pool.agent_started(&agent);
    }
    // A claim leaves a gap to backfill; a queued agent needs a boot.
    state.pool.wake();
    tracing::info!(tenant = %tenant, agent = %agent.id, workspace = %agent.workspace, owner = %agent.owner_name,
        phase = %agent.phase, vm = ?agent.vm_id, "agent spawned");
    Ok((StatusCode::CREATED, Json(AgentView::from(&agent))))
}

/// Agents as shown to `caller`: the output tails of those it may act on
/// ([`may_act`]) masked with the current secrets of their workspace (the
/// environment's variables, repo URL credentials), the others without
/// output ([`AgentView::without_output`]). Output is already masked when
/// stored; masking again here also covers tails stored before a value
/// became a secret.
async fn masked_views(
    state: &AppState,
    caller: &Caller,
    agents: &[AgentRecord],
) -> Result<Vec<AgentView>, ApiError> {
    let known: std::collections::HashMap<AgentId, &AgentRecord> =
        agents.iter().map(|a| (a.id, a)).collect();
    let mut redactors = std::collections::HashMap::new();
    let mut views = Vec::with_capacity(agents.len());
    for agent in agents {
        let mut view = AgentView::from(agent);
        if !may_act(state, caller, agent, &known).await? {
            views.push(view.without_output());
            continue;
        }
        if let Some(output) = view.output.as_deref().filter(|o| !o.is_empty()) {
            if !redactors.contains_key(&agent.workspace) {
                let (_, redactor) = state
                    .pool
                    .agent_environment(agent.tenant_id, &agent.workspace)
                    .await
                    .map_err(pool_error)?;
                redactors.insert(agent.workspace.clone(), redactor);
            }
            view.output = Some(redactors[&agent.workspace].redact(output));
        }
        views.push(view);
    }
    Ok(views)
}

/// The answer to a refused `--parent`: why that agent cannot be the parent.
fn bad_parent(parent: AgentId, problem: ParentProblem) -> ApiError {
    const RULE: &str = "a child agent's parent must be one of your own active agents";
    match problem {
        ParentProblem::NotFound => {
            Error::not_found(format!("parent agent {parent} not found")).into()
        }
        ParentProblem::OtherOwner(owner) => Error::invalid(format!(
            "parent agent {parent} belongs to {owner:?}, not to you: {RULE}"
        ))
        .into(),
        ParentProblem::Terminal(phase) => {
            Error::failed_precondition(format!("parent agent {parent} is {phase}: {RULE}")).into()
        }
    }
}

/// Counts a claim made (or refused) in a request of `state`'s tenant,
/// timed from `since` (`hearth_claims_total`, `hearth_spawn_to_running_seconds`).
async fn count_claim(
    state: &AppState,
    tenant: hearth_core::ids::TenantId,
    workspace: &str,
    outcome: Outcome,
    since: Option<std::time::Instant>,
) {
    let metrics = state.pool.metrics();
    let tenant = metrics.tenant_label(state.store.as_ref(), tenant).await;
    metrics.claim(
        &tenant,
        workspace,
        outcome,
        since.map(|at| at.elapsed().as_secs_f64()),
        None,
    );
}

/// A queued agent takes an idle VM now if there is one; else the pool is woken.
async fn claim_or_queue(state: &AppState, agent: AgentRecord) -> Result<AgentRecord, ApiError> {
    let received = std::time::Instant::now();
    let claimed = match state
        .store
        .assign_idle_vm(agent.tenant_id, &agent.workspace, agent.id)
        .await
    {
        Ok(claimed) => claimed,
        // The pool assigned it a VM at the same moment (the unique index on
        // a VM's agent refused the second claim): it runs on that one.
        Err(StoreError::AlreadyExists(_)) => {
            let agent = state.store.get_agent(agent.tenant_id, agent.id).await?;
            state.pool.agent_started(&agent);
            return Ok(agent);
        }
        Err(e) => return Err(e.into()),
    };
    match claimed {
        Some(_) => {
            let agent = state.store.get_agent(agent.tenant_id, agent.id).await?;
            count_claim(
                state,
                agent.tenant_id,
                &agent.workspace,
                Outcome::Warm,
                Some(received),
            )
            .await;
            state.pool.agent_started(&agent);
            state.pool.wake();
            Ok(agent)
        }
        None => {
            state.pool.wake();
            // Nothing idle, or the pool assigned it a VM meanwhile: answer
            // what the agent is now, not what it was before the claim.
            Ok(state.store.get_agent(agent.tenant_id, agent.id).await?)
        }
    }
}

/// The tenant's agents.
#[utoipa::path(get, path = "/v1/agents", tag = "agent", operation_id = "list_agent", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = AgentList), (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<AgentList>, ApiError> {
    caller.require(Permission::AgentGet)?;
    let phases = match query.phase.as_deref() {
        None => Vec::new(),
        Some(p) => vec![p.parse::<AgentPhase>().map_err(Error::invalid)?],
    };
    let filter = AgentFilter {
        workspace: query.workspace,
        phases,
        owner_id: None,
    };
    let agents = state.store.list_agents(caller.tenant(), &filter).await?;
    Ok(Json(AgentList {
        items: masked_views(&state, &caller, &agents).await?,
    }))
}

/// One agent.
#[utoipa::path(get, path = "/v1/agents/{id}", tag = "agent", operation_id = "get_one_agent", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = AgentView), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Permission::AgentGet)?;
    let agent = load(&state, &caller, &id).await?;
    let mut views = masked_views(&state, &caller, std::slice::from_ref(&agent)).await?;
    Ok(Json(views.remove(0)))
}

async fn transition(
    state: &AppState,
    caller: &Caller,
    id: &str,
    from: &[AgentPhase],
    to: AgentPhase,
    update: AgentUpdate,
    verb: &str,
) -> Result<AgentRecord, ApiError> {
    let agent = load_own(state, caller, id).await?;
    match state
        .store
        .transition_agent(caller.tenant(), agent.id, from, to, &update)
        .await
    {
        Ok(record) => {
            tracing::info!(tenant = %caller.tenant(), agent = %agent.id, by = %caller.identity.name, from = %agent.phase, to = %to, "agent {verb}");
            state.pool.wake();
            Ok(record)
        }
        Err(StoreError::Conflict(_)) => {
            let now = state.store.get_agent(caller.tenant(), agent.id).await?;
            Err(Error::failed_precondition(format!(
                "cannot {verb} agent {}: it is {}",
                agent.id, now.phase
            ))
            .into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Kills an agent (its VM is cleaned and returned to the pool, or destroyed).
#[utoipa::path(post, path = "/v1/agents/{id}/kill", tag = "agent", operation_id = "kill_agent", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = AgentView), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn kill(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Permission::AgentKill)?;
    let update = AgentUpdate {
        error: Some(format!("killed by {}", caller.identity.name)),
        ..Default::default()
    };
    let agent = transition(
        &state,
        &caller,
        &id,
        AgentPhase::ACTIVE,
        AgentPhase::Killed,
        update,
        "kill",
    )
    .await?;
    Ok(Json(AgentView::from(&agent)))
}

/// Puts an agent to sleep: it gives its VM back and keeps its session.
#[utoipa::path(post, path = "/v1/agents/{id}/sleep", tag = "agent", operation_id = "sleep_agent", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = AgentView), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn sleep(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Permission::AgentSpawn)?;
    let from = [
        AgentPhase::Running,
        AgentPhase::Idle,
        AgentPhase::Queued,
        AgentPhase::Provisioning,
    ];
    let agent = transition(
        &state,
        &caller,
        &id,
        &from,
        AgentPhase::Sleeping,
        AgentUpdate::default(),
        "sleep",
    )
    .await?;
    Ok(Json(AgentView::from(&agent)))
}

/// Wakes a sleeping agent onto a VM again (queued until one is free).
#[utoipa::path(post, path = "/v1/agents/{id}/wake", tag = "agent", operation_id = "wake_agent", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = AgentView), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn wake(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Permission::AgentSpawn)?;
    ensure_pool_running(&state, &caller).await?;
    let agent = transition(
        &state,
        &caller,
        &id,
        &[AgentPhase::Sleeping],
        AgentPhase::Queued,
        AgentUpdate::default(),
        "wake",
    )
    .await?;
    Ok(Json(AgentView::from(&claim_or_queue(&state, agent).await?)))
}

/// Brings a terminal agent back with the same id (not a new agent for the cap).
#[utoipa::path(post, path = "/v1/agents/{id}/resurrect", tag = "agent", operation_id = "resurrect_agent", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = AgentView), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn resurrect(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Permission::AgentSpawn)?;
    ensure_pool_running(&state, &caller).await?;
    let agent = transition(
        &state,
        &caller,
        &id,
        AgentPhase::TERMINAL,
        AgentPhase::Queued,
        AgentUpdate::default(),
        "resurrect",
    )
    .await?;
    Ok(Json(AgentView::from(&claim_or_queue(&state, agent).await?)))
}

async fn ensure_pool_running(state: &AppState, caller: &Caller) -> Result<(), ApiError> {
    if state.store.get_pool_state(caller.tenant()).await?.stopped {
        return Err(Error::failed_precondition(
            "the pool is stopped (pool flush --nuke); start it with `hearth pool up`",
        )
        .into());
    }
    Ok(())
}

/// Reports an agent's end (for agent runtimes that run outside hearth).
#[utoipa::path(post, path = "/v1/agents/{id}/finish", tag = "agent", operation_id = "finish_agent", security(("bearer" = [])), params(("id" = String, Path)), request_body = FinishRequest,
    responses((status = 200, body = AgentView), (status = 400, body = hearth_core::Error), (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn finish(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Permission::AgentSpawn)?;
    let request: FinishRequest = body::json(body)?;
    let to = match request.status.as_str() {
        "completed" => AgentPhase::Completed,
        "failed" => AgentPhase::Failed,
        other => {
            return Err(Error::invalid(format!(
                "status {other:?} is not valid: use completed or failed"
            ))
            .into());
        }
    };
    let update = AgentUpdate {
        exit_code: request.exit_code,
        error: request.error,
        output: None,
    };
    let agent = transition(
        &state,
        &caller,
        &id,
        &[AgentPhase::Running, AgentPhase::Idle],
        to,
        update,
        "finish",
    )
    .await?;
    Ok(Json(AgentView::from(&agent)))
}

/// Reports that an agent's work paused; its `on_idle` policy decides.
#[utoipa::path(post, path = "/v1/agents/{id}/idle", tag = "agent", operation_id = "idle_agent", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = AgentView), (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn idle(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Permission::AgentSpawn)?;
    let agent = load_own(&state, &caller, &id).await?;
    let to = match agent.on_idle {
        OnIdle::Sleep => AgentPhase::Sleeping,
        OnIdle::Terminate => AgentPhase::Completed,
        OnIdle::KeepAlive => AgentPhase::Idle,
    };
    let agent = transition(
        &state,
        &caller,
        &id,
        &[AgentPhase::Running],
        to,
        AgentUpdate::default(),
        "idle",
    )
    .await?;
    Ok(Json(AgentView::from(&agent)))
}

/// Runs a command on the agent's VM and returns its output.
#[utoipa::path(post, path = "/v1/agents/{id}/exec", tag = "agent", operation_id = "exec_agent", security(("bearer" = [])), params(("id" = String, Path)), request_body = ExecBody,
    responses((status = 200, body = ExecAnswer), (status = 400, body = hearth_core::Error), (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ExecAnswer>, ApiError> {
    caller.require(Permission::AgentSpawn)?;
    let request: ExecBody = body::json(body)?;
    let timeout = match request.timeout.as_deref() {
        None => Duration::from_secs(600),
        Some(t) => Duration::from_secs(
            hearth_core::resource::parse_duration(t)
                .filter(|s| *s > 0)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "timeout {t:?} is not valid: use a duration such as 60s"
                    ))
                })?,
        ),
    };
    // Checked before anything runs: a refused exec never reaches the VM.
    let agent = load_own(&state, &caller, &id).await?;
    let (result, stdout, stderr) = state
        .pool
        .exec_in_agent(caller.tenant(), agent.id, &request.command, timeout)
        .await
        .map_err(pool_error)?;
    Ok(Json(ExecAnswer {
        exit_code: result.exit_code,
        stdout,
        stderr,
        timed_out: result.timed_out,
    }))
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/agents", get(list).post(spawn))
        .route("/v1/agents/{id}", get(get_one))
        .route("/v1/agents/{id}/kill", post(kill))
        .route("/v1/agents/{id}/sleep", post(sleep))
        .route("/v1/agents/{id}/wake", post(wake))
        .route("/v1/agents/{id}/resurrect", post(resurrect))
        .route("/v1/agents/{id}/finish", post(finish))
        .route("/v1/agents/{id}/idle", post(idle))
        .route("/v1/agents/{id}/exec", post(exec))
}
