//! `hearth-bench throughput`: sustained warm-claim throughput of the control
//! plane against the raw store doing the same claims, side by side in one
//! run, on the same database.
//!
//! - **hearth** (what a client sees): the real server, an environment with
//!   `driver: fake` (so only the control plane is measured), workspace
//!   `tput` with `min_idle = max_idle = P` (P = `--spawns`, the claims of
//!   one round, so the pool never runs dry) and `max_vms = 2P + 64` (the
//!   backfill is never capped). Once P VMs are idle and nothing else
//!   happens in the pool, C client tasks (one keep-alive connection each,
//!   opened by an untimed request, all on one current-thread tokio runtime
//!   so the load generator costs little CPU) are released together and
//!   send `POST /v1/agents` back to back, taking tickets from one counter
//!   until P spawns are sent. Warm claims (answered `running`) per second
//!   of the round's wall time (first request to last answer) is the figure;
//!   other answers are counted apart. The backfill the claims trigger runs
//!   during the window, as in production; how far it got is read right
//!   after (the workspace's idle and booting VMs: every one of the P warm
//!   VMs was claimed, so the idle ones are backfill). After the round every
//!   agent is finished (or killed), stray active agents are swept, and the
//!   pool settles at P idle VMs again.
//! - **raw store** right after each hearth round, on the same database: the
//!   server is paused (`SIGSTOP`, so its reconciler can neither destroy the
//!   foreign rows nor compete for the database), P idle VM rows of
//!   workspace `tput-raw` are inserted through the store's own
//!   `insert_vm` (untimed), and C tasks claim them back to back, each claim
//!   one write transaction holding exactly the store's claim statement
//!   ([`hearth_store::raw`]): on SQLite `BEGIN IMMEDIATE` on the store's
//!   single write connection (opened by `SqliteStore::open`, so the same
//!   pragmas), on PostgreSQL a transaction from the store's own pool
//!   (`PgStore::connect`, so the same pool size). The rows are then
//!   deleted and the server resumed.
//!
//! On PostgreSQL `ANALYZE vms` runs (untimed) before each window unless
//! `--analyze false`: the raw rows are inserted just before their window,
//! and without statistics that know them the planner sorts every idle row
//! of the workspace on each claim.
//!
//! Around every timed window the benchmark reads from `/proc` the CPU time
//! of the server (per thread), of itself (per thread), of the PostgreSQL
//! backends of the benchmark's database, of every `postgres` process and
//! of the whole machine, so that each claim's CPU cost can be split by
//! process and thread. Before each window it waits (up to `--quiet-wait`)
//! for the machine to be quiet, since it may be shared. `--perf-ctl` names
//! a perf control FIFO to profile only the windows.
use crate::api::Api;
use crate::machine::Machine;
use crate::report;
use crate::server::{Server, Store};
use crate::stats::{Summary, millis};
use crate::table::{Table, fixed};
use anyhow::{Context, Result, anyhow, bail};
use hearth_core::ids::{AgentId, TenantId, VmId};
use hearth_store::{PgStore, SqliteStore, VmRecord, VmState};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The workspace hearth's clients spawn into.
const WORKSPACE: &str = "tput";
/// The workspace of the raw baseline's rows (no such workspace resource:
/// the server is paused while they exist).
const RAW_WORKSPACE: &str = "tput-raw";
/// How long any one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the pool may take to settle at its warm size.
const FILL_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How often the pool status is polled while waiting.
const STATUS_POLL: Duration = Duration::from_millis(100);
/// How often a wait reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// The phases of an agent that may hold or wait for a VM.
const ACTIVE_PHASES: [&str; 5] = ["queued", "provisioning", "running", "idle", "sleeping"];
/// `/proc` CPU times are in USER_HZ, which is 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;
/// Attempts at a raw round (a paused server may hold SQLite's write lock).
const RAW_ATTEMPTS: usize = 3;

#[derive(Debug, clap::Args)]
pub struct ThroughputArgs {
    /// Concurrent clients (on both sides), one level each.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    clients: Vec<usize>,
    /// Claims per round on each side; also the warm pool's size.
    #[arg(long, default_value_t = 2048)]
    spawns: usize,
    /// Rounds per client count on each side (hearth and raw alternate).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Before each timed window, wait (up to --quiet-wait) until the whole
    /// machine was busy less than this share of its CPUs over half a
    /// second (the machine may be shared; 100 disables the wait).
    #[arg(long, default_value_t = 30.0)]
    quiet_below: f64,
    /// The longest wait for a quiet machine before a window starts anyway.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    quiet_wait: Duration,
    /// A perf control FIFO (`perf record --control fifo:PATH --delay=-1 -p
    /// <server pid>`): `enable` is written to it when a hearth window
    /// starts and `disable` when it ends, so that only the windows are
    /// profiled.
    #[arg(long)]
    perf_ctl: Option<PathBuf>,
    /// On PostgreSQL, `ANALYZE vms` (untimed) before each window, once its
    /// rows are in place, so that both sides' claim statement is planned
    /// with statistics that know the idle rows, as autovacuum's would in a
    /// steady state; without it the raw rows, inserted just before their
    /// window, are unknown to the planner.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    analyze: bool,
    /// Which windows `--perf-ctl` profiles.
    #[arg(long, value_enum, default_value_t = PerfWindows::Hearth)]
    perf_windows: PerfWindows,
    #[command(flatten)]
    server: crate::ServerArgs,
    /// Where to write the JSON results (default:
    /// target/bench/throughput-<store>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The timed windows a perf control FIFO enables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PerfWindows {
    Hearth,
    Raw,
    Both,
}

impl ThroughputArgs {
    /// The perf control FIFO, if the windows of `side` are profiled.
    fn perf_fifo(&self, side: PerfWindows) -> Option<&Path> {
        let wanted = self.perf_windows == PerfWindows::Both || self.perf_windows == side;
        self.perf_ctl.as_deref().filter(|_| wanted)
    }
}

// ---- results ----

/// CPU time spent during one timed window, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
struct CpuUse {
    wall_ms: f64,
    /// The `hearth server` process (every thread).
    server_ms: f64,
    /// This process: the load generator, or the raw client.
    bench_ms: f64,
    /// Every process named `postgres` (other databases' work included).
    postgres_ms: f64,
    /// The PostgreSQL backends connected to the benchmark's database.
    postgres_ours_ms: f64,
    /// Busy time of the whole machine (all CPUs).
    machine_busy_ms: f64,
    /// CPUs × wall time.
    machine_capacity_ms: f64,
    /// The server's threads, by name.
    server_threads: BTreeMap<String, ThreadGroup>,
    /// This process's threads, by name.
    bench_threads: BTreeMap<String, ThreadGroup>,
}

