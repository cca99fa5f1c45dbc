//! The events the store's own writes emit (the transactional outbox): pure
//! functions from what a write changed to the [`NewEvent`]s it appends in
//! the same transaction (`append_events_on` in `shared.rs`).
//!
//! **Invariants:**
//! - No I/O: each builder only shapes data the write already holds.
//! - An event's `data` holds names, ids, phases, counts and error messages;
//!   never a secret (env values, specs) nor an agent's or a step's output.

use crate::{AgentPhase, EventKind, InstanceStatus, NewEvent, VmState, WorkspaceState};
use hearth_core::ids::{AgentId, InstanceId, VmId};
use hearth_core::resource::Kind;
use serde_json::{Map, Value, json};

/// `vm.booting`: a VM was recorded, on its way up.
pub(crate) fn vm_booting(
    id: VmId,
    workspace: &str,
    reserved_for: Option<AgentId>,
    test: bool,
) -> NewEvent {
    let mut data = json!({ "workspace": workspace, "test": test });
    if let Some(agent) = reserved_for {
        data["reserved_for"] = json!(agent.to_string());
    }
    NewEvent::new(EventKind::VmBooting, format!("vm/{id}"), data)
}

/// `vm.ready`: a VM finished booting and is warm (or handed on at once).
pub(crate) fn vm_ready(id: VmId, workspace: &str) -> NewEvent {
    NewEvent::new(
        EventKind::VmReady,
        format!("vm/{id}"),
        json!({ "workspace": workspace }),
    )
}

/// `vm.assigned`: a VM was handed to an agent.
pub(crate) fn vm_assigned(id: VmId, workspace: &str, agent: AgentId) -> NewEvent {
    NewEvent::new(
        EventKind::VmAssigned,
        format!("vm/{id}"),
        json!({ "workspace": workspace, "agent": agent.to_string() }),
    )
}

/// `vm.returned`: an agent gave its VM back (to `idle` or `draining`).
pub(crate) fn vm_returned(
    id: VmId,
    workspace: &str,
    agent: Option<AgentId>,
    to: VmState,
) -> NewEvent {
    NewEvent::new(
        EventKind::VmReturned,
        format!("vm/{id}"),
        json!({
            "workspace": workspace,
            "agent": agent.map(|a| a.to_string()),
            "to": to.as_str(),
        }),
    )
}

/// The event of a [`crate::Store::set_vm_state`] change to `to`, for the
/// states that have one: `destroyed` and `failed` (with the error). The
/// others (a flush's `draining`, `provisioning`) have none: what caused
/// them has its own (`pool.flushed`, `instance.*`).
pub(crate) fn vm_state(
    id: VmId,
    workspace: &str,
    to: VmState,
    error: Option<&str>,
) -> Option<NewEvent> {
    let subject = format!("vm/{id}");
    match to {
        VmState::Destroyed => Some(NewEvent::new(
            EventKind::VmDestroyed,
            subject,
            json!({ "workspace": workspace }),
        )),
        VmState::Failed => Some(NewEvent::new(
            EventKind::VmFailed,
            subject,
            json!({ "workspace": workspace, "error": error }),
        )),
        _ => None,
    }
}

/// Whether [`vm_state`] makes an event for a change to `to` (the store
/// keeps the one-statement path for the others).
pub(crate) fn vm_state_has_event(to: VmState) -> bool {
    matches!(to, VmState::Destroyed | VmState::Failed)
}

/// `agent.<to>`: an agent entered phase `to` from `from` (`None`: it was
/// just created).
pub(crate) fn agent_phase(
    id: AgentId,
    workspace: &str,
    from: Option<AgentPhase>,
    to: AgentPhase,
    vm: Option<VmId>,
) -> NewEvent {
    NewEvent::new(
        EventKind::of_agent_phase(to),
        format!("agent/{id}"),
        json!({
            "workspace": workspace,
            "from": from.map(AgentPhase::as_str),
            "vm": vm.map(|v| v.to_string()),
        }),
    )
}

