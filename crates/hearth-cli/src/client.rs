//! The HTTP side of the CLI: a small blocking client for the hearth API.
//!
//! This module owns building request URLs (`/v1/...` under the server URL,
//! each segment percent-encoded), the bearer token header, and turning every
//! failure into a [`CliError`]: the server's own `{"code", "message"}`
//! answer as is, `UNAVAILABLE` when the server cannot be reached, and
//! `INTERNAL` when an answer is not the JSON expected.
//!
//! Every request gives up after [`DEFAULT_TIMEOUT`], except those that wait
//! on purpose ([`Client::post_json_waiting`], for `hearth agents exec`).

use crate::config::Settings;
use crate::error::CliError;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;

/// How long a request may take before the CLI gives up on the server.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest piece of an unexpected answer body quoted in an error, in chars.
const BODY_EXCERPT: usize = 1024;

/// A connection to one hearth server, with the identity to call it as.
pub struct Client {
    http: reqwest::blocking::Client,
    base: Url,
    server: String,
    token: Option<String>,
    /// The CA the server's certificate is checked with (`None`: the
    /// system's roots), for messages.
    ca: Option<std::path::PathBuf>,
}

impl Client {
    /// A client for `settings.server`, sending `settings.token` if any.
    pub fn from_settings(settings: &Settings) -> Result<Client, CliError> {
        Client::with_ca(
            &settings.server,
            &settings.server_origin,
            settings.token.clone(),
            settings.ca.as_deref(),
        )
    }

    /// A client for `server` checking its certificate with the system's roots.
    pub fn new(server: &str, origin: &str, token: Option<String>) -> Result<Client, CliError> {
        Client::with_ca(server, origin, token, None)
    }

    /// A client for `server` (an `http://` or `https://` URL; `origin` names
    /// where it came from, for the error when it is not one). With `ca`, the
    /// server's certificate must be signed by that CA and no other; without,
    /// by one of the system's roots. There is no way to skip the check.
    pub fn with_ca(
        server: &str,
        origin: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<Client, CliError> {
        let invalid = |why: String| {
            CliError::invalid(format!(
                "invalid server URL {server:?} (from {origin}): {why}"
            ))
        };
        let base = Url::parse(server).map_err(|e| invalid(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid("use http://host:port or https://host:port".into()));
        }
        // No client-wide timeout: each request sets its own (see `call`).
        let mut builder = reqwest::blocking::Client::builder()
            .user_agent(concat!("hearth-cli/", env!("CARGO_PKG_VERSION")))
            .use_rustls_tls()
            .https_only(base.scheme() == "https")
            .timeout(None);
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| {
                CliError::invalid(format!(
                    "cannot read the CA certificate {}: {e}",
                    ca.display()
                ))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                CliError::invalid(format!("{}: not a PEM certificate ({e})", ca.display()))
            })?;
            if certs.is_empty() {
                return Err(CliError::invalid(format!(
                    "{}: holds no PEM certificate",
                    ca.display()
                )));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| CliError::internal(format!("cannot set up HTTP: {}", reason(&e))))?;
        Ok(Client {
            http,
            base,
            server: server.to_owned(),
            token,
            ca: ca.map(std::path::Path::to_path_buf),
        })
    }