/// The CPU time of the threads of one name in a process, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct ThreadGroup {
    threads: usize,
    total_ms: f64,
    /// The busiest one of them (summed over rounds: busiest_ms ÷ wall_ms
    /// is its mean utilization).
    busiest_ms: f64,
}

impl ThreadGroup {
    fn add(&mut self, other: &ThreadGroup) {
        self.threads = self.threads.max(other.threads);
        self.total_ms += other.total_ms;
        self.busiest_ms += other.busiest_ms;
    }
}

impl CpuUse {
    fn add(&mut self, other: &CpuUse) {
        self.wall_ms += other.wall_ms;
        self.server_ms += other.server_ms;
        self.bench_ms += other.bench_ms;
        self.postgres_ms += other.postgres_ms;
        self.postgres_ours_ms += other.postgres_ours_ms;
        self.machine_busy_ms += other.machine_busy_ms;
        self.machine_capacity_ms += other.machine_capacity_ms;
        for (mine, theirs) in [
            (&mut self.server_threads, &other.server_threads),
            (&mut self.bench_threads, &other.bench_threads),
        ] {
            for (name, group) in theirs {
                mine.entry(name.clone()).or_default().add(group);
            }
        }
    }

    /// Busy time of everything but the server, this process and the
    /// PostgreSQL backends of the benchmark's database (other databases,
    /// PostgreSQL's own background processes, other programs).
    fn others_ms(&self) -> f64 {
        (self.machine_busy_ms - self.server_ms - self.bench_ms - self.postgres_ours_ms).max(0.0)
    }
}

#[derive(Debug, Serialize)]
struct HearthRound {
    /// Idle and booting VMs of the workspace right after the window: all P
    /// warm VMs were claimed, so the idle ones are backfill that was ready
    /// within the window.
    idle_at_end: u64,
    booting_at_end: u64,
    /// Warm claims per second of wall time.
    claims_per_second: f64,
    warm: usize,
    not_warm: usize,
    failed: usize,
    cpu: CpuUse,
    latency_ms: Option<Summary>,
}

#[derive(Debug, Serialize)]
struct RawRound {
    /// Claims (a row returned) per second of wall time.
    claims_per_second: f64,
    claimed: usize,
    /// Claims that found no idle row (should be none).
    missed: usize,
    cpu: CpuUse,
    latency_ms: Option<Summary>,
}

