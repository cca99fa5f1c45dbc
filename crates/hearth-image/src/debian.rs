//! The `debian` root filesystem kind: a `debootstrap` tree (minbase plus
//! git, build-essential and a few tools) made into a raw ext4 disk with
//! `mkfs.ext4 -d`, the guest agent at `/sbin/hearth-guest-agent` as its
//! init. The image's initramfs (the minimal one, with `/etc/hearth/root`)
//! loads the modules, mounts the disk and hands over to it (see
//! `hearth_guest_agent::vminit`).
//!
//! | path under the cache                  | what                           |
//! |---------------------------------------|--------------------------------|
//! | `rootfs/debian-<suite>-<key>/`        | the debootstrap tree; `<key>` hashes the suite, mirror and package list |
//!
//! **Invariants:**
//! - the cached tree is never modified: each bake copies it, adds the agent
//!   to the copy and drops the copy once the disk is made;
//! - the tree appears in the cache complete or not at all (debootstrap runs
//!   in a temporary folder that is renamed when it succeeded);
//! - a bake fails, rather than producing an unbootable disk, when the agent
//!   cannot run inside the tree (checked with `chroot <tree>
//!   /sbin/hearth-guest-agent --help`, e.g. when the host's C library is
//!   newer than the suite's).

use crate::{BakeError, Result, temp_path, tool_error};
use sha2::{Digest, Sha256};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Debian release baked by default.
pub const DEFAULT_SUITE: &str = "bookworm";
/// Where debootstrap fetches packages by default.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// What goes into the tree besides `minbase`.
pub const DEFAULT_PACKAGES: [&str; 5] = [
    "git",
    "build-essential",
    "ca-certificates",
    "iproute2",
    "procps",
];
/// The disk device the root is on inside the VM (the first virtio disk).
pub const ROOT_DEVICE: &str = "/dev/vda";

/// The cache key of a tree: what debootstrap is asked for.
pub fn tree_key(suite: &str, mirror: &str, packages: &[String]) -> String {
    let mut sorted: Vec<&str> = packages.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let recipe = format!("minbase\n{suite}\n{mirror}\n{}", sorted.join(","));
    let digest = hex::encode(Sha256::digest(recipe.as_bytes()));
    format!("debian-{suite}-{}", &digest[..12])
}

/// The debootstrap tree for the recipe, made unless cached.
pub fn tree(
    cache_dir: &Path,
    suite: &str,
    mirror: &str,
    packages: &[String],
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let key = tree_key(suite, mirror, packages);
    let parent = cache_dir.join("rootfs");
    let tree = parent.join(&key);
    if tree.is_dir() {
        progress(&format!("{key}: cached"));
        return Ok(tree);
    }
    fs::create_dir_all(&parent).map_err(|e| BakeError::io(&parent, e))?;
    let temp = temp_path(&parent, &key);
    progress(&format!(
        "{key}: debootstrap {suite} with {} (takes minutes)",
        packages.join(",")
    ));
    let out = Command::new("debootstrap")
        .args(["--variant=minbase"])
        .arg(format!("--include={}", packages.join(",")))
        .arg(suite)
        .arg(&temp)
        .arg(mirror)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            BakeError::Tool(format!(
                "run debootstrap (apt-get install debootstrap): {e}"
            ))
        })?;
    if !out.status.success() {
        // Left in place for inspection: debootstrap may have mounts in it.
        let mut error = tool_error("debootstrap", &out);
        if let BakeError::Tool(message) = &mut error {
            message.push_str(&format!(" (its folder is {})", temp.display()));
        }
        return Err(error);
    }
    if let Err(e) = fs::rename(&temp, &tree)
        && !tree.is_dir()
    {
        return Err(BakeError::io(&tree, e));
    }
    Ok(tree)
}

fn run(what: &str, command: &mut Command) -> Result<()> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BakeError::Tool(format!("run {what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(tool_error(what, &out))
    }
}

/// Bytes used by a tree (`du -sb`).
fn tree_size(tree: &Path) -> Result<u64> {
    let out = Command::new("du")
        .arg("-sb")
        .arg(tree)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BakeError::Tool(format!("run du: {e}")))?;
    if !out.status.success() {
        return Err(tool_error("du -sb", &out));
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| BakeError::Tool("du -sb: unreadable answer".into()))
}

/// Makes `disk` (raw ext4, sparse) from a copy of `tree` with `agent` as
/// `/sbin/hearth-guest-agent`, `free_mib` MiB free. `work` is a scratch
/// folder on the same file system as `disk`.
pub fn make_disk(
    tree: &Path,
    agent: &Path,
    work: &Path,
    disk: &Path,
    free_mib: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let copy = work.join("rootfs");
    progress("copying the root tree");
    run(
        "cp -a",
        Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(tree)
            .arg(&copy),
    )?;
    let result = (|| {
        // Package downloads debootstrap left behind: not needed inside.
        let archives = copy.join("var/cache/apt/archives");
        if let Ok(entries) = fs::read_dir(&archives) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|x| x == "deb") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        let target = copy.join("sbin/hearth-guest-agent");
        fs::copy(agent, &target).map_err(|e| BakeError::io(&target, e))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
            .map_err(|e| BakeError::io(&target, e))?;
        run(
            "chroot <tree> /sbin/hearth-guest-agent --help (can the agent run in the tree?)",
            Command::new("chroot")
                .arg(&copy)
                .args(["/sbin/hearth-guest-agent", "--help"])
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        )?;
        let used = tree_size(&copy)?;
        // ext4 metadata and slack, plus the free space asked for.
        let size_mib = used / (1 << 20) * 6 / 5 + 64 + free_mib;
        progress(&format!("mkfs.ext4 -d ({size_mib} MiB)"));
        let file = fs::File::create(disk).map_err(|e| BakeError::io(disk, e))?;
        file.set_len(size_mib << 20)
            .map_err(|e| BakeError::io(disk, e))?;
        drop(file);
        run(
            "mkfs.ext4 -d",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "1", "-L", "hearth-root", "-d"])
                .arg(&copy)
                .arg(disk),
        )
    })();
    let _ = fs::remove_dir_all(&copy);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_keys_follow_the_recipe_not_the_package_order() {
        let a = tree_key("bookworm", DEFAULT_MIRROR, &["git".into(), "procps".into()]);
        let b = tree_key("bookworm", DEFAULT_MIRROR, &["procps".into(), "git".into()]);
        assert_eq!(a, b);
        assert!(a.starts_with("debian-bookworm-") && a.len() == "debian-bookworm-".len() + 12);
        assert_ne!(a, tree_key("trixie", DEFAULT_MIRROR, &["git".into()]));
        assert_ne!(a, tree_key("bookworm", DEFAULT_MIRROR, &["git".into()]));
    }
}
