//! Conformance with the reference pages (issue 10, points 4, 5, 6, 16 and
//! 18): every tenant's pool config from its creation, `null` as absent and
//! the older reaper name, `pool flush` narrowed by `hearth.yaml`, the
//! warm-pool status counts, `agents exec` keeping its arguments, and
//! instance summaries and step times shaped like every other answer.

use crate::both_backends;
use crate::common::{Backend, Server, block_on, run_cli, wait_until};
use serde_json::{Value, json};

both_backends!(
    every_tenant_starts_with_the_flags_pool_config,
    tenants_of_an_older_store_get_one_on_start,
    the_pool_config_cannot_be_deleted,
    null_tilde_and_empty_are_absent,
    reap_stranded_agents_is_an_alias,
    flush_narrows_to_the_workspace_of_hearth_yaml,
    warm_pool_answer_counts_ready_provisioning_and_failed,
    agents_exec_keeps_each_argument,
    instance_summaries_have_the_same_keys_and_rfc3339_times,
);

const PC: &str = "/v1/pool-config/default";
const FAST: &[&str] = &["--resync", "200ms"];
const NO_DELETE: &str =
    "the pool config cannot be deleted; set it instead (hearth set pool-config default)";

/// A pool config as a tenant starts with it under `--default-max-vms N`.
fn initial(max_vms: i64) -> Value {
    json!({"max_vms": max_vms, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"})
}

/// Runs the CLI as the server's operator in `dir`.
fn cli_in(
    s: &Server,
    dir: &std::path::Path,
    args: &[&str],
    stdin: &str,
) -> crate::common::CliOutput {
    run_cli(
        dir,
        args,
        stdin,
        &[("HEARTH_SERVER", &s.url), ("HEARTH_TOKEN", &s.admin_token)],
    )
}

fn every_tenant_starts_with_the_flags_pool_config(b: Backend) {
    let s = Server::start_with(b, &["--default-max-vms", "7"]);
    // The first tenant, bootstrapped at first start.
    let g = s.admin().get(PC);
    assert_eq!(
        (g.status, &g.body["spec"], &g.body["version"]),
        (200, &initial(7), &json!(1)),
        "{}",
        g.text
    );
    // A tenant created through the API...
    let r = s.admin().post("/v1/tenants", json!({"name": "acme"}));
    assert_eq!(r.status, 201, "{}", r.text);
    let acme = s.client(r.body["token"].as_str().unwrap());
    let g = acme.get(PC);
    assert_eq!(
        (g.status, &g.body["spec"]),
        (200, &initial(7)),
        "{}",
        g.text
    );
    // ...and through the CLI.
    let out = s.cli(&s.admin_token, &["tenant", "create", "beta"], "");
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out.stdout).unwrap();
    let beta = v["token"].as_str().unwrap().to_owned();
    let out = s.cli(&beta, &["get", "pool-config", "default"], "");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "max_vms: 7\nmax_agents_per_developer: 0\nreap_stranded_workflows: dry_run\n"
        ),
        "{out:?}"
    );
    // A refused creation leaves nothing behind: the name is still free.
    let r = s.admin().post("/v1/tenants", json!({"name": "Bad Name"}));
    assert_eq!(r.status, 400, "{}", r.text);
    let names: Vec<String> = s.admin().get("/v1/tenants").body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["default", "acme", "beta"]);

    // The flag takes only a positive cap.
    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(
        dir.path(),
        &["server", "--default-max-vms", "0", "--data-dir", "."],
        "",
        &[],
    );
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("--default-max-vms"), "{out:?}");
}

