//! The environment: what a VM looks like (driver, image, size, variables,
//! setup). Its variables are secrets: shown masked, never logged.

use super::workspace::{SetupCommand, validate_commands};
use super::{Kind, ResourceRef, Spec, null_is, null_is_default, parse_duration, validate_name};
use crate::Error;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a secret value is replaced with wherever it would be shown.
pub const REDACTED: &str = "***";

/// Which driver boots an environment's VMs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Linux-namespace sandboxes on the server's host.
    #[default]
    Sandbox,
    /// QEMU microVMs.
    Qemu,
    /// In-memory VMs for simulation and tests.
    Fake,
}

/// Which network a VM gets.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// No network but loopback (and the control plane's own channel to the
    /// guest agent). Read from the older name `isolated` too.
    #[serde(alias = "isolated")]
    None,
    /// Egress to the internet only: never the host itself, other VMs or
    /// private ranges, except the host ports `allow_host_ports` names. The
    /// default.
    #[default]
    Egress,
    /// The host's own network, unfiltered (sandbox only). A weaker setting
    /// only an operator may choose.
    Host,
}

/// The shape of a workspace's VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    #[serde(default)]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub driver: DriverKind,
    /// Image name; absent means the driver's default image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default = "default_cpus")]
    #[serde(deserialize_with = "cpus_or_default")]
    #[schema(nullable)]
    pub cpus: i32,
    #[serde(default)]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub network: Network,
    /// Host TCP ports the VM may reach (e.g. a git server), on the host's
    /// address inside the VM's network. Only an operator may set them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub allow_host_ports: Vec<u16>,
    /// Memory as `<n>Mi` or `<n>Gi`.
    #[serde(default = "default_memory")]
    #[serde(deserialize_with = "memory_or_default")]
    #[schema(nullable)]
    pub memory: String,
    /// The most a VM may write to its own disk, as `<n>Mi` or `<n>Gi`
    /// (sandbox: its writable layer; qemu: its disk overlay).
    #[serde(default = "default_disk")]
    #[serde(deserialize_with = "disk_or_default")]
    #[schema(nullable)]
    pub disk: String,
    /// Variables written to `/home/.env` in every VM. Values are secrets.
    #[serde(default)]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub env: BTreeMap<String, String>,
    /// How long a VM may sit idle before it is stopped or destroyed.
    #[serde(default = "default_idle_timeout")]
    #[serde(deserialize_with = "idle_timeout_or_default")]
    #[schema(nullable)]
    pub idle_timeout: String,
    /// Run once per VM from `/home`.
    #[serde(default)]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub project_setup: Vec<SetupCommand>,
    /// Run once per repo, in the repo's folder.
    #[serde(default)]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub repo_setup: Vec<SetupCommand>,
    /// Read-only: shown on output, ignored on input.
    #[serde(default, skip_serializing)]
    #[schema(read_only)]
    pub version: Option<i64>,
}

fn default_cpus() -> i32 {
    1
}
fn default_memory() -> String {
    "512Mi".to_owned()
}
fn default_disk() -> String {
    "4Gi".to_owned()
}
fn default_idle_timeout() -> String {
    "15m".to_owned()
}
null_is!(cpus_or_default: i32 = default_cpus());
null_is!(memory_or_default: String = default_memory());
null_is!(disk_or_default: String = default_disk());
null_is!(idle_timeout_or_default: String = default_idle_timeout());

/// `<n>Mi` or `<n>Gi` in MiB.
fn size_mib(size: &str) -> Option<u64> {
    let (number, factor) = if let Some(n) = size.strip_suffix("Gi") {
        (n, 1024)
    } else if let Some(n) = size.strip_suffix("Mi") {
        (n, 1)
    } else {
        return None;
    };
    number.parse::<u64>().ok()?.checked_mul(factor)
}

/// The most host ports one environment may allow.
pub const MAX_ALLOWED_HOST_PORTS: usize = 64;

impl Environment {
    /// Memory in MiB (validated, so never fails on a stored spec).
    pub fn memory_mib(&self) -> Option<u64> {
        size_mib(&self.memory)
    }

    /// The disk limit in MiB (validated, so never fails on a stored spec).
    pub fn disk_mib(&self) -> Option<u64> {
        size_mib(&self.disk)
    }

