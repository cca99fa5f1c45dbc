//! `hearth-guest-agent init`: PID 1 of a sandbox.
//!
//! Started (as the host's root) by `unshare --fork --pid --mount --uts
//! --ipc [--net]` (see `hearth_drivers::sandbox`), so it is PID 1 of fresh
//! pid, mount, UTS and IPC namespaces, all owned by the host's user
//! namespace. It starts the agent's server through `confine` (see
//! [`crate::confine`]: a user namespace of its own whose root is the
//! host's unprivileged `--uid-base`, a reduced capability set,
//! `no_new_privs`, a seccomp filter), builds the sandbox's filesystem,
//! pivots into it, lets the server go, and reaps every orphan until the
//! server exits. Init itself never runs a command of the sandbox.
//!
//! The filesystem, from `<vm-dir>` on the host:
//!
//! | inside          | what                                                  |
//! |-----------------|-------------------------------------------------------|
//! | `/`             | overlay: lowers `disk/sealed/` (once sealed) and the image (`--lower`, idmapped read-only at `lower/`), upper `disk/upper/` |
//! | `/run/hearth`   | bind of `run/` (secret, vm-id, socket), with the agent binary bound read-only from `agent/` |
//! | `/dev`          | a small tmpfs: `null`, `zero`, `full`, `random`, `urandom`, `tty` bound from the host, a private `pts` and `shm` |
//! | `/proc`         | a fresh proc of the sandbox's pid namespace, with [`MASKED`] paths covered and [`READ_ONLY`] ones read-only |
//! | `/sys`          | sysfs, read-only, with [`MASKED`] paths covered |
//! | each `--hide`   | an empty read-only tmpfs (folders) or `/dev/null` (files) |
//!
//! `/home` and `/tmp` are plain folders of the overlay: everything a
//! sandbox writes is in `disk/upper/` (on the VM's size-limited tmpfs), so
//! that sealing and resetting a sandbox is a matter of layers.
//!
//! **Invariants:**
//! - every mount is private: nothing done here propagates to the host, and
//!   it all disappears with the sandbox's last process;
//! - the host's root is detached after `pivot_root`; only the listed binds
//!   reach host folders, and the image is only ever read through its
//!   read-only idmapped copy;
//! - hidden and masked paths are covered after the pivot, so symbolic
//!   links resolve inside the sandbox, never on the host;
//! - the server is released (and so runs any command) only once the whole
//!   filesystem is in place; any setup failure is printed to stderr (the
//!   VM's console log) and exits non-zero, so the host sees the VM die.

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid, chdir, chown, pivot_root, sethostname};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where the host's run folder appears inside the sandbox.
pub const RUN_DIR: &str = "/run/hearth";

/// How many ids a sandbox's user namespace maps (0..65536 inside).
pub const ID_RANGE: u32 = 65536;

/// Paths covered inside every sandbox (OCI's default `maskedPaths`):
/// kernel memory, keyrings, timers and firmware tables.
pub const MASKED: [&str; 9] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/acpi",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths made read-only inside every sandbox (OCI's `readonlyPaths`).
pub const READ_ONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The host's device nodes a sandbox gets (bound, never created).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The arguments of `init`.
#[derive(Debug, Clone, Default)]
pub struct InitArgs {
    pub vm_dir: PathBuf,
    /// The image folder: the overlay's bottom layer.
    pub lower: PathBuf,
    /// The host uid (and gid) the sandbox's root is.
    pub uid_base: u32,
    pub hide: Vec<PathBuf>,
    pub hostname: String,
    /// Informational (the host applies limits through cgroups): logged.
    pub memory_bytes: Option<u64>,
    /// Informational (the host applies limits through cgroups): logged.
    pub cpu_quota_us: Option<u64>,
}

/// Sets the sandbox up, runs the server and reaps; returns the exit code.
pub fn run(args: &InitArgs) -> Result<i32, String> {
    if std::process::id() != 1 {
        return Err("init must run as PID 1 of a new pid namespace".into());
    }
    if args.memory_bytes.is_some() || args.cpu_quota_us.is_some() {
        eprintln!(
            "hearth-guest-agent init: limits: memory {:?} bytes, cpu quota {:?} us per 100 ms",
            args.memory_bytes, args.cpu_quota_us
        );
    }
    let vm_id = fs::read_to_string(args.vm_dir.join("run/vm-id"))
        .map_err(|e| format!("read run/vm-id: {e}"))?;
    // Private mounts, and a /proc of this pid namespace (the inherited one
    // is the host's, where the server's pid names another process).
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("make / private: {e}"))?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(|e| format!("mount this namespace's /proc: {e}"))?;
    let mut server = start_confined(vm_id.trim())?;
    let userns = map_ids(&mut server, args.uid_base)?;
    setup_filesystem(args, &userns)?;
    drop(userns);
    sethostname(&args.hostname).map_err(|e| format!("sethostname {}: {e}", args.hostname))?;
    let mut go = server.stdin.take().ok_or("the server has no stdin")?;
    go.write_all(b"g")
        .map_err(|e| format!("release the server: {e}"))?;
    drop(go);
    Ok(reap_until(Pid::from_raw(server.id() as i32)))
}

