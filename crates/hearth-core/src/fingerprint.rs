//! Fingerprints of what a VM is built from, so the pool can tell a VM built
//! from an older setup from one built from the current.
//!
//! [`SetupInputs`] are a workspace's provisioning inputs as they reach a VM:
//! its environment's name, its repos (URL, the branch actually checked out,
//! the folder) and its warm-pool setup commands. Settings that do not change
//! what a VM holds (`min_idle`, `max_idle`, `warm_pool.enabled`,
//! `description`) are left out on purpose, so changing them replaces no VM.
//! The environment's and image's own contents are versioned by the store
//! and compared separately (`env_version`, `image_version` on a VM).
//!
//! The digest is SHA-256 over a canonical, versioned serialization: the same
//! inputs give the same digest on every server and every release that keeps
//! [`SETUP_DIGEST_VERSION`]. It is computed from the stored, unredacted
//! spec, so a changed repo credential counts as a change; being a hash, it
//! never reveals the credential.
//!
//! Snapshot templates (keyed by image, environment and setup) can extend
//! this: a template key is the setup digest plus the image and environment
//! versions, hashed the same way.

use crate::resource::Workspace;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Prefix of the canonical serialization; bump it when the set of inputs
/// or their encoding changes (every VM then reads as built from another
/// setup, and is replaced a few at a time).
pub const SETUP_DIGEST_VERSION: &str = "hearth-setup-v1";

/// A workspace's provisioning inputs, as they reach a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetupInputs<'a> {
    /// The environment the VMs are built from (its contents are covered by
    /// its version; a different environment is a different setup even at
    /// an equal version).
    pub environment: &'a str,
    pub repos: Vec<RepoInput<'a>>,
    /// Warm-pool setup commands, in order (name and command).
    pub setup_commands: Vec<(&'a str, &'a str)>,
}

/// One repo as cloned into a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepoInput<'a> {
    pub url: &'a str,
    /// The branch checked out: `warm_pool.branch` when set, else the repo's.
    pub branch: &'a str,
    /// The folder under `/home` (explicit or derived from the URL).
    pub dir: String,
}

impl<'a> SetupInputs<'a> {
    /// The inputs of a workspace's stored (unredacted) spec.
    pub fn of(ws: &'a Workspace) -> Self {
        SetupInputs {
            environment: &ws.environment,
            repos: ws
                .repos
                .iter()
                .map(|r| RepoInput {
                    url: &r.url,
                    branch: ws.branch_for(r),
                    dir: r.dir_name(),
                })
                .collect(),
            setup_commands: ws
                .warm_pool
                .setup_commands
                .iter()
                .map(|c| (c.name.as_str(), c.command.as_str()))
                .collect(),
        }
    }

    /// SHA-256 (lower-case hex) of the canonical serialization: the
    /// version prefix, a newline, then the inputs as JSON (fields in
    /// declaration order, strings escaped, so no two inputs collide).
    pub fn digest(&self) -> String {
        let json = serde_json::to_string(self).expect("setup inputs serialize");
        let mut hasher = Sha256::new();
        hasher.update(SETUP_DIGEST_VERSION.as_bytes());
        hasher.update(b"\n");
        hasher.update(json.as_bytes());
        hex::encode(hasher.finalize())
    }
}

/// The setup digest of a workspace ([`SetupInputs::digest`]).
pub fn setup_digest(ws: &Workspace) -> String {
    SetupInputs::of(ws).digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Repo, SetupCommand, WarmPool};

    fn workspace() -> Workspace {
        Workspace {
            environment: "default".into(),
            repos: vec![Repo {
                url: "https://user:s3cret-token@git.example/org/app.git".into(),
                branch: "main".into(),
                name: None,
            }],
            min_idle: 2,
            max_idle: Some(4),
            warm_pool: WarmPool {
                enabled: true,
                branch: None,
                setup_commands: vec![SetupCommand {
                    name: "deps".into(),
                    command: "make deps".into(),
                }],
            },
            description: String::new(),
        }
    }

    #[test]
    fn digest_is_stable_hex_and_hides_credentials() {
        let ws = workspace();
        let d = setup_digest(&ws);
        assert_eq!(d.len(), 64);
        assert!(
            d.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(d, setup_digest(&ws.clone()));
        assert!(!d.contains("s3cret"));
    }

    /// One change to a workspace, named.
    type Change = (&'static str, fn(&mut Workspace));

    #[test]
    fn provisioning_inputs_change_the_digest() {
        let base = setup_digest(&workspace());
        let changes: [Change; 9] = [
            ("environment", |w| w.environment = "other".into()),
            ("repo url", |w| {
                w.repos[0].url = "https://git.example/org/app.git".into()
            }),
            ("repo branch", |w| w.repos[0].branch = "dev".into()),
            ("repo name", |w| w.repos[0].name = Some("src".into())),
            ("repo added", |w| w.repos.push(w.repos[0].clone())),
            ("warm_pool.branch", |w| {
                w.warm_pool.branch = Some("release".into())
            }),
            ("setup command", |w| {
                w.warm_pool.setup_commands[0].command = "make all".into()
            }),
            ("setup command added", |w| {
                w.warm_pool.setup_commands.push(SetupCommand {
                    name: "more".into(),
                    command: "true".into(),
                })
            }),
            ("setup commands cleared", |w| {
                w.warm_pool.setup_commands.clear()
            }),
        ];
        for (what, change) in changes {
            let mut ws = workspace();
            change(&mut ws);
            assert_ne!(setup_digest(&ws), base, "{what} must change the digest");
        }
    }

    #[test]
    fn pool_sizing_and_equivalent_spellings_keep_the_digest() {
        let base = setup_digest(&workspace());
        let changes: [Change; 6] = [
            ("min_idle", |w| w.min_idle = 7),
            ("max_idle", |w| w.max_idle = None),
            ("enabled", |w| w.warm_pool.enabled = false),
            ("description", |w| w.description = "new".into()),
            // What the VM holds is the same: the branch checked out and the
            // folder are the effective ones.
            ("warm_pool.branch equal to the repo's", |w| {
                w.warm_pool.branch = Some("main".into())
            }),
            ("repo name equal to the derived one", |w| {
                w.repos[0].name = Some("app".into())
            }),
        ];
        for (what, change) in changes {
            let mut ws = workspace();
            change(&mut ws);
            assert_eq!(setup_digest(&ws), base, "{what} must not change the digest");
        }
    }

    #[test]
    fn fields_do_not_run_into_each_other() {
        // "a","bc" and "ab","c" as (name, command) are different setups.
        let mut one = workspace();
        one.warm_pool.setup_commands = vec![SetupCommand {
            name: "a".into(),
            command: "bc".into(),
        }];
        let mut two = workspace();
        two.warm_pool.setup_commands = vec![SetupCommand {
            name: "ab".into(),
            command: "c".into(),
        }];
        assert_ne!(setup_digest(&one), setup_digest(&two));
    }
}
