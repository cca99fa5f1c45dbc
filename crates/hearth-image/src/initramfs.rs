//! The minimal image's initramfs: busybox with its applet links, the guest
//! agent as `/init` with the shared libraries it needs, the kernel modules
//! and their load order, and the few files a root filesystem needs.
//!
//! | path                          | what                                        |
//! |-------------------------------|---------------------------------------------|
//! | `/init`                       | symbolic link to `/sbin/hearth-guest-agent` (no arguments + PID 1 = `vm-init`) |
//! | `/sbin/hearth-guest-agent`    | the agent binary                            |
//! | `/bin/busybox` + applet links | the shell and tools (`/bin/sh`, `ip`, …)     |
//! | `/lib/…`, `/lib64/…`          | the agent's shared libraries and dynamic loader, at the paths `ldd` names |
//! | `/lib/modules/<name>.ko`      | decompressed modules                        |
//! | `/etc/hearth/modules`         | their paths, in load order                  |
//! | `/etc/hearth/root`            | `debian` images only: the disk root to switch to |
//! | `/etc/passwd`, `/etc/group`   | `root` only                                 |
//! | `/dev/console`                | the console device (the kernel opens it before `/init` runs) |
//!
//! **Invariant:** nothing here depends on the host beyond the given inputs
//! and the libraries `ldd` resolves: the same inputs give the same archive.

use crate::cpio::{Archive, Node};
use crate::kernel::Module;
use crate::{BakeError, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the agent lives in the image.
pub const AGENT_PATH: &str = "/sbin/hearth-guest-agent";
/// The module list vm-init reads (`hearth_guest_agent::vminit::MODULES_FILE`).
pub const MODULES_FILE: &str = "/etc/hearth/modules";
/// The disk root vm-init switches to (`hearth_guest_agent::vminit::ROOT_FILE`).
pub const ROOT_FILE: &str = "/etc/hearth/root";

/// The shared objects a `ldd` listing names, as absolute paths (the
/// dynamic loader included; the vDSO skipped). `Err` names a library `ldd`
/// could not find.
pub fn parse_ldd(listing: &str) -> Result<Vec<PathBuf>, String> {
    let mut paths = Vec::new();
    for line in listing.lines().map(str::trim) {
        if line.is_empty()
            || line.contains("not a dynamic executable")
            || line.contains("statically linked")
        {
            continue;
        }
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("{} not found", name.trim()));
                }
                rest.split(" (").next().unwrap_or("").trim()
            }
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        if target.starts_with('/') {
            paths.push(PathBuf::from(target));
        }
    }
    Ok(paths)
}

/// The libraries `binary` needs, by `ldd` (none for a static binary).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BakeError::Tool(format!("run ldd: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd exits 1 for static binaries, saying so.
        let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        if all.contains("not a dynamic executable") || all.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(crate::tool_error(
            &format!("ldd {}", binary.display()),
            &out,
        ));
    }
    parse_ldd(&text).map_err(|e| BakeError::Invalid(format!("{}: {e}", binary.display())))
}

