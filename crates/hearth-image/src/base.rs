//! The sandbox driver's default image: a root folder assembled from this
//! host's installed Debian packages, so that a sandbox's lower layer is
//! never the host's `/`.
//!
//! What goes in: the files `dpkg -L` lists for [`PACKAGES`] and for every
//! package they depend on (`Depends` and `Pre-Depends`, recursively, the
//! first installed choice of each alternative) — which brings the C
//! library and every shared library those programs link against — minus
//! documentation, manuals and translations; the merged-`/usr` links of the
//! host; and a minimal `/etc` written here: root's `passwd` and `group`,
//! `hosts`, `nsswitch.conf`, the host's `resolv.conf`, CA bundle and
//! dynamic linker cache. Never a shadow file, a key, or anything of the
//! host's users.
//!
//! Files are hard links to the host's own files when the image store is on
//! the same filesystem (instant, no space), copies otherwise; setuid and
//! setgid files are copied with those bits cleared. The folder is only
//! ever a read-only lower layer (see `hearth_guest_agent::idmap`), so a
//! link never lets a sandbox write a host file.
//!
//! Output: `<images_dir>/sandbox-base-<digest>/`, the digest (sha256,
//! first 16 hex digits) covering [`BUILDER_VERSION`], each package's name
//! and version, and the host files copied into `/etc`: a package upgrade
//! on the host makes a new image, an unchanged host reuses the old one.
//!
//! **Invariants:**
//! - the folder appears complete or not at all: it is built under a
//!   temporary name and renamed into place, under an exclusive lock on
//!   `<images_dir>/.sandbox-base.lock`, so concurrent servers or tests
//!   build it once;
//! - building needs no network and takes seconds.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bumped whenever what a base image holds changes for the same packages.
pub const BUILDER_VERSION: &str = "sandbox-base-1";

/// The packages a sandbox has (with everything they depend on): a shell,
/// the core utilities, git, and the tools setup commands and the tests
/// use.
pub const PACKAGES: [&str; 17] = [
    "base-files",
    "bash",
    "dash",
    "coreutils",
    "diffutils",
    "findutils",
    "grep",
    "sed",
    "mawk",
    "gzip",
    "tar",
    "procps",
    "util-linux",
    "hostname",
    "git",
    "ca-certificates",
    "netbase",
];

/// Folders of packages left out: documentation, not needed to run.
const SKIPPED: [&str; 6] = [
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/info",
    "/usr/share/locale",
    "/usr/share/lintian",
    "/usr/share/bug",
];

/// Files never taken from a package, whatever it lists.
const NEVER: [&str; 4] = [
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/shadow-",
    "/etc/gshadow-",
];

/// Host files copied into the image's `/etc` when they exist: none holds a
/// secret.
const HOST_ETC: [&str; 4] = [
    "/etc/resolv.conf",
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/ld.so.cache",
    "/etc/os-release",
];

#[derive(Debug, thiserror::Error)]
#[error("sandbox base image: {0}")]
pub struct BaseError(String);

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> BaseError {
    BaseError(format!("{what}: {e}"))
}

/// An installed package: its version and what it depends on.
#[derive(Debug)]
struct Package {
    version: String,
    depends: Vec<Vec<String>>,
}