#[derive(Debug, Serialize)]
struct Level {
    clients: usize,
    hearth_rounds: Vec<HearthRound>,
    raw_rounds: Vec<RawRound>,
    /// Over the rounds.
    hearth_claims_per_second: Option<Summary>,
    raw_claims_per_second: Option<Summary>,
    /// hearth p50 ÷ raw p50.
    ratio: Option<f64>,
    /// hearth ÷ raw of each round and the raw round right after it.
    paired_ratio: Option<Summary>,
    /// Every warm claim of every hearth round, ms.
    warm_latency_ms: Option<Summary>,
    raw_latency_ms: Option<Summary>,
    /// Summed over the rounds.
    hearth_cpu: CpuUse,
    raw_cpu: CpuUse,
    not_warm: usize,
    failed: usize,
    /// Agents found active after a round that no spawn answer named.
    swept: usize,
    /// The distinct answers of the spawns that were not warm claims (first few).
    odd_answers: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ThroughputReport {
    benchmark: &'static str,
    /// Whether `ANALYZE vms` ran before each window (PostgreSQL).
    analyze: bool,
    machine: Machine,
    store: Store,
    driver: &'static str,
    spawns: usize,
    rounds: usize,
    max_vms: usize,
    /// The first fill of the warm pool, from empty.
    initial_fill: InitialFill,
    hearth: PathBuf,
    levels: Vec<Level>,
}

/// The first fill of the warm pool: P boots with nothing else going on.
#[derive(Debug, Clone, Copy, Serialize)]
struct InitialFill {
    vms: usize,
    seconds: f64,
}

impl InitialFill {
    fn boots_per_second(&self) -> f64 {
        self.vms as f64 / self.seconds.max(f64::EPSILON)
    }
}

// ---- the run ----

pub fn run(args: ThroughputArgs) -> Result<()> {
    if args.clients.contains(&0) || args.spawns == 0 || args.rounds == 0 {
        bail!("--clients, --spawns and --rounds must be positive");
    }
    let machine = Machine::probe();
    eprintln!("[throughput] machine: {}", machine.describe());
    let config = args.server.config()?;
    let max_vms = 2 * args.spawns + 64;
    let server = Server::start(&config)?;
    let process = ServerProcess::find(&config.hearth)?;
    eprintln!(
        "[throughput] server pid {} (profile it with `perf record -g -p {}`)",
        process.pid, process.pid
    );
    let api = server.api()?;
    api.put("/v1/pool-config/default", &json!({"max_vms": max_vms}))?;
    api.put("/v1/environments/bench", &json!({"driver": "fake"}))?;
    let spec = json!({"environment": "bench", "min_idle": args.spawns, "max_idle": args.spawns});
    api.put(&format!("/v1/workspaces/{WORKSPACE}"), &spec)?;
    // The first fill boots all P VMs with nothing else going on: the
    // backfill's own pace, to compare with its pace during a window.
    let fill_start = Instant::now();
    wait_warm(&api, args.spawns)?;
    let fill = InitialFill {
        vms: args.spawns,
        seconds: fill_start.elapsed().as_secs_f64(),
    };
    eprintln!(
        "[throughput] the first fill booted {} VMs in {:.1} s: {:.0} boots/s",
        fill.vms,
        fill.seconds,
        fill.boots_per_second()
    );

    // The load generator: one thread. The raw client: a runtime like the
    // server's (one worker per CPU).
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let raw_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut raw: Option<Arc<RawStore>> = None;
    let server_log = || format!("the server's last log lines:\n{}", server.log_tail());
    let mut levels = Vec::new();
    for &clients in &args.clients {
        let level = measure_level(
            &server, &api, &process, &client_rt, &raw_rt, &mut raw, clients, &args,
        )
        .with_context(server_log)?;
        levels.push(level);
    }
    if let Some(raw) = raw.take() {
        raw_rt.block_on(raw.close());
    }
    drop(server);
    let report = ThroughputReport {
        benchmark: "throughput",
        analyze: args.analyze && config.store == Store::Postgres,
        machine,
        store: config.store,
        driver: "fake",
        spawns: args.spawns,
        rounds: args.rounds,
        max_vms,
        initial_fill: fill,
        hearth: config.hearth,
        levels,
    };
    print!("{}", render(&report));
    let name = format!("throughput-{:?}", report.store).to_lowercase();
    report::write_json(&report::json_path(args.json.as_deref(), &name), &report)
}

#[allow(clippy::too_many_arguments)]
fn measure_level(
    server: &Server,
    api: &Api,
    process: &ServerProcess,
    client_rt: &tokio::runtime::Runtime,
    raw_rt: &tokio::runtime::Runtime,
    raw: &mut Option<Arc<RawStore>>,
    clients: usize,
    args: &ThroughputArgs,
) -> Result<Level> {
    let p = args.spawns;
    let mut hearth_rounds = Vec::new();
    let mut raw_rounds = Vec::new();
    let mut warm_samples = Vec::new();
    let mut raw_samples = Vec::new();
    let mut spawns_seen: Vec<Spawned> = Vec::new();
    let mut swept = 0;
    for round in 1..=args.rounds {
        eprintln!(
            "[throughput] {clients} clients, round {round}/{}: waiting for {p} warm VMs",
            args.rounds
        );
        wait_warm(api, p)?;

        // hearth
        if args.analyze && process.database_url.is_some() {
            raw_rt.block_on(analyze(raw, process))?;
        }
        wait_quiet(args)?;
        let (spawns, cpu) = client_rt.block_on(hearth_window(
            server,
            process,
            clients,
            p,
            args.perf_fifo(PerfWindows::Hearth),
        ))?;
        let backfill = backfill_at_end(api)?;
        let warm: Vec<Duration> = spawns
            .iter()
            .filter(|s| s.outcome == Outcome::Warm)
            .map(|s| s.latency)
            .collect();
        let result = HearthRound {
            idle_at_end: backfill.0,
            booting_at_end: backfill.1,
            claims_per_second: warm.len() as f64 / (cpu.wall_ms / 1000.0).max(f64::EPSILON),
            warm: warm.len(),
            not_warm: count(&spawns, Outcome::NotWarm),
            failed: count(&spawns, Outcome::Failed),
            cpu,
            latency_ms: Summary::of_durations(&warm),
        };
        eprintln!(
            "[throughput]   hearth: {:.0} warm claims/s ({} warm, p50 {:.2} ms, p99 {:.2} ms; {} not warm, {} failed; backfill at the end: {} idle, {} booting) in {:.0} ms; CPU ms: {}",
            result.claims_per_second,
            result.warm,
            result.latency_ms.map_or(f64::NAN, |s| s.p50),
            result.latency_ms.map_or(f64::NAN, |s| s.p99),
            result.not_warm,
            result.failed,
            result.idle_at_end,
            result.booting_at_end,
            result.cpu.wall_ms,
            describe_cpu(&result.cpu),
        );
        for s in spawns.iter().filter(|s| s.outcome != Outcome::Warm).take(3) {
            eprintln!(
                "[throughput]   not a warm claim: {:?} {}",
                s.outcome, s.detail
            );
        }
        warm_samples.extend(warm.iter().map(|d| millis(*d)));
        hearth_rounds.push(result);
        let detailed = client_rt.block_on(end_agents(server, clients, &spawns))?;
        swept += sweep(api)?;
        spawns_seen.extend(detailed);
        wait_warm(api, p)?;

        // raw store, the server paused
        wait_quiet(args)?;
        let perf = args.perf_fifo(PerfWindows::Raw);
        let (claims, cpu) = raw_round(raw_rt, raw, process, clients, p, perf, args.analyze)?;
        let latencies: Vec<Duration> = claims.iter().filter_map(|c| c.then_latency()).collect();
        let result = RawRound {
            claims_per_second: latencies.len() as f64 / (cpu.wall_ms / 1000.0).max(f64::EPSILON),
            claimed: latencies.len(),
            missed: claims.len() - latencies.len(),
            cpu,
            latency_ms: Summary::of_durations(&latencies),
        };
        eprintln!(
            "[throughput]   raw:    {:.0} claims/s ({} claimed, p50 {:.2} ms, p99 {:.2} ms; {} missed) in {:.0} ms; CPU ms: {}",
            result.claims_per_second,
            result.claimed,
            result.latency_ms.map_or(f64::NAN, |s| s.p50),
            result.latency_ms.map_or(f64::NAN, |s| s.p99),
            result.missed,
            result.cpu.wall_ms,
            describe_cpu(&result.cpu),
        );
        raw_samples.extend(latencies.iter().map(|d| millis(*d)));
        raw_rounds.push(result);
    }
    let hearth_rates: Vec<f64> = hearth_rounds.iter().map(|r| r.claims_per_second).collect();
    let raw_rates: Vec<f64> = raw_rounds.iter().map(|r| r.claims_per_second).collect();
    let hearth_claims_per_second = Summary::of(&hearth_rates);
    let raw_claims_per_second = Summary::of(&raw_rates);
    let mut hearth_cpu = CpuUse::default();
    hearth_rounds.iter().for_each(|r| hearth_cpu.add(&r.cpu));
    let mut raw_cpu = CpuUse::default();
    raw_rounds.iter().for_each(|r| raw_cpu.add(&r.cpu));
    Ok(Level {
        clients,
        ratio: hearth_claims_per_second
            .zip(raw_claims_per_second)
            .map(|(h, r)| h.p50 / r.p50),
        paired_ratio: Summary::of(
            &hearth_rates
                .iter()
                .zip(&raw_rates)
                .map(|(h, r)| h / r)
                .collect::<Vec<_>>(),
        ),
        hearth_claims_per_second,
        raw_claims_per_second,
        warm_latency_ms: Summary::of(&warm_samples),
        raw_latency_ms: Summary::of(&raw_samples),
        hearth_cpu,
        raw_cpu,
        not_warm: hearth_rounds.iter().map(|r| r.not_warm).sum(),
        failed: hearth_rounds.iter().map(|r| r.failed).sum(),
        swept,
        odd_answers: odd_answers(&spawns_seen),
        hearth_rounds,
        raw_rounds,
    })
}

// ---- hearth: the load generator ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Answered 201 `running`: a warm VM was claimed in the request.
    Warm,
    /// Answered 201 in another phase.
    NotWarm,
    /// Not answered 201.
    Failed,
}

#[derive(Debug, Clone)]
struct Spawned {
    latency: Duration,
    outcome: Outcome,
    agent: Option<String>,
    detail: String,
}

