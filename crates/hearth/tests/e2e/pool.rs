//! The Pool lines of DESIGN.md, through the real server with the real
//! sandbox driver (every test on both store backends).

use crate::both_backends;
use crate::common::{Backend, Server, wait_until};
use serde_json::{Value, json};

both_backends!(
    backfill_keeps_min_idle_warm,
    spawn_claims_a_warm_vm_at_once,
    spawn_cold_boots_when_none_is_idle,
    spawn_waits_queued_at_max_vms,
    finished_agents_return_their_vm_under_max_idle,
    scale_down_past_max_idle_and_idle_timeout,
    hard_cap_is_shared_between_workspaces,
    stale_vms_are_replaced_on_their_own,
    flush_destroys_idle_vms_only,
    nuke_ends_everything_and_stops_the_pool,
    failing_boots_back_off_then_hard_limit,
    pool_commands_refuse_inside_a_vm,
);

const SANDBOX: &str = "driver: sandbox\nmemory: 256Mi\n";
const FAST: &[&str] = &["--resync", "200ms"];

fn count(status: &Value, key: &str) -> i64 {
    status["vms"][key].as_i64().unwrap()
}

fn idle_ids(s: &Server) -> Vec<String> {
    let mut ids: Vec<String> = s
        .vms()
        .iter()
        .filter(|v| v["state"] == "idle")
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Waits for exactly `n` idle VMs and nothing booting.
fn wait_idle(s: &Server, n: i64, secs: u64) {
    let mut last = Value::Null;
    let ok = wait_until(secs, || {
        last = s.status();
        count(&last, "idle") == n && count(&last, "booting") == 0 && count(&last, "draining") == 0
    });
    assert!(
        ok,
        "never reached {n} idle VMs: {last:#}\n{}",
        s.logs_tail()
    );
}

fn backfill_keeps_min_idle_warm(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 2\nmax_idle: 2\n");
    wait_idle(&s, 2, 30);
    assert!(
        wait_until(10, || s.sandboxes().len() == 2),
        "the driver runs what the store says: sandboxes {:?}, VMs {:?}\n{}",
        s.sandboxes(),
        s.admin().get("/v1/vms?all=true").text,
        s.logs_tail()
    );
    // Claiming one drops idle below min_idle: a new one is booted.
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(r.status, 201, "{}", r.text);
    wait_idle(&s, 2, 30);
    let st = s.status();
    assert_eq!((count(&st, "active"), count(&st, "total")), (1, 3));
    let out = s.cli(&s.admin_token, &["pool", "status"], "");
    assert!(out.stdout.starts_with("Pool: default\nStatus: healthy\nVMs:\n  Total:    3\n  Active:   1   (running agents)\n  Idle:     2   (warm, ready to claim)\n  Booting:  0   (starting up)\n"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("max_vms: 10  min_idle: 2  max_idle: 2  idle_timeout: 15m  boot_timeout: 5m"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("Workspace: web"), "{}", out.stdout);
}

fn spawn_claims_a_warm_vm_at_once(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 1\nmax_idle: 1\n");
    wait_idle(&s, 1, 30);
    let warm = idle_ids(&s);
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(r.status, 201, "{}", r.text);
    // Running on the warm VM in the spawn answer itself: no boot waited for.
    assert_eq!(r.body["phase"], "running", "{}", r.text);
    assert_eq!(r.body["vm"].as_str().unwrap(), warm[0]);
    let id = r.body["id"].as_str().unwrap();
    let e = s.admin().post(
        &format!("/v1/agents/{id}/exec"),
        json!({"command": "echo hello from $HEARTH_AGENT_ID; hostname"}),
    );
    assert_eq!(e.status, 200, "{}", e.text);
    assert_eq!(e.body["exit_code"], 0);
    assert!(
        e.body["stdout"]
            .as_str()
            .unwrap()
            .starts_with(&format!("hello from {id}\n")),
        "{}",
        e.text
    );
    // The VM is the agent's alone: no second agent gets it.
    let r2 = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_ne!(r2.body["vm"], r.body["vm"]);
}

fn spawn_cold_boots_when_none_is_idle(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 0\n");
    let r = s.spawn(
        &s.admin_token,
        json!({"workspace": "web", "command": "cat /proc/1/cmdline | tr '\\0' ' '; exit 7"}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(
        ["queued", "provisioning"].contains(&r.body["phase"].as_str().unwrap()),
        "{}",
        r.text
    );
    let id = r.body["id"].as_str().unwrap();
    let done = s.wait_agent(id, "failed", 30);
    assert_eq!(done["exit_code"], 7);
    assert!(
        done["output"]
            .as_str()
            .unwrap()
            .contains("hearth-guest-agent init"),
        "{done}"
    );
    // Its VM went back to the pool? max_idle is 0: it is destroyed.
    wait_idle(&s, 0, 30);
    assert!(
        wait_until(10, || s.sandboxes().is_empty()),
        "{:?}",
        s.sandboxes()
    );
}

fn spawn_waits_queued_at_max_vms(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(1, SANDBOX, "web", "min_idle: 0\nmax_idle: 1\n");
    let first = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let first_id = first.body["id"].as_str().unwrap().to_owned();
    s.wait_agent(&first_id, "running", 30);
    let second = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let second_id = second.body["id"].as_str().unwrap().to_owned();
    assert_eq!(second.body["phase"], "queued");
    s.wait_passes(3);
    let st = s.status();
    assert_eq!(
        (count(&st, "total"), st["queued"].as_i64()),
        (1, Some(1)),
        "{st}"
    );
    assert_eq!(
        s.admin().get(&format!("/v1/agents/{second_id}")).body["phase"],
        "queued"
    );
    // Capacity frees: the queued agent runs.
    let f = s.admin().post(
        &format!("/v1/agents/{first_id}/finish"),
        json!({"status": "completed"}),
    );
    assert_eq!(f.status, 200, "{}", f.text);
    s.wait_agent(&second_id, "running", 30);
    assert!(count(&s.status(), "total") <= 1);
}

fn finished_agents_return_their_vm_under_max_idle(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 1\nmax_idle: 2\n");
    wait_idle(&s, 1, 30);
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let id = r.body["id"].as_str().unwrap().to_owned();
    let vm = r.body["vm"].as_str().unwrap().to_owned();
    s.admin().post(
        &format!("/v1/agents/{id}/exec"),
        json!({"command": "sleep 300 & echo scratch > /tmp/left-over"}),
    );
    wait_idle(&s, 1, 30);
    s.admin().post(
        &format!("/v1/agents/{id}/finish"),
        json!({"status": "completed"}),
    );
    // Under max_idle (1 idle < 2): the same VM comes back, cleaned.
    let mut idle = vec![];
    assert!(
        wait_until(30, || {
            idle = idle_ids(&s);
            idle.len() == 2 && idle.contains(&vm)
        }),
        "the finished agent's VM did not come back: {idle:?}"
    );
    // It is the oldest idle VM, so the next claim takes it.
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(
        (r.body["phase"].as_str(), r.body["vm"].as_str()),
        (Some("running"), Some(vm.as_str())),
        "{}",
        r.text
    );
    let id2 = r.body["id"].as_str().unwrap().to_owned();
    let e = s.admin().post(
        &format!("/v1/agents/{id2}/exec"),
        json!({"command": "ls /tmp; pgrep -c sleep || true"}),
    );
    assert_eq!(
        e.body["stdout"], "0\n",
        "a returned VM is cleaned: {}",
        e.text
    );
    // Fill the pool to max_idle, then a returned VM is destroyed instead.
    s.admin()
        .patch("/v1/workspaces/web", json!({"min_idle": 2}));
    assert!(wait_until(30, || idle_ids(&s).len() == 2
        && s.status()["vms"]["booting"] == 0));
    s.admin().post(&format!("/v1/agents/{id2}/kill"), json!({}));
    let mut live = vec![];
    let converged = wait_until(30, || {
        live = s
            .vms()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        live.len() == 2 && !live.contains(&vm) && s.sandboxes().len() == 2
    });
    assert!(
        converged,
        "the VM returned beyond max_idle was not destroyed: {live:?}, sandboxes {:?}",
        s.sandboxes()
    );
}

fn scale_down_past_max_idle_and_idle_timeout(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 3\nmax_idle: 3\n");
    wait_idle(&s, 3, 30);
    // Config changes take effect on the next cycle.
    s.admin()
        .patch("/v1/workspaces/web", json!({"min_idle": 1, "max_idle": 1}));
    wait_idle(&s, 1, 30);
    assert!(wait_until(10, || s.sandboxes().len() == 1));
    // Past idle_timeout, idle VMs beyond min_idle are destroyed.
    s.admin()
        .patch("/v1/environments/dev", json!({"idle_timeout": "1s"}));
    s.admin()
        .patch("/v1/workspaces/web", json!({"min_idle": 0, "max_idle": 3}));
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let id = r.body["id"].as_str().unwrap().to_owned();
    s.wait_agent(&id, "running", 30);
    s.admin().post(
        &format!("/v1/agents/{id}/finish"),
        json!({"status": "completed"}),
    );
    assert!(
        wait_until(30, || count(&s.status(), "total") == 0),
        "{}",
        s.status()
    );
}

fn hard_cap_is_shared_between_workspaces(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(3, SANDBOX, "web", "min_idle: 3\n");
    s.admin()
        .put_yaml("/v1/workspaces/api", "environment: dev\nmin_idle: 3\n");
    // web may take the whole cap before api exists (every write wakes the
    // pool): it then gives way until api has its share.
    let mut st = Value::Null;
    let mut per: Vec<i64> = vec![];
    let shared = wait_until(30, || {
        st = s.status();
        per = st["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["idle"].as_i64().unwrap())
            .collect();
        count(&st, "idle") == 3
            && count(&st, "booting") == 0
            && count(&st, "draining") == 0
            && per.iter().all(|n| *n >= 1)
    });
    assert!(
        shared,
        "no workspace starves: {per:?}\n{st:#}\n{}",
        s.logs_tail()
    );
    assert_eq!(count(&st, "total"), 3);
    // Spawns beyond the cap wait; the cap holds.
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(r.body["phase"], "running");
    s.wait_passes(3);
    assert!(count(&s.status(), "total") <= 3);
    assert_eq!(s.sandboxes().len() as i64, count(&s.status(), "total"));
}

fn stale_vms_are_replaced_on_their_own(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 2\nmax_idle: 2\n");
    wait_idle(&s, 2, 30);
    let before = idle_ids(&s);
    let r = s.admin().patch("/v1/environments/dev", json!({"cpus": 2}));
    assert_eq!(r.body["resource"]["version"], 2);
    let mut last = vec![];
    let ok = wait_until(60, || {
        last = idle_ids(&s);
        last.len() == 2
            && last.iter().all(|id| !before.contains(id))
            && count(&s.status(), "total") == 2
    });
    assert!(
        ok,
        "stale VMs not replaced: before {before:?}, now {last:?}\n{}",
        s.status()
    );
    assert!(
        s.vms()
            .iter()
            .all(|v| v["env_version"] == 2 && v["stale"] == false)
    );
    assert_eq!(count(&s.status(), "stale"), 0);
}

fn flush_destroys_idle_vms_only(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 2\nmax_idle: 2\n");
    wait_idle(&s, 2, 30);
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let agent = r.body["id"].as_str().unwrap().to_owned();
    wait_idle(&s, 2, 30);
    let before = idle_ids(&s);
    let out = s.cli(&s.admin_token, &["pool", "flush"], "");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "Flushing warm VMs...\nFlushed 2 warm VMs — pool will replenish with fresh ones\n"
        ),
        "{out:?}"
    );
    // The running agent is untouched.
    let e = s.admin().post(
        &format!("/v1/agents/{agent}/exec"),
        json!({"command": "true"}),
    );
    assert_eq!(
        (e.status, e.body["exit_code"].as_i64()),
        (200, Some(0)),
        "{}",
        e.text
    );
    wait_idle(&s, 2, 30);
    assert!(
        idle_ids(&s).iter().all(|id| !before.contains(id)),
        "replenished with fresh VMs"
    );
    // Only the workspace named.
    s.admin()
        .put_yaml("/v1/workspaces/api", "environment: dev\n");
    let out = s.cli(&s.admin_token, &["--workspace", "api", "pool", "flush"], "");
    assert_eq!(
        out.stdout, "Flushing warm VMs...\nNo warm VMs to flush\n",
        "{out:?}"
    );
    // Flush needs pool-config.delete.
    let dev = s.identity("dana", "developer");
    let out = s.cli(&dev, &["pool", "flush"], "");
    assert_eq!(
        out.stderr,
        "PERMISSION_DENIED: your role does not have pool-config.delete permission\n"
    );
}

fn nuke_ends_everything_and_stops_the_pool(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 2\nmax_idle: 2\n");
    wait_idle(&s, 2, 30);
    let a = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let queued = s.admin().post("/v1/agents/x/kill", json!({}));
    assert_eq!(queued.status, 404);
    wait_idle(&s, 2, 30);
    let out = s.cli(&s.admin_token, &["pool", "flush", "--nuke"], "");
    // 1 agent terminated + 3 VMs deleted.
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "Nuking all workflows and VMs...\nNuke complete (4 terminated/deleted)\n"
        ),
        "{out:?}"
    );
    assert_eq!(
        s.admin()
            .get(&format!("/v1/agents/{}", a.body["id"].as_str().unwrap()))
            .body["phase"],
        "killed"
    );
    assert!(s.vms().is_empty());
    assert!(
        wait_until(10, || s.sandboxes().is_empty()),
        "{:?}",
        s.sandboxes()
    );
    let st = s.status();
    assert_eq!(st["status"], "stopped");
    s.wait_passes(3);
    assert_eq!(
        count(&s.status(), "total"),
        0,
        "a stopped pool does not refill"
    );
    s.spawn(&s.admin_token, json!({"workspace": "web"}))
        .assert_error(
            409,
            "FAILED_PRECONDITION",
            "the pool is stopped (pool flush --nuke); start it with `hearth pool up`",
        );
    let out = s.cli(&s.admin_token, &["pool", "up"], "");
    assert_eq!(
        out.stdout, "Pool started — replenishing to min_idle\n",
        "{out:?}"
    );
    wait_idle(&s, 2, 30);
    let out = s.cli(&s.admin_token, &["pool", "up"], "");
    assert_eq!(
        out.stdout, "Pool is already up — replenishing to min_idle\n",
        "{out:?}"
    );
}

fn failing_boots_back_off_then_hard_limit(b: Backend) {
    let s = Server::start_with(
        b,
        &[
            "--resync",
            "100ms",
            "--boot-timeout",
            "5s",
            "--backoff-base",
            "200ms",
            "--backoff-max",
            "1s",
            "--hard-limit-failures",
            "3",
        ],
    );
    // An image with nothing to boot (never baked nor registered): every
    // boot really fails, with the reason.
    s.admin().put_yaml("/v1/images/broken", "driver: sandbox\n");
    s.pool(
        10,
        "driver: sandbox\nimage: broken\n",
        "web",
        "min_idle: 2\n",
    );
    let mut last = Value::Null;
    let ok = wait_until(60, || {
        last = s.status();
        last["workspaces"][0]["status"] == "hard_limited"
    });
    assert!(ok, "never hard-limited: {last:#}\n{}", s.logs_tail());
    assert_eq!(last["status"], "degraded");
    assert_eq!(last["workspaces"][0]["consecutive_failures"], 3);
    assert!(
        last["workspaces"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("image \"broken\" has nothing to boot yet: bake it"),
        "{last:#}"
    );
    let failed_boots = || {
        s.admin().get("/v1/vms?all=true").body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["state"] == "failed")
            .count()
    };
    // A boot started before the limit may still be failing: count once
    // none is in flight.
    assert!(
        wait_until(30, || s.status()["workspaces"][0]["booting"] == 0),
        "a boot stayed in flight: {:#}",
        s.status()
    );
    let n = failed_boots();
    s.wait_passes(3);
    assert_eq!(failed_boots(), n, "a hard-limited workspace stops booting");
    assert!(
        s.sandboxes().is_empty(),
        "failed boots leave nothing: {:?}",
        s.sandboxes()
    );
    let out = s.cli(&s.admin_token, &["pool", "status"], "");
    assert!(
        out.stdout.contains("hard_limited (3 consecutive failures"),
        "{}",
        out.stdout
    );
    // A configuration change lifts it.
    s.admin()
        .patch("/v1/environments/dev", json!({"image": null}));
    wait_idle(&s, 2, 60);
    assert_eq!(s.status()["workspaces"][0]["status"], "healthy");
}

fn pool_commands_refuse_inside_a_vm(b: Backend) {
    let s = Server::start_with(b, FAST);
    // An operator-registered image holding the host's CLI binary, so that
    // the VM can run it: /bin/sh, the binary and their libraries.
    let rootfs = s.data_dir.path().join("images/prebuilt/with-cli/rootfs");
    let cli_inside = "/usr/local/bin/hearth";
    copy_with_libraries(&rootfs, std::path::Path::new("/bin/sh"), "/bin/sh");
    copy_with_libraries(
        &rootfs,
        std::path::Path::new(crate::common::binary()),
        cli_inside,
    );
    let r = s.admin().post(
        "/v1/images/with-cli/prebuilt",
        json!({"path": "with-cli", "driver": "sandbox"}),
    );
    assert!(r.status < 300, "{}", r.text);
    s.pool(
        10,
        &format!("{SANDBOX}image: with-cli\n"),
        "web",
        "min_idle: 1\n",
    );
    wait_idle(&s, 1, 30);
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let id = r.body["id"].as_str().unwrap();
    let cli = std::path::PathBuf::from(cli_inside);
    let command = format!(
        "{} --server {} pool status; echo exit=$?",
        cli.display(),
        s.url
    );
    let e = s.admin().post(
        &format!("/v1/agents/{id}/exec"),
        json!({"command": command}),
    );
    assert_eq!(
        e.body["stderr"], "pool commands are not supported on VMs\n",
        "{}",
        e.text
    );
    assert_eq!(e.body["stdout"], "exit=1\n", "{}", e.text);
}

/// Copies `binary` to `inside` under `rootfs`, with every shared library
/// `ldd` names at its own path (what a minimal root needs to run it).
fn copy_with_libraries(rootfs: &std::path::Path, binary: &std::path::Path, inside: &str) {
    let place = |from: &std::path::Path, to: &str| {
        let target = rootfs.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        // A copy, not a link: the image store refuses links.
        std::fs::copy(from, &target).unwrap();
    };
    place(binary, inside);
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(std::path::PathBuf::from);
        if let Some(lib) = path {
            let real = std::fs::canonicalize(&lib).unwrap();
            place(&real, lib.to_str().unwrap());
        }
    }
}
