//! `hearth server`: opens the store, bootstraps the first tenant, serves the
//! API and shuts down gracefully on SIGINT/SIGTERM.

use anyhow::Context;
use hearth_store::Store;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "HEARTH_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where the server keeps its files (SQLite database, admin token).
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = ".hearth")]
    data_dir: PathBuf,
    /// `postgres://…` for PostgreSQL, `sqlite://PATH`; default: SQLite in the data dir.
    #[arg(long, env = "HEARTH_DATABASE_URL")]
    database_url: Option<String>,
    /// The key sealing environment variable values and repo credentials in
    /// the store: 64 hex digits, mode 0600, the same on every replica
    /// (default: <data-dir>/secrets.key, made on first start).
    #[arg(long, env = "HEARTH_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Log line format.
    #[arg(long, env = "HEARTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    /// The build agents' workflows are pinned to (default: hearth-<version>).
    #[arg(long, env = "HEARTH_BUILD")]
    build: Option<String>,
    /// A VM still booting after this long is given up (counts as a failure).
    #[arg(long, env = "HEARTH_BOOT_TIMEOUT", default_value = "5m", value_parser = duration)]
    boot_timeout: Duration,
    /// Most VMs of one tenant booting at once.
    #[arg(long, env = "HEARTH_MAX_CONCURRENT_BOOTS", default_value_t = 8)]
    max_concurrent_boots: usize,
    /// Consecutive failed boots after which a workspace stops refilling.
    #[arg(long, env = "HEARTH_HARD_LIMIT_FAILURES", default_value_t = 5)]
    hard_limit_failures: i64,
    /// First back-off after a failed boot (doubles per failure).
    #[arg(long, env = "HEARTH_BACKOFF_BASE", default_value = "5s", value_parser = duration)]
    backoff_base: Duration,
    /// Longest back-off.
    #[arg(long, env = "HEARTH_BACKOFF_MAX", default_value = "5m", value_parser = duration)]
    backoff_max: Duration,
    /// How long a workflow stays stranded on a retired build before
    /// `reap_stranded_workflows: enabled` terminates it.
    #[arg(long, env = "HEARTH_REAP_AFTER", default_value = "48h", value_parser = duration)]
    reap_after: Duration,
    /// Longest any one provisioning command (clone, hook, setup) may run.
    #[arg(long, env = "HEARTH_COMMAND_TIMEOUT", default_value = "30m", value_parser = duration)]
    command_timeout: Duration,
    /// The pool's slow periodic resync (it is also woken by every change).
    #[arg(long, env = "HEARTH_RESYNC", default_value = "30s", value_parser = duration)]
    resync: Duration,
    /// Bake inputs (kernel and busybox packages, Debian trees) kept between
    /// bakes (default: `<data-dir>/images/cache`).
    #[arg(long, env = "HEARTH_IMAGE_CACHE_DIR")]
    image_cache_dir: Option<PathBuf>,
    /// A connection must deliver a whole request head within this long of
    /// opening (or of the first byte of a later request), else it is closed.
    #[arg(long, env = "HEARTH_HEADER_TIMEOUT", default_value = "10s", value_parser = duration)]
    header_timeout: Duration,
    /// A connection with no request in flight and no traffic for this long
    /// is closed.
    #[arg(long, env = "HEARTH_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    idle_timeout: Duration,
    /// Most client connections open at once (further ones wait to be accepted).
    #[arg(long, env = "HEARTH_MAX_CONNECTIONS", default_value_t = 1024,
        value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// `max_vms` of the pool config every new tenant starts with.
    #[arg(long, env = "HEARTH_DEFAULT_MAX_VMS", default_value_t = hearth_core::resource::DEFAULT_MAX_VMS,
        value_parser = clap::value_parser!(i32).range(1..))]
    default_max_vms: i32,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
    /// The fleet's join token: nodes join with it and their credentials
    /// derive from it, so it is the same on every replica (default:
    /// <data-dir>/join-token, made 0600 on first start).
    #[arg(long, env = "HEARTH_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// Run no driver in the server: a fleet's control plane, whose VMs
    /// all run on `hearth node`s.
    #[arg(long, env = "HEARTH_NO_LOCAL_NODE")]
    no_local_node: bool,
    /// How often nodes report.
    #[arg(long, env = "HEARTH_NODE_HEARTBEAT", default_value = "2s", value_parser = duration)]
    node_heartbeat: Duration,
    /// A node that has not reported for this long is unreachable.
    #[arg(long, env = "HEARTH_NODE_TIMEOUT", default_value = "10s", value_parser = duration)]
    node_timeout: Duration,
    /// An unreachable node's assigned VMs are lost after this long; a node
    /// that could not report for this long destroys its VMs.
    #[arg(long, env = "HEARTH_NODE_LOST_AFTER", default_value = "60s", value_parser = duration)]
    node_lost_after: Duration,
    /// This replica's id (what `vms.task_owner` records; default: random).
    #[arg(long, env = "HEARTH_REPLICA_ID")]
    replica_id: Option<String>,
    // ---- webhooks
    /// Let webhooks reach loopback, private, link-local and other inside
    /// addresses, and plain http:// URLs (a receiver on the operator's own
    /// network). Off by default: a tenant-named URL never reaches inside.
    #[arg(long, env = "HEARTH_WEBHOOK_ALLOW_PRIVATE")]
    webhook_allow_private: bool,
    /// Attempts at one event before a webhook delivery is marked failed.
    #[arg(long, env = "HEARTH_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    webhook_max_attempts: u32,
    /// How long the webhook delivery log keeps an attempt.
    #[arg(long, env = "HEARTH_WEBHOOK_LOG_RETENTION", default_value = "7d", value_parser = duration)]
    webhook_log_retention: Duration,
    /// The drivers of the embedded node.
    #[command(flatten)]
    drivers: crate::node::DriverArgs,
    // ---- events (H2)
    /// Events older than this are deleted (`GET /v1/events` and the stream
    /// reach back this far).
    #[arg(long, env = "HEARTH_EVENT_RETENTION", default_value = "7d", value_parser = duration)]
    event_retention: Duration,

    // ---- metrics (H1)
    /// A file holding the metrics token: a scrape of `/metrics` that
    /// presents it as its bearer token needs no identity.
    #[arg(long, env = "HEARTH_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<PathBuf>,
    /// Also serve `/metrics` alone, over plain HTTP, on this address: with
    /// no authentication on a loopback address; any other address needs
    /// `--metrics-token-file`, and its scrapes must present that token.
    #[arg(long, env = "HEARTH_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    hearth_core::resource::parse_duration_ms(text)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is not a duration such as 250ms, 90s, 15m or 2h"))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum LogFormat {
    Json,
    Pretty,
}

