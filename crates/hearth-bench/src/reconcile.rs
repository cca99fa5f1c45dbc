//! `hearth-bench reconcile`: what one pool pass of a tenant costs at fleet
//! scale, in this process: the real runner (`Pool::reconcile_tenant`), the
//! real store (a SQLite file in a temp folder, or `--store postgres` on a
//! throwaway database) and the fake driver.
//!
//! For each fleet of M VMs over W workspaces (default 1,000/100,
//! 10,000/1,000 and 100,000/10,000):
//!
//! - **setup** (untimed): one tenant, a pool config with `max_vms = M` (so
//!   claims never trigger backfill boots: the cap binds), an environment
//!   with `driver: fake`, W workspaces with `min_idle = max_idle = M/W`
//!   written through the store as the API writes them, and M VMs already
//!   idle, bulk-inserted with raw SQL in batches (the columns and values
//!   `Store::insert_vm` writes for a VM that `vm_ready` made idle) and
//!   created in the fake driver too. One pass must then plan nothing
//!   (it also records each workspace's state on first sight).
//! - **first pass**: a new `Pool` each time (nothing cached in it), one pass.
//! - **no-change pass**: passes of one `Pool` with nothing written in
//!   between.
//! - **K changes** (K = 1, 1% and 10% of the fleet by default): K agents
//!   are queued (through the store, untimed, spread over the workspaces),
//!   then one pass assigns each an idle VM: its read sees the new queue,
//!   the planner plans K `Assign`s, and it acts (one claim transaction per
//!   assign; the agent is read back only when it has a command to start,
//!   and these have none). Afterwards (untimed) each VM is released back
//!   to idle and its agent completed, so every run starts from the same
//!   fleet.
//!
//! Each pass is timed whole and split as the runner reports it
//! (`Pool::last_pass`: read, reap, plan, act). Peak RSS is the process's
//! `VmHWM` after the pass, reset to the current RSS (`5` written to
//! `/proc/self/clear_refs`) right before it; the process holds the whole
//! fleet all along (SQLite's page cache, the fake driver's VMs, the read
//! the pool keeps between passes), so the growth over the RSS right before
//! the pass is shown too.

use crate::machine::Machine;
use crate::postgres::Database;
use crate::procfs::vm_rss_kib;
use crate::report;
use crate::server::Store as StoreKind;
use crate::stats::{Summary, millis};
use crate::table::{Table, fixed, summary_cells};
use anyhow::{Context, Result, bail};
use hearth_core::ids::{AgentId, IdentityId, TenantId, TokenId, VmId};
use hearth_core::rbac::IdentityKind;
use hearth_core::resource::{Environment, Format, PoolConfig, Spec, Workspace, parse_spec};
use hearth_drivers::fake::{FakeConfig, FakeDriver};
use hearth_drivers::{Driver, Drivers, VmSpec};
use hearth_reconcilers::plan::Action;
use hearth_reconcilers::status::PassStats;
use hearth_reconcilers::{Pool, PoolOptions};
use hearth_store::{
    AgentPhase, AgentUpdate, NewAgent, NewToken, OnIdle, PgStore, Precondition, PutResource,
    SqliteStore, Store, VmRecord, VmState, now_millis,
};
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows per bulk `INSERT` (14 parameters each: within both backends' limits).
const INSERT_BATCH: usize = 1000;
/// Rows per bulk-insert transaction.
const TRANSACTION_ROWS: usize = 20_000;
/// Store calls in flight at once during (untimed) setup and resets.
const SETUP_CONCURRENCY: usize = 8;
const ENVIRONMENT: &str = "bench";

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// Fleets to measure, as VMS/WORKSPACES pairs.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000/100,10000/1000,100000/10000"
    )]
    fleets: Vec<Fleet>,
    /// Changes per K-change pass: a count, or a percentage of the fleet.
    #[arg(long, value_delimiter = ',', default_value = "1,1%,10%")]
    changes: Vec<Changes>,
    /// Timed passes per measurement.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// The store backend.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    store: StoreKind,
    /// Where `--store postgres` creates (and drops) its database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Where to write the JSON results (default:
    /// target/bench/reconcile-<store>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// M VMs over W workspaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fleet {
    pub(crate) vms: usize,
    pub(crate) workspaces: usize,
}

