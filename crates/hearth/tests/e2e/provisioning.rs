//! The provisioning pipeline through the real server, real sandboxes, real
//! git repositories served over git://, on both store backends.

use crate::both_backends;
use crate::common::{Backend, GitServer, Server, through_gateway, wait_until};
use serde_json::{Value, json};

both_backends!(
    a_test_boot_runs_every_step_and_is_never_assigned,
    a_failing_setup_command_is_reported_and_its_vm_destroyed,
    failing_clones_and_missing_branches,
    agents_on_warm_vms_see_everything_setup_made,
    the_cli_watches_a_test_boot,
);

const SECRET: &str = "s3cr3t-value-9f2c";
const FAST: &[&str] = &["--resync", "200ms"];

/// Environment `dev` with a secret, project and repo setup; workspace `web`
/// with the given repos.
///
/// The VMs have the default network (egress): they clone from the git
/// daemon on the host's loopback through the gateway, its port allowed.
fn setup(s: &Server, repos: &[(&str, &str)], min_idle: i64) {
    let repos: Vec<(String, u16, &str)> = repos
        .iter()
        .map(|(url, branch)| {
            let (url, port) = through_gateway(url);
            (url, port, *branch)
        })
        .collect();
    let mut ports: Vec<String> = repos.iter().map(|(_, port, _)| port.to_string()).collect();
    ports.dedup();
    let env = format!(
        "driver: sandbox\nmemory: 256Mi\nallow_host_ports: [{}]\nenv:\n  SECRET_TOKEN: {SECRET}\n  MODE: test\nproject_setup:\n- name: project\n  command: echo project-ran > /home/project.txt\nrepo_setup:\n- name: mark\n  command: pwd > setup-ran.txt\n",
        ports.join(", ")
    );
    let repos_yaml: String = repos
        .iter()
        .map(|(url, _, branch)| format!("- url: {url}\n  branch: {branch}\n"))
        .collect();
    s.pool(
        10,
        &env,
        "web",
        &format!(
            "min_idle: {min_idle}\nmax_idle: {}\nrepos:\n{repos_yaml}",
            min_idle.max(1)
        ),
    );
}

fn warm_pool(s: &Server, patch: Value) -> Value {
    let r = s.admin().patch("/v1/workspaces/web/warm-pool", patch);
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

/// Starts a test boot and waits for it to end.
fn test_boot(s: &Server) -> Value {
    let r = s
        .admin()
        .post("/v1/workspaces/web/warm-pool/test", json!({}));
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["status"], "provisioning");
    let id = r.body["id"].as_str().unwrap().to_owned();
    let mut last = Value::Null;
    let done = wait_until(90, || {
        last = s
            .admin()
            .get(&format!("/v1/workspaces/web/warm-pool/instances/{id}"))
            .body;
        last["status"] != "provisioning"
    });
    assert!(
        done,
        "the test boot never ended: {last:#}\n{}",
        s.logs_tail()
    );
    last
}

fn step<'a>(instance: &'a Value, name: &str, repo: Option<&str>) -> &'a Value {
    instance["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name && s["repo"].as_str() == repo)
        .unwrap_or_else(|| panic!("no step {name} {repo:?} in {instance:#}"))
}

