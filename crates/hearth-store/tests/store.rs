//! The store's test suite, run unchanged against both backends.
//!
//! Each test is written once, as an async fn taking a [`Ctx`] (the store,
//! plus a way to open a second store on the same database), and
//! `both_backends!` turns it into `<test>::sqlite` (a fresh file in a temp
//! directory) and `<test>::postgres` (a fresh database on the server named
//! by `HEARTH_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, dropped afterwards). The
//! PostgreSQL half fails, never skips, when the server is unreachable.

use hearth_core::ids::{AgentId, IdentityId, InstanceId, TenantId, TokenId, VmId};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::{Kind, ResourceRef};
use hearth_store::{
    ARTIFACT_CHUNK_BYTES, AgentFilter, AgentPhase, AgentRecord, AgentUpdate, BakeRecord, BakeState,
    BakeUpdate, Identity, IdentityRefusal, InsertVm, InstanceFilter, InstanceRecord,
    InstanceStatus, NewAgent, NewToken, OnIdle, ParentProblem, PgStore, PoolState, Precondition,
    PutOutcome, PutResource, Ready, SqliteStore, Store, StoreError, VmRecord, VmState,
    WorkspaceState, now_millis,
};
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------- harness

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// What a test gets: the store under test, and the backend behind it.
#[derive(Clone)]
struct Ctx {
    store: Arc<dyn Store>,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite { path: PathBuf, store: SqliteStore },
    Postgres { url: String, store: PgStore },
}

impl Ctx {
    fn name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }

    /// Another, independent store on the same database (as a second server
    /// process would open it).
    async fn open_again(&self) -> Arc<dyn Store> {
        match &self.backend {
            Backend::Sqlite { path, .. } => Arc::new(SqliteStore::open(path).await.unwrap()),
            Backend::Postgres { url, .. } => Arc::new(PgStore::connect(url).await.unwrap()),
        }
    }

    /// Runs a statement behind the store's back (to corrupt a row).
    async fn execute_raw(&self, statement: &str) {
        match &self.backend {
            Backend::Sqlite { store, .. } => {
                sqlx::query(statement)
                    .execute(store.write_pool())
                    .await
                    .unwrap();
            }
            Backend::Postgres { store, .. } => {
                sqlx::query(statement).execute(store.pool()).await.unwrap();
            }
        }
    }

    /// Closes the store under test's connections.
    async fn close(&self) {
        match &self.backend {
            Backend::Sqlite { store, .. } => store.close().await,
            Backend::Postgres { store, .. } => store.close().await,
        }
    }
}

async fn run_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist yet: `open` creates it.
    let path = dir.path().join("data").join("hearth.db");
    let store = SqliteStore::open(&path)
        .await
        .expect("open the SQLite store");
    let ctx = Ctx {
        store: Arc::new(store.clone()),
        backend: Backend::Sqlite { path, store },
    };
    test(ctx).await;
}

async fn run_postgres<F, Fut>(test: F)
where
    F: FnOnce(Ctx) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin_url =
        std::env::var("HEARTH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into());
    let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is unreachable at {admin_url} ({e}). The PostgreSQL half of the store \
             tests needs a server: start one, or point HEARTH_TEST_POSTGRES_URL at one \
             (a user allowed to CREATE DATABASE)."
        )
    });
    let db = format!("hearth_test_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {db}: {e}"));
    let url = with_database(&admin_url, &db);

    // Run the test in its own task so that a failing test still drops its
    // database before its panic is passed on.
    let outcome = tokio::spawn(async move {
        let store = PgStore::connect(&url)
            .await
            .expect("connect the PostgreSQL store");
        let ctx = Ctx {
            store: Arc::new(store.clone()),
            backend: Backend::Postgres {
                url,
                store: store.clone(),
            },
        };
        test(ctx).await;
        store.close().await;
    })
    .await;

    admin
        .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
        .await
        .unwrap_or_else(|e| panic!("cannot drop test database {db}: {e}"));
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test task failed: {e}"),
        }
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{db}?{query}"),
        None => format!("{server}/{db}"),
    }
}

/// `both_backends!(test)` makes `test::sqlite` and `test::postgres` from the
/// async fn `test(ctx: Ctx)`; `both_backends!(test, multi_thread)` runs
/// them on a 4-thread runtime.
macro_rules! both_backends {
    ($name:ident) => {
        both_backends!(@ $name, tokio::test);
    };
    ($name:ident, multi_thread) => {
        both_backends!(@ $name, tokio::test(flavor = "multi_thread", worker_threads = 4));
    };
    (@ $name:ident, $test:meta) => {
        mod $name {
            #[$test]
            async fn sqlite() {
                super::run_sqlite(super::$name).await
            }

            #[$test]
            async fn postgres() {
                super::run_postgres(super::$name).await
            }
        }
    };
}

// ---------------------------------------------------------------- helpers

fn token() -> NewToken {
    NewToken {
        id: TokenId::new(),
        secret_sha256: uuid::Uuid::new_v4().as_bytes().repeat(2),
        expires_at: None,
    }
}

async fn tenant(store: &Arc<dyn Store>, name: &str) -> TenantId {
    store
        .create_tenant(name, "admin", &token(), &pool_config())
        .await
        .unwrap()
        .0
        .id
}

/// The pool config tenants are created with here.
fn pool_config() -> Value {
    json!({"max_vms": 10, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"})
}

/// A tenant and its `admin` (developer) identity.
async fn tenant_with_admin(store: &Arc<dyn Store>, name: &str) -> (TenantId, Identity) {
    let (tenant, admin) = store
        .create_tenant(name, "admin", &token(), &pool_config())
        .await
        .unwrap();
    (tenant.id, admin)
}

/// A new top-level agent of `owner`'s.
fn new_agent(tenant: TenantId, owner: &Identity, workspace: &str) -> NewAgent {
    NewAgent {
        id: AgentId::new(),
        tenant_id: tenant,
        workspace: workspace.to_owned(),
        owner_id: owner.id,
        owner_name: owner.name.clone(),
        owner_kind: owner.kind,
        parent_id: None,
        on_idle: OnIdle::Sleep,
        command: None,
        build: "test-build".to_owned(),
    }
}

/// Creates a queued agent, with no cap.
async fn queued_agent(
    store: &Arc<dyn Store>,
    tenant: TenantId,
    owner: &Identity,
    workspace: &str,
) -> AgentRecord {
    store
        .create_agent(&new_agent(tenant, owner, workspace), None)
        .await
        .unwrap()
}

/// Long enough for `now_millis()` to move on.
async fn sleep_ms() {
    tokio::time::sleep(Duration::from_millis(3)).await;
}

fn reference(kind: Kind, name: &str) -> ResourceRef {
    ResourceRef {
        kind,
        name: name.to_owned(),
    }
}

async fn put(
    store: &Arc<dyn Store>,
    tenant: TenantId,
    kind: Kind,
    name: &str,
    spec: &Value,
    references: &[ResourceRef],
) -> Result<PutOutcome, StoreError> {
    store
        .put_resource(PutResource {
            actor: None,
            tenant,
            kind,
            name,
            spec,
            references,
            precondition: Precondition::None,
        })
        .await
}

async fn put_at(
    store: &Arc<dyn Store>,
    tenant: TenantId,
    kind: Kind,
    name: &str,
    spec: &Value,
    version: i64,
) -> Result<PutOutcome, StoreError> {
    store
        .put_resource(PutResource {
            actor: None,
            tenant,
            kind,
            name,
            spec,
            references: &[],
            precondition: Precondition::Version(version),
        })
        .await
}

/// The setup digest of [`vm`]'s records (any text: the store only keeps it).
const SETUP: &str = "5e7a1d1e";

/// A fresh (built from versions 1/1 and setup [`SETUP`]), non-test VM
/// record in `state`.
fn vm(tenant: TenantId, workspace: &str, state: VmState, created_at: i64) -> VmRecord {
    let mut v = VmRecord::booting(VmId::new(), tenant, workspace, "fake", 1, 1);
    v.setup_digest = SETUP.to_owned();
    v.state = state;
    v.created_at = created_at;
    v.updated_at = created_at;
    v
}

fn assert_conflict(err: StoreError, what: &str) {
    assert!(
        matches!(&err, StoreError::Conflict(m) if m == what),
        "{err:?}"
    );
}

fn assert_in_use(err: StoreError, kind: Kind, name: &str, by_kind: Kind, by_name: &str) {
    match &err {
        StoreError::InUse {
            kind: k,
            name: n,
            by_kind: bk,
            by_name: bn,
        } => {
            assert_eq!(
                (*k, n.as_str(), *bk, bn.as_str()),
                (kind, name, by_kind, by_name)
            );
        }
        _ => panic!("expected InUse, got {err:?}"),
    }
}

// ------------------------------------------------------------------ tests

both_backends!(ping_and_backend);
async fn ping_and_backend(ctx: Ctx) {
    ctx.store.ping().await.unwrap();
    assert_eq!(ctx.store.backend(), ctx.name());
}

both_backends!(bootstrap_runs_once);
async fn bootstrap_runs_once(ctx: Ctx) {
    let s = &ctx.store;
    assert!(s.list_tenants().await.unwrap().is_empty());

    let first = token();
    let (tenant, identity) = s
        .bootstrap("default", "root", &first, &pool_config())
        .await
        .unwrap()
        .expect("the first bootstrap creates the tenant");
    assert_eq!(tenant.name, "default");
    assert_eq!(identity.name, "root");
    assert_eq!(identity.tenant_id, tenant.id);
    assert_eq!(identity.role, Role::Operator);
    assert_eq!(identity.kind, IdentityKind::Developer);

    let second = token();
    assert!(
        s.bootstrap("other", "root2", &second, &pool_config())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.list_tenants().await.unwrap(), vec![tenant]);
    assert_eq!(
        s.find_token(first.id).await.unwrap().unwrap().identity,
        identity
    );
    assert!(s.find_token(second.id).await.unwrap().is_none());
}

both_backends!(every_tenant_starts_with_its_pool_config);
async fn every_tenant_starts_with_its_pool_config(ctx: Ctx) {
    let s = &ctx.store;
    let first = json!({"max_vms": 7});
    let (default, _) = s
        .bootstrap("default", "root", &token(), &first)
        .await
        .unwrap()
        .unwrap();
    let (acme, _) = s
        .create_tenant("acme", "alice", &token(), &json!({"max_vms": 3}))
        .await
        .unwrap();
    for (tenant, spec) in [(default.id, first), (acme.id, json!({"max_vms": 3}))] {
        let record = s
            .get_resource(tenant, Kind::PoolConfig, "default")
            .await
            .unwrap()
            .expect("created with the tenant");
        assert_eq!((record.spec, record.version), (spec, 1));
    }
    // A failed creation leaves no pool config behind either.
    let err = s
        .create_tenant("acme", "bob", &token(), &json!({"max_vms": 9}))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    assert_eq!(
        s.list_resources(acme.id, Kind::PoolConfig).await.unwrap()[0].spec,
        json!({"max_vms": 3})
    );

    // A store from before: a tenant without one gets it from the backfill,
    // the others keep theirs; a second backfill changes nothing.
    s.delete_resource(acme.id, Kind::PoolConfig, "default", None)
        .await
        .unwrap();
    assert_eq!(
        s.backfill_pool_configs(&json!({"max_vms": 5}))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.backfill_pool_configs(&json!({"max_vms": 6}))
            .await
            .unwrap(),
        0
    );
    let spec = |t| async move {
        s.get_resource(t, Kind::PoolConfig, "default")
            .await
            .unwrap()
            .unwrap()
            .spec
    };
    assert_eq!(spec(acme.id).await, json!({"max_vms": 5}));
    assert_eq!(spec(default.id).await, json!({"max_vms": 7}));
}

both_backends!(bootstrap_skips_when_any_tenant_exists);
async fn bootstrap_skips_when_any_tenant_exists(ctx: Ctx) {
    let s = &ctx.store;
    s.create_tenant("acme", "alice", &token(), &pool_config())
        .await
        .unwrap();
    assert!(
        s.bootstrap("default", "root", &token(), &pool_config())
            .await
            .unwrap()
            .is_none()
    );
    let names: Vec<_> = s
        .list_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["acme"]);
}

both_backends!(bootstrap_races_create_one_tenant, multi_thread);
async fn bootstrap_races_create_one_tenant(ctx: Ctx) {
    // Half the racers go through a second store on the same database, as a
    // second server would.
    let other = ctx.open_again().await;
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..8 {
        let store = if i % 2 == 0 {
            ctx.store.clone()
        } else {
            other.clone()
        };
        racers.spawn(async move {
            store
                .bootstrap(&format!("tenant-{i}"), "root", &token(), &pool_config())
                .await
        });
    }
    let mut created = Vec::new();
    while let Some(result) = racers.join_next().await {
        if let Some(pair) = result.unwrap().unwrap() {
            created.push(pair);
        }
    }
    assert_eq!(created.len(), 1, "exactly one bootstrap wins: {created:?}");
    assert_eq!(
        ctx.store.list_tenants().await.unwrap(),
        vec![created[0].0.clone()]
    );
    assert_eq!(
        ctx.store
            .list_identities(created[0].0.id)
            .await
            .unwrap()
            .len(),
        1
    );
}

both_backends!(create_tenant_is_atomic_and_unique);
async fn create_tenant_is_atomic_and_unique(ctx: Ctx) {
    let s = &ctx.store;
    let acme_token = token();
    let (acme, alice) = s
        .create_tenant("acme", "alice", &acme_token, &pool_config())
        .await
        .unwrap();
    assert_eq!(alice.role, Role::Admin);
    assert_eq!(alice.kind, IdentityKind::Developer);
    assert_eq!(alice.tenant_id, acme.id);

    let dup_token = token();
    let err = s
        .create_tenant("acme", "bob", &dup_token, &pool_config())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists(m) if m == "tenant \"acme\""),
        "{err:?}"
    );
    assert!(s.find_token(dup_token.id).await.unwrap().is_none());

    // A token id already taken fails the whole tenant creation.
    let err = s
        .create_tenant("beta", "bob", &acme_token, &pool_config())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");

    s.create_tenant("zeta", "z", &token(), &pool_config())
        .await
        .unwrap();
    s.create_tenant("alpha", "a", &token(), &pool_config())
        .await
        .unwrap();
    let names: Vec<_> = s
        .list_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(
        names,
        ["acme", "zeta", "alpha"],
        "oldest first, and no trace of beta"
    );
}

both_backends!(identities_crud);
async fn identities_crud(ctx: Ctx) {
    let s = &ctx.store;
    let acme = tenant(s, "acme").await;
    let other = tenant(s, "other").await;

    let bot_token = token();
    let bot = s
        .create_identity(
            acme,
            "ci-bot",
            IdentityKind::Service,
            Role::Developer,
            Some(&bot_token),
        )
        .await
        .unwrap();
    assert_eq!(
        (bot.kind, bot.role, bot.tenant_id),
        (IdentityKind::Service, Role::Developer, acme)
    );
    let bob = s
        .create_identity(acme, "bob", IdentityKind::Developer, Role::Viewer, None)
        .await
        .unwrap();
    assert_eq!(s.get_identity(acme, "ci-bot").await.unwrap(), bot);
    assert_eq!(s.get_identity(acme, "bob").await.unwrap(), bob);
    let names: Vec<_> = s
        .list_identities(acme)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["admin", "bob", "ci-bot"]);

    // Names are unique per tenant only.
    let err = s
        .create_identity(acme, "bob", IdentityKind::Service, Role::Admin, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists(m) if m == "identity \"bob\""),
        "{err:?}"
    );
    s.create_identity(other, "bob", IdentityKind::Developer, Role::Admin, None)
        .await
        .unwrap();
    assert_eq!(s.get_identity(acme, "bob").await.unwrap(), bob);
    let err = s.get_identity(other, "ci-bot").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "identity \"ci-bot\""),
        "{err:?}"
    );
    let err = s
        .create_identity(
            TenantId::new(),
            "x",
            IdentityKind::Developer,
            Role::Viewer,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    // Tokens.
    let bob_token = token();
    s.create_token(acme, "bob", &bob_token, Role::Operator)
        .await
        .unwrap();
    assert_eq!(
        s.find_token(bob_token.id).await.unwrap().unwrap().identity,
        bob
    );
    let err = s
        .create_token(acme, "nobody", &token(), Role::Operator)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "identity \"nobody\""),
        "{err:?}"
    );
    let err = s
        .create_token(other, "ci-bot", &token(), Role::Operator)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = s
        .create_token(acme, "bob", &bob_token, Role::Operator)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");

    // Deleting an identity takes its tokens along.
    s.delete_identity(acme, "ci-bot", Role::Operator)
        .await
        .unwrap();
    assert!(s.find_token(bot_token.id).await.unwrap().is_none());
    assert!(matches!(
        s.get_identity(acme, "ci-bot").await,
        Err(StoreError::NotFound(_))
    ));
    let err = s
        .delete_identity(acme, "ci-bot", Role::Operator)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "identity \"ci-bot\""),
        "{err:?}"
    );
    // … and only from its own tenant.
    assert!(
        s.delete_identity(other, "admin", Role::Operator)
            .await
            .is_ok()
    );
    assert!(s.get_identity(acme, "admin").await.is_ok());
    let names: Vec<_> = s
        .list_identities(acme)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["admin", "bob"]);
}

both_backends!(find_token_round_trips);
async fn find_token_round_trips(ctx: Ctx) {
    let s = &ctx.store;
    let acme = tenant(s, "acme").await;
    let expiring = NewToken {
        id: TokenId::new(),
        secret_sha256: (0..=255u8).step_by(8).chain([0, 255]).collect(),
        expires_at: Some(now_millis() + 3_600_000),
    };
    let bot = s
        .create_identity(
            acme,
            "bot",
            IdentityKind::Service,
            Role::Viewer,
            Some(&expiring),
        )
        .await
        .unwrap();
    let forever = token();
    s.create_token(acme, "bot", &forever, Role::Operator)
        .await
        .unwrap();

    let found = s.find_token(expiring.id).await.unwrap().unwrap();
    assert_eq!(found.id, expiring.id);
    assert_eq!(found.secret_sha256, expiring.secret_sha256);
    assert_eq!(found.expires_at, expiring.expires_at);
    assert_eq!(found.identity, bot);
    assert_eq!(found.identity.tenant_id, acme);
    assert_eq!(found.identity.kind, IdentityKind::Service);
    assert_eq!(found.identity.role, Role::Viewer);

    let found = s.find_token(forever.id).await.unwrap().unwrap();
    assert_eq!(found.expires_at, None);
    assert_eq!(found.secret_sha256, forever.secret_sha256);
    assert_eq!(found.identity, bot);

    assert!(s.find_token(TokenId::new()).await.unwrap().is_none());
}