impl FromStr for Fleet {
    type Err = String;
    fn from_str(s: &str) -> Result<Fleet, String> {
        let (vms, workspaces) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected VMS/WORKSPACES"))?;
        let number = |t: &str| {
            t.trim()
                .replace('_', "")
                .parse::<usize>()
                .map_err(|e| format!("{t:?}: {e}"))
        };
        let fleet = Fleet {
            vms: number(vms)?,
            workspaces: number(workspaces)?,
        };
        if fleet.workspaces == 0 || fleet.vms == 0 || !fleet.vms.is_multiple_of(fleet.workspaces) {
            return Err(format!(
                "{s:?}: VMS must be a positive multiple of WORKSPACES (each workspace keeps VMS/WORKSPACES warm)"
            ));
        }
        Ok(fleet)
    }
}

/// K: a count, or a percentage of the fleet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Changes {
    Count(usize),
    Percent(f64),
}

impl FromStr for Changes {
    type Err = String;
    fn from_str(s: &str) -> Result<Changes, String> {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(p) => {
                let p: f64 = p.parse().map_err(|e| format!("{s:?}: {e}"))?;
                if !(p > 0.0 && p <= 100.0) {
                    return Err(format!("{s:?}: a percentage in (0, 100]"));
                }
                Ok(Changes::Percent(p))
            }
            None => match s.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!("{s:?}: a positive count or a percentage")),
                Ok(n) => Ok(Changes::Count(n)),
            },
        }
    }
}

impl Changes {
    fn of(self, fleet: Fleet) -> usize {
        match self {
            Changes::Count(n) => n,
            Changes::Percent(p) => ((fleet.vms as f64 * p / 100.0).round() as usize).max(1),
        }
        .min(fleet.vms)
    }

    fn label(self) -> String {
        match self {
            Changes::Count(n) => n.to_string(),
            Changes::Percent(p) => format!("{p}%"),
        }
    }
}

/// The figures of one kind of pass.
#[derive(Debug, Serialize)]
struct Scenario {
    /// `first`, `no_change` or `changes`.
    pass: &'static str,
    /// K, for `changes`.
    changes: Option<usize>,
    /// The whole pass, ms.
    total_ms: Option<Summary>,
    read_ms: Option<Summary>,
    reap_ms: Option<Summary>,
    plan_ms: Option<Summary>,
    act_ms: Option<Summary>,
    /// Passes that reused the previous snapshot (nothing written since).
    reused: usize,
    /// Actions planned per pass.
    actions: Option<Summary>,
    /// `VmHWM` after the pass (reset right before it), MiB.
    peak_rss_mib: Option<Summary>,
    /// That peak minus the RSS right before the pass, MiB.
    rss_growth_mib: Option<Summary>,
    samples_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct FleetResult {
    vms: usize,
    workspaces: usize,
    /// Wall time of the (untimed) setup, seconds.
    setup_seconds: f64,
    /// The setup's check pass (it also records each workspace's state).
    check_pass_ms: f64,
    scenarios: Vec<Scenario>,
}

#[derive(Debug, Serialize)]
struct ReconcileReport {
    benchmark: &'static str,
    machine: Machine,
    store: StoreKind,
    runs: usize,
    fleets: Vec<FleetResult>,
}

pub fn run(args: ReconcileArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be positive");
    }
    let machine = Machine::probe();
    eprintln!("[reconcile] machine: {}", machine.describe());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut fleets = Vec::new();
    for &fleet in &args.fleets {
        // Created and dropped outside the runtime (it runs one of its own).
        let database = match args.store {
            StoreKind::Postgres => Some(Database::create(&args.postgres_url)?),
            StoreKind::Sqlite => None,
        };
        let url = database.as_ref().map(|d| d.url.clone());
        let result = runtime.block_on(measure_fleet(&args, fleet, url));
        drop(database);
        fleets.push(result?);
    }
    let report = ReconcileReport {
        benchmark: "reconcile",
        machine,
        store: args.store,
        runs: args.runs,
        fleets,
    };
    print!("{}", render(&report));
    let name = format!("reconcile-{:?}", args.store).to_lowercase();
    report::write_json(&report::json_path(args.json.as_deref(), &name), &report)
}

