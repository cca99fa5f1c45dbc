//! A node's copy of the artifacts its VMs boot: fetched from the control
//! plane by digest (`GET /v1/fleet/artifacts/{digest}`, any replica),
//! checked, and cached under the node's data dir, so nothing relies on a
//! path shared between machines.
//!
//! Cache layout: `<cache>/<digest>` is an artifact whose bytes hash to its
//! name (written to a temporary file, hashed while written, renamed into
//! place only when it matched); `<cache>/<digest>.d/` is a sandbox root
//! unpacked from the tar `<digest>` (unpacked into a temporary folder and
//! renamed, so a half-unpacked root is never used).
//!
//! **Invariants:**
//! - a file under its digest's name in the cache always hashes to it;
//! - an unpacked root holds only what its tar names inside it: no entry
//!   with `..` or an absolute path, no hard link to outside;
//! - concurrent boots of one image download each artifact once (a lock per
//!   cache and digest).

use hearth_drivers::{DriverError, ImageSpec};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use tokio::io::AsyncWriteExt;

/// The header a node names itself with next to its credential.
const NODE_HEADER: &str = "x-hearth-node";

/// One lock per cached artifact, so that a download happens once.
static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Default::default);

fn lock_for(path: &Path) -> Arc<tokio::sync::Mutex<()>> {
    LOCKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(path.to_owned())
        .or_default()
        .clone()
}

/// `image` with every artifact it names by digest replaced by the node's
/// cached copy, fetched first when missing: from the first of `servers`
/// (base URLs) that serves it, authenticated as node `node_id` with
/// `credential`. A download that does not hash to its digest is deleted
/// and refused (`DriverError::Boot` naming the digest).
pub async fn materialize(
    http: &reqwest::Client,
    servers: &[String],
    credential: &str,
    node_id: &str,
    cache: &Path,
    image: &ImageSpec,
) -> Result<ImageSpec, DriverError> {
    let mut spec = image.clone();
    for (role, digest) in &image.digests {
        if !hearth_store::is_artifact_digest(digest) {
            return Err(DriverError::Boot(format!(
                "the image's {role} digest {digest:?} is not a SHA-256"
            )));
        }
        let file = fetch(http, servers, credential, node_id, cache, digest).await?;
        let path = if role == "root_dir" {
            unpacked(cache, digest, &file).await?
        } else {
            file
        };
        match role.as_str() {
            "kernel" => spec.kernel = Some(path),
            "initrd" => spec.initrd = Some(path),
            "disk" => spec.disk = Some(path),
            "root_dir" => spec.root_dir = Some(path),
            other => {
                return Err(DriverError::Boot(format!(
                    "the image names an artifact of unknown role {other:?}"
                )));
            }
        }
    }
    Ok(spec)
}

/// `<cache>/<digest>`, downloaded first when absent.
async fn fetch(
    http: &reqwest::Client,
    servers: &[String],
    credential: &str,
    node_id: &str,
    cache: &Path,
    digest: &str,
) -> Result<PathBuf, DriverError> {
    let target = cache.join(digest);
    let lock = lock_for(&target);
    let _held = lock.lock().await;
    if tokio::fs::try_exists(&target).await? {
        return Ok(target);
    }
    tokio::fs::create_dir_all(cache).await?;
    let mut failures = Vec::new();
    for server in servers {
        let url = format!(
            "{}/v1/fleet/artifacts/{digest}",
            server.trim_end_matches('/')
        );
        match download(http, &url, credential, node_id, cache, digest).await {
            Ok(temp) => {
                tokio::fs::rename(&temp, &target).await?;
                return Ok(target);
            }
            Err(Download::Mismatch(actual)) => {
                return Err(DriverError::Boot(format!(
                    "artifact {digest} from {server} hashes to {actual}: refused"
                )));
            }
            Err(Download::Failed(why)) => failures.push(format!("{server}: {why}")),
        }
    }
    Err(DriverError::Boot(format!(
        "cannot fetch artifact {digest}: {}",
        if failures.is_empty() {
            "no server to fetch it from".to_owned()
        } else {
            failures.join("; ")
        }
    )))
}

enum Download {
    /// The bytes hash to this, not to the digest asked for.
    Mismatch(String),
    /// This server did not serve it (try the next).
    Failed(String),
}

