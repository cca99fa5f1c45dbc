//! The resources users write, as YAML or JSON: pool config, workspace,
//! environment, image. Parsing, validation and patching live here; storing
//! them does not.

mod environment;
mod image;
mod pool_config;
pub mod secrets;
mod workspace;

pub use environment::{DriverKind, Environment, MAX_ALLOWED_HOST_PORTS, Network, REDACTED};
pub use image::{
    Artifact, ArtifactSource, DEFAULT_KERNEL_PACKAGE, Image, Rootfs, valid_package_name,
};
pub use pool_config::{DEFAULT_MAX_VMS, DEFAULT_NAME as POOL_CONFIG_NAME, PoolConfig, ReapMode};
pub use workspace::{Repo, SetupCommand, WarmPool, Workspace, mask_repo_url, repo_url_secret};

use crate::Error;
use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};
use std::fmt;
use std::str::FromStr;

/// The kinds of resource, as `hearth get KIND` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    PoolConfig,
    Workspace,
    Environment,
    Image,
}

impl Kind {
    pub const ALL: &'static [Kind] = &[
        Kind::PoolConfig,
        Kind::Workspace,
        Kind::Environment,
        Kind::Image,
    ];

    /// The singular name used in messages, the CLI and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PoolConfig => "pool-config",
            Kind::Workspace => "workspace",
            Kind::Environment => "environment",
            Kind::Image => "image",
        }
    }

    /// The collection segment of the API path (`/v1/<segment>/<name>`).
    pub fn path_segment(self) -> &'static str {
        match self {
            Kind::PoolConfig => "pool-config",
            Kind::Workspace => "workspaces",
            Kind::Environment => "environments",
            Kind::Image => "images",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "pool-config" | "pool-configs" | "poolconfig" | "pool_config" => Kind::PoolConfig,
            "workspace" | "workspaces" | "ws" => Kind::Workspace,
            "environment" | "environments" | "env" => Kind::Environment,
            "image" | "images" => Kind::Image,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown kind {s:?}: expected one of pool-config, workspace, environment, image"
                )));
            }
        })
    }
}

/// A reference from one resource to another that must exist while the
/// first does (a workspace names its environment, an environment its image).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceRef {
    pub kind: Kind,
    pub name: String,
}

/// What every resource kind provides to the generic API and store code.
pub trait Spec: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    const KIND: Kind;
    /// Whether the resource carries a version that bumps on every change
    /// (VMs built from an older version are stale).
    const VERSIONED: bool = false;

    /// Checks every rule the types alone do not.
    fn validate(&self) -> Result<(), Error>;

    /// Other resources this one needs to exist.
    fn references(&self) -> Vec<ResourceRef> {
        Vec::new()
    }

    /// The form shown to users: secret values masked.
    fn redacted(&self) -> Self {
        self.clone()
    }

    /// Puts back stored secret values where the input carries the mask
    /// (so `get | set` round-trips without revealing secrets).
    fn restore_masked(&mut self, _previous: Option<&Self>) -> Result<(), Error> {
        Ok(())
    }

    /// The settings of this spec that only an operator may write, which it
    /// sets anew over `previous` (keeping what an operator set is fine).
    fn operator_only_changes(&self, _previous: Option<&Self>) -> Vec<&'static str> {
        Vec::new()
    }

    /// Fields known under an older name too, as `(older, current)`: the
    /// input may use either (never both), the output uses the current one.
    const RENAMED: &'static [(&'static str, &'static str)] = &[];
}

/// Reads an optional field where `null` means absent: a YAML `null`, `~` or
/// empty value, or a JSON `null`, gives the field's default (never the
/// text `"null"`). For `#[serde(default, deserialize_with = ...)]`.
pub(crate) fn null_is_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Defines `fn $name` like [`null_is_default`] for a field whose default is
/// not `T::default()` (`null` gives `$default`).
macro_rules! null_is {
    ($name:ident: $ty:ty = $default:expr) => {
        fn $name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            Ok(<Option<$ty> as serde::Deserialize>::deserialize(d)?.unwrap_or_else(|| $default))
        }
    };
}
pub(crate) use null_is;

/// The format of a document sent to or received from the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// Picks the format from a `Content-Type` header value (YAML for any
    /// `yaml` media type, JSON otherwise).
    pub fn from_content_type(content_type: Option<&str>) -> Format {
        match content_type {
            Some(ct) if ct.contains("yaml") => Format::Yaml,
            _ => Format::Json,
        }
    }
}

/// Parses a document of kind `T`, naming the field (and for YAML the line)
/// of the first error, then validates it.
pub fn parse_spec<T: Spec>(body: &str, format: Format) -> Result<T, Error> {
    let (spec, input): (T, _) = parse_document(body, format, T::KIND)?;
    let json = serde_json::to_value(&spec).map_err(|e| Error::internal(e.to_string()))?;
    if let Some(input) = input {
        refuse_sequences_for_mappings(&input, &json, &mut String::new(), T::KIND)?;
    }
    crate::nul::refuse(&json, &format!("invalid {}", T::KIND))?;
    spec.validate()?;
    Ok(spec)
}