fn a_test_boot_runs_every_step_and_is_never_assigned(b: Backend) {
    let git = GitServer::start();
    let app = git.repo(
        "app",
        &[
            ("README", "app\n"),
            (".hearth/settings.json", r#"{"hooks": {"init": [{"name": "marker", "command": "echo hearth-hook > hook.txt"}]}}"#),
        ],
    );
    let lib = git.repo(
        "lib",
        &[
            ("lib.rs", "// lib\n"),
            (
                ".capy/settings.json",
                r#"{"hooks": {"init": ["echo capy-hook > hook.txt"]}}"#,
            ),
        ],
    );
    let s = Server::start_with(b, FAST);
    setup(&s, &[(&app, "main"), (&lib, "main")], 0);
    let settings = warm_pool(
        &s,
        json!({"enabled": true, "targetSize": 0, "setupCommands": [
            {"name": "build", "command": "echo token=$SECRET_TOKEN; cat /home/app/hook.txt /home/lib/hook.txt > /home/warm.txt"}
        ]}),
    );
    assert_eq!(settings["setupCommands"][0]["name"], "build");
    // An agent spawned while the test boot runs never gets the test VM.
    let started = s
        .admin()
        .post("/v1/workspaces/web/warm-pool/test", json!({}));
    let spawned = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let agent = spawned.body["id"].as_str().unwrap().to_owned();
    let running = s.wait_agent(&agent, "running", 60);
    assert_ne!(
        running["vm"], started.body["vm"],
        "a test VM was handed to an agent"
    );
    let instance = test_boot(&s);
    assert_ne!(instance["vm"], running["vm"]);
    let agent_vm = running["vm"].as_str().unwrap().to_owned();
    assert_eq!(instance["status"], "ready", "{instance:#}");
    assert_eq!(
        instance["summary"],
        json!({"success": true, "failedStep": null, "error": null})
    );
    assert_eq!(instance["test"], true);
    let names: Vec<String> = instance["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}{}",
                s["name"].as_str().unwrap(),
                s["repo"]
                    .as_str()
                    .map(|r| format!("({r})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "create_vm",
            "ensure_server",
            "set_env_vars",
            "clone_repo(app)",
            "clone_repo(lib)",
            "init_repo(app)",
            "init_repo(lib)",
            "project_setup",
            "repo_setup(app)",
            "repo_setup(lib)",
            "warm_pool_setup"
        ]
    );
    for st in instance["steps"].as_array().unwrap() {
        assert_eq!(st["status"], "succeeded", "{st}");
        assert!(
            st["startedAt"]
                .as_str()
                .is_some_and(|t| humantime::parse_rfc3339(t).is_ok())
                && st["durationMs"].is_u64(),
            "{st}"
        );
    }
    let warm = step(&instance, "warm_pool_setup", None)["output"]
        .as_str()
        .unwrap();
    assert!(
        warm.contains("$ build") && warm.contains("token=***"),
        "{warm}"
    );
    // The hooks of both settings-file names ran (warm_pool_setup read
    // their files; `cat` of a missing one would have failed the run).
    // Secrets never leave: not in the instance, the list, nor the log.
    let listed = s.admin().get("/v1/instances?test=true");
    assert!(!listed.text.contains(SECRET) && !s.logs().contains(SECRET));
    assert_eq!(listed.body["items"][0]["id"], instance["id"]);
    // The test VMs are destroyed after they end, keeping their records.
    let vm = instance["vm"].as_str().unwrap();
    assert!(
        wait_until(30, || s.sandboxes() == vec![agent_vm.clone()]),
        "{:?}",
        s.sandboxes()
    );
    // The record is closed once the driver is done: it may lag the
    // sandbox's end by a moment.
    let record = || {
        s.admin().get("/v1/vms?all=true").body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == vm)
            .expect("the VM record stays")
            .clone()
    };
    assert!(
        wait_until(30, || record()["state"] == "destroyed"),
        "{}",
        record()
    );
    let record = record();
    assert_eq!(
        (
            record["state"].as_str(),
            record["test"].as_bool(),
            record["agent"].as_str()
        ),
        (Some("destroyed"), Some(true), None)
    );
}

fn a_failing_setup_command_is_reported_and_its_vm_destroyed(b: Backend) {
    let git = GitServer::start();
    let app = git.repo("app", &[("README", "app\n")]);
    let s = Server::start_with(b, FAST);
    setup(&s, &[(&app, "main")], 0);
    warm_pool(
        &s,
        json!({"setupCommands": [{"name": "ok", "command": "true"}, {"name": "broken", "command": "echo about to fail; exit 3"}, {"name": "never", "command": "touch /home/never"}]}),
    );
    let instance = test_boot(&s);
    assert_eq!(instance["status"], "failed", "{instance:#}");
    assert_eq!(instance["summary"]["success"], false);
    assert_eq!(instance["summary"]["failedStep"], "warm_pool_setup");
    assert_eq!(instance["summary"]["error"], "broken exited with 3");
    let failed = step(&instance, "warm_pool_setup", None);
    assert_eq!(failed["status"], "failed");
    assert!(failed["output"].as_str().unwrap().contains("about to fail"));
    assert!(
        wait_until(30, || s.sandboxes().is_empty()),
        "its VM is destroyed: {:?}",
        s.sandboxes()
    );
    // Failed runs of the pool itself feed the workspace's back-off.
    s.admin()
        .patch("/v1/workspaces/web", json!({"min_idle": 1, "max_idle": 1}));
    assert!(
        wait_until(60, || s.status()["workspaces"][0]["consecutive_failures"]
            .as_i64()
            .unwrap_or(0)
            >= 1),
        "{}",
        s.status()
    );
    let st = s.status();
    assert!(
        st["workspaces"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("warm_pool_setup failed"),
        "{st}"
    );
    let failed_runs = s
        .admin()
        .get("/v1/instances?workspace=web&status=failed")
        .body;
    assert!(
        failed_runs["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["test"] == false)
    );
}

fn failing_clones_and_missing_branches(b: Backend) {
    let git = GitServer::start();
    let app = git.repo("app", &[("README", "app\n")]);
    let s = Server::start_with(b, FAST);
    setup(&s, &[(&git.url("no-such-repo"), "main")], 0);
    let instance = test_boot(&s);
    assert_eq!(
        instance["summary"]["failedStep"], "clone_repo",
        "{instance:#}"
    );
    assert!(
        instance["summary"]["error"]
            .as_str()
            .unwrap()
            .starts_with("git clone exited with"),
        "{instance:#}"
    );
    assert_eq!(
        step(&instance, "init_repo", Some("no-such-repo"))["status"],
        "pending"
    );
    // A branch that does not exist.
    s.admin().patch(
        "/v1/workspaces/web",
        json!({"repos": [{"url": through_gateway(&app).0, "branch": "no-such-branch"}]}),
    );
    let instance = test_boot(&s);
    assert_eq!(
        instance["summary"]["failedStep"], "clone_repo",
        "{instance:#}"
    );
    let clone = step(&instance, "clone_repo", Some("app"));
    let said = format!(
        "{} {}",
        clone["output"].as_str().unwrap(),
        clone["error"].as_str().unwrap()
    );
    assert!(said.contains("no-such-branch"), "{said}");
    // The warm pool's branch overrides the repo's.
    warm_pool(&s, json!({"branch": "main"}));
    assert_eq!(test_boot(&s)["status"], "ready");
    assert!(wait_until(30, || s.sandboxes().is_empty()));
}

fn agents_on_warm_vms_see_everything_setup_made(b: Backend) {
    let git = GitServer::start();
    let app = git.repo("app", &[("README", "hello from the repo\n")]);
    let s = Server::start_with(b, FAST);
    // The warm size comes with the setup commands: the pool acts on every
    // write at once, so a VM warmed before them would lack their work.
    setup(&s, &[(&app, "main")], 0);
    warm_pool(
        &s,
        json!({"targetSize": 1, "setupCommands": [{"name": "deps", "command": "echo built > /home/app/built.txt"}]}),
    );
    assert!(
        wait_until(60, || s.status()["vms"]["idle"] == 1),
        "{}\n{}",
        s.status(),
        s.logs_tail()
    );
    let runs = s
        .admin()
        .get("/v1/workspaces/web/warm-pool/instances?status=ready")
        .body;
    assert_eq!(
        runs["items"][0]["test"], false,
        "a pool boot has its instance record: {runs}"
    );
    let a = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(a.body["phase"], "running", "{}", a.text);
    let id = a.body["id"].as_str().unwrap();
    let e = s.admin().post(
        &format!("/v1/agents/{id}/exec"),
        json!({"command": "cat /home/app/README /home/app/built.txt /home/project.txt; stat -c %a /home/.env; grep -c SECRET_TOKEN /home/.env; cat /home/app/setup-ran.txt"}),
    );
    assert_eq!(e.body["exit_code"], 0, "{}", e.text);
    assert_eq!(
        e.body["stdout"], "hello from the repo\nbuilt\nproject-ran\n600\n1\n/home/app\n",
        "{}",
        e.text
    );
}

fn the_cli_watches_a_test_boot(b: Backend) {
    let git = GitServer::start();
    let app = git.repo("app", &[("README", "app\n")]);
    let s = Server::start_with(b, FAST);
    setup(&s, &[(&app, "main")], 0);
    let t = &s.admin_token;
    let out = s.cli(
        t,
        &[
            "--workspace",
            "web",
            "warm-pool",
            "set",
            "--setup",
            "hello=echo hi",
            "--target-size",
            "0",
        ],
        "",
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.starts_with("warm-pool/web configured\n"),
        "{out:?}"
    );
    let out = s.cli(
        t,
        &["--workspace", "web", "warm-pool", "test", "--watch"],
        "",
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stderr, "", "no progress bar without a terminal");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("✓ create_vm"), "{out:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("✓ clone_repo (app)")),
        "{out:?}"
    );
    assert!(lines.last().unwrap().contains(" ready in "), "{out:?}");
    s.cli(
        t,
        &[
            "--workspace",
            "web",
            "warm-pool",
            "set",
            "--setup",
            "nope=exit 4",
        ],
        "",
    );
    let out = s.cli(
        t,
        &["--workspace", "web", "warm-pool", "test", "--watch"],
        "",
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout
            .contains("failed at warm_pool_setup: nope exited with 4"),
        "{out:?}"
    );
    let out = s.cli(t, &["--workspace", "web", "instances", "list"], "");
    assert_eq!(out.stdout.lines().count(), 3, "{out:?}");

    // On a terminal (a pseudo-terminal `script` gives it): with `-o json`,
    // stdout is not redrawn, so the bar of steps is drawn on stderr; the
    // list redrawn in place has no bar.
    s.cli(
        t,
        &[
            "--workspace",
            "web",
            "warm-pool",
            "set",
            "--setup",
            "hello=echo hi",
        ],
        "",
    );
    let (code, screen) = in_terminal(
        &s,
        &[
            "--workspace",
            "web",
            "warm-pool",
            "test",
            "--watch",
            "-o",
            "json",
        ],
    );
    assert_eq!(code, Some(0), "{screen}");
    assert!(screen.contains(" steps "), "a bar of steps: {screen:?}");
    assert!(screen.contains("\"status\": \"ready\""), "{screen:?}");
    let (code, screen) = in_terminal(&s, &["--workspace", "web", "warm-pool", "test", "--watch"]);
    assert_eq!(code, Some(0), "{screen}");
    assert!(
        screen.contains("\x1b[2K✓ create_vm"),
        "redrawn in place: {screen:?}"
    );
    assert!(
        !screen.contains(" steps "),
        "no bar under the list: {screen:?}"
    );
}

/// Runs the CLI against `s` as its admin under a pseudo-terminal (`script`),
/// `TERM=xterm`; answers its exit code and everything the terminal got.
fn in_terminal(s: &Server, args: &[&str]) -> (Option<i32>, String) {
    let command = std::iter::once(crate::common::binary())
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &command, "/dev/null"])
        .current_dir(dir.path())
        .env("TERM", "xterm")
        .env("HEARTH_SERVER", &s.url)
        .env("HEARTH_TOKEN", &s.admin_token)
        .env_remove("HEARTH_WORKSPACE")
        .stdin(std::process::Stdio::null());
    if let Some(ca) = crate::common::trusted_ca(&s.url) {
        cmd.env("HEARTH_CA", ca);
    }
    let out = cmd.output().expect("script (util-linux) runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
