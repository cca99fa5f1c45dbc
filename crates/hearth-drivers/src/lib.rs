//! hearth's VM drivers behind one small trait: `sandbox` (Linux namespaces,
//! real), `fake` (in memory, for simulation and reconciler tests), `qemu`
//! (next).
//!
//! **Architecture Invariants:**
//! - drivers never touch the store: they boot, destroy and list what really
//!   exists, and talk to the guest agent inside;
//! - every operation reports its own errors; nothing here assumes success;
//! - `destroy` is idempotent (destroying what is gone is `Ok`) and leaves
//!   nothing behind;
//! - `list` reports what really exists, whatever the store believes, so the
//!   server can adopt or destroy it after a restart.

pub mod fake;
pub mod guest;
pub mod net;
pub mod qemu;
pub mod sandbox;

use async_trait::async_trait;
use hearth_core::ids::{NodeId, TenantId, VmId};
use hearth_core::resource::{DriverKind, Network};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What to boot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    pub id: VmId,
    pub tenant: TenantId,
    pub workspace: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub image: ImageSpec,
    /// What the VM's network reaches.
    pub network: NetworkSpec,
    /// The most the VM may write to its own disk, in MiB (0 = the driver's
    /// default).
    pub disk_mib: u64,
}

/// What a VM's network reaches (the environment's `network` and
/// `allow_host_ports`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkSpec {
    pub mode: Network,
    /// Host TCP ports the VM may reach (only with [`Network::Egress`]).
    pub allow_host_ports: Vec<u16>,
}

impl NetworkSpec {
    /// Loopback only.
    pub fn none() -> Self {
        NetworkSpec {
            mode: Network::None,
            allow_host_ports: Vec::new(),
        }
    }

    /// The host's network, unfiltered (a weaker setting, for tests and
    /// operators who ask for it).
    pub fn host() -> Self {
        NetworkSpec {
            mode: Network::Host,
            allow_host_ports: Vec::new(),
        }
    }

    /// Egress to the internet plus the given host ports.
    pub fn egress(allow_host_ports: Vec<u16>) -> Self {
        NetworkSpec {
            mode: Network::Egress,
            allow_host_ports,
        }
    }
}

/// The image a VM boots from (the driver picks the fields it needs).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ImageSpec {
    /// sandbox: the read-only lower layer; `None` = the host's root.
    pub root_dir: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub disk: Option<PathBuf>,
    /// The SHA-256 (hex) of each artifact above, by role (`root_dir`,
    /// `kernel`, `initrd`, `disk`): how a node that does not share the
    /// control plane's disk fetches and checks them. Empty: nothing to
    /// fetch (the driver's default image).
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
}

/// A VM that really exists, as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObservedVm {
    pub id: VmId,
    pub tenant: TenantId,
    pub workspace: String,
    /// Its processes are alive (a VM whose processes died is still listed
    /// until destroyed, so that its leftovers get cleaned).
    pub running: bool,
}

/// A command to run inside a VM, as root, through `/bin/sh -c`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExecRequest {
    pub command: String,
    pub cwd: String,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
}

impl ExecRequest {
    /// `command` from `/home` with no extra environment and a 10-minute timeout.
    pub fn new(command: impl Into<String>) -> Self {
        ExecRequest {
            command: command.into(),
            cwd: "/home".into(),
            env: BTreeMap::new(),
            timeout: Duration::from_secs(600),
        }
    }
}

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of a command's output, streamed as it comes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputChunk {
    pub stream: Stream,
    pub data: String,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecResult {
    /// The exit code, or 128 + signal when killed; -1 when timed out.
    pub exit_code: i32,
    pub timed_out: bool,
}

