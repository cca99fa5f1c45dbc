//! The delivery worker: sends each webhook its tenant's events, signed, in
//! id order, retried with back-off, every attempt in the delivery log.
//!
//! Every replica runs one. Each poll it takes (or renews) the leases of the
//! webhooks no other replica holds ([`Store::lease_webhooks`]) and runs one
//! task per leased webhook, which sends the events after the webhook's
//! cursor one at a time: a 2xx answer delivers it; anything else (another
//! status, a redirect, a refused address, a timeout) is retried after
//! 1 s, 2 s, 4 s, ... (capped, jittered) until the last attempt fails,
//! which marks it failed and moves on to the next event.
//!
//! **Invariants:**
//! - At least once, in order: the cursor moves only once an event is
//!   delivered or given up on, and only by the lease's holder
//!   ([`Store::record_delivery`]); a replica that dies between the
//!   receiver's answer and the record leaves the event to be sent again.
//! - Requests go only to addresses [`guard`](super::guard) allows, never
//!   through a proxy, never following a redirect; at most
//!   [`BODY_READ_MAX`] bytes of an answer are read.
//! - The secret is never logged and never leaves but as the signature.
//! - The delivery log keeps attempts for `log_retention` (`--webhook-log-retention`).

use super::guard::{GuardedResolver, WebhookPolicy, check_addr, literal_ip};
use crate::events::Event;
use hearth_store::{
    DeliveryAttempt, DeliveryOutcome, EventFilter, EventRecord, Store, WebhookRecord, now_millis,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How much of a receiver's answer is read (the rest is dropped).
pub const BODY_READ_MAX: usize = 16 * 1024;

/// How often the delivery log is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The back-off between attempts at one event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    /// Attempts at one event before it is marked failed (at least 1).
    pub max_attempts: u32,
    /// The wait after the first failed attempt; doubled after each.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 8,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
        }
    }
}

impl Retry {
    /// The longest wait after failed attempt `n` (1-based): `base · 2^(n-1)`,
    /// at most `cap`.
    pub fn ceiling(&self, n: u32) -> Duration {
        let doubled = self
            .base
            .checked_mul(1u32 << (n.saturating_sub(1)).min(30))
            .unwrap_or(self.cap);
        doubled.min(self.cap)
    }

    /// The wait after failed attempt `n`: uniformly between half the
    /// [`ceiling`](Self::ceiling) and all of it, so receivers that failed
    /// together are not retried together. Whole milliseconds (what the
    /// log records, and what timers keep).
    pub fn delay(&self, n: u32) -> Duration {
        let ceiling = self.ceiling(n).as_millis() as f64;
        let share: f64 = rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0);
        Duration::from_millis((ceiling * share).round() as u64)
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Delivered: go on with the next event.
    Delivered,
    /// Failed: retry if attempts are left.
    Failed,
    /// Stop delivering this webhook (the lease is lost, the store failed).
    Stop,
}

/// How an event's attempts ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Delivered,
    GaveUp,
    Stopped,
}

/// Runs attempts `first..=max_attempts` at one event until one delivers,
/// sleeping the back-off between. `attempt(n, wait)` is told the wait
/// that follows if it fails (`None` for the last attempt), so it can
/// record when the next one starts.
pub async fn with_retries<F, Fut>(retry: &Retry, first: u32, mut attempt: F) -> Ended
where
    F: FnMut(u32, Option<Duration>) -> Fut,
    Fut: Future<Output = Step>,
{
    let max = retry.max_attempts.max(1);
    for n in first.max(1)..=max {
        let wait = (n < max).then(|| retry.delay(n));
        match attempt(n, wait).await {
            Step::Delivered => return Ended::Delivered,
            Step::Stop => return Ended::Stopped,
            Step::Failed => match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Ended::GaveUp,
            },
        }
    }
    Ended::GaveUp
}