/// The typed document, and the document as plain JSON where it reads as
/// one (for the checks serde's typed parse cannot make).
fn parse_document<T: DeserializeOwned>(
    body: &str,
    format: Format,
    kind: Kind,
) -> Result<(T, Option<serde_json::Value>), Error> {
    if body.trim().is_empty() || body.trim() == "---" {
        return Err(Error::invalid(format!("empty {kind} document")));
    }
    crate::nesting::check(body)
        .map_err(|e| Error::invalid(format!("invalid {kind}: {}", e.message)))?;
    let input = match format {
        Format::Json => serde_json::from_str::<serde_json::Value>(body).ok(),
        Format::Yaml => serde_yaml_ng::from_str::<serde_json::Value>(body).ok(),
    };
    if input.as_ref().is_some_and(|v| !v.is_object()) {
        return Err(Error::invalid(format!(
            "invalid {kind}: a document must be a mapping of fields"
        )));
    }
    let result = match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(body);
            serde_path_to_error::deserialize(&mut de)
                .map_err(|e| describe(e.path().to_string(), e.into_inner().to_string()))
                .and_then(|v| {
                    de.end().map_err(|e| format!("malformed JSON: {e}"))?;
                    Ok(v)
                })
        }
        Format::Yaml => {
            let de = serde_yaml_ng::Deserializer::from_str(body);
            serde_path_to_error::deserialize(de)
                .map_err(|e| describe(e.path().to_string(), e.into_inner().to_string()))
        }
    };
    result
        .map(|spec| (spec, input))
        .map_err(|message| Error::invalid(format!("invalid {kind}: {message}")))
}

/// Joins the field path and serde's message into one sentence.
fn describe(path: String, message: String) -> String {
    if path == "." || path.is_empty() || message.starts_with(&format!("{path}: ")) {
        message
    } else {
        format!("{path}: {message}")
    }
}

/// Applies a JSON merge patch (RFC 7386) to a stored spec and parses the
/// result as `T`, so the same rules hold for `patch` as for `set`.
pub fn apply_merge_patch<T: Spec>(current: &T, patch: &serde_json::Value) -> Result<T, Error> {
    if !patch.is_object() {
        return Err(Error::invalid("a merge patch must be a JSON object"));
    }
    let mut doc = serde_json::to_value(current).map_err(|e| Error::internal(e.to_string()))?;
    // A patch naming a field by its older name replaces the stored field.
    if let (Some(doc), Some(fields)) = (doc.as_object_mut(), patch.as_object()) {
        for (older, current) in T::RENAMED {
            if fields.get(*older).is_some_and(|v| !v.is_null()) && !fields.contains_key(*current) {
                doc.remove(*current);
            }
        }
    }
    json_patch::merge(&mut doc, patch);
    crate::nul::refuse(&doc, &format!("invalid {}", T::KIND))?;
    let merged = doc.clone();
    let spec: T = serde_path_to_error::deserialize(doc).map_err(|e| {
        Error::invalid(format!(
            "invalid {}: {}",
            T::KIND,
            describe(e.path().to_string(), e.into_inner().to_string())
        ))
    })?;
    let json = serde_json::to_value(&spec).map_err(|e| Error::internal(e.to_string()))?;
    refuse_sequences_for_mappings(&merged, &json, &mut String::new(), T::KIND)?;
    spec.validate()?;
    Ok(spec)
}

/// Refuses a sequence where the spec has a mapping. serde's derived structs
/// also accept their fields as a sequence, in order (`[null, null]` is a
/// whole spec of defaults), which no user means: walking the document next
/// to the spec it became finds every such place, named by its path.
fn refuse_sequences_for_mappings(
    input: &serde_json::Value,
    output: &serde_json::Value,
    path: &mut String,
    kind: Kind,
) -> Result<(), Error> {
    use serde_json::Value;
    match (input, output) {
        (Value::Array(_), Value::Object(_)) => {
            let at = if path.is_empty() {
                String::new()
            } else {
                format!("{path}: ")
            };
            Err(Error::invalid(format!(
                "invalid {kind}: {at}expected a mapping, found a sequence"
            )))
        }
        (Value::Object(fields), Value::Object(spec)) => {
            for (key, value) in fields {
                if let Some(out) = spec.get(key) {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    refuse_sequences_for_mappings(value, out, path, kind)?;
                    path.truncate(len);
                }
            }
            Ok(())
        }
        (Value::Array(items), Value::Array(spec)) => {
            for (i, (value, out)) in items.iter().zip(spec).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                refuse_sequences_for_mappings(value, out, path, kind)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checks a resource name: a DNS label (1–63 of `a-z`, `0-9`, `-`, not
/// starting or ending with `-`). The pool config's singleton rule is
/// checked by the API, which knows whether it is reading or writing.
pub fn validate_name(kind: Kind, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {kind} name {name:?}: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        )))
    }
}

/// Parses a duration such as `250ms`, `90s`, `15m` or `1h30m` into milliseconds.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok();
    }
    parse_duration(text)?.checked_mul(1000)
}

