//! Authentication, the permission matrix and tenant isolation.

use crate::both_backends;
use crate::common::{Api, Backend, Server};
use serde_json::{Value, json};

both_backends!(
    missing_unknown_and_malformed_tokens_are_unauthenticated,
    expired_tokens_are_unauthenticated,
    deleted_identities_lose_access,
    permission_matrix,
    tenants_never_see_each_other,
    identities_and_roles,
    tokens_are_stored_only_as_hashes,
);

fn missing_unknown_and_malformed_tokens_are_unauthenticated(b: Backend) {
    let s = Server::start(b);
    let anon = Api::anonymous(&s.url);
    anon.get("/v1/pool-config/default").assert_error(
        401,
        "UNAUTHENTICATED",
        "missing bearer token: pass --token, set HEARTH_TOKEN or run hearth auth login",
    );
    s.client("not-a-token").get("/v1/whoami").assert_error(
        401,
        "UNAUTHENTICATED",
        "malformed token",
    );
    let forged = format!("hth_{}_{}", uuid::Uuid::now_v7().simple(), "a".repeat(64));
    s.client(&forged)
        .get("/v1/whoami")
        .assert_error(401, "UNAUTHENTICATED", "unknown token");
    // The right id with a wrong secret is just as unknown.
    let (id, _) = s
        .admin_token
        .strip_prefix("hth_")
        .unwrap()
        .split_once('_')
        .unwrap();
    let wrong_secret = format!("hth_{id}_{}", "b".repeat(64));
    s.client(&wrong_secret)
        .get("/v1/whoami")
        .assert_error(401, "UNAUTHENTICATED", "unknown token");
    let r = anon.request("GET", "/v1/whoami", None, None);
    assert_eq!(r.status, 401);
    let mut basic = Api::anonymous(&s.url);
    basic.token = None;
    let r = crate::common::http_client(&s.url)
        .get(format!("{}/v1/whoami", s.url))
        .header("authorization", "Basic YWRtaW46YWRtaW4=")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let w = s.admin().get("/v1/whoami");
    assert_eq!(
        (
            w.body["tenant"].as_str(),
            w.body["identity"].as_str(),
            w.body["role"].as_str()
        ),
        (Some("default"), Some("admin"), Some("operator"))
    );
}