/// Deletes a tenant's pool config row behind the server's back, as a store
/// written before every tenant had one would be.
fn drop_pool_config_rows(s: &Server) {
    let sql = "DELETE FROM resources WHERE kind = 'pool-config'";
    block_on(async {
        use sqlx::{Connection, Executor};
        match s.database_url() {
            Some(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                conn.execute(sql).await.unwrap();
            }
            None => {
                let path = s.data_dir.path().join("hearth.db");
                let url = format!("sqlite://{}", path.display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                conn.execute(sql).await.unwrap();
            }
        }
    });
}

fn tenants_of_an_older_store_get_one_on_start(b: Backend) {
    let mut s = Server::start(b);
    let r = s.admin().post("/v1/tenants", json!({"name": "acme"}));
    let acme = r.body["token"].as_str().unwrap().to_owned();
    s.admin().put_yaml(PC, "max_vms: 3\n");
    s.stop();
    drop_pool_config_rows(&s);
    s.set_extra(&mut vec!["--default-max-vms".into(), "4".into()]);
    s.launch();
    // (A new port: clients are made after the restart.)
    for api in [s.admin(), s.client(&acme)] {
        let g = api.get(PC);
        assert_eq!(
            (g.status, &g.body["spec"], &g.body["version"]),
            (200, &initial(4), &json!(1)),
            "{}",
            g.text
        );
    }
    assert!(
        s.logs()
            .contains("gave the default pool config to tenants that had none"),
        "{}",
        s.logs_tail()
    );
    // Once every tenant has one, a restart changes none.
    s.admin().put_yaml(PC, "max_vms: 9\n");
    s.restart();
    assert_eq!(s.admin().get(PC).body["spec"]["max_vms"], 9);
}

fn the_pool_config_cannot_be_deleted(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    api.put_yaml(PC, "max_vms: 12\n");
    api.delete(PC)
        .assert_error(409, "FAILED_PRECONDITION", NO_DELETE);
    let out = s.cli(&s.admin_token, &["delete", "pool-config", "default"], "");
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (
            1,
            "",
            format!("FAILED_PRECONDITION: {NO_DELETE}\n").as_str()
        ),
        "{out:?}"
    );
    // Still there, unchanged.
    let g = api.get(PC);
    assert_eq!(
        (
            g.body["spec"]["max_vms"].as_i64(),
            g.body["version"].as_i64()
        ),
        (Some(12), Some(2)),
        "{}",
        g.text
    );
    // A viewer is refused for its role first, as for any delete.
    let viewer = s.identity("vera", "viewer");
    s.client(&viewer).delete(PC).assert_error(
        403,
        "PERMISSION_DENIED",
        "your role does not have pool-config.delete permission",
    );
}

