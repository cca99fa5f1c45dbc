//! Jobs: commands that outlive the connection that started them
//! (`job_start`), followed by any later connection (`job_attach`). This is
//! how an agent's command survives a restart of the control plane: the
//! server re-attaches where it stopped.
//!
//! On disk, under the jobs folder (`/run/hearth-jobs` by default, 0700,
//! root's), one folder per job (0700):
//!
//! - `out-<offset>`: segments of the job's output, both streams in the
//!   order they came, as records `[b'o' | b'e'][length: u32 LE][UTF-8
//!   bytes]`; `<offset>` (20 digits) is the output byte the segment starts
//!   at. Offsets count output bytes from the job's start, whatever was
//!   dropped since;
//! - `exit`: how it ended (`{"code":…,"timed_out":…}`, or `{"error":…}`
//!   for a job that could not be followed to its end), written through a
//!   temporary file and a rename once every byte of output is on disk.
//!
//! **Invariants:**
//! - a job id is checked ([`check_job_id`]) before it touches the disk;
//! - starting a job whose folder exists starts nothing (idempotent, also
//!   across a restart of the agent);
//! - the output kept is bounded: when a new segment starts, the oldest go
//!   while what remains holds at least [`KEEP_BYTES`]; an attach from an
//!   offset that was dropped reads from the oldest byte kept;
//! - an attacher never reads past the bytes the job's writer committed
//!   (whole records), so it never sees half a record;
//! - a job whose folder has no `exit` and that no thread of this process
//!   follows was lost with an earlier agent process: at start such jobs
//!   get an `exit` saying so, so that attaching to them ends.

use crate::protocol::{JobAttachOp, JobStartOp, Response, check_job_id};
use crate::server::{Finished, send, start_command, supervise};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

/// Where jobs live unless told otherwise (a tmpfs inside qemu VMs, the
/// sandbox's own disk in sandboxes).
pub const DEFAULT_JOBS_DIR: &str = "/run/hearth-jobs";
/// The output kept of a job, at least (at most this plus two segments).
pub const KEEP_BYTES: u64 = 16 << 20;
/// How large an output segment grows before the next starts.
const SEGMENT_BYTES: u64 = 1 << 20;
/// How often an attach without output says the job is alive.
pub const ALIVE_EVERY: Duration = Duration::from_secs(5);
/// What a job found unfollowed at start is told.
pub const LOST: &str = "the job was lost: the guest agent restarted while it ran";
/// Stack size of a job's writer thread.
const WRITER_STACK: usize = 256 << 10;

/// How a job ended, as kept in its `exit` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ExitRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<i32>,
    #[serde(default)]
    timed_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl ExitRecord {
    fn error(message: impl Into<String>) -> Self {
        ExitRecord {
            code: None,
            timed_out: false,
            error: Some(message.into()),
        }
    }

    fn response(&self) -> Response {
        match (&self.error, self.code) {
            (Some(message), _) => Response::error(message.clone()),
            (None, Some(code)) => Response::Exit {
                code,
                timed_out: self.timed_out,
            },
            (None, None) => Response::error("the job's exit record is unreadable"),
        }
    }
}

/// What attachers of a job this process runs wait on.
#[derive(Debug, Default)]
struct Live {
    state: Mutex<LiveState>,
    changed: Condvar,
}

#[derive(Debug, Default, Clone, Copy)]
struct LiveState {
    /// Output bytes on disk, in whole records.
    committed: u64,
    /// The `exit` file is written.
    ended: bool,
}

impl Live {
    fn snapshot(&self) -> LiveState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut LiveState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }

    /// Waits until something changed since `seen` (or `timeout` passed);
    /// false when nothing did.
    fn wait_past(&self, seen: LiveState, timeout: Duration) -> bool {
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| {
                s.committed == seen.committed && s.ended == seen.ended
            })
            .unwrap_or_else(|e| e.into_inner());
        guard.committed != seen.committed || guard.ended != seen.ended
    }
}

/// The jobs of one agent process.
#[derive(Debug)]
pub struct Jobs {
    root: PathBuf,
    keep: u64,
    segment: u64,
    /// The jobs this process follows; held while a job starts, so that an
    /// attach never sees a job half started.
    live: Mutex<HashMap<String, Arc<Live>>>,
}

