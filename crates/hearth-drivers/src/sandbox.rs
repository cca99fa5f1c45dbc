//! The sandbox driver: VMs as Linux namespaces on the server's own host.
//!
//! A sandbox is a pid + mount + UTS + IPC (+ network, unless `network:
//! host`) namespace set whose PID 1 is `hearth-guest-agent init` (see
//! `hearth_guest_agent::init`), running its agent's server and every
//! command in a user namespace of their own (root inside = the host's
//! unprivileged `uid_base`), with reduced capabilities, `no_new_privs` and
//! a seccomp filter (see `hearth_guest_agent::confine`); its root is an
//! overlay over the image's folder (the server's base image by default,
//! never the host's `/`), mounted idmapped and read-only, with its writable
//! layer on a tmpfs of the VM's disk size; its limits are in a cgroup
//! (memory, cpu, pids). Everything of VM `<id>` lives in `<state_dir>/<id>/`:
//!
//! | file/folder                    | what                                      |
//! |--------------------------------|-------------------------------------------|
//! | `meta.json`                    | id, tenant, workspace, created_at (what `list` reports) |
//! | `launch.json`                  | the launcher's arguments (seal and reset start it again) |
//! | `network.json`                 | its network mode and allowed host ports (attached again at every start) |
//! | `secret`                       | the agent's shared secret (0600)          |
//! | `pid`                          | the launcher's pid (`unshare`, after exec) |
//! | `cgroups`                      | the VM's cgroup folders, one per line     |
//! | `agent/`                       | the agent binary the launcher runs, bound read-only into the sandbox |
//! | `disk/`                        | the VM's disk, a tmpfs: `upper/` and `work/` (the writable layer), `sealed/` (the provisioned layer, once sealed), `console.log` |
//! | `lower/`, `root/`              | mount points of the idmapped image and the overlay (inside the sandbox only) |
//! | `run/`                         | its `/run/hearth`: `secret`, `vm-id`, `agent.sock` |
//!
//! Boot: `hearth-guest-agent launch --cgroup-procs … -- unshare --fork --pid
//! --mount --uts --ipc [--net] --kill-child --propagation private --
//! <vm-dir>/agent/hearth-guest-agent init …`. The launcher joins the
//! cgroups before it execs, so every process of the VM is in them from its
//! first instruction; `--kill-child` ties init to the launcher, and the
//! kernel kills the whole pid namespace when init dies. `create` returns
//! once the agent's socket exists (a few milliseconds), or fails with the
//! tail of the console log when the sandbox died on the way. An image folder
//! must hold what the agent binary needs to run (the C library it links
//! against).
//!
//! Seal and reset: every process of the VM is killed (as by destroy), then
//! the upper layer becomes `disk/sealed/` (seal) or is replaced by an empty
//! one (reset), `run/` is made anew, and the same launcher command starts
//! the same VM again (id, secret, socket path, cgroups).
//!
//! Network: `none` = the new network namespace as is (loopback only);
//! `egress` = once the launcher is in its namespace, `crate::net` puts a
//! veth peer in it as `eth0`, addressed and routed, before `create`
//! returns; `host` = no network namespace.
//!
//! Destroy: SIGKILL init (its namespace dies with it; the launcher reaps it
//! and exits, so no zombie is left to the host's PID 1), then the launcher
//! if it lingers, then every process still in the VM's cgroups or pid
//! namespace, until none is alive; then the cgroups, every mount of the VM
//! folder still visible here (its disk), and the folder.
//!
//! **Invariants:**
//! - the launcher runs in a process group of its own and outlives the
//!   server: a restarted server adopts its VMs from `state_dir` (`list`),
//!   reaching each through its socket and secret on disk;
//! - a process is only ever killed when it provably belongs to the VM (see
//!   `procs`): a recycled pid is never killed;
//! - `destroy` returns `Ok` only when no process, mount, cgroup or file of
//!   the VM remains; it is idempotent;
//! - a failed `create` leaves nothing behind (it runs `destroy`'s cleanup);
//! - the host never runs or follows a file the sandbox can write: the
//!   launcher's binary is outside its reach, its socket is checked to be a
//!   socket, and its folders are removed without following links;
//! - the state folder is hidden inside every sandbox whose image is the
//!   host's root, so a sandbox never sees another's files.

pub(crate) mod cgroup;
mod procs;

