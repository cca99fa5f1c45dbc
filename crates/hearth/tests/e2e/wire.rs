//! The wire boundary, attacked for real: the real binary serving TLS on a
//! real socket, real clients (reqwest with rustls, raw TCP, a raw rustls
//! client, the `hearth` CLI). Each attack fails; beside it the legitimate
//! path works.

use crate::common::{Api, Backend, Server, binary, http_client, run_cli};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn host_port(url: &str) -> String {
    url.split_once("://")
        .unwrap()
        .1
        .trim_end_matches('/')
        .to_owned()
}

fn ca_of(s: &Server) -> &str {
    s.ca.as_ref()
        .expect("TLS with the server's own CA")
        .to_str()
        .unwrap()
}

/// Reads until the peer closes (or a minute passed); what it sent.
fn read_to_close(stream: &mut impl Read) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
                ) =>
            {
                return got;
            }
            Err(e) => panic!("expected the server to close the connection, got {e}"),
        }
    }
}

#[test]
fn plain_http_to_the_tls_port_gets_no_answer_and_no_token_is_accepted() {
    let s = Server::start(Backend::Sqlite);
    assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);
    // Attack: the operator's token in a plain-HTTP request to the API port.
    let mut c = TcpStream::connect(host_port(&s.url)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        c,
        "GET /v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        s.admin_token
    )
    .unwrap();
    let got = read_to_close(&mut c);
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/"),
        "a plain-HTTP request got an HTTP answer: {got:?}"
    );
    // At most a TLS alert record (content type 21), never application data.
    assert!(got.is_empty() || got[0] == 21, "not a TLS alert: {got:?}");
    // reqwest speaking http:// to the port gets no status either.
    let err = reqwest::blocking::Client::new()
        .get(format!("http://{}/v1/whoami", host_port(&s.url)))
        .bearer_auth(&s.admin_token)
        .send()
        .expect_err("plain HTTP is not answered");
    assert!(!err.is_status(), "{err}");
    // The CLI pointed at http:// is refused too.
    let out = s.cli(
        &s.admin_token,
        &[
            "--server",
            &s.url.replace("https://", "http://"),
            "auth",
            "whoami",
        ],
        "",
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.starts_with("UNAVAILABLE: cannot reach"),
        "{out:?}"
    );
    // No request reached the API: the server logged no request at all.
    assert!(
        !s.logs().contains("/v1/whoami"),
        "a request was handled: {}",
        s.logs_tail()
    );
    // Legitimate: the same token over TLS.
    let r = s.admin().get("/v1/whoami");
    assert_eq!(
        (r.status, r.body["identity"].as_str()),
        (200, Some("admin"))
    );
    // ... which is logged, so the check above would have seen a request.
    assert!(crate::common::wait_until(10, || s
        .logs()
        .contains("/v1/whoami")));
}

