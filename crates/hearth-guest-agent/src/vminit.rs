//! `hearth-guest-agent vm-init`: PID 1 of a qemu VM (the kernel's `/init` in
//! an image baked by `hearth-image`; see `hearth_drivers::qemu`).
//!
//! Boot, in order: mount `/proc`, `/sys`, `/dev` (devtmpfs, with `/dev/pts`
//! and `/dev/shm`), `/tmp` and `/run` (tmpfs), create `/home` and `/root`;
//! read the `hearth.*` parameters of the kernel command line
//! ([`BootParams`]); load the kernel modules listed in [`MODULES_FILE`], in
//! that order (`finit_module`, no `insmod` needed); if the initramfs names a
//! disk root in [`ROOT_FILE`], mount it, switch to it and exec the disk's
//! own agent, which boots again from the start there; bring up `lo` and `eth0`
//! with qemu user networking's addresses (`ip` from the image: busybox's in
//! the minimal image), and `eth1` with `hearth.eth1=`'s address and the
//! default route when the VM is on the host's VM network; IPv6 off; write
//! `/etc/resolv.conf` and the hostname; read the
//! secret from qemu's firmware configuration device ([`FW_CFG_SECRET`],
//! root-only in sysfs), keep it in `/run/hearth/secret` (0600, in a 0700
//! folder on tmpfs) and unload `qemu_fw_cfg` so that sysfs no longer shows
//! it; then start `hearth-guest-agent serve --tcp
//! 0.0.0.0:<port>` as a child and supervise it: every orphan is reaped, a
//! server that dies is restarted, and SIGTERM, SIGINT, SIGUSR1, SIGUSR2 or
//! SIGPWR (what `poweroff`/`halt` send to PID 1) end every process, sync and
//! power the machine off.
//!
//! With `hearth.probe=1` it prints [`PROBE_MARKER`] as soon as it runs and
//! powers off: the qemu driver's accelerator probe.
//!
//! **Invariants:**
//! - the secret is never printed, nor on any command line: not the
//!   kernel's (`/proc/cmdline` is readable by every guest process), not the
//!   server's (it reads it from a 0600 file). What holds inside the guest:
//!   processes other than root cannot read it; root can (the agent's file,
//!   or the device's I/O ports), which gives it nothing it lacks: the
//!   secret only opens this VM's own agent, whose commands run as root;
//! - PID 1 never exits: a fatal boot error is logged to the console and the
//!   machine is powered off, so the host sees the VM end rather than a
//!   kernel panic hanging it;
//! - signals are handled synchronously (`sigwait` on a blocked set), with
//!   no handler and no `unsafe`; the server and every command start with an
//!   empty signal mask (std resets it when spawning);
//! - everything is logged to the console (the VM's serial port), one line
//!   per step, prefixed with `hearth vm-init` and the milliseconds since
//!   init started.