/// Name of the file in the data dir holding the first admin token.
const TOKEN_FILE: &str = "admin-token";
/// Written before the bootstrap transaction, renamed after it commits, so a
/// crash in between never loses the only admin token.
const PENDING_TOKEN_FILE: &str = "admin-token.pending";
/// The URL a CLI on this machine reaches the server at, written on every
/// start: the admin token beside it is bound to this server.
const SERVER_URL_FILE: &str = "server-url";
/// The fleet's join token in the data dir (default `--join-token-file`).
pub(crate) const JOIN_TOKEN_FILE: &str = "join-token";
/// The embedded node's own CA and certificate (apart from the server's
/// `tls/`, which exists only when the server serves its own CA).
const EMBEDDED_NODE_TLS_DIR: &str = "node-tls";

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    hearth_api::edge::log_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

pub(crate) fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Pretty => builder.init(),
    }
}

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
        .with_context(|| format!("cannot create the data dir {}", args.data_dir.display()))?;
    let metrics_token = metrics_token(&args)?;
    let transport = crate::tls::setup(&args.tls, &args.data_dir, args.listen)?;
    let store = hearth_store::open(args.database_url.as_deref(), &args.data_dir)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store: {}", hearth_api::error::chain(&e)))?;
    tracing::info!(store = store.backend(), data_dir = %args.data_dir.display(), "store open, migrations applied");
    crate::secrets_key::unlock(&store, &args.data_dir, args.secrets_key_file.as_deref()).await?;
    let pool_config = serde_json::to_value(hearth_core::resource::PoolConfig::initial(
        args.default_max_vms,
    ))?;
    bootstrap(&store, &args.data_dir, &pool_config).await?;
    let backfilled = store
        .backfill_pool_configs(&pool_config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot backfill pool configs: {e}"))?;
    if backfilled > 0 {
        tracing::info!(
            tenants = backfilled,
            max_vms = args.default_max_vms,
            "gave the default pool config to tenants that had none"
        );
    }

    let options = pool_options(&args, &store).await?;
    let options_replica = options.replica.clone();
    // Images recorded before artifacts were kept in the store get theirs,
    // so every node can fetch them (in the background: a large disk image
    // takes a while, and nothing else waits for it).
    if let Some(images) = options.images.clone() {
        let store = store.clone();
        tokio::spawn(async move {
            let published =
                hearth_reconcilers::publish::publish_missing(store.as_ref(), &images).await;
            if published > 0 {
                tracing::info!(
                    images = published,
                    "published older images' artifacts to the store"
                );
            }
        });
    }
    let token_path = args
        .join_token_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join(JOIN_TOKEN_FILE));
    let fleet_config = hearth_api::fleet::FleetConfig {
        join_token: Arc::new(join_token(&token_path)?),
        local_node: (!args.no_local_node).then(local_node_name),
    };
    let fleet = crate::node::remote::RemoteFleet::new(store.clone(), fleet_config.clone());
    // The embedded node's drivers, and the same reached through the fleet
    // (what adoption at start lists).
    let local_drivers = match args.no_local_node {
        true => None,
        false => Some(crate::node::build_drivers(&args.drivers, &args.data_dir).await?),
    };
    let pool = match &local_drivers {
        Some(local) => {
            let mut through_fleet = hearth_drivers::Drivers::new();
            for driver in local.all() {
                through_fleet =
                    through_fleet.with(Arc::new(crate::node::remote::DefaultNodeDriver {
                        fleet: fleet.clone(),
                        kind: driver.kind(),
                    }));
            }
            hearth_reconcilers::Pool::with_local_node(
                store.clone(),
                fleet.clone(),
                through_fleet,
                options,
            )
        }
        None => hearth_reconcilers::Pool::with_fleet(store.clone(), fleet.clone(), options),
    };

    if let Some(token) = &metrics_token {
        pool.metrics().set_scrape_token(token);
    }
    let metrics_task = match args.metrics_listen {
        Some(at) => Some(serve_metrics(at, !at.ip().is_loopback(), pool.clone()).await?),
        None => None,
    };
    let listener = crate::listener::bind(args.listen, args.max_connections)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let url = local_url(transport.scheme, addr);
    let app = hearth_api::router(hearth_api::AppState {
        store: store.clone(),
        pool: pool.clone(),
        default_max_vms: args.default_max_vms,
        fleet: fleet_config.clone(),
        webhooks: hearth_api::webhooks::WebhookPolicy {
            allow_private: args.webhook_allow_private,
        },
    });
    let mut node_tasks = Vec::new();
    if let (Some(drivers), Some(name)) = (local_drivers, fleet_config.local_node.clone()) {
        let data_dir = fs::canonicalize(&args.data_dir)?;
        // The embedded node fetches artifacts from this server over
        // loopback: it trusts this server's CA, or the operator's chain.
        let ca = match (&transport.ca_file, &args.tls.tls_cert) {
            (Some(ca), _) | (None, Some(ca)) => {
                Some(fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?)
            }
            (None, None) => None,
        };
        let state = crate::node::service::NodeState::new(
            drivers.clone(),
            vec![url.clone()],
            data_dir.join("artifacts"),
            crate::node::control_plane_client(ca.as_deref(), None)?,
        );
        // The image store's files are on this host: the embedded node uses
        // them where they are rather than a second copy fetched through the
        // store (a debian disk is gigabytes).
        state
            .shares_host
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let listening = crate::node::listen(
            "127.0.0.1:0".parse().expect("an address"),
            None,
            &data_dir.join(EMBEDDED_NODE_TLS_DIR),
            state.clone(),
            stop_rx.clone(),
        )
        .await?;
        // One host, as before nodes: `max_vms` is its limit, so the
        // embedded node offers cpus and memory without bound (a fleet's
        // nodes report what their hosts have).
        let capacity = crate::node::CapacityArgs {
            cpus: Some(EMBEDDED_NODE_UNBOUNDED),
            memory_mib: Some(EMBEDDED_NODE_UNBOUNDED),
            vm_slots: EMBEDDED_NODE_UNBOUNDED,
            max_boots: args.max_concurrent_boots.max(1) as i64,
            ..Default::default()
        }
        .detect(&data_dir, &drivers);
        let config = crate::node::agent::AgentConfig {
            name,
            address: listening.address.clone(),
            ca_pem: listening.ca_pem.clone(),
            join_token: fleet_config.join_token.to_string(),
            capacity,
        };
        let (joined_tx, joined_rx) = tokio::sync::oneshot::channel();
        node_tasks.push(tokio::spawn(crate::node::agent::run(
            config,
            crate::node::agent::Link::InProcess(app.clone()),
            state,
            drivers,
            Some(joined_tx),
            stop_rx.clone(),
        )));
        node_tasks.push(listening.task);
        tokio::time::timeout(Duration::from_secs(60), joined_rx)
            .await
            .map_err(|_| {
                anyhow::anyhow!("the embedded node did not join within 60 s (see the log)")
            })?
            .map_err(|_| anyhow::anyhow!("the embedded node stopped before it joined"))?;
        // On PostgreSQL other replicas may be booting right now: what a
        // previous leader left is resolved per tenant when this replica
        // starts leading it (`Pool::take_over`), and what the node runs by
        // its join. A SQLite store has one process, which owns every VM:
        // it also reconciles its embedded node's listing with the store.
        if store.backend() == "sqlite" {
            let report = pool
                .adopt()
                .await
                .map_err(|e| anyhow::anyhow!("cannot adopt the embedded node's VMs: {e}"))?;
            tracing::info!(
                adopted = report.adopted,
                unknown_destroyed = report.unknown_destroyed,
                records_closed = report.records_closed,
                agents_failed = report.agents_failed,
                agents_requeued = report.agents_requeued,
                agents_reattached = report.agents_reattached,
                "reconciled the drivers' VMs with the store"
            );
        }
    } else {
        tracing::info!(join_token = %token_path.display(), "no local node: VMs run on the nodes that join");
    }
    let mut webhook_worker = hearth_api::webhooks::deliver::WorkerConfig::new(
        options_replica.clone(),
        hearth_api::webhooks::WebhookPolicy {
            allow_private: args.webhook_allow_private,
        },
        hearth_api::webhooks::deliver::Retry {
            max_attempts: args.webhook_max_attempts,
            ..Default::default()
        },
    );
    webhook_worker.log_retention = args.webhook_log_retention;
    let webhooks = tokio::spawn(hearth_api::webhooks::deliver::run(
        store.clone(),
        webhook_worker,
        stop_rx.clone(),
    ));
    let retention = tokio::spawn(hearth_api::events::keep_for(
        store.clone(),
        args.event_retention,
        stop_rx.clone(),
    ));
    let runner = tokio::spawn(pool.clone().run(stop_rx));
    write_public(&args.data_dir.join(SERVER_URL_FILE), &url)?;
    match (&transport.ca_file, &transport.fingerprint) {
        (Some(ca), Some(fingerprint)) => {
            tracing::info!(ca = %ca.display(), %fingerprint, "TLS with the server's own CA");
            println!(
                "hearth: serving TLS at {url}; clients trust the CA {} (SHA-256 {fingerprint})",
                ca.display()
            );
        }
        (None, Some(fingerprint)) => {
            tracing::info!(%fingerprint, "TLS with the operator's certificate")
        }
        _ => tracing::warn!("serving plain HTTP on loopback (--plain-http): no TLS"),
    }
    tracing::info!(%addr, %url, "listening");
    let limits = crate::listener::Limits {
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections as usize,
    };
    crate::listener::serve(listener, app, limits, transport.config, shutdown_signal()).await;
    let _ = stop_tx.send(true);
    let _ = runner.await;
    let _ = webhooks.await;
    let _ = retention.await;

    if let Some(task) = metrics_task {
        task.abort();
    }
    for task in node_tasks {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The image store under `<data-dir>/images`; bakes a crash interrupted
/// are marked failed (nothing else would end them).
async fn image_store(
    args: &ServerArgs,
    store: &Arc<dyn Store>,
) -> anyhow::Result<Arc<hearth_reconcilers::images::ImageStoreConfig>> {
    let dir = fs::canonicalize(&args.data_dir)?.join("images");
    for sub in [dir.clone(), dir.join(hearth_reconcilers::images::PREBUILT)] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&sub)
            .with_context(|| format!("cannot create the image store {}", sub.display()))?;
    }
    let cache = args
        .image_cache_dir
        .clone()
        .unwrap_or_else(|| dir.join("cache"));
    let interrupted = store
        .fail_active_bakes("interrupted: the server stopped during the bake")
        .await
        .map_err(|e| anyhow::anyhow!("cannot close interrupted bakes: {e}"))?;
    if interrupted > 0 {
        tracing::warn!(
            bakes = interrupted,
            "marked bakes interrupted by the last stop failed"
        );
    }
    let agent = args
        .drivers
        .guest_agent
        .clone()
        .or_else(hearth_drivers::sandbox::find_agent_binary);
    Ok(Arc::new(hearth_reconcilers::images::ImageStoreConfig::new(
        dir,
        std::path::absolute(&cache)?,
        agent,
    )))
}

