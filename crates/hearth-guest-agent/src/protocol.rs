//! The wire protocol between the host and the guest agent, shared by both
//! sides (the agent's server and `hearth_drivers::guest::GuestClient`).
//!
//! One request per connection over a byte stream (a Unix socket for the
//! sandbox driver, TCP for qemu), newline-delimited JSON:
//!
//! - the client sends exactly one line, a [`Request`]:
//!   `{"secret":"…","op":"health"}`,
//!   `{"secret":"…","op":"exec","command":"…","cwd":"/home","env":{},"timeout_ms":1000}`,
//!   `{"secret":"…","op":"write_file","path":"/home/.env","content":"…","mode":384}`,
//!   `{"secret":"…","op":"job_start","job":"agent-1-0","command":"…","cwd":"/home","env":{},"timeout_ms":1000}`,
//!   `{"secret":"…","op":"job_attach","job":"agent-1-0","offset":0}`;
//! - the agent answers with one or more [`Response`] lines and closes the
//!   connection: `health` → one `health` line; `write_file` → one `ok` line;
//!   `exec` → `stdout`/`stderr` lines as output arrives, then one `exit`
//!   line; `job_start` → one `ok` line once the job runs (or already
//!   existed); `job_attach` → the job's output from byte `offset` as
//!   `stdout`/`stderr` lines, an `alive` line every few seconds without
//!   output, then one `exit` line once the job ended (at once for a job
//!   that already had); any failure → one `error` line.
//!
//! **Invariants:**
//! - a request whose secret is wrong or missing gets exactly
//!   `{"type":"error","message":"unauthorized"}` and has no other effect;
//! - `exec` output is valid UTF-8 (lossy: invalid bytes become U+FFFD; a
//!   character split across reads is never broken);
//! - while an `exec` runs the client keeps its side of the connection open:
//!   end-of-stream from the client means "gone", and the agent kills the
//!   command's process group;
//! - a job (`job_start`) is not tied to any connection: it runs on when
//!   every client is gone, and its output and exit are kept (see
//!   `crate::jobs`) for any later `job_attach`;
//! - job ids are 1 to [`MAX_JOB_ID`] characters of `[A-Za-z0-9_-]`
//!   ([`check_job_id`]): never a path.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The `PATH` every command starts with.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The one message an unauthenticated request gets.
pub const UNAUTHORIZED: &str = "unauthorized";

/// The longest request line the agent reads (a `write_file` carries the
/// file's contents).
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// The longest job id.
pub const MAX_JOB_ID: usize = 64;

/// Whether `job` is a job id: 1 to [`MAX_JOB_ID`] characters of
/// `[A-Za-z0-9_-]`, so that it names one folder and nothing else.
pub fn check_job_id(job: &str) -> Result<(), String> {
    if job.is_empty() || job.len() > MAX_JOB_ID {
        return Err(format!(
            "job id {job:?}: must be 1 to {MAX_JOB_ID} characters"
        ));
    }
    if let Some(c) = job
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "job id {job:?}: {c:?} is not allowed (only letters, digits, '-' and '_')"
        ));
    }
    Ok(())
}

/// One request: the shared secret and what to do.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The VM's secret; missing reads as empty, which never matches.
    #[serde(default)]
    pub secret: String,
    #[serde(flatten)]
    pub op: Op,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("secret", &"***")
            .field("op", &self.op)
            .finish()
    }
}

impl Request {
    pub fn new(secret: impl Into<String>, op: Op) -> Self {
        Request {
            secret: secret.into(),
            op,
        }
    }

    /// The request as one JSON line, newline included.
    pub fn to_line(&self) -> String {
        to_line(self)
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Is the agent up? Answered with [`Response::Health`].
    Health,
    /// Run a command; answered with output lines then [`Response::Exit`].
    Exec(ExecOp),
    /// Write a file atomically; answered with [`Response::Ok`].
    WriteFile(WriteFileOp),
    /// Start a command as a job that outlives the connection; answered
    /// with [`Response::Ok`] (also when the job exists already: nothing
    /// more is started).
    JobStart(JobStartOp),
    /// Follow a job: its output from an offset, then its exit.
    JobAttach(JobAttachOp),
}

/// A command run as the job `job`: `/bin/sh -c command`, as root, as
/// [`ExecOp`] runs it, but detached from any connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStartOp {
    pub job: String,
    pub command: String,
    #[serde(default = "default_cwd")]
    pub cwd: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Kill the job's process group after this long; absent = never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Follow the job `job` from byte `offset` of its output (both streams,
/// as they came; an offset before the oldest byte kept reads from there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAttachOp {
    pub job: String,
    #[serde(default)]
    pub offset: u64,
}

