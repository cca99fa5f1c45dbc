//! A fleet's control plane (`--no-local-node`) and a real `hearth node`
//! process on loopback: the pool warms on the node, an agent runs a
//! command there; the node's API takes its credential only, the server
//! takes the join token only; a node killed and started again adopts its
//! VMs and destroys the one the store closed meanwhile (fencing); a node
//! cut off for longer than lost_after destroys every VM (self-fence).

use crate::common::{
    Api, Backend, Server, binary, block_on, destroy_sandboxes, guest_agent, id, wait_until,
};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

mod sqlite {
    #[test]
    fn a_node_runs_the_pool_refuses_strangers_and_fences() {
        super::a_node_runs_the_pool_refuses_strangers_and_fences(super::Backend::Sqlite)
    }
}

const SANDBOX: &str = "driver: sandbox\nmemory: 256Mi\n";
const FLEET: &[&str] = &[
    "--no-local-node",
    "--node-heartbeat",
    "200ms",
    "--node-timeout",
    "2s",
    "--node-lost-after",
    "4s",
    "--resync",
    "200ms",
];

/// A running `hearth node` with its own data dir.
struct Node {
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
    address: String,
}

impl Node {
    fn start(server: &Server, name: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let args = vec![
            "node".to_owned(),
            "--server".into(),
            server.url.clone(),
            "--ca".into(),
            server
                .ca
                .as_ref()
                .expect("the server's CA")
                .display()
                .to_string(),
            "--join-token-file".into(),
            server
                .data_dir
                .path()
                .join("join-token")
                .display()
                .to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--name".into(),
            name.into(),
            "--data-dir".into(),
            dir.path().display().to_string(),
            "--guest-agent".into(),
            guest_agent().into(),
            "--log-format".into(),
            "json".into(),
        ];
        let mut node = Node {
            dir,
            args,
            child: None,
            logs: Default::default(),
            address: String::new(),
        };
        node.launch();
        node
    }

