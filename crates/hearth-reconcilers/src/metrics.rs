//! The Prometheus metrics of one server: the counters and histograms this
//! process observes (claims, boots, provisioning steps, reconcile passes),
//! and the gauges read from the store at scrape time ([`Metrics::render`]).
//!
//! **Invariants:**
//! - counters and histograms live in the process: each replica exports
//!   what it observed (Prometheus sums the replicas);
//! - every gauge is computed from the store when scraped, so every replica
//!   reports the same truth, and every workspace's and tenant's gauges are
//!   emitted, zeros included;
//! - a scrape reads the store a bounded number of times per tenant (the
//!   same read as [`Pool::status`], reused while nothing changed), never
//!   once per VM, and writes nothing of its own (that shared read records
//!   a workspace's configuration on first sight, as every pass does);
//! - label values are low-cardinality: names of tenants, workspaces, nodes,
//!   provisioning steps and fixed categories, never free text.

use crate::Pool;
use hearth_core::ids::TenantId;
use hearth_store::{Millis, Store, now_millis};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How a spawned agent got its VM (the `outcome` label of claims).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An idle VM was claimed at once, in the spawn (or wake) request.
    Warm,
    /// The agent waited for a VM booted for it.
    Cold,
    /// The agent waited, then got a VM that came idle meanwhile (a
    /// backfill finishing, capacity freed at `max_vms`).
    Queued,
    /// The spawn was refused (the developer's cap) or the queued agent was
    /// failed unserved (its workspace gone or hard-limited).
    Rejected,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Warm,
        Outcome::Cold,
        Outcome::Queued,
        Outcome::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Warm => "warm",
            Outcome::Cold => "cold",
            Outcome::Queued => "queued",
            Outcome::Rejected => "rejected",
        }
    }
}

/// The provisioning steps, the only values of the `step` label.
pub const STEPS: [&str; 8] = [
    "create_vm",
    "ensure_server",
    "set_env_vars",
    "clone_repo",
    "init_repo",
    "project_setup",
    "repo_setup",
    "warm_pool_setup",
];