/// The fields of an agent answer the benchmark reads.
#[derive(Debug, Deserialize)]
struct AgentAnswer {
    id: String,
    phase: String,
    #[serde(default)]
    vm: Option<String>,
}

/// An async client of the server with one keep-alive connection.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(server: &Server) -> Result<Client> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(1);
        if let Some(ca) = &server.ca {
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(crate::api::root(ca)?);
        }
        Ok(Client {
            http: builder.build().context("cannot build an HTTP client")?,
            base: server.url.clone(),
            token: server.admin_token.clone(),
        })
    }

    /// A POST with a JSON body (or a GET without one): status and body.
    async fn call(&self, path: &str, body: Option<&Value>) -> Result<(u16, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let request = match body {
            Some(body) => self.http.post(url).json(body),
            None => self.http.get(url),
        };
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("{path}: the server did not answer"))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("{path}: cannot read the answer"))?;
        Ok((status, bytes.to_vec()))
    }

    async fn spawn(&self, body: &Value) -> Spawned {
        let start = Instant::now();
        let answer = self.call("/v1/agents", Some(body)).await;
        let latency = start.elapsed();
        let (outcome, agent, detail) = match answer {
            Ok((201, body)) => match serde_json::from_slice::<AgentAnswer>(&body) {
                Ok(a) if a.phase == "running" => (Outcome::Warm, Some(a.id), String::new()),
                Ok(a) => (
                    Outcome::NotWarm,
                    Some(a.id),
                    format!("answered {} (VM {:?})", a.phase, a.vm),
                ),
                Err(e) => (
                    Outcome::Failed,
                    None,
                    format!("201 but {e}: {}", short(&body)),
                ),
            },
            Ok((status, body)) => (Outcome::Failed, None, format!("{status} {}", short(&body))),
            Err(e) => (Outcome::Failed, None, format!("{e:#}")),
        };
        Spawned {
            latency,
            outcome,
            agent,
            detail,
        }
    }
}

/// A response body as text, shortened for messages.
fn short(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(300).collect()
}

/// One timed hearth window: `clients` tasks, released together once each
/// has its connection, send `spawns` spawns in all, back to back. Returns
/// every spawn and the CPU used between the release and the last answer.
async fn hearth_window(
    server: &Server,
    process: &ServerProcess,
    clients: usize,
    spawns: usize,
    perf_ctl: Option<&Path>,
) -> Result<(Vec<Spawned>, CpuUse)> {
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        connected.push(Client::new(server)?);
    }
    // Open every connection (untimed), concurrently.
    let mut opening = tokio::task::JoinSet::new();
    for client in &connected {
        let client = client.clone();
        opening.spawn(async move {
            match client.call("/v1/whoami", None).await? {
                (200, _) => Ok(()),
                (status, body) => Err(anyhow!("GET /v1/whoami: {status} {}", short(&body))),
            }
        });
    }
    while let Some(done) = opening.join_next().await {
        done??;
    }
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let tickets = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(json!({"workspace": WORKSPACE}));
    let mut tasks = tokio::task::JoinSet::new();
    for client in connected {
        let (start, tickets, body) = (start.clone(), tickets.clone(), body.clone());
        tasks.spawn(async move {
            start.wait().await;
            let mut done = Vec::new();
            while tickets.fetch_add(1, Ordering::Relaxed) < spawns {
                done.push(client.spawn(&body).await);
            }
            done
        });
    }
    perf_command(perf_ctl, "enable")?;
    let before = CpuSnapshot::take(process);
    start.wait().await;
    let mut all = Vec::with_capacity(spawns);
    while let Some(done) = tasks.join_next().await {
        all.extend(done.context("a client task panicked")?);
    }
    let cpu = CpuSnapshot::take(process).since(&before);
    perf_command(perf_ctl, "disable")?;
    Ok((all, cpu))
}

/// (idle, booting) VMs of the workspace now.
fn backfill_at_end(api: &Api) -> Result<(u64, u64)> {
    let status = api.get("/v1/pool/status")?;
    let ws = status["workspaces"]
        .as_array()
        .and_then(|all| all.iter().find(|w| w["name"] == WORKSPACE))
        .cloned()
        .unwrap_or(Value::Null);
    let n = |key: &str| ws[key].as_u64().unwrap_or(0);
    Ok((n("idle"), n("booting")))
}

