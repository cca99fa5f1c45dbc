//! `hearth-bench events`: the event log's cost, SQLite and PostgreSQL side
//! by side, in this process against the real stores:
//!
//! - **append throughput**: concurrent writers (one store instance each, as
//!   replicas would be on PostgreSQL) appending one event per transaction;
//!   events/s over the whole window;
//! - **claim cost**: a warm claim as the store runs it now
//!   (`Store::claim_idle_vm`: the claim statement and its `vm.assigned`
//!   event in one transaction) against the claim statement alone on the
//!   same database (`hearth_store::raw`, what the claim was before events),
//!   one claim at a time, p50/p99 each and their ratio;
//! - **delivery**: a follower reading by cursor exactly as the API's
//!   stream does (pages, polling every `STREAM_POLL` when idle) while the
//!   writers append: events/s delivered and lag (written → read) p50/p99.

use crate::stats::{Summary, millis};
use crate::table::{Table, fixed, summary_cells};
use anyhow::Result;
use hearth_core::ids::{AgentId, TenantId, VmId};
use hearth_store::{
    EventFilter, EventKind, NewEvent, NewToken, PgStore, SqliteStore, Store, VmRecord, VmState,
    now_millis,
};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The stream's idle poll (as `hearth_api::events::STREAM_POLL`).
const STREAM_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Concurrent writers.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Events each writer appends.
    #[arg(long, default_value_t = 250)]
    each: usize,
    /// Claims timed on each side.
    #[arg(long, default_value_t = 500)]
    claims: usize,
    /// Where the PostgreSQL half creates (and drops) its database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Where to write the figures (default `target/bench/events.json`).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Figures {
    store: &'static str,
    writers: usize,
    events: usize,
    append_per_s: f64,
    delivered_per_s: f64,
    lag_ms: Option<Summary>,
    claim_with_event_ms: Option<Summary>,
    claim_alone_ms: Option<Summary>,
    claim_ratio_p50: Option<f64>,
}

pub fn run(args: EventsArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let sqlite_path = dir.path().join("hearth.db");
    let mut all = Vec::new();
    eprintln!("[bench] events: SQLite");
    all.push(runtime.block_on(async {
        let open = || async {
            Ok::<Arc<dyn Store>, anyhow::Error>(Arc::new(SqliteStore::open(&sqlite_path).await?))
        };
        let raw = |store: &SqliteStore| store.write_pool().clone();
        let main = SqliteStore::open(&sqlite_path).await?;
        let pool = raw(&main);
        measure(&args, "sqlite", Arc::new(main), open, move |t, w, a| {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query(hearth_store::raw::SQLITE_CLAIM_IDLE_VM)
                    .bind(t.to_string())
                    .bind(w)
                    .bind(a.to_string())
                    .bind(now_millis())
                    .fetch_optional(&pool)
                    .await?;
                Ok(())
            })
        })
        .await
    })?);
    eprintln!("[bench] events: PostgreSQL");
    let db = crate::postgres::Database::create(&args.postgres_url)?;
    let url = db.url.clone();
    all.push(runtime.block_on(async {
        let open = || async {
            Ok::<Arc<dyn Store>, anyhow::Error>(Arc::new(PgStore::connect(&url).await?))
        };
        let main = PgStore::connect(&url).await?;
        let pool = main.pool().clone();
        measure(&args, "postgres", Arc::new(main), open, move |t, w, a| {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query(hearth_store::raw::POSTGRES_CLAIM_IDLE_VM)
                    .bind(t.to_string())
                    .bind(w)
                    .bind(a.to_string())
                    .bind(now_millis())
                    .fetch_optional(&pool)
                    .await?;
                Ok(())
            })
        })
        .await
    })?);
    drop(db);

    let mut t = Table::new([
        "store",
        "writers",
        "events",
        "appended/s",
        "delivered/s",
        "lag p50 ms",
        "lag p99 ms",
    ]);
    for f in &all {
        t.row([
            f.store.to_owned(),
            f.writers.to_string(),
            f.events.to_string(),
            fixed(f.append_per_s, 0),
            fixed(f.delivered_per_s, 0),
            f.lag_ms.map_or("-".into(), |s| fixed(s.p50, 1)),
            f.lag_ms.map_or("-".into(), |s| fixed(s.p99, 1)),
        ]);
    }
    println!("{}", t.render());
    let mut c = Table::new([
        "store, one claim at a time",
        "p50 ms",
        "p99 ms",
        "max ms",
        "n",
    ]);
    for f in &all {
        let mut with = vec![format!("{}: claim + vm.assigned (now)", f.store)];
        with.extend(summary_cells(f.claim_with_event_ms.as_ref(), 3));
        c.row(with);
        let mut alone = vec![format!("{}: claim statement alone (before)", f.store)];
        alone.extend(summary_cells(f.claim_alone_ms.as_ref(), 3));
        c.row(alone);
    }
    println!("{}", c.render());
    for f in &all {
        if let Some(r) = f.claim_ratio_p50 {
            println!(
                "{}: claim with its event ÷ claim alone (p50) = {r:.2}",
                f.store
            );
        }
    }
    let path = crate::report::json_path(args.json.as_deref(), "events");
    crate::report::write_json(&path, &all)?;
    eprintln!("[bench] wrote {}", path.display());
    Ok(())
}

