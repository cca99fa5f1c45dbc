//! The host's bounds on one qemu VM, so that a hostile guest exhausts its
//! own VM and never the host:
//!
//! - a cgroup of its own, `<hierarchy>/<cgroup root>/<vm id>` (the sandbox
//!   driver's [`cgroup::Layout`], plus the `pids` controller): memory = the
//!   guest's RAM + [`MEMORY_OVERHEAD_MIB`] (swap included, so qemu over it
//!   is OOM-killed, not swapped), CPU = its vCPUs + half a CPU for qemu's
//!   device emulation, pids = [`PIDS_BASE`] + its vCPUs (qemu's threads; the
//!   guest's own processes are not host processes);
//! - a file-size limit (`RLIMIT_FSIZE`) on everything qemu writes: its
//!   overlay (which cannot outgrow its virtual size anyway),
//!   `console.log` (a guest writing to its serial port for ever) and
//!   `qemu.log`: [`file_limit`], at least the driver's log limit
//!   ([`LOG_FILE_LIMIT_BYTES`] by default).
//!
//! qemu starts inside them without `unsafe` and without a window: it is
//! exec'd by `/bin/sh -c` [`PREAMBLE`], which ignores `SIGXFSZ` (a write
//! past the limit then fails with `EFBIG`: the serial device drops the
//! bytes, the guest's disk sees an I/O error, qemu lives on), sets the
//! limit, writes its own pid to the cgroups' `cgroup.procs` and then
//! becomes qemu (same pid), so that qemu allocates nothing outside them.
//!
//! **Invariants:**
//! - the cgroup folders are recorded in `<vm-dir>/cgroups` before they are
//!   created, so that `destroy` removes exactly them;
//! - every limit is a pure function of the VM's spec ([`Limits::for_vm`]).

use crate::sandbox::cgroup;
use std::path::{Path, PathBuf};

/// What qemu itself may use beyond the guest's RAM: its code, device
/// state, I/O buffers and, under TCG, the translation cache (capped at
/// [`TCG_TB_SIZE_MIB`]). An idle 256 MiB TCG guest's qemu has ~230 MiB
/// resident, the guest's touched pages included.
pub const MEMORY_OVERHEAD_MIB: u64 = 256;
/// The TCG translation cache (`-accel tcg,tb-size=`): qemu's default is
/// 1 GiB, which would make the overhead unbounded in practice.
pub const TCG_TB_SIZE_MIB: u64 = 128;
/// qemu's threads beyond one per vCPU: the main loop, RCU, its I/O worker
/// pool (at most 64) and a margin.
pub const PIDS_BASE: u64 = 96;
/// The largest file qemu may write when the VM has no disk (`console.log`,
/// `qemu.log`), by default.
pub const LOG_FILE_LIMIT_BYTES: u64 = 64 << 20;
/// The cgroup folder under each hierarchy.
pub const DEFAULT_CGROUP_ROOT: &str = "hearth-qemu";

/// The shell that puts qemu in its bounds: `sh -c PREAMBLE hearth-qemu
/// <512-byte blocks> <cgroup.procs>… -- <qemu> <args>…`. `ulimit -f` counts
/// 512-byte blocks (POSIX).
pub const PREAMBLE: &str = "trap '' XFSZ\n\
ulimit -f \"$1\" || exit 125\n\
shift\n\
while [ \"$1\" != -- ]; do echo $$ > \"$1\" || exit 125; shift; done\n\
shift\n\
exec \"$@\"\n";

/// The bounds of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
    pub pids: u64,
    pub file_bytes: u64,
}

impl Limits {
    /// The bounds of a VM of `memory_mib` RAM and `cpus` vCPUs whose
    /// overlay has `disk_bytes` of virtual size (`None`: no disk), on a
    /// driver whose log files may reach `log_bytes`.
    pub fn for_vm(memory_mib: u64, cpus: u32, disk_bytes: Option<u64>, log_bytes: u64) -> Limits {
        Limits {
            memory_bytes: (memory_mib + MEMORY_OVERHEAD_MIB) << 20,
            cpu_quota_us: u64::from(cpus.max(1)) * cgroup::CPU_PERIOD_US
                + cgroup::CPU_PERIOD_US / 2,
            pids: PIDS_BASE + u64::from(cpus.max(1)),
            file_bytes: file_limit(disk_bytes, log_bytes),
        }
    }
}

