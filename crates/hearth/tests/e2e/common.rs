//! The harness: start and stop real servers, make PostgreSQL databases, call
//! the API and run the CLI.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// Runs each named test function (taking a [`Backend`]) once per backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name($crate::common::Backend::Sqlite) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name($crate::common::Backend::Postgres) } )*
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The server PostgreSQL tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("HEARTH_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Runs a future to completion on a runtime of its own.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The `id` of an answer (an agent, a VM, an instance).
pub fn id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_owned()
}

/// A PostgreSQL database of its own, dropped at the end of the test.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub fn create() -> PgDatabase {
        let admin = postgres_admin_url();
        let name = format!("hearth_e2e_{}", uuid::Uuid::new_v4().simple());
        block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
                panic!("PostgreSQL is not reachable at {admin} ({e}); start it (.ci/run does) or set HEARTH_TEST_POSTGRES_URL")
            });
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap();
        });
        let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap();
        PgDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin = postgres_admin_url();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            block_on(async {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            })
        })
        .join();
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_hearth")
}

/// The guest agent binary: `HEARTH_GUEST_AGENT` when set, else built (a
/// no-op when up to date) by the same cargo that runs the tests, so it is
/// never stale.
pub fn guest_agent() -> &'static str {
    static AGENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        if let Some(path) = std::env::var_os("HEARTH_GUEST_AGENT").filter(|p| !p.is_empty()) {
            return path.to_string_lossy().into_owned();
        }
        let output = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "hearth-guest-agent",
                "--bin",
                "hearth-guest-agent",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo to build hearth-guest-agent");
        assert!(
            output.status.success(),
            "cargo build -p hearth-guest-agent failed"
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|m| {
                m["reason"] == "compiler-artifact" && m["target"]["name"] == "hearth-guest-agent"
            })
            .find_map(|m| m["executable"].as_str().map(str::to_owned))
            .expect("cargo reported the hearth-guest-agent executable")
    })
}

/// A running `hearth server` with its own data dir (and database).
pub struct Server {
    pub backend: Backend,
    pub data_dir: tempfile::TempDir,
    pub database: Option<PgDatabase>,
    pub url: String,
    pub admin_token: String,
    /// The CA the server's certificate is signed by (`None`: plain HTTP).
    pub ca: Option<PathBuf>,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
    pub stdout: Arc<Mutex<String>>,
    extra: Vec<String>,
}

impl Server {
    pub fn start(backend: Backend) -> Server {
        Self::start_with(backend, &[])
    }

