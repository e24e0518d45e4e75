-- keywarden: webhook subscriptions and their delivery state (SQLite). The audit log is the
-- outbox: `cursor` is the number of the last event delivered (or skipped as not subscribed).
CREATE TABLE IF NOT EXISTS keywarden_webhooks (
    id              BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    url             TEXT    NOT NULL,
    events          TEXT    NOT NULL,
    description     TEXT,
    sealed_secret   BLOB    NOT NULL,
    disabled        INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    created_at      INTEGER NOT NULL,
    cursor          INTEGER NOT NULL CHECK (cursor >= 0),
    expiring_cursor INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at INTEGER,
    last_error      TEXT,
    failing_since   INTEGER,
    lease_owner     BLOB CHECK (lease_owner IS NULL OR length(lease_owner) = 16),
    lease_until     INTEGER
);

-- `key.expiring` notices look keys up by expiry.
CREATE INDEX IF NOT EXISTS keywarden_keys_expires_idx ON keywarden_keys (expires_at)
    WHERE expires_at IS NOT NULL;
