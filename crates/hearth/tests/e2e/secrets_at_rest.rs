//! Secrets at rest, tried as an attacker who copies the database (the
//! SQLite file and its WAL, or PostgreSQL's rows) would: environment
//! variable values and repo URL credentials written through the real API
//! are nowhere in it as plaintext; a server given the copy without the
//! key, or with another key, refuses to start; the server with its key
//! still provisions VMs with the real values (a real sandbox reads them);
//! a store from before sealing gets its plaintext sealed on start.

use crate::both_backends;
use crate::common::{Backend, Server, binary, block_on, guest_agent, id, wait_until};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

both_backends!(
    secrets_are_sealed_in_the_store_and_the_key_is_required,
    plaintext_secrets_of_an_older_store_are_sealed_on_start,
);

const FAST: &[&str] = &["--resync", "200ms"];
const SEALED: &str = "hearth-sealed:v1:";

/// Every resource spec as the database holds it, concatenated.
fn raw_specs(s: &Server) -> String {
    let query = "SELECT spec FROM resources ORDER BY kind, name";
    block_on(async {
        use sqlx::Connection;
        let specs: Vec<String> = match s.database_url() {
            Some(url) => {
                let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query_scalar(query).fetch_all(&mut c).await.unwrap()
            }
            None => {
                let path = s.data_dir.path().join("hearth.db");
                let mut c = sqlx::SqliteConnection::connect(&format!(
                    "sqlite://{}?mode=ro",
                    path.display()
                ))
                .await
                .unwrap();
                sqlx::query_scalar(query).fetch_all(&mut c).await.unwrap()
            }
        };
        specs.join("\n")
    })
}

/// Runs a statement on the server's database behind its back.
fn raw_execute(s: &Server, statement: &str) {
    block_on(async {
        use sqlx::Connection;
        match s.database_url() {
            Some(url) => {
                let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query(statement).execute(&mut c).await.unwrap();
            }
            None => {
                let path = s.data_dir.path().join("hearth.db");
                let mut c =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                        .await
                        .unwrap();
                sqlx::query(statement).execute(&mut c).await.unwrap();
            }
        }
    })
}

/// Whether any file of the SQLite database (file, WAL, shared memory)
/// holds `secret` anywhere in its bytes.
fn sqlite_files_hold(dir: &Path, secret: &str) -> bool {
    ["hearth.db", "hearth.db-wal", "hearth.db-shm"]
        .iter()
        .any(|f| {
            let bytes = std::fs::read(dir.join(f)).unwrap_or_default();
            bytes.windows(secret.len()).any(|w| w == secret.as_bytes())
        })
}

/// Starts `hearth server` with `args` expecting it to refuse to start:
/// returns its stderr once it has exited non-zero (it is killed, and the
/// test fails, if it starts listening or runs on).
fn refused_start(data_dir: &Path, database_url: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new(binary());
    cmd.args([
        "server",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--data-dir",
    ])
    .arg(data_dir)
    .args(args)
    .env_remove("HEARTH_DATABASE_URL")
    .env_remove("HEARTH_SECRETS_KEY_FILE")
    .env("HEARTH_GUEST_AGENT", guest_agent())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if let Some(url) = database_url {
        cmd.args(["--database-url", url]);
    }
    let mut child = cmd.spawn().unwrap();
    let exited = wait_until(60, || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(exited, "the server started: {stderr}");
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("\"listening\""), "{stderr}");
    stderr
}

/// Spawns an agent as the operator that prints `$SECRET_VAR` reversed
/// (the plain value would be masked in its output) and returns what it
/// printed.
fn value_seen_in_a_vm(s: &Server) -> String {
    let a = s.spawn(
        &s.admin_token,
        json!({"workspace": "web", "command": "printf %s \"$SECRET_VAR\" | rev; echo; grep -c '^SECRET_VAR=' /home/.env"}),
    );
    assert_eq!(a.status, 201, "{}", a.text);
    let done = s.wait_agent(&id(&a.body), "completed", 120);
    done["output"].as_str().unwrap().to_owned()
}

fn reversed(text: &str) -> String {
    text.chars().rev().collect()
}

