//! The pipeline against the fake driver (commands echo themselves; `exit N`
//! ends with N), plus a scripted wrapper of it for streamed output, timeouts
//! and driver errors. The real thing runs in `tests/sandbox.rs`.

use async_trait::async_trait;
use hearth_core::ids::{TenantId, VmId};
use hearth_core::resource::DriverKind;
use hearth_drivers::fake::{FakeConfig, FakeDriver};
use hearth_drivers::{
    Driver, DriverError, ExecRequest, ExecResult, GuestHealth, ObservedVm, OutputChunk, Stream,
    VmSpec,
};
use hearth_provisioning::{
    Command, OUTPUT_FLUSH, ProvisionPlan, Recorder, RepoPlan, Step, StepStatus, Summary, provision,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const SECRET: &str = "s3cr3t-Value-42";

/// Keeps every list of steps it is given, with the time.
#[derive(Default)]
struct Recording(Mutex<Vec<(Instant, Vec<Step>)>>);

#[async_trait]
impl Recorder for Recording {
    async fn record(&self, steps: &[Step]) {
        self.0
            .lock()
            .unwrap()
            .push((Instant::now(), steps.to_vec()));
    }
}

impl Recording {
    fn all(&self) -> Vec<(Instant, Vec<Step>)> {
        self.0.lock().unwrap().clone()
    }
}

fn spec() -> VmSpec {
    VmSpec {
        id: VmId::new(),
        tenant: TenantId::new(),
        workspace: "web".into(),
        cpus: 1,
        memory_mib: 256,
        image: Default::default(),
        network: hearth_drivers::NetworkSpec::host(),
        disk_mib: 0,
    }
}

fn cmd(name: &str, command: &str) -> Command {
    Command {
        name: name.into(),
        command: command.into(),
    }
}

fn repo(dir: &str, branch: &str) -> RepoPlan {
    RepoPlan {
        url: format!("https://git.example.org/acme/{dir}.git"),
        branch: branch.into(),
        dir: dir.into(),
    }
}

fn plan() -> ProvisionPlan {
    ProvisionPlan {
        env: BTreeMap::from([
            ("API_TOKEN".to_owned(), SECRET.to_owned()),
            ("GREETING".to_owned(), "it's here".to_owned()),
            ("MODE".to_owned(), "test".to_owned()),
        ]),
        repos: vec![repo("api", "main"), repo("web", "develop")],
        project_setup: vec![cmd("tools", "echo installing tools")],
        repo_setup: vec![cmd("deps", "echo deps")],
        warm_pool_setup: vec![cmd("warm", "echo warming"), cmd("cache", "echo cache")],
        guest_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(30),
    }
}

fn names(steps: &[Step]) -> Vec<(String, Option<String>)> {
    steps
        .iter()
        .map(|s| (s.name.clone(), s.repo.clone()))
        .collect()
}

fn statuses(steps: &[Step]) -> Vec<StepStatus> {
    steps.iter().map(|s| s.status).collect()
}

#[tokio::test]
async fn a_full_run_follows_the_plan_in_order() {
    let driver = FakeDriver::new(FakeConfig::default());
    let (spec, plan, recording) = (spec(), plan(), Recording::default());
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert_eq!(
        summary,
        Summary {
            success: true,
            failed_step: None,
            error: None
        }
    );
    let expected: Vec<(String, Option<String>)> = [
        ("create_vm", None),
        ("ensure_server", None),
        ("set_env_vars", None),
        ("clone_repo", Some("api")),
        ("clone_repo", Some("web")),
        ("init_repo", Some("api")),
        ("init_repo", Some("web")),
        ("project_setup", None),
        ("repo_setup", Some("api")),
        ("repo_setup", Some("web")),
        ("warm_pool_setup", None),
    ]
    .into_iter()
    .map(|(n, r)| (n.to_owned(), r.map(str::to_owned)))
    .collect();
    assert_eq!(names(&steps), expected);
    let mut previous = before;
    for step in &steps {
        assert_eq!(step.status, StepStatus::Succeeded, "{step:?}");
        assert_eq!(step.error, None);
        let started = step.started_at.expect("startedAt");
        assert!(started >= previous, "{step:?}");
        previous = started;
        assert!(step.duration_ms.is_some(), "{step:?}");
    }
    // The last record is the final state.
    assert_eq!(recording.all().last().unwrap().1, steps);
    assert_eq!(driver.count(), 1, "the pipeline never destroys the VM");

    // The commands, in order, each in one piece.
    let execs = driver.execs(spec.id);
    assert_eq!(execs.len(), 2 + 2 + 1 + 2 + 2, "{execs:#?}");
    assert_eq!(
        execs[0],
        "git clone --branch 'main' --single-branch -- 'https://git.example.org/acme/api.git' '/home/api'"
    );
    assert_eq!(
        execs[1],
        "git clone --branch 'develop' --single-branch -- 'https://git.example.org/acme/web.git' '/home/web'"
    );
    assert!(execs[2].contains(".hearth/settings.json") && execs[2].contains(".capy/settings.json"));
    assert_eq!(
        &execs[4..],
        [
            "echo installing tools",
            "echo deps",
            "echo deps",
            "echo warming",
            "echo cache"
        ]
    );

    let output = |name: &str, repo: Option<&str>| {
        steps
            .iter()
            .find(|s| s.name == name && s.repo.as_deref() == repo)
            .unwrap()
            .output
            .clone()
    };
    assert_eq!(
        output("create_vm", None),
        format!("created VM {}\n", spec.id)
    );
    assert!(output("ensure_server", None).starts_with("guest agent answered after "));
    // The fake cannot cat a file: no settings file.
    assert_eq!(output("init_repo", Some("api")), "no settings file\n");
    assert_eq!(
        output("project_setup", None),
        "$ tools\necho installing tools\n"
    );
    assert_eq!(output("repo_setup", Some("web")), "$ deps\necho deps\n");
    assert_eq!(
        output("warm_pool_setup", None),
        "$ warm\necho warming\n$ cache\necho cache\n"
    );
}

#[tokio::test]
async fn the_env_file_is_written_with_mode_0600_and_only_names_are_shown() {
    let driver = FakeDriver::new(FakeConfig::default());
    let (spec, plan, recording) = (spec(), plan(), Recording::default());
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert!(summary.success, "{summary:?}");
    let (contents, mode) = driver.file(spec.id, "/home/.env").expect("/home/.env");
    assert_eq!(mode, 0o600);
    assert_eq!(
        String::from_utf8(contents).unwrap(),
        format!("API_TOKEN='{SECRET}'\nGREETING='it'\\''s here'\nMODE='test'\n")
    );
    assert_eq!(
        steps[2].output,
        "wrote 3 variables to /home/.env: API_TOKEN, GREETING, MODE\n"
    );
}

#[tokio::test]
async fn the_first_failure_stops_the_run() {
    let driver = FakeDriver::new(FakeConfig::default());
    let (spec, recording) = (spec(), Recording::default());
    let mut plan = plan();
    plan.warm_pool_setup = vec![
        cmd("warm", "echo warming"),
        cmd("break-it", "exit 3"),
        cmd("never", "echo never"),
    ];
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert_eq!(
        serde_json::to_value(&summary).unwrap(),
        serde_json::json!({"success": false, "failedStep": "warm_pool_setup", "error": "break-it exited with 3"})
    );
    let last = steps.last().unwrap();
    assert_eq!(last.status, StepStatus::Failed);
    assert_eq!(last.error.as_deref(), Some("break-it exited with 3"));
    assert_eq!(last.output, "$ warm\necho warming\n$ break-it\nexit 3\n");
    assert!(!driver.execs(spec.id).contains(&"echo never".to_owned()));

    // A failure earlier leaves every later step pending.
    let (spec, recording) = (self::spec(), Recording::default());
    let mut plan = self::plan();
    plan.project_setup = vec![cmd("tools", "exit 42")];
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert_eq!(summary.failed_step.as_deref(), Some("project_setup"));
    assert_eq!(summary.error.as_deref(), Some("tools exited with 42"));
    use StepStatus::*;
    assert_eq!(
        statuses(&steps),
        [
            Succeeded, Succeeded, Succeeded, Succeeded, Succeeded, Succeeded, Succeeded, Failed,
            Pending, Pending, Pending
        ]
    );
    for step in &steps[8..] {
        assert_eq!(
            (step.started_at, step.duration_ms, step.output.as_str()),
            (None, None, "")
        );
    }
    assert!(!driver.execs(spec.id).contains(&"echo deps".to_owned()));
    assert_eq!(recording.all().last().unwrap().1, steps);
}

#[tokio::test]
async fn a_vm_that_cannot_boot_fails_create_vm() {
    let driver = FakeDriver::new(FakeConfig::default());
    driver.set_failing("web", true);
    let (spec, plan, recording) = (spec(), plan(), Recording::default());
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert_eq!(summary.failed_step.as_deref(), Some("create_vm"));
    assert_eq!(
        summary.error.as_deref(),
        Some("cannot boot VM: simulated boot failure for workspace web")
    );
    assert_eq!(steps[0].status, StepStatus::Failed);
    assert!(steps[1..].iter().all(|s| s.status == StepStatus::Pending));
    assert_eq!(recording.all().len(), 2, "started, failed");
}

#[tokio::test]
async fn ensure_server_waits_for_the_guest_agent_up_to_guest_timeout() {
    let driver = FakeDriver::new(FakeConfig {
        boot_latency: Duration::from_millis(60),
        failure_rate: 0.0,
    });
    let (spec, plan, recording) = (spec(), plan(), Recording::default());
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert!(summary.success, "{summary:?}");
    assert!(steps[1].duration_ms.unwrap() >= 55, "{:?}", steps[1]);

    driver.set_config(FakeConfig {
        boot_latency: Duration::from_secs(60),
        failure_rate: 0.0,
    });
    let (spec, recording) = (self::spec(), Recording::default());
    let mut plan = plan;
    plan.guest_timeout = Duration::from_millis(100);
    let started = Instant::now();
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(summary.failed_step.as_deref(), Some("ensure_server"));
    assert_eq!(
        summary.error.as_deref(),
        Some("guest agent did not answer within 100ms: guest agent: not up yet")
    );
    assert!(steps[1].duration_ms.unwrap() >= 100);
    assert_eq!(steps[2].status, StepStatus::Pending);
}

#[tokio::test]
async fn ensure_server_fails_at_once_when_the_vm_dies_while_booting() {
    let driver = std::sync::Arc::new(FakeDriver::new(FakeConfig {
        boot_latency: Duration::from_secs(60),
        failure_rate: 0.0,
    }));
    let (spec, recording) = (spec(), Recording::default());
    let mut plan = plan();
    plan.guest_timeout = Duration::from_secs(300);
    let crasher = {
        let (driver, id) = (driver.clone(), spec.id);
        tokio::spawn(async move {
            // Once it exists, its processes die (a launcher that fails).
            while driver.list().await.unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            driver.crash(id);
        })
    };
    let started = Instant::now();
    let (steps, summary) = provision(driver.as_ref(), &spec, &plan, &recording).await;
    crasher.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failed after {:?}, not at the 300 s guest timeout",
        started.elapsed()
    );
    assert_eq!(summary.failed_step.as_deref(), Some("ensure_server"));
    assert_eq!(
        summary.error.as_deref(),
        Some(
            "the VM stopped while booting; the guest agent never answered: guest agent: cannot connect: Connection refused"
        )
    );
    assert_eq!(steps[2].status, StepStatus::Pending);
}

