//! The image record: a recipe the server bakes from, plus what the server
//! made of it. No field a tenant writes names a host path: the artifacts
//! live in the server's image store, found from the record's name and the
//! server-owned [`Artifact`].
//!
//! **Invariants:**
//! - a tenant's input never sets [`Image::artifact`] or [`Image::version`]:
//!   both are restored from the stored record on every write (see
//!   [`Spec::restore_masked`]); only the server's bake jobs and an
//!   operator's prebuilt registration write them;
//! - a path-like field (`kernel`, `initrd`, `disk`, `root_dir`, in any
//!   spelling) is an unknown field: refused, named in the error.

use super::environment::DriverKind;
use super::{Kind, Spec, null_is, null_is_default};
use crate::Error;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The Debian package a qemu image's kernel comes from by default.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

null_is!(default_kernel_package: String = DEFAULT_KERNEL_PACKAGE.to_owned());

fn is_default_kernel_package(p: &str) -> bool {
    p == DEFAULT_KERNEL_PACKAGE
}

/// A base image for one driver; every change is a new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub driver: DriverKind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub description: String,
    /// qemu bake: what the root filesystem is (`minimal`: busybox and the
    /// agent in the initramfs; `debian`: a Debian disk with git and build
    /// tools).
    #[serde(default, deserialize_with = "null_is_default")]
    pub rootfs: Rootfs,
    /// qemu bake: the Debian package the kernel comes from (a meta-package
    /// is followed to its versioned `linux-image-*` package).
    #[serde(
        default = "kernel_package_default",
        deserialize_with = "default_kernel_package",
        skip_serializing_if = "is_default_kernel_package"
    )]
    #[schema(default = "linux-image-cloud-amd64")]
    pub kernel_package: String,
    /// Read-only: what VMs of this image boot, filled by the server (a
    /// successful bake, or an operator's prebuilt registration); ignored
    /// on input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "any_artifact")]
    #[schema(read_only)]
    pub artifact: Option<Artifact>,
    /// Read-only: shown on output, ignored on input.
    #[serde(default, skip_serializing)]
    #[schema(read_only)]
    pub version: Option<i64>,
}

fn kernel_package_default() -> String {
    DEFAULT_KERNEL_PACKAGE.to_owned()
}

/// The root filesystem a bake makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rootfs {
    #[default]
    Minimal,
    Debian,
}

impl fmt::Display for Rootfs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rootfs::Minimal => "minimal",
            Rootfs::Debian => "debian",
        })
    }
}

/// Where an image's artifacts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactSource {
    /// A bake job of the server: `<images>/tenants/<tenant>/<name>/<bake>/`.
    Bake,
    /// A folder an operator registered: `<images>/prebuilt/<path>/`.
    Prebuilt,
}

/// What an image's VMs boot, as the server recorded it (never written by a
/// tenant; the server re-checks it against its store on every boot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub source: ArtifactSource,
    /// `bake`: the version folder the bake wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<u64>,
    /// `bake`: the job that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// `prebuilt`: the folder, relative to the store's `prebuilt/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prebuilt: Option<String>,
    /// sha256 over the artifact files' digests (name, size, sha256).
    pub digest: String,
    /// RFC 3339.
    pub created_at: String,
    /// The SHA-256 of each artifact the store holds for it, by role
    /// (`kernel`, `initrd`, `disk`, `root_dir`: a sandbox root as a
    /// deterministic tar): what a node fetches by digest. Empty for images
    /// published before nodes fetched them (the server fills it in).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
}

/// Whether `name` reads as a Debian package name (lowercase letters,
/// digits, `+`, `-`, `.`; starting with a letter or digit).
pub fn valid_package_name(name: &str) -> bool {
    (2..=100).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        })
}

impl Spec for Image {
    const KIND: Kind = Kind::Image;
    const VERSIONED: bool = true;

    fn validate(&self) -> Result<(), Error> {
        if !valid_package_name(&self.kernel_package) {
            return Err(Error::invalid(format!(
                "kernel_package {:?} is not a Debian package name (lowercase letters, digits, '+', '-', '.'); images name no host files",
                self.kernel_package
            )));
        }
        if self.driver == DriverKind::Sandbox && self.rootfs != Rootfs::Minimal {
            return Err(Error::invalid(
                "rootfs is a qemu bake setting: a sandbox image is registered prebuilt by an operator",
            ));
        }
        Ok(())
    }

    fn restore_masked(&mut self, previous: Option<&Self>) -> Result<(), Error> {
        self.version = None;
        // Server-owned: what a tenant sends here is ignored.
        self.artifact = previous.and_then(|p| p.artifact.clone());
        Ok(())
    }
}

/// An `artifact` as read: the server's own record when it is one, else
/// nothing (a client's is ignored: the stored record is restored on every
/// write, so whatever mapping a client sends back is dropped, not refused).
/// Anything but a mapping or `null` is still bad input.
fn any_artifact<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Artifact>, D::Error> {
    use serde::de::Error as _;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        value @ serde_json::Value::Object(_) => Ok(serde_json::from_value(value).ok()),
        _ => Err(D::Error::custom("artifact must be a mapping")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Format, parse_spec};

    #[test]
    fn recipes_parse_and_paths_are_unknown_fields() {
        let p = |s: &str| parse_spec::<Image>(s, Format::Yaml);
        let i = p("driver: qemu\nrootfs: debian\nversion: 7").unwrap();
        assert_eq!(
            (i.rootfs, i.kernel_package.as_str()),
            (Rootfs::Debian, DEFAULT_KERNEL_PACKAGE)
        );
        assert!(p("driver: sandbox").is_ok());
        for field in ["kernel", "initrd", "disk", "root_dir", "Kernel"] {
            let e = p(&format!("driver: qemu\n{field}: /etc/shadow")).unwrap_err();
            assert!(
                e.message.contains(&format!("unknown field `{field}`")),
                "{e:?}"
            );
        }
        let e = p("driver: qemu\nkernel_package: /etc/shadow").unwrap_err();
        assert!(
            e.message
                .starts_with("kernel_package \"/etc/shadow\" is not a Debian package"),
            "{e:?}"
        );
        assert!(p("driver: sandbox\nrootfs: debian").is_err());
    }

    #[test]
    fn the_artifact_is_the_servers() {
        let stored = Image {
            artifact: Some(Artifact {
                source: ArtifactSource::Bake,
                bake: Some(2),
                job: None,
                prebuilt: None,
                digest: "d".into(),
                created_at: "t".into(),
                files: Default::default(),
            }),
            ..parse_spec::<Image>("driver: qemu", Format::Yaml).unwrap()
        };
        let mut input = parse_spec::<Image>(
            "driver: qemu\nartifact:\n  source: prebuilt\n  prebuilt: ../../etc\n  digest: x\n  created_at: t\n",
            Format::Yaml,
        )
        .unwrap();
        input.restore_masked(Some(&stored)).unwrap();
        assert_eq!(input.artifact, stored.artifact);
        input.restore_masked(None).unwrap();
        assert_eq!(input.artifact, None);
    }
}
