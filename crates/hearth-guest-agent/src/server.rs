//! The agent's server (`hearth-guest-agent serve`): accepts connections,
//! serves one [`Request`] per connection, each in a thread of its own.
//!
//! **Invariants:**
//! - nothing happens before the secret is checked, and a bad secret gets
//!   only `unauthorized`;
//! - every `exec` runs in a process group of its own; that group is killed
//!   with SIGKILL on timeout and when the client goes away, so no command
//!   outlives a timed-out or abandoned request (except what it explicitly
//!   moved to another session);
//! - an `exec` answer ends with exactly one `exit` line (or one `error` line
//!   when the command could not start), once the shell has exited and its
//!   output pipes closed — or 250 ms after it exited, when a background
//!   process keeps them open; such processes keep running after a normal
//!   exit (their later output is read and dropped, so they never die of
//!   SIGPIPE);
//! - `write_file` is atomic: readers see the old file or the whole new one;
//! - a job (`job_start`) is followed by a thread of the server, never by a
//!   connection: clients come and go, the job runs on ([`crate::jobs`]).

use crate::jobs::Jobs;
use crate::protocol::{
    BASE_PATH, ExecOp, MAX_REQUEST_BYTES, Op, Request, Response, UNAUTHORIZED, WriteFileOp,
    secrets_match,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// After a command exits, how long to wait for its output pipes to close
/// (a background process may hold them open forever).
const DRAIN_GRACE: Duration = Duration::from_millis(250);
/// After killing a timed-out command, how long to wait for it to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Stack size of the helper threads (readers, waiter, connection monitor).
const SMALL_STACK: usize = 64 << 10;
/// How many events (output pieces of at most 16 KiB, exits) an `exec` holds
/// while the client reads slower than the command writes: then the
/// command's pipe fills and it waits, rather than the agent's memory
/// growing until the guest's OOM killer ends the agent.
const EXEC_EVENTS: usize = 64;
/// Stack size of a connection's thread.
const CONNECTION_STACK: usize = 256 << 10;

/// What the server needs to know.
#[derive(Clone)]
pub struct ServerConfig {
    /// The shared secret every request must carry.
    pub secret: String,
    /// Exported to every command as `HEARTH_VM_ID`.
    pub vm_id: String,
    /// Where jobs keep their output and exit ([`crate::jobs`]).
    pub jobs_dir: std::path::PathBuf,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("secret", &"***")
            .field("vm_id", &self.vm_id)
            .field("jobs_dir", &self.jobs_dir)
            .finish()
    }
}

