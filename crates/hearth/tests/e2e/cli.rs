//! The `hearth` CLI against a real server: the documented example, output
//! formats, errors, configuration files and login.

use crate::both_backends;
use crate::common::{Backend, Server, run_cli};
use std::os::unix::fs::PermissionsExt;

both_backends!(
    readme_example_works_as_written,
    errors_print_code_and_message_and_exit_non_zero,
    output_formats,
    configuration_files_are_found_upwards,
    login_writes_a_private_local_file,
    identities_and_tenants_from_the_cli,
);

fn readme_example_works_as_written(b: Backend) {
    let s = Server::start(b);
    let t = &s.admin_token;
    let out = s.cli(t, &["set", "pool-config", "default"], "max_vms: 50\n");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "pool-config/default configured\n"),
        "{out:?}"
    );
    let out = s.cli(
        t,
        &["patch", "pool-config", "default", "--set", "max_vms=100"],
        "",
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "pool-config/default patched\n"),
        "{out:?}"
    );
    let out = s.cli(t, &["get", "pool-config", "default"], "");
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "max_vms: 100\nmax_agents_per_developer: 0\nreap_stranded_workflows: dry_run\n"
    );
    let out = s.cli(t, &["set", "pool-config", "default"], "max_vms: 100\n");
    assert_eq!(out.stdout, "pool-config/default unchanged\n", "{out:?}");
    let out = s.cli(t, &["delete", "pool-config", "default"], "");
    assert_eq!(
        (out.code, out.stderr.as_str()),
        (
            1,
            "FAILED_PRECONDITION: the pool config cannot be deleted; set it instead (hearth set pool-config default)\n"
        ),
        "{out:?}"
    );
}

fn errors_print_code_and_message_and_exit_non_zero(b: Backend) {
    let s = Server::start(b);
    let t = &s.admin_token;
    let out = s.cli(t, &["set", "pool-config", "default"], "max_vms: 0\n");
    assert_eq!(
        (out.code, out.stderr.as_str(), out.stdout.as_str()),
        (1, "INVALID_ARGUMENT: max_vms must be positive\n", "")
    );
    let out = s.cli(
        t,
        &["set", "pool-config", "default"],
        "max_vms: 2\ndescripton: typo\n",
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.starts_with("INVALID_ARGUMENT: ")
            && out.stderr.contains("unknown field `descripton`")
            && out.stderr.contains("line 2"),
        "{out:?}"
    );
    let out = s.cli(
        t,
        &[
            "patch",
            "pool-config",
            "default",
            "--set",
            "max_agents_per_developer=-1",
        ],
        "",
    );
    // The tenant's pool config exists from its creation: the patch is
    // checked against it (no NOT_FOUND before a first set).
    assert_eq!(
        (out.code, out.stderr.as_str()),
        (
            1,
            "INVALID_ARGUMENT: max_agents_per_developer must not be negative (0 = unlimited)\n"
        ),
        "{out:?}"
    );
    s.cli(t, &["set", "pool-config", "default"], "max_vms: 2\n");
    let out = s.cli(
        t,
        &[
            "patch",
            "pool-config",
            "default",
            "--set",
            "max_agents_per_developer=-1",
        ],
        "",
    );
    assert_eq!(
        out.stderr,
        "INVALID_ARGUMENT: max_agents_per_developer must not be negative (0 = unlimited)\n"
    );
    let out = s.cli(
        t,
        &["patch", "pool-config", "default", "--set", "max_vms"],
        "",
    );
    assert_eq!(
        (out.code, out.stderr.as_str()),
        (
            1,
            "INVALID_ARGUMENT: --set expects key=value, got \"max_vms\"\n"
        )
    );
    let out = s.cli(t, &["get", "vm"], "");
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .starts_with("INVALID_ARGUMENT: unknown kind \"vm\""),
        "{out:?}"
    );

    let viewer = s.identity("viewer", "viewer");
    let out = s.cli(&viewer, &["delete", "pool-config", "default"], "");
    assert_eq!(
        (out.code, out.stderr.as_str()),
        (
            1,
            "PERMISSION_DENIED: your role does not have pool-config.delete permission\n"
        )
    );

    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(
        dir.path(),
        &["get", "pool-config", "default"],
        "",
        &[("HEARTH_SERVER", &s.url)],
    );
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr,
        "UNAUTHENTICATED: missing bearer token: pass --token, set HEARTH_TOKEN or run hearth auth login\n"
    );

    // A server that is not there.
    let out = run_cli(
        dir.path(),
        &["--server", "http://127.0.0.1:9", "get", "workspace"],
        "",
        &[],
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .starts_with("UNAVAILABLE: cannot reach the hearth server at http://127.0.0.1:9"),
        "{out:?}"
    );
}

