-- hearth store schema, PostgreSQL flavour. Keep in step with
-- ../sqlite/0001_init.sql: same tables, columns, keys and indexes, so the
-- SQL in src/sql.rs runs unchanged on both. Ids are UUID text, timestamps
-- BIGINT Unix milliseconds, specs JSON text.

CREATE TABLE tenants (
    id         TEXT   NOT NULL PRIMARY KEY,
    name       TEXT   NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE identities (
    id         TEXT   NOT NULL PRIMARY KEY,
    tenant_id  TEXT   NOT NULL REFERENCES tenants (id),
    name       TEXT   NOT NULL,
    kind       TEXT   NOT NULL,
    role       TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);

CREATE TABLE tokens (
    id            TEXT   NOT NULL PRIMARY KEY,
    identity_id   TEXT   NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    secret_sha256 BYTEA  NOT NULL,
    expires_at    BIGINT,
    created_at    BIGINT NOT NULL
);
CREATE INDEX tokens_identity ON tokens (identity_id);

CREATE TABLE resources (
    tenant_id  TEXT   NOT NULL REFERENCES tenants (id),
    kind       TEXT   NOT NULL,
    name       TEXT   NOT NULL,
    spec       TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, kind, name)
);

-- One row per reference from one resource to another. The foreign keys make
-- the database itself refuse a dangling reference: the referrer's rows go
-- with it, the target cannot go while referred to.
CREATE TABLE resource_refs (
    tenant_id TEXT NOT NULL,
    from_kind TEXT NOT NULL,
    from_name TEXT NOT NULL,
    to_kind   TEXT NOT NULL,
    to_name   TEXT NOT NULL,
    PRIMARY KEY (tenant_id, from_kind, from_name, to_kind, to_name),
    FOREIGN KEY (tenant_id, from_kind, from_name)
        REFERENCES resources (tenant_id, kind, name) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, to_kind, to_name)
        REFERENCES resources (tenant_id, kind, name)
);
CREATE INDEX resource_refs_to ON resource_refs (tenant_id, to_kind, to_name);

CREATE TABLE vms (
    id         TEXT   NOT NULL PRIMARY KEY,
    tenant_id  TEXT   NOT NULL REFERENCES tenants (id),
    workspace  TEXT   NOT NULL,
    state      TEXT   NOT NULL,
    agent_id   TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX vms_agent ON vms (agent_id) WHERE agent_id IS NOT NULL;
CREATE INDEX vms_claim ON vms (tenant_id, workspace, state, created_at);