/// The values of a failed boot's `reason` label: the failed step, `seal`,
/// or `other`. Never the error text.
pub fn failure_reason(failed_step: Option<&str>) -> &'static str {
    match failed_step {
        Some("seal") => "seal",
        Some(step) => STEPS
            .iter()
            .find(|s| **s == step)
            .copied()
            .unwrap_or("other"),
        None => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClaimLabels {
    tenant: String,
    workspace: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    tenant: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkspaceLabels {
    tenant: String,
    workspace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    tenant: String,
    workspace: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    tenant: String,
    workspace: String,
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets of waits and boots: 50 ms to 20 minutes.
fn wait_histogram() -> Histogram {
    Histogram::new([
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    ])
}

/// Buckets of reconcile passes: 1 ms to 10 s.
fn pass_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// The process's metrics ([`Pool::metrics`]).
pub struct Metrics {
    claims: Family<ClaimLabels, Counter>,
    spawn_to_running: Histograms<OutcomeLabels>,
    queued: Histograms<TenantLabels>,
    boots_started: Family<WorkspaceLabels, Counter>,
    boots_succeeded: Family<WorkspaceLabels, Counter>,
    boots_failed: Family<FailureLabels, Counter>,
    boot_duration: Histograms<WorkspaceLabels>,
    step_duration: Histograms<StepLabels>,
    pass_duration: Histograms<TenantLabels>,
    passes: Family<TenantLabels, Counter>,
    pass_errors: Family<TenantLabels, Counter>,
    /// Tenant names by id, for the `tenant` label (refreshed by every
    /// pass over all tenants and every scrape).
    names: Mutex<HashMap<TenantId, String>>,
    /// SHA-256 of the metrics token (`--metrics-token-file`), which may
    /// scrape without an identity.
    scrape_token: OnceLock<[u8; 32]>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            claims: Family::default(),
            spawn_to_running: Family::new_with_constructor(wait_histogram),
            queued: Family::new_with_constructor(wait_histogram),
            boots_started: Family::default(),
            boots_succeeded: Family::default(),
            boots_failed: Family::default(),
            boot_duration: Family::new_with_constructor(wait_histogram),
            step_duration: Family::new_with_constructor(wait_histogram),
            pass_duration: Family::new_with_constructor(pass_histogram),
            passes: Family::default(),
            pass_errors: Family::default(),
            names: Mutex::new(HashMap::new()),
            scrape_token: OnceLock::new(),
        }
    }
}

/// Seconds since `since` (Unix milliseconds), never negative.
fn seconds_since(since: Millis) -> f64 {
    (now_millis() - since).max(0) as f64 / 1000.0
}

impl Metrics {
    /// The `tenant` label of `id`: its name, or the id until a pass or a
    /// scrape has read the tenants.
    pub fn tenant(&self, id: TenantId) -> String {
        self.names
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// Records the tenants' names (from a read of every tenant).
    pub fn learn_tenants(&self, tenants: &[hearth_store::Tenant]) {
        *self.names.lock().unwrap() = tenants.iter().map(|t| (t.id, t.name.clone())).collect();
    }

    /// The `tenant` label of `id`, reading the tenants once when it is
    /// not known yet (a tenant created since the last pass).
    pub async fn tenant_label(&self, store: &dyn Store, id: TenantId) -> String {
        if !self.names.lock().unwrap().contains_key(&id)
            && let Ok(tenants) = store.list_tenants().await
        {
            self.learn_tenants(&tenants);
        }
        self.tenant(id)
    }

    /// An agent got its VM (or was refused), `spawn_to_running` seconds
    /// after its spawn; `queued_at` is when it began waiting (`None`: it
    /// never waited).
    pub fn claim(
        &self,
        tenant: &str,
        workspace: &str,
        outcome: Outcome,
        spawn_to_running: Option<f64>,
        queued_at: Option<Millis>,
    ) {
        self.claims
            .get_or_create(&ClaimLabels {
                tenant: tenant.to_owned(),
                workspace: workspace.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
        if let Some(seconds) = spawn_to_running {
            self.spawn_to_running
                .get_or_create(&OutcomeLabels {
                    tenant: tenant.to_owned(),
                    outcome: outcome.as_str(),
                })
                .observe(seconds);
        }
        if let Some(at) = queued_at {
            self.queued
                .get_or_create(&TenantLabels {
                    tenant: tenant.to_owned(),
                })
                .observe(seconds_since(at));
        }
    }

    /// A queued agent got its VM from the pool: `cold` when the VM was
    /// booted for it, `queued` when it came idle while the agent waited.
    /// Its spawn (or wake, or resurrection) is when it was queued: it
    /// waited from then until now, when it runs.
    pub fn claim_after_wait(&self, agent: &hearth_store::AgentRecord, outcome: Outcome) {
        let tenant = self.tenant(agent.tenant_id);
        self.claim(
            &tenant,
            &agent.workspace,
            outcome,
            Some(seconds_since(agent.queued_at)),
            Some(agent.queued_at),
        );
    }

    /// A pool boot started (test boots are not counted).
    pub fn boot_started(&self, tenant: TenantId, workspace: &str) {
        self.boots_started
            .get_or_create(&self.workspace_labels(tenant, workspace))
            .inc();
    }

    /// A pool boot ended: its steps' durations, and its own when it succeeded.
    pub fn boot_ended(
        &self,
        tenant: TenantId,
        workspace: &str,
        steps: &[hearth_provisioning::Step],
        duration: Duration,
        failed_step: Option<Option<&str>>,
    ) {
        let labels = self.workspace_labels(tenant, workspace);
        for step in steps {
            let (Some(name), Some(ms)) =
                (STEPS.iter().find(|s| **s == step.name), step.duration_ms)
            else {
                continue;
            };
            self.step_duration
                .get_or_create(&StepLabels {
                    tenant: labels.tenant.clone(),
                    workspace: labels.workspace.clone(),
                    step: name,
                })
                .observe(ms as f64 / 1000.0);
        }
        match failed_step {
            None => {
                self.boots_succeeded.get_or_create(&labels).inc();
                self.boot_duration
                    .get_or_create(&labels)
                    .observe(duration.as_secs_f64());
            }
            Some(step) => {
                self.boots_failed
                    .get_or_create(&FailureLabels {
                        tenant: labels.tenant,
                        workspace: labels.workspace,
                        reason: failure_reason(step),
                    })
                    .inc();
            }
        }
    }

    /// A reconcile pass of a tenant ran (`failed`: it ended in an error).
    pub fn pass(&self, tenant: &str, duration: Duration, failed: bool) {
        let labels = TenantLabels {
            tenant: tenant.to_owned(),
        };
        self.passes.get_or_create(&labels).inc();
        self.pass_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        // Zero until the first error, so the series exists from the first pass.
        let errors = self.pass_errors.get_or_create(&labels);
        if failed {
            errors.inc();
        }
    }

    /// Sets the metrics token (`--metrics-token-file`); once.
    pub fn set_scrape_token(&self, token: &str) {
        use sha2::Digest;
        let _ = self
            .scrape_token
            .set(sha2::Sha256::digest(token.trim()).into());
    }

    /// Whether `token` is the metrics token, compared in constant time (of
    /// digests, so the length leaks nothing either).
    pub fn is_scrape_token(&self, token: &str) -> bool {
        use sha2::Digest;
        let Some(expected) = self.scrape_token.get() else {
            return false;
        };
        use subtle::ConstantTimeEq;
        let given: [u8; 32] = sha2::Sha256::digest(token).into();
        given.ct_eq(expected).into()
    }

    fn workspace_labels(&self, tenant: TenantId, workspace: &str) -> WorkspaceLabels {
        WorkspaceLabels {
            tenant: self.tenant(tenant),
            workspace: workspace.to_owned(),
        }
    }

    /// Zero counters of a workspace, so a rate starts at its first sample.
    fn touch_workspace(&self, tenant: &str, workspace: &str) {
        for outcome in Outcome::ALL {
            let _ = self.claims.get_or_create(&ClaimLabels {
                tenant: tenant.to_owned(),
                workspace: workspace.to_owned(),
                outcome: outcome.as_str(),
            });
        }
        let labels = WorkspaceLabels {
            tenant: tenant.to_owned(),
            workspace: workspace.to_owned(),
        };
        let _ = self.boots_started.get_or_create(&labels);
        let _ = self.boots_succeeded.get_or_create(&labels);
    }

    fn register_process(&self, registry: &mut Registry) {
        registry.register(
            "hearth_claims",
            "Agents that got a VM (warm, cold, queued) or were refused (rejected)",
            self.claims.clone(),
        );
        registry.register(
            "hearth_spawn_to_running_seconds",
            "From an agent's spawn to its running on a VM, by how it got the VM",
            self.spawn_to_running.clone(),
        );
        registry.register(
            "hearth_queued_seconds",
            "Time agents spent queued before they got a VM",
            self.queued.clone(),
        );
        registry.register(
            "hearth_boots_started",
            "Pool VM boots started",
            self.boots_started.clone(),
        );
        registry.register(
            "hearth_boots_succeeded",
            "Pool VM boots that ended warm or assigned",
            self.boots_succeeded.clone(),
        );
        registry.register(
            "hearth_boots_failed",
            "Pool VM boots that failed, by the failed provisioning step",
            self.boots_failed.clone(),
        );
        registry.register(
            "hearth_boot_duration_seconds",
            "Duration of successful pool boots, create to ready",
            self.boot_duration.clone(),
        );
        registry.register(
            "hearth_provisioning_step_duration_seconds",
            "Duration of each provisioning step of pool boots",
            self.step_duration.clone(),
        );
        registry.register(
            "hearth_reconcile_pass_duration_seconds",
            "Duration of reconcile passes of a tenant",
            self.pass_duration.clone(),
        );
        registry.register(
            "hearth_reconcile_passes",
            "Reconcile passes of a tenant run by this replica",
            self.passes.clone(),
        );
        registry.register(
            "hearth_reconcile_errors",
            "Reconcile passes of a tenant that ended in an error",
            self.pass_errors.clone(),
        );
    }
}

/// Gauges of one scrape, filled from the store.
#[derive(Default)]
struct Gauges {
    ws: [Family<WorkspaceLabels, Gauge>; 9],
    max_vms: Family<TenantLabels, Gauge>,
    live_vms: Family<TenantLabels, Gauge>,
    saturation: Family<TenantLabels, Gauge<f64, AtomicU64>>,
    stranded: Family<TenantLabels, Gauge>,
    node: [Family<NodeLabels, Gauge>; 5],
}

/// Names and help of the per-workspace gauges, in the order of [`Gauges::ws`].
const WORKSPACE_GAUGES: [(&str, &str); 9] = [
    ("hearth_workspace_min_idle", "Desired idle VMs (min_idle)"),
    ("hearth_workspace_max_idle", "Most idle VMs kept (max_idle)"),
    ("hearth_workspace_idle_vms", "Warm VMs ready to claim"),
    (
        "hearth_workspace_booting_vms",
        "VMs booting or provisioning",
    ),
    ("hearth_workspace_assigned_vms", "VMs assigned to agents"),
    (
        "hearth_workspace_stale_vms",
        "Idle VMs built from an older environment or image",
    ),
    ("hearth_workspace_queued_agents", "Agents waiting for a VM"),
    (
        "hearth_workspace_backing_off",
        "1 while boots back off after failures",
    ),
    (
        "hearth_workspace_hard_limited",
        "1 when boots stopped after repeated failures",
    ),
];

/// Names and help of the per-node gauges, in the order of [`Gauges::node`].
const NODE_GAUGES: [(&str, &str); 5] = [
    ("hearth_node_capacity_cpus", "CPUs a node offers"),
    ("hearth_node_capacity_memory_bytes", "Memory a node offers"),
    ("hearth_node_capacity_vms", "Most VMs a node runs at once"),
    ("hearth_node_live_vms", "Live VMs on a node"),
    ("hearth_node_reachable", "1 while a node reports in time"),
];

/// Errors of a scrape.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error(transparent)]
    Pool(#[from] crate::PoolError),
    #[error(transparent)]
    Store(#[from] hearth_store::StoreError),
    #[error("cannot encode the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

impl Pool {
    /// The process's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Every metric in the Prometheus text format: the process's counters
    /// and histograms, and the gauges read now from the store (per tenant
    /// the read of [`Pool::status`]; the nodes and their usage once).
    pub async fn render_metrics(&self) -> Result<String, ScrapeError> {
        let metrics = &self.metrics;
        let tenants = self.store().list_tenants().await?;
        metrics.learn_tenants(&tenants);
        let gauges = Gauges::default();
        for tenant in &tenants {
            let status = self.status(tenant.id).await?;
            let t = TenantLabels {
                tenant: tenant.name.clone(),
            };
            let max = status.configuration.max_vms.unwrap_or(0);
            gauges.max_vms.get_or_create(&t).set(max);
            gauges
                .live_vms
                .get_or_create(&t)
                .set(status.vms.total as i64);
            let saturation = if max > 0 {
                status.vms.total as f64 / max as f64
            } else {
                0.0
            };
            gauges.saturation.get_or_create(&t).set(saturation);
            gauges
                .stranded
                .get_or_create(&t)
                .set(status.reaper.stranded as i64);
            for w in &status.workspaces {
                metrics.touch_workspace(&tenant.name, &w.name);
                let labels = WorkspaceLabels {
                    tenant: tenant.name.clone(),
                    workspace: w.name.clone(),
                };
                let values = [
                    w.min_idle as i64,
                    w.max_idle as i64,
                    w.idle as i64,
                    w.booting as i64,
                    w.active as i64,
                    w.stale as i64,
                    w.queued as i64,
                    i64::from(w.status == "backing_off"),
                    i64::from(w.status == "hard_limited"),
                ];
                for (family, value) in gauges.ws.iter().zip(values) {
                    family.get_or_create(&labels).set(value);
                }
            }
        }
        let nodes = self.store().list_nodes().await?;
        if !nodes.is_empty() {
            let usage = self.store().node_usage().await?;
            let now = now_millis();
            let timeout = self.options().fleet.node_timeout.as_millis() as Millis;
            for node in &nodes {
                let live = usage
                    .iter()
                    .find(|u| u.node == Some(node.id))
                    .map_or(0, |u| u.vms);
                let labels = NodeLabels {
                    node: node.name.clone(),
                };
                let values = [
                    node.capacity.cpus,
                    node.capacity.memory_mib * 1024 * 1024,
                    node.capacity.vm_slots,
                    live,
                    i64::from(now - node.last_heartbeat <= timeout),
                ];
                for (family, value) in gauges.node.iter().zip(values) {
                    family.get_or_create(&labels).set(value);
                }
            }
        }
        let mut registry = Registry::default();
        metrics.register_process(&mut registry);
        for ((name, help), family) in WORKSPACE_GAUGES.iter().zip(gauges.ws) {
            registry.register(*name, *help, family);
        }
        registry.register(
            "hearth_tenant_max_vms",
            "The tenant's cap on live VMs (0: no pool config)",
            gauges.max_vms,
        );
        registry.register(
            "hearth_tenant_live_vms",
            "The tenant's live VMs (what counts against max_vms)",
            gauges.live_vms,
        );
        registry.register(
            "hearth_tenant_saturation_ratio",
            "Live VMs over max_vms",
            gauges.saturation,
        );
        registry.register(
            "hearth_reaper_stranded_workflows",
            "Agents whose workflow is stranded on a retired build",
            gauges.stranded,
        );
        for ((name, help), family) in NODE_GAUGES.iter().zip(gauges.node) {
            registry.register(*name, *help, family);
        }
        let mut text = String::new();
        encode(&mut text, &registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reasons_are_a_fixed_set() {
        assert_eq!(failure_reason(Some("project_setup")), "project_setup");
        assert_eq!(failure_reason(Some("seal")), "seal");
        assert_eq!(failure_reason(Some("rm -rf / said no")), "other");
        assert_eq!(failure_reason(None), "other");
    }

    #[test]
    fn counters_encode_with_total_and_labels() {
        let m = Metrics::default();
        m.claim("acme", "web", Outcome::Warm, Some(0.2), None);
        m.claim("acme", "web", Outcome::Warm, Some(0.3), None);
        m.claim("acme", "web", Outcome::Rejected, None, None);
        let mut registry = Registry::default();
        m.register_process(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "hearth_claims_total{tenant=\"acme\",workspace=\"web\",outcome=\"warm\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "hearth_claims_total{tenant=\"acme\",workspace=\"web\",outcome=\"rejected\"} 1\n"
        ));
        assert!(text.contains(
            "hearth_spawn_to_running_seconds_count{tenant=\"acme\",outcome=\"warm\"} 2\n"
        ));
        assert!(text.contains(
            "hearth_spawn_to_running_seconds_bucket{le=\"0.25\",tenant=\"acme\",outcome=\"warm\"} 1\n"
        ));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn only_the_metrics_token_passes() {
        let m = Metrics::default();
        assert!(!m.is_scrape_token(""), "no token set: nothing passes");
        m.set_scrape_token("s3cret\n");
        assert!(m.is_scrape_token("s3cret"));
        assert!(!m.is_scrape_token("s3cre"));
        assert!(!m.is_scrape_token("s3cret "));
    }
}
