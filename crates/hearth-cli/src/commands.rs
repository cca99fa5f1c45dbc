//! Runs one parsed command: checks the user's input, resolves the settings,
//! makes the API call(s) through [`Client`], and renders the answer with
//! [`crate::output`]. What is printed is returned, not printed, so that
//! [`crate::run`] alone touches the process's stdout, stderr and exit code;
//! the one exception is a progress line printed before a slow request
//! ([`Context::progress`]).
//!
//! The decisions that need no server are pure functions here (request
//! bodies, the pool commands' agent-VM guard, the `spawn --wait` and
//! `warm-pool test --watch` loops with their clock passed in, the exit
//! status of `agents exec`). `warm-pool test --watch` also prints while it
//! waits, through [`Context::progress`]: the steps as [`Live`] draws them.

use crate::client::{Client, DEFAULT_TIMEOUT};
use crate::config::{self, ENV_TOKEN, Settings};
use crate::error::CliError;
use crate::live::{self, Live};
use crate::output::{
    self, AgentAction, AgentView, ExecAnswer, InstanceView, Items, OutputFormat, Resource,
    ResourceList, WriteAnswer,
};
use crate::patch::merge_patch;
use crate::{
    AgentsCommand, AuthCommand, BuildsCommand, Command, GlobalArgs, IdentityCommand, ImageCommand,
    InstancesCommand, NodeCommand, PoolCommand, SpawnArgs, TenantCommand, WarmPoolCommand,
    WarmPoolSetArgs, WebhookCommand,
};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::{Kind, parse_duration};
use serde_json::{Map, Value, json};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

/// What a finished command prints, and the exit code it ends with.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
    /// 0 unless the command reports another status (an agent's or a remote
    /// command's exit code, a refusal).
    pub exit_code: i32,
}

impl Printed {
    fn out(stdout: String) -> Printed {
        Printed {
            stdout,
            ..Printed::default()
        }
    }
}

/// Set (non-empty) inside an agent VM: its VM id.
pub const ENV_VM_ID: &str = "HEARTH_VM_ID";
/// Present inside an agent VM: holds its VM id.
pub const VM_ID_FILE: &str = "/run/hearth/vm-id";
/// What a pool command prints (alone, on stderr, exit 1) inside an agent VM.
pub const POOL_ON_VM: &str = "pool commands are not supported on VMs";

/// Whether the CLI runs inside an agent VM, from `HEARTH_VM_ID` and whether
/// [`VM_ID_FILE`] exists. Any non-empty value counts, even blanks: the
/// guard errs on the side of refusing.
pub fn on_agent_vm(vm_id_env: Option<&str>, vm_id_file_exists: bool) -> bool {
    vm_id_env.is_some_and(|v| !v.is_empty()) || vm_id_file_exists
}

/// The error of a command that needs a workspace and has none.
pub fn require_workspace(workspace: Option<String>) -> Result<String, CliError> {
    workspace.ok_or_else(|| {
        CliError::invalid("no workspace: pass --workspace or set workspace in hearth.yaml")
    })
}

/// The note printed with every newly issued token.
const TOKEN_ONCE: &str = "The token is shown only once: store it now.\n";
/// What `webhook create` tells on stderr.
const SECRET_ONCE: &str =
    "The secret is shown only once: store it where the receiver verifies signatures.\n";

/// The process's view of the world, passed in so commands stay testable.
pub struct Context<'a> {
    pub cwd: &'a Path,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub read_stdin: &'a dyn Fn() -> anyhow::Result<String>,
    /// Where an agent VM keeps its id ([`VM_ID_FILE`] in the real process).
    pub vm_id_file: &'a Path,
    /// Prints a line on stdout at once, before a request is sent (and the
    /// steps while `warm-pool test --watch` waits).
    pub progress: &'a dyn Fn(&str),
    /// Whether stdout is a terminal (`warm-pool test --watch` then redraws
    /// its list of steps in place).
    pub stdout_is_tty: bool,
    /// Whether stderr is a terminal (progress bars are then drawn on it:
    /// [`crate::progress`]).
    pub stderr_is_tty: bool,
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

/// Checks an `--expires-in` duration (`90s`, `15m`, `1h30m`, `2d`; at
/// most 366d, as the server checks it).
pub fn check_duration(text: &str) -> Result<(), CliError> {
    hearth_core::rbac::parse_expires_in("--expires-in", text)?;
    Ok(())
}

/// Reads the value of a duration flag (`90s`, `15m`, `1h30m`, `2d`; more
/// than zero).
pub fn duration_flag(flag: &str, text: &str) -> Result<Duration, CliError> {
    match parse_duration(text) {
        Some(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(CliError::invalid(format!(
            "invalid {flag} {text:?}: use a duration such as 90s, 15m, 1h30m or 2d"
        ))),
    }
}

/// The workspace a flush narrows to: `resolved`, the one `--workspace`,
/// `HEARTH_WORKSPACE` or hearth.yaml names (the flush page: `--workspace`
/// "overrides the value from" the project file); with none it is the whole
/// pool. A nuke is tenant-wide, so neither the ambient `HEARTH_WORKSPACE`
/// nor hearth.yaml applies to it; an explicit `--workspace` is sent, for
/// the server to refuse.
pub fn flush_workspace(global: &GlobalArgs, resolved: Option<&str>, nuke: bool) -> Option<String> {
    if nuke {
        config::workspace_from_flag_or_env(global, &|_| None)
    } else {
        resolved.map(str::to_owned)
    }
}

/// The body of `POST /v1/pool/flush`.
pub fn flush_body(workspace: Option<&str>, nuke: bool) -> Value {
    json!({"workspace": workspace, "nuke": nuke})
}

/// The body of `POST /v1/agents`.
pub fn spawn_body(
    workspace: &str,
    command: Option<&str>,
    parent: Option<&str>,
    on_idle: Option<&str>,
) -> Value {
    json!({"workspace": workspace, "command": command, "parent": parent, "on_idle": on_idle})
}

/// The body of `POST /v1/agents/{id}/exec`. The API takes one command line
/// (run by the VM's `/bin/sh -c`), so the arguments are joined with shell
/// quoting: each reaches the command as the one argument it was here
/// (`-- sh -c 'echo alive'` runs `sh` with `-c` and `echo alive`).
pub fn exec_body(command: &[String], timeout: Option<&str>) -> Result<Value, CliError> {
    let line = shlex::try_join(command.iter().map(String::as_str)).map_err(|_| {
        CliError::invalid("the command holds a NUL character, which no shell argument can carry")
    })?;
    Ok(json!({"command": line, "timeout": timeout}))
}

/// The body of `POST /v1/agents/{id}/finish`.
pub fn finish_body(failed: bool, exit_code: Option<i32>, error: Option<&str>) -> Value {
    json!({"status": finish_status(failed), "exit_code": exit_code, "error": error})
}

/// `completed`, or `failed` with `--failed`.
pub fn finish_status(failed: bool) -> &'static str {
    if failed { "failed" } else { "completed" }
}

/// How often `hearth spawn --wait` asks for the agent.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Whether `hearth spawn --wait` is done waiting for `agent`: once it has
/// left `queued`/`provisioning`, and, for an agent with a command, once it
/// is over.
pub fn wait_is_over(agent: &AgentView, has_command: bool) -> bool {
    if has_command {
        agent.is_terminal()
    } else {
        !agent.is_starting()
    }
}

/// The clock and the server as `hearth spawn --wait` sees them, so that the
/// loop runs in tests without either.
pub struct Waiting<'a> {
    /// Fetches the agent again (`GET /v1/agents/{id}`).
    pub fetch: &'a mut dyn FnMut() -> Result<Value, CliError>,
    pub sleep: &'a mut dyn FnMut(Duration),
    /// Time since the wait began.
    pub elapsed: &'a dyn Fn() -> Duration,
}

/// Polls every [`POLL_INTERVAL`] from `agent` (the answer to the spawn)
/// until [`wait_is_over`]; after `timeout` (spelled `timeout_text` in the
/// message) gives up with `DEADLINE_EXCEEDED: agent <id> is still <phase>
/// after <timeout>`. Returns the last answer.
pub fn wait_for_agent(
    mut agent: Value,
    has_command: bool,
    timeout: Duration,
    timeout_text: &str,
    waiting: Waiting<'_>,
) -> Result<(Value, AgentView), CliError> {
    const WHAT: &str = "GET /v1/agents/{id}";
    loop {
        let view = AgentView::from_answer(WHAT, &agent)?;
        if wait_is_over(&view, has_command) {
            return Ok((agent, view));
        }
        let elapsed = (waiting.elapsed)();
        if elapsed >= timeout {
            return Err(CliError::deadline_exceeded(format!(
                "agent {} is still {} after {timeout_text}",
                view.id, view.phase
            )));
        }
        (waiting.sleep)(POLL_INTERVAL.min(timeout - elapsed));
        agent = (waiting.fetch)()?;
    }
}

/// What `hearth spawn` prints for `agent` (`answer` as the server sent it).
/// A finished agent that was waited for also sets the exit code
/// ([`AgentView::exit_status`]), and one with a command prints its output
/// before the line.
pub fn spawn_printed(
    answer: &Value,
    agent: &AgentView,
    waited: bool,
    has_command: bool,
    format: Option<OutputFormat>,
) -> Printed {
    let finished = waited && agent.is_terminal();
    let stdout = match format {
        Some(f @ (OutputFormat::Yaml | OutputFormat::Json)) => output::render_value(answer, f),
        _ if finished && has_command => {
            output::ending_in_newline(agent.output.as_deref().unwrap_or(""))
                + &output::agent_line(agent)
        }
        _ => output::agent_line(agent),
    };
    Printed {
        stdout,
        stderr: String::new(),
        exit_code: if finished { agent.exit_status() } else { 0 },
    }
}

/// The exit code `hearth agents exec` ends with when the command timed out.
pub const EXEC_TIMED_OUT: i32 = 124;

