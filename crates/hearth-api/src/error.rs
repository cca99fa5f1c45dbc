//! The one mapping from errors to API answers.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_core::{Error, ErrorCode};
use hearth_store::StoreError;

/// An error on its way out as `{"code", "message"}`.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let error = match &e {
            StoreError::NotFound(what) => Error::not_found(format!("{what} not found")),
            StoreError::AlreadyExists(what) => {
                Error::new(ErrorCode::AlreadyExists, format!("{what} already exists"))
            }
            StoreError::Conflict(what) => Error::new(
                ErrorCode::Aborted,
                format!("{what} was changed concurrently; retry"),
            ),
            StoreError::MissingReference { kind, name } => Error::failed_precondition(format!(
                "{kind} {name:?} does not exist; create it first"
            )),
            StoreError::InUse {
                kind,
                name,
                by_kind,
                by_name,
            } => Error::failed_precondition(format!(
                "{kind} {name:?} is used by {by_kind} {by_name:?}; change or delete that first"
            )),
            _ => {
                // The chain is logged once, here; the caller sees no internals.
                tracing::error!(error = %chain(&e), "store error");
                Error::internal("internal error: the store failed (see the server log)")
            }
        };
        ApiError(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

/// An error with its sources, `outer: inner: innermost`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
