//! The event log through the real server: concurrent spawns followed on
//! `/v1/events/stream` from the start arrive in order and equal the final
//! `GET /v1/events` listing (also with the stream on one replica and the
//! spawns on another), resource writes name their actor, the CLI lists
//! and follows, retention prunes, and the rules of who may read.

use crate::both_backends;
use crate::common::{Backend, Server, binary, trusted_ca, wait_until};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

both_backends!(
    concurrent_spawns_stream_in_order_and_equal_the_listing,
    resource_writes_name_their_actor_and_readers_are_checked,
    the_cli_lists_and_follows_events,
    retention_prunes_old_events,
);

/// Spawns at once: more than the warm VMs, so some queue and cold-boot.
const SPAWNS: usize = 20;
const WARM: usize = 15;

/// A follower of `/v1/events/stream` in a thread: every frame it has read,
/// as (id, kind, Event JSON).
struct Follower {
    frames: Arc<Mutex<Vec<(i64, String, Value)>>>,
}

impl Follower {
    fn start(url: &str, token: &str, query: &str) -> Follower {
        let mut builder = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .timeout(None);
        if let Some(ca) = trusted_ca(url) {
            let pem = std::fs::read(&ca).unwrap();
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        let client = builder.build().unwrap();
        let response = client
            .get(format!("{url}/v1/events/stream{query}"))
            .bearer_auth(token)
            .send()
            .expect("the stream opens");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let frames = Arc::new(Mutex::new(Vec::new()));
        let sink = frames.clone();
        // The thread ends when the server goes away (the test's end).
        std::thread::spawn(move || {
            let (mut id, mut kind) = (None, None);
            for line in BufReader::new(response).lines() {
                let Ok(line) = line else { return };
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse::<i64>().unwrap());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    kind = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    let event: Value = serde_json::from_str(v).unwrap();
                    let (id, kind) = (id.take().unwrap(), kind.take().unwrap());
                    assert_eq!(event["id"], id);
                    assert_eq!(event["kind"], kind.as_str());
                    sink.lock().unwrap().push((id, kind, event));
                }
            }
        });
        Follower { frames }
    }

    fn frames(&self) -> Vec<(i64, String, Value)> {
        self.frames.lock().unwrap().clone()
    }
}

/// Every event of the tenant, page by page.
fn listing(s: &Server) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let r = s
            .admin()
            .get(&format!("/v1/events?after={after}&limit=100"));
        assert_eq!(r.status, 200, "{}", r.text);
        let page = r.body["events"].as_array().unwrap().clone();
        if page.is_empty() {
            assert_eq!(r.body["next"], after);
            return all;
        }
        after = r.body["next"].as_i64().unwrap();
        assert_eq!(page.last().unwrap()["id"], after);
        all.extend(page);
    }
}

fn concurrent_spawns_stream_in_order_and_equal_the_listing(b: Backend) {
    let s = Server::start_with(b, &["--resync", "200ms"]);
    spawns_followed(&s, &s);
}

/// The stream on one replica, the spawns (and the pool) on the other.
#[test]
fn spawns_on_one_replica_stream_in_order_on_another() {
    let first = Server::start_with(Backend::Postgres, &["--resync", "200ms"]);
    let second = Server::replica_of(&first, &["--resync", "200ms", "--no-local-node"]);
    spawns_followed(&first, &second);
}

