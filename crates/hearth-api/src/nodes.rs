//! The fleet's nodes as operators see them (`GET /v1/nodes`, cordon,
//! uncordon, drain) and the artifacts nodes fetch by digest
//! (`GET /v1/fleet/artifacts/{digest}`).
//!
//! **Invariants:**
//! - Nodes serve every tenant, so reading or changing them is operators'
//!   (`node.read`, `node.manage`); no answer carries a node's credential
//!   hash or anything else secret.
//! - Reachability is computed, never stored: a node is reachable while its
//!   last heartbeat (the store's clock) is within the fleet's
//!   `node_timeout`.
//! - Artifacts are served only to a node presenting its own credential
//!   ([`authenticate_node`]), streamed from the store chunk by chunk (never
//!   whole in memory), and only once whole (the store's marker row).

use crate::auth::Caller;
use crate::{ApiError, AppState};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_core::Error;
use hearth_core::ids::NodeId;
use hearth_core::rbac::Permission;
use hearth_store::{NodeRecord, NodeState, NodeUsage, StoreError, is_artifact_digest, now_millis};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header a node names itself with (its id) next to its credential.
pub const NODE_HEADER: &str = "x-hearth-node";

/// A node's capacity, as it last reported it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeCapacityView {
    /// The drivers it runs (sandbox, qemu, fake).
    pub drivers: Vec<String>,
    pub cpus: i64,
    pub memory_mib: i64,
    pub disk_mib: i64,
    /// The most VMs it runs at once.
    pub vm_slots: i64,
    /// The most VMs booting on it at once.
    pub max_boots: i64,
}

/// What the live VMs placed on a node take of it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeUsageView {
    /// Live VMs.
    pub vms: i64,
    /// Of which booting or provisioning.
    pub booting: i64,
    pub cpus: i64,
    pub memory_mib: i64,
}

/// One node.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    pub name: String,
    pub id: String,
    /// Where the control plane reaches it (`https://host:port`).
    pub address: String,
    /// `ready`, `cordoned` (takes no new VMs) or `draining` (takes no new
    /// VMs; its idle VMs are replaced elsewhere).
    pub state: String,
    /// Its last heartbeat is within the fleet's node timeout.
    pub reachable: bool,
    /// RFC 3339.
    pub last_heartbeat: String,
    /// RFC 3339.
    pub joined_at: String,
    pub capacity: NodeCapacityView,
    pub usage: NodeUsageView,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeList {
    pub items: Vec<NodeView>,
}

fn view(node: &NodeRecord, usage: &[NodeUsage], state: &AppState, now: i64) -> NodeView {
    let timeout = state.pool.options().fleet.node_timeout.as_millis() as i64;
    let usage = usage
        .iter()
        .find(|u| u.node == Some(node.id))
        .map(|u| NodeUsageView {
            vms: u.vms,
            booting: u.booting,
            cpus: u.cpus,
            memory_mib: u.memory_mib,
        })
        .unwrap_or_default();
    NodeView {
        name: node.name.clone(),
        id: node.id.to_string(),
        address: node.address.clone(),
        state: node.state.as_str().to_owned(),
        reachable: now - node.last_heartbeat <= timeout,
        last_heartbeat: crate::tenants::rfc3339(node.last_heartbeat),
        joined_at: crate::tenants::rfc3339(node.joined_at),
        capacity: NodeCapacityView {
            drivers: node.capacity.drivers.clone(),
            cpus: node.capacity.cpus,
            memory_mib: node.capacity.memory_mib,
            disk_mib: node.capacity.disk_mib,
            vm_slots: node.capacity.vm_slots,
            max_boots: node.capacity.max_boots,
        },
        usage,
    }
}

fn no_node(name: &str) -> ApiError {
    Error::not_found(format!("node {name:?} not found")).into()
}

/// Every node of the fleet, by name, with its reachability and usage.
#[utoipa::path(get, path = "/v1/nodes", tag = "node", operation_id = "list_nodes", security(("bearer" = [])),
    responses((status = 200, body = NodeList), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<NodeList>, ApiError> {
    caller.require(Permission::NodeRead)?;
    let nodes = state.store.list_nodes().await?;
    let usage = state.store.node_usage().await?;
    let now = now_millis();
    Ok(Json(NodeList {
        items: nodes.iter().map(|n| view(n, &usage, &state, now)).collect(),
    }))
}

/// One node by name.
#[utoipa::path(get, path = "/v1/nodes/{node}", tag = "node", operation_id = "get_node", security(("bearer" = [])),
    params(("node" = String, Path, description = "Node name")),
    responses((status = 200, body = NodeView), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error),
              (status = 404, body = hearth_core::Error)))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    caller.require(Permission::NodeRead)?;
    let node = state
        .store
        .list_nodes()
        .await?
        .into_iter()
        .find(|n| n.name == name)
        .ok_or_else(|| no_node(&name))?;
    let usage = state.store.node_usage().await?;
    Ok(Json(view(&node, &usage, &state, now_millis())))
}

