//! Tenant admin → host: images are named, never host paths; bakes run on
//! the server; prebuilt images are an operator's, confined under the
//! image store. Each attack beside the legitimate path it must not break.

use crate::both_backends;
use crate::common::{Api, Backend, Server, wait_until};
use serde_json::{Value, json};
use std::os::unix::fs::symlink;

both_backends!(
    tenant_admins_cannot_name_host_files,
    operators_register_prebuilt_images_confined_to_the_store,
);

/// A second tenant and its admin's API client (role admin, not operator).
fn tenant_admin(s: &Server, name: &str) -> Api {
    let r = s
        .admin()
        .post("/v1/tenants", json!({"name": name, "admin": "boss"}));
    assert_eq!(r.status, 201, "{}", r.text);
    s.client(r.body["token"].as_str().unwrap())
}

fn unknown_field(answer: &crate::common::Answer, field: &str) {
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{}",
        answer.text
    );
    let message = answer.body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("unknown field `{field}`")),
        "{message}"
    );
}

fn tenant_admins_cannot_name_host_files(b: Backend) {
    let s = Server::start(b);
    let acme = tenant_admin(&s, "acme");
    // The legitimate recipe: a driver, a root filesystem, a kernel package.
    let r = acme.put_yaml(
        "/v1/images/vm",
        "driver: qemu\nrootfs: debian\nkernel_package: linux-image-cloud-amd64\n",
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(r.body["resource"]["spec"].get("artifact").is_none());

    // Every field that used to name a host file, in YAML and JSON, in
    // other spellings and as a sequence.
    for field in [
        "kernel", "initrd", "disk", "root_dir", "Kernel", "KERNEL", "rootDir",
    ] {
        unknown_field(
            &acme.put_yaml(
                "/v1/images/vm",
                &format!("driver: qemu\n{field}: /etc/shadow\n"),
            ),
            field,
        );
        unknown_field(
            &acme.put_json(
                "/v1/images/vm",
                json!({"driver": "qemu", field: "/var/lib/hearth/hearth.db"}),
            ),
            field,
        );
        unknown_field(
            &acme.patch("/v1/images/vm", json!({ field: "/etc/shadow" })),
            field,
        );
    }
    unknown_field(
        &acme.put_yaml("/v1/images/vm", "driver: qemu\nkernel:\n- /etc/shadow\n"),
        "kernel",
    );
    for bad in ["/etc/shadow", "../../etc/shadow", "file:/etc/shadow"] {
        acme.patch("/v1/images/vm", json!({ "kernel_package": bad }))
            .assert_error(
                400,
                "INVALID_ARGUMENT",
                &format!(
                    "kernel_package {bad:?} is not a Debian package name (lowercase letters, digits, '+', '-', '.'); images name no host files"
                ),
            );
    }
    // The server-owned artifact: written by a tenant, it is ignored.
    let forged = json!({"source": "prebuilt", "prebuilt": "../../../../etc", "digest": "x", "created_at": "t"});
    for r in [
        acme.patch("/v1/images/vm", json!({ "artifact": forged })),
        acme.put_json(
            "/v1/images/vm",
            json!({"driver": "qemu", "rootfs": "debian", "artifact": forged}),
        ),
    ] {
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            r.body["resource"]["spec"].get("artifact").is_none(),
            "{}",
            r.text
        );
    }
    assert!(
        acme.get("/v1/images/vm").body["spec"]
            .get("artifact")
            .is_none()
    );

    // Prebuilt registration is the operator's.
    acme.post("/v1/images/vm/prebuilt", json!({"path": "x"}))
        .assert_error(
            403,
            "PERMISSION_DENIED",
            "your role does not have image.register permission",
        );
    // Baking a sandbox image is refused with the reason; a developer may not
    // bake; a viewer reads jobs.
    acme.put_yaml("/v1/images/sb", "driver: sandbox\n");
    let r = acme.post("/v1/images/sb/bakes", json!({}));
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("FAILED_PRECONDITION")),
        "{}",
        r.text
    );
    let dev = s.identity("dev", "developer");
    s.client(&dev)
        .post("/v1/images/vm/bakes", json!({}))
        .assert_error(
            403,
            "PERMISSION_DENIED",
            "your role does not have image.update permission",
        );
    let viewer = s.identity("watcher", "viewer");
    assert_eq!(s.client(&viewer).get("/v1/images/vm/bakes").status, 200);

    // Another tenant's image is not there to name, read or bake.
    let r = s.admin().put_yaml("/v1/images/theirs", "driver: qemu\n");
    assert_eq!(r.status, 201, "{}", r.text);
    acme.get("/v1/images/theirs")
        .assert_error(404, "NOT_FOUND", "image \"theirs\" not found");
    acme.post("/v1/images/theirs/bakes", json!({}))
        .assert_error(404, "NOT_FOUND", "image \"theirs\" not found");
    acme.put_yaml("/v1/environments/dev", "driver: qemu\nimage: theirs\n")
        .assert_error(
            409,
            "FAILED_PRECONDITION",
            "image \"theirs\" does not exist; create it first",
        );
    assert!(
        acme.get("/v1/images/theirs/bakes").body["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

fn operators_register_prebuilt_images_confined_to_the_store(b: Backend) {
    let s = Server::start_with(b, &["--resync", "200ms", "--backoff-base", "200ms"]);
    let prebuilt = s.data_dir.path().join("images/prebuilt");
    let folder = |rel: &str| {
        let dir = prebuilt.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(dir.join("initrd.img"), b"initrd").unwrap();
        dir
    };
    let good = folder("web/v1");
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("vmlinuz"), b"k").unwrap();
    std::fs::write(outside.path().join("initrd.img"), b"i").unwrap();
    symlink(outside.path(), prebuilt.join("escape")).unwrap();
    let evil = folder("evil");
    std::fs::remove_file(evil.join("vmlinuz")).unwrap();
    symlink("/etc/shadow", evil.join("vmlinuz")).unwrap();
    let op = s.admin();
    let refused = |path: &str, message: &str| {
        let r = op.post("/v1/images/pre/prebuilt", json!({ "path": path }));
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (400, Some("INVALID_ARGUMENT")),
            "{path}: {}",
            r.text
        );
        let got = r.body["message"].as_str().unwrap();
        assert!(got.contains(message), "{path}: {got}");
    };
    refused("../prebuilt/web/v1", "climbs out with '..'");
    refused("web/../../../..", "climbs out with '..'");
    refused(&good.display().to_string(), "is absolute");
    refused("/etc", "is absolute");
    refused("escape", "\"escape\" is a symbolic link");
    refused("evil", "vmlinuz is a symbolic link");
    let r = op.post("/v1/images/pre/prebuilt", json!({ "path": "missing" }));
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{}",
        r.text
    );
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("no such folder"),
        "{}",
        r.text
    );
    assert_eq!(op.get("/v1/images/pre").status, 404, "nothing was created");

    // The legitimate registration, for another tenant.
    let acme = tenant_admin(&s, "acme");
    let r = op.post(
        "/v1/images/pre/prebuilt",
        json!({"path": "web/v1", "tenant": "acme"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let image = acme.get("/v1/images/pre");
    let artifact = &image.body["spec"]["artifact"];
    assert_eq!(
        (artifact["source"].as_str(), artifact["prebuilt"].as_str()),
        (Some("prebuilt"), Some("web/v1")),
        "{}",
        image.text
    );
    assert_eq!(artifact["digest"].as_str().unwrap().len(), 64);
    let version = image.body["version"].as_i64().unwrap();

    // The folder changes after registration: its kernel becomes a link to
    // /etc/shadow. The boot re-checks and fails with the reason; no qemu
    // ever reads the file.
    std::fs::remove_file(good.join("vmlinuz")).unwrap();
    symlink("/etc/shadow", good.join("vmlinuz")).unwrap();
    acme.put_yaml("/v1/pool-config/default", "max_vms: 2\n");
    acme.put_yaml("/v1/environments/dev", "driver: qemu\nimage: pre\n");
    acme.put_yaml("/v1/workspaces/web", "environment: dev\nmin_idle: 1\n");
    let mut last = Value::Null;
    let failed = wait_until(60, || {
        last = acme.get("/v1/pool/status").body;
        last["workspaces"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("vmlinuz is a symbolic link"))
    });
    assert!(failed, "{last:#}");
    acme.put_yaml("/v1/workspaces/web", "environment: dev\nmin_idle: 0\n");
    assert_eq!(acme.get("/v1/images/pre").body["version"], version);
}