impl Jobs {
    /// The jobs under `root`; jobs an earlier process left unfinished are
    /// marked lost.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_limits(root, KEEP_BYTES, SEGMENT_BYTES)
    }

    /// [`Jobs::new`] keeping at least `keep` bytes of output in segments
    /// of `segment` bytes (tests use small ones).
    pub fn with_limits(root: impl Into<PathBuf>, keep: u64, segment: u64) -> Self {
        let jobs = Jobs {
            root: root.into(),
            keep,
            segment: segment.max(1),
            live: Mutex::new(HashMap::new()),
        };
        jobs.mark_lost();
        jobs
    }

    fn mark_lost(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if dir.is_dir() && !dir.join("exit").exists() {
                let _ = write_exit(&dir, &ExitRecord::error(LOST));
            }
        }
    }

    fn job_dir(&self, job: &str) -> PathBuf {
        self.root.join(job)
    }

    /// Starts the job (or nothing, when it exists); `vm_id` is exported as
    /// for every command.
    pub fn start(&self, op: &JobStartOp, vm_id: &str) -> Result<(), String> {
        check_job_id(&op.job)?;
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let dir = self.job_dir(&op.job);
        if dir.exists() {
            return Ok(());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| format!("cannot create {}: {e}", self.root.display()))?;
        // An existing folder may have looser bits: the output is root's.
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot restrict {}: {e}", self.root.display()))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (group, rx) = match start_command(&op.command, &op.cwd, &op.env, vm_id, None) {
            Ok(started) => started,
            Err(message) => {
                // Not started: a later start may try again.
                let _ = fs::remove_dir_all(&dir);
                return Err(message);
            }
        };
        let state = Arc::new(Live::default());
        live.insert(op.job.clone(), state.clone());
        let timeout_ms = op.timeout_ms;
        let mut writer = Writer {
            dir: dir.clone(),
            keep: self.keep,
            segment_limit: self.segment,
            segments: Vec::new(),
            file: None,
            offset: 0,
            failed: false,
        };
        let spawned = thread::Builder::new()
            .name("job".into())
            .stack_size(WRITER_STACK)
            .spawn(move || {
                let finished = supervise(group, &rx, timeout_ms, |stderr, data| {
                    writer.append(stderr, data.as_bytes());
                    let committed = writer.offset;
                    state.update(|s| s.committed = committed);
                    true
                });
                let record = match finished.map(Finished::response) {
                    Some(Response::Exit { code, timed_out }) => ExitRecord {
                        code: Some(code),
                        timed_out,
                        error: None,
                    },
                    Some(Response::Error { message }) => ExitRecord::error(message),
                    _ => ExitRecord::error("the job could not be followed"),
                };
                if let Err(e) = write_exit(&writer.dir, &record) {
                    eprintln!("hearth-guest-agent: job exit: {e}");
                }
                state.update(|s| s.ended = true);
            });
        if spawned.is_err() {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = write_exit(&dir, &ExitRecord::error("cannot start the job's thread"));
            live.remove(&op.job);
        }
        Ok(())
    }

    /// Streams the job's output from `op.offset` to `out`, then its end.
    /// An error is the client gone.
    pub fn attach<W: Write>(&self, out: &mut W, op: &JobAttachOp) -> io::Result<()> {
        if let Err(message) = check_job_id(&op.job) {
            return send(out, &Response::error(message));
        }
        let dir = self.job_dir(&op.job);
        let live = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&op.job)
            .cloned();
        if !dir.is_dir() {
            return send(out, &Response::error(format!("no job {}", op.job)));
        }
        if live.is_none() && !dir.join("exit").exists() {
            return send(out, &Response::error(LOST));
        }
        let mut cursor = Cursor::new(dir.clone(), op.offset);
        loop {
            let seen = match &live {
                Some(live) => live.snapshot(),
                None => LiveState {
                    committed: u64::MAX,
                    ended: true,
                },
            };
            cursor.read_to(seen.committed, |stderr, data| {
                send(
                    out,
                    &if stderr {
                        Response::Stderr { data }
                    } else {
                        Response::Stdout { data }
                    },
                )
            })?;
            if seen.ended {
                break;
            }
            if let Some(live) = &live
                && !live.wait_past(seen, ALIVE_EVERY)
            {
                send(out, &Response::Alive)?;
            }
        }
        let record = fs::read(dir.join("exit"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<ExitRecord>(&bytes).ok())
            .unwrap_or_else(|| ExitRecord::error("the job's exit record is unreadable"));
        send(out, &record.response())
    }
}

/// Writes `exit` through a temporary file and a rename.
fn write_exit(dir: &Path, record: &ExitRecord) -> io::Result<()> {
    let temp = dir.join(".exit.tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(&serde_json::to_vec(record).unwrap_or_default())?;
    file.sync_all()?;
    fs::rename(&temp, dir.join("exit"))
}

fn segment_name(start: u64) -> String {
    format!("out-{start:020}")
}

/// The segments of a job's output, by start offset, oldest first.
fn segments(dir: &Path) -> Vec<u64> {
    let mut starts: Vec<u64> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("out-")?
                .parse::<u64>()
                .ok()
        })
        .collect();
    starts.sort_unstable();
    starts
}

