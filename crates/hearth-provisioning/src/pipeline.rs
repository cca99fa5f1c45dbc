//! Running the steps of [`planned_steps`] against one VM, in order.
//!
//! Each step goes `pending` → `running` (with `startedAt`) → `succeeded` or
//! `failed` (with `durationMs`, and `error` when failed); the first failure
//! ends the run and leaves the later steps `pending`. The [`Recorder`] gets
//! the whole list when a step starts, when it ends, and while a command's
//! output streams, at most every [`OUTPUT_FLUSH`].
//!
//! | step              | what it does                                                       |
//! |-------------------|--------------------------------------------------------------------|
//! | `create_vm`       | `Driver::create`                                                   |
//! | `ensure_server`   | polls `Driver::health` (2 ms doubling to 50 ms) up to `guest_timeout`; fails at once when the driver shows the VM stopped |
//! | `set_env_vars`    | writes `/home/.env` (0600): one `KEY='value'` line per variable, sorted |
//! | `clone_repo`      | `git clone --branch <b> --single-branch -- <url> /home/<dir>` from `/home` |
//! | `init_repo`       | the repo's init hooks ([`crate::settings`]), in its folder          |
//! | `project_setup`   | the environment's project setup, from `/home`                      |
//! | `repo_setup`      | the environment's repo setup, in `/home/<dir>`                     |
//! | `warm_pool_setup` | the workspace's warm-pool setup, from `/home`                      |
//!
//! Every command runs through `/bin/sh -c` with the plan's variables in its
//! environment and `plan.command_timeout` as its limit; its stdout and stderr
//! go, interleaved as they come, into the step's output, a [`TailBuffer`]
//! (the last 16 KiB). A list of commands prints a `$ <name>` line before
//! each one's output; its first command that exits non-zero fails the step
//! with `<name> exited with <code>` (`hook <name> …` for init hooks), one
//! that runs past the limit with `<name> timed out after <limit>`.
//!
//! **Secrets.** The variables' values, their quoted form in `/home/.env`
//! and the credentials of repo URLs (`scheme://user:password@host`,
//! `https://token@host`) are
//! replaced by `***` in every output and error that leaves here (see
//! [`Redactor`]); log lines carry only the VM id, step, repo, status and
//! duration.

use crate::redact::{Redactor, TailBuffer};
use crate::settings::{SETTINGS_FILES, parse_init_hooks};
use crate::{
    Command, Millis, ProvisionPlan, Recorder, RepoPlan, Step, StepStatus, Summary, planned_steps,
};
use hearth_drivers::{Driver, DriverError, ExecRequest, ExecResult, Stream, VmSpec};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// The shortest time between two records of a step's streaming output.
pub const OUTPUT_FLUSH: Duration = Duration::from_millis(250);

/// The file `set_env_vars` writes (mode 0600).
pub const ENV_FILE: &str = "/home/.env";

/// Where VMs keep the repos, and the folder of the VM-wide commands.
const HOME: &str = "/home";
/// `ensure_server`'s first pause between health checks; it doubles…
const HEALTH_POLL_FIRST: Duration = Duration::from_millis(2);
/// …up to this.
const HEALTH_POLL_MAX: Duration = Duration::from_millis(50);
/// How often `ensure_server`, while the guest agent does not answer, asks
/// the driver whether the VM still runs.
const LIVENESS_EVERY: Duration = Duration::from_millis(250);
/// The line `init_repo`'s reading command prints before the file's text.
const SETTINGS_MARKER: &str = "hearth-settings:";

