//! The VM network over the real API: `network: host` and `allow_host_ports`
//! open paths from VMs to the host, so only an operator may write them; a
//! tenant admin is refused (PUT and PATCH, CLI included) and keeps every
//! other setting, and `egress` is the default.

use crate::both_backends;
use crate::common::{Backend, Server};
use serde_json::json;

const DENIED_HOST: &str =
    "only an operator may set network: host on environment \"dev\": it lets VMs reach the host";
const DENIED_PORTS: &str =
    "only an operator may set allow_host_ports on environment \"dev\": it lets VMs reach the host";

fn only_operators_open_paths_from_vms_to_the_host(b: Backend) {
    let s = Server::start(b);
    let admin_token = s.identity("ada", "admin");
    let admin = s.client(&admin_token);
    let operator = s.admin();

    // Legitimate: an admin writes an environment; its network is egress.
    let r = admin.put_yaml("/v1/environments/dev", "driver: sandbox\ncpus: 1\n");
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.body["resource"]["spec"]["network"], "egress",
        "{}",
        r.text
    );
    assert_eq!(
        r.body["resource"]["spec"]["allow_host_ports"]
            .as_array()
            .map_or(0, |a| a.len()),
        0,
        "{}",
        r.text
    );

    // Attacks: the admin opens the host network or a host port, by PUT
    // and by PATCH, and through the CLI.
    admin
        .put_yaml("/v1/environments/dev", "driver: sandbox\nnetwork: host\n")
        .assert_error(403, "PERMISSION_DENIED", DENIED_HOST);
    admin
        .put_yaml(
            "/v1/environments/dev",
            "driver: sandbox\nnetwork: egress\nallow_host_ports: [5432]\n",
        )
        .assert_error(403, "PERMISSION_DENIED", DENIED_PORTS);
    admin
        .patch("/v1/environments/dev", json!({"network": "host"}))
        .assert_error(403, "PERMISSION_DENIED", DENIED_HOST);
    admin
        .patch("/v1/environments/dev", json!({"allow_host_ports": [8080]}))
        .assert_error(403, "PERMISSION_DENIED", DENIED_PORTS);
    let out = s.cli(
        &admin_token,
        &["set", "environment", "dev"],
        "driver: sandbox\nnetwork: host\n",
    );
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains(DENIED_HOST), "{out:?}");
    // Nothing of it was stored.
    let stored = operator.get("/v1/environments/dev");
    assert_eq!(stored.body["spec"]["network"], "egress", "{}", stored.text);
    assert_eq!(stored.body["version"], 1, "{}", stored.text);

    // Legitimate: the operator may, and the admin then edits the rest of
    // the environment without touching what the operator set.
    let r = operator.put_yaml(
        "/v1/environments/dev",
        "driver: sandbox\nnetwork: egress\nallow_host_ports: [9418]\n",
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let r = admin.patch("/v1/environments/dev", json!({"cpus": 2}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["resource"]["spec"]["allow_host_ports"],
        json!([9418])
    );
    admin
        .patch(
            "/v1/environments/dev",
            json!({"allow_host_ports": [9418, 5432]}),
        )
        .assert_error(403, "PERMISSION_DENIED", DENIED_PORTS);
    // Closing a path needs no operator.
    let r = admin.patch("/v1/environments/dev", json!({"allow_host_ports": []}));
    assert_eq!(r.status, 200, "{}", r.text);
    let r = operator.put_yaml("/v1/environments/dev", "driver: sandbox\nnetwork: host\n");
    assert_eq!(r.status, 200, "{}", r.text);
    let r = admin.patch("/v1/environments/dev", json!({"memory": "512Mi"}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["resource"]["spec"]["network"], "host");

    // No one gets the host network for a qemu VM.
    operator
        .put_yaml("/v1/environments/vm", "driver: qemu\nnetwork: host\n")
        .assert_error(
            400,
            "INVALID_ARGUMENT",
            "network: host is not available with driver: qemu (the guest would reach the host's loopback); use network: egress with allow_host_ports",
        );
}

both_backends!(only_operators_open_paths_from_vms_to_the_host);
