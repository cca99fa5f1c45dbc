-- Images by name, baked by the server. SQLite flavour; keep in step with
-- ../postgres/0005_image_bakes.sql (same columns, types, keys and indexes,
-- so the SQL in src/sql.rs runs unchanged on both).
--
-- One row per bake job of an image: the server runs it and appends its
-- log. The partial unique index is what makes two bakes of one image never
-- run at once: a second `queued` or `running` row cannot be inserted.
-- image is not a foreign key: a job's record outlives its image's.
CREATE TABLE image_bakes (
    id          TEXT   NOT NULL PRIMARY KEY,
    tenant_id   TEXT   NOT NULL REFERENCES tenants (id),
    image       TEXT   NOT NULL,
    state       TEXT   NOT NULL,
    requested_by TEXT  NOT NULL,
    recipe      TEXT   NOT NULL,
    step        TEXT   NOT NULL,
    log         TEXT   NOT NULL,
    error       TEXT   NULL,
    bake        BIGINT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    finished_at BIGINT NULL
);
CREATE INDEX image_bakes_image ON image_bakes (tenant_id, image, created_at);
CREATE UNIQUE INDEX image_bakes_one_active ON image_bakes (tenant_id, image)
    WHERE state IN ('queued', 'running');

-- Images used to name host files (kernel, initrd, disk, root_dir); those
-- fields are gone. Stored images lose them and boot nothing until baked
-- (hearth image bake) or registered prebuilt by an operator.
UPDATE resources
   SET spec = json_remove(spec, '$.kernel', '$.initrd', '$.disk', '$.root_dir')
 WHERE kind = 'image';
