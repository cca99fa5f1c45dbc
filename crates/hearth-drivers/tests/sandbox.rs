//! The sandbox driver against real sandboxes: namespaces, overlayfs,
//! cgroups and the real guest agent binary. No mocks.
//!
//! **Requirements:** root on Linux with overlayfs and `unshare` (util-linux);
//! cgroups (v1 or v2) for the limit test. Not root → every test fails with
//! a message saying so, rather than passing without testing anything.
//!
//! **The agent binary.** Cargo builds another package's binary only when
//! something depends on it as a binary, which nothing stable can say. So
//! each test process builds it once, first thing: `$CARGO build -p
//! hearth-guest-agent --bin hearth-guest-agent --message-format=json`, run
//! from this crate's folder with the test's own environment (same target
//! dir, same profile flags), and takes the path from the `compiler-artifact`
//! message's `executable`. This is a no-op when the binary is up to date,
//! rebuilds it when the agent's sources changed (never a stale agent), and
//! follows any `CARGO_TARGET_DIR`. `HEARTH_GUEST_AGENT` set in the
//! environment skips the build and is used as is. The path reaches the
//! driver through `SandboxConfig::agent_binary` (setting the variable from
//! a test would need `unsafe` in edition 2024).
//!
//! **Isolation of the tests.** Each test has its own state folder under
//! Cargo's target tmp folder and its own cgroup root name
//! (`hearth-test-<uuid>`); an [`Env`] guard destroys every sandbox of its
//! driver and removes its cgroup roots and folders when dropped, panics
//! included.

mod support;

use hearth_core::ids::{TenantId, VmId};
use hearth_drivers::sandbox::{SandboxConfig, SandboxDriver, find_agent_binary, short_id};
use hearth_drivers::{
    Driver, DriverError, ExecRequest, ExecResult, ImageSpec, OutputChunk, Stream, VmSpec,
};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::mpsc;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the sandbox tests need root (namespaces, overlayfs, cgroups)"
    );
}

/// A driver on a state folder of its own, cleaned up on drop.
struct Env {
    driver: SandboxDriver,
    base: PathBuf,
}

impl Env {
    fn new() -> Self {
        Self::with(|_, _| {})
    }

    /// `adjust` gets the test's base folder and the configuration to change.
    fn with(adjust: impl FnOnce(&Path, &mut SandboxConfig)) -> Self {
        require_root();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        // Under /var/tmp, not the target dir: a checkout under /tmp would
        // put the test's paths where every sandbox has a /tmp of its own,
        // so what a test shows a sandbox must live elsewhere.
        let base = Path::new("/var/tmp/hearth-tests").join(format!("hs-{}", &tag[..10]));
        fs::create_dir_all(&base).unwrap();
        let mut config = SandboxConfig::new(base.join("state"), agent_binary());
        config.cgroup_root_name = format!("hearth-test-{tag}");
        config.default_root = Some(base_image());
        adjust(&base, &mut config);
        Env {
            driver: SandboxDriver::new(config),
            base,
        }
    }

    /// A second driver instance on the same state (a restarted server).
    fn restarted(&self) -> SandboxDriver {
        SandboxDriver::new(self.driver.config().clone())
    }

    fn spec(&self, memory_mib: u64) -> VmSpec {
        VmSpec {
            id: VmId::new(),
            tenant: TenantId::new(),
            workspace: "web".into(),
            cpus: 1,
            memory_mib,
            image: ImageSpec::default(),
            network: hearth_drivers::NetworkSpec::none(),
            disk_mib: 0,
        }
    }

    /// Creates a sandbox and waits until its agent answers; returns its id.
    async fn boot(&self, memory_mib: u64) -> VmId {
        let spec = self.spec(memory_mib);
        self.driver.create(&spec).await.expect("create");
        wait_healthy(&self.driver, spec.id).await;
        spec.id
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        clean_up_sandboxes(&self.driver, &self.base);
    }
}

/// A finished command.
#[derive(Debug)]
struct Ran {
    result: ExecResult,
    stdout: String,
    stderr: String,
}

