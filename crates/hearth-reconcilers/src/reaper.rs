//! The reaper of stranded workflows: agents pinned to a control-plane build
//! that has been retired.
//!
//! `reap_stranded_workflows`: `dry_run` (default) reports them, `enabled`
//! terminates those stranded for longer than the grace period (48 hours by
//! default), `disabled` (and any unrecognized value) skips detection.

use hearth_core::ids::AgentId;
use hearth_core::resource::ReapMode;
use hearth_store::{AgentRecord, Build, Millis};
use std::collections::HashMap;

/// What the reaper finds in one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finding {
    /// Active agents on a retired build.
    pub stranded: Vec<AgentId>,
    /// Those of them to terminate now.
    pub reap: Vec<AgentId>,
}

/// Pure: which active agents are stranded, and which to reap now.
pub fn find(
    mode: ReapMode,
    agents: &[AgentRecord],
    builds: &[Build],
    now: Millis,
    grace_ms: Millis,
) -> Finding {
    if mode == ReapMode::Disabled {
        return Finding::default();
    }
    let retired: HashMap<&str, Millis> = builds
        .iter()
        .filter_map(|b| b.retired_at.map(|at| (b.id.as_str(), at)))
        .collect();
    if retired.is_empty() {
        // Nothing is retired (the usual case): no agent to look at.
        return Finding::default();
    }
    let mut finding = Finding::default();
    for agent in agents.iter().filter(|a| !a.phase.is_terminal()) {
        if let Some(&at) = retired.get(agent.build.as_str()) {
            finding.stranded.push(agent.id);
            if mode == ReapMode::Enabled && now - at >= grace_ms {
                finding.reap.push(agent.id);
            }
        }
    }
    finding
}

/// Pure: the earliest moment after `now` at which [`find`] reaps an agent
/// it does not reap at `now` (`enabled` only; `None` when nothing is due).
pub fn next_deadline(
    mode: ReapMode,
    agents: &[AgentRecord],
    builds: &[Build],
    now: Millis,
    grace_ms: Millis,
) -> Option<Millis> {
    if mode != ReapMode::Enabled {
        return None;
    }
    let retired: HashMap<&str, Millis> = builds
        .iter()
        .filter_map(|b| b.retired_at.map(|at| (b.id.as_str(), at)))
        .collect();
    if retired.is_empty() {
        return None;
    }
    agents
        .iter()
        .filter(|a| !a.phase.is_terminal())
        .filter_map(|a| retired.get(a.build.as_str()))
        .map(|&at| at.saturating_add(grace_ms))
        .filter(|&at| at > now)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_core::ids::{AgentId, IdentityId, TenantId};
    use hearth_core::rbac::IdentityKind;
    use hearth_store::{AgentPhase, OnIdle};

    fn agent(build: &str, phase: AgentPhase) -> AgentRecord {
        AgentRecord {
            id: AgentId::new(),
            tenant_id: TenantId::new(),
            workspace: "web".into(),
            owner_id: IdentityId::new(),
            owner_name: "dev".into(),
            owner_kind: IdentityKind::Developer,
            parent_id: None,
            phase,
            vm_id: None,
            on_idle: OnIdle::Sleep,
            command: None,
            build: build.into(),
            exit_code: None,
            output: String::new(),
            error: None,
            resurrections: 0,
            created_at: 0,
            updated_at: 0,
            queued_at: 0,
            started_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn the_next_deadline_is_when_find_first_reaps() {
        let builds = [
            Build {
                id: "old".into(),
                first_seen: 0,
                retired_at: Some(1_000),
            },
            Build {
                id: "older".into(),
                first_seen: 0,
                retired_at: Some(500),
            },
            Build {
                id: "new".into(),
                first_seen: 0,
                retired_at: None,
            },
        ];
        let agents = [
            agent("old", AgentPhase::Running),
            agent("new", AgentPhase::Running),
            agent("older", AgentPhase::Completed),
        ];
        let grace = 2_000;
        let at = next_deadline(ReapMode::Enabled, &agents, &builds, 1_500, grace);
        assert_eq!(at, Some(3_000));
        assert!(
            find(ReapMode::Enabled, &agents, &builds, 2_999, grace)
                .reap
                .is_empty()
        );
        assert_eq!(
            find(ReapMode::Enabled, &agents, &builds, 3_000, grace).reap,
            vec![agents[0].id]
        );
        // Past it, or in a mode that never reaps: nothing is due.
        assert_eq!(
            next_deadline(ReapMode::Enabled, &agents, &builds, 3_000, grace),
            None
        );
        assert_eq!(
            next_deadline(ReapMode::DryRun, &agents, &builds, 0, grace),
            None
        );
    }
}
