//! `hearth image bake`: builds the images the qemu driver boots — a kernel,
//! an initramfs whose `/init` is the guest agent (`vm-init` mode), and for
//! some root filesystem kinds a disk — into a versioned folder with a
//! manifest.
//!
//! Output: `<images_dir>/<name>/<version>/{vmlinuz, initrd.img,
//! manifest.json}` (+ `disk.img` for the `debian` kind, see [`debian`]),
//! `version` being the next integer after the existing ones (1 for the
//! first).
//!
//! Inputs:
//! - the kernel: [`BakeOptions::kernel`] (a bzImage, with its modules from
//!   [`BakeOptions::modules_dir`] when the kernel needs any), or Debian's
//!   [`DEFAULT_KERNEL_PACKAGE`] resolved to its versioned
//!   `linux-image-<release>` package, fetched and unpacked through the
//!   [`apt::Cache`];
//! - busybox: [`BakeOptions::busybox`], or the `busybox-static` package;
//! - the agent binary and the shared libraries `ldd` says it needs.
//!
//! Modules: [`kernel::GUEST_MODULES`] and their dependencies, decompressed,
//! in load order (see [`kernel`]).
//!
//! **Invariants:**
//! - a version folder appears complete or not at all: it is built under a
//!   temporary name and renamed into place; a rename that loses a race with
//!   a concurrent bake moves on to the next version;
//! - inputs are cached by package name and version (checked against the
//!   apt index's SHA256), so a second bake downloads and unpacks nothing;
//! - the initramfs is a pure function of its inputs (see [`cpio`]); the
//!   manifest records the sha256 and size of every input and output.

pub mod apt;
pub mod base;
pub mod cpio;
pub mod debian;
pub mod initramfs;
pub mod kernel;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// The Debian package whose kernel images get by default.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// The Debian package busybox comes from by default.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// The manifest's file name in a version folder.
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error("{0}")]
    Invalid(String),
    /// An external tool (apt-get, dpkg, ldd, …) failed or is missing.
    #[error("{0}")]
    Tool(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl BakeError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        BakeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = BakeError> = std::result::Result<T, E>;

pub(crate) fn tool_error(what: &str, out: &Output) -> BakeError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .trim()
        .chars()
        .rev()
        .take(600)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    BakeError::Tool(format!("{what}: {} {tail}", out.status))
}

/// What the image's root filesystem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RootfsKind {
    /// Everything in the initramfs: busybox, the agent, the modules.
    #[default]
    Minimal,
    /// A Debian root (debootstrap minbase + git, build-essential, …) on a
    /// raw ext4 disk, booted through the minimal initramfs.
    Debian,
}

impl fmt::Display for RootfsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RootfsKind::Minimal => "minimal",
            RootfsKind::Debian => "debian",
        })
    }
}

impl std::str::FromStr for RootfsKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "minimal" => Ok(RootfsKind::Minimal),
            "debian" => Ok(RootfsKind::Debian),
            other => Err(format!("unknown rootfs kind {other:?} (minimal, debian)")),
        }
    }
}

/// What to bake.
#[derive(Debug, Clone)]
pub struct BakeOptions {
    /// Where images live: `<images_dir>/<name>/<version>/`.
    pub images_dir: PathBuf,
    /// The image's name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    pub rootfs: RootfsKind,
    /// A kernel image (bzImage) instead of Debian's.
    pub kernel: Option<PathBuf>,
    /// With `kernel`: its `lib/modules/<release>` folder; `None` = the
    /// kernel has what it needs built in.
    pub modules_dir: Option<PathBuf>,
    /// The Debian package to take the kernel from when `kernel` is `None`.
    pub kernel_package: String,
    /// A static busybox instead of the `busybox-static` package's.
    pub busybox: Option<PathBuf>,
    /// The `hearth-guest-agent` binary to put in as `/init`.
    pub agent_binary: PathBuf,
    /// Where downloaded and unpacked inputs are kept between bakes.
    pub cache_dir: PathBuf,
    /// `debian`: the release, mirror and packages (besides minbase).
    pub debian_suite: String,
    pub debian_mirror: String,
    pub debian_packages: Vec<String>,
    /// `debian`: free space on the disk, in MiB (the file is sparse).
    pub disk_free_mib: u64,
}

