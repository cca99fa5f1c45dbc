//! NUL characters: PostgreSQL cannot store one in a text or JSON value, and
//! no name, command or field of hearth's has a use for one, so input holding
//! one is refused naming the field, before anything is stored.

use crate::Error;
use serde_json::Value;

/// The path (`repos[0].url`, `env.KEY`) of the first string, or object key,
/// in `value` that holds a NUL character; `.` for the document itself.
pub fn find(value: &Value) -> Option<String> {
    fn walk(value: &Value, path: &mut String) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Object(map) => map.iter().any(|(key, item)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                if key.contains('\0') {
                    path.push_str(&key.replace('\0', "\\u0000"));
                    return true;
                }
                path.push_str(key);
                let found = walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut path = String::new();
    walk(value, &mut path).then(|| if path.is_empty() { ".".into() } else { path })
}

/// `INVALID_ARGUMENT` naming the field of `value` that holds a NUL, if any;
/// `what` prefixes the message (`invalid workspace`, `invalid request`).
pub fn refuse(value: &Value, what: &str) -> Result<(), Error> {
    match find(value) {
        None => Ok(()),
        Some(field) => Err(Error::invalid(format!(
            "{what}: {field} contains a NUL character (\\u0000), which is not allowed"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_field_holding_a_nul() {
        assert_eq!(find(&json!({"a": [1, "x"], "b": "ok"})), None);
        assert_eq!(
            find(&json!({"a": "ok", "repos": [{"url": "x"}, {"url": "a\u{0}b"}]})).as_deref(),
            Some("repos[1].url")
        );
        assert_eq!(
            find(&json!({"env": {"K\u{0}": "v"}})).as_deref(),
            Some("env.K\\u0000")
        );
        assert_eq!(find(&json!("\u{0}")).as_deref(), Some("."));
        assert_eq!(
            refuse(&json!({"name": "a\u{0}"}), "invalid request")
                .unwrap_err()
                .message,
            "invalid request: name contains a NUL character (\\u0000), which is not allowed"
        );
    }
}
