//! The `hearth` command-line client: the kubectl-like commands that talk to a
//! hearth server over HTTP (`get`, `set`, `patch`, `delete`, `auth`,
//! `tenant`, `identity`), the pool commands (`pool status|flush|up|reset`),
//! the agent commands (`spawn`, `agents …`), the warm-pool commands
//! (`warm-pool get|set|test`, `instances …`) and the operators' `builds`.
//!
//! The `hearth` binary flattens [`GlobalArgs`] and [`Command`] into its own
//! parser and calls [`run`], which returns the process exit code. Everything
//! here is blocking (no async runtime exists on this path).
//!
//! Modules: [`config`] finds and merges settings, [`patch`] turns `--set`
//! into a merge patch, [`output`] renders answers, [`live`] draws the steps
//! of a provisioning run while `warm-pool test --watch` waits, [`client`]
//! speaks HTTP, [`progress`] draws bars on stderr while a bake or a test
//! boot runs, [`error`] formats failures; `commands` glues them together
//! per command.

pub mod client;
mod commands;
pub mod config;
pub mod error;
pub mod events;
pub mod live;
pub mod output;
pub mod patch;
pub mod progress;

pub use output::OutputFormat;

use std::io::{IsTerminal, Read, Write};

/// Flags every command accepts, anywhere on the command line.
// `about = None`: clap would otherwise make this doc comment the `about` of
// the command that flattens these flags (the `hearth` binary).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(about = None, long_about = None)]
pub struct GlobalArgs {
    /// hearth server URL [env: HEARTH_SERVER] [else `server` in hearth.yaml]
    /// [default: https://127.0.0.1:7070]
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Identity token [env: HEARTH_TOKEN] [else the token hearth.local.yaml
    /// holds for the server, else .hearth/admin-token of a local server];
    /// never sent to a server a project file names
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// CA certificate (PEM) to check the server's certificate with [env:
    /// HEARTH_CA] [else `ca` of the server's entry in hearth.local.yaml, else
    /// .hearth/tls/ca.pem of a local server, else the system's roots]
    #[arg(long, global = true, value_name = "PATH")]
    pub ca: Option<std::path::PathBuf>,
    /// Workspace to act on [env: HEARTH_WORKSPACE] [else `workspace` in
    /// hearth.yaml]
    #[arg(long, global = true, value_name = "NAME")]
    pub workspace: Option<String>,
    /// Output format (default: a table for lists, YAML otherwise)
    #[arg(short = 'o', long, global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,
}

/// The client commands.
// `about = None`: as for [`GlobalArgs`], keep this doc out of the binary's help.
#[derive(Debug, clap::Subcommand)]
#[command(about = None, long_about = None)]
pub enum Command {
    /// Show one resource, or list every resource of a kind
    Get(GetArgs),
    /// Create or replace a resource from the YAML document on stdin
    Set(KindName),
    /// Change some fields of a resource: --set key=value
    Patch(PatchArgs),
    /// Delete a resource
    Delete(KindName),
    /// Log in, and show who you are
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Create and list tenants (operators only)
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage the identities of your tenant and their tokens
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Show and steer the warm VM pool (not available inside an agent VM)
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Start an agent in the workspace (--workspace, HEARTH_WORKSPACE or
    /// hearth.yaml)
    Spawn(SpawnArgs),
    /// List, inspect and control agents
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// List and retire control-plane builds (operators)
    #[command(subcommand)]
    Builds(BuildsCommand),
    /// Show, configure and test the workspace's warm pool (--workspace,
    /// HEARTH_WORKSPACE or hearth.yaml)
    #[command(subcommand)]
    WarmPool(WarmPoolCommand),
    /// List and inspect provisioning runs (instances) and their steps
    #[command(subcommand)]
    Instances(InstancesCommand),
    /// Bake images on the server and register prebuilt ones
    #[command(subcommand)]
    Image(ImageCommand),
    /// List the fleet's nodes and cordon, uncordon or drain one (operators)
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage webhooks: endpoints sent your tenant's events, signed
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// Show the tenant's event log (--follow: as it is written)
    Events(events::EventsArgs),
}

/// `hearth webhook ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum WebhookCommand {
    /// Create a webhook; prints its signing secret, once
    Create {
        /// Webhook name
        name: String,
        /// Where events are POSTed (https://...)
        #[arg(long, value_name = "URL")]
        url: String,
        /// Only events of this kind (vm.ready) or family (vm); repeat for
        /// more (default: every kind)
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
    },
    /// List the webhooks of your tenant
    List,
    /// Delete a webhook and its delivery log
    Delete {
        /// Webhook name
        name: String,
    },
    /// Show a webhook's delivery log, newest first: every attempt
    Deliveries {
        /// Webhook name
        name: String,
        /// At most this many attempts
        #[arg(long, default_value_t = 50, value_name = "N")]
        limit: u32,
    },
}

/// `hearth node ...` (operators; without one of these, `hearth node` is
/// the node agent).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NodeCommand {
    /// List the nodes: state, whether they report, what their VMs take
    List,
    /// Take no new VMs on the node; those it runs stay
    Cordon {
        /// Node name
        name: String,
    },
    /// Let the node take new VMs again
    Uncordon {
        /// Node name
        name: String,
    },
    /// Take no new VMs on the node and replace its idle VMs elsewhere
    Drain {
        /// Node name
        name: String,
    },
}

