//! The qemu driver: VMs as `qemu-system-x86_64 -M microvm` processes on the
//! server's host, booting an image baked by `hearth-image` (a kernel, an
//! initramfs whose `/init` is `hearth-guest-agent` in `vm-init` mode, and
//! optionally a disk), reached through the guest agent over TCP.
//!
//! Everything of VM `<id>` lives in `<state_dir>/<id>/` (mode 0700):
//!
//! | file            | what                                                   |
//! |-----------------|--------------------------------------------------------|
//! | `meta.json`     | id, tenant, workspace, created_at, accelerator, image (what `list` reports) |
//! | `secret`        | the agent's shared secret (0600), given to qemu as `-fw_cfg name=opt/hearth/secret,file=<dir>/secret` |
//! | `qemu.cfg`      | the kernel command line as a `-readconfig` file (0600); it holds no secret |
//! | `cgroups`       | the VM's cgroup folders, one per line (see `limits`)   |
//! | `port`          | the host port forwarded to the agent (written once qemu runs) |
//! | `pid`           | qemu's pid (`-pidfile`)                                |
//! | `qmp.sock`      | qemu's QMP socket                                      |
//! | `console.log`   | the guest's serial console (0600)                      |
//! | `qemu.log`      | qemu's own stdout and stderr                           |
//! | `overlay.qcow2` | copy-on-write overlay over the image's disk, if it has one |
//!
//! Boot: `/bin/sh -c <limits::PREAMBLE> hearth-qemu <file limit> <cgroup.procs…>
//! -- qemu-system-x86_64 -name hearth-<id> -M microvm -accel <kvm|tcg,tb-size=128>
//! -cpu <host|max> -smp … -m … -kernel … -initrd … -fw_cfg
//! name=opt/hearth/secret,file=<dir>/secret -readconfig qemu.cfg
//! -nodefaults -no-user-config -display none -no-reboot -sandbox
//! <QEMU_SANDBOX> -serial
//! file:console.log -netdev user,id=n0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:<port>-:<guest
//! port> -device virtio-net-device,netdev=n0 [-netdev tap,… -device
//! virtio-net-device,netdev=n1,mac=…] -device
//! virtio-balloon-device,free-page-reporting=on [-drive … -device
//! virtio-blk-device…] -qmp unix:qmp.sock,server=on,wait=off -pidfile
//! <dir>/pid`, in a process group of its own, not daemonized (the driver
//! reaps it while it lives; it survives the server, and a restarted server
//! adopts it through `list`). `create` returns once qemu answers QMP
//! `query-status` (its devices and port forwarding are set up; the guest
//! may still be booting: poll `health`). The host port comes from binding
//! `127.0.0.1:0`; when qemu cannot bind it (taken meanwhile) `create`
//! retries with another.
//!
//! Accelerator: `kvm` (`-cpu host`), `tcg` (`-cpu max`, and
//! `tsc_early_khz=<host TSC> tsc=reliable` on the kernel command line: a
//! loaded host makes TCG's PIT calibration of the TSC fail, and the kernel
//! then hangs), or `auto`: KVM only if `/dev/kvm` opens and a probe boot
//! of the first image under KVM prints `hearth-probe-ok` within
//! [`QemuConfig::probe_timeout`] (kernels hang under nested paravirtual
//! KVM on some hosts); the verdict is kept for the driver's lifetime. The
//! probe runs under coreutils' `timeout -s KILL`, so that one orphaned by a
//! crash of the server ends anyway.
//!
//! Host tools: `qemu-system-x86_64`, `qemu-img` (disks only), `timeout`,
//! `/bin/sh`.
//!
//! Bounds (see `limits`): the shell preamble joins the VM's cgroups
//! (memory, cpu, pids) and sets its file-size limit, then execs qemu; the
//! overlay's virtual size is `VmSpec::disk_mib` (an image disk larger than
//! it is refused), so what the guest writes never outgrows it. Nothing of
//! the host is shared: one disk (the overlay), no shared folders, the only
//! `opt/` firmware item is the secret, QMP is a host socket in the 0700 VM
//! folder. A VM cannot be reset (`Driver::reset` stays `Unsupported`): a
//! returned one is destroyed.
//!
//! Network: `eth0` is qemu user networking with `restrict=on,ipv6=off`
//! (guest 10.0.2.15): the agent's forwarded port works, and the guest
//! reaches nothing through it, the host's loopback at 10.0.2.2 included.
//! `network: egress` adds `eth1`, a tap on the VM network (`crate::net`:
//! `-netdev tap,ifname=ht<id>,script=no,downscript=no`, a MAC of its
//! address), whose address, gateway and DNS reach `vm-init` as `hearth.eth1=`,
//! `hearth.gw=`, `hearth.dns=`; `network: host` is refused.
//!
//! Destroy: QMP `quit`, then SIGKILL if qemu lingers after
//! [`QUIT_GRACE`] — only a process whose arguments hold `-pidfile
//! <dir>/pid` (see `procs`) or is in its cgroups — until none is alive; then
//! the cgroups and the folder.
//!
//! **Invariants:**
//! - a process is only ever killed when it provably is the VM's qemu: a
//!   recycled pid is never killed;
//! - VMs never share writable state: a disk is always used through an
//!   overlay of the VM's own;
//! - `destroy` returns `Ok` only when no qemu of the VM is alive and its
//!   folder is gone; it is idempotent;
//! - a failed `create` leaves nothing behind (it runs `destroy`'s cleanup);
//! - the secret is only in `secret` (0600) and the guest: on no command
//!   line, the host's or the guest kernel's.

pub mod limits;
mod procs;
pub mod qmp;

