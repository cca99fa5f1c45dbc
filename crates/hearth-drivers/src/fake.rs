//! The fake driver: VMs that exist only in memory, with a configurable boot
//! latency and failure rate. It simulates fleets far larger than one machine
//! (100,000 VMs) and drives the reconciler's unit tests; it is never a
//! substitute for testing the real drivers.
//!
//! Commands "run" instantly: `exit N` (or `false`) ends with that code,
//! anything else succeeds and echoes itself on stdout. Files written are
//! kept per VM and can be read back with [`FakeDriver::file`].
//!
//! Jobs are kept per VM in memory, so they survive whatever uses the
//! driver (a new `Pool` on the same `FakeDriver` re-attaches to them). By
//! default a job runs as an `exec` would, at once; with
//! [`FakeDriver::hold_jobs`] it runs until the test ends it
//! ([`FakeDriver::job_output`], [`FakeDriver::job_exit`]), and
//! [`FakeDriver::break_attaches`] breaks every attach in progress, as a
//! node restarting would.

use crate::{
    Driver, DriverError, ExecRequest, ExecResult, GuestHealth, ObservedVm, OutputChunk, Result,
    Stream, VmSpec,
};
use async_trait::async_trait;
use hearth_core::ids::VmId;
use hearth_core::resource::DriverKind;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};

/// How the fake behaves.
#[derive(Debug, Clone, Default)]
pub struct FakeConfig {
    /// Time from `create` until the guest answers `health`.
    pub boot_latency: Duration,
    /// Probability (0..=1) that a `create` fails.
    pub failure_rate: f64,
}

#[derive(Debug)]
struct FakeVm {
    spec: VmSpec,
    ready_at: Instant,
    files: HashMap<String, (Vec<u8>, u32)>,
    /// The files when it was sealed: what `reset` brings back.
    sealed: HashMap<String, (Vec<u8>, u32)>,
    execs: Vec<String>,
    /// Its processes died ([`FakeDriver::crash`]).
    crashed: bool,
    jobs: HashMap<String, FakeJob>,
}

#[derive(Debug, Default)]
struct FakeJob {
    command: String,
    /// The output, both streams as they came.
    output: Vec<OutputChunk>,
    exit: Option<ExecResult>,
    attaches: usize,
}

/// An in-memory driver.
#[derive(Debug, Default)]
pub struct FakeDriver {
    config: Mutex<FakeConfig>,
    vms: Mutex<HashMap<VmId, FakeVm>>,
    failing_workspaces: Mutex<HashSet<String>>,
    created: AtomicU64,
    destroyed: AtomicU64,
    hold_jobs: AtomicBool,
    /// Bumped by [`FakeDriver::break_attaches`]: attaches begun before end.
    attach_generation: AtomicU64,
    /// Woken when a job changes or attaches are broken.
    jobs_changed: Notify,
}

impl FakeDriver {
    pub fn new(config: FakeConfig) -> Self {
        FakeDriver {
            config: Mutex::new(config),
            ..Default::default()
        }
    }

    /// Changes the behaviour of later calls.
    pub fn set_config(&self, config: FakeConfig) {
        *self.config.lock().unwrap() = config;
    }

    /// Makes every boot of `workspace` fail (or succeed again).
    pub fn set_failing(&self, workspace: &str, failing: bool) {
        let mut set = self.failing_workspaces.lock().unwrap();
        if failing {
            set.insert(workspace.to_owned());
        } else {
            set.remove(workspace);
        }
    }

    /// Makes a VM's processes die: its guest agent stops answering and
    /// `list` shows it not running, until it is destroyed.
    pub fn crash(&self, id: VmId) {
        if let Some(vm) = self.vms.lock().unwrap().get_mut(&id) {
            vm.crashed = true;
        }
    }

    /// VMs that exist now.
    pub fn count(&self) -> usize {
        self.vms.lock().unwrap().len()
    }

    /// Creates and destroys so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.created.load(Ordering::Relaxed),
            self.destroyed.load(Ordering::Relaxed),
        )
    }

    /// A file written into a VM, with its mode.
    pub fn file(&self, id: VmId, path: &str) -> Option<(Vec<u8>, u32)> {
        self.vms.lock().unwrap().get(&id)?.files.get(path).cloned()
    }

    /// Commands run in a VM, in order.
    pub fn execs(&self, id: VmId) -> Vec<String> {
        self.vms
            .lock()
            .unwrap()
            .get(&id)
            .map(|v| v.execs.clone())
            .unwrap_or_default()
    }
}

