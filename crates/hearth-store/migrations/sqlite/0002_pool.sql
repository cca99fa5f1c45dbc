-- The pool: what each VM was built from and is for, agents, and the pool's
-- own per-tenant state. SQLite flavour; keep in step with
-- ../postgres/0002_pool.sql (same columns, types, keys and indexes, so the SQL in
-- src/sql.rs runs unchanged on both). Flags are BIGINT 0/1 on both backends.

ALTER TABLE vms ADD COLUMN driver        TEXT   NOT NULL DEFAULT 'sandbox';
ALTER TABLE vms ADD COLUMN env_version   BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN image_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN stale         BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN reserved_for  TEXT   NULL;
ALTER TABLE vms ADD COLUMN test          BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN error         TEXT   NULL;

-- The claim picks fresh before stale, oldest first; this index supersedes
-- 0001's (tenant_id, workspace, state, created_at).
DROP INDEX vms_claim;
CREATE INDEX vms_claim ON vms (tenant_id, workspace, state, stale, created_at);
-- Live VMs of every tenant (adoption), counts by state.
CREATE INDEX vms_state ON vms (state);

-- Owners are not foreign keys: an agent's record outlives its owner's
-- identity (owner_name keeps who it was). Nor are vm_id and parent_id: a
-- VM's or a parent's record may be gone while the agent's is kept.
CREATE TABLE agents (
    id            TEXT    NOT NULL PRIMARY KEY,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    workspace     TEXT    NOT NULL,
    owner_id      TEXT    NOT NULL,
    owner_name    TEXT    NOT NULL,
    owner_kind    TEXT    NOT NULL,
    parent_id     TEXT    NULL,
    phase         TEXT    NOT NULL,
    vm_id         TEXT    NULL,
    on_idle       TEXT    NOT NULL,
    command       TEXT    NULL,
    build         TEXT    NOT NULL,
    exit_code     INTEGER NULL,
    output        TEXT    NOT NULL DEFAULT '',
    error         TEXT    NULL,
    resurrections BIGINT  NOT NULL DEFAULT 0,
    created_at    BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL,
    queued_at     BIGINT  NOT NULL,
    started_at    BIGINT  NULL,
    finished_at   BIGINT  NULL
);
-- The queue (FIFO by queued_at) and the per-developer cap count.
CREATE INDEX agents_queue ON agents (tenant_id, phase, queued_at);
CREATE INDEX agents_owner ON agents (tenant_id, owner_id, phase);

-- No row: the pool runs.
CREATE TABLE pool_states (
    tenant_id  TEXT   NOT NULL PRIMARY KEY REFERENCES tenants (id),
    stopped    BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE workspace_states (
    tenant_id            TEXT   NOT NULL REFERENCES tenants (id),
    workspace            TEXT   NOT NULL,
    consecutive_failures BIGINT NOT NULL,
    backoff_until        BIGINT NULL,
    hard_limited         BIGINT NOT NULL,
    last_error           TEXT   NULL,
    config_fingerprint   TEXT   NOT NULL,
    PRIMARY KEY (tenant_id, workspace)
);

-- Control-plane builds: global, not per tenant.
CREATE TABLE builds (
    id         TEXT   NOT NULL PRIMARY KEY,
    first_seen BIGINT NOT NULL,
    retired_at BIGINT NULL
);
