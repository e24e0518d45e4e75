-- keywarden: owner policies (PostgreSQL). An owner (a subject of a collection) may have a rate
-- limit and/or credits that all its keys share. The policy row is read with each key, so a
-- change to it feeds every key of the owner to the change feed, in the same transaction,
-- whoever made it; the shared balance lives in keywarden_owner_credits, which the feed does
-- not cover: instances lease blocks of it like a key's credits, without churning every cache.
CREATE TABLE IF NOT EXISTS keywarden_owners (
    collection         TEXT        NOT NULL,
    subject            TEXT        NOT NULL,
    -- The owner's budget id (UUIDv8 of the collection and subject), the same in every process.
    pool               UUID        NOT NULL UNIQUE,
    rate_limit         TEXT,
    credits_refill     TEXT,
    -- NULL: the owner has no shared credits. Changes whenever they are set.
    credits_generation BIGINT,
    updated_at         TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (collection, subject)
);

CREATE TABLE IF NOT EXISTS keywarden_owner_credits (
    pool          UUID   NOT NULL PRIMARY KEY
                  REFERENCES keywarden_owners (pool) ON DELETE CASCADE,
    -- As in keywarden_credits.
    remaining     BIGINT NOT NULL CHECK (remaining >= 0),
    refill_amount BIGINT CHECK (refill_amount IS NULL OR refill_amount > 0),
    refill_ms     BIGINT CHECK (refill_ms IS NULL OR refill_ms > 0),
    anchor_ms     BIGINT NOT NULL,
    period        BIGINT NOT NULL DEFAULT 0 CHECK (period >= 0),
    generation    BIGINT NOT NULL,
    granted       BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS keywarden_keys_owner_idx ON keywarden_keys (collection, subject);

-- Feeds every key of the changed owner (the old and the new one of an UPDATE), like
-- keywarden_feed_change feeds one key: SECURITY DEFINER, and only as the trigger of
-- keywarden's own table.
CREATE OR REPLACE FUNCTION keywarden_owner_feed_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    owners  TEXT[][];
    owner   TEXT[];
    changed UUID;
    next    BIGINT;
BEGIN
    IF TG_TABLE_NAME <> 'keywarden_owners'
       OR TG_TABLE_SCHEMA LIKE 'pg\_temp%' OR TG_TABLE_SCHEMA LIKE 'pg\_toast%'
       OR (SELECT c.relowner FROM pg_class AS c WHERE c.oid = TG_RELID)
          IS DISTINCT FROM (SELECT r.oid FROM pg_roles AS r WHERE r.rolname = current_user)
    THEN
        RAISE EXCEPTION 'keywarden_owner_feed_change may only be the trigger of keywarden''s own tables';
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        EXECUTE format('LOCK TABLE %I.keywarden_changes IN SHARE ROW EXCLUSIVE MODE', TG_TABLE_SCHEMA);
        EXECUTE format('INSERT INTO %I.keywarden_changes (key_id) VALUES ($1) RETURNING seq',
                       TG_TABLE_SCHEMA)
            INTO next USING '00000000-0000-0000-0000-000000000000'::uuid;
        PERFORM pg_notify('keywarden_feed', TG_TABLE_SCHEMA || ' ' || next::text || ' all');
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        owners := ARRAY[ARRAY[NEW.collection, NEW.subject]];
    ELSIF TG_OP = 'DELETE' THEN
        owners := ARRAY[ARRAY[OLD.collection, OLD.subject]];
    ELSE
        owners := ARRAY[ARRAY[OLD.collection, OLD.subject], ARRAY[NEW.collection, NEW.subject]];
    END IF;
    -- Writers take turns from here to their commit, as in keywarden_feed_change.
    EXECUTE format('LOCK TABLE %I.keywarden_changes IN SHARE ROW EXCLUSIVE MODE', TG_TABLE_SCHEMA);
    FOREACH owner SLICE 1 IN ARRAY owners LOOP
        FOR changed IN EXECUTE format(
            'SELECT id FROM %I.keywarden_keys WHERE collection = $1 AND subject = $2',
            TG_TABLE_SCHEMA) USING owner[1], owner[2]
        LOOP
            EXECUTE format('INSERT INTO %I.keywarden_changes (key_id) VALUES ($1) RETURNING seq',
                           TG_TABLE_SCHEMA)
                INTO next USING changed;
            PERFORM pg_notify('keywarden_feed',
                TG_TABLE_SCHEMA || ' ' || next::text || ' key ' || changed::text);
        END LOOP;
    END LOOP;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION keywarden_owner_feed_change() FROM PUBLIC;

DROP TRIGGER IF EXISTS keywarden_owners_feed ON keywarden_owners;
CREATE TRIGGER keywarden_owners_feed
    AFTER INSERT OR UPDATE OR DELETE ON keywarden_owners
    FOR EACH ROW EXECUTE FUNCTION keywarden_owner_feed_change();
DROP TRIGGER IF EXISTS keywarden_owners_feed_truncate ON keywarden_owners;
CREATE TRIGGER keywarden_owners_feed_truncate
    AFTER TRUNCATE ON keywarden_owners
    FOR EACH STATEMENT EXECUTE FUNCTION keywarden_owner_feed_change();