/// `hearth image ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ImageCommand {
    /// Bake a new version of the qemu image NAME on the server (kernel +
    /// root filesystem with the guest agent as init), following its log;
    /// exits 0 when the bake succeeded, 1 when it failed. Creates the image
    /// if it does not exist; a re-bake makes the VMs of the old one stale.
    Bake {
        name: String,
        /// `minimal` (busybox initramfs) or `debian` (debootstrap ext4
        /// disk); default: the image's, or minimal for a new image.
        #[arg(long)]
        rootfs: Option<String>,
        /// The Debian package the kernel comes from (default: the image's,
        /// or linux-image-cloud-amd64).
        #[arg(long)]
        kernel_package: Option<String>,
    },
    /// Register a folder under the server's image store (`prebuilt/PATH`)
    /// as what image NAME boots (operators only)
    Register {
        name: String,
        /// The folder, relative to the image store's prebuilt/.
        path: String,
        /// The image's driver if it does not exist yet: qemu or sandbox.
        #[arg(long)]
        driver: Option<String>,
        /// The tenant the image is for (default: yours).
        #[arg(long)]
        tenant: Option<String>,
    },
}

/// `hearth warm-pool ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum WarmPoolCommand {
    /// Show the workspace's warm-pool settings
    Get,
    /// Change the workspace's warm-pool settings (only the fields given)
    Set(WarmPoolSetArgs),
    /// Boot one VM the way a warm one is provisioned, to check the setup (it
    /// is never handed to an agent)
    Test {
        /// Show the steps as they run and wait until the VM is ready or has
        /// failed (exit 1 on failure)
        #[arg(long)]
        watch: bool,
        /// How long --watch waits, e.g. 90s, 10m, 1h
        #[arg(long, value_name = "DURATION", default_value = "30m")]
        timeout: String,
    },
}

/// `hearth warm-pool set`: each flag given becomes one field of the patch.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WarmPoolSetArgs {
    /// Turn the warm pool on or off
    #[arg(long, value_name = "BOOL")]
    pub enabled: Option<bool>,
    /// Warm VMs to keep ready (the workspace's min_idle)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub target_size: Option<i64>,
    /// Branch warm VMs check out, for every repo
    #[arg(long, value_name = "BRANCH", conflicts_with = "no_branch")]
    pub branch: Option<String>,
    /// Use each repo's own branch again
    #[arg(long)]
    pub no_branch: bool,
    /// A setup command, as NAME=COMMAND; repeat it for several (they run in
    /// order); the list replaces the current one
    #[arg(
        long = "setup",
        value_name = "NAME=COMMAND",
        conflicts_with = "no_setup"
    )]
    pub setup: Vec<String>,
    /// Remove every setup command
    #[arg(long)]
    pub no_setup: bool,
}

