-- Secrets at rest: the check of the key that seals environment variable
-- values and repo URL credentials (see src/secrets.rs). Only a check is
-- kept here, a known text sealed with the key, never the key: a server
-- given no key, or another one, over sealed data is refused at start.
-- One row at most. SQLite flavour; keep in step with ../postgres/0006_secrets_key.sql.
CREATE TABLE secrets_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    key_check TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
