//! Agents through the real server: the per-developer cap, sleep, wake,
//! resurrect, commands, the reaper, 500 concurrent spawns, crashes, and
//! commands that run on through a restart of the server.

use crate::both_backends;
use crate::common::{Backend, Server, id, wait_until};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

both_backends!(
    developer_cap_counts_active_top_level_agents,
    sleep_wake_and_resurrect,
    reaper_follows_reap_stranded_workflows,
    five_hundred_concurrent_spawns_hold_the_cap,
    kill_9_during_backfill_and_spawns_leaks_nothing,
    agent_commands_survive_a_restart_and_a_kill_9_of_the_server,
);

const SANDBOX: &str = "driver: sandbox\nmemory: 256Mi\n";
const FAST: &[&str] = &["--resync", "200ms"];

fn developer_cap_counts_active_top_level_agents(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, "driver: fake\n", "web", "min_idle: 0\n");
    s.admin().patch(
        "/v1/pool-config/default",
        json!({"max_agents_per_developer": 2}),
    );
    let dev = s.identity("dana", "developer");
    let a1 = s.spawn(&dev, json!({"workspace": "web"}));
    let a2 = s.spawn(&dev, json!({"workspace": "web"}));
    assert_eq!((a1.status, a2.status), (201, 201));
    s.wait_agent(&id(&a2.body), "running", 30);
    // Sleeping and idle agents still count.
    let slept = s
        .client(&dev)
        .post(&format!("/v1/agents/{}/sleep", id(&a1.body)), json!({}));
    assert_eq!(slept.body["phase"], "sleeping", "{}", slept.text);
    let vms_before = s.admin().get("/v1/vms?all=true").body["items"]
        .as_array()
        .unwrap()
        .len();
    let message = "you have reached your organization's limit of 2 active agents (this includes idle and sleeping agents) — contact your admin to raise the max agents per developer";
    s.spawn(&dev, json!({"workspace": "web"}))
        .assert_error(429, "RESOURCE_EXHAUSTED", message);
    let out = s.cli(&dev, &["--workspace", "web", "spawn"], "");
    assert_eq!(
        (out.code, out.stderr.trim_end()),
        (1, format!("RESOURCE_EXHAUSTED: {message}").as_str())
    );
    // Rejected before any VM is touched: passes after it boot nothing.
    s.wait_passes(3);
    assert_eq!(
        s.admin().get("/v1/vms?all=true").body["items"]
            .as_array()
            .unwrap()
            .len(),
        vms_before
    );
    // Child agents and service profiles are exempt.
    let child = s.spawn(&dev, json!({"workspace": "web", "parent": id(&a2.body)}));
    assert_eq!(
        (child.status, child.body["parent"].as_str()),
        (201, Some(id(&a2.body).as_str())),
        "{}",
        child.text
    );
    let bot = s.client(&s.admin_token).post(
        "/v1/identities",
        json!({"name": "ci-bot", "kind": "service", "role": "developer"}),
    );
    let bot_token = bot.body["token"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(s.spawn(&bot_token, json!({"workspace": "web"})).status, 201);
    }
    // Terminal agents do not count; resurrecting never counts as another.
    s.client(&dev)
        .post(&format!("/v1/agents/{}/kill", id(&a1.body)), json!({}));
    let a3 = s.spawn(&dev, json!({"workspace": "web"}));
    assert_eq!(a3.status, 201, "{}", a3.text);
    let back = s
        .client(&dev)
        .post(&format!("/v1/agents/{}/resurrect", id(&a1.body)), json!({}));
    assert_eq!(
        (back.status, back.body["id"].as_str()),
        (200, Some(id(&a1.body).as_str())),
        "{}",
        back.text
    );
    assert_eq!(back.body["resurrections"], 1);
    // 0 = unlimited.
    s.admin().patch(
        "/v1/pool-config/default",
        json!({"max_agents_per_developer": 0}),
    );
    assert_eq!(s.spawn(&dev, json!({"workspace": "web"})).status, 201);
}

