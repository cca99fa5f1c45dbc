//! The node: a host's drivers served over HTTPS to the control plane.
//!
//! `hearth node` runs it alone (joining servers with the fleet's join
//! token); `hearth server` runs the same code in-process as its embedded
//! node. `service.rs` is the node's API, `remote.rs` the server's client of
//! it (a `Fleet` of `RemoteDriver`s), `agent.rs` the join/heartbeat loop
//! with the self-fence.

pub mod agent;
pub mod artifacts;
pub mod remote;
pub mod service;

use anyhow::Context;
use hearth_drivers::Drivers;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The driver flags, the same for `hearth server` (its embedded node) and
/// `hearth node`.
#[derive(clap::Args, Debug, Clone)]
pub struct DriverArgs {
    /// The guest agent binary put into sandboxes (default: next to hearth).
    #[arg(long, env = "HEARTH_GUEST_AGENT")]
    pub guest_agent: Option<PathBuf>,
    /// The host uid and gid of every sandbox's root; the sandboxes use the
    /// 65536 ids from there (no real user should own any of them).
    #[arg(long, env = "HEARTH_SANDBOX_UID_BASE", default_value_t = hearth_drivers::sandbox::DEFAULT_UID_BASE)]
    pub sandbox_uid_base: u32,
    /// The host bridge `network: egress` VMs are attached to (also the name
    /// of hearth's nftables tables).
    #[arg(long, env = "HEARTH_VM_BRIDGE", default_value = hearth_drivers::net::DEFAULT_BRIDGE)]
    pub vm_bridge: String,
    /// The subnet of the VM bridge; its first address is every VM's
    /// gateway, DNS server and way to `allow_host_ports`.
    #[arg(long, env = "HEARTH_VM_SUBNET", default_value = hearth_drivers::net::DEFAULT_SUBNET)]
    pub vm_subnet: String,
    /// Accelerator of the qemu driver: `auto` (KVM only after a probe boot
    /// succeeds, else TCG), `kvm` or `tcg`.
    #[arg(long, env = "HEARTH_QEMU_ACCEL", default_value = "auto")]
    pub qemu_accel: String,
    /// Boot latency of the fake driver (simulation).
    #[arg(long, env = "HEARTH_FAKE_BOOT_LATENCY", default_value = "0ms", value_parser = crate::server::duration)]
    pub fake_boot_latency: Duration,
    /// Probability that a fake boot fails (simulation).
    #[arg(long, env = "HEARTH_FAKE_FAILURE_RATE", default_value_t = 0.0)]
    pub fake_failure_rate: f64,
}

/// A client of the control plane's servers, trusting only the CAs of
/// `ca_pem` (a PEM bundle: one CA per replica, or one for all) when given,
/// else the system's roots. `total`: the longest a whole request may take
/// (joins and heartbeats); `None` for artifacts, which may be large: then
/// only a read that stalls for a minute fails.
pub fn control_plane_client(
    ca_pem: Option<&[u8]>,
    total: Option<Duration>,
) -> anyhow::Result<reqwest::Client> {
    let mut http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60));
    if let Some(total) = total {
        http = http.timeout(total);
    }
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)?;
        anyhow::ensure!(!certs.is_empty(), "no certificate in the CA bundle");
        http = http.tls_built_in_root_certs(false);
        for cert in certs {
            http = http.add_root_certificate(cert);
        }
    }
    Ok(http.use_rustls_tls().build()?)
}

/// The flags of `hearth node`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// A server of the control plane (repeatable: its replicas, tried in turn).
    #[arg(
        long = "server",
        env = "HEARTH_SERVERS",
        value_delimiter = ',',
        required = true
    )]
    pub servers: Vec<String>,
    /// The CA the servers' certificates are issued by (PEM); default: the
    /// system's roots.
    #[arg(long, env = "HEARTH_CA")]
    pub ca: Option<PathBuf>,
    /// The fleet's join token (the server's `--join-token-file`); default
    /// `<data-dir>/join-token`.
    #[arg(long, env = "HEARTH_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Address the node's API listens on.
    #[arg(long, env = "HEARTH_NODE_LISTEN", default_value = "0.0.0.0:7071")]
    pub listen: SocketAddr,
    /// The URL the servers reach the node at (default: from --listen, the
    /// host name for an unspecified address).
    #[arg(long, env = "HEARTH_NODE_ADVERTISE")]
    pub advertise: Option<String>,
    /// The node's name in the fleet (default: the host name).
    #[arg(long, env = "HEARTH_NODE_NAME")]
    pub name: Option<String>,
    /// Where the node keeps its files (sandboxes, VMs, image cache, TLS).
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = ".hearth-node")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    #[command(flatten)]
    pub drivers: DriverArgs,
    /// Log line format.
    #[arg(long, env = "HEARTH_LOG_FORMAT", value_enum, default_value_t = crate::server::LogFormat::Pretty)]
    pub log_format: crate::server::LogFormat,
}