/// Runs the whole pipeline for one VM: `create_vm` creates it with
/// `driver`, `ensure_server` waits (up to `plan.guest_timeout`) for its
/// guest agent, then the remaining steps run in order. Returns the final
/// steps and the summary; on failure the caller destroys the VM (the
/// pipeline never does).
pub async fn provision(
    driver: &dyn Driver,
    spec: &VmSpec,
    plan: &ProvisionPlan,
    recorder: &dyn Recorder,
) -> (Vec<Step>, Summary) {
    let steps = planned_steps(plan);
    let actions = actions(plan, &steps);
    let redactor = Redactor::new(secrets(plan));
    let mut run = Run {
        driver,
        spec,
        plan,
        recorder,
        output: TailBuffer::new(redactor.clone()),
        redactor,
        steps,
        current: 0,
        last_record: Instant::now(),
    };
    for (i, action) in actions.into_iter().enumerate() {
        run.start(i).await;
        let started = Instant::now();
        let outcome = run.perform(action).await;
        if let Err(error) = run.finish(i, started, outcome).await {
            let failed_step = run.steps[i].name.clone();
            return (
                run.steps,
                Summary {
                    success: false,
                    failed_step: Some(failed_step),
                    error: Some(error),
                },
            );
        }
    }
    (
        run.steps,
        Summary {
            success: true,
            failed_step: None,
            error: None,
        },
    )
}

/// What one step does.
#[derive(Debug, Clone, Copy)]
enum Action<'p> {
    CreateVm,
    EnsureServer,
    SetEnvVars,
    CloneRepo(&'p RepoPlan),
    InitRepo(&'p RepoPlan),
    ProjectSetup,
    RepoSetup(&'p RepoPlan),
    WarmPoolSetup,
    Unknown,
}

/// The action of each planned step: the n-th per-repo step of a kind is
/// the n-th repo's.
fn actions<'p>(plan: &'p ProvisionPlan, steps: &[Step]) -> Vec<Action<'p>> {
    let (mut clones, mut inits, mut setups) = (0, 0, 0);
    let nth = |counter: &mut usize| {
        *counter += 1;
        plan.repos.get(*counter - 1)
    };
    steps
        .iter()
        .map(|step| match step.name.as_str() {
            "create_vm" => Action::CreateVm,
            "ensure_server" => Action::EnsureServer,
            "set_env_vars" => Action::SetEnvVars,
            "clone_repo" => nth(&mut clones).map_or(Action::Unknown, Action::CloneRepo),
            "init_repo" => nth(&mut inits).map_or(Action::Unknown, Action::InitRepo),
            "project_setup" => Action::ProjectSetup,
            "repo_setup" => nth(&mut setups).map_or(Action::Unknown, Action::RepoSetup),
            "warm_pool_setup" => Action::WarmPoolSetup,
            _ => Action::Unknown,
        })
        .collect()
}

/// Every value that must not leave in an output or error.
fn secrets(plan: &ProvisionPlan) -> Vec<String> {
    secret_values(&plan.env, plan.repos.iter().map(|r| r.url.as_str()))
}

/// A redactor of the secrets of an environment's variables and a
/// workspace's repo URLs, as provisioning masks them: what an agent's
/// command output on such a VM is masked with too.
pub fn secret_redactor<'a>(
    env: &BTreeMap<String, String>,
    repo_urls: impl IntoIterator<Item = &'a str>,
) -> Redactor {
    Redactor::new(secret_values(env, repo_urls))
}

/// The variables' values (also as quoted in `/home/.env`) and the repo
/// URLs' credentials.
fn secret_values<'a>(
    env: &BTreeMap<String, String>,
    repo_urls: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut secrets = Vec::new();
    for value in env.values() {
        secrets.push(value.clone());
        // As it appears inside its quotes in /home/.env.
        let quoted = shell_quote(value);
        let inner = &quoted[1..quoted.len() - 1];
        if inner != value {
            secrets.push(inner.to_owned());
        }
    }
    secrets.extend(repo_urls.into_iter().filter_map(url_password));
    secrets
}

/// The credential of a repo URL: the password of
/// `scheme://user:password@host/…`, or the token of `https://token@host/…`
/// (as the API masks it: `hearth_core::resource::repo_url_secret`).
fn url_password(url: &str) -> Option<String> {
    hearth_core::resource::repo_url_secret(url).map(str::to_owned)
}