async fn set_state(
    state: &AppState,
    caller: &Caller,
    name: &str,
    to: NodeState,
) -> Result<Json<NodeView>, ApiError> {
    caller.require(Permission::NodeManage)?;
    let node = match state.store.set_node_state(name, to).await {
        Ok(node) => node,
        Err(StoreError::NotFound(_)) => return Err(no_node(name)),
        Err(e) => return Err(e.into()),
    };
    tracing::warn!(identity = %caller.identity.name, node = %name, state = %to, "node state set");
    // The planner places and drains by the node's state: a pass now.
    state.pool.wake();
    let usage = state.store.node_usage().await?;
    Ok(Json(view(&node, &usage, state, now_millis())))
}

/// Cordons a node: it takes no new VMs and keeps those it runs.
#[utoipa::path(post, path = "/v1/nodes/{node}/cordon", tag = "node", operation_id = "cordon_node", security(("bearer" = [])),
    params(("node" = String, Path, description = "Node name")),
    responses((status = 200, body = NodeView), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error),
              (status = 404, body = hearth_core::Error)))]
pub async fn cordon(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    set_state(&state, &caller, &name, NodeState::Cordoned).await
}

/// Makes a node ready again: it takes new VMs.
#[utoipa::path(post, path = "/v1/nodes/{node}/uncordon", tag = "node", operation_id = "uncordon_node", security(("bearer" = [])),
    params(("node" = String, Path, description = "Node name")),
    responses((status = 200, body = NodeView), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error),
              (status = 404, body = hearth_core::Error)))]
pub async fn uncordon(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    set_state(&state, &caller, &name, NodeState::Ready).await
}

/// Drains a node: it takes no new VMs and its idle VMs are replaced
/// elsewhere; assigned VMs stay until their agents give them back.
#[utoipa::path(post, path = "/v1/nodes/{node}/drain", tag = "node", operation_id = "drain_node", security(("bearer" = [])),
    params(("node" = String, Path, description = "Node name")),
    responses((status = 200, body = NodeView), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error),
              (status = 404, body = hearth_core::Error)))]
pub async fn drain(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    set_state(&state, &caller, &name, NodeState::Draining).await
}

/// The node behind a request from a node: `X-Hearth-Node: <node id>` and
/// `Authorization: Bearer <credential>`, whose SHA-256 must be the node's
/// `credential_hash` (compared in constant time). Every failure is the same
/// `UNAUTHENTICATED` answer, so a caller learns nothing of which nodes exist.
pub async fn authenticate_node(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<NodeRecord, ApiError> {
    let refused = || ApiError::from(Error::unauthenticated("unknown node credential"));
    let id = headers
        .get(NODE_HEADER)
        .ok_or_else(|| {
            Error::unauthenticated("missing X-Hearth-Node header: a node names itself by its id")
        })?
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<NodeId>().ok())
        .ok_or_else(refused)?;
    if !headers.contains_key(header::AUTHORIZATION) {
        return Err(Error::unauthenticated("missing bearer credential").into());
    }
    let credential = crate::auth::bearer(headers)
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::unauthenticated("the Authorization header must be `Bearer <credential>`")
        })?;
    let node = match state.store.get_node(id).await {
        Ok(node) => node,
        Err(StoreError::NotFound(_)) => return Err(refused()),
        Err(e) => return Err(e.into()),
    };
    let presented = Sha256::digest(credential.as_bytes());
    let stored = hex::decode(&node.credential_hash).map_err(|_| refused())?;
    if stored.len() != presented.len() || !bool::from(presented.as_slice().ct_eq(&stored)) {
        return Err(refused());
    }
    Ok(node)
}

/// An artifact (a kernel, initrd, disk or rootfs tar) by its SHA-256, for
/// nodes only: streamed from the store, whichever replica answers.
#[utoipa::path(get, path = "/v1/fleet/artifacts/{digest}", tag = "fleet", operation_id = "get_artifact",
    params(("digest" = String, Path, description = "SHA-256 of the artifact, 64 lower-case hex characters"),
           ("X-Hearth-Node" = String, Header, description = "The node's id")),
    responses((status = 200, description = "The artifact's bytes", content_type = "application/octet-stream"),
              (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error),
              (status = 404, body = hearth_core::Error)))]
pub async fn artifact(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let node = authenticate_node(&state, &headers).await?;
    if !is_artifact_digest(&digest) {
        return Err(Error::invalid(format!(
            "digest {digest:?} is not a SHA-256 (64 lower-case hex characters)"
        ))
        .into());
    }
    let artifact =
        state.store.get_artifact(&digest).await?.ok_or_else(|| {
            ApiError::from(Error::not_found(format!("artifact {digest} not found")))
        })?;
    tracing::info!(node = %node.name, digest = %digest, size = artifact.size, "artifact served");
    let store = state.store.clone();
    let chunks = artifact.chunks;
    // One chunk read per poll: the body holds at most one chunk in memory.
    let stream = futures_util::stream::unfold(0i64, move |seq| {
        let store = store.clone();
        let digest = digest.clone();
        async move {
            if seq >= chunks {
                return None;
            }
            let chunk = store
                .read_artifact_chunk(&digest, seq)
                .await
                .map(axum::body::Bytes::from)
                .map_err(std::io::Error::other);
            Some((chunk, seq + 1))
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, artifact.size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/nodes", get(list))
        .route("/v1/nodes/{node}", get(get_one))
        .route("/v1/nodes/{node}/cordon", post(cordon))
        .route("/v1/nodes/{node}/uncordon", post(uncordon))
        .route("/v1/nodes/{node}/drain", post(drain))
        .route("/v1/fleet/artifacts/{digest}", get(artifact))
}
