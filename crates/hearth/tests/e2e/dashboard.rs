//! The web dashboard at `/ui`, driven in real headless Chromium through
//! WebDriver (a `chromedriver` the test starts on a free loopback port and
//! ends by its process group), against the real binary over real HTTPS with
//! the sandbox driver's real VMs; and its session cookie attacked with a
//! plain HTTP client.
//!
//! Chromium is told `--ignore-certificate-errors`, in these tests only: the
//! server under test signs its certificate with a CA it made at start, and
//! Chromium on Linux trusts only its NSS database, which a test should not
//! write to. Every other client here trusts exactly that CA.
//!
//! A machine without `chromium` or `chromedriver` FAILS these tests (never
//! skips them): `.ci/run` installs both.
//!
//! Screenshots land in `target/screenshots/`; a few are committed as
//! `docs/screenshots/*.png` for the README.

use crate::common::{Backend, Server, http_client, wait_until};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ENV: &str = "driver: sandbox\nmemory: 256Mi\nnetwork: none\n";
const HOSTILE: &str = "<img src=x onerror=\"window.__pwned=1\">";

/// Headless Chromium behind a chromedriver this test started.
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: the dashboard's browser tests need the Debian packages \
                 chromium and chromium-driver (.ci/run installs them)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own process group, so that ending it by its id also ends the
        // browsers it started, even when the test panics midway.
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let status = format!("http://127.0.0.1:{port}/status");
        let plain = reqwest::blocking::Client::new();
        assert!(
            wait_until(30, || plain
                .get(&status)
                .send()
                .is_ok_and(|r| r.status().is_success())),
            "chromedriver did not answer on port {port}"
        );
        let profile = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    // Chromium refuses its sandbox as root (CI runs as root).
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--hide-scrollbars",
                    "--window-size=1440,1000",
                    "--force-device-scale-factor=1",
                    // See the module doc: the server's CA is its own.
                    "--ignore-certificate-errors",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a Chromium session starts");
        Browser {
            rt,
            client: Some(client),
            driver,
            _profile: profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    fn goto(&self, url: &str) {
        self.rt.block_on(self.c().goto(url)).unwrap();
    }

    /// Runs `script` (a function body) in the page and returns its value.
    fn js(&self, script: &str) -> Value {
        self.rt
            .block_on(self.c().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    /// The text of the first element `css` matches ("" when none does).
    /// The page re-renders a view on every event that concerns it, so an
    /// element found may be replaced before it is read: then it is found
    /// again.
    fn text(&self, css: &str) -> String {
        for _ in 0..20 {
            let found = self
                .rt
                .block_on(self.c().find_all(Locator::Css(css)))
                .unwrap();
            let Some(e) = found.first() else {
                return String::new();
            };
            match self.rt.block_on(e.text()) {
                Ok(text) => return text,
                Err(e) if stale(&e) => continue,
                Err(e) => panic!("text of {css}: {e}"),
            }
        }
        panic!("{css} was replaced 20 times in a row while read")
    }

    /// Whether an element `css` matches is shown.
    fn displayed(&self, css: &str) -> bool {
        let found = self
            .rt
            .block_on(self.c().find_all(Locator::Css(css)))
            .unwrap();
        found
            .first()
            .is_some_and(|e| self.rt.block_on(e.is_displayed()).unwrap_or(false))
    }

    /// Clicks the element `css` matches (found again if a re-render
    /// replaced it between finding and clicking).
    fn click(&self, css: &str) {
        for _ in 0..20 {
            let e = self
                .rt
                .block_on(self.c().wait().for_element(Locator::Css(css)))
                .unwrap_or_else(|e| panic!("no {css}: {e}"));
            match self.rt.block_on(e.click()) {
                Ok(()) => return,
                Err(e) if stale(&e) => continue,
                Err(e) => panic!("click on {css}: {e}"),
            }
        }
        panic!("{css} was replaced 20 times in a row while clicked")
    }

    /// Replaces the value of the input `css` with `text`, as typed.
    fn fill(&self, css: &str, text: &str) {
        let e = self
            .rt
            .block_on(self.c().wait().for_element(Locator::Css(css)))
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        self.rt.block_on(e.clear()).unwrap();
        self.rt.block_on(e.send_keys(text)).unwrap();
    }

    fn select(&self, css: &str, value: &str) {
        let e = self
            .rt
            .block_on(self.c().wait().for_element(Locator::Css(css)))
            .unwrap();
        self.rt.block_on(e.select_by_value(value)).unwrap();
    }

    /// Waits up to `secs` for `css`'s text to satisfy `ok`; panics with the
    /// last text seen.
    fn wait_text(&self, css: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let done = wait_until(secs, || {
            last = self.text(css);
            ok(&last)
        });
        assert!(
            done,
            "{css} never showed what was awaited; last text: {last:?}"
        );
        last
    }

    /// Saves a PNG of the page as `target/screenshots/<name>.png`.
    fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.rt.block_on(self.c().screenshot()).unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Signs in on the page with `token` and waits for the app to show.
    fn sign_in(&self, server: &Server, token: &str, who: &str) {
        self.goto(&format!("{}/ui", server.url));
        self.wait_text("#sign-in h1", 20, |t| t == "Sign in");
        self.fill("#token", token);
        self.click("#sign-in-form button[type=submit]");
        let shown = wait_until(20, || self.text("#identity").starts_with(who));
        if !shown {
            self.screenshot("sign-in-failed");
            let cookies = self.rt.block_on(self.c().get_all_cookies());
            panic!(
                "signing in as {who} failed: the page says {:?}; cookies {cookies:?}",
                self.text("#sign-in-error"),
            );
        }
    }
}

/// Whether a WebDriver error says the element left the page (re-rendered).
fn stale(e: &fantoccini::error::CmdError) -> bool {
    matches!(e, fantoccini::error::CmdError::Standard(w)
        if w.error == fantoccini::error::ErrorStatus::StaleElementReference)
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.rt.block_on(client.close());
        }
        // The group is chromedriver's own (process_group(0)): its id is
        // chromedriver's pid, and it holds only what chromedriver started.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.driver.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.driver.wait();
    }
}

