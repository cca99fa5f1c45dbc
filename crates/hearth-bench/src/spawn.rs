//! `hearth-bench spawn`: how long an agent waits for its VM, through the
//! real server over real HTTP, warm and cold, side by side in one run.
//!
//! - **Cold start** first, while no VM exists: workspace `cold` has
//!   `min_idle: 0`, so each spawn is queued and the pool boots a VM for it;
//!   the agent is polled every 2 ms until `running`. Each agent is finished
//!   and the next run starts once no VM is live.
//! - **Warm claims** then, for each client count C: workspace `warm` gets
//!   `min_idle = max_idle = C × spawns-per-client`, and once that many VMs
//!   are idle, C threads (one keep-alive client each, released together)
//!   each spawn their agents back to back, timing each `POST /v1/agents`.
//!   A warm claim is answered `running`; any other answer is counted apart
//!   (with what a GET of the agent says right after, untimed) and left out
//!   of the warm figures. After each round every agent is finished, any
//!   active agent no answer named (a spawn that failed yet created its
//!   agent) is killed, and the pool refills before the next round.
//!
//! `max_vms` is twice the largest warm pool (plus a little), so the
//! backfill the claims trigger is never capped: it boots while later claims
//! of the same round are served, as it would in production.

use crate::api::Api;
use crate::machine::Machine;
use crate::report;
use crate::server::{Server, Store};
use crate::stats::{Summary, millis};
use crate::table::{Table, fixed, summary_cells};
use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// How long the pool may take to reach its warm size.
const FILL_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How long a cold start may take.
const COLD_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a cold agent is polled.
const COLD_POLL: Duration = Duration::from_millis(2);
/// How often the pool status is polled while waiting.
const STATUS_POLL: Duration = Duration::from_millis(100);
/// How often a wait reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
pub(crate) const WARM: &str = "warm";
/// The phases of an agent that may hold or wait for a VM.
const ACTIVE_PHASES: [&str; 5] = ["queued", "provisioning", "running", "idle", "sleeping"];
const COLD: &str = "cold";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    Sandbox,
    Fake,
    /// Real microVMs: needs `--clients 1` or few (each warm VM is a qemu
    /// process of ~220 MiB); bakes a minimal image first unless `--image`.
    Qemu,
}

