-- keywarden: API keys (SQLite).
-- ids are 16-byte UUID blobs, so byte order is id order; timestamps are UTC unix microseconds.
CREATE TABLE IF NOT EXISTS keywarden_keys (
    id            BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    digest        BLOB    NOT NULL CHECK (length(digest) = 32),
    secret_id     BLOB    NOT NULL CHECK (length(secret_id) = 8),
    display_start TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    description   TEXT,
    collection    TEXT    NOT NULL,
    subject       TEXT    NOT NULL,
    owner_kind    TEXT    NOT NULL CHECK (owner_kind IN ('user', 'team', 'service')),
    scopes        TEXT    NOT NULL DEFAULT '[]',
    environment   TEXT    NOT NULL,
    read_only     INTEGER NOT NULL DEFAULT 0 CHECK (read_only IN (0, 1)),
    metadata      TEXT    NOT NULL DEFAULT '{}',
    rate_limit    TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    last_used_at  INTEGER,
    use_count     INTEGER NOT NULL DEFAULT 0 CHECK (use_count >= 0),
    revoked_at    INTEGER,
    disabled      INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    rotated_from  BLOB CHECK (rotated_from IS NULL OR length(rotated_from) = 16),
    encrypted_key BLOB
);

CREATE UNIQUE INDEX IF NOT EXISTS keywarden_keys_digest_key ON keywarden_keys (digest);
CREATE INDEX IF NOT EXISTS keywarden_keys_collection_idx ON keywarden_keys (collection, id);
CREATE INDEX IF NOT EXISTS keywarden_keys_subject_idx ON keywarden_keys (subject, id);
