//! hearth's provisioning pipeline: the ordered steps that turn a VM into a
//! warm one — `create_vm`, `ensure_server`, `set_env_vars`, `clone_repo`
//! (per repo), `init_repo` (per repo), `project_setup`, `repo_setup` (per
//! repo), `warm_pool_setup` — each with its status, output (bounded, tail
//! kept), error, start time and duration.
//!
//! **Architecture Invariants:**
//! - the pipeline talks to a VM only through the [`Driver`](hearth_drivers::Driver) trait and never
//!   touches the store: progress leaves through a [`Recorder`];
//! - the first failing step stops the run; later steps stay `pending`;
//! - secret values (the environment's variables, repo URL credentials)
//!   never leave in a step's output or error, nor in a log line: they are
//!   replaced by `***`.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

mod pipeline;
pub mod redact;
pub mod settings;

pub use pipeline::{ENV_FILE, OUTPUT_FLUSH, provision, secret_redactor};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// One repository to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPlan {
    pub url: String,
    pub branch: String,
    /// Folder under `/home`.
    pub dir: String,
}

/// A named shell command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub name: String,
    pub command: String,
}

/// Everything a run needs besides the VM itself.
#[derive(Debug, Clone)]
pub struct ProvisionPlan {
    /// Written to `/home/.env` (mode 0600) and given to every command.
    /// The values are secrets.
    pub env: BTreeMap<String, String>,
    pub repos: Vec<RepoPlan>,
    /// The environment's project setup, run from `/home`.
    pub project_setup: Vec<Command>,
    /// The environment's repo setup, run in each repo's folder.
    pub repo_setup: Vec<Command>,
    /// The workspace's warm-pool setup commands, run from `/home`.
    pub warm_pool_setup: Vec<Command>,
    /// How long `ensure_server` waits for the guest agent.
    pub guest_timeout: Duration,
    /// Longest any one command may run.
    pub command_timeout: Duration,
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// One step of a run, as stored and shown (camelCase on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// `create_vm`, `ensure_server`, `set_env_vars`, `clone_repo`,
    /// `init_repo`, `project_setup`, `repo_setup` or `warm_pool_setup`.
    pub name: String,
    /// The repo's folder name, for the per-repo steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    pub status: StepStatus,
    /// The tail of what the step printed (secrets redacted).
    #[serde(default)]
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Receives the steps as they change (persisting them, for instance).
#[async_trait]
pub trait Recorder: Send + Sync {
    /// The whole list of steps, after any change (a step starting, output
    /// arriving — at most every [`OUTPUT_FLUSH`] — or a step ending).
    async fn record(&self, steps: &[Step]);
}

/// The steps of a plan, in order, all `pending`.
pub fn planned_steps(plan: &ProvisionPlan) -> Vec<Step> {
    let step = |name: &str, repo: Option<&str>| Step {
        name: name.to_owned(),
        repo: repo.map(str::to_owned),
        status: StepStatus::Pending,
        output: String::new(),
        error: None,
        started_at: None,
        duration_ms: None,
    };
    let mut steps = vec![
        step("create_vm", None),
        step("ensure_server", None),
        step("set_env_vars", None),
    ];
    steps.extend(plan.repos.iter().map(|r| step("clone_repo", Some(&r.dir))));
    steps.extend(plan.repos.iter().map(|r| step("init_repo", Some(&r.dir))));
    steps.push(step("project_setup", None));
    steps.extend(plan.repos.iter().map(|r| step("repo_setup", Some(&r.dir))));
    steps.push(step("warm_pool_setup", None));
    steps
}