/// The pool's options from the flags, and the build record.
async fn pool_options(
    args: &ServerArgs,
    store: &Arc<dyn Store>,
) -> anyhow::Result<hearth_reconcilers::PoolOptions> {
    let mut options = hearth_reconcilers::PoolOptions {
        images: Some(image_store(args, store).await?),
        ..Default::default()
    };
    if let Some(build) = &args.build {
        options.build = build.clone();
    }
    let ms = |d: Duration| d.as_millis() as i64;
    options.settings.boot_timeout_ms = ms(args.boot_timeout);
    options.settings.max_concurrent_boots = args.max_concurrent_boots.max(1);
    options.settings.hard_limit_failures = args.hard_limit_failures.max(1);
    options.settings.backoff_base_ms = ms(args.backoff_base);
    options.settings.backoff_max_ms = ms(args.backoff_max);
    options.reap_after = args.reap_after;
    options.resync = args.resync;
    options.command_timeout = args.command_timeout;
    options.fleet = hearth_reconcilers::FleetTimings {
        heartbeat: args.node_heartbeat,
        node_timeout: args.node_timeout,
        lost_after: args.node_lost_after,
    };
    if let Some(replica) = &args.replica_id {
        anyhow::ensure!(
            !replica.trim().is_empty(),
            "--replica-id: give a name, or leave it out for a random one"
        );
        options.replica = replica.clone();
    }
    tracing::info!(replica = %options.replica, "pool replica");
    store.name_replica(&options.replica);
    store
        .register_build(&options.build)
        .await
        .map_err(|e| anyhow::anyhow!("cannot record the build: {e}"))?;
    Ok(options)
}

