//! The fleet's side of the node boundary: nodes join with the fleet's join
//! token and then report (heartbeat) with their own credential.
//!
//! A node's credential is `hnc_<node id>_<HMAC-SHA256(join token, node id)>`:
//! every replica holding the join token computes it again, so no replica
//! stores it in plaintext (the store keeps its SHA-256 only) and any replica
//! can present it to the node (the node's API takes the same credential).
//!
//! Both answers carry the fencing list: the VMs a node reports that the
//! store does not have live on it, which the node destroys at once.

use crate::{ApiError, AppState, body};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use hearth_core::Error;
use hearth_core::ids::{NodeId, VmId};
use hearth_store::{
    AgentPhase, AgentUpdate, NodeCapacity, NodeRecord, NodeState, Store, StoreError, VmRecord,
    VmState,
};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What the fleet routes need beside the store and the pool.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// The fleet's join token: what a joining node presents, and the key
    /// every node credential is derived from (the same on every replica).
    pub join_token: Arc<String>,
    /// The name of this server's embedded node, if it runs one: VMs
    /// recorded without a node are its.
    pub local_node: Option<String>,
}

/// The credential of `node` under the fleet's `join_token`.
pub fn node_credential(join_token: &str, node: NodeId) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(join_token.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"hearth node credential v1\0");
    mac.update(node.to_string().as_bytes());
    format!("hnc_{node}_{}", hex::encode(mac.finalize().into_bytes()))
}

/// SHA-256 (hex) of a credential: what the store keeps.
pub fn credential_hash(credential: &str) -> String {
    hex::encode(Sha256::digest(credential.as_bytes()))
}

/// The node a credential names (not yet checked).
pub fn credential_node(credential: &str) -> Option<NodeId> {
    let rest = credential.strip_prefix("hnc_")?;
    let (id, mac) = rest.rsplit_once('_')?;
    (mac.len() == 64).then_some(())?;
    id.parse().ok()
}

/// Constant-time equality of two secrets of any length (their digests).
pub fn secret_eq(a: &str, b: &str) -> bool {
    bool::from(
        Sha256::digest(a.as_bytes())
            .as_slice()
            .ct_eq(Sha256::digest(b.as_bytes()).as_slice()),
    )
}

/// What a node offers, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// The drivers it runs: `sandbox`, `qemu`, `fake`.
    pub drivers: Vec<String>,
    pub cpus: i64,
    pub memory_mib: i64,
    pub disk_mib: i64,
    /// The most VMs it runs at once.
    pub vm_slots: i64,
    /// The most VMs booting on it at once.
    pub max_boots: i64,
}

impl Capacity {
    fn check(&self) -> Result<NodeCapacity, Error> {
        for d in &self.drivers {
            if !matches!(d.as_str(), "sandbox" | "qemu" | "fake") {
                return Err(Error::invalid(format!(
                    "invalid request: capacity.drivers: unknown driver {d:?} (sandbox, qemu or fake)"
                )));
            }
        }
        for (field, value) in [
            ("cpus", self.cpus),
            ("memory_mib", self.memory_mib),
            ("disk_mib", self.disk_mib),
            ("vm_slots", self.vm_slots),
            ("max_boots", self.max_boots),
        ] {
            if value < 0 {
                return Err(Error::invalid(format!(
                    "invalid request: capacity.{field}: {value} is negative"
                )));
            }
        }
        Ok(NodeCapacity {
            drivers: self.drivers.clone(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            vm_slots: self.vm_slots,
            max_boots: self.max_boots,
        })
    }
}

/// A node asks to join (or join again under its name).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The fleet's join token.
    pub join_token: String,
    /// The node's name (unique in the fleet; joining again under it keeps
    /// the node's id and state).
    pub name: String,
    /// Where the control plane reaches the node: `https://host:port`.
    pub address: String,
    /// The CA the node's certificate is issued by (PEM).
    pub ca_pem: String,
    pub capacity: Capacity,
    /// Every VM the node runs now.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub vms: Vec<VmId>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinAnswer {
    #[schema(value_type = String)]
    pub node_id: NodeId,
    /// The node's credential: it sends it on every heartbeat, and takes
    /// only it on its own API.
    pub credential: String,
    /// How often to report.
    pub heartbeat_ms: u64,
    /// A node that could not report for this long destroys every VM it runs.
    pub lost_after_ms: u64,
    /// VMs to destroy at once: the store does not want them on this node.
    #[schema(value_type = Vec<String>)]
    pub destroy: Vec<VmId>,
}

/// A node reports.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub capacity: Capacity,
    /// Every VM the node runs now.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub vms: Vec<VmId>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatAnswer {
    /// VMs to destroy at once: the store does not want them on this node.
    #[schema(value_type = Vec<String>)]
    pub destroy: Vec<VmId>,
    pub heartbeat_ms: u64,
    pub lost_after_ms: u64,
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/fleet/join", post(join))
        .route("/v1/fleet/heartbeat", post(heartbeat))
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid request: name: {name:?} is not a node name (1 to 253 letters, digits, '.', '-' or '_')"
        )))
    }
}

