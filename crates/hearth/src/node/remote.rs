//! The server's side of the node boundary: a `Fleet` whose drivers are
//! nodes' APIs over HTTPS, each pinned to its node's CA and sent the node's
//! credential (derived from the join token, so any replica can).

use super::service::{StreamLine, WireError, WriteFile};
use async_trait::async_trait;
use base64::Engine;
use hearth_api::fleet::FleetConfig;
use hearth_core::ids::{NodeId, VmId};
use hearth_core::resource::DriverKind;
use hearth_drivers::{
    Driver, DriverError, ExecRequest, ExecResult, Fleet, GuestHealth, ObservedVm, OutputChunk,
    Result, VmSpec,
};
use hearth_store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// The longest a call that is not a command may take (a boot returns once
/// launched; a destroy of a wedged VM escalates within seconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

fn io(message: String) -> DriverError {
    DriverError::Io(std::io::Error::other(message))
}

/// One node's client: where it is, the CA it is pinned to, its credential.
#[derive(Clone)]
struct NodeClient {
    name: String,
    address: String,
    ca_pem: String,
    credential: String,
    http: reqwest::Client,
    /// The server's own embedded node (on this host: image paths cross).
    embedded: bool,
}

impl NodeClient {
    fn new(name: &str, address: &str, ca_pem: &str, credential: String) -> Result<NodeClient> {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())
            .map_err(|e| io(format!("node {name}: its CA is not a PEM certificate: {e}")))?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .https_only(true)
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Duration::from_secs(10))
            .build()
            .map_err(|e| io(format!("node {name}: {e}")))?;
        Ok(NodeClient {
            name: name.to_owned(),
            address: address.to_owned(),
            ca_pem: ca_pem.to_owned(),
            credential,
            http,
            embedded: false,
        })
    }
}

/// A driver of one kind on one node.
pub struct RemoteDriver {
    kind: DriverKind,
    node: NodeClient,
}

impl RemoteDriver {
    fn url(&self, rest: &str) -> String {
        format!(
            "{}/v1/node/{}/vms{rest}",
            self.node.address,
            super::driver_name(self.kind)
        )
    }

    fn request(&self, method: reqwest::Method, rest: &str) -> reqwest::RequestBuilder {
        self.node
            .http
            .request(method, self.url(rest))
            .bearer_auth(&self.node.credential)
    }

    /// Sends and maps a failure to the same `DriverError` the node had.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        vm: Option<VmId>,
    ) -> Result<reqwest::Response> {
        let answer = request.send().await.map_err(|e| {
            io(format!(
                "node {} does not answer: {}",
                self.node.name,
                chain(&e)
            ))
        })?;
        if answer.status().is_success() {
            return Ok(answer);
        }
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<WireError>(&text) {
            Ok(wire) => wire.into_driver_error(vm, &self.node.name),
            Err(_) => io(format!("node {}: HTTP {status}: {text}", self.node.name)),
        })
    }

    /// Reads an NDJSON answer: chunks to `output`, then how it ended.
    async fn follow(
        &self,
        mut answer: reqwest::Response,
        vm: VmId,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        let mut buffer: Vec<u8> = Vec::new();
        loop {
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let parsed: StreamLine = serde_json::from_slice(&line)
                    .map_err(|e| io(format!("node {}: a bad stream line: {e}", self.node.name)))?;
                match parsed {
                    StreamLine::Chunk(chunk) => {
                        if let Some(tx) = &output {
                            let _ = tx.send(chunk);
                        }
                    }
                    StreamLine::Result(result) => return Ok(result),
                    StreamLine::Error(wire) => {
                        return Err(wire.into_driver_error(Some(vm), &self.node.name));
                    }
                }
            }
            match answer.chunk().await {
                Ok(Some(bytes)) => buffer.extend_from_slice(&bytes),
                Ok(None) => {
                    return Err(io(format!(
                        "node {}: the stream ended before the command did",
                        self.node.name
                    )));
                }
                Err(e) => {
                    return Err(io(format!(
                        "node {}: the stream broke: {}",
                        self.node.name,
                        chain(&e)
                    )));
                }
            }
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    hearth_api::error::chain(e)
}

