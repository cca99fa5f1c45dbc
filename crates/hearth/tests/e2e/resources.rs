//! Resources through the API: validation messages, YAML/JSON errors, round
//! trips, references, versions and secret masking.

use crate::both_backends;
use crate::common::{Backend, Server};
use serde_json::json;

both_backends!(
    pool_config_validation_messages,
    pool_config_yaml_and_json_errors_name_field_and_line,
    pool_config_is_a_singleton_named_default,
    pool_config_round_trip,
    pool_config_keeps_unknown_reap_values,
    references_must_exist_and_block_deletes,
    environment_versions_and_masked_secrets,
    image_versions_bump_on_change,
    patch_errors,
    workspace_validation,
    unknown_routes_answer_json,
);

const PC: &str = "/v1/pool-config/default";

fn pool_config_validation_messages(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    api.put_yaml(PC, "max_vms: 0").assert_error(
        400,
        "INVALID_ARGUMENT",
        "max_vms must be positive",
    );
    api.put_yaml(PC, "max_vms: -3").assert_error(
        400,
        "INVALID_ARGUMENT",
        "max_vms must be positive",
    );
    api.put_json(PC, json!({"max_vms": 5, "max_agents_per_developer": -1}))
        .assert_error(
            400,
            "INVALID_ARGUMENT",
            "max_agents_per_developer must not be negative (0 = unlimited)",
        );
    let long = "x".repeat(1025);
    api.put_json(PC, json!({"max_vms": 5, "description": long}))
        .assert_error(
            400,
            "INVALID_ARGUMENT",
            "description exceeds 1024 byte limit (1025 bytes)",
        );
    // Exactly at the limit is fine.
    let r = api.put_json(PC, json!({"max_vms": 5, "description": "y".repeat(1024)}));
    assert_eq!(r.status, 200, "{}", r.text);
    // The patch path applies the same rules.
    api.patch(PC, json!({"max_vms": 0})).assert_error(
        400,
        "INVALID_ARGUMENT",
        "max_vms must be positive",
    );
    // Nothing invalid was stored.
    assert_eq!(api.get(PC).body["spec"]["max_vms"], 5);
}

fn pool_config_yaml_and_json_errors_name_field_and_line(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    let r = api.put_yaml(PC, "max_vms: 5\nmax_vm: 6\n");
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT"))
    );
    let m = r.body["message"].as_str().unwrap();
    assert!(
        m.contains("unknown field `max_vm`") && m.contains("line 2"),
        "{m}"
    );

    let r = api.put_yaml(PC, "max_vms: many\n");
    let m = r.body["message"].as_str().unwrap();
    assert!(
        m.contains("max_vms: invalid type") && m.contains("line 1"),
        "{m}"
    );

    let r = api.put_yaml(PC, "max_vms: 5\n  description: [oops\n");
    assert_eq!(r.status, 400);
    assert!(
        r.body["message"].as_str().unwrap().contains("line"),
        "{}",
        r.text
    );

    let r = api.put_json(PC, json!({"max_vms": "5"}));
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("max_vms: invalid type: string"),
        "{}",
        r.text
    );

    let r = api.request(
        "PUT",
        PC,
        Some("application/json"),
        Some("{\"max_vms\": 5,".into()),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{}",
        r.text
    );

    let r = api.put_yaml(PC, "description: no cap\n");
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("missing field `max_vms`"),
        "{}",
        r.text
    );

    api.put_yaml(PC, "")
        .assert_error(400, "INVALID_ARGUMENT", "empty pool-config document");

    let r = api.put_yaml(PC, "max_vms: 4294967296\n");
    assert!(
        r.body["message"].as_str().unwrap().contains("max_vms"),
        "{}",
        r.text
    );
    let g = api.get(PC);
    assert_eq!(
        (
            g.body["version"].as_i64(),
            g.body["spec"]["max_vms"].as_i64()
        ),
        (Some(1), Some(10)),
        "nothing was stored over the tenant's first pool config: {}",
        g.text
    );
}

fn pool_config_is_a_singleton_named_default(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    api.put_yaml("/v1/pool-config/prod", "max_vms: 5")
        .assert_error(
            400,
            "INVALID_ARGUMENT",
            "the pool config is a singleton always named \"default\" (got \"prod\")",
        );
    api.get("/v1/pool-config/prod").assert_error(
        404,
        "NOT_FOUND",
        "pool-config \"prod\" not found: the pool config is a singleton always named \"default\" (got \"prod\")",
    );
    assert_eq!(api.delete("/v1/pool-config/prod").status, 404);
    // The one there is from the tenant's creation on.
    assert_eq!(api.get(PC).status, 200);
    let list = api.get("/v1/pool-config");
    assert_eq!(
        list.body["items"].as_array().unwrap().len(),
        1,
        "{}",
        list.text
    );
}

