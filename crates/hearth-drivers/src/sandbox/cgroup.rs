//! The sandboxes' cgroups: one per VM, `<hierarchy>/<root name>/<vm id>`,
//! on cgroup v2 (unified, `/sys/fs/cgroup` with `cgroup.controllers`) or v1
//! (separate `memory` and `cpu` hierarchies, found in `/proc/self/mountinfo`).
//!
//! **Invariants:**
//! - a VM's cgroup folders are recorded in `<vm-dir>/cgroups` *before* they
//!   are created, so `destroy` removes exactly them, whatever the
//!   configuration of the driver instance that destroys;
//! - the `<root name>` folders are shared by every VM and never removed here;
//! - every VM has a `pids.max` (v2 `pids` controller, or a v1 `pids`
//!   hierarchy when mounted): a fork bomb fails inside its VM;
//! - memory limits include swap (v2 `memory.swap.max` = 0, v1
//!   `memory.memsw.limit_in_bytes` when swap accounting exists), so a VM
//!   over its limit is OOM-killed rather than swapped.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// The CPU period every quota is expressed in, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Where the cgroup hierarchies of this host are, with `<root name>` created
/// (and, on v2, the memory and cpu controllers enabled for its children).
#[derive(Debug, Clone)]
pub enum Layout {
    V2 {
        parent: PathBuf,
    },
    V1 {
        memory: Option<PathBuf>,
        cpu: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
}

/// Limits of one VM; `None` = unlimited.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_quota_us: Option<u64>,
    pub pids_max: Option<u64>,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("create {}: {e}", path.display())),
    }
}

/// The mount points of the v1 hierarchies that carry `controller`.
pub(crate) fn v1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split(' ');
        let (fstype, _source, options) = (right.next()?, right.next()?, right.next()?);
        let mount_point = left.split(' ').nth(4)?;
        (fstype == "cgroup" && options.split(',').any(|o| o == controller)).then(|| {
            PathBuf::from(OsString::from_vec(super::procs::unescape_mountinfo(
                mount_point,
            )))
        })
    })
}