#[async_trait]
impl Driver for RemoteDriver {
    fn kind(&self) -> DriverKind {
        self.kind
    }

    async fn create(&self, spec: &VmSpec) -> Result<()> {
        let mut spec = spec.clone();
        if !spec.image.digests.is_empty() && !self.node.embedded {
            // The node fetches them by digest: no path of this host crosses.
            spec.image.root_dir = None;
            spec.image.kernel = None;
            spec.image.initrd = None;
            spec.image.disk = None;
        }
        let request = self
            .request(reqwest::Method::POST, "")
            .timeout(CALL_TIMEOUT)
            .json(&spec);
        self.send(request, Some(spec.id)).await.map(drop)
    }

    async fn destroy(&self, id: VmId) -> Result<()> {
        let request = self
            .request(reqwest::Method::DELETE, &format!("/{id}"))
            .timeout(CALL_TIMEOUT);
        self.send(request, Some(id)).await.map(drop)
    }

    async fn list(&self) -> Result<Vec<ObservedVm>> {
        let request = self.request(reqwest::Method::GET, "").timeout(CALL_TIMEOUT);
        let answer = self.send(request, None).await?;
        answer
            .json()
            .await
            .map_err(|e| io(format!("node {}: a bad VM list: {e}", self.node.name)))
    }

    async fn exec(
        &self,
        id: VmId,
        request: &ExecRequest,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        let call = self
            .request(reqwest::Method::POST, &format!("/{id}/exec"))
            .json(request);
        let answer = self.send(call, Some(id)).await?;
        self.follow(answer, id, output).await
    }

    async fn write_file(&self, id: VmId, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        let body = WriteFile {
            path: path.to_owned(),
            contents: base64::engine::general_purpose::STANDARD.encode(contents),
            mode,
        };
        let request = self
            .request(reqwest::Method::PUT, &format!("/{id}/files"))
            .timeout(CALL_TIMEOUT)
            .json(&body);
        self.send(request, Some(id)).await.map(drop)
    }

    async fn health(&self, id: VmId) -> Result<GuestHealth> {
        let request = self
            .request(reqwest::Method::GET, &format!("/{id}/health"))
            .timeout(CALL_TIMEOUT);
        let answer = self.send(request, Some(id)).await?;
        answer
            .json()
            .await
            .map_err(|e| io(format!("node {}: a bad health answer: {e}", self.node.name)))
    }

    async fn seal(&self, id: VmId) -> Result<()> {
        let request = self
            .request(reqwest::Method::POST, &format!("/{id}/seal"))
            .timeout(CALL_TIMEOUT);
        self.send(request, Some(id)).await.map(drop)
    }

    async fn reset(&self, id: VmId) -> Result<()> {
        let request = self
            .request(reqwest::Method::POST, &format!("/{id}/reset"))
            .timeout(CALL_TIMEOUT);
        self.send(request, Some(id)).await.map(drop)
    }

    async fn start_job(&self, id: VmId, job: &str, request: &ExecRequest) -> Result<()> {
        let call = self
            .request(reqwest::Method::PUT, &format!("/{id}/jobs/{job}"))
            .timeout(CALL_TIMEOUT)
            .json(request);
        self.send(call, Some(id)).await.map(drop)
    }

    async fn attach_job(
        &self,
        id: VmId,
        job: &str,
        offset: u64,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        let call = self
            .request(reqwest::Method::GET, &format!("/{id}/jobs/{job}"))
            .query(&[("offset", offset)]);
        let answer = self.send(call, Some(id)).await?;
        self.follow(answer, id, output).await
    }
}

/// Every node's drivers, reached through the store's record of the node.
pub struct RemoteFleet {
    store: Arc<dyn Store>,
    config: FleetConfig,
    clients: Mutex<HashMap<NodeId, NodeClient>>,
    /// The embedded node's id once known (it never changes).
    local: Mutex<Option<NodeId>>,
}