/// What a node offers (default: detected).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CapacityArgs {
    /// vCPUs it offers (default: the host's).
    #[arg(long, env = "HEARTH_NODE_CPUS")]
    pub cpus: Option<i64>,
    /// Memory it offers, MiB (default: the host's MemTotal).
    #[arg(long, env = "HEARTH_NODE_MEMORY_MIB")]
    pub memory_mib: Option<i64>,
    /// Disk it offers, MiB (default: the data dir's file system size).
    #[arg(long, env = "HEARTH_NODE_DISK_MIB")]
    pub disk_mib: Option<i64>,
    /// The most VMs it runs at once.
    #[arg(long, env = "HEARTH_NODE_VM_SLOTS", default_value_t = 1024)]
    pub vm_slots: i64,
    /// The most VMs booting on it at once.
    #[arg(long, env = "HEARTH_NODE_MAX_BOOTS", default_value_t = 4)]
    pub max_boots: i64,
}

impl CapacityArgs {
    /// The capacity to report: flags over what the host has.
    pub fn detect(&self, data_dir: &Path, drivers: &Drivers) -> hearth_api::fleet::Capacity {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as i64)
            .unwrap_or(1);
        let memory = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            })
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        let disk = nix::sys::statvfs::statvfs(data_dir)
            .map(|s| (s.blocks() as i64).saturating_mul(s.fragment_size() as i64) / (1024 * 1024))
            .unwrap_or(0);
        let mut kinds: Vec<String> = drivers
            .all()
            .map(|d| driver_name(d.kind()))
            .collect::<Vec<_>>();
        kinds.sort();
        hearth_api::fleet::Capacity {
            drivers: kinds,
            cpus: self.cpus.unwrap_or(cpus),
            memory_mib: self.memory_mib.unwrap_or(memory),
            disk_mib: self.disk_mib.unwrap_or(disk),
            vm_slots: self.vm_slots,
            max_boots: self.max_boots,
        }
    }
}

