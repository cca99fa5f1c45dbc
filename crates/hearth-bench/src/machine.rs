//! What the benchmark ran on: CPUs, memory, kernel, date, written next to
//! every result (figures from different machines do not compare).

use serde::Serialize;
use std::fs;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may use (`nproc`).
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    /// `uname -r`.
    pub kernel: String,
    /// RFC 3339, UTC.
    pub date: String,
    /// The 1, 5 and 15 minute load averages when the benchmark started
    /// (other work on a shared machine shows here).
    pub load_average: String,
}

impl Machine {
    pub fn probe() -> Machine {
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: field("/proc/cpuinfo", "model name").unwrap_or_default(),
            memory_mib: field("/proc/meminfo", "MemTotal")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kib| kib / 1024),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            load_average: fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
        }
    }

    /// One line for the progress output.
    pub fn describe(&self) -> String {
        format!(
            "{} CPUs ({}), {} MiB, Linux {}, {}, load average {}",
            self.nproc, self.cpu_model, self.memory_mib, self.kernel, self.date, self.load_average
        )
    }
}

/// The value of the first `key: value` line of a `/proc` file.
fn field(path: &str, key: &str) -> Option<String> {
    fs::read_to_string(path).ok()?.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}
