//! Bearer tokens and the caller they identify (a dashboard session cookie
//! stands for the token it was opened with: [`crate::ui`]).
//!
//! A token reads `hth_<id>_<secret>`: the id (a UUID, hex) finds the stored
//! row, the secret (32 random bytes, hex) is only ever stored as its SHA-256
//! and compared in constant time.
//!
//! **Invariant:** no handler runs with a caller whose token is unknown,
//! expired or of another tenant than the rows it touches — every store call
//! takes the caller's tenant id.

use crate::{ApiError, AppState};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use hearth_core::Error;
use hearth_core::ids::{TenantId, TokenId};
use hearth_core::rbac::{IdentityKind, Permission, Role};
use hearth_store::{Identity, NewToken, now_millis};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "hth_";

/// A freshly issued token: the text to hand out once, and what to store.
#[derive(Debug)]
pub struct IssuedToken {
    pub text: String,
    pub stored: NewToken,
}

/// Makes a new token expiring at `expires_at` (Unix milliseconds), if given.
pub fn issue_token(expires_at: Option<i64>) -> IssuedToken {
    let id = TokenId::new();
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let secret_hex = hex::encode(secret);
    IssuedToken {
        text: format!("{PREFIX}{}_{secret_hex}", id.0.simple()),
        stored: NewToken {
            id,
            secret_sha256: Sha256::digest(secret_hex.as_bytes()).to_vec(),
            expires_at,
        },
    }
}

/// Splits a token into its id and secret, or `None` when malformed.
fn parse_token(text: &str) -> Option<(TokenId, &str)> {
    let rest = text.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id = uuid::Uuid::try_parse(id).ok()?;
    (secret.len() == 64).then_some((TokenId(id), secret))
}

/// The authenticated identity behind a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
}

impl Caller {
    pub fn tenant(&self) -> TenantId {
        self.identity.tenant_id
    }

    /// Fails with `PERMISSION_DENIED` naming the permission the role lacks.
    pub fn require(&self, permission: Permission) -> Result<(), ApiError> {
        if self.identity.role.allows(permission) {
            Ok(())
        } else {
            Err(ApiError(Error::new(
                hearth_core::ErrorCode::PermissionDenied,
                format!("your role does not have {permission} permission"),
            )))
        }
    }
}

/// The token of a request's `Authorization: Bearer <token>` header
/// (the scheme case-insensitive, RFC 9110 §11.1; the token trimmed), if it
/// has one.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // A bearer token wins over a cookie: a browser never sends one on
        // its own, so a request that carries it is not a forged one.
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            if let Some(session) = crate::ui::session_cookie(&parts.headers) {
                let session = crate::ui::authenticate_session(state, &session).await?;
                crate::ui::check_csrf(&parts.method, &parts.headers, &parts.uri, &session)?;
                return Ok(Caller {
                    identity: session.token.identity,
                });
            }
            return Err(Error::unauthenticated(
                "missing bearer token: pass --token, set HEARTH_TOKEN or run hearth auth login",
            )
            .into());
        };
        let header = header
            .to_str()
            .map_err(|_| Error::unauthenticated("malformed Authorization header"))?;
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` works.
        let text = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| {
                Error::unauthenticated("the Authorization header must be `Bearer <token>`")
            })?;
        let record = authenticate_token(state, text).await?;
        Ok(Caller {
            identity: record.identity,
        })
    }
}

/// The stored token `text` names, when its secret matches and it has not
/// expired (`UNAUTHENTICATED` otherwise): the one check of a presented
/// token, for the bearer header and the dashboard's sign-in alike.
pub(crate) async fn authenticate_token(
    state: &AppState,
    text: &str,
) -> Result<hearth_store::TokenRecord, ApiError> {
    let (id, secret) =
        parse_token(text.trim()).ok_or_else(|| Error::unauthenticated("malformed token"))?;
    let presented = Sha256::digest(secret.as_bytes());
    let record = state.store.find_token(id).await?;
    let Some(record) = record else {
        return Err(Error::unauthenticated("unknown token").into());
    };
    if !bool::from(presented.as_slice().ct_eq(&record.secret_sha256)) {
        return Err(Error::unauthenticated("unknown token").into());
    }
    if record.expires_at.is_some_and(|at| at <= now_millis()) {
        return Err(Error::unauthenticated("token expired: ask an admin for a new one").into());
    }
    Ok(record)
}

/// Who the caller is.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WhoAmI {
    pub tenant: String,
    pub identity: String,
    pub kind: IdentityKind,
    pub role: Role,
    /// Every permission the role holds.
    pub permissions: Vec<String>,
}

/// The caller's tenant, identity, role and permissions.
#[utoipa::path(get, path = "/v1/whoami", tag = "auth",
    responses((status = 200, body = WhoAmI), (status = 401, body = hearth_core::Error)),
    security(("bearer" = [])))]
pub async fn whoami(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<WhoAmI>, ApiError> {
    let tenants = state.store.list_tenants().await?;
    let tenant = tenants
        .into_iter()
        .find(|t| t.id == caller.tenant())
        .map(|t| t.name)
        .ok_or_else(|| Error::internal("the caller's tenant is missing"))?;
    let role = caller.identity.role;
    Ok(axum::Json(WhoAmI {
        tenant,
        identity: caller.identity.name,
        kind: caller.identity.kind,
        role,
        permissions: role
            .permissions()
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
    }))
}

/// Parses an `expires_in` duration into an absolute expiry (Unix ms).
/// Bounded by [`MAX_EXPIRES_IN_SECS`](hearth_core::rbac::MAX_EXPIRES_IN_SECS)
/// and computed with checked arithmetic, so no value panics or wraps; it
/// runs before anything is stored.
pub fn expiry_from(expires_in: Option<&str>) -> Result<Option<i64>, ApiError> {
    let Some(text) = expires_in else {
        return Ok(None);
    };
    let secs = hearth_core::rbac::parse_expires_in("expires_in", text)?;
    let at = i64::try_from(secs)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .and_then(|ms| now_millis().checked_add(ms))
        .ok_or_else(|| Error::invalid(format!("expires_in {text:?} is too long")))?;
    Ok(Some(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_only_the_hash_is_stored() {
        let t = issue_token(None);
        let (id, secret) = parse_token(&t.text).unwrap();
        assert_eq!(id, t.stored.id);
        assert_eq!(
            Sha256::digest(secret.as_bytes()).as_slice(),
            t.stored.secret_sha256.as_slice()
        );
        assert!(!t.text.contains(&hex::encode(&t.stored.secret_sha256)));
    }

    #[test]
    fn malformed_tokens() {
        for bad in [
            "",
            "hth_",
            "hth_x_y",
            "abc",
            &format!("hth_{}_{}", uuid::Uuid::nil().simple(), "ab"),
        ] {
            assert!(parse_token(bad).is_none(), "{bad}");
        }
    }
}
