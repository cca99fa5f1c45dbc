//! What the driver test binaries share: the guest agent binary, built
//! once per test process, Cargo's target tmp folder and the sandbox base
//! image. Each binary uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Cargo's tmp folder for this package's tests (kept between runs).
pub fn target_tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// The agent binary: `$HEARTH_GUEST_AGENT`, else built (or found up to
/// date) once per test process.
pub fn agent_binary() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
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
                    m["reason"] == "compiler-artifact"
                        && m["target"]["name"] == "hearth-guest-agent"
                })
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .expect("cargo reported no hearth-guest-agent executable")
        })
        .clone()
}

/// The sandbox base image, built once (under a lock) in Cargo's target tmp
/// folder and shared by every test process.
pub fn base_image() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        hearth_image::base::ensure(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("images"))
            .expect("build the sandbox base image")
    })
    .clone()
}

/// Destroys every sandbox of `driver`, then removes its cgroup roots and
/// the test's folder `base`. From a thread with a runtime of its own, as
/// a `Drop` may run inside the test's runtime.
pub fn clean_up_sandboxes(driver: &hearth_drivers::sandbox::SandboxDriver, base: &Path) {
    use hearth_drivers::Driver;
    let driver = driver.clone();
    let base = base.to_owned();
    let cleanup = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for vm in driver.list().await.unwrap_or_default() {
                if let Err(e) = driver.destroy(vm.id).await {
                    eprintln!("cleanup: destroy {}: {e}", vm.id);
                }
            }
        });
        for root in driver.cgroup_roots() {
            let _ = std::fs::remove_dir(root);
        }
        let _ = std::fs::remove_dir_all(base);
    });
    let _ = cleanup.join();
}

/// Waits (up to 10 s) until the sandbox's guest agent answers.
pub async fn wait_healthy(
    driver: &hearth_drivers::sandbox::SandboxDriver,
    id: hearth_core::ids::VmId,
) {
    use hearth_drivers::Driver;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match driver.health(id).await {
            Ok(_) => return,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("VM {id} never became healthy: {e}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
        }
    }
}
