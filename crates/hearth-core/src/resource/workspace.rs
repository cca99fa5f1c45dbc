//! The workspace: a project's repos, its warm-pool size and setup.

use super::{Kind, ResourceRef, Spec, null_is, null_is_default, validate_name};
use crate::Error;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// A project whose VMs hearth keeps warm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    /// The environment (VM shape) this workspace's VMs are built from.
    pub environment: String,
    /// Git repositories cloned into every VM at `/home/<repo-name>`.
    #[serde(default)]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub repos: Vec<Repo>,
    /// Warm VMs to keep ready (the warm pool's target size); 0 = no prewarming.
    #[serde(default)]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub min_idle: i32,
    /// Most idle VMs to keep; a returned VM beyond it is destroyed. Defaults
    /// to `min_idle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle: Option<i32>,
    /// Warm-pool settings.
    #[serde(default)]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub warm_pool: WarmPool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub description: String,
}

/// One git repository of a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Repo {
    /// Anything `git clone` accepts.
    pub url: String,
    /// Branch to check out (the warm pool's `branch` overrides it when set).
    #[serde(default = "default_branch")]
    #[serde(deserialize_with = "branch_or_default")]
    #[schema(nullable)]
    pub branch: String,
    /// Folder under `/home`; defaults to the last part of the URL without `.git`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn default_branch() -> String {
    "main".to_owned()
}
null_is!(branch_or_default: String = default_branch());

impl Repo {
    /// The folder name under `/home` this repo is cloned into.
    pub fn dir_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        let trimmed = self.url.trim_end_matches('/');
        let last = trimmed.rsplit(['/', ':']).next().unwrap_or(trimmed);
        last.strip_suffix(".git").unwrap_or(last).to_owned()
    }
}

/// Warm-pool settings of a workspace (its target size is `min_idle`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmPool {
    #[serde(default = "default_true")]
    #[serde(deserialize_with = "true_or_default")]
    #[schema(nullable)]
    pub enabled: bool,
    /// Overrides every repo's branch for warm VMs when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Run in order from `/home` after the repos are set up.
    #[serde(default)]
    #[serde(deserialize_with = "null_is_default")]
    #[schema(nullable)]
    pub setup_commands: Vec<SetupCommand>,
}

impl Default for WarmPool {
    fn default() -> Self {
        WarmPool {
            enabled: true,
            branch: None,
            setup_commands: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}
null_is!(true_or_default: bool = true);

/// A named shell command run inside a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupCommand {
    pub name: String,
    pub command: String,
}

impl Workspace {
    /// The effective `max_idle` (`min_idle` when unset).
    pub fn max_idle(&self) -> i32 {
        self.max_idle.unwrap_or(self.min_idle)
    }
}

/// Checks a list of setup commands: names present and unique, commands present.
pub(crate) fn validate_commands(field: &str, commands: &[SetupCommand]) -> Result<(), Error> {
    let mut seen = HashSet::new();
    for (i, c) in commands.iter().enumerate() {
        if c.name.trim().is_empty() {
            return Err(Error::invalid(format!(
                "{field}[{i}].name must not be empty"
            )));
        }
        if c.command.trim().is_empty() {
            return Err(Error::invalid(format!(
                "{field}[{i}].command must not be empty"
            )));
        }
        if !seen.insert(c.name.as_str()) {
            return Err(Error::invalid(format!(
                "{field}[{i}].name {:?} is used twice",
                c.name
            )));
        }
    }
    Ok(())
}

impl Spec for Workspace {
    const KIND: Kind = Kind::Workspace;

