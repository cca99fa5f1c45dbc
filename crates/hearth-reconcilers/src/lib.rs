//! hearth's reconcilers: the pool (backfill, scale down, idle timeout,
//! stale replacement), agents and the reaper of stranded workflows.
//!
//! Empty until the pool issue: the control plane core only stores desired
//! state. **Invariant (binding when it fills):** a reconciler is a pure
//! `plan(snapshot, now) -> actions` plus a runner; it never holds a store
//! transaction across a driver call and never talks to the API.
