//! The host's client of the guest agent, over any byte stream: a Unix socket
//! for sandboxes, TCP for qemu. The wire types are
//! [`hearth_guest_agent::protocol`]'s, so both sides cannot drift apart.
//!
//! **Invariants:**
//! - one request per connection; the connection stays open (both ways)
//!   until the answer ends, because the agent reads end-of-stream as "the
//!   client went away" and kills a running command;
//! - every call is bounded in time: connecting, a health check and a file
//!   write have fixed limits, an `exec` its own timeout plus a margin (then
//!   the connection is dropped, which makes the agent kill the command);
//! - every call is bounded in memory, whatever the other end sends (root in
//!   a VM can replace the agent): an answer line is at most
//!   [`MAX_LINE_BYTES`], an `exec`'s whole answer at most
//!   [`MAX_EXEC_OUTPUT_BYTES`], any other answer one line. Past a bound the
//!   call ends with an error saying which, and the connection is dropped
//!   (so a real agent kills the command); lines that are not UTF-8 or not
//!   an answer end it the same way, without quoting them;
//! - every failure is a [`DriverError::Guest`] naming what went wrong; an
//!   agent's `error` line becomes its message, except for jobs: the
//!   agent's own refusal of a job (no such job, a bad id, a job lost) is
//!   [`DriverError::Job`], which retrying cannot mend, while a broken
//!   connection stays `Guest`, after which attaching again continues;
//! - a followed job's answer may be silent for at most
//!   [`JOB_IDLE_TIMEOUT`] (the agent sends `alive` lines), so a dead
//!   connection is noticed even when the job prints nothing.

use crate::{DriverError, ExecRequest, ExecResult, GuestHealth, OutputChunk, Result, Stream};
use hearth_guest_agent::protocol::{
    ExecOp, JobAttachOp, JobStartOp, Op, Request, Response, WriteFileOp,
};
use std::fmt;
use std::future::Future;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// How long connecting to the agent may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a health check may take, connection included.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a file write may take, connection included.
pub const WRITE_FILE_TIMEOUT: Duration = Duration::from_secs(60);
/// How much longer than its own timeout an `exec` may take before the
/// client gives up on the agent.
pub const EXEC_MARGIN: Duration = Duration::from_secs(30);
/// How long starting a job may take, connection included.
pub const JOB_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a followed job's answer may go without a line.
pub const JOB_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest answer line read from an agent, newline included. A real
/// agent's lines are far shorter: it sends at most 16 KiB of output per
/// line, which JSON escaping can make at most six times longer.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The most one `exec`'s answer may hold by default, counted as read off
/// the wire (every line, framing included): generous for any build or
/// install log, and what the host buffers at worst for one command when
/// its reader falls behind.
pub const MAX_EXEC_OUTPUT_BYTES: u64 = 128 << 20;

/// An answer being read: its lines, and how much of its bound is used.
struct Answer<S> {
    reader: BufReader<S>,
    read: u64,
    limit: u64,
    what: &'static str,
}

impl<S: AsyncRead + Unpin> Answer<S> {
    /// The next answer line; an `error` line, the end of the stream, or a
    /// line past a bound is an error.
    async fn next(&mut self) -> Result<Response> {
        match self.next_line().await? {
            Response::Error { message } => Err(guest(message)),
            response => Ok(response),
        }
    }

    /// The next answer line, an `error` line included.
    async fn next_line(&mut self) -> Result<Response> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE_BYTES as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| guest(format!("cannot read the answer: {e}")))?;
        if n == 0 {
            return Err(guest(
                "the agent closed the connection before answering in full",
            ));
        }
        if line.last() != Some(&b'\n') {
            return Err(guest(if n >= MAX_LINE_BYTES {
                format!(
                    "the agent sent an answer line longer than {} KiB: connection dropped",
                    MAX_LINE_BYTES >> 10
                )
            } else {
                "the agent closed the connection in the middle of a line".to_owned()
            }));
        }
        self.read += n as u64;
        if self.read > self.limit {
            return Err(guest(format!(
                "the answer to {} passed its limit of {} MiB: connection dropped{}",
                self.what,
                self.limit >> 20,
                match self.what {
                    "exec" => " (the command is killed)",
                    "job_attach" => " (the job runs on: attach again from where it stopped)",
                    _ => "",
                }
            )));
        }
        let line = std::str::from_utf8(&line)
            .map_err(|_| guest("bad answer from the guest agent: not UTF-8"))?;
        Response::from_line(line).map_err(guest)
    }
}

/// A client of one VM's guest agent: how to connect, and the VM's secret.
pub struct GuestClient<F> {
    connect: F,
    secret: String,
    max_exec_output: u64,
}

impl<F> fmt::Debug for GuestClient<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestClient")
            .field("secret", &"***")
            .finish_non_exhaustive()
    }
}

fn guest(what: impl fmt::Display) -> DriverError {
    DriverError::Guest(what.to_string())
}

async fn bounded<T>(
    limit: Duration,
    what: &str,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| guest(format!("{what}: no answer within {limit:?}")))?
}

