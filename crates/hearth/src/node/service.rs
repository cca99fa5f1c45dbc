//! The node's API: every `Driver` method of every driver the node runs,
//! over HTTPS, for the holder of the node's credential only.
//!
//! Routes (`{kind}`: sandbox, qemu, fake):
//! - `GET /v1/node/{kind}/vms` → `[ObservedVm]`; `POST /v1/node/{kind}/vms`
//!   (`VmSpec`) creates; `DELETE /v1/node/{kind}/vms/{id}` destroys;
//! - `POST …/vms/{id}/exec` (`ExecRequest`) and `GET …/vms/{id}/jobs/{job}?offset=`
//!   stream NDJSON: `{"chunk": OutputChunk}` lines, then `{"result": ExecResult}`
//!   or `{"error": {kind, message}}`;
//! - `PUT …/vms/{id}/files` (`{path, contents (base64), mode}`),
//!   `GET …/vms/{id}/health`, `POST …/vms/{id}/seal`, `POST …/vms/{id}/reset`,
//!   `PUT …/vms/{id}/jobs/{job}` (`ExecRequest`).
//!
//! Every failure is `{kind, message}` with `kind` one of `not_found`,
//! `boot`, `guest`, `unsupported`, `io` (the `DriverError` variants) or
//! `unauthorized`, `invalid`.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use hearth_core::ids::VmId;
use hearth_core::resource::DriverKind;
use hearth_drivers::{Driver, DriverError, Drivers, ExecRequest, ExecResult, OutputChunk, VmSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

/// Largest request body (a file written into a VM, base64).
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// What the node's handlers share.
pub struct NodeState {
    pub drivers: Drivers,
    /// The node's credential, once a server gave it (until then every
    /// call is refused).
    credential: RwLock<Option<String>>,
    /// The servers artifacts are fetched from.
    pub servers: Vec<String>,
    /// The node's artifact cache.
    pub cache: PathBuf,
    /// The client artifacts are fetched with.
    pub http: reqwest::Client,
    /// The node runs inside the server's own process (the embedded node):
    /// the image store's files are on this very host, and the paths the
    /// server sends are used as they are. A node of its own takes no path
    /// from the control plane: it fetches every artifact by digest.
    pub shares_host: std::sync::atomic::AtomicBool,
}

impl NodeState {
    /// `http` reaches the servers for artifacts (trusting their CA).
    pub fn new(
        drivers: Drivers,
        servers: Vec<String>,
        cache: PathBuf,
        http: reqwest::Client,
    ) -> Arc<NodeState> {
        Arc::new(NodeState {
            drivers,
            credential: RwLock::new(None),
            servers,
            cache,
            http,
            shares_host: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Takes the credential a join answered.
    pub fn set_credential(&self, credential: &str) {
        *self.credential.write().expect("credential lock") = Some(credential.to_owned());
    }

    pub fn credential(&self) -> Option<String> {
        self.credential.read().expect("credential lock").clone()
    }

    fn accepts(&self, presented: &str) -> bool {
        match self.credential.read().expect("credential lock").as_deref() {
            Some(own) => bool::from(
                Sha256::digest(presented.as_bytes())
                    .as_slice()
                    .ct_eq(Sha256::digest(own.as_bytes()).as_slice()),
            ),
            None => false,
        }
    }
}

/// A failure as it crosses the boundary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireError {
    pub kind: String,
    pub message: String,
}

impl WireError {
    pub fn of(e: &DriverError) -> WireError {
        let kind = match e {
            DriverError::NotFound(_) => "not_found",
            DriverError::Boot(_) => "boot",
            DriverError::Guest(_) => "guest",
            DriverError::Unsupported(_) => "unsupported",
            DriverError::Job(_) => "job",
            DriverError::Io(_) => "io",
        };
        let message = match e {
            DriverError::Boot(m)
            | DriverError::Guest(m)
            | DriverError::Unsupported(m)
            | DriverError::Job(m) => m.clone(),
            other => other.to_string(),
        };
        WireError {
            kind: kind.into(),
            message,
        }
    }

    /// The same `DriverError` on the client (`vm`: the VM the call was for).
    pub fn into_driver_error(self, vm: Option<VmId>, node: &str) -> DriverError {
        match (self.kind.as_str(), vm) {
            ("not_found", Some(vm)) => DriverError::NotFound(vm),
            ("boot", _) => DriverError::Boot(self.message),
            ("guest", _) => DriverError::Guest(self.message),
            ("unsupported", _) => DriverError::Unsupported(self.message),
            ("job", _) => DriverError::Job(self.message),
            _ => DriverError::Io(std::io::Error::other(format!(
                "node {node}: {}: {}",
                self.kind, self.message
            ))),
        }
    }
}

struct Failure(StatusCode, WireError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<DriverError> for Failure {
    fn from(e: DriverError) -> Self {
        let status = match &e {
            DriverError::NotFound(_) => StatusCode::NOT_FOUND,
            DriverError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            DriverError::Boot(_) | DriverError::Guest(_) | DriverError::Job(_) => {
                StatusCode::BAD_GATEWAY
            }
            DriverError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, WireError::of(&e))
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure(
        StatusCode::BAD_REQUEST,
        WireError {
            kind: "invalid".into(),
            message: message.into(),
        },
    )
}

/// A file to write into a VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct WriteFile {
    pub path: String,
    /// Base64 (standard alphabet, padded).
    pub contents: String,
    pub mode: u32,
}

/// One line of a streamed answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamLine {
    Chunk(OutputChunk),
    Result(ExecResult),
    Error(WireError),
}

#[derive(Debug, Deserialize)]
struct Offset {
    #[serde(default)]
    offset: u64,
}

pub fn router(state: Arc<NodeState>) -> Router {
    let vm = "/v1/node/{kind}/vms/{id}";
    Router::new()
        .route("/v1/node/{kind}/vms", get(list).post(create))
        .route(vm, axum::routing::delete(destroy))
        .route(&format!("{vm}/exec"), post(exec))
        .route(&format!("{vm}/files"), put(write_file))
        .route(&format!("{vm}/health"), get(health))
        .route(&format!("{vm}/seal"), post(seal))
        .route(&format!("{vm}/reset"), post(reset))
        .route(
            &format!("{vm}/jobs/{{job}}"),
            put(start_job).get(attach_job),
        )
        .fallback(|| async {
            Failure(
                StatusCode::NOT_FOUND,
                WireError {
                    kind: "invalid".into(),
                    message: "no such node route".into(),
                },
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Every route: `Authorization: Bearer <the node's credential>`, else 401.
async fn authenticate(
    State(state): State<Arc<NodeState>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, c)| c.trim().to_owned());
    match presented {
        Some(c) if state.accepts(&c) => next.run(request).await,
        _ => {
            tracing::warn!(path = %request.uri().path(), "refused a node API call without the node's credential");
            Failure(
                StatusCode::UNAUTHORIZED,
                WireError {
                    kind: "unauthorized".into(),
                    message: "the node's credential is required".into(),
                },
            )
            .into_response()
        }
    }
}

fn driver(state: &NodeState, kind: &str) -> Result<Arc<dyn Driver>, Failure> {
    let kind: DriverKind = serde_json::from_value(serde_json::Value::String(kind.to_owned()))
        .map_err(|_| invalid(format!("unknown driver {kind:?}")))?;
    Ok(state.drivers.get(kind)?.clone())
}

fn vm_id(id: &str) -> Result<VmId, Failure> {
    id.parse()
        .map_err(|_| invalid(format!("{id:?} is not a VM id")))
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| invalid(format!("invalid request: {e}")))
}

async fn list(
    State(state): State<Arc<NodeState>>,
    Path(kind): Path<String>,
) -> Result<Response, Failure> {
    let vms = driver(&state, &kind)?.list().await?;
    Ok(Json(vms).into_response())
}

async fn create(
    State(state): State<Arc<NodeState>>,
    Path(kind): Path<String>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    let driver = driver(&state, &kind)?;
    let mut spec: VmSpec = parse(&body)?;
    let on_this_host = state.shares_host.load(std::sync::atomic::Ordering::Relaxed)
        && spec.image.digests.keys().all(|role| {
            let path = match role.as_str() {
                "root_dir" => &spec.image.root_dir,
                "kernel" => &spec.image.kernel,
                "initrd" => &spec.image.initrd,
                "disk" => &spec.image.disk,
                _ => &None,
            };
            path.as_ref().is_some_and(|p| p.exists())
        });
    if !spec.image.digests.is_empty() && !on_this_host {
        // Only what the digests name, fetched and checked here.
        spec.image.root_dir = None;
        spec.image.kernel = None;
        spec.image.initrd = None;
        spec.image.disk = None;
        let credential = state.credential().unwrap_or_default();
        // The credential reads `hnc_<node id>_<secret>`.
        let node_id = credential
            .strip_prefix("hnc_")
            .and_then(|rest| rest.split_once('_'))
            .map(|(id, _)| id.to_owned())
            .unwrap_or_default();
        spec.image = super::artifacts::materialize(
            &state.http,
            &state.servers,
            &credential,
            &node_id,
            &state.cache,
            &spec.image,
        )
        .await?;
    }
    driver.create(&spec).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn destroy(
    State(state): State<Arc<NodeState>>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<StatusCode, Failure> {
    driver(&state, &kind)?.destroy(vm_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn write_file(
    State(state): State<Arc<NodeState>>,
    Path((kind, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    let driver = driver(&state, &kind)?;
    let file: WriteFile = parse(&body)?;
    let contents = base64::engine::general_purpose::STANDARD
        .decode(&file.contents)
        .map_err(|e| invalid(format!("contents: not base64 ({e})")))?;
    driver
        .write_file(vm_id(&id)?, &file.path, &contents, file.mode)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn health(
    State(state): State<Arc<NodeState>>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<Response, Failure> {
    let health = driver(&state, &kind)?.health(vm_id(&id)?).await?;
    Ok(Json(health).into_response())
}

async fn seal(
    State(state): State<Arc<NodeState>>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<StatusCode, Failure> {
    driver(&state, &kind)?.seal(vm_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn reset(
    State(state): State<Arc<NodeState>>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<StatusCode, Failure> {
    driver(&state, &kind)?.reset(vm_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_job(
    State(state): State<Arc<NodeState>>,
    Path((kind, id, job)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    let driver = driver(&state, &kind)?;
    let request: ExecRequest = parse(&body)?;
    driver.start_job(vm_id(&id)?, &job, &request).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn exec(
    State(state): State<Arc<NodeState>>,
    Path((kind, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, Failure> {
    let driver = driver(&state, &kind)?;
    let id = vm_id(&id)?;
    let request: ExecRequest = parse(&body)?;
    Ok(stream(move |tx| async move {
        driver.exec(id, &request, Some(tx)).await
    }))
}

async fn attach_job(
    State(state): State<Arc<NodeState>>,
    Path((kind, id, job)): Path<(String, String, String)>,
    Query(offset): Query<Offset>,
) -> Result<Response, Failure> {
    let driver = driver(&state, &kind)?;
    let id = vm_id(&id)?;
    Ok(stream(move |tx| async move {
        driver.attach_job(id, &job, offset.offset, Some(tx)).await
    }))
}

/// Runs `call` with an output sender and streams NDJSON: each chunk as it
/// comes, then how it ended. The call is aborted when the client goes.
fn stream<F, Fut>(call: F) -> Response
where
    F: FnOnce(mpsc::UnboundedSender<OutputChunk>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = hearth_drivers::Result<ExecResult>> + Send + 'static,
{
    let (chunk_tx, mut chunk_rx) = mpsc::unbounded_channel();
    let (line_tx, line_rx) = mpsc::channel::<Bytes>(64);
    let task = tokio::spawn(async move {
        let run = call(chunk_tx);
        tokio::pin!(run);
        let end = loop {
            tokio::select! {
                Some(chunk) = chunk_rx.recv() => {
                    if line_tx.send(line(&StreamLine::Chunk(chunk))).await.is_err() {
                        return;
                    }
                }
                end = &mut run => break end,
            }
        };
        while let Ok(chunk) = chunk_rx.try_recv() {
            if line_tx.send(line(&StreamLine::Chunk(chunk))).await.is_err() {
                return;
            }
        }
        let last = match end {
            Ok(result) => StreamLine::Result(result),
            Err(e) => StreamLine::Error(WireError::of(&e)),
        };
        let _ = line_tx.send(line(&last)).await;
    });
    let guard = AbortOnDrop(task);
    let body = futures_util::stream::unfold((line_rx, guard), |(mut rx, guard)| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), (rx, guard)))
    });
    Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .expect("a streamed answer")
}

fn line(value: &StreamLine) -> Bytes {
    let mut text = serde_json::to_vec(value).expect("a stream line serializes");
    text.push(b'\n');
    Bytes::from(text)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