/// The ids of the tenant's idle VMs of `workspace`.
fn idle_vms(server: &Server, workspace: &str) -> Vec<String> {
    server
        .vms()
        .into_iter()
        .filter(|v| v["workspace"] == workspace && v["state"] == "idle")
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Sign in, watch a new workspace fill to `min_idle` live, spawn an agent
/// and read its output, see hostile output as text, see the API's
/// validation message for `max_vms: 0`, flush and see the idle VMs go, and
/// watch a test boot's steps.
#[test]
fn dashboard_drives_the_pool() {
    let server = Server::start(Backend::Sqlite);
    let api = server.admin();
    let description = "Warm sandboxes for the web team <b>not bold</b>";
    let r = api.put_yaml(
        "/v1/pool-config/default",
        &format!("max_vms: 8\ndescription: {description:?}\n"),
    );
    assert!(r.status < 300, "{}", r.text);
    let r = api.put_yaml("/v1/environments/dev", ENV);
    assert!(r.status < 300, "{}", r.text);

    let b = Browser::start();
    b.sign_in(&server, &server.admin_token, "admin");

    // The cookie is HttpOnly, Secure and SameSite=Strict, and the page's
    // script cannot read it.
    let cookies = b.rt.block_on(b.c().get_all_cookies()).unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name() == "__Host-hearth_session")
        .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(session.secure(), Some(true));
    assert_eq!(format!("{:?}", session.same_site()), "Some(Strict)");
    assert_eq!(session.path(), Some("/"));
    assert_eq!(b.js("return document.cookie"), json!(""));
    // The pool config's description shows, as text.
    b.wait_text("#pool-description", 20, |t| t == description);
    assert_eq!(
        b.js("return document.querySelectorAll('#pool-description *').length"),
        json!(0)
    );
    // A marker a reload would lose: everything below happens without one.
    b.js("window.__same_page = 42; return null");

    // A new workspace, created in the form, fills to min_idle live.
    b.click("nav a[data-view=config]");
    b.fill("#ws-name", "web");
    b.fill("#ws-environment", "dev");
    b.fill("#ws-min-idle", "2");
    b.fill("#ws-max-idle", "3");
    b.click("#workspace-form button[type=submit]");
    b.wait_text("#ws-saved", 20, |t| t == "Saved workspace web");
    b.click("nav a[data-view=overview]");
    let idle = ".ws[data-workspace=web] [data-count=idle]";
    b.wait_text(idle, 20, |t| !t.is_empty());
    b.wait_text(idle, 90, |t| t == "2");
    assert_eq!(
        b.text(".ws[data-workspace=web] .counts").replace('\n', " "),
        "2 idle / min_idle 2 · max_idle 3 0 booting 0 assigned 0 stale 0 queued max_vms 8"
    );
    assert_eq!(idle_vms(&server, "web").len(), 2);
    b.screenshot("overview-filled");

    // Spawn an agent and see it run and its output.
    b.click("nav a[data-view=agents]");
    b.wait_text("#spawn-workspace", 20, |t| t.contains("web"));
    b.select("#spawn-workspace", "web");
    b.fill(
        "#spawn-command",
        "echo hello from the agent; echo on $(hostname) >&2",
    );
    b.click("#spawn-form button[type=submit]");
    b.wait_text("#agent-detail h2 .badge", 60, |t| t == "completed");
    let output = b.text("#agent-detail [data-field=output]");
    assert!(
        output.starts_with("hello from the agent\non "),
        "{output:?}"
    );
    let agents = api.get("/v1/agents").body["items"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["phase"], "completed");
    assert_eq!(
        agents[0]["output"].as_str().unwrap().trim_end(),
        output.trim_end()
    );
    b.screenshot("agents");

    // Hostile output is shown as text and runs nothing.
    b.fill("#spawn-command", &format!("printf '%s\\n' '{HOSTILE}'"));
    b.click("#spawn-form button[type=submit]");
    b.wait_text("#agent-detail [data-field=output]", 60, |t| t == HOSTILE);
    b.wait_text("#agent-detail h2 .badge", 60, |t| t == "completed");
    assert_eq!(
        b.js("return document.querySelectorAll('main img').length"),
        json!(0)
    );
    assert_eq!(b.js("return window.__pwned === undefined"), json!(true));

    // An invalid max_vms shows the API's message verbatim, the CLI's too.
    b.click("nav a[data-view=config]");
    b.wait_text("#ws-rows", 20, |t| t.contains("web"));
    b.fill("#cfg-max-vms", "0");
    b.click("#pool-form button[type=submit]");
    b.wait_text("#pool-error", 20, |t| t == "max_vms must be positive");
    let cli = server.cli(
        &server.admin_token,
        &["patch", "pool-config", "default", "--set", "max_vms=0"],
        "",
    );
    assert_ne!(cli.code, 0);
    assert!(
        cli.stderr.contains("max_vms must be positive"),
        "{}",
        cli.stderr
    );
    assert_eq!(
        api.get("/v1/pool-config/default").body["spec"]["max_vms"],
        8
    );
    b.screenshot("config-invalid");

    // Flush: the idle VMs go (the pool refills with new ones).
    b.click("nav a[data-view=overview]");
    b.wait_text(idle, 60, |t| t != "0");
    let before = idle_vms(&server, "web");
    assert!(!before.is_empty());
    b.click("#flush");
    b.wait_text("#flush", 5, |t| t == "Confirm flush");
    b.click("#flush");
    let result = b.wait_text("#flush-result", 20, |t| !t.is_empty());
    assert!(
        result.starts_with("Flushed ")
            && result.ends_with(" warm VMs — pool will replenish with fresh ones"),
        "{result}"
    );
    b.click("nav a[data-view=vms]");
    let gone = wait_until(60, || {
        let shown = b.js(
            "return [...document.querySelectorAll('#vm-rows tr[data-vm]')].map(r => r.getAttribute('data-vm'))",
        );
        let shown: Vec<String> = serde_json::from_value(shown).unwrap();
        !shown.is_empty() && before.iter().all(|id| !shown.contains(id))
    });
    assert!(gone, "the flushed VMs {before:?} still show");
    let live: Vec<String> = server.vms().iter().map(crate::common::id).collect();
    assert!(
        before.iter().all(|id| !live.contains(id)),
        "flushed VMs {before:?} are still in {live:?}"
    );
    b.screenshot("vms");

    // At a glance: a workspace whose setup fails backs off (its error
    // shown as text), and a long agent holds a VM of web.
    let r = api.put_yaml(
        "/v1/workspaces/broken",
        "environment: dev\nmin_idle: 1\nwarm_pool:\n  setup_commands:\n    - name: install\n      command: echo installing; exit 3\n",
    );
    assert!(r.status < 300, "{}", r.text);
    let long = server.spawn(
        &server.admin_token,
        json!({"workspace": "web", "command": "sleep 600"}),
    );
    assert_eq!(long.status, 201, "{}", long.text);
    b.click("nav a[data-view=overview]");
    b.wait_text(".ws[data-workspace=broken] .badge", 90, |t| {
        t == "backing_off" || t == "hard_limited"
    });
    let error = b.text(".ws[data-workspace=broken] .err");
    assert!(error.contains("failed boot(s)"), "{error}");
    b.wait_text(".ws[data-workspace=web] [data-count=assigned]", 60, |t| {
        t == "1"
    });
    b.screenshot("overview");

    // Kill the long agent from its row (a second click confirms).
    let long_id = crate::common::id(&long.body);
    b.click("nav a[data-view=agents]");
    let kill = format!("tr[data-agent='{long_id}'] [data-action=kill]");
    b.wait_text(&kill, 20, |t| t == "Kill");
    b.click(&kill);
    b.wait_text(&kill, 5, |t| t == "Confirm");
    b.click(&kill);
    b.wait_text(
        &format!("tr[data-agent='{long_id}'] [data-field=phase]"),
        60,
        |t| t == "killed",
    );
    assert_eq!(
        api.get(&format!("/v1/agents/{long_id}")).body["phase"],
        "killed"
    );
    assert_eq!(
        b.js(&format!(
            "return document.querySelectorAll(\"{kill}\").length"
        )),
        json!(0),
        "a killed agent is offered kill"
    );

    // A test boot, its steps watched live until ready.
    b.click("nav a[data-view=instances]");
    b.wait_text("#test-workspace", 20, |t| t.contains("web"));
    b.click("#test-form button[type=submit]");
    b.wait_text("#instance-detail h2 .badge", 120, |t| t == "ready");
    let steps = b.js(
        "return [...document.querySelectorAll('#instance-detail li[data-step]')].map(li => li.getAttribute('data-step'))",
    );
    assert_eq!(
        steps,
        json!([
            "create_vm",
            "ensure_server",
            "set_env_vars",
            "project_setup",
            "warm_pool_setup"
        ])
    );
    b.screenshot("instances");

    assert_eq!(
        b.js("return window.__same_page"),
        json!(42),
        "the page reloaded"
    );

    // Sign-out ends the session: a reload asks to sign in again.
    b.click("#sign-out");
    b.wait_text("#sign-in h1", 20, |t| t == "Sign in");
    b.goto(&format!("{}/ui", server.url));
    // The sign-in form starts hidden: it shows once the page has asked
    // for its session and been refused.
    assert!(wait_until(20, || b.displayed("#sign-in")));
    assert!(!b.displayed("#app"));
    let cookies = b.rt.block_on(b.c().get_all_cookies()).unwrap();
    assert!(
        cookies.iter().all(|c| c.name() != "__Host-hearth_session"),
        "sign-out left the cookie: {cookies:?}"
    );
}

