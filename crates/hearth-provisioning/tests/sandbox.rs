//! The pipeline against real sandboxes (the real `SandboxDriver` and guest
//! agent) cloning real git repositories served by a real `git daemon`.
//! No mocks.
//!
//! **Requirements:** root on Linux (see `hearth-drivers/tests/sandbox.rs`)
//! and `git` with `git daemon`. Not root → every test fails saying so.
//!
//! **The agent binary** is built once per test process exactly as the
//! driver's own tests do (`$CARGO build -p hearth-guest-agent`, the path
//! from the `compiler-artifact` message; `HEARTH_GUEST_AGENT` skips it).
//!
//! **Fixtures.** Each test has a [`Fixture`]: its own folder under Cargo's
//! target tmp folder (repos, sandbox state), its own cgroup root name, and
//! its own `git daemon` (in a process group of its own) on a free port of
//! 127.0.0.1, which the sandboxes reach as `git://127.0.0.1:<port>/<repo>`
//! because they share the host's network. Dropping the fixture — panics
//! included — kills the daemon's group, destroys every sandbox, and
//! removes the cgroup roots and the folder.

use async_trait::async_trait;
use hearth_core::ids::{TenantId, VmId};
use hearth_drivers::sandbox::{SandboxConfig, SandboxDriver};
use hearth_drivers::{Driver, ExecRequest, ImageSpec, Stream, VmSpec};
use hearth_provisioning::{
    Command, ProvisionPlan, Recorder, RepoPlan, Step, StepStatus, Summary, provision,
};
use std::collections::BTreeMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The agent binary, built (or found up to date) once per test process.
fn agent_binary() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("HEARTH_GUEST_AGENT").filter(|p| !p.is_empty()) {
                return PathBuf::from(path);
            }
            let output = std::process::Command::new(env!("CARGO"))
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
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|m| {
                    m["reason"] == "compiler-artifact"
                        && m["target"]["name"] == "hearth-guest-agent"
                })
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .expect("cargo reported no hearth-guest-agent executable")
        })
        .clone()
}

/// Runs host git with no user or system configuration; its stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.org")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.org")
        .output()
        .expect("run git");
    assert!(
        output.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The sandbox base image, built once (under a lock) in Cargo's target
/// tmp folder and shared by every test process.
fn base_image() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        hearth_image::base::ensure(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("images"))
            .expect("build the sandbox base image")
    })
    .clone()
}

/// A `git daemon` serving a folder, killed (with its process group) on drop.
struct GitDaemon {
    child: Child,
    port: u16,
}

