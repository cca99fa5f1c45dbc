//! The store's test suite, run unchanged against both backends.
//!
//! Each test is written once, as an async fn taking a [`Ctx`] (the store,
//! plus a way to open a second store on the same database), and
//! `both_backends!` turns it into `<test>::sqlite` (a fresh file in a temp
//! directory) and `<test>::postgres` (a fresh database on the server named
//! by `HEARTH_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, dropped afterwards). The
//! PostgreSQL half fails, never skips, when the server is unreachable.

use hearth_core::ids::{AgentId, TenantId, TokenId, VmId};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::{Kind, ResourceRef};
use hearth_store::{
    NewToken, PgStore, Precondition, PutOutcome, PutResource, SqliteStore, Store, StoreError,
    VmRecord, VmState, now_millis,
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
        .create_tenant(name, "admin", &token())
        .await
        .unwrap()
        .0
        .id
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
            tenant,
            kind,
            name,
            spec,
            references: &[],
            precondition: Precondition::Version(version),
        })
        .await
}

fn vm(tenant: TenantId, workspace: &str, state: VmState, created_at: i64) -> VmRecord {
    VmRecord {
        id: VmId::new(),
        tenant_id: tenant,
        workspace: workspace.to_owned(),
        state,
        agent_id: None,
        created_at,
        updated_at: created_at,
    }
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
        .bootstrap("default", "root", &first)
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
        s.bootstrap("other", "root2", &second)
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

both_backends!(bootstrap_skips_when_any_tenant_exists);
async fn bootstrap_skips_when_any_tenant_exists(ctx: Ctx) {
    let s = &ctx.store;
    s.create_tenant("acme", "alice", &token()).await.unwrap();
    assert!(
        s.bootstrap("default", "root", &token())
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
                .bootstrap(&format!("tenant-{i}"), "root", &token())
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
    let (acme, alice) = s.create_tenant("acme", "alice", &acme_token).await.unwrap();
    assert_eq!(alice.role, Role::Admin);
    assert_eq!(alice.kind, IdentityKind::Developer);
    assert_eq!(alice.tenant_id, acme.id);

    let dup_token = token();
    let err = s
        .create_tenant("acme", "bob", &dup_token)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists(m) if m == "tenant \"acme\""),
        "{err:?}"
    );
    assert!(s.find_token(dup_token.id).await.unwrap().is_none());

    // A token id already taken fails the whole tenant creation.
    let err = s
        .create_tenant("beta", "bob", &acme_token)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");

    s.create_tenant("zeta", "z", &token()).await.unwrap();
    s.create_tenant("alpha", "a", &token()).await.unwrap();
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
    s.create_token(acme, "bob", &bob_token).await.unwrap();
    assert_eq!(
        s.find_token(bob_token.id).await.unwrap().unwrap().identity,
        bob
    );
    let err = s.create_token(acme, "nobody", &token()).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "identity \"nobody\""),
        "{err:?}"
    );
    let err = s.create_token(other, "ci-bot", &token()).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = s.create_token(acme, "bob", &bob_token).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");

    // Deleting an identity takes its tokens along.
    s.delete_identity(acme, "ci-bot").await.unwrap();
    assert!(s.find_token(bot_token.id).await.unwrap().is_none());
    assert!(matches!(
        s.get_identity(acme, "ci-bot").await,
        Err(StoreError::NotFound(_))
    ));
    let err = s.delete_identity(acme, "ci-bot").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m == "identity \"ci-bot\""),
        "{err:?}"
    );
    // … and only from its own tenant.
    assert!(matches!(s.delete_identity(other, "admin").await, Ok(())));
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
    s.create_token(acme, "bot", &forever).await.unwrap();

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
        .delete_resource(b, Kind::Workspace, "web")
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
    s.delete_resource(b, Kind::Workspace, "web").await.unwrap();
    assert!(
        s.get_resource(a, Kind::Workspace, "web")
            .await
            .unwrap()
            .is_some()
    );

    // VMs too.
    s.insert_vm(&vm(a, "web", VmState::Idle, 1)).await.unwrap();
    assert!(s.list_vms(b).await.unwrap().is_empty());
    assert!(
        s.claim_idle_vm(b, "web", AgentId::new())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.list_vms(a).await.unwrap()[0].state, VmState::Idle);
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

    let err = s.delete_resource(t, Kind::Image, "base").await.unwrap_err();
    assert_in_use(err, Kind::Image, "base", Kind::Environment, "dev");
    let err = s
        .delete_resource(t, Kind::Environment, "dev")
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
    let err = s.delete_resource(t, Kind::Image, "base").await.unwrap_err();
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
    let deleted = s.delete_resource(t, Kind::Image, "base").await.unwrap();
    assert_eq!((deleted.kind, deleted.name.as_str()), (Kind::Image, "base"));
    assert_eq!(deleted.spec, json!({"tag": "base"}));
    assert!(
        s.get_resource(t, Kind::Image, "base")
            .await
            .unwrap()
            .is_none()
    );
    let err = s.delete_resource(t, Kind::Image, "slim").await.unwrap_err();
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
    s.delete_resource(t, Kind::Image, "slim").await.unwrap();

    // Deleting a referrer releases its targets.
    s.delete_resource(t, Kind::Workspace, "web").await.unwrap();
    s.delete_resource(t, Kind::Environment, "dev")
        .await
        .unwrap();
    let err = s
        .delete_resource(t, Kind::Environment, "dev")
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
        .create_tenant("acme", "alice", &t_token)
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
    assert_eq!(s.list_vms(acme.id).await.unwrap(), vec![machine.clone()]);
    let err = s
        .delete_resource(acme.id, Kind::Image, "base")
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
        .list_vms(t)
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
        .list_vms(t)
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
    assert!(
        s.claim_idle_vm(t, "web", AgentId::new())
            .await
            .unwrap()
            .is_some()
    );
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
        .list_vms(a)
        .await
        .unwrap()
        .into_iter()
        .chain(s.list_vms(b).await.unwrap())
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
