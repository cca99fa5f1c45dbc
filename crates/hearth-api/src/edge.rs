//! The request edge, the layers every route sits behind: a panic answers
//! `500 INTERNAL`; every failure, whoever produced it (axum's 405 and
//! extractor rejections, the body limit), is `{code, message}` JSON with its
//! status; a NUL character in a path segment or query value is refused before
//! any handler (PostgreSQL cannot store one).

use crate::{ApiError, BODY_LIMIT};
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hearth_core::{Error, ErrorCode};
use std::any::Any;

/// Largest error body read back to be rewritten as JSON (axum's own
/// rejection texts are one line).
const REWRITE_LIMIT: usize = 64 * 1024;

/// Puts `routes` behind the edge layers (outermost first): panic catcher,
/// JSON errors, NUL refusal, body limits.
pub fn harden<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    routes
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        // A declared length beyond the limit is refused before the body is
        // read (axum's limit only bites when a handler reads it).
        .layer(tower_http::limit::RequestBodyLimitLayer::new(BODY_LIMIT))
        .layer(middleware::from_fn(drain_oversized))
        .layer(middleware::from_fn(refuse_nul))
        .layer(middleware::from_fn(json_errors))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_answer,
        ))
}

/// The most of an oversized body read (and dropped) before it is refused.
const DRAIN_LIMIT: u64 = 8 * BODY_LIMIT as u64;

/// How long an oversized body may take to be read out.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads out a body whose declared length is over the limit (up to
/// [`DRAIN_LIMIT`] bytes and [`DRAIN_TIME`], frame by frame, nothing kept)
/// before the limit refuses it. Answering while the client still sends
/// closes the connection on unread data: the kernel resets it and the
/// client loses the `413` it was about to read (a lingering close, as web
/// servers do). Larger bodies are refused at once.
async fn drain_oversized(request: Request, next: Next) -> Response {
    use http_body_util::BodyExt;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if !declared.is_some_and(|n| n > BODY_LIMIT as u64 && n <= DRAIN_LIMIT) {
        return next.run(request).await;
    }
    let (parts, mut body) = request.into_parts();
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(_frame)) = body.frame().await {}
    })
    .await;
    next.run(Request::from_parts(parts, Body::empty())).await
}

/// The answer to a request whose handler panicked. The panic itself is
/// logged once, by [`log_panics`]' hook, with its cause and location and in
/// the request's span; this only answers.
fn panic_answer(_payload: Box<dyn Any + Send + 'static>) -> Response {
    ApiError(Error::internal(
        "internal error: the request failed (see the server log)",
    ))
    .into_response()
}

/// The text a panic was raised with.
fn panic_cause(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(a panic without a message)"
    }
}

/// Replaces the default panic hook (a bare stderr line) with one tracing
/// event carrying the cause and location: a panicking request is logged
/// once, inside its request span, and answered by [`harden`]'s catcher.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(cause = panic_cause(info.payload()), %location, "panic");
    }));
}

/// Rewrites every non-success answer that is not JSON already as
/// `{code, message}`, keeping its status and headers (axum adds a 405's
/// `Allow` header outside the route layers, after this).
async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, REWRITE_LIMIT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .map(|v| format!(" (allowed: {v})"))
                .unwrap_or_default();
            format!("method {method} is not allowed on {path}{allowed}")
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("the request body exceeds the limit of {BODY_LIMIT} bytes")
        }
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned(),
        _ => text,
    };
    let error = Error::new(code_for(status), message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&error).unwrap_or_default();
    Response::from_parts(parts, Body::from(body))
}

/// The error code closest to an HTTP status produced outside hearth's own
/// handlers.
fn code_for(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::NotFound,
        409 => ErrorCode::Aborted,
        429 => ErrorCode::ResourceExhausted,
        503 => ErrorCode::Unavailable,
        500..=599 => ErrorCode::Internal,
        _ => ErrorCode::InvalidArgument,
    }
}

/// Refuses a NUL character (`%00`) in a path segment or a query parameter.
async fn refuse_nul(request: Request, next: Next) -> Response {
    match check_uri(request.uri()) {
        Ok(()) => next.run(request).await,
        Err(e) => ApiError(e).into_response(),
    }
}

fn check_uri(uri: &Uri) -> Result<(), Error> {
    for segment in uri.path().split('/') {
        if percent_encoding::percent_decode_str(segment).any(|b| b == 0) {
            return Err(Error::invalid(format!(
                "the path segment {segment:?} contains a NUL character, which is not allowed"
            )));
        }
    }
    if let Some(query) = uri.query() {
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if key.contains('\0') {
                return Err(Error::invalid(
                    "a query parameter name contains a NUL character, which is not allowed",
                ));
            }
            if value.contains('\0') {
                return Err(Error::invalid(format!(
                    "query parameter {key:?} contains a NUL character, which is not allowed"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn boom() -> &'static str {
        panic!("the handler broke on purpose")
    }

    fn app() -> Router {
        harden(
            Router::new()
                .route("/boom", get(boom))
                .route("/ok", get(|| async { "ok" })),
        )
    }

    async fn call(uri: &str, method: &str) -> (StatusCode, serde_json::Value) {
        let response = app()
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json",
            "{uri}"
        );
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json_and_the_server_goes_on() {
        let (status, body) = call("/boom", "GET").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["code"], "INTERNAL");
        assert!(
            body["message"].as_str().unwrap().contains("server log"),
            "{body}"
        );
        let response = app()
            .oneshot(Request::get("/ok").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn method_not_allowed_is_json() {
        let (status, body) = call("/ok", "DELETE").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["code"], "INVALID_ARGUMENT");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with("method DELETE is not allowed on /ok"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn nul_in_a_path_segment_or_query_value_is_refused() {
        let (status, body) = call("/ok%00", "GET").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body["message"],
            "the path segment \"ok%00\" contains a NUL character, which is not allowed"
        );
        let (status, body) = call("/ok?phase=a%00b", "GET").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body["message"],
            "query parameter \"phase\" contains a NUL character, which is not allowed"
        );
    }
}