#[tokio::test]
async fn the_recorder_sees_each_step_running_then_finished() {
    let driver = FakeDriver::new(FakeConfig::default());
    let (spec, plan, recording) = (spec(), plan(), Recording::default());
    let (steps, _) = provision(&driver, &spec, &plan, &recording).await;
    let records = recording.all();
    // Without streamed output (the fake's output comes at once): two
    // records per step.
    assert_eq!(records.len(), 2 * steps.len());
    for (i, step) in steps.iter().enumerate() {
        let seen: Vec<StepStatus> = records.iter().map(|(_, r)| r[i].status).collect();
        let mut expected = vec![StepStatus::Pending; 2 * i];
        expected.push(StepStatus::Running);
        expected.resize(records.len(), StepStatus::Succeeded);
        assert_eq!(seen, expected, "{}", step.name);
        let running = &records[2 * i].1[i];
        assert!(running.started_at.is_some() && running.duration_ms.is_none());
        assert_eq!(running.started_at, step.started_at);
        // Every earlier step is already finished in that record.
        assert!(
            records[2 * i].1[..i]
                .iter()
                .all(|s| s.status == StepStatus::Succeeded)
        );
    }
}

#[tokio::test]
async fn secrets_never_leave_in_outputs_or_errors() {
    let driver = FakeDriver::new(FakeConfig::default());
    let (spec, recording) = (spec(), Recording::default());
    let mut plan = plan();
    // The fake echoes each command: these print the secret.
    plan.project_setup = vec![cmd("show", &format!("echo token={SECRET}"))];
    plan.repo_setup = vec![cmd("quoted", "echo it'\\''s here")];
    plan.warm_pool_setup = vec![cmd(&format!("deploy {SECRET}"), "exit 4")];
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert_eq!(summary.error.as_deref(), Some("deploy *** exited with 4"));
    let project = steps.iter().find(|s| s.name == "project_setup").unwrap();
    assert_eq!(project.output, "$ show\necho token=***\n");
    let repo_setup = steps.iter().find(|s| s.name == "repo_setup").unwrap();
    assert_eq!(repo_setup.output, "$ quoted\necho ***\n");
    assert_eq!(steps.last().unwrap().output, "$ deploy ***\nexit 4\n");
    for (_, record) in recording.all() {
        let json = serde_json::to_string(&record).unwrap();
        assert!(
            !json.contains(SECRET) && !json.contains("it's here"),
            "{json}"
        );
    }
    assert!(!serde_json::to_string(&summary).unwrap().contains(SECRET));
}

