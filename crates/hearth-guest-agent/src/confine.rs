//! `hearth-guest-agent confine`: the sandbox's agent server on its way in.
//!
//! Started by `init` (PID 1 of the sandbox, the host's root) before the
//! sandbox's filesystem exists, it:
//!
//! 1. enters a new user namespace and says so (one byte, `u`, on stdout);
//! 2. waits for `init` to write the namespace's uid and gid maps (root
//!    inside = the host's `--uid-base`, 65536 ids), mount the filesystem
//!    and pivot into it; `init` then writes one byte, `g`, to its stdin
//!    (end of file instead = give up);
//! 3. becomes root of that namespace with no supplementary groups, drops
//!    every capability outside [`DEFAULT_CAPS`] (bounding set included),
//!    sets `no_new_privs`, installs the seccomp filter of [`filter`], and
//!    execs the agent's server, which every command inherits all that from.
//!
//! **Invariants:**
//! - nothing of the sandbox runs with a capability of the host's user
//!   namespace: the namespaces it lives in (mount, pid, UTS, IPC, network)
//!   belong to the host's, so root inside cannot mount, unmount, set
//!   sysctls or make devices in them, whatever its capabilities say;
//! - the seccomp filter is installed last, after `no_new_privs`, and is
//!   inherited across every `fork` and `exec`: no process of the sandbox
//!   runs without it.

use caps::{CapSet, Capability, CapsHashSet};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The capabilities a sandbox's root keeps (the set container runtimes
/// grant by default), all of them meaningful only inside its own user
/// namespace.
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// The namespace flags no process of a sandbox may create a namespace
/// with (a new user namespace would give it every capability again there).
const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWCGROUP,
];

/// System calls denied (`EPERM`) to every process of a sandbox: mounts of
/// any kind, namespaces, kernel modules and kexec, BPF and perf, the
/// kernel keyring, userfaultfd, file handles (which reach files outside
/// any mount), swap, reboot, clock and accounting knobs, raw I/O ports.
/// Most would fail anyway for lack of a capability in the host's user
/// namespace; the filter takes the kernel's attack surface away too.
fn denied() -> Vec<libc::c_long> {
    let mut calls = vec![
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_lookup_dcookie,
        libc::SYS_process_vm_writev,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_uselib,
        libc::SYS__sysctl,
        libc::SYS_nfsservctl,
    ]);
    calls
}

fn filter_error(e: seccompiler::BackendError) -> String {
    format!("build the seccomp filter: {e}")
}

/// The sandbox's seccomp filters: the denied calls and `clone` with a
/// namespace flag fail with `EPERM`; `clone3`, whose flags live in memory
/// a filter cannot read, fails with `ENOSYS` so that the C library falls
/// back to `clone` (as container runtimes do).
pub fn filter() -> Result<Vec<BpfProgram>, String> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: {e}"))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied().into_iter().map(|nr| (nr, Vec::new())).collect();
    let clone_flags = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            let condition = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(filter_error)?;
            SeccompRule::new(vec![condition]).map_err(filter_error)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_flags);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(filter_error)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(filter_error)?;
    [deny, clone3]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(filter_error))
        .collect()
}

/// Runs `confine` (see the module docs); `server` is the server's command
/// line, exec'd at the end. Returns only on failure.
pub fn run(server: &[OsString]) -> Result<i32, String> {
    let Some((program, args)) = server.split_first() else {
        return Err("confine: no server command after --".into());
    };
    // Built before entering anything, so that a bad filter fails early.
    let filters = filter()?;
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| format!("unshare a user namespace: {e}"))?;
    let mut stdout = std::io::stdout();
    stdout
        .write_all(b"u")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("tell init the namespace exists: {e}"))?;
    let mut go = [0u8; 1];
    match std::io::stdin().read(&mut go) {
        Ok(1) if go[0] == b'g' => {}
        Ok(_) => return Err("init gave up before the sandbox was ready".into()),
        Err(e) => return Err(format!("wait for init: {e}")),
    }
    // The server's stdout: the console, like its stderr (stdout was the
    // pipe to init).
    nix::unistd::dup2(2, 1).map_err(|e| format!("dup2: {e}"))?;

    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    setresgid(root_gid, root_gid, root_gid).map_err(|e| format!("setresgid 0: {e}"))?;
    setresuid(root_uid, root_uid, root_uid).map_err(|e| format!("setresuid 0: {e}"))?;
    drop_capabilities()?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("set no_new_privs: {e}"))?;
    for program in &filters {
        seccompiler::apply_filter(program).map_err(|e| format!("install seccomp: {e}"))?;
    }
    let e = Command::new(program).args(args).exec();
    Err(format!("exec {}: {e}", program.to_string_lossy()))
}

/// Drops every capability outside [`DEFAULT_CAPS`] from the bounding set
/// (so no exec regains it), then sets the permitted, effective and
/// inheritable sets to what is left and clears the ambient set.
fn drop_capabilities() -> Result<(), String> {
    let keep: CapsHashSet = DEFAULT_CAPS.into_iter().collect();
    let err = |what: &str, e: caps::errors::CapsError| format!("{what}: {e}");
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::runtime::thread_all_supported().contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| err(&format!("drop {cap} from the bounding set"), e))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| err("clear the ambient set", e))?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .map_err(|e| err("clear the inheritable set", e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| err("set the effective set", e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| err("set the permitted set", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_machine() {
        let programs = filter().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(programs.iter().all(|p| !p.is_empty()));
    }
}
