-- What setup each VM was built from: the digest of its workspace's
-- provisioning inputs (repos, branches, setup commands, environment name),
-- computed by the reconciler. PostgreSQL flavour; keep in step with
-- ../sqlite/0004_setup_digest.sql.
--
-- Existing VMs get '' (built before digests existed): no current digest is
-- empty, so the reconciler marks them stale and replaces the idle ones a
-- few at a time, fresh ones first (see ARCHITECTURE.md, Decisions).
ALTER TABLE vms ADD COLUMN setup_digest TEXT NOT NULL DEFAULT '';