/// `hearth instances ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum InstancesCommand {
    /// List the workspace's provisioning runs, newest first (--all: of every
    /// workspace)
    List {
        /// Only runs in this status (provisioning, ready or failed)
        #[arg(long, value_name = "STATUS")]
        status: Option<String>,
        /// Only test boots (hearth warm-pool test)
        #[arg(long)]
        test: bool,
        /// Every workspace, even when one is configured
        #[arg(long)]
        all: bool,
    },
    /// Show one provisioning run
    Get {
        /// Instance id
        id: String,
        /// Show the steps and their output instead of the record
        #[arg(long)]
        steps: bool,
    },
}

/// `hearth pool ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PoolCommand {
    /// Show the pool's VMs, configuration and per-workspace health
    Status,
    /// Replace the warm (idle) VMs with fresh ones: of the whole pool, or of
    /// --workspace / HEARTH_WORKSPACE only
    Flush {
        /// Instead: terminate every agent, delete every VM and stop the pool
        #[arg(long)]
        nuke: bool,
    },
    /// Start a stopped pool and replenish it to min_idle now
    Up,
    /// Clear a workspace's failure back-off and hard limit (--workspace,
    /// HEARTH_WORKSPACE or hearth.yaml)
    Reset,
}

/// `hearth spawn`.
#[derive(Debug, Clone, clap::Args)]
pub struct SpawnArgs {
    /// Shell command the agent runs on its VM; the agent ends with it
    #[arg(long, value_name = "CMD")]
    pub command: Option<String>,
    /// Id of the agent this one is a sub-agent of
    #[arg(long, value_name = "ID")]
    pub parent: Option<String>,
    /// What happens when the agent goes idle: sleep, terminate or keep-alive
    /// (default: the server's)
    #[arg(long, value_name = "POLICY")]
    pub on_idle: Option<String>,
    /// Wait until the agent runs (with --command: until it has finished,
    /// then exit with its exit code)
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 90s, 10m, 1h
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub wait_timeout: String,
}

/// `hearth agents ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AgentsCommand {
    /// List the agents of the workspace (--all: of every workspace)
    List {
        /// Only agents in this phase (queued, provisioning, running, idle,
        /// sleeping, completed, failed, killed)
        #[arg(long, value_name = "PHASE")]
        phase: Option<String>,
        /// Every workspace, even when one is configured
        #[arg(long)]
        all: bool,
    },
    /// Show one agent
    Get {
        /// Agent id
        id: String,
    },
    /// Kill an agent
    Kill {
        /// Agent id
        id: String,
    },
    /// Put an agent to sleep
    Sleep {
        /// Agent id
        id: String,
    },
    /// Wake a sleeping agent
    Wake {
        /// Agent id
        id: String,
    },
    /// Resurrect a finished agent
    Resurrect {
        /// Agent id
        id: String,
    },
    /// Run a command in an agent's VM: hearth agents exec ID -- COMMAND...
    Exec {
        /// Agent id
        id: String,
        /// Give up on the command after this long, e.g. 30s, 5m (default:
        /// the server's)
        #[arg(long, value_name = "DURATION")]
        timeout: Option<String>,
        /// The command and its arguments, after `--` (each stays one argument)
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Record that an agent has finished
    Finish {
        /// Agent id
        id: String,
        /// The agent failed (default: completed)
        #[arg(long)]
        failed: bool,
        /// The agent's exit code
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        exit_code: Option<i32>,
        /// What went wrong
        #[arg(long, value_name = "MSG")]
        error: Option<String>,
    },
}

/// `hearth builds ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BuildsCommand {
    /// List the builds seen, the current one marked with *
    List,
    /// Retire a build: agents' workflows still pinned to it become stranded
    Retire {
        /// Build id
        id: String,
    },
}

/// `hearth get KIND [NAME]`.
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// pool-config, workspace (ws), environment (env) or image
    pub kind: String,
    /// Resource name; omit it to list them all
    pub name: Option<String>,
}