/// Every installed package, from one `dpkg-query` run.
fn installed() -> Result<BTreeMap<String, Package>, BaseError> {
    let output = Command::new("dpkg-query")
        .args([
            "-W",
            "-f",
            "${Package}\t${db:Status-Status}\t${Version}\t${Pre-Depends}, ${Depends}\n",
        ])
        .output()
        .map_err(|e| err("run dpkg-query (is this a Debian host?)", e))?;
    if !output.status.success() {
        return Err(BaseError(format!(
            "dpkg-query failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let mut packages = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut fields = line.splitn(4, '\t');
        let (Some(name), Some(status), Some(version), Some(depends)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if status != "installed" {
            continue;
        }
        let depends = depends
            .split(',')
            .map(|alternatives| {
                alternatives
                    .split('|')
                    .filter_map(|dep| {
                        let name = dep.split_whitespace().next()?;
                        let name = name.split(':').next()?;
                        (!name.is_empty()).then(|| name.to_owned())
                    })
                    .collect::<Vec<_>>()
            })
            .filter(|alts| !alts.is_empty())
            .collect();
        packages.insert(
            name.to_owned(),
            Package {
                version: version.to_owned(),
                depends,
            },
        );
    }
    Ok(packages)
}

/// [`PACKAGES`] and their dependency closure, name → version (virtual
/// packages and uninstalled alternatives are skipped).
fn closure() -> Result<BTreeMap<String, String>, BaseError> {
    let all = installed()?;
    let mut found = BTreeMap::new();
    let mut todo: Vec<&str> = PACKAGES.to_vec();
    for name in PACKAGES {
        if !all.contains_key(name) {
            return Err(BaseError(format!(
                "the package {name} is not installed on this host (apt-get install {name})"
            )));
        }
    }
    while let Some(name) = todo.pop() {
        let Some(package) = all.get(name) else {
            continue;
        };
        if found
            .insert(name.to_owned(), package.version.clone())
            .is_some()
        {
            continue;
        }
        for alternatives in &package.depends {
            if let Some(pick) = alternatives.iter().find(|a| all.contains_key(a.as_str())) {
                todo.push(pick);
            }
        }
    }
    Ok(found)
}

/// The image's digest: what it is built from.
fn digest(packages: &BTreeMap<String, String>) -> String {
    let mut hash = Sha256::new();
    hash.update(BUILDER_VERSION.as_bytes());
    for (name, version) in packages {
        hash.update(format!("\n{name}={version}").as_bytes());
    }
    for file in HOST_ETC {
        hash.update(format!("\n{file}:").as_bytes());
        hash.update(fs::read(file).unwrap_or_default());
    }
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex[..16].to_owned()
}

/// The base image in `images_dir`, built first when missing; returns its
/// folder.
pub fn ensure(images_dir: &Path) -> Result<PathBuf, BaseError> {
    let packages = closure()?;
    let name = format!("sandbox-base-{}", digest(&packages));
    let target = images_dir.join(&name);
    if target.is_dir() {
        return Ok(target);
    }
    fs::create_dir_all(images_dir)
        .map_err(|e| err(format!("create {}", images_dir.display()), e))?;
    let lock = fs::File::create(images_dir.join(".sandbox-base.lock"))
        .map_err(|e| err("create the lock file", e))?;
    lock.lock().map_err(|e| err("lock the image store", e))?;
    if target.is_dir() {
        return Ok(target);
    }
    let building = images_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if building.exists() {
        fs::remove_dir_all(&building).map_err(|e| err("remove a stale build", e))?;
    }
    let result = build(&building, &packages).and_then(|()| {
        fs::rename(&building, &target)
            .map_err(|e| err(format!("rename into {}", target.display()), e))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&building);
    }
    result.map(|()| target)
}

fn build(root: &Path, packages: &BTreeMap<String, String>) -> Result<(), BaseError> {
    fs::create_dir_all(root).map_err(|e| err(format!("create {}", root.display()), e))?;
    // The host's merged-/usr links first, so that package paths under
    // /bin, /lib… land in /usr.
    for link in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(link);
        if let Ok(to) = fs::read_link(&host) {
            symlink(&to, root.join(link)).map_err(|e| err(format!("link /{link}"), e))?;
            fs::create_dir_all(root.join(&to))
                .map_err(|e| err(format!("create {}", to.display()), e))?;
        }
    }
    let same_device = fs::metadata(root)
        .and_then(|r| fs::metadata("/usr").map(|u| r.dev() == u.dev()))
        .unwrap_or(false);
    {
        let output = Command::new("dpkg")
            .arg("-L")
            .args(packages.keys())
            .output()
            .map_err(|e| err("run dpkg -L", e))?;
        if !output.status.success() {
            return Err(BaseError(format!(
                "dpkg -L failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let path = Path::new(line);
            if !path.is_absolute()
                || SKIPPED.iter().any(|s| path.starts_with(s))
                || NEVER.iter().any(|n| path == Path::new(n))
            {
                continue;
            }
            take(root, path, same_device)?;
        }
    }
    write_etc(root)?;
    for (dir, mode) in [
        ("home", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("run", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("usr/local/bin", 0o755),
    ] {
        let path = root.join(dir);
        fs::create_dir_all(&path).map_err(|e| err(format!("create /{dir}"), e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| err(format!("chmod /{dir}"), e))?;
    }
    Ok(())
}

/// Puts the host's `path` into the image: a folder, a link, or a file
/// (hard-linked when possible).
fn take(root: &Path, path: &Path, same_device: bool) -> Result<(), BaseError> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(()); // listed but gone (a diverted or removed file)
    };
    let inside = root.join(path.strip_prefix("/").unwrap_or(path));
    if fs::symlink_metadata(&inside).is_ok() {
        return Ok(());
    }
    if let Some(parent) = inside.parent() {
        fs::create_dir_all(parent).map_err(|e| err(format!("create {}", parent.display()), e))?;
    }
    let ft = meta.file_type();
    let done = if ft.is_dir() {
        fs::create_dir(&inside).and_then(|()| {
            fs::set_permissions(&inside, fs::Permissions::from_mode(meta.mode() & 0o7777))
        })
    } else if ft.is_symlink() {
        fs::read_link(path).and_then(|to| symlink(to, &inside))
    } else if ft.is_file() {
        let privileged = meta.mode() & 0o6000 != 0;
        if same_device && !privileged && fs::hard_link(path, &inside).is_ok() {
            Ok(())
        } else {
            fs::copy(path, &inside).and_then(|_| {
                fs::set_permissions(&inside, fs::Permissions::from_mode(meta.mode() & 0o1777))
            })
        }
    } else {
        Ok(()) // no devices, sockets or fifos in an image
    };
    done.map_err(|e| err(format!("add {}", path.display()), e))
}

fn write_etc(root: &Path) -> Result<(), BaseError> {
    let etc = root.join("etc");
    fs::create_dir_all(&etc).map_err(|e| err("create /etc", e))?;
    let write = |name: &str, text: &str| -> Result<(), BaseError> {
        let path = etc.join(name);
        // A package's own file of that name (base-files ships some) is a
        // hard link to the host's: replace it, never write through it.
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(format!("replace /etc/{name}"), e)),
        }
        fs::write(&path, text).map_err(|e| err(format!("write /etc/{name}"), e))
    };
    write(
        "passwd",
        "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )?;
    write("group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")?;
    write(
        "hosts",
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    write(
        "nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n",
    )?;
    for file in HOST_ETC {
        let host = Path::new(file);
        let Ok(contents) = fs::read(host) else {
            continue;
        };
        let inside = root.join(file.trim_start_matches('/'));
        if let Some(parent) = inside.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| err(format!("create {}", parent.display()), e))?;
        }
        let _ = fs::remove_file(&inside);
        fs::write(&inside, contents).map_err(|e| err(format!("write {file}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closure_holds_the_c_library_and_the_digest_is_stable() {
        let packages = closure().unwrap();
        assert!(packages.contains_key("libc6"), "{packages:?}");
        assert!(packages.contains_key("git"));
        assert_eq!(digest(&packages), digest(&packages));
    }
}
