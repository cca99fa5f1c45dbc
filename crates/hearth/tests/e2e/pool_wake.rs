//! Every change wakes the pool at once, time-based rules act at their
//! deadline, surplus idle VMs give way to queued agents, and a lowered
//! `max_vms` is obeyed: each through the real server with the fake driver
//! and `--resync 10m`, so nothing here can be the resync's doing (every
//! wait is a few seconds).

use crate::both_backends;
use crate::common::{Backend, Server, wait_until};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

both_backends!(
    every_write_wakes_the_pool,
    raised_max_vms_serves_a_queued_agent_at_once,
    idle_timeout_acts_at_its_deadline,
    back_off_ends_at_its_deadline,
    reaper_acts_at_its_deadline,
    surplus_idle_gives_way_to_a_queued_agent,
    surplus_idle_gives_way_to_a_backfill_below_min_idle,
    lowered_max_vms_destroys_idle_vms_and_reports_over_cap,
);

/// The resync is far away: anything that happens within a test was woken.
const SLOW_RESYNC: &[&str] = &["--resync", "10m"];
const FAKE: &str = "driver: fake\n";
/// How long any one reaction may take.
const PROMPT: u64 = 5;

/// The VMs of `workspace` in `state`.
fn vms_in(s: &Server, workspace: &str, state: &str) -> Vec<Value> {
    s.vms()
        .into_iter()
        .filter(|v| v["workspace"] == workspace && v["state"] == state)
        .collect()
}