async fn run_request(driver: &SandboxDriver, id: VmId, request: ExecRequest) -> Ran {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let result = driver
        .exec(id, &request, Some(tx))
        .await
        .unwrap_or_else(|e| panic!("exec {:?}: {e}", request.command));
    let (mut stdout, mut stderr) = (String::new(), String::new());
    while let Some(chunk) = rx.recv().await {
        match chunk.stream {
            Stream::Stdout => stdout.push_str(&chunk.data),
            Stream::Stderr => stderr.push_str(&chunk.data),
        }
    }
    Ran {
        result,
        stdout,
        stderr,
    }
}

async fn run(driver: &SandboxDriver, id: VmId, command: &str) -> Ran {
    run_request(driver, id, ExecRequest::new(command)).await
}

/// stdout of a command that must succeed.
async fn sh(driver: &SandboxDriver, id: VmId, command: &str) -> String {
    let ran = run(driver, id, command).await;
    assert_eq!(ran.result.exit_code, 0, "{command}: {ran:?}");
    ran.stdout
}

/// Host processes whose command line mentions `needle` (zombies have none).
fn processes_naming(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then_some((pid, cmdline))
        })
        .collect()
}

/// Asserts that nothing of the VM is left on the host.
fn assert_gone(driver: &SandboxDriver, id: VmId, cgroups: &[PathBuf]) {
    let vm_dir = driver.vm_dir(id);
    assert_eq!(
        processes_naming(&id.to_string()),
        vec![],
        "processes of {id} remain"
    );
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(vm_dir.to_str().unwrap()),
        "a mount of {} remains:\n{mountinfo}",
        vm_dir.display()
    );
    for dir in cgroups {
        assert!(!dir.exists(), "the cgroup {} remains", dir.display());
    }
    assert!(!vm_dir.exists(), "{} remains", vm_dir.display());
}

/// One request, written straight to the agent's socket; the answer lines.
fn raw_request(driver: &SandboxDriver, id: VmId, line: &str) -> Vec<String> {
    // Through /proc/self/fd: the socket's path may exceed sun_path.
    let run_dir = fs::File::open(driver.vm_dir(id).join("run")).unwrap();
    let socket = format!(
        "/proc/self/fd/{}/agent.sock",
        std::os::fd::AsRawFd::as_raw_fd(&run_dir)
    );
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    BufReader::new(stream).lines().map(Result::unwrap).collect()
}

#[tokio::test]
async fn boot_answers_health_and_list_reports_it() {
    let env = Env::new();
    let spec = env.spec(256);
    let started = Instant::now();
    env.driver.create(&spec).await.unwrap();
    wait_healthy(&env.driver, spec.id).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "boot took {:?}",
        started.elapsed()
    );
    let health = env.driver.health(spec.id).await.unwrap();
    assert!(health.uptime_ms < 60_000);
    let listed = env.driver.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].id,
            listed[0].tenant,
            listed[0].workspace.as_str(),
            listed[0].running
        ),
        (spec.id, spec.tenant, "web", true)
    );
}

#[tokio::test]
async fn exec_streams_stdout_and_stderr_and_returns_the_exit_code() {
    let env = Env::new();
    let id = env.boot(256).await;
    let ran = run(
        &env.driver,
        id,
        "echo out; echo err >&2; printf 'é€'; exit 0",
    )
    .await;
    assert_eq!(
        ran.result,
        ExecResult {
            exit_code: 0,
            timed_out: false
        }
    );
    assert_eq!(
        (ran.stdout.as_str(), ran.stderr.as_str()),
        ("out\né€", "err\n")
    );
    let ran = run(&env.driver, id, "echo failing >&2; exit 7").await;
    assert_eq!(
        ran.result,
        ExecResult {
            exit_code: 7,
            timed_out: false
        }
    );
    assert_eq!(ran.stderr, "failing\n");
    let ran = run(&env.driver, id, "kill -TERM $$").await;
    assert_eq!(ran.result.exit_code, 128 + 15, "killed by SIGTERM: {ran:?}");

    // Output arrives while the command still runs.
    let driver = env.driver.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<OutputChunk>();
    let started = Instant::now();
    let exec = tokio::spawn(async move {
        driver
            .exec(
                id,
                &ExecRequest::new("echo first; sleep 1; echo second"),
                Some(tx),
            )
            .await
    });
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let first_at = started.elapsed();
    assert_eq!(
        first,
        OutputChunk {
            stream: Stream::Stdout,
            data: "first\n".into()
        }
    );
    assert!(
        first_at < Duration::from_millis(900),
        "the first line came after {first_at:?}"
    );
    assert_eq!(exec.await.unwrap().unwrap().exit_code, 0);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(rx.recv().await.unwrap().data, "second\n");
}