fn check_address(address: &str) -> Result<(), Error> {
    let rest = address.strip_prefix("https://").ok_or_else(|| {
        Error::invalid(format!(
            "invalid request: address: {address:?} must be https://host:port (the node serves TLS only)"
        ))
    })?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let good = !authority.is_empty()
        && !authority.contains('/')
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
    if good {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid request: address: {address:?} must be https://host:port"
        )))
    }
}

/// Joins a node with the fleet's join token: records it (again), closes
/// the records of VMs it no longer runs and answers its credential and the
/// VMs it must destroy.
#[utoipa::path(post, path = "/v1/fleet/join", tag = "fleet", operation_id = "join_node", request_body = JoinRequest,
    responses((status = 200, body = JoinAnswer), (status = 400, body = hearth_core::Error),
              (status = 401, description = "The join token is wrong", body = hearth_core::Error)))]
pub async fn join(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<JoinAnswer>, ApiError> {
    let request: JoinRequest = body::json(body)?;
    let fleet = &state.fleet;
    if !secret_eq(&request.join_token, &fleet.join_token) {
        tracing::warn!(node = %request.name, "a node presented a wrong join token");
        return Err(Error::unauthenticated("the join token is wrong").into());
    }
    check_name(&request.name)?;
    check_address(&request.address)?;
    if !request.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Error::invalid("invalid request: ca_pem: not a PEM certificate").into());
    }
    let capacity = request.capacity.check()?;
    let store = &state.store;
    let mut id = store
        .list_nodes()
        .await?
        .into_iter()
        .find(|n| n.name == request.name)
        .map(|n| n.id)
        .unwrap_or_default();
    let now = hearth_store::now_millis();
    // Twice at most: a concurrent first join under the same name keeps the
    // other id, whose credential is then the one to record.
    let mut node = None;
    for _ in 0..2 {
        let record = NodeRecord {
            id,
            name: request.name.clone(),
            address: request.address.trim_end_matches('/').to_owned(),
            ca_pem: request.ca_pem.clone(),
            credential_hash: credential_hash(&node_credential(&fleet.join_token, id)),
            state: NodeState::Ready,
            capacity: capacity.clone(),
            joined_at: now,
            last_heartbeat: now,
            updated_at: now,
        };
        let stored = store.join_node(&record).await?;
        if stored.id == id {
            node = Some(stored);
            break;
        }
        id = stored.id;
    }
    let node = node.ok_or_else(|| Error::internal("the node's id changed twice while joining"))?;
    let reported: HashSet<VmId> = request.vms.iter().copied().collect();
    let live = live_on(store.as_ref(), fleet, &node).await?;
    let reason = format!("the VM was gone when node {} joined again", node.name);
    let mut closed = 0;
    for vm in &live {
        if !reported.contains(&vm.id) && vm.state != VmState::Booting {
            close_gone(store.as_ref(), vm, &reason).await?;
            closed += 1;
        }
    }
    let destroy = fencing(&live, &request.vms);
    tracing::info!(node = %node.name, id = %node.id, address = %node.address, reported = reported.len(),
        closed, destroy = destroy.len(), "node joined");
    state.pool.wake();
    let timings = state.pool.options().fleet;
    Ok(Json(JoinAnswer {
        node_id: node.id,
        credential: node_credential(&fleet.join_token, node.id),
        heartbeat_ms: timings.heartbeat.as_millis() as u64,
        lost_after_ms: timings.lost_after.as_millis() as u64,
        destroy,
    }))
}

