//! A change to a workspace's provisioning inputs (setup commands, repos,
//! branches, environment) makes its VMs stale as an environment change
//! does: the warm ones are replaced (fresh ones first, a few at a time),
//! assigned ones are left to their agents and not kept warm afterwards. A
//! change of sizing only (`min_idle`, `max_idle`, `targetSize`,
//! `description`) keeps every VM. Through the real server with the fake
//! driver and `--resync 10m`, so each reaction is the write's own.

use crate::both_backends;
use crate::common::{Backend, Server, id, wait_until};
use serde_json::{Value, json};
use std::collections::HashSet;

both_backends!(
    a_setup_change_replaces_the_warm_vms,
    a_sizing_change_keeps_the_warm_vms,
);

const SLOW_RESYNC: &[&str] = &["--resync", "10m"];
const FAKE: &str = "driver: fake\n";
/// How long any one reaction may take.
const PROMPT: u64 = 10;
/// The repo URL carries a credential: it must never show, digest or not.
const REPO: &str = "https://deploy:tok3n-s3cret@git.example/org/app.git";

/// The workspace `web` of environment `env`: one repo on `branch`, one
/// setup command `name` running `command`, and the sizes given.
fn workspace(env: &str, branch: &str, name: &str, command: &str, sizes: &str) -> String {
    format!(
        "environment: {env}\nrepos:\n  - url: {REPO}\n    branch: {branch}\n{sizes}\
         warm_pool:\n  setup_commands:\n    - name: {name}\n      command: {command}\n"
    )
}

fn ok(r: crate::common::Answer) -> Value {
    assert!(r.status < 300, "{}", r.text);
    r.body
}

fn of<'a>(vms: &'a [Value], state: &str) -> Vec<&'a Value> {
    vms.iter()
        .filter(|v| v["workspace"] == "web" && v["state"] == state)
        .collect()
}

/// Waits until `web` has exactly `n` idle VMs, none of `old`, none stale,
/// nothing booting or draining; returns their ids.
fn wait_replaced(s: &Server, old: &HashSet<String>, n: usize, what: &str) -> HashSet<String> {
    let mut last = vec![];
    let done = wait_until(PROMPT, || {
        last = s.vms();
        let idle = of(&last, "idle");
        idle.len() == n
            && idle
                .iter()
                .all(|v| !old.contains(&id(v)) && v["stale"] == false)
            && ["booting", "provisioning", "draining"]
                .iter()
                .all(|st| of(&last, st).is_empty())
    });
    assert!(
        done,
        "{what}: the warm VMs were not replaced by {n} fresh ones within {PROMPT}s \
         (old {old:?}): {last:#?}\n{}",
        s.logs_tail()
    );
    of(&last, "idle").into_iter().map(id).collect()
}

/// Waits until `web` has exactly `n` idle VMs and nothing booting or
/// draining; returns them.
fn wait_idle(s: &Server, n: usize, what: &str) -> Vec<Value> {
    let mut last = vec![];
    let done = wait_until(PROMPT, || {
        last = s.vms();
        of(&last, "idle").len() == n
            && ["booting", "provisioning", "draining"]
                .iter()
                .all(|st| of(&last, st).is_empty())
    });
    assert!(
        done,
        "{what}: never {n} idle VMs within {PROMPT}s: {last:#?}\n{}",
        s.logs_tail()
    );
    of(&last, "idle").into_iter().cloned().collect()
}

/// What each VM's provisioning run printed (every step's output; the fake
/// driver echoes each command it runs).
fn outputs(s: &Server) -> Vec<(String, String)> {
    let runs = ok(s
        .admin()
        .get("/v1/workspaces/web/warm-pool/instances?status=ready"));
    runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let printed = r["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|st| st["output"].as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            (r["vm"].as_str().unwrap().to_owned(), printed)
        })
        .collect()
}

/// Every VM of `vms` had a provisioning run that printed each of `wanted`
/// and not `unwanted` (nor the repo credential).
fn assert_ran(s: &Server, vms: &HashSet<String>, wanted: &[&str], unwanted: &str) {
    let runs = outputs(s);
    for vm in vms {
        let (_, printed) = runs
            .iter()
            .find(|(v, _)| v == vm)
            .unwrap_or_else(|| panic!("no provisioning run of {vm}: {runs:?}"));
        for w in wanted {
            assert!(printed.contains(w), "{vm} did not run {w:?}: {printed}");
        }
        assert!(
            !printed.contains(unwanted),
            "{vm} ran {unwanted:?}: {printed}"
        );
        assert!(!printed.contains("tok3n-s3cret"), "{printed}");
    }
}

