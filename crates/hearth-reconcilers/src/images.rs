//! The server's image store: where baked and prebuilt images live, how a
//! VM's image is found from an image record (never from a path a tenant
//! wrote), the bake jobs that fill it, and the confinement of operators'
//! prebuilt images.
//!
//! Layout under the store's folder (`<data-dir>/images` by default):
//!
//! - `tenants/<tenant-id>/<image>/<bake>/` — what a bake job of the tenant's
//!   image wrote ([`hearth_image::bake`]: `vmlinuz`, `initrd.img`, maybe
//!   `disk.img`, `manifest.json`), one folder per bake, complete or absent;
//! - `prebuilt/<path>/` — folders an operator put there and registered
//!   (qemu: the same files; sandbox: a `rootfs/` folder);
//! - `cache/` — downloaded and unpacked bake inputs;
//! - any other name is free (the sandbox driver's base image lives there).
//!
//! **Invariants:**
//! - an [`ImageSpec`] is only ever made by [`ImageStoreConfig::resolve`],
//!   from the record's name, tenant and server-owned artifact, and every
//!   file it names has been checked to be a regular file (or, for a
//!   sandbox root, a folder) inside the store, reached through no
//!   symbolic link;
//! - two bakes of one image never run at once (the store's unique index;
//!   see [`hearth_store::Store::create_bake`]); at most
//!   [`MAX_CONCURRENT_BAKES`] bakes run on one server;
//! - a bake job always ends (`succeeded` or `failed`), or is failed at the
//!   next server start ([`hearth_store::Store::fail_active_bakes`]).

use crate::runner::Pool;
use hearth_core::ids::TenantId;
use hearth_core::resource::{Artifact, ArtifactSource, DriverKind, Image, Kind, Rootfs, Spec};
use hearth_drivers::ImageSpec;
use hearth_store::{BakeRecord, BakeState, BakeUpdate, Precondition, PutResource, Store};
use sha2::{Digest, Sha256};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Most bakes one server runs at once (others wait, `queued`).
pub const MAX_CONCURRENT_BAKES: usize = 2;
/// Most bytes of log a bake job keeps; later lines are dropped.
pub const MAX_BAKE_LOG: usize = 1024 * 1024;
/// Longest log line kept (longer ones are cut).
const MAX_LOG_LINE: usize = 4096;

/// Why only qemu images are baked.
pub const NOT_BAKED: &str = "only qemu images are baked: a sandbox image is registered prebuilt by an operator (hearth image register), and an environment naming no image gets the driver's default";

/// The folder for the tenants' baked images.
const TENANTS: &str = "tenants";
/// The folder operators put prebuilt images into.
pub const PREBUILT: &str = "prebuilt";

/// Where the server keeps images and what baking needs.
#[derive(Debug)]
pub struct ImageStoreConfig {
    /// The store's folder (absolute).
    pub dir: PathBuf,
    /// Bake inputs kept between bakes.
    pub cache_dir: PathBuf,
    /// The guest agent put into baked images as `/init`.
    pub agent_binary: Option<PathBuf>,
    slots: tokio::sync::Semaphore,
}

