//! hearth's HTTP API: JSON over HTTP, bearer-token authentication, the
//! permission check of every route, and the OpenAPI document.
//!
//! **Invariants:**
//! - Every route but `/healthz` and `/openapi.json` authenticates first and
//!   checks one named permission before touching the store (the fleet's
//!   node routes authenticate a node by its credential instead:
//!   [`nodes::authenticate_node`]; the dashboard's page and its sign-in,
//!   [`ui`], take no caller: the sign-in checks the token it is given).
//!   A caller is a bearer token or the dashboard's session cookie, which
//!   stands for the token it was opened with.
//! - Every answer that is not a success is `{"code", "message"}` with the
//!   matching HTTP status ([`error::ApiError`] is the one mapping).
//! - The API never talks to a driver: it writes desired state and reads
//!   records; reconcilers do the rest.
//! - Secret values (environment variables) never leave in an answer or a log
//!   line: specs are redacted before they are serialized.

mod agents;
pub mod auth;
mod body;
mod builds;
pub mod edge;
pub mod error;
pub mod events;
pub mod fleet;
mod identities;
mod images;
pub mod metrics;
pub mod nodes;
pub mod openapi;
mod pool;
mod resources;
mod tenants;
pub mod ui;
mod warm_pool;
pub mod webhooks;

use axum::Router;
use axum::http::{Method, Uri};
use axum::routing::get;
use hearth_store::Store;
use std::sync::Arc;

pub use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// The pool runner: the API's only way to the drivers.
    pub pool: Arc<hearth_reconcilers::Pool>,
    /// `max_vms` of the pool config a new tenant starts with
    /// (`--default-max-vms`).
    pub default_max_vms: i32,
    /// The join token and the embedded node (`/v1/fleet/*`).
    pub fleet: fleet::FleetConfig,
    /// What webhooks may reach (`--webhook-allow-private`).
    pub webhooks: webhooks::WebhookPolicy,
}

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The whole API as one router.
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/healthz", get(health))
        .route("/openapi.json", get(openapi::serve))
        .route("/v1/whoami", get(auth::whoami))
        .merge(resources::routes())
        .merge(identities::routes())
        .merge(tenants::routes())
        .merge(agents::routes())
        .merge(pool::routes())
        .merge(builds::routes())
        .merge(images::routes())
        .merge(warm_pool::routes())
        .merge(nodes::routes())
        .merge(fleet::routes())
        .merge(ui::routes())
        .merge(webhooks::routes())
        .merge(events::routes())
        .merge(metrics::routes())
        .fallback(fallback);
    edge::harden(routes)
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(
                    tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO),
                )
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO),
                ),
        )
        .with_state(state)
}

/// Health of the server and its store.
#[utoipa::path(get, path = "/healthz", tag = "server",
    responses((status = 200, description = "The server and its store answer", body = Health),
              (status = 503, description = "The store does not answer", body = hearth_core::Error)))]
async fn health(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<axum::Json<Health>, ApiError> {
    state.store.ping().await.map_err(|e| {
        tracing::error!(error = %error::chain(&e), "health check: store does not answer");
        ApiError(hearth_core::Error::new(
            hearth_core::ErrorCode::Unavailable,
            "the store does not answer",
        ))
    })?;
    Ok(axum::Json(Health {
        status: "ok".into(),
        store: state.store.backend().into(),
    }))
}

/// Answer of `/healthz`.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
    /// `sqlite` or `postgres`.
    pub store: String,
}

async fn fallback(method: Method, uri: Uri) -> ApiError {
    ApiError(hearth_core::Error::not_found(format!(
        "no route for {method} {}",
        uri.path()
    )))
}
