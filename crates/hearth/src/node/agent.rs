//! The node's loop: join (with back-off, each server in turn), heartbeat
//! with the capacity and the VMs it really runs, destroy what an answer
//! lists, join again when the server forgot the node, and fence itself —
//! destroy every VM — when no heartbeat succeeded for `lost_after` (by
//! then the store has given those VMs away).

use super::service::NodeState;
use hearth_api::fleet::{Capacity, HeartbeatAnswer, HeartbeatRequest, JoinAnswer, JoinRequest};
use hearth_core::ids::VmId;
use hearth_drivers::Drivers;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Who the node is, as it joins.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub address: String,
    pub ca_pem: String,
    pub join_token: String,
    pub capacity: Capacity,
}

/// How the node reaches the control plane.
pub enum Link {
    /// Over HTTPS to each server in turn (`hearth node`).
    Http {
        client: reqwest::Client,
        servers: Vec<String>,
    },
    /// The server's own router, in-process (the embedded node of `hearth
    /// server`: the same handlers and JSON, no network hop, whatever
    /// certificate the server's listener presents).
    InProcess(axum::Router),
}

/// The server last answered, tried first next time.
static PREFERRED: AtomicUsize = AtomicUsize::new(0);

impl Link {
    /// POSTs JSON; returns the status and body of the first server that
    /// answers with anything but a 5xx.
    async fn post<T: serde::Serialize>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &T,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), String> {
        match self {
            Link::Http { client, servers } => {
                let mut last = String::from("no --server given");
                let first = PREFERRED.load(Ordering::Relaxed);
                for i in 0..servers.len() {
                    let index = (first + i) % servers.len();
                    let url = format!("{}{path}", servers[index].trim_end_matches('/'));
                    let mut request = client.post(&url).timeout(timeout).json(body);
                    if let Some(bearer) = bearer {
                        request = request.bearer_auth(bearer);
                    }
                    match request.send().await {
                        Ok(answer) if answer.status().is_server_error() => {
                            last = format!("{url}: HTTP {}", answer.status());
                        }
                        Ok(answer) => {
                            PREFERRED.store(index, Ordering::Relaxed);
                            let status = answer.status().as_u16();
                            let bytes = answer.bytes().await.map_err(|e| format!("{url}: {e}"))?;
                            return Ok((status, bytes.to_vec()));
                        }
                        Err(e) => last = format!("{url}: {}", hearth_api::error::chain(&e)),
                    }
                }
                Err(last)
            }
            Link::InProcess(router) => {
                use tower::ServiceExt;
                let mut request = axum::http::Request::post(path)
                    .header(axum::http::header::CONTENT_TYPE, "application/json");
                if let Some(bearer) = bearer {
                    request = request.header(
                        axum::http::header::AUTHORIZATION,
                        format!("Bearer {bearer}"),
                    );
                }
                let request = request
                    .body(axum::body::Body::from(
                        serde_json::to_vec(body).map_err(|e| e.to_string())?,
                    ))
                    .map_err(|e| e.to_string())?;
                let answer = tokio::time::timeout(timeout, router.clone().oneshot(request))
                    .await
                    .map_err(|_| "the server did not answer in time".to_owned())?
                    .map_err(|e| e.to_string())?;
                let status = answer.status().as_u16();
                let bytes = axum::body::to_bytes(answer.into_body(), 1 << 24)
                    .await
                    .map_err(|e| e.to_string())?;
                if status >= 500 {
                    return Err(format!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&bytes)
                    ));
                }
                Ok((status, bytes.to_vec()))
            }
        }
    }
}

/// Every VM the node's drivers run; an error when one cannot tell (a join
/// must not report a VM missing that merely was not listed).
async fn list_all(drivers: &Drivers) -> Result<Vec<VmId>, String> {
    let mut ids = Vec::new();
    for driver in drivers.all() {
        let vms = driver
            .list()
            .await
            .map_err(|e| format!("the {:?} driver cannot list its VMs: {e}", driver.kind()))?;
        ids.extend(vms.into_iter().map(|v| v.id));
    }
    Ok(ids)
}

/// Destroys `ids` on whichever driver runs them.
async fn destroy(drivers: &Drivers, ids: &[VmId], why: &str) {
    if ids.is_empty() {
        return;
    }
    for driver in drivers.all() {
        let Ok(vms) = driver.list().await else {
            continue;
        };
        for vm in vms.into_iter().filter(|v| ids.contains(&v.id)) {
            match driver.destroy(vm.id).await {
                Ok(()) => tracing::warn!(vm = %vm.id, reason = why, "destroyed a VM"),
                Err(e) => tracing::error!(vm = %vm.id, error = %e, "cannot destroy a VM"),
            }
        }
    }
}

