-- keywarden: digests a key gained after creation (PostgreSQL).
-- After a secret rotation a key gains a digest under the new secret on first use; the record's
-- own digest (keywarden_keys.digest) stays valid until its secret is retired, so instances
-- still on the old secret keep verifying the key. At most one digest per key and secret.
CREATE TABLE IF NOT EXISTS keywarden_key_digests (
    digest    BYTEA NOT NULL PRIMARY KEY CHECK (octet_length(digest) = 32),
    key_id    UUID  NOT NULL REFERENCES keywarden_keys (id) ON DELETE CASCADE,
    secret_id BYTEA NOT NULL CHECK (octet_length(secret_id) = 8),
    UNIQUE (key_id, secret_id)
);

-- Cross-instance invalidation: a digest that stops being valid (a retired secret) must leave
-- every instance's cache, as "<schema> key <id>" like the keys table's own trigger. Adding a
-- digest changes no cached answer, so inserts do not notify.
CREATE OR REPLACE FUNCTION keywarden_notify_digest_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keywarden_invalidate', TG_TABLE_SCHEMA || ' key ' || OLD.key_id::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS keywarden_key_digests_notify ON keywarden_key_digests;
CREATE TRIGGER keywarden_key_digests_notify
    AFTER UPDATE OR DELETE ON keywarden_key_digests
    FOR EACH ROW EXECUTE FUNCTION keywarden_notify_digest_change();
