-- keywarden: per-key IP allowlists (SQLite): a JSON array of networks in CIDR notation as
-- keywarden writes them (`["10.0.0.0/8", "2001:db8::/32"]`); `[]`: anywhere.
ALTER TABLE keywarden_keys ADD COLUMN allowed_ips TEXT NOT NULL DEFAULT '[]';

-- The change feed's update trigger names every column that changes an answer: the new one too.
DROP TRIGGER IF EXISTS keywarden_keys_feed_update;
CREATE TRIGGER keywarden_keys_feed_update AFTER UPDATE OF
    id, digest, secret_id, display_start, name, description, collection, subject, owner_kind,
    scopes, environment, read_only, metadata, rate_limit, created_at, expires_at, revoked_at,
    disabled, rotated_from, encrypted_key, allowed_ips
ON keywarden_keys
BEGIN
    INSERT INTO keywarden_changes (key_id) VALUES (OLD.id);
END;