#[tokio::test]
async fn a_plan_without_repos_or_commands_succeeds_with_empty_outputs() {
    let driver = FakeDriver::new(FakeConfig::default());
    let (spec, recording) = (spec(), Recording::default());
    let plan = ProvisionPlan {
        env: BTreeMap::new(),
        repos: vec![],
        project_setup: vec![],
        repo_setup: vec![cmd("never", "echo never")],
        warm_pool_setup: vec![],
        guest_timeout: Duration::from_secs(1),
        command_timeout: Duration::from_secs(1),
    };
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert!(summary.success);
    let got: Vec<(&str, &str)> = steps
        .iter()
        .map(|s| (s.name.as_str(), s.output.as_str()))
        .collect();
    let created = format!("created VM {}\n", spec.id);
    assert_eq!(got[0], ("create_vm", created.as_str()));
    assert_eq!(
        got[2],
        ("set_env_vars", "wrote 0 variables to /home/.env\n")
    );
    assert_eq!(got[3..], [("project_setup", ""), ("warm_pool_setup", "")]);
    assert_eq!(
        driver.file(spec.id, "/home/.env"),
        Some((Vec::new(), 0o600))
    );
    assert!(driver.execs(spec.id).is_empty());
}

#[test]
fn the_pipeline_can_run_in_a_spawned_task() {
    fn assert_send<T: Send>(_: &T) {}
    let driver = FakeDriver::new(FakeConfig::default());
    let (spec, plan, recording) = (spec(), plan(), Recording::default());
    let run = provision(&driver, &spec, &plan, &recording);
    assert_send(&run);
}