/// A window's CPU use in one line: each process, and the busiest threads.
fn describe_cpu(cpu: &CpuUse) -> String {
    let threads = |groups: &BTreeMap<String, ThreadGroup>| {
        let mut list: Vec<_> = groups.iter().filter(|(_, g)| g.total_ms > 0.0).collect();
        list.sort_by(|a, b| b.1.total_ms.total_cmp(&a.1.total_ms));
        list.iter()
            .take(3)
            .map(|(name, g)| {
                format!(
                    "{name} ×{} {:.0} (busiest {:.0})",
                    g.threads, g.total_ms, g.busiest_ms
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "server {:.0} [{}], bench {:.0} [{}], postgres {:.0} (this database {:.0}), machine {:.0}/{:.0}",
        cpu.server_ms,
        threads(&cpu.server_threads),
        cpu.bench_ms,
        threads(&cpu.bench_threads),
        cpu.postgres_ms,
        cpu.postgres_ours_ms,
        cpu.machine_busy_ms,
        cpu.machine_capacity_ms
    )
}

/// Writes a command to perf's control FIFO, when there is one.
fn perf_command(fifo: Option<&Path>, command: &str) -> Result<()> {
    use std::io::Write;
    let Some(fifo) = fifo else { return Ok(()) };
    std::fs::OpenOptions::new()
        .write(true)
        .open(fifo)
        .and_then(|mut f| f.write_all(format!("{command}\n").as_bytes()))
        .with_context(|| format!("cannot write to the perf control FIFO {}", fifo.display()))
}

/// Finishes the warm agents and kills the others (untimed, `clients` at a
/// time); returns the spawns with what a GET said of each one that was not
/// a warm claim (tells a stale answer from a real miss).
async fn end_agents(server: &Server, clients: usize, spawns: &[Spawned]) -> Result<Vec<Spawned>> {
    let spawns = Arc::new(spawns.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let client = Client::new(server)?;
        let (spawns, next) = (spawns.clone(), next.clone());
        tasks.spawn(async move {
            let mut details = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(s) = spawns.get(i) else { break };
                let Some(id) = &s.agent else { continue };
                let path = match s.outcome {
                    Outcome::Warm => format!("/v1/agents/{id}/finish"),
                    _ => {
                        let now = match client.call(&format!("/v1/agents/{id}"), None).await {
                            Ok((_, body)) => serde_json::from_slice::<AgentAnswer>(&body)
                                .map_or_else(
                                    |_| format!("a GET after the round: {}", short(&body)),
                                    |a| {
                                        format!(
                                            "a GET after the round: {} on VM {:?}",
                                            a.phase, a.vm
                                        )
                                    },
                                ),
                            Err(e) => format!("a GET after the round failed: {e:#}"),
                        };
                        details.push((i, now));
                        format!("/v1/agents/{id}/kill")
                    }
                };
                let body = json!({"status": "completed"});
                match client.call(&path, Some(&body)).await {
                    Ok((200..=299, _)) => {}
                    Ok((status, body)) => {
                        eprintln!("[throughput]   POST {path}: {status} {}", short(&body))
                    }
                    Err(e) => eprintln!("[throughput]   POST {path}: {e:#}"),
                }
            }
            details
        });
    }
    let mut out = spawns.to_vec();
    while let Some(done) = tasks.join_next().await {
        for (i, now) in done.context("a cleanup task panicked")? {
            out[i].detail = format!("{}; {now}", out[i].detail);
        }
    }
    Ok(out)
}

fn count(spawns: &[Spawned], outcome: Outcome) -> usize {
    spawns.iter().filter(|s| s.outcome == outcome).count()
}

/// The distinct answers of spawns that were not warm claims, the first few.
fn odd_answers(spawns: &[Spawned]) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for s in spawns.iter().filter(|s| s.outcome != Outcome::Warm) {
        let answer = format!("{:?}: {}", s.outcome, s.detail);
        if seen.len() < 10 && !seen.contains(&answer) {
            seen.push(answer);
        }
    }
    seen
}

/// Kills the active agents of the workspace that no answer named (a spawn
/// answered with an error yet created its agent); returns how many.
fn sweep(api: &Api) -> Result<usize> {
    let mut swept = 0;
    for phase in ACTIVE_PHASES {
        let list = api.get(&format!("/v1/agents?workspace={WORKSPACE}&phase={phase}"))?;
        for agent in list["items"].as_array().into_iter().flatten() {
            let Some(id) = agent["id"].as_str() else {
                continue;
            };
            eprintln!("[throughput]   sweeping agent {id} ({phase}) that no spawn answer named");
            if let Err(e) = api.post(&format!("/v1/agents/{id}/kill"), &json!({})) {
                eprintln!("[throughput]   cannot kill {id}: {e:#}");
            }
            swept += 1;
        }
    }
    Ok(swept)
}

/// Waits until the workspace holds `size` idle VMs and nothing else
/// happens in the pool (no agent, boot or destroy).
fn wait_warm(api: &Api, size: usize) -> Result<()> {
    let start = Instant::now();
    let mut reported = start;
    loop {
        let status = api.get("/v1/pool/status")?;
        let ws = status["workspaces"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["name"] == WORKSPACE))
            .cloned()
            .unwrap_or(Value::Null);
        if ws["status"] == "hard_limited" {
            bail!("the pool is hard-limited: {}", ws["last_error"]);
        }
        let n = |v: &Value, key: &str| v[key].as_u64().unwrap_or(0);
        if n(&ws, "idle") == size as u64
            && n(&ws, "booting") == 0
            && n(&ws, "active") == 0
            && n(&status["vms"], "draining") == 0
            && n(&status, "queued") == 0
        {
            return Ok(());
        }
        let progress = format!(
            "idle {}/{size}, booting {}, active {}, draining {}, queued {}; last error: {}",
            n(&ws, "idle"),
            n(&ws, "booting"),
            n(&ws, "active"),
            n(&status["vms"], "draining"),
            n(&status, "queued"),
            ws["last_error"]
        );
        if start.elapsed() > FILL_TIMEOUT {
            bail!("gave up waiting for {size} warm VMs after {FILL_TIMEOUT:?}: {progress}");
        }
        if reported.elapsed() > PROGRESS_EVERY {
            eprintln!("[throughput]   waiting for {size} warm VMs: {progress}");
            reported = Instant::now();
        }
        std::thread::sleep(STATUS_POLL);
    }
}

// ---- the raw store baseline ----

/// The server's database, opened by the store's own code (same pragmas,
/// same pool sizes), used with raw SQL for the claims.
enum RawStore {
    Sqlite(SqliteStore, TenantId),
    Postgres(PgStore, TenantId),
}

impl RawStore {
    async fn open(process: &ServerProcess) -> Result<RawStore> {
        Ok(match &process.database_url {
            Some(url) => {
                let store = PgStore::connect(url).await?;
                let tenant = first_tenant(&store).await?;
                RawStore::Postgres(store, tenant)
            }
            None => {
                let path = process.data_dir.join("hearth.db");
                let store = SqliteStore::open(&path)
                    .await
                    .with_context(|| format!("cannot open {}", path.display()))?;
                let tenant = first_tenant(&store).await?;
                RawStore::Sqlite(store, tenant)
            }
        })
    }

    fn store(&self) -> &dyn hearth_store::Store {
        match self {
            RawStore::Sqlite(s, _) => s,
            RawStore::Postgres(s, _) => s,
        }
    }

    fn tenant(&self) -> TenantId {
        match self {
            RawStore::Sqlite(_, t) | RawStore::Postgres(_, t) => *t,
        }
    }

    async fn close(&self) {
        match self {
            RawStore::Sqlite(s, _) => s.close().await,
            RawStore::Postgres(s, _) => s.close().await,
        }
    }

    /// Inserts `n` idle VM rows of the raw workspace as the pool leaves
    /// them: recorded `booting`, then made `idle`.
    async fn insert_idle(&self, n: usize) -> Result<()> {
        let tenant = self.tenant();
        for _ in 0..n {
            let vm = VmRecord {
                state: VmState::Idle,
                ..VmRecord::booting(VmId::new(), tenant, RAW_WORKSPACE, "fake", 1, 0)
            };
            self.store().insert_vm(&vm).await?;
        }
        Ok(())
    }

    /// `ANALYZE vms` on PostgreSQL; nothing on SQLite (whose planner uses
    /// no statistics unless asked, and none are kept).
    async fn analyze(&self) -> Result<()> {
        if let RawStore::Postgres(s, _) = self {
            sqlx::query("ANALYZE vms").execute(s.pool()).await?;
        }
        Ok(())
    }

