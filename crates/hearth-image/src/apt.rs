//! Debian packages as bake inputs: resolved with `apt-cache show`, fetched
//! with `apt-get download`, unpacked with `dpkg -x`, all into a cache folder.
//!
//! | path under the cache          | what                                       |
//! |-------------------------------|--------------------------------------------|
//! | `resolved/<name>.json`        | the last resolution of a package name (used when apt cannot answer, e.g. offline) |
//! | `debs/<name>_<version>.deb`   | the downloaded package, checked against the index's SHA256 |
//! | `unpacked/<name>_<version>/`  | `dpkg -x` of it                            |
//!
//! **Invariants:** a cached entry is keyed by package name and version and
//! is only ever created by a rename of a complete temporary folder or file,
//! so an interrupted bake leaves no half entry and a second bake reuses the
//! first's download and unpacking; a downloaded `.deb` whose SHA256 differs
//! from the index's is rejected.

use crate::{BakeError, Result, sha256_file, tool_error};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A package as `apt-cache show` describes its candidate version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    /// The `.deb`'s SHA256 according to the index.
    pub sha256: Option<String>,
    /// The first alternative of each `Depends` entry, without versions.
    pub depends: Vec<String>,
}

impl Package {
    /// `<name>_<version>` with `:` (epochs) made safe for file names.
    pub fn key(&self) -> String {
        format!("{}_{}", self.name, self.version).replace(':', "%3a")
    }
}

/// Parses the first stanza of `apt-cache show --no-all-versions` output.
pub fn parse_show(text: &str) -> Option<Package> {
    let stanza = text.split("\n\n").next()?;
    let field = |name: &str| {
        stanza.lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        })
    };
    let depends = field("Depends")
        .map(|deps| {
            deps.split(',')
                .filter_map(|dep| {
                    let first = dep.split('|').next()?.trim();
                    let name = first.split([' ', '(']).next()?.trim();
                    (!name.is_empty()).then(|| name.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Package {
        name: field("Package")?,
        version: field("Version")?,
        sha256: field("SHA256"),
        depends,
    })
}

/// The packages of one cache folder.
#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
}

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: dir.into() }
    }

    /// The candidate version of `name`, from apt (recorded), or from the
    /// last recorded answer when apt cannot tell.
    pub fn resolve(&self, name: &str) -> Result<Package> {
        let record = self.dir.join("resolved").join(format!("{name}.json"));
        let asked = Command::new("apt-cache")
            .args(["show", "--no-all-versions", name])
            .stdin(Stdio::null())
            .output();
        let answer = match asked {
            Ok(out) if out.status.success() => parse_show(&String::from_utf8_lossy(&out.stdout))
                .ok_or_else(|| format!("apt-cache show {name}: no package in the answer")),
            Ok(out) => Err(format!(
                "apt-cache show {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("run apt-cache: {e}")),
        };
        match answer {
            Ok(package) => {
                let json = serde_json::to_vec_pretty(&package).expect("a package serializes");
                crate::write_atomic(&record, &json)?;
                Ok(package)
            }
            Err(reason) => match fs::read(&record) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| BakeError::Invalid(format!("{}: {e}", record.display()))),
                Err(_) => Err(BakeError::Tool(format!(
                    "{reason} (run `apt-get update` first?)"
                ))),
            },
        }
    }

    /// The unpacked tree of `package`, downloading and unpacking it unless
    /// the cache has it. `progress` hears what happens.
    pub fn unpacked(&self, package: &Package, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        let key = package.key();
        let unpacked = self.dir.join("unpacked").join(&key);
        if unpacked.is_dir() {
            progress(&format!("{key}: cached"));
            return Ok(unpacked);
        }
        let deb = self.deb(package, progress)?;
        progress(&format!("{key}: unpacking"));
        let parent = self.dir.join("unpacked");
        fs::create_dir_all(&parent).map_err(|e| BakeError::io(&parent, e))?;
        let temp = crate::temp_path(&parent, &key);
        let status = Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(&temp)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| BakeError::Tool(format!("run dpkg: {e}")))?;
        if !status.status.success() {
            let _ = fs::remove_dir_all(&temp);
            return Err(tool_error("dpkg -x", &status));
        }
        if let Err(e) = fs::rename(&temp, &unpacked) {
            let _ = fs::remove_dir_all(&temp);
            if !unpacked.is_dir() {
                return Err(BakeError::io(&unpacked, e));
            }
            // Another bake unpacked it meanwhile.
        }
        Ok(unpacked)
    }

    /// The `.deb` of `package`, downloaded unless cached with the right
    /// checksum.
    pub fn deb(&self, package: &Package, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        let key = package.key();
        let debs = self.dir.join("debs");
        fs::create_dir_all(&debs).map_err(|e| BakeError::io(&debs, e))?;
        let deb = debs.join(format!("{key}.deb"));
        if deb.is_file() {
            let sum = sha256_file(&deb)?;
            if package.sha256.as_deref().is_none_or(|want| want == sum) {
                return Ok(deb);
            }
            progress(&format!(
                "{key}: cached .deb has the wrong checksum, fetching again"
            ));
        }
        progress(&format!("{key}: apt-get download"));
        let temp = crate::temp_path(&debs, &key);
        fs::create_dir_all(&temp).map_err(|e| BakeError::io(&temp, e))?;
        let result = (|| {
            let out = Command::new("apt-get")
                .args(["download", "-q"])
                .arg(format!("{}={}", package.name, package.version))
                .current_dir(&temp)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| BakeError::Tool(format!("run apt-get: {e}")))?;
            if !out.status.success() {
                return Err(tool_error("apt-get download", &out));
            }
            let downloaded = find_deb(&temp)?;
            let sum = sha256_file(&downloaded)?;
            if let Some(want) = &package.sha256
                && *want != sum
            {
                return Err(BakeError::Invalid(format!(
                    "{key}: downloaded sha256 {sum}, the index says {want}"
                )));
            }
            fs::rename(&downloaded, &deb).map_err(|e| BakeError::io(&deb, e))
        })();
        let _ = fs::remove_dir_all(&temp);
        result.map(|()| deb)
    }
}

fn find_deb(dir: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(dir).map_err(|e| BakeError::io(dir, e))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            BakeError::Tool(format!(
                "apt-get download left no .deb in {}",
                dir.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_cache_show_output_is_parsed() {
        let text = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\n\
            Version: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2), a | b, c\n\
            Description: Linux for x86-64 cloud (meta-package)\nSHA256: 00be21c0\n\n\
            Package: other\nVersion: 1\n";
        let package = parse_show(text).unwrap();
        assert_eq!(
            package,
            Package {
                name: "linux-image-cloud-amd64".into(),
                version: "6.1.192-2".into(),
                sha256: Some("00be21c0".into()),
                depends: vec![
                    "linux-image-6.1.0-56-cloud-amd64".into(),
                    "a".into(),
                    "c".into()
                ],
            }
        );
        let busybox = Package {
            name: "busybox-static".into(),
            version: "1:1.35.0-4".into(),
            sha256: None,
            depends: vec![],
        };
        assert_eq!(busybox.key(), "busybox-static_1%3a1.35.0-4");
        assert_eq!(parse_show("Version: 1\n"), None);
    }
}