both_backends!(tenants_are_isolated);
async fn tenants_are_isolated(ctx: Ctx) {
    let s = &ctx.store;
    let a = tenant(s, "a").await;
    let b = tenant(s, "b").await;

    put(s, a, Kind::Image, "base", &json!({"from": "a"}), &[])
        .await
        .unwrap();
    put(s, a, Kind::Workspace, "web", &json!({"tenant": "a"}), &[])
        .await
        .unwrap();

    assert!(
        s.get_resource(b, Kind::Workspace, "web")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.list_resources(b, Kind::Workspace)
            .await
            .unwrap()
            .is_empty()
    );
    let err = s
        .delete_resource(b, Kind::Workspace, "web", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "workspace \"web\""),
        "{err:?}"
    );
    // B cannot refer to A's image.
    let err = put(
        s,
        b,
        Kind::Environment,
        "dev",
        &json!({}),
        &[reference(Kind::Image, "base")],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, StoreError::MissingReference { kind: Kind::Image, name } if name == "base"),
        "{err:?}"
    );

    // The same name in B is a resource of its own.
    let mine = put(s, b, Kind::Workspace, "web", &json!({"tenant": "b"}), &[])
        .await
        .unwrap();
    assert!(mine.created);
    assert_eq!(mine.record.version, 1);
    assert_eq!(mine.record.tenant_id, b);
    let theirs = s
        .get_resource(a, Kind::Workspace, "web")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(theirs.spec, json!({"tenant": "a"}));
    s.delete_resource(b, Kind::Workspace, "web", None)
        .await
        .unwrap();
    assert!(
        s.get_resource(a, Kind::Workspace, "web")
            .await
            .unwrap()
            .is_some()
    );

    // VMs too.
    s.insert_vm(&vm(a, "web", VmState::Idle, 1)).await.unwrap();
    assert!(s.list_vms(b, true).await.unwrap().is_empty());
    assert!(
        s.claim_idle_vm(b, "web", AgentId::new())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.list_vms(a, true).await.unwrap()[0].state, VmState::Idle);
}

both_backends!(put_bumps_version_only_on_change);
async fn put_bumps_version_only_on_change(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;

    let spec: Value = serde_json::from_str(r#"{"a": 1, "b": [1, 2], "c": {"x": null}}"#).unwrap();
    let first = put(s, t, Kind::Environment, "dev", &spec, &[])
        .await
        .unwrap();
    assert!(first.created && first.changed);
    assert_eq!(first.record.version, 1);
    assert_eq!(first.record.spec, spec);
    assert_eq!(first.record.created_at, first.record.updated_at);
    assert_eq!(
        s.get_resource(t, Kind::Environment, "dev")
            .await
            .unwrap()
            .unwrap(),
        first.record
    );

    // Equal JSON written differently (key order) is no change.
    let same: Value = serde_json::from_str(r#"{"c": {"x": null}, "b": [1, 2], "a": 1}"#).unwrap();
    let again = put(s, t, Kind::Environment, "dev", &same, &[])
        .await
        .unwrap();
    assert!(!again.created && !again.changed);
    assert_eq!(again.record, first.record);

    tokio::time::sleep(Duration::from_millis(5)).await;
    let changed_spec = json!({"a": 2, "b": [1, 2], "c": {"x": null}});
    let changed = put(s, t, Kind::Environment, "dev", &changed_spec, &[])
        .await
        .unwrap();
    assert!(!changed.created && changed.changed);
    assert_eq!(changed.record.version, 2);
    assert_eq!(changed.record.spec, changed_spec);
    assert_eq!(changed.record.created_at, first.record.created_at);
    assert!(changed.record.updated_at > first.record.updated_at);
    assert_eq!(
        s.get_resource(t, Kind::Environment, "dev")
            .await
            .unwrap()
            .unwrap(),
        changed.record
    );

    let unchanged = put(s, t, Kind::Environment, "dev", &changed_spec, &[])
        .await
        .unwrap();
    assert!(!unchanged.changed);
    assert_eq!(unchanged.record.version, 2);

    let third = put(s, t, Kind::Environment, "dev", &json!({"a": 3}), &[])
        .await
        .unwrap();
    assert_eq!(third.record.version, 3);

    // Listing: by name, one kind only.
    put(s, t, Kind::Environment, "alpha", &json!({}), &[])
        .await
        .unwrap();
    put(s, t, Kind::Image, "base", &json!({}), &[])
        .await
        .unwrap();
    let envs: Vec<_> = s
        .list_resources(t, Kind::Environment)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.kind, r.version))
        .collect();
    assert_eq!(
        envs,
        [
            ("alpha".to_owned(), Kind::Environment, 1),
            ("dev".to_owned(), Kind::Environment, 3)
        ]
    );
    assert!(
        s.list_resources(t, Kind::Workspace)
            .await
            .unwrap()
            .is_empty()
    );
}

both_backends!(precondition_version_conflicts);
async fn precondition_version_conflicts(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;

    let err = put_at(s, t, Kind::Image, "base", &json!({"v": 1}), 1)
        .await
        .unwrap_err();
    assert_conflict(err, "image \"base\"");
    assert!(
        s.get_resource(t, Kind::Image, "base")
            .await
            .unwrap()
            .is_none()
    );

    put(s, t, Kind::Image, "base", &json!({"v": 1}), &[])
        .await
        .unwrap();
    let err = put_at(s, t, Kind::Image, "base", &json!({"v": 2}), 2)
        .await
        .unwrap_err();
    assert_conflict(err, "image \"base\"");
    let ok = put_at(s, t, Kind::Image, "base", &json!({"v": 2}), 1)
        .await
        .unwrap();
    assert_eq!(ok.record.version, 2);
    // The same read-modify-write again loses: someone else wrote version 2.
    let err = put_at(s, t, Kind::Image, "base", &json!({"v": 3}), 1)
        .await
        .unwrap_err();
    assert_conflict(err, "image \"base\"");
    let current = s
        .get_resource(t, Kind::Image, "base")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((current.version, current.spec), (2, json!({"v": 2})));
    let same = put_at(s, t, Kind::Image, "base", &json!({"v": 2}), 2)
        .await
        .unwrap();
    assert!(!same.changed);
    assert_eq!(same.record.version, 2);
}

both_backends!(references_protect_their_targets);
async fn references_protect_their_targets(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let dev_ref = [reference(Kind::Environment, "dev")];

    let err = put(s, t, Kind::Workspace, "web", &json!({}), &dev_ref)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::MissingReference { kind: Kind::Environment, name } if name == "dev"),
        "{err:?}"
    );
    assert!(
        s.get_resource(t, Kind::Workspace, "web")
            .await
            .unwrap()
            .is_none()
    );

    put(s, t, Kind::Image, "base", &json!({"tag": "base"}), &[])
        .await
        .unwrap();
    put(s, t, Kind::Image, "slim", &json!({"tag": "slim"}), &[])
        .await
        .unwrap();
    // A duplicated reference is recorded once.
    let base_twice = [
        reference(Kind::Image, "base"),
        reference(Kind::Image, "base"),
    ];
    put(
        s,
        t,
        Kind::Environment,
        "dev",
        &json!({"image": "base"}),
        &base_twice,
    )
    .await
    .unwrap();
    put(
        s,
        t,
        Kind::Workspace,
        "web",
        &json!({"env": "dev"}),
        &dev_ref,
    )
    .await
    .unwrap();

    let err = s
        .delete_resource(t, Kind::Image, "base", None)
        .await
        .unwrap_err();
    assert_in_use(err, Kind::Image, "base", Kind::Environment, "dev");
    let err = s
        .delete_resource(t, Kind::Environment, "dev", None)
        .await
        .unwrap_err();
    assert_in_use(err, Kind::Environment, "dev", Kind::Workspace, "web");
    assert!(
        s.get_resource(t, Kind::Image, "base")
            .await
            .unwrap()
            .is_some()
    );

    // A failed put leaves the old references in place.
    let missing = [reference(Kind::Image, "nope")];
    let err = put(
        s,
        t,
        Kind::Environment,
        "dev",
        &json!({"image": "nope"}),
        &missing,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, StoreError::MissingReference { .. }),
        "{err:?}"
    );
    let err = s
        .delete_resource(t, Kind::Image, "base", None)
        .await
        .unwrap_err();
    assert_in_use(err, Kind::Image, "base", Kind::Environment, "dev");

    // Once the referrer moves to another image, the old one can go.
    let slim_ref = [reference(Kind::Image, "slim")];
    put(
        s,
        t,
        Kind::Environment,
        "dev",
        &json!({"image": "slim"}),
        &slim_ref,
    )
    .await
    .unwrap();
    let deleted = s
        .delete_resource(t, Kind::Image, "base", None)
        .await
        .unwrap();
    assert_eq!((deleted.kind, deleted.name.as_str()), (Kind::Image, "base"));
    assert_eq!(deleted.spec, json!({"tag": "base"}));
    assert!(
        s.get_resource(t, Kind::Image, "base")
            .await
            .unwrap()
            .is_none()
    );
    let err = s
        .delete_resource(t, Kind::Image, "slim", None)
        .await
        .unwrap_err();
    assert_in_use(err, Kind::Image, "slim", Kind::Environment, "dev");

    // References are replaced even when the spec is unchanged.
    let same = put(
        s,
        t,
        Kind::Environment,
        "dev",
        &json!({"image": "slim"}),
        &[],
    )
    .await
    .unwrap();
    assert!(!same.changed);
    s.delete_resource(t, Kind::Image, "slim", None)
        .await
        .unwrap();

    // Deleting a referrer releases its targets.
    s.delete_resource(t, Kind::Workspace, "web", None)
        .await
        .unwrap();
    s.delete_resource(t, Kind::Environment, "dev", None)
        .await
        .unwrap();
    let err = s
        .delete_resource(t, Kind::Environment, "dev", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "environment \"dev\""),
        "{err:?}"
    );
    assert!(
        s.list_resources(t, Kind::Environment)
            .await
            .unwrap()
            .is_empty()
    );
}

both_backends!(data_survives_reopening);
async fn data_survives_reopening(ctx: Ctx) {
    let t_token = token();
    let (acme, admin) = ctx
        .store
        .create_tenant("acme", "alice", &t_token, &pool_config())
        .await
        .unwrap();
    let s = &ctx.store;
    put(s, acme.id, Kind::Image, "base", &json!({"tag": "1"}), &[])
        .await
        .unwrap();
    let env = put(
        s,
        acme.id,
        Kind::Environment,
        "dev",
        &json!({"image": "base"}),
        &[reference(Kind::Image, "base")],
    )
    .await
    .unwrap()
    .record;
    let mut machine = vm(acme.id, "web", VmState::Idle, 42);
    s.insert_vm(&machine).await.unwrap();
    ctx.close().await;

    let s = ctx.open_again().await;
    assert_eq!(s.list_tenants().await.unwrap(), vec![acme.clone()]);
    assert_eq!(
        s.find_token(t_token.id).await.unwrap().unwrap().identity,
        admin
    );
    assert_eq!(
        s.get_resource(acme.id, Kind::Environment, "dev")
            .await
            .unwrap(),
        Some(env)
    );
    assert_eq!(
        s.list_vms(acme.id, false).await.unwrap(),
        vec![machine.clone()]
    );
    let err = s
        .delete_resource(acme.id, Kind::Image, "base", None)
        .await
        .unwrap_err();
    assert_in_use(err, Kind::Image, "base", Kind::Environment, "dev");

    let agent = AgentId::new();
    let claimed = s
        .claim_idle_vm(acme.id, "web", agent)
        .await
        .unwrap()
        .unwrap();
    machine.state = VmState::Assigned;
    machine.agent_id = Some(agent);
    machine.updated_at = claimed.updated_at;
    assert_eq!(claimed, machine);
}

both_backends!(claim_takes_oldest_idle_vm);
async fn claim_takes_oldest_idle_vm(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let booting = vm(t, "web", VmState::Booting, 0);
    let third = vm(t, "web", VmState::Idle, 3);
    let first = vm(t, "web", VmState::Idle, 1);
    let second = vm(t, "web", VmState::Idle, 2);
    for v in [&booting, &third, &first, &second] {
        s.insert_vm(v).await.unwrap();
    }
    let listed: Vec<_> = s
        .list_vms(t, false)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(
        listed,
        [booting.id, first.id, second.id, third.id],
        "oldest first"
    );

    let err = s.insert_vm(&first).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    let err = s
        .insert_vm(&vm(TenantId::new(), "web", VmState::Idle, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    assert!(
        s.claim_idle_vm(t, "api", AgentId::new())
            .await
            .unwrap()
            .is_none()
    );
    let before = now_millis();
    let mut claimed = Vec::new();
    for _ in 0..3 {
        let agent = AgentId::new();
        let got = s.claim_idle_vm(t, "web", agent).await.unwrap().unwrap();
        assert_eq!(got.state, VmState::Assigned);
        assert_eq!(got.agent_id, Some(agent));
        assert!(got.updated_at >= before);
        claimed.push(got.id);
    }
    assert_eq!(claimed, [first.id, second.id, third.id]);
    assert!(
        s.claim_idle_vm(t, "web", AgentId::new())
            .await
            .unwrap()
            .is_none()
    );
    let states: Vec<_> = s
        .list_vms(t, false)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.state)
        .collect();
    assert_eq!(
        states,
        [
            VmState::Booting,
            VmState::Assigned,
            VmState::Assigned,
            VmState::Assigned
        ]
    );

    // An agent holds at most one VM.
    let agent = AgentId::new();
    s.insert_vm(&vm(t, "web", VmState::Idle, 10)).await.unwrap();
    s.insert_vm(&vm(t, "web", VmState::Idle, 11)).await.unwrap();
    s.claim_idle_vm(t, "web", agent).await.unwrap().unwrap();
    let err = s.claim_idle_vm(t, "web", agent).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    // The refused claim's row lock is released when PostgreSQL ends its
    // implicit transaction, which may be a moment after the error reached
    // us; meanwhile SKIP LOCKED skips that VM.
    let mut claimed = None;
    for _ in 0..100 {
        claimed = s.claim_idle_vm(t, "web", AgentId::new()).await.unwrap();
        if claimed.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(claimed.is_some(), "the other idle VM stays claimable");
}

both_backends!(concurrent_claims_are_exclusive, multi_thread);
async fn concurrent_claims_are_exclusive(ctx: Ctx) {
    const VMS: usize = 100;
    const CLAIMS: usize = 300;
    let s = &ctx.store;
    let a = tenant(s, "a").await;
    let b = tenant(s, "b").await;

    let mut pool = HashSet::new();
    for i in 0..VMS {
        let v = vm(a, "web", VmState::Idle, 1_000 + i as i64);
        s.insert_vm(&v).await.unwrap();
        pool.insert(v.id);
    }
    // Neighbours that must never be taken by claims for a/web.
    let mut neighbours = HashSet::new();
    for (t, ws) in [(a, "api"), (b, "web")] {
        for i in 0..5 {
            let v = vm(t, ws, VmState::Idle, i);
            s.insert_vm(&v).await.unwrap();
            neighbours.insert(v.id);
        }
    }
    let busy = vm(a, "web", VmState::Draining, 0);
    s.insert_vm(&busy).await.unwrap();

    let mut claims = tokio::task::JoinSet::new();
    for i in 0..CLAIMS + 20 {
        let store = s.clone();
        // Interleave 10 claims each for a/api and b/web with the main ones.
        let (t, ws) = match i % 32 {
            0 => (a, "api"),
            16 => (b, "web"),
            _ => (a, "web"),
        };
        claims.spawn(async move {
            let agent = AgentId::new();
            let got = store.claim_idle_vm(t, ws, agent).await.unwrap();
            (t, ws, agent, got)
        });
    }

    let mut by_agent: HashMap<AgentId, VmId> = HashMap::new();
    let mut web_claims = 0;
    let mut won: HashMap<(TenantId, &str), usize> = HashMap::new();
    while let Some(joined) = claims.join_next().await {
        let (t, ws, agent, got) = joined.unwrap();
        if (t, ws) == (a, "web") {
            web_claims += 1;
        }
        let Some(got) = got else { continue };
        *won.entry((t, ws)).or_default() += 1;
        assert_eq!((got.tenant_id, got.workspace.as_str()), (t, ws));
        assert_eq!(got.state, VmState::Assigned);
        assert_eq!(got.agent_id, Some(agent));
        assert!(by_agent.insert(agent, got.id).is_none());
    }
    assert_eq!(web_claims, CLAIMS);
    assert_eq!(
        won.get(&(a, "web")),
        Some(&VMS),
        "exactly {VMS} of {CLAIMS} claims succeed"
    );
    assert_eq!(won.get(&(a, "api")), Some(&5));
    assert_eq!(won.get(&(b, "web")), Some(&5));
    let claimed: HashSet<VmId> = by_agent.values().copied().collect();
    assert_eq!(claimed.len(), by_agent.len(), "no VM claimed twice");
    let expected: HashSet<VmId> = pool.union(&neighbours).copied().collect();
    assert_eq!(claimed, expected);

    let mut agent_of: HashMap<VmId, AgentId> = by_agent.iter().map(|(a, v)| (*v, *a)).collect();
    for v in s
        .list_vms(a, false)
        .await
        .unwrap()
        .into_iter()
        .chain(s.list_vms(b, false).await.unwrap())
    {
        if v.id == busy.id {
            assert_eq!((v.state, v.agent_id), (VmState::Draining, None));
        } else {
            assert_eq!(v.state, VmState::Assigned, "{v:?}");
            assert_eq!(v.agent_id, agent_of.remove(&v.id), "{v:?}");
        }
    }
    assert!(agent_of.is_empty(), "every claimed VM is listed");
    assert!(
        s.claim_idle_vm(a, "web", AgentId::new())
            .await
            .unwrap()
            .is_none()
    );
}

// ------------------------------------------------------------- pool: VMs

both_backends!(vm_records_round_trip);
async fn vm_records_round_trip(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;

    let mut full = vm(t, "web", VmState::Failed, 5);
    full.agent_id = Some(AgentId::new());
    full.driver = "qemu".to_owned();
    full.env_version = 7;
    full.image_version = 9;
    full.setup_digest = "ab".repeat(32);
    full.stale = true;
    full.reserved_for = Some(AgentId::new());
    full.test = true;
    full.error = Some("kernel panic".to_owned());
    full.updated_at = 6;
    s.insert_vm(&full).await.unwrap();
    assert_eq!(s.get_vm(full.id).await.unwrap(), full);

    let fresh = VmRecord::booting(VmId::new(), t, "web", "sandbox", 1, 2);
    s.insert_vm(&fresh).await.unwrap();
    assert_eq!(s.get_vm(fresh.id).await.unwrap(), fresh);
    let destroyed = vm(t, "web", VmState::Destroyed, 1);
    s.insert_vm(&destroyed).await.unwrap();

    assert_eq!(s.list_vms(t, false).await.unwrap(), vec![fresh.clone()]);
    let all: Vec<_> = s
        .list_vms(t, true)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(all, [destroyed.id, full.id, fresh.id], "oldest first");

    let unknown = VmId::new();
    let err = s.get_vm(unknown).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if *m == format!("VM {unknown}")),
        "{err:?}"
    );
}

both_backends!(list_live_vms_spans_tenants);
async fn list_live_vms_spans_tenants(ctx: Ctx) {
    let s = &ctx.store;
    let a = tenant(s, "a").await;
    let b = tenant(s, "b").await;
    let a_idle = vm(a, "web", VmState::Idle, 1);
    let a_destroyed = vm(a, "web", VmState::Destroyed, 2);
    let b_booting = vm(b, "api", VmState::Booting, 3);
    let b_draining = vm(b, "web", VmState::Draining, 4);
    let b_failed = vm(b, "web", VmState::Failed, 5);
    let a_assigned = vm(a, "web", VmState::Assigned, 6);
    let b_provisioning = vm(b, "web", VmState::Provisioning, 7);
    for v in [
        &b_failed,
        &a_assigned,
        &a_idle,
        &b_provisioning,
        &a_destroyed,
        &b_booting,
        &b_draining,
    ] {
        s.insert_vm(v).await.unwrap();
    }
    let live: Vec<_> = s
        .list_live_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(
        live,
        [
            a_idle.id,
            b_booting.id,
            b_draining.id,
            a_assigned.id,
            b_provisioning.id
        ]
    );
}

