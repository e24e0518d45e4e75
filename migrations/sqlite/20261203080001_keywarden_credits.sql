-- keywarden: credits (SQLite). A key with credits has a refill policy (or none) and a
-- generation on its row, which the change feed covers, and its balance in keywarden_credits,
-- which it does not: instances lease blocks of credits from the balance without churning every
-- cache. The generation changes whenever credits are set, voiding leases of earlier ones.
ALTER TABLE keywarden_keys ADD COLUMN credits_refill TEXT;
ALTER TABLE keywarden_keys ADD COLUMN credits_generation INTEGER;

CREATE TABLE IF NOT EXISTS keywarden_credits (
    key_id        BLOB    NOT NULL PRIMARY KEY
                  REFERENCES keywarden_keys (id) ON DELETE CASCADE,
    -- Credits left, not counting those leased to instances.
    remaining     INTEGER NOT NULL CHECK (remaining >= 0),
    -- The refill: the balance is set to refill_amount each refill_ms, counted from anchor_ms
    -- (unix milliseconds); period is the last period the balance was refilled for.
    refill_amount INTEGER CHECK (refill_amount IS NULL OR refill_amount > 0),
    refill_ms     INTEGER CHECK (refill_ms IS NULL OR refill_ms > 0),
    anchor_ms     INTEGER NOT NULL,
    period        INTEGER NOT NULL DEFAULT 0 CHECK (period >= 0),
    generation    INTEGER NOT NULL,
    -- What the last lease took (read back by the statement that leased it).
    granted       INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- The change feed's update trigger names every column that changes an answer: the new ones too.
DROP TRIGGER IF EXISTS keywarden_keys_feed_update;
CREATE TRIGGER keywarden_keys_feed_update AFTER UPDATE OF
    id, digest, secret_id, display_start, name, description, collection, subject, owner_kind,
    scopes, environment, read_only, metadata, rate_limit, created_at, expires_at, revoked_at,
    disabled, rotated_from, encrypted_key, allowed_ips, credits_refill, credits_generation
ON keywarden_keys
BEGIN
    INSERT INTO keywarden_changes (key_id) VALUES (OLD.id);
END;
