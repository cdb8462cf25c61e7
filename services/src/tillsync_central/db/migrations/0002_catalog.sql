-- 0002 — the downward flow: the catalog central owns and registers replicate
-- (docs/catalog.md). Every edit writes its entity row, its changelog row and its scope's
-- counter in one transaction; the counter row serialises the writers of one scope, so
-- scope_seq is contiguous per scope and commits in order.
-- Never edit this file once applied: add 0003_….sql.

-- One counter per scope: 'global', and one per center (kept by the trigger below, so
-- that a center's scope exists exactly when the center does).
CREATE TABLE catalog_scopes (
    scope    text   PRIMARY KEY CHECK (scope ~ '^(global|[a-z0-9][a-z0-9-]{0,62})$'),
    last_seq bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
);
INSERT INTO catalog_scopes (scope) VALUES ('global');
INSERT INTO catalog_scopes (scope) SELECT center_id FROM centers ON CONFLICT DO NOTHING;

CREATE FUNCTION catalog_scope_of_center() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO catalog_scopes (scope) VALUES (NEW.center_id) ON CONFLICT DO NOTHING;
    RETURN NEW;
END
$$;
CREATE TRIGGER centers_catalog_scope AFTER INSERT ON centers
    FOR EACH ROW EXECUTE FUNCTION catalog_scope_of_center();

-- The current state of every entity row. version counts the row's changes (1, 2, …);
-- scope_seq is the changelog position of its latest change. A delete keeps the row as a
-- tombstone (deleted, state NULL) so that a delta can tell registers to delete it.
CREATE TABLE catalog_entities (
    scope      text        NOT NULL REFERENCES catalog_scopes (scope),
    entity     text        NOT NULL,
    key        text        NOT NULL CHECK (length(key) BETWEEN 1 AND 64),
    version    bigint      NOT NULL CHECK (version >= 1),
    scope_seq  bigint      NOT NULL CHECK (scope_seq >= 1),
    state      jsonb,
    deleted    boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, entity, key),
    CHECK (deleted = (state IS NULL))
);
-- Deltas read "everything of a scope changed after a cursor".
CREATE UNIQUE INDEX catalog_entities_seq_idx ON catalog_entities (scope, scope_seq);

CREATE TABLE catalog_changelog (
    scope      text        NOT NULL REFERENCES catalog_scopes (scope),
    scope_seq  bigint      NOT NULL CHECK (scope_seq >= 1),
    entity     text        NOT NULL,
    key        text        NOT NULL,
    op         text        NOT NULL CHECK (op IN ('upsert', 'delete')),
    version    bigint      NOT NULL CHECK (version >= 1),
    state      jsonb,
    -- clock_timestamp(): taken under the scope's lock, so it grows with scope_seq.
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    changed_by text        NOT NULL,
    PRIMARY KEY (scope, scope_seq),
    CHECK ((op = 'delete') = (state IS NULL))
);

-- How far the relay has published each scope (absent: nothing yet).
CREATE TABLE relay_positions (
    scope         text        PRIMARY KEY REFERENCES catalog_scopes (scope),
    published_seq bigint      NOT NULL CHECK (published_seq >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Register item edits central did not apply: code 'edit_conflict' (based on a version
-- that is no longer current: central won), 'unknown_item' (no live item with that id)
-- or 'invalid_value' (the merged item is not a valid item). One row per document, so a
-- redelivered document records nothing new and is rejected again with the same code.
CREATE TABLE catalog_conflicts (
    id              bigserial   PRIMARY KEY,
    code            text        NOT NULL
                                CHECK (code IN ('edit_conflict', 'unknown_item', 'invalid_value')),
    register_id     text        NOT NULL,
    seq             bigint      NOT NULL,
    doc_id          uuid        NOT NULL,
    scope           text,
    entity          text        NOT NULL DEFAULT 'items',
    key             text        NOT NULL,
    base_version    bigint      NOT NULL,
    current_version bigint,
    proposed        jsonb       NOT NULL,
    reason          text        NOT NULL DEFAULT '',
    detected_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (register_id, seq),
    FOREIGN KEY (register_id, seq) REFERENCES documents (register_id, seq)
);
CREATE INDEX catalog_conflicts_detected_idx ON catalog_conflicts (detected_at);
