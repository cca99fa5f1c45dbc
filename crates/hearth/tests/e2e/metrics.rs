//! `/metrics` through the real server with the sandbox driver: a scripted
//! scenario and the exact values it leaves in a scrape, who may scrape,
//! the plain `--metrics-listen` listener, and the Grafana dashboard's
//! queries checked against a live scrape.

use crate::both_backends;
use crate::common::{Api, Backend, Server, binary, repo_path, wait_until};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

both_backends!(scripted_scenario_scrapes_exact_values);

const SANDBOX: &str = "driver: sandbox\nmemory: 256Mi\n";
const METRICS_TOKEN: &str = "metrics-token-for-the-e2e-test";

/// One scrape: every sample by its name and labels (`name{a="1",b="2"}`,
/// labels sorted), and the type of every family (`# TYPE`).
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics text: {text}");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            let key = match series.split_once('{') {
                None => series.to_owned(),
                Some((name, labels)) => {
                    let labels = labels.strip_suffix('}').expect("labels end with }");
                    let mut pairs: Vec<&str> = split_labels(labels);
                    pairs.sort_unstable();
                    format!("{name}{{{}}}", pairs.join(","))
                }
            };
            assert!(
                samples.insert(key.clone(), value).is_none(),
                "{key} twice in one scrape"
            );
        }
        Scrape {
            samples,
            types,
            text: text.to_owned(),
        }
    }

    /// The value of `name` with `labels` (`a="1"`, in any order); panics
    /// naming it when absent.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = key(name, labels);
        *self
            .samples
            .get(&key)
            .unwrap_or_else(|| panic!("{key} is not in the scrape:\n{}", self.text))
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples.contains_key(&key(name, labels))
    }

    /// Every sample of `name`, whatever its labels.
    fn series(&self, name: &str) -> Vec<(&str, f64)> {
        self.samples
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name))
            .map(|(k, v)| (k.as_str(), *v))
            .collect()
    }
}

/// Splits `a="x",b="y,z"` at the commas between labels (not inside values).
fn split_labels(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            '\\' if quoted => escaped = !escaped,
            '"' if !escaped => quoted = !quoted,
            ',' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => escaped = false,
        }
        if c != '\\' {
            escaped = false;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    pairs.sort_unstable();
    format!("{name}{{{}}}", pairs.join(","))
}

fn scrape(api: &Api) -> Scrape {
    let r = api.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text);
    Scrape::parse(&r.text)
}