/// The guest agent's answer to a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestHealth {
    pub uptime_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("VM {0} does not exist")]
    NotFound(VmId),
    #[error("cannot boot VM: {0}")]
    Boot(String),
    #[error("guest agent: {0}")]
    Guest(String),
    /// The guest agent refused a job or cannot follow it (no such job, a
    /// bad id, a job lost with an earlier agent process): unlike a
    /// `Guest` error, trying again cannot help.
    #[error("job: {0}")]
    Job(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

/// One kind of VM.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    fn kind(&self) -> DriverKind;

    /// Starts a VM. Returns once it is launched; its guest agent may not
    /// answer yet (poll [`Driver::health`]). On error nothing is left behind.
    async fn create(&self, spec: &VmSpec) -> Result<()>;

    /// Stops a VM and removes everything of it. Idempotent.
    async fn destroy(&self, id: VmId) -> Result<()>;

    /// Every VM of this driver that exists now.
    async fn list(&self) -> Result<Vec<ObservedVm>>;

    /// Runs a command in the VM, streaming output to `output` when given.
    async fn exec(
        &self,
        id: VmId,
        request: &ExecRequest,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult>;

    /// Writes a file inside the VM (parent folders created).
    async fn write_file(&self, id: VmId, path: &str, contents: &[u8], mode: u32) -> Result<()>;

    /// Asks the guest agent whether it is up.
    async fn health(&self, id: VmId) -> Result<GuestHealth>;

    /// Records the VM's present state as its provisioned one: what
    /// [`Driver::reset`] brings it back to. Called once provisioning
    /// succeeded, before the VM is handed to any agent. Drivers that
    /// cannot reset keep the default (nothing to record).
    async fn seal(&self, id: VmId) -> Result<()> {
        let _ = id;
        Ok(())
    }

    /// Brings a returned VM back to its sealed state: nothing an agent
    /// wrote or started survives (files anywhere, processes, `/tmp`).
    /// `Unsupported` when the driver cannot (the caller destroys the VM
    /// instead, and the pool refills).
    async fn reset(&self, id: VmId) -> Result<()> {
        let _ = id;
        Err(DriverError::Unsupported(
            format!(
                "the {:?} driver cannot reset a VM to its provisioned state",
                self.kind()
            )
            .to_lowercase(),
        ))
    }

    /// Starts `request` in the VM as the job `job`: it runs on whether or
    /// not anyone is attached, and its output and exit code are kept in
    /// the VM until the VM goes, so a control plane that restarted
    /// attaches again ([`Driver::attach_job`]). Starting a job that exists
    /// already is `Ok` and starts nothing.
    async fn start_job(&self, id: VmId, job: &str, request: &ExecRequest) -> Result<()> {
        let _ = (id, job, request);
        Err(DriverError::Unsupported(
            format!("the {:?} driver has no jobs", self.kind()).to_lowercase(),
        ))
    }

    /// Follows the job `job`: streams its output to `output` from byte
    /// `offset` of its output on (both streams, as they came), and returns
    /// how it ended once it has. `NotFound` when the VM is gone; `Job`
    /// when the VM has no such job or lost it; `Guest` when the
    /// connection broke (attaching again from the bytes received goes
    /// on). An offset before the oldest byte the VM kept (the last 16 MiB)
    /// reads from that byte.
    async fn attach_job(
        &self,
        id: VmId,
        job: &str,
        offset: u64,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        let _ = (id, job, offset, output);
        Err(DriverError::Unsupported(
            format!("the {:?} driver has no jobs", self.kind()).to_lowercase(),
        ))
    }
}

/// Where the pool reaches the driver of a VM: on its node. A server's
/// embedded node, the fake nodes of a simulation and the remote nodes of
/// a fleet all answer here.
#[async_trait]
pub trait Fleet: Send + Sync + 'static {
    /// The driver of `kind` on `node` (`None`: a VM recorded before nodes
    /// existed, run by this process's own drivers if it has any).
    async fn driver(&self, node: Option<NodeId>, kind: DriverKind) -> Result<Arc<dyn Driver>>;
}

/// One process's drivers are a fleet of one node, whatever id is asked.
#[async_trait]
impl Fleet for Drivers {
    async fn driver(&self, _node: Option<NodeId>, kind: DriverKind) -> Result<Arc<dyn Driver>> {
        self.get(kind).cloned()
    }
}

/// The drivers a server runs, by kind.
#[derive(Clone, Default)]
pub struct Drivers {
    by_kind: HashMap<DriverKind, Arc<dyn Driver>>,
}

impl Drivers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, driver: Arc<dyn Driver>) -> Self {
        self.by_kind.insert(driver.kind(), driver);
        self
    }

    /// The driver of `kind`, or an error naming it.
    pub fn get(&self, kind: DriverKind) -> Result<&Arc<dyn Driver>> {
        self.by_kind.get(&kind).ok_or_else(|| {
            DriverError::Unsupported(
                format!("the {kind:?} driver is not enabled on this server").to_lowercase(),
            )
        })
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Driver>> {
        self.by_kind.values()
    }
}