/// A node reports its capacity and the VMs it runs; answers the VMs it
/// must destroy.
#[utoipa::path(post, path = "/v1/fleet/heartbeat", tag = "fleet", operation_id = "node_heartbeat", request_body = HeartbeatRequest,
    security(("node" = [])),
    responses((status = 200, body = HeartbeatAnswer), (status = 400, body = hearth_core::Error),
              (status = 401, description = "Not a node's credential", body = hearth_core::Error),
              (status = 404, description = "The node is not in the store: join again", body = hearth_core::Error)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<HeartbeatAnswer>, ApiError> {
    let credential = crate::auth::bearer(&headers)
        .map(str::to_owned)
        .ok_or_else(|| Error::unauthenticated("missing bearer node credential"))?;
    let id = credential_node(&credential)
        .ok_or_else(|| Error::unauthenticated("malformed node credential"))?;
    let before = match state.store.get_node(id).await {
        Ok(node) => node,
        Err(StoreError::NotFound(_)) => {
            return Err(Error::not_found(format!("node {id} has not joined: join again")).into());
        }
        Err(e) => return Err(e.into()),
    };
    let presented = credential_hash(&credential);
    if !bool::from(
        presented
            .as_bytes()
            .ct_eq(before.credential_hash.as_bytes()),
    ) {
        return Err(Error::unauthenticated("unknown node credential").into());
    }
    let request: HeartbeatRequest = body::json(body)?;
    let capacity = request.capacity.check()?;
    let timings = state.pool.options().fleet;
    let node = state.store.node_heartbeat(id, &capacity).await?;
    let live = live_on(state.store.as_ref(), &state.fleet, &node).await?;
    let destroy = fencing(&live, &request.vms);
    let came_back =
        node.last_heartbeat - before.last_heartbeat > timings.node_timeout.as_millis() as i64;
    if before.capacity != capacity || !destroy.is_empty() || came_back {
        state.pool.wake();
    }
    if !destroy.is_empty() {
        tracing::warn!(node = %node.name, vms = ?destroy, "fencing: the node runs VMs the store does not want on it");
    }
    Ok(Json(HeartbeatAnswer {
        destroy,
        heartbeat_ms: timings.heartbeat.as_millis() as u64,
        lost_after_ms: timings.lost_after.as_millis() as u64,
    }))
}

/// The live VM records of `node`: those placed on it and, on the server's
/// embedded node (or a fleet's only node), those recorded without a node.
async fn live_on(
    store: &dyn Store,
    fleet: &FleetConfig,
    node: &NodeRecord,
) -> Result<Vec<VmRecord>, StoreError> {
    let mut live = store.list_node_vms(node.id).await?;
    if default_node(store, fleet).await? == Some(node.id) {
        live.extend(
            store
                .list_live_vms()
                .await?
                .into_iter()
                .filter(|v| v.node_id.is_none()),
        );
    }
    Ok(live)
}

/// The node that runs VMs recorded without one: the server's embedded
/// node, or else the fleet's only node.
pub async fn default_node(
    store: &dyn Store,
    fleet: &FleetConfig,
) -> Result<Option<NodeId>, StoreError> {
    let nodes = store.list_nodes().await?;
    Ok(match &fleet.local_node {
        Some(name) => nodes.iter().find(|n| &n.name == name).map(|n| n.id),
        None if nodes.len() == 1 => Some(nodes[0].id),
        None => None,
    })
}

/// The reported VMs that are not live on the node in the store.
fn fencing(live: &[VmRecord], reported: &[VmId]) -> Vec<VmId> {
    let live: HashSet<VmId> = live.iter().map(|v| v.id).collect();
    let mut seen = HashSet::new();
    reported
        .iter()
        .filter(|id| !live.contains(id) && seen.insert(**id))
        .copied()
        .collect()
}

/// Closes the record of a VM its node no longer runs; its agent fails with
/// `reason` (an agent still waiting on its cold boot waits again).
async fn close_gone(store: &dyn Store, vm: &VmRecord, reason: &str) -> Result<(), StoreError> {
    if !store
        .set_vm_state(vm.id, VmState::LIVE, VmState::Draining, None)
        .await?
    {
        return Ok(());
    }
    store
        .set_vm_state(
            vm.id,
            &[VmState::Draining],
            VmState::Destroyed,
            Some(reason),
        )
        .await?;
    tracing::warn!(vm = %vm.id, state = %vm.state.as_str(), %reason, "closed the record of a VM its node no longer runs");
    if vm.state == VmState::Assigned
        && let Some(agent) = vm.agent_id
    {
        let update = AgentUpdate {
            error: Some(format!("its VM was lost: {reason}")),
            ..Default::default()
        };
        let _ = store
            .transition_agent(
                vm.tenant_id,
                agent,
                &[AgentPhase::Running, AgentPhase::Idle],
                AgentPhase::Failed,
                &update,
            )
            .await;
    } else if let Some(agent) = vm.reserved_for {
        let _ = store
            .transition_agent(
                vm.tenant_id,
                agent,
                &[AgentPhase::Provisioning],
                AgentPhase::Queued,
                &AgentUpdate::default(),
            )
            .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_per_node_and_per_key() {
        let a = NodeId::new();
        let b = NodeId::new();
        let ca = node_credential("k1", a);
        assert_eq!(ca, node_credential("k1", a), "any replica derives the same");
        assert_ne!(ca, node_credential("k1", b));
        assert_ne!(ca, node_credential("k2", a));
        assert_eq!(credential_node(&ca), Some(a));
        assert_eq!(credential_node("hnc_nonsense"), None);
        assert_eq!(credential_hash(&ca).len(), 64);
        assert!(secret_eq("x", "x") && !secret_eq("x", "y"));
    }

    #[test]
    fn bad_names_and_addresses_are_named() {
        assert!(check_name("node-1.example").is_ok());
        let e = check_name("a b").unwrap_err();
        assert!(
            e.message.contains("\"a b\" is not a node name"),
            "{}",
            e.message
        );
        assert!(check_address("https://10.0.0.2:7071").is_ok());
        assert!(check_address("https://[::1]:7071/").is_ok());
        let e = check_address("http://10.0.0.2:7071").unwrap_err();
        assert!(e.message.contains("must be https://"), "{}", e.message);
        assert!(check_address("https://h:1/x").is_err());
    }
}
