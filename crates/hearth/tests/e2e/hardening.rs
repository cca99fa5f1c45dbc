//! Bad input never hurts, through the real server: NUL characters anywhere
//! input enters, command output holding NUL bytes, every failure as
//! `{code, message}` JSON, a case-insensitive `Bearer`, half-open
//! connections, and deeply nested documents.

use crate::both_backends;
use crate::common::{Answer, Api, Backend, Server, wait_until};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

both_backends!(
    nul_is_refused_on_every_route_kind,
    an_agent_printing_nul_completes_and_returns_its_vm,
    failures_are_json_with_their_status,
    nested_documents_are_refused_quickly_while_healthz_answers,
);

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let s = Server::start(Backend::Sqlite);
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = raw_request(
            &s,
            "GET",
            "/v1/whoami",
            &[("authorization", &format!("{scheme} {}", s.admin_token))],
            None,
        );
        assert_eq!(r.status, 200, "{scheme}: {}", r.text);
        assert_eq!(r.body["identity"], "admin");
    }
    let r = raw_request(
        &s,
        "GET",
        "/v1/whoami",
        &[("authorization", &format!("Basic {}", s.admin_token))],
        None,
    );
    r.assert_error(
        401,
        "UNAUTHENTICATED",
        "the Authorization header must be `Bearer <token>`",
    );
}

#[test]
fn half_open_connections_do_not_stop_healthz_and_are_closed_after_the_header_timeout() {
    raise_fd_limit();
    let s = Server::start_with(Backend::Sqlite, &["--header-timeout", "3s", "--plain-http"]);
    let addr = s.url.trim_start_matches("http://").to_owned();
    let opened = Instant::now();
    let mut conns: Vec<TcpStream> = (0..1000)
        .map(|i| {
            let mut c = TcpStream::connect(&addr).expect("connect");
            // Half send nothing at all, half a partial request head.
            if i % 2 == 1 {
                c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
            }
            c
        })
        .collect();
    let r = Api::anonymous(&s.url).get("/healthz");
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        opened.elapsed() < Duration::from_secs(3),
        "the 1000 connections were not all open while /healthz answered"
    );
    // Each is closed by the server (EOF), not before the header timeout.
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close the connection, got {other:?}"),
        }
    }
    let elapsed = opened.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2900),
        "closed after {elapsed:?}, before the 3s header timeout"
    );
    assert_eq!(Api::anonymous(&s.url).get("/healthz").status, 200);
}