type RawClaim = Box<
    dyn Fn(
            TenantId,
            &'static str,
            AgentId,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>
        + Send
        + Sync,
>;

async fn measure<O, F>(
    args: &EventsArgs,
    name: &'static str,
    store: Arc<dyn Store>,
    open: O,
    raw_claim: impl Fn(
        TenantId,
        &'static str,
        AgentId,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>
    + Send
    + Sync
    + 'static,
) -> Result<Figures>
where
    O: Fn() -> F,
    F: std::future::Future<Output = Result<Arc<dyn Store>>>,
{
    let raw_claim: RawClaim = Box::new(raw_claim);
    let token = NewToken {
        id: hearth_core::ids::TokenId::new(),
        secret_sha256: vec![7; 32],
        expires_at: None,
    };
    let pool_config = serde_json::json!({"max_vms": 100000});
    let (tenant, _) = store
        .create_tenant("bench", "admin", &token, &pool_config)
        .await?;
    let tenant = tenant.id;

    // Delivery and append throughput in one window.
    let total = args.writers * args.each;
    let follower = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut lags = Vec::with_capacity(total);
            let mut after = None;
            let start = Instant::now();
            let deadline = start + Duration::from_secs(300);
            while lags.len() < total && Instant::now() < deadline {
                let page = store
                    .list_events(
                        tenant,
                        &EventFilter {
                            after,
                            kinds: vec![],
                            limit: 200,
                        },
                    )
                    .await?;
                if page.is_empty() {
                    tokio::time::sleep(STREAM_POLL).await;
                    continue;
                }
                let now = now_millis();
                for e in &page {
                    lags.push((now - e.at) as f64);
                }
                after = page.last().map(|e| e.id);
            }
            anyhow::Ok((lags, start.elapsed()))
        })
    };
    let mut writers = Vec::new();
    let started = Instant::now();
    for w in 0..args.writers {
        let store = open().await?;
        let each = args.each;
        writers.push(tokio::spawn(async move {
            for i in 0..each {
                let event = NewEvent::new(
                    EventKind::PoolUp,
                    "pool/default",
                    serde_json::json!({"writer": w, "i": i}),
                );
                store.append_events(tenant, &[event]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let append_window = started.elapsed();
    let (lags, delivered_in) = follower.await??;
    let lag_ms = Summary::of(&lags);

    // Claim cost, one claim at a time, both sides on the same database.
    let mut with_event = Vec::with_capacity(args.claims);
    let mut alone = Vec::with_capacity(args.claims);
    for side in 0..2 {
        for _ in 0..args.claims {
            let mut vm = VmRecord::booting(VmId::new(), tenant, "web", "fake", 1, 1);
            vm.state = VmState::Idle;
            store.insert_vm(&vm).await?;
        }
        for _ in 0..args.claims {
            let agent = AgentId::new();
            let t0 = Instant::now();
            if side == 0 {
                store.claim_idle_vm(tenant, "web", agent).await?;
                with_event.push(millis(t0.elapsed()));
            } else {
                raw_claim(tenant, "web", agent).await?;
                alone.push(millis(t0.elapsed()));
            }
        }
    }
    let claim_with_event_ms = Summary::of(&with_event);
    let claim_alone_ms = Summary::of(&alone);
    let claim_ratio_p50 = claim_with_event_ms
        .zip(claim_alone_ms)
        .map(|(w, a)| w.p50 / a.p50);
    Ok(Figures {
        store: name,
        writers: args.writers,
        events: total,
        append_per_s: total as f64 / append_window.as_secs_f64(),
        delivered_per_s: lags.len() as f64 / delivered_in.as_secs_f64(),
        lag_ms,
        claim_with_event_ms,
        claim_alone_ms,
        claim_ratio_p50,
    })
}