/// Streams the artifact at `url` into a temporary file in `cache`, hashing
/// as it writes; answers the file only when the bytes hash to `digest`
/// (else it is deleted).
async fn download(
    http: &reqwest::Client,
    url: &str,
    credential: &str,
    node_id: &str,
    cache: &Path,
    digest: &str,
) -> Result<PathBuf, Download> {
    let failed = |e: &dyn std::fmt::Display| Download::Failed(e.to_string());
    let mut response = http
        .get(url)
        .bearer_auth(credential)
        .header(NODE_HEADER, node_id)
        .send()
        .await
        .map_err(|e| failed(&e))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(Download::Failed(format!("{status}: {}", body.trim())));
    }
    let temp = cache.join(format!(".{digest}.{}.part", uuid::Uuid::new_v4().simple()));
    let written = async {
        let mut file = tokio::fs::File::create(&temp)
            .await
            .map_err(|e| failed(&e))?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| failed(&e))? {
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| failed(&e))?;
        }
        file.sync_all().await.map_err(|e| failed(&e))?;
        let actual = hex::encode(hasher.finalize());
        if actual != digest {
            return Err(Download::Mismatch(actual));
        }
        Ok(())
    }
    .await;
    match written {
        Ok(()) => Ok(temp),
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            Err(e)
        }
    }
}

/// `<cache>/<digest>.d/`, the root unpacked from the tar `file` first when
/// absent.
async fn unpacked(cache: &Path, digest: &str, file: &Path) -> Result<PathBuf, DriverError> {
    let target = cache.join(format!("{digest}.d"));
    let lock = lock_for(&target);
    let _held = lock.lock().await;
    if tokio::fs::try_exists(&target).await? {
        return Ok(target);
    }
    let temp = cache.join(format!(
        ".{digest}.{}.d.part",
        uuid::Uuid::new_v4().simple()
    ));
    let (tar, into, digest_owned) = (file.to_owned(), temp.clone(), digest.to_owned());
    let outcome = tokio::task::spawn_blocking(move || unpack(&tar, &into))
        .await
        .map_err(|e| DriverError::Boot(format!("unpacking artifact {digest_owned}: {e}")))?;
    match outcome {
        Ok(()) => {
            tokio::fs::rename(&temp, &target).await?;
            Ok(target)
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&temp).await;
            Err(DriverError::Boot(format!(
                "unpacking artifact {digest}: {e}"
            )))
        }
    }
}

/// Unpacks the tar `file` into the new folder `into`, refusing any entry
/// that would land outside it.
pub fn unpack(file: &Path, into: &Path) -> Result<(), String> {
    std::fs::create_dir_all(into).map_err(|e| e.to_string())?;
    let tar = std::fs::File::open(file).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(false);
    // Owners as recorded only where the node may set them (as root).
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_overwrite(false);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        confined(&path).map_err(|why| format!("entry {}: {why}", path.display()))?;
        if entry.header().entry_type().is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("entry {}: a hard link to nothing", path.display()))?;
            confined(&target).map_err(|why| {
                format!(
                    "entry {}: hard link to {}: {why}",
                    path.display(),
                    target.display()
                )
            })?;
        }
        // `unpack_in` refuses, too, any entry whose parent folder resolves
        // outside `into` (through a symbolic link unpacked before it).
        let inside = entry.unpack_in(into).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!("entry {}: {e}{cause}", path.display())
        })?;
        if !inside {
            return Err(format!(
                "entry {}: it lands outside the root",
                path.display()
            ));
        }
    }
    Ok(())
}

