//! `hearth pool status`: counts and states of one tenant's pool, computed
//! from the same snapshot the planner reads.

use crate::plan::{Snapshot, may_boot};
use hearth_store::{AgentPhase, Millis, VmRecord, VmState};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolStatus {
    pub pool: String,
    /// `healthy`, `degraded` (a workspace backs off or is hard-limited),
    /// `over_cap` (more live VMs than `max_vms`, which was lowered: idle
    /// VMs are destroyed until it is within), `stopped` (after `flush
    /// --nuke`), `unconfigured` (no pool config).
    pub status: String,
    pub vms: VmCounts,
    /// Agents waiting for a VM.
    pub queued: usize,
    pub configuration: Configuration,
    pub workspaces: Vec<WorkspaceStatus>,
    pub reaper: ReaperStatus,
    /// The tenant's last reconcile pass (`null` before the first).
    #[serde(default)]
    pub pass: Option<crate::pass::PassStatus>,
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

/// What one reconcile pass of a tenant did and how long each part took
/// ([`Pool::last_pass`](crate::Pool::last_pass)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Reading the snapshot: the store's change token, then everything
    /// the planner needs unless the snapshot read before is still current.
    pub read: Duration,
    /// Whether the previous pass's snapshot was reused (nothing written
    /// since it was read).
    pub reused: bool,
    /// The reaper of stranded workflows.
    pub reap: Duration,
    /// The planner.
    pub plan: Duration,
    /// Executing the actions (store writes; driver work runs in tasks).
    pub act: Duration,
    /// Live VMs in the snapshot.
    pub vms: usize,
    /// Actions planned.
    pub actions: usize,
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
    // Each workspace's VMs and queued agents, grouped in one walk each
    // (not a walk of every VM per workspace).
    let mut vms_of: HashMap<&str, Vec<&VmRecord>> = HashMap::new();
    for vm in &snap.vms {
        vms_of.entry(vm.workspace.as_str()).or_default().push(vm);
    }
    let mut queued_in: HashMap<&str, usize> = HashMap::new();
    for agent in snap.queued.iter().filter(|a| a.phase == AgentPhase::Queued) {
        *queued_in.entry(agent.workspace.as_str()).or_default() += 1;
    }
    let mut timeouts: Vec<Millis> = Vec::new();
    let mut degraded = false;
    for ws in &snap.workspaces {
        let mine = vms_of.get(ws.name.as_str()).into_iter().flatten();
        let mut w = WorkspaceStatus {
            name: ws.name.clone(),
            status: "healthy".into(),
            idle: 0,
            booting: 0,
            active: 0,
            stale: 0,
            queued: queued_in.get(ws.name.as_str()).copied().unwrap_or(0),
            min_idle: ws.min_idle,
            max_idle: ws.max_idle,
            idle_timeout: human_duration(ws.idle_timeout_ms),
            consecutive_failures: ws.state.consecutive_failures,
            backoff_until: None,
            last_error: ws.state.last_error.clone(),
        };
        for vm in mine {
            let stale = crate::plan::is_stale(vm, ws);
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
    } else if snap.max_vms.is_some_and(|max| vms.total as i64 > max) {
        "over_cap"
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
        pass: None,
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
    fn counts_each_workspace_from_the_snapshot() {
        use crate::plan::WorkspaceView;
        use hearth_core::ids::{AgentId, IdentityId, TenantId, VmId};
        use hearth_core::rbac::IdentityKind;
        use hearth_store::{AgentRecord, OnIdle, VmRecord, WorkspaceState};
        let tenant = TenantId::new();
        let ws = |name: &str| WorkspaceView {
            name: name.into(),
            min_idle: 2,
            max_idle: 3,
            warm: true,
            env_version: 1,
            image_version: 0,
            setup_digest: "setup".into(),
            idle_timeout_ms: 900_000,
            state: WorkspaceState::default(),
        };
        let vm = |workspace: &str, state: VmState, env_version: i64| {
            let mut v = VmRecord::booting(VmId::new(), tenant, workspace, "fake", env_version, 0);
            v.setup_digest = "setup".into();
            v.state = state;
            v
        };
        let agent = |workspace: &str, phase: AgentPhase| AgentRecord {
            id: AgentId::new(),
            tenant_id: tenant,
            workspace: workspace.into(),
            owner_id: IdentityId::new(),
            owner_name: "dev".into(),
            owner_kind: IdentityKind::Developer,
            parent_id: None,
            phase,
            vm_id: None,
            on_idle: OnIdle::Sleep,
            command: None,
            build: "b".into(),
            exit_code: None,
            output: String::new(),
            error: None,
            resurrections: 0,
            created_at: 0,
            updated_at: 0,
            queued_at: 0,
            started_at: None,
            finished_at: None,
        };
        let snap = Snapshot {
            max_vms: Some(10),
            workspaces: vec![ws("a"), ws("b")],
            vms: vec![
                vm("a", VmState::Idle, 1),
                vm("b", VmState::Assigned, 1),
                vm("a", VmState::Idle, 0),
                vm("gone", VmState::Idle, 1),
                vm("a", VmState::Booting, 1),
                vm("b", VmState::Draining, 1),
            ],
            queued: vec![
                agent("b", AgentPhase::Queued),
                agent("a", AgentPhase::Queued),
                agent("b", AgentPhase::Queued),
            ],
            ..Default::default()
        };
        let status = compute(&snap, 0, 300_000, "dry_run", 0);
        let counts = |w: &WorkspaceStatus| (w.idle, w.stale, w.booting, w.active, w.queued);
        assert_eq!(counts(&status.workspaces[0]), (2, 1, 1, 0, 1));
        assert_eq!(counts(&status.workspaces[1]), (0, 0, 0, 1, 2));
        assert_eq!(
            status.vms,
            VmCounts {
                total: 6,
                active: 1,
                idle: 3,
                booting: 1,
                draining: 1,
                stale: 1
            }
        );
        assert_eq!((status.queued, status.status.as_str()), (3, "healthy"));
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }
}