impl DriverKind {
    fn name(self) -> &'static str {
        match self {
            DriverKind::Sandbox => "sandbox",
            DriverKind::Fake => "fake",
            DriverKind::Qemu => "qemu",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct SpawnArgs {
    /// The VM driver of the benchmark's environment.
    #[arg(long, value_enum, default_value_t = DriverKind::Sandbox)]
    driver: DriverKind,
    /// Concurrent clients, one warm-claim level each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Spawns per client per round (the warm pool holds clients × this).
    #[arg(long, default_value_t = 4)]
    spawns_per_client: usize,
    /// Rounds per client count (the pool refills between rounds).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Cold starts, one after the other.
    #[arg(long, default_value_t = 20)]
    cold_runs: usize,
    /// `--driver qemu`: an image already recorded in the server (never
    /// with a fresh server, so in practice: leave it out and let the
    /// benchmark bake a minimal one with `hearth image bake`).
    #[arg(long, default_value = "bench")]
    image: String,
    /// `--driver qemu`: where the bake keeps its downloads (the Debian
    /// kernel, busybox) between runs.
    #[arg(long, default_value = "target/bench/image-cache")]
    image_cache: PathBuf,
    #[command(flatten)]
    server: crate::ServerArgs,
    /// Where to write the JSON results (default:
    /// target/bench/spawn-<store>-<driver>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The outcome of one timed spawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered `running`: a warm VM was claimed in the request.
    Warm,
    /// Answered 201 in another phase (queued for a boot).
    NotWarm,
    /// Not answered 201.
    Failed,
}

#[derive(Debug, Clone)]
pub(crate) struct Spawned {
    latency: Duration,
    outcome: Outcome,
    agent: Option<String>,
    detail: String,
}

/// What one client thread did in a round.
struct ClientRun {
    started: Instant,
    ended: Instant,
    spawns: Vec<Spawned>,
}

#[derive(Debug, Serialize)]
struct WarmLevel {
    clients: usize,
    pool_size: usize,
    rounds: usize,
    /// Warm claims only, ms.
    latency_ms: Option<Summary>,
    warm: usize,
    not_warm: usize,
    failed: usize,
    /// Agents found active after a round that no spawn answer named.
    swept: usize,
    /// The distinct answers of the spawns that were not warm claims (first few).
    odd_answers: Vec<String>,
    /// Spawns per second of each round (all spawns / the round's wall time).
    claims_per_second: Option<Summary>,
    samples_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct ColdResult {
    /// The spawn request alone (answered `queued`), ms.
    request_ms: Option<Summary>,
    /// From the spawn request to the agent seen `running`, ms.
    running_ms: Option<Summary>,
    /// Runs whose spawn answer already was `running` (should be none).
    answered_running: usize,
    samples_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct SpawnReport {
    benchmark: &'static str,
    machine: Machine,
    store: Store,
    driver: DriverKind,
    spawns_per_client: usize,
    rounds: usize,
    cold_runs: usize,
    max_vms: usize,
    hearth: PathBuf,
    cold: ColdResult,
    warm: Vec<WarmLevel>,
    /// Cold p50 ÷ warm p50 at the fewest clients.
    cold_warm_ratio: Option<f64>,
}

pub fn run(args: SpawnArgs) -> Result<()> {
    if args.clients.contains(&0) || args.spawns_per_client == 0 || args.rounds == 0 {
        bail!("--clients, --spawns-per-client and --rounds must be positive");
    }
    let machine = Machine::probe();
    eprintln!("[spawn] machine: {}", machine.describe());
    let config = args.server.config()?;
    let max_vms = 2 * args.clients.iter().max().unwrap_or(&1) * args.spawns_per_client + 8;
    let server = Server::start(&config)?;
    let api = server.api()?;
    if args.driver == DriverKind::Qemu {
        bake(&server, &config, &args)?;
    }
    setup(&api, args.driver, &args.image, max_vms)?;
    let server_log = || format!("the server's last log lines:\n{}", server.log_tail());
    let cold = cold_starts(&api, args.cold_runs).with_context(server_log)?;
    let mut warm = Vec::new();
    for &clients in &args.clients {
        warm.push(warm_level(&server, &api, clients, &args).with_context(server_log)?);
    }
    drop(server);
    let report = SpawnReport {
        benchmark: "spawn",
        machine,
        store: config.store,
        driver: args.driver,
        spawns_per_client: args.spawns_per_client,
        rounds: args.rounds,
        cold_runs: args.cold_runs,
        max_vms,
        hearth: config.hearth,
        cold_warm_ratio: ratio(&cold, &warm),
        cold,
        warm,
    };
    print!("{}", render(&report));
    let name = format!("spawn-{:?}-{}", report.store, args.driver.name()).to_lowercase();
    report::write_json(&report::json_path(args.json.as_deref(), &name), &report)
}

/// `hearth image bake <image> --rootfs minimal` against the server, its
/// images in a folder that lives as long as the server's data dir.
fn bake(server: &Server, config: &crate::server::ServerConfig, args: &SpawnArgs) -> Result<()> {
    let images = server.data_dir().join("bench-images");
    std::fs::create_dir_all(&args.image_cache)?;
    eprintln!("[spawn] baking image {} (minimal) …", args.image);
    let out = std::process::Command::new(&config.hearth)
        .args([
            "image",
            "bake",
            &args.image,
            "--rootfs",
            "minimal",
            "--images-dir",
        ])
        .arg(&images)
        .arg("--cache-dir")
        .arg(std::path::absolute(&args.image_cache)?)
        .arg("--guest-agent")
        .arg(&config.guest_agent)
        .env("HEARTH_SERVER", &server.url)
        .env("HEARTH_TOKEN", &server.admin_token)
        .env("HEARTH_CA", server.ca.clone().unwrap_or_default())
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "hearth image bake failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("[spawn] {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

/// The pool config, the environment and both workspaces (empty pools).
pub(crate) fn setup(api: &Api, driver: DriverKind, image: &str, max_vms: usize) -> Result<()> {
    api.put("/v1/pool-config/default", &json!({"max_vms": max_vms}))?;
    let environment = match driver {
        DriverKind::Qemu => json!({"driver": "qemu", "image": image, "memory": "256Mi"}),
        _ => json!({"driver": driver.name()}),
    };
    api.put("/v1/environments/bench", &environment)?;
    for name in [COLD, WARM] {
        set_pool_size(api, name, 0)?;
    }
    Ok(())
}

pub(crate) fn set_pool_size(api: &Api, workspace: &str, size: usize) -> Result<()> {
    let spec = json!({"environment": "bench", "min_idle": size, "max_idle": size});
    api.put(&format!("/v1/workspaces/{workspace}"), &spec)?;
    Ok(())
}

// ---- cold starts ----

fn cold_starts(api: &Api, runs: usize) -> Result<ColdResult> {
    let mut requests = Vec::with_capacity(runs);
    let mut running = Vec::with_capacity(runs);
    let mut answered_running = 0;
    for i in 1..=runs {
        let (request, ready, at_once) = cold_once(api)?;
        eprintln!(
            "[spawn] cold {i}/{runs}: request {:.1} ms, running after {:.1} ms",
            millis(request),
            millis(ready)
        );
        requests.push(request);
        running.push(ready);
        answered_running += usize::from(at_once);
    }
    Ok(ColdResult {
        request_ms: Summary::of_durations(&requests),
        running_ms: Summary::of_durations(&running),
        answered_running,
        samples_ms: running.iter().map(|d| millis(*d)).collect(),
    })
}

/// One cold start: (request time, time to `running`, answered running).
fn cold_once(api: &Api) -> Result<(Duration, Duration, bool)> {
    let start = Instant::now();
    let agent = api.post("/v1/agents", &json!({"workspace": COLD}))?;
    let request = start.elapsed();
    let id = agent_id(&agent)?;
    let at_once = agent["phase"] == "running";
    let mut last = agent;
    while last["phase"] != "running" {
        if is_terminal(&last) || start.elapsed() > COLD_TIMEOUT {
            bail!("cold agent {id} never ran: {last}");
        }
        std::thread::sleep(COLD_POLL);
        last = api.get(&format!("/v1/agents/{id}"))?;
    }
    let ready = start.elapsed();
    finish(api, &id)?;
    wait_no_live_vm(api)?;
    Ok((request, ready, at_once))
}

fn wait_no_live_vm(api: &Api) -> Result<()> {
    wait_for(api, "no live VM", |api| {
        let vms = api.get("/v1/vms")?;
        let n = vms["items"].as_array().map_or(0, Vec::len);
        Ok((n == 0, format!("{n} live VMs")))
    })
}

// ---- warm claims ----

fn warm_level(server: &Server, api: &Api, clients: usize, args: &SpawnArgs) -> Result<WarmLevel> {
    let pool_size = clients * args.spawns_per_client;
    eprintln!("[spawn] {clients} clients: warming {pool_size} VMs");
    set_pool_size(api, WARM, pool_size)?;
    wait_warm(api, pool_size)?;
    let mut spawns = Vec::new();
    let mut rates = Vec::new();
    let mut swept = 0;
    for round in 1..=args.rounds {
        let runs = run_round(server, clients, args.spawns_per_client)?;
        let done: Vec<Spawned> = runs.iter().flat_map(|r| r.spawns.clone()).collect();
        let rate = round_rate(&runs);
        let warm: Vec<Duration> = warm_latencies(&done);
        eprintln!(
            "[spawn] {clients} clients, round {round}/{}: {} warm (p50 {:.2} ms), {} not warm, {} failed, {rate:.0} spawns/s",
            args.rounds,
            warm.len(),
            Summary::of_durations(&warm).map_or(f64::NAN, |s| s.p50),
            count(&done, Outcome::NotWarm),
            count(&done, Outcome::Failed),
        );
        report_odd_spawns(&done);
        swept += end_agents(api, &done)?;
        wait_warm(api, pool_size)?;
        rates.push(rate);
        spawns.extend(done);
    }
    let warm = warm_latencies(&spawns);
    Ok(WarmLevel {
        clients,
        pool_size,
        rounds: args.rounds,
        latency_ms: Summary::of_durations(&warm),
        warm: warm.len(),
        not_warm: count(&spawns, Outcome::NotWarm),
        failed: count(&spawns, Outcome::Failed),
        swept,
        odd_answers: odd_answers(&spawns),
        claims_per_second: Summary::of(&rates),
        samples_ms: warm.iter().map(|d| millis(*d)).collect(),
    })
}

/// `clients` threads, released together, each spawning `per_client`
/// agents back to back on its own keep-alive connection.
fn run_round(server: &Server, clients: usize, per_client: usize) -> Result<Vec<ClientRun>> {
    let barrier = Barrier::new(clients);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| scope.spawn(|| client(server, &barrier, per_client)))
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a client thread panicked"))
            .collect()
    })
}

/// One client: connect (one untimed request), wait for the others, spawn.
fn client(server: &Server, barrier: &Barrier, per_client: usize) -> Result<ClientRun> {
    // Every thread reaches the barrier, even when its setup failed.
    let api = server
        .api()
        .and_then(|api| api.get("/v1/whoami").map(|_| api));
    barrier.wait();
    let api = api?;
    let started = Instant::now();
    let spawns = (0..per_client).map(|_| spawn_timed(&api)).collect();
    Ok(ClientRun {
        started,
        ended: Instant::now(),
        spawns,
    })
}

pub(crate) fn spawn_timed(api: &Api) -> Spawned {
    let body = json!({"workspace": WARM});
    let start = Instant::now();
    let answer = api.call(Method::POST, "/v1/agents", Some(&body));
    let latency = start.elapsed();
    let (outcome, agent, detail) = match answer {
        Ok(a) if a.status == 201 => {
            let phase = a.body["phase"].as_str().unwrap_or_default();
            let id = a.body["id"].as_str().map(str::to_owned);
            match phase {
                "running" => (Outcome::Warm, id, phase.to_owned()),
                _ => {
                    let detail = format!("answered {phase}; {}", phase_now(api, id.as_deref()));
                    (Outcome::NotWarm, id, detail)
                }
            }
        }
        Ok(a) => (Outcome::Failed, None, format!("{} {}", a.status, a.body)),
        Err(e) => (Outcome::Failed, None, format!("{e:#}")),
    };
    Spawned {
        latency,
        outcome,
        agent,
        detail,
    }
}

/// What the agent is right after an answer that was not a warm claim
/// (untimed; tells a stale answer from a real miss).
fn phase_now(api: &Api, id: Option<&str>) -> String {
    let Some(id) = id else {
        return "no agent id".into();
    };
    match api.get(&format!("/v1/agents/{id}")) {
        Ok(agent) => format!(
            "a GET right after: {} on VM {}",
            agent["phase"], agent["vm"]
        ),
        Err(e) => format!("a GET right after failed: {e:#}"),
    }
}

/// All spawns of a round per second of its wall time (first start to last
/// end across the clients).
fn round_rate(runs: &[ClientRun]) -> f64 {
    let (Some(first), Some(last)) = (
        runs.iter().map(|r| r.started).min(),
        runs.iter().map(|r| r.ended).max(),
    ) else {
        return 0.0;
    };
    let n: usize = runs.iter().map(|r| r.spawns.len()).sum();
    n as f64 / (last - first).as_secs_f64().max(f64::EPSILON)
}

pub(crate) fn warm_latencies(spawns: &[Spawned]) -> Vec<Duration> {
    spawns
        .iter()
        .filter(|s| s.outcome == Outcome::Warm)
        .map(|s| s.latency)
        .collect()
}

pub(crate) fn count(spawns: &[Spawned], outcome: Outcome) -> usize {
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

/// Says what the first few spawns that were not warm claims answered.
fn report_odd_spawns(spawns: &[Spawned]) {
    for s in spawns.iter().filter(|s| s.outcome != Outcome::Warm).take(3) {
        eprintln!("[spawn]   not a warm claim: {:?} {}", s.outcome, s.detail);
    }
}

/// Finishes the warm agents and kills the others (queued ones cannot
/// finish), then sweeps the workspace; returns how many agents the sweep
/// ended.
pub(crate) fn end_agents(api: &Api, spawns: &[Spawned]) -> Result<usize> {
    for s in spawns {
        let Some(id) = &s.agent else { continue };
        match s.outcome {
            Outcome::Warm => finish(api, id)?,
            _ => kill(api, id)?,
        }
    }
    sweep(api, WARM)
}

/// Kills the agents of `workspace` still active that the benchmark does
/// not know of (a spawn answered with an error but created its agent
/// anyway), so that the pool can settle; returns how many.
fn sweep(api: &Api, workspace: &str) -> Result<usize> {
    let mut swept = 0;
    for phase in ACTIVE_PHASES {
        let list = api.get(&format!("/v1/agents?workspace={workspace}&phase={phase}"))?;
        for agent in list["items"].as_array().into_iter().flatten() {
            let id = agent_id(agent)?;
            eprintln!("[spawn]   sweeping agent {id} ({phase}) that no spawn answer named");
            if let Err(e) = kill(api, &id) {
                eprintln!("[spawn]   cannot kill {id}: {e:#}");
            }
            swept += 1;
        }
    }
    Ok(swept)
}

/// Waits until the warm workspace holds `size` idle VMs and nothing else
/// happens in the pool (no agent, boot or destroy).
pub(crate) fn wait_warm(api: &Api, size: usize) -> Result<()> {
    wait_for(api, &format!("{size} warm VMs"), |api| {
        let status = api.get("/v1/pool/status")?;
        let ws = status["workspaces"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["name"] == WARM))
            .cloned()
            .unwrap_or(Value::Null);
        // A back-off ends by itself (the wait reports it); a hard limit does not.
        if ws["status"] == "hard_limited" {
            bail!("the warm pool is hard-limited: {}", ws["last_error"]);
        }
        let n = |v: &Value, key: &str| v[key].as_u64().unwrap_or(0);
        let done = n(&ws, "idle") == size as u64
            && n(&ws, "booting") == 0
            && n(&ws, "active") == 0
            && n(&status["vms"], "draining") == 0
            && n(&status, "queued") == 0;
        let mut progress = format!(
            "idle {}/{size}, booting {}, active {}, draining {}",
            n(&ws, "idle"),
            n(&ws, "booting"),
            n(&ws, "active"),
            n(&status["vms"], "draining")
        );
        if let Some(error) = ws["last_error"].as_str() {
            progress.push_str(&format!("; last error: {error}"));
        }
        Ok((done, progress))
    })
}

// ---- shared ----

/// Polls `check` (which says whether it is done, and how far it is) until
/// done, reporting progress now and then; fails after [`FILL_TIMEOUT`].
fn wait_for(
    api: &Api,
    what: &str,
    mut check: impl FnMut(&Api) -> Result<(bool, String)>,
) -> Result<()> {
    let start = Instant::now();
    let mut reported = start;
    loop {
        let (done, progress) = check(api)?;
        if done {
            return Ok(());
        }
        if start.elapsed() > FILL_TIMEOUT {
            bail!("gave up waiting for {what} after {FILL_TIMEOUT:?}: {progress}");
        }
        if reported.elapsed() > PROGRESS_EVERY {
            eprintln!("[spawn]   waiting for {what}: {progress}");
            reported = Instant::now();
        }
        std::thread::sleep(STATUS_POLL);
    }
}

fn kill(api: &Api, id: &str) -> Result<()> {
    api.post(&format!("/v1/agents/{id}/kill"), &json!({}))?;
    Ok(())
}

fn finish(api: &Api, id: &str) -> Result<()> {
    api.post(
        &format!("/v1/agents/{id}/finish"),
        &json!({"status": "completed"}),
    )?;
    Ok(())
}

fn agent_id(agent: &Value) -> Result<String> {
    agent["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no agent id in {agent}"))
}

fn is_terminal(agent: &Value) -> bool {
    matches!(
        agent["phase"].as_str(),
        Some("completed" | "failed" | "killed")
    )
}

fn ratio(cold: &ColdResult, warm: &[WarmLevel]) -> Option<f64> {
    let fewest = warm.iter().min_by_key(|l| l.clients)?;
    Some(cold.running_ms?.p50 / fewest.latency_ms?.p50)
}

// ---- output ----

fn render(report: &SpawnReport) -> String {
    let title = format!("{} driver, {:?} store", report.driver.name(), report.store).to_lowercase();
    let mut warm = Table::new([
        "warm claims: clients",
        "warm pool",
        "p50 ms",
        "p99 ms",
        "max ms",
        "n",
        "not warm",
        "failed",
        "spawns/s (p50)",
    ]);
    for level in &report.warm {
        let mut cells = vec![level.clients.to_string(), level.pool_size.to_string()];
        cells.extend(summary_cells(level.latency_ms.as_ref(), 2));
        cells.push(level.not_warm.to_string());
        cells.push(level.failed.to_string());
        cells.push(
            level
                .claims_per_second
                .map_or("-".into(), |s| fixed(s.p50, 0)),
        );
        warm.row(cells);
    }
    let mut side = Table::new(["spawn → running", "p50 ms", "p99 ms", "max ms", "n"]);
    if let Some(fewest) = report.warm.iter().min_by_key(|l| l.clients) {
        let mut cells = vec![format!("warm claim ({} client)", fewest.clients)];
        cells.extend(summary_cells(fewest.latency_ms.as_ref(), 2));
        side.row(cells);
    }
    let mut cells = vec!["cold start (boot a VM)".to_owned()];
    cells.extend(summary_cells(report.cold.running_ms.as_ref(), 2));
    side.row(cells);
    let mut cells = vec!["cold: the spawn request alone".to_owned()];
    cells.extend(summary_cells(report.cold.request_ms.as_ref(), 2));
    side.row(cells);
    let ratio = report
        .cold_warm_ratio
        .map_or("-".into(), |r| format!("{r:.0}×"));
    format!(
        "\nWarm claims ({title}, {} spawns per client, {} rounds)\n\n{}{}\nCold start vs warm claim ({title})\n\n{}\ncold/warm ratio (p50): {ratio}\n",
        report.spawns_per_client,
        report.rounds,
        warm.render(),
        render_odd(&report.warm),
        side.render()
    )
}

/// The answers of the spawns that were not warm claims, per client count.
fn render_odd(levels: &[WarmLevel]) -> String {
    let mut out = String::new();
    for level in levels
        .iter()
        .filter(|l| !l.odd_answers.is_empty() || l.swept > 0)
    {
        out.push_str(&format!(
            "\n{} clients: {} agents swept after their spawn failed; answers that were not warm claims:\n",
            level.clients, level.swept
        ));
        for answer in &level.odd_answers {
            out.push_str(&format!("- {answer}\n"));
        }
    }
    out
}