fn null_tilde_and_empty_are_absent(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    for null in ["null", "~", ""] {
        api.put_yaml(PC, "max_vms: 5\nreap_stranded_workflows: enabled\n");
        let r = api.put_yaml(
            PC,
            &format!(
                "max_vms: 5\nreap_stranded_workflows: {null}\ndescription: {null}\nmax_agents_per_developer: {null}\n"
            ),
        );
        assert_eq!(r.status, 200, "{null:?}: {}", r.text);
        assert_eq!(r.body["resource"]["spec"], initial(5), "{null:?}");
        let status = s.status();
        assert_eq!(status["reaper"]["mode"], "dry_run", "{null:?}: {status}");
    }
    let r = api.put_json(
        PC,
        json!({"max_vms": 6, "reap_stranded_workflows": null, "description": null}),
    );
    assert_eq!(
        (r.status, &r.body["resource"]["spec"]),
        (200, &initial(6)),
        "{}",
        r.text
    );
    // Quoted, it is text (and, as any unknown value, disables the reaper).
    let r = api.put_yaml(PC, "max_vms: 6\nreap_stranded_workflows: 'null'\n");
    assert_eq!(
        r.body["resource"]["spec"]["reap_stranded_workflows"],
        "null"
    );

    // Through the CLI, and for the other kinds.
    let out = s.cli(
        &s.admin_token,
        &["set", "pool-config", "default"],
        "max_vms: 6\nreap_stranded_workflows: ~\n",
    );
    assert_eq!(out.stdout, "pool-config/default configured\n", "{out:?}");
    let out = s.cli(&s.admin_token, &["get", "pool-config", "default"], "");
    assert_eq!(
        out.stdout,
        "max_vms: 6\nmax_agents_per_developer: 0\nreap_stranded_workflows: dry_run\n"
    );
    let r = api.put_yaml(
        "/v1/environments/dev",
        "driver: ~\ncpus: null\nmemory:\nidle_timeout: ~\nenv: ~\n",
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let spec = &r.body["resource"]["spec"];
    assert_eq!(
        (
            &spec["driver"],
            &spec["cpus"],
            &spec["memory"],
            &spec["idle_timeout"],
            &spec["env"]
        ),
        (
            &json!("sandbox"),
            &json!(1),
            &json!("512Mi"),
            &json!("15m"),
            &json!({})
        ),
        "{spec}"
    );
    let r = api.put_json(
        "/v1/workspaces/web",
        json!({"environment": "dev", "min_idle": null, "warm_pool": null,
               "repos": [{"url": "https://example.org/x.git", "branch": null}]}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let spec = &r.body["resource"]["spec"];
    assert_eq!(
        (
            &spec["min_idle"],
            &spec["warm_pool"]["enabled"],
            &spec["repos"][0]["branch"]
        ),
        (&json!(0), &json!(true), &json!("main")),
        "{spec}"
    );
}

fn reap_stranded_agents_is_an_alias(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    let r = api.put_yaml(PC, "max_vms: 5\nreap_stranded_agents: enabled\n");
    assert_eq!(r.status, 200, "{}", r.text);
    let spec = &r.body["resource"]["spec"];
    assert_eq!(spec["reap_stranded_workflows"], "enabled", "{spec}");
    assert!(spec.get("reap_stranded_agents").is_none(), "{spec}");
    assert_eq!(s.status()["reaper"]["mode"], "enabled");
    // JSON, a patch and the CLI's --set take it too; output says the
    // current name.
    let r = api.put_json(
        PC,
        json!({"max_vms": 5, "reap_stranded_agents": "disabled"}),
    );
    assert_eq!(
        r.body["resource"]["spec"]["reap_stranded_workflows"],
        "disabled"
    );
    let r = api.patch(PC, json!({"reap_stranded_agents": "enabled"}));
    assert_eq!(
        (
            r.status,
            &r.body["resource"]["spec"]["reap_stranded_workflows"]
        ),
        (200, &json!("enabled")),
        "{}",
        r.text
    );
    let out = s.cli(
        &s.admin_token,
        &[
            "patch",
            "pool-config",
            "default",
            "--set",
            "reap_stranded_agents=dry_run",
        ],
        "",
    );
    assert_eq!(out.code, 0, "{out:?}");
    let out = s.cli(&s.admin_token, &["get", "pool-config", "default"], "");
    assert_eq!(
        out.stdout,
        "max_vms: 5\nmax_agents_per_developer: 0\nreap_stranded_workflows: dry_run\n"
    );

    // Both names at once: refused, naming both; nothing stored.
    let both = "invalid pool-config: reap_stranded_workflows and reap_stranded_agents are the same field (reap_stranded_agents is its older name); give only one";
    api.put_yaml(
        PC,
        "max_vms: 8\nreap_stranded_workflows: enabled\nreap_stranded_agents: enabled\n",
    )
    .assert_error(400, "INVALID_ARGUMENT", both);
    api.put_json(
        PC,
        json!({"max_vms": 8, "reap_stranded_workflows": "enabled", "reap_stranded_agents": "disabled"}),
    )
    .assert_error(400, "INVALID_ARGUMENT", both);
    api.patch(
        PC,
        json!({"reap_stranded_workflows": "enabled", "reap_stranded_agents": "disabled"}),
    )
    .assert_error(400, "INVALID_ARGUMENT", both);
    let out = s.cli(
        &s.admin_token,
        &["set", "pool-config", "default"],
        "max_vms: 8\nreap_stranded_workflows: enabled\nreap_stranded_agents: enabled\n",
    );
    assert_eq!(
        (out.code, out.stderr.as_str()),
        (1, format!("INVALID_ARGUMENT: {both}\n").as_str()),
        "{out:?}"
    );
    assert_eq!(api.get(PC).body["spec"]["max_vms"], 5);
}

/// The ids of the live VMs of `workspace` in `state`, sorted.
fn vm_ids(s: &Server, workspace: &str, state: &str) -> Vec<String> {
    let mut ids: Vec<String> = s
        .vms()
        .iter()
        .filter(|v| v["workspace"] == workspace && v["state"] == state)
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Waits until `workspace` has exactly `n` idle VMs and none on the way.
fn wait_warm(s: &Server, workspace: &str, n: usize) -> Vec<String> {
    let mut vms = Vec::new();
    let ok = wait_until(30, || {
        vms = s.vms();
        let of = |state: &str| {
            vms.iter()
                .filter(|v| v["workspace"] == workspace && v["state"] == state)
                .count()
        };
        of("idle") == n && of("booting") == 0 && of("provisioning") == 0
    });
    assert!(
        ok,
        "{workspace} never had {n} warm VMs: {vms:?}\n{}",
        s.logs_tail()
    );
    vm_ids(s, workspace, "idle")
}

fn flush_narrows_to_the_workspace_of_hearth_yaml(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, "driver: fake\n", "web", "min_idle: 2\n");
    s.admin()
        .put_yaml("/v1/workspaces/api", "environment: dev\nmin_idle: 2\n");
    let web = wait_warm(&s, "web", 2);
    let api = wait_warm(&s, "api", 2);

    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("hearth.yaml"), "workspace: web\n").unwrap();
    let out = cli_in(&s, project.path(), &["pool", "flush"], "");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "Flushing warm VMs...\nFlushed 2 warm VMs — pool will replenish with fresh ones\n"
        ),
        "{out:?}"
    );
    // web's VMs are gone (replaced by fresh ones); api's are the same.
    let fresh = wait_warm(&s, "web", 2);
    assert!(
        fresh.iter().all(|id| !web.contains(id)),
        "{web:?} {fresh:?}"
    );
    assert_eq!(vm_ids(&s, "api", "idle"), api, "api kept its VMs");

    // --workspace overrides the file.
    let out = cli_in(
        &s,
        project.path(),
        &["--workspace", "api", "pool", "flush"],
        "",
    );
    assert!(
        out.stdout
            .ends_with("Flushed 2 warm VMs — pool will replenish with fresh ones\n"),
        "{out:?}"
    );
    assert_eq!(vm_ids(&s, "web", "idle"), fresh, "web kept its VMs");
    let api_fresh = wait_warm(&s, "api", 2);
    assert!(api_fresh.iter().all(|id| !api.contains(id)));

    // Without a workspace anywhere, the whole pool.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = cli_in(&s, elsewhere.path(), &["pool", "flush"], "");
    assert!(
        out.stdout
            .ends_with("Flushed 4 warm VMs — pool will replenish with fresh ones\n"),
        "{out:?}"
    );

    // --nuke stays tenant-wide: hearth.yaml does not narrow it.
    wait_warm(&s, "web", 2);
    wait_warm(&s, "api", 2);
    let out = cli_in(&s, project.path(), &["pool", "flush", "--nuke"], "");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "Nuking all workflows and VMs...\nNuke complete (4 terminated/deleted)\n"
        ),
        "{out:?}"
    );
    assert!(wait_until(30, || s.vms().is_empty()), "{:?}", s.vms());
}