/// What `hearth agents exec` prints: the command's stdout and stderr as
/// they were, and its exit code; a command that timed out adds
/// `DEADLINE_EXCEEDED: command timed out` on stderr and exits 124.
/// `-o yaml|json` prints the answer instead, with the same exit code.
pub fn exec_printed(answer: &Value, format: Option<OutputFormat>) -> Result<Printed, CliError> {
    let exec: ExecAnswer = output::parse_answer("POST /v1/agents/{id}/exec", answer)?;
    let exit_code = if exec.timed_out {
        EXEC_TIMED_OUT
    } else {
        exec.exit_code
            .map_or(1, |code| i32::try_from(code).unwrap_or(1))
    };
    if let Some(f @ (OutputFormat::Yaml | OutputFormat::Json)) = format {
        return Ok(Printed {
            stdout: output::render_value(answer, f),
            stderr: String::new(),
            exit_code,
        });
    }
    let mut stderr = exec.stderr;
    if exec.timed_out {
        if !stderr.is_empty() && !stderr.ends_with('\n') {
            stderr.push('\n');
        }
        stderr.push_str(&format!(
            "{}: command timed out\n",
            crate::error::DEADLINE_EXCEEDED
        ));
    }
    Ok(Printed {
        stdout: exec.stdout,
        stderr,
        exit_code,
    })
}

/// One `--setup NAME=COMMAND` as `{"name", "command"}` (split at the first
/// `=`; neither side is checked here: the server does).
pub fn parse_setup(arg: &str) -> Result<Value, CliError> {
    let Some((name, command)) = arg.split_once('=') else {
        return Err(CliError::invalid(format!(
            "--setup expects NAME=COMMAND, got {arg:?}"
        )));
    };
    Ok(json!({"name": name, "command": command}))
}

/// The body of `PATCH /v1/workspaces/{ws}/warm-pool`: only the fields
/// given, in the order `enabled`, `targetSize`, `branch` (`null` with
/// `--no-branch`), `setupCommands` (the `--setup` entries in order, `[]`
/// with `--no-setup`).
pub fn warm_pool_patch(args: &WarmPoolSetArgs) -> Result<Value, CliError> {
    if args.branch.is_some() && args.no_branch {
        return Err(CliError::invalid(
            "--branch and --no-branch cannot be used together",
        ));
    }
    if !args.setup.is_empty() && args.no_setup {
        return Err(CliError::invalid(
            "--setup and --no-setup cannot be used together",
        ));
    }
    let mut body = Map::new();
    if let Some(enabled) = args.enabled {
        body.insert("enabled".into(), json!(enabled));
    }
    if let Some(size) = args.target_size {
        body.insert("targetSize".into(), json!(size));
    }
    if let Some(branch) = &args.branch {
        body.insert("branch".into(), json!(branch));
    } else if args.no_branch {
        body.insert("branch".into(), Value::Null);
    }
    if args.no_setup {
        body.insert("setupCommands".into(), json!([]));
    } else if !args.setup.is_empty() {
        let commands = args
            .setup
            .iter()
            .map(|s| parse_setup(s))
            .collect::<Result<Vec<_>, _>>()?;
        body.insert("setupCommands".into(), Value::Array(commands));
    }
    if body.is_empty() {
        return Err(CliError::invalid(
            "nothing to set: pass --enabled, --target-size, --branch, --no-branch, --setup or --no-setup",
        ));
    }
    Ok(Value::Object(body))
}

/// The query of `GET /v1/instances`: `workspace` unless `--all`, then
/// `status`, then `test=true` with `--test`.
pub fn instances_query<'a>(
    workspace: Option<&'a str>,
    status: Option<&'a str>,
    test: bool,
    all: bool,
) -> Vec<(&'static str, &'a str)> {
    let mut query = Vec::new();
    if let Some(workspace) = workspace.filter(|_| !all) {
        query.push(("workspace", workspace));
    }
    if let Some(status) = status {
        query.push(("status", status));
    }
    if test {
        query.push(("test", "true"));
    }
    query
}

/// How often `hearth warm-pool test --watch` asks for the instance.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(300);

/// The clock, the server and the screen as `warm-pool test --watch` sees
/// them, so that the loop runs in tests without any of them.
pub struct Watching<'a> {
    /// Fetches the instance again.
    pub fetch: &'a mut dyn FnMut() -> Result<Value, CliError>,
    pub sleep: &'a mut dyn FnMut(Duration),
    /// Time since the watch began.
    pub elapsed: &'a dyn Fn() -> Duration,
    /// The wall clock in Unix ms (the running step's elapsed time).
    pub now_ms: &'a dyn Fn() -> i64,
    /// Writes what [`Live`] draws, at once.
    pub show: &'a mut dyn FnMut(&str),
}

/// Polls every [`WATCH_INTERVAL`] from `instance` (the answer to the test
/// boot), showing each answer through `live`, until the run is ready or
/// failed; after `timeout` (spelled `timeout_text` in the message) gives up
/// with `DEADLINE_EXCEEDED: instance <id> is still provisioning after
/// <timeout>`. Returns the last answer.
pub fn watch_instance(
    mut instance: Value,
    timeout: Duration,
    timeout_text: &str,
    live: &mut Live,
    watching: Watching<'_>,
) -> Result<(Value, InstanceView), CliError> {
    const WHAT: &str = "GET /v1/workspaces/{ws}/warm-pool/instances/{id}";
    loop {
        let view = InstanceView::from_answer(WHAT, &instance)?;
        let text = live.update(&view, (watching.now_ms)());
        if !text.is_empty() {
            (watching.show)(&text);
        }
        if view.is_finished() {
            return Ok((instance, view));
        }
        let elapsed = (watching.elapsed)();
        if elapsed >= timeout {
            return Err(CliError::deadline_exceeded(format!(
                "instance {} is still {} after {timeout_text}",
                view.id, view.status
            )));
        }
        (watching.sleep)(WATCH_INTERVAL.min(timeout - elapsed));
        instance = (watching.fetch)()?;
    }
}

/// What `hearth warm-pool test --watch` prints once the run is over: the
/// [`output::instance_outcome`] (or with `-o yaml|json` the last answer),
/// exit 0 when ready and 1 when failed.
pub fn test_printed(
    answer: &Value,
    instance: &InstanceView,
    format: Option<OutputFormat>,
) -> Printed {
    let stdout = match format {
        Some(f @ (OutputFormat::Yaml | OutputFormat::Json)) => output::render_value(answer, f),
        _ => output::instance_outcome(instance),
    };
    Printed {
        stdout,
        stderr: String::new(),
        exit_code: if instance.status == "ready" { 0 } else { 1 },
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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
        Client::from_settings(&config::resolve(global, ctx.env, ctx.cwd)?)
    };
    let printed = match command {
        Command::Image(ImageCommand::Bake {
            name,
            rootfs,
            kernel_package,
        }) => bake_image(&connect()?, &name, rootfs, kernel_package, ctx)?,
        Command::Image(ImageCommand::Register {
            name,
            path,
            driver,
            tenant,
        }) => register_image(&connect()?, &name, path, driver, tenant)?,
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
                exit_code: 0,
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
                exit_code: 0,
            }
        }
        // ---- webhooks
        Command::Webhook(WebhookCommand::Create { name, url, types }) => {
            let body = json!({"name": name, "url": url, "types": types});
            let answer: Value = connect()?.post_json(&["webhooks"], &body)?;
            Printed {
                stdout: output::render_record(&answer, format),
                stderr: SECRET_ONCE.into(),
                exit_code: 0,
            }
        }
        Command::Webhook(WebhookCommand::List) => {
            let list: Items = connect()?.get(&["webhooks"])?;
            Printed::out(output::render_items(
                &list.items,
                output::WEBHOOK_COLUMNS,
                format,
                "No webhooks found.",
            ))
        }
        Command::Webhook(WebhookCommand::Delete { name }) => {
            let answer: Value = connect()?.delete(&["webhooks", &name])?;
            Printed::out(match format {
                Some(_) => output::render_record(&answer, format),
                None => output::deleted_message("webhook", &name),
            })
        }
        Command::Webhook(WebhookCommand::Deliveries { name, limit }) => {
            let limit = limit.to_string();
            let list: Items = connect()?.get_query(
                &["webhooks", &name, "deliveries"],
                &[("limit", limit.as_str())],
            )?;
            Printed::out(output::render_items(
                &list.items,
                output::DELIVERY_COLUMNS,
                format,
                "No deliveries yet.",
            ))
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
                exit_code: 0,
            }
        }
        Command::Pool(command) => {
            let on_vm = on_agent_vm((ctx.env)(ENV_VM_ID).as_deref(), ctx.vm_id_file.exists());
            if on_vm {
                return Ok(Printed {
                    stdout: String::new(),
                    stderr: format!("{POOL_ON_VM}\n"),
                    exit_code: 1,
                });
            }
            pool(global, command, ctx)?
        }
        Command::Spawn(args) => spawn(global, args, ctx)?,
        Command::Agents(command) => agents(global, command, ctx)?,
        Command::Builds(BuildsCommand::List) => {
            let list: Items = connect()?.get(&["builds"])?;
            Printed::out(output::render_builds(&list.items, format))
        }
        Command::Builds(BuildsCommand::Retire { id }) => {
            let answer: Value = connect()?.post_json(&["builds", &id, "retire"], &json!({}))?;
            Printed::out(output::answer_or_message(
                &answer,
                format,
                output::retired_message(&id),
            ))
        }
        Command::Events(args) => {
            let client = connect()?;
            if args.follow {
                crate::events::follow(&client, &args, format, ctx.progress)?;
                Printed::default()
            } else {
                Printed::out(crate::events::list(&client, &args, format)?)
            }
        }
        Command::WarmPool(command) => warm_pool(global, command, ctx)?,
        Command::Instances(command) => instances(global, command, ctx)?,
        Command::Node(NodeCommand::List) => {
            let list: Items = connect()?.get(&["nodes"])?;
            Printed::out(output::render_nodes(&list.items, format))
        }
        Command::Node(NodeCommand::Cordon { name }) => {
            let answer: Value = connect()?.post_json(&["nodes", &name, "cordon"], &json!({}))?;
            let message = format!("node {name} cordoned: it takes no new VMs\n");
            Printed::out(output::answer_or_message(&answer, format, message))
        }
        Command::Node(NodeCommand::Uncordon { name }) => {
            let answer: Value = connect()?.post_json(&["nodes", &name, "uncordon"], &json!({}))?;
            let message = format!("node {name} uncordoned: it takes new VMs again\n");
            Printed::out(output::answer_or_message(&answer, format, message))
        }
        Command::Node(NodeCommand::Drain { name }) => {
            let answer: Value = connect()?.post_json(&["nodes", &name, "drain"], &json!({}))?;
            let message = format!(
                "node {name} draining: it takes no new VMs and its idle VMs are replaced elsewhere\n"
            );
            Printed::out(output::answer_or_message(&answer, format, message))
        }
    };
    Ok(printed)
}