/// `sandbox`, `qemu`, `fake`: a driver kind as the API spells it.
pub fn driver_name(kind: hearth_core::resource::DriverKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The node's drivers: fake always, sandbox when a guest agent binary is
/// found, qemu when `qemu-system-x86_64` is on PATH. The network set-up
/// of egress VMs (the bridge, `ip_forward=1`, the nftables tables) is made
/// here, once per node.
pub async fn build_drivers(args: &DriverArgs, data_dir: &Path) -> anyhow::Result<Drivers> {
    use hearth_drivers::fake::{FakeConfig, FakeDriver};
    use hearth_drivers::sandbox::{SandboxConfig, SandboxDriver, find_agent_binary};
    let data_dir = fs::canonicalize(data_dir)?;
    let mut drivers = Drivers::new().with(Arc::new(FakeDriver::new(FakeConfig {
        boot_latency: args.fake_boot_latency,
        failure_rate: args.fake_failure_rate,
    })));
    let net = Arc::new(
        hearth_drivers::net::Net::new(hearth_drivers::net::NetConfig::for_bridge(
            &args.vm_bridge,
            hearth_drivers::net::parse_subnet(&args.vm_subnet)
                .map_err(|e| anyhow::anyhow!("--vm-subnet: {e}"))?,
        ))
        .map_err(|e| anyhow::anyhow!("--vm-bridge: {e}"))?,
    );
    match args.guest_agent.clone().or_else(find_agent_binary) {
        Some(agent_binary) => {
            hearth_drivers::sandbox::check_uid_base(args.sandbox_uid_base)
                .map_err(|e| anyhow::anyhow!("--sandbox-uid-base: {e}"))?;
            // The sandboxes' default image, built from this host's packages
            // (a second start finds it in a few milliseconds).
            let images = data_dir.join("images");
            let default_root =
                tokio::task::spawn_blocking(move || hearth_image::base::ensure(&images))
                    .await?
                    .map_err(|e| tracing::warn!(error = %e, "no default sandbox image: sandboxes need an image with a root_dir"))
                    .ok();
            if let Some(root) = &default_root {
                tracing::info!(image = %root.display(), "default sandbox image ready");
            }
            let mut config = SandboxConfig::new(data_dir.join("sandboxes"), agent_binary);
            config.hide = vec![data_dir.clone()];
            config.default_root = default_root;
            config.uid_base = args.sandbox_uid_base;
            config.net = Some(net.clone());
            drivers = drivers.with(Arc::new(SandboxDriver::new(config)));
        }
        None => tracing::warn!(
            "no hearth-guest-agent binary found: the sandbox driver is off (set --guest-agent)"
        ),
    }
    if let Some(qemu) = crate::server::find_on_path(hearth_drivers::qemu::DEFAULT_QEMU_BINARY) {
        use hearth_drivers::qemu::{Accel, QemuConfig, QemuDriver};
        let mut config = QemuConfig::new(data_dir.join("qemu"));
        config.qemu_binary = qemu;
        config.net = Some(net.clone());
        config.accel = match args.qemu_accel.as_str() {
            "auto" => Accel::Auto,
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            other => anyhow::bail!("--qemu-accel {other:?}: use auto, kvm or tcg"),
        };
        drivers = drivers.with(Arc::new(QemuDriver::new(config)));
    } else {
        tracing::info!("no qemu-system-x86_64 on PATH: the qemu driver is off");
    }
    Ok(drivers)
}

/// A node's API, listening: where it is reached and under which CA.
pub struct Listening {
    pub address: String,
    pub ca_pem: String,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the node's API on `listen` (TLS under the node's own CA in
/// `tls_dir`), advertised as `advertise` (default: from the bound
/// address).
pub async fn listen(
    listen: SocketAddr,
    advertise: Option<&str>,
    tls_dir: &Path,
    state: Arc<service::NodeState>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Listening> {
    let listener =
        crate::listener::bind(listen, 256).with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr()?;
    let address = match advertise {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None if bound.ip().is_unspecified() => {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into());
            format!("https://{host}:{}", bound.port())
        }
        None => format!("https://{bound}"),
    };
    let host = address
        .strip_prefix("https://")
        .ok_or_else(|| anyhow::anyhow!("--advertise {address:?}: must be https://host:port"))?;
    let host = host
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(host)
        .to_owned();
    let mut names = vec![host];
    if !bound.ip().is_unspecified() {
        names.push(bound.ip().to_string());
    }
    let (tls, ca_pem) = crate::tls::node_setup(tls_dir, &names)?;
    let app = service::router(state);
    let limits = crate::listener::Limits {
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(120),
        max_connections: 256,
    };
    let mut stop = shutdown;
    let task = tokio::spawn(async move {
        crate::listener::serve(listener, app, limits, Some(tls), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    });
    tracing::info!(%address, %bound, "node API listening");
    Ok(Listening {
        address,
        ca_pem,
        task,
    })
}

/// `hearth node`: the agent of one host.
pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    crate::server::init_logging(args.log_format);
    hearth_api::edge::log_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: NodeArgs) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
        .with_context(|| format!("cannot create the data dir {}", args.data_dir.display()))?;
    let data_dir = fs::canonicalize(&args.data_dir)?;
    let token_file = args
        .join_token_file
        .clone()
        .unwrap_or_else(|| data_dir.join(crate::server::JOIN_TOKEN_FILE));
    let join_token = fs::read_to_string(&token_file)
        .with_context(|| {
            format!(
                "cannot read the join token {} (copy the server's --join-token-file)",
                token_file.display()
            )
        })?
        .trim()
        .to_owned();
    if join_token.is_empty() {
        anyhow::bail!("the join token file {} is empty", token_file.display());
    }
    let name = match &args.name {
        Some(name) => name.clone(),
        None => nix::unistd::gethostname()?
            .into_string()
            .map_err(|_| anyhow::anyhow!("the host name is not UTF-8: set --name"))?,
    };
    let ca = match &args.ca {
        Some(ca) => {
            Some(fs::read(ca).with_context(|| format!("cannot read --ca {}", ca.display()))?)
        }
        None => None,
    };
    let http = control_plane_client(ca.as_deref(), Some(Duration::from_secs(30)))
        .with_context(|| "--ca: not a PEM bundle of certificates")?;
    let drivers = build_drivers(&args.drivers, &data_dir).await?;
    let capacity = args.capacity.detect(&data_dir, &drivers);
    let state = service::NodeState::new(
        drivers.clone(),
        args.servers.clone(),
        data_dir.join("artifacts"),
        control_plane_client(ca.as_deref(), None)?,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listening = listen(
        args.listen,
        args.advertise.as_deref(),
        &data_dir.join(crate::tls::TLS_DIR),
        state.clone(),
        stop_rx.clone(),
    )
    .await?;
    let link = agent::Link::Http {
        client: http,
        servers: args.servers.clone(),
    };
    let config = agent::AgentConfig {
        name,
        address: listening.address.clone(),
        ca_pem: listening.ca_pem.clone(),
        join_token,
        capacity,
    };
    let agent = tokio::spawn(agent::run(
        config,
        link,
        state.clone(),
        drivers,
        None,
        stop_rx,
    ));
    crate::server::shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = agent.await;
    let _ = listening.task.await;
    tracing::info!("stopped (the VMs run on; a node started again adopts them)");
    Ok(())
}
