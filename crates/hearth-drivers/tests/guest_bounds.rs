//! The guest client against hostile agents: root inside a VM can replace
//! the guest agent with anything, so the host's client must stay bounded
//! in memory and time whatever answers it gets. Each test runs a real
//! server on a real Unix socket (a thread of this process writing raw
//! bytes) and a real [`GuestClient`]; beside each attack, a well-behaved
//! server shows the legitimate path still works.

use hearth_drivers::guest::{GuestClient, MAX_EXEC_OUTPUT_BYTES, MAX_LINE_BYTES};
use hearth_drivers::{DriverError, ExecRequest, OutputChunk};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc;

/// How a hostile server ended: whether the client dropped the connection
/// while it was still sending, and how many bytes it got out.
#[derive(Debug)]
struct Served {
    dropped: bool,
    sent: u64,
}

/// A server that accepts one connection, reads the request line, then
/// writes `answer`'s bytes, repeated `repeat` times (`u64::MAX`: until the
/// client goes away), then `tail`; then, with `close`, ends its side of the
/// stream; and holds the connection open until the client closes it.
fn serve(
    answer: Vec<u8>,
    repeat: u64,
    tail: Vec<u8>,
    close: bool,
) -> (PathBuf, JoinHandle<Served>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut request = String::new();
        BufReader::new(&stream).read_line(&mut request).unwrap();
        assert!(request.contains("\"secret\":\"s\""), "{request}");
        let mut writer = &stream;
        let mut sent = 0u64;
        for _ in 0..repeat {
            if writer.write_all(&answer).is_err() {
                return Served {
                    dropped: true,
                    sent,
                };
            }
            sent += answer.len() as u64;
        }
        if writer.write_all(&tail).is_err() {
            return Served {
                dropped: true,
                sent,
            };
        }
        if close {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        // Wait for the client to close its side.
        let mut rest = String::new();
        let _ = BufReader::new(&stream).read_line(&mut rest);
        Served {
            dropped: false,
            sent,
        }
    });
    (path, server, dir)
}

type Connect = Box<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<tokio::net::UnixStream>> + Send>,
        > + Send
        + Sync,
>;

fn client(path: PathBuf) -> GuestClient<Connect> {
    GuestClient::new(
        Box::new(move || {
            let path = path.clone();
            Box::pin(async move { tokio::net::UnixStream::connect(path).await })
                as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        }) as Connect,
        "s",
    )
}

/// This process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kib << 10
}

/// Runs an exec against the server at `path`, draining its output; returns
/// the result and how many bytes of output arrived.
async fn exec(
    path: PathBuf,
    timeout: Duration,
) -> (Result<hearth_drivers::ExecResult, DriverError>, u64) {
    let (tx, mut rx) = mpsc::unbounded_channel::<OutputChunk>();
    let drain = tokio::spawn(async move {
        let mut got = 0u64;
        while let Some(chunk) = rx.recv().await {
            got += chunk.data.len() as u64;
        }
        got
    });
    let mut request = ExecRequest::new("true");
    request.timeout = timeout;
    let result = client(path).exec(&request, Some(tx)).await;
    (result, drain.await.unwrap())
}

const EXIT_0: &[u8] = b"{\"type\":\"exit\",\"code\":0,\"timed_out\":false}\n";

#[tokio::test]
async fn a_well_behaved_agent_is_answered_in_full() {
    let line = b"{\"type\":\"stdout\",\"data\":\"hello\\n\"}\n".to_vec();
    let (path, server, _dir) = serve(line, 3, EXIT_0.to_vec(), true);
    let (result, got) = exec(path, Duration::from_secs(10)).await;
    assert_eq!(result.unwrap().exit_code, 0);
    assert_eq!(got, 18);
    assert!(!server.join().unwrap().dropped);
}

#[tokio::test]
async fn a_one_gib_line_ends_the_call_with_bounded_memory() {
    let before = peak_rss();
    // `{"type":"stdout","data":"aaaa…` for 1 GiB, never a newline.
    let mut chunk = b"{\"type\":\"stdout\",\"data\":\"".to_vec();
    chunk.resize(64 << 10, b'a');
    let (path, server, _dir) = serve(chunk, (1 << 30) / (64 << 10), EXIT_0.to_vec(), false);
    let (result, got) = exec(path, Duration::from_secs(60)).await;
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("answer line longer than 1024 KiB") && err.contains("connection dropped"),
        "{err}"
    );
    assert_eq!(got, 0);
    let served = server.join().unwrap();
    assert!(served.dropped, "the client kept the connection: {served:?}");
    assert!(served.sent < 16 << 20, "{served:?}");
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 64 << 20, "peak memory grew by {} MiB", grown >> 20);
}

