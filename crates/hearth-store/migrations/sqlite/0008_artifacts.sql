-- Content-addressed artifacts (kernels, initrds, disks, rootfs tars) that
-- nodes fetch by digest, so no VM relies on a path shared between machines.
-- SQLite flavour; keep in step with ../postgres/0008_artifacts.sql (same
-- columns, keys and indexes; only the bytes' type differs: BLOB in SQLite,
-- BYTEA in PostgreSQL).

-- An artifact's bytes, in chunks of at most 1 MiB, numbered from 0.
-- digest: lower-case SHA-256 hex of the whole artifact. Chunks are written
-- one statement each (never one transaction over the whole artifact, which
-- would hold SQLite's single writer for as long as a disk takes to copy);
-- a chunk without a row in artifacts is an upload not finished, never served.
CREATE TABLE artifact_chunks (
    digest TEXT   NOT NULL,
    seq    BIGINT NOT NULL,
    data   BLOB   NOT NULL,
    PRIMARY KEY (digest, seq)
);

-- The marker row of a whole artifact, written last, once every chunk is in
-- and the bytes were hashed to digest: only artifacts with one are served.
CREATE TABLE artifacts (
    digest     TEXT   NOT NULL PRIMARY KEY,
    size       BIGINT NOT NULL,
    chunks     BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