use crate::protocol::BASE_PATH;
use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, sethostname, sync};
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// The modules to load, one absolute path per line, in load order (written
/// by `hearth-image`).
pub const MODULES_FILE: &str = "/etc/hearth/modules";
/// In an initramfs that only prepares a disk root (the `debian` image
/// kind): the root device (`/dev/vda`). Absent in a root of its own.
pub const ROOT_FILE: &str = "/etc/hearth/root";
/// Where the disk root is mounted before the switch.
const NEW_ROOT: &str = "/newroot";
/// The agent on a disk root, exec'd as its PID 1.
const DISK_AGENT: &str = "/sbin/hearth-guest-agent";
/// How long to wait for the root device to appear.
const ROOT_DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// Where the secret is kept for the server (tmpfs).
pub const RUN_DIR: &str = "/run/hearth";
/// The `-fw_cfg` item the qemu driver gives the secret in (`opt/` is the
/// prefix qemu leaves to users).
pub const FW_CFG_SECRET_NAME: &str = "opt/hearth/secret";
/// Where that item's bytes appear once `qemu_fw_cfg` is loaded.
pub const FW_CFG_SECRET: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/hearth/secret/raw";
/// The kernel module that shows firmware configuration items in sysfs.
const FW_CFG_MODULE: &std::ffi::CStr = c"qemu_fw_cfg";
/// How long to wait for the secret to appear after the module is loaded.
const FW_CFG_TIMEOUT: Duration = Duration::from_secs(10);
/// What vm-init prints on the console in probe mode.
pub const PROBE_MARKER: &str = "hearth-probe-ok";
/// The agent's TCP port inside the guest when `hearth.port` is absent.
pub const DEFAULT_PORT: u16 = 7070;
/// qemu user networking: the guest's address, the host (gateway) and DNS.
pub const DEFAULT_ADDRESS: &str = "10.0.2.15/24";
pub const DEFAULT_GATEWAY: &str = "10.0.2.2";
pub const DEFAULT_NAMESERVER: &str = "10.0.2.3";
/// How long to wait for `eth0` to appear after its driver is loaded.
const NETDEV_TIMEOUT: Duration = Duration::from_secs(10);
/// How long processes get between SIGTERM and SIGKILL at power-off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The `hearth.*` parameters of the kernel command line.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BootParams {
    /// `hearth.vm=`: the VM's id (exported to commands, hostname).
    pub vm_id: Option<String>,
    /// `hearth.port=`: the agent's TCP port inside the guest.
    pub port: Option<u16>,
    /// `hearth.probe=1`: print [`PROBE_MARKER`] and power off.
    pub probe: bool,
    /// `hearth.net=none`: configure no network (no `eth0` expected).
    pub no_network: bool,
    /// `hearth.ip=`, `hearth.gw=`, `hearth.dns=`: overrides of the user
    /// networking defaults.
    pub address: Option<String>,
    /// `hearth.eth1=<address/prefix>`: a second interface (the host's VM
    /// network, egress); the default route (`hearth.gw`) then goes through
    /// it and `eth0` keeps only its own subnet.
    pub eth1: Option<String>,
    pub gateway: Option<String>,
    pub nameserver: Option<String>,
}

impl fmt::Debug for BootParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootParams")
            .field("vm_id", &self.vm_id)
            .field("port", &self.port)
            .field("probe", &self.probe)
            .field("no_network", &self.no_network)
            .field("address", &self.address)
            .field("eth1", &self.eth1)
            .field("gateway", &self.gateway)
            .field("nameserver", &self.nameserver)
            .finish()
    }
}

