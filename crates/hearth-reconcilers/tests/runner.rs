//! The pool runner against the fake driver and a real SQLite store: boots,
//! claims, returns, failures, adoption.

use hearth_core::ids::{AgentId, TenantId, VmId};
use hearth_core::rbac::IdentityKind;
use hearth_core::resource::{Kind, ResourceRef};
use hearth_drivers::fake::{FakeConfig, FakeDriver};
use hearth_drivers::{Driver, Drivers, VmSpec};
use hearth_reconcilers::{Pool, PoolOptions};
use hearth_store::{
    AgentPhase, AgentUpdate, NewAgent, NewToken, OnIdle, Precondition, PutResource, SqliteStore,
    Store, VmRecord, VmState,
};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

struct Rig {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    fake: Arc<FakeDriver>,
    pool: Arc<Pool>,
    tenant: TenantId,
}

async fn put(
    store: &Arc<dyn Store>,
    tenant: TenantId,
    kind: Kind,
    name: &str,
    spec: serde_json::Value,
    refs: &[ResourceRef],
) {
    store
        .put_resource(PutResource {
            actor: None,
            tenant,
            kind,
            name,
            spec: &spec,
            references: refs,
            precondition: Precondition::None,
        })
        .await
        .unwrap();
}

async fn rig(max_vms: i64, min_idle: i64, max_idle: i64) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("h.db")).await.unwrap());
    let token = NewToken {
        id: hearth_core::ids::TokenId::new(),
        secret_sha256: vec![0; 32],
        expires_at: None,
    };
    let (tenant, _) = store
        .bootstrap(
            "default",
            "admin",
            &token,
            &serde_json::json!({"max_vms": 10}),
        )
        .await
        .unwrap()
        .unwrap();
    put(&store, tenant.id, Kind::PoolConfig, "default", json!({"max_vms": max_vms, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"}), &[]).await;
    put(
        &store,
        tenant.id,
        Kind::Environment,
        "dev",
        json!({"driver": "fake"}),
        &[],
    )
    .await;
    let env_ref = [ResourceRef {
        kind: Kind::Environment,
        name: "dev".into(),
    }];
    put(
        &store,
        tenant.id,
        Kind::Workspace,
        "web",
        json!({"environment": "dev", "min_idle": min_idle, "max_idle": max_idle}),
        &env_ref,
    )
    .await;
    let fake = Arc::new(FakeDriver::new(FakeConfig::default()));
    let mut options = PoolOptions::default();
    options.settings.backoff_base_ms = 1;
    options.settings.backoff_max_ms = 1;
    options.settings.hard_limit_failures = 3;
    let pool = Pool::new(store.clone(), Drivers::new().with(fake.clone()), options);
    Rig {
        _dir: dir,
        store,
        fake,
        pool,
        tenant: tenant.id,
    }
}

impl Rig {
    /// A `booting` record of workspace `web` built from its current setup
    /// (what the runner records at boot), as a test's own insert.
    async fn web_vm(&self, env_version: i64) -> VmRecord {
        let spec = self
            .store
            .get_resource(self.tenant, Kind::Workspace, "web")
            .await
            .unwrap()
            .unwrap()
            .spec;
        let ws: hearth_core::resource::Workspace = serde_json::from_value(spec).unwrap();
        let mut vm = VmRecord::booting(VmId::new(), self.tenant, "web", "fake", env_version, 0);
        vm.setup_digest = hearth_core::fingerprint::setup_digest(&ws);
        vm
    }

    /// Runs passes until `f` holds (or panics after 10 s).
    async fn settle(&self, what: &str, f: impl AsyncFn(&Rig) -> bool) {
        for _ in 0..500 {
            self.pool.reconcile_tenant(self.tenant).await.unwrap();
            if f(self).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "never settled: {what}; VMs: {:?}",
            self.store.list_vms(self.tenant, true).await.unwrap()
        );
    }

    async fn count(&self, state: VmState) -> usize {
        self.store
            .list_vms(self.tenant, false)
            .await
            .unwrap()
            .iter()
            .filter(|v| v.state == state)
            .count()
    }

    async fn agent(&self) -> AgentId {
        let new = NewAgent {
            id: AgentId::new(),
            tenant_id: self.tenant,
            workspace: "web".into(),
            owner_id: hearth_core::ids::IdentityId::new(),
            owner_name: "dev".into(),
            owner_kind: IdentityKind::Developer,
            parent_id: None,
            on_idle: OnIdle::Sleep,
            command: None,
            build: "b".into(),
        };
        self.store.create_agent(&new, None).await.unwrap().id
    }
}

#[tokio::test]
async fn backfills_then_claims_then_returns() {
    let r = rig(10, 2, 2).await;
    r.settle("two warm", async |r| r.count(VmState::Idle).await == 2)
        .await;
    assert_eq!(r.fake.count(), 2);
    let agent = r.agent().await;
    let vm = r
        .store
        .assign_idle_vm(r.tenant, "web", agent)
        .await
        .unwrap()
        .expect("a warm VM");
    r.settle("backfilled", async |r| r.count(VmState::Idle).await == 2)
        .await;
    r.store
        .transition_agent(
            r.tenant,
            agent,
            &[AgentPhase::Running],
            AgentPhase::Completed,
            &AgentUpdate::default(),
        )
        .await
        .unwrap();
    // max_idle 2 and 2 idle: the returned VM is destroyed, in the driver too.
    r.settle("returned", async |r| {
        r.count(VmState::Assigned).await == 0 && r.fake.count() == 2
    })
    .await;
    assert!(
        r.store
            .list_vms(r.tenant, false)
            .await
            .unwrap()
            .iter()
            .all(|v| v.id != vm.id)
    );
    // The cleanup ran in the VM before it was handed back or destroyed? It was destroyed: no cleanup needed.
    let (created, destroyed) = r.fake.totals();
    assert_eq!((created, destroyed), (3, 1));
}

#[tokio::test]
async fn queued_agents_get_cold_boots_up_to_the_cap() {
    let r = rig(2, 0, 0).await;
    let a: Vec<AgentId> = futures_like_join(&r, 3).await;
    r.settle("two running", async |r| {
        let agents = r
            .store
            .list_agents(r.tenant, &Default::default())
            .await
            .unwrap();
        agents
            .iter()
            .filter(|x| x.phase == AgentPhase::Running)
            .count()
            == 2
    })
    .await;
    let third = r.store.get_agent(r.tenant, a[2]).await.unwrap();
    assert_eq!(third.phase, AgentPhase::Queued, "FIFO: the last one waits");
    assert_eq!(r.fake.count(), 2);
    r.store
        .transition_agent(
            r.tenant,
            a[0],
            &[AgentPhase::Running],
            AgentPhase::Completed,
            &AgentUpdate::default(),
        )
        .await
        .unwrap();
    r.settle("third runs", async |r| {
        r.store.get_agent(r.tenant, a[2]).await.unwrap().phase == AgentPhase::Running
    })
    .await;
    assert!(r.fake.count() <= 2);
}

async fn futures_like_join(r: &Rig, n: usize) -> Vec<AgentId> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(r.agent().await);
    }
    ids
}