/// The store under test, and what closes it.
pub(crate) enum Opened {
    Sqlite {
        store: SqliteStore,
        /// Holds the database file; removed when dropped.
        _dir: tempfile::TempDir,
    },
    Postgres(PgStore),
}

impl Opened {
    pub(crate) async fn open(url: Option<String>) -> Result<Opened> {
        Ok(match url {
            Some(url) => Opened::Postgres(PgStore::connect(&url).await?),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("hearth-bench-reconcile-")
                    .tempdir_in("/var/tmp")?;
                let store = SqliteStore::open(&dir.path().join("hearth.db")).await?;
                Opened::Sqlite { store, _dir: dir }
            }
        })
    }

    fn store(&self) -> Arc<dyn Store> {
        match self {
            Opened::Sqlite { store: s, .. } => Arc::new(s.clone()),
            Opened::Postgres(s) => Arc::new(s.clone()),
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            Opened::Sqlite { store: s, .. } => s.close().await,
            Opened::Postgres(s) => s.close().await,
        }
    }
}

/// What the measurements need of a set-up fleet.
pub(crate) struct Rig {
    pub(crate) store: Arc<dyn Store>,
    drivers: Drivers,
    options: PoolOptions,
    pub(crate) tenant: TenantId,
    fleet: Fleet,
}

impl Rig {
    pub(crate) fn pool(&self) -> Arc<Pool> {
        Pool::new(
            self.store.clone(),
            self.drivers.clone(),
            self.options.clone(),
        )
    }
}

async fn measure_fleet(
    args: &ReconcileArgs,
    fleet: Fleet,
    url: Option<String>,
) -> Result<FleetResult> {
    let opened = Opened::open(url).await?;
    let result = measure_opened(args, fleet, &opened).await;
    opened.close().await;
    result
}

async fn measure_opened(
    args: &ReconcileArgs,
    fleet: Fleet,
    opened: &Opened,
) -> Result<FleetResult> {
    let label = format!("{} VMs / {} workspaces", fleet.vms, fleet.workspaces);
    eprintln!("[reconcile] {label}: setting up");
    let started = Instant::now();
    let rig = setup(opened, fleet).await?;
    let setup_seconds = started.elapsed().as_secs_f64();
    eprintln!("[reconcile] {label}: set up in {setup_seconds:.1} s; checking");

    // The check: nothing to do. Its pass also records each workspace's
    // state (first sight), so it is not one of the measured ones.
    let pool = rig.pool();
    let started = Instant::now();
    let actions = pool.reconcile_tenant(rig.tenant).await?;
    let check_pass_ms = millis(started.elapsed());
    if !actions.is_empty() {
        bail!(
            "the set-up fleet should need nothing, yet the planner wants {} actions, first: {:?}",
            actions.len(),
            &actions[..actions.len().min(5)]
        );
    }
    let actions = pool.reconcile_tenant(rig.tenant).await?;
    if !actions.is_empty() {
        bail!("a second pass planned {} actions", actions.len());
    }
    eprintln!("[reconcile] {label}: check pass {check_pass_ms:.1} ms, nothing to do");

    let mut scenarios = Vec::new();

    // (a) The first pass of a new Pool.
    let mut passes = Vec::new();
    for _ in 0..args.runs {
        let pool = rig.pool();
        let pass = timed_pass(&pool, rig.tenant).await?;
        expect_nothing(&pass)?;
        passes.push(pass);
    }
    scenarios.push(summarize("first", None, &passes));
    progress(&label, scenarios.last());

    // (b) Passes with nothing written since the previous one.
    let pool = rig.pool();
    expect_nothing(&timed_pass(&pool, rig.tenant).await?)?;
    let mut passes = Vec::new();
    for _ in 0..args.runs {
        let pass = timed_pass(&pool, rig.tenant).await?;
        expect_nothing(&pass)?;
        passes.push(pass);
    }
    scenarios.push(summarize("no_change", None, &passes));
    progress(&label, scenarios.last());

    // (c) K agents queued, assigned by the pass.
    for &changes in &args.changes {
        let k = changes.of(fleet);
        let mut passes = Vec::new();
        for _ in 0..args.runs {
            queue_agents(&rig, k).await?;
            let pass = timed_pass(&pool, rig.tenant).await?;
            let assigns = pass
                .actions
                .iter()
                .filter(|a| matches!(a, Action::Assign { .. }))
                .count();
            if assigns != k || pass.actions.len() != k {
                bail!(
                    "{k} queued agents: the pass planned {} actions ({assigns} assigns), first: {:?}",
                    pass.actions.len(),
                    &pass.actions[..pass.actions.len().min(5)]
                );
            }
            let assigned = reset(&rig).await?;
            if assigned != k {
                bail!("{k} queued agents: {assigned} VMs were assigned");
            }
            passes.push(pass);
        }
        scenarios.push(summarize("changes", Some(k), &passes));
        progress(
            &format!("{label}, K = {}", changes.label()),
            scenarios.last(),
        );
    }
    Ok(FleetResult {
        vms: fleet.vms,
        workspaces: fleet.workspaces,
        setup_seconds,
        check_pass_ms,
        scenarios,
    })
}