#[tokio::test]
async fn exec_timeout_kills_the_command_and_its_children() {
    let env = Env::new();
    let id = env.boot(256).await;
    let mut request = ExecRequest::new("sleep 60 & echo $! > /tmp/child; echo started; sleep 60");
    request.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let ran = run_request(&env.driver, id, request).await;
    assert_eq!(
        ran.result,
        ExecResult {
            exit_code: -1,
            timed_out: true
        }
    );
    assert_eq!(ran.stdout, "started\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The background child died with the group (and init reaped it).
    let ran = run(
        &env.driver,
        id,
        "kill -0 $(cat /tmp/child) 2>/dev/null && echo alive || echo dead",
    )
    .await;
    assert_eq!(ran.stdout, "dead\n");
}

#[tokio::test]
async fn a_client_that_goes_away_kills_its_command() {
    let env = Env::new();
    let id = env.boot(256).await;
    let abandoned = tokio::time::timeout(
        Duration::from_millis(500),
        env.driver.exec(
            id,
            &ExecRequest::new("echo $$ > /tmp/pid; exec sleep 60"),
            None,
        ),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the command should still have been running"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ran = run(
            &env.driver,
            id,
            "kill -0 $(cat /tmp/pid) 2>/dev/null && echo alive || echo dead",
        )
        .await;
        if ran.stdout == "dead\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned command is still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn env_cwd_and_vm_id_are_honoured() {
    let env = Env::new();
    let id = env.boot(256).await;
    let mut request = ExecRequest::new(
        "pwd; echo \"$GREETING\"; echo \"$HEARTH_VM_ID\"; echo \"$HOME\"; echo \"$PATH\"",
    );
    request.cwd = "/tmp".into();
    request.env = BTreeMap::from([("GREETING".to_owned(), "hello there".to_owned())]);
    let ran = run_request(&env.driver, id, request).await;
    assert_eq!(ran.result.exit_code, 0, "{ran:?}");
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "/tmp",
            "hello there",
            &id.to_string(),
            "/root",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        ]
    );
    // The default cwd is /home; a missing cwd is an error.
    assert_eq!(sh(&env.driver, id, "pwd").await, "/home\n");
    let mut request = ExecRequest::new("true");
    request.cwd = "/nowhere".into();
    let err = env.driver.exec(id, &request, None).await.unwrap_err();
    assert!(
        matches!(&err, DriverError::Guest(m) if m.contains("/nowhere")),
        "{err:?}"
    );
}

#[tokio::test]
async fn write_file_creates_folders_and_sets_the_mode() {
    let env = Env::new();
    let id = env.boot(256).await;
    env.driver
        .write_file(id, "/home/.env", b"API_KEY=abc\n", 0o600)
        .await
        .unwrap();
    assert_eq!(
        sh(&env.driver, id, "stat -c %a /home/.env; cat /home/.env").await,
        "600\nAPI_KEY=abc\n"
    );
    env.driver
        .write_file(id, "/home/deep/er/bin", &[0, 255, 1], 0o755)
        .await
        .unwrap();
    assert_eq!(
        sh(
            &env.driver,
            id,
            "stat -c %a /home/deep/er/bin; od -An -tx1 /home/deep/er/bin"
        )
        .await,
        "755\n 00 ff 01\n"
    );
    // Replacing keeps no temporary file around.
    env.driver
        .write_file(id, "/home/.env", b"API_KEY=def\n", 0o600)
        .await
        .unwrap();
    assert_eq!(
        sh(&env.driver, id, "cat /home/.env; ls -A /home").await,
        "API_KEY=def\n.env\ndeep\n"
    );
    // /home is in the VM's writable layer on the host.
    assert_eq!(
        fs::read(env.driver.vm_dir(id).join("disk/upper/home/.env")).unwrap(),
        b"API_KEY=def\n"
    );
    let err = env
        .driver
        .write_file(id, "relative", b"x", 0o600)
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Guest(_)), "{err:?}");
}

