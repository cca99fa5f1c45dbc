//! Tenants: created by operators, each with its own admin.

use crate::auth::{Caller, issue_token};
use crate::{ApiError, AppState, body};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use hearth_core::rbac::Permission;
use hearth_core::resource::{Kind, PoolConfig, validate_name};
use serde::{Deserialize, Serialize};

pub(crate) fn rfc3339(millis: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantView {
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantList {
    pub items: Vec<TenantView>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub name: String,
    /// Name of the tenant's first (admin) identity; default `admin`.
    #[serde(default = "admin")]
    pub admin: String,
}

fn admin() -> String {
    "admin".to_owned()
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantCreated {
    pub tenant: String,
    pub identity: String,
    /// The admin's token; shown once, only its hash is stored.
    pub token: String,
}

/// Every tenant (operators only).
#[utoipa::path(get, path = "/v1/tenants", tag = "tenant", operation_id = "list_tenants", security(("bearer" = [])),
    responses((status = 200, body = TenantList), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<TenantList>, ApiError> {
    caller.require(Permission::TenantCreate)?;
    let tenants = state.store.list_tenants().await?;
    Ok(Json(TenantList {
        items: tenants
            .iter()
            .map(|t| TenantView {
                name: t.name.clone(),
                created_at: rfc3339(t.created_at),
            })
            .collect(),
    }))
}

/// Creates a tenant with its pool config (`max_vms` from the server's
/// `--default-max-vms`) and an admin identity; returns the admin's token.
#[utoipa::path(post, path = "/v1/tenants", tag = "tenant", operation_id = "create_tenant", security(("bearer" = [])), request_body = CreateTenant,
    responses((status = 201, body = TenantCreated), (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<TenantCreated>), ApiError> {
    caller.require(Permission::TenantCreate)?;
    let request: CreateTenant = body::json(body)?;
    for (what, name) in [
        ("tenant", &request.name),
        ("admin identity", &request.admin),
    ] {
        validate_name(Kind::Workspace, name).map_err(|_| {
            hearth_core::Error::invalid(format!(
                "invalid {what} name {name:?}: use 1-63 lowercase letters, digits and '-'"
            ))
        })?;
    }
    let token = issue_token(None);
    let pool_config = serde_json::to_value(PoolConfig::initial(state.default_max_vms))
        .map_err(|e| hearth_core::Error::internal(e.to_string()))?;
    let (tenant, identity) = state
        .store
        .create_tenant(&request.name, &request.admin, &token.stored, &pool_config)
        .await?;
    tracing::info!(by = %caller.identity.name, tenant = %tenant.name, tenant_id = %tenant.id, "tenant created");
    Ok((
        StatusCode::CREATED,
        Json(TenantCreated {
            tenant: tenant.name,
            identity: identity.name,
            token: token.text,
        }),
    ))
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/tenants", get(list).post(create))
}
