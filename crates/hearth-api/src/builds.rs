//! Control-plane builds: agents' workflows are pinned to the build that
//! started them; retiring a build strands its workflows (see the reaper).

use crate::auth::Caller;
use crate::{ApiError, AppState};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_core::rbac::Permission;
use hearth_reconcilers::status::rfc3339;
use hearth_store::Build;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildView {
    pub id: String,
    pub first_seen: String,
    pub retired_at: Option<String>,
    /// The build of the server answering.
    pub current: bool,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildList {
    pub items: Vec<BuildView>,
}

fn view(b: &Build, current: &str) -> BuildView {
    BuildView {
        id: b.id.clone(),
        first_seen: rfc3339(b.first_seen),
        retired_at: b.retired_at.map(rfc3339),
        current: b.id == current,
    }
}

/// Every build servers of this store have run.
#[utoipa::path(get, path = "/v1/builds", tag = "build", operation_id = "list_build", security(("bearer" = [])),
    responses((status = 200, body = BuildList), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<BuildList>, ApiError> {
    caller.require(Permission::BuildGet)?;
    let current = &state.pool.options().build;
    let builds = state.store.list_builds().await?;
    Ok(Json(BuildList {
        items: builds.iter().map(|b| view(b, current)).collect(),
    }))
}

/// Retires a build: workflows still pinned to it become stranded.
#[utoipa::path(post, path = "/v1/builds/{id}/retire", tag = "build", operation_id = "retire_build", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = BuildView), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn retire(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<BuildView>, ApiError> {
    caller.require(Permission::BuildRetire)?;
    let build = state.store.retire_build(&id).await?;
    tracing::warn!(build = %id, by = %caller.identity.name, "build retired");
    state.pool.wake();
    Ok(Json(view(&build, &state.pool.options().build)))
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/builds", get(list))
        .route("/v1/builds/{id}/retire", post(retire))
}