/// The applets of a busybox binary (`bin/sh`, `sbin/ip`, …), by running it
/// with `--list-full`.
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BakeError::Tool(format!("run {} --list-full: {e}", busybox.display())))?;
    if !out.status.success() {
        return Err(crate::tool_error("busybox --list-full", &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        // Only applets in the usual folders (not `linuxrc` at the root).
        .filter(|l| {
            ["bin/", "sbin/", "usr/bin/", "usr/sbin/"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(str::to_owned)
        .collect())
}

/// What goes into the minimal initramfs.
#[derive(Debug)]
pub struct Contents<'a> {
    pub agent: &'a [u8],
    /// (path in the image, bytes) of each shared library.
    pub libraries: Vec<(PathBuf, Vec<u8>)>,
    pub busybox: &'a [u8],
    pub applets: &'a [String],
    pub modules: &'a [Module],
    /// A disk root to hand over to (`debian` images): written to
    /// `/etc/hearth/root`.
    pub root_device: Option<&'a str>,
}

/// Builds the archive.
pub fn build(contents: &Contents<'_>) -> Archive {
    let mut archive = Archive::new();
    for dir in [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/home",
        "/etc/hearth",
        "/lib/modules",
    ] {
        archive.dir(dir, 0o755);
    }
    archive.dir("/tmp", 0o1777);
    archive.dir("/root", 0o700);
    archive.add("/dev/console", Node::CharDevice(5, 1), 0o600);
    archive.add("/dev/null", Node::CharDevice(1, 3), 0o666);

    archive.file("/bin/busybox", contents.busybox.to_vec(), 0o755);
    for applet in contents.applets {
        let path = format!("/{applet}");
        if !archive.contains(&path) {
            archive.symlink(&path, "/bin/busybox");
        }
    }
    archive.file(AGENT_PATH, contents.agent.to_vec(), 0o755);
    archive.symlink("/init", AGENT_PATH);
    for (path, bytes) in &contents.libraries {
        archive.file(&path.to_string_lossy(), bytes.clone(), 0o755);
    }

    let mut list = String::from("# loaded in this order by hearth-guest-agent vm-init\n");
    for module in contents.modules {
        let path = format!("/lib/modules/{}.ko", module.name);
        archive.file(&path, module.bytes.clone(), 0o644);
        list.push_str(&path);
        list.push('\n');
    }
    archive.file(MODULES_FILE, list.into_bytes(), 0o644);
    if let Some(device) = contents.root_device {
        archive.file(ROOT_FILE, format!("{device}\n").into_bytes(), 0o644);
    }
    archive.file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    );
    archive.file("/etc/group", b"root:x:0:\n".to_vec(), 0o644);
    archive.file("/etc/shells", b"/bin/sh\n".to_vec(), 0o644);
    archive
}

/// Reads each library's bytes (following symbolic links on the host) for
/// [`Contents::libraries`].
pub fn read_libraries(paths: &[PathBuf]) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    paths
        .iter()
        .map(|path| {
            fs::read(path)
                .map(|bytes| (path.clone(), bytes))
                .map_err(|e| BakeError::io(path, e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio;

    #[test]
    fn ldd_listings_give_libraries_and_loader() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f31)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f31)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f31)\n";
        assert_eq!(
            parse_ldd(listing).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(
            parse_ldd("\tnot a dynamic executable\n")
                .unwrap()
                .is_empty()
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.contains("libfoo.so.1"));
    }

    #[test]
    fn the_archive_has_init_busybox_modules_and_their_order() {
        let modules = [
            Module {
                name: "virtio_ring".into(),
                bytes: b"ring".to_vec(),
            },
            Module {
                name: "virtio".into(),
                bytes: b"virtio".to_vec(),
            },
        ];
        let applets = ["bin/sh".to_string(), "sbin/ip".to_string()];
        let archive = build(&Contents {
            agent: b"agent",
            libraries: vec![(PathBuf::from("/lib64/ld-linux-x86-64.so.2"), b"ld".to_vec())],
            busybox: b"busybox",
            applets: &applets,
            modules: &modules,
            root_device: Some("/dev/vda"),
        });
        let members = cpio::parse(&archive.to_bytes()).unwrap();
        let find = |p: &str| {
            members
                .iter()
                .find(|m| m.path == p)
                .unwrap_or_else(|| panic!("{p}"))
        };
        assert_eq!(find("init").data, AGENT_PATH.as_bytes());
        assert_eq!(find("sbin/hearth-guest-agent").data, b"agent");
        assert_eq!(find("bin/sh").data, b"/bin/busybox");
        assert_eq!(find("sbin/ip").data, b"/bin/busybox");
        assert_eq!(find("lib64/ld-linux-x86-64.so.2").data, b"ld");
        assert_eq!(find("lib/modules/virtio.ko").data, b"virtio");
        assert_eq!(find("dev/console").rdev, (5, 1));
        assert_eq!(find("etc/hearth/root").data, b"/dev/vda\n");
        let order = String::from_utf8(find("etc/hearth/modules").data.clone()).unwrap();
        assert!(
            order.ends_with("/lib/modules/virtio_ring.ko\n/lib/modules/virtio.ko\n"),
            "{order}"
        );
    }
}