impl ImageStoreConfig {
    pub fn new(dir: PathBuf, cache_dir: PathBuf, agent_binary: Option<PathBuf>) -> Self {
        ImageStoreConfig {
            dir,
            cache_dir,
            agent_binary,
            slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_BAKES),
        }
    }

    /// Where a tenant's bakes go: `<dir>/tenants/<tenant>`.
    pub fn tenant_dir(&self, tenant: TenantId) -> PathBuf {
        self.dir.join(TENANTS).join(tenant.to_string())
    }

    /// Where operators put prebuilt images: `<dir>/prebuilt`.
    pub fn prebuilt_dir(&self) -> PathBuf {
        self.dir.join(PREBUILT)
    }

    /// What a VM of `image` (the tenant's image `name`) boots, checked
    /// against the store; the error says why it cannot boot.
    pub fn resolve(
        &self,
        tenant: TenantId,
        name: &str,
        image: &Image,
    ) -> Result<ImageSpec, String> {
        if image.driver == DriverKind::Fake {
            // Simulated VMs boot from nothing: a fake image is only a
            // version the pool compares.
            return Ok(ImageSpec::default());
        }
        let Some(artifact) = &image.artifact else {
            return Err(format!(
                "image {name:?} has nothing to boot yet: bake it (hearth image bake {name}) or have an operator register a prebuilt one"
            ));
        };
        let (root, relative) = match (artifact.source, artifact.bake, &artifact.prebuilt) {
            (ArtifactSource::Bake, Some(bake), _) => {
                (self.tenant_dir(tenant), format!("{name}/{bake}"))
            }
            (ArtifactSource::Prebuilt, _, Some(path)) => (self.prebuilt_dir(), path.clone()),
            _ => return Err(format!("image {name:?} has an unreadable artifact record")),
        };
        let mut spec = match confine(&root, &relative, image.driver) {
            Ok((_, spec)) => spec,
            // Not on this server's disk (another replica baked it): nodes
            // fetch the artifacts by digest, so the spec needs no path.
            Err(_) if !artifact.files.is_empty() && !root.join(&relative).exists() => {
                remote_spec(&artifact.files)
            }
            Err(e) => return Err(format!("image {name:?}: {e}")),
        };
        spec.digests = artifact.files.clone();
        Ok(spec)
    }
}

/// The spec of an image known only by its artifacts' digests. Each path
/// is a placeholder (`artifact:<digest>`, a relative path to nothing) that
/// the node replaces with its cached copy
/// (`hearth node`'s `materialize`), so a driver handed the spec without it
/// fails to find the file instead of booting something else (a sandbox
/// with no root would boot the host's).
pub fn remote_spec(files: &std::collections::BTreeMap<String, String>) -> ImageSpec {
    let placeholder = |role: &str| {
        files
            .get(role)
            .map(|digest| PathBuf::from(format!("artifact:{digest}")))
    };
    ImageSpec {
        root_dir: placeholder("root_dir"),
        kernel: placeholder("kernel"),
        initrd: placeholder("initrd"),
        disk: placeholder("disk"),
        digests: files.clone(),
    }
}

/// Checks that `relative` names a folder under `root` reached through no
/// symbolic link, holding the artifacts of a `driver` image (regular files,
/// no symbolic or hard links, all inside `root`); returns the folder and
/// the image spec.
pub fn confine(
    root: &Path,
    relative: &str,
    driver: DriverKind,
) -> Result<(PathBuf, ImageSpec), String> {
    let rel = Path::new(relative);
    if relative.is_empty() {
        return Err("the path is empty".into());
    }
    if rel.is_absolute() {
        return Err(format!(
            "{relative:?} is absolute: name a folder relative to the image store's {PREBUILT}/"
        ));
    }
    let mut normal = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => {
                let part = part.to_str().unwrap_or_default();
                let ok = !part.is_empty()
                    && !part.starts_with('.')
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                if !ok {
                    return Err(format!(
                        "{relative:?}: {part:?} is not a plain folder name (letters, digits, '.', '_', '-', not starting with '.')"
                    ));
                }
                normal.push(part.to_owned());
            }
            Component::ParentDir => {
                return Err(format!("{relative:?} climbs out with '..'"));
            }
            _ => return Err(format!("{relative:?} is not a plain relative path")),
        }
    }
    let root =
        fs::canonicalize(root).map_err(|e| format!("the image store {}: {e}", root.display()))?;
    let mut dir = root.clone();
    for part in &normal {
        dir.push(part);
        let meta = fs::symlink_metadata(&dir).map_err(|e| format!("{relative:?}: {e}"))?;
        if meta.file_type().is_symlink() {
            return Err(format!(
                "{relative:?}: {part:?} is a symbolic link; an image must lie inside the store"
            ));
        }
        if !meta.is_dir() {
            return Err(format!("{relative:?}: {part:?} is not a folder"));
        }
    }
    let spec = match driver {
        DriverKind::Sandbox => {
            let rootfs = inside(&root, &dir, "rootfs", true)?.ok_or_else(|| {
                format!("{relative:?} has no rootfs/ folder (a sandbox image's root)")
            })?;
            ImageSpec {
                root_dir: Some(rootfs),
                ..ImageSpec::default()
            }
        }
        DriverKind::Qemu => {
            let kernel = inside(&root, &dir, "vmlinuz", false)?
                .ok_or_else(|| format!("{relative:?} has no vmlinuz (a qemu image's kernel)"))?;
            let initrd = inside(&root, &dir, "initrd.img", false)?;
            let disk = inside(&root, &dir, "disk.img", false)?;
            if initrd.is_none() && disk.is_none() {
                return Err(format!("{relative:?} has neither initrd.img nor disk.img"));
            }
            ImageSpec {
                kernel: Some(kernel),
                initrd,
                disk,
                ..ImageSpec::default()
            }
        }
        DriverKind::Fake => ImageSpec::default(),
    };
    Ok((dir, spec))
}