    /// Deletes every row of the raw workspace.
    async fn delete_rows(&self) -> Result<u64> {
        const DELETE: &str = "DELETE FROM vms WHERE tenant_id = $1 AND workspace = $2";
        let tenant = self.tenant().to_string();
        let done = match self {
            RawStore::Sqlite(s, _) => sqlx::query(DELETE)
                .bind(tenant)
                .bind(RAW_WORKSPACE)
                .execute(s.write_pool())
                .await?
                .rows_affected(),
            RawStore::Postgres(s, _) => sqlx::query(DELETE)
                .bind(tenant)
                .bind(RAW_WORKSPACE)
                .execute(s.pool())
                .await?
                .rows_affected(),
        };
        Ok(done)
    }

    /// One claim, in one write transaction, exactly as the store's claim
    /// statement; `Some(latency)` when it returned a row.
    async fn claim(&self) -> Result<Claim> {
        let tenant = self.tenant().to_string();
        let agent = AgentId::new().to_string();
        let start = Instant::now();
        let row = match self {
            RawStore::Sqlite(s, _) => {
                let mut tx = s.write_pool().begin_with("BEGIN IMMEDIATE").await?;
                let row = sqlx::query(hearth_store::raw::SQLITE_CLAIM_IDLE_VM)
                    .bind(tenant)
                    .bind(RAW_WORKSPACE)
                    .bind(agent)
                    .bind(hearth_store::now_millis())
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.try_get::<String, _>("id"))
                    .transpose()?;
                tx.commit().await?;
                row
            }
            RawStore::Postgres(s, _) => {
                let mut tx = s.pool().begin().await?;
                let row = sqlx::query(hearth_store::raw::POSTGRES_CLAIM_IDLE_VM)
                    .bind(tenant)
                    .bind(RAW_WORKSPACE)
                    .bind(agent)
                    .bind(hearth_store::now_millis())
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.try_get::<String, _>("id"))
                    .transpose()?;
                tx.commit().await?;
                row
            }
        };
        Ok(Claim {
            latency: start.elapsed(),
            claimed: row.is_some(),
        })
    }
}

async fn first_tenant(store: &dyn hearth_store::Store) -> Result<TenantId> {
    let tenants = store.list_tenants().await?;
    Ok(tenants.first().context("the store has no tenant")?.id)
}

#[derive(Debug, Clone, Copy)]
struct Claim {
    latency: Duration,
    claimed: bool,
}

impl Claim {
    fn then_latency(&self) -> Option<Duration> {
        self.claimed.then_some(self.latency)
    }
}

/// The raw store, opened on first use.
async fn open_raw(
    raw: &mut Option<Arc<RawStore>>,
    process: &ServerProcess,
) -> Result<Arc<RawStore>> {
    if raw.is_none() {
        *raw = Some(Arc::new(RawStore::open(process).await?));
    }
    Ok(raw.clone().expect("just opened"))
}

/// `ANALYZE vms` on PostgreSQL (opening the raw store's pool, which is
/// harmless while the server runs there).
async fn analyze(raw: &mut Option<Arc<RawStore>>, process: &ServerProcess) -> Result<()> {
    open_raw(raw, process).await?.analyze().await
}

/// One raw round with the server paused, retried when the paused server
/// held SQLite's write lock (the claims then time out on it).
fn raw_round(
    rt: &tokio::runtime::Runtime,
    raw: &mut Option<Arc<RawStore>>,
    process: &ServerProcess,
    clients: usize,
    claims: usize,
    perf_ctl: Option<&Path>,
    analyze_first: bool,
) -> Result<(Vec<Claim>, CpuUse)> {
    let mut last_error = None;
    for attempt in 1..=RAW_ATTEMPTS {
        let paused = Paused::new(process.pid)?;
        let result = rt.block_on(async {
            let store = open_raw(raw, process).await?;
            let stale = store.delete_rows().await?;
            if stale > 0 {
                eprintln!("[throughput]   deleted {stale} raw rows left by an earlier attempt");
            }
            store.insert_idle(claims).await?;
            if analyze_first {
                store.analyze().await?;
            }
            let result = raw_window(store.clone(), process, clients, claims, perf_ctl).await;
            store.delete_rows().await?;
            result
        });
        drop(paused);
        match result {
            Ok(done) => return Ok(done),
            Err(e) => {
                eprintln!(
                    "[throughput]   raw round, attempt {attempt}/{RAW_ATTEMPTS}, failed: {e:#}"
                );
                last_error = Some(e);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("no raw attempt ran")))
}

/// The timed raw window: `clients` tasks claim `claims` rows back to back.
async fn raw_window(
    store: Arc<RawStore>,
    process: &ServerProcess,
    clients: usize,
    claims: usize,
    perf_ctl: Option<&Path>,
) -> Result<(Vec<Claim>, CpuUse)> {
    let tickets = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (store, tickets, start) = (store.clone(), tickets.clone(), start.clone());
        tasks.spawn(async move {
            start.wait().await;
            let mut done = Vec::new();
            while tickets.fetch_add(1, Ordering::Relaxed) < claims {
                done.push(store.claim().await?);
            }
            anyhow::Ok(done)
        });
    }
    perf_command(perf_ctl, "enable")?;
    let before = CpuSnapshot::take(process);
    start.wait().await;
    let mut all = Vec::with_capacity(claims);
    let mut failure = None;
    while let Some(done) = tasks.join_next().await {
        match done.context("a raw client task panicked")? {
            Ok(claims) => all.extend(claims),
            Err(e) => failure = Some(e),
        }
    }
    let cpu = CpuSnapshot::take(process).since(&before);
    perf_command(perf_ctl, "disable")?;
    match failure {
        Some(e) => Err(e),
        None => Ok((all, cpu)),
    }
}

// ---- the server process ----

/// The server's process, found among this process's children, and what
/// its command line says about its database.
struct ServerProcess {
    pid: i32,
    data_dir: PathBuf,
    /// `--database-url` (PostgreSQL), or none (SQLite in the data dir).
    database_url: Option<String>,
}

impl ServerProcess {
    fn find(hearth: &Path) -> Result<ServerProcess> {
        let me = std::process::id() as i32;
        let entries = std::fs::read_dir("/proc").context("cannot read /proc")?;
        for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            if crate::procfs::parent_pid(&stat) != Some(me) {
                continue;
            }
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.first().map(Path::new) != Some(hearth)
                || args.get(1).map(String::as_str) != Some("server")
            {
                continue;
            }
            let value = |flag: &str| {
                args.iter()
                    .position(|a| a == flag)
                    .and_then(|i| args.get(i + 1))
                    .cloned()
            };
            return Ok(ServerProcess {
                pid,
                data_dir: value("--data-dir")
                    .map(PathBuf::from)
                    .context("the server has no --data-dir")?,
                database_url: value("--database-url"),
            });
        }
        bail!("cannot find the `hearth server` process among this process's children")
    }
}