/// A kind and a resource name (`hearth set`, `hearth delete`).
#[derive(Debug, Clone, clap::Args)]
pub struct KindName {
    /// pool-config, workspace (ws), environment (env) or image
    pub kind: String,
    /// Resource name (the pool config is always `default`)
    pub name: String,
}

/// `hearth patch KIND NAME --set key=value...`.
#[derive(Debug, Clone, clap::Args)]
pub struct PatchArgs {
    /// pool-config, workspace (ws), environment (env) or image
    pub kind: String,
    /// Resource name
    pub name: String,
    /// Field to change, as key=value: dotted keys nest (warm_pool.enabled=false),
    /// the value is YAML (100, true, 'quoted string'), null removes the field
    #[arg(long = "set", value_name = "KEY=VALUE", required = true)]
    pub set: Vec<String>,
}

/// `hearth auth ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AuthCommand {
    /// Check a token (--token) against the server (--server or the usual
    /// sources) and save it to hearth.local.yaml next to hearth.yaml
    Login,
    /// Show the tenant, identity and role the current token stands for
    Whoami,
}

/// `hearth tenant ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and its first admin identity; prints the admin's token
    Create {
        /// Tenant name
        name: String,
        /// Name of the tenant's first admin identity
        #[arg(long, default_value = "admin", value_name = "NAME")]
        admin: String,
    },
    /// List tenants
    List,
}

/// `hearth identity ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum IdentityCommand {
    /// Create an identity; prints its first token
    Create {
        /// Identity name
        name: String,
        /// viewer, developer, admin or operator
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// developer (a person) or service (an automation)
        #[arg(long, default_value = "developer", value_name = "KIND")]
        kind: String,
        /// Token lifetime, e.g. 1h, 24h, 30d (default: no expiry)
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
    },
    /// List the identities of your tenant
    List,
    /// Delete an identity and revoke its tokens
    Delete {
        /// Identity name
        name: String,
    },
    /// Issue a new token for an identity
    Token {
        /// Identity name
        name: String,
        /// Token lifetime, e.g. 1h, 24h, 30d
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
    },
}

/// Runs one client command against the process's current directory,
/// environment and stdin; prints the result and returns the exit code
/// (0 on success, 1 after printing `CODE: message` on stderr, or the code a
/// command reports: an agent's or a remote command's exit code).
pub fn run(global: GlobalArgs, command: Command) -> i32 {
    let env = |name: &str| std::env::var(name).ok();
    let stdout_is_tty = std::io::stdout().is_terminal();
    let stderr_is_tty = std::io::stderr().is_terminal();
    let progress = |line: &str| write_ignoring_closed_pipe(&mut std::io::stdout().lock(), line);
    let result = std::env::current_dir()
        .map_err(|e| anyhow::anyhow!("cannot read the current directory: {e}"))
        .and_then(|cwd| {
            let ctx = commands::Context {
                cwd: &cwd,
                env: &env,
                read_stdin: &read_stdin,
                vm_id_file: std::path::Path::new(commands::VM_ID_FILE),
                progress: &progress,
                stdout_is_tty,
                stderr_is_tty,
            };
            commands::execute(&global, command, &ctx)
        });
    match result {
        Ok(printed) => {
            write_ignoring_closed_pipe(&mut std::io::stdout().lock(), &printed.stdout);
            write_ignoring_closed_pipe(&mut std::io::stderr().lock(), &printed.stderr);
            printed.exit_code
        }
        Err(err) => {
            eprintln!("{}", error::error_line(&err));
            1
        }
    }
}

/// Reads all of stdin; a terminal counts as empty rather than waiting for
/// typing.
fn read_stdin() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(String::new());
    }
    let mut text = String::new();
    stdin
        .lock()
        .read_to_string(&mut text)
        .map_err(|e| error::CliError::invalid(format!("cannot read stdin: {e}")))?;
    Ok(text)
}

