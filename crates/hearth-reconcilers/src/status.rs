//! `hearth pool status`: counts and states of one tenant's pool, computed
//! from the same snapshot the planner reads.

use crate::plan::{Snapshot, may_boot};
use hearth_store::{AgentPhase, Millis, VmState};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolStatus {
    pub pool: String,
    /// `healthy`, `degraded` (a workspace backs off or is hard-limited),
    /// `stopped` (after `flush --nuke`), `unconfigured` (no pool config).
    pub status: String,
    pub vms: VmCounts,
    /// Agents waiting for a VM.
    pub queued: usize,
    pub configuration: Configuration,
    pub workspaces: Vec<WorkspaceStatus>,
    pub reaper: ReaperStatus,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VmCounts {
    /// Every live VM (what counts against `max_vms`).
    pub total: usize,
    /// Assigned to agents.
    pub active: usize,
    /// Warm, ready to claim.
    pub idle: usize,
    /// Booting or provisioning.
    pub booting: usize,
    /// Being destroyed.
    pub draining: usize,
    /// Idle but built from an older environment or image.
    pub stale: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Configuration {
    pub max_vms: Option<i64>,
    /// Sums over the workspaces.
    pub min_idle: usize,
    pub max_idle: usize,
    /// The environments' idle timeout, or `mixed` when they differ.
    pub idle_timeout: String,
    pub boot_timeout: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkspaceStatus {
    pub name: String,
    /// `healthy`, `backing_off`, `hard_limited` or `disabled` (warm pool off).
    pub status: String,
    pub idle: usize,
    pub booting: usize,
    pub active: usize,
    pub stale: usize,
    pub queued: usize,
    pub min_idle: usize,
    pub max_idle: usize,
    pub idle_timeout: String,
    pub consecutive_failures: i64,
    /// RFC 3339, when backing off.
    pub backoff_until: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReaperStatus {
    pub mode: String,
    pub stranded: usize,
}

/// Formats milliseconds as the shortest of `90s`, `15m`, `2h`, `1h30m`.
pub fn human_duration(ms: Millis) -> String {
    let secs = ms / 1000;
    if secs % 3600 == 0 && secs >= 3600 {
        format!("{}h", secs / 3600)
    } else if secs % 60 == 0 && secs >= 60 {
        if secs > 3600 {
            format!("{}h{}m", secs / 3600, (secs % 3600) / 60)
        } else {
            format!("{}m", secs / 60)
        }
    } else {
        format!("{secs}s")
    }
}

/// RFC 3339 of a millisecond timestamp.
pub fn rfc3339(ms: Millis) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Computes the status from a snapshot.
pub fn compute(
    snap: &Snapshot,
    now: Millis,
    boot_timeout_ms: Millis,
    reaper_mode: &str,
    stranded: usize,
) -> PoolStatus {
    let mut vms = VmCounts::default();
    let mut workspaces = Vec::new();
    for vm in &snap.vms {
        vms.total += 1;
        match vm.state {
            VmState::Assigned => vms.active += 1,
            VmState::Idle if !vm.test => vms.idle += 1,
            VmState::Booting | VmState::Provisioning => vms.booting += 1,
            VmState::Draining => vms.draining += 1,
            _ => {}
        }
    }
    let mut timeouts: Vec<Millis> = Vec::new();
    let mut degraded = false;
    for ws in &snap.workspaces {
        let mine = snap.vms.iter().filter(|v| v.workspace == ws.name);
        let mut w = WorkspaceStatus {
            name: ws.name.clone(),
            status: "healthy".into(),
            idle: 0,
            booting: 0,
            active: 0,
            stale: 0,
            queued: snap
                .queued
                .iter()
                .filter(|a| a.workspace == ws.name && a.phase == AgentPhase::Queued)
                .count(),
            min_idle: ws.min_idle,
            max_idle: ws.max_idle,
            idle_timeout: human_duration(ws.idle_timeout_ms),
            consecutive_failures: ws.state.consecutive_failures,
            backoff_until: None,
            last_error: ws.state.last_error.clone(),
        };
        for vm in mine {
            let stale = vm.env_version != ws.env_version || vm.image_version != ws.image_version;
            match vm.state {
                VmState::Idle if !vm.test => {
                    w.idle += 1;
                    if stale {
                        w.stale += 1;
                        vms.stale += 1;
                    }
                }
                VmState::Booting | VmState::Provisioning => w.booting += 1,
                VmState::Assigned => w.active += 1,
                _ => {}
            }
        }
        if ws.state.hard_limited {
            w.status = "hard_limited".into();
            degraded = true;
        } else if !may_boot(ws, now) {
            w.status = "backing_off".into();
            w.backoff_until = ws.state.backoff_until.map(rfc3339);
            degraded = true;
        } else if !ws.warm {
            w.status = "disabled".into();
        }
        timeouts.push(ws.idle_timeout_ms);
        workspaces.push(w);
    }
    timeouts.sort_unstable();
    timeouts.dedup();
    let status = if snap.max_vms.is_none() {
        "unconfigured"
    } else if snap.stopped {
        "stopped"
    } else if degraded {
        "degraded"
    } else {
        "healthy"
    };
    PoolStatus {
        pool: "default".into(),
        status: status.into(),
        queued: snap.queued.len(),
        configuration: Configuration {
            max_vms: snap.max_vms,
            min_idle: snap.workspaces.iter().map(|w| w.min_idle).sum(),
            max_idle: snap.workspaces.iter().map(|w| w.max_idle).sum(),
            idle_timeout: match timeouts.as_slice() {
                [] => "-".into(),
                [one] => human_duration(*one),
                _ if timeouts.iter().all(|t| *t == timeouts[0]) => human_duration(timeouts[0]),
                _ => "mixed".into(),
            },
            boot_timeout: human_duration(boot_timeout_ms),
        },
        vms,
        workspaces,
        reaper: ReaperStatus {
            mode: reaper_mode.into(),
            stranded,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration(900_000), "15m");
        assert_eq!(human_duration(300_000), "5m");
        assert_eq!(human_duration(7_200_000), "2h");
        assert_eq!(human_duration(5_400_000), "1h30m");
        assert_eq!(human_duration(90_000), "90s");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }
}
