//! The pool config: the tenant-wide singleton (`default`) with the hard cap.

use super::{Kind, Spec};
use crate::Error;
use serde::{Deserialize, Serialize};

/// The only name a pool config can have.
pub const DEFAULT_NAME: &str = "default";

/// Longest description accepted, in bytes.
pub const DESCRIPTION_LIMIT: usize = 1024;

/// Tenant-level limits on agent VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Hard cap on warm + booting + running VMs of the tenant (> 0).
    pub max_vms: i32,
    /// Non-terminal top-level agents one developer may have; 0 = unlimited.
    #[serde(default)]
    pub max_agents_per_developer: i32,
    /// Shown in the dashboard; at most 1024 bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// `dry_run` (default), `enabled` or `disabled`; any other value is kept
    /// as written and acts as `disabled`.
    #[serde(default = "default_reap")]
    pub reap_stranded_workflows: String,
}

fn default_reap() -> String {
    "dry_run".to_owned()
}

/// What the reaper does with stranded workflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    DryRun,
    Enabled,
    Disabled,
}

impl PoolConfig {
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