impl RemoteFleet {
    pub fn new(store: Arc<dyn Store>, config: FleetConfig) -> Arc<RemoteFleet> {
        Arc::new(RemoteFleet {
            store,
            config,
            clients: Mutex::new(HashMap::new()),
            local: Mutex::new(None),
        })
    }

    fn store_error(e: StoreError) -> DriverError {
        io(format!(
            "cannot read the node from the store: {}",
            hearth_api::error::chain(&e)
        ))
    }

    async fn node_of(&self, node: Option<NodeId>) -> Result<NodeId> {
        if let Some(node) = node {
            return Ok(node);
        }
        if let Some(local) = *self.local.lock().expect("fleet lock") {
            return Ok(local);
        }
        let default = hearth_api::fleet::default_node(self.store.as_ref(), &self.config)
            .await
            .map_err(Self::store_error)?;
        match default {
            Some(id) => {
                if self.config.local_node.is_some() {
                    *self.local.lock().expect("fleet lock") = Some(id);
                }
                Ok(id)
            }
            // The VM cannot be reached anywhere: gone, for the runner.
            None => Err(DriverError::NotFound(VmId(uuid::Uuid::nil()))),
        }
    }

    async fn client(&self, node: NodeId) -> Result<NodeClient> {
        let record = match self.store.get_node(node).await {
            Ok(record) => record,
            Err(StoreError::NotFound(_)) => {
                return Err(DriverError::NotFound(VmId(uuid::Uuid::nil())));
            }
            Err(e) => return Err(Self::store_error(e)),
        };
        let mut clients = self.clients.lock().expect("fleet lock");
        if let Some(c) = clients.get(&node)
            && c.address == record.address
            && c.ca_pem == record.ca_pem
        {
            return Ok(c.clone());
        }
        let credential = hearth_api::fleet::node_credential(&self.config.join_token, node);
        let mut client =
            NodeClient::new(&record.name, &record.address, &record.ca_pem, credential)?;
        client.embedded = self.config.local_node.as_deref() == Some(record.name.as_str());
        clients.insert(node, client.clone());
        Ok(client)
    }
}

#[async_trait]
impl Fleet for RemoteFleet {
    async fn driver(&self, node: Option<NodeId>, kind: DriverKind) -> Result<Arc<dyn Driver>> {
        let node = self.node_of(node).await?;
        let client = self.client(node).await?;
        Ok(Arc::new(RemoteDriver { kind, node: client }))
    }
}

/// A driver of the default node (the embedded one) reached through the
/// fleet on every call: what adoption at start lists and destroys with.
pub struct DefaultNodeDriver {
    pub fleet: Arc<RemoteFleet>,
    pub kind: DriverKind,
}

impl DefaultNodeDriver {
    async fn inner(&self) -> Result<Arc<dyn Driver>> {
        self.fleet.driver(None, self.kind).await
    }
}