fn warm_pool(s: &Server, workspace: &str) -> Value {
    let r = s
        .admin()
        .get(&format!("/v1/workspaces/{workspace}/warm-pool"));
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

fn warm_pool_answer_counts_ready_provisioning_and_failed(b: Backend) {
    let s = Server::start_with(
        b,
        &[
            "--resync",
            "200ms",
            "--fake-boot-latency",
            "1500ms",
            "--backoff-base",
            "100ms",
        ],
    );
    s.pool(10, "driver: fake\n", "web", "min_idle: 0\n");
    assert_eq!(
        warm_pool(&s, "web")["status"],
        json!({"ready": 0, "provisioning": 0, "failed": 0})
    );
    // Two boots on their way, then two ready.
    let r = s
        .admin()
        .patch("/v1/workspaces/web/warm-pool", json!({"targetSize": 2}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.body["status"].is_object(),
        "PATCH answers the status too: {}",
        r.text
    );
    let mut last = Value::Null;
    assert!(
        wait_until(30, || {
            last = warm_pool(&s, "web")["status"].clone();
            last == json!({"ready": 0, "provisioning": 2, "failed": 0})
        }),
        "{last}"
    );
    assert!(
        wait_until(30, || {
            last = warm_pool(&s, "web")["status"].clone();
            last == json!({"ready": 2, "provisioning": 0, "failed": 0})
        }),
        "{last}"
    );
    // A claimed VM is no longer ready (and its replacement boots).
    let agent = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(agent.body["phase"], "running", "{}", agent.text);
    assert_eq!(warm_pool(&s, "web")["status"]["ready"], 1);
    assert!(
        wait_until(30, || {
            last = warm_pool(&s, "web")["status"].clone();
            last == json!({"ready": 2, "provisioning": 0, "failed": 0})
        }),
        "backfilled: {last}"
    );

    // A workspace whose setup fails: its failed boots are counted.
    s.admin().put_yaml(
        "/v1/workspaces/bad",
        "environment: dev\nmin_idle: 1\nwarm_pool:\n  setup_commands:\n  - name: broken\n    command: exit 3\n",
    );
    assert!(
        wait_until(30, || {
            last = warm_pool(&s, "bad")["status"].clone();
            last["failed"].as_i64() >= Some(2)
        }),
        "{last}"
    );
    assert_eq!(last["ready"], 0, "{last}");
    let failed_runs = s
        .admin()
        .get("/v1/instances?workspace=bad&status=failed&test=false")
        .body["items"]
        .as_array()
        .unwrap()
        .len() as i64;
    assert!(
        failed_runs >= last["failed"].as_i64().unwrap(),
        "{failed_runs} {last}"
    );

    // Test boots are not part of the pool: a failed one is not counted.
    s.admin().put_yaml(
        "/v1/workspaces/probe",
        "environment: dev\nwarm_pool:\n  setup_commands:\n  - name: broken\n    command: exit 3\n",
    );
    let r = s
        .admin()
        .post("/v1/workspaces/probe/warm-pool/test", json!({}));
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert!(wait_until(30, || {
        s.admin().get(&format!("/v1/instances/{id}")).body["status"] == "failed"
    }));
    assert_eq!(
        warm_pool(&s, "probe")["status"],
        json!({"ready": 0, "provisioning": 0, "failed": 0})
    );

    // The CLI shows them.
    let out = s.cli(
        &s.admin_token,
        &["--workspace", "probe", "warm-pool", "get"],
        "",
    );
    assert!(
        out.stdout
            .ends_with("status:\n  ready: 0\n  provisioning: 0\n  failed: 0\n"),
        "{out:?}"
    );
    let out = s.cli(
        &s.admin_token,
        &["--workspace", "probe", "warm-pool", "get", "-o", "table"],
        "",
    );
    let lines: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0][5..],
        ["READY", "PROVISIONING", "FAILED"],
        "{out:?}"
    );
    assert_eq!(lines[1][5..], ["0", "0", "0"], "{out:?}");
}

