//! The web dashboard at `/ui`: its embedded assets, sign-in with a token
//! into a session cookie, sign-out, and the cookie's checks (session
//! lookup, CSRF) that [`crate::auth::Caller`] applies to every API route.
//!
//! The dashboard is a static page (`ui/index.html`, `app.js`, `app.css`,
//! compiled into the binary) that calls the ordinary JSON API with the
//! cookie; it has no routes of its own beyond these.
//!
//! **Invariants:**
//! - The session id lives only in the browser's `HttpOnly; Secure;
//!   SameSite=Strict` cookie; the store keeps its SHA-256
//!   ([`hearth_store::NewUiSession`]), bound to the token, identity and
//!   tenant it was opened with, and honours it no longer than the token
//!   ([`hearth_store::Store::find_ui_session`]), so every replica agrees.
//! - A request authenticated by the cookie that is not `GET`/`HEAD` must
//!   repeat the session's CSRF token in `X-Hearth-CSRF`, and its `Origin`
//!   (when sent) must be this server's; otherwise `PERMISSION_DENIED`.
//! - Every `/ui` answer carries a strict Content-Security-Policy (no inline
//!   script, nothing from another origin), `X-Frame-Options: DENY`,
//!   `Referrer-Policy: no-referrer` and `nosniff`.
//! - This module never renders data into HTML: the page builds its DOM with
//!   `textContent` only (agent output and names are attacker-written).

use crate::auth::authenticate_token;
use crate::{ApiError, AppState};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hearth_core::{Error, ErrorCode};
use hearth_store::{NewUiSession, UiSession, now_millis};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The session cookie. The `__Host-` prefix makes the browser refuse it
/// unless it is `Secure`, has `Path=/` and no `Domain`: no other host, not
/// even a sibling subdomain, can set or shadow it.
pub const COOKIE: &str = "__Host-hearth_session";

/// The header a cookie-authenticated state-changing request repeats the
/// session's CSRF token in.
pub const CSRF_HEADER: &str = "x-hearth-csrf";

/// How long a session lasts at most (it also ends with its token).
pub const SESSION_LIFETIME_MS: i64 = 12 * 3600 * 1000;

/// The Content-Security-Policy of every `/ui` answer: only this origin's
/// script, style, images and connections; no inline script, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");
const FAVICON: &str = include_str!("../ui/favicon.svg");

/// The dashboard's routes: the page, its assets and the session.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route(
            "/ui/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/ui/app.css",
            get(|| asset("text/css; charset=utf-8", APP_CSS)),
        )
        .route("/ui/favicon.svg", get(|| asset("image/svg+xml", FAVICON)))
        .route("/ui/session", get(current).post(sign_in).delete(sign_out))
        .layer(middleware::from_fn(security_headers))
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML).await
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Adds the dashboard's security headers to every `/ui` answer.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The sign-in form's body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    /// A hearth token (`hth_…`), as the CLI uses.
    pub token: String,
}

/// The signed-in session, as the page sees it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionInfo {
    /// What the page sends in `X-Hearth-CSRF` with every request that
    /// changes something.
    pub csrf_token: String,
    pub identity: String,
    pub role: hearth_core::rbac::Role,
    /// When the session ends (RFC 3339).
    pub expires_at: String,
}

fn info(session: &UiSession) -> SessionInfo {
    SessionInfo {
        csrf_token: session.csrf_token.clone(),
        identity: session.token.identity.name.clone(),
        role: session.token.identity.role,
        expires_at: crate::tenants::rfc3339(session.expires_at),
    }
}

/// Signs in with a token: opens a session and sets its cookie.
#[utoipa::path(post, path = "/ui/session", tag = "dashboard", operation_id = "sign_in", request_body = SignIn,
    responses((status = 201, description = "Signed in; the session cookie is set", body = SessionInfo),
              (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error)))]
pub async fn sign_in(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // A page of another origin must not sign a browser in either (login
    // CSRF: the victim would act as the attacker's identity).
    check_origin(&headers, &uri)?;
    let request: SignIn =
        serde_json::from_slice(&body).map_err(|e| Error::invalid(format!("sign-in body: {e}")))?;
    let token = authenticate_token(&state, &request.token).await?;
    let id = random_hex();
    let csrf_token = random_hex();
    let cap = now_millis().saturating_add(SESSION_LIFETIME_MS);
    let expires_at = token.expires_at.map_or(cap, |at| at.min(cap));
    state
        .store
        .create_ui_session(&NewUiSession {
            id_sha256: Sha256::digest(id.as_bytes()).to_vec(),
            token: token.id,
            csrf_token: csrf_token.clone(),
            expires_at,
        })
        .await?;
    tracing::info!(identity = %token.identity.name, tenant = %token.identity.tenant_id, "dashboard sign-in");
    let max_age = (expires_at - now_millis()).max(0) / 1000;
    let cookie =
        format!("{COOKIE}={id}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict");
    let session = UiSession {
        token,
        csrf_token,
        expires_at,
    };
    Ok((
        StatusCode::CREATED,
        [
            (header::SET_COOKIE, cookie),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        axum::Json(info(&session)),
    )
        .into_response())
}

/// The current session (its CSRF token for the page).
#[utoipa::path(get, path = "/ui/session", tag = "dashboard", operation_id = "get_ui_session",
    responses((status = 200, body = SessionInfo), (status = 401, body = hearth_core::Error)))]