#[async_trait]
impl Driver for DefaultNodeDriver {
    fn kind(&self) -> DriverKind {
        self.kind
    }
    async fn create(&self, spec: &VmSpec) -> Result<()> {
        self.inner().await?.create(spec).await
    }
    async fn destroy(&self, id: VmId) -> Result<()> {
        self.inner().await?.destroy(id).await
    }
    async fn list(&self) -> Result<Vec<ObservedVm>> {
        self.inner().await?.list().await
    }
    async fn exec(
        &self,
        id: VmId,
        request: &ExecRequest,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        self.inner().await?.exec(id, request, output).await
    }
    async fn write_file(&self, id: VmId, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        self.inner()
            .await?
            .write_file(id, path, contents, mode)
            .await
    }
    async fn health(&self, id: VmId) -> Result<GuestHealth> {
        self.inner().await?.health(id).await
    }
    async fn seal(&self, id: VmId) -> Result<()> {
        self.inner().await?.seal(id).await
    }
    async fn reset(&self, id: VmId) -> Result<()> {
        self.inner().await?.reset(id).await
    }
    async fn start_job(&self, id: VmId, job: &str, request: &ExecRequest) -> Result<()> {
        self.inner().await?.start_job(id, job, request).await
    }
    async fn attach_job(
        &self,
        id: VmId,
        job: &str,
        offset: u64,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        self.inner()
            .await?
            .attach_job(id, job, offset, output)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_drivers::fake::{FakeConfig, FakeDriver};
    use hearth_drivers::{Drivers, ImageSpec, NetworkSpec};

    /// A fake driver behind a real node listener (TLS under the node's
    /// own CA), reached through a `RemoteDriver` as the server reaches it.
    async fn node(
        credential: &str,
    ) -> (
        tempfile::TempDir,
        NodeClient,
        tokio::sync::watch::Sender<bool>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let drivers = Drivers::new().with(Arc::new(FakeDriver::new(FakeConfig::default())));
        let state = crate::node::service::NodeState::new(
            drivers,
            vec![],
            dir.path().join("a"),
            reqwest::Client::new(),
        );
        state.set_credential(credential);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let listening = crate::node::listen(
            "127.0.0.1:0".parse().unwrap(),
            None,
            &dir.path().join("tls"),
            state,
            stop_rx,
        )
        .await
        .unwrap();
        let client = NodeClient::new(
            "n1",
            &listening.address,
            &listening.ca_pem,
            credential.to_owned(),
        )
        .unwrap();
        (dir, client, stop_tx)
    }

    fn spec() -> VmSpec {
        VmSpec {
            id: VmId::new(),
            tenant: hearth_core::ids::TenantId::new(),
            workspace: "web".into(),
            cpus: 1,
            memory_mib: 256,
            image: ImageSpec::default(),
            network: NetworkSpec::none(),
            disk_mib: 0,
        }
    }

    #[tokio::test]
    async fn every_driver_call_crosses_and_errors_keep_their_variant() {
        let (_dir, client, _stop) = node("hnc_secret").await;
        let fake = RemoteDriver {
            kind: DriverKind::Fake,
            node: client.clone(),
        };
        let vm = spec();
        fake.create(&vm).await.unwrap();
        let listed = fake.list().await.unwrap();
        assert_eq!(listed.iter().map(|v| v.id).collect::<Vec<_>>(), vec![vm.id]);
        fake.write_file(vm.id, "/etc/x", b"\x00\xffbytes", 0o600)
            .await
            .unwrap();
        fake.health(vm.id).await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let result = fake
            .exec(vm.id, &ExecRequest::new("echo streamed"), Some(tx))
            .await
            .unwrap();
        assert_eq!((result.exit_code, result.timed_out), (0, false));
        assert_eq!(rx.recv().await.unwrap().data, "echo streamed\n");
        fake.destroy(vm.id).await.unwrap();
        // The runner depends on these two variants.
        match fake.health(vm.id).await {
            Err(DriverError::NotFound(id)) => assert_eq!(id, vm.id),
            other => panic!("expected NotFound, got {other:?}"),
        }
        match fake.exec(vm.id, &ExecRequest::new("true"), None).await {
            Err(DriverError::NotFound(id)) => assert_eq!(id, vm.id),
            other => panic!("expected NotFound from a stream, got {other:?}"),
        }
        let qemu = RemoteDriver {
            kind: DriverKind::Qemu,
            node: client.clone(),
        };
        assert!(
            matches!(qemu.list().await, Err(DriverError::Unsupported(_))),
            "a driver the node does not run is Unsupported"
        );
        // Another credential gets nothing.
        let mut stranger = client;
        stranger.credential = "hnc_other".into();
        let stranger = RemoteDriver {
            kind: DriverKind::Fake,
            node: stranger,
        };
        match stranger.create(&spec()).await {
            Err(DriverError::Io(e)) => assert!(e.to_string().contains("unauthorized"), "{e}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            fake.list().await.unwrap().is_empty(),
            "the stranger created nothing"
        );
    }
}
