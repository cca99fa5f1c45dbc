//! Where the CLI's settings come from, kubectl style.
//!
//! This module owns the discovery of `hearth.yaml` (the project file:
//! `server`, `workspace`), `hearth.local.yaml` (the local file: identity
//! tokens, each bound to the server it was issued for and maybe that
//! server's CA, never committed) and `.hearth/admin-token` with
//! `.hearth/server-url` and `.hearth/tls/ca.pem` (what `hearth server`
//! writes into its default data dir), each found by walking from a start
//! directory upwards; and the precedence that merges them with flags and
//! environment variables: flag > env > file > default.
//!
//! Tokens are bound to servers the way kubeconfig binds credentials to
//! clusters: a token from a file goes only to the server it is recorded
//! for, and a token from `--token`/`HEARTH_TOKEN` only to a server named by
//! `--server`/`HEARTH_SERVER` (or the default), never to one a project file
//! names — a committed `hearth.yaml` may point anywhere. A mismatch is an
//! error before anything connects.
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
/// The URL `hearth server` writes beside its admin token: the token's server.
pub const SERVER_URL_FILE: &str = ".hearth/server-url";
/// The CA of a local server's own TLS certificates.
pub const LOCAL_CA_FILE: &str = ".hearth/tls/ca.pem";
/// The server used when nothing else names one.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7070";
/// Environment variable naming the CA certificate (PEM) to trust.
pub const ENV_CA: &str = "HEARTH_CA";

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

/// The contents of `hearth.local.yaml`:
///
/// ```yaml
/// credentials:
///   - server: https://hearth.example:7070
///     ca: /home/me/hearth-ca.pem   # optional: else the system's roots
///     token: hth_…
/// ```
///
/// A bare `token:` (written by older versions) is still read; it is bound
/// to the default local server ([`DEFAULT_SERVER`]) only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFile {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<Credential>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A token and the server it was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub server: String,
    /// The CA certificate (PEM) that server's certificate is checked with;
    /// relative to the file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    pub token: String,
}

/// The settings a command runs with, after precedence is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Server base URL, without a trailing `/`.
    pub server: String,
    /// Where `server` came from (`--server`, `HEARTH_SERVER`, a file path or
    /// `default`), for error messages.
    pub server_origin: String,
    /// The bearer token, if any source gave one (bound to `server`).
    pub token: Option<String>,
    /// The CA certificate file to check the server with (`None`: the
    /// system's roots).
    pub ca: Option<PathBuf>,
    pub workspace: Option<String>,
}

