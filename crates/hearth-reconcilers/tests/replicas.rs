//! Two pools (two replicas, two store instances) on one PostgreSQL
//! database, with one fake driver between them (one node): only the
//! tenant's leader reconciles it, a write on either wakes the leader, and
//! when the leader dies the other takes over its boots in flight. Each test
//! creates a database of its own (`HEARTH_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and drops it.

use hearth_core::ids::{AgentId, TenantId, TokenId};
use hearth_core::resource::{Kind, ResourceRef};
use hearth_drivers::Driver;
use hearth_drivers::Drivers;
use hearth_drivers::fake::{FakeConfig, FakeDriver};
use hearth_reconcilers::pass::{PassSource, Wake};
use hearth_reconcilers::{Pool, PoolOptions};
use hearth_store::{
    AgentPhase, NewAgent, NewToken, OnIdle, PgStore, Precondition, PutResource, Store, VmState,
};
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

async fn with_database<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin_url =
        std::env::var("HEARTH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into());
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is unreachable at {admin_url} ({e})"));
    let db = format!("hearth_test_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap();
    let url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);
    let outcome = tokio::spawn(test(url)).await;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
        .await
        .unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn put(store: &dyn Store, tenant: TenantId, kind: Kind, name: &str, spec: serde_json::Value) {
    let refs: Vec<ResourceRef> = match kind {
        Kind::Workspace => vec![ResourceRef {
            kind: Kind::Environment,
            name: "dev".into(),
        }],
        _ => vec![],
    };
    store
        .put_resource(PutResource {
            actor: None,
            tenant,
            kind,
            name,
            spec: &spec,
            references: &refs,
            precondition: Precondition::None,
        })
        .await
        .unwrap();
}

/// The tenant `default` with workspace `web` (fake driver).
async fn setup(store: &dyn Store, max_vms: i64, min_idle: i64) -> TenantId {
    let token = NewToken {
        id: TokenId::new(),
        secret_sha256: vec![0; 32],
        expires_at: None,
    };
    let (tenant, _) = store
        .bootstrap("default", "admin", &token, &json!({"max_vms": max_vms}))
        .await
        .unwrap()
        .unwrap();
    let t = tenant.id;
    put(store, t, Kind::PoolConfig, "default", json!({"max_vms": max_vms, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"})).await;
    put(
        store,
        t,
        Kind::Environment,
        "dev",
        json!({"driver": "fake"}),
    )
    .await;
    set_min_idle(store, t, min_idle).await;
    t
}

async fn set_min_idle(store: &dyn Store, t: TenantId, min_idle: i64) {
    put(
        store,
        t,
        Kind::Workspace,
        "web",
        json!({"environment": "dev", "min_idle": min_idle, "max_idle": min_idle}),
    )
    .await;
}

fn new_agent(t: TenantId) -> NewAgent {
    NewAgent {
        id: AgentId::new(),
        tenant_id: t,
        workspace: "web".into(),
        owner_id: hearth_core::ids::IdentityId::new(),
        owner_name: "dev".into(),
        owner_kind: hearth_core::rbac::IdentityKind::Developer,
        parent_id: None,
        on_idle: OnIdle::Sleep,
        command: None,
        build: "b".into(),
    }
}

fn options(replica: &str) -> PoolOptions {
    PoolOptions {
        replica: replica.into(),
        // Only wakes, deadlines and lead retries make passes: a test that
        // passes is not the resync's doing.
        resync: Duration::from_secs(3600),
        ..PoolOptions::default()
    }
}

/// A replica: its own store instance and pool on the database, the shared
/// fake driver (one node), its run loop.
struct Replica {
    pool: Arc<Pool>,
    stop: watch::Sender<bool>,
    run: tokio::task::JoinHandle<()>,
}

async fn replica(url: &str, name: &str, fake: &Arc<FakeDriver>) -> Replica {
    let store: Arc<dyn Store> = Arc::new(PgStore::connect(url).await.unwrap());
    let pool = Pool::new(store, Drivers::new().with(fake.clone()), options(name));
    let (stop, stop_rx) = watch::channel(false);
    let run = tokio::spawn(pool.clone().run(stop_rx));
    Replica { pool, stop, run }
}

impl Replica {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.run.await.unwrap();
    }
}

/// Waits (bounded, so a broken build fails instead of hanging) until
/// `done` answers true.
async fn until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..600 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up waiting: {what}");
}

async fn count(store: &dyn Store, t: TenantId, state: VmState) -> usize {
    let vms = store.list_vms(t, false).await.unwrap();
    vms.iter().filter(|v| v.state == state).count()
}

/// After every step: the cap holds, no VM is assigned twice, and the
/// driver runs exactly the store's live VMs (nothing leaked, nothing lost).
async fn check_invariants(store: &dyn Store, t: TenantId, max_vms: usize, fake: &FakeDriver) {
    let live = store.list_vms(t, false).await.unwrap();
    assert!(
        live.len() <= max_vms,
        "{} live VMs over max_vms {max_vms}",
        live.len()
    );
    let agents: Vec<AgentId> = live.iter().filter_map(|v| v.agent_id).collect();
    let distinct: HashSet<AgentId> = agents.iter().copied().collect();
    assert_eq!(agents.len(), distinct.len(), "an agent holds two VMs");
    let real: HashSet<_> = fake
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    let recorded: HashSet<_> = live.iter().map(|v| v.id).collect();
    assert_eq!(real, recorded, "the driver and the store disagree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_a_write_on_the_other_wakes_it() {
    with_database(|url| async move {
        let fake = Arc::new(FakeDriver::new(FakeConfig::default()));
        let a = replica(&url, "replica-a", &fake).await;
        let store = a.pool.store();
        let t = setup(store.as_ref(), 4, 2).await;
        a.pool.wake();
        until("A leads", || async { a.pool.leads().contains(&t) }).await;
        let b = replica(&url, "replica-b", &fake).await;
        until("two warm VMs", || async {
            count(store.as_ref(), t, VmState::Idle).await == 2
        })
        .await;
        // B retries the lead (twice a second) and never gets it.
        until("B tried the lead a few times", || async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            true
        })
        .await;
        assert!(b.pool.leads().is_empty());
        assert_eq!(b.pool.passes(t), 0, "B reconciled a tenant A leads");
        assert_eq!(fake.totals().0, 2, "a VM was booted twice");
        check_invariants(store.as_ref(), t, 4, &fake).await;
        // B shows A's pass status, as A kept it: the passes that booted.
        let live = a.pool.pass_status(t).await.unwrap().expect("A's pass");
        assert_eq!(
            (live.replica.as_str(), live.source),
            ("replica-a", PassSource::Live)
        );
        let kept = b.pool.pass_status(t).await.unwrap().expect("A's kept pass");
        assert_eq!(
            (kept.replica.as_str(), kept.source),
            ("replica-a", PassSource::Stored)
        );
        assert_eq!(kept.totals.actions["boot"], 2, "{kept:?}");
        assert!(kept.iteration <= live.iteration);
        // The pass that took the lead over (and the one its wake asked for).
        assert!(kept.totals.wakes["takeover"] >= 1, "{kept:?}");

        // A write through B (its API) wakes A's pass, and nothing else
        // would: A's resync is an hour away and it has no deadline due.
        let before = a.pool.passes(t);
        let b_store = b.pool.store();
        set_min_idle(b_store.as_ref(), t, 3).await;
        b.pool.wake();
        until("A boots the third VM", || async {
            count(store.as_ref(), t, VmState::Idle).await == 3
        })
        .await;
        assert!(a.pool.passes(t) > before);
        assert_eq!(b.pool.passes(t), 0);
        // The pass that booted it was woken by B's NOTIFY, and B shows it.
        let kept = b.pool.pass_status(t).await.unwrap().expect("A's kept pass");
        assert_eq!(kept.totals.actions["boot"], 3, "{kept:?}");
        assert_eq!(
            (kept.woken_by, kept.actions["boot"]),
            (Wake::Replica, 1),
            "{kept:?}"
        );
        // An agent spawned through B is claimed at once (one statement).
        let agent = b_store.spawn_agent(&new_agent(t), None).await.unwrap();
        assert_eq!(agent.phase, AgentPhase::Running);
        b.pool.wake();
        until("A backfills the claimed VM", || async {
            count(store.as_ref(), t, VmState::Idle).await == 3
        })
        .await;
        check_invariants(store.as_ref(), t, 4, &fake).await;
        b.stop().await;
        a.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_dies_the_other_takes_over_its_boots() {
    with_database(|url| async move {
        // Boots that never finish while A leads: A dies with them in flight.
        let fake = Arc::new(FakeDriver::new(FakeConfig {
            boot_latency: Duration::from_secs(3600),
            ..FakeConfig::default()
        }));
        // A lives in a runtime of its own: dropping it ends every task of
        // A at once, as a kill -9 would (its sessions end with its sockets).
        let runtime_a = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (pool_a, t) = {
            let (url, fake) = (url.clone(), fake.clone());
            runtime_a
                .spawn(async move {
                    let a = replica(&url, "replica-a", &fake).await;
                    let store = a.pool.store();
                    let t = setup(store.as_ref(), 4, 2).await;
                    a.pool.wake();
                    let weak = Arc::downgrade(&a.pool);
                    std::mem::forget(a.stop); // A stops by dying, not by asking
                    (weak, t)
                })
                .await
                .unwrap()
        };
        let b = replica(&url, "replica-b", &fake).await;
        let store = b.pool.store();
        // A queued agent gets a cold boot reserved for it.
        let agent = store.create_agent(&new_agent(t), None).await.unwrap();
        b.pool.wake();
        until("A has three boots in flight", || async {
            let vms = store.list_vms(t, false).await.unwrap();
            vms.len() == 3
                && vms.iter().all(|v| {
                    matches!(v.state, VmState::Booting | VmState::Provisioning)
                        && v.task_owner.as_deref() == Some("replica-a")
                })
        })
        .await;
        assert_eq!(
            store.get_agent(t, agent.id).await.unwrap().phase,
            AgentPhase::Provisioning
        );
        assert!(pool_a.upgrade().unwrap().leads().contains(&t));
        assert!(b.pool.leads().is_empty());
        let given_up: HashSet<_> = store
            .list_vms(t, false)
            .await
            .unwrap()
            .iter()
            .map(|v| v.id)
            .collect();

        // A dies. New boots are quick.
        runtime_a.shutdown_background();
        fake.set_config(FakeConfig::default());
        until("B leads", || async { b.pool.leads().contains(&t) }).await;
        until("B warmed the pool and gave the agent a VM", || async {
            count(store.as_ref(), t, VmState::Idle).await == 2
                && store.get_agent(t, agent.id).await.unwrap().phase == AgentPhase::Running
                && store
                    .list_vms(t, false)
                    .await
                    .unwrap()
                    .iter()
                    .all(|v| v.task_owner.is_none())
        })
        .await;
        // A's boots were given up (destroyed in the driver, closed in the
        // store); the agent runs on one of B's.
        for id in &given_up {
            let vm = store.get_vm(*id).await.unwrap();
            assert_eq!(vm.state, VmState::Destroyed, "{vm:?}");
            assert!(vm.error.unwrap_or_default().contains("replica-a"));
        }
        let running = store.get_agent(t, agent.id).await.unwrap();
        assert!(!given_up.contains(&running.vm_id.unwrap()));
        check_invariants(store.as_ref(), t, 4, &fake).await;
        b.stop().await;
    })
    .await;
}
