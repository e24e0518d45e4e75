-- keywarden: the plain-SQL audit trigger, hardened.
-- 1. keywarden marks its own audited transactions with a row in keywarden_audit_tx (its txid),
--    not with a setting any session could set: a role that may change keys but not write
--    keywarden_audit_tx cannot make its changes unrecorded.
-- 2. The trigger runs as its owner (SECURITY DEFINER, fixed search_path): roles that change
--    keys need no rights on keywarden_audit_pending (grant them none, and they cannot add
--    events of their own), and `db_role` is the session's role, not a value they choose.
-- 3. A change of a key's digest or secret id (a swap that would let one key act as another) is
--    recorded as `"credential": "changed"` (never the values).
CREATE TABLE IF NOT EXISTS keywarden_audit_tx (
    txid BIGINT NOT NULL PRIMARY KEY
);

CREATE OR REPLACE FUNCTION keywarden_audit_sql_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hidden  text[] := ARRAY['id', 'digest', 'secret_id', 'encrypted_key', 'last_used_at',
                            'use_count', 'updated_at', 'display_start'];
    old_row jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) - hidden END;
    new_row jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) - hidden END;
    target  jsonb := CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD) ELSE to_jsonb(NEW) END;
    changes jsonb := '{}'::jsonb;
    credential boolean := false;
    audited boolean;
    action  text;
    field   text;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.keywarden_audit_tx WHERE txid = $1)',
                   TG_TABLE_SCHEMA)
        INTO audited USING txid_current();
    IF audited THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        credential := OLD.digest IS DISTINCT FROM NEW.digest
                      OR OLD.secret_id IS DISTINCT FROM NEW.secret_id;
        IF old_row = new_row AND NOT credential THEN
            RETURN NULL;
        END IF;
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
    IF credential THEN
        changes := changes || '{"credential": "changed"}'::jsonb;
    END IF;
    EXECUTE format('INSERT INTO %I.keywarden_audit_pending '
                   '(action, key_id, collection, subject, changes, db_role) '
                   'VALUES ($1, $2, $3, $4, $5, $6)',
                   TG_TABLE_SCHEMA)
        USING action, (target ->> 'id')::uuid, target ->> 'collection', target ->> 'subject',
              changes, session_user::text;
    RETURN NULL;
END
$$;