both_backends!(a_full_or_unready_node_refuses_a_vm);
async fn a_full_or_unready_node_refuses_a_vm(ctx: Ctx) {
    use hearth_core::ids::NodeId;
    use hearth_store::{NodeCapacity, NodeRecord, NodeState};
    let s = &ctx.store;
    let (t, _admin) = tenant_with_admin(s, "acme").await;
    let now = now_millis();
    let node = s
        .join_node(&NodeRecord {
            id: NodeId::new(),
            name: "n1".into(),
            address: "https://127.0.0.1:7071".into(),
            ca_pem: String::new(),
            credential_hash: String::new(),
            state: NodeState::Ready,
            capacity: NodeCapacity {
                drivers: vec!["fake".into()],
                cpus: 4,
                memory_mib: 2048,
                disk_mib: 0,
                vm_slots: 3,
                max_boots: 2,
            },
            joined_at: now,
            last_heartbeat: now,
            updated_at: now,
        })
        .await
        .unwrap();
    let placed = |cpus: i64, memory_mib: i64| {
        let mut v = VmRecord::booting(VmId::new(), t, "web", "fake", 1, 1);
        v.node_id = Some(node.id);
        v.cpus = cpus;
        v.memory_mib = memory_mib;
        v
    };
    // Memory: 2048 MiB, 1536 asked then 1024 more: refused.
    let first = placed(1, 1536);
    assert_eq!(
        s.insert_vm_within_cap(&first, 100).await.unwrap(),
        InsertVm::Inserted
    );
    assert_eq!(s.get_vm(first.id).await.unwrap().node_id, Some(node.id));
    let refused = placed(1, 1024);
    assert_eq!(
        s.insert_vm_within_cap(&refused, 100).await.unwrap(),
        InsertVm::NodeFull
    );
    assert!(matches!(
        s.get_vm(refused.id).await,
        Err(StoreError::NotFound(_))
    ));
    // cpus: 4, 1 used, 4 more asked: refused.
    assert_eq!(
        s.insert_vm_within_cap(&placed(4, 1), 100).await.unwrap(),
        InsertVm::NodeFull
    );
    // Boots in flight: 2 at most.
    assert_eq!(
        s.insert_vm_within_cap(&placed(1, 1), 100).await.unwrap(),
        InsertVm::Inserted
    );
    assert_eq!(
        s.insert_vm_within_cap(&placed(1, 1), 100).await.unwrap(),
        InsertVm::NodeFull
    );
    assert!(
        s.set_vm_state(first.id, &[VmState::Booting], VmState::Idle, None)
            .await
            .unwrap()
    );
    let third = placed(1, 1);
    assert_eq!(
        s.insert_vm_within_cap(&third, 100).await.unwrap(),
        InsertVm::Inserted
    );
    // VM slots: 3.
    assert!(
        s.set_vm_state(third.id, &[VmState::Booting], VmState::Idle, None)
            .await
            .unwrap()
    );
    assert_eq!(
        s.insert_vm_within_cap(&placed(0, 0), 100).await.unwrap(),
        InsertVm::NodeFull
    );
    let usage = s.node_usage().await.unwrap();
    let mine = usage.iter().find(|u| u.node == Some(node.id)).unwrap();
    assert_eq!(
        (mine.vms, mine.booting, mine.cpus, mine.memory_mib),
        (3, 1, 3, 1538)
    );
    // A dead VM frees its room; a cordoned node takes nothing even then.
    assert!(
        s.set_vm_state(third.id, &[VmState::Idle], VmState::Destroyed, None)
            .await
            .unwrap()
    );
    s.set_node_state("n1", NodeState::Cordoned).await.unwrap();
    assert_eq!(
        s.insert_vm_within_cap(&placed(0, 0), 100).await.unwrap(),
        InsertVm::NodeFull
    );
    s.set_node_state("n1", NodeState::Ready).await.unwrap();
    assert_eq!(
        s.insert_vm_within_cap(&placed(0, 0), 100).await.unwrap(),
        InsertVm::Inserted
    );
    // A node nobody joined has no room.
    let mut nowhere = placed(0, 0);
    nowhere.node_id = Some(NodeId::new());
    assert_eq!(
        s.insert_vm_within_cap(&nowhere, 100).await.unwrap(),
        InsertVm::NodeFull
    );
    // A draining node's idle VMs are not claimed: they are being replaced.
    s.set_node_state("n1", NodeState::Draining).await.unwrap();
    let agent = AgentId::new();
    assert_eq!(s.claim_idle_vm(t, "web", agent).await.unwrap(), None);
    s.set_node_state("n1", NodeState::Ready).await.unwrap();
    let claimed = s.claim_idle_vm(t, "web", agent).await.unwrap().unwrap();
    assert_eq!(claimed.id, first.id);
}