/// Every route kind: a NUL in a path segment, a query value, a JSON body
/// field or a resource document field is `INVALID_ARGUMENT` naming it, and
/// nothing is written.
fn nul_is_refused_on_every_route_kind(b: Backend) {
    let s = Server::start(b);
    s.pool(5, "driver: fake\n", "web", "description: kept\n");
    let api = s.admin();
    let json_body = |v: Value| Some(("application/json", v.to_string()));
    let cases: Vec<(&str, &str, Body, &str)> = vec![
        (
            "GET",
            "/v1/workspaces/a%00b",
            None,
            "path segment \"a%00b\"",
        ),
        (
            "PUT",
            "/v1/workspaces/a%00b",
            json_body(json!({"environment": "dev"})),
            "path segment \"a%00b\"",
        ),
        (
            "DELETE",
            "/v1/environments/%00",
            None,
            "path segment \"%00\"",
        ),
        (
            "GET",
            "/v1/pool-config/default%00",
            None,
            "path segment \"default%00\"",
        ),
        (
            "POST",
            "/v1/identities/a%00/tokens",
            json_body(json!({})),
            "path segment \"a%00\"",
        ),
        (
            "GET",
            "/v1/workspaces/web%00/warm-pool",
            None,
            "path segment \"web%00\"",
        ),
        (
            "GET",
            "/v1/agents?workspace=web%00",
            None,
            "query parameter \"workspace\"",
        ),
        (
            "GET",
            "/v1/agents?phase=%00running",
            None,
            "query parameter \"phase\"",
        ),
        (
            "GET",
            "/v1/instances?workspace=%00",
            None,
            "query parameter \"workspace\"",
        ),
        ("GET", "/v1/vms?all=%00", None, "query parameter \"all\""),
        (
            "PUT",
            "/v1/environments/dev",
            json_body(json!({"driver": "fake", "env": {"TOKEN": "a\u{0}b"}})),
            "invalid environment: env.TOKEN contains a NUL character",
        ),
        (
            "PUT",
            "/v1/workspaces/web",
            Some((
                "application/yaml",
                "environment: dev\ndescription: \"a\\0b\"\n".into(),
            )),
            "invalid workspace: description contains a NUL character",
        ),
        (
            "PUT",
            "/v1/workspaces/web",
            Some((
                "application/yaml",
                "environment: dev\nrepos:\n- url: \"https://example.com/r\\x00.git\"\n".into(),
            )),
            "invalid workspace: repos[0].url contains a NUL character",
        ),
        (
            "PATCH",
            "/v1/workspaces/web",
            json_body(json!({"description": "\u{0}"})),
            "invalid request: description contains a NUL character",
        ),
        (
            "PATCH",
            "/v1/workspaces/web/warm-pool",
            json_body(json!({"branch": "main\u{0}"})),
            "invalid request: branch contains a NUL character",
        ),
        (
            "POST",
            "/v1/identities",
            json_body(json!({"name": "a\u{0}", "role": "viewer"})),
            "invalid request: name contains a NUL character",
        ),
        (
            "POST",
            "/v1/identities/admin/tokens",
            json_body(json!({"expires_in": "1h\u{0}"})),
            "invalid request: expires_in contains a NUL character",
        ),
        (
            "POST",
            "/v1/tenants",
            json_body(json!({"name": "t\u{0}", "admin": "boss"})),
            "invalid request: name contains a NUL character",
        ),
        (
            "POST",
            "/v1/agents",
            json_body(json!({"workspace": "web", "command": "echo \u{0}"})),
            "invalid request: command contains a NUL character",
        ),
        (
            "POST",
            "/v1/pool/flush",
            json_body(json!({"workspace": "web\u{0}"})),
            "invalid request: workspace contains a NUL character",
        ),
    ];
    let identities = api.get("/v1/identities").body["items"]
        .as_array()
        .unwrap()
        .len();
    for (method, path, body, expected) in &cases {
        let (ct, text) = match body {
            Some((ct, text)) => (Some(*ct), Some(text.clone())),
            None => (None, None),
        };
        let r = api.request(method, path, ct, text);
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (400, Some("INVALID_ARGUMENT")),
            "{method} {path}: {}",
            r.text
        );
        let message = r.body["message"].as_str().unwrap();
        assert!(
            message.contains(expected) && message.contains("NUL character"),
            "{method} {path}: {message}"
        );
    }
    // Nothing was written.
    let ws = api.get("/v1/workspaces/web");
    assert_eq!(ws.body["spec"]["description"], "kept", "{}", ws.text);
    assert_eq!(ws.body["version"], 1);
    assert_eq!(
        api.get("/v1/identities").body["items"]
            .as_array()
            .unwrap()
            .len(),
        identities
    );
    assert_eq!(
        api.get("/v1/tenants").body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(api.get("/v1/agents").body["items"], json!([]));
    assert!(
        s.logs().lines().all(|l| !l.contains("\"level\":\"ERROR\"")),
        "{}",
        s.logs_tail()
    );
}

