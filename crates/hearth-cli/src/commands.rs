//! Runs one parsed command: checks the user's input, resolves the settings,
//! makes the API call(s) through [`Client`], and renders the answer with
//! [`crate::output`]. What is printed is returned, not printed, so that
//! [`crate::run`] alone touches the process's stdout, stderr and exit code.

use crate::client::Client;
use crate::config::{self, ENV_TOKEN};
use crate::error::CliError;
use crate::output::{self, Items, Resource, ResourceList, WriteAnswer};
use crate::patch::merge_patch;
use crate::{AuthCommand, Command, GlobalArgs, IdentityCommand, TenantCommand};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::{Kind, parse_duration};
use serde_json::{Map, Value, json};
use std::path::Path;
use std::str::FromStr;

/// What a successful command prints.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
}

impl Printed {
    fn out(stdout: String) -> Printed {
        Printed {
            stdout,
            stderr: String::new(),
        }
    }
}

/// The note printed with every newly issued token.
const TOKEN_ONCE: &str = "The token is shown only once: store it now.\n";

/// The process's view of the world, passed in so commands stay testable.
pub struct Context<'a> {
    pub cwd: &'a Path,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub read_stdin: &'a dyn Fn() -> anyhow::Result<String>,
}

/// Parses a kind as `hearth get KIND` names it (aliases included).
pub fn parse_kind(text: &str) -> Result<Kind, CliError> {
    Kind::from_str(text).map_err(CliError::from)
}

/// Checks that stdin held a document for `hearth set`.
pub fn stdin_document(text: String) -> Result<String, CliError> {
    if text.trim().is_empty() {
        return Err(CliError::invalid(
            "no document on stdin: pipe the resource as YAML, e.g. echo 'max_vms: 50' | hearth set pool-config default",
        ));
    }
    Ok(text)
}

/// Checks an `--expires-in` duration (`90s`, `15m`, `1h30m`, `2d`).
pub fn check_duration(text: &str) -> Result<(), CliError> {
    match parse_duration(text) {
        Some(secs) if secs > 0 => Ok(()),
        _ => Err(CliError::invalid(format!(
            "invalid --expires-in {text:?}: use a duration such as 90s, 15m, 1h30m or 2d"
        ))),
    }
}

/// The body of `POST /v1/identities`, after checking role, kind and
/// duration locally.
pub fn identity_body(
    name: &str,
    role: &str,
    kind: &str,
    expires_in: Option<&str>,
) -> Result<Value, CliError> {
    let role = Role::from_str(role)?;
    let kind = IdentityKind::from_str(kind)?;
    let mut body = Map::new();
    body.insert("name".into(), json!(name));
    body.insert("kind".into(), json!(kind.as_str()));
    body.insert("role".into(), json!(role.as_str()));
    if let Some(d) = expires_in {
        check_duration(d)?;
        body.insert("expires_in".into(), json!(d));
    }
    Ok(Value::Object(body))
}

