//! A writer of "newc" cpio archives (`070701`), the format the Linux kernel
//! unpacks as an initramfs.
//!
//! **Invariants:**
//! - the output is a pure function of the entries: every entry has uid and
//!   gid 0, mtime 0 and an inode number given by its position, so the same
//!   inputs bake the same bytes (and the same sha256);
//! - entries are written in the order given; [`Archive`] keeps them sorted
//!   by path, which puts every folder before what it contains;
//! - headers and file data are padded to 4 bytes, and the archive ends with
//!   the `TRAILER!!!` entry.

use std::collections::BTreeMap;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Vec<u8>),
    /// A symbolic link to the given target.
    Symlink(String),
    /// A character device (major, minor), e.g. `/dev/console` (5, 1).
    CharDevice(u32, u32),
}

/// One archive member: its node and permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub node: Node,
    pub mode: u32,
}

/// The members of an initramfs by absolute path, written sorted.
#[derive(Debug, Clone, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `path` and creates its missing parent folders
    /// (mode 0755). `path` is absolute; the archive stores it without the
    /// leading `/`.
    pub fn add(&mut self, path: &str, node: Node, mode: u32) {
        let path = path.trim_start_matches('/').trim_end_matches('/');
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Entry {
                node: Node::Dir,
                mode: 0o755,
            });
        }
        self.entries.insert(
            path.to_owned(),
            Entry {
                node,
                mode: mode & 0o7777,
            },
        );
    }

    pub fn dir(&mut self, path: &str, mode: u32) {
        self.add(path, Node::Dir, mode);
    }

    pub fn file(&mut self, path: &str, contents: Vec<u8>, mode: u32) {
        self.add(path, Node::File(contents), mode);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Node::Symlink(target.to_owned()), 0o777);
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries
            .contains_key(path.trim_start_matches('/').trim_end_matches('/'))
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries
            .get(path.trim_start_matches('/').trim_end_matches('/'))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the whole archive, trailer included.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut writer = Writer::new(out);
        for (path, entry) in &self.entries {
            writer.entry(path, entry)?;
        }
        writer.finish()
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        out
    }
}

/// Streams entries into a newc archive.
struct Writer<'a, W: Write> {
    out: &'a mut W,
    written: u64,
    next_ino: u32,
}

impl<'a, W: Write> Writer<'a, W> {
    fn new(out: &'a mut W) -> Self {
        Writer {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: usize,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other(format!("{name}: larger than 4 GiB")))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // checksum (newc: none)
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn entry(&mut self, path: &str, entry: &Entry) -> io::Result<()> {
        match &entry.node {
            Node::Dir => self.header(path, S_IFDIR | entry.mode, 2, 0, (0, 0)),
            Node::File(data) => {
                self.header(path, S_IFREG | entry.mode, 1, data.len(), (0, 0))?;
                self.put(data)?;
                self.pad()
            }
            Node::Symlink(target) => {
                self.header(path, S_IFLNK | 0o777, 1, target.len(), (0, 0))?;
                self.put(target.as_bytes())?;
                self.pad()
            }
            Node::CharDevice(major, minor) => {
                self.header(path, S_IFCHR | entry.mode, 1, 0, (*major, *minor))
            }
        }
    }

    fn finish(mut self) -> io::Result<()> {
        self.next_ino = 0;
        self.header("TRAILER!!!", 0, 1, 0, (0, 0))
    }
}

/// One member read back by [`parse`] (for tests and inspection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub path: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Reads a newc archive back (up to its trailer).
pub fn parse(mut bytes: &[u8]) -> Result<Vec<Parsed>, String> {
    let total = bytes.len();
    let mut members = Vec::new();
    let field = |header: &[u8], i: usize| -> Result<u32, String> {
        let text = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
            .map_err(|_| "non-ASCII header".to_string())?;
        u32::from_str_radix(text, 16).map_err(|e| format!("bad header field {text:?}: {e}"))
    };
    let align = |offset: usize| (4 - offset % 4) % 4;
    loop {
        if bytes.len() < 110 || &bytes[..6] != b"070701" {
            return Err(format!("bad header at offset {}", total - bytes.len()));
        }
        let header = &bytes[..110];
        let mode = field(header, 1)?;
        let size = field(header, 6)? as usize;
        let rdev = (field(header, 9)?, field(header, 10)?);
        let name_len = field(header, 11)? as usize;
        let name_end = 110 + name_len;
        if bytes.len() < name_end {
            return Err("truncated name".into());
        }
        let path = String::from_utf8_lossy(&bytes[110..name_end - 1]).into_owned();
        let offset = total - bytes.len();
        let data_start = name_end + align(offset + name_end);
        let data_end = data_start + size;
        if bytes.len() < data_end {
            return Err(format!("{path}: truncated data"));
        }
        let data = bytes[data_start..data_end].to_vec();
        let next = data_end + align(offset + data_end);
        bytes = &bytes[next.min(bytes.len())..];
        if path == "TRAILER!!!" {
            return Ok(members);
        }
        members.push(Parsed {
            path,
            mode,
            rdev,
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_round_trip_with_parents_first_and_padding() {
        let mut archive = Archive::new();
        archive.file("/usr/bin/tool", b"abcde".to_vec(), 0o755);
        archive.symlink("/bin/sh", "/bin/busybox");
        archive.add("/dev/console", Node::CharDevice(5, 1), 0o600);
        archive.dir("/tmp", 0o1777);
        let bytes = archive.to_bytes();
        assert!(bytes.len().is_multiple_of(4));
        let members = parse(&bytes).unwrap();
        let paths: Vec<&str> = members.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "tmp",
                "usr",
                "usr/bin",
                "usr/bin/tool"
            ]
        );
        let tool = &members[7];
        assert_eq!(
            (tool.mode, tool.data.as_slice()),
            (S_IFREG | 0o755, &b"abcde"[..])
        );
        assert_eq!(members[1].mode, S_IFLNK | 0o777);
        assert_eq!(members[1].data, b"/bin/busybox");
        assert_eq!(
            (members[3].mode, members[3].rdev),
            (S_IFCHR | 0o600, (5, 1))
        );
        assert_eq!(members[4].mode, S_IFDIR | 0o1777);
        // Deterministic: the same entries give the same bytes.
        assert_eq!(archive.to_bytes(), bytes);
        let trailer = b"TRAILER!!!";
        assert!(bytes.windows(trailer.len()).any(|w| w == trailer));
    }

    #[test]
    fn headers_match_the_newc_layout() {
        let mut archive = Archive::new();
        archive.file("/a", b"x".to_vec(), 0o644);
        let bytes = archive.to_bytes();
        // magic, ino 1, mode 0100644, uid, gid, nlink 1, mtime 0, size 1.
        let expected: String = ["070701", "00000001", "000081a4", "00000000", "00000000"]
            .into_iter()
            .chain(["00000001", "00000000", "00000001"])
            .collect();
        assert_eq!(&bytes[..62], expected.as_bytes());
        // name "a\0" right after the 110-byte header, padded to 112.
        assert_eq!(&bytes[110..112], b"a\0");
        assert_eq!(bytes[112], b'x');
    }
}