impl FakeDriver {
    /// Whether jobs started from now on run until [`FakeDriver::job_exit`]
    /// (rather than at once).
    pub fn hold_jobs(&self, hold: bool) {
        self.hold_jobs.store(hold, Ordering::Relaxed);
    }

    /// The jobs of a VM: (id, command), in id order.
    pub fn jobs(&self, id: VmId) -> Vec<(String, String)> {
        let vms = self.vms.lock().unwrap();
        let mut jobs: Vec<(String, String)> = vms
            .get(&id)
            .map(|vm| {
                vm.jobs
                    .iter()
                    .map(|(job, j)| (job.clone(), j.command.clone()))
                    .collect()
            })
            .unwrap_or_default();
        jobs.sort();
        jobs
    }

    /// How many attaches to a job began so far.
    pub fn job_attaches(&self, id: VmId, job: &str) -> usize {
        let vms = self.vms.lock().unwrap();
        vms.get(&id)
            .and_then(|vm| vm.jobs.get(job))
            .map_or(0, |j| j.attaches)
    }

    /// Waits until a job has had at least `n` attaches.
    pub async fn wait_job_attaches(&self, id: VmId, job: &str, n: usize) {
        loop {
            let changed = self.jobs_changed.notified();
            if self.job_attaches(id, job) >= n {
                return;
            }
            changed.await;
        }
    }

    /// Waits until `id` has a job and returns its id.
    pub async fn wait_job(&self, id: VmId) -> String {
        loop {
            let changed = self.jobs_changed.notified();
            if let Some((job, _)) = self.jobs(id).into_iter().next() {
                return job;
            }
            changed.await;
        }
    }

    /// A held job prints `data`.
    pub fn job_output(&self, id: VmId, job: &str, stream: Stream, data: &str) {
        self.with_job(id, job, |j| {
            j.output.push(OutputChunk {
                stream,
                data: data.to_owned(),
            })
        });
    }

    /// A held job ends with `code`.
    pub fn job_exit(&self, id: VmId, job: &str, code: i32) {
        self.with_job(id, job, |j| {
            j.exit = Some(ExecResult {
                exit_code: code,
                timed_out: false,
            })
        });
    }

    /// Every attach in progress ends with a connection error (the jobs
    /// run on).
    pub fn break_attaches(&self) {
        self.attach_generation.fetch_add(1, Ordering::SeqCst);
        self.jobs_changed.notify_waiters();
    }

    fn with_job(&self, id: VmId, job: &str, f: impl FnOnce(&mut FakeJob)) {
        if let Some(j) = self
            .vms
            .lock()
            .unwrap()
            .get_mut(&id)
            .and_then(|vm| vm.jobs.get_mut(job))
        {
            f(j);
        }
        self.jobs_changed.notify_waiters();
    }
}

/// The output of `chunks` from byte `offset` on (never from inside a
/// character).
fn output_from(chunks: &[OutputChunk], offset: u64) -> Vec<OutputChunk> {
    let mut at = 0u64;
    let mut out = Vec::new();
    for chunk in chunks {
        let end = at + chunk.data.len() as u64;
        if end > offset {
            let mut from = offset.saturating_sub(at) as usize;
            while !chunk.data.is_char_boundary(from) {
                from += 1;
            }
            if from < chunk.data.len() {
                out.push(OutputChunk {
                    stream: chunk.stream,
                    data: chunk.data[from..].to_owned(),
                });
            }
        }
        at = end;
    }
    out
}

