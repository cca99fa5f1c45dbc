//! Webhooks: a tenant's endpoints that are sent its events, signed
//! (`/v1/webhooks`), and their delivery log. The sending is
//! [`deliver`]'s; which addresses may be reached is [`guard`]'s.
//!
//! **Invariants:**
//! - The signing secret is answered once, by the create; no other answer
//!   and no log line carries it.
//! - A URL is checked against [`guard::WebhookPolicy`] before it is
//!   stored, and again at every connect.

pub mod deliver;
pub mod guard;

use crate::auth::Caller;
use crate::events::parse_types;
use crate::tenants::rfc3339;
use crate::{ApiError, AppState, body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use hearth_core::Error;
use hearth_core::rbac::Permission;
use hearth_core::resource::{Kind, validate_name};
use hearth_store::{DeliveryRecord, NewWebhook, WebhookRecord};
use rand::RngCore;
use serde::{Deserialize, Serialize};

pub use guard::WebhookPolicy;

/// What every webhook secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";

/// A webhook as the API shows it (never with its secret).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookView {
    pub name: String,
    pub url: String,
    /// The event kinds it is sent (every kind when empty).
    pub types: Vec<String>,
    pub enabled: bool,
    /// RFC 3339.
    pub created_at: String,
    /// The id of the last event it was given (delivered or given up on).
    pub cursor: i64,
}

