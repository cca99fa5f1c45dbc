//! Webhooks through the real server: a receiver this test runs on
//! 127.0.0.1 verifies every signature with the secret the create answered
//! and gets the events in order; failed answers are retried with back-off
//! and every attempt is in the log; a dead receiver is retried, then
//! recorded failed, and delivery moves on; redirects are never followed.
//! Attacks (SSRF): without `--webhook-allow-private`, URLs naming
//! loopback, private and metadata addresses, or a host resolving to
//! loopback, are refused at create time, and one written behind the API's
//! back is refused at connect: the target gets nothing. Two replicas on
//! one PostgreSQL database deliver each event once, in order, and the
//! second takes over when the lease holder stops.
//!
//! Events are appended through a second store on the server's database,
//! as the server's own changes append theirs; one test
//! (`a_workspace_write_is_delivered`) is driven by a real change instead.

use crate::both_backends;
use crate::common::{Api, Backend, Server, block_on, wait_until};
use axum::http::{HeaderMap, StatusCode};
use hearth_store::{EventKind, NewEvent, NewWebhook, Store};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::{Arc, Mutex};

both_backends!(
    events_are_delivered_signed_in_order_and_failures_retried,
    a_workspace_write_is_delivered,
);

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: Vec<u8>,
    /// What the receiver answered.
    answered: u16,
}

/// How a receiver answers.
#[derive(Clone)]
enum Answers {
    /// 500 to the first `n` requests, then 200.
    FailFirst(usize),
    /// 307 to this URL, every time.
    Redirect(String),
}

/// A real HTTP receiver on 127.0.0.1 that keeps every request.
struct Receiver {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    fn start(answers: Answers) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let kept = hits.clone();
        let app =
            axum::Router::new().fallback(move |headers: HeaderMap, body: axum::body::Bytes| {
                let kept = kept.clone();
                let answers = answers.clone();
                async move {
                    let mut hits = kept.lock().unwrap();
                    let (status, location) = match &answers {
                        Answers::FailFirst(n) if hits.len() < *n => {
                            (StatusCode::INTERNAL_SERVER_ERROR, None)
                        }
                        Answers::FailFirst(_) => (StatusCode::OK, None),
                        Answers::Redirect(to) => (StatusCode::TEMPORARY_REDIRECT, Some(to.clone())),
                    };
                    hits.push(Hit {
                        headers,
                        body: body.to_vec(),
                        answered: status.as_u16(),
                    });
                    let mut answer = axum::response::Response::builder().status(status);
                    if let Some(to) = location {
                        answer = answer.header("location", to);
                    }
                    answer.body(axum::body::Body::from("ok")).unwrap()
                }
            });
        runtime.spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            url,
            hits,
            _runtime: runtime,
        }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

/// A second store on the server's database (as another replica opens
/// it), with the runtime its connections live on.
struct SecondStore {
    store: Arc<dyn Store>,
    runtime: tokio::runtime::Runtime,
}

impl SecondStore {
    fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

fn second_store(server: &Server) -> Arc<SecondStore> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = server.database_url().map(str::to_owned);
    let store = runtime
        .block_on(hearth_store::open(url.as_deref(), server.data_dir.path()))
        .unwrap();
    Arc::new(SecondStore { store, runtime })
}

fn tenant_of(store: &SecondStore, name: &str) -> hearth_core::ids::TenantId {
    store
        .run(store.store.list_tenants())
        .unwrap()
        .into_iter()
        .find(|t| t.name == name)
        .expect("the tenant exists")
        .id
}

fn admin_tenant(server: &Server) -> String {
    let who = server.admin().get("/v1/whoami");
    who.body["tenant"].as_str().unwrap().to_owned()
}

fn append(store: &SecondStore, tenant: hearth_core::ids::TenantId, events: &[NewEvent]) {
    store
        .run(store.store.append_events(tenant, events))
        .unwrap();
}

