//! Pass status: what woke each tenant's reconcile passes, their number,
//! when the last one started, how long it took, what it did by kind of
//! action and what failed — the status an operator inspects in
//! `hearth pool status -o json` (`pass`), as omicron's background tasks
//! report theirs.
//!
//! The [`Tracker`] is the runner's bookkeeping: the causes of the wakes
//! since the run loop last woke, the tenants just taken over, and each
//! tenant's last [`PassStatus`]. It does no I/O; the runner keeps a pass in
//! the store ([`Store::put_reconcile_pass`](hearth_store::Store::put_reconcile_pass))
//! when [`PassStatus::worth_keeping`] says so.
//!
//! **Invariants:** a pass that did nothing (no action, no error, no lead
//! taken) is never kept in the store: any write moves the store's change
//! token, and one per pass would make every pass read the whole tenant
//! again. So the status a replica that does not lead the tenant shows is
//! the leader's last pass that acted (its iteration may be behind the
//! leader's own); the leader shows its live one.

use crate::plan::Action;
use crate::status::rfc3339;
use hearth_core::ids::TenantId;
use hearth_store::Millis;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// What woke a reconcile pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wake {
    /// The replica's first pass, at start.
    Start,
    /// A change made through the API (a resource written, an agent spawned
    /// or finished, a flush, a reset...).
    Api,
    /// `hearth pool up`.
    PoolUp,
    /// A VM's task ended (a boot, a destroy, an agent's command, a bake).
    Task,
    /// A deadline a pass found: an idle timeout, a boot timeout, a
    /// back-off ending, a stranded workflow to reap.
    Deadline,
    /// The periodic resync (the safety net).
    Resync,
    /// The retry of the leads of tenants another replica holds.
    LeadRetry,
    /// This replica took over the tenant's lead.
    Takeover,
    /// Another replica's wake (its NOTIFY).
    Replica,
}

impl Wake {
    /// Every cause, in the order they are listed.
    pub const ALL: [Wake; 9] = [
        Wake::Start,
        Wake::Api,
        Wake::PoolUp,
        Wake::Task,
        Wake::Deadline,
        Wake::Resync,
        Wake::LeadRetry,
        Wake::Takeover,
        Wake::Replica,
    ];

    /// Its name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Wake::Start => "start",
            Wake::Api => "api",
            Wake::PoolUp => "pool_up",
            Wake::Task => "task",
            Wake::Deadline => "deadline",
            Wake::Resync => "resync",
            Wake::LeadRetry => "lead_retry",
            Wake::Takeover => "takeover",
            Wake::Replica => "replica",
        }
    }
}

/// The kinds of planner actions, as counted (`actions.boot`, ...).
pub const ACTION_KINDS: [&str; 8] = [
    "boot",
    "assign",
    "destroy",
    "return",
    "mark_stale",
    "fail_agent",
    "give_up",
    "lose",
];

/// The kind of an action, one of [`ACTION_KINDS`].
pub fn action_kind(action: &Action) -> &'static str {
    match action {
        Action::Boot { .. } => "boot",
        Action::Assign { .. } => "assign",
        Action::Destroy { .. } => "destroy",
        Action::Return { .. } => "return",
        Action::MarkStale { .. } => "mark_stale",
        Action::FailAgent { .. } => "fail_agent",
        Action::GiveUp { .. } => "give_up",
        Action::Lose { .. } => "lose",
    }
}

/// Counts by kind, every kind present (zeros too).
fn zero_counts<'a>(kinds: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u64> {
    kinds.into_iter().map(|k| (k.to_owned(), 0)).collect()
}

/// Where the status shown came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassSource {
    /// The answering replica leads the tenant: its own last pass.
    Live,
    /// The last pass the tenant's leader kept in the store (one that
    /// acted, failed or took the lead over).
    Stored,
}

/// The last error of a tenant's passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassError {
    /// The pass it happened in.
    pub iteration: u64,
    /// RFC 3339.
    pub at: String,
    pub message: String,
}

/// Sums over a replica's passes of a tenant, since it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassTotals {
    /// Actions by kind ([`ACTION_KINDS`]).
    pub actions: BTreeMap<String, u64>,
    pub errors: u64,
    /// Passes by what woke them ([`Wake`]).
    pub wakes: BTreeMap<String, u64>,
}

impl Default for PassTotals {
    fn default() -> Self {
        PassTotals {
            actions: zero_counts(ACTION_KINDS),
            errors: 0,
            wakes: zero_counts(Wake::ALL.iter().map(|w| w.as_str())),
        }
    }
}

