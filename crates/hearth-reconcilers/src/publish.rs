//! Publishing an image's artifacts into the store, content-addressed, so
//! that every node fetches them by digest from any replica
//! (`GET /v1/fleet/artifacts/{digest}`) and nothing relies on a path
//! shared between machines.
//!
//! An image is published once, when it gets an artifact (a bake succeeds,
//! an operator registers a prebuilt folder), or once for images that got
//! theirs before nodes fetched them ([`publish_missing`]). Each file is
//! one artifact (`kernel`, `initrd`, `disk`); a sandbox root folder is one
//! deterministic tar ([`write_tar`]: entries sorted by name, mtimes zero,
//! modes and owners as found), so the same folder always has the same
//! digest. The digests go into the image's record
//! ([`hearth_core::resource::Artifact::files`]), which every replica reads.
//!
//! **Invariants:**
//! - a digest is recorded on an image only after the store holds that
//!   artifact whole (the store checks the bytes hash to it);
//! - a file's digest comes from the bake manifest when there is one, and
//!   is checked all the same as the bytes are stored.

use crate::images::{ImageStoreConfig, confine, set_artifact};
use hearth_core::ids::TenantId;
use hearth_core::resource::{ArtifactSource, Image, Kind};
use hearth_drivers::ImageSpec;
use hearth_store::Store;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The roles of an image's artifacts, as [`ImageSpec::digests`] names them.
pub const ROLES: [&str; 4] = ["kernel", "initrd", "disk", "root_dir"];

/// The bake manifest's name of a file role.
fn manifest_name(role: &str) -> Option<&'static str> {
    match role {
        "kernel" => Some("vmlinuz"),
        "initrd" => Some("initrd.img"),
        "disk" => Some("disk.img"),
        _ => None,
    }
}

/// The path a spec gives a role.
pub fn path_of<'a>(spec: &'a ImageSpec, role: &str) -> Option<&'a PathBuf> {
    match role {
        "kernel" => spec.kernel.as_ref(),
        "initrd" => spec.initrd.as_ref(),
        "disk" => spec.disk.as_ref(),
        "root_dir" => spec.root_dir.as_ref(),
        _ => None,
    }
}

/// Puts every artifact of `spec` (paths checked by [`confine`]) into the
/// store and answers their digests by role. `manifest`: a bake's output
/// digests (`vmlinuz`, … → sha256), used instead of hashing the files
/// again. A sandbox root is tarred into `<image store>/artifacts/` first
/// (removed once stored).
pub async fn publish(
    store: &dyn Store,
    config: &ImageStoreConfig,
    spec: &ImageSpec,
    manifest: Option<&BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, String> {
    let mut files = BTreeMap::new();
    for role in ROLES {
        let Some(path) = path_of(spec, role) else {
            continue;
        };
        let (file, digest, temporary) = if role == "root_dir" {
            let work = config.dir.join("artifacts");
            let root = path.clone();
            let (tar, digest) = tokio::task::spawn_blocking(move || write_tar(&root, &work))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("tarring {}: {e}", path.display()))?;
            (tar, digest, true)
        } else {
            let known = manifest
                .and_then(|m| manifest_name(role).and_then(|name| m.get(name)))
                .cloned();
            let digest = match known {
                Some(digest) => digest,
                None => {
                    let file = path.clone();
                    tokio::task::spawn_blocking(move || hash_file(&file))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| format!("reading {}: {e}", path.display()))?
                }
            };
            (path.clone(), digest, false)
        };
        let stored = async {
            let mut reader = tokio::fs::File::open(&file)
                .await
                .map_err(|e| format!("reading {}: {e}", file.display()))?;
            store
                .put_artifact(&digest, &mut reader)
                .await
                .map_err(|e| format!("storing the {role} artifact: {e}"))
        }
        .await;
        if temporary {
            let _ = fs::remove_file(&file);
        }
        stored?;
        files.insert(role.to_owned(), digest);
    }
    Ok(files)
}

/// Publishes the artifacts of every image that has one but no digests yet
/// (published before nodes fetched images), from this server's image store,
/// and records the digests. Images whose folder this server does not hold
/// are left for the server that does. Returns how many it published.
pub async fn publish_missing(store: &dyn Store, config: &ImageStoreConfig) -> usize {
    let mut published = 0;
    let tenants = match store.list_tenants().await {
        Ok(tenants) => tenants,
        Err(e) => {
            tracing::warn!(error = %e, "publishing images: cannot list tenants");
            return 0;
        }
    };
    for tenant in tenants {
        let Ok(records) = store.list_resources(tenant.id, Kind::Image).await else {
            continue;
        };
        for record in records {
            let Ok(image) = serde_json::from_value::<Image>(record.spec) else {
                continue;
            };
            let Some(artifact) = image.artifact.clone() else {
                continue;
            };
            if !artifact.files.is_empty() {
                continue;
            }
            match publish_one(store, config, tenant.id, &record.name, &image).await {
                Ok(true) => published += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(tenant = %tenant.id, image = %record.name, error = %e, "cannot publish an image's artifacts")
                }
            }
        }
    }
    published
}

