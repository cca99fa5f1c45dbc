//! The `hearth` binary: `hearth server` runs the control plane, `hearth
//! node` (with flags, no further subcommand) a node agent; `hearth
//! completions` prints a shell completion script; every other subcommand
//! is the CLI talking to a server over HTTP.

mod completions;
mod listener;
mod node;
mod secrets_key;
mod server;
mod tls;

use clap::{CommandFactory, Parser, Subcommand};

/// hearth: a warm VM pool for AI coding-agent sandboxes.
#[derive(Parser)]
#[command(name = "hearth", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: hearth_cli::GlobalArgs,
    #[command(subcommand)]
    command: Top,
}

// Parsed once per process: the server's flags being larger than a client
// command's costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Top {
    /// Run the control plane (API, store, reconcilers).
    Server(Box<server::ServerArgs>),
    /// Print the shell completion script (bash, zsh or fish) to stdout
    Completions(completions::CompletionsArgs),
    #[command(flatten)]
    Client(hearth_cli::Command),
}

/// `hearth node <flags>`: the node agent (`hearth node list|cordon|…` are
/// CLI commands, parsed with the rest).
#[derive(Parser)]
#[command(
    name = "hearth node",
    version,
    about = "Run a node agent: this host's drivers, served to the control plane."
)]
struct NodeCli {
    #[command(flatten)]
    args: node::NodeArgs,
}

/// The CLI's own `hearth node …` subcommands.
const NODE_CLIENT_COMMANDS: &[&str] = &["list", "cordon", "uncordon", "drain"];

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "node")
        && !argv
            .get(2)
            .and_then(|a| a.to_str())
            .is_some_and(|a| NODE_CLIENT_COMMANDS.contains(&a))
    {
        let cli = NodeCli::parse_from(
            std::iter::once(std::ffi::OsString::from("hearth node"))
                .chain(argv[2..].iter().cloned()),
        );
        if let Err(e) = node::run(cli.args) {
            eprintln!("hearth node: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse();
    match cli.command {
        Top::Server(args) => {
            if let Err(e) = server::run(*args) {
                eprintln!("hearth server: {e:#}");
                std::process::exit(1);
            }
        }
        Top::Completions(args) => {
            if let Err(e) = completions::print(args.shell, &mut Cli::command()) {
                eprintln!("hearth completions: {e}");
                std::process::exit(1);
            }
        }
        Top::Client(command) => std::process::exit(hearth_cli::run(cli.global, command)),
    }
}
