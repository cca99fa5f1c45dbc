//! The event log as the API shows it (`GET /v1/events`, the live stream),
//! and as webhooks deliver it: one JSON shape, [`Event`], everywhere.
//!
//! **Invariants:**
//! - An event never carries a secret or an agent's output: the store's
//!   `data` holds names, ids, phases, counts and error messages only.
//! - A reader sees a tenant's events in id order, and ids grow in commit
//!   order ([`hearth_store::Store::list_events`]), so a cursor never skips one.

use crate::tenants::rfc3339;
use hearth_core::Error;
use hearth_store::{EventKind, EventRecord};
use serde::{Deserialize, Serialize};

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
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_name_kinds_or_families() {
        assert_eq!(parse_types("").unwrap(), []);
        assert_eq!(parse_types("vm.ready").unwrap(), [EventKind::VmReady]);
        let pool = parse_types("pool, vm.ready").unwrap();
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