/// Appends a job's output records, starting segments and dropping old ones.
struct Writer {
    dir: PathBuf,
    keep: u64,
    segment_limit: u64,
    /// (start, bytes of output) of each segment kept, oldest first.
    segments: Vec<(u64, u64)>,
    file: Option<File>,
    /// Output bytes written so far.
    offset: u64,
    /// Writing failed (the disk is full): the rest of the output is read
    /// and dropped, so the job is never stopped by its pipes.
    failed: bool,
}

impl Writer {
    fn append(&mut self, stderr: bool, data: &[u8]) {
        if self.failed || data.is_empty() {
            return;
        }
        if let Err(e) = self.try_append(stderr, data) {
            eprintln!(
                "hearth-guest-agent: job output in {}: {e} (the rest is dropped)",
                self.dir.display()
            );
            self.failed = true;
        }
    }

    fn try_append(&mut self, stderr: bool, data: &[u8]) -> io::Result<()> {
        let full = self
            .segments
            .last()
            .is_none_or(|&(_, len)| len >= self.segment_limit);
        if self.file.is_none() || full {
            let file = fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(self.dir.join(segment_name(self.offset)))?;
            self.file = Some(file);
            self.segments.push((self.offset, 0));
            let mut kept: u64 = self.segments.iter().map(|&(_, len)| len).sum();
            while self.segments.len() > 1 && kept - self.segments[0].1 >= self.keep {
                let (start, len) = self.segments.remove(0);
                fs::remove_file(self.dir.join(segment_name(start)))?;
                kept -= len;
            }
        }
        let len = u32::try_from(data.len()).map_err(|_| io::Error::other("record too long"))?;
        let mut record = Vec::with_capacity(5 + data.len());
        record.push(if stderr { b'e' } else { b'o' });
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(data);
        if let Some(file) = &mut self.file {
            file.write_all(&record)?;
        }
        if let Some(last) = self.segments.last_mut() {
            last.1 += data.len() as u64;
        }
        self.offset += data.len() as u64;
        Ok(())
    }
}

/// Reads a job's output records from an offset on, across segments.
struct Cursor {
    dir: PathBuf,
    /// The next output byte to hand out.
    offset: u64,
    /// The open segment: its reader, its start, and the output offset of
    /// its next record.
    file: Option<(BufReader<File>, u64, u64)>,
}

impl Cursor {
    fn new(dir: PathBuf, offset: u64) -> Self {
        Cursor {
            dir,
            offset,
            file: None,
        }
    }

    /// Opens the segment holding the offset (the oldest kept when it was
    /// dropped), or with `after` the first that starts past `after`. False
    /// when there is none.
    fn open(&mut self, after: Option<u64>) -> bool {
        let starts = segments(&self.dir);
        let first = match after {
            Some(after) => starts.iter().position(|&s| s > after),
            None => starts
                .iter()
                .rposition(|&s| s <= self.offset)
                .or((!starts.is_empty()).then_some(0)),
        };
        let Some(first) = first else {
            return false;
        };
        // A segment dropped since it was listed: the next one holds what
        // is kept after it.
        for &start in &starts[first..] {
            if let Ok(file) = File::open(self.dir.join(segment_name(start))) {
                self.offset = self.offset.max(start);
                self.file = Some((BufReader::new(file), start, start));
                return true;
            }
        }
        false
    }

