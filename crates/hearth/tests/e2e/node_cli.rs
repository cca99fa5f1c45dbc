//! Operators' view of the fleet (`hearth node list|cordon|uncordon|drain`,
//! `/v1/nodes`) and the artifacts nodes fetch by digest
//! (`/v1/fleet/artifacts/{digest}`), through the real binary. Nodes are
//! joined through the server's store, as the join route records them.

use crate::both_backends;
use crate::common::{Backend, Server};
use serde_json::{Value, json};
use sha2::Digest;
use std::time::Duration;

both_backends!(
    operators_list_and_steer_nodes,
    artifacts_are_served_by_digest_to_a_node_only,
);

fn sha(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn operators_list_and_steer_nodes(b: Backend) {
    let s = Server::start(b);
    s.join_node("n1", "cred-1", Duration::ZERO);
    // Silent for longer than the node timeout (10s by default).
    s.join_node("n2", "cred-2", Duration::from_secs(60));

    let out = s.cli(&s.admin_token, &["node", "list"], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "NAME",
            "STATE",
            "REACHABLE",
            "VMS",
            "CPUS",
            "MEMORY",
            "HEARTBEAT"
        ]
    );
    let row = |i: usize| lines[i].split_whitespace().take(6).collect::<Vec<_>>();
    assert_eq!(row(1), ["n1", "ready", "yes", "0/20", "0/16", "0/32768Mi"]);
    assert_eq!(row(2), ["n2", "ready", "no", "0/20", "0/16", "0/32768Mi"]);

    let out = s.cli(&s.admin_token, &["node", "list", "-o", "json"], "");
    let items: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(items[0]["name"], "n1");
    assert_eq!(items[0]["capacity"]["drivers"], json!(["sandbox", "fake"]));
    // Nothing secret leaves: no credential hash, whatever its spelling.
    assert!(!out.stdout.contains("credential"), "{}", out.stdout);
    assert!(!out.stdout.contains(&sha(b"cred-1")), "{}", out.stdout);

    let state = |name: &str| s.admin().get(&format!("/v1/nodes/{name}")).body["state"].clone();
    for (verb, line, after) in [
        (
            "cordon",
            "node n1 cordoned: it takes no new VMs",
            "cordoned",
        ),
        (
            "drain",
            "node n1 draining: it takes no new VMs and its idle VMs are replaced elsewhere",
            "draining",
        ),
        (
            "uncordon",
            "node n1 uncordoned: it takes new VMs again",
            "ready",
        ),
    ] {
        let out = s.cli(&s.admin_token, &["node", verb, "n1"], "");
        assert_eq!((out.code, out.stdout.trim()), (0, line), "{}", out.stderr);
        assert_eq!(state("n1"), after);
    }
    assert_eq!(state("n2"), "ready");

    // Unknown nodes are named.
    s.admin()
        .post("/v1/nodes/n9/drain", json!({}))
        .assert_error(404, "NOT_FOUND", "node \"n9\" not found");
    s.admin()
        .get("/v1/nodes/n9")
        .assert_error(404, "NOT_FOUND", "node \"n9\" not found");
    let out = s.cli(&s.admin_token, &["node", "cordon", "n9"], "");
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("node \"n9\" not found"),
        "{}",
        out.stderr
    );

    // Nodes are the fleet's, not a tenant's: admins and developers neither
    // see nor change them, and nothing changes.
    for role in ["admin", "developer"] {
        let token = s.identity(&format!("a-{role}"), role);
        let api = s.client(&token);
        api.get("/v1/nodes").assert_error(
            403,
            "PERMISSION_DENIED",
            "your role does not have node.read permission",
        );
        api.post("/v1/nodes/n1/cordon", json!({})).assert_error(
            403,
            "PERMISSION_DENIED",
            "your role does not have node.manage permission",
        );
        let out = s.cli(&token, &["node", "drain", "n1"], "");
        assert_ne!(out.code, 0);
        assert!(out.stderr.contains("node.manage"), "{}", out.stderr);
    }
    assert_eq!(state("n1"), "ready");
}