/// Parses a duration such as `90s`, `15m`, `1h30m` or `2d` into seconds.
pub fn parse_duration(text: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut number = String::new();
    if text.is_empty() {
        return None;
    }
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return None,
        };
        let n: u64 = number.parse().ok()?;
        number.clear();
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    if !number.is_empty() {
        return None;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("15m"), Some(900));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("2d"), Some(172800));
        assert_eq!(parse_duration("15"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("1x"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("2s"), Some(2000));
        assert_eq!(parse_duration_ms("ms"), None);
    }

    /// A sequence never stands for a mapping (serde would take it as the
    /// fields in order), at the top or nested, in documents and patches.
    #[test]
    fn sequences_are_not_mappings() {
        for (body, format, at) in [
            (
                r#"{"environment": "e", "warm_pool": [null, null]}"#,
                Format::Json,
                "warm_pool: ",
            ),
            (
                r#"{"environment": "e", "repos": [["https://example.com/r.git"]]}"#,
                Format::Json,
                "repos[0]: ",
            ),
        ] {
            let err = parse_spec::<Workspace>(body, format).unwrap_err();
            assert_eq!(
                err.message,
                format!("invalid workspace: {at}expected a mapping, found a sequence"),
                "{body}"
            );
        }
        for (body, format) in [("[null, null]", Format::Json), ("- 1\n- 2\n", Format::Yaml)] {
            let err = parse_spec::<Environment>(body, format).unwrap_err();
            assert_eq!(
                err.message,
                "invalid environment: a document must be a mapping of fields"
            );
        }
        assert!(parse_spec::<Workspace>("environment: e\nwarm_pool: {}\n", Format::Yaml).is_ok());
        let current = parse_spec::<Workspace>("environment: e\n", Format::Yaml).unwrap();
        let err =
            apply_merge_patch(&current, &serde_json::json!({"warm_pool": [true]})).unwrap_err();
        assert_eq!(
            err.message,
            "invalid workspace: warm_pool: expected a mapping, found a sequence"
        );
    }

    #[test]
    fn names() {
        assert!(validate_name(Kind::Workspace, "web-app2").is_ok());
        for bad in ["", "-a", "a-", "Web", "a_b", &"a".repeat(64)] {
            let err = validate_name(Kind::Workspace, bad).unwrap_err();
            assert!(
                err.message.starts_with("invalid workspace name"),
                "{}",
                err.message
            );
        }
    }

    /// `null`, `~` and an empty value (YAML) and `null` (JSON) are absent
    /// for every optional field of every kind.
    #[test]
    fn null_means_absent_for_every_kind() {
        fn same<T: Spec + PartialEq + std::fmt::Debug>(with_nulls: &str, bare: &str) {
            let expected: T = parse_spec(bare, Format::Yaml).unwrap();
            for null in ["null", "~", ""] {
                let doc = with_nulls.replace("NULL", null);
                let parsed: T = parse_spec(&doc, Format::Yaml)
                    .unwrap_or_else(|e| panic!("{doc:?}: {}", e.message));
                assert_eq!(parsed, expected, "{doc:?}");
            }
            let json: serde_json::Value =
                serde_yaml_ng::from_str(&with_nulls.replace("NULL", "null")).unwrap();
            let parsed: T = parse_spec(&json.to_string(), Format::Json)
                .unwrap_or_else(|e| panic!("{json}: {}", e.message));
            assert_eq!(parsed, expected, "{json}");
        }
        same::<Workspace>(
            "environment: dev\nrepos: NULL\nmin_idle: NULL\nmax_idle: NULL\nwarm_pool: NULL\ndescription: NULL\n",
            "environment: dev\n",
        );
        same::<Workspace>(
            "environment: dev\nrepos:\n- url: a/x.git\n  branch: NULL\n  name: NULL\nwarm_pool:\n  enabled: NULL\n  branch: NULL\n  setup_commands: NULL\n",
            "environment: dev\nrepos:\n- url: a/x.git\n",
        );
        same::<Environment>(
            "driver: NULL\nimage: NULL\ncpus: NULL\nnetwork: NULL\nmemory: NULL\nenv: NULL\nidle_timeout: NULL\nproject_setup: NULL\nrepo_setup: NULL\n",
            "{}",
        );
        same::<Image>(
            "driver: qemu\ndescription: NULL\nrootfs: NULL\nkernel_package: NULL\n",
            "driver: qemu\n",
        );
        same::<PoolConfig>(
            "max_vms: 2\nmax_agents_per_developer: NULL\ndescription: NULL\nreap_stranded_workflows: NULL\n",
            "max_vms: 2\n",
        );
    }

    #[test]
    fn kinds_parse_with_aliases() {
        assert_eq!("ws".parse::<Kind>().unwrap(), Kind::Workspace);
        assert_eq!("pool-config".parse::<Kind>().unwrap(), Kind::PoolConfig);
        assert!(
            "vm".parse::<Kind>()
                .unwrap_err()
                .message
                .contains("unknown kind \"vm\"")
        );
    }
}
