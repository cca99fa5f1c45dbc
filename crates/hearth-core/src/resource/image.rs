//! The image record: where a baked base image's artifacts live. Baking
//! itself is the qemu driver's business; this is only the record.

use super::environment::DriverKind;
use super::{Kind, Spec, null_is_default};
use crate::Error;
use serde::{Deserialize, Serialize};

/// A base image for one driver; every change is a new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub driver: DriverKind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub description: String,
    /// qemu: the kernel file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// qemu: the initramfs file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// qemu: the root disk image (used as a read-only backing file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// sandbox: the directory used as the read-only lower layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_dir: Option<String>,
    /// Read-only: shown on output, ignored on input.
    #[serde(default, skip_serializing)]
    #[schema(read_only)]
    pub version: Option<i64>,
}

impl Spec for Image {
    const KIND: Kind = Kind::Image;
    const VERSIONED: bool = true;

    fn validate(&self) -> Result<(), Error> {
        let paths = [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("disk", &self.disk),
            ("root_dir", &self.root_dir),
        ];
        for (field, path) in paths {
            if let Some(path) = path
                && !path.starts_with('/')
            {
                return Err(Error::invalid(format!(
                    "{field} must be an absolute path (got {path:?})"
                )));
            }
        }
        match self.driver {
            DriverKind::Qemu if self.kernel.is_none() => {
                Err(Error::invalid("kernel is required for a qemu image"))
            }
            DriverKind::Qemu if self.initrd.is_none() && self.disk.is_none() => {
                Err(Error::invalid("a qemu image needs an initrd or a disk"))
            }
            DriverKind::Sandbox
                if self.kernel.is_some() || self.initrd.is_some() || self.disk.is_some() =>
            {
                Err(Error::invalid(
                    "a sandbox image has only root_dir (kernel, initrd and disk are for qemu)",
                ))
            }
            _ => Ok(()),
        }
    }

    fn restore_masked(&mut self, _previous: Option<&Self>) -> Result<(), Error> {
        self.version = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Format, parse_spec};

    #[test]
    fn driver_rules() {
        let p = |s: &str| parse_spec::<Image>(s, Format::Yaml);
        assert!(p("driver: sandbox\nroot_dir: /").is_ok());
        assert!(p("driver: qemu\nkernel: /k\ninitrd: /i\nversion: 7").is_ok());
        assert_eq!(
            p("driver: qemu\ninitrd: /i").unwrap_err().message,
            "kernel is required for a qemu image"
        );
        assert!(
            p("driver: sandbox\nroot_dir: rel")
                .unwrap_err()
                .message
                .starts_with("root_dir must be an absolute")
        );
    }
}