/// Runs until `stop`: joins, then heartbeats. `joined` is told after the
/// first join succeeded.
pub async fn run(
    config: AgentConfig,
    link: Link,
    state: Arc<NodeState>,
    drivers: Drivers,
    mut joined: Option<oneshot::Sender<()>>,
    mut stop: watch::Receiver<bool>,
) {
    // Known once a server answered: how long the node may go without a
    // heartbeat before it fences itself.
    let mut lost_after: Option<Duration> = None;
    let mut last_ok = Instant::now();
    let mut fenced = false;
    loop {
        // Join, retrying with back-off until a server answers.
        let mut backoff = Duration::from_millis(100);
        let answer: JoinAnswer = loop {
            if *stop.borrow() {
                return;
            }
            if let Some(lost) = lost_after
                && !fenced
                && last_ok.elapsed() >= lost
            {
                self_fence(&drivers, lost).await;
                fenced = true;
            }
            match join(&config, &link, &drivers).await {
                Ok(answer) => break answer,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot join the control plane")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        };
        state.set_credential(&answer.credential);
        tracing::info!(node = %config.name, id = %answer.node_id, destroy = answer.destroy.len(), "joined the control plane");
        destroy(
            &drivers,
            &answer.destroy,
            "the store does not want it on this node",
        )
        .await;
        if let Some(tx) = joined.take() {
            let _ = tx.send(());
        }
        let mut heartbeat = Duration::from_millis(answer.heartbeat_ms.max(50));
        let mut lost = Duration::from_millis(answer.lost_after_ms.max(100));
        lost_after = Some(lost);
        last_ok = Instant::now();
        fenced = false;
        // Heartbeats until the server forgets the node or it fences itself.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(heartbeat) => {}
                _ = stop.changed() => return,
            }
            if last_ok.elapsed() >= lost {
                self_fence(&drivers, lost).await;
                fenced = true;
                break;
            }
            let vms = match list_all(&drivers).await {
                Ok(vms) => vms,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a heartbeat");
                    continue;
                }
            };
            let request = HeartbeatRequest {
                capacity: config.capacity.clone(),
                vms,
            };
            let timeout = (heartbeat * 3).max(Duration::from_secs(1)).min(lost / 2);
            let credential = answer.credential.as_str();
            // A heartbeat proves the node was alive when it was sent (an
            // answer read after a long stop proves nothing newer).
            let sent = Instant::now();
            match link
                .post("/v1/fleet/heartbeat", Some(credential), &request, timeout)
                .await
            {
                Ok((200, body)) => match serde_json::from_slice::<HeartbeatAnswer>(&body) {
                    Ok(beat) => {
                        last_ok = sent;
                        heartbeat = Duration::from_millis(beat.heartbeat_ms.max(50));
                        lost = Duration::from_millis(beat.lost_after_ms.max(100));
                        lost_after = Some(lost);
                        destroy(
                            &drivers,
                            &beat.destroy,
                            "fencing: the store does not want it on this node",
                        )
                        .await;
                    }
                    Err(e) => tracing::warn!(error = %e, "a bad heartbeat answer"),
                },
                Ok((401 | 404, body)) => {
                    tracing::warn!(answer = %String::from_utf8_lossy(&body), "the control plane does not know this node: joining again");
                    break;
                }
                Ok((status, body)) => {
                    tracing::warn!(status, answer = %String::from_utf8_lossy(&body), "heartbeat refused")
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }
}

async fn join(config: &AgentConfig, link: &Link, drivers: &Drivers) -> Result<JoinAnswer, String> {
    let request = JoinRequest {
        join_token: config.join_token.clone(),
        name: config.name.clone(),
        address: config.address.clone(),
        ca_pem: config.ca_pem.clone(),
        capacity: config.capacity.clone(),
        vms: list_all(drivers).await?,
    };
    let (status, body) = link
        .post("/v1/fleet/join", None, &request, Duration::from_secs(30))
        .await?;
    if status != 200 {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("a bad join answer: {e}"))
}

/// No heartbeat succeeded for `lost`: the store has given this node's VMs
/// away, so none of them may run on.
async fn self_fence(drivers: &Drivers, lost: Duration) {
    let mut destroyed = 0;
    for driver in drivers.all() {
        let Ok(vms) = driver.list().await else {
            continue;
        };
        for vm in vms {
            match driver.destroy(vm.id).await {
                Ok(()) => destroyed += 1,
                Err(e) => {
                    tracing::error!(vm = %vm.id, error = %e, "self-fence: cannot destroy a VM")
                }
            }
        }
    }
    tracing::warn!(destroyed, lost_after = ?lost, "self-fence: no heartbeat succeeded for lost_after, destroyed every VM of this node");
}