/// Checks a hit's signature as a receiver would: HMAC-SHA256 keyed with
/// the secret over `<X-Hearth-Timestamp>.<body>`.
fn verifies(hit: &Hit, secret: &str) -> bool {
    let header = |name: &str| {
        hit.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let Some(given) = header("x-hearth-signature").strip_prefix("sha256=") else {
        return false;
    };
    let Ok(given) = hex::decode(given) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(header("x-hearth-timestamp").as_bytes());
    mac.update(b".");
    mac.update(&hit.body);
    mac.verify_slice(&given).is_ok()
}

fn header(hit: &Hit, name: &str) -> String {
    hit.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn deliveries(api: &Api, name: &str) -> Vec<Value> {
    let answer = api.get(&format!("/v1/webhooks/{name}/deliveries"));
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.body["items"].as_array().unwrap().clone()
}

fn create(api: &Api, name: &str, url: &str, types: &[&str]) -> crate::common::Answer {
    api.post(
        "/v1/webhooks",
        json!({"name": name, "url": url, "types": types}),
    )
}

fn events_are_delivered_signed_in_order_and_failures_retried(backend: Backend) {
    let server = Server::start_with(
        backend,
        &["--webhook-allow-private", "--webhook-max-attempts", "4"],
    );
    let admin = server.admin();
    let receiver = Receiver::start(Answers::FailFirst(2));
    let made = create(&admin, "ci", &receiver.url, &["vm", "pool.flushed"]);
    assert_eq!(made.status, 201, "{}", made.text);
    let secret = made.body["secret"].as_str().unwrap().to_owned();
    assert!(
        secret.starts_with("whsec_") && secret.len() == "whsec_".len() + 64,
        "{secret}"
    );
    assert_eq!(
        made.body["webhook"]["types"],
        json!([
            "vm.booting",
            "vm.ready",
            "vm.assigned",
            "vm.returned",
            "vm.destroyed",
            "vm.failed",
            "pool.flushed"
        ])
    );
    // A dead receiver: a port that was just bound and let go.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/gone", l.local_addr().unwrap())
    };
    assert_eq!(create(&admin, "dead", &dead, &[]).status, 201);
    // A receiver that redirects to one the redirect must never reach.
    let target = Receiver::start(Answers::FailFirst(0));
    let redirect = Receiver::start(Answers::Redirect(target.url.clone()));
    assert_eq!(
        create(&admin, "bounce", &redirect.url, &["pool"]).status,
        201
    );

    let store = second_store(&server);
    let tenant = tenant_of(&store, &admin_tenant(&server));
    append(
        &store,
        tenant,
        &[
            NewEvent::new(EventKind::VmBooting, "vm/1", json!({"workspace": "web"})),
            // Not of the webhook's types: never sent to it.
            NewEvent::new(EventKind::ResourceWritten, "workspace/web", json!({})).by("admin"),
            NewEvent::new(EventKind::VmReady, "vm/1", json!({"workspace": "web"})),
        ],
    );
    append(
        &store,
        tenant,
        &[NewEvent::new(
            EventKind::PoolFlushed,
            "pool/default",
            json!({"destroyed": 3}),
        )],
    );
    append(
        &store,
        tenant,
        &[NewEvent::new(EventKind::VmDestroyed, "vm/1", json!({}))],
    );

    // 2 failed attempts at the first event, then one delivery of each.
    assert!(
        wait_until(60, || receiver
            .hits()
            .iter()
            .filter(|h| h.answered == 200)
            .count()
            == 4),
        "the receiver got {:?}",
        receiver
            .hits()
            .iter()
            .map(|h| (h.answered, String::from_utf8_lossy(&h.body).into_owned()))
            .collect::<Vec<_>>()
    );
    let hits = receiver.hits();
    assert_eq!(hits.len(), 6);
    for hit in &hits {
        assert!(verifies(hit, &secret), "bad signature: {hit:?}");
        assert!(!verifies(hit, "whsec_another"), "a wrong secret verifies");
        assert_eq!(header(hit, "content-type"), "application/json");
        let body: Value = serde_json::from_slice(&hit.body).unwrap();
        assert_eq!(
            header(hit, "x-hearth-event"),
            body["kind"].as_str().unwrap()
        );
        let ts: i64 = header(hit, "x-hearth-timestamp").parse().unwrap();
        assert!((ts - hearth_store::now_millis() / 1000).abs() < 120, "{ts}");
    }
    // The same delivery id for each attempt at the first event.
    let first = header(&hits[0], "x-hearth-delivery");
    assert!(
        hits[..3]
            .iter()
            .all(|h| header(h, "x-hearth-delivery") == first)
    );
    let delivered: Vec<Value> = hits
        .iter()
        .filter(|h| h.answered == 200)
        .map(|h| serde_json::from_slice(&h.body).unwrap())
        .collect();
    let kinds: Vec<&str> = delivered
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["vm.booting", "vm.ready", "pool.flushed", "vm.destroyed"]
    );
    let ids: Vec<i64> = delivered
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
    assert_eq!(delivered[2]["data"], json!({"destroyed": 3}));
    assert_eq!(delivered[0]["subject"], "vm/1");

    // The log: newest first, every attempt.
    let log = deliveries(&admin, "ci");
    let seen: Vec<(i64, i64, &str, Option<i64>)> = log
        .iter()
        .rev()
        .map(|d| {
            (
                d["event_id"].as_i64().unwrap(),
                d["attempt"].as_i64().unwrap(),
                d["outcome"].as_str().unwrap(),
                d["status"].as_i64(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (ids[0], 1, "retrying", Some(500)),
            (ids[0], 2, "retrying", Some(500)),
            (ids[0], 3, "delivered", Some(200)),
            (ids[1], 1, "delivered", Some(200)),
            (ids[2], 1, "delivered", Some(200)),
            (ids[3], 1, "delivered", Some(200)),
        ]
    );
    assert!(log.last().unwrap()["next_retry_at"].is_string());
    assert_eq!(log.last().unwrap()["delivery"], first.as_str());

    // The dead receiver: attempts 1-3 retrying, the 4th failed, and the
    // next event is tried after it.
    assert!(
        wait_until(60, || deliveries(&admin, "dead").len() >= 5),
        "{:?}",
        deliveries(&admin, "dead")
    );
    let log = deliveries(&admin, "dead");
    let oldest: Vec<(i64, &str)> = log
        .iter()
        .rev()
        .take(5)
        .map(|d| {
            (
                d["attempt"].as_i64().unwrap(),
                d["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        oldest,
        [
            (1, "retrying"),
            (2, "retrying"),
            (3, "retrying"),
            (4, "failed"),
            (1, "retrying")
        ]
    );
    let tries = log.iter().rev().take(4).collect::<Vec<_>>();
    assert!(
        tries.iter().all(|d| d["event_id"] == json!(ids[0])),
        "{tries:?}"
    );
    assert!(
        tries
            .iter()
            .all(|d| d["status"].is_null()
                && d["error"].as_str().unwrap().contains("cannot connect")),
        "{tries:?}"
    );
    assert_ne!(log.iter().rev().nth(4).unwrap()["event_id"], json!(ids[0]));
    // Back-off: the waits grew (about 1 s, 2 s, 4 s, jittered to half).
    let at = |d: &Value| humantime::parse_rfc3339(d["started_at"].as_str().unwrap()).unwrap();
    let starts: Vec<_> = log.iter().rev().take(4).map(at).collect();
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap().as_millis())
        .collect();
    for (gap, ceiling) in gaps.iter().zip([1000u128, 2000, 4000]) {
        assert!(
            *gap >= ceiling / 2 && *gap < ceiling + 1500,
            "gaps {gaps:?}"
        );
    }

    // The redirect was answered, never followed.
    assert!(wait_until(30, || deliveries(&admin, "bounce")
        .iter()
        .any(|d| d["outcome"] == "retrying")));
    let log = deliveries(&admin, "bounce");
    assert_eq!(log.last().unwrap()["status"], 307);
    assert!(
        log.last().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("redirect: never followed")
    );
    assert!(!redirect.hits().is_empty());
    assert!(
        target.hits().is_empty(),
        "the redirect was followed: {:?}",
        target.hits()
    );

    // The secret is in no answer and no log line.
    let list = admin.get("/v1/webhooks");
    assert_eq!(list.status, 200);
    assert_eq!(list.body["items"].as_array().unwrap().len(), 3);
    let one = admin.get("/v1/webhooks/ci");
    assert_eq!(one.body["url"], receiver.url.as_str());
    for text in [
        &list.text,
        &one.text,
        &admin.get("/v1/webhooks/ci/deliveries").text,
        &server.logs(),
    ] {
        assert!(!text.contains(&secret[6..]), "the secret leaked: {text}");
        assert!(!text.contains("whsec_"), "a secret leaked: {text}");
    }

    // The CLI: the secret once, then never again.
    let token = server.admin_token.clone();
    let out = server.cli(
        &token,
        &[
            "webhook",
            "create",
            "cli-hook",
            "--url",
            &receiver.url,
            "--type",
            "vm",
            "--type",
            "pool",
        ],
        "",
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("secret: whsec_"), "{}", out.stdout);
    assert!(
        out.stderr.contains("The secret is shown only once"),
        "{}",
        out.stderr
    );
    let out = server.cli(&token, &["webhook", "list"], "");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("NAME"), "{}", out.stdout);
    assert!(
        out.stdout.contains("cli-hook") && out.stdout.contains(&receiver.url),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("whsec_"), "{}", out.stdout);
    let out = server.cli(&token, &["webhook", "deliveries", "ci", "-o", "json"], "");
    assert_eq!(out.code, 0, "{out:?}");
    let rows: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(rows.len(), 6);
    let out = server.cli(&token, &["webhook", "deliveries", "ci"], "");
    assert!(
        out.stdout.starts_with("EVENT")
            && out.stdout.contains("retrying")
            && out.stdout.contains("answered 500"),
        "{}",
        out.stdout
    );
    let out = server.cli(&token, &["webhook", "delete", "cli-hook"], "");
    assert_eq!(out.stdout, "webhook/cli-hook deleted\n", "{out:?}");
    let out = server.cli(&token, &["webhook", "delete", "cli-hook"], "");
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("NOT_FOUND: webhook \"cli-hook\" not found"),
        "{out:?}"
    );

    // Only admins (and operators) manage webhooks.
    let dev = server.client(&server.identity("dev", "developer"));
    create(&dev, "mine", &receiver.url, &[]).assert_error(
        403,
        "PERMISSION_DENIED",
        "your role does not have webhook.update permission",
    );
    assert_eq!(dev.get("/v1/webhooks").body["code"], "PERMISSION_DENIED");
    assert_eq!(
        dev.get("/v1/webhooks/ci/deliveries").body["code"],
        "PERMISSION_DENIED"
    );
    assert_eq!(
        dev.delete("/v1/webhooks/ci").body["code"],
        "PERMISSION_DENIED"
    );

    // Bad input names what is wrong.
    create(&admin, "ci", &receiver.url, &[]).assert_error(
        409,
        "ALREADY_EXISTS",
        "webhook \"ci\" already exists",
    );
    create(&admin, "Bad_Name", &receiver.url, &[]).assert_error(
        400,
        "INVALID_ARGUMENT",
        "name: invalid webhook name \"Bad_Name\": use 1-63 lowercase letters, digits and '-'",
    );
    let e = create(&admin, "x", &receiver.url, &["vm.exploded"]);
    assert_eq!(e.body["code"], "INVALID_ARGUMENT");
    assert!(
        e.body["message"]
            .as_str()
            .unwrap()
            .starts_with("types: unknown event type \"vm.exploded\""),
        "{}",
        e.text
    );
    let e = create(&admin, "x", "ftp://example.com/", &[]);
    assert_eq!(
        e.body["message"],
        "url \"ftp://example.com/\" must be https, not ftp"
    );

    // Deleted: nothing more is sent, the log is gone.
    assert_eq!(admin.delete("/v1/webhooks/ci").status, 200);
    admin
        .get("/v1/webhooks/ci")
        .assert_error(404, "NOT_FOUND", "webhook \"ci\" not found");
}

/// Driven by a real change: PUT a workspace → a `resource.written` event
/// delivered. NOTE: this passes once the branch that makes every
/// lifecycle change write its event (the emission part of the issue) is
/// merged; on the webhooks branch alone no change emits yet.
fn a_workspace_write_is_delivered(backend: Backend) {
    let server = Server::start_with(backend, &["--webhook-allow-private"]);
    let admin = server.admin();
    let receiver = Receiver::start(Answers::FailFirst(0));
    let made = create(&admin, "ci", &receiver.url, &["resource.written"]);
    assert_eq!(made.status, 201, "{}", made.text);
    let secret = made.body["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        admin
            .put_yaml("/v1/environments/dev", "driver: sandbox\n")
            .status,
        201
    );
    assert_eq!(
        admin
            .put_yaml("/v1/workspaces/web", "environment: dev\n")
            .status,
        201
    );
    assert!(
        wait_until(30, || receiver.hits().iter().any(|h| {
            let e: Value = serde_json::from_slice(&h.body).unwrap_or_default();
            e["subject"] == "workspace/web"
        })),
        "no resource.written for workspace/web: {:?}",
        receiver.hits()
    );
    let hit = receiver
        .hits()
        .into_iter()
        .find(|h| serde_json::from_slice::<Value>(&h.body).unwrap()["subject"] == "workspace/web")
        .unwrap();
    assert!(verifies(&hit, &secret));
    assert_eq!(header(&hit, "x-hearth-event"), "resource.written");
}

/// The SSRF rule, tried as a hostile tenant admin would, on a server
/// without `--webhook-allow-private`: every URL that names an inside
/// address is refused at create time, and webhooks written behind the
/// API's back (as a host re-pointed after the check, DNS rebinding, would
/// be) are refused at connect. The target, a live receiver on loopback,
/// gets nothing.
#[test]
fn webhooks_never_reach_inside_addresses() {
    let server = Server::start_with(Backend::Sqlite, &["--webhook-max-attempts", "1"]);
    let admin = server.admin();
    let target = Receiver::start(Answers::FailFirst(0));
    let port = target
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    for (url, says) in [
        (
            format!("https://127.0.0.1:{port}/hook"),
            "url: address 127.0.0.1 is loopback".to_owned(),
        ),
        (
            format!("http://127.0.0.1:{port}/hook"),
            "must be https (plain http is allowed only with --webhook-allow-private)".to_owned(),
        ),
        (
            "https://10.1.2.3/hook".into(),
            "url: address 10.1.2.3 is private".into(),
        ),
        (
            "https://169.254.169.254/latest/meta-data".into(),
            "url: address 169.254.169.254 is link-local".into(),
        ),
        (
            format!("https://[::1]:{port}/hook"),
            "url: address ::1 is loopback".into(),
        ),
        (
            format!("https://[::ffff:127.0.0.1]:{port}/hook"),
            "url: address ::ffff:127.0.0.1 is loopback".into(),
        ),
        (
            format!("https://localhost:{port}/hook"),
            "url: host \"localhost\" resolves to address".into(),
        ),
        ("https://100.64.0.1/hook".into(), "carrier-grade NAT".into()),
    ] {
        let answer = create(&admin, "evil", &url, &[]);
        assert_eq!(
            (answer.status, answer.body["code"].as_str()),
            (400, Some("INVALID_ARGUMENT")),
            "{url}: {}",
            answer.text
        );
        let message = answer.body["message"].as_str().unwrap();
        assert!(message.contains(&says), "{url}: {message}");
    }
    assert!(
        admin.get("/v1/webhooks").body["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Written behind the API's back: the connect-time check refuses them.
    let store = second_store(&server);
    let tenant = tenant_of(&store, &admin_tenant(&server));
    for (name, url) in [
        ("literal", format!("https://127.0.0.1:{port}/hook")),
        ("named", format!("https://localhost:{port}/hook")),
        ("plain", format!("http://127.0.0.1:{port}/hook")),
    ] {
        store
            .run(store.store.create_webhook(&NewWebhook {
                tenant_id: tenant,
                name: name.into(),
                url,
                secret: "whsec_test".into(),
                kinds: vec![],
            }))
            .unwrap();
    }
    append(
        &store,
        tenant,
        &[NewEvent::new(EventKind::PoolUp, "pool/default", json!({}))],
    );
    for (name, says) in [
        ("literal", "address 127.0.0.1 is loopback"),
        ("named", "resolves to address 127.0.0.1 is loopback"),
        ("plain", "must be https"),
    ] {
        assert!(
            wait_until(30, || deliveries(&admin, name)
                .iter()
                .any(|d| d["outcome"] == "failed")),
            "{name}: {:?}",
            deliveries(&admin, name)
        );
        let log = deliveries(&admin, name);
        let error = log[0]["error"].as_str().unwrap();
        assert!(error.contains(says), "{name}: {error}");
        assert!(log[0]["status"].is_null());
    }
    assert!(
        target.hits().is_empty(),
        "the inside target was reached: {:?}",
        target.hits()
    );
}

/// Two replicas on one PostgreSQL database, both running the delivery
/// worker: every event reaches the receiver exactly once (no crash in
/// between, so at-least-once is exactly once here), in order; when the
/// replica holding the webhook's lease stops, the other takes it over and
/// goes on from the cursor.
#[test]
fn two_replicas_deliver_each_event_once_in_order() {
    let mut first = Server::start_with(
        Backend::Postgres,
        &["--webhook-allow-private", "--replica-id", "r1"],
    );
    let mut second = Server::replica_of(
        &first,
        &[
            "--webhook-allow-private",
            "--replica-id",
            "r2",
            "--no-local-node",
        ],
    );
    let receiver = Receiver::start(Answers::FailFirst(0));
    let made = create(&first.admin(), "ci", &receiver.url, &[]);
    assert_eq!(made.status, 201, "{}", made.text);
    let secret = made.body["secret"].as_str().unwrap().to_owned();
    let store = second_store(&first);
    let tenant = tenant_of(&store, &admin_tenant(&first));
    let burst = |from: usize, n: usize| {
        // Appended from several threads at once, as concurrent changes are.
        std::thread::scope(|scope| {
            for i in from..from + n {
                let store = store.clone();
                scope.spawn(move || {
                    append(
                        &store,
                        tenant,
                        &[NewEvent::new(
                            EventKind::VmReady,
                            format!("vm/{i}"),
                            json!({"i": i}),
                        )],
                    )
                });
            }
        });
    };
    let received_ids = || -> Vec<i64> {
        receiver
            .hits()
            .iter()
            .map(|h| {
                serde_json::from_slice::<Value>(&h.body).unwrap()["id"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    burst(0, 20);
    assert!(
        wait_until(60, || receiver.hits().len() >= 20),
        "{:?}",
        received_ids()
    );
    let database = first.database_url().unwrap().to_owned();
    let lease_owner = || -> String {
        block_on(async {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&database).await.unwrap();
            sqlx::query_scalar::<_, Option<String>>("SELECT lease_owner FROM webhooks")
                .fetch_one(&mut c)
                .await
                .unwrap()
                .unwrap_or_default()
        })
    };
    let holder = lease_owner();
    assert!(holder == "r1" || holder == "r2", "{holder:?}");
    // The holder stops (and gives its lease up); the other goes on.
    let (stopped, other) = if holder == "r1" {
        (&mut first, "r2")
    } else {
        (&mut second, "r1")
    };
    assert!(stopped.stop().success());
    burst(20, 20);
    assert!(
        wait_until(60, || receiver.hits().len() >= 40),
        "{:?}",
        received_ids()
    );
    assert_eq!(lease_owner(), other);
    let ids = received_ids();
    assert_eq!(ids.len(), 40, "a duplicate: {ids:?}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "out of order or repeated: {ids:?}"
    );
    let mut subjects: Vec<i64> = receiver
        .hits()
        .iter()
        .map(|h| {
            serde_json::from_slice::<Value>(&h.body).unwrap()["data"]["i"]
                .as_i64()
                .unwrap()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, (0..40).collect::<Vec<i64>>(), "every event, once");
    assert!(receiver.hits().iter().all(|h| verifies(h, &secret)));
}
