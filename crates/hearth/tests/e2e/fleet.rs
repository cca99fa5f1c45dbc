//! A fleet on one machine: two or three `hearth server` replicas on one
//! PostgreSQL database and three `hearth node` processes, each node in a
//! network namespace of its own with its own address on a bridge the test
//! makes (and removes). Faults run for real — kill -9 of the reconciling
//! replica, kill -9 of a node, a node cut off by a firewall rule in its
//! namespace and healed, a restart of every server while agents run
//! commands — each several times, and after every one the invariants are
//! checked against the database and the nodes' real sandboxes: no VM
//! assigned twice, the cap never exceeded, no VM leaked on any node, no
//! agent lost, no agent failed by a control-plane restart.

use crate::common::{Server, block_on, guest_agent, id, wait_until};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The fleet's timings: short, so a fault plays out in seconds.
const HEARTBEAT: &str = "250ms";
const NODE_TIMEOUT: &str = "2s";
const LOST_AFTER: &str = "6s";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nft_in(ns: &str, script: &str) -> bool {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nft runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

/// A bridge on this host (`10.240.<x>.1/24`) and one network namespace per
/// node, each with a veth on the bridge (`10.240.<x>.<10 + i>`). Removed
/// when dropped.
struct Hosts {
    x: u8,
    bridge: String,
    namespaces: Vec<String>,
}

impl Hosts {
    fn create(nodes: usize) -> Hosts {
        // A free /24 of our own: the bridge's name claims it (`ip link add`
        // fails when another test holds it).
        let start = (std::process::id() % 100) as u8;
        let x = (0..100u8)
            .map(|k| 100 + (start + k) % 100)
            .find(|x| {
                Command::new("ip")
                    .args(["link", "add", &format!("hfb{x}"), "type", "bridge"])
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            })
            .expect("a free test subnet");
        let bridge = format!("hfb{x}");
        let mut hosts = Hosts {
            x,
            bridge: bridge.clone(),
            namespaces: Vec::new(),
        };
        ip(&["addr", "add", &format!("10.240.{x}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 0..nodes {
            let ns = format!("hfb{x}n{i}");
            ip(&["netns", "add", &ns]);
            hosts.namespaces.push(ns.clone());
            let host_end = format!("hfb{x}v{i}");
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &host_end, "master", &bridge, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", hosts.node_ip(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &hosts.host_ip(),
            ]);
        }
        hosts
    }

    fn host_ip(&self) -> String {
        format!("10.240.{}.1", self.x)
    }

    fn node_ip(&self, i: usize) -> String {
        format!("10.240.{}.{}", self.x, 10 + i)
    }

    /// Cuts node `i` off the control plane: a firewall rule in its
    /// namespace drops everything to and from the host's address.
    fn cut(&self, i: usize) {
        let host = self.host_ip();
        assert!(nft_in(
            &self.namespaces[i],
            &format!(
                "table inet hearthcut {{\n\
                 chain input {{ type filter hook input priority -10; ip saddr {host} drop; }}\n\
                 chain output {{ type filter hook output priority -10; ip daddr {host} drop; }}\n\
                 }}\n"
            ),
        ));
    }

    fn heal(&self, i: usize) {
        assert!(nft_in(&self.namespaces[i], "delete table inet hearthcut\n"));
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// A free TCP port on `ip` (bound and released; the fleet's processes
/// bind it again on every start, so a restarted one keeps its address).
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `hearth node` in its namespace.
struct Node {
    name: String,
    ns: String,
    data_dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
}

impl Node {
    fn launch(&mut self) {
        assert!(self.child.is_none());
        let mut cmd = Command::new("ip");
        // `ip netns exec` execs the binary: the child's pid is the node's.
        cmd.args(["netns", "exec", &self.ns, crate::common::binary(), "node"])
            .args(&self.args)
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .env("HEARTH_GUEST_AGENT", guest_agent())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("hearth node starts");
        let stderr = child.stderr.take().unwrap();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut logs = logs.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The sandboxes that really exist on this node (their folders).
    fn sandboxes(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.data_dir.path().join("sandboxes"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| uuid::Uuid::parse_str(n).is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn logs_tail(&self) -> String {
        let logs = self.logs.lock().unwrap();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let dir = self.data_dir.path().join("sandboxes");
        let ids: Vec<String> = self.sandboxes().into_iter().collect();
        if !ids.is_empty() {
            crate::common::destroy_sandboxes(&dir, &ids);
        }
    }
}

/// Replicas, nodes, and what the test watches while faults run.
struct Fleet {
    // Dropped in this order: nodes (their VMs destroyed), replicas, then
    // the namespaces.
    nodes: Vec<Node>,
    replicas: Vec<Server>,
    hosts: Hosts,
    _ca: tempfile::TempDir,
    max_vms: i64,
    max_seen: Arc<AtomicI64>,
    stop_sampler: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<usize>>,
}

impl Fleet {
    fn start(replicas: usize, nodes: usize) -> Fleet {
        let hosts = Hosts::create(nodes);
        let host = hosts.host_ip();
        let timings = [
            "--no-local-node",
            "--node-heartbeat",
            HEARTBEAT,
            "--node-timeout",
            NODE_TIMEOUT,
            "--node-lost-after",
            LOST_AFTER,
            "--resync",
            "1s",
        ];
        let listen = |k: usize| -> Vec<String> {
            let mut args: Vec<String> = vec![
                "--listen".into(),
                format!("{host}:{}", free_port(&host)),
                "--replica-id".into(),
                format!("r{k}"),
            ];
            args.extend(timings.iter().map(|s| s.to_string()));
            args
        };
        let first_args = listen(0);
        let first_refs: Vec<&str> = first_args.iter().map(String::as_str).collect();
        let first = Server::start_with(crate::common::Backend::Postgres, &first_refs);
        let mut servers = vec![first];
        for k in 1..replicas {
            let args = listen(k);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let replica = Server::replica_of(&servers[0], &refs);
            servers.push(replica);
        }
        // Nodes trust every replica's CA.
        let ca = tempfile::tempdir().unwrap();
        let bundle = ca.path().join("servers.pem");
        let mut pem = String::new();
        for s in &servers {
            pem.push_str(&std::fs::read_to_string(s.ca.as_ref().expect("TLS")).unwrap());
        }
        std::fs::write(&bundle, pem).unwrap();
        let join_token = servers[0].data_dir.path().join("join-token");
        let mut fleet = Fleet {
            nodes: Vec::new(),
            replicas: servers,
            hosts,
            _ca: ca,
            max_vms: 0,
            max_seen: Arc::new(AtomicI64::new(0)),
            stop_sampler: Arc::new(AtomicBool::new(false)),
            sampler: None,
        };
        for i in 0..nodes {
            let node_ip = fleet.hosts.node_ip(i);
            let mut args: Vec<String> = Vec::new();
            for s in &fleet.replicas {
                args.extend(["--server".to_owned(), s.url.clone()]);
            }
            args.extend(
                [
                    "--ca",
                    bundle.to_str().unwrap(),
                    "--join-token-file",
                    join_token.to_str().unwrap(),
                    "--listen",
                    &format!("{node_ip}:7071"),
                    "--advertise",
                    &format!("https://{node_ip}:7071"),
                    "--name",
                    &format!("n{i}"),
                    "--vm-bridge",
                    &format!("hfb{}b{i}", fleet.hosts.x),
                    "--vm-subnet",
                    &format!("10.{}.0.0/16", 180 + i),
                    "--cpus",
                    "16",
                    "--memory-mib",
                    "16384",
                    "--vm-slots",
                    "8",
                    "--max-boots",
                    "4",
                ]
                .map(str::to_owned),
            );
            let mut node = Node {
                name: format!("n{i}"),
                ns: fleet.hosts.namespaces[i].clone(),
                data_dir: tempfile::tempdir().unwrap(),
                args,
                child: None,
                logs: Default::default(),
            };
            node.launch();
            fleet.nodes.push(node);
        }
        assert!(
            wait_until(60, || fleet.reachable_nodes().len() == nodes),
            "the nodes did not join: {:?}\n{}",
            fleet.api().get("/v1/nodes").body,
            fleet.nodes[0].logs_tail()
        );
        fleet
    }

    /// A replica that runs (the first one still up).
    fn live(&self) -> &Server {
        self.replicas
            .iter()
            .find(|s| s.running())
            .expect("a replica runs")
    }

    fn api(&self) -> crate::common::Api {
        self.live().admin()
    }

    /// The names of the nodes the control plane finds reachable.
    fn reachable_nodes(&self) -> BTreeSet<String> {
        let r = self.api().get("/v1/nodes");
        r.body["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|n| n["reachable"] == true)
                    .map(|n| n["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Seeds the pool (sandboxes, no network) and starts sampling the
    /// tenant's live VM count from the database.
    fn pool(&mut self, max_vms: i64, min_idle: usize) {
        self.max_vms = max_vms;
        self.live().pool(
            max_vms,
            "driver: sandbox\nnetwork: none\ncpus: 1\nmemory: 256Mi\n",
            "web",
            &format!("min_idle: {min_idle}\nmax_idle: {min_idle}\n"),
        );
        let url = self.database_url();
        let (stop, max_seen) = (self.stop_sampler.clone(), self.max_seen.clone());
        self.sampler = Some(std::thread::spawn(move || {
            block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
                let mut samples = 0;
                while !stop.load(Ordering::Relaxed) {
                    let live: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM vms WHERE state IN \
                         ('booting', 'provisioning', 'idle', 'assigned', 'draining')",
                    )
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                    max_seen.fetch_max(live, Ordering::Relaxed);
                    samples += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                samples
            })
        }));
    }

    fn database_url(&self) -> String {
        self.replicas[0].database_url().unwrap().to_owned()
    }

    /// Runs `sql` on the fleet's database and returns the rows' first
    /// columns as text.
    fn query(&self, sql: &str) -> Vec<String> {
        let url = self.database_url();
        let sql = sql.to_owned();
        block_on(async move {
            use sqlx::{Connection, Row};
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query(&sql)
                .fetch_all(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|r| r.try_get::<String, _>(0).unwrap_or_default())
                .collect()
        })
    }

    fn count(&self, sql: &str) -> i64 {
        let url = self.database_url();
        let sql = sql.to_owned();
        block_on(async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
    }

    fn idle(&self) -> i64 {
        self.count("SELECT count(*) FROM vms WHERE state = 'idle'")
    }

    /// Idle VMs on node `i`.
    fn idle_on(&self, i: usize) -> i64 {
        self.count(&format!(
            "SELECT count(*) FROM vms v JOIN nodes n ON n.id = v.node_id \
             WHERE v.state = 'idle' AND n.name = 'n{i}'"
        ))
    }

    /// The replica that reconciles the tenant now: the holder of an
    /// advisory lock, by its connection's application name.
    fn leader(&self) -> Option<usize> {
        let names = self.query(
            "SELECT a.application_name::text FROM pg_locks l \
             JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted \
             AND a.datname = current_database()",
        );
        names.iter().find_map(|n| {
            let k = n.strip_prefix("hearth-lead r")?.parse::<usize>().ok()?;
            (k < self.replicas.len()).then_some(k)
        })
    }

    /// Waits until the pool holds `idle` warm VMs again.
    fn wait_idle(&self, idle: i64, secs: u64, what: &str) {
        assert!(
            wait_until(secs, || self.idle() >= idle),
            "{what}: the pool did not get back to {idle} idle VMs ({} now)\nvms: {:?}\nnode n0:\n{}\nreplica:\n{}",
            self.idle(),
            self.query(
                "SELECT concat(v.id, ' ', v.state, ' ', coalesce(n.name, '-'), ' ', coalesce(v.error, '')) \
                 FROM vms v LEFT JOIN nodes n ON n.id = v.node_id ORDER BY v.created_at"
            ),
            self.nodes[0].logs_tail(),
            self.live().logs_tail()
        );
    }

    /// The invariants that must hold after every fault.
    fn check(&self, spawned: &[String], what: &str) {
        // No VM assigned twice; no two active agents on one VM.
        let twice = self.query(
            "SELECT agent_id FROM vms WHERE state = 'assigned' \
             GROUP BY agent_id HAVING count(*) > 1",
        );
        assert!(
            twice.is_empty(),
            "{what}: agents holding two VMs: {twice:?}"
        );
        let shared = self.query(
            "SELECT vm_id FROM agents WHERE phase IN ('running', 'idle') AND vm_id IS NOT NULL \
             GROUP BY vm_id HAVING count(*) > 1",
        );
        assert!(
            shared.is_empty(),
            "{what}: VMs held by two agents: {shared:?}"
        );
        // The cap, as sampled all along.
        let max_seen = self.max_seen.load(Ordering::Relaxed);
        assert!(
            max_seen <= self.max_vms,
            "{what}: {max_seen} live VMs, over max_vms {}",
            self.max_vms
        );
        // No agent lost: every spawned agent is on record, and every
        // running one holds a live VM.
        let known: HashSet<String> = self.query("SELECT id FROM agents").into_iter().collect();
        for a in spawned {
            assert!(known.contains(a), "{what}: agent {a} is lost");
        }
        let orphans = self.query(
            "SELECT a.id FROM agents a WHERE a.phase = 'running' AND NOT EXISTS \
             (SELECT 1 FROM vms v WHERE v.id = a.vm_id AND v.state = 'assigned' AND v.agent_id = a.id)",
        );
        assert!(
            orphans.is_empty(),
            "{what}: running agents without their VM: {orphans:?}"
        );
        // No agent failed by a control-plane restart.
        let restarted = self.query(
            "SELECT concat(id, ': ', error) FROM agents WHERE error LIKE '%control plane restarted%' \
             OR error LIKE '%control-plane restart%'",
        );
        assert!(restarted.is_empty(), "{what}: {restarted:?}");
        // No VM leaked on any node: once the pool settles, each running
        // node runs exactly the live VMs the store places on it.
        for (i, node) in self.nodes.iter().enumerate() {
            if node.child.is_none() {
                continue;
            }
            let mut last = (BTreeSet::new(), BTreeSet::new());
            let settled = wait_until(60, || {
                let wanted: BTreeSet<String> = self
                    .query(&format!(
                        "SELECT v.id FROM vms v JOIN nodes n ON n.id = v.node_id \
                         WHERE n.name = 'n{i}' AND v.state IN ('idle', 'assigned')"
                    ))
                    .into_iter()
                    .collect();
                let moving = self.count(&format!(
                    "SELECT count(*) FROM vms v JOIN nodes n ON n.id = v.node_id \
                     WHERE n.name = 'n{i}' AND v.state IN ('booting', 'provisioning', 'draining')"
                ));
                let real = node.sandboxes();
                let ok = moving == 0 && wanted == real;
                last = (wanted, real);
                ok
            });
            assert!(
                settled,
                "{what}: node {} runs {:?} but the store wants {:?}\n{}",
                node.name,
                last.1,
                last.0,
                node.logs_tail()
            );
        }
    }

    fn spawn(&self, body: Value) -> String {
        let r = self.api().post("/v1/agents", body);
        assert_eq!(r.status, 201, "{}", r.text);
        id(&r.body)
    }

    fn agent(&self, agent: &str) -> Value {
        self.api().get(&format!("/v1/agents/{agent}")).body
    }

    fn wait_agent(&self, agent: &str, phase: &str, secs: u64) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(secs, || {
            last = self.agent(agent);
            last["phase"] == phase
        });
        assert!(ok, "agent {agent} never became {phase}: {last}");
        last
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop_sampler.store(true, Ordering::Relaxed);
        if let Some(s) = self.sampler.take() {
            let _ = s.join();
        }
    }
}

fn require_root() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: the fleet tests make network namespaces (root only)");
        return false;
    }
    true
}

#[test]
fn killing_the_reconciling_replica_hands_the_pool_over() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(3, 3);
    fleet.pool(9, 6);
    fleet.wait_idle(6, 120, "first fill");
    // The VMs spread over the nodes.
    let used: usize = (0..3).filter(|i| fleet.idle_on(*i) > 0).count();
    assert!(used >= 2, "placement put every VM on one node");
    let mut spawned = Vec::new();
    for round in 0..3 {
        let leader = fleet
            .leader()
            .unwrap_or_else(|| panic!("round {round}: no replica leads the tenant"));
        fleet.replicas[leader].kill();
        // Claims go on through any replica at once; the pool refills once
        // another replica leads.
        let agent = fleet.spawn(json!({"workspace": "web"}));
        fleet.wait_agent(&agent, "running", 30);
        spawned.push(agent);
        fleet.wait_idle(6, 60, &format!("round {round} after the leader died"));
        let next = fleet.leader().expect("a new leader");
        assert_ne!(next, leader, "round {round}");
        fleet.replicas[leader].launch();
        fleet.check(&spawned, &format!("round {round}"));
    }
}

#[test]
fn a_node_killed_or_cut_off_is_replaced_and_fenced() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(2, 3);
    fleet.pool(10, 6);
    fleet.wait_idle(6, 120, "first fill");
    let mut spawned = Vec::new();
    // kill -9 of a node, twice: its VMs outlive it; it comes back before
    // they are lost, and adopts the ones still wanted.
    for round in 0..2 {
        let victim = (0..3).max_by_key(|i| fleet.idle_on(*i)).expect("a node");
        let agent = fleet.spawn(json!({"workspace": "web"}));
        fleet.wait_agent(&agent, "running", 30);
        spawned.push(agent.clone());
        fleet.nodes[victim].kill();
        // Unreachable: its idle VMs are given up and replaced elsewhere.
        assert!(
            wait_until(30, || !fleet
                .reachable_nodes()
                .contains(&format!("n{victim}"))),
            "round {round}: n{victim} still reachable"
        );
        // Its idle VMs are given up (they stop counting at once), and the
        // pool is whole again on the others.
        assert!(
            wait_until(30, || fleet.idle_on(victim) == 0),
            "round {round}: n{victim}'s idle VMs were not given up"
        );
        fleet.wait_idle(
            6,
            60,
            &format!("round {round}: backfill after n{victim} died"),
        );
        fleet.nodes[victim].launch();
        assert!(
            wait_until(30, || fleet.reachable_nodes().len() == 3),
            "round {round}: n{victim} did not come back\n{}",
            fleet.nodes[victim].logs_tail()
        );
        fleet.check(&spawned, &format!("round {round} (node kill)"));
        let r = fleet.api().post(
            &format!("/v1/agents/{agent}/finish"),
            json!({"status": "completed"}),
        );
        assert!(r.status < 300, "{}", r.text);
    }
    // A node cut off by a firewall rule for longer than lost_after: its
    // assigned VMs are lost (their agents failed, naming the node), it
    // destroys everything it ran, and once healed it runs only what the
    // store gives it.
    for round in 0..2 {
        let agent = fleet.spawn(json!({"workspace": "web"}));
        let running = fleet.wait_agent(&agent, "running", 30);
        spawned.push(agent.clone());
        let vm = running["vm"].as_str().unwrap().to_owned();
        let victim: usize = fleet.query(&format!(
            "SELECT n.name FROM vms v JOIN nodes n ON n.id = v.node_id WHERE v.id = '{vm}'"
        ))[0][1..]
            .parse()
            .unwrap();
        fleet.hosts.cut(victim);
        let failed = fleet.wait_agent(&agent, "failed", 60);
        let error = failed["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("n{victim}")),
            "round {round}: the agent's error names the node: {failed}"
        );
        fleet.wait_idle(
            6,
            60,
            &format!("round {round}: backfill while n{victim} is cut off"),
        );
        // It fenced itself: no sandbox left on it.
        assert!(
            wait_until(30, || fleet.nodes[victim].sandboxes().is_empty()),
            "round {round}: n{victim} kept {:?}\n{}",
            fleet.nodes[victim].sandboxes(),
            fleet.nodes[victim].logs_tail()
        );
        fleet.hosts.heal(victim);
        assert!(
            wait_until(30, || fleet.reachable_nodes().len() == 3),
            "round {round}: n{victim} did not come back"
        );
        fleet.check(&spawned, &format!("round {round} (cut off)"));
    }
}

#[test]
fn restarting_every_server_while_agents_run_fails_no_agent() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(2, 3);
    fleet.pool(8, 3);
    fleet.wait_idle(3, 120, "first fill");
    let mut spawned = Vec::new();
    for round in 0..2 {
        let agents: Vec<String> = (0..3)
            .map(|k| {
                fleet.spawn(json!({
                    "workspace": "web",
                    "command": format!("echo start-{round}-{k}; sleep 6; echo end-{round}-{k}; exit 3"),
                }))
            })
            .collect();
        for a in &agents {
            fleet.wait_agent(a, "running", 60);
        }
        spawned.extend(agents.iter().cloned());
        // Every replica goes down (one by kill -9, the others gracefully)
        // and comes back while the commands run.
        fleet.replicas[0].kill();
        for s in fleet.replicas.iter_mut().skip(1) {
            s.stop();
        }
        for s in fleet.replicas.iter_mut() {
            s.launch();
        }
        for (k, a) in agents.iter().enumerate() {
            let done = fleet.wait_agent(a, "failed", 90);
            assert_eq!(done["exit_code"], 3, "round {round}: {done}");
            let output = done["output"].as_str().unwrap_or_default();
            assert!(
                output.contains(&format!("start-{round}-{k}"))
                    && output.contains(&format!("end-{round}-{k}")),
                "round {round}: the whole output survived: {done}"
            );
        }
        fleet.check(&spawned, &format!("round {round} (restart)"));
    }
}

#[test]
fn pool_behaviours_hold_across_nodes() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(2, 3);
    fleet.pool(8, 4);
    fleet.wait_idle(4, 120, "first fill");
    let idle_ids = |fleet: &Fleet| -> BTreeSet<String> {
        fleet
            .query("SELECT id FROM vms WHERE state = 'idle'")
            .into_iter()
            .collect()
    };
    let nodes_used = |fleet: &Fleet| {
        fleet.count("SELECT count(DISTINCT node_id) FROM vms WHERE state IN ('idle', 'assigned')")
    };
    assert!(nodes_used(&fleet) >= 2, "warm VMs spread over the nodes");
    let (one, two) = (fleet.replicas[0].admin(), fleet.replicas[1].admin());
    let mut spawned = Vec::new();

    // A warm claim through one replica, exec through the other, and the
    // VM back to the pool (reset on its node) once the agent finishes.
    let agent = fleet.spawn(json!({"workspace": "web"}));
    let running = fleet.wait_agent(&agent, "running", 30);
    spawned.push(agent.clone());
    let r = two.post(
        &format!("/v1/agents/{agent}/exec"),
        json!({"command": "echo mine > /tmp/mark; cat /tmp/mark"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["stdout"], "mine\n", "{}", r.body);
    let r = one.post(
        &format!("/v1/agents/{agent}/finish"),
        json!({"status": "completed"}),
    );
    assert!(r.status < 300, "{}", r.text);
    let vm = running["vm"].as_str().unwrap().to_owned();
    assert!(
        wait_until(60, || fleet.count(&format!(
            "SELECT count(*) FROM vms WHERE id = '{vm}' AND state = 'idle'"
        )) == 1),
        "the returned VM is warm again on its node; the nodes' logs end:\n{}",
        fleet
            .nodes
            .iter()
            .map(|n| n.logs_tail())
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    let again = fleet.spawn(json!({"workspace": "web"}));
    fleet.wait_agent(&again, "running", 30);
    spawned.push(again.clone());
    let r = one.post(
        &format!("/v1/agents/{again}/exec"),
        json!({"command": "cat /tmp/mark 2>/dev/null || echo clean"}),
    );
    assert_eq!(
        r.body["stdout"], "clean\n",
        "a reset VM keeps nothing: {}",
        r.body
    );
    fleet.wait_idle(4, 60, "backfill after the claims");

    // Flush through the other replica: every idle VM replaced.
    let before = idle_ids(&fleet);
    let r = two.post("/v1/pool/flush", json!({}));
    assert!(r.status < 300, "{}", r.text);
    assert!(
        wait_until(90, || {
            let now = idle_ids(&fleet);
            now.len() >= 4 && now.is_disjoint(&before)
        }),
        "flush replaced every idle VM: {:?}",
        idle_ids(&fleet)
    );

    // A changed environment: the warm VMs roll over to fresh ones.
    let before = idle_ids(&fleet);
    let r = one.put_yaml(
        "/v1/environments/dev",
        "driver: sandbox\nnetwork: none\ncpus: 1\nmemory: 300Mi\n",
    );
    assert!(r.status < 300, "{}", r.text);
    assert!(
        wait_until(120, || {
            let now = idle_ids(&fleet);
            now.len() >= 4
                && now.is_disjoint(&before)
                && fleet.count("SELECT count(*) FROM vms WHERE state = 'idle' AND stale = 1") == 0
        }),
        "the pool rolled over to the new environment: {:?}",
        fleet
            .query("SELECT concat(id, ' ', state, ' ', stale) FROM vms WHERE state <> 'destroyed'")
    );
    assert!(nodes_used(&fleet) >= 2, "the fresh VMs spread too");

    // Past the cap, spawns queue; nothing exceeds max_vms on any node.
    let burst: Vec<String> = (0..10)
        .map(|_| fleet.spawn(json!({"workspace": "web"})))
        .collect();
    spawned.extend(burst.iter().cloned());
    assert!(
        wait_until(60, || fleet
            .count("SELECT count(*) FROM agents WHERE phase = 'running'")
            == 8),
        "the cap's worth of agents run"
    );
    assert!(
        fleet.count("SELECT count(*) FROM agents WHERE phase = 'queued'") >= 3,
        "the rest queue"
    );
    fleet.check(&spawned, "at the cap");

    // Nuke through one replica: every agent ended, every VM gone from
    // every node; up refills.
    let r = one.post("/v1/pool/flush", json!({"nuke": true}));
    assert!(r.status < 300, "{}", r.text);
    assert!(
        wait_until(60, || fleet.nodes.iter().all(|n| n.sandboxes().is_empty())),
        "a nuke leaves no VM on any node"
    );
    assert_eq!(
        fleet.count(
            "SELECT count(*) FROM agents WHERE phase IN ('queued', 'provisioning', 'running', 'idle')"
        ),
        0
    );
    let r = two.post("/v1/pool/up", json!({}));
    assert!(r.status < 300, "{}", r.text);
    fleet.wait_idle(4, 120, "up after the nuke");
    fleet.check(&spawned, "after up");
}
