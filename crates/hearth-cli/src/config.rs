//! Where the CLI's settings come from, kubectl style.
//!
//! This module owns the discovery of `hearth.yaml` (the project file:
//! `server`, `workspace`), `hearth.local.yaml` (the local file: the identity
//! `token`, never committed) and `.hearth/admin-token` (the first admin token
//! `hearth server` writes into its default data dir), each found by walking
//! from a start directory upwards; and the precedence that merges them with
//! flags and environment variables: flag > env > file > default.
//!
//! Nothing here reads the process's current directory or environment: the
//! caller passes the start directory and an environment lookup, so every
//! function is testable in isolation.

use crate::GlobalArgs;
use crate::error::CliError;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The project file: shared settings, safe to commit.
pub const PROJECT_FILE: &str = "hearth.yaml";
/// The local file: the identity token; must never be committed.
pub const LOCAL_FILE: &str = "hearth.local.yaml";
/// The first admin token written by `hearth server` into its default data dir.
pub const ADMIN_TOKEN_FILE: &str = ".hearth/admin-token";
/// The server used when nothing else names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// Environment variable naming the server URL.
pub const ENV_SERVER: &str = "HEARTH_SERVER";
/// Environment variable holding the identity token.
pub const ENV_TOKEN: &str = "HEARTH_TOKEN";
/// Environment variable naming the workspace.
pub const ENV_WORKSPACE: &str = "HEARTH_WORKSPACE";

/// The contents of `hearth.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub workspace: Option<String>,
}

/// The contents of `hearth.local.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The settings a command runs with, after precedence is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Server base URL, without a trailing `/`.
    pub server: String,
    /// Where `server` came from (`--server`, `HEARTH_SERVER`, a file path or
    /// `default`), for error messages.
    pub server_origin: String,
    /// The bearer token, if any source gave one.
    pub token: Option<String>,
    pub workspace: Option<String>,
}

/// The nearest file at `relative` (e.g. `hearth.yaml` or
/// `.hearth/admin-token`) in `start` or any of its parents.
pub fn find_upwards(start: &Path, relative: &str) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|dir| dir.join(relative))
        .find(|path| path.is_file())
}

/// Parses a settings file; errors name the file and, through serde, the
/// field and line. An empty (or comments-only) file holds no settings.
pub fn parse_file<T: DeserializeOwned + Default>(path: &Path, text: &str) -> Result<T, CliError> {
    let blank = text
        .lines()
        .all(|line| line.trim().is_empty() || line.trim_start().starts_with('#'));
    if blank {
        return Ok(T::default());
    }
    serde_yaml_ng::from_str(text).map_err(|e| CliError::invalid(format!("{}: {e}", path.display())))
}

/// Reads and parses the nearest `name` file above `start`, with its path.
fn load_nearest<T: DeserializeOwned + Default>(
    start: &Path,
    name: &str,
) -> Result<Option<(PathBuf, T)>, CliError> {
    let Some(path) = find_upwards(start, name) else {
        return Ok(None);
    };
    let text = fs::read_to_string(&path)
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", path.display())))?;
    let parsed = parse_file(&path, &text)?;
    Ok(Some((path, parsed)))
}

/// Reads the nearest `.hearth/admin-token` above `start` (trimmed; an empty
/// file counts as none).
pub fn admin_token(start: &Path) -> Result<Option<String>, CliError> {
    let Some(path) = find_upwards(start, ADMIN_TOKEN_FILE) else {
        return Ok(None);
    };
    let text = fs::read_to_string(&path)
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", path.display())))?;
    Ok(non_empty(Some(text.trim().to_owned())))
}

/// Treats an empty value as absent, so `HEARTH_TOKEN=` does not hide a file.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// Applies the precedence flag > env > file > default for every setting,
/// reading the files found upwards from `start`. `env` looks up an
/// environment variable. The token falls back to `.hearth/admin-token` only
/// when no flag, variable or `hearth.local.yaml` gives one.
pub fn resolve(
    flags: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
    start: &Path,
) -> Result<Settings, CliError> {
    let project = load_nearest::<ProjectFile>(start, PROJECT_FILE)?;
    let local = load_nearest::<LocalFile>(start, LOCAL_FILE)?;

    let (server, server_origin) = if let Some(s) = non_empty(flags.server.clone()) {
        (s, "--server".to_owned())
    } else if let Some(s) = non_empty(env(ENV_SERVER)) {
        (s, ENV_SERVER.to_owned())
    } else if let Some((path, s)) = project
        .as_ref()
        .and_then(|(path, p)| non_empty(p.server.clone()).map(|s| (path, s)))
    {
        (s, path.display().to_string())
    } else {
        (DEFAULT_SERVER.to_owned(), "default".to_owned())
    };

    let token = match non_empty(flags.token.clone())
        .or_else(|| non_empty(env(ENV_TOKEN)))
        .or_else(|| local.and_then(|(_, l)| non_empty(l.token)))
    {
        Some(token) => Some(token),
        None => admin_token(start)?,
    };

    let workspace = workspace_from_flag_or_env(flags, env)
        .or_else(|| project.and_then(|(_, p)| non_empty(p.workspace)));

    Ok(Settings {
        server: server.trim().trim_end_matches('/').to_owned(),
        server_origin,
        token: token.map(|t| t.trim().to_owned()),
        workspace,
    })
}

