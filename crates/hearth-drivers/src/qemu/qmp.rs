//! A small QMP client (JSON lines over qemu's Unix socket), blocking, with
//! what the qemu driver needs: capabilities negotiation, `query-status`,
//! `system_powerdown` and `quit`.
//!
//! **Invariants:** every read and write is bounded by the timeout given at
//! connection; asynchronous events (`{"event": …}`) are skipped; a QMP
//! `error` answer is an [`io::Error`] carrying its description.

use serde_json::{Value, json};
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The longest Unix socket path `connect(2)` takes (`sun_path`).
pub const MAX_SOCKET_PATH: usize = 107;

/// Connects to `<dir>/<name>`, through `/proc/self/fd` when the path is too
/// long for a socket address.
pub fn connect_unix(dir: &Path, name: &str) -> io::Result<UnixStream> {
    let path = dir.join(name);
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return UnixStream::connect(path);
    }
    let dir = fs::File::open(dir)?;
    UnixStream::connect(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

/// A negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn protocol(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Qmp {
    /// Connects to the socket `<dir>/<name>`, reads the greeting and
    /// negotiates capabilities.
    pub fn connect(dir: &Path, name: &str, timeout: Duration) -> io::Result<Self> {
        let stream = connect_unix(dir, name)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(protocol(format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "qemu closed the QMP connection",
            ));
        }
        serde_json::from_str(&line).map_err(|e| protocol(format!("bad QMP line {line:?}: {e}")))
    }

    /// Runs a command without arguments; its `return` value.
    pub fn execute(&mut self, command: &str) -> io::Result<Value> {
        let mut line = json!({ "execute": command }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        loop {
            let answer = self.read()?;
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = answer.get("error") {
                let desc = error["desc"].as_str().unwrap_or("unknown error");
                return Err(io::Error::other(format!("QMP {command}: {desc}")));
            }
            // An event: skip.
        }
    }

    /// The VM's run state (`running`, `paused`, `shutdown`, …).
    pub fn query_status(&mut self) -> io::Result<String> {
        let status = self.execute("query-status")?;
        status["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| protocol(format!("query-status answered {status}")))
    }

    /// Asks the guest to power off (an ACPI power button press).
    pub fn system_powerdown(&mut self) -> io::Result<()> {
        self.execute("system_powerdown").map(drop)
    }

    /// Ends qemu at once. qemu may close the connection before answering:
    /// that is success too.
    pub fn quit(&mut self) -> io::Result<()> {
        match self.execute("quit") {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    #[test]
    fn negotiates_skips_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("qmp.sock")).unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut out = stream;
            out.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut seen = Vec::new();
            for answer in [
                "{\"return\": {}}\n".to_string(),
                "{\"event\": \"RESUME\"}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n"
                    .to_string(),
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n".to_string(),
            ] {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                seen.push(line);
                out.write_all(answer.as_bytes()).unwrap();
            }
            // `quit`: close without answering.
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            seen.push(line);
            seen
        });
        let mut qmp = Qmp::connect(dir.path(), "qmp.sock", Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.query_status().unwrap(), "running");
        let err = qmp.system_powerdown().unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        qmp.quit().unwrap();
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                "{\"execute\":\"qmp_capabilities\"}\n",
                "{\"execute\":\"query-status\"}\n",
                "{\"execute\":\"system_powerdown\"}\n",
                "{\"execute\":\"quit\"}\n"
            ]
        );
    }
}
