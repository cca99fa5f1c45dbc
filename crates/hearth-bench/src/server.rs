//! A real `hearth server` process for the benchmark: started on a free
//! loopback port with a data dir of its own, found through its `listening`
//! log line and `<data-dir>/admin-token` (as the e2e tests do), and torn
//! down at the end: every agent and VM nuked through the API, the server
//! stopped with SIGTERM, leftover sandboxes destroyed with the driver, the
//! PostgreSQL database dropped.

use crate::api::Api;
use crate::postgres::Database;
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long the server may take to print its `listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the nuke may take to leave no VM.
const NUKE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long SIGTERM may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Server log lines kept for error messages (request traces left out).
const LOG_TAIL_LINES: usize = 40;

/// The store backend the server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    Sqlite,
    Postgres,
}

/// How to start the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub hearth: PathBuf,
    pub guest_agent: PathBuf,
    pub store: Store,
    pub postgres_admin_url: String,
    /// Serve plain HTTP on loopback (`--plain-http`) instead of TLS.
    pub plain_http: bool,
}

/// A running server; torn down when dropped.
pub struct Server {
    data_dir: tempfile::TempDir,
    guest_agent: PathBuf,
    /// Dropped after the server is stopped.
    database: Option<Database>,
    child: Option<Child>,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    pub url: String,
    pub admin_token: String,
    /// The server's own CA (`None` with plain HTTP).
    pub ca: Option<PathBuf>,
}

impl Server {
    /// Starts `hearth server` and waits until it listens.
    pub fn start(config: &ServerConfig) -> Result<Server> {
        let data_dir = tempfile::Builder::new()
            .prefix("hearth-bench-")
            .tempdir()
            .context("cannot create the data dir")?;
        let database = match config.store {
            Store::Sqlite => None,
            Store::Postgres => Some(Database::create(&config.postgres_admin_url)?),
        };
        let mut server = Server {
            data_dir,
            guest_agent: config.guest_agent.clone(),
            database,
            child: None,
            log_tail: Arc::default(),
            url: String::new(),
            admin_token: String::new(),
            ca: None,
        };
        server.url = server.launch(&config.hearth, config.plain_http)?;
        let ca = server.data_dir.path().join("tls/ca.pem");
        server.ca = server.url.starts_with("https://").then_some(ca);
        let token_path = server.data_dir.path().join("admin-token");
        server.admin_token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("cannot read {}", token_path.display()))?
            .trim()
            .to_owned();
        eprintln!(
            "[bench] hearth server on {} ({:?} store, data dir {})",
            server.url,
            config.store,
            server.data_dir.path().display()
        );
        Ok(server)
    }

    /// An API client with the admin token.
    pub fn api(&self) -> Result<Api> {
        Api::new(&self.url, &self.admin_token, self.ca.as_deref())
    }

    /// The last lines the server logged.
    /// The server's data dir (removed with the server).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn log_tail(&self) -> String {
        let tail = self.log_tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Spawns the process and returns the URL of its `listening` line.
    fn launch(&mut self, hearth: &Path, plain_http: bool) -> Result<String> {
        let mut cmd = Command::new(hearth);
        cmd.args(["server", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(plain_http.then_some("--plain-http"))
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(["--resync", "200ms"])
            .env("RUST_LOG", "info,sqlx=warn")
            .env("HEARTH_GUEST_AGENT", &self.guest_agent)
            .env_remove("HEARTH_DATABASE_URL")
            .env_remove("HEARTH_LISTEN")
            .env_remove("HEARTH_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(db) = &self.database {
            cmd.args(["--database-url", &db.url]);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", hearth.display()))?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        let tail = self.log_tail.clone();
        std::thread::spawn(move || read_log(stderr, tx, tail));
        rx.recv_timeout(START_TIMEOUT)
            .map_err(|_| anyhow!("the server did not start; its log:\n{}", self.log_tail()))
    }

    /// Terminates every agent, deletes every VM (`flush --nuke`) and waits
    /// until the store lists no live VM.
    fn nuke(&self) -> Result<()> {
        let api = self.api()?;
        api.post("/v1/pool/flush", &json!({"nuke": true}))?;
        let deadline = Instant::now() + NUKE_TIMEOUT;
        loop {
            let vms = api.get("/v1/vms")?;
            if vms["items"].as_array().is_none_or(Vec::is_empty) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("VMs still live {NUKE_TIMEOUT:?} after the nuke: {vms}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL when it does not stop in time.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[bench] the server ignored SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Destroys, with the sandbox driver, any sandbox still on disk.
    fn destroy_leftovers(&self) {
        let state_dir = self.data_dir.path().join("sandboxes");
        let ids = crate::boot::sandbox_ids(&state_dir);
        if ids.is_empty() {
            return;
        }
        eprintln!("[bench] destroying {} leftover sandboxes", ids.len());
        let driver = crate::boot::driver(&state_dir, &self.guest_agent, "hearth");
        if let Err(e) = crate::boot::destroy_all(&driver, &ids) {
            eprintln!("[bench] cannot destroy leftover sandboxes: {e:#}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        eprintln!("[bench] tearing down: nuke, stop the server, clean up");
        if self.url.is_empty() {
            // It never listened: nothing to nuke through the API.
        } else if let Err(e) = self.nuke() {
            eprintln!("[bench] nuke failed: {e:#}");
        }
        self.stop();
        self.destroy_leftovers();
        // The database goes after the server that used it.
        self.database.take();
    }
}

/// Keeps the last lines of the server's JSON log and reports the address
/// of its `listening` line.
fn read_log(
    stderr: impl std::io::Read,
    listening: mpsc::Sender<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["message"] == "listening"
            && let Some(addr) = v["url"].as_str()
        {
            let _ = listening.send(addr.to_owned());
        }
        if line.contains("\"target\":\"tower_http::trace") {
            // One line per request: they would bury everything else.
            continue;
        }
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == LOG_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}
