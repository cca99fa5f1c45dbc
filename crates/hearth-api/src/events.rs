//! The event log as the API shows it (`GET /v1/events`, the live stream
//! `GET /v1/events/stream`), and as webhooks deliver it: one JSON shape,
//! [`Event`], everywhere.
//!
//! The stream works on every replica alike: it follows the store by cursor
//! (a page of at most [`STREAM_PAGE`] events at a time, read only when the
//! client has taken the previous one, so a slow consumer holds one page in
//! memory, never more), polling every [`STREAM_POLL`] while nothing is new,
//! with a keep-alive comment every [`KEEP_ALIVE`].
//!
//! **Invariants:**
//! - An event never carries a secret or an agent's output: the store's
//!   `data` holds names, ids, phases, counts and error messages only.
//! - A reader sees a tenant's events in id order, and ids grow in commit
//!   order ([`hearth_store::Store::list_events`]), so a cursor never skips one.

use crate::auth::Caller;
use crate::tenants::rfc3339;
use crate::{ApiError, AppState};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use hearth_core::Error;
use hearth_core::ids::TenantId;
use hearth_core::rbac::Permission;
use hearth_store::{EVENT_PAGE_MAX, EventFilter, EventKind, EventRecord, Store};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// How often the stream looks for new events while it has none to send.
pub const STREAM_POLL: Duration = Duration::from_millis(250);
/// How long the stream stays silent at most: then a comment line.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events the stream reads (and holds) at most at a time.
pub const STREAM_PAGE: i64 = 200;

/// One event of a tenant's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// The cursor: grows in commit order within the tenant.
    pub id: i64,
    /// When it was written (RFC 3339, milliseconds, UTC).
    pub at: String,
    /// `vm.ready`, `agent.running`, `resource.written`, ...
    pub kind: String,
    /// What changed: `vm/<id>`, `agent/<id>`, `instance/<id>`,
    /// `workspace/<name>`, `<kind>/<name>` for resources, `pool/default`.
    pub subject: String,
    /// The identity that caused it, when an identity did.
    pub actor: Option<String>,
    /// Details of the kind.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

impl From<&EventRecord> for Event {
    fn from(e: &EventRecord) -> Event {
        Event {
            id: e.id,
            at: rfc3339(e.at),
            kind: e.kind.as_str().to_owned(),
            subject: e.subject.clone(),
            actor: e.actor.clone(),
            data: e.data.clone(),
        }
    }
}

/// Parses a type filter: comma-separated kinds (`vm.ready`) or families
/// (`vm`, every kind starting `vm.`). Empty means every kind.
pub fn parse_types(text: &str) -> Result<Vec<EventKind>, Error> {
    let mut kinds = Vec::new();
    if text.is_empty() {
        return Ok(kinds);
    }
    for part in text.split(',') {
        let matched: Vec<EventKind> = EventKind::ALL
            .iter()
            .copied()
            .filter(|k| {
                k.as_str() == part
                    || k.as_str()
                        .strip_prefix(part)
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            .collect();
        if matched.is_empty() {
            let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
            return Err(Error::invalid(format!(
                "unknown event type {part:?}: one of {} or a family before the dot",
                names.join(", ")
            )));
        }
        for kind in matched {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
    }
    Ok(kinds)
}

/// `GET /v1/events` and `/v1/events/stream` parameters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events after this id (the previous answer's `next`, or the
    /// last id seen).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Comma-separated kinds (`vm.ready`) or families (`vm`).
    #[serde(rename = "type")]
    #[param(
        rename = "type",
        pattern = r"^((vm(\.(booting|ready|assigned|returned|destroyed|failed))?|agent(\.(queued|provisioning|running|idle|sleeping|completed|failed|killed))?|instance(\.(step|ready|failed))?|resource(\.(written|deleted))?|workspace(\.(backing_off|hard_limited|recovered))?|pool(\.(flushed|nuked|up))?)(,(vm(\.(booting|ready|assigned|returned|destroyed|failed))?|agent(\.(queued|provisioning|running|idle|sleeping|completed|failed|killed))?|instance(\.(step|ready|failed))?|resource(\.(written|deleted))?|workspace(\.(backing_off|hard_limited|recovered))?|pool(\.(flushed|nuked|up))?))*)?$"
    )]
    pub kinds: Option<String>,
    /// At most this many (1 to 1000; default 1000). Listing only.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// One page of the event log.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventList {
    /// Oldest first.
    pub events: Vec<Event>,
    /// The cursor to pass as `after` for the next page: the last id here,
    /// or the `after` given when there is nothing new.
    pub next: i64,
}

