-- keywarden: the change feed (PostgreSQL). Every change that matters for verification (a key
-- created, updated, revoked, disabled, rotated, re-digested or deleted) is a row here, written
-- by the same trigger in the same transaction as the change, whoever made it: an instance, the
-- CLI, or plain SQL. Instances poll it from the last sequence they applied (the safety net)
-- and hear of new rows through NOTIFY (the fast path); after a lost connection they replay
-- what they missed instead of dropping their whole cache.
CREATE TABLE IF NOT EXISTS keywarden_changes (
    seq    BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- NULL: a key was created (cached "not found" answers may be wrong now); the nil UUID:
    -- anything may have changed (a TRUNCATE).
    key_id UUID,
    -- When the row was written (not when its transaction began), so sequence order is time
    -- order and pruning by time removes a prefix of the feed.
    at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- One function for both tables' triggers. It runs as its owner (SECURITY DEFINER), so a role
-- allowed to change keys needs no rights on the feed; guarded like the audit trigger: it acts
-- only as the trigger of keywarden's own tables, and no other role may attach it anywhere.
CREATE OR REPLACE FUNCTION keywarden_feed_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    changed UUID;
    next    BIGINT;
BEGIN
    IF TG_TABLE_NAME NOT IN ('keywarden_keys', 'keywarden_key_digests')
       OR TG_TABLE_SCHEMA LIKE 'pg\_temp%' OR TG_TABLE_SCHEMA LIKE 'pg\_toast%'
       OR (SELECT c.relowner FROM pg_class AS c WHERE c.oid = TG_RELID)
          IS DISTINCT FROM (SELECT r.oid FROM pg_roles AS r WHERE r.rolname = current_user)
    THEN
        RAISE EXCEPTION 'keywarden_feed_change may only be the trigger of keywarden''s own tables';
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        changed := '00000000-0000-0000-0000-000000000000';
    ELSIF TG_TABLE_NAME = 'keywarden_keys' THEN
        -- Usage updates (last_used_at, use_count) change no answer: they are not fed, so
        -- write-behind flushes do not churn every instance's cache.
        IF TG_OP = 'UPDATE'
           AND (to_jsonb(OLD) - 'last_used_at' - 'use_count' - 'updated_at')
               = (to_jsonb(NEW) - 'last_used_at' - 'use_count' - 'updated_at') THEN
            RETURN NULL;
        END IF;
        IF TG_OP <> 'INSERT' THEN
            changed := OLD.id;
        END IF;
    ELSE
        -- A digest added after creation changes no cached answer; one that changes or goes
        -- (a retired secret) does.
        changed := OLD.key_id;
    END IF;
    -- Writers take turns from here to their commit, so sequence order is commit order: an
    -- instance that has applied N has seen every change numbered below N. Readers (the
    -- pollers) are not blocked by this lock mode. The price: a transaction that changed a key
    -- and stays open holds up every other key change until it ends (docs/deploy.md).
    EXECUTE format('LOCK TABLE %I.keywarden_changes IN SHARE ROW EXCLUSIVE MODE', TG_TABLE_SCHEMA);
    EXECUTE format('INSERT INTO %I.keywarden_changes (key_id) VALUES ($1) RETURNING seq',
                   TG_TABLE_SCHEMA)
        INTO next USING changed;
    PERFORM pg_notify('keywarden_feed', TG_TABLE_SCHEMA || ' ' || next::text
        || CASE WHEN changed IS NULL THEN ' created'
                WHEN TG_OP = 'TRUNCATE' THEN ' all'
                ELSE ' key ' || changed::text END);
    -- The channel instances of earlier versions listen on, for rolling upgrades.
    PERFORM pg_notify('keywarden_invalidate', TG_TABLE_SCHEMA
        || CASE WHEN changed IS NULL THEN ' created'
                WHEN TG_OP = 'TRUNCATE' THEN ' all'
                ELSE ' key ' || changed::text END);
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION keywarden_feed_change() FROM PUBLIC;

DROP TRIGGER IF EXISTS keywarden_keys_notify ON keywarden_keys;
DROP TRIGGER IF EXISTS keywarden_keys_feed ON keywarden_keys;
CREATE TRIGGER keywarden_keys_feed
    AFTER INSERT OR UPDATE OR DELETE ON keywarden_keys
    FOR EACH ROW EXECUTE FUNCTION keywarden_feed_change();

DROP TRIGGER IF EXISTS keywarden_key_digests_notify ON keywarden_key_digests;
DROP TRIGGER IF EXISTS keywarden_key_digests_feed ON keywarden_key_digests;
CREATE TRIGGER keywarden_key_digests_feed
    AFTER UPDATE OR DELETE ON keywarden_key_digests
    FOR EACH ROW EXECUTE FUNCTION keywarden_feed_change();

-- TRUNCATE fires no row trigger: one "anything may have changed" row per statement.
DROP TRIGGER IF EXISTS keywarden_keys_feed_truncate ON keywarden_keys;
CREATE TRIGGER keywarden_keys_feed_truncate
    AFTER TRUNCATE ON keywarden_keys
    FOR EACH STATEMENT EXECUTE FUNCTION keywarden_feed_change();
DROP TRIGGER IF EXISTS keywarden_key_digests_feed_truncate ON keywarden_key_digests;
CREATE TRIGGER keywarden_key_digests_feed_truncate
    AFTER TRUNCATE ON keywarden_key_digests
    FOR EACH STATEMENT EXECUTE FUNCTION keywarden_feed_change();
