//! `/metrics`: the Prometheus text format of [`hearth_reconcilers::metrics`].
//!
//! On the API's listener a scrape must authenticate: either a bearer token
//! of an identity with `metrics.read` (operators), or the metrics token of
//! `--metrics-token-file` (compared in constant time). [`plain_router`] is
//! the same answer for `--metrics-listen`, with no authentication on a
//! loopback address; off loopback the server requires the metrics token
//! (it refuses to start without `--metrics-token-file`).
//!
//! **Invariant:** this module writes nothing; who may scrape is decided
//! before the store is read.

use crate::auth::{Caller, bearer};
use crate::{ApiError, AppState};
use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hearth_core::Error;
use hearth_core::rbac::Permission;
use std::sync::Arc;

/// The content type of the Prometheus text format the answer is in.
pub const CONTENT_TYPE_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A caller allowed to scrape: the metrics token, or an identity with
/// `metrics.read`.
pub struct Scraper;

impl FromRequestParts<AppState> for Scraper {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if bearer(&parts.headers).is_some_and(|t| state.pool.metrics().is_scrape_token(t)) {
            return Ok(Scraper);
        }
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(Permission::MetricsRead)?;
        Ok(Scraper)
    }
}

/// Every metric of this server, in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "server", operation_id = "scrape_metrics", security(("bearer" = [])),
    responses((status = 200, description = "The metrics, Prometheus text format", content_type = "application/openmetrics-text", body = String),
              (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn scrape(
    State(state): State<AppState>,
    _scraper: Scraper,
) -> Result<Response, ApiError> {
    render(&state.pool).await
}

async fn render(pool: &hearth_reconcilers::Pool) -> Result<Response, ApiError> {
    let text = pool.render_metrics().await.map_err(|e| {
        tracing::error!(error = %crate::error::chain(&e), "cannot render the metrics");
        ApiError(Error::internal(format!("cannot render the metrics: {e}")))
    })?;
    Ok(([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], text).into_response())
}

/// `/metrics` on the API's listener.
pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

/// `/metrics` alone, for `--metrics-listen`: with no authentication, or,
/// when `token`, only for scrapes presenting the metrics token; anything
/// else is `NOT_FOUND`.
pub fn plain_router(pool: Arc<hearth_reconcilers::Pool>, token: bool) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(
                move |State(pool): State<Arc<hearth_reconcilers::Pool>>,
                      headers: axum::http::HeaderMap| async move {
                    if token {
                        let presented = bearer(&headers);
                        if !presented.is_some_and(|t| pool.metrics().is_scrape_token(t)) {
                            return Err(ApiError(Error::unauthenticated(
                                "this listener needs the metrics token as the bearer token",
                            )));
                        }
                    }
                    render(&pool).await
                },
            ),
        )
        .fallback(|| async { ApiError(Error::not_found("this listener serves only GET /metrics")) })
        .with_state(pool)
}
