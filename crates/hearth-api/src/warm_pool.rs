//! The warm-pool API of a workspace: its settings (`enabled`, `targetSize`
//! = `min_idle`, `branch`, `setupCommands`), test boots, and the instance
//! records of provisioning runs. camelCase on the wire, as the warm-pool
//! API has always spoken.

use crate::agents::pool_error;
use crate::auth::Caller;
use crate::{ApiError, AppState, body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_core::Error;
use hearth_core::ids::InstanceId;
use hearth_core::rbac::Permission;
use hearth_core::resource::{Kind, SetupCommand, Spec, Workspace};
use hearth_reconcilers::status::rfc3339;
use hearth_store::{
    InstanceFilter, InstanceRecord, InstanceStatus, Precondition, PutResource, ResourceRecord,
    StoreError,
};
use serde::{Deserialize, Deserializer, Serialize};

/// A workspace's warm-pool settings.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolView {
    pub enabled: bool,
    /// Warm VMs to keep ready (the workspace's `min_idle`).
    pub target_size: i32,
    /// Overrides every repo's branch for warm VMs when set.
    pub branch: Option<String>,
    pub setup_commands: Vec<SetupCommand>,
    /// The workspace's `max_idle`.
    pub max_idle: i32,
    /// How many of the workspace's pool VMs are ready, provisioning, and
    /// failed lately (test boots are not counted).
    pub status: WarmPoolStatus,
}

/// The warm pool's VMs by state.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolStatus {
    /// Warm (`idle`), ready to be claimed.
    pub ready: i64,
    /// Booting or running their provisioning steps.
    pub provisioning: i64,
    /// Pool boots of the last hour ([`FAILED_WINDOW`]) that failed.
    pub failed: i64,
}

/// How far back `status.failed` counts failed boots (by their start).
pub const FAILED_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

fn double_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Fields to change; absent ones stay as they are.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmPoolPatch {
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub target_size: Option<i32>,
    /// A branch, or null to use each repo's own.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub branch: Option<Option<String>>,
    #[serde(default)]
    pub setup_commands: Option<Vec<SetupCommand>>,
}

/// A provisioning run.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    pub id: String,
    pub workspace: String,
    pub vm: String,
    /// A test boot (never handed to an agent).
    pub test: bool,
    /// `provisioning`, `ready` or `failed`.
    pub status: String,
    /// `{success, failedStep, error}` once the run ended (the same keys
    /// whether it succeeded or not).
    pub summary: Option<InstanceSummary>,
    /// `[{name, repo?, status, output, error?, startedAt?, durationMs?}]`;
    /// `startedAt` is RFC 3339, like every other timestamp.
    #[schema(value_type = Vec<Object>)]
    pub steps: serde_json::Value,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

/// How a provisioning run ended: `failedStep` and `error` are null for a
/// run that succeeded.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSummary {
    pub success: bool,
    #[serde(default)]
    pub failed_step: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// The stored steps as shown: `startedAt` (Unix milliseconds in the store)
/// as RFC 3339.
fn steps_view(steps: &serde_json::Value) -> serde_json::Value {
    let mut steps = steps.clone();
    for step in steps.as_array_mut().into_iter().flatten() {
        if let Some(started) = step.get_mut("startedAt")
            && let Some(ms) = started.as_i64()
        {
            *started = serde_json::Value::String(rfc3339(ms));
        }
    }
    steps
}