    /// The settings only an operator may write: `network: host` and
    /// `allow_host_ports` (each opens a path from the VM to the host), as
    /// the field names an error would cite.
    pub fn operator_only_settings(&self) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if self.network == Network::Host {
            fields.push("network: host");
        }
        if !self.allow_host_ports.is_empty() {
            fields.push("allow_host_ports");
        }
        fields
    }

    /// The idle timeout in seconds.
    pub fn idle_timeout_secs(&self) -> Option<u64> {
        parse_duration(&self.idle_timeout)
    }
}

impl Spec for Environment {
    const KIND: Kind = Kind::Environment;
    const VERSIONED: bool = true;

    fn operator_only_changes(&self, previous: Option<&Self>) -> Vec<&'static str> {
        self.operator_only_settings()
            .into_iter()
            .filter(|field| match (previous, *field) {
                (Some(p), "network: host") => p.network != Network::Host,
                (Some(p), _) => p.allow_host_ports != self.allow_host_ports,
                (None, _) => true,
            })
            .collect()
    }

    fn validate(&self) -> Result<(), Error> {
        if self.network == Network::Host && self.driver == DriverKind::Qemu {
            return Err(Error::invalid(
                "network: host is not available with driver: qemu (the guest would reach the \
                 host's loopback); use network: egress with allow_host_ports",
            ));
        }
        if let Some(image) = &self.image {
            validate_name(Kind::Image, image)
                .map_err(|e| Error::invalid(format!("image: {}", e.message)))?;
        }
        if !(1..=64).contains(&self.cpus) {
            return Err(Error::invalid(format!(
                "cpus must be between 1 and 64 (got {})",
                self.cpus
            )));
        }
        match self.memory_mib() {
            Some(mib) if (64..=1024 * 1024).contains(&mib) => {}
            _ => {
                return Err(Error::invalid(format!(
                    "memory {:?} is not valid: use <n>Mi or <n>Gi, between 64Mi and 1024Gi",
                    self.memory
                )));
            }
        }
        match self.disk_mib() {
            Some(mib) if (64..=16 * 1024 * 1024).contains(&mib) => {}
            _ => {
                return Err(Error::invalid(format!(
                    "disk {:?} is not valid: use <n>Mi or <n>Gi, between 64Mi and 16384Gi",
                    self.disk
                )));
            }
        }
        if self.allow_host_ports.len() > MAX_ALLOWED_HOST_PORTS {
            return Err(Error::invalid(format!(
                "allow_host_ports has {} ports; at most {MAX_ALLOWED_HOST_PORTS} are allowed",
                self.allow_host_ports.len()
            )));
        }
        for (i, port) in self.allow_host_ports.iter().enumerate() {
            if *port == 0 {
                return Err(Error::invalid(format!(
                    "allow_host_ports[{i}]: port 0 is not a port (1-65535)"
                )));
            }
            if self.allow_host_ports[..i].contains(port) {
                return Err(Error::invalid(format!(
                    "allow_host_ports[{i}]: port {port} is listed twice"
                )));
            }
        }
        if !self.allow_host_ports.is_empty() && self.network != Network::Egress {
            return Err(Error::invalid(
                "allow_host_ports needs network: egress (with none the VM reaches nothing; with host it reaches everything)",
            ));
        }
        for key in self.env.keys() {
            let ok = !key.is_empty()
                && !key.as_bytes()[0].is_ascii_digit()
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(Error::invalid(format!(
                    "env: {key:?} is not a valid variable name (letters, digits and '_', not starting with a digit)"
                )));
            }
        }
        if self.idle_timeout_secs().is_none_or(|s| s == 0) {
            return Err(Error::invalid(format!(
                "idle_timeout {:?} is not valid: use a duration such as 90s, 15m or 1h30m",
                self.idle_timeout
            )));
        }
        validate_commands("project_setup", &self.project_setup)?;
        validate_commands("repo_setup", &self.repo_setup)?;
        Ok(())
    }

    fn references(&self) -> Vec<ResourceRef> {
        self.image
            .iter()
            .map(|name| ResourceRef {
                kind: Kind::Image,
                name: name.clone(),
            })
            .collect()
    }

    fn redacted(&self) -> Self {
        let mut copy = self.clone();
        for value in copy.env.values_mut() {
            *value = REDACTED.to_owned();
        }
        copy
    }

    fn restore_masked(&mut self, previous: Option<&Self>) -> Result<(), Error> {
        for (key, value) in self.env.iter_mut() {
            if value == REDACTED {
                match previous.and_then(|p| p.env.get(key)) {
                    Some(stored) => *value = stored.clone(),
                    None => {
                        return Err(Error::invalid(format!(
                            "env.{key}: {REDACTED:?} is the mask for a stored secret, and {key} has no stored value; give the real value"
                        )));
                    }
                }
            }
        }
        self.version = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Format, parse_spec};

    fn yaml(s: &str) -> Result<Environment, Error> {
        parse_spec(s, Format::Yaml)
    }

    #[test]
    fn defaults_and_sizes() {
        let e = yaml("driver: sandbox").unwrap();
        assert_eq!(
            (e.cpus, e.memory_mib(), e.idle_timeout_secs()),
            (1, Some(512), Some(900))
        );
        assert_eq!(yaml("memory: 2Gi").unwrap().memory_mib(), Some(2048));
        assert!(
            yaml("memory: 2GB")
                .unwrap_err()
                .message
                .starts_with("memory \"2GB\" is not valid")
        );
        assert!(
            yaml("cpus: 0")
                .unwrap_err()
                .message
                .starts_with("cpus must be between")
        );
        assert!(
            yaml("idle_timeout: soon")
                .unwrap_err()
                .message
                .starts_with("idle_timeout \"soon\"")
        );
        let e = yaml("driver: firecracker").unwrap_err();
        assert!(
            e.message.contains("driver: unknown variant `firecracker`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn secrets_are_masked_and_restored() {
        let stored = yaml("env:\n  TOKEN: s3cret\n").unwrap();
        let shown = stored.redacted();
        assert_eq!(shown.env["TOKEN"], REDACTED);
        let mut round_trip = shown.clone();
        round_trip.restore_masked(Some(&stored)).unwrap();
        assert_eq!(round_trip.env["TOKEN"], "s3cret");
        let mut fresh = shown;
        let err = fresh.restore_masked(None).unwrap_err();
        assert!(err.message.starts_with("env.TOKEN"), "{}", err.message);
        assert!(!err.message.contains("s3cret"));
    }

    #[test]
    fn networks() {
        assert_eq!(yaml("network: egress").unwrap().network, Network::Egress);
        assert_eq!(yaml("network: isolated").unwrap().network, Network::None);
        assert_eq!(yaml("network: none").unwrap().network, Network::None);
        let e = yaml("network: host\nallow_host_ports: [9418]").unwrap_err();
        assert!(
            e.message
                .starts_with("allow_host_ports needs network: egress")
        );
        let e = yaml("network: egress\nallow_host_ports: [22, 22]").unwrap_err();
        assert_eq!(e.message, "allow_host_ports[1]: port 22 is listed twice");
        let e = yaml("network: egress\nallow_host_ports: [0]").unwrap_err();
        assert!(e.message.starts_with("allow_host_ports[0]: port 0"));
        let env = yaml("network: egress\nallow_host_ports: [9418]").unwrap();
        assert_eq!(env.operator_only_settings(), vec!["allow_host_ports"]);
        let env = yaml("network: host").unwrap();
        assert_eq!(env.operator_only_settings(), vec!["network: host"]);
        assert!(
            yaml("network: egress")
                .unwrap()
                .operator_only_settings()
                .is_empty()
        );
    }

    #[test]
    fn disks() {
        assert_eq!(yaml("driver: sandbox").unwrap().disk_mib(), Some(4096));
        assert_eq!(yaml("disk: 100Mi").unwrap().disk_mib(), Some(100));
        assert!(
            yaml("disk: 1Mi")
                .unwrap_err()
                .message
                .starts_with("disk \"1Mi\" is not valid")
        );
    }

    #[test]
    fn variable_names() {
        assert!(
            yaml("env:\n  1X: a\n")
                .unwrap_err()
                .message
                .contains("\"1X\" is not a valid variable name")
        );
    }
}
