//! `hearth-bench failover`: how long a tenant goes unreconciled when its
//! leading replica dies. Per round: a fresh PostgreSQL database, two pools
//! (two store instances, the real runner, one fake driver between them) —
//! A leads the tenant and keeps its pool warm, B follows; A dies (its
//! runtime dropped at once, as a kill -9 would: its sessions end with its
//! sockets, its advisory locks with them); the figure is the time from
//! A's death until B's first pass of the tenant (its lead taken and the
//! takeover done), and until B leads, per round, median over the rounds.

use crate::postgres::Database;
use crate::stats::{Summary, millis};
use crate::table::{Table, summary_cells};
use anyhow::{Context, Result, bail};
use hearth_core::ids::{TenantId, TokenId};
use hearth_core::resource::{Kind, ResourceRef};
use hearth_drivers::Drivers;
use hearth_drivers::fake::{FakeConfig, FakeDriver};
use hearth_reconcilers::{Pool, PoolOptions};
use hearth_store::{NewToken, PgStore, Precondition, PutResource, Store, VmState};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// Rounds (each on a database of its own).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Where each round creates (and drops) its database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Where to write the JSON results (default: target/bench/failover.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, serde::Serialize)]
struct Round {
    /// A's death → B leads the tenant (ms).
    lead_ms: f64,
    /// A's death → B's first pass of the tenant (ms).
    first_pass_ms: f64,
}

pub fn run(args: FailoverArgs) -> Result<()> {
    let mut rounds = Vec::with_capacity(args.rounds);
    for i in 0..args.rounds {
        let db = Database::create(&args.postgres_url)?;
        let round = tokio::runtime::Runtime::new()?.block_on(one_round(&db.url))?;
        eprintln!(
            "[bench] failover round {}/{}: lead {:.0} ms, first pass {:.0} ms",
            i + 1,
            args.rounds,
            round.lead_ms,
            round.first_pass_ms
        );
        rounds.push(round);
    }
    let lead = Summary::of(&rounds.iter().map(|r| r.lead_ms).collect::<Vec<_>>());
    let pass = Summary::of(&rounds.iter().map(|r| r.first_pass_ms).collect::<Vec<_>>());
    let mut table = Table::new(["from the leader's death", "p50 ms", "p99 ms", "max ms", "n"]);
    let mut row = |name: &str, s: Option<&Summary>| {
        let mut cells = vec![name.to_owned()];
        cells.extend(summary_cells(s, 0));
        table.row(cells);
    };
    row("the other replica leads", lead.as_ref());
    row("its first pass of the tenant", pass.as_ref());
    println!(
        "## Failover (two replicas, one PostgreSQL)\n\n{}",
        table.render()
    );
    let path = crate::report::json_path(args.json.as_deref(), "failover");
    crate::report::write_json(&path, &json!({"rounds": rounds}))?;
    Ok(())
}

fn options(replica: &str) -> PoolOptions {
    PoolOptions {
        replica: replica.into(),
        ..PoolOptions::default()
    }
}

async fn start(
    url: &str,
    name: &str,
    fake: &Arc<FakeDriver>,
) -> Result<(Arc<Pool>, watch::Sender<bool>)> {
    let store: Arc<dyn Store> = Arc::new(PgStore::connect(url).await?);
    let pool = Pool::new(store, Drivers::new().with(fake.clone()), options(name));
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(pool.clone().run(stop_rx));
    Ok((pool, stop))
}

async fn setup(store: &dyn Store) -> Result<TenantId> {
    let token = NewToken {
        id: TokenId::new(),
        secret_sha256: vec![0; 32],
        expires_at: None,
    };
    let (tenant, _) = store
        .bootstrap("default", "admin", &token, &json!({"max_vms": 4}))
        .await?
        .context("the database was not empty")?;
    let env = [ResourceRef {
        kind: Kind::Environment,
        name: "dev".into(),
    }];
    for (kind, name, spec, refs) in [
        (
            Kind::PoolConfig,
            "default",
            json!({"max_vms": 4, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"}),
            &[][..],
        ),
        (Kind::Environment, "dev", json!({"driver": "fake"}), &[][..]),
        (
            Kind::Workspace,
            "web",
            json!({"environment": "dev", "min_idle": 2, "max_idle": 2}),
            &env[..],
        ),
    ] {
        store
            .put_resource(PutResource {
                actor: None,
                tenant: tenant.id,
                kind,
                name,
                spec: &spec,
                references: refs,
                precondition: Precondition::None,
            })
            .await?;
    }
    Ok(tenant.id)
}

/// Polls `done` every millisecond, for at most a minute.
async fn until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        if Instant::now() > deadline {
            bail!("gave up waiting: {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

async fn one_round(url: &str) -> Result<Round> {
    let fake = Arc::new(FakeDriver::new(FakeConfig::default()));
    // A in a runtime of its own, so that it can die at once.
    let runtime_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (a, tenant) = {
        let (url, fake) = (url.to_owned(), fake.clone());
        runtime_a
            .spawn(async move {
                let (pool, stop) = start(&url, "replica-a", &fake).await?;
                let tenant = setup(pool.store().as_ref()).await?;
                pool.wake();
                std::mem::forget(stop); // A stops by dying
                anyhow::Ok((Arc::downgrade(&pool), tenant))
            })
            .await??
    };
    let (b, stop_b) = start(url, "replica-b", &fake).await?;
    let store = b.store();
    until("A leads", || {
        a.upgrade().is_some_and(|a| a.leads().contains(&tenant))
    })
    .await?;
    loop {
        let idle = store.list_vms(tenant, false).await?;
        if idle.iter().filter(|v| v.state == VmState::Idle).count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let B settle into its retry rhythm (a death lands anywhere in it).
    tokio::time::sleep(Duration::from_millis(750)).await;
    if b.passes(tenant) != 0 {
        bail!("B reconciled a tenant A leads");
    }
    let died = Instant::now();
    runtime_a.shutdown_background();
    until("B leads", || b.leads().contains(&tenant)).await?;
    let lead = died.elapsed();
    until("B passes", || b.passes(tenant) > 0).await?;
    let first_pass = died.elapsed();
    let _ = stop_b.send(true);
    Ok(Round {
        lead_ms: millis(lead),
        first_pass_ms: millis(first_pass),
    })
}