    /// Hands `emit` the output from the offset up to `limit` (whole
    /// records; the end of what is on disk when the job ended). An error
    /// is `emit`'s.
    fn read_to(
        &mut self,
        limit: u64,
        mut emit: impl FnMut(bool, String) -> io::Result<()>,
    ) -> io::Result<()> {
        while self.offset < limit {
            if self.file.is_none() && !self.open(None) {
                return Ok(());
            }
            let Some((file, segment, next)) = &mut self.file else {
                return Ok(());
            };
            let mut header = [0u8; 5];
            match file.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // The end of this segment: go on with the next.
                    let after = *segment;
                    self.file = None;
                    if !self.open(Some(after)) {
                        return Ok(());
                    }
                    continue;
                }
                Err(_) => return Ok(()),
            }
            let len = u64::from(u32::from_le_bytes([
                header[1], header[2], header[3], header[4],
            ]));
            let start = *next;
            let end = start + len;
            *next = end;
            if end <= self.offset {
                if file.seek_relative(len as i64).is_err() {
                    return Ok(());
                }
                continue;
            }
            let mut data = vec![0u8; len as usize];
            if file.read_exact(&mut data).is_err() {
                // A record cut short (the agent died writing it).
                return Ok(());
            }
            let mut from = self.offset.saturating_sub(start) as usize;
            // Never from the middle of a character.
            while from < data.len() && (data[from] as i8) < -0x40 {
                from += 1;
            }
            self.offset = end;
            if from < data.len() {
                emit(
                    header[0] == b'e',
                    String::from_utf8_lossy(&data[from..]).into_owned(),
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn start(jobs: &Jobs, job: &str, command: &str) -> Result<(), String> {
        jobs.start(
            &JobStartOp {
                job: job.into(),
                command: command.into(),
                cwd: "/".into(),
                env: BTreeMap::new(),
                timeout_ms: None,
            },
            "vm",
        )
    }

    /// Attaches and returns (output, last line).
    fn attach(jobs: &Jobs, job: &str, offset: u64) -> (String, Response) {
        let mut out = Vec::new();
        jobs.attach(
            &mut out,
            &JobAttachOp {
                job: job.into(),
                offset,
            },
        )
        .unwrap();
        let mut text = String::new();
        let mut last = None;
        for line in String::from_utf8(out).unwrap().lines() {
            match Response::from_line(line).unwrap() {
                Response::Stdout { data } | Response::Stderr { data } => text.push_str(&data),
                Response::Alive => {}
                other => last = Some(other),
            }
        }
        (text, last.unwrap())
    }

    fn read(dir: &Path, offset: u64) -> String {
        let mut text = String::new();
        Cursor::new(dir.to_owned(), offset)
            .read_to(u64::MAX, |_, data| {
                text.push_str(&data);
                Ok(())
            })
            .unwrap();
        text
    }

    #[test]
    fn output_is_bounded_and_offsets_count_from_the_start() {
        let root = tempfile::tempdir().unwrap();
        let mut writer = Writer {
            dir: root.path().to_owned(),
            keep: 64,
            segment_limit: 16,
            segments: Vec::new(),
            file: None,
            offset: 0,
            failed: false,
        };
        // 40 records of 9 bytes: 360 bytes, far more than the 64 kept.
        for i in 0..40 {
            writer.append(i % 2 == 1, format!("line {i:03}\n").as_bytes());
        }
        let kept = read(root.path(), 0);
        assert!(kept.ends_with("line 039\n"), "{kept}");
        assert!(
            kept.len() >= 64 && kept.len() <= 64 + 2 * 18,
            "{} bytes kept",
            kept.len()
        );
        let on_disk: u64 = fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 64 + 2 * 18 + 5 * 12, "{on_disk} bytes on disk");
        // Offsets are from the start: byte 351 is the last line, from
        // inside a record reads its rest, the end reads nothing.
        assert_eq!(read(root.path(), 351), "line 039\n");
        assert_eq!(read(root.path(), 356), "039\n");
        assert_eq!(read(root.path(), 342), "line 038\nline 039\n");
        assert_eq!(read(root.path(), 360), "");
        // Before the oldest kept: from there.
        assert_eq!(read(root.path(), 3), kept);
    }

    #[test]
    fn a_job_runs_without_anyone_attached_and_ends_once() {
        let root = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(root.path().join("jobs"));
        start(&jobs, "j1", "echo out; echo err >&2; exit 4").unwrap();
        let (text, end) = attach(&jobs, "j1", 0);
        assert_eq!(
            end,
            Response::Exit {
                code: 4,
                timed_out: false
            }
        );
        assert!(text == "out\nerr\n" || text == "err\nout\n", "{text:?}");
        // Idempotent: the same id starts nothing, the first run's end stays.
        start(&jobs, "j1", "exit 0").unwrap();
        assert_eq!(attach(&jobs, "j1", 0).1, end);
        assert_eq!(attach(&jobs, "j1", 4).0.len(), 4);
        let mode = fs::metadata(root.path().join("jobs"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // A job that cannot start leaves nothing, so it may be tried again.
        let e = jobs
            .start(
                &JobStartOp {
                    job: "j2".into(),
                    command: "true".into(),
                    cwd: "/no/such/dir".into(),
                    env: BTreeMap::new(),
                    timeout_ms: None,
                },
                "vm",
            )
            .unwrap_err();
        assert!(e.contains("/no/such/dir"), "{e}");
        assert!(!root.path().join("jobs/j2").exists());
    }

    #[test]
    fn jobs_left_by_an_earlier_process_are_lost_not_followed_forever() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("left");
        fs::create_dir_all(&dir).unwrap();
        let jobs = Jobs::new(root.path());
        assert_eq!(attach(&jobs, "left", 0).1, Response::error(LOST));
        // Starting it again starts nothing: the id is taken.
        start(&jobs, "left", "echo again").unwrap();
        assert_eq!(
            attach(&jobs, "left", 0),
            (String::new(), Response::error(LOST))
        );
        assert_eq!(attach(&jobs, "nope", 0).1, Response::error("no job nope"));
    }
}
