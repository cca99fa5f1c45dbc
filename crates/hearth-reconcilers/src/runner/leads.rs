//! Replicas: which tenants this pool reconciles, what it resolves when it
//! starts leading one, and how replicas wake each other.
//!
//! Every replica serves the API and claims (each claim is one statement);
//! only the tenant's leader plans and acts for it. A lead is the store's
//! ([`Store::lead`]: a PostgreSQL session advisory lock per tenant, held on
//! a connection of its own, so a replica that dies frees its tenants as its
//! session ends). A replica that does not lead every tenant tries again
//! within [`LEAD_RETRY`], so another takes over within about that long
//! after the leader's session ends.
//!
//! **Takeover** ([`Pool::take_over`]), when a lead begins (at start, after
//! a failover, after this replica's lock connection was lost and taken
//! again): a VM whose `task_owner` is not a task of this process was left by
//! a replica that no longer leads — a boot (`booting`, `provisioning`) is
//! given up (drained, destroyed through the fleet, its reserved agent
//! queued again, its run marked failed), anything else has the owner
//! cleared so the planner acts on it again; agents `provisioning` for a
//! boot that no longer runs are queued again; every `running` agent with a
//! command gets [`Pool::agent_started`] (which re-attaches to its job).
//!
//! **Invariants:** a pass acts only for a tenant led when the pass began;
//! takeover only touches the tenant it leads, and only VMs no task of this
//! process holds; every write it makes is a compare-and-set, so a former
//! leader still finishing a task (its lock connection lost, its pool
//! connections not) changes nothing the takeover changed.

use super::{Pool, PoolError};
use crate::pass::Wake;
use hearth_core::ids::{TenantId, VmId};
use hearth_provisioning::Summary;
use hearth_store::{AgentFilter, AgentPhase, InstanceFilter, InstanceStatus, VmState};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often, at most, a replica that does not lead every tenant tries to
/// take the others (bounds the failover time with the leader's session end).
pub(crate) const LEAD_RETRY: Duration = Duration::from_millis(500);

/// What a takeover resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakeoverReport {
    /// Boots of another replica given up (their VMs destroyed).
    pub boots_given_up: usize,
    /// Other VMs whose owner was cleared for the planner.
    pub tasks_cleared: usize,
    /// Agents queued again (their cold boot was given up or is gone).
    pub agents_requeued: usize,
    /// Running agents with a command handed to [`Pool::agent_started`].
    pub commands_resumed: usize,
}

/// Ends its tasks when dropped (the run loop's helpers).
pub(super) struct WakeTasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for WakeTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Pool {
    /// The tenants this pool leads (as of its last pass).
    pub fn leads(&self) -> HashSet<TenantId> {
        self.led.lock().unwrap().clone()
    }

    /// How many passes this pool has made of a tenant.
    pub fn passes(&self, tenant: TenantId) -> u64 {
        self.pass_counts
            .lock()
            .unwrap()
            .get(&tenant)
            .copied()
            .unwrap_or(0)
    }