/// A command printing NUL bytes ends normally, its output is stored (NUL
/// as U+FFFD) and its VM goes back to the pool.
fn an_agent_printing_nul_completes_and_returns_its_vm(b: Backend) {
    let s = Server::start_with(b, &["--resync", "200ms"]);
    s.pool(
        3,
        "driver: sandbox\nmemory: 256Mi\n",
        "web",
        "min_idle: 1\n",
    );
    assert!(wait_until(30, || s.status()["vms"]["idle"] == 1));
    let a = s.spawn(
        &s.admin_token,
        json!({"workspace": "web", "command": "printf 'before\\000after\\n'; printf '\\000\\000' >&2"}),
    );
    assert_eq!(a.status, 201, "{}", a.text);
    let id = a.body["id"].as_str().unwrap().to_owned();
    let done = s.wait_agent(&id, "completed", 30);
    assert_eq!(done["exit_code"], 0, "{done}");
    let output = done["output"].as_str().unwrap();
    assert!(output.contains("before\u{FFFD}after"), "{output:?}");
    assert!(!output.contains('\0'), "{output:?}");
    // The VM is back (returned or replaced): none is assigned, one is idle.
    assert!(
        wait_until(30, || {
            let st = s.status();
            st["vms"]["active"] == 0 && st["vms"]["idle"] == 1
        }),
        "{}",
        s.status()
    );
}

/// Failures produced outside hearth's handlers are JSON too, with their
/// own status.
fn failures_are_json_with_their_status(b: Backend) {
    let s = Server::start(b);
    let big = "x".repeat(2 * 1024 * 1024);
    let auth = format!("Bearer {}", s.admin_token);
    let cases: Vec<(&str, &str, Body, u16, &str, &str)> = vec![
        (
            "DELETE",
            "/v1/whoami",
            None,
            405,
            "INVALID_ARGUMENT",
            "method DELETE is not allowed on /v1/whoami",
        ),
        (
            "PUT",
            "/v1/agents",
            None,
            405,
            "INVALID_ARGUMENT",
            "method PUT is not allowed on /v1/agents",
        ),
        (
            "GET",
            "/v1/no-such-thing",
            None,
            404,
            "NOT_FOUND",
            "no route for GET /v1/no-such-thing",
        ),
        (
            "GET",
            "/v1/vms?all=maybe",
            None,
            400,
            "INVALID_ARGUMENT",
            "Failed to deserialize query string",
        ),
        (
            "GET",
            "/v1/instances?limit=lots",
            None,
            400,
            "INVALID_ARGUMENT",
            "Failed to deserialize query string",
        ),
        (
            "GET",
            "/v1/agents/%FF",
            None,
            400,
            "INVALID_ARGUMENT",
            "Invalid URL",
        ),
        (
            "GET",
            "/v1/workspaces/%FF%FE/warm-pool",
            None,
            400,
            "INVALID_ARGUMENT",
            "Invalid URL",
        ),
        (
            "POST",
            "/v1/agents",
            Some(("application/json", "{\"workspace\":".into())),
            400,
            "INVALID_ARGUMENT",
            "invalid request",
        ),
        (
            "PUT",
            "/v1/pool-config/default",
            Some(("application/json", "{max_vms: 1".into())),
            400,
            "INVALID_ARGUMENT",
            "invalid pool-config",
        ),
        // serde would read a sequence as a struct's fields in order.
        (
            "PUT",
            "/v1/environments/dev",
            Some(("application/json", "[null, null]".into())),
            400,
            "INVALID_ARGUMENT",
            "invalid environment: a document must be a mapping of fields",
        ),
        (
            "PUT",
            "/v1/pool-config/default",
            Some(("application/yaml", big.clone())),
            413,
            "INVALID_ARGUMENT",
            "the request body exceeds the limit of 1048576 bytes",
        ),
        (
            "POST",
            "/v1/agents",
            Some(("application/json", big)),
            413,
            "INVALID_ARGUMENT",
            "the request body exceeds the limit of 1048576 bytes",
        ),
    ];
    for (method, path, body, status, code, message) in cases {
        let (ct, text) = match body {
            Some((ct, text)) => (Some(ct), Some(text)),
            None => (None, None),
        };
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(ct) = ct {
            headers.push(("content-type", ct));
        }
        let r = raw_request(&s, method, path, &headers, text);
        assert_eq!(
            (r.status, r.content_type.as_str(), r.body["code"].as_str()),
            (status, "application/json", Some(code)),
            "{method} {path}: {}",
            r.text
        );
        let got = r.body["message"].as_str().unwrap();
        assert!(got.starts_with(message), "{method} {path}: {got}");
        if status == 405 {
            assert!(r.allow.is_some(), "{method} {path}: no Allow header");
        }
    }
    // Unauthenticated failures are JSON as well.
    Api::anonymous(&s.url).get("/v1/whoami").assert_error(
        401,
        "UNAUTHENTICATED",
        "missing bearer token: pass --token, set HEARTH_TOKEN or run hearth auth login",
    );
}

