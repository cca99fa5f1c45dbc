//! The pool config: the tenant-wide singleton (`default`) with the hard cap.

use super::{Kind, Spec, null_is_default};
use crate::Error;
use serde::{Deserialize, Serialize};

/// The only name a pool config can have.
pub const DEFAULT_NAME: &str = "default";

/// `max_vms` of the pool config every new tenant starts with, unless the
/// server's `--default-max-vms` says otherwise.
pub const DEFAULT_MAX_VMS: i32 = 10;

/// The reaper field's name on the older pools page.
const REAP_OLDER_NAME: &str = "reap_stranded_agents";
const REAP_NAME: &str = "reap_stranded_workflows";

/// Longest description accepted, in bytes.
pub const DESCRIPTION_LIMIT: usize = 1024;

/// Tenant-level limits on agent VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, try_from = "PoolConfigInput")]
pub struct PoolConfig {
    /// Hard cap on warm + booting + running VMs of the tenant (> 0).
    pub max_vms: i32,
    /// Non-terminal top-level agents one developer may have; 0 = unlimited.
    #[serde(default)]
    #[schema(nullable)]
    pub max_agents_per_developer: i32,
    /// Shown in the dashboard; at most 1024 bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(nullable)]
    pub description: String,
    /// `dry_run` (default), `enabled` or `disabled`; any other value is kept
    /// as written and acts as `disabled`. Also read under its older name
    /// `reap_stranded_agents` (never both).
    #[serde(default = "default_reap")]
    #[schema(nullable)]
    pub reap_stranded_workflows: String,
}

fn default_reap() -> String {
    "dry_run".to_owned()
}

/// A pool config as written: the reaper field under either of its names,
/// merged into one by `TryFrom` (serde's `alias` would name only one of
/// them when both are given).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolConfigInput {
    max_vms: i32,
    #[serde(default, deserialize_with = "null_is_default")]
    max_agents_per_developer: i32,
    #[serde(default, deserialize_with = "null_is_default")]
    description: String,
    #[serde(default)]
    reap_stranded_workflows: Option<String>,
    #[serde(default)]
    reap_stranded_agents: Option<String>,
}

impl TryFrom<PoolConfigInput> for PoolConfig {
    type Error = String;
    fn try_from(input: PoolConfigInput) -> Result<Self, String> {
        let reap = match (input.reap_stranded_workflows, input.reap_stranded_agents) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{REAP_NAME} and {REAP_OLDER_NAME} are the same field ({REAP_OLDER_NAME} is its older name); give only one"
                ));
            }
            (Some(mode), None) | (None, Some(mode)) => mode,
            (None, None) => default_reap(),
        };
        Ok(PoolConfig {
            max_vms: input.max_vms,
            max_agents_per_developer: input.max_agents_per_developer,
            description: input.description,
            reap_stranded_workflows: reap,
        })
    }
}

/// What the reaper does with stranded workflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    DryRun,
    Enabled,
    Disabled,
}

impl PoolConfig {
    /// The pool config a new tenant starts with: `max_vms` and every other
    /// field at its default.
    pub fn initial(max_vms: i32) -> PoolConfig {
        PoolConfig {
            max_vms,
            max_agents_per_developer: 0,
            description: String::new(),
            reap_stranded_workflows: default_reap(),
        }
    }

    /// The reaper mode this config asks for (unrecognized values disable it).
    pub fn reap_mode(&self) -> ReapMode {
        match self.reap_stranded_workflows.as_str() {
            "dry_run" => ReapMode::DryRun,
            "enabled" => ReapMode::Enabled,
            _ => ReapMode::Disabled,
        }
    }
}

impl Spec for PoolConfig {
    const KIND: Kind = Kind::PoolConfig;
    const RENAMED: &'static [(&'static str, &'static str)] = &[(REAP_OLDER_NAME, REAP_NAME)];