// ---- metrics (H1)

/// The metrics token of `--metrics-token-file`, and the check that a
/// `--metrics-listen` off loopback has one: a plain listener open to a
/// network would else hand the fleet's layout to anyone who asks.
fn metrics_token(args: &ServerArgs) -> anyhow::Result<Option<String>> {
    let token = match &args.metrics_token_file {
        None => None,
        Some(path) => {
            let text = fs::read_to_string(path)
                .with_context(|| format!("--metrics-token-file: cannot read {}", path.display()))?;
            let token = text.trim().to_owned();
            anyhow::ensure!(
                token.len() >= 16,
                "--metrics-token-file: {} must hold a token of at least 16 characters",
                path.display()
            );
            Some(token)
        }
    };
    if let Some(at) = args.metrics_listen
        && !at.ip().is_loopback()
        && token.is_none()
    {
        anyhow::bail!(
            "--metrics-listen {at} is not a loopback address: also pass --metrics-token-file, whose token its scrapes must then present"
        );
    }
    Ok(token)
}

/// Serves `/metrics` alone on `at` (plain HTTP) until the process ends;
/// scrapes must present the metrics token when `token` is set.
async fn serve_metrics(
    at: SocketAddr,
    token: bool,
    pool: Arc<hearth_reconcilers::Pool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .with_context(|| format!("--metrics-listen: cannot listen on {at}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, token, "metrics listening (plain HTTP)");
    let app = hearth_api::metrics::plain_router(pool, token);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    }))
}