/// Parses the `hearth.*` parameters of a kernel command line; others are
/// ignored. A `hearth.secret=` is refused: a secret there would be readable
/// by every process of the guest (and the error never quotes it).
pub fn parse_cmdline(cmdline: &str) -> Result<BootParams, String> {
    let mut params = BootParams::default();
    for word in cmdline.split_whitespace() {
        let Some(rest) = word.strip_prefix("hearth.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        let value = value.trim_matches('"');
        match key {
            "vm" => params.vm_id = Some(value.to_owned()),
            "secret" => {
                return Err(format!(
                    "hearth.secret on the kernel command line is refused: every guest process \
                     can read it there; the secret comes in the firmware configuration item \
                     {FW_CFG_SECRET_NAME}"
                ));
            }
            "port" => {
                params.port = Some(
                    value
                        .parse()
                        .map_err(|_| format!("hearth.port: not a port: {value:?}"))?,
                );
            }
            "probe" => params.probe = matches!(value, "" | "1" | "yes" | "true"),
            "net" => params.no_network = value == "none",
            "ip" => params.address = Some(value.to_owned()),
            "eth1" => params.eth1 = Some(value.to_owned()),
            "gw" => params.gateway = Some(value.to_owned()),
            "dns" => params.nameserver = Some(value.to_owned()),
            _ => {}
        }
    }
    Ok(params)
}

/// The hostname of VM `id`: the last 12 hex digits of its id (as the
/// sandbox driver names sandboxes).
pub fn hostname_for(id: &str) -> String {
    let hex: String = id.chars().filter(char::is_ascii_hexdigit).collect();
    let name = &hex[hex.len().saturating_sub(12)..];
    if name.is_empty() {
        "hearth".into()
    } else {
        name.to_owned()
    }
}

/// The module paths of a [`MODULES_FILE`]: one per line, `#` comments and
/// blank lines skipped.
pub fn parse_modules_file(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

fn started() -> Instant {
    static STARTED: OnceLock<Instant> = OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

/// One line on the console.
fn log(message: impl fmt::Display) {
    let ms = started().elapsed().as_millis();
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "hearth vm-init [{ms:>5} ms]: {message}");
}

/// Runs PID 1 of a VM; returns only when it cannot power the machine off.
pub fn run() -> Result<i32, String> {
    if std::process::id() != 1 {
        return Err("vm-init must run as PID 1 (the kernel's init)".into());
    }
    started();
    let error = match boot() {
        Ok(supervisor) => supervisor.run(),
        Err(e) => format!("boot failed: {e}"),
    };
    log(&error);
    Err(power_off())
}

/// Everything up to the server's start.
fn boot() -> Result<Supervisor, String> {
    mount_basics()?;
    let cmdline =
        fs::read_to_string("/proc/cmdline").map_err(|e| format!("read /proc/cmdline: {e}"))?;
    let params = parse_cmdline(&cmdline)?;
    if params.probe {
        log(PROBE_MARKER);
        return Err(power_off());
    }
    log("filesystems mounted");
    let loaded = load_modules(Path::new(MODULES_FILE));
    log(format_args!("{loaded} modules loaded"));
    if let Ok(device) = fs::read_to_string(ROOT_FILE) {
        // Only returns on failure: the disk's own agent is PID 1 now.
        return Err(switch_root(device.trim()));
    }
    if params.no_network {
        run_tool("ip", &["link", "set", "lo", "up"])?;
    } else {
        configure_network(&params)?;
        log("network up");
    }
    let vm_id = params
        .vm_id
        .clone()
        .ok_or("hearth.vm is missing from the kernel command line")?;
    let secret = read_fw_cfg_secret(Path::new(FW_CFG_SECRET))?;
    let port = params.port.unwrap_or(DEFAULT_PORT);
    let hostname = hostname_for(&vm_id);
    if let Err(e) = sethostname(&hostname) {
        log(format_args!("warning: sethostname {hostname}: {e}"));
    }
    write_etc(&hostname, &params);
    fs::create_dir_all(RUN_DIR).map_err(|e| format!("create {RUN_DIR}: {e}"))?;
    fs::set_permissions(RUN_DIR, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {RUN_DIR}: {e}"))?;
    let secret_file = format!("{RUN_DIR}/secret");
    let _ = fs::remove_file(&secret_file);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_file)
        .and_then(|mut f| f.write_all(secret.as_bytes()))
        .map_err(|e| format!("write {secret_file}: {e}"))?;
    let agent = std::env::current_exe().map_err(|e| format!("find my own binary: {e}"))?;
    Ok(Supervisor {
        command: vec![
            agent.to_string_lossy().into_owned(),
            "serve".into(),
            "--tcp".into(),
            format!("0.0.0.0:{port}"),
            "--secret-file".into(),
            secret_file,
            "--vm-id".into(),
            vm_id,
        ],
        port,
    })
}

/// Reads the secret qemu gives in [`FW_CFG_SECRET_NAME`] (waiting for the
/// module's device to appear), then unloads `qemu_fw_cfg` so that sysfs
/// shows it no more (best effort: a kernel with the module built in keeps
/// it, root-only).
fn read_fw_cfg_secret(path: &Path) -> Result<String, String> {
    let deadline = Instant::now() + FW_CFG_TIMEOUT;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(format!(
                "no secret at {} after {FW_CFG_TIMEOUT:?} (qemu gives it as -fw_cfg \
                 name={FW_CFG_SECRET_NAME}; the image needs the qemu_fw_cfg module)",
                path.display()
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
    let bytes = fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let secret = String::from_utf8(bytes)
        .map_err(|_| format!("the secret in {} is not text", path.display()))?
        .trim()
        .to_owned();
    if secret.is_empty() {
        return Err(format!("the secret in {} is empty", path.display()));
    }
    match nix::kmod::delete_module(FW_CFG_MODULE, nix::kmod::DeleteModuleFlags::O_NONBLOCK) {
        Ok(()) => log("secret read; qemu_fw_cfg unloaded"),
        Err(e) => log(format_args!(
            "secret read; qemu_fw_cfg stays loaded (root-only): {e}"
        )),
    }
    Ok(secret)
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), String> {
    fs::create_dir_all(target).map_err(|e| format!("create {target}: {e}"))?;
    let data = (!data.is_empty()).then_some(data);
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!("mount {fstype} on {target}: {e}")),
    }
}

fn mount_basics() -> Result<(), String> {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", hardened, "")?;
    mount_fs("sysfs", "/sys", "sysfs", hardened, "")?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    )?;
    for (source, target, fstype, flags, data) in [
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "ptmxmode=0666,mode=0620",
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
    ] {
        if let Err(e) = mount_fs(source, target, fstype, flags, data) {
            log(format_args!("warning: {e}"));
        }
    }
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777",
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755",
    )?;
    for dir in ["/home", "/root", "/etc"] {
        fs::create_dir_all(dir).map_err(|e| format!("create {dir}: {e}"))?;
    }
    fs::set_permissions("/root", fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod /root: {e}"))?;
    Ok(())
}

/// Loads each module of `list` in order; returns how many were loaded (or
/// were there already). A module that fails is logged, not fatal: what
/// needs it fails next, with its own message.
fn load_modules(list: &Path) -> usize {
    let text = match fs::read_to_string(list) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            log(format_args!("warning: read {}: {e}", list.display()));
            return 0;
        }
    };
    let mut loaded = 0;
    for path in parse_modules_file(&text) {
        let result = fs::File::open(&path)
            .map_err(|e| e.to_string())
            .and_then(
                |file| match finit_module(&file, c"", ModuleInitFlags::empty()) {
                    Ok(()) | Err(Errno::EEXIST) => Ok(()),
                    Err(e) => Err(e.to_string()),
                },
            );
        match result {
            Ok(()) => loaded += 1,
            Err(e) => log(format_args!("warning: load module {path}: {e}")),
        }
    }
    loaded
}