/// `/metrics` of the plain listener at `addr`, with `token` if given.
fn scrape_plain(addr: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest::blocking::Client::new();
    let mut req = client.get(format!("http://{addr}/metrics"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().expect("the metrics listener answers");
    (resp.status().as_u16(), resp.text().unwrap())
}

/// The address the server's `--metrics-listen` listener bound (its log).
fn metrics_addr(s: &Server) -> String {
    let mut addr = None;
    assert!(
        wait_until(10, || {
            addr = s.logs().lines().find_map(|line| {
                let v: Value = serde_json::from_str(line).ok()?;
                (v["message"] == "metrics listening (plain HTTP)")
                    .then(|| v["addr"].as_str().unwrap_or_default().to_owned())
            });
            addr.is_some()
        }),
        "no metrics listener: {}",
        s.logs_tail()
    );
    addr.unwrap()
}

/// The pool's decisions in the server log (for failure messages).
fn pool_log(s: &Server) -> String {
    s.logs()
        .lines()
        .filter(|l| {
            ["VM", "agent", "provisioning"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn workspace_status(s: &Server, name: &str) -> Value {
    s.status()["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn scripted_scenario_scrapes_exact_values(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("metrics-token");
    std::fs::write(&token_file, format!("{METRICS_TOKEN}\n")).unwrap();
    let s = Server::start_with(
        b,
        &[
            "--resync",
            "200ms",
            "--backoff-base",
            "200ms",
            "--backoff-max",
            "1s",
            "--hard-limit-failures",
            "3",
            "--metrics-token-file",
            token_file.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let api = s.admin();
    let tenant = api.get("/v1/whoami").body["tenant"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = tenant.as_str();

    // Who may scrape: not anonymous, not a developer, not an admin (the
    // fleet's layout is the operators'), not a wrong metrics token.
    Api::anonymous(&s.url).get("/metrics").assert_error(
        401,
        "UNAUTHENTICATED",
        "missing bearer token: pass --token, set HEARTH_TOKEN or run hearth auth login",
    );
    let dev = s.identity("dana", "developer");
    let denied = "your role does not have metrics.read permission";
    s.client(&dev)
        .get("/metrics")
        .assert_error(403, "PERMISSION_DENIED", denied);
    let admin = s.identity("ada", "admin");
    s.client(&admin)
        .get("/metrics")
        .assert_error(403, "PERMISSION_DENIED", denied);
    s.client("metrics-token-for-the-e2e-tesT")
        .get("/metrics")
        .assert_error(401, "UNAUTHENTICATED", "malformed token");
    // Before any VM: the tenant's gauges are there, zeros.
    let first = scrape(&api);
    assert_eq!(first.value("hearth_tenant_live_vms", &[("tenant", t)]), 0.0);
    assert_eq!(
        first.value("hearth_tenant_saturation_ratio", &[("tenant", t)]),
        0.0
    );
    assert_eq!(first.series("hearth_workspace_idle_vms"), vec![]);

    // A workspace whose setup command fails: three failed boots, then hard
    // limited (`--hard-limit-failures 3`).
    let r = api.put_yaml(
        "/v1/pool-config/default",
        "max_vms: 3\nmax_agents_per_developer: 1\n",
    );
    assert!(r.status < 300, "{}", r.text);
    assert!(api.put_yaml("/v1/environments/dev", SANDBOX).status < 300);
    let r = api.put_yaml(
        "/v1/workspaces/broken",
        "environment: dev\nmin_idle: 1\nwarm_pool:\n  setup_commands:\n  - name: broken\n    command: exit 3\n",
    );
    assert!(r.status < 300, "{}", r.text);
    assert!(
        wait_until(90, || workspace_status(&s, "broken")["status"]
            == "hard_limited"
            && s.status()["vms"]["total"] == 0),
        "never hard-limited: {:#}\n{}",
        s.status(),
        s.logs_tail()
    );

    // web keeps one warm VM; api none (its agents boot cold).
    let r = api.put_yaml(
        "/v1/workspaces/web",
        "environment: dev\nmin_idle: 1\nmax_idle: 1\n",
    );
    assert!(r.status < 300, "{}", r.text);
    let r = api.put_yaml(
        "/v1/workspaces/api",
        "environment: dev\nmin_idle: 0\nmax_idle: 1\n",
    );
    assert!(r.status < 300, "{}", r.text);
    let settled = |idle: i64, total: i64| {
        let st = s.status();
        st["vms"]["idle"] == idle
            && st["vms"]["total"] == total
            && st["vms"]["booting"] == 0
            && st["vms"]["draining"] == 0
    };
    assert!(wait_until(60, || settled(1, 1)), "{:#}", s.status());

    // Warm: the developer's spawn claims web's idle VM at once.
    let warm = s.spawn(&dev, json!({"workspace": "web"}));
    assert_eq!(warm.status, 201, "{}", warm.text);
    assert_eq!(warm.body["phase"], "running", "{}", warm.text);
    assert!(wait_until(60, || settled(1, 2)), "{:#}", s.status());
    // Rejected: the developer is at max_agents_per_developer.
    let r = s.spawn(&dev, json!({"workspace": "web"}));
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (429, Some("RESOURCE_EXHAUSTED")),
        "{}",
        r.text
    );
    // The cap binds every human identity: lifted for the operator's spawns.
    let r = api.patch(
        "/v1/pool-config/default",
        json!({"max_agents_per_developer": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    // Cold: api has nothing idle; a VM is booted for the agent.
    let cold = s.spawn(&s.admin_token, json!({"workspace": "api"}));
    assert_eq!(cold.body["phase"], "queued", "{}", cold.text);
    let cold_id = cold.body["id"].as_str().unwrap().to_owned();
    let cold_vm = s.wait_agent(&cold_id, "running", 60)["vm"].clone();
    // Queued: the tenant is at max_vms (3); the agent waits until the cold
    // agent finishes and its VM comes back idle (api's max_idle is 1).
    let queued = s.spawn(&s.admin_token, json!({"workspace": "api"}));
    assert_eq!(queued.body["phase"], "queued", "{}", queued.text);
    let queued_id = queued.body["id"].as_str().unwrap().to_owned();
    assert!(
        wait_until(10, || workspace_status(&s, "api")["queued"] == 1),
        "{:#}",
        s.status()
    );
    let at_cap = scrape(&api);
    let ws = |w: &'static str| [("tenant", t), ("workspace", w)];
    assert_eq!(
        at_cap.value("hearth_workspace_queued_agents", &ws("api")),
        1.0
    );
    assert_eq!(
        at_cap.value("hearth_tenant_live_vms", &[("tenant", t)]),
        3.0
    );
    assert_eq!(
        at_cap.value("hearth_tenant_saturation_ratio", &[("tenant", t)]),
        1.0
    );
    let f = api.post(
        &format!("/v1/agents/{cold_id}/finish"),
        json!({"status": "completed"}),
    );
    assert_eq!(f.status, 200, "{}", f.text);
    let queued_vm = s.wait_agent(&queued_id, "running", 60)["vm"].clone();
    assert!(wait_until(60, || settled(1, 3)), "{:#}", s.status());
    // It runs on the VM the cold agent gave back (`queued`), unless the
    // sandbox driver failed that VM's reset (a re-attach racing the tests
    // beside this one): it is destroyed then, and a VM booted for the
    // waiting agent (`cold`).
    let (cold, queued) = if queued_vm == cold_vm {
        (1.0, 1.0)
    } else {
        (2.0, 0.0)
    };

    let m = scrape(&api);
    // Claims: each outcome where it happened; zeros for every other
    // workspace and outcome.
    for (w, outcome, n) in [
        ("web", "warm", 1.0),
        ("web", "rejected", 1.0),
        ("api", "cold", cold),
        ("api", "queued", queued),
        ("web", "cold", 0.0),
        ("web", "queued", 0.0),
        ("api", "warm", 0.0),
        ("api", "rejected", 0.0),
        ("broken", "warm", 0.0),
    ] {
        let labels = [("tenant", t), ("workspace", w), ("outcome", outcome)];
        assert_eq!(m.value("hearth_claims_total", &labels), n, "{w} {outcome}");
    }
    for (outcome, n) in [("warm", 1.0), ("cold", cold), ("queued", queued)] {
        let labels = [("tenant", t), ("outcome", outcome)];
        let count = m
            .has("hearth_spawn_to_running_seconds_count", &labels)
            .then(|| m.value("hearth_spawn_to_running_seconds_count", &labels));
        assert_eq!(count.unwrap_or(0.0), n, "{outcome}");
    }
    assert!(!m.has(
        "hearth_spawn_to_running_seconds_count",
        &[("tenant", t), ("outcome", "rejected")]
    ));
    // The cold agent waited for a whole boot: more than nothing.
    assert!(
        m.value(
            "hearth_spawn_to_running_seconds_sum",
            &[("tenant", t), ("outcome", "cold")]
        ) > 0.0
    );
    assert_eq!(
        m.value("hearth_queued_seconds_count", &[("tenant", t)]),
        2.0
    );
    // Boots: the counters are what the store recorded of every pool boot
    // (its provisioning runs). The script makes web boot twice (its first
    // warm VM, the backfill after the claim) and api once (the cold boot;
    // the queued agent got that VM back), both succeeding, and broken three
    // times, failing at its setup command. The sandbox driver may also fail a boot
    // of its own (a network attach racing the tests beside this one), which
    // the pool retries: such a boot counts as failed, with its step, in the
    // runs and in the counters alike.
    let mut failed_runs = BTreeMap::new();
    for w in ["web", "api", "broken"] {
        let r = api.get(&format!("/v1/instances?workspace={w}&test=false&limit=100"));
        assert_eq!(r.status, 200, "{}", r.text);
        let runs = r.body["items"].as_array().unwrap().clone();
        assert!(
            runs.iter().all(|i| i["status"] != "provisioning"),
            "{}",
            r.text
        );
        let ready = runs.iter().filter(|i| i["status"] == "ready").count() as f64;
        assert_eq!(
            (
                m.value("hearth_boots_started_total", &ws(w)),
                m.value("hearth_boots_succeeded_total", &ws(w)),
            ),
            (runs.len() as f64, ready),
            "boots of {w} (started, succeeded): runs {}\n{}",
            r.text,
            pool_log(&s)
        );
        let durations = m
            .has("hearth_boot_duration_seconds_count", &ws(w))
            .then(|| m.value("hearth_boot_duration_seconds_count", &ws(w)));
        assert_eq!(durations.unwrap_or(0.0), ready, "boot durations of {w}");
        for i in runs.iter().filter(|i| i["status"] == "failed") {
            let step = i["summary"]["failedStep"].as_str().unwrap().to_owned();
            *failed_runs
                .entry(key(
                    "hearth_boots_failed_total",
                    &[("tenant", t), ("workspace", w), ("reason", &step)],
                ))
                .or_insert(0.0) += 1.0;
        }
        for step in [
            "create_vm",
            "ensure_server",
            "set_env_vars",
            "warm_pool_setup",
        ] {
            let timed = runs
                .iter()
                .filter(|i| {
                    i["steps"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x["name"] == step && x["durationMs"].is_u64())
                })
                .count() as f64;
            let labels = [("tenant", t), ("workspace", w), ("step", step)];
            let count = m
                .has("hearth_provisioning_step_duration_seconds_count", &labels)
                .then(|| m.value("hearth_provisioning_step_duration_seconds_count", &labels));
            assert_eq!(count.unwrap_or(0.0), timed, "{step} of {w}");
        }
        // What the script asked for, whatever the driver added.
        let expected_ready = match w {
            "web" => 2.0,
            // One boot per cold claim.
            "api" => cold,
            _ => 0.0,
        };
        assert_eq!(ready, expected_ready, "ready runs of {w}: {}", r.text);
    }
    let failed: BTreeMap<String, f64> = m
        .series("hearth_boots_failed_total")
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(failed, failed_runs);
    // broken failed exactly until it was hard-limited, at its setup command
    // (unless the driver failed one of its boots first).
    let broken: Vec<(&String, &f64)> = failed
        .iter()
        .filter(|(k, _)| k.contains("workspace=\"broken\""))
        .collect();
    assert_eq!(
        broken.iter().map(|(_, n)| **n).sum::<f64>(),
        3.0,
        "{failed:?}"
    );
    assert!(
        broken
            .iter()
            .any(|(k, _)| k.contains("reason=\"warm_pool_setup\"")),
        "{failed:?}"
    );
    // Gauges: every workspace, zeros included, the numbers of pool status.
    let gauges = [
        "hearth_workspace_min_idle",
        "hearth_workspace_max_idle",
        "hearth_workspace_idle_vms",
        "hearth_workspace_booting_vms",
        "hearth_workspace_assigned_vms",
        "hearth_workspace_stale_vms",
        "hearth_workspace_queued_agents",
        "hearth_workspace_backing_off",
        "hearth_workspace_hard_limited",
    ];
    for (w, values) in [
        ("web", [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]),
        ("api", [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]),
        ("broken", [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
    ] {
        for (name, value) in gauges.iter().zip(values) {
            assert_eq!(m.value(name, &ws(w)), value, "{name} of {w}");
        }
    }
    let tl = [("tenant", t)];
    assert_eq!(m.value("hearth_tenant_max_vms", &tl), 3.0);
    assert_eq!(m.value("hearth_tenant_live_vms", &tl), 3.0);
    assert_eq!(m.value("hearth_tenant_saturation_ratio", &tl), 1.0);
    assert_eq!(m.value("hearth_reaper_stranded_workflows", &tl), 0.0);
    // Passes ran and none failed; the pass histogram counts each.
    let passes = m.value("hearth_reconcile_passes_total", &tl);
    assert!(passes >= 5.0, "{passes}");
    assert_eq!(m.value("hearth_reconcile_errors_total", &tl), 0.0);
    assert_eq!(
        m.value("hearth_reconcile_pass_duration_seconds_count", &tl),
        passes
    );
    // The embedded node, as `/v1/nodes` shows it.
    let nodes = api.get("/v1/nodes");
    assert_eq!(nodes.status, 200, "{}", nodes.text);
    let node = &nodes.body["items"][0];
    let name = node["name"].as_str().unwrap();
    let nl = [("node", name)];
    assert_eq!(
        m.value("hearth_node_capacity_cpus", &nl),
        node["capacity"]["cpus"].as_f64().unwrap()
    );
    assert_eq!(
        m.value("hearth_node_capacity_memory_bytes", &nl),
        node["capacity"]["memory_mib"].as_f64().unwrap() * 1024.0 * 1024.0
    );
    assert_eq!(
        m.value("hearth_node_capacity_vms", &nl),
        node["capacity"]["vm_slots"].as_f64().unwrap()
    );
    assert_eq!(m.value("hearth_node_live_vms", &nl), 3.0);
    assert_eq!(m.value("hearth_node_reachable", &nl), 1.0);

    // The metrics token scrapes too, and the plain loopback listener
    // without any token: the same gauges (they come from the store).
    let by_token = scrape(&s.client(METRICS_TOKEN));
    let (status, text) = scrape_plain(&metrics_addr(&s), None);
    assert_eq!(status, 200, "{text}");
    let plain = Scrape::parse(&text);
    for g in gauges
        .iter()
        .chain(&["hearth_tenant_live_vms", "hearth_node_live_vms"])
    {
        assert_eq!(by_token.series(g), m.series(g), "{g}");
        assert_eq!(plain.series(g), m.series(g), "{g}");
    }
    let (status, text) = scrape_plain(&metrics_addr(&s), Some("whatever"));
    assert_eq!(status, 200, "a loopback listener asks nothing: {text}");

    grafana_queries_name_exported_metrics(&m);
}

/// Every metric the Grafana dashboard's queries name is exported by the
/// server, with the type its suffix implies.
fn grafana_queries_name_exported_metrics(m: &Scrape) {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("deploy/grafana/hearth.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "{exprs:?}");
    let mut names = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("hearth_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    assert!(names.len() >= 25, "{names:?}");
    for name in &names {
        let (family, kind) = if let Some(base) = name.strip_suffix("_total") {
            (base, "counter")
        } else if let Some(base) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
        {
            (base, "histogram")
        } else {
            (name.as_str(), "gauge")
        };
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(kind),
            "the dashboard queries {name}, which /metrics does not export as a {kind}"
        );
        assert!(
            !m.series(name).is_empty(),
            "the dashboard queries {name}, which has no sample in the scrape"
        );
    }
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn metrics_listen_off_loopback_needs_the_token() {
    // Refused at start, naming the fix.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("HEARTH_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--metrics-listen 0.0.0.0:0 is not a loopback address: also pass --metrics-token-file, whose token its scrapes must then present"),
        "{stderr}"
    );
    // With the token file, it serves, and asks for the token.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, METRICS_TOKEN).unwrap();
    let s = Server::start_with(
        Backend::Sqlite,
        &[
            "--metrics-token-file",
            token_file.to_str().unwrap(),
            "--metrics-listen",
            "0.0.0.0:0",
        ],
    );
    let addr = metrics_addr(&s).replace("0.0.0.0", "127.0.0.1");
    let (status, text) = scrape_plain(&addr, None);
    assert_eq!(status, 401, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body,
        json!({"code": "UNAUTHENTICATED", "message": "this listener needs the metrics token as the bearer token"})
    );
    let (status, _) = scrape_plain(&addr, Some("not-the-metrics-token"));
    assert_eq!(status, 401);
    let (status, text) = scrape_plain(&addr, Some(METRICS_TOKEN));
    assert_eq!(status, 200, "{text}");
    assert!(
        Scrape::parse(&text)
            .types
            .contains_key("hearth_tenant_max_vms")
    );
    // It serves nothing else.
    let (status, _) = {
        let resp = reqwest::blocking::get(format!("http://{addr}/v1/whoami")).unwrap();
        (resp.status().as_u16(), ())
    };
    assert_eq!(status, 404);
}
