//! A small blocking client of the hearth API: JSON in, JSON out, one
//! keep-alive connection pool per [`Api`] (one per benchmark thread).

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// How long any one request may take.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A client of one server, calling it with one token.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::blocking::Client,
    base: String,
    token: String,
}

/// An answer: its status and its JSON body (`Null` when not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl Api {
    /// A client of `base` (`https://host:port`, or `http://` on loopback)
    /// with a bearer `token`, trusting only `ca` when given.
    pub fn new(base: &str, token: &str, ca: Option<&std::path::Path>) -> Result<Api> {
        let mut builder = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .timeout(TIMEOUT)
            .pool_max_idle_per_host(1);
        if let Some(ca) = ca {
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(root(ca)?);
        }
        let http = builder.build().context("cannot build an HTTP client")?;
        Ok(Api {
            http,
            base: base.to_owned(),
            token: token.to_owned(),
        })
    }

    /// Sends a request and returns whatever the server answered.
    pub fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Answer> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .with_context(|| format!("{method} {path}: the server did not answer"))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .with_context(|| format!("{method} {path}: cannot read the answer"))?;
        Ok(Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        })
    }

    /// Sends a request; an answer other than 2xx is an error naming it.
    pub fn ok(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let answer = self.call(method.clone(), path, body)?;
        if !answer.is_success() {
            bail!("{method} {path}: {} {}", answer.status, answer.body);
        }
        Ok(answer.body)
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.ok(Method::GET, path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.ok(Method::POST, path, Some(body))
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.ok(Method::PUT, path, Some(body))
    }
}

/// The CA certificate at `path`, for a client to trust.
pub fn root(path: &std::path::Path) -> Result<reqwest::Certificate> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    reqwest::Certificate::from_pem(&pem)
        .with_context(|| format!("{}: not a PEM certificate", path.display()))
}