/// A byte stream the server can answer on: a Unix socket or a TCP stream.
pub trait Connection: Read + Write + Send + Sized + 'static {
    /// A second handle on the same stream (to notice the client leaving).
    fn clone_connection(&self) -> io::Result<Self>;
    /// Ends the stream both ways (the client sees end-of-stream).
    fn close(&self);
    fn set_request_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Connection for UnixStream {
    fn clone_connection(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_request_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl Connection for TcpStream {
    fn clone_connection(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_request_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// Reads the secret from a file (surrounding whitespace ignored); an empty
/// secret is an error, since it would match nothing.
pub fn read_secret(path: &Path) -> io::Result<String> {
    let secret = fs::read_to_string(path)?.trim().to_owned();
    if secret.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(secret)
}

/// Binds `socket` (removing a stale file first, mode 0600) and serves
/// forever.
pub fn serve_unix(socket: &Path, config: ServerConfig) -> io::Result<()> {
    match fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(socket)?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    Server::new(config).serve(listener)
}

/// Binds `addr` over TCP (the qemu driver's VMs: the host reaches it through
/// qemu's port forwarding) and serves forever.
pub fn serve_tcp(addr: SocketAddr, config: ServerConfig) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    Server::new(config).serve_tcp(listener)
}

/// The server: its configuration and start time.
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

#[derive(Debug)]
struct ServerInner {
    config: ServerConfig,
    started: Instant,
    jobs: Jobs,
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        Server {
            inner: Arc::new(ServerInner {
                jobs: Jobs::new(config.jobs_dir.clone()),
                config,
                started: Instant::now(),
            }),
        }
    }

    /// Accepts connections forever, one thread each.
    pub fn serve(&self, listener: UnixListener) -> io::Result<()> {
        self.accept_loop(|| listener.accept().map(|(stream, _)| stream))
    }

    /// Accepts TCP connections forever, one thread each (Nagle off, so that
    /// streamed output lines are not held back).
    pub fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        self.accept_loop(|| {
            let (stream, _) = listener.accept()?;
            let _ = stream.set_nodelay(true);
            Ok(stream)
        })
    }

    fn accept_loop<C: Connection>(&self, accept: impl Fn() -> io::Result<C>) -> io::Result<()> {
        loop {
            match accept() {
                Ok(stream) => self.spawn_connection(stream),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors or memory: wait, do not spin.
                    eprintln!("hearth-guest-agent: accept: {e}");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Serves `conn` in a new thread.
    pub fn spawn_connection<C: Connection>(&self, conn: C) {
        let server = self.clone();
        let spawned = thread::Builder::new()
            .name("connection".into())
            .stack_size(CONNECTION_STACK)
            .spawn(move || server.handle(conn));
        if let Err(e) = spawned {
            eprintln!("hearth-guest-agent: cannot start a thread: {e}");
        }
    }

    /// Serves one connection: reads the request, answers, closes.
    pub fn handle<C: Connection>(&self, mut conn: C) {
        let _ = conn.set_request_timeout(Some(REQUEST_TIMEOUT));
        let line = match read_request_line(&mut conn) {
            Ok(Some(line)) => line,
            Ok(None) => return conn.close(),
            Err(e) => {
                let _ = send(&mut conn, &Response::error(e.to_string()));
                return conn.close();
            }
        };
        let _ = conn.set_request_timeout(None);
        match self.authenticate(&line) {
            Err(response) => {
                let _ = send(&mut conn, &response);
            }
            Ok(request) => match request.op {
                Op::Health => {
                    let uptime_ms =
                        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    let _ = send(
                        &mut conn,
                        &Response::Health {
                            uptime_ms,
                            pid: std::process::id(),
                        },
                    );
                }
                Op::WriteFile(op) => {
                    let response = match write_file(&op) {
                        Ok(()) => Response::Ok,
                        Err(message) => Response::error(message),
                    };
                    let _ = send(&mut conn, &response);
                }
                Op::Exec(op) => exec(&mut conn, &op, &self.inner.config.vm_id),
                Op::JobStart(op) => {
                    let response = match self.inner.jobs.start(&op, &self.inner.config.vm_id) {
                        Ok(()) => Response::Ok,
                        Err(message) => Response::error(message),
                    };
                    let _ = send(&mut conn, &response);
                }
                Op::JobAttach(op) => {
                    let _ = self.inner.jobs.attach(&mut conn, &op);
                }
            },
        }
        conn.close();
    }

    /// The request, if its secret is right; the answer to send otherwise.
    fn authenticate(&self, line: &[u8]) -> Result<Request, Response> {
        // The secret is checked before the request is interpreted, so that a
        // caller without it learns nothing, not even parse errors.
        let value: serde_json::Value =
            serde_json::from_slice(line).map_err(|_| Response::error(UNAUTHORIZED))?;
        let given = value.get("secret").and_then(|s| s.as_str()).unwrap_or("");
        if !secrets_match(given.as_bytes(), self.inner.config.secret.as_bytes()) {
            return Err(Response::error(UNAUTHORIZED));
        }
        serde_json::from_value(value).map_err(|e| Response::error(format!("bad request: {e}")))
    }
}

/// The first line of the stream, without its newline; `None` when the client
/// sent nothing at all.
fn read_request_line<C: Connection>(conn: &mut C) -> io::Result<Option<Vec<u8>>> {
    let mut reader = BufReader::new(Read::take(&mut *conn, MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(if line.is_empty() { None } else { Some(line) })
}

pub(crate) fn send<W: Write>(out: &mut W, response: &Response) -> io::Result<()> {
    out.write_all(response.to_line().as_bytes())
}

/// The environment every command starts from.
fn base_env(vm_id: &str) -> [(&'static str, &str); 3] {
    [
        ("PATH", BASE_PATH),
        ("HOME", "/root"),
        ("HEARTH_VM_ID", vm_id),
    ]
}

/// What the threads of a command report to the thread following it.
pub(crate) enum Event {
    Output { stderr: bool, data: String },
    Closed,
    Exited(io::Result<ExitStatus>),
    ClientGone,
}

/// A helper thread's body, given the command's event channel.
pub(crate) type Helper = Box<dyn FnOnce(mpsc::SyncSender<Event>) + Send + 'static>;

/// Starts `/bin/sh -c command` in `cwd` (which must exist), in a process
/// group of its own, with threads reading its output and reaping it, and
/// `extra` (the exec's client watcher) beside them. Returns the group and
/// the events; on failure nothing is left running.
pub(crate) fn start_command(
    command: &str,
    cwd: &str,
    env: &std::collections::BTreeMap<String, String>,
    vm_id: &str,
    extra: Option<Helper>,
) -> Result<(Pid, mpsc::Receiver<Event>), String> {
    if !Path::new(cwd).is_dir() {
        return Err(format!("cwd {cwd}: no such folder"));
    }
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .current_dir(cwd)
        .env_clear()
        .envs(base_env(vm_id))
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run /bin/sh: {e}"))?;
    let group = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::sync_channel(EXEC_EVENTS);
    let mut helpers_ok = true;
    if let Some(stdout) = child.stdout.take() {
        helpers_ok &= spawn_helper(tx.clone(), move |tx| pump(stdout, false, &tx));
    }
    if let Some(stderr) = child.stderr.take() {
        helpers_ok &= spawn_helper(tx.clone(), move |tx| pump(stderr, true, &tx));
    }
    if let Some(extra) = extra {
        helpers_ok &= spawn_helper(tx.clone(), extra);
    }
    // The waiter owns the child, so it is reaped whatever happens here.
    let waiter_ok = spawn_helper(tx, move |tx| {
        let _ = tx.send(Event::Exited(child.wait()));
    });
    if !helpers_ok || !waiter_ok {
        let _ = killpg(group, Signal::SIGKILL);
        return Err("cannot start the threads of the command".into());
    }
    Ok((group, rx))
}

/// How a followed command ended.
pub(crate) struct Finished {
    pub timed_out: bool,
    pub exited: Option<io::Result<ExitStatus>>,
}

impl Finished {
    /// The last line of an answer about it.
    pub(crate) fn response(self) -> Response {
        match self.exited {
            _ if self.timed_out => Response::Exit {
                code: -1,
                timed_out: true,
            },
            Some(Ok(status)) => Response::Exit {
                code: exit_code(status),
                timed_out: false,
            },
            Some(Err(e)) => Response::error(format!("waiting for the command: {e}")),
            None => Response::error("the command could not be waited for"),
        }
    }
}

/// Follows a started command to its end: hands each piece of output to
/// `output`, kills the group on timeout. `None` when `output` refused a
/// piece or the client went away (the group is then killed, unless the
/// command had exited).
pub(crate) fn supervise(
    group: Pid,
    rx: &mpsc::Receiver<Event>,
    timeout_ms: Option<u64>,
    mut output: impl FnMut(bool, String) -> bool,
) -> Option<Finished> {
    let kill_group = || {
        let _ = killpg(group, Signal::SIGKILL);
    };
    let started = Instant::now();
    // A timeout too far away to represent is no timeout.
    let deadline = timeout_ms.and_then(|ms| started.checked_add(Duration::from_millis(ms)));
    let mut timed_out = false;
    let mut kill_deadline = None;
    let mut exited: Option<io::Result<ExitStatus>> = None;
    let mut drain_deadline = None;
    let mut open_pipes = 2;
    loop {
        if exited.is_some()
            && (open_pipes == 0 || drain_deadline.is_some_and(|d| Instant::now() >= d))
        {
            break;
        }
        if exited.is_none() && kill_deadline.is_some_and(|d| Instant::now() >= d) {
            // Killed but not reaped (stuck in the kernel): answer anyway.
            break;
        }
        let wake = [
            drain_deadline,
            kill_deadline,
            if timed_out { None } else { deadline },
        ]
        .into_iter()
        .flatten()
        .min();
        let event = match wake {
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(event) => Some(event),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(event) => Some(event),
                Err(_) => break,
            },
        };
        match event {
            None => {
                if exited.is_none() && !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
                    timed_out = true;
                    kill_group();
                    kill_deadline = Some(Instant::now() + KILL_GRACE);
                }
            }
            Some(Event::Output { stderr, data }) => {
                if !output(stderr, data) {
                    if exited.is_none() {
                        kill_group();
                    }
                    return None;
                }
            }
            Some(Event::Closed) => open_pipes -= 1,
            Some(Event::Exited(status)) => {
                exited = Some(status);
                drain_deadline = Some(Instant::now() + DRAIN_GRACE);
            }
            Some(Event::ClientGone) => {
                if exited.is_none() {
                    kill_group();
                }
                return None;
            }
        }
    }
    Some(Finished { timed_out, exited })
}

/// Runs one command and streams its output and exit to `conn`.
fn exec<C: Connection>(conn: &mut C, op: &ExecOp, vm_id: &str) {
    let watcher: Option<Helper> = match conn.clone_connection() {
        Ok(mut watch) => Some(Box::new(move |tx: mpsc::SyncSender<Event>| {
            // Nothing more is expected from the client: end-of-stream or
            // an error means it went away.
            let mut buf = [0u8; 256];
            loop {
                match watch.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let _ = tx.send(Event::ClientGone);
        })),
        Err(_) => {
            let _ = send(
                conn,
                &Response::error("cannot start the threads of the command"),
            );
            return;
        }
    };
    let (group, rx) = match start_command(&op.command, &op.cwd, &op.env, vm_id, watcher) {
        Ok(started) => started,
        Err(message) => {
            let _ = send(conn, &Response::error(message));
            return;
        }
    };
    let finished = supervise(group, &rx, op.timeout_ms, |stderr, data| {
        let response = if stderr {
            Response::Stderr { data }
        } else {
            Response::Stdout { data }
        };
        send(conn, &response).is_ok()
    });
    if let Some(finished) = finished {
        let _ = send(conn, &finished.response());
    }
}

/// Starts a helper thread; false when the thread could not start.
fn spawn_helper(
    tx: mpsc::SyncSender<Event>,
    f: impl FnOnce(mpsc::SyncSender<Event>) + Send + 'static,
) -> bool {
    thread::Builder::new()
        .stack_size(SMALL_STACK)
        .spawn(move || f(tx))
        .is_ok()
}

/// Forwards a pipe's output as UTF-8 text until it closes. Once nobody
/// listens any more, keeps draining it, so that a background process the
/// command left behind is not killed by SIGPIPE.
fn pump(mut pipe: impl Read, stderr: bool, tx: &mpsc::SyncSender<Event>) {
    let mut buf = vec![0u8; 16 << 10];
    let mut pending = Vec::new();
    let mut listening = true;
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if !listening {
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        let data = take_utf8(&mut pending, false);
        if !data.is_empty() && tx.send(Event::Output { stderr, data }).is_err() {
            listening = false;
        }
    }
    if listening {
        let data = take_utf8(&mut pending, true);
        if !data.is_empty() {
            let _ = tx.send(Event::Output { stderr, data });
        }
        let _ = tx.send(Event::Closed);
    }
}

/// Takes the decodable prefix of `pending` as text (invalid bytes become
/// U+FFFD), leaving an incomplete last character for the next read unless
/// `eof`.
fn take_utf8(pending: &mut Vec<u8>, eof: bool) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(pending) {
            Ok(text) => {
                out.push_str(text);
                pending.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&pending[..valid]));
                match e.error_len() {
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        pending.drain(..valid + bad);
                    }
                    None if eof => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        pending.clear();
                        return out;
                    }
                    None => {
                        pending.drain(..valid);
                        return out;
                    }
                }
            }
        }
    }
}