/// Spawns [`SPAWNS`] agents at once through `spawner` on a pool of
/// [`WARM`] warm fake VMs while following the stream on `follower` from
/// the start; then kills them all.
fn spawns_followed(spawner: &Server, follower: &Server) {
    spawner.pool(
        40,
        "driver: fake\n",
        "web",
        &format!("min_idle: {WARM}\nmax_idle: {WARM}\n"),
    );
    assert!(
        wait_until(60, || spawner.status()["vms"]["idle"] == WARM),
        "{}",
        spawner.status()
    );
    let stream = Follower::start(&follower.url, &follower.admin_token, "?after=0");
    let threads: Vec<_> = (0..SPAWNS)
        .map(|_| {
            let api = spawner.admin();
            std::thread::spawn(move || {
                let r = api.post("/v1/agents", json!({"workspace": "web"}));
                assert_eq!(r.status, 201, "{}", r.text);
                r.body["id"].as_str().unwrap().to_owned()
            })
        })
        .collect();
    let agents: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for agent in &agents {
        spawner.wait_agent(agent, "running", 60);
    }
    for agent in &agents {
        let r = spawner
            .admin()
            .post(&format!("/v1/agents/{agent}/kill"), json!({}));
        assert!(r.status < 300, "{}", r.text);
    }
    // Every agent's end reaches the stream.
    let killed =
        |frames: &[(i64, String, Value)]| frames.iter().filter(|f| f.1 == "agent.killed").count();
    assert!(
        wait_until(30, || killed(&stream.frames()) == SPAWNS),
        "the stream saw {} of {SPAWNS} kills: {:#?}",
        killed(&stream.frames()),
        stream.frames().iter().map(|f| &f.1).collect::<Vec<_>>()
    );
    // Nothing missed: the stream holds exactly the listing, in its order,
    // up to the last event listed.
    let listed = listing(spawner);
    let last = listed.last().unwrap()["id"].as_i64().unwrap();
    assert!(wait_until(10, || stream
        .frames()
        .last()
        .is_some_and(|f| f.0 >= last)));
    let streamed: Vec<Value> = stream
        .frames()
        .into_iter()
        .filter(|f| f.0 <= last)
        .map(|f| f.2)
        .collect();
    assert_eq!(streamed.len(), listed.len());
    assert_eq!(streamed, listed);
    assert!(
        streamed
            .windows(2)
            .all(|w| w[0]["id"].as_i64() < w[1]["id"].as_i64())
    );
    // Each agent's phases arrive in order, each `from` the one before.
    let mut phases: HashMap<String, Vec<(String, Value)>> = HashMap::new();
    for e in &streamed {
        if let Some(agent) = e["subject"].as_str().unwrap().strip_prefix("agent/") {
            let kind = e["kind"].as_str().unwrap().trim_start_matches("agent.");
            phases
                .entry(agent.to_owned())
                .or_default()
                .push((kind.to_owned(), e["data"]["from"].clone()));
        }
    }
    let mut cold = 0;
    for agent in &agents {
        let seen = &phases[agent];
        let names: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            names == ["running", "killed"]
                || names == ["queued", "provisioning", "running", "killed"]
                || names == ["queued", "running", "killed"],
            "agent {agent}: {seen:?}"
        );
        if names[0] == "queued" {
            cold += 1;
        }
        assert_eq!(seen[0].1, Value::Null, "agent {agent}: {seen:?}");
        for w in seen.windows(2) {
            assert_eq!(w[1].1, json!(w[0].0), "agent {agent}: {seen:?}");
        }
    }
    assert!(cold >= SPAWNS - WARM, "{cold} cold starts: {phases:#?}");
    // Each warm assignment has its VM event before the agent's.
    let vm_assigned = streamed
        .iter()
        .filter(|e| e["kind"] == "vm.assigned")
        .count();
    assert!(vm_assigned >= SPAWNS, "{vm_assigned} vm.assigned");
}

