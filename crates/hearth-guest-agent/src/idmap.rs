//! Idmapped mounts: a sandbox's image folder, owned by the host's root,
//! appears owned by the sandbox's root (an unprivileged host uid range)
//! without a single file of it being rewritten.
//!
//! The kernel's new mount API does it in three calls — `open_tree` (a
//! detached copy of the folder's mount), `mount_setattr` with
//! `MOUNT_ATTR_IDMAP` and the sandbox's user namespace (ids are shifted by
//! that namespace's map), `move_mount` (attach it) — none of which `nix`
//! or `std` wraps, hence this module's `unsafe`: plain system calls on
//! owned descriptors and NUL-terminated strings.
//!
//! **Invariant:** the copy is made read-only together with the idmap, so
//! the image itself can never be written through it; it is only ever an
//! overlay's lower layer.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;

/// `struct mount_attr` (version 0, 32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))
}

/// Mounts a read-only, nosuid, nodev copy of `source`'s mount (that mount
/// alone, not the ones below it) on `target`, with its ids shifted by the
/// user namespace `userns` (an open `/proc/<pid>/ns/user`).
pub fn mount_idmapped(source: &Path, target: &Path, userns: &OwnedFd) -> io::Result<()> {
    let source_c = c_path(source)?;
    let target_c = c_path(target)?;
    let empty = c"";
    #[allow(unsafe_code)]
    // SAFETY: `source_c` is a NUL-terminated string that outlives the call;
    // the flags are plain integers. On success the call returns a new file
    // descriptor that nothing else owns, which `OwnedFd` takes over.
    let tree = unsafe {
        let fd = libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source_c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        );
        if fd < 0 {
            return Err(with_context(
                io::Error::last_os_error(),
                "open_tree",
                source,
            ));
        }
        OwnedFd::from_raw_fd(fd as libc::c_int)
    };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    #[allow(unsafe_code)]
    // SAFETY: `tree` is an open descriptor, `empty` a NUL-terminated string
    // and `attr` a live `struct mount_attr` whose exact size is passed; the
    // kernel only reads it.
    let set = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if set < 0 {
        return Err(with_context(
            io::Error::last_os_error(),
            "mount_setattr (idmap)",
            source,
        ));
    }
    #[allow(unsafe_code)]
    // SAFETY: both strings are NUL-terminated and outlive the call; `tree`
    // is an open descriptor of a detached mount.
    let moved = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if moved < 0 {
        return Err(with_context(
            io::Error::last_os_error(),
            "move_mount",
            target,
        ));
    }
    Ok(())
}

fn with_context(e: io::Error, call: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{call} {}: {e}", path.display()))
}
