//! What replicas share through the store: leads (one reconciler per
//! tenant), wakes, task owners, and the database's clock. The PostgreSQL
//! tests each create a database of their own on the server named by
//! `HEARTH_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and drop it afterwards;
//! they fail, never skip, when the server is unreachable.

use hearth_core::ids::{TenantId, TokenId, VmId};
use hearth_store::{NewToken, PgStore, SqliteStore, Store, VmRecord, VmState, clock};
use sqlx::{Connection, Executor, PgConnection};
use std::future::Future;
use std::time::Duration;

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("HEARTH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into())
}

/// Runs `test` with the URL of a fresh database, dropped afterwards (also
/// when the test panics).
async fn with_database<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin_url = admin_url();
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

async fn tenant(store: &dyn Store) -> TenantId {
    let token = NewToken {
        id: TokenId::new(),
        secret_sha256: vec![0; 32],
        expires_at: None,
    };
    let (tenant, _) = store
        .bootstrap(
            "default",
            "admin",
            &token,
            &serde_json::json!({"max_vms": 4}),
        )
        .await
        .unwrap()
        .unwrap();
    tenant.id
}

/// Waits (bounded, so a broken build fails instead of hanging) until
/// `done` answers true.
async fn until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..400 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up waiting: {what}");
}

#[tokio::test]
async fn a_tenant_has_one_leader_until_its_session_ends() {
    with_database(|url| async move {
        let a = PgStore::connect(&url).await.unwrap();
        let b = PgStore::connect(&url).await.unwrap();
        let t1 = tenant(&a).await;
        let t2 = TenantId::new(); // leads are keys, not rows: any id works

        let leads = a.lead(&[t1]).await.unwrap();
        assert_eq!(leads.led, [t1].into());
        assert!(leads.lost.is_empty());
        // B cannot take what A leads, but takes what no one does.
        let leads = b.lead(&[t1, t2]).await.unwrap();
        assert_eq!(leads.led, [t2].into());
        // Asking again keeps what is held, takes nothing more.
        assert_eq!(a.lead(&[t1, t2]).await.unwrap().led, [t1].into());
        assert_eq!(b.lead(&[t1, t2]).await.unwrap().led, [t2].into());

        // A's lock session ends (as when its process dies): B takes t1.
        let pid = a.lead_backend_pid().await.unwrap();
        let mut admin = PgConnection::connect(&url).await.unwrap();
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&mut admin)
            .await
            .unwrap();
        until("B leads t1", || async {
            b.lead(&[t1, t2]).await.unwrap().led.contains(&t1)
        })
        .await;
        // A learns it lost t1 and, on a new session, leads nothing.
        let leads = a.lead(&[t1, t2]).await.unwrap();
        assert_eq!(leads.lost, [t1].into());
        assert!(leads.led.is_empty(), "{leads:?}");
        assert_ne!(a.lead_backend_pid().await.unwrap(), pid);

        // Dropping every clone of B's store ends its session: A takes both.
        drop(b);
        until("A leads both", || async {
            a.lead(&[t1, t2]).await.unwrap().led == [t1, t2].into()
        })
        .await;
        admin.close().await.unwrap();
        a.close().await;
    })
    .await;
}

#[tokio::test]
async fn sqlite_leads_every_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("h.db")).await.unwrap();
    let t = tenant(&store).await;
    let leads = store.lead(&[t]).await.unwrap();
    assert_eq!(leads.led, [t].into());
    // And has no one to wake: the receiver is closed at once.
    store.notify_wake(Some(t)).await.unwrap();
    assert_eq!(store.wakes().recv().await, None);
}

#[tokio::test]
async fn wakes_reach_the_other_instances_never_the_sender() {
    with_database(|url| async move {
        let a = PgStore::connect(&url).await.unwrap();
        let b = PgStore::connect(&url).await.unwrap();
        let (t1, t2) = (TenantId::new(), TenantId::new());
        let mut wakes = a.wakes();
        // The first wake says the listener is (re)connected.
        assert_eq!(wakes.recv().await, Some(None));
        // A's own wake never comes back to A; B's does, naming its tenant.
        a.notify_wake(Some(t1)).await.unwrap();
        b.notify_wake(Some(t2)).await.unwrap();
        b.notify_wake(None).await.unwrap();
        assert_eq!(wakes.recv().await, Some(Some(t2)));
        assert_eq!(wakes.recv().await, Some(None));
        a.close().await;
        b.close().await;
    })
    .await;
}