/// The fleet's join token: read from `path`, or made there (0600) on
/// first start.
fn join_token(path: &Path) -> anyhow::Result<String> {
    match fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Ok(_) => anyhow::bail!("the join token file {} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = format!("hjt_{}", hearth_api::auth::issue_token(None).text);
            write_secret(path, &token)?;
            tracing::info!(path = %path.display(), "made the fleet's join token");
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read the join token {}", path.display())),
    }
}

/// What the embedded node offers of cpus, memory (MiB) and VM slots: more
/// than any `max_vms` asks.
const EMBEDDED_NODE_UNBOUNDED: i64 = 1 << 30;

/// The name of a server's embedded node.
fn local_node_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-local")
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}

/// On an empty store, creates the first tenant and its operator, prints the
/// token once and keeps it in a 0600 file of the data dir.
async fn bootstrap(
    store: &Arc<dyn Store>,
    data_dir: &Path,
    pool_config: &serde_json::Value,
) -> anyhow::Result<()> {
    let token_path = data_dir.join(TOKEN_FILE);
    let pending_path = data_dir.join(PENDING_TOKEN_FILE);
    let token = hearth_api::auth::issue_token(None);
    if store
        .list_tenants()
        .await
        .map(|t| t.is_empty())
        .unwrap_or(true)
    {
        write_secret(&pending_path, &token.text)?;
    }
    match store
        .bootstrap("default", "admin", &token.stored, pool_config)
        .await?
    {
        Some((tenant, identity)) => {
            if !pending_path.exists() {
                write_secret(&pending_path, &token.text)?;
            }
            fs::rename(&pending_path, &token_path)?;
            tracing::info!(tenant = %tenant.name, identity = %identity.name, path = %token_path.display(), "first start: tenant and operator token created");
            println!(
                "hearth: first start — created tenant \"{}\" and operator \"{}\".\nAdmin token (shown once; also saved to {}):\n  {}\n",
                tenant.name,
                identity.name,
                token_path.display(),
                token.text
            );
        }
        None => recover_pending(store, &pending_path, &token_path).await?,
    }
    Ok(())
}

