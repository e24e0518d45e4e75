-- keywarden: webhook subscriptions and their delivery state (PostgreSQL). The audit log is the
-- outbox: `cursor` is the number of the last event delivered (or skipped as not subscribed).
CREATE TABLE IF NOT EXISTS keywarden_webhooks (
    id              UUID        NOT NULL PRIMARY KEY,
    url             TEXT        NOT NULL,
    events          TEXT[]      NOT NULL,
    description     TEXT,
    sealed_secret   BYTEA       NOT NULL,
    disabled        BOOLEAN     NOT NULL DEFAULT FALSE,
    created_at      TIMESTAMPTZ NOT NULL,
    cursor          BIGINT      NOT NULL CHECK (cursor >= 0),
    expiring_cursor TIMESTAMPTZ NOT NULL,
    attempts        INTEGER     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at TIMESTAMPTZ,
    last_error      TEXT,
    failing_since   TIMESTAMPTZ,
    lease_owner     UUID,
    lease_until     TIMESTAMPTZ
);

-- `key.expiring` notices look keys up by expiry.
CREATE INDEX IF NOT EXISTS keywarden_keys_expires_idx ON keywarden_keys (expires_at)
    WHERE expires_at IS NOT NULL;