fn expired_tokens_are_unauthenticated(b: Backend) {
    let s = Server::start(b);
    let r = s.admin().post(
        "/v1/identities",
        json!({"name": "temp", "role": "viewer", "expires_in": "1s"}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(r.body["expires_at"].is_string());
    let token = r.body["token"].as_str().unwrap().to_owned();
    // It may or may not still be valid right now; after its expiry it never is.
    std::thread::sleep(std::time::Duration::from_millis(1300));
    s.client(&token)
        .get("/v1/pool-config/default")
        .assert_error(
            401,
            "UNAUTHENTICATED",
            "token expired: ask an admin for a new one",
        );
    // A fresh token for the same identity works again.
    let r = s
        .admin()
        .post("/v1/identities/temp/tokens", json!({"expires_in": "1h"}));
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        s.client(r.body["token"].as_str().unwrap())
            .get("/v1/whoami")
            .status,
        200
    );
    s.admin()
        .post("/v1/identities/temp/tokens", json!({"expires_in": "soon"}))
        .assert_error(
            400,
            "INVALID_ARGUMENT",
            "expires_in \"soon\" is not valid: use a duration such as 1h or 30d",
        );
}

fn deleted_identities_lose_access(b: Backend) {
    let s = Server::start(b);
    let token = s.identity("leaver", "developer");
    assert_eq!(s.client(&token).get("/v1/whoami").status, 200);
    assert_eq!(s.admin().delete("/v1/identities/leaver").status, 200);
    s.client(&token)
        .get("/v1/whoami")
        .assert_error(401, "UNAUTHENTICATED", "unknown token");
    assert_eq!(s.admin().delete("/v1/identities/leaver").status, 404);
}

/// One row per endpoint: method, path, body, the permission it needs
/// (`None` = any authenticated caller).
fn endpoints() -> Vec<(
    &'static str,
    &'static str,
    Option<Value>,
    Option<&'static str>,
)> {
    let pc = json!({"max_vms": 5});
    let env = json!({"driver": "sandbox"});
    let ws = json!({"environment": "dev"});
    let img = json!({"driver": "sandbox"});
    vec![
        ("GET", "/v1/whoami", None, None),
        ("GET", "/v1/pool-config", None, Some("pool-config.get")),
        (
            "GET",
            "/v1/pool-config/default",
            None,
            Some("pool-config.get"),
        ),
        (
            "PUT",
            "/v1/pool-config/default",
            Some(pc.clone()),
            Some("pool-config.update"),
        ),
        (
            "PATCH",
            "/v1/pool-config/default",
            Some(json!({"max_vms": 6})),
            Some("pool-config.update"),
        ),
        (
            "DELETE",
            "/v1/pool-config/default",
            None,
            Some("pool-config.delete"),
        ),
        ("GET", "/v1/environments", None, Some("environment.get")),
        ("GET", "/v1/environments/dev", None, Some("environment.get")),
        (
            "PUT",
            "/v1/environments/dev2",
            Some(env.clone()),
            Some("environment.update"),
        ),
        (
            "PATCH",
            "/v1/environments/dev",
            Some(json!({"cpus": 2})),
            Some("environment.update"),
        ),
        (
            "DELETE",
            "/v1/environments/unused",
            None,
            Some("environment.delete"),
        ),
        ("GET", "/v1/workspaces", None, Some("workspace.get")),
        ("GET", "/v1/workspaces/web", None, Some("workspace.get")),
        (
            "PUT",
            "/v1/workspaces/web2",
            Some(ws.clone()),
            Some("workspace.update"),
        ),
        (
            "PATCH",
            "/v1/workspaces/web",
            Some(json!({"min_idle": 0})),
            Some("workspace.update"),
        ),
        (
            "DELETE",
            "/v1/workspaces/gone",
            None,
            Some("workspace.delete"),
        ),
        ("GET", "/v1/images", None, Some("image.get")),
        ("GET", "/v1/images/base", None, Some("image.get")),
        (
            "PUT",
            "/v1/images/base2",
            Some(img.clone()),
            Some("image.update"),
        ),
        (
            "PATCH",
            "/v1/images/base",
            Some(json!({"description": "x"})),
            Some("image.update"),
        ),
        ("DELETE", "/v1/images/unused", None, Some("image.delete")),
        ("GET", "/v1/identities", None, Some("identity.get")),
        (
            "POST",
            "/v1/identities",
            Some(json!({"name": "new-dev", "role": "viewer"})),
            Some("identity.update"),
        ),
        (
            "POST",
            "/v1/identities/target/tokens",
            Some(json!({})),
            Some("identity.update"),
        ),
        (
            "DELETE",
            "/v1/identities/nobody",
            None,
            Some("identity.delete"),
        ),
        ("GET", "/v1/tenants", None, Some("tenant.create")),
        (
            "POST",
            "/v1/tenants",
            Some(json!({"name": "t-new"})),
            Some("tenant.create"),
        ),
    ]
}

fn permission_matrix(b: Backend) {
    let s = Server::start(b);
    let admin = s.admin();
    admin.put_yaml("/v1/images/base", "driver: sandbox\n");
    admin.put_yaml("/v1/environments/dev", "driver: sandbox\n");
    admin.put_yaml("/v1/workspaces/web", "environment: dev\n");
    s.identity("target", "viewer");
    let roles: Vec<(&str, String)> = vec![
        ("viewer", s.identity("a-viewer", "viewer")),
        ("developer", s.identity("a-developer", "developer")),
        ("admin", s.identity("an-admin", "admin")),
        ("operator", s.admin_token.clone()),
    ];
    // What each role holds, as documented in README.md.
    let holds = |role: &str, perm: &str| -> bool {
        let viewer = perm.ends_with(".get") && !perm.starts_with("identity.");
        match role {
            "viewer" => viewer,
            "developer" => {
                viewer || ["agent.spawn", "agent.kill", "workspace.update"].contains(&perm)
            }
            "admin" => perm != "tenant.create",
            _ => true,
        }
    };
    let mut checked = 0;
    for (role, token) in &roles {
        let api = s.client(token);
        let who = api.get("/v1/whoami");
        assert_eq!(who.body["role"].as_str(), Some(*role));
        for (method, path, body, perm) in endpoints() {
            let r = api.request(
                method,
                path,
                body.as_ref().map(|_| "application/json"),
                body.map(|b| b.to_string()),
            );
            assert_ne!(r.status, 401, "{role} {method} {path}: {}", r.text);
            match perm {
                Some(p) if !holds(role, p) => {
                    r.assert_error(
                        403,
                        "PERMISSION_DENIED",
                        &format!("your role does not have {p} permission"),
                    );
                }
                _ => assert_ne!(
                    r.status, 403,
                    "{role} {method} {path} must be allowed: {}",
                    r.text
                ),
            }
            let listed = who.body["permissions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| Some(x.as_str().unwrap()) == perm);
            if let Some(p) = perm {
                assert_eq!(listed, holds(role, p), "whoami of {role} lists {p}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * endpoints().len());
}

fn tenants_never_see_each_other(b: Backend) {
    let s = Server::start(b);
    let a = s.admin();
    let r = a.post("/v1/tenants", json!({"name": "acme"}));
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        (r.body["tenant"].as_str(), r.body["identity"].as_str()),
        (Some("acme"), Some("admin"))
    );
    let bt = s.client(r.body["token"].as_str().unwrap());
    a.post("/v1/tenants", json!({"name": "acme"})).assert_error(
        409,
        "ALREADY_EXISTS",
        "tenant \"acme\" already exists",
    );
    let w = bt.get("/v1/whoami");
    assert_eq!(
        (w.body["tenant"].as_str(), w.body["role"].as_str()),
        (Some("acme"), Some("admin"))
    );

    a.put_yaml(
        "/v1/pool-config/default",
        "max_vms: 10\ndescription: tenant a\n",
    );
    a.put_yaml(
        "/v1/environments/dev",
        "driver: sandbox\nenv:\n  A_ONLY: x\n",
    );
    a.put_yaml("/v1/workspaces/web", "environment: dev\nmin_idle: 1\n");

    // B sees none of A's resources, by name or in lists.
    // B has its own pool config (from its creation), not A's.
    assert_eq!(
        bt.get("/v1/pool-config/default").body["spec"],
        json!({"max_vms": 10, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"})
    );
    assert_eq!(bt.get("/v1/workspaces/web").status, 404);
    assert_eq!(bt.get("/v1/environments").body["items"], json!([]));
    assert_eq!(bt.get("/v1/workspaces").body["items"], json!([]));
    // B cannot change or delete them, nor refer to them.
    assert_eq!(bt.delete("/v1/workspaces/web").status, 404);
    assert_eq!(
        bt.patch("/v1/environments/dev", json!({"cpus": 8})).status,
        404
    );
    bt.put_yaml("/v1/workspaces/web", "environment: dev\n")
        .assert_error(
            409,
            "FAILED_PRECONDITION",
            "environment \"dev\" does not exist; create it first",
        );
    // Same names in B are B's own.
    bt.put_yaml("/v1/pool-config/default", "max_vms: 3\n");
    bt.put_yaml("/v1/environments/dev", "driver: sandbox\ncpus: 8\n");
    assert_eq!(a.get("/v1/pool-config/default").body["spec"]["max_vms"], 10);
    assert_eq!(bt.get("/v1/pool-config/default").body["spec"]["max_vms"], 3);
    assert_eq!(a.get("/v1/environments/dev").body["spec"]["cpus"], 1);
    // A's environment is still in use in A; B deleting its own is fine.
    assert_eq!(bt.delete("/v1/environments/dev").status, 200);
    assert_eq!(a.get("/v1/environments/dev").status, 200);
    // Identities are per tenant too.
    let names = |api: &Api| -> Vec<String> {
        api.get("/v1/identities").body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect()
    };
    s.identity("only-in-a", "developer");
    assert!(!names(&bt).contains(&"only-in-a".to_owned()));
    assert_eq!(bt.delete("/v1/identities/only-in-a").status, 404);
    // Tenant admins cannot list or create tenants.
    bt.get("/v1/tenants").assert_error(
        403,
        "PERMISSION_DENIED",
        "your role does not have tenant.create permission",
    );
}

fn identities_and_roles(b: Backend) {
    let s = Server::start(b);
    let a = s.admin();
    let r = a.post(
        "/v1/identities",
        json!({"name": "ci-bot", "kind": "service", "role": "developer"}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["identity"]["kind"], "service");
    assert!(r.body["token"].as_str().unwrap().starts_with("hth_"));
    a.post(
        "/v1/identities",
        json!({"name": "ci-bot", "role": "viewer"}),
    )
    .assert_error(409, "ALREADY_EXISTS", "identity \"ci-bot\" already exists");
    let r = a.post("/v1/identities", json!({"name": "x", "role": "superuser"}));
    assert_eq!(r.status, 400);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("role: unknown variant `superuser`"),
        "{}",
        r.text
    );
    let r = a.post(
        "/v1/identities",
        json!({"name": "x", "role": "viewer", "colour": "red"}),
    );
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{}",
        r.text
    );
    // An admin may not mint operators.
    let admin2 = s.client(&s.identity("second-admin", "admin"));
    admin2.post("/v1/identities", json!({"name": "op2", "role": "operator"})).assert_error(
        403,
        "PERMISSION_DENIED",
        "your role does not have tenant.create permission, which granting the operator role needs",
    );
    let list = a.get("/v1/identities");
    let names: Vec<&str> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "ci-bot", "second-admin"]);
    assert!(!list.text.contains("hth_"), "no token is ever listed");
}

fn tokens_are_stored_only_as_hashes(b: Backend) {
    let s = Server::start(b);
    let token = s.identity("dev", "developer");
    let secret = token.rsplit('_').next().unwrap().to_owned();
    let admin_secret = s.admin_token.rsplit('_').next().unwrap().to_owned();
    let dump = match b {
        Backend::Sqlite => {
            let mut bytes = Vec::new();
            for entry in std::fs::read_dir(s.data_dir.path()).unwrap() {
                let path = entry.unwrap().path();
                if path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("hearth.db")
                {
                    bytes.extend(std::fs::read(&path).unwrap());
                }
            }
            assert!(!bytes.is_empty());
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Backend::Postgres => {
            let url = s.database_url().unwrap().to_owned();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    use sqlx::{Connection, Row};
                    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
                    let rows = sqlx::query("SELECT row_to_json(t)::text AS j FROM tokens t")
                        .fetch_all(&mut c)
                        .await
                        .unwrap();
                    assert_eq!(rows.len(), 2);
                    rows.iter()
                        .map(|r| r.get::<String, _>("j"))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
        }
    };
    assert!(
        !dump.contains(&secret) && !dump.contains(&admin_secret),
        "a token secret is stored in clear"
    );
}
