//! Caps and roles that cannot be bypassed, and secrets that stay secret,
//! each tried as an attack over real HTTP against the real server: a
//! `--parent` that is not the caller's own active agent, an admin acting
//! above its role, deleting the last identity manager, `expires_in` past
//! its bound, repo URL credentials read by a viewer, and environment values
//! in an agent's output.

use crate::both_backends;
use crate::common::{Answer, Api, Backend, Server, id};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

both_backends!(
    agent_output_is_stored_masked,
    parent_must_be_the_callers_own_active_agent,
    admins_cannot_act_above_their_role,
    the_last_identity_manager_cannot_be_deleted,
    expires_in_is_bounded_and_checked_before_anything_is_stored,
    repo_credentials_are_masked_and_kept_on_round_trip,
    agent_commands_get_the_environment_and_their_output_is_masked,
);

const FAST: &[&str] = &["--resync", "200ms"];

fn agent_count(s: &Server) -> usize {
    let r = s.admin().get("/v1/agents");
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["items"].as_array().unwrap().len()
}

fn identity_names(s: &Server, token: &str) -> Vec<String> {
    let r = s.client(token).get("/v1/identities");
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Reads one text value straight from the server's database (SQLite file
/// or PostgreSQL database): what the store really holds, not an answer.
fn stored_text(s: &Server, query: &str, param: &str) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            use sqlx::Connection;
            match s.database_url() {
                Some(url) => {
                    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                    sqlx::query_scalar(query)
                        .bind(param)
                        .fetch_one(&mut c)
                        .await
                        .unwrap()
                }
                None => {
                    let path = s.data_dir.path().join("hearth.db");
                    let mut c = sqlx::SqliteConnection::connect(&format!(
                        "sqlite://{}?mode=ro",
                        path.display()
                    ))
                    .await
                    .unwrap();
                    sqlx::query_scalar(query)
                        .bind(param)
                        .fetch_one(&mut c)
                        .await
                        .unwrap()
                }
            }
        })
}

fn agent_output_is_stored_masked(b: Backend) {
    let s = Server::start_with(b, FAST);
    let secret = "stored-s3cret-77";
    s.pool(
        4,
        &format!("driver: fake\nenv:\n  TOKEN: {secret}\n"),
        "web",
        "min_idle: 0\nrepos:\n- url: https://ci:repo-pw-55@git.example/r.git\n",
    );
    // The fake driver echoes each command as its output.
    let a = s.spawn(
        &s.admin_token,
        json!({"workspace": "web", "command": format!("echo {secret} and repo-pw-55")}),
    );
    assert_eq!(a.status, 201, "{}", a.text);
    let a = id(&a.body);
    let done = s.wait_agent(&a, "completed", 30);
    let stored = stored_text(&s, "SELECT output FROM agents WHERE id = $1", &a);
    assert_eq!(stored, "echo *** and ***\n", "{done}");
    assert_eq!(done["output"], stored);
    // The stored workspace keeps the credential sealed, not masked (the
    // VM clones with it: `secrets_at_rest` tests that).
    let spec = stored_text(
        &s,
        "SELECT spec FROM resources WHERE kind = 'workspace' AND name = $1",
        "web",
    );
    assert!(
        !spec.contains("repo-pw-55") && !spec.contains("***") && spec.contains("hearth-sealed:v1:"),
        "{spec}"
    );
}