/// `text` as one word for `/bin/sh`, in single quotes.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A valid environment variable name: letters, digits and `_`, not
/// starting with a digit.
fn is_variable_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A repo folder: one path component of letters, digits, `.`, `_`, `-`.
fn is_repo_dir(dir: &str) -> bool {
    !dir.is_empty()
        && dir != "."
        && dir != ".."
        && dir
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The contents of `/home/.env`.
fn env_file(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(key, value)| format!("{key}={}\n", shell_quote(value)))
        .collect()
}

/// The last non-empty line of `text`.
fn last_line(text: &str) -> Option<&str> {
    text.split(['\n', '\r'])
        .map(str::trim)
        .rfind(|line| !line.is_empty())
}

fn now_millis() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
        Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
    })
}

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// One run in progress.
struct Run<'a> {
    driver: &'a dyn Driver,
    spec: &'a VmSpec,
    plan: &'a ProvisionPlan,
    recorder: &'a dyn Recorder,
    redactor: Redactor,
    steps: Vec<Step>,
    /// The running step.
    current: usize,
    /// Its output.
    output: TailBuffer,
    /// When the recorder was last called.
    last_record: Instant,
}

impl Run<'_> {
    async fn record(&mut self) {
        self.recorder.record(&self.steps).await;
        self.last_record = Instant::now();
    }

    async fn start(&mut self, i: usize) {
        self.current = i;
        self.output = TailBuffer::new(self.redactor.clone());
        let step = &mut self.steps[i];
        step.status = StepStatus::Running;
        step.started_at = Some(now_millis());
        tracing::debug!(vm = %self.spec.id, step = %step.name, repo = step.repo.as_deref(), "provisioning step started");
        self.record().await;
    }

    /// Ends step `i`; returns its (redacted) error when it failed.
    async fn finish(
        &mut self,
        i: usize,
        started: Instant,
        outcome: Result<(), String>,
    ) -> Result<(), String> {
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let error = outcome.err().map(|e| self.redactor.redact(&e));
        let step = &mut self.steps[i];
        step.output = self.output.text();
        step.duration_ms = Some(duration_ms);
        step.error = error.clone();
        step.status = if error.is_some() {
            StepStatus::Failed
        } else {
            StepStatus::Succeeded
        };
        let (vm, name, repo) = (self.spec.id, step.name.as_str(), step.repo.as_deref());
        if error.is_some() {
            tracing::warn!(vm = %vm, step = %name, repo, duration_ms, "provisioning step failed");
        } else {
            tracing::info!(vm = %vm, step = %name, repo, duration_ms, "provisioning step succeeded");
        }
        self.record().await;
        error.map_or(Ok(()), Err)
    }

    /// Records the running step's output as it is now, if it changed.
    async fn flush_output(&mut self) {
        let text = self.output.streaming_text();
        if self.steps[self.current].output != text {
            self.steps[self.current].output = text;
            self.record().await;
        }
    }

    fn line(&mut self, text: &str) {
        self.output.start_line();
        self.output.push(text);
        self.output.push("\n");
    }

    async fn perform(&mut self, action: Action<'_>) -> Result<(), String> {
        let plan = self.plan;
        match action {
            Action::CreateVm => self.create_vm().await,
            Action::EnsureServer => self.ensure_server().await,
            Action::SetEnvVars => self.set_env_vars().await,
            Action::CloneRepo(repo) => self.clone_repo(repo).await,
            Action::InitRepo(repo) => self.init_repo(repo).await,
            Action::ProjectSetup => self.run_commands(&plan.project_setup, HOME, "").await,
            Action::RepoSetup(repo) => {
                let dir = format!("{HOME}/{}", repo.dir);
                self.run_commands(&plan.repo_setup, &dir, "").await
            }
            Action::WarmPoolSetup => self.run_commands(&plan.warm_pool_setup, HOME, "").await,
            Action::Unknown => Err("this step is not part of the pipeline".into()),
        }
    }

    async fn create_vm(&mut self) -> Result<(), String> {
        self.driver
            .create(self.spec)
            .await
            .map_err(|e| e.to_string())?;
        self.line(&format!("created VM {}", self.spec.id));
        Ok(())
    }

    async fn ensure_server(&mut self) -> Result<(), String> {
        let limit = self.plan.guest_timeout;
        let started = Instant::now();
        let deadline = started + limit;
        let mut pause = HEALTH_POLL_FIRST;
        let mut last_error = None;
        let mut last_liveness = started;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if last_error.is_some() && last_liveness.elapsed() >= LIVENESS_EVERY {
                // A VM whose processes died never answers: fail now, not
                // at the end of the guest timeout.
                last_liveness = Instant::now();
                if let Some(gone) = self.vm_gone().await {
                    return Err(format!(
                        "the VM {gone} while booting; the guest agent never answered: {}",
                        last_error.unwrap_or_default()
                    ));
                }
            }
            match tokio::time::timeout(remaining, self.driver.health(self.spec.id)).await {
                Ok(Ok(health)) => {
                    self.line(&format!(
                        "guest agent answered after {} ms (up for {} ms)",
                        started.elapsed().as_millis(),
                        health.uptime_ms
                    ));
                    return Ok(());
                }
                Ok(Err(e)) => last_error = Some(e.to_string()),
                Err(_) => {
                    last_error.get_or_insert_with(|| "the health check got no answer".to_owned());
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(format!(
                    "guest agent did not answer within {}: {}",
                    human(limit),
                    last_error.unwrap_or_default()
                ));
            }
            tokio::time::sleep(pause.min(remaining)).await;
            pause = (pause * 2).min(HEALTH_POLL_MAX);
        }
    }

    /// `Some(what happened)` when the driver no longer runs the VM; `None`
    /// while it runs, or when the driver cannot tell.
    async fn vm_gone(&self) -> Option<&'static str> {
        let vms = self.driver.list().await.ok()?;
        match vms.iter().find(|vm| vm.id == self.spec.id) {
            Some(vm) if vm.running => None,
            Some(_) => Some("stopped"),
            None => Some("disappeared"),
        }
    }

    async fn set_env_vars(&mut self) -> Result<(), String> {
        let env = &self.plan.env;
        if let Some(bad) = env.keys().find(|k| !is_variable_name(k)) {
            return Err(format!("{bad:?} is not a valid variable name"));
        }
        self.driver
            .write_file(self.spec.id, ENV_FILE, env_file(env).as_bytes(), 0o600)
            .await
            .map_err(|e| format!("cannot write {ENV_FILE}: {e}"))?;
        let names: Vec<&str> = env.keys().map(String::as_str).collect();
        let plural = if names.len() == 1 { "" } else { "s" };
        let mut line = format!("wrote {} variable{plural} to {ENV_FILE}", names.len());
        if !names.is_empty() {
            line = format!("{line}: {}", names.join(", "));
        }
        self.line(&line);
        Ok(())
    }

    async fn clone_repo(&mut self, repo: &RepoPlan) -> Result<(), String> {
        if !is_repo_dir(&repo.dir) {
            return Err(format!("{:?} is not a usable folder name", repo.dir));
        }
        let command = format!(
            "git clone --branch {} --single-branch -- {} {}",
            shell_quote(&repo.branch),
            shell_quote(&repo.url),
            shell_quote(&format!("{HOME}/{}", repo.dir)),
        );
        // Never wait for a password prompt.
        let extra = [("GIT_TERMINAL_PROMPT", "0")];
        let result = self
            .exec(&command, HOME, &extra)
            .await
            .map_err(|e| format!("git clone: {e}"))?;
        if result.timed_out {
            return Err(format!(
                "git clone timed out after {}",
                human(self.plan.command_timeout)
            ));
        }
        if result.exit_code != 0 {
            let text = self.output.text();
            return Err(match last_line(&text) {
                Some(line) => format!("git clone exited with {}: {line}", result.exit_code),
                None => format!("git clone exited with {}", result.exit_code),
            });
        }
        Ok(())
    }

    async fn init_repo(&mut self, repo: &RepoPlan) -> Result<(), String> {
        let dir = format!("{HOME}/{}", repo.dir);
        let candidates: Vec<String> = SETTINGS_FILES.iter().map(|f| shell_quote(f)).collect();
        // The marker line tells which file exists; no line, no file.
        let command = format!(
            "for f in {}; do if [ -e \"$f\" ]; then echo \"{SETTINGS_MARKER}$f\"; exec cat -- \"$f\"; fi; done",
            candidates.join(" ")
        );
        let (result, stdout, stderr) = self
            .exec_collect(&command, &dir)
            .await
            .map_err(|e| format!("cannot read the settings file: {e}"))?;
        if result.timed_out {
            return Err(format!(
                "reading the settings file timed out after {}",
                human(self.plan.command_timeout)
            ));
        }
        let (first, text) = stdout.split_once('\n').unwrap_or((&stdout, ""));
        let found = first
            .strip_prefix(SETTINGS_MARKER)
            .and_then(|f| SETTINGS_FILES.iter().find(|c| **c == f));
        let why = |what: String| match last_line(&stderr) {
            Some(line) => format!("{what}: {line}"),
            None => format!("{what}: exited with {}", result.exit_code),
        };
        let Some(file) = found else {
            if result.exit_code != 0 {
                return Err(why(format!("cannot look for a settings file in {dir}")));
            }
            self.line("no settings file");
            return Ok(());
        };
        let path = format!("{dir}/{file}");
        if result.exit_code != 0 {
            return Err(why(format!("cannot read {path}")));
        }
        let hooks = parse_init_hooks(&path, text)?;
        let plural = if hooks.len() == 1 { "" } else { "s" };
        self.line(&format!("{file}: {} init hook{plural}", hooks.len()));
        self.run_commands(&hooks, &dir, "hook ").await
    }

    /// Runs `commands` in order in `cwd`, each after a `$ <name>` line;
    /// errors name a command as `<prefix><name>`.
    async fn run_commands(
        &mut self,
        commands: &[Command],
        cwd: &str,
        prefix: &str,
    ) -> Result<(), String> {
        for c in commands {
            self.line(&format!("$ {}", c.name));
            tracing::debug!(vm = %self.spec.id, step = %self.steps[self.current].name, command = %c.name, "running a command");
            let result = self
                .exec(&c.command, cwd, &[])
                .await
                .map_err(|e| format!("{prefix}{}: {e}", c.name))?;
            if result.timed_out {
                return Err(format!(
                    "{prefix}{} timed out after {}",
                    c.name,
                    human(self.plan.command_timeout)
                ));
            }
            if result.exit_code != 0 {
                return Err(format!(
                    "{prefix}{} exited with {}",
                    c.name, result.exit_code
                ));
            }
        }
        Ok(())
    }

    fn request(&self, command: &str, cwd: &str, extra_env: &[(&str, &str)]) -> ExecRequest {
        let mut env = self.plan.env.clone();
        for (key, value) in extra_env {
            env.entry((*key).to_owned())
                .or_insert_with(|| (*value).to_owned());
        }
        ExecRequest {
            command: command.to_owned(),
            cwd: cwd.to_owned(),
            env,
            timeout: self.plan.command_timeout,
        }
    }

    /// Runs a command, streaming its output into the step's output and
    /// recording it at most every [`OUTPUT_FLUSH`].
    async fn exec(
        &mut self,
        command: &str,
        cwd: &str,
        extra_env: &[(&str, &str)],
    ) -> Result<ExecResult, DriverError> {
        let request = self.request(command, cwd, extra_env);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = self.driver;
        let exec = driver.exec(self.spec.id, &request, Some(tx));
        tokio::pin!(exec);
        let mut flush_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                result = &mut exec => {
                    while let Ok(chunk) = rx.try_recv() {
                        self.output.push(&chunk.data);
                    }
                    return result;
                }
                Some(chunk) = rx.recv() => {
                    self.output.push(&chunk.data);
                    if flush_at.is_none() {
                        let due = (self.last_record + OUTPUT_FLUSH).max(Instant::now());
                        flush_at = Some(due.into());
                    }
                }
                () = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {
                    flush_at = None;
                    self.flush_output().await;
                }
            }
        }
    }

    /// Runs a command and returns its stdout and stderr (not shown).
    async fn exec_collect(
        &mut self,
        command: &str,
        cwd: &str,
    ) -> Result<(ExecResult, String, String), DriverError> {
        let request = self.request(command, cwd, &[]);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let result = self.driver.exec(self.spec.id, &request, Some(tx)).await?;
        let (mut stdout, mut stderr) = (String::new(), String::new());
        while let Ok(chunk) = rx.try_recv() {
            match chunk.stream {
                Stream::Stdout => stdout.push_str(&chunk.data),
                Stream::Stderr => stderr.push_str(&chunk.data),
            }
        }
        Ok((result, stdout, stderr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_round_trips_through_sh() {
        for value in [
            "plain",
            "it's",
            "a 'b' c",
            "$HOME `x` \"y\"",
            "new\nline",
            "",
        ] {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(value)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), value);
        }
    }

    #[test]
    fn the_env_file_is_sorted_and_quoted() {
        let env = BTreeMap::from([
            ("B".to_owned(), "it's".to_owned()),
            ("A".to_owned(), "1 2".to_owned()),
        ]);
        assert_eq!(env_file(&env), "A='1 2'\nB='it'\\''s'\n");
    }

    #[test]
    fn secrets_cover_quoted_values_and_url_passwords() {
        let plan = ProvisionPlan {
            env: BTreeMap::from([
                ("T".to_owned(), "it's".to_owned()),
                ("E".to_owned(), String::new()),
            ]),
            repos: vec![
                RepoPlan {
                    url: "https://x-access-token:ghp_abc@github.com/o/r.git".into(),
                    branch: "main".into(),
                    dir: "r".into(),
                },
                RepoPlan {
                    url: "ssh://git@github.com/o/s.git".into(),
                    branch: "main".into(),
                    dir: "s".into(),
                },
            ],
            project_setup: vec![],
            repo_setup: vec![],
            warm_pool_setup: vec![],
            guest_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(1),
        };
        let mut found = secrets(&plan);
        found.sort();
        assert_eq!(found, ["", "ghp_abc", "it'\\''s", "it's"]);
        assert_eq!(url_password("https://tok@host/x").as_deref(), Some("tok"));
        assert_eq!(url_password("ssh://git@host/x"), None);
        assert_eq!(url_password("git@github.com:o/r.git"), None);
        assert_eq!(
            url_password("https://u:p@ss@host/x").as_deref(),
            Some("p@ss")
        );
    }

    #[test]
    fn names_and_lines() {
        assert!(
            is_variable_name("_A1")
                && !is_variable_name("1A")
                && !is_variable_name("A-B")
                && !is_variable_name("")
        );
        assert!(
            is_repo_dir("my.repo_1-x")
                && !is_repo_dir("..")
                && !is_repo_dir("a/b")
                && !is_repo_dir("")
        );
        assert_eq!(last_line("a\nfatal: no\n\n"), Some("fatal: no"));
        assert_eq!(last_line("a\rprogress 100%\r\n"), Some("progress 100%"));
        assert_eq!(last_line(" \n"), None);
    }
}
