-- The fleet: the nodes that run VMs, where each VM runs and what it takes,
-- and which replica has a task in flight on it. PostgreSQL flavour; keep in step with ../sqlite/0007_fleet.sql
-- (same columns, types, keys and indexes, so the SQL in src/sql.rs runs
-- unchanged on both).

-- A node joined with the fleet's join token; it authenticates with its own
-- credential (only its SHA-256 is kept) and serves TLS under its own CA.
-- state: ready | cordoned | draining (set by operators). Reachability is
-- not a state: it is last_heartbeat against the database's clock.
CREATE TABLE nodes (
    id              TEXT   NOT NULL PRIMARY KEY,
    name            TEXT   NOT NULL UNIQUE,
    address         TEXT   NOT NULL,
    ca_pem          TEXT   NOT NULL,
    credential_hash TEXT   NOT NULL,
    state           TEXT   NOT NULL,
    drivers         TEXT   NOT NULL,
    cpus            BIGINT NOT NULL,
    memory_mib      BIGINT NOT NULL,
    disk_mib        BIGINT NOT NULL,
    vm_slots        BIGINT NOT NULL,
    max_boots       BIGINT NOT NULL,
    joined_at       BIGINT NOT NULL,
    last_heartbeat  BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

-- node_id NULL: a VM recorded before nodes existed (the server's own
-- embedded node adopts them). cpus and memory_mib: what the VM takes of
-- its node's capacity. task_owner: the replica with a task (boot, destroy,
-- return) in flight on the VM, NULL when none.
ALTER TABLE vms ADD COLUMN node_id    TEXT   NULL;
ALTER TABLE vms ADD COLUMN cpus       BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN memory_mib BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN task_owner TEXT   NULL;
-- A node's live VMs (placement's room check, fencing, node loss).
CREATE INDEX vms_node ON vms (node_id, state);
