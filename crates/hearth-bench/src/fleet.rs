//! `fleet`: the pool over a simulated fleet, in this process: N fake nodes
//! (a fake driver each, boot latency 0) joined in a real store (SQLite
//! file, or a PostgreSQL database created and dropped), one tenant whose
//! workspaces keep `--vms` warm between them, the real runner placing
//! every boot ([`hearth_reconcilers::placement::choose`]).
//!
//! Measured: the cost of a placement alone (`choose` over the fleet's
//! nodes and usage as read from the store), of a whole placed insert
//! (`choose` + `insert_vm_within_cap` with the node's room check), the
//! time to fill the fleet to `--vms` warm VMs, and the backfill after a
//! node loss: one node stops reporting; from the moment it times out to
//! the moment its idle VMs are warm again on the others.
//!
//! [`sim_pool`] builds a pool over a simulated fleet on any store: the hook
//! for measuring a failover between replicas on one database.

use crate::machine::Machine;
use crate::postgres::Database;
use crate::report;
use crate::server::Store as StoreKind;
use crate::stats::Summary;
use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use hearth_core::ids::{NodeId, TenantId, TokenId, VmId};
use hearth_core::resource::{DriverKind, Kind, ResourceRef};
use hearth_drivers::fake::{FakeConfig, FakeDriver};
use hearth_drivers::{Driver, DriverError, Fleet};
use hearth_reconcilers::placement;
use hearth_reconcilers::{FleetTimings, Pool, PoolOptions};
use hearth_store::{
    NewToken, NodeCapacity, NodeRecord, NodeState, PgStore, Precondition, PutResource, SqliteStore,
    Store, VmRecord, VmState, now_millis,
};
use serde::Serialize;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// Fake nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Warm VMs asked (the sum of the workspaces' min_idle).
    #[arg(long, default_value_t = 10_000)]
    vms: usize,
    /// Workspaces sharing them.
    #[arg(long, default_value_t = 10)]
    workspaces: usize,
    /// Placements timed alone, and placed inserts timed.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// The store backends, run one after the other.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sqlite,postgres"
    )]
    store: Vec<StoreKind>,
    /// Where `--store postgres` creates (and drops) its database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Where to write the JSON results (default: target/bench/fleet.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Fake nodes by id: every VM's driver is its node's.
#[derive(Debug, Default)]
pub struct SimFleet {
    pub nodes: HashMap<NodeId, Arc<FakeDriver>>,
}

#[async_trait]
impl Fleet for SimFleet {
    async fn driver(
        &self,
        node: Option<NodeId>,
        _kind: DriverKind,
    ) -> hearth_drivers::Result<Arc<dyn Driver>> {
        let node = node.ok_or_else(|| DriverError::Unsupported("a VM with no node".into()))?;
        match self.nodes.get(&node) {
            Some(driver) => Ok(driver.clone()),
            None => Err(DriverError::Unsupported(format!("no node {node}"))),
        }
    }
}

/// The fleet's timings of the simulation (short, so a loss is measured in
/// seconds).
pub fn sim_timings() -> FleetTimings {
    FleetTimings {
        heartbeat: Duration::from_millis(500),
        node_timeout: Duration::from_secs(2),
        lost_after: Duration::from_secs(30),
    }
}

/// A pool over `fleet` on `store`, as the simulation runs it (one per
/// replica when several share a database).
pub fn sim_pool(store: Arc<dyn Store>, fleet: Arc<SimFleet>, vms: usize) -> Arc<Pool> {
    let mut options = PoolOptions {
        fleet: sim_timings(),
        ..Default::default()
    };
    // Every node may boot 4 at once: the tenant's bound is the fleet's.
    options.settings.max_concurrent_boots = (fleet.nodes.len() * 4).max(8);
    options.settings.boot_timeout_ms = 10 * 60 * 1000;
    let _ = vms;
    Pool::with_fleet(store, fleet, options)
}

/// Joins `n` fake nodes with room for `per_node` VMs each.
pub async fn join_nodes(store: &dyn Store, n: usize, per_node: i64) -> Result<Vec<NodeRecord>> {
    let mut nodes = Vec::new();
    for i in 0..n {
        let now = now_millis();
        nodes.push(
            store
                .join_node(&NodeRecord {
                    id: NodeId::new(),
                    name: format!("sim-{i:03}"),
                    address: format!("https://10.0.{}.{}:7071", i / 250, i % 250 + 1),
                    ca_pem: String::new(),
                    credential_hash: String::new(),
                    state: NodeState::Ready,
                    capacity: NodeCapacity {
                        drivers: vec!["fake".into()],
                        cpus: per_node * 2,
                        memory_mib: per_node * 1024,
                        disk_mib: 0,
                        vm_slots: per_node,
                        max_boots: 4,
                    },
                    joined_at: now,
                    last_heartbeat: now,
                    updated_at: now,
                })
                .await?,
        );
    }
    Ok(nodes)
}