/// A pending token left by a crash right after the bootstrap committed is
/// the only admin token: keep it if the store knows it, else drop it.
async fn recover_pending(
    store: &Arc<dyn Store>,
    pending: &Path,
    token_path: &Path,
) -> anyhow::Result<()> {
    let Ok(text) = fs::read_to_string(pending) else {
        return Ok(());
    };
    let known = match text
        .trim()
        .strip_prefix("hth_")
        .and_then(|r| r.split_once('_'))
    {
        Some((id, _)) => match id.parse() {
            Ok(id) => store
                .find_token(hearth_core::ids::TokenId(id))
                .await?
                .is_some(),
            Err(_) => false,
        },
        None => false,
    };
    if known && !token_path.exists() {
        fs::rename(pending, token_path)?;
        tracing::warn!(path = %token_path.display(), "recovered the admin token of an interrupted first start");
    } else {
        fs::remove_file(pending)?;
    }
    Ok(())
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(())
}

/// The URL a client on this machine uses for a server listening on `addr`
/// (an unspecified address is reached on loopback).
fn local_url(scheme: &str, addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("{scheme}://{}", SocketAddr::new(ip, addr.port()))
}

/// Writes a file anyone may read (replacing it whole).
fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    let pending = path.with_extension("pending");
    fs::write(&pending, format!("{text}\n"))
        .with_context(|| format!("cannot write {}", pending.display()))?;
    fs::rename(&pending, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The first `name` on `PATH`, or `name` itself when it is a path.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}