impl From<&InstanceRecord> for InstanceView {
    fn from(i: &InstanceRecord) -> Self {
        InstanceView {
            id: i.id.to_string(),
            workspace: i.workspace.clone(),
            vm: i.vm_id.to_string(),
            test: i.test,
            status: i.status.as_str().to_owned(),
            summary: i
                .summary
                .as_ref()
                .and_then(|s| serde_json::from_value(s.clone()).ok()),
            steps: steps_view(&i.steps),
            created_at: rfc3339(i.created_at),
            updated_at: rfc3339(i.updated_at),
            finished_at: i.finished_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceList {
    pub items: Vec<InstanceView>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct InstanceQuery {
    pub workspace: Option<String>,
    /// provisioning, ready or failed.
    pub status: Option<String>,
    pub test: Option<bool>,
    /// At most this many, newest first (default 100).
    pub limit: Option<i64>,
}

async fn view(
    state: &AppState,
    caller: &Caller,
    record: &ResourceRecord,
) -> Result<WarmPoolView, ApiError> {
    let ws: Workspace =
        serde_json::from_value(record.spec.clone()).map_err(|e| Error::internal(e.to_string()))?;
    let since = hearth_store::now_millis() - FAILED_WINDOW.as_millis() as i64;
    let counts = state
        .store
        .warm_pool_counts(caller.tenant(), &record.name, since)
        .await?;
    Ok(WarmPoolView {
        enabled: ws.warm_pool.enabled,
        target_size: ws.min_idle,
        branch: ws.warm_pool.branch.clone(),
        setup_commands: ws.warm_pool.setup_commands.clone(),
        max_idle: ws.max_idle(),
        status: WarmPoolStatus {
            ready: counts.ready,
            provisioning: counts.provisioning,
            failed: counts.failed,
        },
    })
}

async fn workspace(
    state: &AppState,
    caller: &Caller,
    name: &str,
) -> Result<ResourceRecord, ApiError> {
    state
        .store
        .get_resource(caller.tenant(), Kind::Workspace, name)
        .await?
        .ok_or_else(|| Error::not_found(format!("workspace {name:?} not found")).into())
}

/// A workspace's warm-pool settings and the status of its VMs.
#[utoipa::path(get, path = "/v1/workspaces/{name}/warm-pool", tag = "warm-pool", operation_id = "get_warm_pool",
    security(("bearer" = [])), params(("name" = String, Path, description = "Workspace name")),
    responses((status = 200, body = WarmPoolView), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn get_settings(
    State(state): State<AppState>,
    caller: Caller,
    Path(ws): Path<String>,
) -> Result<Json<WarmPoolView>, ApiError> {
    caller.require(Permission::WorkspaceGet)?;
    let record = workspace(&state, &caller, &ws).await?;
    Ok(Json(view(&state, &caller, &record).await?))
}

/// Changes a workspace's warm-pool settings (`targetSize` is its `min_idle`).
#[utoipa::path(patch, path = "/v1/workspaces/{name}/warm-pool", tag = "warm-pool", operation_id = "patch_warm_pool",
    security(("bearer" = [])), params(("name" = String, Path, description = "Workspace name")), request_body = WarmPoolPatch,
    responses((status = 200, body = WarmPoolView), (status = 400, body = hearth_core::Error), (status = 403, body = hearth_core::Error),
              (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn patch_settings(
    State(state): State<AppState>,
    caller: Caller,
    Path(ws): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WarmPoolView>, ApiError> {
    caller.require(Permission::WorkspaceUpdate)?;
    let patch: WarmPoolPatch = body::json(body)?;
    for _ in 0..5 {
        let record = workspace(&state, &caller, &ws).await?;
        let mut spec: Workspace = serde_json::from_value(record.spec.clone())
            .map_err(|e| Error::internal(e.to_string()))?;
        if let Some(enabled) = patch.enabled {
            spec.warm_pool.enabled = enabled;
        }
        if let Some(size) = patch.target_size {
            if size < 0 {
                return Err(Error::invalid("targetSize must not be negative").into());
            }
            spec.min_idle = size;
        }
        if let Some(branch) = &patch.branch {
            spec.warm_pool.branch = branch.clone();
        }
        if let Some(commands) = &patch.setup_commands {
            spec.warm_pool.setup_commands = commands.clone();
        }
        spec.validate()?;
        let json = serde_json::to_value(&spec).map_err(|e| Error::internal(e.to_string()))?;
        let references = spec.references();
        let put = PutResource {
            actor: Some(&caller.identity.name),
            tenant: caller.tenant(),
            kind: Kind::Workspace,
            name: &ws,
            spec: &json,
            references: &references,
            precondition: Precondition::Version(record.version),
        };
        match state.store.put_resource(put).await {
            Ok(outcome) => {
                tracing::info!(tenant = %caller.tenant(), by = %caller.identity.name, workspace = %ws, version = outcome.record.version, "warm pool configured");
                state.pool.wake();
                return Ok(Json(view(&state, &caller, &outcome.record).await?));
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::new(
        hearth_core::ErrorCode::Aborted,
        format!("workspace {ws:?} kept changing; retry"),
    )
    .into())
}

/// Starts a test boot: one VM provisioned like a warm one, never handed to
/// an agent, destroyed when it ends. Poll the instance it returns.
#[utoipa::path(post, path = "/v1/workspaces/{name}/warm-pool/test", tag = "warm-pool", operation_id = "test_warm_pool",
    security(("bearer" = [])), params(("name" = String, Path, description = "Workspace name")),
    responses((status = 201, body = InstanceView), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error),
              (status = 409, body = hearth_core::Error)))]
pub async fn test(
    State(state): State<AppState>,
    caller: Caller,
    Path(ws): Path<String>,
) -> Result<(StatusCode, Json<InstanceView>), ApiError> {
    caller.require(Permission::WorkspaceUpdate)?;
    workspace(&state, &caller, &ws).await?;
    let instance = state
        .pool
        .test_boot(caller.tenant(), &ws)
        .await
        .map_err(pool_error)?;
    Ok((StatusCode::CREATED, Json(InstanceView::from(&instance))))
}

fn parse_instance_id(id: &str) -> Result<InstanceId, ApiError> {
    id.parse()
        .map_err(|_| Error::not_found(format!("instance {id:?} not found")).into())
}

async fn load_instance(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<InstanceRecord, ApiError> {
    let id = parse_instance_id(id)?;
    state
        .store
        .get_instance(caller.tenant(), id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound(_) => Error::not_found(format!("instance {id} not found")).into(),
            e => e.into(),
        })
}

/// One provisioning run of the workspace.
#[utoipa::path(get, path = "/v1/workspaces/{name}/warm-pool/instances/{id}", tag = "warm-pool", operation_id = "get_warm_pool_instance",
    security(("bearer" = [])), params(("name" = String, Path, description = "Workspace name"), ("id" = String, Path)),
    responses((status = 200, body = InstanceView), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn get_workspace_instance(
    State(state): State<AppState>,
    caller: Caller,
    Path((ws, id)): Path<(String, String)>,
) -> Result<Json<InstanceView>, ApiError> {
    caller.require(Permission::WorkspaceGet)?;
    let instance = load_instance(&state, &caller, &id).await?;
    if instance.workspace != ws {
        return Err(
            Error::not_found(format!("instance {id} not found in workspace {ws:?}")).into(),
        );
    }
    Ok(Json(InstanceView::from(&instance)))
}

fn filter(query: InstanceQuery, workspace: Option<String>) -> Result<InstanceFilter, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(s.parse::<InstanceStatus>().map_err(Error::invalid)?),
    };
    Ok(InstanceFilter {
        workspace: workspace.or(query.workspace),
        status,
        test: query.test,
        vm: None,
        limit: query.limit,
    })
}

/// The workspace's provisioning runs, newest first.
#[utoipa::path(get, path = "/v1/workspaces/{name}/warm-pool/instances", tag = "warm-pool", operation_id = "list_warm_pool_instances",
    security(("bearer" = [])), params(("name" = String, Path, description = "Workspace name"), InstanceQuery),
    responses((status = 200, body = InstanceList), (status = 400, body = hearth_core::Error), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn list_workspace_instances(
    State(state): State<AppState>,
    caller: Caller,
    Path(ws): Path<String>,
    Query(query): Query<InstanceQuery>,
) -> Result<Json<InstanceList>, ApiError> {
    caller.require(Permission::WorkspaceGet)?;
    workspace(&state, &caller, &ws).await?;
    let items = state
        .store
        .list_instances(caller.tenant(), &filter(query, Some(ws))?)
        .await?;
    Ok(Json(InstanceList {
        items: items.iter().map(InstanceView::from).collect(),
    }))
}

/// The tenant's provisioning runs, newest first.
#[utoipa::path(get, path = "/v1/instances", tag = "warm-pool", operation_id = "list_instances",
    security(("bearer" = [])), params(InstanceQuery),
    responses((status = 200, body = InstanceList), (status = 400, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn list_instances(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<InstanceQuery>,
) -> Result<Json<InstanceList>, ApiError> {
    caller.require(Permission::WorkspaceGet)?;
    let items = state
        .store
        .list_instances(caller.tenant(), &filter(query, None)?)
        .await?;
    Ok(Json(InstanceList {
        items: items.iter().map(InstanceView::from).collect(),
    }))
}

/// One provisioning run.
#[utoipa::path(get, path = "/v1/instances/{id}", tag = "warm-pool", operation_id = "get_instance",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = InstanceView), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn get_instance(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    caller.require(Permission::WorkspaceGet)?;
    Ok(Json(InstanceView::from(
        &load_instance(&state, &caller, &id).await?,
    )))
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/workspaces/{name}/warm-pool",
            get(get_settings).patch(patch_settings),
        )
        .route("/v1/workspaces/{name}/warm-pool/test", post(test))
        .route(
            "/v1/workspaces/{name}/warm-pool/instances",
            get(list_workspace_instances),
        )
        .route(
            "/v1/workspaces/{name}/warm-pool/instances/{id}",
            get(get_workspace_instance),
        )
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{id}", get(get_instance))
}
