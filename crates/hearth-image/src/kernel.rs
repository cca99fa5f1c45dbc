//! The kernel side of an image: its version (from the bzImage header), and
//! the modules the guest needs, found in a `lib/modules/<version>` tree,
//! decompressed, and ordered so that each comes after what it depends on.
//!
//! **Invariants:**
//! - dependencies come from each module's own `.modinfo` (`depends=`), so
//!   the order is right without `modules.dep` (Debian packages ship none;
//!   `depmod` makes it at install time);
//! - a module built into the kernel (`modules.builtin`) is skipped, never an
//!   error; a module that is neither built in nor found is an error naming
//!   it;
//! - modules are stored decompressed (`.ko.xz`, `.ko.zst`, `.ko.gz` are
//!   expanded with `xz`, `zstd`, or flate2), so the guest loads them with a
//!   plain `finit_module`.

use crate::{BakeError, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What a qemu microVM guest needs: the virtio-mmio transport, the network
/// card, the disk, the balloon (free page reporting: memory the guest
/// frees goes back to the host), and qemu's firmware configuration device
/// in sysfs (how the guest agent's secret arrives, never on a command
/// line); their dependencies follow.
pub const GUEST_MODULES: [&str; 5] = [
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "virtio_balloon",
    "qemu_fw_cfg",
];

/// The kernel release a bzImage announces (`6.1.0-56-cloud-amd64`), read
/// from its setup header (`HdrS`, `kernel_version` pointer at 0x20e).
pub fn bzimage_version(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let pointer = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]) as usize;
    let start = pointer + 0x200;
    let rest = image.get(start..)?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(rest.len().min(256));
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// The `depends=` of a module's `.modinfo`, found in the module's bytes.
pub fn modinfo_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(pos) = module[i..].windows(KEY.len()).position(|w| w == KEY) {
        let start = i + pos;
        i = start + KEY.len();
        // A .modinfo string starts after a NUL (or at the section start).
        if start > 0 && module[start - 1] != 0 {
            continue;
        }
        let end = module[i..]
            .iter()
            .position(|&b| b == 0)
            .map_or(module.len(), |e| i + e);
        let Ok(value) = std::str::from_utf8(&module[i..end]) else {
            continue;
        };
        found = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.replace('-', "_"))
            .collect();
        break;
    }
    found
}

/// A module ready for the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    /// Decompressed `.ko` bytes.
    pub bytes: Vec<u8>,
}

/// Orders `wanted` and their dependencies so that each module comes after
/// what it depends on. `depends(name)` gives a module's dependencies, or
/// `None` when it is built in (then it is left out). Deterministic: roots
/// in the given order, dependencies depth first in their listed order.
pub fn load_order(
    wanted: &[&str],
    mut depends: impl FnMut(&str) -> Result<Option<Vec<String>>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        depends: &mut dyn FnMut(&str) -> Result<Option<Vec<String>>>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_owned()) {
            return Err(BakeError::Invalid(format!(
                "modules depend on each other in a cycle through {name}"
            )));
        }
        if let Some(deps) = depends(name)? {
            for dep in deps {
                visit(&dep, depends, done, visiting, order)?;
            }
            order.push(name.to_owned());
        }
        visiting.remove(name);
        done.insert(name.to_owned());
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut visiting = BTreeSet::new();
    let mut order = Vec::new();
    for name in wanted {
        visit(name, &mut depends, &mut done, &mut visiting, &mut order)?;
    }
    Ok(order)
}

/// A `lib/modules/<version>` tree.
#[derive(Debug)]
pub struct ModuleTree {
    root: PathBuf,
    /// module name (`_` for `-`) → file
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl ModuleTree {
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(BakeError::Invalid(format!(
                "the modules folder {} does not exist",
                root.display()
            )));
        }
        let mut files = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let entries = fs::read_dir(&dir).map_err(|e| BakeError::io(&dir, e))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                if kind.is_dir() {
                    stack.push(path);
                } else if let Some(name) = module_name(&path) {
                    files.entry(name).or_insert(path);
                }
            }
        }
        let builtin = fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name(Path::new(l.trim())))
            .collect();
        Ok(ModuleTree {
            root: root.to_path_buf(),
            files,
            builtin,
        })
    }

    /// `wanted` and their dependencies in load order, decompressed.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<Module>> {
        let mut loaded: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let order = load_order(wanted, |name| {
            let Some(path) = self.files.get(name) else {
                if self.builtin.contains(name) {
                    return Ok(None);
                }
                return Err(BakeError::Invalid(format!(
                    "module {name} is neither built into the kernel nor under {}",
                    self.root.display()
                )));
            };
            let bytes = decompress(path)?;
            let deps = modinfo_depends(&bytes);
            loaded.insert(name.to_owned(), bytes);
            Ok(Some(deps))
        })?;
        Ok(order
            .into_iter()
            .map(|name| Module {
                bytes: loaded.remove(&name).unwrap_or_default(),
                name,
            })
            .collect())
    }
}

