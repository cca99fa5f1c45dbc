//! `hearth-bench boot`: the sandbox driver alone, in this process, with no
//! server, store or HTTP in the way. Each run creates a sandbox
//! (`Driver::create`), polls the guest agent's `health` until it answers,
//! reads the host RSS of the idle sandbox's processes, then destroys it.
//! Sandboxes live in a temporary state folder and a cgroup root of their
//! own (`hearth-bench`), so they never mix with a server's.

use crate::machine::Machine;
use crate::procfs::{TreeRss, tree_rss};
use crate::report;
use crate::stats::{Summary, millis};
use crate::table::{Table, summary_cells};
use anyhow::{Context, Result, bail};
use hearth_core::ids::{TenantId, VmId};
use hearth_drivers::sandbox::{SandboxConfig, SandboxDriver};
use hearth_drivers::{Driver, ImageSpec, VmSpec};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a sandbox may take to answer its first health check.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `health` is polled while a sandbox boots.
const HEALTH_POLL: Duration = Duration::from_millis(1);
/// How long a sandbox sits idle before its RSS is read.
const IDLE_SETTLE: Duration = Duration::from_millis(250);
/// The cgroup folder the benchmark's sandboxes go in.
const CGROUP_ROOT: &str = "hearth-bench";

#[derive(Debug, clap::Args)]
pub struct BootArgs {
    /// Sandboxes to boot, one after the other.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Give each sandbox a network namespace of its own.
    #[arg(long)]
    isolated_network: bool,
    /// The guest agent binary (default: `hearth-guest-agent` next to this one).
    #[arg(long)]
    guest_agent: Option<PathBuf>,
    /// Where to write the JSON results (default: target/bench/boot.json, or
    /// boot-isolated.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One boot, measured.
#[derive(Debug, Clone, Serialize)]
struct BootSample {
    /// Until `create` returned (the agent's socket exists).
    create_ms: f64,
    /// Until the agent answered `health`.
    ready_ms: f64,
    destroy_ms: f64,
    rss_kib: u64,
    processes: usize,
}

#[derive(Debug, Serialize)]
struct BootReport {
    benchmark: &'static str,
    machine: Machine,
    runs: usize,
    isolated_network: bool,
    guest_agent: PathBuf,
    create_ms: Option<Summary>,
    ready_ms: Option<Summary>,
    destroy_ms: Option<Summary>,
    rss_mib: Option<Summary>,
    processes: Option<Summary>,
    samples: Vec<BootSample>,
}

pub fn run(args: BootArgs) -> Result<()> {
    let machine = Machine::probe();
    eprintln!("[boot] machine: {}", machine.describe());
    let guest_agent = crate::beside_exe(
        args.guest_agent.clone(),
        "hearth-guest-agent",
        "--guest-agent",
    )?;
    let state = tempfile::Builder::new()
        .prefix("hearth-bench-sandboxes-")
        .tempdir()
        .context("cannot create the state folder")?;
    let driver = driver(state.path(), &guest_agent, CGROUP_ROOT);
    let runtime = runtime()?;
    let mut samples = Vec::with_capacity(args.runs);
    for i in 1..=args.runs {
        let sample = runtime.block_on(boot_once(&driver, args.isolated_network));
        let sample = sample.inspect_err(|_| cleanup(&driver, state.path()))?;
        eprintln!(
            "[boot] {i}/{}: create {:.1} ms, ready {:.1} ms, destroy {:.1} ms, {} processes, RSS {} KiB",
            args.runs,
            sample.create_ms,
            sample.ready_ms,
            sample.destroy_ms,
            sample.processes,
            sample.rss_kib
        );
        samples.push(sample);
    }
    cleanup(&driver, state.path());
    let report = summarize(machine, &args, guest_agent, samples);
    print!("{}", render(&report));
    let name = match args.isolated_network {
        true => "boot-isolated",
        false => "boot",
    };
    report::write_json(&report::json_path(args.json.as_deref(), name), &report)
}

/// Creates one sandbox, waits for its agent, measures it and destroys it.
async fn boot_once(driver: &SandboxDriver, isolated_network: bool) -> Result<BootSample> {
    let spec = VmSpec {
        id: VmId::new(),
        tenant: TenantId::new(),
        workspace: "bench".into(),
        cpus: 1,
        memory_mib: 512,
        image: ImageSpec::default(),
        network: if isolated_network {
            hearth_drivers::NetworkSpec::none()
        } else {
            hearth_drivers::NetworkSpec::host()
        },
        disk_mib: 0,
    };
    let start = Instant::now();
    driver.create(&spec).await.context("create failed")?;
    let created = start.elapsed();
    let ready = match wait_healthy(driver, spec.id, start).await {
        Ok(ready) => ready,
        Err(e) => {
            let _ = driver.destroy(spec.id).await;
            return Err(e);
        }
    };
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss = launcher_rss(&driver.vm_dir(spec.id));
    let start = Instant::now();
    driver.destroy(spec.id).await.context("destroy failed")?;
    Ok(BootSample {
        create_ms: millis(created),
        ready_ms: millis(ready),
        destroy_ms: millis(start.elapsed()),
        rss_kib: rss.rss_kib,
        processes: rss.processes,
    })
}

/// Polls `health` until the agent answers; returns the time since `start`.
async fn wait_healthy(driver: &SandboxDriver, id: VmId, start: Instant) -> Result<Duration> {
    loop {
        let answer = driver.health(id).await;
        if answer.is_ok() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!("the guest agent of {id} did not answer within {READY_TIMEOUT:?}: {answer:?}");
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// The RSS of the launcher in `<vm_dir>/pid` and its descendants.
fn launcher_rss(vm_dir: &Path) -> TreeRss {
    std::fs::read_to_string(vm_dir.join("pid"))
        .ok()
        .and_then(|pid| pid.trim().parse().ok())
        .map_or(
            TreeRss {
                processes: 0,
                rss_kib: 0,
            },
            tree_rss,
        )
}

fn summarize(
    machine: Machine,
    args: &BootArgs,
    guest_agent: PathBuf,
    samples: Vec<BootSample>,
) -> BootReport {
    let of = |f: fn(&BootSample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>());
    BootReport {
        benchmark: "boot",
        machine,
        runs: args.runs,
        isolated_network: args.isolated_network,
        guest_agent,
        create_ms: of(|s| s.create_ms),
        ready_ms: of(|s| s.ready_ms),
        destroy_ms: of(|s| s.destroy_ms),
        rss_mib: of(|s| s.rss_kib as f64 / 1024.0),
        processes: of(|s| s.processes as f64),
        samples,
    }
}

fn render(report: &BootReport) -> String {
    let mut table = Table::new(["sandbox driver, in-process", "p50", "p99", "max", "n"]);
    let rows = [
        ("create() returns (ms)", &report.create_ms, 2),
        ("boot: create → agent answers (ms)", &report.ready_ms, 2),
        ("destroy (ms)", &report.destroy_ms, 2),
        ("idle sandbox RSS (MiB)", &report.rss_mib, 2),
        ("processes per sandbox", &report.processes, 0),
    ];
    for (label, summary, decimals) in rows {
        let mut cells = vec![label.to_owned()];
        cells.extend(summary_cells(summary.as_ref(), decimals));
        table.row(cells);
    }
    format!(
        "\nSandbox boot ({}network, {} runs)\n\n{}",
        if report.isolated_network {
            "isolated "
        } else {
            "host "
        },
        report.runs,
        table.render()
    )
}

/// A sandbox driver over `state_dir` (created if missing).
pub fn driver(state_dir: &Path, guest_agent: &Path, cgroup_root: &str) -> SandboxDriver {
    let _ = std::fs::create_dir_all(state_dir);
    SandboxDriver::new(SandboxConfig {
        state_dir: state_dir.to_owned(),
        agent_binary: guest_agent.to_owned(),
        hide: Vec::new(),
        cgroup_root_name: cgroup_root.into(),
        net: None,
    })
}

/// The ids of the sandboxes with a folder in `state_dir`.
pub fn sandbox_ids(state_dir: &Path) -> Vec<VmId> {
    std::fs::read_dir(state_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Destroys every sandbox in `ids`; the first failure is returned after
/// trying them all.
pub fn destroy_all(driver: &SandboxDriver, ids: &[VmId]) -> Result<()> {
    runtime()?.block_on(async {
        let mut first_error = None;
        for &id in ids {
            if let Err(e) = driver.destroy(id).await {
                first_error.get_or_insert(anyhow::Error::new(e).context(format!("destroy {id}")));
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

/// Destroys what is left in the state folder and removes the benchmark's
/// cgroup roots when empty.
fn cleanup(driver: &SandboxDriver, state_dir: &Path) {
    if let Err(e) = destroy_all(driver, &sandbox_ids(state_dir)) {
        eprintln!("[boot] cleanup: {e:#}");
    }
    for root in driver.cgroup_roots() {
        let _ = std::fs::remove_dir(root);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")
}