fn filter_of(query: &EventQuery, after: Option<i64>) -> Result<EventFilter, Error> {
    if let Some(after) = after
        && after < 0
    {
        return Err(Error::invalid(format!(
            "after: an event id is 0 or more, not {after}"
        )));
    }
    let limit = match query.limit {
        None => EVENT_PAGE_MAX,
        Some(n) if (1..=EVENT_PAGE_MAX).contains(&n) => n,
        Some(n) => {
            return Err(Error::invalid(format!(
                "limit: between 1 and {EVENT_PAGE_MAX}, not {n}"
            )));
        }
    };
    Ok(EventFilter {
        after,
        kinds: parse_types(query.kinds.as_deref().unwrap_or(""))?,
        limit,
    })
}

fn query_of(query: Result<Query<EventQuery>, QueryRejection>) -> Result<EventQuery, Error> {
    query
        .map(|Query(q)| q)
        .map_err(|e| Error::invalid(format!("query: {}", e.body_text())))
}

/// The tenant's events, oldest first, from a cursor.
#[utoipa::path(get, path = "/v1/events", tag = "event", operation_id = "list_events", security(("bearer" = [])), params(EventQuery),
    responses((status = 200, body = EventList), (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<EventList>, ApiError> {
    caller.require(Permission::EventRead)?;
    let query = query_of(query)?;
    let filter = filter_of(&query, query.after)?;
    let records = state.store.list_events(caller.tenant(), &filter).await?;
    let next = records.last().map_or(filter.after.unwrap_or(0), |e| e.id);
    Ok(Json(EventList {
        events: records.iter().map(Event::from).collect(),
        next,
    }))
}

/// One frame of the event stream as a server-sent-events reader parses it
/// (the OpenAPI document's shape of `text/event-stream`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamFrame {
    /// The event's id (the cursor).
    #[schema(pattern = "^[0-9]+$")]
    pub id: String,
    /// The event's kind (`vm.ready`).
    pub event: String,
    /// The [`Event`] as JSON text.
    pub data: String,
}

/// The tenant's events as they are written: server-sent events, one frame
/// per event (`id: <id>`, `event: <kind>`, `data: <Event JSON>`), from
/// `after` or the `Last-Event-ID` header (which wins: it is where a
/// reconnecting client stopped); a keep-alive comment every 15 s.
#[utoipa::path(get, path = "/v1/events/stream", tag = "event", operation_id = "stream_events", security(("bearer" = [])),
    params(EventQuery, ("Last-Event-ID" = Option<i64>, Header, minimum = 0, description = "The last id received (a reconnecting client)")),
    responses((status = 200, description = "Server-sent events, each data an Event", content_type = "text/event-stream", body = StreamFrame),
              (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    query: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<sse::Event, Infallible>>>, ApiError> {
    caller.require(Permission::EventRead)?;
    let query = query_of(query)?;
    let last_seen = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .ok_or_else(|| Error::invalid("Last-Event-ID: an event id (a number)"))?,
        ),
    };
    // Both are checked, whichever wins.
    filter_of(&query, query.after)?;
    let mut filter = filter_of(&query, last_seen.or(query.after))?;
    filter.limit = STREAM_PAGE;
    tracing::debug!(tenant = %caller.tenant(), identity = %caller.identity.name, after = ?filter.after, "event stream opened");
    let follow = Follow {
        store: state.store.clone(),
        tenant: caller.tenant(),
        filter,
        page: VecDeque::new(),
    };
    let events = futures_util::stream::unfold(follow, |mut follow| async move {
        let event = follow.next().await;
        Some((Ok(frame(&event)), follow))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// One SSE frame of an event.
fn frame(event: &EventRecord) -> sse::Event {
    let body = serde_json::to_string(&Event::from(event)).unwrap_or_else(|_| "{}".into());
    sse::Event::default()
        .id(event.id.to_string())
        .event(event.kind.as_str())
        .data(body)
}

/// A reader following one tenant's log by cursor.
struct Follow {
    store: Arc<dyn Store>,
    tenant: TenantId,
    filter: EventFilter,
    /// What was read and not yet sent (at most one page).
    page: VecDeque<EventRecord>,
}

impl Follow {
    /// The next event, waiting for one to be written.
    async fn next(&mut self) -> EventRecord {
        loop {
            if let Some(event) = self.page.pop_front() {
                return event;
            }
            match self.store.list_events(self.tenant, &self.filter).await {
                Ok(events) if !events.is_empty() => {
                    self.filter.after = events.last().map(|e| e.id);
                    self.page.extend(events);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(tenant = %self.tenant, error = %crate::error::chain(&e), "event stream: cannot read events; retrying");
                }
            }
            tokio::time::sleep(STREAM_POLL).await;
        }
    }
}

/// How often [`keep_for`] prunes: a quarter of the window, between 200 ms
/// and a minute.
pub fn prune_every(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(200), Duration::from_secs(60))
}

/// The retention task: deletes events older than `retention`, at once and
/// then every [`prune_every`], until `stop` turns true. Every replica may
/// run it: pruning is idempotent.
pub async fn keep_for(
    store: Arc<dyn Store>,
    retention: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let every = prune_every(retention);
    let window = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        let before = hearth_store::now_millis().saturating_sub(window);
        match store.prune_events(before).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned events past the retention window"),
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "cannot prune events; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/events", get(list))
        .route("/v1/events/stream", get(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI document's pattern for `type` accepts every kind and
    /// family (alone and in a list) and refuses what `parse_types` refuses.
    #[test]
    fn the_documented_pattern_matches_the_parser() {
        use utoipa::IntoParams;
        let params = EventQuery::into_params(|| None);
        let param = params.iter().find(|p| p.name == "type").unwrap();
        let json = serde_json::to_value(param).unwrap();
        let pattern = json["schema"]["pattern"].as_str().unwrap();
        let re = regex::Regex::new(pattern).unwrap();
        let mut names: Vec<String> = EventKind::ALL
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect();
        for kind in EventKind::ALL {
            let family = kind.as_str().split('.').next().unwrap().to_owned();
            if !names.contains(&family) {
                names.push(family);
            }
        }
        for name in &names {
            assert!(re.is_match(name), "{name}");
            assert!(parse_types(name).is_ok(), "{name}");
        }
        assert!(re.is_match(&names.join(",")));
        assert!(re.is_match(""));
        for bad in [
            "vm.exploded",
            "v",
            "vm,",
            " vm",
            ",",
            "2026-12-01T18:27:04.564Z",
            "vm.ready,nope",
        ] {
            assert!(!re.is_match(bad), "{bad}");
            assert!(parse_types(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn types_name_kinds_or_families() {
        assert_eq!(parse_types("").unwrap(), []);
        assert_eq!(parse_types("vm.ready").unwrap(), [EventKind::VmReady]);
        let pool = parse_types("pool,vm.ready").unwrap();
        assert_eq!(
            pool,
            [
                EventKind::PoolFlushed,
                EventKind::PoolNuked,
                EventKind::PoolUp,
                EventKind::VmReady
            ]
        );
        let err = parse_types("vm.exploded").unwrap_err();
        assert!(
            err.message.contains("unknown event type \"vm.exploded\""),
            "{}",
            err.message
        );
        assert!(parse_types("v").is_err());
    }
}