/// The largest file qemu may write: the overlay's bound when there is a
/// disk (its virtual size, plus qcow2's tables: at most 1/64 of it, plus
/// 16 MiB), and at least `log_bytes`.
pub fn file_limit(disk_bytes: Option<u64>, log_bytes: u64) -> u64 {
    disk_bytes
        .map_or(0, |size| size + size / 64 + (16 << 20))
        .max(log_bytes)
}

/// `ulimit -f`'s argument for `bytes` (512-byte blocks, rounded up).
pub fn ulimit_blocks(bytes: u64) -> u64 {
    bytes.div_ceil(512)
}

/// The host's cgroups for qemu VMs, prepared once per driver: the sandbox
/// driver's layout (memory, cpu and pids, v1 or v2).
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: cgroup::Layout,
}

impl Cgroups {
    /// Finds the hierarchies and prepares `<root name>` in each; an error
    /// says why cgroups cannot be used on this host.
    pub fn prepare(root_name: &str) -> Result<Cgroups, String> {
        Ok(Cgroups {
            layout: cgroup::Layout::prepare(root_name)?,
        })
    }

    /// The folders a VM's cgroups will have.
    pub fn vm_dirs(&self, vm: &str) -> Vec<PathBuf> {
        self.layout.vm_dirs(vm)
    }

    /// Creates the VM's cgroups with `limits`; returns the `cgroup.procs`
    /// files qemu joins. On error, removes what it created.
    pub fn create(&self, vm: &str, limits: Limits) -> Result<Vec<PathBuf>, String> {
        self.layout
            .create(
                vm,
                cgroup::Limits {
                    memory_bytes: Some(limits.memory_bytes),
                    cpu_quota_us: Some(limits.cpu_quota_us),
                    pids_max: Some(limits.pids),
                },
            )
            .inspect_err(|_| self.remove_quickly(vm))
    }

    fn remove_quickly(&self, vm: &str) {
        for dir in self.vm_dirs(vm) {
            let _ = cgroup::remove(&dir, std::time::Duration::from_secs(1));
        }
    }
}

/// The processes in a cgroup folder (empty when it does not exist).
pub fn procs(dir: &Path) -> Vec<i32> {
    cgroup::procs(dir)
}

/// Kills everything in a cgroup at once where the kernel can.
pub fn kill_all(dir: &Path) {
    cgroup::kill_all(dir)
}

/// Removes a cgroup folder (gone already is fine).
pub fn remove(dir: &Path, patience: std::time::Duration) -> std::io::Result<()> {
    cgroup::remove(dir, patience)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_spec() {
        let limits = Limits::for_vm(256, 2, None, LOG_FILE_LIMIT_BYTES);
        assert_eq!(limits.memory_bytes, (256 + MEMORY_OVERHEAD_MIB) << 20);
        assert_eq!(limits.cpu_quota_us, 250_000);
        assert_eq!(limits.pids, PIDS_BASE + 2);
        assert_eq!(limits.file_bytes, LOG_FILE_LIMIT_BYTES);
        let disk = 4u64 << 30;
        let bound = Limits::for_vm(256, 0, Some(disk), LOG_FILE_LIMIT_BYTES).file_bytes;
        assert!(bound > disk && bound < disk + disk / 32, "{bound}");
        assert_eq!(
            Limits::for_vm(256, 0, Some(1 << 20), LOG_FILE_LIMIT_BYTES).file_bytes,
            LOG_FILE_LIMIT_BYTES
        );
        assert_eq!(Limits::for_vm(256, 1, None, 1 << 20).file_bytes, 1 << 20);
        assert_eq!(ulimit_blocks(1), 1);
        assert_eq!(ulimit_blocks(1024), 2);
    }

    #[test]
    fn the_preamble_sets_the_limit_joins_the_files_and_becomes_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(PREAMBLE)
            .arg("hearth-qemu")
            .arg("8")
            .arg(&a)
            .arg(&b)
            .arg("--")
            .args([
                "/bin/sh",
                "-c",
                "echo $$; ulimit -f; head -c 8192 /dev/zero > big; echo $?",
            ])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        let pid = lines[0];
        // The same process joined both files, then exec'd the command.
        assert_eq!(std::fs::read_to_string(&a).unwrap().trim(), pid);
        assert_eq!(std::fs::read_to_string(&b).unwrap().trim(), pid);
        assert_eq!(lines[1], "8");
        // Past the limit, the write fails (EFBIG) instead of killing.
        assert_ne!(lines[2], "0");
        assert_eq!(
            std::fs::metadata(dir.path().join("big")).unwrap().len(),
            4096
        );
    }
}
