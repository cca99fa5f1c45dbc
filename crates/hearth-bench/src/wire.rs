//! `hearth-bench wire`: what TLS costs a warm claim, side by side in one
//! run. Two real servers (same binary, same store kind): one serving TLS
//! from its own CA, one with `--plain-http` on loopback (what every server
//! spoke before TLS: the listener's code path without the handshake is the
//! same). Each round times `POST /v1/agents` warm claims (answered
//! `running`) against each server in turn, in two ways:
//!
//! - **kept alive**: one client, its connection reused (what a long-lived
//!   API client or an agent runtime sees);
//! - **fresh connection**: a new client per claim, so each claim pays the
//!   TCP connect and, with TLS, the full handshake (what one CLI
//!   invocation sees).
//!
//! The order of the four series alternates per round, so drift in a noisy
//! machine lands on both transports alike. Only warm claims count.

use crate::machine::Machine;
use crate::report;
use crate::server::{Server, Store};
use crate::spawn::{
    DriverKind, Outcome, Spawned, WARM, count, end_agents, set_pool_size, setup, spawn_timed,
    wait_warm, warm_latencies,
};
use crate::stats::{Summary, millis};
use crate::table::{Table, fixed, summary_cells};
use anyhow::{Result, bail};
use serde::Serialize;
use std::path::PathBuf;

/// The two servers' transports, in the order of the series.
const TRANSPORTS: [&str; 2] = ["TLS", "plain HTTP"];

#[derive(Debug, clap::Args)]
pub struct WireArgs {
    /// Rounds (each times every series once; the pools refill between).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Warm claims per series per round (the warm pool's size).
    #[arg(long, default_value_t = 10)]
    spawns: usize,
    /// The VM driver (no driver is called on the claim path).
    #[arg(long, value_enum, default_value_t = DriverKind::Fake)]
    driver: DriverKind,
    #[command(flatten)]
    server: crate::ServerArgs,
    /// Where to write the JSON results (default: target/bench/wire-<store>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Series {
    transport: &'static str,
    connection: &'static str,
    latency_ms: Option<Summary>,
    warm: usize,
    not_warm: usize,
    failed: usize,
    samples_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct WireReport {
    benchmark: &'static str,
    machine: Machine,
    store: Store,
    driver: DriverKind,
    rounds: usize,
    spawns: usize,
    series: Vec<Series>,
}

pub fn run(args: WireArgs) -> Result<()> {
    if args.rounds == 0 || args.spawns == 0 {
        bail!("--rounds and --spawns must be positive");
    }
    if args.driver == DriverKind::Qemu {
        bail!("--driver qemu: use fake or sandbox (the claim path calls no driver)");
    }
    let machine = Machine::probe();
    eprintln!("[wire] machine: {}", machine.describe());
    let mut config = args.server.config()?;
    config.plain_http = false;
    let tls = Server::start(&config)?;
    config.plain_http = true;
    let plain = Server::start(&config)?;
    let servers = [&tls, &plain];
    for server in servers {
        let api = server.api()?;
        setup(&api, args.driver, "", 2 * args.spawns + 8)?;
        set_pool_size(&api, WARM, args.spawns)?;
    }
    // series index = server * 2 + (fresh as usize)
    let mut spawned: Vec<Vec<Spawned>> = (0..4).map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        eprintln!("[wire] round {}/{}", round + 1, args.rounds);
        let mut order: Vec<usize> = (0..4).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let server = servers[index / 2];
            let fresh = index % 2 == 1;
            let api = server.api()?;
            wait_warm(&api, args.spawns)?;
            let mut this = Vec::with_capacity(args.spawns);
            for _ in 0..args.spawns {
                let client = if fresh { server.api()? } else { api.clone() };
                this.push(spawn_timed(&client));
            }
            end_agents(&api, &this)?;
            spawned[index].extend(this);
        }
    }
    let series = spawned
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let latencies = warm_latencies(s);
            Series {
                transport: TRANSPORTS[index / 2],
                connection: if index % 2 == 1 {
                    "fresh connection"
                } else {
                    "kept alive"
                },
                latency_ms: Summary::of_durations(&latencies),
                warm: count(s, Outcome::Warm),
                not_warm: count(s, Outcome::NotWarm),
                failed: count(s, Outcome::Failed),
                samples_ms: latencies.iter().map(|d| millis(*d)).collect(),
            }
        })
        .collect();
    let report = WireReport {
        benchmark: "wire",
        machine,
        store: config.store,
        driver: args.driver,
        rounds: args.rounds,
        spawns: args.spawns,
        series,
    };
    print!("{}", render(&report));
    let name = format!("wire-{:?}", report.store).to_lowercase();
    report::write_json(&report::json_path(args.json.as_deref(), &name), &report)
}

fn render(report: &WireReport) -> String {
    let mut table = Table::new([
        "warm claim",
        "p50 ms",
        "p99 ms",
        "max ms",
        "n",
        "not warm",
        "failed",
    ]);
    for s in &report.series {
        let mut row = vec![format!("{}, {}", s.transport, s.connection)];
        row.extend(summary_cells(s.latency_ms.as_ref(), 2));
        row.extend([s.not_warm.to_string(), s.failed.to_string()]);
        table.row(row);
    }
    let p50 = |i: usize| report.series[i].latency_ms.map(|l| l.p50);
    let mut out = format!(
        "\n## Warm claim over TLS vs plain HTTP ({:?}, {} driver, {} rounds × {} claims per series)\n\n{}",
        report.store,
        report.driver_name(),
        report.rounds,
        report.spawns,
        table.render()
    );
    for (label, tls, plain) in [("kept alive", 0, 2), ("fresh connection", 1, 3)] {
        if let (Some(t), Some(p)) = (p50(tls), p50(plain)) {
            out.push_str(&format!(
                "\nTLS − plain HTTP, {label} (p50): {} ms ({}×)\n",
                fixed(t - p, 2),
                fixed(t / p, 2)
            ));
        }
    }
    out
}

impl WireReport {
    fn driver_name(&self) -> &'static str {
        match self.driver {
            DriverKind::Sandbox => "sandbox",
            DriverKind::Fake => "fake",
            DriverKind::Qemu => "qemu",
        }
    }
}