/// Switches to the disk root named by [`ROOT_FILE`] (as busybox
/// `switch_root` does: empty the initramfs, move the disk over `/`,
/// chroot) and execs the disk's agent as PID 1, which boots again from
/// there. Returns only on failure, with the reason.
fn switch_root(device: &str) -> String {
    let result = (|| -> Result<std::convert::Infallible, String> {
        let deadline = Instant::now() + ROOT_DEVICE_TIMEOUT;
        while !Path::new(device).exists() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "no root device {device} after {ROOT_DEVICE_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
        fs::create_dir_all(NEW_ROOT).map_err(|e| format!("create {NEW_ROOT}: {e}"))?;
        mount(
            Some(device),
            NEW_ROOT,
            Some("ext4"),
            MsFlags::MS_NOATIME,
            None::<&str>,
        )
        .map_err(|e| format!("mount {device} on {NEW_ROOT}: {e}"))?;
        if !Path::new(NEW_ROOT)
            .join(DISK_AGENT.trim_start_matches('/'))
            .is_file()
        {
            return Err(format!("{device} has no {DISK_AGENT}"));
        }
        // The disk's init mounts its own; these would pin the initramfs.
        for mounted in [
            "/dev/pts", "/dev/shm", "/dev", "/proc", "/sys", "/tmp", "/run",
        ] {
            let _ = nix::mount::umount2(mounted, nix::mount::MntFlags::MNT_DETACH);
        }
        empty_initramfs();
        nix::unistd::chdir(NEW_ROOT).map_err(|e| format!("chdir {NEW_ROOT}: {e}"))?;
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|e| format!("move {NEW_ROOT} to /: {e}"))?;
        nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
        nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
        log(format_args!("switched to the root on {device}"));
        let e = std::os::unix::process::CommandExt::exec(
            Command::new(DISK_AGENT).env_clear().env("PATH", BASE_PATH),
        );
        Err(format!("exec {DISK_AGENT}: {e}"))
    })();
    match result {
        Ok(never) => match never {},
        Err(e) => format!("switch root: {e}"),
    }
}