/// Adds an agent's end (exit code, error) to its phase event's data.
pub(crate) fn with_outcome(
    mut event: NewEvent,
    exit_code: Option<i32>,
    error: Option<&str>,
) -> NewEvent {
    if let Some(code) = exit_code {
        event.data["exit_code"] = json!(code);
    }
    if let Some(error) = error {
        event.data["error"] = json!(error);
    }
    event
}

/// What a provisioning run was, read in the update's transaction.
pub(crate) struct RunBefore<'a> {
    pub id: InstanceId,
    pub workspace: &'a str,
    pub vm: &'a str,
    pub status: InstanceStatus,
    pub steps: &'a Value,
}

/// The events of one [`crate::Store::update_instance`]: an
/// `instance.step` for each step that has finished since the last write
/// (name, repo, status, duration, error; never its output), then
/// `instance.ready` or `instance.failed` when the run ends now.
pub(crate) fn instance_update(
    before: &RunBefore<'_>,
    status: InstanceStatus,
    steps: &Value,
    summary: Option<&Value>,
) -> Vec<NewEvent> {
    let subject = format!("instance/{}", before.id);
    let old = before.steps.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let finished = |s: &Value| {
        matches!(
            s.get("status").and_then(Value::as_str),
            Some("succeeded" | "failed")
        )
    };
    let same_step =
        |a: &Value, b: &Value| a.get("name") == b.get("name") && a.get("repo") == b.get("repo");
    let mut events = Vec::new();
    for (i, step) in steps.as_array().into_iter().flatten().enumerate() {
        if !finished(step) {
            continue;
        }
        let seen = old
            .get(i)
            .is_some_and(|o| same_step(o, step) && finished(o))
            || (old.get(i).is_none() && old.iter().any(|o| same_step(o, step) && finished(o)));
        if seen {
            continue;
        }
        let mut data = Map::new();
        data.insert("workspace".into(), json!(before.workspace));
        data.insert("vm".into(), json!(before.vm));
        for field in ["name", "repo", "status", "error"] {
            if let Some(v) = step.get(field).filter(|v| !v.is_null()) {
                data.insert(field.into(), v.clone());
            }
        }
        data.insert(
            "duration_ms".into(),
            step.get("durationMs").cloned().unwrap_or(Value::Null),
        );
        events.push(NewEvent::new(
            EventKind::InstanceStep,
            subject.clone(),
            Value::Object(data),
        ));
    }
    if before.status == InstanceStatus::Provisioning && status != InstanceStatus::Provisioning {
        let kind = if status == InstanceStatus::Ready {
            EventKind::InstanceReady
        } else {
            EventKind::InstanceFailed
        };
        let mut data = json!({ "workspace": before.workspace, "vm": before.vm });
        if let Some(summary) = summary {
            for (from, to) in [("failedStep", "failed_step"), ("error", "error")] {
                if let Some(v) = summary.get(from).filter(|v| !v.is_null()) {
                    data[to] = v.clone();
                }
            }
        }
        events.push(NewEvent::new(kind, subject, data));
    }
    events
}

/// The event of a workspace's back-off state going from `old` to `new`:
/// `workspace.hard_limited` when it is newly hard limited,
/// `workspace.backing_off` when a failure was added to an active back-off,
/// `workspace.recovered` when failures or a limit were cleared.
pub(crate) fn workspace_state(
    old: Option<&WorkspaceState>,
    new: &WorkspaceState,
) -> Option<NewEvent> {
    let subject = format!("workspace/{}", new.workspace);
    let old_failures = old.map_or(0, |o| o.consecutive_failures);
    let old_limited = old.is_some_and(|o| o.hard_limited);
    if new.hard_limited && !old_limited {
        return Some(NewEvent::new(
            EventKind::WorkspaceHardLimited,
            subject,
            json!({
                "failures": new.consecutive_failures,
                "error": new.last_error,
            }),
        ));
    }
    if !new.hard_limited && new.backoff_until.is_some() && new.consecutive_failures > old_failures {
        return Some(NewEvent::new(
            EventKind::WorkspaceBackingOff,
            subject,
            json!({
                "failures": new.consecutive_failures,
                "until": new.backoff_until,
                "error": new.last_error,
            }),
        ));
    }
    if (old_failures > 0 || old_limited) && new.consecutive_failures == 0 && !new.hard_limited {
        return Some(NewEvent::new(
            EventKind::WorkspaceRecovered,
            subject,
            json!({ "failures_before": old_failures, "was_hard_limited": old_limited }),
        ));
    }
    None
}

