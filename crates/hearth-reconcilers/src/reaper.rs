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
    /// The earliest moment after `now` at which one more of them is due
    /// (`enabled` only; `None` when nothing is): the runner passes again
    /// then.
    pub next_reap_at: Option<Millis>,
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
            if mode != ReapMode::Enabled {
                continue;
            }
            let due = at.saturating_add(grace_ms);
            if due <= now {
                finding.reap.push(agent.id);
            } else if finding.next_reap_at.is_none_or(|next| due < next) {
                finding.next_reap_at = Some(due);
            }
        }
    }
    finding
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
    fn next_reap_at_is_when_find_first_reaps() {
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
        let at = find(ReapMode::Enabled, &agents, &builds, 1_500, grace).next_reap_at;
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
            find(ReapMode::Enabled, &agents, &builds, 3_000, grace).next_reap_at,
            None
        );
        assert_eq!(
            find(ReapMode::DryRun, &agents, &builds, 0, grace).next_reap_at,
            None
        );
    }
}
