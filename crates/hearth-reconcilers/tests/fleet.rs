//! The pool over a fleet of nodes: placement by room, cordon and drain,
//! a node that stops reporting (its idle VMs given up and replaced on the
//! others, its assigned VMs lost after `lost_after`). Every node is a fake
//! driver of its own behind a small [`Fleet`]; the nodes are joined in the
//! real store, on both backends (SQLite in a temp file; PostgreSQL on
//! `HEARTH_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, a database of the test's
//! own, dropped afterwards). A node's silence is its heartbeat in the
//! store set in the past, not a sleep.

use async_trait::async_trait;
use hearth_core::ids::{AgentId, NodeId, TenantId, TokenId};
use hearth_core::rbac::IdentityKind;
use hearth_core::resource::{DriverKind, Kind, ResourceRef};
use hearth_drivers::fake::{FakeConfig, FakeDriver};
use hearth_drivers::{Driver, DriverError, Fleet};
use hearth_reconcilers::{FleetTimings, Pool, PoolOptions};
use hearth_store::{
    AgentPhase, NewAgent, NewToken, NodeCapacity, NodeRecord, NodeState, OnIdle, PgStore,
    Precondition, PutResource, SqliteStore, Store, VmRecord, VmState, now_millis,
};
use serde_json::json;
use sqlx::Connection;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Fake nodes by id.
struct FakeFleet(HashMap<NodeId, Arc<FakeDriver>>);

#[async_trait]
impl Fleet for FakeFleet {
    async fn driver(
        &self,
        node: Option<NodeId>,
        _kind: DriverKind,
    ) -> hearth_drivers::Result<Arc<dyn Driver>> {
        let node = node.ok_or_else(|| DriverError::Unsupported("a VM with no node".into()))?;
        let driver = self
            .0
            .get(&node)
            .ok_or_else(|| DriverError::Unsupported(format!("no node {node}")))?;
        Ok(driver.clone())
    }
}

/// A PostgreSQL database of the test's own, dropped with this value.
struct Database {
    admin_url: String,
    name: String,
}

impl Drop for Database {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // Its own thread and runtime: drop runs inside the test's runtime.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let mut admin = sqlx::PgConnection::connect(&url).await?;
                    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await?;
                    admin.close().await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("cannot drop the test database {}", self.name);
        }
    }
}

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Rig {
    store: Arc<dyn Store>,
    pool: Arc<Pool>,
    tenant: TenantId,
    /// By name: n1, n2, n3.
    nodes: Vec<(NodeRecord, Arc<FakeDriver>)>,
    timings: FleetTimings,
    _dir: Option<tempfile::TempDir>,
    _db: Option<Database>,
}

async fn open(backend: Backend) -> (Arc<dyn Store>, Option<tempfile::TempDir>, Option<Database>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("h.db")).await.unwrap();
            (Arc::new(store), Some(dir), None)
        }
        Backend::Postgres => {
            let admin_url = std::env::var("HEARTH_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let mut admin = sqlx::PgConnection::connect(&admin_url)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL is unreachable at {admin_url}: {e}"));
            let name = format!("hearth_test_{}", uuid::Uuid::new_v4().simple());
            sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .unwrap();
            admin.close().await.unwrap();
            let db = Database {
                name: name.clone(),
                admin_url: admin_url.clone(),
            };
            let base = admin_url.rsplit_once('/').unwrap().0;
            let store = PgStore::connect(&format!("{base}/{name}")).await.unwrap();
            (Arc::new(store), None, Some(db))
        }
    }
}