fn parent_must_be_the_callers_own_active_agent(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(10, "driver: fake\n", "web", "min_idle: 0\n");
    let r = s.admin().patch(
        "/v1/pool-config/default",
        json!({"max_agents_per_developer": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let alice = s.identity("alice", "developer");
    let bob = s.identity("bob", "developer");
    let a = s.spawn(&alice, json!({"workspace": "web"}));
    assert_eq!(a.status, 201, "{}", a.text);
    let a = id(&a.body);
    let b1 = s.spawn(&bob, json!({"workspace": "web"}));
    assert_eq!(b1.status, 201, "{}", b1.text);
    let before = agent_count(&s);

    // Bob is at his cap; hanging agents off Alice's would dodge it.
    let rule = "a child agent's parent must be one of your own active agents";
    s.spawn(&bob, json!({"workspace": "web", "parent": a}))
        .assert_error(
            400,
            "INVALID_ARGUMENT",
            &format!("parent agent {a} belongs to \"alice\", not to you: {rule}"),
        );
    let unknown = uuid::Uuid::new_v4().to_string();
    s.spawn(&bob, json!({"workspace": "web", "parent": unknown}))
        .assert_error(
            404,
            "NOT_FOUND",
            &format!("parent agent {unknown} not found"),
        );
    s.spawn(&bob, json!({"workspace": "web", "parent": "not-an-id"}))
        .assert_error(
            400,
            "INVALID_ARGUMENT",
            "parent \"not-an-id\" is not an agent id",
        );
    let out = s.cli(&bob, &["--workspace", "web", "spawn", "--parent", &a], "");
    assert_eq!(
        (out.code, out.stderr.trim_end()),
        (
            1,
            format!("INVALID_ARGUMENT: parent agent {a} belongs to \"alice\", not to you: {rule}")
                .as_str()
        ),
        "{out:?}"
    );
    assert_eq!(agent_count(&s), before, "no refused spawn left an agent");

    // Alice's own active agent is a parent, exempt from her cap.
    let child = s.spawn(&alice, json!({"workspace": "web", "parent": a}));
    assert_eq!(
        (child.status, child.body["parent"].as_str()),
        (201, Some(a.as_str())),
        "{}",
        child.text
    );
    // A killed one is not.
    let killed = s
        .client(&alice)
        .post(&format!("/v1/agents/{a}/kill"), json!({}));
    assert_eq!(killed.body["phase"], "killed", "{}", killed.text);
    s.spawn(&alice, json!({"workspace": "web", "parent": a}))
        .assert_error(
            409,
            "FAILED_PRECONDITION",
            &format!("parent agent {a} is killed: {rule}"),
        );
    // Resurrect stays exempt from the cap: Alice fills it again, then
    // brings the killed agent back.
    let again = s.spawn(&alice, json!({"workspace": "web"}));
    assert_eq!(again.status, 201, "{}", again.text);
    s.spawn(&alice, json!({"workspace": "web"}))
        .assert_error(429, "RESOURCE_EXHAUSTED", "you have reached your organization's limit of 1 active agents (this includes idle and sleeping agents) — contact your admin to raise the max agents per developer");
    let back = s
        .client(&alice)
        .post(&format!("/v1/agents/{a}/resurrect"), json!({}));
    assert_eq!(
        (back.status, back.body["id"].as_str()),
        (200, Some(a.as_str())),
        "{}",
        back.text
    );
}

fn admins_cannot_act_above_their_role(b: Backend) {
    let s = Server::start(b);
    let boss = s.identity("boss", "admin");
    let dev = s.identity("dev", "developer");
    let api = s.client(&boss);

    // Becoming the operator: a token for it, deleting it, or a new one.
    api.post("/v1/identities/admin/tokens", json!({}))
        .assert_error(
            403,
            "PERMISSION_DENIED",
            "you cannot issue a token for identity \"admin\": its role operator is above your own role admin",
        );
    api.delete("/v1/identities/admin").assert_error(
        403,
        "PERMISSION_DENIED",
        "you cannot delete identity \"admin\": its role operator is above your own role admin",
    );
    api.post("/v1/identities", json!({"name": "op2", "role": "operator"}))
        .assert_error(
            403,
            "PERMISSION_DENIED",
            "your role does not have tenant.create permission, which granting the operator role needs",
        );
    let out = s.cli(&boss, &["identity", "token", "admin"], "");
    assert_eq!(
        (out.code, out.stderr.trim_end()),
        (
            1,
            "PERMISSION_DENIED: you cannot issue a token for identity \"admin\": its role operator is above your own role admin"
        ),
        "{out:?}"
    );
    assert_eq!(identity_names(&s, &boss), ["admin", "boss", "dev"]);
    // The operator is untouched and still works.
    let who = s.admin().get("/v1/whoami");
    assert_eq!(
        (who.status, who.body["role"].as_str()),
        (200, Some("operator"))
    );

    // At or below the admin's own role, everything works.
    let r = api.post("/v1/identities/dev/tokens", json!({"expires_in": "1h"}));
    assert_eq!(r.status, 201, "{}", r.text);
    let minted = r.body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        s.client(&minted).get("/v1/whoami").body["role"],
        "developer"
    );
    let r = api.post("/v1/identities", json!({"name": "boss2", "role": "admin"}));
    assert_eq!(r.status, 201, "{}", r.text);
    let r = api.post("/v1/identities/boss2/tokens", json!({}));
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(api.delete("/v1/identities/boss2").status, 200);
    assert_eq!(api.delete("/v1/identities/dev").status, 200);
    assert_eq!(s.client(&dev).get("/v1/whoami").status, 401);
    // A developer has no identity permission at all.
    let dev2 = s.identity("dev2", "developer");
    s.client(&dev2)
        .post("/v1/identities/admin/tokens", json!({}))
        .assert_error(
            403,
            "PERMISSION_DENIED",
            "your role does not have identity.update permission",
        );
}

fn the_last_identity_manager_cannot_be_deleted(b: Backend) {
    let s = Server::start(b);
    let last = "cannot delete identity \"admin\": it is the last identity of this tenant that can manage identities (identity.update); create another admin first";
    // The operator alone: it cannot delete itself.
    s.admin()
        .delete("/v1/identities/admin")
        .assert_error(409, "FAILED_PRECONDITION", last);
    // Viewers and developers do not manage identities: they do not count.
    s.identity("viewer", "viewer");
    s.identity("dev", "developer");
    s.admin()
        .delete("/v1/identities/admin")
        .assert_error(409, "FAILED_PRECONDITION", last);
    let out = s.cli(&s.admin_token, &["identity", "delete", "admin"], "");
    assert_eq!(
        (out.code, out.stderr.trim_end()),
        (1, format!("FAILED_PRECONDITION: {last}").as_str()),
        "{out:?}"
    );

    // A tenant made with POST /v1/tenants: its admin is the same.
    let r = s
        .admin()
        .post("/v1/tenants", json!({"name": "acme", "admin": "root"}));
    assert_eq!(r.status, 201, "{}", r.text);
    let root = r.body["token"].as_str().unwrap().to_owned();
    let api = s.client(&root);
    assert_eq!(
        api.get("/v1/whoami").body["role"],
        "admin",
        "a tenant's first identity is an admin"
    );
    api.delete("/v1/identities/root").assert_error(
        409,
        "FAILED_PRECONDITION",
        "cannot delete identity \"root\": it is the last identity of this tenant that can manage identities (identity.update); create another admin first",
    );
    api.post("/v1/identities", json!({"name": "op", "role": "operator"}))
        .assert_error(
            403,
            "PERMISSION_DENIED",
            "your role does not have tenant.create permission, which granting the operator role needs",
        );
    // Two admins deleting each other at once: exactly one succeeds.
    let mut survivor = (root.clone(), "root".to_owned());
    for round in 0..5 {
        let name = format!("second{round}");
        let r = s
            .client(&survivor.0)
            .post("/v1/identities", json!({"name": name, "role": "admin"}));
        assert_eq!(r.status, 201, "{}", r.text);
        let second = (r.body["token"].as_str().unwrap().to_owned(), name);
        let racer = |(token, _): &(String, String), (_, victim): &(String, String)| {
            let api = Api {
                base: s.url.clone(),
                token: Some(token.clone()),
            };
            let path = format!("/v1/identities/{victim}");
            std::thread::spawn(move || api.delete(&path))
        };
        let one = racer(&survivor, &second);
        let two = racer(&second, &survivor);
        let (one, two): (Answer, Answer) = (one.join().unwrap(), two.join().unwrap());
        let ok = [one.status, two.status]
            .iter()
            .filter(|s| **s == 200)
            .count();
        assert_eq!(ok, 1, "round {round}: {} / {}", one.text, two.text);
        if two.status == 200 {
            survivor = second;
        }
        let names = identity_names(&s, &survivor.0);
        assert_eq!(names, [survivor.1.clone()], "round {round}");
    }
}

fn expires_in_is_bounded_and_checked_before_anything_is_stored(b: Backend) {
    let s = Server::start(b);
    let api = s.admin();
    let before = identity_names(&s, &s.admin_token);

    // At the bound: fine, and it expires 366 days from now.
    let r = api.post(
        "/v1/identities",
        json!({"name": "yearly", "role": "viewer", "expires_in": "366d"}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let at = humantime::parse_rfc3339(r.body["expires_at"].as_str().unwrap()).unwrap();
    let ahead = at
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    assert!(
        (366 * 86_400 - 120..=366 * 86_400).contains(&ahead),
        "{ahead}"
    );
    let token = r.body["token"].as_str().unwrap().to_owned();
    assert_eq!(s.client(&token).get("/v1/whoami").status, 200);

    // Beyond it, and far beyond (once a panic after the identity was
    // stored, or a wrap-around to hours away): refused, nothing stored.
    for (i, long) in [
        "367d",
        "8785h",
        "300000000d",
        "99999999999999d",
        "18446744073709551615s",
        "99999999999999999999999999d",
    ]
    .iter()
    .enumerate()
    {
        let message = format!("expires_in {long:?} is too long: tokens may last at most 366d");
        api.post(
            "/v1/identities",
            json!({"name": format!("long{i}"), "role": "viewer", "expires_in": long}),
        )
        .assert_error(400, "INVALID_ARGUMENT", &message);
        api.post("/v1/identities/yearly/tokens", json!({"expires_in": long}))
            .assert_error(400, "INVALID_ARGUMENT", &message);
    }
    let mut expected = before.clone();
    expected.push("yearly".into());
    expected.sort();
    assert_eq!(identity_names(&s, &s.admin_token), expected);
    let r = api.post(
        "/v1/identities/yearly/tokens",
        json!({"expires_in": "366d"}),
    );
    assert_eq!(r.status, 201, "{}", r.text);

    // The CLI checks the same bound before sending anything.
    let out = s.cli(
        &s.admin_token,
        &[
            "identity",
            "create",
            "cli",
            "--role",
            "viewer",
            "--expires-in",
            "400d",
        ],
        "",
    );
    assert_eq!(
        (out.code, out.stderr.trim_end()),
        (
            1,
            "INVALID_ARGUMENT: --expires-in \"400d\" is too long: tokens may last at most 366d"
        ),
        "{out:?}"
    );
    let out = s.cli(
        &s.admin_token,
        &[
            "identity",
            "token",
            "yearly",
            "--expires-in",
            "99999999999999999999d",
        ],
        "",
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("is too long"), "{out:?}");
    assert_eq!(identity_names(&s, &s.admin_token), expected);
    assert!(!s.logs().contains("panicked"), "{}", s.logs_tail());
}

/// The repos a workspace with credentials in its URLs is written with, and
/// what a reader sees of them.
const SECRET_REPOS: &str = "environment: dev
repos:
- url: https://user:hunter2-pass@git.example/a.git
- url: https://ghp_tok3n@git.example/b.git
- url: ssh://git@git.example/c.git
";

fn repo_credentials_are_masked_and_kept_on_round_trip(b: Backend) {
    let s = Server::start(b);
    s.pool(5, "driver: fake\n", "web", "min_idle: 0\n");
    let admin = s.admin();
    let r = admin.put_yaml("/v1/workspaces/web", SECRET_REPOS);
    assert_eq!(r.status, 200, "{}", r.text);
    let version = r.body["resource"]["version"].as_i64().unwrap();
    assert!(
        !r.text.contains("hunter2") && !r.text.contains("ghp_tok3n"),
        "{}",
        r.text
    );
    let viewer = s.identity("vic", "viewer");
    let shown = [
        "https://user:***@git.example/a.git",
        "https://***@git.example/b.git",
        "ssh://git@git.example/c.git",
    ];
    for path in ["/v1/workspaces", "/v1/workspaces/web"] {
        let r = s.client(&viewer).get(path);
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            !r.text.contains("hunter2") && !r.text.contains("ghp_tok3n"),
            "{}",
            r.text
        );
        let spec = if path == "/v1/workspaces" {
            &r.body["items"][0]["spec"]
        } else {
            &r.body["spec"]
        };
        let urls: Vec<&str> = spec["repos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["url"].as_str().unwrap())
            .collect();
        assert_eq!(urls, shown);
    }
    for args in [
        &["get", "ws", "web"][..],
        &["get", "ws"],
        &["get", "ws", "web", "-o", "json"],
    ] {
        let out = s.cli(&viewer, args, "");
        assert_eq!(out.code, 0, "{out:?}");
        assert!(
            !out.stdout.contains("hunter2") && !out.stdout.contains("ghp_tok3n"),
            "{out:?}"
        );
        if args.len() > 2 {
            assert!(out.stdout.contains("user:***@git.example"), "{out:?}");
        }
    }

    // Written back as shown: the stored credentials stay — the spec is
    // unchanged, its version too.
    let shown_spec = admin.get("/v1/workspaces/web").body["spec"].clone();
    let r = admin.put_json("/v1/workspaces/web", shown_spec.clone());
    assert_eq!(
        (
            r.status,
            r.body["outcome"].as_str(),
            r.body["resource"]["version"].as_i64()
        ),
        (200, Some("unchanged"), Some(version)),
        "{}",
        r.text
    );
    let yaml = s.cli(&s.admin_token, &["get", "ws", "web"], "").stdout;
    let out = s.cli(&s.admin_token, &["set", "ws", "web"], &yaml);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "workspace/web unchanged\n"),
        "{out:?}"
    );
    // A patch of another field keeps them too.
    let r = admin.patch("/v1/workspaces/web", json!({"description": "web app"}));
    assert_eq!(r.status, 200, "{}", r.text);
    let r = admin.patch("/v1/workspaces/web", json!({"description": null}));
    assert_eq!(r.status, 200, "{}", r.text);
    // Reordered repos are matched by folder, not position.
    let mut reordered = shown_spec.clone();
    reordered["repos"].as_array_mut().unwrap().reverse();
    let r = admin.put_json("/v1/workspaces/web", reordered);
    assert_eq!(r.status, 200, "{}", r.text);
    let r = admin.put_json("/v1/workspaces/web", shown_spec.clone());
    assert_eq!(r.status, 200, "{}", r.text);
    // The mask sent to another host would leak the stored credential
    // there: refused, and nothing changes.
    let mut moved = shown_spec.clone();
    moved["repos"][0]["url"] = json!("https://user:***@evil.example/a.git");
    let before = admin.get("/v1/workspaces/web").body["version"].clone();
    admin.put_json("/v1/workspaces/web", moved).assert_error(
        400,
        "INVALID_ARGUMENT",
        "repos[0].url: \"***\" is the mask for a stored credential, and no stored repo has the URL \"https://user:***@evil.example/a.git\"; give the real credential",
    );
    // A new workspace cannot claim a credential it never had.
    let r = admin.put_json("/v1/workspaces/api", shown_spec);
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(admin.get("/v1/workspaces/web").body["version"], before);
    // The stored spec still holds the real credentials, sealed (never the
    // mask; the URL without one stays plain), and writing them by hand is
    // an unchanged write.
    let spec = stored_text(
        &s,
        "SELECT spec FROM resources WHERE kind = 'workspace' AND name = $1",
        "web",
    );
    assert!(
        !spec.contains("hunter2-pass")
            && !spec.contains("ghp_tok3n")
            && !spec.contains("***")
            && spec.matches("hearth-sealed:v1:").count() == 2
            && spec.contains("ssh://git@git.example/c.git"),
        "{spec}"
    );
    let r = admin.put_yaml("/v1/workspaces/web", SECRET_REPOS);
    assert_eq!(r.body["outcome"], "unchanged", "{}", r.text);
}

/// A git repository served over dumb HTTP by a server that answers 401 to
/// any request without the right Basic credentials: a clone through it
/// works only with the stored credential.
struct AuthGitServer {
    port: u16,
    _root: tempfile::TempDir,
    authorized: Arc<AtomicUsize>,
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=h",
            "-c",
            "user.email=h@localhost",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl AuthGitServer {
    fn start(user: &str, password: &str, files: &[(&str, &str)]) -> AuthGitServer {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q"]);
        for (path, text) in files {
            std::fs::write(work.join(path), text).unwrap();
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "first"]);
        git(root.path(), &["clone", "-q", "--bare", "work", "r.git"]);
        git(&root.path().join("r.git"), &["update-server-info"]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let expected = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        let authorized = Arc::new(AtomicUsize::new(0));
        let served: PathBuf = root.path().to_owned();
        let count = authorized.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (served, expected, count) = (served.clone(), expected.clone(), count.clone());
                std::thread::spawn(move || serve(stream, &served, &expected, &count));
            }
        });
        AuthGitServer {
            port,
            _root: root,
            authorized,
        }
    }
}

