//! `hearth-bench provision`: the provisioning pipeline on a real git
//! repository against the same work done by hand, side by side in one run.
//!
//! Each round boots two fresh sandboxes with the real driver. On one,
//! `hearth_provisioning::provision` runs the whole pipeline (create_vm …
//! warm_pool_setup) with its recorder persisting every step into a real
//! SQLite store, as the server does. On the other, the same work is done
//! "by hand": create, wait for the guest agent, then the same commands in
//! one `exec` each (write `/home/.env`, `git clone`, the init hook, the
//! setup commands) with nothing recorded. The difference is the pipeline's
//! own cost: step bookkeeping, streaming and redaction of output, and the
//! store writes. Rounds alternate which goes first.

use crate::machine::Machine;
use crate::report;
use crate::stats::{Summary, millis};
use crate::table::{Table, summary_cells};
use anyhow::{Context, Result, bail};
use hearth_core::ids::{InstanceId, TenantId, VmId};
use hearth_drivers::sandbox::{SandboxConfig, SandboxDriver};
use hearth_drivers::{Driver, ExecRequest, VmSpec};
use hearth_provisioning::{Command, ProvisionPlan, Recorder, RepoPlan, Step};
use hearth_store::{InstanceRecord, InstanceStatus, NewToken, SqliteStore, Store};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    /// Rounds (each: one pipeline run and one by-hand run).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Files in the benchmark repository.
    #[arg(long, default_value_t = 400)]
    files: usize,
    /// The guest agent binary (default: `hearth-guest-agent` next to this one).
    #[arg(long)]
    guest_agent: Option<PathBuf>,
    /// Where to write the JSON results (default: target/bench/provision.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct ProvisionReport {
    benchmark: &'static str,
    machine: Machine,
    runs: usize,
    files: usize,
    pipeline_ms: Option<Summary>,
    by_hand_ms: Option<Summary>,
    /// (pipeline p50 − by-hand p50) / by-hand p50, in percent.
    overhead_percent: Option<f64>,
}

/// Persists steps like the server's recorder: one UPDATE per change.
struct StoreRecorder {
    store: Arc<dyn Store>,
    instance: InstanceId,
}

#[async_trait::async_trait]
impl Recorder for StoreRecorder {
    async fn record(&self, steps: &[Step]) {
        let json = serde_json::to_value(steps).unwrap_or_default();
        let _ = self
            .store
            .update_instance(self.instance, InstanceStatus::Provisioning, &json, None)
            .await;
    }
}

/// A git daemon serving one repository made for the benchmark.
struct Repo {
    _dir: tempfile::TempDir,
    url: String,
    daemon: Child,
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let status = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@localhost",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .context("run git")?;
    if !status.success() {
        bail!("git {args:?} failed");
    }
    Ok(())
}

fn make_repo(files: usize) -> Result<Repo> {
    let root = tempfile::Builder::new()
        .prefix("hearth-bench-git-")
        .tempdir_in("/var/tmp")?;
    let dir = root.path().join("app");
    std::fs::create_dir_all(dir.join("src"))?;
    git(&dir, &["init", "-q"])?;
    for i in 0..files {
        std::fs::write(
            dir.join("src").join(format!("file{i}.txt")),
            format!("line {i}\n").repeat(50),
        )?;
    }
    std::fs::create_dir_all(dir.join(".hearth"))?;
    std::fs::write(
        dir.join(".hearth/settings.json"),
        r#"{"hooks": {"init": [{"name": "count", "command": "ls src | wc -l > .count"}]}}"#,
    )?;
    git(&dir, &["add", "-A"])?;
    git(&dir, &["commit", "-q", "-m", "bench"])?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let daemon = std::process::Command::new("git")
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
        .spawn()
        .context("start git daemon")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("git daemon never listened");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Repo {
        _dir: root,
        url: format!("git://127.0.0.1:{port}/app"),
        daemon,
    })
}

fn plan(repo: &Repo) -> ProvisionPlan {
    ProvisionPlan {
        env: BTreeMap::from([
            ("API_TOKEN".to_owned(), "bench-secret-value".to_owned()),
            ("MODE".to_owned(), "bench".to_owned()),
        ]),
        repos: vec![RepoPlan {
            url: repo.url.clone(),
            branch: "main".into(),
            dir: "app".into(),
        }],
        project_setup: vec![Command {
            name: "project".into(),
            command: "mkdir -p /home/cache && echo ok > /home/cache/ready".into(),
        }],
        repo_setup: vec![Command {
            name: "index".into(),
            command: "find . -type f | sort > /tmp/index.txt".into(),
        }],
        warm_pool_setup: vec![Command {
            name: "pack".into(),
            command: "tar czf /tmp/app.tgz -C /home app && ls -l /tmp/app.tgz".into(),
        }],
        guest_timeout: Duration::from_secs(30),
        command_timeout: Duration::from_secs(300),
    }
}