fn output_formats(b: Backend) {
    let s = Server::start(b);
    let t = &s.admin_token;
    let out = s.cli(t, &["get", "workspaces"], "");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "No workspace resources found.\n"),
        "{out:?}"
    );
    s.cli(
        t,
        &["set", "environment", "dev"],
        "driver: sandbox\ncpus: 2\nenv:\n  TOKEN: hush-hush\n",
    );
    s.cli(
        t,
        &["set", "workspace", "web"],
        "environment: dev\nmin_idle: 2\nmax_idle: 4\nrepos:\n- url: https://git.example/web.git\n",
    );
    s.cli(t, &["set", "workspace", "api"], "environment: dev\n");

    let out = s.cli(t, &["get", "workspace"], "");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "ENVIRONMENT", "MIN_IDLE", "MAX_IDLE", "REPOS"]
    );
    assert_eq!(
        lines[1].split_whitespace().take(4).collect::<Vec<_>>(),
        ["api", "dev", "0", "0"]
    );
    assert_eq!(
        lines[2].split_whitespace().take(4).collect::<Vec<_>>(),
        ["web", "dev", "2", "4"]
    );

    let out = s.cli(t, &["get", "workspace", "-o", "json"], "");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON list");
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["name"], "web");
    assert_eq!(v[1]["min_idle"], 2);

    let out = s.cli(t, &["get", "workspace", "web", "-o", "json"], "");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON object");
    assert_eq!(v["repos"][0]["url"], "https://git.example/web.git");

    let out = s.cli(t, &["get", "environment", "dev"], "");
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out.stdout).unwrap();
    assert_eq!(v["env"]["TOKEN"].as_str(), Some("***"));
    assert_eq!(v["version"].as_i64(), Some(1));
    assert!(
        out.stdout.trim_end().ends_with("version: 1"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("hush-hush"));

    // get | set round-trips, masked secrets included.
    let out2 = s.cli(t, &["set", "environment", "dev"], &out.stdout);
    assert_eq!(out2.stdout, "environment/dev unchanged\n", "{out2:?}");

    let out = s.cli(t, &["get", "workspace", "-o", "yaml"], "");
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out.stdout).unwrap();
    assert_eq!(v[0]["name"].as_str(), Some("api"));

    let out = s.cli(
        t,
        &[
            "patch",
            "workspace",
            "web",
            "--set",
            "warm_pool.enabled=false",
            "--set",
            "description=front end",
        ],
        "",
    );
    assert_eq!(out.stdout, "workspace/web patched\n", "{out:?}");
    let out = s.cli(t, &["get", "workspace", "web", "-o", "json"], "");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (
            v["warm_pool"]["enabled"].as_bool(),
            v["description"].as_str()
        ),
        (Some(false), Some("front end"))
    );
}

fn configuration_files_are_found_upwards(b: Backend) {
    let s = Server::start(b);
    let project = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("hearth.yaml"),
        format!("server: {}\nworkspace: web\n", s.url),
    )
    .unwrap();
    // The token is bound to its server, with the CA to check it by.
    std::fs::write(
        project.path().join("hearth.local.yaml"),
        format!(
            "credentials:\n- server: {}\n  ca: {}\n  token: {}\n",
            s.url,
            s.ca.as_ref().unwrap().display(),
            s.admin_token
        ),
    )
    .unwrap();
    let nested = project.path().join("src/deep/er");
    std::fs::create_dir_all(&nested).unwrap();
    let out = run_cli(
        &nested,
        &["set", "pool-config", "default"],
        "max_vms: 7\n",
        &[],
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "pool-config/default configured\n"),
        "{out:?}"
    );
    // A flag beats the file (given with the server it is for: a token of
    // a flag is never sent to a server only hearth.yaml names).
    let out = run_cli(
        &nested,
        &["--token", "hth_bad", "get", "pool-config", "default"],
        "",
        &[],
    );
    assert!(
        out.stderr.starts_with(&format!(
            "FAILED_PRECONDITION: refusing to send the token of --token to {}, which ",
            s.url
        )),
        "{out:?}"
    );
    let out = run_cli(
        &nested,
        &[
            "--server",
            &s.url,
            "--token",
            "hth_bad",
            "get",
            "pool-config",
            "default",
        ],
        "",
        &[("HEARTH_CA", s.ca.as_ref().unwrap().to_str().unwrap())],
    );
    assert_eq!(out.stderr, "UNAUTHENTICATED: malformed token\n");
    // So does the environment.
    let out = run_cli(
        &nested,
        &["get", "pool-config", "default"],
        "",
        &[("HEARTH_TOKEN", "hth_bad"), ("HEARTH_SERVER", &s.url)],
    );
    assert_eq!(out.stderr, "UNAUTHENTICATED: malformed token\n");
    // An unknown field in hearth.yaml is named.
    std::fs::write(
        project.path().join("hearth.yaml"),
        format!("server: {}\nservre: x\n", s.url),
    )
    .unwrap();
    let out = run_cli(&nested, &["get", "pool-config", "default"], "", &[]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("hearth.yaml") && out.stderr.contains("servre"),
        "{out:?}"
    );

    // Next to the server's default data dir, its admin token is picked up,
    // bound to the URL the server wrote beside it, checked with its CA.
    let local = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(local.path().join(".hearth/tls")).unwrap();
    for file in ["admin-token", "server-url", "tls/ca.pem"] {
        std::fs::copy(
            s.data_dir.path().join(file),
            local.path().join(".hearth").join(file),
        )
        .unwrap();
    }
    std::fs::write(
        local.path().join("hearth.yaml"),
        format!("server: {}\n", s.url),
    )
    .unwrap();
    let out = run_cli(local.path(), &["get", "pool-config", "default"], "", &[]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "max_vms: 7\nmax_agents_per_developer: 0\nreap_stranded_workflows: dry_run\n"
        ),
        "{out:?}"
    );
}

