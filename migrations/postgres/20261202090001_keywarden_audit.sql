-- keywarden: the tamper-evident audit log (PostgreSQL).
-- Events are numbered 1, 2, 3, ... without gaps, each sealed with an HMAC over its content and
-- the previous event's MAC (see the `keywarden::audit` docs). `changes` is TEXT, not JSONB: it
-- is the exact JSON text the MAC covers. Written in the same transaction as the change it
-- records; writers take `LOCK TABLE keywarden_audit IN SHARE ROW EXCLUSIVE MODE` first.
CREATE TABLE IF NOT EXISTS keywarden_audit (
    seq            BIGINT      NOT NULL PRIMARY KEY CHECK (seq > 0),
    at             TIMESTAMPTZ NOT NULL,
    action         TEXT        NOT NULL,
    actor          TEXT        NOT NULL,
    actor_kind     TEXT        NOT NULL,
    actor_key_id   UUID,
    actor_name     TEXT,
    key_id         UUID,
    collection     TEXT,
    subject        TEXT,
    changes        TEXT        NOT NULL,
    client_address TEXT,
    request_id     TEXT,
    sealed_by      BYTEA       NOT NULL CHECK (octet_length(sealed_by) = 8),
    mac            BYTEA       NOT NULL CHECK (octet_length(mac) = 32)
);

CREATE INDEX IF NOT EXISTS keywarden_audit_key_idx ON keywarden_audit (key_id, seq);
CREATE INDEX IF NOT EXISTS keywarden_audit_owner_idx ON keywarden_audit (collection, subject, seq);
CREATE INDEX IF NOT EXISTS keywarden_audit_at_idx ON keywarden_audit (at);

-- Where the chain stood after the last pruned event, sealed.
CREATE TABLE IF NOT EXISTS keywarden_audit_checkpoint (
    id        SMALLINT NOT NULL PRIMARY KEY CHECK (id = 1),
    seq       BIGINT   NOT NULL CHECK (seq > 0),
    mac       BYTEA    NOT NULL CHECK (octet_length(mac) = 32),
    sealed_by BYTEA    NOT NULL CHECK (octet_length(sealed_by) = 8),
    seal      BYTEA    NOT NULL CHECK (octet_length(seal) = 32)
);

-- Changes made with plain SQL, caught by the trigger below, wait here until keywarden seals
-- them into the chain (at its next audited write, or when the log is read). keywarden's own
-- writes set `keywarden.audited` for their transaction and are not caught twice.
CREATE TABLE IF NOT EXISTS keywarden_audit_pending (
    id         BIGSERIAL   NOT NULL PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    action     TEXT        NOT NULL,
    key_id     UUID,
    collection TEXT,
    subject    TEXT,
    changes    JSONB       NOT NULL,
    db_role    TEXT        NOT NULL DEFAULT session_user
);

CREATE OR REPLACE FUNCTION keywarden_audit_sql_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    -- Never the digest, secret id or encrypted key; not usage counters either.
    hidden  text[] := ARRAY['id', 'digest', 'secret_id', 'encrypted_key', 'last_used_at',
                            'use_count', 'updated_at', 'display_start'];
    old_row jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) - hidden END;
    new_row jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) - hidden END;
    target  jsonb := CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD) ELSE to_jsonb(NEW) END;
    changes jsonb := '{}'::jsonb;
    action  text;
    field   text;
BEGIN
    IF current_setting('keywarden.audited', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND old_row = new_row THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        action := 'key.created';
    ELSIF TG_OP = 'DELETE' THEN
        action := 'key.deleted';
    ELSIF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        action := 'key.revoked';
    ELSIF OLD.disabled AND NOT NEW.disabled THEN
        action := 'key.enabled';
    ELSIF NOT OLD.disabled AND NEW.disabled THEN
        action := 'key.disabled';
    ELSE
        action := 'key.updated';
    END IF;
    IF TG_OP <> 'DELETE' THEN
        FOR field IN SELECT jsonb_object_keys(new_row) LOOP
            IF (old_row -> field) IS DISTINCT FROM (new_row -> field) THEN
                changes := changes || jsonb_build_object(field, jsonb_build_object(
                    'from', coalesce(old_row -> field, 'null'::jsonb),
                    'to', new_row -> field));
            END IF;
        END LOOP;
    END IF;
    EXECUTE format('INSERT INTO %I.keywarden_audit_pending '
                   '(action, key_id, collection, subject, changes) VALUES ($1, $2, $3, $4, $5)',
                   TG_TABLE_SCHEMA)
        USING action, (target ->> 'id')::uuid, target ->> 'collection', target ->> 'subject',
              changes;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS keywarden_keys_audit ON keywarden_keys;
CREATE TRIGGER keywarden_keys_audit
    AFTER INSERT OR UPDATE OR DELETE ON keywarden_keys
    FOR EACH ROW EXECUTE FUNCTION keywarden_audit_sql_change();