/// `hearth pool ...` (after the agent-VM guard).
fn pool(global: &GlobalArgs, command: PoolCommand, ctx: &Context<'_>) -> anyhow::Result<Printed> {
    let format = global.output;
    let settings = config::resolve(global, ctx.env, ctx.cwd)?;
    let printed = match command {
        PoolCommand::Status => {
            let answer: Value = Client::from_settings(&settings)?.get(&["pool", "status"])?;
            Printed::out(output::render_pool_status(&answer, format)?)
        }
        PoolCommand::Flush { nuke } => {
            let workspace = flush_workspace(global, settings.workspace.as_deref(), nuke);
            let client = Client::from_settings(&settings)?;
            let body = flush_body(workspace.as_deref(), nuke);
            if format.is_none() || format == Some(OutputFormat::Table) {
                (ctx.progress)(output::flush_progress(nuke));
            }
            let answer: Value = client.post_json(&["pool", "flush"], &body)?;
            Printed::out(match format {
                Some(f @ (OutputFormat::Yaml | OutputFormat::Json)) => {
                    output::render_value(&answer, f)
                }
                _ => output::flush_message(&answer, nuke)?,
            })
        }
        PoolCommand::Up => {
            let answer: Value =
                Client::from_settings(&settings)?.post_json(&["pool", "up"], &json!({}))?;
            Printed::out(match format {
                Some(f @ (OutputFormat::Yaml | OutputFormat::Json)) => {
                    output::render_value(&answer, f)
                }
                _ => output::pool_up_message(&answer)?,
            })
        }
        PoolCommand::Reset => {
            let workspace = require_workspace(settings.workspace.clone())?;
            let answer: Value = Client::from_settings(&settings)?
                .post_json(&["pool", "reset"], &json!({"workspace": workspace}))?;
            Printed::out(output::answer_or_message(
                &answer,
                format,
                output::pool_reset_message(&workspace),
            ))
        }
    };
    Ok(printed)
}

/// `hearth spawn`, and with `--wait` the polling until the agent runs (or,
/// with a command, has finished).
fn spawn(global: &GlobalArgs, args: SpawnArgs, ctx: &Context<'_>) -> anyhow::Result<Printed> {
    const WHAT: &str = "POST /v1/agents";
    let timeout = duration_flag("--wait-timeout", &args.wait_timeout)?;
    let settings: Settings = config::resolve(global, ctx.env, ctx.cwd)?;
    let workspace = require_workspace(settings.workspace.clone())?;
    let client = Client::from_settings(&settings)?;
    let body = spawn_body(
        &workspace,
        args.command.as_deref(),
        args.parent.as_deref(),
        args.on_idle.as_deref(),
    );
    let answer: Value = client.post_json(&["agents"], &body)?;
    let has_command = args.command.is_some();
    let (answer, agent) = if args.wait {
        let id = AgentView::from_answer(WHAT, &answer)?.id;
        let started = Instant::now();
        wait_for_agent(
            answer,
            has_command,
            timeout,
            &args.wait_timeout,
            Waiting {
                fetch: &mut || client.get(&["agents", &id]),
                sleep: &mut std::thread::sleep,
                elapsed: &|| started.elapsed(),
            },
        )?
    } else {
        let agent = AgentView::from_answer(WHAT, &answer)?;
        (answer, agent)
    };
    Ok(spawn_printed(
        &answer,
        &agent,
        args.wait,
        has_command,
        global.output,
    ))
}

/// `hearth agents ...`.
fn agents(
    global: &GlobalArgs,
    command: AgentsCommand,
    ctx: &Context<'_>,
) -> anyhow::Result<Printed> {
    let format = global.output;
    let action = |client: &Client, id: &str, action: AgentAction| -> anyhow::Result<Printed> {
        let answer: Value = client.post_json(&["agents", id, action.verb()], &json!({}))?;
        let agent = AgentView::from_answer(
            &format!("POST /v1/agents/{{id}}/{}", action.verb()),
            &answer,
        )?;
        Ok(Printed::out(output::answer_or_message(
            &answer,
            format,
            output::agent_action_message(action, id, &agent),
        )))
    };
    // Checked before anything is resolved or sent. The server runs an
    // exec for up to its --timeout: wait that long plus the usual margin
    // for the answer (without one, as long as it takes).
    let exec_wait = match &command {
        AgentsCommand::Exec {
            timeout: Some(t), ..
        } => Some(duration_flag("--timeout", t)?.saturating_add(DEFAULT_TIMEOUT)),
        _ => None,
    };
    let settings = config::resolve(global, ctx.env, ctx.cwd)?;
    let client = Client::from_settings(&settings)?;
    match command {
        AgentsCommand::List { phase, all } => {
            let mut query = Vec::new();
            if let Some(workspace) = settings.workspace.as_deref().filter(|_| !all) {
                query.push(("workspace", workspace));
            }
            if let Some(phase) = phase.as_deref() {
                query.push(("phase", phase));
            }
            let list: Items = client.get_query(&["agents"], &query)?;
            Ok(Printed::out(output::render_agents(
                &list.items,
                format,
                SystemTime::now(),
            )))
        }
        AgentsCommand::Get { id } => {
            let answer: Value = client.get(&["agents", &id])?;
            Ok(Printed::out(output::render_agent(
                &answer,
                format,
                SystemTime::now(),
            )))
        }
        AgentsCommand::Kill { id } => action(&client, &id, AgentAction::Kill),
        AgentsCommand::Sleep { id } => action(&client, &id, AgentAction::Sleep),
        AgentsCommand::Wake { id } => action(&client, &id, AgentAction::Wake),
        AgentsCommand::Resurrect { id } => action(&client, &id, AgentAction::Resurrect),
        AgentsCommand::Exec {
            id,
            timeout,
            command,
        } => {
            let body = exec_body(&command, timeout.as_deref())?;
            let answer: Value =
                client.post_json_waiting(&["agents", &id, "exec"], &body, exec_wait)?;
            Ok(exec_printed(&answer, format)?)
        }
        AgentsCommand::Finish {
            id,
            failed,
            exit_code,
            error,
        } => {
            let body = finish_body(failed, exit_code, error.as_deref());
            let answer: Value = client.post_json(&["agents", &id, "finish"], &body)?;
            Ok(Printed::out(output::answer_or_message(
                &answer,
                format,
                output::finish_message(&id, finish_status(failed)),
            )))
        }
    }
}

/// `hearth warm-pool ...`.
fn warm_pool(
    global: &GlobalArgs,
    command: WarmPoolCommand,
    ctx: &Context<'_>,
) -> anyhow::Result<Printed> {
    let format = global.output;
    // Checked before anything is resolved or sent.
    let patch = match &command {
        WarmPoolCommand::Set(args) => Some(warm_pool_patch(args)?),
        _ => None,
    };
    let timeout = match &command {
        WarmPoolCommand::Test { timeout, .. } => Some(duration_flag("--timeout", timeout)?),
        _ => None,
    };
    let settings = config::resolve(global, ctx.env, ctx.cwd)?;
    let workspace = require_workspace(settings.workspace.clone())?;
    let client = Client::from_settings(&settings)?;
    let path = ["workspaces", workspace.as_str(), "warm-pool"];
    match command {
        WarmPoolCommand::Get => {
            let answer: Value = client.get(&path)?;
            Ok(Printed::out(output::render_warm_pool(&answer, format)))
        }
        WarmPoolCommand::Set(_) => {
            let patch = patch.expect("built above");
            let answer: Value = client.patch_json(&path, &patch)?;
            Ok(Printed::out(match format {
                Some(_) => output::render_warm_pool(&answer, format),
                None => {
                    output::warm_pool_configured(&workspace)
                        + &output::render_warm_pool(&answer, None)
                }
            }))
        }
        WarmPoolCommand::Test {
            watch,
            timeout: timeout_text,
        } => {
            const WHAT: &str = "POST /v1/workspaces/{ws}/warm-pool/test";
            let answer: Value =
                client.post_json(&["workspaces", &workspace, "warm-pool", "test"], &json!({}))?;
            let instance = InstanceView::from_answer(WHAT, &answer)?;
            if !watch {
                return Ok(Printed::out(output::answer_or_message(
                    &answer,
                    format,
                    output::test_started_message(&instance.id),
                )));
            }
            let structured = matches!(format, Some(OutputFormat::Yaml | OutputFormat::Json));
            let redraw =
                !structured && live::redraws(ctx.stdout_is_tty, (ctx.env)("TERM").as_deref());
            let mut live = if redraw {
                Live::redraw()
            } else {
                Live::lines()
            };
            if redraw {
                (ctx.progress)(&output::test_started_message(&instance.id));
            }
            // A bar on stderr when stdout is not the list redrawn in place.
            let bar = (!redraw
                && crate::progress::enabled(ctx.stderr_is_tty, (ctx.env)("TERM").as_deref()))
            .then(|| crate::progress::Steps::start(&instance.id));
            if let Some(bar) = &bar {
                bar.update(&instance);
            }
            let id = instance.id;
            let started = Instant::now();
            let watched = watch_instance(
                answer,
                timeout.expect("parsed above"),
                &timeout_text,
                &mut live,
                Watching {
                    fetch: &mut || {
                        let answer: Value = client.get(&[
                            "workspaces",
                            &workspace,
                            "warm-pool",
                            "instances",
                            &id,
                        ])?;
                        if let (Some(bar), Ok(view)) =
                            (&bar, InstanceView::from_answer(WHAT, &answer))
                        {
                            bar.update(&view);
                        }
                        Ok(answer)
                    },
                    sleep: &mut std::thread::sleep,
                    elapsed: &|| started.elapsed(),
                    now_ms: &unix_ms,
                    show: &mut |text| {
                        if !structured {
                            (ctx.progress)(text);
                        }
                    },
                },
            );
            if let Some(bar) = bar {
                bar.finish();
            }
            let (answer, instance) = watched?;
            Ok(test_printed(&answer, &instance, format))
        }
    }
}