/// What a tenant's last reconcile pass did (`pass` in `pool status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassStatus {
    /// The replica that ran it.
    pub replica: String,
    /// Its number among that replica's passes of the tenant (1 first).
    pub iteration: u64,
    pub woken_by: Wake,
    /// RFC 3339.
    pub started_at: String,
    pub duration_ms: f64,
    /// Whether it planned from the snapshot of the pass before (nothing
    /// was written since).
    pub reused_snapshot: bool,
    /// Actions by kind ([`ACTION_KINDS`], zeros included).
    pub actions: BTreeMap<String, u64>,
    /// Actions that failed, or 1 for a pass that could not run.
    pub errors: u64,
    pub last_error: Option<PassError>,
    pub totals: PassTotals,
    pub source: PassSource,
}

impl PassStatus {
    /// Whether the pass is kept in the store for the other replicas: it
    /// acted, had an error or took the lead over (see the module doc).
    pub fn worth_keeping(&self) -> bool {
        self.woken_by == Wake::Takeover || self.errors > 0 || self.actions.values().any(|&n| n > 0)
    }
}

/// One pass as it begins ([`Tracker::begin`]).
#[derive(Debug, Clone, Copy)]
pub struct Begun {
    pub woken_by: Wake,
    pub started_at: Millis,
    pub clock: std::time::Instant,
}

/// What a pass did, for [`Tracker::finish`].
#[derive(Debug, Default)]
pub struct Outcome<'a> {
    pub reused_snapshot: bool,
    pub actions: &'a [Action],
    /// Each failed action's error, or the pass's own.
    pub errors: Vec<String>,
}

#[derive(Debug)]
struct Causes {
    /// Causes of the wakes since the run loop last woke, first first.
    pending: Vec<Wake>,
    /// What woke the run loop's current round of passes.
    current: Wake,
}

/// The runner's pass bookkeeping (see the module doc).
#[derive(Debug)]
pub struct Tracker {
    causes: Mutex<Causes>,
    taken_over: Mutex<HashSet<TenantId>>,
    last: Mutex<HashMap<TenantId, PassStatus>>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            causes: Mutex::new(Causes {
                pending: Vec::new(),
                current: Wake::Start,
            }),
            taken_over: Mutex::new(HashSet::new()),
            last: Mutex::new(HashMap::new()),
        }
    }
}

impl Tracker {
    /// Records why the run loop is being woken.
    pub fn woken(&self, cause: Wake) {
        let mut causes = self.causes.lock().unwrap();
        if !causes.pending.contains(&cause) {
            causes.pending.push(cause);
        }
    }

    /// The first cause of the wakes since the last call (`None`: none
    /// recorded), and forgets them.
    pub fn take_woken(&self) -> Option<Wake> {
        let mut causes = self.causes.lock().unwrap();
        let first = causes.pending.first().copied();
        causes.pending.clear();
        first
    }

    /// What woke the run loop's coming round of passes.
    pub fn set_round(&self, cause: Wake) {
        self.causes.lock().unwrap().current = cause;
    }

    /// The tenant's lead was just taken over: its next pass says so.
    pub fn took_over(&self, tenant: TenantId) {
        self.taken_over.lock().unwrap().insert(tenant);
    }

    /// A pass of `tenant` begins now (`started_at`: the store's clock).
    pub fn begin(&self, tenant: TenantId, started_at: Millis) -> Begun {
        let woken_by = if self.taken_over.lock().unwrap().remove(&tenant) {
            Wake::Takeover
        } else {
            self.causes.lock().unwrap().current
        };
        Begun {
            woken_by,
            started_at,
            clock: std::time::Instant::now(),
        }
    }

    /// Records the pass's end; answers its status.
    pub fn finish(
        &self,
        tenant: TenantId,
        replica: &str,
        begun: Begun,
        outcome: Outcome<'_>,
    ) -> PassStatus {
        let duration: Duration = begun.clock.elapsed();
        let mut last = self.last.lock().unwrap();
        let before = last.get(&tenant);
        let iteration = before.map_or(0, |s| s.iteration) + 1;
        let mut totals = before.map(|s| s.totals.clone()).unwrap_or_default();
        let mut last_error = before.and_then(|s| s.last_error.clone());
        let mut actions = zero_counts(ACTION_KINDS);
        for action in outcome.actions {
            *actions.entry(action_kind(action).to_owned()).or_default() += 1;
        }
        for (kind, n) in &actions {
            *totals.actions.entry(kind.clone()).or_default() += n;
        }
        *totals
            .wakes
            .entry(begun.woken_by.as_str().to_owned())
            .or_default() += 1;
        let errors = outcome.errors.len() as u64;
        totals.errors += errors;
        if let Some(message) = outcome.errors.last() {
            last_error = Some(PassError {
                iteration,
                at: rfc3339(begun.started_at + duration.as_millis() as Millis),
                message: message.clone(),
            });
        }
        let status = PassStatus {
            replica: replica.to_owned(),
            iteration,
            woken_by: begun.woken_by,
            started_at: rfc3339(begun.started_at),
            // Microseconds' precision is plenty.
            duration_ms: (duration.as_micros() as f64) / 1000.0,
            reused_snapshot: outcome.reused_snapshot,
            actions,
            errors,
            last_error,
            totals,
            source: PassSource::Live,
        };
        last.insert(tenant, status.clone());
        status
    }

