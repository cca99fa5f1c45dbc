//! The real `hearth-guest-agent` binary, outside any sandbox: `serve` on a
//! Unix socket in a temporary folder, spoken to with raw protocol lines, and
//! `launch`/`init`'s argument handling. (Inside sandboxes it is tested by
//! `hearth-drivers/tests/sandbox.rs`.)

use hearth_guest_agent::protocol::{ExecOp, Op, Request, Response, WriteFileOp};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_hearth-guest-agent");
const SECRET: &str = "0123456789abcdef";

/// A `serve` process, killed on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
        // A stale socket file is replaced.
        fs::write(&socket, "stale").unwrap();
        let child = Command::new(AGENT)
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--secret-file")
            .arg(dir.path().join("secret"))
            .args(["--vm-id", "vm-test"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the agent did not start");
            thread::sleep(Duration::from_millis(5));
        }
        Agent { child, socket, dir }
    }

    fn connect(&self, line: &str) -> UnixStream {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        stream
    }

    fn raw(&self, line: &str) -> Vec<Response> {
        BufReader::new(self.connect(line))
            .lines()
            .map(|l| Response::from_line(&l.unwrap()).unwrap())
            .collect()
    }

    fn request(&self, op: Op) -> Vec<Response> {
        self.raw(&Request::new(SECRET, op).to_line())
    }

    fn exec(&self, command: &str, timeout_ms: Option<u64>) -> Vec<Response> {
        let cwd = self.dir.path().display().to_string();
        self.request(Op::Exec(ExecOp {
            command: command.into(),
            cwd,
            env: Default::default(),
            timeout_ms,
        }))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout_of(responses: &[Response]) -> String {
    responses
        .iter()
        .filter_map(|r| {
            if let Response::Stdout { data } = r {
                Some(data.as_str())
            } else {
                None
            }
        })
        .collect()
}

fn alive(pid: &str) -> bool {
    let stat = fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

#[test]
fn health_answers_with_uptime_and_pid() {
    let agent = Agent::start();
    let answer = agent.request(Op::Health);
    assert!(
        matches!(answer.as_slice(), [Response::Health { pid, .. }] if *pid == agent.child.id()),
        "{answer:?}"
    );
    assert_eq!(
        fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn bad_secrets_and_bad_requests_get_one_error_line() {
    let agent = Agent::start();
    let marker = agent.dir.path().join("pwned");
    let attack = format!(
        r#""op":"exec","command":"touch {}","cwd":"/"}}"#,
        marker.display()
    );
    let unauthorized = vec![Response::error("unauthorized")];
    assert_eq!(
        agent.raw(&format!("{{\"secret\":\"nope\",{attack}\n")),
        unauthorized
    );
    assert_eq!(
        agent.raw(&format!("{{\"secret\":\"{}\",{attack}\n", &SECRET[..8])),
        unauthorized
    );
    assert_eq!(agent.raw(&format!("{{{attack}\n")), unauthorized);
    assert_eq!(agent.raw("garbage\n"), unauthorized);
    assert!(!marker.exists());
    let answer = agent.raw(&format!("{{\"secret\":\"{SECRET}\",\"op\":\"reboot\"}}\n"));
    assert!(
        matches!(answer.as_slice(), [Response::Error { message }] if message.starts_with("bad request")),
        "{answer:?}"
    );
    // A client that sends nothing is just closed.
    let mut silent = UnixStream::connect(&agent.socket).unwrap();
    silent.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut silent, &mut rest).unwrap();
    assert_eq!(rest, "");
}

#[test]
fn exec_streams_output_and_ends_with_the_exit_code() {
    let agent = Agent::start();
    let answer = agent.exec(
        "echo out; echo err >&2; echo \"$HEARTH_VM_ID $HOME\"; exit 4",
        None,
    );
    assert_eq!(
        answer.last(),
        Some(&Response::Exit {
            code: 4,
            timed_out: false
        })
    );
    assert_eq!(stdout_of(&answer), "out\nvm-test /root\n");
    assert!(
        answer.contains(&Response::Stderr {
            data: "err\n".into()
        }),
        "{answer:?}"
    );
    // Invalid UTF-8 arrives replaced, never as broken JSON.
    let answer = agent.exec("printf 'a\\377b'", None);
    assert_eq!(stdout_of(&answer), "a\u{fffd}b");
    let answer = agent.exec("kill -KILL $$", None);
    assert_eq!(
        answer,
        vec![Response::Exit {
            code: 137,
            timed_out: false
        }]
    );
    let answer = agent.request(Op::Exec(ExecOp {
        command: "true".into(),
        cwd: "/no/such/dir".into(),
        env: Default::default(),
        timeout_ms: None,
    }));
    assert!(
        matches!(answer.as_slice(), [Response::Error { .. }]),
        "{answer:?}"
    );
}

#[test]
fn exec_timeout_kills_the_process_group() {
    let agent = Agent::start();
    let pid_file = agent.dir.path().join("bg");
    let started = Instant::now();
    let answer = agent.exec(
        &format!("sleep 60 & echo $! > {}; sleep 60", pid_file.display()),
        Some(300),
    );
    assert_eq!(
        answer.last(),
        Some(&Response::Exit {
            code: -1,
            timed_out: true
        })
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let background = fs::read_to_string(&pid_file).unwrap();
    // SIGKILL is delivered at once, but the process may take a moment to die.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(&background) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !alive(&background),
        "the background sleep survived the timeout"
    );
}

#[test]
fn a_vanished_client_gets_its_command_killed() {
    let agent = Agent::start();
    let pid_file = agent.dir.path().join("pid");
    let op = Op::Exec(ExecOp {
        command: format!("echo $$ > {}; exec sleep 60", pid_file.display()),
        cwd: "/".into(),
        env: Default::default(),
        timeout_ms: None,
    });
    let stream = agent.connect(&Request::new(SECRET, op).to_line());
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_to_string(&pid_file).map_or(true, |p| p.trim().is_empty()) {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(5));
    }
    let pid = fs::read_to_string(&pid_file).unwrap();
    assert!(alive(&pid));
    drop(stream);
    while alive(&pid) {
        assert!(Instant::now() < deadline, "the command outlived its client");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn write_file_is_atomic_with_its_mode() {
    let agent = Agent::start();
    let path = agent.dir.path().join("a/b/.env");
    let write = |bytes: &[u8], mode| {
        agent.request(Op::WriteFile(WriteFileOp::new(
            path.to_str().unwrap(),
            bytes,
            mode,
        )))
    };
    assert_eq!(write(b"K=V\n", 0o600), vec![Response::Ok]);
    assert_eq!(fs::read(&path).unwrap(), b"K=V\n");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    assert_eq!(write(&[0xff, 0, 1], 0o751), vec![Response::Ok]);
    assert_eq!(fs::read(&path).unwrap(), [0xff, 0, 1]);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o751
    );
    assert_eq!(
        fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1,
        "a temporary file was left behind"
    );
    let answer = agent.request(Op::WriteFile(WriteFileOp::new(
        "relative/path",
        b"x",
        0o600,
    )));
    assert!(
        matches!(answer.as_slice(), [Response::Error { .. }]),
        "{answer:?}"
    );
}

#[test]
fn launch_joins_the_cgroups_then_execs() {
    let dir = tempfile::tempdir().unwrap();
    let procs: Vec<PathBuf> = ["a", "b"].iter().map(|n| dir.path().join(n)).collect();
    let output = Command::new(AGENT)
        .arg("launch")
        .arg("--cgroup-procs")
        .args(&procs)
        .args(["--", "sh", "-c", "echo launched"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, b"launched\n");
    for p in &procs {
        assert_eq!(fs::read_to_string(p).unwrap(), "0");
    }
    let missing = Command::new(AGENT)
        .args([
            "launch",
            "--cgroup-procs",
            "/nonexistent/cgroup.procs",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
}

#[test]
fn init_refuses_to_run_as_anything_but_pid_1() {
    let output = Command::new(AGENT)
        .args([
            "init",
            "--vm-dir",
            "/nonexistent",
            "--lower",
            "/",
            "--uid-base",
            "1000000000",
            "--hostname",
            "x",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("PID 1"),
        "{output:?}"
    );
    // The sandbox's uid base is required: there is no default to fall to.
    let output = Command::new(AGENT)
        .args([
            "init",
            "--vm-dir",
            "/nonexistent",
            "--lower",
            "/",
            "--hostname",
            "x",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--uid-base is required"),
        "{output:?}"
    );
    let usage = Command::new(AGENT).arg("frobnicate").output().unwrap();
    assert!(!usage.status.success());
    assert!(Path::new(AGENT).is_file());
}
