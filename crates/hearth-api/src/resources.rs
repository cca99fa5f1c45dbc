//! Get, list, set (create or replace), patch and delete of the four resource
//! kinds. One generic implementation; a macro stamps out the per-kind routes
//! so that each appears in the OpenAPI document with its own schema.

use crate::auth::Caller;
use crate::{ApiError, AppState, body};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use hearth_core::Error;
use hearth_core::rbac::Permission;
use hearth_core::resource::{
    Environment, Image, Kind, POOL_CONFIG_NAME, PoolConfig, Spec, Workspace, apply_merge_patch,
    parse_spec, validate_name,
};
use hearth_store::{Precondition, PutResource, ResourceRecord, StoreError};
use serde::{Deserialize, Serialize};

/// A resource as the API shows it: metadata plus the spec (secrets masked).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResourceView {
    pub kind: String,
    pub name: String,
    /// Starts at 1 and bumps on every change of the spec.
    pub version: i64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// The resource's fields, as written (defaults filled in, secrets masked).
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResourceList {
    pub items: Vec<ResourceView>,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WriteResult {
    pub outcome: Outcome,
    pub resource: ResourceView,
}

/// How many times a read-modify-write is retried when another write won.
const WRITE_ATTEMPTS: usize = 5;

fn permissions(kind: Kind) -> (Permission, Permission, Permission) {
    use Permission::*;
    match kind {
        Kind::PoolConfig => (PoolConfigGet, PoolConfigUpdate, PoolConfigDelete),
        Kind::Workspace => (WorkspaceGet, WorkspaceUpdate, WorkspaceDelete),
        Kind::Environment => (EnvironmentGet, EnvironmentUpdate, EnvironmentDelete),
        Kind::Image => (ImageGet, ImageUpdate, ImageDelete),
    }
}

/// Checks the name in a path; the pool config only ever has `default`.
fn check_name(kind: Kind, name: &str, writing: bool) -> Result<(), ApiError> {
    if kind == Kind::PoolConfig && name != POOL_CONFIG_NAME {
        let message =
            format!("the pool config is a singleton always named \"default\" (got {name:?})");
        return Err(if writing {
            Error::invalid(message)
        } else {
            Error::not_found(format!("pool-config {name:?} not found: {message}"))
        }
        .into());
    }
    if writing {
        validate_name(kind, name)?;
    }
    Ok(())
}

fn not_found(kind: Kind, name: &str) -> ApiError {
    if kind == Kind::PoolConfig {
        Error::not_found(
            "pool-config \"default\" not found: set it with `hearth set pool-config default`",
        )
        .into()
    } else {
        Error::not_found(format!("{kind} {name:?} not found")).into()
    }
}

fn decode<T: Spec>(record: &ResourceRecord) -> Result<T, ApiError> {
    serde_json::from_value(record.spec.clone()).map_err(|e| {
        tracing::error!(kind = %record.kind, name = %record.name, error = %e, "stored spec does not parse");
        Error::internal(format!("stored {} {:?} is unreadable", record.kind, record.name)).into()
    })
}

fn view<T: Spec>(record: &ResourceRecord) -> Result<ResourceView, ApiError> {
    let spec: T = decode(record)?;
    Ok(ResourceView {
        kind: record.kind.as_str().to_owned(),
        name: record.name.clone(),
        version: record.version,
        created_at: crate::tenants::rfc3339(record.created_at),
        updated_at: crate::tenants::rfc3339(record.updated_at),
        spec: serde_json::to_value(spec.redacted()).map_err(|e| Error::internal(e.to_string()))?,
    })
}

/// An image record as the API shows it.
pub(crate) fn view_image(record: &ResourceRecord) -> Result<ResourceView, ApiError> {
    view::<Image>(record)
}

async fn list<T: Spec>(state: AppState, caller: Caller) -> Result<Json<ResourceList>, ApiError> {
    caller.require(permissions(T::KIND).0)?;
    let records = state.store.list_resources(caller.tenant(), T::KIND).await?;
    let items = records.iter().map(view::<T>).collect::<Result<_, _>>()?;
    Ok(Json(ResourceList { items }))
}

async fn get_one<T: Spec>(
    state: AppState,
    caller: Caller,
    name: String,
) -> Result<Json<ResourceView>, ApiError> {
    caller.require(permissions(T::KIND).0)?;
    check_name(T::KIND, &name, false)?;
    match state
        .store
        .get_resource(caller.tenant(), T::KIND, &name)
        .await?
    {
        Some(record) => Ok(Json(view::<T>(&record)?)),
        None => Err(not_found(T::KIND, &name)),
    }
}

/// Writes `spec` over `previous` (or creates it) with an optimistic check.
async fn write<T: Spec>(
    state: &AppState,
    caller: &Caller,
    name: &str,
    mut spec: T,
    previous: Option<(&ResourceRecord, T)>,
) -> Result<Result<WriteResult, StoreError>, ApiError> {
    spec.restore_masked(previous.as_ref().map(|(_, p)| p))?;
    if caller.identity.role < hearth_core::rbac::Role::Operator {
        let fields = spec.operator_only_changes(previous.as_ref().map(|(_, p)| p));
        if !fields.is_empty() {
            return Err(Error::new(
                hearth_core::ErrorCode::PermissionDenied,
                format!(
                    "only an operator may set {} on {} {name:?}: it lets VMs reach the host",
                    fields.join(" or "),
                    T::KIND
                ),
            )
            .into());
        }
    }
    let json = serde_json::to_value(&spec).map_err(|e| Error::internal(e.to_string()))?;
    let references = spec.references();
    let put = PutResource {
        actor: Some(&caller.identity.name),
        tenant: caller.tenant(),
        kind: T::KIND,
        name,
        spec: &json,
        references: &references,
        precondition: previous.as_ref().map_or(Precondition::None, |(r, _)| {
            Precondition::Version(r.version)
        }),
    };
    match state.store.put_resource(put).await {
        Ok(outcome) => {
            let result = WriteResult {
                outcome: match (outcome.created, outcome.changed) {
                    (true, _) => Outcome::Created,
                    (false, true) => Outcome::Updated,
                    (false, false) => Outcome::Unchanged,
                },
                resource: view::<T>(&outcome.record)?,
            };
            tracing::info!(tenant = %caller.tenant(), identity = %caller.identity.name, kind = %T::KIND, name,
                outcome = ?result.outcome, version = outcome.record.version, "resource written");
            if outcome.changed || outcome.created {
                // Every kind feeds the planner: the pool acts on it now.
                state.pool.wake();
            }
            Ok(Ok(result))
        }
        Err(e @ StoreError::Conflict(_)) => Ok(Err(e)),
        Err(e) => Err(e.into()),
    }
}

fn status_of(result: &WriteResult) -> StatusCode {
    if result.outcome == Outcome::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

async fn put<T: Spec>(
    state: AppState,
    caller: Caller,
    name: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<WriteResult>), ApiError> {
    caller.require(permissions(T::KIND).1)?;
    check_name(T::KIND, &name, true)?;
    let (text, format) = body::text(&headers, body)?;
    // Parsing a large document is CPU work: off the runtime's workers, so
    // other requests go on meanwhile.
    let spec: T = tokio::task::spawn_blocking(move || parse_spec(&text, format))
        .await
        .map_err(|e| Error::internal(format!("parsing the document failed: {e}")))??;
    let mut last = None;
    for _ in 0..WRITE_ATTEMPTS {
        let record = state
            .store
            .get_resource(caller.tenant(), T::KIND, &name)
            .await?;
        let previous = match &record {
            Some(r) => Some((r, decode::<T>(r)?)),
            None => None,
        };
        match write(&state, &caller, &name, spec.clone(), previous).await? {
            Ok(result) => return Ok((status_of(&result), Json(result))),
            Err(conflict) => last = Some(conflict),
        }
    }
    Err(last
        .map(ApiError::from)
        .unwrap_or_else(|| Error::internal("write retries exhausted").into()))
}

async fn patch<T: Spec>(
    state: AppState,
    caller: Caller,
    name: String,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<WriteResult>), ApiError> {
    caller.require(permissions(T::KIND).1)?;
    check_name(T::KIND, &name, false)?;
    let merge: serde_json::Value = body::json(body)?;
    let mut last = None;
    for _ in 0..WRITE_ATTEMPTS {
        let Some(record) = state
            .store
            .get_resource(caller.tenant(), T::KIND, &name)
            .await?
        else {
            return Err(not_found(T::KIND, &name));
        };
        let current: T = decode(&record)?;
        let patched = apply_merge_patch(&current, &merge)?;
        match write(&state, &caller, &name, patched, Some((&record, current))).await? {
            Ok(result) => return Ok((StatusCode::OK, Json(result))),
            Err(conflict) => last = Some(conflict),
        }
    }
    Err(last
        .map(ApiError::from)
        .unwrap_or_else(|| Error::internal("write retries exhausted").into()))
}

async fn delete<T: Spec>(
    state: AppState,
    caller: Caller,
    name: String,
) -> Result<Json<ResourceView>, ApiError> {
    caller.require(permissions(T::KIND).2)?;
    check_name(T::KIND, &name, false)?;
    if T::KIND == Kind::PoolConfig {
        // Every tenant has exactly one pool config, from its creation on.
        return Err(Error::failed_precondition(
            "the pool config cannot be deleted; set it instead (hearth set pool-config default)",
        )
        .into());
    }
    match state
        .store
        .delete_resource(caller.tenant(), T::KIND, &name, Some(&caller.identity.name))
        .await
    {
        Ok(record) => {
            tracing::info!(tenant = %caller.tenant(), identity = %caller.identity.name, kind = %T::KIND, name, "resource deleted");
            state.pool.wake();
            Ok(Json(view::<T>(&record)?))
        }
        Err(StoreError::NotFound(_)) => Err(not_found(T::KIND, &name)),
        Err(e) => Err(e.into()),
    }
}

/// Stamps out one kind's handlers, each with its OpenAPI annotation.
macro_rules! resource_api {
    ($module:ident, $spec:ident, $tag:tt, $list_path:tt, $item_path:tt) => {
        pub mod $module {
            use super::*;

            #[utoipa::path(get, path = $list_path, tag = $tag, operation_id = concat!("list_", stringify!($module)), security(("bearer" = [])),
                responses((status = 200, body = ResourceList), (status = 401, body = hearth_core::Error),
                          (status = 403, body = hearth_core::Error)))]
            pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<ResourceList>, ApiError> {
                super::list::<$spec>(state, caller).await
            }

            #[utoipa::path(get, path = $item_path, tag = $tag, operation_id = concat!("get_", stringify!($module)), security(("bearer" = [])),
                params(("name" = String, Path, description = "Resource name")),
                responses((status = 200, body = ResourceView), (status = 401, body = hearth_core::Error),
                          (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
            pub async fn get_one(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> Result<Json<ResourceView>, ApiError> {
                super::get_one::<$spec>(state, caller, name).await
            }

            /// Creates or replaces the resource; the body is its whole spec as
            /// JSON or (with `Content-Type: application/yaml`) YAML.
            #[utoipa::path(put, path = $item_path, tag = $tag, operation_id = concat!("put_", stringify!($module)), security(("bearer" = [])),
                params(("name" = String, Path, description = "Resource name")),
                request_body(content = $spec, description = "The whole resource (JSON, or YAML with Content-Type application/yaml)"),
                responses((status = 200, body = WriteResult), (status = 201, body = WriteResult),
                          (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error),
                          (status = 403, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
            pub async fn put(State(state): State<AppState>, caller: Caller, Path(name): Path<String>, headers: HeaderMap,
                body: Result<Bytes, BytesRejection>) -> Result<(StatusCode, Json<WriteResult>), ApiError> {
                super::put::<$spec>(state, caller, name, headers, body).await
            }

            /// Applies a JSON merge patch (RFC 7386) to the resource.
            #[utoipa::path(patch, path = $item_path, tag = $tag, operation_id = concat!("patch_", stringify!($module)), security(("bearer" = [])),
                params(("name" = String, Path, description = "Resource name")),
                request_body(content = Object, content_type = "application/merge-patch+json"),
                responses((status = 200, body = WriteResult), (status = 400, body = hearth_core::Error),
                          (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error),
                          (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
            pub async fn patch(State(state): State<AppState>, caller: Caller, Path(name): Path<String>,
                body: Result<Bytes, BytesRejection>) -> Result<(StatusCode, Json<WriteResult>), ApiError> {
                super::patch::<$spec>(state, caller, name, body).await
            }

            #[utoipa::path(delete, path = $item_path, tag = $tag, operation_id = concat!("delete_", stringify!($module)), security(("bearer" = [])),
                params(("name" = String, Path, description = "Resource name")),
                responses((status = 200, body = ResourceView), (status = 401, body = hearth_core::Error),
                          (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error),
                          (status = 409, body = hearth_core::Error)))]
            pub async fn delete(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> Result<Json<ResourceView>, ApiError> {
                super::delete::<$spec>(state, caller, name).await
            }

            pub fn routes() -> Router<AppState> {
                Router::new()
                    .route($list_path, get(list))
                    .route($item_path, get(get_one).put(put).patch(patch).delete(delete))
            }
        }
    };
}

resource_api!(
    pool_config,
    PoolConfig,
    "pool-config",
    "/v1/pool-config",
    "/v1/pool-config/{name}"
);
resource_api!(
    workspace,
    Workspace,
    "workspace",
    "/v1/workspaces",
    "/v1/workspaces/{name}"
);
resource_api!(
    environment,
    Environment,
    "environment",
    "/v1/environments",
    "/v1/environments/{name}"
);
resource_api!(image, Image, "image", "/v1/images", "/v1/images/{name}");

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(pool_config::routes())
        .merge(workspace::routes())
        .merge(environment::routes())
        .merge(image::routes())
}