    /// The tenant's last pass on this replica.
    pub fn last(&self, tenant: TenantId) -> Option<PassStatus> {
        self.last.lock().unwrap().get(&tenant).cloned()
    }

    /// Forgets the tenants not in `keep` (tenants gone).
    pub fn retain(&self, keep: &HashSet<TenantId>) {
        self.last.lock().unwrap().retain(|t, _| keep.contains(t));
        self.taken_over.lock().unwrap().retain(|t| keep.contains(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_core::ids::{AgentId, VmId};
    use hearth_store::VmState;

    fn boot() -> Action {
        Action::Boot {
            workspace: "web".into(),
            reserved_for: None,
        }
    }

    #[test]
    fn counts_actions_by_kind_and_passes_by_cause() {
        let tracker = Tracker::default();
        let tenant = TenantId::new();
        tracker.took_over(tenant);
        let begun = tracker.begin(tenant, 1_000);
        assert_eq!(begun.woken_by, Wake::Takeover);
        let actions = [
            boot(),
            boot(),
            Action::Destroy {
                vm: VmId::new(),
                from: VmState::Idle,
                reason: crate::plan::Reason::Excess,
            },
        ];
        let first = tracker.finish(
            tenant,
            "r1",
            begun,
            Outcome {
                actions: &actions,
                ..Default::default()
            },
        );
        assert_eq!(first.iteration, 1);
        assert_eq!((first.actions["boot"], first.actions["destroy"]), (2, 1));
        assert_eq!(first.actions["assign"], 0, "every kind is listed");
        assert!(first.worth_keeping(), "a takeover is kept");
        assert_eq!(first.started_at, "1970-01-01T00:00:01.000Z");

        // The next round was woken by the API (the first cause recorded).
        tracker.woken(Wake::Api);
        tracker.woken(Wake::Task);
        assert_eq!(tracker.take_woken(), Some(Wake::Api));
        assert_eq!(tracker.take_woken(), None, "taken once");
        tracker.set_round(Wake::Api);
        let begun = tracker.begin(tenant, 2_000);
        assert_eq!(begun.woken_by, Wake::Api, "the takeover is told once");
        let second = tracker.finish(tenant, "r1", begun, Outcome::default());
        assert_eq!(second.iteration, 2);
        assert!(
            !second.worth_keeping(),
            "a pass that did nothing is not kept"
        );
        assert_eq!(second.totals.actions["boot"], 2);
        assert_eq!(
            (second.totals.wakes["takeover"], second.totals.wakes["api"]),
            (1, 1)
        );

        let fail = [Action::FailAgent {
            agent: AgentId::new(),
            error: "gone".into(),
        }];
        let third = tracker.finish(
            tenant,
            "r1",
            tracker.begin(tenant, 3_000),
            Outcome {
                actions: &fail,
                errors: vec!["first".into(), "the store is down".into()],
                ..Default::default()
            },
        );
        assert_eq!(third.errors, 2);
        let error = third.last_error.clone().unwrap();
        assert_eq!(
            (error.iteration, error.message.as_str()),
            (3, "the store is down")
        );
        assert!(third.worth_keeping());
        // The last error stays shown by the passes after it.
        let fourth = tracker.finish(
            tenant,
            "r1",
            tracker.begin(tenant, 4_000),
            Outcome::default(),
        );
        assert_eq!((fourth.errors, fourth.totals.errors), (0, 2));
        assert_eq!(fourth.last_error, Some(error));
        assert_eq!(tracker.last(tenant), Some(fourth));
    }

    #[test]
    fn serializes_with_snake_case_names() {
        let tracker = Tracker::default();
        let tenant = TenantId::new();
        tracker.set_round(Wake::PoolUp);
        let status = tracker.finish(tenant, "r1", tracker.begin(tenant, 0), Outcome::default());
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["woken_by"], "pool_up");
        assert_eq!(json["source"], "live");
        assert_eq!(json["actions"]["mark_stale"], 0);
        assert_eq!(json["totals"]["wakes"]["lead_retry"], 0);
        let back: PassStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }
}