/// `hearth instances ...`.
fn instances(
    global: &GlobalArgs,
    command: InstancesCommand,
    ctx: &Context<'_>,
) -> anyhow::Result<Printed> {
    let format = global.output;
    let settings = config::resolve(global, ctx.env, ctx.cwd)?;
    let client = Client::from_settings(&settings)?;
    match command {
        InstancesCommand::List { status, test, all } => {
            let query =
                instances_query(settings.workspace.as_deref(), status.as_deref(), test, all);
            let list: Items = client.get_query(&["instances"], &query)?;
            Ok(Printed::out(output::render_instances(
                &list.items,
                format,
                SystemTime::now(),
            )?))
        }
        InstancesCommand::Get { id, steps } => {
            let answer: Value = client.get(&["instances", &id])?;
            let structured = matches!(format, Some(OutputFormat::Yaml | OutputFormat::Json));
            if steps && !structured {
                let instance = InstanceView::from_answer("GET /v1/instances/{id}", &answer)?;
                return Ok(Printed::out(output::render_instance_steps(
                    &instance,
                    unix_ms(),
                )));
            }
            Ok(Printed::out(output::render_instance(
                &answer,
                format,
                SystemTime::now(),
            )?))
        }
    }
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
    // The token is given here, with the server it is for: a server a
    // project file names is accepted (the message says which it is), and the
    // token is recorded as bound to it alone.
    let (server, origin) = config::resolve_server(global, ctx.env, ctx.cwd)?;
    let ca = global
        .ca
        .clone()
        .or_else(|| {
            (ctx.env)(config::ENV_CA)
                .filter(|c| !c.trim().is_empty())
                .map(Into::into)
        })
        .map(|ca| {
            if ca.is_absolute() {
                ca
            } else {
                ctx.cwd.join(ca)
            }
        })
        .or_else(|| config::local_ca(ctx.cwd, &server));
    let client = Client::with_ca(&server, &origin, Some(token.clone()), ca.as_deref())?;
    let who: Value = client.get(&["whoami"])?;
    let target = config::login_target(ctx.cwd);
    let file = config::with_credential(
        config::read_local_file(&target)?,
        config::Credential {
            server: server.clone(),
            ca,
            token,
        },
    );
    config::write_local_file(&target, &file)?;
    let field = |key: &str| output::cell(who.get(key));
    Ok(Printed::out(format!(
        "Logged in to {} as {} ({}) in tenant {}; token saved to {} (sent to that server only)\n",
        client.server(),
        field("identity"),
        field("role"),
        field("tenant"),
        target.display()
    )))
}

/// How often `hearth image bake` reads the job's log.
const BAKE_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Bakes the image on the server: creates or updates its recipe when asked,
/// starts a job, prints its log on stderr as it grows (above a spinner when
/// stderr is a terminal), and ends with the job's outcome.
fn bake_image(
    client: &Client,
    name: &str,
    rootfs: Option<String>,
    kernel_package: Option<String>,
    ctx: &Context<'_>,
) -> anyhow::Result<Printed> {
    if let Some(r) = &rootfs
        && !matches!(r.as_str(), "minimal" | "debian")
    {
        return Err(CliError::invalid(format!("--rootfs {r:?}: use minimal or debian")).into());
    }
    let mut recipe = Map::new();
    if let Some(r) = rootfs {
        recipe.insert("rootfs".into(), json!(r));
    }
    if let Some(k) = kernel_package {
        recipe.insert("kernel_package".into(), json!(k));
    }
    match client.get::<Value>(&["images", name]) {
        Ok(_) if recipe.is_empty() => {}
        Ok(_) => {
            let _: Value = client.patch_merge(&["images", name], &Value::Object(recipe))?;
        }
        Err(e) if e.code == "NOT_FOUND" => {
            recipe.insert("driver".into(), json!("qemu"));
            let yaml = serde_yaml_ng::to_string(&Value::Object(recipe))?;
            let _: Value = client.put_yaml(&["images", name], yaml)?;
        }
        Err(e) => return Err(e.into()),
    }
    let job: Value = client.post_json(&["images", name, "bakes"], &json!({}))?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    eprintln!("bake {id} of image/{name} queued");
    let mut bar = crate::progress::enabled(ctx.stderr_is_tty, (ctx.env)("TERM").as_deref())
        .then(|| crate::progress::Bake::start(name, &id));
    let followed = follow_bake(client, name, &id, &mut bar);
    if let Some(bar) = bar {
        bar.finish();
    }
    followed
}

/// Follows a bake job until it ends: its log on stderr (through the
/// spinner when there is one), then its outcome.
fn follow_bake(
    client: &Client,
    name: &str,
    id: &str,
    bar: &mut Option<crate::progress::Bake>,
) -> anyhow::Result<Printed> {
    let mut offset = 0u64;
    loop {
        let offset_text = offset.to_string();
        let job: Value = client.get_query(
            &["images", name, "bakes", id],
            &[("log_offset", &offset_text)],
        )?;
        if let Some(log) = job["log"].as_str() {
            match bar {
                Some(bar) => bar.log(log),
                None => eprint!("{log}"),
            }
        }
        offset = job["next_log_offset"].as_u64().unwrap_or(offset);
        match job["state"].as_str() {
            Some("succeeded") => {
                return Ok(Printed::out(format!(
                    "image/{name} baked: bake {} (job {id})\n",
                    output::cell(job.get("bake"))
                )));
            }
            Some("failed") => {
                return Ok(Printed {
                    stderr: format!(
                        "image/{name}: bake {id} failed: {}\n",
                        output::cell(job.get("error"))
                    ),
                    exit_code: 1,
                    ..Printed::default()
                });
            }
            _ => std::thread::sleep(BAKE_POLL),
        }
    }
}