fn sleep_wake_and_resurrect(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 1\nmax_idle: 2\n");
    assert!(wait_until(30, || s.status()["vms"]["idle"] == 1));
    let a = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let agent = id(&a.body);
    assert_eq!(a.body["phase"], "running");
    // Sleep gives the VM back and keeps the agent.
    let slept = s
        .admin()
        .post(&format!("/v1/agents/{agent}/sleep"), json!({}));
    assert_eq!(slept.body["phase"], "sleeping", "{}", slept.text);
    assert!(
        wait_until(30, || s.status()["vms"]["active"] == 0),
        "{}",
        s.status()
    );
    let asleep = s.admin().get(&format!("/v1/agents/{agent}")).body;
    assert_eq!(
        (asleep["phase"].as_str(), asleep["vm"].as_str()),
        (Some("sleeping"), None),
        "{asleep}"
    );
    // Wake claims a VM again.
    let woken = s
        .admin()
        .post(&format!("/v1/agents/{agent}/wake"), json!({}));
    assert_eq!(woken.status, 200, "{}", woken.text);
    s.wait_agent(&agent, "running", 30);
    s.admin()
        .post(&format!("/v1/agents/{agent}/wake"), json!({}))
        .assert_error(
            409,
            "FAILED_PRECONDITION",
            &format!("cannot wake agent {agent}: it is running"),
        );
    // on_idle decides what a pause does.
    let t = s.spawn(
        &s.admin_token,
        json!({"workspace": "web", "on_idle": "terminate"}),
    );
    s.wait_agent(&id(&t.body), "running", 30);
    let r = s
        .admin()
        .post(&format!("/v1/agents/{}/idle", id(&t.body)), json!({}));
    assert_eq!(r.body["phase"], "completed", "{}", r.text);
    let k = s.spawn(
        &s.admin_token,
        json!({"workspace": "web", "on_idle": "keep-alive"}),
    );
    s.wait_agent(&id(&k.body), "running", 30);
    let r = s
        .admin()
        .post(&format!("/v1/agents/{}/idle", id(&k.body)), json!({}));
    assert_eq!(
        (r.body["phase"].as_str(), r.body["vm"].is_string()),
        (Some("idle"), true),
        "{}",
        r.text
    );
    // A command: the agent ends with it.
    let c = s.spawn(
        &s.admin_token,
        json!({"workspace": "web", "command": "echo out; echo err >&2; test -d /home"}),
    );
    let done = s.wait_agent(&id(&c.body), "completed", 30);
    assert_eq!(done["exit_code"], 0);
    assert!(done["output"].as_str().unwrap().contains("out"), "{done}");
    // Resurrect keeps the id and runs again.
    let again = s
        .admin()
        .post(&format!("/v1/agents/{}/resurrect", id(&c.body)), json!({}));
    assert_eq!(
        (
            again.body["id"].as_str(),
            again.body["resurrections"].as_i64()
        ),
        (c.body["id"].as_str(), Some(1)),
        "{}",
        again.text
    );
    s.wait_agent(&id(&c.body), "completed", 30);
    let out = s.cli(&s.admin_token, &["agents", "list", "--all"], "");
    assert!(out.stdout.starts_with("ID"), "{out:?}");
    assert!(out.stdout.contains(&agent), "{out:?}");
    let out = s.cli(&s.admin_token, &["agents", "kill", &agent], "");
    assert_eq!(out.stdout, format!("agent/{agent} killed\n"), "{out:?}");
}