pub async fn current(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_cookie(&headers).ok_or_else(|| Error::unauthenticated("not signed in"))?;
    let session = authenticate_session(&state, &id).await?;
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(info(&session)),
    )
        .into_response())
}

/// Signs out: deletes the session and clears its cookie.
#[utoipa::path(delete, path = "/ui/session", tag = "dashboard", operation_id = "sign_out",
    responses((status = 204, description = "Signed out"), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error)))]
pub async fn sign_out(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_cookie(&headers).ok_or_else(|| Error::unauthenticated("not signed in"))?;
    let session = authenticate_session(&state, &id).await?;
    check_csrf(&Method::DELETE, &headers, &uri, &session)?;
    state
        .store
        .delete_ui_session(&Sha256::digest(id.as_bytes()))
        .await?;
    let clear = format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict");
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, clear)]).into_response())
}

/// 32 random bytes, hex.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The session id in the request's cookie, if it has one.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
}

/// The live session a cookie names (`UNAUTHENTICATED` otherwise).
pub(crate) async fn authenticate_session(
    state: &AppState,
    id: &str,
) -> Result<UiSession, ApiError> {
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::unauthenticated("malformed session cookie: sign in again").into());
    }
    state
        .store
        .find_ui_session(&Sha256::digest(id.as_bytes()))
        .await?
        .ok_or_else(|| {
            Error::unauthenticated(
                "the dashboard session has ended (signed out, expired, or its token is gone): sign in again",
            )
            .into()
        })
}

fn denied(message: impl Into<String>) -> ApiError {
    ApiError(Error::new(ErrorCode::PermissionDenied, message))
}

/// Refuses a request whose `Origin` is another than this server's (the
/// authority it was sent to: `Host` in HTTP/1.1, `:authority` in HTTP/2),
/// or that the browser marks as cross-site. A request without either
/// header (not from a browser page) passes.
fn check_origin(headers: &HeaderMap, uri: &Uri) -> Result<(), ApiError> {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|site| site.eq_ignore_ascii_case("cross-site"))
    {
        return Err(denied(
            "cross-site request refused by the dashboard session",
        ));
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let authority = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    if host.is_empty() || authority != Some(host) {
        return Err(denied(format!(
            "cross-origin request refused: Origin {origin:?} is not this server's"
        )));
    }
    Ok(())
}

/// The CSRF rule of a cookie-authenticated request: anything but `GET` and
/// `HEAD` must carry the session's token in `X-Hearth-CSRF` and come from
/// this server's own origin.
pub(crate) fn check_csrf(
    method: &Method,
    headers: &HeaderMap,
    uri: &Uri,
    session: &UiSession,
) -> Result<(), ApiError> {
    if method == Method::GET || method == Method::HEAD {
        return Ok(());
    }
    let Some(presented) = headers.get(CSRF_HEADER) else {
        return Err(denied(
            "a request signed in by the dashboard's session cookie must carry its X-Hearth-CSRF header",
        ));
    };
    if !bool::from(presented.as_bytes().ct_eq(session.csrf_token.as_bytes())) {
        return Err(denied(
            "the X-Hearth-CSRF header does not match the dashboard session",
        ));
    }
    check_origin(headers, uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn finds_the_session_cookie_among_others() {
        let h = headers(&[("cookie", "a=1; __Host-hearth_session=abc ; b=2")]);
        assert_eq!(session_cookie(&h).as_deref(), Some("abc"));
        let h = headers(&[("cookie", "hearth_session=abc")]);
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn origin_must_be_the_servers_own() {
        let ok = headers(&[
            ("host", "127.0.0.1:7070"),
            ("origin", "https://127.0.0.1:7070"),
        ]);
        assert!(check_origin(&ok, &Uri::from_static("/v1/x")).is_ok());
        assert!(
            check_origin(
                &headers(&[("host", "127.0.0.1:7070")]),
                &Uri::from_static("/")
            )
            .is_ok()
        );
        for bad in [
            "https://evil.example",
            "https://127.0.0.1:7071",
            "null",
            "https://127.0.0.1:7070.evil.example",
        ] {
            let h = headers(&[("host", "127.0.0.1:7070"), ("origin", bad)]);
            let e = check_origin(&h, &Uri::from_static("/")).unwrap_err();
            assert_eq!(e.0.code, ErrorCode::PermissionDenied, "{bad}");
            assert!(e.0.message.contains("cross-origin"), "{}", e.0.message);
        }
        let h = headers(&[("sec-fetch-site", "cross-site")]);
        assert!(check_origin(&h, &Uri::from_static("/")).is_err());
        // HTTP/2 names the authority in the URI, not in a Host header.
        let h2 = headers(&[("origin", "https://127.0.0.1:7070")]);
        let uri = Uri::from_static("https://127.0.0.1:7070/v1/x");
        assert!(check_origin(&h2, &uri).is_ok());
        let other = Uri::from_static("https://127.0.0.1:7071/v1/x");
        assert!(check_origin(&h2, &other).is_err());
    }
}
