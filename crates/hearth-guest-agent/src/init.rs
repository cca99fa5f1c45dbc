//! `hearth-guest-agent init`: PID 1 of a sandbox.
//!
//! Started by `unshare --fork --pid --mount --uts --ipc [--net]` (see
//! `hearth_drivers::sandbox`), so it is PID 1 of fresh pid, mount, UTS and
//! IPC namespaces. It builds the sandbox's filesystem, pivots into it, starts
//! the agent's server, and reaps every orphan until the server exits.
//!
//! The filesystem, from `<vm-dir>` on the host:
//!
//! | inside          | what                                                  |
//! |-----------------|-------------------------------------------------------|
//! | `/`             | overlay: lower `--lower` (read-only), upper `upper/` |
//! | `/home`         | bind of `home/`                                       |
//! | `/tmp`          | bind of `tmp/` (mode 1777)                            |
//! | `/run/hearth`   | bind of `run/`: the agent binary, secret, socket      |
//! | `/dev`          | recursive bind of the host's `/dev`, with a private `/dev/shm` and `/dev/pts` |
//! | `/proc`, `/sys` | a fresh proc of the sandbox's pid namespace; sysfs read-only |
//! | each `--hide`   | an empty read-only tmpfs (folders) or `/dev/null` (files) |
//!
//! **Invariants:**
//! - every mount is private: nothing done here propagates to the host, and
//!   it all disappears with the sandbox's last process;
//! - the host's root is detached after `pivot_root`; only the listed binds
//!   reach host folders;
//! - hidden paths are masked after the pivot, so symbolic links resolve
//!   inside the sandbox, never on the host;
//! - any setup failure is printed to stderr (the VM's console log) and exits
//!   non-zero before the server starts, so the host sees the VM die.

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, chdir, pivot_root, sethostname};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the host's run folder appears inside the sandbox.
pub const RUN_DIR: &str = "/run/hearth";

/// The arguments of `init`.
#[derive(Debug, Clone, Default)]
pub struct InitArgs {
    pub vm_dir: PathBuf,
    pub lower: PathBuf,
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
    setup_filesystem(args)?;
    sethostname(&args.hostname).map_err(|e| format!("sethostname {}: {e}", args.hostname))?;
    let vm_id = fs::read_to_string(Path::new(RUN_DIR).join("vm-id"))
        .map_err(|e| format!("read {RUN_DIR}/vm-id: {e}"))?;
    let server = Command::new(format!("{RUN_DIR}/hearth-guest-agent"))
        .args([
            "serve",
            "--socket",
            &format!("{RUN_DIR}/agent.sock"),
            "--secret-file",
            &format!("{RUN_DIR}/secret"),
            "--vm-id",
            vm_id.trim(),
        ])
        .env_clear()
        .env("PATH", crate::protocol::BASE_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start the agent's server: {e}"))?;
    Ok(reap_until(Pid::from_raw(server.id() as i32)))
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

/// Builds the sandbox's tree under `<vm-dir>/root` and pivots into it.
fn setup_filesystem(args: &InitArgs) -> Result<(), String> {
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("make / private: {e}"))?;

    let vm = &args.vm_dir;
    let root = vm.join("root");
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        args.lower.display(),
        vm.join("upper").display(),
        vm.join("work").display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| mount_err(&format!("overlay ({options})"), &root, e))?;

    for (source, inside) in [("home", "home"), ("tmp", "tmp"), ("run", "run/hearth")] {
        let target = root.join(inside);
        mkdir(&target)?;
        bind(&vm.join(source), &target, false)?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))
        .map_err(|e| format!("chmod /tmp: {e}"))?;

    let dev = root.join("dev");
    mkdir(&dev)?;
    bind(Path::new("/dev"), &dev, true)?;
    // Private /dev/shm and /dev/pts, so that neither the host's nor another
    // sandbox's shared memory and terminals are reachable. Best effort.
    let shm = dev.join("shm");
    if shm.is_dir() {
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if let Err(e) = mount(Some("shm"), &shm, Some("tmpfs"), flags, Some("mode=1777")) {
            eprintln!(
                "hearth-guest-agent init: warning: {}",
                mount_err("tmpfs", &shm, e)
            );
        }
    }
    let pts = dev.join("pts");
    if pts.is_dir() {
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        match mount(
            Some("devpts"),
            &pts,
            Some("devpts"),
            flags,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ) {
            Ok(()) => {
                if let Err(e) = bind(&pts.join("ptmx"), &dev.join("ptmx"), false) {
                    eprintln!("hearth-guest-agent init: warning: {e}");
                }
            }
            Err(e) => eprintln!(
                "hearth-guest-agent init: warning: {}",
                mount_err("devpts", &pts, e)
            ),
        }
    }

    let proc = root.join("proc");
    mkdir(&proc)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), &proc, Some("proc"), flags, none)
        .map_err(|e| mount_err("proc", &proc, e))?;
    let sys = root.join("sys");
    mkdir(&sys)?;
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

    for path in &args.hide {
        hide(path)?;
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