async fn publish_one(
    store: &dyn Store,
    config: &ImageStoreConfig,
    tenant: TenantId,
    name: &str,
    image: &Image,
) -> Result<bool, String> {
    let Some(artifact) = &image.artifact else {
        return Ok(false);
    };
    let (root, relative) = match (artifact.source, artifact.bake, &artifact.prebuilt) {
        (ArtifactSource::Bake, Some(bake), _) => {
            (config.tenant_dir(tenant), format!("{name}/{bake}"))
        }
        (ArtifactSource::Prebuilt, _, Some(path)) => (config.prebuilt_dir(), path.clone()),
        _ => return Ok(false),
    };
    let Ok((dir, spec)) = confine(&root, &relative, image.driver) else {
        return Ok(false);
    };
    let manifest = manifest_digests(&dir);
    let files = publish(store, config, &spec, manifest.as_ref()).await?;
    let mut artifact = artifact.clone();
    artifact.files = files;
    set_artifact(store, tenant, name, artifact).await?;
    tracing::info!(tenant = %tenant, image = %name, "image artifacts published");
    Ok(true)
}

/// A bake folder's output digests (`vmlinuz`, … → sha256), if it has a
/// readable manifest.
pub fn manifest_digests(dir: &Path) -> Option<BTreeMap<String, String>> {
    let manifest = hearth_image::Manifest::read(dir).ok()?;
    Some(
        manifest
            .outputs
            .into_iter()
            .map(|(name, digest)| (name, digest.sha256))
            .collect(),
    )
}

/// SHA-256 (hex) of a file's bytes.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Writes into a file and hashes what it wrote.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Tars the folder `root` deterministically into a new file under `work`
/// (created if needed): entries sorted by name, every mtime zero, modes,
/// owners, link targets and device numbers as found; a hard-linked file is
/// stored as a copy. Returns the file and the SHA-256 of its bytes.
pub fn write_tar(root: &Path, work: &Path) -> io::Result<(PathBuf, String)> {
    fs::create_dir_all(work)?;
    let path = work.join(format!("tar-{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let file = fs::File::create(&path)?;
        let mut builder = tar::Builder::new(Hashing {
            inner: io::BufWriter::new(file),
            hasher: Sha256::new(),
        });
        builder.follow_symlinks(false);
        append_dir(&mut builder, root, Path::new(""))?;
        let mut out = builder.into_inner()?;
        out.flush()?;
        out.inner
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        Ok::<_, io::Error>(hex::encode(out.hasher.finalize()))
    })();
    match written {
        Ok(digest) => Ok((path, digest)),
        Err(e) => {
            let _ = fs::remove_file(&path);
            Err(e)
        }
    }
}

fn append_dir<W: Write>(builder: &mut tar::Builder<W>, root: &Path, rel: &Path) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let rel = rel.join(entry.file_name());
        let full = root.join(&rel);
        let meta = fs::symlink_metadata(&full)?;
        let kind = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(u64::from(meta.uid()));
        header.set_gid(u64::from(meta.gid()));
        header.set_mtime(0);
        header.set_size(0);
        use std::os::unix::fs::FileTypeExt;
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            builder.append_data(&mut header, &rel, io::empty())?;
            append_dir(builder, root, &rel)?;
        } else if kind.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(&full)?;
            builder.append_link(&mut header, &rel, target)?;
        } else if kind.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            builder.append_data(&mut header, &rel, fs::File::open(&full)?)?;
        } else if kind.is_char_device() || kind.is_block_device() || kind.is_fifo() {
            header.set_entry_type(if kind.is_char_device() {
                tar::EntryType::Char
            } else if kind.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            });
            let dev = meta.rdev();
            let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
            let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
            header.set_device_major(major as u32)?;
            header.set_device_minor(minor as u32)?;
            builder.append_data(&mut header, &rel, io::empty())?;
        }
        // Sockets are not part of an image: a running process made them.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_folder_tars_to_the_same_digest_whenever_it_is_tarred() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        fs::create_dir_all(root.join("etc/b")).unwrap();
        fs::write(root.join("etc/hostname"), b"sandbox\n").unwrap();
        fs::write(root.join("etc/b/z"), b"z").unwrap();
        fs::write(root.join("a"), b"a").unwrap();
        symlink("/etc/hostname", root.join("link")).unwrap();
        let work = tmp.path().join("work");
        let (first, digest) = write_tar(&root, &work).unwrap();
        assert_eq!(hash_file(&first).unwrap(), digest);

        // Times change, the digest does not.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(root.join("a"), b"a").unwrap();
        let (second, again) = write_tar(&root, &work).unwrap();
        assert_eq!(again, digest);

        // What it holds, in name order, with zero mtimes.
        let mut archive = tar::Archive::new(fs::File::open(&second).unwrap());
        let entries: Vec<(String, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().mtime().unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["a", "etc", "etc/b", "etc/b/z", "etc/hostname", "link"]
        );
        assert!(entries.iter().all(|(_, mtime)| *mtime == 0));

        // A change of content is another digest.
        fs::write(root.join("etc/b/z"), b"y").unwrap();
        let (_, changed) = write_tar(&root, &work).unwrap();
        assert_ne!(changed, digest);
    }
}