fn pool_config_round_trip(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    // Every tenant starts with one (version 1, the default max_vms).
    let g = api.get(PC);
    assert_eq!(
        (g.status, &g.body["spec"], &g.body["version"]),
        (
            200,
            &json!({"max_vms": 10, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"}),
            &json!(1)
        ),
        "{}",
        g.text
    );
    let r = api.put_yaml(PC, "max_vms: 50");
    assert_eq!(
        (r.status, r.body["outcome"].as_str()),
        (200, Some("updated")),
        "{}",
        r.text
    );
    assert_eq!(
        r.body["resource"]["spec"],
        json!({"max_vms": 50, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"})
    );
    assert_eq!(r.body["resource"]["version"], 2);

    let r = api.put_yaml(PC, "max_vms: 50\nreap_stranded_workflows: dry_run\n");
    assert_eq!(
        (r.status, r.body["outcome"].as_str()),
        (200, Some("unchanged")),
        "{}",
        r.text
    );

    let r = api.patch(
        PC,
        json!({"max_vms": 100, "description": "Production pool limits"}),
    );
    assert_eq!(
        (r.status, r.body["outcome"].as_str()),
        (200, Some("updated")),
        "{}",
        r.text
    );
    assert_eq!(r.body["resource"]["version"], 3);

    let g = api.get(PC);
    assert_eq!(g.status, 200);
    assert_eq!(
        g.body["spec"],
        json!({"max_vms": 100, "max_agents_per_developer": 0, "description": "Production pool limits", "reap_stranded_workflows": "dry_run"})
    );
    assert_eq!(g.body["kind"], "pool-config");
    assert_eq!(g.body["name"], "default");

    // A merge patch with null removes a field (back to its default).
    let r = api.patch(PC, json!({"description": null}));
    assert!(
        r.body["resource"]["spec"].get("description").is_none(),
        "{}",
        r.text
    );

    let list = api.get("/v1/pool-config");
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);

    // It cannot be deleted: it is set instead.
    api.delete(PC).assert_error(
        409,
        "FAILED_PRECONDITION",
        "the pool config cannot be deleted; set it instead (hearth set pool-config default)",
    );
    assert_eq!(api.get(PC).body["spec"]["max_vms"], 100);
    assert_eq!(api.patch(PC, json!({"max_vms": 3})).status, 200);
}

fn pool_config_keeps_unknown_reap_values(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    for value in ["enabled", "disabled", "dry_run", "sometimes"] {
        let r = api.put_json(PC, json!({"max_vms": 5, "reap_stranded_workflows": value}));
        assert!(r.status == 200 || r.status == 201, "{}", r.text);
        assert_eq!(api.get(PC).body["spec"]["reap_stranded_workflows"], value);
    }
}

fn references_must_exist_and_block_deletes(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    api.put_yaml("/v1/workspaces/web", "environment: dev\nmin_idle: 1\n")
        .assert_error(
            409,
            "FAILED_PRECONDITION",
            "environment \"dev\" does not exist; create it first",
        );
    api.put_yaml("/v1/environments/dev", "driver: sandbox\nimage: base\n")
        .assert_error(
            409,
            "FAILED_PRECONDITION",
            "image \"base\" does not exist; create it first",
        );
    assert_eq!(
        api.put_yaml("/v1/images/base", "driver: sandbox\n").status,
        201
    );
    assert_eq!(
        api.put_yaml("/v1/environments/dev", "driver: sandbox\nimage: base\n")
            .status,
        201
    );
    let r = api.put_yaml(
        "/v1/workspaces/web",
        "environment: dev\nmin_idle: 1\nmax_idle: 3\nrepos:\n- url: https://git.example/org/web.git\n",
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["resource"]["spec"]["repos"][0]["branch"], "main");

    api.delete("/v1/environments/dev").assert_error(
        409,
        "FAILED_PRECONDITION",
        "environment \"dev\" is used by workspace \"web\"; change or delete that first",
    );
    api.delete("/v1/images/base").assert_error(
        409,
        "FAILED_PRECONDITION",
        "image \"base\" is used by environment \"dev\"; change or delete that first",
    );
    assert_eq!(api.delete("/v1/workspaces/web").status, 200);
    assert_eq!(api.delete("/v1/environments/dev").status, 200);
    assert_eq!(api.delete("/v1/images/base").status, 200);
}

fn environment_versions_and_masked_secrets(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    let secret = "pa55-w0rd-never-shown";
    let yaml = format!(
        "driver: sandbox\ncpus: 2\nmemory: 1Gi\nenv:\n  DB_PASSWORD: {secret}\n  MODE: dev\n"
    );
    let r = api.put_yaml("/v1/environments/dev", &yaml);
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["resource"]["version"], 1);
    assert_eq!(
        r.body["resource"]["spec"]["env"],
        json!({"DB_PASSWORD": "***", "MODE": "***"})
    );
    assert!(!r.text.contains(secret));

    // Writing back what `get` showed keeps the stored secrets.
    let shown = api.get("/v1/environments/dev");
    assert!(!shown.text.contains(secret));
    let r = api.put_json("/v1/environments/dev", shown.body["spec"].clone());
    assert_eq!(
        (
            r.body["outcome"].as_str(),
            r.body["resource"]["version"].as_i64()
        ),
        (Some("unchanged"), Some(1)),
        "{}",
        r.text
    );

    let r = api.patch("/v1/environments/dev", json!({"cpus": 4}));
    assert_eq!(
        (
            r.body["outcome"].as_str(),
            r.body["resource"]["version"].as_i64()
        ),
        (Some("updated"), Some(2)),
        "{}",
        r.text
    );
    let r = api.patch("/v1/environments/dev", json!({"env": {"MODE": "prod"}}));
    assert_eq!(r.body["resource"]["version"], 3, "{}", r.text);
    let r = api.patch("/v1/environments/dev", json!({"env": {"NEW_KEY": "***"}}));
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{}",
        r.text
    );
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .starts_with("env.NEW_KEY"),
        "{}",
        r.text
    );

    // The stored value is the real one: the store holds it, nothing shows it.
    let list = api.get("/v1/environments");
    assert!(!list.text.contains(secret));
    assert!(!s.logs().contains(secret), "a secret reached the log");
    assert_eq!(api.get("/v1/environments/dev").body["version"], 3);
}