/// The exit code, or 128 + the signal that killed the process.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes the file through a temporary file in the same folder and a rename.
fn write_file(op: &WriteFileOp) -> Result<(), String> {
    let bytes = op.bytes()?;
    let path = Path::new(&op.path);
    if !path.is_absolute() {
        return Err(format!("{}: the path must be absolute", op.path));
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(format!("{}: not a file path", op.path));
    };
    fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let mode = op.mode & 0o7777;
    let temp = parent.join(format!(
        ".{}.hearth-{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        // The umask may have cleared bits of `mode`.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&temp);
        format!("cannot write {}: {e}", op.path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_connections_are_served() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let jobs = tempfile::tempdir().unwrap();
        let server = Server::new(ServerConfig {
            secret: "s3cr3t".into(),
            vm_id: "vm".into(),
            jobs_dir: jobs.path().to_owned(),
        });
        thread::spawn(move || server.serve_tcp(listener));
        let ask = |line: &str| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(line.as_bytes()).unwrap();
            let mut answer = String::new();
            BufReader::new(stream).read_line(&mut answer).unwrap();
            Response::from_line(&answer).unwrap()
        };
        assert!(matches!(
            ask("{\"secret\":\"s3cr3t\",\"op\":\"health\"}\n"),
            Response::Health { .. }
        ));
        assert_eq!(
            ask("{\"secret\":\"nope\",\"op\":\"health\"}\n"),
            Response::error(UNAUTHORIZED)
        );
    }

    #[test]
    fn utf8_split_across_reads_is_kept_whole() {
        let text = "héllo €".as_bytes();
        let mut pending = text[..2].to_vec(); // "h" + half of "é"
        assert_eq!(take_utf8(&mut pending, false), "h");
        pending.extend_from_slice(&text[2..]);
        assert_eq!(take_utf8(&mut pending, false), "éllo €");
        let mut bad = vec![b'a', 0xff, b'b', 0xe2, 0x82];
        assert_eq!(take_utf8(&mut bad, false), "a\u{fffd}b");
        assert_eq!(take_utf8(&mut bad, true), "\u{fffd}");
    }
}