#[test]
fn a_client_trusting_another_ca_refuses_the_server() {
    let a = Server::start(Backend::Sqlite);
    let b = Server::start(Backend::Sqlite);
    assert_ne!(
        std::fs::read(a.ca.as_ref().unwrap()).unwrap(),
        std::fs::read(b.ca.as_ref().unwrap()).unwrap(),
        "each server makes a CA of its own"
    );
    // A client trusting only B's CA will not talk to A.
    let b_pem = std::fs::read(b.ca.as_ref().unwrap()).unwrap();
    let only_b = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&b_pem).unwrap())
        .build()
        .unwrap();
    let err = only_b
        .get(format!("{}/v1/whoami", a.url))
        .bearer_auth(&a.admin_token)
        .send()
        .expect_err("A's certificate is not B's CA's");
    assert!(
        crate::common::error_chain(&err).contains("UnknownIssuer"),
        "{}",
        crate::common::error_chain(&err)
    );
    // The CLI with B's CA (and with none: the system's roots) refuses A,
    // saying why and what to do; it never retries without checking.
    for ca in [Some(ca_of(&b)), None] {
        let mut env = vec![
            ("HEARTH_SERVER", a.url.as_str()),
            ("HEARTH_TOKEN", a.admin_token.as_str()),
        ];
        // An empty HEARTH_CA counts as unset: the system's roots.
        env.push(("HEARTH_CA", ca.unwrap_or("")));
        let dir = tempfile::tempdir().unwrap();
        let out = run_cli(dir.path(), &["auth", "whoami"], "", &env);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(
            out.stderr.starts_with(&format!(
                "UNAVAILABLE: cannot reach the hearth server at {}: invalid peer certificate: UnknownIssuer",
                a.url
            )) && out.stderr.contains("give the server's CA with --ca"),
            "{out:?}"
        );
    }
    // A CA file that is not a certificate is named.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.pem"), "not a pem\n").unwrap();
    let out = run_cli(
        dir.path(),
        &["--ca", "bad.pem", "auth", "whoami"],
        "",
        &[("HEARTH_SERVER", &a.url), ("HEARTH_TOKEN", &a.admin_token)],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("bad.pem: holds no PEM certificate"),
        "{out:?}"
    );
    // Legitimate: the right CA, by flag.
    let out = run_cli(
        dir.path(),
        &["--ca", ca_of(&a), "auth", "whoami"],
        "",
        &[("HEARTH_SERVER", &a.url), ("HEARTH_TOKEN", &a.admin_token)],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("identity: admin"), "{out:?}");
}

/// A TCP listener that records whether anyone connected.
struct Recorder {
    listener: TcpListener,
}

impl Recorder {
    fn start() -> Recorder {
        Recorder {
            listener: TcpListener::bind("127.0.0.1:0").unwrap(),
        }
    }
    fn url(&self) -> String {
        format!("https://{}", self.listener.local_addr().unwrap())
    }
    /// Every byte any client sent so far (a finished client's connection is
    /// in the backlog even if never accepted, so nothing is missed).
    fn received(&self) -> (usize, Vec<u8>) {
        self.listener.set_nonblocking(true).unwrap();
        let mut count = 0;
        let mut bytes = Vec::new();
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    count += 1;
                    stream.set_nonblocking(true).unwrap();
                    let _ = stream.read_to_end(&mut bytes);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return (count, bytes),
                Err(e) => panic!("{e}"),
            }
        }
    }
}