fn a_setup_change_replaces_the_warm_vms(b: Backend) {
    let s = Server::start_with(b, SLOW_RESYNC);
    let sizes = "min_idle: 3\nmax_idle: 4\n";
    s.pool(
        10,
        FAKE,
        "web",
        // `pool` prefixes the environment line.
        workspace("dev", "main", "deps-one", "echo one", sizes)
            .strip_prefix("environment: dev\n")
            .unwrap(),
    );
    wait_idle(&s, 3, "backfill");
    // One VM goes to an agent; the pool backfills.
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(r.status, 201, "{}", r.text);
    let agent = r.body["id"].as_str().unwrap().to_owned();
    let held = s.wait_agent(&agent, "running", PROMPT)["vm"]
        .as_str()
        .unwrap()
        .to_owned();
    let warm: HashSet<String> = wait_idle(&s, 3, "backfill after the claim")
        .iter()
        .map(id)
        .collect();

    // New setup commands: the warm VMs are replaced by fresh ones that ran
    // them; the assigned one stays with its agent, marked stale.
    let api = s.admin();
    ok(api.put_yaml(
        "/v1/workspaces/web",
        &workspace("dev", "main", "deps-two", "echo two", sizes),
    ));
    let fresh = wait_replaced(&s, &warm, 3, "new setup commands");
    let vms = s.vms();
    let assigned = of(&vms, "assigned");
    assert_eq!(assigned.len(), 1, "{vms:#?}");
    assert_eq!(
        id(assigned[0]),
        held,
        "the assigned VM is its agent's still"
    );
    assert_eq!(assigned[0]["stale"], true, "{:#}", assigned[0]);
    assert_eq!(s.wait_agent(&agent, "running", 1)["vm"], held.as_str());
    assert_ran(
        &s,
        &fresh,
        &["$ deps-two\necho two", "--branch 'main'"],
        "echo one",
    );
    // `pool status` counts no stale warm VM any more, as JSON and as text.
    let status = s.status();
    assert_eq!(status["vms"]["stale"], 0, "{status:#}");
    assert_eq!(status["workspaces"][0]["stale"], 0, "{status:#}");
    let out = s.cli(&s.admin_token, &["pool", "status"], "");
    assert!(out.stdout.contains("Workspace: web"), "{}", out.stdout);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Stale:", "0"]),
        "{}",
        out.stdout
    );
    // The credential in the repo URL shows nowhere, digest or not.
    for answer in [
        api.get("/v1/vms").text,
        api.get("/v1/pool/status").text,
        api.get("/v1/workspaces/web").text,
    ] {
        assert!(!answer.contains("tok3n-s3cret"), "{answer}");
    }

    // The agent lets go: its stale VM is destroyed, not kept warm (though
    // max_idle 4 would keep a fresh one), and the warm ones stay.
    ok(api.post(
        &format!("/v1/agents/{agent}/finish"),
        json!({"status": "completed"}),
    ));
    let mut last = vec![];
    assert!(
        wait_until(PROMPT, || {
            last = s.vms();
            !last.iter().any(|v| id(v) == held)
        }),
        "the returned stale VM stayed: {last:#?}\n{}",
        s.logs_tail()
    );
    let idle: HashSet<String> = of(&last, "idle").into_iter().map(id).collect();
    assert_eq!(idle, fresh, "the fresh warm VMs are kept");

    // Another branch: replaced again.
    ok(api.put_yaml(
        "/v1/workspaces/web",
        &workspace("dev", "release", "deps-two", "echo two", sizes),
    ));
    let on_release = wait_replaced(&s, &fresh, 3, "a repo's branch");
    assert_ran(&s, &on_release, &["--branch 'release'"], "--branch 'main'");

    // Another environment at the same version: a different setup too.
    ok(api.put_yaml("/v1/environments/other", FAKE));
    let versions: HashSet<i64> = s
        .vms()
        .iter()
        .map(|v| v["env_version"].as_i64().unwrap())
        .collect();
    ok(api.put_yaml(
        "/v1/workspaces/web",
        &workspace("other", "release", "deps-two", "echo two", sizes),
    ));
    wait_replaced(&s, &on_release, 3, "another environment");
    let now: HashSet<i64> = s
        .vms()
        .iter()
        .map(|v| v["env_version"].as_i64().unwrap())
        .collect();
    assert_eq!(
        now, versions,
        "same version number: the name made them stale"
    );
}

fn a_sizing_change_keeps_the_warm_vms(b: Backend) {
    let s = Server::start_with(b, SLOW_RESYNC);
    s.pool(
        10,
        FAKE,
        "web",
        workspace(
            "dev",
            "main",
            "deps",
            "echo one",
            "min_idle: 2\nmax_idle: 2\n",
        )
        .strip_prefix("environment: dev\n")
        .unwrap(),
    );
    let before: HashSet<String> = wait_idle(&s, 2, "backfill").iter().map(id).collect();
    let api = s.admin();
    // min_idle, max_idle and description through PUT; the setup as it was,
    // the warm-pool branch spelled out as the one already checked out.
    ok(api.put_yaml(
        "/v1/workspaces/web",
        &format!(
            "{}description: bigger\n",
            workspace(
                "dev",
                "main",
                "deps",
                "echo one",
                "min_idle: 3\nmax_idle: 5\n"
            )
            .replace("warm_pool:\n", "warm_pool:\n  branch: main\n")
        ),
    ));
    let after = wait_idle(&s, 3, "raised min_idle");
    let ids: HashSet<String> = after.iter().map(id).collect();
    assert!(ids.is_superset(&before), "{before:?} replaced: {after:#?}");
    assert!(after.iter().all(|v| v["stale"] == false), "{after:#?}");
    // The warm-pool target size (min_idle again) through PATCH.
    ok(api.patch("/v1/workspaces/web/warm-pool", json!({"targetSize": 4})));
    let after = wait_idle(&s, 4, "raised targetSize");
    let more: HashSet<String> = after.iter().map(id).collect();
    assert!(more.is_superset(&ids), "{ids:?} replaced: {after:#?}");
    assert!(after.iter().all(|v| v["stale"] == false), "{after:#?}");
    let status = s.status();
    assert_eq!(status["vms"]["stale"], 0, "{status:#}");
    assert_eq!(status["workspaces"][0]["stale"], 0, "{status:#}");
}