#[derive(Debug, Serialize)]
struct FleetReport {
    benchmark: &'static str,
    machine: Machine,
    nodes: usize,
    vms: usize,
    workspaces: usize,
    runs: Vec<Run>,
}

#[derive(Debug, Serialize)]
struct Run {
    store: String,
    /// `placement::choose` alone, microseconds.
    choose_us: Summary,
    /// `choose` + `insert_vm_within_cap` (the room check), milliseconds.
    placed_insert_ms: Summary,
    /// From the pool's start to `vms` warm, seconds.
    fill_s: f64,
    /// VMs the lost node ran, and their backfill time after its timeout.
    lost_vms: usize,
    backfill_ms: f64,
    /// Warm VMs per node after the fill: min and max.
    per_node_min: i64,
    per_node_max: i64,
    /// PostgreSQL: the leader's death with every VM warm.
    failover: Option<Failover>,
}

#[derive(Debug, Serialize)]
struct Failover {
    /// A's session ended → B leads the tenant (ms).
    lead_ms: f64,
    /// → B's first pass of the tenant done (ms).
    first_pass_ms: f64,
}

pub fn run(args: FleetArgs) -> Result<()> {
    if args.workspaces == 0 || args.vms < args.workspaces || args.nodes < 2 {
        bail!("--vms must be at least --workspaces (> 0), and --nodes at least 2");
    }
    let machine = Machine::probe();
    eprintln!("[fleet] machine: {}", machine.describe());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for &kind in &args.store {
        let database = match kind {
            StoreKind::Postgres => Some(Database::create(&args.postgres_url)?),
            StoreKind::Sqlite => None,
        };
        let dir = tempfile::tempdir()?;
        let result = runtime.block_on(async {
            let store: Arc<dyn Store> = match &database {
                Some(db) => Arc::new(PgStore::connect(&db.url).await?),
                None => Arc::new(SqliteStore::open(&dir.path().join("hearth.db")).await?),
            };
            measure(
                &args,
                kind,
                store,
                database.as_ref().map(|db| db.url.as_str()),
            )
            .await
        });
        drop(database);
        runs.push(result?);
    }
    let report = FleetReport {
        benchmark: "fleet",
        machine,
        nodes: args.nodes,
        vms: args.vms,
        workspaces: args.workspaces,
        runs,
    };
    print!("{}", render(&report));
    report::write_json(&report::json_path(args.json.as_deref(), "fleet"), &report)
}

async fn put(
    store: &dyn Store,
    tenant: TenantId,
    kind: Kind,
    name: &str,
    spec: serde_json::Value,
) -> Result<()> {
    let env = [ResourceRef {
        kind: Kind::Environment,
        name: "sim".into(),
    }];
    let refs: &[ResourceRef] = if kind == Kind::Workspace { &env } else { &[] };
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
        .await?;
    Ok(())
}