async fn task_owner_is_compare_and_set(store: &dyn Store) {
    let t = tenant(store).await;
    let vm = VmRecord::booting(VmId::new(), t, "web", "fake", 1, 0);
    store.insert_vm(&vm).await.unwrap();
    assert!(
        store
            .set_vm_task_owner(vm.id, None, Some("a"))
            .await
            .unwrap()
    );
    // B cannot take A's task, nor clear it.
    assert!(
        !store
            .set_vm_task_owner(vm.id, None, Some("b"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_vm_task_owner(vm.id, Some("b"), None)
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_vm(vm.id).await.unwrap().task_owner.as_deref(),
        Some("a")
    );
    // A taker-over clears it naming the owner it saw; then B may own it.
    assert!(
        store
            .set_vm_task_owner(vm.id, Some("a"), None)
            .await
            .unwrap()
    );
    assert!(
        store
            .set_vm_task_owner(vm.id, None, Some("b"))
            .await
            .unwrap()
    );
    // A's late clear changes nothing.
    assert!(
        !store
            .set_vm_task_owner(vm.id, Some("a"), None)
            .await
            .unwrap()
    );
    let record = store.get_vm(vm.id).await.unwrap();
    assert_eq!(record.task_owner.as_deref(), Some("b"));
    assert_eq!(record.state, VmState::Booting, "nothing else changed");
}

#[tokio::test]
async fn task_owner_is_compare_and_set_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("h.db")).await.unwrap();
    task_owner_is_compare_and_set(&store).await;
}

#[tokio::test]
async fn task_owner_is_compare_and_set_postgres() {
    with_database(|url| async move {
        let store = PgStore::connect(&url).await.unwrap();
        task_owner_is_compare_and_set(&store).await;
        store.close().await;
    })
    .await;
}

/// The database's clock, in milliseconds, and the `updated_at` of a VM.
async fn database_now_and_updated_at(url: &str, vm: VmId) -> (i64, i64) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let row: (i64, i64) = sqlx::query_as(
        "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8, updated_at \
         FROM vms WHERE id = $1",
    )
    .bind(vm.to_string())
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    row
}

#[tokio::test]
async fn the_store_keeps_the_databases_time_when_this_hosts_clock_is_off() {
    with_database(|url| async move {
        // This host's clock runs an hour ahead of the database's.
        clock::skew_local_clock(3_600_000);
        let store = PgStore::connect(&url).await.unwrap();
        let offset = clock::offset_millis();
        assert!((offset + 3_600_000).abs() < 2_000, "offset {offset}");
        let t = tenant(&store).await;
        let vm = VmRecord::booting(VmId::new(), t, "web", "fake", 1, 0);
        store.insert_vm(&vm).await.unwrap();
        assert!(
            store
                .set_vm_state(vm.id, &[VmState::Booting], VmState::Idle, None)
                .await
                .unwrap()
        );
        // What the store wrote, and what deadlines compare it with, is the
        // database's time, not this host's.
        let (db_now, updated_at) = database_now_and_updated_at(&url, vm.id).await;
        assert!(
            (db_now - updated_at).abs() < 2_000,
            "db {db_now}, written {updated_at}"
        );
        assert!((hearth_store::now_millis() - db_now).abs() < 2_000);
        assert!((vm.created_at - db_now).abs() < 2_000);
        // The clock jumps back: the next measurement follows.
        clock::skew_local_clock(0);
        let offset = store.measure_clock().await.unwrap();
        assert!(offset.abs() < 2_000, "offset {offset}");
        let (db_now, _) = database_now_and_updated_at(&url, vm.id).await;
        assert!((hearth_store::now_millis() - db_now).abs() < 2_000);
        store.close().await;
    })
    .await;
}
