-- keywarden: owner policies (SQLite). An owner (a subject of a collection) may have a rate
-- limit and/or credits that all its keys share. The policy row is read with each key (so the
-- change feed covers it: a change feeds every key of the owner, in the same transaction); the
-- shared balance lives in keywarden_owner_credits, which the feed does not cover: instances
-- lease blocks of it like a key's credits, without churning every cache.
CREATE TABLE IF NOT EXISTS keywarden_owners (
    collection         TEXT    NOT NULL,
    subject            TEXT    NOT NULL,
    -- The owner's budget id (UUIDv8 of the collection and subject), the same in every process.
    pool               BLOB    NOT NULL UNIQUE CHECK (length(pool) = 16),
    rate_limit         TEXT,
    credits_refill     TEXT,
    -- NULL: the owner has no shared credits. Changes whenever they are set.
    credits_generation INTEGER,
    updated_at         INTEGER NOT NULL,
    PRIMARY KEY (collection, subject)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS keywarden_owner_credits (
    pool          BLOB    NOT NULL PRIMARY KEY
                  REFERENCES keywarden_owners (pool) ON DELETE CASCADE,
    -- As in keywarden_credits.
    remaining     INTEGER NOT NULL CHECK (remaining >= 0),
    refill_amount INTEGER CHECK (refill_amount IS NULL OR refill_amount > 0),
    refill_ms     INTEGER CHECK (refill_ms IS NULL OR refill_ms > 0),
    anchor_ms     INTEGER NOT NULL,
    period        INTEGER NOT NULL DEFAULT 0 CHECK (period >= 0),
    generation    INTEGER NOT NULL,
    granted       INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- A policy change changes the answer for every key of the owner: each is fed.
CREATE TRIGGER IF NOT EXISTS keywarden_owners_feed_insert AFTER INSERT ON keywarden_owners
BEGIN
    INSERT INTO keywarden_changes (key_id)
        SELECT id FROM keywarden_keys
        WHERE collection = NEW.collection AND subject = NEW.subject;
END;

CREATE TRIGGER IF NOT EXISTS keywarden_owners_feed_update AFTER UPDATE OF
    collection, subject, pool, rate_limit, credits_refill, credits_generation
ON keywarden_owners
BEGIN
    INSERT INTO keywarden_changes (key_id)
        SELECT id FROM keywarden_keys
        WHERE (collection = OLD.collection AND subject = OLD.subject)
           OR (collection = NEW.collection AND subject = NEW.subject);
END;

CREATE TRIGGER IF NOT EXISTS keywarden_owners_feed_delete AFTER DELETE ON keywarden_owners
BEGIN
    INSERT INTO keywarden_changes (key_id)
        SELECT id FROM keywarden_keys
        WHERE collection = OLD.collection AND subject = OLD.subject;
END;
