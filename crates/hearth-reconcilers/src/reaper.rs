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