impl GitDaemon {
    fn start(dir: &Path, log: &Path) -> Self {
        for _ in 0..5 {
            // A port free a moment ago; another process may take it first,
            // then the daemon exits and we try another.
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("git")
                .arg("daemon")
                .arg("--reuseaddr")
                .arg(format!("--base-path={}", dir.display()))
                .arg("--export-all")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(dir)
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(log).unwrap())
                .process_group(0)
                .spawn()
                .expect("run git daemon");
            let mut daemon = GitDaemon { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if daemon.child.try_wait().unwrap().is_some() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return daemon;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            daemon.stop();
        }
        panic!(
            "git daemon did not start: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }

    fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }

    fn stop(&mut self) {
        // git runs git-daemon as a child: end the whole group.
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test's folder, sandbox driver and git daemon; cleaned up on drop.
struct Fixture {
    driver: SandboxDriver,
    base: PathBuf,
    git_dir: PathBuf,
    daemon: Option<GitDaemon>,
}

impl Fixture {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the sandbox tests need root (namespaces, overlayfs, cgroups)"
        );
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hp-{}", &tag[..10]));
        let git_dir = base.join("git");
        fs::create_dir_all(&git_dir).unwrap();
        let mut config = SandboxConfig::new(base.join("state"), agent_binary());
        config.cgroup_root_name = format!("hearth-test-{tag}");
        config.default_root = Some(base_image());
        let mut fixture = Fixture {
            driver: SandboxDriver::new(config),
            base,
            git_dir,
            daemon: None,
        };
        fixture.daemon = Some(GitDaemon::start(
            &fixture.git_dir,
            &fixture.base.join("git-daemon.log"),
        ));
        fixture
    }

    fn url(&self, repo: &str) -> String {
        self.daemon.as_ref().unwrap().url(repo)
    }

    /// A new repo with `files` committed on `main`; returns its folder.
    fn repo(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.git_dir.join(name);
        fs::create_dir_all(&dir).unwrap();
        git(&dir, &["init", "-q", "-b", "main"]);
        self.commit(&dir, files, "first");
        dir
    }

    /// Writes `files` and commits them; returns the commit.
    fn commit(&self, dir: &Path, files: &[(&str, &str)], message: &str) -> String {
        for (path, text) in files {
            let path = dir.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-q", "-m", message]);
        git(dir, &["rev-parse", "HEAD"])
    }

    fn spec(&self) -> VmSpec {
        VmSpec {
            id: VmId::new(),
            tenant: TenantId::new(),
            workspace: "web".into(),
            cpus: 1,
            memory_mib: 512,
            image: ImageSpec::default(),
            // The host's network: the git daemon listens on its 127.0.0.1.
            network: hearth_drivers::NetworkSpec::host(),
            disk_mib: 0,
        }
    }

    /// Runs the pipeline on a new sandbox.
    async fn provision(&self, plan: &ProvisionPlan) -> Run {
        let spec = self.spec();
        let recording = Recording::default();
        let (steps, summary) = provision(&self.driver, &spec, plan, &recording).await;
        Run {
            id: spec.id,
            steps,
            summary,
            records: recording.0.into_inner().unwrap(),
        }
    }

    /// stdout of a command that must succeed in VM `id`.
    async fn sh(&self, id: VmId, command: &str) -> String {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let result = self
            .driver
            .exec(id, &ExecRequest::new(command), Some(tx))
            .await
            .unwrap_or_else(|e| panic!("{command}: {e}"));
        let (mut stdout, mut stderr) = (String::new(), String::new());
        while let Some(chunk) = rx.recv().await {
            match chunk.stream {
                Stream::Stdout => stdout.push_str(&chunk.data),
                Stream::Stderr => stderr.push_str(&chunk.data),
            }
        }
        assert_eq!(result.exit_code, 0, "{command}: {stdout}{stderr}");
        stdout
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.daemon.take();
        // Drop may run inside the test's runtime: clean up from a thread
        // with a runtime of its own.
        let driver = self.driver.clone();
        let base = self.base.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                for vm in driver.list().await.unwrap_or_default() {
                    if let Err(e) = driver.destroy(vm.id).await {
                        eprintln!("cleanup: destroy {}: {e}", vm.id);
                    }
                }
            });
            for root in driver.cgroup_roots() {
                let _ = fs::remove_dir(root);
            }
            let _ = fs::remove_dir_all(base);
        });
        let _ = cleanup.join();
    }
}

/// Keeps every list of steps it is given.
#[derive(Default)]
struct Recording(Mutex<Vec<Vec<Step>>>);

#[async_trait]
impl Recorder for Recording {
    async fn record(&self, steps: &[Step]) {
        self.0.lock().unwrap().push(steps.to_vec());
    }
}

/// A finished run.
struct Run {
    id: VmId,
    steps: Vec<Step>,
    summary: Summary,
    records: Vec<Vec<Step>>,
}

impl Run {
    fn step(&self, name: &str, repo: Option<&str>) -> &Step {
        self.steps
            .iter()
            .find(|s| s.name == name && s.repo.as_deref() == repo)
            .unwrap_or_else(|| panic!("no step {name} {repo:?}"))
    }

    fn statuses(&self) -> Vec<StepStatus> {
        self.steps.iter().map(|s| s.status).collect()
    }
}

fn cmd(name: &str, command: &str) -> Command {
    Command {
        name: name.into(),
        command: command.into(),
    }
}

fn plan(repos: Vec<RepoPlan>) -> ProvisionPlan {
    ProvisionPlan {
        env: BTreeMap::new(),
        repos,
        project_setup: vec![],
        repo_setup: vec![],
        warm_pool_setup: vec![],
        guest_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(60),
    }
}

impl Fixture {
    fn repo_plan(&self, name: &str, branch: &str) -> RepoPlan {
        RepoPlan {
            url: self.url(name),
            branch: branch.into(),
            dir: name.into(),
        }
    }
}