/// Deletes the initramfs's files (they are RAM), staying on its file
/// system: the disk mounted at [`NEW_ROOT`] is left alone. Best effort.
fn empty_initramfs() {
    use std::os::unix::fs::MetadataExt;
    fn remove(dir: &Path, dev: u64) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.dev() != dev {
                continue;
            }
            if meta.is_dir() {
                remove(&path, dev);
                let _ = fs::remove_dir(&path);
            } else {
                let _ = fs::remove_file(&path);
            }
        }
    }
    if let Ok(root) = fs::symlink_metadata("/") {
        remove(Path::new("/"), root.dev());
    }
}

/// Runs a tool of the image (`ip`, …) and waits for it.
fn run_tool(program: &str, args: &[&str]) -> Result<(), String> {
    let status = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", BASE_PATH)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {}: {status}", args.join(" ")))
    }
}

/// Waits for network interface `name` to appear.
fn wait_for_interface(name: &str) -> Result<(), String> {
    let deadline = Instant::now() + NETDEV_TIMEOUT;
    while !Path::new("/sys/class/net").join(name).exists() {
        if Instant::now() >= deadline {
            return Err(format!("no {name} after {NETDEV_TIMEOUT:?}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn configure_network(params: &BootParams) -> Result<(), String> {
    // No IPv6 in the guest (the host drops it from VM ports anyway).
    let _ = fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
    let _ = fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    run_tool("ip", &["link", "set", "lo", "up"])?;
    wait_for_interface("eth0")?;
    let address = params.address.as_deref().unwrap_or(DEFAULT_ADDRESS);
    let gateway = params.gateway.as_deref().unwrap_or(DEFAULT_GATEWAY);
    run_tool("ip", &["addr", "add", address, "dev", "eth0"])?;
    run_tool("ip", &["link", "set", "eth0", "up"])?;
    let out = match &params.eth1 {
        Some(eth1) => {
            wait_for_interface("eth1")?;
            run_tool("ip", &["addr", "add", eth1, "dev", "eth1"])?;
            run_tool("ip", &["link", "set", "eth1", "up"])?;
            "eth1"
        }
        None => "eth0",
    };
    run_tool(
        "ip",
        &["route", "add", "default", "via", gateway, "dev", out],
    )?;
    Ok(())
}

/// `/etc/resolv.conf`, `/etc/hostname`, `/etc/hosts` (best effort).
fn write_etc(hostname: &str, params: &BootParams) {
    let nameserver = params.nameserver.as_deref().unwrap_or(DEFAULT_NAMESERVER);
    let files = [
        ("/etc/resolv.conf", format!("nameserver {nameserver}\n")),
        ("/etc/hostname", format!("{hostname}\n")),
        (
            "/etc/hosts",
            format!("127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost\n"),
        ),
    ];
    for (path, contents) in files {
        // resolv.conf may be a dangling symbolic link in a distribution's
        // image: replace it.
        let _ = fs::remove_file(path);
        if let Err(e) = fs::write(path, contents) {
            log(format_args!("warning: write {path}: {e}"));
        }
    }
}

/// PID 1 after boot: the server's command line and the signals it waits on.
struct Supervisor {
    command: Vec<String>,
    port: u16,
}

impl Supervisor {
    fn spawn(&self) -> Result<Pid, String> {
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .env_clear()
            .env("PATH", BASE_PATH)
            .env("HOME", "/root")
            .current_dir("/")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("start the agent's server: {e}"))?;
        Ok(Pid::from_raw(child.id() as i32))
    }

    /// Reaps and restarts the server until a power-off signal; returns why
    /// it stopped.
    fn run(self) -> String {
        let mut signals = SigSet::empty();
        for signal in [
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGPWR,
        ] {
            signals.add(signal);
        }
        if let Err(e) = signals.thread_block() {
            return format!("block signals: {e}");
        }
        let mut server = match self.spawn() {
            Ok(pid) => pid,
            Err(e) => return e,
        };
        log(format_args!(
            "agent server started on port {} (pid {server})",
            self.port
        ));
        loop {
            match signals.wait() {
                Ok(Signal::SIGCHLD) => {
                    if reap(Some(server)) {
                        log("the agent server exited; restarting it in 1 s");
                        server = loop {
                            thread::sleep(Duration::from_secs(1));
                            match self.spawn() {
                                Ok(pid) => break pid,
                                Err(e) => log(e),
                            }
                        };
                    }
                }
                Ok(signal) => {
                    log(format_args!("{signal}: powering off"));
                    stop_everything();
                    return "powering off".into();
                }
                Err(e) => log(format_args!("sigwait: {e}")),
            }
        }
    }
}

/// Reaps every exited child; true when `watched` was among them.
fn reap(watched: Option<Pid>) -> bool {
    let mut hit = false;
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return hit,
            Ok(status) => {
                if status.pid().is_some() && status.pid() == watched {
                    hit = true;
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                log(format_args!("waitpid: {e}"));
                return hit;
            }
        }
    }
}

/// SIGTERM to every process, a grace period, then SIGKILL.
fn stop_everything() {
    let everyone = Pid::from_raw(-1);
    let _ = kill(everyone, Signal::SIGTERM);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while Instant::now() < deadline {
        reap(None);
        if matches!(
            waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)),
            Err(Errno::ECHILD)
        ) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(everyone, Signal::SIGKILL);
    reap(None);
}

/// Syncs and powers off; returns only on failure, with the reason.
fn power_off() -> String {
    sync();
    match reboot(RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => format!("power off: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_parameters_are_parsed_and_a_secret_there_is_refused() {
        let params =
            parse_cmdline("console=ttyS0 quiet hearth.vm=0190-abcd hearth.port=7070 panic=-1")
                .unwrap();
        assert_eq!(params.vm_id.as_deref(), Some("0190-abcd"));
        assert_eq!(params.port, Some(7070));
        assert!(!params.probe && !params.no_network);

        let probe = parse_cmdline("hearth.probe=1 hearth.net=none hearth.ip=10.1.0.2/16").unwrap();
        assert!(probe.probe && probe.no_network);
        assert_eq!(probe.address.as_deref(), Some("10.1.0.2/16"));
        let egress = parse_cmdline("hearth.eth1=10.199.0.7/16 hearth.gw=10.199.0.1").unwrap();
        assert_eq!(egress.eth1.as_deref(), Some("10.199.0.7/16"));
        assert_eq!(egress.gateway.as_deref(), Some("10.199.0.1"));
        assert!(parse_cmdline("hearth.port=x").is_err());
        // A secret on the command line is refused, and never quoted.
        let err = parse_cmdline("hearth.vm=a hearth.secret=s3cr3t").unwrap_err();
        assert!(
            err.contains("refused") && err.contains(FW_CFG_SECRET_NAME),
            "{err}"
        );
        assert!(!err.contains("s3cr3t"), "{err}");
        assert_eq!(
            parse_cmdline("root=/dev/vda").unwrap(),
            BootParams::default()
        );
    }

    #[test]
    fn hostnames_and_module_lists() {
        assert_eq!(
            hostname_for("0190b2c4-1d2e-7f00-8a9b-0123456789ab"),
            "0123456789ab"
        );
        assert_eq!(hostname_for(""), "hearth");
        assert_eq!(
            parse_modules_file("# order\n/lib/modules/a.ko\n\n  /lib/modules/b.ko \n"),
            vec!["/lib/modules/a.ko", "/lib/modules/b.ko"]
        );
    }

    #[test]
    fn vm_init_refuses_to_run_as_anything_but_pid_1() {
        assert!(run().unwrap_err().contains("PID 1"));
    }
}