/// Writes `text`; a reader that went away (`hearth get ws | head -1`) is not
/// an error worth reporting.
fn write_ignoring_closed_pipe(out: &mut dyn Write, text: &str) {
    if !text.is_empty() {
        let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    // The shape the `hearth` binary wraps these types in (no doc comment,
    // as in its sketch: a doc comment here would be its `about`).
    #[derive(Debug, clap::Parser)]
    #[command(name = "hearth")]
    struct Cli {
        #[command(flatten)]
        global: GlobalArgs,
        #[command(subcommand)]
        command: Top,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Top {
        Server,
        #[command(flatten)]
        Client(Command),
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("hearth").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    // A binary whose parser has a description of its own:
    #[derive(Debug, clap::Parser)]
    #[command(name = "hearth")]
    /// hearth: warm VM pools
    struct Described {
        #[command(flatten)]
        global: GlobalArgs,
        #[command(subcommand)]
        command: Command,
    }

    #[test]
    fn our_docs_do_not_become_the_binarys_description() {
        let cmd = Cli::command();
        assert_eq!(cmd.get_about(), None);
        assert_eq!(cmd.get_long_about(), None);
        let cmd = Described::command();
        assert_eq!(
            cmd.get_about().map(ToString::to_string).as_deref(),
            Some("hearth: warm VM pools")
        );
        let get = cmd.find_subcommand("get").unwrap();
        assert_eq!(
            get.get_about().map(ToString::to_string).as_deref(),
            Some("Show one resource, or list every resource of a kind")
        );
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["get", "ws", "web", "-o", "json", "--server", "http://h:1"]);
        assert_eq!(cli.global.output, Some(OutputFormat::Json));
        assert_eq!(cli.global.server.as_deref(), Some("http://h:1"));
        let Top::Client(Command::Get(get)) = cli.command else {
            panic!("not get")
        };
        assert_eq!(
            (get.kind.as_str(), get.name.as_deref()),
            ("ws", Some("web"))
        );

        let cli = parse(&["--token", "t", "auth", "login"]);
        assert_eq!(cli.global.token.as_deref(), Some("t"));
        let cli = parse(&["auth", "login", "--token", "t", "--server", "http://h"]);
        assert_eq!(cli.global.token.as_deref(), Some("t"));
        assert!(matches!(
            cli.command,
            Top::Client(Command::Auth(AuthCommand::Login))
        ));
        let cli = parse(&["server", "--workspace", "w"]);
        assert_eq!(cli.global.workspace.as_deref(), Some("w"));
    }

    #[test]
    fn subcommands_parse() {
        let cli = parse(&[
            "patch",
            "pool-config",
            "default",
            "--set",
            "a=1",
            "--set",
            "b.c=x",
        ]);
        let Top::Client(Command::Patch(p)) = cli.command else {
            panic!()
        };
        assert_eq!(p.set, ["a=1", "b.c=x"]);
        assert!(
            Cli::try_parse_from(["hearth", "patch", "pool-config", "default"]).is_err(),
            "at least one --set"
        );
        let cli = parse(&[
            "identity",
            "create",
            "ci",
            "--role",
            "developer",
            "--kind",
            "service",
            "--expires-in",
            "24h",
        ]);
        assert!(matches!(
            cli.command,
            Top::Client(Command::Identity(IdentityCommand::Create { ref kind, ref expires_in, .. }))
                if kind == "service" && expires_in.as_deref() == Some("24h")
        ));
        let cli = parse(&["tenant", "create", "acme"]);
        assert!(matches!(
            cli.command,
            Top::Client(Command::Tenant(TenantCommand::Create { ref admin, .. })) if admin == "admin"
        ));
        assert!(Cli::try_parse_from(["hearth", "get", "ws", "-o", "xml"]).is_err());
    }

    #[test]
    fn webhook_commands_parse() {
        let cli = parse(&[
            "webhook",
            "create",
            "ci",
            "--url",
            "https://h/x",
            "--type",
            "vm",
            "--type",
            "pool",
        ]);
        assert!(matches!(
            cli.command,
            Top::Client(Command::Webhook(WebhookCommand::Create { ref name, ref url, ref types }))
                if name == "ci" && url == "https://h/x" && types == &["vm", "pool"]
        ));
        assert!(
            Cli::try_parse_from(["hearth", "webhook", "create", "ci"]).is_err(),
            "--url is required"
        );
        assert!(matches!(
            parse(&["webhook", "deliveries", "ci"]).command,
            Top::Client(Command::Webhook(WebhookCommand::Deliveries {
                limit: 50,
                ..
            }))
        ));
        parse(&["webhook", "list"]);
        parse(&["webhook", "delete", "ci"]);
    }

    #[test]
    fn pool_agent_and_build_commands_parse() {
        let cli = parse(&["pool", "flush", "--nuke", "--workspace", "web"]);
        assert_eq!(cli.global.workspace.as_deref(), Some("web"));
        assert!(matches!(
            cli.command,
            Top::Client(Command::Pool(PoolCommand::Flush { nuke: true }))
        ));
        assert!(matches!(
            parse(&["pool", "flush"]).command,
            Top::Client(Command::Pool(PoolCommand::Flush { nuke: false }))
        ));
        let cli = parse(&["pool", "reset", "--workspace", "web"]);
        assert!(matches!(
            cli.command,
            Top::Client(Command::Pool(PoolCommand::Reset))
        ));

        let Top::Client(Command::Spawn(spawn)) = parse(&["spawn"]).command else {
            panic!("not spawn")
        };
        assert_eq!(
            (spawn.command, spawn.wait, spawn.wait_timeout.as_str()),
            (None, false, "10m")
        );
        let Top::Client(Command::Spawn(spawn)) = parse(&[
            "spawn",
            "--command",
            "make test",
            "--parent",
            "p-1",
            "--on-idle",
            "keep-alive",
            "--wait",
            "--wait-timeout",
            "90s",
        ])
        .command
        else {
            panic!("not spawn")
        };
        assert_eq!(spawn.command.as_deref(), Some("make test"));
        assert_eq!(spawn.parent.as_deref(), Some("p-1"));
        assert_eq!(spawn.on_idle.as_deref(), Some("keep-alive"));
        assert!(spawn.wait);
        assert_eq!(spawn.wait_timeout, "90s");

        let cli = parse(&["agents", "list", "--phase", "running", "--all"]);
        assert!(matches!(
            cli.command,
            Top::Client(Command::Agents(AgentsCommand::List { ref phase, all: true }))
                if phase.as_deref() == Some("running")
        ));
        for verb in ["get", "kill", "sleep", "wake", "resurrect"] {
            parse(&["agents", verb, "a-1"]);
        }
        assert!(Cli::try_parse_from(["hearth", "agents", "kill"]).is_err());

        // exec: everything after `--` is the command, flags included.
        let cli = parse(&[
            "agents",
            "exec",
            "a-1",
            "--timeout",
            "30s",
            "-o",
            "json",
            "--",
            "ls",
            "-la",
            "--all",
        ]);
        assert_eq!(cli.global.output, Some(OutputFormat::Json));
        let Top::Client(Command::Agents(AgentsCommand::Exec {
            id,
            timeout,
            command,
        })) = cli.command
        else {
            panic!("not exec")
        };
        assert_eq!(
            (id.as_str(), timeout.as_deref(), command),
            (
                "a-1",
                Some("30s"),
                vec!["ls".into(), "-la".into(), "--all".into()]
            )
        );
        assert!(
            Cli::try_parse_from(["hearth", "agents", "exec", "a-1"]).is_err(),
            "a command is required"
        );
        assert!(
            Cli::try_parse_from(["hearth", "agents", "exec", "a-1", "ls"]).is_err(),
            "the command comes after --"
        );

        let cli = parse(&[
            "agents",
            "finish",
            "a-1",
            "--failed",
            "--exit-code",
            "-1",
            "--error",
            "boom",
        ]);
        assert!(matches!(
            cli.command,
            Top::Client(Command::Agents(AgentsCommand::Finish {
                failed: true,
                exit_code: Some(-1),
                ref error,
                ..
            })) if error.as_deref() == Some("boom")
        ));
        assert!(matches!(
            parse(&["agents", "finish", "a-1"]).command,
            Top::Client(Command::Agents(AgentsCommand::Finish {
                failed: false,
                exit_code: None,
                error: None,
                ..
            }))
        ));

        assert!(matches!(
            parse(&["builds", "list"]).command,
            Top::Client(Command::Builds(BuildsCommand::List))
        ));
        assert!(matches!(
            parse(&["builds", "retire", "b1"]).command,
            Top::Client(Command::Builds(BuildsCommand::Retire { ref id })) if id == "b1"
        ));
    }

    #[test]
    fn warm_pool_and_instances_commands_parse() {
        assert!(matches!(
            parse(&["warm-pool", "get", "--workspace", "web", "-o", "json"]).command,
            Top::Client(Command::WarmPool(WarmPoolCommand::Get))
        ));
        let set = |args: &[&str]| {
            let all: Vec<&str> = ["warm-pool", "set"].iter().chain(args).copied().collect();
            match parse(&all).command {
                Top::Client(Command::WarmPool(WarmPoolCommand::Set(set))) => set,
                other => panic!("not warm-pool set: {other:?}"),
            }
        };
        let s = set(&[
            "--enabled",
            "false",
            "--target-size",
            "3",
            "--branch",
            "main",
            "--setup",
            "deps=make deps",
            "--setup",
            "warm=make warm",
        ]);
        assert_eq!(s.enabled, Some(false));
        assert_eq!(s.target_size, Some(3));
        assert_eq!(s.branch.as_deref(), Some("main"));
        assert_eq!(s.setup, ["deps=make deps", "warm=make warm"]);
        assert!(!s.no_branch && !s.no_setup);
        let s = set(&["--no-branch", "--no-setup", "--target-size", "-1"]);
        assert!(s.no_branch && s.no_setup);
        assert_eq!(s.target_size, Some(-1), "the server judges it");
        let s = set(&[]);
        assert_eq!((s.enabled, s.target_size, s.setup.len()), (None, None, 0));
        // Usage errors: clap's exit 2.
        let fails = |args: &[&str]| {
            let all: Vec<&str> = ["hearth", "warm-pool", "set"]
                .iter()
                .chain(args)
                .copied()
                .collect();
            Cli::try_parse_from(all).is_err()
        };
        assert!(fails(&["--setup", "a=b", "--no-setup"]));
        assert!(fails(&["--branch", "main", "--no-branch"]));
        assert!(fails(&["--enabled", "yes"]), "true or false");
        assert!(fails(&["--enabled"]), "a value is needed");
        assert!(fails(&["--target-size", "two"]));

        let Top::Client(Command::WarmPool(WarmPoolCommand::Test { watch, timeout })) =
            parse(&["warm-pool", "test"]).command
        else {
            panic!("not warm-pool test")
        };
        assert_eq!((watch, timeout.as_str()), (false, "30m"));
        let Top::Client(Command::WarmPool(WarmPoolCommand::Test { watch, timeout })) =
            parse(&["warm-pool", "test", "--watch", "--timeout", "5m"]).command
        else {
            panic!("not warm-pool test")
        };
        assert_eq!((watch, timeout.as_str()), (true, "5m"));

        assert!(matches!(
            parse(&["instances", "list", "--status", "failed", "--test", "--all"]).command,
            Top::Client(Command::Instances(InstancesCommand::List { ref status, test: true, all: true }))
                if status.as_deref() == Some("failed")
        ));
        assert!(matches!(
            parse(&["instances", "list"]).command,
            Top::Client(Command::Instances(InstancesCommand::List {
                status: None,
                test: false,
                all: false
            }))
        ));
        assert!(matches!(
            parse(&["instances", "get", "i-1", "--steps"]).command,
            Top::Client(Command::Instances(InstancesCommand::Get { ref id, steps: true })) if id == "i-1"
        ));
        assert!(Cli::try_parse_from(["hearth", "instances", "get"]).is_err());
    }
}