/// A GET of an artifact as a node would make it.
fn fetch(s: &Server, digest: &str, node: Option<&str>, credential: Option<&str>) -> (u16, Vec<u8>) {
    let mut builder = reqwest::blocking::Client::builder();
    if let Some(ca) = &s.ca {
        let pem = std::fs::read(ca).unwrap();
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    let mut req = builder
        .build()
        .unwrap()
        .get(format!("{}/v1/fleet/artifacts/{digest}", s.url));
    if let Some(node) = node {
        req = req.header("X-Hearth-Node", node);
    }
    if let Some(credential) = credential {
        req = req.bearer_auth(credential);
    }
    let resp = req.send().unwrap();
    (resp.status().as_u16(), resp.bytes().unwrap().to_vec())
}

fn artifacts_are_served_by_digest_to_a_node_only(b: Backend) {
    let s = Server::start(b);
    let n1 = s.join_node("n1", "cred-1", Duration::ZERO);
    let n2 = s.join_node("n2", "cred-2", Duration::ZERO);
    let n1 = n1["id"].as_str().unwrap();
    let n2 = n2["id"].as_str().unwrap();

    // A prebuilt qemu image: a kernel and an initrd (larger than a chunk).
    let dir = s.data_dir.path().join("images/prebuilt/vm/v1");
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = b"a kernel".to_vec();
    let initrd: Vec<u8> = (0..(3 << 20) / 2).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.join("vmlinuz"), &kernel).unwrap();
    std::fs::write(dir.join("initrd.img"), &initrd).unwrap();
    let r = s.admin().post(
        "/v1/images/vm/prebuilt",
        json!({"path": "vm/v1", "driver": "qemu"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let files = &r.body["spec"]["artifact"]["files"];
    assert_eq!(
        files,
        &json!({"initrd": sha(&initrd), "kernel": sha(&kernel)}),
        "{}",
        r.text
    );

    // The node's credential gets the bytes, checked by digest.
    assert_eq!(
        fetch(&s, &sha(&initrd), Some(n1), Some("cred-1")),
        (200, initrd.clone())
    );
    assert_eq!(
        fetch(&s, &sha(&kernel), Some(n2), Some("cred-2")),
        (200, kernel.clone())
    );

    // Anyone else gets nothing: no credential, a wrong one, another node's,
    // an operator's token, no node header.
    for (node, credential) in [
        (Some(n1), None),
        (Some(n1), Some("cred-2")),
        (Some(n2), Some("cred-1")),
        (Some(n1), Some(s.admin_token.as_str())),
        (None, Some("cred-1")),
        (Some("not-a-node"), Some("cred-1")),
    ] {
        let (status, body) = fetch(&s, &sha(&kernel), node, credential);
        assert_eq!(status, 401, "{node:?} {credential:?}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "UNAUTHENTICATED");
    }

    // Bad and unknown digests.
    let (status, body) = fetch(&s, "abc", Some(n1), Some("cred-1"));
    assert_eq!(status, 400);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body["message"],
        "digest \"abc\" is not a SHA-256 (64 lower-case hex characters)"
    );
    let unknown = sha(b"nothing");
    let (status, body) = fetch(&s, &unknown, Some(n1), Some("cred-1"));
    assert_eq!(status, 404);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["message"], format!("artifact {unknown} not found"));

    // A sandbox root is one deterministic tar: registering the same folder
    // again gives the same digest, and the served tar holds the folder.
    let root = s.data_dir.path().join("images/prebuilt/sb/v1/rootfs");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"sandbox\n").unwrap();
    let register = || {
        let r = s.admin().post(
            "/v1/images/sb/prebuilt",
            json!({"path": "sb/v1", "driver": "sandbox"}),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["spec"]["artifact"]["files"]["root_dir"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let digest = register();
    let (status, tar) = fetch(&s, &digest, Some(n1), Some("cred-1"));
    assert_eq!(status, 200);
    assert_eq!(sha(&tar), digest);
    let mut archive = tar::Archive::new(tar.as_slice());
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["etc", "etc/hostname"]);
    assert_eq!(register(), digest);
    // No tar is left behind in the image store.
    let work = s.data_dir.path().join("images/artifacts");
    assert_eq!(std::fs::read_dir(work).unwrap().count(), 0);
}
