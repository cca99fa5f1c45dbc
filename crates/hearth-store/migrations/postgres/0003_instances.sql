-- Provisioning runs: one record per VM's provisioning pipeline run.
-- PostgreSQL flavour; keep in step with ../sqlite/0003_instances.sql (same
-- columns, types, keys and indexes, so the SQL in src/sql.rs runs unchanged
-- on both). Flags are BIGINT 0/1; summary and steps are JSON text.

-- vm_id is not a foreign key: a run's record outlives its VM's.
CREATE TABLE instances (
    id          TEXT   NOT NULL PRIMARY KEY,
    tenant_id   TEXT   NOT NULL REFERENCES tenants (id),
    workspace   TEXT   NOT NULL,
    vm_id       TEXT   NOT NULL,
    test        BIGINT NOT NULL,
    status      TEXT   NOT NULL,
    summary     TEXT   NULL,
    steps       TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    finished_at BIGINT NULL
);
-- A tenant's runs by workspace, newest first; a VM's runs.
CREATE INDEX instances_workspace ON instances (tenant_id, workspace, created_at);
CREATE INDEX instances_vm ON instances (vm_id);
