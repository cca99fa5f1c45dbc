//! The pool runner: reads a tenant's snapshot, plans, executes. Woken by
//! changes and at the earliest deadline its passes found (a slow resync
//! timer is the safety net); also owns adoption at start, the agents'
//! commands, flush/nuke/up, and the reaper pass.

use crate::pass::{self, Wake};

use crate::metrics::Outcome;
use crate::placement;
use crate::plan::{self, Action, NodeView, Reason, Settings, Snapshot, WorkspaceView};
use crate::reaper;
use crate::status::{self, PassStats, PoolStatus};
use hearth_core::ids::InstanceId;
use hearth_core::ids::{AgentId, NodeId, TenantId, VmId};
use hearth_core::resource::{
    DriverKind, Environment, Image, Kind, POOL_CONFIG_NAME, PoolConfig, Spec, Workspace,
};
use hearth_drivers::{
    Driver, DriverError, Drivers, ExecRequest, ExecResult, Fleet, ImageSpec, NetworkSpec,
    OutputChunk, Stream, VmSpec,
};
use hearth_provisioning::redact::{Redactor, TailBuffer};
use hearth_provisioning::{
    Command, ProvisionPlan, Recorder, RepoPlan, Step, StepStatus, Summary, secret_redactor,
};
use hearth_store::{
    AgentFilter, AgentPhase, AgentRecord, AgentUpdate, Build, ChangeToken, InsertVm, Millis,
    NodeRecord, NodeUsage, Ready, Store, StoreError, VmRecord, VmState, WorkspaceState, now_millis,
};
use hearth_store::{EventKind, NewEvent};
use hearth_store::{InstanceRecord, InstanceStatus};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, watch};

mod leads;
pub use leads::TakeoverReport;

/// What can go wrong in a pass.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Precondition(String),
}

/// How a server runs its pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub settings: Settings,
    /// The build this server is (agents' workflows are pinned to it).
    pub build: String,
    /// How long a workflow may be stranded before `enabled` reaps it.
    pub reap_after: Duration,
    /// The slow periodic resync.
    pub resync: Duration,
    /// Longest any one provisioning command may run.
    pub command_timeout: Duration,
    /// The image store; `None`: images with artifacts cannot boot and
    /// nothing can be baked.
    pub images: Option<Arc<crate::images::ImageStoreConfig>>,
    /// The fleet's timings (nodes' heartbeats, when a node is unreachable,
    /// when its assigned VMs are lost).
    pub fleet: FleetTimings,
    /// This replica's id (what `vms.task_owner` records).
    pub replica: String,
}

/// The fleet's timings, the same on every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetTimings {
    /// How often a node reports.
    pub heartbeat: Duration,
    /// A node that has not reported for this long is unreachable: nothing
    /// is placed on it and its idle VMs are given up.
    pub node_timeout: Duration,
    /// An unreachable node's assigned VMs are lost after this long (and
    /// the node destroys every VM it runs once it could not report for
    /// this long).
    pub lost_after: Duration,
}

impl Default for FleetTimings {
    fn default() -> Self {
        FleetTimings {
            heartbeat: Duration::from_secs(2),
            node_timeout: Duration::from_secs(10),
            lost_after: Duration::from_secs(60),
        }
    }
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            settings: Settings::default(),
            build: concat!("hearth-", env!("CARGO_PKG_VERSION")).into(),
            reap_after: Duration::from_secs(48 * 3600),
            resync: Duration::from_secs(30),
            command_timeout: Duration::from_secs(30 * 60),
            images: None,
            fleet: FleetTimings::default(),
            replica: uuid::Uuid::now_v7().to_string(),
        }
    }
}

/// What adoption found at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdoptReport {
    pub adopted: usize,
    /// Real VMs nothing in the store knew, destroyed.
    pub unknown_destroyed: usize,
    /// Records whose VM was gone (or half-booted), closed.
    pub records_closed: usize,
    pub agents_failed: usize,
    pub agents_requeued: usize,
    /// Agents whose command still runs as a job in their adopted VM,
    /// followed again.
    pub agents_reattached: usize,
}

/// How many nodes a boot tries when the store finds the chosen one full.
const PLACEMENT_TRIES: usize = 3;

/// A pass's placement state: the nodes read at its start, and what their
/// live VMs take, updated with each boot it places.
struct Placer {
    nodes: Vec<NodeRecord>,
    views: HashMap<NodeId, NodeView>,
    /// Read at the pass's first boot.
    usage: Option<HashMap<NodeId, NodeUsage>>,
    /// The pass's clock (the store's).
    now: Millis,
    rng: rand::rngs::StdRng,
}

/// Output kept of a command, at most.
const OUTPUT_TAIL: usize = 64 * 1024;

/// How often, at most, a run's progress is written while it provisions:
/// a fast boot's steps (milliseconds apart) cost one write, not one each.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Persists a run's steps as they change (at most every
/// [`PROGRESS_INTERVAL`]; the latest steps are written when it is up), and
/// moves the VM to `provisioning` once its guest agent answered. The run's
/// end is written by the boot itself, after [`Progress::close`].
struct InstanceRecorder {
    store: Arc<dyn Store>,
    instance: InstanceId,
    vm: VmId,
    provisioning: AtomicBool,
    progress: Arc<Progress>,
}

/// The progress writes of one run, in order and throttled.
#[derive(Default)]
struct Progress {
    state: Mutex<ProgressState>,
    /// Held across each write, so writes land in the order they were taken.
    write: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct ProgressState {
    last_write: Option<std::time::Instant>,
    /// Steps waiting for the delayed write.
    pending: Option<serde_json::Value>,
    /// A delayed write is scheduled.
    armed: bool,
    /// The run ended: nothing more is written.
    closed: bool,
}

impl Progress {
    /// No progress is written after this (the end is, by the caller).
    fn close(&self) {
        let mut state = self.state.lock().unwrap();
        state.closed = true;
        state.pending = None;
    }

    async fn write(&self, store: &dyn Store, instance: InstanceId, steps: &serde_json::Value) {
        match store
            .update_instance(instance, InstanceStatus::Provisioning, steps, None)
            .await
        {
            // The run ended meanwhile: its end stands.
            Ok(()) | Err(hearth_store::StoreError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(instance = %instance, error = %e, "cannot record provisioning progress");
            }
        }
    }
}

#[async_trait::async_trait]
impl Recorder for InstanceRecorder {
    async fn record(&self, steps: &[Step]) {
        let past_boot = steps
            .iter()
            .any(|s| s.name == "set_env_vars" && s.status != StepStatus::Pending);
        if past_boot && !self.provisioning.swap(true, Ordering::Relaxed) {
            let _ = self
                .store
                .set_vm_state(self.vm, &[VmState::Booting], VmState::Provisioning, None)
                .await;
        }
        let json = serde_json::to_value(steps).unwrap_or_default();
        let now = std::time::Instant::now();
        let delay = {
            let mut state = self.progress.state.lock().unwrap();
            if state.closed {
                return;
            }
            let since = state.last_write.map(|t| now.duration_since(t));
            match since {
                Some(since) if since < PROGRESS_INTERVAL || state.armed => {
                    state.pending = Some(json.clone());
                    if state.armed {
                        return;
                    }
                    state.armed = true;
                    Some(PROGRESS_INTERVAL - since.min(PROGRESS_INTERVAL))
                }
                _ => {
                    state.last_write = Some(now);
                    None
                }
            }
        };
        match delay {
            None => {
                let _order = self.progress.write.lock().await;
                self.progress
                    .write(self.store.as_ref(), self.instance, &json)
                    .await;
            }
            Some(delay) => {
                let progress = self.progress.clone();
                let store = self.store.clone();
                let instance = self.instance;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _order = progress.write.lock().await;
                    let steps = {
                        let mut state = progress.state.lock().unwrap();
                        state.armed = false;
                        state.last_write = Some(std::time::Instant::now());
                        state.pending.take()
                    };
                    if let Some(steps) = steps {
                        progress.write(store.as_ref(), instance, &steps).await;
                    }
                });
            }
        }
    }
}

/// What booting a VM of a workspace needs.
#[derive(Debug, Clone)]
struct BootPlan {
    driver: DriverKind,
    cpus: u32,
    memory_mib: u64,
    /// What to boot, or why the image cannot boot (the boot fails with it).
    image: Result<ImageSpec, String>,
    network: NetworkSpec,
    disk_mib: u64,
    env_version: i64,
    image_version: i64,
    /// The workspace's setup digest, taken from the same spec as
    /// `provision`, so a VM's recorded digest is that of what it ran.
    setup_digest: String,
    provision: ProvisionPlan,
}

/// A tenant's snapshot plus what executing its plan needs: everything a
/// pass reads of the store, kept for the next pass of the tenant while the
/// store's change token says nothing was written since.
struct Pass {
    /// Its `in_flight` is left empty: each pass plans with its own.
    snapshot: Snapshot,
    boot_plans: HashMap<String, BootPlan>,
    reap_mode: hearth_core::resource::ReapMode,
    reap_setting: String,
    active_agents: Vec<AgentRecord>,
    builds: Vec<Build>,
    /// VMs of `snapshot.vms` with a task of another replica (`task_owner`):
    /// in flight for every pass.
    others_tasks: Vec<VmId>,
    /// `snapshot.vms` by id, built the first time an action needs it.
    vm_index: OnceLock<HashMap<VmId, usize>>,
    /// `snapshot.workspaces` by name, likewise.
    workspace_index: OnceLock<HashMap<String, usize>>,
    /// `snapshot.queued` by id, likewise.
    queued_index: OnceLock<HashMap<AgentId, usize>>,
}

impl Pass {
    fn vm(&self, id: VmId) -> Option<&VmRecord> {
        let index = self.vm_index.get_or_init(|| {
            let vms = &self.snapshot.vms;
            vms.iter().enumerate().map(|(i, v)| (v.id, i)).collect()
        });
        index.get(&id).map(|&i| &self.snapshot.vms[i])
    }

