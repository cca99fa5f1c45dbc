//! What `/proc` says about the host's processes and mounts, as the sandbox
//! driver needs it: is a pid alive (zombies are not), which processes belong
//! to a VM, which mounts lie under a folder.
//!
//! **Invariant:** a process is attributed to a VM only by evidence that
//! cannot name another process: its exact argument pair (`--vm-dir <dir>`,
//! or `serve … --vm-id <id>`), its cgroup, or its pid namespace — never by
//! a substring of its command line, so that an operator's `tail -f
//! <vm-dir>/console.log` is never killed.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The process's state letter (`R`, `S`, `Z`, …), `None` when it is gone.
fn state(pid: i32) -> Option<u8> {
    let stat = fs::read(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ppid …`: comm may hold spaces and parentheses.
    let end = stat.iter().rposition(|&b| b == b')')?;
    stat.get(end + 2).copied()
}

/// The parent pid, `None` when the process is gone.
fn parent(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// Alive: exists and is neither a zombie nor dead.
pub fn alive(pid: i32) -> bool {
    matches!(state(pid), Some(s) if s != b'Z' && s != b'X' && s != b'x')
}

/// The process's arguments (empty for zombies and kernel threads).
pub fn argv(pid: i32) -> Vec<Vec<u8>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// The identity of the process's pid namespace (`pid:[4026531836]`).
pub fn pid_namespace(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
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

/// The live children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| parent(p) == Some(pid))
        .collect()
}

fn has_pair(argv: &[Vec<u8>], flag: &str, value: &[u8]) -> bool {
    argv.windows(2)
        .any(|w| w[0] == flag.as_bytes() && w[1] == value)
}

/// Whether `argv` is one of the VM's own processes: its launcher (after
/// exec, `unshare … init --vm-dir <dir>`), its init, or its agent server.
pub fn names_vm(argv: &[Vec<u8>], vm_dir: &Path, vm_id: &str) -> bool {
    has_pair(argv, "--vm-dir", vm_dir.as_os_str().as_bytes())
        || (argv.iter().any(|a| a == b"serve") && has_pair(argv, "--vm-id", vm_id.as_bytes()))
}

/// Whether `pid` is alive and is this VM's launcher, init or server (a
/// recycled pid never is).
pub fn is_vm_process(pid: i32, vm_dir: &Path, vm_id: &str) -> bool {
    alive(pid) && names_vm(&argv(pid), vm_dir, vm_id)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
pub fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The mount points at or under `dir` in this process's mount namespace,
/// deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(field))))
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_named() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(!argv(me).is_empty());
        assert!(pid_namespace(me).is_some());
        assert!(!alive(i32::MAX));
    }

    #[test]
    fn vm_processes_are_named_by_exact_argument_pairs() {
        let dir = Path::new("/s/vm");
        let args = |a: &[&str]| a.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        assert!(names_vm(
            &args(&["unshare", "--", "/s/vm/run/a", "init", "--vm-dir", "/s/vm"]),
            dir,
            "id"
        ));
        assert!(names_vm(
            &args(&["/run/hearth/a", "serve", "--vm-id", "id"]),
            dir,
            "id"
        ));
        assert!(!names_vm(
            &args(&["tail", "-f", "/s/vm/console.log"]),
            dir,
            "id"
        ));
        assert!(!names_vm(&args(&["grep", "--vm-id", "id"]), dir, "id"));
        assert!(!names_vm(&args(&["init", "--vm-dir", "/s/vm2"]), dir, "id"));
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo("/plain\\04"), b"/plain\\04");
    }
}