    /// Tries to lead every tenant of `tenants`; takes over each lead that
    /// is new (or was lost and taken again); answers the tenants led and
    /// taken over. A store error leads nothing: every lead counts as lost,
    /// so each is taken over again once the store answers.
    pub(super) async fn lead(self: &Arc<Self>, tenants: &[TenantId]) -> HashSet<TenantId> {
        let leads = match self.store.lead(tenants).await {
            Ok(leads) => leads,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take or keep the lead of tenants; reconciling none");
                self.led.lock().unwrap().clear();
                return HashSet::new();
            }
        };
        let before = self.leads();
        let mut led = HashSet::new();
        for &tenant in tenants {
            if !leads.led.contains(&tenant) {
                if before.contains(&tenant) {
                    tracing::warn!(tenant = %tenant, "lost the lead of a tenant");
                }
                continue;
            }
            if !before.contains(&tenant) || leads.lost.contains(&tenant) {
                match self.take_over(tenant).await {
                    Ok(report) => {
                        tracing::info!(tenant = %tenant, replica = %self.options.replica, ?report, "leading a tenant");
                        self.passes.took_over(tenant);
                    }
                    Err(e) => {
                        // Not led until a takeover succeeds: the next pass
                        // tries again.
                        tracing::error!(tenant = %tenant, error = %e, "taking over a tenant failed");
                        continue;
                    }
                }
            }
            led.insert(tenant);
        }
        *self.led.lock().unwrap() = led.clone();
        led
    }

    /// Resolves what the tenant's previous leader left (see the module
    /// doc). Safe to run while that leader still finishes a task: every
    /// write is a compare-and-set on the state or owner read here.
    pub async fn take_over(
        self: &Arc<Self>,
        tenant: TenantId,
    ) -> Result<TakeoverReport, PoolError> {
        let mut report = TakeoverReport::default();
        let mine = self.in_flight();
        for vm in self.store.list_vms(tenant, false).await? {
            let Some(owner) = vm.task_owner.as_deref() else {
                continue;
            };
            if owner == self.options.replica && mine.contains(&vm.id) {
                continue; // a task of this process
            }
            if !self
                .store
                .set_vm_task_owner(vm.id, Some(owner), None)
                .await?
            {
                continue; // its task ended (or another took it) meanwhile
            }
            if matches!(vm.state, VmState::Booting | VmState::Provisioning) {
                let error =
                    format!("its boot was given up: replica {owner} no longer leads the tenant");
                if !self
                    .store
                    .set_vm_state(
                        vm.id,
                        &[VmState::Booting, VmState::Provisioning],
                        VmState::Draining,
                        Some(&error),
                    )
                    .await?
                {
                    continue;
                }
                self.fail_run(tenant, vm.id, &error).await;
                if vm.reserved_for.is_some() {
                    self.requeue_reserved(tenant, &vm).await;
                    report.agents_requeued += 1;
                }
                tracing::info!(tenant = %tenant, vm = %vm.id, owner, "giving up another replica's boot");
                self.spawn_destroy(vm, VmState::Destroyed, Some(error));
                report.boots_given_up += 1;
            } else {
                report.tasks_cleared += 1;
            }
        }
        report.agents_requeued += self.requeue_orphaned(tenant).await?;
        let running = self
            .store
            .list_agents(
                tenant,
                &AgentFilter {
                    phases: vec![AgentPhase::Running],
                    ..Default::default()
                },
            )
            .await?;
        for agent in running.iter().filter(|a| a.command.is_some()) {
            self.agent_started(agent);
            report.commands_resumed += 1;
        }
        self.wake_for(Wake::Takeover);
        Ok(report)
    }

    /// Marks the provisioning run of a boot given up as failed (it would
    /// otherwise read `provisioning` for ever).
    async fn fail_run(&self, tenant: TenantId, vm: VmId, error: &str) {
        let filter = InstanceFilter {
            vm: Some(vm),
            status: Some(InstanceStatus::Provisioning),
            ..Default::default()
        };
        let Ok(runs) = self.store.list_instances(tenant, &filter).await else {
            return;
        };
        let summary = serde_json::to_value(Summary {
            success: false,
            failed_step: None,
            error: Some(error.to_owned()),
        })
        .unwrap_or_default();
        for run in runs {
            let _ = self
                .store
                .update_instance(run.id, InstanceStatus::Failed, &run.steps, Some(&summary))
                .await;
        }
    }

    /// The run loop's helpers, ended when the returned value is dropped (or
    /// at `shutdown`): one sends this pool's wakes to the other replicas
    /// (one NOTIFY per burst of [`Pool::wake`]), one wakes this pool on
    /// theirs ([`Store::wakes`](hearth_store::Store::wakes)).
    pub(super) fn spawn_wake_tasks(&self, shutdown: watch::Receiver<bool>) -> WakeTasks {
        let store = self.store.clone();
        let others = self.wake_others.clone();
        let mut stop = shutdown.clone();
        let send = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = others.notified() => {}
                    _ = stop.changed() => return,
                }
                if let Err(e) = store.notify_wake(None).await {
                    tracing::warn!(error = %e, "cannot wake the other replicas");
                }
            }
        });
        let mut wakes = self.store.wakes();
        let wake = self.wake.clone();
        let passes = self.passes.clone();
        let mut stop = shutdown;
        let listen = tokio::spawn(async move {
            loop {
                tokio::select! {
                    woken = wakes.recv() => match woken {
                        // Only this process's loop: a wake from another
                        // replica is never sent on again.
                        Some(_) => {
                            passes.woken(Wake::Replica);
                            wake.notify_one();
                        }
                        None => return,
                    },
                    _ = stop.changed() => return,
                }
            }
        });
        WakeTasks(vec![send, listen])
    }
}