async fn put(
    store: &Arc<dyn Store>,
    tenant: TenantId,
    kind: Kind,
    name: &str,
    spec: serde_json::Value,
) {
    let env_ref = [ResourceRef {
        kind: Kind::Environment,
        name: "dev".into(),
    }];
    let refs: &[ResourceRef] = if kind == Kind::Workspace {
        &env_ref
    } else {
        &[]
    };
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

fn capacity(vm_slots: i64) -> NodeCapacity {
    NodeCapacity {
        drivers: vec!["fake".into()],
        cpus: 64,
        memory_mib: 64 * 1024,
        disk_mib: 0,
        vm_slots,
        max_boots: 4,
    }
}

/// Three nodes of `vm_slots` each; one workspace `web` of `min_idle`.
async fn rig(backend: Backend, vm_slots: i64, min_idle: i64) -> Rig {
    let (store, dir, db) = open(backend).await;
    let token = NewToken {
        id: TokenId::new(),
        secret_sha256: vec![0; 32],
        expires_at: None,
    };
    let (tenant, _) = store
        .bootstrap("default", "admin", &token, &json!({"max_vms": 100}))
        .await
        .unwrap()
        .unwrap();
    let t = tenant.id;
    put(&store, t, Kind::PoolConfig, "default", json!({"max_vms": 100, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"})).await;
    put(
        &store,
        t,
        Kind::Environment,
        "dev",
        json!({"driver": "fake"}),
    )
    .await;
    put(
        &store,
        t,
        Kind::Workspace,
        "web",
        json!({"environment": "dev", "min_idle": min_idle, "max_idle": min_idle + 10}),
    )
    .await;
    let mut nodes = Vec::new();
    let mut drivers = HashMap::new();
    for name in ["n1", "n2", "n3"] {
        let now = now_millis();
        let record = store
            .join_node(&NodeRecord {
                id: NodeId::new(),
                name: name.into(),
                address: "https://127.0.0.1:7071".into(),
                ca_pem: String::new(),
                credential_hash: String::new(),
                state: NodeState::Ready,
                capacity: capacity(vm_slots),
                joined_at: now,
                last_heartbeat: now,
                updated_at: now,
            })
            .await
            .unwrap();
        let fake = Arc::new(FakeDriver::new(FakeConfig::default()));
        drivers.insert(record.id, fake.clone());
        nodes.push((record, fake));
    }
    let timings = FleetTimings {
        heartbeat: Duration::from_secs(2),
        node_timeout: Duration::from_secs(10),
        lost_after: Duration::from_secs(60),
    };
    let options = PoolOptions {
        fleet: timings,
        ..Default::default()
    };
    let pool = Pool::with_fleet(store.clone(), Arc::new(FakeFleet(drivers)), options);
    Rig {
        store,
        pool,
        tenant: t,
        nodes,
        timings,
        _dir: dir,
        _db: db,
    }
}

impl Rig {
    fn node(&self, name: &str) -> &(NodeRecord, Arc<FakeDriver>) {
        self.nodes.iter().find(|(n, _)| n.name == name).unwrap()
    }

    /// Every node but those named reports now.
    async fn heartbeats(&self, except: &[&str]) {
        for (node, _) in &self.nodes {
            if !except.contains(&node.name.as_str()) {
                self.store
                    .node_heartbeat(node.id, &node.capacity)
                    .await
                    .unwrap();
            }
        }
    }

    /// Node `name` last reported `ago` before now (by the store's clock).
    async fn silent_for(&self, name: &str, ago: Duration) {
        let (node, _) = self.node(name);
        let mut old = node.clone();
        old.last_heartbeat = now_millis() - ago.as_millis() as i64;
        let joined = self.store.join_node(&old).await.unwrap();
        assert_eq!(joined.last_heartbeat, old.last_heartbeat);
    }

    async fn live(&self) -> Vec<VmRecord> {
        self.store.list_vms(self.tenant, false).await.unwrap()
    }

    async fn on(&self, name: &str, state: VmState) -> usize {
        let id = self.node(name).0.id;
        let live = self.live().await;
        live.iter()
            .filter(|v| v.node_id == Some(id) && v.state == state)
            .count()
    }

    /// Passes (the other nodes reporting) until `f` holds; panics after 10 s.
    async fn settle(&self, what: &str, silent: &[&str], f: impl AsyncFn(&Rig) -> bool) {
        for _ in 0..500 {
            self.heartbeats(silent).await;
            self.pool.reconcile_tenant(self.tenant).await.unwrap();
            if f(self).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("never settled: {what}; VMs: {:?}", self.live().await);
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

macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::Backend::Postgres).await
            }
        }
    };
}

both_backends!(placement_respects_each_nodes_room);
async fn placement_respects_each_nodes_room(backend: Backend) {
    // 3 nodes of 4 slots; 14 asked, 12 fit.
    let r = rig(backend, 4, 14).await;
    r.settle("every slot warm", &[], async |r| {
        let live = r.live().await;
        live.len() == 12 && live.iter().all(|v| v.state == VmState::Idle)
    })
    .await;
    for name in ["n1", "n2", "n3"] {
        assert_eq!(r.on(name, VmState::Idle).await, 4, "{name}");
        // Each record names the node that really runs it.
        assert_eq!(r.node(name).1.count(), 4, "{name}");
    }
    for v in r.live().await {
        assert_eq!(
            (v.cpus, v.memory_mib),
            (1, 512),
            "what it takes is recorded"
        );
    }
    // No room anywhere: more passes boot nothing.
    for _ in 0..5 {
        r.heartbeats(&[]).await;
        r.pool.reconcile_tenant(r.tenant).await.unwrap();
        assert_eq!(r.live().await.len(), 12);
    }
    // A node with more room reports: the last two go there.
    let (n1, _) = r.node("n1");
    r.store.node_heartbeat(n1.id, &capacity(6)).await.unwrap();
    r.pool.reconcile_tenant(r.tenant).await.unwrap();
    r.settle("the node's new room used", &["n1"], async |r| {
        r.on("n1", VmState::Idle).await == 6
    })
    .await;
}

both_backends!(cordoned_nodes_get_nothing_and_draining_nodes_are_emptied);
async fn cordoned_nodes_get_nothing_and_draining_nodes_are_emptied(backend: Backend) {
    let r = rig(backend, 10, 6).await;
    r.store
        .set_node_state("n1", NodeState::Cordoned)
        .await
        .unwrap();
    r.store
        .set_node_state("n2", NodeState::Cordoned)
        .await
        .unwrap();
    r.settle("six warm", &[], async |r| {
        r.on("n3", VmState::Idle).await == 6
    })
    .await;
    assert_eq!((r.node("n1").1.count(), r.node("n2").1.count()), (0, 0));
    // Drain n3: its idle VMs are replaced on the others (now ready).
    r.store
        .set_node_state("n1", NodeState::Ready)
        .await
        .unwrap();
    r.store
        .set_node_state("n2", NodeState::Ready)
        .await
        .unwrap();
    r.store
        .set_node_state("n3", NodeState::Draining)
        .await
        .unwrap();
    r.settle("n3 emptied, six warm elsewhere", &[], async |r| {
        let live = r.live().await;
        r.on("n3", VmState::Idle).await == 0
            && live.len() == 6
            && live.iter().all(|v| v.state == VmState::Idle)
    })
    .await;
    assert_eq!(r.node("n3").1.count(), 0, "destroyed through its driver");
    assert_eq!(r.node("n1").1.count() + r.node("n2").1.count(), 6);
}

both_backends!(a_silent_nodes_idle_vms_are_replaced_within_one_pass);
async fn a_silent_nodes_idle_vms_are_replaced_within_one_pass(backend: Backend) {
    let r = rig(backend, 10, 6).await;
    r.settle("six warm", &[], async |r| {
        let live = r.live().await;
        live.len() == 6 && live.iter().all(|v| v.state == VmState::Idle)
    })
    .await;
    // Make sure n1 runs some (best of two spreads them; place two there if not).
    let on_n1 = r.on("n1", VmState::Idle).await;
    assert!(on_n1 > 0 || r.node("n1").1.count() == 0);
    let mut n1_vms: Vec<VmRecord> = r
        .live()
        .await
        .into_iter()
        .filter(|v| v.node_id == Some(r.node("n1").0.id))
        .collect();
    if n1_vms.is_empty() {
        // Cordon the others, raise min_idle by two: they go to n1.
        r.store
            .set_node_state("n2", NodeState::Cordoned)
            .await
            .unwrap();
        r.store
            .set_node_state("n3", NodeState::Cordoned)
            .await
            .unwrap();
        put(
            &r.store,
            r.tenant,
            Kind::Workspace,
            "web",
            json!({"environment": "dev", "min_idle": 8, "max_idle": 18}),
        )
        .await;
        r.settle("two on n1", &[], async |r| {
            r.on("n1", VmState::Idle).await == 2
        })
        .await;
        r.store
            .set_node_state("n2", NodeState::Ready)
            .await
            .unwrap();
        r.store
            .set_node_state("n3", NodeState::Ready)
            .await
            .unwrap();
        n1_vms = r
            .live()
            .await
            .into_iter()
            .filter(|v| v.node_id == Some(r.node("n1").0.id))
            .collect();
    }
    let want = r.live().await.len();
    // n1 stops reporting: just within the timeout nothing happens…
    r.heartbeats(&["n1"]).await;
    r.silent_for("n1", r.timings.node_timeout - Duration::from_secs(1))
        .await;
    r.pool.reconcile_tenant(r.tenant).await.unwrap();
    assert_eq!(r.on("n1", VmState::Idle).await, n1_vms.len());
    // …past it, one pass gives its VMs up and boots their replacements.
    r.silent_for("n1", r.timings.node_timeout + Duration::from_secs(1))
        .await;
    r.pool.reconcile_tenant(r.tenant).await.unwrap();
    let live = r.live().await;
    assert_eq!(r.on("n1", VmState::Idle).await, 0);
    assert_eq!(live.len(), want, "replacements booted in the same pass");
    for v in &n1_vms {
        let closed = r.store.get_vm(v.id).await.unwrap();
        assert_eq!(closed.state, VmState::Destroyed);
        assert_eq!(closed.error.as_deref(), Some("node n1 is unreachable"));
    }
    // No driver call reached n1: it fences its VMs itself when it returns.
    assert_eq!(r.node("n1").1.count(), n1_vms.len());
    r.settle("warm again on the others", &["n1"], async |r| {
        let live = r.live().await;
        live.len() == want && live.iter().all(|v| v.state == VmState::Idle)
    })
    .await;
    assert_eq!(r.on("n1", VmState::Idle).await, 0);
}

both_backends!(a_silent_nodes_assigned_vms_are_lost_after_lost_after);
async fn a_silent_nodes_assigned_vms_are_lost_after_lost_after(backend: Backend) {
    let r = rig(backend, 10, 1).await;
    // Only n1 takes VMs, so the agent's VM is there.
    r.store
        .set_node_state("n2", NodeState::Cordoned)
        .await
        .unwrap();
    r.store
        .set_node_state("n3", NodeState::Cordoned)
        .await
        .unwrap();
    r.settle("one warm", &[], async |r| {
        r.on("n1", VmState::Idle).await == 1
    })
    .await;
    let agent = r.agent().await;
    r.settle("assigned", &[], async |r| {
        r.on("n1", VmState::Assigned).await == 1
    })
    .await;
    let vm = r
        .live()
        .await
        .into_iter()
        .find(|v| v.state == VmState::Assigned)
        .unwrap();
    assert_eq!(vm.agent_id, Some(agent));
    r.store
        .set_node_state("n2", NodeState::Ready)
        .await
        .unwrap();
    // Unreachable, but not yet lost: the agent keeps its VM.
    r.heartbeats(&["n1"]).await;
    r.silent_for("n1", r.timings.node_timeout + Duration::from_secs(1))
        .await;
    r.pool.reconcile_tenant(r.tenant).await.unwrap();
    assert_eq!(
        r.store.get_vm(vm.id).await.unwrap().state,
        VmState::Assigned
    );
    let record = r.store.get_agent(r.tenant, agent).await.unwrap();
    assert_eq!(record.phase, AgentPhase::Running);
    // The pass's deadline is when it will be lost.
    let lost_at = r.pool.next_deadline(r.tenant).unwrap();
    let last = r
        .store
        .get_node(r.node("n1").0.id)
        .await
        .unwrap()
        .last_heartbeat;
    assert!(lost_at <= last + r.timings.lost_after.as_millis() as i64 + 1);
    // Past lost_after: lost, the agent failed naming the node.
    r.silent_for("n1", r.timings.lost_after + Duration::from_secs(1))
        .await;
    r.pool.reconcile_tenant(r.tenant).await.unwrap();
    let closed = r.store.get_vm(vm.id).await.unwrap();
    assert_eq!(closed.state, VmState::Destroyed);
    assert_eq!(
        closed.error.as_deref(),
        Some("lost: node n1 stopped answering")
    );
    let record = r.store.get_agent(r.tenant, agent).await.unwrap();
    assert_eq!(record.phase, AgentPhase::Failed);
    assert_eq!(
        record.error.as_deref(),
        Some("its VM was lost: node n1 stopped answering")
    );
    // The pool backfills on n2.
    r.settle("warm on n2", &["n1"], async |r| {
        r.on("n2", VmState::Idle).await == 1
    })
    .await;
}