/// `dir/name` if present: a regular file with one link (or with `folder`, a
/// folder), no symbolic link, resolving inside `root`.
fn inside(root: &Path, dir: &Path, name: &str, folder: bool) -> Result<Option<PathBuf>, String> {
    let path = dir.join(name);
    let meta = match fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{name}: {e}")),
    };
    if meta.file_type().is_symlink() {
        return Err(format!(
            "{name} is a symbolic link; an image's files must lie inside the store"
        ));
    }
    if folder {
        if !meta.is_dir() {
            return Err(format!("{name} is not a folder"));
        }
    } else {
        if !meta.is_file() {
            return Err(format!("{name} is not a regular file"));
        }
        if meta.nlink() > 1 {
            return Err(format!(
                "{name} has {} hard links; an image's files must be its own (a hard link can name any file of the file system)",
                meta.nlink()
            ));
        }
    }
    let real = fs::canonicalize(&path).map_err(|e| format!("{name}: {e}"))?;
    if !real.starts_with(root) {
        return Err(format!("{name} resolves outside the image store"));
    }
    Ok(Some(real))
}

/// sha256 over the image's files (name, size, sha256 of each; for a
/// sandbox root, every entry's path, type and size).
pub fn digest(spec: &ImageSpec) -> io::Result<String> {
    let mut hasher = Sha256::new();
    for (name, path) in [
        ("vmlinuz", &spec.kernel),
        ("initrd.img", &spec.initrd),
        ("disk.img", &spec.disk),
    ] {
        if let Some(path) = path {
            let mut file = fs::File::open(path)?;
            let mut inner = Sha256::new();
            let size = io::copy(&mut file, &mut inner)?;
            hasher.update(format!("{name} {size} {}\n", hex::encode(inner.finalize())));
        }
    }
    if let Some(root) = &spec.root_dir {
        walk(root, Path::new(""), &mut hasher)?;
    }
    Ok(hex::encode(hasher.finalize()))
}

fn walk(root: &Path, rel: &Path, hasher: &mut Sha256) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = rel.join(entry.file_name());
        let meta = entry.metadata()?;
        hasher.update(format!(
            "{} {:o} {}\n",
            path.display(),
            meta.mode(),
            meta.len()
        ));
        if meta.is_dir() {
            walk(root, &path, hasher)?;
        }
    }
    Ok(())
}