fn ids(vms: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = vms
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Waits (at most [`PROMPT`] seconds) until `workspace` has exactly `n`
/// idle VMs and nothing booting or draining; returns them.
fn wait_idle(s: &Server, workspace: &str, n: usize, what: &str) -> Vec<Value> {
    let mut last = vec![];
    let ok = wait_until(PROMPT, || {
        last = s.vms();
        let of = |state: &str| {
            last.iter()
                .filter(|v| v["workspace"] == workspace && v["state"] == state)
                .count()
        };
        of("idle") == n && of("booting") == 0 && of("provisioning") == 0 && of("draining") == 0
    });
    assert!(
        ok,
        "{what}: never {n} idle VMs of {workspace} within {PROMPT}s: {last:#?}\n{}",
        s.logs_tail()
    );
    vms_in(s, workspace, "idle")
}

fn ok(r: crate::common::Answer) -> Value {
    assert!(r.status < 300, "{}", r.text);
    r.body
}

fn every_write_wakes_the_pool(b: Backend) {
    let s = Server::start_with(b, SLOW_RESYNC);
    let api = s.admin();
    ok(api.put_yaml("/v1/pool-config/default", "max_vms: 10\n"));
    ok(api.put_yaml("/v1/environments/dev", FAKE));
    // A new workspace is backfilled.
    ok(api.put_yaml(
        "/v1/workspaces/web",
        "environment: dev\nmin_idle: 1\nmax_idle: 4\n",
    ));
    wait_idle(&s, "web", 1, "new workspace");
    // A raised min_idle (PATCH).
    ok(api.patch("/v1/workspaces/web", json!({"min_idle": 2})));
    wait_idle(&s, "web", 2, "raised min_idle");
    // A raised warm-pool target size.
    ok(api.patch("/v1/workspaces/web/warm-pool", json!({"targetSize": 3})));
    wait_idle(&s, "web", 3, "raised targetSize");
    // A lowered max_idle (PUT).
    ok(api.put_yaml(
        "/v1/workspaces/web",
        "environment: dev\nmin_idle: 1\nmax_idle: 1\n",
    ));
    let before = wait_idle(&s, "web", 1, "lowered max_idle");
    // An environment change replaces the stale VM.
    ok(api.put_yaml("/v1/environments/dev", "driver: fake\nenv:\n  MODE: two\n"));
    let mut after = vec![];
    assert!(
        wait_until(PROMPT, || {
            after = vms_in(&s, "web", "idle");
            after.len() == 1 && ids(&after) != ids(&before) && s.vms().len() == 1
        }),
        "the stale VM was not replaced: before {before:#?}, now {:#?}\n{}",
        s.vms(),
        s.logs_tail()
    );
    assert!(
        after[0]["env_version"].as_i64() > before[0]["env_version"].as_i64(),
        "{after:#?}"
    );
    // An image change likewise.
    ok(api.put_yaml("/v1/images/base", "driver: fake\ndescription: one\n"));
    ok(api.put_yaml("/v1/environments/dev", "driver: fake\nimage: base\n"));
    let mut now = vec![];
    assert!(
        wait_until(PROMPT, || {
            now = vms_in(&s, "web", "idle");
            now.len() == 1 && now[0]["image_version"] == 1 && s.vms().len() == 1
        }),
        "the environment's change to an image did not replace the VM: {:#?}",
        s.vms()
    );
    let version = 1;
    ok(api.put_yaml("/v1/images/base", "driver: fake\ndescription: two\n"));
    assert!(
        wait_until(PROMPT, || {
            now = vms_in(&s, "web", "idle");
            now.len() == 1 && now[0]["image_version"].as_i64() > Some(version) && s.vms().len() == 1
        }),
        "the image change did not replace the VM: {:#?}\n{}",
        s.vms(),
        s.logs_tail()
    );
    // A deleted workspace's VMs go.
    ok(api.delete("/v1/workspaces/web"));
    assert!(
        wait_until(PROMPT, || s.vms().is_empty()),
        "the deleted workspace's VMs stayed: {:#?}",
        s.vms()
    );
}

fn raised_max_vms_serves_a_queued_agent_at_once(b: Backend) {
    let s = Server::start_with(b, SLOW_RESYNC);
    s.pool(1, FAKE, "web", "min_idle: 0\nmax_idle: 1\n");
    let first = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(first.status, 201, "{}", first.text);
    s.wait_agent(first.body["id"].as_str().unwrap(), "running", PROMPT);
    let second = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(second.body["phase"], "queued", "{}", second.text);
    assert_eq!(s.status()["queued"], 1);
    ok(s.admin()
        .put_yaml("/v1/pool-config/default", "max_vms: 2\n"));
    s.wait_agent(second.body["id"].as_str().unwrap(), "running", PROMPT);
}

fn idle_timeout_acts_at_its_deadline(b: Backend) {
    let s = Server::start_with(b, SLOW_RESYNC);
    s.pool(
        10,
        "driver: fake\nidle_timeout: 2s\n",
        "web",
        "min_idle: 0\nmax_idle: 2\n",
    );
    // An agent's VM comes back warm when it finishes (min_idle 0: surplus).
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let id = r.body["id"].as_str().unwrap().to_owned();
    s.wait_agent(&id, "running", PROMPT);
    ok(s.admin().post(
        &format!("/v1/agents/{id}/finish"),
        json!({"status": "completed"}),
    ));
    let warm = wait_idle(&s, "web", 1, "the returned VM");
    let returned = Instant::now();
    // Nothing is written after it: only the deadline can wake the pool.
    assert!(
        wait_until(2 + PROMPT, || s.vms().is_empty()),
        "the idle VM outlived its idle_timeout: {:#?}\n{}",
        s.vms(),
        s.logs_tail()
    );
    let waited = returned.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "destroyed after {waited:?}, before its idle_timeout of 2s"
    );
    let all = s.admin().get("/v1/vms?all=true").body;
    let gone = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == warm[0]["id"])
        .unwrap();
    assert_eq!(gone["state"], "destroyed", "{gone}");
}