    fn validate(&self) -> Result<(), Error> {
        validate_name(Kind::Environment, &self.environment)
            .map_err(|e| Error::invalid(format!("environment: {}", e.message)))?;
        if self.min_idle < 0 {
            return Err(Error::invalid("min_idle must not be negative"));
        }
        if let Some(max_idle) = self.max_idle
            && max_idle < self.min_idle
        {
            return Err(Error::invalid(format!(
                "max_idle ({max_idle}) must be at least min_idle ({})",
                self.min_idle
            )));
        }
        let mut dirs = HashSet::new();
        for (i, repo) in self.repos.iter().enumerate() {
            if repo.url.trim().is_empty() {
                return Err(Error::invalid(format!("repos[{i}].url must not be empty")));
            }
            if repo.branch.trim().is_empty() {
                return Err(Error::invalid(format!(
                    "repos[{i}].branch must not be empty"
                )));
            }
            let dir = repo.dir_name();
            let dir_ok = !dir.is_empty()
                && dir != "."
                && dir != ".."
                && dir
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !dir_ok {
                return Err(Error::invalid(format!(
                    "repos[{i}]: folder name {dir:?} is not usable; set repos[{i}].name to letters, digits, '.', '_' or '-'"
                )));
            }
            if !dirs.insert(dir.clone()) {
                return Err(Error::invalid(format!(
                    "repos[{i}]: two repos would be cloned into /home/{dir}; give one a different name"
                )));
            }
        }
        if let Some(branch) = &self.warm_pool.branch
            && branch.trim().is_empty()
        {
            return Err(Error::invalid(
                "warm_pool.branch must not be empty when set",
            ));
        }
        validate_commands("warm_pool.setup_commands", &self.warm_pool.setup_commands)?;
        if self.description.len() > super::pool_config::DESCRIPTION_LIMIT {
            return Err(Error::invalid(format!(
                "description exceeds 1024 byte limit ({} bytes)",
                self.description.len()
            )));
        }
        Ok(())
    }

    fn references(&self) -> Vec<ResourceRef> {
        vec![ResourceRef {
            kind: Kind::Environment,
            name: self.environment.clone(),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Format, parse_spec};

    fn yaml(s: &str) -> Result<Workspace, Error> {
        parse_spec(s, Format::Yaml)
    }

    #[test]
    fn repo_folder_names() {
        let r = |url: &str| {
            Repo {
                url: url.into(),
                branch: "main".into(),
                name: None,
            }
            .dir_name()
        };
        assert_eq!(r("https://example.org/org/myrepo.git"), "myrepo");
        assert_eq!(r("git@example.org:org/other"), "other");
        assert_eq!(r("/srv/git/local.git/"), "local");
    }

    #[test]
    fn idle_bounds() {
        let w = yaml("environment: dev\nmin_idle: 2").unwrap();
        assert_eq!(w.max_idle(), 2);
        assert!(w.warm_pool.enabled);
        assert_eq!(
            yaml("environment: dev\nmin_idle: 3\nmax_idle: 1")
                .unwrap_err()
                .message,
            "max_idle (1) must be at least min_idle (3)"
        );
        assert_eq!(
            yaml("environment: dev\nmin_idle: -1").unwrap_err().message,
            "min_idle must not be negative"
        );
    }

    #[test]
    fn repos_and_commands() {
        let e = yaml("environment: dev\nrepos:\n- url: a/x.git\n- url: b/x\n").unwrap_err();
        assert!(e.message.contains("/home/x"), "{}", e.message);
        let e =
            yaml("environment: dev\nwarm_pool:\n  setup_commands:\n  - name: a\n    command: ''\n")
                .unwrap_err();
        assert_eq!(
            e.message,
            "warm_pool.setup_commands[0].command must not be empty"
        );
        let e = yaml("environment: dev\nrepos:\n- url: a/x.git\n  brnch: dev\n").unwrap_err();
        assert!(
            e.message.contains("unknown field `brnch`") && e.message.contains("line 4"),
            "{}",
            e.message
        );
        let e = yaml("repos: []\n").unwrap_err();
        assert!(
            e.message.contains("missing field `environment`"),
            "{}",
            e.message
        );
    }
}