    fn workspace(&self, name: &str) -> Option<&WorkspaceView> {
        let index = self.workspace_index.get_or_init(|| {
            let workspaces = &self.snapshot.workspaces;
            // The first of a name, as a scan would find.
            let mut index = HashMap::with_capacity(workspaces.len());
            for (i, w) in workspaces.iter().enumerate() {
                index.entry(w.name.clone()).or_insert(i);
            }
            index
        });
        index.get(name).map(|&i| &self.snapshot.workspaces[i])
    }

    fn queued(&self, id: AgentId) -> Option<&AgentRecord> {
        let index = self.queued_index.get_or_init(|| {
            let queued = &self.snapshot.queued;
            queued.iter().enumerate().map(|(i, a)| (a.id, i)).collect()
        });
        index.get(&id).map(|&i| &self.snapshot.queued[i])
    }
}

/// What a pass starts from: the read (fresh, or kept from an earlier pass)
/// and the VMs in flight, taken before it.
struct Read {
    pass: Arc<Pass>,
    in_flight: HashSet<VmId>,
    reused: bool,
}

/// The pool runner of one server (all tenants).
pub struct Pool {
    store: Arc<dyn Store>,
    /// Where each VM's driver is reached (its node).
    fleet: Arc<dyn Fleet>,
    /// This process's own drivers, for adoption at start (none in a fleet:
    /// nodes report their own VMs).
    drivers: Drivers,
    /// Built from this process's own drivers ([`Pool::new`]): one node,
    /// always reachable, not in the store; VMs are not placed.
    local: bool,
    options: PoolOptions,
    /// Wakes this process's run loop.
    wake: Arc<Notify>,
    /// Wakes the task that tells the other replicas ([`Store::notify_wake`]):
    /// one NOTIFY per burst of wakes.
    wake_others: Arc<Notify>,
    /// The tenants this pool leads (reconciles), each taken over when its
    /// lead began ([`Pool::leads`]).
    led: Mutex<HashSet<TenantId>>,
    /// Whether the last pass left some tenant unled: the run loop then
    /// tries to take it again within [`leads::LEAD_RETRY`].
    unled: AtomicBool,
    /// Passes so far, per tenant ([`Pool::passes`]).
    pass_counts: Mutex<HashMap<TenantId, u64>>,
    /// VMs with a task of this process (their `task_owner` is this
    /// replica, or is being set or cleared by the task).
    in_flight: Mutex<HashSet<VmId>>,
    commands: Mutex<HashSet<AgentId>>,
    dry_run_logged: Mutex<HashSet<AgentId>>,
    workspace_state_lock: tokio::sync::Mutex<()>,
    /// The last pass of each tenant, for [`Pool::last_pass`].
    last_passes: Mutex<HashMap<TenantId, PassStats>>,
    /// The last read of each tenant with the store's change token taken
    /// before it (one per tenant; tenants gone are dropped).
    reads: Mutex<HashMap<TenantId, (ChangeToken, Arc<Pass>)>>,
    /// Per tenant, the earliest moment its last pass found the clock alone
    /// would change its plan (an idle timeout, a boot timeout, a back-off
    /// ending, a reaper deadline): [`Pool::run`] passes again then.
    deadlines: Mutex<HashMap<TenantId, Millis>>,
    /// What woke the passes and what each tenant's last one did
    /// ([`Pool::pass_status`]).
    passes: Arc<pass::Tracker>,

