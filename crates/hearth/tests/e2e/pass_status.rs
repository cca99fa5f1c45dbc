//! The pass status (`pass` of `GET /v1/pool/status` and `hearth pool status
//! -o json`) through the real server: each pass's iteration grows, what
//! woke it is named, its actions are counted by kind; a replica that does
//! not lead the tenant shows the leader's last pass that acted, as kept in
//! PostgreSQL. `--resync 10m`: nothing here is the resync's doing.

use crate::both_backends;
use crate::common::{Backend, Server, wait_until};
use serde_json::{Value, json};

both_backends!(each_pass_says_what_woke_it_and_what_it_did);

const SLOW_RESYNC: &[&str] = &["--resync", "10m"];
const FAKE: &str = "driver: fake\n";

fn idle(s: &Server) -> i64 {
    s.status()["vms"]["idle"].as_i64().unwrap()
}

fn boots(pass: &Value) -> u64 {
    pass["totals"]["actions"]["boot"].as_u64().unwrap()
}

fn each_pass_says_what_woke_it_and_what_it_did(b: Backend) {
    let s = Server::start_with(b, SLOW_RESYNC);
    s.pool(10, FAKE, "web", "min_idle: 0\nmax_idle: 2\n");
    let first = s.wait_pass_past(0, 10);
    assert_eq!(first["source"], "live", "{first:#}");
    assert!(first["replica"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(boots(&first), 0, "min_idle 0 boots nothing: {first:#}");

    // A workspace change through the API: its pass boots the two VMs.
    let before = first["iteration"].as_u64().unwrap();
    let r = s.admin().put_yaml(
        "/v1/workspaces/web",
        "environment: dev\nmin_idle: 2\nmax_idle: 2\n",
    );
    assert!(r.status < 300, "{}", r.text);
    assert!(wait_until(10, || idle(&s) == 2), "{}", s.status());
    let after = s.wait_pass_past(before, 10);
    assert_eq!(boots(&after), 2, "the boots are counted: {after:#}");
    assert!(
        after["totals"]["wakes"]["api"].as_u64().unwrap()
            > first["totals"]["wakes"]["api"].as_u64().unwrap(),
        "{after:#}"
    );
    // The boots' ends woke passes of their own.
    assert!(
        wait_until(10, || s.pass()["totals"]["wakes"]["task"].as_u64()
            >= Some(2)),
        "{}",
        s.pass()
    );

    // `pool up` names itself; a pass with nothing to do counts nothing.
    let r = s.admin().post("/v1/pool/up", json!({}));
    assert!(r.status < 300, "{}", r.text);
    let mut up = Value::Null;
    assert!(
        wait_until(10, || {
            up = s.pass();
            up["woken_by"] == "pool_up"
        }),
        "{up:#}"
    );
    assert!(up["iteration"].as_u64() > after["iteration"].as_u64());
    assert_eq!(up["actions"]["boot"], 0, "{up:#}");
    assert_eq!((up["errors"].as_u64(), boots(&up)), (Some(0), 2), "{up:#}");
    assert!(up["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0));

    // The CLI shows the same, as JSON and as one line of text.
    let out = s.cli(&s.admin_token, &["pool", "status", "-o", "json"], "");
    assert_eq!(out.code, 0, "{out:?}");
    let shown: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        shown["pass"]["iteration"].as_u64() >= up["iteration"].as_u64(),
        "{shown:#}"
    );
    let out = s.cli(&s.admin_token, &["pool", "status"], "");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("Pass: "))
        .unwrap_or_else(|| panic!("no pass line: {}", out.stdout));
    assert!(line.contains(" woken by "), "{line}");
}

#[test]
fn a_replica_that_does_not_lead_shows_the_leaders_pass() {
    let leader = Server::start_with(Backend::Postgres, SLOW_RESYNC);
    let mut extra = SLOW_RESYNC.to_vec();
    extra.push("--no-local-node");
    let other = Server::replica_of(&leader, &extra);
    leader.pool(10, FAKE, "web", "min_idle: 2\nmax_idle: 3\n");
    assert!(wait_until(20, || idle(&leader) == 2), "{}", leader.status());
    let live = leader.pass();
    assert_eq!(live["source"], "live", "{live:#}");
    let replica = live["replica"].as_str().unwrap().to_owned();
    // The other's view: the leader's last pass that acted, from the store.
    let mut kept = Value::Null;
    assert!(
        wait_until(10, || {
            kept = other.pass();
            kept["source"] == "stored" && kept["totals"]["actions"]["boot"] == 2
        }),
        "{kept:#}"
    );
    assert_eq!(kept["replica"], replica.as_str(), "{kept:#}");
    assert!(kept["iteration"].as_u64() <= leader.pass()["iteration"].as_u64());

    // A write through the other replica wakes the leader (its NOTIFY); the
    // pass that boots the third VM is kept, and the other shows it.
    let r = other.admin().put_yaml(
        "/v1/workspaces/web",
        "environment: dev\nmin_idle: 3\nmax_idle: 3\n",
    );
    assert!(r.status < 300, "{}", r.text);
    assert!(
        wait_until(10, || {
            kept = other.pass();
            kept["totals"]["actions"]["boot"] == 3
        }),
        "{kept:#}\n{}",
        leader.logs_tail()
    );
    assert_eq!(
        (kept["woken_by"].as_str(), kept["actions"]["boot"].as_u64()),
        (Some("replica"), Some(1)),
        "{kept:#}"
    );
    assert_eq!(kept["replica"], replica.as_str());
    assert!(wait_until(10, || idle(&leader) == 3));
}
