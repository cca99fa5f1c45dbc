//! Pool commands: status, flush (`--nuke`), up, reset. Flush and nuke need
//! `pool-config.delete`, up and reset `pool-config.update`.

use crate::agents::pool_error;
use crate::auth::Caller;
use crate::{ApiError, AppState, body};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_core::Error;
use hearth_core::rbac::Permission;
use hearth_core::resource::Kind;
use serde::{Deserialize, Serialize};

/// `hearth pool status`, as JSON (see hearth_reconcilers::status::PoolStatus).
#[utoipa::path(get, path = "/v1/pool/status", tag = "pool", operation_id = "status_pool", security(("bearer" = [])),
    responses((status = 200, description = "The pool's counts, configuration and workspaces", body = Object),
              (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Permission::PoolConfigGet)?;
    let status = state
        .pool
        .status(caller.tenant())
        .await
        .map_err(pool_error)?;
    Ok(Json(
        serde_json::to_value(status).map_err(|e| Error::internal(e.to_string()))?,
    ))
}

#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlushRequest {
    /// Only this workspace's warm VMs (not with `nuke`).
    #[serde(default)]
    pub workspace: Option<String>,
    /// Terminate every agent and delete every VM, and stop the pool.
    #[serde(default)]
    pub nuke: bool,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlushAnswer {
    /// Warm VMs flushed (without nuke).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flushed: Option<usize>,
    /// Agents terminated (nuke).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminated: Option<usize>,
    /// VMs deleted (nuke).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<usize>,
}

/// Destroys warm VMs so the pool replenishes with fresh ones; with `nuke`,
/// terminates every agent, deletes every VM and stops the pool.
#[utoipa::path(post, path = "/v1/pool/flush", tag = "pool", operation_id = "flush_pool", security(("bearer" = [])), request_body = FlushRequest,
    responses((status = 200, body = FlushAnswer), (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn flush(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<FlushAnswer>, ApiError> {
    caller.require(Permission::PoolConfigDelete)?;
    let request: FlushRequest = body::json(body)?;
    let tenant = caller.tenant();
    if request.nuke {
        if request.workspace.is_some() {
            return Err(Error::invalid("--nuke acts on the whole tenant; drop --workspace").into());
        }
        let (terminated, deleted) = state
            .pool
            .nuke(tenant, Some(&caller.identity.name))
            .await
            .map_err(pool_error)?;
        tracing::warn!(tenant = %tenant, by = %caller.identity.name, terminated, deleted, "pool nuked");
        return Ok(Json(FlushAnswer {
            flushed: None,
            terminated: Some(terminated),
            deleted: Some(deleted),
            total: Some(terminated + deleted),
        }));
    }
    if let Some(ws) = &request.workspace
        && state
            .store
            .get_resource(tenant, Kind::Workspace, ws)
            .await?
            .is_none()
    {
        return Err(Error::not_found(format!("workspace {ws:?} not found")).into());
    }
    let flushed = state
        .pool
        .flush(
            tenant,
            request.workspace.as_deref(),
            Some(&caller.identity.name),
        )
        .await
        .map_err(pool_error)?;
    Ok(Json(FlushAnswer {
        flushed: Some(flushed),
        terminated: None,
        deleted: None,
        total: None,
    }))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpAnswer {
    pub was_stopped: bool,
}

/// Starts a stopped pool and nudges it to reach min_idle now.
#[utoipa::path(post, path = "/v1/pool/up", tag = "pool", operation_id = "up_pool", security(("bearer" = [])),
    responses((status = 200, body = UpAnswer), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn up(State(state): State<AppState>, caller: Caller) -> Result<Json<UpAnswer>, ApiError> {
    caller.require(Permission::PoolConfigUpdate)?;
    let was_stopped = state
        .pool
        .up(caller.tenant(), Some(&caller.identity.name))
        .await
        .map_err(pool_error)?;
    Ok(Json(UpAnswer { was_stopped }))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    pub workspace: String,
}

/// Clears a workspace's failure back-off and hard limit.
#[utoipa::path(post, path = "/v1/pool/reset", tag = "pool", operation_id = "reset_pool", security(("bearer" = [])), request_body = ResetRequest,
    responses((status = 200, body = ResetRequest), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn reset(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ResetRequest>, ApiError> {
    caller.require(Permission::PoolConfigUpdate)?;
    let request: ResetRequest = body::json(body)?;
    if state
        .store
        .get_resource(caller.tenant(), Kind::Workspace, &request.workspace)
        .await?
        .is_none()
    {
        return Err(
            Error::not_found(format!("workspace {:?} not found", request.workspace)).into(),
        );
    }
    state
        .pool
        .reset(caller.tenant(), &request.workspace)
        .await
        .map_err(pool_error)?;
    tracing::info!(tenant = %caller.tenant(), by = %caller.identity.name, workspace = %request.workspace, "workspace back-off reset");
    Ok(Json(request))
}

/// A VM as the API shows it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmView {
    pub id: String,
    pub workspace: String,
    /// booting, provisioning, idle, assigned, draining, destroyed, failed.
    pub state: String,
    pub agent: Option<String>,
    pub driver: String,
    pub stale: bool,
    pub test: bool,
    pub env_version: i64,
    pub image_version: i64,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmList {
    pub items: Vec<VmView>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct VmQuery {
    /// Include destroyed and failed VMs.
    #[serde(default)]
    pub all: bool,
}

/// The tenant's VMs (live ones unless `all`).
#[utoipa::path(get, path = "/v1/vms", tag = "pool", operation_id = "list_vms", security(("bearer" = [])), params(VmQuery),
    responses((status = 200, body = VmList), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn vms(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Query(query): axum::extract::Query<VmQuery>,
) -> Result<Json<VmList>, ApiError> {
    caller.require(Permission::PoolConfigGet)?;
    let rfc = hearth_reconcilers::status::rfc3339;
    let items = state
        .store
        .list_vms(caller.tenant(), query.all)
        .await?
        .into_iter()
        .map(|v| VmView {
            id: v.id.to_string(),
            workspace: v.workspace,
            state: v.state.as_str().to_owned(),
            agent: v.agent_id.map(|a| a.to_string()),
            driver: v.driver,
            stale: v.stale,
            test: v.test,
            env_version: v.env_version,
            image_version: v.image_version,
            error: v.error,
            created_at: rfc(v.created_at),
            updated_at: rfc(v.updated_at),
        })
        .collect();
    Ok(Json(VmList { items }))
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/vms", get(vms))
        .route("/v1/pool/status", get(status))
        .route("/v1/pool/flush", post(flush))
        .route("/v1/pool/up", post(up))
        .route("/v1/pool/reset", post(reset))
}
