-- keywarden: API keys (PostgreSQL).
CREATE TABLE IF NOT EXISTS keywarden_keys (
    id            UUID        NOT NULL PRIMARY KEY,
    digest        BYTEA       NOT NULL CHECK (octet_length(digest) = 32),
    secret_id     BYTEA       NOT NULL CHECK (octet_length(secret_id) = 8),
    display_start TEXT        NOT NULL,
    name          TEXT        NOT NULL,
    description   TEXT,
    collection    TEXT        NOT NULL,
    subject       TEXT        NOT NULL,
    owner_kind    TEXT        NOT NULL CHECK (owner_kind IN ('user', 'team', 'service')),
    scopes        TEXT[]      NOT NULL DEFAULT '{}',
    environment   TEXT        NOT NULL,
    read_only     BOOLEAN     NOT NULL DEFAULT FALSE,
    metadata      JSONB       NOT NULL DEFAULT '{}'::jsonb,
    rate_limit    TEXT,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ,
    last_used_at  TIMESTAMPTZ,
    use_count     BIGINT      NOT NULL DEFAULT 0 CHECK (use_count >= 0),
    revoked_at    TIMESTAMPTZ,
    disabled      BOOLEAN     NOT NULL DEFAULT FALSE,
    rotated_from  UUID,
    encrypted_key BYTEA
);

CREATE UNIQUE INDEX IF NOT EXISTS keywarden_keys_digest_key ON keywarden_keys (digest);
CREATE INDEX IF NOT EXISTS keywarden_keys_collection_idx ON keywarden_keys (collection, id);
CREATE INDEX IF NOT EXISTS keywarden_keys_subject_idx ON keywarden_keys (subject, id);