fn serve(stream: TcpStream, root: &Path, expected: &str, authorized: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut auth = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            auth = Some(value.trim().to_owned());
        }
    }
    if auth.as_deref() != Some(expected) {
        let _ = writer.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    authorized.fetch_add(1, Ordering::SeqCst);
    let rel = path.split('?').next().unwrap().trim_start_matches('/');
    let file = root.join(rel);
    let mut body = Vec::new();
    match std::fs::File::open(&file).and_then(|mut f| f.read_to_end(&mut body)) {
        Ok(_) if !rel.contains("..") => {
            let _ = writer.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes(),
            );
            let _ = writer.write_all(&body);
        }
        _ => {
            let _ = writer.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    }
}

fn agent_commands_get_the_environment_and_their_output_is_masked(b: Backend) {
    let s = Server::start_with(b, FAST);
    let secret = "s3cr3t-value-42";
    let password = "hunter2-http";
    let git = AuthGitServer::start(
        "deploy",
        password,
        &[("hello.txt", "hello from the repo\n")],
    );
    let url = format!("http://deploy:{password}@127.0.0.1:{}/r.git", git.port);
    s.pool(
        4,
        // The host's network (an operator's choice): the server listens on
        // the host's loopback.
        &format!("driver: sandbox\nmemory: 256Mi\nnetwork: host\nenv:\n  SECRET_VAR: {secret}\n"),
        "web",
        &format!("min_idle: 0\nrepos:\n- url: {url}\n  name: r\n"),
    );
    // The credential round trip first: the VM below clones with what the
    // store kept after `***` was written back.
    let admin = s.admin();
    let shown = admin.get("/v1/workspaces/web").body["spec"].clone();
    assert_eq!(
        shown["repos"][0]["url"],
        format!("http://deploy:***@127.0.0.1:{}/r.git", git.port)
    );
    let r = admin.put_json("/v1/workspaces/web", shown);
    assert_eq!(r.body["outcome"], "unchanged", "{}", r.text);

    let dev = s.identity("dev", "developer");
    let viewer = s.identity("vic", "viewer");
    // The command sees the variable (reversed, it is no longer the secret
    // and shows through the mask) and prints it plainly too.
    let command = "echo \"plain=$SECRET_VAR\"; printf %s \"$SECRET_VAR\" | rev; echo; cat /home/r/hello.txt; git -C /home/r remote get-url origin";
    let a = s.spawn(&dev, json!({"workspace": "web", "command": command}));
    assert_eq!(a.status, 201, "{}", a.text);
    let a = id(&a.body);
    let done = s.wait_agent(&a, "completed", 120);
    let reversed: String = secret.chars().rev().collect();
    let masked_url = format!("http://deploy:***@127.0.0.1:{}/r.git", git.port);
    // Its owner reads the output (a viewer reads none of it:
    // `developer_scoping` tests that).
    let r = s.client(&dev).get(&format!("/v1/agents/{a}"));
    assert_eq!(r.status, 200, "{}", r.text);
    let output = r.body["output"].as_str().unwrap();
    assert_eq!(
        output,
        format!("plain=***\n{reversed}\nhello from the repo\n{masked_url}\n"),
        "{done}"
    );
    assert!(
        git.authorized.load(Ordering::SeqCst) > 0,
        "the clone used the credential"
    );
    for text in [
        r.text.clone(),
        s.client(&dev).get("/v1/agents").text,
        s.cli(&dev, &["agents", "get", &a], "").stdout,
        s.cli(&dev, &["agents", "get", &a, "-o", "json"], "").stdout,
        s.client(&viewer).get("/v1/agents").text,
    ] {
        assert!(!text.contains(secret) && !text.contains(password), "{text}");
    }
    // The instance steps of that VM do not leak them either.
    let instances = admin.get("/v1/instances");
    assert_eq!(instances.status, 200, "{}", instances.text);
    assert!(
        !instances.text.contains(secret) && !instances.text.contains(password),
        "{}",
        instances.text
    );

    // Exec on an agent's VM: same environment, same masking.
    let idle = s.spawn(&dev, json!({"workspace": "web"}));
    let idle = id(&idle.body);
    s.wait_agent(&idle, "running", 120);
    let r = s.client(&dev).post(
        &format!("/v1/agents/{idle}/exec"),
        json!({"command": "echo \"$SECRET_VAR\"; printf %s \"$SECRET_VAR\" | rev >&2; echo \"$HEARTH_AGENT_ID\""}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        (
            r.body["stdout"].as_str(),
            r.body["stderr"].as_str(),
            r.body["exit_code"].as_i64()
        ),
        (
            Some(format!("***\n{idle}\n").as_str()),
            Some(reversed.as_str()),
            Some(0)
        ),
        "{}",
        r.text
    );
    let out = s.cli(
        &dev,
        &["agents", "exec", &idle, "--", "printenv", "SECRET_VAR"],
        "",
    );
    assert_eq!((out.code, out.stdout.as_str()), (0, "***\n"), "{out:?}");
    let killed = s
        .client(&dev)
        .post(&format!("/v1/agents/{idle}/kill"), json!({}));
    assert_eq!(killed.status, 200, "{}", killed.text);
}
