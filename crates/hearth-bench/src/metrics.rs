//! `hearth-bench metrics`: what a scrape of `/metrics` costs at fleet scale,
//! on SQLite and PostgreSQL side by side, in this process: the real store
//! and `Pool::render_metrics` (what the `/metrics` handler answers), the
//! fake driver.
//!
//! The fleet is the one of `hearth-bench reconcile` (default 10,000 idle
//! VMs over 1,000 workspaces, set up the same way, untimed), then one pass
//! records each workspace's state. Two kinds of scrape are timed:
//!
//! - **full read**: a new `Pool` each time, so nothing is cached: the
//!   scrape reads the tenant's whole snapshot (as after any write);
//! - **cached**: the same `Pool` with nothing written since its last read:
//!   the store's change token says the read is current, and it is reused.
//!
//! Each figure is the median (p50) with p99, max and n over `--runs`
//! scrapes; the size of the answer and its sample lines are shown too.

use crate::machine::Machine;
use crate::postgres::Database;
use crate::reconcile::{Fleet, Opened, setup};
use crate::report;
use crate::server::Store as StoreKind;
use crate::stats::Summary;
use crate::table::{Table, fixed, summary_cells};
use anyhow::{Result, bail};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    /// The fleet, as VMS/WORKSPACES.
    #[arg(long, default_value = "10000/1000")]
    fleet: Fleet,
    /// Timed scrapes per measurement.
    #[arg(long, default_value_t = 15)]
    runs: usize,
    /// Where PostgreSQL's throwaway database is created (and dropped).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Where to write the JSON results (default: target/bench/metrics.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct StoreResult {
    store: StoreKind,
    setup_seconds: f64,
    /// A scrape with nothing cached, ms.
    full_read_ms: Option<Summary>,
    /// A scrape whose snapshot read is reused, ms.
    cached_ms: Option<Summary>,
    answer_bytes: usize,
    sample_lines: usize,
}

#[derive(Debug, Serialize)]
struct MetricsReport {
    benchmark: &'static str,
    machine: Machine,
    fleet: Fleet,
    runs: usize,
    stores: Vec<StoreResult>,
}

pub fn run(args: MetricsArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be positive");
    }
    let machine = Machine::probe();
    eprintln!("[metrics] machine: {}", machine.describe());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut stores = Vec::new();
    for kind in [StoreKind::Sqlite, StoreKind::Postgres] {
        // Created and dropped outside the runtime (it runs one of its own).
        let database = match kind {
            StoreKind::Postgres => Some(Database::create(&args.postgres_url)?),
            StoreKind::Sqlite => None,
        };
        let url = database.as_ref().map(|d| d.url.clone());
        let result = runtime.block_on(async {
            let opened = Opened::open(url).await?;
            let result = measure(&args, kind, &opened).await;
            opened.close().await;
            result
        });
        drop(database);
        stores.push(result?);
    }
    let report = MetricsReport {
        benchmark: "metrics",
        machine,
        fleet: args.fleet,
        runs: args.runs,
        stores,
    };
    print!("{}", render(&report));
    report::write_json(&report::json_path(args.json.as_deref(), "metrics"), &report)
}

async fn measure(args: &MetricsArgs, kind: StoreKind, opened: &Opened) -> Result<StoreResult> {
    eprintln!("[metrics] {kind:?}: setting up {:?}", args.fleet);
    let started = Instant::now();
    let rig = setup(opened, args.fleet).await?;
    let setup_seconds = started.elapsed().as_secs_f64();
    // The first pass records each workspace's state (first sight).
    rig.pool().reconcile_tenant(rig.tenant).await?;
    let expected = format!(
        "hearth_tenant_live_vms{{tenant=\"bench\"}} {}\n",
        args.fleet.vms
    );
    let check = |text: &str| -> Result<()> {
        if !text.contains(&expected) {
            bail!("the scrape does not count the fleet ({expected:?} missing)");
        }
        Ok(())
    };
    let mut full = Vec::new();
    let mut text = String::new();
    for _ in 0..args.runs {
        let pool = rig.pool();
        let started = Instant::now();
        text = pool.render_metrics().await?;
        full.push(started.elapsed());
        check(&text)?;
    }
    let pool = rig.pool();
    check(&pool.render_metrics().await?)?;
    let mut cached = Vec::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        let text = pool.render_metrics().await?;
        cached.push(started.elapsed());
        check(&text)?;
    }
    let result = StoreResult {
        store: kind,
        setup_seconds,
        full_read_ms: Summary::of_durations(&full),
        cached_ms: Summary::of_durations(&cached),
        answer_bytes: text.len(),
        sample_lines: text.lines().filter(|l| !l.starts_with('#')).count(),
    };
    eprintln!(
        "[metrics] {kind:?}: full read p50 {:.1} ms, cached p50 {:.1} ms, {} KiB",
        result.full_read_ms.map_or(f64::NAN, |s| s.p50),
        result.cached_ms.map_or(f64::NAN, |s| s.p50),
        result.answer_bytes / 1024
    );
    Ok(result)
}

fn render(report: &MetricsReport) -> String {
    let mut table = Table::new([
        "store",
        "scrape",
        "p50 ms",
        "p99 ms",
        "max ms",
        "n",
        "answer KiB",
        "samples",
    ]);
    for s in &report.stores {
        let store = match s.store {
            StoreKind::Sqlite => "SQLite",
            StoreKind::Postgres => "PostgreSQL",
        };
        for (scrape, summary) in [
            ("full read (nothing cached)", &s.full_read_ms),
            ("cached (nothing written)", &s.cached_ms),
        ] {
            let mut row = vec![store.to_owned(), scrape.to_owned()];
            row.extend(summary_cells(summary.as_ref(), 1));
            row.extend([
                fixed(s.answer_bytes as f64 / 1024.0, 0),
                s.sample_lines.to_string(),
            ]);
            table.row(row);
        }
    }
    format!(
        "\n## metrics scrape ({} VMs / {} workspaces)\n\n{}",
        report.fleet.vms,
        report.fleet.workspaces,
        table.render()
    )
}