/// `/bin/sh -c command`, as root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOp {
    pub command: String,
    /// The working folder; it must exist.
    #[serde(default = "default_cwd")]
    pub cwd: String,
    /// Added to (and overriding) the base environment: `PATH`, `HOME=/root`,
    /// `HEARTH_VM_ID`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Kill the command's process group after this long; absent = never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

fn default_cwd() -> String {
    "/".into()
}

/// How [`WriteFileOp::content`] encodes the file's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentEncoding {
    /// The content is the file's text as is.
    #[default]
    Utf8,
    /// The content is standard base64 (with padding), for bytes that are not
    /// UTF-8.
    Base64,
}

impl ContentEncoding {
    fn is_utf8(&self) -> bool {
        *self == ContentEncoding::Utf8
    }
}

/// Write `content` to `path` (absolute) with `mode`, creating parent folders.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileOp {
    pub path: String,
    pub content: String,
    /// Permission bits, e.g. `384` (= `0o600`).
    #[serde(default = "default_mode")]
    pub mode: u32,
    #[serde(default, skip_serializing_if = "ContentEncoding::is_utf8")]
    pub encoding: ContentEncoding,
}

fn default_mode() -> u32 {
    0o644
}

impl fmt::Debug for WriteFileOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The contents are often secrets (`/home/.env`): never printed.
        f.debug_struct("WriteFileOp")
            .field("path", &self.path)
            .field("content", &format_args!("<{} chars>", self.content.len()))
            .field("mode", &format_args!("{:o}", self.mode))
            .field("encoding", &self.encoding)
            .finish()
    }
}

impl WriteFileOp {
    /// Encodes `bytes` as text when they are UTF-8, as base64 otherwise.
    pub fn new(path: impl Into<String>, bytes: &[u8], mode: u32) -> Self {
        let (content, encoding) = match std::str::from_utf8(bytes) {
            Ok(text) => (text.to_owned(), ContentEncoding::Utf8),
            Err(_) => (encode_base64(bytes), ContentEncoding::Base64),
        };
        WriteFileOp {
            path: path.into(),
            content,
            mode,
            encoding,
        }
    }

    /// The file's bytes, decoded.
    pub fn bytes(&self) -> Result<Vec<u8>, String> {
        match self.encoding {
            ContentEncoding::Utf8 => Ok(self.content.as_bytes().to_vec()),
            ContentEncoding::Base64 => decode_base64(&self.content),
        }
    }
}

/// One line of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Health {
        uptime_ms: u64,
        pid: u32,
    },
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// The last line of an `exec`: the exit code, 128 + signal when killed
    /// by a signal, -1 with `timed_out` when the timeout killed it.
    Exit {
        code: i32,
        timed_out: bool,
    },
    Ok,
    /// Sent while a followed job runs silently, so that the client tells a
    /// quiet job from a dead connection.
    Alive,
    Error {
        message: String,
    },
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
        }
    }

    /// The response as one JSON line, newline included.
    pub fn to_line(&self) -> String {
        to_line(self)
    }

    /// Parses one line (trailing newline allowed).
    pub fn from_line(line: &str) -> Result<Self, String> {
        serde_json::from_str(line.trim_end())
            .map_err(|e| format!("bad answer from the guest agent: {e}"))
    }
}

fn to_line<T: Serialize>(value: &T) -> String {
    // Serializing these plain types cannot fail.
    let mut line = serde_json::to_string(value).unwrap_or_default();
    line.push('\n');
    line
}