    /// What this process observed, for `/metrics` ([`Pool::metrics`]).
    pub(crate) metrics: crate::metrics::Metrics,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn driver_kind(name: &str) -> Option<DriverKind> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

fn driver_name(kind: DriverKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn decode<T: Spec>(value: &serde_json::Value) -> Result<T, PoolError> {
    T::deserialize(value)
        .map_err(|e| PoolError::Store(StoreError::Corrupt(format!("stored {}: {e}", T::KIND))))
}

/// What provisioning a VM of `ws` runs, from the workspace and its environment.
fn provision_plan(ws: &Workspace, env: &Environment, options: &PoolOptions) -> ProvisionPlan {
    let commands = |list: &[hearth_core::resource::SetupCommand]| {
        list.iter()
            .map(|c| Command {
                name: c.name.clone(),
                command: c.command.clone(),
            })
            .collect()
    };
    ProvisionPlan {
        env: env.env.clone(),
        repos: ws
            .repos
            .iter()
            .map(|r| RepoPlan {
                url: r.url.clone(),
                branch: ws.branch_for(r).to_owned(),
                dir: r.dir_name(),
            })
            .collect(),
        project_setup: commands(&env.project_setup),
        repo_setup: commands(&env.repo_setup),
        warm_pool_setup: commands(&ws.warm_pool.setup_commands),
        guest_timeout: Duration::from_millis(options.settings.boot_timeout_ms.max(1) as u64),
        command_timeout: options.command_timeout,
    }
}

impl Pool {
    /// A pool whose VMs all run on this process's own `drivers`.
    /// Its VMs record no node: this process is the one node, always
    /// reachable, with the room its drivers have (tests, benchmarks).
    pub fn new(store: Arc<dyn Store>, drivers: Drivers, options: PoolOptions) -> Arc<Pool> {
        Self::build(store, Arc::new(drivers.clone()), drivers, true, options)
    }

    /// A pool whose VMs run on the nodes of `fleet`: every boot is placed
    /// on a node of the store ([`placement::choose`]).
    pub fn with_fleet(
        store: Arc<dyn Store>,
        fleet: Arc<dyn Fleet>,
        options: PoolOptions,
    ) -> Arc<Pool> {
        Self::build(store, fleet, Drivers::new(), false, options)
    }

    /// A pool whose VMs run on the nodes of `fleet`; `local` are this
    /// process's embedded node's drivers as the fleet reaches them, which
    /// adoption at start ([`Pool::adopt`]) lists.
    pub fn with_local_node(
        store: Arc<dyn Store>,
        fleet: Arc<dyn Fleet>,
        local: Drivers,
        options: PoolOptions,
    ) -> Arc<Pool> {
        Self::build(store, fleet, local, false, options)
    }

    fn build(
        store: Arc<dyn Store>,
        fleet: Arc<dyn Fleet>,
        drivers: Drivers,
        local: bool,
        mut options: PoolOptions,
    ) -> Arc<Pool> {
        // The fleet's timings are the one source; the planner reads them
        // in its settings.
        options.settings.node_timeout_ms = options.fleet.node_timeout.as_millis() as Millis;
        options.settings.lost_after_ms = options.fleet.lost_after.as_millis() as Millis;
        Arc::new(Pool {
            store,
            fleet,
            drivers,
            local,
            options,
            wake: Arc::new(Notify::new()),
            wake_others: Arc::new(Notify::new()),
            led: Mutex::new(HashSet::new()),
            unled: AtomicBool::new(false),
            pass_counts: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            commands: Mutex::new(HashSet::new()),
            dry_run_logged: Mutex::new(HashSet::new()),
            workspace_state_lock: tokio::sync::Mutex::new(()),
            last_passes: Mutex::new(HashMap::new()),
            reads: Mutex::new(HashMap::new()),
            deadlines: Mutex::new(HashMap::new()),
            passes: Arc::new(pass::Tracker::default()),

            metrics: crate::metrics::Metrics::default(),
        })
    }

    pub fn options(&self) -> &PoolOptions {
        &self.options
    }

    /// The store the pool reads and writes.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Asks for a pass as soon as possible (coalesced), here and on the
    /// other replicas (whichever leads the tenant that changed): the NOTIFY
    /// is sent by a task of [`Pool::run`], one per burst, never blocking
    /// the caller.
    pub fn wake(&self) {
        self.wake_for(Wake::Api);
    }

    /// [`Pool::wake`], saying why (what the pass status shows).
    pub fn wake_for(&self, cause: Wake) {
        self.passes.woken(cause);
        self.wake.notify_one();
        self.wake_others.notify_one();
    }

    /// Runs passes until `shutdown` turns true: at once when woken (every
    /// write that changes what the planner sees wakes it, on this replica
    /// or another), at the earliest deadline a pass reported, within
    /// [`leads::LEAD_RETRY`] while some tenant is led by no one here, and at
    /// the latest after the resync (a safety net: nothing waits for it).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let _wakes = self.spawn_wake_tasks(shutdown.clone());
        let mut cause = Wake::Start;
        loop {
            self.passes.set_round(cause);
            if let Err(e) = self.reconcile_all().await {
                tracing::error!(error = %e, "pool pass failed");
                // Its deadlines are of passes that did not run: the resync
                // retries (a store that is down is not hammered).
                self.deadlines.lock().unwrap().clear();
            }
            let mut pause = self.until_next_deadline(now_millis());
            if self.unled.load(Ordering::Relaxed) {
                pause = pause.min(leads::LEAD_RETRY);
            }
            cause = tokio::select! {
                // A wake's cause is recorded before it notifies; one seen
                // by an earlier timer's round is told by nothing newer.
                _ = self.wake.notified() => self.passes.take_woken().unwrap_or(Wake::Api),
                _ = tokio::time::sleep(pause) => self.timer_cause(),
                _ = shutdown.changed() => break,
            };
            if *shutdown.borrow() {
                break;
            }
        }
    }

    /// What a round of passes the run loop's timer started is for: a
    /// deadline that is due, else the retry of leads, else the resync.
    fn timer_cause(&self) -> Wake {
        let earliest = self.deadlines.lock().unwrap().values().min().copied();
        // A few milliseconds' slack: the timer and the store's clock differ.
        if earliest.is_some_and(|at| at <= now_millis() + 5) {
            Wake::Deadline
        } else if self.unled.load(Ordering::Relaxed) {
            Wake::LeadRetry
        } else {
            Wake::Resync
        }
    }

    /// How long until the earliest deadline the tenants' last passes
    /// reported, at most the resync.
    fn until_next_deadline(&self, now: Millis) -> Duration {
        let earliest = self.deadlines.lock().unwrap().values().min().copied();
        earliest.map_or(self.options.resync, |at| {
            Duration::from_millis((at - now).max(0) as u64).min(self.options.resync)
        })
    }

    /// The earliest moment the clock alone changes a tenant's plan, as its
    /// last pass found (`None`: nothing due).
    pub fn next_deadline(&self, tenant: TenantId) -> Option<Millis> {
        self.deadlines.lock().unwrap().get(&tenant).copied()
    }

    /// What the last pass of a tenant did, and how long its parts took.
    pub fn last_pass(&self, tenant: TenantId) -> Option<PassStats> {
        self.last_passes.lock().unwrap().get(&tenant).cloned()
    }

    /// The tenant's last pass as `pool status` shows it: this replica's own
    /// when it leads the tenant and has passed it, else the last one its
    /// leader kept in the store (see [`pass`]'s module doc for why the two
    /// may differ).
    pub async fn pass_status(
        &self,
        tenant: TenantId,
    ) -> Result<Option<pass::PassStatus>, PoolError> {
        if self.led.lock().unwrap().contains(&tenant)
            && let Some(live) = self.passes.last(tenant)
        {
            return Ok(Some(live));
        }
        let Some(kept) = self.store.get_reconcile_pass(tenant).await? else {
            return Ok(None);
        };
        let mut status: pass::PassStatus = serde_json::from_value(kept.status).map_err(|e| {
            PoolError::Store(StoreError::Corrupt(format!("stored pass status: {e}")))
        })?;
        status.source = pass::PassSource::Stored;
        Ok(Some(status))
    }

    /// Keeps a pass in the store for the other replicas' `pool status`
    /// (a failure is logged: the pass itself stands).
    async fn keep_pass(&self, tenant: TenantId, started_at: Millis, status: &pass::PassStatus) {
        let record = hearth_store::ReconcilePassRecord {
            tenant_id: tenant,
            replica: status.replica.clone(),
            iteration: status.iteration as i64,
            started_at,
            status: serde_json::to_value(status).unwrap_or_default(),
        };
        if let Err(e) = self.store.put_reconcile_pass(&record).await {
            tracing::warn!(tenant = %tenant, error = %e, "cannot keep the pass status");
        }
    }

    /// One pass over every tenant this pool leads: first the lead of every
    /// tenant not led yet is tried ([`Store::lead`]), and each new one taken
    /// over ([`Pool::take_over`]); tenants another replica leads are left to
    /// it.
    pub async fn reconcile_all(self: &Arc<Self>) -> Result<(), PoolError> {
        let tenants = self.store.list_tenants().await?;
        let ids: HashSet<TenantId> = tenants.iter().map(|t| t.id).collect();
        let led = self
            .lead(&tenants.iter().map(|t| t.id).collect::<Vec<_>>())
            .await;
        self.unled.store(led.len() < ids.len(), Ordering::Relaxed);
        self.reads.lock().unwrap().retain(|t, _| ids.contains(t));
        self.deadlines
            .lock()
            .unwrap()
            .retain(|t, _| ids.contains(t));
        self.last_passes
            .lock()
            .unwrap()
            .retain(|t, _| ids.contains(t));
        self.passes.retain(&ids);

        self.metrics.learn_tenants(&tenants);
        for tenant in tenants.into_iter().filter(|t| led.contains(&t.id)) {
            let started = Instant::now();
            let result = self.reconcile_tenant(tenant.id).await;
            self.metrics
                .pass(&tenant.name, started.elapsed(), result.is_err());
            if let Err(e) = result {
                tracing::error!(tenant = %tenant.name, error = %e, "pool pass of a tenant failed");
            }
        }
        Ok(())
    }

    fn in_flight(&self) -> HashSet<VmId> {
        self.in_flight.lock().unwrap().clone()
    }

    /// What a pass of one tenant starts from. The VMs in flight are taken
    /// first: a task still running then is left out of this pass; one
    /// finished since has written to the store, so its effect shows in the
    /// read. Tasks of other replicas are those the read's VMs record
    /// (`task_owner`), read with each VM's state. Then the store's change token: when it equals the one taken
    /// before the tenant's last read, nothing was written since and that
    /// read is reused (with this pass's in-flight set and clock); else
    /// everything is read again.
    async fn read_pass(&self, tenant: TenantId) -> Result<Read, PoolError> {
        let mut in_flight = self.in_flight();
        let token = match self.store.change_token().await {
            Ok(token) => Some(token),
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "cannot read the store's change token; reading everything");
                None
            }
        };
        {
            let mut reads = self.reads.lock().unwrap();
            match (reads.get(&tenant), &token) {
                (Some((cached, pass)), Some(token)) if cached == token => {
                    in_flight.extend(pass.others_tasks.iter().copied());
                    return Ok(Read {
                        pass: pass.clone(),
                        in_flight,
                        reused: true,
                    });
                }
                // Out of date: let it go before the new read is built.
                _ => reads.remove(&tenant),
            };
        }
        let pass = Arc::new(self.read_store(tenant).await?);
        in_flight.extend(pass.others_tasks.iter().copied());
        if let Some(token) = token {
            self.reads
                .lock()
                .unwrap()
                .insert(tenant, (token, pass.clone()));
        }
        Ok(Read {
            pass,
            in_flight,
            reused: false,
        })
    }

    /// Reads everything the planner needs of one tenant (the snapshot's
    /// `in_flight` left empty). Records the configuration of a workspace
    /// seen for the first time, or changed, as it goes.
    async fn read_store(&self, tenant: TenantId) -> Result<Pass, PoolError> {
        let store = &self.store;
        // VMs and agents are read before the resources: the reads are not
        // one transaction, so read the other way round a pass could see an
        // agent spawned (or a VM booted) for a workspace created after the
        // workspaces were read, and fail it as if its workspace were gone.
        // In this order, a workspace missing from the read really is.
        let vms = store.list_vms(tenant, false).await?;
        let queued = store.list_queued_agents(tenant).await?;
        let active_agents = active_agents(store.as_ref(), tenant).await?;
        let config = match store
            .get_resource(tenant, Kind::PoolConfig, POOL_CONFIG_NAME)
            .await?
        {
            Some(r) => Some(decode::<PoolConfig>(&r.spec)?),
            None => None,
        };
        let stopped = store.get_pool_state(tenant).await?.stopped;
        let environments: HashMap<String, (Environment, i64)> = store
            .list_resources(tenant, Kind::Environment)
            .await?
            .iter()
            .map(|r| Ok((r.name.clone(), (decode::<Environment>(&r.spec)?, r.version))))
            .collect::<Result<_, PoolError>>()?;
        let images: HashMap<String, (Image, i64)> = store
            .list_resources(tenant, Kind::Image)
            .await?
            .iter()
            .map(|r| Ok((r.name.clone(), (decode::<Image>(&r.spec)?, r.version))))
            .collect::<Result<_, PoolError>>()?;
        let states: HashMap<String, WorkspaceState> = store
            .list_workspace_states(tenant)
            .await?
            .into_iter()
            .map(|s| (s.workspace.clone(), s))
            .collect();
        let mut workspaces = Vec::new();
        let mut boot_plans = HashMap::new();
        for record in store.list_resources(tenant, Kind::Workspace).await? {
            let ws: Workspace = decode(&record.spec)?;
            let Some((env, env_version)) = environments.get(&ws.environment) else {
                continue;
            };
            let image = env.image.as_ref().and_then(|name| images.get(name));
            let image_version = image.map_or(0, |(_, v)| *v);
            let fingerprint = format!("{}/{}/{}", record.version, env_version, image_version);
            // From the stored (unredacted) spec: a changed repo credential
            // is a changed setup too; the digest never shows it.
            let setup_digest = hearth_core::fingerprint::setup_digest(&ws);
            let known = states.get(&record.name).cloned();
            let mut state = known.clone().unwrap_or_default();
            if known.is_none() || state.config_fingerprint.is_empty() {
                // First sight: record the configuration that failures are
                // counted against.
                state.workspace = record.name.clone();
                state.config_fingerprint = fingerprint;
                let _guard = self.workspace_state_lock.lock().await;
                store.put_workspace_state(tenant, &state).await?;
            } else if state.config_fingerprint != fingerprint {
                // A configuration change lifts the back-off and the hard limit.
                state = WorkspaceState {
                    workspace: record.name.clone(),
                    config_fingerprint: fingerprint,
                    ..Default::default()
                };
                let _guard = self.workspace_state_lock.lock().await;
                store.put_workspace_state(tenant, &state).await?;
            }
            boot_plans.insert(
                record.name.clone(),
                BootPlan {
                    driver: env.driver,
                    cpus: env.cpus.max(1) as u32,
                    memory_mib: env.memory_mib().unwrap_or(512),
                    image: match (&env.image, image) {
                        (None, _) => Ok(ImageSpec::default()),
                        (Some(name), Some((image, _))) => match &self.options.images {
                            Some(images) => images.resolve(tenant, name, image),
                            None => Err(format!("image {name:?}: this server has no image store")),
                        },
                        (Some(name), None) => Err(format!("image {name:?} does not exist")),
                    },
                    network: NetworkSpec {
                        mode: env.network,
                        allow_host_ports: env.allow_host_ports.clone(),
                    },
                    disk_mib: env.disk_mib().unwrap_or(0),
                    env_version: *env_version,
                    image_version,
                    setup_digest: setup_digest.clone(),
                    provision: provision_plan(&ws, env, &self.options),
                },
            );
            workspaces.push(WorkspaceView {
                name: record.name.clone(),
                min_idle: ws.min_idle.max(0) as usize,
                max_idle: ws.max_idle().max(0) as usize,
                warm: ws.warm_pool.enabled,
                env_version: *env_version,
                image_version,
                setup_digest,
                idle_timeout_ms: env.idle_timeout_secs().unwrap_or(900) as i64 * 1000,
                state,
            });
        }
        let builds = store.list_builds().await?;
        let holders = active_agents
            .iter()
            .map(|a| (a.id, (a.phase, a.vm_id)))
            .collect();
        let reap_setting = config.as_ref().map_or_else(
            || "dry_run".to_owned(),
            |c| c.reap_stranded_workflows.clone(),
        );
        let others_tasks = vms
            .iter()
            .filter(|v| {
                v.task_owner
                    .as_deref()
                    .is_some_and(|owner| owner != self.options.replica)
            })
            .map(|v| v.id)
            .collect();
        Ok(Pass {
            others_tasks,
            snapshot: Snapshot {
                max_vms: config.as_ref().map(|c| i64::from(c.max_vms)),
                stopped,
                workspaces,
                vms,
                queued,
                holders,
                in_flight: HashSet::new(),
                nodes: HashMap::new(),
            },
            boot_plans,
            reap_mode: config
                .as_ref()
                .map_or(hearth_core::resource::ReapMode::DryRun, |c| c.reap_mode()),
            reap_setting,
            active_agents,
            builds,
            vm_index: OnceLock::new(),
            workspace_index: OnceLock::new(),
            queued_index: OnceLock::new(),
        })
    }

    /// The tenant's pool status.
    pub async fn status(&self, tenant: TenantId) -> Result<PoolStatus, PoolError> {
        let pass = self.read_pass(tenant).await?.pass;
        let pass_status = self.pass_status(tenant).await?;
        let finding = reaper::find(
            pass.reap_mode,
            &pass.active_agents,
            &pass.builds,
            now_millis(),
            self.reap_after_ms(),
        );
        let mut status = status::compute(
            &pass.snapshot,
            now_millis(),
            self.options.settings.boot_timeout_ms,
            &pass.reap_setting,
            finding.stranded.len(),
        );
        status.pass = pass_status;
        Ok(status)
    }

    fn reap_after_ms(&self) -> Millis {
        self.options.reap_after.as_millis() as Millis
    }

    /// One pass over one tenant: plan, then act; its status recorded
    /// ([`Pool::pass_status`]) and kept in the store when worth it
    /// ([`pass::PassStatus::worth_keeping`]).
    pub async fn reconcile_tenant(
        self: &Arc<Self>,
        tenant: TenantId,
    ) -> Result<Vec<Action>, PoolError> {
        let begun = self.passes.begin(tenant, now_millis());
        let mut errors = Vec::new();
        let mut reused = false;
        let result = self.pass_tenant(tenant, &mut errors, &mut reused).await;
        if let Err(e) = &result {
            errors.push(e.to_string());
        }
        let status = self.passes.finish(
            tenant,
            &self.options.replica,
            begun,
            pass::Outcome {
                reused_snapshot: reused,
                actions: result.as_deref().unwrap_or_default(),
                errors,
            },
        );
        if status.worth_keeping() {
            self.keep_pass(tenant, begun.started_at, &status).await;
        }
        result
    }

    /// The pass of [`Pool::reconcile_tenant`]; each failed action's error
    /// is added to `errors`.
    #[tracing::instrument(level = "debug", skip(self, errors, reused_snapshot), fields(tenant = %tenant))]
    async fn pass_tenant(
        self: &Arc<Self>,
        tenant: TenantId,
        errors: &mut Vec<String>,
        reused_snapshot: &mut bool,
    ) -> Result<Vec<Action>, PoolError> {
        let started = Instant::now();
        // A pass that fails leaves no deadline: the resync retries it.
        self.deadlines.lock().unwrap().remove(&tenant);
        let Read {
            pass,
            in_flight,
            reused,
        } = self.read_pass(tenant).await?;
        *reused_snapshot = reused;
        // The nodes are read fresh every pass (not kept with the read):
        // their heartbeats move on while the tenant's rows do not.
        let mut placer = self.placer().await?;
        let read = started.elapsed();
        // The tenant's leader follows every running command: one started
        // through another replica whose process died since is followed
        // here (`agent_started` does nothing for one already followed).
        for agent in &pass.active_agents {
            if agent.phase == AgentPhase::Running && agent.command.is_some() {
                self.agent_started(agent);
            }
        }
        let now = now_millis();
        placer.now = now;
        let started = Instant::now();
        let next_reap_at = self.reap(tenant, &pass, now).await?;
        let reap = started.elapsed();
        let started = Instant::now();
        let (actions, due) = plan::plan_with_nodes(
            &pass.snapshot,
            &in_flight,
            &placer.views,
            now,
            &self.options.settings,
        );
        // The clock is read fresh each pass (a reused read too), so a pass
        // at the deadline acts even when nothing was written.
        let deadline = [due, next_reap_at].into_iter().flatten().min();
        if let Some(at) = deadline {
            self.deadlines.lock().unwrap().insert(tenant, at);
        }
        let planned = started.elapsed();
        let started = Instant::now();
        for action in &actions {
            if let Err(e) = self.execute(tenant, &pass, action, &mut placer).await {
                tracing::warn!(tenant = %tenant, ?action, error = %e, "pool action failed");
                errors.push(e.to_string());
            }
        }
        *self.pass_counts.lock().unwrap().entry(tenant).or_default() += 1;
        let stats = PassStats {
            read,
            reused,
            reap,
            plan: planned,
            act: started.elapsed(),
            vms: pass.snapshot.vms.len(),
            actions: actions.len(),
        };
        tracing::debug!(tenant = %tenant, ?stats, "pool pass");
        self.last_passes.lock().unwrap().insert(tenant, stats);
        Ok(actions)
    }

    /// Reaps what is due now; returns when the next one will be.
    async fn reap(
        &self,
        tenant: TenantId,
        pass: &Pass,
        now: Millis,
    ) -> Result<Option<Millis>, PoolError> {
        let finding = reaper::find(
            pass.reap_mode,
            &pass.active_agents,
            &pass.builds,
            now,
            self.reap_after_ms(),
        );
        for id in &finding.stranded {
            if pass.reap_mode == hearth_core::resource::ReapMode::DryRun
                && self.dry_run_logged.lock().unwrap().insert(*id)
            {
                tracing::warn!(tenant = %tenant, agent = %id, "stranded workflow on a retired build (dry run: not terminated)");
            }
        }
        for id in finding.reap {
            let update = AgentUpdate {
                error: Some("reaped: its workflow was stranded on a retired build".into()),
                ..Default::default()
            };
            match self
                .store
                .transition_agent(tenant, id, AgentPhase::ACTIVE, AgentPhase::Killed, &update)
                .await
            {
                Ok(_) => {
                    tracing::info!(tenant = %tenant, agent = %id, "reaped a stranded workflow")
                }
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(finding.next_reap_at)
    }

    /// What placing this pass's boots needs: the nodes (read now), what
    /// their VMs take (read at the first boot), the planner's view of them.
    async fn placer(&self) -> Result<Placer, PoolError> {
        let nodes = if self.local {
            Vec::new()
        } else {
            self.store.list_nodes().await?
        };
        let views = nodes
            .iter()
            .map(|n| {
                let view = NodeView {
                    name: n.name.clone(),
                    state: n.state,
                    last_heartbeat: n.last_heartbeat,
                };
                (n.id, view)
            })
            .collect();
        Ok(Placer {
            nodes,
            views,
            usage: None,
            now: now_millis(),
            rng: rand::SeedableRng::from_entropy(),
        })
    }

    /// Places `vm` on a node with room and records it within the cap: a
    /// node whose room check fails in the store (another placer filled it)
    /// is left out and another tried, a few times. `NodeFull` when no node
    /// has room (the pass after a heartbeat or a VM's end tries again).
    /// A local pool records no node.
    async fn place_and_insert(
        &self,
        vm: &mut VmRecord,
        max_vms: i64,
        placer: &mut Placer,
    ) -> Result<InsertVm, PoolError> {
        if self.local {
            return Ok(self.store.insert_vm_within_cap(vm, max_vms).await?);
        }
        if placer.usage.is_none() {
            let usage = self.store.node_usage().await?;
            placer.usage = Some(
                usage
                    .into_iter()
                    .filter_map(|u| u.node.map(|n| (n, u)))
                    .collect(),
            );
        }
        let mut excluded = HashSet::new();
        for _ in 0..PLACEMENT_TRIES {
            let usage = placer.usage.as_mut().expect("read above");
            let need = placement::Need {
                driver: &vm.driver,
                cpus: vm.cpus,
                memory_mib: vm.memory_mib,
                now: placer.now,
                node_timeout_ms: self.options.settings.node_timeout_ms,
                exclude: &excluded,
            };
            let Some(node) = placement::choose(&placer.nodes, usage, &need, &mut placer.rng) else {
                tracing::debug!(vm = %vm.id, workspace = %vm.workspace, "no node has room");
                return Ok(InsertVm::NodeFull);
            };
            vm.node_id = Some(node);
            match self.store.insert_vm_within_cap(vm, max_vms).await? {
                InsertVm::Inserted => {
                    placement::record(usage, node, vm.cpus, vm.memory_mib);
                    return Ok(InsertVm::Inserted);
                }
                InsertVm::NodeFull => {
                    excluded.insert(node);
                }
                other => return Ok(other),
            }
        }
        vm.node_id = None;
        Ok(InsertVm::NodeFull)
    }

    async fn execute(
        self: &Arc<Self>,
        tenant: TenantId,
        pass: &Pass,
        action: &Action,
        placer: &mut Placer,
    ) -> Result<(), PoolError> {
        let snap = &pass.snapshot;
        match action {
            Action::MarkStale { workspace } => {
                if let Some(ws) = pass.workspace(workspace) {
                    self.store
                        .mark_stale(
                            tenant,
                            workspace,
                            ws.env_version,
                            ws.image_version,
                            &ws.setup_digest,
                        )
                        .await?;
                }
            }
            Action::Assign { agent, workspace } => {
                if let Some(vm) = self.store.assign_idle_vm(tenant, workspace, *agent).await? {
                    tracing::info!(tenant = %tenant, agent = %agent, vm = %vm.id, workspace, "queued agent assigned a warm VM");
                    let queued = pass.queued(*agent);
                    if let Some(queued) = queued {
                        self.metrics.claim_after_wait(queued, Outcome::Queued);
                    }
                    // Only an agent with a command has anything to start
                    // (and an agent's command never changes).
                    if queued.is_none_or(|a| a.command.is_some()) {
                        let record = self.store.get_agent(tenant, *agent).await?;
                        self.agent_started(&record);
                    }
                }
            }
            Action::FailAgent { agent, error } => {
                let update = AgentUpdate {
                    error: Some(error.clone()),
                    ..Default::default()
                };
                match self
                    .store
                    .transition_agent(
                        tenant,
                        *agent,
                        &[AgentPhase::Queued],
                        AgentPhase::Failed,
                        &update,
                    )
                    .await
                {
                    Ok(_) => {
                        if let Some(queued) = pass.queued(*agent) {
                            let tenant = self.metrics.tenant(tenant);
                            self.metrics.claim(
                                &tenant,
                                &queued.workspace,
                                Outcome::Rejected,
                                None,
                                None,
                            );
                        }
                    }
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::Destroy { vm, from, reason } => {
                let Some(record) = pass.vm(*vm).cloned() else {
                    return Ok(());
                };
                if *from != VmState::Draining
                    && !self
                        .store
                        .set_vm_state(*vm, &[*from], VmState::Draining, None)
                        .await?
                {
                    return Ok(()); // claimed (or changed) meanwhile: keep it
                }
                if *reason == Reason::BootTimeout {
                    self.record_failure(tenant, &record.workspace, "boot timed out")
                        .await?;
                }
                self.requeue_reserved(tenant, &record).await;
                tracing::info!(tenant = %tenant, vm = %vm, workspace = %record.workspace, ?reason, "destroying VM");
                self.spawn_destroy(record, VmState::Destroyed, None);
            }
            Action::Return { vm, to_idle } => {
                let Some(record) = pass.vm(*vm).cloned() else {
                    return Ok(());
                };
                self.spawn_return(record, *to_idle);
            }
            Action::Boot {
                workspace,
                reserved_for,
            } => {
                let Some(plan) = pass.boot_plans.get(workspace) else {
                    return Ok(());
                };
                let Some(max_vms) = snap.max_vms else {
                    return Ok(());
                };
                let mut record = VmRecord::booting(
                    VmId::new(),
                    tenant,
                    workspace,
                    &driver_name(plan.driver),
                    plan.env_version,
                    plan.image_version,
                );
                record.setup_digest = plan.setup_digest.clone();
                record.reserved_for = *reserved_for;
                record.task_owner = Some(self.options.replica.clone());
                record.cpus = i64::from(plan.cpus);
                record.memory_mib = plan.memory_mib as i64;
                match self.place_and_insert(&mut record, max_vms, placer).await? {
                    InsertVm::Inserted => {
                        tracing::info!(tenant = %tenant, vm = %record.id, workspace, agent = ?reserved_for, "booting VM");
                        self.start_boot(record, plan.clone()).await?;
                    }
                    InsertVm::AtCapacity | InsertVm::AgentNotQueued | InsertVm::NodeFull => {}
                }
            }
            Action::GiveUp { vm, from, error } => {
                let Some(record) = pass.vm(*vm).cloned() else {
                    return Ok(());
                };
                // No driver call: the node is not answering. It destroys
                // the VM itself when it reports again (fencing).
                if self
                    .store
                    .set_vm_state(*vm, &[*from], VmState::Destroyed, Some(error))
                    .await?
                {
                    tracing::warn!(tenant = %tenant, vm = %vm, workspace = %record.workspace, node = ?record.node_id, %error, "VM given up");
                    self.requeue_reserved(tenant, &record).await;
                }
            }
            Action::Lose {
                vm,
                agent,
                error,
                agent_error,
            } => {
                if !self
                    .store
                    .set_vm_state(*vm, &[VmState::Assigned], VmState::Destroyed, Some(error))
                    .await?
                {
                    return Ok(());
                }
                tracing::warn!(tenant = %tenant, vm = %vm, agent = ?agent, %error, "assigned VM lost");
                if let Some(agent) = agent {
                    let update = AgentUpdate {
                        error: Some(agent_error.clone()),
                        ..Default::default()
                    };
                    match self
                        .store
                        .transition_agent(
                            tenant,
                            *agent,
                            &[AgentPhase::Running, AgentPhase::Idle],
                            AgentPhase::Failed,
                            &update,
                        )
                        .await
                    {
                        Ok(_) | Err(StoreError::Conflict(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(())
    }

    /// A cold boot reserved for an agent was given up: the agent waits again.
    async fn requeue_reserved(&self, tenant: TenantId, vm: &VmRecord) {
        if let Some(agent) = vm.reserved_for {
            let _ = self
                .store
                .transition_agent(
                    tenant,
                    agent,
                    &[AgentPhase::Provisioning],
                    AgentPhase::Queued,
                    &AgentUpdate::default(),
                )
                .await;
        }
    }

    async fn driver_for(&self, vm: &VmRecord) -> Result<Arc<dyn Driver>, PoolError> {
        let kind = driver_kind(&vm.driver).ok_or_else(|| {
            PoolError::Precondition(format!(
                "VM {} names an unknown driver {:?}",
                vm.id, vm.driver
            ))
        })?;
        Ok(self.fleet.driver(vm.node_id, kind).await?)
    }

    /// Marks a task on `vm` in this process (so no pass of this process acts
    /// on it); [`Pool::own`] then records it in the store. False when this
    /// process has one already.
    fn track(&self, vm: VmId) -> bool {
        self.in_flight.lock().unwrap().insert(vm)
    }

    /// Records this replica as the owner of the task on `vm`
    /// (compare-and-set from no owner, or from itself): false when another
    /// replica's task holds it, which is then left alone.
    async fn own(&self, vm: VmId) -> bool {
        let me = Some(self.options.replica.as_str());
        for from in [None, me] {
            match self.store.set_vm_task_owner(vm, from, me).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %e, "cannot record a VM's task");
                    return false;
                }
            }
        }
        false
    }

    /// Ends a task: clears the store's record (compare-and-set: only while
    /// it still names this replica; another that took over keeps its own)
    /// before this process's, so one of them always covers the task.
    async fn untrack(&self, vm: VmId) {
        let me = self.options.replica.as_str();
        if let Err(e) = self.store.set_vm_task_owner(vm, Some(me), None).await {
            tracing::warn!(vm = %vm, error = %e, "cannot clear a VM's task; the next takeover will");
        }
        self.in_flight.lock().unwrap().remove(&vm);
    }

    /// Destroys a `draining` VM in the driver, then records it as `end`.
    fn spawn_destroy(self: &Arc<Self>, vm: VmRecord, end: VmState, error: Option<String>) {
        if !self.track(vm.id) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if !pool.own(vm.id).await {
                pool.in_flight.lock().unwrap().remove(&vm.id);
                return;
            }
            pool.destroy_now(&vm, end, error.as_deref()).await;
            pool.untrack(vm.id).await;
            pool.wake_for(Wake::Task);
        });
    }

    async fn destroy_now(&self, vm: &VmRecord, end: VmState, error: Option<&str>) {
        let result = match self.driver_for(vm).await {
            Ok(driver) => driver.destroy(vm.id).await.map_err(PoolError::from),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                if let Err(e) = self
                    .store
                    .set_vm_state(vm.id, &[VmState::Draining], end, error)
                    .await
                {
                    tracing::error!(vm = %vm.id, error = %e, "cannot record a destroyed VM");
                }
            }
            // Left `draining`: the next pass tries again.
            Err(e) => tracing::error!(vm = %vm.id, error = %e, "destroy failed; will retry"),
        }
    }

    /// Cleans an assigned VM and gives it back to the pool, or destroys it.
    fn spawn_return(self: &Arc<Self>, vm: VmRecord, to_idle: bool) {
        if !self.track(vm.id) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if !pool.own(vm.id).await {
                pool.in_flight.lock().unwrap().remove(&vm.id);
                return;
            }
            let mut keep = to_idle;
            if keep {
                // Back to its provisioned state, or gone: a VM that cannot
                // be reset (qemu, until snapshots) is destroyed and the pool
                // refills.
                let reset = match pool.driver_for(&vm).await {
                    Ok(d) => d.reset(vm.id).await,
                    Err(e) => Err(DriverError::Unsupported(e.to_string())),
                };
                match reset {
                    Ok(()) => {}
                    Err(DriverError::Unsupported(reason)) => {
                        tracing::info!(vm = %vm.id, %reason, "a returned VM cannot be reset; destroying it");
                        keep = false;
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm.id, error = %e, "resetting a returned VM failed; destroying it");
                        keep = false;
                    }
                }
            }
            match pool.store.release_vm(vm.id, vm.agent_id, keep).await {
                Ok(true) if !keep => {
                    pool.destroy_now(&vm, VmState::Destroyed, None).await;
                }
                Ok(_) => {
                    tracing::info!(vm = %vm.id, workspace = %vm.workspace, "VM returned to the pool")
                }
                Err(e) => tracing::error!(vm = %vm.id, error = %e, "cannot release a VM"),
            }
            pool.untrack(vm.id).await;
            pool.wake_for(Wake::Task);
        });
    }

    /// Records the VM's provisioning run, then runs it in a task: the
    /// pipeline creates the VM, waits for its guest agent and provisions it;
    /// the VM then becomes warm (or goes to the agent it was booted for, or,
    /// for a test boot, is destroyed keeping the record).
    async fn start_boot(
        self: &Arc<Self>,
        vm: VmRecord,
        plan: BootPlan,
    ) -> Result<InstanceRecord, PoolError> {
        let steps = hearth_provisioning::planned_steps(&plan.provision);
        let now = now_millis();
        let instance = InstanceRecord {
            id: InstanceId::new(),
            tenant_id: vm.tenant_id,
            workspace: vm.workspace.clone(),
            vm_id: vm.id,
            test: vm.test,
            status: InstanceStatus::Provisioning,
            summary: None,
            steps: serde_json::to_value(&steps).unwrap_or_default(),
            created_at: now,
            updated_at: now,
            finished_at: None,
        };
        // The insert recorded this replica as the task's owner.
        self.track(vm.id);
        if let Err(e) = self.store.create_instance(&instance).await {
            // Nothing was created yet: close the record and let the pool retry.
            let _ = self
                .store
                .set_vm_state(
                    vm.id,
                    VmState::LIVE,
                    VmState::Failed,
                    Some("cannot record its provisioning run"),
                )
                .await;
            self.untrack(vm.id).await;
            return Err(e.into());
        }
        // Counted once its run is recorded: every boot started ends.
        if !vm.test {
            self.metrics.boot_started(vm.tenant_id, &vm.workspace);
        }
        let pool = self.clone();
        let id = instance.id;
        tokio::spawn(async move {
            pool.boot(vm, plan, id).await;
        });
        Ok(instance)
    }

    async fn boot(self: Arc<Self>, vm: VmRecord, plan: BootPlan, instance: InstanceId) {
        let started = std::time::Instant::now();
        let progress = Arc::new(Progress::default());
        let driver = self
            .fleet
            .driver(vm.node_id, plan.driver)
            .await
            .map_err(|e| e.to_string());
        let outcome = match driver.and_then(|d| Ok((d, plan.image.clone()?))) {
            Ok((driver, image)) => {
                let driver = driver.clone();
                let spec = VmSpec {
                    id: vm.id,
                    tenant: vm.tenant_id,
                    workspace: vm.workspace.clone(),
                    cpus: plan.cpus,
                    memory_mib: plan.memory_mib,
                    image,
                    network: plan.network.clone(),
                    disk_mib: plan.disk_mib,
                };
                let recorder = InstanceRecorder {
                    store: self.store.clone(),
                    instance,
                    vm: vm.id,
                    provisioning: AtomicBool::new(false),
                    progress: progress.clone(),
                };
                hearth_provisioning::provision(driver.as_ref(), &spec, &plan.provision, &recorder)
                    .await
            }
            Err(e) => {
                let mut steps = hearth_provisioning::planned_steps(&plan.provision);
                steps[0].status = StepStatus::Failed;
                steps[0].error = Some(e.clone());
                (
                    steps,
                    Summary {
                        success: false,
                        failed_step: Some("create_vm".into()),
                        error: Some(e),
                    },
                )
            }
        };
        let (steps, mut summary) = outcome;
        progress.close();
        // What provisioning left is what every return goes back to: sealed
        // before the VM can be claimed; a VM that cannot be sealed fails.
        if summary.success && !vm.test {
            let sealed = match self.fleet.driver(vm.node_id, plan.driver).await {
                Ok(driver) => driver.seal(vm.id).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sealed {
                summary = Summary {
                    success: false,
                    failed_step: Some("seal".into()),
                    error: Some(format!("cannot seal the provisioned VM: {e}")),
                };
            }
        }
        let status = if summary.success {
            InstanceStatus::Ready
        } else {
            InstanceStatus::Failed
        };
        let steps_json = serde_json::to_value(&steps).unwrap_or_default();
        let summary_json = serde_json::to_value(&summary).unwrap_or_default();
        if let Err(e) = self
            .store
            .update_instance(instance, status, &steps_json, Some(&summary_json))
            .await
        {
            tracing::error!(instance = %instance, error = %e, "cannot record a provisioning run's end");
        }
        let boot_ms = started.elapsed().as_millis() as u64;
        if !vm.test {
            let failed = (!summary.success).then_some(summary.failed_step.as_deref());
            self.metrics.boot_ended(
                vm.tenant_id,
                &vm.workspace,
                &steps,
                started.elapsed(),
                failed,
            );
        }
        if !summary.success {
            let error = format!(
                "{} failed: {}",
                summary.failed_step.as_deref().unwrap_or("provisioning"),
                summary.error.as_deref().unwrap_or("unknown error")
            );
            tracing::warn!(vm = %vm.id, workspace = %vm.workspace, instance = %instance, test = vm.test, %error, "provisioning failed");
            // Given up meanwhile (its node stopped answering): the failure
            // is the node's, not the workspace's, and its agent was
            // re-queued with the give-up (it may be booting elsewhere now).
            if vm.node_id.is_some()
                && let Ok(now) = self.store.get_vm(vm.id).await
                && !now.state.is_live()
            {
                self.untrack(vm.id).await;
                self.wake_for(Wake::Task);
                return;
            }
            // The back-off is recorded while the VM still counts as booting:
            // a pass woken in between (every write wakes one) would else see
            // neither and boot again at once.
            // A test boot is an experiment: it never throttles the pool.
            if !vm.test
                && let Err(e) = self
                    .record_failure(vm.tenant_id, &vm.workspace, &error)
                    .await
            {
                tracing::error!(error = %e, "cannot record a failed boot");
            }
            let _ = self
                .store
                .set_vm_state(vm.id, VmState::LIVE, VmState::Draining, Some(&error))
                .await;
            self.destroy_now(&vm, VmState::Failed, Some(&error)).await;
            self.requeue_reserved(vm.tenant_id, &vm).await;
        } else if vm.test {
            tracing::info!(vm = %vm.id, workspace = %vm.workspace, instance = %instance, boot_ms, "test boot ready; destroying its VM");
            let _ = self
                .store
                .set_vm_state(vm.id, VmState::LIVE, VmState::Draining, None)
                .await;
            self.destroy_now(&vm, VmState::Destroyed, None).await;
        } else {
            match self.store.vm_ready(vm.id).await {
                Ok(Ready::Idle) => {
                    tracing::info!(vm = %vm.id, workspace = %vm.workspace, boot_ms, "VM warm");
                    self.record_success(vm.tenant_id, &vm.workspace).await;
                }
                Ok(Ready::Assigned(agent)) => {
                    tracing::info!(vm = %vm.id, agent = %agent, boot_ms, "cold-booted VM assigned");
                    self.record_success(vm.tenant_id, &vm.workspace).await;
                    if let Ok(record) = self.store.get_agent(vm.tenant_id, agent).await {
                        self.metrics.claim_after_wait(&record, Outcome::Cold);
                        self.agent_started(&record);
                    }
                }
                Ok(Ready::Gone) => {
                    // Flushed or nuked while booting.
                    self.destroy_now(&vm, VmState::Destroyed, None).await;
                }
                Err(e) => tracing::error!(vm = %vm.id, error = %e, "cannot record a booted VM"),
            }
        }
        self.untrack(vm.id).await;
        self.wake_for(Wake::Task);
    }

    /// Starts a warm-pool test boot of a workspace: one VM provisioned like
    /// a warm one, never handed to an agent, destroyed when its run ends
    /// (the instance record stays).
    pub async fn test_boot(
        self: &Arc<Self>,
        tenant: TenantId,
        workspace: &str,
    ) -> Result<InstanceRecord, PoolError> {
        let pass = self.read_pass(tenant).await?.pass;
        let plan = pass.boot_plans.get(workspace).cloned().ok_or_else(|| {
            PoolError::Precondition(format!(
                "workspace {workspace:?} has no environment to boot"
            ))
        })?;
        let max_vms = pass.snapshot.max_vms.ok_or_else(|| {
            PoolError::Precondition(
                "no pool config: set one with `hearth set pool-config default`".into(),
            )
        })?;
        let mut vm = VmRecord::booting(
            VmId::new(),
            tenant,
            workspace,
            &driver_name(plan.driver),
            plan.env_version,
            plan.image_version,
        );
        vm.setup_digest = plan.setup_digest.clone();
        vm.test = true;
        vm.task_owner = Some(self.options.replica.clone());
        vm.cpus = i64::from(plan.cpus);
        vm.memory_mib = plan.memory_mib as i64;
        let mut placer = self.placer().await?;
        match self.place_and_insert(&mut vm, max_vms, &mut placer).await? {
            InsertVm::Inserted => {}
            InsertVm::NodeFull => {
                return Err(PoolError::Precondition(
                    "no node has room for a test boot (cpus, memory, VM slots, boots in flight)"
                        .into(),
                ));
            }
            _ => {
                return Err(PoolError::Precondition(format!(
                    "the tenant is at max_vms ({max_vms}): a test boot needs a free slot"
                )));
            }
        }
        tracing::info!(tenant = %tenant, vm = %vm.id, workspace, "test boot");
        self.start_boot(vm, plan).await
    }

    async fn record_success(&self, tenant: TenantId, workspace: &str) {
        // Most boots follow successes: one row read, no lock, no write.
        let clean = |state: &Option<WorkspaceState>| {
            state
                .as_ref()
                .is_none_or(|s| s.consecutive_failures == 0 && s.backoff_until.is_none())
        };
        match self.store.get_workspace_state(tenant, workspace).await {
            Ok(state) if clean(&state) => return,
            Ok(_) => {}
            Err(_) => return,
        }
        let _guard = self.workspace_state_lock.lock().await;
        let Ok(state) = self.store.get_workspace_state(tenant, workspace).await else {
            return;
        };
        if let Some(state) = state
            && (state.consecutive_failures > 0 || state.backoff_until.is_some())
            && !state.hard_limited
        {
            let reset = WorkspaceState {
                consecutive_failures: 0,
                backoff_until: None,
                last_error: None,
                ..state
            };
            let _ = self.store.put_workspace_state(tenant, &reset).await;
        }
    }

    async fn record_failure(
        &self,
        tenant: TenantId,
        workspace: &str,
        error: &str,
    ) -> Result<(), PoolError> {
        let _guard = self.workspace_state_lock.lock().await;
        let current = self
            .store
            .get_workspace_state(tenant, workspace)
            .await?
            .unwrap_or_else(|| WorkspaceState {
                workspace: workspace.to_owned(),
                ..Default::default()
            });
        let next = plan::after_failure(&current, error, now_millis(), &self.options.settings);
        if next.hard_limited && !current.hard_limited {
            tracing::error!(tenant = %tenant, workspace, failures = next.consecutive_failures, error, "workspace hard-limited: boots stopped");
        }
        self.store.put_workspace_state(tenant, &next).await?;
        Ok(())
    }

    /// Starts an agent's command when it has one and none runs yet, as a
    /// job in its VM (see [`Pool::follow_command`]), and records its end.
    /// Called again for an agent whose command already runs (after a
    /// restart of the control plane, a failover), it re-attaches to the
    /// same job: its output goes on and its exit code is recorded.
    pub fn agent_started(self: &Arc<Self>, agent: &AgentRecord) {
        let (Some(command), Some(vm_id)) = (agent.command.clone(), agent.vm_id) else {
            return;
        };
        if agent.phase != AgentPhase::Running || !self.commands.lock().unwrap().insert(agent.id) {
            return;
        }
        let pool = self.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            let outcome = pool.follow_command(&agent, vm_id, &command).await;
            let (phase, update) = match outcome {
                Ok(Some((result, output))) => (
                    if result.exit_code == 0 {
                        AgentPhase::Completed
                    } else {
                        AgentPhase::Failed
                    },
                    AgentUpdate {
                        exit_code: Some(result.exit_code),
                        output: Some(output),
                        error: result.timed_out.then(|| "the command timed out".to_owned()),
                    },
                ),
                // Someone else decided its fate meanwhile (killed, slept,
                // lost with its node): nothing to record.
                Ok(None) => {
                    pool.commands.lock().unwrap().remove(&agent.id);
                    pool.wake_for(Wake::Task);
                    return;
                }
                Err(e) => (
                    AgentPhase::Failed,
                    AgentUpdate {
                        error: Some(e.to_string()),
                        ..Default::default()
                    },
                ),
            };
            match pool
                .store
                .transition_agent(
                    agent.tenant_id,
                    agent.id,
                    &[AgentPhase::Running, AgentPhase::Idle],
                    phase,
                    &update,
                )
                .await
            {
                Ok(_) => tracing::info!(agent = %agent.id, %phase, "agent finished"),
                Err(StoreError::Conflict(_)) => {} // killed or put to sleep meanwhile
                Err(e) => {
                    tracing::error!(agent = %agent.id, error = %e, "cannot record an agent's end")
                }
            }
            pool.commands.lock().unwrap().remove(&agent.id);
            pool.wake_for(Wake::Task);
        });
    }

    /// Runs an agent's command as the job `agent-<id>-<resurrections>` in
    /// its VM (a resurrected agent runs a fresh one; starting one that runs
    /// already starts nothing), follows it from byte 0 to its end, and
    /// returns its end and its output's tail (both streams merged, secrets
    /// masked, as [`Pool::exec_in_agent`] keeps them). A broken connection
    /// (the VM's node restarting, the network) is retried with back-off,
    /// attaching again from the bytes received, for as long as the agent
    /// still runs on the VM and the VM exists and runs. `None`: the agent
    /// stopped running on the VM meanwhile.
    async fn follow_command(
        &self,
        agent: &AgentRecord,
        vm_id: VmId,
        command: &str,
    ) -> Result<Option<(ExecResult, String)>, PoolError> {
        let job = agent_job(agent);
        let vm = self.store.get_vm(vm_id).await?;
        let (env, redactor) = self
            .agent_environment(agent.tenant_id, &agent.workspace)
            .await?;
        let mut request = ExecRequest {
            timeout: AGENT_COMMAND_TIMEOUT,
            env,
            ..ExecRequest::new(command)
        };
        request
            .env
            .insert("HEARTH_AGENT_ID".into(), agent.id.to_string());
        // Only while the store still has it running on this VM: a stale
        // read (a pass's cached snapshot) must never start an agent's
        // command on a VM that was given back and handed to another.
        if !self.still_following(agent, &vm).await? {
            return Ok(None);
        }
        let mut retry = Retry::default();
        loop {
            let started = async {
                self.driver_for(&vm)
                    .await?
                    .start_job(vm_id, &job, &request)
                    .await
                    .map_err(PoolError::from)
            }
            .await;
            match started {
                Ok(()) => break,
                Err(e) if retryable(&e) => {
                    tracing::warn!(agent = %agent.id, vm = %vm_id, error = %e, "cannot start the agent's job yet");
                    if !self.still_following(agent, &vm).await? {
                        return Ok(None);
                    }
                    retry.wait().await;
                }
                Err(e) => return Err(gone(e, vm_id)),
            }
        }
        let mut tail = TailBuffer::with_limit(redactor, OUTPUT_TAIL);
        let mut received: u64 = 0;
        let mut retry = Retry::default();
        loop {
            let attached = async {
                let driver = self.driver_for(&vm).await?;
                let (tx, mut rx) = mpsc::unbounded_channel::<OutputChunk>();
                let mut attach = std::pin::pin!(driver.attach_job(vm_id, &job, received, Some(tx)));
                let mut take = |chunk: OutputChunk| {
                    received += chunk.data.len() as u64;
                    tail.push(&chunk.data);
                };
                let result = loop {
                    tokio::select! {
                        biased;
                        Some(chunk) = rx.recv() => take(chunk),
                        result = &mut attach => break result,
                    }
                };
                // What the attach sent before it ended counts, and nothing
                // after (the next attach starts from here).
                rx.close();
                while let Ok(chunk) = rx.try_recv() {
                    take(chunk);
                }
                result.map_err(PoolError::from)
            }
            .await;
            match attached {
                Ok(result) => return Ok(Some((result, tail.text()))),
                Err(e) if retryable(&e) => {
                    tracing::warn!(agent = %agent.id, vm = %vm_id, received, error = %e, "the agent's job connection broke; attaching again");
                    if !self.still_following(agent, &vm).await? {
                        return Ok(None);
                    }
                    retry.wait().await;
                }
                Err(e) => return Err(gone(e, vm_id)),
            }
        }
    }

    /// Whether an agent's command is still this pool's to follow: the
    /// agent runs on the VM, whose record is live. An `Err` says why the
    /// agent fails: its VM is gone or its processes died.
    async fn still_following(&self, agent: &AgentRecord, vm: &VmRecord) -> Result<bool, PoolError> {
        let now = self.store.get_agent(agent.tenant_id, agent.id).await?;
        if !matches!(now.phase, AgentPhase::Running | AgentPhase::Idle) || now.vm_id != Some(vm.id)
        {
            return Ok(false);
        }
        match self.store.get_vm(vm.id).await {
            Ok(record) if record.state == VmState::Assigned => {}
            Ok(_) | Err(StoreError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        // What the VM's node says (when it answers: an unreachable node is
        // waited for; losing it is the fleet's call).
        if let Ok(driver) = self.driver_for(vm).await
            && let Ok(observed) = driver.list().await
        {
            match observed.iter().find(|o| o.id == vm.id) {
                None => return Err(gone(PoolError::Driver(DriverError::NotFound(vm.id)), vm.id)),
                Some(o) if !o.running => {
                    return Err(PoolError::Precondition(format!(
                        "the processes of its VM {} died while its command ran",
                        vm.id
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(true)
    }

    /// The variables of the environment of `workspace` (what agent
    /// commands get in their process environment, as provisioning commands
    /// do) and a redactor of every secret such a command could print: those
    /// values and the workspace's repo URL credentials. Empty when the
    /// workspace or its environment is gone.
    pub async fn agent_environment(
        &self,
        tenant: TenantId,
        workspace: &str,
    ) -> Result<(BTreeMap<String, String>, Redactor), PoolError> {
        let Some(ws) = self
            .store
            .get_resource(tenant, Kind::Workspace, workspace)
            .await?
        else {
            return Ok((BTreeMap::new(), Redactor::default()));
        };
        let ws: Workspace = decode(&ws.spec)?;
        let env = match self
            .store
            .get_resource(tenant, Kind::Environment, &ws.environment)
            .await?
        {
            Some(record) => decode::<Environment>(&record.spec)?.env,
            None => BTreeMap::new(),
        };
        let redactor = secret_redactor(&env, ws.repos.iter().map(|r| r.url.as_str()));
        Ok((env, redactor))
    }

    /// Runs a command on an agent's VM and returns (result, stdout,
    /// stderr), with the environment's variables set and secrets masked.
    pub async fn exec_in_agent(
        &self,
        tenant: TenantId,
        agent: AgentId,
        command: &str,
        timeout: Duration,
    ) -> Result<(ExecResult, String, String), PoolError> {
        let record = self.store.get_agent(tenant, agent).await?;
        let vm_id = match (record.phase, record.vm_id) {
            (AgentPhase::Running | AgentPhase::Idle, Some(vm)) => vm,
            (phase, _) => {
                return Err(PoolError::Precondition(format!(
                    "agent {agent} is {phase}, not on a VM"
                )));
            }
        };
        self.exec_as_agent(&record, vm_id, command, timeout, false)
            .await
    }

    /// Runs `command` on `vm_id` as `agent`'s: with the variables of
    /// its workspace's environment and `HEARTH_AGENT_ID` set, its output
    /// kept as tails masked as step output is (the stored tail never holds
    /// a secret). Returns (result, stdout, stderr), or with `merged` both
    /// streams in one tail, in the order they came, and stderr empty.
    async fn exec_as_agent(
        &self,
        agent: &AgentRecord,
        vm_id: VmId,
        command: &str,
        timeout: Duration,
        merged: bool,
    ) -> Result<(ExecResult, String, String), PoolError> {
        let vm = self.store.get_vm(vm_id).await?;
        let driver = self.driver_for(&vm).await?;
        let (env, redactor) = self
            .agent_environment(agent.tenant_id, &agent.workspace)
            .await?;
        let mut request = ExecRequest {
            timeout,
            env,
            ..ExecRequest::new(command)
        };
        request
            .env
            .insert("HEARTH_AGENT_ID".into(), agent.id.to_string());
        let (tx, mut rx) = mpsc::unbounded_channel::<OutputChunk>();
        let collect = tokio::spawn(async move {
            let mut out = TailBuffer::with_limit(redactor.clone(), OUTPUT_TAIL);
            let mut err = TailBuffer::with_limit(redactor, OUTPUT_TAIL);
            while let Some(chunk) = rx.recv().await {
                match chunk.stream {
                    Stream::Stderr if !merged => err.push(&chunk.data),
                    _ => out.push(&chunk.data),
                }
            }
            (out.text(), err.text())
        });
        let result = driver.exec(vm_id, &request, Some(tx)).await?;
        let (out, err) = collect.await.unwrap_or_default();
        Ok((result, out, err))
    }

    /// Marks idle VMs (of one workspace, or all) for destruction; the pool
    /// then replenishes. Running agents are untouched. Returns how many,
    /// and records `pool.flushed` naming `actor`.
    pub async fn flush(
        &self,
        tenant: TenantId,
        workspace: Option<&str>,
        actor: Option<&str>,
    ) -> Result<usize, PoolError> {
        let mut flushed = 0;
        for vm in self.store.list_vms(tenant, false).await? {
            if vm.state == VmState::Idle
                && !vm.test
                && workspace.is_none_or(|w| w == vm.workspace)
                && self
                    .store
                    .set_vm_state(vm.id, &[VmState::Idle], VmState::Draining, None)
                    .await?
            {
                flushed += 1;
            }
        }
        tracing::info!(tenant = %tenant, workspace, flushed, "pool flushed");
        let event = pool_event(
            EventKind::PoolFlushed,
            actor,
            serde_json::json!({ "workspace": workspace, "flushed": flushed }),
        );
        self.store.append_events(tenant, &[event]).await?;
        self.wake();
        Ok(flushed)
    }

    /// Stops the pool, terminates every agent and deletes every VM of the
    /// tenant; waits (bounded) for the deletions. Returns (agents, VMs),
    /// and records `pool.nuked` naming `actor`.
    pub async fn nuke(
        &self,
        tenant: TenantId,
        actor: Option<&str>,
    ) -> Result<(usize, usize), PoolError> {
        self.store.set_pool_stopped(tenant, true).await?;
        let mut terminated = 0;
        let active = active_agents(self.store.as_ref(), tenant).await?;
        for agent in active {
            let update = AgentUpdate {
                error: Some("terminated by pool flush --nuke".into()),
                ..Default::default()
            };
            match self
                .store
                .transition_agent(
                    tenant,
                    agent.id,
                    AgentPhase::ACTIVE,
                    AgentPhase::Killed,
                    &update,
                )
                .await
            {
                Ok(_) => terminated += 1,
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut deleted = 0;
        for vm in self.store.list_vms(tenant, false).await? {
            let from: Vec<VmState> = VmState::LIVE
                .iter()
                .copied()
                .filter(|s| *s != VmState::Draining)
                .collect();
            if vm.state == VmState::Draining
                || self
                    .store
                    .set_vm_state(vm.id, &from, VmState::Draining, None)
                    .await?
            {
                deleted += 1;
            }
        }
        self.wake();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while tokio::time::Instant::now() < deadline {
            if self.store.list_vms(tenant, false).await?.is_empty() {
                break;
            }
            self.wake();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!(tenant = %tenant, terminated, deleted, "pool nuked; stopped until pool up");
        let event = pool_event(
            EventKind::PoolNuked,
            actor,
            serde_json::json!({ "terminated": terminated, "deleted": deleted }),
        );
        self.store.append_events(tenant, &[event]).await?;
        Ok((terminated, deleted))
    }

    /// Starts a stopped pool and nudges it to reach min_idle now. Returns
    /// whether it was stopped; records `pool.up` naming `actor`.
    pub async fn up(&self, tenant: TenantId, actor: Option<&str>) -> Result<bool, PoolError> {
        let was = self.store.get_pool_state(tenant).await?.stopped;
        if was {
            self.store.set_pool_stopped(tenant, false).await?;
        }
        let event = pool_event(
            EventKind::PoolUp,
            actor,
            serde_json::json!({ "was_stopped": was }),
        );
        self.store.append_events(tenant, &[event]).await?;
        self.wake_for(Wake::PoolUp);
        Ok(was)
    }

    /// Clears a workspace's failure back-off and hard limit.
    pub async fn reset(&self, tenant: TenantId, workspace: &str) -> Result<(), PoolError> {
        let _guard = self.workspace_state_lock.lock().await;
        let states = self.store.list_workspace_states(tenant).await?;
        let fingerprint = states
            .into_iter()
            .find(|s| s.workspace == workspace)
            .map(|s| s.config_fingerprint)
            .unwrap_or_default();
        let fresh = WorkspaceState {
            workspace: workspace.to_owned(),
            config_fingerprint: fingerprint,
            ..Default::default()
        };
        self.store.put_workspace_state(tenant, &fresh).await?;
        self.wake();
        Ok(())
    }

    /// At start: reconciles what the drivers really run with the store.
    /// Adopts what matches (re-attaching to the jobs of agents whose
    /// command runs), destroys what nothing knows, closes records of VMs
    /// that are gone, fails the agents that were on them, and requeues
    /// agents whose cold boot was interrupted.
    pub async fn adopt(self: &Arc<Self>) -> Result<AdoptReport, PoolError> {
        let mut report = AdoptReport::default();
        let mut observed = HashMap::new();
        for driver in self.drivers.all() {
            for vm in driver.list().await? {
                observed.insert(vm.id, (vm, driver.clone()));
            }
        }
        let records = self.store.list_live_vms().await?;
        let known: HashSet<VmId> = records.iter().map(|v| v.id).collect();
        for (id, (vm, driver)) in &observed {
            if !known.contains(id) {
                tracing::warn!(vm = %id, workspace = %vm.workspace, "destroying a VM the store does not know");
                driver.destroy(*id).await?;
                report.unknown_destroyed += 1;
            }
        }
        for vm in records {
            let real = observed.get(&vm.id);
            let alive = real.is_some_and(|(o, _)| o.running);
            match vm.state {
                VmState::Idle | VmState::Assigned if alive => {
                    report.adopted += 1;
                    if vm.state == VmState::Assigned
                        && let Some(agent) = vm.agent_id
                        && let Ok(record) = self.store.get_agent(vm.tenant_id, agent).await
                        && record.command.is_some()
                        && record.phase == AgentPhase::Running
                    {
                        // Its command runs on as a job in the VM: follow it
                        // again (no agent fails because we restarted).
                        self.agent_started(&record);
                        report.agents_reattached += 1;
                    }
                }
                _ => {
                    // Half-booted, draining, or gone: close the record.
                    let from: Vec<VmState> = VmState::LIVE.to_vec();
                    let lost_agent = (vm.state == VmState::Assigned)
                        .then_some(vm.agent_id)
                        .flatten();
                    self.store
                        .set_vm_state(vm.id, &from, VmState::Draining, None)
                        .await?;
                    if let Some((_, driver)) = real {
                        driver.destroy(vm.id).await?;
                    }
                    let note = if real.is_none() {
                        Some("the VM was gone after a control-plane restart")
                    } else {
                        None
                    };
                    self.store
                        .set_vm_state(vm.id, &[VmState::Draining], VmState::Destroyed, note)
                        .await?;
                    report.records_closed += 1;
                    if let Some(agent) = lost_agent {
                        let update = AgentUpdate {
                            error: Some("its VM was lost while the control plane was down".into()),
                            ..Default::default()
                        };
                        if self
                            .store
                            .transition_agent(
                                vm.tenant_id,
                                agent,
                                &[AgentPhase::Running, AgentPhase::Idle],
                                AgentPhase::Failed,
                                &update,
                            )
                            .await
                            .is_ok()
                        {
                            report.agents_failed += 1;
                        }
                    }
                }
            }
        }
        // Agents waiting on a cold boot that no longer runs wait again.
        for tenant in self.store.list_tenants().await? {
            report.agents_requeued += self.requeue_orphaned(tenant.id).await?;
        }
        tracing::info!(?report, "adoption done");
        self.wake_for(Wake::Start);
        Ok(report)
    }
}

/// The job an agent's command runs as: one per resurrection.
pub fn agent_job(agent: &AgentRecord) -> String {
    format!("agent-{}-{}", agent.id, agent.resurrections)
}

/// Longest an agent's command may run.
const AGENT_COMMAND_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Whether a failure to reach a job may mend by itself: the connection to
/// its VM's agent, or to its node, broke.
fn retryable(e: &PoolError) -> bool {
    matches!(
        e,
        PoolError::Driver(DriverError::Guest(_) | DriverError::Io(_))
    )
}

/// The error an agent fails with when its job cannot be followed: a VM
/// gone is said as such.
fn gone(e: PoolError, vm: VmId) -> PoolError {
    match e {
        PoolError::Driver(DriverError::NotFound(_)) => {
            PoolError::Precondition(format!("its VM {vm} is gone: its command's end is unknown"))
        }
        e => e,
    }
}

/// Back-off between attempts to reach a job: 100 ms doubling to 5 s.
#[derive(Debug, Default)]
struct Retry {
    attempts: u32,
}

impl Retry {
    async fn wait(&mut self) {
        let delay = Duration::from_millis(100)
            .saturating_mul(1 << self.attempts.min(6))
            .min(Duration::from_secs(5));
        self.attempts += 1;
        tokio::time::sleep(delay).await;
    }
}

impl Pool {
    /// Agents `provisioning` for a cold boot that no longer runs (no live VM
    /// is reserved for them) wait again; returns how many.
    async fn requeue_orphaned(&self, tenant: TenantId) -> Result<usize, PoolError> {
        let provisioning = self
            .store
            .list_agents(
                tenant,
                &AgentFilter {
                    phases: vec![AgentPhase::Provisioning],
                    ..Default::default()
                },
            )
            .await?;
        if provisioning.is_empty() {
            return Ok(0);
        }
        let booting: HashSet<AgentId> = self
            .store
            .list_vms(tenant, false)
            .await?
            .iter()
            .filter_map(|v| v.reserved_for)
            .collect();
        let mut requeued = 0;
        for agent in provisioning {
            if !booting.contains(&agent.id)
                && self
                    .store
                    .transition_agent(
                        tenant,
                        agent.id,
                        &[AgentPhase::Provisioning],
                        AgentPhase::Queued,
                        &AgentUpdate::default(),
                    )
                    .await
                    .is_ok()
            {
                requeued += 1;
            }
        }
        Ok(requeued)
    }
}

/// The tenant's non-terminal agents.
async fn active_agents(store: &dyn Store, tenant: TenantId) -> Result<Vec<AgentRecord>, PoolError> {
    Ok(store
        .list_agents(
            tenant,
            &AgentFilter {
                phases: AgentPhase::ACTIVE.to_vec(),
                ..Default::default()
            },
        )
        .await?)
}

/// A `pool.*` event of the tenant's one pool (`pool/default`).
fn pool_event(kind: EventKind, actor: Option<&str>, data: serde_json::Value) -> NewEvent {
    let mut event = NewEvent::new(kind, "pool/default", data);
    event.actor = actor.map(str::to_owned);
    event
}