/// The same work, one exec per command, nothing recorded.
async fn by_hand(driver: &SandboxDriver, spec: &VmSpec, plan: &ProvisionPlan) -> Result<()> {
    driver.create(spec).await?;
    let deadline = Instant::now() + plan.guest_timeout;
    while driver.health(spec.id).await.is_err() {
        if Instant::now() > deadline {
            bail!("guest agent never answered");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let env: String = plan
        .env
        .iter()
        .map(|(k, v)| format!("{k}='{v}'\n"))
        .collect();
    driver
        .write_file(spec.id, "/home/.env", env.as_bytes(), 0o600)
        .await?;
    let repo = &plan.repos[0];
    let commands = [
        (
            format!(
                "git clone --branch {} --single-branch -- {} /home/{}",
                repo.branch, repo.url, repo.dir
            ),
            "/home".to_owned(),
        ),
        (
            "cat .hearth/settings.json > /dev/null; ls src | wc -l > .count".to_owned(),
            format!("/home/{}", repo.dir),
        ),
        (plan.project_setup[0].command.clone(), "/home".to_owned()),
        (
            plan.repo_setup[0].command.clone(),
            format!("/home/{}", repo.dir),
        ),
        (plan.warm_pool_setup[0].command.clone(), "/home".to_owned()),
    ];
    for (command, cwd) in commands {
        let request = ExecRequest {
            cwd,
            env: plan.env.clone(),
            timeout: plan.command_timeout,
            ..ExecRequest::new(command.clone())
        };
        let result = driver.exec(spec.id, &request, None).await?;
        if result.exit_code != 0 {
            bail!("{command} exited with {}", result.exit_code);
        }
    }
    Ok(())
}

fn spec(tenant: TenantId) -> VmSpec {
    VmSpec {
        id: VmId::new(),
        tenant,
        workspace: "bench".into(),
        cpus: 2,
        memory_mib: 1024,
        image: Default::default(),
        network: hearth_drivers::NetworkSpec::host(),
        disk_mib: 0,
    }
}

pub fn run(args: ProvisionArgs) -> Result<()> {
    let guest_agent = crate::beside_exe(
        args.guest_agent.clone(),
        "hearth-guest-agent",
        "--guest-agent",
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args, guest_agent))
}

async fn run_async(args: ProvisionArgs, guest_agent: PathBuf) -> Result<()> {
    let state = tempfile::Builder::new()
        .prefix("hearth-bench-prov-")
        .tempdir_in("/var/tmp")?;
    let driver = SandboxDriver::new(SandboxConfig {
        state_dir: state.path().join("sandboxes"),
        agent_binary: guest_agent,
        hide: vec![],
        cgroup_root_name: "hearth-bench".into(),
        net: None,
    });
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&state.path().join("hearth.db")).await?);
    let token = NewToken {
        id: hearth_core::ids::TokenId::new(),
        secret_sha256: vec![0; 32],
        expires_at: None,
    };
    let (tenant, _) = store
        .bootstrap(
            "bench",
            "bench",
            &token,
            &serde_json::json!({"max_vms": 10}),
        )
        .await?
        .context("a fresh store")?;
    let repo = make_repo(args.files)?;
    let plan = plan(&repo);
    let (mut pipeline_ms, mut hand_ms) = (Vec::new(), Vec::new());
    for round in 0..args.runs {
        for pipeline_first in [round % 2 == 0, round % 2 != 0] {
            let s = spec(tenant.id);
            let started = Instant::now();
            if pipeline_first {
                let now = hearth_store::now_millis();
                let instance = InstanceRecord {
                    id: InstanceId::new(),
                    tenant_id: tenant.id,
                    workspace: "bench".into(),
                    vm_id: s.id,
                    test: true,
                    status: InstanceStatus::Provisioning,
                    summary: None,
                    steps: serde_json::to_value(hearth_provisioning::planned_steps(&plan))?,
                    created_at: now,
                    updated_at: now,
                    finished_at: None,
                };
                store.create_instance(&instance).await?;
                let recorder = StoreRecorder {
                    store: store.clone(),
                    instance: instance.id,
                };
                let (steps, summary) =
                    hearth_provisioning::provision(&driver, &s, &plan, &recorder).await;
                let status = if summary.success {
                    InstanceStatus::Ready
                } else {
                    InstanceStatus::Failed
                };
                store
                    .update_instance(
                        instance.id,
                        status,
                        &serde_json::to_value(&steps)?,
                        Some(&serde_json::to_value(&summary)?),
                    )
                    .await?;
                let elapsed = started.elapsed();
                driver.destroy(s.id).await?;
                if !summary.success {
                    bail!(
                        "the pipeline failed at {:?}: {:?}",
                        summary.failed_step,
                        summary.error
                    );
                }
                pipeline_ms.push(millis(elapsed));
            } else {
                let result = by_hand(&driver, &s, &plan).await;
                let elapsed = started.elapsed();
                driver.destroy(s.id).await?;
                result?;
                hand_ms.push(millis(elapsed));
            }
        }
        eprintln!("provision: round {}/{} done", round + 1, args.runs);
    }
    let pipeline = Summary::of(&pipeline_ms);
    let hand = Summary::of(&hand_ms);
    let overhead = match (pipeline, hand) {
        (Some(p), Some(h)) if h.p50 > 0.0 => Some((p.p50 - h.p50) / h.p50 * 100.0),
        _ => None,
    };
    let mut table = Table::new(["run", "p50 ms", "p99 ms", "max ms", "n"]);
    for (name, s) in [
        ("pipeline (recorded in SQLite)", pipeline.as_ref()),
        ("same commands by hand", hand.as_ref()),
    ] {
        let mut row = vec![name.to_owned()];
        row.extend(summary_cells(s, 1));
        table.row(row);
    }
    println!("{}", table.render());
    if let Some(o) = overhead {
        println!(
            "pipeline overhead: {o:+.1}% (p50 vs p50), repository of {} files",
            args.files
        );
    }
    let report = ProvisionReport {
        benchmark: "provision",
        machine: Machine::probe(),
        runs: args.runs,
        files: args.files,
        pipeline_ms: pipeline,
        by_hand_ms: hand,
        overhead_percent: overhead,
    };
    let path = report::json_path(args.json.as_deref(), "provision");
    report::write_json(&path, &report)?;
    eprintln!("provision: wrote {}", path.display());
    Ok(())
}