/// The fake, except for scripted commands: timed output chunks, then a
/// result or a driver error.
struct Scripted {
    fake: FakeDriver,
    scripts: HashMap<String, Script>,
}

#[derive(Clone)]
struct Script {
    /// Pause, then the chunk.
    chunks: Vec<(u64, Stream, String)>,
    result: Result<ExecResult, String>,
}

fn exited(exit_code: i32, timed_out: bool) -> Result<ExecResult, String> {
    Ok(ExecResult {
        exit_code,
        timed_out,
    })
}

impl Scripted {
    fn new(scripts: impl IntoIterator<Item = (&'static str, Script)>) -> Self {
        Scripted {
            fake: FakeDriver::new(FakeConfig::default()),
            scripts: scripts
                .into_iter()
                .map(|(c, s)| (c.to_owned(), s))
                .collect(),
        }
    }
}

#[async_trait]
impl Driver for Scripted {
    fn kind(&self) -> DriverKind {
        DriverKind::Fake
    }
    async fn create(&self, spec: &VmSpec) -> hearth_drivers::Result<()> {
        self.fake.create(spec).await
    }
    async fn destroy(&self, id: VmId) -> hearth_drivers::Result<()> {
        self.fake.destroy(id).await
    }
    async fn list(&self) -> hearth_drivers::Result<Vec<ObservedVm>> {
        self.fake.list().await
    }
    async fn exec(
        &self,
        id: VmId,
        request: &ExecRequest,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> hearth_drivers::Result<ExecResult> {
        let Some(script) = self.scripts.get(&request.command).cloned() else {
            return self.fake.exec(id, request, output).await;
        };
        for (pause, stream, data) in script.chunks {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            if let Some(output) = &output {
                let _ = output.send(OutputChunk { stream, data });
            }
        }
        script.result.map_err(DriverError::Guest)
    }
    async fn write_file(
        &self,
        id: VmId,
        path: &str,
        contents: &[u8],
        mode: u32,
    ) -> hearth_drivers::Result<()> {
        self.fake.write_file(id, path, contents, mode).await
    }
    async fn health(&self, id: VmId) -> hearth_drivers::Result<GuestHealth> {
        self.fake.health(id).await
    }
}

fn one_command_plan(command: &str) -> ProvisionPlan {
    ProvisionPlan {
        env: BTreeMap::from([("API_TOKEN".to_owned(), SECRET.to_owned())]),
        repos: vec![],
        project_setup: vec![cmd("build", command)],
        repo_setup: vec![],
        warm_pool_setup: vec![],
        guest_timeout: Duration::from_secs(1),
        command_timeout: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn streamed_output_is_recorded_while_it_comes_at_most_every_flush() {
    let chunks = (0..12)
        .map(|i| {
            let stream = if i % 3 == 0 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            (60, stream, format!("line {i}\n"))
        })
        .collect();
    let driver = Scripted::new([(
        "stream",
        Script {
            chunks,
            result: exited(0, false),
        },
    )]);
    let (spec, plan, recording) = (spec(), one_command_plan("stream"), Recording::default());
    let (steps, summary) = provision(&driver, &spec, &plan, &recording).await;
    assert!(summary.success, "{summary:?}");
    let all: String = (0..12).map(|i| format!("line {i}\n")).collect();
    assert_eq!(steps[3].output, format!("$ build\n{all}"));
    // The records of project_setup while it ran: its start, then output.
    let running: Vec<(Instant, String)> = recording
        .all()
        .into_iter()
        .filter(|(_, r)| r[3].status == StepStatus::Running)
        .map(|(at, r)| (at, r[3].output.clone()))
        .collect();
    assert!(
        running.len() >= 3,
        "720 ms of output: the start and at least 2 flushes, got {}",
        running.len()
    );
    assert_eq!(running[0].1, "", "the start record");
    for pair in running.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= OUTPUT_FLUSH,
            "records {:?} apart",
            pair[1].0 - pair[0].0
        );
        assert!(pair[1].1.len() > pair[0].1.len() && all.len() + 8 > pair[1].1.len());
        assert!(format!("$ build\n{all}").starts_with(&pair[1].1));
    }
}

#[tokio::test]
async fn a_secret_split_across_two_chunks_never_shows() {
    let (head, tail) = SECRET.split_at(6);
    let driver = Scripted::new([(
        "leak",
        Script {
            chunks: vec![
                (0, Stream::Stdout, format!("token={head}")),
                (600, Stream::Stdout, format!("{tail}\ndone\n")),
            ],
            result: exited(0, false),
        },
    )]);
    let (spec, plan, recording) = (spec(), one_command_plan("leak"), Recording::default());
    let (steps, _) = provision(&driver, &spec, &plan, &recording).await;
    assert_eq!(steps[3].output, "$ build\ntoken=***\ndone\n");
    let outputs: Vec<String> = recording
        .all()
        .into_iter()
        .map(|(_, r)| r[3].output.clone())
        .collect();
    // The first chunk was recorded while the second was awaited, without
    // the beginning of the secret.
    assert!(
        outputs.contains(&"$ build\ntoken=".to_owned()),
        "{outputs:?}"
    );
    for output in outputs {
        assert!(!output.contains(head) && !output.contains(tail), "{output}");
    }
}

#[tokio::test]
async fn timeouts_and_driver_errors_fail_the_step_naming_the_command() {
    let driver = Scripted::new([
        (
            "slow",
            Script {
                chunks: vec![(0, Stream::Stdout, "started\n".into())],
                result: exited(-1, true),
            },
        ),
        (
            "broken",
            Script {
                chunks: vec![],
                result: Err(format!("cannot connect: {SECRET} refused")),
            },
        ),
    ]);
    let (steps, summary) = provision(
        &driver,
        &spec(),
        &one_command_plan("slow"),
        &Recording::default(),
    )
    .await;
    assert_eq!(summary.failed_step.as_deref(), Some("project_setup"));
    assert_eq!(summary.error.as_deref(), Some("build timed out after 2s"));
    assert_eq!(steps[3].output, "$ build\nstarted\n");
    assert_eq!(steps[4].status, StepStatus::Pending);

    let (_, summary) = provision(
        &driver,
        &spec(),
        &one_command_plan("broken"),
        &Recording::default(),
    )
    .await;
    assert_eq!(
        summary.error.as_deref(),
        Some("build: guest agent: cannot connect: *** refused")
    );
}