use crate::guest::GuestClient;
use crate::{
    Driver, DriverError, ExecRequest, ExecResult, GuestHealth, ObservedVm, OutputChunk, Result,
    VmSpec,
};
use async_trait::async_trait;
use hearth_core::ids::{TenantId, VmId};
use hearth_core::resource::DriverKind;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// The agent binary's file name.
pub const AGENT_BINARY_NAME: &str = "hearth-guest-agent";
/// The environment variable naming the agent binary.
pub const AGENT_BINARY_ENV: &str = "HEARTH_GUEST_AGENT";
/// The default cgroup folder under each hierarchy.
pub const DEFAULT_CGROUP_ROOT: &str = "hearth";
/// How long `create` waits for the agent's socket to appear.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `destroy` waits for the VM's processes to die.
pub const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest Unix socket path `connect(2)` takes (`sun_path`).
const MAX_SOCKET_PATH: usize = 107;
/// The console log, on the VM's own disk: what the sandbox's processes
/// write there counts against the VM's disk, never fills the host's.
const CONSOLE_LOG: &str = "disk/console.log";
/// How much of `console.log` a boot error quotes.
const CONSOLE_TAIL_BYTES: u64 = 2048;
/// The host uid (and gid) a sandbox's root is by default: far above any
/// real user's, with room for the 65536 ids a sandbox maps.
pub const DEFAULT_UID_BASE: u32 = 1_000_000_000;
/// A sandbox's process limit by default (`pids.max`).
pub const DEFAULT_PIDS_MAX: u64 = 2048;
/// A sandbox's writable layer when the spec gives none, in MiB.
pub const DEFAULT_DISK_MIB: u64 = 4096;

/// How the sandbox driver is set up.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Where VM folders live, e.g. `<data-dir>/sandboxes`. Hidden in every
    /// sandbox.
    pub state_dir: PathBuf,
    /// The `hearth-guest-agent` binary (see [`find_agent_binary`]).
    pub agent_binary: PathBuf,
    /// Host paths masked inside every sandbox (e.g. the data dir), when they
    /// exist there.
    pub hide: Vec<PathBuf>,
    /// The cgroup folder under each hierarchy ([`DEFAULT_CGROUP_ROOT`]).
    pub cgroup_root_name: String,
    /// The image folder a VM whose image names no `root_dir` boots from
    /// (the server's base image, see `hearth_image::base`). `None`: such a
    /// VM fails to boot — the host's `/` is never a default.
    pub default_root: Option<PathBuf>,
    /// The host uid and gid of every sandbox's root ([`DEFAULT_UID_BASE`]);
    /// ids `uid_base..uid_base + 65536` are the sandboxes'.
    pub uid_base: u32,
    /// The most processes a sandbox may have ([`DEFAULT_PIDS_MAX`]).
    pub pids_max: u64,
    /// The VM network `network: egress` sandboxes are attached to (`None`:
    /// such sandboxes cannot boot).
    pub net: Option<Arc<crate::net::Net>>,
}

impl SandboxConfig {
    /// A configuration with nothing hidden but the state folder and the
    /// default cgroup root.
    pub fn new(state_dir: impl Into<PathBuf>, agent_binary: impl Into<PathBuf>) -> Self {
        SandboxConfig {
            state_dir: state_dir.into(),
            agent_binary: agent_binary.into(),
            hide: Vec::new(),
            cgroup_root_name: DEFAULT_CGROUP_ROOT.into(),
            default_root: None,
            uid_base: DEFAULT_UID_BASE,
            pids_max: DEFAULT_PIDS_MAX,
            net: None,
        }
    }
}

/// The agent binary: `$HEARTH_GUEST_AGENT`, else `hearth-guest-agent` next
/// to the current executable (or in its parent folder, for test binaries in
/// `target/*/deps`), else on `PATH`.
pub fn find_agent_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(AGENT_BINARY_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    if let Ok(exe) = std::env::current_exe() {
        let beside = exe
            .parent()
            .into_iter()
            .chain(exe.parent().and_then(Path::parent));
        if let Some(found) = beside
            .map(|dir| dir.join(AGENT_BINARY_NAME))
            .find(|p| p.is_file())
        {
            return Some(found);
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(AGENT_BINARY_NAME))
        .find(|p| p.is_file())
}

/// The sandbox's hostname: the last 12 hex digits of the VM id (its random
/// part; the leading digits of a UUIDv7 are a timestamp, shared by VMs
/// created close together).
pub fn short_id(id: VmId) -> String {
    let simple = id.0.simple().to_string();
    simple[simple.len() - 12..].to_owned()
}

/// What `network.json` holds: the VM's network, attached again by every
/// start (boot, seal, reset).
#[derive(Debug, Serialize, Deserialize)]
struct NetworkRecord {
    mode: hearth_core::resource::Network,
    allow_host_ports: Vec<u16>,
}

/// What `meta.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    id: VmId,
    tenant: TenantId,
    workspace: String,
    created_at: String,
}

/// A launcher this process started, reaped by a thread of its own.
#[derive(Debug)]
struct Launched {
    exit: Mutex<Option<ExitStatus>>,
    reaped: Condvar,
}