#[tokio::test]
async fn a_wrong_or_missing_secret_is_refused() {
    let env = Env::new();
    let id = env.boot(256).await;
    let unauthorized = vec![r#"{"type":"error","message":"unauthorized"}"#.to_owned()];
    let attack = r#""op":"exec","command":"touch /tmp/pwned","cwd":"/"}"#;
    assert_eq!(
        raw_request(&env.driver, id, &format!(r#"{{"secret":"wrong",{attack}"#)),
        unauthorized
    );
    assert_eq!(
        raw_request(&env.driver, id, &format!("{{{attack}")),
        unauthorized
    );
    assert_eq!(raw_request(&env.driver, id, "not json"), unauthorized);
    assert_eq!(
        sh(&env.driver, id, "test -e /tmp/pwned && echo yes || echo no").await,
        "no\n"
    );
    // The right secret works over the same raw socket.
    let secret = fs::read_to_string(env.driver.vm_dir(id).join("secret")).unwrap();
    let answer = raw_request(
        &env.driver,
        id,
        &format!(r#"{{"secret":"{}","op":"health"}}"#, secret.trim()),
    );
    assert!(
        answer.len() == 1 && answer[0].starts_with(r#"{"type":"health","uptime_ms":"#),
        "{answer:?}"
    );
    assert_eq!(
        fs::metadata(env.driver.vm_dir(id).join("secret"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[tokio::test]
async fn the_filesystem_is_isolated_from_the_host() {
    let env = Env::new();
    let id = env.boot(256).await;
    let probe = format!("/etc/hearth-probe-{}", short_id(id));
    sh(&env.driver, id, &format!("echo inside > {probe}")).await;
    assert_eq!(
        sh(&env.driver, id, &format!("cat {probe}")).await,
        "inside\n"
    );
    assert!(!Path::new(&probe).exists(), "{probe} leaked to the host");
    let host_tmp = PathBuf::from(format!("/tmp/hearth-host-probe-{}", short_id(id)));
    fs::write(&host_tmp, "host").unwrap();
    let seen = sh(
        &env.driver,
        id,
        &format!(
            "test -e {} && echo visible || echo invisible",
            host_tmp.display()
        ),
    )
    .await;
    fs::remove_file(&host_tmp).unwrap();
    assert_eq!(seen, "invisible\n");
    // The image is read-only underneath: the write went to the upper layer.
    assert!(
        env.driver
            .vm_dir(id)
            .join("disk/upper")
            .join(probe.trim_start_matches('/'))
            .exists()
    );
}

#[tokio::test]
async fn hostname_is_the_short_id_and_pid_1_is_init() {
    let env = Env::new();
    let id = env.boot(256).await;
    assert_eq!(
        sh(&env.driver, id, "hostname").await,
        format!("{}\n", short_id(id))
    );
    let init = sh(&env.driver, id, "tr '\\0' ' ' < /proc/1/cmdline").await;
    assert!(init.contains("hearth-guest-agent init"), "{init}");
    // Only the sandbox's own processes: init, the agent, this shell and ps.
    let ps = sh(&env.driver, id, "ps -e -o pid=,comm=").await;
    let pids: Vec<u32> = ps
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(
        pids.len() <= 5 && pids.contains(&1) && pids.iter().all(|&p| p < 100),
        "{ps}"
    );
    let in_proc = sh(&env.driver, id, "ls /proc | grep -c '^[0-9]'").await;
    assert!(in_proc.trim().parse::<u32>().unwrap() <= 5, "{in_proc}");
}

#[tokio::test]
async fn hidden_paths_and_the_state_folder_are_empty_inside() {
    let env = Env::with(|base, config| {
        config.hide = vec![
            base.join("data"),
            base.join("admin-token"),
            // Would cover the sandbox's own mounts: skipped, not fatal.
            PathBuf::from("/"),
            PathBuf::from("/run"),
        ]
    });
    fs::create_dir_all(env.base.join("data")).unwrap();
    fs::write(env.base.join("data/store.db"), "secret rows").unwrap();
    fs::write(env.base.join("admin-token"), "hth_secret").unwrap();
    // The weaker setting an operator may choose: the host's root as the
    // image (the default image holds none of these paths at all).
    let mut spec = env.spec(256);
    spec.image.root_dir = Some(PathBuf::from("/"));
    env.driver.create(&spec).await.expect("create");
    wait_healthy(&env.driver, spec.id).await;
    let id = spec.id;
    let data = env.base.join("data");
    assert_eq!(
        sh(&env.driver, id, &format!("ls -A {}", data.display())).await,
        ""
    );
    assert_eq!(
        sh(
            &env.driver,
            id,
            &format!("cat {}", env.base.join("admin-token").display())
        )
        .await,
        ""
    );
    let state = env.driver.config().state_dir.clone();
    assert_eq!(
        sh(&env.driver, id, &format!("ls -A {}", state.display())).await,
        ""
    );
    // And the mask is read-only.
    let ran = run(&env.driver, id, &format!("touch {}/x", data.display())).await;
    assert_ne!(ran.result.exit_code, 0);
    // The rest of the base folder is visible (the lower layer is the host's /).
    assert_eq!(
        sh(
            &env.driver,
            id,
            &format!("test -d {} && echo yes", env.base.display())
        )
        .await,
        "yes\n"
    );
}

#[tokio::test]
async fn the_memory_limit_is_applied_and_enforced() {
    let env = Env::new();
    let id = env.boot(64).await;
    let cgroups = env.driver.cgroup_dirs(id);
    assert!(
        !cgroups.is_empty(),
        "this host has cgroups; the VM should have some"
    );
    let limit = cgroups
        .iter()
        .find_map(|d| {
            fs::read_to_string(d.join("memory.max"))
                .or_else(|_| fs::read_to_string(d.join("memory.limit_in_bytes")))
                .ok()
        })
        .expect("a memory cgroup");
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let quota = cgroups
        .iter()
        .find_map(|d| {
            fs::read_to_string(d.join("cpu.max"))
                .or_else(|_| fs::read_to_string(d.join("cpu.cfs_quota_us")))
                .ok()
        })
        .expect("a cpu cgroup");
    assert!(
        quota.trim() == "100000" || quota.trim() == "100000 100000",
        "{quota}"
    );
    // tail keeps a line-less 200 MiB input in memory: the OOM killer ends it.
    let mut request = ExecRequest::new("head -c 200M /dev/zero | tail > /dev/null");
    request.timeout = Duration::from_secs(60);
    let ran = run_request(&env.driver, id, request).await;
    assert_eq!(
        ran.result,
        ExecResult {
            exit_code: 128 + 9,
            timed_out: false
        },
        "{ran:?}"
    );
    // Small allocations still work, and the agent survived.
    assert_eq!(
        sh(&env.driver, id, "head -c 8M /dev/zero | tail | wc -c").await,
        "8388608\n"
    );
    env.driver.health(id).await.unwrap();
}

#[tokio::test]
async fn two_sandboxes_do_not_see_each_others_files() {
    let env = Env::new();
    let (a, b) = (env.boot(256).await, env.boot(256).await);
    sh(
        &env.driver,
        a,
        "echo a > /home/mine; echo a > /etc/hearth-mine; echo a > /tmp/mine",
    )
    .await;
    for path in ["/home/mine", "/etc/hearth-mine", "/tmp/mine"] {
        assert_eq!(
            sh(
                &env.driver,
                b,
                &format!("test -e {path} && echo seen || echo unseen")
            )
            .await,
            "unseen\n",
            "{path}"
        );
    }
    // Nor through the host's view of A's folder.
    let a_home = env.driver.vm_dir(a).join("disk/upper/home/mine");
    assert!(a_home.exists());
    assert_eq!(
        sh(
            &env.driver,
            b,
            &format!("test -e {} && echo seen || echo unseen", a_home.display())
        )
        .await,
        "unseen\n"
    );
}

#[tokio::test]
async fn destroy_leaves_nothing_and_is_idempotent() {
    let env = Env::new();
    let id = env.boot(256).await;
    // A process that left the command's process group and session.
    sh(
        &env.driver,
        id,
        "setsid sleep 600 > /dev/null 2>&1 < /dev/null & echo ok",
    )
    .await;
    let cgroups = env.driver.cgroup_dirs(id);
    assert!(!processes_naming(&id.to_string()).is_empty());
    env.driver.destroy(id).await.unwrap();
    assert_gone(&env.driver, id, &cgroups);
    env.driver.destroy(id).await.unwrap();
    assert!(env.driver.list().await.unwrap().is_empty());
    assert!(matches!(env.driver.health(id).await, Err(DriverError::NotFound(x)) if x == id));
    assert!(matches!(
        env.driver.exec(id, &ExecRequest::new("true"), None).await,
        Err(DriverError::NotFound(_))
    ));
    // Destroying what never existed is fine too.
    env.driver.destroy(VmId::new()).await.unwrap();
}

#[tokio::test]
async fn a_restarted_driver_adopts_running_sandboxes() {
    let env = Env::new();
    let id = env.boot(256).await;
    let cgroups = env.driver.cgroup_dirs(id);
    let adopter = env.restarted();
    let listed = adopter.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].id == id && listed[0].running, "{listed:?}");
    assert_eq!(sh(&adopter, id, "echo adopted").await, "adopted\n");
    adopter.destroy(id).await.unwrap();
    assert_gone(&adopter, id, &cgroups);
    assert!(env.driver.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_sandbox_whose_launcher_was_killed_is_not_running_and_still_destroyed() {
    let env = Env::new();
    let id = env.boot(256).await;
    let cgroups = env.driver.cgroup_dirs(id);
    let pid: i32 = fs::read_to_string(env.driver.vm_dir(id).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = env.driver.list().await.unwrap();
        assert_eq!(
            listed.len(),
            1,
            "a dead sandbox is still listed until destroyed"
        );
        if !listed[0].running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running after its launcher was killed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its init dies with the launcher (parent-death signal), a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.driver.health(id).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the guest agent outlived its launcher"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    env.driver.destroy(id).await.unwrap();
    assert_gone(&env.driver, id, &cgroups);
}

#[tokio::test]
async fn a_failed_boot_reports_the_console_and_leaves_nothing() {
    let env = Env::new();
    // An empty image: the overlay mounts, but the agent cannot run there
    // (no dynamic loader), so init fails after the launch.
    let image = env.base.join("empty-image");
    fs::create_dir_all(&image).unwrap();
    let mut spec = env.spec(256);
    spec.image.root_dir = Some(image);
    let err = env.driver.create(&spec).await.unwrap_err();
    let DriverError::Boot(message) = &err else {
        panic!("{err:?}")
    };
    assert!(
        message.contains("exec /run/hearth/hearth-guest-agent"),
        "{message}"
    );
    assert_gone(&env.driver, spec.id, &[]);
    assert!(env.driver.list().await.unwrap().is_empty());
    let leftovers: Vec<_> = env
        .driver
        .cgroup_roots()
        .iter()
        .flat_map(|r| fs::read_dir(r).unwrap())
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A missing image fails before anything starts.
    let mut spec = env.spec(256);
    spec.image.root_dir = Some(env.base.join("missing"));
    assert!(matches!(
        env.driver.create(&spec).await,
        Err(DriverError::Boot(_))
    ));
    assert_gone(&env.driver, spec.id, &[]);
}

#[test]
fn find_agent_binary_finds_the_agent_beside_the_test_binary() {
    let built = agent_binary();
    let found = find_agent_binary().expect("an agent binary");
    if std::env::var_os("HEARTH_GUEST_AGENT").is_some_and(|v| !v.is_empty()) {
        assert_eq!(found, built);
    } else {
        // The test binary is in target/<profile>/deps, the agent one up.
        assert_eq!(
            fs::canonicalize(found).unwrap(),
            fs::canonicalize(built).unwrap()
        );
    }
}

#[tokio::test]
async fn the_network_namespace_follows_the_spec() {
    let env = Env::new();
    let isolated = env.boot(256).await;
    assert_eq!(sh(&env.driver, isolated, "ls /sys/class/net").await, "lo\n");
    let mut spec = env.spec(256);
    spec.network = hearth_drivers::NetworkSpec::host();
    env.driver.create(&spec).await.unwrap();
    wait_healthy(&env.driver, spec.id).await;
    let mut host: Vec<String> = fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    host.sort();
    let inside = sh(&env.driver, spec.id, "ls /sys/class/net").await;
    assert_eq!(inside.lines().collect::<Vec<_>>(), host);
}

#[tokio::test]
async fn a_socket_path_longer_than_sun_path_still_reaches_the_agent() {
    let env = Env::with(|base, config| {
        config.state_dir = base.join("a-state-folder-with-a-name-long-enough-to-overflow-sun-path")
    });
    let id = env.boot(256).await;
    assert!(
        env.driver
            .vm_dir(id)
            .join("run/agent.sock")
            .as_os_str()
            .len()
            > 108
    );
    assert_eq!(sh(&env.driver, id, "echo far").await, "far\n");
    let cgroups = env.driver.cgroup_dirs(id);
    env.driver.destroy(id).await.unwrap();
    assert_gone(&env.driver, id, &cgroups);
}

#[tokio::test]
async fn a_relative_state_folder_is_made_absolute() {
    // `../..` up to `/` from the current folder, then down to the base.
    let up = std::env::current_dir().unwrap().components().count() - 1;
    let env = Env::with(|base, config| {
        let mut relative: PathBuf = std::iter::repeat_n("..", up).collect();
        relative.push(base.strip_prefix("/").unwrap());
        config.state_dir = relative.join("state");
    });
    assert!(env.driver.config().state_dir.is_relative());
    let id = env.boot(256).await;
    assert!(env.driver.vm_dir(id).is_absolute());
    assert_eq!(sh(&env.driver, id, "echo ok").await, "ok\n");
    assert_eq!(env.driver.list().await.unwrap().len(), 1);
}

/// Boot latency (create → health answering), reset (of a sealed VM, until
/// its agent answers again) and destroy time over 20 sandboxes:
/// `cargo test -p hearth-drivers --test sandbox -- --ignored --nocapture boot_time`.
#[tokio::test]
#[ignore = "a measurement, not a test"]
async fn boot_time() {
    let env = Env::new();
    let (mut boots, mut resets, mut destroys) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..20 {
        let spec = env.spec(256);
        let started = Instant::now();
        env.driver.create(&spec).await.unwrap();
        wait_healthy(&env.driver, spec.id).await;
        boots.push(started.elapsed());
        env.driver.seal(spec.id).await.unwrap();
        let started = Instant::now();
        env.driver.reset(spec.id).await.unwrap();
        resets.push(started.elapsed());
        let started = Instant::now();
        env.driver.destroy(spec.id).await.unwrap();
        destroys.push(started.elapsed());
    }
    for (what, times) in [
        ("boot (create → health)", &mut boots),
        ("reset (kill → fresh layer → health)", &mut resets),
        ("destroy", &mut destroys),
    ] {
        times.sort();
        let (median, min, max) = (times[times.len() / 2], times[0], times[times.len() - 1]);
        println!(
            "{what} over {}: median {median:?}, min {min:?}, max {max:?}",
            times.len()
        );
    }
}

/// Follows a job from `offset` to its end: (end, output of both streams).
async fn attach(driver: &SandboxDriver, id: VmId, job: &str, offset: u64) -> (ExecResult, String) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let end = tokio::time::timeout(
        Duration::from_secs(30),
        driver.attach_job(id, job, offset, Some(tx)),
    )
    .await
    .expect("the attach never ended")
    .unwrap_or_else(|e| panic!("attach {job} from {offset}: {e}"));
    let mut output = String::new();
    while let Some(chunk) = rx.recv().await {
        output.push_str(&chunk.data);
    }
    (end, output)
}

#[tokio::test]
async fn a_job_outlives_its_connection_and_is_followed_again_from_any_offset() {
    let env = Env::new();
    let id = env.boot(256).await;
    let job = "agent-test-0";
    let command = "echo run >> /tmp/runs; echo before; echo oops >&2; \
                   while [ ! -e /tmp/go ]; do sleep 0.05; done; echo after; exit 7";
    env.driver
        .start_job(id, job, &ExecRequest::new(command))
        .await
        .unwrap();
    // Attach, read the first lines, and drop the connection mid-output.
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<OutputChunk>();
        let follow = env.driver.attach_job(id, job, 0, Some(tx));
        tokio::pin!(follow);
        let mut seen = String::new();
        while !seen.contains("oops\n") {
            tokio::select! {
                chunk = rx.recv() => seen.push_str(&chunk.expect("output").data),
                end = &mut follow => panic!("the job ended early: {end:?}"),
            }
        }
    }
    // The client is gone; the job runs on: release it, it finishes.
    sh(&env.driver, id, "touch /tmp/go").await;
    let (end, all) = attach(&env.driver, id, job, 0).await;
    assert_eq!(
        end,
        ExecResult {
            exit_code: 7,
            timed_out: false
        }
    );
    assert!(
        all == "before\noops\nafter\n" || all == "oops\nbefore\nafter\n",
        "{all:?}"
    );
    // From an offset: the bytes after it, and the exit again.
    let (again, rest) = attach(&env.driver, id, job, 12).await;
    assert_eq!((again, rest.as_str()), (end, "after\n"));
    let (_, nothing) = attach(&env.driver, id, job, all.len() as u64).await;
    assert_eq!(nothing, "");
    // Starting the same job again starts nothing.
    env.driver
        .start_job(id, job, &ExecRequest::new(command))
        .await
        .unwrap();
    assert_eq!(attach(&env.driver, id, job, 0).await.0, end);
    assert_eq!(sh(&env.driver, id, "cat /tmp/runs").await, "run\n");
    // The output is root's alone.
    assert_eq!(
        sh(
            &env.driver,
            id,
            "stat -c %a /run/hearth-jobs /run/hearth-jobs/agent-test-0"
        )
        .await,
        "700\n700\n"
    );
    // An unknown job is an error naming it, which retrying cannot mend.
    match env.driver.attach_job(id, "nope", 0, None).await {
        Err(DriverError::Job(message)) => assert!(message.contains("nope"), "{message}"),
        other => panic!("attach to no job: {other:?}"),
    }
    // A VM that is gone is NotFound.
    env.driver.destroy(id).await.unwrap();
    assert!(matches!(
        env.driver.attach_job(id, job, 0, None).await,
        Err(DriverError::NotFound(_))
    ));
}

/// Attacks on job ids: paths out of the jobs folder, through the driver
/// and through a raw request with the right secret, and a job request
/// without the secret. Nothing is created or read outside the folder.
#[tokio::test]
async fn job_ids_that_are_paths_are_refused() {
    let env = Env::new();
    let id = env.boot(256).await;
    for bad in ["../escape", "..", "a/b", "/tmp/escape", ""] {
        match env
            .driver
            .start_job(id, bad, &ExecRequest::new("touch /tmp/pwned"))
            .await
        {
            Err(DriverError::Job(message)) => {
                assert!(message.starts_with("job id"), "{bad:?}: {message}")
            }
            other => panic!("job id {bad:?} accepted: {other:?}"),
        }
    }
    let secret = fs::read_to_string(env.driver.vm_dir(id).join("secret")).unwrap();
    let secret = secret.trim();
    for (op, job) in [("job_start", "../escape"), ("job_attach", "../hearth")] {
        let answer = raw_request(
            &env.driver,
            id,
            &format!(
                r#"{{"secret":"{secret}","op":"{op}","job":"{job}","command":"touch /tmp/pwned"}}"#
            ),
        );
        assert_eq!(answer.len(), 1, "{answer:?}");
        assert!(
            answer[0].starts_with(r#"{"type":"error","message":"job id "#),
            "{op} {job}: {answer:?}"
        );
    }
    let unauthorized = raw_request(
        &env.driver,
        id,
        r#"{"secret":"wrong","op":"job_start","job":"j","command":"touch /tmp/pwned"}"#,
    );
    assert_eq!(
        unauthorized,
        vec![r#"{"type":"error","message":"unauthorized"}"#.to_owned()]
    );
    assert_eq!(
        sh(
            &env.driver,
            id,
            "test -e /tmp/pwned || test -e /run/escape || test -e /tmp/escape || test -e /run/hearth-jobs; echo $?"
        )
        .await,
        "1\n"
    );
}