fn progress(label: &str, scenario: Option<&Scenario>) {
    if let Some(s) = scenario {
        eprintln!(
            "[reconcile] {label}: {} pass p50 {:.2} ms (read {:.2}, plan {:.2}, act {:.2}), peak RSS {:.0} MiB",
            s.pass,
            s.total_ms.map_or(f64::NAN, |x| x.p50),
            s.read_ms.map_or(f64::NAN, |x| x.p50),
            s.plan_ms.map_or(f64::NAN, |x| x.p50),
            s.act_ms.map_or(f64::NAN, |x| x.p50),
            s.peak_rss_mib.map_or(f64::NAN, |x| x.p50),
        );
    }
}

// ---- setup ----

pub(crate) async fn setup(opened: &Opened, fleet: Fleet) -> Result<Rig> {
    let store = opened.store();
    let token = NewToken {
        id: TokenId::new(),
        secret_sha256: vec![0; 32],
        expires_at: None,
    };
    let (tenant, _) = store
        .bootstrap(
            "bench",
            "bench",
            &token,
            &serde_json::json!({"max_vms": 10}),
        )
        .await?
        .context("a fresh store has no tenant yet")?;
    let tenant = tenant.id;
    let options = PoolOptions::default();
    store.register_build(&options.build).await?;
    put::<PoolConfig>(&store, tenant, "default", json!({"max_vms": fleet.vms})).await?;
    put::<Environment>(&store, tenant, ENVIRONMENT, json!({"driver": "fake"})).await?;
    let per_workspace = fleet.vms / fleet.workspaces;
    let names: Vec<String> = (0..fleet.workspaces).map(workspace_name).collect();
    for_each_concurrent(names.clone(), |name| {
        let store = store.clone();
        async move {
            let spec = json!({
                "environment": ENVIRONMENT,
                "min_idle": per_workspace,
                "max_idle": per_workspace,
            });
            put::<Workspace>(&store, tenant, &name, spec).await
        }
    })
    .await?;
    let env_version = store
        .get_resource(tenant, Environment::KIND, ENVIRONMENT)
        .await?
        .context("the environment just written")?
        .version;
    // Every workspace has the same spec, so the same setup digest.
    let setup_digest = {
        let first = store
            .get_resource(tenant, Workspace::KIND, &names[0])
            .await?
            .context("the workspace just written")?;
        hearth_core::fingerprint::setup_digest(&serde_json::from_value::<Workspace>(first.spec)?)
    };

    // What `vm_ready` leaves of a VM that `insert_vm_within_cap` recorded:
    // idle, no agent, no reservation, built from the current versions.
    let now = now_millis();
    let vms: Vec<VmRecord> = (0..fleet.vms)
        .map(|i| {
            let mut vm = VmRecord::booting(
                VmId::new(),
                tenant,
                &names[i % fleet.workspaces],
                "fake",
                env_version,
                0,
            );
            vm.state = VmState::Idle;
            vm.setup_digest = setup_digest.clone();
            // Oldest first as they were booted; all well within idle_timeout.
            vm.created_at = now - (fleet.vms - i) as i64;
            vm.updated_at = now;
            vm
        })
        .collect();
    bulk_insert_vms(opened, &vms).await?;
    let fake = Arc::new(FakeDriver::new(FakeConfig::default()));
    for vm in &vms {
        fake.create(&VmSpec {
            id: vm.id,
            tenant,
            workspace: vm.workspace.clone(),
            cpus: 1,
            memory_mib: 512,
            image: Default::default(),
            network: hearth_drivers::NetworkSpec::host(),
            disk_mib: 0,
        })
        .await?;
    }
    Ok(Rig {
        store,
        drivers: Drivers::new().with(fake),
        options,
        tenant,
        fleet,
    })
}