use crate::guest::GuestClient;
use crate::{
    Driver, DriverError, ExecRequest, ExecResult, GuestHealth, ObservedVm, OutputChunk, Result,
    VmSpec,
};
use async_trait::async_trait;
use hearth_core::ids::{TenantId, VmId};
use hearth_core::resource::DriverKind;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// The qemu binary when none is configured.
pub const DEFAULT_QEMU_BINARY: &str = "qemu-system-x86_64";
/// The `qemu-img` binary when none is configured.
pub const DEFAULT_QEMU_IMG: &str = "qemu-img";
/// The agent's port inside the guest.
pub const DEFAULT_GUEST_PORT: u16 = hearth_guest_agent::vminit::DEFAULT_PORT;
/// How long qemu may take to start (until QMP answers).
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the accelerator probe boot may take by default.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `destroy` lets qemu exit after QMP `quit` before SIGKILL.
pub const QUIT_GRACE: Duration = Duration::from_secs(2);
/// How long `destroy` waits for qemu to die after SIGKILL.
pub const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);
/// Memory when the spec gives none.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// How often `health` starts a new attempt while earlier ones wait.
const HEALTH_ATTEMPT: Duration = Duration::from_millis(250);
/// How many host ports `create` tries when qemu cannot bind one.
const PORT_ATTEMPTS: usize = 5;
/// How much of `console.log` and `qemu.log` a boot error quotes.
const LOG_TAIL_BYTES: u64 = 2048;
/// qemu's seccomp filter (`-sandbox`): obsolete system calls, set*id,
/// fork/exec and scheduling changes denied.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// What qemu says when a `hostfwd` port is taken.
const HOSTFWD_FAILED: &str = "Could not set up host forwarding rule";

/// Which accelerator VMs run under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe boot under it succeeds, else TCG.
    #[default]
    Auto,
    Kvm,
    /// Software emulation: slower, works everywhere.
    Tcg,
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How the qemu driver is set up.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Where VM folders live, e.g. `<data-dir>/qemu`.
    pub state_dir: PathBuf,
    pub qemu_binary: PathBuf,
    pub qemu_img: PathBuf,
    pub accel: Accel,
    /// The agent's TCP port inside the guest (`hearth.port=`).
    pub guest_port: u16,
    /// How long `auto`'s KVM probe boot may take.
    pub probe_timeout: Duration,
    /// The host's TSC frequency in kHz, given to TCG guests; `None` = read
    /// it from the host (`tsc_freq_khz` in sysfs, else `cpu MHz` of
    /// `/proc/cpuinfo`).
    pub tsc_khz: Option<u64>,
    /// Appended to every kernel command line (no `"`).
    pub kernel_args: Vec<String>,
    /// The cgroup folder under each hierarchy ([`limits::DEFAULT_CGROUP_ROOT`]).
    pub cgroup_root_name: String,
    /// The most a VM's `console.log` and `qemu.log` may hold (a guest can
    /// write its serial port for ever); see [`limits::file_limit`].
    pub log_file_limit_bytes: u64,
    /// The most one command's answer may hold
    /// ([`crate::guest::MAX_EXEC_OUTPUT_BYTES`] by default).
    pub max_exec_output_bytes: u64,
    /// The VM network `network: egress` VMs get a tap on (`None`: such VMs
    /// cannot boot).
    pub net: Option<Arc<crate::net::Net>>,
}

impl QemuConfig {
    /// `qemu-system-x86_64` from `PATH`, accelerator `auto`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        QemuConfig {
            state_dir: state_dir.into(),
            qemu_binary: DEFAULT_QEMU_BINARY.into(),
            qemu_img: DEFAULT_QEMU_IMG.into(),
            accel: Accel::Auto,
            guest_port: DEFAULT_GUEST_PORT,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            tsc_khz: None,
            kernel_args: Vec::new(),
            cgroup_root_name: limits::DEFAULT_CGROUP_ROOT.into(),
            log_file_limit_bytes: limits::LOG_FILE_LIMIT_BYTES,
            max_exec_output_bytes: crate::guest::MAX_EXEC_OUTPUT_BYTES,
            net: None,
        }
    }
}

/// What `meta.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    id: VmId,
    tenant: TenantId,
    workspace: String,
    created_at: String,
    accel: Accel,
    cpus: u32,
    memory_mib: u64,
    guest_port: u16,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    disk: Option<PathBuf>,
}

/// A qemu this process started, reaped by a thread of its own.
#[derive(Debug)]
struct Launched {
    exit: Mutex<Option<ExitStatus>>,
    reaped: Condvar,
}

