//! Where the secret values sit in a resource's stored form (its spec as
//! JSON), so that the store can encrypt exactly those and nothing else.
//! Pure: finding them is a walk of the document; what is done to them is
//! the caller's (the store seals and opens them).

use super::{Kind, repo_url_secret};
use serde_json::Value;

/// What kind of secret a string of a spec is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretField {
    /// A value of an environment's `env`: the whole string is secret.
    EnvValue,
    /// A workspace repo's `url`: secret when it carries a credential
    /// ([`repo_url_secret`]); the credential cannot be told apart from the
    /// rest of the URL once sealed, so a sealed URL is sealed whole.
    RepoUrl,
}

impl SecretField {
    /// Whether `text`, read from a spec as it was written (not sealed),
    /// holds a secret of this field.
    pub fn holds_secret(self, text: &str) -> bool {
        match self {
            SecretField::EnvValue => true,
            SecretField::RepoUrl => repo_url_secret(text).is_some(),
        }
    }
}

/// Calls `f` on every string of a stored `spec` of `kind` that may hold a
/// secret ([`SecretField`]): an environment's `env` values, a workspace's
/// repo URLs. Stops at the first error. Strings elsewhere, and documents of
/// other kinds, are left alone; a spec of an unexpected shape (the store
/// does not validate) simply has fewer such strings.
pub fn for_each_secret<E>(
    kind: Kind,
    spec: &mut Value,
    mut f: impl FnMut(SecretField, &mut String) -> Result<(), E>,
) -> Result<(), E> {
    match kind {
        Kind::Environment => {
            if let Some(env) = spec.get_mut("env").and_then(Value::as_object_mut) {
                for value in env.values_mut() {
                    if let Value::String(text) = value {
                        f(SecretField::EnvValue, text)?;
                    }
                }
            }
        }
        Kind::Workspace => {
            if let Some(repos) = spec.get_mut("repos").and_then(Value::as_array_mut) {
                for repo in repos {
                    if let Some(Value::String(url)) = repo.get_mut("url") {
                        f(SecretField::RepoUrl, url)?;
                    }
                }
            }
        }
        Kind::PoolConfig | Kind::Image => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Environment, Spec, Workspace};
    use serde_json::json;

    fn found(kind: Kind, mut spec: Value) -> Vec<(SecretField, String)> {
        let mut seen = Vec::new();
        for_each_secret::<()>(kind, &mut spec, |field, text| {
            seen.push((field, text.clone()));
            Ok(())
        })
        .unwrap();
        seen
    }

    #[test]
    fn env_values_and_repo_urls_are_found_in_specs_as_stored() {
        let env: Environment = serde_json::from_value(json!({
            "driver": "sandbox", "env": {"A": "one", "B": "two"}
        }))
        .unwrap();
        env.validate().unwrap();
        assert_eq!(
            found(Kind::Environment, serde_json::to_value(&env).unwrap()),
            [
                (SecretField::EnvValue, "one".to_owned()),
                (SecretField::EnvValue, "two".to_owned())
            ]
        );
        let ws: Workspace = serde_json::from_value(json!({
            "environment": "dev",
            "repos": [{"url": "https://tok@h/r.git"}, {"url": "git://h/s.git"}]
        }))
        .unwrap();
        let seen = found(Kind::Workspace, serde_json::to_value(&ws).unwrap());
        assert_eq!(
            seen.iter()
                .map(|(f, u)| (*f, u.as_str(), f.holds_secret(u)))
                .collect::<Vec<_>>(),
            [
                (SecretField::RepoUrl, "https://tok@h/r.git", true),
                (SecretField::RepoUrl, "git://h/s.git", false)
            ]
        );
        assert!(found(Kind::Image, json!({"env": {"A": "x"}})).is_empty());
        assert!(found(Kind::Environment, json!({"env": ["odd"]})).is_empty());
    }

    #[test]
    fn what_f_writes_is_kept_and_its_error_stops_the_walk() {
        let mut spec = json!({"env": {"A": "one", "B": "two"}, "cpus": 1});
        for_each_secret::<()>(Kind::Environment, &mut spec, |_, text| {
            *text = text.to_uppercase();
            Ok(())
        })
        .unwrap();
        assert_eq!(spec, json!({"env": {"A": "ONE", "B": "TWO"}, "cpus": 1}));
        let mut calls = 0;
        let r = for_each_secret(Kind::Environment, &mut spec, |_, _| {
            calls += 1;
            Err("stop")
        });
        assert_eq!((r, calls), (Err("stop"), 1));
    }
}