fn image_versions_bump_on_change(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    let r = api.put_yaml("/v1/images/vm", "driver: qemu\n");
    assert_eq!(r.body["resource"]["version"], 1, "{}", r.text);
    assert_eq!(
        r.body["resource"]["spec"]["rootfs"], "minimal",
        "{}",
        r.text
    );
    let r = api.put_yaml(
        "/v1/images/vm",
        "driver: qemu\nrootfs: debian\nversion: 99\n",
    );
    assert_eq!(
        (
            r.body["outcome"].as_str(),
            r.body["resource"]["version"].as_i64()
        ),
        (Some("updated"), Some(2)),
        "{}",
        r.text
    );
    api.put_yaml("/v1/images/vm", "driver: qemu\nrootfs: alpine\n")
        .assert_error(
            400,
            "INVALID_ARGUMENT",
            "invalid image: rootfs: unknown variant `alpine`, expected `minimal` or `debian` at line 2 column 9",
        );
    api.put_yaml("/v1/images/Bad_Name", "driver: sandbox\n").assert_error(
        400,
        "INVALID_ARGUMENT",
        "invalid image name \"Bad_Name\": use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit",
    );
}

fn patch_errors(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    api.put_yaml(PC, "max_vms: 5");
    api.patch(PC, json!([1, 2])).assert_error(
        400,
        "INVALID_ARGUMENT",
        "invalid request: the body must be a JSON object",
    );
    let r = api.patch(PC, json!({"max_vmz": 3}));
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `max_vmz`"),
        "{}",
        r.text
    );
    let r = api.patch(PC, json!({"max_vms": "ten"}));
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("max_vms: invalid type"),
        "{}",
        r.text
    );
    let r = api.request(
        "PATCH",
        PC,
        Some("application/merge-patch+json"),
        Some("{not json".into()),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{}",
        r.text
    );
    assert_eq!(
        api.patch("/v1/workspaces/nope", json!({"min_idle": 1}))
            .status,
        404
    );
    assert_eq!(api.get(PC).body["spec"]["max_vms"], 5);
}

fn workspace_validation(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    api.put_yaml("/v1/environments/dev", "driver: sandbox\n");
    api.put_yaml(
        "/v1/workspaces/web",
        "environment: dev\nmin_idle: 3\nmax_idle: 2\n",
    )
    .assert_error(
        400,
        "INVALID_ARGUMENT",
        "max_idle (2) must be at least min_idle (3)",
    );
    let r = api.put_yaml("/v1/workspaces/web", "environment: dev\nwarm_pool:\n  enabled: true\n  setup_commands:\n  - name: deps\n    command: make deps\n    shell: bash\n");
    let m = r.body["message"].as_str().unwrap();
    assert!(
        m.contains("unknown field `shell`") && m.contains("line 7"),
        "{m}"
    );
    let r = api.put_yaml("/v1/workspaces/web", "environment: dev\nmin_idle: 2\nwarm_pool:\n  setup_commands:\n  - name: deps\n    command: make deps\n");
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["resource"]["spec"]["warm_pool"]["enabled"], true);
    let r = api.patch("/v1/workspaces/web", json!({"max_idle": 1}));
    assert_eq!(
        r.body["message"], "max_idle (1) must be at least min_idle (2)",
        "{}",
        r.text
    );
}

fn unknown_routes_answer_json(b: Backend) {
    let s = Server::start(b);
    s.admin().get("/v1/vms-that-do-not-exist").assert_error(
        404,
        "NOT_FOUND",
        "no route for GET /v1/vms-that-do-not-exist",
    );
}