/// The workspace named by `--workspace` or `HEARTH_WORKSPACE`, ignoring
/// `hearth.yaml` (for `hearth pool flush`, whose default is the whole pool).
pub fn workspace_from_flag_or_env(
    flags: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    non_empty(flags.workspace.clone()).or_else(|| non_empty(env(ENV_WORKSPACE)))
}

/// Where `hearth auth login` saves the token: next to the nearest
/// `hearth.yaml`, else in `start`.
pub fn login_target(start: &Path) -> PathBuf {
    let dir = find_upwards(start, PROJECT_FILE)
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| start.to_path_buf());
    dir.join(LOCAL_FILE)
}

/// The text of a `hearth.local.yaml` holding `token`.
pub fn local_file_text(token: &str) -> String {
    let body = serde_yaml_ng::to_string(&LocalFile {
        token: Some(token.to_owned()),
    })
    .unwrap_or_else(|_| format!("token: {token:?}\n"));
    format!("# hearth identity token: personal, keep it out of version control.\n{body}")
}

/// Writes `hearth.local.yaml` at `path` holding `token`, readable only by
/// its owner (mode 0600), replacing any previous file.
pub fn write_local_file(path: &Path, token: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        // An existing file keeps its mode on open: tighten it before writing.
        if path.exists() {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict {}", path.display()))?;
        }
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(local_file_text(token).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn files_are_found_walking_upwards() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/c");
        fs::create_dir_all(&deep).unwrap();
        assert_eq!(find_upwards(&deep, "hearth-test-marker.yaml"), None);

        write(&root.path().join("a/hearth.yaml"), "server: http://a\n");
        assert_eq!(
            find_upwards(&deep, PROJECT_FILE),
            Some(root.path().join("a/hearth.yaml"))
        );
        // The nearest one wins.
        write(&root.path().join("a/b/hearth.yaml"), "server: http://b\n");
        assert_eq!(
            find_upwards(&deep, PROJECT_FILE),
            Some(root.path().join("a/b/hearth.yaml"))
        );
        // The start directory itself counts.
        write(&deep.join("hearth.yaml"), "");
        assert_eq!(
            find_upwards(&deep, PROJECT_FILE),
            Some(deep.join("hearth.yaml"))
        );
        // A directory with the name is not a file.
        fs::create_dir_all(root.path().join("x/hearth.local.yaml")).unwrap();
        assert_eq!(find_upwards(&root.path().join("x"), LOCAL_FILE), None);
    }

    #[test]
    fn nested_relative_paths_are_found() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("proj/src");
        fs::create_dir_all(&deep).unwrap();
        write(&root.path().join(".hearth/admin-token"), "  s3cret\n");
        assert_eq!(admin_token(&deep).unwrap(), Some("s3cret".to_owned()));
        write(&root.path().join("proj/.hearth/admin-token"), "\n");
        assert_eq!(admin_token(&deep).unwrap(), None, "empty file: no token");
    }

    #[test]
    fn unknown_fields_name_file_and_field() {
        let root = tempfile::tempdir().unwrap();
        write(
            &root.path().join("hearth.yaml"),
            "server: http://x\nservr: http://y\n",
        );
        let err = resolve(&GlobalArgs::default(), &no_env, root.path()).unwrap_err();
        assert_eq!(err.code, "INVALID_ARGUMENT");
        assert!(err.message.contains("hearth.yaml"), "{}", err.message);
        assert!(
            err.message.contains(&root.path().display().to_string()),
            "{}",
            err.message
        );
        assert!(err.message.contains("`servr`"), "{}", err.message);

        let err =
            parse_file::<LocalFile>(Path::new("/p/hearth.local.yaml"), "server: x\n").unwrap_err();
        assert!(
            err.message
                .starts_with("/p/hearth.local.yaml: unknown field `server`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn empty_and_comment_files_hold_nothing() {
        let p = Path::new("hearth.yaml");
        assert_eq!(
            parse_file::<ProjectFile>(p, "").unwrap(),
            ProjectFile::default()
        );
        assert_eq!(
            parse_file::<ProjectFile>(p, "# nothing yet\n\n").unwrap(),
            ProjectFile::default()
        );
        assert_eq!(
            parse_file::<ProjectFile>(p, "server: http://h:1\nworkspace: web\n").unwrap(),
            ProjectFile {
                server: Some("http://h:1".into()),
                workspace: Some("web".into())
            }
        );
        assert!(parse_file::<ProjectFile>(p, "server: [\n").is_err());
    }

    #[test]
    fn defaults_apply_without_any_source() {
        let root = tempfile::tempdir().unwrap();
        let s = resolve(&GlobalArgs::default(), &no_env, root.path()).unwrap();
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!(s.server_origin, "default");
        assert_eq!(s.token, None);
        assert_eq!(s.workspace, None);
    }

    #[test]
    fn precedence_is_flag_env_file_default() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("proj/sub");
        fs::create_dir_all(&dir).unwrap();
        write(
            &root.path().join("proj/hearth.yaml"),
            "server: http://file:1/\nworkspace: file-ws\n",
        );
        write(
            &root.path().join("proj/hearth.local.yaml"),
            "token: file-token\n",
        );
        write(&root.path().join(".hearth/admin-token"), "admin-token\n");

        let vars: HashMap<&str, &str> = [
            (ENV_SERVER, "http://env:2"),
            (ENV_TOKEN, "env-token"),
            (ENV_WORKSPACE, "env-ws"),
        ]
        .into();
        let env = |k: &str| vars.get(k).map(|v| v.to_string());
        let flags = GlobalArgs {
            server: Some("http://flag:3".into()),
            token: Some("flag-token".into()),
            workspace: Some("flag-ws".into()),
            output: None,
        };

        let s = resolve(&flags, &env, &dir).unwrap();
        assert_eq!(
            (
                s.server.as_str(),
                s.token.as_deref(),
                s.workspace.as_deref()
            ),
            ("http://flag:3", Some("flag-token"), Some("flag-ws"))
        );
        assert_eq!(s.server_origin, "--server");

        let s = resolve(&GlobalArgs::default(), &env, &dir).unwrap();
        assert_eq!(
            (
                s.server.as_str(),
                s.token.as_deref(),
                s.workspace.as_deref()
            ),
            ("http://env:2", Some("env-token"), Some("env-ws"))
        );
        assert_eq!(s.server_origin, ENV_SERVER);

        // Empty variables count as unset.
        let blank = |_: &str| Some(String::new());
        let s = resolve(&GlobalArgs::default(), &blank, &dir).unwrap();
        assert_eq!(
            (
                s.server.as_str(),
                s.token.as_deref(),
                s.workspace.as_deref()
            ),
            ("http://file:1", Some("file-token"), Some("file-ws")),
            "trailing slash trimmed"
        );
        assert!(s.server_origin.ends_with("proj/hearth.yaml"));

        // Without hearth.local.yaml the admin token is the last resort.
        fs::remove_file(root.path().join("proj/hearth.local.yaml")).unwrap();
        let s = resolve(&GlobalArgs::default(), &no_env, &dir).unwrap();
        assert_eq!(s.token.as_deref(), Some("admin-token"));
        // ... but any real source beats it.
        let s = resolve(
            &GlobalArgs::default(),
            &|k: &str| (k == ENV_TOKEN).then(|| "env-token".to_owned()),
            &dir,
        )
        .unwrap();
        assert_eq!(s.token.as_deref(), Some("env-token"));

        fs::remove_file(root.path().join("proj/hearth.yaml")).unwrap();
        let s = resolve(&GlobalArgs::default(), &no_env, &dir).unwrap();
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!(s.workspace, None);
    }

    #[test]
    fn a_local_file_without_token_falls_back() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("hearth.local.yaml"), "# no token yet\n");
        write(&root.path().join(".hearth/admin-token"), "adm");
        let s = resolve(&GlobalArgs::default(), &no_env, root.path()).unwrap();
        assert_eq!(s.token.as_deref(), Some("adm"));
    }

    #[test]
    fn login_writes_next_to_the_project_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("proj/sub");
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(login_target(&dir), dir.join(LOCAL_FILE));
        write(&root.path().join("proj/hearth.yaml"), "");
        let target = login_target(&dir);
        assert_eq!(target, root.path().join("proj").join(LOCAL_FILE));

        write_local_file(&target, "tok: with #specials").unwrap();
        let text = fs::read_to_string(&target).unwrap();
        let parsed: LocalFile = parse_file(&target, &text).unwrap();
        assert_eq!(parsed.token.as_deref(), Some("tok: with #specials"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            // Overwriting a file that was readable by others tightens it.
            fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
            write_local_file(&target, "second").unwrap();
            let mode = fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let s = resolve(&GlobalArgs::default(), &no_env, &dir).unwrap();
        assert_eq!(s.token.as_deref(), Some("second"));
    }
}