/// A viewer is offered no spawn, kill, flush, test boot or edit; the
/// security headers of `/ui` are strict.
#[test]
fn viewer_is_offered_only_what_it_may_do() {
    let server = Server::start(Backend::Sqlite);
    server.pool(4, ENV, "web", "min_idle: 1\n");
    let viewer = server.identity("vera", "viewer");
    let running = server.spawn(
        &server.admin_token,
        json!({"workspace": "web", "command": "sleep 600"}),
    );
    assert_eq!(running.status, 201, "{}", running.text);
    let running = crate::common::id(&running.body);

    let answer = http_client(&server.url)
        .get(format!("{}/ui", server.url))
        .send()
        .unwrap();
    assert_eq!(answer.status(), 200);
    let headers = answer.headers();
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let page = answer.text().unwrap();
    assert!(!page.contains("<script>"), "no inline script");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "nothing from elsewhere"
    );

    let b = Browser::start();
    b.sign_in(&server, &viewer, "vera");
    b.wait_text(".ws[data-workspace=web] [data-count=idle]", 90, |t| {
        t == "1"
    });
    assert!(!b.displayed("#flush"), "a viewer is offered flush");
    assert_eq!(
        b.js("return document.querySelectorAll('[data-action=flush-workspace]').length"),
        json!(0)
    );
    b.click("nav a[data-view=agents]");
    b.wait_text(
        &format!("tr[data-agent='{running}'] [data-field=phase]"),
        60,
        |t| t == "running",
    );
    assert_eq!(
        b.js("return document.querySelectorAll('[data-action=kill]').length"),
        json!(0),
        "a viewer is offered kill"
    );
    assert!(!b.displayed("#spawn-form"), "a viewer is offered spawn");
    b.click("nav a[data-view=instances]");
    assert!(
        !b.displayed("#test-form"),
        "a viewer is offered a test boot"
    );
    b.click("nav a[data-view=config]");
    b.wait_text("#ws-rows", 20, |t| t.contains("web"));
    assert!(!b.displayed("#pool-form button[type=submit]"));
    assert!(!b.displayed("#workspace-form button[type=submit]"));
    assert_eq!(
        b.js("return ['cfg-max-vms','cfg-description','ws-name','ws-min-idle'].every(id => document.getElementById(id).disabled)"),
        json!(true)
    );
    b.screenshot("viewer-config");
}

