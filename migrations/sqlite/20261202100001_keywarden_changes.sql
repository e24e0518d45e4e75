-- keywarden: the change feed (SQLite). Every change that matters for verification is a row
-- here, written by a trigger in the same transaction as the change, whoever made it (an
-- instance, the CLI, plain SQL). SQLite has one writer at a time, so sequence order is commit
-- order. Processes sharing the database poll it from the last sequence they applied.
-- key_id NULL: a key was created (cached "not found" answers may be wrong now).
CREATE TABLE IF NOT EXISTS keywarden_changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id BLOB CHECK (key_id IS NULL OR length(key_id) = 16),
    at     INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
);

-- `INSERT OR REPLACE` deletes the rows it replaces (same id, or same digest) without firing
-- their delete trigger: those keys are fed before the insert, and the inserted one after.
CREATE TRIGGER IF NOT EXISTS keywarden_keys_feed_replace BEFORE INSERT ON keywarden_keys
BEGIN
    INSERT INTO keywarden_changes (key_id)
        SELECT id FROM keywarden_keys WHERE id = NEW.id OR digest = NEW.digest;
END;

CREATE TRIGGER IF NOT EXISTS keywarden_keys_feed_insert AFTER INSERT ON keywarden_keys
BEGIN
    INSERT INTO keywarden_changes (key_id) VALUES (NULL);
    INSERT INTO keywarden_changes (key_id) VALUES (NEW.id);
END;

-- Every column but the usage ones (last_used_at, use_count, updated_at): write-behind usage
-- flushes change no answer. A column added to keywarden_keys must be added here.
CREATE TRIGGER IF NOT EXISTS keywarden_keys_feed_update AFTER UPDATE OF
    id, digest, secret_id, display_start, name, description, collection, subject, owner_kind,
    scopes, environment, read_only, metadata, rate_limit, created_at, expires_at, revoked_at,
    disabled, rotated_from, encrypted_key
ON keywarden_keys
BEGIN
    INSERT INTO keywarden_changes (key_id) VALUES (OLD.id);
END;

CREATE TRIGGER IF NOT EXISTS keywarden_keys_feed_delete AFTER DELETE ON keywarden_keys
BEGIN
    INSERT INTO keywarden_changes (key_id) VALUES (OLD.id);
END;

CREATE TRIGGER IF NOT EXISTS keywarden_key_digests_feed_replace BEFORE INSERT ON keywarden_key_digests
BEGIN
    INSERT INTO keywarden_changes (key_id)
        SELECT key_id FROM keywarden_key_digests
        WHERE digest = NEW.digest OR (key_id = NEW.key_id AND secret_id = NEW.secret_id);
END;

CREATE TRIGGER IF NOT EXISTS keywarden_key_digests_feed_insert AFTER INSERT ON keywarden_key_digests
BEGIN
    INSERT INTO keywarden_changes (key_id) VALUES (NEW.key_id);
END;

CREATE TRIGGER IF NOT EXISTS keywarden_key_digests_feed_update AFTER UPDATE ON keywarden_key_digests
BEGIN
    INSERT INTO keywarden_changes (key_id) VALUES (OLD.key_id);
END;

CREATE TRIGGER IF NOT EXISTS keywarden_key_digests_feed_delete AFTER DELETE ON keywarden_key_digests
BEGIN
    INSERT INTO keywarden_changes (key_id) VALUES (OLD.key_id);
END;