impl ServerProcess {
    /// The PostgreSQL database's name (the URL's path), if any.
    fn database_name(&self) -> Option<&str> {
        let url = self.database_url.as_deref()?;
        let name = url.rsplit_once('/')?.1;
        Some(name.split_once('?').map_or(name, |(name, _)| name))
    }
}

/// The server stopped with `SIGSTOP` until dropped (`SIGCONT`).
struct Paused(nix::unistd::Pid);

impl Paused {
    fn new(pid: i32) -> Result<Paused> {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(pid);
        kill(pid, Signal::SIGSTOP).context("cannot stop the server")?;
        let paused = Paused(pid);
        // Wait until it really is stopped (state T).
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_state(pid.as_raw()) != Some('T') {
            if Instant::now() > deadline {
                bail!("the server did not stop");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(paused)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        if let Err(e) = kill(self.0, Signal::SIGCONT) {
            eprintln!("[throughput] cannot resume the server: {e}");
        }
    }
}

fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

// ---- CPU accounting ----

/// Waits until the machine was busy less than `--quiet-below` % over half
/// a second, or `--quiet-wait` has passed (then says so and goes on).
fn wait_quiet(args: &ThroughputArgs) -> Result<()> {
    if args.quiet_below >= 100.0 {
        return Ok(());
    }
    let start = Instant::now();
    loop {
        let (before, _) = machine_ticks().unwrap_or((0, 1));
        std::thread::sleep(Duration::from_millis(500));
        let (after, cpus) = machine_ticks().unwrap_or((0, 1));
        let busy = 100.0 * ticks_to_ms(after.saturating_sub(before)) / (500.0 * cpus as f64);
        if busy < args.quiet_below {
            return Ok(());
        }
        if start.elapsed() > args.quiet_wait {
            eprintln!(
                "[throughput]   the machine is still {busy:.0} % busy after {:?}: measuring anyway",
                args.quiet_wait
            );
            return Ok(());
        }
    }
}

/// CPU time counters at one instant, in ticks (USER_HZ).
struct CpuSnapshot {
    at: Instant,
    server: u64,
    bench: u64,
    postgres: u64,
    postgres_ours: u64,
    machine_busy: u64,
    cpus: usize,
    /// (tid, name, ticks) of each thread.
    server_threads: Vec<(i32, String, u64)>,
    bench_threads: Vec<(i32, String, u64)>,
}

fn ticks_to_ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / TICKS_PER_SECOND
}

impl CpuSnapshot {
    fn take(process: &ServerProcess) -> CpuSnapshot {
        let (machine_busy, cpus) = machine_ticks().unwrap_or((0, 1));
        let me = std::process::id() as i32;
        let (postgres, postgres_ours) = postgres_ticks(process.database_name());
        CpuSnapshot {
            at: Instant::now(),
            server: process_ticks(process.pid).unwrap_or(0),
            bench: process_ticks(me).unwrap_or(0),
            postgres,
            postgres_ours,
            machine_busy,
            cpus,
            server_threads: thread_ticks(process.pid),
            bench_threads: thread_ticks(me),
        }
    }

    fn since(&self, before: &CpuSnapshot) -> CpuUse {
        let ms = |now: u64, then: u64| ticks_to_ms(now.saturating_sub(then));
        let wall_ms = millis(self.at - before.at);
        CpuUse {
            wall_ms,
            server_ms: ms(self.server, before.server),
            bench_ms: ms(self.bench, before.bench),
            postgres_ms: ms(self.postgres, before.postgres),
            postgres_ours_ms: ms(self.postgres_ours, before.postgres_ours),
            machine_busy_ms: ms(self.machine_busy, before.machine_busy),
            machine_capacity_ms: wall_ms * self.cpus as f64,
            server_threads: thread_groups(&before.server_threads, &self.server_threads),
            bench_threads: thread_groups(&before.bench_threads, &self.bench_threads),
        }
    }
}

/// Each thread's CPU time between two listings, grouped by thread name
/// (threads born meanwhile count from zero).
fn thread_groups(
    before: &[(i32, String, u64)],
    after: &[(i32, String, u64)],
) -> BTreeMap<String, ThreadGroup> {
    let mut groups: BTreeMap<String, ThreadGroup> = BTreeMap::new();
    for (tid, name, now) in after {
        let then = before
            .iter()
            .find(|(t, n, _)| t == tid && n == name)
            .map_or(0, |(_, _, ticks)| *ticks);
        let spent = ticks_to_ms(now.saturating_sub(then));
        let group = groups.entry(name.clone()).or_default();
        group.threads += 1;
        group.total_ms += spent;
        group.busiest_ms = group.busiest_ms.max(spent);
    }
    groups
}

/// (tid, name, utime + stime) of every thread of a process.
fn thread_ticks(pid: i32) -> Vec<(i32, String, u64)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|tid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            let name = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_owned();
            Some((tid, name, stat_ticks(&stat)?))
        })
        .collect()
}

/// utime + stime of a process (all its threads), from `/proc/<pid>/stat`.
fn process_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_ticks(&stat)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line; fields
/// are counted from the last `)` (the command name may hold anything).
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU time of every process named `postgres`, and of those among
/// them serving `database` (a backend's command line names its database).
fn postgres_ticks(database: Option<&str>) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    let (mut all, mut ours) = (0, 0);
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let is_postgres = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "postgres");
        if !is_postgres {
            continue;
        }
        let Some(ticks) = process_ticks(pid) else {
            continue;
        };
        all += ticks;
        let serves_ours = database.is_some_and(|db| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .split_whitespace()
                    .any(|w| w == db)
            })
        });
        if serves_ours {
            ours += ticks;
        }
    }
    (all, ours)
}

/// Busy ticks of all CPUs (everything but idle and iowait) and the number
/// of CPUs, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    let total = stat.lines().next()?;
    machine_busy(total).map(|busy| (busy, cpus.max(1)))
}

