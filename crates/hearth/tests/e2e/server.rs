//! The server process: first start, health, OpenAPI, logs, graceful
//! shutdown, and persistence across restarts and crashes.

use crate::both_backends;
use crate::common::{Api, Backend, Server, repo_path};
use std::os::unix::fs::PermissionsExt;

both_backends!(
    first_start_creates_a_tenant_and_prints_the_token_once,
    health_and_openapi_need_no_token,
    everything_survives_a_graceful_restart,
    everything_survives_kill_9,
    logs_are_json_lines,
);

fn first_start_creates_a_tenant_and_prints_the_token_once(b: Backend) {
    let mut s = Server::start(b);
    let path = s.data_dir.path().join("admin-token");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(s.admin_token.starts_with("hth_"));
    let printed = s.stdout.lock().unwrap().clone();
    assert!(
        printed.contains(&s.admin_token),
        "printed once on first start: {printed}"
    );
    assert!(!s.data_dir.path().join("admin-token.pending").exists());
    s.stdout.lock().unwrap().clear();
    s.restart();
    assert!(
        !s.stdout.lock().unwrap().contains("hth_"),
        "not printed again"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().trim(),
        s.admin_token,
        "file untouched"
    );
    let tenants = s.admin().get("/v1/tenants");
    assert_eq!(
        tenants.body["items"].as_array().unwrap().len(),
        1,
        "no second tenant: {}",
        tenants.text
    );
}

fn health_and_openapi_need_no_token(b: Backend) {
    let s = Server::start(b);
    let anon = Api::anonymous(&s.url);
    let h = anon.get("/healthz");
    let store = if b == Backend::Sqlite {
        "sqlite"
    } else {
        "postgres"
    };
    assert_eq!(
        (
            h.status,
            h.body["status"].as_str(),
            h.body["store"].as_str()
        ),
        (200, Some("ok"), Some(store))
    );
    let doc = anon.get("/openapi.json");
    assert_eq!(doc.status, 200);
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_path("openapi.json")).unwrap()).unwrap();
    assert_eq!(
        doc.body, stored,
        "the served document is the checked-in one"
    );
    for path in [
        "/v1/pool-config/{name}",
        "/v1/workspaces",
        "/v1/whoami",
        "/v1/tenants",
        "/healthz",
    ] {
        assert!(doc.body["paths"].get(path).is_some(), "{path} documented");
    }
}

fn seed(api: &Api) {
    api.put_yaml(
        "/v1/pool-config/default",
        "max_vms: 30\nmax_agents_per_developer: 5\n",
    );
    api.put_yaml("/v1/images/base", "driver: sandbox\n");
    api.put_yaml(
        "/v1/environments/dev",
        "driver: sandbox\nimage: base\nenv:\n  KEY: value\n",
    );
    api.patch("/v1/environments/dev", serde_json::json!({"cpus": 2}));
    api.put_yaml("/v1/workspaces/web", "environment: dev\nmin_idle: 2\n");
}

fn check_seeded(s: &Server, token: &str) {
    let api = s.client(token);
    assert_eq!(
        api.get("/v1/pool-config/default").body["spec"]["max_agents_per_developer"],
        5
    );
    let env = api.get("/v1/environments/dev");
    assert_eq!(
        (
            env.body["version"].as_i64(),
            env.body["spec"]["cpus"].as_i64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(api.get("/v1/workspaces/web").body["spec"]["min_idle"], 2);
    // References survive too.
    assert_eq!(api.delete("/v1/environments/dev").status, 409);
}

fn everything_survives_a_graceful_restart(b: Backend) {
    let mut s = Server::start(b);
    seed(&s.admin());
    let dev = s.identity("dev", "developer");
    let status = s.stop();
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
    assert!(s.logs().contains("shutting down"));
    s.launch();
    check_seeded(&s, &s.admin_token);
    assert_eq!(
        s.client(&dev).get("/v1/whoami").status,
        200,
        "tokens survive"
    );
}

fn everything_survives_kill_9(b: Backend) {
    let mut s = Server::start(b);
    seed(&s.admin());
    s.kill();
    s.launch();
    check_seeded(&s, &s.admin_token);
}

fn logs_are_json_lines(b: Backend) {
    let s = Server::start(b);
    s.admin().get("/v1/workspaces");
    let logs = s.logs();
    assert!(logs.lines().count() >= 2);
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
    assert!(!logs.contains(&s.admin_token), "the token is never logged");
}