/// The page follows the event stream with its session cookie: the pill
/// says `live`, and changes made through the API (not the page) show in
/// the Overview and the Events view without a reload and without polling;
/// hostile text in an event's data shows as text.
///
/// The page is opened as `/ui?poll=off`, which turns its polling fallback
/// off altogether: whatever it learns then, it learns from the stream, so
/// "no polling" is proven by construction rather than by counting requests
/// against a timer (a count would race the page's own 2 s fallback).
#[test]
fn dashboard_follows_the_event_stream() {
    let server = Server::start(Backend::Sqlite);
    let api = server.admin();
    server.pool(6, ENV, "web", "min_idle: 1\n");

    let b = Browser::start();
    b.sign_in(&server, &server.admin_token, "admin");
    b.goto(&format!("{}/ui?poll=off#overview", server.url));
    assert!(
        wait_until(20, || b.text("#identity").starts_with("admin")),
        "the session did not carry over to /ui?poll=off"
    );
    // The stream opened with the cookie (an EventSource refused would
    // leave the pill "offline").
    b.wait_text("#live", 20, |t| t == "LIVE" || t == "live");
    b.js("window.__same_page = 7; return null");
    // The Overview's reads that no event asked for: one when the view was
    // shown, one when the stream opened. Once both are answered, only a
    // re-read an event asks for can show what the API changes next.
    let status_reads = || {
        b.js("return performance.getEntriesByType('resource').filter(e => e.name.includes('/v1/pool/status')).length")
            .as_u64()
            .unwrap()
    };
    assert!(
        wait_until(20, || status_reads() >= 2),
        "the Overview was read {} times",
        status_reads()
    );

    // A workspace made through the API fills in the Overview, live.
    let r = api.put_yaml(
        "/v1/workspaces/made-by-api",
        "environment: dev\nmin_idle: 2\nmax_idle: 2\n",
    );
    assert!(r.status < 300, "{}", r.text);
    let idle = ".ws[data-workspace=made-by-api] [data-count=idle]";
    b.wait_text(idle, 30, |t| t == "2");
    assert_eq!(b.text(".ws[data-workspace=made-by-api] .badge"), "healthy");
    // The stream never dropped meanwhile (a resource entry appears only
    // once a response ends), so no reconnection's re-read showed it: the
    // events did.
    assert_eq!(
        b.js("return performance.getEntriesByType('resource').filter(e => e.name.includes('/v1/events/stream')).length"),
        json!(0),
        "the event stream ended and was reopened"
    );

    // An agent spawned through the API: its events arrive in the Events
    // view, newest at the top, each with its subject and details.
    b.click("nav a[data-view=events]");
    let agent = server.spawn(
        &server.admin_token,
        json!({"workspace": "web", "command": "echo hi"}),
    );
    assert_eq!(agent.status, 201, "{}", agent.text);
    let agent = crate::common::id(&agent.body);
    let done = "#event-rows tr[data-kind='agent.completed']";
    b.wait_text(&format!("{done} [data-field=subject]"), 60, |t| {
        t == format!("agent/{agent}")
    });
    let details = b.text(&format!("{done} [data-field=details]"));
    assert!(
        details.contains("from=running") && details.contains("workspace=web"),
        "{details}"
    );
    let ids: Vec<i64> = serde_json::from_value(b.js(
        "return [...document.querySelectorAll('#event-rows tr[data-event]')].map(r => Number(r.getAttribute('data-event')))",
    ))
    .unwrap();
    assert!(ids.len() > 3, "{ids:?}");
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "not newest first: {ids:?}"
    );
    // The view holds every event of the log (the catch-up read and the
    // stream meet without a gap or a repeat).
    let mut counts = (0, 0);
    let same = wait_until(20, || {
        let log = api.get("/v1/events?limit=1000").body;
        let listed = log["events"].as_array().unwrap().len();
        let shown = b.js("return document.querySelectorAll('#event-rows tr[data-event]').length");
        counts = (listed, shown.as_u64().unwrap() as usize);
        counts.0 == counts.1
    });
    assert!(
        same,
        "the log has {} events, the view shows {}",
        counts.0, counts.1
    );

    // A failing setup command named with markup: its boot error (event
    // data) is shown as text and runs nothing.
    let r = api.put_yaml(
        "/v1/workspaces/hostile",
        &format!(
            "environment: dev\nmin_idle: 1\nwarm_pool:\n  setup_commands:\n    - name: {HOSTILE:?}\n      command: exit 3\n"
        ),
    );
    assert!(r.status < 300, "{}", r.text);
    let backing = "#event-rows tr[data-kind='workspace.backing_off']";
    let details = b.wait_text(&format!("{backing} [data-field=details]"), 90, |t| {
        t.contains(HOSTILE)
    });
    assert!(details.contains("failures="), "{details}");
    assert_eq!(
        b.text(&format!("{backing} [data-field=subject]")),
        "workspace/hostile"
    );
    assert_eq!(
        b.js("return document.querySelectorAll('main img').length"),
        json!(0)
    );
    assert_eq!(b.js("return window.__pwned === undefined"), json!(true));

    // The type filter: one family only.
    b.select("#event-family", "workspace");
    let kinds: Vec<String> = serde_json::from_value(b.js(
        "return [...document.querySelectorAll('#event-rows tr[data-event]')].map(r => r.getAttribute('data-kind'))",
    ))
    .unwrap();
    assert!(!kinds.is_empty());
    assert!(
        kinds.iter().all(|k| k.starts_with("workspace.")),
        "{kinds:?}"
    );
    b.select("#event-family", "");
    b.wait_text(
        "#event-rows tr[data-kind='agent.completed'] [data-field=kind]",
        5,
        |t| t == "agent.completed",
    );
    b.screenshot("events");

    // The Overview learnt of the hostile workspace from the stream too.
    b.click("nav a[data-view=overview]");
    b.wait_text(".ws[data-workspace=hostile] .badge", 30, |t| {
        t == "backing_off" || t == "hard_limited"
    });
    assert!(b.text(".ws[data-workspace=hostile] .err").contains(HOSTILE));
    assert_eq!(b.text("#live").to_lowercase(), "live");
    assert_eq!(
        b.js("return window.__same_page"),
        json!(7),
        "the page reloaded"
    );
}