/// `postgres`: the database's URL, where a second replica joins for the
/// failover measure.
async fn measure(
    args: &FleetArgs,
    kind: StoreKind,
    store: Arc<dyn Store>,
    postgres: Option<&str>,
) -> Result<Run> {
    let name = format!("{kind:?}").to_lowercase();
    eprintln!("[fleet] {name}: {} nodes, {} VMs", args.nodes, args.vms);
    let token = NewToken {
        id: TokenId::new(),
        secret_sha256: vec![0; 32],
        expires_at: None,
    };
    let max_vms = args.vms * 2;
    let (tenant, _) = store
        .bootstrap("sim", "admin", &token, &json!({"max_vms": max_vms}))
        .await?
        .context("the store was not empty")?;
    let t = tenant.id;
    put(store.as_ref(), t, Kind::PoolConfig, "default", json!({"max_vms": max_vms, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"})).await?;
    put(
        store.as_ref(),
        t,
        Kind::Environment,
        "sim",
        json!({"driver": "fake"}),
    )
    .await?;
    let per_ws = args.vms / args.workspaces;
    for w in 0..args.workspaces {
        // The first workspace takes what does not divide evenly.
        let min_idle = per_ws
            + if w == 0 {
                args.vms % args.workspaces
            } else {
                0
            };
        put(
            store.as_ref(),
            t,
            Kind::Workspace,
            &format!("ws-{w:03}"),
            json!({"environment": "sim", "min_idle": min_idle, "max_idle": min_idle}),
        )
        .await?;
    }
    // Room for twice the even share: a loss fits on the others.
    let per_node = (2 * args.vms).div_ceil(args.nodes) as i64;
    let nodes = join_nodes(store.as_ref(), args.nodes, per_node).await?;
    let fleet = Arc::new(SimFleet {
        nodes: nodes
            .iter()
            .map(|n| {
                let fake = FakeDriver::new(FakeConfig {
                    boot_latency: Duration::ZERO,
                    ..FakeConfig::default()
                });
                (n.id, Arc::new(fake))
            })
            .collect(),
    });
    let pool = sim_pool(store.clone(), fleet.clone(), args.vms);
    store.name_replica(&pool.options().replica);

    // The nodes report until the end, but for those made silent.
    let silent: Arc<Mutex<HashSet<NodeId>>> = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let heartbeats = {
        let (store, silent, nodes, pool) =
            (store.clone(), silent.clone(), nodes.clone(), pool.clone());
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            loop {
                for node in &nodes {
                    if !silent.lock().unwrap().contains(&node.id) {
                        let _ = store.node_heartbeat(node.id, &node.capacity).await;
                    }
                }
                pool.wake();
                tokio::select! {
                    _ = tokio::time::sleep(sim_timings().heartbeat) => {}
                    _ = stopped.changed() => break,
                }
            }
        })
    };
    let started = Instant::now();
    let (stop_a, stopped_a) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(pool.clone().run(stopped_a));
    let warm = |store: Arc<dyn Store>| async move {
        let vms = store.list_vms(t, false).await?;
        anyhow::Ok(vms)
    };
    loop {
        let vms = warm(store.clone()).await?;
        let idle = vms.iter().filter(|v| v.state == VmState::Idle).count();
        if idle >= args.vms {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("not filled after 30 minutes: {idle} of {} warm", args.vms);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fill_s = started.elapsed().as_secs_f64();
    eprintln!("[fleet] {name}: filled in {fill_s:.1} s");
    let vms = warm(store.clone()).await?;
    let mut per_node: HashMap<NodeId, i64> = nodes.iter().map(|n| (n.id, 0)).collect();
    for v in &vms {
        if let Some(n) = v.node_id {
            *per_node.entry(n).or_default() += 1;
        }
    }
    let per_node_min = per_node.values().copied().min().unwrap_or(0);
    let per_node_max = per_node.values().copied().max().unwrap_or(0);

    // A node is lost: from its timeout to its VMs warm elsewhere.
    let (&victim, &lost_vms) = per_node.iter().max_by_key(|(_, n)| **n).unwrap();
    silent.lock().unwrap().insert(victim);
    let last = store.get_node(victim).await?.last_heartbeat;
    let timeout_at = last + sim_timings().node_timeout.as_millis() as i64;
    let backfill_ms = loop {
        let vms = warm(store.clone()).await?;
        let elsewhere = vms
            .iter()
            .filter(|v| v.state == VmState::Idle && v.node_id != Some(victim))
            .count();
        if elsewhere >= args.vms {
            break (now_millis() - timeout_at) as f64;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "[fleet] {name}: {lost_vms} VMs of a lost node back in {backfill_ms:.0} ms after its timeout"
    );
    // The leading replica dies with 10,000 VMs in its tenant: a second
    // replica (its own store instance, the same fleet) follows; A stops and
    // PostgreSQL ends its lead session, as with a kill -9; timed until B
    // leads, and until B's first pass (the takeover and a read of every VM).
    let failover = match postgres {
        Some(url) => {
            let b_store: Arc<dyn Store> = Arc::new(PgStore::connect(url).await?);
            let b = sim_pool(b_store.clone(), fleet.clone(), args.vms);
            b_store.name_replica(&b.options().replica);
            let (stop_b, stopped_b) = tokio::sync::watch::channel(false);
            let runner_b = tokio::spawn(b.clone().run(stopped_b));
            // B settles into its retry rhythm, never leading meanwhile.
            tokio::time::sleep(Duration::from_secs(2)).await;
            if b.leads().contains(&t) || !pool.leads().contains(&t) {
                bail!("A should lead and B follow");
            }
            let _ = stop_a.send(true);
            let _ = runner.await;
            let died = Instant::now();
            end_lead_session(url, &pool.options().replica).await?;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !b.leads().contains(&t) {
                if Instant::now() > deadline {
                    bail!("B never led");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let lead_ms = died.elapsed().as_secs_f64() * 1e3;
            while b.passes(t) == 0 {
                if Instant::now() > deadline {
                    bail!("B never passed");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let first_pass_ms = died.elapsed().as_secs_f64() * 1e3;
            eprintln!(
                "[fleet] {name}: failover: B leads {lead_ms:.0} ms, first pass {first_pass_ms:.0} ms after A's session ended"
            );
            let _ = stop_b.send(true);
            let _ = runner_b.await;
            Some(Failover {
                lead_ms,
                first_pass_ms,
            })
        }
        None => {
            let _ = stop_a.send(true);
            let _ = runner.await;
            None
        }
    };
    let _ = stop.send(true);
    let _ = heartbeats.await;

    // Placement alone, over the fleet as it is now.
    let listed = store.list_nodes().await?;
    let usage: HashMap<NodeId, _> = store
        .node_usage()
        .await?
        .into_iter()
        .filter_map(|u| u.node.map(|n| (n, u)))
        .collect();
    let none = HashSet::new();
    // The clock of the nodes' last reports (they stopped with the pool):
    // every node but the lost one reachable, however long this takes.
    let reported = listed.iter().map(|n| n.last_heartbeat).max().unwrap_or(0);
    let need = placement::Need {
        driver: "fake",
        cpus: 1,
        memory_mib: 512,
        now: reported,
        node_timeout_ms: sim_timings().node_timeout.as_millis() as i64,
        exclude: &none,
    };
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(7);
    let mut choose_us = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let at = Instant::now();
        let chosen = placement::choose(&listed, &usage, &need, &mut rng);
        choose_us.push(at.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(chosen);
    }
    // Placed inserts (a workspace of their own, the pool stopped).
    let mut usage = usage;
    let mut inserts = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let at = Instant::now();
        let mut vm = VmRecord::booting(VmId::new(), t, "placed", "fake", 1, 0);
        vm.cpus = 1;
        vm.memory_mib = 512;
        let Some(node) = placement::choose(&listed, &usage, &need, &mut rng) else {
            bail!("the fleet is full");
        };
        vm.node_id = Some(node);
        let inserted = store.insert_vm_within_cap(&vm, i64::MAX).await?;
        inserts.push(at.elapsed());
        if inserted == hearth_store::InsertVm::Inserted {
            placement::record(&mut usage, node, 1, 512);
            // Done booting at once: boots in flight do not bind here.
            store
                .set_vm_state(vm.id, &[VmState::Booting], VmState::Idle, None)
                .await?;
            if let Some(u) = usage.get_mut(&node) {
                u.booting -= 1;
            }
        }
    }
    Ok(Run {
        store: name,
        choose_us: Summary::of(&choose_us).context("no samples")?,
        placed_insert_ms: Summary::of_durations(&inserts).context("no samples")?,
        fill_s,
        lost_vms: lost_vms as usize,
        backfill_ms,
        per_node_min,
        per_node_max,
        failover,
    })
}

/// Ends replica `replica`'s lead session from the database's side (what
/// its death does: PostgreSQL frees the advisory locks with the session).
async fn end_lead_session(url: &str, replica: &str) -> Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = $1",
    )
    .bind(format!("hearth-lead {replica}"))
    .fetch_all(&mut conn)
    .await?;
    if !ended.iter().any(|e| *e) {
        bail!("no lead session of {replica} to end");
    }
    Ok(())
}

fn render(report: &FleetReport) -> String {
    let mut out = format!(
        "## fleet: {} nodes, {} VMs, {} workspaces\n\n| store | choose p50 / p99 (µs) | placed insert p50 / p99 (ms) | fill (s) | VMs per node (min–max) | lost node's VMs | backfill after its timeout (ms) | failover: leads / first pass (ms) |\n|---|---|---|---|---|---|---|---|\n",
        report.nodes, report.vms, report.workspaces
    );
    for r in &report.runs {
        out.push_str(&format!(
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} | {}–{} | {} | {:.0} | {} |\n",
            r.store,
            r.choose_us.p50,
            r.choose_us.p99,
            r.placed_insert_ms.p50,
            r.placed_insert_ms.p99,
            r.fill_s,
            r.per_node_min,
            r.per_node_max,
            r.lost_vms,
            r.backfill_ms,
            r.failover.as_ref().map_or("–".to_owned(), |f| format!(
                "{:.0} / {:.0}",
                f.lead_ms, f.first_pass_ms
            ))
        ));
    }
    out
}