fn workspace_name(i: usize) -> String {
    format!("ws-{i:05}")
}

/// Writes a resource as the API does: parsed and validated, serialized
/// back, with its references.
async fn put<T: Spec>(
    store: &Arc<dyn Store>,
    tenant: TenantId,
    name: &str,
    spec: serde_json::Value,
) -> Result<()> {
    let parsed: T = parse_spec(&spec.to_string(), Format::Json)
        .map_err(|e| anyhow::anyhow!("{} {name}: {}", T::KIND, e.message))?;
    let json = serde_json::to_value(&parsed)?;
    let references = parsed.references();
    store
        .put_resource(PutResource {
            actor: None,
            tenant,
            kind: T::KIND,
            name,
            spec: &json,
            references: &references,
            precondition: Precondition::None,
        })
        .await?;
    Ok(())
}

/// The columns `Store::insert_vm` writes, in its order.
const VM_COLUMNS: &str = "INSERT INTO vms (id, tenant_id, workspace, state, agent_id, driver, \
     env_version, image_version, stale, reserved_for, test, error, created_at, updated_at, \
     setup_digest) ";

/// Inserts VMs in batches of multi-row `INSERT`s, a few transactions in
/// all, binding each column as `Store::insert_vm` does.
async fn bulk_insert_vms(opened: &Opened, vms: &[VmRecord]) -> Result<()> {
    macro_rules! insert_all {
        ($pool:expr, $db:ty) => {{
            for chunk in vms.chunks(TRANSACTION_ROWS) {
                let mut tx = $pool.begin().await?;
                for batch in chunk.chunks(INSERT_BATCH) {
                    let mut query = sqlx::QueryBuilder::<$db>::new(VM_COLUMNS);
                    query.push_values(batch, |mut row, vm| {
                        row.push_bind(vm.id.to_string())
                            .push_bind(vm.tenant_id.to_string())
                            .push_bind(vm.workspace.clone())
                            .push_bind(vm.state.as_str())
                            .push_bind(vm.agent_id.map(|a| a.to_string()))
                            .push_bind(vm.driver.clone())
                            .push_bind(vm.env_version)
                            .push_bind(vm.image_version)
                            .push_bind(i64::from(vm.stale))
                            .push_bind(vm.reserved_for.map(|a| a.to_string()))
                            .push_bind(i64::from(vm.test))
                            .push_bind(vm.error.clone())
                            .push_bind(vm.created_at)
                            .push_bind(vm.updated_at)
                            .push_bind(vm.setup_digest.clone());
                    });
                    query.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
        }};
    }
    match opened {
        Opened::Sqlite { store: s, .. } => insert_all!(s.write_pool(), sqlx::Sqlite),
        Opened::Postgres(s) => insert_all!(s.pool(), sqlx::Postgres),
    }
    Ok(())
}

/// Runs `f` on every item, at most [`SETUP_CONCURRENCY`] at once.
async fn for_each_concurrent<T, F, Fut>(items: Vec<T>, f: F) -> Result<()>
where
    T: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for item in items {
        if tasks.len() >= SETUP_CONCURRENCY
            && let Some(done) = tasks.join_next().await
        {
            done??;
        }
        tasks.spawn(f(item));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Queues `k` agents through the store, one per workspace in turn.
async fn queue_agents(rig: &Rig, k: usize) -> Result<()> {
    let (store, tenant, build) = (rig.store.clone(), rig.tenant, rig.options.build.clone());
    let workspaces = rig.fleet.workspaces;
    let owner = IdentityId::new();
    for_each_concurrent((0..k).collect(), move |i| {
        let (store, build) = (store.clone(), build.clone());
        async move {
            let agent = NewAgent {
                id: AgentId::new(),
                tenant_id: tenant,
                workspace: workspace_name(i % workspaces),
                owner_id: owner,
                owner_name: "bench".into(),
                owner_kind: IdentityKind::Developer,
                parent_id: None,
                on_idle: OnIdle::Sleep,
                command: None,
                build,
            };
            store.create_agent(&agent, None).await?;
            Ok(())
        }
    })
    .await
}

/// Gives every assigned VM back (idle) and completes its agent; returns
/// how many there were.
async fn reset(rig: &Rig) -> Result<usize> {
    let assigned: Vec<(VmId, AgentId)> = rig
        .store
        .list_vms(rig.tenant, false)
        .await?
        .into_iter()
        .filter(|v| v.state == VmState::Assigned)
        .filter_map(|v| Some((v.id, v.agent_id?)))
        .collect();
    let n = assigned.len();
    let (store, tenant) = (rig.store.clone(), rig.tenant);
    for_each_concurrent(assigned, move |(vm, agent)| {
        let store = store.clone();
        async move {
            if !store.release_vm(vm, Some(agent), true).await? {
                bail!("VM {vm} could not be released from agent {agent}");
            }
            store
                .transition_agent(
                    tenant,
                    agent,
                    &[AgentPhase::Running],
                    AgentPhase::Completed,
                    &AgentUpdate::default(),
                )
                .await?;
            Ok(())
        }
    })
    .await?;
    Ok(n)
}

// ---- passes ----

struct Pass {
    total: Duration,
    stats: PassStats,
    actions: Vec<Action>,
    peak_rss_kib: Option<u64>,
    rss_before_kib: Option<u64>,
}

/// One `reconcile_tenant`, timed, with the process's peak RSS during it.
async fn timed_pass(pool: &Arc<Pool>, tenant: TenantId) -> Result<Pass> {
    let rss_before_kib = reset_peak_rss();
    let started = Instant::now();
    let actions = pool.reconcile_tenant(tenant).await?;
    let total = started.elapsed();
    let peak_rss_kib = status_kib("VmHWM:");
    let stats = pool
        .last_pass(tenant)
        .context("the pool recorded no pass")?;
    Ok(Pass {
        total,
        stats,
        actions,
        peak_rss_kib,
        rss_before_kib,
    })
}

fn expect_nothing(pass: &Pass) -> Result<()> {
    if !pass.actions.is_empty() {
        bail!(
            "a pass over an unchanged fleet planned {} actions, first: {:?}",
            pass.actions.len(),
            &pass.actions[..pass.actions.len().min(5)]
        );
    }
    Ok(())
}

/// Resets the peak RSS (`VmHWM`) to the current RSS; returns the current RSS.
fn reset_peak_rss() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    vm_rss_kib(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// A `kB` line of `/proc/self/status`.
fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn summarize(pass: &'static str, changes: Option<usize>, passes: &[Pass]) -> Scenario {
    let of = |f: &dyn Fn(&Pass) -> Duration| {
        Summary::of_durations(&passes.iter().map(f).collect::<Vec<_>>())
    };
    let peaks: Vec<f64> = passes
        .iter()
        .filter_map(|p| p.peak_rss_kib.map(mib))
        .collect();
    let growth: Vec<f64> = passes
        .iter()
        .filter_map(|p| Some(mib(p.peak_rss_kib?.saturating_sub(p.rss_before_kib?))))
        .collect();
    let actions: Vec<f64> = passes.iter().map(|p| p.actions.len() as f64).collect();
    Scenario {
        pass,
        changes,
        total_ms: of(&|p| p.total),
        read_ms: of(&|p| p.stats.read),
        reap_ms: of(&|p| p.stats.reap),
        plan_ms: of(&|p| p.stats.plan),
        act_ms: of(&|p| p.stats.act),
        reused: passes.iter().filter(|p| p.stats.reused).count(),
        actions: Summary::of(&actions),
        peak_rss_mib: Summary::of(&peaks),
        rss_growth_mib: Summary::of(&growth),
        samples_ms: passes.iter().map(|p| millis(p.total)).collect(),
    }
}

// ---- output ----

fn render(report: &ReconcileReport) -> String {
    let mut times = Table::new([
        "fleet (VMs / workspaces)",
        "pass",
        "p50 ms",
        "p99 ms",
        "max ms",
        "n",
        "read p50",
        "reap p50",
        "plan p50",
        "act p50",
        "reused",
    ]);
    let mut memory = Table::new([
        "fleet (VMs / workspaces)",
        "pass",
        "peak RSS MiB p50",
        "max",
        "growth MiB p50",
        "max",
    ]);
    let p50 = |s: Option<Summary>, d: usize| s.map_or_else(|| "-".into(), |s| fixed(s.p50, d));
    for fleet in &report.fleets {
        let label = format!("{} / {}", fleet.vms, fleet.workspaces);
        for s in &fleet.scenarios {
            let pass = match s.changes {
                Some(k) => format!("{k} changes"),
                None if s.pass == "first" => "first (new Pool)".into(),
                None => "no change".into(),
            };
            let mut row = vec![label.clone(), pass.clone()];
            row.extend(summary_cells(s.total_ms.as_ref(), 2));
            row.extend([
                p50(s.read_ms, 2),
                p50(s.reap_ms, 2),
                p50(s.plan_ms, 2),
                p50(s.act_ms, 2),
                format!("{}/{}", s.reused, s.samples_ms.len()),
            ]);
            times.row(row);
            memory.row([
                label.clone(),
                pass,
                p50(s.peak_rss_mib, 0),
                s.peak_rss_mib
                    .map_or_else(|| "-".into(), |s| fixed(s.max, 0)),
                p50(s.rss_growth_mib, 1),
                s.rss_growth_mib
                    .map_or_else(|| "-".into(), |s| fixed(s.max, 1)),
            ]);
        }
    }
    let store = match report.store {
        StoreKind::Sqlite => "SQLite",
        StoreKind::Postgres => "PostgreSQL",
    };
    format!(
        "\n## reconcile pass ({store} store)\n\n{}\n### peak RSS during the pass\n\n{}",
        times.render(),
        memory.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleets_and_changes_parse() {
        assert_eq!(
            "100000/10000".parse::<Fleet>(),
            Ok(Fleet {
                vms: 100_000,
                workspaces: 10_000
            })
        );
        assert!("10/3".parse::<Fleet>().is_err());
        assert!("10".parse::<Fleet>().is_err());
        let fleet = Fleet {
            vms: 100_000,
            workspaces: 10_000,
        };
        assert_eq!("1".parse::<Changes>().map(|c| c.of(fleet)), Ok(1));
        assert_eq!("1%".parse::<Changes>().map(|c| c.of(fleet)), Ok(1000));
        assert_eq!("10%".parse::<Changes>().map(|c| c.of(fleet)), Ok(10_000));
        assert!("0".parse::<Changes>().is_err());
        assert!("120%".parse::<Changes>().is_err());
    }
}