impl<F, Fut, S> GuestClient<F>
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = io::Result<S>> + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// `connect` opens a fresh stream to the agent (called once per request).
    pub fn new(connect: F, secret: impl Into<String>) -> Self {
        GuestClient {
            connect,
            secret: secret.into(),
            max_exec_output: MAX_EXEC_OUTPUT_BYTES,
        }
    }

    /// Bounds each `exec`'s answer to `bytes` rather than
    /// [`MAX_EXEC_OUTPUT_BYTES`].
    pub fn with_max_exec_output(mut self, bytes: u64) -> Self {
        self.max_exec_output = bytes;
        self
    }

    /// Connects and sends the request; the answer's lines follow.
    async fn send(&self, op: Op) -> Result<Answer<S>> {
        let (limit, what) = match op {
            Op::Exec(_) => (self.max_exec_output, "exec"),
            Op::Health => (MAX_LINE_BYTES as u64, "a health check"),
            Op::WriteFile(_) => (MAX_LINE_BYTES as u64, "write_file"),
            Op::JobStart(_) => (MAX_LINE_BYTES as u64, "job_start"),
            Op::JobAttach(_) => (self.max_exec_output, "job_attach"),
        };
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, (self.connect)())
            .await
            .map_err(|_| guest(format!("cannot connect within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| guest(format!("cannot connect: {e}")))?;
        let line = Request::new(self.secret.clone(), op).to_line();
        stream
            .write_all(line.as_bytes())
            .await
            .map_err(|e| guest(format!("cannot send the request: {e}")))?;
        stream
            .flush()
            .await
            .map_err(|e| guest(format!("cannot send the request: {e}")))?;
        Ok(Answer {
            reader: BufReader::new(stream),
            read: 0,
            limit,
            what,
        })
    }

    /// Asks the agent whether it is up.
    pub async fn health(&self) -> Result<GuestHealth> {
        bounded(HEALTH_TIMEOUT, "health check", async {
            let mut lines = self.send(Op::Health).await?;
            match lines.next().await? {
                Response::Health { uptime_ms, .. } => Ok(GuestHealth { uptime_ms }),
                other => Err(guest(format!(
                    "unexpected answer to a health check: {other:?}"
                ))),
            }
        })
        .await
    }

    /// Runs a command, streaming its output to `output` (when given, and
    /// while its receiver listens) as it arrives.
    pub async fn exec(
        &self,
        request: &ExecRequest,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        let op = Op::Exec(ExecOp {
            command: request.command.clone(),
            cwd: request.cwd.clone(),
            env: request.env.clone(),
            timeout_ms: Some(u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX)),
        });
        let limit = request.timeout.saturating_add(EXEC_MARGIN);
        bounded(limit, "exec", async {
            let mut lines = self.send(op).await?;
            loop {
                let (stream, data) = match lines.next().await? {
                    Response::Stdout { data } => (Stream::Stdout, data),
                    Response::Stderr { data } => (Stream::Stderr, data),
                    Response::Exit { code, timed_out } => {
                        return Ok(ExecResult {
                            exit_code: code,
                            timed_out,
                        });
                    }
                    other => return Err(guest(format!("unexpected answer to an exec: {other:?}"))),
                };
                if let Some(output) = &output {
                    let _ = output.send(OutputChunk { stream, data });
                }
            }
        })
        .await
    }

    /// Starts `request` as the job `job` (nothing when it exists); returns
    /// once it runs. Its timeout is the job's own: the agent kills it then.
    pub async fn start_job(&self, job: &str, request: &ExecRequest) -> Result<()> {
        let op = Op::JobStart(JobStartOp {
            job: job.to_owned(),
            command: request.command.clone(),
            cwd: request.cwd.clone(),
            env: request.env.clone(),
            timeout_ms: Some(u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX)),
        });
        bounded(JOB_START_TIMEOUT, "job_start", async {
            let mut lines = self.send(op).await?;
            match lines.next_line().await? {
                Response::Ok => Ok(()),
                Response::Error { message } => Err(DriverError::Job(message)),
                other => Err(guest(format!("unexpected answer to job_start: {other:?}"))),
            }
        })
        .await
    }

    /// Follows the job `job` from byte `offset` of its output, streaming
    /// it to `output` (when given, and while its receiver listens), until
    /// it ends.
    pub async fn attach_job(
        &self,
        job: &str,
        offset: u64,
        output: Option<mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<ExecResult> {
        let op = Op::JobAttach(JobAttachOp {
            job: job.to_owned(),
            offset,
        });
        let mut lines = tokio::time::timeout(JOB_START_TIMEOUT, self.send(op))
            .await
            .map_err(|_| {
                guest(format!(
                    "job_attach: no answer within {JOB_START_TIMEOUT:?}"
                ))
            })??;
        loop {
            let line = tokio::time::timeout(JOB_IDLE_TIMEOUT, lines.next_line())
                .await
                .map_err(|_| {
                    guest(format!(
                        "job_attach: the agent sent nothing for {JOB_IDLE_TIMEOUT:?}"
                    ))
                })??;
            let (stream, data) = match line {
                Response::Stdout { data } => (Stream::Stdout, data),
                Response::Stderr { data } => (Stream::Stderr, data),
                Response::Alive => continue,
                Response::Exit { code, timed_out } => {
                    return Ok(ExecResult {
                        exit_code: code,
                        timed_out,
                    });
                }
                Response::Error { message } => return Err(DriverError::Job(message)),
                other => {
                    return Err(guest(format!("unexpected answer to job_attach: {other:?}")));
                }
            };
            if let Some(output) = &output {
                let _ = output.send(OutputChunk { stream, data });
            }
        }
    }

    /// Writes a file atomically (parent folders created) with `mode`.
    pub async fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        let op = Op::WriteFile(WriteFileOp::new(path, contents, mode));
        bounded(WRITE_FILE_TIMEOUT, "write_file", async {
            let mut lines = self.send(op).await?;
            match lines.next().await? {
                Response::Ok => Ok(()),
                other => Err(guest(format!("unexpected answer to write_file: {other:?}"))),
            }
        })
        .await
    }
}