/// The session id in a `Set-Cookie` answer.
fn cookie_of(answer: &reqwest::blocking::Response) -> String {
    let set = answer.headers()["set-cookie"].to_str().unwrap().to_owned();
    for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(part), "{set}");
    }
    let (pair, _) = set.split_once(';').unwrap();
    assert!(pair.starts_with("__Host-hearth_session="), "{set}");
    pair.to_owned()
}

/// Cookie-authenticated writes need the session's CSRF header and this
/// server's origin; sessions end on sign-out and with their identity;
/// every replica honours a session another opened.
fn session_cookie_is_safe_against_csrf(backend: Backend) {
    let server = Server::start(backend);
    let http = http_client(&server.url);
    let url = |path: &str| format!("{}{path}", server.url);
    let own_origin = server.url.trim_end_matches('/').to_owned();
    let version = || server.admin().get("/v1/pool-config/default").body["version"].clone();

    // A bad token opens nothing.
    let bad = http
        .post(url("/ui/session"))
        .json(&json!({"token": "hth_nope"}))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert!(bad.headers().get("set-cookie").is_none());

    let signed = http
        .post(url("/ui/session"))
        .header("origin", &own_origin)
        .json(&json!({"token": server.admin_token}))
        .send()
        .unwrap();
    assert_eq!(signed.status(), 201);
    let cookie = cookie_of(&signed);
    let info: Value = signed.json().unwrap();
    let csrf = info["csrf_token"].as_str().unwrap().to_owned();
    assert_eq!(info["identity"], "admin");

    // The cookie authenticates reads of the API.
    let who = http
        .get(url("/v1/whoami"))
        .header("cookie", &cookie)
        .send()
        .unwrap();
    assert_eq!(who.status(), 200);
    assert_eq!(who.json::<Value>().unwrap()["identity"], "admin");
    // The event stream takes the cookie too (what the page's EventSource
    // sends), and refuses a request without one.
    let stream = http
        .get(url("/v1/events/stream?after=0"))
        .header("cookie", &cookie)
        .send()
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    drop(stream);
    let refused = http.get(url("/v1/events/stream")).send().unwrap();
    assert_eq!(refused.status(), 401);

    // A forged cross-origin write: the cookie, no CSRF header.
    let v0 = version();
    let patch = |headers: &[(&str, &str)]| {
        let mut req = http
            .patch(url("/v1/pool-config/default"))
            .header("cookie", &cookie)
            .header("content-type", "application/merge-patch+json")
            .body(r#"{"description":"forged"}"#);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let (status, body) = patch(&[("origin", "https://evil.example")]);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "PERMISSION_DENIED");
    assert_eq!(
        body["message"],
        "a request signed in by the dashboard's session cookie must carry its X-Hearth-CSRF header"
    );
    // The same without an Origin, and a flush, are refused alike.
    let (status, _) = patch(&[]);
    assert_eq!(status, 403);
    let flush = http
        .post(url("/v1/pool/flush"))
        .header("cookie", &cookie)
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(flush.status(), 403);
    // A wrong CSRF token.
    let (status, body) = patch(&[("x-hearth-csrf", &"0".repeat(64))]);
    assert_eq!(status, 403);
    assert_eq!(
        body["message"],
        "the X-Hearth-CSRF header does not match the dashboard session"
    );
    // The right token from another origin (a stolen token is not enough).
    let (status, body) = patch(&[("x-hearth-csrf", &csrf), ("origin", "https://evil.example")]);
    assert_eq!(status, 403);
    assert_eq!(
        body["message"],
        "cross-origin request refused: Origin \"https://evil.example\" is not this server's"
    );
    assert_eq!(version(), v0, "a refused write changed the pool config");
    // A sign-in from another origin is refused too (login CSRF).
    let cross = http
        .post(url("/ui/session"))
        .header("origin", "https://evil.example")
        .json(&json!({"token": server.admin_token}))
        .send()
        .unwrap();
    assert_eq!(cross.status(), 403);
    assert!(cross.headers().get("set-cookie").is_none());

    // The page's own request passes: the rule, not the route, refused.
    let (status, body) = patch(&[("x-hearth-csrf", &csrf), ("origin", &own_origin)]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        server.admin().get("/v1/pool-config/default").body["spec"]["description"],
        "forged"
    );

    // Every replica honours a session another opened (PostgreSQL).
    if backend == Backend::Postgres {
        let replica = Server::replica_of(&server, &["--no-local-node"]);
        let who = http_client(&replica.url)
            .get(format!("{}/v1/whoami", replica.url))
            .header("cookie", &cookie)
            .send()
            .unwrap();
        assert_eq!(who.status(), 200);
    }

    // Sign-out ends the session everywhere.
    let out = http
        .delete(url("/ui/session"))
        .header("cookie", &cookie)
        .header("x-hearth-csrf", &csrf)
        .send()
        .unwrap();
    assert_eq!(out.status(), 204);
    let after = http
        .get(url("/v1/whoami"))
        .header("cookie", &cookie)
        .send()
        .unwrap();
    assert_eq!(after.status(), 401);
    assert_eq!(after.json::<Value>().unwrap()["code"], "UNAUTHENTICATED");

    // A session never outlives its token: the cookie's Max-Age and the
    // session's expiry stop at the token's (1 h, under the 12 h cap).
    let r = server.admin().post(
        "/v1/identities",
        json!({"name": "tim", "role": "viewer", "expires_in": "1h"}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let short = http
        .post(url("/ui/session"))
        .json(&json!({ "token": r.body["token"] }))
        .send()
        .unwrap();
    assert_eq!(short.status(), 201);
    let set = short.headers()["set-cookie"].to_str().unwrap().to_owned();
    let max_age: i64 = set
        .split("; ")
        .find_map(|p| p.strip_prefix("Max-Age="))
        .unwrap_or_else(|| panic!("no Max-Age in {set}"))
        .parse()
        .unwrap();
    assert!((3500..=3600).contains(&max_age), "{set}");

    // Deleting an identity ends its sessions.
    let token = server.identity("bob", "developer");
    let signed = http
        .post(url("/ui/session"))
        .json(&json!({ "token": token }))
        .send()
        .unwrap();
    assert_eq!(signed.status(), 201);
    let bob = cookie_of(&signed);
    let ok = http
        .get(url("/v1/whoami"))
        .header("cookie", &bob)
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
    let r = server
        .admin()
        .request("DELETE", "/v1/identities/bob", None, None);
    assert!(r.status < 300, "{}", r.text);
    let ended = http
        .get(url("/v1/whoami"))
        .header("cookie", &bob)
        .send()
        .unwrap();
    assert_eq!(ended.status(), 401);
}

crate::both_backends!(session_cookie_is_safe_against_csrf);