    /// The server URL as configured (for messages).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// `<server>/v1/<segments...>`, each segment percent-encoded (so a name
    /// can never change the path).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new: the URL can be a base")
            .pop_if_empty()
            .push("v1")
            .extend(segments);
        url
    }

    /// `GET /v1/<segments>`.
    pub fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, CliError> {
        self.call(Method::GET, segments, &[], None, Some(DEFAULT_TIMEOUT))
    }

    /// `GET /v1/<segments>?<query>` (pairs percent-encoded).
    pub fn get_query<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<T, CliError> {
        self.call(Method::GET, segments, query, None, Some(DEFAULT_TIMEOUT))
    }

    /// `DELETE /v1/<segments>`.
    pub fn delete<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, CliError> {
        self.call(Method::DELETE, segments, &[], None, Some(DEFAULT_TIMEOUT))
    }

    /// `POST /v1/<segments>` with a JSON body.
    pub fn post_json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &Value,
    ) -> Result<T, CliError> {
        self.post_json_waiting(segments, body, Some(DEFAULT_TIMEOUT))
    }

    /// `POST /v1/<segments>` with a JSON body, waiting up to `timeout` for
    /// the answer (`None`: as long as it takes), for calls that last as long
    /// as the work they start.
    pub fn post_json_waiting<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &Value,
        timeout: Option<Duration>,
    ) -> Result<T, CliError> {
        let bytes = serde_json::to_vec(body).map_err(|e| CliError::internal(e.to_string()))?;
        self.call(
            Method::POST,
            segments,
            &[],
            Some(("application/json", bytes)),
            timeout,
        )
    }

    /// `PUT /v1/<segments>` with the user's YAML text, unchanged.
    pub fn put_yaml<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        yaml: String,
    ) -> Result<T, CliError> {
        self.call(
            Method::PUT,
            segments,
            &[],
            Some(("application/yaml", yaml.into_bytes())),
            Some(DEFAULT_TIMEOUT),
        )
    }

    /// `PATCH /v1/<segments>` with a JSON merge patch.
    pub fn patch_merge<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        patch: &Value,
    ) -> Result<T, CliError> {
        self.patch_as("application/merge-patch+json", segments, patch)
    }

    /// `PATCH /v1/<segments>` with a plain JSON body (the warm-pool API's
    /// partial updates).
    pub fn patch_json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &Value,
    ) -> Result<T, CliError> {
        self.patch_as("application/json", segments, body)
    }

    fn patch_as<T: DeserializeOwned>(
        &self,
        content_type: &str,
        segments: &[&str],
        body: &Value,
    ) -> Result<T, CliError> {
        let bytes = serde_json::to_vec(body).map_err(|e| CliError::internal(e.to_string()))?;
        self.call(
            Method::PATCH,
            segments,
            &[],
            Some((content_type, bytes)),
            Some(DEFAULT_TIMEOUT),
        )
    }

    /// `GET /v1/<segments>` as a stream that lasts as long as the server
    /// sends (server-sent events): the open response, or the error the
    /// server answered.
    pub fn open_stream(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<reqwest::blocking::Response, CliError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request = self.http.get(url).header(ACCEPT, "text/event-stream");
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .map_err(|e| CliError::unavailable(&self.server, &reason(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().unwrap_or_default();
            return Err(error_from_answer(status, &text));
        }
        Ok(response)
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
        timeout: Option<Duration>,
    ) -> Result<T, CliError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request = self
            .http
            .request(method, url)
            .header(ACCEPT, "application/json");
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, bytes)) = body {
            request = request.header(CONTENT_TYPE, content_type).body(bytes);
        }
        let unreachable = |e: reqwest::Error| {
            let why = reason(&e);
            if why.contains("certificate") {
                let trusted = match &self.ca {
                    Some(ca) => format!("the CA {}", ca.display()),
                    None => "the system's roots".to_owned(),
                };
                return CliError::unavailable(
                    &self.server,
                    &format!(
                        "{why}: its certificate is not one {trusted} vouches for; give the \
                         server's CA with --ca, HEARTH_CA or `ca:` of its entry in hearth.local.yaml"
                    ),
                );
            }
            CliError::unavailable(&self.server, &why)
        };
        let response = request.send().map_err(unreachable)?;
        let status = response.status();
        let text = response.text().map_err(unreachable)?;
        decode(status, &text)
    }
}

/// Reads an answer: the expected JSON on success, else the error it carries.
/// An empty success body (a `204 No Content`) reads as JSON `null`.
pub fn decode<T: DeserializeOwned>(status: StatusCode, body: &str) -> Result<T, CliError> {
    if !status.is_success() {
        return Err(error_from_answer(status, body));
    }
    let json = if body.trim().is_empty() { "null" } else { body };
    serde_json::from_str(json).map_err(|e| {
        CliError::internal(format!(
            "server answered {status} with an unexpected body ({e}): {}",
            excerpt(body)
        ))
    })
}