/// Compares two secrets in time that depends only on their lengths.
pub fn secrets_match(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() || expected.is_empty() {
        return false;
    }
    let mut diff = 0u8;
    for (a, b) in given.iter().zip(expected) {
        diff |= a ^ b;
    }
    diff == 0
}

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn encode_base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64_ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional, no whitespace).
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("invalid base64 character {:?}", c as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bits >= 6 {
        return Err("truncated base64".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_read_as_documented() {
        let r: Request = serde_json::from_value(json!({"secret": "s", "op": "health"})).unwrap();
        assert_eq!(r, Request::new("s", Op::Health));
        let r: Request = serde_json::from_value(json!({
            "secret": "s", "op": "exec", "command": "ls", "cwd": "/home", "env": {"K": "V"}, "timeout_ms": 5
        }))
        .unwrap();
        let Op::Exec(exec) = r.op else {
            panic!("not an exec: {r:?}")
        };
        assert_eq!(
            (exec.command.as_str(), exec.cwd.as_str(), exec.timeout_ms),
            ("ls", "/home", Some(5))
        );
        assert_eq!(exec.env["K"], "V");
        let r: Request = serde_json::from_value(json!({
            "secret": "s", "op": "write_file", "path": "/home/.env", "content": "A=1", "mode": 384
        }))
        .unwrap();
        let Op::WriteFile(w) = r.op else {
            panic!("not a write_file")
        };
        assert_eq!((w.mode, w.bytes().unwrap()), (0o600, b"A=1".to_vec()));
        // A missing secret reads as empty.
        let r: Request = serde_json::from_value(json!({"op": "health"})).unwrap();
        assert_eq!(r.secret, "");
    }

    #[test]
    fn responses_write_as_documented() {
        assert_eq!(Response::Ok.to_line(), "{\"type\":\"ok\"}\n");
        assert_eq!(
            Response::Exit {
                code: 3,
                timed_out: false
            }
            .to_line(),
            "{\"type\":\"exit\",\"code\":3,\"timed_out\":false}\n"
        );
        assert_eq!(
            Response::Stdout { data: "hi".into() }.to_line(),
            "{\"type\":\"stdout\",\"data\":\"hi\"}\n"
        );
        assert_eq!(
            Response::error("unauthorized").to_line(),
            "{\"type\":\"error\",\"message\":\"unauthorized\"}\n"
        );
        assert_eq!(
            Response::from_line("{\"type\":\"health\",\"uptime_ms\":1,\"pid\":7}\n").unwrap(),
            Response::Health {
                uptime_ms: 1,
                pid: 7
            }
        );
    }

    #[test]
    fn binary_contents_travel_as_base64() {
        let bytes: Vec<u8> = (0..=255).collect();
        let op = WriteFileOp::new("/x", &bytes, 0o600);
        assert_eq!(op.encoding, ContentEncoding::Base64);
        assert_eq!(op.bytes().unwrap(), bytes);
        for n in 0..8 {
            let b = &bytes[250 - n..];
            assert_eq!(decode_base64(&encode_base64(b)).unwrap(), b);
        }
        assert_eq!(encode_base64(b"hello"), "aGVsbG8=");
        assert!(decode_base64("a$").is_err());
        let line =
            Request::new("s", Op::WriteFile(WriteFileOp::new("/x", b"text", 0o644))).to_line();
        assert!(!line.contains("encoding"), "{line}");
    }

    #[test]
    fn job_requests_read_as_documented() {
        let r: Request = serde_json::from_value(json!({
            "secret": "s", "op": "job_start", "job": "agent-1-0", "command": "make", "timeout_ms": 9
        }))
        .unwrap();
        let Op::JobStart(start) = r.op else {
            panic!("not a job_start: {r:?}")
        };
        assert_eq!(
            (start.job.as_str(), start.cwd.as_str(), start.timeout_ms),
            ("agent-1-0", "/", Some(9))
        );
        let r: Request =
            serde_json::from_value(json!({"secret": "s", "op": "job_attach", "job": "j"})).unwrap();
        assert_eq!(
            r.op,
            Op::JobAttach(JobAttachOp {
                job: "j".into(),
                offset: 0
            })
        );
        assert_eq!(Response::Alive.to_line(), "{\"type\":\"alive\"}\n");
    }

    #[test]
    fn job_ids_are_names_never_paths() {
        for good in ["a", "agent-0192-3", "A_b-9", &"x".repeat(MAX_JOB_ID)] {
            assert!(check_job_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(MAX_JOB_ID + 1),
        ] {
            let e = check_job_id(bad).unwrap_err();
            assert!(e.starts_with("job id"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(secrets_match(b"abc", b"abc"));
        assert!(!secrets_match(b"abd", b"abc"));
        assert!(!secrets_match(b"ab", b"abc"));
        assert!(!secrets_match(b"", b""));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let r = Request::new(
            "topsecret",
            Op::WriteFile(WriteFileOp::new("/x", b"API_KEY=hush", 0o600)),
        );
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("topsecret") && !shown.contains("hush"),
            "{shown}"
        );
    }
}