impl Launched {
    fn exited(&self) -> Option<ExitStatus> {
        *self.exit.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, limit: Duration) -> Option<ExitStatus> {
        let guard = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .reaped
            .wait_timeout_while(guard, limit, |exit| exit.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// qemu microVMs on this host; see the module docs.
#[derive(Clone)]
pub struct QemuDriver {
    inner: Arc<Inner>,
}

struct Inner {
    config: QemuConfig,
    /// `config.state_dir`, absolute, symbolic links resolved when it exists:
    /// qemu processes are recognized by their exact `-pidfile` path.
    state_dir: PathBuf,
    /// `auto`'s verdict, once probed (or the configured accelerator).
    accel: Mutex<Option<Accel>>,
    /// Host ports handed to a launch in flight (not yet bound by qemu).
    reserved_ports: Mutex<BTreeSet<u16>>,
    launched: Mutex<HashMap<VmId, Arc<Launched>>>,
    /// The host's cgroups for VMs, prepared at the first `create` (`None`:
    /// unavailable on this host).
    cgroups: std::sync::OnceLock<Option<limits::Cgroups>>,
}

/// A client of a VM's guest agent (over TCP).
pub type QemuGuestClient = GuestClient<Box<dyn Fn() -> ConnectFuture + Send + Sync>>;

/// What connecting to a VM's agent returns.
pub type ConnectFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<tokio::net::TcpStream>> + Send>>;

impl QemuDriver {
    pub fn new(config: QemuConfig) -> Self {
        let state_dir = fs::canonicalize(&config.state_dir)
            .or_else(|_| std::path::absolute(&config.state_dir))
            .unwrap_or_else(|_| config.state_dir.clone());
        QemuDriver {
            inner: Arc::new(Inner {
                config,
                state_dir,
                accel: Mutex::new(None),
                reserved_ports: Mutex::new(BTreeSet::new()),
                launched: Mutex::new(HashMap::new()),
                cgroups: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn config(&self) -> &QemuConfig {
        &self.inner.config
    }

    /// The VM's folder (whether or not it exists).
    pub fn vm_dir(&self, id: VmId) -> PathBuf {
        self.inner.vm_dir(id)
    }

    /// The accelerator VMs get: the configured one, or `auto`'s verdict once
    /// a VM was created (`None` before).
    pub fn resolved_accel(&self) -> Option<Accel> {
        *self.inner.accel.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves the accelerator now (for `auto`: the KVM probe boot of
    /// `image`, blocking, at most [`QemuConfig::probe_timeout`]) rather than
    /// at the first `create`; the verdict is kept.
    pub fn resolve_accel(&self, image: &crate::ImageSpec) -> Result<Accel> {
        let kernel = image
            .kernel
            .as_deref()
            .ok_or_else(|| DriverError::Boot("the image has no kernel".into()))?;
        Ok(self.inner.accel(kernel, image.initrd.as_deref()))
    }

    /// The VM's cgroup folders, as recorded when it was created (empty
    /// when cgroups are unavailable).
    pub fn cgroup_dirs(&self, id: VmId) -> Vec<PathBuf> {
        read_cgroup_record(&self.inner.vm_dir(id))
    }

    /// The VM's qemu pid, when it is alive.
    pub fn qemu_pid(&self, id: VmId) -> Option<i32> {
        let dir = self.inner.vm_dir(id);
        read_number::<i32>(&dir.join("pid")).filter(|&pid| procs::is_vm_process(pid, &dir))
    }

    /// A client of the VM's guest agent; `NotFound` when the VM does not
    /// exist.
    pub async fn guest(&self, id: VmId) -> Result<QemuGuestClient> {
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
        let port = match tokio::fs::read_to_string(vm_dir.join("port")).await {
            Ok(port) => port
                .trim()
                .parse::<u16>()
                .map_err(|_| DriverError::Guest(format!("VM {id} has an unreadable port file")))?,
            Err(_) if vm_dir.is_dir() => {
                return Err(DriverError::Guest(format!(
                    "VM {id} has no port yet (still being created?)"
                )));
            }
            Err(_) => return Err(DriverError::NotFound(id)),
        };
        let client: QemuGuestClient = GuestClient::new(
            Box::new(move || -> ConnectFuture {
                Box::pin(async move {
                    let stream =
                        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
                    stream.set_nodelay(true)?;
                    Ok(stream)
                })
            }),
            secret,
        );
        Ok(client.with_max_exec_output(self.inner.config.max_exec_output_bytes))
    }
}

fn read_cgroup_record(vm_dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string(vm_dir.join("cgroups"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn read_number<T: std::str::FromStr>(path: &Path) -> Option<T> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Creates `path` with `contents`, mode 0600, failing if it exists.
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

/// The last bytes of a log file, for errors.
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).trim().to_owned()
}

fn boot_error(vm_dir: &Path, reason: String) -> String {
    let mut message = reason;
    for (name, label) in [("qemu.log", "qemu"), ("console.log", "console")] {
        let tail = log_tail(&vm_dir.join(name));
        if !tail.is_empty() {
            message.push_str(&format!("; {label}: {tail}"));
        }
    }
    message
}

/// The host's TSC frequency in kHz, as well as the host tells it.
pub fn host_tsc_khz() -> Option<u64> {
    if let Some(khz) = read_number::<u64>(Path::new("/sys/devices/system/cpu/cpu0/tsc_freq_khz")) {
        return Some(khz);
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// The kernel command line of a VM. It never holds the secret (every guest
/// process can read `/proc/cmdline`): that comes as `-fw_cfg`.
fn kernel_cmdline(config: &QemuConfig, accel: Accel, spec: &VmSpec, root_disk: bool) -> String {
    let mut args = vec![
        "console=ttyS0".to_owned(),
        "quiet".to_owned(),
        "panic=-1".to_owned(),
    ];
    if accel == Accel::Tcg
        && let Some(khz) = config.tsc_khz.or_else(host_tsc_khz)
    {
        args.push(format!("tsc_early_khz={khz}"));
        args.push("tsc=reliable".to_owned());
    }
    if root_disk {
        args.push("root=/dev/vda".to_owned());
        args.push("rw".to_owned());
    }
    args.extend(config.kernel_args.iter().cloned());
    args.push(format!("hearth.vm={}", spec.id));
    args.push(format!("hearth.port={}", config.guest_port));
    args.join(" ")
}

/// A free port on 127.0.0.1 that no launch in flight holds.
fn pick_port(reserved: &Mutex<BTreeSet<u16>>) -> io::Result<u16> {
    for _ in 0..64 {
        let port = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?
            .local_addr()?
            .port();
        if reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return Ok(port);
        }
    }
    Err(io::Error::other("no free port on 127.0.0.1"))
}

/// A disk image's format (qcow2, else it is used as raw) and virtual size
/// in bytes: a qcow2 header's
/// `size` (big-endian at offset 24), or a raw file's length.
fn disk_info(disk: &Path) -> io::Result<(&'static str, u64)> {
    use std::io::Read;
    let mut header = [0u8; 32];
    let mut file = fs::File::open(disk)?;
    let mut n = 0;
    while n < header.len() {
        match file.read(&mut header[n..])? {
            0 => break,
            read => n += read,
        }
    }
    if n >= 4 && header[..4] == *b"QFI\xfb" {
        if n < 32 {
            return Err(io::Error::other("a truncated qcow2 header"));
        }
        let size = u64::from_be_bytes(header[24..32].try_into().unwrap_or_default());
        Ok(("qcow2", size))
    } else {
        Ok(("raw", file.metadata()?.len()))
    }
}

impl Inner {
    fn vm_dir(&self, id: VmId) -> PathBuf {
        self.state_dir.join(id.to_string())
    }

    /// The accelerator for a VM booting `kernel`/`initrd`: probed once.
    fn accel(&self, kernel: &Path, initrd: Option<&Path>) -> Accel {
        let mut verdict = self.accel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(accel) = *verdict {
            return accel;
        }
        let accel = match self.config.accel {
            Accel::Auto => match self.probe_kvm(kernel, initrd) {
                Ok(()) => {
                    tracing::info!("qemu: KVM works; VMs run under KVM");
                    Accel::Kvm
                }
                Err(reason) => {
                    tracing::info!(%reason, "qemu: KVM unusable; VMs run under TCG");
                    Accel::Tcg
                }
            },
            fixed => fixed,
        };
        *verdict = Some(accel);
        accel
    }

    /// Boots the image under KVM with `hearth.probe=1`; `Ok` when vm-init
    /// said so on the console in time.
    fn probe_kvm(&self, kernel: &Path, initrd: Option<&Path>) -> Result<(), String> {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm: {e}"))?;
        fs::create_dir_all(&self.state_dir)
            .map_err(|e| format!("create {}: {e}", self.state_dir.display()))?;
        self.remove_stale_probes();
        let mut suffix = [0u8; 6];
        rand::rngs::OsRng.fill_bytes(&mut suffix);
        let dir = self.state_dir.join(format!(
            ".probe-{}",
            suffix
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
        fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let console = dir.join("console.log");
        // Under `timeout`, so that a probe orphaned by a crash of this
        // process cannot hang on (and burn a CPU) for ever.
        let limit = self.config.probe_timeout + Duration::from_secs(1);
        let mut command = Command::new("timeout");
        command
            .args(["-s", "KILL"])
            .arg(format!("{}", limit.as_secs_f64()))
            .arg(&self.config.qemu_binary)
            .args([
                "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "256",
            ])
            .arg("-kernel")
            .arg(kernel);
        if let Some(initrd) = initrd {
            command.arg("-initrd").arg(initrd);
        }
        command
            .args(["-append", "console=ttyS0 quiet panic=-1 hearth.probe=1"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .env_clear()
            .env("PATH", hearth_guest_agent::protocol::BASE_PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let result = (|| {
            let mut child = command
                .spawn()
                .map_err(|e| format!("start timeout {}: {e}", self.config.qemu_binary.display()))?;
            let deadline = Instant::now() + self.config.probe_timeout;
            let marker = hearth_guest_agent::vminit::PROBE_MARKER;
            let verdict = loop {
                if fs::read_to_string(&console).is_ok_and(|c| c.contains(marker)) {
                    break Ok(());
                }
                match child.try_wait() {
                    Ok(Some(status)) => {
                        let mut stderr = String::new();
                        if let Some(mut pipe) = child.stderr.take() {
                            let _ = io::Read::read_to_string(&mut pipe, &mut stderr);
                        }
                        break Err(format!(
                            "the probe boot ended ({status}) without {marker}: {}",
                            stderr.trim()
                        ));
                    }
                    Ok(None) => {}
                    Err(e) => break Err(format!("wait for the probe: {e}")),
                }
                if Instant::now() >= deadline {
                    break Err(format!(
                        "the probe boot did not reach init within {:?}",
                        self.config.probe_timeout
                    ));
                }
                thread::sleep(Duration::from_millis(10));
            };
            // SIGTERM: `timeout` passes it on to qemu, which quits.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            if let Err(e) = child.wait() {
                tracing::warn!(error = %e, "cannot wait for the KVM probe");
            }
            verdict
        })();
        let _ = fs::remove_dir_all(&dir);
        result
    }

    /// Removes probe folders left by a crashed process (older than a few
    /// minutes, so that a concurrent probe keeps its own).
    fn remove_stale_probes(&self) {
        let Ok(entries) = fs::read_dir(&self.state_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let stale = entry.file_name().to_string_lossy().starts_with(".probe-")
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(600));
            if stale {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    fn create(self: &Arc<Self>, spec: &VmSpec) -> Result<()> {
        let image = &spec.image;
        let kernel = image
            .kernel
            .clone()
            .ok_or_else(|| DriverError::Boot("the image has no kernel".into()))?;
        if !kernel.is_file() {
            return Err(DriverError::Boot(format!(
                "the kernel {} does not exist",
                kernel.display()
            )));
        }
        for path in image.initrd.iter().chain(image.disk.iter()) {
            if !path.is_file() {
                return Err(DriverError::Boot(format!(
                    "{} does not exist",
                    path.display()
                )));
            }
        }
        if image.initrd.is_none() && image.disk.is_none() {
            return Err(DriverError::Boot(
                "the image has neither initrd nor disk".into(),
            ));
        }
        if let Some(bad) = self.config.kernel_args.iter().find(|a| a.contains('"')) {
            return Err(DriverError::Boot(format!(
                "kernel argument {bad:?} holds a quote"
            )));
        }
        // qemu runs in the VM folder: every path it gets is absolute.
        let absolute = |path: &Path| {
            fs::canonicalize(path)
                .map_err(|e| DriverError::Boot(format!("{}: {e}", path.display())))
        };
        let kernel = absolute(&kernel)?;
        let mut image = image.clone();
        image.initrd = image.initrd.as_deref().map(absolute).transpose()?;
        image.disk = image.disk.as_deref().map(absolute).transpose()?;
        let spec = &VmSpec {
            image,
            ..spec.clone()
        };
        let accel = self.accel(&kernel, spec.image.initrd.as_deref());

        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.state_dir)
            .map_err(|e| {
                DriverError::Boot(format!("cannot create {}: {e}", self.state_dir.display()))
            })?;
        let vm_dir = self.vm_dir(spec.id);
        if vm_dir.to_string_lossy().contains(',') {
            // qemu's option syntax would split the folder's path.
            return Err(DriverError::Boot(format!(
                "the state folder {} holds a ',', which qemu options cannot take",
                self.state_dir.display()
            )));
        }
        match fs::DirBuilder::new().mode(0o700).create(&vm_dir) {
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
        match self.boot(spec, &vm_dir, accel, &kernel) {
            Ok(()) => Ok(()),
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
    fn boot(
        self: &Arc<Self>,
        spec: &VmSpec,
        vm_dir: &Path,
        accel: Accel,
        kernel: &Path,
    ) -> Result<(), String> {
        let io_err = |what: &str, e: io::Error| format!("{what}: {e}");
        let meta = Meta {
            id: spec.id,
            tenant: spec.tenant,
            workspace: spec.workspace.clone(),
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            accel,
            cpus: spec.cpus.max(1),
            memory_mib: if spec.memory_mib == 0 {
                DEFAULT_MEMORY_MIB
            } else {
                spec.memory_mib
            },
            guest_port: self.config.guest_port,
            kernel: kernel.to_path_buf(),
            initrd: spec.image.initrd.clone(),
            disk: spec.image.disk.clone(),
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| format!("meta.json: {e}"))?;
        fs::write(vm_dir.join("meta.json"), json).map_err(|e| io_err("write meta.json", e))?;

        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&vm_dir.join("secret"), secret.as_bytes())
            .map_err(|e| io_err("write the secret", e))?;

        let overlay = match &spec.image.disk {
            Some(disk) => Some(self.overlay(disk, vm_dir, spec.disk_mib)?),
            None => None,
        };
        let bounds = limits::Limits::for_vm(
            meta.memory_mib,
            meta.cpus,
            overlay.as_ref().map(|(_, size)| *size),
            self.config.log_file_limit_bytes,
        );
        let cgroup_procs = self.create_cgroups(spec, vm_dir, bounds)?;
        let overlay = overlay.map(|(path, _)| path);
        let root_disk = overlay.is_some() && spec.image.initrd.is_none();
        let tap = self.attach_network(spec)?;
        let mut cmdline = kernel_cmdline(&self.config, accel, spec, root_disk);
        if let Some(tap) = &tap {
            // The tap is the guest's eth1 (eth0 is the agent's channel).
            cmdline.push_str(&format!(
                " hearth.eth1={} hearth.gw={gw} hearth.dns={gw}",
                tap.cidr(),
                gw = tap.gateway
            ));
        }
        let cfg = format!("[machine]\n  append = \"{cmdline}\"\n");
        write_private(&vm_dir.join("qemu.cfg"), cfg.as_bytes())
            .map_err(|e| io_err("write qemu.cfg", e))?;
        // Created here so that qemu keeps the mode (it holds kernel messages).
        write_private(&vm_dir.join("console.log"), b"")
            .map_err(|e| io_err("create console.log", e))?;

        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = pick_port(&self.reserved_ports).map_err(|e| io_err("pick a port", e))?;
            let launched = self.launch(
                spec,
                &meta,
                vm_dir,
                accel,
                overlay.as_deref(),
                port,
                (&bounds, &cgroup_procs),
                tap.as_ref(),
            );
            self.reserved_ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&port);
            match launched {
                Ok(()) => {
                    fs::write(vm_dir.join("port"), port.to_string())
                        .map_err(|e| io_err("write port", e))?;
                    return Ok(());
                }
                Err(Launch::PortTaken(reason)) => {
                    tracing::debug!(vm = %spec.id, port, %reason, "qemu could not bind the port; retrying with another");
                    last_error = reason;
                }
                Err(Launch::Failed(reason)) => return Err(boot_error(vm_dir, reason)),
            }
        }
        Err(boot_error(
            vm_dir,
            format!("no free host port after {PORT_ATTEMPTS} attempts: {last_error}"),
        ))
    }

    /// An `egress` VM's tap on the VM network (see `crate::net`); `host` is
    /// refused: a qemu guest never gets the host's network.
    fn attach_network(&self, spec: &VmSpec) -> Result<Option<crate::net::Attachment>, String> {
        use hearth_core::resource::Network;
        match spec.network.mode {
            Network::None => Ok(None),
            Network::Host => Err(
                "network: host is not available for qemu VMs (the guest would \
                 reach the host's loopback); use network: egress with allow_host_ports"
                    .into(),
            ),
            Network::Egress => {
                let net = self.config.net.as_ref().ok_or_else(|| {
                    "network: egress needs the VM network, which this server has not set up"
                        .to_owned()
                })?;
                net.attach_tap(spec.id, &spec.network.allow_host_ports)
                    .map(Some)
                    .map_err(|e| format!("cannot attach the VM to the VM network: {e}"))
            }
        }
    }

    /// Creates the VM's cgroups (recorded in `cgroups` first) with
    /// `bounds`; returns the `cgroup.procs` files qemu joins (none when the
    /// host has no usable cgroups).
    fn create_cgroups(
        &self,
        spec: &VmSpec,
        vm_dir: &Path,
        bounds: limits::Limits,
    ) -> Result<Vec<PathBuf>, String> {
        let cgroups = self.cgroups.get_or_init(|| {
            match limits::Cgroups::prepare(&self.config.cgroup_root_name) {
                Ok(cgroups) => Some(cgroups),
                Err(reason) => {
                    tracing::warn!(%reason, "cgroups are unavailable: qemu VMs run without memory, CPU and pids limits");
                    None
                }
            }
        });
        let Some(cgroups) = cgroups else {
            return Ok(Vec::new());
        };
        let vm = spec.id.to_string();
        let record: String = cgroups
            .vm_dirs(&vm)
            .iter()
            .map(|d| format!("{}\n", d.display()))
            .collect();
        fs::write(vm_dir.join("cgroups"), record).map_err(|e| format!("write cgroups: {e}"))?;
        cgroups.create(&vm, bounds)
    }

    /// `qemu-img create` of the VM's copy-on-write overlay over `disk`;
    /// returns it and its virtual size: `disk_mib` when given (the most the
    /// guest can ever write; a larger image disk is refused), else the
    /// image disk's own size.
    fn overlay(&self, disk: &Path, vm_dir: &Path, disk_mib: u64) -> Result<(PathBuf, u64), String> {
        let disk = fs::canonicalize(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
        let (format, image_size) =
            disk_info(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
        let size = if disk_mib == 0 {
            image_size
        } else {
            let limit = disk_mib.saturating_mul(1 << 20);
            if image_size > limit {
                return Err(format!(
                    "the image's disk is {} MiB, more than the environment's disk limit of {disk_mib} MiB",
                    image_size.div_ceil(1 << 20)
                ));
            }
            limit
        };
        let overlay = vm_dir.join("overlay.qcow2");
        let out = Command::new(&self.config.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(&disk)
            .args(["-F", format])
            .arg(&overlay)
            .arg(size.to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run {}: {e}", self.config.qemu_img.display()))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img create: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok((overlay, size))
    }

    /// Starts qemu on host port `port`, inside `bounds` (its file-size
    /// limit, and the cgroups whose `cgroup.procs` files are given), and
    /// waits until QMP answers.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        self: &Arc<Self>,
        spec: &VmSpec,
        meta: &Meta,
        vm_dir: &Path,
        accel: Accel,
        overlay: Option<&Path>,
        port: u16,
        (bounds, cgroup_procs): (&limits::Limits, &[PathBuf]),
        tap: Option<&crate::net::Attachment>,
    ) -> Result<(), Launch> {
        let failed = |what: &str, e: io::Error| Launch::Failed(format!("{what}: {e}"));
        for stale in ["pid", "qmp.sock"] {
            let _ = fs::remove_file(vm_dir.join(stale));
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(vm_dir.join("qemu.log"))
            .map_err(|e| failed("open qemu.log", e))?;
        let log_err = log.try_clone().map_err(|e| failed("open qemu.log", e))?;

        let qmp_path = vm_dir.join("qmp.sock");
        let qmp_arg = if qmp_path.as_os_str().len() <= qmp::MAX_SOCKET_PATH {
            qmp_path.to_string_lossy().into_owned()
        } else {
            // Relative to qemu's working folder (the VM folder).
            "qmp.sock".to_owned()
        };
        // eth0: the agent's channel only. `restrict=on` keeps the guest from
        // reaching anything through it (the host's loopback at 10.0.2.2
        // above all); the host's forward to the agent still works.
        let netdev = format!(
            "user,id=n0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:{port}-:{}",
            self.config.guest_port
        );
        // Through the preamble that puts qemu in its bounds and then
        // becomes it (see `limits`).
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", limits::PREAMBLE, "hearth-qemu"])
            .arg(limits::ulimit_blocks(bounds.file_bytes).to_string())
            .args(cgroup_procs)
            .arg("--")
            .arg(&self.config.qemu_binary);
        let accel_arg = match accel {
            Accel::Tcg => format!("tcg,tb-size={}", limits::TCG_TB_SIZE_MIB),
            other => other.as_str().to_owned(),
        };
        command
            .arg("-name")
            .arg(format!("hearth-{}", spec.id))
            .args(["-M", "microvm", "-accel"])
            .arg(accel_arg)
            .arg("-cpu")
            .arg(if accel == Accel::Kvm { "host" } else { "max" })
            .arg("-smp")
            .arg(meta.cpus.to_string())
            .arg("-m")
            .arg(meta.memory_mib.to_string())
            .arg("-kernel")
            .arg(&meta.kernel);
        if let Some(initrd) = &meta.initrd {
            command.arg("-initrd").arg(initrd);
        }
        // The secret reaches the guest as a firmware configuration item
        // (read by vm-init from sysfs): only its file's path is on the
        // command line.
        command
            .arg("-fw_cfg")
            .arg(format!(
                "name={},file={}",
                hearth_guest_agent::vminit::FW_CFG_SECRET_NAME,
                vm_dir.join("secret").display()
            ))
            .arg("-readconfig")
            .arg(vm_dir.join("qemu.cfg"))
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                // qemu's own seccomp filter: should a guest take over qemu,
                // it cannot start programs, change ids or priorities.
                "-sandbox",
                QEMU_SANDBOX,
            ])
            .arg("-serial")
            .arg(format!("file:{}", vm_dir.join("console.log").display()))
            .arg("-netdev")
            .arg(netdev)
            .args(["-device", "virtio-net-device,netdev=n0"]);
        if let Some(tap) = tap {
            // eth1: the VM's port on the VM network (egress).
            command
                .arg("-netdev")
                .arg(format!(
                    "tap,id=n1,ifname={},script=no,downscript=no",
                    tap.port
                ))
                .arg("-device")
                .arg(format!("virtio-net-device,netdev=n1,mac={}", tap.mac));
        }
        command
            // Memory the guest frees goes back to the host.
            .args(["-device", "virtio-balloon-device,free-page-reporting=on"]);
        if let Some(overlay) = overlay {
            command
                .arg("-drive")
                .arg(format!(
                    "id=d0,if=none,format=qcow2,discard=unmap,file={}",
                    overlay.display()
                ))
                .args(["-device", "virtio-blk-device,drive=d0"]);
        }
        command
            .arg("-qmp")
            .arg(format!("unix:{qmp_arg},server=on,wait=off"))
            .arg("-pidfile")
            .arg(vm_dir.join("pid"));
        // Its own process group (a Ctrl-C of the server must not reach it),
        // no parent-death signal (it must outlive the server), none of the
        // server's environment.
        command
            .env_clear()
            .env("PATH", hearth_guest_agent::protocol::BASE_PATH)
            .current_dir(vm_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let mut child = command.spawn().map_err(|e| {
            Launch::Failed(format!(
                "cannot start {}: {e}",
                self.config.qemu_binary.display()
            ))
        })?;
        let pid = child.id();
        let launched = Arc::new(Launched {
            exit: Mutex::new(None),
            reaped: Condvar::new(),
        });
        self.launched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.id, launched.clone());
        let reaper = launched.clone();
        let spawned = thread::Builder::new()
            .name(format!("reap-qemu-{pid}"))
            .stack_size(64 << 10)
            .spawn(move || {
                let status = child.wait().ok();
                *reaper.exit.lock().unwrap_or_else(|e| e.into_inner()) = status;
                reaper.reaped.notify_all();
            });
        if let Err(e) = spawned {
            // The child is dropped without being waited for; `destroy` kills
            // it by its pid file.
            tracing::warn!(error = %e, "cannot start a reaper thread");
        }

        // Launched = QMP answers `query-status` (qemu finished setting up
        // its devices, port forwarding included), or qemu died.
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        loop {
            if let Some(status) = launched.exited() {
                let log = log_tail(&vm_dir.join("qemu.log"));
                let reason = format!("qemu exited during start ({status}): {log}");
                return Err(if log.contains(HOSTFWD_FAILED) {
                    Launch::PortTaken(reason)
                } else {
                    Launch::Failed(format!("qemu exited during start ({status})"))
                });
            }
            if vm_dir.join("qmp.sock").exists() {
                let status = qmp::Qmp::connect(vm_dir, "qmp.sock", Duration::from_secs(2))
                    .and_then(|mut q| q.query_status());
                if let Ok(status) = status {
                    if status == "running" {
                        return Ok(());
                    }
                    tracing::debug!(vm = %spec.id, %status, "qemu is not running yet");
                }
            }
            if Instant::now() >= deadline {
                return Err(Launch::Failed(format!(
                    "qemu did not start within {LAUNCH_TIMEOUT:?}"
                )));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn destroy(&self, id: VmId) -> Result<()> {
        let vm_dir = self.vm_dir(id);
        let launched = self
            .launched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned();
        if !vm_dir.exists() {
            self.detach_network(id)?;
            self.forget(id);
            return Ok(());
        }
        if let Some(pid) =
            read_number::<i32>(&vm_dir.join("pid")).filter(|&p| procs::is_vm_process(p, &vm_dir))
        {
            // Politely first: qemu exits at once on `quit` and leaves no
            // half-written file of its own.
            if let Ok(mut qmp) = qmp::Qmp::connect(&vm_dir, "qmp.sock", Duration::from_secs(1)) {
                let _ = qmp.quit();
            }
            let deadline = Instant::now() + QUIT_GRACE;
            while procs::is_vm_process(pid, &vm_dir) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        }
        // Whatever still names the VM (qemu that ignored `quit`, one whose
        // pid file was never written) or is in its cgroups: SIGKILL until
        // none is alive.
        let cgroups = read_cgroup_record(&vm_dir);
        for dir in &cgroups {
            limits::kill_all(dir);
        }
        let deadline = Instant::now() + DESTROY_TIMEOUT;
        loop {
            let mut alive = procs::vm_processes(&vm_dir);
            for dir in &cgroups {
                alive.extend(limits::procs(dir).into_iter().filter(|&p| procs::alive(p)));
            }
            alive.sort_unstable();
            alive.dedup();
            if alive.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Io(io::Error::other(format!(
                    "qemu {alive:?} of VM {id} is still alive after {DESTROY_TIMEOUT:?}"
                ))));
            }
            for pid in alive {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(5));
        }
        if let Some(launched) = &launched {
            // Leave no zombie: the reaper collects qemu promptly.
            launched.wait(Duration::from_secs(2));
        }
        self.detach_network(id)?;
        for dir in &cgroups {
            limits::remove(
                dir,
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(1)),
            )?;
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
        self.forget(id);
        Ok(())
    }

    /// Removes the VM's tap, table elements and lease, if it has them.
    fn detach_network(&self, id: VmId) -> Result<()> {
        match &self.config.net {
            Some(net) => net.detach(id).map_err(|e| {
                DriverError::Io(io::Error::other(format!(
                    "cannot detach VM {id} from the VM network: {e}"
                )))
            }),
            None => Ok(()),
        }
    }

    fn forget(&self, id: VmId) {
        let mut launched = self.launched.lock().unwrap_or_else(|e| e.into_inner());
        if launched.get(&id).is_some_and(|l| l.exited().is_some()) {
            launched.remove(&id);
        }
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
                tracing::warn!(dir = %vm_dir.display(), "unreadable meta.json: not a qemu VM");
                continue;
            };
            if entry.file_name() != OsString::from(meta.id.to_string()) {
                continue;
            }
            let running = read_number::<i32>(&vm_dir.join("pid"))
                .is_some_and(|pid| procs::is_vm_process(pid, &vm_dir));
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

/// Why a launch failed.
enum Launch {
    /// qemu could not bind the host port: try another.
    PortTaken(String),
    Failed(String),
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DriverError::Io(io::Error::other(format!("qemu driver task failed: {e}"))))?
}

#[async_trait]
impl Driver for QemuDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Qemu
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
        self.guest(id).await?.exec(request, output).await
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
        // While the guest boots, qemu accepts the host side of a connection
        // but its SYN to the guest goes unanswered until qemu retransmits
        // it, seconds later: a check begun just before the guest's network
        // came up would stall. So a new attempt starts every
        // HEALTH_ATTEMPT while earlier ones still wait (a slow guest's
        // answer still counts); the first answer wins, the others are
        // dropped with their connections.
        let client = Arc::new(self.guest(id).await?);
        let deadline = tokio::time::Instant::now() + crate::guest::HEALTH_TIMEOUT;
        let mut attempts = tokio::task::JoinSet::new();
        loop {
            let attempt = client.clone();
            attempts.spawn(async move { attempt.health().await });
            let next = (tokio::time::Instant::now() + HEALTH_ATTEMPT).min(deadline);
            loop {
                tokio::select! {
                    done = attempts.join_next() => match done {
                        Some(Ok(Ok(health))) => return Ok(health),
                        Some(Ok(Err(e))) if attempts.is_empty() => return Err(e),
                        Some(Ok(Err(_))) => {}
                        Some(Err(e)) if attempts.is_empty() => {
                            return Err(DriverError::Guest(format!("health check: {e}")));
                        }
                        Some(Err(_)) => {}
                        None => break,
                    },
                    () = tokio::time::sleep_until(next) => break,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DriverError::Guest(format!(
                    "health check: no answer within {:?}",
                    crate::guest::HEALTH_TIMEOUT
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageSpec;

    fn spec() -> VmSpec {
        VmSpec {
            id: VmId::new(),
            tenant: TenantId::new(),
            workspace: "web".into(),
            cpus: 2,
            memory_mib: 256,
            image: ImageSpec::default(),
            network: crate::NetworkSpec::host(),
            disk_mib: 0,
        }
    }

    #[test]
    fn kernel_command_lines_carry_the_vm_and_tcg_clock_settings() {
        let mut config = QemuConfig::new("/s");
        config.tsc_khz = Some(2_300_000);
        config.kernel_args = vec!["loglevel=4".into()];
        let spec = spec();
        let tcg = kernel_cmdline(&config, Accel::Tcg, &spec, false);
        assert!(
            tcg.starts_with(
                "console=ttyS0 quiet panic=-1 tsc_early_khz=2300000 tsc=reliable loglevel=4 "
            ),
            "{tcg}"
        );
        assert!(
            tcg.ends_with(&format!(
                "hearth.vm={} hearth.port={DEFAULT_GUEST_PORT}",
                spec.id
            )),
            "{tcg}"
        );
        let kvm = kernel_cmdline(&config, Accel::Kvm, &spec, true);
        assert!(
            !kvm.contains("tsc") && kvm.contains("root=/dev/vda rw"),
            "{kvm}"
        );
    }

    #[test]
    fn ports_are_never_handed_out_twice_while_reserved() {
        let reserved = Mutex::new(BTreeSet::new());
        let a = pick_port(&reserved).unwrap();
        let b = pick_port(&reserved).unwrap();
        assert_ne!(a, b);
        assert_eq!(reserved.lock().unwrap().len(), 2);
    }

    #[test]
    fn disk_formats_and_sizes_are_read_from_their_headers() {
        let dir = tempfile::tempdir().unwrap();
        let (qcow, raw) = (dir.path().join("a.qcow2"), dir.path().join("b.img"));
        let mut header = b"QFI\xfb\0\0\0\x03".to_vec();
        header.resize(24, 0);
        header.extend_from_slice(&(5u64 << 30).to_be_bytes());
        fs::write(&qcow, &header).unwrap();
        fs::write(&raw, [0u8; 512]).unwrap();
        assert_eq!(disk_info(&qcow).unwrap(), ("qcow2", 5 << 30));
        assert_eq!(disk_info(&raw).unwrap(), ("raw", 512));
        fs::write(&qcow, b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(disk_info(&qcow).is_err());
    }

    #[test]
    fn the_host_tsc_frequency_is_found() {
        let khz = host_tsc_khz().expect("a TSC frequency on x86 hosts");
        assert!((100_000..20_000_000).contains(&khz), "{khz}");
    }

    #[tokio::test]
    async fn missing_vms_are_not_found_and_destroy_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let driver = QemuDriver::new(QemuConfig::new(dir.path().join("state")));
        let id = VmId::new();
        assert!(matches!(
            driver.health(id).await,
            Err(DriverError::NotFound(_))
        ));
        driver.destroy(id).await.unwrap();
        assert!(driver.list().await.unwrap().is_empty());
        let err = driver.create(&spec()).await.unwrap_err();
        assert!(err.to_string().contains("no kernel"), "{err}");
        assert!(driver.list().await.unwrap().is_empty());
    }
}