#[tokio::test]
async fn endless_output_ends_the_call_at_its_limit() {
    let before = peak_rss();
    let mut line = b"{\"type\":\"stdout\",\"data\":\"".to_vec();
    line.resize(16 << 10, b'x');
    line.extend_from_slice(b"\"}\n");
    let (path, server, _dir) = serve(line, u64::MAX, Vec::new(), false);
    let (result, got) = exec(path, Duration::from_secs(600)).await;
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("passed its limit of 128 MiB") && err.contains("the command is killed"),
        "{err}"
    );
    assert!(
        got <= MAX_EXEC_OUTPUT_BYTES && got > MAX_EXEC_OUTPUT_BYTES / 2,
        "{got}"
    );
    let served = server.join().unwrap();
    assert!(served.dropped, "{served:?}");
    // What was read is what the limit allows (plus socket buffers).
    assert!(
        served.sent < MAX_EXEC_OUTPUT_BYTES + (16 << 20),
        "{served:?}"
    );
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 256 << 20, "peak memory grew by {} MiB", grown >> 20);
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_answers_is_given_up_on_time() {
    // Accepts, reads the request, then says nothing while holding on.
    let (path, server, _dir) = serve(Vec::new(), 0, Vec::new(), false);
    let (result, _) = exec(path, Duration::from_secs(5)).await;
    let err = result.unwrap_err().to_string();
    assert!(err.contains("exec: no answer within 35s"), "{err}");
    // The client dropped the connection: the server's wait ended.
    assert!(!server.join().unwrap().dropped);
}

#[tokio::test]
async fn garbage_and_non_utf8_answers_are_errors_that_quote_nothing() {
    for (garbage, expected) in [
        (
            b"{\"type\":\"stdout\",\"data\":SECRETJUNK\n".to_vec(),
            "bad answer from the guest agent",
        ),
        (b"\xff\xfeSECRETJUNK\n".to_vec(), "not UTF-8"),
        (
            b"{\"type\":\"health\",\"uptime_ms\":1,\"pid\":1}\n".to_vec(),
            "unexpected answer to an exec",
        ),
        (
            b"{\"type\":\"stdout\",\"data\":\"cut".to_vec(),
            "in the middle of a line",
        ),
    ] {
        let (path, server, _dir) = serve(garbage, 1, Vec::new(), true);
        let (result, _) = exec(path, Duration::from_secs(10)).await;
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains(expected) && !err.contains("SECRETJUNK"),
            "{err}"
        );
        assert!(!server.join().unwrap().dropped);
    }
}

#[tokio::test]
async fn an_agent_that_lies_about_the_exit_is_left_at_its_first_exit() {
    // An exit line, then endless output: the call returns at the exit and
    // drops the connection rather than reading on.
    let mut after = b"{\"type\":\"stdout\",\"data\":\"".to_vec();
    after.resize(64 << 10, b'z');
    after.extend_from_slice(b"\"}\n");
    let mut first = b"{\"type\":\"exit\",\"code\":-7,\"timed_out\":false}\n".to_vec();
    first.extend_from_slice(&after);
    let (path, server, _dir) = serve(first, 1, after.repeat(1 << 10), false);
    let (result, got) = exec(path, Duration::from_secs(10)).await;
    let result = result.unwrap();
    assert_eq!((result.exit_code, result.timed_out), (-7, false));
    assert_eq!(got, 0);
    assert!(server.join().unwrap().dropped);
}

#[tokio::test]
async fn health_and_write_file_answers_are_one_bounded_line() {
    // A health check answered by a flood of short lines: one line is all
    // it reads (the rest is "unexpected"), never the flood.
    let line = b"{\"type\":\"stdout\",\"data\":\"x\"}\n".to_vec();
    let (path, server, _dir) = serve(line, u64::MAX, Vec::new(), false);
    let err = client(path).health().await.unwrap_err().to_string();
    assert!(err.contains("unexpected answer to a health check"), "{err}");
    assert!(server.join().unwrap().dropped);
    // A real answer still works.
    let (path, server, _dir) = serve(b"{\"type\":\"ok\"}\n".to_vec(), 1, Vec::new(), true);
    client(path)
        .write_file("/home/a", b"a", 0o644)
        .await
        .unwrap();
    assert!(!server.join().unwrap().dropped);
    let (path, server, _dir) = serve(
        b"{\"type\":\"health\",\"uptime_ms\":5,\"pid\":9}\n".to_vec(),
        1,
        Vec::new(),
        true,
    );
    assert_eq!(client(path).health().await.unwrap().uptime_ms, 5);
    assert!(!server.join().unwrap().dropped);
    assert_eq!(MAX_LINE_BYTES, 1 << 20);
}