fn agents_exec_keeps_each_argument(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(
        4,
        "driver: sandbox\nmemory: 256Mi\n",
        "web",
        "min_idle: 0\n",
    );
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    s.wait_agent(&id, "running", 60);
    let exec = |args: &[&str]| {
        let mut all = vec!["agents", "exec", id.as_str(), "--"];
        all.extend_from_slice(args);
        s.cli(&s.admin_token, &all, "")
    };
    let out = exec(&["sh", "-c", "echo alive"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "alive\n"), "{out:?}");
    // Spaces, quotes, `$` and empty arguments each stay one argument.
    let out = exec(&["printf", "[%s]", "a b", "it's", "$HOME", "", "x\"y"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "[a b][it's][$HOME][][x\"y]"),
        "{out:?}"
    );
    // The command's own exit code.
    let out = exec(&["sh", "-c", "exit 7"]);
    assert_eq!(out.code, 7, "{out:?}");
    s.admin().post(&format!("/v1/agents/{id}/kill"), json!({}));
}

fn instance_summaries_have_the_same_keys_and_rfc3339_times(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, "driver: fake\n", "web", "min_idle: 0\n");
    s.admin().put_yaml(
        "/v1/workspaces/bad",
        "environment: dev\nwarm_pool:\n  setup_commands:\n  - name: broken\n    command: exit 3\n",
    );
    let boot = |ws: &str| -> Value {
        let r = s
            .admin()
            .post(&format!("/v1/workspaces/{ws}/warm-pool/test"), json!({}));
        assert_eq!(r.status, 201, "{}", r.text);
        let id = r.body["id"].as_str().unwrap().to_owned();
        let mut last = Value::Null;
        assert!(
            wait_until(30, || {
                last = s
                    .admin()
                    .get(&format!("/v1/workspaces/{ws}/warm-pool/instances/{id}"))
                    .body;
                last["status"] != "provisioning"
            }),
            "{last}"
        );
        last
    };
    let ready = boot("web");
    let failed = boot("bad");
    assert_eq!(ready["status"], "ready", "{ready:#}");
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(
        ready["summary"],
        json!({"success": true, "failedStep": null, "error": null})
    );
    assert_eq!(
        failed["summary"],
        json!({"success": false, "failedStep": "warm_pool_setup", "error": "broken exited with 3"})
    );
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&ready["summary"]), keys(&failed["summary"]));
    assert_eq!(keys(&ready), keys(&failed));

    // Every timestamp, the steps' included, is RFC 3339 of one shape.
    let shape = |t: &str| -> String {
        t.chars()
            .map(|c| if c.is_ascii_digit() { '0' } else { c })
            .collect()
    };
    for instance in [&ready, &failed] {
        let created = instance["createdAt"].as_str().unwrap();
        humantime::parse_rfc3339(created).unwrap();
        for key in ["updatedAt", "finishedAt"] {
            assert_eq!(
                shape(instance[key].as_str().unwrap()),
                shape(created),
                "{key}"
            );
        }
        let mut started = 0;
        for step in instance["steps"].as_array().unwrap() {
            if let Some(t) = step.get("startedAt") {
                let t = t
                    .as_str()
                    .unwrap_or_else(|| panic!("startedAt is not text: {step}"));
                assert_eq!(shape(t), shape(created), "{step}");
                let at = humantime::parse_rfc3339(t).unwrap();
                assert!(at >= humantime::parse_rfc3339(created).unwrap(), "{step}");
                started += 1;
            }
        }
        assert!(started >= 3, "{instance:#}");
    }
    // The same in the other listings.
    let id = ready["id"].as_str().unwrap();
    assert_eq!(
        s.admin().get(&format!("/v1/instances/{id}")).body["summary"],
        ready["summary"]
    );
    let listed = s.admin().get("/v1/instances").body["items"].clone();
    let steps_of = |v: &Value| v["steps"].clone();
    let listed_ready = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == ready["id"])
        .unwrap()
        .clone();
    assert_eq!(steps_of(&listed_ready), steps_of(&ready));
    // And the CLI reads them: `instances get --steps` shows every step.
    let out = s.cli(&s.admin_token, &["instances", "get", id, "--steps"], "");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("warm_pool_setup"), "{out:?}");
}
