-- keywarden: digests a key gained after creation (SQLite).
-- After a secret rotation a key gains a digest under the new secret on first use; the record's
-- own digest (keywarden_keys.digest) stays valid until its secret is retired, so instances
-- still on the old secret keep verifying the key. At most one digest per key and secret.
CREATE TABLE IF NOT EXISTS keywarden_key_digests (
    digest    BLOB NOT NULL PRIMARY KEY CHECK (length(digest) = 32),
    key_id    BLOB NOT NULL REFERENCES keywarden_keys (id) ON DELETE CASCADE,
    secret_id BLOB NOT NULL CHECK (length(secret_id) = 8),
    UNIQUE (key_id, secret_id)
) WITHOUT ROWID;