impl BakeOptions {
    /// A minimal image with Debian's cloud kernel and busybox.
    pub fn new(
        images_dir: impl Into<PathBuf>,
        name: impl Into<String>,
        agent_binary: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
    ) -> Self {
        BakeOptions {
            images_dir: images_dir.into(),
            name: name.into(),
            rootfs: RootfsKind::Minimal,
            kernel: None,
            modules_dir: None,
            kernel_package: DEFAULT_KERNEL_PACKAGE.into(),
            busybox: None,
            agent_binary: agent_binary.into(),
            cache_dir: cache_dir.into(),
            debian_suite: debian::DEFAULT_SUITE.into(),
            debian_mirror: debian::DEFAULT_MIRROR.into(),
            debian_packages: debian::DEFAULT_PACKAGES.map(String::from).to_vec(),
            disk_free_mib: 2048,
        }
    }
}

/// A baked image, as the qemu driver needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BakedImage {
    pub name: String,
    pub version: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: Option<PathBuf>,
    /// The version folder.
    pub dir: PathBuf,
}

impl BakedImage {
    /// The image in a version folder, from its manifest.
    pub fn load(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let disk = manifest
            .outputs
            .contains_key("disk.img")
            .then(|| dir.join("disk.img"));
        Ok(BakedImage {
            name: manifest.name,
            version: manifest.version,
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            disk,
            dir: dir.to_path_buf(),
        })
    }

    /// The newest version of `name` under `images_dir`, if any.
    pub fn latest(images_dir: &Path, name: &str) -> Result<Option<Self>> {
        let dir = images_dir.join(name);
        let versions = versions(&dir).map_err(|e| BakeError::io(&dir, e))?;
        match versions.last() {
            Some(v) => Self::load(&dir.join(v.to_string())).map(Some),
            None => Ok(None),
        }
    }
}

/// Size and sha256 of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
}

impl FileDigest {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        FileDigest {
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
        }
    }
}

/// One input of a bake: where it came from and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// `debian:<package>=<version>`, or `file:<path>`.
    pub source: String,
    pub sha256: String,
}

/// `manifest.json` of a version folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: u64,
    pub rootfs: RootfsKind,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The kernel's release (`uname -r` in the guest).
    pub kernel_version: String,
    /// The modules in `/etc/hearth/modules`, in load order.
    pub modules: Vec<String>,
    /// `kernel`, `busybox`, `agent`, `lib:<path>`, `module:<name>` (,
    /// `rootfs`: the debootstrap recipe, its sha256 abbreviated) → input.
    pub inputs: BTreeMap<String, Input>,
    /// `vmlinuz`, `initrd.img` (, `disk.img`) → digest.
    pub outputs: BTreeMap<String, FileDigest>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let bytes = fs::read(&path).map_err(|e| BakeError::io(&path, e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| BakeError::Invalid(format!("{}: {e}", path.display())))
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        json.push(b'\n');
        json
    }
}

