//! The workspace: a project's repos, its warm-pool size and setup.

use super::{Kind, REDACTED, ResourceRef, Spec, null_is, null_is_default, validate_name};
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

/// The credential in a repo URL's userinfo (`scheme://user:password@host/…`
/// → `password`; for http(s), a token-only `https://token@host/…` → `token`),
/// or `None`. The user name of other schemes (`ssh://git@host/…`) is not a
/// secret. `@` may appear in the password: the host starts after the last one.
pub fn repo_url_secret(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let secret = match userinfo.split_once(':') {
        Some((_, password)) => password,
        None if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") => {
            userinfo
        }
        None => return None,
    };
    (!secret.is_empty()).then_some(secret)
}

/// `url` with its credential ([`repo_url_secret`]) replaced by `***`.
pub fn mask_repo_url(url: &str) -> String {
    match repo_url_secret(url) {
        Some(secret) => {
            // The secret is a slice of `url`: replace exactly that span.
            let start = secret.as_ptr() as usize - url.as_ptr() as usize;
            format!(
                "{}{REDACTED}{}",
                &url[..start],
                &url[start + secret.len()..]
            )
        }
        None => url.to_owned(),
    }
}

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

    /// The branch a warm VM checks `repo` out at: the warm pool's `branch`
    /// when set, else the repo's own.
    pub fn branch_for<'a>(&'a self, repo: &'a Repo) -> &'a str {
        self.warm_pool.branch.as_deref().unwrap_or(&repo.branch)
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

    fn redacted(&self) -> Self {
        let mut copy = self.clone();
        for repo in &mut copy.repos {
            repo.url = mask_repo_url(&repo.url);
        }
        copy
    }

    /// A repo URL whose credential is `***` gets the stored URL back — the
    /// stored repo of the same folder name (else at the same position)
    /// whose masked URL is exactly this one. Matching the whole masked URL
    /// means the stored credential is only ever sent where it was sent
    /// before: pointing `***` at another host is refused.
    fn restore_masked(&mut self, previous: Option<&Self>) -> Result<(), Error> {
        let stored = previous.map_or(&[][..], |p| p.repos.as_slice());
        for (i, repo) in self.repos.iter_mut().enumerate() {
            if repo_url_secret(&repo.url) != Some(REDACTED) {
                continue;
            }
            let dir = repo.dir_name();
            let matches = |r: &&Repo| mask_repo_url(&r.url) == repo.url;
            let found = stored
                .iter()
                .filter(|r| r.dir_name() == dir)
                .find(matches)
                .or_else(|| stored.get(i).filter(matches));
            match found {
                Some(r) => repo.url = r.url.clone(),
                None => {
                    return Err(Error::invalid(format!(
                        "repos[{i}].url: {REDACTED:?} is the mask for a stored credential, and no stored repo has the URL {:?}; give the real credential",
                        repo.url
                    )));
                }
            }
        }
        Ok(())
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
    fn repo_credentials_are_masked() {
        let cases = [
            (
                "https://user:secret@host/repo.git",
                Some("secret"),
                "https://user:***@host/repo.git",
            ),
            (
                "https://ghp_token@github.com/o/r.git",
                Some("ghp_token"),
                "https://***@github.com/o/r.git",
            ),
            (
                "HTTP://u:p@ss@host:8080/x?y#z",
                Some("p@ss"),
                "HTTP://u:***@host:8080/x?y#z",
            ),
            (
                "ssh://git@github.com/o/s.git",
                None,
                "ssh://git@github.com/o/s.git",
            ),
            (
                "ssh://git:pw@host/s.git",
                Some("pw"),
                "ssh://git:***@host/s.git",
            ),
            ("git@github.com:o/r.git", None, "git@github.com:o/r.git"),
            ("https://host/a@b", None, "https://host/a@b"),
            ("https://user:@host/x", None, "https://user:@host/x"),
            ("/srv/git/local.git", None, "/srv/git/local.git"),
        ];
        for (url, secret, masked) in cases {
            assert_eq!(repo_url_secret(url), secret, "{url}");
            assert_eq!(mask_repo_url(url), masked, "{url}");
        }
    }

    #[test]
    fn masked_repo_urls_round_trip_to_the_stored_credential() {
        let stored = yaml(
            "environment: dev\nrepos:\n- url: https://u:s3cret@host/a.git\n- url: https://tok@host/b.git\n  name: bee\n",
        )
        .unwrap();
        let shown = stored.redacted();
        assert_eq!(shown.repos[0].url, "https://u:***@host/a.git");
        assert_eq!(shown.repos[1].url, "https://***@host/b.git");
        assert!(!serde_json::to_string(&shown).unwrap().contains("s3cret"));
        // Written back as shown: the stored values stay.
        let mut back = shown.clone();
        back.restore_masked(Some(&stored)).unwrap();
        assert_eq!(back, stored);
        // Reordered: matched by folder name, not position.
        let mut reordered = shown.clone();
        reordered.repos.reverse();
        reordered.restore_masked(Some(&stored)).unwrap();
        assert_eq!(reordered.repos[0].url, "https://tok@host/b.git");
        assert_eq!(reordered.repos[1].url, "https://u:s3cret@host/a.git");
        // The mask pointed at another host: refused, nothing revealed.
        let mut moved = shown.clone();
        moved.repos[0].url = "https://u:***@evil.example/a.git".into();
        let e = moved.restore_masked(Some(&stored)).unwrap_err();
        assert!(
            e.message.starts_with("repos[0].url: \"***\" is the mask"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("s3cret"));
        // No stored workspace at all.
        let mut fresh = shown;
        assert!(fresh.restore_masked(None).is_err());
        // A new real credential replaces the stored one.
        let mut new = stored.redacted();
        new.repos[0].url = "https://u:other@host/a.git".into();
        new.restore_masked(Some(&stored)).unwrap();
        assert_eq!(new.repos[0].url, "https://u:other@host/a.git");
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
