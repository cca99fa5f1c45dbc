//! `hearth patch --set key=value` → a JSON merge patch (RFC 7386).
//!
//! This module owns the `--set` syntax: a dotted key makes nested objects
//! (`warm_pool.enabled=false` → `{"warm_pool": {"enabled": false}}`), and the
//! value is read as YAML, so `100` is a number, `true` a boolean, `null`
//! removes the field, `'100'` is a string, and `[{url: x}]` a sequence.

use crate::error::CliError;
use serde_json::{Map, Value};

/// One `--set` argument split into its key path and its value.
pub fn parse_set(arg: &str) -> Result<(Vec<String>, Value), CliError> {
    let Some((key, raw)) = arg.split_once('=') else {
        return Err(CliError::invalid(format!(
            "--set expects key=value, got {arg:?}"
        )));
    };
    let path: Vec<String> = key.trim().split('.').map(str::to_owned).collect();
    if path.iter().any(|segment| segment.is_empty()) {
        return Err(CliError::invalid(format!(
            "--set {arg:?}: the key must be field names joined by '.', e.g. warm_pool.enabled=false"
        )));
    }
    Ok((path, parse_value(arg, raw)?))
}

/// Reads a `--set` value as YAML. An empty value is the empty string (not
/// null: removing a field takes an explicit `null`).
fn parse_value(arg: &str, raw: &str) -> Result<Value, CliError> {
    if raw.trim().is_empty() {
        return Ok(Value::String(raw.to_owned()));
    }
    serde_yaml_ng::from_str::<Value>(raw).map_err(|e| {
        CliError::invalid(format!(
            "--set {arg:?}: the value is not valid YAML ({e}); quote it to pass a string, e.g. key='{raw}'"
        ))
    })
}

/// Builds the merge patch of all `--set` arguments, applied in order (a later
/// one wins over an earlier one touching the same key).
pub fn merge_patch<S: AsRef<str>>(args: &[S]) -> Result<Value, CliError> {
    if args.is_empty() {
        return Err(CliError::invalid(
            "nothing to patch: give at least one --set key=value",
        ));
    }
    let mut patch = Map::new();
    for arg in args {
        let (path, value) = parse_set(arg.as_ref())?;
        insert(&mut patch, &path, value);
    }
    Ok(Value::Object(patch))
}

/// Puts `value` at `path` inside `map`, making (or replacing non-objects
/// with) the intermediate objects.
fn insert(map: &mut Map<String, Value>, path: &[String], value: Value) {
    let (last, parents) = path.split_last().expect("a path has at least one key");
    let mut current = map;
    for key in parents {
        let slot = current
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        current = slot.as_object_mut().expect("just made an object");
    }
    current.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_typed_as_yaml() {
        let v = |arg: &str| parse_set(arg).unwrap().1;
        assert_eq!(v("max_vms=100"), json!(100));
        assert_eq!(v("cpus=-2"), json!(-2));
        assert_eq!(v("ratio=1.5"), json!(1.5));
        assert_eq!(v("enabled=true"), json!(true));
        assert_eq!(v("enabled=false"), json!(false));
        assert_eq!(v("branch=null"), Value::Null);
        assert_eq!(v("branch=~"), Value::Null);
        assert_eq!(v("max_vms='100'"), json!("100"));
        assert_eq!(v("max_vms=\"100\""), json!("100"));
        assert_eq!(v("memory=2Gi"), json!("2Gi"));
        assert_eq!(v("description=hello world"), json!("hello world"));
        assert_eq!(v("description="), json!(""));
        assert_eq!(
            v("url=https://x.org/a.git?b=c"),
            json!("https://x.org/a.git?b=c")
        );
        assert_eq!(v("repos=[{url: x}]"), json!([{"url": "x"}]));
        assert_eq!(v("env={A: '1', B: two}"), json!({"A": "1", "B": "two"}));
    }

    #[test]
    fn keys_nest_on_dots() {
        let (path, value) = parse_set("warm_pool.enabled=false").unwrap();
        assert_eq!(path, ["warm_pool", "enabled"]);
        assert_eq!(value, json!(false));
        assert_eq!(
            merge_patch(&["warm_pool.enabled=false"]).unwrap(),
            json!({"warm_pool": {"enabled": false}})
        );
        assert_eq!(
            merge_patch(&["env.API_KEY=x", "env.OTHER=null", "min_idle=2"]).unwrap(),
            json!({"env": {"API_KEY": "x", "OTHER": null}, "min_idle": 2})
        );
        assert_eq!(
            merge_patch(&["a.b.c=1", "a.b.d=2", "a.e=3"]).unwrap(),
            json!({"a": {"b": {"c": 1, "d": 2}, "e": 3}})
        );
    }

    #[test]
    fn later_sets_win() {
        assert_eq!(merge_patch(&["a=1", "a=2"]).unwrap(), json!({"a": 2}));
        assert_eq!(
            merge_patch(&["a=1", "a.b=2"]).unwrap(),
            json!({"a": {"b": 2}})
        );
        assert_eq!(
            merge_patch(&["a.b=2", "a=null"]).unwrap(),
            json!({"a": null})
        );
    }

    #[test]
    fn null_removes_the_field() {
        assert_eq!(
            merge_patch(&["description=null"]).unwrap(),
            json!({"description": null})
        );
    }

    #[test]
    fn malformed_sets_are_rejected() {
        let err = parse_set("max_vms").unwrap_err();
        assert_eq!(
            err.to_string(),
            "INVALID_ARGUMENT: --set expects key=value, got \"max_vms\""
        );
        for bad in ["=1", "a..b=1", ".a=1", "a.=1"] {
            let err = parse_set(bad).unwrap_err();
            assert_eq!(err.code, "INVALID_ARGUMENT");
            assert!(
                err.message.contains("the key must be"),
                "{bad}: {}",
                err.message
            );
        }
        let err = parse_set("repos=[{url: x}").unwrap_err();
        assert!(err.message.contains("not valid YAML"), "{}", err.message);
        let err = merge_patch::<&str>(&[]).unwrap_err();
        assert_eq!(err.code, "INVALID_ARGUMENT");
        // The first bad argument stops the whole patch.
        assert!(merge_patch(&["a=1", "oops"]).is_err());
    }

    #[test]
    fn only_the_first_equals_splits() {
        let (path, value) = parse_set("command=a=b").unwrap();
        assert_eq!(path, ["command"]);
        assert_eq!(value, json!("a=b"));
    }
}