/// Whether two server URLs name the same server: scheme, host, port
/// (default ports filled in) and path (without trailing `/`).
pub fn same_server(a: &str, b: &str) -> bool {
    fn key(url: &str) -> Option<(String, String, u16, String)> {
        let url = reqwest::Url::parse(url.trim()).ok()?;
        Some((
            url.scheme().to_owned(),
            url.host_str()?.to_ascii_lowercase(),
            url.port_or_known_default()?,
            url.path().trim_end_matches('/').to_owned(),
        ))
    }
    match (key(a), key(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A token found in a file, with the server it is bound to.
struct Candidate {
    token: String,
    server: String,
    ca: Option<PathBuf>,
    /// The file it came from, for messages.
    file: PathBuf,
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

/// The server to talk to and where it came from: flag > env >
/// `hearth.yaml` > default (without a trailing `/`).
pub fn resolve_server(
    flags: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
    start: &Path,
) -> Result<(String, String), CliError> {
    let project = load_nearest::<ProjectFile>(start, PROJECT_FILE)?;
    let (server, origin) = if let Some(s) = non_empty(flags.server.clone()) {
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
    Ok((server.trim().trim_end_matches('/').to_owned(), origin))
}

/// The CA named by `--ca` or `HEARTH_CA`.
fn explicit_ca(flags: &GlobalArgs, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    flags
        .ca
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
        .or_else(|| non_empty(env(ENV_CA)).map(PathBuf::from))
}

/// The URL a local server's data dir says it serves at (`.hearth/server-url`
/// in `dir`), or the default server when the file is absent (older servers).
fn data_dir_server(dir: &Path) -> String {
    fs::read_to_string(dir.join(SERVER_URL_FILE))
        .ok()
        .and_then(|t| non_empty(Some(t.trim().to_owned())))
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned())
}

/// The nearest `.hearth/tls/ca.pem` above `start` whose server is `server`.
pub fn local_ca(start: &Path, server: &str) -> Option<PathBuf> {
    start.ancestors().find_map(|dir| {
        let ca = dir.join(LOCAL_CA_FILE);
        (ca.is_file() && same_server(&data_dir_server(dir), server)).then_some(ca)
    })
}

/// Applies the precedence flag > env > file > default for every setting,
/// reading the files found upwards from `start`. `env` looks up an
/// environment variable. The token is the first of: `--token`,
/// `HEARTH_TOKEN` (only when the server is not one a project file names),
/// the `hearth.local.yaml` credential for the server, `.hearth/admin-token`
/// when its server is this one. A file's token for another server is an
/// error, so it is never sent elsewhere.
pub fn resolve(
    flags: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
    start: &Path,
) -> Result<Settings, CliError> {
    let project = load_nearest::<ProjectFile>(start, PROJECT_FILE)?;
    let local = load_nearest::<LocalFile>(start, LOCAL_FILE)?;
    let (server, server_origin) = resolve_server(flags, env, start)?;
    let explicit_ca = explicit_ca(flags, env);

    let explicit_token = match non_empty(flags.token.clone()) {
        Some(t) => Some((t, "--token")),
        None => non_empty(env(ENV_TOKEN)).map(|t| (t, ENV_TOKEN)),
    };
    let (token, bound_ca) = if let Some((token, from)) = explicit_token {
        if !matches!(server_origin.as_str(), "--server" | ENV_SERVER | "default") {
            return Err(CliError::new(
                hearth_core::ErrorCode::FailedPrecondition,
                format!(
                    "refusing to send the token of {from} to {server}, which {server_origin} names: \
                     a project file may point anywhere. Name the server yourself (--server or \
                     {ENV_SERVER}), or log in to it once: hearth auth login --server {server} --token TOKEN"
                ),
            ));
        }
        (Some(token), None)
    } else {
        let mut candidates = Vec::new();
        if let Some((path, file)) = &local {
            let dir = path.parent().unwrap_or(Path::new("."));
            for c in &file.credentials {
                candidates.push(Candidate {
                    token: c.token.clone(),
                    server: c.server.clone(),
                    ca: c.ca.as_ref().map(|ca| dir.join(ca)),
                    file: path.clone(),
                });
            }
            if let Some(token) = non_empty(file.token.clone()) {
                candidates.push(Candidate {
                    token,
                    server: DEFAULT_SERVER.to_owned(),
                    ca: None,
                    file: path.clone(),
                });
            }
        }
        if let Some(path) = find_upwards(start, ADMIN_TOKEN_FILE) {
            let dir = path
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."));
            if let Some(token) = admin_token(start)? {
                let ca = dir.join(LOCAL_CA_FILE);
                candidates.push(Candidate {
                    token,
                    server: data_dir_server(dir),
                    ca: ca.is_file().then_some(ca),
                    file: path,
                });
            }
        }
        match candidates.iter().find(|c| same_server(&c.server, &server)) {
            Some(c) => (Some(c.token.clone()), c.ca.clone()),
            None if candidates.is_empty() => (None, None),
            None => return Err(refusal(&server, &server_origin, &candidates)),
        }
    };

    let ca = explicit_ca
        .or(bound_ca)
        .or_else(|| local_ca(start, &server));
    let workspace = workspace_from_flag_or_env(flags, env)
        .or_else(|| project.and_then(|(_, p)| non_empty(p.workspace)));

    Ok(Settings {
        server,
        server_origin,
        token: token.map(|t| t.trim().to_owned()),
        ca,
        workspace,
    })
}

/// The error for a server no token on file is bound to.
fn refusal(server: &str, origin: &str, candidates: &[Candidate]) -> CliError {
    let held: Vec<String> = candidates
        .iter()
        .map(|c| format!("{} (in {})", c.server, c.file.display()))
        .collect();
    CliError::new(
        hearth_core::ErrorCode::FailedPrecondition,
        format!(
            "refusing to send a token to {server} (from {origin}): the tokens on file are bound to \
             {}; a token goes only to the server it was issued for. To use {server}, log in to it: \
             hearth auth login --server {server} --token TOKEN",
            held.join(", ")
        ),
    )
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

/// `file` with `credential` recorded: it replaces the one for the same
/// server, others are kept.
pub fn with_credential(mut file: LocalFile, credential: Credential) -> LocalFile {
    file.credentials
        .retain(|c| !same_server(&c.server, &credential.server));
    file.credentials.push(credential);
    file
}

/// Reads `hearth.local.yaml` at `path` (an absent file holds nothing).
pub fn read_local_file(path: &Path) -> Result<LocalFile, CliError> {
    match fs::read_to_string(path) {
        Ok(text) => parse_file(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LocalFile::default()),
        Err(e) => Err(CliError::invalid(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// The text of a `hearth.local.yaml` holding `file`.
pub fn local_file_text(file: &LocalFile) -> String {
    let body = serde_yaml_ng::to_string(file).unwrap_or_default();
    format!(
        "# hearth identity tokens, each sent only to its server: personal, keep it out of version control.\n{body}"
    )
}

/// Writes `hearth.local.yaml` at `path` holding `file`, readable only by
/// its owner (mode 0600), replacing any previous file.
pub fn write_local_file(path: &Path, file: &LocalFile) -> anyhow::Result<()> {
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
    let mut out = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    out.write_all(local_file_text(file).as_bytes())
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
            "credentials:\n- server: http://file:1\n  token: file-token\n",
        );
        write(&root.path().join(".hearth/admin-token"), "admin-token\n");
        write(&root.path().join(".hearth/server-url"), "http://file:1\n");

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
            ca: None,
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
            &|k: &str| match k {
                ENV_TOKEN => Some("env-token".to_owned()),
                ENV_SERVER => Some("http://file:1".to_owned()),
                _ => None,
            },
            &dir,
        )
        .unwrap();
        assert_eq!(s.token.as_deref(), Some("env-token"));

        fs::remove_file(root.path().join("proj/hearth.yaml")).unwrap();
        fs::remove_file(root.path().join(".hearth/admin-token")).unwrap();
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

        let credential = |server: &str, token: &str| Credential {
            server: server.into(),
            ca: None,
            token: token.into(),
        };
        let file = with_credential(
            LocalFile::default(),
            credential(DEFAULT_SERVER, "tok: with #specials"),
        );
        write_local_file(&target, &file).unwrap();
        let text = fs::read_to_string(&target).unwrap();
        let parsed: LocalFile = parse_file(&target, &text).unwrap();
        assert_eq!(parsed.credentials[0].token, "tok: with #specials");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            // Overwriting a file that was readable by others tightens it.
            fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
            let file = with_credential(parsed, credential("https://127.0.0.1:7070/", "second"));
            assert_eq!(
                file.credentials.len(),
                1,
                "the same server's entry is replaced"
            );
            write_local_file(&target, &file).unwrap();
            let mode = fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let s = resolve(&GlobalArgs::default(), &no_env, &dir).unwrap();
        assert_eq!(s.token.as_deref(), Some("second"));
    }

    #[test]
    fn servers_compare_by_scheme_host_port_and_path() {
        assert!(same_server("https://H:443/", "https://h"));
        assert!(same_server(
            "https://127.0.0.1:7070",
            "https://127.0.0.1:7070/"
        ));
        assert!(!same_server(
            "https://127.0.0.1:7070",
            "http://127.0.0.1:7070"
        ));
        assert!(!same_server(
            "https://127.0.0.1:7070",
            "https://127.0.0.1:7071"
        ));
        assert!(!same_server("https://h/a", "https://h/b"));
        assert!(!same_server("not a url", "not a url"));
    }

    #[test]
    fn a_file_token_goes_only_to_its_server() {
        let root = tempfile::tempdir().unwrap();
        write(
            &root.path().join("hearth.local.yaml"),
            "credentials:\n- server: https://mine:7070\n  ca: ca.pem\n  token: mine-token\n\
             - server: https://other:7070\n  token: other-token\n",
        );
        write(
            &root.path().join("hearth.yaml"),
            "server: https://mine:7070\n",
        );
        let s = resolve(&GlobalArgs::default(), &no_env, root.path()).unwrap();
        assert_eq!(s.token.as_deref(), Some("mine-token"));
        assert_eq!(
            s.ca,
            Some(root.path().join("ca.pem")),
            "relative to the file"
        );

        let s = resolve(
            &GlobalArgs {
                server: Some("https://other:7070/".into()),
                ..Default::default()
            },
            &no_env,
            root.path(),
        )
        .unwrap();
        assert_eq!(s.token.as_deref(), Some("other-token"));
        assert_eq!(s.ca, None);

        // A committed hearth.yaml naming another server gets no token.
        write(
            &root.path().join("hearth.yaml"),
            "server: https://evil:7070\n",
        );
        let err = resolve(&GlobalArgs::default(), &no_env, root.path()).unwrap_err();
        assert_eq!(err.code, "FAILED_PRECONDITION");
        assert!(
            err.message
                .starts_with("refusing to send a token to https://evil:7070 (from "),
            "{}",
            err.message
        );
        assert!(err.message.contains("https://mine:7070"), "{}", err.message);
        assert!(
            err.message
                .contains("hearth auth login --server https://evil:7070 --token TOKEN"),
            "{}",
            err.message
        );
        assert!(!err.message.contains("mine-token"), "{}", err.message);
    }

    #[test]
    fn an_explicit_token_never_goes_to_a_server_a_project_file_names() {
        let root = tempfile::tempdir().unwrap();
        write(
            &root.path().join("hearth.yaml"),
            "server: https://evil:7070\n",
        );
        let env = |k: &str| (k == ENV_TOKEN).then(|| "env-token".to_owned());
        let err = resolve(&GlobalArgs::default(), &env, root.path()).unwrap_err();
        assert_eq!(err.code, "FAILED_PRECONDITION");
        assert!(
            err.message.starts_with(
                "refusing to send the token of HEARTH_TOKEN to https://evil:7070, which "
            ),
            "{}",
            err.message
        );
        // Naming the server yourself is fine.
        let env = |k: &str| match k {
            ENV_TOKEN => Some("env-token".to_owned()),
            ENV_SERVER => Some("https://mine:1".to_owned()),
            _ => None,
        };
        let s = resolve(&GlobalArgs::default(), &env, root.path()).unwrap();
        assert_eq!(
            (s.server.as_str(), s.token.as_deref()),
            ("https://mine:1", Some("env-token"))
        );
    }

    #[test]
    fn a_bare_token_of_an_older_file_is_bound_to_the_default_server() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("hearth.local.yaml"), "token: old\n");
        let s = resolve(&GlobalArgs::default(), &no_env, root.path()).unwrap();
        assert_eq!(
            (s.server.as_str(), s.token.as_deref()),
            (DEFAULT_SERVER, Some("old"))
        );
        write(
            &root.path().join("hearth.yaml"),
            "server: https://elsewhere\n",
        );
        let err = resolve(&GlobalArgs::default(), &no_env, root.path()).unwrap_err();
        assert!(err.message.contains(DEFAULT_SERVER), "{}", err.message);
    }

    #[test]
    fn the_admin_token_and_local_ca_are_bound_to_their_data_dirs_server() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join(".hearth/admin-token"), "adm\n");
        write(
            &root.path().join(".hearth/server-url"),
            "https://127.0.0.1:9999\n",
        );
        write(&root.path().join(".hearth/tls/ca.pem"), "pem");
        let flags = GlobalArgs {
            server: Some("https://127.0.0.1:9999".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &no_env, root.path()).unwrap();
        assert_eq!(s.token.as_deref(), Some("adm"));
        assert_eq!(s.ca, Some(root.path().join(".hearth/tls/ca.pem")));
        // The default server is not that one: no token, no CA of that dir.
        let err = resolve(&GlobalArgs::default(), &no_env, root.path()).unwrap_err();
        assert!(
            err.message.contains("https://127.0.0.1:9999"),
            "{}",
            err.message
        );
        // --ca beats the discovered one.
        let s = resolve(
            &GlobalArgs {
                ca: Some("/x/ca.pem".into()),
                ..flags
            },
            &no_env,
            root.path(),
        )
        .unwrap();
        assert_eq!(s.ca, Some(PathBuf::from("/x/ca.pem")));
    }
}