#[tokio::test]
async fn a_full_run_clones_runs_the_hooks_and_the_setup() {
    let f = Fixture::new();
    // api: main, with both settings files: .hearth/settings.json wins.
    let api = f.repo(
        "api",
        &[
            ("README.md", "api\n"),
            (
                ".hearth/settings.json",
                r#"{"model": "ignored", "hooks": {"init": [
                    {"name": "deps", "command": "echo deps > hook-deps.txt; echo from-hearth"},
                    "echo \"$GREETING\" > hook-plain.txt"
                ]}}"#,
            ),
            (
                ".capy/settings.json",
                r#"{"hooks": {"init": ["touch hook-capy.txt"]}}"#,
            ),
        ],
    );
    let api_head = git(&api, &["rev-parse", "HEAD"]);
    // web: cloned at its feature branch, which has a .capy/settings.json.
    let web = f.repo("web", &[("README.md", "web\n")]);
    git(&web, &["checkout", "-q", "-b", "feature"]);
    let web_head = f.commit(
        &web,
        &[
            ("feature.txt", "feature\n"),
            (
                ".capy/settings.json",
                r#"{"hooks": {"init": [{"name": "capy-hook", "command": "echo capy > hook-capy.txt"}]}}"#,
            ),
        ],
        "feature",
    );
    git(&web, &["checkout", "-q", "main"]);

    let mut plan = plan(vec![
        f.repo_plan("api", "main"),
        f.repo_plan("web", "feature"),
    ]);
    plan.env = BTreeMap::from([
        ("GREETING".to_owned(), "it's \"quoted\" $HOME".to_owned()),
        ("MODE".to_owned(), "dev".to_owned()),
    ]);
    plan.project_setup = vec![cmd(
        "project",
        "echo project > /home/project.txt; echo project done",
    )];
    plan.repo_setup = vec![cmd("mark", "pwd > repo-setup.txt; git rev-parse HEAD")];
    plan.warm_pool_setup = vec![
        cmd("warm", "echo warm > /home/warm.txt; echo warmed >&2"),
        cmd("mode", "echo \"mode=$MODE\""),
    ];
    let run = f.provision(&plan).await;
    assert!(run.summary.success, "{:?}\n{:#?}", run.summary, run.steps);
    for step in &run.steps {
        assert_eq!(step.status, StepStatus::Succeeded, "{step:?}");
        assert!(
            step.started_at.is_some() && step.duration_ms.is_some(),
            "{step:?}"
        );
    }
    let id = run.id;

    // The clones: right commits, right branches, one branch each.
    assert_eq!(
        f.sh(id, "git -C /home/api rev-parse HEAD").await.trim(),
        api_head
    );
    assert_eq!(
        f.sh(id, "git -C /home/web rev-parse HEAD").await.trim(),
        web_head
    );
    assert_eq!(
        f.sh(id, "git -C /home/web branch --show-current").await,
        "feature\n"
    );
    assert_eq!(f.sh(id, "cat /home/web/feature.txt").await, "feature\n");
    assert_eq!(
        f.sh(id, "git -C /home/web branch -r --format='%(refname:short)'")
            .await,
        "origin/feature\n"
    );
    assert!(
        run.step("clone_repo", Some("api"))
            .output
            .contains("Cloning into '/home/api'"),
        "{:?}",
        run.step("clone_repo", Some("api"))
    );

    // The init hooks, from each repo's settings file, in its folder.
    assert_eq!(f.sh(id, "cat /home/api/hook-deps.txt").await, "deps\n");
    assert_eq!(
        f.sh(id, "cat /home/api/hook-plain.txt").await,
        "it's \"quoted\" $HOME\n"
    );
    assert_eq!(
        f.sh(
            id,
            "test -e /home/api/hook-capy.txt && echo ran || echo skipped"
        )
        .await,
        "skipped\n"
    );
    assert_eq!(
        run.step("init_repo", Some("api")).output,
        ".hearth/settings.json: 2 init hooks\n$ deps\nfrom-hearth\n$ hook-2\n"
    );
    assert_eq!(f.sh(id, "cat /home/web/hook-capy.txt").await, "capy\n");
    assert_eq!(
        run.step("init_repo", Some("web")).output,
        ".capy/settings.json: 1 init hook\n$ capy-hook\n"
    );

    // The setup commands.
    assert_eq!(f.sh(id, "cat /home/project.txt").await, "project\n");
    assert_eq!(
        run.step("project_setup", None).output,
        "$ project\nproject done\n"
    );
    assert_eq!(
        f.sh(id, "cat /home/api/repo-setup.txt").await,
        "/home/api\n"
    );
    assert_eq!(
        f.sh(id, "cat /home/web/repo-setup.txt").await,
        "/home/web\n"
    );
    assert_eq!(
        run.step("repo_setup", Some("web")).output,
        format!("$ mark\n{web_head}\n")
    );
    assert_eq!(f.sh(id, "cat /home/warm.txt").await, "warm\n");
    assert_eq!(
        run.step("warm_pool_setup", None).output,
        // Every variable's value is a secret, even a harmless one.
        "$ warm\nwarmed\n$ mode\nmode=***\n"
    );

    // /home/.env: 0600, and sourcing it gives back the values.
    assert_eq!(f.sh(id, "stat -c %a /home/.env").await, "600\n");
    assert_eq!(
        f.sh(
            id,
            "set -a; . /home/.env; printf '%s|%s' \"$GREETING\" \"$MODE\""
        )
        .await,
        "it's \"quoted\" $HOME|dev"
    );
    assert_eq!(
        run.step("set_env_vars", None).output,
        "wrote 2 variables to /home/.env: GREETING, MODE\n"
    );
    // Started, then ended, for each step (no command streamed 250 ms).
    assert!(run.records.len() >= 2 * run.steps.len());
    assert_eq!(run.records.last().unwrap(), &run.steps);
}

