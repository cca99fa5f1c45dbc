-- Dashboard sign-in sessions (sqlite flavour; keep in step with
-- ../postgres/0012_ui_sessions.sql: same columns and indexes).
--
-- id_sha256: the SHA-256 of the session id the browser holds in its
--   cookie; the id itself is never stored, so a copy of the database signs
--   no one in.
-- token_id, identity_id, tenant_id: the token the session was opened with,
--   and who it was then. A session is honoured only while that token exists,
--   has not expired and still belongs to that identity and tenant; deleting
--   the token (or its identity) deletes its sessions.
-- csrf_token: the value a state-changing request made with the cookie must
--   repeat in its X-Hearth-CSRF header.
-- expires_at: milliseconds since the epoch; never later than the token's
--   own expiry.
CREATE TABLE ui_sessions (
    id_sha256   BLOB  NOT NULL PRIMARY KEY,
    token_id    TEXT   NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    identity_id TEXT   NOT NULL,
    tenant_id   TEXT   NOT NULL,
    csrf_token  TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE INDEX ui_sessions_token ON ui_sessions (token_id);
CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);