/// Runs `command`.
pub fn execute(
    global: &GlobalArgs,
    command: Command,
    ctx: &Context<'_>,
) -> anyhow::Result<Printed> {
    let format = global.output;
    let connect = || -> Result<Client, CliError> {
        let settings = config::resolve(global, ctx.env, ctx.cwd)?;
        Client::from_settings(&settings)
    };
    let printed = match command {
        Command::Get(args) => {
            let kind = parse_kind(&args.kind)?;
            let client = connect()?;
            match args.name {
                Some(name) => {
                    let r: Resource = client.get(&[kind.path_segment(), &name])?;
                    Printed::out(output::render_resource(kind, &r, format))
                }
                None => {
                    let list: ResourceList = client.get(&[kind.path_segment()])?;
                    Printed::out(output::render_resource_list(kind, &list.items, format))
                }
            }
        }
        Command::Set(args) => {
            let kind = parse_kind(&args.kind)?;
            let document = stdin_document((ctx.read_stdin)()?)?;
            let answer: WriteAnswer =
                connect()?.put_yaml(&[kind.path_segment(), &args.name], document)?;
            Printed::out(match format {
                Some(_) => output::render_resource(kind, &answer.resource, format),
                None => output::set_message(kind, &args.name, &answer.outcome),
            })
        }
        Command::Patch(args) => {
            let kind = parse_kind(&args.kind)?;
            let patch = merge_patch(&args.set)?;
            let answer: WriteAnswer =
                connect()?.patch_merge(&[kind.path_segment(), &args.name], &patch)?;
            Printed::out(match format {
                Some(_) => output::render_resource(kind, &answer.resource, format),
                None => output::patch_message(kind, &args.name, &answer.outcome),
            })
        }
        Command::Delete(args) => {
            let kind = parse_kind(&args.kind)?;
            let deleted: Resource = connect()?.delete(&[kind.path_segment(), &args.name])?;
            Printed::out(match format {
                Some(_) => output::render_resource(kind, &deleted, format),
                None => output::deleted_message(kind, &args.name),
            })
        }
        Command::Auth(AuthCommand::Login) => login(global, ctx)?,
        Command::Auth(AuthCommand::Whoami) => {
            let answer: Value = connect()?.get(&["whoami"])?;
            Printed::out(output::render_whoami(&answer, format))
        }
        Command::Tenant(TenantCommand::Create { name, admin }) => {
            let answer: Value =
                connect()?.post_json(&["tenants"], &json!({"name": name, "admin": admin}))?;
            Printed {
                stdout: output::render_record(&answer, format),
                stderr: TOKEN_ONCE.into(),
            }
        }
        Command::Tenant(TenantCommand::List) => {
            let list: Items = connect()?.get(&["tenants"])?;
            Printed::out(output::render_items(
                &list.items,
                output::TENANT_COLUMNS,
                format,
                "No tenants found.",
            ))
        }
        Command::Identity(IdentityCommand::Create {
            name,
            role,
            kind,
            expires_in,
        }) => {
            let body = identity_body(&name, &role, &kind, expires_in.as_deref())?;
            let answer: Value = connect()?.post_json(&["identities"], &body)?;
            Printed {
                stdout: output::render_record(&answer, format),
                stderr: TOKEN_ONCE.into(),
            }
        }
        Command::Identity(IdentityCommand::List) => {
            let list: Items = connect()?.get(&["identities"])?;
            Printed::out(output::render_items(
                &list.items,
                output::IDENTITY_COLUMNS,
                format,
                "No identities found.",
            ))
        }
        Command::Identity(IdentityCommand::Delete { name }) => {
            let answer: Value = connect()?.delete(&["identities", &name])?;
            Printed::out(match format {
                Some(_) => output::render_record(&answer, format),
                None => output::deleted_message("identity", &name),
            })
        }
        Command::Identity(IdentityCommand::Token { name, expires_in }) => {
            let mut body = Map::new();
            if let Some(d) = expires_in {
                check_duration(&d)?;
                body.insert("expires_in".into(), json!(d));
            }
            let answer: Value =
                connect()?.post_json(&["identities", &name, "tokens"], &Value::Object(body))?;
            Printed {
                stdout: output::render_record(&answer, format),
                stderr: TOKEN_ONCE.into(),
            }
        }
    };
    Ok(printed)
}