#[tokio::test]
async fn a_failing_warm_pool_setup_command_fails_the_run() {
    let f = Fixture::new();
    f.repo("api", &[("README.md", "api\n")]);
    let mut plan = plan(vec![f.repo_plan("api", "main")]);
    plan.warm_pool_setup = vec![
        cmd("fine", "echo fine"),
        cmd("migrate", "echo about to fail >&2; exit 7"),
        cmd("never", "touch /home/never"),
    ];
    let run = f.provision(&plan).await;
    assert_eq!(
        run.summary,
        Summary {
            success: false,
            failed_step: Some("warm_pool_setup".into()),
            error: Some("migrate exited with 7".into()),
        }
    );
    let step = run.step("warm_pool_setup", None);
    assert_eq!(step.status, StepStatus::Failed);
    assert_eq!(step.output, "$ fine\nfine\n$ migrate\nabout to fail\n");
    assert_eq!(
        f.sh(run.id, "test -e /home/never && echo ran || echo skipped")
            .await,
        "skipped\n"
    );
    // The VM is the caller's to destroy.
    f.driver.health(run.id).await.unwrap();
}

#[tokio::test]
async fn a_bad_url_fails_clone_repo() {
    let f = Fixture::new();
    f.repo("api", &[("README.md", "api\n")]);
    let mut missing = f.repo_plan("missing", "main");
    missing.dir = "api".into();
    let run = f.provision(&plan(vec![missing])).await;
    assert_eq!(run.summary.failed_step.as_deref(), Some("clone_repo"));
    let error = run.summary.error.clone().unwrap();
    assert!(
        error.starts_with("git clone exited with 128: fatal: "),
        "{error}"
    );
    let step = run.step("clone_repo", Some("api"));
    assert_eq!(step.error.as_deref(), Some(error.as_str()));
    assert!(step.output.contains("fatal: "), "{}", step.output);
    use StepStatus::*;
    assert_eq!(
        run.statuses(),
        [
            Succeeded, Succeeded, Succeeded, Failed, Pending, Pending, Pending, Pending
        ]
    );

    // Nothing listening there at all.
    let mut closed = f.repo_plan("api", "main");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    closed.url = format!("git://127.0.0.1:{port}/api");
    let run = f.provision(&plan(vec![closed])).await;
    let error = run.summary.error.clone().unwrap();
    assert!(
        error.starts_with("git clone exited with 128: ") && error.contains("Connection refused"),
        "{error}"
    );
    let output = &run.step("clone_repo", Some("api")).output;
    assert!(
        output.contains("fatal: unable to connect to 127.0.0.1"),
        "{output}"
    );
}

#[tokio::test]
async fn a_missing_branch_fails_clone_repo_with_gits_message() {
    let f = Fixture::new();
    f.repo("api", &[("README.md", "api\n")]);
    let run = f
        .provision(&plan(vec![f.repo_plan("api", "no-such-branch")]))
        .await;
    assert_eq!(run.summary.failed_step.as_deref(), Some("clone_repo"));
    assert_eq!(
        run.summary.error.as_deref(),
        Some(
            "git clone exited with 128: fatal: Remote branch no-such-branch not found in upstream origin"
        )
    );
    let step = run.step("clone_repo", Some("api"));
    assert!(
        step.output
            .contains("Remote branch no-such-branch not found in upstream origin"),
        "{}",
        step.output
    );
    assert_eq!(
        run.step("init_repo", Some("api")).status,
        StepStatus::Pending
    );
}