/// Now, as RFC 3339 (seconds, UTC).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Sets the image's artifact (a read-modify-write of its record, retried
/// when another write won); the version bump makes older VMs stale.
pub async fn set_artifact(
    store: &dyn Store,
    tenant: TenantId,
    name: &str,
    artifact: Artifact,
) -> Result<i64, String> {
    for _ in 0..5 {
        let record = store
            .get_resource(tenant, Kind::Image, name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("image {name:?} was deleted"))?;
        let mut image: Image = serde_json::from_value(record.spec.clone())
            .map_err(|e| format!("stored image {name:?} is unreadable: {e}"))?;
        image.artifact = Some(artifact.clone());
        image.version = None;
        let json = serde_json::to_value(&image).map_err(|e| e.to_string())?;
        let references = image.references();
        match store
            .put_resource(PutResource {
                actor: None,
                tenant,
                kind: Kind::Image,
                name,
                spec: &json,
                references: &references,
                precondition: Precondition::Version(record.version),
            })
            .await
        {
            Ok(outcome) => return Ok(outcome.record.version),
            Err(hearth_store::StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("image {name:?} kept changing; try again"))
}

impl Pool {
    /// Runs a bake job (already recorded `queued`) in the background.
    pub fn spawn_bake(self: &Arc<Self>, job: BakeRecord, image: Image) {
        let pool = self.clone();
        tokio::spawn(async move {
            let id = job.id.clone();
            let outcome = pool.run_bake(&job, &image).await;
            let store = pool.store();
            let (state, log, error, bake) = match outcome {
                Ok((bake, version)) => {
                    tracing::info!(tenant = %job.tenant_id, image = %job.image, bake, version, "image baked");
                    pool.wake_for(crate::pass::Wake::Task);
                    let log = format!(
                        "image {} is now bake {bake} (resource version {version})\n",
                        job.image
                    );
                    (BakeState::Succeeded, log, None, Some(bake as i64))
                }
                Err(e) => {
                    tracing::warn!(tenant = %job.tenant_id, image = %job.image, error = %e, "image bake failed");
                    (
                        BakeState::Failed,
                        format!("bake failed: {e}\n"),
                        Some(e),
                        None,
                    )
                }
            };
            let update = BakeUpdate {
                state,
                step: state.as_str(),
                append_log: &log,
                error: error.as_deref(),
                bake,
            };
            if let Err(e) = store.update_bake(&id, update).await {
                tracing::error!(bake = %id, error = %e, "cannot record the end of a bake");
            }
        });
    }

    async fn run_bake(&self, job: &BakeRecord, image: &Image) -> Result<(u64, i64), String> {
        let config = self
            .options()
            .images
            .clone()
            .ok_or("this server has no image store")?;
        let _slot = config.slots.acquire().await.map_err(|e| e.to_string())?;
        let store = self.store();
        let mut log = LogWriter::new(store.clone(), job.id.clone());
        log.line("started").await?;
        if image.driver != DriverKind::Qemu {
            return Err(NOT_BAKED.into());
        }
        let agent = config.agent_binary.clone().ok_or(
            "this server has no hearth-guest-agent binary to bake in (start it with --guest-agent)",
        )?;
        let mut options = hearth_image::BakeOptions::new(
            config.tenant_dir(job.tenant_id),
            job.image.clone(),
            agent,
            config.cache_dir.clone(),
        );
        options.rootfs = match image.rootfs {
            Rootfs::Minimal => hearth_image::RootfsKind::Minimal,
            Rootfs::Debian => hearth_image::RootfsKind::Debian,
        };
        options.kernel_package = image.kernel_package.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let baking = tokio::task::spawn_blocking(move || {
            hearth_image::bake(&options, |line| {
                let _ = tx.send(line.to_owned());
            })
        });
        while let Some(line) = rx.recv().await {
            log.line(&line).await?;
        }
        let baked = baking
            .await
            .map_err(|e| format!("the bake panicked: {e}"))?
            .map_err(|e| e.to_string())?;
        let tenant_dir = config.tenant_dir(job.tenant_id);
        let relative = format!("{}/{}", job.image, baked.version);
        let (_, spec) = confine(&tenant_dir, &relative, DriverKind::Qemu)?;
        let manifest = hearth_image::Manifest::read(&baked.dir).map_err(|e| e.to_string())?;
        let digest = hex::encode(Sha256::digest(
            serde_json::to_vec(&manifest.outputs).unwrap_or_default(),
        ));
        log.line(&format!("digest {digest}")).await?;
        // Into the store by digest, so every node can fetch the image.
        let outputs = crate::publish::manifest_digests(&baked.dir);
        let files =
            crate::publish::publish(store.as_ref(), &config, &spec, outputs.as_ref()).await?;
        log.line("artifacts stored for the fleet's nodes").await?;
        let version = set_artifact(
            store.as_ref(),
            job.tenant_id,
            &job.image,
            Artifact {
                source: ArtifactSource::Bake,
                bake: Some(baked.version),
                job: Some(job.id.clone()),
                prebuilt: None,
                digest,
                created_at: now_rfc3339(),
                files,
            },
        )
        .await?;
        Ok((baked.version, version))
    }
}

/// Appends a running job's progress lines to its log, bounded.
struct LogWriter {
    store: Arc<dyn Store>,
    id: String,
    written: usize,
}

impl LogWriter {
    fn new(store: Arc<dyn Store>, id: String) -> Self {
        LogWriter {
            store,
            id,
            written: 0,
        }
    }

    async fn line(&mut self, line: &str) -> Result<(), String> {
        let mut line: String = line.chars().take(MAX_LOG_LINE).collect();
        line.push('\n');
        let append = if self.written + line.len() <= MAX_BAKE_LOG {
            self.written += line.len();
            line.as_str()
        } else {
            ""
        };
        let step = line.trim_end();
        self.store
            .update_bake(
                &self.id,
                BakeUpdate {
                    state: BakeState::Running,
                    step,
                    append_log: append,
                    error: None,
                    bake: None,
                },
            )
            .await
            .map_err(|e| format!("the job's record: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn qemu_folder(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("vmlinuz"), b"k").unwrap();
        fs::write(dir.join("initrd.img"), b"i").unwrap();
    }

    #[test]
    fn prebuilt_folders_are_confined_to_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("prebuilt");
        qemu_folder(&root.join("ok/v1"));
        let (dir, spec) = confine(&root, "ok/v1", DriverKind::Qemu).unwrap();
        assert!(dir.ends_with("ok/v1") && spec.kernel.unwrap().ends_with("ok/v1/vmlinuz"));
        assert_eq!(spec.disk, None);

        // Outside the store.
        qemu_folder(&tmp.path().join("outside"));
        symlink(tmp.path().join("outside"), root.join("link")).unwrap();
        let refused = |rel: &str| confine(&root, rel, DriverKind::Qemu).unwrap_err();
        assert!(refused("/etc").contains("is absolute"));
        assert!(refused("../outside").contains("climbs out"));
        assert!(refused("ok/../../outside").contains("climbs out"));
        assert!(refused("link").contains("\"link\" is a symbolic link"));
        assert!(refused("").contains("empty"));
        assert!(refused("ok/.hidden").contains("not a plain folder name"));
        assert!(refused("missing").contains("No such file"));

        // Artifacts that point out.
        let bad = root.join("bad");
        fs::create_dir_all(&bad).unwrap();
        symlink("/etc/shadow", bad.join("vmlinuz")).unwrap();
        fs::write(bad.join("initrd.img"), b"i").unwrap();
        assert!(refused("bad").contains("vmlinuz is a symbolic link"));
        let hard = root.join("hard");
        qemu_folder(&hard);
        fs::hard_link(hard.join("initrd.img"), tmp.path().join("twin")).unwrap();
        assert!(refused("hard").contains("initrd.img has 2 hard links"));
        let empty = root.join("empty");
        fs::create_dir_all(&empty).unwrap();
        assert!(refused("empty").contains("has no vmlinuz"));
        fs::write(empty.join("vmlinuz"), b"k").unwrap();
        assert!(refused("empty").contains("neither initrd.img nor disk.img"));

        // A sandbox root is a folder, not a link to one.
        let sb = root.join("sb");
        fs::create_dir_all(&sb).unwrap();
        symlink("/", sb.join("rootfs")).unwrap();
        assert!(
            confine(&root, "sb", DriverKind::Sandbox)
                .unwrap_err()
                .contains("rootfs is a symbolic link")
        );
        fs::remove_file(sb.join("rootfs")).unwrap();
        fs::create_dir(sb.join("rootfs")).unwrap();
        let (_, spec) = confine(&root, "sb", DriverKind::Sandbox).unwrap();
        assert!(spec.root_dir.unwrap().ends_with("sb/rootfs"));
    }
}