#[test]
fn a_hearth_yaml_pointing_elsewhere_never_receives_the_developers_token() {
    let mine = Server::start(Backend::Sqlite);
    let other = Server::start(Backend::Sqlite);
    let recorder = Recorder::start();
    let dev = mine.identity("dana", "developer");
    let project = tempfile::tempdir().unwrap();
    let cli = |args: &[&str], env: &[(&str, &str)]| run_cli(project.path(), args, "", env);

    // The developer logs in to their server once (token bound to it).
    std::fs::write(
        project.path().join("hearth.yaml"),
        format!("server: {}\nworkspace: web\n", mine.url),
    )
    .unwrap();
    let out = cli(
        &["auth", "login", "--token", &dev],
        &[("HEARTH_CA", ca_of(&mine))],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let local = std::fs::read_to_string(project.path().join("hearth.local.yaml")).unwrap();
    assert!(local.contains(&dev) && local.contains(&mine.url), "{local}");
    // Legitimate: commands go to that server with that token.
    let out = cli(&["auth", "whoami"], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("identity: dana"), "{out:?}");

    // Attack: a pull brings a hearth.yaml naming a listener that records.
    for target in [recorder.url(), other.url.clone()] {
        std::fs::write(
            project.path().join("hearth.yaml"),
            format!("server: {target}\nworkspace: web\n"),
        )
        .unwrap();
        for env in [
            vec![],
            // A token in the environment is not sent there either.
            vec![("HEARTH_TOKEN", dev.as_str())],
        ] {
            let out = cli(&["auth", "whoami"], &env);
            assert_eq!(out.code, 1, "{out:?}");
            assert!(
                out.stderr
                    .starts_with("FAILED_PRECONDITION: refusing to send ")
                    && out.stderr.contains(&target)
                    && out.stderr.contains("hearth auth login --server"),
                "{out:?}"
            );
            if env.is_empty() {
                assert!(
                    out.stderr.contains(&mine.url),
                    "names both servers: {out:?}"
                );
            }
            assert!(!out.stderr.contains(&dev), "{out:?}");
        }
    }
    // --server / HEARTH_SERVER naming another server get no file token.
    let out = cli(&["--server", &recorder.url(), "get", "workspace"], &[]);
    assert_eq!(out.code, 1, "{out:?}");
    let out = cli(&["get", "workspace"], &[("HEARTH_SERVER", &recorder.url())]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.starts_with("FAILED_PRECONDITION: refusing"),
        "{out:?}"
    );
    let (connections, bytes) = recorder.received();
    assert_eq!(
        (connections, bytes.len()),
        (0, 0),
        "the recorder got {:?}",
        String::from_utf8_lossy(&bytes)
    );
    // The other real server never saw the token: it has no such identity,
    // and it handled no request beyond its own start.
    assert!(!other.logs().contains("dana"), "{}", other.logs_tail());

    // Legitimate: logging in to the other server binds a second token,
    // and each server gets only its own.
    let theirs = other.identity("olga", "developer");
    let out = cli(
        &["auth", "login", "--token", &theirs],
        &[("HEARTH_CA", ca_of(&other))],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let out = cli(&["auth", "whoami"], &[]);
    assert!(out.stdout.contains("identity: olga"), "{out:?}");
    std::fs::write(
        project.path().join("hearth.yaml"),
        format!("server: {}\n", mine.url),
    )
    .unwrap();
    let out = cli(&["auth", "whoami"], &[]);
    assert!(out.stdout.contains("identity: dana"), "{out:?}");
}

#[test]
fn the_local_servers_token_and_ca_are_found_by_discovery_for_that_server_only() {
    let s = Server::start(Backend::Sqlite);
    // A folder whose `.hearth` is the server's data dir, as after
    // `hearth server` run there.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(s.data_dir.path(), dir.path().join(".hearth")).unwrap();
    let sub = dir.path().join("src");
    std::fs::create_dir(&sub).unwrap();
    let out = run_cli(&sub, &["--server", &s.url, "auth", "whoami"], "", &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("identity: admin"), "{out:?}");
    // The URL written beside the token is the one used without --server.
    assert_eq!(
        std::fs::read_to_string(s.data_dir.path().join("server-url"))
            .unwrap()
            .trim(),
        s.url
    );
    // Another server (here the default one) does not get it.
    let out = run_cli(&sub, &["auth", "whoami"], "", &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.starts_with(
            "FAILED_PRECONDITION: refusing to send a token to https://127.0.0.1:7070 (from default)"
        ) && out.stderr.contains(&s.url),
        "{out:?}"
    );
}

#[test]
fn plain_http_is_refused_off_loopback_and_served_on_it_when_asked() {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(binary())
            .args(["server", "--plain-http", "--listen", listen, "--data-dir"])
            .arg(dir.path())
            .env_remove("HEARTH_DATABASE_URL")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "--plain-http serves the API unencrypted, which is allowed only on a loopback address; --listen {listen} is not one"
            )),
            "{stderr}"
        );
        assert!(
            !dir.path().join("hearth.db").exists() && !dir.path().join("admin-token").exists(),
            "refused before anything started"
        );
    }
    // Legitimate: asked for, on loopback.
    let s = Server::start_with(Backend::Sqlite, &["--plain-http"]);
    assert!(s.url.starts_with("http://127.0.0.1:"), "{}", s.url);
    assert_eq!(s.ca, None);
    assert!(
        !s.data_dir.path().join("tls").exists(),
        "no CA for plain HTTP"
    );
    let r = s.admin().get("/v1/whoami");
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(s.logs().contains("serving plain HTTP on loopback"));
}

