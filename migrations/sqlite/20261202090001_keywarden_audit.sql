-- keywarden: the tamper-evident audit log (SQLite).
-- Events are numbered 1, 2, 3, ... without gaps, each sealed with an HMAC over its content and
-- the previous event's MAC (see the `keywarden::audit` docs). `changes` is the exact JSON text
-- the MAC covers. Written in the same transaction as the change it records.
CREATE TABLE IF NOT EXISTS keywarden_audit (
    seq            INTEGER NOT NULL PRIMARY KEY CHECK (seq > 0),
    at             INTEGER NOT NULL,
    action         TEXT    NOT NULL,
    actor          TEXT    NOT NULL,
    actor_kind     TEXT    NOT NULL,
    actor_key_id   BLOB CHECK (actor_key_id IS NULL OR length(actor_key_id) = 16),
    actor_name     TEXT,
    key_id         BLOB CHECK (key_id IS NULL OR length(key_id) = 16),
    collection     TEXT,
    subject        TEXT,
    changes        TEXT    NOT NULL,
    client_address TEXT,
    request_id     TEXT,
    sealed_by      BLOB    NOT NULL CHECK (length(sealed_by) = 8),
    mac            BLOB    NOT NULL CHECK (length(mac) = 32)
);

CREATE INDEX IF NOT EXISTS keywarden_audit_key_idx ON keywarden_audit (key_id, seq);
CREATE INDEX IF NOT EXISTS keywarden_audit_owner_idx ON keywarden_audit (collection, subject, seq);
CREATE INDEX IF NOT EXISTS keywarden_audit_at_idx ON keywarden_audit (at);

-- Where the chain stood after the last pruned event, sealed.
CREATE TABLE IF NOT EXISTS keywarden_audit_checkpoint (
    id        INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    seq       INTEGER NOT NULL CHECK (seq > 0),
    mac       BLOB    NOT NULL CHECK (length(mac) = 32),
    sealed_by BLOB    NOT NULL CHECK (length(sealed_by) = 8),
    seal      BLOB    NOT NULL CHECK (length(seal) = 32)
);