/// Starts `confine` (the future server), which enters its user namespace
/// and waits for the go.
fn start_confined(vm_id: &str) -> Result<Child, String> {
    let me = std::env::current_exe().map_err(|e| format!("find the agent binary: {e}"))?;
    Command::new(me)
        .arg("confine")
        .arg("--")
        .arg(format!("{RUN_DIR}/hearth-guest-agent"))
        .args([
            "serve",
            "--socket",
            &format!("{RUN_DIR}/agent.sock"),
            "--secret-file",
            &format!("{RUN_DIR}/secret"),
            "--vm-id",
            vm_id,
        ])
        .env_clear()
        .env("PATH", crate::protocol::BASE_PATH)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start the agent's server: {e}"))
}

/// Waits for the server's user namespace, writes its id maps, and returns
/// the namespace (for idmapped mounts).
fn map_ids(server: &mut Child, uid_base: u32) -> Result<OwnedFd, String> {
    let mut ready = [0u8; 1];
    let stdout = server.stdout.as_mut().ok_or("the server has no stdout")?;
    match stdout.read(&mut ready) {
        Ok(1) if ready[0] == b'u' => {}
        Ok(_) => {
            let status = server.wait().map_err(|e| format!("wait: {e}"))?;
            return Err(format!(
                "the server exited before entering its user namespace ({status})"
            ));
        }
        Err(e) => return Err(format!("wait for the server's user namespace: {e}")),
    }
    uid_base
        .checked_add(ID_RANGE)
        .ok_or_else(|| format!("--uid-base {uid_base} leaves no room for {ID_RANGE} ids"))?;
    let pid = server.id();
    let map = format!("0 {uid_base} {ID_RANGE}\n");
    for file in ["uid_map", "gid_map"] {
        fs::write(format!("/proc/{pid}/{file}"), &map)
            .map_err(|e| format!("write {file} ({}): {e}", map.trim()))?;
    }
    fs::File::open(format!("/proc/{pid}/ns/user"))
        .map(OwnedFd::from)
        .map_err(|e| format!("open the server's user namespace: {e}"))
}

/// Reaps every child (PID 1 inherits all orphans) until `server` exits;
/// returns its exit code.
fn reap_until(server: Pid) -> i32 {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == server => {
                eprintln!("hearth-guest-agent init: the server exited with code {code}");
                return code;
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == server => {
                eprintln!("hearth-guest-agent init: the server was killed by {signal}");
                return 128 + signal as i32;
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("hearth-guest-agent init: waitpid: {e}");
                return 1;
            }
        }
    }
}

fn mount_err(what: &str, target: &Path, e: Errno) -> String {
    format!("mount {what} on {}: {e}", target.display())
}

fn bind(source: &Path, target: &Path, recursive: bool) -> Result<(), String> {
    let flags = if recursive {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    mount(Some(source), target, None::<&str>, flags, None::<&str>)
        .map_err(|e| mount_err(&format!("bind {}", source.display()), target, e))
}

fn mkdir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("create {}: {e}", path.display()))
}