fn reaper_follows_reap_stranded_workflows(b: Backend) {
    let mut s = Server::start_with(
        b,
        &["--resync", "100ms", "--build", "b1", "--reap-after", "1s"],
    );
    s.pool(10, SANDBOX, "web", "min_idle: 0\n");
    let a = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    let agent = id(&a.body);
    assert_eq!(a.body["build"], "b1");
    s.wait_agent(&agent, "running", 30);
    // A new build starts; the old one is retired.
    s.stop();
    let mut args: Vec<String> = vec![
        "--resync".into(),
        "100ms".into(),
        "--build".into(),
        "b2".into(),
        "--reap-after".into(),
        "1s".into(),
    ];
    s.set_extra(&mut args);
    s.launch();
    let r = s.admin().post("/v1/builds/b1/retire", json!({}));
    assert_eq!(r.status, 200, "{}", r.text);
    let builds = s.admin().get("/v1/builds");
    assert_eq!(
        builds.body["items"].as_array().unwrap().len(),
        2,
        "{}",
        builds.text
    );
    // dry_run (the default): detected and reported, never terminated.
    assert!(
        wait_until(10, || s.status()["reaper"]["stranded"] == 1),
        "{}",
        s.status()
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        s.admin().get(&format!("/v1/agents/{agent}")).body["phase"],
        "running"
    );
    assert!(s.logs().contains("stranded workflow on a retired build"));
    // disabled, and any unrecognized value: not even detected.
    for value in ["disabled", "sometimes"] {
        s.admin().patch(
            "/v1/pool-config/default",
            json!({"reap_stranded_workflows": value}),
        );
        assert_eq!(s.status()["reaper"]["stranded"], 0);
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert_eq!(
            s.admin().get(&format!("/v1/agents/{agent}")).body["phase"],
            "running"
        );
    }
    // enabled: terminated once stranded longer than the grace period.
    s.admin().patch(
        "/v1/pool-config/default",
        json!({"reap_stranded_workflows": "enabled"}),
    );
    let done = s.wait_agent(&agent, "killed", 30);
    assert!(
        done["error"].as_str().unwrap().contains("stranded"),
        "{done}"
    );
    // Agents on the current build are never stranded.
    let fresh = s.spawn(&s.admin_token, json!({"workspace": "web"}));
    assert_eq!(fresh.body["build"], "b2");
    // It starts (on a cold boot, or on the old agent's VM once reset), and
    // past the grace period the reaper still leaves it alone.
    s.wait_agent(&id(&fresh.body), "running", 30);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        s.admin()
            .get(&format!("/v1/agents/{}", id(&fresh.body)))
            .body["phase"],
        "running"
    );
    let out = s.cli(&s.admin_token, &["builds", "list"], "");
    assert!(
        out.stdout.contains("b1") && out.stdout.contains("b2"),
        "{out:?}"
    );
}

fn five_hundred_concurrent_spawns_hold_the_cap(b: Backend) {
    // The fake driver: this is about claims and the cap, through the real
    // server, store and HTTP, at a size this machine cannot run real VMs at.
    let s = Server::start_with(b, FIVE_HUNDRED);
    five_hundred_spawns(&s, &[&s]);
}

const FIVE_HUNDRED: &[&str] = &["--resync", "100ms", "--max-concurrent-boots", "50"];

/// The same 500 spawns, half through each of two replicas on one
/// PostgreSQL database: the second has no node of its own and reaches the
/// first one's embedded node.
#[test]
fn five_hundred_concurrent_spawns_on_two_replicas_hold_the_cap() {
    let first = Server::start_with(Backend::Postgres, FIVE_HUNDRED);
    let mut extra = FIVE_HUNDRED.to_vec();
    extra.push("--no-local-node");
    let second = Server::replica_of(&first, &extra);
    five_hundred_spawns(&first, &[&first, &second]);
}