fn resource_writes_name_their_actor_and_readers_are_checked(b: Backend) {
    let s = Server::start(b);
    let ops = s.identity("olive", "operator");
    let viewer = s.identity("vic", "viewer");
    let r = s
        .client(&ops)
        .put_yaml("/v1/environments/dev", "driver: fake\n");
    assert!(r.status < 300, "{}", r.text);
    let r = s.client(&ops).delete("/v1/environments/dev");
    assert!(r.status < 300, "{}", r.text);
    let r = s.client(&viewer).get("/v1/events?type=resource");
    assert_eq!(r.status, 200, "{}", r.text);
    let events = r.body["events"].as_array().unwrap();
    let of = |kind: &str| {
        events
            .iter()
            .find(|e| e["kind"] == kind && e["subject"] == "environment/dev")
            .unwrap_or_else(|| panic!("no {kind}: {events:#?}"))
    };
    assert_eq!(of("resource.written")["actor"], "olive");
    assert_eq!(of("resource.written")["data"]["version"], 1);
    assert_eq!(of("resource.deleted")["actor"], "olive");
    assert!(
        events
            .iter()
            .all(|e| e["kind"].as_str().unwrap().starts_with("resource."))
    );
    // Unknown types name themselves; bad cursors and limits too.
    s.admin()
        .get("/v1/events?type=vm,vm.exploded")
        .assert_error_naming(
            400,
            "INVALID_ARGUMENT",
            "unknown event type \"vm.exploded\"",
        );
    s.admin()
        .get("/v1/events/stream?type=nope")
        .assert_error_naming(400, "INVALID_ARGUMENT", "unknown event type \"nope\"");
    let r = s.admin().get("/v1/events?limit=0");
    r.assert_error(400, "INVALID_ARGUMENT", "limit: between 1 and 1000, not 0");
    let r = s.admin().get("/v1/events?after=-1");
    r.assert_error(
        400,
        "INVALID_ARGUMENT",
        "after: an event id is 0 or more, not -1",
    );
    // Anonymous may not read, as a list or a stream.
    let anonymous = crate::common::Api::anonymous(&s.url);
    assert_eq!(anonymous.get("/v1/events").status, 401);
    assert_eq!(anonymous.get("/v1/events/stream").status, 401);
    // Another tenant's events are not ours.
    let r = s
        .admin()
        .post("/v1/tenants", json!({"name": "other", "admin": "boss"}));
    assert!(r.status < 300, "{}", r.text);
    let other = r.body["token"].as_str().unwrap().to_owned();
    let theirs = s.client(&other).get("/v1/events?type=resource").body;
    assert!(
        theirs["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["subject"] != "environment/dev"),
        "{theirs}"
    );
}

fn the_cli_lists_and_follows_events(b: Backend) {
    let s = Server::start(b);
    s.pool(5, "driver: fake\n", "web", "min_idle: 1\nmax_idle: 1\n");
    assert!(wait_until(30, || s.status()["vms"]["idle"] == 1));
    let out = s.cli(&s.admin_token, &["events", "--type", "vm"], "");
    assert_eq!(out.code, 0, "{out:?}");
    let mut lines = out.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "TIME", "KIND", "SUBJECT", "ACTOR", "DETAILS"]
    );
    let rows: Vec<&str> = lines.collect();
    assert!(rows.iter().any(|l| l.contains("vm.booting")), "{out:?}");
    assert!(rows.iter().any(|l| l.contains("vm.ready")), "{out:?}");
    assert!(rows.iter().all(|l| l.contains(" vm.")), "{out:?}");
    let json_out = s.cli(
        &s.admin_token,
        &["events", "--type", "resource", "-o", "json"],
        "",
    );
    let listed: Value = serde_json::from_str(&json_out.stdout).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["subject"] == "workspace/web")
    );

    // --follow prints what happens after it started.
    let mut cmd = Command::new(binary());
    cmd.args(["events", "--follow", "--type", "pool"])
        .env("HEARTH_SERVER", &s.url)
        .env("HEARTH_TOKEN", &s.admin_token)
        .env_remove("HEARTH_WORKSPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ca) = trusted_ca(&s.url) {
        cmd.env("HEARTH_CA", ca);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert!(first.starts_with("ID "), "{first}");
    let r = s.admin().post("/v1/pool/flush", json!({}));
    assert!(r.status < 300, "{}", r.text);
    let line = rx.recv_timeout(std::time::Duration::from_secs(10));
    // The follower is ours: end it by its pid.
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("--follow printed the flush");
    assert!(line.contains("pool.flushed"), "{line}");
    assert!(line.contains("pool/default"), "{line}");
    assert!(line.contains(" admin "), "{line}");
    assert!(line.contains("flushed=1"), "{line}");
}

fn retention_prunes_old_events(b: Backend) {
    let s = Server::start_with(b, &["--event-retention", "2s"]);
    let r = s.admin().put_yaml("/v1/environments/dev", "driver: fake\n");
    assert!(r.status < 300, "{}", r.text);
    assert!(!listing(&s).is_empty());
    assert!(
        wait_until(20, || listing(&s).is_empty()),
        "events outlived a 2s retention: {:#?}",
        listing(&s)
    );
    // A bad window is refused at start, naming the flag's value.
    let out = std::process::Command::new(binary())
        .args(["server", "--event-retention", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"soon\" is not a duration"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
