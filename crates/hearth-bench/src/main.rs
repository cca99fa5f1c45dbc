//! `hearth-bench`: benchmarks of hearth on the machine it runs on.
//!
//! - `spawn` drives the real `hearth server` binary over real HTTP on
//!   loopback: warm claims at several client counts and cold starts, side
//!   by side in one run (see [`spawn`]);
//! - `wire` compares warm claims through a TLS server and a plain-HTTP
//!   one, kept-alive and fresh connections (see [`wire`]);
//! - `failover` times a tenant's takeover by another replica when its
//!   leader dies (see [`failover`]);
//! - `fleet` runs the pool over simulated nodes (fake drivers) in this
//!   process: placement cost, fill, backfill after a node loss (see
//!   [`fleet`]);
//! - `events` measures the event log against the real stores in this
//!   process: append throughput, a claim's cost with its event, delivery
//!   by cursor (see [`events`]);

//! - `metrics` times a scrape of `/metrics` at 10,000 VMs on SQLite and
//!   PostgreSQL, side by side (see [`metrics`]);
//! - `boot` drives the sandbox driver alone, in this process: boot and
//!   destroy times and the RSS of an idle sandbox (see [`boot`]).
//!
//! Every figure is a p50 with its spread (p99, max, n) over many runs (see
//! [`stats`]). Each command prints Markdown tables on stdout, progress on
//! stderr, and writes its figures and raw samples as JSON (`--json`,
//! default `target/bench/<name>.json`). Build everything in release mode
//! first: `cargo build --release --workspace`; the binaries it runs are
//! found next to its own.

mod api;
mod boot;
mod events;
mod failover;
mod fleet;
mod machine;
mod metrics;
mod postgres;
mod procfs;
mod provision;
mod reconcile;
mod report;
mod server;
mod spawn;
mod stats;
mod table;
mod throughput;
mod wire;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "hearth-bench", version, about = "Benchmarks of hearth")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Warm-claim latency at several client counts, and cold starts,
    /// through a real server.
    Spawn(spawn::SpawnArgs),
    /// Sandbox boot and destroy times and idle RSS, with the driver alone.
    Boot(boot::BootArgs),
    /// The provisioning pipeline on a real git repository against the same
    /// commands run by hand, side by side.
    Provision(provision::ProvisionArgs),
    /// One pool pass of a tenant at fleet scale (1k to 100k VMs), in this
    /// process: the real runner and store, the fake driver.
    Reconcile(reconcile::ReconcileArgs),
    /// Sustained warm-claim throughput through a real server (fake driver)
    /// against the raw store running the same claim statement, side by side.
    Throughput(throughput::ThroughputArgs),
    /// The pool over 100 simulated nodes and 10,000 VMs, in this process:
    /// placement cost, fill time, backfill after a node loss.
    Fleet(fleet::FleetArgs),
    /// Warm-claim latency through a TLS server against a plain-HTTP one
    /// (loopback), kept-alive and fresh connections, side by side.
    Wire(wire::WireArgs),
    /// Failover time: two pools on one PostgreSQL, the leader killed, until
    /// the other's first pass of the tenant.
    Failover(failover::FailoverArgs),
    /// The event log: append throughput under concurrent writers, a claim
    /// with its event against the claim alone, and stream-style delivery
    /// (rate and lag), SQLite and PostgreSQL side by side.
    Events(events::EventsArgs),

    /// Scrape time of `/metrics` at 10,000 VMs, SQLite and PostgreSQL side
    /// by side, in this process (the real store, the fake driver).
    Metrics(metrics::MetricsArgs),
}

/// How to start the server (shared by the commands that run one).
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The `hearth` binary (default: next to this one).
    #[arg(long)]
    hearth: Option<PathBuf>,
    /// The guest agent binary given to the server (default: next to this one).
    #[arg(long)]
    guest_agent: Option<PathBuf>,
    /// The server's store backend.
    #[arg(long, value_enum, default_value_t = server::Store::Sqlite)]
    store: server::Store,
    /// Where `--store postgres` creates (and drops) its database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Run the server with `--plain-http` (loopback) instead of TLS, e.g. to
    /// compare the two.
    #[arg(long)]
    plain_http: bool,
}

impl ServerArgs {
    fn config(&self) -> Result<server::ServerConfig> {
        Ok(server::ServerConfig {
            hearth: beside_exe(self.hearth.clone(), "hearth", "--hearth")?,
            guest_agent: beside_exe(
                self.guest_agent.clone(),
                "hearth-guest-agent",
                "--guest-agent",
            )?,
            store: self.store,
            postgres_admin_url: self.postgres_url.clone(),
            plain_http: self.plain_http,
        })
    }
}

/// `given`, or the binary `name` in this executable's folder; it must exist
/// (`flag` is the option that names it, for the error).
pub(crate) fn beside_exe(given: Option<PathBuf>, name: &str, flag: &str) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .map(|dir| dir.join(name))
            .unwrap_or_else(|| PathBuf::from(name)),
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build --release --workspace) or name it with {flag}",
            path.display()
        );
    }
    Ok(std::path::absolute(path)?)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Spawn(args) => spawn::run(args),
        Command::Boot(args) => boot::run(args),
        Command::Provision(args) => provision::run(args),
        Command::Reconcile(args) => reconcile::run(args),
        Command::Throughput(args) => throughput::run(args),
        Command::Events(args) => events::run(args),
        Command::Wire(args) => wire::run(args),
        Command::Failover(args) => failover::run(args),
        Command::Fleet(args) => fleet::run(args),
        Command::Metrics(args) => metrics::run(args),
    }
}