fn exit_code_of(command: &str) -> i32 {
    let c = command.trim();
    if c == "false" {
        return 1;
    }
    c.strip_prefix("exit ")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[async_trait]
impl Driver for FakeDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Fake
    }

    async fn create(&self, spec: &VmSpec) -> Result<()> {
        let config = self.config.lock().unwrap().clone();
        if self
            .failing_workspaces
            .lock()
            .unwrap()
            .contains(&spec.workspace)
        {
            return Err(DriverError::Boot(format!(
                "simulated boot failure for workspace {}",
                spec.workspace
            )));
        }
        if config.failure_rate > 0.0 && rand::thread_rng().gen_bool(config.failure_rate.min(1.0)) {
            return Err(DriverError::Boot("simulated boot failure".into()));
        }
        let vm = FakeVm {
            spec: spec.clone(),
            ready_at: Instant::now() + config.boot_latency,
            files: HashMap::new(),
            sealed: HashMap::new(),
            execs: Vec::new(),
            crashed: false,
            jobs: HashMap::new(),
        };
        self.vms.lock().unwrap().insert(spec.id, vm);
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn destroy(&self, id: VmId) -> Result<()> {
        if self.vms.lock().unwrap().remove(&id).is_some() {
            self.destroyed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ObservedVm>> {
        Ok(self
            .vms
            .lock()
            .unwrap()
            .values()
            .map(|v| ObservedVm {
                id: v.spec.id,
                tenant: v.spec.tenant,
                workspace: v.spec.workspace.clone(),
                running: !v.crashed,
            })
            .collect())
    }

    async fn exec(
        &self,
        id: VmId,
        request: &ExecRequest,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        {
            let mut vms = self.vms.lock().unwrap();
            let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
            vm.execs.push(request.command.clone());
        }
        if let Some(tx) = output {
            let _ = tx.send(OutputChunk {
                stream: Stream::Stdout,
                data: format!("{}\n", request.command),
            });
        }
        Ok(ExecResult {
            exit_code: exit_code_of(&request.command),
            timed_out: false,
        })
    }

    async fn write_file(&self, id: VmId, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        let mut vms = self.vms.lock().unwrap();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        vm.files.insert(path.to_owned(), (contents.to_vec(), mode));
        Ok(())
    }

    async fn start_job(&self, id: VmId, job: &str, request: &ExecRequest) -> Result<()> {
        hearth_guest_agent::protocol::check_job_id(job).map_err(DriverError::Job)?;
        {
            let mut vms = self.vms.lock().unwrap();
            let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
            if vm.crashed {
                return Err(DriverError::Guest(
                    "cannot connect: Connection refused".into(),
                ));
            }
            if vm.jobs.contains_key(job) {
                return Ok(());
            }
            vm.execs.push(request.command.clone());
            let mut fake = FakeJob {
                command: request.command.clone(),
                ..Default::default()
            };
            if !self.hold_jobs.load(Ordering::Relaxed) {
                fake.output.push(OutputChunk {
                    stream: Stream::Stdout,
                    data: format!("{}\n", request.command),
                });
                fake.exit = Some(ExecResult {
                    exit_code: exit_code_of(&request.command),
                    timed_out: false,
                });
            }
            vm.jobs.insert(job.to_owned(), fake);
        }
        self.jobs_changed.notify_waiters();
        Ok(())
    }

    async fn attach_job(
        &self,
        id: VmId,
        job: &str,
        offset: u64,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        let generation = self.attach_generation.load(Ordering::SeqCst);
        self.with_job(id, job, |j| j.attaches += 1);
        let mut sent = offset;
        loop {
            let changed = self.jobs_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let vms = self.vms.lock().unwrap();
                let vm = vms.get(&id).ok_or(DriverError::NotFound(id))?;
                if vm.crashed || self.attach_generation.load(Ordering::SeqCst) != generation {
                    return Err(DriverError::Guest(
                        "cannot read the answer: Connection reset by peer".into(),
                    ));
                }
                let fake = vm
                    .jobs
                    .get(job)
                    .ok_or_else(|| DriverError::Job(format!("no job {job}")))?;
                for chunk in output_from(&fake.output, sent) {
                    if let Some(tx) = &output {
                        let _ = tx.send(chunk);
                    }
                }
                let total: u64 = fake.output.iter().map(|c| c.data.len() as u64).sum();
                sent = sent.max(total);
                if let Some(exit) = fake.exit {
                    return Ok(exit);
                }
            }
            changed.await;
        }
    }

    async fn seal(&self, id: VmId) -> Result<()> {
        let mut vms = self.vms.lock().unwrap();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        vm.sealed = vm.files.clone();
        Ok(())
    }

    /// Like the sandbox driver: the files back to the sealed ones, and a
    /// crashed VM comes back up (its processes are started again).
    async fn reset(&self, id: VmId) -> Result<()> {
        let mut vms = self.vms.lock().unwrap();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        vm.files = vm.sealed.clone();
        vm.crashed = false;
        Ok(())
    }

    async fn health(&self, id: VmId) -> Result<GuestHealth> {
        let vms = self.vms.lock().unwrap();
        let vm = vms.get(&id).ok_or(DriverError::NotFound(id))?;
        if vm.crashed {
            return Err(DriverError::Guest(
                "cannot connect: Connection refused".into(),
            ));
        }
        let now = Instant::now();
        if now < vm.ready_at {
            return Err(DriverError::Guest("not up yet".into()));
        }
        Ok(GuestHealth {
            uptime_ms: (now - vm.ready_at).as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_core::ids::TenantId;

    fn spec(ws: &str) -> VmSpec {
        VmSpec {
            id: VmId::new(),
            tenant: TenantId::new(),
            workspace: ws.into(),
            cpus: 1,
            memory_mib: 256,
            image: Default::default(),
            network: crate::NetworkSpec::host(),
            disk_mib: 0,
        }
    }

    #[tokio::test]
    async fn lifecycle() {
        let d = FakeDriver::new(FakeConfig::default());
        let s = spec("web");
        d.create(&s).await.unwrap();
        assert!(d.health(s.id).await.is_ok());
        assert_eq!(d.list().await.unwrap().len(), 1);
        let r = d
            .exec(s.id, &ExecRequest::new("exit 3"), None)
            .await
            .unwrap();
        assert_eq!(r.exit_code, 3);
        d.write_file(s.id, "/home/.env", b"A=1\n", 0o600)
            .await
            .unwrap();
        assert_eq!(d.file(s.id, "/home/.env").unwrap().1, 0o600);
        d.destroy(s.id).await.unwrap();
        d.destroy(s.id).await.unwrap();
        assert_eq!(d.count(), 0);
        assert!(matches!(
            d.health(s.id).await,
            Err(DriverError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn jobs_run_on_between_attaches() {
        let d = std::sync::Arc::new(FakeDriver::new(FakeConfig::default()));
        let s = spec("web");
        d.create(&s).await.unwrap();
        // At once, as an exec; starting it again starts nothing.
        d.start_job(s.id, "quick", &ExecRequest::new("exit 3"))
            .await
            .unwrap();
        d.start_job(s.id, "quick", &ExecRequest::new("exit 0"))
            .await
            .unwrap();
        assert_eq!(
            d.attach_job(s.id, "quick", 0, None)
                .await
                .unwrap()
                .exit_code,
            3
        );
        assert!(matches!(
            d.start_job(s.id, "../x", &ExecRequest::new("true")).await,
            Err(DriverError::Job(_))
        ));
        // Held: output before and after a broken attach, from an offset.
        d.hold_jobs(true);
        d.start_job(s.id, "held", &ExecRequest::new("make"))
            .await
            .unwrap();
        d.job_output(s.id, "held", Stream::Stdout, "before\n");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let attach = tokio::spawn({
            let d = d.clone();
            async move { d.attach_job(s.id, "held", 0, Some(tx)).await }
        });
        assert_eq!(rx.recv().await.unwrap().data, "before\n");
        d.break_attaches();
        assert!(matches!(attach.await.unwrap(), Err(DriverError::Guest(_))));
        d.job_output(s.id, "held", Stream::Stderr, "after\n");
        d.job_exit(s.id, "held", 7);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let end = d.attach_job(s.id, "held", 7, Some(tx)).await.unwrap();
        assert_eq!(end.exit_code, 7);
        let chunk = rx.recv().await.unwrap();
        assert_eq!(
            (chunk.stream, chunk.data.as_str()),
            (Stream::Stderr, "after\n")
        );
        assert_eq!(d.job_attaches(s.id, "held"), 2);
        assert!(matches!(
            d.attach_job(s.id, "nope", 0, None).await,
            Err(DriverError::Job(_))
        ));
        d.destroy(s.id).await.unwrap();
        assert!(matches!(
            d.attach_job(s.id, "held", 0, None).await,
            Err(DriverError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn latency_and_failures() {
        let d = FakeDriver::new(FakeConfig {
            boot_latency: Duration::from_secs(60),
            failure_rate: 0.0,
        });
        let s = spec("web");
        d.create(&s).await.unwrap();
        assert!(matches!(d.health(s.id).await, Err(DriverError::Guest(_))));
        d.set_failing("bad", true);
        assert!(matches!(
            d.create(&spec("bad")).await,
            Err(DriverError::Boot(_))
        ));
        d.set_config(FakeConfig {
            boot_latency: Duration::ZERO,
            failure_rate: 1.0,
        });
        assert!(d.create(&spec("web")).await.is_err());
    }
}
