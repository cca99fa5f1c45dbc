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
use hearth_core::ids::{TenantId, VmId};
use hearth_core::resource::{DriverKind, Network};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What to boot.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// sandbox: the read-only lower layer; `None` = the host's root.
    pub root_dir: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub disk: Option<PathBuf>,
}

/// A VM that really exists, as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedVm {
    pub id: VmId,
    pub tenant: TenantId,
    pub workspace: String,
    /// Its processes are alive (a VM whose processes died is still listed
    /// until destroyed, so that its leftovers get cleaned).
    pub running: bool,
}

/// A command to run inside a VM, as root, through `/bin/sh -c`.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of a command's output, streamed as it comes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: Stream,
    pub data: String,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecResult {
    /// The exit code, or 128 + signal when killed; -1 when timed out.
    pub exit_code: i32,
    pub timed_out: bool,
}

/// The guest agent's answer to a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