impl Launched {
    fn exited(&self) -> Option<ExitStatus> {
        *self.exit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (bounded) until the reaper has collected the launcher.
    fn wait(&self, limit: Duration) -> Option<ExitStatus> {
        let guard = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .reaped
            .wait_timeout_while(guard, limit, |exit| exit.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// Linux-namespace VMs on this host; see the module docs.
#[derive(Clone)]
pub struct SandboxDriver {
    inner: Arc<Inner>,
}

struct Inner {
    config: SandboxConfig,
    /// `config.state_dir`, absolute and with symbolic links resolved when it
    /// exists: VM processes are recognized by their exact `--vm-dir`.
    state_dir: PathBuf,
    /// Found on first use; `None` (warned once) = no limits on this host.
    cgroups: OnceLock<Option<cgroup::Layout>>,
    launched: Mutex<HashMap<VmId, Arc<Launched>>>,
}

impl SandboxDriver {
    pub fn new(config: SandboxConfig) -> Self {
        let state_dir = fs::canonicalize(&config.state_dir)
            .or_else(|_| std::path::absolute(&config.state_dir))
            .unwrap_or_else(|_| config.state_dir.clone());
        SandboxDriver {
            inner: Arc::new(Inner {
                config,
                state_dir,
                cgroups: OnceLock::new(),
                launched: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// The VM's folder (whether or not it exists).
    pub fn vm_dir(&self, id: VmId) -> PathBuf {
        self.inner.vm_dir(id)
    }

    /// The VM's cgroup folders, as recorded when it was created.
    pub fn cgroup_dirs(&self, id: VmId) -> Vec<PathBuf> {
        read_cgroup_record(&self.inner.vm_dir(id))
    }

    /// The `<hierarchy>/<cgroup_root_name>` folders this driver creates VM
    /// cgroups in (empty when cgroups are unavailable).
    pub fn cgroup_roots(&self) -> Vec<PathBuf> {
        match self.inner.cgroups() {
            Some(cgroup::Layout::V2 { parent }) => vec![parent.clone()],
            Some(cgroup::Layout::V1 { memory, cpu, pids }) => memory
                .iter()
                .chain(cpu.iter())
                .chain(pids.iter())
                .cloned()
                .collect(),
            None => Vec::new(),
        }
    }

    /// A client of the VM's guest agent; `NotFound` when the VM does not
    /// exist.
    pub async fn guest(&self, id: VmId) -> Result<SandboxGuestClient> {
        let vm_dir = self.inner.vm_dir(id);
        let secret = match tokio::fs::read_to_string(vm_dir.join("secret")).await {
            Ok(secret) => secret.trim().to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(if vm_dir.is_dir() {
                    DriverError::Guest(format!("VM {id} has no secret (still being created?)"))
                } else {
                    DriverError::NotFound(id)
                });
            }
            Err(e) => {
                return Err(DriverError::Guest(format!(
                    "cannot read the secret of VM {id}: {e}"
                )));
            }
        };
        let run_dir = vm_dir.join("run");
        Ok(GuestClient::new(
            Box::new(move || connect_agent(run_dir.clone())),
            secret,
        ))
    }
}

/// Whether `base` can be a sandbox's root: above every real user (the
/// first 65536 ids) and with room for the 65536 ids a sandbox maps.
pub fn check_uid_base(base: u32) -> Result<(), String> {
    if base < hearth_guest_agent::init::ID_RANGE {
        return Err(format!(
            "the sandbox uid base {base} is below {}: the sandboxes' ids would be real users'",
            hearth_guest_agent::init::ID_RANGE
        ));
    }
    if base
        .checked_add(hearth_guest_agent::init::ID_RANGE)
        .is_none()
    {
        return Err(format!(
            "the sandbox uid base {base} leaves no room for {} ids",
            hearth_guest_agent::init::ID_RANGE
        ));
    }
    Ok(())
}

/// A client of a sandbox's guest agent (over its Unix socket).
pub type SandboxGuestClient = GuestClient<Box<dyn Fn() -> ConnectFuture + Send + Sync>>;

/// What connecting to a sandbox's agent returns.
pub type ConnectFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<tokio::net::UnixStream>> + Send>>;

/// Connects to `<run_dir>/agent.sock`, through `/proc/self/fd` when the path
/// is too long for a socket address.
fn connect_agent(run_dir: PathBuf) -> ConnectFuture {
    Box::pin(async move {
        let socket = run_dir.join("agent.sock");
        // The sandbox's root can replace its socket: never follow it
        // anywhere else on the host (e.g. a link to another socket).
        if !fs::symlink_metadata(&socket)?.file_type().is_socket() {
            return Err(io::Error::other(format!(
                "{} is not a socket",
                socket.display()
            )));
        }
        if socket.as_os_str().len() <= MAX_SOCKET_PATH {
            return tokio::net::UnixStream::connect(socket).await;
        }
        let dir = fs::File::open(&run_dir)?;
        let short = format!("/proc/self/fd/{}/agent.sock", dir.as_raw_fd());
        let stream = tokio::net::UnixStream::connect(short).await;
        drop(dir);
        stream
    })
}

fn read_cgroup_record(vm_dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string(vm_dir.join("cgroups"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn read_pid(vm_dir: &Path) -> Option<i32> {
    fs::read_to_string(vm_dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

/// The last bytes of the console log, for boot errors.
fn console_tail(vm_dir: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = fs::File::open(vm_dir.join(CONSOLE_LOG)) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL_BYTES)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).trim().to_owned()
}

fn boot_error(vm_dir: &Path, reason: String) -> String {
    match console_tail(vm_dir) {
        tail if tail.is_empty() => reason,
        tail => format!("{reason}; console: {tail}"),
    }
}

impl Inner {
    fn vm_dir(&self, id: VmId) -> PathBuf {
        self.state_dir.join(id.to_string())
    }

    fn cgroups(&self) -> Option<&cgroup::Layout> {
        self.cgroups
            .get_or_init(|| match cgroup::Layout::prepare(&self.config.cgroup_root_name) {
                Ok(layout) => Some(layout),
                Err(reason) => {
                    tracing::warn!(%reason, "cgroups are unavailable: sandboxes run without memory and CPU limits");
                    None
                }
            })
            .as_ref()
    }

    /// The paths masked in every sandbox: the configured ones and the state
    /// folder, resolved on the host (the sandbox's lower layer mirrors it).
    /// A path that would cover the sandbox's own mounts (`/`, `/run`, …) is
    /// skipped with a warning: it would break the sandbox, not protect it.
    fn hidden_paths(&self) -> Vec<PathBuf> {
        const OWN_MOUNTS: [&str; 6] = ["/run/hearth", "/home", "/tmp", "/dev", "/proc", "/sys"];
        let mut hidden: Vec<PathBuf> = Vec::new();
        for path in self.config.hide.iter().chain([&self.state_dir]) {
            let resolved = fs::canonicalize(path)
                .or_else(|_| std::path::absolute(path))
                .unwrap_or_else(|_| path.clone());
            if OWN_MOUNTS
                .iter()
                .any(|m| Path::new(m).starts_with(&resolved))
            {
                tracing::warn!(path = %resolved.display(), "not hiding a path that contains the sandbox's own mounts");
                continue;
            }
            if !hidden.contains(&resolved) {
                hidden.push(resolved);
            }
        }
        hidden
    }

    fn create(self: &Arc<Self>, spec: &VmSpec) -> Result<()> {
        fs::create_dir_all(&self.state_dir).map_err(|e| {
            DriverError::Boot(format!("cannot create {}: {e}", self.state_dir.display()))
        })?;
        let vm_dir = self.vm_dir(spec.id);
        match fs::create_dir(&vm_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(DriverError::Boot(format!("VM {} already exists", spec.id)));
            }
            Err(e) => {
                return Err(DriverError::Boot(format!(
                    "cannot create {}: {e}",
                    vm_dir.display()
                )));
            }
        }
        let started = Instant::now();
        match self.boot(spec, &vm_dir) {
            Ok(()) => {
                tracing::debug!(vm = %spec.id, elapsed_ms = started.elapsed().as_millis() as u64, "sandbox launched");
                Ok(())
            }
            Err(reason) => {
                if let Err(e) = self.destroy(spec.id) {
                    tracing::error!(vm = %spec.id, error = %e, "cannot clean up after a failed boot");
                }
                Err(DriverError::Boot(reason))
            }
        }
    }

    /// Everything of `create` after the VM folder exists; the caller cleans
    /// up on error.
    fn boot(self: &Arc<Self>, spec: &VmSpec, vm_dir: &Path) -> Result<(), String> {
        let io_err = |what: &str, e: io::Error| format!("{what}: {e}");
        let lower = match (&spec.image.root_dir, &self.config.default_root) {
            (Some(dir), _) | (None, Some(dir)) => dir.clone(),
            (None, None) => {
                return Err(
                    "the image names no root_dir and this server has no default sandbox image"
                        .into(),
                );
            }
        };
        if !lower.is_dir() {
            return Err(format!(
                "the image folder {} does not exist",
                lower.display()
            ));
        }
        let agent = &self.config.agent_binary;
        if !agent.is_file() {
            return Err(format!(
                "the guest agent binary {} does not exist",
                agent.display()
            ));
        }
        check_uid_base(self.config.uid_base)?;

        let meta = Meta {
            id: spec.id,
            tenant: spec.tenant,
            workspace: spec.workspace.clone(),
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        let meta = serde_json::to_string_pretty(&meta).map_err(|e| format!("meta.json: {e}"))?;
        fs::write(vm_dir.join("meta.json"), meta).map_err(|e| io_err("write meta.json", e))?;
        for sub in ["agent", "disk", "lower", "root"] {
            fs::create_dir(vm_dir.join(sub)).map_err(|e| io_err(&format!("create {sub}/"), e))?;
        }

        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&vm_dir.join("secret"), &secret)
            .map_err(|e| io_err("write the secret", e))?;
        // A copy outside anything the sandbox can write (bound read-only
        // into it): the host runs this file as the next launcher of the VM,
        // on every reset.
        let agent_copy = vm_dir.join("agent").join(AGENT_BINARY_NAME);
        fs::copy(agent, &agent_copy)
            .map_err(|e| io_err(&format!("copy {}", agent.display()), e))?;
        fs::set_permissions(&agent_copy, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err("chmod the agent binary", e))?;

        // The writable layer: a tmpfs of the VM's disk size, mounted here on
        // the host so that it outlives the sandbox's processes (seal and
        // reset relaunch them over it). Its pages count towards the VM's
        // memory cgroup.
        let disk_mib = if spec.disk_mib > 0 {
            spec.disk_mib
        } else {
            DEFAULT_DISK_MIB
        };
        let disk = vm_dir.join("disk");
        let options = format!("size={disk_mib}m,mode=0755");
        mount(
            Some("hearth-disk"),
            &disk,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| format!("mount the VM's disk (tmpfs {options}): {e}"))?;
        self.fresh_layer(vm_dir)?;

        let limits = cgroup::Limits {
            memory_bytes: (spec.memory_mib > 0).then(|| spec.memory_mib.saturating_mul(1 << 20)),
            cpu_quota_us: (spec.cpus > 0).then(|| u64::from(spec.cpus) * cgroup::CPU_PERIOD_US),
            pids_max: (self.config.pids_max > 0).then_some(self.config.pids_max),
        };
        let mut cgroup_procs = Vec::new();
        if let Some(layout) = self.cgroups() {
            let vm = spec.id.to_string();
            let record: String = layout
                .vm_dirs(&vm)
                .iter()
                .map(|d| format!("{}\n", d.display()))
                .collect();
            fs::write(vm_dir.join("cgroups"), record).map_err(|e| io_err("write cgroups", e))?;
            cgroup_procs = layout.create(&vm, limits)?;
        }

        // The launcher's command line, kept in `launch.json` so that seal and
        // reset start the very same sandbox again.
        let mut argv: Vec<OsString> = vec!["launch".into()];
        if !cgroup_procs.is_empty() {
            argv.push("--cgroup-procs".into());
            argv.extend(cgroup_procs.iter().map(|p| p.clone().into_os_string()));
        }
        argv.extend(
            [
                "--", "unshare", "--fork", "--pid", "--mount", "--uts", "--ipc",
            ]
            .map(OsString::from),
        );
        if spec.network.mode != hearth_core::resource::Network::Host {
            argv.push("--net".into());
        }
        argv.extend(["--kill-child", "--propagation", "private", "--"].map(OsString::from));
        argv.push(agent_copy.into_os_string());
        argv.push("init".into());
        argv.extend([
            "--vm-dir".into(),
            vm_dir.as_os_str().to_owned(),
            "--lower".into(),
            lower.into_os_string(),
            "--uid-base".into(),
            self.config.uid_base.to_string().into(),
        ]);
        let hidden = self.hidden_paths();
        if !hidden.is_empty() {
            argv.push("--hide".into());
            argv.extend(hidden.into_iter().map(PathBuf::into_os_string));
        }
        argv.extend(["--hostname".into(), short_id(spec.id).into()]);
        if !cgroup_procs.is_empty() {
            if let Some(bytes) = limits.memory_bytes {
                argv.extend(["--memory-bytes".into(), bytes.to_string().into()]);
            }
            if let Some(quota) = limits.cpu_quota_us {
                argv.extend(["--cpu-quota-us".into(), quota.to_string().into()]);
            }
        }
        let argv: Vec<String> = argv
            .into_iter()
            .map(|a| {
                a.into_string()
                    .map_err(|a| format!("a launcher argument is not UTF-8: {a:?}"))
            })
            .collect::<Result<_, _>>()?;
        let launch = serde_json::to_string(&argv).map_err(|e| format!("launch.json: {e}"))?;
        fs::write(vm_dir.join("launch.json"), launch)
            .map_err(|e| io_err("write launch.json", e))?;
        // What its network reaches, kept beside it: seal and reset make a
        // new network namespace, which is attached again.
        let network = NetworkRecord {
            mode: spec.network.mode,
            allow_host_ports: spec.network.allow_host_ports.clone(),
        };
        let network = serde_json::to_string(&network).map_err(|e| format!("network.json: {e}"))?;
        fs::write(vm_dir.join("network.json"), network)
            .map_err(|e| io_err("write network.json", e))?;
        self.start(spec.id, vm_dir)
    }

    /// Makes the sandbox's run folder and an empty writable layer (`upper/`,
    /// `work/`) on its disk, both owned by the sandbox's root.
    fn fresh_layer(&self, vm_dir: &Path) -> Result<(), String> {
        let io_err = |what: &str, e: io::Error| format!("{what}: {e}");
        let base = self.config.uid_base;
        let owner = (
            Some(nix::unistd::Uid::from_raw(base)),
            Some(nix::unistd::Gid::from_raw(base)),
        );
        let chown = |path: &Path| {
            nix::unistd::chown(path, owner.0, owner.1)
                .map_err(|e| format!("chown {}: {e}", path.display()))
        };
        let disk = vm_dir.join("disk");
        for sub in ["upper", "work"] {
            fs::create_dir(disk.join(sub))
                .map_err(|e| io_err(&format!("create disk/{sub}/"), e))?;
        }
        chown(&disk.join("upper"))?;

        // run/: the sandbox's /run/hearth, written by its server (the
        // socket); the secret is the host's copy, the binary a mount point.
        let run = vm_dir.join("run");
        fs::create_dir(&run).map_err(|e| io_err("create run/", e))?;
        chown(&run)?;
        let secret =
            fs::read_to_string(vm_dir.join("secret")).map_err(|e| io_err("read the secret", e))?;
        write_private(&run.join("secret"), secret.trim())
            .map_err(|e| io_err("write run/secret", e))?;
        chown(&run.join("secret"))?;
        let vm_id = vm_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        fs::write(run.join("vm-id"), vm_id).map_err(|e| io_err("write run/vm-id", e))?;
        fs::write(run.join(AGENT_BINARY_NAME), b"")
            .map_err(|e| io_err("create run/hearth-guest-agent", e))?;
        Ok(())
    }

    /// Starts the VM's launcher from `launch.json` and waits until its
    /// agent's socket exists (or it died).
    fn start(self: &Arc<Self>, id: VmId, vm_dir: &Path) -> Result<(), String> {
        let io_err = |what: &str, e: io::Error| format!("{what}: {e}");
        let argv: Vec<String> = fs::read(vm_dir.join("launch.json"))
            .map_err(|e| io_err("read launch.json", e))
            .and_then(|raw| {
                serde_json::from_slice(&raw).map_err(|e| format!("launch.json: {e}"))
            })?;
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(vm_dir.join(CONSOLE_LOG))
            .map_err(|e| io_err("open console.log", e))?;
        let console_err = console
            .try_clone()
            .map_err(|e| io_err("open console.log", e))?;

        let agent = &self.config.agent_binary;
        let mut command = Command::new(agent);
        // Its own process group (a Ctrl-C of the server must not reach it),
        // no parent-death signal (it must outlive the server), and none of
        // the server's environment.
        command
            .args(&argv)
            .env_clear()
            .env("PATH", hearth_guest_agent::protocol::BASE_PATH)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| io_err(&format!("cannot start {}", agent.display()), e))?;
        let pid = child.id();
        let launched = Arc::new(Launched {
            exit: Mutex::new(None),
            reaped: Condvar::new(),
        });
        self.launched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, launched.clone());
        let reaper = launched.clone();
        let spawned = thread::Builder::new()
            .name(format!("reap-{pid}"))
            .stack_size(64 << 10)
            .spawn(move || {
                let status = child.wait().ok();
                *reaper.exit.lock().unwrap_or_else(|e| e.into_inner()) = status;
                reaper.reaped.notify_all();
            });
        if let Err(e) = spawned {
            // The child is dropped without being waited for; `destroy` kills
            // it by its pid file, written next.
            tracing::warn!(error = %e, "cannot start a reaper thread");
        }
        fs::write(vm_dir.join("pid"), pid.to_string()).map_err(|e| io_err("write pid", e))?;
        let network: NetworkRecord = fs::read(vm_dir.join("network.json"))
            .map_err(|e| io_err("read network.json", e))
            .and_then(|raw| {
                serde_json::from_slice(&raw).map_err(|e| format!("network.json: {e}"))
            })?;
        self.attach_network(id, &network, pid as i32, &launched)?;

        // Launched = the agent's socket exists (the server binds it last,
        // after the whole filesystem is set up), or the launcher died.
        let socket = vm_dir.join("run").join("agent.sock");
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Some(status) = launched.exited() {
                return Err(boot_error(
                    vm_dir,
                    format!("the sandbox exited during boot ({status})"),
                ));
            }
            if Instant::now() >= deadline {
                return Err(boot_error(
                    vm_dir,
                    format!("the guest agent did not start within {BOOT_TIMEOUT:?}"),
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Seal (`seal = true`: the present writable layer becomes the
    /// provisioned one) or reset (a fresh writable layer over the
    /// provisioned one): either way every process of the VM is killed and
    /// the same sandbox (id, secret, socket path, cgroups) starts again.
    fn relaunch(self: &Arc<Self>, id: VmId, seal: bool) -> Result<()> {
        let vm_dir = self.vm_dir(id);
        if !vm_dir.join("launch.json").is_file() {
            return Err(DriverError::NotFound(id));
        }
        let started = Instant::now();
        self.stop(id, &vm_dir)?;
        let io = |what: String, e: io::Error| {
            DriverError::Io(io::Error::new(e.kind(), format!("{what}: {e}")))
        };
        let disk = vm_dir.join("disk");
        let sealed = disk.join("sealed");
        if seal {
            if sealed.exists() {
                return Err(DriverError::Unsupported(format!(
                    "VM {id} is sealed already"
                )));
            }
            fs::rename(disk.join("upper"), &sealed)
                .map_err(|e| io(format!("seal {}", disk.display()), e))?;
        }
        for stale in [disk.join("upper"), disk.join("work"), vm_dir.join("run")] {
            match fs::remove_dir_all(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("remove {}", stale.display()), e)),
            }
        }
        self.fresh_layer(&vm_dir)
            .and_then(|()| self.start(id, &vm_dir))
            .map_err(DriverError::Boot)?;
        tracing::debug!(vm = %id, seal, elapsed_ms = started.elapsed().as_millis() as u64, "sandbox relaunched");
        Ok(())
    }

    /// An `egress` sandbox's port on the VM network, once the launcher is
    /// in its own network namespace (see `crate::net`).
    fn attach_network(
        &self,
        id: VmId,
        network: &NetworkRecord,
        pid: i32,
        launched: &Launched,
    ) -> Result<(), String> {
        if network.mode != hearth_core::resource::Network::Egress {
            return Ok(());
        }
        let net = self.config.net.as_ref().ok_or_else(|| {
            "network: egress needs the VM network, which this server has not set up".to_owned()
        })?;
        let started = Instant::now();
        crate::net::wait_for_netns(pid, BOOT_TIMEOUT, || launched.exited().is_none())
            .and_then(|()| net.attach_sandbox(id, pid, &network.allow_host_ports))
            .map_err(|e| format!("cannot attach the sandbox to the VM network: {e}"))?;
        tracing::debug!(vm = %id, took = ?started.elapsed(), "sandbox attached to the VM network");
        Ok(())
    }

    /// The VM's processes now: its launcher, init and server (by their
    /// arguments), whatever is in its cgroups, and whatever shares a pid
    /// namespace with those (except this process's own namespace).
    fn vm_processes(
        &self,
        id: VmId,
        vm_dir: &Path,
        cgroups: &[PathBuf],
        namespaces: &mut BTreeSet<PathBuf>,
    ) -> BTreeSet<i32> {
        let me = std::process::id() as i32;
        let own_namespace = procs::pid_namespace(me);
        let vm_id = id.to_string();
        let mut found: BTreeSet<i32> = cgroups.iter().flat_map(|dir| cgroup::procs(dir)).collect();
        let all = procs::all_pids();
        for &pid in &all {
            if procs::names_vm(&procs::argv(pid), vm_dir, &vm_id) {
                found.insert(pid);
            }
        }
        for &pid in &found {
            if let Some(ns) =
                procs::pid_namespace(pid).filter(|ns| Some(ns) != own_namespace.as_ref())
            {
                namespaces.insert(ns);
            }
        }
        if !namespaces.is_empty() {
            for &pid in &all {
                if procs::pid_namespace(pid).is_some_and(|ns| namespaces.contains(&ns)) {
                    found.insert(pid);
                }
            }
        }
        found.retain(|&pid| pid != me && procs::alive(pid));
        found
    }

    /// Kills every process of the VM and waits until none is alive (and
    /// the launcher is reaped); leaves its files, mounts and cgroups.
    fn stop(&self, id: VmId, vm_dir: &Path) -> Result<()> {
        let vm_dir = vm_dir.to_path_buf();
        let vm_id = id.to_string();
        let launched = self
            .launched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned();
        let cgroups = read_cgroup_record(&vm_dir);
        let mut namespaces = BTreeSet::new();

        // Init first: the kernel kills its whole pid namespace with it, and
        // the launcher (unshare) reaps it and exits, so no zombie is left to
        // the host's PID 1. Then the launcher, should it linger. (Killing the
        // launcher first would work too, through --kill-child, but would
        // orphan init.)
        if let Some(launcher) =
            read_pid(&vm_dir).filter(|&pid| procs::is_vm_process(pid, &vm_dir, &vm_id))
        {
            for init in procs::children(launcher) {
                namespaces.extend(procs::pid_namespace(init));
                if procs::is_vm_process(init, &vm_dir, &vm_id) {
                    let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            while procs::alive(launcher) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            if procs::is_vm_process(launcher, &vm_dir, &vm_id) {
                let _ = kill(Pid::from_raw(launcher), Signal::SIGKILL);
            }
        }
        for dir in &cgroups {
            cgroup::kill_all(dir);
        }
        let deadline = Instant::now() + DESTROY_TIMEOUT;
        loop {
            let alive = self.vm_processes(id, &vm_dir, &cgroups, &mut namespaces);
            if alive.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Io(io::Error::other(format!(
                    "processes {alive:?} of VM {id} are still alive after {DESTROY_TIMEOUT:?}"
                ))));
            }
            for pid in alive {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(5));
        }
        if let Some(launched) = &launched {
            // Leave no zombie: the reaper collects the launcher promptly.
            launched.wait(Duration::from_secs(2));
        }
        Ok(())
    }

    fn destroy(&self, id: VmId) -> Result<()> {
        let vm_dir = self.vm_dir(id);
        self.stop(id, &vm_dir)?;
        let cgroups = read_cgroup_record(&vm_dir);
        let deadline = Instant::now() + DESTROY_TIMEOUT;

        for dir in &cgroups {
            cgroup::remove(
                dir,
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(1)),
            )?;
        }
        if let Some(net) = &self.config.net {
            net.detach(id).map_err(|e| {
                DriverError::Io(io::Error::other(format!(
                    "cannot detach VM {id} from the VM network: {e}"
                )))
            })?;
        }
        // Mount points are listed resolved: so must the folder be (a state
        // folder given as a relative path may hold `..`).
        let resolved = fs::canonicalize(&vm_dir).unwrap_or_else(|_| vm_dir.clone());
        let mut mounts = procs::mounts_under(&resolved);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for mount in mounts {
            if let Err(e) = umount2(&mount, MntFlags::MNT_DETACH) {
                return Err(DriverError::Io(io::Error::other(format!(
                    "cannot unmount {}: {e}",
                    mount.display()
                ))));
            }
        }
        match fs::remove_dir_all(&vm_dir) {
            Ok(()) => {}
            Err(_) if !vm_dir.exists() => {}
            Err(e) => {
                return Err(DriverError::Io(io::Error::new(
                    e.kind(),
                    format!("cannot remove {}: {e}", vm_dir.display()),
                )));
            }
        }
        self.launched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        Ok(())
    }

    fn list(&self) -> Result<Vec<ObservedVm>> {
        let entries = match fs::read_dir(&self.state_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut vms = Vec::new();
        for entry in entries {
            let entry = entry?;
            let vm_dir = entry.path();
            let Ok(meta) = fs::read(vm_dir.join("meta.json")) else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<Meta>(&meta) else {
                tracing::warn!(dir = %vm_dir.display(), "unreadable meta.json: not a sandbox");
                continue;
            };
            if entry.file_name() != OsString::from(meta.id.to_string()) {
                continue;
            }
            let running = read_pid(&vm_dir)
                .is_some_and(|pid| procs::is_vm_process(pid, &vm_dir, &meta.id.to_string()));
            vms.push(ObservedVm {
                id: meta.id,
                tenant: meta.tenant,
                workspace: meta.workspace,
                running,
            });
        }
        vms.sort_by_key(|vm| vm.id);
        Ok(vms)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        DriverError::Io(io::Error::other(format!("sandbox driver task failed: {e}")))
    })?
}

#[async_trait]
impl Driver for SandboxDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Sandbox
    }

    async fn create(&self, spec: &VmSpec) -> Result<()> {
        let inner = self.inner.clone();
        let spec = spec.clone();
        blocking(move || inner.create(&spec)).await
    }

    async fn destroy(&self, id: VmId) -> Result<()> {
        let inner = self.inner.clone();
        blocking(move || inner.destroy(id)).await
    }

    async fn list(&self) -> Result<Vec<ObservedVm>> {
        let inner = self.inner.clone();
        blocking(move || inner.list()).await
    }

    async fn exec(
        &self,
        id: VmId,
        request: &ExecRequest,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        let cgroups = self.cgroup_dirs(id);
        let oom_before: u64 = cgroups.iter().map(|d| cgroup::oom_kills(d)).sum();
        let result = self.guest(id).await?.exec(request, output.clone()).await;
        let oom_after: u64 = cgroups.iter().map(|d| cgroup::oom_kills(d)).sum();
        if oom_after > oom_before {
            // The VM's own failure, said where its user looks: the command's
            // output.
            let message = format!(
                "hearth: the VM hit its memory limit: the kernel killed {} of its processes (out of memory)\n",
                oom_after - oom_before
            );
            tracing::warn!(vm = %id, kills = oom_after - oom_before, "the VM hit its memory limit");
            if let Some(output) = &output {
                let _ = output.send(OutputChunk {
                    stream: crate::Stream::Stderr,
                    data: message,
                });
            }
        }
        result
    }

    async fn seal(&self, id: VmId) -> Result<()> {
        let inner = self.inner.clone();
        blocking(move || inner.relaunch(id, true)).await?;
        wait_answering(self, id).await
    }

    async fn reset(&self, id: VmId) -> Result<()> {
        let inner = self.inner.clone();
        blocking(move || inner.relaunch(id, false)).await?;
        wait_answering(self, id).await
    }

    async fn write_file(&self, id: VmId, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        self.guest(id).await?.write_file(path, contents, mode).await
    }

    async fn start_job(&self, id: VmId, job: &str, request: &ExecRequest) -> Result<()> {
        self.guest(id).await?.start_job(job, request).await
    }

    async fn attach_job(
        &self,
        id: VmId,
        job: &str,
        offset: u64,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        self.guest(id).await?.attach_job(job, offset, output).await
    }

    async fn health(&self, id: VmId) -> Result<GuestHealth> {
        self.guest(id).await?.health().await
    }
}

/// Waits (bounded by [`BOOT_TIMEOUT`]) until a relaunched VM's agent
/// answers a health check: its socket exists before it accepts.
async fn wait_answering(driver: &SandboxDriver, id: VmId) -> Result<()> {
    let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        match driver.health(id).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(DriverError::Boot(format!(
                    "the relaunched VM's agent does not answer: {e}"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}
