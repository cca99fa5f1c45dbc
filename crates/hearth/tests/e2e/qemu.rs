//! Real microVMs through the pool: a `debian` image baked by the server
//! through the API (git and build tools inside; the minimal busybox image
//! has no git), the qemu driver,
//! the whole provisioning pipeline inside a VM (a git repository cloned from
//! the host over git://10.0.2.2), an agent on a warm VM, a `kill -9` of the
//! server with adoption, and no qemu process left behind.

use crate::common::{Backend, GitServer, Server, through_gateway, wait_until};
use serde_json::json;
use std::path::Path;

// One backend: what is tested here is the driver and the image, and a
// debian bake takes minutes; the store's part is the same as with sandboxes.
#[test]
fn sqlite_qemu_vms_run_the_pipeline_serve_agents_and_survive_kill_9() {
    qemu_vms_run_the_pipeline_serve_agents_and_survive_kill_9(Backend::Sqlite)
}

#[test]
fn sqlite_a_cli_bake_registered_prebuilt_by_an_operator_boots() {
    a_cli_bake_registered_prebuilt_by_an_operator_boots(Backend::Sqlite)
}

/// The bake inputs, shared by the tests of this target (downloaded once).
fn image_cache() -> String {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("hearth-image-cache")
        .display()
        .to_string()
}

/// `hearth image bake` follows the server's job to its end; an operator
/// copies the result under `prebuilt/`, registers it as another image, and
/// a microVM boots from it.
fn a_cli_bake_registered_prebuilt_by_an_operator_boots(b: Backend) {
    let cache = image_cache();
    let s = Server::start_with(b, &["--resync", "200ms", "--image-cache-dir", &cache]);
    let out = s.cli(
        &s.admin_token,
        &["image", "bake", "mini", "--rootfs", "minimal"],
        "",
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.starts_with("image/mini baked: bake 1 (job "),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("writing the initramfs"),
        "the log was followed: {out:?}"
    );
    // A bake that fails ends the CLI with 1 and the reason.
    let out = s.cli(
        &s.admin_token,
        &[
            "image",
            "bake",
            "nokernel",
            "--kernel-package",
            "hearth-no-such-package",
        ],
        "",
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("image/nokernel: bake "), "{out:?}");

    let images = s.data_dir.path().join("images");
    let tenant = std::fs::read_dir(images.join("tenants"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let copy = images.join("prebuilt/mini-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["vmlinuz", "initrd.img", "manifest.json"] {
        std::fs::copy(tenant.join("mini/1").join(file), copy.join(file)).unwrap();
    }
    let out = s.cli(
        &s.admin_token,
        &["image", "register", "pre", "mini-copy"],
        "",
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "image/pre registered: prebuilt mini-copy, version 2\n"
    );
    let dev = s.identity("dev", "developer");
    let out = s.cli(&dev, &["image", "register", "pre", "mini-copy"], "");
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("image.register"), "{out:?}");

    s.pool(
        2,
        "driver: qemu\nimage: pre\nmemory: 256Mi\n",
        "web",
        "min_idle: 1\n",
    );
    assert!(
        wait_until(240, || s.status()["vms"]["idle"] == 1),
        "no warm microVM from the prebuilt image: {}\n{}",
        s.status(),
        s.logs_tail()
    );
    let a = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(a.body["phase"], "running", "{}", a.text);
    let id = a.body["id"].as_str().unwrap().to_owned();
    let e = s.admin().post(
        &format!("/v1/agents/{id}/exec"),
        json!({"command": "echo booted; ls /etc/hearth"}),
    );
    assert_eq!(e.body["exit_code"], 0, "{}", e.text);
    assert!(
        e.body["stdout"].as_str().unwrap().starts_with("booted\n"),
        "{}",
        e.text
    );
    let out = s.cli(&s.admin_token, &["pool", "flush", "--nuke"], "");
    assert_eq!(out.code, 0, "{out:?}");
    let qemu_dir = s.data_dir.path().join("qemu");
    assert!(
        wait_until(60, || qemu_processes(&qemu_dir) == 0),
        "qemu processes left behind"
    );
}

/// Live qemu processes whose arguments mention `dir`.
fn qemu_processes(dir: &Path) -> usize {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let path = e.path();
            let alive =
                std::fs::read_to_string(path.join("stat")).is_ok_and(|s| !s.contains(") Z "));
            alive
                && std::fs::read(path.join("cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && c.contains(&needle)
                })
        })
        .count()
}