fn secrets_are_sealed_in_the_store_and_the_key_is_required(b: Backend) {
    let mut s = Server::start_with(b, FAST);
    // The key the server made on first start: in the data dir, 0600.
    let key_path = s.data_dir.path().join("secrets.key");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&key_path).unwrap().trim().len(), 64);

    let secret = "at-rest-value-5521";
    let token = "ghp-at-rest-token-5522";
    s.pool(
        4,
        &format!("driver: sandbox\nmemory: 256Mi\nenv:\n  SECRET_VAR: {secret}\n"),
        "web",
        "min_idle: 0\n",
    );
    let r = s.admin().put_yaml(
        "/v1/workspaces/private",
        &format!(
            "environment: dev\nrepos:\n- url: https://deploy:{token}@127.0.0.1:9/r.git\n  name: r\n"
        ),
    );
    assert!(r.status < 300, "{}", r.text);

    // The database holds them sealed, nowhere as plaintext.
    let specs = raw_specs(&s);
    assert!(specs.contains(SEALED), "{specs}");
    assert!(specs.contains("\"driver\":\"sandbox\""), "{specs}");
    for plain in [secret, token] {
        assert!(!specs.contains(plain), "{specs}");
    }
    // The VM gets the real value.
    assert_eq!(value_seen_in_a_vm(&s), format!("{}\n1\n", reversed(secret)));
    // A changed value is sealed too; the round trip of the mask keeps it.
    let shown = s.admin().get("/v1/environments/dev").body["spec"].clone();
    assert_eq!(shown["env"]["SECRET_VAR"], "***");
    let r = s.admin().put_json("/v1/environments/dev", shown);
    assert_eq!(r.body["outcome"], "unchanged", "{}", r.text);

    s.stop();
    if b == Backend::Sqlite {
        for plain in [secret, token] {
            assert!(
                !sqlite_files_hold(s.data_dir.path(), plain),
                "the SQLite files hold {plain}"
            );
        }
    }

    // The database copied elsewhere (SQLite: the file; PostgreSQL: the
    // same rows) and opened without the key: refused, nothing readable.
    let thief = tempfile::tempdir().unwrap();
    if b == Backend::Sqlite {
        for file in ["hearth.db", "hearth.db-wal"] {
            let from = s.data_dir.path().join(file);
            if from.exists() {
                std::fs::copy(from, thief.path().join(file)).unwrap();
            }
        }
    }
    let stderr = refused_start(thief.path(), s.database_url(), &[]);
    assert!(
        stderr.contains("the store holds secrets sealed with a secrets key, but")
            && stderr.contains("secrets.key does not exist"),
        "{stderr}"
    );
    assert!(
        !thief.path().join("secrets.key").exists(),
        "no new key is made over sealed secrets"
    );
    // With another key: refused.
    let wrong = thief.path().join("wrong.key");
    std::fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let stderr = refused_start(
        thief.path(),
        s.database_url(),
        &["--secrets-key-file", wrong.to_str().unwrap()],
    );
    assert!(
        stderr.contains(
            "the store's secrets were sealed with another secrets key than the one given"
        ),
        "{stderr}"
    );
    // A key file anyone can read, or one that is missing: refused, saying so.
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr = refused_start(
        thief.path(),
        s.database_url(),
        &["--secrets-key-file", wrong.to_str().unwrap()],
    );
    assert!(
        stderr.contains("is readable by others (mode 644): make it 0600"),
        "{stderr}"
    );
    let missing = thief.path().join("missing.key");
    let stderr = refused_start(
        thief.path(),
        s.database_url(),
        &["--secrets-key-file", missing.to_str().unwrap()],
    );
    assert!(stderr.contains("missing.key does not exist"), "{stderr}");

    // The server with its key starts again and provisions with the value;
    // so does it with the key the operator keeps elsewhere and names with
    // the flag (the data dir's file moved away).
    s.launch();
    assert_eq!(value_seen_in_a_vm(&s), format!("{}\n1\n", reversed(secret)));
    s.stop();
    let provided = thief.path().join("provided.key");
    std::fs::rename(&key_path, &provided).unwrap();
    s.set_extra(&mut vec![
        "--resync".into(),
        "200ms".into(),
        "--secrets-key-file".into(),
        provided.to_str().unwrap().into(),
    ]);
    s.launch();
    assert_eq!(value_seen_in_a_vm(&s), format!("{}\n1\n", reversed(secret)));
    assert!(!key_path.exists(), "no key is made when one is given");
}

fn plaintext_secrets_of_an_older_store_are_sealed_on_start(b: Backend) {
    let mut s = Server::start_with(b, FAST);
    let secret = "older-plain-value-7731";
    s.pool(
        4,
        "driver: sandbox\nmemory: 256Mi\nenv:\n  SECRET_VAR: placeholder\n",
        "web",
        "min_idle: 0\n",
    );
    s.stop();
    // What a store from before sealing holds: plaintext values, no key
    // check, no key file.
    raw_execute(
        &s,
        &format!(
            "UPDATE resources SET spec = '{}' WHERE kind = 'environment' AND name = 'dev'",
            json!({"driver": "sandbox", "memory": "256Mi", "env": {"SECRET_VAR": secret}})
        ),
    );
    raw_execute(&s, "DELETE FROM secrets_key");
    std::fs::remove_file(s.data_dir.path().join("secrets.key")).unwrap();
    assert!(raw_specs(&s).contains(secret));

    s.launch();
    assert!(
        s.logs().contains("sealed the secrets stored as plaintext"),
        "{}",
        s.logs_tail()
    );
    let specs = raw_specs(&s);
    assert!(!specs.contains(secret) && specs.contains(SEALED), "{specs}");
    if b == Backend::Sqlite {
        assert!(
            !sqlite_files_hold(s.data_dir.path(), secret),
            "the SQLite files still hold the older plaintext"
        );
    }
    // Sealing changed how it is stored, not what it is: same version.
    let env = s.admin().get("/v1/environments/dev");
    assert_eq!(env.body["version"], 1, "{}", env.text);
    assert_eq!(value_seen_in_a_vm(&s), format!("{}\n1\n", reversed(secret)));
    // Idempotent: the next start seals nothing more.
    s.restart();
    let starts = s
        .logs()
        .matches("sealed the secrets stored as plaintext")
        .count();
    assert_eq!(starts, 1, "{}", s.logs_tail());
}
