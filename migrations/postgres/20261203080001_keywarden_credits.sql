-- keywarden: credits (PostgreSQL). A key with credits has a refill policy (or none) and a
-- generation on its row, which the change feed and audit triggers cover, and its balance in
-- keywarden_credits, which they do not: instances lease blocks of credits from the balance in
-- one statement each, without churning every cache. The generation changes whenever credits
-- are set, voiding leases of earlier ones.
ALTER TABLE keywarden_keys ADD COLUMN IF NOT EXISTS credits_refill TEXT;
ALTER TABLE keywarden_keys ADD COLUMN IF NOT EXISTS credits_generation BIGINT;

CREATE TABLE IF NOT EXISTS keywarden_credits (
    key_id        UUID   NOT NULL PRIMARY KEY
                  REFERENCES keywarden_keys (id) ON DELETE CASCADE,
    -- Credits left, not counting those leased to instances.
    remaining     BIGINT NOT NULL CHECK (remaining >= 0),
    -- The refill: the balance is set to refill_amount each refill_ms, counted from anchor_ms
    -- (unix milliseconds); period is the last period the balance was refilled for.
    refill_amount BIGINT CHECK (refill_amount IS NULL OR refill_amount > 0),
    refill_ms     BIGINT CHECK (refill_ms IS NULL OR refill_ms > 0),
    anchor_ms     BIGINT NOT NULL,
    period        BIGINT NOT NULL DEFAULT 0 CHECK (period >= 0),
    generation    BIGINT NOT NULL,
    -- What the last lease took (read back by the statement that leased it).
    granted       BIGINT NOT NULL DEFAULT 0
);