/// The numeric version folders of an image folder, ascending (missing
/// folder = none).
pub fn versions(image_dir: &Path) -> io::Result<Vec<u64>> {
    let entries = match fs::read_dir(image_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut versions: Vec<u64> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// The version the next bake of an image gets: one more than the highest.
pub fn next_version(image_dir: &Path) -> io::Result<u64> {
    Ok(versions(image_dir)?.last().map_or(1, |v| v + 1))
}

/// Whether `name` is a valid image name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(|e| BakeError::io(path, e))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(|e| BakeError::io(path, e))?;
    Ok(hex::encode(hasher.finalize()))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary path in `dir` (same file system, for renames).
pub(crate) fn temp_path(dir: &Path, stem: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!(
        ".tmp-{stem}-{}-{nanos}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| BakeError::io(dir, e))?;
    let temp = temp_path(dir, "write");
    let result = fs::write(&temp, bytes).and_then(|()| fs::rename(&temp, path));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(|e| BakeError::io(path, e))
}

/// The kernel chosen for a bake.
struct KernelInput {
    image: PathBuf,
    release: String,
    modules_dir: Option<PathBuf>,
    source: String,
}

fn kernel_input(
    opts: &BakeOptions,
    cache: &apt::Cache,
    progress: &mut dyn FnMut(&str),
) -> Result<KernelInput> {
    if let Some(image) = &opts.kernel {
        let bytes = fs::read(image).map_err(|e| BakeError::io(image, e))?;
        let release = kernel::bzimage_version(&bytes).unwrap_or_else(|| "unknown".into());
        let source = format!("file:{}", image.display());
        return Ok(KernelInput {
            image: image.clone(),
            release,
            modules_dir: opts.modules_dir.clone(),
            source,
        });
    }
    // The meta-package depends on the versioned image package.
    let mut package = cache.resolve(&opts.kernel_package)?;
    for _ in 0..3 {
        let Some(next) = package
            .depends
            .iter()
            .find(|d| d.starts_with("linux-image-") && **d != package.name)
        else {
            break;
        };
        progress(&format!("kernel: {} → {next}", package.name));
        package = cache.resolve(next)?;
    }
    let unpacked = cache.unpacked(&package, progress)?;
    let boot = unpacked.join("boot");
    let image = fs::read_dir(&boot)
        .map_err(|e| BakeError::io(&boot, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| BakeError::Invalid(format!("{} has no boot/vmlinuz-*", package.name)))?;
    let release = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let modules = unpacked.join("lib/modules").join(&release);
    Ok(KernelInput {
        image,
        modules_dir: modules.is_dir().then_some(modules),
        release,
        source: format!("debian:{}={}", package.name, package.version),
    })
}

fn busybox_input(
    opts: &BakeOptions,
    cache: &apt::Cache,
    progress: &mut dyn FnMut(&str),
) -> Result<(PathBuf, String)> {
    if let Some(path) = &opts.busybox {
        return Ok((path.clone(), format!("file:{}", path.display())));
    }
    let package = cache.resolve(BUSYBOX_PACKAGE)?;
    let unpacked = cache.unpacked(&package, progress)?;
    let path = unpacked.join("bin/busybox");
    if !path.is_file() {
        return Err(BakeError::Invalid(format!(
            "{} has no bin/busybox",
            package.name
        )));
    }
    Ok((path, format!("debian:{}={}", package.name, package.version)))
}

/// Bakes an image; `progress` hears each step. See the module docs.
pub fn bake(opts: &BakeOptions, mut progress: impl FnMut(&str)) -> Result<BakedImage> {
    let progress: &mut dyn FnMut(&str) = &mut progress;
    if !valid_name(&opts.name) {
        return Err(BakeError::Invalid(format!(
            "invalid image name {:?}: use letters, digits, '.', '_' and '-'",
            opts.name
        )));
    }
    if opts.rootfs == RootfsKind::Debian && opts.debian_packages.iter().any(|p| p.contains(',')) {
        return Err(BakeError::Invalid(
            "a Debian package name holds a comma".into(),
        ));
    }
    let agent = fs::read(&opts.agent_binary).map_err(|e| BakeError::io(&opts.agent_binary, e))?;
    let cache = apt::Cache::new(&opts.cache_dir);
    fs::create_dir_all(&opts.cache_dir).map_err(|e| BakeError::io(&opts.cache_dir, e))?;
    let mut inputs = BTreeMap::new();

    let kernel = kernel_input(opts, &cache, progress)?;
    progress(&format!("kernel {} ({})", kernel.release, kernel.source));
    let kernel_bytes = fs::read(&kernel.image).map_err(|e| BakeError::io(&kernel.image, e))?;
    inputs.insert(
        "kernel".into(),
        Input {
            source: kernel.source.clone(),
            sha256: FileDigest::of_bytes(&kernel_bytes).sha256,
        },
    );
    let modules = match &kernel.modules_dir {
        Some(dir) => kernel::ModuleTree::open(dir)?.resolve(&kernel::GUEST_MODULES)?,
        None => Vec::new(),
    };
    progress(&format!(
        "modules: {}",
        modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    for module in &modules {
        inputs.insert(
            format!("module:{}", module.name),
            Input {
                source: kernel.source.clone(),
                sha256: FileDigest::of_bytes(&module.bytes).sha256,
            },
        );
    }

    let (busybox_path, busybox_source) = busybox_input(opts, &cache, progress)?;
    let busybox = fs::read(&busybox_path).map_err(|e| BakeError::io(&busybox_path, e))?;
    let applets = initramfs::busybox_applets(&busybox_path)?;
    inputs.insert(
        "busybox".into(),
        Input {
            source: busybox_source,
            sha256: FileDigest::of_bytes(&busybox).sha256,
        },
    );
    inputs.insert(
        "agent".into(),
        Input {
            source: format!("file:{}", opts.agent_binary.display()),
            sha256: FileDigest::of_bytes(&agent).sha256,
        },
    );
    let libraries = initramfs::read_libraries(&initramfs::shared_libraries(&opts.agent_binary)?)?;
    for (path, bytes) in &libraries {
        inputs.insert(
            format!("lib:{}", path.display()),
            Input {
                source: format!("file:{}", path.display()),
                sha256: FileDigest::of_bytes(bytes).sha256,
            },
        );
    }

    progress("writing the initramfs");
    let archive = initramfs::build(&initramfs::Contents {
        agent: &agent,
        libraries,
        busybox: &busybox,
        applets: &applets,
        modules: &modules,
        root_device: (opts.rootfs == RootfsKind::Debian).then_some(debian::ROOT_DEVICE),
    });
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    archive
        .write_to(&mut gz)
        .and_then(|()| gz.flush())
        .map_err(|e| BakeError::io(Path::new("initrd.img"), e))?;
    let initrd = gz
        .finish()
        .map_err(|e| BakeError::io(Path::new("initrd.img"), e))?;

    let image_dir = opts.images_dir.join(&opts.name);
    fs::create_dir_all(&image_dir).map_err(|e| BakeError::io(&image_dir, e))?;
    let staging = temp_path(&image_dir, "bake");
    fs::create_dir(&staging).map_err(|e| BakeError::io(&staging, e))?;
    let result = (|| {
        fs::write(staging.join("vmlinuz"), &kernel_bytes)
            .map_err(|e| BakeError::io(&staging, e))?;
        fs::write(staging.join("initrd.img"), &initrd).map_err(|e| BakeError::io(&staging, e))?;
        let mut disk_digest = None;
        if opts.rootfs == RootfsKind::Debian {
            let tree = debian::tree(
                &opts.cache_dir,
                &opts.debian_suite,
                &opts.debian_mirror,
                &opts.debian_packages,
                progress,
            )?;
            let disk = staging.join("disk.img");
            debian::make_disk(
                &tree,
                &opts.agent_binary,
                &staging,
                &disk,
                opts.disk_free_mib,
                progress,
            )?;
            let size = fs::metadata(&disk)
                .map_err(|e| BakeError::io(&disk, e))?
                .len();
            disk_digest = Some(FileDigest {
                size,
                sha256: sha256_file(&disk)?,
            });
            let key = debian::tree_key(
                &opts.debian_suite,
                &opts.debian_mirror,
                &opts.debian_packages,
            );
            inputs.insert(
                "rootfs".into(),
                Input {
                    source: format!(
                        "debootstrap:{} {} +{}",
                        opts.debian_suite,
                        opts.debian_mirror,
                        opts.debian_packages.join(",")
                    ),
                    sha256: key.rsplit('-').next().unwrap_or_default().to_owned(),
                },
            );
        }
        let mut manifest = Manifest {
            name: opts.name.clone(),
            version: 0,
            rootfs: opts.rootfs,
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            kernel_version: kernel.release.clone(),
            modules: modules.iter().map(|m| m.name.clone()).collect(),
            inputs,
            outputs: [
                ("vmlinuz".to_string(), FileDigest::of_bytes(&kernel_bytes)),
                ("initrd.img".to_string(), FileDigest::of_bytes(&initrd)),
            ]
            .into_iter()
            .chain(disk_digest.map(|d| ("disk.img".to_string(), d)))
            .collect(),
        };
        // Claim the next version by renaming into place; a concurrent bake
        // that took it makes the rename fail: try the one after.
        for _ in 0..100 {
            manifest.version =
                next_version(&image_dir).map_err(|e| BakeError::io(&image_dir, e))?;
            fs::write(staging.join(MANIFEST), manifest.to_json())
                .map_err(|e| BakeError::io(&staging, e))?;
            let target = image_dir.join(manifest.version.to_string());
            match fs::rename(&staging, &target) {
                Ok(()) => {
                    progress(&format!("baked {}/{}", opts.name, manifest.version));
                    return BakedImage::load(&target);
                }
                Err(_) if target.exists() => continue,
                Err(e) => return Err(BakeError::io(&target, e)),
            }
        }
        Err(BakeError::Invalid(
            "could not claim a version folder".into(),
        ))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_the_highest_numeric_folder() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        assert_eq!(next_version(&image).unwrap(), 1);
        for v in ["1", "2", "10", "latest", ".tmp-bake-1"] {
            fs::create_dir_all(image.join(v)).unwrap();
        }
        assert_eq!(versions(&image).unwrap(), [1, 2, 10]);
        assert_eq!(next_version(&image).unwrap(), 11);
    }

    #[test]
    fn names_are_checked() {
        for ok in ["minimal", "web-2.1", "a_b"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "sp ace"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!("debian".parse::<RootfsKind>().unwrap(), RootfsKind::Debian);
        assert!("alpine".parse::<RootfsKind>().is_err());
    }

    #[test]
    fn manifests_round_trip_and_load_as_images() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Manifest {
            name: "img".into(),
            version: 3,
            rootfs: RootfsKind::Minimal,
            created_at: "2025-01-01T00:00:00Z".into(),
            kernel_version: "6.1.0-56-cloud-amd64".into(),
            modules: vec!["virtio_ring".into()],
            inputs: [(
                "kernel".to_string(),
                Input {
                    source: "debian:linux-image-6.1.0-56-cloud-amd64=6.1.192-2".into(),
                    sha256: "ab".into(),
                },
            )]
            .into_iter()
            .collect(),
            outputs: [("vmlinuz".to_string(), FileDigest::of_bytes(b"abc"))]
                .into_iter()
                .collect(),
        };
        let json = String::from_utf8(manifest.to_json()).unwrap();
        assert!(json.contains("\"rootfs\": \"minimal\""), "{json}");
        assert!(json.contains("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
        fs::write(dir.path().join(MANIFEST), &json).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), manifest);
        let image = BakedImage::load(dir.path()).unwrap();
        assert_eq!(
            (image.name.as_str(), image.version, image.disk),
            ("img", 3, None)
        );
        assert_eq!(image.initrd, dir.path().join("initrd.img"));
    }

    #[test]
    fn bad_options_fail_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = BakeOptions::new(dir.path(), "bad/name", "/nonexistent", dir.path());
        assert!(matches!(bake(&opts, |_| {}), Err(BakeError::Invalid(_))));
        opts.name = "ok".into();
        opts.rootfs = RootfsKind::Debian;
        opts.debian_packages = vec!["git,curl".into()];
        assert!(matches!(bake(&opts, |_| {}), Err(BakeError::Invalid(_))));
        opts.debian_packages = vec!["git".into()];
        // The agent binary does not exist.
        assert!(matches!(bake(&opts, |_| {}), Err(BakeError::Io { .. })));
        assert!(!dir.path().join("ok").exists());
    }
}