/// Registers a prebuilt image folder of the server's image store.
fn register_image(
    client: &Client,
    name: &str,
    path: String,
    driver: Option<String>,
    tenant: Option<String>,
) -> anyhow::Result<Printed> {
    let mut body = Map::new();
    body.insert("path".into(), json!(path));
    if let Some(d) = driver {
        body.insert("driver".into(), json!(d));
    }
    if let Some(t) = tenant {
        body.insert("tenant".into(), json!(t));
    }
    let r: Value = client.post_json(&["images", name, "prebuilt"], &Value::Object(body))?;
    Ok(Printed::out(format!(
        "image/{name} registered: prebuilt {path}, version {}\n",
        output::cell(r.get("version"))
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
            e.message.starts_with("--expires-in \"soon\" is not valid"),
            "{e}"
        );
        assert!(check_duration("0s").is_err());
        assert!(check_duration("1h30m").is_ok());
        assert!(check_duration("366d").is_ok());
        for long in ["367d", "99999999999999999999d", "18446744073709551615s"] {
            let e = check_duration(long).unwrap_err();
            assert_eq!(
                e.message,
                format!("--expires-in {long:?} is too long: tokens may last at most 366d")
            );
        }
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
            vm_id_file: &dir.path().join("no-vm-id"),
            progress: &|_| panic!("no progress before local errors"),
            stdout_is_tty: false,
            stderr_is_tty: false,
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
        // The new commands check their own input first too.
        let spawn = |wait_timeout: &str| {
            Command::Spawn(SpawnArgs {
                command: None,
                parent: None,
                on_idle: None,
                wait: true,
                wait_timeout: wait_timeout.into(),
            })
        };
        assert_eq!(
            run(spawn("10m")),
            "INVALID_ARGUMENT: no workspace: pass --workspace or set workspace in hearth.yaml"
        );
        assert_eq!(
            run(spawn("forever")),
            "INVALID_ARGUMENT: invalid --wait-timeout \"forever\": use a duration such as 90s, 15m, 1h30m or 2d"
        );
        assert_eq!(
            run(Command::Pool(PoolCommand::Reset)),
            "INVALID_ARGUMENT: no workspace: pass --workspace or set workspace in hearth.yaml"
        );
        for command in [
            WarmPoolCommand::Get,
            WarmPoolCommand::Test {
                watch: true,
                timeout: "30m".into(),
            },
        ] {
            assert_eq!(
                run(Command::WarmPool(command)),
                "INVALID_ARGUMENT: no workspace: pass --workspace or set workspace in hearth.yaml"
            );
        }
        // instances need no workspace: the unusable URL is what fails.
        let list = Command::Instances(InstancesCommand::List {
            status: None,
            test: false,
            all: false,
        });
        assert!(run(list).contains("invalid server URL"));
        let exec = Command::Agents(AgentsCommand::Exec {
            id: "a".into(),
            timeout: Some("0s".into()),
            command: vec!["true".into()],
        });
        assert!(run(exec).starts_with("INVALID_ARGUMENT: invalid --timeout \"0s\""));
        // Valid input: the unusable URL is what fails.
        assert!(run(Command::Pool(PoolCommand::Status)).contains("invalid server URL"));
        assert!(
            run(Command::Builds(BuildsCommand::List)).contains("invalid server URL"),
            "builds"
        );
    }

    #[test]
    fn pool_commands_refuse_to_run_on_a_vm() {
        assert!(!on_agent_vm(None, false));
        assert!(!on_agent_vm(Some(""), false));
        assert!(on_agent_vm(Some("0190c5a4"), false));
        assert!(on_agent_vm(Some(" "), false), "any non-empty value");
        assert!(on_agent_vm(None, true));
        assert!(on_agent_vm(Some(""), true));

        // Before anything else: the server URL is unusable and no workspace
        // is set, yet the refusal is what is printed.
        let dir = tempfile::tempdir().unwrap();
        let vm_id_file = dir.path().join("vm-id");
        let stdin = || Ok(String::new());
        let check = |vm_id: Option<&str>, file: bool| {
            if file {
                std::fs::write(&vm_id_file, "0190c5a4\n").unwrap();
            } else {
                let _ = std::fs::remove_file(&vm_id_file);
            }
            let env = |k: &str| match k {
                config::ENV_SERVER => Some("not a url".to_owned()),
                ENV_VM_ID => vm_id.map(str::to_owned),
                _ => None,
            };
            let ctx = Context {
                cwd: dir.path(),
                env: &env,
                read_stdin: &stdin,
                vm_id_file: &vm_id_file,
                progress: &|_| panic!("no progress on a VM"),
                stdout_is_tty: false,
                stderr_is_tty: false,
            };
            [
                PoolCommand::Status,
                PoolCommand::Flush { nuke: true },
                PoolCommand::Up,
                PoolCommand::Reset,
            ]
            .map(|c| {
                execute(&GlobalArgs::default(), Command::Pool(c), &ctx)
                    .map_err(|e| crate::error::error_line(&e))
            })
        };
        let refused = Printed {
            stdout: String::new(),
            stderr: "pool commands are not supported on VMs\n".into(),
            exit_code: 1,
        };
        for (vm_id, file) in [(Some("vm-1"), false), (None, true), (Some(""), true)] {
            for result in check(vm_id, file) {
                assert_eq!(result.as_ref(), Ok(&refused), "{vm_id:?} {file}");
            }
        }
        for result in check(Some(""), false) {
            assert_ne!(result.as_ref(), Ok(&refused));
        }
    }

    #[test]
    fn what_a_flush_narrows_to() {
        let env = |k: &str| (k == config::ENV_WORKSPACE).then(|| "env-ws".to_owned());
        let none = GlobalArgs::default();
        let flag = with_workspace(Some("flag-ws"));
        let dir = tempfile::tempdir().unwrap();
        let resolved = |global: &GlobalArgs, env: &dyn Fn(&str) -> Option<String>| {
            config::resolve(global, env, dir.path()).unwrap().workspace
        };
        let narrowed = |global: &GlobalArgs, env: &dyn Fn(&str) -> Option<String>, nuke| {
            flush_workspace(global, resolved(global, env).as_deref(), nuke)
        };
        assert_eq!(narrowed(&none, &|_| None, false), None, "the whole pool");
        std::fs::write(dir.path().join("hearth.yaml"), "workspace: file-ws\n").unwrap();
        assert_eq!(
            narrowed(&none, &|_| None, false).as_deref(),
            Some("file-ws")
        );
        assert_eq!(narrowed(&none, &env, false).as_deref(), Some("env-ws"));
        assert_eq!(narrowed(&flag, &env, false).as_deref(), Some("flag-ws"));
        assert_eq!(
            narrowed(&none, &env, true),
            None,
            "nuke: env and file ignored"
        );
        assert_eq!(narrowed(&flag, &env, true).as_deref(), Some("flag-ws"));
    }

    #[test]
    fn request_bodies() {
        assert_eq!(
            flush_body(None, false).to_string(),
            r#"{"workspace":null,"nuke":false}"#
        );
        assert_eq!(
            flush_body(Some("web"), true).to_string(),
            r#"{"workspace":"web","nuke":true}"#
        );
        assert_eq!(
            spawn_body("web", None, None, None).to_string(),
            r#"{"workspace":"web","command":null,"parent":null,"on_idle":null}"#
        );
        assert_eq!(
            spawn_body("web", Some("make test"), Some("p-1"), Some("keep-alive")),
            json!({"workspace": "web", "command": "make test", "parent": "p-1", "on_idle": "keep-alive"})
        );
        let args = ["ls".to_owned(), "-la".to_owned(), "/tmp dir".to_owned()];
        assert_eq!(
            exec_body(&args, None).unwrap()["command"],
            "ls -la '/tmp dir'"
        );
        assert_eq!(
            exec_body(&args[..1], Some("30s")).unwrap(),
            json!({"command": "ls", "timeout": "30s"})
        );
        // Each argument stays one: quotes, spaces, `$`, empty ones.
        let words = ["sh", "-c", "echo alive", "it's", "$HOME", "", "a\"b"];
        let args: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let line = exec_body(&args, None).unwrap()["command"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(shlex::split(&line).unwrap(), words, "{line}");
        assert_eq!(
            exec_body(&["echo\0x".to_owned()], None).unwrap_err().code,
            "INVALID_ARGUMENT"
        );
        assert_eq!(
            finish_body(false, None, None).to_string(),
            r#"{"status":"completed","exit_code":null,"error":null}"#
        );
        assert_eq!(
            finish_body(true, Some(2), Some("tests failed")),
            json!({"status": "failed", "exit_code": 2, "error": "tests failed"})
        );
        assert_eq!(
            require_workspace(Some("web".into())).unwrap(),
            "web".to_owned()
        );
        assert_eq!(
            duration_flag("--wait-timeout", "10m").unwrap(),
            Duration::from_secs(600)
        );
    }

    fn agent(phase: &str) -> Value {
        json!({"id": "a-1", "workspace": "web", "owner": "dana", "phase": phase,
               "vm": null, "command": null, "exit_code": null, "output": "", "error": null,
               "created_at": "2026-11-23T03:00:00Z"})
    }

    /// Runs the wait loop against a list of answers, with a fake clock that
    /// advances by each sleep; returns the result, the sleeps and the
    /// fetches made.
    fn wait(
        first: Value,
        then: Vec<Value>,
        has_command: bool,
        timeout: Duration,
    ) -> (Result<Value, CliError>, Vec<Duration>, usize) {
        let clock = std::cell::Cell::new(Duration::ZERO);
        let mut sleeps = Vec::new();
        let mut answers = then.into_iter();
        let mut fetches = 0;
        let result = wait_for_agent(
            first,
            has_command,
            timeout,
            "1s",
            Waiting {
                fetch: &mut || {
                    fetches += 1;
                    Ok(answers.next().expect("no more answers"))
                },
                sleep: &mut |d| {
                    sleeps.push(d);
                    clock.set(clock.get() + d);
                },
                elapsed: &|| clock.get(),
            },
        );
        (result.map(|(answer, _)| answer), sleeps, fetches)
    }

    #[test]
    fn waiting_for_an_agent() {
        let ms = Duration::from_millis;
        // Already running: no request at all.
        let (r, sleeps, fetches) = wait(agent("running"), vec![], false, ms(1000));
        assert_eq!(
            (r.unwrap()["phase"].clone(), sleeps.len(), fetches),
            (json!("running"), 0, 0)
        );
        // Queued, provisioning, then idle: polls every 200 ms.
        let (r, sleeps, fetches) = wait(
            agent("queued"),
            vec![agent("provisioning"), agent("idle")],
            false,
            ms(1000),
        );
        assert_eq!(r.unwrap()["phase"], "idle");
        assert_eq!((sleeps, fetches), (vec![ms(200), ms(200)], 2));
        // With a command, running is not enough: wait until it is over.
        let mut done = agent("completed");
        done["exit_code"] = json!(0);
        let (r, _, fetches) = wait(
            agent("queued"),
            vec![agent("running"), agent("running"), done.clone()],
            true,
            ms(1000),
        );
        assert_eq!((r.unwrap(), fetches), (done, 3));
        // A failure is over too, even without a command.
        let (r, _, _) = wait(
            agent("provisioning"),
            vec![agent("failed")],
            false,
            ms(1000),
        );
        assert_eq!(r.unwrap()["phase"], "failed");
        // Out of time: the last phase seen is named; the last sleep is cut
        // to the deadline.
        let (r, sleeps, fetches) = wait(
            agent("queued"),
            vec![agent("queued"), agent("provisioning")],
            false,
            ms(300),
        );
        assert_eq!(
            r.unwrap_err().to_string(),
            "DEADLINE_EXCEEDED: agent a-1 is still provisioning after 1s"
        );
        assert_eq!((sleeps, fetches), (vec![ms(200), ms(100)], 2));
        // A server error ends the wait with that error.
        let mut failing = || Err(CliError::invalid("boom"));
        let e = wait_for_agent(
            agent("queued"),
            false,
            ms(1000),
            "1s",
            Waiting {
                fetch: &mut failing,
                sleep: &mut |_| {},
                elapsed: &|| Duration::ZERO,
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "INVALID_ARGUMENT: boom");
        // An answer that is not an agent is the server's fault.
        let (r, _, _) = wait(json!({"id": "a-1"}), vec![], false, ms(1000));
        assert!(
            r.unwrap_err()
                .message
                .starts_with("unexpected answer to GET /v1/agents/{id}")
        );
    }

    #[test]
    fn what_spawn_prints() {
        let p = |answer: &Value, waited, has_command, format| {
            let view = AgentView::from_answer("t", answer).unwrap();
            spawn_printed(answer, &view, waited, has_command, format)
        };
        let mut running = agent("running");
        running["vm"] = json!("vm-9");
        assert_eq!(
            p(&running, false, false, None),
            Printed::out("Agent a-1 running (workspace web) on VM vm-9\n".into())
        );
        assert_eq!(
            p(&agent("queued"), false, true, Some(OutputFormat::Table)),
            Printed::out("Agent a-1 queued (workspace web)\n".into())
        );
        // A finished command: its output, then the line, and its exit code.
        let mut failed = agent("failed");
        failed["command"] = json!("make test");
        failed["output"] = json!("1 test failed");
        failed["exit_code"] = json!(2);
        assert_eq!(
            p(&failed, true, true, None),
            Printed {
                stdout: "1 test failed\nAgent a-1 failed (workspace web)\n".into(),
                stderr: String::new(),
                exit_code: 2
            }
        );
        failed["exit_code"] = Value::Null;
        failed["output"] = json!("");
        assert_eq!(
            p(&failed, true, true, None),
            Printed {
                stdout: "Agent a-1 failed (workspace web)\n".into(),
                stderr: String::new(),
                exit_code: 1
            }
        );
        let mut completed = agent("completed");
        completed["output"] = json!("ok\n");
        assert_eq!(
            p(&completed, true, true, None).stdout,
            "ok\nAgent a-1 completed (workspace web)\n"
        );
        assert_eq!(p(&completed, true, true, None).exit_code, 0);
        // Not waited for: whatever the phase, exit 0 and no output.
        assert_eq!(p(&failed, false, true, None).exit_code, 0);
        // Without a command, a failure after --wait still fails the command.
        assert_eq!(p(&agent("failed"), true, false, None).exit_code, 1);
        // -o json: the answer instead of output and line; same exit code.
        failed["exit_code"] = json!(3);
        let printed = p(&failed, true, true, Some(OutputFormat::Json));
        assert_eq!(
            serde_json::from_str::<Value>(&printed.stdout).unwrap(),
            failed
        );
        assert_eq!(printed.exit_code, 3);
    }

    #[test]
    fn what_exec_prints() {
        let p = |answer: Value| exec_printed(&answer, None).unwrap();
        assert_eq!(
            p(json!({"exit_code": 0, "stdout": "a\nb", "stderr": "", "timed_out": false})),
            Printed {
                stdout: "a\nb".into(),
                stderr: String::new(),
                exit_code: 0
            }
        );
        assert_eq!(
            p(json!({"exit_code": 42, "stdout": "", "stderr": "oops\n", "timed_out": false})),
            Printed {
                stdout: String::new(),
                stderr: "oops\n".into(),
                exit_code: 42
            }
        );
        assert_eq!(
            p(json!({"exit_code": -1, "stdout": "partial", "stderr": "warn", "timed_out": true})),
            Printed {
                stdout: "partial".into(),
                stderr: "warn\nDEADLINE_EXCEEDED: command timed out\n".into(),
                exit_code: 124
            }
        );
        assert_eq!(
            p(json!({"exit_code": null, "stdout": "", "stderr": "", "timed_out": true})).stderr,
            "DEADLINE_EXCEEDED: command timed out\n"
        );
        let answer = json!({"exit_code": 7, "stdout": "x", "stderr": "y", "timed_out": false});
        let printed = exec_printed(&answer, Some(OutputFormat::Yaml)).unwrap();
        assert_eq!(
            (
                printed.stdout.as_str(),
                printed.stderr.as_str(),
                printed.exit_code
            ),
            (
                "exit_code: 7\nstdout: x\nstderr: y\ntimed_out: false\n",
                "",
                7
            )
        );
        assert_eq!(
            exec_printed(&json!({"stdout": ""}), None).unwrap_err().code,
            "INTERNAL"
        );
    }

    /// A server that answers `answers` (status, JSON body), one request per
    /// connection, and hands back the requests received (request line and
    /// body).
    fn stub(answers: Vec<(u16, Value)>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for (status, body) in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut request_body = vec![0; length];
                reader.read_exact(&mut request_body).unwrap();
                requests.push(format!(
                    "{} {}",
                    first.trim_end(),
                    String::from_utf8(request_body).unwrap()
                ));
                let body = body.to_string();
                let mut stream = stream;
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            requests
        });
        (url, handle)
    }

    /// Runs `command` against a stub server in a folder holding
    /// `hearth.yaml` with `workspace: web`; returns what was printed (and
    /// the progress lines before it) or the error line.
    fn run_against(
        url: &str,
        global: GlobalArgs,
        command: Command,
    ) -> (Result<Printed, String>, Vec<String>) {
        run_in(url, global, command, false)
    }

    /// [`run_against`], with stdout a terminal or not.
    fn run_in(
        url: &str,
        global: GlobalArgs,
        command: Command,
        stdout_is_tty: bool,
    ) -> (Result<Printed, String>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hearth.yaml"), "workspace: web\n").unwrap();
        let env = |k: &str| match k {
            config::ENV_SERVER => Some(url.to_owned()),
            config::ENV_TOKEN => Some("tok".to_owned()),
            _ => None,
        };
        let progress = std::cell::RefCell::new(Vec::new());
        let ctx = Context {
            cwd: dir.path(),
            env: &env,
            read_stdin: &|| Ok(String::new()),
            vm_id_file: &dir.path().join("vm-id"),
            progress: &|line| progress.borrow_mut().push(line.to_owned()),
            stdout_is_tty,
            stderr_is_tty: false,
        };
        let result = execute(&global, command, &ctx).map_err(|e| crate::error::error_line(&e));
        (result, progress.into_inner())
    }

    fn with_workspace(workspace: Option<&str>) -> GlobalArgs {
        GlobalArgs {
            workspace: workspace.map(str::to_owned),
            ..GlobalArgs::default()
        }
    }

    #[test]
    fn flush_prints_progress_and_narrows_to_hearth_yaml() {
        let (url, requests) = stub(vec![(200, json!({"flushed": 3}))]);
        let (printed, progress) = run_against(
            &url,
            GlobalArgs::default(),
            Command::Pool(PoolCommand::Flush { nuke: false }),
        );
        assert_eq!(
            printed.unwrap().stdout,
            "Flushed 3 warm VMs — pool will replenish with fresh ones\n"
        );
        assert_eq!(progress, ["Flushing warm VMs...\n"]);
        assert_eq!(
            requests.join().unwrap(),
            [r#"POST /v1/pool/flush HTTP/1.1 {"workspace":"web","nuke":false}"#]
        );

        let (url, requests) = stub(vec![(
            409,
            json!({"code": "FAILED_PRECONDITION", "message": "no"}),
        )]);
        let (printed, progress) = run_against(
            &url,
            with_workspace(Some("docs")),
            Command::Pool(PoolCommand::Flush { nuke: true }),
        );
        assert_eq!(printed.unwrap_err(), "FAILED_PRECONDITION: no");
        assert_eq!(
            progress,
            ["Nuking all workflows and VMs...\n"],
            "printed before"
        );
        assert_eq!(
            requests.join().unwrap(),
            [r#"POST /v1/pool/flush HTTP/1.1 {"workspace":"docs","nuke":true}"#]
        );

        // -o json: the answer alone, no progress line to break it.
        let (url, _requests) = stub(vec![(200, json!({"flushed": 0}))]);
        let (printed, progress) = run_against(
            &url,
            GlobalArgs {
                output: Some(OutputFormat::Json),
                ..GlobalArgs::default()
            },
            Command::Pool(PoolCommand::Flush { nuke: false }),
        );
        assert_eq!(printed.unwrap().stdout, "{\n  \"flushed\": 0\n}\n");
        assert!(progress.is_empty());
    }

    #[test]
    fn pool_reset_takes_the_workspace_from_hearth_yaml() {
        let (url, requests) = stub(vec![(200, json!({}))]);
        let (printed, _) = run_against(
            &url,
            GlobalArgs::default(),
            Command::Pool(PoolCommand::Reset),
        );
        assert_eq!(
            printed.unwrap().stdout,
            "Workspace web: failure back-off cleared\n"
        );
        assert_eq!(
            requests.join().unwrap(),
            [r#"POST /v1/pool/reset HTTP/1.1 {"workspace":"web"}"#]
        );
    }

    #[test]
    fn spawn_waits_for_the_command() {
        let mut done = agent("completed");
        done["command"] = json!("make test");
        done["output"] = json!("all good");
        done["exit_code"] = json!(0);
        done["vm"] = json!("vm-1");
        let (url, requests) = stub(vec![
            (201, agent("queued")),
            (200, agent("running")),
            (200, done),
        ]);
        let (printed, _) = run_against(
            &url,
            with_workspace(Some("api")),
            Command::Spawn(SpawnArgs {
                command: Some("make test".into()),
                parent: None,
                on_idle: Some("terminate".into()),
                wait: true,
                wait_timeout: "10s".into(),
            }),
        );
        assert_eq!(
            printed.unwrap(),
            Printed::out("all good\nAgent a-1 completed (workspace web) on VM vm-1\n".into())
        );
        assert_eq!(
            requests.join().unwrap(),
            [
                r#"POST /v1/agents HTTP/1.1 {"workspace":"api","command":"make test","parent":null,"on_idle":"terminate"}"#,
                "GET /v1/agents/a-1 HTTP/1.1 ",
                "GET /v1/agents/a-1 HTTP/1.1 ",
            ]
        );
    }

    #[test]
    fn agents_list_filters_by_workspace_unless_all() {
        let items = json!({"items": []});
        let (url, requests) = stub(vec![(200, items.clone()), (200, items)]);
        let list = |all, phase: Option<&str>| {
            Command::Agents(AgentsCommand::List {
                phase: phase.map(str::to_owned),
                all,
            })
        };
        let (printed, _) = run_against(&url, GlobalArgs::default(), list(false, Some("running")));
        assert_eq!(printed.unwrap().stdout, "No agents found.\n");
        let (printed, _) = run_against(&url, GlobalArgs::default(), list(true, None));
        assert_eq!(printed.unwrap().stdout, "No agents found.\n");
        assert_eq!(
            requests.join().unwrap(),
            [
                "GET /v1/agents?workspace=web&phase=running HTTP/1.1 ",
                "GET /v1/agents HTTP/1.1 ",
            ]
        );
    }

    #[test]
    fn agent_actions_exec_and_finish() {
        let (url, requests) = stub(vec![
            (200, agent("queued")),
            (200, agent("killed")),
            (
                200,
                json!({"exit_code": 3, "stdout": "out", "stderr": "err", "timed_out": false}),
            ),
            (200, agent("failed")),
            (
                200,
                json!({"id": "b1", "retired_at": "2026-11-23T03:00:00Z"}),
            ),
        ]);
        let run = |command| run_against(&url, GlobalArgs::default(), command).0.unwrap();
        assert_eq!(
            run(Command::Agents(AgentsCommand::Wake { id: "a-1".into() })).stdout,
            "agent/a-1 woken (queued)\n"
        );
        assert_eq!(
            run(Command::Agents(AgentsCommand::Kill { id: "a-1".into() })).stdout,
            "agent/a-1 killed\n"
        );
        assert_eq!(
            run(Command::Agents(AgentsCommand::Exec {
                id: "a-1".into(),
                timeout: Some("5s".into()),
                command: vec!["make".into(), "test".into()],
            })),
            Printed {
                stdout: "out".into(),
                stderr: "err".into(),
                exit_code: 3
            }
        );
        assert_eq!(
            run(Command::Agents(AgentsCommand::Finish {
                id: "a-1".into(),
                failed: true,
                exit_code: Some(2),
                error: None,
            }))
            .stdout,
            "agent/a-1 failed\n"
        );
        assert_eq!(
            run(Command::Builds(BuildsCommand::Retire { id: "b1".into() })).stdout,
            "build/b1 retired\n"
        );
        assert_eq!(
            requests.join().unwrap(),
            [
                "POST /v1/agents/a-1/wake HTTP/1.1 {}",
                "POST /v1/agents/a-1/kill HTTP/1.1 {}",
                r#"POST /v1/agents/a-1/exec HTTP/1.1 {"command":"make test","timeout":"5s"}"#,
                r#"POST /v1/agents/a-1/finish HTTP/1.1 {"status":"failed","exit_code":2,"error":null}"#,
                "POST /v1/builds/b1/retire HTTP/1.1 {}",
            ]
        );
    }

    fn set_args() -> WarmPoolSetArgs {
        WarmPoolSetArgs::default()
    }

    #[test]
    fn warm_pool_patches_carry_only_the_fields_given() {
        let nothing = warm_pool_patch(&set_args()).unwrap_err();
        assert_eq!(
            nothing.to_string(),
            "INVALID_ARGUMENT: nothing to set: pass --enabled, --target-size, --branch, --no-branch, --setup or --no-setup"
        );
        let all = WarmPoolSetArgs {
            enabled: Some(false),
            target_size: Some(3),
            branch: Some("main".into()),
            setup: vec!["deps=make deps".into(), "warm=make a=b".into()],
            ..set_args()
        };
        assert_eq!(
            warm_pool_patch(&all).unwrap().to_string(),
            r#"{"enabled":false,"targetSize":3,"branch":"main","setupCommands":[{"name":"deps","command":"make deps"},{"name":"warm","command":"make a=b"}]}"#
        );
        let cleared = WarmPoolSetArgs {
            no_branch: true,
            no_setup: true,
            ..set_args()
        };
        assert_eq!(
            warm_pool_patch(&cleared).unwrap().to_string(),
            r#"{"branch":null,"setupCommands":[]}"#
        );
        // The server judges the values: a negative size is sent as is.
        let negative = WarmPoolSetArgs {
            target_size: Some(-1),
            ..set_args()
        };
        assert_eq!(
            warm_pool_patch(&negative).unwrap(),
            json!({"targetSize": -1})
        );
        let bad = WarmPoolSetArgs {
            setup: vec!["deps=make deps".into(), "make warm".into()],
            ..set_args()
        };
        assert_eq!(
            warm_pool_patch(&bad).unwrap_err().to_string(),
            r#"INVALID_ARGUMENT: --setup expects NAME=COMMAND, got "make warm""#
        );
        assert_eq!(
            parse_setup("=x").unwrap(),
            json!({"name": "", "command": "x"})
        );
        // What clap refuses first, refused here too.
        let both = WarmPoolSetArgs {
            setup: vec!["a=b".into()],
            no_setup: true,
            ..set_args()
        };
        assert!(
            warm_pool_patch(&both)
                .unwrap_err()
                .message
                .contains("--no-setup")
        );
        let both = WarmPoolSetArgs {
            branch: Some("main".into()),
            no_branch: true,
            ..set_args()
        };
        assert!(
            warm_pool_patch(&both)
                .unwrap_err()
                .message
                .contains("--no-branch")
        );
    }

    #[test]
    fn instances_queries() {
        assert_eq!(
            instances_query(Some("web"), Some("failed"), true, false),
            [("workspace", "web"), ("status", "failed"), ("test", "true")]
        );
        assert_eq!(instances_query(Some("web"), None, false, true), []);
        assert_eq!(
            instances_query(None, Some("ready"), false, false),
            [("status", "ready")]
        );
    }

    fn instance(status: &str, steps: Value) -> Value {
        json!({"id": "i-1", "workspace": "web", "vm": "v-1", "test": true, "status": status,
               "summary": null, "steps": steps, "createdAt": "2026-11-23T03:00:00Z",
               "updatedAt": "2026-11-23T03:00:00Z", "finishedAt": null})
    }

    fn step(name: &str, status: &str, ms: Value) -> Value {
        json!({"name": name, "status": status, "output": "",
               "startedAt": output::rfc3339_at(json!(1000)), "durationMs": ms})
    }

    /// Runs the watch loop (without a terminal) against a list of answers,
    /// with a fake clock that advances by each sleep; returns the result,
    /// what was shown, the sleeps and the fetches made.
    fn watch(
        first: Value,
        then: Vec<Value>,
        timeout: Duration,
    ) -> (Result<Value, CliError>, Vec<String>, Vec<Duration>, usize) {
        let clock = std::cell::Cell::new(Duration::ZERO);
        let mut sleeps = Vec::new();
        let mut shown = Vec::new();
        let mut answers = then.into_iter();
        let mut fetches = 0;
        let result = watch_instance(
            first,
            timeout,
            "1s",
            &mut Live::lines(),
            Watching {
                fetch: &mut || {
                    fetches += 1;
                    Ok(answers.next().expect("no more answers"))
                },
                sleep: &mut |d| {
                    sleeps.push(d);
                    clock.set(clock.get() + d);
                },
                elapsed: &|| clock.get(),
                now_ms: &|| 0,
                show: &mut |text| shown.push(text.to_owned()),
            },
        );
        (result.map(|(answer, _)| answer), shown, sleeps, fetches)
    }

    #[test]
    fn watching_a_test_boot() {
        let ms = Duration::from_millis;
        let pending = Value::Null;
        let (r, shown, sleeps, fetches) = watch(
            instance(
                "provisioning",
                json!([
                    step("create_vm", "running", pending.clone()),
                    step("warm_pool_setup", "pending", pending.clone())
                ]),
            ),
            vec![
                instance(
                    "provisioning",
                    json!([
                        step("create_vm", "succeeded", json!(10)),
                        step("warm_pool_setup", "running", pending.clone())
                    ]),
                ),
                instance(
                    "provisioning",
                    json!([
                        step("create_vm", "succeeded", json!(10)),
                        step("warm_pool_setup", "running", pending.clone())
                    ]),
                ),
                instance(
                    "ready",
                    json!([
                        step("create_vm", "succeeded", json!(10)),
                        step("warm_pool_setup", "succeeded", json!(1200))
                    ]),
                ),
            ],
            ms(10_000),
        );
        assert_eq!(r.unwrap()["status"], "ready");
        assert_eq!(shown, ["✓ create_vm 0.01s\n", "✓ warm_pool_setup 1.2s\n"]);
        assert_eq!((sleeps, fetches), (vec![ms(300); 3], 3));
        // Already over: no request at all.
        let (r, shown, sleeps, fetches) = watch(
            instance("failed", json!([step("create_vm", "failed", json!(5))])),
            vec![],
            ms(1000),
        );
        assert_eq!(r.unwrap()["status"], "failed");
        assert_eq!(
            (shown, sleeps.len(), fetches),
            (vec!["✗ create_vm 0.01s\n".to_owned()], 0, 0)
        );
        // Out of time: the last sleep is cut to the deadline.
        let (r, shown, sleeps, fetches) = watch(
            instance("provisioning", json!([])),
            vec![
                instance("provisioning", json!([])),
                instance("provisioning", json!([])),
            ],
            ms(500),
        );
        assert_eq!(
            r.unwrap_err().to_string(),
            "DEADLINE_EXCEEDED: instance i-1 is still provisioning after 1s"
        );
        assert!(shown.is_empty(), "nothing while nothing finishes");
        assert_eq!((sleeps, fetches), (vec![ms(300), ms(200)], 2));
        // A server error ends the watch with that error; an answer that is
        // not an instance is the server's fault.
        let e = watch_instance(
            instance("provisioning", json!([])),
            ms(1000),
            "1s",
            &mut Live::lines(),
            Watching {
                fetch: &mut || Err(CliError::invalid("boom")),
                sleep: &mut |_| {},
                elapsed: &|| Duration::ZERO,
                now_ms: &|| 0,
                show: &mut |_| {},
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "INVALID_ARGUMENT: boom");
        let (r, _, _, _) = watch(json!({"id": "i-1"}), vec![], ms(1000));
        assert!(
            r.unwrap_err().message.starts_with(
                "unexpected answer to GET /v1/workspaces/{ws}/warm-pool/instances/{id}"
            )
        );
    }

    #[test]
    fn what_a_watched_test_boot_prints() {
        let ready = instance(
            "ready",
            json!([step("create_vm", "succeeded", json!(2500))]),
        );
        let view = InstanceView::from_answer("t", &ready).unwrap();
        assert_eq!(
            test_printed(&ready, &view, None),
            Printed::out("Instance i-1 ready in 2.5s\n".into())
        );
        let mut failed = instance("failed", json!([step("create_vm", "failed", json!(2500))]));
        failed["summary"] =
            json!({"success": false, "failedStep": "create_vm", "error": "no capacity"});
        failed["steps"][0]["output"] = json!("booting\nout of memory\n");
        let view = InstanceView::from_answer("t", &failed).unwrap();
        assert_eq!(
            test_printed(&failed, &view, Some(OutputFormat::Table)),
            Printed {
                stdout:
                    "Instance i-1 failed at create_vm: no capacity\n  booting\n  out of memory\n"
                        .into(),
                stderr: String::new(),
                exit_code: 1
            }
        );
        let printed = test_printed(&failed, &view, Some(OutputFormat::Json));
        assert_eq!(
            serde_json::from_str::<Value>(&printed.stdout).unwrap(),
            failed
        );
        assert_eq!(printed.exit_code, 1);
    }

    fn warm_pool_answer() -> Value {
        json!({"enabled": true, "targetSize": 2, "branch": null,
               "setupCommands": [{"name": "deps", "command": "make deps"}], "maxIdle": 2})
    }

    #[test]
    fn warm_pool_get_and_set() {
        let (url, requests) = stub(vec![
            (200, warm_pool_answer()),
            (200, warm_pool_answer()),
            (200, warm_pool_answer()),
        ]);
        let (printed, _) = run_against(
            &url,
            GlobalArgs::default(),
            Command::WarmPool(WarmPoolCommand::Get),
        );
        assert_eq!(
            printed.unwrap().stdout,
            "enabled: true\ntargetSize: 2\nbranch: null\nsetupCommands:\n- name: deps\n  command: make deps\nmaxIdle: 2\n"
        );
        let set = WarmPoolSetArgs {
            target_size: Some(2),
            no_branch: true,
            setup: vec!["deps=make deps".into()],
            ..set_args()
        };
        let (printed, _) = run_against(
            &url,
            with_workspace(Some("api")),
            Command::WarmPool(WarmPoolCommand::Set(set.clone())),
        );
        assert_eq!(
            printed.unwrap().stdout,
            "warm-pool/api configured\nenabled: true\ntargetSize: 2\nbranch: null\nsetupCommands:\n- name: deps\n  command: make deps\nmaxIdle: 2\n"
        );
        // -o json: the answer alone.
        let (printed, _) = run_against(
            &url,
            GlobalArgs {
                output: Some(OutputFormat::Json),
                ..GlobalArgs::default()
            },
            Command::WarmPool(WarmPoolCommand::Set(set)),
        );
        assert_eq!(
            serde_json::from_str::<Value>(&printed.unwrap().stdout).unwrap(),
            warm_pool_answer()
        );
        assert_eq!(
            requests.join().unwrap(),
            [
                "GET /v1/workspaces/web/warm-pool HTTP/1.1 ",
                r#"PATCH /v1/workspaces/api/warm-pool HTTP/1.1 {"targetSize":2,"branch":null,"setupCommands":[{"name":"deps","command":"make deps"}]}"#,
                r#"PATCH /v1/workspaces/web/warm-pool HTTP/1.1 {"targetSize":2,"branch":null,"setupCommands":[{"name":"deps","command":"make deps"}]}"#,
            ]
        );
    }

    fn test_boot(watch: bool, timeout: &str) -> Command {
        Command::WarmPool(WarmPoolCommand::Test {
            watch,
            timeout: timeout.into(),
        })
    }

    #[test]
    fn warm_pool_test_without_watch() {
        let (url, requests) = stub(vec![(201, instance("provisioning", json!([])))]);
        let (printed, progress) = run_against(&url, GlobalArgs::default(), test_boot(false, "30m"));
        assert_eq!(
            printed.unwrap(),
            Printed::out("Test boot started: instance i-1\n".into())
        );
        assert!(progress.is_empty());
        assert_eq!(
            requests.join().unwrap(),
            ["POST /v1/workspaces/web/warm-pool/test HTTP/1.1 {}"]
        );
    }

    fn failing_run() -> Vec<(u16, Value)> {
        let mut failed = instance(
            "failed",
            json!([
                step("create_vm", "succeeded", json!(10)),
                step("warm_pool_setup", "failed", json!(300))
            ]),
        );
        failed["summary"] = json!({"success": false, "failedStep": "warm_pool_setup", "error": "deps exited with 2"});
        failed["steps"][1]["output"] = json!("make: *** [deps] Error 2\n");
        vec![
            (
                201,
                instance(
                    "provisioning",
                    json!([
                        step("create_vm", "pending", Value::Null),
                        step("warm_pool_setup", "pending", Value::Null)
                    ]),
                ),
            ),
            (
                200,
                instance(
                    "provisioning",
                    json!([
                        step("create_vm", "succeeded", json!(10)),
                        step("warm_pool_setup", "pending", Value::Null)
                    ]),
                ),
            ),
            (200, failed),
        ]
    }

    #[test]
    fn warm_pool_test_watch_without_a_terminal() {
        let (url, requests) = stub(failing_run());
        let (printed, progress) = run_against(&url, GlobalArgs::default(), test_boot(true, "1m"));
        assert_eq!(
            printed.unwrap(),
            Printed {
                stdout: "Instance i-1 failed at warm_pool_setup: deps exited with 2\n  make: *** [deps] Error 2\n".into(),
                stderr: String::new(),
                exit_code: 1
            }
        );
        assert_eq!(
            progress,
            ["✓ create_vm 0.01s\n", "✗ warm_pool_setup 0.3s\n"]
        );
        assert_eq!(
            requests.join().unwrap(),
            [
                "POST /v1/workspaces/web/warm-pool/test HTTP/1.1 {}",
                "GET /v1/workspaces/web/warm-pool/instances/i-1 HTTP/1.1 ",
                "GET /v1/workspaces/web/warm-pool/instances/i-1 HTTP/1.1 ",
            ]
        );
    }

    #[test]
    fn warm_pool_test_watch_on_a_terminal_redraws() {
        let (url, _requests) = stub(failing_run());
        let (printed, progress) = run_in(&url, GlobalArgs::default(), test_boot(true, "1m"), true);
        assert_eq!(printed.unwrap().exit_code, 1);
        assert_eq!(
            progress,
            [
                "Test boot started: instance i-1\n",
                "\r\x1b[2K· create_vm\n\r\x1b[2K· warm_pool_setup\n\x1b[J",
                "\x1b[2A\r\x1b[2K✓ create_vm         0.01s\n\r\x1b[2K· warm_pool_setup\n\x1b[J",
                "\x1b[2A\r\x1b[2K✓ create_vm         0.01s\n\r\x1b[2K✗ warm_pool_setup   0.3s\n\x1b[J",
            ]
        );
        // -o yaml: no live display, the last answer, the same exit code.
        let (url, _requests) = stub(failing_run());
        let (printed, progress) = run_in(
            &url,
            GlobalArgs {
                output: Some(OutputFormat::Yaml),
                ..GlobalArgs::default()
            },
            test_boot(true, "1m"),
            true,
        );
        let printed = printed.unwrap();
        assert!(
            printed.stdout.starts_with("id: i-1\n"),
            "{}",
            printed.stdout
        );
        assert_eq!(printed.exit_code, 1);
        assert!(progress.is_empty());
    }

    #[test]
    fn instances_list_and_get() {
        let ready = instance(
            "ready",
            json!([step("create_vm", "succeeded", json!(1500))]),
        );
        let (url, requests) = stub(vec![
            (200, json!({"items": []})),
            (200, json!({"items": []})),
            (200, ready.clone()),
            (200, ready),
        ]);
        let list = |status: Option<&str>, test, all| {
            Command::Instances(InstancesCommand::List {
                status: status.map(str::to_owned),
                test,
                all,
            })
        };
        let (printed, _) = run_against(
            &url,
            GlobalArgs::default(),
            list(Some("failed"), true, false),
        );
        assert_eq!(printed.unwrap().stdout, "No instances found.\n");
        let (printed, _) = run_against(&url, GlobalArgs::default(), list(None, false, true));
        assert_eq!(printed.unwrap().stdout, "No instances found.\n");
        let get = |steps| {
            Command::Instances(InstancesCommand::Get {
                id: "i-1".into(),
                steps,
            })
        };
        let (printed, _) = run_against(&url, GlobalArgs::default(), get(false));
        assert!(
            printed
                .unwrap()
                .stdout
                .starts_with("id: i-1\nworkspace: web\n")
        );
        let (printed, _) = run_against(&url, GlobalArgs::default(), get(true));
        assert_eq!(
            printed.unwrap().stdout,
            "✓ create_vm 1.5s\nInstance i-1 ready in 1.5s\n"
        );
        assert_eq!(
            requests.join().unwrap(),
            [
                "GET /v1/instances?workspace=web&status=failed&test=true HTTP/1.1 ",
                "GET /v1/instances HTTP/1.1 ",
                "GET /v1/instances/i-1 HTTP/1.1 ",
                "GET /v1/instances/i-1 HTTP/1.1 ",
            ]
        );
    }

    #[test]
    fn warm_pool_input_is_checked_before_any_connection() {
        // hearth.yaml names a workspace, the server URL is unusable.
        let (printed, _) = run_against(
            "not a url",
            GlobalArgs::default(),
            Command::WarmPool(WarmPoolCommand::Set(set_args())),
        );
        assert!(
            printed
                .unwrap_err()
                .starts_with("INVALID_ARGUMENT: nothing to set")
        );
        let (printed, _) = run_against("not a url", GlobalArgs::default(), test_boot(true, "soon"));
        assert_eq!(
            printed.unwrap_err(),
            "INVALID_ARGUMENT: invalid --timeout \"soon\": use a duration such as 90s, 15m, 1h30m or 2d"
        );
        let (printed, _) = run_against("not a url", GlobalArgs::default(), test_boot(false, "30m"));
        assert!(printed.unwrap_err().contains("invalid server URL"));
    }
}