    /// Starts a server with extra `hearth server` flags.
    pub fn start_with(backend: Backend, extra: &[&str]) -> Server {
        let data_dir = tempfile::tempdir().unwrap();
        let database = (backend == Backend::Postgres).then(PgDatabase::create);
        let mut server = Server {
            backend,
            data_dir,
            database,
            url: String::new(),
            admin_token: String::new(),
            ca: None,
            child: None,
            logs: Default::default(),
            stdout: Default::default(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.launch();
        server.admin_token = std::fs::read_to_string(server.data_dir.path().join("admin-token"))
            .expect("first start writes the admin token file")
            .trim()
            .to_owned();
        server
    }

    /// Another replica of `first`'s control plane: a data dir of its own
    /// with the same secrets key and join token, on the same PostgreSQL
    /// database, with `first`'s admin token.
    pub fn replica_of(first: &Server, extra: &[&str]) -> Server {
        let url = first
            .database_url()
            .expect("replicas share a PostgreSQL database")
            .to_owned();
        let data_dir = tempfile::tempdir().unwrap();
        for file in ["secrets.key", "join-token"] {
            let from = first.data_dir.path().join(file);
            let to = data_dir.path().join(file);
            std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        }
        let mut args = vec!["--database-url".to_owned(), url];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Server {
            backend: Backend::Postgres,
            data_dir,
            database: None,
            url: String::new(),
            admin_token: first.admin_token.clone(),
            ca: None,
            child: None,
            logs: Default::default(),
            stdout: Default::default(),
            extra: args,
        };
        server.launch();
        server
    }

    /// Whether its process runs (not killed or stopped by the test).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn database_url(&self) -> Option<&str> {
        self.database.as_ref().map(|d| d.url.as_str())
    }

    /// Starts the binary and waits for its `listening` log line.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(binary());
        cmd.arg("server");
        if !self.extra.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--log-format", "json", "--data-dir"])
            .arg(self.data_dir.path())
            .env("RUST_LOG", "info")
            .env_remove("HEARTH_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(url) = self.database_url() {
            cmd.args(["--database-url", url]);
        }
        cmd.args(&self.extra)
            .env("HEARTH_GUEST_AGENT", guest_agent());
        let mut child = cmd.spawn().expect("the hearth binary starts");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "listening"
                {
                    let _ = tx.send(v["url"].as_str().unwrap_or_default().to_owned());
                }
                logs.lock().unwrap().push_str(&line);
                logs.lock().unwrap().push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let out = self.stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out.lock().unwrap().push_str(&line);
                out.lock().unwrap().push('\n');
            }
        });
        self.child = Some(child);
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => self.url = url,
            Err(_) => panic!("the server did not start; its log:\n{}", self.logs()),
        }
        // The server's own CA, unless it serves plain HTTP or the
        // operator's certificate (whose test trusts its CA itself).
        let ca = self.data_dir.path().join("tls/ca.pem");
        self.ca = (self.url.starts_with("https://")
            && ca.is_file()
            && !self.extra.iter().any(|a| a == "--tls-cert"))
        .then_some(ca);
        if let Some(ca) = &self.ca {
            trust(&self.url, ca);
        }
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Replaces the extra server flags used by the next `launch`.
    pub fn set_extra(&mut self, args: &mut Vec<String>) {
        self.extra = std::mem::take(args);
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// An API client with the given token.
    pub fn client(&self, token: &str) -> Api {
        Api {
            base: self.url.clone(),
            token: Some(token.to_owned()),
        }
    }

    /// An API client with the bootstrap (operator) token.
    pub fn admin(&self) -> Api {
        self.client(&self.admin_token)
    }

    /// Runs the CLI against this server with `token`, in an empty folder.
    pub fn cli(&self, token: &str, args: &[&str], stdin: &str) -> CliOutput {
        let dir = tempfile::tempdir().unwrap();
        run_cli(
            dir.path(),
            args,
            stdin,
            &[("HEARTH_SERVER", &self.url), ("HEARTH_TOKEN", token)],
        )
        // (run_cli adds HEARTH_CA for a server the harness started.)
    }

    /// Creates an identity with `role` through the API and returns its token.
    pub fn identity(&self, name: &str, role: &str) -> String {
        let r = self.admin().post(
            "/v1/identities",
            serde_json::json!({"name": name, "role": role}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["token"].as_str().unwrap().to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Leave no VM behind: stop the server, then destroy what it ran.
        self.kill();
        let sandboxes = self.data_dir.path().join("sandboxes");
        if let Ok(entries) = std::fs::read_dir(&sandboxes) {
            let ids: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !ids.is_empty() {
                destroy_sandboxes(&sandboxes, &ids);
            }
        }
    }
}

impl Server {
    /// Seeds a pool: pool config, an environment and one workspace.
    pub fn pool(&self, max_vms: i64, env_yaml: &str, workspace: &str, ws_yaml: &str) {
        let api = self.admin();
        let r = api.put_yaml("/v1/pool-config/default", &format!("max_vms: {max_vms}\n"));
        assert!(r.status < 300, "{}", r.text);
        let r = api.put_yaml("/v1/environments/dev", env_yaml);
        assert!(r.status < 300, "{}", r.text);
        let r = api.put_yaml(
            &format!("/v1/workspaces/{workspace}"),
            &format!("environment: dev\n{ws_yaml}"),
        );
        assert!(r.status < 300, "{}", r.text);
    }

    /// The pool status (JSON).
    pub fn status(&self) -> Value {
        let r = self.admin().get("/v1/pool/status");
        assert_eq!(r.status, 200, "{}", r.text);
        r.body
    }

    /// The admin tenant's last reconcile pass as `pool status` shows it
    /// (`null` before the first).
    pub fn pass(&self) -> Value {
        self.status()["pass"].clone()
    }

    /// Waits until the admin tenant's pass iteration is past `n` (panics
    /// after `secs`); answers that pass. What a test waits on instead of
    /// sleeping: a pass past `n` began after the one numbered `n`.
    pub fn wait_pass_past(&self, n: u64, secs: u64) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(secs, || {
            last = self.pass();
            last["iteration"].as_u64().is_some_and(|i| i > n)
        });
        assert!(
            ok,
            "the pass iteration never passed {n}: {last}\n{}",
            self.logs_tail()
        );
        last
    }

    /// Waits until `k` whole passes of the admin tenant began and ended
    /// after this call: to show that nothing happens, the planner must have
    /// had `k` chances to act (with the test's `--resync`, a pass runs at
    /// least that often).
    pub fn wait_passes(&self, k: u64) -> Value {
        let now = self.pass()["iteration"].as_u64().unwrap_or(0);
        // The pass running at `now` may have begun before the call.
        self.wait_pass_past(now + k, 30)
    }

    /// The tenant's VMs (JSON list).
    pub fn vms(&self) -> Vec<Value> {
        let r = self.admin().get("/v1/vms");
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["items"].as_array().unwrap().clone()
    }

    /// The sandboxes that really exist (their folders).
    pub fn sandboxes(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.data_dir.path().join("sandboxes"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Spawns an agent as `token` and returns the answer.
    pub fn spawn(&self, token: &str, body: Value) -> Answer {
        self.client(token).post("/v1/agents", body)
    }

    /// Waits until `agent` is in `phase` (panics with its state after `secs`).
    pub fn wait_agent(&self, id: &str, phase: &str, secs: u64) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(secs, || {
            last = self.admin().get(&format!("/v1/agents/{id}")).body;
            last["phase"] == phase
        });
        assert!(
            ok,
            "agent {id} never became {phase}: {last}\n{}",
            self.logs_tail()
        );
        last
    }

    /// The last lines of the server log (for failure messages).
    pub fn logs_tail(&self) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Polls `f` every 50 ms for up to `secs` seconds.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The result of a CLI run.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary in `dir` with a clean HEARTH_* environment plus `env`.
pub fn run_cli(dir: &Path, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> CliOutput {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for key in [
        "HEARTH_SERVER",
        "HEARTH_TOKEN",
        "HEARTH_WORKSPACE",
        "HEARTH_DATA_DIR",
        "HEARTH_DATABASE_URL",
        "HEARTH_CA",
    ] {
        cmd.env_remove(key);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A server the harness started is trusted through its CA, as a user
    // would (HEARTH_CA), unless the test names a CA itself.
    if !env.iter().any(|(k, _)| *k == "HEARTH_CA")
        && let Some((_, server)) = env.iter().find(|(k, _)| *k == "HEARTH_SERVER")
        && let Some(ca) = trusted_ca(server)
    {
        cmd.env("HEARTH_CA", ca);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A plain HTTP client for the API.
pub struct Api {
    pub base: String,
    pub token: Option<String>,
}

/// An HTTP answer with its JSON body (Null when not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// Asserts an error answer with this status, code and message.
    pub fn assert_error(&self, status: u16, code: &str, message: &str) {
        assert_eq!(
            (
                self.status,
                self.body["code"].as_str(),
                self.body["message"].as_str()
            ),
            (status, Some(code), Some(message)),
            "{}",
            self.text
        );
    }

    /// Asserts an error answer with this status and code whose message
    /// holds `fragment` (for messages that go on to list what is valid).
    pub fn assert_error_naming(&self, status: u16, code: &str, fragment: &str) {
        assert_eq!(
            (self.status, self.body["code"].as_str()),
            (status, Some(code)),
            "{}",
            self.text
        );
        assert!(
            self.body["message"]
                .as_str()
                .is_some_and(|m| m.contains(fragment)),
            "{}",
            self.text
        );
    }
}

impl Api {
    pub fn anonymous(base: &str) -> Api {
        Api {
            base: base.to_owned(),
            token: None,
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        let client = http_client(&self.base);
        let mut req = client.request(method.parse().unwrap(), format!("{}{}", self.base, path));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req.send().expect("the server answers");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    pub fn get(&self, path: &str) -> Answer {
        self.request("GET", path, None, None)
    }
    pub fn delete(&self, path: &str) -> Answer {
        self.request("DELETE", path, None, None)
    }
    pub fn post(&self, path: &str, body: Value) -> Answer {
        self.request(
            "POST",
            path,
            Some("application/json"),
            Some(body.to_string()),
        )
    }
    pub fn put_json(&self, path: &str, body: Value) -> Answer {
        self.request(
            "PUT",
            path,
            Some("application/json"),
            Some(body.to_string()),
        )
    }
    pub fn put_yaml(&self, path: &str, yaml: &str) -> Answer {
        self.request("PUT", path, Some("application/yaml"), Some(yaml.to_owned()))
    }
    pub fn patch(&self, path: &str, body: Value) -> Answer {
        self.request(
            "PATCH",
            path,
            Some("application/merge-patch+json"),
            Some(body.to_string()),
        )
    }
}

/// Path of a file in the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// Destroys leftover sandboxes with the real driver (a test that failed
/// half-way must not leak VMs into the next).
pub fn destroy_sandboxes(state_dir: &Path, ids: &[String]) {
    use hearth_drivers::Driver;
    use hearth_drivers::sandbox::{SandboxConfig, SandboxDriver};
    let mut config = SandboxConfig::new(state_dir, guest_agent());
    config.net = Some(std::sync::Arc::new(
        hearth_drivers::net::Net::new(hearth_drivers::net::NetConfig::new())
            .expect("the default VM network"),
    ));
    let driver = SandboxDriver::new(config);
    block_on(async {
        for id in ids {
            if let Ok(id) = id.parse() {
                let _ = driver.destroy(id).await;
            }
        }
    });
}

/// Real git repositories, served by a real `git daemon` on loopback (the
/// sandbox shares the host's network, so VMs clone from it).
pub struct GitServer {
    pub root: tempfile::TempDir,
    pub port: u16,
    daemon: Child,
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=hearth",
            "-c",
            "user.email=hearth@localhost",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl GitServer {
    pub fn start() -> GitServer {
        let root = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let daemon = Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", root.path().display()))
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // `git daemon` runs `git-daemon` as a child: kill them as a group.
            .process_group(0)
            .spawn()
            .expect("git daemon starts");
        let server = GitServer { root, port, daemon };
        assert!(
            wait_until(10, || std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "git daemon never listened"
        );
        server
    }

    /// Makes a repository `name` (branch main) with `files`, and returns
    /// its `git://` URL.
    pub fn repo(&self, name: &str, files: &[(&str, &str)]) -> String {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        git(&dir, &["init", "-q"]);
        for (path, text) in files {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        }
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "-q", "-m", "first"]);
        self.url(name)
    }

    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.daemon.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.daemon.wait();
    }
}

/// The gateway of a server's default VM network: where `network: egress`
/// VMs reach the host ports their environment allows.
pub fn vm_gateway() -> String {
    hearth_drivers::net::Net::new(hearth_drivers::net::NetConfig::new())
        .expect("the default VM network")
        .gateway()
        .to_string()
}

/// A `git://127.0.0.1:<port>/…` URL of a [`GitServer`] as an egress VM
/// reaches it (through the gateway), and the port to allow.
pub fn through_gateway(url: &str) -> (String, u16) {
    let rest = url
        .strip_prefix("git://127.0.0.1:")
        .unwrap_or_else(|| panic!("not a GitServer URL: {url}"));
    let port = rest.split('/').next().unwrap().parse().unwrap();
    (url.replacen("127.0.0.1", &vm_gateway(), 1), port)
}

/// The CA files of the servers the harness started, by URL.
fn trusted() -> &'static Mutex<std::collections::HashMap<String, PathBuf>> {
    static TRUSTED: std::sync::OnceLock<Mutex<std::collections::HashMap<String, PathBuf>>> =
        std::sync::OnceLock::new();
    TRUSTED.get_or_init(Default::default)
}

/// Makes the test clients trust `ca` for the server at `url`.
pub fn trust(url: &str, ca: &Path) {
    trusted()
        .lock()
        .unwrap()
        .insert(url.trim_end_matches('/').to_owned(), ca.to_owned());
}

/// The CA the harness trusts for the server at `url` (a URL it started, or
/// one under it).
pub fn trusted_ca(url: &str) -> Option<PathBuf> {
    let trusted = trusted().lock().unwrap();
    trusted
        .iter()
        .find(|(base, _)| url == base.as_str() || url.starts_with(&format!("{base}/")))
        .map(|(_, ca)| ca.clone())
}

/// A blocking HTTP client for `url` (a fresh one, so each request has its
/// own connection, as before): for an `https://` server the harness
/// started, it trusts that server's CA and nothing else.
pub fn http_client(url: &str) -> reqwest::blocking::Client {
    let mut builder = reqwest::blocking::Client::builder().use_rustls_tls();
    if let Some(ca) = trusted_ca(url) {
        let pem = std::fs::read(&ca).unwrap_or_else(|e| panic!("read {}: {e}", ca.display()));
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

/// An error with all its causes, `: `-separated (reqwest's own message
/// hides the TLS reason in a source).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Server {
    /// Joins a node to the server's fleet straight through its store (as
    /// the join route would record it), with `credential` (only its
    /// SHA-256 is stored) and `last_heartbeat` this long ago.
    pub fn join_node(&self, name: &str, credential: &str, silent_for: Duration) -> Value {
        use sha2::Digest;
        let url = self.database_url().map(str::to_owned);
        let dir = self.data_dir.path().to_owned();
        let now = hearth_store::now_millis();
        let node = hearth_store::NodeRecord {
            id: hearth_core::ids::NodeId::new(),
            name: name.to_owned(),
            address: format!("https://{name}.invalid:7071"),
            ca_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
            credential_hash: hex::encode(sha2::Sha256::digest(credential.as_bytes())),
            state: hearth_store::NodeState::Ready,
            capacity: hearth_store::NodeCapacity {
                drivers: vec!["sandbox".into(), "fake".into()],
                cpus: 16,
                memory_mib: 32768,
                disk_mib: 100_000,
                vm_slots: 20,
                max_boots: 4,
            },
            joined_at: now,
            last_heartbeat: now - silent_for.as_millis() as i64,
            updated_at: now,
        };
        let stored = block_on(async move {
            let store = hearth_store::open(url.as_deref(), &dir).await.unwrap();
            store.join_node(&node).await.unwrap()
        });
        serde_json::json!({"id": stored.id.to_string(), "name": stored.name})
    }
}