/// `sha256=<hex>` of HMAC-SHA256 keyed with the secret (its text, UTF-8,
/// `whsec_` included) over `<timestamp>.<body>`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The `X-Hearth-Delivery` id of an event sent to a webhook: the same for
/// every attempt, so receivers can drop a repeat.
pub fn delivery_id(webhook: &WebhookRecord, event_id: i64) -> String {
    format!("{}-{event_id}", webhook.id)
}

/// What the worker needs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This replica's name (the lease owner).
    pub replica: String,
    pub policy: WebhookPolicy,
    pub retry: Retry,
    /// How often leases are taken and renewed, and new events looked for.
    pub poll: Duration,
    /// How long a lease lasts unrenewed: another replica takes a webhook
    /// over this long after its holder stopped renewing.
    pub lease: Duration,
    /// One attempt's limit, connect to answer.
    pub timeout: Duration,
    /// How long the delivery log keeps an attempt.
    pub log_retention: Duration,
}

impl WorkerConfig {
    pub fn new(replica: String, policy: WebhookPolicy, retry: Retry) -> Self {
        WorkerConfig {
            replica,
            policy,
            retry,
            poll: Duration::from_millis(500),
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            log_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The HTTP client webhooks are sent with: the guarded resolver, no proxy,
/// no redirects, the attempt timeout.
pub fn client(config: &WorkerConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .dns_resolver(Arc::new(GuardedResolver {
            policy: config.policy,
        }))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .user_agent(concat!("hearth-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Runs the worker until `stop` turns true, then gives its leases up.
pub async fn run(
    store: Arc<dyn Store>,
    config: WorkerConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match client(&config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %crate::error::chain(&e), "webhooks: cannot build the HTTP client; no webhook is delivered");
            return;
        }
    };
    let config = Arc::new(config);
    let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
    let lease_ms = config.lease.as_millis() as i64;
    // The log is pruned at start and then hourly (by every replica: the
    // delete is the same whoever runs it).
    let mut prune_at = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= prune_at {
            prune_at += PRUNE_EVERY;
            let before = now_millis() - config.log_retention.as_millis() as i64;
            match store.prune_webhook_deliveries(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "webhooks: pruned the delivery log"),
                Err(e) => {
                    tracing::warn!(error = %crate::error::chain(&e), "webhooks: cannot prune the delivery log")
                }
            }
        }
        match store.lease_webhooks(&config.replica, lease_ms).await {
            Ok(leased) => {
                let held: std::collections::HashSet<&str> =
                    leased.iter().map(|w| w.id.as_str()).collect();
                // Deleted, disabled or taken over: stop at once.
                running.retain(|id, task| {
                    let keep = held.contains(id.as_str()) && !task.is_finished();
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for webhook in leased {
                    if running.contains_key(&webhook.id) {
                        continue;
                    }
                    let id = webhook.id.clone();
                    let task = tokio::spawn(deliver_webhook(
                        store.clone(),
                        client.clone(),
                        config.clone(),
                        webhook,
                    ));
                    running.insert(id, task);
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "webhooks: cannot take leases; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.poll) => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    for task in running.into_values() {
        task.abort();
    }
    if let Err(e) = store.release_webhooks(&config.replica).await {
        tracing::warn!(error = %crate::error::chain(&e), "webhooks: cannot release leases");
    }
}

/// Sends `webhook` every event after its cursor, until none is left or the
/// lease is lost.
async fn deliver_webhook(
    store: Arc<dyn Store>,
    client: reqwest::Client,
    config: Arc<WorkerConfig>,
    mut webhook: WebhookRecord,
) {
    // A retry that another replica (or an earlier task) scheduled.
    let wait = webhook.next_attempt_at - now_millis();
    if webhook.attempts > 0 && wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    loop {
        let filter = EventFilter {
            after: Some(webhook.cursor),
            kinds: webhook.kinds.clone(),
            limit: 100,
        };
        let events = match store.list_events(webhook.tenant_id, &filter).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(webhook = %webhook.name, error = %crate::error::chain(&e), "webhooks: cannot list events");
                return;
            }
        };
        if events.is_empty() {
            return;
        }
        for event in &events {
            let first = webhook.attempts as u32 + 1;
            webhook.attempts = 0;
            let ended = with_retries(&config.retry, first, |n, wait| {
                attempt(&store, &client, &config, &webhook, event, n, wait)
            })
            .await;
            match ended {
                Ended::Stopped => return,
                Ended::Delivered | Ended::GaveUp => webhook.cursor = event.id,
            }
        }
    }
}

/// One attempt: sends, records, and says what it came to.
async fn attempt(
    store: &Arc<dyn Store>,
    client: &reqwest::Client,
    config: &WorkerConfig,
    webhook: &WebhookRecord,
    event: &EventRecord,
    n: u32,
    wait: Option<Duration>,
) -> Step {
    let started_at = now_millis();
    let (status, error) = send(client, config, webhook, event).await;
    let finished_at = now_millis();
    let delivered = error.is_none() && status.is_some_and(|s| (200..300).contains(&s));
    let error = match (delivered, error, status) {
        (true, _, _) => None,
        (false, Some(e), _) => Some(e),
        (false, None, Some(s)) if (300..400).contains(&s) => {
            Some(format!("answered {s}, a redirect: never followed"))
        }
        (false, None, Some(s)) => Some(format!("answered {s}")),
        (false, None, None) => Some("no answer".into()),
    };
    let outcome = match (delivered, wait) {
        (true, _) => DeliveryOutcome::Delivered,
        (false, Some(_)) => DeliveryOutcome::Retrying,
        (false, None) => DeliveryOutcome::Failed,
    };
    let next_retry_at = wait
        .filter(|_| !delivered)
        .map(|w| finished_at + w.as_millis() as i64);
    match outcome {
        DeliveryOutcome::Delivered => {
            tracing::debug!(webhook = %webhook.name, event = event.id, attempt = n, "webhook delivered")
        }
        _ => {
            tracing::info!(webhook = %webhook.name, event = event.id, attempt = n, outcome = outcome.as_str(), error = error.as_deref().unwrap_or(""), "webhook attempt failed")
        }
    }
    let record = DeliveryAttempt {
        event_id: event.id,
        kind: event.kind,
        attempt: n as i32,
        started_at,
        finished_at,
        status,
        error,
        outcome,
        next_retry_at,
    };
    match store
        .record_delivery(&config.replica, &webhook.id, &record)
        .await
    {
        Ok(true) if delivered => Step::Delivered,
        Ok(true) => Step::Failed,
        Ok(false) => {
            tracing::info!(webhook = %webhook.name, "webhooks: lease lost; another replica delivers it");
            Step::Stop
        }
        Err(e) => {
            tracing::warn!(webhook = %webhook.name, error = %crate::error::chain(&e), "webhooks: cannot record an attempt");
            Step::Stop
        }
    }
}

/// POSTs the event: the receiver's status, or why there is none.
async fn send(
    client: &reqwest::Client,
    config: &WorkerConfig,
    webhook: &WebhookRecord,
    event: &EventRecord,
) -> (Option<i32>, Option<String>) {
    let url = match super::guard::check_url(&webhook.url, config.policy) {
        Ok(url) => url,
        Err(e) => return (None, Some(e.message)),
    };
    // A literal address is never resolved, so it is checked here.
    if let Some(ip) = literal_ip(&url)
        && let Err(e) = check_addr(ip, config.policy)
    {
        return (None, Some(e));
    }
    let body = serde_json::to_vec(&Event::from(event)).expect("an event serializes");
    let timestamp = now_millis() / 1000;
    let request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Hearth-Event", event.kind.as_str())
        .header("X-Hearth-Delivery", delivery_id(webhook, event.id))
        .header("X-Hearth-Timestamp", timestamp.to_string())
        .header(
            "X-Hearth-Signature",
            signature(&webhook.secret, timestamp, &body),
        )
        .body(body);
    match request.send().await {
        Ok(mut response) => {
            let status = i32::from(response.status().as_u16());
            // Read a little (so the connection can be reused), never more.
            let mut read = 0;
            while read < BODY_READ_MAX {
                match response.chunk().await {
                    Ok(Some(chunk)) => read += chunk.len(),
                    _ => break,
                }
            }
            (Some(status), None)
        }
        Err(e) => (None, Some(describe(&e))),
    }
}

/// A send error as the log shows it: the whole chain, without the URL
/// (which the tenant knows, and may carry a token in its path).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = what.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::time::Instant;

    #[test]
    fn signatures_are_hmac_sha256_over_timestamp_dot_body() {
        // Independently: HMAC-SHA256("whsec_k", "1700000000.{}") computed
        // by the hmac crate over the joined text.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_k").unwrap();
        mac.update(b"1700000000.{}");
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(signature("whsec_k", 1_700_000_000, b"{}"), expected);
        assert_ne!(signature("whsec_k", 1_700_000_001, b"{}"), expected);
        assert_ne!(signature("whsec_j", 1_700_000_000, b"{}"), expected);
        assert_eq!(expected.len(), "sha256=".len() + 64);
    }

    #[test]
    fn waits_double_from_the_base_up_to_the_cap() {
        let retry = Retry {
            max_attempts: 20,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        let ceilings: Vec<u64> = (1..=8).map(|n| retry.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(retry.ceiling(200), Duration::from_secs(60));
        for n in 1..=10 {
            let d = retry.delay(n);
            assert!(
                d >= retry.ceiling(n) / 2 && d <= retry.ceiling(n),
                "{n}: {d:?}"
            );
        }
    }

    /// Paused time: attempts happen after exactly the back-off waits, the
    /// last failure gives up, a success stops retrying.
    #[tokio::test(start_paused = true)]
    async fn attempts_are_spaced_by_the_back_off_and_end_at_the_limit() {
        let retry = Retry {
            max_attempts: 4,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(3),
        };
        let start = Instant::now();
        let seen = Mutex::new(Vec::new());
        let ended = with_retries(&retry, 1, |n, wait| {
            seen.lock().unwrap().push((n, start.elapsed(), wait));
            async { Step::Failed }
        })
        .await;
        assert_eq!(ended, Ended::GaveUp);
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(seen[0].1, Duration::ZERO);
        assert_eq!(seen[3].2, None, "the last attempt has no retry after it");
        for pair in seen.windows(2) {
            // Each gap is the wait the attempt before was told of.
            assert_eq!(pair[1].1 - pair[0].1, pair[0].2.unwrap());
        }
        let gaps: Vec<Duration> = seen.windows(2).map(|p| p[1].1 - p[0].1).collect();
        for (i, gap) in gaps.iter().enumerate() {
            let ceiling = retry.ceiling(i as u32 + 1);
            assert!(*gap >= ceiling / 2 && *gap <= ceiling, "{i}: {gap:?}");
        }

        // Resumed at attempt 3 (another replica made two), delivered on 4.
        let calls = Mutex::new(Vec::new());
        let ended = with_retries(&retry, 3, |n, _| {
            calls.lock().unwrap().push(n);
            async move {
                if n == 4 {
                    Step::Delivered
                } else {
                    Step::Failed
                }
            }
        })
        .await;
        assert_eq!(ended, Ended::Delivered);
        assert_eq!(calls.into_inner().unwrap(), [3, 4]);

        // A lost lease stops at once, without waiting.
        let before = Instant::now();
        let ended = with_retries(&retry, 1, |_, _| async { Step::Stop }).await;
        assert_eq!((ended, before.elapsed()), (Ended::Stopped, Duration::ZERO));
    }
}