/// Busy ticks of the `cpu` line of `/proc/stat`: user, nice, system, irq,
/// softirq, steal (idle and iowait left out; guest time is already in user).
fn machine_busy(line: &str) -> Option<u64> {
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

// ---- output ----

fn render(report: &ThroughputReport) -> String {
    let store = format!("{:?}", report.store).to_lowercase();
    let mut main = Table::new([
        "clients",
        "hearth claims/s p50",
        "min",
        "max",
        "raw claims/s p50",
        "min",
        "max",
        "hearth ÷ raw",
        "paired ÷ p50 (min–max)",
        "warm p50 ms",
        "warm p99 ms",
        "not warm",
        "failed",
        "backfilled by the end: ready / booting (p50)",
    ]);
    let rate_cells = |s: Option<Summary>| match s {
        Some(s) => vec![fixed(s.p50, 0), fixed(s.min, 0), fixed(s.max, 0)],
        None => vec!["-".into(), "-".into(), "-".into()],
    };
    for level in &report.levels {
        let mut cells = vec![level.clients.to_string()];
        cells.extend(rate_cells(level.hearth_claims_per_second));
        cells.extend(rate_cells(level.raw_claims_per_second));
        cells.push(
            level
                .ratio
                .map_or("-".into(), |r| format!("{:.1} %", r * 100.0)),
        );
        cells.push(level.paired_ratio.map_or("-".into(), |r| {
            format!(
                "{:.0} % ({:.0}–{:.0})",
                r.p50 * 100.0,
                r.min * 100.0,
                r.max * 100.0
            )
        }));
        cells.push(
            level
                .warm_latency_ms
                .map_or("-".into(), |s| fixed(s.p50, 2)),
        );
        cells.push(
            level
                .warm_latency_ms
                .map_or("-".into(), |s| fixed(s.p99, 2)),
        );
        cells.push(level.not_warm.to_string());
        cells.push(level.failed.to_string());
        let p50 = |values: Vec<u64>| {
            let values: Vec<f64> = values.into_iter().map(|v| v as f64).collect();
            Summary::of(&values).map_or("-".into(), |s| fixed(s.p50, 0))
        };
        cells.push(format!(
            "{} / {}",
            p50(level.hearth_rounds.iter().map(|r| r.idle_at_end).collect()),
            p50(level
                .hearth_rounds
                .iter()
                .map(|r| r.booting_at_end)
                .collect())
        ));
        debug_assert_eq!(cells.len(), 14, "one cell per column");
        main.row(cells);
    }
    let mut cpu = Table::new([
        "CPU per claim, µs",
        "claims/s",
        "claim p50 ms",
        "claim p99 ms",
        "server",
        "load gen / raw client",
        "postgres (this db)",
        "others",
        "machine busy",
    ]);
    for level in &report.levels {
        let sides = [
            (
                "hearth",
                &level.hearth_cpu,
                level.hearth_rounds.iter().map(|r| r.warm).sum::<usize>(),
                level.hearth_claims_per_second,
                level.warm_latency_ms,
            ),
            (
                "raw",
                &level.raw_cpu,
                level.raw_rounds.iter().map(|r| r.claimed).sum::<usize>(),
                level.raw_claims_per_second,
                level.raw_latency_ms,
            ),
        ];
        for (side, use_, claims, rate, latency) in sides {
            let per = |ms: f64| fixed(ms * 1000.0 / (claims.max(1) as f64), 0);
            cpu.row([
                format!("{side}, {} clients", level.clients),
                rate.map_or("-".into(), |s| fixed(s.p50, 0)),
                latency.map_or("-".into(), |s| fixed(s.p50, 2)),
                latency.map_or("-".into(), |s| fixed(s.p99, 2)),
                per(use_.server_ms),
                per(use_.bench_ms),
                per(use_.postgres_ours_ms),
                per(use_.others_ms()),
                format!(
                    "{:.0} %",
                    100.0 * use_.machine_busy_ms / use_.machine_capacity_ms.max(f64::EPSILON)
                ),
            ]);
        }
    }
    let mut threads = Table::new([
        "threads: CPU per claim, µs",
        "threads",
        "all of them",
        "the busiest one",
        "busiest one's utilization",
    ]);
    for level in &report.levels {
        let sides = [
            (
                "hearth: server",
                &level.hearth_cpu.server_threads,
                &level.hearth_cpu,
                level.hearth_rounds.iter().map(|r| r.warm).sum::<usize>(),
            ),
            (
                "hearth: load generator",
                &level.hearth_cpu.bench_threads,
                &level.hearth_cpu,
                level.hearth_rounds.iter().map(|r| r.warm).sum::<usize>(),
            ),
            (
                "raw client",
                &level.raw_cpu.bench_threads,
                &level.raw_cpu,
                level.raw_rounds.iter().map(|r| r.claimed).sum::<usize>(),
            ),
        ];
        for (side, groups, use_, claims) in sides {
            let per = |ms: f64| fixed(ms * 1000.0 / (claims.max(1) as f64), 0);
            let mut groups: Vec<_> = groups.iter().filter(|(_, g)| g.total_ms > 0.0).collect();
            groups.sort_by(|a, b| b.1.total_ms.total_cmp(&a.1.total_ms));
            for (name, group) in groups {
                threads.row([
                    format!("{side}, {} clients: {name}", level.clients),
                    group.threads.to_string(),
                    per(group.total_ms),
                    per(group.busiest_ms),
                    format!(
                        "{:.0} %",
                        100.0 * group.busiest_ms / use_.wall_ms.max(f64::EPSILON)
                    ),
                ]);
            }
        }
    }
    let mut odd = String::new();
    for level in report
        .levels
        .iter()
        .filter(|l| !l.odd_answers.is_empty() || l.swept > 0)
    {
        odd.push_str(&format!(
            "\n{} clients: {} agents swept; answers that were not warm claims:\n",
            level.clients, level.swept
        ));
        for answer in &level.odd_answers {
            odd.push_str(&format!("- {answer}\n"));
        }
    }
    let analyzed = if report.analyze {
        "; `ANALYZE vms` before each window"
    } else {
        ""
    };
    let fill = &report.initial_fill;
    format!(
        "\nClaim throughput, {store} store (fake driver, {} claims per round and side, {} rounds; the warm pool holds {}{analyzed})\n\n{}\nThe first fill of the pool booted {} VMs in {:.1} s ({:.0} boots/s).\n{odd}\nCPU per claim during the timed windows ({store}; machine busy = all CPUs)\n\n{}\nBy thread ({store}; utilization = CPU time ÷ window wall time)\n\n{}",
        report.spawns,
        report.rounds,
        report.spawns,
        main.render(),
        fill.vms,
        fill.seconds,
        fill.boots_per_second(),
        cpu.render(),
        threads.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_from_stat_lines() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime …
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 10 0 0 0 250 70 0 0 20 0 3";
        assert_eq!(stat_ticks(stat), Some(320));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn machine_busy_leaves_idle_and_iowait_out() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let line = "cpu  100 5 50 1000 40 3 2 1 7 0";
        assert_eq!(machine_busy(line), Some(161));
    }
}