/// `virtio_net` for `.../virtio_net.ko[.xz|.zst|.gz]` (dashes as `_`).
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// A module's bytes, decompressed by its extension.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else {
        None
    };
    if let Some(tool) = tool {
        let out = Command::new(tool)
            .args(["-dc", "--"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                BakeError::Tool(format!(
                    "run {tool} to decompress {}: {e} (install xz-utils / zstd)",
                    path.display()
                ))
            })?;
        if !out.status.success() {
            return Err(crate::tool_error(
                &format!("{tool} -dc {}", path.display()),
                &out,
            ));
        }
        return Ok(out.stdout);
    }
    let raw = fs::read(path).map_err(|e| BakeError::io(path, e))?;
    if name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| BakeError::io(path, e))?;
        return Ok(out);
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_headers_give_the_release() {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let text = b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        image[0x300..0x300 + text.len()].copy_from_slice(text);
        assert_eq!(
            bzimage_version(&image).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(bzimage_version(&image[..0x100]), None);
        image[0x202] = b'X';
        assert_eq!(bzimage_version(&image), None);
    }

    #[test]
    fn modinfo_depends_is_read_from_nul_separated_strings() {
        let module = b"\x7fELF...\0license=GPL\0depends=virtio_ring,virtio\0name=virtio_net\0";
        assert_eq!(modinfo_depends(module), ["virtio_ring", "virtio"]);
        assert!(modinfo_depends(b"\0depends=\0name=failover\0").is_empty());
        // Not at the start of a string: not a modinfo entry.
        assert!(modinfo_depends(b"xdepends=a\0").is_empty());
    }

    #[test]
    fn load_order_puts_dependencies_first_and_skips_builtins() {
        let deps: BTreeMap<&str, Option<Vec<&str>>> = [
            ("virtio_ring", Some(vec![])),
            ("virtio", Some(vec!["virtio_ring"])),
            ("virtio_mmio", Some(vec!["virtio", "virtio_ring"])),
            ("failover", Some(vec![])),
            ("net_failover", Some(vec!["failover"])),
            (
                "virtio_net",
                Some(vec!["virtio_ring", "virtio", "net_failover"]),
            ),
            ("virtio_blk", Some(vec!["virtio", "virtio_ring"])),
            ("virtio_balloon", Some(vec!["virtio", "virtio_ring"])),
            ("qemu_fw_cfg", Some(vec![])),
            ("builtin_thing", None),
        ]
        .into_iter()
        .collect();
        let lookup = |name: &str| -> Result<Option<Vec<String>>> {
            match deps.get(name) {
                Some(d) => Ok(d
                    .as_ref()
                    .map(|d| d.iter().map(|s| s.to_string()).collect())),
                None => Err(BakeError::Invalid(format!("no {name}"))),
            }
        };
        let order = load_order(&GUEST_MODULES, lookup).unwrap();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_blk",
                "virtio_balloon",
                "qemu_fw_cfg"
            ]
        );
        assert!(load_order(&["builtin_thing"], lookup).unwrap().is_empty());
        assert!(load_order(&["missing"], lookup).is_err());
        let cyclic = |name: &str| -> Result<Option<Vec<String>>> {
            Ok(Some(vec![if name == "a" { "b" } else { "a" }.to_string()]))
        };
        assert!(load_order(&["a"], cyclic).is_err());
    }

    #[test]
    fn module_trees_resolve_compressed_and_builtin_modules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("kernel/drivers")).unwrap();
        fs::write(root.join("kernel/drivers/virtio.ko"), b"\0depends=\0").unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, b"\0depends=virtio\0").unwrap();
        fs::write(
            root.join("kernel/drivers/virtio-mmio.ko.gz"),
            gz.finish().unwrap(),
        )
        .unwrap();
        fs::write(
            root.join("modules.builtin"),
            "kernel/drivers/virtio_net.ko\n",
        )
        .unwrap();
        let tree = ModuleTree::open(root).unwrap();
        let modules = tree.resolve(&["virtio_mmio", "virtio_net"]).unwrap();
        let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["virtio", "virtio_mmio"]);
        assert_eq!(modules[1].bytes, b"\0depends=virtio\0");
        let err = tree.resolve(&["virtio_blk"]).unwrap_err().to_string();
        assert!(err.contains("virtio_blk"), "{err}");
    }
}