both_backends!(insert_within_cap_counts_live_vms);
async fn insert_within_cap_counts_live_vms(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let booting = || VmRecord::booting(VmId::new(), t, "web", "fake", 1, 1);

    // Dead VMs do not count.
    s.insert_vm(&vm(t, "web", VmState::Destroyed, 1))
        .await
        .unwrap();
    s.insert_vm(&vm(t, "web", VmState::Failed, 2))
        .await
        .unwrap();
    let mut inserted = Vec::new();
    for _ in 0..3 {
        let v = booting();
        assert_eq!(
            s.insert_vm_within_cap(&v, 3).await.unwrap(),
            InsertVm::Inserted
        );
        assert_eq!(s.get_vm(v.id).await.unwrap(), v);
        inserted.push(v.id);
    }
    let refused = booting();
    assert_eq!(
        s.insert_vm_within_cap(&refused, 3).await.unwrap(),
        InsertVm::AtCapacity
    );
    assert!(matches!(
        s.get_vm(refused.id).await,
        Err(StoreError::NotFound(_))
    ));
    // Every live state counts…
    assert!(
        s.set_vm_state(inserted[0], &[VmState::Booting], VmState::Idle, None)
            .await
            .unwrap()
    );
    assert!(
        s.set_vm_state(inserted[1], &[VmState::Booting], VmState::Draining, None)
            .await
            .unwrap()
    );
    assert_eq!(
        s.insert_vm_within_cap(&booting(), 3).await.unwrap(),
        InsertVm::AtCapacity
    );
    // … a dead one no more.
    assert!(
        s.set_vm_state(inserted[1], &[VmState::Draining], VmState::Destroyed, None)
            .await
            .unwrap()
    );
    assert_eq!(
        s.insert_vm_within_cap(&booting(), 3).await.unwrap(),
        InsertVm::Inserted
    );
    assert_eq!(s.list_vms(t, false).await.unwrap().len(), 3);
    assert_eq!(
        s.insert_vm_within_cap(&booting(), 0).await.unwrap(),
        InsertVm::AtCapacity
    );
    // Per tenant.
    let other = tenant(s, "other").await;
    let theirs = VmRecord::booting(VmId::new(), other, "web", "fake", 1, 1);
    assert_eq!(
        s.insert_vm_within_cap(&theirs, 1).await.unwrap(),
        InsertVm::Inserted
    );
    let err = s
        .insert_vm_within_cap(
            &VmRecord::booting(VmId::new(), TenantId::new(), "web", "fake", 1, 1),
            5,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    // A cold boot for a queued agent reserves it.
    let agent = queued_agent(s, t, &admin, "web").await;
    let mut cold = booting();
    cold.reserved_for = Some(agent.id);
    assert_eq!(
        s.insert_vm_within_cap(&cold, 3).await.unwrap(),
        InsertVm::AtCapacity
    );
    assert_eq!(
        s.get_agent(t, agent.id).await.unwrap().phase,
        AgentPhase::Queued,
        "a refused boot reserves nothing"
    );
    assert_eq!(
        s.insert_vm_within_cap(&cold, 10).await.unwrap(),
        InsertVm::Inserted
    );
    assert_eq!(
        s.get_vm(cold.id).await.unwrap().reserved_for,
        Some(agent.id)
    );
    let reserved = s.get_agent(t, agent.id).await.unwrap();
    assert_eq!(reserved.phase, AgentPhase::Provisioning);
    assert!(reserved.updated_at >= reserved.created_at);
    // Not queued any more: no second VM for it, and nothing inserted.
    let mut second = booting();
    second.reserved_for = Some(agent.id);
    assert_eq!(
        s.insert_vm_within_cap(&second, 10).await.unwrap(),
        InsertVm::AgentNotQueued
    );
    assert!(matches!(
        s.get_vm(second.id).await,
        Err(StoreError::NotFound(_))
    ));
    // Unknown agents, and other tenants' agents, are not queued here.
    let mut stray = booting();
    stray.reserved_for = Some(AgentId::new());
    assert_eq!(
        s.insert_vm_within_cap(&stray, 10).await.unwrap(),
        InsertVm::AgentNotQueued
    );
    let other_admin = s.get_identity(other, "admin").await.unwrap();
    let foreign = queued_agent(s, other, &other_admin, "web").await;
    stray.reserved_for = Some(foreign.id);
    assert_eq!(
        s.insert_vm_within_cap(&stray, 10).await.unwrap(),
        InsertVm::AgentNotQueued
    );
    assert_eq!(
        s.get_agent(other, foreign.id).await.unwrap().phase,
        AgentPhase::Queued
    );
    assert_eq!(s.list_vms(t, false).await.unwrap().len(), 4);
}

both_backends!(insert_within_cap_races_never_exceed_cap, multi_thread);
async fn insert_within_cap_races_never_exceed_cap(ctx: Ctx) {
    const MAX: i64 = 10;
    const RACERS: usize = 40;
    let other = ctx.open_again().await;
    let t = tenant(&ctx.store, "acme").await;
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..RACERS {
        let store = if i % 2 == 0 {
            ctx.store.clone()
        } else {
            other.clone()
        };
        racers.spawn(async move {
            let v = VmRecord::booting(VmId::new(), t, "web", "fake", 1, 1);
            (v.id, store.insert_vm_within_cap(&v, MAX).await.unwrap())
        });
    }
    let mut inserted = HashSet::new();
    let mut refused = 0;
    while let Some(joined) = racers.join_next().await {
        match joined.unwrap() {
            (id, InsertVm::Inserted) => assert!(inserted.insert(id)),
            (_, InsertVm::AtCapacity) => refused += 1,
            (_, other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(inserted.len(), MAX as usize, "exactly max_vms inserted");
    assert_eq!(refused, RACERS - MAX as usize);
    let listed: HashSet<_> = ctx
        .store
        .list_vms(t, true)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(listed, inserted);
}

both_backends!(claim_prefers_fresh_and_skips_test_vms);
async fn claim_prefers_fresh_and_skips_test_vms(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let mut stale_oldest = vm(t, "web", VmState::Idle, 1);
    stale_oldest.stale = true;
    let mut stale_newer = vm(t, "web", VmState::Idle, 2);
    stale_newer.stale = true;
    let mut test_vm = vm(t, "web", VmState::Idle, 0);
    test_vm.test = true;
    let fresh = vm(t, "web", VmState::Idle, 5);
    let fresher = vm(t, "web", VmState::Idle, 6);
    for v in [&fresher, &stale_newer, &test_vm, &fresh, &stale_oldest] {
        s.insert_vm(v).await.unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..4 {
        let agent = AgentId::new();
        let got = s.claim_idle_vm(t, "web", agent).await.unwrap().unwrap();
        assert_eq!((got.state, got.agent_id), (VmState::Assigned, Some(agent)));
        order.push(got.id);
    }
    assert_eq!(
        order,
        [fresh.id, fresher.id, stale_oldest.id, stale_newer.id],
        "fresh before stale, oldest first"
    );
    assert!(
        s.claim_idle_vm(t, "web", AgentId::new())
            .await
            .unwrap()
            .is_none(),
        "a test VM is never claimed"
    );
    let test_vm_now = s.get_vm(test_vm.id).await.unwrap();
    assert_eq!(
        (test_vm_now.state, test_vm_now.agent_id),
        (VmState::Idle, None)
    );
}

both_backends!(assign_idle_vm_starts_the_agent);
async fn assign_idle_vm_starts_the_agent(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let first = vm(t, "web", VmState::Idle, 1);
    let second = vm(t, "web", VmState::Idle, 2);
    s.insert_vm(&first).await.unwrap();
    s.insert_vm(&second).await.unwrap();

    let agent = queued_agent(s, t, &admin, "web").await;
    let before = now_millis();
    let got = s.assign_idle_vm(t, "web", agent.id).await.unwrap().unwrap();
    assert_eq!(got.id, first.id);
    assert_eq!(
        (got.state, got.agent_id),
        (VmState::Assigned, Some(agent.id))
    );
    assert_eq!(s.get_vm(first.id).await.unwrap(), got);
    let running = s.get_agent(t, agent.id).await.unwrap();
    assert_eq!(running.phase, AgentPhase::Running);
    assert_eq!(running.vm_id, Some(first.id));
    assert!(running.started_at.unwrap() >= before);
    assert_eq!(running.updated_at, running.started_at.unwrap());
    assert_eq!(running.queued_at, agent.queued_at);

    // A running agent is not queued: no second VM, and the VM stays idle.
    assert!(
        s.assign_idle_vm(t, "web", agent.id)
            .await
            .unwrap()
            .is_none()
    );
    // Nor is a killed one.
    let killed = queued_agent(s, t, &admin, "web").await;
    s.transition_agent(
        t,
        killed.id,
        &[AgentPhase::Queued],
        AgentPhase::Killed,
        &AgentUpdate::default(),
    )
    .await
    .unwrap();
    assert!(
        s.assign_idle_vm(t, "web", killed.id)
            .await
            .unwrap()
            .is_none()
    );
    let killed_now = s.get_agent(t, killed.id).await.unwrap();
    assert_eq!(
        (killed_now.phase, killed_now.vm_id),
        (AgentPhase::Killed, None)
    );
    // Nor an unknown agent, nor another tenant's.
    assert!(
        s.assign_idle_vm(t, "web", AgentId::new())
            .await
            .unwrap()
            .is_none()
    );
    let (other, other_admin) = tenant_with_admin(s, "other").await;
    let foreign = queued_agent(s, other, &other_admin, "web").await;
    assert!(
        s.assign_idle_vm(t, "web", foreign.id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        s.get_agent(other, foreign.id).await.unwrap().phase,
        AgentPhase::Queued
    );
    let still = s.get_vm(second.id).await.unwrap();
    assert_eq!(still, second, "the VM stays idle, untouched");

    // Nothing idle in the workspace: the agent stays queued.
    let waiting = queued_agent(s, t, &admin, "api").await;
    assert!(
        s.assign_idle_vm(t, "api", waiting.id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.get_agent(t, waiting.id).await.unwrap(), waiting);
}

both_backends!(concurrent_assignments_are_exclusive, multi_thread);
async fn concurrent_assignments_are_exclusive(ctx: Ctx) {
    const VMS: usize = 50;
    const AGENTS: usize = 200;
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let mut pool = HashSet::new();
    for i in 0..VMS {
        let v = vm(t, "web", VmState::Idle, i as i64);
        s.insert_vm(&v).await.unwrap();
        pool.insert(v.id);
    }
    let mut agents = Vec::new();
    for _ in 0..AGENTS {
        agents.push(queued_agent(s, t, &admin, "web").await.id);
    }

    let mut racers = tokio::task::JoinSet::new();
    for agent in agents.iter().copied() {
        let store = s.clone();
        racers.spawn(async move { (agent, store.assign_idle_vm(t, "web", agent).await.unwrap()) });
    }
    let mut vm_of: HashMap<AgentId, VmId> = HashMap::new();
    while let Some(joined) = racers.join_next().await {
        let (agent, got) = joined.unwrap();
        if let Some(got) = got {
            assert_eq!((got.state, got.agent_id), (VmState::Assigned, Some(agent)));
            assert!(vm_of.insert(agent, got.id).is_none());
        }
    }
    assert_eq!(vm_of.len(), VMS, "exactly {VMS} assignments");
    let assigned: HashSet<VmId> = vm_of.values().copied().collect();
    assert_eq!(assigned, pool, "every VM exactly once");

    for agent in agents {
        let record = s.get_agent(t, agent).await.unwrap();
        match vm_of.get(&agent) {
            Some(v) => {
                assert_eq!(record.phase, AgentPhase::Running);
                assert_eq!(record.vm_id, Some(*v));
            }
            None => {
                assert_eq!(record.phase, AgentPhase::Queued);
                assert_eq!(record.vm_id, None);
            }
        }
    }
    for v in s.list_vms(t, true).await.unwrap() {
        assert_eq!(v.state, VmState::Assigned);
        assert_eq!(vm_of.get(&v.agent_id.unwrap()), Some(&v.id));
    }
    assert_eq!(s.list_queued_agents(t).await.unwrap().len(), AGENTS - VMS);
}

both_backends!(set_vm_state_is_compare_and_set);
async fn set_vm_state_is_compare_and_set(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let reserved_for = AgentId::new();
    let mut cold = vm(t, "web", VmState::Booting, 1);
    cold.reserved_for = Some(reserved_for);
    s.insert_vm(&cold).await.unwrap();

    assert!(
        !s.set_vm_state(cold.id, &[VmState::Idle], VmState::Failed, None)
            .await
            .unwrap()
    );
    assert!(
        !s.set_vm_state(cold.id, &[], VmState::Failed, None)
            .await
            .unwrap()
    );
    assert!(
        !s.set_vm_state(VmId::new(), &[VmState::Booting], VmState::Failed, None)
            .await
            .unwrap()
    );
    assert_eq!(s.get_vm(cold.id).await.unwrap(), cold);

    // Booting → provisioning keeps the reservation.
    let before = now_millis();
    assert!(
        s.set_vm_state(cold.id, &[VmState::Booting], VmState::Provisioning, None)
            .await
            .unwrap()
    );
    let now = s.get_vm(cold.id).await.unwrap();
    assert_eq!(now.state, VmState::Provisioning);
    assert_eq!(now.reserved_for, Some(reserved_for));
    assert!(now.updated_at >= before);
    assert_eq!(now.created_at, cold.created_at);

    // Failing drops it and records why.
    assert!(
        s.set_vm_state(
            cold.id,
            &[VmState::Booting, VmState::Provisioning],
            VmState::Failed,
            Some("image pull failed"),
        )
        .await
        .unwrap()
    );
    let failed = s.get_vm(cold.id).await.unwrap();
    assert_eq!(failed.state, VmState::Failed);
    assert_eq!(failed.reserved_for, None);
    assert_eq!(failed.error.as_deref(), Some("image pull failed"));
    // No error given: the recorded one stays.
    assert!(
        s.set_vm_state(cold.id, &[VmState::Failed], VmState::Destroyed, None)
            .await
            .unwrap()
    );
    let destroyed = s.get_vm(cold.id).await.unwrap();
    assert_eq!(destroyed.state, VmState::Destroyed);
    assert_eq!(destroyed.error.as_deref(), Some("image pull failed"));

    // Leaving `assigned` drops the agent; staying keeps it.
    let held = vm(t, "web", VmState::Idle, 2);
    s.insert_vm(&held).await.unwrap();
    let agent = AgentId::new();
    s.claim_idle_vm(t, "web", agent).await.unwrap().unwrap();
    assert!(
        s.set_vm_state(held.id, &[VmState::Assigned], VmState::Assigned, None)
            .await
            .unwrap()
    );
    assert_eq!(s.get_vm(held.id).await.unwrap().agent_id, Some(agent));
    assert!(
        s.set_vm_state(held.id, &[VmState::Assigned], VmState::Draining, None)
            .await
            .unwrap()
    );
    let draining = s.get_vm(held.id).await.unwrap();
    assert_eq!(
        (draining.state, draining.agent_id),
        (VmState::Draining, None)
    );
    // The agent is free to hold another VM.
    s.insert_vm(&vm(t, "web", VmState::Idle, 3)).await.unwrap();
    assert!(s.claim_idle_vm(t, "web", agent).await.unwrap().is_some());
}

both_backends!(vm_ready_hands_reserved_vms_over);
async fn vm_ready_hands_reserved_vms_over(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let booting = || VmRecord::booting(VmId::new(), t, "web", "fake", 1, 1);

    // No reservation: warm.
    let warm = booting();
    s.insert_vm(&warm).await.unwrap();
    assert_eq!(s.vm_ready(warm.id).await.unwrap(), Ready::Idle);
    let now = s.get_vm(warm.id).await.unwrap();
    assert_eq!((now.state, now.agent_id), (VmState::Idle, None));
    assert_eq!(s.vm_ready(warm.id).await.unwrap(), Ready::Gone);
    assert_eq!(s.get_vm(warm.id).await.unwrap(), now);
    let provisioned = vm(t, "web", VmState::Provisioning, 1);
    s.insert_vm(&provisioned).await.unwrap();
    assert_eq!(s.vm_ready(provisioned.id).await.unwrap(), Ready::Idle);

    // Reserved for an agent still provisioning: straight to it.
    let agent = queued_agent(s, t, &admin, "web").await;
    let mut cold = booting();
    cold.reserved_for = Some(agent.id);
    assert_eq!(
        s.insert_vm_within_cap(&cold, 10).await.unwrap(),
        InsertVm::Inserted
    );
    // … also after a provisioning step.
    assert!(
        s.set_vm_state(cold.id, &[VmState::Booting], VmState::Provisioning, None)
            .await
            .unwrap()
    );
    let before = now_millis();
    assert_eq!(
        s.vm_ready(cold.id).await.unwrap(),
        Ready::Assigned(agent.id)
    );
    let handed = s.get_vm(cold.id).await.unwrap();
    assert_eq!(handed.state, VmState::Assigned);
    assert_eq!(handed.agent_id, Some(agent.id));
    assert_eq!(handed.reserved_for, None);
    let running = s.get_agent(t, agent.id).await.unwrap();
    assert_eq!(running.phase, AgentPhase::Running);
    assert_eq!(running.vm_id, Some(cold.id));
    assert!(running.started_at.unwrap() >= before);
    assert_eq!(s.vm_ready(cold.id).await.unwrap(), Ready::Gone);

    // The reserved agent was killed meanwhile: the VM is warm instead.
    let doomed = queued_agent(s, t, &admin, "web").await;
    let mut orphan = booting();
    orphan.reserved_for = Some(doomed.id);
    assert_eq!(
        s.insert_vm_within_cap(&orphan, 10).await.unwrap(),
        InsertVm::Inserted
    );
    s.transition_agent(
        t,
        doomed.id,
        &[AgentPhase::Provisioning],
        AgentPhase::Killed,
        &AgentUpdate::default(),
    )
    .await
    .unwrap();
    assert_eq!(s.vm_ready(orphan.id).await.unwrap(), Ready::Idle);
    let warm = s.get_vm(orphan.id).await.unwrap();
    assert_eq!(
        (warm.state, warm.agent_id, warm.reserved_for),
        (VmState::Idle, None, None)
    );
    let killed = s.get_agent(t, doomed.id).await.unwrap();
    assert_eq!((killed.phase, killed.vm_id), (AgentPhase::Killed, None));

    // Destroyed meanwhile: gone, nothing changes.
    let lost = booting();
    s.insert_vm(&lost).await.unwrap();
    assert!(
        s.set_vm_state(lost.id, &[VmState::Booting], VmState::Destroyed, None)
            .await
            .unwrap()
    );
    assert_eq!(s.vm_ready(lost.id).await.unwrap(), Ready::Gone);
    assert_eq!(s.get_vm(lost.id).await.unwrap().state, VmState::Destroyed);
    assert_eq!(s.vm_ready(VmId::new()).await.unwrap(), Ready::Gone);
}

both_backends!(release_vm_to_idle_or_draining);
async fn release_vm_to_idle_or_draining(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let v = vm(t, "web", VmState::Idle, 1);
    s.insert_vm(&v).await.unwrap();

    // A sleeping agent gives its VM back to the pool.
    let sleeper = queued_agent(s, t, &admin, "web").await;
    s.assign_idle_vm(t, "web", sleeper.id)
        .await
        .unwrap()
        .unwrap();
    s.transition_agent(
        t,
        sleeper.id,
        &[AgentPhase::Running],
        AgentPhase::Sleeping,
        &AgentUpdate::default(),
    )
    .await
    .unwrap();
    assert!(s.release_vm(v.id, Some(sleeper.id), true).await.unwrap());
    let idle = s.get_vm(v.id).await.unwrap();
    assert_eq!((idle.state, idle.agent_id), (VmState::Idle, None));
    let asleep = s.get_agent(t, sleeper.id).await.unwrap();
    assert_eq!((asleep.phase, asleep.vm_id), (AgentPhase::Sleeping, None));
    assert!(
        !s.release_vm(v.id, Some(sleeper.id), true).await.unwrap(),
        "only from assigned"
    );
    assert!(!s.release_vm(v.id, Some(sleeper.id), false).await.unwrap());

    // A finished agent's VM drains; the agent keeps the VM it was last on.
    let worker = queued_agent(s, t, &admin, "web").await;
    s.assign_idle_vm(t, "web", worker.id)
        .await
        .unwrap()
        .unwrap();
    s.transition_agent(
        t,
        worker.id,
        &[AgentPhase::Running],
        AgentPhase::Completed,
        &AgentUpdate::default(),
    )
    .await
    .unwrap();
    // Not while another agent holds it.
    assert!(!s.release_vm(v.id, Some(sleeper.id), false).await.unwrap());
    assert!(s.release_vm(v.id, Some(worker.id), false).await.unwrap());
    let draining = s.get_vm(v.id).await.unwrap();
    assert_eq!(
        (draining.state, draining.agent_id),
        (VmState::Draining, None)
    );
    let done = s.get_agent(t, worker.id).await.unwrap();
    assert_eq!(
        (done.phase, done.vm_id),
        (AgentPhase::Completed, Some(v.id))
    );
    assert!(!s.release_vm(v.id, Some(worker.id), true).await.unwrap());
    assert_eq!(s.get_vm(v.id).await.unwrap().state, VmState::Draining);

    // The sleeper, woken, may hold a VM again (the drained one let go).
    let fresh = vm(t, "web", VmState::Idle, 2);
    s.insert_vm(&fresh).await.unwrap();
    s.transition_agent(
        t,
        sleeper.id,
        &[AgentPhase::Sleeping],
        AgentPhase::Queued,
        &AgentUpdate::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        s.assign_idle_vm(t, "web", sleeper.id)
            .await
            .unwrap()
            .map(|v| v.id),
        Some(fresh.id)
    );
    // A VM claimed for an agent the store does not know releases too.
    let bare = vm(t, "api", VmState::Idle, 3);
    s.insert_vm(&bare).await.unwrap();
    let stranger = AgentId::new();
    s.claim_idle_vm(t, "api", stranger).await.unwrap().unwrap();
    assert!(s.release_vm(bare.id, Some(stranger), true).await.unwrap());
    assert!(!s.release_vm(VmId::new(), None, true).await.unwrap());
}

both_backends!(mark_stale_marks_other_versions);
async fn mark_stale_marks_other_versions(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let other = tenant(s, "other").await;
    let built = |tenant, ws: &str, state, env, image, at| {
        let mut v = vm(tenant, ws, state, at);
        v.env_version = env;
        v.image_version = image;
        v
    };
    let old_idle = built(t, "web", VmState::Idle, 1, 2, 1);
    let old_env_booting = built(t, "web", VmState::Booting, 1, 3, 2);
    let current = built(t, "web", VmState::Idle, 2, 3, 3);
    let old_image = built(t, "web", VmState::Assigned, 2, 2, 4);
    let dead = built(t, "web", VmState::Destroyed, 1, 1, 5);
    let other_ws = built(t, "api", VmState::Idle, 1, 1, 6);
    let other_tenant = built(other, "web", VmState::Idle, 1, 1, 7);
    // Current versions, another setup (the workspace's repos or setup
    // commands changed since it was built).
    let mut old_setup = built(t, "web", VmState::Assigned, 2, 3, 8);
    old_setup.setup_digest = "0ld5e7".to_owned();
    for v in [
        &old_idle,
        &old_env_booting,
        &current,
        &old_image,
        &dead,
        &other_ws,
        &other_tenant,
        &old_setup,
    ] {
        s.insert_vm(v).await.unwrap();
    }
    assert_eq!(s.mark_stale(t, "web", 2, 3, SETUP).await.unwrap(), 4);
    assert_eq!(
        s.mark_stale(t, "web", 2, 3, SETUP).await.unwrap(),
        0,
        "only newly marked ones count"
    );
    for (v, stale) in [
        (&old_idle, true),
        (&old_env_booting, true),
        (&current, false),
        (&old_image, true),
        (&old_setup, true),
        (&dead, false),
        (&other_ws, false),
        (&other_tenant, false),
    ] {
        let now = s.get_vm(v.id).await.unwrap();
        assert_eq!(now.stale, stale, "{v:?}");
        assert_eq!(now.state, v.state, "{v:?}");
    }
    // The newer, fresh VM is claimed before the older, stale one.
    let got = s.claim_idle_vm(t, "web", AgentId::new()).await.unwrap();
    assert_eq!(got.map(|v| v.id), Some(current.id));
    let got = s.claim_idle_vm(t, "web", AgentId::new()).await.unwrap();
    assert_eq!(got.map(|v| v.id), Some(old_idle.id));
}

both_backends!(vms_keep_their_setup_digest);
async fn vms_keep_their_setup_digest(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    // Through both inserts, back through every read.
    let digest = "0123456789abcdef".repeat(4);
    let mut capped = vm(t, "web", VmState::Booting, 1);
    capped.setup_digest = digest.clone();
    assert_eq!(
        s.insert_vm_within_cap(&capped, 10).await.unwrap(),
        InsertVm::Inserted
    );
    let mut plain = vm(t, "web", VmState::Idle, 2);
    plain.setup_digest = digest.clone();
    s.insert_vm(&plain).await.unwrap();
    assert_eq!(s.get_vm(capped.id).await.unwrap(), capped);
    assert_eq!(
        s.list_vms(t, false).await.unwrap(),
        vec![capped.clone(), plain.clone()]
    );
    let claimed = s
        .claim_idle_vm(t, "web", AgentId::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.setup_digest, digest);
    // A row written before the column existed (as the migration leaves
    // it): the digest reads empty, so it is stale against every setup.
    let legacy = VmId::new();
    ctx.execute_raw(&format!(
        "INSERT INTO vms (id, tenant_id, workspace, state, created_at, updated_at, \
         driver, env_version, image_version) \
         VALUES ('{legacy}', '{t}', 'web', 'idle', 3, 3, 'fake', 1, 1)"
    ))
    .await;
    let read = s.get_vm(legacy).await.unwrap();
    assert_eq!(read.setup_digest, "");
    assert!(!read.stale);
    assert_eq!(s.mark_stale(t, "web", 1, 1, &digest).await.unwrap(), 1);
    assert!(s.get_vm(legacy).await.unwrap().stale);
    for id in [capped.id, plain.id] {
        assert!(!s.get_vm(id).await.unwrap().stale, "built from this setup");
    }
}

// ---------------------------------------------------------- pool: agents

both_backends!(create_agent_enforces_developer_cap);
async fn create_agent_enforces_developer_cap(ctx: Ctx) {
    let s = &ctx.store;
    let (t, _admin) = tenant_with_admin(s, "acme").await;
    let alice = s
        .create_identity(t, "alice", IdentityKind::Developer, Role::Developer, None)
        .await
        .unwrap();
    let bob = s
        .create_identity(t, "bob", IdentityKind::Developer, Role::Developer, None)
        .await
        .unwrap();
    let bot = s
        .create_identity(t, "ci", IdentityKind::Service, Role::Developer, None)
        .await
        .unwrap();
    let create = |owner: &Identity, cap: Option<i32>| {
        let agent = new_agent(t, owner, "web");
        let s = s.clone();
        async move { s.create_agent(&agent, cap).await }
    };
    let limit = |result: Result<AgentRecord, StoreError>, n: i64| match result {
        Err(StoreError::LimitReached(m)) => assert_eq!(m, n),
        other => panic!("expected LimitReached({n}), got {other:?}"),
    };

    let a1 = create(&alice, Some(2)).await.unwrap();
    assert_eq!(a1.phase, AgentPhase::Queued);
    let a2 = create(&alice, Some(2)).await.unwrap();
    limit(create(&alice, Some(2)).await, 2);
    // Children are exempt.
    let mut child = new_agent(t, &alice, "web");
    child.parent_id = Some(a1.id);
    let child = s.create_agent(&child, Some(2)).await.unwrap();
    assert_eq!(child.parent_id, Some(a1.id));
    // No cap, or a cap of 0: unlimited.
    let a3 = create(&alice, None).await.unwrap();
    let a4 = create(&alice, Some(0)).await.unwrap();
    let a5 = create(&alice, Some(5)).await.unwrap();
    limit(create(&alice, Some(5)).await, 5);
    // Services are exempt; other developers count on their own.
    for _ in 0..3 {
        create(&bot, Some(1)).await.unwrap();
    }
    create(&bob, Some(1)).await.unwrap();
    limit(create(&bob, Some(1)).await, 1);

    // Every active phase counts, idle and sleeping included …
    let to = |id, from, to| {
        let s = s.clone();
        async move {
            s.transition_agent(t, id, &[from], to, &AgentUpdate::default())
                .await
                .unwrap()
        }
    };
    to(a1.id, AgentPhase::Queued, AgentPhase::Sleeping).await;
    to(a2.id, AgentPhase::Queued, AgentPhase::Idle).await;
    to(a3.id, AgentPhase::Queued, AgentPhase::Running).await;
    to(a4.id, AgentPhase::Queued, AgentPhase::Provisioning).await;
    limit(create(&alice, Some(5)).await, 5);
    // … terminal ones do not.
    to(a3.id, AgentPhase::Running, AgentPhase::Completed).await;
    to(a4.id, AgentPhase::Provisioning, AgentPhase::Failed).await;
    to(a5.id, AgentPhase::Queued, AgentPhase::Killed).await;
    create(&alice, Some(3)).await.unwrap();
    limit(create(&alice, Some(3)).await, 3);
    // A resurrected agent counts again.
    to(a5.id, AgentPhase::Killed, AgentPhase::Queued).await;
    limit(create(&alice, Some(4)).await, 4);

    // The cap is checked against a known owner.
    let ghost = Identity {
        id: IdentityId::new(),
        tenant_id: t,
        name: "ghost".to_owned(),
        kind: IdentityKind::Developer,
        role: Role::Developer,
        created_at: 0,
    };
    let err = create(&ghost, Some(1)).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "identity \"ghost\""),
        "{err:?}"
    );
    // A duplicate id, an unknown tenant.
    let mut duplicate = new_agent(t, &alice, "web");
    duplicate.id = a1.id;
    let err = s.create_agent(&duplicate, None).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    let err = s
        .create_agent(&new_agent(TenantId::new(), &bot, "web"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

both_backends!(concurrent_creates_respect_the_cap, multi_thread);
async fn concurrent_creates_respect_the_cap(ctx: Ctx) {
    const CAP: i32 = 5;
    const RACERS: usize = 20;
    let other = ctx.open_again().await;
    let (t, _) = tenant_with_admin(&ctx.store, "acme").await;
    let alice = ctx
        .store
        .create_identity(t, "alice", IdentityKind::Developer, Role::Developer, None)
        .await
        .unwrap();
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..RACERS {
        let store = if i % 2 == 0 {
            ctx.store.clone()
        } else {
            other.clone()
        };
        let agent = new_agent(t, &alice, "web");
        racers.spawn(async move { store.create_agent(&agent, Some(CAP)).await });
    }
    let (mut created, mut refused) = (0, 0);
    while let Some(joined) = racers.join_next().await {
        match joined.unwrap() {
            Ok(_) => created += 1,
            Err(StoreError::LimitReached(n)) if n == i64::from(CAP) => refused += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(created, CAP as usize, "exactly the cap is created");
    assert_eq!(refused, RACERS - CAP as usize);
    let filter = AgentFilter {
        owner_id: Some(alice.id),
        ..AgentFilter::default()
    };
    assert_eq!(
        ctx.store.list_agents(t, &filter).await.unwrap().len(),
        CAP as usize
    );
}

both_backends!(agents_round_trip);
async fn agents_round_trip(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let mut spec = new_agent(t, &admin, "web");
    spec.on_idle = OnIdle::KeepAlive;
    spec.command = Some("make test".to_owned());
    spec.build = "2024.06.1".to_owned();
    let before = now_millis();
    let created = s.create_agent(&spec, Some(3)).await.unwrap();
    assert_eq!(
        (created.id, created.tenant_id, created.workspace.as_str()),
        (spec.id, t, "web")
    );
    assert_eq!(
        (
            created.owner_id,
            created.owner_name.as_str(),
            created.owner_kind
        ),
        (admin.id, "admin", IdentityKind::Developer)
    );
    assert_eq!(created.phase, AgentPhase::Queued);
    assert_eq!(created.on_idle, OnIdle::KeepAlive);
    assert_eq!(created.command.as_deref(), Some("make test"));
    assert_eq!(created.build, "2024.06.1");
    assert_eq!(
        (created.vm_id, created.exit_code, created.error.as_deref()),
        (None, None, None)
    );
    assert_eq!((created.output.as_str(), created.resurrections), ("", 0));
    assert!(created.created_at >= before);
    assert_eq!(created.updated_at, created.created_at);
    assert_eq!(created.queued_at, created.created_at);
    assert_eq!((created.started_at, created.finished_at), (None, None));
    assert_eq!(s.get_agent(t, spec.id).await.unwrap(), created);

    let unknown = AgentId::new();
    let err = s.get_agent(t, unknown).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if *m == format!("agent {unknown}")),
        "{err:?}"
    );
}

both_backends!(transition_agent_is_compare_and_set);
async fn transition_agent_is_compare_and_set(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let agent = queued_agent(s, t, &admin, "web").await;
    let none = AgentUpdate::default();
    let id = agent.id;

    let err = s
        .transition_agent(t, id, &[AgentPhase::Running], AgentPhase::Completed, &none)
        .await
        .unwrap_err();
    assert_conflict(err, &format!("agent {id}"));
    let err = s
        .transition_agent(t, id, &[], AgentPhase::Running, &none)
        .await
        .unwrap_err();
    assert_conflict(err, &format!("agent {id}"));
    let unknown = AgentId::new();
    let err = s
        .transition_agent(t, unknown, AgentPhase::ALL, AgentPhase::Killed, &none)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if *m == format!("agent {unknown}")),
        "{err:?}"
    );
    assert_eq!(s.get_agent(t, id).await.unwrap(), agent, "nothing changed");

    // Entering running sets started_at; it may come from any listed phase.
    let v = vm(t, "web", VmState::Idle, 1);
    s.insert_vm(&v).await.unwrap();
    s.assign_idle_vm(t, "web", id).await.unwrap().unwrap();
    let idle = s
        .transition_agent(
            t,
            id,
            &[AgentPhase::Provisioning, AgentPhase::Running],
            AgentPhase::Idle,
            &AgentUpdate {
                output: Some("half way".to_owned()),
                ..AgentUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(idle.phase, AgentPhase::Idle);
    assert_eq!(idle.output, "half way");
    assert_eq!(idle.vm_id, Some(v.id));
    let first_start = idle.started_at.unwrap();
    sleep_ms().await;
    let running = s
        .transition_agent(t, id, &[AgentPhase::Idle], AgentPhase::Running, &none)
        .await
        .unwrap();
    assert!(running.started_at.unwrap() > first_start);
    assert_eq!(running.output, "half way", "None keeps a field");
    assert_eq!(running.finished_at, None);

    // Entering a terminal phase sets finished_at and the given fields.
    let done = s
        .transition_agent(
            t,
            id,
            &[AgentPhase::Running],
            AgentPhase::Completed,
            &AgentUpdate {
                exit_code: Some(3),
                output: Some("tail".to_owned()),
                error: Some("tests failed".to_owned()),
            },
        )
        .await
        .unwrap();
    assert_eq!(done.phase, AgentPhase::Completed);
    assert_eq!(
        (done.exit_code, done.output.as_str(), done.error.as_deref()),
        (Some(3), "tail", Some("tests failed"))
    );
    assert!(done.finished_at.unwrap() >= running.updated_at);
    assert_eq!(done.updated_at, done.finished_at.unwrap());
    assert_eq!(done.resurrections, 0);
    assert_eq!(s.get_agent(t, id).await.unwrap(), done);
    let err = s
        .transition_agent(t, id, AgentPhase::ACTIVE, AgentPhase::Killed, &none)
        .await
        .unwrap_err();
    assert_conflict(err, &format!("agent {id}"));

    // Resurrection: back to queued, cleared, counted, at the end of the queue.
    sleep_ms().await;
    let again = s
        .transition_agent(t, id, AgentPhase::TERMINAL, AgentPhase::Queued, &none)
        .await
        .unwrap();
    assert_eq!(again.phase, AgentPhase::Queued);
    assert_eq!(again.resurrections, 1);
    assert_eq!(
        (
            again.vm_id,
            again.exit_code,
            again.output.as_str(),
            again.error.as_deref()
        ),
        (None, None, "", None)
    );
    assert!(again.queued_at > agent.queued_at);
    assert_eq!(again.queued_at, again.updated_at);
    assert_eq!(again.created_at, agent.created_at);
    let failed = s
        .transition_agent(
            t,
            id,
            &[AgentPhase::Queued],
            AgentPhase::Failed,
            &AgentUpdate {
                error: Some("no capacity".to_owned()),
                ..AgentUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(failed.error.as_deref(), Some("no capacity"));
    // Given fields are written even when entering queued.
    let twice = s
        .transition_agent(
            t,
            id,
            &[AgentPhase::Failed],
            AgentPhase::Queued,
            &AgentUpdate {
                output: Some("resumed".to_owned()),
                ..AgentUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(twice.resurrections, 2);
    assert_eq!(
        (twice.error.as_deref(), twice.output.as_str()),
        (None, "resumed")
    );
    // Queued from an active phase is no resurrection.
    s.transition_agent(t, id, &[AgentPhase::Queued], AgentPhase::Sleeping, &none)
        .await
        .unwrap();
    let woken = s
        .transition_agent(t, id, &[AgentPhase::Sleeping], AgentPhase::Queued, &none)
        .await
        .unwrap();
    assert_eq!(woken.resurrections, 2);
}

both_backends!(queued_agents_are_fifo);
async fn queued_agents_are_fifo(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let bob = s
        .create_identity(t, "bob", IdentityKind::Developer, Role::Developer, None)
        .await
        .unwrap();
    let a = queued_agent(s, t, &admin, "web").await;
    sleep_ms().await;
    let b = queued_agent(s, t, &bob, "api").await;
    sleep_ms().await;
    let c = queued_agent(s, t, &admin, "web").await;
    let queue = |s: &Arc<dyn Store>| {
        let s = s.clone();
        async move {
            s.list_queued_agents(t)
                .await
                .unwrap()
                .into_iter()
                .map(|a| a.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(queue(s).await, [a.id, b.id, c.id]);

    // a runs, sleeps and wakes: it queues again, behind the others.
    let none = AgentUpdate::default();
    s.transition_agent(t, a.id, &[AgentPhase::Queued], AgentPhase::Running, &none)
        .await
        .unwrap();
    assert_eq!(queue(s).await, [b.id, c.id]);
    sleep_ms().await;
    s.transition_agent(t, a.id, &[AgentPhase::Running], AgentPhase::Sleeping, &none)
        .await
        .unwrap();
    sleep_ms().await;
    let woken = s
        .transition_agent(t, a.id, &[AgentPhase::Sleeping], AgentPhase::Queued, &none)
        .await
        .unwrap();
    assert!(woken.queued_at > c.queued_at);
    assert_eq!(queue(s).await, [b.id, c.id, a.id]);
    s.transition_agent(t, b.id, &[AgentPhase::Queued], AgentPhase::Killed, &none)
        .await
        .unwrap();
    assert_eq!(queue(s).await, [c.id, a.id]);

    // list_agents: oldest created first, whatever the queue says.
    let list = |filter: AgentFilter| {
        let s = s.clone();
        async move {
            s.list_agents(t, &filter)
                .await
                .unwrap()
                .into_iter()
                .map(|a| a.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(AgentFilter::default()).await, [a.id, b.id, c.id]);
    assert_eq!(
        list(AgentFilter {
            workspace: Some("web".to_owned()),
            ..AgentFilter::default()
        })
        .await,
        [a.id, c.id]
    );
    assert_eq!(
        list(AgentFilter {
            owner_id: Some(bob.id),
            ..AgentFilter::default()
        })
        .await,
        [b.id]
    );
    assert_eq!(
        list(AgentFilter {
            phases: vec![AgentPhase::Queued],
            ..AgentFilter::default()
        })
        .await,
        [a.id, c.id]
    );
    assert_eq!(
        list(AgentFilter {
            phases: vec![AgentPhase::Killed, AgentPhase::Running],
            ..AgentFilter::default()
        })
        .await,
        [b.id]
    );
    assert_eq!(
        list(AgentFilter {
            workspace: Some("web".to_owned()),
            phases: vec![AgentPhase::Queued],
            owner_id: Some(admin.id),
        })
        .await,
        [a.id, c.id]
    );
    assert!(
        list(AgentFilter {
            workspace: Some("nope".to_owned()),
            ..AgentFilter::default()
        })
        .await
        .is_empty()
    );
}

both_backends!(agents_are_tenant_scoped);
async fn agents_are_tenant_scoped(ctx: Ctx) {
    let s = &ctx.store;
    let (a, a_admin) = tenant_with_admin(s, "a").await;
    let (b, _) = tenant_with_admin(s, "b").await;
    let mine = queued_agent(s, a, &a_admin, "web").await;

    let err = s.get_agent(b, mine.id).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert!(
        s.list_agents(b, &AgentFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.list_queued_agents(b).await.unwrap().is_empty());
    let err = s
        .transition_agent(
            b,
            mine.id,
            &[AgentPhase::Queued],
            AgentPhase::Killed,
            &AgentUpdate::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert_eq!(s.get_agent(a, mine.id).await.unwrap(), mine);
    assert_eq!(
        s.list_agents(a, &AgentFilter::default()).await.unwrap(),
        vec![mine.clone()]
    );
    assert_eq!(s.list_queued_agents(a).await.unwrap(), vec![mine]);
}

// ------------------------------------------------ pool: tenant-wide state

both_backends!(pool_state_stops_and_starts);
async fn pool_state_stops_and_starts(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let other = tenant(s, "other").await;
    assert_eq!(
        s.get_pool_state(t).await.unwrap(),
        PoolState { stopped: false }
    );
    s.set_pool_stopped(t, true).await.unwrap();
    assert!(s.get_pool_state(t).await.unwrap().stopped);
    assert!(!s.get_pool_state(other).await.unwrap().stopped);
    s.set_pool_stopped(t, true).await.unwrap();
    assert!(s.get_pool_state(t).await.unwrap().stopped);
    s.set_pool_stopped(t, false).await.unwrap();
    assert!(!s.get_pool_state(t).await.unwrap().stopped);
    let err = s.set_pool_stopped(TenantId::new(), true).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

both_backends!(workspace_states_put_and_list);
async fn workspace_states_put_and_list(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let other = tenant(s, "other").await;
    assert!(s.list_workspace_states(t).await.unwrap().is_empty());

    let mut web = WorkspaceState {
        workspace: "web".to_owned(),
        consecutive_failures: 2,
        backoff_until: Some(now_millis() + 60_000),
        hard_limited: false,
        last_error: Some("boot timed out".to_owned()),
        config_fingerprint: "ws1-env3-img2".to_owned(),
    };
    let api = WorkspaceState {
        workspace: "api".to_owned(),
        config_fingerprint: "ws1-env1-img1".to_owned(),
        ..WorkspaceState::default()
    };
    s.put_workspace_state(t, &web).await.unwrap();
    s.put_workspace_state(t, &api).await.unwrap();
    assert_eq!(
        s.list_workspace_states(t).await.unwrap(),
        vec![api.clone(), web.clone()],
        "by workspace"
    );

    web.consecutive_failures = 5;
    web.backoff_until = None;
    web.hard_limited = true;
    web.last_error = None;
    web.config_fingerprint = "ws2-env3-img2".to_owned();
    s.put_workspace_state(t, &web).await.unwrap();
    assert_eq!(
        s.list_workspace_states(t).await.unwrap(),
        vec![api, web.clone()]
    );
    assert!(s.list_workspace_states(other).await.unwrap().is_empty());
    let err = s
        .put_workspace_state(TenantId::new(), &web)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

both_backends!(builds_register_retire_and_list);
async fn builds_register_retire_and_list(ctx: Ctx) {
    let s = &ctx.store;
    assert!(s.list_builds().await.unwrap().is_empty());
    let before = now_millis();
    let b1 = s.register_build("b1").await.unwrap();
    assert_eq!((b1.id.as_str(), b1.retired_at), ("b1", None));
    assert!(b1.first_seen >= before);
    sleep_ms().await;
    assert_eq!(s.register_build("b1").await.unwrap(), b1, "idempotent");
    let b2 = s.register_build("b2").await.unwrap();
    assert!(b2.first_seen > b1.first_seen);

    let retired = s.retire_build("b1").await.unwrap();
    assert_eq!(
        (retired.id.as_str(), retired.first_seen),
        ("b1", b1.first_seen)
    );
    let retired_at = retired.retired_at.unwrap();
    assert!(retired_at >= b2.first_seen);
    sleep_ms().await;
    assert_eq!(
        s.retire_build("b1").await.unwrap(),
        retired,
        "keeps the first retirement time"
    );
    assert_eq!(
        s.register_build("b1").await.unwrap(),
        retired,
        "registering again does not revive it"
    );
    assert_eq!(s.list_builds().await.unwrap(), vec![retired, b2]);
    let err = s.retire_build("nope").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "build \"nope\""),
        "{err:?}"
    );
}

both_backends!(corrupt_rows_are_reported);
async fn corrupt_rows_are_reported(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let v = vm(t, "web", VmState::Idle, 1);
    s.insert_vm(&v).await.unwrap();
    let agent = queued_agent(s, t, &admin, "web").await;

    ctx.execute_raw("UPDATE vms SET stale = 7").await;
    let err = s.get_vm(v.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    ctx.execute_raw("UPDATE vms SET stale = 0, state = 'melting'")
        .await;
    let err = s.list_vms(t, true).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");

    ctx.execute_raw("UPDATE agents SET on_idle = 'nap'").await;
    let err = s.get_agent(t, agent.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    ctx.execute_raw("UPDATE agents SET on_idle = 'sleep', phase = 'zombie'")
        .await;
    let err = s.list_agents(t, &AgentFilter::default()).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");

    ctx.execute_raw(&format!(
        "INSERT INTO pool_states (tenant_id, stopped, updated_at) VALUES ('{t}', 2, 0)"
    ))
    .await;
    let err = s.get_pool_state(t).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
}

// ---------------------------------------------------- provisioning runs

/// A `provisioning` run of `vm_id` in `workspace`, created at `created_at`.
fn instance(
    tenant: TenantId,
    workspace: &str,
    vm_id: VmId,
    test: bool,
    created_at: i64,
) -> InstanceRecord {
    InstanceRecord {
        id: InstanceId::new(),
        tenant_id: tenant,
        workspace: workspace.to_owned(),
        vm_id,
        test,
        status: InstanceStatus::Provisioning,
        summary: None,
        steps: json!([]),
        created_at,
        updated_at: created_at,
        finished_at: None,
    }
}

/// Steps with key orders, nesting, unicode and numbers of every kind, to
/// see the JSON come back exactly.
fn sample_steps() -> Value {
    json!([
        {"name": "clone", "status": "ok", "durationMs": 1234, "output": ["a", "b"]},
        {"zeta": 1, "alpha": -2, "mid": 2.5, "big": 18446744073709551615u64,
         "nested": {"y": null, "x": [true, false, {}]}, "text": "héllo \"quoted\"\n"},
        {"name": "setup", "status": "failed", "error": "exit 1"}
    ])
}

both_backends!(instances_round_trip);
async fn instances_round_trip(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let mut run = instance(t, "web", VmId::new(), true, now_millis());
    run.steps = sample_steps();
    s.create_instance(&run).await.unwrap();
    let got = s.get_instance(t, run.id).await.unwrap();
    assert_eq!(got, run);
    assert_eq!(
        serde_json::to_string(&got.steps).unwrap(),
        serde_json::to_string(&run.steps).unwrap(),
        "key order preserved"
    );

    let mut done = instance(t, "web", VmId::new(), false, now_millis());
    done.status = InstanceStatus::Failed;
    done.steps = json!([{"b": 1, "a": 2}]);
    done.summary = Some(json!({"success": false, "failedStep": "setup", "error": "exit 1"}));
    done.finished_at = Some(done.created_at + 5);
    s.create_instance(&done).await.unwrap();
    let got = s.get_instance(t, done.id).await.unwrap();
    assert_eq!(got, done);
    assert_eq!(
        serde_json::to_string(&got.summary).unwrap(),
        r#"{"success":false,"failedStep":"setup","error":"exit 1"}"#
    );

    let err = s.create_instance(&run).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists(m) if *m == format!("instance {}", run.id)),
        "{err:?}"
    );
    let err = s
        .create_instance(&instance(TenantId::new(), "web", VmId::new(), false, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = s.get_instance(t, InstanceId::new()).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

both_backends!(update_instance_records_progress_and_end);
async fn update_instance_records_progress_and_end(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let created = now_millis() - 1_000;
    let run = instance(t, "web", VmId::new(), false, created);
    s.create_instance(&run).await.unwrap();

    // Progress: still provisioning, no finish time.
    let before = now_millis();
    let steps = json!([{"name": "clone", "status": "running"}]);
    s.update_instance(run.id, InstanceStatus::Provisioning, &steps, None)
        .await
        .unwrap();
    let got = s.get_instance(t, run.id).await.unwrap();
    assert_eq!(got.status, InstanceStatus::Provisioning);
    assert_eq!(got.steps, steps);
    assert_eq!((got.summary, got.finished_at), (None, None));
    assert_eq!(got.created_at, created);
    assert!(got.updated_at >= before);

    // The end: ready, with a summary and a finish time.
    sleep_ms().await;
    let before = now_millis();
    let steps = sample_steps();
    let summary = json!({"success": true, "failedStep": null, "error": null});
    s.update_instance(run.id, InstanceStatus::Ready, &steps, Some(&summary))
        .await
        .unwrap();
    let got = s.get_instance(t, run.id).await.unwrap();
    assert_eq!(got.status, InstanceStatus::Ready);
    assert_eq!(got.steps, steps);
    assert_eq!(got.summary, Some(summary));
    let finished = got.finished_at.expect("finished_at set");
    assert!(finished >= before, "{finished} < {before}");
    assert_eq!(got.updated_at, finished);
    assert_eq!(
        (
            got.id,
            got.tenant_id,
            got.workspace.as_str(),
            got.vm_id,
            got.test
        ),
        (run.id, t, "web", run.vm_id, false),
        "the rest is untouched"
    );

    // Failed also finishes.
    let other = instance(t, "web", VmId::new(), true, now_millis());
    s.create_instance(&other).await.unwrap();
    let summary = json!({"success": false, "failedStep": "setup", "error": "exit 1"});
    s.update_instance(other.id, InstanceStatus::Failed, &json!([]), Some(&summary))
        .await
        .unwrap();
    let got = s.get_instance(t, other.id).await.unwrap();
    assert_eq!(got.status, InstanceStatus::Failed);
    assert_eq!(got.summary, Some(summary));
    assert!(got.finished_at.is_some());

    // A late progress write (a throttled one landing after the end)
    // changes nothing: the end stands.
    let err = s
        .update_instance(run.id, InstanceStatus::Provisioning, &json!([]), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let ended = s.get_instance(t, run.id).await.unwrap();
    assert_eq!(ended.status, InstanceStatus::Ready);
    assert_eq!(ended.steps, steps);

    let unknown = InstanceId::new();
    let err = s
        .update_instance(unknown, InstanceStatus::Ready, &json!([]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if *m == format!("instance {unknown}")),
        "{err:?}"
    );
}

both_backends!(list_instances_filters_newest_first);
async fn list_instances_filters_newest_first(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let vm_a = VmId::new();
    let vm_b = VmId::new();
    let base = now_millis();
    // Created in this order (oldest first).
    let r1 = instance(t, "web", vm_a, false, base);
    let r2 = instance(t, "api", vm_b, true, base + 1);
    let r3 = instance(t, "web", vm_b, true, base + 2);
    let r4 = instance(t, "web", vm_a, false, base + 3);
    // Same instant as r4: the larger id comes first.
    let mut r5 = instance(t, "api", vm_a, false, base + 3);
    while r5.id < r4.id {
        r5.id = InstanceId::new();
    }
    for r in [&r4, &r2, &r5, &r1, &r3] {
        s.create_instance(r).await.unwrap();
    }
    s.update_instance(r1.id, InstanceStatus::Ready, &json!([]), None)
        .await
        .unwrap();
    s.update_instance(r3.id, InstanceStatus::Failed, &json!([]), None)
        .await
        .unwrap();

    let list = |filter: InstanceFilter| async move {
        s.list_instances(t, &filter)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(InstanceFilter::default()).await,
        [r5.id, r4.id, r3.id, r2.id, r1.id],
        "newest first, then id descending"
    );
    assert_eq!(
        list(InstanceFilter {
            workspace: Some("web".to_owned()),
            ..InstanceFilter::default()
        })
        .await,
        [r4.id, r3.id, r1.id]
    );
    assert_eq!(
        list(InstanceFilter {
            status: Some(InstanceStatus::Provisioning),
            ..InstanceFilter::default()
        })
        .await,
        [r5.id, r4.id, r2.id]
    );
    assert_eq!(
        list(InstanceFilter {
            status: Some(InstanceStatus::Ready),
            ..InstanceFilter::default()
        })
        .await,
        [r1.id]
    );
    assert_eq!(
        list(InstanceFilter {
            test: Some(true),
            ..InstanceFilter::default()
        })
        .await,
        [r3.id, r2.id]
    );
    assert_eq!(
        list(InstanceFilter {
            test: Some(false),
            ..InstanceFilter::default()
        })
        .await,
        [r5.id, r4.id, r1.id]
    );
    assert_eq!(
        list(InstanceFilter {
            vm: Some(vm_b),
            ..InstanceFilter::default()
        })
        .await,
        [r3.id, r2.id]
    );
    assert_eq!(
        list(InstanceFilter {
            workspace: Some("web".to_owned()),
            status: Some(InstanceStatus::Provisioning),
            test: Some(false),
            vm: Some(vm_a),
            limit: None,
        })
        .await,
        [r4.id]
    );
    assert_eq!(
        list(InstanceFilter {
            limit: Some(2),
            ..InstanceFilter::default()
        })
        .await,
        [r5.id, r4.id]
    );
    assert_eq!(
        list(InstanceFilter {
            workspace: Some("web".to_owned()),
            limit: Some(2),
            ..InstanceFilter::default()
        })
        .await,
        [r4.id, r3.id]
    );
    assert_eq!(
        list(InstanceFilter {
            limit: Some(0),
            ..InstanceFilter::default()
        })
        .await,
        [r5.id],
        "at least one"
    );
    assert_eq!(
        list(InstanceFilter {
            limit: Some(-5),
            ..InstanceFilter::default()
        })
        .await,
        [r5.id],
        "at least one"
    );
    assert_eq!(
        list(InstanceFilter {
            limit: Some(i64::MAX),
            ..InstanceFilter::default()
        })
        .await
        .len(),
        5
    );
    assert!(
        list(InstanceFilter {
            workspace: Some("nope".to_owned()),
            ..InstanceFilter::default()
        })
        .await
        .is_empty()
    );
}

both_backends!(list_instances_limits_default_and_max);
async fn list_instances_limits_default_and_max(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let vm_id = VmId::new();
    for i in 0..1005 {
        s.create_instance(&instance(t, "web", vm_id, false, i))
            .await
            .unwrap();
    }
    let default = s
        .list_instances(t, &InstanceFilter::default())
        .await
        .unwrap();
    assert_eq!(default.len(), 100);
    assert_eq!(default[0].created_at, 1004, "newest first");
    let max = s
        .list_instances(
            t,
            &InstanceFilter {
                limit: Some(5000),
                ..InstanceFilter::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(max.len(), 1000, "clamped to 1000");
    assert_eq!(max.last().unwrap().created_at, 5);
}

both_backends!(instances_are_tenant_scoped);
async fn instances_are_tenant_scoped(ctx: Ctx) {
    let s = &ctx.store;
    let a = tenant(s, "a").await;
    let b = tenant(s, "b").await;
    let vm_id = VmId::new();
    let mine = instance(a, "web", vm_id, false, now_millis());
    s.create_instance(&mine).await.unwrap();

    let err = s.get_instance(b, mine.id).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if *m == format!("instance {}", mine.id)),
        "{err:?}"
    );
    assert!(
        s.list_instances(b, &InstanceFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.list_instances(
            b,
            &InstanceFilter {
                vm: Some(vm_id),
                ..InstanceFilter::default()
            }
        )
        .await
        .unwrap()
        .is_empty()
    );
    assert_eq!(s.get_instance(a, mine.id).await.unwrap(), mine);
    assert_eq!(
        s.list_instances(a, &InstanceFilter::default())
            .await
            .unwrap(),
        vec![mine]
    );
}

both_backends!(corrupt_instance_rows_are_reported);
async fn corrupt_instance_rows_are_reported(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let run = instance(t, "web", VmId::new(), false, now_millis());
    s.create_instance(&run).await.unwrap();
    let corrupt = |err: StoreError, what: &str| {
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains(what)),
            "{err:?}"
        );
    };

    ctx.execute_raw("UPDATE instances SET status = 'exploded'")
        .await;
    corrupt(s.get_instance(t, run.id).await.unwrap_err(), "exploded");
    corrupt(
        s.list_instances(t, &InstanceFilter::default())
            .await
            .unwrap_err(),
        "exploded",
    );

    ctx.execute_raw("UPDATE instances SET status = 'ready', steps = '[{\"name\":'")
        .await;
    corrupt(s.get_instance(t, run.id).await.unwrap_err(), "steps");

    ctx.execute_raw("UPDATE instances SET steps = '[]', summary = 'not json'")
        .await;
    corrupt(
        s.list_instances(t, &InstanceFilter::default())
            .await
            .unwrap_err(),
        "summary",
    );

    ctx.execute_raw("UPDATE instances SET summary = NULL, test = 3")
        .await;
    corrupt(s.get_instance(t, run.id).await.unwrap_err(), "test flag");

    ctx.execute_raw("UPDATE instances SET test = 1").await;
    assert!(s.get_instance(t, run.id).await.unwrap().test);
}

// ------------------------------------------------------- backend-specific

/// The SQLite file and pools are set up as `sqlite.rs` promises.
#[tokio::test]
async fn sqlite_connection_settings() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hearth.db"))
        .await
        .unwrap();
    assert_eq!(store.write_pool().options().get_max_connections(), 1);
    assert!(store.read_pool().options().get_max_connections() > 1);
    for pool in [store.write_pool(), store.read_pool()] {
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(sync, 1, "NORMAL");
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(busy, 5000);
    }
    // Nothing writes behind the single writer's back.
    let err = sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ('x', 'x', 0)")
        .execute(store.read_pool())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("readonly"), "{err}");
    // Applying the migrations again (a second open) is a no-op.
    drop(store);
    SqliteStore::open(&dir.path().join("hearth.db"))
        .await
        .unwrap();
}

both_backends!(spawn_agent_claims_or_queues_in_one_go);
async fn spawn_agent_claims_or_queues_in_one_go(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let idle = vm(t, "web", VmState::Idle, 1);
    s.insert_vm(&idle).await.unwrap();

    // Warm: running on the idle VM at once, which now holds it.
    let before = now_millis();
    let warm = s
        .spawn_agent(&new_agent(t, &admin, "web"), None)
        .await
        .unwrap();
    assert_eq!(warm.phase, AgentPhase::Running);
    assert_eq!(warm.vm_id, Some(idle.id));
    assert!(warm.started_at.is_some_and(|at| at >= before));
    assert_eq!(s.get_agent(t, warm.id).await.unwrap(), warm);
    let held = s.get_vm(idle.id).await.unwrap();
    assert_eq!(
        (held.state, held.agent_id),
        (VmState::Assigned, Some(warm.id))
    );

    // Nothing idle (nor in another workspace's pool): queued.
    s.insert_vm(&vm(t, "api", VmState::Idle, 2)).await.unwrap();
    let cold = s
        .spawn_agent(&new_agent(t, &admin, "web"), None)
        .await
        .unwrap();
    assert_eq!(
        (cold.phase, cold.vm_id, cold.started_at),
        (AgentPhase::Queued, None, None)
    );
    assert_eq!(s.list_queued_agents(t).await.unwrap(), vec![cold.clone()]);

    // The developer cap counts as create_agent's, and a refused spawn
    // claims nothing.
    let dev = s
        .create_identity(t, "dev", IdentityKind::Developer, Role::Developer, None)
        .await
        .unwrap();
    let spare = vm(t, "web", VmState::Idle, 3);
    s.insert_vm(&spare).await.unwrap();
    let first = s
        .spawn_agent(&new_agent(t, &dev, "web"), Some(1))
        .await
        .unwrap();
    assert_eq!(first.vm_id, Some(spare.id));
    s.insert_vm(&vm(t, "web", VmState::Idle, 4)).await.unwrap();
    let err = s
        .spawn_agent(&new_agent(t, &dev, "web"), Some(1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LimitReached(1)), "{err:?}");
    let idle_left = s
        .list_vms(t, false)
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.workspace == "web" && v.state == VmState::Idle)
        .count();
    assert_eq!(idle_left, 1, "the refused spawn left the idle VM alone");

    // A taken id: AlreadyExists, and the VM it would have claimed stays idle.
    let mut again = new_agent(t, &admin, "web");
    again.id = warm.id;
    let err = s.spawn_agent(&again, None).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    let idle_left = s
        .list_vms(t, false)
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.workspace == "web" && v.state == VmState::Idle)
        .count();
    assert_eq!(idle_left, 1, "rolled back");
}

both_backends!(spawn_agent_checks_the_parent_in_its_transaction);
async fn spawn_agent_checks_the_parent_in_its_transaction(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "acme").await;
    let (other_tenant, other_admin) = tenant_with_admin(s, "other").await;
    let dev = s
        .create_identity(t, "dev", IdentityKind::Developer, Role::Developer, None)
        .await
        .unwrap();
    let parent = queued_agent(s, t, &dev, "web").await;
    let child_of = |owner: &Identity, parent: AgentId| NewAgent {
        parent_id: Some(parent),
        ..new_agent(t, owner, "web")
    };
    s.insert_vm(&vm(t, "web", VmState::Idle, 1)).await.unwrap();

    // Refusals claim nothing and insert nothing.
    let refusals = [
        (
            child_of(&admin, parent.id),
            ParentProblem::OtherOwner("dev".into()),
        ),
        (child_of(&dev, AgentId::new()), ParentProblem::NotFound),
        (
            NewAgent {
                parent_id: Some(queued_agent(s, other_tenant, &other_admin, "web").await.id),
                ..new_agent(t, &dev, "web")
            },
            ParentProblem::NotFound,
        ),
    ];
    for (agent, problem) in refusals {
        let err = s.spawn_agent(&agent, Some(1)).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::BadParent { problem: p, .. } if *p == problem),
            "{err:?}"
        );
    }
    // The dev's own active agent is a parent, and the child is exempt
    // from the cap the parent already fills.
    let child = s
        .spawn_agent(&child_of(&dev, parent.id), Some(1))
        .await
        .unwrap();
    assert_eq!(
        (child.parent_id, child.phase),
        (Some(parent.id), AgentPhase::Running)
    );
    // Once the parent is killed, it is none.
    s.transition_agent(
        t,
        parent.id,
        AgentPhase::ACTIVE,
        AgentPhase::Killed,
        &AgentUpdate::default(),
    )
    .await
    .unwrap();
    let err = s
        .spawn_agent(&child_of(&dev, parent.id), Some(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::BadParent { parent: p, problem: ParentProblem::Terminal(AgentPhase::Killed) } if *p == parent.id),
        "{err:?}"
    );
    let agents = s.list_agents(t, &AgentFilter::default()).await.unwrap();
    assert_eq!(agents.len(), 2, "only the parent and its one child exist");
}

both_backends!(identity_deletes_and_tokens_respect_ceiling_and_last_manager);
async fn identity_deletes_and_tokens_respect_ceiling_and_last_manager(ctx: Ctx) {
    let s = &ctx.store;
    let (t, _admin) = tenant_with_admin(s, "acme").await;
    s.create_identity(t, "op", IdentityKind::Developer, Role::Operator, None)
        .await
        .unwrap();
    s.create_identity(t, "viewer", IdentityKind::Developer, Role::Viewer, None)
        .await
        .unwrap();
    // Above the ceiling: no token, no delete.
    let err = s
        .create_token(t, "op", &token(), Role::Admin)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::IdentityRefused {
                refusal: IdentityRefusal::AboveCeiling {
                    role: Role::Operator,
                    ceiling: Role::Admin
                },
                ..
            }
        ),
        "{err:?}"
    );
    let err = s.delete_identity(t, "op", Role::Admin).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::IdentityRefused { .. }),
        "{err:?}"
    );
    assert!(s.get_identity(t, "op").await.is_ok());
    // At or below it: fine.
    s.create_token(t, "viewer", &token(), Role::Admin)
        .await
        .unwrap();
    s.create_token(t, "admin", &token(), Role::Admin)
        .await
        .unwrap();
    assert_eq!(
        s.delete_identity(t, "viewer", Role::Admin)
            .await
            .unwrap()
            .name,
        "viewer"
    );
    // The last manager (admin or operator) stays.
    s.delete_identity(t, "op", Role::Operator).await.unwrap();
    let err = s
        .delete_identity(t, "admin", Role::Operator)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::IdentityRefused { name, refusal: IdentityRefusal::LastManager } if name == "admin"),
        "{err:?}"
    );
    assert!(s.get_identity(t, "admin").await.is_ok());
}

both_backends!(two_admins_deleting_each_other_leave_one, multi_thread);
async fn two_admins_deleting_each_other_leave_one(ctx: Ctx) {
    let s = ctx.store.clone();
    for round in 0..30 {
        let (t, _) = tenant_with_admin(&s, &format!("t{round}")).await;
        s.create_identity(t, "second", IdentityKind::Developer, Role::Admin, None)
            .await
            .unwrap();
        // Each on its own task, released together, so both transactions
        // are open at once.
        let gate = Arc::new(tokio::sync::Barrier::new(2));
        let racer = |victim: &'static str| {
            let (s, gate) = (s.clone(), gate.clone());
            tokio::spawn(async move {
                gate.wait().await;
                s.delete_identity(t, victim, Role::Admin).await
            })
        };
        let (a, b) = (racer("admin"), racer("second"));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let deleted = [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count();
        assert_eq!(deleted, 1, "round {round}: {a:?} {b:?}");
        assert_eq!(s.list_identities(t).await.unwrap().len(), 1);
    }
}

both_backends!(concurrent_spawns_claim_each_vm_once, multi_thread);
async fn concurrent_spawns_claim_each_vm_once(ctx: Ctx) {
    let s = ctx.store.clone();
    let (t, admin) = tenant_with_admin(&s, "acme").await;
    for i in 0..10 {
        s.insert_vm(&vm(t, "web", VmState::Idle, i)).await.unwrap();
    }
    let mut racers = tokio::task::JoinSet::new();
    for _ in 0..25 {
        let store = s.clone();
        let agent = new_agent(t, &admin, "web");
        racers.spawn(async move {
            // PostgreSQL may refuse a racer on a row lock; it tries again.
            loop {
                match store.spawn_agent(&agent, None).await {
                    Err(StoreError::Conflict(_)) => tokio::task::yield_now().await,
                    other => return other.unwrap(),
                }
            }
        });
    }
    let spawned: Vec<AgentRecord> = racers.join_all().await;
    let running: Vec<_> = spawned
        .iter()
        .filter(|a| a.phase == AgentPhase::Running)
        .collect();
    let vms: HashSet<VmId> = running.iter().filter_map(|a| a.vm_id).collect();
    assert_eq!(running.len(), 10, "every idle VM went to one agent");
    assert_eq!(vms.len(), 10, "no VM went to two");
    assert_eq!(
        spawned
            .iter()
            .filter(|a| a.phase == AgentPhase::Queued)
            .count(),
        15
    );
    for agent in running {
        let vm = s.get_vm(agent.vm_id.unwrap()).await.unwrap();
        assert_eq!((vm.state, vm.agent_id), (VmState::Assigned, Some(agent.id)));
    }
}

both_backends!(get_workspace_state_reads_one);
async fn get_workspace_state_reads_one(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    assert_eq!(s.get_workspace_state(t, "web").await.unwrap(), None);
    let state = WorkspaceState {
        workspace: "web".into(),
        consecutive_failures: 2,
        backoff_until: Some(42),
        hard_limited: false,
        last_error: Some("boom".into()),
        config_fingerprint: "1/1/0".into(),
    };
    s.put_workspace_state(t, &state).await.unwrap();
    s.put_workspace_state(
        t,
        &WorkspaceState {
            workspace: "api".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(s.get_workspace_state(t, "web").await.unwrap(), Some(state));
    let other = tenant(s, "other").await;
    assert_eq!(s.get_workspace_state(other, "web").await.unwrap(), None);
}

/// The token now must differ from `last` (then becomes `last`).
async fn assert_moved(store: &Arc<dyn Store>, last: &mut hearth_store::ChangeToken, what: &str) {
    let now = store.change_token().await.unwrap();
    assert_ne!(now, *last, "{what} must change the token");
    *last = now;
}

both_backends!(change_token_moves_with_every_write);
async fn change_token_moves_with_every_write(ctx: Ctx) {
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let mut last = s.change_token().await.unwrap();
    // PostgreSQL's mark is the whole server's, which other tests' databases
    // move too: "nothing written, same token" is checked on SQLite only.
    if ctx.name() == "sqlite" {
        assert_eq!(s.change_token().await.unwrap(), last);
        s.list_vms(t, true).await.unwrap();
        s.list_resources(t, Kind::Environment).await.unwrap();
        s.get_pool_state(t).await.unwrap();
        assert_eq!(s.change_token().await.unwrap(), last, "reads write nothing");
    }
    // A transaction.
    let spec = json!({"driver": "fake"});
    s.put_resource(PutResource {
        actor: None,
        tenant: t,
        kind: Kind::Environment,
        name: "dev",
        spec: &spec,
        references: &[],
        precondition: Precondition::None,
    })
    .await
    .unwrap();
    assert_moved(s, &mut last, "a resource write").await;
    // Single statements.
    s.put_workspace_state(
        t,
        &WorkspaceState {
            workspace: "web".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_moved(s, &mut last, "a workspace state write").await;
    let mut vm = VmRecord::booting(VmId::new(), t, "web", "fake", 1, 0);
    vm.state = VmState::Idle;
    s.insert_vm(&vm).await.unwrap();
    assert_moved(s, &mut last, "a VM insert").await;
    assert!(
        s.set_vm_state(vm.id, &[VmState::Idle], VmState::Draining, None)
            .await
            .unwrap()
    );
    assert_moved(s, &mut last, "a VM state change").await;
    // Another store on the same database (another server, another process).
    let other = ctx.open_again().await;
    other.set_pool_stopped(t, true).await.unwrap();
    assert_moved(s, &mut last, "another store's write").await;
    // A statement behind every store's back.
    ctx.execute_raw("UPDATE pool_states SET stopped = 0").await;
    assert_moved(s, &mut last, "a raw write").await;
    assert!(!s.get_pool_state(t).await.unwrap().stopped);
}

fn bake(tenant: TenantId, image: &str) -> BakeRecord {
    let now = now_millis();
    BakeRecord {
        id: uuid::Uuid::new_v4().to_string(),
        tenant_id: tenant,
        image: image.into(),
        state: BakeState::Queued,
        requested_by: "admin".into(),
        recipe: json!({"driver": "qemu", "rootfs": "minimal"}),
        step: "queued".into(),
        log: String::new(),
        error: None,
        bake: None,
        created_at: now,
        updated_at: now,
        finished_at: None,
    }
}

both_backends!(bakes_run_one_at_a_time_append_logs_and_fail_on_restart);
async fn bakes_run_one_at_a_time_append_logs_and_fail_on_restart(ctx: Ctx) {
    let store = &ctx.store;
    let (a, _) = tenant_with_admin(store, "a").await;
    let (b, _) = tenant_with_admin(store, "b").await;
    let first = bake(a, "vm");
    store.create_bake(&first).await.unwrap();
    // A second bake of the same image while the first is active: refused.
    let err = store.create_bake(&bake(a, "vm")).await.unwrap_err();
    assert_conflict(err, "a bake of image \"vm\" is queued or running already");
    // Another image, or the same name in another tenant: fine.
    store.create_bake(&bake(a, "other")).await.unwrap();
    let theirs = bake(b, "vm");
    store.create_bake(&theirs).await.unwrap();
    assert!(matches!(
        store.get_bake(b, &first.id).await,
        Err(StoreError::NotFound(_))
    ));

    let step = |state, step: &'static str, log: &'static str| BakeUpdate {
        state,
        step,
        append_log: log,
        error: None,
        bake: None,
    };
    store
        .update_bake(&first.id, step(BakeState::Running, "kernel", "kernel\n"))
        .await
        .unwrap();
    store
        .update_bake(
            &first.id,
            step(BakeState::Running, "modules", "modules\0x\n"),
        )
        .await
        .unwrap();
    store
        .update_bake(
            &first.id,
            BakeUpdate {
                bake: Some(3),
                ..step(BakeState::Succeeded, "baked", "baked vm/3\n")
            },
        )
        .await
        .unwrap();
    let done = store.get_bake(a, &first.id).await.unwrap();
    assert_eq!(done.state, BakeState::Succeeded);
    assert_eq!(done.log, "kernel\nmodules\u{FFFD}x\nbaked vm/3\n");
    assert_eq!((done.bake, done.step.as_str()), (Some(3), "baked"));
    assert!(done.finished_at.is_some());
    // An ended job changes no more.
    assert!(matches!(
        store
            .update_bake(&first.id, step(BakeState::Running, "late", "late\n"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    // With the first ended, the image may be baked again.
    let second = bake(a, "vm");
    store.create_bake(&second).await.unwrap();
    let listed: Vec<String> = store
        .list_bakes(a, "vm")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&first.id) && listed.contains(&second.id));

    // A restart fails what was queued or running, in every tenant.
    assert_eq!(store.fail_active_bakes("interrupted").await.unwrap(), 3);
    let failed = store.get_bake(b, &theirs.id).await.unwrap();
    assert_eq!(
        (failed.state, failed.error.as_deref(), failed.log.as_str()),
        (BakeState::Failed, Some("interrupted"), "interrupted\n")
    );
    assert_eq!(
        store.get_bake(a, &first.id).await.unwrap().state,
        BakeState::Succeeded
    );
    store.create_bake(&bake(b, "vm")).await.unwrap();
}

/// The spec text of a resource as the database holds it (no store
/// method in between).
async fn raw_spec(ctx: &Ctx, tenant: TenantId, kind: Kind, name: &str) -> String {
    let query = "SELECT spec FROM resources WHERE tenant_id = $1 AND kind = $2 AND name = $3";
    match &ctx.backend {
        Backend::Sqlite { store, .. } => sqlx::query_scalar(query)
            .bind(tenant.to_string())
            .bind(kind.as_str())
            .bind(name)
            .fetch_one(store.read_pool())
            .await
            .unwrap(),
        Backend::Postgres { store, .. } => sqlx::query_scalar(query)
            .bind(tenant.to_string())
            .bind(kind.as_str())
            .bind(name)
            .fetch_one(store.pool())
            .await
            .unwrap(),
    }
}

/// Secrets at rest: a store from before (plaintext) is sealed on unlock,
/// once, in place (versions kept); what is written afterwards is sealed;
/// readers see plaintext; no key or another key cannot read or unlock;
/// SQLite's files keep no copy of the plaintext.
async fn secrets_are_sealed_at_rest(ctx: Ctx) {
    use hearth_store::secrets::{SEALED_PREFIX, SecretsKey};
    let s = &ctx.store;
    let t = tenant(s, "acme").await;
    let old_value = "plain-old-value-0451";
    let old_token = "ghp-old-token-0452";
    let env = json!({"driver": "sandbox", "env": {"API_KEY": old_value, "EMPTY": ""}});
    let ws = json!({"environment": "dev", "repos": [
        {"url": format!("https://{old_token}@git.example/r.git")},
        {"url": "git://git.example/open.git"}
    ]});
    put(s, t, Kind::Environment, "dev", &env, &[])
        .await
        .unwrap();
    put(s, t, Kind::Workspace, "web", &ws, &[]).await.unwrap();
    put(
        s,
        t,
        Kind::Image,
        "base",
        &json!({"driver": "sandbox"}),
        &[],
    )
    .await
    .unwrap();
    // Never unlocked: stored as given (a store from before sealing).
    assert!(
        raw_spec(&ctx, t, Kind::Environment, "dev")
            .await
            .contains(old_value)
    );
    assert!(!s.secrets_sealed().await.unwrap());
    // …and in SQLite's files (so the scan below can fail).
    let files_hold =
        |secret: &str| match &ctx.backend {
            Backend::Sqlite { path, .. } => [path.clone(), path.with_extension("db-wal")]
                .iter()
                .any(|file| {
                    let bytes = std::fs::read(file).unwrap_or_default();
                    bytes.windows(secret.len()).any(|w| w == secret.as_bytes())
                }),
            Backend::Postgres { .. } => false,
        };
    if matches!(ctx.backend, Backend::Sqlite { .. }) {
        assert!(files_hold(old_value));
    }

    let (key, _) = SecretsKey::generate();
    assert_eq!(s.unlock_secrets(key.clone()).await.unwrap(), 2);
    assert!(s.secrets_sealed().await.unwrap());
    let stored_env = raw_spec(&ctx, t, Kind::Environment, "dev").await;
    let stored_ws = raw_spec(&ctx, t, Kind::Workspace, "web").await;
    for text in [&stored_env, &stored_ws] {
        assert!(
            !text.contains(old_value) && !text.contains(old_token) && text.contains(SEALED_PREFIX),
            "{text}"
        );
    }
    // Only secrets are sealed: the open repo URL and the rest stay.
    assert!(
        stored_ws.contains("git://git.example/open.git"),
        "{stored_ws}"
    );
    assert!(
        stored_env.contains("\"driver\":\"sandbox\""),
        "{stored_env}"
    );
    let read = s
        .get_resource(t, Kind::Environment, "dev")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((read.spec, read.version), (env.clone(), 1));
    let read = s.list_resources(t, Kind::Workspace).await.unwrap();
    assert_eq!(read[0].spec, ws);
    // Writing the same again changes nothing (plaintext compared).
    let again = put(s, t, Kind::Environment, "dev", &env, &[])
        .await
        .unwrap();
    assert!(!again.changed);

    // Idempotent, from another server with the same key.
    let other = ctx.open_again().await;
    assert_eq!(other.unlock_secrets(key.clone()).await.unwrap(), 0);
    // New writes are sealed, by every server that was unlocked.
    let new_value = "fresh-value-0453";
    let env2 = json!({"driver": "sandbox", "env": {"NEW": new_value}});
    put(&other, t, Kind::Environment, "dev", &env2, &[])
        .await
        .unwrap();
    let stored = raw_spec(&ctx, t, Kind::Environment, "dev").await;
    assert!(
        !stored.contains(new_value) && stored.contains(SEALED_PREFIX),
        "{stored}"
    );
    assert_eq!(
        s.get_resource(t, Kind::Environment, "dev")
            .await
            .unwrap()
            .unwrap()
            .spec,
        env2
    );
    let deleted = s
        .delete_resource(t, Kind::Environment, "dev", None)
        .await
        .unwrap();
    assert_eq!(deleted.spec, env2);

    // No key: sealed values are refused by name, never read as text.
    let locked = ctx.open_again().await;
    let e = locked
        .get_resource(t, Kind::Workspace, "web")
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::SecretsLocked(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "workspace \"web\" holds a repo URL sealed with a secrets key, and none was given"
    );
    // Another key: refused, and nothing changes.
    let (wrong, _) = SecretsKey::generate();
    let e = locked.unlock_secrets(wrong).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the store's secrets were sealed with another secrets key than the one given"
    );
    assert_eq!(raw_spec(&ctx, t, Kind::Workspace, "web").await, stored_ws);

    // SQLite: neither the file nor its WAL holds the plaintext anywhere.
    for secret in [old_value, old_token, new_value] {
        assert!(!files_hold(secret), "the database files hold {secret}");
    }
}
both_backends!(secrets_are_sealed_at_rest);

// ---------------------------------------------------------------- artifacts

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Every chunk of a whole artifact, joined.
async fn read_whole(store: &Arc<dyn Store>, digest: &str) -> Vec<u8> {
    let artifact = store.get_artifact(digest).await.unwrap().expect("whole");
    let mut bytes = Vec::new();
    for seq in 0..artifact.chunks {
        bytes.extend(store.read_artifact_chunk(digest, seq).await.unwrap());
    }
    bytes
}

async fn artifacts_round_trip_in_chunks(ctx: Ctx) {
    let store = &ctx.store;
    // Two whole chunks and a part: the chunking's edges are crossed.
    let bytes: Vec<u8> = (0..2 * ARTIFACT_CHUNK_BYTES + 1234)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let digest = sha256_hex(&bytes);
    assert_eq!(store.get_artifact(&digest).await.unwrap(), None);

    let stored = store
        .put_artifact(&digest, &mut bytes.as_slice())
        .await
        .unwrap();
    assert_eq!(stored.digest, digest);
    assert_eq!(stored.size, bytes.len() as i64);
    assert_eq!(stored.chunks, 3);
    assert_eq!(
        store.get_artifact(&digest).await.unwrap(),
        Some(stored.clone())
    );
    assert_eq!(read_whole(store, &digest).await, bytes);
    let e = store.read_artifact_chunk(&digest, 3).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e:?}");

    // Putting it again writes nothing and answers the stored one.
    let again = store
        .put_artifact(&digest, &mut bytes.as_slice())
        .await
        .unwrap();
    assert_eq!(again, stored);

    // Another store on the same database (another replica) serves it.
    let other = ctx.open_again().await;
    assert_eq!(read_whole(&other, &digest).await, bytes);

    // An empty artifact is whole with no chunk.
    let empty = sha256_hex(b"");
    let stored = store.put_artifact(&empty, &mut &b""[..]).await.unwrap();
    assert_eq!((stored.size, stored.chunks), (0, 0));
}
both_backends!(artifacts_round_trip_in_chunks);

async fn artifacts_that_do_not_hash_to_their_digest_are_never_served(ctx: Ctx) {
    let store = &ctx.store;
    let bytes = vec![42u8; ARTIFACT_CHUNK_BYTES + 10];
    let digest = sha256_hex(&bytes);
    let mut tampered = bytes.clone();
    tampered[ARTIFACT_CHUNK_BYTES + 3] ^= 1;

    let e = store
        .put_artifact(&digest, &mut tampered.as_slice())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::InvalidArtifact(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "artifact {digest}: its bytes hash to {}, not to the digest given",
            sha256_hex(&tampered)
        )
    );
    assert_eq!(store.get_artifact(&digest).await.unwrap(), None);
    let e = store.read_artifact_chunk(&digest, 0).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e:?}");

    // An upload that died half-way (chunks but no marker row) is not
    // served either, and a later full upload replaces its chunks.
    ctx.execute_raw(&format!(
        "INSERT INTO artifact_chunks (digest, seq, data) VALUES ('{digest}', 0, {}), \
         ('{digest}', 7, {})",
        match ctx.name() {
            "sqlite" => "x'00'",
            _ => "'\\x00'::bytea",
        },
        match ctx.name() {
            "sqlite" => "x'01'",
            _ => "'\\x01'::bytea",
        },
    ))
    .await;
    assert!(store.read_artifact_chunk(&digest, 0).await.is_err());
    let stored = store
        .put_artifact(&digest, &mut bytes.as_slice())
        .await
        .unwrap();
    assert_eq!(stored.chunks, 2);
    assert_eq!(read_whole(store, &digest).await, bytes);
    assert!(store.read_artifact_chunk(&digest, 7).await.is_err());

    // A name that is not a digest is refused before anything is read.
    for bad in [
        "abc",
        &digest.to_uppercase(),
        &format!("{}g", &digest[..63]),
    ] {
        let e = store
            .put_artifact(bad, &mut bytes.as_slice())
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("is not a SHA-256 (64 lower-case hex characters)"),
            "{e}"
        );
    }
}
both_backends!(artifacts_that_do_not_hash_to_their_digest_are_never_served);

// ---------------------------------------------------------------- events

both_backends!(events_are_listed_in_order_by_tenant_and_kind);
async fn events_are_listed_in_order_by_tenant_and_kind(ctx: Ctx) {
    use hearth_store::{EventFilter, EventKind, NewEvent};
    let store = &ctx.store;
    let a = tenant(store, "ev-a").await;
    let b = tenant(store, "ev-b").await;
    store
        .append_events(
            a,
            &[
                NewEvent::new(EventKind::VmBooting, "vm/1", json!({"workspace": "w"})),
                NewEvent::new(EventKind::VmReady, "vm/1", json!({})).by("alice"),
            ],
        )
        .await
        .unwrap();
    store
        .append_events(
            b,
            &[NewEvent::new(EventKind::PoolUp, "pool/default", json!({}))],
        )
        .await
        .unwrap();
    store
        .append_events(
            a,
            &[NewEvent::new(EventKind::VmDestroyed, "vm/1", json!({}))],
        )
        .await
        .unwrap();
    let all = store.list_events(a, &EventFilter::default()).await.unwrap();
    let kinds: Vec<EventKind> = all.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::VmBooting,
            EventKind::VmReady,
            EventKind::VmDestroyed
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(all[1].actor.as_deref(), Some("alice"));
    assert_eq!(all[0].data, json!({"workspace": "w"}));
    let after = store
        .list_events(
            a,
            &EventFilter {
                after: Some(all[0].id),
                kinds: vec![EventKind::VmDestroyed, EventKind::VmBooting],
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].kind, EventKind::VmDestroyed);
    let other = store.list_events(b, &EventFilter::default()).await.unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].kind, EventKind::PoolUp);
    // Retention: everything is older than a moment from now.
    assert_eq!(store.prune_events(now_millis() + 1000).await.unwrap(), 4);
    assert!(
        store
            .list_events(a, &EventFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
}

// ---- event emission (each store change writes its event in its transaction)

/// The tenant's events after `after` as (kind, subject) pairs.
async fn events_after(
    store: &Arc<dyn Store>,
    tenant: TenantId,
    after: i64,
) -> Vec<hearth_store::EventRecord> {
    store
        .list_events(
            tenant,
            &hearth_store::EventFilter {
                after: Some(after),
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

/// The last event id of the tenant (0 when none).
async fn last_event(store: &Arc<dyn Store>, tenant: TenantId) -> i64 {
    events_after(store, tenant, 0)
        .await
        .last()
        .map_or(0, |e| e.id)
}

fn kinds_of(events: &[hearth_store::EventRecord]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

both_backends!(every_lifecycle_change_writes_its_event);
async fn every_lifecycle_change_writes_its_event(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "emit").await;

    // Resources name who wrote them; an unchanged write says nothing.
    let mark = last_event(s, t).await;
    let spec = json!({"driver": "fake"});
    let write = |actor| PutResource {
        actor,
        tenant: t,
        kind: Kind::Image,
        name: "base",
        spec: &spec,
        references: &[],
        precondition: Precondition::None,
    };
    s.put_resource(write(Some("alice"))).await.unwrap();
    s.put_resource(write(Some("bob"))).await.unwrap();
    let got = events_after(s, t, mark).await;
    assert_eq!(kinds_of(&got), ["resource.written"]);
    assert_eq!(got[0].subject, "image/base");
    assert_eq!(got[0].actor.as_deref(), Some("alice"));
    assert_eq!(got[0].data["version"], 1);
    assert_eq!(got[0].data["created"], true);

    // A cold boot for a queued agent: queued, provisioning + booting, then
    // ready hands it over (ready, assigned, running), in commit order.
    let mark = last_event(s, t).await;
    let agent = queued_agent(s, t, &admin, "web").await;
    let mut cold = vm(t, "web", VmState::Booting, now_millis());
    cold.reserved_for = Some(agent.id);
    assert_eq!(
        s.insert_vm_within_cap(&cold, 10).await.unwrap(),
        InsertVm::Inserted
    );
    assert_eq!(
        s.vm_ready(cold.id).await.unwrap(),
        Ready::Assigned(agent.id)
    );
    let got = events_after(s, t, mark).await;
    assert_eq!(
        kinds_of(&got),
        [
            "agent.queued",
            "agent.provisioning",
            "vm.booting",
            "vm.ready",
            "vm.assigned",
            "agent.running"
        ]
    );
    assert!(got.windows(2).all(|w| w[0].id < w[1].id));
    let agent_subject = format!("agent/{}", agent.id);
    let vm_subject = format!("vm/{}", cold.id);
    assert_eq!(got[0].subject, agent_subject);
    assert_eq!(got[1].data["from"], "queued");
    assert_eq!(got[2].subject, vm_subject);
    assert_eq!(got[2].data["reserved_for"], agent.id.to_string());
    assert_eq!(got[4].data["agent"], agent.id.to_string());
    assert_eq!(got[5].data["from"], "provisioning");
    assert_eq!(got[5].data["vm"], cold.id.to_string());

    // The agent ends (its error is in the event, never its output), gives
    // the VM back, and the VM is destroyed.
    let mark = last_event(s, t).await;
    let update = AgentUpdate {
        exit_code: Some(3),
        output: Some("SECRET OUTPUT".into()),
        error: Some("exit 3".into()),
    };
    s.transition_agent(
        t,
        agent.id,
        &[AgentPhase::Running],
        AgentPhase::Failed,
        &update,
    )
    .await
    .unwrap();
    assert!(s.release_vm(cold.id, Some(agent.id), false).await.unwrap());
    assert!(
        s.set_vm_state(cold.id, &[VmState::Draining], VmState::Destroyed, None)
            .await
            .unwrap()
    );
    let got = events_after(s, t, mark).await;
    assert_eq!(
        kinds_of(&got),
        ["agent.failed", "vm.returned", "vm.destroyed"]
    );
    assert_eq!(got[0].data["from"], "running");
    assert_eq!(got[0].data["exit_code"], 3);
    assert_eq!(got[0].data["error"], "exit 3");
    assert!(!got[0].data.to_string().contains("SECRET"));
    assert_eq!(got[1].data["to"], "draining");
    assert_eq!(got[1].data["agent"], agent.id.to_string());

    // A warm claim by spawn: assigned and running in one go; a boot that
    // fails says why.
    let warm = vm(t, "web", VmState::Booting, now_millis());
    s.insert_vm(&warm).await.unwrap();
    assert_eq!(s.vm_ready(warm.id).await.unwrap(), Ready::Idle);
    let mark = last_event(s, t).await;
    let spawned = s
        .spawn_agent(&new_agent(t, &admin, "web"), None)
        .await
        .unwrap();
    assert_eq!(spawned.phase, AgentPhase::Running);
    let broken = vm(t, "web", VmState::Booting, now_millis());
    s.insert_vm(&broken).await.unwrap();
    s.set_vm_state(
        broken.id,
        &[VmState::Booting],
        VmState::Failed,
        Some("no kernel"),
    )
    .await
    .unwrap();
    let got = events_after(s, t, mark).await;
    assert_eq!(
        kinds_of(&got),
        ["vm.assigned", "agent.running", "vm.booting", "vm.failed"]
    );
    assert_eq!(got[1].data["from"], Value::Null);
    assert_eq!(got[3].data["error"], "no kernel");

    // A provisioning run: one event per finished step, then its end.
    let mark = last_event(s, t).await;
    let run = instance(t, "web", warm.id, false, now_millis());
    s.create_instance(&run).await.unwrap();
    let running = json!([{"name": "create_vm", "status": "running", "output": ""}]);
    s.update_instance(run.id, InstanceStatus::Provisioning, &running, None)
        .await
        .unwrap();
    let done = json!([
        {"name": "create_vm", "status": "succeeded", "output": "", "durationMs": 12},
        {"name": "clone_repo", "repo": "app", "status": "succeeded", "output": "token=x", "durationMs": 30}
    ]);
    s.update_instance(run.id, InstanceStatus::Provisioning, &done, None)
        .await
        .unwrap();
    s.update_instance(
        run.id,
        InstanceStatus::Ready,
        &done,
        Some(&json!({"success": true})),
    )
    .await
    .unwrap();
    let got = events_after(s, t, mark).await;
    assert_eq!(
        kinds_of(&got),
        ["instance.step", "instance.step", "instance.ready"]
    );
    assert_eq!(got[0].data["name"], "create_vm");
    assert_eq!(got[0].data["duration_ms"], 12);
    assert_eq!(got[1].data["repo"], "app");
    assert!(!got[1].data.to_string().contains("token"));
    assert_eq!(got[2].subject, format!("instance/{}", run.id));

    // A workspace backs off, is hard limited, recovers.
    let mark = last_event(s, t).await;
    let mut state = WorkspaceState {
        workspace: "web".into(),
        consecutive_failures: 1,
        backoff_until: Some(now_millis() + 1000),
        hard_limited: false,
        last_error: Some("boot failed".into()),
        config_fingerprint: "f".into(),
    };
    s.put_workspace_state(t, &state).await.unwrap();
    s.put_workspace_state(t, &state).await.unwrap();
    state.consecutive_failures = 5;
    state.hard_limited = true;
    s.put_workspace_state(t, &state).await.unwrap();
    s.put_workspace_state(
        t,
        &WorkspaceState {
            workspace: "web".into(),
            config_fingerprint: "f".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let got = events_after(s, t, mark).await;
    assert_eq!(
        kinds_of(&got),
        [
            "workspace.backing_off",
            "workspace.hard_limited",
            "workspace.recovered"
        ]
    );
    assert_eq!(got[0].subject, "workspace/web");
    assert_eq!(got[0].data["error"], "boot failed");

    // A delete names its actor too.
    let mark = last_event(s, t).await;
    s.delete_resource(t, Kind::Image, "base", Some("carol"))
        .await
        .unwrap();
    let got = events_after(s, t, mark).await;
    assert_eq!(kinds_of(&got), ["resource.deleted"]);
    assert_eq!(got[0].actor.as_deref(), Some("carol"));
}

both_backends!(a_change_that_fails_writes_no_event);
async fn a_change_that_fails_writes_no_event(ctx: Ctx) {
    let s = &ctx.store;
    let (t, admin) = tenant_with_admin(s, "emit-none").await;
    put(s, t, Kind::Image, "base", &json!({"driver": "fake"}), &[])
        .await
        .unwrap();
    put(
        s,
        t,
        Kind::Environment,
        "dev",
        &json!({"image": "base"}),
        &[reference(Kind::Image, "base")],
    )
    .await
    .unwrap();
    let agent = queued_agent(s, t, &admin, "web").await;
    let mark = last_event(s, t).await;

    // A missing reference, a version conflict, a delete in use.
    let spec = json!({"image": "gone"});
    let err = s
        .put_resource(PutResource {
            actor: Some("alice"),
            tenant: t,
            kind: Kind::Environment,
            name: "other",
            spec: &spec,
            references: &[reference(Kind::Image, "gone")],
            precondition: Precondition::None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::MissingReference { .. }),
        "{err:?}"
    );
    let err = put_at(s, t, Kind::Image, "base", &json!({"driver": "x"}), 7)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = s
        .delete_resource(t, Kind::Image, "base", Some("alice"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
    // A phase change from the wrong phase, a claim with nothing idle, an
    // assignment with nothing idle, a compare-and-set that does not match,
    // a cap refusal, a ready of a VM that is not booting, an update of a
    // run that does not exist.
    let err = s
        .transition_agent(
            t,
            agent.id,
            &[AgentPhase::Running],
            AgentPhase::Completed,
            &AgentUpdate::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(
        s.claim_idle_vm(t, "web", AgentId::new())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.assign_idle_vm(t, "web", agent.id)
            .await
            .unwrap()
            .is_none()
    );
    let idle = vm(t, "web", VmState::Idle, now_millis());
    s.insert_vm(&idle).await.unwrap();
    assert!(
        !s.set_vm_state(idle.id, &[VmState::Booting], VmState::Failed, Some("x"))
            .await
            .unwrap()
    );
    assert!(!s.release_vm(idle.id, None, true).await.unwrap());
    let full = vm(t, "web", VmState::Booting, now_millis());
    assert_eq!(
        s.insert_vm_within_cap(&full, 1).await.unwrap(),
        InsertVm::AtCapacity
    );
    assert_eq!(s.vm_ready(idle.id).await.unwrap(), Ready::Gone);
    let err = s
        .update_instance(InstanceId::new(), InstanceStatus::Ready, &json!([]), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    // A duplicate agent id: the insert fails, so its event is not kept.
    let mut twin = new_agent(t, &admin, "web");
    twin.id = agent.id;
    assert!(s.create_agent(&twin, None).await.is_err());

    let got = events_after(s, t, mark).await;
    assert!(got.is_empty(), "failed changes wrote {:?}", kinds_of(&got));
}

both_backends!(
    a_reader_following_concurrent_writers_sees_each_event_once_in_order,
    multi_thread
);
async fn a_reader_following_concurrent_writers_sees_each_event_once_in_order(ctx: Ctx) {
    use hearth_store::{EventFilter, EventKind, NewEvent};
    let (t, admin) = tenant_with_admin(&ctx.store, "emit-order").await;
    const WRITERS: usize = 16;
    const EACH: usize = 25;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        // Each writer its own store instance, as a replica would be.
        let store = ctx.open_again().await;
        let admin = admin.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                if i % 5 == 0 {
                    // A real change with its event, interleaved.
                    queued_agent(&store, t, &admin, "web").await;
                } else {
                    let event = NewEvent::new(
                        EventKind::PoolUp,
                        "pool/default",
                        json!({"writer": w, "i": i}),
                    );
                    store.append_events(t, &[event]).await.unwrap();
                }
            }
        }));
    }
    let reader = ctx.store.clone();
    let follow = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut after = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while seen.len() < WRITERS * EACH {
            assert!(tokio::time::Instant::now() < deadline, "saw {}", seen.len());
            let page = reader
                .list_events(
                    t,
                    &EventFilter {
                        after: Some(after),
                        kinds: vec![],
                        limit: 7,
                    },
                )
                .await
                .unwrap();
            for e in &page {
                assert!(e.id > after, "id {} after {after}", e.id);
                after = e.id;
                seen.push(e.clone());
            }
            if page.is_empty() {
                tokio::task::yield_now().await;
            }
        }
        seen
    });
    for w in writers {
        w.await.unwrap();
    }
    let seen = follow.await.unwrap();
    // Exactly once: what the reader saw is the whole log, in the same order.
    let all: Vec<i64> = events_after(&ctx.store, t, 0)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    let ids: Vec<i64> = seen.iter().map(|e| e.id).collect();
    assert_eq!(ids, all);
    assert_eq!(ids.len(), WRITERS * EACH);
    let pool_ups: HashSet<(i64, i64)> = seen
        .iter()
        .filter(|e| e.kind == EventKind::PoolUp)
        .map(|e| {
            (
                e.data["writer"].as_i64().unwrap(),
                e.data["i"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(pool_ups.len(), WRITERS * EACH * 4 / 5);
}

// ---------------------------------------------------------------- webhooks

async fn raw_webhook_secret(ctx: &Ctx, name: &str) -> String {
    let query = "SELECT secret FROM webhooks WHERE name = $1";
    match &ctx.backend {
        Backend::Sqlite { store, .. } => sqlx::query_scalar(query)
            .bind(name)
            .fetch_one(store.read_pool())
            .await
            .unwrap(),
        Backend::Postgres { store, .. } => sqlx::query_scalar(query)
            .bind(name)
            .fetch_one(store.pool())
            .await
            .unwrap(),
    }
}

both_backends!(webhooks_are_per_tenant_with_sealed_secrets);
/// Webhooks: names unique per tenant, the secret sealed at rest and opened
/// on read, the cursor starting at the tenant's newest event.
async fn webhooks_are_per_tenant_with_sealed_secrets(ctx: Ctx) {
    use hearth_store::secrets::{SEALED_PREFIX, SecretsKey};
    use hearth_store::{EventFilter, EventKind, NewEvent, NewWebhook};
    let s = &ctx.store;
    let (key, _) = SecretsKey::generate();
    s.unlock_secrets(key).await.unwrap();
    let a = tenant(s, "wh-a").await;
    let b = tenant(s, "wh-b").await;
    s.append_events(
        a,
        &[NewEvent::new(EventKind::PoolUp, "pool/default", json!({}))],
    )
    .await
    .unwrap();
    let newest = s.list_events(a, &EventFilter::default()).await.unwrap()[0].id;
    let hook = |tenant, name: &str, secret: &str| NewWebhook {
        tenant_id: tenant,
        name: name.into(),
        url: "https://receiver.example/hook".into(),
        secret: secret.into(),
        kinds: vec![EventKind::VmReady, EventKind::ResourceWritten],
    };
    let made = s
        .create_webhook(&hook(a, "ci", "whsec_aaaa"))
        .await
        .unwrap();
    assert_eq!(made.cursor, newest, "sent what happens from now on");
    assert_eq!(made.secret, "whsec_aaaa");
    assert!(made.enabled);
    assert!(
        !format!("{made:?}").contains("whsec_aaaa"),
        "Debug hides it"
    );
    let stored = raw_webhook_secret(&ctx, "ci").await;
    assert!(
        stored.starts_with(SEALED_PREFIX) && !stored.contains("whsec_aaaa"),
        "{stored}"
    );
    let e = s
        .create_webhook(&hook(a, "ci", "whsec_bbbb"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists(_)), "{e:?}");
    // The same name in another tenant is another webhook.
    let other = s
        .create_webhook(&hook(b, "ci", "whsec_cccc"))
        .await
        .unwrap();
    assert_eq!(other.cursor, 0);
    let got = s.get_webhook(a, "ci").await.unwrap().unwrap();
    assert_eq!(got, made);
    assert_eq!(got.kinds, [EventKind::VmReady, EventKind::ResourceWritten]);
    assert_eq!(s.list_webhooks(b).await.unwrap()[0].secret, "whsec_cccc");
    // Another server without the key cannot read it.
    let locked = ctx.open_again().await;
    let e = locked.get_webhook(a, "ci").await.unwrap_err();
    assert!(matches!(e, StoreError::SecretsLocked(_)), "{e:?}");
    assert!(s.delete_webhook(a, "ci").await.unwrap());
    assert!(!s.delete_webhook(a, "ci").await.unwrap());
    assert!(s.get_webhook(a, "ci").await.unwrap().is_none());
    assert_eq!(s.list_webhooks(b).await.unwrap().len(), 1);
}

both_backends!(webhook_leases_let_one_replica_deliver_at_a_time);
/// The lease is a compare-and-set: one replica at a time; an attempt is
/// recorded (and the cursor moved) only by the lease's holder, never
/// backwards; the log lists attempts newest first.
async fn webhook_leases_let_one_replica_deliver_at_a_time(ctx: Ctx) {
    use hearth_store::{DeliveryAttempt, DeliveryOutcome, EventKind, NewWebhook};
    let s = &ctx.store;
    let t = tenant(s, "wh-lease").await;
    let made = s
        .create_webhook(&NewWebhook {
            tenant_id: t,
            name: "ci".into(),
            url: "https://receiver.example/hook".into(),
            secret: "whsec_x".into(),
            kinds: vec![],
        })
        .await
        .unwrap();
    let other = ctx.open_again().await;
    // Two replicas race for the lease: exactly one gets it.
    let (one, two) = tokio::join!(
        s.lease_webhooks("r1", 60_000),
        other.lease_webhooks("r2", 60_000)
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_eq!(one.len() + two.len(), 1, "{one:?} {two:?}");
    let (holder, loser, store_h, store_l): (&str, &str, &Arc<dyn Store>, &Arc<dyn Store>) =
        if one.len() == 1 {
            ("r1", "r2", s, &other)
        } else {
            ("r2", "r1", &other, s)
        };
    // The holder renews; the other still gets nothing.
    assert_eq!(
        store_h.lease_webhooks(holder, 60_000).await.unwrap().len(),
        1
    );
    assert!(
        store_l
            .lease_webhooks(loser, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    let attempt = |event_id, n, outcome, next| DeliveryAttempt {
        event_id,
        kind: EventKind::VmReady,
        attempt: n,
        started_at: 1,
        finished_at: 2,
        status: Some(500),
        error: None,
        outcome,
        next_retry_at: next,
    };
    // Only the holder records.
    assert!(
        !store_l
            .record_delivery(
                loser,
                &made.id,
                &attempt(1, 1, DeliveryOutcome::Delivered, None)
            )
            .await
            .unwrap()
    );
    assert!(
        store_h
            .record_delivery(
                holder,
                &made.id,
                &attempt(1, 1, DeliveryOutcome::Retrying, Some(99))
            )
            .await
            .unwrap()
    );
    let w = s.get_webhook(t, "ci").await.unwrap().unwrap();
    assert_eq!((w.cursor, w.attempts, w.next_attempt_at), (0, 1, 99));
    assert!(
        store_h
            .record_delivery(
                holder,
                &made.id,
                &attempt(1, 2, DeliveryOutcome::Delivered, None)
            )
            .await
            .unwrap()
    );
    let w = s.get_webhook(t, "ci").await.unwrap().unwrap();
    assert_eq!((w.cursor, w.attempts, w.next_attempt_at), (1, 0, 0));
    // Never backwards: event 1 again is refused.
    assert!(
        !store_h
            .record_delivery(
                holder,
                &made.id,
                &attempt(1, 1, DeliveryOutcome::Failed, None)
            )
            .await
            .unwrap()
    );
    let log = s.list_webhook_deliveries(&made.id, 0).await.unwrap();
    let seen: Vec<(i32, DeliveryOutcome)> = log
        .iter()
        .map(|d| (d.attempt.attempt, d.attempt.outcome))
        .collect();
    assert_eq!(
        seen,
        [
            (2, DeliveryOutcome::Delivered),
            (1, DeliveryOutcome::Retrying)
        ]
    );
    assert_eq!(log[1].attempt.next_retry_at, Some(99));
    // Released, the other replica takes it at once.
    store_h.release_webhooks(holder).await.unwrap();
    assert_eq!(
        store_l.lease_webhooks(loser, 60_000).await.unwrap().len(),
        1
    );
    // An expired lease is taken over too.
    store_l.release_webhooks(loser).await.unwrap();
    assert_eq!(store_l.lease_webhooks(loser, -1).await.unwrap().len(), 1);
    assert_eq!(
        store_h.lease_webhooks(holder, 60_000).await.unwrap().len(),
        1
    );
    // Deleting drops the log.
    assert!(
        store_h
            .record_delivery(
                holder,
                &made.id,
                &attempt(2, 1, DeliveryOutcome::Delivered, None)
            )
            .await
            .unwrap()
    );
    assert_eq!(
        s.list_webhook_deliveries(&made.id, 0).await.unwrap().len(),
        3
    );
    // Retention: attempts that finished before the window go (all
    // finished at 2 ms here).
    assert_eq!(s.prune_webhook_deliveries(2).await.unwrap(), 0);
    assert_eq!(s.prune_webhook_deliveries(3).await.unwrap(), 3);
    assert!(
        s.list_webhook_deliveries(&made.id, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store_h
            .record_delivery(
                holder,
                &made.id,
                &attempt(3, 1, DeliveryOutcome::Delivered, None)
            )
            .await
            .unwrap()
    );
    assert!(s.delete_webhook(t, "ci").await.unwrap());
    assert!(
        s.list_webhook_deliveries(&made.id, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------- pass status

both_backends!(reconcile_passes_are_kept_one_per_tenant);
async fn reconcile_passes_are_kept_one_per_tenant(ctx: Ctx) {
    let store = &ctx.store;
    let a = tenant(store, "pass-a").await;
    let b = tenant(store, "pass-b").await;
    assert_eq!(store.get_reconcile_pass(a).await.unwrap(), None);
    let pass = |tenant, replica: &str, iteration| hearth_store::ReconcilePassRecord {
        tenant_id: tenant,
        replica: replica.into(),
        iteration,
        started_at: 1_000 + iteration,
        status: json!({"iteration": iteration, "actions": {"boot": 2}}),
    };
    let before = store.change_token().await.unwrap();
    store.put_reconcile_pass(&pass(a, "r1", 3)).await.unwrap();
    assert_ne!(
        store.change_token().await.unwrap(),
        before,
        "keeping a pass is a write like any other"
    );
    store.put_reconcile_pass(&pass(b, "r1", 1)).await.unwrap();
    // A later pass (another replica's, after a takeover) replaces it.
    store.put_reconcile_pass(&pass(a, "r2", 7)).await.unwrap();
    assert_eq!(
        store.get_reconcile_pass(a).await.unwrap(),
        Some(pass(a, "r2", 7))
    );
    assert_eq!(
        store.get_reconcile_pass(b).await.unwrap(),
        Some(pass(b, "r1", 1))
    );
}

// ---- dashboard sessions (H4)

fn session_of(token: TokenId, csrf: &str, expires_at: i64) -> hearth_store::NewUiSession {
    hearth_store::NewUiSession {
        id_sha256: uuid::Uuid::new_v4().as_bytes().repeat(2),
        token,
        csrf_token: csrf.into(),
        expires_at,
    }
}

/// A session is found by its id's hash while it and its token live; it
/// ends on sign-out, on its own expiry, on its token's expiry and when its
/// identity (and so its token) is deleted.
async fn ui_sessions_follow_their_token(ctx: Ctx) {
    let s = &ctx.store;
    let acme = tenant(s, "acme").await;
    s.create_identity(acme, "bob", IdentityKind::Developer, Role::Viewer, None)
        .await
        .unwrap();
    let bob_token = token();
    s.create_token(acme, "bob", &bob_token, Role::Operator)
        .await
        .unwrap();
    let later = hearth_store::now_millis() + 3_600_000;

    let live = session_of(bob_token.id, "csrf-1", later);
    s.create_ui_session(&live).await.unwrap();
    let found = s.find_ui_session(&live.id_sha256).await.unwrap().unwrap();
    assert_eq!(found.csrf_token, "csrf-1");
    assert_eq!(found.expires_at, later);
    assert_eq!(found.token.id, bob_token.id);
    assert_eq!(found.token.identity.name, "bob");
    assert_eq!(found.token.identity.tenant_id, acme);
    // Another hash finds nothing.
    assert!(s.find_ui_session(&[7; 32]).await.unwrap().is_none());

    // An expired session is not honoured.
    let old = session_of(bob_token.id, "csrf-2", hearth_store::now_millis() - 1);
    s.create_ui_session(&old).await.unwrap();
    assert!(s.find_ui_session(&old.id_sha256).await.unwrap().is_none());

    // Sign-out ends it, once.
    assert!(s.delete_ui_session(&live.id_sha256).await.unwrap());
    assert!(s.find_ui_session(&live.id_sha256).await.unwrap().is_none());
    assert!(!s.delete_ui_session(&live.id_sha256).await.unwrap());

    // An unknown token opens no session.
    let err = s
        .create_ui_session(&session_of(TokenId::new(), "x", later))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    // A session never outlives its token's expiry.
    s.create_identity(acme, "eve", IdentityKind::Developer, Role::Viewer, None)
        .await
        .unwrap();
    let short = NewToken {
        expires_at: Some(hearth_store::now_millis() - 1),
        ..token()
    };
    s.create_token(acme, "eve", &short, Role::Operator)
        .await
        .unwrap();
    let eve = session_of(short.id, "csrf-3", later);
    s.create_ui_session(&eve).await.unwrap();
    assert!(s.find_ui_session(&eve.id_sha256).await.unwrap().is_none());

    // Deleting the identity deletes its token and so its sessions.
    let again = session_of(bob_token.id, "csrf-4", later);
    s.create_ui_session(&again).await.unwrap();
    assert!(s.find_ui_session(&again.id_sha256).await.unwrap().is_some());
    s.delete_identity(acme, "bob", Role::Operator)
        .await
        .unwrap();
    assert!(s.find_ui_session(&again.id_sha256).await.unwrap().is_none());
    assert!(!s.delete_ui_session(&again.id_sha256).await.unwrap());
}
both_backends!(ui_sessions_follow_their_token);