/// A tar path is plain and relative: no `..`, no root, no prefix.
fn confined(path: &Path) -> Result<(), &'static str> {
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("it climbs out with '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("it is an absolute path"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A control plane's artifact route in miniature: serves `files` by
    /// digest to the node credential `secret` only, counting requests;
    /// `lie` flips a byte of everything it serves.
    #[derive(Clone)]
    struct Served {
        files: Arc<HashMap<String, Vec<u8>>>,
        requests: Arc<AtomicUsize>,
        lie: bool,
    }

    async fn serve_artifact(
        State(served): State<Served>,
        UrlPath(digest): UrlPath<String>,
        headers: HeaderMap,
    ) -> Result<Vec<u8>, StatusCode> {
        served.requests.fetch_add(1, Ordering::SeqCst);
        let authorized = headers.get("authorization").and_then(|h| h.to_str().ok())
            == Some("Bearer secret")
            && headers.get(NODE_HEADER).and_then(|h| h.to_str().ok()) == Some("node-1");
        if !authorized {
            return Err(StatusCode::UNAUTHORIZED);
        }
        let mut bytes = served
            .files
            .get(&digest)
            .cloned()
            .ok_or(StatusCode::NOT_FOUND)?;
        if served.lie {
            bytes[0] ^= 1;
        }
        Ok(bytes)
    }

    /// Starts the server; answers its base URL and request count.
    async fn start(files: &[&[u8]], lie: bool) -> (String, Arc<AtomicUsize>) {
        let served = Served {
            files: Arc::new(files.iter().map(|f| (sha(f), f.to_vec())).collect()),
            requests: Arc::default(),
            lie,
        };
        let requests = served.requests.clone();
        let app = axum::Router::new()
            .route(
                "/v1/fleet/artifacts/{digest}",
                axum::routing::get(serve_artifact),
            )
            .with_state(served);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{address}"), requests)
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn spec(roles: &[(&str, &[u8])]) -> ImageSpec {
        ImageSpec {
            digests: roles
                .iter()
                .map(|(role, bytes)| (role.to_string(), sha(bytes)))
                .collect::<BTreeMap<_, _>>(),
            ..ImageSpec::default()
        }
    }

    #[tokio::test]
    async fn artifacts_are_fetched_once_checked_and_then_cached() {
        let (kernel, initrd) = (b"a kernel".as_slice(), vec![7u8; 300_000]);
        let (url, requests) = start(&[kernel, &initrd], false).await;
        let cache = tempfile::tempdir().unwrap();
        let image = spec(&[("kernel", kernel), ("initrd", &initrd)]);
        let http = reqwest::Client::new();
        // The first server does not answer; the second does.
        let servers = ["http://127.0.0.1:9".to_owned(), url];

        // Two boots of the image at once download each artifact once.
        let (a, b) = tokio::join!(
            materialize(&http, &servers, "secret", "node-1", cache.path(), &image),
            materialize(&http, &servers, "secret", "node-1", cache.path(), &image),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        assert_eq!(a.kernel, b.kernel);
        assert_eq!(
            a.kernel.as_deref(),
            Some(cache.path().join(sha(kernel)).as_path())
        );
        assert_eq!(std::fs::read(a.kernel.unwrap()).unwrap(), kernel);
        assert_eq!(std::fs::read(a.initrd.unwrap()).unwrap(), initrd);
        assert_eq!((a.disk, a.root_dir), (None, None));

        // A later boot uses the cache without a request.
        materialize(&http, &servers, "secret", "node-1", cache.path(), &image)
            .await
            .unwrap();
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_tampered_download_is_refused_and_not_kept() {
        let kernel = b"a kernel".as_slice();
        let (url, requests) = start(&[kernel], true).await;
        let cache = tempfile::tempdir().unwrap();
        let image = spec(&[("kernel", kernel)]);
        let e = materialize(
            &reqwest::Client::new(),
            &[url],
            "secret",
            "node-1",
            cache.path(),
            &image,
        )
        .await
        .unwrap_err();
        let mut tampered = kernel.to_vec();
        tampered[0] ^= 1;
        assert!(
            e.to_string()
                .contains(&format!("artifact {} from http://127.0.0.1:", sha(kernel)))
                && e.to_string()
                    .ends_with(&format!("hashes to {}: refused", sha(&tampered))),
            "{e}"
        );
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        // Nothing is left in the cache, not even the partial file.
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_wrong_credential_gets_nothing() {
        let kernel = b"a kernel".as_slice();
        let (url, _) = start(&[kernel], false).await;
        let cache = tempfile::tempdir().unwrap();
        let e = materialize(
            &reqwest::Client::new(),
            &[url],
            "guess",
            "node-1",
            cache.path(),
            &spec(&[("kernel", kernel)]),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("401 Unauthorized"), "{e}");
        assert!(!cache.path().join(sha(kernel)).exists());
    }

    /// A tar of `entries` (path, bytes), with paths written raw so that a
    /// hostile one (`../x`) can be made.
    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, bytes) in entries {
            let mut header = tar::Header::new_old();
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            builder.append(&header, *bytes).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[tokio::test]
    async fn a_root_is_unpacked_inside_the_cache_only() {
        let good = tar_of(&[("etc/hostname", b"sandbox\n")]);
        let climbing = tar_of(&[("ok", b"1"), ("../escaped", b"2")]);
        let absolute = tar_of(&[("/tmp/hearth-absolute-entry", b"3")]);
        let (url, requests) = start(&[&good, &climbing, &absolute], false).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let http = reqwest::Client::new();
        let servers = [url];

        let root = materialize(
            &http,
            &servers,
            "secret",
            "node-1",
            &cache,
            &spec(&[("root_dir", &good)]),
        )
        .await
        .unwrap()
        .root_dir
        .unwrap();
        assert_eq!(root, cache.join(format!("{}.d", sha(&good))));
        assert_eq!(
            std::fs::read(root.join("etc/hostname")).unwrap(),
            b"sandbox\n"
        );
        materialize(
            &http,
            &servers,
            "secret",
            "node-1",
            &cache,
            &spec(&[("root_dir", &good)]),
        )
        .await
        .unwrap();
        assert_eq!(requests.load(Ordering::SeqCst), 1);

        for (bad, why) in [
            (&climbing, "climbs out with '..'"),
            (&absolute, "is an absolute path"),
        ] {
            let e = materialize(
                &http,
                &servers,
                "secret",
                "node-1",
                &cache,
                &spec(&[("root_dir", bad)]),
            )
            .await
            .unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
            assert!(!cache.join(format!("{}.d", sha(bad))).exists());
        }
        assert!(!dir.path().join("escaped").exists());
        assert!(!Path::new("/tmp/hearth-absolute-entry").exists());
        // No half-unpacked folder is left behind.
        let leftovers = std::fs::read_dir(&cache)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".part")
            })
            .count();
        assert_eq!(leftovers, 0);
    }
}