fn back_off_ends_at_its_deadline(b: Backend) {
    let s = Server::start_with(
        b,
        &[
            "--resync",
            "10m",
            "--backoff-base",
            "1s",
            "--backoff-max",
            "1s",
        ],
    );
    // Every boot fails in its setup command.
    s.pool(
        10,
        "driver: fake\nproject_setup:\n  - name: broken\n    command: exit 3\n",
        "web",
        "min_idle: 1\n",
    );
    let failed = || -> Vec<Value> {
        let mut vms: Vec<Value> = s.admin().get("/v1/vms?all=true").body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["state"] == "failed")
            .cloned()
            .collect();
        vms.sort_by_key(|v| v["created_at"].as_str().unwrap().to_owned());
        vms
    };
    assert!(
        wait_until(PROMPT, || {
            !failed().is_empty() && s.status()["workspaces"][0]["status"] == "backing_off"
        }),
        "the first boot never failed: {:#?}\n{}",
        s.status(),
        s.logs_tail()
    );
    // The back-off ends: a probe boot follows (and fails again), with
    // nothing written meanwhile.
    let mut vms = vec![];
    assert!(
        wait_until(PROMPT, || {
            vms = failed();
            vms.len() >= 2
        }),
        "no boot after the back-off ended: {:#?}\n{}",
        s.admin().get("/v1/vms?all=true").body,
        s.logs_tail()
    );
    // Not before it: the first failed (its back-off of 1s recorded just
    // before), the probe was created a second later.
    let failed_at = millis(vms[0]["updated_at"].as_str().unwrap());
    let probe_at = millis(vms[1]["created_at"].as_str().unwrap());
    assert!(
        probe_at - failed_at >= 900,
        "the probe started {} ms after the failure, within its 1s back-off: {vms:#?}",
        probe_at - failed_at
    );
}

/// Milliseconds since the epoch of an answer's `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn millis(rfc3339: &str) -> i64 {
    let n = |range: std::ops::Range<usize>| rfc3339[range].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19);
    let frac = rfc3339[20..].trim_end_matches('Z');
    secs * 1000 + format!("{frac:0<3}")[..3].parse::<i64>().unwrap()
}

fn reaper_acts_at_its_deadline(b: Backend) {
    let s = Server::start_with(
        b,
        &["--resync", "10m", "--build", "b1", "--reap-after", "2s"],
    );
    s.pool(10, FAKE, "web", "min_idle: 0\n");
    ok(s.admin().patch(
        "/v1/pool-config/default",
        json!({"reap_stranded_workflows": "enabled"}),
    ));
    let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let id = r.body["id"].as_str().unwrap().to_owned();
    s.wait_agent(&id, "running", PROMPT);
    // Its build retired: stranded now, reaped once the grace period ends,
    // with nothing written in between.
    ok(s.admin().post("/v1/builds/b1/retire", json!({})));
    let retired = Instant::now();
    let done = s.wait_agent(&id, "killed", 2 + PROMPT);
    let waited = retired.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "reaped after {waited:?}, before the 2s grace period"
    );
    assert!(
        done["error"].as_str().unwrap().contains("stranded"),
        "{done}"
    );
}

fn surplus_idle_gives_way_to_a_queued_agent(b: Backend) {
    let s = Server::start_with(b, SLOW_RESYNC);
    let api = s.admin();
    ok(api.put_yaml("/v1/pool-config/default", "max_vms: 2\n"));
    ok(api.put_yaml("/v1/environments/dev", FAKE));
    ok(api.put_yaml(
        "/v1/workspaces/a",
        "environment: dev\nmin_idle: 1\nmax_idle: 2\n",
    ));
    ok(api.put_yaml(
        "/v1/workspaces/b",
        "environment: dev\nmin_idle: 0\nmax_idle: 1\n",
    ));
    wait_idle(&s, "a", 1, "a's min_idle");
    // An agent of a takes its warm VM; the backfill fills the cap; the
    // agent finishes and its VM comes back warm: a holds 2 idle, 1 above
    // its min_idle, and the tenant is at max_vms.
    let r = s.spawn(&s.admin_token, json!({"workspace": "a"}));
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["phase"], "running", "{}", r.text);
    wait_idle(&s, "a", 1, "a's backfill");
    ok(api.post(
        &format!("/v1/agents/{id}/finish"),
        json!({"status": "completed"}),
    ));
    wait_idle(&s, "a", 2, "a's returned VM");
    assert_eq!(s.vms().len(), 2);
    // b's agent waits at the cap; a's surplus gives way to it.
    let r = s.spawn(&s.admin_token, json!({"workspace": "b"}));
    assert_eq!(r.status, 201, "{}", r.text);
    let queued = r.body["id"].as_str().unwrap().to_owned();
    s.wait_agent(&queued, "running", PROMPT);
    // a keeps its min_idle; the cap held throughout.
    let idle_a = wait_idle(&s, "a", 1, "a keeps its min_idle");
    assert_eq!(idle_a.len(), 1);
    assert_eq!(s.vms().len(), 2, "{:#?}", s.vms());
    let destroyed: Vec<Value> = s.admin().get("/v1/vms?all=true").body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "destroyed")
        .cloned()
        .collect();
    assert_eq!(destroyed.len(), 1, "{destroyed:#?}");
    assert_eq!(destroyed[0]["workspace"], "a");
    assert!(s.logs().contains("GiveWay"), "the destroy names its reason");
}

