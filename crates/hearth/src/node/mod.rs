//! The node agent's parts (`hearth node`).

// Called by the node service once it serves drivers (at merge); until then
// only its tests reach it.
#[allow(dead_code)]
pub mod artifacts;