#[test]
fn an_operators_certificate_and_key_are_served() {
    let dir = tempfile::tempdir().unwrap();
    // The operator's own CA and a certificate for 127.0.0.1 signed by it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "operator CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_path, key_path, ca_path) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("operator-ca.pem"),
    );
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&ca_path, ca.pem()).unwrap();

    // A key that is not the certificate's is refused at start, named.
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(&wrong, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["server", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&wrong)
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("HEARTH_DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the TLS certificate and key do not go together"),
        "{stderr}"
    );

    let s = Server::start_with(
        Backend::Sqlite,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    assert!(!s.data_dir.path().join("tls").exists(), "no CA of its own");
    // A client trusting the operator's CA talks to it; the CLI too.
    crate::common::trust(&s.url, &ca_path);
    let r = s.admin().get("/v1/whoami");
    assert_eq!(r.status, 200, "{}", r.text);
    let out = s.cli(&s.admin_token, &["auth", "whoami"], "");
    assert_eq!(out.code, 0, "{out:?}");
    // The served certificate is the operator's, byte for byte.
    let served = served_certificate(&s.url, &ca_path);
    assert_eq!(served, leaf.der().to_vec());
}

/// The leaf certificate a TLS server presents (checked against `ca`).
fn served_certificate(url: &str, ca: &Path) -> Vec<u8> {
    let (mut conn, mut tcp) = tls_client(url, ca);
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

/// A raw rustls client connection to `url`, trusting `ca` only.
fn tls_client(url: &str, ca: &Path) -> (rustls::ClientConnection, TcpStream) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    (conn, TcpStream::connect(host_port(url)).unwrap())
}

#[test]
fn the_ca_keys_are_private_and_the_ca_outlives_a_restart() {
    let mut s = Server::start(Backend::Sqlite);
    let tls = s.data_dir.path().join("tls");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tls), 0o700);
    assert_eq!(mode(&tls.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&tls.join("server-key.pem")), 0o600);
    assert_eq!(mode(&tls.join("ca.pem")), 0o644);
    // The fingerprint printed on start is the CA file's.
    let pem = std::fs::read(tls.join("ca.pem")).unwrap();
    let fingerprint = {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        use sha2::Digest;
        sha2::Sha256::digest(der.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let printed = format!("(SHA-256 {fingerprint})");
    assert!(
        crate::common::wait_until(10, || s.stdout.lock().unwrap().contains(&printed)),
        "{}",
        s.stdout.lock().unwrap().clone()
    );
    // A restart keeps the CA: clients that trusted it still do.
    s.restart();
    assert_eq!(std::fs::read(tls.join("ca.pem")).unwrap(), pem);
    assert_eq!(mode(&tls.join("ca-key.pem")), 0o600);
    assert!(s.logs().contains(&fingerprint));
    let r = s.admin().get("/v1/whoami");
    assert_eq!(r.status, 200, "{}", r.text);
}

#[test]
fn stalled_tls_handshakes_and_heads_are_closed_after_the_header_timeout() {
    let s = Server::start_with(Backend::Sqlite, &["--header-timeout", "2s"]);
    let ca = s.ca.clone().unwrap();
    let opened = Instant::now();
    // Half open TCP and say nothing (no ClientHello); half finish the
    // handshake and send half a request head.
    let silent: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(host_port(&s.url)).unwrap())
        .collect();
    let mut partial: Vec<_> = (0..50)
        .map(|_| {
            let (mut conn, mut tcp) = tls_client(&s.url, &ca);
            conn.writer()
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            while conn.is_handshaking() || conn.wants_write() {
                conn.complete_io(&mut tcp).unwrap();
            }
            rustls::StreamOwned::new(conn, tcp)
        })
        .collect();
    // The server still answers meanwhile.
    assert_eq!(Api::anonymous(&s.url).get("/healthz").status, 200);
    for mut c in silent {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(read_to_close(&mut c), b"", "no bytes to a silent client");
    }
    for c in &mut partial {
        c.sock
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let got = read_to_close(c);
        assert!(
            !String::from_utf8_lossy(&got).contains("HTTP/1.1 200"),
            "{got:?}"
        );
    }
    let elapsed = opened.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900),
        "closed after {elapsed:?}, before the 2s header timeout"
    );
    assert_eq!(
        http_client(&s.url)
            .get(format!("{}/healthz", s.url))
            .send()
            .unwrap()
            .status(),
        200
    );
}
