//! Request bodies: read whole, then parsed by hearth's own rules so that
//! every malformed body is an `INVALID_ARGUMENT` naming the field.

use crate::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use hearth_core::Error;
use hearth_core::resource::Format;
use serde::de::DeserializeOwned;

/// The body as UTF-8 text with its format from `Content-Type`.
pub fn text(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(String, Format), ApiError> {
    let bytes = body
        .map_err(|e| Error::invalid(format!("cannot read the request body: {}", e.body_text())))?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::invalid("the request body is not UTF-8"))?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    Ok((text, Format::from_content_type(content_type)))
}

/// A JSON object body of type `T`; an empty body is `T`'s empty object.
pub fn json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body
        .map_err(|e| Error::invalid(format!("cannot read the request body: {}", e.body_text())))?;
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
    // serde would read a struct from an array too; a body is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::invalid("invalid request: the body must be a JSON object").into());
    }
    // serde_json stops at 128 levels itself; the bound is hearth's 64.
    let text = std::str::from_utf8(bytes).unwrap_or_default();
    hearth_core::nesting::check(text)
        .map_err(|e| Error::invalid(format!("invalid request: {}", e.message)))?;
    // A NUL can only come as the escape `\u0000`: look closer only then.
    if bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000"))
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes)
    {
        hearth_core::nul::refuse(&value, "invalid request")?;
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Error::invalid(format!("invalid request: {inner}"))
        } else {
            Error::invalid(format!("invalid request: {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| Error::invalid(format!("invalid request: {e}")))?;
    Ok(value)
}
