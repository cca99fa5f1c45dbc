//! The host memory of a process tree, read from `/proc`: a process and its
//! descendants (found through each process's parent pid), and the sum of
//! their `VmRSS`.
//!
//! RSS counts shared pages (the C library, the agent binary's text) once
//! per process, so the sum overstates what one more sandbox really costs;
//! it is the figure `ps` and `top` show.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

/// The resident memory of a process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeRss {
    pub processes: usize,
    pub rss_kib: u64,
}

/// The sum of `VmRSS` of `root` and every descendant alive now.
pub fn tree_rss(root: i32) -> TreeRss {
    let pids = descendants(root, &parent_pids());
    let rss_kib = pids
        .iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| vm_rss_kib(&status))
        .sum();
    TreeRss {
        processes: pids.len(),
        rss_kib,
    }
}

/// `(pid, parent pid)` of every process visible in `/proc`.
fn parent_pids() -> Vec<(i32, i32)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parent_pid(&stat)?))
        })
        .collect()
}

/// The parent pid in a `/proc/<pid>/stat` line. The command name (second
/// field, in parentheses) may hold spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parent_pid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The `VmRSS` of a `/proc/<pid>/status` file, in KiB (`None` for kernel
/// threads and zombies, which have none).
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `root` and all its descendants among `(pid, ppid)` pairs, when `root`
/// is among them; else nothing.
pub fn descendants(root: i32, parents: &[(i32, i32)]) -> BTreeSet<i32> {
    if !parents.iter().any(|&(pid, _)| pid == root) {
        return BTreeSet::new();
    }
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for &(pid, ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut found = BTreeSet::from([root]);
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if found.insert(child) {
                todo.push(child);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_survives_odd_command_names() {
        assert_eq!(parent_pid("42 (unshare) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_pid("43 (a) b (c) R 9 43 43 0"), Some(9));
        assert_eq!(parent_pid("garbage"), None);
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tinit\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\nThreads:\t1\n";
        assert_eq!(vm_rss_kib(status), Some(2048));
        assert_eq!(vm_rss_kib("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn descendants_follow_parent_links() {
        let parents = [
            (1, 0),
            (10, 1),
            (11, 10),
            (12, 11),
            (13, 11),
            (20, 1),
            (21, 20),
        ];
        assert_eq!(descendants(10, &parents), BTreeSet::from([10, 11, 12, 13]));
        assert_eq!(descendants(21, &parents), BTreeSet::from([21]));
        assert_eq!(descendants(99, &parents), BTreeSet::new());
    }
}