/// `hearth auth login`: checks the token against the server, then saves it
/// to `hearth.local.yaml`.
fn login(global: &GlobalArgs, ctx: &Context<'_>) -> anyhow::Result<Printed> {
    let token = global
        .token
        .clone()
        .or_else(|| (ctx.env)(ENV_TOKEN))
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().to_owned())
        .ok_or_else(|| {
            CliError::invalid("auth login needs a token: hearth auth login --token TOKEN")
        })?;
    let settings = config::resolve(global, ctx.env, ctx.cwd)?;
    let client = Client::new(
        &settings.server,
        &settings.server_origin,
        Some(token.clone()),
    )?;
    let who: Value = client.get(&["whoami"])?;
    let target = config::login_target(ctx.cwd);
    config::write_local_file(&target, &token)?;
    let field = |key: &str| output::cell(who.get(key));
    Ok(Printed::out(format!(
        "Logged in to {} as {} ({}) in tenant {}; token saved to {}\n",
        client.server(),
        field("identity"),
        field("role"),
        field("tenant"),
        target.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_use_the_core_aliases_and_errors() {
        assert_eq!(parse_kind("ws").unwrap(), Kind::Workspace);
        assert_eq!(parse_kind("pool-config").unwrap(), Kind::PoolConfig);
        let e = parse_kind("vm").unwrap_err();
        assert_eq!(
            e.to_string(),
            "INVALID_ARGUMENT: unknown kind \"vm\": expected one of pool-config, workspace, environment, image"
        );
    }

    #[test]
    fn set_needs_a_document() {
        for empty in ["", "\n", "  \n\t"] {
            assert_eq!(
                stdin_document(empty.into()).unwrap_err().to_string(),
                "INVALID_ARGUMENT: no document on stdin: pipe the resource as YAML, e.g. echo 'max_vms: 50' | hearth set pool-config default"
            );
        }
        assert_eq!(
            stdin_document("max_vms: 5\n".into()).unwrap(),
            "max_vms: 5\n"
        );
    }

    #[test]
    fn identity_bodies_are_checked_locally() {
        assert_eq!(
            identity_body("ci", "developer", "service", Some("24h")).unwrap(),
            json!({"name": "ci", "kind": "service", "role": "developer", "expires_in": "24h"})
        );
        assert_eq!(
            identity_body("bob", "viewer", "developer", None).unwrap(),
            json!({"name": "bob", "kind": "developer", "role": "viewer"})
        );
        let e = identity_body("x", "root", "developer", None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("INVALID_ARGUMENT: unknown role \"root\""),
            "{e}"
        );
        let e = identity_body("x", "admin", "robot", None).unwrap_err();
        assert!(
            e.message.starts_with("unknown identity kind \"robot\""),
            "{e}"
        );
        let e = identity_body("x", "admin", "service", Some("soon")).unwrap_err();
        assert!(
            e.message.starts_with("invalid --expires-in \"soon\""),
            "{e}"
        );
        assert!(check_duration("0s").is_err());
        assert!(check_duration("1h30m").is_ok());
    }

    #[test]
    fn local_errors_come_before_any_connection() {
        // The server URL is unusable: reaching it would fail differently.
        let env = |k: &str| (k == config::ENV_SERVER).then(|| "not a url".to_owned());
        let stdin = || Ok(String::new());
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context {
            cwd: dir.path(),
            env: &env,
            read_stdin: &stdin,
        };
        let global = GlobalArgs::default();
        let run = |command: Command| {
            crate::error::error_line(&execute(&global, command, &ctx).unwrap_err())
        };
        let kind_name = |kind: &str| crate::KindName {
            kind: kind.into(),
            name: "default".into(),
        };
        assert!(run(Command::Set(kind_name("vm"))).contains("unknown kind \"vm\""));
        assert!(run(Command::Set(kind_name("pool-config"))).contains("no document on stdin"));
        let patch = crate::PatchArgs {
            kind: "pool-config".into(),
            name: "default".into(),
            set: vec!["max_vms".into()],
        };
        assert_eq!(
            run(Command::Patch(patch)),
            "INVALID_ARGUMENT: --set expects key=value, got \"max_vms\""
        );
        assert!(run(Command::Auth(AuthCommand::Login)).contains("auth login needs a token"));
        // With valid input, the unusable URL is what fails.
        let get = crate::GetArgs {
            kind: "ws".into(),
            name: None,
        };
        assert!(
            run(Command::Get(get))
                .contains("invalid server URL \"not a url\" (from HEARTH_SERVER)")
        );
    }
}
