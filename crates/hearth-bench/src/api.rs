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
    /// A client of `base` (`http://host:port`) with a bearer `token`.
    pub fn new(base: &str, token: &str) -> Result<Api> {
        let http = reqwest::blocking::Client::builder()
            .timeout(TIMEOUT)
            .pool_max_idle_per_host(1)
            .build()
            .context("cannot build an HTTP client")?;
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
