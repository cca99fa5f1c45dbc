//! hearth's reconcilers: the pool (backfill, scale down, idle timeout,
//! stale replacement, claims for queued agents, returns), the agents'
//! commands, the reaper of stranded workflows, and the status of each
//! reconcile pass ([`pass`]).
//!
//! The shape follows Coder's prebuilds and Oxide's background tasks: the
//! arithmetic is a pure [`plan::plan`] from a snapshot to actions; the
//! [`Pool`] runner reads the snapshot, executes the actions, and is woken by
//! changes (spawn, finish, every API write the planner reads, VM events)
//! and at the earliest deadline a pass reported ([`plan::plan_with_deadline`],
//! [`reaper::Finding::next_reap_at`]); the slow resync is only a safety net.
//!
//! **Architecture Invariants:**
//! - the runner never holds a store transaction across a driver call: every
//!   store write is its own short transaction (compare-and-set), and driver
//!   calls happen between them;
//! - a VM record exists (`booting`) before the driver creates the VM, and is
//!   only marked `destroyed` after the driver destroyed it, so a crash at any
//!   point leaks nothing the next start cannot find — but for VMs of an
//!   unreachable node, whose records are closed with no driver call: the
//!   node destroys them itself (fencing) when it reports again;
//! - reconcile passes are idempotent: running one twice in a row does
//!   nothing the first did not;
//! - the API talks to drivers only through this crate;
//! - an agent's command runs as a job in its VM (`agent-<id>-<resurrections>`),
//!   never on a connection of this process: no agent is failed because the
//!   control plane restarted. Adoption (and any takeover) re-attaches with
//!   [`Pool::agent_started`]; a broken attach is retried from the bytes
//!   received while the agent runs on a VM that exists.

pub mod images;
pub mod pass;

pub mod metrics;
pub mod placement;
pub mod plan;
pub mod publish;
pub mod reaper;
mod runner;
pub mod status;

pub use runner::{
    AdoptReport, FleetTimings, Pool, PoolError, PoolOptions, TakeoverReport, agent_job,
};