#[tokio::test]
async fn failing_boots_back_off_and_hard_limit() {
    let r = rig(10, 2, 2).await;
    r.fake.set_failing("web", true);
    r.settle("hard-limited", async |r| {
        r.store
            .list_workspace_states(r.tenant)
            .await
            .unwrap()
            .iter()
            .any(|s| s.hard_limited)
    })
    .await;
    let state = r
        .store
        .list_workspace_states(r.tenant)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(state.consecutive_failures, 3);
    assert!(state.last_error.unwrap().contains("simulated boot failure"));
    let failed = r
        .store
        .list_vms(r.tenant, true)
        .await
        .unwrap()
        .iter()
        .filter(|v| v.state == VmState::Failed)
        .count();
    for _ in 0..10 {
        r.pool.reconcile_tenant(r.tenant).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = r
        .store
        .list_vms(r.tenant, true)
        .await
        .unwrap()
        .iter()
        .filter(|v| v.state == VmState::Failed)
        .count();
    assert_eq!(failed, again, "no more boots once hard-limited");
    assert_eq!(r.fake.count(), 0, "failed boots leave nothing");
    // An operator reset lets it try again.
    r.fake.set_failing("web", false);
    r.pool.reset(r.tenant, "web").await.unwrap();
    r.settle("recovered", async |r| r.count(VmState::Idle).await == 2)
        .await;
}

#[tokio::test]
async fn adoption_destroys_unknown_and_closes_lost() {
    let r = rig(10, 0, 0).await;
    // A VM the driver runs but the store does not know.
    let stray = VmSpec {
        id: VmId::new(),
        tenant: r.tenant,
        workspace: "web".into(),
        cpus: 1,
        memory_mib: 64,
        image: Default::default(),
        network: hearth_drivers::NetworkSpec::host(),
        disk_mib: 0,
    };
    r.fake.create(&stray).await.unwrap();
    // A record whose VM is gone, assigned to a running agent.
    let agent = r.agent().await;
    let mut lost = r.web_vm(1).await;
    lost.state = VmState::Idle;
    r.store.insert_vm(&lost).await.unwrap();
    r.store
        .assign_idle_vm(r.tenant, "web", agent)
        .await
        .unwrap()
        .unwrap();
    // A record half-booted, and its real VM.
    let half = r.web_vm(1).await;
    r.store.insert_vm(&half).await.unwrap();
    r.fake
        .create(&VmSpec {
            id: half.id,
            ..stray.clone()
        })
        .await
        .unwrap();

    let report = r.pool.adopt().await.unwrap();
    assert_eq!(report.unknown_destroyed, 1);
    assert_eq!(report.records_closed, 2);
    assert_eq!(report.agents_failed, 1);
    assert_eq!(r.fake.count(), 0);
    assert!(r.store.list_vms(r.tenant, false).await.unwrap().is_empty());
    let a = r.store.get_agent(r.tenant, agent).await.unwrap();
    assert_eq!(a.phase, AgentPhase::Failed);
    assert!(a.error.unwrap().contains("lost"));
}

/// Runs passes until two in a row reuse the read before them and plan
/// nothing: the tasks of earlier passes are done writing.
async fn until_quiet(r: &Rig) {
    let mut quiet = 0;
    for _ in 0..500 {
        let actions = r.pool.reconcile_tenant(r.tenant).await.unwrap();
        if r.pool.last_pass(r.tenant).unwrap().reused && actions.is_empty() {
            quiet += 1;
            if quiet == 2 {
                return;
            }
        } else {
            quiet = 0;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the pool never settled into passes that reuse their read");
}

#[tokio::test]
async fn passes_reuse_their_read_until_the_store_changes() {
    use hearth_reconcilers::plan::{Action, Reason};
    let r = rig(10, 2, 2).await;
    r.settle("two warm", async |r| r.count(VmState::Idle).await == 2)
        .await;
    until_quiet(&r).await;
    // Nothing written since: the next pass reuses the read again.
    assert!(r.pool.reconcile_tenant(r.tenant).await.unwrap().is_empty());
    let stats = r.pool.last_pass(r.tenant).unwrap();
    assert!(stats.reused);
    assert_eq!(
        stats.vms,
        r.store.list_vms(r.tenant, false).await.unwrap().len()
    );

    // A write through the store: the next pass reads again and sees it.
    let agent = r.agent().await;
    let actions = r.pool.reconcile_tenant(r.tenant).await.unwrap();
    assert!(!r.pool.last_pass(r.tenant).unwrap().reused);
    assert!(
        actions.contains(&Action::Assign {
            agent,
            workspace: "web".into()
        }),
        "{actions:?}"
    );
    r.settle("backfilled", async |r| r.count(VmState::Idle).await == 2)
        .await;
    until_quiet(&r).await;

    // A write by another store on the same file (another process): the
    // status reads again and shows it; the pass after plans from it.
    let other = SqliteStore::open(&r._dir.path().join("h.db"))
        .await
        .unwrap();
    let idle = r
        .store
        .list_vms(r.tenant, false)
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.state == VmState::Idle)
        .unwrap();
    assert!(
        other
            .set_vm_state(idle.id, &[VmState::Idle], VmState::Draining, None)
            .await
            .unwrap()
    );
    let status = r.pool.status(r.tenant).await.unwrap();
    assert_eq!((status.vms.draining, status.vms.active), (1, 1));
    let actions = r.pool.reconcile_tenant(r.tenant).await.unwrap();
    assert!(
        actions.contains(&Action::Destroy {
            vm: idle.id,
            from: VmState::Draining,
            reason: Reason::Draining
        }),
        "{actions:?}"
    );
    r.settle("replaced", async |r| {
        r.count(VmState::Idle).await == 2 && r.count(VmState::Draining).await == 0
    })
    .await;
}

/// `Pool::run` with a resync far away: an idle VM past its `idle_timeout`
/// is destroyed at that deadline, though nothing was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_loop_acts_at_the_earliest_deadline_not_the_resync() {
    let r = rig(10, 0, 1).await;
    put(
        &r.store,
        r.tenant,
        Kind::Environment,
        "dev",
        json!({"driver": "fake", "idle_timeout": "1s"}),
        &[],
    )
    .await;
    let mut options = r.pool.options().clone();
    options.resync = Duration::from_secs(600);
    let pool = Pool::new(
        r.store.clone(),
        Drivers::new().with(r.fake.clone()),
        options,
    );
    // One warm VM, above min_idle 0 (a test's own insert, as a returned VM).
    let mut vm = r.web_vm(2).await;
    vm.state = VmState::Idle;
    r.fake
        .create(&VmSpec {
            id: vm.id,
            tenant: r.tenant,
            workspace: "web".into(),
            cpus: 1,
            memory_mib: 256,
            image: Default::default(),
            network: hearth_drivers::NetworkSpec::host(),
            disk_mib: 0,
        })
        .await
        .unwrap();
    r.store.insert_vm(&vm).await.unwrap();
    let since = std::time::Instant::now();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(pool.clone().run(stopped));
    let mut gone = false;
    for _ in 0..200 {
        let vms = r.store.list_vms(r.tenant, false).await.unwrap();
        if vms.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = since.elapsed();
    stop.send(true).unwrap();
    run.await.unwrap();
    assert!(gone, "the idle VM outlived its idle_timeout");
    assert!(
        waited >= Duration::from_millis(900),
        "destroyed after {waited:?}, before its idle_timeout"
    );
    assert_eq!(r.fake.count(), 0);
    assert_eq!(
        pool.next_deadline(r.tenant),
        None,
        "nothing is due any more"
    );
}

/// Waits (passes in between) until the agent is in `phase`.
async fn wait_phase(
    store: &Arc<dyn Store>,
    pool: &Arc<Pool>,
    tenant: TenantId,
    agent: AgentId,
    phase: AgentPhase,
) -> hearth_store::AgentRecord {
    for _ in 0..500 {
        pool.reconcile_tenant(tenant).await.unwrap();
        let record = store.get_agent(tenant, agent).await.unwrap();
        if record.phase == phase {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "agent never {phase}: {:?}",
        store.get_agent(tenant, agent).await.unwrap()
    );
}

impl Rig {
    /// A queued agent of `web` that runs `command`.
    async fn agent_running(&self, command: &str) -> AgentId {
        let new = NewAgent {
            id: AgentId::new(),
            tenant_id: self.tenant,
            workspace: "web".into(),
            owner_id: hearth_core::ids::IdentityId::new(),
            owner_name: "dev".into(),
            owner_kind: IdentityKind::Developer,
            parent_id: None,
            on_idle: OnIdle::Sleep,
            command: Some(command.into()),
            build: "b".into(),
        };
        self.store.create_agent(&new, None).await.unwrap().id
    }
}

/// The control plane dies (its runtime and every task with it) while an
/// agent's command runs; a new Pool on the same database file and the
/// same driver adopts the VM, re-attaches to the job, and records the
/// command's end: its exit code and its whole output, nothing twice, even
/// across an attach that breaks afterwards.
#[test]
fn a_command_outlives_its_pool_and_the_next_pool_records_its_end() {
    let first = tokio::runtime::Runtime::new().unwrap();
    let (dir, fake, tenant, agent, vm) = first.block_on(async {
        let r = rig(10, 0, 0).await;
        r.fake.hold_jobs(true);
        let agent = r.agent_running("make test").await;
        let record = wait_phase(&r.store, &r.pool, r.tenant, agent, AgentPhase::Running).await;
        let vm = record.vm_id.unwrap();
        let job = r.fake.wait_job(vm).await;
        assert_eq!(job, hearth_reconcilers::agent_job(&record));
        r.fake.wait_job_attaches(vm, &job, 1).await;
        r.fake
            .job_output(vm, &job, hearth_drivers::Stream::Stdout, "before\n");
        (r._dir, r.fake, r.tenant, agent, vm)
    });
    // Every task of the first control plane ends here, mid-command.
    drop(first);

    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("h.db")).await.unwrap());
        let pool = Pool::new(
            store.clone(),
            Drivers::new().with(fake.clone()),
            PoolOptions::default(),
        );
        let running = store.get_agent(tenant, agent).await.unwrap();
        assert_eq!(running.phase, AgentPhase::Running);
        let job = hearth_reconcilers::agent_job(&running);
        let report = pool.adopt().await.unwrap();
        assert_eq!((report.adopted, report.agents_reattached), (1, 1));
        assert_eq!(report.agents_failed, 0);
        fake.wait_job_attaches(vm, &job, 2).await;
        // The connection breaks (the node restarting): attached again.
        fake.break_attaches();
        fake.wait_job_attaches(vm, &job, 3).await;
        fake.job_output(vm, &job, hearth_drivers::Stream::Stderr, "after\n");
        fake.job_exit(vm, &job, 7);
        let done = wait_phase(&store, &pool, tenant, agent, AgentPhase::Failed).await;
        assert_eq!(done.exit_code, Some(7));
        assert_eq!(done.output, "before\nafter\n");
        assert_eq!(done.error, None);
        // One job, started once: the new Pool only attached.
        assert_eq!(fake.jobs(vm).len(), 1);
        assert_eq!(fake.execs(vm), vec!["make test".to_owned()]);
    });
}

/// A job whose VM disappears under it fails its agent with a reason that
/// says so (not a retry forever).
#[tokio::test]
async fn an_agent_whose_vm_vanishes_mid_command_fails_saying_so() {
    let r = rig(10, 0, 0).await;
    r.fake.hold_jobs(true);
    let agent = r.agent_running("sleep 100").await;
    let record = wait_phase(&r.store, &r.pool, r.tenant, agent, AgentPhase::Running).await;
    let vm = record.vm_id.unwrap();
    let job = r.fake.wait_job(vm).await;
    r.fake.wait_job_attaches(vm, &job, 1).await;
    r.fake.destroy(vm).await.unwrap();
    r.fake.break_attaches();
    let failed = wait_phase(&r.store, &r.pool, r.tenant, agent, AgentPhase::Failed).await;
    let error = failed.error.unwrap();
    assert!(error.contains(&format!("its VM {vm} is gone")), "{error}");
    assert_eq!(failed.exit_code, None);
}
