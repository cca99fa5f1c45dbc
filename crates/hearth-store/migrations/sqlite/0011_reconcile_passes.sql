-- The last reconcile pass of each tenant worth keeping, as its leader
-- wrote it, so every replica's `pool status` shows the leader's.
-- SQLite flavour; keep in step with ../postgres/0011_reconcile_passes.sql
-- (the same in both).
--
-- One row per tenant, overwritten. The leader writes it only after a pass
-- that acted, had an error or took the lead over: any write moves the
-- store's change token, and a row written on every pass would make every
-- pass read the whole tenant again (see ARCHITECTURE.md, pass status).
-- replica: the replica that ran the pass.
-- iteration: the pass's number on that replica.
-- started_at: milliseconds since the epoch.
-- status: the pass status as JSON (hearth_reconcilers::pass::PassStatus).
CREATE TABLE reconcile_passes (
    tenant_id  TEXT   PRIMARY KEY,
    replica    TEXT   NOT NULL,
    iteration  BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    status     TEXT   NOT NULL
);