/// 500 spawns from 25 threads spread over `replicas`, against a pool of
/// 100 warm fake VMs under max_vms 150 seeded through `s`.
fn five_hundred_spawns(s: &Server, replicas: &[&Server]) {
    s.pool(
        150,
        "driver: fake\n",
        "web",
        "min_idle: 100\nmax_idle: 100\n",
    );
    assert!(
        wait_until(60, || s.status()["vms"]["idle"] == 100),
        "{}",
        s.status()
    );
    let token = s.admin_token.clone();
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    // Sample the VM count while the spawns run.
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (stop, max_seen, api) = (stop.clone(), max_seen.clone(), s.admin());
        std::thread::spawn(move || {
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) {
                let st = api.get("/v1/pool/status").body;
                max_seen.fetch_max(st["vms"]["total"].as_i64().unwrap_or(0), Ordering::Relaxed);
                samples += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            samples
        })
    };
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..25)
        .map(|t| {
            let url = urls[t % urls.len()].clone();
            let (token, results) = (token.clone(), results.clone());
            std::thread::spawn(move || {
                let api = crate::common::Api {
                    base: url,
                    token: Some(token),
                };
                for _ in 0..20 {
                    let r = api.post("/v1/agents", json!({"workspace": "web"}));
                    assert_eq!(r.status, 201, "{}", r.text);
                    results.lock().unwrap().push(r.body);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let spawned = results.lock().unwrap().clone();
    assert_eq!(spawned.len(), 500);
    let warm_claims: Vec<&str> = spawned
        .iter()
        .filter(|a| a["phase"] == "running")
        .map(|a| a["vm"].as_str().unwrap())
        .collect();
    let unique: HashSet<&&str> = warm_claims.iter().collect();
    assert_eq!(
        unique.len(),
        warm_claims.len(),
        "a warm VM was handed out twice"
    );
    assert!(!warm_claims.is_empty() && warm_claims.len() <= 150);
    // Finish running agents until all 500 have run; each VM holds one agent at a time.
    let ids: Vec<String> = spawned.iter().map(id).collect();
    let mut finished = HashSet::new();
    let ok = wait_until(240, || {
        let agents = s.admin().get("/v1/agents").body["items"]
            .as_array()
            .unwrap()
            .clone();
        let mut on_vm: HashMap<String, usize> = HashMap::new();
        for a in &agents {
            if a["phase"] == "running" {
                *on_vm
                    .entry(a["vm"].as_str().unwrap().to_owned())
                    .or_default() += 1;
                let aid = id(a);
                if finished.insert(aid.clone()) {
                    s.admin().post(
                        &format!("/v1/agents/{aid}/finish"),
                        json!({"status": "completed"}),
                    );
                }
            }
        }
        assert!(
            on_vm.values().all(|n| *n == 1),
            "two running agents share a VM"
        );
        agents.iter().filter(|a| a["phase"] == "completed").count() == 500
    });
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    assert!(ok, "not every spawn ran: {}", s.status());
    assert!(
        ids.iter().all(|i| finished.contains(i)),
        "every spawn ended running, none lost"
    );
    assert!(samples > 10, "the sampler ran ({samples} samples)");
    assert!(
        max_seen.load(Ordering::Relaxed) <= 150,
        "max_vms exceeded: {}",
        max_seen.load(Ordering::Relaxed)
    );
    let total = s.admin().get("/v1/vms?all=true").body["items"]
        .as_array()
        .unwrap()
        .len();
    assert!(
        total >= 150,
        "cold boots happened beyond the warm 100 ({total} VMs in all)"
    );
}

fn kill_9_during_backfill_and_spawns_leaks_nothing(b: Backend) {
    let mut s = Server::start_with(b, FAST);
    s.pool(8, SANDBOX, "web", "min_idle: 4\nmax_idle: 4\n");
    // Killed during backfill.
    assert!(wait_until(30, || s.status()["vms"]["booting"]
        .as_i64()
        .unwrap_or(0)
        > 0
        || s.status()["vms"]["idle"].as_i64().unwrap_or(0) > 0));
    s.kill();
    s.launch();
    assert!(
        wait_until(60, || s.status()["vms"]["idle"] == 4
            && s.status()["vms"]["booting"] == 0),
        "{}",
        s.status()
    );
    // Killed during spawns (some warm, some cold, some queued).
    let spawned: Vec<String> = (0..6)
        .map(|_| id(&s.spawn(&s.admin_token, json!({"workspace": "web"})).body))
        .collect();
    s.kill();
    s.launch();
    // No agent lost: every one is known, and each ends running (or failed
    // with a reason when its VM vanished), none stuck.
    let ok = wait_until(60, || {
        spawned.iter().all(|a| {
            let phase = s.admin().get(&format!("/v1/agents/{a}")).body["phase"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            phase == "running" || phase == "failed"
        })
    });
    assert!(ok, "agents stuck after a restart:\n{}", s.logs_tail());
    // No leaked sandbox: what runs is exactly what the store records.
    assert!(wait_until(30, || s.status()["vms"]["booting"] == 0
        && s.status()["vms"]["draining"] == 0));
    let mut live: Vec<String> = s.vms().iter().map(id).collect();
    live.sort();
    assert!(
        wait_until(10, || s.sandboxes() == live),
        "store {live:?} vs sandboxes {:?}",
        s.sandboxes()
    );
    assert!(live.len() <= 8);
    // And nothing at all once the pool is nuked.
    s.cli(&s.admin_token, &["pool", "flush", "--nuke"], "");
    assert!(
        wait_until(30, || s.sandboxes().is_empty()),
        "{:?}",
        s.sandboxes()
    );
    for vm in &live {
        assert!(
            !std::path::Path::new(&format!("/sys/fs/cgroup/memory/hearth/{vm}")).exists(),
            "cgroup of {vm} left"
        );
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(vm.as_str()), "mount of {vm} left");
        let leftover = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                std::fs::read_to_string(e.path().join("cmdline"))
                    .is_ok_and(|c| c.contains(vm.as_str()))
            });
        assert!(!leftover, "a process of {vm} is alive");
    }
}

/// An agent's command runs as a job in its sandbox: the server stopped
/// (SIGTERM) or killed (kill -9) while it runs, then started again on the
/// same data dir, re-attaches, and the agent ends with the command's exit
/// code and its whole output, never failed by the restart. The command
/// waits for a file that the test writes only after the restart, so it
/// really ran across it.
fn agent_commands_survive_a_restart_and_a_kill_9_of_the_server(b: Backend) {
    let mut s = Server::start_with(b, FAST);
    s.pool(10, SANDBOX, "web", "min_idle: 2\nmax_idle: 2\n");
    assert!(
        wait_until(60, || s.status()["vms"]["idle"] == 2),
        "{}",
        s.status()
    );
    let command = "echo before; touch /tmp/started; \
                   while [ ! -e /tmp/go ]; do sleep 0.1; done; echo after; exit 7";
    for (round, crash) in [false, true].into_iter().enumerate() {
        let spawned = s.spawn(
            &s.admin_token,
            json!({"workspace": "web", "command": command}),
        );
        assert_eq!(spawned.status, 201, "{}", spawned.text);
        let agent = id(&spawned.body);
        s.wait_agent(&agent, "running", 60);
        let exec = |s: &Server, command: &str| {
            s.admin()
                .post(
                    &format!("/v1/agents/{agent}/exec"),
                    json!({"command": command}),
                )
                .body["exit_code"]
                .as_i64()
        };
        assert!(
            wait_until(30, || exec(&s, "test -e /tmp/started") == Some(0)),
            "the command never started:\n{}",
            s.logs_tail()
        );
        if crash {
            s.kill();
        } else {
            assert!(s.stop().success(), "{}", s.logs_tail());
        }
        s.launch();
        let back = s.admin().get(&format!("/v1/agents/{agent}")).body;
        assert_eq!(back["phase"], "running", "after the restart: {back}");
        assert_eq!(exec(&s, "touch /tmp/go"), Some(0));
        let done = s.wait_agent(&agent, "failed", 60);
        assert_eq!(done["exit_code"], 7, "{done}");
        let output = done["output"].as_str().unwrap_or_default();
        assert_eq!(output, "before\nafter\n", "{done}");
        let error = done["error"].as_str().unwrap_or_default();
        assert!(!error.contains("restarted"), "{done}");
        // SQLite: adoption at start re-attaches; PostgreSQL: the
        // takeover of the tenant when the restarted replica leads it.
        let logs = s.logs();
        let reattached = logs.matches("\"agents_reattached\":1").count()
            + logs.matches("commands_resumed: 1").count();
        assert!(
            reattached > round,
            "nothing re-attached the command:\n{}",
            s.logs_tail()
        );
    }
}