/// `resource.written`: a resource's spec changed (`created` when it is
/// new), by `actor`.
pub(crate) fn resource_written(
    kind: Kind,
    name: &str,
    version: i64,
    created: bool,
    actor: Option<&str>,
) -> NewEvent {
    let mut event = NewEvent::new(
        EventKind::ResourceWritten,
        format!("{kind}/{name}"),
        json!({ "kind": kind.as_str(), "name": name, "version": version, "created": created }),
    );
    event.actor = actor.map(str::to_owned);
    event
}

/// `resource.deleted`: a resource was deleted at `version`, by `actor`.
pub(crate) fn resource_deleted(
    kind: Kind,
    name: &str,
    version: i64,
    actor: Option<&str>,
) -> NewEvent {
    let mut event = NewEvent::new(
        EventKind::ResourceDeleted,
        format!("{kind}/{name}"),
        json!({ "kind": kind.as_str(), "name": name, "version": version }),
    );
    event.actor = actor.map(str::to_owned);
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(failures: i64, until: Option<i64>, limited: bool) -> WorkspaceState {
        WorkspaceState {
            workspace: "web".into(),
            consecutive_failures: failures,
            backoff_until: until,
            hard_limited: limited,
            last_error: Some("boom".into()),
            config_fingerprint: String::new(),
        }
    }

    #[test]
    fn workspace_transitions_name_what_changed() {
        fn kind(old: Option<&WorkspaceState>, new: &WorkspaceState) -> Option<EventKind> {
            workspace_state(old, new).map(|e| e.kind)
        }
        assert_eq!(
            kind(None, &ws(1, Some(5), false)),
            Some(EventKind::WorkspaceBackingOff)
        );
        let one = ws(1, Some(5), false);
        assert_eq!(
            kind(Some(&one), &ws(2, Some(9), false)),
            Some(EventKind::WorkspaceBackingOff)
        );
        // The same state written again (a fingerprint refresh) says nothing.
        assert_eq!(kind(Some(&one), &one), None);
        assert_eq!(
            kind(Some(&one), &ws(3, None, true)),
            Some(EventKind::WorkspaceHardLimited)
        );
        assert_eq!(
            kind(Some(&ws(3, None, true)), &ws(0, None, false)),
            Some(EventKind::WorkspaceRecovered)
        );
        assert_eq!(kind(None, &ws(0, None, false)), None);
    }

    #[test]
    fn a_step_is_reported_once_when_it_finishes_without_its_output() {
        let before_steps = json!([
            {"name": "create_vm", "status": "succeeded", "output": "", "durationMs": 5},
            {"name": "ensure_server", "status": "running", "output": ""}
        ]);
        let before = RunBefore {
            id: InstanceId::new(),
            workspace: "web",
            vm: "vm-1",
            status: InstanceStatus::Provisioning,
            steps: &before_steps,
        };
        let now = json!([
            {"name": "create_vm", "status": "succeeded", "output": "", "durationMs": 5},
            {"name": "ensure_server", "status": "failed", "output": "SECRET-ish", "error": "timeout", "durationMs": 7}
        ]);
        let summary = json!({"success": false, "failedStep": "ensure_server", "error": "timeout"});
        let events = instance_update(&before, InstanceStatus::Failed, &now, Some(&summary));
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::InstanceStep, EventKind::InstanceFailed]);
        assert_eq!(events[0].data["name"], "ensure_server");
        assert_eq!(events[0].data["duration_ms"], 7);
        assert_eq!(events[0].data["error"], "timeout");
        assert!(events[0].data.get("output").is_none());
        assert_eq!(events[1].data["failed_step"], "ensure_server");
    }
}
