//! The `hearth` binary: `hearth server` runs the control plane; every other
//! subcommand is the CLI talking to a server over HTTP.

mod listener;
mod node;
mod secrets_key;
mod server;
mod tls;

use clap::{Parser, Subcommand};

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
    #[command(flatten)]
    Client(hearth_cli::Command),
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Top::Server(args) => {
            if let Err(e) = server::run(*args) {
                eprintln!("hearth server: {e:#}");
                std::process::exit(1);
            }
        }
        Top::Client(command) => std::process::exit(hearth_cli::run(cli.global, command)),
    }
}