impl Layout {
    /// Finds the hierarchies and prepares `<root name>` in each; an error
    /// says why cgroups cannot be used on this host.
    pub fn prepare(root_name: &str) -> Result<Layout, String> {
        if root_name.is_empty() || root_name.contains('/') || root_name.starts_with('.') {
            return Err(format!("invalid cgroup root name {root_name:?}"));
        }
        let unified = Path::new("/sys/fs/cgroup");
        if unified.join("cgroup.controllers").exists() {
            let available = fs::read_to_string(unified.join("cgroup.controllers"))
                .map_err(|e| format!("read cgroup.controllers: {e}"))?;
            let wanted: Vec<&str> = ["memory", "cpu", "pids"]
                .into_iter()
                .filter(|c| available.split_whitespace().any(|a| a == *c))
                .collect();
            if wanted.is_empty() {
                return Err("neither the memory nor the cpu controller is available".into());
            }
            let enable = wanted
                .iter()
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(" ");
            let enabled =
                fs::read_to_string(unified.join("cgroup.subtree_control")).unwrap_or_default();
            if !wanted
                .iter()
                .all(|c| enabled.split_whitespace().any(|e| e == *c))
            {
                write(&unified.join("cgroup.subtree_control"), &enable)?;
            }
            let parent = unified.join(root_name);
            mkdir(&parent)?;
            write(&parent.join("cgroup.subtree_control"), &enable)?;
            return Ok(Layout::V2 { parent });
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
        let memory = v1_mount(&mountinfo, "memory").map(|m| m.join(root_name));
        let cpu = v1_mount(&mountinfo, "cpu").map(|m| m.join(root_name));
        let pids = v1_mount(&mountinfo, "pids").map(|m| m.join(root_name));
        if memory.is_none() && cpu.is_none() {
            return Err("no cgroup v2 and no v1 memory or cpu hierarchy is mounted".into());
        }
        for dir in memory.iter().chain(cpu.iter()).chain(pids.iter()) {
            mkdir(dir)?;
        }
        Ok(Layout::V1 { memory, cpu, pids })
    }

    /// The folders a VM's cgroup will have.
    pub fn vm_dirs(&self, vm: &str) -> Vec<PathBuf> {
        match self {
            Layout::V2 { parent } => vec![parent.join(vm)],
            Layout::V1 { memory, cpu, pids } => memory
                .iter()
                .chain(cpu.iter())
                .chain(pids.iter())
                .map(|p| p.join(vm))
                .collect(),
        }
    }

    /// Creates the VM's cgroup folders and sets its limits; returns the
    /// `cgroup.procs` files to join. On error, removes what it created.
    pub fn create(&self, vm: &str, limits: Limits) -> Result<Vec<PathBuf>, String> {
        let dirs = self.vm_dirs(vm);
        let result = self.create_dirs(&dirs, limits);
        if result.is_err() {
            for dir in &dirs {
                let _ = remove(dir, Duration::from_secs(1));
            }
        }
        result.map(|()| dirs.iter().map(|d| d.join("cgroup.procs")).collect())
    }

    fn create_dirs(&self, dirs: &[PathBuf], limits: Limits) -> Result<(), String> {
        for dir in dirs {
            fs::create_dir(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        match self {
            Layout::V2 { parent } => {
                let dir = parent.join(dirs[0].file_name().unwrap_or_default());
                if let Some(bytes) = limits.memory_bytes {
                    write(&dir.join("memory.max"), &bytes.to_string())?;
                    if dir.join("memory.swap.max").exists() {
                        write(&dir.join("memory.swap.max"), "0")?;
                    }
                }
                if let Some(quota) = limits.cpu_quota_us {
                    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
                if let Some(max) = limits.pids_max
                    && dir.join("pids.max").exists()
                {
                    write(&dir.join("pids.max"), &max.to_string())?;
                }
            }
            Layout::V1 { memory, cpu, pids } => {
                let vm = dirs[0].file_name().unwrap_or_default();
                if let (Some(memory), Some(bytes)) = (memory, limits.memory_bytes) {
                    let dir = memory.join(vm);
                    write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    // Only present with swap accounting; must not be lower
                    // than the limit, which it now equals.
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &bytes.to_string())?;
                    }
                }
                if let (Some(cpu), Some(quota)) = (cpu, limits.cpu_quota_us) {
                    let dir = cpu.join(vm);
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                if let (Some(pids), Some(max)) = (pids, limits.pids_max) {
                    write(&pids.join(vm).join("pids.max"), &max.to_string())?;
                }
            }
        }
        Ok(())
    }
}

/// The processes in a cgroup (empty when it does not exist).
pub fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// How many times the kernel OOM-killed a process of the VM (v2
/// `memory.events`, v1 `memory.oom_control`); 0 when unknown.
pub fn oom_kills(dir: &Path) -> u64 {
    ["memory.events", "memory.oom_control"]
        .iter()
        .filter_map(|f| fs::read_to_string(dir.join(f)).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0)
}

/// Kills everything in the cgroup at once where the kernel can (v2
/// `cgroup.kill`); the caller still kills what `procs` lists.
pub fn kill_all(dir: &Path) {
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        let _ = fs::write(kill, "1");
    }
}

/// Removes a cgroup folder, retrying while the kernel still counts exiting
/// processes in it; gone already is fine.
pub fn remove(dir: &Path, patience: Duration) -> io::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("remove the cgroup {}: {e}", dir.display()),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_hierarchies_are_found_by_controller() {
        let mountinfo = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
                         33 31 0:30 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n";
        assert_eq!(
            v1_mount(mountinfo, "memory").unwrap(),
            Path::new("/sys/fs/cgroup/memory")
        );
        assert_eq!(
            v1_mount(mountinfo, "cpu").unwrap(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert!(v1_mount(mountinfo, "pids").is_none());
    }
}