    /// Starts the process and waits until it joined.
    fn launch(&mut self) {
        let mut child = Command::new(binary())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hearth node starts");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "node API listening" {
                        let _ = tx.send(Some(v["address"].as_str().unwrap_or("").to_owned()));
                    }
                    if v["message"] == "joined the control plane" {
                        let _ = tx.send(None);
                    }
                }
                let mut logs = logs.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        self.child = Some(child);
        let mut joined = false;
        while !joined {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Some(address)) => self.address = address,
                Ok(None) => joined = true,
                Err(_) => panic!("the node did not join; its log:\n{}", self.logs()),
            }
        }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn sandboxes(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.dir.path().join("sandboxes"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// A client trusting the node's own CA and nothing else.
    fn client(&self) -> reqwest::blocking::Client {
        let pem = std::fs::read(self.dir.path().join("tls/node-ca.pem")).unwrap();
        reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process does not die of SIGKILL until continued.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        self.kill();
        let left = self.sandboxes();
        if !left.is_empty() {
            destroy_sandboxes(&self.dir.path().join("sandboxes"), &left);
        }
    }
}

/// The credential any replica derives for `node` (see hearth_api::fleet).
fn credential(join_token: &str, node: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(join_token.as_bytes()).unwrap();
    mac.update(b"hearth node credential v1\0");
    mac.update(node.as_bytes());
    format!("hnc_{node}_{}", hex::encode(mac.finalize().into_bytes()))
}

fn database(s: &Server) -> PathBuf {
    s.data_dir.path().join("hearth.db")
}

/// One value of the server's SQLite database.
fn query(s: &Server, sql: &str) -> String {
    use sqlx::{Connection, Row};
    let path = database(s);
    block_on(async move {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let row = sqlx::query(sql).fetch_one(&mut c).await.unwrap();
        let value: String = row
            .try_get::<String, _>(0)
            .or_else(|_| row.try_get::<i64, _>(0).map(|v| v.to_string()))
            .unwrap();
        value
    })
}

fn execute(s: &Server, sql: &str) {
    use sqlx::Connection;
    let path = database(s);
    block_on(async move {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    })
}

fn idle_ids(s: &Server) -> Vec<String> {
    let mut ids: Vec<String> = s
        .vms()
        .iter()
        .filter(|v| v["state"] == "idle")
        .map(id)
        .collect();
    ids.sort();
    ids
}

fn a_node_runs_the_pool_refuses_strangers_and_fences(b: Backend) {
    let s = Server::start_with(b, FLEET);
    let join_token = std::fs::read_to_string(s.data_dir.path().join("join-token"))
        .expect("the server made its join token")
        .trim()
        .to_owned();

    // The server: no join without the join token, no heartbeat without a
    // node's credential.
    let stranger = Api::anonymous(&s.url);
    let capacity = json!({"drivers": ["sandbox"], "cpus": 2, "memory_mib": 1024,
        "disk_mib": 1024, "vm_slots": 4, "max_boots": 2});
    stranger
        .post(
            "/v1/fleet/join",
            json!({"join_token": format!("{join_token}x"), "name": "evil",
                "address": "https://127.0.0.1:1", "ca_pem": "-----BEGIN CERTIFICATE-----",
                "capacity": capacity, "vms": []}),
        )
        .assert_error(401, "UNAUTHENTICATED", "the join token is wrong");
    stranger
        .post(
            "/v1/fleet/heartbeat",
            json!({"capacity": capacity, "vms": []}),
        )
        .assert_error(401, "UNAUTHENTICATED", "missing bearer node credential");
    stranger
        .post(
            "/v1/fleet/join",
            json!({"join_token": join_token, "name": "bad name", "address": "https://h:1",
                "ca_pem": "-----BEGIN CERTIFICATE-----", "capacity": capacity}),
        )
        .assert_error(
            400,
            "INVALID_ARGUMENT",
            "invalid request: name: \"bad name\" is not a node name (1 to 253 letters, digits, '.', '-' or '_')",
        );

    // The pool warms on the node, and nothing runs in the server.
    let mut node = Node::start(&s, "n1");
    s.pool(2, SANDBOX, "web", "min_idle: 2\nmax_idle: 2\n");
    assert!(
        wait_until(60, || idle_ids(&s).len() == 2),
        "{}\n{}",
        s.status(),
        node.logs()
    );
    assert_eq!(node.sandboxes(), idle_ids(&s));
    assert!(s.sandboxes().is_empty(), "the control plane runs no VM");

    // An agent's command runs on the node.
    let c = s.spawn(
        &s.admin_token,
        json!({"workspace": "web", "command": "echo from-the-node"}),
    );
    let done = s.wait_agent(&id(&c.body), "completed", 60);
    assert_eq!(done["exit_code"], 0, "{done}");
    assert!(
        done["output"].as_str().unwrap().contains("from-the-node"),
        "{done}"
    );

    // A VM's hostile workload cannot reach the node's API nor the control
    // plane: not on loopback, not through its gateway (the ports exist:
    // the test itself reaches both from the host).
    let port_of = |url: &str| {
        url.rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned()
    };
    let (node_port, server_port) = (port_of(&node.address), port_of(&s.url));
    let gateway = crate::common::vm_gateway();
    let targets: Vec<String> = [&node_port, &server_port]
        .iter()
        .flat_map(|p| [format!("127.0.0.1/{p}"), format!("{gateway}/{p}")])
        .collect();
    for port in [&node_port, &server_port] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_ok(),
            "the host reaches 127.0.0.1:{port}"
        );
    }
    let probe = targets
        .iter()
        .map(|t| {
            format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{t}' 2>/dev/null && echo reached-{t};")
        })
        .collect::<String>();
    let attack = s.spawn(
        &s.admin_token,
        json!({"workspace": "web", "command": format!("command -v bash timeout && {probe} echo probed")}),
    );
    let done = s.wait_agent(&id(&attack.body), "completed", 90);
    let output = done["output"].as_str().unwrap_or_default();
    assert!(output.contains("probed"), "the probe ran: {done}");
    assert!(
        !output.contains("reached-"),
        "a VM reached the node's or the server's API: {output}"
    );

    // The node's API: its own credential or nothing.
    let node_id = query(&s, "SELECT id FROM nodes WHERE name = 'n1'");
    let vms = format!("{}/v1/node/sandbox/vms", node.address);
    let http = node.client();
    let own = http
        .get(&vms)
        .bearer_auth(credential(&join_token, &node_id))
        .send()
        .unwrap();
    assert_eq!(own.status(), 200, "the server's way in works");
    let other_node = credential(&join_token, "0190f3a0-0000-7000-8000-000000000001");
    for bearer in [
        None,
        Some(other_node.as_str()),
        Some(s.admin_token.as_str()),
        Some(join_token.as_str()),
    ] {
        let mut request = http.get(&vms);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let answer = request.send().unwrap();
        assert_eq!(answer.status(), 401, "{bearer:?}");
        let body: Value = answer.json().unwrap();
        assert_eq!(body["kind"], "unauthorized", "{body}");
    }
    let destroy = http
        .delete(format!("{vms}/{}", idle_ids(&s)[0]))
        .bearer_auth(&other_node)
        .send()
        .unwrap();
    assert_eq!(destroy.status(), 401);
    let plain = reqwest::blocking::Client::new()
        .get(vms.replace("https://", "http://"))
        .bearer_auth(credential(&join_token, &node_id))
        .timeout(Duration::from_secs(10))
        .send();
    assert!(
        plain.as_ref().map(|a| a.status() != 200).unwrap_or(true),
        "plain HTTP gets nothing: {plain:?}"
    );

    // kill -9 of the node; a record closed while it is down; started again,
    // the node keeps the VM the store still wants and fences the other.
    assert!(wait_until(60, || idle_ids(&s).len() == 2
        && s.status()["vms"]["booting"] == 0));
    let before = idle_ids(&s);
    assert!(wait_until(10, || node.sandboxes() == before));
    node.kill();
    execute(
        &s,
        &format!(
            "UPDATE vms SET state = 'destroyed', error = 'closed by the test' WHERE id = '{}'",
            before[0]
        ),
    );
    node.launch();
    assert!(
        wait_until(30, || !node.sandboxes().contains(&before[0])),
        "the closed VM was fenced: {:?}\n{}",
        node.sandboxes(),
        node.logs()
    );
    assert!(
        node.sandboxes().contains(&before[1]) && idle_ids(&s).contains(&before[1]),
        "the other VM was adopted"
    );
    assert!(wait_until(60, || idle_ids(&s).len() == 2));

    // Cut off (SIGSTOP) for longer than lost_after: once it runs again it
    // destroys every VM it ran, joins again, and the pool refills on it.
    assert!(wait_until(60, || idle_ids(&s).len() == 2
        && s.status()["vms"]["booting"] == 0));
    let before = idle_ids(&s);
    assert!(wait_until(10, || node.sandboxes() == before));
    nix::sys::signal::kill(node.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stale = || {
        let last: i64 = query(&s, "SELECT last_heartbeat FROM nodes WHERE name = 'n1'")
            .parse()
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        now - last > 4500
    };
    assert!(wait_until(30, stale), "the node stopped reporting");
    nix::sys::signal::kill(node.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        wait_until(30, || node.logs().contains("self-fence")),
        "{}",
        node.logs()
    );
    assert!(
        wait_until(30, || before.iter().all(|v| !node.sandboxes().contains(v))),
        "every VM of the cut-off node is gone: {:?}",
        node.sandboxes()
    );
    assert!(
        wait_until(60, || {
            let now = idle_ids(&s);
            now.len() == 2 && now.iter().all(|v| !before.contains(v))
        }),
        "the pool refilled with new VMs: {}",
        s.status()
    );
}
