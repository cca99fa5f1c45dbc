//! Developers and service profiles of the caller's tenant, and their tokens.

use crate::auth::{Caller, expiry_from, issue_token};
use crate::{ApiError, AppState, body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use hearth_core::rbac::{IdentityKind, Permission, Role};
use hearth_core::resource::{Kind, validate_name};
use hearth_store::{Identity, IdentityRefusal, StoreError};
use serde::{Deserialize, Serialize};

/// An identity as the API shows it (never with a token).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IdentityView {
    pub name: String,
    pub kind: IdentityKind,
    pub role: Role,
    /// RFC 3339.
    pub created_at: String,
}

impl From<&Identity> for IdentityView {
    fn from(i: &Identity) -> Self {
        IdentityView {
            name: i.name.clone(),
            kind: i.kind,
            role: i.role,
            created_at: crate::tenants::rfc3339(i.created_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IdentityList {
    pub items: Vec<IdentityView>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateIdentity {
    pub name: String,
    /// `developer` (default) or `service`.
    #[serde(default = "developer")]
    pub kind: IdentityKind,
    pub role: Role,
    /// Token lifetime such as `24h`, at most `366d`; absent means no expiry.
    #[serde(default)]
    pub expires_in: Option<String>,
}

fn developer() -> IdentityKind {
    IdentityKind::Developer
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IdentityCreated {
    pub identity: IdentityView,
    /// Shown once; only its hash is stored.
    pub token: String,
    pub expires_at: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Token lifetime such as `24h`, at most `366d`; absent means no expiry.
    #[serde(default)]
    pub expires_in: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenCreated {
    /// Shown once; only its hash is stored.
    pub token: String,
    pub expires_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IdentityDeleted {
    pub identity: IdentityView,
}

/// The tenant's identities.
#[utoipa::path(get, path = "/v1/identities", tag = "identity", operation_id = "list_identities", security(("bearer" = [])),
    responses((status = 200, body = IdentityList), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<IdentityList>, ApiError> {
    caller.require(Permission::IdentityGet)?;
    let items = state.store.list_identities(caller.tenant()).await?;
    Ok(Json(IdentityList {
        items: items.iter().map(IdentityView::from).collect(),
    }))
}

/// Creates a developer or service profile and its first token.
#[utoipa::path(post, path = "/v1/identities", tag = "identity", operation_id = "create_identity", security(("bearer" = [])), request_body = CreateIdentity,
    responses((status = 201, body = IdentityCreated), (status = 400, body = hearth_core::Error),
              (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<IdentityCreated>), ApiError> {
    caller.require(Permission::IdentityUpdate)?;
    let request: CreateIdentity = body::json(body)?;
    validate_name(Kind::Workspace, &request.name).map_err(|_| {
        hearth_core::Error::invalid(format!(
            "invalid identity name {:?}: use 1-63 lowercase letters, digits and '-'",
            request.name
        ))
    })?;
    // Everything is checked before anything is stored: the identity and
    // its token are then written in one transaction.
    if request.role > caller.identity.role {
        return Err(if request.role == Role::Operator {
            denied("your role does not have tenant.create permission, which granting the operator role needs".into())
        } else {
            denied(format!(
                "you cannot create an identity with role {}, above your own role {}",
                request.role, caller.identity.role
            ))
        });
    }
    let expires_at = expiry_from(request.expires_in.as_deref())?;
    let token = issue_token(expires_at);
    let identity = state
        .store
        .create_identity(
            caller.tenant(),
            &request.name,
            request.kind,
            request.role,
            Some(&token.stored),
        )
        .await?;
    tracing::info!(tenant = %caller.tenant(), by = %caller.identity.name, identity = %identity.name, role = %identity.role, "identity created");
    Ok((
        StatusCode::CREATED,
        Json(IdentityCreated {
            identity: IdentityView::from(&identity),
            token: token.text,
            expires_at: expires_at.map(crate::tenants::rfc3339),
        }),
    ))
}

/// Deletes an identity and every token of it.
#[utoipa::path(delete, path = "/v1/identities/{name}", tag = "identity", operation_id = "delete_identity", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = IdentityDeleted), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<IdentityDeleted>, ApiError> {
    caller.require(Permission::IdentityDelete)?;
    // The role ceiling and the last-manager rule are checked in the
    // delete's own transaction.
    let identity = state
        .store
        .delete_identity(caller.tenant(), &name, caller.identity.role)
        .await
        .map_err(|e| refused(e, "delete"))?;
    tracing::info!(tenant = %caller.tenant(), by = %caller.identity.name, identity = %name, "identity deleted");
    Ok(Json(IdentityDeleted {
        identity: IdentityView::from(&identity),
    }))
}

/// Issues another token for an identity.
#[utoipa::path(post, path = "/v1/identities/{name}/tokens", tag = "identity", security(("bearer" = [])),
    params(("name" = String, Path)), request_body = CreateToken,
    responses((status = 201, body = TokenCreated), (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    caller.require(Permission::IdentityUpdate)?;
    let request: CreateToken = body::json(body)?;
    let expires_at = expiry_from(request.expires_in.as_deref())?;
    let token = issue_token(expires_at);
    state
        .store
        .create_token(caller.tenant(), &name, &token.stored, caller.identity.role)
        .await
        .map_err(|e| refused(e, "issue a token for"))?;
    tracing::info!(tenant = %caller.tenant(), by = %caller.identity.name, identity = %name, "token issued");
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            token: token.text,
            expires_at: expires_at.map(crate::tenants::rfc3339),
        }),
    ))
}

fn denied(message: String) -> ApiError {
    hearth_core::Error::new(hearth_core::ErrorCode::PermissionDenied, message).into()
}

/// The answer to a store refusal of `verb` on an identity: its role above
/// the caller's is `PERMISSION_DENIED`, the last manager
/// `FAILED_PRECONDITION`.
fn refused(e: StoreError, verb: &str) -> ApiError {
    match e {
        StoreError::IdentityRefused {
            name,
            refusal: IdentityRefusal::AboveCeiling { role, ceiling },
        } => denied(format!(
            "you cannot {verb} identity {name:?}: its role {role} is above your own role {ceiling}"
        )),
        StoreError::IdentityRefused {
            name,
            refusal: IdentityRefusal::LastManager,
        } => hearth_core::Error::failed_precondition(format!(
            "cannot delete identity {name:?}: it is the last identity of this tenant that can manage identities (identity.update); create another admin first"
        ))
        .into(),
        e => e.into(),
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/identities", get(list).post(create))
        .route("/v1/identities/{name}", delete(remove))
        .route("/v1/identities/{name}/tokens", post(create_token))
}