fn surplus_idle_gives_way_to_a_backfill_below_min_idle(b: Backend) {
    let s = Server::start_with(b, SLOW_RESYNC);
    let api = s.admin();
    ok(api.put_yaml("/v1/pool-config/default", "max_vms: 3\n"));
    ok(api.put_yaml("/v1/environments/dev", FAKE));
    ok(api.put_yaml(
        "/v1/workspaces/a",
        "environment: dev\nmin_idle: 3\nmax_idle: 3\n",
    ));
    wait_idle(&s, "a", 3, "a fills the cap");
    // a now keeps 2 above its min_idle; b wants 2 and the cap binds.
    ok(api.patch("/v1/workspaces/a", json!({"min_idle": 1})));
    ok(api.put_yaml(
        "/v1/workspaces/b",
        "environment: dev\nmin_idle: 2\nmax_idle: 2\n",
    ));
    wait_idle(&s, "b", 2, "b's backfill");
    wait_idle(&s, "a", 1, "a keeps its min_idle");
    assert_eq!(s.vms().len(), 3, "{:#?}", s.vms());
}

fn lowered_max_vms_destroys_idle_vms_and_reports_over_cap(b: Backend) {
    let s = Server::start_with(b, SLOW_RESYNC);
    s.pool(4, FAKE, "web", "min_idle: 1\nmax_idle: 2\n");
    wait_idle(&s, "web", 1, "min_idle");
    let mut agents = vec![];
    for _ in 0..2 {
        let r = s.spawn(&s.admin_token, json!({"workspace": "web"}));
        assert_eq!(r.status, 201, "{}", r.text);
        agents.push(r.body["id"].as_str().unwrap().to_owned());
    }
    for id in &agents {
        s.wait_agent(id, "running", PROMPT);
    }
    wait_idle(&s, "web", 1, "backfill after the claims");
    let assigned = ids(&vms_in(&s, "web", "assigned"));
    assert_eq!(assigned.len(), 2);
    assert_eq!(s.status()["status"], "healthy");
    // Lowered to 1: the idle VM goes (min_idle or not), the assigned ones
    // stay, and the status says over cap while they hold it.
    ok(s.admin()
        .put_yaml("/v1/pool-config/default", "max_vms: 1\n"));
    let mut last = Value::Null;
    assert!(
        wait_until(PROMPT, || {
            last = s.status();
            last["vms"]["idle"] == 0 && last["vms"]["total"] == 2
        }),
        "the idle VM stayed over the cap: {last:#}\n{}",
        s.logs_tail()
    );
    assert_eq!(last["status"], "over_cap", "{last:#}");
    assert_eq!(ids(&vms_in(&s, "web", "assigned")), assigned);
    for id in &agents {
        let agent = s.admin().get(&format!("/v1/agents/{id}")).body;
        assert_eq!(agent["phase"], "running", "{agent}");
    }
    let out = s.cli(&s.admin_token, &["pool", "status"], "");
    assert!(
        out.stdout.starts_with(
            "Pool: default\nStatus: over_cap (2 VMs live, max_vms 1: destroying idle VMs until within the cap)\n"
        ),
        "{}",
        out.stdout
    );
    // One agent finishes: its VM is not kept warm over the cap, and the
    // tenant is within it again.
    ok(s.admin().post(
        &format!("/v1/agents/{}/finish", agents[0]),
        json!({"status": "completed"}),
    ));
    assert!(
        wait_until(PROMPT, || {
            last = s.status();
            last["vms"]["total"] == 1 && last["status"] == "healthy"
        }),
        "never back within the cap: {last:#}\n{}",
        s.logs_tail()
    );
    assert_eq!(last["vms"]["active"], 1, "{last:#}");
    let out = s.cli(&s.admin_token, &["pool", "status"], "");
    assert!(
        out.stdout.starts_with("Pool: default\nStatus: healthy\n"),
        "{}",
        out.stdout
    );
}