/// Creates `path` in the sandbox's tree when missing, owned by the
/// sandbox's root (anything init creates would else belong to the host's
/// root, which the sandbox cannot use).
fn ensure_dir(path: &Path, mode: u32, owner: (Uid, Gid)) -> Result<(), String> {
    if path.is_dir() {
        return Ok(());
    }
    mkdir(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    chown(path, Some(owner.0), Some(owner.1)).map_err(|e| format!("chown {}: {e}", path.display()))
}

/// Builds the sandbox's tree under `<vm-dir>/root` and pivots into it.
fn setup_filesystem(args: &InitArgs, userns: &OwnedFd) -> Result<(), String> {
    let none = None::<&str>;
    let owner = (Uid::from_raw(args.uid_base), Gid::from_raw(args.uid_base));

    let vm = &args.vm_dir;
    let image = vm.join("lower");
    crate::idmap::mount_idmapped(&args.lower, &image, userns)
        .map_err(|e| format!("idmapped image {}: {e}", args.lower.display()))?;
    let disk = vm.join("disk");
    let sealed = disk.join("sealed");
    let lowers = if sealed.is_dir() {
        format!("{}:{}", sealed.display(), image.display())
    } else {
        image.display().to_string()
    };
    let root = vm.join("root");
    let options = format!(
        "lowerdir={lowers},upperdir={},workdir={}",
        disk.join("upper").display(),
        disk.join("work").display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| mount_err(&format!("overlay ({options})"), &root, e))?;

    ensure_dir(&root.join("home"), 0o755, owner)?;
    ensure_dir(&root.join("tmp"), 0o1777, owner)?;
    ensure_dir(&root.join("run"), 0o755, owner)?;
    let run = root.join("run/hearth");
    ensure_dir(&run, 0o755, owner)?;
    bind(&vm.join("run"), &run, false)?;
    let agent = run.join("hearth-guest-agent");
    bind(&vm.join("agent/hearth-guest-agent"), &agent, false)?;
    read_only(&agent)?;

    setup_dev(&root, args.uid_base, owner)?;

    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc = root.join("proc");
    ensure_dir(&proc, 0o555, owner)?;
    mount(Some("proc"), &proc, Some("proc"), flags, none)
        .map_err(|e| mount_err("proc", &proc, e))?;
    let sys = root.join("sys");
    ensure_dir(&sys, 0o555, owner)?;
    mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        flags | MsFlags::MS_RDONLY,
        none,
    )
    .map_err(|e| mount_err("sysfs", &sys, e))?;

    // Pivot with the new root as the put-old folder too, then detach the
    // old root stacked on it (as runc does): no folder is needed for it.
    chdir(&root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    pivot_root(".", ".").map_err(|e| format!("pivot_root {}: {e}", root.display()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detach the old root: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;

    for path in MASKED {
        hide(Path::new(path))?;
    }
    for path in READ_ONLY {
        let path = Path::new(path);
        if path.exists() {
            bind(path, path, true)?;
            read_only(path)?;
        }
    }
    for path in &args.hide {
        hide(path)?;
    }
    Ok(())
}

/// Remounts a bind mount read-only (and nosuid, nodev).
fn read_only(path: &Path) -> Result<(), String> {
    let none = None::<&str>;
    let flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    mount(none, path, none, flags, none).map_err(|e| mount_err("read-only remount", path, e))
}

/// A minimal `/dev`: a tmpfs of the sandbox's root with the harmless
/// character devices bound from the host (a bind needs no `mknod`, and no
/// disk, memory or console device is ever there), a private `pts` and
/// `shm`, and the usual links.
fn setup_dev(root: &Path, uid_base: u32, owner: (Uid, Gid)) -> Result<(), String> {
    let dev = root.join("dev");
    ensure_dir(&dev, 0o755, owner)?;
    let options = format!("mode=0755,size=64k,uid={uid_base},gid={uid_base}");
    mount(
        Some("hearth-dev"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .map_err(|e| mount_err("tmpfs", &dev, e))?;
    for name in DEVICES {
        let target = dev.join(name);
        fs::write(&target, b"").map_err(|e| format!("create {}: {e}", target.display()))?;
        bind(&Path::new("/dev").join(name), &target, false)?;
    }
    let pts = dev.join("pts");
    mkdir(&pts)?;
    // The tty group inside (gid 5) is the host's base + 5.
    let options = format!(
        "newinstance,ptmxmode=0666,mode=0620,gid={}",
        uid_base.saturating_add(5)
    );
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .map_err(|e| mount_err("devpts", &pts, e))?;
    let shm = dev.join("shm");
    mkdir(&shm)?;
    let options = format!("mode=1777,uid={uid_base},gid={uid_base}");
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| mount_err("tmpfs", &shm, e))?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link))
            .map_err(|e| format!("link /dev/{link}: {e}"))?;
    }
    Ok(())
}

/// Masks `path` when it exists: an empty read-only tmpfs over a folder,
/// `/dev/null` (read-only) over anything else.
fn hide(path: &Path) -> Result<(), String> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(());
    };
    let none = None::<&str>;
    if meta.is_dir() {
        let flags =
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(
            Some("hearth-hidden"),
            path,
            Some("tmpfs"),
            flags,
            Some("size=4k,mode=0755"),
        )
        .map_err(|e| mount_err("tmpfs (hide)", path, e))
    } else {
        bind(Path::new("/dev/null"), path, false)?;
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(none, path, none, flags, none)
            .map_err(|e| mount_err("read-only remount (hide)", path, e))
    }
}
