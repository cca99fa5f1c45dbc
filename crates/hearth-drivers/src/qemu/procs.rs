//! What `/proc` says about qemu processes, as the qemu driver needs it: is
//! a pid alive (zombies are not), and is it a VM's qemu.
//!
//! **Invariant:** a process is a VM's qemu only when its arguments hold the
//! exact pair `-pidfile <vm-dir>/pid`, which only that VM's qemu is started
//! with — never by a substring of its command line, so that an operator's
//! `tail -f <vm-dir>/console.log` is never taken for it.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The process's state letter (`R`, `S`, `Z`, …), `None` when it is gone.
fn state(pid: i32) -> Option<u8> {
    let stat = fs::read(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ppid …`: comm may hold spaces and parentheses.
    let end = stat.iter().rposition(|&b| b == b')')?;
    stat.get(end + 2).copied()
}

/// Alive: exists and is neither a zombie nor dead.
pub fn alive(pid: i32) -> bool {
    pid > 0 && matches!(state(pid), Some(s) if s != b'Z' && s != b'X' && s != b'x')
}

/// The process's arguments (empty for zombies and kernel threads).
pub fn argv(pid: i32) -> Vec<Vec<u8>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Every pid in `/proc`.
pub fn all_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether `argv` is the qemu of the VM whose folder is `vm_dir`.
pub fn names_vm(argv: &[Vec<u8>], vm_dir: &Path) -> bool {
    let pidfile = vm_dir.join("pid");
    let pidfile = pidfile.as_os_str().as_bytes();
    argv.windows(2)
        .any(|w| w[0] == b"-pidfile" && w[1] == pidfile)
}

/// Whether `pid` is alive and is the VM's qemu (a recycled pid never is).
pub fn is_vm_process(pid: i32, vm_dir: &Path) -> bool {
    alive(pid) && names_vm(&argv(pid), vm_dir)
}

/// Every live process that is the VM's qemu (normally one or none).
pub fn vm_processes(vm_dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me && is_vm_process(pid, vm_dir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_processes_are_named_by_their_pidfile_pair() {
        let dir = Path::new("/s/vm");
        let args = |a: &[&str]| a.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        assert!(names_vm(
            &args(&[
                "qemu-system-x86_64",
                "-M",
                "microvm",
                "-pidfile",
                "/s/vm/pid"
            ]),
            dir
        ));
        assert!(!names_vm(&args(&["tail", "-f", "/s/vm/pid"]), dir));
        assert!(!names_vm(&args(&["qemu", "-pidfile", "/s/vm2/pid"]), dir));
        assert!(!names_vm(&args(&["qemu", "-pidfile", "/s/vm/pid2"]), dir));
        let me = std::process::id() as i32;
        assert!(alive(me) && !argv(me).is_empty());
        assert!(!alive(i32::MAX) && !alive(0) && !alive(-1));
    }
}
