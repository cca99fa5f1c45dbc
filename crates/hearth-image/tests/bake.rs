//! A real bake: Debian's cloud kernel and busybox-static through apt (into a
//! cache under Cargo's target tmp folder, shared with the qemu driver's
//! tests, so reruns download nothing), the real agent binary, twice.
//!
//! **Requirements:** a Debian host with `apt-get update` done (or the cache
//! already filled), `dpkg`, `ldd`.

use hearth_image::{BakeOptions, BakedImage, Manifest, bake, cpio};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The agent binary, built (or found up to date) by cargo.
fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HEARTH_GUEST_AGENT").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let output = Command::new(env!("CARGO"))
        .args([
            "build",
            "-p",
            "hearth-guest-agent",
            "--bin",
            "hearth-guest-agent",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo to build hearth-guest-agent");
    assert!(
        output.status.success(),
        "cargo build -p hearth-guest-agent failed"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact" && m["target"]["name"] == "hearth-guest-agent"
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no hearth-guest-agent executable")
}

fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("hearth-image-cache")
}

fn members(image: &BakedImage) -> Vec<cpio::Parsed> {
    let gz = std::fs::read(&image.initrd).unwrap();
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut cpio)
        .unwrap();
    cpio::parse(&cpio).unwrap()
}

#[test]
fn bake_twice_reuses_the_cached_inputs_and_counts_versions_up() {
    let images = tempfile::tempdir().unwrap();
    let opts = BakeOptions::new(images.path(), "minimal", agent_binary(), cache_dir());

    let mut log = Vec::new();
    let first = bake(&opts, |m| log.push(m.to_owned())).expect("first bake");
    assert_eq!(first.version, 1);
    assert_eq!(first.dir, images.path().join("minimal/1"));
    assert!(first.kernel.is_file() && first.initrd.is_file() && first.disk.is_none());

    let mut log2 = Vec::new();
    let second = bake(&opts, |m| log2.push(m.to_owned())).expect("second bake");
    assert_eq!(second.version, 2);
    assert!(
        log2.iter()
            .all(|m| !m.contains("apt-get download") && !m.contains("unpacking")),
        "the second bake fetched again: {log2:?}"
    );
    assert!(log2.iter().any(|m| m.contains("cached")), "{log2:?}");

    let (m1, m2) = (
        Manifest::read(&first.dir).unwrap(),
        Manifest::read(&second.dir).unwrap(),
    );
    assert_eq!((m1.version, m2.version), (1, 2));
    assert_eq!(m1.inputs, m2.inputs);
    // Same inputs, same bytes.
    assert_eq!(m1.outputs, m2.outputs);
    assert!(
        m1.kernel_version.contains("cloud-amd64"),
        "{}",
        m1.kernel_version
    );
    assert_eq!(
        m1.modules,
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
    assert_eq!(
        m1.outputs["initrd.img"].size,
        std::fs::metadata(&first.initrd).unwrap().len()
    );
    for key in ["kernel", "busybox", "agent", "module:virtio_net"] {
        assert!(
            m1.inputs.contains_key(key),
            "{key} missing from {:?}",
            m1.inputs.keys()
        );
    }
    assert!(
        m1.inputs["kernel"]
            .source
            .starts_with("debian:linux-image-")
    );

    let members = members(&first);
    let find = |p: &str| {
        members
            .iter()
            .find(|m| m.path == p)
            .unwrap_or_else(|| panic!("{p} missing from the initramfs"))
    };
    assert_eq!(find("init").data, b"/sbin/hearth-guest-agent");
    assert_eq!(find("bin/sh").data, b"/bin/busybox");
    find("lib64/ld-linux-x86-64.so.2");
    find("lib/modules/virtio_net.ko");
    let order = String::from_utf8(find("etc/hearth/modules").data.clone()).unwrap();
    assert!(
        order.contains("/lib/modules/virtio_ring.ko\n/lib/modules/virtio.ko\n"),
        "{order}"
    );

    assert_eq!(
        BakedImage::latest(images.path(), "minimal").unwrap(),
        Some(second)
    );

    // A kernel of one's own (here: the first image's), with no modules: its
    // release comes from the bzImage header.
    let mut own = opts.clone();
    own.name = "own-kernel".into();
    own.kernel = Some(first.kernel.clone());
    let third = bake(&own, |_| {}).expect("bake with --kernel");
    let m3 = Manifest::read(&third.dir).unwrap();
    assert_eq!(third.version, 1);
    assert_eq!(m3.kernel_version, m1.kernel_version);
    assert!(m3.inputs["kernel"].source.starts_with("file:"));
    assert_eq!(m3.inputs["kernel"].sha256, m1.inputs["kernel"].sha256);
    assert!(m3.modules.is_empty());
}