    fn validate(&self) -> Result<(), Error> {
        if self.max_vms <= 0 {
            return Err(Error::invalid("max_vms must be positive"));
        }
        if self.max_agents_per_developer < 0 {
            return Err(Error::invalid(
                "max_agents_per_developer must not be negative (0 = unlimited)",
            ));
        }
        if self.description.len() > DESCRIPTION_LIMIT {
            return Err(Error::invalid(format!(
                "description exceeds 1024 byte limit ({} bytes)",
                self.description.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Format, parse_spec};

    fn yaml(s: &str) -> Result<PoolConfig, Error> {
        parse_spec(s, Format::Yaml)
    }

    #[test]
    fn defaults() {
        let c = yaml("max_vms: 50").unwrap();
        assert_eq!(c.max_agents_per_developer, 0);
        assert_eq!(c.reap_stranded_workflows, "dry_run");
        assert_eq!(c.reap_mode(), ReapMode::DryRun);
    }

    #[test]
    fn messages() {
        assert_eq!(
            yaml("max_vms: 0").unwrap_err().message,
            "max_vms must be positive"
        );
        assert_eq!(
            yaml("max_vms: 1\nmax_agents_per_developer: -1")
                .unwrap_err()
                .message,
            "max_agents_per_developer must not be negative (0 = unlimited)"
        );
        let long = format!("max_vms: 1\ndescription: \"{}\"", "é".repeat(600));
        assert_eq!(
            yaml(&long).unwrap_err().message,
            "description exceeds 1024 byte limit (1200 bytes)"
        );
    }

    #[test]
    fn unknown_values_disable_the_reaper() {
        let c = yaml("max_vms: 1\nreap_stranded_workflows: sometimes").unwrap();
        assert_eq!(c.reap_stranded_workflows, "sometimes");
        assert_eq!(c.reap_mode(), ReapMode::Disabled);
    }

    #[test]
    fn null_tilde_and_empty_mean_absent() {
        for null in ["null", "~", ""] {
            let c = yaml(&format!(
                "max_vms: 3\nmax_agents_per_developer: {null}\ndescription: {null}\nreap_stranded_workflows: {null}\n"
            ))
            .unwrap();
            assert_eq!(c, PoolConfig::initial(3), "{null:?}");
            assert_eq!(c.reap_mode(), ReapMode::DryRun);
        }
        let json = r#"{"max_vms": 3, "max_agents_per_developer": null, "description": null, "reap_stranded_workflows": null}"#;
        assert_eq!(
            parse_spec::<PoolConfig>(json, Format::Json).unwrap(),
            PoolConfig::initial(3)
        );
        // Quoted, it is the text itself.
        let c = yaml("max_vms: 3\nreap_stranded_workflows: 'null'\n").unwrap();
        assert_eq!(c.reap_stranded_workflows, "null");
        // A required field is still required.
        let e = yaml("max_vms: ~\n").unwrap_err();
        assert!(e.message.contains("max_vms"), "{}", e.message);
    }

    #[test]
    fn the_older_reaper_name_is_an_alias() {
        let c = yaml("max_vms: 3\nreap_stranded_agents: enabled\n").unwrap();
        assert_eq!(c.reap_stranded_workflows, "enabled");
        let out = serde_json::to_value(&c).unwrap();
        assert_eq!(out["reap_stranded_workflows"], "enabled");
        assert!(out.get("reap_stranded_agents").is_none(), "{out}");
        let c = parse_spec::<PoolConfig>(
            r#"{"max_vms": 3, "reap_stranded_agents": "disabled"}"#,
            Format::Json,
        )
        .unwrap();
        assert_eq!(c.reap_mode(), ReapMode::Disabled);
        let both = "invalid pool-config: reap_stranded_workflows and reap_stranded_agents are the same field (reap_stranded_agents is its older name); give only one";
        let e =
            yaml("max_vms: 3\nreap_stranded_workflows: enabled\nreap_stranded_agents: enabled\n")
                .unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::InvalidArgument);
        assert!(e.message.starts_with(both), "{}", e.message);
        // A null under one name is no value: only the other is given.
        let c = yaml("max_vms: 3\nreap_stranded_workflows: ~\nreap_stranded_agents: enabled\n")
            .unwrap();
        assert_eq!(c.reap_stranded_workflows, "enabled");
    }

    #[test]
    fn a_patch_may_use_the_older_name() {
        use crate::resource::apply_merge_patch;
        let stored = yaml("max_vms: 3\nreap_stranded_workflows: enabled\n").unwrap();
        let patched = apply_merge_patch(
            &stored,
            &serde_json::json!({"reap_stranded_agents": "disabled"}),
        )
        .unwrap();
        assert_eq!(patched.reap_stranded_workflows, "disabled");
        let e = apply_merge_patch(
            &stored,
            &serde_json::json!({"reap_stranded_agents": "disabled", "reap_stranded_workflows": "enabled"}),
        )
        .unwrap_err();
        assert!(e.message.contains("give only one"), "{}", e.message);
        let patched = apply_merge_patch(
            &stored,
            &serde_json::json!({"reap_stranded_workflows": null}),
        )
        .unwrap();
        assert_eq!(patched.reap_mode(), ReapMode::DryRun);
    }

    #[test]
    fn errors_name_field_and_line() {
        let e = yaml("max_vms: 1\nmax_vm: 2\n").unwrap_err();
        assert!(
            e.message.contains("unknown field `max_vm`"),
            "{}",
            e.message
        );
        assert!(e.message.contains("line 2"), "{}", e.message);
        let e = yaml("max_vms: lots\n").unwrap_err();
        assert!(
            e.message
                .starts_with("invalid pool-config: max_vms: invalid type"),
            "{}",
            e.message
        );
        let e = yaml("max_vms: [1\n").unwrap_err();
        assert!(e.message.contains("line"), "{}", e.message);
        let e = parse_spec::<PoolConfig>("{\"max_vms\": \"x\"}", Format::Json).unwrap_err();
        assert!(e.message.contains("max_vms: invalid type"), "{}", e.message);
        let e = yaml("max_vms: 3000000000").unwrap_err();
        assert!(e.message.contains("max_vms"), "{}", e.message);
    }
}