fn login_writes_a_private_local_file(b: Backend) {
    let s = Server::start(b);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hearth.yaml"),
        format!("server: {}\n", s.url),
    )
    .unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let dev = s.identity("dana", "developer");
    let ca = s.ca.as_ref().unwrap().to_str().unwrap();
    let out = run_cli(
        &sub,
        &["auth", "login", "--token", &dev],
        "",
        &[("HEARTH_CA", ca)],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("as dana (developer) in tenant default"),
        "{out:?}"
    );
    let local = dir.path().join("hearth.local.yaml");
    let text = std::fs::read_to_string(&local).expect("written next to hearth.yaml");
    assert!(text.contains(&dev));
    // Bound to the server it was checked against, with the CA it was checked by.
    let file: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(
        file["credentials"][0]["server"].as_str(),
        Some(s.url.as_str())
    );
    assert_eq!(file["credentials"][0]["ca"].as_str(), Some(ca));
    assert_eq!(
        std::fs::metadata(&local).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = run_cli(&sub, &["auth", "whoami"], "", &[]);
    assert!(
        out.stdout.contains("identity: dana") && out.stdout.contains("role: developer"),
        "{out:?}"
    );
    // A bad token is refused and nothing is written.
    let other = tempfile::tempdir().unwrap();
    let out = run_cli(
        other.path(),
        &["--server", &s.url, "auth", "login", "--token", "hth_nope"],
        "",
        &[],
    );
    assert_eq!(out.code, 1);
    assert!(!other.path().join("hearth.local.yaml").exists());
}

fn identities_and_tenants_from_the_cli(b: Backend) {
    let s = Server::start(b);
    let t = &s.admin_token;
    let out = s.cli(
        t,
        &[
            "identity",
            "create",
            "robo",
            "--role",
            "developer",
            "--kind",
            "service",
        ],
        "",
    );
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out.stdout).unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    let who = s.cli(&token, &["auth", "whoami"], "");
    assert!(who.stdout.contains("kind: service"), "{who:?}");
    let out = s.cli(t, &["identity", "list"], "");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>().starts_with(&[
                "robo",
                "service",
                "developer"
            ])),
        "{out:?}"
    );
    let out = s.cli(t, &["tenant", "create", "acme"], "");
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out.stdout).unwrap();
    assert_eq!(v["tenant"].as_str(), Some("acme"));
    let acme = v["token"].as_str().unwrap().to_owned();
    // A new tenant starts with its pool config (the default max_vms).
    let out = s.cli(&acme, &["get", "pool-config", "default"], "");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "max_vms: 10\nmax_agents_per_developer: 0\nreap_stranded_workflows: dry_run\n"
        ),
        "{out:?}"
    );
    let out = s.cli(t, &["tenant", "list"], "");
    assert!(
        out.stdout.contains("acme") && out.stdout.contains("default"),
        "{out:?}"
    );
    let out = s.cli(t, &["identity", "delete", "robo"], "");
    assert_eq!(out.stdout, "identity/robo deleted\n", "{out:?}");
}