/// 1 MiB documents of nested brackets are refused at once, naming the
/// limit, and `/healthz` keeps answering during a burst of them.
fn nested_documents_are_refused_quickly_while_healthz_answers(b: Backend) {
    let s = Server::start(b);
    let yaml = format!("environment: {}", "[".repeat(1024 * 1024 - 13));
    let json_doc = format!("{{\"environment\": {}", "[".repeat(1024 * 1024 - 20));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let worst = std::sync::Mutex::new(Duration::ZERO);
    std::thread::scope(|scope| {
        let health = scope.spawn(|| {
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(Api::anonymous(&s.url).get("/healthz").status, 200);
                let took = t.elapsed();
                let mut w = worst.lock().unwrap();
                *w = (*w).max(took);
                answered += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            answered
        });
        let senders: Vec<_> = (0..4)
            .map(|i| {
                let (ct, doc) = if i % 2 == 0 {
                    ("application/yaml", yaml.clone())
                } else {
                    ("application/json", json_doc.clone())
                };
                let api = s.admin();
                scope.spawn(move || {
                    for _ in 0..5 {
                        let t = Instant::now();
                        let r = api.request("PUT", "/v1/workspaces/deep", Some(ct), Some(doc.clone()));
                        r.assert_error(
                            400,
                            "INVALID_ARGUMENT",
                            "invalid workspace: the document is nested deeper than the limit of 64 levels",
                        );
                        assert!(t.elapsed() < Duration::from_secs(2), "refusal took {:?}", t.elapsed());
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let answered = health.join().unwrap();
        assert!(answered > 0, "/healthz was never asked during the burst");
    });
    let worst = *worst.lock().unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "/healthz took {worst:?} during the burst"
    );
    // 64 levels are fine.
    let ok = format!(
        "environment: dev\ndescription: \"{}\"\nrepos: []\n",
        "[".repeat(100)
    );
    assert_eq!(
        s.admin()
            .put_yaml("/v1/environments/dev", "driver: fake\n")
            .status,
        201
    );
    let r = s.admin().put_yaml("/v1/workspaces/deep", &ok);
    assert_eq!(r.status, 201, "{}", r.text);
}

/// A request body with its content type.
type Body = Option<(&'static str, String)>;

/// An answer with the headers this file looks at.
struct RawAnswer {
    status: u16,
    content_type: String,
    allow: Option<String>,
    body: Value,
    text: String,
}

impl RawAnswer {
    fn assert_error(&self, status: u16, code: &str, message: &str) {
        Answer {
            status: self.status,
            body: self.body.clone(),
            text: self.text.clone(),
        }
        .assert_error(status, code, message);
    }
}

/// One request with exactly these headers (reqwest would normalize the
/// `Authorization` scheme).
fn raw_request(
    s: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> RawAnswer {
    let client = crate::common::http_client(&s.url);
    let mut req = client.request(method.parse().unwrap(), format!("{}{}", s.url, path));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(body) = body {
        req = req.body(body);
    }
    let resp = req.send().expect("the server answers");
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type").unwrap_or_default();
    let allow = header("allow");
    let text = resp.text().unwrap();
    RawAnswer {
        status,
        content_type,
        allow,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

/// 1,000 sockets need more than the common soft limit of 1024 files.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < 4096 {
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536).max(soft), hard).unwrap();
    }
}
