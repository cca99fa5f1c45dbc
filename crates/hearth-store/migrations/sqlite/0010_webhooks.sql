-- Webhooks: per-tenant endpoints that are sent the tenant's events, and
-- the log of every delivery attempt.
-- Sqlite flavour; keep in step with ../postgres/0010_webhooks.sql (same
-- columns and indexes; only the delivery id's type differs).
--
-- webhooks.secret: the HMAC signing key, sealed with the store's secrets
--   key when the store has one (hearth-sealed:v1:...).
-- webhooks.kinds: comma-separated event kinds it is sent ('' = every kind).
-- webhooks.enabled: 1 or 0.
-- webhooks.event_cursor: the id of the last event it was given (delivered
--   or given up on); delivery goes on with the next one after it.
-- webhooks.attempts / next_attempt_at: failed attempts at the event after
--   the cursor, and when (ms) the next may start, so a replica taking the
--   webhook over goes on where the last one stopped.
-- webhooks.lease_owner / lease_until: the replica delivering it and until
--   when (ms); another replica takes it over only once the lease expired.
CREATE TABLE webhooks (
    id              TEXT    NOT NULL PRIMARY KEY,
    tenant_id       TEXT    NOT NULL REFERENCES tenants (id),
    name            TEXT    NOT NULL,
    url             TEXT    NOT NULL,
    secret          TEXT    NOT NULL,
    kinds           TEXT    NOT NULL,
    enabled         INTEGER NOT NULL DEFAULT 1,
    created_at      BIGINT  NOT NULL,
    event_cursor    BIGINT  NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     BIGINT  NOT NULL DEFAULT 0,
    UNIQUE (tenant_id, name)
);

-- One row per attempt. outcome: 'delivered' (a 2xx answer), 'retrying'
-- (failed, another attempt at next_retry_at), 'failed' (the last attempt
-- failed: given up, the cursor moved on). status: the HTTP status when the
-- receiver answered; error: why the attempt failed otherwise.
CREATE TABLE webhook_deliveries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id    TEXT    NOT NULL,
    event_id      BIGINT  NOT NULL,
    kind          TEXT    NOT NULL,
    attempt       INTEGER NOT NULL,
    started_at    BIGINT  NOT NULL,
    finished_at   BIGINT  NOT NULL,
    status        INTEGER,
    error         TEXT,
    outcome       TEXT    NOT NULL,
    next_retry_at BIGINT
);

CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (finished_at);