fn qemu_vms_run_the_pipeline_serve_agents_and_survive_kill_9(b: Backend) {
    let git = GitServer::start();
    let app = git.repo("app", &[("README", "hello from the host\n")]);
    // VMs reach the git daemon on the host's loopback through the VM
    // network's gateway, its port allowed (never at 10.0.2.2).
    let (app_in_vm, git_port) = through_gateway(&app);
    let cache = image_cache();
    let mut s = Server::start_with(
        b,
        &[
            "--resync",
            "200ms",
            "--boot-timeout",
            "3m",
            "--image-cache-dir",
            &cache,
        ],
    );
    // The bake runs on the server, as an API job; a second bake of the
    // same image while it runs is refused.
    let api = s.admin();
    let r = api.put_yaml("/v1/images/qvm", "driver: qemu\nrootfs: debian\n");
    assert_eq!(r.status, 201, "{}", r.text);
    let job = api.post("/v1/images/qvm/bakes", json!({}));
    assert_eq!(job.status, 202, "{}", job.text);
    let id = job.body["id"].as_str().unwrap().to_owned();
    api.post("/v1/images/qvm/bakes", json!({})).assert_error(
        409,
        "FAILED_PRECONDITION",
        "a bake of image \"qvm\" is queued or running already",
    );
    let mut last = serde_json::Value::Null;
    let ended = wait_until(1800, || {
        last = api.get(&format!("/v1/images/qvm/bakes/{id}")).body;
        matches!(last["state"].as_str(), Some("succeeded" | "failed"))
    });
    assert!(ended && last["state"] == "succeeded", "{last:#}");
    assert!(
        last["log"].as_str().unwrap().contains("baked qvm/1"),
        "{last:#}"
    );
    let image = s.admin().get("/v1/images/qvm");
    assert_eq!(
        (
            image.body["spec"]["artifact"]["bake"].as_i64(),
            image.body["version"].as_i64()
        ),
        (Some(1), Some(2)),
        "{}",
        image.text
    );

    s.pool(
        4,
        &format!("driver: qemu\nimage: qvm\nmemory: 512Mi\nallow_host_ports: [{git_port}]\nenv:\n  API_KEY: k3y-never-shown\n"),
        "web",
        &format!(
            "min_idle: 1\nmax_idle: 1\nrepos:\n- url: {app_in_vm}\nwarm_pool:\n  setup_commands:\n  - name: build\n    command: cp /home/app/README /home/built.txt\n"
        ),
    );
    assert!(
        wait_until(240, || s.status()["vms"]["idle"] == 1),
        "no warm microVM: {}\n{}",
        s.status(),
        s.logs_tail()
    );
    let runs = s
        .admin()
        .get("/v1/instances?workspace=web&status=ready")
        .body;
    let steps = runs["items"][0]["steps"].as_array().unwrap().clone();
    assert!(
        steps.iter().all(|st| st["status"] == "succeeded"),
        "{steps:?}"
    );
    let qemu_dir = s.data_dir.path().join("qemu");
    assert_eq!(qemu_processes(&qemu_dir), 1);

    // An agent on the warm microVM sees the clone, the env file and the setup.
    let a = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(a.body["phase"], "running", "{}", a.text);
    let id = a.body["id"].as_str().unwrap().to_owned();
    let exec = |s: &Server, command: &str| {
        s.admin().post(
            &format!("/v1/agents/{id}/exec"),
            json!({"command": command}),
        )
    };
    let e = exec(
        &s,
        "cat /home/built.txt; stat -c %a /home/.env; cat /proc/1/cmdline | head -c 40 | tr '\\0' ' '",
    );
    assert_eq!(e.body["exit_code"], 0, "{}", e.text);
    let stdout = e.body["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("hello from the host\n600\n"), "{stdout}");
    assert!(!s.logs().contains("k3y-never-shown"));

    // kill -9 of the server: the VMs live on and are adopted.
    assert!(
        wait_until(240, || s.status()["vms"]["idle"] == 1),
        "backfill: {}",
        s.status()
    );
    let before = qemu_processes(&qemu_dir);
    assert_eq!(before, 2);
    s.kill();
    s.launch();
    assert!(
        s.logs()
            .contains("reconciled the drivers' VMs with the store")
    );
    let e = exec(&s, "echo still here");
    assert_eq!(
        e.body["stdout"], "still here\n",
        "the agent's VM was adopted: {}",
        e.text
    );
    assert_eq!(
        qemu_processes(&qemu_dir),
        before,
        "no VM lost, none doubled"
    );

    // The agent ends: its VM goes back, and with the pool at max_idle it is
    // destroyed, qemu process included.
    s.admin().post(
        &format!("/v1/agents/{id}/finish"),
        json!({"status": "completed"}),
    );
    assert!(
        wait_until(120, || qemu_processes(&qemu_dir) == 1
            && s.status()["vms"]["total"] == 1),
        "the returned microVM was not destroyed: {}",
        s.status()
    );

    // Nothing outlives its record.
    let out = s.cli(&s.admin_token, &["pool", "flush", "--nuke"], "");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        wait_until(60, || qemu_processes(&qemu_dir) == 0),
        "qemu processes left behind"
    );
    let leftover: Vec<_> = std::fs::read_dir(&qemu_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftover.is_empty(), "{leftover:?}");
}