/// The error a non-2xx answer carries: its `{"code", "message"}` body as
/// sent, or `INTERNAL: server answered <status>: <body>` when the body is
/// not that.
pub fn error_from_answer(status: StatusCode, body: &str) -> CliError {
    #[derive(Deserialize)]
    struct WireError {
        code: String,
        message: String,
    }
    match serde_json::from_str::<WireError>(body) {
        Ok(e) if !e.code.trim().is_empty() => CliError {
            code: e.code,
            message: e.message,
        },
        _ => CliError::internal(format!("server answered {status}: {}", excerpt(body))),
    }
}

/// A body trimmed, and cut short when long (an HTML error page, say).
fn excerpt(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        return "(empty body)".to_owned();
    }
    match body.char_indices().nth(BODY_EXCERPT) {
        Some((cut, _)) => format!("{}…", &body[..cut]),
        None => body.to_owned(),
    }
}

/// The innermost cause of an error ("Connection refused (os error 111)"),
/// which says more than reqwest's "error sending request for url (…)".
pub fn reason(err: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = err;
    while let Some(source) = deepest.source() {
        deepest = source;
    }
    deepest.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::thread;

    /// Serves one request with `response` (a full HTTP answer) and hands
    /// back the request as received.
    fn serve_once(response: &'static str) -> (String, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let mut stream = stream;
            stream.write_all(response.as_bytes()).unwrap();
            head + &String::from_utf8(body).unwrap()
        });
        (url, handle)
    }

    #[test]
    fn urls_encode_segments_and_keep_a_base_path() {
        let c = Client::new("http://h:7070", "test", None).unwrap();
        assert_eq!(
            c.url(&["workspaces", "web"]).as_str(),
            "http://h:7070/v1/workspaces/web"
        );
        assert_eq!(
            c.url(&["workspaces", "../x y"]).as_str(),
            "http://h:7070/v1/workspaces/..%2Fx%20y"
        );
        let c = Client::new("https://h/hearth/", "test", None).unwrap();
        assert_eq!(c.url(&["whoami"]).as_str(), "https://h/hearth/v1/whoami");
    }

    #[test]
    fn bad_server_urls_are_invalid_arguments() {
        for bad in ["127.0.0.1:7070", "ftp://h", "not a url", "mailto:x@y"] {
            let err = Client::new(bad, "--server", None).err().unwrap();
            assert_eq!(err.code, "INVALID_ARGUMENT", "{bad}");
            assert!(err.message.contains("(from --server)"), "{}", err.message);
        }
    }

    #[test]
    fn server_errors_are_passed_through() {
        let e = error_from_answer(
            StatusCode::NOT_FOUND,
            r#"{"code": "NOT_FOUND", "message": "workspace \"web\" not found"}"#,
        );
        assert_eq!(e.to_string(), "NOT_FOUND: workspace \"web\" not found");
        let e = error_from_answer(
            StatusCode::IM_A_TEAPOT,
            r#"{"code": "SOMETHING_NEW", "message": "m"}"#,
        );
        assert_eq!(e.to_string(), "SOMETHING_NEW: m");
        let e = error_from_answer(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>\n");
        assert_eq!(
            e.to_string(),
            "INTERNAL: server answered 502 Bad Gateway: <html>bad gateway</html>"
        );
        let e = error_from_answer(StatusCode::INTERNAL_SERVER_ERROR, "");
        assert_eq!(
            e.to_string(),
            "INTERNAL: server answered 500 Internal Server Error: (empty body)"
        );
        let long = "x".repeat(5000);
        let e = error_from_answer(StatusCode::BAD_GATEWAY, &long);
        assert!(e.message.ends_with('…') && e.message.len() < 1200);
    }

    #[test]
    fn success_bodies_must_be_json() {
        let v: Value = decode(StatusCode::OK, r#"{"a": 1}"#).unwrap();
        assert_eq!(v, json!({"a": 1}));
        let e = decode::<Value>(StatusCode::OK, "hello").unwrap_err();
        assert_eq!(e.code, "INTERNAL");
        assert!(e.message.contains("200 OK"), "{}", e.message);
        // No body at all is null: fine for a Value, not for a struct.
        let v: Value = decode(StatusCode::NO_CONTENT, "").unwrap();
        assert_eq!(v, Value::Null);
        #[derive(Debug, Deserialize)]
        struct Flushed {
            #[allow(dead_code)]
            flushed: u64,
        }
        let e = decode::<Flushed>(StatusCode::OK, "").unwrap_err();
        assert!(e.message.contains("(empty body)"), "{}", e.message);
    }

    #[test]
    fn an_unreachable_server_is_unavailable() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let server = format!("http://127.0.0.1:{port}");
        let c = Client::new(&server, "test", None).unwrap();
        let e = c.get::<Value>(&["whoami"]).unwrap_err();
        let prefix = format!("UNAVAILABLE: cannot reach the hearth server at {server}: ");
        assert!(e.to_string().starts_with(&prefix), "{e}");
        assert!(
            !e.message.contains("error sending request"),
            "the innermost cause is shown: {e}"
        );
    }

    #[test]
    fn requests_carry_token_content_type_and_body() {
        let (url, request) = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        );
        let c = Client::new(&url, "test", Some("tok".into())).unwrap();
        let _: Value = c
            .put_yaml(&["pool-config", "default"], "max_vms: 50\n".into())
            .unwrap();
        let request = request.join().unwrap();
        let lower = request.to_ascii_lowercase();
        assert!(
            request.starts_with("PUT /v1/pool-config/default HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(lower.contains("authorization: bearer tok\r\n"), "{request}");
        assert!(
            lower.contains("content-type: application/yaml\r\n"),
            "{request}"
        );
        assert!(request.ends_with("\r\n\r\nmax_vms: 50\n"), "{request}");

        let (url, request) = serve_once(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 45\r\nConnection: close\r\n\r\n{\"code\":\"INVALID_ARGUMENT\",\"message\":\"nope!\"}",
        );
        let c = Client::new(&url, "test", None).unwrap();
        let e = c
            .patch_merge::<Value>(&["workspaces", "web"], &json!({"min_idle": 2}))
            .unwrap_err();
        assert_eq!(e.to_string(), "INVALID_ARGUMENT: nope!");
        let request = request.join().unwrap();
        let lower = request.to_ascii_lowercase();
        assert!(
            request.starts_with("PATCH /v1/workspaces/web "),
            "{request}"
        );
        assert!(
            !lower.contains("authorization:"),
            "no token, no header: {request}"
        );
        assert!(
            lower.contains("content-type: application/merge-patch+json\r\n"),
            "{request}"
        );
        assert!(request.ends_with("{\"min_idle\":2}"), "{request}");

        let (url, request) = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        );
        let c = Client::new(&url, "test", None).unwrap();
        let _: Value = c
            .patch_json(
                &["workspaces", "web", "warm-pool"],
                &json!({"branch": null}),
            )
            .unwrap();
        let request = request.join().unwrap();
        assert!(
            request.starts_with("PATCH /v1/workspaces/web/warm-pool HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request
                .to_ascii_lowercase()
                .contains("content-type: application/json\r\n"),
            "{request}"
        );
        assert!(request.ends_with("{\"branch\":null}"), "{request}");

        let (url, request) = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\nConnection: close\r\n\r\n{\"items\":[]}",
        );
        let c = Client::new(&url, "test", None).unwrap();
        let _: Value = c
            .get_query(&["agents"], &[("workspace", "web x"), ("phase", "a&b")])
            .unwrap();
        let request = request.join().unwrap();
        assert!(
            request.starts_with("GET /v1/agents?workspace=web+x&phase=a%26b HTTP/1.1\r\n"),
            "{request}"
        );
    }
}