#[tokio::test]
async fn secret_values_never_leave_in_any_recorded_step() {
    let f = Fixture::new();
    f.repo("api", &[("README.md", "api\n")]);
    let secret = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let mut plan = plan(vec![f.repo_plan("api", "main")]);
    plan.env = BTreeMap::from([("SECRET_TOKEN".to_owned(), secret.clone())]);
    plan.project_setup = vec![cmd("show", "echo $SECRET_TOKEN")];
    plan.repo_setup = vec![cmd("to-stderr", "echo \"token: $SECRET_TOKEN\" >&2")];
    // Half of it, a pause long enough for a record, then the rest.
    plan.warm_pool_setup = vec![cmd(
        "split",
        "printf 'key=%s' \"${SECRET_TOKEN%????????}\"; sleep 1; printf '%s\\n' \"${SECRET_TOKEN#\"${SECRET_TOKEN%????????}\"}\"",
    )];
    let run = f.provision(&plan).await;
    assert!(run.summary.success, "{:?}", run.summary);
    assert_eq!(run.step("project_setup", None).output, "$ show\n***\n");
    assert_eq!(
        run.step("repo_setup", Some("api")).output,
        "$ to-stderr\ntoken: ***\n"
    );
    assert_eq!(
        run.step("warm_pool_setup", None).output,
        "$ split\nkey=***\n"
    );
    // The first half was recorded on its own, without any of the secret.
    let partials: Vec<&str> = run
        .records
        .iter()
        .map(|r| r.last().unwrap())
        .filter(|s| s.status == StepStatus::Running)
        .map(|s| s.output.as_str())
        .collect();
    assert!(partials.contains(&"$ split\nkey="), "{partials:?}");
    // The value is really there, in the VM.
    assert_eq!(
        f.sh(run.id, "cat /home/.env").await,
        format!("SECRET_TOKEN='{secret}'\n")
    );

    // An error that quotes the value: a branch named after it.
    let mut leaky = plan.clone();
    leaky.repos[0].branch = secret.clone();
    let failed = f.provision(&leaky).await;
    assert_eq!(
        failed.summary.error.as_deref(),
        Some("git clone exited with 128: fatal: Remote branch *** not found in upstream origin")
    );

    // Not the value, nor its first part (the last 8 characters alone could
    // occur by chance in an id).
    let head = &secret[..secret.len() - 8];
    for run in [&run, &failed] {
        let everything = serde_json::to_string(&(&run.records, &run.steps, &run.summary)).unwrap();
        assert!(!everything.contains(head), "{everything}");
    }
}

#[tokio::test]
async fn a_command_past_its_timeout_fails_the_step() {
    let f = Fixture::new();
    let mut plan = plan(vec![]);
    plan.command_timeout = Duration::from_secs(1);
    plan.warm_pool_setup = vec![cmd("sleepy", "echo start; sleep 30")];
    let started = Instant::now();
    let run = f.provision(&plan).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(run.summary.failed_step.as_deref(), Some("warm_pool_setup"));
    assert_eq!(
        run.summary.error.as_deref(),
        Some("sleepy timed out after 1s")
    );
    assert_eq!(
        run.step("warm_pool_setup", None).output,
        "$ sleepy\nstart\n"
    );
}

#[tokio::test]
async fn a_malformed_settings_file_or_a_failing_hook_fails_init_repo() {
    let f = Fixture::new();
    f.repo("broken", &[(".hearth/settings.json", "{hooks: []}")]);
    f.repo(
        "failing",
        &[(
            ".capy/settings.json",
            r#"{"hooks": {"init": [{"name": "lint", "command": "echo linting; exit 9"}, "touch never"]}}"#,
        )],
    );
    let run = f
        .provision(&plan(vec![f.repo_plan("broken", "main")]))
        .await;
    assert_eq!(run.summary.failed_step.as_deref(), Some("init_repo"));
    assert_eq!(
        run.summary.error.as_deref(),
        Some("/home/broken/.hearth/settings.json: key must be a string at line 1 column 2")
    );

    let run = f
        .provision(&plan(vec![f.repo_plan("failing", "main")]))
        .await;
    assert_eq!(run.summary.failed_step.as_deref(), Some("init_repo"));
    assert_eq!(
        run.summary.error.as_deref(),
        Some("hook lint exited with 9")
    );
    assert_eq!(
        run.step("init_repo", Some("failing")).output,
        ".capy/settings.json: 2 init hooks\n$ lint\nlinting\n"
    );
    assert_eq!(
        f.sh(
            run.id,
            "test -e /home/failing/never && echo ran || echo skipped"
        )
        .await,
        "skipped\n"
    );
}