impl From<&WebhookRecord> for WebhookView {
    fn from(w: &WebhookRecord) -> Self {
        WebhookView {
            name: w.name.clone(),
            url: w.url.clone(),
            types: w.kinds.iter().map(|k| k.as_str().to_owned()).collect(),
            enabled: w.enabled,
            created_at: rfc3339(w.created_at),
            cursor: w.cursor,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookList {
    pub items: Vec<WebhookView>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// 1-63 lowercase letters, digits and '-', unique in the tenant.
    #[schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// `https://...` (plain `http://` only where the operator allows
    /// private addresses).
    #[schema(
        max_length = 2048,
        pattern = r"^https://([A-Za-z0-9-]+\.)*[A-Za-z][A-Za-z0-9-]*\.?(:[0-9]{1,4})?(/[!$-~]*)?$"
    )]
    pub url: String,
    /// Event kinds (`vm.ready`) or families (`vm`); every kind when absent.
    #[serde(default)]
    pub types: Vec<EventType>,
}

/// One event kind (`vm.ready`) or family (`vm`), as a webhook's filter
/// names it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, pattern = r"^(vm(\.(booting|ready|assigned|returned|destroyed|failed))?|agent(\.(queued|provisioning|running|idle|sleeping|completed|failed|killed))?|instance(\.(step|ready|failed))?|resource(\.(written|deleted))?|workspace(\.(backing_off|hard_limited|recovered))?|pool(\.(flushed|nuked|up))?)$")]
pub struct EventType(pub String);

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookCreated {
    pub webhook: WebhookView,
    /// The signing secret, shown once: `X-Hearth-Signature` is
    /// HMAC-SHA256 keyed with it.
    pub secret: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookDeleted {
    pub webhook: WebhookView,
}

/// One attempt of the delivery log.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryView {
    /// The log row's id.
    pub id: i64,
    /// `X-Hearth-Delivery` (the same for every attempt at one event).
    pub delivery: String,
    pub event_id: i64,
    pub kind: String,
    /// 1 for the first attempt at the event.
    pub attempt: i32,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<i32>,
    /// Why the attempt failed, when it did.
    pub error: Option<String>,
    /// `delivered`, `retrying` (another attempt at `next_retry_at`) or
    /// `failed` (the last attempt: given up).
    pub outcome: String,
    pub next_retry_at: Option<String>,
}

impl DeliveryView {
    fn new(webhook: &WebhookRecord, d: &DeliveryRecord) -> Self {
        let a = &d.attempt;
        DeliveryView {
            id: d.id,
            delivery: deliver::delivery_id(webhook, a.event_id),
            event_id: a.event_id,
            kind: a.kind.as_str().to_owned(),
            attempt: a.attempt,
            started_at: rfc3339(a.started_at),
            finished_at: rfc3339(a.finished_at),
            status: a.status,
            error: a.error.clone(),
            outcome: a.outcome.as_str().to_owned(),
            next_retry_at: a.next_retry_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryList {
    /// Newest first.
    pub items: Vec<DeliveryView>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DeliveryQuery {
    /// At most this many (default and most: 500).
    #[serde(default)]
    #[param(minimum = 0)]
    pub limit: Option<i64>,
}

/// A new secret: `whsec_` and 32 random bytes in hex.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", hex::encode(bytes))
}

fn not_found(name: &str) -> ApiError {
    Error::not_found(format!("webhook {name:?} not found")).into()
}

/// The caller's tenant's webhook `name`, or `NOT_FOUND`.
async fn find(state: &AppState, caller: &Caller, name: &str) -> Result<WebhookRecord, ApiError> {
    state
        .store
        .get_webhook(caller.tenant(), name)
        .await?
        .ok_or_else(|| not_found(name))
}

/// Creates a webhook; answers its signing secret, once.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhook", operation_id = "create_webhook", security(("bearer" = [])), request_body = CreateWebhook,
    responses((status = 201, body = WebhookCreated), (status = 400, body = hearth_core::Error),
              (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<WebhookCreated>), ApiError> {
    caller.require(Permission::WebhookUpdate)?;
    let request: CreateWebhook = body::json(body)?;
    validate_name(Kind::Workspace, &request.name).map_err(|_| {
        Error::invalid(format!(
            "name: invalid webhook name {:?}: use 1-63 lowercase letters, digits and '-'",
            request.name
        ))
    })?;
    if request.url.len() > 2048 {
        return Err(Error::invalid("url is longer than 2048 characters").into());
    }
    guard::check_url_resolves(&request.url, state.webhooks).await?;
    let mut kinds = Vec::new();
    for name in &request.types {
        // One name each: a comma inside one is not a list here.
        if name.0.is_empty() || name.0.contains(',') {
            return Err(Error::invalid(format!(
                "types: {:?} is not an event type (a kind such as vm.ready, or a family such as vm)",
                name.0
            ))
            .into());
        }
        for kind in
            parse_types(&name.0).map_err(|e| Error::invalid(format!("types: {}", e.message)))?
        {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
    }
    let webhook = state
        .store
        .create_webhook(&NewWebhook {
            tenant_id: caller.tenant(),
            name: request.name,
            url: request.url,
            secret: new_secret(),
            kinds,
        })
        .await?;
    tracing::info!(tenant = %caller.tenant(), by = %caller.identity.name, webhook = %webhook.name, "webhook created");
    Ok((
        StatusCode::CREATED,
        Json(WebhookCreated {
            webhook: WebhookView::from(&webhook),
            secret: webhook.secret.clone(),
        }),
    ))
}

/// The tenant's webhooks.
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhook", operation_id = "list_webhooks", security(("bearer" = [])),
    responses((status = 200, body = WebhookList), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<WebhookList>, ApiError> {
    caller.require(Permission::WebhookGet)?;
    let items = state.store.list_webhooks(caller.tenant()).await?;
    Ok(Json(WebhookList {
        items: items.iter().map(WebhookView::from).collect(),
    }))
}

/// One webhook.
#[utoipa::path(get, path = "/v1/webhooks/{name}", tag = "webhook", operation_id = "get_webhook", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = WebhookView), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<WebhookView>, ApiError> {
    caller.require(Permission::WebhookGet)?;
    let webhook = find(&state, &caller, &name).await?;
    Ok(Json(WebhookView::from(&webhook)))
}

/// Deletes a webhook and its delivery log; nothing more is sent to it.
#[utoipa::path(delete, path = "/v1/webhooks/{name}", tag = "webhook", operation_id = "delete_webhook", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = WebhookDeleted), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<WebhookDeleted>, ApiError> {
    caller.require(Permission::WebhookDelete)?;
    let webhook = find(&state, &caller, &name).await?;
    if !state.store.delete_webhook(caller.tenant(), &name).await? {
        return Err(not_found(&name));
    }
    tracing::info!(tenant = %caller.tenant(), by = %caller.identity.name, webhook = %name, "webhook deleted");
    Ok(Json(WebhookDeleted {
        webhook: WebhookView::from(&webhook),
    }))
}

/// A webhook's delivery log, newest first: every attempt.
#[utoipa::path(get, path = "/v1/webhooks/{name}/deliveries", tag = "webhook", operation_id = "list_webhook_deliveries", security(("bearer" = [])),
    params(("name" = String, Path), DeliveryQuery),
    responses((status = 200, body = DeliveryList), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(query): Query<DeliveryQuery>,
) -> Result<Json<DeliveryList>, ApiError> {
    caller.require(Permission::WebhookGet)?;
    let webhook = find(&state, &caller, &name).await?;
    let limit = query.limit.unwrap_or(0);
    if limit < 0 {
        return Err(Error::invalid(format!("limit must not be negative (got {limit})")).into());
    }
    let rows = state
        .store
        .list_webhook_deliveries(&webhook.id, limit)
        .await?;
    Ok(Json(DeliveryList {
        items: rows
            .iter()
            .map(|d| DeliveryView::new(&webhook, d))
            .collect(),
    }))
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/webhooks", get(list).post(create))
        .route("/v1/webhooks/{name}", get(get_one).delete(remove))
        .route("/v1/webhooks/{name}/deliveries", get(deliveries))
}
