-- The event log: every lifecycle change of a tenant's VMs, agents,
-- provisioning runs, resources and pool, in commit order per tenant.
-- SQLite flavour; keep in step with ../postgres/0009_events.sql (same
-- columns and indexes; only the id's type differs).
--
-- id: increases in commit order within a tenant (SQLite has one writer; in
-- PostgreSQL the writing transaction holds the tenant's event lock until it
-- commits), so a reader that has seen id N never later finds a smaller one.
-- at: milliseconds since the epoch (the store's clock).
-- kind: `vm.ready`, `agent.running`, `resource.written`, ... (hearth_store::EventKind).
-- subject: what changed, `vm/<id>`, `agent/<id>`, `workspace/<name>`, ...
-- actor: the identity that caused it, for changes an identity made.
-- data: a JSON object with the details of the kind.
CREATE TABLE events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT    NOT NULL,
    at        BIGINT  NOT NULL,
    kind      TEXT    NOT NULL,
    subject   TEXT    NOT NULL,
    actor     TEXT,
    data      TEXT    NOT NULL
);

CREATE INDEX events_tenant ON events (tenant_id, id);
CREATE INDEX events_at ON events (at);
